//! The few HIP and HSA entry points the plugin uses, loaded at run time.
//!
//! Declarations follow the public ROCm 6/7 ABI: `hipPointerAttribute_t` is
//! `{ hipMemoryType type; int device; void* devicePointer; void* hostPointer; int isManaged;
//! unsigned allocationFlags; }` with `hipMemoryType` Unregistered 0, Host 1, Device 2, Managed 3
//! (ROCm 5 numbered them differently, hence the version check); HSA statuses and info
//! attributes are C enums passed as 32-bit integers.

use crate::log::{info, INIT, NET};
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Names tried for the HIP runtime, in order.
const HIP_NAMES: [&str; 3] = ["libamdhip64.so", "libamdhip64.so.7", "libamdhip64.so.6"];
const HSA_NAME: &str = "libhsa-runtime64.so.1";

/// `hipMemoryType` values of ROCm 6 and later.
const HIP_MEMORY_TYPE_HOST: c_int = 1;
const HIP_MEMORY_TYPE_DEVICE: c_int = 2;
const HIP_MEMORY_TYPE_MANAGED: c_int = 3;
/// HIP 6.0 as `hipRuntimeGetVersion` reports it (major * 10^7 + minor * 10^5 + patch).
const HIP_VERSION_6: c_int = 60_000_000;

const HSA_STATUS_SUCCESS: u32 = 0;
const HSA_STATUS_INFO_BREAK: u32 = 1;
/// `hsa_agent_info_t`: the agent's name (`char[64]`) and device type.
const HSA_AGENT_INFO_NAME: u32 = 0;
const HSA_AGENT_INFO_DEVICE: u32 = 17;
const HSA_DEVICE_TYPE_GPU: u32 = 1;
/// `hsa_system_info_t`: whether the kernel driver can export dma-bufs (`bool`).
const HSA_AMD_SYSTEM_INFO_DMABUF_SUPPORTED: u32 = 0x204;

#[repr(C)]
struct HipPointerAttribute {
    memory_type: c_int,
    device: c_int,
    device_pointer: *mut c_void,
    host_pointer: *mut c_void,
    is_managed: c_int,
    allocation_flags: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HsaAgent {
    handle: u64,
}

type HipMalloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type HipFree = unsafe extern "C" fn(*mut c_void) -> c_int;
type HipPointerGetAttributes =
    unsafe extern "C" fn(*mut HipPointerAttribute, *const c_void) -> c_int;
type HipRuntimeGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type HsaInit = unsafe extern "C" fn() -> u32;
type HsaShutDown = unsafe extern "C" fn() -> u32;
type HsaAgentCallback = unsafe extern "C" fn(HsaAgent, *mut c_void) -> u32;
type HsaIterateAgents = unsafe extern "C" fn(HsaAgentCallback, *mut c_void) -> u32;
type HsaAgentGetInfo = unsafe extern "C" fn(HsaAgent, u32, *mut c_void) -> u32;
type HsaSystemGetInfo = unsafe extern "C" fn(u32, *mut c_void) -> u32;
type HsaExportDmabuf = unsafe extern "C" fn(*const c_void, usize, *mut c_int, *mut u64) -> u32;
type HsaCloseDmabuf = unsafe extern "C" fn(c_int) -> u32;

/// What `hipPointerGetAttributes` says about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemKind {
    /// Host memory, registered with HIP or not.
    Host,
    /// Device memory of GPU `ordinal` (on an APU: carve-out or GTT pages of system RAM).
    Device { ordinal: i32 },
    /// Managed (unified) memory, last associated with GPU `ordinal`.
    Managed { ordinal: i32 },
}

/// The dma-buf export entry points (HSA); absent where HSA could not be loaded. Holds one
/// `hsa_init` reference, given back on drop (before the library handle closes).
struct Hsa {
    /// The library, where HSA was not reached through the HIP handle.
    _lib: Option<Library>,
    export: HsaExportDmabuf,
    close: HsaCloseDmabuf,
    shut_down: Option<HsaShutDown>,
}

impl Drop for Hsa {
    fn drop(&mut self) {
        if let Some(f) = self.shut_down {
            // SAFETY: pairs the successful hsa_init of `load_hsa`; nothing of ours uses HSA now.
            unsafe { f() };
        }
    }
}

/// The loaded ROCm runtime. Loaded on first use and kept until the plugin library is unloaded
/// ([`unload`]): in an RCCL process the runtime is RCCL's own, and this only holds a reference.
pub struct Rocm {
    _hip: Library,
    hip_origin: Origin,
    hip_version: i32,
    malloc: HipMalloc,
    free: HipFree,
    attributes: HipPointerGetAttributes,
    hsa: Result<Hsa, String>,
    hsa_origin: Option<Origin>,
    gpus: Vec<String>,
    dmabuf_supported: Option<bool>,
}

// SAFETY: the struct holds library handles and plain function pointers into thread-safe runtimes.
unsafe impl Send for Rocm {}
// SAFETY: as above; nothing is mutated after loading.
unsafe impl Sync for Rocm {}

/// `None`: not tried yet; `Some(None)`: tried, not available; `Some(Some(r))`: loaded (a leaked
/// box, taken back by [`unload`]).
static RUNTIME: Mutex<Option<Option<&'static Rocm>>> = Mutex::new(None);

/// The ROCm runtime, loaded on first use; `None` (logged once at INFO) when it cannot be. The
/// reference is valid until the library's unload.
pub fn runtime() -> Option<&'static Rocm> {
    *RUNTIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(|| match Rocm::load() {
            Ok(r) => {
                info!(INIT | NET, "{}", r.describe());
                Some(&*Box::leak(Box::new(r)))
            }
            Err(e) => {
                info!(
                    INIT | NET,
                    "no GPU memory support: {e}; only host memory is registered"
                );
                None
            }
        })
}

/// Gives the runtime back: HSA's `hsa_init` reference and both library handles.
///
/// # Safety
/// No reference from [`runtime`] may be used afterwards: only the library's unload calls this,
/// when no exported function runs any more.
pub unsafe fn unload() {
    let taken = RUNTIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(Some(r)) = taken {
        // SAFETY: `r` is the box leaked in `runtime`, taken out of the slot once; per the
        // contract nobody uses it any more.
        drop(unsafe { Box::from_raw(r as *const Rocm as *mut Rocm) });
    }
}

/// Copies a function pointer out of `lib` (the object itself, then its dependencies).
///
/// # Safety
/// `T` must be the function type the library defines for `name`.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller names the right type; the pointer is used only while `lib` is loaded
    // (the libraries live as long as the process).
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{name} missing: {e}"))
}

fn open(name: &str) -> Result<Library, String> {
    // SAFETY: loading a ROCm runtime runs its initialisers, which have no preconditions.
    unsafe { Library::new(name) }.map_err(|e| e.to_string())
}

/// A handle on an object that is already loaded (`RTLD_NOLOAD`): takes a reference, never
/// maps a second copy.
fn open_loaded(path: &str) -> Result<Library, String> {
    // SAFETY: with RTLD_NOLOAD nothing is loaded and no initialiser runs; the object is
    // already in the process.
    unsafe { libloading::os::unix::Library::open(Some(path), libc::RTLD_NOLOAD | libc::RTLD_LAZY) }
        .map(Library::from)
        .map_err(|e| e.to_string())
}

/// Paths of the loaded objects whose file name starts with `prefix`, in load order.
fn loaded_objects(prefix: &str) -> Vec<String> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the vector `loaded_objects` passed, alive for the iteration;
        // `info` is valid during the callback and `dlpi_name` is NULL or a C string.
        unsafe {
            let names = &mut *(data as *mut Vec<String>);
            let name = (*info).dlpi_name;
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        0
    }
    let mut all: Vec<String> = Vec::new();
    // SAFETY: the callback only reads the entry and appends to `all`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut all as *mut Vec<String> as *mut c_void) };
    all.into_iter()
        .filter(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(prefix))
        })
        .collect()
}

/// The object defining `symbol` in the process's global scope, if any.
fn global_definer(symbol: &CStr) -> Option<String> {
    // SAFETY: dlsym with RTLD_DEFAULT only looks the name up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: an all-zero Dl_info is a valid value (null pointers) for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is an address in a loaded object; `info` is a valid out-pointer.
    if unsafe { libc::dladdr(p, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr set a C string owned by the loader, valid while the object is loaded.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Where a runtime library came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Already loaded in the process (by RCCL, PyTorch, ...), found among the loaded objects.
    Loaded { path: String },
    /// Already loaded in the process, found as the global definition of a symbol.
    GlobalSymbol { path: String, symbol: &'static str },
    /// Reached through the HIP runtime's own dependencies.
    HipDependency,
    /// Loaded by the plugin under this name (no copy was in the process).
    ByName { name: &'static str },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Loaded { path } => write!(f, "{path} (already loaded in the process)"),
            Origin::GlobalSymbol { path, symbol } => write!(
                f,
                "{path} (already loaded in the process, which defines {symbol})"
            ),
            Origin::HipDependency => write!(f, "the HIP runtime's own HSA runtime"),
            Origin::ByName { name } => write!(
                f,
                "{name} (loaded by name: no HIP runtime was in the process yet)"
            ),
        }
    }
}

/// The library of a runtime: the copy already in the process when there is one (whatever its
/// file name: Python wheels bundle `libamdhip64.so.6` or a hashed name), else the first of
/// `names` that loads. Loading by name when a copy is already in the process would bring a
/// second, independent runtime that knows none of the first one's allocations.
fn find_runtime(
    prefix: &str,
    symbol: &'static CStr,
    names: &[&'static str],
) -> Result<(Library, Origin), String> {
    let mut tried = Vec::new();
    let loaded = loaded_objects(prefix);
    if loaded.len() > 1 {
        info!(
            INIT | NET,
            "{} copies of {prefix}* are loaded ({}); using the first",
            loaded.len(),
            loaded.join(", ")
        );
    }
    for path in loaded {
        match open_loaded(&path) {
            Ok(l) => return Ok((l, Origin::Loaded { path })),
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    if let Some(path) = global_definer(symbol) {
        match open_loaded(&path) {
            Ok(l) => {
                return Ok((
                    l,
                    Origin::GlobalSymbol {
                        path,
                        symbol: symbol.to_str().unwrap_or("?"),
                    },
                ))
            }
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    for &name in names {
        match open(name) {
            Ok(l) => return Ok((l, Origin::ByName { name })),
            Err(e) => tried.push(e),
        }
    }
    Err(tried.join("; "))
}

impl Rocm {
    fn load() -> Result<Rocm, String> {
        let (hip, hip_origin) = find_runtime("libamdhip64", c"hipPointerGetAttributes", &HIP_NAMES)
            .map_err(|e| format!("no HIP runtime ({e})"))?;
        // SAFETY: each type matches the HIP declaration of the symbol.
        let (malloc, free, attributes, get_version) = unsafe {
            (
                sym::<HipMalloc>(&hip, "hipMalloc")?,
                sym::<HipFree>(&hip, "hipFree")?,
                sym::<HipPointerGetAttributes>(&hip, "hipPointerGetAttributes")?,
                sym::<HipRuntimeGetVersion>(&hip, "hipRuntimeGetVersion")?,
            )
        };
        let mut hip_version: c_int = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { get_version(&mut hip_version) };
        if rc != 0 || hip_version < HIP_VERSION_6 {
            return Err(format!(
                "HIP runtime {hip_origin} is version {hip_version} (status {rc}); ROCm 6 or later is needed"
            ));
        }
        let mut r = Rocm {
            _hip: hip,
            hip_origin,
            hip_version,
            malloc,
            free,
            attributes,
            hsa: Err(String::new()),
            hsa_origin: None,
            gpus: Vec::new(),
            dmabuf_supported: None,
        };
        r.load_hsa();
        Ok(r)
    }

    fn load_hsa(&mut self) {
        // HIP links its HSA runtime: looking the symbols up through the HIP handle (the object
        // and its dependencies) finds the copy HIP itself uses, bundled or not.
        let (lib, origin, fns) = match hsa_fns(&self._hip) {
            Ok(f) => (None, Origin::HipDependency, f),
            Err(_) => {
                let (lib, origin) = match find_runtime("libhsa-runtime64", c"hsa_init", &[HSA_NAME])
                {
                    Ok(l) => l,
                    Err(e) => {
                        self.hsa = Err(e);
                        return;
                    }
                };
                match hsa_fns(&lib) {
                    Ok(f) => (Some(lib), origin, f),
                    Err(e) => {
                        self.hsa = Err(e);
                        return;
                    }
                }
            }
        };
        self.hsa_origin = Some(origin);
        // Older runtimes may lack it; then the reference is simply kept.
        // SAFETY: the type matches the HSA declaration of the symbol.
        let shut_down =
            unsafe { sym::<HsaShutDown>(lib.as_ref().unwrap_or(&self._hip), "hsa_shut_down") }.ok();
        let (init, iterate, get_info, system_info, export, close) = fns;
        // HSA counts initialisations; this reference is held until `unload`.
        // SAFETY: no preconditions.
        let st = unsafe { init() };
        if st != HSA_STATUS_SUCCESS {
            self.hsa = Err(format!("hsa_init failed with status {st:#x}"));
            return;
        }
        let mut names: Vec<String> = Vec::new();
        let mut ctx = (get_info, &mut names);
        // SAFETY: the callback gets `ctx` back as its data pointer and only during this call.
        let st = unsafe { iterate(collect_gpu, &mut ctx as *mut _ as *mut c_void) };
        if st == HSA_STATUS_SUCCESS || st == HSA_STATUS_INFO_BREAK {
            self.gpus = names;
        }
        let mut supported = false;
        // SAFETY: the attribute's value is a C `bool`, one byte, which `supported` provides.
        let st = unsafe {
            system_info(
                HSA_AMD_SYSTEM_INFO_DMABUF_SUPPORTED,
                &mut supported as *mut bool as *mut c_void,
            )
        };
        self.dmabuf_supported = (st == HSA_STATUS_SUCCESS).then_some(supported);
        self.hsa = Ok(Hsa {
            _lib: lib,
            export,
            close,
            shut_down,
        });
    }

    /// One line for the log: which runtime and where it came from, which GPUs, whether
    /// dma-buf export is possible.
    pub fn describe(&self) -> String {
        format!(
            "ROCm: HIP runtime {}, HIP {}; HSA {}; GPU agents [{}], dma-buf export {}",
            self.hip_origin,
            self.hip_version,
            match (&self.hsa, &self.hsa_origin) {
                (Ok(_), Some(o)) => o.to_string(),
                _ => "not loaded".to_string(),
            },
            self.gpus.join(", "),
            match (&self.hsa, self.dmabuf_supported) {
                (Err(e), _) => format!("unavailable ({HSA_NAME}: {e})"),
                (Ok(_), Some(true)) => "supported by the driver".into(),
                (Ok(_), Some(false)) => "not supported by the driver".into(),
                (Ok(_), None) => "of unknown support".into(),
            }
        )
    }

    /// Where the HIP runtime in use came from.
    pub fn hip_origin(&self) -> &Origin {
        &self.hip_origin
    }

    /// `hipRuntimeGetVersion` of the runtime in use.
    pub fn hip_version(&self) -> i32 {
        self.hip_version
    }

    /// Names of the GPU agents HSA reports (e.g. `gfx1151`).
    pub fn gpu_names(&self) -> &[String] {
        &self.gpus
    }

    /// `HSA_AMD_SYSTEM_INFO_DMABUF_SUPPORTED`, where HSA answered.
    pub fn dmabuf_supported(&self) -> Option<bool> {
        self.dmabuf_supported
    }

    /// Classifies `addr` with `hipPointerGetAttributes`; memory HIP does not know is host memory.
    pub fn classify(&self, addr: u64) -> MemKind {
        let mut a = HipPointerAttribute {
            memory_type: 0,
            device: -1,
            device_pointer: std::ptr::null_mut(),
            host_pointer: std::ptr::null_mut(),
            is_managed: 0,
            allocation_flags: 0,
        };
        // SAFETY: valid out-pointer; HIP only looks the address up.
        let rc = unsafe { (self.attributes)(&mut a, addr as *const c_void) };
        match (rc, a.memory_type) {
            (0, _) if a.is_managed != 0 => MemKind::Managed { ordinal: a.device },
            (0, HIP_MEMORY_TYPE_DEVICE) => MemKind::Device { ordinal: a.device },
            (0, HIP_MEMORY_TYPE_MANAGED) => MemKind::Managed { ordinal: a.device },
            (0, HIP_MEMORY_TYPE_HOST) => MemKind::Host,
            _ => MemKind::Host,
        }
    }

    /// `hipMalloc` of `len` bytes on the calling thread's current GPU.
    pub fn alloc(&'static self, len: usize) -> Result<DeviceAlloc, String> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.malloc)(&mut p, len) };
        if rc != 0 || p.is_null() {
            return Err(format!("hipMalloc({len}) failed with hipError {rc}"));
        }
        Ok(DeviceAlloc {
            rocm: self,
            ptr: p as u64,
            len,
        })
    }

    /// Exports the dma-buf behind `[addr, addr + len)` of a GPU allocation.
    pub fn export_dmabuf(&'static self, addr: u64, len: usize) -> Result<DmaBuf, String> {
        let hsa = self
            .hsa
            .as_ref()
            .map_err(|e| format!("dma-buf export unavailable ({HSA_NAME}: {e})"))?;
        let (mut fd, mut offset): (c_int, u64) = (-1, 0);
        // SAFETY: valid out-pointers; HSA checks that the range belongs to one allocation.
        let st = unsafe { (hsa.export)(addr as *const c_void, len, &mut fd, &mut offset) };
        if st != HSA_STATUS_SUCCESS || fd < 0 {
            return Err(format!(
                "hsa_amd_portable_export_dmabuf({addr:#x}, {len}) failed with status {st:#x}{}",
                if self.dmabuf_supported == Some(false) {
                    " (the driver reports no dma-buf support)"
                } else {
                    ""
                }
            ));
        }
        Ok(DmaBuf {
            close: hsa.close,
            fd,
            offset,
        })
    }
}

type HsaFns = (
    HsaInit,
    HsaIterateAgents,
    HsaAgentGetInfo,
    HsaSystemGetInfo,
    HsaExportDmabuf,
    HsaCloseDmabuf,
);

/// The HSA entry points the plugin uses, looked up through `lib`.
fn hsa_fns(lib: &Library) -> Result<HsaFns, String> {
    // SAFETY: each type matches the HSA declaration of the symbol.
    unsafe {
        Ok((
            sym::<HsaInit>(lib, "hsa_init")?,
            sym::<HsaIterateAgents>(lib, "hsa_iterate_agents")?,
            sym::<HsaAgentGetInfo>(lib, "hsa_agent_get_info")?,
            sym::<HsaSystemGetInfo>(lib, "hsa_system_get_info")?,
            sym::<HsaExportDmabuf>(lib, "hsa_amd_portable_export_dmabuf")?,
            sym::<HsaCloseDmabuf>(lib, "hsa_amd_portable_close_dmabuf")?,
        ))
    }
}

unsafe extern "C" fn collect_gpu(agent: HsaAgent, data: *mut c_void) -> u32 {
    // SAFETY: `data` is the context `load_hsa` passed, alive for the iteration.
    let (get_info, names) = unsafe { &mut *(data as *mut (HsaAgentGetInfo, &mut Vec<String>)) };
    let mut kind: u32 = u32::MAX;
    // SAFETY: the device attribute is a 32-bit enum.
    if unsafe {
        get_info(
            agent,
            HSA_AGENT_INFO_DEVICE,
            &mut kind as *mut u32 as *mut c_void,
        )
    } != HSA_STATUS_SUCCESS
        || kind != HSA_DEVICE_TYPE_GPU
    {
        return HSA_STATUS_SUCCESS;
    }
    let mut name = [0 as c_char; 64];
    // SAFETY: the name attribute fills at most 64 bytes.
    if unsafe { get_info(agent, HSA_AGENT_INFO_NAME, name.as_mut_ptr() as *mut c_void) }
        == HSA_STATUS_SUCCESS
    {
        name[63] = 0;
        // SAFETY: NUL-terminated above.
        names.push(
            unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    HSA_STATUS_SUCCESS
}

/// A `hipMalloc` allocation, freed on drop (the probe's buffer).
pub struct DeviceAlloc {
    rocm: &'static Rocm,
    pub ptr: u64,
    pub len: usize,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated by hipMalloc in `Rocm::alloc`, freed once.
        unsafe { (self.rocm.free)(self.ptr as *mut c_void) };
    }
}

/// An exported dma-buf file descriptor, closed on drop. A memory region registered from it
/// holds its own reference to the buffer, so the fd may close right after registration.
pub struct DmaBuf {
    close: HsaCloseDmabuf,
    pub fd: c_int,
    /// Where the exported range starts inside the dma-buf.
    pub offset: u64,
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: the fd came from hsa_amd_portable_export_dmabuf and is closed once.
        unsafe { (self.close)(self.fd) };
    }
}
