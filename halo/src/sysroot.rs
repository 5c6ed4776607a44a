//! Read-only view of a machine's files below a root directory.
//!
//! Every probe reads `/proc`, `/sys`, `/etc` and `/dev` through a [`SysRoot`], so the same code
//! runs against the live system (`/`) and against captured trees in test fixtures.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct SysRoot {
    root: PathBuf,
}

impl SysRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysRoot { root: root.into() }
    }

    /// True when this view is the running system itself, so live-only probes
    /// (e.g. `ethtool`, opening device nodes) are meaningful.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps an absolute path of the inspected machine to a path on this one.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Contents with surrounding whitespace removed; `None` when unreadable.
    pub fn read(&self, abs: &str) -> Option<String> {
        fs::read_to_string(self.path(abs))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn exists(&self, abs: &str) -> bool {
        self.path(abs).exists()
    }

    /// True when `abs` is there, even as a symlink whose absolute target names a path of the
    /// inspected node (which this machine's file system cannot follow).
    pub fn present(&self, abs: &str) -> bool {
        self.path(abs).symlink_metadata().is_ok()
    }

    /// Sorted entry names of a directory (empty when absent).
    pub fn entries(&self, abs_dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path(abs_dir))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    /// Follows `abs` through symlinks the way the inspected node would: absolute targets stay
    /// below the root. Returns the node's path of what it finally names (which may not exist);
    /// `None` on a loop.
    pub fn resolve(&self, abs: &str) -> Option<String> {
        let mut path = abs.to_string();
        for _ in 0..16 {
            let Ok(target) = fs::read_link(self.path(&path)) else {
                return Some(path);
            };
            let target = target.to_string_lossy().into_owned();
            path = if target.starts_with('/') {
                target
            } else {
                let parent = Path::new(&path).parent().unwrap_or(Path::new("/"));
                normalize(&parent.join(&target).to_string_lossy())
            };
        }
        None
    }

    /// Final component of a symlink's target, e.g. the driver name behind
    /// `/sys/class/net/IF/device/driver`.
    pub fn link_name(&self, abs: &str) -> Option<String> {
        fs::read_link(self.path(abs))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }
}

/// Removes `.` and `..` components of an absolute path without touching the file system.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Orders `card2` before `card10` and `uverbs1` before `uverbs10`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let digits_at = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (head, tail) = s.split_at(digits_at);
        (head.to_string(), tail.parse::<u64>().ok())
    };
    split(a).cmp(&split(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_short_numbers_first() {
        let mut v = vec!["card10", "card2", "card1", "renderD128"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["card1", "card2", "card10", "renderD128"]);
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = SysRoot::new(dir.path());
        fs::create_dir_all(dir.path().join("opt/rocm-7.12.1")).unwrap();
        fs::create_dir_all(dir.path().join("etc/alternatives")).unwrap();
        std::os::unix::fs::symlink("/etc/alternatives/rocm", dir.path().join("opt/rocm")).unwrap();
        std::os::unix::fs::symlink(
            "../../opt/rocm-7.12.1",
            dir.path().join("etc/alternatives/rocm"),
        )
        .unwrap();
        assert_eq!(
            root.resolve("/opt/rocm").as_deref(),
            Some("/opt/rocm-7.12.1")
        );
        assert_eq!(
            root.resolve("/opt/rocm-7.12.1").as_deref(),
            Some("/opt/rocm-7.12.1")
        );
    }
}
