//! The clear-to-send protocol, with no I/O, no verbs and no clock.
//!
//! The receiver drives every transfer. `irecv` turns into a row of [`CtsEntry`] that the receiver
//! RDMA-writes into the sender's FIFO (row `seq % FIFO_DEPTH`). The sender's `isend` matches the
//! row in posting order (the tag picks the entry inside a multi-receive row), and once every entry
//! of the row has its send, the row is transmitted: RDMA WRITEs of the data, for multi-receives a
//! WRITE of the sizes into the receiver's sizes array, and a final WRITE_WITH_IMM whose immediate
//! says how to read the sizes. Completions arrive in order on an RC queue pair, so both sides can
//! account them against their rows without any extra sequence numbers on the wire.
//!
//! Small messages have a second way in, the eager path. When a send finds no row for it yet, it
//! may write header and data straight into a pre-registered bounce slot of the receiver (one
//! WRITE_WITH_IMM, no round trip). The row is still written by the receiver when it posts the
//! receive, and both sides then apply the same rule ([`eager_fits`]) to that row: either the
//! receiver copies the slot into the posted buffer and the send is done, or both drop the slot
//! and the send goes the ordinary way, against that row, from the caller's still-valid buffer.
//! At most one row is sent eagerly ahead of its clear-to-send, so a refused row never reorders
//! later sends; the rows also carry how many slots the receiver has drained (the sender's credit).
//!
//! [`SendState`] and [`RecvState`] are fed events ("posted", "row seen", "completion") and answer
//! with what to put on the wire. The verbs layer in `net` only executes those answers.

mod recv;
mod send;

pub use recv::{EagerAction, RecvBuf, RecvPost, RecvState};
pub use send::{EagerSend, Resolved, SendMsg, SendPost, SendState, Transmit, WireOp};

use bytemuck::{Pod, Zeroable};
use std::fmt;

/// Rows in the clear-to-send FIFO: one per outstanding receive request (`NCCL_NET_MAX_REQUESTS`).
pub const FIFO_DEPTH: usize = 32;
/// Receives per multi-receive request (`maxRecvs` in the properties).
pub const MAX_RECVS: usize = 8;

/// Immediate value: the size is not in the immediate; read the sizes array row.
pub const IMM_SIZES_IN_ARRAY: u32 = 0x8000_0000;
/// Immediate value: the sender's message did not fit the posted receive; nothing was written.
pub const IMM_TRUNCATED: u32 = 0xFFFF_FFFF;
/// Largest size carried directly in the immediate of a single receive.
pub const IMM_MAX_SIZE: u64 = 0x3FFF_FFFF;
/// Immediate values `IMM_EAGER | slot`: an eager message landed in bounce slot `slot`.
pub const IMM_EAGER: u32 = 0x4000_0000;
/// Bits of an eager immediate that hold the slot.
pub const IMM_EAGER_SLOT_MASK: u32 = 0xFFFF;

/// `CtsEntry::flags`: the receive is one buffer in host memory, so an eager message that fits
/// is copied into it by the receiver's CPU.
pub const CTS_EAGER_OK: u16 = 1;

/// Whether the eager message (`tag`, `size`) is taken by the posted receive whose first entry is
/// `e`. Sender and receiver both decide with this, from the same row, so they always agree.
pub fn eager_fits(e: &CtsEntry, tag: i32, size: u64) -> bool {
    e.nreqs == 1 && e.flags & CTS_EAGER_OK != 0 && e.tag == tag && size <= e.size
}

/// What the sender writes in front of the data in a bounce slot. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EagerHeader {
    /// The receive (row sequence number) this message is meant for.
    pub seq: u32,
    pub tag: i32,
    pub size: u32,
    /// [`EagerHeader::compute_check`].
    pub check: u32,
}

impl EagerHeader {
    pub fn new(seq: u32, tag: i32, size: u32) -> Self {
        let mut h = EagerHeader {
            seq,
            tag,
            size,
            check: 0,
        };
        h.check = h.compute_check();
        h
    }

    pub fn compute_check(&self) -> u32 {
        mix(&[self.seq, self.tag as u32, self.size, 0x4541_4752])
    }

    pub fn is_intact(&self) -> bool {
        self.check == self.compute_check()
    }
}

/// Bytes of [`EagerHeader`] at the start of every bounce slot.
pub const EAGER_HEADER_BYTES: usize = std::mem::size_of::<EagerHeader>();

/// A 32-bit mix of `words` (FNV-1a over the bytes, then a final avalanche).
fn mix(words: &[u32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for w in words {
        for b in w.to_le_bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^ (h >> 15)
}

/// One receive buffer offered to the sender. 40 bytes, written by the receiver into the sender's
/// FIFO memory with RDMA WRITE, so its layout is part of the wire format.
///
/// Nothing orders the bytes of one RDMA WRITE as they land (Soft-RoCE places them with `memcpy`,
/// a NIC by PCIe transactions), so the sender may see the new `stamp` next to stale fields.
/// `check` covers every other field: an entry counts only when both the stamp and the check match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtsEntry {
    /// Remote address of the receive buffer.
    pub addr: u64,
    /// Capacity of the receive buffer in bytes.
    pub size: u64,
    /// Remote key of the receive buffer's registration.
    pub rkey: u32,
    /// Tag the matching send must carry.
    pub tag: i32,
    /// Entries in this row (1 ..= MAX_RECVS); equal in every entry of a row.
    pub nreqs: u16,
    /// [`CTS_EAGER_OK`] or 0.
    pub flags: u16,
    /// `stamp(seq)` of the request: tells a fresh row from stale memory.
    pub stamp: u32,
    /// [`CtsEntry::compute_check`] of the other fields.
    pub check: u32,
    /// Eager bounce slots the receiver had drained when it wrote this row (wrapping count).
    pub eager_done: u32,
}

impl CtsEntry {
    /// A 32-bit mix of every field but `check`.
    pub fn compute_check(&self) -> u32 {
        mix(&[
            self.addr as u32,
            (self.addr >> 32) as u32,
            self.size as u32,
            (self.size >> 32) as u32,
            self.rkey,
            self.tag as u32,
            u32::from(self.nreqs) | u32::from(self.flags) << 16,
            self.stamp,
            self.eager_done,
        ])
    }

    /// The entry with its check filled in.
    pub fn sealed(mut self) -> Self {
        self.check = self.compute_check();
        self
    }

    /// Whether every field belongs to the same write.
    pub fn is_intact(&self) -> bool {
        self.check == self.compute_check()
    }
}

/// Bytes of one FIFO row in memory.
pub const CTS_ROW_BYTES: usize = MAX_RECVS * std::mem::size_of::<CtsEntry>();
/// Bytes of one row of the receiver's sizes array.
pub const SIZES_ROW_BYTES: usize = MAX_RECVS * std::mem::size_of::<u64>();

/// The value written into [`CtsEntry::stamp`] for request `seq`. Never zero for the first
/// 2^32 - 1 requests, so zeroed FIFO memory is never mistaken for a posted row.
pub fn stamp(seq: u32) -> u32 {
    seq.wrapping_add(1)
}

/// FIFO row used by request `seq`.
pub fn row_of(seq: u32) -> usize {
    seq as usize % FIFO_DEPTH
}

/// Why the protocol refused an event. The `net` layer adds the device, peer and QP context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A send matched a receive buffer smaller than the message.
    Truncated { size: u64, capacity: u64 },
    /// The peer's message did not fit a buffer we posted (reported by the sender).
    TruncatedByPeer { seq: u32 },
    /// No entry of the posted receive row carries this send's tag.
    TagMismatch { tag: i32, posted: Vec<i32> },
    /// Malformed input from the caller (e.g. `n` out of range, a request not in flight).
    InvalidUsage(String),
    /// The peer wrote something that cannot come from a well-behaved peer.
    Protocol(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Truncated { size, capacity } => write!(
                f,
                "send of {size} bytes is larger than the posted receive buffer of {capacity} bytes"
            ),
            ProtoError::TruncatedByPeer { seq } => write!(
                f,
                "the peer's message for receive #{seq} was larger than the posted buffer (nothing was written)"
            ),
            ProtoError::TagMismatch { tag, posted } => write!(
                f,
                "send with tag {tag} matches none of the posted receive tags {posted:?}"
            ),
            ProtoError::InvalidUsage(s) => write!(f, "invalid usage: {s}"),
            ProtoError::Protocol(s) => write!(f, "protocol violation by peer: {s}"),
        }
    }
}

impl std::error::Error for ProtoError {}

#[cfg(test)]
mod model_tests;
