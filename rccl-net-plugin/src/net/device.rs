//! Discovery of the RDMA ports the plugin offers to RCCL, and their properties.

use super::connect::ConnSettings;
use super::error::{NetError, NetResult};
use super::events::DeviceEvents;
use super::regcache::{data_access, RegCache};
use crate::config::PluginConfig;
use crate::gpu::GpuSupport;
use crate::log::{info, warn, INIT, NET};
use halo_ibverbs::{
    Context, DeviceAttr, GidEntry, GidSelector, LinkLayer, PortAttr, PortState, ProtectionDomain,
    VerbsError,
};
use std::ffi::CString;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// One usable (device, port) pair: what RCCL calls a net device.
pub struct NetDevice {
    /// Index RCCL uses for this device.
    pub index: usize,
    pub name: String,
    pub c_name: CString,
    pub c_pci_path: CString,
    pub guid: u64,
    pub port: u8,
    pub port_attr: PortAttr,
    pub dev_attr: DeviceAttr,
    /// The local GID every connection of this device uses.
    pub gid: GidEntry,
    /// The netdev behind the port and its address (where the GID maps one).
    pub netdev: Option<String>,
    pub ip: Option<IpAddr>,
    pub speed_mbps: i32,
    pub ctx: Context,
    pub pd: ProtectionDomain,
    pub regs: RegCache,
    /// How GPU memory is registered on this device (probed at `init`).
    pub gpu: GpuSupport,
    /// The async events of the device context, shared by the ports of one device.
    pub events: Arc<DeviceEvents>,
}

impl NetDevice {
    /// Largest single RDMA WRITE; `HALO_MAX_MSG_SIZE` can lower it (to exercise splitting).
    pub fn max_msg_size(&self, cfg: &PluginConfig) -> u64 {
        let port = u64::from(self.port_attr.max_msg_sz.max(1));
        cfg.max_msg_size.map_or(port, |m| m.min(port))
    }

    /// Queue pairs per connection when `NCCL_IB_QPS_PER_CONNECTION` is unset: 2 on Intel
    /// Ethernet RDMA (E810, `irdma`), 1 elsewhere. One E810 queue pair tops out near 49 Gbps,
    /// below what the NIC and a PCIe 4.0 x4 slot (about 63 Gbps, as on Strix Halo boards) can
    /// carry; two let one connection fill the slot. Rows under 64 KiB never use the second.
    pub fn default_qps(&self) -> u32 {
        default_qps_for_vendor(self.dev_attr.vendor_id)
    }

    /// Whether this is the kernel's software RDMA (Soft-RoCE or siw), whose packet work shares
    /// the host's CPUs with the callers that poll it.
    pub fn is_software(&self) -> bool {
        is_software_vendor(self.dev_attr.vendor_id)
    }

    /// Queue pairs per connection on this device under `cfg`.
    pub fn qps_per_connection(&self, cfg: &PluginConfig) -> u32 {
        cfg.qps_per_connection.unwrap_or_else(|| self.default_qps())
    }

    pub fn describe(&self) -> String {
        format!(
            "{}:{} gid[{}] {}{}",
            self.name,
            self.port,
            self.gid.index,
            self.gid.gid,
            self.netdev
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )
    }
}

fn gid_selector(cfg: &PluginConfig) -> GidSelector {
    GidSelector {
        index: cfg.gid_index,
        roce_version: cfg.roce_version,
        family: Some(cfg.addr_family),
        subnet: cfg.addr_range,
    }
}

/// Link speed in Mbps: the netdev's, since software devices (rxe) report a fake verbs rate;
/// the verbs rate where no netdev speed is known.
fn speed_mbps(netdev: Option<&str>, port: &PortAttr) -> i32 {
    if let Some(n) = netdev {
        let path = Path::new("/sys/class/net").join(n).join("speed");
        if let Some(s) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&s| s > 0)
        {
            return s;
        }
    }
    // ibv_port_attr.active_speed codes → Mbps per lane; active_width codes → lanes.
    let lane = match port.active_speed {
        1 => 2_500,
        2 => 5_000,
        4 | 8 => 10_000,
        16 => 14_000,
        32 => 25_000,
        64 => 50_000,
        128 => 100_000,
        _ => 10_000,
    };
    let lanes = match port.active_width {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => 1,
    };
    lane * lanes
}

/// Every ACTIVE port that passes `NCCL_IB_HCA` and has a GID matching the configuration.
/// An empty list is an error that says why each candidate was left out.
pub fn discover(cfg: &PluginConfig) -> NetResult<Vec<NetDevice>> {
    let list = halo_ibverbs::devices().map_err(|e| match e {
        VerbsError::LibraryUnavailable => NetError::Unavailable(
            "libibverbs.so.1 could not be loaded (install rdma-core / libibverbs1); halo is disabled"
                .into(),
        ),
        VerbsError::NoDevice => {
            NetError::Unavailable("libibverbs finds no RDMA device; halo is disabled".into())
        }
        e => NetError::System(format!("cannot list RDMA devices: {e}")),
    })?;
    let selector = gid_selector(cfg);
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for info in list {
        let ctx = match Context::open(&info.name) {
            Ok(c) => c,
            Err(e) => {
                skipped.push(format!("{}: cannot open: {e}", info.name));
                continue;
            }
        };
        let dev_attr = match ctx.query_device() {
            Ok(a) => a,
            Err(e) => {
                skipped.push(format!("{}: {e}", info.name));
                continue;
            }
        };
        let mut events: Option<Arc<DeviceEvents>> = None;
        for port in 1..=dev_attr.phys_port_cnt {
            let why = |s: String| format!("{}:{port}: {s}", info.name);
            if let Some(f) = &cfg.ib_hca {
                if !f.matches(&info.name, port) {
                    skipped.push(why("excluded by NCCL_IB_HCA".into()));
                    continue;
                }
            }
            let port_attr = match ctx.query_port(port) {
                Ok(a) => a,
                Err(e) => {
                    skipped.push(why(e.to_string()));
                    continue;
                }
            };
            if port_attr.state != PortState::Active {
                skipped.push(why(format!("port state {:?}, not ACTIVE", port_attr.state)));
                continue;
            }
            if let LinkLayer::Unknown(l) = port_attr.link_layer {
                skipped.push(why(format!("unknown link layer {l}")));
                continue;
            }
            let table = match ctx.gid_table(port) {
                Ok(t) => t,
                Err(e) => {
                    skipped.push(why(e.to_string()));
                    continue;
                }
            };
            let gid = if port_attr.link_layer == LinkLayer::Infiniband {
                table
                    .iter()
                    .find(|g| cfg.gid_index.is_none_or(|i| g.index == i))
                    .cloned()
            } else {
                halo_ibverbs::select_gid(&table, &selector).cloned()
            };
            let Some(gid) = gid else {
                skipped.push(why(format!(
                    "no GID matches (NCCL_IB_GID_INDEX={:?} NCCL_IB_ROCE_VERSION_NUM={} \
                     NCCL_IB_ADDR_FAMILY={:?} NCCL_IB_ADDR_RANGE={:?}); table: {}",
                    cfg.gid_index,
                    cfg.roce_version,
                    cfg.addr_family,
                    cfg.addr_range,
                    table
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
                continue;
            };
            let pd = match ctx.alloc_pd() {
                Ok(pd) => pd,
                Err(e) => {
                    skipped.push(why(e.to_string()));
                    continue;
                }
            };
            let gpu = crate::gpu::probe(
                &pd,
                &format!("{}:{port}", info.name),
                cfg.gpu_reg,
                data_access(),
            );
            let netdev = gid.netdev.clone();
            let pci = info
                .sysfs_device_path
                .clone()
                .unwrap_or_else(|| info.ibdev_path.clone());
            let mut dev = NetDevice {
                index: found.len(),
                c_name: CString::new(info.name.clone()).unwrap_or_default(),
                c_pci_path: CString::new(pci.to_string_lossy().into_owned()).unwrap_or_default(),
                name: info.name.clone(),
                guid: info.guid,
                port,
                speed_mbps: speed_mbps(netdev.as_deref(), &port_attr),
                ip: gid.ip,
                netdev,
                gid,
                port_attr,
                dev_attr: dev_attr.clone(),
                ctx: ctx.clone(),
                pd,
                regs: RegCache::new(),
                gpu,
                events: Arc::clone(events.get_or_insert_with(|| watch_events(&ctx))),
            };
            if dev.gpu.gpu_receives() {
                let settings = ConnSettings {
                    cfg: Arc::new(cfg.clone()),
                    traffic_class: cfg.traffic_class,
                };
                let flush = super::flush::probe(&dev, &settings);
                dev.gpu = gpu_after_flush_probe(&dev.describe(), dev.gpu, flush);
            }
            info!(
                INIT | NET,
                "device {} = {} {:?} mtu {} speed {} Mbps",
                dev.index,
                dev.describe(),
                dev.port_attr.link_layer,
                dev.port_attr.active_mtu.bytes(),
                dev.speed_mbps
            );
            found.push(dev);
        }
    }
    if found.is_empty() {
        return Err(NetError::System(format!(
            "no usable RDMA port: {}",
            if skipped.is_empty() {
                "no ports".to_string()
            } else {
                skipped.join("; ")
            }
        )));
    }
    for s in &skipped {
        warn!(INIT | NET, "skipped {s}");
    }
    Ok(found)
}

/// What a device may claim for GPU memory once its flush probe ran: receives into GPU memory
/// need the flush (an RDMA READ over a QP connected to itself), so where that QP does not work
/// the device advertises host memory only (no `NCCL_PTR_CUDA`, no `NCCL_PTR_DMABUF`, no
/// `forceFlush`) and RCCL stages GPU data through host buffers, instead of failing `accept`.
pub fn gpu_after_flush_probe(dev: &str, gpu: GpuSupport, flush: Result<(), String>) -> GpuSupport {
    match flush {
        Ok(()) => {
            info!(
                INIT | NET,
                "{dev}: flush probe passed (RC QP connected to itself, one RDMA READ and one RDMA WRITE checked)"
            );
            gpu
        }
        Err(e) => {
            warn!(
                INIT | NET,
                "{dev}: the flush probe failed: {e}; receives into GPU memory could not be \
                 flushed, so NCCL_PTR_CUDA/NCCL_PTR_DMABUF are not advertised on this device and \
                 RCCL stages GPU data through host memory"
            );
            GpuSupport::NONE
        }
    }
}

/// The event watch of an open device; a device whose events cannot be read is used without.
fn watch_events(ctx: &Context) -> Arc<DeviceEvents> {
    let queue = ctx
        .async_events()
        .inspect_err(|e| {
            warn!(
                INIT | NET,
                "{}: async events cannot be read ({e}): a port or device fault will be noticed \
                 only when the transport's retries run out",
                ctx.name()
            )
        })
        .ok();
    DeviceEvents::new(ctx.name(), queue)
}

/// Vendor ids the kernel's software RDMA devices report: Soft-RoCE (`rdma_rxe`) and siw.
const VENDOR_SOFT_ROCE: u32 = 0x00ff_ffff;
const VENDOR_SIW: u32 = 0x0062_6d74;

/// Whether a device of vendor `vendor` is the kernel's software RDMA (its packet work runs on
/// the host's CPUs).
fn is_software_vendor(vendor: u32) -> bool {
    vendor == VENDOR_SOFT_ROCE || vendor == VENDOR_SIW
}

/// PCI vendor id of Intel, whose Ethernet RDMA devices (E810, X722) use the `irdma` provider.
const VENDOR_INTEL: u32 = 0x8086;

/// The queue-pair default for a device of PCI vendor `vendor` (see [`NetDevice::default_qps`]).
fn default_qps_for_vendor(vendor: u32) -> u32 {
    if vendor == VENDOR_INTEL {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod flush_probe_tests {
    use super::gpu_after_flush_probe;
    use crate::gpu::{GpuSupport, Strategy};
    use halo_ffi::{NCCL_PTR_CUDA, NCCL_PTR_DMABUF, NCCL_PTR_HOST};

    const DMABUF: GpuSupport = GpuSupport {
        strategy: Strategy::DmaBuf,
        dmabuf_mr: true,
    };
    const VA: GpuSupport = GpuSupport {
        strategy: Strategy::Va,
        dmabuf_mr: false,
    };

    #[test]
    fn a_failed_flush_probe_withdraws_gpu_pointer_support() {
        for gpu in [DMABUF, VA] {
            assert_ne!(gpu.ptr_support() & NCCL_PTR_CUDA, 0);
            let after = gpu_after_flush_probe(
                "irdma0:1",
                gpu,
                Err("QP 0x11 to RTR towards itself (flush QP): Invalid argument (errno 22)".into()),
            );
            assert_eq!(after.ptr_support(), NCCL_PTR_HOST, "no CUDA, no DMABUF");
            assert!(
                !after.gpu_receives(),
                "no forceFlush, no flush QP at accept"
            );
        }
    }

    #[test]
    fn a_passed_flush_probe_keeps_what_registration_proved() {
        let after = gpu_after_flush_probe("rxe0:1", DMABUF, Ok(()));
        assert_eq!(
            after.ptr_support(),
            NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF
        );
        assert!(after.gpu_receives());
        assert_eq!(gpu_after_flush_probe("rxe0:1", VA, Ok(())), VA);
    }
}

#[cfg(test)]
mod qps_tests {
    use super::{default_qps_for_vendor, is_software_vendor};

    #[test]
    fn intel_rdma_gets_two_queue_pairs_others_one() {
        assert_eq!(default_qps_for_vendor(0x8086), 2);
        // Mellanox/NVIDIA, Broadcom, Soft-RoCE (0xffffff), none.
        for v in [0x02c9, 0x14e4, 0x00ff_ffff, 0] {
            assert_eq!(default_qps_for_vendor(v), 1);
        }
    }

    #[test]
    fn soft_roce_and_siw_are_software_devices() {
        assert!(is_software_vendor(0x00ff_ffff));
        assert!(is_software_vendor(0x0062_6d74));
        for v in [0x8086, 0x02c9, 0x14e4, 0x1dd8, 0] {
            assert!(!is_software_vendor(v), "{v:#x}");
        }
    }
}
