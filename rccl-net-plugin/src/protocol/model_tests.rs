//! The protocol core against a model of the connection: the sender's and the receiver's state
//! machines ([`Sender`], [`Receiver`]) exchange their posts over simulated queue pairs. Each
//! queue pair delivers in order; different queue pairs interleave at random. The model checks
//! what the real hardware would enforce or suffer:
//! - every byte sent lands once, in the buffer the tag picks, with the exact size reported on
//!   both sides, and only before the receive is reported done (an immediate that overtakes its
//!   data on another queue pair is caught);
//! - oversize sends fail on both sides and write nothing;
//! - no send queue ever holds more work requests than its depth, counting unsignaled ones until
//!   a later signaled one on the same queue pair completes;
//! - no WRITE_WITH_IMM arrives without a posted receive (the receive queue is restocked);
//! - no eager bounce slot is written while it still holds a message, and every eager message
//!   reaches its receive from the slot (by the CPU, or by a NIC copy into GPU memory);
//! - nothing reads a send's buffer after the send is reported done (the model overwrites it
//!   then);
//! - clear-to-send rows may land torn; the sender never acts on one.

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
                // Now and then tags too large for a bare eager immediate: a header goes along.
                prop::bool::weighted(0.2),
            )
        })
        .prop_map(|(sz, order, host, big_tags)| Group {
            host,
            bufs: sz
                .iter()
                .enumerate()
                .map(|(i, &(cap, _))| (cap, i as i32 * 7 + 1 + if big_tags { 600 } else { 0 }))
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

fn pattern(g: usize, b: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as usize * 31 + g * 7 + b * 13) as u8)
        .collect()
}

/// One simulated queue pair's send side: posted work requests on their way, and how many of
/// them still hold a send-queue slot.
#[derive(Default)]
struct SimQp {
    /// Work requests posted (their index is the position in this count).
    posted: u64,
    /// Work requests released by a polled signaled completion (all up to it).
    freed: u64,
    wire: VecDeque<(u64, Wr)>,
}

/// A work request on a simulated wire: the post with the rows and sizes it borrowed copied.
#[derive(Clone, Copy, Debug)]
struct Wr {
    qp: usize,
    wr_id: u64,
    signaled: bool,
    op: WrOp,
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
enum WrOp {
    /// A post that borrows nothing (data, eager writes).
    Plain(PostOp<'static>),
    Sizes {
        row: usize,
        sizes: [u64; MAX_RECVS],
        n: usize,
    },
    Cts {
        row: usize,
        entries: [CtsEntry; MAX_RECVS],
        n: usize,
    },
}

impl Wr {
    fn of(p: &Post<'_>) -> Wr {
        let op = match p.op {
            PostOp::Sizes { row, sizes } => {
                let mut a = [0u64; MAX_RECVS];
                a[..sizes.len()].copy_from_slice(sizes);
                WrOp::Sizes {
                    row,
                    sizes: a,
                    n: sizes.len(),
                }
            }
            PostOp::Cts { row, entries } => {
                let mut a = [CtsEntry::default(); MAX_RECVS];
                a[..entries.len()].copy_from_slice(entries);
                WrOp::Cts {
                    row,
                    entries: a,
                    n: entries.len(),
                }
            }
            PostOp::Data {
                local_addr,
                lkey,
                len,
                host,
                remote_addr,
                rkey,
                imm,
            } => WrOp::Plain(PostOp::Data {
                local_addr,
                lkey,
                len,
                host,
                remote_addr,
                rkey,
                imm,
            }),
            PostOp::Eager {
                slot,
                header,
                bare,
                local_addr,
                lkey,
                len,
                host,
                imm,
            } => WrOp::Plain(PostOp::Eager {
                slot,
                header,
                bare,
                local_addr,
                lkey,
                len,
                host,
                imm,
            }),
        };
        Wr {
            qp: p.qp,
            wr_id: p.wr_id,
            signaled: p.signaled,
            op,
        }
    }
}

/// The posting side of one end: its queue pairs and their depth. What the core posts goes on
/// the wires; a post beyond the send queue's depth is recorded as a violation.
struct SimEnd {
    qps: Vec<SimQp>,
    depth: u32,
    violation: Option<String>,
    /// Receiver only: eager copies asked for, carried out by the model right after the call.
    copies: Vec<(u16, u64, u64)>,
    /// Receiver only: slots dropped unread.
    released: Vec<u16>,
    /// Receiver only: NIC copies asked for (slot, destination, rkey, length), carried out by
    /// the model later, in any order with the other events.
    dmas: VecDeque<(u16, u64, u32, u32)>,
}

impl SimEnd {
    fn new(nqps: usize, depth: u32) -> Self {
        SimEnd {
            qps: (0..nqps).map(|_| SimQp::default()).collect(),
            depth,
            violation: None,
            copies: Vec::new(),
            released: Vec::new(),
            dmas: VecDeque::new(),
        }
    }

    fn free(&mut self, qp: usize, idx: u64) {
        let q = &mut self.qps[qp];
        q.freed = q.freed.max(idx + 1);
    }
}

impl PostSink for SimEnd {
    fn post(&mut self, p: &Post<'_>) {
        let Some(q) = self.qps.get_mut(p.qp) else {
            self.violation = Some(format!("post on QP {} of {}", p.qp, self.qps.len()));
            return;
        };
        q.posted += 1;
        if q.posted - q.freed > u64::from(self.depth) && self.violation.is_none() {
            self.violation = Some(format!(
                "QP {} holds {} work requests, its send queue {}",
                p.qp,
                q.posted - q.freed,
                self.depth
            ));
        }
        q.wire.push_back((q.posted - 1, Wr::of(p)));
    }
}

impl RecvSink for SimEnd {
    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64) {
        self.copies.push((slot, dst, len));
    }

    fn release_eager(&mut self, slot: u16) {
        self.released.push(slot);
    }

    fn dma_eager(&mut self, slot: u16, dst: u64, rkey: u32, len: u32) {
        self.dmas.push_back((slot, dst, rkey, len));
    }
}

/// Carries out the eager copies and drops the receiver asked for; returns the copies.
fn drain_eager(
    rx: &mut SimEnd,
    slots: &mut [(EagerHeader, Vec<u8>, bool)],
    rmem: &mut [Vec<u8>],
) -> Result<usize, TestCaseError> {
    let copies = rx.copies.len();
    for (slot, dst, len) in rx.copies.drain(..) {
        let (hdr, data, busy) = &mut slots[usize::from(slot)];
        prop_assert!(*busy, "copy from an empty slot");
        prop_assert_eq!(u64::from(hdr.size), len);
        let (rid, roff) = ((dst >> 32) as usize, (dst & 0xffff_ffff) as usize);
        prop_assert!(
            roff + len as usize <= rmem[rid].len(),
            "eager copy past the buffer"
        );
        rmem[rid][roff..roff + len as usize].copy_from_slice(&data[..len as usize]);
        *busy = false;
    }
    for slot in rx.released.drain(..) {
        let busy = &mut slots[usize::from(slot)].2;
        prop_assert!(*busy, "drop of an empty slot");
        *busy = false;
    }
    Ok(copies)
}

/// What a completion queue hands back: (queue pair, post index, wr_id) or an immediate.
#[derive(Clone, Copy, Debug)]
enum Cqe {
    Send(usize, u64, u64),
    Imm(u32),
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    max_msg: u64,
    eager_slots: u16,
    eager_max: u32,
    qps: usize,
    split: bool,
    spread_min: u64,
    send_depth: u32,
    recv_depth: u32,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1u64..128,
        (0u16..4, 0u32..400),
        (1usize..=4, any::<bool>(), 0u64..600),
        prop::sample::select(vec![64u32, 256, 4096]),
        prop::sample::select(vec![16u32, 64]),
    )
        .prop_map(
            |(max_msg, (eager_slots, eager_max), (qps, split, spread_min), sd, rd)| Setup {
                max_msg,
                eager_slots,
                eager_max,
                qps,
                split,
                spread_min,
                send_depth: sd,
                recv_depth: rd,
            },
        )
}

/// The order in which the sender posts its sends: every group's sends in the group's order, and
/// with `cross` some of them swapped with a neighbour of the next group (a send of a later
/// receive posted first).
fn send_order(groups: &[Group], choices: &[u8], cross: bool) -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, grp)| grp.order.iter().map(move |&b| (g, b)))
        .collect();
    if cross {
        for i in 0..order.len().saturating_sub(1) {
            let ((g1, b1), (g2, b2)) = (order[i], order[i + 1]);
            // Sends with the same tag match in posting order: those keep theirs.
            if choices[i % choices.len()].is_multiple_of(3)
                && g1 != g2
                && groups[g1].bufs[b1].1 != groups[g2].bufs[b2].1
            {
                order.swap(i, i + 1);
            }
        }
    }
    order
}

/// Sends the sender may try next when it retries in turn (`in_turn` of [`run`]).
const SEND_WINDOW: usize = 2 * MAX_RECVS;

/// Runs the model. The sender posts the sends in `order`: each turn it tries the first one not
/// posted yet, or, `in_turn`, the next of the first [`SEND_WINDOW`] not posted yet (after a NULL
/// request it moves on to the following one, as a proxy with several sends pending does); a send
/// never goes before an earlier one with the same tag.
fn run(groups: Vec<Group>, choices: Vec<u8>, s: Setup) -> Result<(), TestCaseError> {
    let order = send_order(&groups, &choices, false);
    run_with(groups, choices, s, order, false)
}

fn run_with(
    groups: Vec<Group>,
    choices: Vec<u8>,
    s: Setup,
    order: Vec<(usize, usize)>,
    in_turn: bool,
) -> Result<(), TestCaseError> {
    let nb = groups.iter().map(|g| g.bufs.len()).max().unwrap_or(1);
    let id = |g: usize, b: usize| g * nb + b;
    let eager_max = if s.eager_slots > 0 { s.eager_max } else { 0 };
    let mut sender = Sender::new(SendConfig {
        max_msg: s.max_msg,
        sq_depth: s.send_depth,
        qps: s.qps,
        split: s.split,
        spread_min: s.spread_min,
        eager_slots: s.eager_slots,
        eager_max,
    });
    let mut receiver = Receiver::new(RecvConfig {
        sq_depth: s.recv_depth,
        eager_slots: s.eager_slots,
        eager_max,
    });
    let mut tx = SimEnd::new(s.qps, s.send_depth);
    let mut rx = SimEnd::new(1, s.recv_depth);
    // The sender's FIFO memory, the receiver's sizes array, bounce slots and receive queue.
    let mut fifo = [[CtsEntry::default(); MAX_RECVS]; FIFO_DEPTH];
    let mut sizes = [[0u64; MAX_RECVS]; FIFO_DEPTH];
    let mut slots: Vec<(EagerHeader, Vec<u8>, bool)> =
        vec![(EagerHeader::default(), Vec::new(), false); usize::from(s.eager_slots)];
    // Sends that went eagerly: done once their write completed, whatever their row held.
    let mut eager_sends = std::collections::HashSet::new();
    let mut rq = RQ_STOCK;
    let (mut send_cq, mut recv_cq) = (VecDeque::<Cqe>::new(), VecDeque::<Cqe>::new());
    let mut rmem: Vec<Vec<u8>> = vec![Vec::new(); groups.len() * nb];
    let mut smem: Vec<Vec<u8>> = vec![Vec::new(); groups.len() * nb];
    for (g, grp) in groups.iter().enumerate() {
        for (b, (&(cap, _), &sz)) in grp.bufs.iter().zip(&grp.sends).enumerate() {
            rmem[id(g, b)] = vec![0xEE; cap as usize];
            smem[id(g, b)] = pattern(g, b, sz);
        }
    }
    let (mut eager_sent, mut eager_taken) = (0usize, 0usize);
    let mut next_recv_post = 0usize;
    // Sends not posted yet, in order, and the one to try next among the first SEND_WINDOW.
    let mut pending = order;
    let mut cursor = 0usize;
    let mut recv_reqs: VecDeque<(usize, u16)> = VecDeque::new();
    let mut send_reqs: VecDeque<(usize, usize, u16)> = VecDeque::new();
    let (mut recv_done, mut send_done) = (0usize, 0usize);
    // What the counters must show at the end: completions polled, successful requests and bytes.
    let (mut send_cqes, mut recv_cqes) = (0u64, 0u64);
    let (mut send_ok, mut send_bytes, mut recv_ok, mut recv_bytes) = (0u64, 0u64, 0u64, 0u64);
    let total_sends: usize = groups.iter().map(|g| g.bufs.len()).sum();
    let chunks: u64 = groups
        .iter()
        .flat_map(|g| g.sends.iter())
        .map(|&sz| sz.div_ceil(s.max_msg) + 2)
        .sum();
    const ACTIONS: usize = 10;
    let step_limit = 3 * ACTIONS * (chunks as usize + 8 * groups.len()) * s.qps + 10_000;
    let mut torn_pending: Option<(usize, [CtsEntry; MAX_RECVS], usize)> = None;
    let mut step = 0usize;

    // The sender's progress after completions. A row that needs more work requests than the
    // send queue holds would surface here (as it does in `isend`): this setup cannot carry it.
    macro_rules! sender_progress {
        () => {
            match sender.progress(|r, i| fifo[r][i], &mut tx) {
                Ok(()) => {}
                Err(ProtoError::InvalidUsage(why)) if why.contains("work requests") => {
                    return Ok(())
                }
                Err(e) => return Err(TestCaseError::fail(format!("progress: {e}"))),
            }
        };
    }

    macro_rules! check_sinks {
        () => {
            if let Some(v) = tx.violation.take().or(rx.violation.take()) {
                return Err(TestCaseError::fail(v));
            }
        };
    }

    while recv_done < groups.len() || send_done < total_sends {
        step += 1;
        prop_assert!(
            step < step_limit,
            "no progress: recv_done {recv_done} send_done {send_done}"
        );
        // Every action gets a turn now and then, so the run ends unless the protocol stalls.
        let c = if step.is_multiple_of(3) {
            (step / 3) % ACTIONS
        } else {
            choices[step % choices.len()] as usize % ACTIONS
        };
        let pick = choices[(step * 7 + 3) % choices.len()] as usize;
        match c {
            // The receiver posts the next group's receive.
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
                // As the comm does: the consumed receives go back before the row is offered.
                rq += receiver.take_restock();
                let r = receiver.irecv(&bufs, &mut rx).unwrap();
                check_sinks!();
                eager_taken += drain_eager(&mut rx, &mut slots, &mut rmem)?;
                if let Some(req) = r {
                    recv_reqs.push_back((g, req));
                    next_recv_post += 1;
                }
            }
            // The receiver's queue pair delivers one clear-to-send row into the sender's FIFO;
            // now and then it lands torn first (new stamp and check, stale address and size).
            1 => {
                if let Some((row, entries, n)) = torn_pending.take() {
                    fifo[row][..n].copy_from_slice(&entries[..n]);
                } else if let Some((idx, p)) = rx.qps[0].wire.pop_front() {
                    let WrOp::Cts { row, entries, n } = p.op else {
                        return Err(TestCaseError::fail(format!("receiver posted {p:?}")));
                    };
                    prop_assert_eq!(p.qp, 0);
                    if pick % 3 == 1 {
                        for (dst, src) in fifo[row][..n].iter_mut().zip(&entries[..n]) {
                            dst.stamp = src.stamp;
                            dst.check = src.check;
                            dst.nreqs = src.nreqs;
                        }
                        torn_pending = Some((row, entries, n));
                    } else {
                        if pick % 2 == 1 && n > 1 {
                            fifo[row][1..n].copy_from_slice(&entries[1..n]);
                        }
                        fifo[row][..n].copy_from_slice(&entries[..n]);
                    }
                    if p.signaled {
                        recv_cq.push_back(Cqe::Send(0, idx, p.wr_id));
                    }
                }
            }
            // The sender posts its next send.
            2 | 3 if !pending.is_empty() => {
                if !in_turn || cursor >= pending.len().min(SEND_WINDOW) {
                    cursor = 0;
                }
                let (g, b) = pending[cursor];
                let (_, tag) = groups[g].bufs[b];
                if pending[..cursor]
                    .iter()
                    .any(|&(g2, b2)| groups[g2].bufs[b2].1 == tag)
                {
                    cursor += 1;
                    continue;
                }
                let size = groups[g].sends[b];
                let msg = SendMsg {
                    addr: addr(id(g, b), 0),
                    lkey: 7,
                    size,
                    tag,
                    host: true,
                };
                let eager_before = sender.counters().eager_sent;
                // Half the sends try the one-step path first, as a send comm does (it posts the
                // answer itself); what it declines must be left for the general path unchanged.
                let one = if choices[step % choices.len()] & 1 == 0 {
                    match sender.isend_one(&|r: usize, i: usize| fifo[r][i], msg) {
                        Ok(Some((req, post))) => {
                            prop_assert!(post.signaled && post.qp == 0);
                            tx.post(&post);
                            Some(Ok(Some(req)))
                        }
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    }
                } else {
                    None
                };
                let answer = match one {
                    Some(a) => a,
                    None => sender.isend(|r, i| fifo[r][i], msg, &mut tx),
                };
                match answer {
                    Ok(None) => cursor += 1,
                    Ok(Some(req)) => {
                        if sender.counters().eager_sent > eager_before {
                            prop_assert!(size <= u64::from(eager_max));
                            eager_sends.insert((g, b));
                            prop_assert!(
                                in_turn
                                    || (b == groups[g].order[0]
                                        && pending.iter().all(|&(g2, _)| g2 >= g)),
                                "only a row's first send goes eagerly"
                            );
                            eager_sent += 1;
                        }
                        send_reqs.push_back((g, b, req));
                        pending.remove(cursor);
                    }
                    // A row that cannot fit the send queue at all: this setup cannot carry it.
                    Err(ProtoError::InvalidUsage(why)) if why.contains("work requests") => {
                        return Ok(())
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("isend: {e}"))),
                }
                check_sinks!();
            }
            // One of the sender's queue pairs delivers its oldest work request.
            4 => {
                let q = (0..s.qps)
                    .map(|k| (pick + k) % s.qps)
                    .find(|&q| !tx.qps[q].wire.is_empty());
                let Some(q) = q else { continue };
                let (idx, p) = tx.qps[q].wire.pop_front().unwrap();
                let mut copy =
                    |local: u64, remote: u64, len: u32, rkey: u32| -> Result<(), TestCaseError> {
                        let (sid, soff) = ((local >> 32) as usize, (local & 0xffff_ffff) as usize);
                        let (rid, roff) =
                            ((remote >> 32) as usize, (remote & 0xffff_ffff) as usize);
                        prop_assert_eq!(rkey, 1000 + (rid / nb) as u32);
                        prop_assert!(u64::from(len) <= s.max_msg);
                        let src = smem[sid][soff..soff + len as usize].to_vec();
                        prop_assert!(
                            roff + len as usize <= rmem[rid].len(),
                            "write past the receive buffer"
                        );
                        rmem[rid][roff..roff + len as usize].copy_from_slice(&src);
                        Ok(())
                    };
                match p.op {
                    WrOp::Plain(PostOp::Data {
                        local_addr,
                        lkey,
                        len,
                        remote_addr,
                        rkey,
                        imm,
                        ..
                    }) => {
                        if len > 0 {
                            prop_assert_eq!(lkey, 7);
                            copy(local_addr, remote_addr, len, rkey)?;
                        }
                        if let Some(imm) = imm {
                            prop_assert_eq!(q, 0, "an immediate on a data QP");
                            prop_assert!(rq > 0, "WRITE_WITH_IMM with no receive posted");
                            rq -= 1;
                            recv_cq.push_back(Cqe::Imm(imm));
                        }
                    }
                    WrOp::Sizes { row, sizes: sz, n } => {
                        prop_assert_eq!(q, 0, "sizes on a data QP");
                        sizes[row][..n].copy_from_slice(&sz[..n]);
                    }
                    WrOp::Plain(PostOp::Eager {
                        slot,
                        header,
                        local_addr,
                        len,
                        imm,
                        ..
                    }) => {
                        prop_assert_eq!(q, 0, "an eager write on a data QP");
                        let sl = &mut slots[usize::from(slot)];
                        prop_assert!(
                            !sl.2,
                            "eager write into slot {} that still holds a message",
                            slot
                        );
                        let (sid, soff) = (
                            (local_addr >> 32) as usize,
                            (local_addr & 0xffff_ffff) as usize,
                        );
                        let data = if len > 0 {
                            smem[sid][soff..soff + len as usize].to_vec()
                        } else {
                            Vec::new()
                        };
                        *sl = (header, data, true);
                        prop_assert!(rq > 0, "eager WRITE_WITH_IMM with no receive posted");
                        rq -= 1;
                        match BareEager::decode(imm) {
                            Some(b) => {
                                prop_assert_eq!(b.slot, slot);
                                prop_assert_eq!(b.size, len);
                                prop_assert_eq!(b.tag, header.tag);
                            }
                            None => prop_assert_eq!(imm, IMM_EAGER | u32::from(slot)),
                        }
                        recv_cq.push_back(Cqe::Imm(imm));
                    }
                    WrOp::Cts { .. } | WrOp::Plain(_) => {
                        return Err(TestCaseError::fail(format!("the sender posted {p:?}")))
                    }
                }
                if p.signaled {
                    send_cq.push_back(Cqe::Send(q, idx, p.wr_id));
                }
            }
            // The sender polls one completion, then lets the core move on.
            5 => {
                if let Some(Cqe::Send(q, idx, wr_id)) = send_cq.pop_front() {
                    send_cqes += 1;
                    tx.free(q, idx);
                    sender.on_completion(wr_id).unwrap();
                }
                sender_progress!();
                check_sinks!();
            }
            // The receiver polls one completion.
            6 => {
                match recv_cq.pop_front() {
                    Some(Cqe::Send(q, idx, wr_id)) => {
                        recv_cqes += 1;
                        rx.free(q, idx);
                        receiver.on_send_completion(wr_id).unwrap();
                    }
                    Some(Cqe::Imm(imm)) => {
                        recv_cqes += 1;
                        receiver
                            .on_imm(
                                imm,
                                |row| sizes[row],
                                |slot| slots[usize::from(slot)].0,
                                &mut rx,
                            )
                            .unwrap();
                        eager_taken += drain_eager(&mut rx, &mut slots, &mut rmem)?;
                    }
                    None => {}
                }
                check_sinks!();
            }
            // The receiver tests its oldest receive.
            7 => {
                if let Some(&(g, req)) = recv_reqs.front() {
                    match receiver.test(req) {
                        Ok(None) => {}
                        Ok(Some((n, got_sizes))) => {
                            recv_reqs.pop_front();
                            recv_done += 1;
                            recv_ok += 1;
                            recv_bytes += got_sizes[..n].iter().sum::<u64>();
                            prop_assert_eq!(n, groups[g].bufs.len());
                            for b in 0..n {
                                let sz = groups[g].sends[b];
                                prop_assert!(sz <= groups[g].bufs[b].0);
                                prop_assert_eq!(got_sizes[b], sz);
                                let got = &rmem[id(g, b)];
                                prop_assert_eq!(
                                    &got[..sz as usize],
                                    &pattern(g, b, sz)[..],
                                    "receive {} buffer {} done before its data landed",
                                    g,
                                    b
                                );
                                prop_assert!(
                                    got[sz as usize..].iter().all(|&x| x == 0xEE),
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
                                .any(|(sz, b)| *sz > b.0));
                            for b in 0..groups[g].bufs.len() {
                                // An eager message taken by one entry may have been read in
                                // before another entry's message proved too large.
                                let got = &rmem[id(g, b)];
                                let sz = groups[g].sends[b];
                                let untouched = got.iter().all(|&x| x == 0xEE);
                                let whole = sz <= groups[g].bufs[b].0
                                    && got[..sz as usize] == pattern(g, b, sz)[..]
                                    && got[sz as usize..].iter().all(|&x| x == 0xEE);
                                prop_assert!(untouched || whole, "truncated row wrote garbage");
                            }
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("recv test: {e}"))),
                    }
                }
            }
            // The NIC copies an eager message out of its slot into GPU memory.
            9 => {
                let Some((slot, dst, rkey, len)) = rx.dmas.pop_front() else {
                    continue;
                };
                let sl = &mut slots[usize::from(slot)];
                prop_assert!(sl.2, "NIC copy from empty slot {}", slot);
                prop_assert_eq!(sl.1.len(), len as usize);
                let (rid, roff) = ((dst >> 32) as usize, (dst & 0xffff_ffff) as usize);
                prop_assert_eq!(rkey, 1000 + (rid / nb) as u32);
                prop_assert!(!groups[rid / nb].host, "NIC copy into host memory");
                prop_assert!(
                    roff + len as usize <= rmem[rid].len(),
                    "NIC copy past the receive buffer"
                );
                rmem[rid][roff..roff + len as usize].copy_from_slice(&sl.1);
                sl.2 = false;
                receiver.on_eager_dma_done(slot).unwrap();
                eager_taken += 1;
                check_sinks!();
            }
            // The sender tests its oldest send.
            _ => {
                sender_progress!();
                check_sinks!();
                if let Some(&(g, b, req)) = send_reqs.front() {
                    match sender.test(req) {
                        Ok(None) => {}
                        Ok(Some(size)) => {
                            send_reqs.pop_front();
                            send_done += 1;
                            send_ok += 1;
                            send_bytes += size;
                            prop_assert_eq!(size, groups[g].sends[b]);
                            // An eager send is done before its row is known.
                            prop_assert!(
                                eager_sends.contains(&(g, b))
                                    || groups[g]
                                        .sends
                                        .iter()
                                        .zip(&groups[g].bufs)
                                        .all(|(sz, b)| *sz <= b.0)
                            );
                            // The caller may reuse the buffer now: nothing may read it later.
                            smem[id(g, b)].fill(0xA5);
                        }
                        Err(ProtoError::Truncated { size, capacity }) => {
                            send_reqs.pop_front();
                            send_done += 1;
                            prop_assert!(size > capacity);
                            prop_assert!(groups[g]
                                .sends
                                .iter()
                                .zip(&groups[g].bufs)
                                .any(|(sz, b)| *sz > b.0));
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("send test: {e}"))),
                    }
                }
            }
        }
    }
    // The last rows still on their way land, and the sender settles its last eager row.
    if let Some((row, entries, n)) = torn_pending.take() {
        fifo[row][..n].copy_from_slice(&entries[..n]);
    }
    while let Some((_, p)) = rx.qps[0].wire.pop_front() {
        let WrOp::Cts { row, entries, n } = p.op else {
            return Err(TestCaseError::fail(format!(
                "receiver left {p:?} undelivered"
            )));
        };
        fifo[row][..n].copy_from_slice(&entries[..n]);
    }
    sender_progress!();
    prop_assert_eq!(sender.sq_used(), 0);
    prop_assert_eq!(receiver.in_flight(), 0);
    prop_assert!(eager_taken <= eager_sent);
    prop_assert!(!slots.iter().any(|sl| sl.2), "a slot was never drained");
    if s.eager_slots == 0 {
        prop_assert_eq!(eager_sent, 0);
    }
    // The counters say what the run did.
    let (sc, rc) = (sender.counters(), receiver.counters());
    prop_assert_eq!(sc.wrs, tx.qps.iter().map(|q| q.posted).sum::<u64>());
    prop_assert_eq!(rc.wrs, rx.qps[0].posted);
    prop_assert_eq!(sc.cqes(), send_cqes);
    prop_assert_eq!(rc.cqes(), recv_cqes);
    prop_assert_eq!(
        (sc.cqe_cts, sc.cqe_imm, rc.cqe_transmit, rc.cqe_eager),
        (0, 0, 0, 0)
    );
    prop_assert!(rx.dmas.is_empty(), "a NIC copy was never carried out");
    prop_assert_eq!(receiver.eager_dmas(), 0);
    prop_assert_eq!((sc.msgs, sc.bytes), (send_ok, send_bytes));
    prop_assert_eq!((rc.msgs, rc.bytes), (recv_ok, recv_bytes));
    prop_assert_eq!(sc.eager_sent, eager_sent as u64);
    prop_assert_eq!(rc.eager_taken, eager_taken as u64);
    // Every eager message reached a receive; none was sent twice.
    prop_assert_eq!(sc.eager_accepted, sc.eager_sent);
    prop_assert_eq!(rc.eager_taken + rc.eager_dropped, sc.eager_sent);
    prop_assert!(sc.eager_carried <= sc.eager_sent);
    if s.qps == 1 {
        prop_assert_eq!(sc.cqe_landed, 0);
    }
    // Everything the sender posted is on the far side and released from its queues.
    for (q, qp) in tx.qps.iter().enumerate() {
        prop_assert!(qp.wire.is_empty(), "QP {} still carries work requests", q);
        prop_assert_eq!(
            qp.posted,
            qp.freed,
            "QP {} holds unsignaled work requests",
            q
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn protocol_matches_model(groups in prop::collection::vec(group(), 1..80),
                              choices in prop::collection::vec(any::<u8>(), 16..64),
                              s in setup()) {
        run(groups, choices, s)?;
    }

    /// Sends posted ahead of earlier receives' sends, retried in turn while NULL.
    #[test]
    fn protocol_matches_model_with_sends_for_later_receives(
        groups in prop::collection::vec(group(), 1..60),
        choices in prop::collection::vec(any::<u8>(), 16..64),
        s in setup()) {
        let order = send_order(&groups, &choices, true);
        run_with(groups, choices, s, order, true)?;
    }

    /// A receive of tag 8, then a grouped receive of tags 0..=7; the sends go in tag order
    /// 0..=8, each retried in turn while it gets a NULL request (aws-ofi-nccl's grouped_recv
    /// "Multi-Tag"). Tag 0..=7 belong to the second receive: NULL until tag 8 has taken the
    /// first. Everything completes with the right bytes, with and without the eager path
    /// (where tag 0 may go eagerly ahead of the first row and is refused by it).
    #[test]
    fn sends_for_a_later_grouped_receive_wait_for_it(
        caps in prop::collection::vec(1u64..200, 9),
        choices in prop::collection::vec(any::<u8>(), 16..64),
        s in setup()) {
        let groups = vec![
            Group {
                bufs: vec![(caps[8], 8)],
                sends: vec![caps[8] / 2],
                order: vec![0],
                host: true,
            },
            Group {
                bufs: (0..8).map(|t| (caps[t], t as i32)).collect(),
                sends: caps[..8].iter().map(|&c| c - c / 3).collect(),
                order: (0..8).collect(),
                host: true,
            },
        ];
        let order = (0..8).map(|b| (1, b)).chain([(0, 0)]).collect();
        run_with(groups, choices, s, order, true)?;
    }
}

/// `test` of a receive request as (count, sizes).
fn test_of(
    recv: &mut RecvState,
    req: u16,
) -> Result<Option<(usize, [u64; MAX_RECVS])>, ProtoError> {
    let mut sizes = [0; MAX_RECVS];
    Ok(recv.test_into(req, &mut sizes)?.map(|n| (n, sizes)))
}

/// The receiver's latest clear-to-send row as the sender's FIFO would hold it.
fn row_array(recv: &RecvState) -> [CtsEntry; MAX_RECVS] {
    let mut a = [CtsEntry::default(); MAX_RECVS];
    a[..recv.row().len()].copy_from_slice(recv.row());
    a
}

#[test]
fn single_small_message_folds_the_immediate_into_the_data() {
    let mut recv = RecvState::new();
    let mut send = SendState::new(1 << 30, 64);
    let RecvPost::Posted { .. } = recv
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
    let entries = row_array(&recv);
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
    let ops: Vec<_> = send.ops(&t).collect();
    assert_eq!(
        send.single_op(&t).as_ref(),
        ops.first(),
        "the fast path agrees"
    );
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
    let RecvPost::Posted { req, .. } = recv
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
    let entries = row_array(&recv);
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
    assert_eq!(
        send.wqe_count(&t),
        1,
        "a bare immediate is one work request"
    );
    let ops: Vec<_> = send.ops(&t).collect();
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
        test_of(&mut recv, req).unwrap().map(|(n, s)| (n, s[0])),
        Some((1, 0))
    );
}

#[test]
fn a_tag_the_row_lacks_waits_and_bad_rows_are_errors() {
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
    // Tag 5 may belong to a later receive: a NULL request, and the row still takes tag 4.
    let msg = |tag| SendMsg {
        addr: 0,
        lkey: 0,
        size: 1,
        tag,
        host: true,
    };
    assert_eq!(send.post(&row, msg(5)), Ok(SendPost::NotReady));
    assert!(matches!(
        send.post(&row, msg(4)),
        Ok(SendPost::Posted {
            transmit: Some(_),
            ..
        })
    ));
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
    assert!(matches!(test_of(&mut recv, 0), Ok(Some((1, _)))));
    assert!(matches!(
        recv.post(&buf).unwrap(),
        RecvPost::Posted { seq: 32, .. }
    ));
    assert!(test_of(&mut recv, 0).unwrap().is_none());
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
    assert_eq!(send.wqe_count(&t), 3);
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
    // A tag the row does not carry at all belongs to a later receive: NULL as well.
    let mut send = SendState::new(1 << 20, 64);
    assert_eq!(send.post(&row, msg(3)), Ok(SendPost::NotReady));
}

/// A send of `size` bytes of host memory with `tag`.
fn host_msg(tag: i32, size: u64) -> SendMsg {
    SendMsg {
        addr: 0x9000,
        lkey: 9,
        size,
        tag,
        host: true,
    }
}

#[test]
fn eager_send_is_done_at_its_write_and_the_receiver_takes_it() {
    let mut recv = RecvState::new().with_slots(4);
    let mut send = SendState::new(1 << 20, 64).with_eager(4, 64);
    let empty = [CtsEntry::default(); MAX_RECVS];
    let msg = host_msg;
    let buf = |addr, size, tag, host| RecvBuf {
        addr,
        size,
        rkey: 5,
        tag,
        host,
    };
    let row_of_recv = |recv: &RecvState| {
        let mut row = empty;
        row[..recv.row().len()].copy_from_slice(recv.row());
        row
    };

    // 1. No row yet: the send goes eagerly and is done once its write has completed, before
    //    any row; the receiver holds the message until the receive is posted, then copies it.
    let SendPost::Eager { req: s0, send: e0 } = send.post(&empty, msg(3, 8)).unwrap() else {
        panic!("expected an eager send")
    };
    assert_eq!((e0.seq, e0.slot), (0, 0));
    assert_eq!(
        send.post(&empty, msg(3, 8)).unwrap(),
        SendPost::NotReady,
        "one row at a time goes ahead of its clear-to-send"
    );
    assert_eq!(send.test(s0), Ok(None), "the write has not completed");
    send.on_eager_completion(0).unwrap();
    assert_eq!(send.test(s0), Ok(Some(8)));
    assert_eq!(recv.on_eager(e0.slot, e0.header()), Ok(EagerAction::Hold));
    let RecvPost::Posted { req: r0, eager, .. } = recv.post(&[buf(0x1000, 64, 3, true)]).unwrap()
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
    assert_eq!(recv.row()[0].eager_done, 1, "the row returns the slot");
    assert_eq!(
        test_of(&mut recv, r0).unwrap().map(|(n, s)| (n, s[0])),
        Some((1, 8))
    );
    assert_eq!(send.resolve(&row_of_recv(&recv)), Ok(Resolved::Accepted));
    assert_eq!(send.seq(), 1, "the row is complete without a transmit");

    // 2. A receive into GPU memory: the receiver reads the message back from the sender's
    //    copy; the receive is done when the read is.
    let SendPost::Eager { req: s1, send: e1 } = send.post(&empty, msg(3, 16)).unwrap() else {
        panic!("expected an eager send")
    };
    assert_eq!((e1.seq, e1.slot), (1, 1));
    send.on_eager_completion(1).unwrap();
    assert_eq!(send.test(s1), Ok(Some(16)));
    let RecvPost::Posted { req: r1, eager, .. } = recv.post(&[buf(0x1000, 64, 3, false)]).unwrap()
    else {
        panic!()
    };
    assert_eq!(eager, EagerAction::None);
    assert_eq!(
        recv.on_eager(e1.slot, e1.header()),
        Ok(EagerAction::Dma {
            slot: 1,
            dst: 0x1000,
            rkey: 5,
            len: 16
        })
    );
    assert_eq!(
        test_of(&mut recv, r1),
        Ok(None),
        "the NIC copy is on its way"
    );
    assert_eq!(
        recv.eager_done(),
        1,
        "the slot is busy until the NIC copy completes"
    );
    recv.on_dma_done(1).unwrap();
    assert_eq!(recv.eager_done(), 2);
    assert_eq!(
        test_of(&mut recv, r1).unwrap().map(|(n, s)| (n, s[0])),
        Some((1, 16))
    );
    assert!(matches!(
        recv.on_dma_done(1),
        Err(ProtoError::InvalidUsage(_))
    ));
    assert_eq!(send.resolve(&row_of_recv(&recv)), Ok(Resolved::Accepted));
    assert_eq!(recv.in_flight(), 0);

    // 3. A row without the message's tag: both sides carry it to the first later row with
    //    one, here a multi-receive whose second buffer (GPU memory) gets it by a NIC copy while
    //    the sender transmits only the other buffer's data (and both sizes).
    let SendPost::Eager { req: s2, send: e2 } = send.post(&empty, msg(5, 4)).unwrap() else {
        panic!("expected an eager send")
    };
    send.on_eager_completion(2).unwrap();
    assert_eq!(send.test(s2), Ok(Some(4)));
    let RecvPost::Posted { req: r2, .. } = recv.post(&[buf(0x1000, 64, 3, true)]).unwrap() else {
        panic!()
    };
    assert_eq!(recv.on_eager(e2.slot, e2.header()), Ok(EagerAction::Hold));
    assert_eq!(send.resolve(&row_of_recv(&recv)), Ok(Resolved::Carried));
    let SendPost::Posted {
        req: s3,
        transmit: Some(t),
    } = send.post(&row_of_recv(&recv), msg(3, 8)).unwrap()
    else {
        panic!("the row takes the next send of its tag")
    };
    assert_eq!(send.wqe_count(&t), 1);
    send.on_completion(2).unwrap();
    assert_eq!(send.test(s3), Ok(Some(8)));
    recv.on_imm(8, || unreachable!()).unwrap();
    assert_eq!(test_of(&mut recv, r2).unwrap().map(|(n, _)| n), Some(1));
    let RecvPost::Posted { req: r3, eager, .. } = recv
        .post(&[buf(0x2000, 64, 7, true), buf(0x3000, 64, 5, false)])
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        eager,
        EagerAction::Dma {
            slot: 2,
            dst: 0x3000,
            rkey: 5,
            len: 4
        },
        "the entry with the message's tag takes it"
    );
    let SendPost::Posted {
        req: s4,
        transmit: Some(t),
    } = send.post(&row_of_recv(&recv), msg(7, 10)).unwrap()
    else {
        panic!("the carried message fills its entry; this send completes the row")
    };
    let mut sizes = [0u64; MAX_RECVS];
    sizes[..2].copy_from_slice(&[10, 4]);
    assert_eq!(
        send.ops(&t).collect::<Vec<_>>(),
        vec![
            WireOp::Write {
                local_addr: 0x9000,
                lkey: 9,
                remote_addr: 0x2000,
                rkey: 5,
                len: 10,
                host: true,
            },
            WireOp::WriteSizes {
                row: 3,
                sizes,
                n: 2
            },
            WireOp::WriteImm {
                local_addr: 0,
                lkey: 0,
                remote_addr: 0x2000,
                rkey: 5,
                len: 0,
                imm: IMM_SIZES_IN_ARRAY,
                host: true,
            },
        ]
    );
    assert_eq!(send.wqe_count(&t), 3);
    assert_eq!(
        send.reqs_of(&t).1,
        1,
        "only the ordinary send is a request of the row"
    );
    send.on_completion(3).unwrap();
    assert_eq!(send.test(s4), Ok(Some(10)));
    recv.on_imm(IMM_SIZES_IN_ARRAY, || sizes).unwrap();
    assert_eq!(
        test_of(&mut recv, r3),
        Ok(None),
        "the NIC copy is still on its way"
    );
    recv.on_dma_done(2).unwrap();
    assert_eq!(
        test_of(&mut recv, r3)
            .unwrap()
            .map(|(n, s)| (n, s[0], s[1])),
        Some((2, 10, 4))
    );

    // 4. A message larger than its receive's buffer: the receive fails, the sender (done
    //    already) learns it from the row.
    let SendPost::Eager { req: s5, send: e5 } = send.post(&empty, msg(3, 60)).unwrap() else {
        panic!("expected an eager send")
    };
    send.on_eager_completion(4).unwrap();
    assert_eq!(send.test(s5), Ok(Some(60)));
    let RecvPost::Posted { req: r5, .. } = recv.post(&[buf(0x1000, 32, 3, true)]).unwrap() else {
        panic!()
    };
    assert_eq!(
        recv.on_eager(e5.slot, e5.header()),
        Ok(EagerAction::Drop { slot: e5.slot })
    );
    assert_eq!(
        test_of(&mut recv, r5),
        Err(ProtoError::TruncatedByPeer { seq: 4 })
    );
    assert_eq!(send.resolve(&row_of_recv(&recv)), Ok(Resolved::Accepted));
    assert_eq!(send.take_late_truncation(), Some((60, 32)));
    assert_eq!(send.take_late_truncation(), None);
    assert_eq!(recv.in_flight(), 0);

    // 5. Out of order or damaged eager messages are the peer's fault.
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
        send.ops(&t).collect::<Vec<_>>(),
        vec![
            write(0, 250),
            write(250, 250),
            write(500, 250),
            write(750, 250),
            imm(1000)
        ]
    );
    assert_eq!(send.wqe_count(&t), 5);
    // Whole rows in turn (parts 1): one write, then a bare immediate.
    let mut send = SendState::new(1 << 20, 64).with_qps(1, 1000);
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send.post(&row(4096), msg(1000)).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        send.ops(&t).collect::<Vec<_>>(),
        vec![write(0, 1000), imm(1000)]
    );
    // Below the threshold nothing changes: the data carries the immediate.
    let mut send = SendState::new(1 << 20, 64).with_qps(4, 1000);
    let SendPost::Posted {
        transmit: Some(t), ..
    } = send.post(&row(4096), msg(999)).unwrap()
    else {
        panic!()
    };
    assert!(!t.spread());
    assert_eq!(send.wqe_count(&t), 1);
}

#[test]
fn credits_come_back_in_the_order_the_sender_reuses_slots() {
    // Slot 0's message goes into GPU memory (a NIC copy), slot 1's into host memory (a CPU
    // copy, done at once): the sender may reuse neither until slot 0's copy has completed.
    let mut recv = RecvState::new().with_slots(2);
    let buf = |host| RecvBuf {
        addr: 0x1000,
        size: 64,
        rkey: 5,
        tag: 1,
        host,
    };
    recv.post(&[buf(false)]).unwrap();
    assert!(matches!(
        recv.on_eager(0, EagerHeader::new(0, 1, 8)),
        Ok(EagerAction::Dma { slot: 0, .. })
    ));
    let RecvPost::Posted { .. } = recv.post(&[buf(true)]).unwrap() else {
        panic!()
    };
    assert!(matches!(
        recv.on_eager(1, EagerHeader::new(1, 1, 8)),
        Ok(EagerAction::Copy { slot: 1, .. })
    ));
    assert_eq!(recv.eager_done(), 0, "slot 0 is still being copied");
    let RecvPost::Posted { .. } = recv.post(&[buf(true)]).unwrap() else {
        panic!()
    };
    assert_eq!(
        recv.row()[0].eager_done,
        0,
        "the row hands back no slot yet"
    );
    recv.on_dma_done(0).unwrap();
    assert_eq!(recv.eager_done(), 2, "both slots are free once the copy is");
}

#[test]
fn a_row_landing_while_a_message_is_carried_is_opened_by_the_carried_message() {
    // The carried message (tag 5) waits for a row with its tag. A later send of tag 5 must not
    // take that row's entry when the row lands between the two looks of one `post`.
    let mut send = SendState::new(1 << 20, 64).with_eager(2, 64);
    let empty = [CtsEntry::default(); MAX_RECVS];
    let msg = host_msg;
    let entry = |seq, tag| {
        CtsEntry {
            addr: 0x1000,
            size: 64,
            rkey: 5,
            tag,
            nreqs: 1,
            stamp: stamp(seq),
            ..CtsEntry::default()
        }
        .sealed()
    };
    let SendPost::Eager { .. } = send.post(&empty, msg(5, 8)).unwrap() else {
        panic!("expected an eager send")
    };
    send.on_eager_completion(0).unwrap();
    let mut row0 = empty;
    row0[0] = entry(0, 3);
    assert_eq!(send.resolve(&row0), Ok(Resolved::Carried));
    let SendPost::Posted {
        transmit: Some(_), ..
    } = send.post(&row0, msg(3, 8)).unwrap()
    else {
        panic!("row 0 takes the send of its tag")
    };
    send.on_completion(0).unwrap();
    // Row 1 (tag 5) lands after the carried message's look and before the new send's.
    let looks = std::cell::Cell::new(0);
    let landing = RowFn(|i| {
        looks.set(looks.get() + 1);
        if looks.get() <= 1 || i > 0 {
            CtsEntry::default()
        } else {
            entry(1, 5)
        }
    });
    assert_eq!(send.post(&landing, msg(5, 16)).unwrap(), SendPost::NotReady);
    assert!(
        send.has_carried(),
        "the row was not opened behind the carried message"
    );
    let mut row1 = empty;
    row1[0] = entry(1, 5);
    assert_eq!(send.post(&row1, msg(5, 16)).unwrap(), SendPost::NotReady);
    assert!(!send.has_carried(), "row 1 took the carried message");
    assert_eq!(send.seq(), 2, "and is complete without a transmit");
}
