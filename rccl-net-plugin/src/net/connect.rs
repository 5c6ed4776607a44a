//! listen / connect / accept: non-blocking state machines over the out-of-band TCP socket.
//!
//! connect                                  accept
//!   TCP connect ───────────────────────────▶ TCP accept
//!   hello{nonce} ──────────────────────────▶ this connection is the peer
//!   ConnInfo{QP, GID, FIFO} ───────────────▶ QP → RTR → RTS
//!   QP → RTR → RTS ◀──────────── ConnInfo{QP, GID, sizes array}
//!   "ready" ───────────────────────────────▶ comm returned
//!   comm returned
//!
//! Every step is a poll: RCCL calls again (with the same handle buffer for connect) until a comm
//! comes back. A deadline bounds the whole exchange. The hello goes out before the connecting side
//! builds its queue pairs (the slow part), so that a listener whose identified peer then goes away
//! fails its accept at once, as NCCL's own transport does once the peer's magic has arrived; a
//! connection that goes away before its hello is dropped and the listener keeps waiting.

use super::buffer::RegisteredBuf;
use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::flush::{Flush, EAGER_COPIES, FLUSH_SLOTS};
use super::link::Link;
use super::nap::NapConfig;
use super::poster::{Remote, Staging, Targets};
use super::recv_comm::{EagerRing, RecvComm, RecvParts};
use super::send_comm::{SendComm, SendParts};
use crate::config::{eager_max_for, recv_nap_for, PluginConfig};
use crate::log::{info, warn, NET};
use crate::oob::{ConnInfo, ListenHandle, OobConnector, OobListener, OobStream, QpInfo};
use crate::protocol::{
    check_peer_protocol, SendConfig, FEATURES, FIFO_DEPTH, INLINE_WANTED, MAX_QPS, MAX_RECVS,
    PROTOCOL_VERSION, SPREAD_MIN_BYTES,
};
use halo_ibverbs::{CompletionQueue, Gid, LinkLayer, Mtu, QpCaps, QueuePair, RtrParams, RtsParams};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::regcache::data_access;

const READY: &[u8] = b"ready";

// The connection info is part of the wire protocol: one version, one limit on queue pairs.
const _: () = assert!(crate::oob::CONN_INFO_VERSION == PROTOCOL_VERSION);
const _: () = assert!(crate::oob::MAX_QPS == MAX_QPS);

/// Per-connection settings: the device-wide config plus what the communicator overrides.
#[derive(Clone)]
pub struct ConnSettings {
    pub cfg: Arc<PluginConfig>,
    pub traffic_class: u8,
}

fn sys(what: impl std::fmt::Display) -> NetError {
    NetError::System(what.to_string())
}

fn random_psn() -> u32 {
    (crate::oob::random_u64().unwrap_or(0x5eed) as u32) & 0x00ff_ffff
}

/// Completion queue entries for a QP asking for `send_wr` + `recv_wr`. Devices may grant larger
/// queues (rounded up to a power of two), and a QP in error flushes every posted request, signaled
/// or not, into the CQ: leave room for the rounded sizes.
fn cq_depth(send_wr: u32, recv_wr: u32, max_cqe: u32) -> u32 {
    (send_wr.next_power_of_two() + recv_wr.next_power_of_two()).min(max_cqe.max(1))
}

/// A QP and CQ on `dev`, in INIT, without inline room (its writes read registered memory).
fn create_qp(
    dev: &NetDevice,
    send_wr: u32,
    recv_wr: u32,
) -> NetResult<(QueuePair, CompletionQueue)> {
    create_qps(dev, send_wr, recv_wr, 1, false).map(|(mut qps, cq)| (qps.remove(0), cq))
}

/// `n` QPs on `dev` sharing one CQ, in INIT. Only the first gets `recv_wr` receives; the others
/// carry RDMA WRITEs without immediates, which consume none. The CQ is sized for all of them.
/// `inline`: ask for inline room (`NCCL_IB_USE_INLINE`).
fn create_qps(
    dev: &NetDevice,
    send_wr: u32,
    recv_wr: u32,
    n: usize,
    inline: bool,
) -> NetResult<(Vec<QueuePair>, CompletionQueue)> {
    let max_wr = dev.dev_attr.max_qp_wr.max(1);
    let (send_wr, recv_wr) = (send_wr.min(max_wr), recv_wr.min(max_wr));
    let cq = dev
        .ctx
        .create_cq(
            (cq_depth(send_wr, recv_wr, dev.dev_attr.max_cqe) * n as u32)
                .min(dev.dev_attr.max_cqe.max(1)),
            None,
        )
        .map_err(|e| {
            sys(format!(
                "creating a completion queue on {}: {e}",
                dev.describe()
            ))
        })?;
    let mut qps = Vec::with_capacity(n);
    for i in 0..n {
        qps.push(create_qp_on(
            dev,
            &cq,
            send_wr,
            if i == 0 { recv_wr } else { 1 },
            inline,
        )?);
    }
    Ok((qps, cq))
}

fn create_qp_on(
    dev: &NetDevice,
    cq: &CompletionQueue,
    send_wr: u32,
    recv_wr: u32,
    inline: bool,
) -> NetResult<QueuePair> {
    let mut last_err = None;
    // With inline on (the default), ask for enough room for a whole clear-to-send row; take less
    // where the device offers less (Soft-RoCE: 256 bytes). Off, ask for none.
    let wanted: &[u32] = if inline {
        &[INLINE_WANTED, 256, 64, 0]
    } else {
        &[0]
    };
    for &inline in wanted {
        let caps = QpCaps {
            max_send_wr: send_wr,
            max_recv_wr: recv_wr,
            // An eager write gathers its header and the caller's data.
            max_send_sge: 2,
            max_recv_sge: 1,
            max_inline_data: inline,
        };
        match dev.pd.create_rc_qp(cq, cq, caps) {
            Ok(qp) => {
                qp.to_init(dev.port, data_access())
                    .map_err(|e| sys(format!("QP to INIT on {}: {e}", dev.describe())))?;
                return Ok(qp);
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(sys(format!(
        "creating an RC queue pair on {}: {}",
        dev.describe(),
        last_err.map(|e| e.to_string()).unwrap_or_default()
    )))
}

fn local_info(dev: &NetDevice, qps: &[QueuePair], psn: u32, nonce: u64, max_msg: u64) -> ConnInfo {
    ConnInfo {
        version: PROTOCOL_VERSION,
        features: FEATURES,
        nonce,
        gid: dev.gid.gid.0,
        gid_index: dev.gid.index,
        lid: dev.port_attr.lid,
        link_layer: u8::from(dev.port_attr.link_layer == LinkLayer::Ethernet),
        mtu_bytes: dev.port_attr.active_mtu.bytes(),
        max_msg_size: max_msg,
        qps: qps
            .iter()
            .map(|qp| QpInfo {
                qpn: qp.qp_num(),
                psn,
            })
            .collect(),
        fifo_addr: 0,
        fifo_rkey: 0,
        sizes_addr: 0,
        sizes_rkey: 0,
        fifo_depth: FIFO_DEPTH as u32,
        max_recvs: MAX_RECVS as u32,
        eager_addr: 0,
        eager_rkey: 0,
        eager_slots: 0,
        eager_max_kib: 0,
    }
}

/// Brings `qps[i]` to RTS against the peer's QP `i`, for every QP; the peer must have as many.
fn connect_qps(
    dev: &NetDevice,
    s: &ConnSettings,
    qps: &[QueuePair],
    my_psn: u32,
    peer: &ConnInfo,
    addr: impl std::fmt::Display + Copy,
) -> NetResult<()> {
    if peer.qps.len() != qps.len() {
        return Err(NetError::Remote(format!(
            "peer {addr} offers {} queue pairs for a connection of {}",
            peer.qps.len(),
            qps.len()
        )));
    }
    for (qp, remote) in qps.iter().zip(&peer.qps) {
        connect_qp(dev, s, qp, my_psn, peer, *remote, addr)?;
    }
    Ok(())
}

/// Brings `qp` to RTS against the peer's QP `remote`, on the path described by `peer`.
fn connect_qp(
    dev: &NetDevice,
    s: &ConnSettings,
    qp: &QueuePair,
    my_psn: u32,
    peer: &ConnInfo,
    remote: QpInfo,
    addr: impl std::fmt::Display,
) -> NetResult<()> {
    check_peer_protocol(peer.version, peer.features)
        .map_err(|why| NetError::Remote(format!("peer {addr}: {why}")))?;
    if peer.fifo_depth != FIFO_DEPTH as u32 || peer.max_recvs != MAX_RECVS as u32 {
        return Err(NetError::Remote(format!(
            "peer {addr} uses FIFO depth {} x {} receives, this build {FIFO_DEPTH} x {MAX_RECVS}",
            peer.fifo_depth, peer.max_recvs
        )));
    }
    let path_mtu =
        Mtu::at_most(peer.mtu_bytes.min(dev.port_attr.active_mtu.bytes())).unwrap_or(Mtu::Mtu1024);
    let ib = dev.port_attr.link_layer == LinkLayer::Infiniband;
    let mut rtr = RtrParams::new(
        remote.qpn,
        remote.psn,
        Gid(peer.gid),
        dev.gid.index,
        dev.port,
        path_mtu,
    );
    rtr.traffic_class = s.traffic_class;
    rtr.service_level = s.cfg.service_level;
    rtr.max_dest_rd_atomic = dev.dev_attr.max_qp_rd_atom.clamp(1, 16) as u8;
    if ib {
        rtr.dest_lid = peer.lid;
    }
    qp.to_rtr(&rtr).map_err(|e| {
        sys(format!(
            "QP {:#x} to RTR towards {addr} (remote qp {:#x}, mtu {}): {e}",
            qp.qp_num(),
            remote.qpn,
            path_mtu.bytes()
        ))
    })?;
    let mut rts = RtsParams::new(my_psn);
    rts.timeout = s.cfg.timeout;
    rts.retry_cnt = s.cfg.retry_cnt;
    rts.max_rd_atomic = dev.dev_attr.max_qp_init_rd_atom.clamp(1, 16) as u8;
    qp.to_rts(&rts)
        .map_err(|e| sys(format!("QP {:#x} to RTS towards {addr}: {e}", qp.qp_num())))?;
    Ok(())
}

/// The flush QP of a receive comm, connected to itself, when the device may receive into GPU
/// memory.
fn flush_qp(dev: &NetDevice, s: &ConnSettings) -> NetResult<Option<Flush>> {
    if !dev.gpu.gpu_receives() {
        return Ok(None);
    }
    new_flush(dev, s).map(Some)
}

/// A flush QP on `dev`, connected to itself, with its sink (also what the `init` probe opens).
pub(super) fn new_flush(dev: &NetDevice, s: &ConnSettings) -> NetResult<Flush> {
    // Flush READs, and the NIC's copies of eager messages into GPU memory.
    let (qp, cq) = create_qp(dev, (FLUSH_SLOTS + EAGER_COPIES) as u32, 1)?;
    let psn = random_psn();
    let me = local_info(
        dev,
        std::slice::from_ref(&qp),
        psn,
        0,
        dev.max_msg_size(&s.cfg),
    );
    connect_qp(dev, s, &qp, psn, &me, me.qps[0], "itself (flush QP)")?;
    let sink = RegisteredBuf::new(&dev.pd, FLUSH_SLOTS, "flush sink")?;
    Ok(Flush::new(qp, cq, sink))
}

fn oob_err(e: crate::oob::OobError) -> NetError {
    NetError::Remote(e.to_string())
}

// ---------------------------------------------------------------- connect (sender)

struct SendSide {
    /// QP 0 carries everything but spread data; the others only data.
    qps: Vec<QueuePair>,
    cq: CompletionQueue,
    psn: u32,
    fifo: RegisteredBuf,
    sizes_staging: RegisteredBuf,
    eager_headers: RegisteredBuf,
}

enum ConnectStage {
    Tcp(OobConnector),
    AwaitPeer(OobStream, SendSide),
    Finish(OobStream, SendSide, ConnInfo),
}

/// An outgoing connection in progress.
pub struct Connecting {
    dev: Arc<NetDevice>,
    settings: ConnSettings,
    handle: ListenHandle,
    stage: Option<ConnectStage>,
    deadline: Instant,
}

impl Connecting {
    pub fn start(
        dev: Arc<NetDevice>,
        settings: ConnSettings,
        handle: ListenHandle,
    ) -> NetResult<Self> {
        let connector =
            OobConnector::start(handle.addr, settings.cfg.connect_timeout).map_err(oob_err)?;
        Ok(Connecting {
            deadline: Instant::now() + settings.cfg.connect_timeout,
            dev,
            settings,
            handle,
            stage: Some(ConnectStage::Tcp(connector)),
        })
    }

    fn max_msg(&self) -> u64 {
        self.dev.max_msg_size(&self.settings.cfg)
    }

    /// One step; the comm once the connection is up.
    pub fn poll(&mut self) -> NetResult<Option<Box<SendComm>>> {
        let peer = self.handle.addr;
        if Instant::now() > self.deadline {
            return Err(NetError::Remote(format!(
                "connection to {peer} not established within {} ms (HALO_CONNECT_TIMEOUT_MS)",
                self.settings.cfg.connect_timeout.as_millis()
            )));
        }
        let stage = self
            .stage
            .take()
            .ok_or_else(|| NetError::Internal("connect polled after failure".into()))?;
        let next = match stage {
            ConnectStage::Tcp(mut c) => match c.poll().map_err(oob_err)? {
                None => ConnectStage::Tcp(c),
                Some(mut stream) => {
                    // Say who we are before the slow part (the queue pairs), so that the listener
                    // can tell our going away from a stray connection's.
                    stream
                        .queue_send(&ConnInfo::hello(self.handle.nonce, FEATURES))
                        .map_err(oob_err)?;
                    stream.poll_flush().map_err(oob_err)?;
                    let dev = &self.dev;
                    let sq = (FIFO_DEPTH * (MAX_RECVS + 4)) as u32;
                    let nqps = dev
                        .qps_per_connection(&self.settings.cfg)
                        .clamp(1, MAX_QPS as u32);
                    let (qps, cq) =
                        create_qps(dev, sq, 1, nqps as usize, self.settings.cfg.use_inline)?;
                    let fifo = RegisteredBuf::new(&dev.pd, SendComm::FIFO_BYTES, "send FIFO")?;
                    let sizes_staging =
                        RegisteredBuf::new(&dev.pd, RecvComm::SIZES_BYTES, "sizes staging")?;
                    let eager_headers = RegisteredBuf::new(
                        &dev.pd,
                        SendComm::EAGER_HEADER_STAGING_BYTES,
                        "eager header staging",
                    )?;
                    let psn = random_psn();
                    let mut info = local_info(dev, &qps, psn, self.handle.nonce, self.max_msg());
                    info.fifo_addr = fifo.addr();
                    info.fifo_rkey = fifo.rkey();
                    stream.queue_send(&info.encode()).map_err(oob_err)?;
                    ConnectStage::AwaitPeer(
                        stream,
                        SendSide {
                            qps,
                            cq,
                            psn,
                            fifo,
                            sizes_staging,
                            eager_headers,
                        },
                    )
                }
            },
            ConnectStage::AwaitPeer(mut stream, side) => {
                stream.poll_flush().map_err(oob_err)?;
                match stream.poll_recv().map_err(oob_err)? {
                    None => ConnectStage::AwaitPeer(stream, side),
                    Some(bytes) => {
                        if let Some((version, _)) = ConnInfo::preamble(&bytes) {
                            check_peer_protocol(version, FEATURES).map_err(|why| {
                                NetError::Remote(format!("connection to {peer} refused: {why}"))
                            })?;
                        }
                        let info = ConnInfo::decode(&bytes).map_err(|e| {
                            NetError::Remote(format!("bad connection info from {peer}: {e}"))
                        })?;
                        if info.nonce != self.handle.nonce {
                            return Err(NetError::Remote(format!(
                                "{peer} answered for another connection (nonce mismatch)"
                            )));
                        }
                        connect_qps(&self.dev, &self.settings, &side.qps, side.psn, &info, peer)?;
                        stream.queue_send(READY).map_err(oob_err)?;
                        ConnectStage::Finish(stream, side, info)
                    }
                }
            }
            ConnectStage::Finish(mut stream, side, info) => {
                if !stream.poll_flush().map_err(oob_err)? {
                    ConnectStage::Finish(stream, side, info)
                } else {
                    let max_msg = self.max_msg().min(info.max_msg_size.max(1));
                    info!(
                        NET,
                        "connected to {peer}: {} qp {:#x} -> remote qp {:#x}{}{}",
                        self.dev.describe(),
                        side.qps[0].qp_num(),
                        info.qps[0].qpn,
                        if side.qps.len() > 1 {
                            format!(" (+{} data QPs)", side.qps.len() - 1)
                        } else {
                            String::new()
                        },
                        match side.qps[0].caps().max_inline_data {
                            0 => String::new(),
                            n => format!(", {n} B inline"),
                        }
                    );
                    let link =
                        Link::new(Arc::clone(&self.dev), side.qps, side.cq, peer, stream, None);
                    let slot_max = u32::from(info.eager_max_kib) * 1024;
                    let cfg = SendConfig {
                        max_msg: max_msg.min(1 << 31),
                        sq_depth: link.qps[0].caps().max_send_wr,
                        qps: link.qps.len(),
                        split: self.settings.cfg.split_data_on_qps,
                        spread_min: SPREAD_MIN_BYTES,
                        // Header staging has room for our own slot count only.
                        eager_slots: info.eager_slots.min(EagerRing::SLOTS),
                        // Unset, the receiver decides (it knows whether we share its node).
                        eager_max: slot_max.min(self.settings.cfg.eager_max.unwrap_or(u32::MAX)),
                    };
                    return Ok(Some(SendComm::new(SendParts {
                        link,
                        fifo: side.fifo,
                        staging: Staging {
                            rows: side.sizes_staging,
                            eager_headers: Some(side.eager_headers),
                        },
                        targets: Targets {
                            fifo: Remote::default(),
                            sizes: Remote {
                                addr: info.sizes_addr,
                                rkey: info.sizes_rkey,
                            },
                            eager: Remote {
                                addr: info.eager_addr,
                                rkey: info.eager_rkey,
                            },
                            eager_slot_max: slot_max,
                        },
                        cfg,
                        stats: self.settings.cfg.stats,
                    })));
                }
            }
        };
        self.stage = Some(next);
        Ok(None)
    }
}

// ---------------------------------------------------------------- listen / accept (receiver)

struct RecvSide {
    qps: Vec<QueuePair>,
    cq: CompletionQueue,
    sizes: RegisteredBuf,
    cts_staging: RegisteredBuf,
    eager: Option<EagerRing>,
    flush: Option<Flush>,
    peer_info: ConnInfo,
    nap: NapConfig,
}

/// Connections a listen comm keeps waiting on at once; further ones wait in the backlog.
const MAX_CANDIDATES: usize = 16;

/// An accepted connection that has not sent its connection info yet.
struct Candidate {
    stream: OobStream,
    peer: SocketAddr,
    /// It sent the hello with this listener's nonce: it is the peer that holds the handle.
    identified: bool,
}

/// A listening endpoint; `accept` polls it.
pub struct ListenComm {
    pub dev: Arc<NetDevice>,
    settings: ConnSettings,
    listener: OobListener,
    nonce: u64,
    /// Connections that have not sent their info yet.
    candidates: Vec<Candidate>,
    /// The peer whose info matched: waiting for its ready message.
    chosen: Option<(OobStream, SocketAddr, Box<RecvSide>)>,
    /// Why the last dropped connection was dropped (for the timeout message).
    last_refused: Option<String>,
    /// When the accept in progress gives up: set by its first poll, cleared when it hands out a
    /// comm, so that each accept on a reused listen comm has the whole timeout.
    deadline: Option<Instant>,
}

impl ListenComm {
    pub fn bind(
        dev: Arc<NetDevice>,
        settings: ConnSettings,
        ip: std::net::IpAddr,
    ) -> NetResult<(Box<Self>, ListenHandle)> {
        let (listener, addr) = OobListener::bind(ip)
            .map_err(|e| sys(format!("listen on {ip} for {}: {e}", dev.describe())))?;
        let nonce =
            crate::oob::random_u64().map_err(|e| sys(format!("reading random bytes: {e}")))?;
        let handle = ListenHandle {
            addr,
            nonce,
            dev: dev.index as u32,
        };
        Ok((
            Box::new(ListenComm {
                dev,
                settings,
                listener,
                nonce,
                candidates: Vec::new(),
                chosen: None,
                last_refused: None,
                deadline: None,
            }),
            handle,
        ))
    }

    /// One step of `accept`; the comm once a connection is up.
    ///
    /// Every incoming TCP connection is a candidate until it sends connection info for this
    /// listener's handle. One that closes, sends garbage or another handle's nonce before it
    /// has identified itself (its hello) is dropped with a warning, so a stray connection never
    /// holds up the real peer, and the listener keeps waiting. One that identified itself as
    /// the peer and then closes fails the accept at once: the peer holding the handle is gone.
    pub fn poll_accept(&mut self) -> NetResult<Option<Box<RecvComm>>> {
        let now = Instant::now();
        let deadline = *self
            .deadline
            .get_or_insert(now + self.settings.cfg.connect_timeout);
        if now > deadline {
            return Err(NetError::Remote(format!(
                "no peer completed a connection to {} within {} ms (HALO_CONNECT_TIMEOUT_MS){}",
                self.listener.local_addr(),
                self.settings.cfg.connect_timeout.as_millis(),
                match &self.last_refused {
                    Some(why) => format!("; last connection refused: {why}"),
                    None => String::new(),
                }
            )));
        }
        if let Some((stream, peer, side)) = self.chosen.take() {
            return self.finish(stream, peer, side);
        }
        while self.candidates.len() < MAX_CANDIDATES {
            match self.listener.poll_accept().map_err(oob_err)? {
                Some(stream) => {
                    let peer = stream.peer_addr();
                    self.candidates.push(Candidate {
                        stream,
                        peer,
                        identified: false,
                    });
                }
                None => break,
            }
        }
        let mut i = 0;
        while i < self.candidates.len() {
            let got = self.candidates[i].stream.poll_recv();
            if let Ok(Some(bytes)) = &got {
                if ConnInfo::parse_hello(bytes) == Some(self.nonce) {
                    let c = &mut self.candidates[i];
                    c.identified = true;
                    info!(
                        NET,
                        "{} identified itself to {}; waiting for its connection info",
                        c.peer,
                        self.listener.local_addr()
                    );
                    // Its connection info may be there already: look again.
                    continue;
                }
            }
            let Candidate {
                mut stream,
                peer,
                identified,
            } = match got {
                Ok(None) => {
                    i += 1;
                    continue;
                }
                _ => self.candidates.swap_remove(i),
            };
            if let Ok(Some(bytes)) = &got {
                self.refuse_other_version(&mut stream, peer, bytes)?;
            }
            let info = match got.map_err(|e| e.to_string()).and_then(|b| {
                let info = ConnInfo::decode(&b.unwrap_or_default())
                    .map_err(|e| format!("bad connection info: {e}"))?;
                if info.nonce != self.nonce {
                    return Err("it holds the handle of another listener (nonce mismatch)".into());
                }
                Ok(info)
            }) {
                Ok(info) => info,
                Err(why) if identified => {
                    return Err(NetError::Remote(format!(
                        "the peer {peer} identified itself to {} and then failed before \
                         completing the connection: {why}",
                        self.listener.local_addr()
                    )));
                }
                Err(why) => {
                    let why = format!("{peer}: {why}");
                    warn!(
                        NET,
                        "ignoring a connection to {} that did not identify itself: {why}; \
                         still waiting for the peer",
                        self.listener.local_addr()
                    );
                    self.last_refused = Some(why);
                    continue;
                }
            };
            let side = self.start(&mut stream, peer, info)?;
            self.chosen = Some((stream, peer, side));
            return Ok(None);
        }
        Ok(None)
    }

    /// A peer for this listener that speaks another protocol version: tell it ours (so it fails
    /// naming both versions too) and fail the accept, naming both.
    fn refuse_other_version(
        &self,
        stream: &mut OobStream,
        peer: SocketAddr,
        bytes: &[u8],
    ) -> NetResult<()> {
        let Some((version, nonce)) = ConnInfo::preamble(bytes) else {
            return Ok(());
        };
        if nonce != self.nonce || version == PROTOCOL_VERSION {
            return Ok(());
        }
        let Err(why) = check_peer_protocol(version, FEATURES) else {
            return Ok(());
        };
        let mut mine = local_info(&self.dev, &[], 0, self.nonce, 0);
        mine.qps.clear();
        // Best effort: the answer is small enough for the socket buffer.
        if stream.queue_send(&mine.encode()).is_ok() {
            let _ = stream.poll_flush();
        }
        Err(NetError::Remote(format!(
            "connection from {peer} to {} refused: {why}",
            self.listener.local_addr()
        )))
    }

    /// The peer's info arrived: build our end, bring the QPs up and answer with our info.
    fn start(
        &mut self,
        stream: &mut OobStream,
        peer: SocketAddr,
        info: ConnInfo,
    ) -> NetResult<Box<RecvSide>> {
        let dev = &self.dev;
        // As many QPs as the sender asked for (decode caps them at MAX_QPS).
        let (qps, cq) = create_qps(
            dev,
            (2 * FIFO_DEPTH) as u32,
            (2 * FIFO_DEPTH) as u32,
            info.qps.len(),
            self.settings.cfg.use_inline,
        )?;
        let sizes = RegisteredBuf::new(&dev.pd, RecvComm::SIZES_BYTES, "sizes array")?;
        let cts_staging = RegisteredBuf::new(
            &dev.pd,
            RecvComm::CTS_STAGING_BYTES,
            "clear-to-send staging",
        )?;
        // The same GID on both ends: the peer shares this node (and its NIC).
        let peer_on_this_node = info.gid == dev.gid.gid.0;
        let eager_max = eager_max_for(self.settings.cfg.eager_max, peer_on_this_node);
        let nap = nap_config(&self.settings.cfg, dev, peer_on_this_node);
        let eager = EagerRing::new(dev, eager_max)?;
        let flush = flush_qp(dev, &self.settings)?;
        let psn = random_psn();
        connect_qps(dev, &self.settings, &qps, psn, &info, peer)?;
        // Every immediate, ordinary or eager, takes one receive: stock the queue
        // before the peer can write.
        RecvComm::stock_receives(&qps[0], RecvComm::RQ_STOCK)
            .map_err(|e| sys(format!("posting receives on {}: {e}", dev.describe())))?;
        let mut mine = local_info(
            dev,
            &qps,
            psn,
            self.nonce,
            dev.max_msg_size(&self.settings.cfg),
        );
        mine.sizes_addr = sizes.addr();
        mine.sizes_rkey = sizes.rkey();
        if let Some(e) = &eager {
            mine.eager_addr = e.buf.addr();
            mine.eager_rkey = e.buf.rkey();
            mine.eager_slots = e.slots;
            mine.eager_max_kib = (e.max / 1024) as u16;
        }
        stream.queue_send(&mine.encode()).map_err(oob_err)?;
        Ok(Box::new(RecvSide {
            qps,
            cq,
            sizes,
            cts_staging,
            eager,
            flush,
            peer_info: info,
            nap,
        }))
    }

    /// Waits for the peer's ready message, then hands out the comm.
    fn finish(
        &mut self,
        mut stream: OobStream,
        peer: SocketAddr,
        side: Box<RecvSide>,
    ) -> NetResult<Option<Box<RecvComm>>> {
        stream.poll_flush().map_err(oob_err)?;
        match stream.poll_recv().map_err(oob_err)? {
            None => {
                self.chosen = Some((stream, peer, side));
                Ok(None)
            }
            Some(msg) if msg == READY => {
                self.deadline = None;
                self.last_refused = None;
                info!(
                    NET,
                    "accepted {peer}: {} qp {:#x} <- remote qp {:#x}; {}; {}",
                    self.dev.describe(),
                    side.qps[0].qp_num(),
                    side.peer_info.qps[0].qpn,
                    match &side.eager {
                        Some(e) => format!("eager messages up to {} B", e.max),
                        None => "no eager messages".to_string(),
                    },
                    if side.nap.nap.is_zero() {
                        "no receive naps".to_string()
                    } else {
                        format!(
                            "receive naps of {} us after {} us",
                            side.nap.nap.as_micros(),
                            side.nap.spin.as_micros()
                        )
                    }
                );
                let side = *side;
                let flush_ids = side.flush.as_ref().map(Flush::watch_ids);
                let link = Link::new(
                    Arc::clone(&self.dev),
                    side.qps,
                    side.cq,
                    peer,
                    stream,
                    flush_ids,
                );
                Ok(Some(RecvComm::new(RecvParts {
                    link,
                    sizes: side.sizes,
                    staging: Staging {
                        rows: side.cts_staging,
                        eager_headers: None,
                    },
                    targets: Targets {
                        fifo: Remote {
                            addr: side.peer_info.fifo_addr,
                            rkey: side.peer_info.fifo_rkey,
                        },
                        ..Targets::default()
                    },
                    eager: side.eager,
                    flush: side.flush,
                    stats: self.settings.cfg.stats,
                    nap: side.nap,
                })))
            }
            Some(_) => Err(NetError::Remote(format!(
                "{peer} sent garbage instead of the ready message"
            ))),
        }
    }
}

/// When a receive comm's fruitless `test`s sleep, on `dev` under `cfg`, with its peer on this
/// node or not.
fn nap_config(cfg: &PluginConfig, dev: &NetDevice, peer_on_this_node: bool) -> NapConfig {
    let (spin_us, nap_us) = recv_nap_for(cfg, dev.is_software(), peer_on_this_node);
    NapConfig {
        spin: Duration::from_micros(spin_us.into()),
        nap: Duration::from_micros(nap_us.into()),
    }
}
