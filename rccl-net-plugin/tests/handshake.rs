//! The listener's view of connections that go away during the bootstrap handshake, played by
//! this test over plain TCP. A connection that identifies itself (the hello with the handle's
//! nonce) and then closes or is reset is the peer going away: the accept fails at once, not at
//! `HALO_CONNECT_TIMEOUT_MS` (60 s by default). One that goes away before it identified itself
//! is dropped and the listener keeps waiting, so the real peer still connects after it. A listen
//! comm reused for a second accept gives that accept the whole timeout again.
//! The connect timeout is [`CONNECT_TIMEOUT_MS`] in this test. Needs an RDMA device (run in a Soft-RoCE guest); elsewhere it reports itself skipped.

mod common;

use rccl_net_plugin::net::{self, NetError, Plugin};
use rccl_net_plugin::oob::{ConnInfo, ListenHandle, HANDLE_SIZE};
use rccl_net_plugin::protocol::FEATURES;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `HALO_CONNECT_TIMEOUT_MS` of this test process.
const CONNECT_TIMEOUT_MS: u64 = 8000;
/// Well under the connect timeout: an accept failing within it was not waiting for the deadline.
const PROMPT: Duration = Duration::from_secs(3);

fn plugin_or_skip(name: &str) -> Option<Arc<Plugin>> {
    static TIMEOUT: std::sync::Once = std::sync::Once::new();
    // Read at the process's first init, whichever test comes first.
    TIMEOUT
        .call_once(|| std::env::set_var("HALO_CONNECT_TIMEOUT_MS", CONNECT_TIMEOUT_MS.to_string()));
    common::plugin_or_skip(name)
}

fn send_frame(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(&(msg.len() as u32).to_le_bytes()).unwrap();
    s.write_all(msg).unwrap();
}

/// Polls the listener until the accept fails; returns the error and how long it took.
fn accept_error(listen: &mut net::ListenComm) -> (NetError, Duration) {
    let t0 = Instant::now();
    loop {
        match listen.poll_accept() {
            Err(e) => return (e, t0.elapsed()),
            Ok(Some(_)) => panic!("accept returned a comm without a peer"),
            Ok(None) => {
                assert!(
                    t0.elapsed() < PROMPT,
                    "the accept was still waiting {PROMPT:?} after its peer went away"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The peer identifies itself, then goes away: closed (`reset` false) or reset.
fn identified_peer_goes_away(reset: bool) {
    let name = if reset { "reset" } else { "closed" };
    let Some(p) = plugin_or_skip(name) else {
        return;
    };
    let mut handle = [0u8; HANDLE_SIZE];
    let mut listen = p.listen(0, &mut handle, None).expect("listen");
    let h = ListenHandle::decode(&handle).unwrap();
    let mut s = TcpStream::connect(h.addr).unwrap();
    send_frame(&mut s, &ConnInfo::hello(h.nonce, FEATURES));
    // The listener sees the hello before the connection goes.
    for _ in 0..20 {
        assert!(listen.poll_accept().expect("accept").is_none());
        std::thread::sleep(Duration::from_millis(5));
    }
    if reset {
        // SO_LINGER 0: close sends a reset.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop(s);
    let (e, took) = accept_error(&mut listen);
    eprintln!("peer {name}: accept failed after {took:?}: {}", e.message());
    assert!(matches!(e, NetError::Remote(_)), "{e:?}");
    assert!(
        e.message().contains("identified itself"),
        "the error says the peer went away: {}",
        e.message()
    );
}

#[test]
fn an_identified_peer_that_closes_fails_the_accept_at_once() {
    identified_peer_goes_away(false);
}

#[test]
fn an_identified_peer_that_is_reset_fails_the_accept_at_once() {
    identified_peer_goes_away(true);
}

/// What a connection does before it goes away.
type GoesAway<'a> = Box<dyn Fn(&mut TcpStream) + 'a>;

#[test]
fn connections_that_go_before_identifying_are_dropped_and_the_peer_still_connects() {
    let Some(p) = plugin_or_skip("unidentified") else {
        return;
    };
    let mut handle = [0u8; HANDLE_SIZE];
    let mut listen = p.listen(0, &mut handle, None).expect("listen");
    let h = ListenHandle::decode(&handle).unwrap();
    // Closed without a byte; reset without a byte; the hello of another listener, then closed;
    // half a hello, then closed.
    let gone: Vec<GoesAway> = vec![
        Box::new(|_| {}),
        Box::new(|s| {
            socket2::SockRef::from(&*s)
                .set_linger(Some(Duration::ZERO))
                .unwrap()
        }),
        Box::new(|s| send_frame(s, &ConnInfo::hello(h.nonce ^ 1, FEATURES))),
        Box::new(|s| send_frame(s, &ConnInfo::hello(h.nonce, FEATURES)[..10])),
    ];
    for f in &gone {
        let mut s = TcpStream::connect(h.addr).unwrap();
        f(&mut s);
        drop(s);
        for _ in 0..20 {
            assert!(listen
                .poll_accept()
                .expect("a connection that never identified itself fails nothing")
                .is_none());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The real peer.
    connect_and_accept(&p, &handle, &mut listen);
}

/// Connects to `handle` and accepts on `listen` until both comms exist.
fn connect_and_accept(p: &Plugin, handle: &[u8; HANDLE_SIZE], listen: &mut net::ListenComm) {
    // Each connect works on its own copy of the handle, as RCCL's proxy does per connection.
    let mut handle = *handle;
    let t0 = Instant::now();
    let (mut sc, mut rc) = (None, None);
    while sc.is_none() || rc.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "connect/accept hang"
        );
        if sc.is_none() {
            sc = p.connect(0, &mut handle, None).expect("connect");
        }
        if rc.is_none() {
            rc = listen.poll_accept().expect("accept");
        }
    }
}

#[test]
fn a_reused_listen_comm_gives_each_accept_the_whole_timeout() {
    let Some(p) = plugin_or_skip("reused") else {
        return;
    };
    let mut handle = [0u8; HANDLE_SIZE];
    let mut listen = p.listen(0, &mut handle, None).expect("listen");
    connect_and_accept(&p, &handle, &mut listen);
    // Longer than the connect timeout since the first accept began.
    std::thread::sleep(Duration::from_millis(CONNECT_TIMEOUT_MS + 500));
    connect_and_accept(&p, &handle, &mut listen);
}
