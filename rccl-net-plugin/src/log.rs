//! Logging through the debug logger RCCL hands to `init`, and nowhere else.
//!
//! The plugin lives inside someone else's process: it never writes to stdout or stderr. Until
//! `init` stores a logger with [`set_logger`], every message is dropped before it is formatted.
//! Messages start with `NET/halo : `, the prefix convention of NCCL network plugins, so they
//! line up with the core's own `NET/...` lines under `NCCL_DEBUG=INFO`.
//!
//! ```ignore
//! log::warn!(log::NET, "connect to {addr} failed: {e}");
//! log::info!(log::INIT | log::NET, "using {dev} port {port}");
//! log::trace!(log::NET, "posted {n} receives");
//! log::warn_once!(log::INIT, "no GPU memory support: host buffers only");
//! ```

use std::ffi::{c_char, c_int, c_ulong, CStr, CString};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// The logger RCCL passes to `init` (`ncclDebugLogger_t` without the `Option`): printf-style,
/// variadic. We always call it with the format `"%s"` and exactly one C string, so message text
/// can never be read as a format.
pub type LoggerFn = unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...);

/// Log levels as the logger understands them.
pub const NONE: c_int = 0;
pub const VERSION: c_int = 1;
pub const WARN: c_int = 2;
pub const INFO: c_int = 3;
pub const ABORT: c_int = 4;
pub const TRACE: c_int = 5;

/// Subsystem flags; NCCL_DEBUG_SUBSYS filters on them.
pub const INIT: c_ulong = 0x1;
pub const NET: c_ulong = 0x10;
pub const ENV: c_ulong = 0x80;

/// What every message starts with.
pub const PREFIX: &str = "NET/halo : ";

/// The current logger as a data pointer (null = none): a fn pointer cannot live in an atomic
/// directly, and a lock-free slot keeps logging usable from any thread without ordering issues
/// against `init`.
static LOGGER: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
static TRACE_ON: AtomicBool = AtomicBool::new(false);

/// Stores (or with `None` removes) the logger all later messages go to. `init` calls this with
/// the logger it received; with the v11 per-communicator `init` the newest one wins.
pub fn set_logger(f: Option<LoggerFn>) {
    let p = f.map_or(std::ptr::null_mut(), |f| f as *mut ());
    LOGGER.store(p, Ordering::Release);
}

/// Turns trace messages on or off (from `PluginConfig::trace`). Off by default, so the hot
/// path pays one relaxed load per `trace!`.
pub fn set_trace(on: bool) {
    TRACE_ON.store(on, Ordering::Relaxed);
}

/// Whether a logger is set, i.e. whether messages go anywhere.
pub fn enabled() -> bool {
    !LOGGER.load(Ordering::Relaxed).is_null()
}

/// Whether `trace!` messages are formatted and sent.
pub fn trace_enabled() -> bool {
    TRACE_ON.load(Ordering::Relaxed) && enabled()
}

fn logger() -> Option<LoggerFn> {
    let p = LOGGER.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: the slot only ever holds null or a pointer made from a `LoggerFn` in
    // `set_logger`, and fn pointers and data pointers have the same size on our targets.
    Some(unsafe { std::mem::transmute::<*mut (), LoggerFn>(p) })
}

/// Formats and sends one message; the macros are the interface, this is their back end.
#[doc(hidden)]
pub fn emit(level: c_int, flags: c_ulong, file: &'static CStr, line: u32, args: fmt::Arguments) {
    let Some(log) = logger() else { return };
    let msg = message(args);
    let line = c_int::try_from(line).unwrap_or(c_int::MAX);
    // SAFETY: `log` is the logger RCCL gave us; the format "%s" consumes exactly the one
    // NUL-terminated string we pass, and all pointers outlive the call.
    unsafe {
        log(
            level,
            flags,
            file.as_ptr(),
            line,
            c"%s".as_ptr(),
            msg.as_ptr(),
        )
    };
}

/// The prefixed message as a C string; an interior NUL would cut the message short in C, so
/// it is shown as `\0` instead.
fn message(args: fmt::Arguments) -> CString {
    let mut text = String::with_capacity(PREFIX.len() + 64);
    text.push_str(PREFIX);
    fmt::write(&mut text, args).expect("formatting into a String cannot fail");
    let text = if text.contains('\0') {
        text.replace('\0', "\\0")
    } else {
        text
    };
    CString::new(text).expect("interior NULs were replaced")
}

/// Sends a message at `level`; shared body of the level macros.
macro_rules! log_at {
    ($level:expr, $subsys:expr, $($arg:tt)+) => {{
        const FILE: &::std::ffi::CStr =
            match ::std::ffi::CStr::from_bytes_with_nul(concat!(file!(), "\0").as_bytes()) {
                Ok(f) => f,
                Err(_) => c"?",
            };
        $crate::log::emit($level, $subsys, FILE, line!(), format_args!($($arg)+))
    }};
}
pub(crate) use log_at;

/// `warn!(subsys, "format", args...)`: something failed or will not work as the user expects.
macro_rules! log_warn {
    ($subsys:expr, $($arg:tt)+) => {
        $crate::log::log_at!($crate::log::WARN, $subsys, $($arg)+)
    };
}
pub(crate) use log_warn as warn;

/// `info!(subsys, "format", args...)`: setup decisions worth seeing under `NCCL_DEBUG=INFO`.
macro_rules! log_info {
    ($subsys:expr, $($arg:tt)+) => {
        $crate::log::log_at!($crate::log::INFO, $subsys, $($arg)+)
    };
}
pub(crate) use log_info as info;

/// `trace!(subsys, "format", args...)`: per-operation detail; skipped before any formatting
/// unless `NCCL_DEBUG=TRACE` turned it on.
macro_rules! log_trace {
    ($subsys:expr, $($arg:tt)+) => {
        if $crate::log::trace_enabled() {
            $crate::log::log_at!($crate::log::TRACE, $subsys, $($arg)+)
        }
    };
}
pub(crate) use log_trace as trace;

/// `warn_once!(subsys, "format", args...)`: like `warn!`, but each call site speaks at most
/// once per process (for conditions that hold for the whole process, e.g. missing GPU
/// support). A call made while no logger is set does not use up the message.
macro_rules! log_warn_once {
    ($subsys:expr, $($arg:tt)+) => {{
        static SAID: ::std::sync::atomic::AtomicBool = ::std::sync::atomic::AtomicBool::new(false);
        if $crate::log::enabled() && !SAID.swap(true, ::std::sync::atomic::Ordering::Relaxed) {
            $crate::log::warn!($subsys, $($arg)+)
        }
    }};
}
pub(crate) use log_warn_once as warn_once;

/// A logger for tests that records messages per thread, so parallel tests in other modules
/// that happen to log do not disturb the test that inspects them.
///
/// Rust cannot define a C-variadic function on stable, so `capture` has the fixed signature of
/// the only call shape `emit` produces: five fixed arguments plus one `const char*`. On the
/// System V x86-64 and AAPCS64 (Linux) calling conventions a variadic argument of pointer type
/// travels exactly like a named one (the extra `%al` vector-count register on x86-64 is simply
/// ignored by a non-variadic callee), so the call is ABI-compatible there; the tests that use
/// it are limited to those targets.
#[cfg(all(
    test,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub(crate) mod capture {
    use super::LoggerFn;
    use std::cell::RefCell;
    use std::ffi::{c_char, c_int, c_ulong, CStr};
    use std::sync::{Mutex, MutexGuard};

    /// One message as the logger received it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Captured {
        pub level: c_int,
        pub flags: c_ulong,
        pub file: String,
        pub line: c_int,
        pub fmt: String,
        pub text: String,
    }

    thread_local! {
        static MESSAGES: RefCell<Vec<Captured>> = const { RefCell::new(Vec::new()) };
    }

    static INSTALLED: Mutex<()> = Mutex::new(());

    unsafe extern "C" fn capture(
        level: c_int,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        arg: *const c_char,
    ) {
        // SAFETY: `emit` passes NUL-terminated strings that live for the whole call.
        let (file, fmt, text) = unsafe {
            (
                CStr::from_ptr(file).to_string_lossy().into_owned(),
                CStr::from_ptr(fmt).to_string_lossy().into_owned(),
                CStr::from_ptr(arg).to_string_lossy().into_owned(),
            )
        };
        MESSAGES.with(|m| {
            m.borrow_mut().push(Captured {
                level,
                flags,
                file,
                line,
                fmt,
                text,
            })
        });
    }

    /// Holds the process-wide logger slot for one test; dropping it removes the logger.
    pub struct Installed {
        _only_one: MutexGuard<'static, ()>,
    }

    impl Drop for Installed {
        fn drop(&mut self) {
            super::set_logger(None);
            super::set_trace(false);
        }
    }

    /// The capturing logger as the type `set_logger` takes.
    pub fn logger() -> LoggerFn {
        type Fixed = unsafe extern "C" fn(
            c_int,
            c_ulong,
            *const c_char,
            c_int,
            *const c_char,
            *const c_char,
        );
        // SAFETY: same-size fn pointer types; calling through the variadic type is sound on
        // the targets this module is built for (see the module comment).
        unsafe { std::mem::transmute::<Fixed, LoggerFn>(capture as Fixed) }
    }

    /// Installs the capturing logger (tests that do this run one at a time) and clears this
    /// thread's record.
    pub fn install() -> Installed {
        let guard = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        super::set_logger(Some(logger()));
        take();
        Installed { _only_one: guard }
    }

    /// Removes and returns what this thread logged so far.
    pub fn take() -> Vec<Captured> {
        MESSAGES.with(|m| std::mem::take(&mut *m.borrow_mut()))
    }
}

#[cfg(all(
    test,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod tests {
    use super::capture::{install, take};
    use super::*;

    #[test]
    fn messages_carry_prefix_level_flags_file_and_line() {
        let _logger = install();
        let peer = "10.0.0.2:4000";
        warn!(NET, "connect to {peer} failed: {}", "refused");
        let line = line!() - 1;
        info!(INIT | NET, "using rxe0 port 1");
        let got = take();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].level, WARN);
        assert_eq!(got[0].flags, NET);
        assert_eq!(got[0].fmt, "%s");
        assert_eq!(
            got[0].text,
            "NET/halo : connect to 10.0.0.2:4000 failed: refused"
        );
        assert_eq!(got[0].file, file!());
        assert_eq!(got[0].line as u32, line);
        assert_eq!(got[1].level, INFO);
        assert_eq!(got[1].flags, INIT | NET);
        assert_eq!(got[1].text, "NET/halo : using rxe0 port 1");
    }

    #[test]
    fn percent_signs_and_nuls_are_harmless() {
        let _logger = install();
        warn!(ENV, "100% %s %n {}", "a\0b");
        let got = take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text, "NET/halo : 100% %s %n a\\0b");
    }

    #[test]
    fn trace_is_off_until_enabled() {
        let _logger = install();
        let mut formatted = 0;
        let mut count = || {
            formatted += 1;
            formatted
        };
        trace!(NET, "step {}", count());
        assert!(take().is_empty());
        set_trace(true);
        trace!(NET, "step {}", count());
        let got = take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].level, TRACE);
        assert_eq!(got[0].text, "NET/halo : step 1");
        // The arguments of a suppressed trace are not even evaluated.
        assert_eq!(formatted, 1);
    }

    #[test]
    fn nothing_happens_without_a_logger() {
        // Hold the slot so no other test installs a logger meanwhile.
        let _slot = install();
        set_logger(None);
        assert!(!enabled());
        warn!(NET, "dropped");
        info!(NET, "dropped");
        set_trace(true);
        trace!(NET, "dropped");
        assert!(take().is_empty());
    }

    #[test]
    fn warn_once_speaks_once_per_call_site() {
        let _logger = install();
        for i in 0..3 {
            warn_once!(INIT, "no GPU memory support ({i})");
        }
        let got = take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].level, WARN);
        assert_eq!(got[0].text, "NET/halo : no GPU memory support (0)");
    }

    #[test]
    fn warn_once_waits_for_a_logger() {
        fn site() {
            warn_once!(INIT, "said once");
        }
        let _slot = install();
        set_logger(None);
        site();
        set_logger(Some(super::capture::logger()));
        site();
        site();
        assert_eq!(take().len(), 1);
    }
}
