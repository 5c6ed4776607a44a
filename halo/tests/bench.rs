//! `halo bench` end to end on loopback: a real `--listen` peer process (started by hand, or over
//! a real sshd from a cluster.toml), the TCP path measured through its control port, the table,
//! `--json` and the plot files; and the first-use traps, each with the outcome it used to have:
//! a wrong `--plot` refused only after the run, a silent wait for the listener, a missing device
//! retried silently for 20 s, a failed perftest row that left the plugin row reading
//! `unexpected answer "EXIT 1"`. (The real RDMA rows run in the two Soft-RoCE guests from
//! scripts/test.sh.)

mod common;

use common::free_port;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Listener(std::process::Child);
impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listen(port: u16) -> Listener {
    listen_with(port, &[], &[])
}

fn listen_with(port: u16, args: &[&str], env: &[(&str, &str)]) -> Listener {
    let child = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["bench", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start halo bench --listen");
    Listener(child)
}

#[test]
fn bench_measures_tcp_against_a_listening_peer_and_plots() {
    let port = free_port();
    let listener = listen(port);
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bench.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args([
            "bench",
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--streams",
            "2",
            "--json",
            "--plot",
        ])
        .arg(&svg)
        .output()
        .expect("run halo bench");
    assert!(
        out.status.success(),
        "halo bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let tcp = &report["summary"][0];
    assert_eq!(tcp["path"], "TCP");
    assert!(tcp["latency_us"].as_f64().unwrap() > 0.0, "{report}");
    assert!(tcp["gbps"].as_f64().unwrap() > 0.0, "{report}");
    assert!(tcp["error"].is_null(), "{report}");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("<polyline") && plot.contains("TCP"), "{plot}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[1/2]") && stderr.contains("[2/2]"),
        "progress lines: {stderr}"
    );
    drop(listener);
}

#[test]
fn bench_png_plot_and_table_output() {
    let port = free_port();
    let _listener = listen(port);
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("bench.png");
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args([
            "bench",
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--streams",
            "1",
            "--plot",
        ])
        .arg(&png)
        .output()
        .expect("run halo bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("path") && stdout.contains("latency") && stdout.contains("bandwidth"),
        "{stdout}"
    );
    let bytes = std::fs::read(&png)
        .expect("PNG written (needs rsvg-convert from scripts/setup-harness.sh)");
    assert!(
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG"),
        "not a PNG of substance"
    );
}

#[test]
fn bench_without_a_listener_says_how_to_start_one() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args([
            "bench",
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--connect-wait",
            "1",
        ])
        .output()
        .expect("run halo bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("halo bench --listen"), "{err}");
}

fn halo_bench(args: &[&str], env: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .arg("bench")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run halo bench");
    (out, t0.elapsed())
}

/// Was: the whole run (and its 30 s wait for a listener) happened first, then "--plot takes a
/// .svg or .png file name".
#[test]
fn a_wrong_plot_extension_is_refused_before_anything_runs() {
    let port = free_port();
    let (out, took) = halo_bench(
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--plot",
            "bench.jpg",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--plot takes a .svg or .png file name"),
        "{err}"
    );
    assert!(
        !err.contains("waiting for"),
        "it tried the peer first: {err}"
    );
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
}

/// Was: 30 s without a word, then the error.
#[test]
fn waiting_for_the_listener_is_said() {
    let port = free_port();
    let (out, _) = halo_bench(
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--connect-wait",
            "2",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let wait_line = err
        .find(&format!(
            "waiting for `halo bench --listen` at 127.0.0.1:{port}"
        ))
        .unwrap_or_else(|| panic!("no progress line while waiting: {err}"));
    let final_error = err.find("halo: error").expect("an error at the end");
    assert!(wait_line < final_error, "{err}");
}

/// Was: TCP rows first, then perftest retried for 20 s without a word and failed with whatever
/// its last try printed.
#[test]
fn a_missing_rdma_device_is_named_before_anything_runs() {
    let port = free_port();
    let _listener = listen(port);
    let (out, took) = halo_bench(
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--ibdev",
            "halonodev0",
            "--gid-index",
            "1",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("RDMA device halonodev0 not found"), "{err}");
    assert!(!err.contains("[1/"), "it measured before refusing: {err}");
    assert!(
        took < Duration::from_secs(10),
        "refused only after {took:?}"
    );
}

/// A /sys tree with rxe0 and its RoCE v2 GID 1, for the RDMA rows' argument checks.
fn fake_sysfs(root: &Path) {
    let base = root.join("sys/class/infiniband/rxe0/ports/1");
    fs::create_dir_all(base.join("gids")).unwrap();
    fs::create_dir_all(base.join("gid_attrs/types")).unwrap();
    fs::write(
        base.join("gids/1"),
        "0000:0000:0000:0000:0000:ffff:7f00:0001",
    )
    .unwrap();
    fs::write(base.join("gid_attrs/types/1"), "RoCE v2").unwrap();
}

/// perftest stand-ins that fail the way a mismatched GID makes them fail.
fn failing_perftest(dir: &Path) -> String {
    for name in ["ib_write_lat", "ib_write_bw"] {
        let p = dir.join(name);
        fs::write(
            &p,
            "#!/bin/sh\necho ' Failed to modify QP 1234 to RTR' >&2\necho ' Unable to Connect the other side of the HCA' >&2\nexit 1\n",
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Was: the perftest row failed after 20 s of retries and left the peer's `EXIT 1` unread, so
/// the plugin row then showed `error: unexpected answer "EXIT 1"` instead of its own error.
#[test]
fn a_failed_perftest_row_reports_perftest_and_the_plugin_row_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    fake_sysfs(dir.path());
    let bin = dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let path = failing_perftest(&bin);
    let root = dir.path().to_str().unwrap();
    let plugin = halo_harness::artifacts::plugin_library();
    let plugin = plugin.to_str().unwrap();
    let port = free_port();
    let _listener = listen_with(
        port,
        &["--root", root, "--plugin", plugin],
        &[("PATH", &path)],
    );
    let (out, took) = halo_bench(
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--quick",
            "--streams",
            "2",
            "--ibdev",
            "rxe0",
            "--gid-index",
            "1",
            "--plugin",
            plugin,
            "--root",
            root,
            "--json",
        ],
        &[("PATH", &path), ("NCCL_IB_HCA", "=halonodev0")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "failed rows must fail the run: {err}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let by_path = |p: &str| {
        report["summary"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["path"] == p)
            .unwrap_or_else(|| panic!("no {p} row: {report}"))
            .clone()
    };
    assert!(by_path("TCP")["error"].is_null(), "{report}");
    let perftest = by_path("RDMA (perftest)");
    let perr = perftest["error"].as_str().expect("perftest row error");
    assert!(perr.contains("Failed to modify QP 1234 to RTR"), "{perr}");
    assert!(
        perftest["latency_us"].is_null() && perftest["gbps"].is_null(),
        "{perftest}"
    );
    let plugin_row = by_path("RDMA (halo plugin)");
    let plerr = plugin_row["error"].as_str().expect("plugin row error");
    assert!(
        !plerr.contains("EXIT") && !plerr.contains("unexpected answer"),
        "the plugin row read the perftest server's answer: {plerr}"
    );
    assert!(plerr.contains("init"), "the plugin's own error: {plerr}");
    assert!(
        err.contains("halo bench: RDMA (perftest): "),
        "said when it happened: {err}"
    );
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} (silent retries?)"
    );
}

/// The cluster.toml path: `halo bench` alone starts the peer's listener over SSH (a real sshd on
/// 127.0.0.1), measures and ends it.
#[test]
fn with_a_cluster_config_the_peer_is_started_over_ssh() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sshd) = common::sshd_if_installed(dir.path()) else {
        println!("SKIPPED: /usr/sbin/sshd missing (scripts/setup-harness.sh installs it)");
        return;
    };
    let bench_port = free_port();
    let config = write_cluster(dir.path(), &sshd, bench_port, env!("CARGO_BIN_EXE_halo"));
    let (out, _) = halo_bench_config(
        &config,
        &[
            "--no-perftest",
            "--no-plugin",
            "--quick",
            "--streams",
            "2",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["peer"], format!("127.0.0.1:{bench_port}"));
    assert!(
        report["summary"][0]["gbps"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        err.contains("starting the peer on 127.0.0.1: ssh "),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "[peer 127.0.0.1] halo bench: peer side listening on 127.0.0.1:{bench_port}"
        )),
        "{err}"
    );
    // The listener is gone once the run is over.
    std::thread::sleep(Duration::from_millis(500));
    assert!(std::net::TcpStream::connect(("127.0.0.1", bench_port)).is_err());

    // A peer that cannot start says why at once instead of a silent wait.
    let config = write_cluster(dir.path(), &sshd, free_port(), "/nonexistent/halo");
    let (out, took) = halo_bench_config(&config, &["--no-perftest", "--no-plugin", "--quick"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ended before answering") && err.contains("/nonexistent/halo"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}

fn write_cluster(dir: &Path, sshd: &common::Sshd, bench_port: u16, halo: &str) -> PathBuf {
    let config = dir.join("cluster.toml");
    fs::write(
        &config,
        format!(
            r#"[ray]
port = 6379
executable = "ray"
num_cpus = 1
num_gpus = 0
wait_secs = 10

[rccl]
plugin = "/nonexistent/librccl-net-halo.so"
gdr_level = "SYS"
ib_timeout = 20
ib_retry_cnt = 7

[ssh]
port = {port}
key = "{key}"
options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]

[bench]
halo = "{halo}"
port = {bench_port}

[[nodes]]
host = "head"
ip = "127.0.0.1"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1

[[nodes]]
host = "127.0.0.1"
ip = "127.0.0.1"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1
"#,
            port = sshd.port,
            key = sshd.client_key.display(),
        ),
    )
    .unwrap();
    config
}

fn halo_bench_config(config: &Path, args: &[&str]) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .arg("--config")
        .arg(config)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run halo bench");
    (out, t0.elapsed())
}
