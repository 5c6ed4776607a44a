//! GIDs and the rule that picks the local GID a RoCE connection uses. Pure: no device needed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A 128-bit global identifier; on RoCE it is an IPv6 address or an IPv4-mapped one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The all-zero GID, which marks an unused table entry.
    pub const ZERO: Gid = Gid([0; 16]);

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Whether the GID lies in `fe80::/10`: link-local, not routable, so a RoCE v2 connection
    /// through it fails at RTR.
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && (self.0[1] & 0xc0) == 0x80
    }

    /// The GID read as an IP address; IPv4-mapped GIDs (`::ffff:a.b.c.d`) give the IPv4 address.
    pub fn to_ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// The GID that carries `ip` on RoCE (IPv4 addresses are IPv4-mapped).
    pub fn from_ip(ip: IpAddr) -> Gid {
        match ip {
            IpAddr::V4(v4) => Gid(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => Gid(v6.octets()),
        }
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Ipv6Addr::from(self.0))
    }
}

/// The RoCE version a GID entry is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GidType {
    /// Native InfiniBand or RoCE v1 (Ethernet frames, not routable).
    IbRoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

impl GidType {
    /// Parses the text of sysfs `ports/<p>/gid_attrs/types/<i>` ("IB/RoCE v1" or "RoCE v2").
    pub fn from_sysfs(text: &str) -> Option<GidType> {
        match text.trim() {
            "IB/RoCE v1" => Some(GidType::IbRoceV1),
            "RoCE v2" => Some(GidType::RoceV2),
            _ => None,
        }
    }

    /// The RoCE version number, as `NCCL_IB_ROCE_VERSION_NUM` spells it.
    pub fn version(self) -> u8 {
        match self {
            GidType::IbRoceV1 => 1,
            GidType::RoceV2 => 2,
        }
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GidType::IbRoceV1 => "IB/RoCE v1",
            GidType::RoceV2 => "RoCE v2",
        })
    }
}

/// One populated entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the port's GID table (the `sgid_index` of a QP using it).
    pub index: u32,
    /// The GID.
    pub gid: Gid,
    /// Which RoCE version (or native IB) the entry is for.
    pub kind: GidType,
    /// The IP address the GID carries, for Ethernet ports (`None` on InfiniBand).
    pub ip: Option<IpAddr>,
    /// The netdev the entry belongs to, if any.
    pub netdev: Option<String>,
}

impl fmt::Display for GidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {} {}", self.index, self.gid, self.kind)?;
        if let Some(dev) = &self.netdev {
            write!(f, " dev {dev}")?;
        }
        Ok(())
    }
}

/// Address family of a GID's IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrFamily {
    /// IPv4 (IPv4-mapped GIDs).
    V4,
    /// IPv6.
    V6,
}

impl AddrFamily {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> AddrFamily {
        match ip {
            IpAddr::V4(_) => AddrFamily::V4,
            IpAddr::V6(_) => AddrFamily::V6,
        }
    }
}

/// Which local GID to use, in the terms of NCCL's `NCCL_IB_GID_INDEX`, `NCCL_IB_ROCE_VERSION_NUM`,
/// `NCCL_IB_ADDR_FAMILY` and `NCCL_IB_ADDR_RANGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidSelector {
    /// An explicit table index; when set it wins over every other rule.
    pub index: Option<u32>,
    /// Wanted RoCE version: 1 (`IbRoceV1`) or 2 (`RoceV2`).
    pub roce_version: u8,
    /// Wanted address family, if any.
    pub family: Option<AddrFamily>,
    /// Wanted subnet (network address, prefix length), if any.
    pub subnet: Option<(IpAddr, u8)>,
}

impl Default for GidSelector {
    /// NCCL's defaults: RoCE v2, IPv4, any subnet.
    fn default() -> Self {
        GidSelector {
            index: None,
            roce_version: 2,
            family: Some(AddrFamily::V4),
            subnet: None,
        }
    }
}

/// Whether `ip` lies in `net/prefix`. Addresses of different families never match; a prefix longer
/// than the address matches nothing.
pub fn ip_in_subnet(ip: &IpAddr, net: &IpAddr, prefix: u8) -> bool {
    fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
        let bits = usize::from(prefix);
        if bits > a.len() * 8 {
            return false;
        }
        let (full, rest) = (bits / 8, bits % 8);
        if a[..full] != b[..full] {
            return false;
        }
        rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            a[full] & mask == b[full] & mask
        }
    }
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), prefix),
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), prefix),
        _ => false,
    }
}

fn entry_matches(e: &GidEntry, sel: &GidSelector) -> bool {
    if e.gid.is_zero() || e.gid.is_link_local() || e.kind.version() != sel.roce_version {
        return false;
    }
    if let Some(family) = sel.family {
        if e.ip.map(|ip| AddrFamily::of(&ip)) != Some(family) {
            return false;
        }
    }
    if let Some((net, prefix)) = &sel.subnet {
        match &e.ip {
            Some(ip) if ip_in_subnet(ip, net, *prefix) => {}
            _ => return false,
        }
    }
    true
}

/// Picks the local GID: the entry with the explicit index if one is given, otherwise the first
/// entry (in table order) of the wanted RoCE version, family and subnet, skipping zero and
/// link-local GIDs. `None` when nothing fits.
pub fn select_gid<'a>(table: &'a [GidEntry], sel: &GidSelector) -> Option<&'a GidEntry> {
    match sel.index {
        Some(index) => table.iter().find(|e| e.index == index),
        None => table.iter().find(|e| entry_matches(e, sel)),
    }
}

/// `127.0.0.0/8`, handy for selecting the loopback GID of a Soft-RoCE device on `lo`.
pub const IPV4_LOOPBACK_NET: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(index: u32, ip: &str, kind: GidType) -> GidEntry {
        let ip: IpAddr = ip.parse().unwrap();
        let gid = Gid::from_ip(ip);
        GidEntry {
            index,
            gid,
            kind,
            ip: Some(gid.to_ip()),
            netdev: Some("lo".into()),
        }
    }

    /// The table Soft-RoCE on `lo` shows: link-local, IPv4 loopback, IPv6 loopback, all RoCE v2.
    fn rxe_on_lo() -> Vec<GidEntry> {
        vec![
            entry(0, "fe80::b0c9:8aff:fe0e:2c54", GidType::RoceV2),
            entry(1, "::ffff:127.0.0.1", GidType::RoceV2),
            entry(2, "::1", GidType::RoceV2),
        ]
    }

    #[test]
    fn v4_mapped_gid_reads_as_ipv4() {
        let g = Gid::from_ip("10.0.0.7".parse().unwrap());
        assert_eq!(g.to_string(), "::ffff:10.0.0.7");
        assert_eq!(g.to_ip(), "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            Gid::from_ip("::1".parse().unwrap()).to_ip().to_string(),
            "::1"
        );
    }

    #[test]
    fn link_local_and_zero_are_recognised() {
        assert!(Gid::from_ip("fe80::1".parse().unwrap()).is_link_local());
        assert!(Gid::from_ip("febf::1".parse().unwrap()).is_link_local());
        assert!(!Gid::from_ip("fec0::1".parse().unwrap()).is_link_local());
        assert!(Gid::ZERO.is_zero());
        assert!(!Gid::from_ip("::1".parse().unwrap()).is_zero());
    }

    #[test]
    fn sysfs_gid_types_parse() {
        assert_eq!(GidType::from_sysfs("RoCE v2\n"), Some(GidType::RoceV2));
        assert_eq!(GidType::from_sysfs("IB/RoCE v1\n"), Some(GidType::IbRoceV1));
        assert_eq!(GidType::from_sysfs(""), None);
    }

    #[test]
    fn default_selects_ipv4_roce_v2_and_skips_link_local() {
        let table = rxe_on_lo();
        assert_eq!(
            select_gid(&table, &GidSelector::default()).unwrap().index,
            1
        );
    }

    #[test]
    fn loopback_subnet_selects_mapped_127() {
        let table = rxe_on_lo();
        let sel = GidSelector {
            subnet: Some(IPV4_LOOPBACK_NET),
            ..GidSelector::default()
        };
        let e = select_gid(&table, &sel).unwrap();
        assert_eq!(e.gid.to_string(), "::ffff:127.0.0.1");
    }

    #[test]
    fn v6_family_selects_global_v6_not_link_local() {
        let table = rxe_on_lo();
        let sel = GidSelector {
            family: Some(AddrFamily::V6),
            ..GidSelector::default()
        };
        assert_eq!(select_gid(&table, &sel).unwrap().index, 2);
    }

    #[test]
    fn explicit_index_wins_even_over_link_local() {
        let table = rxe_on_lo();
        let sel = GidSelector {
            index: Some(0),
            ..GidSelector::default()
        };
        assert_eq!(select_gid(&table, &sel).unwrap().index, 0);
        let missing = GidSelector {
            index: Some(9),
            ..GidSelector::default()
        };
        assert!(select_gid(&table, &missing).is_none());
    }

    #[test]
    fn roce_version_separates_v1_and_v2() {
        let table = vec![
            entry(0, "::ffff:192.168.1.5", GidType::IbRoceV1),
            entry(1, "::ffff:192.168.1.5", GidType::RoceV2),
        ];
        let v1 = GidSelector {
            roce_version: 1,
            ..GidSelector::default()
        };
        assert_eq!(select_gid(&table, &v1).unwrap().index, 0);
        assert_eq!(
            select_gid(&table, &GidSelector::default()).unwrap().index,
            1
        );
    }

    #[test]
    fn subnet_picks_the_matching_interface() {
        let table = vec![
            entry(0, "::ffff:10.1.0.2", GidType::RoceV2),
            entry(1, "::ffff:192.168.50.2", GidType::RoceV2),
        ];
        let sel = GidSelector {
            subnet: Some(("192.168.50.0".parse().unwrap(), 24)),
            ..GidSelector::default()
        };
        assert_eq!(select_gid(&table, &sel).unwrap().index, 1);
        let none = GidSelector {
            subnet: Some(("172.16.0.0".parse().unwrap(), 12)),
            ..GidSelector::default()
        };
        assert!(select_gid(&table, &none).is_none());
    }

    #[test]
    fn zero_gids_and_ip_less_entries_are_skipped() {
        let table = vec![
            GidEntry {
                index: 0,
                gid: Gid::ZERO,
                kind: GidType::RoceV2,
                ip: Some(Gid::ZERO.to_ip()),
                netdev: None,
            },
            GidEntry {
                index: 1,
                gid: Gid([0x20; 16]),
                kind: GidType::RoceV2,
                ip: None,
                netdev: None,
            },
        ];
        assert!(select_gid(&table, &GidSelector::default()).is_none());
        let any_family = GidSelector {
            family: None,
            ..GidSelector::default()
        };
        assert_eq!(select_gid(&table, &any_family).unwrap().index, 1);
    }

    #[test]
    fn subnet_edges() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(ip_in_subnet(&ip, &"0.0.0.0".parse().unwrap(), 0));
        assert!(ip_in_subnet(&ip, &"10.1.2.3".parse().unwrap(), 32));
        assert!(!ip_in_subnet(&ip, &"10.1.2.3".parse().unwrap(), 33));
        assert!(ip_in_subnet(&ip, &"10.1.3.0".parse().unwrap(), 22));
        assert!(!ip_in_subnet(&ip, &"10.1.4.0".parse().unwrap(), 23));
        assert!(!ip_in_subnet(&ip, &"::ffff:10.1.2.3".parse().unwrap(), 8));
    }

    fn arb_entry() -> impl Strategy<Value = GidEntry> {
        (
            any::<u32>(),
            any::<[u8; 16]>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(index, mut bytes, v2, mapped, link_local)| {
                if mapped {
                    bytes[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
                } else if link_local {
                    bytes[0] = 0xfe;
                    bytes[1] = 0x80 | (bytes[1] & 0x3f);
                }
                let gid = Gid(bytes);
                GidEntry {
                    index,
                    gid,
                    kind: if v2 {
                        GidType::RoceV2
                    } else {
                        GidType::IbRoceV1
                    },
                    ip: Some(gid.to_ip()),
                    netdev: None,
                }
            })
    }

    fn arb_selector() -> impl Strategy<Value = GidSelector> {
        (
            proptest::option::of(any::<u32>()),
            1u8..=2,
            proptest::option::of(any::<bool>()),
            proptest::option::of((any::<[u8; 4]>(), 0u8..=32)),
        )
            .prop_map(|(index, roce_version, v4, subnet)| GidSelector {
                index,
                roce_version,
                family: v4.map(|v4| if v4 { AddrFamily::V4 } else { AddrFamily::V6 }),
                subnet: subnet.map(|(net, p)| (IpAddr::V4(Ipv4Addr::from(net)), p)),
            })
    }

    /// An independent statement of the selection rules, written over integers.
    fn model_matches(e: &GidEntry, sel: &GidSelector) -> bool {
        let b = e.gid.0;
        let usable = b != [0; 16] && !(b[0] == 0xfe && (0x80..=0xbf).contains(&b[1]));
        let kind = matches!(
            (e.kind, sel.roce_version),
            (GidType::IbRoceV1, 1) | (GidType::RoceV2, 2)
        );
        let family = matches!(
            (sel.family, e.ip),
            (None, _)
                | (Some(AddrFamily::V4), Some(IpAddr::V4(_)))
                | (Some(AddrFamily::V6), Some(IpAddr::V6(_)))
        );
        let subnet = match (sel.subnet, e.ip) {
            (None, _) => true,
            (Some((IpAddr::V4(net), p)), Some(IpAddr::V4(ip))) => {
                let (net, ip) = (u32::from(net), u32::from(ip));
                p == 0 || (p <= 32 && (net >> (32 - p)) == (ip >> (32 - p)))
            }
            _ => false,
        };
        usable && kind && family && subnet
    }

    proptest! {
        #[test]
        fn selection_obeys_every_rule(
            table in proptest::collection::vec(arb_entry(), 0..12),
            sel in arb_selector(),
        ) {
            let picked = select_gid(&table, &sel);
            match sel.index {
                Some(index) => {
                    prop_assert_eq!(picked, table.iter().find(|e| e.index == index));
                }
                None => {
                    if let Some(e) = picked {
                        prop_assert!(!e.gid.is_zero() && !e.gid.is_link_local());
                        prop_assert_eq!(e.kind.version(), sel.roce_version);
                        if let Some(f) = sel.family {
                            prop_assert_eq!(AddrFamily::of(&e.ip.unwrap()), f);
                        }
                        if let Some((net, p)) = sel.subnet {
                            prop_assert!(ip_in_subnet(&e.ip.unwrap(), &net, p));
                        }
                        // First match in table order: nothing earlier qualifies.
                        let pos = table.iter().position(|x| std::ptr::eq(x, e)).unwrap();
                        prop_assert!(table[..pos].iter().all(|x| !model_matches(x, &sel)));
                    } else {
                        prop_assert!(table.iter().all(|x| !model_matches(x, &sel)));
                    }
                }
            }
        }

        #[test]
        fn gid_ip_round_trip(bytes in any::<[u8; 16]>()) {
            let g = Gid(bytes);
            prop_assert_eq!(Gid::from_ip(g.to_ip()), g);
        }
    }
}
