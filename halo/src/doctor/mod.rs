//! `halo doctor`: checks one node (and optionally its peers) against what a Strix Halo RoCE v2
//! cluster needs, and says for every problem the exact command or line that fixes it.

mod env;
mod firewall;
mod gpu;
mod host;
mod kernel;
pub mod link;
pub mod os;
mod peer;
pub mod plugin;
mod plugin_load;
pub mod rdma;
mod report;
mod software;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sysroot::SysRoot;
pub use plugin::{ElfFileProbe, LoadingProbe, PluginProbe};
pub use report::{render_table, terminal_width, DEFAULT_WIDTH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
    Skip,
}

/// One finding: what was checked, what was seen, and how to fix it (empty when nothing to fix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub id: String,
    pub title: String,
    pub verdict: Verdict,
    pub value: String,
    pub fix: String,
}

impl Check {
    pub fn new(id: &str, title: &str, verdict: Verdict, value: impl Into<String>) -> Self {
        Check {
            id: id.to_string(),
            title: title.to_string(),
            verdict,
            value: value.into(),
            fix: String::new(),
        }
    }

    pub fn pass(id: &str, title: &str, value: impl Into<String>) -> Self {
        Check::new(id, title, Verdict::Pass, value)
    }

    pub fn warn(id: &str, title: &str, value: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(id, title, Verdict::Warn, value).with_fix(fix)
    }

    pub fn fail(id: &str, title: &str, value: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(id, title, Verdict::Fail, value).with_fix(fix)
    }

    pub fn skip(id: &str, title: &str, value: impl Into<String>) -> Self {
        Check::new(id, title, Verdict::Skip, value)
    }

    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }
}

/// The report of one node; `peers` holds the reports gathered over SSH (`--peer`).
/// JSON schema (stable): `{"node": str, "checks": [{"id","title","verdict","value","fix"}],
/// "link": {…} (when the cluster interface is known), "peers": [report]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub checks: Vec<Check>,
    /// The cluster link as this node sees it, for comparing nodes (`--peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<link::LinkFacts>,
    #[serde(default)]
    pub peers: Vec<NodeReport>,
}

impl NodeReport {
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    fn count(&self, v: Verdict) -> usize {
        self.checks.iter().filter(|c| c.verdict == v).count()
            + self.peers.iter().map(|p| p.count(v)).sum::<usize>()
    }

    /// One line that says what the checks below add up to (this node and its peers).
    pub fn headline(&self) -> String {
        let missing = |id: &str| self.check(id).is_some_and(|c| c.verdict == Verdict::Fail);
        let (no_gpu, no_rdma) = (missing("gpu.arch"), missing("rdma.devices"));
        if self.peers.is_empty() && no_gpu && no_rdma {
            return "not a cluster node: no AMD GPU, no RDMA device".to_string();
        }
        let (fail, warn) = (self.count(Verdict::Fail), self.count(Verdict::Warn));
        let plural = |n: usize, one: &str, many: &str| {
            if n == 1 {
                format!("1 problem {one}")
            } else {
                format!("{n} problems {many}")
            }
        };
        match (fail, warn) {
            (0, 0) => "ready: nothing blocks the cluster or slows it down".to_string(),
            (0, w) => format!(
                "nothing blocks the cluster; {}",
                plural(w, "slows it down", "slow it down")
            ),
            (f, 0) => plural(f, "blocks the cluster", "block the cluster"),
            (f, w) => format!(
                "{}, {} {}",
                plural(f, "blocks the cluster", "block the cluster"),
                w,
                if w == 1 {
                    "slows it down"
                } else {
                    "slow it down"
                }
            ),
        }
    }

    /// True when this node or any peer has a failing check.
    pub fn any_fail(&self) -> bool {
        self.checks.iter().any(|c| c.verdict == Verdict::Fail)
            || self.peers.iter().any(|p| p.any_fail())
    }
}

/// Everything the checks look at besides the files under the root.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub root: SysRoot,
    /// Interface carrying the cluster IP (`--iface`); detected from the GID table when absent.
    pub iface: Option<String>,
    /// The node's cluster IPv4 address (`--cluster-ip`); detected from the GID table when absent.
    pub cluster_ip: Option<Ipv4Addr>,
    /// Environment the NCCL/RCCL checks judge (the process env, or `--env-file`).
    pub env: BTreeMap<String, String>,
    /// Explicit plugin library path (`--plugin`); searched for when absent.
    pub plugin: Option<PathBuf>,
    /// Hosts to check over SSH (`--peer`).
    pub peers: Vec<String>,
    /// The cluster config, when there is one: a peer that is one of its nodes is reached with its
    /// SSH settings and its doctor runs inside the node's runtime.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Facts several checks share, probed once.
pub(crate) struct Facts {
    pub kernel_gtt_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub in_container: Option<&'static str>,
    /// The RoCE v2 GID with an IPv4 address the cluster uses.
    pub cluster: Option<rdma::ClusterPort>,
    /// The cluster interface, known even when `cluster` is not (a RoCE v1 NIC, no address).
    pub link: Option<rdma::Link>,
    /// RDMA devices of the node (names under /sys/class/infiniband).
    pub rdma_devices: Vec<(String, u32)>,
    /// The GPU's `gfx_target_version`, when KFD shows one.
    pub gfx_target: Option<u32>,
    pub os: os::Os,
    /// How the cluster interface is configured persistently.
    pub net_config: os::NetConfig,
    /// ROCm release of the RCCL found (major, minor).
    pub rccl_rocm: Option<(u32, u32)>,
}

impl Facts {
    pub fn net(&self) -> &os::NetConfig {
        &self.net_config
    }
}

pub fn run(opts: &DoctorOptions, probe: &dyn PluginProbe) -> NodeReport {
    let root = &opts.root;

    let cmdline = kernel::Cmdline::read(root);
    let mem_total_bytes = host::mem_total_bytes(root);

    let os = os::Os::read(root);
    let mut checks = kernel::checks(root, &cmdline, mem_total_bytes, &os);

    let ports = rdma::discover(root);
    let cluster = rdma::select_cluster_port(&ports, opts.iface.as_deref(), opts.cluster_ip);
    let link = rdma::find_link(
        &ports,
        cluster.as_ref(),
        opts.iface.as_deref(),
        opts.cluster_ip,
    );
    let net_config = match &link {
        Some(l) => os::NetConfig::read(root, &l.netdev),
        None => os::NetConfig::Unknown,
    };
    let facts = Facts {
        kernel_gtt_bytes: cmdline.gtt_ceiling_bytes(),
        mem_total_bytes,
        in_container: host::container_marker(root),
        cluster,
        link,
        rdma_devices: ports.iter().map(|p| (p.device.clone(), p.port)).collect(),
        gfx_target: gpu::gfx_target(root),
        os,
        net_config,
        rccl_rocm: software::rccl_rocm_version(root, &opts.env),
    };

    checks.extend(gpu::checks(root, &facts));
    checks.extend(rdma::checks(root, &ports, &facts, opts));
    checks.extend(host::checks(root, &facts));
    checks.extend(env::checks(&opts.env, &facts));
    checks.extend(software::checks(root, &facts, &opts.env));
    checks.push(plugin::check(opts, probe));

    let mut report = NodeReport {
        node: host::node_name(root),
        checks,
        link: link::LinkFacts::of(root, &ports, &facts),
        peers: Vec::new(),
    };
    for peer in &opts.peers {
        let (ssh_check, remote) = peer::check_peer(peer, opts.cluster.as_ref());
        let reached = ssh_check.verdict == Verdict::Pass;
        report.checks.push(ssh_check);
        if reached {
            let compared = peer::compare(
                &report,
                &remote,
                peer,
                root.is_live(),
                opts.cluster.as_ref(),
            );
            report.checks.extend(compared);
        }
        report.peers.push(remote);
    }
    report
}

/// Formats a byte count in GiB with one decimal (whole MiB below 1 GiB, whole KiB below
/// 1 MiB, bytes below 1 KiB).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.0} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.0} MiB", b / KIB / KIB)
    } else {
        format!("{:.1} GiB", b / KIB / KIB / KIB)
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn small_sizes_keep_their_unit() {
        assert_eq!(human_bytes(65536), "64 KiB");
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
