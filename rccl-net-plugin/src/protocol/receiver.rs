//! The receiving end of a connection as one state machine: posting receives ([`RecvState`]),
//! the clear-to-send writes that offer them and their send-queue accounting, eager bounce slots,
//! and the receive-queue entries each immediate consumes.

use super::counters::Counters;
use super::post::{Post, PostOp, RecvSink};
use super::recv::{EagerAction, RecvBuf, RecvPost, RecvState};
use super::wire::{
    is_eager_imm, row_of, BareEager, EagerHeader, WrId, FIFO_DEPTH, IMM_EAGER, IMM_EAGER_SLOT_MASK,
    MAX_EAGER_SLOTS, MAX_RECVS,
};
use super::ProtoError;

/// Receives a receive comm keeps posted for incoming immediates: one per FIFO row and eager slot
/// that can be in flight, with room for a restock batch.
pub const RQ_STOCK: u32 = 2 * FIFO_DEPTH as u32;
/// Consumed receives are posted again this many at a time, by `irecv` (see [`Receiver::take_restock`]).
pub const RESTOCK_BATCH: u32 = 16;
// Right after an `irecv` restocked, fewer than a batch are missing, and every row and eager slot
// that can be in flight has its receive.
const _: () = assert!(RQ_STOCK - RESTOCK_BATCH >= (FIFO_DEPTH + MAX_EAGER_SLOTS) as u32);

/// Clear-to-send writes per signaled one: fewer completions for the receiver to poll.
pub const CTS_SIGNAL_EVERY: u32 = 8;

/// How a receive comm is set up.
#[derive(Clone, Copy, Debug)]
pub struct RecvConfig {
    /// Work requests the send queue (which carries the clear-to-send writes) holds.
    pub sq_depth: u32,
    /// Our bounce slots (0: no eager path) and their payload size.
    pub eager_slots: u16,
    pub eager_max: u32,
}

/// Receiver-side protocol of one receive comm.
pub struct Receiver {
    state: RecvState,
    cfg: RecvConfig,
    /// Clear-to-send writes posted; only every [`CTS_SIGNAL_EVERY`]th asks for a completion.
    cts_posted: u32,
    /// Clear-to-send writes known to be finished (released from the send queue).
    cts_reaped: u32,
    /// Receive-queue entries consumed by immediates and not yet posted again.
    restock: u32,
    /// What happened so far (see [`Self::counters`]).
    counters: Counters,
}

impl Receiver {
    pub fn new(cfg: RecvConfig) -> Self {
        Receiver {
            state: RecvState::new().with_slots(cfg.eager_slots),
            cfg,
            cts_posted: 0,
            cts_reaped: 0,
            restock: 0,
            counters: Counters::default(),
        }
    }

    /// What this end did so far: receives, bytes, clear-to-send writes, completions, eager
    /// messages taken and dropped.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether the send queue has room for one more clear-to-send write. Unsignaled writes hold
    /// their slots until a later signaled one is polled: never post more than the queue holds.
    pub fn cts_room(&self) -> bool {
        self.cts_posted.wrapping_sub(self.cts_reaped) < self.cfg.sq_depth
    }

    /// NIC copies of eager messages on their way (see [`Self::on_eager_dma_done`]).
    pub fn eager_dmas(&self) -> u32 {
        self.state.dmas()
    }

    /// The NIC copy of bounce slot `slot`'s message into its receive completed.
    pub fn on_eager_dma_done(&mut self, slot: u16) -> Result<(), ProtoError> {
        self.state.on_dma_done(slot)
    }

    /// `irecv` of `bufs`. `Ok(None)`: not yet (every FIFO row or the send queue is in use).
    /// `host` in a buffer says the CPU may write it: an eager message is copied into it by the
    /// CPU, into any other by the NIC ([`RecvSink::dma_eager`]).
    #[inline]
    pub fn irecv(
        &mut self,
        bufs: &[RecvBuf],
        out: &mut impl RecvSink,
    ) -> Result<Option<u16>, ProtoError> {
        if !self.cts_room() {
            return Ok(None);
        }
        let RecvPost::Posted {
            req, seq, eager, ..
        } = self.state.post(bufs)?
        else {
            return Ok(None);
        };
        // A held eager message is settled before the row hands its slot back to the sender.
        self.apply_eager(eager, out);
        let signaled = self.cts_posted % CTS_SIGNAL_EVERY == CTS_SIGNAL_EVERY - 1;
        self.counters.wrs += 1;
        out.post(&Post {
            qp: 0,
            wr_id: if signaled {
                WrId::Cts(self.cts_posted)
            } else {
                WrId::Untracked
            }
            .encode(),
            signaled,
            op: PostOp::Cts {
                row: row_of(seq),
                entries: self.state.row(),
            },
        });
        self.cts_posted = self.cts_posted.wrapping_add(1);
        Ok(Some(req))
    }

    /// A successful send-queue completion: a signaled clear-to-send write finished, and with it
    /// every earlier one.
    pub fn on_send_completion(&mut self, wr_id: u64) -> Result<(), ProtoError> {
        self.counters.cqe_cts += 1;
        match WrId::decode(wr_id) {
            Some(WrId::Cts(n))
                if n.wrapping_sub(self.cts_reaped)
                    < self.cts_posted.wrapping_sub(self.cts_reaped) =>
            {
                self.cts_reaped = n.wrapping_add(1);
                Ok(())
            }
            _ => Err(ProtoError::Protocol(format!(
                "completion of work request {wr_id:#x}, which no clear-to-send write posted"
            ))),
        }
    }

    /// A WRITE_WITH_IMM arrived with `imm` (it consumed one receive-queue entry).
    /// `sizes_row(row)` reads the sizes array row, `slot_header(slot)` the header of a bounce slot.
    #[inline]
    pub fn on_imm(
        &mut self,
        imm: u32,
        sizes_row: impl FnOnce(usize) -> [u64; MAX_RECVS],
        slot_header: impl FnOnce(u16) -> EagerHeader,
        out: &mut impl RecvSink,
    ) -> Result<(), ProtoError> {
        self.restock += 1;
        self.counters.cqe_imm += 1;
        if is_eager_imm(imm) {
            return self.on_eager_imm(imm, slot_header, out);
        }
        let row = row_of(self.state.next_done_seq());
        self.state.on_imm(imm, || sizes_row(row)).map(drop)
    }

    /// [`Self::on_imm`] of an eager message: out of line, so that the ordinary immediate's path
    /// stays short.
    #[inline(never)]
    fn on_eager_imm(
        &mut self,
        imm: u32,
        slot_header: impl FnOnce(u16) -> EagerHeader,
        out: &mut impl RecvSink,
    ) -> Result<(), ProtoError> {
        let bare = BareEager::decode(imm);
        if bare.is_none() && imm & !IMM_EAGER_SLOT_MASK != IMM_EAGER {
            return Err(ProtoError::Protocol(format!(
                "immediate {imm:#x} is no eager message this protocol sends"
            )));
        }
        let slot = bare.map_or((imm & IMM_EAGER_SLOT_MASK) as u16, |b| b.slot);
        if slot >= self.cfg.eager_slots {
            return Err(ProtoError::Protocol(format!(
                "eager message in slot {slot}, which this receiver does not have"
            )));
        }
        // A bare message is for the next receive due, like every eager message.
        let hdr = match bare {
            Some(b) => EagerHeader::new(self.state.next_done_seq(), b.tag, b.size),
            None => slot_header(slot),
        };
        if hdr.size > self.cfg.eager_max {
            return Err(ProtoError::Protocol(format!(
                "eager message of {} bytes in a slot of {}",
                hdr.size, self.cfg.eager_max
            )));
        }
        let action = self.state.on_eager(slot, hdr)?;
        self.apply_eager(action, out);
        Ok(())
    }

    /// Receive-queue entries to post again: none until [`RESTOCK_BATCH`] immediates have consumed
    /// theirs, then all of them in one post. The caller asks at the start of `irecv`, before the
    /// row it offers goes out, never while completing a receive: that path is a message's
    /// critical path (the data arrived, the caller waits to act on it).
    ///
    /// Why that is enough: each immediate polled moves one entry from "a row or eager slot in
    /// flight" to "consumed, not restocked", so their sum never grows while completions are
    /// handled. Only `irecv` adds to what can be in flight (a new row, and with it the eager
    /// credit its row hands back), and it restocks first, leaving fewer than a batch missing:
    /// [`RQ_STOCK`] covers the rest.
    pub fn take_restock(&mut self) -> u32 {
        if self.restock < RESTOCK_BATCH {
            return 0;
        }
        std::mem::take(&mut self.restock)
    }

    /// Collect request `req`: `None` while in progress; the received sizes once done.
    #[inline]
    pub fn test(&mut self, req: u16) -> Result<Option<(usize, [u64; MAX_RECVS])>, ProtoError> {
        let mut sizes = [0; MAX_RECVS];
        Ok(self.test_into(req, &mut sizes)?.map(|n| (n, sizes)))
    }

    /// [`Self::test`] that writes the sizes into `sizes[..n]` and returns `n`.
    #[inline]
    pub fn test_into(
        &mut self,
        req: u16,
        sizes: &mut [u64; MAX_RECVS],
    ) -> Result<Option<usize>, ProtoError> {
        let r = self.state.test_into(req, sizes);
        if let Ok(Some(n)) = r {
            self.counters.msgs += 1;
            self.counters.bytes += if n == 1 {
                sizes[0]
            } else {
                sizes[..n.min(MAX_RECVS)].iter().sum::<u64>()
            };
        }
        r
    }

    /// Whether an eager message waits for a receive not posted yet: only then may
    /// [`Self::irecv`] ask its sink for a copy, a NIC copy or a release.
    #[inline]
    pub fn holds_eager(&self) -> bool {
        self.state.holds_eager()
    }

    /// Receives posted whose data has not arrived.
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight()
    }

    fn apply_eager(&mut self, action: EagerAction, out: &mut impl RecvSink) {
        match action {
            EagerAction::None | EagerAction::Hold => {}
            EagerAction::Drop { slot } => {
                self.counters.eager_dropped += 1;
                out.release_eager(slot);
            }
            EagerAction::Copy { slot, dst, len } => {
                self.counters.eager_taken += 1;
                out.copy_eager(slot, dst, len);
            }
            EagerAction::Dma {
                slot,
                dst,
                rkey,
                len,
            } => {
                self.counters.eager_taken += 1;
                self.counters.eager_dma += 1;
                out.dma_eager(slot, dst, rkey, len);
            }
        }
    }
}
