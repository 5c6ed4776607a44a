//! Help texts, `cluster init`, `container print`, and `serve`/`bench-serve` with a stand-in vLLM
//! (no Ray needed: the stand-in only records what it was given).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{good_tree, halo, stderr, stdout};

#[test]
fn every_help_runs_and_teaches() {
    for args in [
        vec!["--help"],
        vec!["doctor", "--help"],
        vec!["cluster", "--help"],
        vec!["cluster", "init", "--help"],
        vec!["cluster", "up", "--help"],
        vec!["cluster", "status", "--help"],
        vec!["cluster", "down", "--help"],
        vec!["serve", "--help"],
        vec!["bench-serve", "--help"],
        vec!["container", "--help"],
        vec!["container", "create", "--help"],
        vec!["container", "print", "--help"],
    ] {
        let out = halo().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains("Usage: halo"), "{args:?}");
    }
    let top = stdout(&halo().arg("--help").output().unwrap());
    assert!(
        top.contains("halo cluster init --node strix1=192.168.100.1 --node strix2=192.168.100.2")
    );
    let serve = stdout(&halo().args(["serve", "--help"]).output().unwrap());
    assert!(serve.contains("--distributed-executor-backend ray"));
    assert!(serve.contains("HF_TOKEN"));
    let out = halo().output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no subcommand is a usage error");
}

#[test]
fn init_detects_the_rdma_setup_and_writes_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    let out = halo()
        .arg("--config")
        .arg(&config)
        .args([
            "cluster",
            "init",
            "--node",
            "strix1=192.168.100.1",
            "--node",
            "strix2=192.168.100.2",
            "--ssh-user",
            "core",
        ])
        .args(["--model", "Qwen/Qwen3-8B", "--root"])
        .arg(good_tree())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "wrote {} (2 nodes, head 192.168.100.1 on enp1s0f0np0, rocep1s0f0, GID index 1)\n\
             runtime: the host (no container recorded by `halo container create`)",
            config.display()
        )
    );
    let cfg = halo::cluster::ClusterConfig::load(&config).unwrap();
    assert_eq!(cfg.nodes.len(), 2);
    assert_eq!(cfg.nodes[1].ip, "192.168.100.2");
    assert_eq!(cfg.nodes[1].iface, "enp1s0f0np0");
    assert_eq!(cfg.nodes[1].rdma_device, "rocep1s0f0");
    assert_eq!(cfg.nodes[1].gid_index, 1);
    assert_eq!(cfg.ssh.user.as_deref(), Some("core"));
    assert_eq!(cfg.rccl.plugin, "/opt/halo/lib/librccl-net-halo.so");
    assert_eq!(cfg.model.name.as_deref(), Some("Qwen/Qwen3-8B"));
    assert_eq!(cfg.model.tp, Some(2));
    assert_eq!(cfg.ray.port, 6379);
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("# halo cluster configuration"));
    let env: Vec<String> = cfg
        .node_env(&cfg.nodes[1])
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert_eq!(
        env,
        [
            "NCCL_NET_PLUGIN=/opt/halo/lib/librccl-net-halo.so",
            "NCCL_SOCKET_IFNAME=enp1s0f0np0",
            "GLOO_SOCKET_IFNAME=enp1s0f0np0",
            "NCCL_IB_HCA=rocep1s0f0",
            "NCCL_IB_GID_INDEX=1",
            "NCCL_NET_GDR_LEVEL=SYS",
            "NCCL_IB_TIMEOUT=23",
            "NCCL_IB_RETRY_CNT=7",
            "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES=1",
            "RAY_DISABLE_METRICS=1",
            "VLLM_HOST_IP=192.168.100.2",
        ]
    );

    // A second init does not clobber the file; a worker without an IP is refused.
    let again = halo()
        .arg("--config")
        .arg(&config)
        .args(["cluster", "init", "--node", "a=1.2.3.4"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("exists; pass --force"),
        "{}",
        stderr(&again)
    );
    let no_ip = halo()
        .arg("--config")
        .arg(dir.path().join("other.toml"))
        .args([
            "cluster", "init", "--node", "strix1", "--node", "strix2", "--root",
        ])
        .arg(good_tree())
        .output()
        .unwrap();
    assert!(
        stderr(&no_ip).contains("--node strix2: give its cluster IP as strix2=IP"),
        "{}",
        stderr(&no_ip)
    );
}

fn container_print(engine: &str, root: &Path) -> String {
    let out = halo()
        .args([
            "--config",
            "/nonexistent/cluster.toml",
            "container",
            "print",
            "--engine",
            engine,
            "--name",
            "vllm-rdma",
            "--root",
        ])
        .arg(root)
        .args(["--env", "NCCL_DEBUG=INFO"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

#[test]
fn container_commands_per_engine_with_and_without_infiniband() {
    let with_ib = good_tree();
    let without = tempfile::tempdir().unwrap();
    let flags_ib = "--device /dev/dri --device /dev/kfd --device /dev/infiniband --ulimit memlock=-1 --group-add keep-groups \
                    --security-opt seccomp=unconfined -v /opt/halo/lib/librccl-net-halo.so:/opt/halo/lib/librccl-net-halo.so:ro \
                    -e NCCL_NET_PLUGIN=/opt/halo/lib/librccl-net-halo.so -e NCCL_DEBUG=INFO";
    let flags_ib = flags_ib.split_whitespace().collect::<Vec<_>>().join(" ");
    let flags_plain = flags_ib.replace(" --device /dev/infiniband --ulimit memlock=-1", "");
    let image = "docker.io/kyuz0/vllm-therock-gfx1151:latest";
    for (root, flags) in [
        (with_ib.as_path(), &flags_ib),
        (without.path(), &flags_plain),
    ] {
        assert_eq!(
            container_print("podman", root),
            format!("podman create --name vllm-rdma --network host --ipc host {flags} {image} sleep infinity")
        );
        assert_eq!(
            container_print("toolbox", root),
            format!("toolbox create vllm-rdma --image {image} -- {flags}")
        );
        assert_eq!(
            container_print("distrobox", root),
            format!(
                "distrobox create --name vllm-rdma --image {image} --additional-flags '{flags}'"
            )
        );
    }
}

#[test]
fn container_uses_the_plugin_path_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    let init = halo()
        .arg("--config")
        .arg(&config)
        .args([
            "cluster",
            "init",
            "--node",
            "a=10.0.0.1",
            "--iface",
            "eth1",
            "--rdma-device",
            "mlx4_0",
            "--gid-index",
            "0",
        ])
        .args(["--plugin", "/srv/halo/librccl-net-halo.so", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let out = halo()
        .arg("--config")
        .arg(&config)
        .args(["container", "print", "--engine", "podman", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    let line = stdout(&out);
    assert!(
        line.contains("-v /srv/halo/librccl-net-halo.so:/srv/halo/librccl-net-halo.so:ro"),
        "{line}"
    );
    assert!(
        line.contains("-e NCCL_NET_PLUGIN=/srv/halo/librccl-net-halo.so"),
        "{line}"
    );
}

/// `container create` with stand-in engines on PATH: --replace removes first, podman's
/// container is started, and the record makes `cluster init` write `[runtime]` for it.
#[test]
fn container_create_records_what_it_made_for_cluster_init() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = dir.path().join("engine.log");
    for engine in ["podman", "toolbox"] {
        let path = bin.join(engine);
        fs::write(
            &path,
            format!("#!/bin/sh\necho \"{engine} $*\" >> {}\n", log.display()),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let plugin = dir.path().join("librccl-net-halo.so");
    fs::write(&plugin, b"\x7fELF").unwrap();
    let state = dir.path().join("state");
    let path_var = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let create = |engine: &str, replace: bool| {
        let mut c = halo();
        c.env("PATH", &path_var)
            .env("HALO_STATE_DIR", &state)
            .args([
                "--config",
                "/nonexistent/cluster.toml",
                "container",
                "create",
            ])
            .args([
                "--engine",
                engine,
                "--name",
                "vllm-rdma",
                "--image",
                "img:1",
            ])
            .arg("--plugin")
            .arg(&plugin);
        if replace {
            c.arg("--replace");
        }
        c.output().unwrap()
    };
    let out = create("podman", true);
    assert!(out.status.success(), "{}", stderr(&out));
    let calls = fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0], "podman rm --force --ignore vllm-rdma");
    assert!(
        calls[1].starts_with("podman create --name vllm-rdma --network host"),
        "{}",
        calls[1]
    );
    assert_eq!(calls[2], "podman start vllm-rdma");
    assert!(stdout(&out).contains("recorded in"), "{}", stdout(&out));

    fs::remove_file(&log).unwrap();
    let out = create("toolbox", true);
    assert!(out.status.success(), "{}", stderr(&out));
    let calls = fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls[0], "toolbox rm --force vllm-rdma");
    assert!(
        calls[1].starts_with("toolbox create vllm-rdma --image img:1 -- "),
        "{}",
        calls[1]
    );
    assert_eq!(
        calls.len(),
        2,
        "toolbox starts its container itself: {calls:?}"
    );

    let config = dir.path().join("cluster.toml");
    let init = halo()
        .env("HALO_STATE_DIR", &state)
        .arg("--config")
        .arg(&config)
        .args([
            "cluster",
            "init",
            "--node",
            "a=10.0.0.1",
            "--node",
            "b=10.0.0.2",
        ])
        .args([
            "--iface",
            "eth1",
            "--rdma-device",
            "mlx5_0",
            "--gid-index",
            "3",
        ])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(
        stdout(&init)
            .contains("runtime: toolbox vllm-rdma (recorded by `halo container create` in"),
        "{}",
        stdout(&init)
    );
    let cfg = halo::cluster::ClusterConfig::load(&config).unwrap();
    let toolbox = halo::cluster::Runtime::Toolbox {
        name: "vllm-rdma".into(),
    };
    assert_eq!(cfg.runtime, toolbox);
    assert!(fs::read_to_string(&config)
        .unwrap()
        .contains("[runtime]\nengine = \"toolbox\"\nname = \"vllm-rdma\""));
    // Every node's commands now go through the container.
    let worker = &cfg.nodes[1];
    let cmd = cfg.command(worker, &[], &["ray".to_string(), "status".to_string()]);
    assert_eq!(
        halo::process::describe(&cmd),
        "ssh -o BatchMode=yes -o ConnectTimeout=5 b 'toolbox run -c vllm-rdma ray status'"
    );
    // --engine host overrides the record.
    let init = halo()
        .env("HALO_STATE_DIR", &state)
        .arg("--config")
        .arg(&config)
        .args([
            "cluster",
            "init",
            "--force",
            "--engine",
            "host",
            "--node",
            "a=10.0.0.1",
        ])
        .args([
            "--iface",
            "eth1",
            "--rdma-device",
            "mlx5_0",
            "--gid-index",
            "3",
        ])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    assert_eq!(
        halo::cluster::ClusterConfig::load(&config).unwrap().runtime,
        halo::cluster::Runtime::Host
    );
}

/// A config for one local node and a stand-in `vllm` that records argv + env and either
/// answers /v1/models once (serve) or prints a Throughput line (bench).
fn serve_setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = dir.join("cluster.toml");
    let init = halo()
        .arg("--config")
        .arg(&config)
        .args([
            "cluster",
            "init",
            "--node",
            "strix1=192.168.100.1",
            "--node",
            "strix2=192.168.100.2",
            "--root",
        ])
        .arg(good_tree())
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let vllm = dir.join("vllm");
    let record = dir.join("record");
    fs::write(
        &vllm,
        format!(
            r#"#!/usr/bin/env python3
import http.server, json, os, sys
keys = ["NCCL_NET_PLUGIN", "NCCL_IB_GID_INDEX", "VLLM_HOST_IP", "RAY_ADDRESS", "HF_TOKEN"]
with open("{record}", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}) + "\n")
if sys.argv[1] == "bench":
    tp = int(sys.argv[sys.argv.index("--tensor-parallel-size") + 1])
    print("INFO processing...")
    print(f"Throughput: {{1.5 * tp:.2f}} requests/s, {{388.0 * tp:.2f}} total tokens/s, {{200.0 * tp:.2f}} output tokens/s")
    sys.exit(0)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{{}}")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H)
s.timeout = 30
s.handle_request()
"#,
            record = record.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&vllm, fs::Permissions::from_mode(0o755)).unwrap();
    (config, vllm)
}

#[test]
fn serve_launches_vllm_with_the_cluster_env_and_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (config, vllm) = serve_setup(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    // The stand-in is found first on PATH, as an installed vllm would be.
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let out = halo()
        .env("PATH", &path)
        .env_remove("HALO_VLLM")
        .env("HF_TOKEN", "hf_x")
        .arg("--config")
        .arg(&config)
        .args([
            "serve",
            "Qwen/Qwen3-8B",
            "--port",
            &port,
            "--max-num-seqs",
            "8",
            "--trust-remote-code",
            "--wait-secs",
            "60",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let rec: serde_json::Value = serde_json::from_str(
        fs::read_to_string(dir.path().join("record"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let argv: Vec<&str> = rec["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        argv,
        [
            "serve",
            "Qwen/Qwen3-8B",
            "--host",
            "0.0.0.0",
            "--port",
            port.as_str(),
            "--tensor-parallel-size",
            "2",
            "--distributed-executor-backend",
            "ray",
            "--gpu-memory-utilization",
            "0.90",
            "--enforce-eager",
            "--max-num-seqs",
            "8",
            "--trust-remote-code"
        ]
    );
    assert_eq!(
        rec["env"]["NCCL_NET_PLUGIN"],
        "/opt/halo/lib/librccl-net-halo.so"
    );
    assert_eq!(rec["env"]["NCCL_IB_GID_INDEX"], "1");
    assert_eq!(rec["env"]["VLLM_HOST_IP"], "192.168.100.1");
    assert_eq!(rec["env"]["RAY_ADDRESS"], "192.168.100.1:6379");
    assert_eq!(rec["env"]["HF_TOKEN"], "hf_x");
    assert!(
        stdout(&out).contains("vLLM serves Qwen/Qwen3-8B (TP=2) at http://192.168.100.1:"),
        "{}",
        stdout(&out)
    );
    let _ = vllm;
}

#[test]
fn serve_refuses_before_launching() {
    let dir = tempfile::tempdir().unwrap();
    let (config, vllm) = serve_setup(dir.path());
    let serve = |args: &[&str], token: Option<&str>| {
        let mut c = halo();
        c.arg("--config")
            .arg(&config)
            .arg("serve")
            .args(args)
            .arg("--vllm")
            .arg(&vllm);
        match token {
            Some(t) => c.env("HF_TOKEN", t),
            None => c.env_remove("HF_TOKEN"),
        };
        c.output().unwrap()
    };
    let out = serve(&["meta-llama/Llama-3.1-8B-Instruct"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "meta-llama/Llama-3.1-8B-Instruct is gated on Hugging Face and HF_TOKEN is not set"
        ),
        "{}",
        stderr(&out)
    );
    let out = serve(&["org/private-model", "--gated"], Some(""));
    assert!(
        stderr(&out).contains("org/private-model is gated"),
        "{}",
        stderr(&out)
    );
    let out = serve(&["Qwen/Qwen3-8B", "--gpu-memory-utilization", "0.95"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refusing --gpu-memory-utilization 0.95: it must be in (0, 0.9]"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("record").exists(),
        "vLLM must not have been started"
    );
}

#[test]
fn bench_serve_compares_tp1_and_tpn() {
    let dir = tempfile::tempdir().unwrap();
    let (config, vllm) = serve_setup(dir.path());
    let out = halo()
        .arg("--config")
        .arg(&config)
        .args([
            "bench-serve",
            "Qwen/Qwen3-8B",
            "--num-prompts",
            "20",
            "--output-len",
            "64",
            "--vllm",
        ])
        .arg(&vllm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    assert!(
        text.contains("total tokens/s        388.00      776.00     2.00x"),
        "{text}"
    );
    let records: Vec<serde_json::Value> = fs::read_to_string(dir.path().join("record"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    let argv1: Vec<&str> = records[0]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        argv1,
        [
            "bench",
            "throughput",
            "--model",
            "Qwen/Qwen3-8B",
            "--tensor-parallel-size",
            "1",
            "--gpu-memory-utilization",
            "0.90",
            "--enforce-eager",
            "--num-prompts",
            "20",
            "--output-len",
            "64",
            "--input-len",
            "1024"
        ]
    );
    let argv2: Vec<&str> = records[1]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(argv2
        .windows(2)
        .any(|w| w == ["--tensor-parallel-size", "2"]));
    assert!(argv2
        .windows(2)
        .any(|w| w == ["--distributed-executor-backend", "ray"]));
    assert_eq!(
        records[1]["env"]["NCCL_NET_PLUGIN"],
        "/opt/halo/lib/librccl-net-halo.so"
    );
}
