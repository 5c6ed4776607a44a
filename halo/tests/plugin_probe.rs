//! `halo doctor` loading the real plugin library on the running system: its exports, `init`
//! and devices. With an RDMA device (the Soft-RoCE guest) the check passes and names the device;
//! without one it fails with the plugin's own reason. A library that is not the plugin fails
//! with the missing symbols.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// The plugin library of this build (`target/<profile>/librccl_net_plugin.so`), built first.
fn plugin_so() -> PathBuf {
    halo_harness::artifacts::plugin_library()
}

fn plugin_check(lib: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["doctor", "--json", "--plugin", lib])
        .env_remove("NCCL_IB_HCA")
        .output()
        .expect("run halo doctor");
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --json output");
    report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["id"] == "plugin.library")
        .cloned()
        .expect("a plugin.library check")
}

fn have_device() -> bool {
    std::path::Path::new("/dev/infiniband/uverbs0").exists()
}

#[test]
fn doctor_loads_the_plugin_and_reports_its_devices() {
    let so = plugin_so();
    let c = plugin_check(so.to_str().unwrap());
    eprintln!("{c}");
    let value = c["value"].as_str().unwrap();
    assert!(value.contains("exports v6..v12"), "{value}");
    if have_device() {
        assert_eq!(c["verdict"], "pass", "{c}");
        assert!(
            value.contains("init ok") && value.contains("device 0:"),
            "{value}"
        );
    } else {
        assert!(
            std::env::var("HALO_REQUIRE_RDMA").as_deref() != Ok("1"),
            "HALO_REQUIRE_RDMA=1 but no RDMA device is present"
        );
        assert_eq!(c["verdict"], "fail", "{c}");
        assert!(
            value.contains("init reports no device") && value.contains("NET/halo"),
            "{value}"
        );
    }
}

#[test]
fn doctor_rejects_a_library_that_is_not_the_plugin() {
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("a libc.so.6 to load");
    let c = plugin_check(libc);
    assert_eq!(c["verdict"], "fail", "{c}");
    assert!(
        c["value"]
            .as_str()
            .unwrap()
            .contains("does not export ncclNetPlugin_v6"),
        "{c}"
    );
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("cargo build --release -p rccl-net-plugin"),
        "{c}"
    );
}

/// The plugin check of `halo doctor --env-file FILE` run with `process_env` set.
fn plugin_check_with(lib: &str, env_file_text: &str, process_env: &[(&str, &str)]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("job.env");
    std::fs::write(&env_file, env_file_text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo"));
    cmd.args(["doctor", "--json", "--plugin", lib, "--env-file"])
        .arg(&env_file)
        .env_remove("NCCL_IB_HCA");
    for (k, v) in process_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run halo doctor");
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --json output");
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "plugin.library")
        .cloned()
        .unwrap()
}

#[test]
fn the_loaded_plugin_sees_the_env_file_not_the_process_environment() {
    let so = plugin_so();
    let lib = so.to_str().unwrap();
    // A malformed NCCL_IB_HCA in the job's environment makes the plugin's init refuse it …
    let c = plugin_check_with(lib, "NCCL_IB_HCA=mlx5_0:0\n", &[]);
    eprintln!("{c}");
    assert_eq!(c["verdict"], "fail", "{c}");
    assert!(c["value"].as_str().unwrap().contains("NCCL_IB_HCA"), "{c}");
    // … and the same value in the doctor's own environment does not reach it.
    let c = plugin_check_with(lib, "NCCL_DEBUG=WARN\n", &[("NCCL_IB_HCA", "mlx5_0:0")]);
    eprintln!("{c}");
    assert!(!c["value"].as_str().unwrap().contains("NCCL_IB_HCA"), "{c}");
    if have_device() {
        assert_eq!(c["verdict"], "pass", "{c}");
    }
}
