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
        .env("COLUMNS", "100")
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
    assert_eq!(report.checks.len(), 32);
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
    assert_eq!(keys, ["checks", "link", "node", "peers"]);
    assert_eq!(
        v["link"],
        serde_json::json!({
            "netdev": "enp1s0f0np0", "device": "rocep1s0f0", "port": 1, "mtu": 9000,
            "rdma_mtu": 4096, "ip": "192.168.100.1", "prefix": 30, "gid_index": 1,
            "roce": "RoCE v2", "gid_type": "IPv4"
        })
    );
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
    /// The captured tree the fault is applied to (a directory under tests/fixtures/doctor).
    base: &'static str,
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
const GOOD: &str = "good";
const NM_PROFILE: &str = "etc/NetworkManager/system-connections/cluster.nmconnection";
const PORT: &str = "sys/class/infiniband/rocep1s0f0/ports/1";

const UBUNTU: &str = "ubuntu2404-cx4lx";
const DEBIAN: &str = "debian12-e810";
const CX3: &str = "ubuntu2404-cx3";

/// The environment `halo cluster up` gives each captured node.
fn base_env(base: &str) -> &'static str {
    match base {
        UBUNTU => "NCCL_NET_PLUGIN=/opt/halo/lib/librccl-net-halo.so\nNCCL_SOCKET_IFNAME=enp194s0f0np0\nNCCL_IB_HCA=mlx5_0\nNCCL_IB_GID_INDEX=3\nNCCL_NET_GDR_LEVEL=SYS\n",
        CX3 => "NCCL_NET_PLUGIN=/opt/halo/lib/librccl-net-halo.so\nNCCL_SOCKET_IFNAME=enp1s0\nNCCL_IB_HCA=mlx4_0\nNCCL_NET_GDR_LEVEL=SYS\n",
        _ => GOOD_ENV,
    }
}

fn faults() -> Vec<Fault> {
    let mut all = node_faults();
    all.extend(base_faults());
    all
}

/// The misleading cases of real distributions and NICs, one per captured node or fault.
fn node_faults() -> Vec<Fault> {
    vec![
        Fault {
            base: CX3,
            name: "ConnectX-3 offers only RoCE v1 GIDs",
            apply: |_| {}, env: None, args: &[],
            id: "rdma.gid", verdict: Verdict::Fail,
            value_has: "mlx4_0 port 1 offers only RoCE v1 GIDs (::ffff:192.168.100.2 is index 1 as IB/RoCE v1): RCCL needs RoCE v2",
            fix: "the NIC has no RoCE v2 (mlx4_core: ConnectX-3 speaks RoCE v1 only): use a RoCE v2 NIC such as a ConnectX-4 Lx or newer or an Intel E810; the address is already on the interface",
        },
        Fault {
            base: CX3,
            name: "RoCE v1 node: the interface is still checked",
            apply: |o| { o.write("sys/class/net/enp1s0/mtu", "1500\n"); }, env: None, args: &[],
            id: "net.mtu", verdict: Verdict::Warn, value_has: "enp1s0 mtu 1500",
            fix: "add 'mtu: 9000' under network: ethernets: enp1s0: in /etc/netplan/60-halo.yaml, then sudo netplan apply",
        },
        Fault {
            base: GOOD,
            name: "no GID carries the address: interface still known",
            apply: |o| { o.write(&format!("{PORT}/gids/1"), "0000:0000:0000:0000:0000:0000:0000:0000\n"); },
            env: None, args: &[],
            id: "nic.driver", verdict: Verdict::Pass, value_has: "ice (Intel E810)", fix: "",
        },
        Fault {
            base: GOOD,
            name: "no GID carries the address: firewall still judged",
            apply: |o| { o.write(&format!("{PORT}/gids/1"), "0000:0000:0000:0000:0000:0000:0000:0000\n"); },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Pass, value_has: "enp1s0f0np0 in firewalld zone trusted", fix: "",
        },
        Fault {
            base: GOOD,
            name: "Fedora Server default zone blocks the cluster",
            apply: |o| {
                o.edit(NM_PROFILE, "zone=trusted\n", "");
                o.edit("etc/firewalld/firewalld.conf", "DefaultZone=FedoraWorkstation", "DefaultZone=FedoraServer");
            },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Fail,
            value_has: "enp1s0f0np0 in firewalld zone FedoraServer (default zone): opens only ssh, dhcpv6-client, cockpit; Ray's 6379 and RCCL's bootstrap ports are closed to the peer",
            fix: "sudo firewall-cmd --permanent --zone=trusted --add-interface=enp1s0f0np0 && sudo firewall-cmd --reload",
        },
        Fault {
            base: GOOD,
            name: "guide's zone=trusted in the NetworkManager profile",
            apply: |_| {}, env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Pass,
            value_has: "enp1s0f0np0 in firewalld zone trusted (NetworkManager connection 'cluster'): accepts everything", fix: "",
        },
        Fault {
            base: GOOD,
            name: "NetworkManager profile in zone public",
            apply: |o| { o.edit(NM_PROFILE, "zone=trusted", "zone=public"); }, env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Fail,
            value_has: "enp1s0f0np0 in firewalld zone public (NetworkManager connection 'cluster'): opens only ssh, mdns, dhcpv6-client",
            fix: "sudo nmcli connection modify 'cluster' connection.zone trusted && sudo nmcli connection up 'cluster'",
        },
        Fault {
            base: UBUNTU,
            name: "ufw active without a rule for the interface",
            apply: |o| { o.edit("etc/ufw/user.rules", "-A ufw-user-input -i enp194s0f0np0 -j ACCEPT\n", ""); },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Fail,
            value_has: "ufw active, incoming policy DROP, no rule allows enp194s0f0np0",
            fix: "sudo ufw allow in on enp194s0f0np0",
        },
        Fault {
            base: UBUNTU,
            name: "ufw rule for the cluster subnet",
            apply: |o| { o.edit("etc/ufw/user.rules", "-A ufw-user-input -i enp194s0f0np0 -j ACCEPT", "-A ufw-user-input -s 192.168.100.0/30 -j ACCEPT"); },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Pass, value_has: "rule '-A ufw-user-input -s 192.168.100.0/30 -j ACCEPT'", fix: "",
        },
        Fault {
            base: GOOD,
            name: "leftover ROCm 7.2.0 next to /opt/rocm -> 7.12.1",
            apply: leftover_rocm, env: None, args: &[],
            id: "rocm.installs", verdict: Verdict::Warn,
            value_has: "/opt/rocm -> /opt/rocm-7.12.1 (ROCm 7.12.1-48); leftover /opt/rocm-7.2.0 (ROCm 7.2.0-22)",
            fix: "sudo dnf remove $(rpm -qf /opt/rocm-7.2.0/.info/version)",
        },
        Fault {
            base: GOOD,
            name: "leftover ROCm: RCCL of the /opt/rocm link",
            apply: leftover_rocm, env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Pass,
            value_has: "/opt/rocm-7.12.1/lib/librccl.so.1.0.71201, ROCm 7.12.1-48", fix: "",
        },
        Fault {
            base: GOOD,
            name: "LD_LIBRARY_PATH names the leftover ROCm",
            apply: leftover_rocm, env: Some("LD_LIBRARY_PATH=/opt/rocm-7.2.0/lib\n"), args: &[],
            id: "rccl.library", verdict: Verdict::Fail,
            value_has: "/opt/rocm-7.2.0/lib/librccl.so.1.0.70200 (via LD_LIBRARY_PATH), ROCm 7.2.0-22: stock RCCL before ROCm 7.12",
            fix: "remove /opt/rocm-7.2.0/lib from LD_LIBRARY_PATH: /opt/rocm-7.12.1 (ROCm 7.12.1-48) has an RCCL with gfx1151",
        },
        Fault {
            base: UBUNTU,
            name: "ROCm behind /etc/alternatives",
            apply: |_| {}, env: None, args: &[],
            id: "rocm.installs", verdict: Verdict::Pass, value_has: "/opt/rocm -> /opt/rocm-7.12.0 (ROCm 7.12.0-73)", fix: "",
        },
        Fault {
            base: DEBIAN,
            name: "ROCm 6.4 only (Debian, alternatives)",
            apply: |_| {}, env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Fail,
            value_has: "/opt/rocm-6.4.3/lib/librccl.so.1.0.60403, ROCm 6.4.3-127: stock RCCL before ROCm 7.12",
            fix: "install ROCm 7.12 or newer: its stock RCCL has gfx1151 code objects",
        },
        Fault {
            base: GOOD,
            name: "Fedora's own ROCm packages in /usr/lib64",
            apply: |o| {
                o.remove("opt/rocm-7.12.0");
                o.remove("opt/rocm");
                o.write("usr/lib64/librccl.so.1.0", "");
                o.link("usr/lib64/librccl.so.1", "librccl.so.1.0");
            },
            env: None, args: &[],
            id: "rocm.installs", verdict: Verdict::Skip, value_has: "no ROCm under /opt", fix: "",
        },
        Fault {
            base: GOOD,
            name: "NCCL_IB_HCA copied from a ConnectX node",
            apply: |_| {}, env: Some("NCCL_IB_HCA=mlx5_0\n"), args: &[],
            id: "env.ib_hca", verdict: Verdict::Fail,
            value_has: "mlx5_0 selects none of this node's RDMA ports (rocep1s0f0:1)",
            fix: "export NCCL_IB_HCA=rocep1s0f0 (or unset it)",
        },
        Fault {
            base: UBUNTU,
            name: "NCCL_IB_HCA excludes the cluster port",
            apply: |o| {
                o.write("sys/class/infiniband/mlx5_1/ports/1/state", "4: ACTIVE\n");
                o.write("sys/class/infiniband/mlx5_1/ports/1/phys_state", "5: LinkUp\n");
            },
            env: Some("NCCL_IB_HCA=^mlx5_0\n"), args: &[],
            id: "env.ib_hca", verdict: Verdict::Fail,
            value_has: "^mlx5_0 selects mlx5_1:1 but not the cluster port mlx5_0:1",
            fix: "export NCCL_IB_HCA=mlx5_0 (or unset it)",
        },
        Fault {
            base: GOOD,
            name: "HSA_OVERRIDE_GFX_VERSION=11.0.0 left over",
            apply: |_| {}, env: Some("HSA_OVERRIDE_GFX_VERSION=11.0.0\n"), args: &[],
            id: "env.hsa_override", verdict: Verdict::Fail,
            value_has: "11.0.0: the gfx1151 poses as gfx1100, HIP loads gfx1100 code objects and gfx1151 kernels fail",
            fix: "unset HSA_OVERRIDE_GFX_VERSION (and remove it from ~/.bashrc, the container's environment and job scripts)",
        },
        Fault {
            base: UBUNTU,
            name: "Ubuntu: iommu=pt missing",
            apply: |o| { o.edit(CMDLINE, "iommu=pt ", ""); o.remove("sys/kernel/iommu_groups"); },
            env: None, args: &[],
            id: "kernel.iommu", verdict: Verdict::Warn, value_has: "iommu=pt missing",
            fix: "sudo sed -i -E '/^GRUB_CMDLINE_LINUX/ s/ ?\\<iommu=[^ \"]*//g; s/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&iommu=pt /' /etc/default/grub && sudo update-grub && sudo reboot",
        },
        Fault {
            base: UBUNTU,
            name: "Ubuntu 6.14: gttsize alone is deprecated",
            apply: |o| { o.edit(CMDLINE, "ttm.pages_limit=31457280", "amdgpu.gttsize=122880"); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "deprecated since 6.14",
            fix: "sudo sed -i -E '/^GRUB_CMDLINE_LINUX/ s/ ?\\<amdgpu\\.gttsize=[^ \"]*//g; /^GRUB_CMDLINE_LINUX/ s/ ?\\<ttm\\.pages_limit=[^ \"]*//g; s/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&ttm.pages_limit=31457280 /' /etc/default/grub && sudo update-grub && sudo reboot",
        },
        Fault {
            base: UBUNTU,
            name: "Ubuntu: no RDMA devices",
            apply: |o| { o.remove("sys/class/infiniband"); }, env: None, args: &[],
            id: "rdma.devices", verdict: Verdict::Fail, value_has: "none under /sys/class/infiniband",
            fix: "sudo apt install rdma-core ibverbs-utils && sudo modprobe irdma (E810) or mlx5_ib (ConnectX), then check `rdma link`",
        },
        Fault {
            base: UBUNTU,
            name: "Ubuntu: MTU 1500 (netplan-made NM profile)",
            apply: |o| { o.write("sys/class/net/enp194s0f0np0/mtu", "1500\n"); }, env: None, args: &[],
            id: "net.mtu", verdict: Verdict::Warn, value_has: "enp194s0f0np0 mtu 1500",
            fix: "sudo nmcli connection modify cluster 802-3-ethernet.mtu 9000 && sudo nmcli connection up cluster",
        },
        Fault {
            base: DEBIAN,
            name: "Debian: address missing (ifupdown)",
            apply: |o| { o.write("sys/class/infiniband/rocep1s0f0/ports/1/gids/1", "0000:0000:0000:0000:0000:0000:0000:0000\n"); },
            env: None, args: &["--cluster-ip", "192.168.100.1"],
            id: "rdma.gid", verdict: Verdict::Fail, value_has: "no RoCE v2 GID with an IPv4 address for 192.168.100.1 on enp1s0f0np0",
            fix: "add 'auto enp1s0f0np0' and 'iface enp1s0f0np0 inet static' with 'address 192.168.100.1/30' to /etc/network/interfaces, then sudo ifup enp1s0f0np0 (RoCE v2 GIDs follow the interface's addresses)",
        },
        Fault {
            base: DEBIAN,
            name: "Debian: no GTT parameter on a 64 GB board",
            apply: |_| {}, env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "neither ttm.pages_limit nor amdgpu.gttsize set",
            fix: "sudo sed -i -E '/^GRUB_CMDLINE_LINUX/ s/ ?\\<ttm\\.pages_limit=[^ \"]*//g; s/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&ttm.pages_limit=15204352 /' /etc/default/grub && sudo update-grub && sudo reboot",
        },
        Fault {
            base: DEBIAN,
            name: "Debian: no flow control on the E810",
            apply: |_| {}, env: None, args: &[],
            id: "nic.flow_control", verdict: Verdict::Warn, value_has: "enp1s0f0np0: pause frames rx off, tx off, no PFC",
            fix: "sudo ethtool -A enp1s0f0np0 rx on tx on; at boot: add 'post-up /usr/sbin/ethtool -A enp1s0f0np0 rx on tx on' to the 'iface enp1s0f0np0' stanza of /etc/network/interfaces",
        },
        Fault {
            base: GOOD,
            name: "Fedora: flow control off (NetworkManager)",
            apply: |o| { o.write(".halo/ethtool-a-enp1s0f0np0.txt", "Pause parameters for enp1s0f0np0:\nAutonegotiate:\ton\nRX:\t\toff\nTX:\t\toff\n"); },
            env: None, args: &[],
            id: "nic.flow_control", verdict: Verdict::Warn, value_has: "pause frames rx off, tx off",
            fix: "sudo nmcli connection modify cluster ethtool.pause-rx on ethtool.pause-tx on && sudo nmcli connection up cluster",
        },
        Fault {
            base: DEBIAN,
            name: "PFC on priority 3 counts as flow control",
            apply: |o| { o.edit(".halo/dcb-pfc-enp1s0f0np0.txt", "3:off", "3:on"); }, env: None, args: &[],
            id: "nic.flow_control", verdict: Verdict::Pass, value_has: "PFC on priority 3", fix: "",
        },
        Fault {
            base: DEBIAN,
            name: "Debian: user not in group render",
            apply: |_| {}, env: None, args: &[],
            id: "host.groups", verdict: Verdict::Fail,
            value_has: "deb (groups deb,cdrom,floppy,sudo,audio,dip,video,plugdev,users) cannot open /dev/kfd (660 render), /dev/dri/renderD128 (660 render)",
            fix: "sudo usermod -aG render deb, then log in again",
        },
        Fault {
            base: CX3,
            name: "groups without device modes captured",
            apply: |o| { o.write(".halo/id.txt", "uid=1000(admin) gid=1000(admin) groups=1000(admin),27(sudo)\n"); },
            env: None, args: &[],
            id: "host.groups", verdict: Verdict::Warn, value_has: "admin (groups admin,sudo) is not in render, video",
            fix: "sudo usermod -aG render,video admin, then log in again",
        },
        Fault {
            base: GOOD,
            name: "memlock 64 KiB",
            apply: |o| { o.edit("proc/self/limits", "Max locked memory         unlimited            unlimited", "Max locked memory         65536                65536"); },
            env: None, args: &[],
            id: "host.memlock", verdict: Verdict::Fail, value_has: "64 KiB (memory registration of large buffers will fail)",
            fix: "echo '* - memlock unlimited' | sudo tee /etc/security/limits.d/90-rdma.conf, then log in again",
        },
        Fault {
            base: GOOD,
            name: "4 GiB machine without GTT parameter",
            apply: |o| {
                o.edit("proc/meminfo", "MemTotal:       131281004 kB", "MemTotal:       3991388 kB");
                o.edit(CMDLINE, " amdgpu.gttsize=122880 ttm.pages_limit=31457280", "");
            },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Pass,
            value_has: "neither set: with 3.8 GiB of RAM the driver's default (half of RAM) is all the OS can spare", fix: "",
        },
        Fault {
            base: GOOD,
            name: "4 GiB machine with the guide's GTT parameters",
            apply: |o| { o.edit("proc/meminfo", "MemTotal:       131281004 kB", "MemTotal:       3991388 kB"); },
            env: None, args: &[],
            id: "kernel.gtt_ram", verdict: Verdict::Fail, value_has: "GTT ceiling 120.0 GiB of MemTotal 3.8 GiB: larger than RAM",
            fix: "sudo grubby --update-kernel=ALL --remove-args='amdgpu.gttsize ttm.pages_limit' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "IOMMU translating despite iommu=pt",
            apply: |o| { for g in 0..4 { o.write(&format!("sys/kernel/iommu_groups/{g}/type"), "DMA-FQ\n"); } },
            env: None, args: &[],
            id: "kernel.iommu", verdict: Verdict::Warn, value_has: "DMA-FQ in effect although the command line has iommu=pt",
            fix: "reboot so iommu=pt takes effect; if it still translates, check for amd_iommu=force_isolation or iommu.passthrough=0 in `cat /proc/cmdline`",
        },
        Fault {
            base: UBUNTU,
            name: "E810 (irdma) with Ubuntu's rdma-core 50",
            apply: |o| { o.link("sys/class/net/enp194s0f0np0/device/driver", "../../../../bus/pci/drivers/ice"); },
            env: None, args: &[],
            id: "rdma.core", verdict: Verdict::Fail,
            value_has: "rdma-core 50.0 (/usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.50.0): irdma reports 'Unknown completion' errors",
            fix: "install rdma-core 51 or newer (e.g. build a current release from github.com/linux-rdma/rdma-core into /usr/local and run sudo ldconfig)",
        },
        Fault {
            base: UBUNTU,
            name: "rdma-core 62 built into /usr/local",
            apply: |o| {
                o.link("sys/class/net/enp194s0f0np0/device/driver", "../../../../bus/pci/drivers/ice");
                o.write("usr/local/lib/libibverbs.so.1.14.62.0", "");
            },
            env: None, args: &[],
            id: "rdma.core", verdict: Verdict::Pass, value_has: "rdma-core 62.0 (/usr/local/lib/libibverbs.so.1.14.62.0)", fix: "",
        },
    ]
}

/// /opt/rocm -> rocm-7.12.1, and an older /opt/rocm-7.2.0 still installed.
fn leftover_rocm(o: &Overlay) {
    fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-7.12.1")).unwrap();
    o.write("opt/rocm-7.12.1/.info/version", "7.12.1-48\n");
    o.remove("opt/rocm-7.12.1/lib/librccl.so.1.0.71200");
    o.write("opt/rocm-7.12.1/lib/librccl.so.1.0.71201", "");
    o.link("opt/rocm-7.12.1/lib/librccl.so.1", "librccl.so.1.0.71201");
    o.link("opt/rocm", "rocm-7.12.1");
    o.write("opt/rocm-7.2.0/.info/version", "7.2.0-22\n");
    o.write("opt/rocm-7.2.0/lib/librccl.so.1.0.70200", "");
    o.link("opt/rocm-7.2.0/lib/librccl.so.1", "librccl.so.1.0.70200");
}

/// The checks of the good node, one fault at a time.
fn base_faults() -> Vec<Fault> {
    vec![
        Fault {
            base: GOOD,
            name: "iommu=pt missing",
            apply: |o| {
                o.edit(CMDLINE, "iommu=pt ", "");
                for g in 0..4 { o.write(&format!("sys/kernel/iommu_groups/{g}/type"), "DMA-FQ\n"); }
            },
            env: None, args: &[],
            id: "kernel.iommu", verdict: Verdict::Warn, value_has: "DMA-FQ in effect, iommu=pt missing",
            fix: "sudo grubby --update-kernel=ALL --args='iommu=pt' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "pci=realloc missing",
            apply: |o| { o.edit(CMDLINE, "pci=realloc ", ""); },
            env: None, args: &[],
            id: "kernel.pci_realloc", verdict: Verdict::Warn, value_has: "pci=realloc missing",
            fix: "sudo grubby --update-kernel=ALL --args='pci=realloc' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "pcie_aspm=off missing",
            apply: |o| { o.edit(CMDLINE, "pcie_aspm=off ", ""); },
            env: None, args: &[],
            id: "kernel.pcie_aspm", verdict: Verdict::Warn, value_has: "pcie_aspm=off missing",
            fix: "sudo grubby --update-kernel=ALL --args='pcie_aspm=off' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "gttsize alone on kernel 6.18 (deprecated)",
            apply: |o| { o.edit(CMDLINE, " ttm.pages_limit=31457280", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "deprecated since 6.14",
            fix: "sudo grubby --update-kernel=ALL --remove-args='amdgpu.gttsize' --args='ttm.pages_limit=31457280' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "gttsize alone on kernel 6.8 (still the way)",
            apply: |o| {
                o.edit(CMDLINE, " ttm.pages_limit=31457280", "");
                o.write("proc/sys/kernel/osrelease", "6.8.9-300.fc40.x86_64\n");
            },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Pass, value_has: "amdgpu.gttsize=122880 (120.0 GiB) only, kernel 6.8", fix: "",
        },
        Fault {
            base: GOOD,
            name: "pages_limit alone",
            apply: |o| { o.edit(CMDLINE, " amdgpu.gttsize=122880", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Pass, value_has: "ttm.pages_limit=31457280 (120.0 GiB)", fix: "",
        },
        Fault {
            base: GOOD,
            name: "gttsize and pages_limit disagree",
            apply: |o| { o.edit(CMDLINE, "ttm.pages_limit=31457280", "ttm.pages_limit=25165824"); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Fail, value_has: "the two disagree",
            fix: "sudo grubby --update-kernel=ALL --args='amdgpu.gttsize=122880 ttm.pages_limit=31457280' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "no GTT parameter",
            apply: |o| { o.edit(CMDLINE, " amdgpu.gttsize=122880 ttm.pages_limit=31457280", ""); },
            env: None, args: &[],
            id: "kernel.gtt_param", verdict: Verdict::Warn, value_has: "neither ttm.pages_limit nor amdgpu.gttsize",
            fix: "sudo grubby --update-kernel=ALL --args='ttm.pages_limit=31719424' && sudo reboot",
        },
        Fault {
            base: GOOD,
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
            base: GOOD,
            name: "GTT ceiling larger than RAM (64 GB board)",
            apply: |o| { o.edit("proc/meminfo", "MemTotal:       131281004 kB", "MemTotal:       65011712 kB"); },
            env: None, args: &[],
            id: "kernel.gtt_ram", verdict: Verdict::Fail, value_has: "larger than RAM",
            fix: "sudo grubby --update-kernel=ALL --args='amdgpu.gttsize=59392 ttm.pages_limit=15204352' && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "Debian 12: rdma-core 44, kernel 6.1 (no dma-buf)",
            apply: |o| {
                o.remove("usr/lib64/libibverbs.so.1.14.58.0");
                o.write("usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.44.0", "");
                o.write("proc/sys/kernel/osrelease", "6.1.0-56-amd64\n");
                o.write("etc/os-release", "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n");
            },
            env: None, args: &[],
            id: "gpu.dmabuf", verdict: Verdict::Warn,
            value_has: "rdma-core 44 (/usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.44.0), kernel 6.1: GPU-direct via dma-buf unavailable (rdma-core < 45 has no ibv_reg_dmabuf_mr for irdma; kernel < 6.3 has no dma-buf memory regions in irdma)",
            fix: "upgrade to Debian 13 (trixie: rdma-core 56, kernel 6.12); Debian 12 has no rdma-core >= 45, not even in bookworm-backports",
        },
        Fault {
            base: GOOD,
            name: "Debian: new rdma-core, kernel 6.1",
            apply: |o| {
                o.write("proc/sys/kernel/osrelease", "6.1.0-56-amd64\n");
                o.write("etc/os-release", "ID=debian\nVERSION_CODENAME=bookworm\n");
            },
            env: None, args: &[],
            id: "gpu.dmabuf", verdict: Verdict::Warn, value_has: "kernel < 6.3 has no dma-buf memory regions in irdma",
            fix: "sudo apt install -t bookworm-backports linux-image-amd64 && sudo reboot (Debian 12: add bookworm-backports to the apt sources first)",
        },
        Fault {
            base: GOOD,
            name: "Fedora: rdma-core 44",
            apply: |o| {
                o.remove("usr/lib64/libibverbs.so.1.14.58.0");
                o.write("usr/lib64/libibverbs.so.1.14.44.0", "");
            },
            env: None, args: &[],
            id: "gpu.dmabuf", verdict: Verdict::Warn, value_has: "rdma-core < 45 has no ibv_reg_dmabuf_mr for irdma)",
            fix: "sudo dnf upgrade --refresh rdma-core libibverbs && sudo reboot",
        },
        Fault {
            base: GOOD,
            name: "Ubuntu 22.04: rdma-core 39, kernel 5.15",
            apply: |o| {
                o.remove("usr/lib64/libibverbs.so.1.14.58.0");
                o.write("usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.39.0", "");
                o.write("proc/sys/kernel/osrelease", "5.15.0-91-generic\n");
                o.write("etc/os-release", "ID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"22.04\"\n");
            },
            env: None, args: &[],
            id: "gpu.dmabuf", verdict: Verdict::Warn, value_has: "rdma-core 39",
            fix: "upgrade to Ubuntu 24.04 or later (sudo do-release-upgrade), whose rdma-core and kernel register dma-bufs with irdma",
        },
        Fault {
            base: GOOD,
            name: "no libibverbs",
            apply: |o| { o.remove("usr/lib64/libibverbs.so.1.14.58.0"); },
            env: None, args: &[],
            id: "gpu.dmabuf", verdict: Verdict::Skip, value_has: "rdma-core's version is unknown", fix: "",
        },
        Fault {
            base: GOOD,
            name: "not gfx1151",
            apply: |o| { o.edit("sys/class/kfd/kfd/topology/nodes/1/properties", "110501", "110000"); },
            env: None, args: &[],
            id: "gpu.arch", verdict: Verdict::Warn, value_has: "gfx1100 (gfx_target_version 110000), not Strix Halo's gfx1151",
            fix: "check that RCCL, PyTorch and vLLM ship code objects for this GPU (HSA_OVERRIDE_GFX_VERSION is a last resort)",
        },
        Fault {
            base: GOOD,
            name: "no KFD GPU node",
            apply: |o| { o.remove("sys/class/kfd/kfd/topology/nodes/1"); },
            env: None, args: &[],
            id: "gpu.arch", verdict: Verdict::Fail, value_has: "no GPU node in the KFD topology",
            fix: "sudo modprobe amdgpu; check `dmesg | grep -i kfd`",
        },
        Fault {
            base: GOOD,
            name: "16 GiB BIOS carve-out",
            apply: |o| { o.write("sys/class/drm/card1/device/mem_info_vram_total", "17179869184\n"); },
            env: None, args: &[],
            id: "gpu.memory", verdict: Verdict::Warn, value_has: "VRAM carve-out 16.0 GiB",
            fix: "set the BIOS iGPU memory allocation to its minimum (512 MB)",
        },
        Fault {
            base: GOOD,
            name: "GTT size not applied (no reboot)",
            apply: |o| { o.write("sys/class/drm/card1/device/mem_info_gtt_total", "67108864000\n"); },
            env: None, args: &[],
            id: "gpu.memory", verdict: Verdict::Warn, value_has: "the kernel command line asks for 120.0 GiB",
            fix: "reboot so the new GTT parameters take effect (check `cat /proc/cmdline`)",
        },
        Fault {
            base: GOOD,
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
            base: GOOD,
            name: "no RDMA devices",
            apply: |o| { o.remove("sys/class/infiniband"); },
            env: None, args: &[],
            id: "rdma.devices", verdict: Verdict::Fail, value_has: "none under /sys/class/infiniband",
            fix: "sudo dnf install rdma-core libibverbs-utils && sudo modprobe irdma (E810) or mlx5_ib (ConnectX), then check `rdma link`",
        },
        Fault {
            base: GOOD,
            name: "cluster IP has no RoCE v2 GID",
            apply: |o| { o.write(&format!("{PORT}/gids/1"), "0000:0000:0000:0000:0000:0000:0000:0000\n"); },
            env: None, args: &["--cluster-ip", "192.168.100.1"],
            id: "rdma.gid", verdict: Verdict::Fail, value_has: "no RoCE v2 GID with an IPv4 address for 192.168.100.1 on enp1s0f0np0",
            fix: "sudo nmcli connection modify cluster ipv4.method manual ipv4.addresses 192.168.100.1/30 && sudo nmcli connection up cluster (RoCE v2 GIDs follow the interface's addresses)",
        },
        Fault {
            base: GOOD,
            name: "InfiniBand-style GID index 0 is found",
            apply: |o| {
                o.write(&format!("{PORT}/gids/0"), "0000:0000:0000:0000:0000:ffff:c0a8:6401\n");
                o.write(&format!("{PORT}/gids/1"), "fe80:0000:0000:0000:6efe:54ff:fe3d:1a20\n");
            },
            env: Some("NCCL_IB_GID_INDEX=0\n"), args: &["--cluster-ip", "192.168.100.1"],
            id: "rdma.gid", verdict: Verdict::Pass, value_has: "index 0 (RoCE v2 ::ffff:192.168.100.1 on enp1s0f0np0): set NCCL_IB_GID_INDEX=0", fix: "",
        },
        Fault {
            base: GOOD,
            name: "MTU 1500",
            apply: |o| { o.write("sys/class/net/enp1s0f0np0/mtu", "1500\n"); },
            env: None, args: &[],
            id: "net.mtu", verdict: Verdict::Warn, value_has: "enp1s0f0np0 mtu 1500",
            fix: "sudo nmcli connection modify cluster 802-3-ethernet.mtu 9000 && sudo nmcli connection up cluster",
        },
        Fault {
            base: GOOD,
            name: "MTU 1500 caps the RDMA MTU",
            apply: |o| { o.write("sys/class/net/enp1s0f0np0/mtu", "1500\n"); },
            env: None, args: &[],
            id: "rdma.mtu", verdict: Verdict::Warn, value_has: "1024 (derived from enp1s0f0np0 mtu 1500)",
            fix: "sudo nmcli connection modify cluster 802-3-ethernet.mtu 9000 && sudo nmcli connection up cluster",
        },
        Fault {
            base: GOOD,
            name: "old E810 firmware",
            apply: |o| { o.edit(".halo/ethtool-i-enp1s0f0np0.txt", "4.91 0x800214b5 1.3909.0", "4.40 0x8001c7d4 1.3534.0"); },
            env: None, args: &[],
            id: "nic.firmware", verdict: Verdict::Warn, value_has: "4.40 0x8001c7d4 1.3534.0 (E810 wants NVM 4.91 or newer)",
            fix: "update the NVM with Intel's E810 NVM Update Tool (nvmupdate64e), then power-cycle",
        },
        Fault {
            base: GOOD,
            name: "memlock 8 MiB on the host",
            apply: |o| { o.edit("proc/self/limits", "Max locked memory         unlimited            unlimited", "Max locked memory         8388608              8388608"); },
            env: None, args: &[],
            id: "host.memlock", verdict: Verdict::Fail, value_has: "8 MiB",
            fix: "echo '* - memlock unlimited' | sudo tee /etc/security/limits.d/90-rdma.conf, then log in again",
        },
        Fault {
            base: GOOD,
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
            base: GOOD,
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
            base: GOOD,
            name: "host without /dev/kfd",
            apply: |o| { o.remove("dev/kfd"); },
            env: None, args: &[],
            id: "host.dev_kfd", verdict: Verdict::Fail, value_has: "/dev/kfd missing (on the host",
            fix: "sudo modprobe amdgpu (and check dmesg for amdgpu errors)",
        },
        Fault {
            base: GOOD,
            name: "interface in zone public (zone file)",
            apply: |o| {
                o.edit(NM_PROFILE, "zone=trusted\n", "");
                o.write("etc/firewalld/zones/public.xml", "<?xml version=\"1.0\"?>\n<zone>\n  <service name=\"ssh\"/>\n  <interface name=\"enp1s0f0np0\"/>\n</zone>\n");
            },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Fail,
            value_has: "enp1s0f0np0 in firewalld zone public (zone file): opens only ssh; Ray's 6379 and RCCL's bootstrap ports are closed to the peer",
            fix: "sudo firewall-cmd --permanent --zone=trusted --change-interface=enp1s0f0np0 && sudo firewall-cmd --reload",
        },
        Fault {
            base: GOOD,
            name: "interface in no zone, default FedoraWorkstation",
            apply: |o| { o.edit(NM_PROFILE, "zone=trusted\n", ""); },
            env: None, args: &[],
            id: "net.firewall", verdict: Verdict::Pass,
            value_has: "enp1s0f0np0 in firewalld zone FedoraWorkstation (default zone): opens TCP 1025-65535", fix: "",
        },
        Fault {
            base: GOOD,
            name: "NCCL_IB_DISABLE=1",
            apply: |_| {},
            env: Some("NCCL_IB_DISABLE=1\n"), args: &[],
            id: "env.ib_disable", verdict: Verdict::Warn, value_has: "falls back to TCP sockets", fix: "unset NCCL_IB_DISABLE",
        },
        Fault {
            base: GOOD,
            name: "NCCL_NET_PLUGIN names another library",
            apply: |_| {},
            env: Some("NCCL_NET_PLUGIN=/usr/lib64/librccl-net-ib.so\n"), args: &[],
            id: "env.net_plugin", verdict: Verdict::Warn, value_has: "/usr/lib64/librccl-net-ib.so: not the halo plugin",
            fix: PLUGIN_FIX,
        },
        Fault {
            base: GOOD,
            name: "NCCL_NET_PLUGIN path, RCCL of ROCm 6.2",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.2.0")).unwrap();
                o.write("opt/rocm-6.2.0/.info/version", "6.2.0-66\n");
                o.link("opt/rocm", "rocm-6.2.0");
            },
            env: None, args: &[],
            id: "env.net_plugin", verdict: Verdict::Fail,
            value_has: "RCCL of ROCm 6.2 only loads librccl-net-<NCCL_NET_PLUGIN>.so by name, so a path is ignored",
            fix: PLUGIN_FIX,
        },
        Fault {
            base: GOOD,
            name: "NCCL_NET_PLUGIN=halo, RCCL of ROCm 6.2",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.2.0")).unwrap();
                o.write("opt/rocm-6.2.0/.info/version", "6.2.0-66\n");
                o.link("opt/rocm", "rocm-6.2.0");
            },
            env: Some("NCCL_NET_PLUGIN=halo\n"), args: &[],
            id: "env.net_plugin", verdict: Verdict::Pass, value_has: "halo", fix: "",
        },
        Fault {
            base: GOOD,
            name: "NCCL_NET_PLUGIN path, RCCL version unknown",
            apply: |o| {
                // A ROCm tree whose release shows nowhere: no .info/version, no version in
                // its directory or library names.
                o.remove("opt/rocm");
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm")).unwrap();
                o.remove("opt/rocm/.info/version");
                o.remove("opt/rocm/lib/librccl.so.1.0.71200");
                o.remove("opt/rocm/lib/librccl.so.1");
            },
            env: None, args: &[],
            id: "env.net_plugin", verdict: Verdict::Warn,
            value_has: "a path is only loaded by RCCL of ROCm 6.3 and later",
            fix: PLUGIN_FIX,
        },
        Fault {
            base: GOOD,
            name: "NCCL_NET_GDR_LEVEL=0",
            apply: |_| {},
            env: Some("NCCL_NET_GDR_LEVEL=0\n"), args: &[],
            id: "env.gdr_level", verdict: Verdict::Warn, value_has: "GPU-direct disabled", fix: "export NCCL_NET_GDR_LEVEL=PHB",
        },
        Fault {
            base: GOOD,
            name: "NCCL_IB_GID_INDEX points at the wrong GID",
            apply: |_| {},
            env: Some("NCCL_IB_GID_INDEX=3\n"), args: &[],
            id: "env.gid_index", verdict: Verdict::Fail, value_has: "3, but the RoCE v2 GID of 192.168.100.1 is index 1",
            fix: "export NCCL_IB_GID_INDEX=1",
        },
        Fault {
            base: GOOD,
            name: "NCCL_SOCKET_IFNAME on the LAN",
            apply: |_| {},
            env: Some("NCCL_SOCKET_IFNAME=eth0\n"), args: &[],
            id: "env.socket_ifname", verdict: Verdict::Warn, value_has: "eth0 does not select enp1s0f0np0",
            fix: "export NCCL_SOCKET_IFNAME=enp1s0f0np0 GLOO_SOCKET_IFNAME=enp1s0f0np0",
        },
        Fault {
            base: GOOD,
            name: "ROCm 6.4 RCCL without gfx1151",
            apply: |o| {
                fs::rename(o.path("opt/rocm-7.12.0"), o.path("opt/rocm-6.4.3")).unwrap();
                o.write("opt/rocm-6.4.3/.info/version", "6.4.3-127\n");
                o.link("opt/rocm", "rocm-6.4.3");
            },
            env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Fail, value_has: "stock RCCL before ROCm 7.12 has no gfx1151 code objects",
            fix: "install ROCm 7.12 or newer: its stock RCCL has gfx1151 code objects",
        },
        Fault {
            base: GOOD,
            name: "no RCCL",
            apply: |o| { o.remove("opt/rocm-7.12.0"); o.remove("opt/rocm"); },
            env: None, args: &[],
            id: "rccl.library", verdict: Verdict::Fail, value_has: "librccl.so not found",
            fix: "install ROCm 7.12 or newer with its rccl package, or run inside the vLLM container (halo container create)",
        },
        Fault {
            base: GOOD,
            name: "plugin library absent",
            apply: |o| { o.remove("opt/halo"); },
            env: None, args: &[],
            id: "plugin.library", verdict: Verdict::Fail,
            value_has: "plugin library not found at /opt/halo/lib/librccl-net-halo.so, /usr/local/lib/librccl-net-halo.so,",
            fix: "cargo build --release -p rccl-net-plugin && sudo install -D target/release/librccl_net_plugin.so /opt/halo/lib/librccl-net-halo.so",
        },
        Fault {
            base: GOOD,
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
    let mut failed = Vec::new();
    for f in faults() {
        let overlay = Overlay::of(f.base);
        (f.apply)(&overlay);
        // The fault's variables replace the good ones they name; the rest stay good.
        let mut env = base_env(f.base).to_string();
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
        let Some(c) = report.check(f.id) else {
            failed.push(format!("{}: no check {}", f.name, f.id));
            continue;
        };
        let fails = report.checks.iter().any(|c| c.verdict == Verdict::Fail);
        if c.verdict != f.verdict || !c.value.contains(f.value_has) || c.fix != f.fix {
            failed.push(format!(
                "{}: got {:?} {:?} fix {:?}; want {:?} with {:?} fix {:?}",
                f.name, c.verdict, c.value, c.fix, f.verdict, f.value_has, f.fix
            ));
        } else if code != i32::from(fails) {
            failed.push(format!("{}: exit status {code}", f.name));
        }
        lines.push(format!(
            "{:<18} {:<46} {:<20} {:?}",
            f.base, f.name, f.id, c.verdict
        ));
    }
    println!("tree               fault                                          check                verdict");
    println!("{}", lines.join("\n"));
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
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
    assert_eq!(port.verdict, Verdict::Fail);
    assert_eq!(port.value, "no RDMA port has GIDs on eth9");
    let driver = report.check("nic.driver").unwrap();
    assert_eq!(
        (driver.verdict, driver.value.as_str()),
        (Verdict::Fail, "no interface eth9 on this node")
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

fn table(root: &Path, env_file: &Path, columns: Option<&str>) -> String {
    let mut cmd = halo();
    match columns {
        Some(c) => cmd.env("COLUMNS", c),
        None => cmd.env_remove("COLUMNS"),
    };
    let out = cmd
        .arg("doctor")
        .arg("--root")
        .arg(root)
        .arg("--env-file")
        .arg(env_file)
        .output()
        .unwrap();
    stdout(&out)
}

#[test]
fn a_machine_without_gpu_and_nic_gets_one_headline_not_a_cascade() {
    let o = Overlay::of_good();
    for gone in [
        "sys/class/kfd",
        "sys/class/drm",
        "sys/class/infiniband",
        "dev/kfd",
        "dev/dri",
        "dev/infiniband",
    ] {
        o.remove(gone);
    }
    let text = table(o.root(), &good_env(), Some("100"));
    println!("{text}");
    assert_eq!(
        text.lines().next(),
        Some("not a cluster node: no AMD GPU, no RDMA device")
    );
    let (code, report) = doctor_json(o.root(), &good_env(), &[]);
    assert_eq!(code, 1);
    let fails: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(fails, ["gpu.arch", "rdma.devices"]);
}

#[test]
fn the_headline_counts_what_blocks_and_what_slows() {
    let env = Overlay::of(DEBIAN);
    let env_file = env.path("node.env");
    fs::write(&env_file, GOOD_ENV).unwrap();
    let text = table(env.root(), &env_file, Some("100"));
    println!("{text}");
    // Blocks: memlock, the user's groups, RCCL without gfx1151. Slows: GTT, firmware, flow control.
    assert_eq!(
        text.lines().next(),
        Some("3 problems block the cluster, 4 slow it down")
    );
    assert_eq!(
        table(&good_tree(), &good_env(), None).lines().next(),
        Some("ready: nothing blocks the cluster or slows it down")
    );
}

#[test]
fn the_table_is_wrapped_to_the_terminal_width() {
    let o = Overlay::of(DEBIAN);
    for (columns, width) in [(Some("80"), 80), (None, 100), (Some("120"), 120)] {
        let text = table(o.root(), &good_env(), columns);
        let mut longest = 0;
        for line in text.lines() {
            let len = line.chars().count();
            longest = longest.max(len);
            // Only a single unbreakable word (a path, a sed script) may stick out.
            if len > width {
                let words = line.split_whitespace().count();
                assert!(words <= 2, "{columns:?}: line of {len} > {width}: {line}");
            }
        }
        assert!(
            longest > width - 20,
            "{columns:?}: the width is used ({longest})"
        );
    }
    let narrow = table(o.root(), &good_env(), Some("80"));
    assert!(
        narrow.contains("          fix: sudo ethtool -A enp1s0f0np0 rx on tx on; at boot: add"),
        "{narrow}"
    );
}

/// A stand-in `ssh` first on PATH that runs the real `halo doctor --json` against the captured
/// tree of each named host, and answers for unreachable ones as ssh does.
fn fake_ssh_hosts(dir: &Path, hosts: &[(&str, &Path)], peer_env: &Path) {
    let mut cases = String::new();
    for (host, root) in hosts {
        cases.push_str(&format!(
            "  {host}) exec '{}' doctor --json --root '{}' --env-file '{}';;\n",
            env!("CARGO_BIN_EXE_halo"),
            root.display(),
            peer_env.display()
        ));
    }
    let script = format!(
        "#!/bin/sh\n\
         while [ \"${{1#-}}\" != \"$1\" ]; do shift 2; done\n\
         host=$1; shift\n\
         case $host in down*) echo 'ssh: connect to host '$host' port 22: Connection refused' >&2; exit 255;; esac\n\
         case $host in gone*) echo 'ssh: Could not resolve hostname '$host': Name or service not known' >&2; exit 255;; esac\n\
         case $host in nokey*) echo $host': Permission denied (publickey).' >&2; exit 255;; esac\n\
         if [ \"$1\" = true ]; then exit 0; fi\n\
         if [ \"$1 $2 $3\" != 'halo doctor --json' ]; then echo \"fake ssh: unexpected command $*\" >&2; exit 127; fi\n\
         case $host in\n{cases}esac\n\
         echo \"fake ssh: unknown host $host\" >&2; exit 255\n"
    );
    let path = dir.join("ssh");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The good node as its peer strix2 at 192.168.100.2.
fn strix2() -> Overlay {
    let o = Overlay::of_good();
    o.write("proc/sys/kernel/hostname", "strix2\n");
    o.write(
        &format!("{PORT}/gids/1"),
        "0000:0000:0000:0000:0000:ffff:c0a8:6402\n",
    );
    o.edit(
        "proc/net/fib_trie",
        "|-- 192.168.100.1",
        "|-- 192.168.100.2",
    );
    o
}

#[test]
fn peers_are_compared_link_by_link() {
    let bin = tempfile::tempdir().unwrap();
    let same = strix2();
    let mtu = strix2();
    mtu.write("sys/class/net/enp1s0f0np0/mtu", "1500\n");
    let subnet = strix2();
    subnet.write(
        &format!("{PORT}/gids/1"),
        "0000:0000:0000:0000:0000:ffff:c0a8:6502\n",
    );
    subnet.write(
        "proc/net/fib_trie",
        &fs::read_to_string(good_tree().join("proc/net/fib_trie"))
            .unwrap()
            .replace("192.168.100.0", "192.168.101.0")
            .replace("192.168.100.1", "192.168.101.2"),
    );
    let ubuntu = common::fixtures().join("doctor").join(UBUNTU);
    let cx3 = common::fixtures().join("doctor").join(CX3);
    fake_ssh_hosts(
        bin.path(),
        &[
            ("strix2", same.root()),
            ("strix3", subnet.root()),
            ("strix4", mtu.root()),
            ("msmax2", &ubuntu),
            ("oldrig", &cx3),
        ],
        &good_env(),
    );
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let mut cmd = halo();
    cmd.env("PATH", &path).args(["doctor", "--json"]);
    for p in [
        "strix2",
        "strix3",
        "strix4",
        "msmax2",
        "oldrig",
        "down-host",
        "gone-host",
    ] {
        cmd.args(["--peer", p]);
    }
    let out = cmd
        .arg("--root")
        .arg(good_tree())
        .arg("--env-file")
        .arg(good_env())
        .output()
        .unwrap();
    let report: NodeReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    let link = |host: &str| report.check(&format!("peer.link.{host}")).unwrap().clone();

    let c = link("strix2");
    assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
    assert_eq!(
        c.value,
        "RoCE v2 GID 1 (IPv4), subnet 192.168.100.0/30, MTU 9000 on both"
    );
    let c = link("strix3");
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert_eq!(
        c.value,
        "subnet strix1 192.168.100.0/30, strix3 192.168.101.2/30: the nodes have no route to each other"
    );
    assert_eq!(
        c.fix,
        "put both cluster addresses in one subnet (the guide: 192.168.100.1/30 and .2/30)"
    );
    let c = link("strix4");
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    assert_eq!(
        c.value,
        "MTU strix1 9000 (enp1s0f0np0), strix4 1500 (enp1s0f0np0): the link runs at the smaller RDMA MTU 1024"
    );
    let c = link("msmax2");
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert_eq!(
        c.value,
        "GID index strix1 1, msmax2 3: one NCCL_IB_GID_INDEX selects the wrong GID on one of them"
    );
    assert_eq!(
        c.fix,
        "set gid_index = 3 for msmax2 in cluster.toml (NCCL_IB_GID_INDEX per node)"
    );
    let c = link("oldrig");
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(
        c.value
            .starts_with("RoCE version strix1 RoCE v2, oldrig IB/RoCE v1"),
        "{c:?}"
    );

    // Unreachable peers are not told to copy a key.
    let down = report.check("peer.ssh.down-host").unwrap();
    assert_eq!(down.verdict, Verdict::Fail);
    assert_eq!(
        down.fix,
        "down-host is up but no SSH server listens: on down-host, sudo systemctl enable --now sshd (Debian/Ubuntu: ssh)"
    );
    let gone = report.check("peer.ssh.gone-host").unwrap();
    assert_eq!(
        gone.fix,
        "gone-host does not resolve: use its IP address, or add it to /etc/hosts"
    );
    assert!(report.check("peer.link.down-host").is_none());
    // A captured tree is not the running system: no RDMA ping.
    assert!(report.check("peer.rdma.strix2").is_none());
}
