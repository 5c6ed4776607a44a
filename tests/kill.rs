//! The peer SIGKILLed at a random point of connect, of a transfer and of close, 20 runs each:
//! every call of the surviving side that cannot succeed any more returns an error within 30 s
//! (it is watched for 30 s after the kill), none hangs, nothing crashes, and the survivor's
//! comms close promptly afterwards. The time from the kill to the first error is printed per
//! phase (median and max).
//!
//! One guest: the survivor is this test process, driving the plugin through its v8 table; the
//! peer is the same test binary run again as a child (`HALO_KILL_PEER`), over rxe0's loopback.
//! Runs alternate directions: the survivor connects and sends (the peer listens, accepts and
//! receives), or the survivor listens, accepts and receives (the peer connects and sends).
//! A connecting peer identifies itself (its hello) as soon as its TCP connection is up, before it
//! builds its queue pairs; killed after that, the listener's accept fails at once. Killed before
//! (in the few microseconds between its `CONNECTING` line and its hello), it is, to the listener,
//! a peer that never came: the accept fails at `HALO_CONNECT_TIMEOUT_MS` (60 s by default, 5 s
//! here); such runs are counted apart from the 30 s bound and reported.
//! Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1`.

mod common;

use halo_ffi::*;
use halo_harness::driver::{handle_from_hex, handle_to_hex};
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_int, c_void};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

/// How long a surviving call may take to report the peer's death.
const BOUND: Duration = Duration::from_secs(30);
const RUNS: usize = 20;
/// The listener's deadline for a peer to complete a connection, in this test.
const CONNECT_TIMEOUT_MS: &str = "5000";
const MSG: usize = 64 << 10;
const TAG: c_int = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connect,
    Transfer,
    Close,
}

/// The survivor's side of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Connects and sends; the peer listens, accepts and receives.
    Sender,
    /// Listens, accepts and receives; the peer connects and sends.
    Receiver,
}

use halo_harness::rng::SplitMix64 as Rng;

fn ok(r: ncclResult_t, what: &str) -> Result<(), String> {
    if r == ncclSuccess {
        Ok(())
    } else {
        Err(format!("{what}: {}", halo_harness::driver::result_name(r)))
    }
}

/// A registered host buffer.
struct Buf {
    mem: Vec<u8>,
    mh: *mut c_void,
}

/// # Safety
/// `comm` is a live comm of the plugin.
unsafe fn reg(comm: *mut c_void, len: usize) -> Result<Buf, String> {
    let mut mem = vec![0x5Au8; len];
    let mut mh = null_mut();
    // SAFETY: `comm` is live (the caller's contract); `mem` stays allocated, unmoved, for as long
    // as the returned Buf, which is deregistered before its comm closes.
    let r =
        unsafe { NET.regMr.unwrap()(comm, mem.as_mut_ptr().cast(), len, NCCL_PTR_HOST, &mut mh) };
    ok(r, "regMr")?;
    Ok(Buf { mem, mh })
}

/// Keeps one send (or receive) per buffer of MSG bytes going and tests them, until a call fails
/// (returned as `Err`) or `stop()` says so (`Ok`).
///
/// # Safety
/// `comm` is a live send comm (`send`) or receive comm, and `bufs` are registered on it.
unsafe fn stream(
    comm: *mut c_void,
    send: bool,
    bufs: &mut [Buf],
    mut stop: impl FnMut() -> bool,
) -> Result<(), String> {
    let mut reqs: Vec<Option<*mut c_void>> = vec![None; bufs.len()];
    loop {
        if stop() {
            return Ok(());
        }
        for (b, r) in bufs.iter_mut().zip(reqs.iter_mut()) {
            if r.is_none() {
                let mut req = null_mut();
                // SAFETY: the buffer is registered on `comm` and is not in flight (its slot has no
                // request); it outlives the request, which is tested until done below.
                let res = unsafe {
                    if send {
                        NET.isend.unwrap()(
                            comm,
                            b.mem.as_mut_ptr().cast(),
                            MSG as c_int,
                            TAG,
                            b.mh,
                            &mut req,
                        )
                    } else {
                        let mut data = b.mem.as_mut_ptr().cast::<c_void>();
                        let mut size = MSG as c_int;
                        let mut tag = TAG;
                        let mut mh = b.mh;
                        NET.irecv.unwrap()(
                            comm, 1, &mut data, &mut size, &mut tag, &mut mh, &mut req,
                        )
                    }
                };
                ok(res, if send { "isend" } else { "irecv" })?;
                if !req.is_null() {
                    *r = Some(req);
                }
            }
            if let Some(req) = *r {
                let (mut done, mut size) = (0, 0);
                // SAFETY: `req` is a live request of this comm, not yet reported done.
                let res = unsafe { NET.test.unwrap()(req, &mut done, &mut size) };
                ok(res, "test")?;
                if done != 0 {
                    *r = None;
                }
            }
        }
    }
}

/// The peer, in the child process: never returns (exits, or is killed).
fn peer(role: &str) -> ! {
    let side = std::env::var("HALO_KILL_SIDE").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let r = (|| -> Result<(), String> {
        // SAFETY: the plugin's own v8 table; every comm and buffer below is used only while live.
        unsafe {
            ok(
                NET.init.unwrap()(halo_harness::log::stderr_logger()),
                "init",
            )?;
            let close = role == "close";
            if side == "sender" {
                // The survivor sends: the peer listens and receives.
                let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
                let mut lc = null_mut();
                ok(
                    NET.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
                    "listen",
                )?;
                println!("HANDLE {}", handle_to_hex(&handle));
                let mut rc: *mut c_void = null_mut();
                while rc.is_null() {
                    ok(NET.accept.unwrap()(lc, &mut rc, null_mut()), "accept")?;
                    if Instant::now() > deadline {
                        return Err("accept timed out".into());
                    }
                }
                println!("CONNECTED");
                let mut bufs = vec![reg(rc, MSG)?, reg(rc, MSG)?];
                let mut n = 0u64;
                stream(rc, false, &mut bufs, || {
                    n += 1;
                    close && n == 200
                })?;
                println!("CLOSING");
                ok(NET.closeRecv.unwrap()(rc), "closeRecv")?;
            } else {
                // The survivor receives: the peer connects and sends.
                let hex = std::env::var("HALO_KILL_HANDLE").unwrap();
                let mut handle = handle_from_hex(&hex)?;
                println!("CONNECTING");
                let mut sc: *mut c_void = null_mut();
                while sc.is_null() {
                    ok(
                        NET.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut sc, null_mut()),
                        "connect",
                    )?;
                    if Instant::now() > deadline {
                        return Err("connect timed out".into());
                    }
                }
                println!("CONNECTED");
                let mut bufs = vec![reg(sc, MSG)?, reg(sc, MSG)?];
                let mut n = 0u64;
                stream(sc, true, &mut bufs, || {
                    n += 1;
                    close && n == 200
                })?;
                println!("CLOSING");
                ok(NET.closeSend.unwrap()(sc), "closeSend")?;
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        eprintln!("kill peer: {e}");
    }
    // Wait to be killed.
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::process::exit(0);
}

/// Reads the child's stdout lines on a thread; `wait_for` blocks until a line holds the prefix
/// (returning what follows it) or the child's output ends.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn new(child: &mut Child) -> Lines {
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    fn wait_for(&self, prefix: &str) -> Result<String, String> {
        loop {
            match self.0.recv_timeout(Duration::from_secs(60)) {
                // The test harness may print its own words before ours on the same line.
                Ok(l) => {
                    if let Some(at) = l.find(prefix) {
                        return Ok(l[at + prefix.len()..].trim().to_string());
                    }
                }
                Err(e) => return Err(format!("peer never printed {prefix:?}: {e}")),
            }
        }
    }

    fn seen(&self, prefix: &str) -> bool {
        while let Ok(l) = self.0.try_recv() {
            if l.contains(prefix) {
                return true;
            }
        }
        false
    }
}

fn spawn_peer(phase: Phase, side: Side, handle: Option<&str>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "kill_peer_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        "HALO_KILL_PEER",
        match phase {
            Phase::Close => "close",
            _ => "run",
        },
    )
    .env(
        "HALO_KILL_SIDE",
        match side {
            Side::Sender => "sender",
            Side::Receiver => "receiver",
        },
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(h) = handle {
        c.env("HALO_KILL_HANDLE", h);
    }
    c.spawn().expect("spawn the peer")
}

fn kill(child: &mut Child) -> Instant {
    let t = Instant::now();
    // SAFETY: plain syscall on our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    t
}

/// What one run saw: the time from the kill to the first error, and which call it was.
struct Outcome {
    to_error: Duration,
    call: String,
}

/// One run: connects (or accepts), streams, kills the peer at a random point of `phase`, and
/// keeps calling until a call fails (at most BOUND after the kill).
fn one_run(phase: Phase, side: Side, rng: &mut Rng) -> Result<Outcome, String> {
    // SAFETY: the plugin's own v8 table (initialised by the caller); every comm and buffer below
    // is used only while live, and closed before returning.
    unsafe {
        let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
        let mut lc = null_mut();
        let (mut child, lines) = match side {
            Side::Sender => {
                let mut c = spawn_peer(phase, side, None);
                let l = Lines::new(&mut c);
                handle = handle_from_hex(&l.wait_for("HANDLE ")?)?;
                (c, l)
            }
            Side::Receiver => {
                ok(
                    NET.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
                    "listen",
                )?;
                let mut c = spawn_peer(phase, side, Some(&handle_to_hex(&handle)));
                let l = Lines::new(&mut c);
                l.wait_for("CONNECTING")?;
                (c, l)
            }
        };
        // Connect phase: the kill lands somewhere in the handshake. The connecting peer says who
        // it is, then builds its queue pairs (tens to hundreds of ms in the guest), then sends
        // its connection info.
        let mut killed: Option<Instant> = None;
        let window = match side {
            Side::Sender => 40_000,
            Side::Receiver => 600_000,
        };
        let kill_after = Duration::from_micros(rng.below(window));
        let t0 = Instant::now();
        let mut comm: *mut c_void = null_mut();
        let mut err: Option<String> = None;
        while comm.is_null() {
            if phase == Phase::Connect && killed.is_none() && t0.elapsed() >= kill_after {
                killed = Some(kill(&mut child));
            }
            let r = match side {
                Side::Sender => {
                    NET.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut comm, null_mut())
                }
                Side::Receiver => NET.accept.unwrap()(lc, &mut comm, null_mut()),
            };
            if let Err(e) = ok(
                r,
                if side == Side::Sender {
                    "connect"
                } else {
                    "accept"
                },
            ) {
                err = Some(e);
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = kill(&mut child);
                let _ = child.wait();
                return Err("connect/accept did not finish within 60 s".into());
            }
        }
        let close_comm = |comm: *mut c_void| -> Result<(), String> {
            if comm.is_null() {
                return Ok(());
            }
            let t = Instant::now();
            let r = match side {
                Side::Sender => NET.closeSend.unwrap()(comm),
                Side::Receiver => NET.closeRecv.unwrap()(comm),
            };
            ok(r, "close")?;
            if t.elapsed() > Duration::from_secs(5) {
                return Err(format!("close took {:?}", t.elapsed()));
            }
            Ok(())
        };
        if !lc.is_null() {
            ok(NET.closeListen.unwrap()(lc), "closeListen")?;
        }
        let mut bufs = Vec::new();
        let during_connect = killed.is_some();
        if err.is_none() {
            bufs = vec![reg(comm, MSG)?, reg(comm, MSG)?];
            // Transfer phase: a random point of the stream; close phase: the peer's close (it
            // closes after 200 rounds and then waits to be killed).
            let kill_after = Duration::from_micros(rng.below(300_000));
            let t1 = Instant::now();
            let mut closing_seen: Option<Instant> = None;
            let close_delay = Duration::from_micros(rng.below(2_000));
            let r = stream(comm, side == Side::Sender, &mut bufs, || {
                if killed.is_none() {
                    let due = match phase {
                        Phase::Connect => true,
                        Phase::Transfer => t1.elapsed() >= kill_after,
                        Phase::Close => {
                            if closing_seen.is_none() && lines.seen("CLOSING") {
                                closing_seen = Some(Instant::now());
                            }
                            closing_seen.is_some_and(|t| t.elapsed() >= close_delay)
                        }
                    };
                    if due {
                        killed = Some(kill(&mut child));
                    }
                }
                if t1.elapsed() > Duration::from_secs(90) {
                    return true;
                }
                killed.is_some_and(|k| k.elapsed() > BOUND)
            });
            if let Err(e) = r {
                err = Some(e);
            }
        }
        let _ = child.wait();
        let killed = killed.ok_or("the peer was never killed")?;
        let to_error = killed.elapsed();
        for b in bufs {
            // The comm may be failed: deregistration still works or says why; either is fine.
            let _ = NET.deregMr.unwrap()(comm, b.mh);
        }
        let call = err.map(|e| {
            if phase == Phase::Connect && !during_connect {
                format!("{e} (killed just after the handshake)")
            } else {
                e
            }
        });
        let Some(call) = call else {
            let _ = close_comm(comm);
            return Err(format!(
                "no call failed within {:?} of the peer's death",
                to_error
            ));
        };
        close_comm(comm)?;
        Ok(Outcome { to_error, call })
    }
}

#[test]
fn kill_peer_child() {
    // Only the re-run child does anything here.
    if let Ok(role) = std::env::var("HALO_KILL_PEER") {
        peer(&role);
    }
}

fn phase_runs(phase: Phase) {
    if std::env::var_os("HALO_KILL_PEER").is_some()
        || !common::have_rdma_device(&format!("kill::{phase:?}"))
    {
        return;
    }
    // Read at the first init of the process, whichever phase runs first.
    std::env::set_var("HALO_CONNECT_TIMEOUT_MS", CONNECT_TIMEOUT_MS);
    // SAFETY: the plugin's own v8 table, initialised once per process (init is idempotent).
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
    }
    let seed = std::env::var("HALO_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x4B11_u64 + phase as u64);
    let mut rng = Rng(seed);
    let mut times = Vec::new();
    let mut never_came = 0;
    for run in 0..RUNS {
        let side = if run % 2 == 0 {
            Side::Sender
        } else {
            Side::Receiver
        };
        let t = Instant::now();
        let o = one_run(phase, side, &mut rng)
            .unwrap_or_else(|e| panic!("{phase:?} run {run} ({side:?}, seed {seed}): {e}"));
        eprintln!(
            "kill {phase:?} run {run} ({side:?}): error {:.0?} after the kill, from {} (run {:.1?})",
            o.to_error,
            o.call,
            t.elapsed()
        );
        assert!(
            o.to_error <= BOUND,
            "{phase:?} run {run}: {:?} to the first error",
            o.to_error
        );
        // The listener's error names only the result code: an accept that failed no sooner than
        // its deadline is one whose peer never identified itself.
        if o.call.starts_with("accept") && o.to_error >= Duration::from_millis(4000) {
            // Killed before it said who it was: to the listener, no peer came.
            never_came += 1;
        } else {
            times.push(o.to_error);
        }
    }
    times.sort();
    let n = times.len();
    assert!(n > 0, "{phase:?}: no run reached the peer");
    eprintln!(
        "KILL {phase:?}: {RUNS} runs, time to error median {:.0?}, max {:.0?} over {n} runs; \
         {never_came} peers killed before they identified themselves (accept failed at its \
         {CONNECT_TIMEOUT_MS} ms deadline)",
        times[n / 2],
        times[n - 1]
    );
}

#[test]
fn peer_killed_during_connect() {
    phase_runs(Phase::Connect);
}

#[test]
fn peer_killed_during_a_transfer() {
    phase_runs(Phase::Transfer);
}

#[test]
fn peer_killed_during_close() {
    phase_runs(Phase::Close);
}
