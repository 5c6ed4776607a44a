//! Network benchmark of the plugin through its C ABI: latency, bandwidth, message rate, ring
//! all-reduce and connection scaling, optionally against perftest on the same device.
//!
//! ```text
//! netbench [--plugin PATH] [--version N] [--dev N] [--json] [--quick] [--window N] [--timeout SECS]
//!          [--compare-perftest [--ibdev rxe0] [--gid-index N] [--perftest-port P]]
//!          [--latency] [--bandwidth] [--msgrate] [--allreduce] [--scaling]
//!          [--server ADDR:PORT | --connect HOST:PORT]
//! ```
//!
//! With no suite flag every suite runs. The far end is a copy of this program spawned on the same
//! machine, or with `--connect` a `netbench --server` on another host (or guest). On Soft-RoCE:
//!
//! ```text
//! scripts/softroce run --timeout 900 -- target/release/examples/netbench \
//!     --plugin target/release/librccl_net_plugin.so --compare-perftest --ibdev rxe0 --gid-index 1
//! ```

use halo_harness::bench::{self, MemberConfig, Options, PeerLink, PerftestDevice, Suites};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: netbench [--plugin PATH] [--version N] [--dev N] [--json] [--quick] \
[--window N] [--timeout SECS] [--compare-perftest [--ibdev DEV] [--gid-index N] [--perftest-port P]] \
[--latency] [--bandwidth] [--msgrate] [--allreduce] [--scaling] [--server ADDR:PORT | --connect HOST:PORT]";

/// The plugin built next to this example (`target/<profile>/examples/netbench`).
fn default_plugin() -> Option<PathBuf> {
    halo_harness::artifacts::plugin_library_if_built()
}

enum Mode {
    Run(Options, bool),
    Serve(MemberConfig, String),
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
    let mut suites = Suites {
        latency: false,
        bandwidth: false,
        msgrate: false,
        allreduce: false,
        scaling: false,
    };
    let (mut server, mut connect) = (None, None);
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
            "--latency" => suites.latency = true,
            "--bandwidth" => suites.bandwidth = true,
            "--msgrate" => suites.msgrate = true,
            "--allreduce" => suites.allreduce = true,
            "--scaling" => suites.scaling = true,
            "--server" => server = Some(val()?),
            "--connect" => connect = Some(val()?),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
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
    if suites
        == (Suites {
            latency: false,
            bandwidth: false,
            msgrate: false,
            allreduce: false,
            scaling: false,
        })
    {
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
            eprintln!("netbench: all-reduce results were wrong");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("netbench: {e}");
            ExitCode::FAILURE
        }
    }
}
