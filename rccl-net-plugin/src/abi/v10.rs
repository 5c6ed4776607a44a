//! `ncclNet_v10_t` (NCCL 2.26 … 2.27; ROCm 7.0 … 7.2): profiler callback, per-connect config,
//! profiler handles on isend/irecv.

use super::common as c;
use super::{v6, v7, v8, v9};
use halo_ffi::*;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn init(logger: ncclDebugLogger_t, prof: ncclProfilerCallback_t) -> ncclResult_t {
    c::init(logger, prof)
}
unsafe extern "C" fn get_properties(
    dev: c_int,
    props: *mut ncclNetProperties_v10_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v10_t::zeroed();
            c::fill_v9!(o, p);
        }
    })
}
/// The traffic class a comm config asks for, if any.
pub(super) fn config_tc(config: *mut ncclNetCommConfig_v10_t) -> Option<i32> {
    // SAFETY: RCCL passes a valid config or NULL.
    unsafe { config.as_ref() }
        .map(|c| c.trafficClass)
        .filter(|&t| t != NCCL_NET_TRAFFIC_CLASS_UNDEF)
}
unsafe extern "C" fn connect(
    dev: c_int,
    config: *mut ncclNetCommConfig_v10_t,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    _dev_comm: *mut *mut ncclNetDeviceHandle_v10_t,
) -> ncclResult_t {
    c::connect(dev, handle, send_comm, config_tc(config))
}
pub(super) unsafe extern "C" fn isend(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    tag: c_int,
    mh: *mut c_void,
    phandle: *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    c::isend(comm, data, size, tag, mh, phandle, req)
}
pub(super) unsafe extern "C" fn irecv(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut usize,
    tags: *mut c_int,
    mh: *mut *mut c_void,
    phandles: *mut *mut c_void,
    req: *mut *mut c_void,
) -> ncclResult_t {
    v9::irecv_with(comm, n, data, sizes, tags, mh, phandles, req)
}

#[no_mangle]
pub static ncclNetPlugin_v10: ncclNet_v10_t = ncclNet_v10_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties),
    listen: Some(v6::listen),
    connect: Some(connect),
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
    makeVDevice: None,
};
