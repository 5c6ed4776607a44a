//! Functions shared by the per-version tables, in version-neutral argument types.

use super::{guard, report};
use crate::log;
use crate::net::{
    self, CommHandle, ListenComm, MrHandle, NetError, NetResult, Props, Request, COMM_RECV,
    COMM_SEND, HANDLE_SIZE, MAX_RECVS,
};
use halo_ffi::*;
use std::ffi::{c_int, c_void};

/// The plugin's `name` field (RCCL's `NCCL_NET` compares it case-insensitively).
pub const PLUGIN_NAME: &std::ffi::CStr = c"halo";

fn out<'a, T>(p: *mut T, what: &str) -> NetResult<&'a mut T> {
    // SAFETY: RCCL passes valid out-pointers or NULL; NULL is refused here.
    unsafe { p.as_mut() }.ok_or_else(|| NetError::InvalidArgument(format!("{what} is NULL")))
}

/// `init` of v6 … v10 (no `finalize`: the state lives until the library is unloaded); `prof`
/// is the profiler callback of v10 (`None` before).
pub fn init(logger: ncclDebugLogger_t, prof: ncclProfilerCallback_t) -> ncclResult_t {
    log::set_logger(logger);
    net::profiler::set_callback(prof);
    guard("init", || net::init().map(|_| ()))
}

pub fn devices(ndev: *mut c_int) -> ncclResult_t {
    guard("devices", || {
        *out(ndev, "ndev")? = net::plugin()?.devices.len() as c_int;
        Ok(())
    })
}

/// Fills the common property fields and hands the rest to `fill`.
pub fn properties(dev: c_int, fill: impl FnOnce(&Props)) -> ncclResult_t {
    guard("getProperties", || {
        let p = net::plugin()?.properties(dev)?;
        fill(&p);
        Ok(())
    })
}

fn handle_buf<'a>(handle: *mut c_void) -> NetResult<&'a mut [u8; HANDLE_SIZE]> {
    // SAFETY: RCCL's handle buffers are NCCL_NET_HANDLE_MAXSIZE (128) bytes.
    unsafe { (handle as *mut [u8; HANDLE_SIZE]).as_mut() }
        .ok_or_else(|| NetError::InvalidArgument("handle is NULL".into()))
}

pub fn listen(
    dev: c_int,
    handle: *mut c_void,
    listen_comm: *mut *mut c_void,
    tc: Option<i32>,
) -> ncclResult_t {
    guard("listen", || {
        let out_comm = out(listen_comm, "listenComm")?;
        let comm = net::plugin()?.listen(dev, handle_buf(handle)?, tc)?;
        *out_comm = Box::into_raw(comm) as *mut c_void;
        Ok(())
    })
}

/// `connect` of every version. A host-only plugin has no device comm: like NCCL's own IB
/// transport, it never touches the `sendDevComm` out-argument of v7+ (some RCCL builds pass a
/// 4-byte object there), so the versions do not even pass it down.
pub fn connect(
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    tc: Option<i32>,
) -> ncclResult_t {
    guard("connect", || {
        let out_comm = out(send_comm, "sendComm")?;
        *out_comm = std::ptr::null_mut();
        if let Some(c) = net::plugin()?.connect(dev, handle_buf(handle)?, tc)? {
            *out_comm = CommHandle::send(c);
        }
        Ok(())
    })
}

/// `accept` of every version; `recvDevComm` is left alone as in [`connect`].
pub fn accept(listen_comm: *mut c_void, recv_comm: *mut *mut c_void) -> ncclResult_t {
    guard("accept", || {
        let out_comm = out(recv_comm, "recvComm")?;
        *out_comm = std::ptr::null_mut();
        let l = out(listen_comm as *mut ListenComm, "listenComm")?;
        if let Some(c) = l.poll_accept()? {
            *out_comm = CommHandle::recv(c);
        }
        Ok(())
    })
}

pub fn reg_mr(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ty: c_int,
    mhandle: *mut *mut c_void,
) -> ncclResult_t {
    guard("regMr", || {
        let out_h = out(mhandle, "mhandle")?;
        // SAFETY: RCCL passes comms it got from this plugin; only the immutable handle is read.
        let dev = unsafe { CommHandle::device(comm) }?;
        // SAFETY: RCCL keeps the buffer allocated until deregMr.
        let h = unsafe { net::register(&dev, ty, data as u64, size as u64) }?;
        *out_h = Box::into_raw(h) as *mut c_void;
        Ok(())
    })
}

pub fn reg_mr_dmabuf(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ty: c_int,
    offset: u64,
    fd: c_int,
    mhandle: *mut *mut c_void,
) -> ncclResult_t {
    guard("regMrDmaBuf", || {
        let out_h = out(mhandle, "mhandle")?;
        // SAFETY: RCCL passes comms it got from this plugin; only the immutable handle is read.
        let dev = unsafe { CommHandle::device(comm) }?;
        // SAFETY: RCCL keeps the buffer allocated until deregMr and owns fd during the call.
        let h = unsafe { net::register_dmabuf(&dev, ty, data as u64, size as u64, offset, fd) }?;
        *out_h = Box::into_raw(h) as *mut c_void;
        Ok(())
    })
}

/// `deregMr`: the handle knows its device; the comm (which another thread may be driving) is
/// not looked at.
pub fn dereg_mr(_comm: *mut c_void, mhandle: *mut c_void) -> ncclResult_t {
    guard("deregMr", || {
        if mhandle.is_null() {
            // Nothing was registered: nothing to give back (as NCCL's own transports do).
            return Ok(());
        }
        // SAFETY: handles come from reg_mr's Box::into_raw and are given back once.
        let h = *unsafe { Box::from_raw(mhandle as *mut MrHandle) };
        h.release()
    })
}

fn mh<'a>(p: *mut c_void) -> Option<&'a MrHandle> {
    // SAFETY: RCCL passes handles from reg_mr (or NULL).
    unsafe { (p as *const MrHandle).as_ref() }
}

pub fn isend(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    tag: c_int,
    mhandle: *mut c_void,
    phandle: *mut c_void,
    request: *mut *mut c_void,
) -> ncclResult_t {
    let out_req = match out(request, "request") {
        Ok(r) => r,
        Err(e) => return report("isend", &e),
    };
    *out_req = std::ptr::null_mut();
    // The call that posts a message, and the one a sender waiting for the receiver makes again
    // and again (a NULL request): one `contained` frame and one look at the handle for either,
    // so a panic still never crosses the C boundary.
    let r = crate::net::contained(|| {
        // SAFETY: RCCL passes send comms of this plugin, driven from this thread only.
        let c = unsafe { CommHandle::send_comm(comm) }?;
        c.isend(data as u64, size as u64, tag, mh(mhandle), phandle)
    });
    match r {
        Ok(Some(req)) => {
            *out_req = req as *mut c_void;
            ncclSuccess
        }
        Ok(None) => ncclSuccess,
        Err(e) => report("isend", &e),
    }
}

/// `irecv`; `size_of(i)` reads the capacity of buffer `i` from the version's sizes array;
/// `phandles` holds the profiler's handle per buffer (v10+; NULL before).
#[allow(clippy::too_many_arguments)]
pub fn irecv(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    size_of: impl Fn(usize) -> usize,
    tags: *mut c_int,
    mhandles: *mut *mut c_void,
    phandles: *mut *mut c_void,
    request: *mut *mut c_void,
) -> ncclResult_t {
    guard("irecv", || {
        let out_req = out(request, "request")?;
        // The request may arrive as (void*)1 (optional completion): always overwrite it.
        *out_req = std::ptr::null_mut();
        // SAFETY: RCCL passes receive comms of this plugin, driven from this thread only.
        let c = unsafe { CommHandle::recv_comm(comm) }?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| (1..=MAX_RECVS).contains(&n))
            .ok_or_else(|| {
                NetError::InvalidArgument(format!("irecv of {n} buffers (1..={MAX_RECVS} allowed)"))
            })?;
        if data.is_null() || tags.is_null() || mhandles.is_null() {
            return Err(NetError::InvalidArgument(
                "irecv with a NULL data, tags or mhandles array".into(),
            ));
        }
        // SAFETY: RCCL's arrays hold n entries, i < n.
        let buf = |i: usize| unsafe {
            (
                *data.add(i) as u64,
                size_of(i) as u64,
                *tags.add(i),
                mh(*mhandles.add(i)),
            )
        };
        let ph = |i: usize| {
            if phandles.is_null() {
                std::ptr::null_mut()
            } else {
                // SAFETY: a non-NULL phandles array holds one handle per buffer, i < n.
                unsafe { *phandles.add(i) }
            }
        };
        // The common receive has one buffer: no arrays of eight to fill.
        let r = if n == 1 {
            c.irecv(&[buf(0)], &[ph(0)])?
        } else {
            let bufs: [_; MAX_RECVS] =
                std::array::from_fn(|i| if i < n { buf(i) } else { buf_none() });
            let phs: [_; MAX_RECVS] =
                std::array::from_fn(|i| if i < n { ph(i) } else { std::ptr::null_mut() });
            c.irecv(&bufs[..n], &phs[..n])?
        };
        if let Some(r) = r {
            *out_req = r as *mut c_void;
        }
        Ok(())
    })
}

/// An unused buffer slot of `irecv`'s array.
fn buf_none<'a>() -> (u64, u64, i32, Option<&'a MrHandle>) {
    (0, 0, 0, None)
}

/// `iflush` of the `n` buffers of a completed receive (`sizes_of(i)` = bytes received).
pub fn iflush(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    size_of: impl Fn(usize) -> usize,
    mhandles: *mut *mut c_void,
    request: *mut *mut c_void,
) -> ncclResult_t {
    guard("iflush", || {
        let out_req = out(request, "request")?;
        *out_req = std::ptr::null_mut();
        // SAFETY: RCCL passes receive comms of this plugin, driven from this thread only.
        let c = unsafe { CommHandle::recv_comm(comm) }?;
        let n = usize::try_from(n).unwrap_or(0).min(MAX_RECVS);
        if n == 0 || data.is_null() || mhandles.is_null() {
            return Ok(());
        }
        let mut bufs = [(0u64, 0u64, None); MAX_RECVS];
        for (i, b) in bufs.iter_mut().enumerate().take(n) {
            // SAFETY: RCCL's arrays hold n entries.
            unsafe { *b = (*data.add(i) as u64, size_of(i) as u64, mh(*mhandles.add(i))) };
        }
        if let Some(r) = c.iflush(&bufs[..n])? {
            *out_req = r as *mut c_void;
        }
        Ok(())
    })
}

/// `test`, the most frequent call of the data path, runs without the panic guard of the other
/// calls: what in it could panic (handling completions, the occasional link checks) runs under
/// its own ([`crate::net`]'s `contained`); the rest is loads, stores and a completion poll.
pub fn test(request: *mut c_void, done: *mut c_int, sizes: *mut c_int) -> ncclResult_t {
    if done.is_null() {
        return report("test", &NetError::InvalidArgument("done is NULL".into()));
    }
    // SAFETY: checked non-NULL; RCCL's out-pointer.
    unsafe { *done = 0 };
    if request.is_null() {
        return report(
            "test",
            &NetError::InvalidArgument("test of a NULL request".into()),
        );
    }
    let mut s = [0u64; MAX_RECVS];
    // No closure-and-guard around the most frequent call, but a panic still never crosses the C
    // boundary: `contained` turns it into an internal error (catch_unwind costs nothing until
    // something panics).
    // SAFETY: RCCL tests requests it got from isend/irecv on open comms, from the comm's thread.
    match crate::net::contained(|| unsafe { Request::test(request as *mut Request, &mut s) }) {
        Ok(Some(n)) => {
            report_sizes(&s[..n.min(MAX_RECVS)], sizes);
            // SAFETY: as above.
            unsafe { *done = 1 };
            ncclSuccess
        }
        Ok(None) => ncclSuccess,
        Err(e) => report("test", &e),
    }
}

/// Writes the sizes of a finished request into RCCL's `sizes` array (NULL: not wanted).
fn report_sizes(s: &[u64], sizes: *mut c_int) {
    if sizes.is_null() {
        return;
    }
    if let [v] = s {
        // SAFETY: RCCL's sizes array has one int per receive of the request.
        unsafe { *sizes = *v as c_int };
        return;
    }
    for (i, v) in s.iter().enumerate() {
        // SAFETY: RCCL's sizes array has one int per receive of the request.
        unsafe { *sizes.add(i) = *v as c_int };
    }
}

pub fn close_send(comm: *mut c_void) -> ncclResult_t {
    guard("closeSend", || {
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: from connect, closed once, used by no thread afterwards.
        unsafe { CommHandle::close(comm, COMM_SEND) }
    })
}

pub fn close_recv(comm: *mut c_void) -> ncclResult_t {
    guard("closeRecv", || {
        if comm.is_null() {
            return Ok(());
        }
        // SAFETY: from accept, closed once, used by no thread afterwards.
        unsafe { CommHandle::close(comm, COMM_RECV) }
    })
}

pub fn close_listen(comm: *mut c_void) -> ncclResult_t {
    guard("closeListen", || {
        if !comm.is_null() {
            // SAFETY: from listen's Box::into_raw, closed once.
            drop(unsafe { Box::from_raw(comm as *mut ListenComm) });
        }
        Ok(())
    })
}

/// Properties shared by every version, in the order RCCL's structs hold them.
macro_rules! fill_common {
    ($out:expr, $p:expr) => {{
        let o = &mut *$out;
        o.name = $p.dev.c_name.as_ptr() as *mut _;
        o.pciPath = $p.dev.c_pci_path.as_ptr() as *mut _;
        o.guid = $p.dev.guid;
        o.ptrSupport = $p.ptr_support;
        o.speed = $p.dev.speed_mbps;
        o.port = i32::from($p.dev.port);
        o.latency = $p.latency;
        o.maxComms = $p.max_comms;
        o.maxRecvs = $p.max_recvs;
    }};
}
pub(crate) use fill_common;

/// Fields of v9 and later.
macro_rules! fill_v9 {
    ($out:expr, $p:expr) => {{
        $crate::abi::common::fill_common!($out, $p);
        let o = &mut *$out;
        o.regIsGlobal = 1;
        o.forceFlush = i32::from($p.force_flush);
        o.netDeviceType = halo_ffi::NCCL_NET_DEVICE_HOST;
        o.netDeviceVersion = halo_ffi::NCCL_NET_DEVICE_INVALID_VERSION;
        o.vProps.ndevs = 1;
        o.vProps.devs[0] = $p.dev.index as i32;
        o.maxP2pBytes = $p.max_p2p_bytes;
        o.maxCollBytes = $p.max_p2p_bytes;
    }};
}
pub(crate) use fill_v9;
