//! Details of the C boundary that RCCL relies on without checking:
//! - v12 `railId`/`planeId` are `NCCL_NET_ID_UNDEF`, as NCCL's own transports report;
//! - the `sendDevComm`/`recvDevComm` out-arguments of connect/accept are never written (some
//!   RCCL builds pass a 4-byte object there): checked with canaries around a 4-byte object;
//! - `regMr`/`deregMr` on RCCL's service thread while the progress thread drives the same comm:
//!   a registration carries its device, so `deregMr` works without the comm (here: after the
//!   comm was closed, where reading it would be a use-after-free);
//! - "no RDMA device" is logged at INFO, not WARN.
//!
//! The device tests need an RDMA device (the Soft-RoCE guest); elsewhere they say so and skip,
//! unless `HALO_REQUIRE_RDMA=1`.

mod common;

use halo_ffi::*;
use halo_harness::artifacts;
use halo_harness::driver::Plugin;
use halo_harness::log::{logger, LogSink};
use rccl_net_plugin::abi::{ncclNetPlugin_v12 as NET12, ncclNetPlugin_v8 as NET8};
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A 4-byte object between canaries, as an out-argument slot.
#[repr(C, align(8))]
struct Guarded {
    before: u64,
    object: u32,
    after: u32,
    tail: u64,
}

const CANARY: u64 = 0xa5a5_5a5a_dead_beef;

impl Guarded {
    fn new() -> Box<Self> {
        Box::new(Guarded {
            before: CANARY,
            object: 0x1234_5678,
            after: 0xc0ff_ee00,
            tail: CANARY,
        })
    }

    /// The slot as RCCL would pass it: a pointer to a 4-byte object.
    fn slot(&mut self) -> *mut *mut ncclNetDeviceHandle_v8_t {
        (&raw mut self.object).cast()
    }

    fn untouched(&self) -> bool {
        self.before == CANARY
            && self.object == 0x1234_5678
            && self.after == 0xc0ff_ee00
            && self.tail == CANARY
    }
}

#[test]
fn failed_connect_leaves_the_device_comm_argument_alone() {
    let mut g = Guarded::new();
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let mut sc: *mut c_void = null_mut();
    // SAFETY: valid buffers; a zeroed handle is refused (and so is a call before init).
    let r = unsafe { NET8.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut sc, g.slot()) };
    assert_ne!(r, ncclSuccess, "a zeroed handle cannot connect");
    assert!(sc.is_null());
    assert!(g.untouched(), "connect wrote into sendDevComm");
}

#[test]
fn device_comm_arguments_are_left_alone_and_wrong_comm_kinds_refused() {
    if !common::have_rdma_device("abi_points::connect_and_accept_leave_the_device_comm") {
        return;
    }
    let (mut gs, mut gr) = (Guarded::new(), Guarded::new());
    // SAFETY: the plugin's v8 table in RCCL's order, with valid buffers and out-pointers.
    unsafe {
        assert_eq!(
            NET8.init.unwrap()(halo_harness::log::quiet_logger()),
            ncclSuccess
        );
        let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
        let mut lc = null_mut();
        assert_eq!(
            NET8.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
            ncclSuccess
        );
        let (mut sc, mut rc): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
        let t0 = Instant::now();
        while sc.is_null() || rc.is_null() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "connect/accept hang"
            );
            if sc.is_null() {
                assert_eq!(
                    NET8.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut sc, gs.slot()),
                    ncclSuccess
                );
            }
            if rc.is_null() {
                assert_eq!(NET8.accept.unwrap()(lc, &mut rc, gr.slot()), ncclSuccess);
            }
        }
        assert!(gs.untouched(), "connect wrote into sendDevComm");
        assert!(gr.untouched(), "accept wrote into recvDevComm");
        // A comm of the wrong kind, a NULL comm or a NULL request pointer: refused as invalid
        // arguments, the request left NULL, the comms still usable afterwards (closed below).
        let canary = std::ptr::dangling_mut::<c_void>();
        for comm in [rc, null_mut()] {
            let mut req = canary;
            assert_eq!(
                NET8.isend.unwrap()(comm, null_mut(), 0, 0, null_mut(), &mut req),
                ncclInvalidArgument,
                "isend on {comm:p}"
            );
            assert!(req.is_null(), "a refused isend leaves its request NULL");
        }
        assert_eq!(
            NET8.isend.unwrap()(sc, null_mut(), 0, 0, null_mut(), null_mut()),
            ncclInvalidArgument
        );
        let mut req = canary;
        let (mut data, mut sizes, mut tags, mut mhs) = ([null_mut()], [0], [0], [null_mut()]);
        assert_eq!(
            NET8.irecv.unwrap()(
                sc,
                1,
                data.as_mut_ptr(),
                sizes.as_mut_ptr(),
                tags.as_mut_ptr(),
                mhs.as_mut_ptr(),
                &mut req
            ),
            ncclInvalidArgument,
            "irecv on a send comm"
        );
        assert_eq!(NET8.closeListen.unwrap()(lc), ncclSuccess);
        assert_eq!(NET8.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET8.closeRecv.unwrap()(rc), ncclSuccess);
    }
}

#[test]
fn v12_claims_no_rail_or_plane() {
    if !common::have_rdma_device("abi_points::v12_claims_no_rail_or_plane") {
        return;
    }
    // SAFETY: the v12 table: init with a context, properties of device 0, finalize.
    unsafe {
        let mut ctx = null_mut();
        let mut config = ncclNetCommConfig_v11_t {
            trafficClass: NCCL_NET_TRAFFIC_CLASS_UNDEF,
        };
        assert_eq!(
            NET12.init.unwrap()(
                &mut ctx,
                1,
                &mut config,
                halo_harness::log::quiet_logger(),
                None
            ),
            ncclSuccess
        );
        let mut n: c_int = 0;
        assert_eq!(NET12.devices.unwrap()(&mut n), ncclSuccess);
        for dev in 0..n {
            let mut p = ncclNetProperties_v12_t::zeroed();
            p.railId = 77;
            p.planeId = 77;
            assert_eq!(NET12.getProperties.unwrap()(dev, &mut p), ncclSuccess);
            assert_eq!(
                (p.railId, p.planeId),
                (NCCL_NET_ID_UNDEF, NCCL_NET_ID_UNDEF),
                "device {dev}"
            );
        }
        assert_eq!(NET12.finalize.unwrap()(ctx), ncclSuccess);
    }
}

/// A pointer that may cross threads (the plugin's comms and handles are used from RCCL's
/// service and progress threads).
#[derive(Clone, Copy)]
struct P(*mut c_void);
// SAFETY: only passed back to the plugin, which allows its handles on any thread.
unsafe impl Send for P {}

/// Thread A registers and deregisters buffers on both comms in a loop while thread B moves
/// messages over them, as RCCL's service and progress threads do; B then closes the comms and
/// A gives back its last registration afterwards, which must not need the (freed) comm.
#[test]
fn registrations_on_one_thread_while_another_drives_the_comm() {
    if !common::have_rdma_device("abi_points::registrations_on_one_thread") {
        return;
    }
    const MESSAGES: usize = 200;
    const LEN: usize = 64 << 10;
    // SAFETY: the v8 table in RCCL's order; each buffer outlives its registration and every
    // request is tested to completion before its buffer is deregistered or the comms close.
    unsafe {
        assert_eq!(
            NET8.init.unwrap()(halo_harness::log::quiet_logger()),
            ncclSuccess
        );
        let (sc, rc) = common::connect_pair(&NET8);
        let (sc, rc) = (P(sc), P(rc));
        let stop = Arc::new(AtomicBool::new(false));
        let regs = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None::<(P, Vec<u8>)>));
        let service = {
            let (stop, regs, last) = (stop.clone(), regs.clone(), last.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 3 * 4096 + 17];
                let mut i = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let comm = if i & 1 == 0 { sc } else { rc };
                    let off = i % 4096;
                    let mut mh = null_mut();
                    assert_eq!(
                        NET8.regMr.unwrap()(
                            comm.0,
                            buf.as_mut_ptr().add(off).cast(),
                            buf.len() - off,
                            NCCL_PTR_HOST,
                            &mut mh
                        ),
                        ncclSuccess
                    );
                    assert_eq!(NET8.deregMr.unwrap()(comm.0, mh), ncclSuccess);
                    regs.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                // One registration outlives the comms.
                let mut mh = null_mut();
                assert_eq!(
                    NET8.regMr.unwrap()(
                        sc.0,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        NCCL_PTR_HOST,
                        &mut mh
                    ),
                    ncclSuccess
                );
                *last.lock().unwrap() = Some((P(mh), buf));
            })
        };
        let src: Vec<u8> = (0..LEN).map(|i| (i * 13 + 5) as u8).collect();
        let mut dst = vec![0u8; LEN];
        let (mut smh, mut rmh) = (null_mut(), null_mut());
        assert_eq!(
            NET8.regMr.unwrap()(
                sc.0,
                src.as_ptr() as *mut c_void,
                LEN,
                NCCL_PTR_HOST,
                &mut smh
            ),
            ncclSuccess
        );
        assert_eq!(
            NET8.regMr.unwrap()(rc.0, dst.as_mut_ptr().cast(), LEN, NCCL_PTR_HOST, &mut rmh),
            ncclSuccess
        );
        let t0 = Instant::now();
        for m in 0..MESSAGES {
            dst.fill(0);
            let mut rreq: *mut c_void = null_mut();
            let mut data = [dst.as_mut_ptr() as *mut c_void];
            let (mut sizes, mut tags, mut mhs) = ([LEN as c_int], [m as c_int], [rmh]);
            assert_eq!(
                NET8.irecv.unwrap()(
                    rc.0,
                    1,
                    data.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    tags.as_mut_ptr(),
                    mhs.as_mut_ptr(),
                    &mut rreq
                ),
                ncclSuccess
            );
            let mut sreq: *mut c_void = null_mut();
            while sreq.is_null() {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "isend never posted"
                );
                assert_eq!(
                    NET8.isend.unwrap()(
                        sc.0,
                        src.as_ptr() as *mut c_void,
                        LEN as c_int,
                        m as c_int,
                        smh,
                        &mut sreq
                    ),
                    ncclSuccess
                );
            }
            let (mut sd, mut rd) = (0, 0);
            let (mut ss, mut rs) = ([0 as c_int], [0 as c_int]);
            while sd == 0 || rd == 0 {
                assert!(t0.elapsed() < Duration::from_secs(120), "transfer hang");
                if sd == 0 {
                    assert_eq!(
                        NET8.test.unwrap()(sreq, &mut sd, ss.as_mut_ptr()),
                        ncclSuccess
                    );
                }
                if rd == 0 {
                    assert_eq!(
                        NET8.test.unwrap()(rreq, &mut rd, rs.as_mut_ptr()),
                        ncclSuccess
                    );
                }
            }
            assert_eq!(rs[0] as usize, LEN);
            assert!(dst == src, "message {m} corrupted");
        }
        stop.store(true, Ordering::Release);
        service.join().expect("service thread");
        assert_eq!(NET8.deregMr.unwrap()(sc.0, smh), ncclSuccess);
        assert_eq!(NET8.deregMr.unwrap()(rc.0, rmh), ncclSuccess);
        assert_eq!(NET8.closeSend.unwrap()(sc.0), ncclSuccess);
        assert_eq!(NET8.closeRecv.unwrap()(rc.0), ncclSuccess);
        let (mh, buf) = last.lock().unwrap().take().expect("the last registration");
        // The comm is closed: deregMr must work from the handle alone.
        assert_eq!(NET8.deregMr.unwrap()(sc.0, mh.0), ncclSuccess);
        drop(buf);
        eprintln!(
            "{MESSAGES} messages of {LEN} bytes checked while {} regMr/deregMr pairs ran",
            regs.load(Ordering::Relaxed)
        );
        assert!(regs.load(Ordering::Relaxed) > 0);
    }
}

static LINES: Mutex<Vec<(c_int, String)>> = Mutex::new(Vec::new());

struct Capture;

impl LogSink for Capture {
    fn line(level: c_int, _file: &str, _line: c_int, msg: &str) {
        LINES.lock().unwrap().push((level, msg.to_string()));
    }
}

/// Without any RDMA device `init` fails (so RCCL falls back) and says why at INFO, as RCCL's own
/// IB transport does, never at WARN. Runs in a child process that tries to hide the devices from
/// libibverbs (empty provider configuration and sysfs paths); where they stay visible (the
/// Soft-RoCE guest) it skips, so the check itself runs on hosts without RDMA (the host tests).
#[test]
fn no_rdma_device_is_reported_at_info() {
    const CHILD: &str = "HALO_ABI_POINTS_NODEV";
    if std::env::var_os(CHILD).is_none() {
        let empty = std::env::temp_dir().join(format!("halo-no-providers-{}", std::process::id()));
        std::fs::create_dir_all(&empty).expect("temp dir");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "no_rdma_device_is_reported_at_info",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("IBV_CONFIG_DIR", &empty)
            .env("SYSFS_PATH", &empty)
            .env_remove("HALO_REQUIRE_RDMA")
            .output()
            .expect("child");
        let _ = std::fs::remove_dir(&empty);
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}");
        assert!(out.status.success(), "child failed");
        return;
    }
    if halo_ibverbs::devices().is_ok_and(|d| !d.is_empty()) {
        eprintln!("SKIPPED (RDMA devices are visible)");
        return;
    }
    let mut p = Plugin::load(&artifacts::plugin_library(), 10).expect("dlopen the plugin");
    let e = p
        .init(logger::<Capture>(), 0)
        .expect_err("init without a device");
    assert_eq!(e.code, ncclSystemError);
    let lines = LINES.lock().unwrap().clone();
    let about: Vec<_> = lines
        .iter()
        .filter(|(_, m)| m.contains("no RDMA device") || m.contains("libibverbs"))
        .collect();
    assert!(!about.is_empty(), "init said nothing: {lines:?}");
    assert!(
        lines.iter().all(|(l, _)| *l != NCCL_LOG_WARN),
        "warnings logged: {lines:?}"
    );
    assert!(about.iter().all(|(l, _)| *l == NCCL_LOG_INFO), "{about:?}");
    eprintln!("NO-DEVICE CHECKED: {about:?}");
}
