//! Runs the `allreduce` example (N processes, ring all-reduce through the plugin) for 2 and 4
//! ranks with small sizes and checks its table: every size present, no wrong element. Needs an
//! RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1` makes a missing device a failure. Under `cargo test` the example is built
//! on demand; run directly (in the guest), it must be built already (`cargo build --examples`).

mod common;

use std::process::Command;
use std::sync::Mutex;

/// One data row of the table: (size in bytes, #wrong).
fn parse_table(out: &str) -> Vec<(usize, usize)> {
    out.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 8, "unexpected table row {l:?}");
            assert_eq!(
                (f[2], f[3]),
                ("float", "sum"),
                "unexpected type/redop in {l:?}"
            );
            let size: usize = f[0].parse().unwrap_or_else(|_| panic!("bad size in {l:?}"));
            let count: usize = f[1]
                .parse()
                .unwrap_or_else(|_| panic!("bad count in {l:?}"));
            assert_eq!(count * 4, size, "count does not match size in {l:?}");
            let num = |v: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .unwrap_or_else(|| panic!("bad number {v:?} in {l:?}"))
            };
            // Bandwidths may print as 0 at the table's precision on a slow emulated link.
            assert!(num(f[4]) > 0.0, "zero time in {l:?}");
            num(f[5]);
            num(f[6]);
            (
                size,
                f[7].parse()
                    .unwrap_or_else(|_| panic!("bad #wrong in {l:?}")),
            )
        })
        .collect()
}

/// The runs busy-poll; side by side they would share the guest's two vCPUs among six processes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(ranks: usize) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // the example loads the plugin built next to it
    halo_harness::artifacts::plugin_library();
    let out = Command::new(halo_harness::artifacts::example("allreduce"))
        .args([
            "--ranks",
            &ranks.to_string(),
            "--min-bytes",
            "4K",
            "--max-bytes",
            "1M",
            "--iters",
            "2",
            "--timeout",
            "400",
        ])
        .output()
        .expect("start the allreduce example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- allreduce --ranks {ranks} stdout ---\n{stdout}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "allreduce --ranks {ranks} failed: {}",
        out.status
    );
    let rows = parse_table(&stdout);
    let expected: Vec<usize> = (12..=20).map(|s| 1usize << s).collect();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        expected,
        "table does not cover 4 KiB .. 1 MiB"
    );
    for (size, wrong) in rows {
        assert_eq!(
            wrong, 0,
            "{ranks} ranks, {size} bytes: {wrong} wrong elements"
        );
    }
}

#[test]
fn ring_allreduce_two_ranks() {
    if common::have_rdma_device("allreduce") {
        run(2);
    }
}

#[test]
fn ring_allreduce_four_ranks() {
    if common::have_rdma_device("allreduce") {
        run(4);
    }
}
