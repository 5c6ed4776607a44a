//! What both ends of a connection share: the queue pairs, their completion queue, the bootstrap
//! socket (kept open as a liveness signal) and the first error, which every later call reports.

use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::poster::PostFailure;
use crate::log::{warn, NET};
use crate::oob::{OobError, OobStream};
use crate::protocol::ProtoError;
use halo_ibverbs::{CompletionQueue, QueuePair, WorkCompletion};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;

/// Completions taken per poll.
pub const POLL_BATCH: usize = 16;
/// Fruitless polls between two checks that the peer's bootstrap socket is still open.
const LIVENESS_EVERY: u32 = 1 << 12;

pub struct Link {
    pub dev: Arc<NetDevice>,
    /// QP 0 carries everything but spread data; QPs 1.. only data (`NCCL_IB_QPS_PER_CONNECTION`).
    pub qps: Vec<QueuePair>,
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
        qps: Vec<QueuePair>,
        cq: CompletionQueue,
        peer: SocketAddr,
        oob: OobStream,
    ) -> Self {
        assert!(!qps.is_empty(), "a link has at least one queue pair");
        Link {
            dev,
            qps,
            cq,
            peer,
            oob,
            error: None,
            idle_polls: 0,
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

    /// The comm's error, if it has failed.
    pub fn check(&self) -> NetResult<()> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
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

    /// Polls completions into `wcs`; a failed completion fails the comm.
    pub fn poll<'w>(
        &mut self,
        wcs: &'w mut [MaybeUninit<WorkCompletion>; POLL_BATCH],
    ) -> NetResult<&'w [WorkCompletion]> {
        let got = match self.cq.poll_into(wcs) {
            Ok(got) => got,
            Err(e) => {
                return Err(
                    self.fail_with(NetError::System, format_args!("polling completions: {e}"))
                )
            }
        };
        for wc in got {
            if let Err(e) = wc.result() {
                return Err(self.fail_with(
                    NetError::Remote,
                    format_args!(
                        "work request {:#x} failed: {e} (vendor error {:#x})",
                        wc.wr_id, wc.vendor_err
                    ),
                ));
            }
        }
        if got.is_empty() {
            self.idle_tick()?;
        } else {
            self.idle_polls = 0;
        }
        Ok(got)
    }

    /// Counts a call that made no progress; every so often checks that the peer is still there.
    pub fn idle_tick(&mut self) -> NetResult<()> {
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
