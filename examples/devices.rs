//! Shows what the plugin sees: every RDMA device, its ports and GID table (with the GID the
//! plugin's rules pick), then the devices and properties the plugin offers RCCL through its
//! newest table. `cargo run --example devices` (inside `scripts/softroce run` on machines without RDMA).

use halo_ffi::*;
use halo_ibverbs::{select_gid, Context, GidSelector};
use rccl_net_plugin::abi::ncclNetPlugin_v12 as NET;
use std::ffi::{c_int, CStr};
use std::process::ExitCode;

fn main() -> ExitCode {
    let devices = match halo_ibverbs::devices() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no RDMA devices: {e}");
            return ExitCode::FAILURE;
        }
    };
    for info in &devices {
        println!(
            "device {} guid {:#018x} ({:?})",
            info.name, info.guid, info.node_type
        );
        let ctx = match Context::open(&info.name) {
            Ok(c) => c,
            Err(e) => {
                println!("  cannot open: {e}");
                continue;
            }
        };
        let ports = ctx.query_device().map(|a| a.phys_port_cnt).unwrap_or(1);
        for port in 1..=ports {
            match ctx.query_port(port) {
                Ok(p) => println!(
                    "  port {port}: {:?} {:?} active MTU {} max msg {} B",
                    p.state,
                    p.link_layer,
                    p.active_mtu.bytes(),
                    p.max_msg_sz
                ),
                Err(e) => println!("  port {port}: {e}"),
            }
            let table = ctx.gid_table(port).unwrap_or_default();
            for g in &table {
                println!("    {g}");
            }
            match select_gid(&table, &GidSelector::default()) {
                Some(g) => println!(
                    "  selected GID (RoCE v2, IPv4): index {} ({}) -> NCCL_IB_GID_INDEX={}",
                    g.index, g.gid, g.index
                ),
                None => println!("  no RoCE v2 IPv4 GID on port {port}"),
            }
        }
    }
    // SAFETY: the plugin's own table, called as RCCL would.
    unsafe {
        let mut ctx = std::ptr::null_mut();
        let rc = NET.init.unwrap()(&mut ctx, 0, std::ptr::null_mut(), None, None);
        if rc != ncclSuccess {
            println!("plugin init failed: ncclResult_t {rc}");
            return ExitCode::FAILURE;
        }
        let mut n: c_int = 0;
        NET.devices.unwrap()(&mut n);
        println!(
            "plugin {:?} offers {n} device(s):",
            CStr::from_ptr(NET.name)
        );
        for d in 0..n {
            let mut p = ncclNetProperties_v12_t::zeroed();
            if NET.getProperties.unwrap()(d, &mut p) == ncclSuccess {
                println!(
                    "  [{d}] {} port {} speed {} Mbps ptrSupport {:#x} maxRecvs {} regIsGlobal {} pciPath {}",
                    CStr::from_ptr(p.name).to_string_lossy(),
                    p.port,
                    p.speed,
                    p.ptrSupport,
                    p.maxRecvs,
                    p.regIsGlobal,
                    CStr::from_ptr(p.pciPath).to_string_lossy()
                );
            }
        }
        NET.finalize.unwrap()(ctx);
    }
    ExitCode::SUCCESS
}
