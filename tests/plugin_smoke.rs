//! The plugin through its v8 table in one process: listen, connect/accept polled to completion,
//! registration, one send and one receive with the bytes and sizes checked. Needs an RDMA device
//! (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1` makes a missing device a failure.

mod common;

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

#[test]
fn send_and_receive_through_the_v8_table() {
    if !common::have_rdma_device("plugin_smoke") {
        return;
    }
    // SAFETY: the plugin's own v8 table, linked into this binary, called in RCCL's order (`init`
    // first, each comm closed once, last); every pointer passed is to a live local, and each
    // buffer is registered on its comm and deregistered only after its request was tested to
    // completion (and not after).
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
        let mut n: c_int = 0;
        assert_eq!(NET.devices.unwrap()(&mut n), ncclSuccess);
        assert!(n >= 1);
        let t0 = Instant::now();
        let (sc, rc) = common::connect_pair(&NET);
        eprintln!("connected in {:?}", t0.elapsed());

        for &len in &[0usize, 1, 4096, 1 << 20] {
            let src: Vec<u8> = (0..len.max(1)).map(|i| (i * 7 + 3) as u8).collect();
            let mut dst = vec![0u8; len + 64];
            let (mut smh, mut rmh): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
            assert_eq!(
                NET.regMr.unwrap()(
                    sc,
                    src.as_ptr() as *mut c_void,
                    len.max(1),
                    NCCL_PTR_HOST,
                    &mut smh
                ),
                ncclSuccess
            );
            assert_eq!(
                NET.regMr.unwrap()(
                    rc,
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    NCCL_PTR_HOST,
                    &mut rmh
                ),
                ncclSuccess
            );
            let mut rreq: *mut c_void =
                std::ptr::without_provenance_mut::<c_void>(NCCL_NET_OPTIONAL_RECV_COMPLETION);
            let mut data = [dst.as_mut_ptr() as *mut c_void];
            let mut sizes = [dst.len() as c_int];
            let mut tags = [42 as c_int];
            let mut mhs = [rmh];
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
            assert!(
                !rreq.is_null()
                    && rreq
                        != std::ptr::without_provenance_mut::<c_void>(
                            NCCL_NET_OPTIONAL_RECV_COMPLETION
                        )
            );
            let mut sreq: *mut c_void = null_mut();
            let t0 = Instant::now();
            while sreq.is_null() {
                assert!(t0.elapsed() < Duration::from_secs(30), "isend never posted");
                assert_eq!(
                    NET.isend.unwrap()(
                        sc,
                        src.as_ptr() as *mut c_void,
                        len as c_int,
                        42,
                        smh,
                        &mut sreq
                    ),
                    ncclSuccess
                );
            }
            let (mut sdone, mut rdone) = (0, 0);
            let (mut ssize, mut rsize) = ([-1 as c_int], [-1 as c_int]);
            while sdone == 0 || rdone == 0 {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "transfer of {len} bytes did not finish"
                );
                if sdone == 0 {
                    assert_eq!(
                        NET.test.unwrap()(sreq, &mut sdone, ssize.as_mut_ptr()),
                        ncclSuccess
                    );
                }
                if rdone == 0 {
                    assert_eq!(
                        NET.test.unwrap()(rreq, &mut rdone, rsize.as_mut_ptr()),
                        ncclSuccess
                    );
                }
            }
            assert_eq!(ssize[0] as usize, len);
            assert_eq!(rsize[0] as usize, len);
            assert_eq!(&dst[..len], &src[..len]);
            assert!(dst[len..].iter().all(|&b| b == 0));
            eprintln!("verified {len} bytes in {:?}", t0.elapsed());
            assert_eq!(NET.deregMr.unwrap()(sc, smh), ncclSuccess);
            assert_eq!(NET.deregMr.unwrap()(rc, rmh), ncclSuccess);
        }
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}

/// Resources of the device as the kernel counts them (`rdma resource show`: pd, cq, qp, mr …).
fn rdma_resources() -> String {
    let out = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .expect("rdma tool (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // keep only the counters, e.g. "0: rxe0: pd 1 cq 2 qp 3 cm_id 0 mr 4 ctx 1 srq 0"
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn connect_close_cycles_leak_nothing() {
    if !common::have_rdma_device("plugin_smoke") {
        return;
    }
    let cycles: usize = std::env::var("HALO_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // SAFETY: the plugin's own v8 table, linked into this binary, `init` first; each cycle
    // closes only the comms it connected, and `buf`, registered on the receive comm and left
    // under an in-flight receive, outlives every comm that could still write to it.
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
        let mut buf = vec![0u8; 8192];
        let cycle = |buf: &mut Vec<u8>| {
            let (sc, rc) = common::connect_pair(&NET);
            // a registration and a receive left in flight: close must clean up after both
            let mut mh: *mut c_void = null_mut();
            assert_eq!(
                NET.regMr.unwrap()(
                    rc,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    NCCL_PTR_HOST,
                    &mut mh
                ),
                ncclSuccess
            );
            let mut req: *mut c_void = null_mut();
            let mut data = [buf.as_mut_ptr() as *mut c_void];
            let (mut sizes, mut tags, mut mhs) = ([buf.len() as c_int], [0 as c_int], [mh]);
            assert_eq!(
                NET.irecv.unwrap()(
                    rc,
                    1,
                    data.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    tags.as_mut_ptr(),
                    mhs.as_mut_ptr(),
                    &mut req
                ),
                ncclSuccess
            );
            assert!(!req.is_null());
            assert_eq!(NET.deregMr.unwrap()(rc, mh), ncclSuccess);
            assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
            assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
        };
        cycle(&mut buf); // warm up: the device's own resources exist from here on
        let (fds, threads, res) = (
            count_dir("/proc/self/fd"),
            count_dir("/proc/self/task"),
            rdma_resources(),
        );
        let t0 = Instant::now();
        for _ in 0..cycles {
            cycle(&mut buf);
        }
        let (fds2, threads2, res2) = (
            count_dir("/proc/self/fd"),
            count_dir("/proc/self/task"),
            rdma_resources(),
        );
        eprintln!("{cycles} connect/close cycles in {:?}", t0.elapsed());
        eprintln!("fds {fds} -> {fds2}, threads {threads} -> {threads2}");
        eprintln!("rdma resources before: {res}\nrdma resources after:  {res2}");
        assert_eq!(fds, fds2, "file descriptors leaked");
        assert_eq!(threads, threads2, "threads leaked");
        assert_eq!(res, res2, "RDMA resources (QP/CQ/MR/PD) leaked");
    }
}
