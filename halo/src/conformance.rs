//! `halo conformance --plugin X.so`: the project's conformance run as a command for any RCCL/NCCL
//! net plugin. Each check runs in processes of its own (a plugin that crashes or hangs fails its
//! check, not the command), and the report names every check with its verdict.
//!
//! Local mode: sender and receiver are two processes on this node. With `--peer HOST` the
//! receivers run on another node, which serves them with `halo conformance --plugin X --listen`;
//! the control line protocol there is:
//!
//! | request | answer |
//! |---|---|
//! | `PROBE <version>` | `EXIT <code> <last output lines>` of a probe of its plugin |
//! | `RECV <version> <messages> <max_size> <seed> <timeout> <port>` | `STARTED`, then `EXIT <code> …` when the receiver ends |
//! | `QUIT` | `BYE` |

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use halo_harness::bench::control::Control;
use halo_harness::conformance::{self as engine, Role};
use halo_harness::driver::{self, Plugin, VERSIONS};
use serde::Serialize;

/// Default control port of `--listen`.
pub const CONTROL_PORT: u16 = 18610;
/// Port of the receiver's handle rendezvous on the peer.
const RENDEZVOUS_PORT: u16 = 18611;

#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// The net plugin library to check (any ncclNet_v6 … v12 plugin).
    #[arg(long, value_name = "PATH")]
    pub plugin: PathBuf,
    /// ABI versions to check (repeatable) [default: every table the library exports].
    #[arg(long = "version", value_name = "N")]
    pub versions: Vec<u32>,
    /// Receivers on another node running `halo conformance --plugin PATH --listen` (HOST or HOST:PORT).
    #[arg(long, value_name = "HOST", conflicts_with = "listen")]
    pub peer: Option<String>,
    /// Serve the receivers of a `--peer` run on ADDR (default 0.0.0.0:18610) until it ends.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "0.0.0.0:18610")]
    pub listen: Option<SocketAddr>,
    /// Messages of each random-traffic check.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub messages: usize,
    /// Largest message of the random-traffic checks.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_size: usize,
    /// Size of the large-message check (4 messages, two of this size in flight).
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    pub large_size: usize,
    /// Seed of the generated traffic (both sides derive the same plan from it).
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// Bound on every single wait inside a check, seconds (a check ends after 3× this at most).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Print the report as JSON: {"plugin", "checks": [{"name","passed","seconds","detail"}], "passed"}.
    #[arg(long)]
    pub json: bool,
    /// One side of one check (how the checks start their processes).
    #[arg(long, hide = true, value_parser = ["send", "recv", "both", "probe"])]
    pub role: Option<String>,
    #[arg(long, hide = true)]
    pub handle_on_stdout: bool,
    #[arg(long, hide = true)]
    pub listen_on: Option<String>,
    #[arg(long, hide = true)]
    pub connect: Option<String>,
    #[arg(long, hide = true)]
    pub kill_peer_after: Option<usize>,
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plugin: String,
    pub peer: Option<String>,
    pub checks: Vec<CheckResult>,
    pub passed: bool,
}

/// Runs what the arguments ask for; returns the exit code.
pub fn main(args: &ConformanceArgs) -> Result<u8> {
    if let Some(role) = &args.role {
        return Ok(if role == "probe" {
            probe(args)
        } else {
            one_side(args, role)
        });
    }
    if args.max_size > i32::MAX as usize || args.large_size > i32::MAX as usize {
        bail!("--max-size and --large-size must fit in an int (test reports int sizes)");
    }
    if !args.plugin.is_file() {
        bail!(
            "the plugin library {} does not exist",
            args.plugin.display()
        );
    }
    if let Some(bind) = args.listen {
        serve(args, bind)?;
        return Ok(0);
    }
    let report = run(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.passed { 0 } else { 1 })
}

/// A check's side: one run of the engine (`--role send|recv|both`), in this process.
fn one_side(args: &ConformanceArgs, role: &str) -> u8 {
    let mut o = engine::Options::new(
        args.plugin.clone(),
        args.versions.first().copied().unwrap_or(10),
    );
    o.role = match role {
        "send" => Role::Send,
        "recv" => Role::Recv,
        _ => Role::Both,
    };
    o.listen_on = args.listen_on.clone();
    o.connect = args.connect.clone();
    o.messages = args.messages;
    o.max_size = args.max_size;
    o.seed = args.seed;
    o.timeout = Duration::from_secs(args.timeout);
    o.kill_peer_after = args.kill_peer_after;
    o.handle_on_stdout = args.handle_on_stdout;
    o.receiver = (self_exe(), vec!["conformance".into()]);
    match engine::run(&o) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("CONFORMANCE FAIL ({:?}, v{}): {e}", o.role, o.version);
            1
        }
    }
}

/// The probe: load, init, devices and their properties, as the core does at startup.
fn probe(args: &ConformanceArgs) -> u8 {
    let version = args.versions.first().copied().unwrap_or(10);
    let r = (|| -> Result<String, String> {
        let mut p = Plugin::load(&args.plugin, version)?;
        p.init(halo_harness::log::stderr_logger(), 1)
            .map_err(|e| format!("init failed: {e}"))?;
        let n = p.devices().map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the plugin reports no devices".into());
        }
        let mut names = Vec::new();
        for d in 0..n as i32 {
            let info = p.properties(d).map_err(|e| format!("device {d}: {e}"))?;
            if info.name.is_empty() {
                return Err(format!("device {d} has no name"));
            }
            if info.max_recvs < 1 {
                return Err(format!("device {d}: maxRecvs {}", info.max_recvs));
            }
            if info.ptr_support & halo_ffi::NCCL_PTR_HOST == 0 {
                return Err(format!(
                    "device {d}: ptrSupport {:#x} lacks NCCL_PTR_HOST",
                    info.ptr_support
                ));
            }
            names.push(format!(
                "{} (maxRecvs {}, ptrSupport {:#x}, {} Mbps)",
                info.name, info.max_recvs, info.ptr_support, info.speed
            ));
        }
        p.finalize().map_err(|e| format!("finalize failed: {e}"))?;
        Ok(format!(
            "{} v{version}: {n} device(s): {}",
            p.name(),
            names.join(", ")
        ))
    })();
    match r {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            println!("{e}");
            1
        }
    }
}

fn self_exe() -> OsString {
    std::env::current_exe()
        .map(PathBuf::into_os_string)
        .unwrap_or_else(|_| "halo".into())
}

/// A child of this command, bounded in time, with the last lines it wrote.
struct Ran {
    code: Option<i32>,
    output: String,
    seconds: f64,
}

fn side_command(args: &ConformanceArgs, role: &str, version: u32) -> Command {
    let mut cmd = Command::new(self_exe());
    cmd.arg("conformance")
        .arg("--plugin")
        .arg(&args.plugin)
        .args(["--role", role, "--version", &version.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(["--timeout", &args.timeout.to_string()]);
    cmd
}

fn run_child(mut cmd: Command, limit: Duration) -> Result<Ran> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a check process")?;
    let kept = Arc::new(Mutex::new(VecDeque::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|out| {
        let kept = Arc::clone(&kept);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The plugin's info logs say nothing a verdict needs.
                if line.trim().is_empty() || line.starts_with("[log 3]") || line.contains(" log 3]")
                {
                    continue;
                }
                let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
                if k.len() == 6 {
                    k.pop_front();
                }
                k.push_back(line);
            }
        })
    })
    .collect();
    let code = loop {
        if let Some(st) = child.try_wait()? {
            break st.code();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
            k.push_back(format!("killed: no verdict within {} s", limit.as_secs()));
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let _ = r.join();
    }
    let k = kept.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Ran {
        code,
        output: k.iter().cloned().collect::<Vec<_>>().join(" | "),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The summary line of a passed traffic run, else the last lines.
fn detail(out: &str, passed: bool) -> String {
    if passed {
        if let Some(l) = out.split(" | ").find(|l| l.contains("messages in")) {
            return l.trim_start_matches("[recv] ").to_string();
        }
    }
    out.to_string()
}

/// The versions to check: those asked for, else every table the library exports.
fn versions(args: &ConformanceArgs) -> Result<(Vec<u32>, CheckResult)> {
    let t0 = Instant::now();
    let lib = driver::open(&args.plugin).with_context(|| {
        format!(
            "cannot load {} (dlopen): a library RCCL could not load either",
            args.plugin.display()
        )
    })?;
    let missing = driver::missing_tables(&lib);
    let exported: Vec<u32> = VERSIONS
        .into_iter()
        .filter(|v| !missing.contains(&format!("ncclNetPlugin_v{v}")))
        .collect();
    drop(lib);
    let check = CheckResult {
        name: "exports an ncclNet table (v6 … v12)".into(),
        passed: !exported.is_empty(),
        seconds: t0.elapsed().as_secs_f64(),
        detail: if exported.is_empty() {
            "no ncclNetPlugin_v6/v8/v10/v11/v12 symbol".into()
        } else {
            format!(
                "exports {}",
                exported
                    .iter()
                    .map(|v| format!("v{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    };
    let chosen = if args.versions.is_empty() {
        exported
    } else {
        args.versions.clone()
    };
    Ok((chosen, check))
}

/// The receivers' node, reached over its control port.
struct RemoteReceivers {
    ctl: Control,
    ip: std::net::IpAddr,
}

impl RemoteReceivers {
    fn connect(peer: &str) -> Result<Self> {
        let with_port = if peer.contains(':') {
            peer.to_string()
        } else {
            format!("{peer}:{CONTROL_PORT}")
        };
        let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} has no address"))?;
        let t0 = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    if t0.elapsed().as_millis() < 250 {
                        eprintln!("halo conformance: waiting for `halo conformance --listen` at {addr} ({e})");
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => bail!("no `halo conformance --listen` answers at {addr}: {e}"),
            }
        };
        Ok(RemoteReceivers {
            ctl: Control::tcp(stream, format!("the peer {addr}")).map_err(anyhow::Error::msg)?,
            ip: addr.ip(),
        })
    }

    fn ask(&mut self, line: &str, limit: Duration) -> Result<String> {
        self.ctl.send(line).map_err(anyhow::Error::msg)?;
        self.answer(limit)
    }

    fn answer(&mut self, limit: Duration) -> Result<String> {
        let a = self.ctl.recv_line(limit).map_err(anyhow::Error::msg)?;
        match a.strip_prefix("ERROR ") {
            Some(e) => bail!("peer: {e}"),
            None => Ok(a),
        }
    }
}

fn parse_exit(line: &str) -> Result<(i32, String)> {
    let rest = line
        .strip_prefix("EXIT ")
        .ok_or_else(|| anyhow!("expected EXIT from the peer, got {line:?}"))?;
    let (code, out) = rest.split_once(' ').unwrap_or((rest, ""));
    Ok((code.parse().unwrap_or(-1), out.to_string()))
}

/// Every check, in order; a failed check does not stop the others.
pub fn run(args: &ConformanceArgs) -> Result<Report> {
    let limit = Duration::from_secs(args.timeout * 3);
    let mut remote = match &args.peer {
        Some(p) => Some(RemoteReceivers::connect(p)?),
        None => None,
    };
    let (chosen, exports) = versions(args)?;
    let mut checks = vec![exports];
    let say = |c: &CheckResult| {
        eprintln!(
            "halo conformance: {} {} ({:.1} s)",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.seconds
        )
    };
    say(&checks[0]);
    let newest = chosen.iter().copied().max();
    for &v in &chosen {
        let ran = run_child(side_command(args, "probe", v), limit)?;
        let mut c = CheckResult {
            name: format!("v{v}: init, devices and their properties"),
            passed: ran.code == Some(0),
            seconds: ran.seconds,
            detail: ran.output,
        };
        if let (Some(r), true) = (remote.as_mut(), c.passed) {
            let (code, out) = parse_exit(&r.ask(&format!("PROBE {v}"), limit)?)?;
            if code != 0 {
                c.passed = false;
            }
            c.detail = format!("{}; peer: {out}", c.detail);
        }
        say(&c);
        checks.push(c);
        let c = traffic(
            args,
            remote.as_mut(),
            v,
            args.messages,
            args.max_size,
            format!(
                "v{v}: random traffic, {} messages of 0…{} B",
                args.messages, args.max_size
            ),
            limit,
        )?;
        say(&c);
        checks.push(c);
    }
    if let Some(v) = newest {
        let c = traffic(
            args,
            remote.as_mut(),
            v,
            4,
            args.large_size,
            format!("v{v}: two {} B messages in flight", args.large_size),
            limit,
        )?;
        say(&c);
        checks.push(c);
        if remote.is_none() {
            let mut cmd = side_command(args, "both", v);
            cmd.args(["--messages", "2000", "--max-size", "262144"])
                .args(["--kill-peer-after", "24"])
                .env("NCCL_IB_TIMEOUT", "16")
                .env("NCCL_IB_RETRY_CNT", "3");
            let ran = run_child(cmd, limit)?;
            let c = CheckResult {
                name: format!("v{v}: receiver killed mid-transfer: the sender gets an error"),
                passed: ran.code == Some(3),
                seconds: ran.seconds,
                detail: ran
                    .output
                    .split(" | ")
                    .find(|l| l.contains("after the kill"))
                    .map_or(ran.output.clone(), str::to_string),
            };
            say(&c);
            checks.push(c);
        }
    }
    if let Some(mut r) = remote {
        let _ = r.ask("QUIT", Duration::from_secs(10));
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(Report {
        plugin: args.plugin.display().to_string(),
        peer: args.peer.clone(),
        checks,
        passed,
    })
}

/// One random-traffic check: both sides here, or the receiver on the peer.
fn traffic(
    args: &ConformanceArgs,
    remote: Option<&mut RemoteReceivers>,
    version: u32,
    messages: usize,
    max_size: usize,
    name: String,
    limit: Duration,
) -> Result<CheckResult> {
    let sized = |mut cmd: Command| {
        cmd.args(["--messages", &messages.to_string()])
            .args(["--max-size", &max_size.to_string()]);
        cmd
    };
    let Some(r) = remote else {
        let ran = run_child(sized(side_command(args, "both", version)), limit)?;
        let passed = ran.code == Some(0);
        return Ok(CheckResult {
            name,
            passed,
            seconds: ran.seconds,
            detail: detail(&ran.output, passed),
        });
    };
    let started = r.ask(
        &format!(
            "RECV {version} {messages} {max_size} {} {} {RENDEZVOUS_PORT}",
            args.seed, args.timeout
        ),
        limit,
    )?;
    if started != "STARTED" {
        bail!("unexpected answer {started:?} from the peer");
    }
    let mut cmd = sized(side_command(args, "send", version));
    cmd.args(["--connect", &format!("{}:{RENDEZVOUS_PORT}", r.ip)]);
    let ran = run_child(cmd, limit)?;
    let (code, theirs) = parse_exit(&r.answer(limit)?)?;
    let passed = ran.code == Some(0) && code == 0;
    Ok(CheckResult {
        name,
        passed,
        seconds: ran.seconds,
        detail: format!(
            "sender: {}; receiver on the peer: {}",
            detail(&ran.output, ran.code == Some(0)),
            detail(&theirs, code == 0)
        ),
    })
}

/// The peer side of `--peer` runs: probes and receivers on request.
fn serve(args: &ConformanceArgs, bind: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
    eprintln!(
        "halo conformance: serving receivers for {} on {}",
        args.plugin.display(),
        listener.local_addr()?
    );
    let limit = Duration::from_secs(args.timeout * 3);
    for conn in listener.incoming() {
        let conn = conn?;
        let who = conn.peer_addr()?;
        let mut ctl = Control::tcp(conn, format!("driver {who}")).map_err(anyhow::Error::msg)?;
        while let Some(line) = ctl.next_line(Duration::MAX).map_err(anyhow::Error::msg)? {
            let w: Vec<&str> = line.split_whitespace().collect();
            let answer = match w.as_slice() {
                ["PROBE", v] => {
                    let ran = run_child(side_command(args, "probe", v.parse()?), limit)?;
                    format!("EXIT {} {}", ran.code.unwrap_or(-1), ran.output)
                }
                ["RECV", v, messages, max_size, seed, timeout, port] => {
                    let mut cmd = Command::new(self_exe());
                    cmd.arg("conformance")
                        .arg("--plugin")
                        .arg(&args.plugin)
                        .args(["--role", "recv", "--version", v, "--messages", messages])
                        .args(["--max-size", max_size, "--seed", seed, "--timeout", timeout])
                        .args(["--listen-on", &format!("{}:{port}", bind.ip())]);
                    ctl.send("STARTED").map_err(anyhow::Error::msg)?;
                    let ran = run_child(cmd, limit)?;
                    format!("EXIT {} {}", ran.code.unwrap_or(-1), ran.output)
                }
                ["QUIT"] => {
                    ctl.send("BYE").map_err(anyhow::Error::msg)?;
                    return Ok(());
                }
                _ => format!("ERROR unknown request {line:?}"),
            };
            ctl.send(answer.trim_end()).map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

/// The report as a table: one line per check.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "halo conformance: {}{}\n\n",
        r.plugin,
        r.peer
            .as_ref()
            .map_or(String::new(), |p| format!(" (receivers on {p})"))
    );
    for c in &r.checks {
        s.push_str(&format!(
            "{}  {:<56} {:>7.1} s\n",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.seconds
        ));
        if !c.detail.is_empty() {
            s.push_str(&format!("      {}\n", c.detail));
        }
    }
    let passed = r.checks.iter().filter(|c| c.passed).count();
    s.push_str(&format!(
        "\n{passed} of {} checks passed{}\n",
        r.checks.len(),
        if r.passed { "" } else { ": FAIL" }
    ));
    s
}
