//! `halo bench`: the network path between two nodes at a glance — TCP, raw RDMA (perftest) and
//! the RCCL plugin (its benchmark engine), in one table like the setup guide's comparison, with
//! per-size rows, `--json` and a plot.
//!
//! One node runs `halo bench --listen`; the other runs `halo bench --peer HOST` and drives every
//! test through the listener's control port (see [`control`]).

pub mod control;
pub mod plot;
pub mod tcp;

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
    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Plugin ABI version the benchmark drives (every supported RCCL has v8 or later; v10 is RCCL 7.0+).
const PLUGIN_ABI: u32 = 10;
const PLUGIN_PATH: &str = "RDMA (halo plugin)";

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

/// Runs a perftest client against a server the peer started; retries while the server comes up.
fn perftest_client(
    peer: &mut Peer,
    program: &str,
    server_args: Vec<String>,
    client_args: Vec<String>,
) -> Result<String> {
    peer.start(program, &server_args)?;
    let started = Instant::now();
    let output = loop {
        let out = Command::new(program)
            .args(&client_args)
            .arg(peer.ip.to_string())
            .output()
            .with_context(|| format!("running {program} (install perftest)"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            break text;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "{program} failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let code = peer.finish()?;
    if code != 0 {
        bail!("{program} server on the peer exited with {code}");
    }
    Ok(output)
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

/// Measures every path against the peer.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let mut peer = Peer::connect(opts.peer, opts.connect_wait)?;
    let lat_sizes = latency_sizes(opts.quick);
    let bw_sizes = bandwidth_sizes(opts.quick);
    let rdma = opts.ibdev.is_some();
    let steps =
        2 + if rdma {
            lat_sizes.len() + bw_sizes.len()
        } else {
            0
        } + usize::from(opts.plugin.is_some());
    let mut progress = Progress::new(steps);
    let mut rows = Vec::new();
    let mut summary = Vec::new();

    // TCP
    progress.next("TCP latency (8 B ping-pong)");
    let tcp: Result<()> = (|| {
        let addr = peer.data_port("TCP-LAT")?;
        let l = tcp::latency(addr, if opts.quick { 200 } else { 2000 })?;
        rows.push(SizeRow {
            path: "TCP".into(),
            test: "latency",
            bytes: tcp::PING_BYTES as u64,
            latency_us: Some(l.typical_us),
            gbps: None,
        });
        progress.next(&format!("TCP bandwidth ({} streams)", opts.tcp_streams));
        let addr = peer.data_port(&format!("TCP-BW {}", opts.tcp_streams))?;
        let secs = if opts.quick { 1 } else { 10 };
        let (gbps, sent) = tcp::bandwidth(addr, opts.tcp_streams, Duration::from_secs(secs))?;
        let received = peer.answer()?;
        if received != format!("BYTES {sent}") {
            bail!("TCP stream: sent {sent} bytes, peer says {received}");
        }
        rows.push(SizeRow {
            path: "TCP".into(),
            test: "bandwidth",
            bytes: 1 << 20,
            latency_us: None,
            gbps: Some(gbps),
        });
        Ok(())
    })();
    summary.push(summarize("TCP", &rows, tcp.err().map(|e| format!("{e:#}"))));

    // raw RDMA through perftest
    if let Some(dev) = &opts.ibdev {
        let peer_dev = opts.peer_ibdev.clone().unwrap_or_else(|| dev.clone());
        let peer_gid = opts.peer_gid_index.unwrap_or(opts.gid_index);
        let perf: Result<()> = (|| {
            for &size in &lat_sizes {
                progress.next(&format!("RDMA ib_write_lat {size} B"));
                let iters = if opts.quick { 200 } else { 1000 };
                let out = perftest_client(
                    &mut peer,
                    "ib_write_lat",
                    perftest::args(&peer_dev, peer_gid, size as usize, iters),
                    perftest::args(dev, opts.gid_index, size as usize, iters),
                )?;
                let typical = perftest::parse_latency(&out, size as usize)
                    .map_err(anyhow::Error::msg)?
                    .typical_us;
                rows.push(SizeRow {
                    path: "RDMA (perftest)".into(),
                    test: "latency",
                    bytes: size,
                    latency_us: Some(typical),
                    gbps: None,
                });
            }
            for &size in &bw_sizes {
                progress.next(&format!("RDMA ib_write_bw {size} B"));
                let iters = if opts.quick { 50 } else { 1000 };
                let out = perftest_client(
                    &mut peer,
                    "ib_write_bw",
                    perftest::args(&peer_dev, peer_gid, size as usize, iters),
                    perftest::args(dev, opts.gid_index, size as usize, iters),
                )?;
                let (mbps, _) =
                    perftest::parse_bandwidth(&out, size as usize).map_err(anyhow::Error::msg)?;
                rows.push(SizeRow {
                    path: "RDMA (perftest)".into(),
                    test: "bandwidth",
                    bytes: size,
                    latency_us: None,
                    gbps: Some(mbps * 8.0 / 1000.0),
                });
            }
            Ok(())
        })();
        summary.push(summarize(
            "RDMA (perftest)",
            &rows,
            perf.err().map(|e| format!("{e:#}")),
        ));
    }
    // the RCCL plugin, through its C ABI, against the peer's plugin
    let mut allreduce = Vec::new();
    if let Some(lib) = &opts.plugin {
        progress.next("RDMA through the halo plugin (latency, bandwidth, all-reduce)");
        let plug: Result<()> = (|| {
            let port = peer.data_port(&format!("PLUGIN {PLUGIN_ABI}"))?.port();
            let o = halo_harness::bench::Options {
                plugin: lib.clone(),
                version: PLUGIN_ABI,
                dev: 0,
                suites: halo_harness::bench::Suites {
                    latency: true,
                    bandwidth: true,
                    msgrate: false,
                    allreduce: true,
                    decode: false,
                    scaling: false,
                },
                quick: opts.quick,
                window: 16,
                perftest: None,
                peer: halo_harness::bench::PeerLink::Connect(format!("{}:{port}", peer.ip)),
                timeout: Duration::from_secs(120),
            };
            let r = halo_harness::bench::run(&o).map_err(anyhow::Error::msg)?;
            for l in &r.latency {
                rows.push(SizeRow {
                    path: PLUGIN_PATH.into(),
                    test: "latency",
                    bytes: l.size as u64,
                    latency_us: Some(l.typical_us),
                    gbps: None,
                });
            }
            for b in &r.bandwidth {
                rows.push(SizeRow {
                    path: PLUGIN_PATH.into(),
                    test: "bandwidth",
                    bytes: b.size as u64,
                    latency_us: None,
                    gbps: Some(b.gbps),
                });
            }
            for t in r.allreduce.iter().filter(|t| t.ranks == 2) {
                allreduce.extend(t.rows.iter().map(|a| AllreduceRow {
                    bytes: a.size as u64,
                    count: a.count as u64,
                    time_us: a.time_us,
                    algbw_gbs: a.algbw,
                    busbw_gbs: a.busbw,
                    wrong: a.wrong,
                }));
            }
            if let Some(bad) = allreduce.iter().find(|a| a.wrong > 0) {
                bail!(
                    "all-reduce of {} bytes gave {} wrong elements",
                    bad.bytes,
                    bad.wrong
                );
            }
            Ok(())
        })();
        summary.push(summarize(
            PLUGIN_PATH,
            &rows,
            plug.err().map(|e| format!("{e:#}")),
        ));
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

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2} {unit}"))
}

/// The comparison table (path, latency, bandwidth), then the per-size rows.
pub fn render(r: &BenchReport) -> String {
    let mut s = format!("halo bench against {}\n\n", r.peer);
    s.push_str(&format!(
        "{:<20} {:>14} {:>16}\n",
        "path", "latency", "bandwidth"
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
            row.gbps.map_or("-".into(), |v| format!("{v:.3}"))
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
