//! Conformance driver for the net plugin: loads the built `.so`, picks one `ncclNetPlugin_vN`
//! table and moves seeded random traffic between a sender and a receiver process the way RCCL's
//! proxy does (connect/accept polled, regMr on a service thread, isend/irecv/test on a progress
//! thread, up to 32 outstanding requests, multi-receives with shuffled tags, NULL-request retries,
//! `(void*)1` pre-set receive requests). Every byte and every size reported by `test` is checked.
//!
//! One guest, both processes (the receiver is a child of the sender):
//!   scripts/softroce run -- target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so \
//!       --version 10 --role both --messages 200 --max-size 1048576 --seed 1
//!
//! Two guests joined by a wire (receiver on a, sender on b; the handle travels over TCP port 18600):
//!   scripts/softroce run2 --timeout 600 \
//!     --a 'target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --role recv --listen-on $HALO_GUEST_IP:18600 --messages 200 --max-size 1048576 --seed 7' \
//!     --b 'target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --role send --connect $HALO_PEER_IP:18600 --messages 200 --max-size 1048576 --seed 7'
//!
//! Soak mode (`--soak`): sizes 0 B ..= 64 KiB, 1 % of them up to `--max-size` (8 MiB by default
//! there); every message's checksum is recorded when the sender fills it and checked again when
//! its send completes, and the receiver checks every byte. Each side prints a `SOAK` line with the
//! message count, the digest of all checksums (equal on both sides when nothing was lost or
//! corrupted), the throughput, and a progress line every `--report-every` messages.
//!
//! Exit status: 0 and "CONFORMANCE PASS" on success; 1 on any mismatch or error (the message, tag
//! and size are printed); 3 in `--kill-peer-after` mode when the sender saw the expected error.

use halo_ffi::{ncclRemoteError, ncclSystemError, NCCL_NET_HANDLE_MAXSIZE};
use halo_harness::driver::{handle_from_hex, handle_to_hex, Opaque, Plugin};
use halo_harness::log::stderr_logger;
use halo_harness::rng::SplitMix64;
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// RCCL keeps at most this many requests outstanding per comm.
const MAX_REQUESTS: usize = 32;
/// Registered-but-unfinished bytes per side; keeps the 64 MiB runs inside a small guest.
const INFLIGHT_BYTE_BUDGET: usize = 320 << 20;
/// Fill for receive buffers: bytes past the message must still hold it after the transfer.
const GUARD: u8 = 0xA5;
const RENDEZVOUS_PORT: u16 = 18600;
/// What RCCL leaves in `*request` before an irecv whose completion it may not need.
const PRESET_REQUEST: *mut c_void = std::ptr::without_provenance_mut(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Send,
    Recv,
    Both,
}

struct Options {
    plugin: PathBuf,
    version: u32,
    role: Role,
    peer_file: Option<PathBuf>,
    listen_on: Option<String>,
    connect: Option<String>,
    messages: usize,
    max_size: usize,
    seed: u64,
    timeout: Duration,
    kill_peer_after: Option<usize>,
    soak: bool,
    report_every: usize,
    /// Set on the receiver child of `--role both`: print the handle on stdout.
    handle_on_stdout: bool,
}

fn usage() -> String {
    "usage: conformance --plugin PATH --version 6|8|10|11|12 --role send|recv|both \
     [--peer-file F | --listen-on IP:PORT | --connect IP:PORT] --messages N --max-size BYTES --seed S \
     [--timeout SECS] [--kill-peer-after K] [--soak] [--report-every N]"
        .to_string()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        plugin: PathBuf::new(),
        version: 0,
        role: Role::Both,
        peer_file: None,
        listen_on: None,
        connect: None,
        messages: 200,
        max_size: 1 << 20,
        seed: 1,
        timeout: Duration::from_secs(120),
        kill_peer_after: None,
        soak: false,
        report_every: 0,
        handle_on_stdout: false,
    };
    let mut max_size_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{}", usage()))
        };
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{a} {s}: {e}"));
        match a.as_str() {
            "--plugin" => o.plugin = PathBuf::from(val()?),
            "--version" => o.version = num(val()?)? as u32,
            "--role" => {
                o.role = match val()?.as_str() {
                    "send" => Role::Send,
                    "recv" => Role::Recv,
                    "both" => Role::Both,
                    r => return Err(format!("unknown role {r}\n{}", usage())),
                }
            }
            "--peer-file" => o.peer_file = Some(PathBuf::from(val()?)),
            "--listen-on" => o.listen_on = Some(val()?),
            "--connect" => o.connect = Some(val()?),
            "--messages" => o.messages = num(val()?)? as usize,
            "--max-size" => {
                o.max_size = num(val()?)? as usize;
                max_size_given = true;
            }
            "--soak" => o.soak = true,
            "--report-every" => o.report_every = num(val()?)? as usize,
            "--seed" => o.seed = num(val()?)?,
            "--timeout" => o.timeout = Duration::from_secs(num(val()?)?),
            "--kill-peer-after" => o.kill_peer_after = Some(num(val()?)? as usize),
            "--handle-on-stdout" => o.handle_on_stdout = true,
            "-h" | "--help" => return Err(usage()),
            _ => return Err(format!("unknown argument {a}\n{}", usage())),
        }
    }
    if o.plugin.as_os_str().is_empty() || o.version == 0 {
        return Err(format!("--plugin and --version are required\n{}", usage()));
    }
    if o.soak && !max_size_given {
        o.max_size = 8 << 20;
    }
    if o.max_size > i32::MAX as usize {
        return Err("--max-size must fit in an int (test reports int sizes)".into());
    }
    Ok(o)
}

/// [`SplitMix64`] with sizes and indices as `usize`.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

/// Deterministic payload of message `index`.
fn fill_payload(buf: &mut [u8], seed: u64, index: usize) {
    let mut rng = Rng(SplitMix64(
        seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x5555,
    ));
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next().to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// Word-wise checksum, cheap enough for 64 MiB in an emulated guest.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap()))
            .rotate_left(23)
            .wrapping_mul(0x100_0000_01B3);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    h
}

#[derive(Clone, Debug)]
struct Message {
    index: usize,
    size: usize,
    capacity: usize,
    tag: c_int,
}

/// One multi-receive: `msgs` in receive-slot order, `send_order` the order the sender posts them.
#[derive(Clone, Debug)]
struct Group {
    msgs: Vec<Message>,
    send_order: Vec<usize>,
    preset_one: bool,
}

/// The whole exchange, regenerated identically by both sides from the seed.
fn plan(seed: u64, messages: usize, max_size: usize, max_recvs: usize, soak: bool) -> Vec<Group> {
    let mut rng = Rng(SplitMix64(seed));
    let mut groups = Vec::new();
    let mut index = 0;
    while index < messages {
        let n = if groups.is_empty() {
            4.min(max_recvs)
        } else {
            1 + rng.below(max_recvs)
        }
        .min(messages - index)
        .max(1);
        let mut msgs = Vec::with_capacity(n);
        let mut tags: Vec<c_int> = Vec::with_capacity(n);
        for slot in 0..n {
            let size = if groups.is_empty() {
                // The edge cases come first so even a short run covers them, including two
                // max-size messages in flight at once.
                [0, 1, max_size, max_size][slot]
            } else if soak {
                if rng.below(100) == 0 {
                    rng.below(max_size + 1)
                } else {
                    rng.below(65536.min(max_size) + 1)
                }
            } else {
                match rng.below(16) {
                    0 => 0,
                    1 => 1,
                    2 => max_size,
                    3..=8 => rng.below(4096.min(max_size) + 1) | 1,
                    9..=12 => rng.below(65536.min(max_size) + 1),
                    _ => rng.below(max_size + 1),
                }
                .min(max_size)
            };
            let capacity = size + if rng.below(2) == 0 { 0 } else { rng.below(64) };
            let tag = loop {
                let t = (rng.next() & 0x7fff_ffff) as c_int;
                if !tags.contains(&t) {
                    break t;
                }
            };
            tags.push(tag);
            msgs.push(Message {
                index,
                size,
                capacity,
                tag,
            });
            index += 1;
        }
        let mut send_order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            send_order.swap(i, rng.below(i + 1));
        }
        let preset_one = rng.below(3) == 0;
        groups.push(Group {
            msgs,
            send_order,
            preset_one,
        });
    }
    groups
}

/// A group's registered buffers, owned by the service thread except while the progress thread
/// has them posted.
struct Work {
    group: usize,
    bufs: Vec<Vec<u8>>,
    mhs: Vec<Opaque>,
    /// Sender: the checksum of each message when it was filled.
    sums: Vec<u64>,
}

impl Work {
    fn bytes(&self) -> usize {
        self.bufs.iter().map(Vec::len).sum()
    }
}

struct Outcome {
    messages: usize,
    bytes: usize,
    max_inflight: usize,
    null_retries: usize,
    /// Sum of every message's (index, checksum) mix, over the bytes this side handled.
    digest: u64,
    /// From the first post to the last completion.
    elapsed: Duration,
}

/// One message's share of [`Outcome::digest`].
fn digest_part(index: usize, sum: u64) -> u64 {
    (sum ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("CONFORMANCE FAIL ({:?}, v{}): {e}", opts.role, opts.version);
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> Result<(), String> {
    let t0 = Instant::now();
    let mut plugin = Plugin::load(&opts.plugin, opts.version)?;
    plugin
        .init(stderr_logger(), opts.seed ^ 0xC0FF_EE00)
        .map_err(|e| format!("plugin init failed: {e}"))?;
    let ndev = plugin.devices().map_err(|e| e.to_string())?;
    if ndev == 0 {
        return Err("the plugin reports no devices".into());
    }
    let info = plugin.properties(0).map_err(|e| e.to_string())?;
    let max_recvs = info.max_recvs.clamp(1, 8);
    eprintln!(
        "plugin {:?} v{}: {ndev} device(s), dev 0 = {} (maxRecvs {}, ptrSupport {:#x})",
        plugin.name(),
        opts.version,
        info.name,
        info.max_recvs,
        info.ptr_support
    );
    let plugin = Arc::new(plugin);
    let groups = plan(
        opts.seed,
        opts.messages,
        opts.max_size,
        max_recvs,
        opts.soak,
    );

    let result = match opts.role {
        Role::Recv => run_receiver(&plugin, opts, &groups),
        Role::Send | Role::Both => run_sender(&plugin, opts, &groups),
    };
    let elapsed = t0.elapsed();
    let outcome = result?;
    let mut plugin =
        Arc::try_unwrap(plugin).map_err(|_| "plugin still shared at exit".to_string())?;
    plugin.finalize().map_err(|e| e.to_string())?;
    let side = if opts.role == Role::Recv {
        "received and verified"
    } else {
        "sent"
    };
    if opts.soak {
        let planned: usize = groups.iter().map(|g| g.msgs.len()).sum();
        let secs = outcome.elapsed.as_secs_f64().max(1e-9);
        println!(
            "SOAK {:?}: {} of {planned} messages, 0 lost, 0 corrupted, digest {:016x}, {} bytes in {secs:.1} s: {:.1} MB/s, {:.0} messages/s",
            opts.role,
            outcome.messages,
            outcome.digest,
            outcome.bytes,
            outcome.bytes as f64 / secs / 1e6,
            outcome.messages as f64 / secs
        );
        if outcome.messages != planned {
            return Err(format!(
                "{} of {planned} messages completed",
                outcome.messages
            ));
        }
    }
    println!(
        "v{} {:?}: {} messages in {} groups, {} bytes {side}, max {} requests in flight, {} NULL-request retries, elapsed {:.2?}",
        opts.version,
        opts.role,
        outcome.messages,
        groups.len(),
        outcome.bytes,
        outcome.max_inflight,
        outcome.null_retries,
        elapsed
    );
    println!("CONFORMANCE PASS");
    Ok(())
}

/// Polls `f` until it yields a non-NULL comm, failing after `timeout`.
fn poll_comm(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Opaque, String>,
) -> Result<Opaque, String> {
    let t0 = Instant::now();
    loop {
        let c = f()?;
        if !c.is_null() {
            return Ok(c);
        }
        if t0.elapsed() > timeout {
            return Err(format!("{what} did not complete within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn run_receiver(plugin: &Arc<Plugin>, opts: &Options, groups: &[Group]) -> Result<Outcome, String> {
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let listen = plugin.listen(0, &mut handle).map_err(|e| e.to_string())?;
    publish_handle(opts, &handle)?;
    let comm = poll_comm("accept", opts.timeout, || {
        plugin.accept(listen).map_err(|e| e.to_string())
    })?;
    plugin.close_listen(listen).map_err(|e| e.to_string())?;
    eprintln!("receiver: accepted");
    let outcome = exchange(plugin, opts, groups, comm, false, None)?;
    plugin.close_recv(comm).map_err(|e| e.to_string())?;
    Ok(outcome)
}

fn run_sender(plugin: &Arc<Plugin>, opts: &Options, groups: &[Group]) -> Result<Outcome, String> {
    let mut child = None;
    let mut handle = if opts.role == Role::Both {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut c = Command::new(exe)
            .args(["--plugin".as_ref(), opts.plugin.as_os_str()])
            .args([
                "--version",
                &opts.version.to_string(),
                "--role",
                "recv",
                "--handle-on-stdout",
            ])
            .args([
                "--messages",
                &opts.messages.to_string(),
                "--max-size",
                &opts.max_size.to_string(),
            ])
            .args([
                "--seed",
                &opts.seed.to_string(),
                "--timeout",
                &opts.timeout.as_secs().to_string(),
                "--report-every",
                &opts.report_every.to_string(),
            ])
            .args(opts.soak.then_some("--soak"))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning the receiver: {e}"))?;
        let mut lines = BufReader::new(c.stdout.take().expect("piped stdout")).lines();
        let first = lines
            .next()
            .ok_or("the receiver exited before publishing its handle")?
            .map_err(|e| e.to_string())?;
        let hex = first
            .strip_prefix("HANDLE ")
            .ok_or_else(|| format!("unexpected receiver output {first:?}"))?;
        let h = handle_from_hex(hex)?;
        let forward = std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| println!("[recv] {l}"))
        });
        child = Some((c, forward));
        h
    } else {
        fetch_handle(opts)?
    };
    let comm = poll_comm("connect", opts.timeout, || {
        plugin.connect(0, &mut handle).map_err(|e| e.to_string())
    });
    let comm = match comm {
        Ok(c) => c,
        Err(e) => {
            if let Some((mut c, _)) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(e);
        }
    };
    eprintln!("sender: connected");
    let pid = child.as_ref().map(|(c, _)| c.id());
    let outcome = exchange(plugin, opts, groups, comm, true, pid);
    let outcome = outcome.and_then(|o| {
        plugin
            .close_send(comm)
            .map(|()| o)
            .map_err(|e| e.to_string())
    });
    if let Some((mut c, forward)) = child {
        let status = if outcome.is_ok() {
            wait_with_deadline(&mut c, opts.timeout)?
        } else {
            let _ = c.kill();
            c.wait().map_err(|e| e.to_string())?
        };
        let _ = forward.join();
        let outcome = outcome?;
        if !status.success() {
            return Err(format!("the receiver process failed: {status}"));
        }
        return Ok(outcome);
    }
    outcome
}

fn wait_with_deadline(
    c: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
            return Ok(s);
        }
        if t0.elapsed() > timeout {
            let _ = c.kill();
            let _ = c.wait();
            return Err(format!("the receiver did not exit within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn publish_handle(opts: &Options, handle: &[u8; NCCL_NET_HANDLE_MAXSIZE]) -> Result<(), String> {
    let hex = handle_to_hex(handle);
    if opts.handle_on_stdout {
        println!("HANDLE {hex}");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    } else if let Some(f) = &opts.peer_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, &hex).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, f).map_err(|e| format!("{}: {e}", f.display()))?;
    } else {
        let addr = match &opts.listen_on {
            Some(a) => a.clone(),
            None => format!(
                "{}:{RENDEZVOUS_PORT}",
                std::env::var("HALO_GUEST_IP").unwrap_or_else(|_| "127.0.0.1".into())
            ),
        };
        let listener =
            TcpListener::bind(&addr).map_err(|e| format!("rendezvous bind {addr}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        eprintln!("receiver: serving the handle on {addr}");
        let t0 = Instant::now();
        // One sender per run: serve the handle to the first peer that asks, then stop listening.
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > opts.timeout {
                        return Err(format!(
                            "no sender fetched the handle from {addr} within {:?}",
                            opts.timeout
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("rendezvous accept on {addr}: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .write_all(format!("{hex}\n").as_bytes())
            .map_err(|e| format!("rendezvous write: {e}"))?;
    }
    Ok(())
}

fn fetch_handle(opts: &Options) -> Result<[u8; NCCL_NET_HANDLE_MAXSIZE], String> {
    let t0 = Instant::now();
    if let Some(f) = &opts.peer_file {
        loop {
            if let Ok(text) = std::fs::read_to_string(f) {
                return handle_from_hex(&text);
            }
            if t0.elapsed() > opts.timeout {
                return Err(format!(
                    "no handle appeared in {} within {:?}",
                    f.display(),
                    opts.timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let addr = match &opts.connect {
        Some(a) => a.clone(),
        None => format!(
            "{}:{RENDEZVOUS_PORT}",
            std::env::var("HALO_PEER_IP").unwrap_or_else(|_| "127.0.0.1".into())
        ),
    };
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("--connect {addr}: {e}"))?;
    loop {
        match TcpStream::connect_timeout(&sock, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                let mut text = String::new();
                s.read_to_string(&mut text)
                    .map_err(|e| format!("rendezvous read from {addr}: {e}"))?;
                return handle_from_hex(&text);
            }
            Err(e) if t0.elapsed() > opts.timeout => {
                return Err(format!(
                    "rendezvous {addr}: {e} (gave up after {:?})",
                    opts.timeout
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The service thread (this one) allocates, fills, registers, verifies and deregisters buffers;
/// the progress thread posts and tests. Completed groups come back over a channel.
fn exchange(
    plugin: &Arc<Plugin>,
    opts: &Options,
    groups: &[Group],
    comm: Opaque,
    sending: bool,
    kill_pid: Option<u32>,
) -> Result<Outcome, String> {
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    let (done_tx, done_rx) = mpsc::channel::<Work>();
    let progress = {
        let plugin = Arc::clone(plugin);
        let groups = groups.to_vec();
        let timeout = opts.timeout;
        let kill = opts.kill_peer_after.zip(kill_pid);
        let report_every = opts.report_every;
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                progress_loop(
                    &plugin,
                    &groups,
                    comm,
                    sending,
                    work_rx,
                    done_tx,
                    timeout,
                    kill,
                    report_every,
                )
            })
            .map_err(|e| e.to_string())?
    };
    let mut inflight_bytes = 0usize;
    let mut returned = 0usize;
    let mut verified_bytes = 0usize;
    let mut digest = 0u64;
    let mut service_err = None;
    let mut finish = |w: Work, inflight_bytes: &mut usize| -> Result<(), String> {
        *inflight_bytes -= w.bytes();
        let g = &groups[w.group];
        if sending {
            // The plugin must not have written into a send buffer.
            for ((m, buf), &sum) in g.msgs.iter().zip(&w.bufs).zip(&w.sums) {
                if checksum(&buf[..m.size]) != sum {
                    return Err(format!(
                        "message {} (tag {}, size {}): the send buffer changed while it was sent",
                        m.index, m.tag, m.size
                    ));
                }
                digest = digest.wrapping_add(digest_part(m.index, sum));
            }
        } else {
            verified_bytes += verify_group(opts.seed, g, &w.bufs)?;
            for (m, buf) in g.msgs.iter().zip(&w.bufs) {
                digest = digest.wrapping_add(digest_part(m.index, checksum(&buf[..m.size])));
            }
        }
        for &mh in &w.mhs {
            plugin
                .dereg_mr(comm, mh)
                .map_err(|e| format!("group {}: {e}", w.group))?;
        }
        Ok(())
    };
    let wait_done = || -> Result<Work, String> {
        match done_rx.recv_timeout(opts.timeout) {
            Ok(w) => Ok(w),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("no group completed within {:?}", opts.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err("progress thread stopped".into()),
        }
    };
    'service: for (gi, g) in groups.iter().enumerate() {
        let bytes: usize = g
            .msgs
            .iter()
            .map(|m| {
                if sending {
                    m.size.max(1)
                } else {
                    m.capacity.max(1)
                }
            })
            .sum();
        while inflight_bytes > 0 && inflight_bytes + bytes > INFLIGHT_BYTE_BUDGET {
            returned += 1;
            if let Err(e) = wait_done().and_then(|w| finish(w, &mut inflight_bytes)) {
                service_err = Some(e);
                break 'service;
            }
        }
        let mut work = Work {
            group: gi,
            bufs: Vec::with_capacity(g.msgs.len()),
            mhs: Vec::with_capacity(g.msgs.len()),
            sums: Vec::with_capacity(g.msgs.len()),
        };
        for m in &g.msgs {
            // A zero-byte message still gets a one-byte buffer: RCCL never registers empty ranges.
            let mut buf = if sending {
                let mut b = vec![0u8; m.size.max(1)];
                fill_payload(&mut b[..m.size], opts.seed, m.index);
                work.sums.push(checksum(&b[..m.size]));
                b
            } else {
                vec![GUARD; m.capacity.max(1)]
            };
            match plugin.reg_mr(comm, buf.as_mut_ptr(), buf.len()) {
                Ok(mh) => work.mhs.push(mh),
                Err(e) => {
                    service_err = Some(format!(
                        "message {} (group {gi}, tag {}, size {}): {e}",
                        m.index, m.tag, m.size
                    ));
                    break 'service;
                }
            }
            work.bufs.push(buf);
        }
        inflight_bytes += work.bytes();
        if work_tx.send(work).is_err() {
            break;
        }
        while let Ok(w) = done_rx.try_recv() {
            returned += 1;
            if let Err(e) = finish(w, &mut inflight_bytes) {
                service_err = Some(e);
                break 'service;
            }
        }
    }
    drop(work_tx);
    if service_err.is_none() {
        while returned < groups.len() {
            returned += 1;
            if let Err(e) = wait_done().and_then(|w| finish(w, &mut inflight_bytes)) {
                service_err = Some(e);
                break;
            }
        }
    }
    drop(done_rx);
    let progress = progress
        .join()
        .map_err(|_| "progress thread panicked".to_string())?;
    // The progress thread's error is the root cause when both failed.
    let mut outcome = progress?;
    if let Some(e) = service_err {
        return Err(e);
    }
    if !sending {
        outcome.bytes = verified_bytes;
    }
    outcome.digest = digest;
    Ok(outcome)
}

/// Checks every message of a completed group byte for byte, by checksum, and that nothing was
/// written past it. Returns the bytes verified.
fn verify_group(seed: u64, g: &Group, bufs: &[Vec<u8>]) -> Result<usize, String> {
    let mut total = 0;
    for (m, buf) in g.msgs.iter().zip(bufs) {
        let mut expect = vec![0u8; m.size];
        fill_payload(&mut expect, seed, m.index);
        let got = &buf[..m.size];
        if got != expect.as_slice() {
            let at = got
                .iter()
                .zip(&expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "message {} (tag {}, size {}): payload differs first at byte {at} (got {:#04x}, expected {:#04x})",
                m.index, m.tag, m.size, got[at], expect[at]
            ));
        }
        if checksum(got) != checksum(&expect) {
            return Err(format!(
                "message {} (tag {}, size {}): checksum mismatch",
                m.index, m.tag, m.size
            ));
        }
        if m.capacity > m.size {
            if let Some(p) = buf[m.size..m.capacity].iter().position(|&b| b != GUARD) {
                return Err(format!("message {} (tag {}, size {}, capacity {}): byte {} past the message was overwritten", m.index, m.tag, m.size, m.capacity, m.size + p));
            }
        }
        total += m.size;
    }
    Ok(total)
}

/// A posted request and what it must report.
struct Posted {
    req: Opaque,
    /// Index into the progress thread's active works.
    work: usize,
    /// Sender: the slot of the one message; receiver: unused (all slots).
    slot: usize,
}

struct Active {
    work: Work,
    /// Sender: next position in `send_order` to post; receiver: 0 or 1 (posted).
    next: usize,
    outstanding: usize,
}

#[allow(clippy::too_many_arguments)]
fn progress_loop(
    plugin: &Plugin,
    groups: &[Group],
    comm: Opaque,
    sending: bool,
    work_rx: Receiver<Work>,
    done_tx: Sender<Work>,
    timeout: Duration,
    kill: Option<(usize, u32)>,
    report_every: usize,
) -> Result<Outcome, String> {
    let mut started: Option<Instant> = None;
    let mut next_report = if report_every > 0 {
        report_every
    } else {
        usize::MAX
    };
    let mut queue: VecDeque<Active> = VecDeque::new();
    let mut posted: Vec<Posted> = Vec::new();
    let mut input_open = true;
    let mut completed_msgs = 0usize;
    let mut bytes = 0usize;
    let mut max_inflight = 0usize;
    let mut null_retries = 0usize;
    let mut last_progress = Instant::now();
    let mut killed_at: Option<Instant> = None;
    // Active works are addressed by absolute position; `base` counts those already retired.
    let mut base = 0usize;
    let peer_kill = |op: &str, e: &dyn std::fmt::Display, code: c_int, at: Instant| -> ! {
        let ms = at.elapsed().as_millis();
        let expected = code == ncclRemoteError || code == ncclSystemError;
        println!(
            "PEER-KILL: {op}: {e}; {ms} ms after the kill; expected code: {}",
            if expected { "yes" } else { "no" }
        );
        std::process::exit(if expected { 3 } else { 1 });
    };
    loop {
        while input_open {
            match work_rx.try_recv() {
                Ok(w) => queue.push_back(Active {
                    work: w,
                    next: 0,
                    outstanding: 0,
                }),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => input_open = false,
            }
        }
        if !input_open && queue.is_empty() {
            break;
        }
        let mut progressed = false;

        // Post in order: operations on one comm match in posting order, so a later group may not
        // be posted before an earlier one is fully posted.
        'post: for (qi, a) in queue.iter_mut().enumerate() {
            let g = &groups[a.work.group];
            let total = if sending { g.msgs.len() } else { 1 };
            while a.next < total {
                if posted.len() >= MAX_REQUESTS {
                    break 'post;
                }
                let result = if sending {
                    let slot = g.send_order[a.next];
                    let m = &g.msgs[slot];
                    // SAFETY: the buffer lives in `a.work` until the request completes and the work
                    // is sent back; it is registered under `mhs[slot]`.
                    unsafe {
                        plugin.isend(
                            comm,
                            a.work.bufs[slot].as_mut_ptr(),
                            m.size,
                            m.tag,
                            a.work.mhs[slot],
                        )
                    }
                    .map(|r| (r, slot))
                } else {
                    let mut data: Vec<*mut c_void> = a
                        .work
                        .bufs
                        .iter_mut()
                        .map(|b| b.as_mut_ptr().cast())
                        .collect();
                    let caps: Vec<usize> = g.msgs.iter().map(|m| m.capacity).collect();
                    let mut tags: Vec<c_int> = g.msgs.iter().map(|m| m.tag).collect();
                    let mut mhs: Vec<*mut c_void> = a.work.mhs.iter().map(|m| m.0).collect();
                    let preset = if g.preset_one {
                        PRESET_REQUEST
                    } else {
                        std::ptr::null_mut()
                    };
                    // SAFETY: as for isend: the buffers stay in `a.work`, registered, until completion.
                    let r = unsafe {
                        plugin.irecv(comm, &mut data, &caps, &mut tags, &mut mhs, preset)
                    };
                    match r {
                        Ok(req) if req.0 == PRESET_REQUEST => {
                            return Err(format!(
                                "group {}: irecv left the pre-set (void*)1 request in place",
                                a.work.group
                            ));
                        }
                        other => other.map(|req| (req, 0)),
                    }
                };
                match result {
                    Ok((req, _)) if req.is_null() => {
                        null_retries += 1;
                        break 'post;
                    }
                    Ok((req, slot)) => {
                        started.get_or_insert_with(Instant::now);
                        posted.push(Posted {
                            req,
                            work: base + qi,
                            slot,
                        });
                        a.next += 1;
                        a.outstanding += 1;
                        progressed = true;
                        max_inflight = max_inflight.max(posted.len());
                    }
                    Err(e) => {
                        if let Some(at) = killed_at {
                            peer_kill(if sending { "isend" } else { "irecv" }, &e, e.code, at);
                        }
                        let m = &g.msgs[if sending { g.send_order[a.next] } else { 0 }];
                        return Err(format!(
                            "group {} message {} (tag {}, size {}): {e}",
                            a.work.group, m.index, m.tag, m.size
                        ));
                    }
                }
            }
        }

        let mut i = 0;
        while i < posted.len() {
            let p = &posted[i];
            let a = &mut queue[p.work - base];
            let g = &groups[a.work.group];
            let mut sizes = vec![-1 as c_int; g.msgs.len()];
            match plugin.test(p.req, &mut sizes) {
                Ok(false) => i += 1,
                Ok(true) => {
                    progressed = true;
                    if sending {
                        let m = &g.msgs[p.slot];
                        if sizes[0] as i64 != m.size as i64 {
                            return Err(format!(
                                "send of message {} (tag {}, size {}): test reported size {}",
                                m.index, m.tag, m.size, sizes[0]
                            ));
                        }
                        completed_msgs += 1;
                        bytes += m.size;
                    } else {
                        for (m, &s) in g.msgs.iter().zip(&sizes) {
                            if s as i64 != m.size as i64 {
                                return Err(format!("receive of message {} (tag {}, size {}): test reported size {s}", m.index, m.tag, m.size));
                            }
                            completed_msgs += 1;
                            bytes += m.size;
                        }
                    }
                    a.outstanding -= 1;
                    posted.swap_remove(i);
                }
                Err(e) => {
                    if let Some(at) = killed_at {
                        peer_kill("test", &e, e.code, at);
                    }
                    let m = &g.msgs[if sending { p.slot } else { 0 }];
                    return Err(format!(
                        "group {} (first message {}, tag {}, size {}): {e}",
                        a.work.group, m.index, m.tag, m.size
                    ));
                }
            }
        }

        if completed_msgs >= next_report {
            let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-9);
            println!(
                "SOAK progress: {completed_msgs} messages, {bytes} bytes, {secs:.1} s: {:.1} MB/s, {:.0} messages/s",
                bytes as f64 / secs / 1e6,
                completed_msgs as f64 / secs
            );
            next_report = (completed_msgs / report_every + 1) * report_every;
        }

        // Retire fully completed groups from the front, keeping positions stable for `posted`.
        while let Some(a) = queue.front() {
            let total = if sending {
                groups[a.work.group].msgs.len()
            } else {
                1
            };
            if a.next < total || a.outstanding > 0 {
                break;
            }
            let a = queue.pop_front().expect("front exists");
            base += 1;
            // The service side may already have given up; then the buffers are simply dropped.
            let _ = done_tx.send(a.work);
        }

        if let (Some((after, pid)), None) = (kill, killed_at) {
            if completed_msgs >= after && !posted.is_empty() {
                // SAFETY: plain syscall on the receiver child this process spawned.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                println!("PEER-KILL: receiver {pid} killed after {completed_msgs} messages with {} requests in flight", posted.len());
                killed_at = Some(Instant::now());
            }
        }

        if progressed {
            last_progress = Instant::now();
        } else {
            if let Some(at) = killed_at {
                if at.elapsed() > timeout {
                    return Err(format!(
                        "peer killed {:?} ago and no call reported an error",
                        at.elapsed()
                    ));
                }
            }
            if last_progress.elapsed() > timeout {
                return Err(format!(
                    "no progress for {timeout:?}: {} requests in flight, {} groups queued, {completed_msgs} messages done",
                    posted.len(),
                    queue.len()
                ));
            }
            std::thread::yield_now();
        }
    }
    if let Some(at) = killed_at {
        return Err(format!(
            "peer killed {:?} before the end and no call reported an error",
            at.elapsed()
        ));
    }
    Ok(Outcome {
        messages: completed_msgs,
        bytes,
        max_inflight,
        null_retries,
        digest: 0,
        elapsed: started.map_or(Duration::ZERO, |t| t.elapsed()),
    })
}
