//! Host facts: RAM, locked-memory limit, device nodes, container, firewalld zone.

use std::fs::OpenOptions;

use super::{human_bytes, Check, Facts};
use crate::sysroot::SysRoot;

pub fn node_name(root: &SysRoot) -> String {
    root.read("/proc/sys/kernel/hostname")
        .or_else(|| root.read("/etc/hostname"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

pub fn mem_total_bytes(root: &SysRoot) -> Option<u64> {
    let meminfo = root.read("/proc/meminfo")?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Which container engine's marker file exists, if any.
pub fn container_marker(root: &SysRoot) -> Option<&'static str> {
    if root.exists("/run/.containerenv") {
        Some("podman")
    } else if root.exists("/.dockerenv") {
        Some("docker")
    } else {
        None
    }
}

pub fn checks(root: &SysRoot, facts: &Facts) -> Vec<Check> {
    vec![
        memlock(root, facts),
        dev_infiniband(root, facts),
        dev_kfd(root, facts),
        firewall_zone(root, facts),
    ]
}

fn memlock(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "host.memlock";
    const TITLE: &str = "Locked-memory limit";
    let fix = if facts.in_container.is_some() {
        "recreate the container with --ulimit memlock=-1 (halo container create does)".to_string()
    } else {
        "echo '* - memlock unlimited' | sudo tee /etc/security/limits.d/90-rdma.conf, then log in again".to_string()
    };
    let Some(limits) = root.read("/proc/self/limits") else {
        return Check::skip(ID, TITLE, "/proc/self/limits not readable");
    };
    let Some(soft) = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| {
            l["Max locked memory".len()..]
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
    else {
        return Check::skip(
            ID,
            TITLE,
            "no 'Max locked memory' line in /proc/self/limits",
        );
    };
    if soft == "unlimited" {
        return Check::pass(ID, TITLE, "unlimited");
    }
    let bytes: u64 = soft.parse().unwrap_or(0);
    // RDMA registration pins every buffer RCCL hands the plugin; with unified memory those can
    // be most of RAM, so anything below MemTotal can make registration fail mid-run.
    match facts.mem_total_bytes {
        Some(total) if bytes >= total => Check::pass(ID, TITLE, human_bytes(bytes)),
        _ => Check::fail(
            ID,
            TITLE,
            format!(
                "{} (memory registration of large buffers will fail)",
                human_bytes(bytes)
            ),
            fix,
        ),
    }
}

/// Opens each node read-write on the live system; on captured trees only presence is known.
fn inaccessible(root: &SysRoot, nodes: &[String]) -> Vec<String> {
    if !root.is_live() {
        return Vec::new();
    }
    nodes
        .iter()
        .filter(|n| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(root.path(n))
                .is_err()
        })
        .cloned()
        .collect()
}

fn where_text(root: &SysRoot, facts: &Facts) -> String {
    let place = match facts.in_container {
        Some(engine) => format!("inside a {engine} container"),
        None => "on the host".to_string(),
    };
    if root.is_live() {
        place
    } else {
        format!("{place}; captured tree, not opened")
    }
}

fn dev_infiniband(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "host.dev_infiniband";
    const TITLE: &str = "/dev/infiniband usable";
    let nodes: Vec<String> = root
        .entries("/dev/infiniband")
        .into_iter()
        .filter(|n| n.starts_with("uverbs"))
        .map(|n| format!("/dev/infiniband/{n}"))
        .collect();
    if nodes.is_empty() {
        let fix = if facts.in_container.is_some() {
            "recreate the container with --device /dev/infiniband --ulimit memlock=-1 (halo container create)"
        } else {
            "sudo modprobe irdma ib_uverbs (E810: irdma; check with `rdma link`)"
        };
        return Check::fail(
            ID,
            TITLE,
            format!(
                "no uverbs device under /dev/infiniband ({})",
                where_text(root, facts)
            ),
            fix,
        );
    }
    let denied = inaccessible(root, &nodes);
    if denied.is_empty() {
        Check::pass(
            ID,
            TITLE,
            format!("{} ({})", nodes.join(", "), where_text(root, facts)),
        )
    } else {
        let fix = if facts.in_container.is_some() {
            "recreate the container with --group-add keep-groups (halo container create)"
        } else {
            "sudo usermod -aG rdma $USER, then log in again"
        };
        Check::fail(ID, TITLE, format!("cannot open {}", denied.join(", ")), fix)
    }
}

fn dev_kfd(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "host.dev_kfd";
    const TITLE: &str = "/dev/kfd and render node usable";
    let mut nodes = Vec::new();
    if root.exists("/dev/kfd") {
        nodes.push("/dev/kfd".to_string());
    }
    let render: Vec<String> = root
        .entries("/dev/dri")
        .into_iter()
        .filter(|n| n.starts_with("renderD"))
        .map(|n| format!("/dev/dri/{n}"))
        .collect();
    let missing_kfd = nodes.is_empty();
    nodes.extend(render.iter().cloned());
    if missing_kfd || render.is_empty() {
        let what = if missing_kfd {
            "/dev/kfd"
        } else {
            "/dev/dri/renderD*"
        };
        let fix = if facts.in_container.is_some() {
            "recreate the container with --device /dev/kfd --device /dev/dri (halo container create)"
        } else {
            "sudo modprobe amdgpu (and check dmesg for amdgpu errors)"
        };
        return Check::fail(
            ID,
            TITLE,
            format!("{what} missing ({})", where_text(root, facts)),
            fix,
        );
    }
    let denied = inaccessible(root, &nodes);
    if denied.is_empty() {
        Check::pass(
            ID,
            TITLE,
            format!("{} ({})", nodes.join(", "), where_text(root, facts)),
        )
    } else {
        let fix = if facts.in_container.is_some() {
            "recreate the container with --group-add keep-groups (halo container create)"
        } else {
            "sudo usermod -aG render,video $USER, then log in again"
        };
        Check::fail(ID, TITLE, format!("cannot open {}", denied.join(", ")), fix)
    }
}

fn firewall_zone(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "net.firewall";
    const TITLE: &str = "firewalld zone of the cluster interface";
    let Some(iface) = facts.cluster.as_ref().map(|c| c.netdev.as_str()) else {
        return Check::skip(ID, TITLE, "cluster interface unknown");
    };
    if !root.exists("/etc/firewalld") {
        return Check::skip(
            ID,
            TITLE,
            "firewalld not configured (/etc/firewalld absent)",
        );
    }
    let needle = format!("name=\"{iface}\"");
    let zone = root
        .entries("/etc/firewalld/zones")
        .into_iter()
        .filter_map(|f| f.strip_suffix(".xml").map(str::to_string))
        .find(|zone| {
            root.read(&format!("/etc/firewalld/zones/{zone}.xml"))
                .is_some_and(|xml| {
                    xml.split("<interface")
                        .skip(1)
                        .any(|tag| tag.split('>').next().is_some_and(|t| t.contains(&needle)))
                })
        });
    let reload = "sudo firewall-cmd --reload";
    match zone {
        Some(z) if z == "trusted" => Check::pass(ID, TITLE, format!("{iface} in zone trusted")),
        Some(z) => Check::warn(
            ID,
            TITLE,
            format!("{iface} in zone {z}: Ray and RCCL use random high ports that {z} may block"),
            format!("sudo firewall-cmd --permanent --zone=trusted --change-interface={iface} && {reload}"),
        ),
        None => {
            let default = root
                .read("/etc/firewalld/firewalld.conf")
                .and_then(|c| c.lines().find_map(|l| l.trim().strip_prefix("DefaultZone=").map(str::to_string)))
                .unwrap_or_else(|| "public".to_string());
            if default == "trusted" {
                Check::pass(ID, TITLE, format!("{iface} in the default zone trusted"))
            } else {
                Check::warn(
                    ID,
                    TITLE,
                    format!("{iface} in no zone file: default zone {default} applies"),
                    format!("sudo firewall-cmd --permanent --zone=trusted --add-interface={iface} && {reload}"),
                )
            }
        }
    }
}
