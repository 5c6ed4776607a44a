//! Printing a [`Report`]: text tables in perftest's and rccl-tests' spirit, or one JSON object.
//! Ratios are plugin / perftest: for latency lower is better, for bandwidth higher is better.

use super::{DecodeRow, Polls, Report, StreamRow};
use serde_json::{json, Value};
use std::fmt::Write;

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    match v {
        Some(x) => format!("{x:>width$.prec$}"),
        None => format!("{:>width$}", "-"),
    }
}

/// Calls per completed request: polls that found nothing, and NULL-request retries.
fn per_request(p: &Polls) -> (f64, f64) {
    let n = p.requests.max(1) as f64;
    (p.tests as f64 / n, (p.null_sends + p.null_recvs) as f64 / n)
}

/// The perftest bandwidth closest to `size` (all-reduce sizes need not be bandwidth sizes).
fn perftest_gbps_near(r: &Report, size: usize) -> Option<f64> {
    r.bandwidth
        .iter()
        .filter_map(|b| b.perftest.map(|p| (b.size.abs_diff(size), p.gbps)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, g)| g)
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# netbench: plugin {} ({}, ncclNet v{}), device {}{}",
        r.plugin_name,
        r.plugin.display(),
        r.version,
        r.device,
        if r.quick { ", quick" } else { "" }
    );
    if let Some(d) = &r.perftest_device {
        let _ = writeln!(
            s,
            "# reference: perftest on {} GID index {}",
            d.ibdev, d.gid_index
        );
    }
    if !r.latency.is_empty() {
        let _ = writeln!(s, "\n## latency (one-way = round trip / 2, us)");
        let _ = writeln!(
            s,
            "{:>9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "bytes",
            "iters",
            "typical",
            "average",
            "p99",
            "pt_typ",
            "pt_avg",
            "ratio",
            "tests/rq",
            "nulls/rq",
            "pkts/msg",
            "pt_pkts"
        );
        for l in &r.latency {
            let (tests, nulls) = per_request(&l.polls);
            let _ = writeln!(
                s,
                "{:>9} {:>6} {:>10.2} {:>10.2} {:>10.2} {} {} {} {:>8.1} {:>8.1} {} {}",
                l.size,
                l.iters,
                l.typical_us,
                l.avg_us,
                l.p99_us,
                opt(l.perftest.map(|p| p.typical_us), 10, 2),
                opt(l.perftest.map(|p| p.avg_us), 10, 2),
                opt(
                    l.perftest.and_then(|p| ratio(l.typical_us, p.typical_us)),
                    8,
                    3
                ),
                tests,
                nulls,
                opt(l.wire_pkts, 8, 2),
                opt(l.perftest.and_then(|p| p.wire_pkts), 8, 2)
            );
        }
    }
    let stream_table = |s: &mut String, title: &str, rows: &[StreamRow]| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(s, "\n## {title} (window {})", rows[0].window);
        let _ = writeln!(
            s,
            "{:>9} {:>6} {:>10} {:>9} {:>12} {:>9} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "bytes",
            "msgs",
            "MB/s",
            "Gbps",
            "msgs/s",
            "pt_Gbps",
            "pt_msgs/s",
            "ratio",
            "tests/rq",
            "nulls/rq",
            "pkts/msg",
            "pt_pkts"
        );
        for b in rows {
            let (tests, nulls) = per_request(&b.send_polls);
            let _ = writeln!(
                s,
                "{:>9} {:>6} {:>10.1} {:>9.3} {:>12.0} {} {} {} {:>8.1} {:>8.1} {} {}",
                b.size,
                b.count,
                b.mb_per_s,
                b.gbps,
                b.msgs_per_s,
                opt(b.perftest.map(|p| p.gbps), 9, 3),
                opt(b.perftest.map(|p| p.msgs_per_s), 12, 0),
                opt(b.perftest.and_then(|p| ratio(b.gbps, p.gbps)), 8, 3),
                tests,
                nulls,
                opt(b.wire_pkts, 8, 2),
                opt(b.perftest.and_then(|p| p.wire_pkts), 8, 2)
            );
        }
    };
    stream_table(&mut s, "bandwidth", &r.bandwidth);
    stream_table(&mut s, "message rate", &r.msgrate);
    for t in &r.allreduce {
        let _ = writeln!(
            s,
            "\n## all-reduce: {} ranks, float sum, ring, host memory, {} timed iterations",
            t.ranks, t.iters
        );
        let _ = writeln!(
            s,
            "{:>10} {:>12} {:>12} {:>12} {:>12} {:>7} {:>14}",
            "size(B)", "count", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong", "busbw/pt_bw"
        );
        for a in &t.rows {
            let _ = writeln!(
                s,
                "{:>10} {:>12} {:>12.1} {:>12.6} {:>12.6} {:>7} {}",
                a.size,
                a.count,
                a.time_us,
                a.algbw,
                a.busbw,
                a.wrong,
                opt(
                    perftest_gbps_near(r, a.size).and_then(|g| ratio(a.busbw * 8.0, g)),
                    14,
                    3
                )
            );
        }
    }
    decode_table(&mut s, &r.decode);
    decode_table(&mut s, &r.decode_ahead);
    if !r.scaling.is_empty() {
        let _ = writeln!(
            s,
            "\n## scaling (per peer = one send comm + one receive comm)"
        );
        let _ = writeln!(
            s,
            "{:>6} {:>10} {:>8} {:>8} {:>12}",
            "peers", "setup(ms)", "QPs", "MRs", "MR bytes"
        );
        for c in &r.scaling {
            let _ = writeln!(
                s,
                "{:>6} {:>10.1} {} {} {}",
                c.peers,
                c.setup_ms,
                opt(c.qps_per_peer, 8, 1),
                opt(c.mrs_per_peer, 8, 1),
                opt(c.mr_bytes_per_peer, 12, 0)
            );
        }
    }
    for n in &r.notes {
        let _ = writeln!(s, "# note: {n}");
    }
    s
}

/// The decode rows: steps of back-to-back all-reduces, times per step of the slowest rank.
fn decode_table(s: &mut String, rows: &[DecodeRow]) {
    let Some(first) = rows.first() else {
        return;
    };
    if first.ahead {
        let _ = writeln!(
            s,
            "\n## decode step, receives posted ahead (2 ranks, ring all-reduce)"
        );
        let _ = writeln!(
            s,
            "# each all-reduce's receives are posted when the one before completes, as RCCL's proxy posts them"
        );
    } else {
        let _ = writeln!(s, "\n## decode step (2 ranks, ring all-reduce)");
    }
    let _ = writeln!(
        s,
        "# a step: back-to-back all-reduces (float sum, host memory); {} warm-up and {} timed steps",
        first.warmup, first.steps
    );
    let _ = writeln!(
        s,
        "# per exchange of rank 0 (us from its start): send accepted by the plugin, send done, receive done"
    );
    let _ = writeln!(
        s,
        "{:>10} {:>8} {:>14} {:>14} {:>10} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "size(B)",
        "ARs/step",
        "step_mean(us)",
        "step_med(us)",
        "us/AR",
        "#wrong",
        "pkts/AR",
        "accepted",
        "sent",
        "received"
    );
    for d in rows {
        let m = d.phases.all.means();
        let _ = writeln!(
            s,
            "{:>10} {:>8} {:>14.1} {:>14.1} {:>10.2} {:>7} {} {} {} {}",
            d.size,
            d.allreduces,
            d.step_mean_us,
            d.step_median_us,
            d.allreduce_us,
            d.wrong,
            opt(d.wire_pkts, 8, 1),
            opt(m.map(|m| m.0), 9, 1),
            opt(m.map(|m| m.1), 9, 1),
            opt(m.map(|m| m.2), 9, 1)
        );
    }
}

fn decode_json(rows: &[DecodeRow]) -> Value {
    rows.iter()
        .map(|d| {
            let m = d.phases.all.means();
            let f = d.phases.first.means();
            json!({
                "size": d.size, "allreduces": d.allreduces, "receives_ahead": d.ahead,
                "warmup": d.warmup, "steps": d.steps,
                "step_mean_us": d.step_mean_us, "step_median_us": d.step_median_us,
                "allreduce_us": d.allreduce_us, "wrong": d.wrong, "wire_pkts": d.wire_pkts,
                "exchanges": d.phases.all.exchanges,
                "send_accepted_us": m.map(|m| m.0),
                "send_done_us": m.map(|m| m.1),
                "recv_done_us": m.map(|m| m.2),
                "null_sends_per_exchange": d.phases.null_sends_per_exchange(),
                "first_send_accepted_us": f.map(|m| m.0),
                "first_send_done_us": f.map(|m| m.1),
                "first_recv_done_us": f.map(|m| m.2),
            })
        })
        .collect()
}

fn polls(p: &Polls) -> Value {
    json!({"null_sends": p.null_sends, "null_recvs": p.null_recvs, "tests": p.tests, "requests": p.requests})
}

fn stream_json(rows: &[StreamRow]) -> Value {
    rows.iter()
        .map(|b| {
            json!({
                "size": b.size, "count": b.count, "window": b.window, "seconds": b.seconds,
                "mb_per_s": b.mb_per_s, "gbps": b.gbps, "msgs_per_s": b.msgs_per_s,
                "send_polls": polls(&b.send_polls), "recv_polls": polls(&b.recv_polls),
                "wire_pkts": b.wire_pkts,
                "perftest": b.perftest.map(|p| json!({"gbps": p.gbps, "msgs_per_s": p.msgs_per_s, "wire_pkts": p.wire_pkts})),
                "ratio": b.perftest.and_then(|p| ratio(b.gbps, p.gbps)),
            })
        })
        .collect()
}

pub fn json(r: &Report) -> Value {
    json!({
        "plugin": r.plugin.display().to_string(),
        "plugin_name": r.plugin_name,
        "version": r.version,
        "device": r.device,
        "quick": r.quick,
        "perftest_device": r.perftest_device.as_ref().map(|d| json!({"ibdev": d.ibdev, "gid_index": d.gid_index})),
        "latency": r.latency.iter().map(|l| json!({
            "size": l.size, "iters": l.iters,
            "typical_us": l.typical_us, "avg_us": l.avg_us, "p99_us": l.p99_us,
            "polls": polls(&l.polls),
            "wire_pkts": l.wire_pkts,
            "perftest": l.perftest.map(|p| json!({"typical_us": p.typical_us, "avg_us": p.avg_us, "p99_us": p.p99_us, "wire_pkts": p.wire_pkts})),
            "ratio": l.perftest.and_then(|p| ratio(l.typical_us, p.typical_us)),
        })).collect::<Vec<_>>(),
        "bandwidth": stream_json(&r.bandwidth),
        "msgrate": stream_json(&r.msgrate),
        "allreduce": r.allreduce.iter().map(|t| json!({
            "ranks": t.ranks, "iters": t.iters,
            "rows": t.rows.iter().map(|a| json!({
                "size": a.size, "count": a.count, "time_us": a.time_us,
                "algbw": a.algbw, "busbw": a.busbw, "wrong": a.wrong,
                "busbw_vs_perftest_bw": perftest_gbps_near(r, a.size).and_then(|g| ratio(a.busbw * 8.0, g)),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "decode": decode_json(&r.decode),
        "decode_ahead": decode_json(&r.decode_ahead),
        "scaling": r.scaling.iter().map(|c| json!({
            "peers": c.peers, "setup_ms": c.setup_ms, "qps_per_peer": c.qps_per_peer,
            "mrs_per_peer": c.mrs_per_peer, "mr_bytes_per_peer": c.mr_bytes_per_peer,
        })).collect::<Vec<_>>(),
        "notes": r.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{PhaseSums, Phases};
    use std::path::PathBuf;

    fn report(decode: Vec<DecodeRow>) -> Report {
        Report {
            plugin: PathBuf::from("/p.so"),
            plugin_name: "halo".into(),
            version: 10,
            device: "rxe0".into(),
            quick: true,
            perftest_device: None,
            latency: Vec::new(),
            bandwidth: Vec::new(),
            msgrate: Vec::new(),
            allreduce: Vec::new(),
            decode,
            decode_ahead: Vec::new(),
            scaling: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn row(size: usize, allreduces: usize, mean: f64, wrong: usize) -> DecodeRow {
        DecodeRow {
            size,
            allreduces,
            ahead: false,
            warmup: 1,
            steps: 4,
            step_mean_us: mean,
            step_median_us: mean - 1.0,
            allreduce_us: mean / allreduces as f64,
            wrong,
            wire_pkts: (size == 8192).then_some(12.0),
            phases: if size == 8192 {
                Phases {
                    all: PhaseSums {
                        exchanges: 4,
                        send_accepted_us: 40.0,
                        send_done_us: 100.0,
                        recv_done_us: 90.0,
                    },
                    first: PhaseSums {
                        exchanges: 2,
                        send_accepted_us: 36.0,
                        send_done_us: 60.0,
                        recv_done_us: 50.0,
                    },
                    null_sends: 6,
                }
            } else {
                Phases::default()
            },
        }
    }

    #[test]
    fn decode_rows_in_text_and_json() {
        let r = report(vec![row(8192, 64, 1280.0, 0), row(16384, 160, 4800.0, 3)]);
        let t = text(&r);
        assert!(
            t.contains("## decode step (2 ranks, ring all-reduce)"),
            "{t}"
        );
        let line = t
            .lines()
            .find(|l| l.trim_start().starts_with("16384"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols,
            ["16384", "160", "4800.0", "4799.0", "30.00", "3", "-", "-", "-", "-"]
        );
        let line = t
            .lines()
            .find(|l| l.trim_start().starts_with("8192"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[6..], ["12.0", "10.0", "25.0", "22.5"], "{line}");
        let j = json(&r);
        assert_eq!(j["decode"][0]["size"], 8192);
        assert_eq!(j["decode"][0]["allreduces"], 64);
        assert_eq!(j["decode"][0]["allreduce_us"], 20.0);
        assert_eq!(j["decode"][1]["wrong"], 3);
        assert_eq!(j["decode"][0]["wire_pkts"], 12.0);
        assert!(j["decode"][1]["wire_pkts"].is_null());
        assert_eq!(j["decode"][0]["exchanges"], 4);
        assert_eq!(j["decode"][0]["send_accepted_us"], 10.0);
        assert_eq!(j["decode"][0]["send_done_us"], 25.0);
        assert_eq!(j["decode"][0]["recv_done_us"], 22.5);
        assert_eq!(j["decode"][0]["null_sends_per_exchange"], 1.5);
        assert_eq!(j["decode"][0]["first_send_accepted_us"], 18.0);
        assert_eq!(j["decode"][0]["first_send_done_us"], 30.0);
        assert_eq!(j["decode"][0]["first_recv_done_us"], 25.0);
        assert!(j["decode"][1]["first_send_accepted_us"].is_null());
        assert!(j["decode"][1]["send_accepted_us"].is_null());
        assert!(!r.all_exact());
        assert!(report(vec![row(8192, 64, 1.0, 0)]).all_exact());
        // Without decode rows, no decode table.
        assert!(!text(&report(Vec::new())).contains("decode"));
    }

    #[test]
    fn rows_with_receives_ahead_get_their_own_table_and_key() {
        let mut r = report(vec![row(8192, 64, 1280.0, 0)]);
        r.decode_ahead = vec![DecodeRow {
            ahead: true,
            ..row(8192, 64, 640.0, 0)
        }];
        let t = text(&r);
        let ahead = t
            .split("## decode step, receives posted ahead")
            .nth(1)
            .expect("the ahead table");
        assert!(t.contains("## decode step (2 ranks"), "{t}");
        let line = ahead
            .lines()
            .find(|l| l.trim_start().starts_with("8192"))
            .unwrap();
        assert_eq!(line.split_whitespace().nth(2), Some("640.0"), "{line}");
        let j = json(&r);
        assert_eq!(j["decode"][0]["receives_ahead"], false);
        assert_eq!(j["decode_ahead"][0]["receives_ahead"], true);
        assert_eq!(j["decode_ahead"][0]["step_mean_us"], 640.0);
        assert!(r.all_exact());
        r.decode_ahead[0].wrong = 1;
        assert!(!r.all_exact());
    }
}
