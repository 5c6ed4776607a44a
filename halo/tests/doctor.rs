//! `halo doctor` against captured trees: the good Strix Halo node, and one fault at a time.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{good_env, good_tree, halo, stderr, stdout, Overlay};
use halo::doctor::{NodeReport, Verdict};

fn doctor_json(root: &Path, env_file: &Path, extra: &[&str]) -> (i32, NodeReport) {
    let out = halo()
        .arg("doctor")
        .arg("--json")
        .arg("--root")
        .arg(root)
        .arg("--env-file")
        .arg(env_file)
        .args(extra)
        .output()
        .unwrap();
    let report: NodeReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}{}", stdout(&out), stderr(&out)));
    (out.status.code().unwrap(), report)
}

#[test]
fn good_node_passes_everything_and_matches_the_snapshot() {
    let out = halo()
        .arg("doctor")
        .arg("--root")
        .arg(good_tree())
        .arg("--env-file")
        .arg(good_env())
        .output()
        .unwrap();
    let table = stdout(&out);
    println!("{table}");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let snapshot = common::fixtures().join("doctor/good.report.txt");
    if std::env::var_os("HALO_UPDATE_SNAPSHOTS").is_some() {
        fs::write(&snapshot, &table).unwrap();
    }
    assert_eq!(
        table,
        fs::read_to_string(&snapshot).unwrap(),
        "report differs from {}",
        snapshot.display()
    );

    let (code, report) = doctor_json(&good_tree(), &good_env(), &[]);
    assert_eq!(code, 0);
    assert_eq!(report.node, "strix1");
    assert_eq!(report.checks.len(), 25);
    for c in &report.checks {
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        assert!(c.fix.is_empty(), "{c:?}");
    }
    assert!(report.peers.is_empty());
    let gid = report.check("rdma.gid").unwrap();
    assert_eq!(
        gid.value,
        "index 1 (RoCE v2 ::ffff:192.168.100.1 on enp1s0f0np0): set NCCL_IB_GID_INDEX=1"
    );
}

#[test]
fn json_schema_is_stable() {
    let out = halo()
        .arg("doctor")
        .arg("--json")
        .arg("--root")
        .arg(good_tree())
        .arg("--env-file")
        .arg(good_env())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["checks", "node", "peers"]);
    let check = &v["checks"][0];
    let mut ck: Vec<&str> = check
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    ck.sort();
    assert_eq!(ck, ["fix", "id", "title", "value", "verdict"]);
    assert_eq!(check["verdict"], "pass");
}

/// One broken thing: how to break it, and what the doctor must say about it.
struct Fault {
    name: &'static str,
    apply: fn(&Overlay),
    env: Option<&'static str>,
    args: &'static [&'static str],
    id: &'static str,
    verdict: Verdict,
    value_has: &'static str,
    fix: &'static str,
}

const GOOD_ENV: &str = "NCCL_NET_PLUGIN=/opt/halo/lib/librccl-net-halo.so\nNCCL_SOCKET_IFNAME=enp1s0f0np0\nNCCL_IB_GID_INDEX=1\nNCCL_NET_GDR_LEVEL=SYS\n";
const PLUGIN_FIX: &str = "export NCCL_NET_PLUGIN=halo LD_LIBRARY_PATH=/opt/halo/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} (the directory of librccl-net-halo.so; halo cluster up sets both)";
const CMDLINE: &str = "proc/cmdline";
const PORT: &str = "sys/class/infiniband/rocep1s0f0/ports/1";

fn faults() -> Vec<Fault> {
    vec![
        Fault {
            name: "iommu=pt missing",
            apply: |o| { o.edit(CMDLINE, "iommu=pt ", ""); },
            env: None, args: &[],
            id: "kernel.iommu", verdict: Verdict::Fail, value_has: "iommu=pt missing",
            fix: "sudo grubby --update-kernel=ALL --args='iommu=pt' && sudo reboot",
        },
        Fault {
            name: "pci=realloc missing",
            apply: |o| { o.edit(CMDLINE, "pci=realloc ", ""); },
            env: None, args: &[],
            id: "kernel.pci_realloc", verdict: Verdict::Fail, value_has: "pci=realloc missing",
            fix: "sudo grubby --update-kernel=ALL --args='pci=realloc' && sudo reboot",
        },
        Fault {
            name: "pcie_aspm=off missing",
            apply: |o| { o.edit(CMDLINE, "pcie_aspm=off ", ""); },
            env: None, args: &[],
            id: "kernel.pcie_aspm", verdict: Verdict::Fail, value_has: "pcie_aspm=off missing",
            fix: "sudo grubby --update-kernel=ALL --args='pcie_aspm=off' && sudo reboot",
        },
        Fault {
            name: "gttsize alone on kernel 6.18 (deprecated)",
            apply: |o| { o.edit(CMDLINE, " ttm.pages_limit=31457280", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "deprecated since 6.14",
            fix: "sudo grubby --update-kernel=ALL --remove-args='amdgpu.gttsize' --args='ttm.pages_limit=31457280' && sudo reboot",
        },
        Fault {
            name: "gttsize alone on kernel 6.8 (still the way)",
            apply: |o| {
                o.edit(CMDLINE, " ttm.pages_limit=31457280", "");
                o.write("proc/sys/kernel/osrelease", "6.8.9-300.fc40.x86_64\n");
            },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Pass, value_has: "amdgpu.gttsize=122880 (120.0 GiB) only, kernel 6.8", fix: "",
        },
        Fault {
            name: "pages_limit alone",
            apply: |o| { o.edit(CMDLINE, " amdgpu.gttsize=122880", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Pass, value_has: "ttm.pages_limit=31457280 (120.0 GiB)", fix: "",
        },
        Fault {
            name: "gttsize and pages_limit disagree",
            apply: |o| { o.edit(CMDLINE, "ttm.pages_limit=31457280", "ttm.pages_limit=25165824"); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Fail, value_has: "the two disagree",
            fix: "sudo grubby --update-kernel=ALL --args='amdgpu.gttsize=122880 ttm.pages_limit=31457280' && sudo reboot",
        },
        Fault {
            name: "no GTT parameter",
            apply: |o| { o.edit(CMDLINE, " amdgpu.gttsize=122880 ttm.pages_limit=31457280", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "neither ttm.pages_limit nor amdgpu.gttsize",
            fix: "sudo grubby --update-kernel=ALL --args='ttm.pages_limit=31719424' && sudo reboot",
        },
        Fault {
            name: "guide's 124 GiB GTT leaves the OS < 4 GiB",
            apply: |o| {
                o.edit(CMDLINE, "amdgpu.gttsize=122880 ttm.pages_limit=31457280", "amdgpu.gttsize=126976 ttm.pages_limit=32505856");
                o.write("sys/class/drm/card1/device/mem_info_gtt_total", "133143986176\n");
            },
            env: None, args: &[],
            id: "kernel.gtt_ram", verdict: Verdict::Warn, value_has: "GTT ceiling 124.0 GiB of MemTotal 125.2 GiB: leaves the OS less than 4.0 GiB",
            fix: "sudo grubby --update-kernel=ALL --args='amdgpu.gttsize=123904 ttm.pages_limit=31719424' && sudo reboot",
        },
        Fault {
            name: "GTT ceiling larger than RAM (64 GB board)",
            apply: |o| { o.edit("proc/meminfo", "MemTotal:       131281004 kB", "MemTotal:       65011712 kB"); },
            env: None, args: &[],
            id: "kernel.gtt_ram", verdict: Verdict::Fail, value_has: "larger than RAM",
            fix: "sudo grubby --update-kernel=ALL --args='amdgpu.gttsize=59392 ttm.pages_limit=15204352' && sudo reboot",
        },
        Fault {
            name: "not gfx1151",
            apply: |o| { o.edit("sys/class/kfd/kfd/topology/nodes/1/properties", "110501", "110000"); },
            env: None, args: &[],
            id: "gpu.arch", verdict: Verdict::Warn, value_has: "gfx1100 (gfx_target_version 110000), not Strix Halo's gfx1151",
            fix: "check that RCCL, PyTorch and vLLM ship code objects for this GPU (HSA_OVERRIDE_GFX_VERSION is a last resort)",
        },
        Fault {
            name: "no KFD GPU node",
            apply: |o| { o.remove("sys/class/kfd/kfd/topology/nodes/1"); },
            env: None, args: &[],
            id: "gpu.arch", verdict: Verdict::Fail, value_has: "no GPU node in the KFD topology",
            fix: "sudo modprobe amdgpu; check `dmesg | grep -i kfd`",
        },
        Fault {
            name: "16 GiB BIOS carve-out",
            apply: |o| { o.write("sys/class/drm/card1/device/mem_info_vram_total", "17179869184\n"); },
            env: None, args: &[],
            id: "gpu.memory", verdict: Verdict::Warn, value_has: "VRAM carve-out 16.0 GiB",
            fix: "set the BIOS iGPU memory allocation to its minimum (512 MB)",
        },
        Fault {
            name: "GTT size not applied (no reboot)",
            apply: |o| { o.write("sys/class/drm/card1/device/mem_info_gtt_total", "67108864000\n"); },
            env: None, args: &[],
            id: "gpu.memory", verdict: Verdict::Warn, value_has: "the kernel command line asks for 120.0 GiB",
            fix: "reboot so the new GTT parameters take effect (check `cat /proc/cmdline`)",
        },
        Fault {
            name: "RDMA port down",
            apply: |o| {
                o.write(&format!("{PORT}/state"), "1: DOWN\n");
                o.write(&format!("{PORT}/phys_state"), "3: Disabled\n");
            },
            env: None, args: &[],
            id: "rdma.port", verdict: Verdict::Fail, value_has: "state 1: DOWN, phys_state 3: Disabled",
            fix: "sudo ip link set enp1s0f0np0 up; check the cable and `rdma link` (want state ACTIVE physical_state LINK_UP)",
        },
        Fault {
            name: "no RDMA devices",
            apply: |o| { o.remove("sys/class/infiniband"); },
            env: None, args: &[],
            id: "rdma.devices", verdict: Verdict::Fail, value_has: "none under /sys/class/infiniband",
            fix: "sudo dnf install rdma-core && sudo modprobe irdma (E810), then check `rdma link`",
        },
        Fault {
            name: "cluster IP has no RoCE v2 GID",
            apply: |o| { o.write(&format!("{PORT}/gids/1"), "0000:0000:0000:0000:0000:0000:0000:0000\n"); },
            env: None, args: &["--cluster-ip", "192.168.100.1"],
            id: "rdma.port", verdict: Verdict::Fail, value_has: "no RoCE v2 GID with an IPv4 address for 192.168.100.1",
            fix: "sudo ip addr add 192.168.100.1/30 dev enp1s0f0np0 (RoCE v2 GIDs follow the interface's addresses)",
        },
        Fault {
            name: "InfiniBand-style GID index 0 is found",
            apply: |o| {
                o.write(&format!("{PORT}/gids/0"), "0000:0000:0000:0000:0000:ffff:c0a8:6401\n");
                o.write(&format!("{PORT}/gids/1"), "fe80:0000:0000:0000:6efe:54ff:fe3d:1a20\n");
            },
            env: Some("NCCL_IB_GID_INDEX=0\n"), args: &["--cluster-ip", "192.168.100.1"],
            id: "rdma.gid", verdict: Verdict::Pass, value_has: "index 0 (RoCE v2 ::ffff:192.168.100.1 on enp1s0f0np0): set NCCL_IB_GID_INDEX=0", fix: "",
        },
        Fault {
            name: "MTU 1500",
            apply: |o| { o.write("sys/class/net/enp1s0f0np0/mtu", "1500\n"); },
            env: None, args: &[],
            id: "net.mtu", verdict: Verdict::Warn, value_has: "enp1s0f0np0 mtu 1500",
            fix: "sudo ip link set dev enp1s0f0np0 mtu 9000 (persist: sudo nmcli connection modify <connection> ethernet.mtu 9000)",
        },
        Fault {
            name: "MTU 1500 caps the RDMA MTU",
            apply: |o| { o.write("sys/class/net/enp1s0f0np0/mtu", "1500\n"); },
            env: None, args: &[],
            id: "rdma.mtu", verdict: Verdict::Warn, value_has: "1024 (derived from enp1s0f0np0 mtu 1500)",
            fix: "sudo ip link set dev enp1s0f0np0 mtu 9000 (persist: sudo nmcli connection modify <connection> ethernet.mtu 9000)",
        },
        Fault {
            name: "old E810 firmware",
            apply: |o| { o.edit(".halo/ethtool-i-enp1s0f0np0.txt", "4.91 0x800214b5 1.3909.0", "4.40 0x8001c7d4 1.3534.0"); },
            env: None, args: &[],
            id: "nic.firmware", verdict: Verdict::Warn, value_has: "4.40 0x8001c7d4 1.3534.0 (E810 wants NVM 4.91 or newer)",
            fix: "update the NVM with Intel's E810 NVM Update Tool (nvmupdate64e), then power-cycle",
        },
        Fault {
            name: "memlock 8 MiB on the host",
            apply: |o| { o.edit("proc/self/limits", "Max locked memory         unlimited            unlimited", "Max locked memory         8388608              8388608"); },
            env: None, args: &[],
            id: "host.memlock", verdict: Verdict::Fail, value_has: "8 MiB",
            fix: "echo '* - memlock unlimited' | sudo tee /etc/security/limits.d/90-rdma.conf, then log in again",
        },
        Fault {
            name: "memlock 8 MiB in a podman container",
            apply: |o| {
                o.edit("proc/self/limits", "Max locked memory         unlimited            unlimited", "Max locked memory         8388608              8388608");
                o.write("run/.containerenv", "engine=\"podman-5.6.2\"\n");
            },
            env: None, args: &[],
            id: "host.memlock", verdict: Verdict::Fail, value_has: "8 MiB",
            fix: "recreate the container with --ulimit memlock=-1 (halo container create does)",
        },
        Fault {
            name: "container without /dev/infiniband",
            apply: |o| {
                o.remove("dev/infiniband");
                o.write("run/.containerenv", "");
            },
            env: None, args: &[],
            id: "host.dev_infiniband", verdict: Verdict::Fail, value_has: "no uverbs device under /dev/infiniband (inside a podman container",
            fix: "recreate the container with --device /dev/infiniband --ulimit memlock=-1 (halo container create)",
        },
        Fault {
            name: "host without /dev/kfd",
            apply: |o| { o.remove("dev/kfd"); },
            env: None, args: &[],
            id: "host.dev_kfd", verdict: Verdict::Fail, value_has: "/dev/kfd missing (on the host",
            fix: "sudo modprobe amdgpu (and check dmesg for amdgpu errors)",
        },
        Fault {
            name: "interface in zone public",
            apply: |o| {
                o.remove("etc/firewalld/zones/trusted.xml");
                o.write("etc/firewalld/zones/public.xml", "<?xml version=\"1.0\"?>\n<zone>\n  <interface name=\"enp1s0f0np0\"/>\n</zone>\n");
            },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Warn, value_has: "enp1s0f0np0 in zone public",
            fix: "sudo firewall-cmd --permanent --zone=trusted --change-interface=enp1s0f0np0 && sudo firewall-cmd --reload",
        },
        Fault {
            name: "interface in no zone",
            apply: |o| { o.remove("etc/firewalld/zones/trusted.xml"); },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Warn, value_has: "default zone FedoraWorkstation applies",
            fix: "sudo firewall-cmd --permanent --zone=trusted --add-interface=enp1s0f0np0 && sudo firewall-cmd --reload",
        },
        Fault {
            name: "NCCL_IB_DISABLE=1",
            apply: |_| {},
            env: Some("NCCL_IB_DISABLE=1\n"), args: &[],
            id: "env.ib_disable", verdict: Verdict::Warn, value_has: "falls back to TCP sockets", fix: "unset NCCL_IB_DISABLE",
        },
        Fault {
            name: "NCCL_NET_PLUGIN names another library",
            apply: |_| {},
            env: Some("NCCL_NET_PLUGIN=/usr/lib64/librccl-net-ib.so\n"), args: &[],
            id: "env.net_plugin", verdict: Verdict::Warn, value_has: "/usr/lib64/librccl-net-ib.so: not the halo plugin",
            fix: PLUGIN_FIX,
        },
        Fault {
            name: "NCCL_NET_PLUGIN path, RCCL of ROCm 6.2",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.2.0")).unwrap();
                o.write("opt/rocm-6.2.0/.info/version", "6.2.0-66\n");
            },
            env: None, args: &[],
            id: "env.net_plugin", verdict: Verdict::Fail,
            value_has: "RCCL of ROCm 6.2 only loads librccl-net-<NCCL_NET_PLUGIN>.so by name, so a path is ignored",
            fix: PLUGIN_FIX,
        },
        Fault {
            name: "NCCL_NET_PLUGIN=halo, RCCL of ROCm 6.2",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.2.0")).unwrap();
                o.write("opt/rocm-6.2.0/.info/version", "6.2.0-66\n");
            },
            env: Some("NCCL_NET_PLUGIN=halo\n"), args: &[],
            id: "env.net_plugin", verdict: Verdict::Pass, value_has: "halo", fix: "",
        },
        Fault {
            name: "NCCL_NET_PLUGIN path, RCCL version unknown",
            apply: |o| {
                o.remove("opt/rocm-7.12.0/.info/version");
                o.remove("opt/rocm-7.12.0/lib/librccl.so.1.0.71200");
                o.remove("opt/rocm-7.12.0/lib/librccl.so.1");
            },
            env: None, args: &[],
            id: "env.net_plugin", verdict: Verdict::Warn,
            value_has: "a path is only loaded by RCCL of ROCm 6.3 and later",
            fix: PLUGIN_FIX,
        },
        Fault {
            name: "NCCL_NET_GDR_LEVEL=0",
            apply: |_| {},
            env: Some("NCCL_NET_GDR_LEVEL=0\n"), args: &[],
            id: "env.gdr_level", verdict: Verdict::Warn, value_has: "GPU-direct disabled", fix: "export NCCL_NET_GDR_LEVEL=SYS",
        },
        Fault {
            name: "NCCL_IB_GID_INDEX points at the wrong GID",
            apply: |_| {},
            env: Some("NCCL_IB_GID_INDEX=3\n"), args: &[],
            id: "env.gid_index", verdict: Verdict::Fail, value_has: "3, but the RoCE v2 GID of 192.168.100.1 is index 1",
            fix: "export NCCL_IB_GID_INDEX=1",
        },
        Fault {
            name: "NCCL_SOCKET_IFNAME on the LAN",
            apply: |_| {},
            env: Some("NCCL_SOCKET_IFNAME=eth0\n"), args: &[],
            id: "env.socket_ifname", verdict: Verdict::Warn, value_has: "eth0 does not select enp1s0f0np0",
            fix: "export NCCL_SOCKET_IFNAME=enp1s0f0np0 GLOO_SOCKET_IFNAME=enp1s0f0np0",
        },
        Fault {
            name: "ROCm 6.4 RCCL without gfx1151",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.4.3")).unwrap();
                o.write("opt/rocm-6.4.3/.info/version", "6.4.3-127\n");
            },
            env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Warn, value_has: "stock RCCL before ROCm 7.12 has no gfx1151 code objects",
            fix: "use ROCm 7.12 or newer, or an RCCL built for gfx1151 (the kyuz0/vllm-therock-gfx1151 image has one)",
        },
        Fault {
            name: "no RCCL",
            apply: |o| { o.remove("opt/rocm-7.12.0"); },
            env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Fail, value_has: "librccl.so not found",
            fix: "install ROCm's rccl package, or run inside the vLLM container (halo container create)",
        },
        Fault {
            name: "plugin library absent",
            apply: |o| { o.remove("opt/halo"); },
            env: None, args: &[],
            id: "plugin.library", verdict: Verdict::Fail,
            value_has: "plugin library not found at /opt/halo/lib/librccl-net-halo.so, /usr/local/lib/librccl-net-halo.so,",
            fix: "cargo build --release -p rccl-net-plugin && sudo install -D target/release/librccl_net_plugin.so /opt/halo/lib/librccl-net-halo.so",
        },
        Fault {
            name: "plugin file is not a shared object",
            apply: |o| { o.write("opt/halo/lib/librccl-net-halo.so", "not an ELF file at all\n"); },
            env: None, args: &[],
            id: "plugin.library", verdict: Verdict::Fail, value_has: "/opt/halo/lib/librccl-net-halo.so: not an ELF shared object",
            fix: "cargo build --release -p rccl-net-plugin && sudo install -D target/release/librccl_net_plugin.so /opt/halo/lib/librccl-net-halo.so",
        },
    ]
}

#[test]
fn each_fault_gets_its_verdict_and_fix() {
    let mut lines = Vec::new();
    for f in faults() {
        let overlay = Overlay::of_good();
        (f.apply)(&overlay);
        // The fault's variables replace the good ones they name; the rest stay good.
        let mut env = GOOD_ENV.to_string();
        if let Some(extra) = f.env {
            for line in extra.lines() {
                let key = line.split('=').next().unwrap();
                env = env
                    .lines()
                    .filter(|l| !l.starts_with(&format!("{key}=")))
                    .map(|l| format!("{l}\n"))
                    .collect();
                env.push_str(line);
                env.push('\n');
            }
        }
        let env_file = overlay.path("test.env");
        fs::write(&env_file, env).unwrap();
        let (code, report) = doctor_json(overlay.root(), &env_file, f.args);
        let c = report
            .check(f.id)
            .unwrap_or_else(|| panic!("{}: no check {}", f.name, f.id));
        assert_eq!(c.verdict, f.verdict, "{}: {c:?}", f.name);
        assert!(
            c.value.contains(f.value_has),
            "{}: value {:?} lacks {:?}",
            f.name,
            c.value,
            f.value_has
        );
        assert_eq!(c.fix, f.fix, "{}", f.name);
        let fails = report.checks.iter().any(|c| c.verdict == Verdict::Fail);
        assert_eq!(code, i32::from(fails), "{}: exit status", f.name);
        lines.push(format!("{:<46} {:<20} {:?}", f.name, f.id, c.verdict));
    }
    println!("fault                                          check                verdict");
    println!("{}", lines.join("\n"));
}

#[test]
fn interface_can_be_named_explicitly() {
    let (_, report) = doctor_json(
        &good_tree(),
        &good_env(),
        &["--iface", "enp1s0f0np0", "--cluster-ip", "192.168.100.1"],
    );
    assert_eq!(report.check("rdma.gid").unwrap().verdict, Verdict::Pass);
    let (code, report) = doctor_json(&good_tree(), &good_env(), &["--iface", "eth9"]);
    assert_eq!(code, 1);
    let port = report.check("rdma.port").unwrap();
    assert_eq!(port.value, "no RoCE v2 GID with an IPv4 address on eth9");
    assert_eq!(
        port.fix,
        "sudo ip addr add <cluster-ip>/30 dev eth9 (RoCE v2 GIDs follow the interface's addresses)"
    );
    assert_eq!(report.check("net.mtu").unwrap().verdict, Verdict::Skip);
}

#[test]
fn usage_errors_exit_2() {
    let out = halo()
        .args(["doctor", "--cluster-ip", "not-an-ip"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'not-an-ip'"),
        "{}",
        stderr(&out)
    );
    let out = halo().args(["doctor", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A stand-in `ssh` first on PATH: `true` succeeds for reachable hosts, and `halo doctor --json`
/// runs the real binary against a fixture tree, as the peer would.
fn fake_ssh(dir: &Path, peer_root: &Path, peer_env: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         while [ \"${{1#-}}\" != \"$1\" ]; do shift 2; done\n\
         host=$1; shift\n\
         case $host in down*) echo 'ssh: connect to host '$host' port 22: Connection refused' >&2; exit 255;; esac\n\
         case $host in nokey*) echo $host': Permission denied (publickey).' >&2; exit 255;; esac\n\
         if [ \"$1\" = true ]; then exit 0; fi\n\
         if [ \"$1 $2 $3\" = 'halo doctor --json' ]; then exec '{}' doctor --json --root '{}' --env-file '{}'; fi\n\
         echo \"fake ssh: unexpected command $*\" >&2; exit 127\n",
        env!("CARGO_BIN_EXE_halo"),
        peer_root.display(),
        peer_env.display()
    );
    let path = dir.join("ssh");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn peers_are_checked_over_ssh_and_merged() {
    let bin = tempfile::tempdir().unwrap();
    // The peer is strix2 with its MTU left at 1500.
    let peer = Overlay::of_good();
    peer.write("proc/sys/kernel/hostname", "strix2\n");
    peer.write("sys/class/net/enp1s0f0np0/mtu", "1500\n");
    fake_ssh(bin.path(), peer.root(), &good_env());
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );

    let out = halo()
        .env("PATH", &path)
        .args([
            "doctor",
            "--json",
            "--peer",
            "strix2",
            "--peer",
            "nokey-host",
            "--root",
        ])
        .arg(good_tree())
        .arg("--env-file")
        .arg(good_env())
        .output()
        .unwrap();
    let report: NodeReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "the unreachable peer fails");
    let ok = report.check("peer.ssh.strix2").unwrap();
    assert_eq!(ok.verdict, Verdict::Pass);
    let bad = report.check("peer.ssh.nokey-host").unwrap();
    assert_eq!(bad.verdict, Verdict::Fail);
    assert_eq!(
        bad.value,
        "ssh nokey-host failed: nokey-host: Permission denied (publickey)."
    );
    assert_eq!(
        bad.fix,
        "ssh-copy-id nokey-host (then accept the host key once: ssh nokey-host true)"
    );
    assert_eq!(report.peers.len(), 2);
    assert_eq!(report.peers[0].node, "strix2");
    assert_eq!(
        report.peers[0].check("net.mtu").unwrap().verdict,
        Verdict::Warn
    );
    assert_eq!(report.peers[1].node, "nokey-host");
    assert_eq!(report.peers[1].checks[0].verdict, Verdict::Skip);

    let table = halo()
        .env("PATH", &path)
        .args(["doctor", "--peer", "strix2", "--root"])
        .arg(good_tree())
        .arg("--env-file")
        .arg(good_env())
        .output()
        .unwrap();
    assert_eq!(table.status.code(), Some(0));
    let text = stdout(&table);
    assert!(text.contains("halo doctor: node strix1"), "{text}");
    assert!(text.contains("halo doctor: node strix2"), "{text}");
    assert!(text.contains("! warn  Interface MTU"), "{text}");
}
