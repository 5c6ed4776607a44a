//! `halo doctor`: checks one node (and optionally its peers) against what a Strix Halo RoCE v2
//! cluster needs, and says for every problem the exact command or line that fixes it.

mod env;
mod gpu;
mod host;
mod kernel;
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
pub use report::render_table;

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
/// JSON schema (stable): `{"node": str, "checks": [{"id","title","verdict","value","fix"}], "peers": [report]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub checks: Vec<Check>,
    #[serde(default)]
    pub peers: Vec<NodeReport>,
}

impl NodeReport {
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
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
    pub cluster: Option<rdma::ClusterPort>,
}

pub fn run(opts: &DoctorOptions, probe: &dyn PluginProbe) -> NodeReport {
    let root = &opts.root;
    let mut checks = Vec::new();

    let cmdline = kernel::Cmdline::read(root);
    let mem_total_bytes = host::mem_total_bytes(root);
    checks.extend(kernel::checks(root, &cmdline, mem_total_bytes));

    let ports = rdma::discover(root);
    let cluster = rdma::select_cluster_port(&ports, opts.iface.as_deref(), opts.cluster_ip);
    let facts = Facts {
        kernel_gtt_bytes: cmdline.gtt_ceiling_bytes(),
        mem_total_bytes,
        in_container: host::container_marker(root),
        cluster,
    };

    checks.extend(gpu::checks(root, &facts));
    checks.extend(rdma::checks(root, &ports, &facts, opts));
    checks.extend(host::checks(root, &facts));
    checks.extend(env::checks(&opts.env, &facts));
    checks.extend(software::rccl_checks(root));
    checks.push(plugin::check(opts, probe));

    let mut report = NodeReport {
        node: host::node_name(root),
        checks,
        peers: Vec::new(),
    };
    for peer in &opts.peers {
        let (ssh_check, remote) = peer::check_peer(peer, opts.cluster.as_ref());
        report.checks.push(ssh_check);
        report.peers.push(remote);
    }
    report
}

/// Formats a byte count in GiB with one decimal (MiB below 1 GiB).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = bytes as f64 / MIB;
    if mib < 1024.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.1} GiB", mib / 1024.0)
    }
}
