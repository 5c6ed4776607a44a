//! `halo bench --collective`: all-reduce and all-gather through `torch.distributed` with one rank
//! per node, placed by Ray, once per transport (the plugin, the plugin without GPU-direct,
//! RCCL's built-in IB, RCCL over sockets; or `gloo` on CPU), printed with rccl-tests' columns.
//! RCCL's INFO lines of every run are checked against the transport the run claims.

pub mod rccl_log;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::plot::{self, Panel, Series};
use crate::cluster::{self, ClusterConfig};
use crate::doctor::plugin::plugin_env;
use crate::process::run_bounded;
use rccl_log::{Claim, TransportSeen};

const DRIVER: &str = include_str!("ranks.py");

/// Environment variable that names the ranks' python (default: the `python` beside `ray`).
pub const PYTHON_ENV: &str = "HALO_PYTHON";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// RCCL with the halo plugin (NCCL_NET_PLUGIN), GPU-direct as RCCL decides.
    Plugin,
    /// The plugin with NCCL_NET_GDR_LEVEL=LOC: GPU-direct off.
    PluginNoGdr,
    /// RCCL's built-in IB verbs transport (NCCL_NET=IB, no plugin).
    Ib,
    /// RCCL over TCP sockets (NCCL_NET=Socket, no plugin).
    Socket,
    /// torch's gloo backend on CPU (no RCCL; runs on any machine).
    Gloo,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plugin => "plugin",
            Variant::PluginNoGdr => "plugin-nogdr",
            Variant::Ib => "ib",
            Variant::Socket => "socket",
            Variant::Gloo => "gloo",
        }
    }

    fn backend(self) -> &'static str {
        if self == Variant::Gloo {
            "gloo"
        } else {
            "nccl"
        }
    }

    /// The environment that selects this transport, on top of the node's own (which
    /// `halo cluster up` gave the plugin's directory on LD_LIBRARY_PATH).
    ///
    /// The plugin is named the way every RCCL loads it: `NCCL_NET_PLUGIN=halo` resolves to
    /// librccl-net-halo.so on the loader path (RCCL of ROCm 6.1 and 6.2 never opens a path).
    /// The built-in transports are chosen by `NCCL_NET`, which every RCCL matches against
    /// the networks' names, so the IB row is RCCL's own IB even where a plugin is loaded.
    /// `NCCL_NET_PLUGIN=none` keeps the plugin from loading at all: the newest RCCL treats
    /// "none" as "no external plugin"; older ones look for a library named after it
    /// (librccl-net-none.so), find none, and use their internal networks.
    pub fn env(self, cfg: &ClusterConfig) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_string(), v.to_string());
        };
        if self != Variant::Gloo {
            set("NCCL_DEBUG", "INFO");
            set("NCCL_DEBUG_SUBSYS", "INIT,NET");
        }
        let plugin = plugin_env(&cfg.rccl.plugin)
            .into_iter()
            .find(|(k, _)| k == "NCCL_NET_PLUGIN")
            .map(|(_, v)| v)
            .unwrap_or_default();
        match self {
            Variant::Plugin => {
                set("NCCL_NET_PLUGIN", &plugin);
                set("NCCL_NET_GDR_LEVEL", &cfg.rccl.gdr_level);
            }
            Variant::PluginNoGdr => {
                set("NCCL_NET_PLUGIN", &plugin);
                set("NCCL_NET_GDR_LEVEL", "LOC");
            }
            Variant::Ib => {
                set("NCCL_NET_PLUGIN", "none");
                set("NCCL_NET", "IB");
                set("NCCL_IB_DISABLE", "0");
                set("NCCL_NET_GDR_LEVEL", "LOC");
            }
            Variant::Socket => {
                set("NCCL_NET_PLUGIN", "none");
                set("NCCL_NET", "Socket");
                set("NCCL_IB_DISABLE", "1");
            }
            Variant::Gloo => {}
        }
        env
    }

    /// What RCCL's log must show; None for gloo (no RCCL).
    pub fn claim(self) -> Option<Claim> {
        let c = |network: &str, gdr| {
            Some(Claim {
                network: network.to_string(),
                gdr,
            })
        };
        match self {
            Variant::Plugin => c("halo", None),
            Variant::PluginNoGdr => c("halo", Some(false)),
            Variant::Ib => c("IB", Some(false)),
            Variant::Socket => c("Socket", Some(false)),
            Variant::Gloo => None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CollectiveArgs {
    /// Transports to compare [default: plugin,plugin-nogdr,ib,socket; gloo for CPU-only nodes].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub variants: Vec<Variant>,
    /// Largest message in bytes (from 4 KiB, doubling).
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    pub max_bytes: u64,
    /// Timed iterations per size.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub iters: u32,
    /// Decode-shaped steps timed per row.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub decode_steps: u32,
    /// Element types (fp32, bf16) [default: fp32,bf16; fp32 with gloo, which has no bf16].
    #[arg(long, alias = "dtype", value_delimiter = ',', value_name = "LIST")]
    pub dtypes: Vec<String>,
    /// Seconds one variant may take before it is reported as failed.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub variant_timeout: u64,
    /// Corrupt N elements of rank 0's checked result (to see #wrong work).
    #[arg(long, hide = true, default_value_t = 0)]
    pub inject_wrong: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub op: String,
    pub dtype: String,
    pub size: u64,
    pub count: u64,
    /// Slowest rank's mean time per operation.
    pub time_us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
    /// Elements that differ from the expected result, summed over ranks.
    pub wrong: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub ops: u32,
    pub size: u64,
    pub dtype: String,
    pub step_us: f64,
    pub wrong: u64,
}

/// Where one rank ran, as the rank saw it: inside the node's runtime, these are the
/// container's paths.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RankFacts {
    pub rank: u64,
    pub node_ip: String,
    pub hostname: String,
    pub pid: u64,
    /// The rank's `sys.executable` and `sys.prefix`.
    pub python: String,
    pub prefix: String,
    pub torch: String,
    /// The directory torch was imported from.
    pub torch_path: String,
}

impl RankFacts {
    fn from_json(r: &Value) -> RankFacts {
        let text = |k: &str| r[k].as_str().unwrap_or("?").to_string();
        RankFacts {
            rank: r["rank"].as_u64().unwrap_or(0),
            node_ip: text("node_ip"),
            hostname: text("hostname"),
            pid: r["pid"].as_u64().unwrap_or(0),
            python: text("python"),
            prefix: text("prefix"),
            torch: text("torch"),
            torch_path: text("torch_path"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    pub backend: String,
    pub env: BTreeMap<String, String>,
    /// What RCCL's log showed (None for gloo).
    pub transport: Option<TransportSeen>,
    pub error: Option<String>,
    /// Where each rank ran (empty when the driver reported nothing).
    pub ranks: Vec<RankFacts>,
    pub rows: Vec<Row>,
    pub decode: Vec<DecodeRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CollectiveReport {
    pub ranks: usize,
    pub nodes: Vec<String>,
    pub torch: Option<String>,
    /// What was left out of the run and why (e.g. bf16 with gloo).
    pub notes: Vec<String>,
    pub variants: Vec<VariantResult>,
}

impl CollectiveReport {
    pub fn wrong(&self) -> u64 {
        self.variants
            .iter()
            .flat_map(|v| {
                v.rows
                    .iter()
                    .map(|r| r.wrong)
                    .chain(v.decode.iter().map(|d| d.wrong))
            })
            .sum()
    }

    pub fn failed(&self) -> bool {
        self.wrong() > 0 || self.variants.iter().any(|v| v.error.is_some())
    }
}

/// 4 KiB, 8 KiB, … up to `max`.
pub fn sizes(max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut s = 4096u64;
    while s <= max.max(4096) {
        v.push(s);
        s *= 2;
    }
    v
}

/// rccl-tests' bus-bandwidth factor for `n` ranks.
pub fn bus_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        _ => (n - 1.0) / n,
    }
}

/// Run inside the head's runtime as `sh -c FIND_PYTHON sh RAY ARGS…`: execs the Python that
/// runs `RAY` there (the interpreter on its `#!` line, also through `/usr/bin/env`) with
/// `ARGS…`, else `python3`. A `ray` on PATH is often a link into a virtual environment whose
/// Python is not the `python3` on PATH (the only one that can import `ray`).
pub const FIND_PYTHON: &str = r#"r=$(command -v "$1" 2>/dev/null) || { echo "halo: $1 not found on PATH (the ranks' driver runs with the Python of ray)" >&2; exit 127; }
shift
py=python3
first=
IFS= read -r first < "$r" || true
case "$first" in
  '#!'*)
    line=${first#??}; line=${line# }
    interp=${line%% *}
    case "$interp" in
      */env) cand=${line#"$interp"}; cand=${cand# }; cand=${cand%% *} ;;
      *) cand=$interp ;;
    esac
    case "${cand##*/}" in
      python*) command -v "$cand" >/dev/null 2>&1 && py=$cand ;;
    esac
    ;;
esac
exec "$py" "$@"
"#;

/// The command, run inside the head's runtime, that starts the ranks' driver with its arguments
/// appended: `HALO_PYTHON`; else `python` beside a `ray` given by path; else the Python of the
/// `ray` on the runtime's PATH ([`FIND_PYTHON`]).
pub fn driver_python(cfg: &ClusterConfig) -> Vec<String> {
    if let Ok(p) = std::env::var(PYTHON_ENV) {
        if !p.is_empty() {
            return vec![p];
        }
    }
    let ray = cfg.ray_for(cfg.head());
    match Path::new(&ray).parent() {
        Some(dir) if ray.contains('/') => vec![dir.join("python").to_string_lossy().into_owned()],
        _ => vec![
            "sh".to_string(),
            "-c".to_string(),
            FIND_PYTHON.to_string(),
            "sh".to_string(),
            ray,
        ],
    }
}

/// What a run measures, settled from the arguments alone (before anything starts).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub variants: Vec<Variant>,
    pub dtypes: Vec<String>,
    /// What the defaults left out and why; shown with the results.
    pub notes: Vec<String>,
}

/// Why gloo runs leave bf16 out.
pub const GLOO_BF16: &str = "torch's gloo backend rejects bf16 all-reduce and all-gather \
     (\"Invalid scalar type\" in Debian's torch 1.13)";

/// Checks the arguments and settles variants and types; errors here come before any run.
pub fn plan(args: &CollectiveArgs) -> Result<Plan> {
    let variants = if args.variants.is_empty() {
        vec![
            Variant::Plugin,
            Variant::PluginNoGdr,
            Variant::Ib,
            Variant::Socket,
        ]
    } else {
        args.variants.clone()
    };
    let gloo = variants.contains(&Variant::Gloo);
    if gloo && variants.iter().any(|v| *v != Variant::Gloo) {
        bail!("gloo cannot be mixed with the RCCL variants in one run");
    }
    for d in &args.dtypes {
        if d != "fp32" && d != "bf16" {
            bail!("--dtypes: unknown type '{d}' (fp32, bf16)");
        }
    }
    let mut notes = Vec::new();
    let dtypes = if args.dtypes.is_empty() {
        if gloo {
            notes.push(format!("bf16 not measured: {GLOO_BF16}"));
            vec!["fp32".to_string()]
        } else {
            vec!["fp32".to_string(), "bf16".to_string()]
        }
    } else {
        if gloo && args.dtypes.iter().any(|d| d == "bf16") {
            bail!("--dtypes bf16 cannot run with --variants gloo: {GLOO_BF16}; use --dtypes fp32 with gloo, or the RCCL variants for bf16");
        }
        let mut d: Vec<String> = Vec::new();
        for t in &args.dtypes {
            if !d.contains(t) {
                d.push(t.clone());
            }
        }
        d
    };
    Ok(Plan {
        variants,
        dtypes,
        notes,
    })
}

/// Runs every variant and gathers the report (errors of single variants are in the report).
pub fn run(args: &CollectiveArgs, config_path: &Path) -> Result<CollectiveReport> {
    let Plan {
        variants,
        dtypes,
        notes,
    } = plan(args)?;
    let cfg = ClusterConfig::load(config_path)?;
    if cfg.nodes.len() < 2 {
        bail!(
            "--collective needs at least two nodes in {}",
            config_path.display()
        );
    }
    for n in &notes {
        eprintln!("collective: note: {n}");
    }
    let mut results = Vec::new();
    let mut torch = None;
    // One driver per variant keeps a hung variant from taking the others with it.
    for variant in variants {
        let spec = json!({
            "address": cfg.head_address(),
            "head_ip": cfg.head().ip,
            "node_ips": cfg.nodes.iter().map(|n| n.ip.clone()).collect::<Vec<_>>(),
            "backend": variant.backend(),
            "ops": ["all_reduce", "all_gather"],
            "dtypes": dtypes,
            "sizes": sizes(args.max_bytes),
            "iters": args.iters.max(1),
            "warmup": 2,
            "decode": [[64, 8192], [160, 16384]],
            "decode_dtype": if variant.backend() == "nccl" { "bf16" } else { "fp32" },
            "decode_steps": args.decode_steps.max(1),
            "inject_wrong": args.inject_wrong,
            "timeout_secs": args.variant_timeout,
            "variants": [{"name": variant.name(), "env": variant.env(&cfg)}],
        });
        let mut argv = driver_python(&cfg);
        argv.extend(["-c".to_string(), DRIVER.to_string(), spec.to_string()]);
        let mut cmd = cluster::node_command(&cfg, cfg.head(), &argv);
        eprintln!(
            "collective: {} on {} ranks",
            variant.name(),
            cfg.nodes.len()
        );
        let out = run_bounded(&mut cmd, Duration::from_secs(args.variant_timeout + 120))?;
        let parsed = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("HALO_COLLECTIVE_RESULT "))
            .map(serde_json::from_str::<Value>)
            .transpose()
            .context("the ranks' driver printed a malformed result")?;
        let Some(Value::Array(list)) = parsed else {
            let tail: Vec<&str> = out.stderr.lines().rev().take(15).collect();
            results.push(failed(
                variant,
                &cfg,
                format!(
                    "the ranks' driver failed (exit {:?}):\n    {}",
                    out.code,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
                ),
            ));
            continue;
        };
        for v in &list {
            if torch.is_none() {
                torch = v["ranks"][0]["torch"].as_str().map(str::to_string);
            }
            results.push(assemble(variant, &cfg, v));
        }
    }
    Ok(CollectiveReport {
        ranks: cfg.nodes.len(),
        nodes: cfg.nodes.iter().map(|n| n.ip.clone()).collect(),
        torch,
        notes,
        variants: results,
    })
}

fn failed(variant: Variant, cfg: &ClusterConfig, error: String) -> VariantResult {
    VariantResult {
        variant,
        backend: variant.backend().to_string(),
        env: variant.env(cfg),
        transport: None,
        error: Some(error),
        ranks: Vec::new(),
        rows: Vec::new(),
        decode: Vec::new(),
    }
}

/// Turns the ranks' raw results into rows: slowest rank's time, summed #wrong, and the
/// transport check (a run on the wrong transport keeps no rows).
pub fn assemble(variant: Variant, cfg: &ClusterConfig, v: &Value) -> VariantResult {
    if let Some(e) = v["error"].as_str() {
        return failed(variant, cfg, e.to_string());
    }
    let ranks = v["ranks"].as_array().cloned().unwrap_or_default();
    let world = ranks.len();
    let mut result = failed(variant, cfg, String::new());
    result.error = None;
    result.ranks = ranks.iter().map(RankFacts::from_json).collect();
    if let Some(claim) = variant.claim() {
        let lines: Vec<String> = ranks
            .iter()
            .flat_map(|r| r["log"].as_array().cloned().unwrap_or_default())
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect();
        let seen = rccl_log::parse(lines.iter().map(String::as_str));
        if let Err(e) = rccl_log::verify(&seen, &claim) {
            result.error = Some(format!(
                "{} is not a {} run: {e}",
                variant.name(),
                claim.network
            ));
            result.transport = Some(seen);
            return result;
        }
        result.transport = Some(seen);
    }
    let Some(first) = ranks.first() else {
        result.error = Some("no rank reported".into());
        return result;
    };
    let get = |r: &Value, key: &str, i: usize, field: &str| -> Value { r[key][i][field].clone() };
    for (i, row) in first["rows"].as_array().into_iter().flatten().enumerate() {
        let time_us = ranks
            .iter()
            .filter_map(|r| get(r, "rows", i, "time_us").as_f64())
            .fold(0.0, f64::max);
        let wrong = ranks
            .iter()
            .filter_map(|r| get(r, "rows", i, "wrong").as_u64())
            .sum();
        let op = row["op"].as_str().unwrap_or("?").to_string();
        let size = row["size"].as_u64().unwrap_or(0);
        let algbw = if time_us > 0.0 {
            size as f64 / (time_us * 1e3)
        } else {
            0.0
        };
        result.rows.push(Row {
            busbw_gbs: algbw * bus_factor(&op, world),
            op,
            dtype: row["dtype"].as_str().unwrap_or("?").to_string(),
            size,
            count: row["count"].as_u64().unwrap_or(0),
            time_us,
            algbw_gbs: algbw,
            wrong,
        });
    }
    for (i, d) in first["decode"].as_array().into_iter().flatten().enumerate() {
        result.decode.push(DecodeRow {
            ops: d["ops"].as_u64().unwrap_or(0) as u32,
            size: d["size"].as_u64().unwrap_or(0),
            dtype: d["dtype"].as_str().unwrap_or("?").to_string(),
            step_us: ranks
                .iter()
                .filter_map(|r| get(r, "decode", i, "step_us").as_f64())
                .fold(0.0, f64::max),
            wrong: ranks
                .iter()
                .filter_map(|r| get(r, "decode", i, "wrong").as_u64())
                .sum(),
        });
    }
    result
}

/// rccl-tests-style tables per variant, then the variants side by side with ratios to the first.
pub fn render(report: &CollectiveReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "collective bench: {} ranks on {} (torch {})",
        report.ranks,
        report.nodes.join(", "),
        report.torch.as_deref().unwrap_or("?")
    );
    for n in &report.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for v in &report.variants {
        let _ = writeln!(s, "\n## {} ({})", v.variant.name(), v.backend);
        if let Some(t) = &v.transport {
            let abi = t.plugin_abi.map(|v| format!(" (v{v})")).unwrap_or_default();
            let _ = writeln!(
                s,
                "   transport: network {}, plugin {}{abi}, {} of {} network channels GDRDMA",
                t.network.as_deref().unwrap_or("?"),
                t.plugin.as_deref().unwrap_or("none"),
                t.gdr_channels,
                t.net_channels
            );
        }
        for r in &v.ranks {
            let _ = writeln!(
                s,
                "   rank {} on {} (host {}, pid {}): python {} (prefix {}), torch {} from {}",
                r.rank, r.node_ip, r.hostname, r.pid, r.python, r.prefix, r.torch, r.torch_path
            );
        }
        if let Some(e) = &v.error {
            let _ = writeln!(s, "   ERROR: {e}");
            continue;
        }
        let _ = writeln!(
            s,
            "{:>12} {:>12} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "size(B)", "count", "type", "op", "time(us)", "algbw", "busbw", "#wrong"
        );
        for r in &v.rows {
            let _ = writeln!(
                s,
                "{:>12} {:>12} {:>6} {:>10} {:>10.1} {:>8.3} {:>8.3} {:>8}",
                r.size, r.count, r.dtype, r.op, r.time_us, r.algbw_gbs, r.busbw_gbs, r.wrong
            );
        }
        for d in &v.decode {
            let _ = writeln!(
                s,
                "   decode step: {} x {} KiB all-reduce ({}): {:.1} us/step ({:.2} us each), #wrong {}",
                d.ops,
                d.size / 1024,
                d.dtype,
                d.step_us,
                d.step_us / f64::from(d.ops.max(1)),
                d.wrong
            );
        }
    }
    let ok: Vec<&VariantResult> = report
        .variants
        .iter()
        .filter(|v| v.error.is_none())
        .collect();
    if ok.len() > 1 {
        let base = ok[0];
        let _ = writeln!(
            s,
            "\n## side by side (time in us; ratio = time / {} time)",
            base.variant.name()
        );
        let mut head = format!("{:>12} {:>6} {:>10}", "size(B)", "type", "op");
        for v in &ok {
            let _ = write!(head, " {:>14}", v.variant.name());
        }
        let _ = writeln!(s, "{head}");
        for (i, r) in base.rows.iter().enumerate() {
            let mut line = format!("{:>12} {:>6} {:>10}", r.size, r.dtype, r.op);
            for v in &ok {
                match v.rows.get(i) {
                    Some(o) if r.time_us > 0.0 => {
                        let _ = write!(line, " {:>7.1} ({:.2})", o.time_us, o.time_us / r.time_us);
                    }
                    _ => {
                        let _ = write!(line, " {:>14}", "-");
                    }
                }
            }
            let _ = writeln!(s, "{line}");
        }
    }
    let wrong = report.wrong();
    if wrong > 0 {
        let _ = writeln!(s, "\nFAIL: {wrong} wrong elements in the checked results");
    }
    s
}

/// The plot's lines: bus bandwidth per variant, op and type (colour by variant, stroke by op
/// and type), and the decode-step time per variant. Failed variants have no lines.
pub fn plot_series(report: &CollectiveReport) -> (Vec<Series>, Vec<Series>) {
    let mut kinds: Vec<(String, String)> = Vec::new();
    let mut busbw: Vec<Series> = Vec::new();
    let mut decode: Vec<Series> = Vec::new();
    for (color, v) in report.variants.iter().enumerate() {
        if v.error.is_some() {
            continue;
        }
        for r in &v.rows {
            let kind = (r.op.clone(), r.dtype.clone());
            let dash = match kinds.iter().position(|k| *k == kind) {
                Some(i) => i,
                None => {
                    kinds.push(kind);
                    kinds.len() - 1
                }
            };
            let label = format!("{} {} {}", v.variant.name(), r.op, r.dtype);
            match busbw.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push((r.size, r.busbw_gbs)),
                None => busbw.push(Series {
                    color: Some(color),
                    dash,
                    ..Series::new(label, vec![(r.size, r.busbw_gbs)])
                }),
            }
        }
        if !v.decode.is_empty() {
            let dtype = &v.decode[0].dtype;
            decode.push(Series {
                color: Some(color),
                ..Series::new(
                    format!("{} ({dtype})", v.variant.name()),
                    v.decode.iter().map(|d| (d.size, d.step_us)).collect(),
                )
            });
        }
    }
    (busbw, decode)
}

/// The chart `--collective --plot` writes: bus bandwidth against size, and the decode steps.
pub fn plot_svg(report: &CollectiveReport) -> String {
    let (busbw, decode) = plot_series(report);
    let mut shapes: Vec<String> = Vec::new();
    for d in report.variants.iter().flat_map(|v| &v.decode) {
        let shape = format!("{} x {} KiB", d.ops, d.size / 1024);
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
    }
    let decode_title = if shapes.is_empty() {
        "decode step".to_string()
    } else {
        format!("decode step: {} all-reduces", shapes.join(", "))
    };
    plot::svg_panels(&[
        Panel {
            title: "bus bandwidth",
            unit: "busbw (GB/s)",
            series: &busbw,
            log_y: false,
        },
        Panel {
            title: &decode_title,
            unit: "time per step (µs)",
            series: &decode,
            log_y: false,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Node;

    fn cfg() -> ClusterConfig {
        let node = |ip: &str| Node {
            host: ip.into(),
            ip: ip.into(),
            iface: "lo".into(),
            rdma_device: "rxe0".into(),
            gid_index: 1,
            ssh_user: None,
            ssh_port: None,
            ray: None,
            runtime: None,
        };
        ClusterConfig::new(
            vec![node("10.0.0.1"), node("10.0.0.2")],
            Some("/p/lib.so".into()),
        )
    }

    #[test]
    fn sizes_and_factors() {
        assert_eq!(sizes(32768), [4096, 8192, 16384, 32768]);
        assert_eq!(sizes(256 << 20).len(), 17);
        assert_eq!(bus_factor("all_reduce", 2), 1.0);
        assert_eq!(bus_factor("all_gather", 2), 0.5);
    }

    #[test]
    fn variant_environments() {
        let mut c = cfg();
        // The installed library is named as every RCCL loads it: by its short name (RCCL of
        // ROCm 6.1/6.2 would look for librccl-net-/opt/....so.so and silently use IB).
        c.rccl.plugin = "/opt/halo/lib/librccl-net-halo.so".into();
        for v in [Variant::Plugin, Variant::PluginNoGdr] {
            assert_eq!(v.env(&c)["NCCL_NET_PLUGIN"], "halo", "{v:?}");
        }
        // A library under another file name can only be given by its path.
        let c = cfg();
        let p = Variant::Plugin.env(&c);
        assert_eq!(p["NCCL_NET_PLUGIN"], "/p/lib.so");
        assert_eq!(p["NCCL_DEBUG"], "INFO");
        assert_eq!(p["NCCL_DEBUG_SUBSYS"], "INIT,NET");
        assert_eq!(Variant::PluginNoGdr.env(&c)["NCCL_NET_GDR_LEVEL"], "LOC");
        let ib = Variant::Ib.env(&c);
        assert_eq!(
            (ib["NCCL_NET"].as_str(), ib["NCCL_NET_PLUGIN"].as_str()),
            ("IB", "none")
        );
        assert_eq!(Variant::Socket.env(&c)["NCCL_NET"], "Socket");
        assert!(Variant::Gloo.env(&c).is_empty());
    }

    fn raw(log: &[&str], wrong: u64) -> Value {
        let rank = |rank: u64, t: f64| {
            json!({"rank": rank, "node_ip": format!("10.0.0.{}", rank + 1), "hostname": "n", "pid": 100 + rank,
                   "python": "/opt/venv/bin/python3", "prefix": "/opt/venv",
                   "torch": "2.11", "torch_path": "/usr/lib/python3/dist-packages/torch", "log": log,
                   "rows": [{"op": "all_reduce", "dtype": "fp32", "size": 4096, "count": 1024, "time_us": t, "wrong": wrong}],
                   "decode": [{"ops": 64, "size": 8192, "dtype": "bf16", "step_us": 900.0, "wrong": 0}]})
        };
        json!({"name": "x", "ranks": [rank(0, 10.0), rank(1, 20.0)]})
    }

    #[test]
    fn rows_take_the_slowest_rank_and_sum_wrong() {
        let log = [
            "a:1:2 [0] NCCL INFO Using network halo",
            "a:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/halo/0",
        ];
        let v = assemble(Variant::PluginNoGdr, &cfg(), &raw(&log, 3));
        assert_eq!(v.error, None);
        let r = &v.rows[0];
        assert_eq!((r.time_us, r.wrong), (20.0, 6));
        assert!((r.algbw_gbs - 4096.0 / 20e3).abs() < 1e-9);
        assert_eq!(r.busbw_gbs, r.algbw_gbs);
        assert_eq!(v.decode[0].step_us, 900.0);
        // Where each rank ran, as it reported it, in the report and its text.
        assert_eq!(
            v.ranks[1],
            RankFacts {
                rank: 1,
                node_ip: "10.0.0.2".into(),
                hostname: "n".into(),
                pid: 101,
                python: "/opt/venv/bin/python3".into(),
                prefix: "/opt/venv".into(),
                torch: "2.11".into(),
                torch_path: "/usr/lib/python3/dist-packages/torch".into(),
            }
        );
        let report = CollectiveReport {
            ranks: 2,
            nodes: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            torch: Some("2.11".into()),
            notes: Vec::new(),
            variants: vec![v],
        };
        assert!(
            render(&report).contains(
                "   rank 1 on 10.0.0.2 (host n, pid 101): python /opt/venv/bin/python3 (prefix /opt/venv), \
                 torch 2.11 from /usr/lib/python3/dist-packages/torch\n"
            ),
            "{}",
            render(&report)
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["variants"][0]["ranks"][0]["python"],
            "/opt/venv/bin/python3"
        );
    }

    /// The driver runs with the Python of the `ray` the runtime's PATH finds: the one on its
    /// `#!` line (directly or through env), else python3.
    #[test]
    fn the_driver_runs_with_the_python_of_ray() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let venv = dir.path().join("venv/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&venv).unwrap();
        let script = |path: &Path, text: &str| {
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // Stand-ins for the venv's Python and the python3 on PATH: they say who they are.
        script(&venv.join("python3"), "#!/bin/sh\necho venv \"$@\"\n");
        script(&bin.join("python3"), "#!/bin/sh\necho path \"$@\"\n");
        let mut c = cfg();
        c.ray.executable = "ray".into();
        let argv = driver_python(&c);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert_eq!(argv[3..], ["sh", "ray"]);
        let run_with = |shebang: &str| {
            script(&bin.join("ray"), &format!("{shebang}\nimport ray\n"));
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .args(["-c", "print(1)", "{\"a\": 1}"])
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let venv_py = venv.join("python3").display().to_string();
        for shebang in [format!("#!{venv_py}"), format!("#! {venv_py} -E")] {
            assert_eq!(
                run_with(&shebang),
                (
                    Some(0),
                    "venv -c print(1) {\"a\": 1}\n".into(),
                    String::new()
                ),
                "{shebang}"
            );
        }
        for shebang in ["#!/usr/bin/env python3", "#!/bin/sh", "\u{7f}ELF"] {
            assert_eq!(
                run_with(shebang),
                (
                    Some(0),
                    "path -c print(1) {\"a\": 1}\n".into(),
                    String::new()
                ),
                "{shebang}"
            );
        }
        // A venv Python that is gone: python3 on PATH.
        let missing = dir.path().join("gone/bin/python3").display().to_string();
        assert_eq!(
            run_with(&format!("#!{missing}")).1,
            "path -c print(1) {\"a\": 1}\n"
        );
        // No ray at all: a clear error, not Python's "No module named ray".
        std::fs::remove_file(bin.join("ray")).unwrap();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(127));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("halo: ray not found on PATH"),
            "{out:?}"
        );
        // `ray` by path: the python beside it, without a shell.
        c.ray.executable = "/opt/ray/bin/ray".into();
        assert_eq!(driver_python(&c), ["/opt/ray/bin/python"]);
    }

    #[test]
    fn wrong_transport_is_an_error_not_a_row() {
        let log = [
            "a:1:2 [0] NCCL INFO Using network Socket",
            "a:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0",
        ];
        let v = assemble(Variant::Plugin, &cfg(), &raw(&log, 0));
        assert!(v.rows.is_empty());
        assert!(v.error.unwrap().contains("used network Socket, not halo"));
        // gloo has no RCCL log to check.
        let v = assemble(Variant::Gloo, &cfg(), &raw(&[], 0));
        assert_eq!((v.error, v.rows.len()), (None, 1));
    }

    fn args(variants: &[Variant], dtypes: &[&str]) -> CollectiveArgs {
        CollectiveArgs {
            variants: variants.to_vec(),
            max_bytes: 1 << 20,
            iters: 1,
            decode_steps: 1,
            dtypes: dtypes.iter().map(|d| d.to_string()).collect(),
            variant_timeout: 60,
            inject_wrong: 0,
        }
    }

    #[test]
    fn gloo_leaves_bf16_out_with_a_note_and_refuses_it_when_asked() {
        let p = plan(&args(&[Variant::Gloo], &[])).unwrap();
        assert_eq!(p.dtypes, ["fp32"]);
        assert_eq!(p.notes.len(), 1);
        assert!(
            p.notes[0].starts_with("bf16 not measured: torch's gloo backend rejects bf16"),
            "{:?}",
            p.notes
        );
        for asked in [&["bf16"][..], &["fp32", "bf16"]] {
            let e = plan(&args(&[Variant::Gloo], asked))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--dtypes bf16 cannot run with --variants gloo")
                    && e.contains("Invalid scalar type"),
                "{e}"
            );
        }
        let p = plan(&args(&[Variant::Gloo], &["fp32", "fp32"])).unwrap();
        assert_eq!((p.dtypes, p.notes.len()), (vec!["fp32".to_string()], 0));
        // RCCL variants measure both by default, without notes.
        let p = plan(&args(&[], &[])).unwrap();
        assert_eq!(p.dtypes, ["fp32", "bf16"]);
        assert_eq!(p.variants.len(), 4);
        assert!(p.notes.is_empty());
        assert!(plan(&args(&[Variant::Gloo, Variant::Ib], &[])).is_err());
        assert!(plan(&args(&[Variant::Ib], &["fp16"])).is_err());
    }

    #[test]
    fn the_report_shows_the_notes() {
        let report = CollectiveReport {
            ranks: 2,
            nodes: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            torch: Some("1.13.0a0".into()),
            notes: vec![format!("bf16 not measured: {GLOO_BF16}")],
            variants: Vec::new(),
        };
        let text = render(&report);
        assert!(
            text.contains("note: bf16 not measured: torch's gloo backend rejects bf16"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["notes"][0].as_str().unwrap().contains("bf16"));
    }

    /// Recorded results of a four-variant run with one failed variant.
    fn recorded() -> CollectiveReport {
        let rows = |scale: f64| {
            let mut rows = Vec::new();
            for op in ["all_reduce", "all_gather"] {
                for dtype in ["fp32", "bf16"] {
                    for size in [4096u64, 65536, 1 << 20] {
                        let time_us = 20.0 + size as f64 / (scale * 1e3);
                        let algbw = size as f64 / (time_us * 1e3);
                        rows.push(Row {
                            op: op.into(),
                            dtype: dtype.into(),
                            size,
                            count: size / 4,
                            time_us,
                            algbw_gbs: algbw,
                            busbw_gbs: algbw * bus_factor(op, 2),
                            wrong: 0,
                        });
                    }
                }
            }
            rows
        };
        let decode = |step: f64| {
            vec![
                DecodeRow {
                    ops: 64,
                    size: 8192,
                    dtype: "bf16".into(),
                    step_us: step,
                    wrong: 0,
                },
                DecodeRow {
                    ops: 160,
                    size: 16384,
                    dtype: "bf16".into(),
                    step_us: 3.0 * step,
                    wrong: 0,
                },
            ]
        };
        let c = cfg();
        let ok = |variant: Variant, scale: f64, step: f64| VariantResult {
            rows: rows(scale),
            decode: decode(step),
            ..failed(variant, &c, String::new())
        };
        let mut plugin = ok(Variant::Plugin, 5.0, 700.0);
        plugin.error = None;
        let mut ib = ok(Variant::Ib, 4.0, 900.0);
        ib.error = None;
        let mut socket = ok(Variant::Socket, 1.0, 2500.0);
        socket.error = None;
        let broken = failed(
            Variant::PluginNoGdr,
            &c,
            "plugin-nogdr is not a halo run: RCCL used network IB".into(),
        );
        CollectiveReport {
            ranks: 2,
            nodes: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            torch: Some("2.5".into()),
            notes: Vec::new(),
            variants: vec![plugin, broken, ib, socket],
        }
    }

    #[test]
    fn plot_file_from_recorded_rows() {
        use crate::bench::plot::check::{png_size, series_points, well_formed_svg};
        let report = recorded();
        let dir = tempfile::tempdir().unwrap();
        let svg_path = dir.path().join("collective.svg");
        plot::write_doc(&svg_path, &plot_svg(&report)).unwrap();
        let doc = std::fs::read_to_string(&svg_path).unwrap();
        assert_eq!(well_formed_svg(&doc), Ok(()));
        assert!(doc.contains(">bus bandwidth<") && doc.contains(">busbw (GB/s)<"));
        assert!(
            doc.contains(">decode step: 64 x 8 KiB, 160 x 16 KiB all-reduces<"),
            "{doc}"
        );
        let series = series_points(&doc);
        // 3 variants with rows x 2 ops x 2 types, 3 sizes each; then one decode line per
        // variant with its two shapes. The failed variant draws nothing.
        let mut want: Vec<(String, usize)> = Vec::new();
        for v in ["plugin", "ib", "socket"] {
            for op in ["all_reduce", "all_gather"] {
                for t in ["fp32", "bf16"] {
                    want.push((format!("{v} {op} {t}"), 3));
                }
            }
        }
        for v in ["plugin", "ib", "socket"] {
            want.push((format!("{v} (bf16)"), 2));
        }
        assert_eq!(series, want);
        assert!(!doc.contains("plugin-nogdr"));
        // Sizes on a log2 axis: 4K to 1M labelled; colour per variant, stroke per op and type.
        assert!(doc.contains(">4K<") && doc.contains(">1M<"));
        assert_eq!(doc.matches(r#"stroke-dasharray="6,3""#).count(), 3 * 2);
        // The same chart as a PNG.
        let png_path = dir.path().join("collective.png");
        plot::write_doc(&png_path, &plot_svg(&report))
            .expect("PNG written (needs rsvg-convert from scripts/setup-harness.sh)");
        let (w, h) = png_size(&std::fs::read(&png_path).unwrap()).unwrap();
        assert_eq!(w, 1040);
        assert!(h > 340, "{h}");
    }
}
