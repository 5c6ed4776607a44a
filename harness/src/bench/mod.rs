//! The network benchmark of the plugin: latency, bandwidth, message rate, ring all-reduce,
//! decode-shaped runs of small all-reduces and connection scaling, measured through the exported C ABI between two (or more) processes, with
//! perftest's `ib_write_lat` / `ib_write_bw` on the same device as the reference.
//!
//! [`run`] drives everything from this process; the far ends are *members*: copies of a program
//! that calls [`member_main`] first thing in `main` (spawned here and spoken to over their stdin
//! and stdout), or one [`serve_tcp`] process on another host. Results come back typed
//! ([`Report`]); [`report`] prints them as text or JSON.

pub mod compare;
pub mod control;
mod member;
mod ops;
pub mod perftest;
pub mod report;
mod scaling;
mod suites;
pub mod wire;

pub use member::{member_main, MemberConfig, MEMBER_FLAG};
pub use ops::{DecodeTiming, Net, PhaseSums, Phases, Polls, Ring, RingTiming};
pub use perftest::{BandwidthStats, LatencyStats, PerftestDevice};
pub use scaling::ScalingRow;

use crate::driver::Plugin;
use crate::log::quiet_logger;
use control::Control;
use perftest::Perftest;
use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use suites::{
    allreduce, close_pair, decode, latency, open_pair, release_server, stream, Local, Plan,
};

/// Which measurements to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suites {
    pub latency: bool,
    pub bandwidth: bool,
    pub msgrate: bool,
    pub allreduce: bool,
    pub decode: bool,
    pub scaling: bool,
}

impl Suites {
    pub const ALL: Suites = Suites {
        latency: true,
        bandwidth: true,
        msgrate: true,
        allreduce: true,
        decode: true,
        scaling: true,
    };

    pub const NONE: Suites = Suites {
        latency: false,
        bandwidth: false,
        msgrate: false,
        allreduce: false,
        decode: false,
        scaling: false,
    };
}

/// Where the far end of the two-process measurements lives.
#[derive(Clone, Debug)]
pub enum PeerLink {
    /// Spawn `program args… --bench-member …` on this machine; the program must call
    /// [`member_main`] (the `netbench` example runs itself with no extra arguments).
    Spawn {
        program: OsString,
        args: Vec<OsString>,
    },
    /// A [`serve_tcp`] process at `host:port`, for two hosts or two guests. All-reduce then runs
    /// with 2 ranks only and scaling is skipped: both need local members.
    Connect(String),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// The plugin `.so`.
    pub plugin: PathBuf,
    /// `ncclNetPlugin_vN` table to use.
    pub version: u32,
    /// Plugin device index.
    pub dev: i32,
    pub suites: Suites,
    /// Few sizes and iterations: a smoke run for tests under emulation.
    pub quick: bool,
    /// Outstanding requests of the bandwidth and message-rate streams.
    pub window: usize,
    /// Run perftest on this device first, at the same sizes, and report ratios.
    pub perftest: Option<PerftestDevice>,
    pub peer: PeerLink,
    /// Bound on every single wait (a connection, one transfer, one answer).
    pub timeout: Duration,
    /// The verbs device whose packet counters give the packets on the wire per message
    /// ([`wire`]); default: perftest's device, else the plugin's device if it is a verbs device.
    pub wire_dev: Option<String>,
}

/// One latency size. Times are one-way (round trip / 2), as `ib_write_lat` reports.
#[derive(Clone, Debug)]
pub struct LatencyRow {
    pub size: usize,
    pub iters: usize,
    pub typical_us: f64,
    pub avg_us: f64,
    pub p99_us: f64,
    /// This side's calls (both directions of every round trip).
    pub polls: Polls,
    /// Packets on the wire per one-way message (data, clear-to-send, acknowledgements), from
    /// the device's counters; `None` where they cannot be read.
    pub wire_pkts: Option<f64>,
    pub perftest: Option<LatencyStats>,
}

/// One stream size (bandwidth and message rate share the measurement).
#[derive(Clone, Debug)]
pub struct StreamRow {
    pub size: usize,
    pub count: usize,
    pub window: usize,
    pub seconds: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
    pub gbps: f64,
    pub msgs_per_s: f64,
    /// Sender side.
    pub send_polls: Polls,
    /// Receiver side.
    pub recv_polls: Polls,
    /// Packets on the wire per message, as in [`LatencyRow::wire_pkts`].
    pub wire_pkts: Option<f64>,
    pub perftest: Option<BandwidthStats>,
}

/// One all-reduce size in rccl-tests' columns.
#[derive(Clone, Debug)]
pub struct AllreduceRow {
    pub size: usize,
    pub count: usize,
    /// Mean over the timed iterations, slowest rank.
    pub time_us: f64,
    /// GB/s (10^9 bytes): size / time.
    pub algbw: f64,
    /// GB/s: algbw · 2(n-1)/n, the per-link traffic comparable to a point-to-point bandwidth.
    pub busbw: f64,
    /// Elements differing from the exact sum, over all ranks.
    pub wrong: usize,
}

#[derive(Clone, Debug)]
pub struct AllreduceTable {
    pub ranks: usize,
    pub iters: usize,
    pub rows: Vec<AllreduceRow>,
}

/// One decode shape: steps of `allreduces` back-to-back 2-rank ring all-reduces of `size` bytes,
/// as one generated token of a TP=2 model.
#[derive(Clone, Debug)]
pub struct DecodeRow {
    pub size: usize,
    /// All-reduces per step.
    pub allreduces: usize,
    /// Whether each all-reduce's receives were posted ahead of its data, as RCCL's proxy does.
    pub ahead: bool,
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Mean and median over the timed steps of the slowest rank's time of each step.
    pub step_mean_us: f64,
    pub step_median_us: f64,
    /// `step_mean_us / allreduces`.
    pub allreduce_us: f64,
    /// Elements differing from the exact sum, over every all-reduce and both ranks.
    pub wrong: usize,
    /// Packets on the wire per all-reduce (warm-up steps included).
    pub wire_pkts: Option<f64>,
    /// Rank 0's exchanges in the timed steps: when each send was accepted and each request done.
    pub phases: Phases,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub plugin: PathBuf,
    pub plugin_name: String,
    pub version: u32,
    pub device: String,
    pub quick: bool,
    pub perftest_device: Option<PerftestDevice>,
    pub latency: Vec<LatencyRow>,
    pub bandwidth: Vec<StreamRow>,
    pub msgrate: Vec<StreamRow>,
    pub allreduce: Vec<AllreduceTable>,
    pub decode: Vec<DecodeRow>,
    /// The same shapes with the receives posted ahead.
    pub decode_ahead: Vec<DecodeRow>,
    pub scaling: Vec<ScalingRow>,
    /// Why a requested part was skipped.
    pub notes: Vec<String>,
}

impl Report {
    /// Whether every all-reduce element was exact (the decode rows' included).
    pub fn all_exact(&self) -> bool {
        self.allreduce
            .iter()
            .all(|t| t.rows.iter().all(|r| r.wrong == 0))
            && self
                .decode
                .iter()
                .chain(&self.decode_ahead)
                .all(|r| r.wrong == 0)
    }
}

/// Serves one driving process (`netbench --connect HOST:PORT`) that connects to `bind`.
pub fn serve_tcp(cfg: &MemberConfig, bind: &str) -> Result<(), String> {
    let l = TcpListener::bind(bind).map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let stream = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t0.elapsed() > cfg.timeout {
                    return Err(format!(
                        "nobody connected to {bind} within {:?}",
                        cfg.timeout
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept on {bind}: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let who = format!("driver {}", stream.peer_addr().map_err(|e| e.to_string())?);
    member::serve(cfg, Control::tcp(stream, who)?)
}

/// Loads and initialises the plugin, and names the device to measure.
fn open_plugin(o: &Options) -> Result<(Plugin, String), String> {
    let mut plugin = Plugin::load(&o.plugin, o.version)?;
    plugin
        .init(quiet_logger(), u64::from(std::process::id()))
        .map_err(|e| e.to_string())?;
    let ndev = plugin.devices().map_err(|e| e.to_string())?;
    if o.dev < 0 || o.dev as usize >= ndev {
        return Err(format!(
            "device {} does not exist: the plugin found {ndev} device(s)",
            o.dev
        ));
    }
    let device = plugin.properties(o.dev).map_err(|e| e.to_string())?.name;
    Ok((plugin, device))
}

/// Runs the selected measurements; see [`Options`].
pub fn run(o: &Options) -> Result<Report, String> {
    let (plugin, device) = open_plugin(o).inspect_err(|_| {
        // The server started for this run waits for its driver: release it, so that the next
        // run of a comparison meets the next server instead of this one.
        release_server(o);
    })?;
    let wire_dev = o
        .wire_dev
        .clone()
        .or_else(|| o.perftest.as_ref().map(|p| p.ibdev.clone()))
        .unwrap_or_else(|| device.clone());
    let local = Local {
        plugin,
        timeout: o.timeout,
        dev: o.dev,
        wire: wire::WireCounter::open(&wire_dev),
        both_ends_here: !matches!(o.peer, PeerLink::Connect(_)),
    };
    let plan = Plan::new(o.quick);
    let mut pt = o.perftest.clone().map(|d| Perftest::new(d, o.timeout));
    let mut report = Report {
        plugin: o.plugin.clone(),
        plugin_name: local.plugin.name(),
        version: o.version,
        device,
        quick: o.quick,
        perftest_device: o.perftest.clone(),
        latency: Vec::new(),
        bandwidth: Vec::new(),
        msgrate: Vec::new(),
        allreduce: Vec::new(),
        decode: Vec::new(),
        decode_ahead: Vec::new(),
        scaling: Vec::new(),
        notes: Vec::new(),
    };
    let s = o.suites;
    if s.latency || s.bandwidth || s.msgrate || s.allreduce || s.decode {
        let mut pair = open_pair(&local, o)?;
        let r = (|| {
            if s.latency {
                report.latency = latency(&local, &mut pair, o, &plan.latency, pt.as_mut())?;
            }
            if s.bandwidth {
                report.bandwidth = stream(&local, &mut pair, o, &plan.bandwidth, pt.as_mut())?;
            }
            if s.msgrate {
                report.msgrate = stream(&local, &mut pair, o, &plan.msgrate, pt.as_mut())?;
            }
            if s.allreduce {
                report
                    .allreduce
                    .push(allreduce(&local, Some(&mut pair), o, 2, &plan.allreduce)?);
            }
            if s.decode {
                report.decode = decode(&local, &mut pair, o, &plan.decode, false)?;
                report.decode_ahead = decode(&local, &mut pair, o, &plan.decode, true)?;
            }
            Ok::<_, String>(())
        })();
        close_pair(&local, pair, o.timeout)?;
        r?;
    }
    let remote = matches!(o.peer, PeerLink::Connect(_));
    if s.allreduce {
        if remote {
            report
                .notes
                .push("4-rank all-reduce skipped: it needs local members".into());
        } else {
            // Four busy-polling ranks share the guest's CPUs: beyond 4 MiB a run takes minutes.
            let sizes: Vec<usize> = plan
                .allreduce
                .iter()
                .copied()
                .filter(|&s| o.quick || s <= 4 << 20)
                .collect();
            report
                .allreduce
                .push(allreduce(&local, None, o, 4, &sizes)?);
        }
    }
    if s.scaling {
        if remote {
            report
                .notes
                .push("scaling skipped: it needs local members".into());
        } else {
            for &k in &plan.peers {
                report.scaling.push(scaling::measure(&local, o, k)?);
            }
        }
    }
    let Local { mut plugin, .. } = local;
    plugin.finalize().map_err(|e| e.to_string())?;
    Ok(report)
}
