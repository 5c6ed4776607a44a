//! The one error type of the plugin; `abi` maps it to `ncclResult_t` in one place.

use std::fmt;

/// What went wrong, with the context a user needs in RCCL's log (device, peer, QP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// A system or device call failed (`ncclSystemError`).
    System(String),
    /// This host has no RDMA stack or device at all (`ncclSystemError`, so RCCL falls back to
    /// its own transports). Not a fault: logged at INFO, as RCCL's IB transport does.
    Unavailable(String),
    /// The peer failed or vanished, or a completion reported an error (`ncclRemoteError`).
    Remote(String),
    /// A bug or a broken invariant inside the plugin (`ncclInternalError`).
    Internal(String),
    /// An argument from the caller is invalid (`ncclInvalidArgument`).
    InvalidArgument(String),
    /// The caller used the API in a way it does not allow (`ncclInvalidUsage`).
    InvalidUsage(String),
}

impl NetError {
    pub fn message(&self) -> &str {
        match self {
            NetError::System(s)
            | NetError::Unavailable(s)
            | NetError::Remote(s)
            | NetError::Internal(s)
            | NetError::InvalidArgument(s)
            | NetError::InvalidUsage(s) => s,
        }
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for NetError {}

pub type NetResult<T> = Result<T, NetError>;
