//! The eager path on a real device, through the v8 table in one process: a small send posted
//! before its receive goes at once into the receiver's bounce slot and is done once that write
//! has completed, before any receive exists; its buffer is then overwritten, and the receive,
//! when posted, still gets the original bytes, copied out of the slot (into a one-buffer
//! receive, or the buffer of a multi-receive with its tag); a receive too small for it fails and
//! writes nothing. (Receives into GPU memory, where the NIC copies the message out of the slot,
//! are in `gpu_direct.rs`.) With the path off (the default, `HALO_EAGER_MAX=0`) such a send waits for the
//! receiver. Sends whose tags belong to a later grouped receive get NULL until it is their row's
//! turn, with the path off and on (where such a send may go eagerly ahead of an earlier row and be
//! taken by the later one). The setting is read once per process, so each test runs its body in
//! a child with the setting.
//! Needs an RDMA device (run inside the Soft-RoCE guest); elsewhere it says so and skips, unless
//! `HALO_REQUIRE_RDMA=1`.

mod common;

use common::host::{child_role, irecv, isend, isend_once, setup, wait_all, Buf, Role, LIMIT};
use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::time::Instant;

/// In the parent: runs `test` again in a child with `HALO_EAGER_MAX=eager_max` (empty counts as
/// unset), checks that it passed and printed `done`, and returns false. In that child: returns
/// true (run the body).
fn in_child(test: &str, eager_max: &str, done: &str) -> bool {
    match child_role(test, &[("HALO_EAGER_MAX", eager_max)], done) {
        Role::Child => true,
        Role::Parent(_) | Role::Skip => false,
    }
}

#[test]
fn small_sends_go_before_their_receive() {
    if !in_child(
        "small_sends_go_before_their_receive",
        "8192",
        "100 sends posted ahead of their receives: verified",
    ) {
        return;
    }
    let Some((sc, rc)) = setup("eager::small_sends_go_before_their_receive") else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, closed only at the end; every
    // buffer is registered on the comm it is used with, holds at least the bytes each call
    // names and outlives its requests (all are waited for before `release`); a request is
    // tested only until it is reported done.
    unsafe {
        // 1. Posted before any receive exists: accepted at once and done once its write has
        //    completed, with no receive posted; the buffer is reused, and the receive posted
        //    later still gets the message as sent.
        let mut src = Buf::new(sc, 100, 1);
        let sent = src.mem.clone();
        let mut dst = Buf::new(rc, 4096, 0);
        let sreq = isend_once(sc, &src, 100, 1);
        assert!(
            !sreq.is_null(),
            "a 100-byte send with no receive posted must go eagerly"
        );
        let res = wait_all(&[sreq]);
        assert_eq!(
            (res[0].0, res[0].1[0]),
            (ncclSuccess, 100),
            "an eager send is done before its receive is posted"
        );
        src.mem.fill(0xA5);
        let rreq = irecv(rc, &mut [(&mut dst, 1)]);
        let res = wait_all(&[rreq]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 100));
        assert_eq!(&dst.mem[..100], &sent[..]);
        assert!(
            dst.mem[100..].iter().all(|&b| b == 0),
            "bytes past the message"
        );
        eprintln!("eager send done before its receive, taken by it later: 100 bytes verified");

        // 1b. A tag too large for the immediate: the message carries its header in the slot.
        let hsrc = Buf::new(sc, 4096, 12);
        let mut hdst = Buf::new(rc, 4096, 0);
        let sreq = isend_once(sc, &hsrc, 4096, 100_000);
        assert!(
            !sreq.is_null(),
            "a 4 KiB send with no receive posted must go eagerly"
        );
        let rreq = irecv(rc, &mut [(&mut hdst, 100_000)]);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 4096));
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 4096));
        assert_eq!(hdst.mem, hsrc.mem);
        eprintln!("eager send with its header (tag 100000): 4096 bytes verified");

        // 2. The receive turns out to be a multi-receive: the receiver copies the message into
        //    the buffer with its tag, while the other buffer's send goes the ordinary way.
        let mut a = Buf::new(sc, 200, 2);
        let a_sent = a.mem.clone();
        let b = Buf::new(sc, 300, 3);
        let mut da = Buf::new(rc, 4096, 0);
        let mut db = Buf::new(rc, 4096, 0);
        let s5 = isend_once(sc, &a, 200, 5);
        assert!(!s5.is_null(), "the first send of the row goes eagerly");
        let res = wait_all(&[s5]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 200));
        a.mem.fill(0x5A);
        let rreq = irecv(rc, &mut [(&mut db, 6), (&mut da, 5)]);
        let s6 = isend(sc, &b, 300, 6);
        let res = wait_all(&[s6, rreq]);
        assert_eq!((res[0].0, res[0].1[0]), (ncclSuccess, 300));
        assert_eq!(res[1].0, ncclSuccess);
        assert_eq!(
            &res[1].1[..2],
            &[300, 200],
            "sizes in the receive's buffer order"
        );
        assert_eq!(&da.mem[..200], &a_sent[..]);
        assert!(
            da.mem[200..].iter().all(|&x| x == 0),
            "bytes past the message"
        );
        assert_eq!(&db.mem[..300], &b.mem[..]);
        eprintln!("eager send taken by a multi-receive: 500 bytes verified");

        // 3. The receive is too small: the send was done already, the receive fails with
        //    nothing written, and the comm stays usable.
        let big = Buf::new(sc, 1000, 4);
        let mut small = Buf::new(rc, 500, 0);
        let s7 = isend_once(sc, &big, 1000, 7);
        assert!(!s7.is_null());
        let rreq = irecv(rc, &mut [(&mut small, 7)]);
        let res = wait_all(&[s7, rreq]);
        assert_eq!(
            (res[0].0, res[0].1[0]),
            (ncclSuccess, 1000),
            "the sender of an oversize eager message is done before its row"
        );
        assert_eq!(
            res[1].0, ncclInvalidUsage,
            "receiver of an oversize message"
        );
        assert!(
            small.mem.iter().all(|&x| x == 0),
            "nothing is written on truncation"
        );
        eprintln!("oversize eager send: the receive failed with nothing written");

        // 4. Above the eager limit (8 KiB here) a send waits for its receive.
        let large = Buf::new(sc, 65536, 5);
        let mut ldst = Buf::new(rc, 65536, 0);
        assert!(
            isend_once(sc, &large, 65536, 8).is_null(),
            "a 64 KiB send must wait for the receiver's row"
        );
        let rreq = irecv(rc, &mut [(&mut ldst, 8)]);
        let sreq = isend(sc, &large, 65536, 8);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 65536));
        assert_eq!(ldst.mem, large.mem);
        eprintln!("64 KiB send waited for its receive: verified");

        // 5. Many in a row, each ahead of its receive: credits come back with the rows.
        let mut got = Buf::new(rc, 4096, 0);
        let src = Buf::new(sc, 4096, 9);
        for i in 0..100usize {
            let len = (i * 37) % 4097;
            let sreq = isend(sc, &src, len, 11);
            let rreq = irecv(rc, &mut [(&mut got, 11)]);
            let res = wait_all(&[sreq, rreq]);
            assert_eq!((res[0].0, res[0].1[0] as usize), (ncclSuccess, len));
            assert_eq!((res[1].0, res[1].1[0] as usize), (ncclSuccess, len));
            assert_eq!(&got.mem[..len], &src.mem[..len], "message {i}");
        }
        eprintln!("100 sends posted ahead of their receives: verified");

        for buf in [src, hsrc, a, b, big, large] {
            buf.release();
        }
        for buf in [dst, hdst, da, db, small, ldst, got] {
            buf.release();
        }
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}

#[test]
fn with_the_eager_path_off_small_sends_wait() {
    small_sends_wait("with_the_eager_path_off_small_sends_wait", "0");
}

/// `HALO_EAGER_MAX` unset: both ends of this pair share the node (one device, one GID), where the
/// receiver offers no eager slots, so a send still waits for its receive.
#[test]
fn unset_on_one_node_small_sends_wait() {
    small_sends_wait("unset_on_one_node_small_sends_wait", "");
}

/// With `HALO_EAGER_MAX=eager_max` (empty: unset) in a child: an 8-byte send with no receive
/// posted gets a NULL request, 1000 times, then goes once the receive is posted.
fn small_sends_wait(test: &str, eager_max: &str) {
    if !in_child(test, eager_max, "eager path off: verified") {
        return;
    }
    let Some((sc, rc)) = setup(&format!("eager::{test}")) else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, closed only at the end; every
    // buffer is registered on the comm it is used with, holds at least the bytes each call
    // names and outlives its requests (all are waited for before `release`); a request is
    // tested only until it is reported done.
    unsafe {
        let src = Buf::new(sc, 8, 1);
        let mut dst = Buf::new(rc, 8, 0);
        for _ in 0..1000 {
            assert!(
                isend_once(sc, &src, 8, 1).is_null(),
                "no eager path: the send waits"
            );
        }
        let rreq = irecv(rc, &mut [(&mut dst, 1)]);
        let sreq = isend(sc, &src, 8, 1);
        let res = wait_all(&[sreq, rreq]);
        assert_eq!((res[1].0, res[1].1[0]), (ncclSuccess, 8));
        assert_eq!(dst.mem, src.mem);
        eprintln!("eager path off: verified");
        src.release();
        dst.release();
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}

/// A receive of tag 8, then a grouped receive of tags 0..=7; sends of tags 0..=8, each retried
/// in turn while it gets a NULL request, as a proxy with several sends pending does (aws-ofi-nccl's
/// grouped_recv "Multi-Tag"). Tags 0..=7 belong to the second receive, so they get NULL until tag 8
/// has taken the first. With `early_send`, tag 0 is tried once before any receive is posted; with
/// `Some(true)` it must be accepted then (eagerly: the first row has no entry for it, and the
/// second takes it). Everything completes with the right sizes and bytes.
///
/// # Safety
/// `sc` and `rc` are live comms connected to each other and idle.
unsafe fn sends_for_a_later_receive(sc: *mut c_void, rc: *mut c_void, early_send: Option<bool>) {
    let len = |tag: c_int| 100 + 37 * tag as usize;
    // SAFETY: the comms are live (the caller's contract); every buffer is registered on the
    // comm it is used with, holds at least the bytes each call names and outlives its requests
    // (all are waited for before `release`); a request is tested only until it is reported done.
    unsafe {
        let src: Vec<Buf> = (0..9).map(|t| Buf::new(sc, len(t), 1 + t as u8)).collect();
        let mut dst: Vec<Buf> = (0..9).map(|_| Buf::new(rc, 4096, 0)).collect();
        let mut pending: Vec<c_int> = (0..9).collect();
        let mut sreqs: Vec<(c_int, *mut c_void)> = Vec::new();
        if let Some(must) = early_send {
            let r = isend_once(sc, &src[0], len(0), 0);
            assert!(!must || !r.is_null(), "tag 0 must go eagerly");
            if !r.is_null() {
                sreqs.push((0, r));
                pending.retain(|&t| t != 0);
            }
        }
        let (first, rest) = dst.split_at_mut(1);
        let r8 = irecv(rc, &mut [(&mut first[0], 8)]);
        let mut group: Vec<(&mut Buf, c_int)> = rest.iter_mut().zip(0..8).collect();
        let r07 = irecv(rc, &mut group);
        let mut nulls = 0usize;
        let t0 = Instant::now();
        while !pending.is_empty() {
            assert!(
                t0.elapsed() < LIMIT,
                "sends of tags {pending:?} never posted"
            );
            let mut i = 0;
            while i < pending.len() {
                let t = pending[i];
                let r = isend_once(sc, &src[t as usize], len(t), t);
                if r.is_null() {
                    nulls += 1;
                    i += 1;
                } else {
                    sreqs.push((t, r));
                    pending.remove(i);
                }
            }
        }
        assert!(
            nulls > 0,
            "tags 0..=7 must have waited for the second receive"
        );
        let mut reqs: Vec<*mut c_void> = sreqs.iter().map(|&(_, r)| r).collect();
        reqs.extend([r8, r07]);
        let res = wait_all(&reqs);
        for (&(t, _), (code, sizes)) in sreqs.iter().zip(&res) {
            assert_eq!(
                (*code, sizes[0] as usize),
                (ncclSuccess, len(t)),
                "send of tag {t}"
            );
        }
        let (code, sizes) = res[sreqs.len()];
        assert_eq!(
            (code, sizes[0] as usize),
            (ncclSuccess, len(8)),
            "receive of tag 8"
        );
        let (code, sizes) = res[sreqs.len() + 1];
        assert_eq!(code, ncclSuccess, "grouped receive of tags 0..=7");
        for (t, &size) in sizes.iter().enumerate() {
            assert_eq!(size as usize, len(t as c_int), "size of tag {t}");
        }
        // dst[0] took tag 8; dst[1 + t] took tag t.
        for (k, d) in dst.iter().enumerate() {
            let t = if k == 0 { 8 } else { k - 1 };
            let n = len(t as c_int);
            assert_eq!(&d.mem[..n], &src[t].mem[..], "bytes of tag {t}");
            assert!(d.mem[n..].iter().all(|&b| b == 0), "bytes past tag {t}");
        }
        eprintln!(
            "sends of tags 0..=8 for a receive of tag 8 then one of tags 0..=7: verified after {nulls} NULL requests"
        );
        for b in src.into_iter().chain(dst) {
            b.release();
        }
    }
}

#[test]
fn sends_for_a_later_grouped_receive_wait_for_it() {
    if !in_child(
        "sends_for_a_later_grouped_receive_wait_for_it",
        "0",
        "eager path off: later receive verified",
    ) {
        return;
    }
    let Some((sc, rc)) = setup("eager::sends_for_a_later_grouped_receive_wait_for_it") else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, idle, and closed after.
    unsafe {
        sends_for_a_later_receive(sc, rc, None);
        sends_for_a_later_receive(sc, rc, Some(false));
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
    eprintln!("eager path off: later receive verified");
}

#[test]
fn an_eager_send_for_a_later_receive_is_taken_by_it() {
    if !in_child(
        "an_eager_send_for_a_later_receive_is_taken_by_it",
        "8192",
        "eager path on: later receive verified",
    ) {
        return;
    }
    let Some((sc, rc)) = setup("eager::an_eager_send_for_a_later_receive_is_taken_by_it") else {
        return;
    };
    // SAFETY: `sc` and `rc` are the live comms `setup` connected, idle, and closed after.
    unsafe {
        sends_for_a_later_receive(sc, rc, Some(true));
        sends_for_a_later_receive(sc, rc, None);
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
    eprintln!("eager path on: later receive verified");
}

/// What the recording profiler callback saw, in call order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// A start: the handle the recorder gave, the phandle, pluginId, descriptor type, wr_id,
    /// qp number and length.
    Start {
        handle: usize,
        phandle: usize,
        plugin_id: i64,
        ty: u8,
        wr_id: u64,
        qp_num: c_int,
        length: usize,
    },
    /// A stop of `handle`, with the phandle, pluginId and extData it came with.
    Stop {
        handle: usize,
        phandle: usize,
        plugin_id: i64,
        ext: usize,
    },
    /// `test` reported the request of `phandle` done (recorded by the test itself).
    Done { phandle: usize },
}

static EVENTS: std::sync::Mutex<Vec<Ev>> = std::sync::Mutex::new(Vec::new());
static NEXT_HANDLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0x100);

fn record_ev(e: Ev) {
    EVENTS.lock().unwrap().push(e);
}

/// The profiler callback handed to the v10 `init`: hands out handles and records every call.
unsafe extern "C" fn record(
    eh: *mut *mut c_void,
    ty: c_int,
    ph: *mut c_void,
    id: i64,
    ext: *mut c_void,
) -> ncclResult_t {
    if ty == ncclProfilerNetEventStart {
        let handle = NEXT_HANDLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the plugin passes its event's handle slot and, for a start, its descriptor.
        let d = unsafe {
            *eh = handle as *mut c_void;
            *(ext as *const ncclProfilerNetIbDescr_v1_t)
        };
        record_ev(Ev::Start {
            handle,
            phandle: ph as usize,
            plugin_id: id,
            ty: d.type_,
            wr_id: d.qp.wr_id,
            qp_num: d.qp.qpNum,
            length: d.qp.length,
        });
    } else {
        record_ev(Ev::Stop {
            // SAFETY: as above; a stop reads back the handle the start wrote.
            handle: unsafe { *eh } as usize,
            phandle: ph as usize,
            plugin_id: id,
            ext: ext as usize,
        });
    }
    ncclSuccess
}

#[test]
fn stats_line_and_profiler_events_through_v10() {
    const N: usize = 20;
    let test = "stats_line_and_profiler_events_through_v10";
    let env = [("HALO_EAGER_MAX", "8192"), ("HALO_STATS", "1")];
    let done = "profiler events: starts and stops verified";
    match child_role(test, &env, done) {
        Role::Skip => return,
        Role::Parent(err) => {
            // The close lines of both comms, with the counters of the run.
            let send = err
                .lines()
                .find(|l| l.contains("stats: send comm to"))
                .expect("the send comm's stats line");
            let recv = err
                .lines()
                .find(|l| l.contains("stats: receive comm from"))
                .expect("the receive comm's stats line");
            let field = |line: &str, key: &str| -> u64 {
                let v = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_else(|| panic!("no {key} in {line}"));
                v.trim_end_matches(')').parse().unwrap()
            };
            // N ordinary messages, one eager, one without a phandle.
            let msgs = (N + 2) as u64;
            assert_eq!(field(send, "msgs="), msgs, "{send}");
            assert_eq!(field(recv, "msgs="), msgs, "{recv}");
            assert!(field(send, "bytes=") > 0 && field(recv, "bytes=") > 0);
            assert!(field(send, "wrs=") >= msgs, "{send}");
            assert!(field(recv, "wrs=") >= msgs, "{recv}");
            assert!(field(send, "cqes=") > 0 && field(recv, "imm=") >= msgs);
            assert!(field(send, "tests=") >= msgs && field(recv, "tests=") >= msgs);
            // At least the one sent ahead of its receive went eagerly (a send whose
            // clear-to-send was still on its way may have, too).
            assert!(field(send, "eager_sent=") >= 1, "{send}");
            assert!(field(recv, "eager_taken=") >= 1, "{recv}");
            assert!(field(send, "cts_waits=") >= 1, "{send}");
            eprintln!("stats lines verified:\n{send}\n{recv}");
            return;
        }
        Role::Child => {}
    }
    if !common::have_rdma_device(&format!("eager::{test}")) {
        return;
    }
    let v10 = &rccl_net_plugin::abi::ncclNetPlugin_v10;
    // SAFETY: the plugin's own tables, linked into this binary; the v10 init stores the
    // recording callback, the v8 table drives connection setup and registration of the same
    // plugin; every buffer is registered on the comm it is used with and outlives its requests
    // (all are waited for before `release`); a request is tested only until it is done.
    unsafe {
        assert_eq!(
            v10.init.unwrap()(halo_harness::log::stderr_logger(), Some(record)),
            ncclSuccess
        );
        let (sc, rc) = common::connect_pair(&NET);
        let src = Buf::new(sc, 4096, 7);
        let mut dst = Buf::new(rc, 4096, 0);
        let isend10 = |len: usize, ph: usize| -> *mut c_void {
            let mut req = null_mut();
            assert_eq!(
                v10.isend.unwrap()(
                    sc,
                    src.mem.as_ptr() as *mut c_void,
                    len,
                    1,
                    src.mh,
                    ph as *mut c_void,
                    &mut req,
                ),
                ncclSuccess
            );
            req
        };
        let irecv10 = |dst: &mut Buf, ph: usize| -> *mut c_void {
            let mut data = [dst.mem.as_mut_ptr() as *mut c_void];
            let mut sizes = [dst.mem.len()];
            let mut tags = [1 as c_int];
            let mut mhs = [dst.mh];
            let mut phs = [ph as *mut c_void];
            let t0 = Instant::now();
            loop {
                let mut req = null_mut();
                assert_eq!(
                    v10.irecv.unwrap()(
                        rc,
                        1,
                        data.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        tags.as_mut_ptr(),
                        mhs.as_mut_ptr(),
                        phs.as_mut_ptr(),
                        &mut req,
                    ),
                    ncclSuccess
                );
                if !req.is_null() {
                    return req;
                }
                assert!(t0.elapsed() < LIMIT, "irecv never posted");
            }
        };
        let wait = |reqs: &[(*mut c_void, usize)]| {
            let res = wait_all(&reqs.iter().map(|r| r.0).collect::<Vec<_>>());
            for ((_, ph), (r, _)) in reqs.iter().zip(&res) {
                assert_eq!(*r, ncclSuccess);
                record_ev(Ev::Done { phandle: *ph });
            }
        };
        // Receives first: the ordinary path. Send phandles 0x5000+i, receive ones 0x9000+i.
        for i in 0..N {
            let len = 1 + i * 200;
            let rreq = irecv10(&mut dst, 0x9000 + i);
            let t0 = Instant::now();
            let sreq = loop {
                let r = isend10(len, 0x5000 + i);
                if !r.is_null() {
                    break r;
                }
                assert!(t0.elapsed() < LIMIT, "isend never posted");
            };
            wait(&[(sreq, 0x5000 + i), (rreq, 0x9000 + i)]);
            assert_eq!(&dst.mem[..len], &src.mem[..len]);
        }
        // One send ahead of its receive: it goes eagerly, and the receive takes it.
        let sreq = isend10(64, 0x5000 + N);
        assert!(!sreq.is_null(), "a 64-byte send goes eagerly");
        let rreq = irecv10(&mut dst, 0x9000 + N);
        wait(&[(sreq, 0x5000 + N), (rreq, 0x9000 + N)]);
        // A NULL phandle: no event for that request.
        let rreq = irecv10(&mut dst, 0);
        let sreq = loop {
            let r = isend10(8, 0);
            if !r.is_null() {
                break r;
            }
        };
        wait_all(&[sreq, rreq]);

        let evs = EVENTS.lock().unwrap().clone();
        let mut checked = 0;
        for (k, e) in evs.iter().enumerate() {
            let Ev::Start {
                handle,
                phandle,
                plugin_id,
                ty,
                wr_id,
                qp_num,
                length,
            } = *e
            else {
                continue;
            };
            let send = (0x5000..=0x5000 + N).contains(&phandle);
            assert!(
                send || (0x9000..=0x9000 + N).contains(&phandle),
                "start with a phandle never given: {e:?}"
            );
            assert_eq!((plugin_id, ty), (0x1_0001, ncclProfileQp as u8), "{e:?}");
            assert!(qp_num > 0, "{e:?}");
            if send {
                let i = phandle - 0x5000;
                let len = if i == N { 64 } else { 1 + i * 200 };
                assert_eq!(length, len, "{e:?}");
                assert_ne!(wr_id, 0, "{e:?}");
            } else {
                assert_eq!(length, 4096, "{e:?}");
            }
            let stops: Vec<usize> = (k + 1..evs.len())
                .filter(|&j| matches!(evs[j], Ev::Stop { handle: h, .. } if h == handle))
                .collect();
            assert_eq!(stops.len(), 1, "one stop per start: {e:?}");
            let Ev::Stop {
                phandle: sp,
                plugin_id: sid,
                ext,
                ..
            } = evs[stops[0]]
            else {
                unreachable!()
            };
            assert_eq!((sp, sid, ext), (0, 0, 0), "stops carry nothing");
            let done_at = evs
                .iter()
                .position(|d| *d == Ev::Done { phandle })
                .expect("the request was reported done");
            assert!(
                stops[0] < done_at,
                "the event of {phandle:#x} stops before its request is reported done"
            );
            checked += 1;
        }
        // Every request but the NULL-phandle pair had its event(s).
        for ph in (0..=N).flat_map(|i| [0x5000 + i, 0x9000 + i]) {
            assert!(
                evs.iter()
                    .any(|e| matches!(e, Ev::Start { phandle, .. } if *phandle == ph)),
                "no event for phandle {ph:#x}"
            );
        }
        assert!(!evs
            .iter()
            .any(|e| matches!(e, Ev::Start { phandle: 0, .. })));
        assert!(checked >= 2 * (N + 1));
        eprintln!("{checked} events");
        eprintln!("{done}");

        src.release();
        dst.release();
        assert_eq!(NET.closeSend.unwrap()(sc), ncclSuccess);
        assert_eq!(NET.closeRecv.unwrap()(rc), ncclSuccess);
    }
}
