//! Ring all-reduce of f32 sums between N processes on one machine, through the plugin library's
//! v8 table (loaded as RCCL loads it) with host buffers, printed like rccl-tests'
//! `all_reduce_perf`. The ring itself is `halo_harness::bench::Ring`, shared with netbench.
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

use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use halo_harness::bench::{Net, Polls, Ring};
use halo_harness::driver::{Opaque, Plugin};
use halo_harness::log::quiet_logger;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

/// Bound on every single wait of a rank (peer handle, connect, one transfer, result files).
const WAIT: Duration = Duration::from_secs(120);

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

/// One size's outcome on one rank (rank 0 folds the others' into its own).
#[derive(Clone, Copy)]
struct Row {
    bytes: usize,
    time_us: f64,
    wrong: usize,
}

fn device_name(plugin: &Plugin) -> String {
    plugin
        .properties(0)
        .map(|p| p.name)
        .unwrap_or_else(|_| "?".into())
}

/// The plugin library next to this example (`target/<profile>/librccl_net_plugin.so`).
fn plugin_path() -> Result<PathBuf, String> {
    halo_harness::artifacts::plugin_library_if_built().ok_or_else(|| {
        "the plugin is not built next to this example: cargo build -p rccl-net-plugin".to_string()
    })
}

/// Listens, publishes the handle, and connects to rank r+1 while accepting from rank r-1.
fn connect_ring(net: &Net, rank: usize, n: usize, dir: &Path) -> Result<(Opaque, Opaque), String> {
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let lc = net
        .plugin
        .listen(0, &mut handle)
        .map_err(|e| e.to_string())?;
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
    let pair = net.connect_pair(0, lc, &mut peer_handle).map_err(|e| {
        format!(
            "ring connection (to rank {next}, from rank {}): {e}",
            (rank + n - 1) % n
        )
    })?;
    net.plugin.close_listen(lc).map_err(|e| e.to_string())?;
    Ok(pair)
}

/// Runs every size on this rank; `Ok(false)` if any element was wrong.
fn run_rank(o: &Opts, rank: usize, dir: &Path) -> Result<bool, String> {
    let mut plugin = Plugin::load(&plugin_path()?, 8)?;
    plugin
        .init(quiet_logger(), rank as u64)
        .map_err(|e| e.to_string())?;
    if plugin.devices().map_err(|e| e.to_string())? < 1 {
        return Err("the plugin found no device".into());
    }
    let net = Net {
        plugin: &plugin,
        timeout: o.timeout.min(WAIT),
    };
    let (send, recv) = connect_ring(&net, rank, o.ranks, dir)?;
    let mut ring = Ring::new(net, rank, o.ranks, send, recv, o.max_bytes / 4)?;
    let mut polls = Polls::default();
    let mut rows = Vec::new();
    for bytes in sizes(o) {
        let t = ring.run(bytes / 4, o.warmup, o.iters, &mut polls)?;
        rows.push(Row {
            bytes,
            time_us: t.time_us,
            wrong: t.wrong,
        });
    }
    ring.release()?;
    plugin.close_send(send).map_err(|e| e.to_string())?;
    plugin.close_recv(recv).map_err(|e| e.to_string())?;
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
    print_rows(o, &rows, &device_name(&plugin));
    Ok(rows.iter().all(|r| r.wrong == 0))
}

fn bandwidths(o: &Opts, r: &Row) -> (f64, f64) {
    let algbw = r.bytes as f64 / (r.time_us * 1e-6) / 1e9;
    (algbw, algbw * 2.0 * (o.ranks - 1) as f64 / o.ranks as f64)
}

fn print_rows(o: &Opts, rows: &[Row], device: &str) {
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
        o.ranks, device, o.iters, o.warmup
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
