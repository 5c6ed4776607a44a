//! What both ends of a connection share: the queue pairs, their completion queue, the bootstrap
//! socket (kept open as a liveness signal), the alarm its device's async events raise, and the
//! first error, which every later call reports.

use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::events::{CommAlarm, Watched};
use super::poster::PostFailure;
use crate::log::{warn, NET};
use crate::oob::{OobError, OobStream};
use crate::protocol::ProtoError;
use halo_ibverbs::{CompletionQueue, CqId, QueuePair, VerbsError, WcError, WorkCompletion};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;

/// Completions taken per poll.
pub const POLL_BATCH: usize = 16;
/// Fruitless polls between two checks that the peer's bootstrap socket is still open.
const LIVENESS_EVERY: u32 = 1 << 12;
/// Calls without progress between two looks at the clock for the device's async events (a
/// polling loop makes millions of them; the events are read at most every `POLL_EVERY_MS`).
const EVENTS_EVERY: u32 = 16;

pub struct Link {
    pub dev: Arc<NetDevice>,
    /// QP 0 carries everything but spread data; QPs 1.. only data (`NCCL_IB_QPS_PER_CONNECTION`).
    pub qps: Vec<QueuePair>,
    pub cq: CompletionQueue,
    pub peer: SocketAddr,
    pub oob: OobStream,
    /// First error seen; every later call reports it.
    pub error: Option<NetError>,
    /// Raised by an async event of the device that breaks this connection.
    alarm: Arc<CommAlarm>,
    idle_polls: u32,
    /// Calls without progress, never reset (paces the async event reads).
    idle_ticks: u32,
}

impl Link {
    /// `also`: one more QP and its CQ the comm owns (the flush QP), watched for events too.
    pub fn new(
        dev: Arc<NetDevice>,
        qps: Vec<QueuePair>,
        cq: CompletionQueue,
        peer: SocketAddr,
        oob: OobStream,
        also: Option<(u32, CqId)>,
    ) -> Self {
        assert!(!qps.is_empty(), "a link has at least one queue pair");
        let mut watched = Watched {
            port: dev.port,
            gid_index: dev.gid.index,
            gid: dev.gid.gid,
            qps: qps.iter().map(QueuePair::qp_num).collect(),
            cqs: vec![cq.id()],
        };
        if let Some((qp, cq)) = also {
            watched.qps.push(qp);
            watched.cqs.push(cq);
        }
        let alarm = CommAlarm::new(watched);
        dev.events.register(&alarm);
        Link {
            dev,
            qps,
            cq,
            peer,
            oob,
            error: None,
            alarm,
            idle_polls: 0,
            idle_ticks: 0,
        }
    }

    /// Device, QP and peer, for messages.
    pub fn context(&self) -> String {
        format!(
            "{} qp {:#x} peer {}",
            self.dev.describe(),
            self.qps[0].qp_num(),
            self.peer
        )
    }

    /// Records `e` as the comm's error (logged once) and returns it.
    pub fn fail(&mut self, e: NetError) -> NetError {
        if self.error.is_none() {
            warn!(NET, "{e}");
            self.error = Some(e.clone());
        }
        e
    }

    /// Fails the comm with `kind` of "`what` (context)".
    pub fn fail_with(
        &mut self,
        kind: fn(String) -> NetError,
        what: impl std::fmt::Display,
    ) -> NetError {
        let e = kind(format!("{what} ({})", self.context()));
        self.fail(e)
    }

    /// The comm's error, if it has failed. In the common case one load and two compares.
    #[inline]
    pub fn check(&mut self) -> NetResult<()> {
        if self.error.is_none() && !self.alarm.is_raised() {
            return Ok(());
        }
        Err(self.failure())
    }

    /// The recorded error, or the fault an async event raised (logged already by the event's
    /// dispatcher, which names the event; here it only gains the comm's context).
    #[cold]
    fn failure(&mut self) -> NetError {
        if let Some(e) = &self.error {
            return e.clone();
        }
        let e = match self.alarm.fault() {
            Some(f) => {
                let text = format!("{f} ({})", self.context());
                match f {
                    NetError::System(_) => NetError::System(text),
                    _ => NetError::Remote(text),
                }
            }
            None => {
                NetError::Internal(format!("alarm raised without a fault ({})", self.context()))
            }
        };
        self.error = Some(e.clone());
        e
    }

    /// Maps a protocol refusal: a truncated message fails its request only; anything else
    /// fails the comm.
    pub fn proto_error(&mut self, e: ProtoError) -> NetError {
        match e {
            ProtoError::Truncated { .. } | ProtoError::TruncatedByPeer { .. } => {
                NetError::InvalidUsage(format!("{e} ({})", self.context()))
            }
            ProtoError::InvalidUsage(_) => self.fail_with(NetError::InvalidUsage, e),
            ProtoError::Protocol(_) => self.fail_with(NetError::Remote, e),
        }
    }

    /// A failed post fails the comm.
    pub fn post_error(&mut self, f: PostFailure, what: &str) -> NetError {
        self.fail_with(
            NetError::System,
            format_args!("posting {what} on QP {}: {}", f.qp, f.err),
        )
    }

    /// Polls completions into `wcs`; a failed completion fails the comm. Inlined: a poll that
    /// finds nothing is the most frequent call of the data path.
    #[inline(always)]
    pub fn poll<'w>(
        &mut self,
        wcs: &'w mut [MaybeUninit<WorkCompletion>; POLL_BATCH],
    ) -> NetResult<&'w [WorkCompletion]> {
        let got = match self.cq.poll_batch(wcs) {
            Ok(got) => got,
            Err(e) => return Err(self.poll_failed(e)),
        };
        for wc in got {
            if let Err(e) = wc.result() {
                return Err(self.completion_failed(wc, e));
            }
        }
        if got.is_empty() {
            self.idle_tick()?;
        } else {
            self.idle_polls = 0;
        }
        Ok(got)
    }

    #[cold]
    #[inline(never)]
    fn poll_failed(&mut self, e: VerbsError) -> NetError {
        self.fail_with(NetError::System, format_args!("polling completions: {e}"))
    }

    #[cold]
    #[inline(never)]
    fn completion_failed(&mut self, wc: &WorkCompletion, e: WcError) -> NetError {
        self.fail_with(
            NetError::Remote,
            format_args!(
                "work request {:#x} failed: {e} (vendor error {:#x})",
                wc.wr_id, wc.vendor_err
            ),
        )
    }

    /// Counts a call that made no progress: reads the device's async events when due, and every
    /// so often checks that the peer is still there.
    #[inline]
    pub fn idle_tick(&mut self) -> NetResult<()> {
        self.idle_ticks = self.idle_ticks.wrapping_add(1);
        self.idle_polls += 1;
        if self.idle_ticks.is_multiple_of(EVENTS_EVERY) || self.idle_polls >= LIVENESS_EVERY {
            return self.idle_checks();
        }
        Ok(())
    }

    /// The checks [`Self::idle_tick`] makes every so often.
    #[cold]
    fn idle_checks(&mut self) -> NetResult<()> {
        // Part of `test`, which runs without the C boundary's panic guard.
        super::error::contained(|| self.idle_checks_now())
    }

    fn idle_checks_now(&mut self) -> NetResult<()> {
        if self.idle_ticks.is_multiple_of(EVENTS_EVERY) {
            self.dev.events.poll_if_due();
            self.check()?;
        }
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
            Ok(Some(_)) => Err(self.fail_with(
                NetError::Remote,
                "unexpected bootstrap message from the peer",
            )),
            Err(e @ OobError::PeerClosed { .. }) => Err(self.fail_with(
                NetError::Remote,
                format_args!("the peer went away with requests in flight: {e}"),
            )),
            Err(e) => Err(self.fail_with(NetError::Remote, format_args!("bootstrap socket: {e}"))),
        }
    }
}
