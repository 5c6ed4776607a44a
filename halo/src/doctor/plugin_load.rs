//! Loads the plugin library and calls it through its C ABI, as RCCL's loader does:
//! every `ncclNetPlugin_vN` symbol looked up, then `init`, `devices` and `getProperties`
//! through the v8 table (the one every RCCL from ROCm 6.2 on understands), with the harness's
//! C-ABI driver.

use halo_ffi::{NCCL_PTR_CUDA, NCCL_PTR_DMABUF};
use halo_harness::driver::{self, Plugin};
use halo_harness::log::{logger, LogSink};
use std::ffi::c_int;
use std::path::Path;
use std::sync::Mutex;

/// What loading found.
pub struct LoadResult {
    /// `ncclNetPlugin_vN` symbols (of [`halo_ffi::ABI_VERSIONS`]) the library lacks.
    pub missing: Vec<String>,
    /// One line per device the plugin offers.
    pub devices: Vec<String>,
    /// Why `init` failed, from the plugin's own log.
    pub init_error: Option<String>,
}

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the plugin's warning and info messages, to say why `init` failed.
struct Collect;

impl LogSink for Collect {
    fn line(level: c_int, _file: &str, _line: c_int, msg: &str) {
        if level <= 3 {
            LOG.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(msg.to_string());
        }
    }
}

/// What `ptrSupport` means for the user: whether RCCL can hand GPU buffers to the NIC.
pub fn gpu_direct(ptr_support: c_int) -> String {
    let (cuda, dmabuf) = (
        ptr_support & NCCL_PTR_CUDA != 0,
        ptr_support & NCCL_PTR_DMABUF != 0,
    );
    match (cuda, dmabuf) {
        (true, true) => "GPU-direct on (GPU memory registered through dma-buf)".into(),
        (true, false) => "GPU-direct on (GPU memory registered by address)".into(),
        _ => "GPU-direct off: host memory only (RCCL stages GPU data through host buffers)".into(),
    }
}

/// Loads `path`, checks its exports and asks it for its devices.
pub fn load_and_init(path: &Path) -> Result<LoadResult, String> {
    // The doctor only loads the plugin it was asked to check, exactly as RCCL would.
    let lib = driver::open(path).map_err(|e| format!("cannot be loaded: {e}"))?;
    let missing = driver::missing_tables(&lib);
    let mut result = LoadResult {
        missing,
        devices: Vec::new(),
        init_error: None,
    };
    let Ok(mut plugin) = Plugin::from_library(lib, 8) else {
        return Ok(result);
    };
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
    if plugin.init(logger::<Collect>(), 0).is_err() {
        let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        result.init_error = Some(
            log.last()
                .cloned()
                .unwrap_or_else(|| "init failed (no log line)".into()),
        );
    } else {
        let n = plugin.devices().unwrap_or(0);
        for d in 0..n as c_int {
            if let Ok(p) = plugin.properties(d) {
                if !p.name.is_empty() {
                    result.devices.push(format!(
                        "device {d}: {} port {} {} Mbps, {}",
                        p.name,
                        p.port,
                        p.speed,
                        gpu_direct(p.ptr_support)
                    ));
                }
            }
        }
    }
    // Never unloaded under the plugin's feet (RCCL keeps plugins loaded too).
    std::mem::forget(plugin);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptr_support_reads_as_gpu_direct_state() {
        assert!(gpu_direct(0x1).starts_with("GPU-direct off"));
        assert!(gpu_direct(0x3).contains("by address"));
        assert!(gpu_direct(0x7).contains("dma-buf"));
    }
}
