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
//! [`SendState`] and [`RecvState`] are fed events ("posted", "row seen", "completion") and answer
//! with what to put on the wire. The verbs layer in `net` only executes those answers.

mod recv;
mod send;

pub use recv::{RecvBuf, RecvPost, RecvState};
pub use send::{SendMsg, SendPost, SendState, Transmit, WireOp};

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
pub const IMM_MAX_SIZE: u64 = 0x7FFF_FFFF;

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
    pub nreqs: u32,
    /// `stamp(seq)` of the request: tells a fresh row from stale memory.
    pub stamp: u32,
    /// [`CtsEntry::compute_check`] of the other fields.
    pub check: u32,
    pub reserved: u32,
}

impl CtsEntry {
    /// A 32-bit mix of every field but `check` (FNV-1a over the bytes, then a final avalanche).
    pub fn compute_check(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        let words = [
            self.addr as u32,
            (self.addr >> 32) as u32,
            self.size as u32,
            (self.size >> 32) as u32,
            self.rkey,
            self.tag as u32,
            self.nreqs,
            self.stamp,
        ];
        for w in words {
            for b in w.to_le_bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
        }
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^ (h >> 15)
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
