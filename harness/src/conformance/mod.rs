//! The conformance run of a net plugin: loads any `ncclNet_vN` plugin `.so`, picks one table and
//! moves seeded random traffic between a sender and a receiver process the way RCCL's proxy does
//! (connect/accept polled, regMr on a service thread, isend/irecv/test on a progress thread, up to
//! 32 outstanding requests, multi-receives with shuffled tags, NULL-request retries, `(void*)1`
//! pre-set receive requests). Every byte and every size reported by `test` is checked.
//!
//! [`run`] is one side (or, with [`Role::Both`], both: the receiver is a child process started
//! as [`Options::receiver`] says). `examples/conformance` and `halo conformance` are its
//! command lines.

use crate::driver::{handle_from_hex, handle_to_hex, Opaque, Plugin};
use crate::log::stderr_logger;
use crate::rng::SplitMix64;
use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use std::ffi::{c_int, c_void, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod exchange;
use exchange::exchange;

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
pub enum Role {
    Send,
    Recv,
    Both,
}

pub struct Options {
    pub plugin: PathBuf,
    pub version: u32,
    pub role: Role,
    pub peer_file: Option<PathBuf>,
    pub listen_on: Option<String>,
    pub connect: Option<String>,
    pub messages: usize,
    pub max_size: usize,
    pub seed: u64,
    pub timeout: Duration,
    pub kill_peer_after: Option<usize>,
    /// Soak mode: sizes 0 B ..= 64 KiB with 1 % up to `max_size`; every message's checksum goes
    /// into a digest that both sides print (`SOAK` line) and must agree on.
    pub soak: bool,
    /// Soak mode: a progress line every this many messages (0: none).
    pub report_every: usize,
    /// Set on the receiver child of `--role both`: print the handle on stdout.
    pub handle_on_stdout: bool,
    /// How `Role::Both` starts its receiver: the program and the arguments that come before the
    /// run's own (`--plugin … --role recv …`), e.g. `halo` and `["conformance"]`.
    pub receiver: (OsString, Vec<OsString>),
}

impl Options {
    /// The defaults of every run; `plugin` and `version` must be set.
    pub fn new(plugin: PathBuf, version: u32) -> Options {
        Options {
            plugin,
            version,
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
            receiver: (
                std::env::current_exe()
                    .map(PathBuf::into_os_string)
                    .unwrap_or_else(|_| "conformance".into()),
                Vec::new(),
            ),
        }
    }

    /// The arguments that make another process the receiver of this run.
    fn receiver_args(&self) -> Vec<OsString> {
        let mut a = self.receiver.1.clone();
        a.push("--plugin".into());
        a.push(self.plugin.clone().into_os_string());
        for (k, v) in [
            ("--version", self.version.to_string()),
            ("--role", "recv".into()),
            ("--messages", self.messages.to_string()),
            ("--max-size", self.max_size.to_string()),
            ("--seed", self.seed.to_string()),
            ("--timeout", self.timeout.as_secs().to_string()),
        ] {
            a.push(k.into());
            a.push(v.into());
        }
        // Soak options only when used: `halo conformance`'s receiver does not take them.
        if self.soak {
            a.push("--soak".into());
        }
        if self.report_every > 0 {
            a.push("--report-every".into());
            a.push(self.report_every.to_string().into());
        }
        a.push("--handle-on-stdout".into());
        a
    }
}

/// [`SplitMix64`] with sizes and indices as `usize`: identical on both sides.
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
pub(crate) struct Message {
    index: usize,
    size: usize,
    capacity: usize,
    tag: c_int,
}

/// One multi-receive: `msgs` in receive-slot order, `send_order` the order the sender posts them.
#[derive(Clone, Debug)]
pub(crate) struct Group {
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
pub(crate) struct Work {
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

pub(crate) struct Outcome {
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

/// One conformance run; prints its summary and `CONFORMANCE PASS` on stdout when it passed.
pub fn run(opts: &Options) -> Result<(), String> {
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
        let mut c = Command::new(&opts.receiver.0)
            .args(opts.receiver_args())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn words(o: &Options) -> Vec<String> {
        o.receiver_args()
            .into_iter()
            .map(|w| w.into_string().unwrap())
            .collect()
    }

    #[test]
    fn the_receiver_gets_soak_options_only_in_a_soak_run() {
        let mut o = Options::new(PathBuf::from("/p.so"), 10);
        let plain = words(&o);
        assert!(plain.iter().all(|w| w != "--soak" && w != "--report-every"));
        assert_eq!(plain.last().map(String::as_str), Some("--handle-on-stdout"));
        o.soak = true;
        o.report_every = 500;
        let soak = words(&o);
        assert!(soak.iter().any(|w| w == "--soak"));
        let at = soak.iter().position(|w| w == "--report-every").unwrap();
        assert_eq!(soak[at + 1], "500");
    }
}
