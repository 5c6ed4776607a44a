//! `--peer HOST`: passwordless SSH to the peer, then the peer's own doctor report. A peer that is
//! a node of the cluster config is reached with the config's SSH settings, and its doctor runs
//! inside the node's runtime (`ClusterConfig::command`), where RCCL and the plugin are.

use std::process::Command;
use std::time::Duration;

use super::{Check, NodeReport};
use crate::cluster::{probe, ClusterConfig};
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
    let argv = ["halo", "doctor", "--json"].map(String::from);
    let remote = match run_bounded(&mut cfg.command(node, &[], &argv), Duration::from_secs(90)) {
        Ok(out) => serde_json::from_str::<NodeReport>(&out.stdout).unwrap_or_else(|_| NodeReport {
            node: host.to_string(),
            checks: vec![Check::fail(
                "doctor.remote",
                "Doctor on the peer",
                format!(
                    "`halo doctor --json` in {runtime} on {host} gave no report: {}",
                    last_line(&out.stderr)
                ),
                format!(
                    "install halo in {runtime} on {host}, on its PATH (e.g. /usr/local/bin); {}",
                    runtime.entry_hint()
                ),
            )],
            peers: Vec::new(),
        }),
        Err(e) => failed_report(e.to_string()),
    };
    (ssh_check, remote)
}

fn check_plain_peer(host: &str) -> (Check, NodeReport) {
    let id = format!("peer.ssh.{host}");
    let title = format!("Passwordless SSH to {host}");
    let failed_report = |why: String| NodeReport {
        node: host.to_string(),
        checks: vec![Check::skip("doctor.remote", "Doctor on the peer", why)],
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
            format!("ssh-copy-id {host} (then accept the host key once: ssh {host} true)"),
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
                peers: Vec::new(),
            },
        },
        Err(e) => failed_report(e.to_string()),
    };
    (ssh_check, remote)
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}
