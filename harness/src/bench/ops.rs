//! The measured loops, on both ends: ping-pong, a windowed stream and the ring all-reduce. They call
//! the plugin as RCCL's proxy does: a NULL request from `isend`/`irecv` means "call again", `test`
//! is polled until done, and every wait is bounded.

use crate::driver::{Opaque, Plugin};
use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

/// The tag of every request. Requests on one comm match in posting order, so any tag works; this
/// is one RCCL's proxy would pass (it tags a connection's sends and receives with the sending
/// rank's number), so a plugin that packs small tags into its wire format is measured the way
/// RCCL drives it.
const TAG: c_int = 1;
/// Receives each end of the ping-pong keeps posted (RCCL's `NCCL_STEPS`).
pub const PINGPONG_AHEAD: usize = 8;

/// How often the plugin made the caller wait, summed over a run. These tell where time goes
/// without a profiler: a NULL request is a round of "not yet", each `test` is one poll.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Polls {
    /// `isend` calls that returned NULL (no clear-to-send from the receiver yet, or a full queue).
    pub null_sends: u64,
    /// `irecv` calls that returned NULL.
    pub null_recvs: u64,
    /// `test` calls, done or not.
    pub tests: u64,
    /// Requests completed.
    pub requests: u64,
}

impl Polls {
    pub fn add(&mut self, o: &Polls) {
        self.null_sends += o.null_sends;
        self.null_recvs += o.null_recvs;
        self.tests += o.tests;
        self.requests += o.requests;
    }
}

/// A host buffer registered on one comm; deregistered by [`Registered::release`].
pub struct Registered {
    pub buf: Vec<u8>,
    pub mh: Opaque,
    comm: Opaque,
}

impl Registered {
    pub fn new(p: &Plugin, comm: Opaque, len: usize) -> Result<Registered, String> {
        let mut buf = vec![0u8; len.max(1)];
        let mh = p
            .reg_mr(comm, buf.as_mut_ptr(), buf.len())
            .map_err(|e| format!("registering {len} bytes: {e}"))?;
        Ok(Registered { buf, mh, comm })
    }

    pub fn release(self, p: &Plugin) -> Result<(), String> {
        p.dereg_mr(self.comm, self.mh).map_err(|e| e.to_string())
    }

    fn ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }
}

/// The plugin of one process plus the bound on every wait.
#[derive(Clone, Copy)]
pub struct Net<'a> {
    pub plugin: &'a Plugin,
    pub timeout: Duration,
}

impl Net<'_> {
    /// Whether the wait that began at `t0` ran out; `what` names it, and is only built then:
    /// the check runs in every round of the timed loops.
    fn expired(&self, t0: Instant, what: impl FnOnce() -> String) -> Result<(), String> {
        if t0.elapsed() > self.timeout {
            Err(format!("{}: no progress within {:?}", what(), self.timeout))
        } else {
            Ok(())
        }
    }

    /// Polls `connect` to `handle` and `accept` on `listen` together until both comms exist:
    /// both peers do the same, so neither may wait for one side before starting the other.
    pub fn connect_pair(
        &self,
        dev: c_int,
        listen: Opaque,
        handle: &mut [u8; NCCL_NET_HANDLE_MAXSIZE],
    ) -> Result<(Opaque, Opaque), String> {
        let (mut send, mut recv) = (Opaque(null_mut()), Opaque(null_mut()));
        let t0 = Instant::now();
        while send.is_null() || recv.is_null() {
            self.expired(t0, || "connection setup".into())?;
            if send.is_null() {
                send = self
                    .plugin
                    .connect(dev, handle)
                    .map_err(|e| e.to_string())?;
            }
            if recv.is_null() {
                recv = self.plugin.accept(listen).map_err(|e| e.to_string())?;
            }
            std::thread::yield_now();
        }
        Ok((send, recv))
    }

    fn isend(
        &self,
        comm: Opaque,
        r: &mut Registered,
        size: usize,
        c: &mut Polls,
    ) -> Result<Opaque, String> {
        let t0 = Instant::now();
        loop {
            // SAFETY: `r` stays alive and registered until the request is waited for by the caller.
            let req = unsafe { self.plugin.isend(comm, r.ptr(), size, TAG, r.mh) }
                .map_err(|e| e.to_string())?;
            if !req.is_null() {
                return Ok(req);
            }
            c.null_sends += 1;
            self.expired(t0, || format!("isend of {size} bytes"))?;
        }
    }

    fn irecv(
        &self,
        comm: Opaque,
        r: &mut Registered,
        size: usize,
        c: &mut Polls,
    ) -> Result<Opaque, String> {
        // SAFETY: `r` stays alive and registered until the request is waited for by the caller.
        unsafe {
            self.irecv_until_posted(comm, r.ptr(), r.mh, size, c, || {
                format!("irecv of {size} bytes")
            })
        }
    }

    /// One `irecv` of `size` bytes into `ptr` (registered under `mh`); NULL: "not yet".
    ///
    /// # Safety
    /// `ptr..ptr + size` must stay allocated and registered until the request has completed.
    unsafe fn try_irecv(
        &self,
        comm: Opaque,
        ptr: *mut u8,
        mh: Opaque,
        size: usize,
    ) -> Result<Opaque, String> {
        let mut data = [ptr.cast::<c_void>()];
        let mut tags = [TAG];
        let mut mhs = [mh.0];
        // SAFETY: forwarded contract.
        unsafe {
            self.plugin
                .irecv(comm, &mut data, &[size], &mut tags, &mut mhs, null_mut())
        }
        .map_err(|e| e.to_string())
    }

    /// [`Self::try_irecv`] until the plugin takes the receive, counting its NULL answers; `what`
    /// names the wait if it runs out.
    ///
    /// # Safety
    /// As [`Self::try_irecv`].
    unsafe fn irecv_until_posted(
        &self,
        comm: Opaque,
        ptr: *mut u8,
        mh: Opaque,
        size: usize,
        c: &mut Polls,
        what: impl Fn() -> String,
    ) -> Result<Opaque, String> {
        let t0 = Instant::now();
        loop {
            // SAFETY: forwarded contract.
            let req = unsafe { self.try_irecv(comm, ptr, mh, size) }?;
            if !req.is_null() {
                return Ok(req);
            }
            c.null_recvs += 1;
            self.expired(t0, &what)?;
        }
    }

    /// Posts `n` receives of `size` bytes into `r`, oldest first: the receives a loop keeps
    /// posted ahead of the data.
    fn post_ahead(
        &self,
        recv: Opaque,
        r: &mut Registered,
        size: usize,
        n: usize,
        c: &mut Polls,
    ) -> Result<VecDeque<Opaque>, String> {
        let mut reqs = VecDeque::with_capacity(n);
        for _ in 0..n {
            reqs.push_back(self.irecv(recv, r, size, c)?);
        }
        Ok(reqs)
    }

    /// One `test`; `Some(size)` when done.
    fn poll(&self, req: Opaque, c: &mut Polls) -> Result<Option<usize>, String> {
        let mut size = [-1 as c_int];
        c.tests += 1;
        if self
            .plugin
            .test(req, &mut size)
            .map_err(|e| e.to_string())?
        {
            c.requests += 1;
            Ok(Some(size[0].max(0) as usize))
        } else {
            Ok(None)
        }
    }

    fn wait(&self, req: Opaque, c: &mut Polls, what: &str) -> Result<usize, String> {
        let t0 = Instant::now();
        loop {
            if let Some(n) = self.poll(req, c)? {
                return Ok(n);
            }
            self.expired(t0, || what.to_string())?;
        }
    }

    /// The initiating end of the ping-pong: `iters` round trips of `size` bytes, each timed.
    /// Receives stay posted [`PINGPONG_AHEAD`] deep, as RCCL's proxy keeps its receive steps
    /// posted ahead of the data, and a completed one is re-posted after the next send.
    pub fn ping(
        &self,
        send: Opaque,
        recv: Opaque,
        size: usize,
        iters: usize,
        c: &mut Polls,
    ) -> Result<Vec<f64>, String> {
        let mut s = Registered::new(self.plugin, send, size)?;
        let mut r = Registered::new(self.plugin, recv, size)?;
        let mut rtts = Vec::with_capacity(iters);
        let result = (|| {
            let mut rreqs = self.post_ahead(recv, &mut r, size, iters.min(PINGPONG_AHEAD), c)?;
            let mut posted = rreqs.len();
            for _ in 0..iters {
                let t0 = Instant::now();
                let sreq = self.isend(send, &mut s, size, c)?;
                let rreq = rreqs
                    .pop_front()
                    .expect("a receive is posted per round trip");
                let (mut sdone, mut rdone) = (false, false);
                while !(sdone && rdone) {
                    if !rdone {
                        rdone = match self.poll(rreq, c)? {
                            Some(n) if n != size => {
                                return Err(format!(
                                    "ping-pong reply of {n} bytes, expected {size}"
                                ))
                            }
                            Some(_) => true,
                            None => false,
                        };
                    }
                    if !sdone {
                        sdone = self.poll(sreq, c)?.is_some();
                    }
                    self.expired(t0, || format!("ping-pong round trip of {size} bytes"))?;
                }
                rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                if posted < iters {
                    rreqs.push_back(self.irecv(recv, &mut r, size, c)?);
                    posted += 1;
                }
            }
            Ok(())
        })();
        s.release(self.plugin)?;
        r.release(self.plugin)?;
        result.map(|()| rtts)
    }

    /// The answering end: each message is returned as soon as it arrives; receives stay posted
    /// [`PINGPONG_AHEAD`] deep, so the initiator never waits for a clear-to-send, and a completed
    /// one is re-posted once the reply is out.
    pub fn pong(
        &self,
        send: Opaque,
        recv: Opaque,
        size: usize,
        iters: usize,
        c: &mut Polls,
    ) -> Result<(), String> {
        let mut s = Registered::new(self.plugin, send, size)?;
        let mut r = Registered::new(self.plugin, recv, size)?;
        let result = (|| {
            let mut rreqs = self.post_ahead(recv, &mut r, size, iters.min(PINGPONG_AHEAD), c)?;
            let mut posted = rreqs.len();
            while let Some(rreq) = rreqs.pop_front() {
                let got = self.wait(rreq, c, "ping-pong receive")?;
                if got != size {
                    return Err(format!("ping-pong message of {got} bytes, expected {size}"));
                }
                let sreq = self.isend(send, &mut s, size, c)?;
                if posted < iters {
                    rreqs.push_back(self.irecv(recv, &mut r, size, c)?);
                    posted += 1;
                }
                self.wait(sreq, c, "ping-pong reply")?;
            }
            Ok(())
        })();
        s.release(self.plugin)?;
        r.release(self.plugin)?;
        result
    }

    /// Sends `count` messages of `size` bytes with up to `window` outstanding; returns the time
    /// from the first post to the last completion. All messages share one buffer: the payload
    /// is not checked here (the conformance suite does that).
    pub fn stream_send(
        &self,
        send: Opaque,
        size: usize,
        count: usize,
        window: usize,
        c: &mut Polls,
    ) -> Result<Duration, String> {
        let mut s = Registered::new(self.plugin, send, size)?;
        let result = (|| {
            let mut inflight = VecDeque::with_capacity(window);
            let (mut posted, mut done) = (0, 0);
            let t0 = Instant::now();
            let mut last_progress = Instant::now();
            while done < count {
                if posted < count && inflight.len() < window {
                    // SAFETY: `s` outlives every request of this loop.
                    let req = unsafe { self.plugin.isend(send, s.ptr(), size, TAG, s.mh) }
                        .map_err(|e| e.to_string())?;
                    if req.is_null() {
                        c.null_sends += 1;
                    } else {
                        inflight.push_back(req);
                        posted += 1;
                        last_progress = Instant::now();
                        continue;
                    }
                }
                if let Some(&front) = inflight.front() {
                    if self.poll(front, c)?.is_some() {
                        inflight.pop_front();
                        done += 1;
                        last_progress = Instant::now();
                    }
                }
                self.expired(last_progress, || {
                    format!("stream of {size}-byte messages ({done}/{count} done)")
                })?;
            }
            Ok(t0.elapsed())
        })();
        s.release(self.plugin)?;
        result
    }

    /// The receiving end of [`Self::stream_send`]. `ready` is called once `window` receives are
    /// posted, so the sender's clock does not include our start-up.
    pub fn stream_recv(
        &self,
        recv: Opaque,
        size: usize,
        count: usize,
        window: usize,
        c: &mut Polls,
        ready: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let mut r = Registered::new(self.plugin, recv, size)?;
        let result = (|| {
            let mut inflight = self.post_ahead(recv, &mut r, size, count.min(window), c)?;
            let mut posted = inflight.len();
            ready()?;
            let mut last_progress = Instant::now();
            while let Some(&front) = inflight.front() {
                if let Some(n) = self.poll(front, c)? {
                    if n != size {
                        return Err(format!("stream message of {n} bytes, expected {size}"));
                    }
                    inflight.pop_front();
                    last_progress = Instant::now();
                    if posted < count {
                        inflight.push_back(self.irecv(recv, &mut r, size, c)?);
                        posted += 1;
                    }
                }
                self.expired(last_progress, || {
                    format!("stream receive of {size}-byte messages")
                })?;
            }
            Ok(())
        })();
        r.release(self.plugin)?;
        result
    }
}

/// One rank of a ring all-reduce (f32 sum, in place, host memory): reduce-scatter then
/// all-gather over the comm to the next rank and the comm from the previous one.
pub struct Ring<'a> {
    net: Net<'a>,
    rank: usize,
    n: usize,
    send: Opaque,
    recv: Opaque,
    /// Input and result; a send source and, in the all-gather, a receive target, so it is
    /// registered on both comms.
    data: Vec<f32>,
    data_send_mh: Opaque,
    data_recv_mh: Opaque,
    /// Where the reduce-scatter's incoming chunks land before they are added.
    scratch: Vec<f32>,
    scratch_mh: Opaque,
    /// Where the exchanges' time went, summed since the last [`Ring::decode`] began timing.
    phases: Phases,
}

/// Where one rank's exchanges spend their time, summed over exchanges: from the exchange's start
/// (its receive posted beside the send, or found posted ahead) until the plugin accepted the send
/// (for a clear-to-send plugin, the peer's offer of its buffer has arrived), until the send
/// completed, and until the receive completed. Divided by `exchanges` they say which phase a
/// slower plugin loses its time in.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseSums {
    pub exchanges: u64,
    pub send_accepted_us: f64,
    pub send_done_us: f64,
    pub recv_done_us: f64,
}

impl PhaseSums {
    /// Adds one exchange: its times (us since its start) to acceptance, send done, receive done.
    pub fn add(&mut self, accepted: f64, sent: f64, received: f64) {
        self.exchanges += 1;
        self.send_accepted_us += accepted;
        self.send_done_us += sent;
        self.recv_done_us += received;
    }

    /// The means per exchange (accepted, send done, receive done), `None` without exchanges.
    pub fn means(&self) -> Option<(f64, f64, f64)> {
        let n = self.exchanges as f64;
        (self.exchanges > 0).then(|| {
            (
                self.send_accepted_us / n,
                self.send_done_us / n,
                self.recv_done_us / n,
            )
        })
    }
}

/// [`PhaseSums`] of every exchange and of the first exchange of each all-reduce alone (the one
/// whose receive was posted last, so the one that waits longest for the peer's offer).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Phases {
    pub all: PhaseSums,
    pub first: PhaseSums,
    /// `isend` calls that returned NULL before the send was accepted: many say the time to
    /// acceptance was spent waiting for the peer, none that it was spent inside the calls.
    pub null_sends: u64,
}

impl Phases {
    /// NULL requests from `isend` per exchange, `None` without exchanges.
    pub fn null_sends_per_exchange(&self) -> Option<f64> {
        let n = self.all.exchanges;
        (n > 0).then(|| self.null_sends as f64 / n as f64)
    }
}

/// Result of one size on one rank.
#[derive(Clone, Copy, Debug)]
pub struct RingTiming {
    pub time_us: f64,
    pub wrong: usize,
}

/// Result of the decode-shaped runs on one rank.
#[derive(Clone, Debug)]
pub struct DecodeTiming {
    /// Time of each timed step (the sum of its all-reduces), us.
    pub step_us: Vec<f64>,
    /// Elements differing from the exact sum, over every all-reduce (warm-up included).
    pub wrong: usize,
    /// This rank's exchanges of the timed steps.
    pub phases: Phases,
}

/// One exchange of an all-reduce: what goes to the next rank, what comes from the previous one,
/// and where it lands (`Some(offset)` in `scratch` for a reduce-scatter step, else in place).
struct Step {
    src: std::ops::Range<usize>,
    dst: std::ops::Range<usize>,
    scratch: Option<usize>,
}

/// Exchange `i` of rank `r`'s part in an all-reduce of `count` elements over `n` ranks: the n-1
/// reduce-scatter steps (after the last, rank r holds the complete sum of chunk r+1), then the
/// n-1 all-gather steps that pass the complete chunks around.
fn ring_step(r: usize, n: usize, i: usize, count: usize) -> Step {
    let chunk = |c: usize| c * count / n..(c + 1) * count / n;
    if i < n - 1 {
        Step {
            src: chunk((r + n - i) % n),
            dst: chunk((r + 2 * n - i - 1) % n),
            scratch: Some(i * count.div_ceil(n)),
        }
    } else {
        let s = i - (n - 1);
        Step {
            src: chunk((r + 1 + n - s) % n),
            dst: chunk((r + n - s) % n),
            scratch: None,
        }
    }
}

impl<'a> Ring<'a> {
    pub fn new(
        net: Net<'a>,
        rank: usize,
        n: usize,
        send: Opaque,
        recv: Opaque,
        count: usize,
    ) -> Result<Ring<'a>, String> {
        let p = net.plugin;
        let mut data = vec![0f32; count.max(1)];
        // One chunk per reduce-scatter step, so that every receive of an all-reduce has its own
        // target and all can be posted before the first send.
        let mut scratch = vec![0f32; (count.div_ceil(n) * n.saturating_sub(1)).max(1)];
        let db = std::mem::size_of_val(data.as_slice());
        let sb = std::mem::size_of_val(scratch.as_slice());
        let dp = data.as_mut_ptr().cast::<u8>();
        let sp = scratch.as_mut_ptr().cast::<u8>();
        let e = |e: crate::driver::NetError| format!("all-reduce buffers: {e}");
        let data_send_mh = p.reg_mr(send, dp, db).map_err(e)?;
        let data_recv_mh = p.reg_mr(recv, dp, db).map_err(e)?;
        let scratch_mh = p.reg_mr(recv, sp, sb).map_err(e)?;
        Ok(Ring {
            net,
            rank,
            n,
            send,
            recv,
            data,
            data_send_mh,
            data_recv_mh,
            scratch,
            scratch_mh,
            phases: Phases::default(),
        })
    }

    pub fn release(self) -> Result<(), String> {
        let p = self.net.plugin;
        let e = |e: crate::driver::NetError| e.to_string();
        p.dereg_mr(self.send, self.data_send_mh).map_err(e)?;
        p.dereg_mr(self.recv, self.data_recv_mh).map_err(e)?;
        p.dereg_mr(self.recv, self.scratch_mh).map_err(e)
    }

    fn step(&self, i: usize, count: usize) -> Step {
        ring_step(self.rank, self.n, i, count)
    }

    /// Where exchange `i`'s incoming chunk lands, its bytes and its memory handle.
    fn recv_target(&mut self, i: usize, count: usize) -> (*mut u8, usize, Opaque) {
        let st = self.step(i, count);
        let (ptr, mh) = match st.scratch {
            Some(off) => (self.scratch[off..].as_mut_ptr(), self.scratch_mh),
            None => (self.data[st.dst.start..].as_mut_ptr(), self.data_recv_mh),
        };
        (ptr.cast(), st.dst.len() * 4, mh)
    }

    /// Posts the receives of every exchange of the next all-reduce, in order, as RCCL's proxy
    /// posts a collective's receive steps as soon as their buffers are free, ahead of the data.
    fn post_recvs(&mut self, count: usize, c: &mut Polls) -> Result<VecDeque<Opaque>, String> {
        let mut reqs = VecDeque::with_capacity(2 * (self.n - 1));
        for i in 0..2 * (self.n - 1) {
            let (ptr, bytes, mh) = self.recv_target(i, count);
            // SAFETY: the target lies inside `scratch` or `data`, which stay in place and
            // registered until the request has completed (`allreduce` waits for every one).
            reqs.push_back(unsafe {
                self.net
                    .irecv_until_posted(self.recv, ptr, mh, bytes, c, || {
                        "posting an all-reduce's receives".into()
                    })
            }?);
        }
        Ok(reqs)
    }

    /// Sends exchange `i`'s chunk to the next rank while receiving from the previous one, and
    /// waits for both. `rreq` is the receive if it was posted ahead, else NULL: it is posted here,
    /// beside the send.
    fn exchange(
        &mut self,
        i: usize,
        count: usize,
        mut rreq: Opaque,
        c: &mut Polls,
    ) -> Result<(), String> {
        let st = self.step(i, count);
        let (sbytes, rbytes) = (st.src.len() * 4, st.dst.len() * 4);
        let p = self.net.plugin;
        // SAFETY: the range lies inside `data`, which stays in place and registered until the
        // request has completed below.
        let sptr = unsafe { self.data.as_mut_ptr().add(st.src.start) };
        let t0 = Instant::now();
        let mut sreq = Opaque(null_mut());
        let (mut sdone, mut rdone) = (false, false);
        let us = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e6;
        let (mut accepted, mut sent, mut received) = (0.0, 0.0, 0.0);
        let mut nulls = 0;
        while !(sdone && rdone) {
            self.net.expired(t0, || {
                format!(
                    "all-reduce step ({sbytes} B to rank {}, {rbytes} B from rank {}; send {}, \
                     receive {})",
                    (self.rank + 1) % self.n,
                    (self.rank + self.n - 1) % self.n,
                    request_state(sreq, sdone),
                    request_state(rreq, rdone)
                )
            })?;
            if rreq.is_null() {
                let (ptr, bytes, mh) = self.recv_target(i, count);
                // SAFETY: as in `post_recvs`.
                rreq = unsafe { self.net.try_irecv(self.recv, ptr, mh, bytes) }?;
                if rreq.is_null() {
                    c.null_recvs += 1;
                }
            }
            if sreq.is_null() {
                // SAFETY: see above.
                sreq = unsafe { p.isend(self.send, sptr.cast(), sbytes, TAG, self.data_send_mh) }
                    .map_err(|e| e.to_string())?;
                if sreq.is_null() {
                    c.null_sends += 1;
                    nulls += 1;
                } else {
                    accepted = us(Instant::now());
                }
            }
            if !sreq.is_null() && !sdone {
                sdone = self.net.poll(sreq, c)?.is_some();
                if sdone {
                    sent = us(Instant::now());
                }
            }
            if !rreq.is_null() && !rdone {
                rdone = match self.net.poll(rreq, c)? {
                    Some(n) if n != rbytes => {
                        return Err(format!("all-reduce received {n} bytes, expected {rbytes}"))
                    }
                    Some(_) => true,
                    None => false,
                };
                if rdone {
                    received = us(Instant::now());
                }
            }
            // Ranks may outnumber CPUs (4 ranks in a 2-CPU guest): let the peer we wait for run.
            std::thread::yield_now();
        }
        let ph = &mut self.phases;
        ph.all.add(accepted, sent, received);
        ph.null_sends += nulls;
        if i == 0 {
            ph.first.add(accepted, sent, received);
        }
        Ok(())
    }

    /// One all-reduce; `posted` holds its receives if they were posted ahead (consumed here),
    /// else is empty and each exchange posts its own.
    fn allreduce(
        &mut self,
        count: usize,
        posted: &mut VecDeque<Opaque>,
        c: &mut Polls,
    ) -> Result<(), String> {
        for i in 0..2 * (self.n - 1) {
            let rreq = posted.pop_front().unwrap_or(Opaque(null_mut()));
            self.exchange(i, count, rreq, c)?;
            let st = self.step(i, count);
            if let Some(off) = st.scratch {
                for (d, x) in self.data[st.dst.clone()]
                    .iter_mut()
                    .zip(&self.scratch[off..])
                {
                    *d += *x;
                }
            }
        }
        Ok(())
    }

    /// Rank r contributes (r+1)·(i mod 13) at element i: small integers, so the f32 sum is exact
    /// in any order and every element can be checked.
    fn fill(&mut self, count: usize) {
        let k = (self.rank + 1) as f32;
        for (i, v) in self.data[..count].iter_mut().enumerate() {
            *v = k * (i % 13) as f32;
        }
    }

    fn wrong(&self, count: usize) -> usize {
        let k = (self.n * (self.n + 1) / 2) as f32;
        self.data[..count]
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != k * (i % 13) as f32)
            .count()
    }

    /// `warmup` untimed then `iters` timed all-reduces of `count` floats; the time is the mean.
    pub fn run(
        &mut self,
        count: usize,
        warmup: usize,
        iters: usize,
        c: &mut Polls,
    ) -> Result<RingTiming, String> {
        let mut total = Duration::ZERO;
        let mut wrong = 0;
        for it in 0..warmup + iters {
            self.fill(count);
            let t0 = Instant::now();
            self.allreduce(count, &mut VecDeque::new(), c)?;
            if it >= warmup {
                total += t0.elapsed();
            }
            wrong = wrong.max(self.wrong(count));
        }
        Ok(RingTiming {
            time_us: total.as_secs_f64() * 1e6 / iters.max(1) as f64,
            wrong,
        })
    }

    /// `warmup` untimed then `steps` timed steps of `per_step` all-reduces of `count` floats
    /// each, back to back, as a decode step of a tensor-parallel model. Every all-reduce gets a
    /// fresh input and its result is checked; the refill (a copy) and the check (a comparison)
    /// stay outside the time, which is the sum of the all-reduce calls.
    ///
    /// With `ahead`, the receives of each all-reduce are posted right after the previous one
    /// completed, outside the time, before the refill and the check: the way RCCL's proxy posts
    /// the next collective's receive steps while the GPU computes the layer in between. Without
    /// it, each exchange posts its receive beside its send (a receiver that only just arrived).
    pub fn decode(
        &mut self,
        count: usize,
        per_step: usize,
        warmup: usize,
        steps: usize,
        ahead: bool,
        c: &mut Polls,
    ) -> Result<DecodeTiming, String> {
        self.fill(count);
        let input = self.data[..count].to_vec();
        let k = (self.n * (self.n + 1) / 2) as f32;
        let expected: Vec<f32> = (0..count).map(|i| k * (i % 13) as f32).collect();
        let mut step_us = Vec::with_capacity(steps);
        let mut wrong = 0;
        let total = (warmup + steps) * per_step;
        let mut posted = VecDeque::new();
        if ahead && total > 0 {
            posted = self.post_recvs(count, c)?;
        }
        let mut done = 0;
        for step in 0..warmup + steps {
            if step == warmup {
                self.phases = Phases::default();
            }
            let mut t = Duration::ZERO;
            for _ in 0..per_step {
                self.data[..count].copy_from_slice(&input);
                let t0 = Instant::now();
                self.allreduce(count, &mut posted, c)?;
                t += t0.elapsed();
                done += 1;
                if ahead && done < total {
                    posted = self.post_recvs(count, c)?;
                }
                if self.data[..count] != expected[..] {
                    wrong += self.wrong(count);
                }
            }
            if step >= warmup {
                step_us.push(t.as_secs_f64() * 1e6);
            }
        }
        Ok(DecodeTiming {
            step_us,
            wrong,
            phases: self.phases,
        })
    }
}

/// How far one request of a stuck exchange got, for the error that ends it.
fn request_state(req: Opaque, done: bool) -> &'static str {
    match (req.is_null(), done) {
        (true, _) => "not accepted by the plugin yet",
        (false, false) => "posted, not complete",
        (false, true) => "complete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each rank sends in exchange i is what the next rank receives in it; every
    /// reduce-scatter receive has its own scratch chunk (so all of an all-reduce's receives can
    /// be posted at once), and the all-gather brings every chunk but the one the rank completed.
    #[test]
    fn ring_steps_pair_up_and_receives_never_share_a_target() {
        for n in 2..=5usize {
            for count in [n - 1, n, 1000, 2051] {
                let per = count.div_ceil(n);
                for r in 0..n {
                    let next = (r + 1) % n;
                    for i in 0..2 * (n - 1) {
                        let (mine, theirs) =
                            (ring_step(r, n, i, count), ring_step(next, n, i, count));
                        assert_eq!(mine.src, theirs.dst, "n {n} count {count} r {r} i {i}");
                        assert_eq!(mine.scratch.is_some(), i < n - 1);
                    }
                    let scratch: Vec<_> = (0..n - 1)
                        .map(|i| {
                            let st = ring_step(r, n, i, count);
                            let off = st.scratch.unwrap();
                            off..off + st.dst.len()
                        })
                        .collect();
                    assert!(scratch.windows(2).all(|w| w[0].end <= w[1].start));
                    assert!(scratch.iter().all(|s| s.end <= per * (n - 1)));
                    // The last reduce-scatter step completes chunk r+1; the all-gather receives
                    // the other n-1 chunks, each once.
                    let mut got: Vec<_> = (n - 1..2 * (n - 1))
                        .map(|i| ring_step(r, n, i, count).dst)
                        .collect();
                    got.push(ring_step(r, n, n - 2, count).dst);
                    got.sort_by_key(|d| (d.start, d.end));
                    assert_eq!(got.first().map(|d| d.start), Some(0));
                    assert!(got.windows(2).all(|w| w[0].end == w[1].start));
                    assert_eq!(got.last().map(|d| d.end), Some(count));
                }
            }
        }
    }
}
