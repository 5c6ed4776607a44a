//! Send and receive comms: the data path. Each comm is driven by one RCCL progress thread.

use super::buffer::RegisteredBuf;
use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::flush::{Flush, FLUSH_SLOTS};
use super::regcache::MrHandle;
use crate::log::{info, warn, NET};
use crate::oob::{OobError, OobStream};
use crate::protocol::{
    row_of, CtsEntry, EagerAction, EagerHeader, EagerSend, ProtoError, RecvBuf, RecvPost,
    RecvState, Resolved, SendMsg, SendPost, SendState, Transmit, WireOp, CTS_ROW_BYTES,
    EAGER_HEADER_BYTES, FIFO_DEPTH, IMM_EAGER, IMM_EAGER_SLOT_MASK, MAX_RECVS, SIZES_ROW_BYTES,
};
use halo_ibverbs::{
    CompletionQueue, QueuePair, RecvWr, SendOp, SendWr, Sge, WcOpcode, WorkCompletion,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Work requests posted per `ibv_post_send` call.
const POST_BATCH: usize = 16;
/// Completions taken per poll.
const POLL_BATCH: usize = 16;
/// Fruitless polls between two checks that the peer's bootstrap socket is still open.
const LIVENESS_EVERY: u32 = 1 << 12;
/// Clear-to-send writes per signaled one: fewer completions for the receiver to poll.
const CTS_SIGNAL_EVERY: u32 = 8;
/// `wr_id` bit marking the receiver's clear-to-send writes (the low bits hold the sequence).
const WR_CTS: u64 = 1 << 40;
/// `wr_id` bit marking the sender's eager writes (the low bits hold the row sequence).
const WR_EAGER: u64 = 1 << 41;
/// `wr_id` bit marking the last data write of a spread row on a data QP (low bits: sequence).
const WR_DATA: u64 = 1 << 42;
/// Rows carrying at least this many bytes are spread over the connection's queue pairs; smaller
/// ones gain nothing from it and would pay the wait for the data before the immediate.
pub const SPREAD_MIN_BYTES: u64 = 64 << 10;

/// A transmit whose immediate (and sizes) must wait: its data is still landing on other queue
/// pairs, or an earlier such transmit is still waiting.
#[derive(Clone, Copy)]
struct Deferred {
    t: Transmit,
    /// Data QPs whose last write of this row has not completed.
    acks_left: u32,
    /// The `Write`s are already posted (else the whole transmit waits).
    data_posted: bool,
}

/// The receiver's bounce slots for eager messages: `slots` of [`EAGER_HEADER_BYTES`] + `max`.
pub struct EagerRing {
    pub buf: RegisteredBuf,
    pub slots: u16,
    pub max: u32,
}

impl EagerRing {
    /// Slots per receive comm. One row at a time goes ahead of its clear-to-send, so a few are
    /// plenty; more only help when the receiver drains them late.
    pub const SLOTS: u16 = 8;

    /// `None` when `max` is 0 (the eager path is off).
    pub fn new(dev: &NetDevice, max: u32) -> NetResult<Option<Self>> {
        if max == 0 {
            return Ok(None);
        }
        let stride = EAGER_HEADER_BYTES + max as usize;
        let buf = RegisteredBuf::new(&dev.pd, usize::from(Self::SLOTS) * stride, "eager slots")?;
        Ok(Some(EagerRing {
            buf,
            slots: Self::SLOTS,
            max,
        }))
    }

    fn stride(&self) -> usize {
        EAGER_HEADER_BYTES + self.max as usize
    }
}

/// Where a sender writes eager messages: the peer's [`EagerRing`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EagerTarget {
    pub addr: u64,
    pub rkey: u32,
    /// 0: the peer has no eager path.
    pub slots: u16,
    /// The peer's slot payload size (the slot stride minus the header).
    pub slot_max: u32,
    /// Largest message sent eagerly: the smaller of the peer's slots and our own setting.
    pub max: u32,
}

const REQ_MAGIC: u32 = 0x4841_4c4f;
/// First word of a [`SendComm`].
pub const COMM_SEND: u32 = 0x4853_4e44;
/// First word of a [`RecvComm`].
pub const COMM_RECV: u32 = 0x4852_4356;

/// What RCCL holds as `request`. Lives inside its comm; RCCL may only use it until `test`
/// reports it done.
pub struct Request {
    magic: u32,
    idx: u16,
    send: *mut SendComm,
    recv: *mut RecvComm,
}

impl Request {
    fn new(idx: u16) -> Self {
        Request {
            magic: REQ_MAGIC,
            idx,
            send: std::ptr::null_mut(),
            recv: std::ptr::null_mut(),
        }
    }

    /// Tests the request behind a pointer handed out by `isend`/`irecv`.
    ///
    /// # Safety
    /// `req` must come from this plugin's `isend`/`irecv` on a comm that is still open, and only
    /// the thread that drives that comm may call this.
    pub unsafe fn test(
        req: *mut Request,
        sizes: &mut [u64; MAX_RECVS],
    ) -> NetResult<Option<usize>> {
        // SAFETY: per the contract, `req` points into a live comm's request table.
        let r = unsafe { &*req };
        if r.magic != REQ_MAGIC {
            return Err(NetError::InvalidArgument(format!(
                "test: {req:p} is not a request of this plugin"
            )));
        }
        // SAFETY: the comm pointers were set when the comm was boxed and stay valid while it is open.
        unsafe {
            if let Some(c) = r.send.as_mut() {
                c.test(r.idx).map(|o| {
                    o.map(|size| {
                        sizes[0] = size;
                        1
                    })
                })
            } else if let Some(c) = r.recv.as_mut() {
                c.test(r.idx).map(|o| {
                    o.map(|(n, s)| {
                        sizes[..n].copy_from_slice(&s[..n]);
                        n
                    })
                })
            } else {
                Err(NetError::Internal("request belongs to no comm".into()))
            }
        }
    }
}

/// Everything a connection shares on both sides.
pub struct Link {
    pub dev: Arc<NetDevice>,
    pub qp: QueuePair,
    pub cq: CompletionQueue,
    pub peer: SocketAddr,
    pub oob: OobStream,
    /// First error seen; every later call reports it.
    pub error: Option<NetError>,
    idle_polls: u32,
}

impl Link {
    pub fn new(
        dev: Arc<NetDevice>,
        qp: QueuePair,
        cq: CompletionQueue,
        peer: SocketAddr,
        oob: OobStream,
    ) -> Self {
        Link {
            dev,
            qp,
            cq,
            peer,
            oob,
            error: None,
            idle_polls: 0,
        }
    }

    pub fn context(&self) -> String {
        format!(
            "{} qp {:#x} peer {}",
            self.dev.describe(),
            self.qp.qp_num(),
            self.peer
        )
    }

    fn fail(&mut self, e: NetError) -> NetError {
        if self.error.is_none() {
            warn!(NET, "{e}");
            self.error = Some(e.clone());
        }
        e
    }

    fn check(&self) -> NetResult<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn proto_error(&mut self, e: ProtoError) -> NetError {
        let ctx = self.context();
        let err = match e {
            ProtoError::Truncated { .. } | ProtoError::TruncatedByPeer { .. } => {
                // Only the request fails; the comm stays usable.
                return NetError::InvalidUsage(format!("{e} ({ctx})"));
            }
            ProtoError::TagMismatch { .. } | ProtoError::InvalidUsage(_) => {
                NetError::InvalidUsage(format!("{e} ({ctx})"))
            }
            ProtoError::Protocol(_) => NetError::Remote(format!("{e} ({ctx})")),
        };
        self.fail(err)
    }

    /// Polls completions into `wcs`; a failed completion fails the comm.
    fn poll(&mut self, wcs: &mut [WorkCompletion; POLL_BATCH]) -> NetResult<usize> {
        let n = self.cq.poll(wcs).map_err(|e| {
            let ctx = self.context();
            self.fail(NetError::System(format!(
                "polling completions: {e} ({ctx})"
            )))
        })?;
        for wc in &wcs[..n] {
            if let Err(e) = wc.result() {
                let ctx = self.context();
                return Err(self.fail(NetError::Remote(format!(
                    "work request {:#x} failed: {e} (vendor error {:#x}) ({ctx})",
                    wc.wr_id, wc.vendor_err
                ))));
            }
        }
        if n == 0 {
            self.idle_tick()?;
        } else {
            self.idle_polls = 0;
        }
        Ok(n)
    }

    /// Counts a call that made no progress; every so often checks that the peer is still there.
    fn idle_tick(&mut self) -> NetResult<()> {
        self.idle_polls += 1;
        if self.idle_polls >= LIVENESS_EVERY {
            self.idle_polls = 0;
            self.check_peer()?;
        }
        Ok(())
    }

    /// The bootstrap socket stays open for the comm's life: its EOF means the peer is gone.
    fn check_peer(&mut self) -> NetResult<()> {
        match self.oob.poll_recv() {
            Ok(None) => Ok(()),
            Ok(Some(_)) => {
                let ctx = self.context();
                Err(self.fail(NetError::Remote(format!(
                    "unexpected bootstrap message from the peer ({ctx})"
                ))))
            }
            Err(e @ OobError::PeerClosed { .. }) => {
                let ctx = self.context();
                Err(self.fail(NetError::Remote(format!(
                    "the peer went away with requests in flight: {e} ({ctx})"
                ))))
            }
            Err(e) => {
                let ctx = self.context();
                Err(self.fail(NetError::Remote(format!("bootstrap socket: {e} ({ctx})"))))
            }
        }
    }
}

/// The sending end of a connection. `kind` comes first so a `void*` comm can be told apart.
#[repr(C)]
pub struct SendComm {
    kind: u32,
    pub link: Link,
    proto: SendState,
    /// Our FIFO: the receiver RDMA-writes clear-to-send rows here.
    fifo: RegisteredBuf,
    /// Source of the sizes writes when they cannot go inline.
    sizes_staging: RegisteredBuf,
    remote_sizes_addr: u64,
    remote_sizes_rkey: u32,
    /// Source of eager headers that cannot go inline, one per slot.
    eager_headers: RegisteredBuf,
    eager: EagerTarget,
    /// Queue pairs 1.. of the connection (`NCCL_IB_QPS_PER_CONNECTION`); QP 0 is the link's.
    data_qps: Vec<QueuePair>,
    /// `NCCL_IB_SPLIT_DATA_ON_QPS`: split each message over all QPs, else whole rows in turn.
    split: bool,
    rr_next: usize,
    /// Transmits waiting for their immediate, in row order (capacity FIFO_DEPTH: no allocation).
    deferred: VecDeque<Deferred>,
    reqs: Box<[Request]>,
    /// Sends that went eagerly, and those of them the receiver refused.
    pub eager_sent: u64,
    pub eager_refused: u64,
}

impl SendComm {
    /// Bytes of eager header staging to allocate for a send comm.
    pub const EAGER_HEADER_STAGING_BYTES: usize = EagerRing::SLOTS as usize * EAGER_HEADER_BYTES;

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        link: Link,
        fifo: RegisteredBuf,
        sizes_staging: RegisteredBuf,
        remote_sizes_addr: u64,
        remote_sizes_rkey: u32,
        max_msg: u64,
        eager_headers: RegisteredBuf,
        eager: EagerTarget,
        data_qps: Vec<QueuePair>,
        split: bool,
    ) -> Box<Self> {
        let sq = link.qp.caps().max_send_wr;
        // Header staging has room for our own slot count only.
        let slots = eager.slots.min(EagerRing::SLOTS);
        let mut proto = SendState::new(max_msg.min(1 << 31), sq).with_eager(slots, eager.max);
        if !data_qps.is_empty() {
            let parts = if split { data_qps.len() as u32 + 1 } else { 1 };
            proto = proto.with_qps(parts, SPREAD_MIN_BYTES);
        }
        let mut c = Box::new(SendComm {
            kind: COMM_SEND,
            link,
            proto,
            fifo,
            sizes_staging,
            remote_sizes_addr,
            remote_sizes_rkey,
            eager_headers,
            eager,
            data_qps,
            split,
            rr_next: 0,
            deferred: VecDeque::with_capacity(FIFO_DEPTH),
            eager_sent: 0,
            eager_refused: 0,
            reqs: (0..FIFO_DEPTH * MAX_RECVS)
                .map(|i| Request::new(i as u16))
                .collect(),
        });
        let me: *mut SendComm = &mut *c;
        for r in c.reqs.iter_mut() {
            r.send = me;
        }
        c
    }

    /// Bytes of FIFO memory to allocate for a send comm.
    pub const FIFO_BYTES: usize = FIFO_DEPTH * CTS_ROW_BYTES;

    fn fifo_row(&self, row: usize) -> [CtsEntry; MAX_RECVS] {
        // SAFETY: the FIFO holds FIFO_DEPTH rows; the NIC writes it concurrently, hence the
        // volatile read (a torn row is caught by the per-entry stamps).
        let row = unsafe {
            std::ptr::read_volatile((self.fifo.ptr() as *const [CtsEntry; MAX_RECVS]).add(row))
        };
        fence(Ordering::Acquire);
        row
    }

    /// `isend`: `Ok(None)` when it cannot be posted yet.
    pub fn isend(
        &mut self,
        data: u64,
        size: u64,
        tag: i32,
        mh: Option<&MrHandle>,
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        let lkey = match mh {
            Some(m) => {
                if size > 0 && (data < m.start || data + size > m.end) {
                    return Err(NetError::InvalidArgument(format!(
                        "isend of {data:#x}+{size} outside its registration {:#x}..{:#x}",
                        m.start, m.end
                    )));
                }
                m.lkey
            }
            None if size == 0 => 0,
            None => {
                return Err(NetError::InvalidArgument(
                    "isend of data without a memory handle".into(),
                ))
            }
        };
        if self.proto.unconfirmed() {
            self.resolve_eager()?;
        }
        let row = self.fifo_row(self.proto.current_row());
        let msg = SendMsg {
            addr: data,
            lkey,
            size,
            tag,
            // Inline sends are copied by the CPU: never from GPU memory.
            host: mh.is_none_or(|m| !m.gpu),
        };
        crate::log::trace!(
            NET,
            "isend {size} bytes tag {tag} row {} ({})",
            self.proto.seq(),
            self.link.peer
        );
        match self.proto.post(&row, msg) {
            Ok(SendPost::NotReady) => {
                // Waiting for the receiver: a dead receiver never answers, so watch the peer here too.
                self.link.idle_tick()?;
                Ok(None)
            }
            Ok(SendPost::Posted { req, transmit }) => {
                if let Some(t) = transmit {
                    self.transmit(&t)?;
                }
                Ok(Some(&mut self.reqs[req as usize] as *mut Request))
            }
            Ok(SendPost::Eager { req, send }) => {
                self.post_eager(&send)?;
                Ok(Some(&mut self.reqs[req as usize] as *mut Request))
            }
            Err(e) => Err(self.link.proto_error(e)),
        }
    }

    /// Settles the eager row once the receiver's clear-to-send for it has landed.
    fn resolve_eager(&mut self) -> NetResult<()> {
        let row = self.fifo_row(self.proto.current_row());
        match self.proto.resolve(&row) {
            Ok(Resolved::Nothing | Resolved::Accepted) => Ok(()),
            Ok(Resolved::Refused) => {
                self.eager_refused += 1;
                Ok(())
            }
            Ok(Resolved::Transmit(t)) => {
                self.eager_refused += 1;
                self.transmit(&t)
            }
            Err(e) => Err(self.link.proto_error(e)),
        }
    }

    /// One WRITE_WITH_IMM of header + data into the receiver's bounce slot.
    fn post_eager(&mut self, e: &EagerSend) -> NetResult<()> {
        let hdr: EagerHeader = e.header();
        let slot = usize::from(e.slot);
        let len = e.msg.size as u32;
        let total = EAGER_HEADER_BYTES + len as usize;
        let inline = e.msg.host && total <= self.link.qp.caps().max_inline_data as usize;
        let hdr_sge = if inline {
            Sge {
                addr: &hdr as *const EagerHeader as u64,
                length: EAGER_HEADER_BYTES as u32,
                lkey: 0,
            }
        } else {
            let dst = self
                .eager_headers
                .ptr()
                .wrapping_add(slot * EAGER_HEADER_BYTES) as *mut EagerHeader;
            // SAFETY: the staging holds one header per slot; this slot's previous write has
            // landed (the receiver drained the slot before we got the credit to reuse it).
            unsafe { std::ptr::write_volatile(dst, hdr) };
            Sge {
                addr: dst as u64,
                length: EAGER_HEADER_BYTES as u32,
                lkey: self.eager_headers.lkey(),
            }
        };
        let sges = [
            hdr_sge,
            Sge {
                addr: e.msg.addr,
                length: len,
                lkey: e.msg.lkey,
            },
        ];
        let nsge = if len > 0 { 2 } else { 1 };
        let stride = EAGER_HEADER_BYTES as u64 + u64::from(self.eager.slot_max);
        let wr = SendWr {
            wr_id: WR_EAGER | u64::from(e.seq),
            op: SendOp::WriteImm {
                remote_addr: self.eager.addr + e.slot as u64 * stride,
                rkey: self.eager.rkey,
                imm: e.imm(),
            },
            sge: &sges[..nsge],
            signaled: true,
            inline,
        };
        self.eager_sent += 1;
        self.link.qp.post_send(&[wr]).map_err(|err| {
            let ctx = self.link.context();
            self.link.fail(NetError::System(format!(
                "posting an eager write: {err} ({ctx})"
            )))
        })
    }

    /// Puts a transmit on the wire: all on QP 0, or its data spread over the QPs and the rest
    /// deferred until that data has landed. Immediates always go out in row order.
    fn transmit(&mut self, t: &Transmit) -> NetResult<()> {
        if !t.spread() {
            if self.deferred.is_empty() {
                return self.post_ops(t, false);
            }
            self.deferred.push_back(Deferred {
                t: *t,
                acks_left: 0,
                data_posted: false,
            });
        } else {
            let acks_left = self.post_spread_data(t)?;
            self.deferred.push_back(Deferred {
                t: *t,
                acks_left,
                data_posted: true,
            });
        }
        self.flush_deferred()
    }

    fn qp(&self, i: usize) -> &QueuePair {
        if i == 0 {
            &self.link.qp
        } else {
            &self.data_qps[i - 1]
        }
    }

    /// Posts the `Write`s of a spread transmit over the QPs; the last one on each data QP (not
    /// QP 0, which stays ordered with the immediate) is signaled. Returns how many were.
    fn post_spread_data(&mut self, t: &Transmit) -> NetResult<u32> {
        let n = self.data_qps.len() + 1;
        let row_qp = self.rr_next % n;
        self.rr_next = self.rr_next.wrapping_add(1);
        let qp_of = |k: usize| if self.split { k % n } else { row_qp };
        let mut last = [usize::MAX; crate::oob::MAX_QPS];
        let writes = t.ops().filter(|op| matches!(op, WireOp::Write { .. }));
        for (k, _) in writes.enumerate() {
            last[qp_of(k)] = k;
        }
        let writes = t.ops().filter(|op| matches!(op, WireOp::Write { .. }));
        for (k, op) in writes.enumerate() {
            let WireOp::Write {
                local_addr,
                lkey,
                remote_addr,
                rkey,
                len,
                ..
            } = op
            else {
                continue;
            };
            let q = qp_of(k);
            let signaled = q != 0 && last[q] == k;
            let sge = Sge {
                addr: local_addr,
                length: len,
                lkey,
            };
            let wr = SendWr {
                wr_id: if signaled {
                    WR_DATA | u64::from(t.seq)
                } else {
                    u64::MAX
                },
                op: SendOp::Write { remote_addr, rkey },
                sge: std::slice::from_ref(&sge),
                signaled,
                inline: false,
            };
            if let Err(e) = self.qp(q).post_send(&[wr]) {
                let ctx = self.link.context();
                return Err(self.link.fail(NetError::System(format!(
                    "posting RDMA writes on data QP {q}: {e} ({ctx})"
                ))));
            }
        }
        Ok((1..n).filter(|&q| last[q] != usize::MAX).count() as u32)
    }

    /// Posts the deferred transmits whose data has landed, oldest first.
    fn flush_deferred(&mut self) -> NetResult<()> {
        while let Some(d) = self.deferred.front().copied() {
            if d.acks_left > 0 {
                break;
            }
            self.deferred.pop_front();
            self.post_ops(&d.t, d.data_posted)?;
        }
        self.proto.set_eager_allowed(self.deferred.is_empty());
        Ok(())
    }

    /// Posts the work requests of `t` on QP 0 (without its `Write`s when `skip_writes`).
    fn post_ops(&mut self, t: &Transmit, skip_writes: bool) -> NetResult<()> {
        let max_inline = self.link.qp.caps().max_inline_data as usize;
        let total = if skip_writes {
            t.ops()
                .filter(|op| !matches!(op, WireOp::Write { .. }))
                .count()
        } else {
            t.wqe_count() as usize
        };
        let mut sges = [Sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; POST_BATCH];
        let mut meta = [(0u64, SendOp::Send, false); POST_BATCH];
        let mut n = 0;
        let mut posted = 0;
        let mut sizes_copy = [0u64; MAX_RECVS];
        for op in t
            .ops()
            .filter(|op| !skip_writes || !matches!(op, WireOp::Write { .. }))
        {
            posted += 1;
            let last = posted == total;
            let wr_id = if last { u64::from(t.seq) } else { u64::MAX };
            let (sop, sge, inline) = match op {
                WireOp::Write {
                    local_addr,
                    lkey,
                    remote_addr,
                    rkey,
                    len,
                    host,
                } => (
                    SendOp::Write { remote_addr, rkey },
                    Sge {
                        addr: local_addr,
                        length: len,
                        lkey,
                    },
                    host && len as usize <= max_inline,
                ),
                WireOp::WriteImm {
                    local_addr,
                    lkey,
                    remote_addr,
                    rkey,
                    len,
                    imm,
                    host,
                } => (
                    SendOp::WriteImm {
                        remote_addr,
                        rkey,
                        imm,
                    },
                    Sge {
                        addr: local_addr,
                        length: len,
                        lkey,
                    },
                    // Small host data goes inside the work request: no DMA read before the send.
                    host && len > 0 && len as usize <= max_inline,
                ),
                WireOp::WriteSizes { row, sizes, n: k } => {
                    let bytes = k * 8;
                    let remote_addr = self.remote_sizes_addr + (row * SIZES_ROW_BYTES) as u64;
                    let rkey = self.remote_sizes_rkey;
                    if bytes <= max_inline {
                        sizes_copy.copy_from_slice(&sizes);
                        (
                            SendOp::Write { remote_addr, rkey },
                            Sge {
                                addr: sizes_copy.as_ptr() as u64,
                                length: bytes as u32,
                                lkey: 0,
                            },
                            true,
                        )
                    } else {
                        let dst = self.sizes_staging.ptr().wrapping_add(row * SIZES_ROW_BYTES)
                            as *mut u64;
                        // SAFETY: the staging buffer has FIFO_DEPTH rows of MAX_RECVS u64; row `row`
                        // is not in flight (its previous transmit completed before the row was reused).
                        unsafe { std::ptr::copy_nonoverlapping(sizes.as_ptr(), dst, k) };
                        (
                            SendOp::Write { remote_addr, rkey },
                            Sge {
                                addr: dst as u64,
                                length: bytes as u32,
                                lkey: self.sizes_staging.lkey(),
                            },
                            false,
                        )
                    }
                }
            };
            sges[n] = sge;
            meta[n] = (wr_id, sop, inline);
            n += 1;
            if n == POST_BATCH || last {
                self.post_batch(&sges[..n], &meta[..n], last)?;
                n = 0;
            }
        }
        Ok(())
    }

    fn post_batch(
        &mut self,
        sges: &[Sge],
        meta: &[(u64, SendOp, bool)],
        ends_transmit: bool,
    ) -> NetResult<()> {
        let k = sges.len();
        let wrs: [SendWr<'_>; POST_BATCH] = std::array::from_fn(|i| {
            let (wr_id, op, inline) = meta.get(i).copied().unwrap_or((0, SendOp::Send, false));
            let sge = match sges.get(i) {
                Some(s) if s.length > 0 => std::slice::from_ref(s),
                _ => &[][..],
            };
            SendWr {
                wr_id,
                op,
                sge,
                signaled: ends_transmit && i + 1 == k,
                inline,
            }
        });
        self.link.qp.post_send(&wrs[..k]).map_err(|e| {
            let ctx = self.link.context();
            self.link.fail(NetError::System(format!(
                "posting RDMA writes: {e} ({ctx})"
            )))
        })
    }

    fn progress(&mut self) -> NetResult<()> {
        let mut wcs = [WorkCompletion::default(); POLL_BATCH];
        let n = self.link.poll(&mut wcs)?;
        let mut landed = false;
        for wc in &wcs[..n] {
            let seq = wc.wr_id as u32;
            if wc.wr_id & WR_DATA != 0 {
                match self
                    .deferred
                    .iter_mut()
                    .find(|d| d.t.seq == seq && d.acks_left > 0)
                {
                    Some(d) => d.acks_left -= 1,
                    None => {
                        let ctx = self.link.context();
                        return Err(self.link.fail(NetError::Internal(format!(
                            "data completion for row {seq}, which waits for none ({ctx})"
                        ))));
                    }
                }
                landed = true;
                continue;
            }
            let r = if wc.wr_id & WR_EAGER != 0 {
                self.proto.on_eager_completion(seq)
            } else {
                self.proto.on_completion(seq)
            };
            if let Err(e) = r {
                return Err(self.link.proto_error(e));
            }
        }
        if landed {
            self.flush_deferred()?;
        }
        if self.proto.unconfirmed() {
            self.resolve_eager()?;
        }
        Ok(())
    }

    fn test(&mut self, req: u16) -> NetResult<Option<u64>> {
        self.link.check()?;
        self.progress()?;
        self.proto.test(req).map_err(|e| self.link.proto_error(e))
    }
}

impl Drop for SendComm {
    fn drop(&mut self) {
        if self.eager_sent > 0 {
            info!(
                NET,
                "send comm to {} closed: {} eager sends, {} refused by the receiver",
                self.link.peer,
                self.eager_sent,
                self.eager_refused
            );
        }
    }
}

/// The receiving end of a connection. `kind` comes first, as in [`SendComm`].
#[repr(C)]
pub struct RecvComm {
    kind: u32,
    pub link: Link,
    proto: RecvState,
    /// The sender writes the sizes of multi-receives here.
    sizes: RegisteredBuf,
    /// Source of clear-to-send writes that cannot go inline.
    cts_staging: RegisteredBuf,
    remote_fifo_addr: u64,
    remote_fifo_rkey: u32,
    /// Receive requests (`0..FIFO_DEPTH`), then flush requests (one per flush slot).
    reqs: Box<[Request]>,
    /// Present when the device may receive into GPU memory.
    flush: Option<Flush>,
    /// Clear-to-send writes posted; only every [`CTS_SIGNAL_EVERY`]th asks for a completion.
    cts_posted: u32,
    /// Clear-to-send writes known to be finished (released from the send queue).
    cts_reaped: u32,
    /// Bounce slots for eager messages (`None`: the eager path is off).
    eager: Option<EagerRing>,
    /// Eager messages copied into a posted receive.
    pub eager_taken: u64,
    /// Eager messages whose receive did not take them (the sender then sent them normally).
    pub eager_dropped: u64,
    /// Queue pairs 1.. of the connection: the sender writes spread data through them.
    _data_qps: Vec<QueuePair>,
}

impl RecvComm {
    pub const SIZES_BYTES: usize = FIFO_DEPTH * SIZES_ROW_BYTES;
    pub const CTS_STAGING_BYTES: usize = FIFO_DEPTH * CTS_ROW_BYTES;
    /// Receives kept posted: one per row in flight plus the eager slots, with room to spare.
    pub const RQ_STOCK: u32 = 2 * FIFO_DEPTH as u32;

    /// Posts `n` receives (capped to the queue's size) for incoming immediates.
    pub fn stock_receives(qp: &QueuePair, n: u32) -> halo_ibverbs::Result<()> {
        let mut left = n.min(qp.caps().max_recv_wr) as usize;
        let wrs = [RecvWr { wr_id: 0, sge: &[] }; POLL_BATCH];
        while left > 0 {
            let k = left.min(POLL_BATCH);
            qp.post_recv(&wrs[..k])?;
            left -= k;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        link: Link,
        sizes: RegisteredBuf,
        cts_staging: RegisteredBuf,
        remote_fifo_addr: u64,
        remote_fifo_rkey: u32,
        eager: Option<EagerRing>,
        flush: Option<Flush>,
        data_qps: Vec<QueuePair>,
    ) -> Box<Self> {
        let mut c = Box::new(RecvComm {
            kind: COMM_RECV,
            link,
            proto: RecvState::new(),
            sizes,
            cts_staging,
            remote_fifo_addr,
            remote_fifo_rkey,
            reqs: (0..FIFO_DEPTH + FLUSH_SLOTS)
                .map(|i| Request::new(i as u16))
                .collect(),
            flush,
            cts_posted: 0,
            cts_reaped: 0,
            eager,
            eager_taken: 0,
            eager_dropped: 0,
            _data_qps: data_qps,
        });
        let me: *mut RecvComm = &mut *c;
        for r in c.reqs.iter_mut() {
            r.recv = me;
        }
        c
    }

    pub fn dev(&self) -> &Arc<NetDevice> {
        &self.link.dev
    }

    /// `irecv` of `bufs` (address, capacity, tag, memory handle); `Ok(None)` when it cannot be
    /// posted yet.
    pub fn irecv(
        &mut self,
        bufs: &[(u64, u64, i32, Option<&MrHandle>)],
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        // Unsignaled clear-to-send writes hold their send-queue slots until a later signaled one
        // is polled: never post more than the queue holds.
        let sq = self.link.qp.caps().max_send_wr;
        if self.cts_posted.wrapping_sub(self.cts_reaped) >= sq {
            self.progress()?;
            if self.cts_posted.wrapping_sub(self.cts_reaped) >= sq {
                return Ok(None);
            }
        }
        let mut rb = [RecvBuf::default(); MAX_RECVS];
        if bufs.is_empty() || bufs.len() > MAX_RECVS {
            return Err(NetError::InvalidArgument(format!(
                "irecv of {} buffers (1..={MAX_RECVS} allowed)",
                bufs.len()
            )));
        }
        for (i, &(addr, size, tag, mh)) in bufs.iter().enumerate() {
            let rkey = match mh {
                Some(m) => {
                    if size > 0 && (addr < m.start || addr + size > m.end) {
                        return Err(NetError::InvalidArgument(format!(
                            "irecv buffer {i} {addr:#x}+{size} outside its registration {:#x}..{:#x}",
                            m.start, m.end
                        )));
                    }
                    m.rkey
                }
                None if size == 0 => 0,
                None => {
                    return Err(NetError::InvalidArgument(format!(
                        "irecv buffer {i} has no memory handle"
                    )))
                }
            };
            rb[i] = RecvBuf {
                addr,
                size,
                rkey,
                tag,
                // Eager messages are copied by the CPU: never into GPU memory.
                host: self.eager.is_some() && mh.is_none_or(|m| !m.gpu),
            };
        }
        let (req, seq, n, entries, eager) = match self.proto.post(&rb[..bufs.len()]) {
            Ok(RecvPost::NotReady) => return Ok(None),
            Ok(RecvPost::Posted {
                req,
                seq,
                n,
                entries,
                eager,
            }) => (req, seq, n, entries, eager),
            Err(e) => return Err(self.link.proto_error(e)),
        };
        // A held eager message is settled before the row tells the sender about it.
        self.apply_eager(eager);
        let row = row_of(seq);
        let bytes = n * std::mem::size_of::<CtsEntry>();
        let inline = bytes <= self.link.qp.caps().max_inline_data as usize;
        let sge = if inline {
            Sge {
                addr: entries.as_ptr() as u64,
                length: bytes as u32,
                lkey: 0,
            }
        } else {
            let dst = self.cts_staging.ptr().wrapping_add(row * CTS_ROW_BYTES) as *mut CtsEntry;
            // SAFETY: the staging buffer holds FIFO_DEPTH rows; this row's previous write completed
            // (its request was collected before the row could be posted again).
            unsafe { std::ptr::copy_nonoverlapping(entries.as_ptr(), dst, n) };
            Sge {
                addr: dst as u64,
                length: bytes as u32,
                lkey: self.cts_staging.lkey(),
            }
        };
        let wr = SendWr {
            wr_id: WR_CTS | u64::from(seq),
            op: SendOp::Write {
                remote_addr: self.remote_fifo_addr + (row * CTS_ROW_BYTES) as u64,
                rkey: self.remote_fifo_rkey,
            },
            sge: std::slice::from_ref(&sge),
            // Unsignaled writes are released by the next signaled one (see the check at the top).
            signaled: self.cts_posted % CTS_SIGNAL_EVERY == CTS_SIGNAL_EVERY - 1,
            inline,
        };
        self.link.qp.post_send(&[wr]).map_err(|e| {
            let ctx = self.link.context();
            self.link.fail(NetError::System(format!(
                "posting clear-to-send: {e} ({ctx})"
            )))
        })?;
        self.cts_posted = self.cts_posted.wrapping_add(1);
        Ok(Some(&mut self.reqs[req as usize] as *mut Request))
    }

    fn sizes_row(&self, row: usize) -> [u64; MAX_RECVS] {
        // SAFETY: the sizes array holds FIFO_DEPTH rows written by the NIC; the immediate that
        // announced them completed, so the bytes are in memory.
        let r = unsafe {
            std::ptr::read_volatile((self.sizes.ptr() as *const [u64; MAX_RECVS]).add(row))
        };
        fence(Ordering::Acquire);
        r
    }

    /// Carries out what the protocol decided about an eager slot.
    fn apply_eager(&mut self, action: EagerAction) {
        match action {
            EagerAction::None | EagerAction::Hold => {}
            EagerAction::Drop => self.eager_dropped += 1,
            EagerAction::Copy { slot, dst, len } => {
                self.eager_taken += 1;
                let ring = self.eager.as_ref().expect("eager actions need the ring");
                let src = ring
                    .buf
                    .ptr()
                    .wrapping_add(usize::from(slot) * ring.stride() + EAGER_HEADER_BYTES);
                // SAFETY: the slot's completion arrived, so its bytes are in place; `dst` is the
                // posted host buffer, registered for at least `len` bytes (the protocol checked
                // `len` against its capacity) and owned by the request until `test` reports it.
                unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, len as usize) };
            }
        }
    }

    /// The header of eager slot `slot` after its completion.
    fn eager_header(&mut self, imm: u32) -> NetResult<(u16, EagerHeader)> {
        let slot = (imm & IMM_EAGER_SLOT_MASK) as u16;
        let ctx = self.link.context();
        let Some(ring) = self.eager.as_ref().filter(|r| slot < r.slots) else {
            return Err(self.link.fail(NetError::Remote(format!(
                "eager message in slot {slot}, which this receiver does not have ({ctx})"
            ))));
        };
        let p = ring
            .buf
            .ptr()
            .wrapping_add(usize::from(slot) * ring.stride());
        // SAFETY: the slot lies inside the ring and its write completed.
        let hdr = unsafe { std::ptr::read_volatile(p as *const EagerHeader) };
        fence(Ordering::Acquire);
        if u64::from(hdr.size) > u64::from(ring.max) {
            return Err(self.link.fail(NetError::Remote(format!(
                "eager message of {} bytes in a slot of {} ({ctx})",
                hdr.size, ring.max
            ))));
        }
        Ok((slot, hdr))
    }

    fn progress(&mut self) -> NetResult<()> {
        let mut wcs = [WorkCompletion::default(); POLL_BATCH];
        let n = self.link.poll(&mut wcs)?;
        let mut consumed = 0;
        for wc in &wcs[..n] {
            if wc.opcode != WcOpcode::RecvRdmaWithImm {
                if wc.wr_id & WR_CTS != 0 {
                    // A signaled clear-to-send write finished, and with it every earlier one.
                    self.cts_reaped = (wc.wr_id as u32).wrapping_add(1);
                }
                continue;
            }
            consumed += 1;
            let Some(imm) = wc.imm else {
                let ctx = self.link.context();
                return Err(self.link.fail(NetError::Remote(format!(
                    "receive completed without immediate ({ctx})"
                ))));
            };
            if imm & !IMM_EAGER_SLOT_MASK == IMM_EAGER {
                let (slot, hdr) = self.eager_header(imm)?;
                match self.proto.on_eager(slot, hdr) {
                    Ok(action) => self.apply_eager(action),
                    Err(e) => return Err(self.link.proto_error(e)),
                }
                continue;
            }
            let row = row_of(self.proto.next_done_seq());
            let sizes = self.sizes_row(row);
            if let Err(e) = self.proto.on_imm(imm, || sizes) {
                return Err(self.link.proto_error(e));
            }
        }
        if consumed > 0 {
            // Each immediate took one receive: put them back.
            Self::stock_receives(&self.link.qp, consumed).map_err(|e| {
                let ctx = self.link.context();
                self.link
                    .fail(NetError::System(format!("posting receives: {e} ({ctx})")))
            })?;
        }
        Ok(())
    }

    /// `iflush` of a completed receive: a READ from the last non-empty buffer in GPU memory;
    /// `Ok(None)` when no buffer is in GPU memory (nothing to flush).
    pub fn iflush(
        &mut self,
        bufs: &[(u64, u64, Option<&MrHandle>)],
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        let Some((addr, _, Some(mh))) = bufs
            .iter()
            .rev()
            .find(|(_, size, mh)| *size > 0 && mh.is_some_and(|m| m.gpu))
        else {
            return Ok(None);
        };
        let Some(flush) = self.flush.as_mut() else {
            return Err(NetError::Internal(format!(
                "iflush of GPU memory {addr:#x} on a comm without a flush QP ({})",
                self.link.context()
            )));
        };
        let slot = flush.post(*addr, mh.rkey)?;
        Ok(Some(&mut self.reqs[FIFO_DEPTH + slot] as *mut Request))
    }

    /// RDMA READs the flushes of this comm completed.
    pub fn flush_reads_done(&self) -> u64 {
        self.flush.as_ref().map_or(0, Flush::reads_done)
    }

    fn test(&mut self, req: u16) -> NetResult<Option<(usize, [u64; MAX_RECVS])>> {
        if let Some(slot) = (req as usize).checked_sub(FIFO_DEPTH) {
            let flush = self
                .flush
                .as_mut()
                .ok_or_else(|| NetError::Internal("flush request without a flush QP".into()))?;
            return Ok(flush.test(slot)?.then_some((0, [0; MAX_RECVS])));
        }
        self.link.check()?;
        self.progress()?;
        self.proto.test(req).map_err(|e| self.link.proto_error(e))
    }
}

impl Drop for RecvComm {
    fn drop(&mut self) {
        if self.eager_taken + self.eager_dropped > 0 {
            info!(
                NET,
                "receive comm from {} closed: {} eager messages taken, {} dropped",
                self.link.peer,
                self.eager_taken,
                self.eager_dropped
            );
        }
    }
}
