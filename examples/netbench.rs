//! Network benchmark of the plugin through its C ABI: latency, bandwidth, message rate, ring
//! all-reduce, decode-shaped steps of small all-reduces and connection scaling, optionally against perftest on the same device.
//!
//! ```text
//! netbench [--plugin PATH] [--version N] [--dev N] [--json] [--quick] [--window N] [--timeout SECS]
//!          [--compare-perftest [--ibdev rxe0] [--gid-index N] [--perftest-port P]]
//!          [--latency] [--bandwidth] [--msgrate] [--allreduce] [--decode] [--scaling]
//!          [--server ADDR:PORT | --connect HOST:PORT] [--wire-dev IBDEV]
//! ```
//!
//! With no suite flag every suite runs. The latency, message-rate, bandwidth and decode rows also
//! give the packets on the wire per message, read from the verbs device's counters around each
//! timed loop (`--wire-dev`; default: perftest's device, else the plugin's). The far end is a copy of this program spawned on the same
//! machine, or with `--connect` a `netbench --server` on another host (or guest). On Soft-RoCE:
//!
//! ```text
//! scripts/softroce run --timeout 900 -- target/release/examples/netbench \
//!     --plugin target/release/librccl_net_plugin.so --compare-perftest --ibdev rxe0 --gid-index 1
//! ```
//!
//! Comparison of several plugins: `--compare NAME=PATH[,NAME=PATH...]` (repeatable) instead of
//! `--plugin`, `--env NAME:VAR=VALUE` (repeatable) for what plugin NAME needs in its environment,
//! `--rounds N` (default 2), `--save FILE` (the JSON of the comparison so far, rewritten after every
//! run, so that finished runs survive one that is killed). Each round runs every plugin once, in the order given turned by one
//! plugin per round (A B C, B C A, …), each in a
//! child process (`netbench --plugin PATH --json` with that plugin's environment, which its far
//! ends inherit), then perftest once with `--compare-perftest`; the result is one table per figure
//! with every plugin's value per round and its ratio to the best other plugin and to perftest.
//!
//! ```text
//! netbench --compare halo=librccl_net_plugin.so,nccl-ib=nccl-ib.so --env nccl-ib:NCCL_IB_HCA=rxe1 \
//!     --env halo:NCCL_IB_HCA=rxe1 --compare-perftest --ibdev rxe1 --gid-index 1 --quick
//! ```
//! (`scripts/compare-peers.sh` sets up such a run on Soft-RoCE.) With `--connect HOST:PORT` every
//! run drives a `netbench --server` on another host instead of a local far end, so the other host
//! starts one server per run in the same order (`scripts/compare-peers-wire.sh` does this for two
//! Soft-RoCE guests joined by a wire); perftest is then left out.

use halo_harness::bench::compare::{self, CompareOptions, Entrant};
use halo_harness::bench::{self, MemberConfig, Options, PeerLink, PerftestDevice, Suites};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: netbench [--plugin PATH] [--version N] [--dev N] [--json] [--quick] \
[--window N] [--timeout SECS] [--compare-perftest [--ibdev DEV] [--gid-index N] [--perftest-port P]] \
[--latency] [--bandwidth] [--msgrate] [--allreduce] [--decode] [--scaling] [--server ADDR:PORT | --connect HOST:PORT] [--wire-dev IBDEV]
       netbench --compare NAME=PATH[,NAME=PATH...] [--env NAME:VAR=VALUE]... [--rounds N] [--save FILE] [other options as above, \
but --plugin and --server; --connect HOST:PORT without --compare-perftest]";

/// The plugin built next to this example (`target/<profile>/examples/netbench`).
fn default_plugin() -> Option<PathBuf> {
    halo_harness::artifacts::plugin_library_if_built()
}

enum Mode {
    Run(Options, bool),
    Serve(MemberConfig, String),
    Compare(CompareOptions, bool),
}

/// `NAME=PATH[,NAME=PATH...]` of `--compare`.
fn parse_entrants(list: &str, into: &mut Vec<Entrant>) -> Result<(), String> {
    for item in list.split(',').filter(|i| !i.is_empty()) {
        let (name, path) = item
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or(format!("--compare {item}: expected NAME=PATH"))?;
        into.push(Entrant {
            name: name.into(),
            plugin: PathBuf::from(path),
            env: Vec::new(),
        });
    }
    Ok(())
}

/// `NAME:VAR=VALUE` of `--env`.
fn parse_env(item: &str) -> Result<(String, String, String), String> {
    let (name, assign) = item
        .split_once(':')
        .ok_or(format!("--env {item}: expected NAME:VAR=VALUE"))?;
    let (var, value) = assign
        .split_once('=')
        .filter(|(v, _)| !v.is_empty())
        .ok_or(format!("--env {item}: expected NAME:VAR=VALUE"))?;
    Ok((name.into(), var.into(), value.into()))
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let mut plugin = None;
    let (mut version, mut dev, mut window, mut timeout) = (10u32, 0i32, 16usize, 300u64);
    let (mut json, mut quick, mut compare) = (false, false, false);
    let mut ibdev = std::env::var("HALO_RDMA_DEV").unwrap_or_else(|_| "rxe0".into());
    let mut gid_index: u32 = std::env::var("HALO_RDMA_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut port = 18515u16;
    let mut suites = Suites::NONE;
    let (mut server, mut connect) = (None, None);
    let mut wire_dev: Option<String> = None;
    let (mut entrants, mut envs, mut rounds) = (Vec::new(), Vec::new(), 2usize);
    let mut save: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or(format!("{a} needs a value\n{USAGE}"))
        };
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--plugin" => plugin = Some(PathBuf::from(val()?)),
            "--version" => version = num(val()?)? as u32,
            "--dev" => dev = num(val()?)? as i32,
            "--window" => window = num(val()?)?.max(1) as usize,
            "--timeout" => timeout = num(val()?)?,
            "--json" => json = true,
            "--quick" => quick = true,
            "--compare-perftest" => compare = true,
            "--ibdev" => ibdev = val()?,
            "--gid-index" => gid_index = num(val()?)? as u32,
            "--perftest-port" => port = num(val()?)? as u16,
            "--wire-dev" => wire_dev = Some(val()?),
            "--latency" => suites.latency = true,
            "--bandwidth" => suites.bandwidth = true,
            "--msgrate" => suites.msgrate = true,
            "--allreduce" => suites.allreduce = true,
            "--decode" => suites.decode = true,
            "--scaling" => suites.scaling = true,
            "--server" => server = Some(val()?),
            "--connect" => connect = Some(val()?),
            "--compare" => parse_entrants(&val()?, &mut entrants)?,
            "--env" => envs.push(parse_env(&val()?)?),
            "--rounds" => rounds = num(val()?)?.max(1) as usize,
            "--save" => save = Some(PathBuf::from(val()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    if !entrants.is_empty() {
        if plugin.is_some() || server.is_some() {
            return Err("--compare runs its plugins here: no --plugin or --server".into());
        }
        if connect.is_some() && compare {
            return Err(
                "--compare with --connect: perftest runs on one host only; leave out --compare-perftest"
                    .into(),
            );
        }
        for (name, var, value) in envs {
            let e = entrants.iter_mut().find(|e| e.name == name).ok_or(format!(
                "--env {name}:{var}=...: no plugin {name} in --compare"
            ))?;
            e.env.push((var, value));
        }
        if suites == Suites::NONE {
            suites = Suites::ALL;
        }
        // Each run: this program with the single-plugin options (the plugin and --json follow).
        let mut args: Vec<OsString> = vec![
            "--version".into(),
            version.to_string().into(),
            "--dev".into(),
            dev.to_string().into(),
            "--window".into(),
            window.to_string().into(),
            "--timeout".into(),
            timeout.to_string().into(),
        ];
        if quick {
            args.push("--quick".into());
        }
        // Packets per message: every run counts on the device perftest uses, unless told otherwise.
        if let Some(d) = wire_dev.clone().or_else(|| compare.then(|| ibdev.clone())) {
            args.push("--wire-dev".into());
            args.push(d.into());
        }
        // Two hosts: every run drives a `netbench --server` there (started anew for each run, in
        // the same order of rounds and plugins, e.g. by scripts/compare-peers-wire.sh).
        if let Some(addr) = &connect {
            args.push("--connect".into());
            args.push(addr.into());
        }
        for (on, flag) in [
            (suites.latency, "--latency"),
            (suites.bandwidth, "--bandwidth"),
            (suites.msgrate, "--msgrate"),
            (suites.allreduce, "--allreduce"),
            (suites.decode, "--decode"),
            (suites.scaling, "--scaling"),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        let program = std::env::current_exe()
            .map_err(|e| format!("cannot find own executable: {e}"))?
            .into_os_string();
        return Ok(Mode::Compare(
            CompareOptions {
                entrants,
                rounds,
                program,
                args,
                suites,
                quick,
                window,
                perftest: compare.then_some(PerftestDevice {
                    ibdev,
                    gid_index,
                    port,
                }),
                timeout: Duration::from_secs(timeout),
                save,
            },
            json,
        ));
    }
    if !envs.is_empty() {
        return Err("--env only goes with --compare".into());
    }
    if save.is_some() {
        return Err("--save only goes with --compare".into());
    }
    let plugin = plugin
        .or_else(default_plugin)
        .ok_or("no plugin next to this program: pass --plugin PATH")?;
    let timeout = Duration::from_secs(timeout);
    if let Some(bind) = server {
        let cfg = MemberConfig {
            plugin,
            version,
            dev,
            timeout,
        };
        return Ok(Mode::Serve(cfg, bind));
    }
    if suites == Suites::NONE {
        suites = Suites::ALL;
    }
    let peer = match connect {
        Some(addr) => PeerLink::Connect(addr),
        None => PeerLink::Spawn {
            program: std::env::current_exe()
                .map_err(|e| format!("cannot find own executable: {e}"))?
                .into_os_string(),
            args: Vec::new(),
        },
    };
    let perftest = compare.then_some(PerftestDevice {
        ibdev,
        gid_index,
        port,
    });
    Ok(Mode::Run(
        Options {
            plugin,
            version,
            dev,
            suites,
            quick,
            window,
            perftest,
            peer,
            timeout,
            wire_dev,
        },
        json,
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(r) = bench::member_main(&args) {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netbench member: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match parse(&args) {
        Err(e) => {
            eprintln!("netbench: {e}");
            return ExitCode::from(2);
        }
        Ok(Mode::Serve(cfg, bind)) => bench::serve_tcp(&cfg, &bind).map(|()| true),
        Ok(Mode::Compare(o, json)) => compare::run(&o).map(|c| {
            if json {
                println!("{}", compare::json(&c));
            } else {
                print!("{}", compare::text(&c));
            }
            c.all_ok()
        }),
        Ok(Mode::Run(o, json)) => bench::run(&o).map(|r| {
            if json {
                println!("{}", bench::report::json(&r));
            } else {
                print!("{}", bench::report::text(&r));
            }
            r.all_exact()
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("netbench: a run failed or all-reduce results were wrong");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("netbench: {e}");
            ExitCode::FAILURE
        }
    }
}
