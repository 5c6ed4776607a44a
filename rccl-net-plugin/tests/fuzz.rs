//! Fuzzing of everything the plugin reads from its peer: listen handles and connection info
//! (`oob`), and, for the protocol core, clear-to-send rows landing in the sender's FIFO, eager
//! headers in bounce slots, sizes rows, immediates and completions, interleaved with the
//! caller's own `isend`/`irecv`/`test`. Whatever arrives, the plugin must answer with an error
//! (after which the comm is failed and never driven again) and never panic; and it must never
//! read or write outside the memory it owns: every FIFO row, sizes row, bounce slot and eager
//! copy the core asks for is checked against its bounds here.
//!
//! Input counts (proptest cases): `HALO_FUZZ_CASES` scales all four targets (default 1, about
//! 10^5 inputs in total, each protocol input a sequence of up to 47 events); the seed is proptest's (set `PROPTEST_RNG_SEED` to replay).

use proptest::prelude::*;
use rccl_net_plugin::oob::{
    ConnInfo, ListenHandle, CONN_INFO_MAGIC, CONN_INFO_VERSION, HANDLE_MAGIC, HANDLE_SIZE,
    HANDLE_VERSION,
};
use rccl_net_plugin::protocol::{
    stamp, CtsEntry, EagerHeader, OnWire, Post, PostOp, PostSink, Receiver, RecvBuf, RecvConfig,
    RecvSink, SendConfig, SendMsg, Sender, WrId, CTS_ROW_BYTES, FIFO_DEPTH, IMM_EAGER,
    IMM_EAGER_BARE, IMM_SIZES_IN_ARRAY, IMM_TRUNCATED, MAX_RECVS,
};

/// Proptest cases for a target with `base` cases at the default scale.
fn cases(base: u32) -> u32 {
    let scale = std::env::var("HALO_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    ((f64::from(base) * scale) as u32).max(1)
}

fn config(base: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(base),
        // Inputs are cheap and the generators produce few rejects.
        max_shrink_iters: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- connect handles and connection info --------------------------------------------------

/// A handle buffer: pure garbage, or garbage behind a valid magic and version (so the field
/// checks are reached), or a valid handle with a few bytes flipped.
fn handle_bytes() -> impl Strategy<Value = [u8; HANDLE_SIZE]> {
    (
        0u8..3,
        prop::collection::vec(any::<u8>(), HANDLE_SIZE),
        prop::collection::vec((0usize..64, any::<u8>()), 0..4),
    )
        .prop_map(|(kind, bytes, flips)| {
            let mut b: [u8; HANDLE_SIZE] = bytes.try_into().unwrap();
            if kind >= 1 {
                b[..8].copy_from_slice(&HANDLE_MAGIC);
                b[8..10].copy_from_slice(&HANDLE_VERSION.to_le_bytes());
            }
            if kind == 2 {
                // A plausible IPv4 handle, then flips.
                b[10] = 4;
                b[11] = 0;
                b[14] = 0;
                b[15] = 0;
                b[20..36].fill(0);
                for (at, x) in flips {
                    b[at] ^= x;
                }
            }
            b
        })
}

/// Connection-info bytes: garbage, or garbage behind a valid preamble with a QP count.
fn conn_info_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        0u16..24,
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(framed, nqps, body)| {
            if !framed {
                return body;
            }
            let mut b = CONN_INFO_MAGIC.to_vec();
            b.extend_from_slice(&CONN_INFO_VERSION.to_le_bytes());
            b.extend_from_slice(&nqps.to_le_bytes());
            b.extend_from_slice(&body);
            b
        })
}

proptest! {
    #![proptest_config(config(25_000))]

    #[test]
    fn handles_from_the_peer_never_panic(b in handle_bytes()) {
        if let Ok(h) = ListenHandle::decode(&b) {
            let mut again = [0u8; HANDLE_SIZE];
            h.encode(&mut again);
            prop_assert_eq!(ListenHandle::decode(&again), Ok(h));
        }
    }

    #[test]
    fn connection_info_from_the_peer_never_panics(b in conn_info_bytes()) {
        let _ = ConnInfo::preamble(&b);
        if let Ok(c) = ConnInfo::decode(&b) {
            prop_assert_eq!(ConnInfo::decode(&c.encode()), Ok(c));
        }
    }
}

// ---- the protocol core ----------------------------------------------------------------------

/// A sink that checks every post against the bounds of the memory it would touch.
#[derive(Default)]
struct Sink {
    eager_slots: u16,
    eager_max: u32,
    /// Receive buffers posted (addr, size), for eager copies.
    bufs: Vec<(u64, u64)>,
    posts: usize,
    /// Signaled work requests not completed yet, per queue pair, in posting order.
    signaled: Vec<std::collections::VecDeque<u64>>,
    violation: Option<String>,
}

impl Sink {
    fn flag(&mut self, v: String) {
        self.violation.get_or_insert(v);
    }

    /// Whether `len` bytes at `dst` lie inside one posted receive buffer.
    fn lands_in_a_buffer(&self, dst: u64, len: u64) -> bool {
        self.bufs
            .iter()
            .any(|&(a, s)| dst >= a && len <= s && dst - a <= s - len)
    }
}

impl PostSink for Sink {
    fn post(&mut self, p: &Post<'_>) {
        self.posts += 1;
        if p.signaled {
            if self.signaled.len() <= p.qp {
                self.signaled.resize_with(p.qp + 1, Default::default);
            }
            self.signaled[p.qp].push_back(p.wr_id);
        }
        match p.op {
            PostOp::Sizes { row, sizes } => {
                if row >= FIFO_DEPTH || sizes.len() > MAX_RECVS {
                    self.flag(format!("sizes row {row} of {} entries", sizes.len()));
                }
            }
            PostOp::Cts { row, entries } => {
                if row >= FIFO_DEPTH || entries.is_empty() || entries.len() > MAX_RECVS {
                    self.flag(format!("FIFO row {row} of {} entries", entries.len()));
                }
            }
            PostOp::Eager { slot, len, .. } => {
                if slot >= self.eager_slots || len > self.eager_max {
                    self.flag(format!("eager write of {len} bytes into slot {slot}"));
                }
            }
            PostOp::Data { .. } => {}
        }
    }

    fn on_wire(&mut self, w: &OnWire) {
        if usize::from(w.nreqs) > MAX_RECVS {
            self.flag(format!("{} requests on the wire at once", w.nreqs));
        }
    }
}

impl RecvSink for Sink {
    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64) {
        let fits = self.lands_in_a_buffer(dst, len);
        if slot >= self.eager_slots || len > u64::from(self.eager_max) || !fits {
            self.flag(format!(
                "eager copy of {len} bytes from slot {slot} to {dst:#x}"
            ));
        }
    }

    fn release_eager(&mut self, slot: u16) {
        if slot >= self.eager_slots {
            self.flag(format!("release of eager slot {slot}"));
        }
    }

    fn dma_eager(&mut self, slot: u16, dst: u64, _rkey: u32, len: u32) {
        if slot >= self.eager_slots
            || len > self.eager_max
            || !self.lands_in_a_buffer(dst, u64::from(len))
        {
            self.flag(format!(
                "NIC copy of {len} bytes from eager slot {slot} to {dst:#x}"
            ));
        }
    }
}

/// Plausible or arbitrary values: the interesting edge first, anything now and then.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..300,
        2 => 0u64..(1 << 20),
        1 => 0u64..(1 << 34),
        1 => Just(u64::from(u32::MAX)),
        1 => any::<u64>(),
    ]
}

fn tag() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0i32..4, 1 => any::<i32>()]
}

/// One clear-to-send entry as the peer might write it.
#[derive(Clone, Debug)]
struct EntrySpec {
    addr: u64,
    size: u64,
    rkey: u32,
    tag: i32,
    nreqs: u16,
    flags: u16,
    /// Stamp of the sender's current row plus this (most often 0), or a raw stamp.
    stamp: Result<i8, u32>,
    eager_done: u32,
    /// Seal the entry (a valid check), else leave the check as generated.
    seal: bool,
    check: u32,
}

fn entry() -> impl Strategy<Value = EntrySpec> {
    (
        (
            prop_oneof![
                16 => 0u64..(1 << 47),
                1 => any::<u64>(),
                1 => (u64::MAX - 256)..=u64::MAX
            ],
            prop_oneof![8 => 0u64..2000, 1 => size()],
            any::<u32>(),
            tag(),
        ),
        (
            prop_oneof![20 => 1u16..=8, 1 => Just(0u16), 1 => 9u16..=u16::MAX],
            prop_oneof![3 => Just(0u16), 3 => Just(1u16), 1 => any::<u16>()],
        ),
        prop_oneof![
            30 => Just(Ok(0i8)),
            6 => (-2i8..=2).prop_map(Ok),
            1 => any::<u32>().prop_map(Err)
        ],
        prop_oneof![8 => 0u32..40, 1 => any::<u32>()],
        prop::bool::weighted(0.97),
        any::<u32>(),
    )
        .prop_map(
            |((addr, size, rkey, tag), (nreqs, flags), stamp, eager_done, seal, check)| EntrySpec {
                addr,
                size,
                rkey,
                tag,
                nreqs,
                flags,
                stamp,
                eager_done,
                seal,
                check,
            },
        )
}

#[derive(Clone, Debug)]
enum SendOp {
    /// The peer writes entries into FIFO row (current row + `ahead`) — usually all with the
    /// same entry count and stamp, as one row; `torn`: each entry with its own stamp.
    Row {
        ahead: u8,
        entries: Vec<EntrySpec>,
        same_nreqs: bool,
        torn: bool,
    },
    /// The peer writes raw bytes over a FIFO row.
    RawRow {
        row: u8,
        bytes: Vec<u8>,
    },
    /// `isend` with `tag`, or, with `from_row`, the tag of that entry of the current FIFO row.
    Isend {
        addr: u64,
        size: u64,
        tag: i32,
        from_row: Option<u8>,
    },
    /// A completion on our queue pairs: a plausible work request id or any.
    /// The oldest signaled work request of a queue pair completes; now and then a made-up one.
    Completion {
        qp: u8,
        kind: u8,
        delta: i8,
        raw: u64,
    },
    Progress,
    /// Test one of the requests `isend` returned; now and then a made-up one.
    Test {
        pick: u16,
        raw: Option<u16>,
    },
}

fn send_op() -> impl Strategy<Value = SendOp> {
    prop_oneof![
        4 => (prop_oneof![4 => Just(0u8), 1 => 1u8..3],
              prop_oneof![
                  2 => prop::collection::vec(entry(), 1..=1),
                  1 => prop::collection::vec(entry(), 2..=MAX_RECVS),
              ],
              prop::bool::weighted(0.97), prop::bool::weighted(0.1))
            .prop_map(|(ahead, entries, same_nreqs, torn)| SendOp::Row {
                ahead, entries, same_nreqs, torn
            }),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), CTS_ROW_BYTES))
            .prop_map(|(row, bytes)| SendOp::RawRow { row, bytes }),
        6 => (0u64..(1 << 47), prop_oneof![
                12 => 0u64..600, 1 => 0u64..(1 << 22), 1 => 0u64..(1 << 34)
             ], tag(), prop_oneof![1 => Just(None), 3 => any::<u8>().prop_map(Some)])
            .prop_map(|(addr, size, tag, from_row)| SendOp::Isend { addr, size, tag, from_row }),
        4 => (0u8..4, prop_oneof![200 => Just(0u8), 1 => 1u8..6], -3i8..=1, any::<u64>())
            .prop_map(|(qp, kind, delta, raw)| SendOp::Completion { qp, kind, delta, raw }),
        2 => Just(SendOp::Progress),
        3 => (any::<u16>(), prop_oneof![30 => Just(None), 1 => any::<u16>().prop_map(Some)])
            .prop_map(|(pick, raw)| SendOp::Test { pick, raw }),
    ]
}

fn send_config() -> impl Strategy<Value = SendConfig> {
    (
        prop_oneof![1u64..64, Just(1u64 << 30), Just(u64::from(u32::MAX))],
        prop_oneof![1u32..8, 8u32..300],
        (1usize..=4, any::<bool>(), 0u64..100_000),
        (0u16..=8, prop_oneof![0u32..300, Just(8192u32)]),
    )
        .prop_map(
            |(max_msg, sq_depth, (qps, split, spread_min), (eager_slots, eager_max))| SendConfig {
                max_msg,
                sq_depth,
                qps,
                split,
                spread_min,
                eager_slots,
                eager_max,
            },
        )
}

fn apply_entry(e: &EntrySpec, seq: u32, nreqs: Option<u16>) -> CtsEntry {
    let mut c = CtsEntry {
        addr: e.addr,
        size: e.size,
        rkey: e.rkey,
        tag: e.tag,
        nreqs: nreqs.unwrap_or(e.nreqs),
        flags: e.flags,
        stamp: match e.stamp {
            Ok(d) => stamp(seq.wrapping_add(d as u32)),
            Err(raw) => raw,
        },
        check: e.check,
        eager_done: e.eager_done,
    };
    if e.seal {
        c = c.sealed();
    }
    c
}

fn run_sender(cfg: SendConfig, ops: Vec<SendOp>) -> Result<(), TestCaseError> {
    let mut s = Sender::new(cfg);
    let mut fifo = [[CtsEntry::default(); MAX_RECVS]; FIFO_DEPTH];
    let mut sink = Sink {
        eager_slots: cfg.eager_slots,
        eager_max: if cfg.eager_slots > 0 {
            cfg.eager_max
        } else {
            0
        },
        ..Sink::default()
    };
    // Every FIFO read the core makes must be inside the FIFO.
    let bad_read = std::cell::Cell::new(None);
    let mut reqs: Vec<u16> = Vec::new();
    for op in ops {
        let read = |r: usize, i: usize| {
            if r >= FIFO_DEPTH || i >= MAX_RECVS {
                bad_read.set(Some((r, i)));
                return CtsEntry::default();
            }
            fifo[r][i]
        };
        let r = match op {
            SendOp::Row {
                ahead,
                entries,
                same_nreqs,
                torn,
            } => {
                let seq = s.seq().wrapping_add(u32::from(ahead));
                let row = seq as usize % FIFO_DEPTH;
                let n = same_nreqs.then_some(entries.len() as u16);
                for (i, e) in entries.iter().enumerate() {
                    let mut e = e.clone();
                    if !torn {
                        e.stamp = entries[0].stamp;
                    }
                    fifo[row][i] = apply_entry(&e, seq, n);
                }

                Ok(())
            }
            SendOp::RawRow { row, bytes } => {
                let row = usize::from(row) % FIFO_DEPTH;
                for (i, chunk) in bytes.chunks_exact(40).enumerate() {
                    fifo[row][i] = bytemuck::pod_read_unaligned(chunk);
                }
                Ok(())
            }
            SendOp::Isend {
                addr,
                size,
                tag,
                from_row,
            } => s
                .isend(
                    read,
                    SendMsg {
                        addr,
                        lkey: 1,
                        size,
                        tag: from_row.map_or(tag, |i| {
                            fifo[s.seq() as usize % FIFO_DEPTH][usize::from(i) % MAX_RECVS].tag
                        }),
                        host: true,
                    },
                    &mut sink,
                )
                .map(|r| reqs.extend(r)),
            SendOp::Completion {
                qp,
                kind,
                delta,
                raw,
            } => {
                let seq = s.seq().wrapping_add(delta as u32);
                let q = usize::from(qp) % sink.signaled.len().max(1);
                let wr_id = match kind {
                    0 => match sink.signaled.get_mut(q).and_then(|w| w.pop_front()) {
                        Some(w) => w,
                        None => continue,
                    },
                    1 => WrId::Transmit(seq).encode(),
                    2 => WrId::Eager(seq).encode(),
                    3 => WrId::DataLanded(seq).encode(),
                    4 => WrId::Untracked.encode(),
                    _ => raw,
                };
                let _ = s.reqs_completed_by(wr_id);
                s.on_completion(wr_id)
            }
            SendOp::Progress => s.progress(read, &mut sink),
            SendOp::Test { pick, raw } => {
                let req = match raw {
                    Some(r) => r,
                    None if reqs.is_empty() => continue,
                    None => reqs[usize::from(pick) % reqs.len()],
                };
                let r = s.test(req);
                if !matches!(r, Ok(None)) {
                    reqs.retain(|&x| x != req);
                }
                r.map(drop)
            }
        };
        if let Some((r, i)) = bad_read.get() {
            return Err(TestCaseError::fail(format!(
                "FIFO read of row {r} entry {i}"
            )));
        }
        if let Some(v) = sink.violation.take() {
            return Err(TestCaseError::fail(v));
        }
        if r.is_err() {
            // The comm is failed: nothing drives it again.
            break;
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum RecvOp {
    Irecv {
        bufs: Vec<(u64, u64, i32, bool)>,
    },
    /// An immediate arrived, with what the sizes row and the bounce slot hold.
    Imm {
        imm: u32,
        sizes: [u64; MAX_RECVS],
        hdr: (u32, i32, u32),
        seal: bool,
        check: u32,
    },
    SendCompletion {
        wr_id: u64,
    },
    /// The NIC copy of an eager message out of a bounce slot completed (or a bogus report).
    DmaDone {
        slot: u16,
    },
    Test {
        pick: u16,
        raw: Option<u16>,
    },
    Restock,
}

fn recv_op() -> impl Strategy<Value = RecvOp> {
    let imm = prop_oneof![
        4 => 0u32..400,
        2 => Just(IMM_SIZES_IN_ARRAY),
        1 => Just(IMM_TRUNCATED),
        3 => (0u32..10).prop_map(|s| IMM_EAGER | s),
        3 => any::<u32>().prop_map(|x| IMM_EAGER | IMM_EAGER_BARE | (x & 0x1FFF_FFFF)),
        1 => any::<u32>(),
    ];
    let sizes = prop_oneof![
        3 => prop::array::uniform8(0u64..400),
        1 => prop::array::uniform8(any::<u64>()),
    ];
    let buf = || {
        (
            0u64..(1 << 47),
            prop_oneof![3 => 0u64..400, 1 => 0u64..(1 << 34)],
            tag(),
            any::<bool>(),
        )
    };
    let bufs = prop_oneof![
        20 => prop::collection::vec(buf(), 1..=MAX_RECVS),
        1 => prop::collection::vec(buf(), 0..=MAX_RECVS + 1),
    ];
    prop_oneof![
        3 => bufs.prop_map(|bufs| RecvOp::Irecv { bufs }),
        5 => (imm, sizes, (0u32..40, tag(), prop_oneof![3 => 0u32..400, 1 => any::<u32>()]),
              prop::bool::weighted(0.9), any::<u32>())
            .prop_map(|(imm, sizes, hdr, seal, check)| RecvOp::Imm { imm, sizes, hdr, seal, check }),
        2 => prop_oneof![
                3 => (0u32..40).prop_map(|n| WrId::Cts(n).encode()),
                1 => any::<u64>(),
             ].prop_map(|wr_id| RecvOp::SendCompletion { wr_id }),
        1 => (0u16..10).prop_map(|slot| RecvOp::DmaDone { slot }),
        3 => (any::<u16>(), prop_oneof![30 => Just(None), 1 => any::<u16>().prop_map(Some)])
            .prop_map(|(pick, raw)| RecvOp::Test { pick, raw }),
        1 => Just(RecvOp::Restock),
    ]
}

fn recv_config() -> impl Strategy<Value = RecvConfig> {
    (1u32..64, 0u16..=8, prop_oneof![0u32..300, Just(8192u32)]).prop_map(
        |(sq_depth, eager_slots, eager_max)| RecvConfig {
            sq_depth,
            eager_slots,
            eager_max,
        },
    )
}

fn run_receiver(cfg: RecvConfig, ops: Vec<RecvOp>) -> Result<(), TestCaseError> {
    let mut r = Receiver::new(cfg);
    let mut sink = Sink {
        eager_slots: cfg.eager_slots,
        eager_max: cfg.eager_max,
        ..Sink::default()
    };
    let mut reqs: Vec<u16> = Vec::new();
    for op in ops {
        let bad = std::cell::Cell::new(None::<String>);
        let res = match op {
            RecvOp::Irecv { bufs } => {
                let bufs: Vec<RecvBuf> = bufs
                    .iter()
                    .map(|&(addr, size, tag, host)| RecvBuf {
                        addr,
                        size,
                        rkey: 3,
                        tag,
                        host,
                    })
                    .collect();
                sink.bufs.extend(bufs.iter().map(|b| (b.addr, b.size)));
                r.irecv(&bufs, &mut sink).map(|q| reqs.extend(q))
            }
            RecvOp::Imm {
                imm,
                sizes,
                hdr: (seq, tag, size),
                seal,
                check,
            } => r.on_imm(
                imm,
                |row| {
                    if row >= FIFO_DEPTH {
                        bad.set(Some(format!("sizes row {row}")));
                    }
                    sizes
                },
                |slot| {
                    if slot >= cfg.eager_slots {
                        bad.set(Some(format!("header of eager slot {slot}")));
                    }
                    let mut h = EagerHeader::new(seq, tag, size);
                    if !seal {
                        h.check = check;
                    }
                    h
                },
                &mut sink,
            ),
            RecvOp::SendCompletion { wr_id } => r.on_send_completion(wr_id),
            RecvOp::DmaDone { slot } => r.on_eager_dma_done(slot),
            RecvOp::Test { pick, raw } => {
                let req = match raw {
                    Some(r) => r,
                    None if reqs.is_empty() => continue,
                    None => reqs[usize::from(pick) % reqs.len()],
                };
                let res = r.test(req);
                if !matches!(res, Ok(None)) {
                    reqs.retain(|&x| x != req);
                }
                res.map(drop)
            }
            RecvOp::Restock => {
                let _ = r.take_restock();
                Ok(())
            }
        };
        if let Some(v) = bad.take().or(sink.violation.take()) {
            return Err(TestCaseError::fail(v));
        }
        if res.is_err() {
            break;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(25_000))]

    #[test]
    fn sender_fed_arbitrary_rows_and_completions_never_panics(
        cfg in send_config(),
        ops in prop::collection::vec(send_op(), 1..48),
    ) {
        run_sender(cfg, ops)?;
    }

    #[test]
    fn receiver_fed_arbitrary_immediates_headers_and_sizes_never_panics(
        cfg in recv_config(),
        ops in prop::collection::vec(recv_op(), 1..48),
    ) {
        run_receiver(cfg, ops)?;
    }
}
