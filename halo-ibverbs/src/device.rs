//! Device discovery and the device context, the root of every verbs resource.

use std::mem;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys::{
    ibv_close_device, ibv_context, ibv_device, ibv_device_attr, ibv_free_device_list,
    ibv_get_device_guid, ibv_get_device_list, ibv_node_type, ibv_open_device, ibv_port_attr,
    ibv_query_device, ibv_query_port, ibv_wc_status_str,
};

use crate::error::{Result, VerbsError};
use crate::port::PortAttr;

/// Whether `libibverbs.so.1` was loaded. The shim resolves every verbs entry point when the
/// process starts and its wrappers return NULL/EOPNOTSUPP for entry points it could not resolve;
/// `ibv_wc_status_str` returns a string for every input when the library is there, so a NULL from
/// it means the library is missing.
pub fn library_available() -> bool {
    // SAFETY: ibv_wc_status_str accepts any status value and returns a static string or NULL.
    !unsafe { ibv_wc_status_str(0) }.is_null()
}

/// Kind of node a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    /// An InfiniBand or RoCE channel adapter (what rxe and mlx5 report).
    Ca,
    /// A switch.
    Switch,
    /// A router.
    Router,
    /// An iWARP NIC.
    Rnic,
    /// Something else.
    Other(i32),
}

impl NodeType {
    fn from_raw(raw: ibv_node_type::Type) -> NodeType {
        match raw {
            ibv_node_type::IBV_NODE_CA => NodeType::Ca,
            ibv_node_type::IBV_NODE_SWITCH => NodeType::Switch,
            ibv_node_type::IBV_NODE_ROUTER => NodeType::Router,
            ibv_node_type::IBV_NODE_RNIC => NodeType::Rnic,
            other => NodeType::Other(other),
        }
    }
}

/// What libibverbs knows about a device without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Node GUID in host byte order.
    pub guid: u64,
    /// Node type.
    pub node_type: NodeType,
    /// The device's sysfs class directory, e.g. `/sys/class/infiniband/rxe0`.
    pub ibdev_path: PathBuf,
    /// Resolved path of the underlying bus device (e.g. the PCI function), if the device has one;
    /// software devices such as rxe have none.
    pub sysfs_device_path: Option<PathBuf>,
}

/// The device list of libibverbs, freed on drop.
struct DeviceList {
    list: NonNull<*mut ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList> {
        if !library_available() {
            return Err(VerbsError::LibraryUnavailable);
        }
        let mut num: libc::c_int = 0;
        // SAFETY: num is a valid out-pointer; the list is freed by Drop.
        let list = unsafe { ibv_get_device_list(&mut num) };
        match NonNull::new(list) {
            Some(list) if num > 0 => Ok(DeviceList {
                list,
                len: num as usize,
            }),
            Some(list) => {
                // SAFETY: list came from ibv_get_device_list and is freed exactly once.
                unsafe { ibv_free_device_list(list.as_ptr()) };
                Err(VerbsError::NoDevice)
            }
            None => {
                // libibverbs returns NULL when the kernel has no RDMA support at all (no
                // uverbs ABI in sysfs): for a caller that is the same as having no device.
                let err = std::io::Error::last_os_error().raw_os_error();
                match err {
                    Some(libc::ENOSYS | libc::ENOENT | libc::ENODEV) | None | Some(0) => {
                        Err(VerbsError::NoDevice)
                    }
                    Some(errno) => Err(VerbsError::Os {
                        op: "ibv_get_device_list",
                        on: "this host".into(),
                        errno,
                    }),
                }
            }
        }
    }

    fn devices(&self) -> impl Iterator<Item = NonNull<ibv_device>> + '_ {
        (0..self.len).filter_map(move |i| {
            // SAFETY: the list holds len valid entries followed by NULL.
            NonNull::new(unsafe { *self.list.as_ptr().add(i) })
        })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed exactly once, here; devices
        // opened from it stay valid after the list is freed.
        unsafe { ibv_free_device_list(self.list.as_ptr()) };
    }
}

fn c_chars_to_string(chars: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn device_info(dev: NonNull<ibv_device>) -> DeviceInfo {
    // SAFETY: dev is an entry of a live device list.
    let raw = unsafe { dev.as_ref() };
    let name = c_chars_to_string(&raw.name);
    let ibdev_path = PathBuf::from(c_chars_to_string(&raw.ibdev_path));
    let sysfs_device_path = std::fs::canonicalize(ibdev_path.join("device")).ok();
    // SAFETY: dev is an entry of a live device list.
    let guid = u64::from_be(unsafe { ibv_get_device_guid(dev.as_ptr()) });
    DeviceInfo {
        name,
        guid,
        node_type: NodeType::from_raw(raw.node_type),
        ibdev_path,
        sysfs_device_path,
    }
}

/// All RDMA devices libibverbs sees. `LibraryUnavailable` when libibverbs is missing, `NoDevice`
/// when it sees none.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let list = DeviceList::get()?;
    Ok(list.devices().map(device_info).collect())
}

/// Device-wide attributes, from `ibv_query_device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAttr {
    /// Firmware version text.
    pub fw_ver: String,
    /// Node GUID in host byte order.
    pub node_guid: u64,
    /// PCI vendor id (0xffffff on Soft-RoCE, 0x626d74 on siw).
    pub vendor_id: u32,
    /// Vendor part id.
    pub vendor_part_id: u32,
    /// Hardware revision.
    pub hw_ver: u32,
    /// Largest memory region, in bytes.
    pub max_mr_size: u64,
    /// Number of QPs.
    pub max_qp: u32,
    /// Work requests per QP queue.
    pub max_qp_wr: u32,
    /// Scatter/gather entries per work request.
    pub max_sge: u32,
    /// Number of CQs.
    pub max_cq: u32,
    /// Entries per CQ.
    pub max_cqe: u32,
    /// Number of memory regions.
    pub max_mr: u32,
    /// Number of protection domains.
    pub max_pd: u32,
    /// Outstanding RDMA READ/atomic requests a QP can serve as responder.
    pub max_qp_rd_atom: u32,
    /// Outstanding RDMA READ/atomic requests a QP can issue as requester.
    pub max_qp_init_rd_atom: u32,
    /// Number of physical ports (numbered from 1).
    pub phys_port_cnt: u8,
}

fn non_negative(v: libc::c_int) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

pub(crate) struct ContextInner {
    ctx: NonNull<ibv_context>,
    name: String,
    ibdev_path: PathBuf,
}

// SAFETY: libibverbs contexts are thread-safe; the pointer is only freed in Drop, after every
// resource holding an Arc to this context is gone.
unsafe impl Send for ContextInner {}
// SAFETY: as above; all calls through a context are thread-safe in libibverbs.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: ctx came from ibv_open_device and no resource of it is left (each holds an Arc).
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// An open RDMA device. Cheap to clone; the device is closed when the last clone and the last
/// resource created from it are dropped.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name())
            .finish()
    }
}

impl Context {
    /// Opens the device called `name`.
    pub fn open(name: &str) -> Result<Context> {
        let list = DeviceList::get()?;
        let dev = list
            .devices()
            .find(|d| device_info(*d).name == name)
            .ok_or_else(|| VerbsError::DeviceNotFound(name.to_string()))?;
        let ibdev_path = device_info(dev).ibdev_path;
        // SAFETY: dev is an entry of the live list; the context stays valid after the list is freed.
        let ctx = unsafe { ibv_open_device(dev.as_ptr()) };
        let ctx =
            NonNull::new(ctx).ok_or_else(|| VerbsError::last_os("ibv_open_device", || name))?;
        Ok(Context {
            inner: Arc::new(ContextInner {
                ctx,
                name: name.to_string(),
                ibdev_path,
            }),
        })
    }

    /// Device name, e.g. `rxe0`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device's sysfs class directory, e.g. `/sys/class/infiniband/rxe0`.
    pub fn ibdev_path(&self) -> &std::path::Path {
        &self.inner.ibdev_path
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_context {
        self.inner.ctx.as_ptr()
    }

    /// Device-wide attributes.
    pub fn query_device(&self) -> Result<DeviceAttr> {
        // SAFETY: ibv_device_attr is plain old data for which all-zero bytes are valid.
        let mut raw: ibv_device_attr = unsafe { mem::zeroed() };
        // SAFETY: the context is open and raw is a valid out-pointer.
        let ret = unsafe { ibv_query_device(self.as_ptr(), &mut raw) };
        if ret != 0 {
            return Err(VerbsError::from_ret("ibv_query_device", self.name(), ret));
        }
        Ok(DeviceAttr {
            fw_ver: c_chars_to_string(&raw.fw_ver),
            node_guid: u64::from_be(raw.node_guid),
            vendor_id: raw.vendor_id,
            vendor_part_id: raw.vendor_part_id,
            hw_ver: raw.hw_ver,
            max_mr_size: raw.max_mr_size,
            max_qp: non_negative(raw.max_qp),
            max_qp_wr: non_negative(raw.max_qp_wr),
            max_sge: non_negative(raw.max_sge),
            max_cq: non_negative(raw.max_cq),
            max_cqe: non_negative(raw.max_cqe),
            max_mr: non_negative(raw.max_mr),
            max_pd: non_negative(raw.max_pd),
            max_qp_rd_atom: non_negative(raw.max_qp_rd_atom),
            max_qp_init_rd_atom: non_negative(raw.max_qp_init_rd_atom),
            phys_port_cnt: raw.phys_port_cnt,
        })
    }

    /// Attributes of port `port` (numbered from 1).
    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        // SAFETY: ibv_port_attr is plain old data for which all-zero bytes are valid; zeroing
        // matters because an older provider fills only the prefix it knows.
        let mut raw: ibv_port_attr = unsafe { mem::zeroed() };
        // SAFETY: the context is open and raw is a valid out-pointer of the size passed along.
        let ret = unsafe { ibv_query_port(self.as_ptr(), port, &mut raw) };
        if ret != 0 {
            return Err(VerbsError::from_ret(
                "ibv_query_port",
                format!("{} port {port}", self.name()),
                ret,
            ));
        }
        PortAttr::from_raw(&raw).ok_or_else(|| {
            VerbsError::InvalidArgument(format!(
                "{} port {port} reports MTU values outside 256..4096 (max {}, active {})",
                self.name(),
                raw.max_mtu,
                raw.active_mtu
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_never_crashes_without_hardware() {
        match devices() {
            Ok(list) => {
                for d in list {
                    assert!(!d.name.is_empty());
                }
            }
            Err(VerbsError::LibraryUnavailable | VerbsError::NoDevice) => {}
            Err(other) => panic!("unexpected error listing devices: {other}"),
        }
    }

    #[test]
    fn opening_a_missing_device_is_a_typed_error() {
        match Context::open("no-such-rdma-device") {
            Err(
                VerbsError::LibraryUnavailable
                | VerbsError::NoDevice
                | VerbsError::DeviceNotFound(_),
            ) => {}
            Err(other) => panic!("unexpected error: {other}"),
            Ok(ctx) => panic!("opened a device that should not exist: {}", ctx.name()),
        }
    }

    #[test]
    fn c_chars_stop_at_nul() {
        let chars = [
            b'r' as libc::c_char,
            b'x' as libc::c_char,
            0,
            b'z' as libc::c_char,
        ];
        assert_eq!(c_chars_to_string(&chars), "rx");
    }
}
