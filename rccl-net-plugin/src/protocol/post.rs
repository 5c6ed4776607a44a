//! Work requests as the protocol core hands them to the verbs layer, which only translates them
//! (addresses of its own buffers, inline or staged) and posts them in the order given.

use super::wire::{CtsEntry, EagerHeader, MAX_RECVS};

/// One work request for queue pair `qp` of the connection (0 carries everything but spread data).
/// Small by design: rows and sizes are borrowed from the core for the duration of the `post`
/// call (the sink copies what it needs), so nothing large is copied per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Post<'a> {
    pub qp: usize,
    /// [`super::WrId`], encoded.
    pub wr_id: u64,
    /// Ask for a completion. Unsignaled work requests keep their send-queue slot until a later
    /// signaled one on the same queue pair completes; the core accounts for that.
    pub signaled: bool,
    pub op: PostOp<'a>,
}

/// What a [`Post`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostOp<'a> {
    /// RDMA WRITE (WRITE_WITH_IMM when `imm` is set) of `len` bytes of the caller's registered
    /// memory (`len` 0: no local buffer is read).
    Data {
        local_addr: u64,
        lkey: u32,
        len: u32,
        /// The local bytes are CPU-readable host memory (they may go inline).
        host: bool,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
    },
    /// RDMA WRITE of `sizes` (at most `MAX_RECVS`) into row `row` of the receiver's sizes array.
    Sizes { row: usize, sizes: &'a [u64] },
    /// RDMA WRITE_WITH_IMM `imm` of `header` followed by `len` bytes of the caller's memory
    /// into bounce slot `slot` of the receiver (`bare`: the bytes alone, into the slot's payload;
    /// the immediate describes them).
    Eager {
        slot: u16,
        header: EagerHeader,
        bare: bool,
        local_addr: u64,
        lkey: u32,
        len: u32,
        host: bool,
        imm: u32,
    },
    /// RDMA WRITE of `entries` (at most `MAX_RECVS`) into row `row` of the sender's FIFO.
    Cts { row: usize, entries: &'a [CtsEntry] },
}

/// The sender tells its sink which requests the work requests it is about to post carry: once
/// per row and transmission (an eager write, or a row's data), before the first of them. For
/// tracing (the profiler's per-request events); the protocol needs no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnWire {
    /// The row; its completion is `WrId::Eager(seq)` for an eager write, else `WrId::Transmit(seq)`.
    pub seq: u32,
    /// The send comm's requests carried: `reqs[..nreqs]`.
    pub reqs: [u16; MAX_RECVS],
    pub nreqs: u16,
    /// Queue pair of the first work request.
    pub qp: usize,
    pub eager: bool,
}

/// Where the core puts its work requests. Posting is in call order; a failure is the sink's to
/// record (the comm is failed by the caller once the core returns).
pub trait PostSink {
    fn post(&mut self, p: &Post<'_>);
    /// The posts that follow carry the requests in `w` (the default ignores it).
    fn on_wire(&mut self, _w: &OnWire) {}
}

/// The receiver's sink: it also copies eager messages out of their bounce slots. The core calls
/// this before the clear-to-send row that hands the slot back is posted.
pub trait RecvSink: PostSink {
    /// Copy `len` payload bytes of bounce slot `slot` into host memory at `dst`.
    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64);
    /// Bounce slot `slot` was drained without a copy (its message did not fit its receive).
    fn release_eager(&mut self, _slot: u16) {}
    /// Have the NIC copy `len` payload bytes of bounce slot `slot` to `dst` (GPU memory
    /// registered under `rkey`), and report the copy's completion to
    /// [`super::Receiver::on_eager_dma_done`].
    fn dma_eager(&mut self, slot: u16, dst: u64, rkey: u32, len: u32);
}
