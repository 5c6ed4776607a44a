//! C ABI types of the RCCL/NCCL network plugin interface, versions v6 to v12.
//!
//! Every item mirrors a declaration of `include/rccl_net.h` under the same name; the
//! root package's `abi_layout` test compiles that header and compares sizes, alignments,
//! field offsets and constant values against this crate.
//!
//! Comms, handles and requests are opaque to the core, so they are `*mut c_void` here.
#![cfg_attr(not(test), no_std)]
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]

mod properties;
mod tables;

pub use properties::*;
pub use tables::*;

use core::ffi::{c_char, c_int, c_ulong, c_void};
use core::ops::RangeInclusive;

/// The `ncclNetPlugin_vN` versions this interface covers (and the plugin exports): v6 to v12.
pub const ABI_VERSIONS: RangeInclusive<u32> = 6..=12;

// ---- Result codes ------------------------------------------------------------------

/// A C enum passed by value: an `int` on every supported ABI. Kept as a plain integer so
/// a value outside the known set coming from C can never be undefined behaviour.
pub type ncclResult_t = c_int;

pub const ncclSuccess: ncclResult_t = 0;
pub const ncclUnhandledCudaError: ncclResult_t = 1;
/// Network or operating-system failure.
pub const ncclSystemError: ncclResult_t = 2;
/// Misuse of the interface or a broken invariant inside the plugin.
pub const ncclInternalError: ncclResult_t = 3;
pub const ncclInvalidArgument: ncclResult_t = 4;
pub const ncclInvalidUsage: ncclResult_t = 5;
/// The peer vanished or a completion failed.
pub const ncclRemoteError: ncclResult_t = 6;
pub const ncclInProgress: ncclResult_t = 7;
pub const ncclNumResults: ncclResult_t = 8;

// ---- Constants ---------------------------------------------------------------------

/// Bits of `ptrSupport` and values of the `type` argument of `regMr`.
pub const NCCL_PTR_HOST: c_int = 0x1;
pub const NCCL_PTR_CUDA: c_int = 0x2;
pub const NCCL_PTR_DMABUF: c_int = 0x4;

/// Size of the buffer `listen` fills and `connect` reads.
pub const NCCL_NET_HANDLE_MAXSIZE: usize = 128;
/// Outstanding requests a comm must accept (per receive slot of a send comm).
pub const NCCL_NET_MAX_REQUESTS: usize = 32;
/// Value a request pointer may hold on entry to mark an optional receive completion.
pub const NCCL_NET_OPTIONAL_RECV_COMPLETION: usize = 0x1;
/// Upper bound for `maxP2pBytes` / `maxCollBytes` (1 TiB).
pub const NCCL_MAX_NET_SIZE_BYTES: usize = 1 << 40;
/// `trafficClass` when the core does not ask for one.
pub const NCCL_NET_TRAFFIC_CLASS_UNDEF: c_int = -1;
/// `railId` / `planeId` of `ncclNetProperties_v12_t` when the plugin claims none.
pub const NCCL_NET_ID_UNDEF: i16 = -1;
/// Entries of `ncclNetVDeviceProps_vN::devs` up to v11.
pub const NCCL_NET_MAX_DEVS_PER_NIC: usize = 4;
/// Entries of `ncclNetVDeviceProps_v12_t::devs`.
pub const NCCL_NET_MAX_DEVS_PER_NIC_V12: usize = 8;

// ---- Logging -----------------------------------------------------------------------

pub const NCCL_LOG_NONE: c_int = 0;
pub const NCCL_LOG_VERSION: c_int = 1;
pub const NCCL_LOG_WARN: c_int = 2;
pub const NCCL_LOG_INFO: c_int = 3;
pub const NCCL_LOG_ABORT: c_int = 4;
pub const NCCL_LOG_TRACE: c_int = 5;

/// Subsystem bits for the `flags` argument of the logger.
pub const NCCL_INIT: c_ulong = 0x1;
pub const NCCL_COLL: c_ulong = 0x2;
pub const NCCL_P2P: c_ulong = 0x4;
pub const NCCL_SHM: c_ulong = 0x8;
pub const NCCL_NET: c_ulong = 0x10;
pub const NCCL_GRAPH: c_ulong = 0x20;
pub const NCCL_TUNING: c_ulong = 0x40;
pub const NCCL_ENV: c_ulong = 0x80;
pub const NCCL_ALLOC: c_ulong = 0x100;
pub const NCCL_CALL: c_ulong = 0x200;
pub const NCCL_PROXY: c_ulong = 0x400;
pub const NCCL_NVLS: c_ulong = 0x800;
pub const NCCL_BOOTSTRAP: c_ulong = 0x1000;
pub const NCCL_REG: c_ulong = 0x2000;
pub const NCCL_PROFILE: c_ulong = 0x4000;
pub const NCCL_ALL: c_ulong = !0;

/// `(level, flags, file, line, fmt, ...)`; printf-style, so pass untrusted text via `"%s"`.
pub type ncclDebugLogger_t =
    Option<unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...)>;

// ---- Profiler (v10+) ---------------------------------------------------------------

/// Values of the `type` argument of the profiler callback.
pub const ncclProfilerNetEventStart: c_int = 0;
pub const ncclProfilerNetEventStop: c_int = 1;
pub const ncclProfilerNetEventUpdate: c_int = 2;
pub const ncclProfilerNetEventUpdateAndStop: c_int = 3;

/// `(eHandle, type, phandle, pluginId, extData)`.
pub type ncclProfilerCallback_t = Option<
    unsafe extern "C" fn(*mut *mut c_void, c_int, *mut c_void, i64, *mut c_void) -> ncclResult_t,
>;

/// `pluginId` of an event: network kind in the high 16 bits, `extData` layout version below.
pub const NCCL_PROFILER_NET_VER_BITS: c_int = 16;
pub const NCCL_PROFILER_NET_TYPE_IB: c_int = 1 << NCCL_PROFILER_NET_VER_BITS;
pub const NCCL_PROFILER_NET_IB_VER: c_int = 1;
/// `type` of an IB event descriptor: a queue-pair event.
pub const ncclProfileQp: c_int = 1;

/// One queue-pair event: a work request from post to completion.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclProfilerNetIbQp_v1_t {
    /// The plugin's device index.
    pub device: c_int,
    /// The work request that completes the event.
    pub wr_id: u64,
    /// `ibv_wr_opcode` of that work request.
    pub opcode: c_int,
    pub qpNum: c_int,
    /// Payload bytes of the request.
    pub length: usize,
}

/// `extData` of a start event with `pluginId` `NCCL_PROFILER_NET_TYPE_IB | 1`. The C type has
/// `qp` inside a one-member union, which lays out exactly like the member itself.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclProfilerNetIbDescr_v1_t {
    /// `ncclProfileQp`.
    pub type_: u8,
    pub qp: ncclProfilerNetIbQp_v1_t,
}

// ---- Plain-data structs ------------------------------------------------------------

/// Gives plain-data structs an all-zero constructor: every field is an integer, float,
/// raw pointer or array of those, so zero is a valid value.
macro_rules! zeroable {
    ($($ty:ident),* $(,)?) => {$(
        impl $ty {
            /// All fields zero / NULL.
            pub const fn zeroed() -> Self {
                // SAFETY: the struct only holds integers, floats and raw pointers, for
                // which the all-zero bit pattern is a valid value.
                unsafe { core::mem::zeroed() }
            }
        }
        impl Default for $ty {
            fn default() -> Self {
                Self::zeroed()
            }
        }
    )*};
}
pub(crate) use zeroable;

/// C enum `ncclNetDeviceType`.
pub type ncclNetDeviceType = c_int;
pub const NCCL_NET_DEVICE_HOST: ncclNetDeviceType = 0;
pub const NCCL_NET_DEVICE_UNPACK: ncclNetDeviceType = 1;
pub const NCCL_NET_DEVICE_INVALID_VERSION: c_int = 0;

/// Device offload handle, unchanged from v7 to v12; a host-only plugin never fills one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetDeviceHandle_v7_t {
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
    pub handle: *mut c_void,
    pub size: usize,
    pub needsProxyProgress: c_int,
}
pub type ncclNetDeviceHandle_v8_t = ncclNetDeviceHandle_v7_t;
pub type ncclNetDeviceHandle_v9_t = ncclNetDeviceHandle_v7_t;
pub type ncclNetDeviceHandle_v10_t = ncclNetDeviceHandle_v7_t;
pub type ncclNetDeviceHandle_v11_t = ncclNetDeviceHandle_v7_t;
pub type ncclNetDeviceHandle_v12_t = ncclNetDeviceHandle_v7_t;

/// Physical devices that make up one (virtual) device, v9 to v11.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetVDeviceProps_v9_t {
    pub ndevs: c_int,
    pub devs: [c_int; NCCL_NET_MAX_DEVS_PER_NIC],
}
pub type ncclNetVDeviceProps_v10_t = ncclNetVDeviceProps_v9_t;
pub type ncclNetVDeviceProps_v11_t = ncclNetVDeviceProps_v9_t;

/// Physical devices that make up one (virtual) device, v12.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetVDeviceProps_v12_t {
    pub ndevs: c_int,
    pub devs: [c_int; NCCL_NET_MAX_DEVS_PER_NIC_V12],
}

/// Per-communicator settings handed to `connect` (v10) or `init` (v11+).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetCommConfig_v10_t {
    /// `NCCL_NET_TRAFFIC_CLASS_UNDEF` or a plugin-defined traffic class.
    pub trafficClass: c_int,
}
pub type ncclNetCommConfig_v11_t = ncclNetCommConfig_v10_t;
pub type ncclNetCommConfig_v12_t = ncclNetCommConfig_v10_t;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetCommAttr_v11_t {
    pub maxConcurrentPeers: i32,
    pub minConcurrentPeers: i32,
    pub maxFlowsPerPeer: i32,
    pub minFlowsPerPeer: i32,
}
pub type ncclNetCommAttr_v12_t = ncclNetCommAttr_v11_t;

/// Argument of `setNetAttr` (v11+).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetAttr_v11_t {
    pub sendCommAttr: ncclNetCommAttr_v11_t,
    pub recvCommAttr: ncclNetCommAttr_v11_t,
    pub op: u32,
    pub algo: u32,
    pub proto: u32,
}
pub type ncclNetAttr_v12_t = ncclNetAttr_v11_t;

zeroable!(
    ncclNetDeviceHandle_v7_t,
    ncclNetVDeviceProps_v9_t,
    ncclNetVDeviceProps_v12_t,
    ncclNetCommConfig_v10_t,
    ncclNetCommAttr_v11_t,
    ncclNetAttr_v11_t,
    ncclProfilerNetIbQp_v1_t,
    ncclProfilerNetIbDescr_v1_t,
);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn key_sizes_on_64_bit() {
        assert_eq!(NCCL_NET_HANDLE_MAXSIZE, 128);
        assert_eq!(NCCL_MAX_NET_SIZE_BYTES, 1 << 40);
        assert_eq!(size_of::<ncclResult_t>(), 4);
        assert_eq!(size_of::<ncclDebugLogger_t>(), size_of::<usize>());
        assert_eq!(size_of::<ncclNetDeviceHandle_v7_t>(), 32);
        assert_eq!(size_of::<ncclNetVDeviceProps_v9_t>(), 20);
        assert_eq!(size_of::<ncclNetVDeviceProps_v12_t>(), 36);
        assert_eq!(size_of::<ncclNetAttr_v11_t>(), 44);
        assert_eq!(size_of::<ncclNetProperties_v6_t>(), 48);
        assert_eq!(size_of::<ncclNetProperties_v9_t>(), 104);
        assert_eq!(size_of::<ncclNetProperties_v12_t>(), 128);
        assert_eq!(offset_of!(ncclNetProperties_v12_t, maxP2pBytes), 104);
        assert_eq!(offset_of!(ncclNetProperties_v12_t, planeId), 126);
        // One name pointer plus one slot per function.
        assert_eq!(size_of::<ncclNet_v6_t>(), 17 * 8);
        assert_eq!(size_of::<ncclNet_v8_t>(), 19 * 8);
        assert_eq!(size_of::<ncclNet_v10_t>(), 20 * 8);
        assert_eq!(size_of::<ncclNet_v12_t>(), 22 * 8);
        assert_eq!(align_of::<ncclNet_v12_t>(), 8);
    }

    #[test]
    fn zeroed_properties_are_empty() {
        let p = ncclNetProperties_v12_t::default();
        assert!(p.name.is_null());
        assert_eq!(p.vProps.ndevs, 0);
        assert_eq!(p.maxP2pBytes, 0);
    }
}
