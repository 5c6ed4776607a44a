//! Conformance driver for the net plugin: one run of `halo_harness::conformance` (loads the built
//! `.so`, picks one `ncclNetPlugin_vN` table and moves seeded random traffic between a sender and
//! a receiver process the way RCCL's proxy does; every byte and every size reported by `test` is
//! checked). `halo conformance` runs the whole set of checks for any plugin.
//!
//! One guest, both processes (the receiver is a child of the sender):
//!   scripts/softroce run -- target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so \
//!       --version 10 --role both --messages 200 --max-size 1048576 --seed 1
//!
//! Two guests joined by a wire (receiver on a, sender on b; the handle travels over TCP port 18600):
//!   scripts/softroce run2 --timeout 600 \
//!     --a 'target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --role recv --listen-on $HALO_GUEST_IP:18600 --messages 200 --max-size 1048576 --seed 7' \
//!     --b 'target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --role send --connect $HALO_PEER_IP:18600 --messages 200 --max-size 1048576 --seed 7'
//!
//! Soak mode (`--soak`): sizes 0 B ..= 64 KiB, 1 % of them up to `--max-size` (8 MiB by default
//! there); every message's checksum is recorded when the sender fills it and checked again when
//! its send completes, and the receiver checks every byte. Each side prints a `SOAK` line with the
//! message count, the digest of all checksums (equal on both sides when nothing was lost or
//! corrupted), the throughput, and a progress line every `--report-every` messages.
//!
//! Exit status: 0 and "CONFORMANCE PASS" on success; 1 on any mismatch or error (the message, tag
//! and size are printed); 3 in `--kill-peer-after` mode when the sender saw the expected error.

use halo_harness::conformance::{run, Options, Role};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> String {
    "usage: conformance --plugin PATH --version 6|8|10|11|12 --role send|recv|both \
     [--peer-file F | --listen-on IP:PORT | --connect IP:PORT] --messages N --max-size BYTES --seed S \
     [--timeout SECS] [--kill-peer-after K] [--soak] [--report-every N]"
        .to_string()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options::new(PathBuf::new(), 0);
    let mut max_size_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{}", usage()))
        };
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{a} {s}: {e}"));
        match a.as_str() {
            "--plugin" => o.plugin = PathBuf::from(val()?),
            "--version" => o.version = num(val()?)? as u32,
            "--role" => {
                o.role = match val()?.as_str() {
                    "send" => Role::Send,
                    "recv" => Role::Recv,
                    "both" => Role::Both,
                    r => return Err(format!("unknown role {r}\n{}", usage())),
                }
            }
            "--peer-file" => o.peer_file = Some(PathBuf::from(val()?)),
            "--listen-on" => o.listen_on = Some(val()?),
            "--connect" => o.connect = Some(val()?),
            "--messages" => o.messages = num(val()?)? as usize,
            "--max-size" => {
                o.max_size = num(val()?)? as usize;
                max_size_given = true;
            }
            "--soak" => o.soak = true,
            "--report-every" => o.report_every = num(val()?)? as usize,
            "--seed" => o.seed = num(val()?)?,
            "--timeout" => o.timeout = Duration::from_secs(num(val()?)?),
            "--kill-peer-after" => o.kill_peer_after = Some(num(val()?)? as usize),
            "--handle-on-stdout" => o.handle_on_stdout = true,
            "-h" | "--help" => return Err(usage()),
            _ => return Err(format!("unknown argument {a}\n{}", usage())),
        }
    }
    if o.plugin.as_os_str().is_empty() || o.version == 0 {
        return Err(format!("--plugin and --version are required\n{}", usage()));
    }
    if o.soak && !max_size_given {
        o.max_size = 8 << 20;
    }
    if o.max_size > i32::MAX as usize {
        return Err("--max-size must fit in an int (test reports int sizes)".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("CONFORMANCE FAIL ({:?}, v{}): {e}", opts.role, opts.version);
            ExitCode::FAILURE
        }
    }
}
