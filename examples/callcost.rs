//! Drives any net plugin through its C ABI in fixed phases, for instruction counting: each call
//! kind runs from its own function, so `valgrind --tool=callgrind --separate-callers=3` tells
//! apart what timing cannot (how much an `isend` costs when it returns NULL, a `test` that finds
//! nothing, the work of a message). One process holds both ends of a connection on one device.
//!
//! ```text
//! callcost [--plugin PATH] [--dev N] [--size BYTES] [--messages N] [--idle N]
//! ```
//!
//! Phases, in order: `idle_isends` (`--idle` isends before the receiver offers a buffer: all
//! NULL), `idle_tests` (`--idle` tests of a posted receive nothing is sent to), then `--messages`
//! messages of `--size` bytes, each an `irecv` (`msg_irecv`), `isend` until it is accepted
//! (`msg_isend`) and `test` of both requests until done (`msg_test_send`, `msg_test_recv`). The
//! counts of calls and NULL answers per phase are printed. `scripts/callcost.sh` runs it under
//! callgrind in a Soft-RoCE guest and turns the counts into instructions per call.

use halo_harness::driver::{Opaque, Plugin};
use halo_harness::log::quiet_logger;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::process::ExitCode;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const TAG: c_int = 1;
const IDLE_TAG: c_int = 99;

struct Ends<'a> {
    p: &'a Plugin,
    send: Opaque,
    recv: Opaque,
    src: Vec<u8>,
    dst: Vec<u8>,
    smh: Opaque,
    rmh: Opaque,
}

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Ends<'_> {
    #[inline(never)]
    fn idle_isends(&mut self, n: usize) -> Result<(), String> {
        for _ in 0..n {
            // SAFETY: `src` is registered under `smh` and outlives every request.
            let r = unsafe {
                self.p
                    .isend(self.send, self.src.as_mut_ptr(), 8, TAG, self.smh)
            }
            .map_err(|e| fail("isend", e))?;
            if !r.is_null() {
                return Err("an isend before any receive was accepted".into());
            }
        }
        Ok(())
    }

    fn post_recv(&mut self, size: usize, tag: c_int) -> Result<Opaque, String> {
        let mut data = [self.dst.as_mut_ptr().cast::<c_void>()];
        let mut tags = [tag];
        let mut mhs = [self.rmh.0];
        // SAFETY: `dst` is registered under `rmh` and outlives every request.
        unsafe {
            self.p.irecv(
                self.recv,
                &mut data,
                &[size],
                &mut tags,
                &mut mhs,
                null_mut(),
            )
        }
        .map_err(|e| fail("irecv", e))
    }

    #[inline(never)]
    fn idle_tests(&mut self, n: usize) -> Result<Opaque, String> {
        let r = self.post_recv(8, IDLE_TAG)?;
        if r.is_null() {
            return Err("irecv returned NULL on an idle connection".into());
        }
        let mut sizes = [0 as c_int];
        for _ in 0..n {
            if self.p.test(r, &mut sizes).map_err(|e| fail("test", e))? {
                return Err("a receive nothing was sent to completed".into());
            }
        }
        Ok(r)
    }

    /// Sends the idle receive its message and waits for both (not counted).
    fn drain(&mut self, rreq: Opaque) -> Result<(), String> {
        let t0 = Instant::now();
        let mut sreq = Opaque(null_mut());
        while sreq.is_null() {
            // SAFETY: as in `idle_isends`.
            sreq = unsafe {
                self.p
                    .isend(self.send, self.src.as_mut_ptr(), 8, IDLE_TAG, self.smh)
            }
            .map_err(|e| fail("isend", e))?;
            expire(t0)?;
        }
        let (mut sdone, mut rdone) = (false, false);
        let mut sizes = [0 as c_int];
        while !(sdone && rdone) {
            sdone = sdone || self.p.test(sreq, &mut sizes).map_err(|e| fail("test", e))?;
            rdone = rdone || self.p.test(rreq, &mut sizes).map_err(|e| fail("test", e))?;
            expire(t0)?;
        }
        Ok(())
    }

    #[inline(never)]
    fn msg_irecv(&mut self, size: usize) -> Result<Opaque, String> {
        self.post_recv(size, TAG)
    }

    #[inline(never)]
    fn msg_isend(&mut self, size: usize) -> Result<Opaque, String> {
        // SAFETY: as in `idle_isends`.
        unsafe {
            self.p
                .isend(self.send, self.src.as_mut_ptr(), size, TAG, self.smh)
        }
        .map_err(|e| fail("isend", e))
    }

    #[inline(never)]
    fn msg_test_send(&mut self, r: Opaque) -> Result<bool, String> {
        let mut sizes = [0 as c_int];
        self.p.test(r, &mut sizes).map_err(|e| fail("test", e))
    }

    #[inline(never)]
    fn msg_test_recv(&mut self, r: Opaque, size: usize) -> Result<bool, String> {
        let mut sizes = [-1 as c_int];
        let done = self.p.test(r, &mut sizes).map_err(|e| fail("test", e))?;
        if done && sizes[0] as usize != size {
            return Err(format!("received {} bytes, sent {size}", sizes[0]));
        }
        Ok(done)
    }

    fn messages(&mut self, n: usize, size: usize) -> Result<[usize; 5], String> {
        // irecvs, isends, NULL isends, send tests, receive tests
        let mut c = [0usize; 5];
        for _ in 0..n {
            let t0 = Instant::now();
            let rreq = self.msg_irecv(size)?;
            c[0] += 1;
            if rreq.is_null() {
                return Err("irecv returned NULL with nothing outstanding".into());
            }
            let sreq = loop {
                let s = self.msg_isend(size)?;
                c[1] += 1;
                if !s.is_null() {
                    break s;
                }
                c[2] += 1;
                expire(t0)?;
            };
            let (mut sdone, mut rdone) = (false, false);
            while !(sdone && rdone) {
                if !sdone {
                    sdone = self.msg_test_send(sreq)?;
                    c[3] += 1;
                }
                if !rdone {
                    rdone = self.msg_test_recv(rreq, size)?;
                    c[4] += 1;
                }
                expire(t0)?;
            }
        }
        Ok(c)
    }
}

fn expire(t0: Instant) -> Result<(), String> {
    if t0.elapsed() > Duration::from_secs(120) {
        return Err("a message took more than 120 s".into());
    }
    Ok(())
}

fn run(plugin: PathBuf, dev: c_int, size: usize, msgs: usize, idle: usize) -> Result<(), String> {
    let mut p = Plugin::load(&plugin, 10)?;
    p.init(quiet_logger(), u64::from(std::process::id()))
        .map_err(|e| fail("init", e))?;
    let mut handle = [0u8; halo_ffi::NCCL_NET_HANDLE_MAXSIZE];
    let lc = p.listen(dev, &mut handle).map_err(|e| fail("listen", e))?;
    let (mut send, mut recv) = (Opaque(null_mut()), Opaque(null_mut()));
    let t0 = Instant::now();
    while send.is_null() || recv.is_null() {
        if send.is_null() {
            send = p
                .connect(dev, &mut handle)
                .map_err(|e| fail("connect", e))?;
        }
        if recv.is_null() {
            recv = p.accept(lc).map_err(|e| fail("accept", e))?;
        }
        expire(t0)?;
    }
    p.close_listen(lc).map_err(|e| fail("closeListen", e))?;
    let bytes = size.max(8);
    let mut src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![0u8; bytes];
    let smh = p
        .reg_mr(send, src.as_mut_ptr(), bytes)
        .map_err(|e| fail("regMr", e))?;
    let rmh = p
        .reg_mr(recv, dst.as_mut_ptr(), bytes)
        .map_err(|e| fail("regMr", e))?;
    let mut e = Ends {
        p: &p,
        send,
        recv,
        src,
        dst,
        smh,
        rmh,
    };
    e.idle_isends(idle)?;
    let r = e.idle_tests(idle)?;
    e.drain(r)?;
    let c = e.messages(msgs, size)?;
    if e.dst[..size] != e.src[..size] {
        return Err("received bytes differ from the sent ones".into());
    }
    println!("idle_isends {idle} (all NULL)");
    println!("idle_tests {idle} (none done)");
    println!(
        "messages {msgs} of {size} B: irecv {} isend {} (NULL {}) test send {} test recv {}",
        c[0], c[1], c[2], c[3], c[4]
    );
    let (smh, rmh) = (e.smh, e.rmh);
    p.dereg_mr(send, smh).map_err(|e| fail("deregMr", e))?;
    p.dereg_mr(recv, rmh).map_err(|e| fail("deregMr", e))?;
    p.close_send(send).map_err(|e| fail("closeSend", e))?;
    p.close_recv(recv).map_err(|e| fail("closeRecv", e))?;
    Ok(())
}

fn main() -> ExitCode {
    let mut plugin = halo_harness::artifacts::plugin_library_if_built();
    let (mut dev, mut size, mut msgs, mut idle) = (0, 8usize, 200usize, 2000usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--plugin" => plugin = Some(PathBuf::from(val()?)),
                "--dev" => dev = val()?.parse().map_err(|e| format!("--dev: {e}"))?,
                "--size" => size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
                "--messages" => msgs = val()?.parse().map_err(|e| format!("--messages: {e}"))?,
                "--idle" => idle = val()?.parse().map_err(|e| format!("--idle: {e}"))?,
                _ => return Err(format!("unknown argument {a}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("callcost: {e}");
            return ExitCode::from(2);
        }
    }
    let Some(plugin) = plugin else {
        eprintln!("callcost: no plugin built next to this program; pass --plugin PATH");
        return ExitCode::from(2);
    };
    match run(plugin, dev, size, msgs, idle) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("callcost: {e}");
            ExitCode::FAILURE
        }
    }
}
