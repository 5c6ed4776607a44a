//! Compares the C view of `include/rccl_net.h` (printed by the probe that `build.rs`
//! compiles) with the `halo-ffi` mirror: every struct and typedef size and alignment,
//! every field offset and size, every constant value, and the sets of names on both
//! sides. A change to only one side fails here with the name and both numbers.

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::process::Command;

use halo_ffi::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// `size`, `align` of a struct or typedef.
    Type(usize, usize),
    /// `offset`, `size` of a field.
    Field(usize, usize),
    /// Value of a constant, widened to i64 (unsigned all-ones flags read as -1 on both sides).
    Const(i64),
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::Type(size, align) => write!(f, "size {size} align {align}"),
            Record::Field(offset, size) => write!(f, "offset {offset} size {size}"),
            Record::Const(value) => write!(f, "value {value}"),
        }
    }
}

/// Size of a field's type, named through an accessor so no value is needed.
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `table!(map; types [..]; consts [..]; structs { Ty { field, .. } .. })`
macro_rules! table {
    (
        $map:ident;
        types [$($alias:ident),* $(,)?];
        consts [$($konst:ident),* $(,)?];
        structs { $($ty:ident { $($field:ident),* $(,)? })* }
    ) => {
        $(
            $map.insert(
                format!("type {}", stringify!($alias)),
                Record::Type(size_of::<$alias>(), align_of::<$alias>()),
            );
        )*
        $(
            #[allow(clippy::unnecessary_cast)]
            $map.insert(format!("const {}", stringify!($konst)), Record::Const($konst as i64));
        )*
        $(
            $map.insert(
                format!("struct {}", stringify!($ty)),
                Record::Type(size_of::<$ty>(), align_of::<$ty>()),
            );
            $(
                $map.insert(
                    format!("field {}.{}", stringify!($ty), stringify!($field)),
                    Record::Field(offset_of!($ty, $field), field_size(|s: &$ty| &s.$field)),
                );
            )*
        )*
    };
}

fn rust_side() -> BTreeMap<String, Record> {
    let mut m = BTreeMap::new();
    table! {
        m;
        types [ncclResult_t, ncclNetDeviceType, ncclDebugLogger_t, ncclProfilerCallback_t];
        consts [
            ncclSuccess, ncclUnhandledCudaError, ncclSystemError, ncclInternalError,
            ncclInvalidArgument, ncclInvalidUsage, ncclRemoteError, ncclInProgress, ncclNumResults,
            NCCL_PTR_HOST, NCCL_PTR_CUDA, NCCL_PTR_DMABUF,
            NCCL_NET_HANDLE_MAXSIZE, NCCL_NET_MAX_REQUESTS, NCCL_NET_OPTIONAL_RECV_COMPLETION,
            NCCL_MAX_NET_SIZE_BYTES, NCCL_NET_TRAFFIC_CLASS_UNDEF, NCCL_NET_ID_UNDEF,
            NCCL_NET_MAX_DEVS_PER_NIC, NCCL_NET_MAX_DEVS_PER_NIC_V12,
            NCCL_LOG_NONE, NCCL_LOG_VERSION, NCCL_LOG_WARN, NCCL_LOG_INFO, NCCL_LOG_ABORT,
            NCCL_LOG_TRACE,
            NCCL_INIT, NCCL_COLL, NCCL_P2P, NCCL_SHM, NCCL_NET, NCCL_GRAPH, NCCL_TUNING, NCCL_ENV,
            NCCL_ALLOC, NCCL_CALL, NCCL_PROXY, NCCL_NVLS, NCCL_BOOTSTRAP, NCCL_REG, NCCL_PROFILE,
            NCCL_ALL,
            ncclProfilerNetEventStart, ncclProfilerNetEventStop, ncclProfilerNetEventUpdate,
            ncclProfilerNetEventUpdateAndStop,
            NCCL_PROFILER_NET_VER_BITS, NCCL_PROFILER_NET_TYPE_IB, NCCL_PROFILER_NET_IB_VER,
            ncclProfileQp,
            NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_INVALID_VERSION,
        ];
        structs {
            ncclNetDeviceHandle_v7_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }
            ncclNetDeviceHandle_v8_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }
            ncclNetDeviceHandle_v9_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }
            ncclNetDeviceHandle_v10_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }
            ncclNetDeviceHandle_v11_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }
            ncclNetDeviceHandle_v12_t { netDeviceType, netDeviceVersion, handle, size, needsProxyProgress }

            ncclNetVDeviceProps_v9_t { ndevs, devs }
            ncclNetVDeviceProps_v10_t { ndevs, devs }
            ncclNetVDeviceProps_v11_t { ndevs, devs }
            ncclNetVDeviceProps_v12_t { ndevs, devs }

            ncclProfilerNetIbQp_v1_t { device, wr_id, opcode, qpNum, length }
            ncclProfilerNetIbDescr_v1_t { qp }

            ncclNetCommConfig_v10_t { trafficClass }
            ncclNetCommConfig_v11_t { trafficClass }
            ncclNetCommConfig_v12_t { trafficClass }

            ncclNetCommAttr_v11_t { maxConcurrentPeers, minConcurrentPeers, maxFlowsPerPeer, minFlowsPerPeer }
            ncclNetCommAttr_v12_t { maxConcurrentPeers, minConcurrentPeers, maxFlowsPerPeer, minFlowsPerPeer }
            ncclNetAttr_v11_t { sendCommAttr, recvCommAttr, op, algo, proto }
            ncclNetAttr_v12_t { sendCommAttr, recvCommAttr, op, algo, proto }

            ncclNetProperties_v6_t {
                name, pciPath, guid, ptrSupport, speed, port, latency, maxComms, maxRecvs,
            }
            ncclNetProperties_v7_t {
                name, pciPath, guid, ptrSupport, speed, port, latency, maxComms, maxRecvs,
                netDeviceType, netDeviceVersion,
            }
            ncclNetProperties_v8_t {
                name, pciPath, guid, ptrSupport, regIsGlobal, speed, port, latency, maxComms,
                maxRecvs, netDeviceType, netDeviceVersion,
            }
            ncclNetProperties_v9_t {
                name, pciPath, guid, ptrSupport, regIsGlobal, forceFlush, speed, port, latency,
                maxComms, maxRecvs, netDeviceType, netDeviceVersion, vProps, maxP2pBytes,
                maxCollBytes,
            }
            ncclNetProperties_v10_t {
                name, pciPath, guid, ptrSupport, regIsGlobal, forceFlush, speed, port, latency,
                maxComms, maxRecvs, netDeviceType, netDeviceVersion, vProps, maxP2pBytes,
                maxCollBytes,
            }
            ncclNetProperties_v11_t {
                name, pciPath, guid, ptrSupport, regIsGlobal, forceFlush, speed, port, latency,
                maxComms, maxRecvs, netDeviceType, netDeviceVersion, vProps, maxP2pBytes,
                maxCollBytes, maxMultiRequestSize,
            }
            ncclNetProperties_v12_t {
                name, pciPath, guid, ptrSupport, regIsGlobal, forceFlush, speed, port, latency,
                maxComms, maxRecvs, netDeviceType, netDeviceVersion, vProps, maxP2pBytes,
                maxCollBytes, maxMultiRequestSize, railId, planeId,
            }

            ncclNet_v6_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
            }
            ncclNet_v7_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed,
            }
            ncclNet_v8_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed,
            }
            ncclNet_v9_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed, makeVDevice,
            }
            ncclNet_v10_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed, makeVDevice,
            }
            ncclNet_v11_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed, makeVDevice, finalize, setNetAttr,
            }
            ncclNet_v12_t {
                name, init, devices, getProperties, listen, connect, accept, regMr, regMrDmaBuf,
                deregMr, isend, irecv, iflush, test, closeSend, closeRecv, closeListen,
                getDeviceMr, irecvConsumed, makeVDevice, finalize, setNetAttr,
            }
        }
    }
    m
}

/// Parses one probe line into its key (`"<kind> <name>"`) and record.
fn parse_line(line: &str) -> Result<(String, Record), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |s: &str| -> Result<i64, String> {
        s.parse::<i64>()
            .map_err(|e| format!("bad number {s:?} in probe line {line:?}: {e}"))
    };
    let unsigned = |s: &str| -> Result<usize, String> {
        usize::try_from(num(s)?).map_err(|e| format!("negative {s:?} in probe line {line:?}: {e}"))
    };
    match words.as_slice() {
        [kind @ ("struct" | "type"), name, "size", size, "align", align] => Ok((
            format!("{kind} {name}"),
            Record::Type(unsigned(size)?, unsigned(align)?),
        )),
        ["field", name, "offset", offset, "size", size] => Ok((
            format!("field {name}"),
            Record::Field(unsigned(offset)?, unsigned(size)?),
        )),
        ["const", name, "value", value] => {
            Ok((format!("const {name}"), Record::Const(num(value)?)))
        }
        _ => Err(format!("unrecognised probe line {line:?}")),
    }
}

fn c_side() -> BTreeMap<String, Record> {
    let probe = env!("HALO_LAYOUT_PROBE");
    let output = Command::new(probe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run layout probe {probe}: {e}"));
    assert!(
        output.status.success(),
        "layout probe {probe} failed: {}",
        output.status
    );
    let text = String::from_utf8(output.stdout).expect("probe output is ASCII");

    let mut map = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, record) = parse_line(line).unwrap_or_else(|e| panic!("{e}"));
        if map.insert(key.clone(), record).is_some() {
            panic!("layout probe lists {key} twice");
        }
    }
    map
}

/// Every difference between the two sides, one human-readable line each.
fn differences(c: &BTreeMap<String, Record>, rust: &BTreeMap<String, Record>) -> Vec<String> {
    let mut out = Vec::new();
    for (key, c_rec) in c {
        match rust.get(key) {
            None => out.push(format!(
                "{key}: in the C header ({c_rec}) but not checked on the Rust side"
            )),
            Some(r_rec) if r_rec != c_rec => {
                out.push(format!("{key}: C has {c_rec}, Rust has {r_rec}"))
            }
            Some(_) => {}
        }
    }
    for (key, r_rec) in rust {
        if !c.contains_key(key) {
            out.push(format!(
                "{key}: on the Rust side ({r_rec}) but not listed by the C probe"
            ));
        }
    }
    out
}

#[test]
fn c_header_and_rust_mirror_agree() {
    let c = c_side();
    let rust = rust_side();
    let diffs = differences(&c, &rust);
    assert!(
        diffs.is_empty(),
        "include/rccl_net.h and halo-ffi disagree in {} place(s):\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );
    // Guards against an empty or truncated probe run passing vacuously.
    assert!(c.len() > 300, "probe printed only {} records", c.len());
}

#[test]
fn differences_are_reported_with_both_numbers() {
    let mut c = rust_side();
    let rust = rust_side();
    c.insert("field ncclNet_v10_t.isend".into(), Record::Field(88, 8));
    c.remove("struct ncclNet_v6_t");
    c.insert("field ncclNet_v12_t.extra".into(), Record::Field(176, 8));
    let diffs = differences(&c, &rust);
    assert_eq!(diffs.len(), 3, "{diffs:?}");
    assert!(diffs.iter().any(
        |d| d == "field ncclNet_v10_t.isend: C has offset 88 size 8, Rust has offset 80 size 8"
    ));
    assert!(diffs
        .iter()
        .any(|d| d.starts_with("struct ncclNet_v6_t: on the Rust side")));
    assert!(diffs
        .iter()
        .any(|d| d.starts_with("field ncclNet_v12_t.extra: in the C header")));
}

#[test]
fn probe_lines_parse() {
    assert_eq!(
        parse_line("struct ncclNet_v10_t size 160 align 8"),
        Ok(("struct ncclNet_v10_t".into(), Record::Type(160, 8)))
    );
    assert_eq!(
        parse_line("field ncclNet_v10_t.isend offset 80 size 8"),
        Ok(("field ncclNet_v10_t.isend".into(), Record::Field(80, 8)))
    );
    assert_eq!(
        parse_line("const NCCL_ALL value -1"),
        Ok(("const NCCL_ALL".into(), Record::Const(-1)))
    );
    assert!(parse_line("struct x size -4 align 8").is_err());
    assert!(parse_line("garbage").is_err());
}
