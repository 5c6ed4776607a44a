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

use crate::log::{info, warn, NET};
use crate::net::NetError;
use halo_ffi::*;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The single mapping from the plugin's errors to RCCL's result codes.
pub fn result_code(e: &NetError) -> ncclResult_t {
    match e {
        NetError::System(_) | NetError::Unavailable(_) => ncclSystemError,
        NetError::Remote(_) => ncclRemoteError,
        NetError::Internal(_) => ncclInternalError,
        NetError::InvalidArgument(_) => ncclInvalidArgument,
        NetError::InvalidUsage(_) => ncclInvalidUsage,
    }
}

thread_local! {
    /// Hash of the last error text logged by this thread: a comm that stays failed is reported
    /// once, not on every `test` of the progress loop. A plain integer on purpose: a thread-local
    /// that needs dropping (a `String`) registers a destructor with the C runtime, which keeps
    /// the library mapped after RCCL's `dlclose` for as long as the thread lives.
    static LAST_LOGGED: Cell<u64> = const { Cell::new(0) };
}

/// FNV-1a of `text` (never 0, the "nothing logged yet" value).
fn text_hash(text: &str) -> u64 {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h | 1
}

/// Runs one exported call: no panic crosses into C, every error is logged once with its context.
#[inline]
pub fn guard(what: &str, f: impl FnOnce() -> Result<(), NetError>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ncclSuccess,
        Ok(Err(e)) => report(what, &e),
        Err(panic) => {
            let msg = crate::net::panic_text(panic.as_ref());
            warn!(NET, "{what}: internal error (panic): {msg}");
            ncclInternalError
        }
    }
}

/// The result code of a failed call `what`, its error logged once (a comm that stays failed is
/// reported once, not on every `test` of the progress loop).
#[cold]
pub fn report(what: &str, e: &NetError) -> ncclResult_t {
    let text = format!("{what}: {e}");
    let h = text_hash(&text);
    if LAST_LOGGED.with(|l| l.replace(h)) != h {
        match e {
            NetError::Unavailable(_) => info!(NET, "{text}"),
            _ => warn!(NET, "{text}"),
        }
    }
    result_code(e)
}
