//! Which local address the bootstrap listener binds to.

use super::OobError;
use crate::config::IfFilter;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses of all interfaces that are up, in the kernel's order, loopback included.
pub fn interface_addresses() -> Result<Vec<(String, IpAddr)>, OobError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success the list is freed by `List` below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(OobError::Interfaces(std::io::Error::last_os_error()));
    }
    struct List(*mut libc::ifaddrs);
    impl Drop for List {
        fn drop(&mut self) {
            // SAFETY: the pointer came from a successful getifaddrs and is freed once.
            unsafe { libc::freeifaddrs(self.0) }
        }
    }
    let list = List(head);

    let mut out = Vec::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: every node of the list stays valid until `list` is dropped.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 {
            continue;
        }
        // SAFETY: a non-null `ifa_addr` points to a sockaddr whose `sa_family` tells its real
        // type; the unaligned reads avoid assuming more alignment than a sockaddr has.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in>());
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = std::ptr::read_unaligned(ifa.ifa_addr.cast::<libc::sockaddr_in6>());
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: `ifa_name` is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        out.push((name.to_string_lossy().into_owned(), ip));
    }
    Ok(out)
}

/// Chooses the interface and address the bootstrap listener binds to:
///
/// 1. `filter` (`NCCL_SOCKET_IFNAME`) set: the first matching interface's address, IPv4
///    preferred;
/// 2. else `gid_ip`, the IP address the RDMA device's selected GID carries, if some interface
///    has it (that is the interface behind the RDMA device);
/// 3. else the first address (IPv4 preferred) of `netdev_hint`, the RDMA port's netdev;
/// 4. else an error listing what was tried.
///
/// IPv6 link-local addresses are never chosen: the handle would need a scope the peer
/// cannot know.
pub fn pick_bind_address(
    netdev_hint: Option<&str>,
    gid_ip: Option<IpAddr>,
    filter: Option<&IfFilter>,
) -> Result<(String, IpAddr), OobError> {
    choose(&interface_addresses()?, netdev_hint, gid_ip, filter)
}

fn choose(
    addrs: &[(String, IpAddr)],
    netdev_hint: Option<&str>,
    gid_ip: Option<IpAddr>,
    filter: Option<&IfFilter>,
) -> Result<(String, IpAddr), OobError> {
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_multicast(),
        IpAddr::V6(v6) => {
            !v6.is_unspecified() && !v6.is_multicast() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    let first_v4_preferred = |pred: &dyn Fn(&str) -> bool| {
        let candidates = || addrs.iter().filter(|(n, ip)| pred(n) && usable(ip));
        candidates()
            .find(|(_, ip)| ip.is_ipv4())
            .or_else(|| candidates().next())
            .cloned()
    };

    if let Some(filter) = filter {
        return first_v4_preferred(&|name| filter.matches(name)).ok_or_else(|| {
            OobError::NoBindAddress {
                tried: format!(
                    "{filter} matches no interface with a usable address (interfaces up: {})",
                    names(addrs)
                ),
            }
        });
    }

    let mut tried = vec!["NCCL_SOCKET_IFNAME is not set".to_owned()];
    match gid_ip.map(|ip| ip.to_canonical()) {
        Some(gid_ip) => {
            if let Some(found) = addrs.iter().find(|(_, ip)| *ip == gid_ip) {
                return Ok(found.clone());
            }
            tried.push(format!("the GID's address {gid_ip} is on no interface"));
        }
        None => tried.push("the RDMA port's GID carries no IP address".to_owned()),
    }
    match netdev_hint {
        Some(netdev) => {
            if let Some(found) = first_v4_preferred(&|name| name == netdev) {
                return Ok(found);
            }
            tried.push(format!("interface {netdev} has no usable address"));
        }
        None => tried.push("the RDMA port has no network interface".to_owned()),
    }
    Err(OobError::NoBindAddress {
        tried: format!(
            "{} (interfaces up: {}); set NCCL_SOCKET_IFNAME",
            tried.join("; "),
            names(addrs)
        ),
    })
}

fn names(addrs: &[(String, IpAddr)]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for (n, _) in addrs {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eno1", "fe80::1"),
            ("eno1", "2001:db8::5"),
            ("eno1", "10.0.0.5"),
            ("enp195s0", "fe80::2"),
            ("enp195s0", "192.168.100.2"),
            ("docker0", "172.17.0.1"),
            ("v6only", "fd00::7"),
            ("v6only", "fe80::7"),
            ("linklocal", "fe80::8"),
        ]
        .iter()
        .map(|(n, ip)| ((*n).to_owned(), ip.parse().unwrap()))
        .collect()
    }

    fn pick(
        hint: Option<&str>,
        gid: Option<&str>,
        filter: Option<&str>,
    ) -> Result<(String, String), String> {
        let filter = filter.map(|f| IfFilter::parse(f).unwrap());
        choose(
            &table(),
            hint,
            gid.map(|g| g.parse().unwrap()),
            filter.as_ref(),
        )
        .map(|(n, ip)| (n, ip.to_string()))
        .map_err(|e| e.to_string())
    }

    fn ok(n: &str, ip: &str) -> Result<(String, String), String> {
        Ok((n.to_owned(), ip.to_owned()))
    }

    #[test]
    fn filter_wins_and_prefers_ipv4() {
        assert_eq!(
            pick(Some("enp195s0"), Some("192.168.100.2"), Some("eno")),
            ok("eno1", "10.0.0.5")
        );
        assert_eq!(pick(None, None, Some("=lo")), ok("lo", "127.0.0.1"));
        assert_eq!(pick(None, None, Some("v6only")), ok("v6only", "fd00::7"));
        assert_eq!(
            pick(None, None, Some("^lo,eno")),
            ok("enp195s0", "192.168.100.2")
        );
    }

    #[test]
    fn filter_without_match_is_an_error() {
        let e = pick(Some("enp195s0"), None, Some("ib")).unwrap_err();
        assert!(
            e.contains("NCCL_SOCKET_IFNAME=ib matches no interface"),
            "{e}"
        );
        assert!(e.contains("enp195s0"), "{e}");
        let e = pick(None, None, Some("linklocal")).unwrap_err();
        assert!(
            e.contains("matches no interface with a usable address"),
            "{e}"
        );
    }

    #[test]
    fn gid_address_comes_next() {
        assert_eq!(
            pick(Some("eno1"), Some("192.168.100.2"), None),
            ok("enp195s0", "192.168.100.2")
        );
        // RoCE GIDs carry IPv4 addresses in mapped form.
        assert_eq!(
            pick(None, Some("::ffff:192.168.100.2"), None),
            ok("enp195s0", "192.168.100.2")
        );
        assert_eq!(
            pick(None, Some("2001:db8::5"), None),
            ok("eno1", "2001:db8::5")
        );
    }

    #[test]
    fn then_the_netdev() {
        assert_eq!(
            pick(Some("enp195s0"), Some("10.9.9.9"), None),
            ok("enp195s0", "192.168.100.2")
        );
        assert_eq!(pick(Some("eno1"), None, None), ok("eno1", "10.0.0.5"));
        assert_eq!(pick(Some("v6only"), None, None), ok("v6only", "fd00::7"));
    }

    #[test]
    fn nothing_fits() {
        let e = pick(Some("linklocal"), Some("10.9.9.9"), None).unwrap_err();
        assert!(e.contains("10.9.9.9 is on no interface"), "{e}");
        assert!(
            e.contains("interface linklocal has no usable address"),
            "{e}"
        );
        assert!(e.contains("set NCCL_SOCKET_IFNAME"), "{e}");
        let e = pick(None, None, None).unwrap_err();
        assert!(e.contains("no network interface"), "{e}");
        assert!(
            e.contains("lo, eno1, enp195s0, docker0, v6only, linklocal"),
            "{e}"
        );
    }

    #[test]
    fn the_host_has_loopback() {
        let addrs = interface_addresses().unwrap();
        assert!(
            addrs
                .iter()
                .any(|(_, ip)| *ip == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
        let lo = IfFilter::parse("=lo").unwrap();
        let (name, ip) = pick_bind_address(None, None, Some(&lo)).unwrap();
        assert_eq!((name.as_str(), ip), ("lo", IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let (name, _) = pick_bind_address(None, Some(Ipv4Addr::LOCALHOST.into()), None).unwrap();
        assert_eq!(name, "lo");
    }
}
