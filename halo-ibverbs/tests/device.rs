//! Tests against a real RDMA device (Soft-RoCE in a guest: `scripts/softroce run -- ...`).
//!
//! Without a device each test prints `SKIPPED (no RDMA device): <name>` and passes, unless
//! `HALO_REQUIRE_RDMA=1`, in which case it fails. `HALO_RDMA_DEV` picks the device (default: the
//! first one). Two QPs on the same device talk to each other through the `::ffff:127.0.0.1` GID.

use std::time::{Duration, Instant};

use halo_ibverbs::{
    devices, select_gid, AccessFlags, AddrFamily, CompletionChannel, CompletionQueue, Context,
    GidEntry, GidSelector, LinkLayer, MemoryRegion, PortState, ProtectionDomain, QpCaps, QpState,
    QueuePair, RecvWr, RtrParams, RtsParams, SendOp, SendWr, Sge, VerbsError, WcError, WcOpcode,
    WcStatus, WorkCompletion, IPV4_LOOPBACK_NET, MAX_WRS_PER_POST,
};

const PORT: u8 = 1;
const POLL_LIMIT: Duration = Duration::from_secs(10);

fn open_device_or_skip(test: &str) -> Option<Context> {
    let list = match devices() {
        Ok(list) => list,
        Err(e @ (VerbsError::LibraryUnavailable | VerbsError::NoDevice)) => {
            if std::env::var("HALO_REQUIRE_RDMA").as_deref() == Ok("1") {
                panic!("{test}: HALO_REQUIRE_RDMA=1 but no RDMA device is usable: {e}");
            }
            eprintln!("SKIPPED (no RDMA device): {test}");
            return None;
        }
        Err(e) => panic!("{test}: listing RDMA devices failed: {e}"),
    };
    let name = std::env::var("HALO_RDMA_DEV").unwrap_or_else(|_| list[0].name.clone());
    Some(Context::open(&name).unwrap_or_else(|e| panic!("{test}: opening {name}: {e}")))
}

fn loopback_gid(ctx: &Context) -> GidEntry {
    let table = ctx.gid_table(PORT).expect("GID table");
    let sel = GidSelector {
        index: None,
        roce_version: 2,
        family: Some(AddrFamily::V4),
        subnet: Some(IPV4_LOOPBACK_NET),
    };
    select_gid(&table, &sel)
        .cloned()
        .unwrap_or_else(|| panic!("no RoCE v2 GID in 127.0.0.0/8 on {}: {table:?}", ctx.name()))
}

/// Host memory with its registration; the MR field comes first so it is dropped before the memory.
struct Buffer {
    mr: MemoryRegion,
    data: Box<[u8]>,
}

impl Buffer {
    fn new(pd: &ProtectionDomain, len: usize, fill: impl Fn(usize) -> u8) -> Buffer {
        let mut data: Box<[u8]> = (0..len).map(fill).collect();
        let access =
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
        // SAFETY: the memory is owned by the same Buffer and outlives the MR (dropped first).
        let mr = unsafe { pd.reg_mr(data.as_mut_ptr(), len, access) }.expect("reg_mr");
        Buffer { mr, data }
    }

    fn sge(&self, offset: usize, len: usize) -> Sge {
        Sge {
            addr: self.mr.addr() + offset as u64,
            length: len as u32,
            lkey: self.mr.lkey(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// Two RC QPs on one device, connected to each other, each with its own CQ.
struct Loopback {
    a: QueuePair,
    b: QueuePair,
    cq_a: CompletionQueue,
    cq_b: CompletionQueue,
    pd: ProtectionDomain,
}

impl Loopback {
    fn new(ctx: &Context, caps: QpCaps, channel_b: Option<&CompletionChannel>) -> Loopback {
        let gid = loopback_gid(ctx);
        let port = ctx.query_port(PORT).expect("query_port");
        let pd = ctx.alloc_pd().expect("alloc_pd");
        let cq_a = ctx.create_cq(64, None).expect("create_cq a");
        let cq_b = ctx.create_cq(64, channel_b).expect("create_cq b");
        let a = pd.create_rc_qp(&cq_a, &cq_a, caps).expect("create_rc_qp a");
        let b = pd.create_rc_qp(&cq_b, &cq_b, caps).expect("create_rc_qp b");
        let access =
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
        let (psn_a, psn_b) = (0x1000, 0x2000);
        for (qp, peer, my_psn, peer_psn) in [(&a, &b, psn_a, psn_b), (&b, &a, psn_b, psn_a)] {
            qp.to_init(PORT, access).expect("to_init");
            let mut rtr = RtrParams::new(
                peer.qp_num(),
                peer_psn,
                gid.gid,
                gid.index,
                PORT,
                port.active_mtu,
            );
            rtr.max_dest_rd_atomic = 4;
            qp.to_rtr(&rtr).expect("to_rtr");
            let mut rts = RtsParams::new(my_psn);
            rts.max_rd_atomic = 4;
            qp.to_rts(&rts).expect("to_rts");
            assert_eq!(qp.state().expect("state"), QpState::ReadyToSend);
        }
        Loopback {
            a,
            b,
            cq_a,
            cq_b,
            pd,
        }
    }
}

fn small_caps() -> QpCaps {
    QpCaps {
        max_send_wr: 32,
        max_recv_wr: 32,
        max_send_sge: 2,
        max_recv_sge: 2,
        max_inline_data: 64,
    }
}

/// Polls until one completion arrives, giving up after [`POLL_LIMIT`].
fn next_completion(cq: &CompletionQueue, what: &str) -> WorkCompletion {
    let start = Instant::now();
    let mut wc = [WorkCompletion::default(); 1];
    loop {
        if cq.poll(&mut wc).expect("poll_cq") == 1 {
            return wc[0];
        }
        if start.elapsed() > POLL_LIMIT {
            panic!("no completion for {what} within {POLL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(31).wrapping_add(seed)
}

#[test]
fn port_attributes_and_gid_table() {
    let Some(ctx) = open_device_or_skip("port_attributes_and_gid_table") else {
        return;
    };
    for d in devices().expect("devices") {
        eprintln!("device: {d:?}");
    }
    let dev = ctx.query_device().expect("query_device");
    eprintln!("device attrs of {}: {dev:?}", ctx.name());
    assert!(dev.phys_port_cnt >= 1);
    let port = ctx.query_port(PORT).expect("query_port");
    eprintln!("port {PORT} attrs: {port:?}");
    assert_eq!(port.state, PortState::Active);
    assert_eq!(port.link_layer, LinkLayer::Ethernet);
    assert!(port.active_mtu <= port.max_mtu);
    let table = ctx.gid_table(PORT).expect("gid_table");
    for e in &table {
        eprintln!("gid {e}");
    }
    let gid = loopback_gid(&ctx);
    eprintln!(
        "selected RoCE v2 GID for 127.0.0.0/8: index {} ({})",
        gid.index, gid.gid
    );
    assert_eq!(gid.gid.to_string(), "::ffff:127.0.0.1");
    assert_eq!(gid.ip, Some("127.0.0.1".parse().unwrap()));
}

#[test]
fn write_with_imm_then_read_back() {
    let Some(ctx) = open_device_or_skip("write_with_imm_then_read_back") else {
        return;
    };
    const LEN: usize = 10_000;
    const IMM: u32 = 0xC0FF_EE42;
    let lb = Loopback::new(&ctx, small_caps(), None);
    let src = Buffer::new(&lb.pd, LEN, pattern(7));
    let dst = Buffer::new(&lb.pd, LEN, |_| 0);
    let back = Buffer::new(&lb.pd, LEN, |_| 0);

    post_recv(
        &lb.b,
        &[RecvWr {
            wr_id: 100,
            sge: &[],
        }],
    )
    .expect("post_recv");
    // One chained post: an unsignaled WRITE of the first half, then WRITE_WITH_IMM of the rest.
    let half = LEN / 2;
    let first = [src.sge(0, half)];
    let second = [src.sge(half, LEN - half)];
    post_send(
        &lb.a,
        &[
            SendWr {
                wr_id: 1,
                op: SendOp::Write {
                    remote_addr: dst.mr.addr(),
                    rkey: dst.mr.rkey(),
                },
                sge: &first,
                signaled: false,
                inline: false,
            },
            SendWr {
                wr_id: 2,
                op: SendOp::WriteImm {
                    remote_addr: dst.mr.addr() + half as u64,
                    rkey: dst.mr.rkey(),
                    imm: IMM,
                },
                sge: &second,
                signaled: true,
                inline: false,
            },
        ],
    )
    .expect("post_send");

    let sent = next_completion(&lb.cq_a, "WRITE_WITH_IMM on the requester");
    sent.check().expect("requester completion");
    assert_eq!((sent.wr_id, sent.opcode), (2, WcOpcode::RdmaWrite));
    let got = next_completion(&lb.cq_b, "RECV_RDMA_WITH_IMM on the responder");
    got.check().expect("responder completion");
    assert_eq!(got.wr_id, 100);
    assert_eq!(got.opcode, WcOpcode::RecvRdmaWithImm);
    assert_eq!(got.imm, Some(IMM));
    assert_eq!(got.qp_num, lb.b.qp_num());
    assert_eq!(dst.bytes(), src.bytes(), "written bytes differ");
    eprintln!("verified {LEN} bytes, imm={:#x}", got.imm.unwrap());

    post_send(
        &lb.a,
        &[SendWr {
            wr_id: 3,
            op: SendOp::Read {
                remote_addr: dst.mr.addr(),
                rkey: dst.mr.rkey(),
            },
            sge: &[back.sge(0, LEN)],
            signaled: true,
            inline: false,
        }],
    )
    .expect("post_send READ");
    let read = next_completion(&lb.cq_a, "RDMA READ");
    read.check().expect("READ completion");
    assert_eq!((read.wr_id, read.opcode), (3, WcOpcode::RdmaRead));
    assert_eq!(back.bytes(), src.bytes(), "read-back bytes differ");
    eprintln!("verified {LEN} bytes read back with RDMA READ");
}

#[test]
fn send_recv_inline_send_and_completion_channel() {
    let Some(ctx) = open_device_or_skip("send_recv_inline_send_and_completion_channel") else {
        return;
    };
    let channel = ctx.create_comp_channel().expect("create_comp_channel");
    let lb = Loopback::new(&ctx, small_caps(), Some(&channel));
    let granted = lb.a.caps();
    eprintln!("granted caps: {granted:?}");
    assert!(granted.max_inline_data >= 64, "max_inline_data {granted:?}");

    let src = Buffer::new(&lb.pd, 200, pattern(3));
    let recv = Buffer::new(&lb.pd, 512, |_| 0);
    post_recv(
        &lb.b,
        &[
            RecvWr {
                wr_id: 10,
                sge: &[recv.sge(0, 256)],
            },
            RecvWr {
                wr_id: 11,
                sge: &[recv.sge(256, 256)],
            },
        ],
    )
    .expect("post_recv");
    lb.cq_b.req_notify(false).expect("req_notify");

    // The inline payload lives on the stack, in no registered memory.
    let inline_payload: [u8; 48] = std::array::from_fn(|i| 0xA0 ^ i as u8);
    let inline_sge = [Sge {
        addr: inline_payload.as_ptr() as u64,
        length: inline_payload.len() as u32,
        lkey: 0,
    }];
    post_send(
        &lb.a,
        &[
            SendWr {
                wr_id: 20,
                op: SendOp::Send,
                sge: &[src.sge(0, 200)],
                signaled: true,
                inline: false,
            },
            SendWr {
                wr_id: 21,
                op: SendOp::SendImm { imm: 0x1234_5678 },
                sge: &inline_sge,
                signaled: true,
                inline: true,
            },
        ],
    )
    .expect("post_send");

    assert!(
        channel.wait(POLL_LIMIT).expect("channel wait"),
        "no completion event within {POLL_LIMIT:?}"
    );
    eprintln!("completion channel fd {} signalled", channel.fd());
    let first = next_completion(&lb.cq_b, "first RECV");
    first.check().expect("first RECV");
    assert_eq!(
        (first.wr_id, first.opcode, first.byte_len),
        (10, WcOpcode::Recv, 200)
    );
    assert_eq!(first.imm, None);
    assert_eq!(&recv.bytes()[..200], src.bytes());
    eprintln!("verified SEND/RECV of 200 bytes");
    let second = next_completion(&lb.cq_b, "inline RECV");
    second.check().expect("inline RECV");
    assert_eq!((second.wr_id, second.byte_len), (11, 48));
    assert_eq!(second.imm, Some(0x1234_5678));
    assert_eq!(&recv.bytes()[256..304], &inline_payload);
    eprintln!(
        "verified inline SEND of 48 bytes, imm={:#x} (max_inline_data {})",
        second.imm.unwrap(),
        granted.max_inline_data
    );
    for expect in [20, 21] {
        let wc = next_completion(&lb.cq_a, "SEND on the sender");
        wc.check().expect("sender completion");
        assert_eq!((wc.wr_id, wc.opcode), (expect, WcOpcode::Send));
    }

    // Limits are refused before reaching the provider.
    let too_big = [Sge {
        addr: src.mr.addr(),
        length: granted.max_inline_data + 1,
        lkey: 0,
    }];
    let inline_wr = SendWr {
        wr_id: 30,
        op: SendOp::Send,
        sge: &too_big,
        signaled: true,
        inline: true,
    };
    let err = post_send(&lb.a, &[inline_wr]).unwrap_err();
    assert!(matches!(err, VerbsError::InvalidArgument(_)), "{err}");
    eprintln!("refused as expected: {err}");
    let many = [RecvWr { wr_id: 0, sge: &[] }; MAX_WRS_PER_POST + 1];
    let err = post_recv(&lb.b, &many).unwrap_err();
    assert!(matches!(err, VerbsError::InvalidArgument(_)), "{err}");
    eprintln!("refused as expected: {err}");
}

#[test]
fn write_with_bad_rkey_fails_with_remote_access_error() {
    let Some(ctx) = open_device_or_skip("write_with_bad_rkey_fails_with_remote_access_error")
    else {
        return;
    };
    let lb = Loopback::new(&ctx, small_caps(), None);
    let src = Buffer::new(&lb.pd, 64, pattern(1));
    let dst = Buffer::new(&lb.pd, 64, |_| 0);
    post_send(
        &lb.a,
        &[SendWr {
            wr_id: 0xBAD,
            op: SendOp::Write {
                remote_addr: dst.mr.addr(),
                rkey: dst.mr.rkey() ^ 0x00ff_ff00,
            },
            sge: &[src.sge(0, 64)],
            signaled: true,
            inline: false,
        }],
    )
    .expect("post_send");
    let wc = next_completion(&lb.cq_a, "WRITE with a bad rkey");
    assert_eq!(wc.wr_id, 0xBAD);
    assert_eq!(wc.status, WcStatus::Error(WcError::RemoteAccessError));
    assert_eq!(wc.result(), Err(WcError::RemoteAccessError));
    let err = wc.check().unwrap_err();
    eprintln!("typed completion error: {err}");
    let state = lb.a.state().expect("query_qp");
    eprintln!(
        "requester QP {:#x} state after the error: {state:?}",
        lb.a.qp_num()
    );
    assert_eq!(state, QpState::Error);
    assert!(dst.bytes().iter().all(|&b| b == 0), "memory was written");
}

#[test]
fn dmabuf_registration_failure_is_reported() {
    let Some(ctx) = open_device_or_skip("dmabuf_registration_failure_is_reported") else {
        return;
    };
    let pd = ctx.alloc_pd().expect("alloc_pd");
    // A memfd is not a dma-buf: the call must fail cleanly (rxe has no dma-buf support at all).
    // SAFETY: memfd_create with a static NUL-terminated name has no preconditions.
    let fd = unsafe { libc::memfd_create(c"halo-not-a-dmabuf".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: the fd stays open until after the call; no region is expected to be created.
    let res = unsafe { pd.reg_dmabuf_mr(0, 4096, 0, fd, AccessFlags::LOCAL_WRITE) };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    match res {
        Err(
            e @ VerbsError::Os {
                op: "ibv_reg_dmabuf_mr",
                ..
            },
        ) => {
            eprintln!("dma-buf registration refused as expected: {e}")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(mr) => panic!("registered a memfd as a dma-buf: {mr:?}"),
    }
}

/// Posts send work requests whose buffers stay registered until the caller has polled their
/// completions (each test keeps its buffers to its end).
fn post_send(qp: &QueuePair, wrs: &[SendWr<'_>]) -> halo_ibverbs::Result<()> {
    // SAFETY: see above; inline payloads live on the caller's stack during the call.
    unsafe { qp.post_send(wrs) }
}

/// Posts receive work requests under the same promise as [`post_send`].
fn post_recv(qp: &QueuePair, wrs: &[RecvWr<'_>]) -> halo_ibverbs::Result<()> {
    // SAFETY: see [`post_send`].
    unsafe { qp.post_recv(wrs) }
}
