//! What the cluster tests share: free ports, the harness's Ray, a real OpenSSH server on
//! 127.0.0.1 with its own host and client keys, and bounded runs that echo their output.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use halo::process::run_bounded;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn harness_ray() -> Option<PathBuf> {
    if let Ok(r) = std::env::var("HALO_RAY") {
        return Some(PathBuf::from(r)).filter(|p| p.is_file());
    }
    let venv = std::env::var_os("HALO_HARNESS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/halo-harness/venv-system")
        });
    let ray = venv.join("bin/ray");
    ray.is_file().then_some(ray)
}

pub fn run(cmd: &mut Command, limit_secs: u64) -> halo::process::Captured {
    let out = run_bounded(cmd, Duration::from_secs(limit_secs)).unwrap();
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    out
}

pub struct Sshd {
    child: Child,
    pub port: u16,
    pub client_key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_sshd(sshd: &Path, dir: &Path) -> Sshd {
    let keygen = |path: &Path| {
        let out = run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path),
            30,
        );
        assert!(out.success, "ssh-keygen failed");
    };
    let host_key = dir.join("host_ed25519");
    let client_key = dir.join("client_ed25519");
    keygen(&host_key);
    keygen(&client_key);
    fs::copy(dir.join("client_ed25519.pub"), dir.join("authorized_keys")).unwrap();
    // sshd refuses to start without its privilege-separation directory.
    fs::create_dir_all("/run/sshd").unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPidFile {}\n",
            host_key.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let server = Sshd {
        child,
        port,
        client_key,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not listen: {}",
            fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
    server
}

/// True when `name` is an executable file in a directory of this process's PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Raylets and GCS servers of the nodes with these cluster IPs (`pgrep -af` lines).
pub fn ray_processes(ips: &[&str]) -> String {
    let ips: Vec<String> = ips.iter().map(|ip| ip.replace('.', "\\.")).collect();
    let pattern = format!(
        "(raylet/raylet|gcs/gcs_server) .*node[-_]ip[-_]address=({})( |$)",
        ips.join("|")
    );
    let out = run_bounded(
        Command::new("pgrep").arg("-af").arg(pattern),
        Duration::from_secs(10),
    )
    .unwrap();
    out.stdout
}

/// GPUs of this machine as `cluster up` counts them: KFD topology nodes with SIMDs or a gfx target.
pub fn host_gpus() -> u32 {
    let Ok(nodes) = fs::read_dir("/sys/class/kfd/kfd/topology/nodes") else {
        return 0;
    };
    let mut n = 0;
    for node in nodes.flatten() {
        let props = fs::read_to_string(node.path().join("properties")).unwrap_or_default();
        let value = |key: &str| {
            props
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        if value("simd_count ") > 0 || value("gfx_target_version ") != 0 {
            n += 1;
        }
    }
    n
}

/// Stops whatever a cluster test started (`halo cluster down`) even when an assertion fails
/// half-way: on drop, when Ray processes of `ips` are still running.
pub struct ClusterGuard<'a> {
    pub config: &'a Path,
    /// `HALO_RAY` for `down`; `None` removes it (Ray lives inside the node's runtime).
    pub ray: Option<&'a Path>,
    pub ips: [&'a str; 2],
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        if ray_processes(&self.ips).is_empty() {
            return;
        }
        let mut cmd = super::halo();
        match self.ray {
            Some(ray) => cmd.env("HALO_RAY", ray),
            None => cmd.env_remove("HALO_RAY"),
        };
        cmd.arg("--config")
            .arg(self.config)
            .args(["cluster", "down"]);
        let _ = run_bounded(&mut cmd, Duration::from_secs(120));
    }
}

/// Held while a test uses the loopback "nodes" (127.0.0.2, 127.0.0.3): test binaries run in
/// parallel, and two Ray clusters on the same addresses would see each other's processes.
pub struct LoopbackNodes(fs::File);

/// Waits (saying so) until no other cluster test on this machine uses the loopback nodes.
pub fn loopback_nodes() -> LoopbackNodes {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("halo-cluster-tests.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: flock on a descriptor this function owns; no memory is shared with the call.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !free {
        eprintln!(
            "waiting for another cluster test to release the loopback nodes ({})",
            path.display()
        );
        // SAFETY: as above; this call blocks until the other holder closes its descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
    }
    LoopbackNodes(file)
}

/// Whether a cluster test can run: true when nothing is `missing`; with something missing it
/// fails the test, or, under HALO_SKIP_CLUSTER_TESTS=1, prints SKIPPED and returns false.
pub fn prerequisites_met<S: AsRef<str>>(test: &str, missing: &[S]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let missing: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    if std::env::var("HALO_SKIP_CLUSTER_TESTS").as_deref() == Ok("1") {
        println!(
            "SKIPPED: {test} ({} missing; HALO_SKIP_CLUSTER_TESTS=1)",
            missing.join(", ")
        );
        return false;
    }
    panic!(
        "{} missing: run scripts/setup-harness.sh (or set HALO_SKIP_CLUSTER_TESTS=1 to skip)",
        missing.join(", ")
    );
}
