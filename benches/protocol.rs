//! Software overhead of the clear-to-send protocol core, with no device: one full message cycle
//! on both sides — irecv post (the FIFO row), isend post (matching, the transmit's work requests),
//! the send completion, the receive immediate, and `test` of every request on both sides — for a
//! single receive and an 8-buffer multi-receive — and one eager cycle (the send finds no row, goes
//! into a bounce slot, the receive takes it and the row confirms it). Throughput is in messages,
//! so criterion prints the time per message.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rccl_net_plugin::protocol::{
    CtsEntry, EagerAction, RecvBuf, RecvPost, RecvState, Resolved, SendMsg, SendPost, SendState,
    WireOp, MAX_RECVS,
};

/// One message cycle of `n` buffers; panics on any protocol error (a broken bench, not a cost).
fn cycle(send: &mut SendState, recv: &mut RecvState, bufs: &[RecvBuf], msgs: &[SendMsg]) {
    let RecvPost::Posted {
        req: rreq, entries, ..
    } = recv.post(bufs).expect("recv post")
    else {
        panic!("receive FIFO full");
    };
    // What the RDMA WRITE of the row leaves in the sender's FIFO.
    let row: [CtsEntry; MAX_RECVS] = entries;
    let mut sreqs = [0u16; MAX_RECVS];
    let mut transmit = None;
    for (i, m) in msgs.iter().enumerate() {
        match send.post(&row, *m).expect("send post") {
            SendPost::Posted { req, transmit: t } => {
                sreqs[i] = req;
                transmit = t.or(transmit);
            }
            SendPost::NotReady | SendPost::Eager { .. } => panic!("send not ready"),
        }
    }
    let t = transmit.expect("the last send completes the row");
    let (mut imm, mut sizes) = (0u32, [0u64; MAX_RECVS]);
    for op in t.ops() {
        match black_box(op) {
            WireOp::WriteSizes { sizes: s, .. } => sizes = s,
            WireOp::WriteImm { imm: i, .. } => imm = i,
            WireOp::Write { .. } => {}
        }
    }
    send.on_completion(t.seq).expect("send completion");
    let done = recv.on_imm(imm, || sizes).expect("immediate");
    assert_eq!(done, rreq);
    for &r in &sreqs[..msgs.len()] {
        black_box(send.test(r).expect("send test"));
    }
    black_box(recv.test(rreq).expect("recv test"));
}

/// One eager message cycle: the send goes before the receiver's row, which then confirms it.
fn eager_cycle(send: &mut SendState, recv: &mut RecvState, buf: &RecvBuf, msg: &SendMsg) {
    let empty = [CtsEntry::default(); MAX_RECVS];
    let SendPost::Eager { req: sreq, send: e } = send.post(&empty, *msg).expect("send post") else {
        panic!("send did not go eagerly");
    };
    let RecvPost::Posted {
        req: rreq, entries, ..
    } = recv.post(std::slice::from_ref(buf)).expect("recv post")
    else {
        panic!("receive FIFO full");
    };
    let copy = recv.on_eager(e.slot, black_box(e.header())).expect("eager");
    assert!(matches!(copy, EagerAction::Copy { .. }));
    assert_eq!(send.resolve(&entries), Ok(Resolved::Accepted));
    send.on_eager_completion(e.seq).expect("eager completion");
    black_box(send.test(sreq).expect("send test"));
    black_box(recv.test(rreq).expect("recv test"));
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
                // Fields added later (e.g. placement hints) keep their defaults.
                ..SendMsg::default()
            })
            .collect();
        let mut send = SendState::new(1 << 30, 1024);
        let mut recv = RecvState::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("recvs", n), &n, |b, _| {
            b.iter(|| cycle(&mut send, &mut recv, &bufs, &msgs))
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
    let mut send = SendState::new(1 << 30, 1024).with_eager(8, 8192);
    let mut recv = RecvState::new();
    g.throughput(Throughput::Elements(1));
    g.bench_function("eager", |b| {
        b.iter(|| eager_cycle(&mut send, &mut recv, &buf, &msg))
    });
    g.finish();
}

criterion_group!(benches, protocol);
criterion_main!(benches);
