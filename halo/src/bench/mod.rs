//! `halo bench`: the network path between two nodes at a glance — TCP, raw RDMA (perftest) and
//! the RCCL plugin (its benchmark engine), in one table like the setup guide's comparison, with
//! per-size rows, `--json` and a plot.
//!
//! The peer runs `halo bench --listen`, started by hand or — with a `cluster.toml` — by this
//! command over SSH ([`remote`]); this side drives every test through the listener's control
//! port (see [`control`]). Every argument is checked on both nodes before anything is measured
//! ([`validate`]); each path reports its own error, and a figure that is not a real measurement
//! (zero, not finite) is an error, never a table entry.

pub mod control;
pub mod plot;
pub mod remote;
pub mod tcp;
pub mod validate;

use crate::process::run_bounded;
use anyhow::{bail, Context, Result};
use control::Peer;
use halo_harness::bench::perftest;
use plot::Series;
use serde::Serialize;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The peer's control address (`halo bench --listen` there).
    pub peer: SocketAddr,
    /// RDMA device and GID index here and on the peer (perftest's `-d` / `-x`).
    pub ibdev: Option<String>,
    pub gid_index: u32,
    pub peer_ibdev: Option<String>,
    pub peer_gid_index: Option<u32>,
    /// The plugin library here (the peer names its own with `--listen --plugin`): adds the
    /// plugin's latency, bandwidth and 2-rank all-reduce rows.
    pub plugin: Option<PathBuf>,
    pub quick: bool,
    pub tcp_streams: usize,
    /// How long to keep trying to reach the peer's control port.
    pub connect_wait: Duration,
    /// Where this node's `/sys` is read (`/` but in tests).
    pub root: crate::sysroot::SysRoot,
}

impl BenchOptions {
    fn peer_device(&self) -> Option<(String, u32)> {
        let dev = self.ibdev.as_ref()?;
        Some((
            self.peer_ibdev.clone().unwrap_or_else(|| dev.clone()),
            self.peer_gid_index.unwrap_or(self.gid_index),
        ))
    }

    /// The checks that need nothing but this node: the device and its GID, perftest, the plugin
    /// library. Run before the peer is even contacted.
    pub fn check_local(&self) -> Result<()> {
        if self.tcp_streams == 0 {
            bail!("--streams must be at least 1");
        }
        if let Some(dev) = &self.ibdev {
            validate::rdma_device(&self.root, dev, self.gid_index)
                .and_then(|()| validate::perftest_installed())
                .map_err(anyhow::Error::msg)
                .context("the RDMA (perftest) rows cannot run here")?;
        }
        if let Some(lib) = &self.plugin {
            validate::plugin_file(lib).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// The same checks on the peer, through its control port.
    fn check_peer(&self, peer: &mut Peer) -> Result<()> {
        if let Some((dev, gid)) = self.peer_device() {
            peer.check(&format!("DEVICE {dev} {gid}"))
                .context("the RDMA (perftest) rows cannot run on the peer")?;
        }
        if self.plugin.is_some() {
            peer.check("PLUGIN")
                .context("the plugin rows cannot run on the peer")?;
        }
        Ok(())
    }
}

/// One row of the per-size results.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRow {
    pub path: String,
    pub test: &'static str,
    pub bytes: u64,
    /// One-way latency (typical), µs, for latency tests.
    pub latency_us: Option<f64>,
    /// Bandwidth, Gbps, for bandwidth tests.
    pub gbps: Option<f64>,
}

/// The summary line of one path, as in the guide's comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct PathSummary {
    pub path: String,
    /// Typical one-way latency of the smallest message, µs.
    pub latency_us: Option<f64>,
    /// Best bandwidth over the sizes measured, Gbps.
    pub gbps: Option<f64>,
    pub error: Option<String>,
}

/// One rccl-tests style row of the 2-rank all-reduce through the plugin.
#[derive(Debug, Clone, Serialize)]
pub struct AllreduceRow {
    pub bytes: u64,
    pub count: u64,
    pub time_us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
    pub wrong: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub peer: String,
    pub summary: Vec<PathSummary>,
    pub rows: Vec<SizeRow>,
    pub allreduce: Vec<AllreduceRow>,
}

impl BenchReport {
    pub fn any_error(&self) -> bool {
        self.summary.iter().any(|p| p.error.is_some())
    }
}

/// Progress on stderr: one line per step, rewritten in place on a terminal.
struct Progress {
    step: usize,
    total: usize,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            step: 0,
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }
    /// Continues numbering at step `n` (0-based): a failed path skips its remaining steps.
    fn resume_at(&mut self, n: usize) {
        self.step = n;
    }
    fn next(&mut self, what: &str) {
        self.step += 1;
        let line = format!(
            "[{}/{}] {:>5.1}s {what}",
            self.step,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
    /// A path failed: said at once, on its own line, not only in the final table.
    fn failed(&mut self, path: &str, e: &anyhow::Error) {
        if self.tty {
            eprintln!();
        }
        eprintln!("halo bench: {path}: {e:#}");
    }
    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Plugin ABI version the benchmark drives (every supported RCCL has v8 or later; v10 is RCCL 7.0+).
const PLUGIN_ABI: u32 = 10;
const TCP_PATH: &str = "TCP";
const PERFTEST_PATH: &str = "RDMA (perftest)";
const PLUGIN_PATH: &str = "RDMA (halo plugin)";
/// How long perftest's client keeps retrying while the peer's server is not listening yet.
const SERVER_START_WAIT: Duration = Duration::from_secs(20);
/// Bound on one perftest client run, and on its server ending after it.
const PERFTEST_LIMIT: Duration = Duration::from_secs(300);

fn latency_sizes(quick: bool) -> Vec<u64> {
    if quick {
        vec![8, 4096]
    } else {
        (3..=20).step_by(1).map(|e| 1u64 << e).collect()
    }
}

fn bandwidth_sizes(quick: bool) -> Vec<u64> {
    if quick {
        vec![1 << 16, 1 << 20]
    } else {
        (16..=26).step_by(2).map(|e| 1u64 << e).collect()
    }
}

/// A figure as it goes into the table: only a positive, finite number is a measurement.
fn measured(value: f64, what: &str) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        bail!("{what} came out as {value}: not a measurement")
    }
}

/// Whether a perftest client failed only because the server was not listening yet.
fn server_not_listening(text: &str) -> bool {
    text.contains("Couldn't connect") || text.contains("Unable to open file descriptor")
}

/// The last lines of a program's output, on one line.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Runs a perftest client against a server the peer started. The client is retried only while
/// the server is still coming up; any other failure ends the row at once with perftest's own
/// words, and the server's end is always collected (stopping it if need be), so the control
/// stream stays in step for the rows after this one.
fn perftest_client(
    peer: &mut Peer,
    program: &str,
    server_args: Vec<String>,
    client_args: Vec<String>,
) -> Result<String> {
    peer.start(program, &server_args)?;
    let started = Instant::now();
    loop {
        let mut cmd = Command::new(program);
        cmd.args(&client_args).arg(peer.ip.to_string());
        let out = match run_bounded(&mut cmd, PERFTEST_LIMIT) {
            Ok(out) => out,
            Err(e) => {
                let server = peer.stop()?;
                bail!("{e:#} (server on the peer: {server})");
            }
        };
        if out.success {
            let server = peer.finish(PERFTEST_LIMIT)?;
            if server.code != 0 {
                bail!("{program} server on the peer failed ({server})");
            }
            return Ok(out.stdout);
        }
        let said = tail(&format!("{}\n{}", out.stdout, out.stderr), 3);
        if let Some(server) = peer.exited()? {
            bail!("{program} server on the peer ended ({server}); client: {said}");
        }
        if server_not_listening(&said) && started.elapsed() < SERVER_START_WAIT {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let server = peer.stop()?;
        bail!(
            "{program} failed (exit {}): {said} (server on the peer: {server})",
            out.code.map_or("signal".into(), |c| c.to_string())
        );
    }
}

fn summarize(path: &str, rows: &[SizeRow], error: Option<String>) -> PathSummary {
    let mine = rows.iter().filter(|r| r.path == path);
    let latency_us = mine
        .clone()
        .filter(|r| r.latency_us.is_some())
        .min_by_key(|r| r.bytes)
        .and_then(|r| r.latency_us);
    let gbps = mine
        .filter_map(|r| r.gbps)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
    PathSummary {
        path: path.to_string(),
        latency_us,
        gbps,
        error,
    }
}

fn latency_row(path: &str, bytes: u64, us: f64) -> SizeRow {
    SizeRow {
        path: path.into(),
        test: "latency",
        bytes,
        latency_us: Some(us),
        gbps: None,
    }
}

fn bandwidth_row(path: &str, bytes: u64, gbps: f64) -> SizeRow {
    SizeRow {
        path: path.into(),
        test: "bandwidth",
        bytes,
        latency_us: None,
        gbps: Some(gbps),
    }
}

fn run_tcp(
    opts: &BenchOptions,
    peer: &mut Peer,
    progress: &mut Progress,
    rows: &mut Vec<SizeRow>,
) -> Result<()> {
    progress.next("TCP latency (8 B ping-pong)");
    let addr = peer.data_port("TCP-LAT")?;
    let l = tcp::latency(addr, if opts.quick { 200 } else { 2000 })?;
    let us = measured(l.typical_us, "TCP latency")?;
    rows.push(latency_row(TCP_PATH, tcp::PING_BYTES as u64, us));
    progress.next(&format!("TCP bandwidth ({} streams)", opts.tcp_streams));
    let addr = peer.data_port(&format!("TCP-BW {}", opts.tcp_streams))?;
    let secs = if opts.quick { 1 } else { 10 };
    let (gbps, sent) = tcp::bandwidth(addr, opts.tcp_streams, Duration::from_secs(secs))?;
    let received = peer.answer()?;
    if received != format!("BYTES {sent}") {
        bail!("TCP stream: sent {sent} bytes, peer says {received}");
    }
    let gbps = measured(gbps, "TCP bandwidth")?;
    rows.push(bandwidth_row(TCP_PATH, 1 << 20, gbps));
    Ok(())
}

fn run_perftest(
    opts: &BenchOptions,
    dev: &str,
    peer: &mut Peer,
    progress: &mut Progress,
    rows: &mut Vec<SizeRow>,
) -> Result<()> {
    let (peer_dev, peer_gid) = opts.peer_device().expect("perftest rows need a device");
    for &size in &latency_sizes(opts.quick) {
        progress.next(&format!("RDMA ib_write_lat {size} B"));
        let iters = if opts.quick { 200 } else { 1000 };
        let out = perftest_client(
            peer,
            "ib_write_lat",
            perftest::args(&peer_dev, peer_gid, size as usize, iters),
            perftest::args(dev, opts.gid_index, size as usize, iters),
        )?;
        let typical = perftest::parse_latency(&out, size as usize)
            .map_err(anyhow::Error::msg)?
            .typical_us;
        let us = measured(typical, &format!("ib_write_lat {size} B"))?;
        rows.push(latency_row(PERFTEST_PATH, size, us));
    }
    for &size in &bandwidth_sizes(opts.quick) {
        progress.next(&format!("RDMA ib_write_bw {size} B"));
        let iters = if opts.quick { 50 } else { 1000 };
        let out = perftest_client(
            peer,
            "ib_write_bw",
            perftest::args(&peer_dev, peer_gid, size as usize, iters),
            perftest::args(dev, opts.gid_index, size as usize, iters),
        )?;
        let (mbps, _) =
            perftest::parse_bandwidth(&out, size as usize).map_err(anyhow::Error::msg)?;
        let gbps = measured(mbps * 8.0 / 1000.0, &format!("ib_write_bw {size} B"))?;
        rows.push(bandwidth_row(PERFTEST_PATH, size, gbps));
    }
    Ok(())
}

fn run_plugin(
    opts: &BenchOptions,
    lib: &std::path::Path,
    peer: &mut Peer,
    progress: &mut Progress,
    rows: &mut Vec<SizeRow>,
    allreduce: &mut Vec<AllreduceRow>,
) -> Result<()> {
    progress.next("RDMA through the halo plugin (latency, bandwidth, 2-rank all-reduce)");
    let port = peer.data_port(&format!("PLUGIN {PLUGIN_ABI}"))?.port();
    let o = halo_harness::bench::Options {
        plugin: lib.to_path_buf(),
        version: PLUGIN_ABI,
        dev: 0,
        suites: halo_harness::bench::Suites {
            latency: true,
            bandwidth: true,
            allreduce: true,
            ..halo_harness::bench::Suites::NONE
        },
        quick: opts.quick,
        window: 16,
        perftest: None,
        peer: halo_harness::bench::PeerLink::Connect(format!("{}:{port}", peer.ip)),
        timeout: Duration::from_secs(120),
        wire_dev: None,
    };
    let r = halo_harness::bench::run(&o).map_err(anyhow::Error::msg)?;
    for l in &r.latency {
        let us = measured(l.typical_us, &format!("plugin latency {} B", l.size))?;
        rows.push(latency_row(PLUGIN_PATH, l.size as u64, us));
    }
    for b in &r.bandwidth {
        let gbps = measured(b.gbps, &format!("plugin bandwidth {} B", b.size))?;
        rows.push(bandwidth_row(PLUGIN_PATH, b.size as u64, gbps));
    }
    for t in r.allreduce.iter().filter(|t| t.ranks == 2) {
        for a in &t.rows {
            measured(a.time_us, &format!("all-reduce {} B time", a.size))?;
            allreduce.push(AllreduceRow {
                bytes: a.size as u64,
                count: a.count as u64,
                time_us: a.time_us,
                algbw_gbs: a.algbw,
                busbw_gbs: a.busbw,
                wrong: a.wrong,
            });
        }
    }
    if let Some(bad) = allreduce.iter().find(|a| a.wrong > 0) {
        bail!(
            "all-reduce of {} bytes gave {} wrong elements",
            bad.bytes,
            bad.wrong
        );
    }
    if allreduce.is_empty() {
        bail!("the plugin run returned no all-reduce rows");
    }
    Ok(())
}

/// Measures every path against a connected peer. The peer's side of every argument is checked
/// first (run [`BenchOptions::check_local`] before connecting); then each path runs on its own,
/// and a failed path is reported in its own summary row while the others go on.
pub fn run(opts: &BenchOptions, mut peer: Peer) -> Result<BenchReport> {
    opts.check_peer(&mut peer)?;
    let tcp_steps = 2;
    let perftest_steps = opts.ibdev.as_ref().map_or(0, |_| {
        latency_sizes(opts.quick).len() + bandwidth_sizes(opts.quick).len()
    });
    let steps = tcp_steps + perftest_steps + usize::from(opts.plugin.is_some());
    let mut progress = Progress::new(steps);
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    let mut record = |path: &str, r: Result<()>, rows: &[SizeRow], progress: &mut Progress| {
        if let Err(e) = &r {
            progress.failed(path, e);
        }
        summary.push(summarize(path, rows, r.err().map(|e| format!("{e:#}"))));
    };

    let r = run_tcp(opts, &mut peer, &mut progress, &mut rows);
    record(TCP_PATH, r, &rows, &mut progress);
    if let Some(dev) = &opts.ibdev {
        progress.resume_at(tcp_steps);
        let r = run_perftest(opts, dev, &mut peer, &mut progress, &mut rows);
        record(PERFTEST_PATH, r, &rows, &mut progress);
    }
    let mut allreduce = Vec::new();
    if let Some(lib) = &opts.plugin {
        progress.resume_at(tcp_steps + perftest_steps);
        let r = run_plugin(
            opts,
            lib,
            &mut peer,
            &mut progress,
            &mut rows,
            &mut allreduce,
        );
        record(PLUGIN_PATH, r, &rows, &mut progress);
    }
    progress.done();
    peer.quit()?;
    Ok(BenchReport {
        peer: opts.peer.to_string(),
        summary,
        rows,
        allreduce,
    })
}

/// Two decimals, or three significant digits below 1: a small measured figure never shows as 0.00.
fn fmt_figure(v: f64) -> String {
    if v >= 1.0 || v == 0.0 {
        format!("{v:.2}")
    } else {
        let decimals = (2 - v.log10().floor() as i32).clamp(2, 9) as usize;
        format!("{v:.decimals$}")
    }
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{} {unit}", fmt_figure(v)))
}

/// The comparison table (path, latency, bandwidth), then the per-size rows.
pub fn render(r: &BenchReport) -> String {
    let mut s = format!("halo bench against {}\n\n", r.peer);
    s.push_str(&format!(
        "{:<20} {:>14} {:>16}\n{}\n",
        "path",
        "latency",
        "bandwidth",
        "-".repeat(52)
    ));
    for p in &r.summary {
        s.push_str(&format!(
            "{:<20} {:>14} {:>16}\n",
            p.path,
            fmt_opt(p.latency_us, "µs"),
            fmt_opt(p.gbps, "Gbps")
        ));
        if let Some(e) = &p.error {
            s.push_str(&format!("  error: {e}\n"));
        }
    }
    s.push_str(&format!(
        "\n{:<20} {:<10} {:>10} {:>14} {:>12}\n",
        "path", "test", "bytes", "latency(us)", "Gbps"
    ));
    for row in &r.rows {
        s.push_str(&format!(
            "{:<20} {:<10} {:>10} {:>14} {:>12}\n",
            row.path,
            row.test,
            row.bytes,
            row.latency_us.map_or("-".into(), |v| format!("{v:.2}")),
            row.gbps.map_or("-".into(), fmt_figure)
        ));
    }
    if !r.allreduce.is_empty() {
        s.push_str("\nall-reduce through the plugin, 2 ranks, float sum\n");
        s.push_str(&format!(
            "{:>12} {:>12} {:>12} {:>12} {:>12} {:>7}\n",
            "size(B)", "count", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
        ));
        for a in &r.allreduce {
            s.push_str(&format!(
                "{:>12} {:>12} {:>12.1} {:>12.6} {:>12.6} {:>7}\n",
                a.bytes, a.count, a.time_us, a.algbw_gbs, a.busbw_gbs, a.wrong
            ));
        }
    }
    s
}

/// The plot's series: one line per path and test.
pub fn series(r: &BenchReport) -> (Vec<Series>, Vec<Series>) {
    let mut lat: Vec<Series> = Vec::new();
    let mut bw: Vec<Series> = Vec::new();
    for row in &r.rows {
        let (list, v) = match (row.latency_us, row.gbps) {
            (Some(l), _) => (&mut lat, l),
            (_, Some(g)) => (&mut bw, g),
            _ => continue,
        };
        match list.iter_mut().find(|s| s.label == row.path) {
            Some(s) => s.points.push((row.bytes, v)),
            None => list.push(Series::new(row.path.clone(), vec![(row.bytes, v)])),
        }
    }
    (lat, bw)
}

#[cfg(test)]
mod figure_tests {
    use super::*;

    #[test]
    fn small_figures_keep_their_digits() {
        assert_eq!(fmt_figure(55.7), "55.70");
        assert_eq!(fmt_figure(0.0023), "0.00230");
        assert_eq!(fmt_figure(0.076), "0.0760");
        assert_eq!(fmt_figure(0.5), "0.500");
        assert!(measured(0.0, "x").is_err());
        assert!(measured(f64::NAN, "x").is_err());
        assert_eq!(measured(0.002, "x").unwrap(), 0.002);
    }
}
