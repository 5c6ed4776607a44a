//! The `netbench` example end to end: a quick run of every suite must report positive latencies
//! and bandwidths for every size and exact all-reduce results (the decode rows' too), and a quick perftest comparison
//! must yield ratios and packet counts. Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says
//! so and skips, unless `HALO_REQUIRE_RDMA=1` makes a missing device a failure. Under `cargo test`
//! the example is built on demand; run directly (in the guest), the example and the plugin must be
//! built already: `cargo build -p rccl-net-plugin && cargo build -p halo-rdma --examples`.

mod common;

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One run at a time: the packet counts are the device's, and would count a concurrent run's
/// traffic too.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs netbench with `args` and parses its JSON report.
fn run(args: &[&str]) -> Value {
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    // the example loads the plugin built next to it
    halo_harness::artifacts::plugin_library();
    let mut child = Command::new(halo_harness::artifacts::example("netbench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start netbench");
    let limit = Duration::from_secs(600);
    let t0 = Instant::now();
    while child.try_wait().expect("wait for netbench").is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("netbench {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("netbench output");
    assert!(
        out.status.success(),
        "netbench {args:?} failed: {}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "netbench {args:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn rows<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    let r = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array"));
    assert!(!r.is_empty(), "{key} has no rows");
    r
}

fn positive(row: &Value, key: &str) -> f64 {
    let x = row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {row}"));
    assert!(x > 0.0, "{key} is {x} in {row}");
    x
}

#[test]
fn quick_run_reports_every_suite() {
    if !common::have_rdma_device("netbench") {
        return;
    }
    let v = run(&["--quick", "--json"]);
    for r in rows(&v, "latency") {
        for k in ["typical_us", "avg_us", "p99_us"] {
            positive(r, k);
        }
    }
    for key in ["bandwidth", "msgrate"] {
        for r in rows(&v, key) {
            for k in ["mb_per_s", "gbps", "msgs_per_s"] {
                positive(r, k);
            }
        }
    }
    let tables = rows(&v, "allreduce");
    let ranks: Vec<u64> = tables.iter().filter_map(|t| t["ranks"].as_u64()).collect();
    assert_eq!(ranks, [2, 4]);
    for t in tables {
        for r in rows(t, "rows") {
            positive(r, "busbw");
            assert_eq!(r["wrong"].as_u64(), Some(0), "wrong elements in {r}");
        }
    }
    check_decode(&v);
    for r in rows(&v, "scaling") {
        positive(r, "setup_ms");
    }
}

/// Both decode shapes (8 KiB x 64 and 16 KiB x 160 all-reduces per step), timed and exact, once
/// with each exchange posting its own receive and once with the receives posted ahead.
fn check_decode(v: &Value) {
    for (key, ahead) in [("decode", false), ("decode_ahead", true)] {
        check_decode_rows(rows(v, key), ahead);
    }
}

fn check_decode_rows(d: &[Value], ahead: bool) {
    let shapes: Vec<(u64, u64)> = d
        .iter()
        .filter_map(|r| Some((r["size"].as_u64()?, r["allreduces"].as_u64()?)))
        .collect();
    assert_eq!(shapes, [(8192, 64), (16384, 160)]);
    for r in d {
        for k in ["step_mean_us", "step_median_us", "allreduce_us"] {
            positive(r, k);
        }
        assert_eq!(r["wrong"].as_u64(), Some(0), "wrong elements in {r}");
        assert_eq!(r["receives_ahead"].as_bool(), Some(ahead), "{r}");
    }
}

#[test]
fn decode_suite_alone() {
    if !common::have_rdma_device("netbench") {
        return;
    }
    let v = run(&["--decode", "--quick", "--json"]);
    check_decode(&v);
    for key in ["latency", "bandwidth", "msgrate", "allreduce", "scaling"] {
        assert_eq!(v[key].as_array().map(Vec::len), Some(0), "{key} ran");
    }
}

#[test]
fn perftest_comparison_yields_ratios() {
    if !common::have_rdma_device("netbench") {
        return;
    }
    let v = run(&[
        "--quick",
        "--json",
        "--compare-perftest",
        "--latency",
        "--bandwidth",
    ]);
    for key in ["latency", "bandwidth"] {
        for r in rows(&v, key) {
            positive(r, "ratio");
        }
    }
    // Packets on the wire per message, from rxe's counters: ib_write_lat sends the data and
    // gets its acknowledgement; the plugin adds the clear-to-send write and its acknowledgement
    // (a little less in a short run: the first receives' rows go out before the timed loop).
    let lat8 = rows(&v, "latency")
        .iter()
        .find(|r| r["size"] == 8)
        .expect("an 8-byte latency row");
    let pt = lat8["perftest"]["wire_pkts"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perftest packet count in {lat8}"));
    assert!(
        (pt - 2.0).abs() < 0.05,
        "ib_write_lat: {pt} packets per message"
    );
    let ours = positive(lat8, "wire_pkts");
    assert!(
        (3.0..=4.5).contains(&ours),
        "plugin: {ours} packets per message"
    );
    for r in rows(&v, "bandwidth") {
        // At least one packet per message, and rxe's 4 KiB MTU splits a 64 KiB write in 16.
        let n = positive(r, "wire_pkts");
        let size = r["size"].as_f64().unwrap();
        assert!(n >= size / 4096.0, "{n} packets per {size}-byte message");
    }
}

/// A driver whose plugin cannot start still releases the server that waits for it: in a
/// comparison across two hosts the next run must meet the next server, not this one.
#[test]
fn a_driver_that_cannot_start_releases_its_server() {
    if !common::have_rdma_device("netbench") {
        return;
    }
    let _device = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    halo_harness::artifacts::plugin_library();
    let netbench = halo_harness::artifacts::example("netbench");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(&netbench)
        .args(["--server", &addr, "--timeout", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the server");
    let driver = Command::new(&netbench)
        .args(["--plugin", "/nonexistent/libnone.so", "--connect", &addr])
        .args(["--latency", "--timeout", "60"])
        .output()
        .expect("run the driver");
    let err = String::from_utf8_lossy(&driver.stderr);
    assert!(!driver.status.success(), "the driver succeeded: {err}");
    assert!(
        err.contains("libnone.so"),
        "no word of the missing plugin: {err}"
    );
    assert!(
        err.contains(&format!("told the server at {addr} to quit")),
        "{err}"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().expect("wait for the server") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = server.kill();
            let _ = server.wait();
            panic!("the server did not quit within 30 s of the driver's release");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the server exited with {status}");
}
