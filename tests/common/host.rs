//! Host buffers and requests through the plugin's v8 table in one process, for tests that
//! drive a real device; and re-running a test in a child process with its own settings (the
//! plugin reads them once per process).

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

pub const LIMIT: Duration = Duration::from_secs(30);

/// A host buffer registered on one comm, filled with a pattern unique to `seed` (zeros for 0).
pub struct Buf {
    pub mem: Vec<u8>,
    pub mh: *mut c_void,
    pub comm: *mut c_void,
}

impl Buf {
    /// # Safety
    /// `comm` is a live comm of the plugin.
    pub unsafe fn new(comm: *mut c_void, len: usize, seed: u8) -> Buf {
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
    pub unsafe fn release(self) {
        assert_eq!(
            // SAFETY: `mh` was registered on `comm` by `new`, and the caller's contract keeps
            // `comm` open and the buffer idle.
            unsafe { NET.deregMr.unwrap()(self.comm, self.mh) },
            ncclSuccess
        );
    }
}

/// Initialises the plugin and connects a pair of comms; None (skipped) without a device.
pub fn setup(test: &str) -> Option<(*mut c_void, *mut c_void)> {
    if !super::have_rdma_device(test) {
        return None;
    }
    // SAFETY: the plugin's own v8 table, linked into this binary; `connect_pair` gets it once
    // `init` has succeeded.
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
        Some(super::connect_pair(&NET))
    }
}

/// One `isend` call; NULL when the plugin says "not yet".
///
/// # Safety
/// `sc` is a live send comm, `b` is registered on it and holds at least `len` bytes, and `b`
/// stays alive until the returned request completes.
pub unsafe fn isend_once(sc: *mut c_void, b: &Buf, len: usize, tag: c_int) -> *mut c_void {
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
pub unsafe fn isend(sc: *mut c_void, b: &Buf, len: usize, tag: c_int) -> *mut c_void {
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
pub unsafe fn irecv(rc: *mut c_void, bufs: &mut [(&mut Buf, c_int)]) -> *mut c_void {
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
pub unsafe fn wait_all(reqs: &[*mut c_void]) -> Vec<(ncclResult_t, [c_int; 8])> {
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

pub enum Role {
    /// Run the body.
    Child,
    /// The child ran and passed; this is what it wrote to stderr (the plugin's log included).
    Parent(String),
    /// No device.
    Skip,
}

/// In the parent: runs `test` again in a child with `env`, checks that it passed and printed
/// `done`, and returns its stderr. In that child: [`Role::Child`].
pub fn child_role(test: &str, env: &[(&str, &str)], done: &str) -> Role {
    if std::env::var_os("HALO_TEST_CHILD").is_some() {
        return Role::Child;
    }
    if !super::have_rdma_device(test) {
        return Role::Skip;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .env("HALO_TEST_CHILD", "1")
        .output()
        .expect("re-run this test");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{err}");
    assert!(out.status.success(), "{test} failed in its child");
    assert!(
        err.contains(done),
        "the child of {test} did not run its check"
    );
    Role::Parent(err)
}
