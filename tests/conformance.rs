//! Conformance of the built plugin `.so` through its exported tables, driven like RCCL's proxy:
//! seeded random traffic for every ABI version via `examples/conformance` (with the eager path on
//! for v6, v8, v10 and v12), one run with 64 MiB messages, several QPs per connection, stray
//! connections to a listener, and fault cases (garbage handle, handle to a closed listener, bad
//! environment value, peer killed mid-transfer) with their error codes and time bounds.
//!
//! Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1` makes a missing device a failure. Under `cargo test` the example and the
//! plugin are built on demand; run directly (in the guest), they must be built already:
//! `cargo build -p rccl-net-plugin && cargo build -p halo-rdma --examples`.
//! The two-guest run is documented at the top of `examples/conformance.rs`.

mod common;

use halo_ffi::*;
use halo_harness::artifacts;
use halo_harness::driver::Plugin;
use halo_harness::log::stderr_logger;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

struct Paths {
    example: PathBuf,
    plugin: PathBuf,
}

/// The device check and the two built artifacts, or `None` to skip.
fn setup(test: &str) -> Option<Paths> {
    if !common::have_rdma_device(&format!("conformance::{test}")) {
        return None;
    }
    let example = artifacts::example("conformance");
    let plugin = artifacts::plugin_library();
    Some(Paths { example, plugin })
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs the example with a hard deadline, capturing its output.
fn run_example(p: &Paths, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let t0 = Instant::now();
    let mut child = Command::new(&p.example)
        .arg("--plugin")
        .arg(&p.plugin)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the conformance example");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("conformance {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed: t0.elapsed(),
    };
    eprintln!(
        "$ conformance {} -> {} in {:.2?}\n{}",
        args.join(" "),
        run.status,
        run.elapsed,
        run.stdout.trim_end()
    );
    run
}

/// Only the plugin's warnings and our own lines: info logs are too long for a test report.
fn warnings(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("[log 3]") && !l.starts_with("[log 5]"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_pass(run: &Run) {
    assert!(
        run.status.success() && run.stdout.contains("CONFORMANCE PASS"),
        "conformance failed ({}):\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
}

#[test]
fn random_traffic_through_every_table_version() {
    let Some(p) = setup("random_traffic_through_every_table_version") else {
        return;
    };
    for v in halo_harness::driver::VERSIONS {
        let run = run_example(
            &p,
            &[
                "--version",
                &v.to_string(),
                "--role",
                "both",
                "--messages",
                "200",
                "--max-size",
                "1048576",
                "--seed",
                &(1000 + v).to_string(),
            ],
            // The eager path (off by default) gets the same random traffic in half the runs; two
            // runs go without inline writes (on by default), one with eager sends, one without.
            &[
                ("HALO_EAGER_MAX", if v % 2 == 0 { "8192" } else { "0" }),
                (
                    "NCCL_IB_USE_INLINE",
                    if matches!(v, 6 | 11) { "0" } else { "1" },
                ),
            ],
            Duration::from_secs(300),
        );
        assert_pass(&run);
        assert_eq!(
            run.stderr.contains(" B inline"),
            !matches!(v, 6 | 11),
            "v{v}: inline room on the queue pairs does not follow NCCL_IB_USE_INLINE:\n{}",
            run.stderr
        );
    }
}

#[test]
fn large_messages_v10() {
    let Some(p) = setup("large_messages_v10") else {
        return;
    };
    let run = run_example(
        &p,
        &[
            "--version",
            "10",
            "--role",
            "both",
            "--messages",
            "4",
            "--max-size",
            &(64usize << 20).to_string(),
            "--seed",
            "64",
        ],
        &[],
        Duration::from_secs(600),
    );
    assert_pass(&run);
}

#[test]
fn several_queue_pairs_per_connection() {
    let Some(p) = setup("several_queue_pairs_per_connection") else {
        return;
    };
    // Split every large message over 4 QPs, then whole large rows over 3 QPs in turn.
    for (qps, split) in [("4", "1"), ("3", "0")] {
        let run = run_example(
            &p,
            &[
                "--version",
                "10",
                "--role",
                "both",
                "--messages",
                "120",
                "--max-size",
                &(4usize << 20).to_string(),
                "--seed",
                &format!("4{qps}{split}"),
            ],
            &[
                ("NCCL_IB_QPS_PER_CONNECTION", qps),
                ("NCCL_IB_SPLIT_DATA_ON_QPS", split),
            ],
            Duration::from_secs(600),
        );
        assert_pass(&run);
        let extra = format!("(+{} data QPs)", qps.parse::<u32>().unwrap() - 1);
        assert!(
            run.stderr.contains(&extra),
            "the connection did not use {qps} QPs:\n{}",
            run.stderr
        );
    }
}

/// The plugin loaded into this process, the way the core loads it.
fn load_v10(p: &Paths) -> Plugin {
    let mut plugin = Plugin::load(&p.plugin, 10).expect("load the plugin");
    plugin.init(stderr_logger(), 0).expect("init");
    assert!(plugin.devices().expect("devices") >= 1);
    plugin
}

#[test]
fn garbage_handle_is_an_invalid_argument() {
    let Some(p) = setup("garbage_handle_is_an_invalid_argument") else {
        return;
    };
    let plugin = load_v10(&p);
    let mut state: u64 = 0x1234_5678_9abc_def1;
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    for b in handle.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
    let t0 = Instant::now();
    let err = loop {
        match plugin.connect(0, &mut handle) {
            Ok(c) if c.is_null() => assert!(
                t0.elapsed() < Duration::from_secs(2),
                "connect with a garbage handle still pending after 2 s"
            ),
            Ok(_) => panic!("connect with a garbage handle returned a comm"),
            Err(e) => break e,
        }
    };
    eprintln!("garbage handle: {err} after {:?}", t0.elapsed());
    assert_eq!(err.code, ncclInvalidArgument, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn handle_to_a_closed_listener_fails_quickly() {
    let Some(p) = setup("handle_to_a_closed_listener_fails_quickly") else {
        return;
    };
    let plugin = load_v10(&p);
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let listen = plugin.listen(0, &mut handle).expect("listen");
    plugin.close_listen(listen).expect("closeListen");
    let t0 = Instant::now();
    let bound = Duration::from_secs(10);
    let err = loop {
        match plugin.connect(0, &mut handle) {
            Ok(c) if c.is_null() => {
                assert!(
                    t0.elapsed() < bound,
                    "connect to a closed listener still pending after {bound:?}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) => panic!("connect to a closed listener returned a comm"),
            Err(e) => break e,
        }
    };
    eprintln!("closed listener: {err} after {:?}", t0.elapsed());
    assert!(
        err.code == ncclRemoteError || err.code == ncclSystemError,
        "{err}"
    );
}

#[test]
fn stray_connections_do_not_hold_up_the_peer() {
    let Some(p) = setup("stray_connections_do_not_hold_up_the_peer") else {
        return;
    };
    use std::io::Write;
    let plugin = load_v10(&p);
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let listen = plugin.listen(0, &mut handle).expect("listen");
    let addr = rccl_net_plugin::oob::ListenHandle::decode(&handle)
        .expect("our own handle")
        .addr;
    // One connection that never says anything, one that sends garbage, one that hangs up.
    let _silent = std::net::TcpStream::connect(addr).expect("silent connection");
    let mut garbage = std::net::TcpStream::connect(addr).expect("garbage connection");
    garbage.write_all(&[0x5a; 300]).expect("write garbage");
    drop(std::net::TcpStream::connect(addr).expect("short connection"));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (mut send, mut recv) = (None, None);
    while send.is_none() || recv.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the real peer was held up by stray connections"
        );
        if send.is_none() {
            let c = plugin.connect(0, &mut handle).expect("connect");
            send = (!c.is_null()).then_some(c);
        }
        if recv.is_none() {
            let c = plugin
                .accept(listen)
                .expect("accept despite stray connections");
            recv = (!c.is_null()).then_some(c);
        }
    }
    eprintln!("connected past 3 stray connections in {:?}", t0.elapsed());
    plugin.close_send(send.unwrap()).expect("closeSend");
    plugin.close_recv(recv.unwrap()).expect("closeRecv");
    plugin.close_listen(listen).expect("closeListen");
}

#[test]
fn bad_environment_value_fails_init() {
    let Some(p) = setup("bad_environment_value_fails_init") else {
        return;
    };
    let run = run_example(
        &p,
        &[
            "--version",
            "8",
            "--role",
            "both",
            "--messages",
            "1",
            "--max-size",
            "1",
            "--seed",
            "1",
        ],
        &[("NCCL_IB_TIMEOUT", "abc")],
        Duration::from_secs(60),
    );
    eprintln!("{}", warnings(&run.stderr));
    assert!(!run.status.success(), "init accepted NCCL_IB_TIMEOUT=abc");
    assert!(
        run.stderr
            .contains("plugin init failed: init returned 4 (ncclInvalidArgument)"),
        "init did not fail with ncclInvalidArgument:\n{}",
        run.stderr
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("[log") && l.contains("NCCL_IB_TIMEOUT")),
        "no plugin log line names NCCL_IB_TIMEOUT:\n{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(10),
        "init took {:?} to reject the value",
        run.elapsed
    );
}

#[test]
fn peer_killed_mid_transfer_fails_the_sender() {
    let Some(p) = setup("peer_killed_mid_transfer_fails_the_sender") else {
        return;
    };
    let bound_ms: u128 = 30_000;
    let run = run_example(
        &p,
        &[
            "--version",
            "10",
            "--role",
            "both",
            "--messages",
            "2000",
            "--max-size",
            "262144",
            "--seed",
            "9",
            "--kill-peer-after",
            "24",
            "--timeout",
            "60",
        ],
        &[("NCCL_IB_TIMEOUT", "16"), ("NCCL_IB_RETRY_CNT", "3")],
        Duration::from_secs(120),
    );
    eprintln!("{}", warnings(&run.stderr));
    assert_eq!(
        run.status.code(),
        Some(3),
        "the sender did not see the expected error after the kill:\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("ms after the kill"))
        .expect("a PEER-KILL report line");
    let ms: u128 = line
        .split(" ms after the kill")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("elapsed ms in the report");
    assert!(
        ms < bound_ms,
        "the error took {ms} ms after the kill (bound {bound_ms} ms)"
    );
}
