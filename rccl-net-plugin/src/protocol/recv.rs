//! Receiver half: turns `irecv`s into FIFO rows, and immediates and eager messages into
//! completed requests.

use super::{
    eager_entry, row_of, stamp, CtsEntry, EagerHeader, ProtoError, FIFO_DEPTH, IMM_MAX_SIZE,
    IMM_SIZES_IN_ARRAY, IMM_TRUNCATED, MAX_EAGER_SLOTS, MAX_RECVS,
};

/// One buffer of an `irecv`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvBuf {
    pub addr: u64,
    pub size: u64,
    pub rkey: u32,
    pub tag: i32,
    /// Host memory the CPU may write: an eager message is copied in by the CPU (else by the
    /// NIC, see [`EagerAction::Dma`]).
    pub host: bool,
}

/// What to do with an eager bounce slot. Every eager message is taken by the receiver, from its
/// own slot: the sender reported its send done once the write completed, never sends it again,
/// and may have gone away since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EagerAction {
    /// No eager message is involved.
    None,
    /// No receive posted so far has an entry for the message: keep the slot until one is.
    Hold,
    /// The message is larger than the entry that takes it: that receive fails, nothing is
    /// written, and the slot is free again.
    Drop { slot: u16 },
    /// Copy `len` bytes of slot `slot`'s payload to `dst`; the slot is free again.
    Copy { slot: u16, dst: u64, len: u64 },
    /// Have the NIC copy `len` payload bytes of slot `slot` to `dst` (registered under `rkey`),
    /// through a queue pair connected to itself: the buffer is GPU memory, which the CPU does not
    /// fill. The slot stays busy, and the receive waits, until [`RecvState::on_dma_done`].
    Dma {
        slot: u16,
        dst: u64,
        rkey: u32,
        len: u32,
    },
}

/// Outcome of [`RecvState::post`]. Returned by value on the hot path: boxing would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum RecvPost {
    /// Every FIFO row is in use: return a NULL request.
    NotReady,
    /// Accepted as request `req`: RDMA-write [`RecvState::row`] (its `n` entries) into row
    /// `row_of(seq)` of the sender's FIFO.
    Posted {
        req: u16,
        seq: u32,
        n: usize,
        /// A held eager message this receive takes: carried out before the row is written.
        eager: EagerAction,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ReqState {
    #[default]
    Free,
    Posted,
    Done,
    Failed,
}

#[derive(Clone, Copy, Debug, Default)]
struct RecvReq {
    state: ReqState,
    seq: u32,
    n: usize,
    bufs: [RecvBuf; MAX_RECVS],
    sizes: [u64; MAX_RECVS],
    /// The sender's WRITE_WITH_IMM for this receive is still to come. A one-buffer receive
    /// taken by an eager message gets none.
    imm_due: bool,
    /// NIC copies of eager messages into this receive still on their way.
    dmas: u8,
    /// A message did not fit its buffer: the receive fails once everything has arrived.
    failed: bool,
}

/// Receiver-side protocol state of one receive comm.
pub struct RecvState {
    post_seq: u32,
    /// The receive whose sender's immediate comes next (receives taken whole by an eager
    /// message are skipped: they get none).
    done_seq: u32,
    reqs: [RecvReq; FIFO_DEPTH],
    /// Eager slots drained (copied, dropped, or read back), told to the sender in every row.
    eager_done: u32,
    /// An eager message no posted receive has an entry for yet: (slot, header). A receive
    /// posted later takes it.
    held: Option<(u16, EagerHeader)>,
    /// The request each bounce slot's NIC copy completes, and how many copies are on their way.
    copying: [Option<u8>; MAX_EAGER_SLOTS],
    dmas: u32,
    /// Receives taken whole by an eager message that [`Self::done_seq`] has not passed yet.
    skips: u32,
    /// Bounce slots the sender uses in turn (0: no eager path).
    slots: u32,
    /// Slots drained out of turn: [`Self::eager_done`] counts only the drained slots that
    /// follow each other in the order the sender fills them, as the sender reuses them in it.
    drained: [bool; MAX_EAGER_SLOTS],
    /// The clear-to-send row of the latest posted receive.
    row: [CtsEntry; MAX_RECVS],
    row_len: usize,
}

impl Default for RecvState {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvState {
    pub fn new() -> Self {
        RecvState {
            post_seq: 0,
            done_seq: 0,
            reqs: [RecvReq::default(); FIFO_DEPTH],
            eager_done: 0,
            held: None,
            copying: [None; MAX_EAGER_SLOTS],
            dmas: 0,
            skips: 0,
            slots: 0,
            drained: [false; MAX_EAGER_SLOTS],
            row: [CtsEntry::default(); MAX_RECVS],
            row_len: 0,
        }
    }

    /// A receiver with `slots` bounce slots, which the sender fills in turn.
    pub fn with_slots(mut self, slots: u16) -> Self {
        self.slots = u32::from(slots).min(MAX_EAGER_SLOTS as u32);
        self
    }

    /// Bounce slot `slot` is drained. The count the rows hand back moves over every drained
    /// slot in the sender's order, and stops at the first still in use: a NIC copy can finish
    /// after CPU copies of later slots, and the sender must not reuse its slot before.
    fn drain(&mut self, slot: u16) {
        if self.slots == 0 {
            return;
        }
        self.drained[usize::from(slot) % MAX_EAGER_SLOTS] = true;
        loop {
            let next = (self.eager_done % self.slots) as usize;
            if !self.drained[next] {
                break;
            }
            self.drained[next] = false;
            self.eager_done = self.eager_done.wrapping_add(1);
        }
    }

    /// The clear-to-send row of the receive [`Self::post`] accepted last.
    pub fn row(&self) -> &[CtsEntry] {
        &self.row[..self.row_len]
    }

    /// NIC copies of eager messages on their way.
    pub fn dmas(&self) -> u32 {
        self.dmas
    }

    /// Eager slots drained so far.
    pub fn eager_done(&self) -> u32 {
        self.eager_done
    }

    /// An eager message waits for a receive not posted yet.
    pub fn holds_eager(&self) -> bool {
        self.held.is_some()
    }

    /// Receives posted whose sender's immediate has not arrived.
    pub fn in_flight(&self) -> u32 {
        self.post_seq.wrapping_sub(self.done_seq)
    }

    /// Sequence number of the receive the next immediate completes.
    pub fn next_done_seq(&self) -> u32 {
        self.done_seq
    }

    /// Post a (multi-)receive of `bufs.len()` buffers.
    #[inline]
    pub fn post(&mut self, bufs: &[RecvBuf]) -> Result<RecvPost, ProtoError> {
        let n = bufs.len();
        if n == 0 || n > MAX_RECVS {
            return Err(ProtoError::InvalidUsage(format!(
                "irecv of {n} buffers (1..={MAX_RECVS} allowed)"
            )));
        }
        let r = row_of(self.post_seq);
        if self.reqs[r].state != ReqState::Free {
            return Ok(RecvPost::NotReady);
        }
        let seq = self.post_seq;
        // The row is built where it stays (no copies of a whole row per receive).
        let req = &mut self.reqs[r];
        req.state = ReqState::Posted;
        req.seq = seq;
        req.n = n;
        req.imm_due = true;
        req.dmas = 0;
        req.failed = false;
        // `sizes[..n]` is written when the data arrives; nothing reads past `n`.
        for (i, b) in bufs.iter().enumerate() {
            self.row[i] = CtsEntry {
                addr: b.addr,
                size: b.size,
                rkey: b.rkey,
                tag: b.tag,
                nreqs: n as u16,
                flags: 0,
                stamp: stamp(seq),
                check: 0,
                eager_done: 0,
            };
            req.bufs[i] = *b;
        }
        self.post_seq = seq.wrapping_add(1);
        let mut eager = EagerAction::None;
        if let Some((slot, hdr)) = self.held {
            // Every receive before this one lacked the message's tag: the first entry with it
            // takes the message, as the sender decides from the same row.
            if let Some(i) = eager_entry(&self.row[..n], hdr.tag) {
                self.held = None;
                eager = self.take(r, i, slot, hdr);
                self.advance();
            }
        }
        for e in &mut self.row[..n] {
            e.eager_done = self.eager_done;
            e.check = e.compute_check();
        }
        self.row_len = n;
        Ok(RecvPost::Posted {
            req: r as u16,
            seq,
            n,
            eager,
        })
    }

    /// Eager message `hdr` in bounce slot `slot` goes into entry `i` of request `r`.
    fn take(&mut self, r: usize, i: usize, slot: u16, hdr: EagerHeader) -> EagerAction {
        let req = &mut self.reqs[r];
        if req.n == 1 {
            // The message is the whole receive: no immediate follows.
            req.imm_due = false;
            self.skips += 1;
        }
        let size = u64::from(hdr.size);
        let buf = req.bufs[i];
        let action = if size > buf.size {
            // The sender saw the same row and counts the send as delivered to a failed receive.
            req.failed = true;
            self.drain(slot);
            EagerAction::Drop { slot }
        } else if buf.host {
            req.sizes[i] = size;
            self.drain(slot);
            EagerAction::Copy {
                slot,
                dst: buf.addr,
                len: size,
            }
        } else {
            req.sizes[i] = size;
            req.dmas += 1;
            self.copying[usize::from(slot)] = Some(r as u8);
            self.dmas += 1;
            EagerAction::Dma {
                slot,
                dst: buf.addr,
                rkey: buf.rkey,
                len: hdr.size,
            }
        };
        self.finish_if_complete(r);
        action
    }

    /// Request `r` is done (or failed) once its immediate and its copies have all arrived.
    fn finish_if_complete(&mut self, r: usize) {
        let req = &mut self.reqs[r];
        if req.state == ReqState::Posted && !req.imm_due && req.dmas == 0 {
            req.state = if req.failed {
                ReqState::Failed
            } else {
                ReqState::Done
            };
        }
    }

    /// Moves [`Self::done_seq`] past receives that wait for no immediate.
    #[inline]
    fn advance(&mut self) {
        while self.skips > 0 && self.done_seq != self.post_seq {
            let req = &self.reqs[row_of(self.done_seq)];
            // A receive taken whole by an eager message may be done, collected and its row
            // reused already: a row holding another sequence number is past too.
            if req.seq == self.done_seq && req.imm_due {
                break;
            }
            self.skips -= 1;
            self.done_seq = self.done_seq.wrapping_add(1);
        }
    }

    /// An eager message arrived in bounce slot `slot` with header `hdr` (read after its
    /// completion, so every byte is in place).
    pub fn on_eager(&mut self, slot: u16, hdr: EagerHeader) -> Result<EagerAction, ProtoError> {
        if !hdr.is_intact() {
            return Err(ProtoError::Protocol(format!(
                "eager slot {slot} holds a damaged header {hdr:?}"
            )));
        }
        if usize::from(slot) >= MAX_EAGER_SLOTS || self.copying[usize::from(slot)].is_some() {
            return Err(ProtoError::Protocol(format!(
                "eager message in slot {slot}, which is not free"
            )));
        }
        if self.held.is_some() || hdr.seq != self.done_seq {
            return Err(ProtoError::Protocol(format!(
                "eager message for receive #{} while receive #{} is next{}",
                hdr.seq,
                self.done_seq,
                if self.held.is_some() {
                    " and an earlier eager message is still held"
                } else {
                    ""
                }
            )));
        }
        // The first posted receive (from the one the message was sent for) with an entry for
        // its tag takes it; none yet: the next receive posted with one will.
        let mut seq = self.done_seq;
        while seq != self.post_seq {
            let r = row_of(seq);
            let req = &self.reqs[r];
            let tags = req.bufs[..req.n].iter().position(|b| b.tag == hdr.tag);
            if let Some(i) = tags {
                let action = self.take(r, i, slot, hdr);
                self.advance();
                return Ok(action);
            }
            seq = seq.wrapping_add(1);
        }
        self.held = Some((slot, hdr));
        Ok(EagerAction::Hold)
    }

    /// The NIC copy of bounce slot `slot`'s message completed: the slot is free, and its
    /// receive may be done.
    pub fn on_dma_done(&mut self, slot: u16) -> Result<(), ProtoError> {
        let Some(r) = self
            .copying
            .get_mut(usize::from(slot))
            .and_then(Option::take)
        else {
            return Err(ProtoError::InvalidUsage(format!(
                "copy completion for eager slot {slot}, which has no copy in flight"
            )));
        };
        let r = usize::from(r);
        self.dmas -= 1;
        self.reqs[r].dmas -= 1;
        self.drain(slot);
        self.finish_if_complete(r);
        Ok(())
    }

    /// Whether the immediate `imm` needs the sizes array row of the next receive.
    pub fn imm_needs_sizes(imm: u32) -> bool {
        imm == IMM_SIZES_IN_ARRAY
    }

    /// The WRITE_WITH_IMM of the oldest posted receive arrived with `imm`. `sizes_row` is the
    /// sizes array row of that receive (read only when [`Self::imm_needs_sizes`]).
    /// Returns the request that completed.
    #[inline]
    pub fn on_imm(
        &mut self,
        imm: u32,
        sizes_row: impl FnOnce() -> [u64; MAX_RECVS],
    ) -> Result<u16, ProtoError> {
        let seq = self.done_seq;
        let r = row_of(seq);
        let req = &mut self.reqs[r];
        if self.post_seq == seq || req.state != ReqState::Posted || req.seq != seq {
            return Err(ProtoError::Protocol(format!(
                "data arrived (imm {imm:#x}) with no receive posted for it (receive #{seq})"
            )));
        }
        // `done_seq` never rests on a receive taken whole by an eager message (see `advance`).
        debug_assert!(req.imm_due);
        req.imm_due = false;
        match imm {
            IMM_TRUNCATED => {
                req.failed = true;
                self.finish_if_complete(r);
            }
            IMM_SIZES_IN_ARRAY => {
                let sizes = sizes_row();
                for (i, (size, b)) in sizes.iter().zip(&req.bufs).take(req.n).enumerate() {
                    if *size > b.size {
                        return Err(ProtoError::Protocol(format!(
                            "peer reports {size} bytes written into receive buffer {i} of {} bytes",
                            b.size
                        )));
                    }
                }
                req.sizes[..req.n].copy_from_slice(&sizes[..req.n]);
                self.finish_if_complete(r);
            }
            size => {
                let size = u64::from(size);
                if req.n != 1 || size > IMM_MAX_SIZE || size > req.bufs[0].size {
                    return Err(ProtoError::Protocol(format!(
                        "immediate size {size} does not fit receive #{seq} ({} buffers, first holds {})",
                        req.n, req.bufs[0].size
                    )));
                }
                // A one-buffer receive that waits for an immediate has no eager message in it.
                req.sizes[0] = size;
                req.state = ReqState::Done;
            }
        }
        self.done_seq = seq.wrapping_add(1);
        if self.skips > 0 {
            self.advance();
        }
        Ok(r as u16)
    }

    /// Collect request `req`: `None` while in progress; once done, the received sizes written to
    /// `sizes[..n]` and `n`, or the error. A finished request is freed by this call.
    #[inline]
    pub fn test_into(
        &mut self,
        req: u16,
        sizes: &mut [u64; MAX_RECVS],
    ) -> Result<Option<usize>, ProtoError> {
        let Some(rr) = self.reqs.get_mut(req as usize) else {
            return Err(ProtoError::InvalidUsage(format!(
                "receive request {req} does not exist"
            )));
        };
        match rr.state {
            // The common answer of a polling loop: nothing copied.
            ReqState::Posted => Ok(None),
            ReqState::Done => {
                rr.state = ReqState::Free;
                let n = rr.n;
                if n == 1 {
                    sizes[0] = rr.sizes[0];
                } else {
                    let n = n.min(MAX_RECVS);
                    sizes[..n].copy_from_slice(&rr.sizes[..n]);
                }
                Ok(Some(n))
            }
            ReqState::Free => Err(ProtoError::InvalidUsage(format!(
                "receive request {req} is not in flight"
            ))),
            ReqState::Failed => {
                rr.state = ReqState::Free;
                Err(ProtoError::TruncatedByPeer { seq: rr.seq })
            }
        }
    }
}
