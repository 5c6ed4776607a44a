//! GPU-direct paths of the plugin, driven through its v9 table, with a stand-in ROCm runtime
//! (`tests/c/fake_rocm.c`, built by build.rs) whose "device" memory is memfd pages of the host,
//! exported as real dma-bufs through `/dev/udmabuf` where the kernel has it.
//!
//! Every scenario runs in a child process (this binary re-executed with `HALO_GPU_DIRECT_CHILD`)
//! because ROCm is loaded and probed once per process; the stand-in is selected the way a real
//! runtime would be found, through `LD_LIBRARY_PATH`. The parent checks the child's exit status
//! and the plugin's log lines it printed.
//!
//! What this proves, and what it does not: the loader (including that a runtime already in the
//! process, under any file name, wins over one on the library path), the symbol declarations as
//! the stand-in exports them, that an exported descriptor holds the buffer's own pages, the
//! probe's fallback order and logging, what `ptrSupport`/`forceFlush` claim, the registration
//! cache's keys, the data path into buffers registered as GPU memory, and that
//! `iflush` posts and completes a real RDMA READ on the device. Soft-RoCE cannot register
//! dma-bufs (rdma-core's rxe provider has no `reg_dmabuf_mr`: EOPNOTSUPP), so a successful
//! `ibv_reg_dmabuf_mr` (strategy 1, `regMrDmaBuf` with a non-zero offset) and real GPU memory are
//! not exercised here; the refusal and the fallback are.
//!
//! Scenarios needing an RDMA device say so and skip without one, unless `HALO_REQUIRE_RDMA=1`.

mod common;

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v9 as NET;
use rccl_net_plugin::gpu::{self, MemKind};
use rccl_net_plugin::net::{self, CommHandle, RegKind};
use std::ffi::{c_int, c_void};
use std::process::{Command, Stdio};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "HALO_GPU_DIRECT_CHILD";
const FAKE_ROCM_DIR: &str = env!("HALO_FAKE_ROCM_DIR");
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `scenario` in a child; `standin` puts the stand-in ROCm on its library path. Returns
/// the child's combined output after checking it succeeded.
fn run_child(scenario: &str, standin: bool, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .env_remove("HALO_GPU_REG")
        .env_remove("FAKE_ROCM_DMABUF")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if standin {
        cmd.env("LD_LIBRARY_PATH", FAKE_ROCM_DIR);
    } else {
        cmd.env_remove("LD_LIBRARY_PATH");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("starting the child test process");
    // Drain both pipes while the child runs, so a talkative child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_reader = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err_reader = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for the child") {
            break Some(st);
        }
        if t0.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out_reader.join().unwrap_or_default()),
        String::from_utf8_lossy(&err_reader.join().unwrap_or_default())
    );
    let Some(status) = status else {
        panic!("scenario {scenario} timed out:\n{text}");
    };
    eprintln!("----- scenario {scenario} -----\n{text}----- end {scenario} -----");
    assert!(status.success(), "scenario {scenario} failed");
    assert!(
        text.contains(&format!("SCENARIO {scenario} PASSED")),
        "scenario {scenario} did not run to the end"
    );
    text
}

/// The child side: does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(s) = std::env::var(CHILD_ENV) else {
        return;
    };
    rccl_net_plugin::log::set_logger(halo_harness::log::stderr_logger());
    match s.as_str() {
        "standin_runtime" => standin_runtime(),
        "bundled_global" => bundled_runtime(Preload::Global),
        "bundled_local" => bundled_runtime(Preload::Local),
        "bundled_renamed" => bundled_runtime(Preload::Renamed),
        "absent_runtime" => absent_runtime(),
        "fallback" => fallback(),
        "dmabuf_only" => dmabuf_only(),
        "eager_gpu" => eager_gpu(),
        "no_rocm" => no_rocm(),
        other => panic!("unknown scenario {other}"),
    }
    println!("SCENARIO {s} PASSED");
}

// ------------------------------------------------------------------ host-runnable

/// The loader finds the stand-in through LD_LIBRARY_PATH; pointer classification, the GPU
/// agent's name and both dma-buf export outcomes.
#[test]
fn standin_runtime_is_loaded_and_classifies_pointers() {
    let out = run_child("standin_runtime", true, &[("FAKE_ROCM_DMABUF", "export")]);
    assert!(out.contains("GPU agents [gfx1151]"), "runtime line missing");
    assert!(
        out.contains("libamdhip64.so (loaded by name"),
        "where the runtime came from"
    );
    assert!(out.contains("dma-buf export supported by the driver"));
}

fn standin_runtime() {
    let rt = gpu::runtime().expect("the stand-in runtime loads");
    assert_eq!(rt.gpu_names(), ["gfx1151".to_string()]);
    assert_eq!(rt.dmabuf_supported(), Some(true));
    let buf = rt.alloc(1 << 20).expect("hipMalloc");
    assert_eq!(rt.classify(buf.ptr), MemKind::Device { ordinal: 0 });
    assert_eq!(
        rt.classify(buf.ptr + 4096 * 3),
        MemKind::Device { ordinal: 0 }
    );
    let host = [0u8; 64];
    assert_eq!(rt.classify(host.as_ptr() as u64), MemKind::Host);
    exported_fd_holds_the_buffer(rt, &buf);
    // The child runs this one test on one thread: nothing else reads the environment now.
    std::env::set_var("FAKE_ROCM_DMABUF", "fail");
    let e = rt
        .export_dmabuf(buf.ptr, 4096)
        .err()
        .expect("export fails when told to");
    assert!(e.contains("status 0x1000"), "{e}");
}

/// What `/proc/self/fd/<fd>` links to (`/dmabuf:` or `anon_inode:dmabuf` for a dma-buf,
/// `/memfd:... (deleted)` for a memfd).
fn fd_target(fd: c_int) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The exported descriptor refers to the buffer's own pages: bytes written through the
/// hipMalloc pointer are read back through a second mapping of the descriptor at the offset
/// the export reported, and the other way round. Where `/dev/udmabuf` exists (required with
/// `HALO_REQUIRE_UDMABUF=1`) the descriptor is a real dma-buf.
fn exported_fd_holds_the_buffer(rt: &'static gpu::Rocm, buf: &gpu::DeviceAlloc) {
    let udmabuf = std::path::Path::new("/dev/udmabuf").exists();
    if std::env::var("HALO_REQUIRE_UDMABUF").as_deref() == Ok("1") {
        assert!(
            udmabuf,
            "HALO_REQUIRE_UDMABUF=1 but /dev/udmabuf is missing"
        );
    }
    let at = 8192usize;
    let len = 3 * 4096 + 5;
    let bytes = pattern(len, 0x3c);
    // SAFETY: [ptr + at, ptr + at + len) lies inside the 1 MiB allocation.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (buf.ptr as usize + at) as *mut u8, len)
    };
    let d = rt
        .export_dmabuf(buf.ptr + at as u64, len)
        .expect("dma-buf export");
    assert!(d.fd >= 0);
    assert_eq!(
        d.offset, at as u64,
        "offset of the address inside the dma-buf"
    );
    let target = fd_target(d.fd);
    if udmabuf {
        assert!(target.contains("dmabuf"), "a real dma-buf, not {target}");
        println!("exported a dma-buf through /dev/udmabuf ({target})");
    } else {
        assert!(
            target.contains("memfd:fake-rocm-vram"),
            "the buffer's memfd, not {target}"
        );
        println!("no /dev/udmabuf: exported the buffer's memfd ({target})");
    }
    // SAFETY: a fresh shared mapping of the whole exported object (the allocation's size),
    // unmapped below; nothing else uses the address range.
    let map = unsafe {
        libc::mmap(
            null_mut(),
            buf.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            d.fd,
            0,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "mmap of the exported fd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping covers `buf.len` bytes and `at + len` is inside it.
    let seen = unsafe { std::slice::from_raw_parts((map as *const u8).add(at), len) };
    assert!(
        seen == &bytes[..],
        "the exported fd shows other bytes than the buffer's (first difference at {:?})",
        seen.iter().zip(&bytes).position(|(a, b)| a != b)
    );
    // SAFETY: as above; a write through the second mapping lands in the buffer's pages.
    unsafe { *(map as *mut u8).add(at + 1) = 0xa5 };
    // SAFETY: inside the allocation.
    assert_eq!(unsafe { *((buf.ptr as usize + at + 1) as *const u8) }, 0xa5);
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, buf.len) };
    drop(d);
    println!("verified {len} bytes through a second mapping of the exported fd");
}

/// How the test process loads the bundled runtime before the plugin looks for one.
#[derive(Clone, Copy)]
enum Preload {
    /// `dlopen(full path, RTLD_GLOBAL)`, as PyTorch's loader does with its bundled libraries.
    Global,
    /// `dlopen(full path, RTLD_LOCAL)`, as a dependency of a Python extension module is loaded.
    Local,
    /// RTLD_GLOBAL under a name that does not start with `libamdhip64` (a runtime linked into
    /// another library).
    Renamed,
}

const BUNDLED: &str = env!("HALO_FAKE_ROCM_BUNDLED");
const BUNDLED_VERSION: &str = env!("HALO_FAKE_ROCM_BUNDLED_VERSION");
const BUNDLED_GPU: &str = env!("HALO_FAKE_ROCM_BUNDLED_GPU");

/// A HIP runtime already in the process, under a file name `libamdhip64.so` does not match, is
/// the one the plugin uses, even with another runtime on the library path under the standard
/// name: it classifies the buffers the process allocated through it as device memory, its HSA
/// is the one queried, and the standard-name copy is never loaded.
#[test]
fn preloaded_bundled_runtime_is_used_rtld_global() {
    bundled_check("bundled_global", BUNDLED, "already loaded in the process)");
}

#[test]
fn preloaded_bundled_runtime_is_used_rtld_local() {
    bundled_check("bundled_local", BUNDLED, "already loaded in the process)");
}

#[test]
fn preloaded_runtime_under_another_name_is_found_by_symbol() {
    bundled_check(
        "bundled_renamed",
        "libtorch_hip_standin.so",
        "which defines hipPointerGetAttributes)",
    );
}

fn bundled_check(scenario: &str, path_part: &str, how: &str) {
    let out = run_child(scenario, true, &[("FAKE_ROCM_DMABUF", "export")]);
    let line = out
        .lines()
        .find(|l| l.contains("ROCm: HIP runtime"))
        .expect("the runtime line");
    assert!(
        line.contains(path_part) && line.contains(how),
        "the pre-loaded runtime is named with its origin: {line}"
    );
    assert!(line.contains(&format!("HIP {BUNDLED_VERSION}")), "{line}");
    assert!(
        line.contains(&format!("GPU agents [{BUNDLED_GPU}]")),
        "{line}"
    );
}

fn bundled_runtime(how: Preload) {
    let path = match how {
        Preload::Global | Preload::Local => BUNDLED.to_string(),
        Preload::Renamed => {
            let dir = std::env::temp_dir().join(format!("halo-bundled-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let link = dir.join("libtorch_hip_standin.so");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(BUNDLED, &link).unwrap();
            link.to_string_lossy().into_owned()
        }
    };
    let flags = libc::RTLD_NOW
        | match how {
            Preload::Local => libc::RTLD_LOCAL,
            _ => libc::RTLD_GLOBAL,
        };
    let cpath = std::ffi::CString::new(path.clone()).unwrap();
    // SAFETY: loading the stand-in runs no initialisers; the handle is kept for the process.
    let lib = unsafe { libc::dlopen(cpath.as_ptr(), flags) };
    assert!(!lib.is_null(), "pre-loading the bundled runtime");
    type HipMalloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
    // SAFETY: looking a name up in a live handle.
    let sym = unsafe { libc::dlsym(lib, c"hipMalloc".as_ptr()) };
    assert!(!sym.is_null(), "hipMalloc");
    // SAFETY: the stand-in's hipMalloc has this type.
    let malloc: HipMalloc = unsafe { std::mem::transmute::<*mut c_void, HipMalloc>(sym) };
    let mut p: *mut c_void = null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { malloc(&mut p, 1 << 16) }, 0);
    // What RCCL would hand the plugin: a buffer of the process's own runtime.
    let rt = gpu::runtime().expect("a runtime");
    assert_eq!(rt.hip_version().to_string(), BUNDLED_VERSION);
    assert_eq!(rt.gpu_names(), [BUNDLED_GPU.to_string()]);
    assert_eq!(
        rt.classify(p as u64),
        MemKind::Device { ordinal: 0 },
        "the process's buffers are device memory to the plugin"
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains("libfake-rocm.so"),
        "the runtime on the library path was loaded as well"
    );
    if let Preload::Renamed = how {
        let _ = std::fs::remove_dir_all(std::path::Path::new(&path).parent().unwrap());
    }
}

/// Without any ROCm on the library path the plugin says once, at INFO, that it has no GPU
/// memory support.
#[test]
fn absent_runtime_means_no_gpu_support() {
    let out = run_child("absent_runtime", false, &[]);
    assert_eq!(
        out.matches("no GPU memory support").count(),
        1,
        "said exactly once"
    );
}

fn absent_runtime() {
    assert!(gpu::runtime().is_none());
    assert!(gpu::runtime().is_none());
}

// ------------------------------------------------------------------ with an RDMA device

/// Soft-RoCE has no dma-buf MRs: the probe falls back from strategy 1 to 2 on the stand-in's
/// memory, advertises NCCL_PTR_CUDA (not DMABUF) and forceFlush; data lands intact in
/// "device" buffers; iflush performs a real RDMA READ; regMrDmaBuf falls back to the address.
/// Run once with an export that fails in HSA and once with one that yields a memfd the NIC
/// refuses.
#[test]
fn probe_falls_back_to_registration_by_address() {
    if !common::have_rdma_device("gpu_direct fallback") {
        return;
    }
    let out = run_child("fallback", true, &[("FAKE_ROCM_DMABUF", "fail")]);
    assert!(out.contains("registered by address"), "strategy 2 won");
    assert!(
        out.contains("flush probe passed (RC QP connected to itself, one RDMA READ and one RDMA WRITE checked)"),
        "the flush QP was probed at init before GPU memory was advertised"
    );
    assert!(
        out.contains("hsa_amd_portable_export_dmabuf") && out.contains("status 0x1000"),
        "why dma-buf lost (export)"
    );
    let out = run_child("fallback", true, &[("FAKE_ROCM_DMABUF", "export")]);
    assert!(out.contains("registered by address"), "strategy 2 won");
    assert!(
        out.contains("ibv_reg_dmabuf_mr") && out.contains("(errno 95)"),
        "why dma-buf lost (EOPNOTSUPP from the NIC)"
    );
    assert!(
        out.contains("registers GPU memory by address, so"),
        "regMrDmaBuf fell back"
    );
}

/// With the eager path on, a send from "device" memory posted before its receive goes eagerly and
/// is done once its write has completed; the receive, into "device" memory the CPU must not
/// write, gets the message by a NIC copy out of the bounce slot (on the flush QP), checked byte
/// for byte, and the comms stay usable.
#[test]
fn eager_messages_reach_gpu_memory_by_a_nic_copy() {
    if !common::have_rdma_device("gpu_direct eager_gpu") {
        return;
    }
    let out = run_child(
        "eager_gpu",
        true,
        &[("FAKE_ROCM_DMABUF", "fail"), ("HALO_EAGER_MAX", "8192")],
    );
    assert!(
        out.contains("eager message copied into device memory by the NIC: 6000 bytes verified"),
        "{out}"
    );
    assert!(
        out.contains("copied by the NIC), 0 too large for their receive"),
        "the receive comm's close line counts the copies"
    );
}

/// With only strategy 1 allowed and no dma-buf MRs, NCCL_PTR_CUDA is not advertised,
/// regMr(CUDA) is refused, regMrDmaBuf fails with the NIC's reason, and the comm still works.
#[test]
fn dmabuf_only_without_nic_support_advertises_host_only() {
    if !common::have_rdma_device("gpu_direct dmabuf_only") {
        return;
    }
    let out = run_child(
        "dmabuf_only",
        true,
        &[("HALO_GPU_REG", "dmabuf"), ("FAKE_ROCM_DMABUF", "export")],
    );
    assert!(out.contains("cannot be registered"), "strategy 3 logged");
    assert!(
        !out.contains("flush probe"),
        "no flush QP where GPU memory is not advertised"
    );
    assert!(out.contains("skipped (HALO_GPU_REG=dmabuf)"));
    assert!(out.contains("regMrDmaBuf of 65536 bytes at offset 4096"));
}

/// No ROCm at all: host memory only, and regMr(CUDA) is InvalidUsage with a log line.
#[test]
fn no_rocm_registers_host_memory_only() {
    if !common::have_rdma_device("gpu_direct no_rocm") {
        return;
    }
    let out = run_child("no_rocm", false, &[]);
    assert!(out.contains("no GPU memory support"));
    assert!(out.contains("does not advertise NCCL_PTR_CUDA"));
}

struct Pair {
    sc: *mut c_void,
    rc: *mut c_void,
}

/// Device 0's properties as the plugin's v9 table reports them.
fn props() -> ncclNetProperties_v9_t {
    let mut p = ncclNetProperties_v9_t::zeroed();
    assert_eq!(
        // SAFETY: the plugin's own v9 table, linked into this binary; `p` is a live v9
        // properties struct (and before `init` the plugin only reports an error).
        unsafe { NET.getProperties.unwrap()(0, &mut p) },
        ncclSuccess
    );
    p
}

/// Initialises the plugin and connects a send comm to a receive comm on device 0, polling
/// connect and accept as RCCL's proxy does.
fn init_and_connect() -> Pair {
    // SAFETY: calls through the plugin's own v9 table (linked into this binary), `init` first;
    // every pointer passed is to a local of this function (the 128-byte handle, the comm
    // slots) and `lc` is the listen comm the plugin just returned, closed last.
    unsafe {
        assert_eq!(
            NET.init.unwrap()(halo_harness::log::stderr_logger()),
            ncclSuccess
        );
        let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
        let mut lc: *mut c_void = null_mut();
        assert_eq!(
            NET.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
            ncclSuccess
        );
        let (mut sc, mut rc): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
        let t0 = Instant::now();
        while sc.is_null() || rc.is_null() {
            assert!(t0.elapsed() < Duration::from_secs(60), "connect/accept");
            if sc.is_null() {
                assert_eq!(
                    NET.connect.unwrap()(0, handle.as_mut_ptr().cast(), &mut sc, null_mut()),
                    ncclSuccess
                );
            }
            if rc.is_null() {
                assert_eq!(NET.accept.unwrap()(lc, &mut rc, null_mut()), ncclSuccess);
            }
        }
        assert_eq!(NET.closeListen.unwrap()(lc), ncclSuccess);
        Pair { sc, rc }
    }
}

/// `regMr` of `len` bytes at `p` as memory type `ty`: the result and the handle.
///
/// # Safety
/// `comm` is a live comm of the plugin, and `[p, p + len)` stays mapped until the handle is
/// deregistered.
unsafe fn reg(comm: *mut c_void, p: u64, len: usize, ty: c_int) -> (ncclResult_t, *mut c_void) {
    let mut h: *mut c_void = null_mut();
    // SAFETY: `comm` and the range are as the caller promises; `h` is a local.
    let r = unsafe { NET.regMr.unwrap()(comm, p as *mut c_void, len, ty, &mut h) };
    (r, h)
}

/// Tests `req` until it is done.
///
/// # Safety
/// `req` is a live request of the plugin that nothing else tests; `sizes` is NULL or has room
/// for the request's sizes.
unsafe fn wait(req: *mut c_void, sizes: *mut c_int, what: &str) {
    let t0 = Instant::now();
    let mut done = 0;
    while done == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} never completed"
        );
        assert_eq!(
            // SAFETY: `req` is live until this call reports it done (the loop then stops) and
            // `sizes` is as the caller promises; `done` is a local.
            unsafe { NET.test.unwrap()(req, &mut done, sizes) },
            ncclSuccess,
            "{what}"
        );
    }
}

/// Sends `len` bytes from `src` to `dst` (both registered) and returns the receive's size.
///
/// # Safety
/// `p`'s comms are live; `smh` registers `len` bytes at `src` on `p.sc` and `rmh` registers
/// `dst_len` bytes at `dst` on `p.rc`, all of them mapped until this returns.
unsafe fn transfer(
    p: &Pair,
    src: u64,
    smh: *mut c_void,
    dst: u64,
    dst_len: usize,
    rmh: *mut c_void,
    len: usize,
) -> usize {
    // SAFETY: as the caller promises.
    let rreq = unsafe { irecv(p, dst, dst_len, rmh) };
    let mut sreq: *mut c_void = null_mut();
    let t0 = Instant::now();
    while sreq.is_null() {
        assert!(t0.elapsed() < Duration::from_secs(30), "isend never posted");
        assert_eq!(
            // SAFETY: the comm and the buffer are as the caller promises; `sreq` is a local.
            unsafe { NET.isend.unwrap()(p.sc, src as *mut c_void, len, 7, smh, &mut sreq) },
            ncclSuccess
        );
    }
    let mut ssize = [-1 as c_int];
    let mut rsize = [-1 as c_int];
    // SAFETY: both requests were just posted and only these calls test them; each sizes array
    // has room for its request's one buffer.
    unsafe {
        wait(sreq, ssize.as_mut_ptr(), "send");
        wait(rreq, rsize.as_mut_ptr(), "receive");
    }
    assert_eq!(ssize[0] as usize, len);
    rsize[0] as usize
}

/// Posts a receive of up to `dst_len` bytes into `dst` (tag 7); the request.
///
/// # Safety
/// `p.rc` is live and `rmh` registers `dst_len` bytes at `dst` on it, mapped until the request
/// completes.
unsafe fn irecv(p: &Pair, dst: u64, dst_len: usize, rmh: *mut c_void) -> *mut c_void {
    let mut rreq: *mut c_void = null_mut();
    let mut data = [dst as *mut c_void];
    let mut sizes = [dst_len];
    let mut tags = [7 as c_int];
    let mut mhs = [rmh];
    assert_eq!(
        // SAFETY: the comm and the buffer are as the caller promises; the arrays hold one
        // entry each and are locals, as is the request slot.
        unsafe {
            NET.irecv.unwrap()(
                p.rc,
                1,
                data.as_mut_ptr(),
                sizes.as_mut_ptr(),
                tags.as_mut_ptr(),
                mhs.as_mut_ptr(),
                &mut rreq,
            )
        },
        ncclSuccess
    );
    assert!(!rreq.is_null());
    rreq
}

/// `iflush` of one received buffer; the request (NULL = nothing to flush).
///
/// # Safety
/// `p.rc` is live and `rmh` registers at least `len` bytes at `dst` on it, mapped until the
/// returned request completes.
unsafe fn iflush(p: &Pair, dst: u64, len: usize, rmh: *mut c_void) -> *mut c_void {
    let mut req: *mut c_void = null_mut();
    let mut data = [dst as *mut c_void];
    let mut sizes = [len as c_int];
    let mut mhs = [rmh];
    assert_eq!(
        // SAFETY: the comm and the buffer are as the caller promises; the arrays hold one
        // entry each and are locals, as is the request slot.
        unsafe {
            NET.iflush.unwrap()(
                p.rc,
                1,
                data.as_mut_ptr(),
                sizes.as_mut_ptr(),
                mhs.as_mut_ptr(),
                &mut req,
            )
        },
        ncclSuccess
    );
    req
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A host-memory transfer of 4 KiB, proving the comms are usable.
///
/// # Safety
/// `p`'s comms are live.
unsafe fn host_roundtrip(p: &Pair) {
    let src = pattern(4096, 5);
    let mut dst = vec![0u8; 4096];
    // SAFETY: `p`'s comms are live (the caller's contract); `src` and `dst` are registered on
    // them, outlive the transfer (both requests are waited for) and are deregistered before
    // they drop; a host receive leaves no flush request behind.
    unsafe {
        let (r, smh) = reg(p.sc, src.as_ptr() as u64, src.len(), NCCL_PTR_HOST);
        assert_eq!(r, ncclSuccess);
        let (r, rmh) = reg(p.rc, dst.as_mut_ptr() as u64, dst.len(), NCCL_PTR_HOST);
        assert_eq!(r, ncclSuccess);
        let n = transfer(
            p,
            src.as_ptr() as u64,
            smh,
            dst.as_mut_ptr() as u64,
            dst.len(),
            rmh,
            src.len(),
        );
        assert_eq!(n, src.len());
        assert_eq!(dst, src);
        assert!(
            iflush(p, dst.as_ptr() as u64, n, rmh).is_null(),
            "host receives need no flush"
        );
        assert_eq!(NET.deregMr.unwrap()(p.sc, smh), ncclSuccess);
        assert_eq!(NET.deregMr.unwrap()(p.rc, rmh), ncclSuccess);
    }
}

fn fallback() {
    let rt = gpu::runtime().expect("stand-in");
    // SAFETY: the plugin's table is called as RCCL would, with live buffers and comms.
    unsafe {
        let p = init_and_connect();
        let pr = props();
        assert_eq!(
            pr.ptrSupport,
            NCCL_PTR_HOST | NCCL_PTR_CUDA,
            "CUDA only after strategy 2 succeeded"
        );
        assert_eq!(pr.forceFlush, 1);
        let dev = net::plugin().unwrap().devices[0].clone();
        assert_eq!(dev.gpu.strategy, gpu::Strategy::Va);

        let len = (1 << 20) + 3;
        let src = rt.alloc(2 << 20).unwrap();
        let dst = rt.alloc(2 << 20).unwrap();
        let bytes = pattern(len, 11);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), src.ptr as *mut u8, len);
        let (r, smh) = reg(p.sc, src.ptr, src.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        let (r, rmh) = reg(p.rc, dst.ptr, dst.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        assert_eq!(dev.regs.count(RegKind::GpuVa), 2);
        // The same range again only takes a reference; a range inside it gets its own.
        let (r, again) = reg(p.rc, dst.ptr, dst.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        assert_eq!(dev.regs.count(RegKind::GpuVa), 2, "cached by address range");
        assert_eq!(NET.deregMr.unwrap()(p.rc, again), ncclSuccess);
        let (r, inner) = reg(p.rc, dst.ptr + 4096, 8192, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        assert_eq!(
            dev.regs.count(RegKind::GpuVa),
            3,
            "sub-ranges are not shared"
        );
        assert_eq!(NET.deregMr.unwrap()(p.rc, inner), ncclSuccess);
        assert_eq!(dev.regs.count(RegKind::GpuVa), 2);

        let n = transfer(&p, src.ptr, smh, dst.ptr, dst.len, rmh, len);
        assert_eq!(n, len);
        assert_eq!(
            std::slice::from_raw_parts(dst.ptr as *const u8, len),
            &bytes[..]
        );
        println!("verified {len} bytes into stand-in device memory");

        let recv = CommHandle::recv_comm(p.rc).expect("a receive comm");
        assert_eq!(recv.flush_reads_done(), 0);
        let freq = iflush(&p, dst.ptr, n, rmh);
        assert!(!freq.is_null(), "a GPU receive is flushed");
        wait(freq, null_mut(), "flush");
        assert_eq!(
            recv.flush_reads_done(),
            1,
            "one RDMA READ completed on the device"
        );
        println!("iflush completed one RDMA READ");
        // Nothing received (size 0) needs no flush.
        assert!(iflush(&p, dst.ptr, 0, rmh).is_null());
        host_roundtrip(&p);

        // RCCL's own dma-buf of the buffer (a real one where /dev/udmabuf exists): the NIC
        // refuses it, the device registers by address instead. The probe is over: let the
        // stand-in export (this scenario's only thread that reads the environment).
        std::env::set_var("FAKE_ROCM_DMABUF", "export");
        let d = rt.export_dmabuf(dst.ptr + 4096, 65536).expect("export");
        assert_eq!(d.offset, 4096);
        let mut h: *mut c_void = null_mut();
        let r = NET.regMrDmaBuf.unwrap()(
            p.rc,
            (dst.ptr + 4096) as *mut c_void,
            65536,
            NCCL_PTR_CUDA,
            d.offset,
            d.fd,
            &mut h,
        );
        drop(d);
        assert_eq!(r, ncclSuccess);
        assert_eq!(dev.regs.count(RegKind::DmaBuf), 0);
        let n = transfer(&p, src.ptr, smh, dst.ptr + 4096, 65536, h, 1000);
        assert_eq!(n, 1000);
        assert_eq!(NET.deregMr.unwrap()(p.rc, h), ncclSuccess);
        // fd -1: plain registration.
        let r = NET.regMrDmaBuf.unwrap()(
            p.sc,
            src.ptr as *mut c_void,
            4096,
            NCCL_PTR_CUDA,
            0,
            -1,
            &mut h,
        );
        assert_eq!(r, ncclSuccess);
        assert_eq!(NET.deregMr.unwrap()(p.sc, h), ncclSuccess);

        assert_eq!(NET.deregMr.unwrap()(p.sc, smh), ncclSuccess);
        assert_eq!(NET.deregMr.unwrap()(p.rc, rmh), ncclSuccess);
        assert_eq!(dev.regs.count(RegKind::GpuVa), 0);
        assert_eq!(NET.closeSend.unwrap()(p.sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(p.rc), ncclSuccess);
    }
}

fn eager_gpu() {
    let rt = gpu::runtime().expect("stand-in");
    // SAFETY: the plugin's table is called as RCCL would, with live buffers and comms; every
    // request is tested until done before its buffers are deregistered.
    unsafe {
        let p = init_and_connect();
        assert_eq!(props().ptrSupport, NCCL_PTR_HOST | NCCL_PTR_CUDA);
        let len = 6000;
        let src = rt.alloc(1 << 16).unwrap();
        let dst = rt.alloc(1 << 16).unwrap();
        let bytes = pattern(len, 23);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), src.ptr as *mut u8, len);
        let (r, smh) = reg(p.sc, src.ptr, src.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        let (r, rmh) = reg(p.rc, dst.ptr, dst.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclSuccess);
        // No receive posted yet: the send goes eagerly, at the first call.
        let mut sreq: *mut c_void = null_mut();
        assert_eq!(
            NET.isend.unwrap()(p.sc, src.ptr as *mut c_void, len, 7, smh, &mut sreq),
            ncclSuccess
        );
        assert!(
            !sreq.is_null(),
            "a 6000-byte send with no receive went eagerly"
        );
        let mut ssize = [-1 as c_int];
        wait(sreq, ssize.as_mut_ptr(), "eager send");
        assert_eq!(ssize[0] as usize, len);
        let rreq = irecv(&p, dst.ptr, dst.len, rmh);
        let mut rsize = [-1 as c_int];
        wait(rreq, rsize.as_mut_ptr(), "receive into device memory");
        assert_eq!(rsize[0] as usize, len);
        assert_eq!(
            std::slice::from_raw_parts(dst.ptr as *const u8, len),
            &bytes[..]
        );
        let recv = CommHandle::recv_comm(p.rc).expect("a receive comm");
        assert_eq!(recv.counters().0.eager_dma, 1, "the NIC copied the message");
        println!("eager message copied into device memory by the NIC: {len} bytes verified");
        let freq = iflush(&p, dst.ptr, len, rmh);
        assert!(!freq.is_null(), "a GPU receive is flushed");
        wait(freq, null_mut(), "flush");
        // The comms carry on, eagerly or not.
        let n = transfer(&p, src.ptr, smh, dst.ptr, dst.len, rmh, 100);
        assert_eq!(n, 100);
        host_roundtrip(&p);
        assert_eq!(NET.deregMr.unwrap()(p.sc, smh), ncclSuccess);
        assert_eq!(NET.deregMr.unwrap()(p.rc, rmh), ncclSuccess);
        assert_eq!(NET.closeSend.unwrap()(p.sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(p.rc), ncclSuccess);
    }
}

fn dmabuf_only() {
    let rt = gpu::runtime().expect("stand-in");
    // SAFETY: the plugin's table is called as RCCL would, with live buffers and comms.
    unsafe {
        let p = init_and_connect();
        let pr = props();
        assert_eq!(pr.ptrSupport, NCCL_PTR_HOST);
        assert_eq!(pr.forceFlush, 0);
        let buf = rt.alloc(1 << 20).unwrap();
        let (r, h) = reg(p.rc, buf.ptr, buf.len, NCCL_PTR_CUDA);
        assert_eq!(r, ncclInvalidUsage);
        assert!(h.is_null());
        let d = rt.export_dmabuf(buf.ptr + 4096, 65536).expect("export");
        assert_eq!(d.offset, 4096);
        let mut h: *mut c_void = null_mut();
        let r = NET.regMrDmaBuf.unwrap()(
            p.rc,
            (buf.ptr + 4096) as *mut c_void,
            65536,
            NCCL_PTR_CUDA,
            d.offset,
            d.fd,
            &mut h,
        );
        drop(d);
        assert_eq!(r, ncclSystemError, "the NIC's refusal is reported");
        assert!(h.is_null());
        host_roundtrip(&p);
        println!("comm usable after the failed regMrDmaBuf");
        assert_eq!(NET.closeSend.unwrap()(p.sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(p.rc), ncclSuccess);
    }
}

fn no_rocm() {
    // SAFETY: the plugin's table is called as RCCL would, with live buffers and comms.
    unsafe {
        let p = init_and_connect();
        let pr = props();
        assert_eq!(pr.ptrSupport, NCCL_PTR_HOST);
        assert_eq!(pr.forceFlush, 0);
        let mem = vec![0u8; 8192];
        let (r, h) = reg(p.rc, mem.as_ptr() as u64, mem.len(), NCCL_PTR_CUDA);
        assert_eq!(r, ncclInvalidUsage);
        assert!(h.is_null());
        host_roundtrip(&p);
        assert_eq!(NET.closeSend.unwrap()(p.sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(p.rc), ncclSuccess);
    }
}
