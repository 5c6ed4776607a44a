//! The data path allocates nothing: after connection setup and registration, a stream of
//! isend / irecv / test calls through the plugin's C ABI (v8 table) must not touch the heap.
//! A counting global allocator sees every allocation of the plugin (linked into this binary).
//! Needs an RDMA device (the Soft-RoCE guest); skips visibly elsewhere unless HALO_REQUIRE_RDMA=1.

mod common;

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn isend_irecv_test_do_not_allocate() {
    if !common::have_rdma_device("hot_path") {
        return;
    }
    // SAFETY: the plugin's own v8 table, linked into this binary, `init` first and the comms
    // closed last; `src` and `dst` are registered on their comms for MAX bytes (no message is
    // longer), every request is tested until done and no further, and both buffers outlive
    // their registrations.
    unsafe {
        assert_eq!(NET.init.unwrap()(None), ncclSuccess);
        let (sc, rc) = common::connect_pair(&NET);
        const MAX: usize = 1 << 16;
        let src: Vec<u8> = (0..MAX).map(|i| i as u8).collect();
        let mut dst = vec![0u8; MAX];
        let (mut smh, mut rmh): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
        assert_eq!(
            NET.regMr.unwrap()(
                sc,
                src.as_ptr() as *mut c_void,
                MAX,
                NCCL_PTR_HOST,
                &mut smh
            ),
            ncclSuccess
        );
        assert_eq!(
            NET.regMr.unwrap()(rc, dst.as_mut_ptr().cast(), MAX, NCCL_PTR_HOST, &mut rmh),
            ncclSuccess
        );

        let mut one = |len: usize| {
            let mut data = [dst.as_mut_ptr() as *mut c_void];
            let (mut sizes, mut tags, mut mhs) = ([MAX as c_int], [7 as c_int], [rmh]);
            let mut rreq: *mut c_void = null_mut();
            let t0 = Instant::now();
            while rreq.is_null() {
                assert!(t0.elapsed() < Duration::from_secs(30), "irecv never posted");
                assert_eq!(
                    NET.irecv.unwrap()(
                        rc,
                        1,
                        data.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        tags.as_mut_ptr(),
                        mhs.as_mut_ptr(),
                        &mut rreq
                    ),
                    ncclSuccess
                );
            }
            let mut sreq: *mut c_void = null_mut();
            while sreq.is_null() {
                assert!(t0.elapsed() < Duration::from_secs(30), "isend never posted");
                assert_eq!(
                    NET.isend.unwrap()(
                        sc,
                        src.as_ptr() as *mut c_void,
                        len as c_int,
                        7,
                        smh,
                        &mut sreq
                    ),
                    ncclSuccess
                );
            }
            let (mut sd, mut rd, mut ss, mut rs) = (0, 0, [0 as c_int], [0 as c_int]);
            while sd == 0 || rd == 0 {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "transfer did not finish"
                );
                if sd == 0 {
                    assert_eq!(
                        NET.test.unwrap()(sreq, &mut sd, ss.as_mut_ptr()),
                        ncclSuccess
                    );
                }
                if rd == 0 {
                    assert_eq!(
                        NET.test.unwrap()(rreq, &mut rd, rs.as_mut_ptr()),
                        ncclSuccess
                    );
                }
            }
            assert_eq!((ss[0] as usize, rs[0] as usize), (len, len));
        };
        for len in [8, 4096, MAX] {
            one(len); // warm-up: first use of each path
        }
        COUNTING.store(true, Ordering::SeqCst);
        let mut messages = 0;
        for round in 0..50 {
            for len in [0, 8, 100, 4096, 8191, MAX] {
                one(len + round % 2 * usize::from(len > 0 && len < MAX));
                messages += 1;
            }
        }
        COUNTING.store(false, Ordering::SeqCst);
        let allocs = ALLOCS.load(Ordering::SeqCst);
        eprintln!("{messages} messages (isend + irecv + test loops): {allocs} heap allocations");
        assert!(dst[..MAX].iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(allocs, 0, "the data path allocated");
        assert_eq!(NET.deregMr.unwrap()(sc, smh), ncclSuccess);
        assert_eq!(NET.deregMr.unwrap()(rc, rmh), ncclSuccess);
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}
