//! Everything that crosses the wire, in one place: the protocol version and feature bits that
//! peers exchange at connect, the layouts the NIC writes into the peer's memory (checked at
//! compile time), the immediate-value encoding, and how work request ids are tagged.
//!
//! A change to anything here changes what an old peer would read: bump [`PROTOCOL_VERSION`].

use bytemuck::{Pod, Zeroable};
use std::mem::{align_of, offset_of, size_of};

/// The version of this wire protocol. Peers of different versions refuse each other at connect,
/// naming both versions. Version 3: clear-to-send rows with eager credits, eager bounce slots,
/// spread rows over several queue pairs, connection info with the QP list. Version 4: the
/// row and header checks mix 64-bit words (cheaper per `isend`). Version 5: the connecting side
/// sends a hello (the connection info's preamble, no queue pairs) as soon as TCP is up.
/// Version 6: the receiver takes every eager message out of its own bounce slot (a CPU copy, or a
/// NIC copy into GPU memory), so an eager send is done once its write has completed; small tags
/// travel in the immediate instead of a header.
pub const PROTOCOL_VERSION: u16 = 6;

/// Feature bit: the receiver offers eager bounce slots (the sender may use them or not).
pub const FEATURE_EAGER: u64 = 1 << 0;
/// Feature bit: the connection may use several queue pairs (data spread over them).
pub const FEATURE_MULTI_QP: u64 = 1 << 1;
/// Feature bits this build implements and advertises.
pub const FEATURES: u64 = FEATURE_EAGER | FEATURE_MULTI_QP;
/// Feature bits a peer must have for this build to talk to it.
pub const FEATURES_REQUIRED: u64 = FEATURES;

/// Why a peer's announced protocol cannot be used.
pub fn check_peer_protocol(version: u16, features: u64) -> Result<(), String> {
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "the peer speaks halo wire protocol version {version}, this build version \
             {PROTOCOL_VERSION}: install the same plugin build on every node"
        ));
    }
    if features & FEATURES_REQUIRED != FEATURES_REQUIRED {
        return Err(format!(
            "the peer lacks protocol features {:#x} (it has {features:#x}, this build needs \
             {FEATURES_REQUIRED:#x}): install the same plugin build on every node",
            FEATURES_REQUIRED & !features
        ));
    }
    Ok(())
}

/// Most queue pairs one connection may use (`NCCL_IB_QPS_PER_CONNECTION` is capped to it).
pub const MAX_QPS: usize = 16;

/// Eager bounce slots a receiver offers at most.
pub const MAX_EAGER_SLOTS: usize = 8;

/// Rows in the clear-to-send FIFO: one per outstanding receive request (`NCCL_NET_MAX_REQUESTS`).
pub const FIFO_DEPTH: usize = 32;
/// Receives per multi-receive request (`maxRecvs` in the properties).
pub const MAX_RECVS: usize = 8;

/// Immediate value: the size is not in the immediate; read the sizes array row.
pub const IMM_SIZES_IN_ARRAY: u32 = 0x8000_0000;
/// Immediate value: the sender's message did not fit the posted receive; nothing was written.
pub const IMM_TRUNCATED: u32 = 0xFFFF_FFFF;
/// Largest size carried directly in the immediate of a single receive.
pub const IMM_MAX_SIZE: u64 = 0x3FFF_FFFF;
/// Immediate values `IMM_EAGER | slot`: an eager message landed, behind its
/// [`EagerHeader`], in bounce slot `slot`.
pub const IMM_EAGER: u32 = 0x4000_0000;
/// Bits of an eager immediate that hold the slot.
pub const IMM_EAGER_SLOT_MASK: u32 = 0xFFFF;

/// Whether `imm` is of the eager class (bit 30 set, bit 31 clear), header or bare; sizes and
/// the other markers are not. One compare: the receive path's test for the rare case.
#[inline]
pub fn is_eager_imm(imm: u32) -> bool {
    imm >> 30 == IMM_EAGER >> 30
}
/// Eager immediates with this bit carry no header: [`BareEager`] packs slot, size and tag into
/// the immediate, and the message fills only the slot's payload. A 4 or 8 KiB message then
/// takes as many packets as its data needs, not one more for 16 bytes of header.
pub const IMM_EAGER_BARE: u32 = 0x2000_0000;

/// An eager message described by its immediate alone (see [`IMM_EAGER_BARE`]): slot in bits
/// 26..29, size in bits 9..26, tag in bits 0..9. Its receive is the next one due, as for any
/// eager message, so no sequence number is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BareEager {
    pub slot: u16,
    pub size: u32,
    pub tag: i32,
}

impl BareEager {
    const SLOT_BITS: u32 = 3;
    const SIZE_BITS: u32 = 17;
    const TAG_BITS: u32 = 9;

    /// The immediate of a message that fits it (tags are ranks in RCCL and NCCL: small).
    pub fn encode(slot: u16, size: u64, tag: i32) -> Option<u32> {
        let fits = u32::from(slot) < 1 << Self::SLOT_BITS
            && size < 1 << Self::SIZE_BITS
            && (0..1 << Self::TAG_BITS).contains(&tag);
        fits.then(|| {
            IMM_EAGER
                | IMM_EAGER_BARE
                | u32::from(slot) << (Self::SIZE_BITS + Self::TAG_BITS)
                | (size as u32) << Self::TAG_BITS
                | tag as u32
        })
    }

    /// The message of a bare eager immediate (`None` for other immediates).
    pub fn decode(imm: u32) -> Option<Self> {
        if imm & (IMM_SIZES_IN_ARRAY | IMM_EAGER | IMM_EAGER_BARE) != IMM_EAGER | IMM_EAGER_BARE {
            return None;
        }
        let field = |shift: u32, bits: u32| (imm >> shift) & ((1 << bits) - 1);
        Some(BareEager {
            slot: field(Self::SIZE_BITS + Self::TAG_BITS, Self::SLOT_BITS) as u16,
            size: field(Self::TAG_BITS, Self::SIZE_BITS),
            tag: field(0, Self::TAG_BITS) as i32,
        })
    }
}

/// The entry of a receive that takes an eager message of tag `tag`: the first with that tag
/// (`None`: the receive has none, and the message belongs to a later one). Sender and receiver
/// both decide with this, from the same row, so they always agree.
pub fn eager_entry(entries: &[CtsEntry], tag: i32) -> Option<usize> {
    entries.iter().position(|e| e.tag == tag)
}

/// What the sender writes in front of the data in a bounce slot. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EagerHeader {
    /// The receive (row sequence number) this message is meant for.
    pub seq: u32,
    pub tag: i32,
    pub size: u32,
    /// [`EagerHeader::compute_check`].
    pub check: u32,
}

impl EagerHeader {
    pub fn new(seq: u32, tag: i32, size: u32) -> Self {
        let mut h = EagerHeader {
            seq,
            tag,
            size,
            check: 0,
        };
        h.check = h.compute_check();
        h
    }

    pub fn compute_check(&self) -> u32 {
        mix([
            u64::from(self.seq) | u64::from(self.tag as u32) << 32,
            u64::from(self.size),
            0x4541_4752,
            0,
            0,
        ])
    }

    pub fn is_intact(&self) -> bool {
        self.check == self.compute_check()
    }
}

/// Bytes of [`EagerHeader`] at the start of every bounce slot.
pub const EAGER_HEADER_BYTES: usize = std::mem::size_of::<EagerHeader>();

/// A 32-bit mix of `words`: a multiply-xorshift step per 64-bit word, then a fold. Every input
/// bit reaches every output bit, so a torn write (new stamp beside stale fields) fails the check
/// with probability 2^-32; it costs a few instructions per word, as the sender checks a row on
/// every `isend`.
fn mix(words: [u64; 5]) -> u32 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for w in words {
        h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    (h ^ (h >> 32)) as u32
}

/// One receive buffer offered to the sender. 40 bytes, written by the receiver into the sender's
/// FIFO memory with RDMA WRITE, so its layout is part of the wire format.
///
/// Nothing orders the bytes of one RDMA WRITE as they land (Soft-RoCE places them with `memcpy`,
/// a NIC by PCIe transactions), so the sender may see the new `stamp` next to stale fields.
/// `check` covers every other field: an entry counts only when both the stamp and the check match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtsEntry {
    /// Remote address of the receive buffer.
    pub addr: u64,
    /// Capacity of the receive buffer in bytes.
    pub size: u64,
    /// Remote key of the receive buffer's registration.
    pub rkey: u32,
    /// Tag the matching send must carry.
    pub tag: i32,
    /// Entries in this row (1 ..= MAX_RECVS); equal in every entry of a row.
    pub nreqs: u16,
    /// 0 (reserved).
    pub flags: u16,
    /// `stamp(seq)` of the request: tells a fresh row from stale memory.
    pub stamp: u32,
    /// [`CtsEntry::compute_check`] of the other fields.
    pub check: u32,
    /// Eager bounce slots the receiver had drained when it wrote this row (wrapping count).
    pub eager_done: u32,
}

impl CtsEntry {
    /// A 32-bit mix of every field but `check`.
    pub fn compute_check(&self) -> u32 {
        mix([
            self.addr,
            self.size,
            u64::from(self.rkey) | u64::from(self.tag as u32) << 32,
            u64::from(self.nreqs) | u64::from(self.flags) << 16 | u64::from(self.stamp) << 32,
            u64::from(self.eager_done),
        ])
    }

    /// The entry with its check filled in.
    pub fn sealed(mut self) -> Self {
        self.check = self.compute_check();
        self
    }

    /// Whether every field belongs to the same write.
    pub fn is_intact(&self) -> bool {
        self.check == self.compute_check()
    }
}

/// Bytes of one FIFO row in memory.
pub const CTS_ROW_BYTES: usize = MAX_RECVS * std::mem::size_of::<CtsEntry>();
/// Bytes of one row of the receiver's sizes array.
pub const SIZES_ROW_BYTES: usize = MAX_RECVS * std::mem::size_of::<u64>();

/// The value written into [`CtsEntry::stamp`] for request `seq`. Never zero for the first
/// 2^32 - 1 requests, so zeroed FIFO memory is never mistaken for a posted row.
pub fn stamp(seq: u32) -> u32 {
    seq.wrapping_add(1)
}

/// FIFO row used by request `seq`.
pub fn row_of(seq: u32) -> usize {
    seq as usize % FIFO_DEPTH
}

/// Byte offset of FIFO row `row` in the sender's FIFO memory.
pub fn fifo_row_offset(row: usize) -> u64 {
    (row * CTS_ROW_BYTES) as u64
}

/// Byte offset of sizes row `row` in the receiver's sizes array.
pub fn sizes_row_offset(row: usize) -> u64 {
    (row * SIZES_ROW_BYTES) as u64
}

/// Byte offset of bounce slot `slot` in a receiver's eager ring of `slot_max`-byte payloads.
pub fn eager_slot_offset(slot: u16, slot_max: u32) -> u64 {
    u64::from(slot) * (EAGER_HEADER_BYTES as u64 + u64::from(slot_max))
}

/// Inline room a queue pair asks for so that a whole clear-to-send row goes inside its work
/// request (devices that offer less get the row through a registered staging buffer).
pub const INLINE_WANTED: u32 = CTS_ROW_BYTES as u32;

// The layouts the NIC writes into the peer's memory: any change is a protocol change.
const _: () = {
    assert!(size_of::<CtsEntry>() == 40);
    assert!(align_of::<CtsEntry>() == 8);
    assert!(offset_of!(CtsEntry, addr) == 0);
    assert!(offset_of!(CtsEntry, size) == 8);
    assert!(offset_of!(CtsEntry, rkey) == 16);
    assert!(offset_of!(CtsEntry, tag) == 20);
    assert!(offset_of!(CtsEntry, nreqs) == 24);
    assert!(offset_of!(CtsEntry, flags) == 26);
    assert!(offset_of!(CtsEntry, stamp) == 28);
    assert!(offset_of!(CtsEntry, check) == 32);
    assert!(offset_of!(CtsEntry, eager_done) == 36);
    assert!(CTS_ROW_BYTES == 320);
    assert!(size_of::<EagerHeader>() == 16);
    assert!(offset_of!(EagerHeader, seq) == 0);
    assert!(offset_of!(EagerHeader, tag) == 4);
    assert!(offset_of!(EagerHeader, size) == 8);
    assert!(offset_of!(EagerHeader, check) == 12);
    assert!(SIZES_ROW_BYTES == 64);
    // The immediate classes must not overlap.
    assert!(IMM_MAX_SIZE < IMM_EAGER as u64);
    assert!(IMM_EAGER & IMM_SIZES_IN_ARRAY == 0);
    assert!(IMM_EAGER_BARE & (IMM_EAGER | IMM_SIZES_IN_ARRAY | IMM_EAGER_SLOT_MASK) == 0);
    assert!(MAX_EAGER_SLOTS <= 1 << BareEager::SLOT_BITS);
    assert!(BareEager::SLOT_BITS + BareEager::SIZE_BITS + BareEager::TAG_BITS == 29);
    // The largest eager message (64 KiB) fits the size field.
    assert!(65536 < 1 << BareEager::SIZE_BITS);
};

/// What a work request id says about the work request, so a completion can be accounted.
/// The low 32 bits hold the row sequence number; one bit above says which kind it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrId {
    /// The last work request of row `seq`'s transmit (sender, QP 0).
    Transmit(u32),
    /// The eager write of row `seq` (sender, QP 0).
    Eager(u32),
    /// The last data write of spread row `seq` on a data queue pair (sender, QP 1..).
    DataLanded(u32),
    /// A signaled clear-to-send write of row `seq` (receiver, QP 0).
    Cts(u32),
    /// An unsignaled work request: never seen in a successful completion.
    Untracked,
}

const WR_TRANSMIT: u64 = 1 << 40;
const WR_EAGER: u64 = 1 << 41;
const WR_DATA: u64 = 1 << 42;
const WR_CTS: u64 = 1 << 43;
const WR_UNTRACKED: u64 = u64::MAX;

impl WrId {
    pub fn encode(self) -> u64 {
        match self {
            WrId::Transmit(s) => WR_TRANSMIT | u64::from(s),
            WrId::Eager(s) => WR_EAGER | u64::from(s),
            WrId::DataLanded(s) => WR_DATA | u64::from(s),
            WrId::Cts(s) => WR_CTS | u64::from(s),
            WrId::Untracked => WR_UNTRACKED,
        }
    }

    /// The row of a [`WrId::Transmit`] id (the completion a sender sees most): one mask and one
    /// compare, ahead of the full [`Self::decode`].
    #[inline]
    pub fn transmit_seq(wr_id: u64) -> Option<u32> {
        (wr_id & !0xFFFF_FFFF == WR_TRANSMIT).then_some(wr_id as u32)
    }

    /// `None` for ids this protocol never hands out.
    #[inline]
    pub fn decode(wr_id: u64) -> Option<Self> {
        if wr_id == WR_UNTRACKED {
            return Some(WrId::Untracked);
        }
        let seq = wr_id as u32;
        match wr_id & !0xFFFF_FFFF {
            WR_TRANSMIT => Some(WrId::Transmit(seq)),
            WR_EAGER => Some(WrId::Eager(seq)),
            WR_DATA => Some(WrId::DataLanded(seq)),
            WR_CTS => Some(WrId::Cts(seq)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_ids_round_trip_and_garbage_is_refused() {
        for id in [
            WrId::Transmit(0),
            WrId::Transmit(u32::MAX),
            WrId::Eager(7),
            WrId::DataLanded(1 << 31),
            WrId::Cts(12345),
            WrId::Untracked,
        ] {
            assert_eq!(WrId::decode(id.encode()), Some(id));
            // The transmit shortcut agrees with the full decode on every id.
            let t = match id {
                WrId::Transmit(s) => Some(s),
                _ => None,
            };
            assert_eq!(WrId::transmit_seq(id.encode()), t);
        }
        assert_eq!(WrId::transmit_seq(WR_TRANSMIT | WR_EAGER | 3), None);
        assert_eq!(WrId::decode(0), None);
        assert_eq!(WrId::decode(WR_TRANSMIT | WR_EAGER | 3), None);
        assert_eq!(WrId::decode(1 << 50), None);
    }

    #[test]
    fn bare_eager_immediates_round_trip_and_stay_apart() {
        for (slot, size, tag) in [(0, 0, 0), (7, 65536, 511), (3, 4096, 1), (1, 131071, 17)] {
            let imm = BareEager::encode(slot, size, tag).unwrap();
            assert_eq!(
                BareEager::decode(imm),
                Some(BareEager {
                    slot,
                    size: size as u32,
                    tag
                })
            );
            assert_eq!(imm & IMM_EAGER, IMM_EAGER);
            assert!(is_eager_imm(imm), "{imm:#x}");
            assert!(u64::from(imm) > IMM_MAX_SIZE && imm != IMM_SIZES_IN_ARRAY);
            assert_ne!(imm, IMM_TRUNCATED);
        }
        // What does not fit goes with a header.
        assert_eq!(BareEager::encode(8, 1, 0), None);
        assert_eq!(BareEager::encode(0, 1 << 17, 0), None);
        assert_eq!(BareEager::encode(0, 1, 512), None);
        assert_eq!(BareEager::encode(0, 1, -1), None);
        // Other immediates are not bare eager ones.
        for imm in [0, 8192, IMM_SIZES_IN_ARRAY, IMM_TRUNCATED, IMM_EAGER | 3] {
            assert_eq!(BareEager::decode(imm), None, "{imm:#x}");
        }
        // The eager class, header or bare, and nothing else: sizes up to the largest an
        // immediate carries, the sizes-array and truncation markers.
        assert!(is_eager_imm(IMM_EAGER | 3));
        for imm in [
            0,
            8192,
            IMM_MAX_SIZE as u32,
            IMM_SIZES_IN_ARRAY,
            IMM_TRUNCATED,
        ] {
            assert!(!is_eager_imm(imm), "{imm:#x}");
        }
    }

    #[test]
    fn peers_of_another_version_or_without_features_are_refused() {
        assert!(check_peer_protocol(PROTOCOL_VERSION, FEATURES).is_ok());
        let e = check_peer_protocol(2, FEATURES).unwrap_err();
        assert!(e.contains("version 2") && e.contains(&format!("version {PROTOCOL_VERSION}")));
        let e = check_peer_protocol(PROTOCOL_VERSION, FEATURE_EAGER).unwrap_err();
        assert!(e.contains("0x2"), "{e}");
    }
}
