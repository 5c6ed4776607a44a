//! What `halo bench` checks before it measures anything, on this node and (through `CHECK`
//! requests) on the peer: the RDMA device and its GID, perftest, the plugin library. A wrong
//! argument is refused at once with what is there instead, not after minutes of other rows.

use crate::doctor::rdma;
use crate::sysroot::SysRoot;
use std::path::{Path, PathBuf};

/// perftest programs the RDMA rows run.
pub const PERFTEST: [&str; 2] = ["ib_write_lat", "ib_write_bw"];

/// `dev` exists, and `gid` is one of its GIDs, of type RoCE v2.
pub fn rdma_device(root: &SysRoot, dev: &str, gid: u32) -> Result<(), String> {
    let ports = rdma::discover(root);
    let mine: Vec<_> = ports.iter().filter(|p| p.device == dev).collect();
    if mine.is_empty() {
        let mut names: Vec<&str> = ports.iter().map(|p| p.device.as_str()).collect();
        names.dedup();
        return Err(format!(
            "RDMA device {dev} not found on {} ({}; see `halo doctor`)",
            hostname(),
            if names.is_empty() {
                "it has no RDMA device".to_string()
            } else {
                format!("devices: {}", names.join(", "))
            }
        ));
    }
    let entry = mine
        .iter()
        .flat_map(|p| p.gids.iter())
        .find(|g| g.index == gid);
    match entry {
        Some(g) if g.kind == "RoCE v2" => Ok(()),
        Some(g) => Err(format!(
            "GID index {gid} of {dev} on {} is {} ({}), not RoCE v2{}",
            hostname(),
            g.gid,
            if g.kind.is_empty() {
                "no type"
            } else {
                &g.kind
            },
            roce_v2_hint(&mine)
        )),
        None => Err(format!(
            "{dev} on {} has no GID at index {gid}{}",
            hostname(),
            roce_v2_hint(&mine)
        )),
    }
}

fn roce_v2_hint(ports: &[&rdma::RdmaPort]) -> String {
    let v2: Vec<String> = ports
        .iter()
        .flat_map(|p| p.gids.iter())
        .filter(|g| g.kind == "RoCE v2")
        .map(|g| format!("{} ({})", g.index, g.gid))
        .collect();
    if v2.is_empty() {
        String::new()
    } else {
        format!("; its RoCE v2 GIDs: {}", v2.join(", "))
    }
}

/// The node's name for messages (the peer's answers name their node too).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this node".into())
}

/// `name` as found on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The perftest programs are on PATH.
pub fn perftest_installed() -> Result<(), String> {
    let missing: Vec<&str> = PERFTEST
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not found on {} (apt-get install perftest)",
            missing.join(" and "),
            hostname()
        ))
    }
}

/// The plugin library exists here.
pub fn plugin_file(path: &Path) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!(
            "the plugin library {} does not exist on {} (build it, or see scripts/install-plugin.sh)",
            path.display(),
            hostname()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn gid(root: &Path, dev: &str, i: u32, addr: &str, kind: &str) {
        let base = root.join(format!("sys/class/infiniband/{dev}/ports/1"));
        fs::create_dir_all(base.join("gids")).unwrap();
        fs::create_dir_all(base.join("gid_attrs/types")).unwrap();
        fs::write(base.join(format!("gids/{i}")), addr).unwrap();
        fs::write(base.join(format!("gid_attrs/types/{i}")), kind).unwrap();
    }

    #[test]
    fn device_and_gid_are_checked_against_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = SysRoot::new(dir.path());
        let e = rdma_device(&root, "rxe0", 1).unwrap_err();
        assert!(
            e.contains("rxe0 not found") && e.contains("no RDMA device"),
            "{e}"
        );
        gid(
            dir.path(),
            "rxe0",
            0,
            "fe80:0000:0000:0000:0000:0000:0000:0001",
            "RoCE v2",
        );
        gid(
            dir.path(),
            "rxe0",
            1,
            "0000:0000:0000:0000:0000:ffff:c612:0001",
            "RoCE v2",
        );
        gid(
            dir.path(),
            "rxe0",
            2,
            "0000:0000:0000:0000:0000:ffff:c612:0001",
            "IB/RoCE v1",
        );
        assert_eq!(rdma_device(&root, "rxe0", 1), Ok(()));
        let e = rdma_device(&root, "rxe9", 1).unwrap_err();
        assert!(e.contains("devices: rxe0"), "{e}");
        let e = rdma_device(&root, "rxe0", 7).unwrap_err();
        assert!(
            e.contains("no GID at index 7") && e.contains("RoCE v2 GIDs: 0"),
            "{e}"
        );
        let e = rdma_device(&root, "rxe0", 2).unwrap_err();
        assert!(e.contains("not RoCE v2"), "{e}");
    }

    #[test]
    fn programs_and_plugin_files() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-halo").is_none());
        let e = plugin_file(Path::new("/nonexistent/lib.so")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }
}
