//! `ncclNet_v7_t` (NCCL 2.19): device-handle out-arguments, `getDeviceMr`, `irecvConsumed`.

use super::common as c;
use super::v6;
use halo_ffi::*;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn init(logger: ncclDebugLogger_t) -> ncclResult_t {
    c::init(logger, None)
}
unsafe extern "C" fn get_properties(
    dev: c_int,
    props: *mut ncclNetProperties_v7_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v7_t::zeroed();
            c::fill_common!(o, p);
            o.netDeviceType = NCCL_NET_DEVICE_HOST;
            o.netDeviceVersion = NCCL_NET_DEVICE_INVALID_VERSION;
        }
    })
}
pub(super) unsafe extern "C" fn connect(
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    _dev_comm: *mut *mut ncclNetDeviceHandle_v7_t,
) -> ncclResult_t {
    c::connect(dev, handle, send_comm, None)
}
pub(super) unsafe extern "C" fn accept(
    listen_comm: *mut c_void,
    recv_comm: *mut *mut c_void,
    _dev_comm: *mut *mut ncclNetDeviceHandle_v7_t,
) -> ncclResult_t {
    c::accept(listen_comm, recv_comm)
}

#[no_mangle]
pub static ncclNetPlugin_v7: ncclNet_v7_t = ncclNet_v7_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties),
    listen: Some(v6::listen),
    connect: Some(connect),
    accept: Some(accept),
    regMr: Some(v6::reg_mr_int),
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
