//! RDMA devices, ports and GID tables from sysfs; the RoCE v2 GID that carries the cluster IP;
//! MTUs; the NIC's driver and firmware.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use super::{Check, DoctorOptions, Facts};
use crate::process::run_bounded;
use crate::sysroot::SysRoot;

const IB: &str = "/sys/class/infiniband";
/// E810 NVM versions below this misbehave with RoCE v2 (the guide's minimum).
const E810_MIN_FW: (u32, u32) = (4, 91);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: Ipv6Addr,
    /// "RoCE v2", "IB/RoCE v1", …
    pub kind: String,
    pub netdev: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPort {
    pub device: String,
    pub port: u32,
    /// e.g. "4: ACTIVE"
    pub state: String,
    /// e.g. "5: LinkUp"
    pub phys_state: String,
    pub active_mtu: Option<u32>,
    pub gids: Vec<GidEntry>,
}

impl RdmaPort {
    pub fn is_active(&self) -> bool {
        self.state.ends_with("ACTIVE") && self.phys_state.ends_with("LinkUp")
    }
}

/// The port, GID and interface that carry this node's cluster traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPort {
    pub device: String,
    pub port: u32,
    pub netdev: String,
    pub gid_index: u32,
    pub ip: Ipv4Addr,
}

pub fn discover(root: &SysRoot) -> Vec<RdmaPort> {
    let mut ports = Vec::new();
    for device in root.entries(IB) {
        for port in root.entries(&format!("{IB}/{device}/ports")) {
            let Ok(port_num) = port.parse::<u32>() else {
                continue;
            };
            let base = format!("{IB}/{device}/ports/{port}");
            let gids = root
                .entries(&format!("{base}/gids"))
                .into_iter()
                .filter_map(|i| {
                    let index: u32 = i.parse().ok()?;
                    let gid: Ipv6Addr = root.read(&format!("{base}/gids/{i}"))?.parse().ok()?;
                    if gid.is_unspecified() {
                        return None;
                    }
                    Some(GidEntry {
                        index,
                        gid,
                        kind: root
                            .read(&format!("{base}/gid_attrs/types/{i}"))
                            .unwrap_or_default(),
                        netdev: root.read(&format!("{base}/gid_attrs/ndevs/{i}")),
                    })
                })
                .collect();
            ports.push(RdmaPort {
                device: device.clone(),
                port: port_num,
                state: root.read(&format!("{base}/state")).unwrap_or_default(),
                phys_state: root.read(&format!("{base}/phys_state")).unwrap_or_default(),
                active_mtu: root
                    .read(&format!("{base}/active_mtu"))
                    .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok())),
                gids,
            });
        }
    }
    ports
}

/// Picks the RoCE v2 GID with an IPv4-mapped address, narrowed by interface and/or IP when
/// given, preferring active ports.
pub fn select_cluster_port(
    ports: &[RdmaPort],
    iface: Option<&str>,
    ip: Option<Ipv4Addr>,
) -> Option<ClusterPort> {
    let mut candidates: Vec<(&RdmaPort, &GidEntry, Ipv4Addr)> = ports
        .iter()
        .flat_map(|p| p.gids.iter().map(move |g| (p, g)))
        .filter(|(_, g)| g.kind == "RoCE v2")
        .filter_map(|(p, g)| Some((p, g, g.gid.to_ipv4_mapped()?)))
        .filter(|(_, g, _)| iface.is_none_or(|i| g.netdev.as_deref() == Some(i)))
        .filter(|(_, _, addr)| ip.is_none_or(|want| *addr == want))
        .collect();
    candidates.sort_by_key(|(p, g, _)| (!p.is_active(), g.index));
    candidates.first().map(|(p, g, addr)| ClusterPort {
        device: p.device.clone(),
        port: p.port,
        netdev: g.netdev.clone().unwrap_or_default(),
        gid_index: g.index,
        ip: *addr,
    })
}

/// The RoCE path MTU the kernel derives from an Ethernet MTU (headers: GRH, BTH, extended
/// headers and ICRC take 88 bytes).
pub fn roce_mtu_for(netdev_mtu: u32) -> Option<u32> {
    let room = netdev_mtu.checked_sub(88)?;
    [4096, 2048, 1024, 512, 256]
        .into_iter()
        .find(|&m| m <= room)
}

pub(crate) fn checks(
    root: &SysRoot,
    ports: &[RdmaPort],
    facts: &Facts,
    opts: &DoctorOptions,
) -> Vec<Check> {
    let mut out = vec![devices(ports)];
    let Some(cluster) = &facts.cluster else {
        out.push(no_cluster_port(ports, opts));
        for (id, title) in [
            ("rdma.gid", "RoCE v2 GID for the cluster IP"),
            ("net.mtu", "Interface MTU"),
            ("rdma.mtu", "RDMA active MTU"),
            ("nic.driver", "NIC driver"),
            ("nic.firmware", "NIC firmware"),
        ] {
            out.push(Check::skip(id, title, "cluster port unknown"));
        }
        return out;
    };
    let port = ports
        .iter()
        .find(|p| p.device == cluster.device && p.port == cluster.port)
        .expect("cluster port comes from this list");
    out.push(port_state(port, cluster));
    out.push(Check::pass(
        "rdma.gid",
        "RoCE v2 GID for the cluster IP",
        format!(
            "index {} (RoCE v2 ::ffff:{} on {}): set NCCL_IB_GID_INDEX={}",
            cluster.gid_index, cluster.ip, cluster.netdev, cluster.gid_index
        ),
    ));
    let netdev_mtu = root
        .read(&format!("/sys/class/net/{}/mtu", cluster.netdev))
        .and_then(|m| m.parse::<u32>().ok());
    out.push(net_mtu(&cluster.netdev, netdev_mtu));
    out.push(rdma_mtu(port, &cluster.netdev, netdev_mtu));
    let driver = root.link_name(&format!("/sys/class/net/{}/device/driver", cluster.netdev));
    out.push(match &driver {
        Some(d) if d == "ice" => Check::pass("nic.driver", "NIC driver", "ice (Intel E810)"),
        Some(d) => Check::pass("nic.driver", "NIC driver", d.clone()),
        None => Check::warn(
            "nic.driver",
            "NIC driver",
            format!(
                "{} has no device/driver link (virtual interface?)",
                cluster.netdev
            ),
            "use the physical RoCE interface: halo doctor --iface <iface>",
        ),
    });
    out.push(firmware(root, &cluster.netdev, driver.as_deref()));
    out
}

fn devices(ports: &[RdmaPort]) -> Check {
    let mut names: Vec<&str> = ports.iter().map(|p| p.device.as_str()).collect();
    names.dedup();
    if names.is_empty() {
        Check::fail(
            "rdma.devices",
            "RDMA devices",
            format!("none under {IB}"),
            "sudo dnf install rdma-core && sudo modprobe irdma (E810), then check `rdma link`",
        )
    } else {
        Check::pass("rdma.devices", "RDMA devices", names.join(", "))
    }
}

fn no_cluster_port(ports: &[RdmaPort], opts: &DoctorOptions) -> Check {
    let wanted = match (opts.cluster_ip, opts.iface.as_deref()) {
        (Some(ip), Some(i)) => format!(" for {ip} on {i}"),
        (Some(ip), None) => format!(" for {ip}"),
        (None, Some(i)) => format!(" on {i}"),
        (None, None) => String::new(),
    };
    let iface = opts
        .iface
        .clone()
        .or_else(|| {
            ports
                .iter()
                .flat_map(|p| &p.gids)
                .find_map(|g| g.netdev.clone())
        })
        .unwrap_or_else(|| "<iface>".to_string());
    let ip = opts
        .cluster_ip
        .map_or("<cluster-ip>".to_string(), |ip| ip.to_string());
    Check::fail(
        "rdma.port",
        "RDMA port for the cluster IP",
        format!("no RoCE v2 GID with an IPv4 address{wanted}"),
        format!(
            "sudo ip addr add {ip}/30 dev {iface} (RoCE v2 GIDs follow the interface's addresses)"
        ),
    )
}

fn port_state(port: &RdmaPort, cluster: &ClusterPort) -> Check {
    const ID: &str = "rdma.port";
    const TITLE: &str = "RDMA port for the cluster IP";
    let value = format!(
        "{} port {} ({}): state {}, phys_state {}",
        port.device, port.port, cluster.netdev, port.state, port.phys_state
    );
    if port.is_active() {
        Check::pass(ID, TITLE, value)
    } else {
        Check::fail(
            ID,
            TITLE,
            value,
            format!(
                "sudo ip link set {} up; check the cable and `rdma link` (want state ACTIVE physical_state LINK_UP)",
                cluster.netdev
            ),
        )
    }
}

fn mtu_fix(netdev: &str) -> String {
    format!("sudo ip link set dev {netdev} mtu 9000 (persist: sudo nmcli connection modify <connection> ethernet.mtu 9000)")
}

fn net_mtu(netdev: &str, mtu: Option<u32>) -> Check {
    const ID: &str = "net.mtu";
    const TITLE: &str = "Interface MTU";
    match mtu {
        None => Check::skip(
            ID,
            TITLE,
            format!("/sys/class/net/{netdev}/mtu not readable"),
        ),
        Some(m) if m >= 9000 => Check::pass(ID, TITLE, format!("{netdev} mtu {m}")),
        Some(m) => Check::warn(
            ID,
            TITLE,
            format!("{netdev} mtu {m} (jumbo frames want 9000)"),
            mtu_fix(netdev),
        ),
    }
}

fn rdma_mtu(port: &RdmaPort, netdev: &str, netdev_mtu: Option<u32>) -> Check {
    const ID: &str = "rdma.mtu";
    const TITLE: &str = "RDMA active MTU";
    let (mtu, how) = match port.active_mtu {
        Some(m) => (Some(m), "active_mtu".to_string()),
        None => (
            netdev_mtu.and_then(roce_mtu_for),
            format!(
                "derived from {netdev} mtu {}",
                netdev_mtu.map_or("?".to_string(), |m| m.to_string())
            ),
        ),
    };
    match mtu {
        None => Check::skip(ID, TITLE, "neither active_mtu nor the netdev MTU readable"),
        Some(4096) => Check::pass(ID, TITLE, format!("4096 ({how})")),
        Some(m) => Check::warn(
            ID,
            TITLE,
            format!("{m} ({how}); 4096 needs a netdev MTU of at least 4184"),
            mtu_fix(netdev),
        ),
    }
}

/// `ethtool -i` output: live on the running system, captured as `.halo/ethtool-i-IF.txt` in trees.
fn ethtool_info(root: &SysRoot, netdev: &str) -> Option<String> {
    if root.is_live() {
        let mut cmd = Command::new("ethtool");
        cmd.args(["-i", netdev]);
        let out = run_bounded(&mut cmd, Duration::from_secs(5)).ok()?;
        out.success.then_some(out.stdout)
    } else {
        root.read(&format!("/.halo/ethtool-i-{netdev}.txt"))
    }
}

/// "4.91 0x800214b5 1.3909.0" → (4, 91)
pub fn parse_fw_version(text: &str) -> Option<(u32, u32)> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("firmware-version:"))?;
    let first = line.split_whitespace().next()?;
    let (major, minor) = first.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn firmware(root: &SysRoot, netdev: &str, driver: Option<&str>) -> Check {
    const ID: &str = "nic.firmware";
    const TITLE: &str = "NIC firmware";
    if driver != Some("ice") {
        return Check::skip(ID, TITLE, "minimum firmware known only for the E810 (ice)");
    }
    let Some(info) = ethtool_info(root, netdev) else {
        return Check::skip(ID, TITLE, format!("`ethtool -i {netdev}` not available"));
    };
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("firmware-version:"))
        .map_or(String::new(), |v| v.trim().to_string());
    match parse_fw_version(&info) {
        None => Check::skip(
            ID,
            TITLE,
            format!("firmware-version not understood: '{line}'"),
        ),
        Some(v) if v >= E810_MIN_FW => Check::pass(ID, TITLE, line),
        Some(_) => Check::warn(
            ID,
            TITLE,
            format!("{line} (E810 wants NVM 4.91 or newer)"),
            "update the NVM with Intel's E810 NVM Update Tool (nvmupdate64e), then power-cycle",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roce_mtu() {
        assert_eq!(roce_mtu_for(9000), Some(4096));
        assert_eq!(roce_mtu_for(4184), Some(4096));
        assert_eq!(roce_mtu_for(4183), Some(2048));
        assert_eq!(roce_mtu_for(1500), Some(1024));
    }

    #[test]
    fn firmware_version() {
        assert_eq!(
            parse_fw_version("driver: ice\nfirmware-version: 4.91 0x800214b5 1.3909.0\n"),
            Some((4, 91))
        );
        assert_eq!(
            parse_fw_version("firmware-version: 4.40 0x8001c7d4 1.3534.0"),
            Some((4, 40))
        );
    }
}
