//! The eager path on a real device, through the v8 table in one process: a small send posted
//! before its receive goes at once into the receiver's bounce slot, and the receive, when posted,
//! takes it (bytes and sizes checked); a receive that cannot take it (a multi-receive, a buffer too
//! small) makes the message go the ordinary way, with the same results as without the eager path;
//! with the path off (the default, `HALO_EAGER_MAX=0`) such a send waits for the receiver. The
//! setting is read once per process, so each test runs its body in a child with the setting.
//! Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1`.

mod common;

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

/// A host buffer registered on one comm, filled with a pattern unique to `seed` (zeros for 0).
struct Buf {
    mem: Vec<u8>,
    mh: *mut c_void,
    comm: *mut c_void,
}

impl Buf {
    /// # Safety
    /// `comm` is a live comm of the plugin.
    unsafe fn new(comm: *mut c_void, len: usize, seed: u8) -> Buf {
        let mut mem: Vec<u8> = (0..len)
            .map(|i| {
                if seed == 0 {
                    0
                } else {
                    (i as u8).wrapping_mul(31) ^ seed
                }
            })
            .collect();
        let mut mh = null_mut();
        assert_eq!(
            // SAFETY: `comm` is live (the caller's contract); `mem` is `len` bytes whose heap
            // buffer the returned Buf keeps, unmoved, until `release` deregisters it.
            unsafe {
                NET.regMr.unwrap()(comm, mem.as_mut_ptr().cast(), len, NCCL_PTR_HOST, &mut mh)
            },
            ncclSuccess
        );
        Buf { mem, mh, comm }
    }

    /// # Safety
    /// `self.comm` is still open and no request on this buffer is in flight.
    unsafe fn release(self) {
        assert_eq!(
            // SAFETY: `mh` was registered on `comm` by `new`, and the caller's contract keeps
            // `comm` open and the buffer idle.
            unsafe { NET.deregMr.unwrap()(self.comm, self.mh) },
            ncclSuccess
        );
    }
}

/// One `isend` call; NULL when the plugin says "not yet".
///
/// # Safety
/// `sc` is a live send comm, `b` is registered on it and holds at least `len` bytes, and `b`
/// stays alive until the returned request completes.
unsafe fn isend_once(sc: *mut c_void, b: &Buf, len: usize, tag: c_int) -> *mut c_void {
    let mut req = null_mut();
    assert_eq!(
        // SAFETY: the comm, the buffer and `len` are as the caller promises; `req` is a local.
        unsafe {
            NET.isend.unwrap()(
                sc,
                b.mem.as_ptr() as *mut c_void,
                len as c_int,
                tag,
                b.mh,
                &mut req,
            )
        },
        ncclSuccess
    );
    req
}

/// Calls `isend` until it posts (the receiver's row may still be on its way).
///
/// # Safety
/// As for [`isend_once`].
unsafe fn isend(sc: *mut c_void, b: &Buf, len: usize, tag: c_int) -> *mut c_void {
    let t0 = Instant::now();
    loop {
        // SAFETY: forwarded contract; a NULL result posted nothing, so retrying is fine.
        let req = unsafe { isend_once(sc, b, len, tag) };
        if !req.is_null() {
            return req;
        }
        assert!(t0.elapsed() < LIMIT, "isend of {len} bytes never posted");
    }
}

/// A (multi-)receive of whole buffers with their tags.
///
/// # Safety
/// `rc` is a live receive comm, every buffer is registered on it, and the buffers stay alive
/// until the returned request completes.
unsafe fn irecv(rc: *mut c_void, bufs: &mut [(&mut Buf, c_int)]) -> *mut c_void {
    let mut data: Vec<*mut c_void> = bufs
        .iter_mut()
        .map(|(b, _)| b.mem.as_mut_ptr().cast())
        .collect();
    let mut sizes: Vec<c_int> = bufs.iter().map(|(b, _)| b.mem.len() as c_int).collect();
    let mut tags: Vec<c_int> = bufs.iter().map(|(_, t)| *t).collect();
    let mut mhs: Vec<*mut c_void> = bufs.iter().map(|(b, _)| b.mh).collect();
    let t0 = Instant::now();
    loop {
        let mut req = null_mut();
        assert_eq!(
            // SAFETY: the comm and the buffers are as the caller promises; the four arrays
            // are locals with one entry per buffer, as many as the count passed.
            unsafe {
                NET.irecv.unwrap()(
                    rc,
                    bufs.len() as c_int,
                    data.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    tags.as_mut_ptr(),
                    mhs.as_mut_ptr(),
                    &mut req,
                )
            },
            ncclSuccess
        );
        if !req.is_null() {
            return req;
        }
        assert!(t0.elapsed() < LIMIT, "irecv never posted");
    }
}

/// Polls every request until all are done; returns each one's `test` result and sizes.
///
/// # Safety
/// Each of `reqs` is a live request of the plugin, with at most 8 buffers, that nothing else
/// tests.
unsafe fn wait_all(reqs: &[*mut c_void]) -> Vec<(ncclResult_t, [c_int; 8])> {
    let mut out: Vec<Option<(ncclResult_t, [c_int; 8])>> = vec![None; reqs.len()];
    let t0 = Instant::now();
    while out.iter().any(Option::is_none) {
        assert!(t0.elapsed() < LIMIT, "requests did not finish: {out:?}");
        for (req, slot) in reqs.iter().zip(out.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let mut done = 0;
            let mut sizes = [-1 as c_int; 8];
            // SAFETY: a request whose slot is still empty has not been reported done or
            // failed, so it is live (the caller's contract); `sizes` has room for 8 buffers.
            let r = unsafe { NET.test.unwrap()(*req, &mut done, sizes.as_mut_ptr()) };
            if r != ncclSuccess || done != 0 {
                *slot = Some((r, sizes));
            }
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// In the parent: runs `test` again in a child with `HALO_EAGER_MAX=eager_max`, checks that it
/// passed and printed `done`, and returns false. In that child: returns true (run the body).
fn in_child(test: &str, eager_max: &str, done: &str) -> bool {
    if std::env::var_os("HALO_EAGER_TEST_CHILD").is_some() {
        return true;
    }
    if !common::have_rdma_device(&format!("eager::{test}")) {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("HALO_EAGER_MAX", eager_max)
        .env("HALO_EAGER_TEST_CHILD", "1")
        .output()
        .expect("re-run this test");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "{test} failed in its child");
    assert!(
        err.contains(done),
        "the child of {test} did not run its check"
    );
    false
}

/// Initialises the plugin and connects a pair of comms; None (skipped) without a device.
fn setup(test: &str) -> Option<(*mut c_void, *mut c_void)> {
    if !common::have_rdma_device(test) {
        return None;
    }
    // SAFETY: the plugin's own v8 table, linked into this binary; `connect_pair` gets it once
    // `init` has succeeded.
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
        Some(common::connect_pair(&NET))
    }
}

#[test]
fn small_sends_go_before_their_receive() {
    if !in_child(
        "small_sends_go_before_their_receive",
        "8192",
        "100 sends posted ahead of their receives: verified",
    ) {
        return;
    }
    let Some((sc, rc)) = setup("eager::small_sends_go_before_their_receive") else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, closed only at the end; every
    // buffer is registered on the comm it is used with, holds at least the bytes each call
    // names and outlives its requests (all are waited for before `release`); a request is
    // tested only until it is reported done.
    unsafe {
        // 1. Posted before any receive exists: accepted at once, completed by the receive.
        let src = Buf::new(sc, 100, 1);
        let mut dst = Buf::new(rc, 4096, 0);
        let sreq = isend_once(sc, &src, 100, 1);
        assert!(
            !sreq.is_null(),
            "a 100-byte send with no receive posted must go eagerly"
        );
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) {
            let (mut done, mut size) = (0, -1);
            assert_eq!(NET.test.unwrap()(sreq, &mut done, &mut size), ncclSuccess);
            assert_eq!(
                done, 0,
                "an eager send completes only once its receive confirms it"
            );
        }
        let rreq = irecv(rc, &mut [(&mut dst, 1)]);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 100));
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 100));
        assert_eq!(&dst.mem[..100], &src.mem[..100]);
        assert!(
            dst.mem[100..].iter().all(|&b| b == 0),
            "bytes past the message"
        );
        eprintln!("eager send taken by a receive posted later: 100 bytes verified");

        // 2. The receive turns out to be a multi-receive: the slot is dropped and the message
        //    goes with the rest of its row.
        let a = Buf::new(sc, 200, 2);
        let b = Buf::new(sc, 300, 3);
        let mut da = Buf::new(rc, 4096, 0);
        let mut db = Buf::new(rc, 4096, 0);
        let s5 = isend_once(sc, &a, 200, 5);
        assert!(!s5.is_null(), "the first send of the row goes eagerly");
        let rreq = irecv(rc, &mut [(&mut db, 6), (&mut da, 5)]);
        let s6 = isend(sc, &b, 300, 6);
        let res = wait_all(&[s5, s6, rreq]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 200));
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 300));
        assert_eq!(res[2].0, ncclSuccess);
        assert_eq!(
            &res[2].1[..2],
            &[300, 200],
            "sizes in the receive's buffer order"
        );
        assert_eq!(&da.mem[..200], &a.mem[..]);
        assert_eq!(&db.mem[..300], &b.mem[..]);
        eprintln!(
            "eager send refused by a multi-receive went the ordinary way: 500 bytes verified"
        );

        // 3. The receive is too small: both sides fail the request, as without the eager path,
        //    and the comm stays usable.
        let big = Buf::new(sc, 1000, 4);
        let mut small = Buf::new(rc, 500, 0);
        let s7 = isend_once(sc, &big, 1000, 7);
        assert!(!s7.is_null());
        let rreq = irecv(rc, &mut [(&mut small, 7)]);
        let res = wait_all(&[s7, rreq]);
        assert_eq!(res[0].0, ncclInvalidUsage, "sender of an oversize message");
        assert_eq!(
            res[1].0, ncclInvalidUsage,
            "receiver of an oversize message"
        );
        assert!(
            small.mem.iter().all(|&x| x == 0),
            "nothing is written on truncation"
        );
        eprintln!("oversize eager send failed on both sides with nothing written");

        // 4. Above the eager limit (8 KiB here) a send waits for its receive.
        let large = Buf::new(sc, 65536, 5);
        let mut ldst = Buf::new(rc, 65536, 0);
        assert!(
            isend_once(sc, &large, 65536, 8).is_null(),
            "a 64 KiB send must wait for the receiver's row"
        );
        let rreq = irecv(rc, &mut [(&mut ldst, 8)]);
        let sreq = isend(sc, &large, 65536, 8);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 65536));
        assert_eq!(ldst.mem, large.mem);
        eprintln!("64 KiB send waited for its receive: verified");

        // 5. Many in a row, each ahead of its receive: credits come back with the rows.
        let mut got = Buf::new(rc, 4096, 0);
        let src = Buf::new(sc, 4096, 9);
        for i in 0..100usize {
            let len = (i * 37) % 4097;
            let sreq = isend(sc, &src, len, 11);
            let rreq = irecv(rc, &mut [(&mut got, 11)]);
            let res = wait_all(&[sreq, rreq]);
            assert_eq!((res[0].0, res[0].1[0] as usize), (ncclSuccess, len));
            assert_eq!((res[1].0, res[1].1[0] as usize), (ncclSuccess, len));
            assert_eq!(&got.mem[..len], &src.mem[..len], "message {i}");
        }
        eprintln!("100 sends posted ahead of their receives: verified");

        for buf in [src, a, b, big, large] {
            buf.release();
        }
        for buf in [dst, da, db, small, ldst, got] {
            buf.release();
        }
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}

#[test]
fn with_the_eager_path_off_small_sends_wait() {
    if !in_child(
        "with_the_eager_path_off_small_sends_wait",
        "0",
        "eager path off: verified",
    ) {
        return;
    }
    let Some((sc, rc)) = setup("eager::with_the_eager_path_off_small_sends_wait") else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, closed only at the end; every
    // buffer is registered on the comm it is used with, holds at least the bytes each call
    // names and outlives its requests (all are waited for before `release`); a request is
    // tested only until it is reported done.
    unsafe {
        let src = Buf::new(sc, 8, 1);
        let mut dst = Buf::new(rc, 8, 0);
        for _ in 0..1000 {
            assert!(
                isend_once(sc, &src, 8, 1).is_null(),
                "no eager path: the send waits"
            );
        }
        let rreq = irecv(rc, &mut [(&mut dst, 1)]);
        let sreq = isend(sc, &src, 8, 1);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 8));
        assert_eq!(dst.mem, src.mem);
        eprintln!("eager path off: verified");
        src.release();
        dst.release();
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}
