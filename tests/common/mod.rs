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

/// Whether an RDMA device is present. Without one, says so (the test then skips) — unless
/// `HALO_REQUIRE_RDMA=1`, which turns a missing device into a failure (the Soft-RoCE guest runs).
pub fn have_rdma_device(test: &str) -> bool {
    let ok = halo_ibverbs::devices()
        .map(|d| !d.is_empty())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("HALO_REQUIRE_RDMA").as_deref() != Ok("1"),
            "HALO_REQUIRE_RDMA=1 but no RDMA device is present"
        );
        eprintln!("SKIPPED (no RDMA device): {test}");
    }
    ok
}

/// A build artifact next to this test's `deps/` directory (`target/<profile>/<rel>`), e.g.
/// `examples/allreduce` or `librccl_net_plugin.so`; fails with how to build it when missing.
pub fn artifact(rel: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lies in target/<profile>/deps");
    let path = profile_dir.join(rel);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p rccl-net-plugin && cargo build -p halo-rdma --examples)",
        path.display()
    );
    path
}

/// Listens on device 0 of `net` and polls connect and accept (as RCCL's proxy does) until both
/// comms exist; closes the listen comm.
///
/// # Safety
/// `net` must be an initialised plugin table.
pub unsafe fn connect_pair(
    net: &halo_ffi::ncclNet_v8_t,
) -> (*mut std::ffi::c_void, *mut std::ffi::c_void) {
    use halo_ffi::{ncclSuccess, NCCL_NET_HANDLE_MAXSIZE};
    use std::ptr::null_mut;
    use std::time::{Duration, Instant};
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let mut lc = null_mut();
    // SAFETY: calls through the plugin's own table with valid arguments.
    unsafe {
        assert_eq!(
            net.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
            ncclSuccess
        );
        let (mut sc, mut rc): (*mut std::ffi::c_void, *mut std::ffi::c_void) =
            (null_mut(), null_mut());
        let t0 = Instant::now();
        while sc.is_null() || rc.is_null() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "connect/accept did not finish"
            );
            if sc.is_null() {
                assert_eq!(
                    net.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut sc, null_mut()),
                    ncclSuccess
                );
            }
            if rc.is_null() {
                assert_eq!(net.accept.unwrap()(lc, &mut rc, null_mut()), ncclSuccess);
            }
        }
        assert_eq!(net.closeListen.unwrap()(lc), ncclSuccess);
        (sc, rc)
    }
}
