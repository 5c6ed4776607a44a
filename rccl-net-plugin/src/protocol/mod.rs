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
//! may write its data (with a header, unless the immediate can describe it) straight into a
//! pre-registered bounce slot of the receiver: one WRITE_WITH_IMM, no round trip. The send is
//! done once that write has completed: the receiver takes every eager message out of its own
//! slot, needing nothing more from the sender. Its row is still written when the receive is
//! posted, and both sides apply the same rule ([`eager_entry`]) to the rows: the first entry
//! with the message's tag, in the row it was sent ahead of or the first later row that has one,
//! holds it. The receiver copies it there with the CPU (host memory) or has the NIC copy it
//! (GPU memory); the sender sends no data for that entry. A message larger than its entry fails
//! that receive. The rows carry how many slots the receiver has drained (the sender's credit),
//! and a slot copied by the NIC counts only once that copy has completed. At most one eager
//! message is ahead of its row, so later sends never pass it.
//!
//! [`SendState`] and [`RecvState`] are fed events ("posted", "row seen", "completion") and answer
//! with what to put on the wire. The verbs layer in `net` only executes those answers.

mod counters;
mod post;
mod receiver;
mod recv;
mod send;
mod sender;
pub mod wire;

pub use counters::Counters;
pub use post::{OnWire, Post, PostOp, PostSink, RecvSink};
pub use receiver::{Receiver, RecvConfig, RESTOCK_BATCH, RQ_STOCK};
pub use recv::{EagerAction, RecvBuf, RecvPost, RecvState};
pub use send::{
    EagerSend, Fifo, FifoRow, Resolved, RowFn, RowOf, SendMsg, SendPost, SendState, Transmit,
    WireOp, SEND_REQS,
};
pub use sender::{SendConfig, Sender, SPREAD_MIN_BYTES};
pub use wire::*;

use std::fmt;

/// Why the protocol refused an event. The `net` layer adds the device, peer and QP context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A send matched a receive buffer smaller than the message.
    Truncated { size: u64, capacity: u64 },
    /// The peer's message did not fit a buffer we posted (reported by the sender).
    TruncatedByPeer { seq: u32 },
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
            ProtoError::InvalidUsage(s) => write!(f, "invalid usage: {s}"),
            ProtoError::Protocol(s) => write!(f, "protocol violation by peer: {s}"),
        }
    }
}

impl std::error::Error for ProtoError {}

#[cfg(test)]
mod model_tests;
