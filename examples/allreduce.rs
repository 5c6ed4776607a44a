//! Ring all-reduce of f32 sums between N processes on one machine, through the plugin's v8
//! function table with host buffers, printed like rccl-tests' `all_reduce_perf`.
//!
//! ```text
//! allreduce --ranks N (2|4) [--min-bytes 4K] [--max-bytes 16M] [--iters K] [--warmup W]
//!           [--timeout SECS] [--json]
//! ```
//!
//! The launcher starts N copies of itself with `--rank r --dir D`. Each rank listens on device 0
//! and publishes its handle as `D/handle-r`; rank r connects to rank r+1 and accepts from rank
//! r-1. `D` lies under `$HALO_GUEST_SHARE` when set (the Soft-RoCE guest), else the temp dir.
//! Every rank checks its whole result against the exact sum; ranks other than 0 write their
//! timings and error counts to `D/result-r`, and rank 0 prints the table. Exit status is
//! non-zero when any element is wrong or any rank fails.

use halo_ffi::*;
use rccl_net_plugin::abi::ncclNetPlugin_v8 as NET;
use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

/// Bound on every single wait of a rank (peer handle, connect, one transfer, result files).
const WAIT: Duration = Duration::from_secs(120);
/// Any tag works: operations on a comm match in posting order.
const TAG: c_int = 7;

#[derive(Clone)]
struct Opts {
    ranks: usize,
    min_bytes: usize,
    max_bytes: usize,
    iters: usize,
    warmup: usize,
    timeout: Duration,
    json: bool,
    rank: Option<usize>,
    dir: Option<PathBuf>,
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.as_bytes().last().map(|b| b.to_ascii_uppercase()) {
        Some(b'K') => (&s[..s.len() - 1], 1usize << 10),
        Some(b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad byte count {s:?}"))
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        ranks: 2,
        min_bytes: 4 << 10,
        max_bytes: 16 << 20,
        iters: 5,
        warmup: 1,
        timeout: Duration::from_secs(900),
        json: false,
        rank: None,
        dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("bad number {v:?} for {a}"))
        };
        match a.as_str() {
            "--ranks" => o.ranks = num(val()?)?,
            "--min-bytes" => o.min_bytes = parse_bytes(&val()?)?,
            "--max-bytes" => o.max_bytes = parse_bytes(&val()?)?,
            "--iters" => o.iters = num(val()?)?,
            "--warmup" => o.warmup = num(val()?)?,
            "--timeout" => o.timeout = Duration::from_secs(num(val()?)? as u64),
            "--json" => o.json = true,
            "--rank" => o.rank = Some(num(val()?)?),
            "--dir" => o.dir = Some(PathBuf::from(val()?)),
            "-h" | "--help" => return Err(
                "usage: allreduce --ranks N (2|4) [--min-bytes 4K] [--max-bytes 16M] [--iters K] \
                            [--warmup W] [--timeout SECS] [--json]"
                    .into(),
            ),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if o.ranks < 2 {
        return Err("--ranks must be at least 2".into());
    }
    if o.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    if !o.min_bytes.is_power_of_two()
        || !o.max_bytes.is_power_of_two()
        || o.min_bytes < 4
        || o.min_bytes > o.max_bytes
    {
        return Err("--min-bytes and --max-bytes must be powers of two, 4 <= min <= max".into());
    }
    // The v8 table carries message sizes as C int.
    if o.max_bytes / o.ranks + 4 > c_int::MAX as usize {
        return Err("--max-bytes too large for the v8 table's int sizes".into());
    }
    if o.rank.is_some_and(|r| r >= o.ranks) {
        return Err("--rank must be below --ranks".into());
    }
    Ok(o)
}

fn sizes(o: &Opts) -> impl Iterator<Item = usize> {
    let max = o.max_bytes;
    std::iter::successors(Some(o.min_bytes), move |&s| (s < max).then_some(s * 2))
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("allreduce: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match (o.rank, o.dir.clone()) {
        (Some(rank), Some(dir)) => {
            run_rank(&o, rank, &dir).map_err(|e| format!("rank {rank}: {e}"))
        }
        (None, None) => launch(&o),
        _ => Err("--rank and --dir go together".into()),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("allreduce: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the rank processes and waits for them; `Ok(false)` if any of them failed.
fn launch(o: &Opts) -> Result<bool, String> {
    let base = std::env::var_os("HALO_GUEST_SHARE")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("halo-allreduce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = spawn_and_wait(o, &dir);
    // Leftovers would only confuse a later run that reuses the pid.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn spawn_and_wait(o: &Opts, dir: &Path) -> Result<bool, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..o.ranks {
        let mut cmd = Command::new(&exe);
        cmd.args(["--ranks", &o.ranks.to_string()])
            .args([
                "--min-bytes",
                &o.min_bytes.to_string(),
                "--max-bytes",
                &o.max_bytes.to_string(),
            ])
            .args([
                "--iters",
                &o.iters.to_string(),
                "--warmup",
                &o.warmup.to_string(),
            ])
            .args(["--rank", &rank.to_string()])
            .arg("--dir")
            .arg(dir);
        if o.json {
            cmd.arg("--json");
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("cannot start rank {rank}: {e}"));
            }
        }
    }
    let deadline = Instant::now() + o.timeout;
    let mut ok = true;
    while !children.is_empty() {
        if Instant::now() > deadline {
            kill_all(&mut children);
            return Err(format!(
                "ranks did not finish within {:?}; killed them",
                o.timeout
            ));
        }
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("allreduce: rank {rank} failed ({status})");
                        ok = false;
                    }
                    children.swap_remove(i);
                }
                Ok(None) => i += 1,
                Err(e) => {
                    eprintln!("allreduce: cannot wait for rank {rank}: {e}");
                    ok = false;
                    children.swap_remove(i);
                }
            }
        }
        if !ok {
            // The others would only run into their own timeouts waiting for the failed rank.
            kill_all(&mut children);
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ok)
}

fn kill_all(children: &mut Vec<(usize, Child)>) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

/// Passes WARN lines through always and INFO lines under `NCCL_DEBUG=INFO|TRACE`, like the core.
extern "C" fn rank_logger(
    level: c_int,
    _flags: c_ulong,
    file: *const c_char,
    line: c_int,
    _fmt: *const c_char,
    msg: *const c_char,
) {
    let verbose = matches!(std::env::var("NCCL_DEBUG").as_deref(), Ok("INFO" | "TRACE"));
    if level > 2 && !verbose {
        return;
    }
    // SAFETY: the plugin passes NUL-terminated strings.
    let (file, msg) = unsafe {
        (
            CStr::from_ptr(file).to_string_lossy(),
            CStr::from_ptr(msg).to_string_lossy(),
        )
    };
    eprintln!(
        "[pid {} log {level}] {file}:{line} {msg}",
        std::process::id()
    );
}

fn logger() -> ncclDebugLogger_t {
    type Fixed = extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, *const c_char);
    // SAFETY: the plugin always calls its logger with fmt "%s" and one string argument; on x86-64
    // and aarch64 Linux a variadic pointer argument is passed like a named one.
    Some(unsafe {
        std::mem::transmute::<
            Fixed,
            unsafe extern "C" fn(c_int, c_ulong, *const c_char, c_int, *const c_char, ...),
        >(rank_logger as Fixed)
    })
}

fn check(what: &str, rc: ncclResult_t) -> Result<(), String> {
    if rc == ncclSuccess {
        Ok(())
    } else {
        Err(format!("{what} returned ncclResult {rc}"))
    }
}

/// Writes `data` to `path` so that readers never see a partial file.
fn publish(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename to {}: {e}", path.display()))
}

fn wait_for_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let t0 = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(d) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if t0.elapsed() > WAIT {
            return Err(format!(
                "{what}: {} did not appear within {WAIT:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A rank's connections and registered buffers.
struct Ring {
    rank: usize,
    n: usize,
    send: *mut c_void,
    recv: *mut c_void,
    /// In-place input and result; registered on both comms because it is a send source and,
    /// in the all-gather, a receive target.
    data: Vec<f32>,
    data_send_mr: *mut c_void,
    data_recv_mr: *mut c_void,
    /// Landing place of the reduce-scatter's incoming chunks before they are added.
    scratch: Vec<f32>,
    scratch_mr: *mut c_void,
}

impl Ring {
    fn connect(rank: usize, n: usize, dir: &Path, max_count: usize) -> Result<Ring, String> {
        // SAFETY: the table's functions are called with valid out-pointers and the 128-byte
        // handle buffers the ABI asks for; comms are used only after they were returned non-NULL.
        unsafe {
            check("init", NET.init.unwrap()(logger()))?;
            let mut ndev: c_int = 0;
            check("devices", NET.devices.unwrap()(&mut ndev))?;
            if ndev < 1 {
                return Err("the plugin found no device".into());
            }
            let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
            let mut lc: *mut c_void = null_mut();
            check(
                "listen",
                NET.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc),
            )?;
            publish(&dir.join(format!("handle-{rank}")), &handle)?;

            let next = (rank + 1) % n;
            let peer = wait_for_file(
                &dir.join(format!("handle-{next}")),
                &format!("handle of rank {next}"),
            )?;
            let mut peer_handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
            if peer.len() != peer_handle.len() {
                return Err(format!("handle of rank {next} has {} bytes", peer.len()));
            }
            peer_handle.copy_from_slice(&peer);

            let (mut sc, mut rc): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
            let t0 = Instant::now();
            while sc.is_null() || rc.is_null() {
                if t0.elapsed() > WAIT {
                    let prev = (rank + n - 1) % n;
                    return Err(format!(
                        "connection setup timed out after {WAIT:?} (connect to rank {next}: {}, accept from rank {prev}: {})",
                        if sc.is_null() { "pending" } else { "done" },
                        if rc.is_null() { "pending" } else { "done" }
                    ));
                }
                if sc.is_null() {
                    check(
                        "connect",
                        NET.connect.unwrap()(
                            0,
                            peer_handle.as_mut_ptr().cast(),
                            &mut sc,
                            null_mut(),
                        ),
                    )?;
                }
                if rc.is_null() {
                    check("accept", NET.accept.unwrap()(lc, &mut rc, null_mut()))?;
                }
                std::thread::yield_now();
            }
            check("closeListen", NET.closeListen.unwrap()(lc))?;

            let mut ring = Ring {
                rank,
                n,
                send: sc,
                recv: rc,
                data: vec![0.0; max_count],
                data_send_mr: null_mut(),
                data_recv_mr: null_mut(),
                scratch: vec![0.0; max_count.div_ceil(n).max(1)],
                scratch_mr: null_mut(),
            };
            let data_bytes = std::mem::size_of_val(ring.data.as_slice());
            let scratch_bytes = std::mem::size_of_val(ring.scratch.as_slice());
            let data_ptr = ring.data.as_mut_ptr().cast::<c_void>();
            let scratch_ptr = ring.scratch.as_mut_ptr().cast::<c_void>();
            check(
                "regMr(data, send)",
                NET.regMr.unwrap()(
                    sc,
                    data_ptr,
                    data_bytes,
                    NCCL_PTR_HOST,
                    &mut ring.data_send_mr,
                ),
            )?;
            check(
                "regMr(data, recv)",
                NET.regMr.unwrap()(
                    rc,
                    data_ptr,
                    data_bytes,
                    NCCL_PTR_HOST,
                    &mut ring.data_recv_mr,
                ),
            )?;
            check(
                "regMr(scratch)",
                NET.regMr.unwrap()(
                    rc,
                    scratch_ptr,
                    scratch_bytes,
                    NCCL_PTR_HOST,
                    &mut ring.scratch_mr,
                ),
            )?;
            Ok(ring)
        }
    }

    /// Element range of chunk `c` when `count` elements are split over the ranks.
    fn chunk(&self, c: usize, count: usize) -> std::ops::Range<usize> {
        c * count / self.n..(c + 1) * count / self.n
    }

    /// Sends data[src] to the next rank while receiving from the previous one into either
    /// scratch or data[dst], and waits for both.
    fn exchange(
        &mut self,
        src: std::ops::Range<usize>,
        dst: std::ops::Range<usize>,
        into_scratch: bool,
        step: &str,
    ) -> Result<(), String> {
        let send_bytes = src.len() * 4;
        let recv_bytes = dst.len() * 4;
        // SAFETY: both ranges lie inside buffers registered on the comms they are used with;
        // the buffers are neither moved nor touched until both requests report done.
        let (send_ptr, recv_ptr, recv_mr) = unsafe {
            let s = self.data.as_mut_ptr().add(src.start).cast::<c_void>();
            if into_scratch {
                (
                    s,
                    self.scratch.as_mut_ptr().cast::<c_void>(),
                    self.scratch_mr,
                )
            } else {
                (
                    s,
                    self.data.as_mut_ptr().add(dst.start).cast::<c_void>(),
                    self.data_recv_mr,
                )
            }
        };
        let (mut sreq, mut rreq): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
        let (mut sdone, mut rdone): (c_int, c_int) = (0, 0);
        let (mut ssize, mut rsize): (c_int, c_int) = (-1, -1);
        let t0 = Instant::now();
        while sdone == 0 || rdone == 0 {
            if t0.elapsed() > WAIT {
                let state = |posted: bool, done: c_int| match (posted, done) {
                    (false, _) => "not posted",
                    (true, 0) => "pending",
                    _ => "done",
                };
                return Err(format!(
                    "{step}: timed out after {WAIT:?} (send {send_bytes} B to rank {}: {}, receive {recv_bytes} B from rank {}: {})",
                    (self.rank + 1) % self.n,
                    state(!sreq.is_null(), sdone),
                    (self.rank + self.n - 1) % self.n,
                    state(!rreq.is_null(), rdone)
                ));
            }
            // SAFETY: see above; requests are tested only after they were returned non-NULL.
            unsafe {
                if rreq.is_null() {
                    let mut data = [recv_ptr];
                    let mut sizes = [recv_bytes as c_int];
                    let mut tags = [TAG];
                    let mut mhs = [recv_mr];
                    check(
                        step,
                        NET.irecv.unwrap()(
                            self.recv,
                            1,
                            data.as_mut_ptr(),
                            sizes.as_mut_ptr(),
                            tags.as_mut_ptr(),
                            mhs.as_mut_ptr(),
                            &mut rreq,
                        ),
                    )?;
                }
                if sreq.is_null() {
                    check(
                        step,
                        NET.isend.unwrap()(
                            self.send,
                            send_ptr,
                            send_bytes as c_int,
                            TAG,
                            self.data_send_mr,
                            &mut sreq,
                        ),
                    )?;
                }
                if !sreq.is_null() && sdone == 0 {
                    check(step, NET.test.unwrap()(sreq, &mut sdone, &mut ssize))?;
                }
                if !rreq.is_null() && rdone == 0 {
                    check(step, NET.test.unwrap()(rreq, &mut rdone, &mut rsize))?;
                }
            }
            std::thread::yield_now();
        }
        if ssize as usize != send_bytes || rsize as usize != recv_bytes {
            return Err(format!("{step}: sizes sent {ssize} (expected {send_bytes}), received {rsize} (expected {recv_bytes})"));
        }
        Ok(())
    }

    /// Sums data[..count] over all ranks in place: reduce-scatter, then all-gather.
    fn allreduce(&mut self, count: usize) -> Result<(), String> {
        let (r, n) = (self.rank, self.n);
        for s in 0..n - 1 {
            let src = self.chunk((r + n - s) % n, count);
            let dst = self.chunk((r + 2 * n - s - 1) % n, count);
            self.exchange(
                src,
                dst.clone(),
                true,
                &format!("{count} elements, reduce-scatter step {s}"),
            )?;
            for (d, x) in self.data[dst.clone()]
                .iter_mut()
                .zip(&self.scratch[..dst.len()])
            {
                *d += *x;
            }
        }
        // Rank r now holds the full sum of chunk r+1.
        for s in 0..n - 1 {
            let src = self.chunk((r + 1 + n - s) % n, count);
            let dst = self.chunk((r + n - s) % n, count);
            self.exchange(
                src,
                dst,
                false,
                &format!("{count} elements, all-gather step {s}"),
            )?;
        }
        Ok(())
    }

    fn fill(&mut self, count: usize) {
        let k = (self.rank + 1) as f32;
        for (i, v) in self.data[..count].iter_mut().enumerate() {
            *v = k * (i % 13) as f32;
        }
    }

    /// Elements differing from the exact sum over ranks of (r+1)*(i%13); all values are small
    /// integers, so f32 addition in any order is exact.
    fn wrong(&self, count: usize) -> usize {
        let k = (self.n * (self.n + 1) / 2) as f32;
        self.data[..count]
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != k * (i % 13) as f32)
            .count()
    }

    fn close(self) -> Result<(), String> {
        // SAFETY: every request on these comms has completed; registrations go before the comms.
        unsafe {
            check(
                "deregMr(data, send)",
                NET.deregMr.unwrap()(self.send, self.data_send_mr),
            )?;
            check(
                "deregMr(data, recv)",
                NET.deregMr.unwrap()(self.recv, self.data_recv_mr),
            )?;
            check(
                "deregMr(scratch)",
                NET.deregMr.unwrap()(self.recv, self.scratch_mr),
            )?;
            check("closeSend", NET.closeSend.unwrap()(self.send))?;
            check("closeRecv", NET.closeRecv.unwrap()(self.recv))?;
        }
        Ok(())
    }
}

/// One size's outcome on one rank (rank 0 folds the others' into its own).
#[derive(Clone, Copy)]
struct Row {
    bytes: usize,
    time_us: f64,
    wrong: usize,
}

fn device_name() -> String {
    // SAFETY: all-zero is a valid value of this plain C struct; the plugin fills it.
    let mut p: ncclNetProperties_v8_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer; the name pointer, when set, is a NUL-terminated string owned by the plugin.
    unsafe {
        if NET.getProperties.unwrap()(0, &mut p) != ncclSuccess || p.name.is_null() {
            return "?".into();
        }
        CStr::from_ptr(p.name).to_string_lossy().into_owned()
    }
}

/// Runs every size on this rank; `Ok(false)` if any element was wrong.
fn run_rank(o: &Opts, rank: usize, dir: &Path) -> Result<bool, String> {
    let mut ring = Ring::connect(rank, o.ranks, dir, o.max_bytes / 4)?;
    let mut rows = Vec::new();
    for bytes in sizes(o) {
        let count = bytes / 4;
        let mut total = Duration::ZERO;
        let mut worst = 0;
        for it in 0..o.warmup + o.iters {
            ring.fill(count);
            let t0 = Instant::now();
            ring.allreduce(count)?;
            if it >= o.warmup {
                total += t0.elapsed();
            }
            worst = worst.max(ring.wrong(count));
        }
        rows.push(Row {
            bytes,
            time_us: total.as_secs_f64() * 1e6 / o.iters as f64,
            wrong: worst,
        });
    }
    ring.close()?;
    let mine_ok = rows.iter().all(|r| r.wrong == 0);
    if rank != 0 {
        let text: String = rows
            .iter()
            .map(|r| format!("{} {} {}\n", r.bytes, r.time_us, r.wrong))
            .collect();
        publish(&dir.join(format!("result-{rank}")), text.as_bytes())?;
        return Ok(mine_ok);
    }
    for peer in 1..o.ranks {
        let text = wait_for_file(
            &dir.join(format!("result-{peer}")),
            &format!("results of rank {peer}"),
        )?;
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != rows.len() {
            return Err(format!(
                "rank {peer} reported {} sizes, expected {}",
                lines.len(),
                rows.len()
            ));
        }
        for (row, line) in rows.iter_mut().zip(lines) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = (f.len() == 3)
                .then(|| {
                    Some((
                        f[0].parse::<usize>().ok()?,
                        f[1].parse::<f64>().ok()?,
                        f[2].parse::<usize>().ok()?,
                    ))
                })
                .flatten();
            match parsed {
                Some((b, t, w)) if b == row.bytes => {
                    // A collective takes as long as its slowest rank.
                    row.time_us = row.time_us.max(t);
                    row.wrong += w;
                }
                _ => return Err(format!("rank {peer} reported a malformed line {line:?}")),
            }
        }
    }
    print_rows(o, &rows);
    Ok(rows.iter().all(|r| r.wrong == 0))
}

fn bandwidths(o: &Opts, r: &Row) -> (f64, f64) {
    let algbw = r.bytes as f64 / (r.time_us * 1e-6) / 1e9;
    (algbw, algbw * 2.0 * (o.ranks - 1) as f64 / o.ranks as f64)
}

fn print_rows(o: &Opts, rows: &[Row]) {
    if o.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let (alg, bus) = bandwidths(o, r);
                format!(
                    "{{\"size\":{},\"count\":{},\"type\":\"float\",\"redop\":\"sum\",\"time_us\":{:.2},\"algbw_gbps\":{:.6},\"busbw_gbps\":{:.6},\"wrong\":{}}}",
                    r.bytes,
                    r.bytes / 4,
                    r.time_us,
                    alg,
                    bus,
                    r.wrong
                )
            })
            .collect();
        println!(
            "{{\"ranks\":{},\"iters\":{},\"rows\":[{}]}}",
            o.ranks,
            o.iters,
            items.join(",")
        );
        return;
    }
    println!(
        "# halo ring all-reduce: {} ranks, device 0 ({}), {} iterations after {} warm-up",
        o.ranks,
        device_name(),
        o.iters,
        o.warmup
    );
    println!("#");
    println!(
        "# {:>10} {:>12} {:>6} {:>6} {:>12} {:>12} {:>12} {:>7}",
        "size(B)",
        "count(elems)",
        "type",
        "redop",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "#wrong"
    );
    let mut bus_sum = 0.0;
    for r in rows {
        let (alg, bus) = bandwidths(o, r);
        bus_sum += bus;
        println!(
            "  {:>10} {:>12} {:>6} {:>6} {:>12.1} {:>12.6} {:>12.6} {:>7}",
            r.bytes,
            r.bytes / 4,
            "float",
            "sum",
            r.time_us,
            alg,
            bus,
            r.wrong
        );
    }
    println!(
        "# Out of bounds values : {} {}",
        rows.iter().map(|r| r.wrong).sum::<usize>(),
        if rows.iter().all(|r| r.wrong == 0) {
            "OK"
        } else {
            "FAILED"
        }
    );
    println!(
        "# Avg bus bandwidth    : {:.6} GB/s",
        bus_sum / rows.len() as f64
    );
}
