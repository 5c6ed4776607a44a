//! The measured loops, on both ends: ping-pong, a windowed stream and the ring all-reduce. They call
//! the plugin as RCCL's proxy does: a NULL request from `isend`/`irecv` means "call again", `test`
//! is polled until done, and every wait is bounded.

use crate::driver::{Opaque, Plugin};
use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

/// Any tag works: requests on one comm match in posting order.
const TAG: c_int = 0x4242;
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
        let t0 = Instant::now();
        loop {
            let mut data = [r.ptr().cast::<c_void>()];
            let mut tags = [TAG];
            let mut mhs = [r.mh.0];
            // SAFETY: as for `isend`: the buffer outlives the request.
            let req = unsafe {
                self.plugin
                    .irecv(comm, &mut data, &[size], &mut tags, &mut mhs, null_mut())
            }
            .map_err(|e| e.to_string())?;
            if !req.is_null() {
                return Ok(req);
            }
            c.null_recvs += 1;
            self.expired(t0, || format!("irecv of {size} bytes"))?;
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
        let mut scratch = vec![0f32; count.div_ceil(n).max(1)];
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
        })
    }

    pub fn release(self) -> Result<(), String> {
        let p = self.net.plugin;
        let e = |e: crate::driver::NetError| e.to_string();
        p.dereg_mr(self.send, self.data_send_mh).map_err(e)?;
        p.dereg_mr(self.recv, self.data_recv_mh).map_err(e)?;
        p.dereg_mr(self.recv, self.scratch_mh).map_err(e)
    }

    fn chunk(&self, c: usize, count: usize) -> std::ops::Range<usize> {
        c * count / self.n..(c + 1) * count / self.n
    }

    /// Sends `data[src]` to the next rank while receiving `dst.len()` elements from the previous
    /// one (into scratch or into `data[dst]`), and waits for both.
    fn exchange(
        &mut self,
        src: std::ops::Range<usize>,
        dst: std::ops::Range<usize>,
        into_scratch: bool,
        c: &mut Polls,
    ) -> Result<(), String> {
        let (sbytes, rbytes) = (src.len() * 4, dst.len() * 4);
        let p = self.net.plugin;
        let base = self.data.as_mut_ptr();
        // SAFETY: both ranges lie inside `data` (and `dst.len()` fits `scratch`); the buffers stay
        // in place and registered until both requests have completed below.
        let (sptr, rptr, rmh) = unsafe {
            if into_scratch {
                (
                    base.add(src.start),
                    self.scratch.as_mut_ptr(),
                    self.scratch_mh,
                )
            } else {
                (base.add(src.start), base.add(dst.start), self.data_recv_mh)
            }
        };
        let t0 = Instant::now();
        let (mut sreq, mut rreq) = (Opaque(null_mut()), Opaque(null_mut()));
        let (mut sdone, mut rdone) = (false, false);
        while !(sdone && rdone) {
            self.net.expired(t0, || {
                format!(
                    "all-reduce step ({sbytes} B to rank {}, {rbytes} B from rank {})",
                    (self.rank + 1) % self.n,
                    (self.rank + self.n - 1) % self.n
                )
            })?;
            if rreq.is_null() {
                let mut data = [rptr.cast::<c_void>()];
                let mut tags = [TAG];
                let mut mhs = [rmh.0];
                // SAFETY: see above.
                rreq = unsafe {
                    p.irecv(
                        self.recv,
                        &mut data,
                        &[rbytes],
                        &mut tags,
                        &mut mhs,
                        null_mut(),
                    )
                }
                .map_err(|e| e.to_string())?;
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
                }
            }
            if !sreq.is_null() && !sdone {
                sdone = self.net.poll(sreq, c)?.is_some();
            }
            if !rreq.is_null() && !rdone {
                rdone = match self.net.poll(rreq, c)? {
                    Some(n) if n != rbytes => {
                        return Err(format!("all-reduce received {n} bytes, expected {rbytes}"))
                    }
                    Some(_) => true,
                    None => false,
                };
            }
            // Ranks may outnumber CPUs (4 ranks in a 2-CPU guest): let the peer we wait for run.
            std::thread::yield_now();
        }
        Ok(())
    }

    fn allreduce(&mut self, count: usize, c: &mut Polls) -> Result<(), String> {
        let (r, n) = (self.rank, self.n);
        for s in 0..n - 1 {
            let src = self.chunk((r + n - s) % n, count);
            let dst = self.chunk((r + 2 * n - s - 1) % n, count);
            self.exchange(src, dst.clone(), true, c)?;
            for (d, x) in self.data[dst.clone()].iter_mut().zip(&self.scratch) {
                *d += *x;
            }
        }
        // Rank r now holds the complete sum of chunk r+1; pass the finished chunks around.
        for s in 0..n - 1 {
            let src = self.chunk((r + 1 + n - s) % n, count);
            let dst = self.chunk((r + n - s) % n, count);
            self.exchange(src, dst, false, c)?;
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
            self.allreduce(count, c)?;
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
    pub fn decode(
        &mut self,
        count: usize,
        per_step: usize,
        warmup: usize,
        steps: usize,
        c: &mut Polls,
    ) -> Result<DecodeTiming, String> {
        self.fill(count);
        let input = self.data[..count].to_vec();
        let k = (self.n * (self.n + 1) / 2) as f32;
        let expected: Vec<f32> = (0..count).map(|i| k * (i % 13) as f32).collect();
        let mut step_us = Vec::with_capacity(steps);
        let mut wrong = 0;
        for step in 0..warmup + steps {
            let mut t = Duration::ZERO;
            for _ in 0..per_step {
                self.data[..count].copy_from_slice(&input);
                let t0 = Instant::now();
                self.allreduce(count, c)?;
                t += t0.elapsed();
                if self.data[..count] != expected[..] {
                    wrong += self.wrong(count);
                }
            }
            if step >= warmup {
                step_us.push(t.as_secs_f64() * 1e6);
            }
        }
        Ok(DecodeTiming { step_us, wrong })
    }
}
