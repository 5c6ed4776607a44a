//! The bootstrap over 127.0.0.1, driven the way the proxy thread drives it: by polling.

use super::conn_info::tests::sample;
use super::*;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Upper bound for any wait in these tests; they normally finish in milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `f` every millisecond until it yields a value or PATIENCE runs out.
fn poll_until<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>, OobError>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(Some(v)) => return v,
            Ok(None) if start.elapsed() < PATIENCE => sleep(Duration::from_millis(1)),
            Ok(None) => panic!("{what}: still waiting after {PATIENCE:?}"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Polls `f` until it fails, returning the error.
fn poll_until_err<T>(mut f: impl FnMut() -> Result<Option<T>, OobError>) -> OobError {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        match f() {
            Ok(_) => sleep(Duration::from_millis(1)),
            Err(e) => return e,
        }
    }
    panic!("no error within {PATIENCE:?}");
}

fn flush(s: &mut OobStream) {
    poll_until("flush", || s.poll_flush().map(|done| done.then_some(())));
}

/// A connected (listener side, connector side) pair.
fn pair() -> (OobStream, OobStream) {
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    assert_eq!(addr.ip(), LOCALHOST);
    assert_ne!(addr.port(), 0);
    let mut connector = OobConnector::start(addr, PATIENCE).unwrap();
    let client = poll_until("connect", || connector.poll());
    let server = poll_until("accept", || listener.poll_accept());
    assert_eq!(client.peer_addr(), addr);
    (server, client)
}

#[test]
fn handshake_exchanges_conn_info_both_ways() {
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    let mut handle_buf = [0u8; HANDLE_SIZE];
    let nonce = random_u64().unwrap();
    ListenHandle {
        addr,
        nonce,
        dev: 0,
    }
    .encode(&mut handle_buf);

    // The connecting side only sees the handle bytes.
    let handle = ListenHandle::decode(&handle_buf).unwrap();
    let mut connector = OobConnector::start(handle.addr, PATIENCE).unwrap();
    let mut client = poll_until("connect", || connector.poll());
    let mut server = poll_until("accept", || listener.poll_accept());
    assert!(
        connector.poll().is_err(),
        "a connector hands out one stream"
    );

    let mut mine = sample();
    mine.nonce = handle.nonce;
    client.queue_send(&mine.encode()).unwrap();
    flush(&mut client);
    let got = poll_until("server recv", || server.poll_recv());
    let theirs = ConnInfo::decode(&got).unwrap();
    assert_eq!(theirs, mine);
    assert_eq!(theirs.nonce, nonce);

    let mut reply = sample();
    reply.qps.truncate(1);
    server.queue_send(&reply.encode()).unwrap();
    flush(&mut server);
    let got = poll_until("client recv", || client.poll_recv());
    assert_eq!(ConnInfo::decode(&got).unwrap(), reply);
}

#[test]
fn frames_keep_their_boundaries() {
    let (mut server, mut client) = pair();
    let big = vec![0x5a; MAX_FRAME];
    let msgs: [&[u8]; 4] = [b"one", b"", &big, b"four"];
    for m in msgs {
        client.queue_send(m).unwrap();
    }
    // Receive while sending: 64 KiB may not fit the socket buffers in one go.
    let mut got = Vec::new();
    let start = Instant::now();
    let mut flushed = false;
    while got.len() < msgs.len() && start.elapsed() < PATIENCE {
        flushed = flushed || client.poll_flush().unwrap();
        match server.poll_recv().unwrap() {
            Some(m) => got.push(m),
            None => sleep(Duration::from_millis(1)),
        }
    }
    assert!(flushed || client.poll_flush().unwrap());
    assert_eq!(got.len(), msgs.len());
    for (g, m) in got.iter().zip(msgs) {
        assert_eq!(g.as_slice(), m);
    }
    assert!(server.poll_recv().unwrap().is_none());
}

#[test]
fn oversized_frames_are_refused_both_ways() {
    let (_server, mut client) = pair();
    let e = client.queue_send(&vec![0; MAX_FRAME + 1]).unwrap_err();
    assert!(matches!(e, OobError::FrameTooLarge { len, .. } if len == MAX_FRAME as u64 + 1));

    // A peer announcing more than the limit is refused before anything is allocated.
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    let mut raw = TcpStream::connect(addr).unwrap();
    let mut s = poll_until("accept", || listener.poll_accept());
    raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let e = poll_until_err(|| s.poll_recv());
    assert!(matches!(e, OobError::FrameTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("127.0.0.1"), "{e}");
}

#[test]
fn partial_frames_wait_for_the_rest() {
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_nodelay(true).unwrap();
    let mut s = poll_until("accept", || listener.poll_accept());
    let mut frame = 5u32.to_le_bytes().to_vec();
    frame.extend_from_slice(b"hello");
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.push(b'!');
    for (i, byte) in frame.iter().enumerate() {
        raw.write_all(&[*byte]).unwrap();
        match i {
            8 => assert_eq!(poll_until("frame 1", || s.poll_recv()), b"hello"),
            13 => assert_eq!(poll_until("frame 2", || s.poll_recv()), b"!"),
            _ => {
                // Give the byte time to arrive; an incomplete frame must not be reported.
                sleep(Duration::from_millis(2));
                assert_eq!(s.poll_recv().unwrap(), None, "after byte {i}");
            }
        }
    }
}

#[test]
fn peer_closing_is_reported() {
    let (mut server, client) = pair();
    drop(client);
    let e = poll_until_err(|| server.poll_recv());
    assert!(
        matches!(
            e,
            OobError::PeerClosed {
                mid_frame: false,
                ..
            }
        ),
        "{e}"
    );

    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    let mut raw = TcpStream::connect(addr).unwrap();
    let mut s = poll_until("accept", || listener.poll_accept());
    raw.write_all(&10u32.to_le_bytes()).unwrap();
    raw.write_all(b"abc").unwrap();
    drop(raw);
    let e = poll_until_err(|| s.poll_recv());
    assert!(
        matches!(
            e,
            OobError::PeerClosed {
                mid_frame: true,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("in the middle of a message"), "{e}");
}

#[test]
fn sending_to_a_vanished_peer_is_an_error_not_a_signal() {
    let (server, mut client) = pair();
    drop(server);
    let chunk = vec![1u8; MAX_FRAME];
    let e = poll_until_err(|| {
        client.queue_send(&chunk)?;
        client.poll_flush().map(|_| None::<()>)
    });
    assert!(matches!(e, OobError::Io { op: "send to", .. }), "{e}");
}

#[test]
fn connection_refused_is_reported_quickly() {
    // A port that was just free: bind, note it, close.
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    drop(listener);
    let start = Instant::now();
    let e = match OobConnector::start(addr, PATIENCE) {
        Err(e) => e,
        Ok(mut c) => poll_until_err(|| c.poll()),
    };
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let OobError::Io { ref source, .. } = e else {
        panic!("{e}")
    };
    assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("exited"),
        "{text}"
    );
}

#[test]
fn connect_deadline_fires_when_the_listener_is_swamped() {
    // With a backlog of 0 the kernel queues one unaccepted connection and drops further
    // SYNs, so the next connect stays pending until the client's SYN retransmit (1 s).
    let (listener, addr) = OobListener::bind_with_backlog(LOCALHOST, 0).unwrap();
    let timeout = Duration::from_millis(100);
    let mut kept = Vec::new();
    let mut timed_out = None;
    for _ in 0..8 {
        let mut c = OobConnector::start(addr, timeout).unwrap();
        let start = Instant::now();
        match poll_until_err_or_value(|| c.poll()) {
            Ok(stream) => kept.push(stream),
            Err(e) => {
                timed_out = Some((e, start.elapsed()));
                break;
            }
        }
    }
    let (e, took) = timed_out.expect("some connect must stay pending");
    assert!(matches!(e, OobError::Timeout { ms: 100, .. }), "{e}");
    assert!(took >= timeout && took < PATIENCE, "{took:?}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("no answer from {addr} after 100 ms")),
        "{text}"
    );
    drop((listener, kept));
}

fn poll_until_err_or_value<T>(
    mut f: impl FnMut() -> Result<Option<T>, OobError>,
) -> Result<T, OobError> {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if let Some(v) = f()? {
            return Ok(v);
        }
        sleep(Duration::from_millis(1));
    }
    panic!("neither a value nor an error within {PATIENCE:?}");
}

#[test]
fn recv_deadline_fires_when_the_peer_never_speaks() {
    // The kernel completes the handshake even though nobody ever accepts or answers.
    let (listener, addr) = OobListener::bind(LOCALHOST).unwrap();
    let mut connector = OobConnector::start(addr, PATIENCE).unwrap();
    let mut s = poll_until("connect", || connector.poll());
    s.queue_send(&sample().encode()).unwrap();
    flush(&mut s);
    s.set_deadline(Some(Duration::from_millis(50)));
    let start = Instant::now();
    let e = poll_until_err(|| s.poll_recv());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < PATIENCE,
        "{took:?}"
    );
    assert!(
        matches!(
            e,
            OobError::Timeout {
                ms: 50,
                waiting_for: "a message",
                ..
            }
        ),
        "{e}"
    );
    assert!(e
        .to_string()
        .contains(&format!("no answer from {addr} after 50 ms")));
    // Clearing the deadline makes waiting fine again.
    s.set_deadline(None);
    assert!(s.poll_recv().unwrap().is_none());
    drop(listener);
}

#[test]
fn each_poll_returns_promptly() {
    // The proxy thread must never be held: a poll with nothing to do returns at once.
    let (mut server, mut client) = pair();
    let start = Instant::now();
    for _ in 0..1000 {
        assert!(server.poll_recv().unwrap().is_none());
        assert!(client.poll_flush().unwrap());
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}
