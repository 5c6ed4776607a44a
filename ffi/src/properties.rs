//! Device properties returned by `getProperties`, one struct per ABI version.
//! `speed` is in Mbps, `latency` in microseconds (0 lets the core estimate it).

use core::ffi::{c_char, c_int};

use crate::{
    ncclNetDeviceType, ncclNetVDeviceProps_v10_t, ncclNetVDeviceProps_v11_t,
    ncclNetVDeviceProps_v12_t, ncclNetVDeviceProps_v9_t,
};

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v6_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v7_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v8_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v9_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps_v9_t,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v10_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps_v10_t,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v11_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps_v11_t,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
    pub maxMultiRequestSize: c_int,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v12_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: ncclNetDeviceType,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps_v12_t,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
    pub maxMultiRequestSize: c_int,
    pub railId: i16,
    pub planeId: i16,
}

crate::zeroable!(
    ncclNetProperties_v6_t,
    ncclNetProperties_v7_t,
    ncclNetProperties_v8_t,
    ncclNetProperties_v9_t,
    ncclNetProperties_v10_t,
    ncclNetProperties_v11_t,
    ncclNetProperties_v12_t,
);
