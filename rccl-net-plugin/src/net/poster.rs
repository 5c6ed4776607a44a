//! Carries out the protocol core's work requests: each [`Post`] becomes one verbs work request
//! on its queue pair, addressed into the peer's memory, with small host data inline and the rest
//! staged in our registered buffers. Consecutive posts for one queue pair go in one
//! `ibv_post_send`. Nothing here decides what to send or when.

use super::buffer::RegisteredBuf;
use crate::protocol::{
    eager_slot_offset, fifo_row_offset, sizes_row_offset, EagerHeader, Post, PostOp, PostSink,
    RecvSink, CTS_ROW_BYTES, EAGER_HEADER_BYTES, MAX_EAGER_SLOTS, SIZES_ROW_BYTES,
};
use halo_ibverbs::{QueuePair, SendOp, SendWr, Sge, VerbsError, MAX_WRS_PER_POST};
use std::mem::MaybeUninit;

/// A memory region of the peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Remote {
    pub addr: u64,
    pub rkey: u32,
}

/// The peer's memory the posts of one comm address.
#[derive(Clone, Copy, Debug, Default)]
pub struct Targets {
    /// Sender: the receiver's sizes array and eager ring. Receiver: the sender's FIFO.
    pub fifo: Remote,
    pub sizes: Remote,
    pub eager: Remote,
    /// Payload bytes of one of the peer's bounce slots.
    pub eager_slot_max: u32,
}

/// Our registered staging for posts that cannot go inline: one area per row or slot, which the
/// protocol reuses only after the previous write from it has completed.
pub struct Staging {
    /// Receiver: one clear-to-send row per FIFO row. Sender: one sizes row per FIFO row.
    pub rows: RegisteredBuf,
    /// Sender: one eager header per bounce slot (empty on a receiver).
    pub eager_headers: Option<RegisteredBuf>,
}

/// Where a receiver's eager bounce slots live in our memory.
#[derive(Clone, Copy)]
pub struct SlotRing {
    pub base: *mut u8,
    pub slots: u16,
    pub slot_max: u32,
}

impl SlotRing {
    /// Address of bounce slot `slot`'s payload.
    pub fn payload(&self, slot: u16) -> *mut u8 {
        self.base
            .wrapping_add(eager_slot_offset(slot, self.slot_max) as usize + EAGER_HEADER_BYTES)
    }
}

/// A NIC copy of an eager message out of bounce slot `slot` into GPU memory, which the receive
/// comm posts on its flush queue pair (connected to itself) once the core's call has returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EagerDma {
    pub slot: u16,
    pub dst: u64,
    pub rkey: u32,
    pub len: u32,
}

/// The NIC copies one call of the protocol core asked for (at most one per bounce slot).
#[derive(Clone, Copy, Debug, Default)]
pub struct EagerDmas {
    pub list: [EagerDma; MAX_EAGER_SLOTS],
    pub n: usize,
    /// The core asked for more copies than it can have in flight (a broken invariant).
    pub overflow: bool,
}

/// The SGE, operation and inline flag of a [`PostOp::Data`] (`None` for other posts). The SGE is
/// empty (length 0) when no local bytes are read.
#[inline]
fn data_wr(op: &PostOp<'_>, max_inline: usize) -> Option<(Sge, SendOp, bool)> {
    let PostOp::Data {
        local_addr,
        lkey,
        len,
        host,
        remote_addr,
        rkey,
        imm,
    } = *op
    else {
        return None;
    };
    let sge = Sge {
        addr: local_addr,
        length: len,
        lkey,
    };
    let op = match imm {
        Some(imm) => SendOp::WriteImm {
            remote_addr,
            rkey,
            imm,
        },
        None => SendOp::Write { remote_addr, rkey },
    };
    // Small host data goes inside the work request: no DMA read before the send.
    let inline = host && len > 0 && len as usize <= max_inline;
    Some((sge, op, inline))
}

/// Posts `p`, a [`PostOp::Data`], at once on its queue pair of `qps`: the one work request of a
/// call, without a [`Poster`]'s batch.
#[inline]
pub fn post_data_now(qps: &[QueuePair], p: &Post<'_>) -> Result<(), PostFailure> {
    let fail = |err| PostFailure { qp: p.qp, err };
    let qp = &qps[p.qp];
    let Some((sge, op, inline)) = data_wr(&p.op, qp.caps().max_inline_data as usize) else {
        return Err(fail(VerbsError::InvalidArgument(
            "only a data write is posted on its own".into(),
        )));
    };
    let sges = [sge];
    let wr = SendWr {
        wr_id: p.wr_id,
        op,
        sge: &sges[..usize::from(sge.length > 0)],
        signaled: p.signaled,
        inline,
    };
    // SAFETY: the SGE lies in the caller's registered buffer (under its lkey), which the request
    // owns until `test` reports it done; inline bytes are copied by the provider during the call.
    unsafe { qp.post_send_one(&wr) }.map_err(fail)
}

/// Posts `p`, a [`PostOp::Cts`], at once: the one work request of an `irecv` on a comm without
/// bounce slots. The row goes inline straight from the protocol core's copy (no arena), or from
/// our staging rows when the queue pair's inline room is smaller than the row.
#[inline]
pub fn post_cts_now(
    qps: &[QueuePair],
    targets: &Targets,
    staging: &Staging,
    p: &Post<'_>,
) -> Result<(), PostFailure> {
    let fail = |err| PostFailure { qp: p.qp, err };
    let PostOp::Cts { row, entries } = p.op else {
        return Err(fail(VerbsError::InvalidArgument(
            "only a clear-to-send row is posted on its own here".into(),
        )));
    };
    let qp = &qps[p.qp];
    let bytes = std::mem::size_of_val(entries);
    let inline = bytes <= qp.caps().max_inline_data as usize;
    let sge = if inline {
        Sge {
            addr: entries.as_ptr() as u64,
            length: bytes as u32,
            lkey: 0,
        }
    } else {
        stage_row(staging, row * CTS_ROW_BYTES, entries.as_ptr().cast(), bytes)
    };
    let sges = [sge];
    let wr = SendWr {
        wr_id: p.wr_id,
        op: SendOp::Write {
            remote_addr: targets.fifo.addr + fifo_row_offset(row),
            rkey: targets.fifo.rkey,
        },
        sge: &sges,
        signaled: p.signaled,
        inline,
    };
    // SAFETY: inline bytes are the caller's row, readable during this call (the provider copies
    // them); otherwise the SGE lies in our staging rows, reused only after this write completed.
    unsafe { qp.post_send_one(&wr) }.map_err(fail)
}

/// Copies `bytes` from `src` into our staging rows at `offset`; the SGE that reads them.
fn stage_row(staging: &Staging, offset: usize, src: *const u8, bytes: usize) -> Sge {
    let dst = staging.rows.ptr().wrapping_add(offset);
    // SAFETY: the staging buffer holds FIFO_DEPTH rows of the largest row size; this row's
    // previous write completed before the protocol reused the row.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, bytes) };
    Sge {
        addr: dst as u64,
        length: bytes as u32,
        lkey: staging.rows.lkey(),
    }
}

/// A post that failed: the queue pair and the verbs error.
pub struct PostFailure {
    pub qp: usize,
    pub err: VerbsError,
}

/// Inline bytes a batch may carry: a full clear-to-send row per work request.
const ARENA_BYTES: usize = MAX_WRS_PER_POST * CTS_ROW_BYTES;

/// A translated work request waiting for its batch. Inline bytes that live in no caller memory
/// (rows, sizes, headers) are copied into the poster's arena; `arena` then holds their offset,
/// turned into an address only when the batch is posted (the poster may move until then).
#[derive(Clone, Copy)]
struct Pending {
    wr_id: u64,
    op: SendOp,
    sge: [Sge; 2],
    nsge: u8,
    signaled: bool,
    inline: bool,
    /// `sge[0]` points at this offset of the arena instead of its own `addr`.
    arena: Option<u16>,
}

/// The sink the protocol core posts into for the duration of one call. Building one costs
/// nothing (its arrays stay uninitialised until used): the data path creates one per call.
pub struct Poster<'a> {
    qps: &'a [QueuePair],
    targets: &'a Targets,
    staging: &'a Staging,
    ring: Option<SlotRing>,
    max_inline: usize,
    pending: [MaybeUninit<Pending>; MAX_WRS_PER_POST],
    arena: [MaybeUninit<u8>; ARENA_BYTES],
    arena_used: usize,
    n: usize,
    qp: usize,
    /// Work requests handed to the provider by this poster.
    pub posted: u32,
    failure: Option<PostFailure>,
    /// NIC copies of eager messages the core asked for (receiver only).
    pub dmas: EagerDmas,
}

impl<'a> Poster<'a> {
    pub fn new(
        qps: &'a [QueuePair],
        targets: &'a Targets,
        staging: &'a Staging,
        ring: Option<SlotRing>,
    ) -> Self {
        Poster {
            max_inline: qps[0].caps().max_inline_data as usize,
            qps,
            targets,
            staging,
            ring,
            pending: [const { MaybeUninit::uninit() }; MAX_WRS_PER_POST],
            arena: [const { MaybeUninit::uninit() }; ARENA_BYTES],
            arena_used: 0,
            n: 0,
            qp: 0,
            posted: 0,
            failure: None,
            dmas: EagerDmas::default(),
        }
    }

    /// Posts what is still pending; the first failure of this poster, if any. Takes `&mut self`:
    /// moving a poster would copy its arena.
    pub fn finish(&mut self) -> Result<u32, PostFailure> {
        self.flush();
        match self.failure.take() {
            Some(f) => Err(f),
            None => Ok(self.posted),
        }
    }

    fn flush(&mut self) {
        let n = std::mem::take(&mut self.n);
        self.arena_used = 0;
        if n == 0 || self.failure.is_some() {
            return;
        }
        let base = self.arena.as_ptr() as u64;
        if n == 1 {
            // The common case (one work request per call): no batch arrays.
            // SAFETY: entry 0 was written by `post` since the last flush.
            let p = unsafe { self.pending[0].assume_init_mut() };
            if let Some(off) = p.arena {
                p.sge[0].addr = base + u64::from(off);
            }
            let wr = SendWr {
                wr_id: p.wr_id,
                op: p.op,
                sge: &p.sge[..usize::from(p.nsge)],
                signaled: p.signaled,
                inline: p.inline,
            };
            // SAFETY: the SGE is inline (it points into the arena, unchanged until this call
            // returns) or lies in a registered region that outlives the work request: the
            // caller's buffer (owned by the request until `test` reports it done) or our staging
            // rows (reused only after their write completed).
            match unsafe { self.qps[self.qp].post_send_one(&wr) } {
                Ok(()) => self.posted += 1,
                Err(err) => self.failure = Some(PostFailure { qp: self.qp, err }),
            }
            return;
        }
        // Inline bytes kept in the arena get their address now that the poster stays put.
        for p in &mut self.pending[..n] {
            // SAFETY: entries 0..n were written by `post` since the last flush.
            let p = unsafe { p.assume_init_mut() };
            if let Some(off) = p.arena {
                p.sge[0].addr = base + u64::from(off);
            }
        }
        let mut wrs = [const { MaybeUninit::<SendWr<'_>>::uninit() }; MAX_WRS_PER_POST];
        for (w, p) in wrs.iter_mut().zip(&self.pending[..n]) {
            // SAFETY: as above.
            let p = unsafe { p.assume_init_ref() };
            w.write(SendWr {
                wr_id: p.wr_id,
                op: p.op,
                sge: &p.sge[..usize::from(p.nsge)],
                signaled: p.signaled,
                inline: p.inline,
            });
        }
        // SAFETY: the first n entries were just initialised.
        let wrs = unsafe { std::slice::from_raw_parts(wrs.as_ptr().cast::<SendWr<'_>>(), n) };
        let qp = &self.qps[self.qp];
        // SAFETY: every SGE is either inline (it points into the arena, unchanged until this
        // call returns), or lies in a registered region that outlives the work request: the
        // caller's buffer (registered under its lkey and owned by the request until `test`
        // reports it done) or our staging rows (reused only after their write completed).
        match unsafe { qp.post_send(wrs) } {
            Ok(()) => self.posted += n as u32,
            Err(err) => self.failure = Some(PostFailure { qp: self.qp, err }),
        }
    }

    /// Copies `bytes` into the arena; its offset.
    fn keep(&mut self, src: *const u8, bytes: usize) -> u16 {
        let off = self.arena_used;
        debug_assert!(off + bytes <= ARENA_BYTES);
        // SAFETY: the arena has room for a full row per pending work request, and `src` is
        // `bytes` readable bytes of a post the caller holds during this call.
        unsafe {
            std::ptr::copy_nonoverlapping(src, self.arena.as_mut_ptr().add(off).cast(), bytes)
        };
        self.arena_used += bytes.next_multiple_of(8);
        off as u16
    }

    /// The verbs form of `p`.
    fn translate(&mut self, p: &Post<'_>) -> Pending {
        let t = self.targets;
        let mut w = Pending {
            wr_id: p.wr_id,
            op: SendOp::Send,
            sge: [Sge::default(); 2],
            nsge: 1,
            signaled: p.signaled,
            inline: false,
            arena: None,
        };
        match &p.op {
            PostOp::Data { .. } => {
                if let Some((sge, op, inline)) = data_wr(&p.op, self.max_inline) {
                    (w.sge[0], w.op, w.inline) = (sge, op, inline);
                    w.nsge = u8::from(sge.length > 0);
                }
            }
            PostOp::Sizes { row, sizes } => {
                let bytes = std::mem::size_of_val(*sizes);
                self.our_bytes(&mut w, row * SIZES_ROW_BYTES, sizes.as_ptr().cast(), bytes);
                w.op = SendOp::Write {
                    remote_addr: t.sizes.addr + sizes_row_offset(*row),
                    rkey: t.sizes.rkey,
                };
            }
            PostOp::Cts { row, entries } => {
                let bytes = std::mem::size_of_val(*entries);
                self.our_bytes(&mut w, row * CTS_ROW_BYTES, entries.as_ptr().cast(), bytes);
                w.op = SendOp::Write {
                    remote_addr: t.fifo.addr + fifo_row_offset(*row),
                    rkey: t.fifo.rkey,
                };
            }
            PostOp::Eager {
                slot,
                header,
                bare,
                local_addr,
                lkey,
                len,
                host,
                imm,
            } => {
                let data = Sge {
                    addr: *local_addr,
                    length: *len,
                    lkey: *lkey,
                };
                let mut remote = t.eager.addr + eager_slot_offset(*slot, t.eager_slot_max);
                if *bare {
                    // The immediate describes the message: its bytes alone, into the payload.
                    remote += EAGER_HEADER_BYTES as u64;
                    w.inline = *host && *len > 0 && *len as usize <= self.max_inline;
                    w.sge[0] = data;
                    w.nsge = u8::from(*len > 0);
                } else {
                    w.inline = *host && EAGER_HEADER_BYTES + *len as usize <= self.max_inline;
                    w.sge[0] = self.eager_header(&mut w, *slot, header);
                    w.sge[1] = data;
                    w.nsge = if *len > 0 { 2 } else { 1 };
                }
                w.op = SendOp::WriteImm {
                    remote_addr: remote,
                    rkey: t.eager.rkey,
                    imm: *imm,
                };
            }
        }
        w
    }

    /// The SGE of an eager message's header: from the arena when `w` goes inline, else from our
    /// header staging for `slot`.
    fn eager_header(&mut self, w: &mut Pending, slot: u16, header: &EagerHeader) -> Sge {
        if w.inline {
            let hdr: *const EagerHeader = header;
            w.arena = Some(self.keep(hdr.cast(), EAGER_HEADER_BYTES));
            return Sge {
                addr: 0,
                length: EAGER_HEADER_BYTES as u32,
                lkey: 0,
            };
        }
        let headers = self
            .staging
            .eager_headers
            .as_ref()
            .expect("a send comm stages eager headers");
        let dst = headers
            .ptr()
            .wrapping_add(usize::from(slot) * EAGER_HEADER_BYTES);
        // SAFETY: the staging holds one header per slot; this slot's previous write has landed
        // (the receiver drained the slot before we got the credit).
        unsafe { std::ptr::write_volatile(dst.cast(), *header) };
        Sge {
            addr: dst as u64,
            length: EAGER_HEADER_BYTES as u32,
            lkey: headers.lkey(),
        }
    }

    /// Bytes of our own (a row, sizes) as `w`'s data: inline from the arena when they fit, else
    /// from our staging rows at `offset`.
    fn our_bytes(&mut self, w: &mut Pending, offset: usize, src: *const u8, bytes: usize) {
        w.inline = bytes <= self.max_inline;
        w.sge[0] = if w.inline {
            w.arena = Some(self.keep(src, bytes));
            Sge {
                addr: 0,
                length: bytes as u32,
                lkey: 0,
            }
        } else {
            stage_row(self.staging, offset, src, bytes)
        };
    }
}

impl PostSink for Poster<'_> {
    fn post(&mut self, p: &Post<'_>) {
        if self.failure.is_some() {
            return;
        }
        if self.n > 0 && (p.qp != self.qp || self.n == MAX_WRS_PER_POST) {
            self.flush();
        }
        self.qp = p.qp;
        let w = self.translate(p);
        self.pending[self.n].write(w);
        self.n += 1;
    }
}

impl RecvSink for Poster<'_> {
    fn dma_eager(&mut self, slot: u16, dst: u64, rkey: u32, len: u32) {
        let d = &mut self.dmas;
        // The core has at most one copy per slot in flight; the comm fails on more.
        d.overflow |= d.n == d.list.len();
        if d.n < d.list.len() {
            d.list[d.n] = EagerDma {
                slot,
                dst,
                rkey,
                len,
            };
            d.n += 1;
        }
    }

    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64) {
        let ring = self
            .ring
            .expect("eager copies need the receiver's slot ring");
        debug_assert!(slot < ring.slots && len <= u64::from(ring.slot_max));
        let src = ring.payload(slot);
        // SAFETY: the slot's completion arrived, so its bytes are in place; `dst` is the posted
        // host buffer, registered for at least `len` bytes (the protocol checked `len` against
        // its capacity) and owned by the request until `test` reports it.
        unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, len as usize) };
    }
}
