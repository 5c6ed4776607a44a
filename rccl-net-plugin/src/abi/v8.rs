//! `ncclNet_v8_t` (NCCL 2.20 … 2.23; ROCm 6.2 … 6.4): `regMr` takes `size_t`, `regIsGlobal`.

use super::common as c;
use super::{v6, v7};
use halo_ffi::*;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn init(logger: ncclDebugLogger_t) -> ncclResult_t {
    c::init(logger, None)
}
unsafe extern "C" fn get_properties(
    dev: c_int,
    props: *mut ncclNetProperties_v8_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v8_t::zeroed();
            c::fill_common!(o, p);
            o.regIsGlobal = 1;
            o.netDeviceType = NCCL_NET_DEVICE_HOST;
            o.netDeviceVersion = NCCL_NET_DEVICE_INVALID_VERSION;
        }
    })
}
pub(super) unsafe extern "C" fn reg_mr(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ty: c_int,
    mh: *mut *mut c_void,
) -> ncclResult_t {
    c::reg_mr(comm, data, size, ty, mh)
}

#[no_mangle]
pub static ncclNetPlugin_v8: ncclNet_v8_t = ncclNet_v8_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties),
    listen: Some(v6::listen),
    connect: Some(v7::connect),
    accept: Some(v7::accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(v6::reg_mr_dmabuf),
    deregMr: Some(v6::dereg_mr),
    isend: Some(v6::isend_int),
    irecv: Some(v6::irecv_int),
    iflush: Some(v6::iflush),
    test: Some(v6::test),
    closeSend: Some(v6::close_send),
    closeRecv: Some(v6::close_recv),
    closeListen: Some(v6::close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
};
