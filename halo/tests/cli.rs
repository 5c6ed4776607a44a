//! Help texts, `cluster init` and `container print` (`serve`/`bench-serve` are in serve.rs).

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
            "NCCL_NET_PLUGIN=halo",
            "LD_LIBRARY_PATH=/opt/halo/lib",
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
            "RAY_memory_monitor_refresh_ms=0",
        ]
    );
    // The node's shell puts the plugin's directory in front of its own loader path: run the
    // head's command (here, on the host runtime) with a loader path of its own.
    let head = cfg.head().clone();
    for (before, after) in [
        ("/opt/rocm/lib", "/opt/halo/lib:/opt/rocm/lib"),
        ("", "/opt/halo/lib"),
    ] {
        let mut run = cfg.env_command(
            &head,
            &[],
            &["printenv".to_string(), "LD_LIBRARY_PATH".to_string()],
        );
        assert!(run.input.is_none(), "no secrets in this config");
        let out = run.cmd.env("LD_LIBRARY_PATH", before).output().unwrap();
        assert_eq!(
            stdout(&out).trim(),
            after,
            "{}",
            halo::process::describe(&run.cmd)
        );
    }
    // A worker's line carries the same prefix, expanded by the worker's shell.
    let worker = halo::cluster::ray_start_command(&cfg, &cfg.nodes[1], 1);
    let shown = halo::process::describe(&worker.cmd);
    assert!(
        shown.contains(r#"LD_LIBRARY_PATH=/opt/halo/lib"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}""#),
        "{shown}"
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
                    -e NCCL_NET_PLUGIN=halo -e LD_LIBRARY_PATH=/opt/halo/lib -e NCCL_DEBUG=INFO";
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
        line.contains("-e NCCL_NET_PLUGIN=halo -e LD_LIBRARY_PATH=/srv/halo "),
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

/// The image's loader path can only be passed in: the plugin's directory goes in front of it,
/// once. A library under another file name can only be given by path.
#[test]
fn container_keeps_a_given_loader_path_and_other_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("none.toml");
    let out = halo()
        .arg("--config")
        .arg(&config)
        .args(["container", "print", "--engine", "podman", "--root"])
        .arg(dir.path())
        .args(["--env", "LD_LIBRARY_PATH=/opt/rocm/lib:/usr/local/lib"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.contains(
            "-e NCCL_NET_PLUGIN=halo -e LD_LIBRARY_PATH=/opt/halo/lib:/opt/rocm/lib:/usr/local/lib"
        ),
        "{line}"
    );
    assert_eq!(line.matches("LD_LIBRARY_PATH=").count(), 1, "{line}");
    let out = halo()
        .arg("--config")
        .arg(&config)
        .args(["container", "print", "--engine", "podman", "--root"])
        .arg(dir.path())
        .args(["--plugin", "/srv/x/libhalo-custom.so"])
        .output()
        .unwrap();
    let line = stdout(&out);
    assert!(
        line.contains("-e NCCL_NET_PLUGIN=/srv/x/libhalo-custom.so"),
        "{line}"
    );
    assert!(!line.contains("LD_LIBRARY_PATH"), "{line}");
}

#[test]
fn report_writes_markdown_and_json_and_redacts() {
    let dir = tempfile::tempdir().unwrap();
    let coll = dir.path().join("collective.json");
    fs::write(
        &coll,
        r#"{"ranks": 2, "nodes": ["10.9.8.1", "10.9.8.2"], "variants": [
            {"variant": "plugin", "backend": "nccl", "error": null,
             "transport": {"network": "halo", "evidence": ["strix1:1:2 [0] NCCL INFO NET/Plugin: Loaded net plugin halo (v10)"]},
             "rows": [{"op": "all_reduce", "dtype": "bf16", "size": 4096, "count": 2048, "time_us": 31.5,
                       "algbw_gbs": 0.13, "busbw_gbs": 0.13, "wrong": 0}], "decode": []}]}"#,
    )
    .unwrap();
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    let run = |out: &Path, redact: bool| {
        let mut c = halo();
        c.arg("--config")
            .arg(dir.path().join("none.toml"))
            .args(["report", "--out"])
            .arg(out)
            .arg("--collective")
            .arg(&coll);
        if redact {
            c.arg("--redact");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        (
            fs::read_to_string(out).unwrap(),
            fs::read_to_string(out.with_extension("json")).unwrap(),
        )
    };
    let (md, js) = run(&dir.path().join("r.md"), false);
    assert!(
        md.contains("## Versions") && md.contains("| kernel |"),
        "{md}"
    );
    assert!(md.contains("## Doctor: "), "{md}");
    assert!(
        md.contains("| 4096 | 2048 | bf16 | all_reduce | 31.5 |"),
        "{md}"
    );
    assert!(
        md.contains("NET/Plugin: Loaded net plugin halo (v10)"),
        "{md}"
    );
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert!(v["nodes"][0]["doctor"]["checks"].as_array().unwrap().len() > 5);
    assert!(v["nodes"][0]["versions"]["kernel"].is_string());
    let (md, js) = run(&dir.path().join("red.md"), true);
    if host.len() > 1 && host != "(none)" && host != "localhost" {
        assert!(!md.contains(host) && !js.contains(host), "{md}");
    }
    assert!(md.contains("## Doctor: node1"), "{md}");
}

#[test]
fn bench_refuses_a_plot_file_it_cannot_write_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("cluster.toml");
    // --collective: refused before the cluster config is even read.
    let out = halo()
        .arg("--config")
        .arg(&missing)
        .args(["bench", "--collective", "--variants", "gloo", "--plot"])
        .arg(dir.path().join("c.jpg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--plot takes a .svg or .png file name, not") && err.contains("c.jpg"),
        "{err}"
    );
    // The network bench: refused at once, not after waiting for a peer that is not there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let out = halo()
        .args(["bench", "--peer", &format!("127.0.0.1:{port}")])
        .args(["--connect-wait", "20", "--plot"])
        .arg(dir.path().join("b.pdf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--plot takes a .svg or .png file name"),
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 10, "{err}");
}

#[test]
fn collective_bf16_with_gloo_is_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    for types in [["--dtypes", "bf16"], ["--dtype", "fp32,bf16"]] {
        let out = halo()
            .arg("--config")
            .arg(dir.path().join("cluster.toml"))
            .args(["bench", "--collective", "--variants", "gloo"])
            .args(types)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{types:?}");
        let err = stderr(&out);
        assert!(
            err.contains("--dtypes bf16 cannot run with --variants gloo")
                && err.contains("use --dtypes fp32 with gloo"),
            "{err}"
        );
        assert!(
            !err.contains("cluster.toml"),
            "checked before the config: {err}"
        );
    }
}
