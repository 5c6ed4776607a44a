//! `--peer HOST`: passwordless SSH to the peer, then the peer's own doctor report, the two
//! links compared, and (on the running system) an RDMA ping between them. A peer that is a node
//! of the cluster config is reached with the config's SSH settings, and its doctor runs inside
//! the node's runtime (`ClusterConfig::command`), where RCCL and the plugin are, as the
//! config's `[bench] halo` executable. The RDMA ping then runs on the device and GID index the
//! config gives each node (what RCCL is told to use), else on the detected ones.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::link::LinkFacts;
#[cfg(test)]
use super::Verdict;
use super::{Check, NodeReport};
use crate::cluster::{probe, ClusterConfig, Node};
use crate::process::run_bounded;

const SSH_OPTS: [&str; 4] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"];

fn ssh(host: &str, remote: &[&str]) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(SSH_OPTS).arg(host).args(remote);
    cmd
}

pub fn check_peer(host: &str, cluster: Option<&ClusterConfig>) -> (Check, NodeReport) {
    let node = cluster.and_then(|c| c.nodes.iter().find(|n| n.host == host).map(|n| (c, n)));
    let Some((cfg, node)) = node else {
        return check_plain_peer(host);
    };
    let id = format!("peer.ssh.{host}");
    let title = format!("Passwordless SSH to {host}");
    let failed_report = |why: String| NodeReport {
        node: host.to_string(),
        checks: vec![Check::skip("doctor.remote", "Doctor on the peer", why)],
        link: None,
        peers: Vec::new(),
    };
    if let Err(why) = probe::check_ssh(cfg, node) {
        return (
            Check::fail(
                &id,
                &title,
                why,
                "see the message; SSH settings are under [ssh] in the cluster config",
            ),
            failed_report("SSH to the peer failed".to_string()),
        );
    }
    let ssh_check = Check::pass(&id, &title, format!("ssh {host} true: ok (cluster config)"));
    let runtime = cfg.runtime_for(node).clone();
    let argv = [cfg.bench.halo.as_str(), "doctor", "--json"].map(String::from);
    let halo = &cfg.bench.halo;
    let remote = match run_bounded(&mut cfg.command(node, &[], &argv), Duration::from_secs(90)) {
        Ok(out) => serde_json::from_str::<NodeReport>(&out.stdout).unwrap_or_else(|_| NodeReport {
            node: host.to_string(),
            checks: vec![Check::fail(
                "doctor.remote",
                "Doctor on the peer",
                format!(
                    "`{halo} doctor --json` in {runtime} on {host} gave no report: {}",
                    last_line(&out.stderr)
                ),
                format!(
                    "install halo in {runtime} on {host} as {halo} ([bench] halo in the cluster config; default: halo on the PATH, e.g. /usr/local/bin); {}",
                    runtime.entry_hint()
                ),
            )],
            link: None,
            peers: Vec::new(),
        }),
        Err(e) => failed_report(e.to_string()),
    };
    (ssh_check, remote)
}

/// `argv` on the peer: inside its runtime with the config's SSH settings when it is a node of
/// the cluster config, else over plain `ssh HOST`.
fn peer_command(host: &str, cluster: Option<&ClusterConfig>, argv: &[String]) -> Command {
    match cluster.and_then(|c| c.nodes.iter().find(|n| n.host == host).map(|n| (c, n))) {
        Some((cfg, node)) => cfg.command(node, &[], argv),
        None => {
            let words: Vec<&str> = argv.iter().map(String::as_str).collect();
            ssh(host, &words)
        }
    }
}

fn check_plain_peer(host: &str) -> (Check, NodeReport) {
    let id = format!("peer.ssh.{host}");
    let title = format!("Passwordless SSH to {host}");
    let failed_report = |why: String| NodeReport {
        node: host.to_string(),
        checks: vec![Check::skip("doctor.remote", "Doctor on the peer", why)],
        link: None,
        peers: Vec::new(),
    };
    let reach = run_bounded(&mut ssh(host, &["true"]), Duration::from_secs(15));
    let ssh_check = match &reach {
        Ok(out) if out.success => {
            Check::pass(&id, &title, format!("ssh -o BatchMode=yes {host} true: ok"))
        }
        Ok(out) => Check::fail(
            &id,
            &title,
            format!("ssh {host} failed: {}", last_line(&out.stderr)),
            ssh_fix(host, &out.stderr),
        ),
        Err(e) => Check::fail(
            &id,
            &title,
            e.to_string(),
            format!("check that {host} is up and sshd runs on it"),
        ),
    };
    if ssh_check.verdict != super::Verdict::Pass {
        return (
            ssh_check,
            failed_report("SSH to the peer failed".to_string()),
        );
    }
    let remote = match run_bounded(&mut ssh(host, &["halo", "doctor", "--json"]), Duration::from_secs(90)) {
        // Exit status 1 only means the peer has failing checks: its JSON is still the report.
        Ok(out) => match serde_json::from_str::<NodeReport>(&out.stdout) {
            Ok(report) => report,
            Err(_) => NodeReport {
                node: host.to_string(),
                checks: vec![Check::fail(
                    "doctor.remote",
                    "Doctor on the peer",
                    format!("`halo doctor --json` on {host} gave no report: {}", last_line(&out.stderr)),
                    format!("install halo on {host} in a directory on the SSH session's PATH (e.g. /usr/local/bin)"),
                )],
                link: None,
                peers: Vec::new(),
            },
        },
        Err(e) => failed_report(e.to_string()),
    };
    (ssh_check, remote)
}

/// The fix for a failed `ssh HOST true`, from what ssh said: only a refused key is fixed by
/// `ssh-copy-id`.
pub fn ssh_fix(host: &str, stderr: &str) -> String {
    let has = |s: &str| stderr.contains(s);
    if has("Permission denied") {
        format!("ssh-copy-id {host} (then accept the host key once: ssh {host} true)")
    } else if has("Host key verification failed") || has("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        format!("accept (or, if {host} was reinstalled, renew) its host key: ssh-keygen -R {host}; ssh {host} true")
    } else if has("Could not resolve hostname") || has("Name or service not known") {
        format!("{host} does not resolve: use its IP address, or add it to /etc/hosts")
    } else if has("Connection refused") {
        format!("{host} is up but no SSH server listens: on {host}, sudo systemctl enable --now sshd (Debian/Ubuntu: ssh)")
    } else if has("No route to host") || has("timed out") || has("Network is unreachable") {
        format!("{host} does not answer: check that it is powered on and on the network (ping {host}), and that its firewall lets SSH (port 22) in")
    } else {
        format!("check that {host} is up and sshd runs on it (ssh -v {host} true says more)")
    }
}

/// What must agree between two nodes for RCCL to connect them, and what only slows them.
/// With `live`, an RDMA ping runs too; its server starts on the peer the way [`peer_command`] says.
pub fn compare(
    local: &NodeReport,
    remote: &NodeReport,
    host: &str,
    live: bool,
    cluster: Option<&ClusterConfig>,
) -> Vec<Check> {
    let id = format!("peer.link.{host}");
    let title = format!("Cluster link matches {host}");
    let (Some(a), Some(b)) = (&local.link, &remote.link) else {
        let missing = if local.link.is_none() {
            &local.node
        } else {
            host
        };
        return vec![Check::skip(
            &id,
            &title,
            format!("cluster interface of {missing} unknown (see its RDMA checks)"),
        )];
    };
    let mut out = vec![compare_links(&local.node, a, host, b)];
    if live {
        out.push(ping(local, a, host, b, cluster));
    }
    out
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("?".to_string(), T::to_string)
}

pub fn compare_links(me: &str, a: &LinkFacts, host: &str, b: &LinkFacts) -> Check {
    let id = format!("peer.link.{host}");
    let title = format!("Cluster link matches {host}");
    let mut blocks = Vec::new();
    let mut fixes = Vec::new();
    let mut slows = Vec::new();
    // RoCE version and GID type: a RoCE v1 GID cannot talk to a RoCE v2 one.
    if a.roce.is_some() && b.roce.is_some() && a.roce != b.roce {
        blocks.push(format!(
            "RoCE version {me} {}, {host} {}",
            opt(&a.roce),
            opt(&b.roce)
        ));
        fixes.push("both nodes need RoCE v2 GIDs (see rdma.gid on each)".to_string());
    }
    if a.gid_type.is_some() && b.gid_type.is_some() && a.gid_type != b.gid_type {
        blocks.push(format!(
            "GID type {me} {}, {host} {}",
            opt(&a.gid_type),
            opt(&b.gid_type)
        ));
        fixes.push("give both nodes an IPv4 cluster address".to_string());
    }
    // Subnet: both addresses in one subnet of the same size, or they have no route to each other.
    if let (Some((na, pa)), Some((nb, pb)), Some(ib)) = (a.subnet(), b.subnet(), b.ip) {
        if na != nb || pa != pb {
            blocks.push(format!(
                "subnet {me} {na}/{pa}, {host} {ib}/{pb}: the nodes have no route to each other"
            ));
            fixes.push(
                "put both cluster addresses in one subnet (the guide: 192.168.100.1/30 and .2/30)"
                    .to_string(),
            );
        }
    } else if a.ip.is_some() && b.ip.is_some() && a.ip == b.ip {
        blocks.push(format!("{me} and {host} both use {}", opt(&a.ip)));
        fixes.push("give each node its own cluster address".to_string());
    }
    // One NCCL_IB_GID_INDEX for all nodes (halo cluster init writes the head's) picks the wrong
    // GID on a node whose table differs.
    if a.gid_index.is_some() && b.gid_index.is_some() && a.gid_index != b.gid_index {
        blocks.push(format!(
            "GID index {me} {}, {host} {}: one NCCL_IB_GID_INDEX selects the wrong GID on one of them",
            opt(&a.gid_index),
            opt(&b.gid_index)
        ));
        fixes.push(format!(
            "set gid_index = {} for {host} in cluster.toml (NCCL_IB_GID_INDEX per node)",
            opt(&b.gid_index)
        ));
    }
    // The plugin negotiates the smaller RDMA MTU; a mismatch costs speed, not correctness.
    if a.mtu.is_some() && b.mtu.is_some() && a.mtu != b.mtu {
        slows.push(format!(
            "MTU {me} {} ({}), {host} {} ({}): the link runs at the smaller RDMA MTU {}",
            opt(&a.mtu),
            a.netdev,
            opt(&b.mtu),
            b.netdev,
            opt(&a.rdma_mtu.min(b.rdma_mtu))
        ));
    }
    if !blocks.is_empty() {
        blocks.extend(slows);
        return Check::fail(&id, &title, blocks.join("; "), fixes.join("; "));
    }
    if !slows.is_empty() {
        return Check::warn(
            &id,
            &title,
            slows.join("; "),
            "set MTU 9000 on both cluster interfaces (see net.mtu on each)",
        );
    }
    Check::pass(
        &id,
        &title,
        format!(
            "{} GID {} (IPv4), subnet {}, MTU {} on both",
            opt(&a.roce),
            opt(&a.gid_index),
            a.subnet()
                .map_or("?".to_string(), |(n, p)| format!("{n}/{p}")),
            opt(&a.mtu)
        ),
    )
}

/// perftest's TCP port for the doctor's RDMA ping.
const PING_PORT: u16 = 18515;
const PING_ITERS: &str = "20";
/// How long the server on the peer may live (`timeout` there), and how long the client here
/// keeps trying to reach it while it runs: SSH and the server's start take seconds on a slow or
/// busy node.
const PING_SERVER_SECS: u64 = 40;
const PING_CONNECT_WINDOW: Duration = Duration::from_secs(30);

/// `ib_send_lat` server (run on the peer over SSH) and client (run here) for a short ping
/// between the two cluster GIDs.
pub fn ping_commands(a: &LinkFacts, b: &LinkFacts) -> Option<(Vec<String>, Vec<String>)> {
    let common = |dev: &str, gid: u32| -> Vec<String> {
        [
            "ib_send_lat",
            "-d",
            dev,
            "-x",
            &gid.to_string(),
            "-n",
            PING_ITERS,
            "-p",
            &PING_PORT.to_string(),
            "-F",
        ]
        .into_iter()
        .map(str::to_string)
        .collect()
    };
    let server = common(b.device.as_deref()?, b.gid_index?);
    let mut client = common(a.device.as_deref()?, a.gid_index?);
    client.push(b.ip?.to_string());
    Some((server, client))
}

/// One run of the ping: the client's exit and output, and the server's when it had ended by
/// the time the client gave up (its exit code and stderr).
#[derive(Debug, Clone, Default)]
pub struct PingRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub server: Option<(Option<i32>, String)>,
}

/// The line of perftest's output that says why it failed.
fn perftest_reason(text: &str) -> Option<&str> {
    text.lines().map(str::trim).find(|l| {
        l.contains("Failed to modify QP")
            || l.contains("Incompatibility issue with GID types")
            || l.contains("Couldn't connect")
            || l.contains("Unable to")
            || l.contains("Completion with error")
            || l.contains("timeout")
    })
}

/// The last line that says something (not a row of dashes or stars).
fn last_words(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .rfind(|l| l.chars().any(char::is_alphanumeric))
}

/// The ping's verdict from the client's exit, output and error text (and the server's, when
/// it ended first).
pub fn judge_ping(host: &str, peer: &LinkFacts, outcome: Result<PingRun, String>) -> Check {
    let id = format!("peer.rdma.{host}");
    let title = format!("RDMA ping to {host}");
    let target = format!(
        "{} index {} on {host}",
        peer.device.as_deref().unwrap_or("?"),
        opt(&peer.gid_index)
    );
    let run = match outcome {
        Ok(o) => o,
        Err(e) if e.contains("cannot start") => {
            return Check::skip(
                &id,
                &title,
                format!("ib_send_lat not available here or on {host}: install perftest"),
            );
        }
        Err(e) => {
            return Check::fail(
                &id,
                &title,
                format!("to {target}: {e}"),
                "check both nodes' RDMA checks (port ACTIVE, RoCE v2 GID), the firewall (ib_send_lat's handshake uses TCP 18515) and the cable",
            );
        }
    };
    if run.ok {
        if let Ok(lat) = halo_harness::bench::perftest::parse_latency(&run.stdout, 2) {
            return Check::pass(
                &id,
                &title,
                format!("ib_send_lat to {target}: {:.2} us typical", lat.typical_us),
            );
        }
        return Check::pass(&id, &title, format!("ib_send_lat to {target}: ok"));
    }
    let text = format!("{}\n{}", run.stdout, run.stderr);
    let why = perftest_reason(&text)
        .or_else(|| last_words(&text))
        .unwrap_or("no output")
        .to_string();
    // The client could not reach a server that had already ended: the server's own words say
    // why (not installed, a GID it cannot use), not the firewall.
    if let (true, Some((code, said))) = (why.contains("Couldn't connect"), &run.server) {
        let server_why = perftest_reason(said)
            .or_else(|| last_words(said))
            .unwrap_or("no output");
        if *code == Some(127) || said.contains("not found") || said.contains("No such file") {
            return Check::skip(
                &id,
                &title,
                format!(
                    "ib_send_lat not available on {host}: {server_why}; install perftest there"
                ),
            );
        }
        return Check::fail(
            &id,
            &title,
            format!("to {target}: the server on {host} ended: {server_why}"),
            "check the peer's RDMA checks (device and GID index exist, port ACTIVE)",
        );
    }
    let fix = if why.contains("Couldn't connect") {
        format!("ib_send_lat's TCP handshake to {} failed: check the firewall on {host} and the cluster address", opt(&peer.ip))
    } else if why.contains("Incompatibility issue with GID types") {
        "one GID is IPv4 and the other IPv6: use the RoCE v2 GID of each node's IPv4 cluster address (see rdma.gid on each)".to_string()
    } else if why.contains("RTR") || why.contains("RTS") {
        "the GIDs do not reach each other: check both nodes use RoCE v2 GIDs of the cluster addresses in one subnet".to_string()
    } else {
        "RDMA packets do not arrive: check the cable, both ports ACTIVE (rdma link), and flow control".to_string()
    };
    Check::fail(&id, &title, format!("to {target}: {why}"), fix)
}

/// The node of the cluster config that is `host` (the peer) or has the cluster address `ip`
/// (this node).
fn config_node<'a>(
    cluster: Option<&'a ClusterConfig>,
    host: Option<&str>,
    ip: Option<std::net::Ipv4Addr>,
) -> Option<&'a Node> {
    cluster?.nodes.iter().find(|n| {
        host.is_some_and(|h| n.host == h)
            || ip.is_some_and(|ip| n.ip.parse::<std::net::Ipv4Addr>() == Ok(ip))
    })
}

/// The link as the cluster config gives it for `node` (device, GID index, address: what RCCL
/// is told to use), over the detected facts; the detected ones when the node is not listed.
pub fn as_configured(detected: &LinkFacts, node: Option<&Node>) -> LinkFacts {
    let mut f = detected.clone();
    if let Some(n) = node {
        f.device = Some(n.rdma_device.clone());
        f.gid_index = Some(n.gid_index);
        if let Ok(ip) = n.ip.parse() {
            f.ip = Some(ip);
        }
    }
    f
}

/// When the config's device or GID index for `name` is not the one detected there, the line
/// that fixes the config.
pub fn config_fix(name: &str, detected: &LinkFacts, used: &LinkFacts) -> Option<String> {
    if detected.device == used.device && detected.gid_index == used.gid_index {
        return None;
    }
    let dev = detected.device.as_deref().unwrap_or("?");
    Some(format!(
        "in cluster.toml set rdma_device = \"{dev}\", gid_index = {} for {name} (it gives {} index {}; {dev} index {} is its {} GID of {})",
        opt(&detected.gid_index),
        used.device.as_deref().unwrap_or("?"),
        opt(&used.gid_index),
        opt(&detected.gid_index),
        opt(&detected.roce),
        opt(&detected.ip),
    ))
}

/// Runs the ping: the server on the peer over SSH, then the client here (retried while the
/// server runs but does not listen yet), on the GIDs the cluster config gives the two nodes.
fn ping(
    local: &NodeReport,
    a: &LinkFacts,
    host: &str,
    b: &LinkFacts,
    cluster: Option<&ClusterConfig>,
) -> Check {
    let used_a = as_configured(a, config_node(cluster, None, a.ip));
    let used_b = as_configured(b, config_node(cluster, Some(host), None));
    let Some((server, client)) = ping_commands(&used_a, &used_b) else {
        return Check::skip(
            &format!("peer.rdma.{host}"),
            &format!("RDMA ping to {host}"),
            "device, GID or address of a node unknown",
        );
    };
    let mut argv = vec!["timeout".to_string(), PING_SERVER_SECS.to_string()];
    argv.extend(server);
    let mut remote = peer_command(host, cluster, &argv);
    let outcome = (|| -> Result<PingRun, String> {
        let mut server_child = remote
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start ssh: {e}"))?;
        let mut err = server_child.stderr.take();
        let said = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = &mut err {
                let _ = std::io::Read::read_to_string(e, &mut s);
            }
            s
        });
        let mut server = halo_harness::bench::perftest::Reaped(Some(server_child));
        let t0 = Instant::now();
        let (ok, stdout, stderr) = loop {
            std::thread::sleep(Duration::from_millis(500));
            let mut cmd = Command::new(&client[0]);
            cmd.args(&client[1..]);
            let out =
                run_bounded(&mut cmd, Duration::from_secs(15)).map_err(|e| format!("{e:#}"))?;
            let server_ended = matches!(server.0.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            let retry = !out.success
                && !server_ended
                && (out.stdout.contains("Couldn't connect")
                    || out.stderr.contains("Couldn't connect"))
                && t0.elapsed() < PING_CONNECT_WINDOW;
            if !retry {
                break (out.success, out.stdout, out.stderr);
            }
        };
        // The server's exit, when it had ended; else it is stopped here.
        let code = server.0.as_mut().and_then(|c| c.try_wait().ok().flatten());
        drop(server);
        let said = said.join().unwrap_or_default();
        Ok(PingRun {
            ok,
            stdout,
            stderr,
            server: code.map(|c| (c.code(), said)),
        })
    })();
    let mut check = judge_ping(host, &used_b, outcome);
    if check.verdict == super::Verdict::Fail {
        let hints: Vec<String> = [
            config_fix(&local.node, a, &used_a),
            config_fix(host, b, &used_b),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !hints.is_empty() {
            check.fix = format!("{}; {}", hints.join("; "), check.fix);
        }
    }
    check
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(device: &str, ip: &str, gid: u32) -> LinkFacts {
        LinkFacts {
            netdev: "enp1s0f0np0".into(),
            device: Some(device.into()),
            port: Some(1),
            mtu: Some(9000),
            rdma_mtu: Some(4096),
            ip: Some(ip.parse().unwrap()),
            prefix: Some(30),
            gid_index: Some(gid),
            roce: Some("RoCE v2".into()),
            gid_type: Some("IPv4".into()),
        }
    }

    #[test]
    fn ping_runs_each_side_on_its_own_gid() {
        let a = facts("rocep1s0f0", "192.168.100.1", 1);
        let b = facts("mlx5_0", "192.168.100.2", 3);
        let (server, client) = ping_commands(&a, &b).unwrap();
        assert_eq!(
            server.join(" "),
            "ib_send_lat -d mlx5_0 -x 3 -n 20 -p 18515 -F"
        );
        assert_eq!(
            client.join(" "),
            "ib_send_lat -d rocep1s0f0 -x 1 -n 20 -p 18515 -F 192.168.100.2"
        );
        let mut unknown = b.clone();
        unknown.gid_index = None;
        assert!(ping_commands(&a, &unknown).is_none());
    }

    const OK: &str = "\
---------------------------------------------------------------------------------------
                    Send Latency Test
 Dual-port       : OFF\t\tDevice         : rocep1s0f0
 Number of qps   : 1\t\tTransport type : IB
 Connection type : RC\t\tUsing SRQ      : OFF
 TX depth        : 1
 Mtu             : 4096[B]
 Link type       : Ethernet
 GID index       : 1
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 2       20          4.98           6.41         5.23     \t       5.30        \t0.27   \t\t6.41    \t\t6.41   
---------------------------------------------------------------------------------------
";

    fn run(ok: bool, stdout: &str, stderr: &str) -> PingRun {
        PingRun {
            ok,
            stdout: stdout.into(),
            stderr: stderr.into(),
            server: None,
        }
    }

    /// ib_send_lat 4.x (Debian 12) when the server's GID is IPv6 (a link-local GID, index 0)
    /// and the client's IPv4: its report ends in a row of dashes.
    const GID_TYPES: &str = "
 Found Incompatibility issue with GID types.
 Please Try to use a different IP version.

---------------------------------------------------------------------------------------
                    Send Latency Test
 Dual-port       : OFF\t\tDevice         : rxe0
 GID index       : 1
 Data ex. method : Ethernet
---------------------------------------------------------------------------------------
";

    #[test]
    fn a_gid_of_the_other_ip_version_says_so() {
        let b = facts("rxe0", "198.18.0.1", 0);
        let c = judge_ping("198.18.0.1", &b, Ok(run(false, GID_TYPES, "")));
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(
            c.value,
            "to rxe0 index 0 on 198.18.0.1: Found Incompatibility issue with GID types."
        );
        assert!(
            c.fix.starts_with("one GID is IPv4 and the other IPv6"),
            "{c:?}"
        );
        // Nothing recognised: the last line with words, never a row of dashes.
        let c = judge_ping("h", &b, Ok(run(false, "odd failure\n-----\n", "")));
        assert_eq!(c.value, "to rxe0 index 0 on h: odd failure");
    }

    #[test]
    fn a_server_that_ended_first_is_the_reason() {
        let b = facts("rxe0", "198.18.0.1", 1);
        let tcp = "Couldn't connect to 198.18.0.1:18515\nUnable to open file descriptor for socket connection";
        let mut missing = run(false, "", tcp);
        missing.server = Some((Some(127), "sh: 1: ib_send_lat: not found\n".into()));
        let c = judge_ping("198.18.0.1", &b, Ok(missing));
        assert_eq!(c.verdict, Verdict::Skip);
        assert_eq!(
            c.value,
            "ib_send_lat not available on 198.18.0.1: sh: 1: ib_send_lat: not found; install perftest there"
        );
        let mut bad_dev = run(false, "", tcp);
        bad_dev.server = Some((
            Some(1),
            " Unable to find the Infiniband/RoCE device\n".into(),
        ));
        let c = judge_ping("198.18.0.1", &b, Ok(bad_dev));
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(
            c.value,
            "to rxe0 index 1 on 198.18.0.1: the server on 198.18.0.1 ended: Unable to find the Infiniband/RoCE device"
        );
    }

    #[test]
    fn the_ping_uses_the_gids_the_config_gives() {
        let detected = facts("rxe0", "198.18.0.1", 1);
        let mut cfg = ClusterConfig::new(Vec::new(), None);
        for (host, gid) in [("198.18.0.2", 1), ("198.18.0.1", 0)] {
            cfg.nodes.push(Node {
                host: host.into(),
                ip: host.into(),
                iface: "eth0".into(),
                rdma_device: "rxe0".into(),
                gid_index: gid,
                ssh_user: None,
                ssh_port: None,
                ray: None,
                runtime: None,
            });
        }
        let peer = config_node(Some(&cfg), Some("198.18.0.1"), None);
        assert_eq!(peer.map(|n| n.gid_index), Some(0));
        let me = config_node(Some(&cfg), None, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(me.map(|n| n.host.as_str()), Some("198.18.0.2"));
        let used = as_configured(&detected, peer);
        assert_eq!(used.gid_index, Some(0));
        assert_eq!(
            config_fix("198.18.0.1", &detected, &used).unwrap(),
            "in cluster.toml set rdma_device = \"rxe0\", gid_index = 1 for 198.18.0.1 (it gives rxe0 index 0; rxe0 index 1 is its RoCE v2 GID of 198.18.0.1)"
        );
        assert_eq!(as_configured(&detected, None), detected);
        assert_eq!(config_fix("h", &detected, &detected), None);
    }

    #[test]
    fn ping_outcomes_read_as_verdicts() {
        let b = facts("mlx5_0", "192.168.100.2", 3);
        let c = judge_ping("msmax2", &b, Ok(run(true, OK, "")));
        assert_eq!(c.verdict, Verdict::Pass);
        assert_eq!(
            c.value,
            "ib_send_lat to mlx5_0 index 3 on msmax2: 5.23 us typical"
        );

        let rtr =
            " Failed to modify QP 1234 to RTR\n Unable to Connect the HCA's through the link\n";
        let c = judge_ping("msmax2", &b, Ok(run(false, "", rtr)));
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(
            c.value,
            "to mlx5_0 index 3 on msmax2: Failed to modify QP 1234 to RTR"
        );
        assert!(c.fix.contains("RoCE v2 GIDs"), "{c:?}");

        let tcp = "Couldn't connect to 192.168.100.2:18515\nUnable to open file descriptor for socket connection";
        let c = judge_ping("msmax2", &b, Ok(run(false, "", tcp)));
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.fix
                .starts_with("ib_send_lat's TCP handshake to 192.168.100.2 failed"),
            "{c:?}"
        );

        let c = judge_ping(
            "msmax2",
            &b,
            Err("cannot start `ib_send_lat`: No such file or directory".into()),
        );
        assert_eq!(c.verdict, Verdict::Skip);
        assert_eq!(
            c.value,
            "ib_send_lat not available here or on msmax2: install perftest"
        );
    }

    #[test]
    fn link_mismatches_that_break_rccl_fail() {
        let a = facts("rocep1s0f0", "192.168.100.1", 1);
        let mut b = facts("rocep1s0f0", "192.168.100.2", 1);
        assert_eq!(compare_links("a", &a, "b", &b).verdict, Verdict::Pass);
        b.gid_type = Some("IPv6".into());
        let c = compare_links("a", &a, "b", &b);
        assert_eq!(c.verdict, Verdict::Fail);
        assert_eq!(c.value, "GID type a IPv4, b IPv6");
    }

    #[test]
    fn ssh_failures_get_their_own_fixes() {
        assert!(ssh_fix("h", "h: Permission denied (publickey).").starts_with("ssh-copy-id h"));
        assert!(
            ssh_fix("h", "ssh: connect to host h port 22: No route to host")
                .starts_with("h does not answer")
        );
        assert!(
            ssh_fix("h", "ssh: connect to host h port 22: Connection timed out")
                .starts_with("h does not answer")
        );
        assert!(ssh_fix("h", "Host key verification failed.").starts_with("accept"));
    }
}
