//! The protocol against a simple model: a simulated wire with delayed, in-order delivery.
//! Every byte sent must land once, in the buffer the tag picks, with the exact size reported on
//! both sides; oversize sends fail on both sides; no FIFO row is reused while still in use; an
//! eager bounce slot is never written while it still holds a message.

#![allow(clippy::needless_range_loop)]

use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

/// Synthetic addresses: buffer id in the high half, offset in the low half.
fn addr(id: usize, off: u64) -> u64 {
    ((id as u64) << 32) | off
}

#[derive(Clone, Debug)]
struct Group {
    /// (capacity, tag) per receive buffer.
    bufs: Vec<(u64, i32)>,
    /// size per buffer of the matching send (same order as bufs).
    sends: Vec<u64>,
    /// order in which the sender posts the group's sends.
    order: Vec<usize>,
    /// The receive buffers are host memory (eager messages may be copied into them).
    host: bool,
}

fn group() -> impl Strategy<Value = Group> {
    (1usize..=4)
        .prop_flat_map(|n| {
            (
                prop::collection::vec((0u64..300, 0u64..330), n),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                prop::bool::weighted(0.8),
            )
        })
        .prop_map(|(sz, order, host)| Group {
            host,
            bufs: sz
                .iter()
                .enumerate()
                .map(|(i, &(cap, _))| (cap, i as i32 * 7 + 1))
                .collect(),
            sends: sz
                .iter()
                .map(|&(cap, s)| {
                    if s >= 300 {
                        cap + 1 + s % 5
                    } else {
                        s.min(cap)
                    }
                })
                .collect(),
            order,
        })
}

#[allow(clippy::large_enum_variant)]
enum Wire {
    Cts {
        seq: u32,
        n: usize,
        entries: [CtsEntry; MAX_RECVS],
        torn: bool,
    },
    Data(WireOp, u32),
    /// An eager write: header and data into a bounce slot.
    Eager {
        slot: u16,
        hdr: EagerHeader,
        data: Vec<u8>,
    },
}

struct Sim {
    send: SendState,
    recv: RecvState,
    fifo: [[CtsEntry; MAX_RECVS]; FIFO_DEPTH],
    sizes: [[u64; MAX_RECVS]; FIFO_DEPTH],
    /// receiver memory per (group, buffer)
    rmem: Vec<Vec<u8>>,
    /// sender memory per (group, buffer)
    smem: Vec<Vec<u8>>,
    to_sender: VecDeque<Wire>,
    to_receiver: VecDeque<Wire>,
    /// (eager write?, row sequence)
    send_cq: VecDeque<(bool, u32)>,
    recv_cq: VecDeque<u32>,
    /// Receiver's bounce slots: header, payload, and whether the slot holds an undrained message.
    slots: Vec<(EagerHeader, Vec<u8>, bool)>,
    eager_sent: usize,
    eager_taken: usize,
    /// The slot the receiver holds for a receive not posted yet.
    held: Option<u16>,
}

impl Sim {
    /// Carries out an eager action on the receiver's memory.
    fn apply(&mut self, a: EagerAction, slot_of_drop: Option<u16>) -> Result<(), TestCaseError> {
        match a {
            EagerAction::None => {}
            EagerAction::Hold => {}
            EagerAction::Drop => {
                if let Some(s) = slot_of_drop {
                    self.slots[s as usize].2 = false;
                }
            }
            EagerAction::Copy { slot, dst, len } => {
                let (hdr, data, busy) = &mut self.slots[slot as usize];
                prop_assert!(*busy, "copy from an empty slot");
                prop_assert_eq!(u64::from(hdr.size), len);
                let (rid, roff) = ((dst >> 32) as usize, dst & 0xffff_ffff);
                let dstm = &mut self.rmem[rid];
                prop_assert!(
                    (roff + len) as usize <= dstm.len(),
                    "eager copy past the buffer"
                );
                dstm[roff as usize..(roff + len) as usize].copy_from_slice(&data[..len as usize]);
                *busy = false;
                self.eager_taken += 1;
            }
        }
        Ok(())
    }

    /// The sender's resolution of its eager row; a resulting transmit goes on the wire.
    fn resolve(&mut self) -> Result<(), TestCaseError> {
        let row = self.fifo[self.send.current_row()];
        if let Resolved::Transmit(t) = self.send.resolve(&row).unwrap() {
            for op in t.ops() {
                self.to_receiver.push_back(Wire::Data(op, t.seq));
            }
        }
        Ok(())
    }
}

fn pattern(g: usize, b: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as usize * 31 + g * 7 + b * 13) as u8)
        .collect()
}

fn run(
    groups: Vec<Group>,
    choices: Vec<u8>,
    max_msg: u64,
    eager: (u16, u32),
    spread: (u32, u64),
) -> Result<(), TestCaseError> {
    let nb = groups.iter().map(|g| g.bufs.len()).max().unwrap_or(1);
    let id = |g: usize, b: usize| g * nb + b;
    let (eager_slots, eager_max) = eager;
    let mut sim = Sim {
        send: {
            let s = SendState::new(max_msg, 4096).with_eager(eager_slots, eager_max);
            if spread.0 > 0 {
                s.with_qps(spread.0, spread.1)
            } else {
                s
            }
        },
        recv: RecvState::new(),
        fifo: [[CtsEntry::default(); MAX_RECVS]; FIFO_DEPTH],
        sizes: [[0; MAX_RECVS]; FIFO_DEPTH],
        rmem: vec![Vec::new(); groups.len() * nb],
        smem: vec![Vec::new(); groups.len() * nb],
        to_sender: VecDeque::new(),
        to_receiver: VecDeque::new(),
        send_cq: VecDeque::new(),
        recv_cq: VecDeque::new(),
        slots: vec![(EagerHeader::default(), Vec::new(), false); usize::from(eager_slots)],
        eager_sent: 0,
        eager_taken: 0,
        held: None,
    };
    for (g, grp) in groups.iter().enumerate() {
        for (b, (&(cap, _), &s)) in grp.bufs.iter().zip(&grp.sends).enumerate() {
            sim.rmem[id(g, b)] = vec![0xEE; cap as usize];
            sim.smem[id(g, b)] = pattern(g, b, s);
        }
    }
    // progress cursors
    let (mut next_recv_post, mut next_send_group, mut next_send_in_group) =
        (0usize, 0usize, 0usize);
    let mut recv_reqs: VecDeque<(usize, u16)> = VecDeque::new();
    let mut send_reqs: VecDeque<(usize, usize, u16)> = VecDeque::new();
    let (mut recv_done, mut send_done) = (0usize, 0usize);
    let total_sends: usize = groups.iter().map(|g| g.bufs.len()).sum();
    let mut step = 0usize;
    // Work items: CTS rows, sends, tests, completions, and one wire op per chunk of every message.
    let chunks: u64 = groups
        .iter()
        .flat_map(|g| g.sends.iter())
        .map(|&s| s.div_ceil(max_msg) + 2)
        .sum();
    let step_limit = 24 * (chunks as usize + 8 * groups.len()) + 10_000;
    while recv_done < groups.len() || send_done < total_sends {
        step += 1;
        // Every action gets a turn at least once in 24 steps, so this bound is only hit when
        // nothing can move.
        prop_assert!(
            step < step_limit,
            "no progress: recv_done {recv_done} send_done {send_done}"
        );
        // random schedule, with every action getting a turn now and then so the run always ends
        let c = if step.is_multiple_of(3) {
            (step / 3) % 8
        } else {
            choices[step % choices.len()] as usize % 8
        };
        match c {
            0 if next_recv_post < groups.len() => {
                let g = next_recv_post;
                let bufs: Vec<RecvBuf> = groups[g]
                    .bufs
                    .iter()
                    .enumerate()
                    .map(|(b, &(cap, tag))| RecvBuf {
                        addr: addr(id(g, b), 0),
                        size: cap,
                        rkey: 1000 + g as u32,
                        tag,
                        host: groups[g].host,
                    })
                    .collect();
                let held = sim.held.take();
                match sim.recv.post(&bufs).unwrap() {
                    RecvPost::NotReady => prop_assert!(sim.recv.in_flight() as usize >= 1),
                    RecvPost::Posted {
                        req,
                        seq,
                        n,
                        entries,
                        eager,
                    } => {
                        prop_assert_eq!(seq as usize, g);
                        sim.apply(eager, held)?;
                        recv_reqs.push_back((g, req));
                        sim.to_sender.push_back(Wire::Cts {
                            seq,
                            n,
                            entries,
                            torn: false,
                        });
                        next_recv_post += 1;
                    }
                }
            }
            1 => {
                // deliver one CTS write (in order)
                if let Some(Wire::Cts {
                    seq,
                    n,
                    entries,
                    torn,
                }) = sim.to_sender.pop_front()
                {
                    let row = &mut sim.fifo[row_of(seq)];
                    if !torn && step % 3 == 1 {
                        // The write lands torn: new stamp and check, old address, size and key.
                        // The sender must not take it; the rest lands on a later step.
                        for (dst, src) in row[..n].iter_mut().zip(&entries[..n]) {
                            dst.stamp = src.stamp;
                            dst.check = src.check;
                            dst.nreqs = src.nreqs;
                        }
                        sim.to_sender.push_front(Wire::Cts {
                            seq,
                            n,
                            entries,
                            torn: true,
                        });
                    } else {
                        // a row may land in two halves: deliver the tail entries first half the time
                        if step % 2 == 1 && n > 1 {
                            row[1..n].copy_from_slice(&entries[1..n]);
                        }
                        row[..n].copy_from_slice(&entries[..n]);
                    }
                }
            }
            2 | 3 if next_send_group < groups.len() => {
                let g = next_send_group;
                let b = groups[g].order[next_send_in_group];
                let (_, tag) = groups[g].bufs[b];
                let size = groups[g].sends[b];
                sim.resolve()?;
                let row = sim.fifo[sim.send.current_row()];
                let msg = SendMsg {
                    addr: addr(id(g, b), 0),
                    lkey: 7,
                    size,
                    tag,
                    host: true,
                };
                match sim.send.post(&row, msg).unwrap() {
                    SendPost::NotReady => {}
                    SendPost::Eager { req, send } => {
                        prop_assert!(size <= u64::from(eager_max));
                        prop_assert_eq!(send.seq as usize, g);
                        prop_assert_eq!(
                            next_send_in_group,
                            0,
                            "only a row's first send goes eagerly"
                        );
                        sim.eager_sent += 1;
                        send_reqs.push_back((g, b, req));
                        next_send_in_group += 1;
                        if next_send_in_group == groups[g].bufs.len() {
                            next_send_group += 1;
                            next_send_in_group = 0;
                        }
                        sim.to_receiver.push_back(Wire::Eager {
                            slot: send.slot,
                            hdr: send.header(),
                            data: sim.smem[id(g, b)].clone(),
                        });
                        prop_assert_eq!(send.imm(), IMM_EAGER | u32::from(send.slot));
                    }
                    SendPost::Posted { req, transmit } => {
                        send_reqs.push_back((g, b, req));
                        next_send_in_group += 1;
                        if next_send_in_group == groups[g].bufs.len() {
                            next_send_group += 1;
                            next_send_in_group = 0;
                        }
                        if let Some(t) = transmit {
                            prop_assert_eq!(t.seq as usize, g);
                            let ops: Vec<WireOp> = t.ops().collect();
                            prop_assert_eq!(ops.len() as u32, t.wqe_count());
                            prop_assert!(
                                matches!(ops.last(), Some(WireOp::WriteImm { .. })),
                                "last op must carry the immediate"
                            );
                            for op in ops {
                                sim.to_receiver.push_back(Wire::Data(op, t.seq));
                            }
                        } else {
                            prop_assert!(
                                next_send_in_group != 0,
                                "the last send of a row transmits (unless its row was sent eagerly)"
                            );
                        }
                    }
                }
            }
            4 => {
                // the wire delivers one op to the receiver
                let w = sim.to_receiver.pop_front();
                if let Some(Wire::Eager { slot, hdr, data }) = w {
                    let s = &mut sim.slots[slot as usize];
                    prop_assert!(
                        !s.2,
                        "eager write into slot {} that still holds a message",
                        slot
                    );
                    *s = (hdr, data, true);
                    sim.recv_cq.push_back(IMM_EAGER | u32::from(slot));
                    sim.send_cq.push_back((true, hdr.seq));
                } else if let Some(Wire::Data(op, seq)) = w {
                    let mut copy = |local: u64,
                                    remote: u64,
                                    len: u32,
                                    rkey: u32|
                     -> Result<(), TestCaseError> {
                        let (sid, soff) = ((local >> 32) as usize, local & 0xffff_ffff);
                        let (rid, roff) = ((remote >> 32) as usize, remote & 0xffff_ffff);
                        prop_assert_eq!(rkey, 1000 + (rid / nb) as u32);
                        prop_assert!(len as u64 <= max_msg);
                        let src =
                            sim.smem[sid][soff as usize..(soff + len as u64) as usize].to_vec();
                        let dst = &mut sim.rmem[rid];
                        prop_assert!(
                            (roff + len as u64) as usize <= dst.len(),
                            "write past the receive buffer"
                        );
                        dst[roff as usize..(roff + len as u64) as usize].copy_from_slice(&src);
                        Ok(())
                    };
                    match op {
                        WireOp::Write {
                            local_addr,
                            remote_addr,
                            len,
                            rkey,
                            ..
                        } => copy(local_addr, remote_addr, len, rkey)?,
                        WireOp::WriteSizes { row, sizes, n } => {
                            sim.sizes[row][..n].copy_from_slice(&sizes[..n])
                        }
                        WireOp::WriteImm {
                            local_addr,
                            remote_addr,
                            len,
                            rkey,
                            imm,
                            ..
                        } => {
                            if len > 0 {
                                copy(local_addr, remote_addr, len, rkey)?;
                            }
                            sim.recv_cq.push_back(imm);
                            sim.send_cq.push_back((false, seq));
                        }
                    }
                }
            }
            5 => {
                if let Some((eager, seq)) = sim.send_cq.pop_front() {
                    if eager {
                        sim.send.on_eager_completion(seq).unwrap();
                    } else {
                        sim.send.on_completion(seq).unwrap();
                    }
                }
                if let Some(imm) = sim.recv_cq.pop_front() {
                    if imm & !IMM_EAGER_SLOT_MASK == IMM_EAGER {
                        let slot = (imm & IMM_EAGER_SLOT_MASK) as u16;
                        let hdr = sim.slots[slot as usize].0;
                        let a = sim.recv.on_eager(slot, hdr).unwrap();
                        if a == EagerAction::Hold {
                            prop_assert!(sim.held.is_none());
                            sim.held = Some(slot);
                        }
                        sim.apply(a, Some(slot))?;
                    } else {
                        let row = sim.sizes[row_of(sim.recv.next_done_seq())];
                        sim.recv.on_imm(imm, || row).unwrap();
                    }
                }
            }
            6 => {
                if let Some(&(g, req)) = recv_reqs.front() {
                    match sim.recv.test(req) {
                        Ok(None) => {}
                        Ok(Some((n, sizes))) => {
                            recv_reqs.pop_front();
                            recv_done += 1;
                            prop_assert_eq!(n, groups[g].bufs.len());
                            for b in 0..n {
                                let s = groups[g].sends[b];
                                prop_assert!(s <= groups[g].bufs[b].0);
                                prop_assert_eq!(sizes[b], s);
                                let got = &sim.rmem[id(g, b)];
                                prop_assert_eq!(&got[..s as usize], &pattern(g, b, s)[..]);
                                prop_assert!(
                                    got[s as usize..].iter().all(|&x| x == 0xEE),
                                    "bytes past the message"
                                );
                            }
                        }
                        Err(ProtoError::TruncatedByPeer { seq }) => {
                            recv_reqs.pop_front();
                            recv_done += 1;
                            prop_assert_eq!(seq as usize, g);
                            prop_assert!(groups[g]
                                .sends
                                .iter()
                                .zip(&groups[g].bufs)
                                .any(|(s, b)| *s > b.0));
                            for b in 0..groups[g].bufs.len() {
                                prop_assert!(
                                    sim.rmem[id(g, b)].iter().all(|&x| x == 0xEE),
                                    "truncated row wrote data"
                                );
                            }
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("recv test: {e}"))),
                    }
                }
            }
            _ => {
                sim.resolve()?;
                if let Some(&(g, b, req)) = send_reqs.front() {
                    match sim.send.test(req) {
                        Ok(None) => {}
                        Ok(Some(size)) => {
                            send_reqs.pop_front();
                            send_done += 1;
                            prop_assert_eq!(size, groups[g].sends[b]);
                            prop_assert!(groups[g]
                                .sends
                                .iter()
                                .zip(&groups[g].bufs)
                                .all(|(s, b)| *s <= b.0));
                        }
                        Err(ProtoError::Truncated { size, capacity }) => {
                            send_reqs.pop_front();
                            send_done += 1;
                            prop_assert!(size > capacity);
                            prop_assert!(groups[g]
                                .sends
                                .iter()
                                .zip(&groups[g].bufs)
                                .any(|(s, b)| *s > b.0));
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("send test: {e}"))),
                    }
                }
            }
        }
    }
    prop_assert_eq!(sim.send.sq_used(), 0);
    prop_assert_eq!(sim.recv.in_flight(), 0);
    prop_assert!(sim.eager_taken <= sim.eager_sent);
    prop_assert!(!sim.slots.iter().any(|s| s.2), "a slot was never drained");
    if eager_slots == 0 {
        prop_assert_eq!(sim.eager_sent, 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn protocol_matches_model(groups in prop::collection::vec(group(), 1..80),
                              choices in prop::collection::vec(any::<u8>(), 16..64),
                              max_msg in 1u64..128,
                              eager in (0u16..4, 0u32..400),
                              spread in (0u32..4, 0u64..600)) {
        run(groups, choices, max_msg, eager, spread)?;
    }
}

#[test]
fn single_small_message_folds_the_immediate_into_the_data() {
    let mut recv = RecvState::new();
    let mut send = SendState::new(1 << 30, 64);
    let RecvPost::Posted { entries, .. } = recv
        .post(&[RecvBuf {
            addr: 0x1000,
            size: 64,
            rkey: 5,
            tag: 3,
            host: true,
        }])
        .unwrap()
    else {
        panic!()
    };
    let mut row = [CtsEntry::default(); MAX_RECVS];
    row[0] = entries[0];
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send
        .post(
            &row,
            SendMsg {
                addr: 0x2000,
                lkey: 9,
                size: 8,
                tag: 3,
                host: true,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let ops: Vec<_> = t.ops().collect();
    assert_eq!(
        ops,
        vec![WireOp::WriteImm {
            local_addr: 0x2000,
            lkey: 9,
            remote_addr: 0x1000,
            rkey: 5,
            len: 8,
            imm: 8,
            host: true,
        }]
    );
}

#[test]
fn zero_byte_message_is_a_bare_immediate() {
    let mut recv = RecvState::new();
    let mut send = SendState::new(1 << 30, 64);
    let RecvPost::Posted { entries, req, .. } = recv
        .post(&[RecvBuf {
            addr: 0x1000,
            size: 64,
            rkey: 5,
            tag: 0,
            host: true,
        }])
        .unwrap()
    else {
        panic!()
    };
    let mut row = [CtsEntry::default(); MAX_RECVS];
    row[0] = entries[0];
    let SendPost::Posted {
        transmit: Some(t),
        req: sreq,
    } = send
        .post(
            &row,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 0,
                tag: 0,
                host: true,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let ops: Vec<_> = t.ops().collect();
    assert_eq!(
        ops,
        vec![WireOp::WriteImm {
            local_addr: 0,
            lkey: 0,
            remote_addr: 0x1000,
            rkey: 5,
            len: 0,
            imm: 0,
            host: true,
        }]
    );
    send.on_completion(0).unwrap();
    assert_eq!(send.test(sreq).unwrap(), Some(0));
    recv.on_imm(0, || unreachable!()).unwrap();
    assert_eq!(
        recv.test(req).unwrap().map(|(n, s)| (n, s[0])),
        Some((1, 0))
    );
}

#[test]
fn unknown_tag_and_bad_rows_are_errors() {
    let mut send = SendState::new(1 << 20, 64);
    let mut row = [CtsEntry::default(); MAX_RECVS];
    row[0] = CtsEntry {
        addr: 1,
        size: 8,
        rkey: 1,
        tag: 4,
        nreqs: 1,
        stamp: stamp(0),
        ..CtsEntry::default()
    }
    .sealed();
    let err = send
        .post(
            &row,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 1,
                tag: 5,
                host: true,
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        ProtoError::TagMismatch {
            tag: 5,
            posted: vec![4]
        }
    );
    let mut send = SendState::new(1 << 20, 64);
    row[0].nreqs = 9;
    row[0] = row[0].sealed();
    assert!(matches!(
        send.post(&row, SendMsg::default()),
        Err(ProtoError::Protocol(_))
    ));
    row[0].stamp = 0;
    assert_eq!(
        send.post(&row, SendMsg::default()).unwrap(),
        SendPost::NotReady
    );
}

#[test]
fn fifo_depth_bounds_outstanding_receives() {
    let mut recv = RecvState::new();
    let buf = [RecvBuf {
        addr: 0,
        size: 1,
        rkey: 1,
        tag: 0,
        host: true,
    }];
    for _ in 0..FIFO_DEPTH {
        assert!(matches!(recv.post(&buf).unwrap(), RecvPost::Posted { .. }));
    }
    assert_eq!(recv.post(&buf).unwrap(), RecvPost::NotReady);
    assert!(recv.post(&[]).is_err());
    assert!(recv.post(&[buf[0]; MAX_RECVS + 1]).is_err());
    assert!(matches!(recv.on_imm(1, || unreachable!()), Ok(0)));
    assert!(
        recv.on_imm(2, || unreachable!()).is_err(),
        "size above capacity"
    );
    assert_eq!(
        recv.post(&buf).unwrap(),
        RecvPost::NotReady,
        "row 0 is free only after test"
    );
    assert!(matches!(recv.test(0), Ok(Some((1, _)))));
    assert!(matches!(
        recv.post(&buf).unwrap(),
        RecvPost::Posted { seq: 32, .. }
    ));
    assert!(recv.test(0).unwrap().is_none());
}

#[test]
fn send_queue_room_is_respected() {
    let mut send = SendState::new(4, 3);
    let mut row = [CtsEntry::default(); MAX_RECVS];
    row[0] = CtsEntry {
        addr: 0,
        size: 100,
        rkey: 1,
        tag: 0,
        nreqs: 1,
        stamp: stamp(0),
        ..CtsEntry::default()
    }
    .sealed();
    // 16 bytes in chunks of 4 = 4 work requests > 3
    let err = send
        .post(
            &row,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 16,
                tag: 0,
                host: true,
            },
        )
        .unwrap_err();
    assert!(matches!(err, ProtoError::InvalidUsage(_)));
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send
        .post(
            &row,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 12,
                tag: 0,
                host: true,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(t.wqe_count(), 3);
    let mut row1 = [CtsEntry::default(); MAX_RECVS];
    row1[0] = CtsEntry {
        addr: 0,
        size: 100,
        rkey: 1,
        tag: 0,
        nreqs: 1,
        stamp: stamp(1),
        ..CtsEntry::default()
    }
    .sealed();
    assert_eq!(
        send.post(
            &row1,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 4,
                tag: 0,
                host: true,
            }
        )
        .unwrap(),
        SendPost::NotReady
    );
    send.on_completion(0).unwrap();
    assert!(matches!(
        send.post(
            &row1,
            SendMsg {
                addr: 0,
                lkey: 0,
                size: 4,
                tag: 0,
                host: true,
            }
        )
        .unwrap(),
        SendPost::Posted {
            transmit: Some(_),
            ..
        }
    ));
}

#[test]
fn a_send_for_a_later_row_waits_instead_of_failing() {
    // Row 0 offers tags 1 and 2; tag 1 posts twice before tag 2 posts once.
    let mut send = SendState::new(1 << 20, 64);
    let mut row = [CtsEntry::default(); MAX_RECVS];
    for (k, tag) in [1, 2].into_iter().enumerate() {
        row[k] = CtsEntry {
            addr: 0x1000 * (k as u64 + 1),
            size: 64,
            rkey: 1,
            tag,
            nreqs: 2,
            stamp: stamp(0),
            ..CtsEntry::default()
        }
        .sealed();
    }
    let msg = |tag| SendMsg {
        addr: 0,
        lkey: 0,
        size: 8,
        tag,
        host: true,
    };
    assert!(matches!(
        send.post(&row, msg(1)).unwrap(),
        SendPost::Posted { transmit: None, .. }
    ));
    assert_eq!(
        send.post(&row, msg(1)).unwrap(),
        SendPost::NotReady,
        "tag 1 already matched in row 0"
    );
    assert!(matches!(
        send.post(&row, msg(2)).unwrap(),
        SendPost::Posted {
            transmit: Some(_),
            ..
        }
    ));
    // a tag the row does not carry at all is still an error
    let mut send = SendState::new(1 << 20, 64);
    assert!(matches!(
        send.post(&row, msg(3)),
        Err(ProtoError::TagMismatch { .. })
    ));
}

#[test]
fn eager_send_is_held_then_copied_or_refused_by_the_row() {
    let mut recv = RecvState::new();
    let mut send = SendState::new(1 << 20, 64).with_eager(2, 64);
    let empty = [CtsEntry::default(); MAX_RECVS];
    let msg = |tag, size| SendMsg {
        addr: 0x9000,
        lkey: 9,
        size,
        tag,
        host: true,
    };
    let buf = |host| RecvBuf {
        addr: 0x1000,
        size: 64,
        rkey: 5,
        tag: 3,
        host,
    };

    // 1. No row yet: the send goes eagerly; the receiver holds it until the receive is posted.
    let SendPost::Eager { req: s0, send: e0 } = send.post(&empty, msg(3, 8)).unwrap() else {
        panic!("expected an eager send")
    };
    assert_eq!((e0.seq, e0.slot), (0, 0));
    assert_eq!(
        send.post(&empty, msg(3, 8)).unwrap(),
        SendPost::NotReady,
        "one row at a time goes ahead of its clear-to-send"
    );
    assert_eq!(recv.on_eager(e0.slot, e0.header()), Ok(EagerAction::Hold));
    let RecvPost::Posted {
        req: r0,
        entries,
        eager,
        ..
    } = recv.post(&[buf(true)]).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        eager,
        EagerAction::Copy {
            slot: 0,
            dst: 0x1000,
            len: 8
        }
    );
    assert_eq!(entries[0].eager_done, 1, "the row returns the slot");
    assert_eq!(recv.test(r0).unwrap().map(|(n, s)| (n, s[0])), Some((1, 8)));
    let mut row = empty;
    row[0] = entries[0];
    assert_eq!(send.resolve(&row), Ok(Resolved::Accepted));
    assert_eq!(send.test(s0), Ok(None), "the write has not completed");
    send.on_eager_completion(0).unwrap();
    assert_eq!(send.test(s0), Ok(Some(8)));

    // 2. A receive into GPU memory does not take eager messages: both sides drop the slot and
    //    the message goes the ordinary way, under the same request.
    let SendPost::Eager { req: s1, send: e1 } = send.post(&empty, msg(3, 16)).unwrap() else {
        panic!("expected an eager send")
    };
    assert_eq!((e1.seq, e1.slot), (1, 1));
    let RecvPost::Posted {
        req: r1,
        entries,
        eager,
        ..
    } = recv.post(&[buf(false)]).unwrap()
    else {
        panic!()
    };
    assert_eq!(eager, EagerAction::None);
    assert_eq!(entries[0].flags & CTS_EAGER_OK, 0);
    assert_eq!(recv.on_eager(e1.slot, e1.header()), Ok(EagerAction::Drop));
    assert_eq!(recv.eager_done(), 2);
    let mut row = empty;
    row[0] = entries[0];
    let Ok(Resolved::Transmit(t)) = send.resolve(&row) else {
        panic!("expected the refused message to be transmitted")
    };
    assert_eq!(
        t.ops().collect::<Vec<_>>(),
        vec![WireOp::WriteImm {
            local_addr: 0x9000,
            lkey: 9,
            remote_addr: 0x1000,
            rkey: 5,
            len: 16,
            imm: 16,
            host: true,
        }]
    );
    send.on_eager_completion(1).unwrap();
    assert_eq!(
        send.test(s1),
        Ok(None),
        "done only when the ordinary write completes"
    );
    send.on_completion(1).unwrap();
    assert_eq!(send.test(s1), Ok(Some(16)));
    recv.on_imm(16, || unreachable!()).unwrap();
    assert_eq!(
        recv.test(r1).unwrap().map(|(n, s)| (n, s[0])),
        Some((1, 16))
    );

    // 3. Out of order or damaged eager messages are the peer's fault.
    let mut bad = EagerHeader::new(7, 3, 8);
    assert!(matches!(
        recv.on_eager(0, bad),
        Err(ProtoError::Protocol(_))
    ));
    bad.size = 9;
    assert!(matches!(
        recv.on_eager(0, bad),
        Err(ProtoError::Protocol(_))
    ));
}

#[test]
fn spread_rows_split_messages_and_keep_the_immediate_apart() {
    let row = |size| {
        let mut row = [CtsEntry::default(); MAX_RECVS];
        row[0] = CtsEntry {
            addr: 0x1000,
            size,
            rkey: 5,
            tag: 0,
            nreqs: 1,
            stamp: stamp(0),
            ..CtsEntry::default()
        }
        .sealed();
        row
    };
    let msg = |size| SendMsg {
        addr: 0x8000,
        lkey: 9,
        size,
        tag: 0,
        host: true,
    };
    let write = |off: u64, len: u32| WireOp::Write {
        local_addr: 0x8000 + off,
        lkey: 9,
        remote_addr: 0x1000 + off,
        rkey: 5,
        len,
        host: true,
    };
    let imm = |imm| WireOp::WriteImm {
        local_addr: 0,
        lkey: 0,
        remote_addr: 0x1000,
        rkey: 5,
        len: 0,
        imm,
        host: true,
    };
    // Split over 4 QPs: four chunks of 250, then a bare immediate.
    let mut send = SendState::new(1 << 20, 64).with_qps(4, 1000);
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send.post(&row(4096), msg(1000)).unwrap()
    else {
        panic!()
    };
    assert!(t.spread());
    assert_eq!(
        t.ops().collect::<Vec<_>>(),
        vec![
            write(0, 250),
            write(250, 250),
            write(500, 250),
            write(750, 250),
            imm(1000)
        ]
    );
    assert_eq!(t.wqe_count(), 5);
    // Whole rows in turn (parts 1): one write, then a bare immediate.
    let mut send = SendState::new(1 << 20, 64).with_qps(1, 1000);
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send.post(&row(4096), msg(1000)).unwrap()
    else {
        panic!()
    };
    assert_eq!(t.ops().collect::<Vec<_>>(), vec![write(0, 1000), imm(1000)]);
    // Below the threshold nothing changes: the data carries the immediate.
    let mut send = SendState::new(1 << 20, 64).with_qps(4, 1000);
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send.post(&row(4096), msg(999)).unwrap()
    else {
        panic!()
    };
    assert!(!t.spread());
    assert_eq!(t.wqe_count(), 1);
}
