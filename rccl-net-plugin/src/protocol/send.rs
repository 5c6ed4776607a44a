//! Sender half: matches `isend`s against the rows the receiver wrote into our FIFO.

use super::{
    eager_entry, row_of, stamp, BareEager, CtsEntry, EagerHeader, ProtoError, FIFO_DEPTH,
    IMM_EAGER, IMM_MAX_SIZE, IMM_SIZES_IN_ARRAY, IMM_TRUNCATED, MAX_RECVS,
};

/// The FIFO row the sender looks at, as the NIC left it: entry `i` on demand, so that a row
/// that has not arrived costs one entry's read, or only its stamp's.
pub trait FifoRow {
    fn entry(&self, i: usize) -> CtsEntry;
    /// The `stamp` of entry `i` (readers of NIC memory override it to read nothing else).
    fn stamp(&self, i: usize) -> u32 {
        self.entry(i).stamp
    }
}

/// The sender's whole FIFO as the NIC left it: entry `i` of row `row`. Any
/// `Fn(row, i) -> CtsEntry` is one; a reader of NIC memory implements it directly to make
/// [`Fifo::stamp`] a single load.
pub trait Fifo {
    fn entry(&self, row: usize, i: usize) -> CtsEntry;
    /// The `stamp` of entry `i` of row `row`.
    fn stamp(&self, row: usize, i: usize) -> u32 {
        self.entry(row, i).stamp
    }
}

impl<F: Fn(usize, usize) -> CtsEntry> Fifo for F {
    fn entry(&self, row: usize, i: usize) -> CtsEntry {
        self(row, i)
    }
}

/// Row `row` of a [`Fifo`].
pub struct RowOf<'a, F: Fifo + ?Sized> {
    pub fifo: &'a F,
    pub row: usize,
}

impl<F: Fifo + ?Sized> FifoRow for RowOf<'_, F> {
    fn entry(&self, i: usize) -> CtsEntry {
        self.fifo.entry(self.row, i)
    }
    fn stamp(&self, i: usize) -> u32 {
        self.fifo.stamp(self.row, i)
    }
}

impl FifoRow for [CtsEntry; MAX_RECVS] {
    fn entry(&self, i: usize) -> CtsEntry {
        self[i]
    }
}

/// A reader of entry `i`.
pub struct RowFn<F: Fn(usize) -> CtsEntry>(pub F);

impl<F: Fn(usize) -> CtsEntry> FifoRow for RowFn<F> {
    fn entry(&self, i: usize) -> CtsEntry {
        (self.0)(i)
    }
}

/// One `isend` as the protocol sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendMsg {
    pub addr: u64,
    pub lkey: u32,
    pub size: u64,
    pub tag: i32,
    /// The data is in host memory the CPU may read, so small writes can go inline.
    pub host: bool,
}

/// Send requests of one send comm: [`MAX_RECVS`] per FIFO row (numbered in matching order),
/// then one per row for the row's eager send ([`SendState::eager_req`]).
pub const SEND_REQS: usize = FIFO_DEPTH * MAX_RECVS + FIFO_DEPTH;

/// Outcome of [`SendState::post`]. Returned by value on the hot path: boxing would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum SendPost {
    /// The receiver has not offered a buffer for this send yet (no row, or the current row has
    /// no free entry with its tag: it belongs to a later receive), or resources are busy:
    /// return a NULL request.
    NotReady,
    /// The send is accepted as request `req`. When it completes a row, `transmit` says what to post.
    Posted {
        req: u16,
        transmit: Option<Transmit>,
    },
    /// No row yet, so the send goes eagerly as request `req`: post `send`.
    Eager { req: u16, send: EagerSend },
}

/// One eager write: header plus the message's data into bounce slot `slot` of the receiver, as a
/// single signaled WRITE_WITH_IMM with immediate [`EagerSend::imm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EagerSend {
    pub seq: u32,
    pub slot: u16,
    pub msg: SendMsg,
}

impl EagerSend {
    pub fn header(&self) -> EagerHeader {
        EagerHeader::new(self.seq, self.msg.tag, self.msg.size as u32)
    }

    pub fn imm(&self) -> u32 {
        BareEager::encode(self.slot, self.msg.size, self.msg.tag)
            .unwrap_or(IMM_EAGER | u32::from(self.slot))
    }

    /// The immediate describes the message: no header goes with it ([`BareEager`]).
    pub fn bare(&self) -> bool {
        BareEager::encode(self.slot, self.msg.size, self.msg.tag).is_some()
    }
}

/// Outcome of [`SendState::resolve`] for the row sent eagerly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// No eager row is waiting for its clear-to-send, or the row has not arrived.
    Nothing,
    /// The row has an entry for the eager message, which the receiver takes into it.
    Accepted,
    /// The row has no entry for the message's tag: a later row's first entry with it takes
    /// the message ([`SendState::place_carried`]).
    Carried,
}

/// What to put on the wire for one fully matched row: a small handle; the messages and the
/// receiver's entries stay in the row, which is not reused before the transmit completes
/// ([`SendState::ops`] reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub seq: u32,
    /// Index of the row in [`SendState`].
    row: usize,
    nreqs: usize,
    /// Size of the first message (the immediate carries it for a single receive).
    first_size: u64,
    payload: u64,
    truncated: bool,
    max_msg: u64,
    /// Entries an eager message has filled already (the receiver took it): no data written.
    served: u8,
    /// Spread over several queue pairs: each message in up to `parts` chunks, and the
    /// immediate always in a work request of its own (posted once the data has landed).
    spread: bool,
    parts: u64,
}

/// One work request of a [`Transmit`], in posting order. Only the last one is signaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireOp {
    /// RDMA WRITE of `len` bytes.
    Write {
        local_addr: u64,
        lkey: u32,
        remote_addr: u64,
        rkey: u32,
        len: u32,
        /// The local data is CPU-readable host memory.
        host: bool,
    },
    /// RDMA WRITE of `sizes[..n]` (as u64) into row `row` of the receiver's sizes array.
    WriteSizes {
        row: usize,
        sizes: [u64; MAX_RECVS],
        n: usize,
    },
    /// The final RDMA WRITE_WITH_IMM (`len` may be 0: then no local buffer is read).
    WriteImm {
        local_addr: u64,
        lkey: u32,
        remote_addr: u64,
        rkey: u32,
        len: u32,
        imm: u32,
        /// The local data is CPU-readable host memory (meaningless when `len` is 0).
        host: bool,
    },
}

impl Transmit {
    /// The transmit of row `row` (sequence `seq`) carrying `msgs`, but no data for the entries
    /// in `served`.
    #[inline]
    fn new(
        seq: u32,
        row: usize,
        msgs: &[SendMsg],
        served: u8,
        truncated: bool,
        max_msg: u64,
    ) -> Self {
        let payload = if served == 0 {
            msgs.iter().map(|m| m.size).sum()
        } else {
            (0..msgs.len())
                .filter(|i| served & (1 << i) == 0)
                .map(|i| msgs[i].size)
                .sum()
        };
        Transmit {
            seq,
            row,
            nreqs: msgs.len(),
            first_size: msgs[0].size,
            payload,
            truncated,
            max_msg,
            served,
            spread: false,
            parts: 1,
        }
    }

    /// Sizes go through the sizes array for multi-receives and for sizes the immediate cannot hold.
    fn sizes_in_array(&self) -> bool {
        !self.truncated && (self.nreqs > 1 || self.first_size > IMM_MAX_SIZE)
    }

    /// The immediate of the final WRITE_WITH_IMM.
    pub fn imm(&self) -> u32 {
        if self.truncated {
            IMM_TRUNCATED
        } else if self.sizes_in_array() {
            IMM_SIZES_IN_ARRAY
        } else {
            self.first_size as u32
        }
    }

    /// Whether the last data chunk itself carries the immediate (no separate zero-byte write).
    fn fold_imm_into_data(&self) -> bool {
        !self.spread && !self.truncated && !self.sizes_in_array() && self.first_size > 0
    }

    /// Whether the data goes over several queue pairs (see [`SendState::with_qps`]): the
    /// `Write`s may then be posted on any of them, and the rest only once they have landed.
    pub fn spread(&self) -> bool {
        self.spread
    }

    /// Largest chunk of a message of `size` bytes.
    fn chunk_len(&self, size: u64) -> u64 {
        size.div_ceil(self.parts.max(1)).clamp(1, self.max_msg)
    }

    fn chunks(&self, size: u64) -> u64 {
        if self.parts <= 1 && size <= self.max_msg {
            // The common case, without two 64-bit divisions.
            return u64::from(size > 0);
        }
        size.div_ceil(self.chunk_len(size))
    }

    /// Work requests this transmit of `msgs` posts; the send queue must have room for all.
    #[inline]
    fn wqe_count_of(&self, msgs: &[SendMsg]) -> u32 {
        if self.truncated {
            return 1;
        }
        let data: u64 = (0..msgs.len())
            .filter(|i| self.served & (1 << i) == 0)
            .map(|i| self.chunks(msgs[i].size))
            .sum();
        let sizes = u64::from(self.sizes_in_array());
        let imm = u64::from(!self.fold_imm_into_data());
        (data + sizes + imm) as u32
    }

    /// Requests of the row this transmit carries (numbered from the row's first request).
    pub fn nreqs(&self) -> usize {
        self.nreqs
    }

    /// Bytes of payload this transmit moves.
    pub fn payload_bytes(&self) -> u64 {
        if self.truncated {
            0
        } else {
            self.payload
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Data,
    Sizes,
    Imm,
    End,
}

/// Iterator over the [`WireOp`]s of a [`Transmit`] ([`SendState::ops`]).
pub struct TransmitOps<'a> {
    t: Transmit,
    msgs: &'a [SendMsg; MAX_RECVS],
    entries: &'a [CtsEntry; MAX_RECVS],
    entry: usize,
    offset: u64,
    stage: Stage,
}

impl Iterator for TransmitOps<'_> {
    type Item = WireOp;

    fn next(&mut self) -> Option<WireOp> {
        let t = &self.t;
        loop {
            match self.stage {
                Stage::Data => {
                    if self.entry == t.nreqs {
                        self.stage = if t.sizes_in_array() {
                            Stage::Sizes
                        } else if t.fold_imm_into_data() {
                            Stage::End
                        } else {
                            Stage::Imm
                        };
                        continue;
                    }
                    let msg = &self.msgs[self.entry];
                    let dst = &self.entries[self.entry];
                    if self.offset >= msg.size || t.served & (1 << self.entry) != 0 {
                        self.entry += 1;
                        self.offset = 0;
                        continue;
                    }
                    let len = (msg.size - self.offset).min(t.chunk_len(msg.size));
                    let (local_addr, remote_addr) =
                        (msg.addr + self.offset, dst.addr + self.offset);
                    self.offset += len;
                    let last = self.offset == msg.size;
                    if last && t.fold_imm_into_data() {
                        self.stage = Stage::End;
                        return Some(WireOp::WriteImm {
                            local_addr,
                            lkey: msg.lkey,
                            remote_addr,
                            rkey: dst.rkey,
                            len: len as u32,
                            imm: t.imm(),
                            host: msg.host,
                        });
                    }
                    return Some(WireOp::Write {
                        local_addr,
                        lkey: msg.lkey,
                        remote_addr,
                        rkey: dst.rkey,
                        len: len as u32,
                        host: msg.host,
                    });
                }
                Stage::Sizes => {
                    self.stage = Stage::Imm;
                    let mut sizes = [0u64; MAX_RECVS];
                    for (s, m) in sizes.iter_mut().zip(&self.msgs[..t.nreqs]) {
                        *s = m.size;
                    }
                    return Some(WireOp::WriteSizes {
                        row: row_of(t.seq),
                        sizes,
                        n: t.nreqs,
                    });
                }
                Stage::Imm => {
                    self.stage = Stage::End;
                    return Some(WireOp::WriteImm {
                        local_addr: 0,
                        lkey: 0,
                        remote_addr: self.entries[0].addr,
                        rkey: self.entries[0].rkey,
                        len: 0,
                        imm: t.imm(),
                        host: true,
                    });
                }
                Stage::End => return None,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ReqState {
    #[default]
    Free,
    /// Matched to an entry; the row is not transmitted yet.
    Matched,
    /// Transmitted; waiting for the signaled completion.
    InFlight,
    Done,
    /// The row was truncated: the whole row failed.
    Failed,
    /// Sent eagerly; waiting for the write's completion (the receiver takes the message out
    /// of its slot whatever its row turns out to be).
    Eager,
}

/// A row's eager send, from posting until its row arrives.
#[derive(Clone, Copy, Debug, Default)]
struct EagerOut {
    msg: SendMsg,
}

#[derive(Clone, Copy, Debug, Default)]
struct SendReq {
    state: ReqState,
    /// The row that counts this request as live (see [`Row::live`]).
    row: u8,
    size: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Row {
    /// The row is being matched for the current `seq`.
    matching: bool,
    nreqs: usize,
    matched: u8,
    /// Requests matched to this row (or sent eagerly for it) that the caller has not collected
    /// with `test` yet.
    live: u8,
    /// Request of each matched send, in matching order: `ids[..nids]` (an entry an eager
    /// message filled has none).
    ids: [u16; MAX_RECVS],
    nids: usize,
    /// Entries an eager message filled (bit per entry).
    served: u8,
    wqes: u32,
    truncated: Option<(u64, u64)>,
    entries: [CtsEntry; MAX_RECVS],
    msgs: [SendMsg; MAX_RECVS],
    /// The transmit of row `tx_seq` waits for its signaled completion.
    awaiting: bool,
    tx_seq: u32,
    /// The eager send of this row, until the row arrives.
    eager: Option<EagerOut>,
    /// The eager write of row `eager_seq` waits for its completion.
    eager_wr: bool,
    eager_seq: u32,
}

/// Sender-side protocol state of one send comm.
pub struct SendState {
    seq: u32,
    rows: [Row; FIFO_DEPTH],
    reqs: [SendReq; SEND_REQS],
    /// An eager message whose row had no entry for its tag (its send is done): the first later
    /// row with an entry for the tag takes it ([`Self::place_carried`]).
    carried: Option<SendMsg>,
    /// Eager messages a row showed to be larger than their buffer, after their sends were
    /// reported done (see [`Self::take_late_truncation`]).
    late_truncation: Option<(u64, u64)>,
    max_msg: u64,
    sq_depth: u32,
    sq_used: u32,
    /// Bounce slots at the receiver (0: no eager path) and the largest eager message.
    eager_slots: u32,
    eager_max: u64,
    /// Eager writes posted, and the receiver's count of drained slots from the latest row.
    eager_sent: u32,
    eager_done_seen: u32,
    /// The current row was sent eagerly and its clear-to-send has not been seen.
    unconfirmed: bool,
    /// The caller cannot post an eager write now (see [`Self::set_eager_allowed`]).
    eager_blocked: bool,
    /// Rows of at least `spread_min` payload bytes are spread over queue pairs, each message in
    /// `spread_parts` chunks (0: no spreading).
    spread_min: u64,
    spread_parts: u64,
    /// Posts that found no clear-to-send row for them (see [`Self::cts_waits`]).
    cts_waits: u64,
}

impl SendState {
    /// `max_msg`: largest single RDMA WRITE (the port's max message size); `sq_depth`: work
    /// requests the send queue holds.
    pub fn new(max_msg: u64, sq_depth: u32) -> Self {
        assert!(max_msg > 0 && max_msg <= u64::from(u32::MAX));
        SendState {
            seq: 0,
            rows: [Row::default(); FIFO_DEPTH],
            reqs: [SendReq::default(); SEND_REQS],
            carried: None,
            late_truncation: None,
            max_msg,
            sq_depth,
            sq_used: 0,
            eager_slots: 0,
            eager_max: 0,
            eager_sent: 0,
            eager_done_seen: 0,
            unconfirmed: false,
            eager_blocked: false,
            spread_min: 0,
            spread_parts: 0,
            cts_waits: 0,
        }
    }

    /// Posts so far that found no clear-to-send row for them yet: the receiver had not offered
    /// the buffer (or the eager row ahead still waited for its own).
    pub fn cts_waits(&self) -> u64 {
        self.cts_waits
    }

    /// Spreads rows of at least `min_bytes` over several queue pairs: each message in `parts`
    /// chunks (1: whole messages, for round-robin over queue pairs).
    pub fn with_qps(mut self, parts: u32, min_bytes: u64) -> Self {
        self.spread_parts = u64::from(parts.max(1));
        self.spread_min = min_bytes.max(1);
        self
    }

    /// Whether an eager write may be posted now. The caller blocks it while an earlier row's
    /// immediate waits for its data: an eager message must not overtake it.
    pub fn set_eager_allowed(&mut self, ok: bool) {
        self.eager_blocked = !ok;
    }

    /// Applies the spreading rule to a transmit about to be counted.
    #[inline]
    fn shape(&self, t: &mut Transmit) {
        if self.spread_parts > 0 && !t.truncated && t.payload_bytes() >= self.spread_min {
            t.spread = true;
            t.parts = self.spread_parts;
        }
    }

    /// Enables the eager path: the receiver has `slots` bounce slots of `max` payload bytes.
    pub fn with_eager(mut self, slots: u16, max: u32) -> Self {
        if slots > 0 && max > 0 {
            self.eager_slots = u32::from(slots);
            self.eager_max = u64::from(max);
        }
        self
    }

    /// The current row was sent eagerly and waits for [`Self::resolve`].
    pub fn unconfirmed(&self) -> bool {
        self.unconfirmed
    }

    /// Sequence number of the row the next send matches.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// FIFO row the next send looks at.
    pub fn current_row(&self) -> usize {
        row_of(self.seq)
    }

    /// Checks FIFO row `fifo_row` for request `seq`: `Ok(None)` while it has not fully landed,
    /// else its head entry (which holds the entry count). Reads the head entry first and the
    /// others only once it is there.
    #[inline]
    fn arrived(seq: u32, fifo_row: &impl FifoRow) -> Result<Option<CtsEntry>, ProtoError> {
        let want = stamp(seq);
        if fifo_row.stamp(0) != want {
            // Not written yet: one load.
            return Ok(None);
        }
        let head = fifo_row.entry(0);
        if head.stamp != want || !head.is_intact() {
            // Not written yet, or still landing.
            return Ok(None);
        }
        let nreqs = usize::from(head.nreqs);
        if nreqs == 0 || nreqs > MAX_RECVS {
            return Err(ProtoError::Protocol(format!(
                "receive row {seq} announces {} buffers (1..={MAX_RECVS} allowed)",
                head.nreqs
            )));
        }
        // The row is one RDMA WRITE, but nothing orders its bytes: wait until every entry is stamped.
        for i in 1..nreqs {
            let e = fifo_row.entry(i);
            if e.stamp != want || !e.is_intact() {
                return Ok(None);
            }
            if e.nreqs != head.nreqs {
                return Err(ProtoError::Protocol(format!(
                    "receive row {seq} mixes entry counts {} and {}",
                    head.nreqs, e.nreqs
                )));
            }
            Self::check_span(seq, &e)?;
        }
        Self::check_span(seq, &head)?;
        Ok(Some(head))
    }

    /// Data goes to `addr + offset` for offsets below `size`: a buffer cannot wrap around.
    fn check_span(seq: u32, e: &CtsEntry) -> Result<(), ProtoError> {
        if e.addr.checked_add(e.size).is_none() {
            return Err(ProtoError::Protocol(format!(
                "receive row {seq} offers {} bytes at {:#x}, past the end of the address space",
                e.size, e.addr
            )));
        }
        Ok(())
    }

    /// Starts matching row `r` against the arrived `fifo_row` whose head entry is `head`.
    #[inline]
    fn open_row(&mut self, r: usize, fifo_row: &impl FifoRow, head: CtsEntry) {
        let nreqs = usize::from(head.nreqs);
        self.eager_done_seen = head.eager_done;
        let row = &mut self.rows[r];
        row.matching = true;
        row.nreqs = nreqs;
        row.matched = 0;
        row.nids = 0;
        row.served = 0;
        row.truncated = None;
        // Only the first `nreqs` entries and messages are ever read; the rest keep stale values.
        row.entries[0] = head;
        for i in 1..nreqs {
            row.entries[i] = fifo_row.entry(i);
        }
    }

    /// Post a send against `fifo_row`, a snapshot of FIFO row [`Self::current_row`].
    ///
    /// Sends match receives in the order the receiver posted them: a send takes the first free
    /// entry with its tag in the current row, the oldest row not fully matched yet. A send whose
    /// tag has no free entry there belongs to a later receive, which the receiver may not have
    /// posted yet, so it is answered [`SendPost::NotReady`] (a NULL request, retried by the
    /// caller) as NCCL's IB transport does. A tag therefore never proves that a send can never
    /// match; what fails is what no later receive can change: a send larger than the entry it
    /// matched ([`ProtoError::Truncated`], for its whole row), a row that needs more work requests
    /// than the send queue holds, and rows no well-behaved receiver writes.
    pub fn post(&mut self, fifo_row: &impl FifoRow, msg: SendMsg) -> Result<SendPost, ProtoError> {
        if self.unconfirmed {
            // The eager row must be resolved first; it may still take this send's place.
            self.cts_waits += 1;
            return Ok(SendPost::NotReady);
        }
        if self.carried.is_some() {
            // The carried message was sent first: it takes its entry before this send.
            let seq = self.seq;
            self.place_carried(fifo_row)?;
            if self.seq != seq {
                // It filled the whole row; `fifo_row` shows that row, not the next one.
                return Ok(SendPost::NotReady);
            }
            if self.carried.is_some() && !self.rows[row_of(self.seq)].matching {
                // Only `place_carried` opens a row while a message is carried: the row may land
                // between its look and ours, and then the carried message must see it first.
                self.cts_waits += 1;
                return Ok(SendPost::NotReady);
            }
        }
        let r = row_of(self.seq);
        let row = &self.rows[r];
        if !row.matching {
            if row.live > 0 {
                // The caller still holds requests of this row's previous use.
                return Ok(SendPost::NotReady);
            }
            match Self::arrived(self.seq, fifo_row)? {
                Some(head) => {
                    if let Some((req, transmit)) = self.post_single(r, head, msg) {
                        return Ok(SendPost::Posted {
                            req,
                            transmit: Some(transmit),
                        });
                    }
                    self.open_row(r, fifo_row, head)
                }
                None => {
                    self.cts_waits += 1;
                    return Ok(self.try_eager(r, msg));
                }
            }
        }
        self.match_send(r, msg)
    }

    /// [`Self::post`] of the common case, answered with its one work request: the current row
    /// has arrived in `fifo_row` with a single entry, `msg` carries its tag and fits, and one
    /// WRITE_WITH_IMM carrying the whole message goes out now. Returns the request, the row's
    /// sequence number (its completion is `WrId::Transmit(seq)`) and the write (always a
    /// [`WireOp::WriteImm`]); `Ok(None)`, with nothing changed, for anything else: call
    /// [`Self::post`].
    #[inline]
    pub fn post_one(
        &mut self,
        fifo_row: &impl FifoRow,
        msg: SendMsg,
    ) -> Result<Option<(u16, u32, WireOp)>, ProtoError> {
        if self.unconfirmed || self.carried.is_some() {
            return Ok(None);
        }
        let r = row_of(self.seq);
        let row = &self.rows[r];
        if row.matching || row.live > 0 {
            return Ok(None);
        }
        let Some(head) = Self::arrived(self.seq, fifo_row)? else {
            return Ok(None);
        };
        let Some((req, t)) = self.post_single(r, head, msg) else {
            return Ok(None);
        };
        // The row is committed now: anything but its single write is a broken invariant, reported
        // as an error, never as "nothing changed".
        match self.single_op(&t) {
            Some(op @ WireOp::WriteImm { .. }) => Ok(Some((req, t.seq, op))),
            other => Err(ProtoError::InvalidUsage(format!(
                "row {}'s one-entry transmit is not a single WRITE_WITH_IMM: {other:?}",
                t.seq
            ))),
        }
    }

    /// The common case of [`Self::post`] in one step: row `r` has just arrived with `head` as its
    /// only entry, `msg` carries its tag and fits, and one WRITE_WITH_IMM carrying the whole
    /// message (with its size in the immediate) goes out now. Opens, matches and commits the row
    /// exactly as [`Self::open_row`], [`Self::match_send`] and [`Self::commit`] would, and returns
    /// the request and the transmit; `None` (nothing changed) for anything else, which takes that
    /// general path.
    #[inline]
    fn post_single(&mut self, r: usize, head: CtsEntry, msg: SendMsg) -> Option<(u16, Transmit)> {
        let one_write = msg.size > 0 && msg.size <= self.max_msg && msg.size <= IMM_MAX_SIZE;
        let spread = self.spread_parts > 0 && msg.size >= self.spread_min;
        if head.nreqs != 1
            || head.tag != msg.tag
            || msg.size > head.size
            || !one_write
            || spread
            || self.sq_used >= self.sq_depth
        {
            return None;
        }
        let seq = self.seq;
        let req = (r * MAX_RECVS) as u16;
        self.eager_done_seen = head.eager_done;
        let row = &mut self.rows[r];
        row.matching = false;
        row.nreqs = 1;
        row.matched = 1;
        row.nids = 1;
        row.served = 0;
        row.truncated = None;
        row.entries[0] = head;
        row.msgs[0] = msg;
        row.live += 1;
        row.ids[0] = req;
        row.wqes = 1;
        row.awaiting = true;
        row.tx_seq = seq;
        self.sq_used += 1;
        self.reqs[usize::from(req)] = SendReq {
            state: ReqState::InFlight,
            row: r as u8,
            size: msg.size,
        };
        self.seq = seq.wrapping_add(1);
        let transmit = Transmit::new(seq, r, &[msg], 0, false, self.max_msg);
        debug_assert_eq!(transmit.wqe_count_of(&[msg]), 1);
        Some((req, transmit))
    }

    /// Whether a post of a `size`-byte message could only answer [`SendPost::NotReady`] now,
    /// because the current row has not arrived in `fifo_row` (a snapshot of
    /// [`Self::current_row`]) and the message cannot go eagerly; counted as a clear-to-send wait.
    /// A few compares and one look at the row's stamp: the call a sender makes while it waits
    /// for the receiver. `false` says nothing: [`Self::post`] decides.
    #[inline]
    pub fn waits_for_row(&mut self, fifo_row: &impl FifoRow, size: u64) -> bool {
        if self.unconfirmed || self.carried.is_some() {
            return false;
        }
        if self.eager_slots > 0 && size <= self.eager_max {
            return false;
        }
        let row = &self.rows[row_of(self.seq)];
        if row.matching || row.live > 0 || fifo_row.stamp(0) == stamp(self.seq) {
            return false;
        }
        self.cts_waits += 1;
        true
    }

    /// The request of row `r`'s eager send.
    pub fn eager_req(r: usize) -> u16 {
        (FIFO_DEPTH * MAX_RECVS + r) as u16
    }

    /// Whether an eager send refused by its row waits for a later row ([`Self::place_carried`]).
    pub fn has_carried(&self) -> bool {
        self.carried.is_some()
    }

    /// Hands the carried eager message to `fifo_row`, a snapshot of FIFO row
    /// [`Self::current_row`], when that row has arrived and has an entry for its tag: the
    /// receiver takes it there, as it decides from the same row.
    pub fn place_carried(&mut self, fifo_row: &impl FifoRow) -> Result<(), ProtoError> {
        let Some(msg) = self.carried else {
            return Ok(());
        };
        if self.unconfirmed {
            return Ok(());
        }
        let r = row_of(self.seq);
        let row = &self.rows[r];
        if !row.matching {
            if row.live > 0 {
                return Ok(());
            }
            match Self::arrived(self.seq, fifo_row)? {
                Some(head) => self.open_row(r, fifo_row, head),
                None => return Ok(()),
            }
        }
        let row = &self.rows[r];
        // The message was sent before any send still to match: the first entry with its tag is
        // free (a row it skipped had none).
        if let Some(i) = eager_entry(&row.entries[..row.nreqs], msg.tag) {
            if row.matched & (1 << i) != 0 {
                return Err(ProtoError::InvalidUsage(format!(
                    "row {}'s entry {i} for an eager message was matched to a later send",
                    self.seq
                )));
            }
            self.carried = None;
            self.serve(r, i, msg)?;
        }
        Ok(())
    }

    /// The eager message `msg` fills entry `i` of the open row `r`: no data goes there, and the
    /// entry counts as matched. A row of one entry is then complete without a transmit.
    fn serve(&mut self, r: usize, i: usize, msg: SendMsg) -> Result<(), ProtoError> {
        let row = &mut self.rows[r];
        if row.nreqs > 1 && row.matched.count_ones() as usize + 1 == row.nreqs {
            // The message is always placed first in its row, so other sends complete the row
            // and plan its transmit; being last would leave the row with no transmit.
            return Err(ProtoError::InvalidUsage(format!(
                "row {}'s last free entry went to an eager message",
                self.seq
            )));
        }
        row.matched |= 1 << i;
        row.served |= 1 << i;
        row.msgs[i] = msg;
        let capacity = row.entries[i].size;
        if msg.size > capacity && row.truncated.is_none() {
            row.truncated = Some((msg.size, capacity));
            self.late_truncation = Some((msg.size, capacity));
        }
        if row.nreqs == 1 {
            row.matching = false;
            self.seq = self.seq.wrapping_add(1);
        }
        Ok(())
    }

    /// An eager message, its send already reported done, turned out larger than the buffer of
    /// its receive (which fails): (size, capacity), once.
    pub fn take_late_truncation(&mut self) -> Option<(u64, u64)> {
        self.late_truncation.take()
    }

    /// The send cannot match a row yet: send it eagerly when the receiver has a free slot.
    fn try_eager(&mut self, r: usize, msg: SendMsg) -> SendPost {
        let credit = self.eager_sent.wrapping_sub(self.eager_done_seen) < self.eager_slots;
        if !credit
            || self.eager_blocked
            || msg.size > self.eager_max
            || self.sq_used >= self.sq_depth
            || self.carried.is_some()
            || self.rows[r].eager_wr
        {
            return SendPost::NotReady;
        }
        let slot = (self.eager_sent % self.eager_slots) as u16;
        self.eager_sent = self.eager_sent.wrapping_add(1);
        self.unconfirmed = true;
        self.sq_used += 1;
        let row = &mut self.rows[r];
        row.matching = false;
        row.live = 1;
        row.eager = Some(EagerOut { msg });
        row.eager_wr = true;
        row.eager_seq = self.seq;
        let req = Self::eager_req(r);
        self.reqs[usize::from(req)] = SendReq {
            state: ReqState::Eager,
            row: r as u8,
            size: msg.size,
        };
        SendPost::Eager {
            req,
            send: EagerSend {
                seq: self.seq,
                slot,
                msg,
            },
        }
    }

    /// The row of the eager send arrived (or not) in `fifo_row`, a snapshot of
    /// [`Self::current_row`]: account the message where the receiver puts it.
    pub fn resolve(&mut self, fifo_row: &impl FifoRow) -> Result<Resolved, ProtoError> {
        if !self.unconfirmed {
            return Ok(Resolved::Nothing);
        }
        let r = row_of(self.seq);
        let Some(head) = Self::arrived(self.seq, fifo_row)? else {
            return Ok(Resolved::Nothing);
        };
        let Some(EagerOut { msg }) = self.rows[r].eager.take() else {
            return Err(ProtoError::InvalidUsage(format!(
                "row {} waits for its eager send's clear-to-send but holds no eager send",
                self.seq
            )));
        };
        self.unconfirmed = false;
        self.open_row(r, fifo_row, head);
        let row = &self.rows[r];
        match eager_entry(&row.entries[..row.nreqs], msg.tag) {
            Some(i) => {
                self.serve(r, i, msg)?;
                Ok(Resolved::Accepted)
            }
            None => {
                // The message belongs to a later receive; this row opens for other sends.
                self.carried = Some(msg);
                Ok(Resolved::Carried)
            }
        }
    }

    /// Matches the fresh send `msg` into the open row `r`, as the row's next request.
    #[inline]
    fn match_send(&mut self, r: usize, msg: SendMsg) -> Result<SendPost, ProtoError> {
        let row = &self.rows[r];
        let nreqs = row.nreqs;
        // The common row offers one buffer: one look at it.
        let i = if nreqs == 1 {
            if row.matched != 0 || row.entries[0].tag != msg.tag {
                return Ok(SendPost::NotReady);
            }
            0
        } else {
            match (0..nreqs).find(|&i| row.matched & (1 << i) == 0 && row.entries[i].tag == msg.tag)
            {
                Some(i) => i,
                // No free entry with this tag: the send belongs to a later row. Try again later.
                None => return Ok(SendPost::NotReady),
            }
        };
        let planned = if row.matched.count_ones() as usize + 1 == nreqs {
            let truncated = row.truncated.is_some() || msg.size > row.entries[i].size;
            let planned = if nreqs == 1 {
                self.plan(r, &[msg], truncated)?
            } else {
                // The message takes its place in the row to be counted; it is taken back if the
                // row cannot go.
                let prev = std::mem::replace(&mut self.rows[r].msgs[i], msg);
                let planned = self.plan(r, &self.rows[r].msgs[..nreqs], truncated);
                if !matches!(planned, Ok(Some(_))) {
                    self.rows[r].msgs[i] = prev;
                }
                planned?
            };
            match planned {
                Some(p) => Some(p),
                None => return Ok(SendPost::NotReady),
            }
        } else {
            None
        };
        let (req, transmit) = self.commit(r, i, msg, planned);
        Ok(SendPost::Posted { req, transmit })
    }

    /// The transmit of row `r` carrying `msgs` (the whole row) and its work requests:
    /// `Ok(None)` while the send queue has no room for them, an error when it never will.
    #[inline]
    fn plan(
        &self,
        r: usize,
        msgs: &[SendMsg],
        truncated: bool,
    ) -> Result<Option<(Transmit, u32)>, ProtoError> {
        let mut t = Transmit::new(
            self.seq,
            r,
            msgs,
            self.rows[r].served,
            truncated,
            self.max_msg,
        );
        self.shape(&mut t);
        let wqes = t.wqe_count_of(msgs);
        if self.sq_used + wqes <= self.sq_depth {
            return Ok(Some((t, wqes)));
        }
        if wqes > self.sq_depth {
            return Err(ProtoError::InvalidUsage(format!(
                "a row of {} bytes needs {wqes} work requests; the send queue holds {}",
                t.payload, self.sq_depth
            )));
        }
        Ok(None)
    }

    /// Matches `msg` to entry `i` of the open row `r` as the row's next request; `planned`: the
    /// row's transmit when this send completes the row. Returns the request and the transmit.
    #[inline]
    fn commit(
        &mut self,
        r: usize,
        i: usize,
        msg: SendMsg,
        planned: Option<(Transmit, u32)>,
    ) -> (u16, Option<Transmit>) {
        let seq = self.seq;
        let row = &mut self.rows[r];
        let k = row.nids;
        row.matched |= 1 << i;
        row.live += 1;
        row.msgs[i] = msg;
        let capacity = row.entries[i].size;
        if msg.size > capacity && row.truncated.is_none() {
            row.truncated = Some((msg.size, capacity));
        }
        // Requests of a row are numbered in matching order.
        let req = (r * MAX_RECVS + k) as u16;
        row.ids[k] = req;
        row.nids = k + 1;
        let Some((t, wqes)) = planned else {
            self.reqs[usize::from(req)] = SendReq {
                state: ReqState::Matched,
                row: r as u8,
                size: msg.size,
            };
            return (req, None);
        };
        row.matching = false;
        row.wqes = wqes;
        row.awaiting = true;
        row.tx_seq = seq;
        self.sq_used += wqes;
        self.reqs[usize::from(req)] = SendReq {
            state: ReqState::InFlight,
            row: r as u8,
            size: msg.size,
        };
        for &j in &row.ids[..k] {
            self.reqs[usize::from(j)].state = ReqState::InFlight;
        }
        self.seq = seq.wrapping_add(1);
        (req, Some(t))
    }

    /// The eager write of row `seq` completed: its data has left the caller's buffer.
    pub fn on_eager_completion(&mut self, seq: u32) -> Result<(), ProtoError> {
        let r = row_of(seq);
        let row = &mut self.rows[r];
        if !row.eager_wr || row.eager_seq != seq {
            return Err(ProtoError::Protocol(format!(
                "eager write completion for row {seq}, which has no eager write in flight"
            )));
        }
        row.eager_wr = false;
        self.sq_used -= 1;
        // The message left the caller's buffer and landed in the receiver's slot, which the
        // receiver drains itself whatever its receive: the send is done.
        let req = &mut self.reqs[usize::from(Self::eager_req(r))];
        if req.state == ReqState::Eager {
            req.state = ReqState::Done;
        }
        Ok(())
    }

    /// The signaled completion of the transmit of row `seq` arrived.
    #[inline]
    pub fn on_completion(&mut self, seq: u32) -> Result<(), ProtoError> {
        let r = row_of(seq);
        let row = &mut self.rows[r];
        if !row.awaiting || row.tx_seq != seq {
            return Err(ProtoError::Protocol(format!(
                "send completion for row {seq}, which has no transmit in flight"
            )));
        }
        row.awaiting = false;
        self.sq_used -= row.wqes;
        row.wqes = 0;
        let state = if row.truncated.is_some() {
            ReqState::Failed
        } else {
            ReqState::Done
        };
        for &j in &row.ids[..row.nids] {
            self.reqs[usize::from(j)].state = state;
        }
        Ok(())
    }

    /// Collect request `req`: `None` while in progress; the size sent, or the error, once finished.
    /// A finished request is freed by this call.
    #[inline]
    pub fn test(&mut self, req: u16) -> Result<Option<u64>, ProtoError> {
        let idx = req as usize;
        let Some(sr) = self.reqs.get(idx).copied() else {
            return Err(ProtoError::InvalidUsage(format!(
                "send request {req} does not exist"
            )));
        };
        let row = &mut self.rows[usize::from(sr.row)];
        match sr.state {
            ReqState::Free => Err(ProtoError::InvalidUsage(format!(
                "send request {req} is not in flight"
            ))),
            ReqState::Matched | ReqState::InFlight | ReqState::Eager => Ok(None),
            ReqState::Done => {
                self.reqs[idx].state = ReqState::Free;
                row.live -= 1;
                Ok(Some(sr.size))
            }
            ReqState::Failed => {
                self.reqs[idx].state = ReqState::Free;
                row.live -= 1;
                let (size, capacity) = row.truncated.unwrap_or_default();
                Err(ProtoError::Truncated { size, capacity })
            }
        }
    }

    /// The work requests of transmit `t`, in order. Allocation-free.
    pub fn ops(&self, t: &Transmit) -> TransmitOps<'_> {
        let row = &self.rows[t.row];
        TransmitOps {
            t: *t,
            msgs: &row.msgs,
            entries: &row.entries,
            entry: 0,
            offset: 0,
            stage: if t.truncated { Stage::Imm } else { Stage::Data },
        }
    }

    /// The one work request of a transmit that is a single WRITE_WITH_IMM carrying one whole
    /// message (the common small-message case), without running the general iterator.
    pub fn single_op(&self, t: &Transmit) -> Option<WireOp> {
        if t.nreqs != 1 || !t.fold_imm_into_data() || t.first_size > t.max_msg {
            return None;
        }
        let row = &self.rows[t.row];
        let (msg, dst) = (&row.msgs[0], &row.entries[0]);
        Some(WireOp::WriteImm {
            local_addr: msg.addr,
            lkey: msg.lkey,
            remote_addr: dst.addr,
            rkey: dst.rkey,
            len: msg.size as u32,
            imm: t.imm(),
            host: msg.host,
        })
    }

    /// The requests transmit `t` carries: `ids[..n]`.
    pub fn reqs_of(&self, t: &Transmit) -> ([u16; MAX_RECVS], usize) {
        self.reqs_of_row(t.row)
    }

    /// The requests of the latest transmit of row `r`: `ids[..n]`.
    pub fn reqs_of_row(&self, r: usize) -> ([u16; MAX_RECVS], usize) {
        let row = &self.rows[r];
        (row.ids, row.nids)
    }

    /// Work requests transmit `t` posts.
    pub fn wqe_count(&self, t: &Transmit) -> u32 {
        t.wqe_count_of(&self.rows[t.row].msgs[..t.nreqs])
    }

    /// Work requests posted and not yet completed.
    pub fn sq_used(&self) -> u32 {
        self.sq_used
    }
}
