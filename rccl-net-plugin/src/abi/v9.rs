//! `ncclNet_v9_t` (NCCL 2.24 … 2.25): `size_t` sizes in isend/irecv, vProps (no `makeVDevice`: NIC merging is not offered).

use super::common as c;
use super::{v6, v7, v8};
use halo_ffi::*;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn init(logger: ncclDebugLogger_t) -> ncclResult_t {
    c::init(logger, None)
}
unsafe extern "C" fn get_properties(
    dev: c_int,
    props: *mut ncclNetProperties_v9_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v9_t::zeroed();
            c::fill_v9!(o, p);
        }
    })
}
pub(super) unsafe extern "C" fn isend(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    tag: c_int,
    mh: *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    c::isend(comm, data, size, tag, mh, std::ptr::null_mut(), req)
}
unsafe extern "C" fn irecv(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut usize,
    tags: *mut c_int,
    mh: *mut *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    irecv_with(comm, n, data, sizes, tags, mh, std::ptr::null_mut(), req)
}
/// `irecv` with `size_t` sizes and the profiler handles of v10+ (NULL: none).
#[allow(clippy::too_many_arguments)]
pub(super) fn irecv_with(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut usize,
    tags: *mut c_int,
    mh: *mut *mut c_void,
    phandles: *mut *mut c_void,
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
        |i| unsafe { *sizes.add(i) },
        tags,
        mh,
        phandles,
        req,
    )
}

#[no_mangle]
pub static ncclNetPlugin_v9: ncclNet_v9_t = ncclNet_v9_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties),
    listen: Some(v6::listen),
    connect: Some(v7::connect),
    accept: Some(v7::accept),
    regMr: Some(v8::reg_mr),
    regMrDmaBuf: Some(v6::reg_mr_dmabuf),
    deregMr: Some(v6::dereg_mr),
    isend: Some(isend),
    irecv: Some(irecv),
    iflush: Some(v6::iflush),
    test: Some(v6::test),
    closeSend: Some(v6::close_send),
    closeRecv: Some(v6::close_recv),
    closeListen: Some(v6::close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    // NULL: RCCL then uses the physical devices as they are (a failing makeVDevice would
    // fail communicator init on hosts where RCCL wants to merge ports).
    makeVDevice: None,
};
