//! Reliable-connected queue pairs and their state transitions (RESET → INIT → RTR → RTS).

use std::mem;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_mummy_sys::{
    ibv_create_qp, ibv_destroy_qp, ibv_modify_qp, ibv_qp, ibv_qp_attr, ibv_qp_attr_mask,
    ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_qp,
};

use crate::cq::CompletionQueue;
use crate::error::{Result, VerbsError};
use crate::gid::Gid;
use crate::mr::AccessFlags;
use crate::pd::{PdInner, ProtectionDomain};
use crate::port::Mtu;

/// Queue sizes of a QP: asked for at creation, and as granted by the device afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpCaps {
    /// Outstanding send-queue work requests.
    pub max_send_wr: u32,
    /// Outstanding receive-queue work requests.
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send work request.
    pub max_send_sge: u32,
    /// Scatter/gather entries per receive work request.
    pub max_recv_sge: u32,
    /// Bytes that can be sent inline (copied into the work request, no MR needed). Granted caps
    /// hold at most what was asked for, whatever the provider rounded it up to.
    pub max_inline_data: u32,
}

/// State of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Just created or reset.
    Reset,
    /// Initialised: receives may be posted.
    Init,
    /// Ready to receive.
    ReadyToReceive,
    /// Ready to send.
    ReadyToSend,
    /// Send queue drained.
    SendQueueDrained,
    /// Send queue error.
    SendQueueError,
    /// Error: outstanding work requests are flushed, nothing new is executed.
    Error,
    /// A state this crate does not know.
    Unknown(u32),
}

impl QpState {
    fn from_raw(raw: ibv_qp_state::Type) -> QpState {
        use ibv_qp_state::*;
        match raw {
            IBV_QPS_RESET => QpState::Reset,
            IBV_QPS_INIT => QpState::Init,
            IBV_QPS_RTR => QpState::ReadyToReceive,
            IBV_QPS_RTS => QpState::ReadyToSend,
            IBV_QPS_SQD => QpState::SendQueueDrained,
            IBV_QPS_SQE => QpState::SendQueueError,
            IBV_QPS_ERR => QpState::Error,
            other => QpState::Unknown(other),
        }
    }
}

/// Largest packet sequence number (PSNs are 24 bits).
pub const MAX_PSN: u32 = 0x00ff_ffff;

/// What the INIT → RTR transition needs to know about the peer and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtrParams {
    /// The peer QP's number.
    pub remote_qpn: u32,
    /// The first PSN the peer will send (its `sq_psn`).
    pub remote_psn: u32,
    /// The peer's GID. Non-zero means a global route (required on RoCE).
    pub remote_gid: Gid,
    /// Index of the local GID to send from.
    pub sgid_index: u32,
    /// Local port number (from 1).
    pub port: u8,
    /// Path MTU: the smaller of the two ports' active MTUs.
    pub path_mtu: Mtu,
    /// IP traffic class (DSCP << 2 | ECN) of the packets (`NCCL_IB_TC`).
    pub traffic_class: u8,
    /// Service level / priority (`NCCL_IB_SL`).
    pub service_level: u8,
    /// IP hop limit.
    pub hop_limit: u8,
    /// RNR NAK timer code the peer waits before retrying when no receive is posted.
    pub min_rnr_timer: u8,
    /// RDMA READs/atomics this QP serves at once for the peer.
    pub max_dest_rd_atomic: u8,
    /// Peer LID on InfiniBand; 0 on RoCE.
    pub dest_lid: u16,
}

impl RtrParams {
    /// Parameters with the usual defaults: traffic class 0, SL 0, hop limit 255, RNR timer 12,
    /// one outstanding READ, no LID.
    pub fn new(
        remote_qpn: u32,
        remote_psn: u32,
        remote_gid: Gid,
        sgid_index: u32,
        port: u8,
        path_mtu: Mtu,
    ) -> RtrParams {
        RtrParams {
            remote_qpn,
            remote_psn,
            remote_gid,
            sgid_index,
            port,
            path_mtu,
            traffic_class: 0,
            service_level: 0,
            hop_limit: 255,
            min_rnr_timer: 12,
            max_dest_rd_atomic: 1,
            dest_lid: 0,
        }
    }

    /// Checks ranges the verbs ABI cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(VerbsError::InvalidArgument(why));
        if self.remote_qpn > MAX_PSN {
            return bad(format!(
                "remote QP number {:#x} exceeds 24 bits",
                self.remote_qpn
            ));
        }
        if self.remote_psn > MAX_PSN {
            return bad(format!("remote PSN {:#x} exceeds 24 bits", self.remote_psn));
        }
        if self.sgid_index > 255 {
            return bad(format!("GID index {} exceeds 255", self.sgid_index));
        }
        if self.min_rnr_timer > 31 {
            return bad(format!("min RNR timer {} exceeds 31", self.min_rnr_timer));
        }
        if self.service_level > 15 {
            return bad(format!("service level {} exceeds 15", self.service_level));
        }
        if self.port == 0 {
            return bad("port numbers start at 1".into());
        }
        if self.remote_gid.is_zero() && self.dest_lid == 0 {
            return bad("neither a remote GID nor a destination LID given".into());
        }
        Ok(())
    }
}

/// What the RTR → RTS transition needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtsParams {
    /// First PSN this QP sends (the peer's `remote_psn`).
    pub sq_psn: u32,
    /// Local ACK timeout code: 4.096 µs × 2^timeout (`NCCL_IB_TIMEOUT`).
    pub timeout: u8,
    /// Transport retries before `RetryExceeded` (`NCCL_IB_RETRY_CNT`).
    pub retry_cnt: u8,
    /// RNR retries before `RnrRetryExceeded`; 7 means forever.
    pub rnr_retry: u8,
    /// RDMA READs/atomics this QP issues at once.
    pub max_rd_atomic: u8,
}

impl RtsParams {
    /// Parameters with the usual defaults: timeout 20, retry 7, RNR retry 7, one outstanding READ.
    pub fn new(sq_psn: u32) -> RtsParams {
        RtsParams {
            sq_psn,
            timeout: 20,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
        }
    }

    /// Checks ranges the verbs ABI cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(VerbsError::InvalidArgument(why));
        if self.sq_psn > MAX_PSN {
            return bad(format!("send PSN {:#x} exceeds 24 bits", self.sq_psn));
        }
        if self.timeout > 31 {
            return bad(format!("ACK timeout {} exceeds 31", self.timeout));
        }
        if self.retry_cnt > 7 {
            return bad(format!("retry count {} exceeds 7", self.retry_cnt));
        }
        if self.rnr_retry > 7 {
            return bad(format!("RNR retry {} exceeds 7", self.rnr_retry));
        }
        Ok(())
    }
}

/// A reliable-connected queue pair. Holds its PD and CQs, so none of them is destroyed before it.
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    caps: QpCaps,
    pd: Arc<PdInner>,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
}

// SAFETY: libibverbs QPs are thread-safe (providers lock their queues); the pointer is freed only
// in Drop, before the PD and CQs it references (which the QP keeps alive).
unsafe impl Send for QueuePair {}
// SAFETY: as above; every method takes &self and maps to a thread-safe verbs call.
unsafe impl Sync for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: qp came from ibv_create_qp and is destroyed exactly once; its PD and CQs are
        // still alive because they are fields dropped after this.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("device", &self.pd.context().name())
            .field("qp_num", &format_args!("{:#x}", self.qp_num()))
            .field("caps", &self.caps)
            .finish()
    }
}

impl ProtectionDomain {
    /// Creates an RC QP in this PD. Completions of sends go to `send_cq`, of receives to
    /// `recv_cq`; both must be on the PD's device. [`QueuePair::caps`] reports what was granted.
    pub fn create_rc_qp(
        &self,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        let ctx = self.context();
        for cq in [send_cq, recv_cq] {
            if cq.context().as_ptr() != ctx.as_ptr() {
                return Err(VerbsError::InvalidArgument(format!(
                    "CQ of {} used for a QP on {}",
                    cq.context().name(),
                    ctx.name()
                )));
            }
        }
        // SAFETY: ibv_qp_init_attr is plain old data for which all-zero bytes are valid.
        let mut init: ibv_qp_init_attr = unsafe { mem::zeroed() };
        init.send_cq = send_cq.as_ptr();
        init.recv_cq = recv_cq.as_ptr();
        init.srq = ptr::null_mut();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = caps.max_send_wr;
        init.cap.max_recv_wr = caps.max_recv_wr;
        init.cap.max_send_sge = caps.max_send_sge;
        init.cap.max_recv_sge = caps.max_recv_sge;
        init.cap.max_inline_data = caps.max_inline_data;
        // SAFETY: the PD and CQs are alive and on the same device; init is fully initialised.
        let qp = unsafe { ibv_create_qp(self.inner.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| {
            VerbsError::last_os("ibv_create_qp(RC)", || format!("{} ({caps:?})", ctx.name()))
        })?;
        // ibv_create_qp writes the granted sizes back into init.cap. Inline room is kept to what
        // was asked for: providers round it up (Soft-RoCE grants 32 bytes when asked for none),
        // and a caller that asked for none must not find its small sends going inline.
        let granted = QpCaps {
            max_send_wr: init.cap.max_send_wr,
            max_recv_wr: init.cap.max_recv_wr,
            max_send_sge: init.cap.max_send_sge,
            max_recv_sge: init.cap.max_recv_sge,
            max_inline_data: init.cap.max_inline_data.min(caps.max_inline_data),
        };
        Ok(QueuePair {
            qp,
            caps: granted,
            pd: Arc::clone(&self.inner),
            send_cq: send_cq.clone(),
            recv_cq: recv_cq.clone(),
        })
    }
}

impl QueuePair {
    pub(crate) fn as_ptr(&self) -> *mut ibv_qp {
        self.qp.as_ptr()
    }

    /// The QP number the peer addresses.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: qp stays valid until Drop; qp_num is fixed at creation.
        unsafe { self.qp.as_ref() }.qp_num
    }

    /// The queue sizes the device granted.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The CQ send completions go to.
    pub fn send_cq(&self) -> &CompletionQueue {
        &self.send_cq
    }

    /// The CQ receive completions go to.
    pub fn recv_cq(&self) -> &CompletionQueue {
        &self.recv_cq
    }

    pub(crate) fn describe(&self) -> String {
        format!("{} qp {:#x}", self.pd.context().name(), self.qp_num())
    }

    /// The current state, as the device sees it (it moves to `Error` on its own after a failed
    /// work request).
    pub fn state(&self) -> Result<QpState> {
        // SAFETY: both structures are plain old data for which all-zero bytes are valid.
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut init: ibv_qp_init_attr = unsafe { mem::zeroed() };
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0 as libc::c_int;
        // SAFETY: the QP is alive and both out-pointers are valid.
        let ret = unsafe { ibv_query_qp(self.as_ptr(), &mut attr, mask, &mut init) };
        if ret != 0 {
            return Err(VerbsError::from_ret("ibv_query_qp", self.describe(), ret));
        }
        Ok(QpState::from_raw(attr.qp_state))
    }

    fn modify(
        &self,
        op: &'static str,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
    ) -> Result<()> {
        // SAFETY: the QP is alive; attr is initialised for every field named in mask.
        let ret = unsafe { ibv_modify_qp(self.as_ptr(), attr, mask.0 as libc::c_int) };
        if ret != 0 {
            return Err(VerbsError::from_ret(op, self.describe(), ret));
        }
        Ok(())
    }

    /// RESET → INIT on `port`, allowing the peer the remote operations in `access`.
    pub fn to_init(&self, port: u8, access: AccessFlags) -> Result<()> {
        // SAFETY: plain old data; all-zero bytes are valid.
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = access.intersection(AccessFlags::QP_MASK).bits();
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS;
        self.modify("ibv_modify_qp(INIT)", &mut attr, mask)
    }

    /// INIT → RTR: connect the receive side to the peer.
    pub fn to_rtr(&self, p: &RtrParams) -> Result<()> {
        p.validate()?;
        // SAFETY: plain old data; all-zero bytes are valid.
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = p.path_mtu.to_raw();
        attr.dest_qp_num = p.remote_qpn;
        attr.rq_psn = p.remote_psn;
        attr.max_dest_rd_atomic = p.max_dest_rd_atomic;
        attr.min_rnr_timer = p.min_rnr_timer;
        attr.ah_attr.dlid = p.dest_lid;
        attr.ah_attr.sl = p.service_level;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = p.port;
        if !p.remote_gid.is_zero() {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = p.remote_gid.0;
            attr.ah_attr.grh.flow_label = 0;
            attr.ah_attr.grh.sgid_index = p.sgid_index as u8;
            attr.ah_attr.grh.hop_limit = p.hop_limit;
            attr.ah_attr.grh.traffic_class = p.traffic_class;
        }
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify("ibv_modify_qp(RTR)", &mut attr, mask)
    }

    /// RTR → RTS: enable the send side.
    pub fn to_rts(&self, p: &RtsParams) -> Result<()> {
        p.validate()?;
        // SAFETY: plain old data; all-zero bytes are valid.
        let mut attr: ibv_qp_attr = unsafe { mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.sq_psn = p.sq_psn;
        attr.timeout = p.timeout;
        attr.retry_cnt = p.retry_cnt;
        attr.rnr_retry = p.rnr_retry;
        attr.max_rd_atomic = p.max_rd_atomic;
        use ibv_qp_attr_mask as m;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify("ibv_modify_qp(RTS)", &mut attr, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtr() -> RtrParams {
        RtrParams::new(
            0x11,
            0x1234,
            Gid::from_ip("::ffff:127.0.0.1".parse().unwrap()),
            1,
            1,
            Mtu::Mtu1024,
        )
    }

    #[test]
    fn rtr_defaults_match_nccl() {
        let p = rtr();
        assert_eq!(
            (p.hop_limit, p.min_rnr_timer, p.max_dest_rd_atomic),
            (255, 12, 1)
        );
        assert!(p.validate().is_ok());
    }

    #[test]
    fn rtr_rejects_out_of_range_values() {
        let cases: [fn(&mut RtrParams); 6] = [
            |p| p.remote_psn = 1 << 24,
            |p| p.remote_qpn = 1 << 24,
            |p| p.sgid_index = 256,
            |p| p.min_rnr_timer = 32,
            |p| p.port = 0,
            |p| p.remote_gid = Gid::ZERO,
        ];
        for (i, break_it) in cases.iter().enumerate() {
            let mut p = rtr();
            break_it(&mut p);
            assert!(
                matches!(p.validate(), Err(VerbsError::InvalidArgument(_))),
                "case {i} accepted"
            );
        }
        let mut ib = rtr();
        ib.remote_gid = Gid::ZERO;
        ib.dest_lid = 7;
        assert!(
            ib.validate().is_ok(),
            "LID-only route is valid on InfiniBand"
        );
    }

    #[test]
    fn rts_defaults_and_ranges() {
        let p = RtsParams::new(0x42);
        assert_eq!(
            (p.timeout, p.retry_cnt, p.rnr_retry, p.max_rd_atomic),
            (20, 7, 7, 1)
        );
        assert!(p.validate().is_ok());
        for bad in [
            RtsParams {
                sq_psn: 1 << 24,
                ..p.clone()
            },
            RtsParams {
                timeout: 32,
                ..p.clone()
            },
            RtsParams {
                retry_cnt: 8,
                ..p.clone()
            },
            RtsParams {
                rnr_retry: 8,
                ..p.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn qp_states_decode() {
        assert_eq!(QpState::from_raw(3), QpState::ReadyToSend);
        assert_eq!(QpState::from_raw(6), QpState::Error);
        assert_eq!(QpState::from_raw(42), QpState::Unknown(42));
    }
}
