//! The sending end of a connection as one state machine: matching ([`SendState`]), the work
//! requests of each row on the connection's queue pairs, their completion accounting, and the
//! multi-QP rule that a row's immediate goes out only after its data has landed.

use super::counters::Counters;
use super::post::{OnWire, Post, PostOp, PostSink};
use super::send::{
    EagerSend, Fifo, Resolved, RowOf, SendMsg, SendPost, SendState, Transmit, WireOp,
};
use super::wire::{row_of, CtsEntry, WrId, FIFO_DEPTH, MAX_QPS, MAX_RECVS};
use super::ProtoError;
use std::collections::VecDeque;

/// Rows carrying at least this many bytes are spread over the connection's queue pairs; smaller
/// ones gain nothing from it and would pay the wait for the data before the immediate.
pub const SPREAD_MIN_BYTES: u64 = 64 << 10;

/// How a send comm is set up.
#[derive(Clone, Copy, Debug)]
pub struct SendConfig {
    /// Largest single RDMA WRITE.
    pub max_msg: u64,
    /// Work requests each send queue holds.
    pub sq_depth: u32,
    /// Queue pairs of the connection (1 ..= [`MAX_QPS`]).
    pub qps: usize,
    /// Split each spread message over all queue pairs (else whole rows on them in turn).
    pub split: bool,
    /// Rows of at least this many payload bytes are spread (when `qps` > 1).
    pub spread_min: u64,
    /// The receiver's bounce slots (0: no eager path) and the largest eager message.
    pub eager_slots: u16,
    pub eager_max: u32,
}

/// A transmit whose immediate (and sizes) must wait: its data is still landing on other queue
/// pairs, or an earlier such transmit is still waiting.
#[derive(Clone, Copy, Debug)]
struct Deferred {
    t: Transmit,
    /// Data queue pairs whose last write of this row has not completed.
    acks_left: u32,
    /// The `Write`s are already posted (else the whole transmit waits).
    data_posted: bool,
}

/// Sender-side protocol of one send comm.
pub struct Sender {
    state: SendState,
    qps: usize,
    split: bool,
    rr_next: usize,
    /// Transmits waiting for their immediate, in row order (capacity FIFO_DEPTH: no allocation).
    deferred: VecDeque<Deferred>,
    /// A data queue pair reported landed data since the last [`Self::progress`].
    landed: bool,
    /// What happened so far (see [`Self::counters`]).
    counters: Counters,
}

impl Sender {
    pub fn new(cfg: SendConfig) -> Self {
        let mut state =
            SendState::new(cfg.max_msg, cfg.sq_depth).with_eager(cfg.eager_slots, cfg.eager_max);
        let qps = cfg.qps.clamp(1, MAX_QPS);
        if qps > 1 {
            let parts = if cfg.split { qps as u32 } else { 1 };
            state = state.with_qps(parts, cfg.spread_min);
        }
        Sender {
            state,
            qps,
            split: cfg.split,
            rr_next: 0,
            deferred: VecDeque::with_capacity(FIFO_DEPTH),
            landed: false,
            counters: Counters::default(),
        }
    }

    /// What this end did so far: messages, bytes, work requests, completions, eager sends.
    pub fn counters(&self) -> Counters {
        Counters {
            cts_waits: self.state.cts_waits(),
            ..self.counters
        }
    }

    /// Sequence number of the row the next send matches.
    pub fn seq(&self) -> u32 {
        self.state.seq()
    }

    /// `isend`: `fifo(row, i)` reads entry `i` of FIFO row `row` as the NIC left it. `Ok(None)`: not yet (the
    /// receiver has not offered a buffer, or the send queue is full); call again later.
    pub fn isend(
        &mut self,
        fifo: impl Fn(usize, usize) -> CtsEntry,
        msg: SendMsg,
        out: &mut impl PostSink,
    ) -> Result<Option<u16>, ProtoError> {
        if self.waits_for_cts(&fifo, msg.size) {
            return Ok(None);
        }
        self.isend_from(fifo, msg, out)
    }

    /// Whether an `isend` of `size` bytes can only return `None` now: the receiver has not
    /// offered the current row yet and the message cannot go eagerly. Cheap (one load from the
    /// FIFO); the caller returns a NULL request without posting anything. `false`: call
    /// [`Self::isend_from`].
    #[inline]
    pub fn waits_for_cts(&mut self, fifo: &impl Fifo, size: u64) -> bool {
        let row = self.state.current_row();
        self.state.waits_for_row(&RowOf { fifo, row }, size)
    }

    /// [`Self::isend`] from any [`Fifo`] (a reader of NIC memory peeks at a row's stamp alone).
    pub fn isend_from(
        &mut self,
        fifo: impl Fifo,
        msg: SendMsg,
        out: &mut impl PostSink,
    ) -> Result<Option<u16>, ProtoError> {
        if self.state.unconfirmed() {
            self.resolve_eager(&fifo)?;
        }
        if self.state.has_carried() {
            self.place_carried(&fifo)?;
        }
        let r = self.state.current_row();
        match self.state.post(
            &RowOf {
                fifo: &fifo,
                row: r,
            },
            msg,
        )? {
            SendPost::NotReady => Ok(None),
            SendPost::Posted { req, transmit } => {
                if let Some(t) = transmit {
                    self.transmit(&t, out);
                }
                Ok(Some(req))
            }
            SendPost::Eager { req, send } => {
                self.post_eager(&send, out);
                Ok(Some(req))
            }
        }
    }

    /// `isend` of the common case in one step, for a caller that posts without a sink: the
    /// current row has arrived in `fifo` with one entry for `msg`, and no earlier transmit waits
    /// for its data, so the message goes out as the row's only work request. Returns the request
    /// and that work request (signaled, on QP 0), counted; `Ok(None)`, with nothing changed,
    /// otherwise: call [`Self::isend_from`].
    #[inline]
    pub fn isend_one(
        &mut self,
        fifo: &impl Fifo,
        msg: SendMsg,
    ) -> Result<Option<(u16, Post<'static>)>, ProtoError> {
        if !self.deferred.is_empty() {
            // Immediates go out in row order: this one would wait behind a deferred one.
            return Ok(None);
        }
        let row = self.state.current_row();
        let Some((req, seq, op)) = self.state.post_one(&RowOf { fifo, row }, msg)? else {
            return Ok(None);
        };
        let Some(data) = data_op(&op) else {
            return Err(ProtoError::InvalidUsage(format!(
                "row {seq}'s single work request writes no data: {op:?}"
            )));
        };
        self.counters.wrs += 1;
        Ok(Some((
            req,
            Post {
                qp: 0,
                wr_id: WrId::Transmit(seq).encode(),
                signaled: true,
                op: data,
            },
        )))
    }

    /// A successful completion on any of the connection's queue pairs.
    #[inline]
    pub fn on_completion(&mut self, wr_id: u64) -> Result<(), ProtoError> {
        if let Some(seq) = WrId::transmit_seq(wr_id) {
            self.counters.cqe_transmit += 1;
            return self.state.on_completion(seq);
        }
        match WrId::decode(wr_id) {
            Some(WrId::Transmit(seq)) => {
                self.counters.cqe_transmit += 1;
                self.state.on_completion(seq)
            }
            Some(WrId::Eager(seq)) => {
                self.counters.cqe_eager += 1;
                self.state.on_eager_completion(seq)
            }
            Some(WrId::DataLanded(seq)) => {
                self.counters.cqe_landed += 1;
                let d = self
                    .deferred
                    .iter_mut()
                    .find(|d| d.t.seq == seq && d.acks_left > 0)
                    .ok_or_else(|| {
                        ProtoError::Protocol(format!(
                            "data completion for row {seq}, which waits for none"
                        ))
                    })?;
                d.acks_left -= 1;
                self.landed = true;
                Ok(())
            }
            _ => Err(ProtoError::Protocol(format!(
                "completion of work request {wr_id:#x}, which no send posted"
            ))),
        }
    }

    /// Whether [`Self::progress`] has anything to do: landed data whose immediates may go out,
    /// an eager row waiting for its clear-to-send, or a carried eager message waiting for its row.
    pub fn wants_progress(&self) -> bool {
        self.landed || self.state.unconfirmed() || self.state.has_carried()
    }

    /// After a batch of completions: posts the immediates whose data has landed and settles an
    /// eager row whose clear-to-send has arrived.
    pub fn progress(
        &mut self,
        fifo: impl Fn(usize, usize) -> CtsEntry,
        out: &mut impl PostSink,
    ) -> Result<(), ProtoError> {
        self.progress_from(fifo, out)
    }

    /// [`Self::progress`] from any [`Fifo`].
    pub fn progress_from(
        &mut self,
        fifo: impl Fifo,
        out: &mut impl PostSink,
    ) -> Result<(), ProtoError> {
        if std::mem::take(&mut self.landed) {
            self.flush_deferred(out);
        }
        if self.state.unconfirmed() {
            self.resolve_eager(&fifo)?;
        }
        if self.state.has_carried() {
            self.place_carried(&fifo)?;
        }
        Ok(())
    }

    /// The requests a completion of `wr_id` may finish: `reqs[..n]` (n = 0 for none).
    pub fn reqs_completed_by(&self, wr_id: u64) -> ([u16; MAX_RECVS], usize) {
        let mut reqs = [0; MAX_RECVS];
        match WrId::decode(wr_id) {
            Some(WrId::Transmit(seq)) => self.state.reqs_of_row(row_of(seq)),
            Some(WrId::Eager(seq)) => {
                reqs[0] = SendState::eager_req(row_of(seq));
                (reqs, 1)
            }
            _ => (reqs, 0),
        }
    }

    /// Collect request `req`: `None` while in progress, the size sent once done.
    #[inline]
    pub fn test(&mut self, req: u16) -> Result<Option<u64>, ProtoError> {
        let r = self.state.test(req);
        if let Ok(Some(size)) = r {
            self.counters.msgs += 1;
            self.counters.bytes += size;
        }
        r
    }

    /// Work requests posted and not yet known complete.
    pub fn sq_used(&self) -> u32 {
        self.state.sq_used()
    }

    /// Settles the eager row once the receiver's clear-to-send for it has landed.
    fn resolve_eager(&mut self, fifo: &impl Fifo) -> Result<(), ProtoError> {
        let r = self.state.current_row();
        match self.state.resolve(&RowOf { fifo, row: r })? {
            Resolved::Nothing => {}
            Resolved::Accepted => self.counters.eager_accepted += 1,
            Resolved::Carried => self.counters.eager_carried += 1,
        }
        Ok(())
    }

    /// Hands a carried eager message to the current row once it has an entry for it.
    fn place_carried(&mut self, fifo: &impl Fifo) -> Result<(), ProtoError> {
        let r = self.state.current_row();
        self.state.place_carried(&RowOf { fifo, row: r })?;
        if !self.state.has_carried() {
            self.counters.eager_accepted += 1;
        }
        Ok(())
    }

    /// An eager message, its send already reported done, was too large for its receive's
    /// buffer (that receive fails): (size, capacity), once.
    pub fn take_late_truncation(&mut self) -> Option<(u64, u64)> {
        self.state.take_late_truncation()
    }

    /// One signaled WRITE_WITH_IMM of header + data into the receiver's bounce slot.
    fn post_eager(&mut self, e: &EagerSend, out: &mut impl PostSink) {
        self.counters.eager_sent += 1;
        let mut reqs = [0; MAX_RECVS];
        reqs[0] = SendState::eager_req(row_of(e.seq));
        out.on_wire(&OnWire {
            seq: e.seq,
            reqs,
            nreqs: 1,
            qp: 0,
            eager: true,
        });
        self.put(
            out,
            &Post {
                qp: 0,
                wr_id: WrId::Eager(e.seq).encode(),
                signaled: true,
                op: PostOp::Eager {
                    slot: e.slot,
                    header: e.header(),
                    bare: e.bare(),
                    local_addr: e.msg.addr,
                    lkey: e.msg.lkey,
                    len: e.msg.size as u32,
                    host: e.msg.host,
                    imm: e.imm(),
                },
            },
        );
    }

    /// Puts a transmit on the wire: all on QP 0, or its data spread over the QPs and the rest
    /// deferred until that data has landed. Immediates always go out in row order.
    fn transmit(&mut self, t: &Transmit, out: &mut impl PostSink) {
        if !t.spread() {
            if self.deferred.is_empty() {
                self.post_on_qp0(t, false, out);
                return;
            }
            self.deferred.push_back(Deferred {
                t: *t,
                acks_left: 0,
                data_posted: false,
            });
        } else {
            let acks_left = self.post_spread_data(t, out);
            self.deferred.push_back(Deferred {
                t: *t,
                acks_left,
                data_posted: true,
            });
        }
        self.flush_deferred(out);
    }

    /// Posts the `Write`s of a spread transmit over the QPs; the last one on each data QP (not
    /// QP 0, which stays ordered with the immediate) is signaled. Returns how many were.
    fn post_spread_data(&mut self, t: &Transmit, out: &mut impl PostSink) -> u32 {
        let n = self.qps;
        let row_qp = self.rr_next % n;
        self.rr_next = self.rr_next.wrapping_add(1);
        let split = self.split;
        let qp_of = |k: usize| if split { k % n } else { row_qp };
        let is_write = |op: &WireOp| matches!(op, WireOp::Write { .. });
        let mut last = [usize::MAX; MAX_QPS];
        for (k, _) in self.state.ops(t).filter(is_write).enumerate() {
            last[qp_of(k)] = k;
        }
        out.on_wire(&on_wire(&self.state, t, qp_of(0)));
        for (k, op) in self.state.ops(t).filter(is_write).enumerate() {
            let q = qp_of(k);
            let signaled = q != 0 && last[q] == k;
            self.counters.wrs += 1;
            out.post(&Post {
                qp: q,
                wr_id: if signaled {
                    WrId::DataLanded(t.seq)
                } else {
                    WrId::Untracked
                }
                .encode(),
                signaled,
                op: post_op(&op),
            });
        }
        (1..n).filter(|&q| last[q] != usize::MAX).count() as u32
    }

    /// Posts the deferred transmits whose data has landed, oldest first.
    fn flush_deferred(&mut self, out: &mut impl PostSink) {
        while let Some(d) = self.deferred.front().copied() {
            if d.acks_left > 0 {
                break;
            }
            self.deferred.pop_front();
            self.post_on_qp0(&d.t, d.data_posted, out);
        }
        // An eager message must not overtake an immediate that waits for its data.
        self.state.set_eager_allowed(self.deferred.is_empty());
    }

    /// Posts the work requests of `t` on QP 0 (without its `Write`s when `skip_writes`); the
    /// last one is signaled and accounts for the whole row.
    fn post_on_qp0(&mut self, t: &Transmit, skip_writes: bool, out: &mut impl PostSink) {
        if !skip_writes {
            out.on_wire(&on_wire(&self.state, t, 0));
        }
        if let Some(op) = self.state.single_op(t) {
            self.put(
                out,
                &Post {
                    qp: 0,
                    wr_id: WrId::Transmit(t.seq).encode(),
                    signaled: true,
                    op: post_op(&op),
                },
            );
            return;
        }
        let mut ops = self
            .state
            .ops(t)
            .filter(|op| !skip_writes || !matches!(op, WireOp::Write { .. }))
            .peekable();
        while let Some(op) = ops.next() {
            let last = ops.peek().is_none();
            self.counters.wrs += 1;
            out.post(&Post {
                qp: 0,
                wr_id: if last {
                    WrId::Transmit(t.seq)
                } else {
                    WrId::Untracked
                }
                .encode(),
                signaled: last,
                op: post_op(&op),
            });
        }
    }
}

impl Sender {
    /// Posts `p`, counted.
    fn put(&mut self, out: &mut impl PostSink, p: &Post<'_>) {
        self.counters.wrs += 1;
        out.post(p);
    }
}

/// What the posts of `t` carry, the first of them on `qp`.
fn on_wire(state: &SendState, t: &Transmit, qp: usize) -> OnWire {
    let (reqs, n) = state.reqs_of(t);
    OnWire {
        seq: t.seq,
        reqs,
        nreqs: n as u16,
        qp,
        eager: false,
    }
}

fn post_op(op: &WireOp) -> PostOp<'_> {
    match op {
        WireOp::WriteSizes { row, sizes, n } => PostOp::Sizes {
            row: *row,
            sizes: &sizes[..*n],
        },
        data => data_op(data).expect("every other work request writes data"),
    }
}

/// The post of a `Write` or `WriteImm` (`None` for `WriteSizes`, whose post borrows its sizes).
fn data_op(op: &WireOp) -> Option<PostOp<'static>> {
    let (local_addr, lkey, remote_addr, rkey, len, host, imm) = match *op {
        WireOp::Write {
            local_addr,
            lkey,
            remote_addr,
            rkey,
            len,
            host,
        } => (local_addr, lkey, remote_addr, rkey, len, host, None),
        WireOp::WriteImm {
            local_addr,
            lkey,
            remote_addr,
            rkey,
            len,
            imm,
            host,
        } => (local_addr, lkey, remote_addr, rkey, len, host, Some(imm)),
        WireOp::WriteSizes { .. } => return None,
    };
    Some(PostOp::Data {
        local_addr,
        lkey,
        len,
        host,
        remote_addr,
        rkey,
        imm,
    })
}
