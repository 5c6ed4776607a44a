//! `halo cluster init | up | status | down`: a Ray cluster over the RoCE network, with the
//! RCCL/vLLM environment set on every node.

pub mod config;
pub mod ray_status;

use std::fs;
use std::net::Ipv4Addr;
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
pub use config::{state_path, ClusterConfig, Node};
pub use ray_status::RayStatus;

const RAY_START_LIMIT: Duration = Duration::from_secs(180);
const RAY_STOP_LIMIT: Duration = Duration::from_secs(90);
const RAY_STATUS_LIMIT: Duration = Duration::from_secs(60);

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
    /// Replace an existing config file.
    #[arg(long)]
    pub force: bool,
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
        });
    }
    let mut cfg = ClusterConfig::new(nodes, args.plugin.clone());
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

/// The one way halo runs a program on a node: locally on the head, over SSH on the others.
/// `argv[0]` is the program; the node's RCCL/Ray environment is not added here.
pub fn node_command(cfg: &ClusterConfig, node: &Node, argv: &[String]) -> Command {
    let is_head = std::ptr::eq(node, cfg.head()) || node.host == cfg.head().host;
    if is_head {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    } else {
        let line: Vec<String> = argv.iter().map(|w| shell_quote(w)).collect();
        ssh_command(cfg, node, &line.join(" "))
    }
}

fn head_start_args(cfg: &ClusterConfig) -> Vec<String> {
    let head = cfg.head();
    vec![
        "start".into(),
        "--head".into(),
        format!("--port={}", cfg.ray.port),
        format!("--node-ip-address={}", head.ip),
        format!("--num-gpus={}", cfg.ray.num_gpus),
        format!("--num-cpus={}", cfg.ray.num_cpus),
        "--disable-usage-stats".into(),
        "--include-dashboard=false".into(),
    ]
}

/// Prefixes a remote shell line with reading the named variables, one line each, from stdin
/// and exporting them, so their values travel over SSH's stdin and never on a command line.
/// Use with [`secrets_input`]. Without names the line is returned as it is.
pub fn with_secrets_from_stdin(names: &[String], line: &str) -> String {
    if names.is_empty() {
        return line.to_string();
    }
    let reads: Vec<String> = names
        .iter()
        .map(|n| format!("IFS= read -r {n} && export {n}"))
        .collect();
    // `sh -c` so the login shell of the remote user (fish, csh, …) does not matter.
    let script = format!("{} && exec \"$@\"", reads.join(" && "));
    format!("sh -c {} sh {line}", shell_quote(&script))
}

/// What [`with_secrets_from_stdin`]'s line expects on stdin.
pub fn secrets_input(secrets: &[(String, String)]) -> Option<String> {
    (!secrets.is_empty()).then(|| secrets.iter().map(|(_, v)| format!("{v}\n")).collect())
}

/// The shell line a worker runs: `env K=V … ray start --address=HEAD:P …`, preceded by reading
/// the cluster's secrets from stdin when there are any ([`ClusterConfig::secret_env`]); the
/// plugin's directory goes in front of the worker's `LD_LIBRARY_PATH`.
pub fn worker_start_line(cfg: &ClusterConfig, node: &Node) -> String {
    let names: Vec<String> = cfg.secret_env().into_iter().map(|(k, _)| k).collect();
    with_secrets_from_stdin(&names, &worker_start_command(cfg, node))
}

fn worker_start_command(cfg: &ClusterConfig, node: &Node) -> String {
    let mut words = vec!["env".to_string()];
    words.extend(cfg.public_env(node).iter().map(|(k, v)| {
        if k == "LD_LIBRARY_PATH" {
            // In front of the worker's own loader path, expanded by its shell.
            format!(
                "{}\"${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\"",
                shell_quote(&format!("{k}={v}"))
            )
        } else {
            shell_quote(&format!("{k}={v}"))
        }
    }));
    words.push(shell_quote(&cfg.ray_for(node)));
    words.extend(
        [
            "start".to_string(),
            format!("--address={}", cfg.head_address()),
            format!("--node-ip-address={}", node.ip),
            format!("--num-gpus={}", cfg.ray.num_gpus),
            format!("--num-cpus={}", cfg.ray.num_cpus),
            "--disable-usage-stats".to_string(),
        ]
        .iter()
        .map(|w| shell_quote(w)),
    );
    words.join(" ")
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

fn check_output(what: &str, out: crate::process::Captured) -> Result<()> {
    if out.success {
        return Ok(());
    }
    let tail: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let tail = tail[tail.len().saturating_sub(8)..].join("\n    ");
    bail!(
        "{what} failed (exit {}):\n    {tail}",
        out.code.map_or("signal".to_string(), |c| c.to_string())
    )
}

/// Starts the head locally and every worker over SSH, then waits until Ray sees them all.
pub fn up(config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let state_file = state_path(config_path);
    let n = cfg.nodes.len();
    let mut state = ClusterState {
        head_address: cfg.head_address(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        nodes: Vec::new(),
    };
    let head = cfg.head();
    let mut cmd = Command::new(cfg.ray_for(head));
    cmd.args(head_start_args(&cfg)).envs(cfg.local_env(head));
    let shown = describe(&cmd);
    println!("[1/{n}] head {} ({}): {shown}", head.host, head.ip);
    let started = Instant::now();
    check_output("ray start --head", run_bounded(&mut cmd, RAY_START_LIMIT)?)?;
    println!(
        "[1/{n}] head {}: Ray head up in {:.1} s",
        head.host,
        started.elapsed().as_secs_f64()
    );
    state.nodes.push(StartedNode {
        host: head.host.clone(),
        ip: head.ip.clone(),
        role: "head".into(),
        command: shown,
    });
    write_state(&state_file, &state)?;

    for (i, node) in cfg.workers().iter().enumerate() {
        let line = worker_start_line(&cfg, node);
        let mut cmd = ssh_command(&cfg, node, &line);
        let shown = describe(&cmd);
        println!(
            "[{}/{n}] worker {} ({}): {shown}",
            i + 2,
            node.host,
            node.ip
        );
        let started = Instant::now();
        let secrets = secrets_input(&cfg.secret_env());
        let result = run_bounded_input(&mut cmd, RAY_START_LIMIT, secrets.as_deref())
            .and_then(|out| check_output(&format!("ray start on {}", node.host), out));
        if let Err(e) = result {
            bail!(
                "{e:#}\n(the nodes started so far are in {}; `halo cluster down` stops them)",
                state_file.display()
            );
        }
        println!(
            "[{}/{n}] worker {}: joined in {:.1} s",
            i + 2,
            node.host,
            started.elapsed().as_secs_f64()
        );
        state.nodes.push(StartedNode {
            host: node.host.clone(),
            ip: node.ip.clone(),
            role: "worker".into(),
            command: shown,
        });
        write_state(&state_file, &state)?;
    }

    let deadline = Instant::now() + Duration::from_secs(cfg.ray.wait_secs);
    loop {
        let status = ray_status(&cfg)?;
        if status.active_nodes >= n {
            println!(
                "cluster up: {} nodes active, {} GPUs at {}",
                status.active_nodes,
                status.gpus_total,
                cfg.head_address()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "only {} of {n} nodes active after {} s (`ray status --address={}`)",
                status.active_nodes,
                cfg.ray.wait_secs,
                cfg.head_address()
            );
        }
        println!("waiting for nodes: {} of {n} active", status.active_nodes);
        thread::sleep(Duration::from_secs(2));
    }
}

/// `ray status --address=HEAD:PORT`, parsed.
pub fn ray_status(cfg: &ClusterConfig) -> Result<RayStatus> {
    let mut cmd = Command::new(cfg.ray_for(cfg.head()));
    cmd.arg("status")
        .arg(format!("--address={}", cfg.head_address()));
    let out = run_bounded(&mut cmd, RAY_STATUS_LIMIT)?;
    if !out.success {
        // `ray status` fails while no GCS answers: that is zero nodes, not an error.
        return Ok(RayStatus::default());
    }
    Ok(ray_status::parse(&out.stdout))
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub address: String,
    pub expected_nodes: usize,
    #[serde(flatten)]
    pub ray: RayStatus,
}

/// Prints the cluster's state; returns whether every configured node is active.
pub fn status(config_path: &Path, json: bool) -> Result<bool> {
    let cfg = ClusterConfig::load(config_path)?;
    let report = StatusReport {
        address: cfg.head_address(),
        expected_nodes: cfg.nodes.len(),
        ray: ray_status(&cfg)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "Ray cluster at {}: {} of {} nodes active",
            report.address, report.ray.active_nodes, report.expected_nodes
        );
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
    }
    Ok(report.ray.active_nodes >= report.expected_nodes)
}

/// Matches the raylet and GCS server of the node with cluster address `ip`.
fn ray_process_pattern(ip: &str) -> String {
    format!(
        "(raylet/raylet|gcs/gcs_server) .*node[-_]ip[-_]address={}( |$)",
        ip.replace('.', "\\.")
    )
}

fn leftover_processes(cfg: &ClusterConfig, node: &Node, is_head: bool) -> Result<Vec<String>> {
    let pattern = ray_process_pattern(&node.ip);
    let mut cmd = if is_head {
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

/// Stops Ray on the workers (over SSH) and the head, then checks nothing of it is left.
pub fn down(config_path: &Path) -> Result<()> {
    let cfg = ClusterConfig::load(config_path)?;
    let mut errors = Vec::new();
    for node in cfg.workers() {
        let line = format!("{} stop --force", shell_quote(&cfg.ray_for(node)));
        let mut cmd = ssh_command(&cfg, node, &line);
        println!("worker {} ({}): {}", node.host, node.ip, describe(&cmd));
        if let Err(e) = run_bounded(&mut cmd, RAY_STOP_LIMIT)
            .and_then(|o| check_output(&format!("ray stop on {}", node.host), o))
        {
            errors.push(format!("{e:#}"));
        }
    }
    let head = cfg.head();
    let mut cmd = Command::new(cfg.ray_for(head));
    cmd.args(["stop", "--force"]);
    println!("head {} ({}): {}", head.host, head.ip, describe(&cmd));
    if let Err(e) =
        run_bounded(&mut cmd, RAY_STOP_LIMIT).and_then(|o| check_output("ray stop on the head", o))
    {
        errors.push(format!("{e:#}"));
    }

    // SIGKILLed processes can take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, node) in cfg.nodes.iter().enumerate() {
        loop {
            let left = leftover_processes(&cfg, node, i == 0)?;
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
