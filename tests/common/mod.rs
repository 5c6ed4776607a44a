//! Helpers shared by the root package's tests.
#![allow(dead_code)]

pub mod host;

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
