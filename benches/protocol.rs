//! Software overhead of the protocol core, with no device: one full message cycle through the
//! sender's and the receiver's state machines ([`Sender`], [`Receiver`]) — `irecv` (the
//! clear-to-send post), its delivery into the sender's FIFO, `isend` (matching and the
//! transmit's posts), delivery of the data, the send completion, the receive immediate, and
//! `test` of every request on both sides — for a single receive and an 8-buffer multi-receive,
//! and one eager cycle (the send finds no row and goes into a bounce slot; the receive takes it
//! and its row confirms it). Throughput is in messages, so criterion prints the time per message.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rccl_net_plugin::protocol::{
    CtsEntry, EagerHeader, Post, PostOp, PostSink, Receiver, RecvBuf, RecvConfig, RecvSink,
    SendConfig, SendMsg, Sender, FIFO_DEPTH, MAX_RECVS,
};

/// Both directions of a connection, delivered at once: the posts land in the peer's memory and
/// signaled ones leave a completion.
struct Loop {
    sizes: [[u64; MAX_RECVS]; FIFO_DEPTH],
    slot: EagerHeader,
    imms: [u32; 4],
    nimm: usize,
    send_done: [u64; 4],
    nsend: usize,
    recv_done: [u64; 4],
    nrecv: usize,
}

struct SendSide<'a>(&'a mut Loop);
/// The receiver's posts land in the sender's FIFO.
struct RecvSide<'a>(&'a mut Loop, &'a mut Fifo);

type Fifo = [[CtsEntry; MAX_RECVS]; FIFO_DEPTH];

impl PostSink for SendSide<'_> {
    fn post(&mut self, p: &Post<'_>) {
        let l = &mut *self.0;
        match black_box(p.op) {
            PostOp::Data { imm: Some(imm), .. } | PostOp::Eager { imm, .. } => {
                if let PostOp::Eager { header, .. } = p.op {
                    l.slot = header;
                }
                l.imms[l.nimm] = imm;
                l.nimm += 1;
            }
            PostOp::Sizes { row, sizes } => l.sizes[row][..sizes.len()].copy_from_slice(sizes),
            PostOp::Data { .. } => {}
            PostOp::Cts { .. } => panic!("the sender posted a clear-to-send row"),
        }
        if p.signaled {
            l.send_done[l.nsend] = p.wr_id;
            l.nsend += 1;
        }
    }
}

impl PostSink for RecvSide<'_> {
    fn post(&mut self, p: &Post<'_>) {
        let l = &mut *self.0;
        let PostOp::Cts { row, entries } = black_box(p.op) else {
            panic!("the receiver posted {p:?}");
        };
        self.1[row][..entries.len()].copy_from_slice(entries);
        if p.signaled {
            l.recv_done[l.nrecv] = p.wr_id;
            l.nrecv += 1;
        }
    }
}

impl RecvSink for RecvSide<'_> {
    fn copy_eager(&mut self, slot: u16, dst: u64, len: u64) {
        black_box((slot, dst, len));
    }

    fn dma_eager(&mut self, slot: u16, dst: u64, rkey: u32, len: u32) {
        panic!("the bench receives into host memory: no NIC copy of slot {slot} to {dst:#x} ({rkey:#x}, {len} B)");
    }
}

impl Loop {
    fn new() -> Box<Self> {
        Box::new(Loop {
            sizes: [[0; MAX_RECVS]; FIFO_DEPTH],
            slot: EagerHeader::default(),
            imms: [0; 4],
            nimm: 0,
            send_done: [0; 4],
            nsend: 0,
            recv_done: [0; 4],
            nrecv: 0,
        })
    }

    /// Polls both completion queues: the sender's, then the receiver's (its clear-to-send
    /// completions and the immediates).
    fn complete(&mut self, fifo: &mut Fifo, send: &mut Sender, recv: &mut Receiver) {
        for i in 0..std::mem::take(&mut self.nsend) {
            send.on_completion(self.send_done[i])
                .expect("send completion");
        }
        send.progress(|r, i| fifo[r][i], &mut SendSide(self))
            .expect("progress");
        for i in 0..std::mem::take(&mut self.nrecv) {
            recv.on_send_completion(self.recv_done[i])
                .expect("clear-to-send completion");
        }
        for i in 0..std::mem::take(&mut self.nimm) {
            let (imm, sizes, slot) = (self.imms[i], self.sizes, self.slot);
            recv.on_imm(imm, |r| sizes[r], |_| slot, &mut RecvSide(self, fifo))
                .expect("immediate");
        }
        black_box(recv.take_restock());
    }
}

/// One message cycle of `n` buffers; panics on any protocol error (a broken bench, not a cost).
fn cycle(
    l: &mut Loop,
    fifo: &mut Fifo,
    send: &mut Sender,
    recv: &mut Receiver,
    bufs: &[RecvBuf],
    msgs: &[SendMsg],
) {
    let rreq = recv
        .irecv(bufs, &mut RecvSide(l, fifo))
        .expect("irecv")
        .expect("receive FIFO full");
    let mut sreqs = [0u16; MAX_RECVS];
    for (i, m) in msgs.iter().enumerate() {
        sreqs[i] = send
            .isend(|r, i| fifo[r][i], *m, &mut SendSide(l))
            .expect("isend")
            .expect("send not ready");
    }
    l.complete(fifo, send, recv);
    for &r in &sreqs[..msgs.len()] {
        black_box(send.test(r).expect("send test").expect("send done"));
    }
    black_box(recv.test(rreq).expect("recv test").expect("receive done"));
}

/// One eager message cycle: the send goes before the receiver's row, which then confirms it.
fn eager_cycle(
    l: &mut Loop,
    fifo: &mut Fifo,
    send: &mut Sender,
    recv: &mut Receiver,
    buf: &RecvBuf,
    msg: &SendMsg,
) {
    let sreq = send
        .isend(|r, i| fifo[r][i], *msg, &mut SendSide(l))
        .expect("isend")
        .expect("send did not go eagerly");
    l.complete(fifo, send, recv);
    let rreq = recv
        .irecv(std::slice::from_ref(buf), &mut RecvSide(l, fifo))
        .expect("irecv")
        .expect("receive FIFO full");
    l.complete(fifo, send, recv);
    black_box(
        send.test(sreq)
            .expect("send test")
            .expect("eager send done"),
    );
    black_box(
        recv.test(rreq)
            .expect("recv test")
            .expect("eager receive done"),
    );
}

fn sender(eager: (u16, u32)) -> Sender {
    Sender::new(SendConfig {
        max_msg: 1 << 30,
        sq_depth: 1024,
        qps: 1,
        split: false,
        spread_min: 64 << 10,
        eager_slots: eager.0,
        eager_max: eager.1,
    })
}

fn receiver(eager: (u16, u32)) -> Receiver {
    Receiver::new(RecvConfig {
        sq_depth: 1024,
        eager_slots: eager.0,
        eager_max: eager.1,
    })
}

fn protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("message_cycle");
    for n in [1usize, 8] {
        let bufs: Vec<RecvBuf> = (0..n)
            .map(|i| RecvBuf {
                addr: 0x1000_0000 + (i as u64) * 0x10_0000,
                size: 65536,
                rkey: 0x77,
                tag: i as i32,
                host: true,
            })
            .collect();
        let msgs: Vec<SendMsg> = (0..n)
            .map(|i| SendMsg {
                addr: 0x2000_0000 + (i as u64) * 0x10_0000,
                lkey: 0x55,
                size: 4096,
                tag: i as i32,
                ..SendMsg::default()
            })
            .collect();
        let (mut l, mut send, mut recv) = (Loop::new(), sender((0, 0)), receiver((0, 0)));
        let mut fifo: Box<Fifo> = Box::new([[CtsEntry::default(); MAX_RECVS]; FIFO_DEPTH]);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("recvs", n), &n, |b, _| {
            b.iter(|| cycle(&mut l, &mut fifo, &mut send, &mut recv, &bufs, &msgs))
        });
    }
    let buf = RecvBuf {
        addr: 0x1000_0000,
        size: 65536,
        rkey: 0x77,
        tag: 0,
        host: true,
    };
    let msg = SendMsg {
        addr: 0x2000_0000,
        lkey: 0x55,
        size: 4096,
        tag: 0,
        host: true,
    };
    let (mut l, mut send, mut recv) = (Loop::new(), sender((8, 8192)), receiver((8, 8192)));
    let mut fifo: Box<Fifo> = Box::new([[CtsEntry::default(); MAX_RECVS]; FIFO_DEPTH]);
    g.throughput(Throughput::Elements(1));
    g.bench_function("eager", |b| {
        b.iter(|| eager_cycle(&mut l, &mut fifo, &mut send, &mut recv, &buf, &msg))
    });
    g.finish();
}

criterion_group!(benches, protocol);
criterion_main!(benches);
