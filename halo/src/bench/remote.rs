//! `halo bench` from the head alone: the peer node's `halo bench --listen` is started here, over
//! the cluster's SSH settings and with the node's RCCL environment from `cluster.toml`, and ends
//! when this side is done (its stdin is this side's pipe; see `--exit-on-stdin-eof`).
//!
//! [`peer_command`] is the one place that turns "run this on that node" into a command line.

use crate::cluster::{ClusterConfig, Node, NodeCommand};
use crate::process::describe;
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of the peer's output kept for an error message.
const KEEP: usize = 8;

/// `argv` run on `node`, inside its runtime, with the node's cluster environment (over SSH:
/// `ssh … 'env K=V … argv…'`); see [`ClusterConfig::env_command`].
pub fn peer_command(cfg: &ClusterConfig, node: &Node, argv: &[String]) -> NodeCommand {
    cfg.env_command(node, &[], argv)
}

/// The listener's command line on the peer node.
pub fn listen_argv(cfg: &ClusterConfig, node: &Node, plugin: Option<&str>) -> Vec<String> {
    let mut argv = vec![
        cfg.bench.halo.clone(),
        "bench".into(),
        "--listen".into(),
        format!("{}:{}", node.ip, cfg.bench.port),
        "--exit-on-stdin-eof".into(),
    ];
    if let Some(p) = plugin {
        argv.extend(["--plugin".into(), p.to_string()]);
    }
    argv
}

/// The peer's `halo bench --listen`, running under SSH.
pub struct RemoteListener {
    pub host: String,
    pub addr: SocketAddr,
    child: Child,
    /// Held open: the listener ends when it closes.
    stdin: Option<ChildStdin>,
    said: Arc<Mutex<VecDeque<String>>>,
}

impl RemoteListener {
    /// Starts the listener on `node`; its output is streamed to stderr as `[peer HOST] …`.
    pub fn start(cfg: &ClusterConfig, node: &Node, plugin: Option<&str>) -> Result<Self> {
        let ip: IpAddr = node
            .ip
            .parse()
            .with_context(|| format!("node {}: ip {:?} is not an address", node.host, node.ip))?;
        let NodeCommand { mut cmd, input } =
            peer_command(cfg, node, &listen_argv(cfg, node, plugin));
        eprintln!(
            "halo bench: starting the peer on {}: {}",
            node.host,
            describe(&cmd)
        );
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        if let (Some(text), Some(stdin)) = (&input, child.stdin.as_mut()) {
            // The secrets' lines come first; the pipe then stays open until this side is done.
            use std::io::Write;
            if let Err(e) = stdin.write_all(text.as_bytes()) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "cannot start the peer on {}: writing its stdin: {e}",
                    node.host
                );
            }
        }
        let said = Arc::new(Mutex::new(VecDeque::new()));
        for out in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let said = Arc::clone(&said);
            let host = node.host.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[peer {host}] {line}");
                    let mut s = said.lock().unwrap_or_else(|p| p.into_inner());
                    if s.len() == KEEP {
                        s.pop_front();
                    }
                    s.push_back(line);
                }
            });
        }
        Ok(RemoteListener {
            host: node.host.clone(),
            addr: SocketAddr::new(ip, cfg.bench.port),
            stdin: child.stdin.take(),
            child,
            said,
        })
    }

    fn last_words(&self) -> String {
        // The reader threads may still be catching up with a process that just ended.
        std::thread::sleep(Duration::from_millis(200));
        let s = self.said.lock().unwrap_or_else(|p| p.into_inner());
        s.iter().cloned().collect::<Vec<_>>().join("\n    ")
    }

    /// An error when the listener (or ssh) has already ended: it will never answer.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "the peer's `halo bench --listen` on {} ended before answering ({st}):\n    {}",
                self.host,
                self.last_words()
            );
        }
        Ok(())
    }

    /// Closes the listener's stdin and waits a little for it (and ssh) to end.
    pub fn finish(mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RemoteListener {
    fn drop(&mut self) {
        self.stdin.take();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::config::ClusterConfig;

    fn node(host: &str, ip: &str) -> Node {
        Node {
            host: host.into(),
            ip: ip.into(),
            iface: "eth0".into(),
            rdma_device: "rxe0".into(),
            gid_index: 1,
            ssh_user: None,
            ssh_port: Some(2222),
            ray: None,
            runtime: None,
        }
    }

    #[test]
    fn the_peer_listener_runs_over_ssh_with_the_node_environment() {
        let mut cfg = ClusterConfig::new(
            vec![node("head", "198.18.0.2"), node("peer", "198.18.0.1")],
            Some("/opt/halo/lib/librccl-net-halo.so".into()),
        );
        cfg.bench.halo = "/opt/halo/bin/halo".into();
        let peer = cfg.nodes[1].clone();
        let argv = listen_argv(&cfg, &peer, Some(&cfg.rccl.plugin));
        let shown = describe(&peer_command(&cfg, &peer, &argv).cmd);
        assert!(
            shown.starts_with("ssh -o BatchMode=yes -o ConnectTimeout=5 -p 2222 peer "),
            "{shown}"
        );
        assert!(shown.contains("NCCL_IB_HCA=rxe0"), "{shown}");
        assert!(shown.contains("NCCL_IB_GID_INDEX=1"), "{shown}");
        assert!(
            shown.ends_with(
                "/opt/halo/bin/halo bench --listen 198.18.0.1:18700 --exit-on-stdin-eof --plugin /opt/halo/lib/librccl-net-halo.so'"
            ),
            "{shown}"
        );
    }
}
