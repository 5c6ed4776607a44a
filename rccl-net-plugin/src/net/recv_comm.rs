//! The receiving end of a connection: hands `irecv`s and completions to the protocol core
//! ([`Receiver`]) and posts what it answers; `iflush` reads back GPU memory.

use super::buffer::RegisteredBuf;
use super::device::NetDevice;
use super::error::{contained, NetError, NetResult};
use super::flush::{Flush, FLUSH_SLOTS};
use super::link::{Link, POLL_BATCH};
use super::nap::{NapConfig, Napper};
use super::poster::{post_cts_now, EagerDmas, PostFailure, Poster, SlotRing, Staging, Targets};
use super::profiler::{self, Key, Profiler};
use super::regcache::{checked_handle, MrHandle};
use super::request::Request;
use super::stats::{self, CommCounters, Side};
use crate::protocol::{
    eager_slot_offset, is_eager_imm, EagerHeader, Post, PostSink, Receiver, RecvBuf, RecvConfig,
    RecvSink, CTS_ROW_BYTES, FIFO_DEPTH, MAX_RECVS, SIZES_ROW_BYTES,
};
use halo_ibverbs::{QueuePair, RecvWr, WcOpcode, WorkCompletion};
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// The receiver's bounce slots for eager messages: `slots` of [`EAGER_HEADER_BYTES`] + `max`.
pub struct EagerRing {
    pub buf: RegisteredBuf,
    pub slots: u16,
    pub max: u32,
}

impl EagerRing {
    /// Slots per receive comm. One row at a time goes ahead of its clear-to-send, so a few are
    /// plenty; more only help when the receiver drains them late.
    pub const SLOTS: u16 = crate::protocol::MAX_EAGER_SLOTS as u16;

    /// `None` when `max` is 0 (the eager path is off).
    pub fn new(dev: &NetDevice, max: u32) -> NetResult<Option<Self>> {
        if max == 0 {
            return Ok(None);
        }
        let bytes = eager_slot_offset(Self::SLOTS, max) as usize;
        let buf = RegisteredBuf::new(&dev.pd, bytes, "eager slots")?;
        Ok(Some(EagerRing {
            buf,
            slots: Self::SLOTS,
            max,
        }))
    }

    fn ring(&self) -> SlotRing {
        SlotRing {
            base: self.buf.ptr(),
            slots: self.slots,
            slot_max: self.max,
        }
    }
}

/// What a receive comm is made of, from `accept`.
pub struct RecvParts {
    pub link: Link,
    /// The sender writes the sizes of multi-receives here.
    pub sizes: RegisteredBuf,
    /// Clear-to-send rows that cannot go inline.
    pub staging: Staging,
    /// The sender's FIFO.
    pub targets: Targets,
    pub eager: Option<EagerRing>,
    /// Present when the device may receive into GPU memory.
    pub flush: Option<Flush>,
    /// `HALO_STATS`: log the counters at close.
    pub stats: bool,
    /// When a fruitless `test` gives the CPU away.
    pub nap: NapConfig,
}

/// The receiving end of a connection (RCCL holds it through a [`super::CommHandle`]).
pub struct RecvComm {
    pub link: Link,
    core: Receiver,
    sizes: RegisteredBuf,
    staging: Staging,
    targets: Targets,
    eager: Option<EagerRing>,
    flush: Option<Flush>,
    /// Receive requests (`0..FIFO_DEPTH`), then flush requests (one per flush slot).
    reqs: Box<[Request]>,
    stats: bool,
    own: CommCounters,
    napper: Napper,
    /// Capacity of each receive request in flight (by request index), and their sum.
    posted_cap: [u64; FIFO_DEPTH],
    posted_bytes: u64,
    /// Present when `init` got a profiler callback: one slot per buffer of each receive.
    prof: Option<Box<Profiler>>,
}

impl RecvComm {
    pub const SIZES_BYTES: usize = FIFO_DEPTH * SIZES_ROW_BYTES;
    pub const CTS_STAGING_BYTES: usize = FIFO_DEPTH * CTS_ROW_BYTES;
    /// Receives kept posted: one per row in flight plus the eager slots, with room to spare.
    pub const RQ_STOCK: u32 = crate::protocol::RQ_STOCK;

    /// Posts `n` receives (capped to the queue's size) for incoming immediates.
    pub fn stock_receives(qp: &QueuePair, n: u32) -> halo_ibverbs::Result<()> {
        let mut left = n.min(qp.caps().max_recv_wr) as usize;
        let wrs = [RecvWr { wr_id: 0, sge: &[] }; POLL_BATCH];
        while left > 0 {
            let k = left.min(POLL_BATCH);
            // SAFETY: these receives have no SGEs: an immediate writes no local memory.
            unsafe { qp.post_recv(&wrs[..k])? };
            left -= k;
        }
        Ok(())
    }

    pub fn new(p: RecvParts) -> Box<Self> {
        let cfg = RecvConfig {
            sq_depth: p.link.qps[0].caps().max_send_wr,
            eager_slots: p.eager.as_ref().map_or(0, |e| e.slots),
            eager_max: p.eager.as_ref().map_or(0, |e| e.max),
        };
        let prof = Profiler::new(FIFO_DEPTH * MAX_RECVS, p.link.dev.index);
        let mut c = Box::new(RecvComm {
            link: p.link,
            core: Receiver::new(cfg),
            sizes: p.sizes,
            staging: p.staging,
            targets: p.targets,
            eager: p.eager,
            flush: p.flush,
            reqs: Box::new([]),
            stats: p.stats,
            own: CommCounters::default(),
            napper: Napper::new(p.nap),
            posted_cap: [0; FIFO_DEPTH],
            posted_bytes: 0,
            prof,
        });
        let me: *mut RecvComm = &mut *c;
        c.reqs = Request::table_for_recv(me, FIFO_DEPTH + FLUSH_SLOTS);
        c
    }

    pub fn dev(&self) -> &Arc<NetDevice> {
        &self.link.dev
    }

    /// `irecv` of `bufs` (address, capacity, tag, memory handle); `Ok(None)` when it cannot be
    /// posted yet. `phandles`: the profiler's handle per buffer (empty or NULL: none).
    #[inline]
    pub fn irecv(
        &mut self,
        bufs: &[(u64, u64, i32, Option<&MrHandle>)],
        phandles: &[*mut c_void],
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        if !self.core.cts_room() {
            self.make_cts_room()?;
        }
        // Receives consumed by immediates go back here, ahead of the row this call may offer,
        // and not in `test`, where a message's data waits to be acted on.
        let restock = self.core.take_restock();
        if restock > 0 {
            Self::stock_receives(&self.link.qps[0], restock).map_err(|e| {
                self.link
                    .fail_with(NetError::System, format_args!("posting receives: {e}"))
            })?;
        }
        if bufs.is_empty() || bufs.len() > MAX_RECVS {
            return Err(NetError::InvalidArgument(format!(
                "irecv of {} buffers (1..={MAX_RECVS} allowed)",
                bufs.len()
            )));
        }
        // The common receive has one buffer: no array of eight to fill.
        if bufs.len() == 1 {
            let rb = recv_bufs::<1>(bufs)?;
            self.post_recv(&rb, bufs, phandles)
        } else {
            let rb = recv_bufs::<MAX_RECVS>(bufs)?;
            self.post_recv(&rb[..bufs.len()], bufs, phandles)
        }
    }

    /// Offers the receive of `rb` (the checked form of `bufs`).
    #[inline]
    fn post_recv(
        &mut self,
        rb: &[RecvBuf],
        bufs: &[(u64, u64, i32, Option<&MrHandle>)],
        phandles: &[*mut c_void],
    ) -> NetResult<Option<*mut Request>> {
        let held = self.core.holds_eager();
        let r = if let Some(ring) = self.eager.as_ref().map(EagerRing::ring).filter(|_| held) {
            // A held eager message is copied out of its bounce slot, which only the poster knows.
            let mut out = Poster::new(&self.link.qps, &self.targets, &self.staging, Some(ring));
            let r = self.core.irecv(rb, &mut out);
            let (posted, dmas) = (out.finish(), out.dmas);
            posted.map_err(|f| self.link.post_error(f, "clear-to-send"))?;
            self.start_dmas(&dmas)?;
            r
        } else {
            // The row is this call's one work request: posted as the core hands it over. Nothing
            // is held, so the core asks for no copy (eager comms included).
            let mut out = DirectSink::new(&self.link.qps, &self.targets, &self.staging);
            let r = self.core.irecv(rb, &mut out);
            if let Some(f) = out.failure {
                return Err(self.link.post_error(f, "clear-to-send"));
            }
            r
        };
        match r {
            Ok(Some(req)) => {
                let cap: u64 = bufs.iter().map(|b| b.1).sum();
                self.posted_cap[usize::from(req)] = cap;
                self.posted_bytes += cap;
                if let Some(p) = self.prof.as_deref_mut() {
                    // The clear-to-send write that offers the buffers went out in this call;
                    // the events end when `test` reports the receive done.
                    let qp_num = self.link.qps[0].qp_num();
                    let first = usize::from(req) * MAX_RECVS;
                    for (i, (&ph, b)) in phandles.iter().zip(bufs).enumerate() {
                        p.arm(first + i, ph, b.1);
                        p.start(
                            first + i,
                            Key(u64::MAX),
                            qp_num,
                            u64::from(req),
                            profiler::IBV_WR_RDMA_WRITE,
                        );
                    }
                }
                Ok(Some(&mut self.reqs[usize::from(req)] as *mut Request))
            }
            Ok(None) => {
                self.own.nulls += 1;
                self.link.idle_tick()?;
                Ok(None)
            }
            Err(e) => Err(self.link.proto_error(e)),
        }
    }

    /// Completions of earlier clear-to-send writes free the send queue. Out of line: `test`
    /// stays the one caller that inlines [`Self::progress`].
    #[cold]
    #[inline(never)]
    fn make_cts_room(&mut self) -> NetResult<()> {
        self.progress().map(drop)
    }

    /// Polls completions and acts on them; whether there were any. Callers run under the C
    /// boundary's panic guard (`irecv`) or inside `contained` (`test`).
    #[inline]
    fn progress(&mut self) -> NetResult<bool> {
        let mut wcs = [const { MaybeUninit::<WorkCompletion>::uninit() }; POLL_BATCH];
        let got = self.link.poll(&mut wcs)?;
        if got.is_empty() {
            // NIC copies of eager messages complete on the flush QP's own queue.
            return if self.core.eager_dmas() > 0 {
                self.finish_dmas()
            } else {
                Ok(false)
            };
        }
        self.on_completions(got)?;
        Ok(true)
    }

    /// Posts the NIC copies of eager messages into GPU memory that the core asked for, on the
    /// flush QP (connected to itself), from their bounce slots.
    #[cold]
    fn start_dmas(&mut self, dmas: &EagerDmas) -> NetResult<()> {
        if dmas.n == 0 {
            return Ok(());
        }
        if dmas.overflow {
            return Err(self.link.fail_with(
                NetError::Internal,
                "more eager copies at once than bounce slots",
            ));
        }
        let (Some(ring), Some(flush)) = (self.eager.as_ref(), self.flush.as_mut()) else {
            return Err(self.link.fail_with(
                NetError::Internal,
                "an eager message for GPU memory on a comm without a flush QP",
            ));
        };
        let (lkey, slots) = (ring.buf.lkey(), ring.ring());
        for d in &dmas.list[..dmas.n] {
            let src = slots.payload(d.slot) as u64;
            if let Err(e) = flush.post_copy(d.slot, src, lkey, d.len, d.dst, d.rkey) {
                return Err(self.link.fail_with(NetError::System, e));
            }
        }
        Ok(())
    }

    /// Hands the completed NIC copies of eager messages to the core; whether there were any.
    #[cold]
    #[inline(never)]
    fn finish_dmas(&mut self) -> NetResult<bool> {
        let Some(flush) = self.flush.as_mut() else {
            return Ok(false);
        };
        let done = match flush.take_copies_done() {
            Ok(done) => done,
            Err(e) => return Err(self.link.fail_with(NetError::Remote, e)),
        };
        let mut bits = done;
        while bits != 0 {
            let slot = bits.trailing_zeros() as u16;
            bits &= bits - 1;
            if let Err(e) = self.core.on_eager_dma_done(slot) {
                return Err(self.link.proto_error(e));
            }
        }
        Ok(done != 0)
    }

    /// Hands completions to the protocol core and posts what it answers: only eager messages
    /// make it post (a slot's copy or release), so a batch without one builds no poster and
    /// stays inline, on a comm with bounce slots too.
    #[inline]
    fn on_completions(&mut self, got: &[WorkCompletion]) -> NetResult<()> {
        if self.eager.is_some() && got.iter().any(is_eager_completion) {
            self.on_completions_eager(got)?;
        } else {
            let r = handle_completions(
                &mut self.core,
                got,
                self.sizes.ptr(),
                None,
                &mut NoEagerSink,
            );
            r.map_err(|e| self.link.proto_error(e))?;
        }
        // A stream of completions must not keep finished copies waiting for an idle poll.
        if self.core.eager_dmas() > 0 {
            self.finish_dmas()?;
        }
        Ok(())
    }

    /// [`Self::on_completions`] with bounce slots: out of line, with its poster's arrays.
    #[inline(never)]
    fn on_completions_eager(&mut self, got: &[WorkCompletion]) -> NetResult<()> {
        let sizes = self.sizes.ptr();
        let ring = self.eager.as_ref().map(EagerRing::ring);
        let mut out = Poster::new(&self.link.qps, &self.targets, &self.staging, ring);
        let r = handle_completions(&mut self.core, got, sizes, ring, &mut out);
        let (posted, dmas) = (out.finish(), out.dmas);
        posted.map_err(|f| self.link.post_error(f, "clear-to-send"))?;
        self.start_dmas(&dmas)?;
        r.map_err(|e| self.link.proto_error(e))
    }

    /// `iflush` of a completed receive: a READ from the last non-empty buffer in GPU memory;
    /// `Ok(None)` when no buffer is in GPU memory (nothing to flush).
    pub fn iflush(
        &mut self,
        bufs: &[(u64, u64, Option<&MrHandle>)],
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        let Some((addr, _, Some(mh))) = bufs
            .iter()
            .rev()
            .find(|(_, size, mh)| *size > 0 && mh.is_some_and(|m| m.gpu))
        else {
            return Ok(None);
        };
        let Some(flush) = self.flush.as_mut() else {
            return Err(NetError::Internal(format!(
                "iflush of GPU memory {addr:#x} on a comm without a flush QP ({})",
                self.link.context()
            )));
        };
        let slot = flush.post(*addr, mh.rkey)?;
        Ok(Some(&mut self.reqs[FIFO_DEPTH + slot] as *mut Request))
    }

    /// RDMA READs the flushes of this comm completed.
    pub fn flush_reads_done(&self) -> u64 {
        self.flush.as_ref().map_or(0, Flush::reads_done)
    }

    /// `test` of request `req`: its sizes into `sizes` and their count once done. Runs without
    /// the C boundary's panic guard: see `abi::common::test`.
    #[inline]
    pub(super) fn test(
        &mut self,
        req: u16,
        sizes: &mut [u64; MAX_RECVS],
    ) -> NetResult<Option<usize>> {
        self.own.tests += 1;
        if let Some(slot) = (req as usize).checked_sub(FIFO_DEPTH) {
            return contained(|| {
                let flush = self
                    .flush
                    .as_mut()
                    .ok_or_else(|| NetError::Internal("flush request without a flush QP".into()))?;
                Ok(flush.test(slot)?.then_some(0))
            });
        }
        // A request an earlier poll already completed is done, whatever happened since: no
        // poll and no look at the link (a message-rate stream tests each of a batch of
        // completions in turn).
        let mut r = self.core.test_into(req, sizes);
        if matches!(r, Ok(None)) {
            self.link.check()?;
            if self.progress()? {
                self.napper.progress();
                r = self.core.test_into(req, sizes);
            } else if let Some(nap) = self.napper.idle(self.posted_bytes) {
                self.own.naps += 1;
                std::thread::sleep(nap);
            }
        }
        match r {
            Ok(None) => Ok(None),
            Ok(Some(n)) => {
                self.finished(req)?;
                Ok(Some(n))
            }
            Err(e) => {
                self.finished(req)?;
                Err(self.link.proto_error(e))
            }
        }
    }

    /// Request `req` is done: its buffers leave the posted count (and any nap ends: a completion
    /// an earlier call polled counts as progress too), its profiler events end.
    #[inline]
    fn finished(&mut self, req: u16) -> NetResult<()> {
        let cap = std::mem::take(&mut self.posted_cap[usize::from(req)]);
        self.posted_bytes -= cap;
        self.napper.progress();
        self.finish_events(req)
    }

    /// Ends the profiler events of finished request `req`.
    #[inline]
    fn finish_events(&mut self, req: u16) -> NetResult<()> {
        let Some(p) = self.prof.as_deref_mut() else {
            return Ok(());
        };
        contained(|| {
            let first = usize::from(req) * MAX_RECVS;
            for i in first..first + MAX_RECVS {
                p.finish(i);
            }
            Ok(())
        })
    }

    /// What the comm did so far: the core's counters and its own.
    pub fn counters(&self) -> (crate::protocol::Counters, CommCounters) {
        (self.core.counters(), self.own)
    }
}

/// Hands completions `got` to `core`, up to the first it refuses; posts go to `out`. `sizes`:
/// our sizes array; `ring`: our bounce slots.
#[inline]
fn handle_completions(
    core: &mut Receiver,
    got: &[WorkCompletion],
    sizes: *const u8,
    ring: Option<SlotRing>,
    out: &mut impl RecvSink,
) -> Result<(), crate::protocol::ProtoError> {
    for wc in got {
        if wc.opcode != WcOpcode::RecvRdmaWithImm {
            core.on_send_completion(wc.wr_id)?;
            continue;
        }
        let Some(imm) = wc.imm else {
            return Err(crate::protocol::ProtoError::Protocol(
                "receive completed without immediate".into(),
            ));
        };
        core.on_imm(
            imm,
            |row| read_sizes_row(sizes, row),
            |slot| read_slot_header(ring, slot),
            out,
        )?;
    }
    Ok(())
}

/// Whether `wc` delivered an eager message: only such a completion makes the core ask its sink
/// for a copy, a NIC copy or a release.
#[inline]
fn is_eager_completion(wc: &WorkCompletion) -> bool {
    wc.opcode == WcOpcode::RecvRdmaWithImm && wc.imm.is_some_and(is_eager_imm)
}

/// The sink of completions without an eager immediate (see [`is_eager_completion`]): every
/// completion of a comm without bounce slots, whose receiver refuses an eager immediate before it
/// would ask for anything.
struct NoEagerSink;

impl PostSink for NoEagerSink {
    fn post(&mut self, _: &Post<'_>) {
        unreachable!("a receive comm's completions never post a clear-to-send row");
    }
}

impl RecvSink for NoEagerSink {
    fn copy_eager(&mut self, slot: u16, _: u64, _: u64) {
        unreachable!("eager slot {slot} copied on a comm without bounce slots");
    }
    fn release_eager(&mut self, slot: u16) {
        unreachable!("eager slot {slot} released on a comm without bounce slots");
    }
    fn dma_eager(&mut self, slot: u16, _: u64, _: u32, _: u32) {
        unreachable!("eager slot {slot} copied on a comm without bounce slots");
    }
}

/// The sink of an `irecv` on a comm without bounce slots: the clear-to-send row it is handed
/// (the call's one work request) is posted at once.
struct DirectSink<'a> {
    qps: &'a [QueuePair],
    targets: &'a Targets,
    staging: &'a Staging,
    /// The post that failed; the core's later posts are dropped.
    failure: Option<PostFailure>,
}

impl<'a> DirectSink<'a> {
    fn new(qps: &'a [QueuePair], targets: &'a Targets, staging: &'a Staging) -> Self {
        DirectSink {
            qps,
            targets,
            staging,
            failure: None,
        }
    }
}

impl PostSink for DirectSink<'_> {
    #[inline]
    fn post(&mut self, p: &Post<'_>) {
        if self.failure.is_none() {
            self.failure = post_cts_now(self.qps, self.targets, self.staging, p).err();
        }
    }
}

impl RecvSink for DirectSink<'_> {
    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64) {
        NoEagerSink.copy_eager(slot, dst, len);
    }
    fn release_eager(&mut self, slot: u16) {
        NoEagerSink.release_eager(slot);
    }
    fn dma_eager(&mut self, slot: u16, dst: u64, rkey: u32, len: u32) {
        NoEagerSink.dma_eager(slot, dst, rkey, len);
    }
}

/// The first `N` of `bufs` (address, capacity, tag, memory handle), checked against their
/// registrations.
fn recv_bufs<const N: usize>(
    bufs: &[(u64, u64, i32, Option<&MrHandle>)],
) -> NetResult<[RecvBuf; N]> {
    let mut rb = [RecvBuf::default(); N];
    for (i, (dst, &(addr, size, tag, mh))) in rb.iter_mut().zip(bufs).enumerate() {
        let rkey =
            checked_handle(mh, addr, size, format_args!("irecv buffer {i}"))?.map_or(0, |m| m.rkey);
        *dst = RecvBuf {
            addr,
            size,
            rkey,
            tag,
            // The CPU copies eager messages only into host memory; the NIC copies them into GPU
            // memory.
            host: mh.is_none_or(|m| !m.gpu),
        };
    }
    Ok(rb)
}

/// Sizes row `row` of the sizes array at `base`, after the immediate announcing it completed.
fn read_sizes_row(base: *const u8, row: usize) -> [u64; MAX_RECVS] {
    debug_assert!(row < FIFO_DEPTH);
    // SAFETY: the sizes array holds FIFO_DEPTH rows written by the NIC; the immediate that
    // announced them completed, so the bytes are in memory.
    let r = unsafe { std::ptr::read_volatile(base.cast::<[u64; MAX_RECVS]>().add(row)) };
    fence(Ordering::Acquire);
    r
}

/// The header of bounce slot `slot` after its completion (zeroed when there is no ring: the
/// protocol refuses the slot before asking).
fn read_slot_header(ring: Option<SlotRing>, slot: u16) -> EagerHeader {
    let Some(ring) = ring.filter(|r| slot < r.slots) else {
        return EagerHeader::default();
    };
    let p = ring
        .base
        .wrapping_add(eager_slot_offset(slot, ring.slot_max) as usize);
    // SAFETY: the slot lies inside the ring and its write completed.
    let hdr = unsafe { std::ptr::read_volatile(p.cast::<EagerHeader>()) };
    fence(Ordering::Acquire);
    hdr
}

impl Drop for RecvComm {
    fn drop(&mut self) {
        if let Some(p) = self.prof.as_deref_mut() {
            p.finish_all();
        }
        let (c, own) = self.counters();
        stats::log_close(self.stats, Side::Recv, self.link.peer, &c, &own);
    }
}
