//! Receiver half: turns `irecv`s into FIFO rows and immediates into completed requests.

use super::{
    eager_fits, row_of, stamp, CtsEntry, EagerHeader, ProtoError, CTS_EAGER_OK, FIFO_DEPTH,
    IMM_MAX_SIZE, IMM_SIZES_IN_ARRAY, IMM_TRUNCATED, MAX_RECVS,
};

/// One buffer of an `irecv`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvBuf {
    pub addr: u64,
    pub size: u64,
    pub rkey: u32,
    pub tag: i32,
    /// Host memory the CPU may write: an eager message can be copied into it.
    pub host: bool,
}

/// What to do with an eager bounce slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EagerAction {
    /// No eager message is involved.
    None,
    /// The message is for a receive not posted yet: keep the slot until it is.
    Hold,
    /// The posted receive does not take the message: the slot is free again, and the sender
    /// will send the message the ordinary way.
    Drop { slot: u16 },
    /// Copy `len` bytes of slot `slot`'s payload to `dst`; the receive is complete.
    Copy { slot: u16, dst: u64, len: u64 },
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
        /// An eager message held for this receive: `Copy` before the row is written (the
        /// request is then already done), or `Drop`.
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
    capacity: [u64; MAX_RECVS],
    sizes: [u64; MAX_RECVS],
    /// The first entry as offered: decides whether an eager message fits.
    first: CtsEntry,
}

/// Receiver-side protocol state of one receive comm.
pub struct RecvState {
    post_seq: u32,
    done_seq: u32,
    reqs: [RecvReq; FIFO_DEPTH],
    /// Eager slots drained (copied or dropped), told to the sender in every row.
    eager_done: u32,
    /// An eager message that arrived before its receive was posted: (slot, header).
    held: Option<(u16, EagerHeader)>,
    /// The clear-to-send row of the latest posted receive.
    row: [CtsEntry; MAX_RECVS],
    row_len: usize,
    /// Rows may offer a host buffer to an eager message (the receiver has bounce slots).
    eager: bool,
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
            row: [CtsEntry::default(); MAX_RECVS],
            row_len: 0,
            eager: true,
        }
    }

    /// A receiver without bounce slots: no row ever offers to take an eager message.
    pub fn without_eager(mut self) -> Self {
        self.eager = false;
        self
    }

    /// The clear-to-send row of the receive [`Self::post`] accepted last.
    pub fn row(&self) -> &[CtsEntry] {
        &self.row[..self.row_len]
    }

    /// Eager slots drained so far.
    pub fn eager_done(&self) -> u32 {
        self.eager_done
    }

    /// Receives posted whose immediate has not arrived.
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
        let flags = if self.eager && n == 1 && bufs[0].host {
            CTS_EAGER_OK
        } else {
            0
        };
        // The row is built where it stays (no copies of a whole row per receive).
        let req = &mut self.reqs[r];
        req.state = ReqState::Posted;
        req.seq = seq;
        req.n = n;
        // `sizes[..n]` is written when the data arrives; nothing reads past `n`.
        for (i, b) in bufs.iter().enumerate() {
            self.row[i] = CtsEntry {
                addr: b.addr,
                size: b.size,
                rkey: b.rkey,
                tag: b.tag,
                nreqs: n as u16,
                flags,
                stamp: stamp(seq),
                check: 0,
                eager_done: 0,
            };
            req.capacity[i] = b.size;
        }
        req.first = self.row[0];
        let mut eager = EagerAction::None;
        if let Some((slot, hdr)) = self.held.take() {
            // Everything before this receive has arrived, so the held message is for it.
            debug_assert_eq!(hdr.seq, seq);
            self.eager_done = self.eager_done.wrapping_add(1);
            eager = if eager_fits(&req.first, hdr.tag, u64::from(hdr.size)) {
                req.state = ReqState::Done;
                req.sizes[0] = u64::from(hdr.size);
                self.done_seq = seq.wrapping_add(1);
                EagerAction::Copy {
                    slot,
                    dst: req.first.addr,
                    len: u64::from(hdr.size),
                }
            } else {
                EagerAction::Drop { slot }
            };
        }
        for e in &mut self.row[..n] {
            e.eager_done = self.eager_done;
            e.check = e.compute_check();
        }
        self.row_len = n;
        self.post_seq = seq.wrapping_add(1);
        Ok(RecvPost::Posted {
            req: r as u16,
            seq,
            n,
            eager,
        })
    }

    /// An eager message arrived in bounce slot `slot` with header `hdr` (read after its
    /// completion, so every byte is in place).
    pub fn on_eager(&mut self, slot: u16, hdr: EagerHeader) -> Result<EagerAction, ProtoError> {
        if !hdr.is_intact() {
            return Err(ProtoError::Protocol(format!(
                "eager slot {slot} holds a damaged header {hdr:?}"
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
        if self.post_seq == self.done_seq {
            self.held = Some((slot, hdr));
            return Ok(EagerAction::Hold);
        }
        let r = row_of(self.done_seq);
        let req = &mut self.reqs[r];
        if req.state != ReqState::Posted || req.seq != hdr.seq {
            return Err(ProtoError::Protocol(format!(
                "eager message for receive #{} which is not waiting for data",
                hdr.seq
            )));
        }
        self.eager_done = self.eager_done.wrapping_add(1);
        let size = u64::from(hdr.size);
        if !eager_fits(&req.first, hdr.tag, size) {
            return Ok(EagerAction::Drop { slot });
        }
        req.sizes[0] = size;
        req.state = ReqState::Done;
        self.done_seq = self.done_seq.wrapping_add(1);
        Ok(EagerAction::Copy {
            slot,
            dst: req.first.addr,
            len: size,
        })
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
        match imm {
            IMM_TRUNCATED => req.state = ReqState::Failed,
            IMM_SIZES_IN_ARRAY => {
                let sizes = sizes_row();
                for (i, (size, cap)) in sizes.iter().zip(&req.capacity).take(req.n).enumerate() {
                    if size > cap {
                        return Err(ProtoError::Protocol(format!(
                            "peer reports {size} bytes written into receive buffer {i} of {cap} bytes"
                        )));
                    }
                }
                req.sizes[..req.n].copy_from_slice(&sizes[..req.n]);
                req.state = ReqState::Done;
            }
            size => {
                let size = u64::from(size);
                if req.n != 1 || size > IMM_MAX_SIZE || size > req.capacity[0] {
                    return Err(ProtoError::Protocol(format!(
                        "immediate size {size} does not fit receive #{seq} ({} buffers, first holds {})",
                        req.n, req.capacity[0]
                    )));
                }
                req.sizes[0] = size;
                req.state = ReqState::Done;
            }
        }
        self.done_seq = seq.wrapping_add(1);
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
