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

/// Runs `f`, turning a panic into [`NetError::Internal`]: for the parts of a call that runs
/// without the C boundary's panic guard (`test`) and do more than loads, stores and a poll.
#[inline]
pub fn contained<T>(f: impl FnOnce() -> NetResult<T>) -> NetResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(NetError::Internal(format!(
            "internal error (panic): {}",
            panic_text(p.as_ref())
        )))
    })
}

/// The message of a panic's payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_contained_part_becomes_an_internal_error() {
        let r: NetResult<()> = contained(|| panic!("broken invariant {}", 7));
        assert_eq!(
            r,
            Err(NetError::Internal(
                "internal error (panic): broken invariant 7".into()
            ))
        );
        assert_eq!(contained(|| Ok(3)), Ok(3));
    }
}
