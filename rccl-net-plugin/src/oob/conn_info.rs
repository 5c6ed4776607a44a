//! Connection metadata each side sends over the bootstrap stream once TCP is up: everything
//! the peer needs to bring its queue pairs to RTS and to write into our FIFO.
//!
//! Layout (little-endian), 112 bytes plus 8 per QP, nothing after:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HALOCONN` |
//! | 8 | 2 | wire protocol version (`protocol::PROTOCOL_VERSION`) |
//! | 10 | 2 | number of QPs n, 1..=16 |
//! | 12 | 8 | feature bits |
//! | 20 | 8 | nonce of the listen handle |
//! | 28 | 16 | GID |
//! | 44 | 4 | GID index |
//! | 48 | 2 | LID |
//! | 50 | 1 | link layer (0 unspecified, 1 InfiniBand, 2 Ethernet) |
//! | 51 | 1 | reserved, 0 |
//! | 52 | 4 | active MTU in bytes (256 … 4096) |
//! | 56 | 8 | largest message |
//! | 64 | 8 | FIFO address |
//! | 72 | 4 | FIFO rkey |
//! | 76 | 4 | FIFO depth (≥ 1) |
//! | 80 | 8 | sizes array address |
//! | 88 | 4 | sizes array rkey |
//! | 92 | 4 | receives per request (≥ 1) |
//! | 96 | 8 | eager bounce slots address |
//! | 104 | 4 | eager bounce slots rkey |
//! | 108 | 2 | eager bounce slots (0: no eager path) |
//! | 110 | 2 | largest eager message in KiB (1 … 64 when there are slots) |
//! | 112 | 8·n | per QP: QP number, initial PSN (24 bits each) |
//!
//! The first 28 bytes (magic, version, QP count, features, nonce) keep this layout in every
//! version, so a peer of another version can still be told which version it met
//! ([`ConnInfo::preamble`]).
//!
//! Before it builds its queue pairs, the connecting side sends those 28 bytes alone, with a QP
//! count of 0: the *hello* ([`ConnInfo::hello`]). It tells the listener at once that this
//! connection is its peer (the nonce is the handle's), so a connection that closes after it is
//! known to be the peer going away, not a stray connection.

use super::wire::Reader;
use super::HandleError;

/// First bytes of every connection metadata message.
pub const CONN_INFO_MAGIC: [u8; 8] = *b"HALOCONN";
/// The format this build writes and reads. It is part of the wire protocol and carries that
/// protocol's version (`net` checks at compile time that the two agree).
pub const CONN_INFO_VERSION: u16 = 6;
/// Most queue pairs one connection info carries.
pub const MAX_QPS: usize = 16;

const FIXED_LEN: usize = 112;
/// Length of the preamble, and of the hello.
pub const HELLO_LEN: usize = 28;
const QP_LEN: usize = 8;
/// QP numbers and PSNs are 24-bit quantities in the transport headers.
const MAX_24BIT: u32 = 0x00ff_ffff;

/// One queue pair of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    pub qpn: u32,
    pub psn: u32,
}

/// What one side tells the other about its end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Format version; [`CONN_INFO_VERSION`] for everything this build sends.
    pub version: u16,
    /// Optional behaviours the sender supports; the receiver refuses a peer lacking one it needs.
    pub features: u64,
    /// The listen handle's nonce, so the listener knows which handle this connection answers.
    pub nonce: u64,
    pub gid: [u8; 16],
    pub gid_index: u32,
    pub lid: u16,
    pub link_layer: u8,
    /// Active MTU of the port in bytes; the path MTU is the smaller of both sides'.
    pub mtu_bytes: u32,
    pub max_msg_size: u64,
    /// 1..=[`MAX_QPS`] queue pairs.
    pub qps: Vec<QpInfo>,
    pub fifo_addr: u64,
    pub fifo_rkey: u32,
    pub sizes_addr: u64,
    pub sizes_rkey: u32,
    pub fifo_depth: u32,
    pub max_recvs: u32,
    /// The receiver's eager bounce slots (see `protocol`); `eager_slots` 0 turns the path off.
    pub eager_addr: u64,
    pub eager_rkey: u32,
    pub eager_slots: u16,
    pub eager_max_kib: u16,
}

impl ConnInfo {
    /// The bytes to send (written as given: `decode` is where values are checked).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + QP_LEN * self.qps.len());
        // A count that does not fit is written saturated; the length check then refuses it.
        let nqps = u16::try_from(self.qps.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&CONN_INFO_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&nqps.to_le_bytes());
        out.extend_from_slice(&self.features.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&self.gid_index.to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.push(self.link_layer);
        out.push(0);
        out.extend_from_slice(&self.mtu_bytes.to_le_bytes());
        out.extend_from_slice(&self.max_msg_size.to_le_bytes());
        out.extend_from_slice(&self.fifo_addr.to_le_bytes());
        out.extend_from_slice(&self.fifo_rkey.to_le_bytes());
        out.extend_from_slice(&self.fifo_depth.to_le_bytes());
        out.extend_from_slice(&self.sizes_addr.to_le_bytes());
        out.extend_from_slice(&self.sizes_rkey.to_le_bytes());
        out.extend_from_slice(&self.max_recvs.to_le_bytes());
        out.extend_from_slice(&self.eager_addr.to_le_bytes());
        out.extend_from_slice(&self.eager_rkey.to_le_bytes());
        out.extend_from_slice(&self.eager_slots.to_le_bytes());
        out.extend_from_slice(&self.eager_max_kib.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        for qp in &self.qps {
            out.extend_from_slice(&qp.qpn.to_le_bytes());
            out.extend_from_slice(&qp.psn.to_le_bytes());
        }
        out
    }

    /// The hello of a connection to the listen handle with `nonce`: this version's preamble
    /// with no queue pairs.
    pub fn hello(nonce: u64, features: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_LEN);
        out.extend_from_slice(&CONN_INFO_MAGIC);
        out.extend_from_slice(&CONN_INFO_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&features.to_le_bytes());
        out.extend_from_slice(&nonce.to_le_bytes());
        out
    }

    /// The nonce of a hello of this version (`None`: not one).
    pub fn parse_hello(bytes: &[u8]) -> Option<u64> {
        if bytes.len() != HELLO_LEN {
            return None;
        }
        let (version, nonce) = Self::preamble(bytes)?;
        (version == CONN_INFO_VERSION && bytes[10..12] == [0, 0]).then_some(nonce)
    }

    /// Version and nonce of a message in any version's format (`None`: not connection info).
    pub fn preamble(bytes: &[u8]) -> Option<(u16, u64)> {
        let mut r = Reader::new(bytes);
        if r.bytes::<8>().ok()? != CONN_INFO_MAGIC {
            return None;
        }
        let version = r.u16().ok()?;
        r.bytes::<10>().ok()?;
        Some((version, r.u64().ok()?))
    }

    /// Parses and checks a peer's message.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandleError> {
        let mut r = Reader::new(bytes);
        if r.bytes::<8>()? != CONN_INFO_MAGIC {
            return Err(HandleError::BadMagic);
        }
        let version = r.u16()?;
        if version != CONN_INFO_VERSION {
            return Err(HandleError::UnsupportedVersion {
                found: version,
                supported: CONN_INFO_VERSION,
            });
        }
        let nqps = usize::from(r.u16()?);
        let malformed = |why: String| Err(HandleError::Malformed(why));
        if !(1..=MAX_QPS).contains(&nqps) {
            return malformed(format!("{nqps} queue pairs (expected 1..={MAX_QPS})"));
        }
        let expected_len = FIXED_LEN + QP_LEN * nqps;
        if bytes.len() != expected_len {
            return malformed(format!(
                "{} bytes, but {nqps} queue pairs make {expected_len}",
                bytes.len()
            ));
        }
        let features = r.u64()?;
        let nonce = r.u64()?;
        let gid = r.bytes::<16>()?;
        let gid_index = r.u32()?;
        let lid = r.u16()?;
        let link_layer = r.u8()?;
        let reserved = r.u8()?;
        let mtu_bytes = r.u32()?;
        let max_msg_size = r.u64()?;
        let fifo_addr = r.u64()?;
        let fifo_rkey = r.u32()?;
        let fifo_depth = r.u32()?;
        let sizes_addr = r.u64()?;
        let sizes_rkey = r.u32()?;
        let max_recvs = r.u32()?;
        let eager_addr = r.u64()?;
        let eager_rkey = r.u32()?;
        let eager_slots = r.u16()?;
        let eager_max_kib = r.u16()?;
        let qps = (0..nqps)
            .map(|_| {
                Ok(QpInfo {
                    qpn: r.u32()?,
                    psn: r.u32()?,
                })
            })
            .collect::<Result<Vec<_>, HandleError>>()?;
        debug_assert_eq!(r.remaining(), 0);

        if reserved != 0 {
            return malformed("reserved byte is not zero".into());
        }
        if link_layer > 2 {
            return malformed(format!("link layer {link_layer} (expected 0, 1 or 2)"));
        }
        if !matches!(mtu_bytes, 256 | 512 | 1024 | 2048 | 4096) {
            return malformed(format!(
                "MTU {mtu_bytes} (expected 256, 512, 1024, 2048 or 4096)"
            ));
        }
        if max_msg_size == 0 || fifo_depth == 0 || max_recvs == 0 {
            return malformed(format!(
                "zero limit (max message {max_msg_size}, FIFO depth {fifo_depth}, \
                 receives per request {max_recvs})"
            ));
        }
        if eager_slots > 0 && !(1..=64).contains(&eager_max_kib) {
            return malformed(format!(
                "{eager_slots} eager slots of {eager_max_kib} KiB (expected 1..=64 KiB)"
            ));
        }
        if let Some(qp) = qps.iter().find(|q| q.qpn > MAX_24BIT || q.psn > MAX_24BIT) {
            return malformed(format!(
                "QP number {:#x} / PSN {:#x} exceeds 24 bits",
                qp.qpn, qp.psn
            ));
        }
        Ok(ConnInfo {
            version,
            features,
            nonce,
            gid,
            gid_index,
            lid,
            link_layer,
            mtu_bytes,
            max_msg_size,
            qps,
            fifo_addr,
            fifo_rkey,
            sizes_addr,
            sizes_rkey,
            fifo_depth,
            max_recvs,
            eager_addr,
            eager_rkey,
            eager_slots,
            eager_max_kib,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(in crate::oob) fn sample() -> ConnInfo {
        ConnInfo {
            version: CONN_INFO_VERSION,
            features: 0b101,
            nonce: 0xdead_beef_0000_0001,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 100, 2],
            gid_index: 3,
            lid: 0,
            link_layer: 2,
            mtu_bytes: 1024,
            max_msg_size: 1 << 30,
            qps: vec![
                QpInfo {
                    qpn: 0x11,
                    psn: 0xabcdef,
                },
                QpInfo { qpn: 0x12, psn: 7 },
            ],
            fifo_addr: 0x7f00_0000_1000,
            fifo_rkey: 0x1234,
            sizes_addr: 0x7f00_0000_2000,
            sizes_rkey: 0x5678,
            fifo_depth: 32,
            max_recvs: 8,
            eager_addr: 0x7f00_0000_3000,
            eager_rkey: 0x9abc,
            eager_slots: 8,
            eager_max_kib: 8,
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let b = sample().encode();
        assert_eq!(b.len(), 112 + 2 * 8);
        assert_eq!(&b[0..8], b"HALOCONN");
        assert_eq!(&b[8..10], &CONN_INFO_VERSION.to_le_bytes());
        assert_eq!(&b[10..12], &[2, 0]);
        assert_eq!(&b[28..44], &sample().gid);
        assert_eq!(b[50], 2);
        assert_eq!(&b[52..56], &1024u32.to_le_bytes());
        assert_eq!(&b[92..96], &8u32.to_le_bytes());
        assert_eq!(&b[96..104], &0x7f00_0000_3000u64.to_le_bytes());
        assert_eq!(&b[104..108], &0x9abcu32.to_le_bytes());
        assert_eq!(&b[108..110], &8u16.to_le_bytes());
        assert_eq!(&b[110..112], &8u16.to_le_bytes());
        assert_eq!(&b[112..116], &0x11u32.to_le_bytes());
        assert_eq!(&b[116..120], &0xabcdefu32.to_le_bytes());
    }

    #[test]
    fn preamble_reads_version_and_nonce_of_any_version() {
        let mut c = sample();
        assert_eq!(
            ConnInfo::preamble(&c.encode()),
            Some((CONN_INFO_VERSION, c.nonce))
        );
        c.version = 2;
        c.qps.clear();
        let old = c.encode();
        assert_eq!(ConnInfo::preamble(&old), Some((2, c.nonce)));
        assert_eq!(ConnInfo::preamble(&old[..27]), None);
        assert_eq!(ConnInfo::preamble(b"HALOHAND and more bytes here.."), None);
    }

    #[test]
    fn hello_is_the_preamble_without_queue_pairs() {
        let h = ConnInfo::hello(0x1122_3344_5566_7788, 3);
        assert_eq!(h.len(), HELLO_LEN);
        assert_eq!(ConnInfo::parse_hello(&h), Some(0x1122_3344_5566_7788));
        assert_eq!(
            ConnInfo::preamble(&h),
            Some((CONN_INFO_VERSION, 0x1122_3344_5566_7788))
        );
        // Not connection info: it has no queue pairs.
        assert!(ConnInfo::decode(&h).is_err());
        // Connection info is not a hello, nor is another version's preamble.
        let c = sample();
        assert_eq!(ConnInfo::parse_hello(&c.encode()), None);
        assert_eq!(ConnInfo::parse_hello(&c.encode()[..HELLO_LEN]), None);
        let mut old = h.clone();
        old[8..10].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(ConnInfo::parse_hello(&old), None);
        assert_eq!(ConnInfo::parse_hello(&h[..HELLO_LEN - 1]), None);
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(ConnInfo::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn rejects_with_specific_errors() {
        let check = |f: &dyn Fn(&mut ConnInfo)| {
            let mut c = sample();
            f(&mut c);
            ConnInfo::decode(&c.encode())
        };
        assert_eq!(
            check(&|c| c.version = 1),
            Err(HandleError::UnsupportedVersion {
                found: 1,
                supported: CONN_INFO_VERSION
            })
        );
        let malformed: [&dyn Fn(&mut ConnInfo); 11] = [
            &|c| c.eager_max_kib = 0,
            &|c| c.eager_max_kib = 65,
            &|c| c.qps.clear(),
            &|c| c.qps = vec![QpInfo { qpn: 1, psn: 1 }; MAX_QPS + 1],
            &|c| c.link_layer = 3,
            &|c| c.mtu_bytes = 1500,
            &|c| c.fifo_depth = 0,
            &|c| c.max_recvs = 0,
            &|c| c.max_msg_size = 0,
            &|c| c.qps[1].qpn = 1 << 24,
            &|c| c.qps[0].psn = u32::MAX,
        ];
        for (i, f) in malformed.iter().enumerate() {
            let r = check(f);
            assert!(
                matches!(r, Err(HandleError::Malformed(_))),
                "case {i}: {r:?}"
            );
        }
        let mut b = sample().encode();
        b[0] ^= 1;
        assert_eq!(ConnInfo::decode(&b), Err(HandleError::BadMagic));
        let mut b = sample().encode();
        b[51] = 1;
        assert!(matches!(
            ConnInfo::decode(&b),
            Err(HandleError::Malformed(_))
        ));
        let mut b = sample().encode();
        b.push(0);
        assert!(matches!(
            ConnInfo::decode(&b),
            Err(HandleError::Malformed(_))
        ));
        assert!(ConnInfo::decode(&[]).is_err());
    }

    #[test]
    fn every_truncation_is_rejected() {
        let b = sample().encode();
        for len in 0..b.len() {
            assert!(
                ConnInfo::decode(&b[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    fn any_conn_info() -> impl Strategy<Value = ConnInfo> {
        let qps = proptest::collection::vec(
            (0..=MAX_24BIT, 0..=MAX_24BIT).prop_map(|(qpn, psn)| QpInfo { qpn, psn }),
            1..=MAX_QPS,
        );
        let ids = (
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u32>(),
            any::<u16>(),
        );
        let port = (
            0u8..=2,
            prop::sample::select(vec![256u32, 512, 1024, 2048, 4096]),
            1..=u64::MAX,
        );
        let fifo = (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            1..=u32::MAX,
            1..=u32::MAX,
        );
        let eager = (any::<u64>(), any::<u32>(), 0u16..=16, 1u16..=64);
        (ids, port, qps, fifo, eager).prop_map(
            |(
                (features, nonce, gid, gid_index, lid),
                (link_layer, mtu_bytes, max_msg_size),
                qps,
                (fifo_addr, fifo_rkey, sizes_addr, sizes_rkey, fifo_depth, max_recvs),
                (eager_addr, eager_rkey, eager_slots, eager_max_kib),
            )| ConnInfo {
                version: CONN_INFO_VERSION,
                features,
                nonce,
                gid,
                gid_index,
                lid,
                link_layer,
                mtu_bytes,
                max_msg_size,
                qps,
                fifo_addr,
                fifo_rkey,
                sizes_addr,
                sizes_rkey,
                fifo_depth,
                max_recvs,
                eager_addr,
                eager_rkey,
                eager_slots,
                eager_max_kib,
            },
        )
    }

    proptest! {
        #[test]
        fn round_trips(c in any_conn_info()) {
            prop_assert_eq!(ConnInfo::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn garbage_is_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(ConnInfo::decode(&bytes).is_err());
        }

        #[test]
        fn random_bodies_never_panic(
            nqps in 0u16..20,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut b = CONN_INFO_MAGIC.to_vec();
            b.extend_from_slice(&CONN_INFO_VERSION.to_le_bytes());
            b.extend_from_slice(&nqps.to_le_bytes());
            b.extend_from_slice(&body);
            if let Ok(c) = ConnInfo::decode(&b) {
                prop_assert_eq!(c.encode(), b);
            }
        }

        #[test]
        fn flipped_bytes_never_panic(c in any_conn_info(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut b = c.encode();
            let i = at.index(b.len());
            b[i] ^= x;
            let _ = ConnInfo::decode(&b);
        }
    }
}
