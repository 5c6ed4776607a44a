/*
 * Prints the C view of every struct, field and constant of include/rccl_net.h,
 * one record per line, for tests/abi_layout.rs to compare with halo-ffi:
 *
 *   struct <type> size <bytes> align <bytes>
 *   type <typedef> size <bytes> align <bytes>      (scalars, function pointers)
 *   field <type>.<member> offset <bytes> size <bytes>
 *   const <name> value <decimal>
 *
 * Typedef aliases (e.g. ncclNetDeviceHandle_v9_t) are listed as well so that a
 * later split of an alias into its own struct cannot go unchecked.
 */
#include <stddef.h>
#include <stdio.h>

#include "rccl_net.h"

#define STRUCT(T) \
  printf("struct %s size %zu align %zu\n", #T, sizeof(T), (size_t)_Alignof(T));
#define TYPE(T) \
  printf("type %s size %zu align %zu\n", #T, sizeof(T), (size_t)_Alignof(T));
#define FIELD(T, m)                                                  \
  printf("field %s.%s offset %zu size %zu\n", #T, #m, offsetof(T, m), \
         sizeof(((T *)0)->m));
#define CONST(c) printf("const %s value %lld\n", #c, (long long)(c));

#define DEVICE_HANDLE(T)            \
  STRUCT(T)                         \
  FIELD(T, netDeviceType)           \
  FIELD(T, netDeviceVersion)        \
  FIELD(T, handle)                  \
  FIELD(T, size)                    \
  FIELD(T, needsProxyProgress)

#define VDEVICE_PROPS(T) \
  STRUCT(T)              \
  FIELD(T, ndevs)        \
  FIELD(T, devs)

#define COMM_CONFIG(T) \
  STRUCT(T)            \
  FIELD(T, trafficClass)

#define COMM_ATTR(T)             \
  STRUCT(T)                      \
  FIELD(T, maxConcurrentPeers)   \
  FIELD(T, minConcurrentPeers)   \
  FIELD(T, maxFlowsPerPeer)      \
  FIELD(T, minFlowsPerPeer)

#define NET_ATTR(T)        \
  STRUCT(T)                \
  FIELD(T, sendCommAttr)   \
  FIELD(T, recvCommAttr)   \
  FIELD(T, op)             \
  FIELD(T, algo)           \
  FIELD(T, proto)

/* Property fields shared by all versions, then the per-version additions. */
#define PROPS_HEAD(T) \
  STRUCT(T)           \
  FIELD(T, name)      \
  FIELD(T, pciPath)   \
  FIELD(T, guid)      \
  FIELD(T, ptrSupport)
#define PROPS_TAIL(T) \
  FIELD(T, speed)     \
  FIELD(T, port)      \
  FIELD(T, latency)   \
  FIELD(T, maxComms)  \
  FIELD(T, maxRecvs)
#define PROPS_DEVICE(T)   \
  FIELD(T, netDeviceType) \
  FIELD(T, netDeviceVersion)
#define PROPS_V9(T)          \
  PROPS_HEAD(T)              \
  FIELD(T, regIsGlobal)      \
  FIELD(T, forceFlush)       \
  PROPS_TAIL(T)              \
  PROPS_DEVICE(T)            \
  FIELD(T, vProps)           \
  FIELD(T, maxP2pBytes)      \
  FIELD(T, maxCollBytes)

/* Function-table members shared by all versions. */
#define NET_V6_MEMBERS(T) \
  STRUCT(T)               \
  FIELD(T, name)          \
  FIELD(T, init)          \
  FIELD(T, devices)       \
  FIELD(T, getProperties) \
  FIELD(T, listen)        \
  FIELD(T, connect)       \
  FIELD(T, accept)        \
  FIELD(T, regMr)         \
  FIELD(T, regMrDmaBuf)   \
  FIELD(T, deregMr)       \
  FIELD(T, isend)         \
  FIELD(T, irecv)         \
  FIELD(T, iflush)        \
  FIELD(T, test)          \
  FIELD(T, closeSend)     \
  FIELD(T, closeRecv)     \
  FIELD(T, closeListen)
#define NET_V7_MEMBERS(T) \
  NET_V6_MEMBERS(T)       \
  FIELD(T, getDeviceMr)   \
  FIELD(T, irecvConsumed)
#define NET_V9_MEMBERS(T) \
  NET_V7_MEMBERS(T)       \
  FIELD(T, makeVDevice)
#define NET_V11_MEMBERS(T) \
  NET_V9_MEMBERS(T)        \
  FIELD(T, finalize)       \
  FIELD(T, setNetAttr)

int main(void) {
  CONST(ncclSuccess)
  CONST(ncclUnhandledCudaError)
  CONST(ncclSystemError)
  CONST(ncclInternalError)
  CONST(ncclInvalidArgument)
  CONST(ncclInvalidUsage)
  CONST(ncclRemoteError)
  CONST(ncclInProgress)
  CONST(ncclNumResults)
  CONST(NCCL_PTR_HOST)
  CONST(NCCL_PTR_CUDA)
  CONST(NCCL_PTR_DMABUF)
  CONST(NCCL_NET_HANDLE_MAXSIZE)
  CONST(NCCL_NET_MAX_REQUESTS)
  CONST(NCCL_NET_OPTIONAL_RECV_COMPLETION)
  CONST(NCCL_MAX_NET_SIZE_BYTES)
  CONST(NCCL_NET_TRAFFIC_CLASS_UNDEF)
  CONST(NCCL_NET_ID_UNDEF)
  CONST(NCCL_NET_MAX_DEVS_PER_NIC)
  CONST(NCCL_NET_MAX_DEVS_PER_NIC_V12)
  CONST(NCCL_LOG_NONE)
  CONST(NCCL_LOG_VERSION)
  CONST(NCCL_LOG_WARN)
  CONST(NCCL_LOG_INFO)
  CONST(NCCL_LOG_ABORT)
  CONST(NCCL_LOG_TRACE)
  CONST(NCCL_INIT)
  CONST(NCCL_COLL)
  CONST(NCCL_P2P)
  CONST(NCCL_SHM)
  CONST(NCCL_NET)
  CONST(NCCL_GRAPH)
  CONST(NCCL_TUNING)
  CONST(NCCL_ENV)
  CONST(NCCL_ALLOC)
  CONST(NCCL_CALL)
  CONST(NCCL_PROXY)
  CONST(NCCL_NVLS)
  CONST(NCCL_BOOTSTRAP)
  CONST(NCCL_REG)
  CONST(NCCL_PROFILE)
  CONST(NCCL_ALL)
  CONST(ncclProfilerNetEventStart)
  CONST(ncclProfilerNetEventStop)
  CONST(ncclProfilerNetEventUpdate)
  CONST(ncclProfilerNetEventUpdateAndStop)
  CONST(NCCL_PROFILER_NET_VER_BITS)
  CONST(NCCL_PROFILER_NET_TYPE_IB)
  CONST(NCCL_PROFILER_NET_IB_VER)
  CONST(ncclProfileQp)
  CONST(NCCL_NET_DEVICE_HOST)
  CONST(NCCL_NET_DEVICE_UNPACK)
  CONST(NCCL_NET_DEVICE_INVALID_VERSION)

  /* Scalar and pointer typedefs passed by value across the boundary. */
  TYPE(ncclResult_t)
  TYPE(ncclNetDeviceType)
  TYPE(ncclDebugLogger_t)
  TYPE(ncclProfilerCallback_t)

  DEVICE_HANDLE(ncclNetDeviceHandle_v7_t)
  DEVICE_HANDLE(ncclNetDeviceHandle_v8_t)
  DEVICE_HANDLE(ncclNetDeviceHandle_v9_t)
  DEVICE_HANDLE(ncclNetDeviceHandle_v10_t)
  DEVICE_HANDLE(ncclNetDeviceHandle_v11_t)
  DEVICE_HANDLE(ncclNetDeviceHandle_v12_t)

  VDEVICE_PROPS(ncclNetVDeviceProps_v9_t)
  VDEVICE_PROPS(ncclNetVDeviceProps_v10_t)
  VDEVICE_PROPS(ncclNetVDeviceProps_v11_t)
  VDEVICE_PROPS(ncclNetVDeviceProps_v12_t)

  STRUCT(ncclProfilerNetIbQp_v1_t)
  FIELD(ncclProfilerNetIbQp_v1_t, device)
  FIELD(ncclProfilerNetIbQp_v1_t, wr_id)
  FIELD(ncclProfilerNetIbQp_v1_t, opcode)
  FIELD(ncclProfilerNetIbQp_v1_t, qpNum)
  FIELD(ncclProfilerNetIbQp_v1_t, length)
  /* The `type` byte is left out: a Rust field cannot carry that name. It sits at
   * offset 0, which the offset of `qp` and the size bound. */
  STRUCT(ncclProfilerNetIbDescr_v1_t)
  FIELD(ncclProfilerNetIbDescr_v1_t, qp)

  COMM_CONFIG(ncclNetCommConfig_v10_t)
  COMM_CONFIG(ncclNetCommConfig_v11_t)
  COMM_CONFIG(ncclNetCommConfig_v12_t)

  COMM_ATTR(ncclNetCommAttr_v11_t)
  COMM_ATTR(ncclNetCommAttr_v12_t)
  NET_ATTR(ncclNetAttr_v11_t)
  NET_ATTR(ncclNetAttr_v12_t)

  PROPS_HEAD(ncclNetProperties_v6_t)
  PROPS_TAIL(ncclNetProperties_v6_t)

  PROPS_HEAD(ncclNetProperties_v7_t)
  PROPS_TAIL(ncclNetProperties_v7_t)
  PROPS_DEVICE(ncclNetProperties_v7_t)

  PROPS_HEAD(ncclNetProperties_v8_t)
  FIELD(ncclNetProperties_v8_t, regIsGlobal)
  PROPS_TAIL(ncclNetProperties_v8_t)
  PROPS_DEVICE(ncclNetProperties_v8_t)

  PROPS_V9(ncclNetProperties_v9_t)
  PROPS_V9(ncclNetProperties_v10_t)
  PROPS_V9(ncclNetProperties_v11_t)
  FIELD(ncclNetProperties_v11_t, maxMultiRequestSize)
  PROPS_V9(ncclNetProperties_v12_t)
  FIELD(ncclNetProperties_v12_t, maxMultiRequestSize)
  FIELD(ncclNetProperties_v12_t, railId)
  FIELD(ncclNetProperties_v12_t, planeId)

  NET_V6_MEMBERS(ncclNet_v6_t)
  NET_V7_MEMBERS(ncclNet_v7_t)
  NET_V7_MEMBERS(ncclNet_v8_t)
  NET_V9_MEMBERS(ncclNet_v9_t)
  NET_V9_MEMBERS(ncclNet_v10_t)
  NET_V11_MEMBERS(ncclNet_v11_t)
  NET_V11_MEMBERS(ncclNet_v12_t)

  return ferror(stdout) ? 1 : 0;
}
