//! Where a node's commands run: on the host, or inside a container.
//!
//! [`Runtime::wrap`] is the one place that turns a command and the environment it needs into the
//! argv the node executes; [`super::ClusterConfig::command`] adds SSH for every node but the head.
//! Everything `halo` runs on a node (Ray, the node probe, the peer's doctor, vLLM, bench members)
//! goes through these two, so one `[runtime]` setting moves all of it into the container.
//!
//! | engine      | argv                                                        |
//! |-------------|-------------------------------------------------------------|
//! | `host`      | `env K=V … CMD …` (just `CMD …` without variables)          |
//! | `podman`    | `podman exec -i -e K=V … NAME CMD …`                        |
//! | `toolbox`   | `toolbox run -c NAME env K=V … CMD …`                       |
//! | `distrobox` | `distrobox enter NAME -- env K=V … CMD …`                   |
//! | `command`   | `ENTER… env K=V … CMD …` (e.g. `unshare --mount … chroot ROOT`) |

use std::fmt;

use serde::{Deserialize, Serialize};

/// `[runtime]` (every node) or `[nodes.runtime]` (one node) in `cluster.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "lowercase", deny_unknown_fields)]
pub enum Runtime {
    /// Directly on the node.
    #[default]
    Host,
    /// A running podman container (`podman exec`).
    Podman { name: String },
    /// A Fedora toolbx container (`toolbox run -c`).
    Toolbox { name: String },
    /// A distrobox container (`distrobox enter … --`).
    Distrobox { name: String },
    /// Any command that runs its arguments inside the environment, e.g.
    /// `["unshare", "--mount", "--", "chroot", "/srv/rootfs"]` or `["systemd-run", "--pipe", …]`.
    Command { enter: Vec<String> },
}

impl Runtime {
    /// The argv that runs `argv` with `env` inside this runtime, on the node itself.
    pub fn wrap(&self, env: &[(String, String)], argv: &[String]) -> Vec<String> {
        let assignments = env.iter().map(|(k, v)| format!("{k}={v}"));
        // `env K=V … CMD`: sets the variables inside whatever the runtime enters.
        let with_env = |mut out: Vec<String>| {
            if !env.is_empty() {
                out.push("env".into());
                out.extend(assignments.clone());
            }
            out.extend(argv.iter().cloned());
            out
        };
        match self {
            Runtime::Host => with_env(Vec::new()),
            Runtime::Podman { name } => {
                // `-i`: stdin reaches the command (secrets, the end of a bench listener).
                let mut out: Vec<String> = vec!["podman".into(), "exec".into(), "-i".into()];
                for a in assignments.clone() {
                    out.push("-e".into());
                    out.push(a);
                }
                out.push(name.clone());
                out.extend(argv.iter().cloned());
                out
            }
            Runtime::Toolbox { name } => with_env(vec![
                "toolbox".into(),
                "run".into(),
                "-c".into(),
                name.clone(),
            ]),
            Runtime::Distrobox { name } => with_env(vec![
                "distrobox".into(),
                "enter".into(),
                name.clone(),
                "--".into(),
            ]),
            Runtime::Command { enter } => with_env(enter.clone()),
        }
    }

    /// What to do when entering the runtime itself failed.
    pub fn entry_hint(&self) -> String {
        match self {
            Runtime::Host => "check the command and the node's PATH".into(),
            Runtime::Podman { name } => format!(
                "is the container running? `podman start {name}` (create it with `halo container create --engine podman --name {name}`)"
            ),
            Runtime::Toolbox { name } => format!(
                "does `toolbox list` show {name}? create it with `halo container create --engine toolbox --name {name}`"
            ),
            Runtime::Distrobox { name } => format!(
                "does `distrobox list` show {name}? create it with `halo container create --engine distrobox --name {name}`"
            ),
            Runtime::Command { .. } => {
                "check the `enter` command under [runtime] in cluster.toml".into()
            }
        }
    }

    /// Checks what serde cannot: names and enter commands are not empty.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Runtime::Host => Ok(()),
            Runtime::Podman { name } | Runtime::Toolbox { name } | Runtime::Distrobox { name }
                if name.trim().is_empty() =>
            {
                Err(format!("{self}: empty container name"))
            }
            Runtime::Command { enter } if enter.is_empty() || enter[0].is_empty() => {
                Err("engine = \"command\" needs `enter = [\"PROGRAM\", \"ARG\", …]`".into())
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Runtime::Host => write!(f, "the host"),
            Runtime::Podman { name } => write!(f, "podman container {name}"),
            Runtime::Toolbox { name } => write!(f, "toolbox {name}"),
            Runtime::Distrobox { name } => write!(f, "distrobox {name}"),
            Runtime::Command { enter } => write!(f, "`{}`", enter.join(" ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("NCCL_IB_HCA".into(), "rocep1s0f0".into()),
            ("HALO_X".into(), "a b".into()),
        ]
    }

    fn argv() -> Vec<String> {
        ["ray", "status", "--address=10.0.0.1:6379"]
            .map(String::from)
            .to_vec()
    }

    fn line(rt: &Runtime) -> Vec<String> {
        rt.wrap(&env(), &argv())
    }

    #[test]
    fn podman_passes_the_environment_with_exec_e_and_stdin() {
        let rt = Runtime::Podman {
            name: "vllm".into(),
        };
        assert_eq!(
            line(&rt),
            [
                "podman",
                "exec",
                "-i",
                "-e",
                "NCCL_IB_HCA=rocep1s0f0",
                "-e",
                "HALO_X=a b",
                "vllm",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
        assert_eq!(
            rt.wrap(&[], &argv()),
            [
                "podman",
                "exec",
                "-i",
                "vllm",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
    }

    #[test]
    fn toolbox_runs_env_inside_the_container() {
        let rt = Runtime::Toolbox {
            name: "vllm".into(),
        };
        assert_eq!(
            line(&rt),
            [
                "toolbox",
                "run",
                "-c",
                "vllm",
                "env",
                "NCCL_IB_HCA=rocep1s0f0",
                "HALO_X=a b",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
    }

    #[test]
    fn distrobox_enters_with_a_double_dash() {
        let rt = Runtime::Distrobox {
            name: "vllm".into(),
        };
        assert_eq!(
            line(&rt),
            [
                "distrobox",
                "enter",
                "vllm",
                "--",
                "env",
                "NCCL_IB_HCA=rocep1s0f0",
                "HALO_X=a b",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
        assert_eq!(
            rt.wrap(&[], &["true".to_string()]),
            ["distrobox", "enter", "vllm", "--", "true"]
        );
    }

    #[test]
    fn command_prefixes_the_enter_command_and_host_only_env() {
        let rt = Runtime::Command {
            enter: ["unshare", "--mount", "--", "chroot", "/srv/root"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(
            line(&rt),
            [
                "unshare",
                "--mount",
                "--",
                "chroot",
                "/srv/root",
                "env",
                "NCCL_IB_HCA=rocep1s0f0",
                "HALO_X=a b",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
        assert_eq!(
            line(&Runtime::Host),
            [
                "env",
                "NCCL_IB_HCA=rocep1s0f0",
                "HALO_X=a b",
                "ray",
                "status",
                "--address=10.0.0.1:6379"
            ]
        );
        assert_eq!(Runtime::Host.wrap(&[], &argv()), argv());
    }

    #[test]
    fn toml_forms() {
        #[derive(Deserialize)]
        struct T {
            runtime: Runtime,
        }
        let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.runtime);
        assert_eq!(
            parse("[runtime]\nengine = \"toolbox\"\nname = \"vllm\"\n").unwrap(),
            Runtime::Toolbox {
                name: "vllm".into()
            }
        );
        assert_eq!(
            parse("[runtime]\nengine = \"host\"\n").unwrap(),
            Runtime::Host
        );
        assert_eq!(
            parse("[runtime]\nengine = \"command\"\nenter = [\"chroot\", \"/r\"]\n").unwrap(),
            Runtime::Command {
                enter: vec!["chroot".into(), "/r".into()]
            }
        );
        assert!(parse("[runtime]\nengine = \"docker\"\nname = \"x\"\n").is_err());
        assert!(parse("[runtime]\nengine = \"podman\"\n").is_err());
        assert!(parse("[runtime]\nengine = \"podman\"\nname = \"x\"\nnmae = \"y\"\n").is_err());
        assert!(Runtime::Command { enter: vec![] }.validate().is_err());
        assert!(Runtime::Podman { name: " ".into() }.validate().is_err());
    }
}
