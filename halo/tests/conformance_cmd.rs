//! `halo conformance` against the built halo plugin: every check named with its verdict, the
//! JSON report, the two-node mode (`--listen` / `--peer`, here two processes on one node), and a
//! library that is not a plugin. With an RDMA device (the Soft-RoCE guest runs this target) every
//! check must pass; without one the report must name the failed checks and exit 1.

mod common;

use common::free_port;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

fn have_rdma_device() -> bool {
    let found = std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some());
    if !found && std::env::var("HALO_REQUIRE_RDMA").as_deref() == Ok("1") {
        panic!("HALO_REQUIRE_RDMA=1 but no RDMA device");
    }
    found
}

fn conformance(plugin: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_halo"))
        .arg("conformance")
        .arg("--plugin")
        .arg(plugin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run halo conformance")
}

fn names_and_verdicts(report: &Value) -> Vec<(String, bool)> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["passed"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_check_is_named_with_its_verdict() {
    let plugin = halo_harness::artifacts::plugin_library();
    let device = have_rdma_device();
    let out = conformance(
        &plugin,
        &[
            "--version",
            "8",
            "--version",
            "12",
            "--messages",
            "60",
            "--max-size",
            "262144",
            "--large-size",
            "2097152",
            "--seed",
            "5",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let checks = names_and_verdicts(&report);
    let names: Vec<&str> = checks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "exports an ncclNet table (v6 … v12)",
            "v8: init, devices and their properties",
            "v8: random traffic, 60 messages of 0…262144 B",
            "v12: init, devices and their properties",
            "v12: random traffic, 60 messages of 0…262144 B",
            "v12: two 2097152 B messages in flight",
            "v12: receiver killed mid-transfer: the sender gets an error",
        ],
        "{report}"
    );
    assert!(checks[0].1, "the library exports its tables: {report}");
    if device {
        assert!(out.status.success(), "{report}\n{err}");
        assert!(checks.iter().all(|(_, ok)| *ok), "{report}");
        assert_eq!(report["passed"], true);
    } else {
        println!("no RDMA device: the checks past the exports must fail with the reason");
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(checks[1..].iter().all(|(_, ok)| !ok), "{report}");
        assert!(
            report["checks"][1]["detail"]
                .as_str()
                .unwrap()
                .contains("init"),
            "{report}"
        );
    }
    // The text report names the checks too.
    let text = conformance(
        &plugin,
        &[
            "--version",
            "10",
            "--messages",
            "20",
            "--max-size",
            "4096",
            "--large-size",
            "65536",
        ],
    );
    let table = String::from_utf8_lossy(&text.stdout);
    let verdict = if device { "PASS" } else { "FAIL" };
    assert!(
        table.contains(&format!(
            "{verdict}  v10: random traffic, 20 messages of 0…4096 B"
        )),
        "{table}"
    );
    assert!(table.contains("checks passed"), "{table}");
}

#[test]
fn receivers_on_a_peer_node() {
    let plugin = halo_harness::artifacts::plugin_library();
    let device = have_rdma_device();
    let port = free_port();
    let mut peer = Command::new(env!("CARGO_BIN_EXE_halo"))
        .arg("conformance")
        .arg("--plugin")
        .arg(&plugin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the peer side");
    let out = conformance(
        &plugin,
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--version",
            "10",
            "--messages",
            "40",
            "--max-size",
            "65536",
            "--large-size",
            "1048576",
            "--json",
        ],
    );
    let _ = peer.kill();
    let _ = peer.wait();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["peer"], format!("127.0.0.1:{port}"));
    let checks = names_and_verdicts(&report);
    // No kill check: it needs the receiver to be a local process.
    assert_eq!(checks.len(), 4, "{report}");
    if device {
        assert!(checks.iter().all(|(_, ok)| *ok), "{report}");
        let d = report["checks"][2]["detail"].as_str().unwrap();
        assert!(d.contains("receiver on the peer"), "{d}");
    } else {
        assert!(!checks[2].1, "{report}");
    }
}

#[test]
fn a_library_that_is_not_a_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("not-a-plugin.so");
    std::fs::write(&not_elf, "text").unwrap();
    let out = conformance(&not_elf, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot load") && err.contains("not-a-plugin.so"),
        "{err}"
    );
    let out = conformance(Path::new("/nonexistent/x.so"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}
