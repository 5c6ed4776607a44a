//! `halo serve` (vLLM's OpenAI server across the cluster) and `halo bench-serve`
//! (`vllm bench throughput` at TP=1 and TP=N, side by side).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cluster::ClusterConfig;
use crate::process::{describe, run_bounded};

/// Above this the unified RAM leaves the OS too little and nodes stall or get OOM-killed.
const MAX_GPU_MEMORY_UTILIZATION: f64 = 0.90;

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
    /// The model needs a Hugging Face token (meta-llama/* always counts as gated).
    #[arg(long)]
    pub gated: bool,
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
    /// How long to wait for the server to answer /v1/models (weights may be downloading).
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    pub wait_secs: u64,
    /// Further vLLM arguments, after `--` (e.g. -- --attention-backend TRITON_ATTN).
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
}

/// What both commands resolve from flags and config before starting anything.
struct Plan {
    model: String,
    tp: u32,
    gpu_mem: f64,
    max_model_len: Option<u32>,
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
    let gated = opts.gated || model.starts_with("meta-llama/");
    let token = std::env::var("HF_TOKEN").unwrap_or_default();
    if gated && token.trim().is_empty() {
        bail!(
            "{model} is gated on Hugging Face and HF_TOKEN is not set: accept the licence on the model page, \
             then `export HF_TOKEN=hf_...` (every node downloads the weights itself, so set it on each node)"
        );
    }
    let tp = opts.tp.or(cfg.model.tp).unwrap_or(cfg.nodes.len() as u32);
    if tp == 0 {
        bail!("--tp must be at least 1");
    }
    Ok(Plan {
        model,
        tp,
        gpu_mem,
        max_model_len: opts.max_model_len.or(cfg.model.max_model_len),
    })
}

/// The head's cluster environment, plus RAY_ADDRESS so vLLM joins this Ray cluster.
fn vllm_command(vllm: &str, cfg: &ClusterConfig) -> Command {
    let mut cmd = Command::new(vllm);
    cmd.envs(cfg.local_env(cfg.head()))
        .env("RAY_ADDRESS", cfg.head_address());
    cmd
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
        // CUDA-graph capture deadlocks on distributed APU nodes.
        "--enforce-eager".into(),
    ];
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

/// True once `GET /v1/models` on the local port answers 200.
fn models_endpoint_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
    if stream
        .write_all(format!("GET /v1/models HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let status = String::from_utf8_lossy(&head[..got]);
    status.starts_with("HTTP/1.") && status.get(9..12) == Some("200")
}

/// Starts vLLM, waits (bounded) until it serves, then stays with it until it exits.
/// Returns vLLM's exit code.
pub fn serve(args: &ServeArgs, config_path: &Path) -> Result<i32> {
    let cfg = ClusterConfig::load(config_path)?;
    let plan = plan(&args.model, &cfg)?;
    let port = args.port.unwrap_or(cfg.model.port);
    let mut cmd = vllm_command(&args.model.vllm, &cfg);
    cmd.args(serve_argv(args, &plan, port));
    println!(
        "starting on {} (Ray {}): {}",
        cfg.head().host,
        cfg.head_address(),
        describe(&cmd)
    );
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (is vLLM installed? --vllm PATH)",
            args.model.vllm
        )
    })?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.wait_secs);
    let mut next_note = started + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("vLLM exited before serving ({status}); see its log above");
        }
        if models_endpoint_ready(port) {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "vLLM did not answer http://127.0.0.1:{port}/v1/models within {} s; stopped it",
                args.wait_secs
            );
        }
        if now >= next_note {
            println!(
                "waiting for vLLM ({} s): http://127.0.0.1:{port}/v1/models not answering yet",
                started.elapsed().as_secs()
            );
            next_note = now + Duration::from_secs(15);
        }
        thread::sleep(Duration::from_secs(1));
    }
    println!(
        "vLLM serves {} (TP={}) at http://{}:{port}/v1 (ready after {} s)",
        plan.model,
        plan.tp,
        cfg.head().ip,
        started.elapsed().as_secs()
    );
    let status = child.wait()?;
    Ok(status.code().unwrap_or(1))
}

#[derive(Debug, Clone, Copy, PartialEq)]
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
        "--enforce-eager".into(),
        "--num-prompts".into(),
        args.num_prompts.to_string(),
        "--output-len".into(),
        args.output_len.to_string(),
    ];
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
    argv
}

/// Runs the throughput benchmark at TP=1 and TP=N and prints them side by side.
pub fn bench_serve(args: &BenchArgs, config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let plan = plan(&args.model, &cfg)?;
    let mut sizes = vec![1];
    if plan.tp > 1 {
        sizes.push(plan.tp);
    }
    let mut results = Vec::new();
    for &tp in &sizes {
        let mut cmd = vllm_command(&args.model.vllm, &cfg);
        cmd.args(bench_argv(args, &plan, tp));
        println!("TP={tp}: {}", describe(&cmd));
        let started = Instant::now();
        let out = run_bounded(&mut cmd, Duration::from_secs(args.timeout_secs))?;
        let text = format!("{}\n{}", out.stdout, out.stderr);
        let Some(t) = parse_throughput(&text).filter(|_| out.success) else {
            let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            bail!(
                "TP={tp}: vllm bench throughput failed or printed no Throughput line:\n    {}",
                tail[tail.len().saturating_sub(10)..].join("\n    ")
            );
        };
        println!(
            "TP={tp}: {:.2} total tokens/s ({:.0} s)",
            t.total_tokens_per_s,
            started.elapsed().as_secs_f64()
        );
        results.push((tp, t));
    }
    print!("{}", render_bench(&plan.model, &results));
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
