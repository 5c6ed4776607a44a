//! Comparison of several plugins in one run: each round runs every plugin once, then perftest
//! once on its device. The order turns by one plugin each round (A B C, B C A, C A B, …), so that
//! slow drift of the machine (emulation, other load) spreads evenly over the plugins and no plugin
//! always pays for running first after boot. Each plugin runs in a child process
//! of its own (`program args… --plugin PATH --json`, i.e. a whole single-plugin `netbench` run),
//! with its own environment added, which the child's members inherit; plugins never share a
//! process, so their globals, environment and libraries cannot interfere.
//!
//! The summary has one table per figure (latency, bandwidth, message rate, all-reduce bus
//! bandwidth, decode step time, connection setup): every plugin's value per round, their mean, the ratio of that
//! mean to the best *other* plugin's mean and to perftest's where perftest measures the same thing.

use super::perftest::{BandwidthStats, LatencyStats, Perftest, PerftestDevice};
use super::suites::Plan;
use super::Suites;
use serde_json::{json, Map, Value};
use std::ffi::OsString;
use std::fmt::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One plugin of a comparison.
#[derive(Clone, Debug)]
pub struct Entrant {
    /// Short name in the tables (`halo`, `nccl-ib`, `ofi`).
    pub name: String,
    pub plugin: PathBuf,
    /// Added to the environment of this plugin's runs (both ends: members inherit it).
    pub env: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub entrants: Vec<Entrant>,
    pub rounds: usize,
    /// The single-plugin run: `program args… --plugin PATH --json` must print one JSON report
    /// ([`super::report::json`]) on stdout.
    pub program: OsString,
    pub args: Vec<OsString>,
    /// What the runs measure; perftest follows the same sizes.
    pub suites: Suites,
    pub quick: bool,
    pub window: usize,
    /// perftest once per round on this device.
    pub perftest: Option<PerftestDevice>,
    pub timeout: Duration,
    /// Rewritten with the JSON of the comparison so far after every run, so that the finished
    /// runs survive a comparison that is killed or never ends.
    pub save: Option<PathBuf>,
}

/// One plugin's run in one round.
#[derive(Clone, Debug)]
pub struct Run {
    pub round: usize,
    pub entrant: usize,
    pub seconds: f64,
    /// The run's JSON report, when it printed one.
    pub report: Option<Value>,
    /// Why the run failed (it may still have printed a report).
    pub error: Option<String>,
}

/// perftest's figures of one round, by size.
#[derive(Clone, Debug, Default)]
pub struct PerftestRound {
    pub round: usize,
    pub latency: Vec<(usize, LatencyStats)>,
    pub bandwidth: Vec<(usize, BandwidthStats)>,
    pub msgrate: Vec<(usize, BandwidthStats)>,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Comparison {
    pub entrants: Vec<Entrant>,
    pub rounds: usize,
    pub quick: bool,
    pub perftest_device: Option<PerftestDevice>,
    pub runs: Vec<Run>,
    pub perftest: Vec<PerftestRound>,
}

impl Comparison {
    /// Whether every run succeeded (which includes exact all-reduce results) and perftest too.
    pub fn all_ok(&self) -> bool {
        self.runs.iter().all(|r| r.error.is_none())
            && self.perftest.iter().all(|p| p.error.is_none())
    }
}

/// Runs the comparison; a failing plugin run or perftest round is recorded and the rest goes on.
pub fn run(o: &CompareOptions) -> Result<Comparison, String> {
    if o.entrants.is_empty() {
        return Err("nothing to compare".into());
    }
    let mut names: Vec<&str> = o.entrants.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("plugin names must differ: {names:?}"));
    }
    let mut out = Comparison {
        entrants: o.entrants.clone(),
        rounds: o.rounds,
        quick: o.quick,
        perftest_device: o.perftest.clone(),
        runs: Vec::new(),
        perftest: Vec::new(),
    };
    let mut pt = o.perftest.clone().map(|d| Perftest::new(d, o.timeout));
    for round in 1..=o.rounds {
        for i in round_order(o.entrants.len(), round) {
            let e = &o.entrants[i];
            eprintln!("netbench: round {round}/{}: {}", o.rounds, e.name);
            let run = run_one(o, e, round, i);
            if let Some(err) = &run.error {
                eprintln!("netbench: round {round}: {} failed: {err}", e.name);
            }
            out.runs.push(run);
            save_so_far(o, &out);
        }
        if let Some(pt) = pt.as_mut() {
            eprintln!("netbench: round {round}/{}: perftest", o.rounds);
            let r = perftest_round(pt, o, round);
            if let Some(err) = &r.error {
                eprintln!("netbench: round {round}: perftest failed: {err}");
            }
            out.perftest.push(r);
            save_so_far(o, &out);
        }
    }
    Ok(out)
}

/// Writes `c` as [`json`] to `--save`'s file, whole or not at all (a temporary file renamed over
/// it). A failure is reported and the comparison goes on.
fn save_so_far(o: &CompareOptions, c: &Comparison) {
    let Some(path) = &o.save else {
        return;
    };
    if let Err(e) = save(path, c) {
        eprintln!(
            "netbench: cannot save the comparison so far to {}: {e}",
            path.display()
        );
    }
}

fn save(path: &std::path::Path, c: &Comparison) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".part");
    std::fs::write(&tmp, format!("{}\n", json(c)))?;
    std::fs::rename(&tmp, path)
}

/// The entrants' indices in the order round `round` (from 1) runs them: turned by one each round.
fn round_order(n: usize, round: usize) -> impl Iterator<Item = usize> {
    let first = round.saturating_sub(1) % n.max(1);
    (0..n).map(move |k| (first + k) % n)
}

fn run_one(o: &CompareOptions, e: &Entrant, round: usize, entrant: usize) -> Run {
    let t0 = Instant::now();
    let child = Command::new(&o.program)
        .args(&o.args)
        .arg("--plugin")
        .arg(&e.plugin)
        .arg("--json")
        .envs(e.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output();
    let mut run = Run {
        round,
        entrant,
        seconds: 0.0,
        report: None,
        error: None,
    };
    match child {
        Err(e) => run.error = Some(format!("cannot start {}: {e}", o.program.to_string_lossy())),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            run.report = serde_json::from_str(text.trim()).ok();
            if !out.status.success() {
                run.error = Some(format!("exited with {}", out.status));
            } else if run.report.is_none() {
                run.error = Some(format!("printed no JSON report: {:?}", text.trim()));
            }
        }
    }
    run.seconds = t0.elapsed().as_secs_f64();
    run
}

fn perftest_round(pt: &mut Perftest, o: &CompareOptions, round: usize) -> PerftestRound {
    let plan = Plan::new(o.quick);
    let mut r = PerftestRound {
        round,
        ..PerftestRound::default()
    };
    let res = (|| {
        if o.suites.latency {
            for &s in &plan.latency {
                r.latency
                    .push((s, pt.write_lat(s, Plan::latency_iters(o.quick, s))?));
            }
        }
        for (on, sizes, rows) in [
            (o.suites.bandwidth, &plan.bandwidth, &mut r.bandwidth),
            (o.suites.msgrate, &plan.msgrate, &mut r.msgrate),
        ] {
            if on {
                for &s in sizes {
                    rows.push((s, pt.write_bw(s, Plan::stream_count(o.quick, s), o.window)?));
                }
            }
        }
        Ok::<_, String>(())
    })();
    r.error = res.err();
    r
}

/// (row key, value) pairs of one run or one perftest round.
type Rows = Vec<(u64, f64)>;

/// One compared figure: where it is in a run's report and whether lower is better.
struct Figure {
    key: &'static str,
    title: &'static str,
    /// Column title of the row key.
    by: &'static str,
    lower_is_better: bool,
    /// (row key, value) of one run's report.
    values: fn(&Value) -> Rows,
    /// perftest's value for the same rows, if it measures this.
    perftest: Option<fn(&PerftestRound) -> Rows>,
}

fn rows_of(report: &Value, list: &str, key: &str, value: &str) -> Vec<(u64, f64)> {
    report[list]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r[key].as_u64()?, r[value].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// perftest's (size, value) pairs as rows, leaving out sizes without the value.
fn by_size<T>(rows: &[(usize, T)], value: impl Fn(&T) -> Option<f64>) -> Rows {
    rows.iter()
        .filter_map(|(s, v)| Some((*s as u64, value(v)?)))
        .collect()
}

fn allreduce_busbw(report: &Value, ranks: u64) -> Vec<(u64, f64)> {
    report["allreduce"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["ranks"].as_u64() == Some(ranks)))
        .map(|t| rows_of(t, "rows", "size", "busbw"))
        .unwrap_or_default()
}

const FIGURES: [Figure; 21] = [
    Figure {
        key: "latency",
        title: "latency: typical one-way time, us (lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "latency", "size", "typical_us"),
        perftest: Some(|p| by_size(&p.latency, |l| Some(l.typical_us))),
    },
    Figure {
        key: "bandwidth",
        title: "bandwidth: Gb/s (higher is better)",
        by: "bytes",
        lower_is_better: false,
        values: |r| rows_of(r, "bandwidth", "size", "gbps"),
        perftest: Some(|p| by_size(&p.bandwidth, |b| Some(b.gbps))),
    },
    Figure {
        key: "msgrate",
        title: "message rate: messages/s (higher is better)",
        by: "bytes",
        lower_is_better: false,
        values: |r| rows_of(r, "msgrate", "size", "msgs_per_s"),
        perftest: Some(|p| by_size(&p.msgrate, |b| Some(b.msgs_per_s))),
    },
    Figure {
        key: "allreduce2",
        title: "all-reduce, 2 ranks: bus bandwidth, GB/s (higher is better)",
        by: "bytes",
        lower_is_better: false,
        values: |r| allreduce_busbw(r, 2),
        perftest: None,
    },
    Figure {
        key: "allreduce4",
        title: "all-reduce, 4 ranks: bus bandwidth, GB/s (higher is better)",
        by: "bytes",
        lower_is_better: false,
        values: |r| allreduce_busbw(r, 4),
        perftest: None,
    },
    Figure {
        key: "decode",
        title: "decode step, 2 ranks: mean us per step of back-to-back all-reduces (8 KiB x 64, 16 KiB x 160; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode", "size", "step_mean_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead",
        title: "decode step, receives posted ahead (as RCCL's proxy posts them): mean us per step (lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "step_mean_us"),
        perftest: None,
    },
    Figure {
        key: "decode_accepted",
        title: "decode step: us per exchange until the send was accepted (rank 0; a clear-to-send plugin waits here for the peer's offer; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode", "size", "send_accepted_us"),
        perftest: None,
    },
    Figure {
        key: "decode_sent",
        title: "decode step: us per exchange until the send completed (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode", "size", "send_done_us"),
        perftest: None,
    },
    Figure {
        key: "decode_nulls",
        title: "decode step: NULL requests from isend per exchange before the send was accepted (rank 0; waits for the peer's offer)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode", "size", "null_sends_per_exchange"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_accepted",
        title: "decode step, receives posted ahead: us per exchange until the send was accepted (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "send_accepted_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_sent",
        title: "decode step, receives posted ahead: us per exchange until the send completed (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "send_done_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_received",
        title: "decode step, receives posted ahead: us per exchange until the receive completed (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "recv_done_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_first_accepted",
        title: "decode step, receives posted ahead, first exchange of each all-reduce: us until the send was accepted (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "first_send_accepted_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_first_sent",
        title: "decode step, receives posted ahead, first exchange: us until the send completed (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "first_send_done_us"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_first_received",
        title: "decode step, receives posted ahead, first exchange: us until the receive completed (rank 0; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "first_recv_done_us"),
        perftest: None,
    },
    Figure {
        key: "latency_pkts",
        title: "latency: packets on the wire per one-way message (device counters; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "latency", "size", "wire_pkts"),
        perftest: Some(|p| by_size(&p.latency, |l| l.wire_pkts)),
    },
    Figure {
        key: "msgrate_pkts",
        title: "message rate: packets on the wire per message (device counters; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "msgrate", "size", "wire_pkts"),
        perftest: Some(|p| by_size(&p.msgrate, |b| b.wire_pkts)),
    },
    Figure {
        key: "decode_pkts",
        title: "decode step: packets on the wire per all-reduce (device counters; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode", "size", "wire_pkts"),
        perftest: None,
    },
    Figure {
        key: "decode_ahead_pkts",
        title: "decode step, receives posted ahead: packets on the wire per all-reduce (device counters; lower is better)",
        by: "bytes",
        lower_is_better: true,
        values: |r| rows_of(r, "decode_ahead", "size", "wire_pkts"),
        perftest: None,
    },
    Figure {
        key: "scaling",
        title: "connection setup with K peers: ms (lower is better)",
        by: "peers",
        lower_is_better: true,
        values: |r| rows_of(r, "scaling", "peers", "setup_ms"),
        perftest: None,
    },
];

/// One row of a summary table: one plugin (or perftest) at one size.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub key: u64,
    /// Entrant name, or `perftest`.
    pub name: String,
    /// One per round; `None` where the run failed or did not measure this.
    pub values: Vec<Option<f64>>,
    pub mean: Option<f64>,
    /// The median of the rounds: a round that drew a slow spell of the host (under TCG, single
    /// rounds run up to 2x slow) moves it by one rank, where it moves the mean by its whole size.
    pub median: Option<f64>,
    /// The best other plugin at this size, by mean, and this mean divided by its mean.
    pub best_other: Option<String>,
    pub vs_best_other: Option<f64>,
    /// This median divided by the median of the same best other plugin.
    pub median_vs_best_other: Option<f64>,
    pub vs_perftest: Option<f64>,
}

/// The summary table of one figure.
#[derive(Clone, Debug)]
pub struct SummaryTable {
    pub key: &'static str,
    pub title: &'static str,
    pub by: &'static str,
    pub lower_is_better: bool,
    pub rows: Vec<SummaryRow>,
}

/// Mean of the positive readings: every figure is a positive quantity, and a zero is a failed
/// reading (perftest prints a bandwidth of 0.00 for runs too short for its clock).
fn mean(v: &[Option<f64>]) -> Option<f64> {
    let got: Vec<f64> = v
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    (!got.is_empty()).then(|| got.iter().sum::<f64>() / got.len() as f64)
}

/// Median of the positive readings (the mean of the middle two for an even count).
fn median(v: &[Option<f64>]) -> Option<f64> {
    let mut got: Vec<f64> = v
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if got.is_empty() {
        return None;
    }
    got.sort_by(f64::total_cmp);
    let n = got.len();
    Some(if n % 2 == 1 {
        got[n / 2]
    } else {
        (got[n / 2 - 1] + got[n / 2]) / 2.0
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The summary tables of the figures anything measured.
pub fn summary(c: &Comparison) -> Vec<SummaryTable> {
    let mut tables = Vec::new();
    for f in &FIGURES {
        // values[entrant][round] by row key
        let mut per: Vec<Vec<Vec<(u64, f64)>>> = vec![vec![Vec::new(); c.rounds]; c.entrants.len()];
        for r in &c.runs {
            if let (Some(rep), Some(slot)) = (
                &r.report,
                per.get_mut(r.entrant)
                    .and_then(|e| e.get_mut(r.round.wrapping_sub(1))),
            ) {
                *slot = (f.values)(rep);
            }
        }
        let mut pt: Vec<Vec<(u64, f64)>> = vec![Vec::new(); c.rounds];
        if let Some(get) = f.perftest {
            for p in &c.perftest {
                if let Some(slot) = pt.get_mut(p.round.wrapping_sub(1)) {
                    *slot = get(p);
                }
            }
        }
        let mut keys: Vec<u64> = per.iter().flatten().flatten().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            continue;
        }
        let at = |rounds: &[Vec<(u64, f64)>], key: u64| -> Vec<Option<f64>> {
            rounds
                .iter()
                .map(|rows| rows.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
                .collect()
        };
        let mut rows = Vec::new();
        for &key in &keys {
            let vals: Vec<Vec<Option<f64>>> = per.iter().map(|e| at(e, key)).collect();
            let means: Vec<Option<f64>> = vals.iter().map(|v| mean(v)).collect();
            let medians: Vec<Option<f64>> = vals.iter().map(|v| median(v)).collect();
            let pt_vals = at(&pt, key);
            let pt_mean = mean(&pt_vals);
            for (i, e) in c.entrants.iter().enumerate() {
                let best = means
                    .iter()
                    .enumerate()
                    .filter(|(j, m)| *j != i && m.is_some())
                    .map(|(j, m)| (j, m.unwrap_or(0.0)))
                    .reduce(|a, b| {
                        let b_better = if f.lower_is_better {
                            b.1 < a.1
                        } else {
                            b.1 > a.1
                        };
                        if b_better {
                            b
                        } else {
                            a
                        }
                    });
                rows.push(SummaryRow {
                    key,
                    name: e.name.clone(),
                    values: vals[i].clone(),
                    mean: means[i],
                    median: medians[i],
                    best_other: best.map(|(j, _)| c.entrants[j].name.clone()),
                    vs_best_other: ratio(means[i], best.map(|b| b.1)),
                    median_vs_best_other: ratio(medians[i], best.and_then(|(j, _)| medians[j])),
                    vs_perftest: ratio(means[i], pt_mean),
                });
            }
            if pt_mean.is_some() {
                rows.push(SummaryRow {
                    key,
                    name: "perftest".into(),
                    median: median(&pt_vals),
                    values: pt_vals,
                    mean: pt_mean,
                    best_other: None,
                    vs_best_other: None,
                    median_vs_best_other: None,
                    vs_perftest: None,
                });
            }
        }
        tables.push(SummaryTable {
            key: f.key,
            title: f.title,
            by: f.by,
            lower_is_better: f.lower_is_better,
            rows,
        });
    }
    tables
}

/// What a run reported about itself: `plugin_name, ncclNet vN, device D`.
fn identity(c: &Comparison, entrant: usize) -> String {
    c.runs
        .iter()
        .filter(|r| r.entrant == entrant)
        .find_map(|r| r.report.as_ref())
        .map(|r| {
            format!(
                "{}, ncclNet v{}, device {}",
                r["plugin_name"].as_str().unwrap_or("?"),
                r["version"].as_u64().unwrap_or(0),
                r["device"].as_str().unwrap_or("?")
            )
        })
        .unwrap_or_else(|| "no report".into())
}

fn num(v: Option<f64>, width: usize) -> String {
    match v {
        None => format!("{:>width$}", "-"),
        Some(x) => {
            let prec = if x.abs() >= 10_000.0 {
                0
            } else if x.abs() >= 100.0 {
                1
            } else if x.abs() >= 1.0 {
                2
            } else {
                4
            };
            format!("{x:>width$.prec$}")
        }
    }
}

fn ratio_text(v: Option<f64>) -> String {
    match v {
        None => format!("{:>7}", "-"),
        Some(x) => format!("{x:>7.3}"),
    }
}

pub fn text(c: &Comparison) -> String {
    let mut s = String::new();
    let order: Vec<&str> = c.entrants.iter().map(|e| e.name.as_str()).collect();
    let _ = writeln!(
        s,
        "# netbench comparison: {} round(s), each runs {}{}{}",
        c.rounds,
        order.join(" "),
        if c.perftest_device.is_some() {
            " perftest"
        } else {
            ""
        },
        if c.quick { " (quick)" } else { "" }
    );
    for (i, e) in c.entrants.iter().enumerate() {
        let env: Vec<String> = e.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "#   {:<10} {} ({}){}",
            e.name,
            e.plugin.display(),
            identity(c, i),
            if env.is_empty() {
                String::new()
            } else {
                format!(" env {}", env.join(" "))
            }
        );
    }
    if let Some(d) = &c.perftest_device {
        let _ = writeln!(
            s,
            "#   {:<10} ib_write_lat / ib_write_bw on {} GID index {}",
            "perftest", d.ibdev, d.gid_index
        );
    }
    let _ = writeln!(
        s,
        "# mean, median: over the rounds (zero readings left out); vs_best: mean / the best other plugin's mean (named); med_vs: the same for medians; vs_pt: mean / perftest's mean"
    );
    let name_w = order.iter().map(|n| n.len()).max().unwrap_or(0).max(8);
    for t in summary(c) {
        let _ = writeln!(s, "\n## {}", t.title);
        let mut head = format!("{:>9} {:<name_w$}", t.by, "plugin");
        for r in 1..=c.rounds {
            let _ = write!(head, " {:>11}", format!("round{r}"));
        }
        let _ = write!(
            head,
            " {:>11} {:>11} {:>7} {:<name_w$} {:>7} {:>7}",
            "mean", "median", "vs_best", "(best)", "med_vs", "vs_pt"
        );
        let _ = writeln!(s, "{}", head.trim_end());
        for r in &t.rows {
            let mut line = format!("{:>9} {:<name_w$}", r.key, r.name);
            for v in &r.values {
                let _ = write!(line, " {}", num(*v, 11));
            }
            let _ = write!(
                line,
                " {} {} {} {:<name_w$} {} {}",
                num(r.mean, 11),
                num(r.median, 11),
                ratio_text(r.vs_best_other),
                r.best_other.as_deref().unwrap_or("-"),
                ratio_text(r.median_vs_best_other),
                ratio_text(r.vs_perftest)
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
    }
    let mut notes = Vec::new();
    for r in &c.runs {
        if let Some(e) = &r.error {
            notes.push(format!(
                "round {} {}: {e}",
                r.round, c.entrants[r.entrant].name
            ));
        }
        if let Some(n) = r.report.as_ref().and_then(|v| v["notes"].as_array()) {
            for n in n.iter().filter_map(Value::as_str) {
                notes.push(format!(
                    "round {} {}: {n}",
                    r.round, c.entrants[r.entrant].name
                ));
            }
        }
    }
    for p in &c.perftest {
        if let Some(e) = &p.error {
            notes.push(format!("round {} perftest: {e}", p.round));
        }
    }
    if !notes.is_empty() {
        s.push('\n');
    }
    for n in notes {
        let _ = writeln!(s, "# note: {n}");
    }
    s
}

pub fn json(c: &Comparison) -> Value {
    let opt = |v: Option<f64>| v.map_or(Value::Null, |x| json!(x));
    let mut summary_obj = Map::new();
    for t in summary(c) {
        summary_obj.insert(
            t.key.into(),
            json!({
                "title": t.title, "by": t.by, "lower_is_better": t.lower_is_better,
                "rows": t.rows.iter().map(|r| json!({
                    t.by: r.key, "plugin": r.name,
                    "values": r.values.iter().map(|v| opt(*v)).collect::<Vec<_>>(),
                    "mean": opt(r.mean), "median": opt(r.median), "best_other": r.best_other,
                    "vs_best_other": opt(r.vs_best_other),
                    "median_vs_best_other": opt(r.median_vs_best_other),
                    "vs_perftest": opt(r.vs_perftest),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    json!({
        "comparison": {
            "rounds": c.rounds,
            "quick": c.quick,
            "entrants": c.entrants.iter().map(|e| json!({
                "name": e.name,
                "plugin": e.plugin.display().to_string(),
                "env": e.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "perftest_device": c.perftest_device.as_ref().map(|d| json!({"ibdev": d.ibdev, "gid_index": d.gid_index})),
            "runs": c.runs.iter().map(|r| json!({
                "round": r.round, "plugin": c.entrants[r.entrant].name, "seconds": r.seconds,
                "error": r.error, "report": r.report,
            })).collect::<Vec<_>>(),
            "perftest": c.perftest.iter().map(|p| json!({
                "round": p.round,
                "error": p.error,
                "latency": p.latency.iter().map(|(s, l)| json!({
                    "size": s, "typical_us": l.typical_us, "avg_us": l.avg_us, "p99_us": l.p99_us,
                    "wire_pkts": l.wire_pkts,
                })).collect::<Vec<_>>(),
                "bandwidth": p.bandwidth.iter().map(|(s, b)| json!({"size": s, "gbps": b.gbps, "msgs_per_s": b.msgs_per_s, "wire_pkts": b.wire_pkts})).collect::<Vec<_>>(),
                "msgrate": p.msgrate.iter().map(|(s, b)| json!({"size": s, "gbps": b.gbps, "msgs_per_s": b.msgs_per_s, "wire_pkts": b.wire_pkts})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "summary": summary_obj,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_runs_every_plugin_once_and_the_first_turns() {
        let orders: Vec<Vec<usize>> = (1..=4).map(|r| round_order(3, r).collect()).collect();
        assert_eq!(
            orders,
            [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]
        );
        assert_eq!(round_order(1, 5).collect::<Vec<_>>(), [0]);
        assert_eq!(round_order(0, 1).count(), 0);
    }

    fn report(lat8: f64, bw: f64) -> Value {
        json!({
            "plugin_name": "x", "version": 10, "device": "rxe1",
            "latency": [{"size": 8, "typical_us": lat8, "wire_pkts": 4.0}],
            "bandwidth": [{"size": 65536, "gbps": bw}],
            "allreduce": [{"ranks": 2, "rows": [{"size": 65536, "busbw": bw / 8.0}]}],
            "decode": [
                {"size": 8192, "allreduces": 64, "step_mean_us": lat8 * 100.0, "wrong": 0,
                 "send_accepted_us": lat8 * 2.0, "send_done_us": lat8 * 3.0},
                {"size": 16384, "allreduces": 160, "step_mean_us": lat8 * 300.0, "wrong": 0},
            ],
            "decode_ahead": [
                {"size": 8192, "allreduces": 64, "step_mean_us": lat8 * 50.0, "wrong": 0},
            ],
            "notes": [],
        })
    }

    fn entrant(name: &str) -> Entrant {
        Entrant {
            name: name.into(),
            plugin: PathBuf::from(format!("/{name}.so")),
            env: vec![("NCCL_IB_HCA".into(), "rxe1".into())],
        }
    }

    fn comparison() -> Comparison {
        let runs = [
            (1, 0, report(10.0, 1.0)),
            (1, 1, report(8.0, 2.0)),
            (1, 2, report(20.0, 0.5)),
            (2, 0, report(12.0, 1.0)),
            (2, 1, report(8.0, 2.0)),
        ];
        Comparison {
            entrants: vec![entrant("a"), entrant("b"), entrant("c")],
            rounds: 2,
            quick: true,
            perftest_device: None,
            runs: runs
                .into_iter()
                .map(|(round, entrant, r)| Run {
                    round,
                    entrant,
                    seconds: 1.0,
                    report: Some(r),
                    error: None,
                })
                .chain([Run {
                    round: 2,
                    entrant: 2,
                    seconds: 0.5,
                    report: None,
                    error: Some("exited with signal 11".into()),
                }])
                .collect(),
            perftest: (1..=2)
                .map(|round| PerftestRound {
                    round,
                    latency: vec![(
                        8,
                        LatencyStats {
                            typical_us: 4.0,
                            avg_us: 4.0,
                            p99_us: 5.0,
                            wire_pkts: Some(2.0),
                        },
                    )],
                    ..PerftestRound::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_median_is_moved_by_one_slow_round_only_by_one_rank() {
        // Twelve rounds, one 2.3x slow: the mean moves by 11 %, the median not at all.
        let mut v: Vec<Option<f64>> = (0..11)
            .map(|i| Some(38_000.0 + 100.0 * f64::from(i)))
            .collect();
        v.push(Some(88_000.0));
        assert_eq!(median(&v), Some(38_550.0));
        assert!(mean(&v).unwrap() > 42_000.0);
        // Odd counts take the middle reading; failed and zero readings are left out.
        assert_eq!(
            median(&[Some(3.0), None, Some(1.0), Some(0.0), Some(2.0)]),
            Some(2.0)
        );
        assert_eq!(median(&[None, Some(0.0)]), None);
    }

    #[test]
    fn ratios_compare_with_the_best_other_plugin_and_perftest() {
        let t = summary(&comparison());
        let lat = t.iter().find(|t| t.key == "latency").unwrap();
        let row = |n: &str| lat.rows.iter().find(|r| r.name == n).unwrap();
        assert_eq!(row("a").values, vec![Some(10.0), Some(12.0)]);
        assert_eq!(row("a").mean, Some(11.0));
        assert_eq!(row("a").best_other.as_deref(), Some("b"));
        assert_eq!(row("a").vs_best_other, Some(11.0 / 8.0));
        assert_eq!(row("a").vs_perftest, Some(11.0 / 4.0));
        assert_eq!(row("b").best_other.as_deref(), Some("a"));
        // c failed in round 2: its mean is round 1 alone.
        assert_eq!(row("c").values, vec![Some(20.0), None]);
        assert_eq!(row("c").mean, Some(20.0));
        assert_eq!(row("perftest").mean, Some(4.0));
        assert_eq!(mean(&[Some(0.0), Some(0.84)]), Some(0.84));
        assert_eq!(mean(&[Some(0.0), None]), None);
        // Medians: per plugin, and against the best other plugin's median.
        assert_eq!(row("a").median, Some(11.0));
        assert_eq!(row("a").median_vs_best_other, Some(11.0 / 8.0));
        assert_eq!(row("c").median, Some(20.0));
        assert_eq!(row("perftest").median, Some(4.0));
        assert_eq!(row("perftest").median_vs_best_other, None);
        let bw = t.iter().find(|t| t.key == "bandwidth").unwrap();
        let a = bw.rows.iter().find(|r| r.name == "a").unwrap();
        assert_eq!(
            (a.best_other.as_deref(), a.vs_best_other),
            (Some("b"), Some(0.5))
        );
        assert!(bw.rows.iter().all(|r| r.name != "perftest"));
        let ar = t.iter().find(|t| t.key == "allreduce2").unwrap();
        assert_eq!(ar.rows.len(), 3);
        let dec = t.iter().find(|t| t.key == "decode").unwrap();
        assert!(dec.lower_is_better);
        assert_eq!(dec.rows.len(), 6);
        let d = |n: &str, size: u64| dec.rows.iter().find(|r| r.name == n && r.key == size);
        assert_eq!(
            d("a", 8192).unwrap().values,
            vec![Some(1000.0), Some(1200.0)]
        );
        assert_eq!(d("a", 8192).unwrap().mean, Some(1100.0));
        // Lower is better: b (800) is a's best other, a (1100) is b's over c (2000).
        assert_eq!(d("a", 16384).unwrap().best_other.as_deref(), Some("b"));
        assert_eq!(d("a", 16384).unwrap().vs_best_other, Some(3300.0 / 2400.0));
        assert_eq!(d("b", 8192).unwrap().best_other.as_deref(), Some("a"));
        assert_eq!(d("c", 8192).unwrap().values, vec![Some(2000.0), None]);
        assert_eq!(d("c", 8192).unwrap().vs_perftest, None);
        assert!(t.iter().all(|t| t.key != "scaling" && t.key != "msgrate"));
        // The rows with receives ahead form their own table, not a third decode row.
        let ahead = t.iter().find(|t| t.key == "decode_ahead").unwrap();
        assert!(ahead.lower_is_better);
        assert_eq!(ahead.rows.len(), 3);
        let a = ahead.rows.iter().find(|r| r.name == "a").unwrap();
        assert_eq!((a.key, a.mean), (8192, Some(550.0)));
        assert_eq!(a.best_other.as_deref(), Some("b"));
        // The exchange phases of the decode rows, where a report has them.
        let acc = t.iter().find(|t| t.key == "decode_accepted").unwrap();
        assert!(acc.lower_is_better);
        let a = acc.rows.iter().find(|r| r.name == "a").unwrap();
        assert_eq!((a.key, a.values[0]), (8192, Some(20.0)));
        assert!(acc.rows.iter().all(|r| r.key == 8192));
        let sent = t.iter().find(|t| t.key == "decode_sent").unwrap();
        let a = sent.rows.iter().find(|r| r.name == "a").unwrap();
        assert_eq!(a.values[0], Some(30.0));
        assert!(t.iter().all(|t| t.key != "decode_ahead_accepted"));
        // Packets per message: every plugin sends 4 where perftest sends 2.
        let pk = t.iter().find(|t| t.key == "latency_pkts").unwrap();
        assert!(pk.lower_is_better);
        let a = pk.rows.iter().find(|r| r.name == "a").unwrap();
        assert_eq!(
            (a.mean, a.vs_best_other, a.vs_perftest),
            (Some(4.0), Some(1.0), Some(2.0))
        );
        assert!(t
            .iter()
            .all(|t| t.key != "msgrate_pkts" && t.key != "decode_pkts"));
    }

    #[test]
    fn the_comparison_so_far_is_saved_whole_after_each_run() {
        let dir = std::env::temp_dir().join(format!("netbench-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("compare.json");
        let mut c = comparison();
        c.runs.truncate(2);
        save(&path, &c).unwrap();
        let first: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(first, json(&c));
        assert_eq!(first["comparison"]["runs"].as_array().unwrap().len(), 2);
        // A later save replaces the file; no temporary file is left beside it.
        let c = comparison();
        save(&path, &c).unwrap();
        let second: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(second["comparison"]["runs"].as_array().unwrap().len(), 6);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // An unwritable place is an error, not a panic.
        assert!(save(&dir.join("missing/compare.json"), &c).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_and_json_carry_everything() {
        let c = comparison();
        let s = text(&c);
        assert!(s.contains("## latency"), "{s}");
        assert!(s.contains("## decode step, 2 ranks"), "{s}");
        let line = s
            .lines()
            .skip_while(|l| !l.starts_with("## decode"))
            .find(|l| l.split_whitespace().take(2).eq(["16384", "b"]))
            .unwrap();
        // rounds, mean, median, vs_best, the best other plugin, the medians' ratio, vs perftest
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["16384", "b", "2400.0", "2400.0", "2400.0", "2400.0", "0.727", "a", "0.727", "-"]
        );
        assert!(s.contains("note: round 2 c: exited with signal 11"), "{s}");
        let j = json(&c);
        let cmp = &j["comparison"];
        assert_eq!(cmp["runs"].as_array().unwrap().len(), 6);
        assert_eq!(cmp["runs"][0]["report"]["latency"][0]["typical_us"], 10.0);
        assert_eq!(cmp["entrants"][1]["env"]["NCCL_IB_HCA"], "rxe1");
        assert_eq!(
            cmp["summary"]["latency"]["rows"][0]["vs_best_other"],
            11.0 / 8.0
        );
        assert_eq!(cmp["perftest"][1]["latency"][0]["typical_us"], 4.0);
        assert_eq!(cmp["perftest"][1]["latency"][0]["wire_pkts"], 2.0);
        let dec = &cmp["summary"]["decode"];
        assert_eq!(dec["lower_is_better"], true);
        assert_eq!(dec["rows"][0]["bytes"], 8192);
        assert_eq!(dec["rows"][0]["plugin"], "a");
        assert_eq!(dec["rows"][0]["values"], json!([1000.0, 1200.0]));
        assert_eq!(dec["rows"][0]["vs_best_other"], 1100.0 / 800.0);
        assert_eq!(dec["rows"][0]["median"], 1100.0);
        assert_eq!(dec["rows"][0]["median_vs_best_other"], 1100.0 / 800.0);
    }
}
