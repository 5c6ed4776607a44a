//! `ncclNet_v11_t` (NCCL 2.28 … 2.29) and `ncclNet_v12_t` (2.30+): `init` per communicator with a
//! context that `listen`/`connect`/`finalize` carry; v12 widens vProps and adds rail/plane ids.
//!
//! The contexts are counted: the first `init` builds the plugin's state, the last `finalize`
//! releases it (RCCL may then unload the library, or call `init` again).

use super::common as c;
use super::{v10, v6, v7, v8};
use crate::net::{self, NetError};
use halo_ffi::*;
use std::ffi::{c_int, c_void};

/// What `init` hands back per communicator.
struct CommContext {
    traffic_class: Option<i32>,
}

unsafe extern "C" fn init(
    ctx: *mut *mut c_void,
    _comm_id: u64,
    config: *mut ncclNetCommConfig_v11_t,
    logger: ncclDebugLogger_t,
    prof: ncclProfilerCallback_t,
) -> ncclResult_t {
    crate::log::set_logger(logger);
    crate::net::profiler::set_callback(prof);
    super::guard("init", || {
        // SAFETY: RCCL passes a valid out-pointer.
        let out = unsafe { ctx.as_mut() }
            .ok_or_else(|| NetError::InvalidArgument("ctx is NULL".into()))?;
        net::init_context()?;
        *out = Box::into_raw(Box::new(CommContext {
            traffic_class: v10::config_tc(config),
        })) as *mut c_void;
        Ok(())
    })
}
fn tc(ctx: *mut c_void) -> Option<i32> {
    // SAFETY: ctx comes from init (or is NULL).
    unsafe { (ctx as *const CommContext).as_ref() }.and_then(|c| c.traffic_class)
}
unsafe extern "C" fn finalize(ctx: *mut c_void) -> ncclResult_t {
    super::guard("finalize", || {
        if ctx.is_null() {
            return Err(NetError::InvalidArgument(
                "finalize of a NULL context".into(),
            ));
        }
        // SAFETY: from init's Box::into_raw, finalized once.
        drop(unsafe { Box::from_raw(ctx as *mut CommContext) });
        net::finalize_context()
    })
}
unsafe extern "C" fn listen(
    ctx: *mut c_void,
    dev: c_int,
    handle: *mut c_void,
    listen_comm: *mut *mut c_void,
) -> ncclResult_t {
    c::listen(dev, handle, listen_comm, tc(ctx))
}
unsafe extern "C" fn connect(
    ctx: *mut c_void,
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    _dev_comm: *mut *mut ncclNetDeviceHandle_v11_t,
) -> ncclResult_t {
    c::connect(dev, handle, send_comm, tc(ctx))
}
unsafe extern "C" fn get_properties_v11(
    dev: c_int,
    props: *mut ncclNetProperties_v11_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v11_t::zeroed();
            c::fill_v9!(o, p);
            o.maxMultiRequestSize = 1;
        }
    })
}
unsafe extern "C" fn get_properties_v12(
    dev: c_int,
    props: *mut ncclNetProperties_v12_t,
) -> ncclResult_t {
    c::properties(dev, |p| {
        // SAFETY: RCCL passes a valid props struct of this version.
        if let Some(o) = unsafe { props.as_mut() } {
            *o = ncclNetProperties_v12_t::zeroed();
            c::fill_v9!(o, p);
            o.maxMultiRequestSize = 1;
            // As NCCL's own transports: no rail or plane is claimed (a defined rail id would make
            // NCCL's graph search match rails by it).
            o.railId = NCCL_NET_ID_UNDEF;
            o.planeId = NCCL_NET_ID_UNDEF;
        }
    })
}

#[no_mangle]
pub static ncclNetPlugin_v11: ncclNet_v11_t = ncclNet_v11_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties_v11),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(v7::accept),
    regMr: Some(v8::reg_mr),
    regMrDmaBuf: Some(v6::reg_mr_dmabuf),
    deregMr: Some(v6::dereg_mr),
    isend: Some(v10::isend),
    irecv: Some(v10::irecv),
    iflush: Some(v6::iflush),
    test: Some(v6::test),
    closeSend: Some(v6::close_send),
    closeRecv: Some(v6::close_recv),
    closeListen: Some(v6::close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    makeVDevice: None,
    finalize: Some(finalize),
    setNetAttr: None,
};

#[no_mangle]
pub static ncclNetPlugin_v12: ncclNet_v12_t = ncclNet_v12_t {
    name: c::PLUGIN_NAME.as_ptr(),
    init: Some(init),
    devices: Some(v6::devices),
    getProperties: Some(get_properties_v12),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(v7::accept),
    regMr: Some(v8::reg_mr),
    regMrDmaBuf: Some(v6::reg_mr_dmabuf),
    deregMr: Some(v6::dereg_mr),
    isend: Some(v10::isend),
    irecv: Some(v10::irecv),
    iflush: Some(v6::iflush),
    test: Some(v6::test),
    closeSend: Some(v6::close_send),
    closeRecv: Some(v6::close_recv),
    closeListen: Some(v6::close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    makeVDevice: None,
    finalize: Some(finalize),
    setNetAttr: None,
};
