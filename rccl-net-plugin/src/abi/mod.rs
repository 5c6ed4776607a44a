//! The C boundary: one thin adapter table per ABI version, all calling the shared functions in
//! this module. Every exported function goes through [`guard`], which catches panics, maps
//! [`NetError`] to `ncclResult_t` in one place and logs why through RCCL's logger.

mod common;
mod v10;
mod v11;
mod v6;
mod v7;
mod v8;
mod v9;

pub use common::PLUGIN_NAME;
pub use v10::ncclNetPlugin_v10;
pub use v11::{ncclNetPlugin_v11, ncclNetPlugin_v12};
pub use v6::ncclNetPlugin_v6;
pub use v7::ncclNetPlugin_v7;
pub use v8::ncclNetPlugin_v8;
pub use v9::ncclNetPlugin_v9;

use crate::log::{warn, NET};
use crate::net::NetError;
use halo_ffi::*;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The single mapping from the plugin's errors to RCCL's result codes.
pub fn result_code(e: &NetError) -> ncclResult_t {
    match e {
        NetError::System(_) => ncclSystemError,
        NetError::Remote(_) => ncclRemoteError,
        NetError::Internal(_) => ncclInternalError,
        NetError::InvalidArgument(_) => ncclInvalidArgument,
        NetError::InvalidUsage(_) => ncclInvalidUsage,
    }
}

thread_local! {
    /// Last error text logged by this thread: a comm that stays failed is reported once, not on
    /// every `test` of the progress loop.
    static LAST_LOGGED: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs one exported call: no panic crosses into C, every error is logged once with its context.
pub fn guard(what: &str, f: impl FnOnce() -> Result<(), NetError>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ncclSuccess,
        Ok(Err(e)) => {
            let text = format!("{what}: {e}");
            let fresh = LAST_LOGGED.with(|l| {
                let mut l = l.borrow_mut();
                if *l == text {
                    false
                } else {
                    l.clone_from(&text);
                    true
                }
            });
            if fresh {
                warn!(NET, "{text}");
            }
            result_code(&e)
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            warn!(NET, "{what}: internal error (panic): {msg}");
            ncclInternalError
        }
    }
}
