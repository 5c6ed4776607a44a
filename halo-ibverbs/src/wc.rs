//! Work completions: what the adapter reports for each finished work request.

use std::ffi::CStr;
use std::fmt;

use rdma_mummy_sys::{ibv_wc, ibv_wc_flags, ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str};

/// Why a work request failed (`enum ibv_wc_status` without `IBV_WC_SUCCESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcError {
    /// A scatter/gather list was too short or too long for the message.
    LocalLengthError,
    /// Internal QP consistency error on the local side.
    LocalQpOperationError,
    /// Local EE context operation error.
    LocalEecOperationError,
    /// The local buffer is not covered by a valid MR with the needed rights.
    LocalProtectionError,
    /// The QP went to the error state; outstanding requests are flushed with this status.
    WorkRequestFlushed,
    /// Memory window bind failed.
    MemoryWindowBindError,
    /// The responder answered with an unexpected transport opcode.
    BadResponse,
    /// Local access violation while serving a remote request.
    LocalAccessError,
    /// The responder found the request invalid (e.g. too long for the posted receive).
    RemoteInvalidRequest,
    /// The responder rejected the rkey, address range or access rights.
    RemoteAccessError,
    /// The responder could not complete the operation.
    RemoteOperationError,
    /// No acknowledgement after all transport retries: the peer is unreachable or gone.
    RetryExceeded,
    /// The peer had no receive posted after all RNR retries.
    RnrRetryExceeded,
    /// Local RDD violation.
    LocalRddViolation,
    /// Invalid remote RD request.
    RemoteInvalidRdRequest,
    /// The remote side aborted the operation.
    RemoteAborted,
    /// Invalid EE context number.
    InvalidEecn,
    /// Invalid EE context state.
    InvalidEecState,
    /// Fatal adapter error.
    Fatal,
    /// Response timeout.
    ResponseTimeout,
    /// Any other error the provider reports generically.
    General,
    /// Tag matching error.
    TagMatchingError,
    /// Tag matching rendezvous incomplete.
    TagMatchingRndvIncomplete,
    /// A status value this crate does not know.
    Unknown(u32),
}

impl WcError {
    #[cold]
    fn from_raw(raw: ibv_wc_status::Type) -> WcError {
        use ibv_wc_status::*;
        match raw {
            IBV_WC_LOC_LEN_ERR => WcError::LocalLengthError,
            IBV_WC_LOC_QP_OP_ERR => WcError::LocalQpOperationError,
            IBV_WC_LOC_EEC_OP_ERR => WcError::LocalEecOperationError,
            IBV_WC_LOC_PROT_ERR => WcError::LocalProtectionError,
            IBV_WC_WR_FLUSH_ERR => WcError::WorkRequestFlushed,
            IBV_WC_MW_BIND_ERR => WcError::MemoryWindowBindError,
            IBV_WC_BAD_RESP_ERR => WcError::BadResponse,
            IBV_WC_LOC_ACCESS_ERR => WcError::LocalAccessError,
            IBV_WC_REM_INV_REQ_ERR => WcError::RemoteInvalidRequest,
            IBV_WC_REM_ACCESS_ERR => WcError::RemoteAccessError,
            IBV_WC_REM_OP_ERR => WcError::RemoteOperationError,
            IBV_WC_RETRY_EXC_ERR => WcError::RetryExceeded,
            IBV_WC_RNR_RETRY_EXC_ERR => WcError::RnrRetryExceeded,
            IBV_WC_LOC_RDD_VIOL_ERR => WcError::LocalRddViolation,
            IBV_WC_REM_INV_RD_REQ_ERR => WcError::RemoteInvalidRdRequest,
            IBV_WC_REM_ABORT_ERR => WcError::RemoteAborted,
            IBV_WC_INV_EECN_ERR => WcError::InvalidEecn,
            IBV_WC_INV_EEC_STATE_ERR => WcError::InvalidEecState,
            IBV_WC_FATAL_ERR => WcError::Fatal,
            IBV_WC_RESP_TIMEOUT_ERR => WcError::ResponseTimeout,
            IBV_WC_GENERAL_ERR => WcError::General,
            IBV_WC_TM_ERR => WcError::TagMatchingError,
            IBV_WC_TM_RNDV_INCOMPLETE => WcError::TagMatchingRndvIncomplete,
            other => WcError::Unknown(other),
        }
    }

    /// The `enum ibv_wc_status` value.
    pub fn to_raw(self) -> u32 {
        use ibv_wc_status::*;
        match self {
            WcError::LocalLengthError => IBV_WC_LOC_LEN_ERR,
            WcError::LocalQpOperationError => IBV_WC_LOC_QP_OP_ERR,
            WcError::LocalEecOperationError => IBV_WC_LOC_EEC_OP_ERR,
            WcError::LocalProtectionError => IBV_WC_LOC_PROT_ERR,
            WcError::WorkRequestFlushed => IBV_WC_WR_FLUSH_ERR,
            WcError::MemoryWindowBindError => IBV_WC_MW_BIND_ERR,
            WcError::BadResponse => IBV_WC_BAD_RESP_ERR,
            WcError::LocalAccessError => IBV_WC_LOC_ACCESS_ERR,
            WcError::RemoteInvalidRequest => IBV_WC_REM_INV_REQ_ERR,
            WcError::RemoteAccessError => IBV_WC_REM_ACCESS_ERR,
            WcError::RemoteOperationError => IBV_WC_REM_OP_ERR,
            WcError::RetryExceeded => IBV_WC_RETRY_EXC_ERR,
            WcError::RnrRetryExceeded => IBV_WC_RNR_RETRY_EXC_ERR,
            WcError::LocalRddViolation => IBV_WC_LOC_RDD_VIOL_ERR,
            WcError::RemoteInvalidRdRequest => IBV_WC_REM_INV_RD_REQ_ERR,
            WcError::RemoteAborted => IBV_WC_REM_ABORT_ERR,
            WcError::InvalidEecn => IBV_WC_INV_EECN_ERR,
            WcError::InvalidEecState => IBV_WC_INV_EEC_STATE_ERR,
            WcError::Fatal => IBV_WC_FATAL_ERR,
            WcError::ResponseTimeout => IBV_WC_RESP_TIMEOUT_ERR,
            WcError::General => IBV_WC_GENERAL_ERR,
            WcError::TagMatchingError => IBV_WC_TM_ERR,
            WcError::TagMatchingRndvIncomplete => IBV_WC_TM_RNDV_INCOMPLETE,
            WcError::Unknown(raw) => raw,
        }
    }

    /// Our own wording, used when libibverbs is not there to ask.
    fn fallback_text(self) -> &'static str {
        match self {
            WcError::LocalLengthError => "local length error",
            WcError::LocalQpOperationError => "local QP operation error",
            WcError::LocalEecOperationError => "local EE context operation error",
            WcError::LocalProtectionError => "local protection error",
            WcError::WorkRequestFlushed => "work request flushed",
            WcError::MemoryWindowBindError => "memory window bind error",
            WcError::BadResponse => "bad response",
            WcError::LocalAccessError => "local access error",
            WcError::RemoteInvalidRequest => "remote invalid request",
            WcError::RemoteAccessError => "remote access error",
            WcError::RemoteOperationError => "remote operation error",
            WcError::RetryExceeded => "transport retry counter exceeded",
            WcError::RnrRetryExceeded => "RNR retry counter exceeded",
            WcError::LocalRddViolation => "local RDD violation",
            WcError::RemoteInvalidRdRequest => "remote invalid RD request",
            WcError::RemoteAborted => "remote aborted",
            WcError::InvalidEecn => "invalid EE context number",
            WcError::InvalidEecState => "invalid EE context state",
            WcError::Fatal => "fatal error",
            WcError::ResponseTimeout => "response timeout",
            WcError::General => "general error",
            WcError::TagMatchingError => "tag matching error",
            WcError::TagMatchingRndvIncomplete => "tag matching rendezvous incomplete",
            WcError::Unknown(_) => "unknown status",
        }
    }
}

impl fmt::Display for WcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: ibv_wc_status_str accepts any value and returns a static string, or NULL when
        // libibverbs is not loaded.
        let text = unsafe { owned_c_str(ibv_wc_status_str(self.to_raw())) };
        match text {
            Some(t) => write!(f, "{t} (status {})", self.to_raw()),
            None => write!(f, "{} (status {})", self.fallback_text(), self.to_raw()),
        }
    }
}

impl std::error::Error for WcError {}

/// Outcome of a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WcStatus {
    /// It completed successfully.
    #[default]
    Success,
    /// It failed.
    Error(WcError),
}

impl WcStatus {
    /// Converts an `enum ibv_wc_status` value.
    #[inline]
    pub fn from_raw(raw: u32) -> WcStatus {
        if raw == ibv_wc_status::IBV_WC_SUCCESS {
            WcStatus::Success
        } else {
            WcStatus::Error(WcError::from_raw(raw))
        }
    }
}

/// Which operation completed. Only meaningful for successful completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WcOpcode {
    /// A SEND (with or without immediate) finished on the sender.
    #[default]
    Send,
    /// An RDMA WRITE (with or without immediate) finished on the requester.
    RdmaWrite,
    /// An RDMA READ finished on the requester.
    RdmaRead,
    /// Compare-and-swap finished.
    CompareSwap,
    /// Fetch-and-add finished.
    FetchAdd,
    /// A receive consumed a SEND.
    Recv,
    /// A receive consumed an RDMA WRITE with immediate.
    RecvRdmaWithImm,
    /// Another opcode.
    Other(u32),
}

impl WcOpcode {
    #[inline]
    fn from_raw(raw: ibv_wc_opcode::Type) -> WcOpcode {
        use ibv_wc_opcode::*;
        match raw {
            IBV_WC_SEND => WcOpcode::Send,
            IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            IBV_WC_COMP_SWAP => WcOpcode::CompareSwap,
            IBV_WC_FETCH_ADD => WcOpcode::FetchAdd,
            IBV_WC_RECV => WcOpcode::Recv,
            IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            other => WcOpcode::Other(other),
        }
    }
}

/// One completion. For failed ones only `wr_id`, `status`, `qp_num` and `vendor_err` are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkCompletion {
    /// The `wr_id` of the work request.
    pub wr_id: u64,
    /// Success or the error.
    pub status: WcStatus,
    /// What completed.
    pub opcode: WcOpcode,
    /// Bytes received (receives and READs).
    pub byte_len: u32,
    /// Immediate data in host byte order, for SEND/WRITE with immediate.
    pub imm: Option<u32>,
    /// Local QP number of the work request.
    pub qp_num: u32,
    /// Provider-specific error detail.
    pub vendor_err: u32,
}

impl WorkCompletion {
    #[inline]
    pub(crate) fn from_raw(wc: &ibv_wc) -> WorkCompletion {
        let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        WorkCompletion {
            wr_id: wc.wr_id,
            status: WcStatus::from_raw(wc.status),
            opcode: WcOpcode::from_raw(wc.opcode),
            byte_len: wc.byte_len,
            // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate (network byte order).
            imm: with_imm
                .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }

    /// `Ok` for a successful completion, the error status otherwise.
    #[inline]
    pub fn result(&self) -> Result<(), WcError> {
        match self.status {
            WcStatus::Success => Ok(()),
            WcStatus::Error(e) => Err(e),
        }
    }
}

/// Converts a NUL-terminated C string owned by libibverbs into an owned string.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string valid for the duration of the call.
unsafe fn owned_c_str(ptr: *const libc::c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips() {
        for raw in 0..=23u32 {
            match WcStatus::from_raw(raw) {
                WcStatus::Success => assert_eq!(raw, 0),
                WcStatus::Error(e) => {
                    assert_eq!(e.to_raw(), raw);
                    assert!(!matches!(e, WcError::Unknown(_)), "status {raw} unnamed");
                }
            }
        }
        assert_eq!(
            WcStatus::from_raw(99),
            WcStatus::Error(WcError::Unknown(99))
        );
    }

    #[test]
    fn well_known_statuses_have_their_names() {
        assert_eq!(
            WcStatus::from_raw(10),
            WcStatus::Error(WcError::RemoteAccessError)
        );
        assert_eq!(
            WcStatus::from_raw(12),
            WcStatus::Error(WcError::RetryExceeded)
        );
        assert_eq!(
            WcStatus::from_raw(5),
            WcStatus::Error(WcError::WorkRequestFlushed)
        );
    }

    #[test]
    fn display_names_the_status() {
        let text = WcError::RemoteAccessError.to_string();
        assert!(text.starts_with("remote access error"), "{text}");
        assert!(text.ends_with("(status 10)"), "{text}");
        let text = WcError::RetryExceeded.to_string();
        assert!(text.contains("retry"), "{text}");
    }
}
