//! The listen handle: what `listen` writes into RCCL's 128-byte handle buffer so that the
//! peer's `connect` can find the listener.
//!
//! Layout (little-endian), 48 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HALORDMA` |
//! | 8 | 2 | format version (1) |
//! | 10 | 1 | address family: 4 or 6 |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 2 | TCP port (non-zero) |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 16 | IP address (IPv4: first 4 bytes, rest 0) |
//! | 32 | 4 | IPv6 scope id (IPv4: 0) |
//! | 36 | 4 | index of the listening device |
//! | 40 | 8 | random connection nonce |
//!
//! Bytes from [`HANDLE_USED`] to the end are zero when encoded and never read by `decode`:
//! the connecting side, which RCCL calls repeatedly with the same buffer, may keep its own
//! progress there.

use super::wire::Reader;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Size of RCCL's handle buffer (`NCCL_NET_HANDLE_MAXSIZE`).
pub const HANDLE_SIZE: usize = 128;
/// Bytes of the handle this format occupies.
pub const HANDLE_USED: usize = 48;
/// First bytes of every listen handle.
pub const HANDLE_MAGIC: [u8; 8] = *b"HALORDMA";
/// The handle format this build writes and reads.
pub const HANDLE_VERSION: u16 = 1;

/// Why bytes received from elsewhere (a handle or a bootstrap message) were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError {
    /// The bytes do not start with this plugin's magic: another plugin's handle, or garbage.
    BadMagic,
    /// Written by a build speaking another format version.
    UnsupportedVersion { found: u16, supported: u16 },
    /// Right magic and version, but a field is impossible.
    Malformed(String),
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::BadMagic => f.write_str("bad magic number (not written by halo-rdma)"),
            HandleError::UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found}, but this build speaks version {supported} \
                 (use the same plugin build on all nodes)"
            ),
            HandleError::Malformed(reason) => write!(f, "malformed: {reason}"),
        }
    }
}

impl std::error::Error for HandleError {}

/// Where the peer's `connect` finds our listener, and which connection it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenHandle {
    /// The listening socket (IPv6: including the scope id).
    pub addr: SocketAddr,
    /// Random per listen; the connecting side echoes it so each side knows the TCP
    /// connection belongs to this handle.
    pub nonce: u64,
    /// The plugin device index the listener was created for.
    pub dev: u32,
}

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

impl ListenHandle {
    /// Writes the handle into RCCL's buffer (all bytes past [`HANDLE_USED`] become 0).
    pub fn encode(&self, buf: &mut [u8; HANDLE_SIZE]) {
        let (family, ip, scope) = match self.addr {
            SocketAddr::V4(a) => {
                let mut ip = [0u8; 16];
                ip[..4].copy_from_slice(&a.ip().octets());
                (FAMILY_V4, ip, 0)
            }
            SocketAddr::V6(a) => (FAMILY_V6, a.ip().octets(), a.scope_id()),
        };
        buf.fill(0);
        buf[0..8].copy_from_slice(&HANDLE_MAGIC);
        buf[8..10].copy_from_slice(&HANDLE_VERSION.to_le_bytes());
        buf[10] = family;
        buf[12..14].copy_from_slice(&self.addr.port().to_le_bytes());
        buf[16..32].copy_from_slice(&ip);
        buf[32..36].copy_from_slice(&scope.to_le_bytes());
        buf[36..40].copy_from_slice(&self.dev.to_le_bytes());
        buf[40..48].copy_from_slice(&self.nonce.to_le_bytes());
    }

    /// Reads a handle written by [`encode`](Self::encode), checking every field.
    pub fn decode(buf: &[u8; HANDLE_SIZE]) -> Result<Self, HandleError> {
        let mut r = Reader::new(&buf[..HANDLE_USED]);
        if r.bytes::<8>()? != HANDLE_MAGIC {
            return Err(HandleError::BadMagic);
        }
        let version = r.u16()?;
        if version != HANDLE_VERSION {
            return Err(HandleError::UnsupportedVersion {
                found: version,
                supported: HANDLE_VERSION,
            });
        }
        let family = r.u8()?;
        let reserved_a = r.u8()?;
        let port = r.u16()?;
        let reserved_b = r.u16()?;
        let ip = r.bytes::<16>()?;
        let scope = r.u32()?;
        let dev = r.u32()?;
        let nonce = r.u64()?;
        let malformed = |why: String| Err(HandleError::Malformed(why));
        if reserved_a != 0 || reserved_b != 0 {
            return malformed("reserved bytes are not zero".into());
        }
        if port == 0 {
            return malformed("TCP port 0".into());
        }
        let addr = match family {
            FAMILY_V4 => {
                if ip[4..].iter().any(|&b| b != 0) || scope != 0 {
                    return malformed("IPv4 address with IPv6 bytes set".into());
                }
                let v4 = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
                SocketAddr::V4(SocketAddrV4::new(v4, port))
            }
            FAMILY_V6 => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope)),
            other => return malformed(format!("address family byte {other} (expected 4 or 6)")),
        };
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return malformed(format!("{} is not a unicast address", addr.ip()));
        }
        Ok(ListenHandle { addr, nonce, dev })
    }

    /// The listener's IP address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ListenHandle {
        ListenHandle {
            addr: "192.168.100.2:41234".parse().unwrap(),
            nonce: 0x0123_4567_89ab_cdef,
            dev: 1,
        }
    }

    fn encoded(h: &ListenHandle) -> [u8; HANDLE_SIZE] {
        let mut buf = [0xa5u8; HANDLE_SIZE];
        h.encode(&mut buf);
        buf
    }

    #[test]
    fn layout_is_as_documented() {
        let buf = encoded(&sample());
        assert_eq!(&buf[0..8], b"HALORDMA");
        assert_eq!(&buf[8..10], &[1, 0]);
        assert_eq!(buf[10], 4);
        assert_eq!(u16::from_le_bytes([buf[12], buf[13]]), 41234);
        assert_eq!(&buf[16..20], &[192, 168, 100, 2]);
        assert_eq!(&buf[36..40], &[1, 0, 0, 0]);
        assert_eq!(&buf[40..48], &0x0123_4567_89ab_cdef_u64.to_le_bytes());
        assert!(buf[HANDLE_USED..].iter().all(|&b| b == 0));
    }

    #[test]
    fn round_trip_v4_and_v6() {
        let h = sample();
        assert_eq!(ListenHandle::decode(&encoded(&h)), Ok(h));
        let h6 = ListenHandle {
            addr: SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 7, 0, 3)),
            nonce: 9,
            dev: 0,
        };
        assert_eq!(ListenHandle::decode(&encoded(&h6)), Ok(h6));
    }

    #[test]
    fn the_tail_is_free_for_the_caller() {
        let h = sample();
        let mut buf = encoded(&h);
        buf[HANDLE_USED..].fill(0xee);
        assert_eq!(ListenHandle::decode(&buf), Ok(h));
    }

    #[test]
    fn rejects_with_specific_errors() {
        type Edit<'a> = &'a dyn Fn(&mut [u8; HANDLE_SIZE]);
        let good = encoded(&sample());
        let with = |f: Edit| {
            let mut b = good;
            f(&mut b);
            ListenHandle::decode(&b)
        };
        assert_eq!(with(&|b| b[0] = b'X'), Err(HandleError::BadMagic));
        assert_eq!(
            with(&|b| b[8] = 2),
            Err(HandleError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        let malformed: [Edit; 7] = [
            &|b| b[10] = 5,
            &|b| b[11] = 1,
            &|b| b[12..14].fill(0),
            &|b| b[14] = 1,
            &|b| b[20] = 1,
            &|b| b[16..32].fill(0),
            &|b| b[16] = 224,
        ];
        for (i, f) in malformed.iter().enumerate() {
            assert!(
                matches!(with(f), Err(HandleError::Malformed(_))),
                "case {i}: {:?}",
                with(f)
            );
        }
        let e = with(&|b| b[10] = 9).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed: address family byte 9 (expected 4 or 6)"
        );
    }

    fn any_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX).prop_map(|(ip, port)| {
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))
            }),
            (any::<[u8; 16]>(), 1..=u16::MAX, any::<u32>()).prop_map(|(ip, port, scope)| {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope))
            }),
        ]
        .prop_filter("unicast", |a| {
            !a.ip().is_unspecified() && !a.ip().is_multicast()
        })
    }

    proptest! {
        #[test]
        fn round_trip(addr in any_socket_addr(), nonce in any::<u64>(), dev in any::<u32>()) {
            let h = ListenHandle { addr, nonce, dev };
            prop_assert_eq!(ListenHandle::decode(&encoded(&h)), Ok(h));
        }

        #[test]
        fn random_buffers_are_rejected(bytes in proptest::collection::vec(any::<u8>(), HANDLE_SIZE)) {
            let buf: [u8; HANDLE_SIZE] = bytes.try_into().unwrap();
            prop_assert!(ListenHandle::decode(&buf).is_err());
        }

        #[test]
        fn random_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), HANDLE_SIZE)) {
            let mut buf: [u8; HANDLE_SIZE] = bytes.try_into().unwrap();
            buf[..8].copy_from_slice(&HANDLE_MAGIC);
            buf[8..10].copy_from_slice(&HANDLE_VERSION.to_le_bytes());
            if let Ok(h) = ListenHandle::decode(&buf) {
                // Whatever is accepted must survive a re-encode unchanged.
                prop_assert_eq!(ListenHandle::decode(&encoded(&h)), Ok(h));
            }
        }
    }
}
