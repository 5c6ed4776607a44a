//! Errors of the verbs layer. Every message names the operation that failed and the object it
//! failed on (device, port, QP number, work request), because users read them in RCCL's log.

use std::ffi::CStr;
use std::fmt;

use crate::wc::{WcError, WorkCompletion};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, VerbsError>;

/// Everything that can go wrong in the verbs layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerbsError {
    /// `libibverbs.so.1` could not be loaded, so no verbs call can be made.
    LibraryUnavailable,
    /// libibverbs is loaded but reports no RDMA device.
    NoDevice,
    /// No RDMA device has this name.
    DeviceNotFound(String),
    /// A verbs or system call failed with an errno value.
    Os {
        /// The call that failed, e.g. `ibv_modify_qp(RTR)`.
        op: &'static str,
        /// The object it was called on, e.g. `rxe0 port 1` or `rxe0 qp 0x11`.
        on: String,
        /// The errno value reported by the call.
        errno: i32,
    },
    /// `ibv_post_send`/`ibv_post_recv` refused a work request of a batch.
    Post {
        /// `ibv_post_send` or `ibv_post_recv`.
        op: &'static str,
        /// The QP the batch was posted on.
        qp_num: u32,
        /// Index in the caller's slice of the first work request that was not posted;
        /// the ones before it were posted and will complete.
        wr_index: usize,
        /// The errno value reported by the provider.
        errno: i32,
    },
    /// The caller passed something the verbs layer cannot accept.
    InvalidArgument(String),
    /// A work completion came back with an error status.
    Completion {
        /// The error status.
        error: WcError,
        /// The `wr_id` of the failed work request.
        wr_id: u64,
        /// The QP the work request was posted on.
        qp_num: u32,
        /// Provider-specific detail of the error.
        vendor_err: u32,
    },
}

impl VerbsError {
    /// Builds an [`VerbsError::Os`] from a return code following the verbs conventions: a positive
    /// value is the errno itself, a negative one means "see errno".
    pub(crate) fn from_ret(op: &'static str, on: impl Into<String>, ret: i32) -> Self {
        // Read errno before `on` is converted, which may allocate.
        let errno = if ret > 0 { ret } else { last_errno_or(-ret) };
        VerbsError::Os {
            op,
            on: on.into(),
            errno,
        }
    }

    /// Builds an [`VerbsError::Os`] from the current errno, for calls that return NULL on failure.
    /// errno is read before `on` runs, because building the text may allocate and clobber it.
    pub(crate) fn last_os<S: Into<String>>(op: &'static str, on: impl FnOnce() -> S) -> Self {
        let errno = last_errno_or(libc::EIO);
        VerbsError::Os {
            op,
            on: on().into(),
            errno,
        }
    }

    /// The errno value carried by this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VerbsError::Os { errno, .. } | VerbsError::Post { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The current errno, or `fallback` when a failing call left errno at 0.
fn last_errno_or(fallback: i32) -> i32 {
    match std::io::Error::last_os_error().raw_os_error() {
        Some(e) if e != 0 => e,
        _ => fallback,
    }
}

/// The C library's text for an errno value.
pub(crate) fn strerror(errno: i32) -> String {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: buf is writable for its full length and the XSI strerror_r that libc binds
    // NUL-terminates within it on success.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("unknown error {errno}");
    }
    // SAFETY: strerror_r succeeded, so buf holds a NUL-terminated string.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl fmt::Display for VerbsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerbsError::LibraryUnavailable => write!(
                f,
                "libibverbs.so.1 could not be loaded (install rdma-core/libibverbs1 to use RDMA)"
            ),
            VerbsError::NoDevice => write!(f, "libibverbs found no RDMA device"),
            VerbsError::DeviceNotFound(name) => write!(f, "no RDMA device named '{name}'"),
            VerbsError::Os { op, on, errno } => {
                write!(f, "{op} on {on} failed: {} (errno {errno})", strerror(*errno))
            }
            VerbsError::Post {
                op,
                qp_num,
                wr_index,
                errno,
            } => write!(
                f,
                "{op} on qp {qp_num:#x} failed at work request {wr_index} of the batch: {} (errno {errno})",
                strerror(*errno)
            ),
            VerbsError::InvalidArgument(why) => write!(f, "invalid argument: {why}"),
            VerbsError::Completion {
                error,
                wr_id,
                qp_num,
                vendor_err,
            } => write!(
                f,
                "work request {wr_id:#x} on qp {qp_num:#x} completed with error: {error} (vendor error {vendor_err:#x})"
            ),
        }
    }
}

impl std::error::Error for VerbsError {}

// The completion type knows nothing of this crate's error type, so that `wc` stays below
// `error` in the module graph; the conversion that needs both lives here.
impl WorkCompletion {
    /// Like [`WorkCompletion::result`], with the work request and QP in the error.
    pub fn check(&self) -> Result<()> {
        self.result().map_err(|error| VerbsError::Completion {
            error,
            wr_id: self.wr_id,
            qp_num: self.qp_num,
            vendor_err: self.vendor_err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wc::WcStatus;

    #[test]
    fn os_error_names_call_object_and_errno_text() {
        let e = VerbsError::Os {
            op: "ibv_modify_qp(RTR)",
            on: "rxe0 qp 0x11".into(),
            errno: libc::ENETUNREACH,
        };
        assert_eq!(
            e.to_string(),
            "ibv_modify_qp(RTR) on rxe0 qp 0x11 failed: Network is unreachable (errno 101)"
        );
        assert_eq!(e.errno(), Some(libc::ENETUNREACH));
    }

    #[test]
    fn post_error_names_the_failed_work_request() {
        let e = VerbsError::Post {
            op: "ibv_post_send",
            qp_num: 0x12,
            wr_index: 3,
            errno: libc::ENOMEM,
        };
        assert_eq!(
            e.to_string(),
            "ibv_post_send on qp 0x12 failed at work request 3 of the batch: Cannot allocate memory (errno 12)"
        );
    }

    #[test]
    fn completion_error_names_status_and_work_request() {
        let e = VerbsError::Completion {
            error: WcError::RemoteAccessError,
            wr_id: 7,
            qp_num: 0x13,
            vendor_err: 0,
        };
        let text = e.to_string();
        assert!(
            text.starts_with(
                "work request 0x7 on qp 0x13 completed with error: remote access error"
            ),
            "{text}"
        );
    }

    #[test]
    fn simple_errors_say_what_is_missing() {
        assert!(VerbsError::LibraryUnavailable
            .to_string()
            .contains("libibverbs.so.1"));
        assert_eq!(
            VerbsError::DeviceNotFound("mlx5_9".into()).to_string(),
            "no RDMA device named 'mlx5_9'"
        );
        assert_eq!(
            VerbsError::NoDevice.to_string(),
            "libibverbs found no RDMA device"
        );
        assert_eq!(
            VerbsError::InvalidArgument("17 work requests, at most 16".into()).to_string(),
            "invalid argument: 17 work requests, at most 16"
        );
    }

    #[test]
    fn from_ret_prefers_positive_return_code() {
        let e = VerbsError::from_ret("ibv_dealloc_pd", "rxe0", libc::EBUSY);
        assert_eq!(e.errno(), Some(libc::EBUSY));
    }

    #[test]
    fn check_carries_work_request_context() {
        let wc = WorkCompletion {
            wr_id: 42,
            status: WcStatus::Error(WcError::RemoteAccessError),
            qp_num: 0x99,
            ..WorkCompletion::default()
        };
        assert_eq!(wc.result(), Err(WcError::RemoteAccessError));
        match wc.check() {
            Err(VerbsError::Completion {
                error,
                wr_id,
                qp_num,
                ..
            }) => {
                assert_eq!(
                    (error, wr_id, qp_num),
                    (WcError::RemoteAccessError, 42, 0x99)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(WorkCompletion::default().check().is_ok());
    }
}
