use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use halo::cluster::{self, InitArgs};
use halo::container::{self, ContainerArgs};
use halo::doctor::{self, DoctorOptions, ElfFileProbe, LoadingProbe};
use halo::serve::{self, BenchArgs, ServeArgs};
use halo::sysroot::SysRoot;

/// Strix Halo RDMA cluster harness.
///
/// Checks nodes for what RoCE v2, RCCL and vLLM need (`doctor`), runs the Ray cluster across
/// them with the right environment (`cluster`), serves and benchmarks models with vLLM
/// (`serve`, `bench-serve`) and creates the container that holds vLLM (`container`).
///
/// A typical first run, on the head node:
///   halo doctor --peer strix2
///   halo cluster init --node strix1=192.168.100.1 --node strix2=192.168.100.2
///   halo cluster up && halo cluster status
///   halo serve Qwen/Qwen3-8B
#[derive(Debug, Parser)]
#[command(name = "halo", version, verbatim_doc_comment)]
struct Cli {
    /// Cluster configuration used by cluster, serve, bench-serve and container.
    #[arg(
        long,
        global = true,
        env = "HALO_CONFIG",
        default_value = "cluster.toml",
        value_name = "FILE"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check this node (and peers) for RoCE, GPU, kernel and RCCL problems, with fixes
    ///
    /// Every check prints a verdict (pass, warn, fail, skip), the value seen and, when
    /// something is wrong, the exact command or line that fixes it. Exit status: 0 when
    /// nothing fails, 1 when a check fails, 2 on a usage error.
    #[command(verbatim_doc_comment)]
    Doctor(DoctorArgs),
    /// Create the cluster config, start/stop Ray across the nodes, show its state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Serve a model with vLLM across the cluster; wait until /v1/models answers
    ///
    /// Runs `vllm serve MODEL --host 0.0.0.0 --port P --tensor-parallel-size N
    /// --distributed-executor-backend ray --gpu-memory-utilization U --enforce-eager …`
    /// with the head node's RCCL environment and RAY_ADDRESS. Start the cluster first
    /// (`halo cluster up`). Gated models (meta-llama/*, or --gated) need HF_TOKEN.
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Measure vLLM throughput at TP=1 and TP=N and print them side by side
    ///
    /// Runs `vllm bench throughput` twice (single node, then tensor parallel over Ray)
    /// and compares requests/s, total tokens/s and output tokens/s.
    #[command(verbatim_doc_comment)]
    BenchServe(BenchArgs),
    /// Print or create the vLLM container with GPU, RDMA devices and the plugin.
    #[command(subcommand)]
    Container(ContainerCmd),
}

#[derive(Debug, Args)]
struct DoctorArgs {
    /// Also check HOST: passwordless SSH, then `halo doctor --json` run there (repeatable).
    #[arg(long = "peer", value_name = "HOST")]
    peers: Vec<String>,
    /// Print the report as JSON: {"node", "checks": [{"id","title","verdict","value","fix"}], "peers": [...]}.
    #[arg(long)]
    json: bool,
    /// Read /proc, /sys, /etc and /dev below DIR instead of / (captured trees).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Interface carrying the cluster IP [default: detected from the RoCE v2 GID table].
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// This node's cluster IPv4 address [default: detected from the RoCE v2 GID table].
    #[arg(long, value_name = "IP")]
    cluster_ip: Option<Ipv4Addr>,
    /// Judge the NCCL variables in FILE (KEY=VALUE lines) instead of this process's environment.
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// Path of librccl-net-halo.so [default: searched in NCCL_NET_PLUGIN, LD_LIBRARY_PATH, /opt/halo/lib, …].
    #[arg(long, value_name = "PATH")]
    plugin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Write cluster.toml from --node flags and what this node's RDMA setup shows
    ///
    /// Detects the cluster interface, RDMA device and RoCE v2 GID index locally (as
    /// `halo doctor` does) and assumes the same names on the other nodes.
    /// Example: halo cluster init --node strix1=192.168.100.1 --node strix2=192.168.100.2 --ssh-user core
    #[command(verbatim_doc_comment)]
    Init(Box<InitArgs>),
    /// Start the Ray head here and every worker over SSH, with the RCCL/vLLM environment
    ///
    /// Waits until `ray status` lists every node. What was started is recorded in
    /// cluster.state.json next to the config. The `ray` executable comes from HALO_RAY, the
    /// node's `ray` key, or [ray] executable.
    #[command(verbatim_doc_comment)]
    Up,
    /// Show nodes alive and GPUs used (from `ray status`); exit 1 when nodes are missing.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop Ray on every worker (over SSH) and here, and check that none of it is left.
    Down,
}

#[derive(Debug, Subcommand)]
enum ContainerCmd {
    /// Create the container (runs the engine's create command).
    Create(ContainerArgs),
    /// Print the create command without running it.
    Print(ContainerArgs),
}

fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read --env-file {}", path.display()))?;
    let mut env = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            bail!("{}:{}: expected KEY=VALUE", path.display(), n + 1);
        };
        env.insert(
            k.trim().to_string(),
            v.trim().trim_matches(|c| c == '"' || c == '\'').to_string(),
        );
    }
    Ok(env)
}

fn run_doctor(args: DoctorArgs) -> Result<ExitCode> {
    let env = match &args.env_file {
        Some(path) => read_env_file(path)?,
        None => std::env::vars().collect(),
    };
    let opts = DoctorOptions {
        root: SysRoot::new(&args.root),
        iface: args.iface,
        cluster_ip: args.cluster_ip,
        env,
        plugin: args.plugin,
        peers: args.peers,
    };
    // A captured tree's library cannot be loaded here; the running system's can.
    let report = if opts.root.is_live() {
        doctor::run(&opts, &LoadingProbe)
    } else {
        doctor::run(&opts, &ElfFileProbe)
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", doctor::render_table(&report));
    }
    Ok(if report.any_fail() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config.as_path();
    match cli.command {
        Cmd::Doctor(args) => run_doctor(args),
        Cmd::Cluster(ClusterCmd::Init(args)) => {
            cluster::init(&args, config).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Up) => cluster::up(config).map(|_| ExitCode::SUCCESS),
        Cmd::Cluster(ClusterCmd::Status { json }) => cluster::status(config, json).map(|all| {
            if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Cmd::Cluster(ClusterCmd::Down) => cluster::down(config).map(|_| ExitCode::SUCCESS),
        Cmd::Serve(args) => serve::serve(&args, config).map(exit_code),
        Cmd::BenchServe(args) => serve::bench_serve(&args, config).map(|_| ExitCode::SUCCESS),
        Cmd::Container(ContainerCmd::Print(args)) => {
            container::print(&args, config).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Container(ContainerCmd::Create(args)) => {
            container::create(&args, config).map(exit_code)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("halo: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
