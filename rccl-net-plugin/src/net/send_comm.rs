//! The sending end of a connection: hands `isend`s and completions to the protocol core
//! ([`Sender`]) and posts what it answers.

use super::buffer::RegisteredBuf;
use super::error::{contained, NetResult};
use super::link::{Link, POLL_BATCH};
use super::poster::{post_data_now, Poster, Staging, Targets};
use super::profiler::{self, Profiler, Tap};
use super::regcache::{checked_handle, MrHandle};
use super::request::Request;
use super::stats::{self, CommCounters, Side};
use crate::log::{warn, NET};
use crate::protocol::{
    CtsEntry, Fifo, SendConfig, SendMsg, Sender, CTS_ROW_BYTES, EAGER_HEADER_BYTES, FIFO_DEPTH,
    MAX_RECVS, SEND_REQS,
};
use halo_ibverbs::WorkCompletion;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::atomic::{fence, Ordering};

/// What a send comm is made of, from `connect`.
pub struct SendParts {
    pub link: Link,
    /// Our FIFO: the receiver RDMA-writes clear-to-send rows here.
    pub fifo: RegisteredBuf,
    /// Sizes rows and eager headers that cannot go inline.
    pub staging: Staging,
    /// The receiver's sizes array and bounce slots.
    pub targets: Targets,
    pub cfg: SendConfig,
    /// `HALO_STATS`: log the counters at close.
    pub stats: bool,
}

/// The sending end of a connection (RCCL holds it through a [`super::CommHandle`]).
pub struct SendComm {
    pub link: Link,
    core: Sender,
    fifo: RegisteredBuf,
    staging: Staging,
    targets: Targets,
    reqs: Box<[Request]>,
    stats: bool,
    own: CommCounters,
    /// Present when `init` got a profiler callback.
    prof: Option<Box<Profiler>>,
}

impl SendComm {
    /// Bytes of FIFO memory to allocate for a send comm.
    pub const FIFO_BYTES: usize = FIFO_DEPTH * CTS_ROW_BYTES;
    /// Bytes of eager header staging: one header per bounce slot we may use.
    pub const EAGER_HEADER_STAGING_BYTES: usize =
        super::recv_comm::EagerRing::SLOTS as usize * EAGER_HEADER_BYTES;
    pub fn new(p: SendParts) -> Box<Self> {
        let prof = Profiler::new(SEND_REQS, p.link.dev.index);
        let mut c = Box::new(SendComm {
            link: p.link,
            core: Sender::new(p.cfg),
            fifo: p.fifo,
            staging: p.staging,
            targets: p.targets,
            reqs: Box::new([]),
            stats: p.stats,
            own: CommCounters::default(),
            prof,
        });
        let me: *mut SendComm = &mut *c;
        c.reqs = Request::table_for_send(me, SEND_REQS);
        c
    }

    /// `isend`: `Ok(None)` when it cannot be posted yet. `phandle`: the profiler's handle for
    /// this send (NULL: none).
    pub fn isend(
        &mut self,
        data: u64,
        size: u64,
        tag: i32,
        mh: Option<&MrHandle>,
        phandle: *mut c_void,
    ) -> NetResult<Option<*mut Request>> {
        self.link.check()?;
        let lkey = checked_handle(mh, data, size, "isend data")?.map_or(0, |m| m.lkey);
        let fifo = FifoView(self.fifo.ptr());
        if !crate::log::trace_enabled() && self.core.waits_for_cts(&fifo, size) {
            // The receiver has not offered the buffer yet and the message cannot go eagerly:
            // a few loads, and a NULL request (this is the call a waiting sender repeats).
            return self.null_send();
        }
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
            self.core.seq(),
            self.link.peer
        );
        if self.prof.is_none() {
            // The common case: one write, posted at once.
            match self.core.isend_one(&fifo, msg) {
                Ok(Some((req, post))) => {
                    post_data_now(&self.link.qps, &post)
                        .map_err(|f| self.link.post_error(f, "RDMA writes"))?;
                    return Ok(Some(&mut self.reqs[usize::from(req)] as *mut Request));
                }
                Ok(None) => {}
                Err(e) => return Err(self.link.proto_error(e)),
            }
        }
        let mut out = Poster::new(&self.link.qps, &self.targets, &self.staging, None);
        let r = match self.prof.as_deref_mut() {
            None => self.core.isend_from(fifo, msg, &mut out),
            Some(p) => {
                let mut tap = Tap::new(&mut out);
                let r = self.core.isend_from(fifo, msg, &mut tap);
                if let Ok(Some(req)) = r {
                    p.arm(usize::from(req), phandle, size);
                }
                tap.start_events(p, &self.link.qps);
                r
            }
        };
        out.finish()
            .map_err(|f| self.link.post_error(f, "RDMA writes"))?;
        self.warn_late_truncation();
        match r {
            Ok(Some(req)) => Ok(Some(&mut self.reqs[usize::from(req)] as *mut Request)),
            Ok(None) => self.null_send(),
            Err(e) => Err(self.link.proto_error(e)),
        }
    }

    /// An `isend` that returns a NULL request.
    fn null_send(&mut self) -> NetResult<Option<*mut Request>> {
        self.own.nulls += 1;
        // Waiting for the receiver: a dead receiver never answers, so watch the peer here too.
        self.link.idle_tick()?;
        Ok(None)
    }

    /// Polls completions and acts on them; whether there were any. Runs inside the caller's
    /// `contained` (see `abi::common::test`).
    #[inline]
    fn progress(&mut self) -> NetResult<bool> {
        let mut wcs = [const { MaybeUninit::<WorkCompletion>::uninit() }; POLL_BATCH];
        let got = self.link.poll(&mut wcs)?;
        if got.is_empty() && !self.core.wants_progress() {
            return Ok(false);
        }
        self.on_completions(got)?;
        Ok(!got.is_empty())
    }

    /// Hands completions to the protocol core, then lets it post what has become possible.
    /// Inline up to the posting, which runs out of line with its poster's arrays.
    #[inline]
    fn on_completions(&mut self, got: &[WorkCompletion]) -> NetResult<()> {
        for wc in got {
            if let Err(e) = self.core.on_completion(wc.wr_id) {
                return Err(self.link.proto_error(e));
            }
            if let Some(p) = self.prof.as_deref_mut() {
                let (reqs, n) = self.core.reqs_completed_by(wc.wr_id);
                p.stop(
                    reqs[..n].iter().map(|&i| usize::from(i)),
                    profiler::Key(wc.wr_id),
                );
            }
        }
        if !self.core.wants_progress() {
            return Ok(());
        }
        self.post_progress()
    }

    /// Lets the protocol core post what has become possible (rows that arrived, sends waiting).
    #[inline(never)]
    fn post_progress(&mut self) -> NetResult<()> {
        let fifo = FifoView(self.fifo.ptr());
        let mut out = Poster::new(&self.link.qps, &self.targets, &self.staging, None);
        let r = match self.prof.as_deref_mut() {
            None => self.core.progress_from(fifo, &mut out),
            Some(p) => {
                let mut tap = Tap::new(&mut out);
                let r = self.core.progress_from(fifo, &mut tap);
                tap.start_events(p, &self.link.qps);
                r
            }
        };
        out.finish()
            .map_err(|f| self.link.post_error(f, "RDMA writes"))?;
        self.warn_late_truncation();
        r.map_err(|e| self.link.proto_error(e))
    }

    /// An eager send reported done turned out larger than its receive's buffer: the receive
    /// fails at the peer, and this log line is all the sending side can say about it.
    #[inline]
    fn warn_late_truncation(&mut self) {
        if let Some((size, capacity)) = self.core.take_late_truncation() {
            self.log_late_truncation(size, capacity);
        }
    }

    #[cold]
    fn log_late_truncation(&self, size: u64, capacity: u64) {
        warn!(
            NET,
            "an eager send of {size} bytes to {} was reported done, but its receive offered \
             {capacity} bytes: that receive fails at the peer",
            self.link.peer
        );
    }

    /// `test` of request `req`: its size once done. Runs without the C boundary's panic guard:
    /// see `abi::common::test`.
    #[inline]
    pub(super) fn test(&mut self, req: u16) -> NetResult<Option<u64>> {
        self.own.tests += 1;
        // A request an earlier poll already completed is done, whatever happened since: no
        // poll and no look at the link (a message-rate stream tests each of a batch of
        // completions in turn).
        let mut r = self.core.test(req);
        if matches!(r, Ok(None)) {
            self.link.check()?;
            if self.progress()? {
                r = self.core.test(req);
            }
        }
        if !matches!(r, Ok(None)) {
            if let Some(p) = self.prof.as_deref_mut() {
                contained(|| {
                    p.finish(usize::from(req));
                    Ok(())
                })?;
            }
        }
        r.map_err(|e| self.link.proto_error(e))
    }

    /// What the comm did so far: the core's counters and its own.
    pub fn counters(&self) -> (crate::protocol::Counters, CommCounters) {
        (self.core.counters(), self.own)
    }
}

/// Our FIFO memory, which the NIC writes while we read it.
#[derive(Clone, Copy)]
struct FifoView(*const u8);

impl FifoView {
    fn at(&self, row: usize, i: usize) -> *const CtsEntry {
        debug_assert!(row < FIFO_DEPTH && i < MAX_RECVS);
        // In bounds: the FIFO holds FIFO_DEPTH rows of MAX_RECVS entries.
        self.0.cast::<CtsEntry>().wrapping_add(row * MAX_RECVS + i)
    }
}

impl Fifo for FifoView {
    fn entry(&self, row: usize, i: usize) -> CtsEntry {
        // SAFETY: the entry lies in the FIFO, which lives as long as the comm; the NIC writes it
        // concurrently, hence the volatile read (a torn entry is caught by its stamp and check).
        let e = unsafe { std::ptr::read_volatile(self.at(row, i)) };
        fence(Ordering::Acquire);
        e
    }

    fn stamp(&self, row: usize, i: usize) -> u32 {
        // SAFETY: as in `entry`; one aligned u32 of the entry. No fence: a matching stamp is
        // followed by a full `entry` read, which has one.
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.at(row, i)).stamp)) }
    }
}

impl Drop for SendComm {
    fn drop(&mut self) {
        if let Some(p) = self.prof.as_deref_mut() {
            p.finish_all();
        }
        let (c, own) = self.counters();
        stats::log_close(self.stats, Side::Send, self.link.peer, &c, &own);
    }
}
