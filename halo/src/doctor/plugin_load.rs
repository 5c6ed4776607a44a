//! Loads the plugin library and calls it through its C ABI, as RCCL's loader does:
//! every `ncclNetPlugin_vN` symbol looked up, then `init`, `devices` and `getProperties`
//! through the v8 table (the one every RCCL from ROCm 6.2 on understands).

use halo_ffi::{
    ncclDebugLogger_t, ncclNetProperties_v8_t, ncclNet_v8_t, ncclSuccess, NCCL_PTR_CUDA,
    NCCL_PTR_DMABUF,
};
use std::ffi::{c_char, c_int, c_ulong, CStr};
use std::path::Path;
use std::sync::Mutex;

/// What loading found.
pub struct LoadResult {
    /// `ncclNetPlugin_vN` symbols (v6..v12) the library lacks.
    pub missing: Vec<String>,
    /// One line per device the plugin offers.
    pub devices: Vec<String>,
    /// Why `init` failed, from the plugin's own log.
    pub init_error: Option<String>,
}

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The plugin calls its logger with the format `"%s"` and exactly one string argument; on
/// x86-64 and aarch64 Linux that variadic pointer argument arrives like a named one.
extern "C" fn collect(
    level: c_int,
    _flags: c_ulong,
    _file: *const c_char,
    _line: c_int,
    _fmt: *const c_char,
    msg: *const c_char,
) {
    if level <= 2 && !msg.is_null() {
        // SAFETY: the plugin passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        LOG.lock().unwrap_or_else(|e| e.into_inner()).push(text);
    }
}

fn logger() -> ncclDebugLogger_t {
    type Fixed = extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, *const c_char);
    // SAFETY: see `collect`: the only call shape the plugin uses is ABI-compatible.
    Some(unsafe {
        std::mem::transmute::<
            Fixed,
            unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...),
        >(collect as Fixed)
    })
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
    // SAFETY: loading runs the library's initialisers; the doctor only loads the plugin it was
    // asked to check, exactly as RCCL would.
    let lib =
        unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot be loaded: {e}"))?;
    let mut missing = Vec::new();
    for v in 6..=12 {
        let name = format!("ncclNetPlugin_v{v}");
        // SAFETY: only the symbol's presence is checked here.
        if unsafe { lib.get::<*const u8>(name.as_bytes()) }.is_err() {
            missing.push(name);
        }
    }
    // SAFETY: the symbol is a `const ncclNet_v8_t` data object (the ABI the library implements).
    let table = match unsafe { lib.get::<*const ncclNet_v8_t>(b"ncclNetPlugin_v8") } {
        Ok(sym) => *sym,
        Err(_) => {
            return Ok(LoadResult {
                missing,
                devices: Vec::new(),
                init_error: None,
            })
        }
    };
    // SAFETY: the table stays valid while `lib` is loaded; it is leaked below so it never unloads
    // under the plugin's feet (RCCL keeps plugins loaded too).
    let t = unsafe { &*table };
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let mut result = LoadResult {
        missing,
        devices: Vec::new(),
        init_error: None,
    };
    // SAFETY: calls through the plugin's own table with valid arguments.
    unsafe {
        let init = t.init.ok_or("the v8 table has no init")?;
        if init(logger()) != ncclSuccess {
            let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
            result.init_error = Some(
                log.last()
                    .cloned()
                    .unwrap_or_else(|| "init failed (no log line)".into()),
            );
        } else {
            let mut n: c_int = 0;
            if let Some(devices) = t.devices {
                devices(&mut n);
            }
            for d in 0..n {
                let mut p = ncclNetProperties_v8_t::zeroed();
                if t.getProperties
                    .is_some_and(|gp| gp(d, &mut p) == ncclSuccess)
                    && !p.name.is_null()
                {
                    result.devices.push(format!(
                        "device {d}: {} port {} {} Mbps, {}",
                        CStr::from_ptr(p.name).to_string_lossy(),
                        p.port,
                        p.speed,
                        gpu_direct(p.ptrSupport)
                    ));
                }
            }
        }
    }
    std::mem::forget(lib);
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
