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

/// The interface the cluster runs over, as far as the node shows it even without a usable
/// RoCE v2 GID: from `--iface`, from a GID of any RoCE version carrying an IPv4 address, or
/// from the only interface the RDMA ports have GIDs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub netdev: String,
    /// RDMA device and port on `netdev`, when one has GIDs on it.
    pub port: Option<(String, u32)>,
    /// The GID carrying an IPv4 address on that port, of whatever RoCE version.
    pub gid: Option<(u32, Ipv4Addr, String)>,
}

pub fn find_link(
    ports: &[RdmaPort],
    cluster: Option<&ClusterPort>,
    iface: Option<&str>,
    ip: Option<Ipv4Addr>,
) -> Option<Link> {
    if let Some(c) = cluster {
        return Some(Link {
            netdev: c.netdev.clone(),
            port: Some((c.device.clone(), c.port)),
            gid: Some((c.gid_index, c.ip, "RoCE v2".to_string())),
        });
    }
    let on = |g: &GidEntry| iface.is_none_or(|i| g.netdev.as_deref() == Some(i));
    let mut with_ip: Vec<(&RdmaPort, &GidEntry, Ipv4Addr)> = ports
        .iter()
        .flat_map(|p| p.gids.iter().map(move |g| (p, g)))
        .filter(|(_, g)| on(g) && g.netdev.is_some())
        .filter_map(|(p, g)| Some((p, g, g.gid.to_ipv4_mapped()?)))
        .filter(|(_, _, a)| ip.is_none_or(|want| *a == want))
        .collect();
    with_ip.sort_by_key(|(p, g, _)| (!p.is_active(), g.index));
    if let Some((p, g, a)) = with_ip.first() {
        return Some(Link {
            netdev: g.netdev.clone().unwrap_or_default(),
            port: Some((p.device.clone(), p.port)),
            gid: Some((g.index, *a, g.kind.clone())),
        });
    }
    let mut on_netdev: Vec<(&RdmaPort, String)> = ports
        .iter()
        .flat_map(|p| p.gids.iter().map(move |g| (p, g)))
        .filter(|(_, g)| on(g))
        .filter_map(|(p, g)| Some((p, g.netdev.clone()?)))
        .collect();
    on_netdev.dedup();
    let netdevs: std::collections::BTreeSet<&str> =
        on_netdev.iter().map(|(_, n)| n.as_str()).collect();
    match (iface, netdevs.len()) {
        (Some(i), _) => Some(Link {
            netdev: i.to_string(),
            port: on_netdev.first().map(|(p, _)| (p.device.clone(), p.port)),
            gid: None,
        }),
        (None, 1) => on_netdev.first().map(|(p, n)| Link {
            netdev: n.clone(),
            port: Some((p.device.clone(), p.port)),
            gid: None,
        }),
        _ => None,
    }
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
    let mut out = vec![devices(ports, facts)];
    let Some(link) = &facts.link else {
        out.push(if ports.is_empty() {
            Check::skip("rdma.port", "RDMA port for the cluster IP", "no RDMA device")
        } else {
            Check::fail(
                "rdma.port",
                "RDMA port for the cluster IP",
                "no GID of any RDMA port carries an IPv4 address, and several interfaces have RDMA ports",
                "name the cluster interface: halo doctor --iface <iface> [--cluster-ip <ip>]",
            )
        });
        let why = if ports.is_empty() {
            "no RDMA device"
        } else {
            "cluster interface unknown"
        };
        for (id, title) in [
            ("rdma.gid", "RoCE v2 GID for the cluster IP"),
            ("net.mtu", "Interface MTU"),
            ("rdma.mtu", "RDMA active MTU"),
            ("nic.driver", "NIC driver"),
            ("nic.firmware", "NIC firmware"),
            ("nic.flow_control", "Flow control on the RoCE port"),
        ] {
            out.push(Check::skip(id, title, why));
        }
        return out;
    };
    let port = link
        .port
        .as_ref()
        .and_then(|(d, n)| ports.iter().find(|p| &p.device == d && p.port == *n));
    out.push(match port {
        Some(p) => port_state(p, &link.netdev),
        None => Check::fail(
            "rdma.port",
            "RDMA port for the cluster IP",
            format!("no RDMA port has GIDs on {}", link.netdev),
            "sudo modprobe the NIC's RDMA driver (irdma for the E810, mlx5_ib for ConnectX-4 and newer), check `rdma link`, or pass the RoCE interface with --iface",
        ),
    });
    out.push(gid_check(port, link, facts, opts));
    let netdev_mtu = root
        .read(&format!("/sys/class/net/{}/mtu", link.netdev))
        .and_then(|m| m.parse::<u32>().ok());
    out.push(net_mtu(&link.netdev, netdev_mtu, facts));
    out.push(match port {
        Some(p) => rdma_mtu(p, &link.netdev, netdev_mtu, facts),
        None => Check::skip(
            "rdma.mtu",
            "RDMA active MTU",
            "no RDMA port on the interface",
        ),
    });
    let driver = root.link_name(&format!("/sys/class/net/{}/device/driver", link.netdev));
    out.push(match &driver {
        Some(d) => Check::pass("nic.driver", "NIC driver", driver_text(d)),
        None if !root.exists(&format!("/sys/class/net/{}", link.netdev)) => Check::fail(
            "nic.driver",
            "NIC driver",
            format!("no interface {} on this node", link.netdev),
            "ip -br link lists the interfaces; pass the RoCE one with --iface",
        ),
        None => Check::warn(
            "nic.driver",
            "NIC driver",
            format!(
                "{} has no device/driver link (virtual interface?)",
                link.netdev
            ),
            "use the physical RoCE interface: halo doctor --iface <iface>",
        ),
    });
    out.push(firmware(root, &link.netdev, driver.as_deref()));
    out.push(flow_control(root, &link.netdev, facts));
    out
}

fn driver_text(driver: &str) -> String {
    let nic = match driver {
        "ice" => "Intel E810",
        "mlx5_core" => "NVIDIA/Mellanox ConnectX-4 or newer",
        "mlx4_core" | "mlx4_en" => "Mellanox ConnectX-3",
        "bnxt_en" => "Broadcom NetXtreme",
        _ => return driver.to_string(),
    };
    format!("{driver} ({nic})")
}

fn devices(ports: &[RdmaPort], facts: &Facts) -> Check {
    let mut names: Vec<&str> = ports.iter().map(|p| p.device.as_str()).collect();
    names.dedup();
    if names.is_empty() {
        Check::fail(
            "rdma.devices",
            "RDMA devices",
            format!("none under {IB}"),
            format!(
                "{} && sudo modprobe irdma (E810) or mlx5_ib (ConnectX), then check `rdma link`",
                facts
                    .os
                    .install("rdma-core libibverbs-utils", "rdma-core ibverbs-utils")
            ),
        )
    } else {
        Check::pass("rdma.devices", "RDMA devices", names.join(", "))
    }
}

fn gid_check(port: Option<&RdmaPort>, link: &Link, facts: &Facts, opts: &DoctorOptions) -> Check {
    const ID: &str = "rdma.gid";
    const TITLE: &str = "RoCE v2 GID for the cluster IP";
    if let Some(cluster) = &facts.cluster {
        return Check::pass(
            ID,
            TITLE,
            format!(
                "index {} (RoCE v2 ::ffff:{} on {}): set NCCL_IB_GID_INDEX={}",
                cluster.gid_index, cluster.ip, cluster.netdev, cluster.gid_index
            ),
        );
    }
    let Some(port) = port else {
        return Check::skip(ID, TITLE, format!("no RDMA port on {}", link.netdev));
    };
    let has_v2 = port.gids.iter().any(|g| g.kind == "RoCE v2");
    if !has_v2 {
        let seen = match &link.gid {
            Some((i, ip, kind)) => format!("::ffff:{ip} is index {i} as {kind}"),
            None => "no GID of type RoCE v2".to_string(),
        };
        return Check::fail(
            ID,
            TITLE,
            format!(
                "{} port {} offers only RoCE v1 GIDs ({seen}): RCCL needs RoCE v2",
                port.device, port.port
            ),
            "the NIC has no RoCE v2 (mlx4_core: ConnectX-3 speaks RoCE v1 only): use a RoCE v2 NIC such as a ConnectX-4 Lx or newer or an Intel E810; the address is already on the interface",
        );
    }
    let wanted = match (opts.cluster_ip, opts.iface.as_deref()) {
        (Some(ip), _) => format!(" for {ip} on {}", link.netdev),
        (None, _) => format!(" on {}", link.netdev),
    };
    Check::fail(
        ID,
        TITLE,
        format!("no RoCE v2 GID with an IPv4 address{wanted}: the interface has no such address"),
        format!(
            "{} (RoCE v2 GIDs follow the interface's addresses)",
            facts.net().address_fix(&link.netdev, opts.cluster_ip, 30)
        ),
    )
}

fn port_state(port: &RdmaPort, netdev: &str) -> Check {
    const ID: &str = "rdma.port";
    const TITLE: &str = "RDMA port for the cluster IP";
    let value = format!(
        "{} port {} ({}): state {}, phys_state {}",
        port.device, port.port, netdev, port.state, port.phys_state
    );
    if port.is_active() {
        Check::pass(ID, TITLE, value)
    } else {
        Check::fail(
            ID,
            TITLE,
            value,
            format!(
                "sudo ip link set {netdev} up; check the cable and `rdma link` (want state ACTIVE physical_state LINK_UP)"
            ),
        )
    }
}

fn net_mtu(netdev: &str, mtu: Option<u32>, facts: &Facts) -> Check {
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
            facts.net().mtu_fix(netdev),
        ),
    }
}

fn rdma_mtu(port: &RdmaPort, netdev: &str, netdev_mtu: Option<u32>, facts: &Facts) -> Check {
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
            facts.net().mtu_fix(netdev),
        ),
    }
}

/// Output of a diagnostic command about `netdev`: run on the live system, read from
/// `/.halo/<name>-IF.txt` in a captured tree (e.g. `ethtool -i` → `.halo/ethtool-i-IF.txt`).
fn captured_or_run(root: &SysRoot, name: &str, argv: &[&str]) -> Option<String> {
    if root.is_live() {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        let out = run_bounded(&mut cmd, Duration::from_secs(5)).ok()?;
        out.success.then_some(out.stdout)
    } else {
        root.read(&format!("/.halo/{name}.txt"))
    }
}

fn ethtool_info(root: &SysRoot, netdev: &str) -> Option<String> {
    captured_or_run(
        root,
        &format!("ethtool-i-{netdev}"),
        &["ethtool", "-i", netdev],
    )
}

/// RX and TX pause from `ethtool -a`: `None` when the output says neither.
pub fn parse_pause(text: &str) -> Option<(bool, bool)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(name)?.trim();
            Some(v == "on")
        })
    };
    Some((field("RX:")?, field("TX:")?))
}

/// Priorities with PFC on, from `dcb pfc show dev IF` ("prio-pfc 0:off 1:off 2:off 3:on …").
pub fn parse_pfc(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .skip_while(|w| *w != "prio-pfc")
        .skip(1)
        .map_while(|w| w.split_once(':'))
        .filter(|(_, v)| *v == "on")
        .filter_map(|(p, _)| p.parse().ok())
        .collect()
}

fn flow_control(root: &SysRoot, netdev: &str, facts: &Facts) -> Check {
    const ID: &str = "nic.flow_control";
    const TITLE: &str = "Flow control on the RoCE port";
    let pause = captured_or_run(
        root,
        &format!("ethtool-a-{netdev}"),
        &["ethtool", "-a", netdev],
    )
    .as_deref()
    .and_then(parse_pause);
    let pfc = captured_or_run(
        root,
        &format!("dcb-pfc-{netdev}"),
        &["dcb", "pfc", "show", "dev", netdev],
    )
    .map(|t| parse_pfc(&t));
    if let Some(prios) = pfc.as_ref().filter(|p| !p.is_empty()) {
        let list: Vec<String> = prios.iter().map(u8::to_string).collect();
        return Check::pass(ID, TITLE, format!("PFC on priority {}", list.join(",")));
    }
    match pause {
        Some((true, true)) => {
            Check::pass(ID, TITLE, format!("{netdev}: pause frames rx on, tx on"))
        }
        Some((rx, tx)) => {
            let onoff = |b: bool| if b { "on" } else { "off" };
            Check::warn(
                ID,
                TITLE,
                format!(
                    "{netdev}: pause frames rx {}, tx {}, no PFC: RoCE v2 without flow control drops packets under load and retransmits",
                    onoff(rx),
                    onoff(tx)
                ),
                facts.net().pause_fix(netdev),
            )
        }
        None => Check::skip(ID, TITLE, format!("`ethtool -a {netdev}` not available")),
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
    fn pause_and_pfc() {
        let a = "Pause parameters for enp1s0f0np0:\nAutonegotiate:\ton\nRX:\t\toff\nTX:\t\ton\n";
        assert_eq!(parse_pause(a), Some((false, true)));
        assert_eq!(parse_pause("garbage"), None);
        let pfc = "pfc-cap 8 macsec-bypass off delay 0\nprio-pfc 0:off 1:off 2:off 3:on 4:off 5:off 6:off 7:off\n";
        assert_eq!(parse_pfc(pfc), vec![3]);
        assert!(parse_pfc("pfc-cap 8\nprio-pfc 0:off 1:off").is_empty());
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
