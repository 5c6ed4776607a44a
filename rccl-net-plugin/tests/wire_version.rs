//! A peer of another wire protocol version is refused at connect, on both sides, with a message
//! naming both versions. The other peer is played by this test over plain TCP, speaking the
//! older format's preamble (magic, version, nonce), as an older build would.
//! Needs an RDMA device (run in a Soft-RoCE guest); elsewhere it reports itself skipped.

mod common;

use common::plugin_or_skip;
use rccl_net_plugin::net::NetError;
use rccl_net_plugin::oob::{ConnInfo, ListenHandle, QpInfo, HANDLE_SIZE};
use rccl_net_plugin::protocol::PROTOCOL_VERSION;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const OLD: u16 = 2;

fn old_info(nonce: u64) -> Vec<u8> {
    ConnInfo {
        version: OLD,
        features: 1,
        nonce,
        gid: [0; 16],
        gid_index: 0,
        lid: 0,
        link_layer: 2,
        mtu_bytes: 1024,
        max_msg_size: 1 << 30,
        qps: vec![QpInfo { qpn: 0x11, psn: 1 }],
        fifo_addr: 0,
        fifo_rkey: 0,
        sizes_addr: 0,
        sizes_rkey: 0,
        fifo_depth: 32,
        max_recvs: 8,
        eager_addr: 0,
        eager_rkey: 0,
        eager_slots: 0,
        eager_max_kib: 0,
    }
    .encode()
}

fn send_frame(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(&(msg.len() as u32).to_le_bytes()).unwrap();
    s.write_all(msg).unwrap();
}

fn recv_frame(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .expect("a framed message from the plugin");
    let mut msg = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut msg).unwrap();
    msg
}

/// Polls `step` until it fails (or 20 s pass: the test then fails).
fn until_error<T>(mut step: impl FnMut() -> Result<Option<T>, NetError>) -> NetError {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match step() {
            Err(e) => return e,
            Ok(Some(_)) => panic!("the connection to a peer of version {OLD} succeeded"),
            Ok(None) => {
                assert!(Instant::now() < deadline, "no refusal within 20 s");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn assert_names_both(e: &NetError) {
    let msg = e.message();
    assert!(
        msg.contains(&format!("version {OLD}"))
            && msg.contains(&format!("version {PROTOCOL_VERSION}")),
        "the refusal must name both versions: {msg}"
    );
    assert!(matches!(e, NetError::Remote(_)), "{e:?}");
}

#[test]
fn connecting_to_an_older_listener_fails_naming_both_versions() {
    let Some(p) = plugin_or_skip("connecting_to_an_older_listener") else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let nonce = 0x1234_5678_9abc_def0;
    let mut handle = [0u8; HANDLE_SIZE];
    ListenHandle {
        addr: listener.local_addr().unwrap(),
        nonce,
        dev: 0,
    }
    .encode(&mut handle);
    let old_peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let theirs = recv_frame(&mut s);
        send_frame(&mut s, &old_info(nonce));
        ConnInfo::preamble(&theirs)
    });
    let err = until_error(|| p.connect(0, &mut handle, None));
    assert_names_both(&err);
    eprintln!("connect refused: {}", err.message());
    assert_eq!(
        old_peer.join().unwrap(),
        Some((PROTOCOL_VERSION, nonce)),
        "the plugin announced its version and the handle's nonce"
    );
}

#[test]
fn an_older_connector_is_told_our_version_and_accept_fails_naming_both() {
    let Some(p) = plugin_or_skip("an_older_connector") else {
        return;
    };
    let mut handle = [0u8; HANDLE_SIZE];
    let mut listen = p.listen(0, &mut handle, None).expect("listen");
    let h = ListenHandle::decode(&handle).unwrap();
    let old_peer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(h.addr).unwrap();
        send_frame(&mut s, &old_info(h.nonce));
        ConnInfo::preamble(&recv_frame(&mut s))
    });
    let err = until_error(|| listen.poll_accept());
    assert_names_both(&err);
    eprintln!("accept refused: {}", err.message());
    assert_eq!(
        old_peer.join().unwrap(),
        Some((PROTOCOL_VERSION, h.nonce)),
        "the older peer was told this build's version"
    );
}
