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

    /// Final component of a symlink's target, e.g. the driver name behind
    /// `/sys/class/net/IF/device/driver`.
    pub fn link_name(&self, abs: &str) -> Option<String> {
        fs::read_link(self.path(abs))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }
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
    use super::natural_cmp;

    #[test]
    fn natural_order_puts_short_numbers_first() {
        let mut v = vec!["card10", "card2", "card1", "renderD128"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["card1", "card2", "card10", "renderD128"]);
    }
}
