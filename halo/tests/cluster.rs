//! The cluster harness against a real Ray (from scripts/setup-harness.sh) and a real OpenSSH
//! server started by this test on 127.0.0.1: `halo cluster up` starts the head on 127.0.0.2
//! and, over SSH, a worker on 127.0.0.3; `status` must see two nodes; `halo serve` runs a
//! stand-in `vllm` that submits a Ray task pinned to the worker and records the environment
//! that task sees; `down` must leave no Ray process behind.
//!
//! Ray treats 127.0.0.1 as "this host" and swaps in the machine's LAN address, so the nodes
//! use other loopback addresses.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::cluster::{free_port, harness_ray, run, start_sshd, ClusterGuard};
use common::halo;

const HEAD_IP: &str = "127.0.0.2";
const WORKER_IP: &str = "127.0.0.3";
/// A token under [env] and one in halo's environment: both must reach the worker, and
/// neither may appear in any output or in cluster.state.json.
const CONFIG_SECRET: &str = "hf_config_secret_0123456789";
const ENV_SECRET: &str = "hf_environment_secret_9876543210";

/// Ray and sshd, or why not. Without them the test fails, unless HALO_SKIP_CLUSTER_TESTS=1.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    let ray = harness_ray();
    let sshd = PathBuf::from("/usr/sbin/sshd");
    let missing: Vec<&str> = [
        (ray.is_none(), "ray (harness venv)"),
        (!sshd.is_file(), "/usr/sbin/sshd"),
    ]
    .into_iter()
    .filter_map(|(gone, what)| gone.then_some(what))
    .collect();
    common::cluster::prerequisites_met("cluster test", &missing).then(|| (ray.unwrap(), sshd))
}

/// A stand-in for vLLM: records its argv and environment, joins the Ray cluster as vLLM's Ray
/// executor does, runs a task pinned to the worker node that reports the worker's
/// environment, then answers one GET /v1/models and exits.
fn write_fake_vllm(path: &Path, python: &Path) {
    let script = format!(
        r#"#!{python}
import http.server, json, os, sys
import ray

KEYS = ["NCCL_NET_PLUGIN", "LD_LIBRARY_PATH", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX",
        "NCCL_NET_GDR_LEVEL", "NCCL_IB_TIMEOUT", "NCCL_IB_RETRY_CNT", "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES",
        "RAY_DISABLE_METRICS", "VLLM_HOST_IP", "RAY_ADDRESS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
        "HALO_TEST_EXTRA", "RAY_memory_monitor_refresh_ms"]
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in KEYS}}}}
ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address=os.environ["VLLM_HOST_IP"], log_to_driver=False)
record["ray_nodes"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])

@ray.remote(num_cpus=0, resources={{"node:{WORKER_IP}": 0.01}})
def worker_env(keys):
    import os, socket
    return {{k: os.environ.get(k) for k in keys}}

record["worker_env"] = ray.get(worker_env.remote(KEYS), timeout=120)
ray.shutdown()
with open(os.environ["HALO_TEST_RECORD"], "w") as f:
    json.dump(record, f)

class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"data": [{{"id": sys.argv[2]}}]}}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

port = int(sys.argv[sys.argv.index("--port") + 1])
server = http.server.HTTPServer(("127.0.0.1", port), Models)
server.timeout = 60
server.handle_request()
"#,
        python = python.display()
    );
    fs::write(path, script).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn ray_processes() -> String {
    common::cluster::ray_processes(&[HEAD_IP, WORKER_IP])
}

#[test]
fn up_status_serve_down_with_real_ray_and_sshd() {
    let _nodes = common::cluster::loopback_nodes();
    let Some((ray, sshd_bin)) = prerequisites() else {
        return;
    };
    let started = Instant::now();
    assert!(
        ray_processes().is_empty(),
        "Ray processes for {HEAD_IP}/{WORKER_IP} already running:\n{}",
        ray_processes()
    );
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(&sshd_bin, dir.path());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".to_string());

    let plugin = dir.path().join("librccl-net-halo.so");
    fs::write(&plugin, b"\x7fELF").unwrap();
    let config = dir.path().join("cluster.toml");
    let ray_port = free_port();
    // Compile caches as [env] places them on every node (here both nodes share one machine).
    let caches = dir.path().join("caches");
    for d in ["vllm/torch_compile_cache/x", "triton/y", "inductor/z"] {
        fs::create_dir_all(caches.join(d)).unwrap();
    }
    fs::write(
        &config,
        format!(
            r#"[ray]
port = {ray_port}
executable = "ray"
num_cpus = 1
wait_secs = 90

[rccl]
plugin = "{plugin}"
gdr_level = "SYS"
ib_timeout = 23
ib_retry_cnt = 7

[ssh]
user = "{user}"
port = {ssh_port}
key = "{key}"
options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]

[env]
HALO_TEST_EXTRA = "from [env]"
HF_TOKEN = "{CONFIG_SECRET}"
VLLM_CACHE_ROOT = "{caches}/vllm"
TRITON_CACHE_DIR = "{caches}/triton"
TORCHINDUCTOR_CACHE_DIR = "{caches}/inductor"

[[nodes]]
host = "head"
ip = "{HEAD_IP}"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1

[[nodes]]
host = "127.0.0.1"
ip = "{WORKER_IP}"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1
"#,
            plugin = plugin.display(),
            caches = caches.display(),
            ssh_port = sshd.port,
            key = sshd.client_key.display()
        ),
    )
    .unwrap();
    let _guard = ClusterGuard {
        config: &config,
        ray: Some(&ray),
        ips: [HEAD_IP, WORKER_IP],
    };
    let halo_cfg = || {
        let mut c = halo();
        c.env("HALO_RAY", &ray).arg("--config").arg(&config);
        c
    };

    let t = Instant::now();
    let up = run(
        halo_cfg()
            .env("HUGGING_FACE_HUB_TOKEN", ENV_SECRET)
            .args(["cluster", "up"]),
        300,
    );
    assert!(up.success, "cluster up failed");
    let state_text = fs::read_to_string(dir.path().join("cluster.state.json")).unwrap();
    for secret in [CONFIG_SECRET, ENV_SECRET] {
        assert!(
            !up.stdout.contains(secret) && !up.stderr.contains(secret),
            "cluster up printed a token"
        );
        assert!(
            !state_text.contains(secret),
            "cluster.state.json holds a token"
        );
    }
    assert!(
        up.stdout
            .contains("IFS= read -r HF_TOKEN && export HF_TOKEN"),
        "{}",
        up.stdout
    );
    assert!(
        up.stdout.contains("[1/2] head head (127.0.0.2)"),
        "{}",
        up.stdout
    );
    assert!(
        up.stdout
            .contains("[2/2] worker 127.0.0.1 (127.0.0.3): ssh -o StrictHostKeyChecking=no")
            && up
                .stdout
                .contains("-o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=5"),
        "{}",
        up.stdout
    );
    assert!(
        up.stdout.contains("cluster up: 2 nodes active"),
        "{}",
        up.stdout
    );
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("cluster.state.json")).unwrap())
            .unwrap();
    assert_eq!(state["nodes"].as_array().unwrap().len(), 2);
    println!("TIMING cluster up: {:.1} s", t.elapsed().as_secs_f64());

    let status = run(halo_cfg().args(["cluster", "status", "--json"]), 120);
    assert!(status.success);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["active_nodes"], 2, "{s}");
    assert_eq!(s["expected_nodes"], 2);
    // Detected, not assumed: 0 on a machine without GPU (the old code declared 1 per node).
    assert_eq!(
        s["gpus_total"].as_f64(),
        Some(2.0 * common::cluster::host_gpus() as f64)
    );

    // bench --collective: one gloo rank per node through Ray, every result checked.
    let t = Instant::now();
    let coll_args = [
        "bench",
        "--collective",
        "--variants",
        "gloo",
        "--max-bytes",
        "32768",
        "--iters",
        "3",
        "--decode-steps",
        "2",
        "--json",
    ];
    let plot = dir.path().join("collective.svg");
    let coll = run(halo_cfg().args(coll_args).arg("--plot").arg(&plot), 600);
    assert!(coll.success, "bench --collective failed");
    let rep: serde_json::Value = serde_json::from_str(&coll.stdout).unwrap();
    assert_eq!(rep["ranks"], 2);
    // bf16 is left out by default with gloo, and the report says so.
    let notes = rep["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{rep}");
    assert!(
        notes[0]
            .as_str()
            .unwrap()
            .starts_with("bf16 not measured: torch's gloo backend rejects bf16"),
        "{rep}"
    );
    // The plot: one bus-bandwidth line per op with a point per size, one decode line.
    let svg = fs::read_to_string(&plot).expect("--plot wrote the SVG");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for (label, points) in [
        ("gloo all_reduce fp32", 4),
        ("gloo all_gather fp32", 4),
        ("gloo (fp32)", 2),
    ] {
        let open = format!(r#"<g class="series" data-label="{label}">"#);
        let body = svg.split(&open).nth(1).expect(label);
        let body = &body[..body.find("</g>").unwrap()];
        assert_eq!(body.matches("<circle").count(), points, "{label}: {svg}");
    }
    assert_eq!(svg.matches(r#"<g class="series""#).count(), 3, "{svg}");
    let v = &rep["variants"][0];
    assert_eq!(v["variant"], "gloo");
    assert_eq!(v["error"], serde_json::Value::Null, "{v}");
    let rows = v["rows"].as_array().unwrap();
    // all_reduce and all_gather x fp32 (gloo has no bf16 reductions) x 4, 8, 16, 32 KiB
    assert_eq!(rows.len(), 8, "{v}");
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        assert_eq!(r["wrong"], 0, "{r}");
        assert!(r["time_us"].as_f64().unwrap() > 0.0, "{r}");
        let elem = if r["dtype"] == "bf16" { 2 } else { 4 };
        assert_eq!(r["size"].as_u64().unwrap() % (elem * 2), 0);
        seen.insert((
            r["op"].as_str().unwrap().to_string(),
            r["dtype"].as_str().unwrap().to_string(),
            r["size"].as_u64().unwrap(),
        ));
    }
    assert!(seen.contains(&("all_reduce".into(), "fp32".into(), 32768)));
    assert!(seen.contains(&("all_gather".into(), "fp32".into(), 4096)));
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(
        decode
            .iter()
            .map(|d| (
                d["ops"].as_u64().unwrap(),
                d["size"].as_u64().unwrap(),
                d["wrong"].as_u64().unwrap()
            ))
            .collect::<Vec<_>>(),
        [(64, 8192, 0), (160, 16384, 0)]
    );
    // A corrupted result is counted in #wrong and fails the run.
    let bad = run(
        halo_cfg().args(coll_args).args(["--inject-wrong", "5"]),
        600,
    );
    assert!(!bad.success, "a run with wrong results must fail");
    let rep: serde_json::Value = serde_json::from_str(&bad.stdout).unwrap();
    let v = &rep["variants"][0];
    for r in v["rows"].as_array().unwrap() {
        assert_eq!(r["wrong"], 5, "{r}");
    }
    assert_eq!(v["decode"][0]["wrong"], 5);
    let png = dir.path().join("collective.png");
    let text = run(
        halo_cfg()
            .args([
                "bench",
                "--collective",
                "--variants",
                "gloo",
                "--max-bytes",
                "4096",
                "--iters",
                "1",
                "--decode-steps",
                "1",
                "--dtypes",
                "fp32",
                "--plot",
            ])
            .arg(&png),
        600,
    );
    assert!(text.success);
    let bytes = fs::read(&png).expect("--plot wrote the PNG (rsvg-convert)");
    assert!(
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG of substance"
    );
    assert!(!text.stdout.contains("note:"), "{}", text.stdout);
    assert!(text.stdout.contains("#wrong"), "{}", text.stdout);
    assert!(
        text.stdout.contains("decode step: 64 x 8 KiB all-reduce"),
        "{}",
        text.stdout
    );
    println!(
        "TIMING bench --collective (3 runs): {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // serve: the stand-in joins the cluster and runs a task on the worker.
    let vllm = dir.path().join("vllm");
    write_fake_vllm(&vllm, &ray.with_file_name("python"));
    let record = dir.path().join("record.json");
    let port = free_port();
    let t = Instant::now();
    let serve = run(
        halo_cfg()
            .env("HALO_TEST_RECORD", &record)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "serve",
                "--clear-cache",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--tp",
                "2",
                "--max-model-len",
                "8192",
                "--wait-secs",
                "240",
                "--port",
            ])
            .arg(port.to_string())
            .arg("--vllm")
            .arg(&vllm)
            .args(["--", "--attention-backend", "TRITON_ATTN"]),
        300,
    );
    assert!(serve.success, "halo serve failed");
    // Workers first, over SSH, with the cluster's environment: they find the [env] paths.
    for d in ["vllm", "triton", "inductor"] {
        let path = caches.join(d);
        assert!(
            serve
                .stdout
                .contains(&format!("127.0.0.1: removed {}", path.display())),
            "{}",
            serve.stdout
        );
        assert!(!path.exists());
    }
    assert!(
        !serve.stdout.contains(CONFIG_SECRET) && !serve.stderr.contains(CONFIG_SECRET),
        "serve printed a token"
    );
    assert!(
        serve
            .stdout
            .contains("vLLM serves meta-llama/Llama-3.1-8B-Instruct (TP=2) at http://127.0.0.2:"),
        "{}",
        serve.stdout
    );
    println!(
        "TIMING serve (stand-in, Ray task on the worker): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    let argv: Vec<&str> = rec["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let port_s = port.to_string();
    assert_eq!(
        argv,
        [
            "serve",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--host",
            "0.0.0.0",
            "--port",
            port_s.as_str(),
            "--tensor-parallel-size",
            "2",
            "--distributed-executor-backend",
            "ray",
            "--gpu-memory-utilization",
            "0.90",
            "--enforce-eager",
            "--max-model-len",
            "8192",
            "--attention-backend",
            "TRITON_ATTN"
        ]
    );
    assert_eq!(rec["ray_nodes"], serde_json::json!([HEAD_IP, WORKER_IP]));
    let plugin_dir = dir.path().to_string_lossy().into_owned();
    let first_ld = |env: &serde_json::Value| {
        env["LD_LIBRARY_PATH"]
            .as_str()
            .and_then(|p| p.split(':').next())
            .map(str::to_string)
    };
    let head_env = &rec["env"];
    assert_eq!(head_env["NCCL_NET_PLUGIN"], "halo");
    assert_eq!(first_ld(head_env).as_deref(), Some(plugin_dir.as_str()));
    assert_eq!(head_env["VLLM_HOST_IP"], HEAD_IP);
    assert_eq!(head_env["RAY_ADDRESS"], format!("{HEAD_IP}:{ray_port}"));
    assert_eq!(head_env["HF_TOKEN"], CONFIG_SECRET);
    let worker = &rec["worker_env"];
    println!("worker task env: {worker}");
    assert_eq!(first_ld(worker).as_deref(), Some(plugin_dir.as_str()));
    for (k, v) in [
        ("NCCL_NET_PLUGIN", "halo"),
        ("NCCL_SOCKET_IFNAME", "lo"),
        ("GLOO_SOCKET_IFNAME", "lo"),
        ("NCCL_IB_HCA", "rxe0"),
        ("NCCL_IB_GID_INDEX", "1"),
        ("NCCL_NET_GDR_LEVEL", "SYS"),
        ("NCCL_IB_TIMEOUT", "23"),
        ("NCCL_IB_RETRY_CNT", "7"),
        ("RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES", "1"),
        ("RAY_DISABLE_METRICS", "1"),
        ("VLLM_HOST_IP", WORKER_IP),
        ("HALO_TEST_EXTRA", "from [env]"),
        ("HF_TOKEN", CONFIG_SECRET),
        ("HUGGING_FACE_HUB_TOKEN", ENV_SECRET),
        ("RAY_memory_monitor_refresh_ms", "0"),
    ] {
        assert_eq!(worker[k], v, "worker env {k}");
    }

    let t = Instant::now();
    let down = run(halo_cfg().args(["cluster", "down"]), 300);
    assert!(down.success, "cluster down failed");
    assert!(
        down.stdout.contains("127.0.0.1: no Ray processes left"),
        "{}",
        down.stdout
    );
    assert!(
        ray_processes().is_empty(),
        "left over:\n{}",
        ray_processes()
    );
    assert!(!dir.path().join("cluster.state.json").exists());
    println!("TIMING cluster down: {:.1} s", t.elapsed().as_secs_f64());
    println!(
        "TIMING cluster test total: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
