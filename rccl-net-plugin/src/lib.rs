//! RCCL/NCCL network plugin over RoCE v2 RC queue pairs.
//!
//! `abi` exports `ncclNetPlugin_v6` … `ncclNetPlugin_v12`, thin adapters over the
//! version-neutral `net`, which drives the pure clear-to-send `protocol` through `halo-ibverbs`.

pub mod abi;
pub mod config;
pub mod gpu;
pub mod log;
pub mod net;
pub mod oob;
pub mod protocol;
