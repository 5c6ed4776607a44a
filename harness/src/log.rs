//! The host side of the plugin's logger: one shim that turns the plugin's variadic
//! `ncclDebugLogger_t` calls into calls of a Rust [`LogSink`].
//!
//! The plugin always logs with the format `"%s"` and exactly one string argument. On x86-64 and
//! aarch64 Linux a variadic pointer argument is passed like a named one, so a fixed-signature
//! function with that string as its last parameter receives it correctly; [`logger`] is the one
//! place that relies on this.

use halo_ffi::ncclDebugLogger_t;
use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_ulong, CStr};

/// Where the plugin's log lines go.
pub trait LogSink {
    /// One log line: its level (1 = warning, 2 = info, …), source file and line, and message.
    fn line(level: c_int, file: &str, line: c_int, msg: &str);
}

/// The logger to hand to the plugin's `init`, calling `S` for every line.
pub fn logger<S: LogSink>() -> ncclDebugLogger_t {
    type Fixed = extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, *const c_char);
    // SAFETY: see the module documentation: the one call shape the plugin uses is ABI-compatible.
    Some(unsafe {
        std::mem::transmute::<
            Fixed,
            unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...),
        >(shim::<S> as Fixed)
    })
}

extern "C" fn shim<S: LogSink>(
    level: c_int,
    _flags: c_ulong,
    file: *const c_char,
    line: c_int,
    _fmt: *const c_char,
    msg: *const c_char,
) {
    S::line(level, &text(file), line, &text(msg));
}

fn text<'a>(p: *const c_char) -> Cow<'a, str> {
    if p.is_null() {
        Cow::Borrowed("")
    } else {
        // SAFETY: the plugin passes NUL-terminated strings that outlive the call.
        unsafe { CStr::from_ptr(p) }.to_string_lossy()
    }
}

/// Every line on stderr: `[log <level>] <file>:<line> <message>`.
pub struct Stderr;

impl LogSink for Stderr {
    fn line(level: c_int, file: &str, line: c_int, msg: &str) {
        eprintln!("[log {level}] {file}:{line} {msg}");
    }
}

/// Warnings on stderr, and info lines under `NCCL_DEBUG=INFO|TRACE` (as RCCL's core does), each
/// tagged with the process id: `[pid <pid> log <level>] <file>:<line> <message>`.
pub struct Quiet;

impl LogSink for Quiet {
    fn line(level: c_int, file: &str, line: c_int, msg: &str) {
        let verbose = matches!(std::env::var("NCCL_DEBUG").as_deref(), Ok("INFO" | "TRACE"));
        if level > 2 && !verbose {
            return;
        }
        eprintln!(
            "[pid {} log {level}] {file}:{line} {msg}",
            std::process::id()
        );
    }
}

/// A logger writing every line to stderr ([`Stderr`]).
pub fn stderr_logger() -> ncclDebugLogger_t {
    logger::<Stderr>()
}

/// A logger for warnings, and info lines when asked for ([`Quiet`]).
pub fn quiet_logger() -> ncclDebugLogger_t {
    logger::<Quiet>()
}
