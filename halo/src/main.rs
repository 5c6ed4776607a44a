use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use halo::cluster::{self, InitArgs};
use halo::conformance::{self, ConformanceArgs};
use halo::container::{self, ContainerArgs};
use halo::doctor::{self, DoctorOptions, ElfFileProbe, LoadingProbe};
use halo::serve::{self, BenchArgs, ServeArgs};
use halo::sysroot::SysRoot;

/// Strix Halo RDMA cluster harness.
///
/// Checks nodes for what RoCE v2, RCCL and vLLM need (`doctor`), runs the Ray cluster across
/// them with the right environment (`cluster`), measures the network path between nodes
/// (`bench`), serves and benchmarks models with vLLM (`serve`, `bench-serve`) and creates the
/// container that holds vLLM (`container`).
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
    /// Loads the plugin library at PATH in this process and prints the check as JSON (used by
    /// `halo doctor` to probe the plugin in the judged environment).
    #[command(name = "doctor-plugin-probe", hide = true)]
    DoctorPluginProbe { path: PathBuf, shown: String },
    /// Create the cluster config, start/stop Ray across the nodes, show its state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Serve a model with vLLM across the cluster; ready only when it lists the model
    ///
    /// Runs `vllm serve MODEL --host 0.0.0.0 --port P --tensor-parallel-size N
    /// --distributed-executor-backend ray --gpu-memory-utilization U [--enforce-eager] … -- EXTRA`
    /// with the head node's RCCL environment and RAY_ADDRESS. Start the cluster first
    /// (`halo cluster up`). Refuses a port that is already taken (naming the process that
    /// holds it); calls vLLM ready only while its own process runs and GET /v1/models lists
    /// the model; if vLLM exits first, fails with the end of its log (vllm-serve-PORT.log).
    /// HF_TOKEN (from the environment or [env]) is passed on in the environment, never on a
    /// command line; when it is missing and Hugging Face says the model is gated, a warning
    /// says the download will fail.
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Measure the network path to a peer: TCP, raw RDMA (perftest) and the RCCL plugin
    ///
    /// From the head, with cluster.toml (`halo cluster init`): starts `halo bench --listen` on
    /// the first worker over SSH, with device, GID index and plugin from the config:
    ///     halo bench [--node HOST] [--plot bench.png]
    /// Or by hand, on the peer node:  halo bench --listen --plugin /opt/halo/lib/librccl-net-halo.so
    /// and on this node:              halo bench --peer 192.168.100.2 --ibdev rocep1s0f0 --gid-index 1 \
    ///                                    --plugin /opt/halo/lib/librccl-net-halo.so --plot bench.png
    ///
    /// Every argument is checked on both nodes before anything runs. Prints the comparison table
    /// (path, latency, bandwidth; a path that failed shows its own error) and per-size rows;
    /// --json for scripts, --plot FILE.svg|png for a chart. Exit 1 when any path failed.
    /// TCP needs nothing but halo on both nodes; the RDMA rows need perftest.
    ///
    /// With --collective (cluster.toml, `halo cluster up`): all-reduce and all-gather through
    /// RCCL per transport, rccl-tests' columns; --plot draws bus bandwidth and decode steps.
    #[command(verbatim_doc_comment)]
    Bench(NetBenchArgs),
    /// Check any RCCL/NCCL net plugin against the ncclNet ABI: the project's conformance run
    ///
    /// For each exported table (v6, v8, v10, v11, v12): load, init and device properties, then
    /// seeded random traffic between two processes the way RCCL's proxy drives it (connect and
    /// accept polled, up to 32 requests in flight, multi-receives with shuffled tags, NULL-request
    /// retries, sizes 0 … --max-size), every byte and every reported size checked; then two large
    /// messages in flight, and a receiver killed mid-transfer (the sender must get an error).
    ///
    /// Two nodes: on the peer  halo conformance --plugin X.so --listen
    ///            here         halo conformance --plugin X.so --peer HOST
    /// Each check is named PASS or FAIL with its evidence; --json for scripts; exit 1 on a FAIL.
    #[command(verbatim_doc_comment)]
    Conformance(ConformanceArgs),
    /// Measure vLLM throughput at TP=1 and TP=N and print them side by side
    ///
    /// Runs `vllm bench throughput` twice (single node, then tensor parallel over Ray),
    /// showing vLLM's output as it comes, and compares requests/s, total tokens/s and output
    /// tokens/s (--json for scripts).
    #[command(verbatim_doc_comment)]
    BenchServe(BenchArgs),
    /// Write one Markdown report (and JSON beside it) to attach to a bug report
    ///
    /// Holds `halo doctor` from every node of the cluster config (this node only without
    /// one), kernel/ROCm/RCCL/rdma-core/firmware/plugin versions, and, when given, the
    /// `halo bench --json` and `halo bench --collective --json` results with the RCCL lines
    /// that show which network RCCL used. --redact hides host names, IPs and tokens.
    #[command(verbatim_doc_comment)]
    Report(halo::report::ReportArgs),
    /// Print or create the vLLM container with GPU, RDMA devices and the plugin.
    #[command(subcommand)]
    Container(ContainerCmd),
}

#[derive(Debug, Args)]
struct NetBenchArgs {
    /// Be the peer: serve the tests on ADDR (default 0.0.0.0:18700) until the measuring side quits.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "0.0.0.0:18700", conflicts_with_all = ["peer", "node"])]
    listen: Option<SocketAddr>,
    /// With --listen: end when stdin closes (how the head starts and ends a peer over SSH).
    #[arg(long, requires = "listen", hide = true)]
    exit_on_stdin_eof: bool,
    /// A peer already running `halo bench --listen` (HOST or HOST:PORT; port 18700 by default).
    /// Without it, the peer comes from cluster.toml and is started over SSH.
    #[arg(long, value_name = "HOST", conflicts_with = "node")]
    peer: Option<String>,
    /// With cluster.toml: the node to measure against (host or IP) [default: the first worker].
    #[arg(long, value_name = "HOST")]
    node: Option<String>,
    /// All-reduce and all-gather through torch.distributed, one rank per node of the cluster
    /// config (placed by Ray; start it with `halo cluster up`), for each transport variant.
    #[arg(long, conflicts_with_all = ["listen", "peer", "node"])]
    collective: bool,
    #[command(flatten)]
    coll: halo::collective::CollectiveArgs,
    /// RDMA device for the perftest rows (e.g. rocep1s0f0, rxe0) [default with cluster.toml: the
    /// head's rdma_device]; without it (and without cluster.toml) only TCP is measured.
    #[arg(long, value_name = "DEV")]
    ibdev: Option<String>,
    /// GID index of the cluster IP's RoCE v2 GID (see `halo doctor`) [default: the head's
    /// gid_index from cluster.toml, else 1].
    #[arg(long, value_name = "N")]
    gid_index: Option<u32>,
    /// RDMA device on the peer [default: the peer node's from cluster.toml, else --ibdev].
    #[arg(long, value_name = "DEV")]
    peer_ibdev: Option<String>,
    /// GID index on the peer [default: the peer node's from cluster.toml, else --gid-index].
    #[arg(long, value_name = "N")]
    peer_gid_index: Option<u32>,
    /// Parallel TCP streams (like iperf3 -P).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    streams: u16,
    /// Few sizes and short runs.
    #[arg(long)]
    quick: bool,
    /// Seconds to keep trying to reach the peer (it may still be starting).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    connect_wait: u64,
    /// The halo plugin library (librccl-net-halo.so) on this node: adds its latency, bandwidth and
    /// 2-rank all-reduce rows [default with cluster.toml: [rccl] plugin]. The peer needs it too:
    /// `halo bench --listen --plugin PATH` (started over SSH: [rccl] plugin).
    #[arg(long, value_name = "PATH")]
    plugin: Option<PathBuf>,
    /// With cluster.toml: leave out the perftest rows.
    #[arg(long)]
    no_perftest: bool,
    /// With cluster.toml: leave out the plugin rows.
    #[arg(long)]
    no_plugin: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Also draw the results against message size into FILE (.svg, or .png via rsvg-convert):
    /// latency and bandwidth; with --collective, bus bandwidth and the decode-step times.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Read /sys below DIR when checking the RDMA device (captured trees, tests).
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    root: PathBuf,
}

#[derive(Debug, Args)]
struct DoctorArgs {
    /// Also check HOST: passwordless SSH, then `halo doctor --json` run there (repeatable).
    #[arg(long = "peer", value_name = "HOST")]
    peers: Vec<String>,
    /// Print the report as JSON: {"node", "checks": [{"id","title","verdict","value","fix"}], "peers": [...]}.
    #[arg(long)]
    json: bool,
    /// Read /proc, /sys, /etc, /dev, /opt and /usr below DIR instead of / (a captured tree; see
    /// the README for its layout). Commands such as ethtool are then read from DIR/.halo/.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Interface carrying the cluster IP [default: detected from the RoCE v2 GID table].
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// This node's cluster IPv4 address [default: detected from the RoCE v2 GID table].
    #[arg(long, value_name = "IP")]
    cluster_ip: Option<Ipv4Addr>,
    /// Judge the NCCL/HALO/HSA variables in FILE (KEY=VALUE lines, e.g. cluster.env) instead of
    /// this process's environment; the live plugin probe runs with them too.
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
    /// First checks every node, before starting anything: SSH (host key, authentication,
    /// refused), entering its [runtime] (host or container), `ray` inside it, and its GPUs
    /// (KFD topology, else amd-smi/rocm-smi), which become its --num-gpus. A Ray head that
    /// already runs is kept and only the missing workers are started (--restart stops Ray on
    /// every node first). Waits until `ray status` lists every node. What was started is
    /// recorded in cluster.state.json next to the config. The `ray` executable comes from
    /// HALO_RAY, the node's `ray` key, or [ray] executable.
    #[command(verbatim_doc_comment)]
    Up {
        /// Stop Ray on every node first, then start the cluster anew.
        #[arg(long)]
        restart: bool,
    },
    /// Show each configured node (active or missing) and the GPUs, from `ray status`
    ///
    /// Exit 1 when a node is missing, no Ray head answers (checked within 2 s), or `ray status`
    /// fails (its reason is printed).
    #[command(verbatim_doc_comment)]
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

fn run_doctor(args: DoctorArgs, config: &Path) -> Result<ExitCode> {
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
        // Only --peer uses it; a broken config must not stop the local checks.
        cluster: if args.peers.is_empty() || !config.exists() {
            None
        } else {
            match cluster::ClusterConfig::load(config) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("halo: note: {e:#}; peers are reached with plain `ssh HOST`");
                    None
                }
            }
        },
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
        print!(
            "{}",
            doctor::render_table(&report, doctor::terminal_width())
        );
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
        Cmd::Doctor(args) => run_doctor(args, config),
        Cmd::DoctorPluginProbe { path, shown } => {
            let check = doctor::plugin::probe_here(&path, &shown);
            println!("{}", serde_json::to_string(&check)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(args) if args.collective => run_collective(&args, config),
        Cmd::Bench(args) => run_net_bench(args, config),
        Cmd::Conformance(args) => conformance::main(&args).map(ExitCode::from),
        Cmd::Cluster(ClusterCmd::Init(args)) => {
            cluster::init(&args, config).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Up { restart }) => {
            cluster::up(config, restart).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Status { json }) => cluster::status(config, json).map(|all| {
            if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Cmd::Cluster(ClusterCmd::Down) => cluster::down(config).map(|_| ExitCode::SUCCESS),
        Cmd::Report(args) => halo::report::run(&args, config).map(|json| {
            eprintln!(
                "report written to {} and {}",
                args.out.display(),
                json.display()
            );
            ExitCode::SUCCESS
        }),
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

fn run_collective(args: &NetBenchArgs, config: &Path) -> Result<ExitCode> {
    if let Some(path) = &args.plot {
        halo::bench::plot::check_target(path)?;
    }
    let report = halo::collective::run(&args.coll, config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", halo::collective::render(&report));
    }
    if let Some(path) = &args.plot {
        halo::bench::plot::write_doc(path, &halo::collective::plot_svg(&report))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_net_bench(args: NetBenchArgs, config: &Path) -> Result<ExitCode> {
    use halo::bench::{control, plot, remote, BenchOptions};
    let root = SysRoot::new(&args.root);
    if let Some(bind) = args.listen {
        if args.exit_on_stdin_eof {
            // Started over SSH by the measuring side: its end closes our stdin.
            std::thread::spawn(|| {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                std::process::exit(0);
            });
        }
        control::serve(&control::ListenOptions {
            bind,
            plugin: args.plugin,
            root,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    // Every argument is checked before anything runs.
    if let Some(path) = &args.plot {
        plot::check_target(path)?;
    }
    let wait = std::time::Duration::from_secs(args.connect_wait);
    let mut opts = BenchOptions {
        peer: SocketAddr::from(([127, 0, 0, 1], control::CONTROL_PORT)),
        ibdev: args.ibdev.clone(),
        gid_index: args.gid_index.unwrap_or(1),
        peer_ibdev: args.peer_ibdev.clone(),
        peer_gid_index: args.peer_gid_index,
        plugin: args.plugin.clone(),
        quick: args.quick,
        tcp_streams: usize::from(args.streams),
        connect_wait: wait,
        root,
    };
    let (peer, listener) = if let Some(peer) = &args.peer {
        let with_port = if peer.contains(':') {
            peer.clone()
        } else {
            format!("{peer}:{}", control::CONTROL_PORT)
        };
        opts.peer = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} has no address"))?;
        opts.check_local()?;
        let mut waiting = control::wait_with_progress(opts.peer, wait);
        (control::Peer::connect(opts.peer, wait, &mut waiting)?, None)
    } else {
        let cfg = cluster::ClusterConfig::load(config).with_context(|| {
            "halo bench needs --peer HOST (a node running `halo bench --listen`) or a cluster.toml \
             (`halo cluster init`) to start the peer over SSH"
        })?;
        let local = cfg.head().clone();
        let node = match &args.node {
            Some(n) => cfg
                .workers()
                .iter()
                .find(|w| w.host == *n || w.ip == *n)
                .with_context(|| format!("--node {n}: no such worker in {}", config.display()))?,
            None => cfg.workers().first().with_context(|| {
                format!(
                    "{} lists one node; halo bench needs a second",
                    config.display()
                )
            })?,
        }
        .clone();
        opts.peer = SocketAddr::new(
            node.ip
                .parse()
                .with_context(|| format!("node {}: ip {:?}", node.host, node.ip))?,
            cfg.bench.port,
        );
        if !args.no_perftest {
            opts.ibdev = Some(args.ibdev.clone().unwrap_or(local.rdma_device.clone()));
            opts.gid_index = args.gid_index.unwrap_or(local.gid_index);
            opts.peer_ibdev = Some(args.peer_ibdev.clone().unwrap_or(node.rdma_device.clone()));
            opts.peer_gid_index = Some(args.peer_gid_index.unwrap_or(node.gid_index));
        }
        let remote_plugin = (!args.no_plugin).then(|| cfg.rccl.plugin.clone());
        if !args.no_plugin && opts.plugin.is_none() {
            opts.plugin = Some(PathBuf::from(&cfg.rccl.plugin));
        }
        opts.check_local()?;
        // The plugin in this process picks its device as it would under RCCL on this node.
        for (k, v) in cfg.node_env(&local) {
            if k.starts_with("NCCL_") && std::env::var_os(&k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let mut listener = remote::RemoteListener::start(&cfg, &node, remote_plugin.as_deref())?;
        let mut progress = control::wait_with_progress(opts.peer, wait);
        let peer = control::Peer::connect(opts.peer, wait, &mut |elapsed, e| {
            listener.check_alive()?;
            progress(elapsed, e)
        })?;
        (peer, Some(listener))
    };
    let report = halo::bench::run(&opts, peer);
    if let Some(l) = listener {
        l.finish();
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", halo::bench::render(&report));
    }
    if let Some(path) = &args.plot {
        let (lat, bw) = halo::bench::series(&report);
        plot::write(path, &lat, &bw)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(if report.any_error() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
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
