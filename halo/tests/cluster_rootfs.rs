//! The cluster where users run it: inside a container. Ray exists only in a separate Debian root
//! filesystem (built by scripts/setup-harness.sh), not on this host; both "nodes" (head
//! 127.0.0.2 here, worker 127.0.0.3 over a real sshd on 127.0.0.1) enter it through
//! `engine = "command"` (`unshare --mount … chroot ROOT`), the same wrapping code as podman,
//! toolbox and distrobox. The run: a head left from an earlier attempt, then `cluster up`
//! (keeps the head, starts the missing worker), `up` again (nothing to do), `status` (2 nodes,
//! GPUs as detected; a node not running is named), `halo bench --collective` with its ranks
//! inside (gloo, checked results; each rank reports the root filesystem's Python and torch),
//! `ray status` failing, `up --restart`, `down`, and `status` on the stopped cluster (quick,
//! with the reason).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{
    free_port, host_gpus, on_path, ray_processes, run, start_sshd, ClusterGuard,
};
use common::halo;
use halo::process::run_bounded;

const HEAD_IP: &str = "127.0.0.2";
const WORKER_IP: &str = "127.0.0.3";

/// The root filesystem with Ray inside, or why not (fails unless HALO_SKIP_CLUSTER_TESTS=1).
fn rootfs() -> Option<PathBuf> {
    let root = std::env::var_os("HALO_HARNESS_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/halo-harness/rootfs")
        });
    let built = root.join(".halo-rootfs").is_file();
    // The collective ranks import Debian's torch through /opt/ray's system site packages.
    let torch = root
        .join("usr/lib/python3/dist-packages/torch/__init__.py")
        .is_file()
        && fs::read_to_string(root.join("opt/ray/pyvenv.cfg"))
            .is_ok_and(|c| c.contains("include-system-site-packages = true"));
    let missing: Vec<String> = [
        (!built, format!("root filesystem {}", root.display())),
        (
            built && !torch,
            format!(
                "torch for the collective ranks in {} (built by an older scripts/setup-harness.sh)",
                root.display()
            ),
        ),
        (
            !Path::new("/usr/sbin/sshd").is_file(),
            "/usr/sbin/sshd".to_string(),
        ),
        (!on_path("unshare"), "unshare".to_string()),
    ]
    .into_iter()
    .filter_map(|(gone, what)| gone.then_some(what))
    .collect();
    common::cluster::prerequisites_met("container-runtime cluster test", &missing).then_some(root)
}

/// `[runtime]` entering `root` with the host's /proc, /sys and /dev, in a private mount
/// namespace (mounts vanish with the last process in it).
fn runtime_table(root: &Path) -> String {
    format!(
        "[runtime]\nengine = \"command\"\nenter = ['unshare', '--mount', '--propagation', 'private', '--', 'sh', '-c', \
         'mount --rbind /proc \"$0/proc\" && mount --rbind /sys \"$0/sys\" && mount --rbind /dev \"$0/dev\" && exec chroot \"$0\" \"$@\"', \
         '{}']\n",
        root.display()
    )
}

fn node_table(host: &str, ip: &str) -> String {
    format!(
        "[[nodes]]\nhost = \"{host}\"\nip = \"{ip}\"\niface = \"lo\"\nrdma_device = \"rxe0\"\ngid_index = 1\n\n"
    )
}

/// Every Ray daemon of these nodes runs with `root` as its root directory.
fn assert_daemons_inside(root: &Path) {
    let listing = ray_processes(&[HEAD_IP, WORKER_IP]);
    let mut seen = 0;
    for line in listing.lines() {
        let pid = line.split_whitespace().next().unwrap();
        let proc_root = fs::read_link(format!("/proc/{pid}/root")).unwrap();
        assert_eq!(
            proc_root,
            root.canonicalize().unwrap(),
            "not inside the root filesystem: {line}"
        );
        seen += 1;
    }
    // Head: GCS server and raylet; worker: raylet.
    assert!(seen >= 3, "{listing}");
}

/// `halo bench --collective` (gloo, CI-sized) on the running cluster: every result checked,
/// and each rank reports a Python that exists only inside `root` (a process cannot run a
/// program its root directory does not hold), importing the root filesystem's torch.
fn collective_inside(root: &Path, mut halo: std::process::Command) {
    let coll = run(
        halo.args([
            "bench",
            "--collective",
            "--variants",
            "gloo",
            "--max-bytes",
            "8192",
            "--iters",
            "2",
            "--decode-steps",
            "1",
            "--json",
        ]),
        300,
    );
    assert!(coll.success, "bench --collective failed");
    let rep: serde_json::Value = serde_json::from_str(&coll.stdout).unwrap();
    assert_eq!(rep["ranks"], 2, "{rep}");
    let v = &rep["variants"][0];
    assert_eq!(v["variant"], "gloo");
    assert_eq!(v["error"], serde_json::Value::Null, "{v}");
    // all_reduce and all_gather x fp32 x 4 and 8 KiB, then the two decode shapes.
    let rows: Vec<(String, u64, u64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["time_us"].as_f64().unwrap() > 0.0, "{r}");
            (
                format!(
                    "{} {}",
                    r["op"].as_str().unwrap(),
                    r["dtype"].as_str().unwrap()
                ),
                r["size"].as_u64().unwrap(),
                r["wrong"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64, u64)> = [
        ("all_reduce fp32", 4096),
        ("all_reduce fp32", 8192),
        ("all_gather fp32", 4096),
        ("all_gather fp32", 8192),
    ]
    .into_iter()
    .map(|(k, size)| (k.to_string(), size, 0))
    .collect();
    println!("collective rows (op type, size, #wrong): {rows:?}");
    assert_eq!(rows, want, "{v}");
    let decode: Vec<(u64, u64, u64)> = v["decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["ops"].as_u64().unwrap(),
                d["size"].as_u64().unwrap(),
                d["wrong"].as_u64().unwrap(),
            )
        })
        .collect();
    println!("collective decode rows (ops, size, #wrong): {decode:?}");
    assert_eq!(decode, [(64, 8192, 0), (160, 16384, 0)], "{v}");

    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2, "{v}");
    for (i, (r, ip)) in ranks.iter().zip([HEAD_IP, WORKER_IP]).enumerate() {
        println!("rank {i} saw: {r}");
        assert_eq!(
            (r["rank"].as_u64(), r["node_ip"].as_str()),
            (Some(i as u64), Some(ip))
        );
        let python = r["python"].as_str().unwrap();
        assert!(python.starts_with("/opt/ray/bin/python"), "{r}");
        assert_eq!(r["prefix"], "/opt/ray", "{r}");
        assert_eq!(
            r["torch_path"], "/usr/lib/python3/dist-packages/torch",
            "{r}"
        );
        assert!(
            !Path::new(python).exists() && root.join(&python[1..]).exists(),
            "{python} must exist inside {} and not on the host",
            root.display()
        );
    }
    assert_ne!(ranks[0]["pid"], ranks[1]["pid"]);
}

#[test]
fn up_status_down_with_ray_only_inside_a_root_filesystem() {
    let _nodes = common::cluster::loopback_nodes();
    let Some(root) = rootfs() else {
        return;
    };
    let started = Instant::now();
    // The point of the test: the host has no Ray, so any command not wrapped would fail.
    assert!(!on_path("ray"), "`ray` is on this host's PATH");
    assert!(
        ray_processes(&[HEAD_IP, WORKER_IP]).is_empty(),
        "Ray processes for {HEAD_IP}/{WORKER_IP} already running:\n{}",
        ray_processes(&[HEAD_IP, WORKER_IP])
    );
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(Path::new("/usr/sbin/sshd"), dir.path());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".to_string());
    let ray_port = free_port();
    let head_config = |nodes: &str| {
        format!(
            "[ray]\nport = {ray_port}\nexecutable = \"ray\"\nnum_cpus = 1\nwait_secs = 90\n\n\
             [rccl]\nplugin = \"/opt/halo/lib/librccl-net-halo.so\"\ngdr_level = \"SYS\"\nib_timeout = 23\nib_retry_cnt = 7\n\n\
             {}\n\
             [ssh]\nuser = \"{user}\"\nport = {}\nkey = \"{}\"\naccept_new_host_keys = true\n\
             options = [\"UserKnownHostsFile={}\", \"GlobalKnownHostsFile=/dev/null\", \"LogLevel=ERROR\"]\n\n{nodes}",
            runtime_table(&root),
            sshd.port,
            sshd.client_key.display(),
            dir.path().join("known_hosts").display()
        )
    };
    let both = format!(
        "{}{}",
        node_table("head", HEAD_IP),
        node_table("127.0.0.1", WORKER_IP)
    );
    let config = dir.path().join("cluster.toml");
    fs::write(&config, head_config(&both)).unwrap();
    let _guard = ClusterGuard {
        config: &config,
        ray: None,
        ips: [HEAD_IP, WORKER_IP],
    };
    let halo_cfg = |cfg: &Path| {
        let mut c = halo();
        c.env_remove("HALO_RAY").arg("--config").arg(cfg);
        c
    };
    let gpus = host_gpus();
    let gpu_words = |n: u32| {
        if n == 1 {
            "1 GPU".to_string()
        } else {
            format!("{n} GPUs")
        }
    };

    // A first attempt that got as far as the head (the head-only config of the same cluster).
    let t = Instant::now();
    let head_only = dir.path().join("head-only.toml");
    fs::write(&head_only, head_config(&node_table("head", HEAD_IP))).unwrap();
    let up = run(halo_cfg(&head_only).args(["cluster", "up"]), 300);
    assert!(up.success, "cluster up (head only) failed");
    assert!(
        up.stdout
            .contains("head (127.0.0.2) in `unshare --mount --propagation private -- sh -c")
            && up.stdout.contains(": ray /usr/local/bin/ray, "),
        "{}",
        up.stdout
    );
    println!("TIMING head only: {:.1} s", t.elapsed().as_secs_f64());

    // The retry keeps the running head and starts only the worker (the old code died with
    // Ray's "already running" traceback).
    let t = Instant::now();
    let up = run(halo_cfg(&config).args(["cluster", "up"]), 300);
    assert!(up.success, "cluster up failed");
    for want in [
        format!(
            "Ray head already running at {HEAD_IP}:{ray_port}: 1 of 2 configured nodes active, missing: 127.0.0.1 (127.0.0.3)"
        ),
        "[1/2] head head (127.0.0.2): already running".to_string(),
        // The config's ssh options come first (ssh keeps the first value), then halo's own.
        "[2/2] worker 127.0.0.1 (127.0.0.3): ssh -o UserKnownHostsFile=".to_string(),
        "-o StrictHostKeyChecking=accept-new -o BatchMode=yes -o ConnectTimeout=5".to_string(),
        format!(
            "cluster up: 2 nodes active, {} at {HEAD_IP}:{ray_port}",
            gpu_words(2 * gpus)
        ),
    ] {
        assert!(up.stdout.contains(&want), "no {want:?} in:\n{}", up.stdout);
    }
    let worker_line = up
        .stdout
        .lines()
        .find(|l| l.starts_with("[2/2] worker"))
        .unwrap();
    assert!(
        worker_line.contains("unshare --mount --propagation private")
            && worker_line.contains(&root.display().to_string())
            && worker_line.contains("--num-gpus="),
        "{worker_line}"
    );
    assert_daemons_inside(&root);
    println!(
        "TIMING up (worker added): {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Again: nothing to start.
    let up = run(halo_cfg(&config).args(["cluster", "up"]), 300);
    assert!(up.success);
    assert!(
        up.stdout.contains("2 of 2 configured nodes active")
            && up
                .stdout
                .contains("[2/2] worker 127.0.0.1 (127.0.0.3): already running")
            && !up.stdout.contains("ray start"),
        "{}",
        up.stdout
    );

    // The collective ranks, one per node, run inside the root filesystem too.
    let t = Instant::now();
    collective_inside(&root, halo_cfg(&config));
    println!(
        "TIMING bench --collective inside: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let status = run(halo_cfg(&config).args(["cluster", "status", "--json"]), 120);
    assert!(status.success);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["active_nodes"], 2, "{s}");
    assert_eq!(s["expected_nodes"], 2);
    assert_eq!(s["gpus_total"].as_f64(), Some(2.0 * gpus as f64), "{s}");
    for (i, ip) in [HEAD_IP, WORKER_IP].into_iter().enumerate() {
        assert_eq!(s["nodes"][i]["ip"], ip);
        assert_eq!(s["nodes"][i]["active"], true);
        assert_eq!(s["nodes"][i]["gpus"].as_f64(), Some(gpus as f64));
    }
    let status = run(halo_cfg(&config).args(["cluster", "status"]), 120);
    assert!(status.success);
    assert!(
        status.stdout.contains("2 of 2 nodes active")
            && status.stdout.contains(&format!(
                "node head (127.0.0.2): active, {}",
                gpu_words(gpus)
            )),
        "{}",
        status.stdout
    );

    // A configured node that is not running is named.
    let three = dir.path().join("three.toml");
    fs::write(
        &three,
        head_config(&format!("{both}{}", node_table("ghost", "127.0.0.4"))),
    )
    .unwrap();
    let status = run(halo_cfg(&three).args(["cluster", "status"]), 120);
    assert!(!status.success);
    assert!(
        status.stdout.contains("2 of 3 nodes active")
            && status.stdout.contains("node ghost (127.0.0.4) missing"),
        "{}",
        status.stdout
    );

    // `ray status` itself failing is an error with its reason, not "0 nodes".
    let status = run(
        halo_cfg(&config)
            .env("HALO_RAY", "/bin/false")
            .args(["cluster", "status"]),
        120,
    );
    assert!(!status.success);
    assert!(
        status.stderr.contains("ray status failed (exit 1)"),
        "{}",
        status.stderr
    );

    // --restart stops the running cluster first.
    let t = Instant::now();
    let up = run(halo_cfg(&config).args(["cluster", "up", "--restart"]), 400);
    assert!(up.success, "cluster up --restart failed");
    assert!(
        up.stdout
            .contains("--restart stops Ray on every node first")
            && up
                .stdout
                .contains("[1/2] head head (127.0.0.2): unshare --mount")
            && up.stdout.contains("cluster up: 2 nodes active"),
        "{}",
        up.stdout
    );
    assert_daemons_inside(&root);
    println!("TIMING up --restart: {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let down = run(halo_cfg(&config).args(["cluster", "down"]), 300);
    assert!(down.success, "cluster down failed");
    assert!(
        down.stdout.contains("127.0.0.1: no Ray processes left"),
        "{}",
        down.stdout
    );
    assert!(
        ray_processes(&[HEAD_IP, WORKER_IP]).is_empty(),
        "left over:\n{}",
        ray_processes(&[HEAD_IP, WORKER_IP])
    );
    println!("TIMING down: {:.1} s", t.elapsed().as_secs_f64());

    // The stopped cluster: a quick answer with the reason.
    let t = Instant::now();
    let status = run(halo_cfg(&config).args(["cluster", "status"]), 60);
    assert!(!status.success);
    assert!(
        status.stderr.contains(&format!(
            "no Ray head answers at {HEAD_IP}:{ray_port} (connection refused)"
        )),
        "{}",
        status.stderr
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    println!(
        "TIMING container-runtime cluster test total: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Removes the test's podman container however the test ends.
struct PodmanGuard(String);

impl Drop for PodmanGuard {
    fn drop(&mut self) {
        let _ = run_bounded(
            std::process::Command::new("podman").args(["rm", "--force", "--ignore", &self.0]),
            Duration::from_secs(60),
        );
    }
}

/// The same probe through real `podman exec`, in a container made from the root filesystem.
/// Where podman cannot start containers (e.g. a VM without CAP_SYS_RESOURCE, where crun's
/// setrlimit fails) it says so and skips.
#[test]
fn podman_runtime_enters_a_real_container() {
    let _nodes = common::cluster::loopback_nodes();
    if !on_path("podman") {
        println!("SKIPPED: podman not installed");
        return;
    }
    let Some(root) = rootfs() else {
        return;
    };
    let name = format!("halo-test-{}", std::process::id());
    let _guard = PodmanGuard(name.clone());
    let started = run(
        std::process::Command::new("podman")
            .args([
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "host",
                "--rootfs",
            ])
            .arg(&root)
            .args(["sleep", "600"]),
        180,
    );
    if !started.success {
        let why = started
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        println!("SKIPPED: podman cannot start a container here: {why}");
        return;
    }
    let node = halo::cluster::Node {
        host: "head".into(),
        ip: HEAD_IP.into(),
        iface: "lo".into(),
        rdma_device: "rxe0".into(),
        gid_index: 1,
        ssh_user: None,
        ssh_port: None,
        ray: None,
        runtime: None,
    };
    let mut cfg = halo::cluster::ClusterConfig::new(vec![node], None);
    cfg.runtime = halo::cluster::Runtime::Podman { name: name.clone() };
    let head = cfg.head().clone();
    let facts = halo::cluster::probe::probe_node(&cfg, &head).expect("probe inside podman");
    assert_eq!(facts.ray.as_deref(), Some("/usr/local/bin/ray"));
    assert_eq!(facts.gpus.count, host_gpus());
    let env = [("HALO_PROBE".to_string(), "inside".to_string())];
    let out = run(
        &mut cfg.command(
            &head,
            &env,
            &[
                "sh".into(),
                "-c".into(),
                "echo $HALO_PROBE; cat /.halo-rootfs".into(),
            ],
        ),
        60,
    );
    assert!(out.success);
    assert!(out.stdout.starts_with("inside\nray "), "{}", out.stdout);
}
