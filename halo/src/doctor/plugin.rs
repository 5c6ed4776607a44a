//! The halo net plugin library: where it is, and what can be said about it.
//!
//! Locating the file is done here; judging the file is a [`PluginProbe`]. [`ElfFileProbe`] only
//! recognises an ELF shared object (for captured machine trees); [`LoadingProbe`] loads the
//! library on the running system, checks its `ncclNetPlugin_vN` symbols and calls `init`,
//! `devices` and `getProperties` the way RCCL does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Check, DoctorOptions};
use crate::process::run_bounded;

/// File name RCCL resolves for `NCCL_NET_PLUGIN=halo`.
pub const PLUGIN_FILE: &str = "librccl-net-halo.so";
/// Install location `halo cluster init` and `halo container` assume when nothing else is known.
pub const DEFAULT_PLUGIN_PATH: &str = "/opt/halo/lib/librccl-net-halo.so";
/// The `NCCL_NET_PLUGIN` value that selects [`PLUGIN_FILE`] on every RCCL.
pub const PLUGIN_NAME: &str = "halo";

/// The environment that makes RCCL load the plugin installed at `path`: `NCCL_NET_PLUGIN=halo`
/// with the library's directory for `LD_LIBRARY_PATH` (callers put it in front of what is
/// there). Every RCCL resolves that name to `librccl-net-halo.so` through the loader path;
/// RCCL of ROCm 6.1 and 6.2 only ever tries `librccl-net-<NCCL_NET_PLUGIN>.so`, so a full path
/// there is silently ignored. A library under another file name can only be named by its path
/// (RCCL of ROCm 6.3 and later).
pub fn plugin_env(path: &str) -> Vec<(String, String)> {
    match path.rsplit_once('/') {
        Some((dir, PLUGIN_FILE)) => vec![
            ("NCCL_NET_PLUGIN".into(), PLUGIN_NAME.into()),
            (
                "LD_LIBRARY_PATH".into(),
                if dir.is_empty() { "/" } else { dir }.into(),
            ),
        ],
        _ => vec![("NCCL_NET_PLUGIN".into(), path.into())],
    }
}

/// `dir` in front of the loader path `current` (which may be empty).
pub fn prepend_ld_path(dir: &str, current: Option<&str>) -> String {
    match current.filter(|c| !c.is_empty()) {
        Some(c) if c.split(':').next() == Some(dir) => c.to_string(),
        Some(c) => format!("{dir}:{c}"),
        None => dir.to_string(),
    }
}

const SEARCH_DIRS: [&str; 5] = [
    "/opt/halo/lib",
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/lib64",
    "/usr/lib",
];

/// True when an `NCCL_NET_PLUGIN` value selects the halo library (by path, file or short name).
pub fn is_halo_plugin(value: &str) -> bool {
    value == "halo" || value.rsplit('/').next() == Some(PLUGIN_FILE)
}

/// The ABI versions the library must export, as the checks name them: `v6..v12`.
fn abi_versions() -> String {
    let v = halo_ffi::ABI_VERSIONS;
    format!("v{}..v{}", v.start(), v.end())
}

pub const CHECK_ID: &str = "plugin.library";
pub const CHECK_TITLE: &str = "halo net plugin library";

pub trait PluginProbe {
    /// Judges the library at `path` (a path on this machine, already below the doctor's root);
    /// `shown` is how the inspected node names it; `env` is the environment the doctor judges
    /// (the process's, or `--env-file`'s), which a loading probe gives the plugin.
    fn probe(&self, path: &Path, shown: &str, env: &BTreeMap<String, String>) -> Check;
}

/// Checks that the file is an ELF shared object; it does not load it.
pub struct ElfFileProbe;

impl PluginProbe for ElfFileProbe {
    fn probe(&self, path: &Path, shown: &str, _env: &BTreeMap<String, String>) -> Check {
        elf_check(path, shown).unwrap_or_else(|| {
            Check::pass(
                CHECK_ID,
                CHECK_TITLE,
                format!("{shown} (ELF shared object; not loaded: captured tree)"),
            )
        })
    }
}

/// `None` when `path` is an ELF shared object, else the failed check.
fn elf_check(path: &Path, shown: &str) -> Option<Check> {
    let mut header = [0u8; 18];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut header));
    if let Err(e) = read {
        return Some(Check::fail(
            CHECK_ID,
            CHECK_TITLE,
            format!("{shown}: cannot read ({e})"),
            rebuild_fix(),
        ));
    }
    const ET_DYN: u16 = 3;
    let is_elf = header[..4] == *b"\x7fELF";
    let e_type = u16::from_le_bytes([header[16], header[17]]);
    if is_elf && e_type == ET_DYN {
        None
    } else {
        Some(Check::fail(
            CHECK_ID,
            CHECK_TITLE,
            format!("{shown}: not an ELF shared object"),
            rebuild_fix(),
        ))
    }
}

/// Hidden `halo` subcommand that runs [`probe_here`] and prints its check as JSON.
pub const PROBE_SUBCOMMAND: &str = "doctor-plugin-probe";

/// Loads the library and drives it as RCCL's loader would, in a child `halo` process whose
/// environment is the judged one: the plugin reads NCCL_IB_HCA, NCCL_IB_GID_INDEX and its
/// HALO_* settings from the process environment, so `--env-file` must reach it.
pub struct LoadingProbe;

/// Variables that configure RCCL, the plugin or ROCm: taken from the judged environment only.
fn is_job_variable(key: &str) -> bool {
    ["NCCL_", "RCCL_", "HALO_", "HSA_", "HIP_", "ROCR_"]
        .iter()
        .any(|p| key.starts_with(p))
}

impl PluginProbe for LoadingProbe {
    fn probe(&self, path: &Path, shown: &str, env: &BTreeMap<String, String>) -> Check {
        if let Some(bad) = elf_check(path, shown) {
            return bad;
        }
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                return Check::fail(
                    CHECK_ID,
                    CHECK_TITLE,
                    format!("{shown}: cannot find the halo executable to load it in: {e}"),
                    rebuild_fix(),
                )
            }
        };
        let mut cmd = Command::new(exe);
        cmd.arg(PROBE_SUBCOMMAND).arg(path).arg(shown);
        for (k, _) in std::env::vars_os() {
            if is_job_variable(&k.to_string_lossy()) {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().filter(|(k, _)| is_job_variable(k)));
        if let Some(ld) = env.get("LD_LIBRARY_PATH") {
            cmd.env("LD_LIBRARY_PATH", ld);
        }
        match run_bounded(&mut cmd, Duration::from_secs(60)) {
            Ok(out) => serde_json::from_str(&out.stdout).unwrap_or_else(|_| {
                Check::fail(
                    CHECK_ID,
                    CHECK_TITLE,
                    format!(
                        "{shown}: loading it ended the probe process ({}): {}",
                        out.code
                            .map_or("killed by a signal".to_string(), |c| format!(
                                "exit status {c}"
                            )),
                        out.stderr
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("no output")
                            .trim()
                    ),
                    rebuild_fix(),
                )
            }),
            Err(e) => Check::fail(
                CHECK_ID,
                CHECK_TITLE,
                format!("{shown}: {e:#}"),
                rebuild_fix(),
            ),
        }
    }
}

/// The loading probe itself, in this process and its environment.
pub fn probe_here(path: &Path, shown: &str) -> Check {
    if let Some(bad) = elf_check(path, shown) {
        return bad;
    }
    match super::plugin_load::load_and_init(path) {
        Ok(r) if r.missing.is_empty() && r.devices.is_empty() => Check::fail(
            CHECK_ID,
            CHECK_TITLE,
            format!("{shown}: loads, exports {}, but init reports no device: {}", abi_versions(), r.init_error.unwrap_or_default()),
            "fix the RDMA checks above (device ACTIVE, RoCE v2 GID); NCCL_IB_HCA / NCCL_IB_GID_INDEX must match a usable port",
        ),
        Ok(r) if r.missing.is_empty() => Check::pass(
            CHECK_ID,
            CHECK_TITLE,
            format!("{shown}: exports {}, init ok, {}", abi_versions(), r.devices.join("; ")),
        ),
        Ok(r) => Check::fail(
            CHECK_ID,
            CHECK_TITLE,
            format!("{shown}: does not export {} (not a halo build of this version?)", r.missing.join(", ")),
            rebuild_fix(),
        ),
        Err(e) => Check::fail(CHECK_ID, CHECK_TITLE, format!("{shown}: {e}"), rebuild_fix()),
    }
}

fn rebuild_fix() -> String {
    format!(
        "cargo build --release -p rccl-net-plugin && sudo install -D target/release/librccl_net_plugin.so {DEFAULT_PLUGIN_PATH}"
    )
}

/// Paths (as the inspected node names them) where the plugin may be, in search order.
pub fn candidates(opts: &DoctorOptions) -> Vec<String> {
    if let Some(p) = &opts.plugin {
        return vec![p.to_string_lossy().into_owned()];
    }
    let mut out = Vec::new();
    if let Some(p) = opts.env.get("NCCL_NET_PLUGIN") {
        if p.contains('/') && is_halo_plugin(p) {
            out.push(p.clone());
        }
    }
    let ld = opts
        .env
        .get("LD_LIBRARY_PATH")
        .map(String::as_str)
        .unwrap_or("");
    let dirs = ld.split(':').filter(|d| !d.is_empty()).chain(SEARCH_DIRS);
    for path in dirs.map(|d| format!("{}/{PLUGIN_FILE}", d.trim_end_matches('/'))) {
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

pub fn check(opts: &DoctorOptions, probe: &dyn PluginProbe) -> Check {
    let paths = candidates(opts);
    let found = paths.iter().find_map(|shown| {
        let local: PathBuf = if Path::new(shown).is_absolute() {
            opts.root.path(shown)
        } else {
            PathBuf::from(shown)
        };
        local.is_file().then(|| (local, shown.clone()))
    });
    match found {
        Some((local, shown)) => probe.probe(&local, &shown, &opts.env),
        None => Check::fail(
            CHECK_ID,
            CHECK_TITLE,
            format!("plugin library not found at {}", paths.join(", ")),
            rebuild_fix(),
        ),
    }
}
