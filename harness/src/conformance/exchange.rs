//! One side's traffic: the service thread (this one) registers, fills, verifies and deregisters
//! buffers; the progress thread posts and tests as RCCL's proxy does.

use super::{
    checksum, digest_part, fill_payload, Group, Options, Outcome, Work, GUARD,
    INFLIGHT_BYTE_BUDGET, MAX_REQUESTS, PRESET_REQUEST,
};
use crate::driver::{Opaque, Plugin};
use halo_ffi::{ncclRemoteError, ncclSystemError};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The service thread (this one) allocates, fills, registers, verifies and deregisters buffers;
/// the progress thread posts and tests. Completed groups come back over a channel.
pub(super) fn exchange(
    plugin: &Arc<Plugin>,
    opts: &Options,
    groups: &[Group],
    comm: Opaque,
    sending: bool,
    kill_pid: Option<u32>,
) -> Result<Outcome, String> {
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    let (done_tx, done_rx) = mpsc::channel::<Work>();
    let progress = {
        let plugin = Arc::clone(plugin);
        let groups = groups.to_vec();
        let timeout = opts.timeout;
        let kill = opts.kill_peer_after.zip(kill_pid);
        let report_every = opts.report_every;
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                progress_loop(
                    &plugin,
                    &groups,
                    comm,
                    sending,
                    work_rx,
                    done_tx,
                    timeout,
                    kill,
                    report_every,
                )
            })
            .map_err(|e| e.to_string())?
    };
    let mut inflight_bytes = 0usize;
    let mut returned = 0usize;
    let mut verified_bytes = 0usize;
    let mut digest = 0u64;
    let mut service_err = None;
    let mut finish = |w: Work, inflight_bytes: &mut usize| -> Result<(), String> {
        *inflight_bytes -= w.bytes();
        let g = &groups[w.group];
        if sending {
            // The plugin must not have written into a send buffer.
            for ((m, buf), &sum) in g.msgs.iter().zip(&w.bufs).zip(&w.sums) {
                if checksum(&buf[..m.size]) != sum {
                    return Err(format!(
                        "message {} (tag {}, size {}): the send buffer changed while it was sent",
                        m.index, m.tag, m.size
                    ));
                }
                digest = digest.wrapping_add(digest_part(m.index, sum));
            }
        } else {
            verified_bytes += verify_group(opts.seed, g, &w.bufs)?;
            for (m, buf) in g.msgs.iter().zip(&w.bufs) {
                digest = digest.wrapping_add(digest_part(m.index, checksum(&buf[..m.size])));
            }
        }
        for &mh in &w.mhs {
            plugin
                .dereg_mr(comm, mh)
                .map_err(|e| format!("group {}: {e}", w.group))?;
        }
        Ok(())
    };
    let wait_done = || -> Result<Work, String> {
        match done_rx.recv_timeout(opts.timeout) {
            Ok(w) => Ok(w),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("no group completed within {:?}", opts.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err("progress thread stopped".into()),
        }
    };
    'service: for (gi, g) in groups.iter().enumerate() {
        let bytes: usize = g
            .msgs
            .iter()
            .map(|m| {
                if sending {
                    m.size.max(1)
                } else {
                    m.capacity.max(1)
                }
            })
            .sum();
        while inflight_bytes > 0 && inflight_bytes + bytes > INFLIGHT_BYTE_BUDGET {
            returned += 1;
            if let Err(e) = wait_done().and_then(|w| finish(w, &mut inflight_bytes)) {
                service_err = Some(e);
                break 'service;
            }
        }
        let mut work = Work {
            group: gi,
            bufs: Vec::with_capacity(g.msgs.len()),
            mhs: Vec::with_capacity(g.msgs.len()),
            sums: Vec::with_capacity(g.msgs.len()),
        };
        for m in &g.msgs {
            // A zero-byte message still gets a one-byte buffer: RCCL never registers empty ranges.
            let mut buf = if sending {
                let mut b = vec![0u8; m.size.max(1)];
                fill_payload(&mut b[..m.size], opts.seed, m.index);
                work.sums.push(checksum(&b[..m.size]));
                b
            } else {
                vec![GUARD; m.capacity.max(1)]
            };
            match plugin.reg_mr(comm, buf.as_mut_ptr(), buf.len()) {
                Ok(mh) => work.mhs.push(mh),
                Err(e) => {
                    service_err = Some(format!(
                        "message {} (group {gi}, tag {}, size {}): {e}",
                        m.index, m.tag, m.size
                    ));
                    break 'service;
                }
            }
            work.bufs.push(buf);
        }
        inflight_bytes += work.bytes();
        if work_tx.send(work).is_err() {
            break;
        }
        while let Ok(w) = done_rx.try_recv() {
            returned += 1;
            if let Err(e) = finish(w, &mut inflight_bytes) {
                service_err = Some(e);
                break 'service;
            }
        }
    }
    drop(work_tx);
    if service_err.is_none() {
        while returned < groups.len() {
            returned += 1;
            if let Err(e) = wait_done().and_then(|w| finish(w, &mut inflight_bytes)) {
                service_err = Some(e);
                break;
            }
        }
    }
    drop(done_rx);
    let progress = progress
        .join()
        .map_err(|_| "progress thread panicked".to_string())?;
    // The progress thread's error is the root cause when both failed.
    let mut outcome = progress?;
    if let Some(e) = service_err {
        return Err(e);
    }
    if !sending {
        outcome.bytes = verified_bytes;
    }
    outcome.digest = digest;
    Ok(outcome)
}

/// Checks every message of a completed group byte for byte, by checksum, and that nothing was
/// written past it. Returns the bytes verified.
fn verify_group(seed: u64, g: &Group, bufs: &[Vec<u8>]) -> Result<usize, String> {
    let mut total = 0;
    for (m, buf) in g.msgs.iter().zip(bufs) {
        let mut expect = vec![0u8; m.size];
        fill_payload(&mut expect, seed, m.index);
        let got = &buf[..m.size];
        if got != expect.as_slice() {
            let at = got
                .iter()
                .zip(&expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "message {} (tag {}, size {}): payload differs first at byte {at} (got {:#04x}, expected {:#04x})",
                m.index, m.tag, m.size, got[at], expect[at]
            ));
        }
        if checksum(got) != checksum(&expect) {
            return Err(format!(
                "message {} (tag {}, size {}): checksum mismatch",
                m.index, m.tag, m.size
            ));
        }
        if m.capacity > m.size {
            if let Some(p) = buf[m.size..m.capacity].iter().position(|&b| b != GUARD) {
                return Err(format!("message {} (tag {}, size {}, capacity {}): byte {} past the message was overwritten", m.index, m.tag, m.size, m.capacity, m.size + p));
            }
        }
        total += m.size;
    }
    Ok(total)
}

/// A posted request and what it must report.
struct Posted {
    req: Opaque,
    /// Index into the progress thread's active works.
    work: usize,
    /// Sender: the slot of the one message; receiver: unused (all slots).
    slot: usize,
}

struct Active {
    work: Work,
    /// Sender: next position in `send_order` to post; receiver: 0 or 1 (posted).
    next: usize,
    outstanding: usize,
}

#[allow(clippy::too_many_arguments)]
fn progress_loop(
    plugin: &Plugin,
    groups: &[Group],
    comm: Opaque,
    sending: bool,
    work_rx: Receiver<Work>,
    done_tx: Sender<Work>,
    timeout: Duration,
    kill: Option<(usize, u32)>,
    report_every: usize,
) -> Result<Outcome, String> {
    let mut started: Option<Instant> = None;
    let mut next_report = if report_every > 0 {
        report_every
    } else {
        usize::MAX
    };
    let mut queue: VecDeque<Active> = VecDeque::new();
    let mut posted: Vec<Posted> = Vec::new();
    let mut input_open = true;
    let mut completed_msgs = 0usize;
    let mut bytes = 0usize;
    let mut max_inflight = 0usize;
    let mut null_retries = 0usize;
    let mut last_progress = Instant::now();
    let mut killed_at: Option<Instant> = None;
    // Active works are addressed by absolute position; `base` counts those already retired.
    let mut base = 0usize;
    let peer_kill = |op: &str, e: &dyn std::fmt::Display, code: c_int, at: Instant| -> ! {
        let ms = at.elapsed().as_millis();
        let expected = code == ncclRemoteError || code == ncclSystemError;
        println!(
            "PEER-KILL: {op}: {e}; {ms} ms after the kill; expected code: {}",
            if expected { "yes" } else { "no" }
        );
        std::process::exit(if expected { 3 } else { 1 });
    };
    loop {
        while input_open {
            match work_rx.try_recv() {
                Ok(w) => queue.push_back(Active {
                    work: w,
                    next: 0,
                    outstanding: 0,
                }),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => input_open = false,
            }
        }
        if !input_open && queue.is_empty() {
            break;
        }
        let mut progressed = false;

        // Post in order: operations on one comm match in posting order, so a later group may not
        // be posted before an earlier one is fully posted.
        'post: for (qi, a) in queue.iter_mut().enumerate() {
            let g = &groups[a.work.group];
            let total = if sending { g.msgs.len() } else { 1 };
            while a.next < total {
                if posted.len() >= MAX_REQUESTS {
                    break 'post;
                }
                let result = if sending {
                    let slot = g.send_order[a.next];
                    let m = &g.msgs[slot];
                    // SAFETY: the buffer lives in `a.work` until the request completes and the work
                    // is sent back; it is registered under `mhs[slot]`.
                    unsafe {
                        plugin.isend(
                            comm,
                            a.work.bufs[slot].as_mut_ptr(),
                            m.size,
                            m.tag,
                            a.work.mhs[slot],
                        )
                    }
                    .map(|r| (r, slot))
                } else {
                    let mut data: Vec<*mut c_void> = a
                        .work
                        .bufs
                        .iter_mut()
                        .map(|b| b.as_mut_ptr().cast())
                        .collect();
                    let caps: Vec<usize> = g.msgs.iter().map(|m| m.capacity).collect();
                    let mut tags: Vec<c_int> = g.msgs.iter().map(|m| m.tag).collect();
                    let mut mhs: Vec<*mut c_void> = a.work.mhs.iter().map(|m| m.0).collect();
                    let preset = if g.preset_one {
                        PRESET_REQUEST
                    } else {
                        std::ptr::null_mut()
                    };
                    // SAFETY: as for isend: the buffers stay in `a.work`, registered, until completion.
                    let r = unsafe {
                        plugin.irecv(comm, &mut data, &caps, &mut tags, &mut mhs, preset)
                    };
                    match r {
                        Ok(req) if req.0 == PRESET_REQUEST => {
                            return Err(format!(
                                "group {}: irecv left the pre-set (void*)1 request in place",
                                a.work.group
                            ));
                        }
                        other => other.map(|req| (req, 0)),
                    }
                };
                match result {
                    Ok((req, _)) if req.is_null() => {
                        null_retries += 1;
                        break 'post;
                    }
                    Ok((req, slot)) => {
                        started.get_or_insert_with(Instant::now);
                        posted.push(Posted {
                            req,
                            work: base + qi,
                            slot,
                        });
                        a.next += 1;
                        a.outstanding += 1;
                        progressed = true;
                        max_inflight = max_inflight.max(posted.len());
                    }
                    Err(e) => {
                        if let Some(at) = killed_at {
                            peer_kill(if sending { "isend" } else { "irecv" }, &e, e.code, at);
                        }
                        let m = &g.msgs[if sending { g.send_order[a.next] } else { 0 }];
                        return Err(format!(
                            "group {} message {} (tag {}, size {}): {e}",
                            a.work.group, m.index, m.tag, m.size
                        ));
                    }
                }
            }
        }

        // Right after posting, while this pass's requests are surely in flight: a peer that
        // completes every request within the call that posts it (Soft-RoCE in one guest) would
        // otherwise leave none in flight by the end of the pass, and the kill might never come.
        if let (Some((after, pid)), None) = (kill, killed_at) {
            if completed_msgs >= after && !posted.is_empty() {
                // SAFETY: plain syscall on the receiver child this process spawned.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                println!("PEER-KILL: receiver {pid} killed after {completed_msgs} messages with {} requests in flight", posted.len());
                killed_at = Some(Instant::now());
            }
        }

        let mut i = 0;
        while i < posted.len() {
            let p = &posted[i];
            let a = &mut queue[p.work - base];
            let g = &groups[a.work.group];
            let mut sizes = vec![-1 as c_int; g.msgs.len()];
            match plugin.test(p.req, &mut sizes) {
                Ok(false) => i += 1,
                Ok(true) => {
                    progressed = true;
                    if sending {
                        let m = &g.msgs[p.slot];
                        if sizes[0] as i64 != m.size as i64 {
                            return Err(format!(
                                "send of message {} (tag {}, size {}): test reported size {}",
                                m.index, m.tag, m.size, sizes[0]
                            ));
                        }
                        completed_msgs += 1;
                        bytes += m.size;
                    } else {
                        for (m, &s) in g.msgs.iter().zip(&sizes) {
                            if s as i64 != m.size as i64 {
                                return Err(format!("receive of message {} (tag {}, size {}): test reported size {s}", m.index, m.tag, m.size));
                            }
                            completed_msgs += 1;
                            bytes += m.size;
                        }
                    }
                    a.outstanding -= 1;
                    posted.swap_remove(i);
                }
                Err(e) => {
                    if let Some(at) = killed_at {
                        peer_kill("test", &e, e.code, at);
                    }
                    let m = &g.msgs[if sending { p.slot } else { 0 }];
                    return Err(format!(
                        "group {} (first message {}, tag {}, size {}): {e}",
                        a.work.group, m.index, m.tag, m.size
                    ));
                }
            }
        }

        if completed_msgs >= next_report {
            let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-9);
            println!(
                "SOAK progress: {completed_msgs} messages, {bytes} bytes, {secs:.1} s: {:.1} MB/s, {:.0} messages/s",
                bytes as f64 / secs / 1e6,
                completed_msgs as f64 / secs
            );
            next_report = (completed_msgs / report_every + 1) * report_every;
        }

        // Retire fully completed groups from the front, keeping positions stable for `posted`.
        while let Some(a) = queue.front() {
            let total = if sending {
                groups[a.work.group].msgs.len()
            } else {
                1
            };
            if a.next < total || a.outstanding > 0 {
                break;
            }
            let a = queue.pop_front().expect("front exists");
            base += 1;
            // The service side may already have given up; then the buffers are simply dropped.
            let _ = done_tx.send(a.work);
        }

        if progressed {
            last_progress = Instant::now();
        } else {
            if let Some(at) = killed_at {
                if at.elapsed() > timeout {
                    return Err(format!(
                        "peer killed {:?} ago and no call reported an error",
                        at.elapsed()
                    ));
                }
            }
            if last_progress.elapsed() > timeout {
                return Err(format!(
                    "no progress for {timeout:?}: {} requests in flight, {} groups queued, {completed_msgs} messages done",
                    posted.len(),
                    queue.len()
                ));
            }
            std::thread::yield_now();
        }
    }
    if let Some(at) = killed_at {
        return Err(format!(
            "peer killed {:?} before the end and no call reported an error",
            at.elapsed()
        ));
    }
    Ok(Outcome {
        messages: completed_msgs,
        bytes,
        max_inflight,
        null_retries,
        digest: 0,
        elapsed: started.map_or(Duration::ZERO, |t| t.elapsed()),
    })
}
