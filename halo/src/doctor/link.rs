//! The cluster link as one node sees it — interface, MTU, subnet, GID — carried in the JSON
//! report so `--peer` can compare the nodes.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::rdma::{roce_mtu_for, RdmaPort};
use super::Facts;
use crate::sysroot::SysRoot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFacts {
    pub netdev: String,
    /// RDMA device and port on the interface.
    pub device: Option<String>,
    pub port: Option<u32>,
    /// The interface's MTU.
    pub mtu: Option<u32>,
    /// The RDMA port's active MTU (derived from `mtu` when the port does not say).
    pub rdma_mtu: Option<u32>,
    pub ip: Option<Ipv4Addr>,
    /// Prefix length of the subnet the cluster address is in (from `/proc/net/fib_trie`).
    pub prefix: Option<u8>,
    pub gid_index: Option<u32>,
    /// RoCE version of that GID: "RoCE v2" or "IB/RoCE v1".
    pub roce: Option<String>,
    /// Address family of that GID: "IPv4" (an IPv4-mapped GID) or "IPv6".
    pub gid_type: Option<String>,
}

impl LinkFacts {
    pub(crate) fn of(root: &SysRoot, ports: &[RdmaPort], facts: &Facts) -> Option<LinkFacts> {
        let link = facts.link.as_ref()?;
        let port = link
            .port
            .as_ref()
            .and_then(|(d, n)| ports.iter().find(|p| &p.device == d && p.port == *n));
        let mtu = root
            .read(&format!("/sys/class/net/{}/mtu", link.netdev))
            .and_then(|m| m.parse().ok());
        let ip = link.gid.as_ref().map(|(_, ip, _)| *ip);
        Some(LinkFacts {
            netdev: link.netdev.clone(),
            device: link.port.as_ref().map(|(d, _)| d.clone()),
            port: link.port.as_ref().map(|(_, n)| *n),
            mtu,
            rdma_mtu: port
                .and_then(|p| p.active_mtu)
                .or(mtu.and_then(roce_mtu_for)),
            ip,
            prefix: ip.and_then(|ip| {
                root.read("/proc/net/fib_trie")
                    .and_then(|t| prefix_of(&t, ip))
            }),
            gid_index: link.gid.as_ref().map(|(i, _, _)| *i),
            roce: link.gid.as_ref().map(|(_, _, k)| k.clone()),
            gid_type: link.gid.as_ref().map(|_| "IPv4".to_string()),
        })
    }

    /// "192.168.100.0/30"
    pub fn subnet(&self) -> Option<(Ipv4Addr, u8)> {
        Some((network(self.ip?, self.prefix?), self.prefix?))
    }
}

pub fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

/// The prefix length of the most specific on-link route containing `ip`, from
/// `/proc/net/fib_trie` (`|-- 192.168.100.0` followed by `/30 link UNICAST`).
pub fn prefix_of(fib_trie: &str, ip: Ipv4Addr) -> Option<u8> {
    let mut leaf: Option<Ipv4Addr> = None;
    let mut best: Option<u8> = None;
    for line in fib_trie.lines().map(str::trim) {
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
        } else if let (Some(rest), Some(net)) = (line.strip_prefix('/'), leaf) {
            let mut words = rest.split_whitespace();
            let Some(len) = words.next().and_then(|l| l.parse::<u8>().ok()) else {
                continue;
            };
            let on_link = words.next() == Some("link") && words.next() == Some("UNICAST");
            if on_link && len < 32 && network(ip, len) == net && best.is_none_or(|b| len > b) {
                best = Some(len);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.168.1.0/24 2 0 2
        |-- 192.168.1.0
           /24 link UNICAST
        |-- 192.168.1.23
           /32 host LOCAL
     +-- 192.168.100.0/30 2 0 2
        |-- 192.168.100.0
           /30 link UNICAST
        |-- 192.168.100.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.168.100.1
        /32 host LOCAL
";

    #[test]
    fn prefix_from_fib_trie() {
        assert_eq!(prefix_of(FIB, "192.168.100.1".parse().unwrap()), Some(30));
        assert_eq!(prefix_of(FIB, "192.168.1.23".parse().unwrap()), Some(24));
        assert_eq!(prefix_of(FIB, "10.0.0.1".parse().unwrap()), None);
        assert_eq!(
            network("192.168.100.2".parse().unwrap(), 30),
            "192.168.100.0".parse::<Ipv4Addr>().unwrap()
        );
    }
}
