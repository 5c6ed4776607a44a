//! `halo serve` and `halo bench-serve` against the stand-in vLLM in
//! tests/fixtures/vllm/fake-vllm (no GPU, Ray or weights): what vLLM is given, and each trap a
//! user met — a port already taken, a vLLM that dies, another model answering on the port, a
//! token shown on a command line, a gated model guessed from its name, output held back.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{good_tree, halo, stderr, stdout};
use halo::process::run_bounded;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The stand-in, copied into `dir` with this machine's Python as its interpreter (so it still
/// runs when a test points HOME elsewhere).
fn fake_vllm(dir: &Path) -> PathBuf {
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed by the stand-in vLLM");
    let python = String::from_utf8(python.stdout).unwrap();
    let source = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm/fake-vllm"),
    )
    .unwrap();
    let script = source.replacen("#!/usr/bin/env python3", &format!("#!{}", python.trim()), 1);
    let path = dir.join("vllm");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A config from `cluster init` (head 192.168.100.1); `extra` TOML starting with `[env]`
/// replaces the empty [env] table, other TOML is appended.
fn config(dir: &Path, nodes: &[&str], extra: &str) -> PathBuf {
    let config = dir.join("cluster.toml");
    let mut init = halo();
    init.arg("--config").arg(&config).args(["cluster", "init"]);
    for n in nodes {
        init.args(["--node", n]);
    }
    let out = init.arg("--root").arg(good_tree()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    if !extra.is_empty() {
        let text = fs::read_to_string(&config).unwrap();
        let text = if extra.starts_with("[env]") {
            text.replacen("[env]\n", extra, 1)
        } else {
            format!("{text}\n{extra}\n")
        };
        fs::write(&config, text).unwrap();
    }
    config
}

const TWO_NODES: [&str; 2] = ["strix1=192.168.100.1", "strix2=192.168.100.2"];

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    vllm: PathBuf,
}

impl Setup {
    fn new(extra_toml: &str) -> Self {
        Self::with_nodes(&TWO_NODES, extra_toml)
    }

    fn with_nodes(nodes: &[&str], extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), nodes, extra_toml);
        let vllm = fake_vllm(dir.path());
        Setup { dir, config, vllm }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.path().join("record")
    }

    /// `halo --config C SUB …` with the stand-in, its record file, and no Hugging Face lookups.
    fn halo(&self, sub: &str) -> Command {
        let mut c = halo();
        c.env("HALO_VLLM", &self.vllm)
            .env("FAKE_VLLM_RECORD", self.record_path())
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HUGGING_FACE_HUB_TOKEN")
            .env_remove("FAKE_VLLM_MODE")
            .env_remove("FAKE_VLLM_DELAY")
            .arg("--config")
            .arg(&self.config)
            .arg(sub);
        c
    }

    fn records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.record_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn argv(&self, i: usize) -> Vec<String> {
        self.records()[i]["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}

fn both(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn serve_launches_vllm_with_the_cluster_env_and_waits_for_the_model() {
    let s = Setup::new("");
    let port = free_port().to_string();
    let out = s
        .halo("serve")
        .env("FAKE_VLLM_DELAY", "6")
        .env("HF_TOKEN", "hf_x")
        .args([
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
    let text = both(&out);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert_eq!(
        s.argv(0),
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
    let env = &s.records()[0]["env"];
    assert_eq!(env["NCCL_NET_PLUGIN"], "halo");
    assert_eq!(env["NCCL_IB_GID_INDEX"], "1");
    assert_eq!(env["VLLM_HOST_IP"], "192.168.100.1");
    assert_eq!(env["RAY_ADDRESS"], "192.168.100.1:6379");
    assert_eq!(env["HF_TOKEN"], "hf_x");
    assert_eq!(env["RAY_memory_monitor_refresh_ms"], "0");
    // While it starts: elapsed time and vLLM's last log line.
    assert!(
        text.contains("waiting for vLLM: ")
            && text
                .contains("nothing answers on the port yet; log: INFO fake-vllm: loading weights"),
        "{text}"
    );
    let log = s.dir.path().join(format!("vllm-serve-{port}.log"));
    assert!(
        stdout(&out).contains(&format!(
            "vLLM serves Qwen/Qwen3-8B (TP=2) at http://192.168.100.1:{port}/v1 (ready after "
        )),
        "{text}"
    );
    assert!(text.contains(&format!("log {}", log.display())), "{text}");
    // After ready, vLLM's log is shown as it comes.
    assert!(
        stdout(&out).contains("INFO fake-vllm: shutting down"),
        "{text}"
    );
    assert!(
        stdout(&out).contains("vLLM exited (exit status: 0)"),
        "{text}"
    );
    assert!(fs::read_to_string(log).unwrap().contains("loading weights"));
}

/// An HTTP server on `listener` that answers every request with a model list of `model`.
fn old_server(listener: TcpListener, model: &'static str) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = format!(r#"{{"object":"list","data":[{{"id":"{model}"}}]}}"#);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

#[test]
fn serve_refuses_a_port_already_taken_and_names_the_holder() {
    // Before: an older server answering 200 on the port made serve say "ready after 0 s"
    // while the new vLLM died with "address already in use".
    let s = Setup::new("");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    old_server(listener, "Qwen/Qwen3-8B");
    let out = s
        .halo("serve")
        .args([
            "Qwen/Qwen3-8B",
            "--port",
            &port.to_string(),
            "--wait-secs",
            "20",
        ])
        .output()
        .unwrap();
    let text = both(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        stderr(&out).contains(&format!(
            "port {port} is already in use: 127.0.0.1:{port} is held by pid {}",
            std::process::id()
        )),
        "{text}"
    );
    assert!(!text.contains("vLLM serves"), "{text}");
    assert!(s.records().is_empty(), "vLLM must not have been started");
}

#[test]
fn serve_fails_with_the_end_of_the_log_when_vllm_dies() {
    let s = Setup::new("");
    let port = free_port().to_string();
    let out = s
        .halo("serve")
        .env("FAKE_VLLM_MODE", "die")
        .args(["Qwen/Qwen3-8B", "--port", &port, "--wait-secs", "60"])
        .output()
        .unwrap();
    let text = both(&out);
    println!("{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("vLLM exited (exit status: 1) after ")
            && err.contains("before serving; last lines of ")
            && err.contains("INFO fake-vllm: starting the API server")
            && err.contains("[Errno 98] error while attempting to bind on address")
            && err.contains("address already in use"),
        "{text}"
    );
    assert!(!text.contains("vLLM serves"), "{text}");
}

#[test]
fn serve_does_not_call_another_model_ready_and_stops_its_vllm() {
    let s = Setup::new("");
    let port = free_port().to_string();
    // Bounded: the old serve called this ready and then waited on the stand-in forever.
    let out = run_bounded(
        s.halo("serve")
            .env("FAKE_VLLM_MODE", "wrong-model")
            .env("FAKE_VLLM_LIFETIME", "60")
            .args(["Qwen/Qwen3-8B", "--port", &port, "--wait-secs", "15"]),
        Duration::from_secs(90),
    )
    .expect("serve must give up at --wait-secs");
    let text = format!("{}{}", out.stdout, out.stderr);
    println!("{text}");
    assert_eq!(out.code, Some(1), "{text}");
    assert!(!text.contains("vLLM serves"), "{text}");
    assert!(
        out.stderr.contains(&format!(
            "vLLM did not serve Qwen/Qwen3-8B at http://127.0.0.1:{port}/v1/models within 15 s \
             (/v1/models lists other-org/other-model); stopped it"
        )),
        "{text}"
    );
    let pid = s.records()[0]["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the stand-in (pid {pid}) still runs"
    );
}

#[test]
fn eager_flags_and_config() {
    let s = Setup::new("");
    let run = |setup: &Setup, args: &[&str]| {
        let port = free_port().to_string();
        let out = setup
            .halo("serve")
            .args(["Qwen/Qwen3-8B", "--port", &port])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", both(&out));
    };
    run(&s, &[]);
    run(&s, &["--no-eager"]);
    run(&s, &["--no-eager", "--eager"]);
    let eager = |i: usize| s.argv(i).iter().any(|a| a == "--enforce-eager");
    assert!(eager(0), "eager by default");
    assert!(!eager(1), "--no-eager drops --enforce-eager");
    assert!(eager(2), "the last flag wins");

    let off = Setup::new("");
    let text = fs::read_to_string(&off.config)
        .unwrap()
        .replace("eager = true", "eager = false");
    fs::write(&off.config, text).unwrap();
    run(&off, &[]);
    run(&off, &["--eager"]);
    assert!(!off.argv(0).iter().any(|a| a == "--enforce-eager"));
    assert!(off.argv(1).iter().any(|a| a == "--enforce-eager"));
}

#[test]
fn extra_vllm_arguments_pass_through_and_name_the_served_model() {
    let s = Setup::new("");
    let port = free_port().to_string();
    let extra = [
        "--served-model-name",
        "qwen-chat",
        "--max-num-batched-tokens=4096",
        "--chat-template",
        "two words; $HOME",
    ];
    let out = s
        .halo("serve")
        .args(["Qwen/Qwen3-8B", "--port", &port, "--"])
        .args(extra)
        .output()
        .unwrap();
    let text = both(&out);
    assert!(out.status.success(), "{text}");
    let argv = s.argv(0);
    assert_eq!(argv[argv.len() - extra.len()..], extra);
    assert!(
        stdout(&out).contains("vLLM serves qwen-chat (TP=2)"),
        "{text}"
    );
    let out = s
        .halo("serve")
        .args(["Qwen/Qwen3-8B", "--", "--port", "9000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--port among the extra vLLM arguments"),
        "{}",
        both(&out)
    );
}

#[test]
fn clear_cache_erases_the_compile_caches_and_keeps_the_weights() {
    let s = Setup::with_nodes(&["strix1=192.168.100.1"], "");
    let home = s.dir.path().join("home");
    let tmp = s.dir.path().join("tmp");
    let caches = [
        home.join(".cache/vllm/torch_compile_cache/abc/rank_0_0"),
        home.join(".triton/cache/XYZ"),
        tmp.join("torchinductor_halotest/fx"),
    ];
    let weights = home.join(".cache/huggingface/hub/models--Qwen--Qwen3-8B");
    for d in caches.iter().chain([&weights]) {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("f"), "x").unwrap();
    }
    let port = free_port().to_string();
    let out = s
        .halo("serve")
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .env("USER", "halotest")
        .env("LOGNAME", "halotest")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("VLLM_CACHE_ROOT")
        .env_remove("TRITON_CACHE_DIR")
        .env_remove("TRITON_HOME")
        .env_remove("TORCHINDUCTOR_CACHE_DIR")
        .args(["Qwen/Qwen3-8B", "--port", &port, "--clear-cache"])
        .output()
        .unwrap();
    let text = both(&out);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    for removed in [
        home.join(".cache/vllm"),
        home.join(".triton/cache"),
        tmp.join("torchinductor_halotest"),
    ] {
        assert!(!removed.exists(), "{} is still there", removed.display());
        assert!(
            text.contains(&format!("strix1: removed {}", removed.display())),
            "{text}"
        );
    }
    assert!(weights.join("f").exists(), "the weights must be kept");
    assert!(home.join(".triton").exists());
    assert_eq!(
        s.records().len(),
        1,
        "vLLM starts after the caches are gone"
    );
}

#[test]
fn a_secret_under_env_reaches_vllm_but_no_output_or_file() {
    let secret = "hf_cfg_0123456789_secret";
    let s = Setup::new(&format!(
        "[env]\nHF_TOKEN = \"{secret}\"\nNCCL_DEBUG = \"INFO\"\n"
    ));
    let port = free_port().to_string();
    let out = s
        .halo("serve")
        .args(["Qwen/Qwen3-8B", "--port", &port])
        .output()
        .unwrap();
    let text = both(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(s.records()[0]["env"]["HF_TOKEN"], secret);
    assert!(!text.contains(secret), "{text}");
    for entry in fs::read_dir(s.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.ends_with("cluster.toml") || path.ends_with("record") || path.is_dir() {
            continue;
        }
        let content = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !content.contains(secret),
            "{} holds the token",
            path.display()
        );
    }
    // What a worker would run: the token is read from stdin, not written in its line.
    let cfg = halo::cluster::ClusterConfig::load(&s.config).unwrap();
    let worker = halo::cluster::ray_start_command(&cfg, &cfg.nodes[1], 1);
    let line = halo::process::describe(&worker.cmd);
    assert!(!line.contains(secret), "{line}");
    assert!(
        line.contains("IFS= read -r HF_TOKEN && export HF_TOKEN"),
        "{line}"
    );
    assert!(line.contains("NCCL_DEBUG=INFO"), "{line}");
    assert_eq!(
        worker.input.as_deref(),
        Some(format!("{secret}\n").as_str())
    );
}

/// A stand-in for the Hugging Face model API: `GET /api/models/ID` answers from `table`;
/// records the Authorization headers it saw.
fn hub(table: &'static [(&'static str, u16, &'static str)]) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if h.to_ascii_lowercase().starts_with("authorization:") {
                    seen2.lock().unwrap().push(h.trim().to_string());
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (code, body) = table
                .iter()
                .find(|(id, _, _)| path == format!("/api/models/{id}"))
                .map_or((404, "{}"), |(_, c, b)| (*c, *b));
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn missing_token_warnings_come_from_the_hub_not_the_name() {
    static TABLE: [(&str, u16, &str); 3] = [
        (
            "google/gemma-2-27b-it",
            200,
            r#"{"id":"google/gemma-2-27b-it","gated":"manual"}"#,
        ),
        (
            "meta-llama/Llama-3.1-8B-Instruct",
            200,
            r#"{"id":"meta-llama/Llama-3.1-8B-Instruct","gated":false}"#,
        ),
        ("org/private", 401, r#"{"error":"Invalid credentials"}"#),
    ];
    let (url, seen) = hub(&TABLE);
    let s = Setup::new("");
    let serve = |model: &str, token: Option<&str>, endpoint: &str| {
        let port = free_port().to_string();
        let mut c = s.halo("serve");
        c.env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", endpoint)
            .args([model, "--port", &port]);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{model}: {}", both(&out));
        both(&out)
    };
    // Gated by the Hub's answer (the guide's own model; the old name rule let it pass).
    let text = serve("google/gemma-2-27b-it", None, &url);
    assert!(
        text.contains(
            "halo: warning: google/gemma-2-27b-it is gated on Hugging Face (manual approval) and \
             HF_TOKEN is not set: downloading its weights will fail on every node that does not \
             have them cached"
        ),
        "{text}"
    );
    // Not gated says the Hub, whatever the name (the old rule refused all of meta-llama/*).
    let text = serve("meta-llama/Llama-3.1-8B-Instruct", None, &url);
    assert!(!text.contains("warning"), "{text}");
    // With a token: no warning, and the token went in a header, not in any output.
    let text = serve("google/gemma-2-27b-it", Some("hf_hub_token_42"), &url);
    assert!(
        !text.contains("warning") && !text.contains("hf_hub_token_42"),
        "{text}"
    );
    assert!(
        seen.lock()
            .unwrap()
            .contains(&"Authorization: Bearer hf_hub_token_42".to_string()),
        "{:?}",
        seen.lock().unwrap()
    );
    let text = serve("org/private", None, &url);
    assert!(
        text.contains("Hugging Face does not show org/private without a token (HTTP 401)"),
        "{text}"
    );
    let dead = format!("http://127.0.0.1:{}", free_port());
    let text = serve("org/anything", None, &dead);
    assert!(
        text.contains("could not ask Hugging Face whether org/anything needs a token"),
        "{text}"
    );
}

#[test]
fn bench_serve_streams_vllm_output_and_prints_json() {
    let s = Setup::new("");
    let go = s.dir.path().join("go");
    let mut child = s
        .halo("bench-serve")
        .env("FAKE_VLLM_GO", &go)
        .args([
            "Qwen/Qwen3-8B",
            "--num-prompts",
            "20",
            "--output-len",
            "64",
            "--json",
            "--no-eager",
            "--",
            "--seed",
            "7",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The stand-in waits until this test has seen its output while it runs: only streamed
    // output gets it to the Throughput line (captured output came after the run).
    let err = child.stderr.take().unwrap();
    let go2 = go.clone();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(err).lines() {
            let line = line.unwrap();
            if line.contains("| INFO fake-vllm: waiting for go") {
                fs::write(&go2, "").unwrap();
            }
            lines.push(line);
        }
        lines
    });
    let mut json = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut json)
        .unwrap();
    let status = child.wait().unwrap();
    let err = reader.join().unwrap().join("\n");
    println!("{err}");
    assert!(status.success(), "{json}{err}");
    assert!(
        err.contains("TP=1 | INFO fake-vllm: bench throughput at TP=1"),
        "{err}"
    );
    assert!(err.contains("TP=2 | Processed prompts: 10%|#|"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["model"], "Qwen/Qwen3-8B");
    assert_eq!(report["eager"], false);
    assert_eq!(report["runs"][0]["tp"], 1);
    assert_eq!(report["runs"][0]["total_tokens_per_s"], 388.0);
    assert_eq!(report["runs"][1]["tp"], 2);
    assert_eq!(report["runs"][1]["total_tokens_per_s"], 776.0);
    assert_eq!(report["speedup"], 2.0);
    let argv1 = s.argv(0);
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
            "--num-prompts",
            "20",
            "--output-len",
            "64",
            "--input-len",
            "1024",
            "--seed",
            "7"
        ]
    );
    let argv2 = s.argv(1);
    assert!(argv2
        .windows(2)
        .any(|w| w == ["--tensor-parallel-size", "2"]));
    assert!(argv2
        .windows(2)
        .any(|w| w == ["--distributed-executor-backend", "ray"]));
    assert_eq!(s.records()[1]["env"]["NCCL_NET_PLUGIN"], "halo");
}

#[test]
fn bench_serve_table() {
    let s = Setup::new("");
    let out = s
        .halo("bench-serve")
        .args(["Qwen/Qwen3-8B", "--num-prompts", "20"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        text.contains("total tokens/s        388.00      776.00     2.00x"),
        "{text}"
    );
    assert!(
        text.contains("TP=1 | Throughput: 1.50 requests/s"),
        "{text}"
    );
}

#[test]
fn serve_refuses_bad_memory_settings_before_launching() {
    let s = Setup::new("");
    let out = s
        .halo("serve")
        .args(["Qwen/Qwen3-8B", "--gpu-memory-utilization", "0.95"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refusing --gpu-memory-utilization 0.95: it must be in (0, 0.9]"),
        "{}",
        stderr(&out)
    );
    assert!(s.records().is_empty(), "vLLM must not have been started");
}
