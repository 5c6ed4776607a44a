//! `cluster.toml`: the nodes of the cluster and everything needed to start Ray and vLLM on them.
//! The first node is the head and runs locally; the others are reached over SSH.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::runtime::Runtime;
use crate::doctor::plugin::DEFAULT_PLUGIN_PATH;
use crate::process::shell_quote;

/// Overrides `[ray] executable` (e.g. a venv's `ray`).
pub const RAY_ENV: &str = "HALO_RAY";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub ray: RaySection,
    pub rccl: RcclSection,
    /// Where every node's commands run unless the node sets its own `[nodes.runtime]`.
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub ssh: SshSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub bench: BenchSection,
    /// Extra variables for every node, applied last (so they override the computed ones).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaySection {
    /// GCS port on the head.
    pub port: u16,
    /// `ray` executable on every node unless a node sets its own; `HALO_RAY` overrides.
    pub executable: String,
    pub num_cpus: u32,
    /// GPUs each node offers to Ray; absent: detected per node (KFD topology, else amd-smi or
    /// rocm-smi, inside the node's runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpus: Option<u32>,
    /// How long `up` waits for all nodes to show up in `ray status`.
    pub wait_secs: u64,
    /// Keep Ray's memory monitor (its OOM killer). Off by default: on unified-memory nodes the
    /// GPU's share of RAM counts as used, and the monitor kills vLLM's workers while loading.
    #[serde(default)]
    pub memory_monitor: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RcclSection {
    /// Path of librccl-net-halo.so on the nodes: NCCL_NET_PLUGIN=halo with its directory on
    /// LD_LIBRARY_PATH (a library under another file name is passed by path, which only RCCL
    /// of ROCm 6.3 and later accepts).
    pub plugin: String,
    /// NCCL_NET_GDR_LEVEL
    pub gdr_level: String,
    /// NCCL_IB_TIMEOUT
    pub ib_timeout: u32,
    /// NCCL_IB_RETRY_CNT
    pub ib_retry_cnt: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub key: Option<PathBuf>,
    /// Extra `-o` options, e.g. "UserKnownHostsFile=/path".
    #[serde(default)]
    pub options: Vec<String>,
    /// Record the host keys of nodes not seen before instead of failing
    /// (`-o StrictHostKeyChecking=accept-new`; a changed key still fails).
    #[serde(default)]
    pub accept_new_host_keys: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub name: Option<String>,
    /// Tensor-parallel size; defaults to the number of nodes.
    pub tp: Option<u32>,
    pub port: u16,
    pub max_model_len: Option<u32>,
    pub gpu_memory_utilization: f64,
    /// vLLM's --enforce-eager (no CUDA/HIP graphs); `--eager`/`--no-eager` override it.
    #[serde(default = "default_eager")]
    pub eager: bool,
}

fn default_eager() -> bool {
    true
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            name: None,
            tp: None,
            port: 8000,
            max_model_len: None,
            gpu_memory_utilization: 0.90,
            eager: default_eager(),
        }
    }
}

/// Variables whose values are secrets: never on a command line, in a message or in a file halo
/// writes. `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN` and any name with TOKEN, SECRET, PASSWORD or
/// API_KEY in it.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY"]
        .iter()
        .any(|word| upper.contains(word))
}

/// Hugging Face token variables taken from halo's own environment and forwarded to every node.
pub const FORWARDED_SECRETS: [&str; 2] = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"];

/// `halo bench` run from the head: the peer's `halo bench --listen` is started over SSH.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchSection {
    /// `halo` executable on the other nodes, inside their runtime: the peer's
    /// `halo bench --listen` and, for `halo doctor --peer`, the peer's `halo doctor --json`.
    pub halo: String,
    /// Control port of the peer's `halo bench --listen` (the plugin member uses the next one).
    pub port: u16,
}

impl Default for BenchSection {
    fn default() -> Self {
        BenchSection {
            halo: "halo".to_string(),
            port: 18700,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// SSH target (host name or address); for the head only a label.
    pub host: String,
    /// Cluster IPv4 address (on the RDMA interface).
    pub ip: String,
    /// Interface holding `ip` (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).
    pub iface: String,
    /// RDMA device (NCCL_IB_HCA).
    pub rdma_device: String,
    /// RoCE v2 GID index of `ip` (NCCL_IB_GID_INDEX).
    pub gid_index: u32,
    pub ssh_user: Option<String>,
    pub ssh_port: Option<u16>,
    /// `ray` on this node, when it differs from `[ray] executable`.
    pub ray: Option<String>,
    /// Where this node's commands run, when it differs from `[runtime]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

impl ClusterConfig {
    pub fn new(nodes: Vec<Node>, plugin: Option<String>) -> Self {
        ClusterConfig {
            ray: RaySection {
                port: 6379,
                executable: "ray".to_string(),
                num_cpus: 8,
                num_gpus: None,
                wait_secs: 120,
                memory_monitor: false,
            },
            rccl: RcclSection {
                plugin: plugin.unwrap_or_else(|| DEFAULT_PLUGIN_PATH.to_string()),
                gdr_level: "SYS".to_string(),
                ib_timeout: 23,
                ib_retry_cnt: 7,
            },
            runtime: Runtime::Host,
            ssh: SshSection::default(),
            model: ModelSection::default(),
            bench: BenchSection::default(),
            env: BTreeMap::new(),
            nodes,
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {} (create it with `halo cluster init`)",
                path.display()
            )
        })?;
        let cfg: ClusterConfig =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        if cfg.nodes.is_empty() {
            bail!("{}: no [[nodes]]", path.display());
        }
        for rt in
            std::iter::once(&cfg.runtime).chain(cfg.nodes.iter().filter_map(|n| n.runtime.as_ref()))
        {
            if let Err(e) = rt.validate() {
                bail!("{}: [runtime]: {e}", path.display());
            }
        }
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(format!("{HEADER}{}", toml::to_string_pretty(self)?))
    }

    pub fn head(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn workers(&self) -> &[Node] {
        &self.nodes[1..]
    }

    pub fn head_address(&self) -> String {
        format!("{}:{}", self.head().ip, self.ray.port)
    }

    /// True for the first node, which `halo` runs on (its commands run here, not over SSH).
    pub fn is_head(&self, node: &Node) -> bool {
        node == self.head()
    }

    /// The node's `[nodes.runtime]`, else `[runtime]`.
    pub fn runtime_for<'a>(&'a self, node: &'a Node) -> &'a Runtime {
        node.runtime.as_ref().unwrap_or(&self.runtime)
    }

    /// THE way to run something on a node: `argv` with `env`, inside the node's runtime
    /// ([`Runtime::wrap`]), here for the head and over SSH ([`super::ssh_command`]) for the others.
    /// The caller adds nothing but stdio and a deadline (`crate::process::run_bounded`).
    pub fn command(&self, node: &Node, env: &[(String, String)], argv: &[String]) -> Command {
        let wrapped = self.runtime_for(node).wrap(env, argv);
        if self.is_head(node) {
            let mut cmd = Command::new(&wrapped[0]);
            cmd.args(&wrapped[1..]);
            cmd
        } else {
            let line: Vec<String> = wrapped.iter().map(|w| shell_quote(w)).collect();
            super::ssh_command(self, node, &line.join(" "))
        }
    }

    /// `argv` with the node's cluster environment ([`Self::node_env`]) plus `extra`, inside its
    /// runtime ([`Self::command`]):
    /// - public variables go on the command line (`env K=V`, `podman exec -e K=V`);
    /// - `LD_LIBRARY_PATH` is put in front of the node's own loader path, expanded where the
    ///   command runs (inside the container, when there is one);
    /// - secrets ([`Self::secret_env`]) are read from stdin there, one line each, so they never
    ///   appear on a command line or in `ps`: the caller writes [`NodeCommand::input`].
    pub fn env_command(
        &self,
        node: &Node,
        extra: &[(String, String)],
        argv: &[String],
    ) -> NodeCommand {
        let mut public = Vec::new();
        let mut ld_path = None;
        for (k, v) in self
            .public_env(node)
            .into_iter()
            .chain(extra.iter().cloned())
        {
            if k == "LD_LIBRARY_PATH" {
                ld_path = Some(v);
            } else {
                public.retain(|(name, _): &(String, String)| *name != k);
                public.push((k, v));
            }
        }
        let secrets = self.secret_env();
        let mut prelude: Vec<String> = secrets
            .iter()
            .map(|(k, _)| format!("IFS= read -r {k} && export {k}"))
            .collect();
        if let Some(dir) = &ld_path {
            prelude.push(format!(
                "LD_LIBRARY_PATH={}\"${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\" && export LD_LIBRARY_PATH",
                shell_quote(dir)
            ));
        }
        let inner: Vec<String> = if prelude.is_empty() {
            argv.to_vec()
        } else {
            // `sh -c` so neither the login shell of the remote user nor the runtime matters.
            let mut v = vec![
                "sh".to_string(),
                "-c".to_string(),
                format!("{} && exec \"$@\"", prelude.join(" && ")),
                "sh".to_string(),
            ];
            v.extend(argv.iter().cloned());
            v
        };
        NodeCommand {
            cmd: self.command(node, &public, &inner),
            input: (!secrets.is_empty())
                .then(|| secrets.iter().map(|(_, v)| format!("{v}\n")).collect()),
        }
    }

    /// `HALO_RAY`, else the node's own `ray`, else `[ray] executable`.
    pub fn ray_for(&self, node: &Node) -> String {
        std::env::var(RAY_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| node.ray.clone())
            .unwrap_or_else(|| self.ray.executable.clone())
    }

    /// The environment RCCL, Ray and vLLM need on `node`.
    pub fn node_env(&self, node: &Node) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = crate::doctor::plugin::plugin_env(&self.rccl.plugin);
        env.extend(
            [
                ("NCCL_SOCKET_IFNAME", node.iface.clone()),
                ("GLOO_SOCKET_IFNAME", node.iface.clone()),
                ("NCCL_IB_HCA", node.rdma_device.clone()),
                ("NCCL_IB_GID_INDEX", node.gid_index.to_string()),
                ("NCCL_NET_GDR_LEVEL", self.rccl.gdr_level.clone()),
                ("NCCL_IB_TIMEOUT", self.rccl.ib_timeout.to_string()),
                ("NCCL_IB_RETRY_CNT", self.rccl.ib_retry_cnt.to_string()),
                // vLLM assigns the iGPU itself; Ray rewriting ROCR_VISIBLE_DEVICES hides it.
                (
                    "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES",
                    "1".to_string(),
                ),
                ("RAY_DISABLE_METRICS", "1".to_string()),
                ("VLLM_HOST_IP", node.ip.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        if !self.ray.memory_monitor {
            env.push(("RAY_memory_monitor_refresh_ms".into(), "0".into()));
        }
        for (k, v) in &self.env {
            match env.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        env
    }

    /// [`Self::node_env`] without the secrets: what may appear on a command line.
    pub fn public_env(&self, node: &Node) -> Vec<(String, String)> {
        self.node_env(node)
            .into_iter()
            .filter(|(k, _)| !is_secret_name(k))
            .collect()
    }

    /// The secrets every node gets: those under [env], then `HF_TOKEN` and
    /// `HUGGING_FACE_HUB_TOKEN` from halo's own environment when [env] does not set them.
    pub fn secret_env(&self) -> Vec<(String, String)> {
        let mut secrets: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| is_secret_name(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for name in FORWARDED_SECRETS {
            if secrets.iter().any(|(k, _)| k == name) {
                continue;
            }
            if let Some(v) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
                secrets.push((name.to_string(), v));
            }
        }
        secrets
    }
}

/// A command for a node and what must be written to its stdin first (the cluster's secrets,
/// see [`ClusterConfig::env_command`]); give `input` to `crate::process::run_bounded_input`.
pub struct NodeCommand {
    pub cmd: Command,
    pub input: Option<String>,
}

/// Where `up` records what it started: `cluster.state.json` beside `cluster.toml`.
pub fn state_path(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or("cluster".into(), |s| s.to_string_lossy().into_owned());
    config.with_file_name(format!("{stem}.state.json"))
}

const HEADER: &str = "\
# halo cluster configuration (written by `halo cluster init`; edit freely).
# The first [[nodes]] entry is the head: `halo cluster up` starts it locally and the others
# over SSH. Every node gets NCCL_NET_PLUGIN=halo with the plugin's directory in front of
# LD_LIBRARY_PATH (the form every RCCL understands), NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME,
# NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, NCCL_IB_TIMEOUT, NCCL_IB_RETRY_CNT,
# RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES=1, RAY_DISABLE_METRICS=1, VLLM_HOST_IP and, unless
# [ray] memory_monitor = true, RAY_memory_monitor_refresh_ms=0 (Ray's OOM killer off);
# [env] adds or overrides variables on every node (e.g. NCCL_DEBUG = \"INFO\").
# HF_TOKEN (and any *TOKEN*/*SECRET*/*PASSWORD*/*API_KEY* variable) reaches the workers over
# SSH's stdin, never on a command line; halo forwards HF_TOKEN from its own environment too.
# [runtime] says where every command halo runs on a node goes (Ray, vLLM, probes): engine =
# \"host\", or a container: engine = \"podman\" | \"toolbox\" | \"distrobox\" with name = \"…\",
# or engine = \"command\" with enter = [\"PROGRAM\", …] (any command that runs its arguments
# inside, e.g. unshare/chroot). A node can set its own under [nodes.runtime].
# [ray] num_gpus, when present, replaces the GPU count detected on each node.
# [bench] halo is the `halo` executable on the other nodes (default: `halo` on the PATH there);
# `halo bench` starts the peer's listener with it and `halo doctor --peer` the peer's doctor.
# `halo doctor --peer` sends its RDMA ping on each node's rdma_device and gid_index from here.

";
