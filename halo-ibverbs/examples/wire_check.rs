//! Two-node wire check: one RC QP per node, connected over a real wire.
//!
//! Run one instance per node (e.g. `scripts/softroce run2 -- wire_check -- wire_check`):
//! - `HALO_GUEST_ROLE=a|b`, own address `HALO_GUEST_IP`, peer address `HALO_PEER_IP`;
//! - `HALO_RDMA_DEV` names the device (default: the first one), port 1.
//!
//! A listens on `HALO_GUEST_IP:18515`, B connects (retrying for up to two minutes); they swap QP
//! number, PSN, GID, MTU and a buffer (address, rkey) over that TCP connection. B then
//! RDMA-WRITEs-with-immediate its pattern into A's buffer and RDMA-READs A's pattern back; each
//! side verifies what it received and prints it.

use std::error::Error;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use halo_ibverbs::{
    devices, select_gid, AccessFlags, AddrFamily, CompletionQueue, Context, Gid, GidSelector,
    MemoryRegion, Mtu, QpCaps, RecvWr, RtrParams, RtsParams, SendOp, SendWr, Sge, WcOpcode,
    WorkCompletion,
};

const PORT: u8 = 1;
const TCP_PORT: u16 = 18515;
const LEN: usize = 64 * 1024;
const WAIT: Duration = Duration::from_secs(120);

type AnyResult<T> = Result<T, Box<dyn Error>>;

/// What each side tells the other, sent as fixed-size little-endian fields.
struct PeerInfo {
    qpn: u32,
    psn: u32,
    gid: Gid,
    mtu: u32,
    addr: u64,
    rkey: u32,
}

impl PeerInfo {
    const SIZE: usize = 4 + 4 + 16 + 4 + 8 + 4;

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid.0);
        b[24..28].copy_from_slice(&self.mtu.to_le_bytes());
        b[28..36].copy_from_slice(&self.addr.to_le_bytes());
        b[36..40].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Self::SIZE]) -> PeerInfo {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        PeerInfo {
            qpn: u32_at(0),
            psn: u32_at(4),
            gid: Gid(b[8..24].try_into().unwrap()),
            mtu: u32_at(24),
            addr: u64::from_le_bytes(b[28..36].try_into().unwrap()),
            rkey: u32_at(36),
        }
    }
}

fn env(name: &str) -> AnyResult<String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set").into())
}

fn connect_tcp(role: &str, own: IpAddr, peer: IpAddr) -> AnyResult<TcpStream> {
    let deadline = Instant::now() + WAIT;
    let stream = if role == "a" {
        let listener = TcpListener::bind(SocketAddr::new(own, TCP_PORT))?;
        listener.set_nonblocking(true)?;
        loop {
            match listener.accept() {
                Ok((s, from)) => {
                    eprintln!("accepted control connection from {from}");
                    s.set_nonblocking(false)?;
                    break s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() > deadline {
                return Err(
                    format!("no peer connected to {own}:{TCP_PORT} within {WAIT:?}").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        let target = SocketAddr::new(peer, TCP_PORT);
        loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("could not reach {target} within {WAIT:?}: {e}").into())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    };
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    Ok(stream)
}

fn next_completion(cq: &CompletionQueue, what: &str) -> AnyResult<WorkCompletion> {
    let start = Instant::now();
    let mut wc = [WorkCompletion::default(); 1];
    loop {
        if cq.poll(&mut wc)? == 1 {
            wc[0].check()?;
            return Ok(wc[0]);
        }
        if start.elapsed() > WAIT {
            return Err(format!("no completion for {what} within {WAIT:?}").into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn expect_byte(stream: &mut TcpStream, want: u8) -> AnyResult<()> {
    let mut b = [0u8; 1];
    stream.read_exact(&mut b)?;
    if b[0] != want {
        return Err(format!("peer sent {:?}, expected {:?}", b[0] as char, want as char).into());
    }
    Ok(())
}

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(13).wrapping_add(seed)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wire_check failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> AnyResult<()> {
    let role = env("HALO_GUEST_ROLE")?;
    if role != "a" && role != "b" {
        return Err(format!("HALO_GUEST_ROLE must be a or b, not {role:?}").into());
    }
    let own: IpAddr = env("HALO_GUEST_IP")?.parse()?;
    let peer: IpAddr = env("HALO_PEER_IP")?.parse()?;
    let dev = match std::env::var("HALO_RDMA_DEV") {
        Ok(name) => name,
        Err(_) => devices()?
            .first()
            .map(|d| d.name.clone())
            .ok_or("no RDMA device")?,
    };
    let ctx = Context::open(&dev)?;
    let port = ctx.query_port(PORT)?;
    let table = ctx.gid_table(PORT)?;
    let sel = GidSelector {
        index: None,
        roce_version: 2,
        family: Some(if own.is_ipv4() {
            AddrFamily::V4
        } else {
            AddrFamily::V6
        }),
        subnet: Some((own, if own.is_ipv4() { 32 } else { 128 })),
    };
    let gid = select_gid(&table, &sel)
        .ok_or_else(|| format!("no RoCE v2 GID for {own} on {dev}: {table:?}"))?
        .clone();
    eprintln!(
        "role {role}: {dev} port {PORT} active_mtu {} gid index {} ({})",
        port.active_mtu, gid.index, gid.gid
    );

    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(16, None)?;
    let caps = QpCaps {
        max_send_wr: 8,
        max_recv_wr: 8,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let qp = pd.create_rc_qp(&cq, &cq, caps)?;
    // [0, LEN): this side's pattern; [LEN, 2 LEN): what the peer writes or we read back.
    let seed = if role == "a" { 0x5A } else { 0xB7 };
    let mut buf: Box<[u8]> = (0..2 * LEN)
        .map(|i| if i < LEN { pattern(seed)(i) } else { 0 })
        .collect();
    let access = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
    // SAFETY: buf lives until the end of main and is dropped after mr (declared later).
    let mr: MemoryRegion = unsafe { pd.reg_mr(buf.as_mut_ptr(), buf.len(), access)? };
    let psn = if role == "a" { 0x0A_0000 } else { 0x0B_0000 };

    let mut stream = connect_tcp(&role, own, peer)?;
    let mine = PeerInfo {
        qpn: qp.qp_num(),
        psn,
        gid: gid.gid,
        mtu: port.active_mtu.bytes(),
        addr: mr.addr(),
        rkey: mr.rkey(),
    };
    stream.write_all(&mine.encode())?;
    let mut raw = [0u8; PeerInfo::SIZE];
    stream.read_exact(&mut raw)?;
    let theirs = PeerInfo::decode(&raw);
    let remote_mtu = Mtu::from_bytes(theirs.mtu).ok_or("peer sent an invalid MTU")?;
    let path_mtu = port.active_mtu.min(remote_mtu);
    eprintln!(
        "peer qp {:#x} gid {} mtu {}; path MTU {path_mtu}",
        theirs.qpn, theirs.gid, theirs.mtu
    );

    qp.to_init(PORT, access)?;
    if role == "a" {
        post_recv(&qp, &[RecvWr { wr_id: 1, sge: &[] }])?;
    }
    qp.to_rtr(&RtrParams::new(
        theirs.qpn, theirs.psn, theirs.gid, gid.index, PORT, path_mtu,
    ))?;
    qp.to_rts(&RtsParams::new(psn))?;
    // Neither side sends before the other is ready to receive.
    stream.write_all(b"R")?;
    expect_byte(&mut stream, b'R')?;

    let sge = |offset: usize| Sge {
        addr: mr.addr() + offset as u64,
        length: LEN as u32,
        lkey: mr.lkey(),
    };
    if role == "a" {
        let wc = next_completion(&cq, "the peer's WRITE_WITH_IMM")?;
        if wc.opcode != WcOpcode::RecvRdmaWithImm || wc.imm != Some(LEN as u32) {
            return Err(format!("unexpected completion {wc:?}").into());
        }
        let expected: Vec<u8> = (0..LEN).map(pattern(0xB7)).collect();
        if buf[LEN..] != expected[..] {
            return Err("bytes written by the peer differ from its pattern".into());
        }
        println!(
            "verified {LEN} bytes written by the peer, imm={:#x}",
            wc.imm.unwrap()
        );
        // Keep the buffer registered until the peer's READ is done.
        expect_byte(&mut stream, b'D')?;
    } else {
        post_send(
            &qp,
            &[SendWr {
                wr_id: 1,
                op: SendOp::WriteImm {
                    remote_addr: theirs.addr + LEN as u64,
                    rkey: theirs.rkey,
                    imm: LEN as u32,
                },
                sge: &[sge(0)],
                signaled: true,
                inline: false,
            }],
        )?;
        next_completion(&cq, "our WRITE_WITH_IMM")?;
        println!("wrote {LEN} bytes into the peer's buffer");
        post_send(
            &qp,
            &[SendWr {
                wr_id: 2,
                op: SendOp::Read {
                    remote_addr: theirs.addr,
                    rkey: theirs.rkey,
                },
                sge: &[sge(LEN)],
                signaled: true,
                inline: false,
            }],
        )?;
        next_completion(&cq, "our RDMA READ")?;
        let expected: Vec<u8> = (0..LEN).map(pattern(0x5A)).collect();
        if buf[LEN..] != expected[..] {
            return Err("bytes read from the peer differ from its pattern".into());
        }
        println!("verified {LEN} bytes read back from the peer");
        stream.write_all(b"D")?;
    }
    drop(qp);
    drop(mr);
    drop(buf);
    println!("wire check passed (role {role})");
    Ok(())
}

/// Posts send work requests whose buffers stay registered until the caller has polled their
/// completions (each test keeps its buffers to its end).
fn post_send(qp: &halo_ibverbs::QueuePair, wrs: &[SendWr<'_>]) -> halo_ibverbs::Result<()> {
    // SAFETY: see above; inline payloads live on the caller's stack during the call.
    unsafe { qp.post_send(wrs) }
}

/// Posts receive work requests under the same promise as [`post_send`].
fn post_recv(qp: &halo_ibverbs::QueuePair, wrs: &[RecvWr<'_>]) -> halo_ibverbs::Result<()> {
    // SAFETY: see [`post_send`].
    unsafe { qp.post_recv(wrs) }
}
