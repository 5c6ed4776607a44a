//! Port attributes: state, MTU, link layer.

use std::fmt;

use rdma_mummy_sys::{ibv_mtu, ibv_port_attr, ibv_port_state};
use rdma_mummy_sys::{
    IBV_LINK_LAYER_ETHERNET, IBV_LINK_LAYER_INFINIBAND, IBV_LINK_LAYER_UNSPECIFIED,
};

/// An InfiniBand path MTU. Ordered by size, so `a.min(b)` is the MTU two ports can both use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes.
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
}

impl Mtu {
    /// All MTUs, smallest first.
    pub const ALL: [Mtu; 5] = [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ];

    /// The MTU in bytes.
    pub fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The MTU of exactly `bytes` bytes, if it is one of 256, 512, ..., 4096.
    pub fn from_bytes(bytes: u32) -> Option<Mtu> {
        Mtu::ALL.into_iter().find(|m| m.bytes() == bytes)
    }

    /// The largest MTU not above `bytes`, e.g. for a netdev MTU of 1500 → 1024.
    pub fn at_most(bytes: u32) -> Option<Mtu> {
        Mtu::ALL.into_iter().rev().find(|m| m.bytes() <= bytes)
    }

    /// The `enum ibv_mtu` value (1 = 256 ... 5 = 4096).
    pub fn to_raw(self) -> ibv_mtu::Type {
        match self {
            Mtu::Mtu256 => ibv_mtu::IBV_MTU_256,
            Mtu::Mtu512 => ibv_mtu::IBV_MTU_512,
            Mtu::Mtu1024 => ibv_mtu::IBV_MTU_1024,
            Mtu::Mtu2048 => ibv_mtu::IBV_MTU_2048,
            Mtu::Mtu4096 => ibv_mtu::IBV_MTU_4096,
        }
    }

    /// The MTU for an `enum ibv_mtu` value; `None` for values outside 1..=5.
    pub fn from_raw(raw: ibv_mtu::Type) -> Option<Mtu> {
        Mtu::ALL.into_iter().find(|m| m.to_raw() == raw)
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// Logical state of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Reserved value 0.
    Nop,
    /// Link is down.
    Down,
    /// Link up, not yet configured by a subnet manager.
    Init,
    /// Configured, not yet activated.
    Armed,
    /// Ready to carry traffic.
    Active,
    /// Active, deferring to an error condition.
    ActiveDefer,
    /// A value this crate does not know.
    Unknown(u32),
}

impl PortState {
    pub(crate) fn from_raw(raw: ibv_port_state::Type) -> PortState {
        match raw {
            ibv_port_state::IBV_PORT_NOP => PortState::Nop,
            ibv_port_state::IBV_PORT_DOWN => PortState::Down,
            ibv_port_state::IBV_PORT_INIT => PortState::Init,
            ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
            ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
            ibv_port_state::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

/// What a port runs on: native InfiniBand, or Ethernet (RoCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand; also what drivers that leave the link layer unspecified mean.
    Infiniband,
    /// Ethernet: RoCE v1/v2, addressed by GID, no LIDs.
    Ethernet,
    /// A value this crate does not know.
    Unknown(u8),
}

impl LinkLayer {
    pub(crate) fn from_raw(raw: u8) -> LinkLayer {
        match raw {
            IBV_LINK_LAYER_INFINIBAND | IBV_LINK_LAYER_UNSPECIFIED => LinkLayer::Infiniband,
            IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            other => LinkLayer::Unknown(other),
        }
    }
}

/// Attributes of one port, from `ibv_query_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAttr {
    /// Logical port state; only `Active` ports carry traffic.
    pub state: PortState,
    /// Largest MTU the port supports.
    pub max_mtu: Mtu,
    /// MTU currently in effect (for RoCE derived from the netdev MTU).
    pub active_mtu: Mtu,
    /// Link layer of the port.
    pub link_layer: LinkLayer,
    /// Largest message the port can carry, in bytes.
    pub max_msg_sz: u32,
    /// Base LID (InfiniBand only; 0 on RoCE).
    pub lid: u16,
    /// Number of entries of the GID table.
    pub gid_tbl_len: u32,
    /// Encoded link speed as reported (software devices report fake values).
    pub active_speed: u8,
    /// Encoded link width as reported.
    pub active_width: u8,
    /// Physical port state (5 = LinkUp).
    pub phys_state: u8,
}

impl PortAttr {
    /// Converts the raw attributes; `None` when an MTU field holds a value outside the enum, which
    /// means the provider filled the structure with something this crate cannot interpret.
    pub(crate) fn from_raw(raw: &ibv_port_attr) -> Option<PortAttr> {
        Some(PortAttr {
            state: PortState::from_raw(raw.state),
            max_mtu: Mtu::from_raw(raw.max_mtu)?,
            active_mtu: Mtu::from_raw(raw.active_mtu)?,
            link_layer: LinkLayer::from_raw(raw.link_layer),
            max_msg_sz: raw.max_msg_sz,
            lid: raw.lid,
            gid_tbl_len: u32::try_from(raw.gid_tbl_len).unwrap_or(0),
            active_speed: raw.active_speed,
            active_width: raw.active_width,
            phys_state: raw.phys_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mtu_bytes_round_trip() {
        for m in Mtu::ALL {
            assert_eq!(Mtu::from_bytes(m.bytes()), Some(m));
            assert_eq!(Mtu::from_raw(m.to_raw()), Some(m));
        }
        assert_eq!(Mtu::from_bytes(1500), None);
        assert_eq!(Mtu::from_raw(0), None);
        assert_eq!(Mtu::from_raw(6), None);
    }

    #[test]
    fn mtu_raw_values_match_ibv_mtu() {
        assert_eq!(Mtu::Mtu256.to_raw(), 1);
        assert_eq!(Mtu::Mtu4096.to_raw(), 5);
    }

    #[test]
    fn mtu_at_most_rounds_down() {
        assert_eq!(Mtu::at_most(1500), Some(Mtu::Mtu1024));
        assert_eq!(Mtu::at_most(9000), Some(Mtu::Mtu4096));
        assert_eq!(Mtu::at_most(4096), Some(Mtu::Mtu4096));
        assert_eq!(Mtu::at_most(255), None);
    }

    #[test]
    fn mtu_min_picks_the_smaller() {
        assert_eq!(Mtu::Mtu4096.min(Mtu::Mtu1024), Mtu::Mtu1024);
        assert_eq!(Mtu::Mtu256.min(Mtu::Mtu2048), Mtu::Mtu256);
        assert_eq!(Mtu::Mtu2048.to_string(), "2048");
    }

    #[test]
    fn link_layer_unspecified_means_infiniband() {
        assert_eq!(LinkLayer::from_raw(0), LinkLayer::Infiniband);
        assert_eq!(LinkLayer::from_raw(1), LinkLayer::Infiniband);
        assert_eq!(LinkLayer::from_raw(2), LinkLayer::Ethernet);
        assert_eq!(LinkLayer::from_raw(9), LinkLayer::Unknown(9));
    }

    proptest! {
        #[test]
        fn mtu_min_is_ordered_by_bytes(a in 0usize..5, b in 0usize..5) {
            let (a, b) = (Mtu::ALL[a], Mtu::ALL[b]);
            prop_assert_eq!(a.min(b).bytes(), a.bytes().min(b.bytes()));
        }

        #[test]
        fn mtu_at_most_never_exceeds(bytes in 0u32..20000) {
            match Mtu::at_most(bytes) {
                Some(m) => {
                    prop_assert!(m.bytes() <= bytes);
                    prop_assert!(Mtu::ALL.iter().all(|o| o.bytes() <= m.bytes() || o.bytes() > bytes));
                }
                None => prop_assert!(bytes < 256),
            }
        }
    }
}
