//! Drives a built net plugin `.so` the way RCCL's proxy does: load it with `dlopen`, pick one
//! `ncclNetPlugin_vN` table and call it through a version-independent surface. Like NCCL and
//! RCCL, every call reads its entry through the exported symbol at the time of the call: some
//! plugins (nccl-rdma-sharp-plugins) export only `name` and `init` and fill in the rest of the
//! table during `init`. Used by the
//! conformance example and the integration tests, which must exercise the exported C ABI rather
//! than the plugin's Rust internals.

use halo_ffi::*;
use libloading::Library;
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::ptr::null_mut;

/// An opaque plugin pointer (comm, memory handle or request) that may cross threads: RCCL itself
/// hands comms and requests from the service thread to the progress thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opaque(pub *mut c_void);

// SAFETY: the plugin contract allows its handles to be used from any thread (one thread at a time
// per comm); the pointer is never dereferenced on this side.
unsafe impl Send for Opaque {}

impl Opaque {
    pub fn is_null(self) -> bool {
        self.0.is_null()
    }
}

/// A non-success `ncclResult_t` together with the call that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetError {
    pub call: &'static str,
    pub code: ncclResult_t,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} returned {} ({})",
            self.call,
            self.code,
            result_name(self.code)
        )
    }
}

impl std::error::Error for NetError {}

/// The name NCCL gives a result code.
pub fn result_name(code: ncclResult_t) -> &'static str {
    const NAMES: [(ncclResult_t, &str); 8] = [
        (ncclSuccess, "ncclSuccess"),
        (ncclUnhandledCudaError, "ncclUnhandledCudaError"),
        (ncclSystemError, "ncclSystemError"),
        (ncclInternalError, "ncclInternalError"),
        (ncclInvalidArgument, "ncclInvalidArgument"),
        (ncclInvalidUsage, "ncclInvalidUsage"),
        (ncclRemoteError, "ncclRemoteError"),
        (ncclInProgress, "ncclInProgress"),
    ];
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unknown result", |(_, n)| n)
}

fn check(call: &'static str, code: ncclResult_t) -> Result<(), NetError> {
    if code == ncclSuccess {
        Ok(())
    } else {
        Err(NetError { call, code })
    }
}

/// Opens a plugin library with `dlopen`, as RCCL's loader does.
pub fn open(path: &std::path::Path) -> Result<Library, libloading::Error> {
    // SAFETY: loading runs the library's initialisers; the plugin has none with preconditions.
    unsafe { Library::new(path) }
}

/// The `ncclNetPlugin_vN` symbols of [`ABI_VERSIONS`] that `lib` does not export.
pub fn missing_tables(lib: &Library) -> Vec<String> {
    ABI_VERSIONS
        .map(|v| format!("ncclNetPlugin_v{v}"))
        .filter(|name| {
            // SAFETY: only the symbol's presence is checked.
            unsafe { lib.get::<*const u8>(name.as_bytes()) }.is_err()
        })
        .collect()
}

/// The ABI versions this driver speaks; v7 and v9 differ from a neighbour only in details RCCL
/// no longer exercises.
pub const VERSIONS: [u32; 5] = [6, 8, 10, 11, 12];

/// The exported table symbol of one version; entries are read through it at each call, never
/// copied.
#[derive(Clone, Copy)]
enum Table {
    V6(*const ncclNet_v6_t),
    V8(*const ncclNet_v8_t),
    V10(*const ncclNet_v10_t),
    V11(*const ncclNet_v11_t),
    V12(*const ncclNet_v12_t),
}

/// What `getProperties` reported for one device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Empty when the plugin reports no name.
    pub name: String,
    pub max_recvs: usize,
    pub ptr_support: c_int,
    pub port: c_int,
    /// Mbps.
    pub speed: c_int,
}

/// One loaded plugin table. `init` must be called before anything else; for v11+ it creates the
/// per-communicator context that `listen`/`connect` carry and `finalize` releases.
pub struct Plugin {
    table: Table,
    ctx: *mut c_void,
    version: u32,
    _lib: Library,
}

// SAFETY: RCCL calls one table from its service and progress threads concurrently; the plugin
// locks its shared state. `ctx` is an opaque value passed back to the plugin, never dereferenced.
unsafe impl Send for Plugin {}
// SAFETY: as above; `&Plugin` only reads the table (through the symbol) and `ctx`.
unsafe impl Sync for Plugin {}

/// Reads a table entry through the symbol pointer `$t`, at the time of the call; it must be
/// present (every entry this driver uses is mandatory in the ABI). Used inside `unsafe`: `$t`
/// points into the loaded library, which `Plugin` keeps loaded.
macro_rules! entry {
    ($t:expr, $name:ident) => {
        (*$t).$name.ok_or(NetError {
            call: concat!(stringify!($name), " (missing entry)"),
            code: ncclInternalError,
        })?
    };
}

impl Plugin {
    /// Opens `path` and finds its `ncclNetPlugin_v{version}` table.
    pub fn load(path: &std::path::Path, version: u32) -> Result<Plugin, String> {
        let lib = open(path).map_err(|e| format!("dlopen {}: {e}", path.display()))?;
        Plugin::from_library(lib, version)
    }

    /// Finds the `ncclNetPlugin_v{version}` table of an opened library, which it keeps loaded.
    /// Only the symbol's address is kept: the table's entries are read at each call.
    pub fn from_library(lib: Library, version: u32) -> Result<Plugin, String> {
        let symbol = format!("ncclNetPlugin_v{version}\0");
        macro_rules! table {
            ($ty:ty, $variant:ident) => {{
                // SAFETY: the exported data symbol of this name is a `$ty` by the ABI's definition;
                // `_lib` keeps the library, and so the address, valid as long as the `Plugin`.
                let table: *const $ty = unsafe {
                    let sym = lib
                        .get::<*const $ty>(symbol.as_bytes())
                        .map_err(|e| format!("{}: {e}", &symbol[..symbol.len() - 1]))?;
                    *sym
                };
                Table::$variant(table)
            }};
        }
        let table = match version {
            6 => table!(ncclNet_v6_t, V6),
            8 => table!(ncclNet_v8_t, V8),
            10 => table!(ncclNet_v10_t, V10),
            11 => table!(ncclNet_v11_t, V11),
            12 => table!(ncclNet_v12_t, V12),
            v => {
                return Err(format!(
                    "unsupported plugin ABI version {v} (supported: {VERSIONS:?})"
                ))
            }
        };
        Ok(Plugin {
            table,
            ctx: null_mut(),
            version,
            _lib: lib,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The table's `name` field.
    pub fn name(&self) -> String {
        // SAFETY: the symbol points into the loaded library.
        let p = unsafe {
            match self.table {
                Table::V6(t) => (*t).name,
                Table::V8(t) => (*t).name,
                Table::V10(t) => (*t).name,
                Table::V11(t) => (*t).name,
                Table::V12(t) => (*t).name,
            }
        };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: the table's name is a NUL-terminated static string of the loaded library.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `init`; for v11+ with a fresh per-communicator context (`comm_id` identifies it in logs).
    pub fn init(&mut self, logger: ncclDebugLogger_t, comm_id: u64) -> Result<(), NetError> {
        let mut config = ncclNetCommConfig_v11_t {
            trafficClass: NCCL_NET_TRAFFIC_CLASS_UNDEF,
        };
        // SAFETY: arguments follow the ABI; `config` outlives the call and `ctx` is written by it.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, init)(logger),
                Table::V8(t) => entry!(t, init)(logger),
                Table::V10(t) => entry!(t, init)(logger, None),
                Table::V11(t) => entry!(t, init)(&mut self.ctx, comm_id, &mut config, logger, None),
                Table::V12(t) => entry!(t, init)(&mut self.ctx, comm_id, &mut config, logger, None),
            }
        };
        check("init", code)
    }

    /// `finalize` of the v11+ context; nothing to do for older tables.
    pub fn finalize(&mut self) -> Result<(), NetError> {
        // SAFETY: `ctx` came from this table's `init`, and is cleared so it is released once.
        let code = unsafe {
            match self.table {
                Table::V11(t) => entry!(t, finalize)(self.ctx),
                Table::V12(t) => entry!(t, finalize)(self.ctx),
                _ => ncclSuccess,
            }
        };
        self.ctx = null_mut();
        check("finalize", code)
    }

    pub fn devices(&self) -> Result<usize, NetError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, devices)(&mut n),
                Table::V8(t) => entry!(t, devices)(&mut n),
                Table::V10(t) => entry!(t, devices)(&mut n),
                Table::V11(t) => entry!(t, devices)(&mut n),
                Table::V12(t) => entry!(t, devices)(&mut n),
            }
        };
        check("devices", code)?;
        Ok(n.max(0) as usize)
    }

    pub fn properties(&self, dev: c_int) -> Result<DeviceInfo, NetError> {
        macro_rules! props {
            ($t:expr, $ty:ident) => {{
                let mut p = $ty::zeroed();
                // SAFETY: `p` is a valid out-pointer of this version's properties struct.
                check("getProperties", unsafe { entry!($t, getProperties)(dev, &mut p) })?;
                let name = if p.name.is_null() {
                    String::new()
                } else {
                    // SAFETY: the plugin returns a NUL-terminated name that lives as long as it does.
                    unsafe { CStr::from_ptr(p.name) }.to_string_lossy().into_owned()
                };
                DeviceInfo {
                    name,
                    max_recvs: p.maxRecvs.max(0) as usize,
                    ptr_support: p.ptrSupport,
                    port: p.port,
                    speed: p.speed,
                }
            }};
        }
        Ok(match self.table {
            Table::V6(t) => props!(t, ncclNetProperties_v6_t),
            Table::V8(t) => props!(t, ncclNetProperties_v8_t),
            Table::V10(t) => props!(t, ncclNetProperties_v10_t),
            Table::V11(t) => props!(t, ncclNetProperties_v11_t),
            Table::V12(t) => props!(t, ncclNetProperties_v12_t),
        })
    }

    /// `listen` on `dev`; fills the 128-byte handle the sender needs.
    pub fn listen(
        &self,
        dev: c_int,
        handle: &mut [u8; NCCL_NET_HANDLE_MAXSIZE],
    ) -> Result<Opaque, NetError> {
        let mut comm = null_mut();
        let h = handle.as_mut_ptr().cast();
        // SAFETY: `handle` is NCCL_NET_HANDLE_MAXSIZE bytes, `comm` a valid out-pointer.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, listen)(dev, h, &mut comm),
                Table::V8(t) => entry!(t, listen)(dev, h, &mut comm),
                Table::V10(t) => entry!(t, listen)(dev, h, &mut comm),
                Table::V11(t) => entry!(t, listen)(self.ctx, dev, h, &mut comm),
                Table::V12(t) => entry!(t, listen)(self.ctx, dev, h, &mut comm),
            }
        };
        check("listen", code)?;
        Ok(Opaque(comm))
    }

    /// One `connect` call. `Ok(NULL)` means "not yet": call again with the same handle buffer.
    pub fn connect(
        &self,
        dev: c_int,
        handle: &mut [u8; NCCL_NET_HANDLE_MAXSIZE],
    ) -> Result<Opaque, NetError> {
        let mut comm = null_mut();
        let mut dev_comm: *mut ncclNetDeviceHandle_v8_t = null_mut();
        let mut config = ncclNetCommConfig_v10_t {
            trafficClass: NCCL_NET_TRAFFIC_CLASS_UNDEF,
        };
        let h = handle.as_mut_ptr().cast();
        // SAFETY: `handle` is NCCL_NET_HANDLE_MAXSIZE bytes; the out-pointers and `config` are valid.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, connect)(dev, h, &mut comm),
                Table::V8(t) => entry!(t, connect)(dev, h, &mut comm, &mut dev_comm),
                Table::V10(t) => entry!(t, connect)(dev, &mut config, h, &mut comm, &mut dev_comm),
                Table::V11(t) => entry!(t, connect)(self.ctx, dev, h, &mut comm, &mut dev_comm),
                Table::V12(t) => entry!(t, connect)(self.ctx, dev, h, &mut comm, &mut dev_comm),
            }
        };
        check("connect", code)?;
        Ok(Opaque(comm))
    }

    /// One `accept` call. `Ok(NULL)` means "not yet".
    pub fn accept(&self, listen_comm: Opaque) -> Result<Opaque, NetError> {
        let mut comm = null_mut();
        let mut dev_comm: *mut ncclNetDeviceHandle_v8_t = null_mut();
        // SAFETY: `listen_comm` came from `listen`; the out-pointers are valid.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, accept)(listen_comm.0, &mut comm),
                Table::V8(t) => entry!(t, accept)(listen_comm.0, &mut comm, &mut dev_comm),
                Table::V10(t) => entry!(t, accept)(listen_comm.0, &mut comm, &mut dev_comm),
                Table::V11(t) => entry!(t, accept)(listen_comm.0, &mut comm, &mut dev_comm),
                Table::V12(t) => entry!(t, accept)(listen_comm.0, &mut comm, &mut dev_comm),
            }
        };
        check("accept", code)?;
        Ok(Opaque(comm))
    }

    pub fn close_listen(&self, comm: Opaque) -> Result<(), NetError> {
        // SAFETY: `comm` came from `listen` and is not used afterwards.
        check("closeListen", unsafe { self.dispatch_close(comm, |t| t.2) })
    }

    pub fn close_send(&self, comm: Opaque) -> Result<(), NetError> {
        // SAFETY: `comm` came from `connect` and is not used afterwards.
        check("closeSend", unsafe { self.dispatch_close(comm, |t| t.0) })
    }

    pub fn close_recv(&self, comm: Opaque) -> Result<(), NetError> {
        // SAFETY: `comm` came from `accept` and is not used afterwards.
        check("closeRecv", unsafe { self.dispatch_close(comm, |t| t.1) })
    }

    /// The three close entries share one signature; `pick` chooses send, recv or listen.
    unsafe fn dispatch_close(
        &self,
        comm: Opaque,
        pick: impl Fn((CloseFn, CloseFn, CloseFn)) -> CloseFn,
    ) -> ncclResult_t {
        // SAFETY: the symbol points into the loaded library.
        let fns = unsafe {
            match self.table {
                Table::V6(t) => ((*t).closeSend, (*t).closeRecv, (*t).closeListen),
                Table::V8(t) => ((*t).closeSend, (*t).closeRecv, (*t).closeListen),
                Table::V10(t) => ((*t).closeSend, (*t).closeRecv, (*t).closeListen),
                Table::V11(t) => ((*t).closeSend, (*t).closeRecv, (*t).closeListen),
                Table::V12(t) => ((*t).closeSend, (*t).closeRecv, (*t).closeListen),
            }
        };
        match pick(fns) {
            // SAFETY: the caller guarantees `comm` is a live comm of the right kind.
            Some(f) => unsafe { f(comm.0) },
            None => ncclInternalError,
        }
    }

    /// `regMr` of a host buffer.
    pub fn reg_mr(&self, comm: Opaque, data: *mut u8, len: usize) -> Result<Opaque, NetError> {
        let mut mh = null_mut();
        let d = data.cast();
        let small = c_int::try_from(len).map_err(|_| NetError {
            call: "regMr (size exceeds int for v6)",
            code: ncclInvalidArgument,
        });
        // SAFETY: `data..data+len` is a live allocation owned by the caller until `dereg_mr`.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, regMr)(comm.0, d, small?, NCCL_PTR_HOST, &mut mh),
                Table::V8(t) => entry!(t, regMr)(comm.0, d, len, NCCL_PTR_HOST, &mut mh),
                Table::V10(t) => entry!(t, regMr)(comm.0, d, len, NCCL_PTR_HOST, &mut mh),
                Table::V11(t) => entry!(t, regMr)(comm.0, d, len, NCCL_PTR_HOST, &mut mh),
                Table::V12(t) => entry!(t, regMr)(comm.0, d, len, NCCL_PTR_HOST, &mut mh),
            }
        };
        check("regMr", code)?;
        Ok(Opaque(mh))
    }

    pub fn dereg_mr(&self, comm: Opaque, mh: Opaque) -> Result<(), NetError> {
        // SAFETY: `mh` came from `reg_mr` on `comm` and is not used afterwards.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, deregMr)(comm.0, mh.0),
                Table::V8(t) => entry!(t, deregMr)(comm.0, mh.0),
                Table::V10(t) => entry!(t, deregMr)(comm.0, mh.0),
                Table::V11(t) => entry!(t, deregMr)(comm.0, mh.0),
                Table::V12(t) => entry!(t, deregMr)(comm.0, mh.0),
            }
        };
        check("deregMr", code)
    }

    /// One `isend` call. `Ok(NULL)` means "could not post now, call again".
    ///
    /// # Safety
    /// `data..data+size` must stay valid and registered under `mh` until the request completes.
    pub unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut u8,
        size: usize,
        tag: c_int,
        mh: Opaque,
    ) -> Result<Opaque, NetError> {
        let mut req = null_mut();
        let d = data.cast();
        let small = c_int::try_from(size).map_err(|_| NetError {
            call: "isend (size exceeds int for v6/v8)",
            code: ncclInvalidArgument,
        });
        // SAFETY: the caller guarantees the buffer; `req` is a valid out-pointer.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, isend)(comm.0, d, small?, tag, mh.0, &mut req),
                Table::V8(t) => entry!(t, isend)(comm.0, d, small?, tag, mh.0, &mut req),
                Table::V10(t) => entry!(t, isend)(comm.0, d, size, tag, mh.0, null_mut(), &mut req),
                Table::V11(t) => entry!(t, isend)(comm.0, d, size, tag, mh.0, null_mut(), &mut req),
                Table::V12(t) => entry!(t, isend)(comm.0, d, size, tag, mh.0, null_mut(), &mut req),
            }
        };
        check("isend", code)?;
        Ok(Opaque(req))
    }

    /// One `irecv` call with `data.len()` buffers. `preset` is the value `*request` holds before
    /// the call (RCCL sometimes passes `(void*)1`); the returned value is whatever the plugin left
    /// there, NULL meaning "call again".
    ///
    /// # Safety
    /// Each `data[i]..data[i]+capacities[i]` must stay valid and registered under `mhs[i]` until
    /// the request completes.
    pub unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &mut [*mut c_void],
        capacities: &[usize],
        tags: &mut [c_int],
        mhs: &mut [*mut c_void],
        preset: *mut c_void,
    ) -> Result<Opaque, NetError> {
        let n = data.len();
        assert!(
            capacities.len() == n && tags.len() == n && mhs.len() == n,
            "irecv arrays differ in length"
        );
        let mut req = preset;
        let mut sizes_usize: Vec<usize> = capacities.to_vec();
        let mut sizes_int: Vec<c_int> = Vec::with_capacity(n);
        for &c in capacities {
            sizes_int.push(c_int::try_from(c).map_err(|_| NetError {
                call: "irecv (capacity exceeds int for v6/v8)",
                code: ncclInvalidArgument,
            })?);
        }
        let mut phandles = vec![null_mut::<c_void>(); n];
        let n = n as c_int;
        let (d, tg, m) = (data.as_mut_ptr(), tags.as_mut_ptr(), mhs.as_mut_ptr());
        // SAFETY: every array holds `n` elements and outlives the call; the caller guarantees the buffers.
        let code = unsafe {
            match self.table {
                Table::V6(t) => {
                    entry!(t, irecv)(comm.0, n, d, sizes_int.as_mut_ptr(), tg, m, &mut req)
                }
                Table::V8(t) => {
                    entry!(t, irecv)(comm.0, n, d, sizes_int.as_mut_ptr(), tg, m, &mut req)
                }
                Table::V10(t) => entry!(t, irecv)(
                    comm.0,
                    n,
                    d,
                    sizes_usize.as_mut_ptr(),
                    tg,
                    m,
                    phandles.as_mut_ptr(),
                    &mut req,
                ),
                Table::V11(t) => entry!(t, irecv)(
                    comm.0,
                    n,
                    d,
                    sizes_usize.as_mut_ptr(),
                    tg,
                    m,
                    phandles.as_mut_ptr(),
                    &mut req,
                ),
                Table::V12(t) => entry!(t, irecv)(
                    comm.0,
                    n,
                    d,
                    sizes_usize.as_mut_ptr(),
                    tg,
                    m,
                    phandles.as_mut_ptr(),
                    &mut req,
                ),
            }
        };
        check("irecv", code)?;
        Ok(Opaque(req))
    }

    /// One `test` call; `sizes` has one slot per buffer of the request (one for a send).
    /// Returns whether the request is done (it is then freed by the plugin).
    pub fn test(&self, req: Opaque, sizes: &mut [c_int]) -> Result<bool, NetError> {
        let mut done: c_int = 0;
        let s = sizes.as_mut_ptr();
        // SAFETY: `req` is a live request of this plugin; `sizes` has room for every size it reports.
        let code = unsafe {
            match self.table {
                Table::V6(t) => entry!(t, test)(req.0, &mut done, s),
                Table::V8(t) => entry!(t, test)(req.0, &mut done, s),
                Table::V10(t) => entry!(t, test)(req.0, &mut done, s),
                Table::V11(t) => entry!(t, test)(req.0, &mut done, s),
                Table::V12(t) => entry!(t, test)(req.0, &mut done, s),
            }
        };
        check("test", code)?;
        Ok(done != 0)
    }
}

type CloseFn = Option<unsafe extern "C" fn(*mut c_void) -> ncclResult_t>;

/// Lowercase hex of a connection handle, for passing it between processes.
pub fn handle_to_hex(handle: &[u8; NCCL_NET_HANDLE_MAXSIZE]) -> String {
    handle.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `handle_to_hex` output.
pub fn handle_from_hex(text: &str) -> Result<[u8; NCCL_NET_HANDLE_MAXSIZE], String> {
    let text = text.trim();
    if text.len() != 2 * NCCL_NET_HANDLE_MAXSIZE {
        return Err(format!(
            "handle hex has {} characters, expected {}",
            text.len(),
            2 * NCCL_NET_HANDLE_MAXSIZE
        ));
    }
    let mut out = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|e| format!("handle hex byte {i}: {e}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::capture::{lines_starting, Capture};
    use crate::log::logger;

    /// `c/late_table.c`: exports only `{name, init}` and fills in the rest during `init`.
    #[test]
    fn reads_entries_filled_in_by_init() {
        let path = std::path::Path::new(env!("HALO_LATE_TABLE_PLUGIN"));
        let mut p = Plugin::load(path, 6).expect("load the late-table plugin");
        assert_eq!(p.name(), "late-table");
        let before = p.devices().expect_err("devices is NULL before init");
        assert_eq!(before.call, "devices (missing entry)");
        p.init(logger::<Capture>(), 0).expect("init");
        assert_eq!(p.devices().expect("devices after init"), 2);
        let d = p.properties(1).expect("getProperties after init");
        assert_eq!((d.name.as_str(), d.speed, d.port), ("late0", 100_001, 1));
        // init logged with its own format through the logger it was given.
        let lines = lines_starting("late table: ");
        assert_eq!(lines.len(), 1, "{lines:?}");
        let (level, file, line, msg) = &lines[0];
        assert_eq!(*level, 2);
        assert!(file.ends_with("late_table.c") && *line > 0, "{file}:{line}");
        assert_eq!(
            msg,
            &format!(
                "late table: 2 devices, filled in by init, {}",
                std::mem::size_of::<ncclNet_v6_t>()
            )
        );
        p.finalize().expect("finalize");
    }
}
