//! `halo serve` (vLLM's OpenAI server across the cluster) and `halo bench-serve`
//! (`vllm bench throughput` at TP=1 and TP=N, side by side).
//!
//! Nothing is reported that was not seen: `serve` refuses a port that is already taken, and
//! calls vLLM ready only while its own process lives and `/v1/models` lists the model it
//! launched; when vLLM exits, the error carries the end of its log.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use crate::cluster::config::FORWARDED_SECRETS;
use crate::cluster::{ClusterConfig, NodeCommand};
use crate::process::{describe, run_bounded};
use crate::vllm::{probe_models, signalled, Answer, VllmProcess};
use crate::{hf, port};

/// Above this the unified RAM leaves the OS too little and nodes stall or get OOM-killed.
const MAX_GPU_MEMORY_UTILIZATION: f64 = 0.90;
/// How often `serve` says what vLLM is doing while it starts.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A progress line is repeated at least this often even when vLLM's log is quiet.
const PROGRESS_QUIET: Duration = Duration::from_secs(30);
const CLEAR_CACHE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
pub struct ModelOptions {
    /// Model (Hugging Face id or local path) [default: [model] name in the config].
    pub model: Option<String>,
    /// Tensor-parallel size [default: [model] tp, else the number of nodes].
    #[arg(long)]
    pub tp: Option<u32>,
    /// Fraction of the GPU memory vLLM may take (at most 0.90) [default: config, 0.90].
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    /// Maximum context length [default: config, else the model's].
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Pass --trust-remote-code to vLLM (models with custom code).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Run vLLM with --enforce-eager: no CUDA/HIP graph capture, which can deadlock on
    /// distributed APU nodes [default: [model] eager in the config, true].
    #[arg(long, overrides_with = "no_eager")]
    pub eager: bool,
    /// Let vLLM capture graphs (drop --enforce-eager): a few percent faster when it works.
    #[arg(long, overrides_with = "eager")]
    pub no_eager: bool,
    /// First erase the compile caches on every node: vLLM's (VLLM_CACHE_ROOT, ~/.cache/vllm),
    /// Triton's (TRITON_CACHE_DIR, ~/.triton/cache) and TorchInductor's (TORCHINDUCTOR_CACHE_DIR,
    /// /tmp/torchinductor_USER). For a restart after a crash; downloaded weights are kept.
    #[arg(long)]
    pub clear_cache: bool,
    /// vLLM executable.
    #[arg(long, env = "HALO_VLLM", default_value = "vllm")]
    pub vllm: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// HTTP port of the OpenAI-compatible server [default: config, 8000].
    #[arg(long)]
    pub port: Option<u16>,
    /// Maximum concurrent sequences.
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// How long to wait until vLLM serves the model (weights may be downloading).
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    pub wait_secs: u64,
    /// vLLM's output goes here [default: vllm-serve-PORT.log beside the config file].
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Further vLLM arguments, after `--`, passed as they are
    /// (e.g. -- --attention-backend TRITON_ATTN --served-model-name llama).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// Requests per run.
    #[arg(long, default_value_t = 200)]
    pub num_prompts: u32,
    /// Prompt length of the random dataset (ignored with --dataset-path).
    #[arg(long, default_value_t = 1024)]
    pub input_len: u32,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 512)]
    pub output_len: u32,
    /// ShareGPT JSON file (uses vLLM's sharegpt dataset instead of random prompts).
    #[arg(long)]
    pub dataset_path: Option<String>,
    /// Upper bound for each of the two runs.
    #[arg(long, default_value_t = 7200, value_name = "SECS")]
    pub timeout_secs: u64,
    /// Print the results as JSON on stdout (vLLM's progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Further `vllm bench throughput` arguments, after `--`, passed as they are.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// What both commands resolve from flags and config before starting anything.
struct Plan {
    model: String,
    tp: u32,
    gpu_mem: f64,
    max_model_len: Option<u32>,
    eager: bool,
}

fn plan(opts: &ModelOptions, cfg: &ClusterConfig) -> Result<Plan> {
    let Some(model) = opts.model.clone().or_else(|| cfg.model.name.clone()) else {
        bail!("no model given: `halo serve MODEL`, or set name under [model] in the config");
    };
    let gpu_mem = opts
        .gpu_memory_utilization
        .unwrap_or(cfg.model.gpu_memory_utilization);
    if !(gpu_mem > 0.0 && gpu_mem <= MAX_GPU_MEMORY_UTILIZATION) {
        bail!(
            "refusing --gpu-memory-utilization {gpu_mem}: it must be in (0, {MAX_GPU_MEMORY_UTILIZATION}]; \
             the GPU shares RAM with the OS, and above 0.90 nodes stall or get OOM-killed"
        );
    }
    let tp = opts.tp.or(cfg.model.tp).unwrap_or(cfg.nodes.len() as u32);
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    let eager = if opts.eager {
        true
    } else if opts.no_eager {
        false
    } else {
        cfg.model.eager
    };
    // Whether the model needs a token is the Hub's answer, not a guess from its name; without
    // one vLLM may still find the weights cached, so this warns and goes on.
    let secrets = cfg.secret_env();
    let token = secrets
        .iter()
        .find(|(k, _)| FORWARDED_SECRETS.contains(&k.as_str()))
        .map(|(_, v)| v.as_str());
    if let Some(warning) = hf::warning(&model, token) {
        eprintln!("halo: warning: {warning}");
    }
    Ok(Plan {
        model,
        tp,
        gpu_mem,
        max_model_len: opts.max_model_len.or(cfg.model.max_model_len),
        eager,
    })
}

/// vLLM on the head, inside its runtime, with the head's cluster environment plus RAY_ADDRESS so
/// vLLM joins this Ray cluster. Secrets (under [env], and HF_TOKEN from halo's own environment)
/// reach it over stdin, never on a command line; vLLM passes them on to its Ray workers.
fn vllm_command(vllm: &str, cfg: &ClusterConfig, args: Vec<String>) -> NodeCommand {
    let mut argv = vec![vllm.to_string()];
    argv.extend(args);
    cfg.env_command(
        cfg.head(),
        &[("RAY_ADDRESS".to_string(), cfg.head_address())],
        &argv,
    )
}

/// Removes the compile caches on one node. The paths are worked out on the node itself, from
/// its environment (the cluster's, so [env] overrides count), as vLLM, Triton and PyTorch do:
/// VLLM_CACHE_ROOT or $XDG_CACHE_HOME/vllm or ~/.cache/vllm (vLLM's torch.compile cache, with
/// its inductor and Triton caches inside); TRITON_CACHE_DIR or $TRITON_HOME/.triton/cache or
/// ~/.triton/cache; TORCHINDUCTOR_CACHE_DIR or $TMPDIR/torchinductor_$USER.
pub const CLEAR_CACHE_SCRIPT: &str = r#"rc=0
for d in "${VLLM_CACHE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm}" \
         "${TRITON_CACHE_DIR:-${TRITON_HOME:-$HOME}/.triton/cache}" \
         "${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-${TEMP:-${TMP:-/tmp}}}/torchinductor_${LOGNAME:-${USER:-$(id -un)}}}"; do
  case "$d" in ""|/|"$HOME"|"$HOME/") echo "kept $d (not a cache directory)"; continue;; esac
  if [ -e "$d" ]; then
    if rm -rf -- "$d"; then echo "removed $d"; else echo "cannot remove $d"; rc=1; fi
  else
    echo "absent $d"
  fi
done
exit $rc"#;

/// `--clear-cache`: the workers over SSH, then the head, each inside its runtime; every node's result is printed.
fn clear_caches(cfg: &ClusterConfig) -> Result<()> {
    let mut failed = Vec::new();
    for node in cfg.workers().iter().chain([cfg.head()]) {
        let mut cmd = cfg.command(
            node,
            &cfg.public_env(node),
            &["sh".into(), "-c".into(), CLEAR_CACHE_SCRIPT.into()],
        );
        println!("clearing compile caches on {} ({})", node.host, node.ip);
        match run_bounded(&mut cmd, CLEAR_CACHE_LIMIT) {
            Ok(out) => {
                for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
                    println!("  {}: {line}", node.host);
                }
                if !out.success {
                    failed.push(format!("{}: {}", node.host, out.stderr.trim()));
                }
            }
            Err(e) => failed.push(format!("{}: {e:#}", node.host)),
        }
    }
    if !failed.is_empty() {
        bail!(
            "--clear-cache failed, so vLLM was not started:\n    {}",
            failed.join("\n    ")
        );
    }
    Ok(())
}

/// The names vLLM will list under /v1/models: `--served-model-name` values when the extra
/// arguments give them, else the model itself.
pub fn served_names(model: &str, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < extra.len() {
        if let Some(v) = extra[i].strip_prefix("--served-model-name=") {
            names.push(v.to_string());
        } else if extra[i] == "--served-model-name" {
            while i + 1 < extra.len() && !extra[i + 1].starts_with('-') {
                i += 1;
                names.push(extra[i].clone());
            }
        }
        i += 1;
    }
    if names.is_empty() {
        names.push(model.to_string());
    }
    names
}

fn serve_argv(args: &ServeArgs, plan: &Plan, port: u16) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "serve".into(),
        plan.model.clone(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        port.to_string(),
        "--tensor-parallel-size".into(),
        plan.tp.to_string(),
        "--distributed-executor-backend".into(),
        "ray".into(),
        "--gpu-memory-utilization".into(),
        format!("{:.2}", plan.gpu_mem),
    ];
    if plan.eager {
        // CUDA-graph capture can deadlock on distributed APU nodes.
        argv.push("--enforce-eager".into());
    }
    if let Some(n) = plan.max_model_len {
        argv.extend(["--max-model-len".into(), n.to_string()]);
    }
    if let Some(n) = args.max_num_seqs {
        argv.extend(["--max-num-seqs".into(), n.to_string()]);
    }
    if args.model.trust_remote_code {
        argv.push("--trust-remote-code".into());
    }
    argv.extend(args.extra.iter().cloned());
    argv
}

fn default_log(config_path: &Path, name: &str) -> PathBuf {
    config_path.with_file_name(name)
}

fn shorten(line: &str, max: usize) -> String {
    if line.chars().count() > max {
        format!("{}…", line.chars().take(max).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Starts vLLM, waits (bounded) until it serves the model, then stays with it until it exits,
/// showing its log. Returns vLLM's exit code.
pub fn serve(args: &ServeArgs, config_path: &Path) -> Result<i32> {
    let cfg = ClusterConfig::load(config_path)?;
    if let Some(flag) = args
        .extra
        .iter()
        .find(|a| ["--port", "--host"].contains(&a.split('=').next().unwrap_or(a)))
    {
        bail!(
            "{flag} among the extra vLLM arguments: halo sets --host 0.0.0.0 and --port itself \
             (use `halo serve --port N`), and checks that port"
        );
    }
    let plan = plan(&args.model, &cfg)?;
    let port = args.port.unwrap_or(cfg.model.port);
    if let Some(why) = port::check_free(port) {
        bail!("{why}; stop it (an older `halo serve`?) or choose another --port");
    }
    let expected = served_names(&plan.model, &args.extra);
    if args.model.clear_cache {
        clear_caches(&cfg)?;
    }
    let log = args
        .log
        .clone()
        .unwrap_or_else(|| default_log(config_path, &format!("vllm-serve-{port}.log")));
    let NodeCommand { mut cmd, input } =
        vllm_command(&args.model.vllm, &cfg, serve_argv(args, &plan, port));
    println!(
        "starting on {} (Ray {}): {}",
        cfg.head().host,
        cfg.head_address(),
        describe(&cmd)
    );
    let mut vllm = VllmProcess::spawn(&mut cmd, input.as_deref(), &log, &args.model.vllm)?;
    println!(
        "vLLM pid {}, log {}; waiting up to {} s for http://127.0.0.1:{port}/v1/models to list {}",
        vllm.pid(),
        log.display(),
        args.wait_secs,
        expected.join(", ")
    );
    wait_ready(&mut vllm, args.wait_secs, port, &expected)?;
    println!(
        "vLLM serves {} (TP={}) at http://{}:{port}/v1 (ready after {} s; pid {}; log {})",
        expected.join(", "),
        plan.tp,
        cfg.head().ip,
        vllm.started.elapsed().as_secs(),
        vllm.pid(),
        log.display()
    );
    // Now show vLLM's log as it comes, until it exits.
    loop {
        for line in vllm.lines() {
            println!("{}", line.text);
        }
        if let Some(status) = vllm.exited()? {
            for line in vllm.lines() {
                println!("{}", line.text);
            }
            println!("vLLM exited ({status})");
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(1)));
        }
        if let Some(sig) = signalled() {
            println!("stopping vLLM (signal {sig})");
            let status = vllm.stop(sig);
            for line in vllm.lines() {
                println!("{}", line.text);
            }
            println!("vLLM exited ({status})");
            return Ok(128 + sig);
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until vLLM, still alive, lists one of `expected` at /v1/models; fails with the end of
/// its log when it exits, at the deadline (stopping it) or on Ctrl-C.
fn wait_ready(
    vllm: &mut VllmProcess,
    wait_secs: u64,
    port: u16,
    expected: &[String],
) -> Result<()> {
    let deadline = vllm.started + Duration::from_secs(wait_secs);
    let mut last_note = Instant::now();
    let mut noted_line: Option<String> = None;
    loop {
        let _ = vllm.lines();
        if let Some(status) = vllm.exited()? {
            bail!(
                "vLLM exited ({status}) after {} s, before serving; {}",
                vllm.started.elapsed().as_secs(),
                vllm.tail()
            );
        }
        if let Some(sig) = signalled() {
            let status = vllm.stop(sig);
            bail!("interrupted (signal {sig}): stopped vLLM ({status}) before it served");
        }
        let answer = probe_models(port);
        if let Answer::Models(ids) = &answer {
            // Evidence from this process only: it must still be alive after the answer.
            if ids.iter().any(|id| expected.contains(id)) && vllm.exited()?.is_none() {
                return Ok(());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let status = vllm.stop(libc::SIGTERM);
            bail!(
                "vLLM did not serve {} at http://127.0.0.1:{port}/v1/models within {wait_secs} s \
                 ({}); stopped it ({status}); {}",
                expected.join(", "),
                describe_answer(&answer),
                vllm.tail()
            );
        }
        let line = vllm.last_line().map(|l| shorten(l, 160));
        let since = now.duration_since(last_note);
        if since >= PROGRESS_EVERY && (line != noted_line || since >= PROGRESS_QUIET) {
            println!(
                "waiting for vLLM: {} s of {wait_secs} s; {}; log: {}",
                vllm.started.elapsed().as_secs(),
                describe_answer(&answer),
                line.as_deref().unwrap_or("(nothing yet)")
            );
            last_note = now;
            noted_line = line;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn describe_answer(answer: &Answer) -> String {
    match answer {
        Answer::Nothing => "nothing answers on the port yet".into(),
        Answer::Status(code) => format!("/v1/models answers HTTP {code}"),
        Answer::Models(ids) if ids.is_empty() => "/v1/models lists no model".into(),
        Answer::Models(ids) => format!("/v1/models lists {}", ids.join(", ")),
        Answer::NotAModelList => "/v1/models answers 200 without a model list".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    pub requests_per_s: f64,
    pub total_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
}

/// Parses vLLM's summary line:
/// `Throughput: 3.12 requests/s, 2400.50 total tokens/s, 1597.44 output tokens/s`.
pub fn parse_throughput(text: &str) -> Option<Throughput> {
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.split_once("Throughput:").map(|(_, rest)| rest))?;
    let mut found = (None, None, None);
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let value: f64 = words.next()?.parse().ok()?;
        match words.collect::<Vec<_>>().join(" ").as_str() {
            "requests/s" => found.0 = Some(value),
            "total tokens/s" => found.1 = Some(value),
            "output tokens/s" => found.2 = Some(value),
            _ => {}
        }
    }
    Some(Throughput {
        requests_per_s: found.0?,
        total_tokens_per_s: found.1?,
        output_tokens_per_s: found.2?,
    })
}

fn bench_argv(args: &BenchArgs, plan: &Plan, tp: u32) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "bench".into(),
        "throughput".into(),
        "--model".into(),
        plan.model.clone(),
        "--tensor-parallel-size".into(),
        tp.to_string(),
        "--gpu-memory-utilization".into(),
        format!("{:.2}", plan.gpu_mem),
    ];
    if plan.eager {
        argv.push("--enforce-eager".into());
    }
    argv.extend([
        "--num-prompts".into(),
        args.num_prompts.to_string(),
        "--output-len".into(),
        args.output_len.to_string(),
    ]);
    if tp > 1 {
        argv.extend(["--distributed-executor-backend".into(), "ray".into()]);
    }
    match &args.dataset_path {
        Some(path) => argv.extend([
            "--dataset-name".into(),
            "sharegpt".into(),
            "--dataset-path".into(),
            path.clone(),
        ]),
        None => argv.extend(["--input-len".into(), args.input_len.to_string()]),
    }
    if let Some(n) = plan.max_model_len {
        argv.extend(["--max-model-len".into(), n.to_string()]);
    }
    if args.model.trust_remote_code {
        argv.push("--trust-remote-code".into());
    }
    argv.extend(args.extra.iter().cloned());
    argv
}

/// A progress bar redrawing itself is shown at most this often.
const REDRAW_EVERY: Duration = Duration::from_secs(10);
/// Said when vLLM has been quiet this long.
const BENCH_QUIET: Duration = Duration::from_secs(60);

/// One `vllm bench throughput` run, its output streamed as it comes (to stderr with --json).
fn bench_run(
    cmd: &mut Command,
    input: Option<&str>,
    tp: u32,
    log: &Path,
    args: &BenchArgs,
) -> Result<(Throughput, f64)> {
    let say = |text: &str| {
        if args.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    };
    let mut vllm = VllmProcess::spawn(cmd, input, log, &args.model.vllm)?;
    let limit = Duration::from_secs(args.timeout_secs);
    let mut found = None;
    let mut last_redraw: Option<Instant> = None;
    let mut last_output = Instant::now();
    loop {
        let lines = vllm.lines();
        if !lines.is_empty() {
            last_output = Instant::now();
        }
        for line in lines {
            if let Some(t) = parse_throughput(&line.text) {
                found = Some(t);
            }
            if line.redraw {
                if last_redraw.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
                    continue;
                }
                last_redraw = Some(Instant::now());
            }
            say(&format!("TP={tp} | {}", line.text));
        }
        if let Some(status) = vllm.exited()? {
            for line in vllm.lines() {
                if let Some(t) = parse_throughput(&line.text) {
                    found = Some(t);
                }
                say(&format!("TP={tp} | {}", line.text));
            }
            let secs = vllm.started.elapsed().as_secs_f64();
            return match found.filter(|_| status.success()) {
                Some(t) => Ok((t, secs)),
                None => bail!(
                    "TP={tp}: vllm bench throughput {} and printed {}; {}",
                    if status.success() {
                        "succeeded".to_string()
                    } else {
                        format!("failed ({status})")
                    },
                    if found.is_some() {
                        "a Throughput line"
                    } else {
                        "no Throughput line"
                    },
                    vllm.tail()
                ),
            };
        }
        if let Some(sig) = signalled() {
            let status = vllm.stop(sig);
            bail!("interrupted (signal {sig}): stopped vllm bench throughput ({status})");
        }
        if vllm.started.elapsed() >= limit {
            let status = vllm.stop(libc::SIGTERM);
            bail!(
                "TP={tp}: vllm bench throughput did not finish within {} s; stopped it ({status}); {}",
                args.timeout_secs,
                vllm.tail()
            );
        }
        if last_output.elapsed() >= BENCH_QUIET {
            say(&format!(
                "TP={tp}: {} s, still running (log {})",
                vllm.started.elapsed().as_secs(),
                vllm.log().display()
            ));
            last_output = Instant::now();
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[derive(Debug, Serialize)]
pub struct BenchRun {
    pub tp: u32,
    #[serde(flatten)]
    pub throughput: Throughput,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub eager: bool,
    pub runs: Vec<BenchRun>,
    /// total tokens/s at TP=N over TP=1 (when both ran).
    pub speedup: Option<f64>,
}

/// Runs the throughput benchmark at TP=1 and TP=N and prints them side by side.
pub fn bench_serve(args: &BenchArgs, config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let plan = plan(&args.model, &cfg)?;
    if args.model.clear_cache {
        clear_caches(&cfg)?;
    }
    let mut sizes = vec![1];
    if plan.tp > 1 {
        sizes.push(plan.tp);
    }
    let mut runs = Vec::new();
    for &tp in &sizes {
        let NodeCommand { mut cmd, input } =
            vllm_command(&args.model.vllm, &cfg, bench_argv(args, &plan, tp));
        let log = default_log(config_path, &format!("vllm-bench-tp{tp}.log"));
        let note = format!("TP={tp}: {} (log {})", describe(&cmd), log.display());
        if args.json {
            eprintln!("{note}");
        } else {
            println!("{note}");
        }
        let (t, seconds) = bench_run(&mut cmd, input.as_deref(), tp, &log, args)?;
        let note = format!(
            "TP={tp}: {:.2} total tokens/s ({seconds:.0} s)",
            t.total_tokens_per_s
        );
        if args.json {
            eprintln!("{note}");
        } else {
            println!("{note}");
        }
        runs.push(BenchRun {
            tp,
            throughput: t,
            seconds,
        });
    }
    let results: Vec<(u32, Throughput)> = runs.iter().map(|r| (r.tp, r.throughput)).collect();
    if args.json {
        let speedup = match results.as_slice() {
            [(_, a), (_, b)] if a.total_tokens_per_s > 0.0 => {
                Some(b.total_tokens_per_s / a.total_tokens_per_s)
            }
            _ => None,
        };
        let report = BenchReport {
            model: plan.model.clone(),
            eager: plan.eager,
            runs,
            speedup,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_bench(&plan.model, &results));
    }
    Ok(())
}

pub fn render_bench(model: &str, results: &[(u32, Throughput)]) -> String {
    let mut out = format!("\n{model}: vllm bench throughput\n");
    out.push_str(&format!("{:<16}", "metric"));
    for (tp, _) in results {
        out.push_str(&format!("{:>12}", format!("TP={tp}")));
    }
    if results.len() == 2 {
        out.push_str(&format!("{:>10}", "speed-up"));
    }
    out.push('\n');
    type Metric = fn(&Throughput) -> f64;
    let rows: [(&str, Metric); 3] = [
        ("requests/s", |t| t.requests_per_s),
        ("total tokens/s", |t| t.total_tokens_per_s),
        ("output tokens/s", |t| t.output_tokens_per_s),
    ];
    for (name, get) in rows {
        out.push_str(&format!("{name:<16}"));
        for (_, t) in results {
            out.push_str(&format!("{:>12.2}", get(t)));
        }
        if let [(_, a), (_, b)] = results {
            if get(a) > 0.0 {
                out.push_str(&format!("{:>9.2}x", get(b) / get(a)));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_line() {
        let t = parse_throughput("INFO ...\nThroughput: 1.52 requests/s, 1166.27 total tokens/s, 777.51 output tokens/s\n").unwrap();
        assert_eq!(
            t,
            Throughput {
                requests_per_s: 1.52,
                total_tokens_per_s: 1166.27,
                output_tokens_per_s: 777.51
            }
        );
        assert!(parse_throughput("no numbers here").is_none());
    }
}
