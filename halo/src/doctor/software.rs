//! RCCL: where the library is and which ROCm it belongs to.

use super::Check;
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

pub fn rccl_checks(root: &SysRoot) -> Vec<Check> {
    vec![rccl(root)]
}

struct Found {
    path: String,
    rocm_version: Option<String>,
}

fn find_rccl(root: &SysRoot) -> Option<Found> {
    let rocm_dirs: Vec<String> = root
        .entries("/opt")
        .into_iter()
        .filter(|d| d.starts_with("rocm"))
        .rev()
        .map(|d| format!("/opt/{d}"))
        .collect();
    let mut dirs: Vec<(String, Option<String>)> = Vec::new();
    for rocm in &rocm_dirs {
        let version = root.read(&format!("{rocm}/.info/version"));
        for lib in ["lib", "lib64"] {
            dirs.push((format!("{rocm}/{lib}"), version.clone()));
        }
    }
    dirs.extend(LIB_DIRS.iter().map(|d| (d.to_string(), None)));
    dirs.into_iter().find_map(|(dir, rocm_version)| {
        // The fully versioned name says the most (librccl.so.1.0.71200 over librccl.so).
        let file = root
            .entries(&dir)
            .into_iter()
            .filter(|f| f.starts_with("librccl.so"))
            .max_by_key(|f| f.len())?;
        Some(Found {
            path: format!("{dir}/{file}"),
            rocm_version,
        })
    })
}

/// The ROCm release the RCCL library belongs to: its ROCm tree's `.info/version`, else the
/// versioned file name (`librccl.so.1.0.60200` = 6.2).
pub fn rccl_rocm_version(root: &SysRoot) -> Option<(u32, u32)> {
    let found = find_rccl(root)?;
    if let Some(mm) = found.rocm_version.as_deref().and_then(major_minor) {
        return Some(mm);
    }
    let n: u32 = found.path.rsplit('.').next()?.parse().ok()?;
    (n >= 10_000).then_some((n / 10_000, n / 100 % 100))
}

fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn rccl(root: &SysRoot) -> Check {
    const ID: &str = "rccl.library";
    const TITLE: &str = "RCCL library";
    let Some(found) = find_rccl(root) else {
        return Check::fail(
            ID,
            TITLE,
            "librccl.so not found under /opt/rocm*/lib or the system library directories",
            "install ROCm's rccl package, or run inside the vLLM container (halo container create)",
        );
    };
    // The versioned file name (librccl.so.1.0.71200) already carries the library version.
    let mut value = found.path.clone();
    match &found.rocm_version {
        Some(v) => {
            value.push_str(&format!(", ROCm {v}"));
            if major_minor(v).is_some_and(|mm| mm < ROCM_WITH_GFX1151) {
                return Check::warn(
                    ID,
                    TITLE,
                    format!("{value}: stock RCCL before ROCm 7.12 has no gfx1151 code objects (HIP error: invalid kernel file)"),
                    "use ROCm 7.12 or newer, or an RCCL built for gfx1151 (the kyuz0/vllm-therock-gfx1151 image has one)",
                );
            }
            Check::pass(ID, TITLE, value)
        }
        None => Check::pass(ID, TITLE, value),
    }
}
