//! `ncclNet_v6_t` (NCCL 2.13 … 2.18; ROCm 6.1).

use super::common as c;
use halo_ffi::*;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn init(logger: ncclDebugLogger_t) -> ncclResult_t {
    c::init(logger, None)
}
pub(super) unsafe extern "C" fn devices(ndev: *mut c_int) -> ncclResult_t {
    c::devices(ndev)
}
unsafe extern "C" fn get_properties(
    dev: c_int,
    props: *mut ncclNetProperties_v6_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v6_t::zeroed();
            c::fill_common!(o, p);
        }
    })
}
pub(super) unsafe extern "C" fn listen(
    dev: c_int,
    handle: *mut c_void,
    listen_comm: *mut *mut c_void,
) -> ncclResult_t {
    c::listen(dev, handle, listen_comm, None)
}
unsafe extern "C" fn connect(
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
) -> ncclResult_t {
    c::connect(dev, handle, send_comm, None)
}
unsafe extern "C" fn accept(listen_comm: *mut c_void, recv_comm: *mut *mut c_void) -> ncclResult_t {
    c::accept(listen_comm, recv_comm)
}
pub(super) unsafe extern "C" fn reg_mr_int(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    ty: c_int,
    mh: *mut *mut c_void,
) -> ncclResult_t {
    match usize::try_from(size) {
        Ok(s) => c::reg_mr(comm, data, s, ty, mh),
        Err(_) => super::guard("regMr", || {
            Err(crate::net::NetError::InvalidArgument(format!(
                "negative size {size}"
            )))
        }),
    }
}
pub(super) unsafe extern "C" fn dereg_mr(comm: *mut c_void, mh: *mut c_void) -> ncclResult_t {
    c::dereg_mr(comm, mh)
}
pub(super) unsafe extern "C" fn isend_int(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    tag: c_int,
    mh: *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    match usize::try_from(size) {
        Ok(s) => c::isend(comm, data, s, tag, mh, std::ptr::null_mut(), req),
        Err(_) => super::guard("isend", || {
            Err(crate::net::NetError::InvalidArgument(format!(
                "negative size {size}"
            )))
        }),
    }
}
pub(super) unsafe extern "C" fn irecv_int(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    tags: *mut c_int,
    mh: *mut *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    if sizes.is_null() {
        return super::guard("irecv", || {
            Err(crate::net::NetError::InvalidArgument("NULL sizes".into()))
        });
    }
    // SAFETY: RCCL's sizes array has n entries (n is checked before any index is read).
    c::irecv(
        comm,
        n,
        data,
        |i| unsafe { (*sizes.add(i)).max(0) as usize },
        tags,
        mh,
        std::ptr::null_mut(),
        req,
    )
}
pub(super) unsafe extern "C" fn reg_mr_dmabuf(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ty: c_int,
    offset: u64,
    fd: c_int,
    mh: *mut *mut c_void,
) -> ncclResult_t {
    c::reg_mr_dmabuf(comm, data, size, ty, offset, fd, mh)
}
pub(super) unsafe extern "C" fn iflush(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    mh: *mut *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    let size_of = |i: usize| {
        if sizes.is_null() {
            0
        } else {
            // SAFETY: RCCL's sizes array has n entries (common::iflush reads at most n).
            unsafe { (*sizes.add(i)).max(0) as usize }
        }
    };
    c::iflush(comm, n, data, size_of, mh, req)
}
pub(super) unsafe extern "C" fn test(
    req: *mut c_void,
    done: *mut c_int,
    sizes: *mut c_int,
) -> ncclResult_t {
    c::test(req, done, sizes)
}
pub(super) unsafe extern "C" fn close_send(comm: *mut c_void) -> ncclResult_t {
    c::close_send(comm)
}
pub(super) unsafe extern "C" fn close_recv(comm: *mut c_void) -> ncclResult_t {
    c::close_recv(comm)
}
pub(super) unsafe extern "C" fn close_listen(comm: *mut c_void) -> ncclResult_t {
    c::close_listen(comm)
}

#[no_mangle]
pub static ncclNetPlugin_v6: ncclNet_v6_t = ncclNet_v6_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(devices),
    getProperties: Some(get_properties),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(accept),
    regMr: Some(reg_mr_int),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_int),
    irecv: Some(irecv_int),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
};
