//! `halo container create | print`: the vLLM container with the GPU, the RDMA devices, unlimited
//! locked memory and the halo plugin inside.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::cluster::ClusterConfig;
use crate::doctor::plugin::{plugin_env, prepend_ld_path, DEFAULT_PLUGIN_PATH};
use crate::process::{describe, run_inherited_bounded};
use crate::sysroot::SysRoot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// `podman create` (host network and IPC; start with `podman start`)
    Podman,
    /// Fedora toolbx: `toolbox create … -- <podman flags>`
    Toolbox,
    /// `distrobox create … --additional-flags "<podman flags>"`
    Distrobox,
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
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    println!("{}", describe(&cmd));
    // Pulling a multi-GiB image over a slow link takes long, but not forever.
    let code = run_inherited_bounded(&mut cmd, Duration::from_secs(3 * 3600))?;
    Ok(code.unwrap_or(1))
}
