//! `halo cluster init | up | status | down`: a Ray cluster over the RoCE network, with the
//! RCCL/vLLM environment set on every node.

pub mod config;
pub mod probe;
pub mod ray_status;
pub mod runtime;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::doctor::rdma;
use crate::process::{describe, run_bounded, run_bounded_input, shell_quote};
use crate::sysroot::SysRoot;
pub use config::{state_path, ClusterConfig, Node, NodeCommand};
pub use ray_status::RayStatus;
pub use runtime::Runtime;

const RAY_START_LIMIT: Duration = Duration::from_secs(180);
const RAY_STOP_LIMIT: Duration = Duration::from_secs(90);
/// `ray status` once a head accepts connections (it then answers in about a second).
const RAY_STATUS_LIMIT: Duration = Duration::from_secs(30);
/// How long `status` and `up` wait for the head's Ray port to accept a connection.
pub const HEAD_CONNECT_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct InitArgs {
    /// A node as HOST or HOST=CLUSTER_IP; repeat for each node, head first.
    /// HOST is what `ssh` connects to; CLUSTER_IP is the address on the RDMA interface.
    #[arg(long = "node", value_name = "HOST[=IP]", required = true)]
    pub nodes: Vec<String>,
    /// SSH user for the workers (default: ssh's own default).
    #[arg(long)]
    pub ssh_user: Option<String>,
    /// SSH port for the workers.
    #[arg(long)]
    pub ssh_port: Option<u16>,
    /// SSH private key for the workers.
    #[arg(long)]
    pub ssh_key: Option<PathBuf>,
    /// Path of librccl-net-halo.so on the nodes [default: /opt/halo/lib/librccl-net-halo.so].
    #[arg(long)]
    pub plugin: Option<String>,
    /// Default model for `halo serve`.
    #[arg(long)]
    pub model: Option<String>,
    /// Ray GCS port on the head.
    #[arg(long, default_value_t = 6379)]
    pub ray_port: u16,
    /// CPUs each node offers to Ray.
    #[arg(long, default_value_t = 8)]
    pub num_cpus: u32,
    /// RDMA interface (skips detection; the same name is assumed on every node).
    #[arg(long)]
    pub iface: Option<String>,
    /// RDMA device for NCCL_IB_HCA (skips detection).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RoCE v2 GID index (skips detection).
    #[arg(long)]
    pub gid_index: Option<u32>,
    /// Read sysfs below DIR when detecting (for captured trees).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Where Ray, vLLM and every other command run on the nodes [default: the container
    /// `halo container create` recorded on this machine, else host].
    #[arg(long, value_enum)]
    pub engine: Option<InitEngine>,
    /// Container name for --engine podman|toolbox|distrobox [default: the recorded one, else vllm].
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// Replace an existing config file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitEngine {
    Host,
    Podman,
    Toolbox,
    Distrobox,
}

/// The runtime `init` writes: flags first, then the record of `halo container create`.
fn init_runtime(args: &InitArgs) -> Result<(Runtime, String)> {
    let record = crate::container::load_record();
    let runtime_of = |engine: InitEngine, name: String| match engine {
        InitEngine::Host => Runtime::Host,
        InitEngine::Podman => Runtime::Podman { name },
        InitEngine::Toolbox => Runtime::Toolbox { name },
        InitEngine::Distrobox => Runtime::Distrobox { name },
    };
    let recorded_name = record.as_ref().map(|(r, _)| r.name.clone());
    match (args.engine, &record) {
        (Some(engine), _) => {
            let name = args
                .container
                .clone()
                .or(recorded_name)
                .unwrap_or_else(|| "vllm".into());
            Ok((runtime_of(engine, name), "--engine".into()))
        }
        (None, Some((rec, path))) => {
            let name = args.container.clone().unwrap_or_else(|| rec.name.clone());
            Ok((
                runtime_of(rec.engine.into(), name),
                format!("recorded by `halo container create` in {}", path.display()),
            ))
        }
        (None, None) => {
            if args.container.is_some() {
                bail!("--container needs --engine podman|toolbox|distrobox (no container recorded by `halo container create` here)");
            }
            Ok((
                Runtime::Host,
                "no container recorded by `halo container create`".into(),
            ))
        }
    }
}

struct NodeSpec {
    host: String,
    ip: Option<Ipv4Addr>,
}

fn parse_node(spec: &str) -> Result<NodeSpec> {
    let (host, ip) = match spec.split_once('=') {
        Some((h, ip)) => (
            h,
            Some(
                ip.parse()
                    .with_context(|| format!("--node {spec}: '{ip}' is not an IPv4 address"))?,
            ),
        ),
        None => (spec, spec.parse().ok()),
    };
    if host.is_empty() {
        bail!("--node {spec}: empty host");
    }
    Ok(NodeSpec {
        host: host.to_string(),
        ip,
    })
}

/// Builds the config from flags plus what the local RDMA probes find, and writes it.
pub fn init(args: &InitArgs, config_path: &Path) -> Result<ClusterConfig> {
    if config_path.exists() && !args.force {
        bail!(
            "{} exists; pass --force to replace it",
            config_path.display()
        );
    }
    let specs = args
        .nodes
        .iter()
        .map(|s| parse_node(s))
        .collect::<Result<Vec<_>>>()?;
    let root = SysRoot::new(&args.root);
    let ports = rdma::discover(&root);
    let detected = rdma::select_cluster_port(&ports, args.iface.as_deref(), specs[0].ip);
    let head_ip = specs[0].ip.or(detected.as_ref().map(|d| d.ip));
    let iface = args
        .iface
        .clone()
        .or(detected.as_ref().map(|d| d.netdev.clone()));
    let device = args
        .rdma_device
        .clone()
        .or(detected.as_ref().map(|d| d.device.clone()));
    let gid = args.gid_index.or(detected.as_ref().map(|d| d.gid_index));
    let (Some(iface), Some(device), Some(gid)) = (iface, device, gid) else {
        bail!(
            "no RoCE v2 GID{} found under {}; pass --iface, --rdma-device and --gid-index (see `halo doctor`)",
            specs[0].ip.map(|ip| format!(" for {ip}")).unwrap_or_default(),
            root.path("/sys/class/infiniband").display()
        );
    };
    let mut nodes = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let ip = if i == 0 { head_ip } else { spec.ip };
        let ip = ip.ok_or_else(|| {
            anyhow!(
                "--node {}: give its cluster IP as {}=IP",
                spec.host,
                spec.host
            )
        })?;
        nodes.push(Node {
            host: spec.host.clone(),
            ip: ip.to_string(),
            // Nodes of one cluster are built alike; edit the file where they are not.
            iface: iface.clone(),
            rdma_device: device.clone(),
            gid_index: gid,
            ssh_user: None,
            ssh_port: None,
            ray: None,
            runtime: None,
        });
    }
    let (runtime, runtime_why) = init_runtime(args)?;
    let mut cfg = ClusterConfig::new(nodes, args.plugin.clone());
    cfg.runtime = runtime;
    cfg.ray.port = args.ray_port;
    cfg.ray.num_cpus = args.num_cpus;
    cfg.ssh.user = args.ssh_user.clone();
    cfg.ssh.port = args.ssh_port;
    cfg.ssh.key = args.ssh_key.clone();
    cfg.model.name = args.model.clone();
    cfg.model.tp = Some(cfg.nodes.len() as u32);
    fs::write(config_path, cfg.to_toml()?)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    println!(
        "wrote {} ({} nodes, head {} on {iface}, {device}, GID index {gid})",
        config_path.display(),
        cfg.nodes.len(),
        cfg.head().ip
    );
    println!("runtime: {} ({runtime_why})", cfg.runtime);
    Ok(cfg)
}

/// `ssh [-p port] [-i key] [-o opt]… [user@]host REMOTE`
pub fn ssh_command(cfg: &ClusterConfig, node: &Node, remote: &str) -> Command {
    let mut cmd = Command::new("ssh");
    // ssh keeps the first value it is given for an option: the config's come first so that
    // they override these defaults (e.g. a longer ConnectTimeout for slow nodes).
    for opt in &cfg.ssh.options {
        cmd.arg("-o").arg(opt);
    }
    if cfg.ssh.accept_new_host_keys {
        cmd.args(["-o", "StrictHostKeyChecking=accept-new"]);
    }
    cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]);
    if let Some(port) = node.ssh_port.or(cfg.ssh.port) {
        cmd.arg("-p").arg(port.to_string());
    }
    if let Some(key) = &cfg.ssh.key {
        cmd.arg("-i").arg(key);
    }
    let target = match node.ssh_user.as_ref().or(cfg.ssh.user.as_ref()) {
        Some(user) => format!("{user}@{}", node.host),
        None => node.host.clone(),
    };
    cmd.arg(target).arg(remote);
    cmd
}

/// The one way halo runs a program on a node without the cluster environment: inside the
/// node's runtime, here for the head and over SSH for the others ([`ClusterConfig::command`]).
pub fn node_command(cfg: &ClusterConfig, node: &Node, argv: &[String]) -> Command {
    cfg.command(node, &[], argv)
}

/// `ray start` arguments for `node` (head or worker) offering `gpus` GPUs, with the marker
/// resource that lets `status` name the node ([`ray_status::MARKER_PREFIX`]).
pub fn ray_start_argv(cfg: &ClusterConfig, node: &Node, gpus: u32) -> Vec<String> {
    let mut argv = vec![cfg.ray_for(node), "start".into()];
    if cfg.is_head(node) {
        argv.extend(["--head".into(), format!("--port={}", cfg.ray.port)]);
    } else {
        argv.push(format!("--address={}", cfg.head_address()));
    }
    argv.extend([
        format!("--node-ip-address={}", node.ip),
        format!("--num-gpus={gpus}"),
        format!("--num-cpus={}", cfg.ray.num_cpus),
        format!(
            "--resources={{\"{}{}\": 1}}",
            ray_status::MARKER_PREFIX,
            node.ip
        ),
        "--disable-usage-stats".into(),
    ]);
    if cfg.is_head(node) {
        argv.push("--include-dashboard=false".into());
    }
    argv
}

/// `ray start` for `node`, inside its runtime, with its cluster environment (over SSH for
/// workers) and the cluster's secrets to write to its stdin.
pub fn ray_start_command(cfg: &ClusterConfig, node: &Node, gpus: u32) -> NodeCommand {
    cfg.env_command(node, &[], &ray_start_argv(cfg, node, gpus))
}

/// `ray stop --force` on `node`, inside its runtime.
pub fn ray_stop_command(cfg: &ClusterConfig, node: &Node) -> Command {
    cfg.command(
        node,
        &[],
        &[cfg.ray_for(node), "stop".into(), "--force".into()],
    )
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub head_address: String,
    pub started_unix: u64,
    pub nodes: Vec<StartedNode>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StartedNode {
    pub host: String,
    pub ip: String,
    pub role: String,
    pub command: String,
}

fn write_state(path: &Path, state: &ClusterState) -> Result<()> {
    fs::write(path, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The last `n` non-empty lines a command wrote (stderr first, then stdout).
fn output_tail(out: &crate::process::Captured, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// A command's exit code, or "signal".
fn exit_word(out: &crate::process::Captured) -> String {
    out.code.map_or("signal".to_string(), |c| c.to_string())
}

fn check_output(what: &str, out: crate::process::Captured) -> Result<()> {
    if out.success {
        return Ok(());
    }
    bail!(
        "{what} failed (exit {}):\n    {}",
        exit_word(&out),
        output_tail(&out, 8).join("\n    ")
    )
}

/// Whether something accepts TCP connections at the head's Ray port; `Err` says why not
/// ("connection refused", "no answer within 2 s", …). Bounded to [`HEAD_CONNECT_LIMIT`].
pub fn head_listening(cfg: &ClusterConfig) -> std::result::Result<(), String> {
    let addr = cfg.head_address();
    let sock: SocketAddr = match addr.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) | Err(_) => return Err(format!("{addr} is not an address")),
    };
    match TcpStream::connect_timeout(&sock, HEAD_CONNECT_LIMIT) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("connection refused".into())
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            Err(format!(
                "no answer within {} s",
                HEAD_CONNECT_LIMIT.as_secs()
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The configured nodes that `status` does not show (by their marker resource).
fn missing_nodes<'a>(cfg: &'a ClusterConfig, status: &RayStatus) -> Vec<&'a Node> {
    cfg.nodes
        .iter()
        .filter(|n| status.node_with_ip(&n.ip).is_none())
        .collect()
}

fn node_list(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} ({})", n.host, n.ip))
        .collect::<Vec<_>>()
        .join(", ")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Stops Ray on every worker, then on the head, each inside its runtime; the errors, if any.
fn stop_all(cfg: &ClusterConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let order = cfg.workers().iter().chain(std::iter::once(cfg.head()));
    for node in order {
        let role = if cfg.is_head(node) { "head" } else { "worker" };
        let mut cmd = ray_stop_command(cfg, node);
        println!("{role} {} ({}): {}", node.host, node.ip, describe(&cmd));
        if let Err(e) = run_bounded(&mut cmd, RAY_STOP_LIMIT)
            .and_then(|o| check_output(&format!("ray stop on {}", node.host), o))
        {
            errors.push(format!("{e:#}"));
        }
    }
    errors
}

/// Checks every node (SSH, runtime, `ray`, GPUs) before anything starts; then starts the Ray head
/// here and every worker over SSH, inside their runtimes, and waits until Ray sees them all.
/// A head that already runs is reported and kept (only the missing workers are started), unless
/// `restart`, which stops Ray on every node first.
pub fn up(config_path: &Path, restart: bool) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let state_file = state_path(config_path);
    let n = cfg.nodes.len();

    println!("checking {n} nodes (SSH, runtime, ray, GPUs) before starting anything");
    let facts = match probe::check_nodes(&cfg) {
        Ok(f) => f,
        Err(problems) => bail!(
            "nothing was started; fix these first:\n  - {}",
            problems.join("\n  - ")
        ),
    };
    let mut gpus = Vec::new();
    for (node, f) in cfg.nodes.iter().zip(&facts) {
        let offered = cfg.ray.num_gpus.unwrap_or(f.gpus.count);
        let note = match cfg.ray.num_gpus {
            Some(g) if g != f.gpus.count => format!(", but [ray] num_gpus = {g} is declared"),
            _ => String::new(),
        };
        println!(
            "  {} ({}) in {}: ray {}, {}{note}",
            node.host,
            node.ip,
            cfg.runtime_for(node),
            f.ray.as_deref().unwrap_or("?"),
            f.gpus
        );
        gpus.push(offered);
    }

    let mut already = None;
    if head_listening(&cfg).is_ok() {
        if restart {
            println!(
                "Ray head already running at {}: --restart stops Ray on every node first",
                cfg.head_address()
            );
            let errors = stop_all(&cfg);
            if !errors.is_empty() {
                bail!("--restart: {}", errors.join("\n"));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while head_listening(&cfg).is_ok() {
                if Instant::now() >= deadline {
                    bail!(
                        "--restart: {} still accepts connections 30 s after `ray stop`",
                        cfg.head_address()
                    );
                }
                thread::sleep(Duration::from_millis(500));
            }
        } else {
            let status = ray_status(&cfg).with_context(|| {
                format!(
                    "something accepts connections at {} but is not a Ray head that answers; \
                     `halo cluster up --restart` stops Ray on every node and starts again",
                    cfg.head_address()
                )
            })?;
            let missing = missing_nodes(&cfg, &status);
            println!(
                "Ray head already running at {}: {} of {n} configured nodes active{}",
                cfg.head_address(),
                n - missing.len(),
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(", missing: {}", node_list(&missing))
                }
            );
            already = Some(missing.iter().map(|m| m.ip.clone()).collect::<Vec<_>>());
        }
    }

    let mut state = match &already {
        Some(_) => fs::read_to_string(&state_file)
            .ok()
            .and_then(|t| serde_json::from_str::<ClusterState>(&t).ok())
            .filter(|s| s.head_address == cfg.head_address()),
        None => None,
    }
    .unwrap_or(ClusterState {
        head_address: cfg.head_address(),
        started_unix: now_unix(),
        nodes: Vec::new(),
    });

    for (i, node) in cfg.nodes.iter().enumerate() {
        let role = if i == 0 { "head" } else { "worker" };
        if let Some(missing) = &already {
            // The head answers (it is the GCS); workers already in the cluster stay as they are.
            if i == 0 || !missing.contains(&node.ip) {
                println!(
                    "[{}/{n}] {role} {} ({}): already running",
                    i + 1,
                    node.host,
                    node.ip
                );
                continue;
            }
        }
        let NodeCommand { mut cmd, input } = ray_start_command(&cfg, node, gpus[i]);
        let shown = describe(&cmd);
        println!(
            "[{}/{n}] {role} {} ({}): {shown}",
            i + 1,
            node.host,
            node.ip
        );
        let started = Instant::now();
        let what = if i == 0 {
            "ray start --head".to_string()
        } else {
            format!("ray start on {}", node.host)
        };
        let result = run_bounded_input(&mut cmd, RAY_START_LIMIT, input.as_deref())
            .and_then(|out| check_output(&what, out));
        if let Err(e) = result {
            if i == 0 {
                return Err(e);
            }
            bail!(
                "{e:#}\n(the nodes started so far are in {}; `halo cluster up` again starts the missing ones, \
                 `halo cluster down` stops them)",
                state_file.display()
            );
        }
        println!(
            "[{}/{n}] {role} {}: {} in {:.1} s",
            i + 1,
            node.host,
            if i == 0 { "Ray head up" } else { "joined" },
            started.elapsed().as_secs_f64()
        );
        state.nodes.retain(|s| s.ip != node.ip);
        state.nodes.push(StartedNode {
            host: node.host.clone(),
            ip: node.ip.clone(),
            role: role.into(),
            command: shown,
        });
        write_state(&state_file, &state)?;
    }

    let deadline = Instant::now() + Duration::from_secs(cfg.ray.wait_secs);
    loop {
        let status = ray_status(&cfg);
        let missing = match &status {
            Ok(s) => missing_nodes(&cfg, s),
            Err(_) => cfg.nodes.iter().collect(),
        };
        if let (Ok(status), true) = (&status, missing.is_empty()) {
            let total = status.gpus_total;
            let no_gpu: Vec<&Node> = cfg
                .nodes
                .iter()
                .filter(|n| {
                    status
                        .node_with_ip(&n.ip)
                        .is_some_and(|r| r.gpus_total == 0.0)
                })
                .collect();
            let gpu_note = if no_gpu.is_empty() {
                String::new()
            } else if no_gpu.len() == n {
                " (no GPU detected on any node: vLLM needs one per rank; see `halo doctor`)"
                    .to_string()
            } else {
                format!(" (no GPU on {})", node_list(&no_gpu))
            };
            println!(
                "cluster up: {n} node{} active, {} at {}{gpu_note}",
                if n == 1 { "" } else { "s" },
                gpu_word(total),
                cfg.head_address()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = match status {
                Ok(_) => format!("missing: {}", node_list(&missing)),
                Err(e) => format!("{e:#}"),
            };
            bail!(
                "after {} s, {} of {n} nodes active ({why})",
                cfg.ray.wait_secs,
                n - missing.len(),
            );
        }
        println!(
            "waiting for nodes: {} of {n} active (missing: {})",
            n - missing.len(),
            node_list(&missing)
        );
        thread::sleep(Duration::from_secs(2));
    }
}

fn gpu_word(count: f64) -> String {
    if count == 1.0 {
        "1 GPU".into()
    } else {
        format!("{count} GPUs")
    }
}

/// `ray status -v --address=HEAD:PORT` on the head, inside its runtime, parsed. Fails with the
/// reason when no head listens (within [`HEAD_CONNECT_LIMIT`]) or `ray status` fails.
pub fn ray_status(cfg: &ClusterConfig) -> Result<RayStatus> {
    if let Err(why) = head_listening(cfg) {
        bail!(
            "no Ray head answers at {} ({why}): the cluster is down; `halo cluster up` starts it",
            cfg.head_address()
        );
    }
    let head = cfg.head();
    let mut cmd = cfg.command(
        head,
        &[],
        &[
            cfg.ray_for(head),
            "status".into(),
            "-v".into(),
            format!("--address={}", cfg.head_address()),
        ],
    );
    let out = run_bounded(&mut cmd, RAY_STATUS_LIMIT)?;
    if !out.success {
        let tail = output_tail(&out, 3);
        bail!(
            "ray status failed (exit {}): {}",
            exit_word(&out),
            if tail.is_empty() {
                "no output".to_string()
            } else {
                tail.join(" | ")
            }
        );
    }
    Ok(ray_status::parse(&out.stdout))
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub host: String,
    pub ip: String,
    pub active: bool,
    pub gpus: f64,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub address: String,
    pub expected_nodes: usize,
    /// Why the state could not be read (no head answers, `ray status` failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub ray: RayStatus,
    pub nodes: Vec<NodeStatus>,
}

/// Prints the cluster's state; returns whether every configured node is active. When no head
/// answers or `ray status` fails, that is the error (with `--json`, the report's `error`).
pub fn status(config_path: &Path, json: bool) -> Result<bool> {
    let cfg = ClusterConfig::load(config_path)?;
    let mut report = StatusReport {
        address: cfg.head_address(),
        expected_nodes: cfg.nodes.len(),
        error: None,
        ray: RayStatus::default(),
        nodes: Vec::new(),
    };
    match ray_status(&cfg) {
        Ok(ray) => report.ray = ray,
        Err(e) if json => report.error = Some(format!("{e:#}")),
        Err(e) => return Err(e),
    }
    if report.error.is_none() {
        report.nodes = cfg
            .nodes
            .iter()
            .map(|n| {
                let seen = report.ray.node_with_ip(&n.ip);
                NodeStatus {
                    host: n.host.clone(),
                    ip: n.ip.clone(),
                    active: seen.is_some(),
                    gpus: seen.map_or(0.0, |r| r.gpus_total),
                }
            })
            .collect();
    }
    let all = report.error.is_none() && report.nodes.iter().all(|n| n.active);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(all);
    }
    let active = report.nodes.iter().filter(|n| n.active).count();
    println!(
        "Ray cluster at {}: {} of {} nodes active",
        report.address, active, report.expected_nodes
    );
    for n in &report.nodes {
        if n.active {
            println!("  node {} ({}): active, {}", n.host, n.ip, gpu_word(n.gpus));
        } else {
            println!("  node {} ({}) missing", n.host, n.ip);
        }
    }
    let others = report.ray.active_nodes.saturating_sub(active);
    if others > 0 {
        println!(
            "  other nodes in the cluster (not in the config, or not started by halo): {others}"
        );
    }
    if report.ray.pending_nodes > 0 {
        println!("  pending nodes: {}", report.ray.pending_nodes);
    }
    println!(
        "  GPUs: {}/{} used",
        report.ray.gpus_used, report.ray.gpus_total
    );
    println!(
        "  CPUs: {}/{} used",
        report.ray.cpus_used, report.ray.cpus_total
    );
    Ok(all)
}

/// Matches the raylet and GCS server of the node with cluster address `ip`.
fn ray_process_pattern(ip: &str) -> String {
    format!(
        "(raylet/raylet|gcs/gcs_server) .*node[-_]ip[-_]address={}( |$)",
        ip.replace('.', "\\.")
    )
}

/// Ray processes of `node` left running. Listed from the node itself, outside any container:
/// the host's process table shows the processes of every container on it.
fn leftover_processes(cfg: &ClusterConfig, node: &Node) -> Result<Vec<String>> {
    let pattern = ray_process_pattern(&node.ip);
    let mut cmd = if cfg.is_head(node) {
        let mut c = Command::new("pgrep");
        c.arg("-af").arg(&pattern);
        c
    } else {
        ssh_command(cfg, node, &format!("pgrep -af {}", shell_quote(&pattern)))
    };
    let out = run_bounded(&mut cmd, Duration::from_secs(30))?;
    match out.code {
        Some(0) => Ok(out
            .stdout
            .lines()
            .map(|l| l.chars().take(160).collect())
            .collect()),
        Some(1) => Ok(Vec::new()),
        _ => bail!(
            "cannot list processes on {}: {}",
            node.host,
            out.stderr.trim()
        ),
    }
}

/// Stops Ray on the workers (over SSH) and the head, inside their runtimes, then checks nothing
/// of it is left.
pub fn down(config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let mut errors = stop_all(&cfg);

    // SIGKILLed processes can take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &cfg.nodes {
        loop {
            let left = leftover_processes(&cfg, node)?;
            if left.is_empty() {
                println!("{}: no Ray processes left", node.host);
                break;
            }
            if Instant::now() >= deadline {
                errors.push(format!(
                    "{}: Ray processes still running:\n    {}",
                    node.host,
                    left.join("\n    ")
                ));
                break;
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    let state_file = state_path(config_path);
    if state_file.exists() {
        fs::remove_file(&state_file)
            .with_context(|| format!("cannot remove {}", state_file.display()))?;
    }
    println!("cluster down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs() {
        let s = parse_node("strix2=192.168.100.2").unwrap();
        assert_eq!(
            (s.host.as_str(), s.ip),
            ("strix2", Some(Ipv4Addr::new(192, 168, 100, 2)))
        );
        assert_eq!(
            parse_node("10.0.0.7").unwrap().ip,
            Some(Ipv4Addr::new(10, 0, 0, 7))
        );
        assert_eq!(parse_node("strix2").unwrap().ip, None);
        assert!(parse_node("strix2=nope").is_err());
    }

    #[test]
    fn process_pattern_escapes_dots() {
        assert_eq!(
            ray_process_pattern("127.0.0.2"),
            r"(raylet/raylet|gcs/gcs_server) .*node[-_]ip[-_]address=127\.0\.0\.2( |$)"
        );
    }
}
