//! `cluster status` and `cluster up` when something is wrong, without Ray: no head listening,
//! `ray status` failing, `ray` missing, and every SSH failure kind against a real sshd on
//! 127.0.0.1 — each must say what is wrong, quickly, and `up` must start nothing.

mod common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::cluster::{free_port, run, start_sshd};
use common::halo;

const HEAD_IP: &str = "127.0.0.2";

/// A config with the head on 127.0.0.2:`ray_port` and, when `worker` is given, a worker reached
/// over SSH at 127.0.0.1 with the `[ssh]` table `ssh`.
fn write_config(dir: &Path, ray_port: u16, worker: Option<&str>) -> PathBuf {
    let config = dir.join("cluster.toml");
    let mut text = format!(
        r#"[ray]
port = {ray_port}
executable = "ray"
num_cpus = 1
wait_secs = 1

[rccl]
plugin = "/opt/halo/lib/librccl-net-halo.so"
gdr_level = "SYS"
ib_timeout = 23
ib_retry_cnt = 7

[[nodes]]
host = "head"
ip = "{HEAD_IP}"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1
"#
    );
    if let Some(ssh) = worker {
        text = text.replace("[[nodes]]", &format!("{ssh}\n[[nodes]]"));
        text.push_str(
            r#"
[[nodes]]
host = "127.0.0.1"
ip = "127.0.0.3"
iface = "lo"
rdma_device = "rxe0"
gid_index = 1
"#,
        );
    }
    fs::write(&config, text).unwrap();
    config
}

fn halo_with(config: &Path, ray: &str) -> Command {
    let mut c = halo();
    c.env("HALO_RAY", ray).arg("--config").arg(config);
    c
}

#[test]
fn status_with_no_head_says_so_within_seconds() {
    let _nodes = common::cluster::loopback_nodes();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, None);
    let t = Instant::now();
    // The real `ray status` would retry for ~40 s here; halo must not get that far.
    let out = run(
        halo_with(&config, "/bin/false").args(["cluster", "status"]),
        60,
    );
    let secs = t.elapsed().as_secs_f64();
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!(
            "no Ray head answers at {HEAD_IP}:{port} (connection refused): the cluster is down; `halo cluster up` starts it"
        )),
        "{}",
        out.stderr
    );
    assert!(secs < 5.0, "took {secs:.1} s");

    let json = run(
        halo_with(&config, "/bin/false").args(["cluster", "status", "--json"]),
        60,
    );
    assert!(!json.success);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("no Ray head answers"),
        "{v}"
    );
}

#[test]
fn status_reports_why_ray_status_failed() {
    let _nodes = common::cluster::loopback_nodes();
    let dir = tempfile::tempdir().unwrap();
    // Something listens at the head's port; `ray` is /bin/false (HALO_RAY=/bin/false).
    let listener = TcpListener::bind((HEAD_IP, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = write_config(dir.path(), port, None);
    let out = run(
        halo_with(&config, "/bin/false").args(["cluster", "status"]),
        60,
    );
    assert!(!out.success);
    // The old outcome was "0 of 1 nodes active" with no reason.
    assert!(
        out.stderr.contains("ray status failed (exit 1): no output"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("nodes active"), "{}", out.stdout);
    drop(listener);
}

#[test]
fn up_names_a_missing_ray_before_starting_anything() {
    let _nodes = common::cluster::loopback_nodes();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), None);
    let out = run(
        halo_with(&config, "/nonexistent/bin/ray").args(["cluster", "up"]),
        60,
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("nothing was started")
            && out.stderr.contains(
                "node head (127.0.0.2): `/nonexistent/bin/ray` not found inside the host"
            ),
        "{}",
        out.stderr
    );
}

/// A stand-in `ray` that records each call and succeeds.
fn recording_ray(dir: &Path) -> (PathBuf, PathBuf) {
    let ray = dir.join("fake-ray");
    let calls = dir.join("ray-calls");
    fs::write(
        &ray,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    fs::set_permissions(&ray, fs::Permissions::from_mode(0o755)).unwrap();
    (ray, calls)
}

#[test]
fn up_checks_ssh_to_every_node_before_starting_anything() {
    let _nodes = common::cluster::loopback_nodes();
    let sshd_bin = Path::new("/usr/sbin/sshd");
    if !sshd_bin.is_file() {
        assert!(
            std::env::var("HALO_SKIP_CLUSTER_TESTS").as_deref() == Ok("1"),
            "/usr/sbin/sshd missing: run scripts/setup-harness.sh (or set HALO_SKIP_CLUSTER_TESTS=1)"
        );
        println!("SKIPPED: /usr/sbin/sshd missing (HALO_SKIP_CLUSTER_TESTS=1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(sshd_bin, dir.path());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".to_string());
    let (ray, calls) = recording_ray(dir.path());
    let ray = ray.to_str().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    let ssh_table = |port: u16, key: &Path, accept_new: bool| {
        format!(
            "[ssh]\nuser = \"{user}\"\nport = {port}\nkey = \"{}\"\naccept_new_host_keys = {accept_new}\n\
             options = [\"UserKnownHostsFile={}\", \"GlobalKnownHostsFile=/dev/null\", \"LogLevel=ERROR\"]\n",
            key.display(),
            known_hosts.display()
        )
    };
    let ray_port = free_port();

    // 1. Unknown host key under BatchMode: the old code started the head, then failed with
    //    ssh's bare "Host key verification failed.".
    let config = write_config(
        dir.path(),
        ray_port,
        Some(&ssh_table(sshd.port, &sshd.client_key, false)),
    );
    let out = run(halo_with(&config, ray).args(["cluster", "up"]), 60);
    assert!(!out.success);
    assert!(
        out.stderr.contains("nothing was started")
            && out
                .stderr
                .contains("node 127.0.0.1 (127.0.0.3): host key verification failed for 127.0.0.1")
            && out.stderr.contains("accept_new_host_keys = true"),
        "{}",
        out.stderr
    );
    assert!(
        !calls.exists(),
        "ray was run: {:?}",
        fs::read_to_string(&calls)
    );

    // 2. Wrong key: authentication fails (host key accepted on the way).
    let stranger = dir.path().join("stranger");
    let kg = run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger),
        30,
    );
    assert!(kg.success);
    let config = write_config(
        dir.path(),
        ray_port,
        Some(&ssh_table(sshd.port, &stranger, true)),
    );
    let out = run(halo_with(&config, ray).args(["cluster", "up"]), 60);
    assert!(!out.success);
    assert!(
        out.stderr
            .contains(&format!("SSH authentication to {user}@127.0.0.1 failed"))
            && out.stderr.contains("ssh-copy-id"),
        "{}",
        out.stderr
    );
    assert!(!calls.exists());

    // 3. Nothing listens on the SSH port.
    let closed = free_port();
    let config = write_config(
        dir.path(),
        ray_port,
        Some(&ssh_table(closed, &sshd.client_key, true)),
    );
    let out = run(halo_with(&config, ray).args(["cluster", "up"]), 60);
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!(
            "nothing accepts SSH connections on 127.0.0.1 port {closed} (connection refused)"
        )),
        "{}",
        out.stderr
    );
    assert!(!calls.exists());

    // 4. accept_new_host_keys = true (the key is recorded now): SSH passes, Ray is started on
    //    both nodes with the detected GPU count, then the stand-in head never answers.
    let config = write_config(
        dir.path(),
        ray_port,
        Some(&ssh_table(sshd.port, &sshd.client_key, true)),
    );
    let out = run(halo_with(&config, ray).args(["cluster", "up"]), 120);
    assert!(!out.success);
    assert!(!out.stderr.contains("host key"), "{}", out.stderr);
    let recorded = fs::read_to_string(&calls).unwrap();
    let gpus = common::cluster::host_gpus();
    assert!(
        recorded.contains(&format!(
            "start --head --port={ray_port} --node-ip-address=127.0.0.2 --num-gpus={gpus} --num-cpus=1 --resources={{\"halo_node_127.0.0.2\": 1}}"
        )) && recorded.contains(&format!(
            "start --address=127.0.0.2:{ray_port} --node-ip-address=127.0.0.3 --num-gpus={gpus}"
        )),
        "{recorded}"
    );
    assert!(
        out.stdout.contains(&format!(
            "127.0.0.1 (127.0.0.3) in the host: ray {ray}, {gpus} GPU"
        )),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("no Ray head answers"), "{}", out.stderr);

    // 5. `doctor --peer` reaches a node of the config with the config's SSH settings (port, key,
    //    known_hosts) and runs the peer's doctor in its runtime; a plain `ssh 127.0.0.1` would
    //    have gone to port 22.
    let out = run(
        halo()
            .arg("--config")
            .arg(&config)
            .env("PATH", "/usr/bin:/bin")
            .args(["doctor", "--json", "--peer", "127.0.0.1"]),
        120,
    );
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let ssh = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "peer.ssh.127.0.0.1")
        .unwrap();
    assert_eq!(ssh["verdict"], "pass", "{ssh}");
    // No halo on the SSH session's PATH here (where there is one, its full report came back).
    let remote = &report["peers"][0]["checks"];
    let first = remote[0]["value"].as_str().unwrap_or_default();
    assert!(
        first.contains("`halo doctor --json` in the host on 127.0.0.1 gave no report")
            || remote.as_array().unwrap().len() > 1,
        "{remote}"
    );
}
