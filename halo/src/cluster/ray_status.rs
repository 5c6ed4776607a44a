//! Parsing `ray status` (the autoscaler summary) into node and resource counts.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RayStatus {
    pub active_nodes: usize,
    pub pending_nodes: usize,
    pub gpus_used: f64,
    pub gpus_total: f64,
    pub cpus_used: f64,
    pub cpus_total: f64,
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
/// ```
pub fn parse(text: &str) -> RayStatus {
    let mut status = RayStatus::default();
    let mut section = "";
    for line in text.lines() {
        let trimmed = line.trim();
        if !line.starts_with(' ') && trimmed.ends_with(':') {
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
            "usage" => {
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

    #[test]
    fn parses_ray_2_60_output() {
        let s = parse(RAY_2_60);
        assert_eq!(s.active_nodes, 2);
        assert_eq!(s.pending_nodes, 0);
        assert_eq!((s.gpus_used, s.gpus_total), (1.0, 2.0));
        assert_eq!((s.cpus_used, s.cpus_total), (0.0, 2.0));
    }
}
