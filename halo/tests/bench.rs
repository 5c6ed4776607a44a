//! `halo bench` end to end on loopback: a real `--listen` peer process, the TCP path measured
//! through its control port, the table, `--json` and the plot files. (The RDMA rows run in the
//! two Soft-RoCE guests from scripts/test.sh.)

use serde_json::Value;
use std::process::{Command, Stdio};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Listener(std::process::Child);
impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listen(port: u16) -> Listener {
    let child = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["bench", "--listen", &format!("127.0.0.1:{port}")])
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
