//! Link-down test of the net plugin through its C ABI, for two hosts (or guests) joined by one
//! wire: each end opens a send and a receive comm to the other and streams both ways. Then the
//! `down` end asks the `peer` end (over the TCP connection the handles travelled on) to stop
//! sending, so that one direction keeps transferring while the other waits for data, and takes its
//! own link down (what `ip link set dev IF down` does: SIOCSIFFLAGS without IFF_UP) with requests
//! outstanding on both comms. Its calls on both comms must fail within `--bound-ms` of that, with
//! `ncclRemoteError` and a warning naming `IBV_EVENT_PORT_ERR` and the device port.
//!
//! Without async events the sending comm still fails soon (a write cut off mid-message fails
//! locally), but the receiving comm waits for data that never comes: it fails only if the
//! bootstrap socket closes, which it cannot over a wire that is down.
//!
//! The `peer` end cannot see the event: its port stays up. It streams until a call fails (its own
//! writes toward the vanished end run out of retries; lower `NCCL_IB_TIMEOUT` to make that quick)
//! or until, after the pause, it has made no progress for `--peer-wait` seconds; it reports which
//! and closes.
//!
//! ```text
//! scripts/softroce run2 --timeout 600 \
//!   --a 'target/debug/examples/link_down --role down --listen-on $HALO_GUEST_IP:18800 --ifname eth0' \
//!   --b 'NCCL_IB_TIMEOUT=14 target/debug/examples/link_down --role peer --connect $HALO_PEER_IP:18800'
//! ```
//!
//! Exit status 0 and `LINK DOWN PASS` on success, 1 on failure (the reason is printed), 2 on a
//! usage error.

use halo_ffi::{ncclRemoteError, NCCL_NET_HANDLE_MAXSIZE};
use halo_harness::driver::{handle_from_hex, handle_to_hex, result_name, NetError, Opaque, Plugin};
use halo_harness::log::{logger, LogSink};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::ptr::null_mut;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TAG: c_int = 7;
/// Requests kept outstanding per comm.
const WINDOW: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Peer,
}

struct Options {
    plugin: PathBuf,
    version: u32,
    role: Role,
    listen_on: Option<String>,
    connect: Option<String>,
    ifname: String,
    size: usize,
    after: usize,
    bound: Duration,
    peer_wait: Duration,
    timeout: Duration,
}

const USAGE: &str = "usage: link_down --role down|peer (--listen-on IP:PORT | --connect IP:PORT) \
[--plugin PATH] [--version N] [--ifname eth0] [--size BYTES] [--after MESSAGES] [--bound-ms MS] \
[--peer-wait SECS] [--timeout SECS]";

fn parse() -> Result<Options, String> {
    let mut o = Options {
        plugin: halo_harness::artifacts::plugin_library_if_built().unwrap_or_default(),
        version: 10,
        role: Role::Peer,
        listen_on: None,
        connect: None,
        ifname: "eth0".into(),
        size: 256 << 10,
        after: 40,
        bound: Duration::from_millis(2000),
        peer_wait: Duration::from_secs(20),
        timeout: Duration::from_secs(120),
    };
    let mut role = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value\n{USAGE}"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{a} {s}: {e}"));
        match a.as_str() {
            "--plugin" => o.plugin = PathBuf::from(val()?),
            "--version" => o.version = num(val()?)? as u32,
            "--role" => {
                role = Some(match val()?.as_str() {
                    "down" => Role::Down,
                    "peer" => Role::Peer,
                    r => return Err(format!("unknown role {r}\n{USAGE}")),
                })
            }
            "--listen-on" => o.listen_on = Some(val()?),
            "--connect" => o.connect = Some(val()?),
            "--ifname" => o.ifname = val()?,
            "--size" => o.size = num(val()?)?.max(1) as usize,
            "--after" => o.after = num(val()?)? as usize,
            "--bound-ms" => o.bound = Duration::from_millis(num(val()?)?),
            "--peer-wait" => o.peer_wait = Duration::from_secs(num(val()?)?),
            "--timeout" => o.timeout = Duration::from_secs(num(val()?)?),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    o.role = role.ok_or(format!("--role is required\n{USAGE}"))?;
    if o.listen_on.is_some() == o.connect.is_some() {
        return Err(format!("give one of --listen-on and --connect\n{USAGE}"));
    }
    if o.plugin.as_os_str().is_empty() {
        return Err("no plugin next to this program: pass --plugin PATH".into());
    }
    Ok(o)
}

/// Every log line of the plugin, kept for the checks and echoed on stderr.
static LOG: Mutex<Vec<(Instant, c_int, String)>> = Mutex::new(Vec::new());

struct Keep;

impl LogSink for Keep {
    fn line(level: c_int, file: &str, line: c_int, msg: &str) {
        if level <= 2 {
            eprintln!("[log {level}] {file}:{line} {msg}");
        }
        LOG.lock().unwrap_or_else(|e| e.into_inner()).push((
            Instant::now(),
            level,
            msg.to_string(),
        ));
    }
}

/// The two ends swap their listen handles over one TCP connection, which stays open as the
/// control channel (`pause` from the down end).
fn swap_handles(
    o: &Options,
    mine: &[u8; NCCL_NET_HANDLE_MAXSIZE],
) -> Result<([u8; NCCL_NET_HANDLE_MAXSIZE], TcpStream), String> {
    let stream = if let Some(addr) = &o.listen_on {
        let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        l.accept().map_err(|e| format!("accept on {addr}: {e}"))?.0
    } else {
        let addr = o.connect.as_deref().unwrap_or_default();
        let t0 = Instant::now();
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                    return Err(format!("connect {addr}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{}", handle_to_hex(mine)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| format!("reading the peer's handle: {e}"))?;
    Ok((handle_from_hex(line.trim())?, stream))
}

/// Takes interface `ifname` down, as `ip link set dev IFNAME down` does.
fn set_link_down(ifname: &str) -> Result<(), String> {
    let err = |what: &str| format!("{what} {ifname}: {}", std::io::Error::last_os_error());
    // SAFETY: ifreq is plain old data for which all-zero bytes are valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.is_empty() || ifname.len() >= ifr.ifr_name.len() {
        return Err(format!("bad interface name {ifname:?}"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(err("socket for"));
    }
    // SAFETY: fd is a socket and ifr a valid ifreq naming the interface; the kernel reads and
    // writes only the ifreq.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            Err(err("SIOCGIFFLAGS"))
        } else {
            ifr.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
                Err(err("SIOCSIFFLAGS"))
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    r
}

/// One comm's stream: `WINDOW` slots of `size` bytes in one registered buffer.
struct Flow {
    name: &'static str,
    send: bool,
    comm: Opaque,
    buf: Vec<u8>,
    mh: Opaque,
    free: Vec<usize>,
    pending: VecDeque<(Opaque, usize)>,
    done: usize,
    last_progress: Instant,
    failed: Option<(Instant, NetError)>,
}

impl Flow {
    fn new(
        p: &Plugin,
        name: &'static str,
        send: bool,
        comm: Opaque,
        size: usize,
    ) -> Result<Flow, String> {
        let mut buf = vec![0x5au8; size * WINDOW];
        let mh = p
            .reg_mr(comm, buf.as_mut_ptr(), buf.len())
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Flow {
            name,
            send,
            comm,
            buf,
            mh,
            free: (0..WINDOW).collect(),
            pending: VecDeque::new(),
            done: 0,
            last_progress: Instant::now(),
            failed: None,
        })
    }

    /// Posts into every free slot (until the plugin says "not yet").
    fn post(&mut self, p: &Plugin, size: usize) {
        while self.failed.is_none() {
            let Some(&slot) = self.free.last() else {
                return;
            };
            // SAFETY: the slot lies in `buf`, registered under `mh`, and is not reused before
            // its request completes.
            let ptr = unsafe { self.buf.as_mut_ptr().add(slot * size) };
            let r = if self.send {
                // SAFETY: as above.
                unsafe { p.isend(self.comm, ptr, size, TAG, self.mh) }
            } else {
                let mut data = [ptr.cast::<c_void>()];
                let mut tags = [TAG];
                let mut mhs = [self.mh.0];
                // SAFETY: as above.
                unsafe {
                    p.irecv(
                        self.comm,
                        &mut data,
                        &[size],
                        &mut tags,
                        &mut mhs,
                        null_mut(),
                    )
                }
            };
            match r {
                Ok(req) if req.is_null() => return,
                Ok(req) => {
                    self.free.pop();
                    self.pending.push_back((req, slot));
                }
                Err(e) => {
                    self.failed = Some((Instant::now(), e));
                    return;
                }
            }
        }
    }

    /// Tests every pending request once.
    fn test(&mut self, p: &Plugin, size: usize) -> Result<(), String> {
        let mut i = 0;
        while i < self.pending.len() && self.failed.is_none() {
            let (req, slot) = self.pending[i];
            let mut sizes = [0 as c_int];
            match p.test(req, &mut sizes) {
                Ok(false) => i += 1,
                Ok(true) => {
                    if !self.send && sizes[0] as usize != size {
                        return Err(format!(
                            "{}: received {} bytes, expected {size}",
                            self.name, sizes[0]
                        ));
                    }
                    self.pending.remove(i);
                    self.free.push(slot);
                    self.done += 1;
                    self.last_progress = Instant::now();
                }
                Err(e) => self.failed = Some((Instant::now(), e)),
            }
        }
        Ok(())
    }

    fn close(self, p: &Plugin) -> Result<(), String> {
        p.dereg_mr(self.comm, self.mh)
            .map_err(|e| format!("{}: {e}", self.name))?;
        let r = if self.send {
            p.close_send(self.comm)
        } else {
            p.close_recv(self.comm)
        };
        r.map_err(|e| format!("{}: {e}", self.name))
    }
}

fn run(o: &Options) -> Result<(), String> {
    let mut p = Plugin::load(&o.plugin, o.version)?;
    p.init(logger::<Keep>(), 0x11D0)
        .map_err(|e| e.to_string())?;
    let dev = p.properties(0).map_err(|e| e.to_string())?;
    let at = format!("{}:{}", dev.name, dev.port);
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let listen = p.listen(0, &mut handle).map_err(|e| e.to_string())?;
    let (mut peer, mut control) = swap_handles(o, &handle)?;
    control.set_nonblocking(true).map_err(|e| e.to_string())?;
    let (mut send, mut recv) = (Opaque(null_mut()), Opaque(null_mut()));
    let t0 = Instant::now();
    while send.is_null() || recv.is_null() {
        if send.is_null() {
            send = p.connect(0, &mut peer).map_err(|e| e.to_string())?;
        }
        if recv.is_null() {
            recv = p.accept(listen).map_err(|e| e.to_string())?;
        }
        if t0.elapsed() > o.timeout {
            return Err("connect/accept: no connection".into());
        }
    }
    p.close_listen(listen).map_err(|e| e.to_string())?;
    let mut flows = [
        Flow::new(&p, "send comm", true, send, o.size)?,
        Flow::new(&p, "recv comm", false, recv, o.size)?,
    ];
    println!(
        "link_down: {at} connected both ways, streaming {} KiB messages",
        o.size >> 10
    );

    let start = Instant::now();
    let mut paused_at: Option<Instant> = None;
    let mut down_at: Option<Instant> = None;
    let mut peer_paused = false;
    let mut control_buf = Vec::new();
    let result = loop {
        if start.elapsed() > o.timeout {
            break Err(format!("no outcome within {:?}", o.timeout));
        }
        for f in &mut flows {
            // A paused peer keeps receiving but sends nothing more.
            if !(peer_paused && f.send) {
                f.post(&p, o.size);
            }
            f.test(&p, o.size)?;
        }
        match (o.role, paused_at, down_at) {
            (Role::Down, _, None) if flows.iter().any(|f| f.failed.is_some()) => {
                let f = flows
                    .iter()
                    .find(|f| f.failed.is_some())
                    .expect("one failed");
                let e = f
                    .failed
                    .as_ref()
                    .map(|(_, e)| e.to_string())
                    .unwrap_or_default();
                break Err(format!("{} failed before the link went down: {e}", f.name));
            }
            (Role::Down, None, _) if flows.iter().all(|f| f.done >= o.after) => {
                control
                    .write_all(b"pause\n")
                    .map_err(|e| format!("telling the peer to pause: {e}"))?;
                paused_at = Some(Instant::now());
            }
            // Down once the peer's last messages have landed: our receives now wait for data,
            // our sends still stream.
            (Role::Down, Some(t), None)
                if t.elapsed() > Duration::from_millis(500)
                    && flows[1].last_progress.elapsed() > Duration::from_millis(300)
                    && !flows[1].pending.is_empty() =>
            {
                let asked = Instant::now();
                set_link_down(&o.ifname)?;
                // The port goes down at the end of the call (the netdev notifiers run last).
                let t = Instant::now();
                println!(
                    "link_down: {} down (the call took {} ms) after {} sends and {} receives, \
                     {} sends and {} receives outstanding",
                    o.ifname,
                    (t - asked).as_millis(),
                    flows[0].done,
                    flows[1].done,
                    flows[0].pending.len(),
                    flows[1].pending.len()
                );
                down_at = Some(t);
            }
            (Role::Down, _, Some(t)) => {
                if flows.iter().all(|f| f.failed.is_some()) {
                    break Ok(t);
                }
                if t.elapsed() > o.bound * 20 {
                    break Err(format!(
                        "{} still without an error {:?} after the link went down",
                        flows
                            .iter()
                            .filter(|f| f.failed.is_none())
                            .map(|f| f.name)
                            .collect::<Vec<_>>()
                            .join(" and "),
                        t.elapsed()
                    ));
                }
            }
            (Role::Peer, ..) => {
                if !peer_paused {
                    let mut chunk = [0u8; 64];
                    match std::io::Read::read(&mut control, &mut chunk) {
                        Ok(n) => control_buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => break Err(format!("control connection: {e}")),
                    }
                    if control_buf.starts_with(b"pause\n") {
                        println!(
                            "link_down: peer stops sending after {} sends",
                            flows[0].done
                        );
                        peer_paused = true;
                    }
                }
                if flows.iter().any(|f| f.failed.is_some()) {
                    break Ok(start);
                }
                // Before the pause a stall is only a retransmission (a lost frame waits for the
                // transport timeout): keep waiting.
                if !peer_paused {
                    continue;
                }
                let idle = flows
                    .iter()
                    .map(|f| f.last_progress.elapsed())
                    .min()
                    .unwrap_or_default();
                if idle > o.peer_wait {
                    println!(
                        "link_down: peer made no progress for {idle:?} and saw no error; closing"
                    );
                    break Ok(start);
                }
            }
            _ => {}
        }
    };
    let outcome = result.and_then(|t| check(o, &at, &flows, t));
    for f in flows {
        f.close(&p)?;
    }
    p.finalize().map_err(|e| e.to_string())?;
    outcome
}

/// The verdict of the run, from the flows' errors and the log.
fn check(o: &Options, at: &str, flows: &[Flow], down: Instant) -> Result<(), String> {
    if o.role == Role::Peer {
        for f in flows {
            if let Some((when, e)) = &f.failed {
                println!(
                    "link_down: peer {} failed {} ms after its last progress: {e}",
                    f.name,
                    when.duration_since(f.last_progress).as_millis()
                );
            }
        }
        return Ok(());
    }
    let mut worst = Duration::ZERO;
    for f in flows {
        let Some((when, e)) = &f.failed else {
            return Err(format!("{}: no call failed", f.name));
        };
        let delay = when.duration_since(down);
        worst = worst.max(delay);
        println!(
            "link_down: {} failed {} ms after the link went down: {e}",
            f.name,
            delay.as_millis()
        );
        if e.code != ncclRemoteError {
            return Err(format!(
                "{}: expected ncclRemoteError, got {}",
                f.name,
                result_name(e.code)
            ));
        }
    }
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let Some((logged, ..)) = log.iter().find(|(_, level, msg)| {
        *level == 2 && msg.contains("IBV_EVENT_PORT_ERR") && msg.contains(at)
    }) else {
        return Err(format!("no warning names IBV_EVENT_PORT_ERR and {at}"));
    };
    println!(
        "link_down: the warning naming the event came {} ms after the link went down",
        logged.saturating_duration_since(down).as_millis()
    );
    if worst > o.bound {
        return Err(format!(
            "the comms failed {} ms after the link went down (bound {} ms)",
            worst.as_millis(),
            o.bound.as_millis()
        ));
    }
    println!(
        "link_down: both comms failed within {} ms (bound {} ms)",
        worst.as_millis(),
        o.bound.as_millis()
    );
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("link_down: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(()) => {
            println!("LINK DOWN PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("link_down: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}
