//! Build products the tests run or load: the plugin library and the root package's examples.
//!
//! Under `cargo test` (the `CARGO` variable is set) each one is brought up to date once per
//! process with `cargo build`, in the same target directory and profile as the running test, so
//! no prior build step is needed. Run directly (the Soft-RoCE guest runs test executables built
//! on the host), the files must already exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// `target/<profile>/` of the running executable, which lies in `target/<profile>/deps/` (tests)
/// or `target/<profile>/examples/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the executable lies in target/<profile>/deps or target/<profile>/examples")
        .to_path_buf()
}

const PLUGIN_FILE: &str = "librccl_net_plugin.so";

/// Where the plugin library of this build lies (`target/<profile>/librccl_net_plugin.so`), if it
/// has been built; for examples, which take it from next to themselves by default.
pub fn plugin_library_if_built() -> Option<PathBuf> {
    Some(profile_dir().join(PLUGIN_FILE)).filter(|p| p.is_file())
}

/// The plugin library, `target/<profile>/librccl_net_plugin.so`.
pub fn plugin_library() -> PathBuf {
    built(PLUGIN_FILE, &["-p", "rccl-net-plugin", "--lib"])
}

/// An example of the root package, `target/<profile>/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    built(
        &format!("examples/{name}"),
        &["-p", "halo-rdma", "--example", name],
    )
}

/// `rel` below the profile directory, built by `cargo build <args>` first when running under
/// cargo; panics with the reason when it cannot be had.
fn built(rel: &str, args: &[&str]) -> PathBuf {
    static DONE: Mutex<BTreeMap<String, Result<(), String>>> = Mutex::new(BTreeMap::new());
    let path = profile_dir().join(rel);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let result = done
        .entry(rel.to_string())
        .or_insert_with(|| match std::env::var_os("CARGO") {
            Some(cargo) => cargo_build(Path::new(&cargo), args),
            None if path.exists() => Ok(()),
            None => Err(format!(
                "not built, and not running under cargo to build it: cargo build {}",
                args.join(" ")
            )),
        });
    if let Err(e) = result {
        panic!("{}: {e}", path.display());
    }
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

fn cargo_build(cargo: &Path, args: &[&str]) -> Result<(), String> {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name");
    let profile = if profile == "debug" { "dev" } else { profile };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--profile", profile])
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cargo.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
