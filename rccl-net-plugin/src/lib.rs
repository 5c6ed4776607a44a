//! RCCL/NCCL network plugin over RoCE v2 RC queue pairs.
//!
//! `abi` exports `ncclNetPlugin_v6` … `ncclNetPlugin_v12`, thin adapters over the
//! version-neutral `net`, which drives the pure clear-to-send `protocol` through `halo-ibverbs`.
//!
//! Lifetime: RCCL may `dlclose` the plugin after its last communicator and load it again for
//! the next. With v11+ the last `finalize` releases the plugin's state ([`net::finalize_context`]);
//! v6–v10 have no `finalize`, so the library's destructor releases it when the
//! library is unloaded. The plugin starts no threads and keeps no thread-local that needs a
//! destructor, so nothing keeps the library mapped after `dlclose`.

pub mod abi;
pub mod config;
pub mod gpu;
pub mod log;
pub mod net;
pub mod oob;
pub mod protocol;

mod unload;
