//! Parsing `ray status` (the autoscaler summary) into node and resource counts.
//!
//! `ray status` names nodes only by their Ray ID. So that `status` can say which configured node
//! is missing, `cluster up` gives every node one unit of a custom resource named after its
//! cluster IP ([`MARKER_PREFIX`]`192.168.100.2`); `ray status -v` lists it in the node's block.

use serde::Serialize;

/// Custom resource `cluster up` puts on each node: this prefix and the node's cluster IP.
/// (Ray hides resources whose name contains "node:", so not that.)
pub const MARKER_PREFIX: &str = "halo_node_";

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RayStatus {
    pub active_nodes: usize,
    pub pending_nodes: usize,
    pub gpus_used: f64,
    pub gpus_total: f64,
    pub cpus_used: f64,
    pub cpus_total: f64,
    /// Per-node blocks of `ray status -v`.
    #[serde(skip)]
    pub nodes: Vec<RayNode>,
}

/// One `Node: …` block of `ray status -v`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RayNode {
    /// The cluster IP from the node's marker resource, when `cluster up` started it.
    pub ip: Option<String>,
    pub gpus_total: f64,
    pub cpus_total: f64,
}

impl RayStatus {
    /// The node block whose marker names `ip`.
    pub fn node_with_ip(&self, ip: &str) -> Option<&RayNode> {
        self.nodes.iter().find(|n| n.ip.as_deref() == Some(ip))
    }
}

/// Understands the layout Ray 2.x prints:
/// ```text
/// Active:
///  1 node_eaa08…
/// Pending:
///  (no pending nodes)
/// …
/// Total Usage:            (older releases: "Usage:")
///  0.0/2.0 CPU
///  0.0/2.0 GPU
/// …
/// Node: eaa08… (node_eaa08…)     (with -v, one block per node)
///  Usage:
///   0.0/1.0 CPU
///   0.0/1.0 halo_node_192.168.100.1
/// ```
pub fn parse(text: &str) -> RayStatus {
    let mut status = RayStatus::default();
    let mut section = "";
    for line in text.lines() {
        let trimmed = line.trim();
        if !line.starts_with(' ') && trimmed.starts_with("Node: ") {
            status.nodes.push(RayNode::default());
            section = "node";
            continue;
        }
        if !line.starts_with(' ') && !trimmed.is_empty() {
            section = match trimmed {
                "Active:" => "active",
                "Pending:" => "pending",
                "Usage:" | "Total Usage:" => "usage",
                _ => "",
            };
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('(') {
            continue;
        }
        match section {
            "active" | "pending" => {
                let count = trimmed
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                if section == "active" {
                    status.active_nodes += count;
                } else {
                    status.pending_nodes += count;
                }
            }
            "usage" | "node" => {
                let mut words = trimmed.split_whitespace();
                let (Some(amounts), Some(kind)) = (words.next(), words.next()) else {
                    continue;
                };
                let Some((used, total)) = amounts.split_once('/') else {
                    continue;
                };
                let (Ok(used), Ok(total)) = (used.parse::<f64>(), total.parse::<f64>()) else {
                    continue;
                };
                if section == "node" {
                    let Some(node) = status.nodes.last_mut() else {
                        continue;
                    };
                    match kind {
                        "GPU" => node.gpus_total = total,
                        "CPU" => node.cpus_total = total,
                        _ => {
                            if let Some(ip) = kind.strip_prefix(MARKER_PREFIX) {
                                node.ip = Some(ip.to_string());
                            }
                        }
                    }
                    continue;
                }
                match kind {
                    "GPU" => (status.gpus_used, status.gpus_total) = (used, total),
                    "CPU" => (status.cpus_used, status.cpus_total) = (used, total),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAY_2_60: &str = "\
======== Autoscaler status: 2026-11-21 21:27:24.477229 ========
Node status
---------------------------------------------------------------
Active:
 1 node_eaa0842bc3a59b5676fb9e1fac4712e021cac29d5d14bb6cdc6bb6df
 1 node_b333c4cce898c0a2eb9493c40380b2d59071e413067a7ed9f3791b2f
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Total Usage:
 0.0/2.0 CPU
 1.0/2.0 GPU
 0B/32.58GiB memory
 0B/13.96GiB object_store_memory

From request_resources:
 (none)
Pending Demands:
 (no resource demands)
";

    /// `ray status -v` of Ray 2.60 with two nodes started by `cluster up` (one with a GPU).
    const RAY_2_60_VERBOSE: &str = "\
======== Autoscaler status: 2026-11-27 15:37:42.705 ========
GCS request time: 0.001451s
Node Provider non_terminated_nodes time: 0.000008s

Node status
---------------------------------------------------------------
Active:
 1 node_20cb139af9b20d002afa32b2ed86b187245933587d0a05e5fc6a39fc
 1 node_7a4c0000000000000000000000000000000000000000000000000000
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Total Usage:
 0.0/2.0 CPU
 0.0/1.0 GPU
 0.0/1.0 halo_node_127.0.0.2
 0.0/1.0 halo_node_127.0.0.3
 0B/13.34GiB memory
 0B/5.72GiB object_store_memory

From request_resources:
 (none)
Pending Demands:
 (no resource demands)

Node: 20cb139af9b20d002afa32b2ed86b187245933587d0a05e5fc6a39fc (node_20cb139af9b20d002afa32b2ed86b187245933587d0a05e5fc6a39fc)
 Usage:
  0.0/1.0 CPU
  0.0/1.0 halo_node_127.0.0.2
  0B/13.34GiB memory
  0B/5.72GiB object_store_memory

Node: 7a4c0000000000000000000000000000000000000000000000000000 (node_7a4c0000000000000000000000000000000000000000000000000000)
 Usage:
  0.0/1.0 CPU
  0.0/1.0 GPU
  0.0/1.0 halo_node_127.0.0.3
  0B/13.34GiB memory
  0B/5.72GiB object_store_memory
";

    #[test]
    fn verbose_output_names_each_node_by_its_marker() {
        let s = parse(RAY_2_60_VERBOSE);
        assert_eq!(s.active_nodes, 2);
        assert_eq!((s.gpus_total, s.cpus_total), (1.0, 2.0));
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.node_with_ip("127.0.0.2").unwrap().gpus_total, 0.0);
        assert_eq!(s.node_with_ip("127.0.0.3").unwrap().gpus_total, 1.0);
        assert!(s.node_with_ip("127.0.0.4").is_none());
    }

    #[test]
    fn parses_ray_2_60_output() {
        let s = parse(RAY_2_60);
        assert_eq!(s.active_nodes, 2);
        assert_eq!(s.pending_nodes, 0);
        assert_eq!((s.gpus_used, s.gpus_total), (1.0, 2.0));
        assert_eq!((s.cpus_used, s.cpus_total), (0.0, 2.0));
    }
}
