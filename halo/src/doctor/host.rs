//! Host facts: RAM, locked-memory limit, device nodes and the groups that open them, container.

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
        groups(root, facts),
        super::firewall::check(root, facts),
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
    if nodes.is_empty() && facts.rdma_devices.is_empty() {
        return Check::skip(ID, TITLE, "no RDMA device");
    }
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
    if missing_kfd && render.is_empty() && facts.gfx_target.is_none() {
        return Check::skip(ID, TITLE, "no AMD GPU");
    }
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

/// Which groups a user needs for the GPU and RDMA device nodes; judged on captured trees from
/// `.halo/id.txt` (`id` of the user who runs the jobs) and, when present, `.halo/dev-stat.txt`
/// (`stat -c '%a %G %n'` of /dev/kfd, /dev/dri/renderD*, /dev/infiniband/uverbs*).
fn groups(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "host.groups";
    const TITLE: &str = "User's device groups";
    if root.is_live() {
        return Check::skip(
            ID,
            TITLE,
            "running system: the device nodes above were opened instead",
        );
    }
    if facts.in_container.is_some() {
        return Check::skip(
            ID,
            TITLE,
            "inside a container: groups come from --group-add keep-groups",
        );
    }
    let Some(id) = root.read("/.halo/id.txt") else {
        return Check::skip(
            ID,
            TITLE,
            "no .halo/id.txt (output of `id`) in the captured tree",
        );
    };
    let user = parse_id_user(&id).unwrap_or_else(|| "$USER".to_string());
    let member = parse_id_groups(&id);
    let fix = |missing: &[String]| {
        format!(
            "sudo usermod -aG {} {user}, then log in again",
            missing.join(",")
        )
    };
    let in_groups = if member.is_empty() {
        "no groups".to_string()
    } else {
        format!("groups {}", member.join(","))
    };
    if let Some(stat) = root.read("/.halo/dev-stat.txt") {
        // "660 render /dev/kfd": a node the user can open neither as "other" nor by group.
        let mut blocked = Vec::new();
        let mut missing: Vec<String> = Vec::new();
        for line in stat.lines() {
            let mut w = line.split_whitespace();
            let (Some(mode), Some(group), Some(node)) = (w.next(), w.next(), w.next()) else {
                continue;
            };
            let other_rw = u32::from_str_radix(mode, 8).is_ok_and(|m| m & 0o006 == 0o006);
            if !other_rw && !member.iter().any(|g| g == group) {
                blocked.push(format!("{node} ({mode} {group})"));
                if !missing.iter().any(|m| m == group) {
                    missing.push(group.to_string());
                }
            }
        }
        return if blocked.is_empty() {
            Check::pass(
                ID,
                TITLE,
                format!("{user}: {in_groups}; every device node opens"),
            )
        } else {
            Check::fail(
                ID,
                TITLE,
                format!("{user} ({in_groups}) cannot open {}", blocked.join(", ")),
                fix(&missing),
            )
        };
    }
    let missing: Vec<String> = ["render", "video"]
        .into_iter()
        .filter(|g| !member.iter().any(|m| m == g))
        .map(str::to_string)
        .collect();
    if missing.is_empty() {
        Check::pass(ID, TITLE, format!("{user}: {in_groups}"))
    } else {
        Check::warn(
            ID,
            TITLE,
            format!(
                "{user} ({in_groups}) is not in {}: /dev/kfd and /dev/dri/renderD* are group render or video (0660) on most distributions",
                missing.join(", ")
            ),
            fix(&missing),
        )
    }
}

/// "uid=1000(core) gid=1000(core) groups=1000(core),10(wheel)" → "core"
fn parse_id_user(id: &str) -> Option<String> {
    let uid = id.split_whitespace().find_map(|w| w.strip_prefix("uid="))?;
    Some(uid.split_once('(')?.1.trim_end_matches(')').to_string())
}

fn parse_id_groups(id: &str) -> Vec<String> {
    id.split_whitespace()
        .find_map(|w| w.strip_prefix("groups="))
        .map(|g| {
            g.split(',')
                .filter_map(|e| Some(e.split_once('(')?.1.trim_end_matches(')').to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_output() {
        let id = "uid=1000(core) gid=1000(core) groups=1000(core),10(wheel),39(video),105(render)";
        assert_eq!(parse_id_user(id).as_deref(), Some("core"));
        assert_eq!(parse_id_groups(id), ["core", "wheel", "video", "render"]);
    }
}
