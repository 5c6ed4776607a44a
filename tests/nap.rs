//! Napping receives on a real device (the Soft-RoCE guest's rxe is a software device): with
//! `HALO_RECV_NAP_US` set, a receive comm with at least 1 MiB of buffers posted, whose `test`s
//! find nothing for longer than the spin (here 20 ms before anything is sent), sleeps between
//! polls, and its `HALO_STATS` line counts the naps; a comm with less posted never naps. Unset,
//! a receive whose peer is on the same node (here: the same device) never naps. The data arrives
//! intact either way. The settings are read once per process, so each case runs in a child with
//! its own.
//! Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1`.

mod common;

use common::host::{child_role, irecv, isend, setup, wait_all, Buf, Role};
use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::time::{Duration, Instant};

const DONE: &str = "stream verified";

/// Streams `n` messages of `len` bytes, every receive posted first, in a child of `test` with
/// `env` and `HALO_STATS=1`; checks every byte there. In the parent: the receive comm's naps
/// (`None` without a device).
fn naps_of_a_stream(test: &str, env: &[(&str, &str)], len: usize, n: usize) -> Option<u64> {
    let mut all = vec![("HALO_STATS", "1")];
    all.extend_from_slice(env);
    match child_role(test, &all, DONE) {
        Role::Skip => return None,
        Role::Parent(err) => {
            let line = err
                .lines()
                .find(|l| l.contains("stats: receive comm from"))
                .expect("the receive comm's stats line");
            let field = |key: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_else(|| panic!("no {key} in {line}"))
                    .parse()
                    .unwrap()
            };
            assert_eq!(field("msgs="), n as u64, "{line}");
            assert_eq!(field("bytes="), (n * len) as u64, "{line}");
            return Some(field("naps="));
        }
        Role::Child => {}
    }
    let (sc, rc) = setup(test)?;
    // SAFETY: both comms are live until closed at the end; every buffer is registered on the
    // comm it is used with and released only after every request on it is done; each request
    // is tested until done and no further.
    unsafe {
        let src: Vec<Buf> = (0..n).map(|i| Buf::new(sc, len, i as u8 + 1)).collect();
        let mut dst: Vec<Buf> = (0..n).map(|_| Buf::new(rc, len, 0)).collect();
        let mut reqs: Vec<_> = dst.iter_mut().map(|b| irecv(rc, &mut [(b, 1)])).collect();
        // Nothing is sent yet: the first receive's polls find nothing for 20 ms, well past the
        // spin. (On a loopback device a send may complete inside `isend`, so the wait has to
        // come first.)
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(20) {
            let (mut done, mut size) = (0, 0);
            assert_eq!(
                NET.test.unwrap()(reqs[0], &mut done, &mut size),
                ncclSuccess
            );
            assert_eq!(done, 0, "a receive completed before anything was sent");
        }
        reqs.extend(src.iter().map(|b| isend(sc, b, len, 1)));
        for (i, (r, sizes)) in wait_all(&reqs).into_iter().enumerate() {
            assert_eq!(r, ncclSuccess, "request {i}");
            if i < n {
                assert_eq!(sizes[0] as usize, len, "receive {i}");
            }
        }
        for (i, (d, s)) in dst.iter().zip(&src).enumerate() {
            assert!(d.mem == s.mem, "message {i} arrived altered");
        }
        for b in src.into_iter().chain(dst) {
            b.release();
        }
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
    eprintln!("{DONE}");
    None
}

#[test]
fn a_streaming_receive_naps_when_set() {
    let test = "a_streaming_receive_naps_when_set";
    if let Some(naps) = naps_of_a_stream(test, &[("HALO_RECV_NAP_US", "20")], 1 << 20, 4) {
        assert!(naps > 0, "4 MiB posted, HALO_RECV_NAP_US=20 and no nap");
    }
}

#[test]
fn unset_with_the_peer_on_this_node_a_streaming_receive_spins() {
    // Both ends on one device: the default is off (across nodes on a software device it is on,
    // which the two-guest soak of scripts/test.sh checks in the receiver's accept line).
    let test = "unset_with_the_peer_on_this_node_a_streaming_receive_spins";
    if let Some(naps) = naps_of_a_stream(test, &[], 1 << 20, 4) {
        assert_eq!(naps, 0);
    }
}

#[test]
fn a_receive_with_little_posted_never_naps() {
    // 4 x 64 KiB posted: a quarter of the streaming mark, however long the polls wait.
    let test = "a_receive_with_little_posted_never_naps";
    let env = [("HALO_RECV_NAP_US", "20"), ("HALO_RECV_SPIN_US", "0")];
    if let Some(naps) = naps_of_a_stream(test, &env, 64 << 10, 4) {
        assert_eq!(naps, 0);
    }
}
