//! The measurements on this side: the pair of comms to a member, the latency, stream and
//! all-reduce loops driven from here, and the sizes and iteration counts of a run.

use super::control::{field, Control, SpawnedMember};
use super::member::{self, MemberConfig};
use super::ops::{Net, Polls, Ring};
use super::perftest::Perftest;
use super::wire::WireCounter;
use super::{AllreduceRow, AllreduceTable, DecodeRow, LatencyRow, Options, PeerLink, StreamRow};
use crate::driver::{handle_from_hex, handle_to_hex, Opaque, Plugin};
use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sizes and iteration counts of one run.
pub(super) struct Plan {
    pub(super) latency: Vec<usize>,
    pub(super) bandwidth: Vec<usize>,
    pub(super) msgrate: Vec<usize>,
    pub(super) allreduce: Vec<usize>,
    /// (bytes, all-reduces per step) of the decode rows.
    pub(super) decode: Vec<(usize, usize)>,
    pub(super) peers: Vec<usize>,
}

/// One decode step of a TP=2 model: 64 all-reduces of 8 KiB per token for an 8B model (hidden
/// size 4096, bf16, two per layer over 32 layers), 160 of 16 KiB for a 70B model (8192, 80 layers).
const DECODE_SHAPES: [(usize, usize); 2] = [(8 << 10, 64), (16 << 10, 160)];

fn pow2(from: usize, to: usize) -> Vec<usize> {
    std::iter::successors(Some(from), |&s| (s < to).then_some(s * 2)).collect()
}

impl Plan {
    pub(super) fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                latency: vec![8, 4096, 65536],
                bandwidth: vec![64 << 10, 1 << 20],
                msgrate: vec![8, 4096],
                allreduce: vec![64 << 10, 1 << 20],
                decode: DECODE_SHAPES.to_vec(),
                peers: vec![1, 2],
            }
        } else {
            Plan {
                latency: pow2(8, 1 << 20),
                bandwidth: pow2(64 << 10, 64 << 20),
                msgrate: pow2(8, 4096),
                // 4 KiB and 16 KiB: one decode step's all-reduce of a TP=2 model (hidden size
                // 2048 … 8192, bf16), where every step is a fresh send/receive pair.
                allreduce: vec![
                    4 << 10,
                    16 << 10,
                    64 << 10,
                    1 << 20,
                    4 << 20,
                    16 << 20,
                    64 << 20,
                ],
                decode: DECODE_SHAPES.to_vec(),
                peers: vec![1, 2, 4, 8],
            }
        }
    }

    pub(super) fn latency_iters(quick: bool, size: usize) -> usize {
        if quick {
            20
        } else {
            ((16usize << 20) / size).clamp(20, 300)
        }
    }

    pub(super) fn stream_count(quick: bool, size: usize) -> usize {
        if quick {
            if size <= 4096 {
                200
            } else {
                16
            }
        } else {
            ((64usize << 20) / size).clamp(2, 1000)
        }
    }

    /// (warm-up, timed) iterations of one all-reduce size.
    fn allreduce_iters(quick: bool, size: usize) -> (usize, usize) {
        if quick {
            (1, 2)
        } else if size >= 4 << 20 {
            (1, 3)
        } else if size <= 16 << 10 {
            (5, 50)
        } else {
            (2, 10)
        }
    }

    /// (warm-up, timed) steps of one decode shape.
    fn decode_steps(quick: bool) -> (usize, usize) {
        if quick {
            (1, 4)
        } else {
            (5, 100)
        }
    }
}

/// This process's plugin, with the bound on every wait.
pub(super) struct Local {
    pub(super) plugin: Plugin,
    pub(super) timeout: Duration,
    pub(super) dev: i32,
    /// The device's packet counters, when readable.
    pub(super) wire: Option<WireCounter>,
    /// Whether the far ends use this host's device too (see [`super::wire::per_message`]).
    pub(super) both_ends_here: bool,
}

impl Local {
    /// Runs `f`, which sends `messages` messages, and counts the packets on the wire per message.
    fn counted<T>(
        &self,
        messages: usize,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<(T, Option<f64>), String> {
        WireCounter::around(self.wire.as_ref(), self.both_ends_here, messages, f)
    }

    pub(super) fn net(&self) -> Net<'_> {
        Net {
            plugin: &self.plugin,
            timeout: self.timeout,
        }
    }

    pub(super) fn listen(&self) -> Result<(Opaque, [u8; NCCL_NET_HANDLE_MAXSIZE]), String> {
        let mut h = [0u8; NCCL_NET_HANDLE_MAXSIZE];
        let lc = self
            .plugin
            .listen(self.dev, &mut h)
            .map_err(|e| e.to_string())?;
        Ok((lc, h))
    }
}

/// A member and this process connected both ways.
pub(super) struct Pair {
    member: Option<SpawnedMember>,
    remote: Option<Control>,
    send: Opaque,
    recv: Opaque,
}

impl Pair {
    fn ctl(&mut self) -> &mut Control {
        match (&mut self.member, &mut self.remote) {
            (Some(m), _) => &mut m.ctl,
            (None, Some(c)) => c,
            (None, None) => unreachable!("a pair always has a control channel"),
        }
    }
}

fn member_config(o: &Options) -> MemberConfig {
    MemberConfig {
        plugin: o.plugin.clone(),
        version: o.version,
        dev: o.dev,
        timeout: o.timeout,
    }
}

pub(super) fn spawn_member(o: &Options, index: usize) -> Result<SpawnedMember, String> {
    match &o.peer {
        PeerLink::Spawn { program, args } => {
            let mut all = args.clone();
            all.extend(member_config(o).to_args());
            SpawnedMember::start(program, &all, index)
        }
        PeerLink::Connect(_) => Err("local members are not available with a remote peer".into()),
    }
}

/// Reads a member's `handle` line: the listen handle of the member's plugin, then its name,
/// which must be `plugin`'s (this process's).
pub(super) fn member_handle(
    ctl: &mut Control,
    plugin: &Plugin,
    timeout: Duration,
) -> Result<[u8; NCCL_NET_HANDLE_MAXSIZE], String> {
    let w = ctl.expect("handle", timeout)?;
    check_same_plugin(&w.get(1..).unwrap_or_default().join(" "), &plugin.name())?;
    handle_from_hex(w.first().ok_or("empty handle line")?)
}

/// A far end that names another plugin than this process's cannot read its handles.
fn check_same_plugin(far: &str, here: &str) -> Result<(), String> {
    if far.is_empty() || far == here {
        return Ok(());
    }
    Err(format!(
        "the far end runs plugin {far:?} and this process {here:?}: its server was started for \
         another run (start one server per run, in the order the runs go)"
    ))
}

/// Connects this process to its member (spawned or remote) in both directions.
pub(super) fn open_pair(local: &Local, o: &Options) -> Result<Pair, String> {
    let (member, mut remote) = match &o.peer {
        PeerLink::Spawn { .. } => (Some(spawn_member(o, 1)?), None),
        PeerLink::Connect(addr) => {
            let s = connect_tcp(addr, o.timeout)?;
            (None, Some(Control::tcp(s, format!("server {addr}"))?))
        }
    };
    let mut pair = Pair {
        member,
        remote: remote.take(),
        send: Opaque(std::ptr::null_mut()),
        recv: Opaque(std::ptr::null_mut()),
    };
    let mut peer_handle = member_handle(pair.ctl(), &local.plugin, o.timeout)?;
    let (lc, h) = local.listen()?;
    pair.ctl().send(&format!("connect {}", handle_to_hex(&h)))?;
    let (send, recv) = local.net().connect_pair(o.dev, lc, &mut peer_handle)?;
    local.plugin.close_listen(lc).map_err(|e| e.to_string())?;
    pair.ctl().expect("connected", o.timeout)?;
    pair.send = send;
    pair.recv = recv;
    Ok(pair)
}

/// With a remote far end, tells its server to quit without measuring: this end could not start
/// its plugin. Best effort (a failure is printed), each wait bounded by the timeout.
pub(super) fn release_server(o: &Options) {
    let PeerLink::Connect(addr) = &o.peer else {
        return;
    };
    let r = (|| {
        let mut ctl = Control::tcp(connect_tcp(addr, o.timeout)?, format!("server {addr}"))?;
        ctl.expect("handle", o.timeout)?;
        ctl.quit(o.timeout)
    })();
    match r {
        Ok(()) => eprintln!("netbench: told the server at {addr} to quit (this run cannot start)"),
        Err(e) => eprintln!("netbench: could not release the server at {addr}: {e}"),
    }
}

fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > timeout => {
                return Err(format!("cannot reach the benchmark server at {addr}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

pub(super) fn close_pair(local: &Local, mut pair: Pair, timeout: Duration) -> Result<(), String> {
    local
        .plugin
        .close_send(pair.send)
        .map_err(|e| e.to_string())?;
    local
        .plugin
        .close_recv(pair.recv)
        .map_err(|e| e.to_string())?;
    match pair.member.take() {
        Some(m) => m.finish(timeout),
        None => pair.ctl().quit(timeout),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

pub(super) fn latency(
    local: &Local,
    pair: &mut Pair,
    o: &Options,
    sizes: &[usize],
    pt: Option<&mut Perftest>,
) -> Result<Vec<LatencyRow>, String> {
    let mut rows = Vec::new();
    let mut pt = pt;
    for &size in sizes {
        let iters = Plan::latency_iters(o.quick, size);
        let perftest = match pt.as_deref_mut() {
            Some(p) => Some(p.write_lat(size, iters)?),
            None => None,
        };
        let warmup = (iters / 10).max(2);
        pair.ctl().send(&format!("lat {size} {}", warmup + iters))?;
        let mut polls = Polls::default();
        let (rtts, wire_pkts) = local.counted(2 * (warmup + iters), || {
            local
                .net()
                .ping(pair.send, pair.recv, size, warmup + iters, &mut polls)
        })?;
        pair.ctl().expect("done", o.timeout)?;
        let mut one_way: Vec<f64> = rtts[warmup..].iter().map(|r| r / 2.0).collect();
        one_way.sort_by(f64::total_cmp);
        rows.push(LatencyRow {
            size,
            iters,
            typical_us: percentile(&one_way, 0.5),
            avg_us: one_way.iter().sum::<f64>() / one_way.len() as f64,
            p99_us: percentile(&one_way, 0.99),
            polls,
            wire_pkts,
            perftest,
        });
    }
    Ok(rows)
}

pub(super) fn stream(
    local: &Local,
    pair: &mut Pair,
    o: &Options,
    sizes: &[usize],
    pt: Option<&mut Perftest>,
) -> Result<Vec<StreamRow>, String> {
    let mut rows = Vec::new();
    let mut pt = pt;
    for &size in sizes {
        let count = Plan::stream_count(o.quick, size);
        let perftest = match pt.as_deref_mut() {
            Some(p) => Some(p.write_bw(size, count, o.window)?),
            None => None,
        };
        pair.ctl()
            .send(&format!("stream {size} {count} {}", o.window))?;
        pair.ctl().expect("ready", o.timeout)?;
        let mut send_polls = Polls::default();
        let ((t, recv_polls), wire_pkts) = local.counted(count, || {
            let t = local
                .net()
                .stream_send(pair.send, size, count, o.window, &mut send_polls)?;
            let done = pair.ctl().expect("done", o.timeout)?;
            Ok((t, member::polls_from_words(&done)?))
        })?;
        let secs = t.as_secs_f64().max(1e-9);
        let bytes = (size * count) as f64;
        rows.push(StreamRow {
            size,
            count,
            window: o.window,
            seconds: secs,
            mb_per_s: bytes / secs / 1e6,
            gbps: bytes * 8.0 / secs / 1e9,
            msgs_per_s: count as f64 / secs,
            send_polls,
            recv_polls,
            wire_pkts,
            perftest,
        });
    }
    Ok(rows)
}

/// A ring of `ranks` processes: this one is rank 0. With 2 ranks and a pair already open, the
/// pair is the ring (next and previous are the same peer).
pub(super) fn allreduce(
    local: &Local,
    pair: Option<&mut Pair>,
    o: &Options,
    ranks: usize,
    sizes: &[usize],
) -> Result<AllreduceTable, String> {
    let mut own: Vec<SpawnedMember> = Vec::new();
    let mut own_comms = None;
    let mut pair = pair.filter(|_| ranks == 2);
    let (send, recv) = match &pair {
        Some(p) => (p.send, p.recv),
        None => {
            for r in 1..ranks {
                own.push(spawn_member(o, r)?);
            }
            let mut handles = Vec::new();
            for m in &mut own {
                handles.push(member_handle(&mut m.ctl, &local.plugin, o.timeout)?);
            }
            let (lc, h) = local.listen()?;
            // Member r connects to member r+1; the last one closes the ring at rank 0.
            for r in 1..ranks {
                let next = if r + 1 == ranks { h } else { handles[r] };
                own[r - 1]
                    .ctl
                    .send(&format!("connect {}", handle_to_hex(&next)))?;
            }
            let c = local.net().connect_pair(o.dev, lc, &mut handles[0])?;
            local.plugin.close_listen(lc).map_err(|e| e.to_string())?;
            for m in &mut own {
                m.ctl.expect("connected", o.timeout)?;
            }
            own_comms = Some(c);
            c
        }
    };
    let mut remotes: Vec<&mut Control> = match &mut pair {
        Some(p) => vec![p.ctl()],
        None => own.iter_mut().map(|m| &mut m.ctl).collect(),
    };
    let max_count = sizes.iter().max().copied().unwrap_or(4) / 4;
    let result = Ring::new(local.net(), 0, ranks, send, recv, max_count).and_then(|mut ring| {
        let rows = allreduce_sizes(&mut ring, &mut remotes, o, ranks, sizes);
        ring.release()?;
        rows
    });
    drop(remotes);
    if let Some((s, r)) = own_comms {
        local.plugin.close_send(s).map_err(|e| e.to_string())?;
        local.plugin.close_recv(r).map_err(|e| e.to_string())?;
        for m in own {
            m.finish(o.timeout)?;
        }
    }
    Ok(AllreduceTable {
        ranks,
        iters: sizes
            .iter()
            .map(|&s| Plan::allreduce_iters(o.quick, s).1)
            .min()
            .unwrap_or(0),
        rows: result?,
    })
}

fn allreduce_sizes(
    ring: &mut Ring,
    remotes: &mut [&mut Control],
    o: &Options,
    ranks: usize,
    sizes: &[usize],
) -> Result<Vec<AllreduceRow>, String> {
    let mut rows = Vec::new();
    for &size in sizes {
        let count = size / 4;
        let (warmup, iters) = Plan::allreduce_iters(o.quick, size);
        for (i, c) in remotes.iter_mut().enumerate() {
            c.send(&format!("ar {count} {warmup} {iters} {} {ranks}", i + 1))?;
        }
        let mut polls = Polls::default();
        let mine = ring.run(count, warmup, iters, &mut polls)?;
        let (mut time_us, mut wrong) = (mine.time_us, mine.wrong);
        for c in remotes.iter_mut() {
            let w = c.expect("ar", o.timeout)?;
            // A collective takes as long as its slowest rank.
            time_us = time_us.max(field(&w, 0, "ar time")?);
            wrong += field::<usize>(&w, 1, "ar wrong")?;
        }
        let algbw = size as f64 / (time_us * 1e-6) / 1e9;
        rows.push(AllreduceRow {
            size,
            count,
            time_us,
            algbw,
            busbw: algbw * 2.0 * (ranks - 1) as f64 / ranks as f64,
            wrong,
        });
    }
    Ok(rows)
}

/// Mean and median over the steps of the slowest rank's time of each step: a step of a
/// collective ends when its last rank is done. `ranks[r][i]` is rank r's time of step i; steps
/// missing on some rank count with the ranks that have them.
pub(super) fn step_stats(ranks: &[Vec<f64>]) -> (f64, f64) {
    let steps = ranks.iter().map(Vec::len).max().unwrap_or(0);
    let mut slowest: Vec<f64> = (0..steps)
        .map(|i| {
            ranks
                .iter()
                .filter_map(|r| r.get(i).copied())
                .fold(0.0, f64::max)
        })
        .collect();
    if slowest.is_empty() {
        return (0.0, 0.0);
    }
    slowest.sort_by(f64::total_cmp);
    let n = slowest.len();
    let mean = slowest.iter().sum::<f64>() / n as f64;
    let median = if n % 2 == 1 {
        slowest[n / 2]
    } else {
        (slowest[n / 2 - 1] + slowest[n / 2]) / 2.0
    };
    (mean, median)
}

/// The decode rows over the pair (the 2-rank ring of the all-reduce suite): per shape, the member
/// runs the same steps as rank 1 and sends back its step times and wrong elements. With `ahead`,
/// both ranks post each all-reduce's receives before its data is ready (see [`Ring::decode`]).
pub(super) fn decode(
    local: &Local,
    pair: &mut Pair,
    o: &Options,
    shapes: &[(usize, usize)],
    ahead: bool,
) -> Result<Vec<DecodeRow>, String> {
    let (warmup, steps) = Plan::decode_steps(o.quick);
    let mut rows = Vec::new();
    for &(size, allreduces) in shapes {
        let count = size / 4;
        pair.ctl().send(&format!(
            "decode {count} {allreduces} {warmup} {steps} 1 2 {}",
            u8::from(ahead)
        ))?;
        let mut polls = Polls::default();
        let ((mine, w), wire_pkts) = local.counted((warmup + steps) * allreduces, || {
            let mine = Ring::new(local.net(), 0, 2, pair.send, pair.recv, count).and_then(
                |mut ring| {
                    let t = ring.decode(count, allreduces, warmup, steps, ahead, &mut polls);
                    ring.release()?;
                    t
                },
            )?;
            Ok((mine, pair.ctl().expect("decode", o.timeout)?))
        })?;
        let theirs = w
            .get(1..)
            .unwrap_or_default()
            .iter()
            .map(|x| {
                x.parse::<f64>()
                    .map_err(|e| format!("decode step time {x:?}: {e}"))
            })
            .collect::<Result<Vec<f64>, String>>()?;
        let wrong = mine.wrong + field::<usize>(&w, 0, "decode wrong")?;
        let phases = mine.phases;
        let (step_mean_us, step_median_us) = step_stats(&[mine.step_us, theirs]);
        rows.push(DecodeRow {
            size,
            allreduces,
            ahead,
            warmup,
            steps,
            step_mean_us,
            step_median_us,
            allreduce_us: step_mean_us / allreduces.max(1) as f64,
            wrong,
            wire_pkts,
            phases,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_stats_take_the_slowest_rank_of_each_step() {
        // Rank 0 is slower in steps 0 and 2, rank 1 in step 1 and 3.
        let (mean, median) = step_stats(&[vec![10.0, 4.0, 30.0, 1.0], vec![5.0, 20.0, 6.0, 8.0]]);
        assert_eq!(mean, (10.0 + 20.0 + 30.0 + 8.0) / 4.0);
        assert_eq!(median, (10.0 + 20.0) / 2.0);
        assert_eq!(step_stats(&[vec![3.0, 1.0, 2.0]]), (2.0, 2.0));
        // A rank that reported fewer steps does not shorten the others.
        assert_eq!(
            step_stats(&[vec![1.0, 1.0, 1.0], vec![2.0]]),
            (4.0 / 3.0, 1.0)
        );
        assert_eq!(step_stats(&[]), (0.0, 0.0));
        assert_eq!(step_stats(&[vec![], vec![]]), (0.0, 0.0));
    }

    #[test]
    fn a_far_end_with_another_plugin_is_refused_by_name() {
        assert_eq!(check_same_plugin("halo", "halo"), Ok(()));
        // A member from before the name was sent.
        assert_eq!(check_same_plugin("", "halo"), Ok(()));
        let e = check_same_plugin("AWS Libfabric", "halo").unwrap_err();
        assert!(
            e.contains("\"AWS Libfabric\"") && e.contains("\"halo\""),
            "{e}"
        );
        assert!(e.contains("one server per run"), "{e}");
    }

    #[test]
    fn decode_shapes_are_one_token_of_8b_and_70b_models() {
        for quick in [false, true] {
            assert_eq!(Plan::new(quick).decode, [(8192, 64), (16384, 160)]);
        }
        let (q, full) = (Plan::decode_steps(true), Plan::decode_steps(false));
        assert!(q.1 < full.1 && q.1 > 0);
    }
}
