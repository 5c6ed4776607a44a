//! The host side of the plugin's logger: the `ncclDebugLogger_t` handed to the plugin's `init`,
//! turning its printf-style calls into calls of a Rust [`LogSink`].
//!
//! The entry point is C (`c/logger.c`, `halo_log_entry`): plugins pass their own formats and
//! arguments (NCCL's `WARN("... %s", path)`, `INFO(NCCL_NET, "... %d", n)`), so the line is
//! formatted with `vsnprintf` into a bounded buffer (a longer line is cut and ends in `...`) and
//! the finished text is passed to [`halo_log_dispatch`], which calls the sink. A process has one
//! sink at a time: the last [`logger`] call chooses it, for every plugin loaded in the process.

use halo_ffi::ncclDebugLogger_t;
use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_ulong, CStr};
use std::sync::Mutex;

/// Where the plugin's log lines go.
pub trait LogSink {
    /// One log line: its level (`ncclDebugLogLevel`: 1 = version, 2 = warning, 3 = info, …),
    /// source file and line, and the formatted message.
    fn line(level: c_int, file: &str, line: c_int, msg: &str);
}

type SinkFn = fn(c_int, &str, c_int, &str);

/// The sink's `line`; `None` until [`logger`] is called.
static SINK: Mutex<Option<SinkFn>> = Mutex::new(None);

extern "C" {
    fn halo_log_entry(
        level: c_int,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        ...
    );
}

/// The logger to hand to the plugin's `init`; from now on every line goes to `S`.
pub fn logger<S: LogSink>() -> ncclDebugLogger_t {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(S::line);
    Some(halo_log_entry)
}

/// Called by `halo_log_entry` with the formatted line; `file` and `msg` are never NULL there.
#[no_mangle]
pub extern "C" fn halo_log_dispatch(
    level: c_int,
    _flags: c_ulong,
    file: *const c_char,
    line: c_int,
    msg: *const c_char,
) {
    // Copied out, so that the sink runs without the lock held.
    let sink = *SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sink) = sink {
        sink(level, &text(file), line, &text(msg));
    }
}

fn text<'a>(p: *const c_char) -> Cow<'a, str> {
    if p.is_null() {
        Cow::Borrowed("")
    } else {
        // SAFETY: the C entry passes NUL-terminated strings that outlive the call.
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

/// A sink that keeps every line, for tests in this crate.
#[cfg(test)]
pub(crate) mod capture {
    use super::LogSink;
    use std::ffi::c_int;
    use std::sync::Mutex;

    pub(crate) static LINES: Mutex<Vec<(c_int, String, c_int, String)>> = Mutex::new(Vec::new());

    pub(crate) struct Capture;

    impl LogSink for Capture {
        fn line(level: c_int, file: &str, line: c_int, msg: &str) {
            LINES
                .lock()
                .unwrap()
                .push((level, file.into(), line, msg.into()));
        }
    }

    /// The captured lines whose message starts with `prefix`.
    pub(crate) fn lines_starting(prefix: &str) -> Vec<(c_int, String, c_int, String)> {
        LINES
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.3.starts_with(prefix))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::capture::{lines_starting, Capture};
    use super::*;
    use std::ffi::c_double;
    use std::ptr::null;

    extern "C" {
        static halo_log_line_max: c_ulong;
    }

    #[test]
    fn formats_printf_style_lines() {
        let log = logger::<Capture>().expect("a logger");
        let long = "x".repeat(10_000);
        let long_c = std::ffi::CString::new(long).unwrap();
        let p = 0x1234usize as *const u8;
        // SAFETY: the formats and arguments match, as a plugin's would.
        unsafe {
            log(
                2,
                !0,
                c"net.c".as_ptr(),
                42,
                c"fmt1 %d %s %lu %p %5.2f".as_ptr(),
                -7 as c_int,
                c"rxe1".as_ptr(),
                1234567890123 as c_ulong,
                p,
                12.345 as c_double,
            );
            log(
                3,
                0,
                c"net.c".as_ptr(),
                43,
                c"fmt2 %s".as_ptr(),
                long_c.as_ptr(),
            );
            log(3, 0, null(), 44, c"fmt3 %%".as_ptr());
            log(3, 0, c"net.c".as_ptr(), 45, null());
        }
        let one = lines_starting("fmt1 ");
        assert_eq!(
            one,
            vec![(
                2,
                "net.c".into(),
                42,
                "fmt1 -7 rxe1 1234567890123 0x1234 12.35".into()
            )]
        );
        let two = lines_starting("fmt2 ");
        assert_eq!(two.len(), 1);
        // SAFETY: a constant of the C file.
        let max = unsafe { halo_log_line_max } as usize;
        let msg = &two[0].3;
        assert_eq!(msg.len(), max - 1, "cut to the buffer, NUL excluded");
        assert!(msg.ends_with("xxx..."), "{}", &msg[msg.len() - 10..]);
        assert_eq!(
            lines_starting("fmt3 "),
            vec![(3, String::new(), 44, "fmt3 %".into())]
        );
        // A NULL format gives an empty message.
        assert!(super::capture::LINES
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.2 == 45 && l.3.is_empty()));
    }
}
