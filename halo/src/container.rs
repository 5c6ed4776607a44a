//! `halo container create | print`: the vLLM container with the GPU, the RDMA devices, unlimited
//! locked memory and the halo plugin inside.
//!
//! `create` records what it made in `container.json` under halo's state directory
//! ([`record_path`]), so `halo cluster init` on this machine writes `[runtime]` for it: every
//! command halo then runs on a node runs inside that container.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterConfig, InitEngine};
use crate::doctor::plugin::{plugin_env, prepend_ld_path, DEFAULT_PLUGIN_PATH};
use crate::process::{describe, run_inherited_bounded};
use crate::sysroot::SysRoot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// `podman create` (host network and IPC; start with `podman start`)
    Podman,
    /// Fedora toolbx: `toolbox create … -- <podman flags>`
    Toolbox,
    /// `distrobox create … --additional-flags "<podman flags>"`
    Distrobox,
}

impl From<Engine> for InitEngine {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Podman => InitEngine::Podman,
            Engine::Toolbox => InitEngine::Toolbox,
            Engine::Distrobox => InitEngine::Distrobox,
        }
    }
}

/// What `halo container create` made, for `halo cluster init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub engine: Engine,
    pub name: String,
    pub image: String,
    pub created_unix: u64,
}

/// `$HALO_STATE_DIR/container.json`, else `$XDG_STATE_HOME/halo/container.json`, else
/// `~/.local/state/halo/container.json`.
pub fn record_path() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = var("HALO_STATE_DIR")
        .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("halo")))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/halo")))
        .unwrap_or_else(|| PathBuf::from(".halo-state"));
    dir.join("container.json")
}

/// The record and where it was read, when there is one.
pub fn load_record() -> Option<(ContainerRecord, PathBuf)> {
    let path = record_path();
    let text = fs::read_to_string(&path).ok()?;
    serde_json::from_str(&text).ok().map(|r| (r, path))
}

fn write_record(record: &ContainerRecord) -> Result<PathBuf> {
    let path = record_path();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(&path, serde_json::to_string_pretty(record)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Removes the container (`--replace`); a container that does not exist is not an error.
pub fn remove_command_line(engine: Engine, name: &str) -> Vec<String> {
    match engine {
        Engine::Podman => ["podman", "rm", "--force", "--ignore", name],
        Engine::Toolbox => ["toolbox", "rm", "--force", name, ""],
        Engine::Distrobox => ["distrobox", "rm", "--force", name, ""],
    }
    .into_iter()
    .filter(|w| !w.is_empty())
    .map(String::from)
    .collect()
}

/// podman containers are created stopped; `podman exec` needs them running.
pub fn start_command_line(engine: Engine, name: &str) -> Option<Vec<String>> {
    (engine == Engine::Podman).then(|| vec!["podman".into(), "start".into(), name.into()])
}

#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// Container image.
    #[arg(long, default_value = "docker.io/kyuz0/vllm-therock-gfx1151:latest")]
    pub image: String,
    /// Container name.
    #[arg(long, default_value = "vllm")]
    pub name: String,
    #[arg(long, value_enum, default_value_t = Engine::Toolbox)]
    pub engine: Engine,
    /// Host path of librccl-net-halo.so, mounted read-only at the same path and loaded as
    /// NCCL_NET_PLUGIN=halo with its directory on LD_LIBRARY_PATH
    /// [default: [rccl] plugin from the config, else /opt/halo/lib/librccl-net-halo.so].
    #[arg(long)]
    pub plugin: Option<String>,
    /// Extra environment for the container (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Look for /dev/infiniband below DIR (for captured trees).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Remove an existing container of that name first, then create it anew (e.g. for a newer image).
    #[arg(long)]
    pub replace: bool,
}

/// The podman flags every engine needs; `--device /dev/infiniband` and the memlock limit only
/// when the host has RDMA devices.
pub fn podman_flags(args: &ContainerArgs, plugin: &str, has_infiniband: bool) -> Vec<String> {
    let mut f: Vec<String> = ["--device", "/dev/dri", "--device", "/dev/kfd"]
        .map(String::from)
        .to_vec();
    if has_infiniband {
        f.extend(["--device", "/dev/infiniband", "--ulimit", "memlock=-1"].map(String::from));
    }
    f.extend(
        [
            // Keeps the user's video/render/rdma groups, which own the device nodes.
            "--group-add",
            "keep-groups",
            "--security-opt",
            "seccomp=unconfined",
        ]
        .map(String::from),
    );
    f.push("-v".into());
    f.push(format!("{plugin}:{plugin}:ro"));
    // NCCL_NET_PLUGIN=halo with the directory on the loader path: the form every RCCL loads.
    // An image's own LD_LIBRARY_PATH cannot be extended from outside: pass it with
    // --env LD_LIBRARY_PATH=… and the plugin's directory is put in front of it.
    let user_ld = args
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix("LD_LIBRARY_PATH="));
    for (k, v) in plugin_env(plugin) {
        let v = if k == "LD_LIBRARY_PATH" {
            prepend_ld_path(&v, user_ld)
        } else {
            v
        };
        f.push("-e".into());
        f.push(format!("{k}={v}"));
    }
    for kv in args.env.iter().filter(|kv| {
        !(kv.starts_with("LD_LIBRARY_PATH=")
            && plugin_env(plugin)
                .iter()
                .any(|(k, _)| k == "LD_LIBRARY_PATH"))
    }) {
        f.push("-e".into());
        f.push(kv.clone());
    }
    f
}

pub fn command_line(args: &ContainerArgs, plugin: &str, has_infiniband: bool) -> Vec<String> {
    let flags = podman_flags(args, plugin, has_infiniband);
    let mut argv: Vec<String> = Vec::new();
    match args.engine {
        Engine::Podman => {
            argv.extend(["podman", "create", "--name"].map(String::from));
            argv.push(args.name.clone());
            // Ray and RCCL bind the cluster interface and use shared memory between ranks.
            argv.extend(["--network", "host", "--ipc", "host"].map(String::from));
            argv.extend(flags);
            argv.push(args.image.clone());
            argv.extend(["sleep", "infinity"].map(String::from));
        }
        Engine::Toolbox => {
            argv.extend(
                [
                    "toolbox",
                    "create",
                    args.name.as_str(),
                    "--image",
                    args.image.as_str(),
                    "--",
                ]
                .map(String::from),
            );
            argv.extend(flags);
        }
        Engine::Distrobox => {
            argv.extend(
                [
                    "distrobox",
                    "create",
                    "--name",
                    args.name.as_str(),
                    "--image",
                    args.image.as_str(),
                ]
                .map(String::from),
            );
            argv.push("--additional-flags".into());
            argv.push(flags.join(" "));
        }
    }
    argv
}

fn resolve_plugin(args: &ContainerArgs, config_path: &Path) -> Result<String> {
    if let Some(p) = &args.plugin {
        return Ok(p.clone());
    }
    if config_path.exists() {
        return Ok(ClusterConfig::load(config_path)?.rccl.plugin);
    }
    Ok(DEFAULT_PLUGIN_PATH.to_string())
}

fn build(args: &ContainerArgs, config_path: &Path) -> Result<Vec<String>> {
    for kv in &args.env {
        if !kv.contains('=') || kv.starts_with('=') {
            bail!("--env {kv}: expected KEY=VALUE");
        }
    }
    let plugin = resolve_plugin(args, config_path)?;
    let has_infiniband = SysRoot::new(&args.root).exists("/dev/infiniband");
    Ok(command_line(args, &plugin, has_infiniband))
}

pub fn print(args: &ContainerArgs, config_path: &Path) -> Result<()> {
    let argv = build(args, config_path)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    println!("{}", describe(&cmd));
    Ok(())
}

pub fn create(args: &ContainerArgs, config_path: &Path) -> Result<i32> {
    let argv = build(args, config_path)?;
    let plugin = resolve_plugin(args, config_path)?;
    if !SysRoot::new(&args.root).path(&plugin).is_file() {
        bail!("{plugin} not found: build and install the plugin first (see `halo doctor`), or pass --plugin PATH");
    }
    let run = |argv: &[String], limit: Duration| -> Result<i32> {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        println!("{}", describe(&cmd));
        Ok(run_inherited_bounded(&mut cmd, limit)?.unwrap_or(1))
    };
    if args.replace {
        let rm = remove_command_line(args.engine, &args.name);
        let code = run(&rm, Duration::from_secs(300))?;
        if code != 0 {
            // toolbox and distrobox refuse to remove what does not exist; creating is still right.
            eprintln!(
                "halo: note: `{}` exited {code}; creating anyway",
                rm.join(" ")
            );
        }
    }
    // Pulling a multi-GiB image over a slow link takes long, but not forever.
    let code = run(&argv, Duration::from_secs(3 * 3600))?;
    if code != 0 {
        if !args.replace {
            eprintln!(
                "halo: if a container named {} exists already, `halo container create --replace` recreates it",
                args.name
            );
        }
        return Ok(code);
    }
    if let Some(start) = start_command_line(args.engine, &args.name) {
        let code = run(&start, Duration::from_secs(300))?;
        if code != 0 {
            return Ok(code);
        }
    }
    let record = ContainerRecord {
        engine: args.engine,
        name: args.name.clone(),
        image: args.image.clone(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let path = write_record(&record)?;
    println!(
        "recorded in {}: `halo cluster init` on this machine runs every node's commands in {} {}",
        path.display(),
        format!("{:?}", args.engine).to_lowercase(),
        args.name
    );
    Ok(0)
}
