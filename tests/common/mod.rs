//! Helpers shared by the root package's tests.
#![allow(dead_code)]

use halo_ffi::ncclDebugLogger_t;
use std::ffi::{c_char, c_int, c_ulong, CStr};

/// Prints the plugin's log lines to stderr. The plugin always calls its logger with the format
/// `"%s"` and exactly one string argument; on x86-64 and aarch64 Linux a variadic pointer
/// argument is passed like a named one, so this fixed-signature function receives it correctly.
extern "C" fn stderr_logger(
    level: c_int,
    _flags: c_ulong,
    file: *const c_char,
    line: c_int,
    _fmt: *const c_char,
    msg: *const c_char,
) {
    // SAFETY: the plugin passes NUL-terminated strings.
    let (file, msg) = unsafe {
        (
            CStr::from_ptr(file).to_string_lossy(),
            CStr::from_ptr(msg).to_string_lossy(),
        )
    };
    eprintln!("[log {level}] {file}:{line} {msg}");
}

/// The logger to hand to the plugin's `init`.
pub fn logger() -> ncclDebugLogger_t {
    type Fixed = extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, *const c_char);
    // SAFETY: see `stderr_logger`: the one call shape the plugin uses is ABI-compatible.
    Some(unsafe {
        std::mem::transmute::<
            Fixed,
            unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...),
        >(stderr_logger as Fixed)
    })
}
