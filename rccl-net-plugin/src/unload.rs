//! The library's destructor: what `dlclose` releases.
//!
//! The destructor runs when the library is unloaded by `dlclose` and also at process exit.
//! At exit nothing is released: other threads (RCCL's proxies) may still be inside the plugin,
//! runtimes it uses may already be finalized, and the kernel reclaims everything anyway. The two
//! are told apart by a handler registered with `__cxa_atexit` for this library: `exit` runs such
//! handlers before any library destructor, while `dlclose` runs this library's destructors
//! (`.fini_array`, last to first) before the C runtime's entry, which runs the handlers.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

static EXITING: AtomicBool = AtomicBool::new(false);

extern "C" {
    /// This object's handle for `__cxa_atexit` (defined by the C runtime's start files).
    static __dso_handle: u8;
    fn __cxa_atexit(f: extern "C" fn(*mut c_void), arg: *mut c_void, dso: *const u8) -> i32;
}

extern "C" fn mark_exiting(_: *mut c_void) {
    EXITING.store(true, Ordering::SeqCst);
}

extern "C" fn on_load() {
    // SAFETY: registers a handler of this object (it is removed when the object is unloaded);
    // `__dso_handle` is only taken by address.
    unsafe { __cxa_atexit(mark_exiting, std::ptr::null_mut(), &raw const __dso_handle) };
}

extern "C" fn on_unload() {
    if !EXITING.load(Ordering::SeqCst) {
        unload();
    }
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

#[used]
#[link_section = ".fini_array"]
static ON_UNLOAD: extern "C" fn() = on_unload;

/// Releases everything the plugin holds: the state of `init` (devices, protection domains,
/// pending connections; comms and registrations RCCL still holds keep their own device alive),
/// and the ROCm runtime's references. Called by the library's destructor on `dlclose`, when no
/// exported function runs any more.
fn unload() {
    crate::net::release_all();
    // SAFETY: the library is being unloaded: no exported function runs any more.
    unsafe { crate::gpu::unload_runtime() };
    crate::log::set_logger(None);
    crate::net::profiler::set_callback(None);
}
