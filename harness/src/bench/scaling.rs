//! Connection scaling: this process connects to K freshly spawned members in both directions (one
//! send comm and one receive comm per peer, as a rank talking to K neighbours holds), timing the
//! whole setup, and counts the verbs resources the plugin created for it. The counts come from the
//! kernel (`rdma -j resource show qp|mr`, filtered by this pid), so they include everything the
//! plugin registers for itself (FIFO, sizes array, staging) and nothing the benchmark registers.

use super::suites::{member_handle, spawn_member, Local};
use super::Options;
use crate::driver::handle_to_hex;
use serde_json::Value;
use std::process::Command;
use std::time::Instant;

/// Setup cost and resources of K peers, per connection (one send comm + one receive comm).
#[derive(Clone, Debug)]
pub struct ScalingRow {
    pub peers: usize,
    /// Wall time from the first `connect`/`accept` call until all 2K comms existed.
    pub setup_ms: f64,
    /// Queue pairs per peer; `None` when the `rdma` tool could not list them.
    pub qps_per_peer: Option<f64>,
    /// Memory regions and their bytes per peer.
    pub mrs_per_peer: Option<f64>,
    pub mr_bytes_per_peer: Option<f64>,
}

#[derive(Clone, Copy, Default)]
struct Resources {
    qps: usize,
    mrs: usize,
    mr_bytes: u64,
}

/// Objects carrying `"pid": pid` anywhere in `v`.
fn owned_by<'a>(v: &'a Value, pid: u64, out: &mut Vec<&'a serde_json::Map<String, Value>>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| owned_by(x, pid, out)),
        Value::Object(m) => {
            if m.get("pid").and_then(Value::as_u64) == Some(pid) {
                out.push(m);
            } else {
                m.values().for_each(|x| owned_by(x, pid, out));
            }
        }
        _ => {}
    }
}

fn list(kind: &str) -> Option<Value> {
    let out = Command::new("rdma")
        .args(["-j", "resource", "show", kind])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn snapshot() -> Option<Resources> {
    let pid = u64::from(std::process::id());
    let (qp, mr) = (list("qp")?, list("mr")?);
    let (mut qps, mut mrs) = (Vec::new(), Vec::new());
    owned_by(&qp, pid, &mut qps);
    owned_by(&mr, pid, &mut mrs);
    Some(Resources {
        qps: qps.len(),
        mrs: mrs.len(),
        mr_bytes: mrs
            .iter()
            .filter_map(|m| m.get("mrlen").and_then(Value::as_u64))
            .sum(),
    })
}

pub(super) fn measure(local: &Local, o: &Options, k: usize) -> Result<ScalingRow, String> {
    let mut members = Vec::with_capacity(k);
    for i in 0..k {
        members.push(spawn_member(o, i + 1)?);
    }
    let mut handles = Vec::with_capacity(k);
    for m in &mut members {
        handles.push(member_handle(&mut m.ctl, &local.plugin, o.timeout)?);
    }
    let before = snapshot();
    let mut listens = Vec::with_capacity(k);
    for m in &mut members {
        let (lc, h) = local.listen()?;
        m.ctl.send(&format!("connect {}", handle_to_hex(&h)))?;
        listens.push(lc);
    }
    let p = &local.plugin;
    let mut sends = vec![None; k];
    let mut recvs = vec![None; k];
    let t0 = Instant::now();
    while sends.iter().chain(&recvs).any(Option::is_none) {
        if t0.elapsed() > o.timeout {
            return Err(format!(
                "connection setup with {k} peers did not finish within {:?}",
                o.timeout
            ));
        }
        for i in 0..k {
            if sends[i].is_none() {
                let c = p
                    .connect(o.dev, &mut handles[i])
                    .map_err(|e| e.to_string())?;
                sends[i] = (!c.is_null()).then_some(c);
            }
            if recvs[i].is_none() {
                let c = p.accept(listens[i]).map_err(|e| e.to_string())?;
                recvs[i] = (!c.is_null()).then_some(c);
            }
        }
        std::thread::yield_now();
    }
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after = snapshot();
    for m in &mut members {
        m.ctl.expect("connected", o.timeout)?;
    }
    for lc in listens {
        p.close_listen(lc).map_err(|e| e.to_string())?;
    }
    for c in sends.into_iter().flatten() {
        p.close_send(c).map_err(|e| e.to_string())?;
    }
    for c in recvs.into_iter().flatten() {
        p.close_recv(c).map_err(|e| e.to_string())?;
    }
    for m in members {
        m.finish(o.timeout)?;
    }
    let per = |f: fn(&Resources) -> f64| match (before, after) {
        (Some(b), Some(a)) => Some((f(&a) - f(&b)) / k as f64),
        _ => None,
    };
    Ok(ScalingRow {
        peers: k,
        setup_ms,
        qps_per_peer: per(|r| r.qps as f64),
        mrs_per_peer: per(|r| r.mrs as f64),
        mr_bytes_per_peer: per(|r| r.mr_bytes as f64),
    })
}
