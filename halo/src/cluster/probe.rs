//! What `cluster up` checks on every node before it starts anything: that SSH gets in (with a
//! message per failure kind), that the runtime can be entered, where `ray` is inside it, and how
//! many GPUs the node has.

use std::fmt;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::{ClusterConfig, Node};
use crate::process::run_bounded;

const SSH_CHECK_LIMIT: Duration = Duration::from_secs(60);
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Runs inside the node's runtime as `sh -c SCRIPT sh RAY`. Prints `ray PATH` (or `ray -`), one
/// `kfd SIMD_COUNT GFX_TARGET_VERSION` line per KFD topology node, and, only without a KFD
/// topology, the GPU count `amd-smi` or `rocm-smi` reports. POSIX sh and its builtins only, apart
/// from the SMI fallback.
const PROBE_SCRIPT: &str = r#"
if r=$(command -v "$1" 2>/dev/null); then echo "ray $r"; else echo "ray -"; fi
kfd=0
for p in /sys/class/kfd/kfd/topology/nodes/*/properties; do
  [ -r "$p" ] || continue
  kfd=1; s=0; g=0
  while read -r k v; do
    case "$k" in simd_count) s=$v ;; gfx_target_version) g=$v ;; esac
  done < "$p"
  echo "kfd $s $g"
done
if [ "$kfd" = 0 ]; then
  if command -v amd-smi >/dev/null 2>&1; then
    echo "amd-smi $(amd-smi list 2>/dev/null | grep -c '^GPU')"
  elif command -v rocm-smi >/dev/null 2>&1; then
    echo "rocm-smi $(rocm-smi --showid 2>/dev/null | grep -o '^GPU\[[0-9]*\]' | sort -u | wc -l)"
  fi
fi
echo end
"#;

/// A node's GPUs and how they were counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuCount {
    pub count: u32,
    /// "KFD topology", "amd-smi", "rocm-smi", or "none found" (no KFD topology, no SMI tool).
    pub source: String,
}

impl fmt::Display for GpuCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.count == 1 { "" } else { "s" };
        write!(f, "{} GPU{plural} ({})", self.count, self.source)
    }
}

/// What the probe found on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// `ray` as `command -v` resolves it inside the runtime; `None` when it is missing.
    pub ray: Option<String>,
    pub gpus: GpuCount,
}

/// Parses [`PROBE_SCRIPT`]'s output; `None` when it did not run to its end.
pub fn parse_probe(text: &str) -> Option<NodeFacts> {
    let mut ray = None;
    let mut kfd_nodes = 0u32;
    let mut kfd_gpus = 0u32;
    let mut smi: Option<(String, u32)> = None;
    let mut complete = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ray") => {
                ray = words.next().filter(|w| *w != "-").map(str::to_string);
            }
            Some("kfd") => {
                kfd_nodes += 1;
                let simd: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let gfx: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                // CPU agents report no SIMDs and gfx_target_version 0.
                if simd > 0 || gfx != 0 {
                    kfd_gpus += 1;
                }
            }
            Some(tool @ ("amd-smi" | "rocm-smi")) => {
                let n = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                smi = Some((tool.to_string(), n));
            }
            Some("end") => complete = true,
            _ => {}
        }
    }
    if !complete {
        return None;
    }
    let gpus = if kfd_nodes > 0 {
        GpuCount {
            count: kfd_gpus,
            source: "KFD topology".into(),
        }
    } else if let Some((tool, count)) = smi {
        GpuCount {
            count,
            source: tool,
        }
    } else {
        GpuCount {
            count: 0,
            source: "no KFD topology, no amd-smi/rocm-smi".into(),
        }
    };
    Some(NodeFacts { ray, gpus })
}

/// `[user@]host` and port as ssh will use them (for messages).
fn ssh_target(cfg: &ClusterConfig, node: &Node) -> (String, Option<u16>) {
    let target = match node.ssh_user.as_ref().or(cfg.ssh.user.as_ref()) {
        Some(user) => format!("{user}@{}", node.host),
        None => node.host.clone(),
    };
    (target, node.ssh_port.or(cfg.ssh.port))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Turns ssh's failure output into what went wrong and what fixes it.
pub fn explain_ssh_failure(
    cfg: &ClusterConfig,
    node: &Node,
    code: Option<i32>,
    stderr: &str,
) -> String {
    let (target, port) = ssh_target(cfg, node);
    let host = &node.host;
    let port_shown = port.map_or("22".to_string(), |p| p.to_string());
    let p_flag = port.map_or(String::new(), |p| format!("-p {p} "));
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        format!(
            "the SSH host key of {host} CHANGED since it was recorded in known_hosts (reinstalled node, or someone in between): \
             if the node was reinstalled, `ssh-keygen -R {host}` and connect once with `ssh {p_flag}{target} true`"
        )
    } else if stderr.contains("Host key verification failed") {
        format!(
            "host key verification failed for {host}: its key is not in known_hosts and BatchMode cannot ask. \
             Accept it once with `ssh {p_flag}{target} true`, or set `accept_new_host_keys = true` under [ssh] in \
             cluster.toml (StrictHostKeyChecking=accept-new)"
        )
    } else if stderr.contains("Permission denied")
        || stderr.contains("Too many authentication failures")
    {
        format!(
            "SSH authentication to {target} failed ({}): install your key there with `ssh-copy-id {p_flag}{target}`, \
             or name the key with `key = \"…\"` under [ssh] (and the user with `user = \"…\"`)",
            last_lines(stderr, 1)
        )
    } else if stderr.contains("Connection refused") {
        format!(
            "nothing accepts SSH connections on {host} port {port_shown} (connection refused): is sshd running there, \
             and is the port right ([ssh] port or the node's ssh_port)?"
        )
    } else if stderr.contains("Could not resolve hostname") {
        format!(
            "cannot resolve {host} ({}): use its address, or add it to /etc/hosts",
            last_lines(stderr, 1)
        )
    } else if stderr.contains("timed out") || stderr.contains("No route to host") {
        format!(
            "{host} port {port_shown} does not answer ({}): is the node up and on this network?",
            last_lines(stderr, 1)
        )
    } else {
        format!(
            "ssh to {target} failed (exit {}): {}",
            code.map_or("signal".to_string(), |c| c.to_string()),
            last_lines(stderr, 3)
        )
    }
}

/// `ssh … true` to a worker; `Err` carries the explained failure.
pub fn check_ssh(cfg: &ClusterConfig, node: &Node) -> std::result::Result<(), String> {
    let mut cmd = super::ssh_command(cfg, node, "true");
    match run_bounded(&mut cmd, SSH_CHECK_LIMIT) {
        Ok(out) if out.success => Ok(()),
        Ok(out) => Err(explain_ssh_failure(cfg, node, out.code, &out.stderr)),
        Err(e) => Err(format!("ssh to {}: {e:#}", node.host)),
    }
}

/// Enters the node's runtime and runs the probe script there.
pub fn probe_node(cfg: &ClusterConfig, node: &Node) -> std::result::Result<NodeFacts, String> {
    let ray = cfg.ray_for(node);
    let argv: Vec<String> = ["sh", "-c", PROBE_SCRIPT, "sh", ray.as_str()]
        .map(String::from)
        .to_vec();
    let runtime = cfg.runtime_for(node);
    let out = run_bounded(&mut cfg.command(node, &[], &argv), PROBE_LIMIT)
        .map_err(|e| format!("{e:#}"))?;
    match parse_probe(&out.stdout) {
        Some(facts) if out.success => Ok(facts),
        _ => Err(format!(
            "cannot run a shell inside {runtime} (exit {}): {}; {}",
            out.code.map_or("signal".to_string(), |c| c.to_string()),
            last_lines(&format!("{}\n{}", out.stdout, out.stderr), 3),
            runtime.entry_hint()
        )),
    }
}

/// Probes every node (SSH first for the workers); all problems at once, or every node's facts.
pub fn check_nodes(cfg: &ClusterConfig) -> Result<Vec<NodeFacts>, Vec<String>> {
    let mut facts = Vec::new();
    let mut problems = Vec::new();
    for (i, node) in cfg.nodes.iter().enumerate() {
        let label = format!("node {} ({})", node.host, node.ip);
        if i > 0 {
            if let Err(why) = check_ssh(cfg, node) {
                problems.push(format!("{label}: {why}"));
                continue;
            }
        }
        match probe_node(cfg, node) {
            Ok(f) if f.ray.is_none() => problems.push(format!(
                "{label}: `{}` not found inside {}; install Ray there, or set [ray] executable / the node's `ray` key \
                 (HALO_RAY overrides both)",
                cfg.ray_for(node),
                cfg.runtime_for(node)
            )),
            Ok(f) => facts.push(f),
            Err(why) => problems.push(format!("{label}: {why}")),
        }
    }
    if problems.is_empty() {
        Ok(facts)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs the real script over a copied KFD tree by rewriting its sysfs path.
    fn run_script_on(root: &std::path::Path) -> NodeFacts {
        let script = PROBE_SCRIPT.replace(
            "/sys/class/kfd",
            &format!("{}/sys/class/kfd", root.display()),
        );
        let out = Command::new("sh")
            .args(["-c", &script, "sh", "sh"])
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        parse_probe(&String::from_utf8_lossy(&out.stdout)).expect("complete probe output")
    }

    fn kfd_node(root: &std::path::Path, n: u32, simd: u32, gfx: u32) {
        let dir = root.join(format!("sys/class/kfd/kfd/topology/nodes/{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("properties"),
            format!("cpu_cores_count 16\nsimd_count {simd}\nmem_banks_count 1\ngfx_target_version {gfx}\nvendor_id 4098\n"),
        )
        .unwrap();
    }

    #[test]
    fn strix_halo_topology_counts_one_gpu() {
        let dir = tempfile::tempdir().unwrap();
        kfd_node(dir.path(), 0, 0, 0); // the CPU agent
        kfd_node(dir.path(), 1, 80, 110501);
        let f = run_script_on(dir.path());
        assert_eq!(
            f.gpus,
            GpuCount {
                count: 1,
                source: "KFD topology".into()
            }
        );
        assert!(
            f.ray.as_deref().is_some_and(|r| r.ends_with("/sh")),
            "{f:?}"
        );
    }

    #[test]
    fn cpu_only_topology_and_no_topology_count_zero() {
        let dir = tempfile::tempdir().unwrap();
        kfd_node(dir.path(), 0, 0, 0);
        assert_eq!(run_script_on(dir.path()).gpus.count, 0);
        let empty = tempfile::tempdir().unwrap();
        let f = run_script_on(empty.path());
        assert_eq!(f.gpus.count, 0);
        assert!(
            f.gpus.source.starts_with("no KFD topology"),
            "{}",
            f.gpus.source
        );
    }

    #[test]
    fn parse_smi_fallback_and_missing_ray() {
        let f = parse_probe("ray -\namd-smi 2\nend\n").unwrap();
        assert_eq!(f.ray, None);
        assert_eq!(
            f.gpus,
            GpuCount {
                count: 2,
                source: "amd-smi".into()
            }
        );
        assert!(parse_probe("ray /usr/bin/ray\n").is_none(), "cut short");
        // KFD wins over the SMI tools.
        assert_eq!(
            parse_probe("ray /x\nkfd 0 0\nkfd 40 110501\nkfd 40 110501\nend\n")
                .unwrap()
                .gpus
                .count,
            2
        );
    }
}
