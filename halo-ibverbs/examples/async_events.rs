//! Prints the asynchronous events of an RDMA device as they arrive, with the time since start:
//! a quick way to see what a device raises when its link goes down or comes back.
//!
//! `async_events [DEVICE] [SECONDS]` (defaults: `HALO_RDMA_DEV` or the first device, 10 s).
//! Inside a Soft-RoCE guest, for example:
//!   target/debug/examples/async_events rxe0 6 & sleep 1; ip link set eth0 down; sleep 2; ip link set eth0 up; wait

use std::process::ExitCode;
use std::time::{Duration, Instant};

use halo_ibverbs::{devices, Context};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .or_else(|| std::env::var("HALO_RDMA_DEV").ok())
        .or_else(|| devices().ok()?.first().map(|d| d.name.clone()));
    let Some(name) = name else {
        eprintln!("async_events: no RDMA device");
        return ExitCode::FAILURE;
    };
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let queue = match Context::open(&name).and_then(|c| c.async_events()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("async_events: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("watching {name} for {secs} s");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        match queue.next() {
            Ok(Some(ev)) => println!("{:8.3} s  {name}: {ev}", start.elapsed().as_secs_f64()),
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                eprintln!("async_events: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
