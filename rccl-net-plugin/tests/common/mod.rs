//! What the plugin crate's device tests share.

use rccl_net_plugin::net::{self, Plugin};
use std::sync::Arc;

/// The plugin with its devices, or `None` (printing why) when there is no RDMA device; with
/// HALO_REQUIRE_RDMA=1 (the guest runs) a missing device fails the test instead.
pub fn plugin_or_skip(name: &str) -> Option<Arc<Plugin>> {
    match net::init() {
        Ok(p) if !p.devices.is_empty() => Some(p),
        other => {
            let why = other.err().map_or("no device".into(), |e| e.to_string());
            if std::env::var("HALO_REQUIRE_RDMA").as_deref() == Ok("1") {
                panic!("{name}: HALO_REQUIRE_RDMA=1 but the plugin has no device: {why}");
            }
            eprintln!("{name}: SKIPPED (no RDMA device): {why}");
            None
        }
    }
}
