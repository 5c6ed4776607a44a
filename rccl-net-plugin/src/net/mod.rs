//! The version-neutral plugin: devices, comms, requests, registrations. `abi` adapts it to each
//! `ncclNet_vN_t`; nothing here knows about ABI versions.

mod buffer;
mod comm_handle;
mod connect;
mod device;
mod error;
mod events;
mod flush;
mod link;
mod nap;
mod poster;
pub mod profiler;
mod recv_comm;
mod reg;
mod regcache;
mod request;
mod send_comm;
mod stats;

pub use comm_handle::{CommHandle, COMM_RECV, COMM_SEND};
pub use connect::{ConnSettings, Connecting, ListenComm};
pub use device::NetDevice;
pub use error::{contained, panic_text, NetError, NetResult};
pub use recv_comm::RecvComm;
pub use reg::{register, register_dmabuf};
pub use regcache::{data_access, MrHandle, RegCache, RegKind};
pub use request::Request;
pub use send_comm::SendComm;
// Sizes in net's own signatures (the listen handle, the buffers of one receive), so that callers
// need nothing below net.
pub use crate::oob::HANDLE_SIZE;
pub use crate::protocol::MAX_RECVS;

use crate::config::PluginConfig;
use crate::log::{info, INIT, NET};
use crate::oob::{ListenHandle, HANDLE_USED};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Process-wide state, built by the first successful `init`.
pub struct Plugin {
    pub cfg: Arc<PluginConfig>,
    pub devices: Vec<Arc<NetDevice>>,
}

/// The state `init` built, and who holds it.
struct Slot {
    plugin: Option<Arc<Plugin>>,
    /// Live v11+ contexts (`init` … `finalize`, one per communicator).
    contexts: usize,
    /// A v6–v10 `init` ran: that ABI has no `finalize`, so the state stays until the library is
    /// unloaded.
    unfinalized: bool,
}

static PLUGIN: Mutex<Slot> = Mutex::new(Slot {
    plugin: None,
    contexts: 0,
    unfinalized: false,
});

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `init` of the ABI versions without `finalize` (v6–v10): builds the state once; it lives until
/// [`release_all`] (the library's unload).
pub fn init() -> NetResult<Arc<Plugin>> {
    let mut slot = lock(&PLUGIN);
    let p = build(&mut slot)?;
    slot.unfinalized = true;
    Ok(p)
}

/// `init` of one v11+ context: builds the state if no context holds it, and counts the context.
/// Every successful call is paired with one [`finalize_context`].
pub fn init_context() -> NetResult<Arc<Plugin>> {
    let mut slot = lock(&PLUGIN);
    let p = build(&mut slot)?;
    slot.contexts += 1;
    Ok(p)
}

/// `finalize` of one v11+ context. The last one releases everything `init` built (devices,
/// protection domains, registrations no comm holds, connections still in progress), unless a
/// v6–v10 `init` also ran; comms still open keep their own device alive until they close.
pub fn finalize_context() -> NetResult<()> {
    let mut slot = lock(&PLUGIN);
    if slot.contexts == 0 {
        return Err(NetError::InvalidUsage(
            "finalize without a matching init".into(),
        ));
    }
    slot.contexts -= 1;
    if slot.contexts > 0 || slot.unfinalized {
        return Ok(());
    }
    let p = slot.plugin.take();
    drop(slot);
    release(p);
    Ok(())
}

/// Releases everything `init` built, whoever holds it: the library is being unloaded.
pub fn release_all() {
    let p = {
        let mut slot = lock(&PLUGIN);
        slot.contexts = 0;
        slot.unfinalized = false;
        slot.plugin.take()
    };
    release(p);
}

/// Drops the state and the connections in progress, and says what stays alive (held by comms
/// or registrations RCCL has not given back).
fn release(p: Option<Arc<Plugin>>) {
    let pending = lock(&CONNECTING).take().map_or(0, |m| m.len());
    let Some(p) = p else { return };
    let held: Vec<String> = p
        .devices
        .iter()
        .filter(|d| Arc::strong_count(d) > 1)
        .map(|d| format!("{} ({} registrations)", d.describe(), d.regs.len()))
        .collect();
    drop(p);
    if held.is_empty() {
        info!(
            INIT | NET,
            "released all devices{}",
            if pending > 0 {
                format!(" and {pending} connection(s) in progress")
            } else {
                String::new()
            }
        );
    } else {
        info!(
            INIT | NET,
            "released the plugin's state; still held by open comms or registrations: {}",
            held.join(", ")
        );
    }
}

/// Reads the configuration and finds the devices, unless the state exists already.
fn build(slot: &mut Slot) -> NetResult<Arc<Plugin>> {
    if let Some(p) = slot.plugin.as_ref() {
        return Ok(Arc::clone(p));
    }
    let cfg = PluginConfig::from_env()
        .map_err(|e| NetError::InvalidArgument(format!("{e}; halo is disabled")))?;
    crate::log::set_trace(cfg.trace);
    let devices = device::discover(&cfg)?
        .into_iter()
        .map(Arc::new)
        .collect::<Vec<_>>();
    info!(INIT | NET, "{} device(s) ready", devices.len());
    let p = Arc::new(Plugin {
        cfg: Arc::new(cfg),
        devices,
    });
    slot.plugin = Some(Arc::clone(&p));
    Ok(p)
}

/// The state `init` built.
pub fn plugin() -> NetResult<Arc<Plugin>> {
    lock(&PLUGIN)
        .plugin
        .as_ref()
        .cloned()
        .ok_or_else(|| NetError::InvalidUsage("the plugin is used before a successful init".into()))
}

impl Plugin {
    pub fn device(&self, dev: i32) -> NetResult<&Arc<NetDevice>> {
        usize::try_from(dev)
            .ok()
            .and_then(|d| self.devices.get(d))
            .ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "device {dev} does not exist ({} devices)",
                    self.devices.len()
                ))
            })
    }

    fn settings(&self, traffic_class: Option<i32>) -> ConnSettings {
        ConnSettings {
            cfg: Arc::clone(&self.cfg),
            traffic_class: traffic_class
                .filter(|&t| (0..=255).contains(&t))
                .map_or(self.cfg.traffic_class, |t| t as u8),
        }
    }

    /// `listen`: binds the bootstrap socket and fills RCCL's handle.
    pub fn listen(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        traffic_class: Option<i32>,
    ) -> NetResult<Box<ListenComm>> {
        let d = self.device(dev)?;
        let ip = crate::oob::pick_bind_address(
            d.netdev.as_deref(),
            d.ip,
            self.cfg.socket_ifname.as_ref(),
        )
        .map_err(|e| {
            NetError::System(format!("no address to listen on for {}: {e}", d.describe()))
        })?
        .1;
        let (comm, h) = ListenComm::bind(Arc::clone(d), self.settings(traffic_class), ip)?;
        h.encode(handle);
        info!(NET, "listening on {} for {}", h.addr, d.describe());
        Ok(comm)
    }

    /// `connect`: one step of the connection whose progress lives in `handle`.
    pub fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        traffic_class: Option<i32>,
    ) -> NetResult<Option<Box<SendComm>>> {
        let d = self.device(dev)?;
        let h = ListenHandle::decode(handle)
            .map_err(|e| NetError::InvalidArgument(format!("connect handle: {e}")))?;
        let mut guard = lock(&CONNECTING);
        let pending = guard.get_or_insert_with(HashMap::new);
        let token = match stage_token(handle) {
            Some(t) => t,
            None => {
                let c = Connecting::start(Arc::clone(d), self.settings(traffic_class), h)?;
                let t = crate::oob::random_u64()
                    .map_err(|e| NetError::System(format!("random bytes: {e}")))?
                    | 1;
                pending.insert(t, c);
                set_stage_token(handle, Some(t));
                t
            }
        };
        let Some(c) = pending.get_mut(&token) else {
            return Err(NetError::InvalidArgument(
                "connect handle carries the progress of a connection this process does not know (stale or copied handle)".into(),
            ));
        };
        let r = c.poll();
        if !matches!(r, Ok(None)) {
            pending.remove(&token);
            set_stage_token(handle, None);
        }
        r
    }
}

/// Connections in progress, keyed by the token kept in the connect handle.
static CONNECTING: Mutex<Option<HashMap<u64, Connecting>>> = Mutex::new(None);

/// Where the connect progress token lives in the handle: after the listen handle's bytes.
const STAGE_AT: usize = HANDLE_USED + 16;
const STAGE_MAGIC: [u8; 8] = *b"HALOSTAG";

fn stage_token(handle: &[u8; HANDLE_SIZE]) -> Option<u64> {
    (handle[STAGE_AT..STAGE_AT + 8] == STAGE_MAGIC).then(|| {
        u64::from_le_bytes(
            handle[STAGE_AT + 8..STAGE_AT + 16]
                .try_into()
                .expect("8 bytes"),
        )
    })
}

fn set_stage_token(handle: &mut [u8; HANDLE_SIZE], token: Option<u64>) {
    let area = &mut handle[STAGE_AT..STAGE_AT + 16];
    match token {
        Some(t) => {
            area[..8].copy_from_slice(&STAGE_MAGIC);
            area[8..].copy_from_slice(&t.to_le_bytes());
        }
        None => area.fill(0),
    }
}

/// Device properties in version-neutral form.
pub struct Props {
    pub dev: Arc<NetDevice>,
    pub ptr_support: i32,
    pub max_recvs: i32,
    pub max_comms: i32,
    pub latency: f32,
    pub max_p2p_bytes: usize,
    /// Receives may land in GPU memory: ask RCCL to flush them (`forceFlush`).
    pub force_flush: bool,
}

impl Plugin {
    pub fn properties(&self, dev: i32) -> NetResult<Props> {
        let d = self.device(dev)?;
        Ok(Props {
            dev: Arc::clone(d),
            ptr_support: d.gpu.ptr_support(),
            max_recvs: MAX_RECVS as i32,
            max_comms: d.dev_attr.max_qp.min(i32::MAX as u32) as i32,
            latency: 0.0,
            // `test` reports sizes as int: no message may be larger.
            max_p2p_bytes: i32::MAX as usize,
            force_flush: d.gpu.gpu_receives(),
        })
    }
}
