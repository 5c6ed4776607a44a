//! Installed software: the ROCm installs and the RCCL a job loads, and the rdma-core release.

use std::collections::BTreeMap;

use super::os::Family;
use super::{Check, Facts};
use crate::sysroot::SysRoot;

/// Stock RCCL ships gfx1151 code objects from this ROCm release on.
const ROCM_WITH_GFX1151: (u32, u32) = (7, 12);

const LIB_DIRS: [&str; 5] = [
    "/usr/lib64",
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/usr/local/lib64",
];

pub(crate) fn checks(root: &SysRoot, facts: &Facts, env: &BTreeMap<String, String>) -> Vec<Check> {
    let installs = rocm_installs(root);
    vec![
        rocm_check(&installs, facts),
        rccl(root, &installs, env),
        rdma_core(root, facts),
    ]
}

/// Numeric components of a version, for ordering: "7.12.1-30" → [7, 12, 1, 30].
pub fn version_key(v: &str) -> Vec<u32> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// One ROCm tree under /opt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RocmInstall {
    /// "/opt/rocm-7.12.1"
    pub dir: String,
    /// `.info/version`, else the version in the directory name.
    pub version: Option<String>,
}

/// The versioned ROCm trees under /opt, newest first, and which of them `/opt/rocm` names.
#[derive(Debug, Clone, Default)]
pub struct RocmInstalls {
    pub all: Vec<RocmInstall>,
    /// Index into `all` of the tree `/opt/rocm` resolves to.
    pub linked: Option<usize>,
    /// `/opt/rocm` is a directory of its own (not a link to a versioned tree).
    pub plain_opt_rocm: bool,
}

impl RocmInstalls {
    /// The tree a job uses when nothing else says: `/opt/rocm`'s, else the newest.
    pub fn current(&self) -> Option<&RocmInstall> {
        self.linked.map(|i| &self.all[i]).or(self.all.first())
    }
}

pub fn rocm_installs(root: &SysRoot) -> RocmInstalls {
    let version_of = |dir: &str| {
        root.read(&format!("{dir}/.info/version")).or_else(|| {
            dir.rsplit('/')
                .next()
                .and_then(|n| n.strip_prefix("rocm-"))
                .map(str::to_string)
        })
    };
    let mut all: Vec<RocmInstall> = root
        .entries("/opt")
        .into_iter()
        .filter(|d| d.starts_with("rocm-"))
        .map(|d| format!("/opt/{d}"))
        .filter(|d| root.resolve(d).as_deref() == Some(d.as_str()))
        .map(|dir| RocmInstall {
            version: version_of(&dir),
            dir,
        })
        .collect();
    all.sort_by(|a, b| {
        let key = |i: &RocmInstall| version_key(i.version.as_deref().unwrap_or(""));
        key(b).cmp(&key(a))
    });
    let mut out = RocmInstalls::default();
    if root.present("/opt/rocm") {
        match root.resolve("/opt/rocm") {
            Some(target) if target != "/opt/rocm" => {
                out.linked = all.iter().position(|i| i.dir == target);
                if out.linked.is_none() {
                    all.insert(
                        0,
                        RocmInstall {
                            version: version_of(&target),
                            dir: target,
                        },
                    );
                    out.linked = Some(0);
                }
            }
            _ => {
                out.plain_opt_rocm = true;
                all.insert(
                    0,
                    RocmInstall {
                        version: version_of("/opt/rocm"),
                        dir: "/opt/rocm".to_string(),
                    },
                );
                out.linked = Some(0);
            }
        }
    }
    out.all = all;
    out
}

fn shown(i: &RocmInstall) -> String {
    match &i.version {
        Some(v) => format!("{} (ROCm {v})", i.dir),
        None => i.dir.clone(),
    }
}

fn rocm_check(installs: &RocmInstalls, facts: &Facts) -> Check {
    const ID: &str = "rocm.installs";
    const TITLE: &str = "ROCm installs under /opt";
    let Some(current) = installs.current() else {
        return Check::skip(
            ID,
            TITLE,
            "no ROCm under /opt (distribution packages or a container)",
        );
    };
    let head = match installs.linked {
        Some(_) if !installs.plain_opt_rocm => format!("/opt/rocm -> {}", shown(current)),
        Some(_) => shown(current),
        None => format!("no /opt/rocm link; newest {}", shown(current)),
    };
    let others: Vec<&RocmInstall> = installs
        .all
        .iter()
        .filter(|i| i.dir != current.dir)
        .collect();
    if others.is_empty() {
        return Check::pass(ID, TITLE, head);
    }
    let names: Vec<String> = others.iter().map(|i| shown(i)).collect();
    let dirs: Vec<&str> = others.iter().map(|i| i.dir.as_str()).collect();
    let remove = match facts.os.family {
        Family::Fedora => dirs
            .iter()
            .map(|d| format!("sudo dnf remove $(rpm -qf {d}/.info/version)"))
            .collect::<Vec<_>>()
            .join(" && "),
        Family::Debian => dirs
            .iter()
            .map(|d| format!("sudo apt remove $(dpkg -S {d}/.info/version | cut -d: -f1)"))
            .collect::<Vec<_>>()
            .join(" && "),
        Family::Other => format!(
            "remove {} with the package manager that installed it",
            dirs.join(", ")
        ),
    };
    Check::warn(
        ID,
        TITLE,
        format!(
            "{head}; leftover {}: a library path naming a leftover loads its older HIP and RCCL",
            names.join(", ")
        ),
        remove,
    )
}

struct Found {
    path: String,
    /// The ROCm tree it belongs to.
    rocm: Option<RocmInstall>,
    /// Found through LD_LIBRARY_PATH.
    from_ld_path: bool,
}

/// The RCCL a job would load: from LD_LIBRARY_PATH first, then `/opt/rocm` (or the newest
/// ROCm), then the system library directories.
fn find_rccl(
    root: &SysRoot,
    installs: &RocmInstalls,
    env: &BTreeMap<String, String>,
) -> Option<Found> {
    let tree_of = |dir: &str| {
        let real = root.resolve(dir).unwrap_or_else(|| dir.to_string());
        installs
            .all
            .iter()
            .find(|i| {
                real.starts_with(&format!("{}/", i.dir)) || dir.starts_with(&format!("{}/", i.dir))
            })
            .cloned()
    };
    let mut dirs: Vec<(String, bool)> = env
        .get("LD_LIBRARY_PATH")
        .map(String::as_str)
        .unwrap_or("")
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| (d.trim_end_matches('/').to_string(), true))
        .collect();
    if let Some(current) = installs.current() {
        for lib in ["lib", "lib64"] {
            dirs.push((format!("{}/{lib}", current.dir), false));
        }
    }
    dirs.extend(LIB_DIRS.iter().map(|d| (d.to_string(), false)));
    dirs.into_iter().find_map(|(dir, from_ld_path)| {
        // The fully versioned name says the most (librccl.so.1.0.71200 over librccl.so).
        let file = root
            .entries(&dir)
            .into_iter()
            .filter(|f| f.starts_with("librccl.so"))
            .max_by_key(|f| f.len())?;
        Some(Found {
            path: format!("{dir}/{file}"),
            rocm: tree_of(&dir),
            from_ld_path,
        })
    })
}

/// The ROCm release the RCCL library belongs to: its ROCm tree's `.info/version`, else the
/// versioned file name (`librccl.so.1.0.60200` = 6.2).
pub fn rccl_rocm_version(root: &SysRoot, env: &BTreeMap<String, String>) -> Option<(u32, u32)> {
    let found = find_rccl(root, &rocm_installs(root), env)?;
    if let Some(mm) = found
        .rocm
        .as_ref()
        .and_then(|r| r.version.as_deref())
        .and_then(major_minor)
    {
        return Some(mm);
    }
    let n: u32 = found.path.rsplit('.').next()?.parse().ok()?;
    (n >= 10_000).then_some((n / 10_000, n / 100 % 100))
}

fn major_minor(v: &str) -> Option<(u32, u32)> {
    let k = version_key(v);
    Some((*k.first()?, *k.get(1)?))
}

fn rccl(root: &SysRoot, installs: &RocmInstalls, env: &BTreeMap<String, String>) -> Check {
    const ID: &str = "rccl.library";
    const TITLE: &str = "RCCL library";
    let Some(found) = find_rccl(root, installs, env) else {
        return Check::fail(
            ID,
            TITLE,
            "librccl.so not found under /opt/rocm*/lib or the system library directories",
            "install ROCm 7.12 or newer with its rccl package, or run inside the vLLM container (halo container create)",
        );
    };
    // The versioned file name (librccl.so.1.0.71200) already carries the library version.
    let mut value = found.path.clone();
    if found.from_ld_path {
        value.push_str(" (via LD_LIBRARY_PATH)");
    }
    let Some(version) = found.rocm.as_ref().and_then(|r| r.version.clone()) else {
        return Check::pass(ID, TITLE, value);
    };
    value.push_str(&format!(", ROCm {version}"));
    if major_minor(&version).is_none_or(|mm| mm >= ROCM_WITH_GFX1151) {
        return Check::pass(ID, TITLE, value);
    }
    let newer = installs.current().filter(|c| {
        c.version
            .as_deref()
            .and_then(major_minor)
            .is_some_and(|mm| mm >= ROCM_WITH_GFX1151)
    });
    let fix = match (found.from_ld_path, newer) {
        (true, Some(n)) => format!(
            "remove {} from LD_LIBRARY_PATH: {} has an RCCL with gfx1151",
            found.path.rsplit_once('/').map_or("", |(d, _)| d),
            shown(n)
        ),
        _ => "install ROCm 7.12 or newer: its stock RCCL has gfx1151 code objects".to_string(),
    };
    Check::fail(
        ID,
        TITLE,
        format!("{value}: stock RCCL before ROCm 7.12 has no gfx1151 code objects (HIP error: invalid kernel file)"),
        fix,
    )
}

/// The rdma-core release the node's libibverbs comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaCoreVersion {
    pub major: u32,
    pub minor: u32,
    /// Where it was read: the library file or the package database.
    pub source: String,
}

/// Directories the dynamic linker searches for libibverbs, in the order it prefers them
/// (a locally built rdma-core in /usr/local shadows the distribution's).
const VERBS_DIRS: [&str; 6] = [
    "/usr/local/lib64",
    "/usr/local/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib",
];

/// rdma-core's release from libibverbs' file name — rdma-core N.M installs
/// `libibverbs.so.1.<abi>.N.M` (e.g. `libibverbs.so.1.14.50.0` is rdma-core 50.0) — or,
/// failing that, from dpkg's status file.
pub fn rdma_core_version(root: &SysRoot) -> Option<RdmaCoreVersion> {
    for dir in VERBS_DIRS {
        let file = root
            .entries(dir)
            .into_iter()
            .filter(|f| f.starts_with("libibverbs.so.1."))
            .max_by_key(|f| f.len());
        if let Some(file) = file {
            let parts: Vec<u32> = file["libibverbs.so.".len()..]
                .split('.')
                .filter_map(|p| p.parse().ok())
                .collect();
            if let [_, _, major, minor, ..] = parts.as_slice() {
                return Some(RdmaCoreVersion {
                    major: *major,
                    minor: *minor,
                    source: format!("{dir}/{file}"),
                });
            }
        }
    }
    let status = root.read("/var/lib/dpkg/status")?;
    let block = status
        .split("\n\n")
        .find(|b| b.lines().any(|l| l == "Package: rdma-core"))?;
    let version = block.lines().find_map(|l| l.strip_prefix("Version: "))?;
    let k = version_key(version);
    Some(RdmaCoreVersion {
        major: *k.first()?,
        minor: k.get(1).copied().unwrap_or(0),
        source: "dpkg status".to_string(),
    })
}

fn rdma_core(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "rdma.core";
    const TITLE: &str = "rdma-core (libibverbs)";
    let install = facts.os.install(
        "rdma-core libibverbs-utils",
        "rdma-core ibverbs-providers ibverbs-utils",
    );
    let Some(v) = rdma_core_version(root) else {
        return Check::fail(
            ID,
            TITLE,
            "libibverbs.so.1 not found: the plugin cannot open any RDMA device",
            install,
        );
    };
    let value = format!("rdma-core {}.{} ({})", v.major, v.minor, v.source);
    let irdma = facts
        .link
        .as_ref()
        .and_then(|l| root.link_name(&format!("/sys/class/net/{}/device/driver", l.netdev)))
        .is_some_and(|d| d == "ice");
    // irdma completions come back as "Unknown completion" errors with rdma-core 50.
    if irdma && v.major == 50 {
        return Check::fail(
            ID,
            TITLE,
            format!("{value}: irdma reports 'Unknown completion' errors with rdma-core 50, RDMA transfers fail"),
            "install rdma-core 51 or newer (e.g. build a current release from github.com/linux-rdma/rdma-core into /usr/local and run sudo ldconfig)",
        );
    }
    Check::pass(ID, TITLE, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_number() {
        let mut v = vec!["7.2.0", "7.12.1", "6.4.3-127", "7.12.0-30"];
        v.sort_by_key(|s| std::cmp::Reverse(version_key(s)));
        assert_eq!(v, ["7.12.1", "7.12.0-30", "7.2.0", "6.4.3-127"]);
    }
}
