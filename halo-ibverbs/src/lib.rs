//! Safe verbs layer: every `unsafe` libibverbs call of the project lives in this crate.
//!
//! Resources form a tree that the types enforce: a [`Context`] (open device) owns
//! [`ProtectionDomain`]s and [`CompletionQueue`]s; a [`MemoryRegion`] and a [`QueuePair`] keep
//! their PD (and the QP its CQs) alive, so nothing is destroyed while something still uses it.
//! libibverbs is loaded at run time; without it [`devices`] returns
//! [`VerbsError::LibraryUnavailable`] instead of failing to start.
//!
//! Posting is the one place the types cannot carry the promise. A work request names memory by
//! raw address and key, and the NIC reads or writes it *after* the call returns, until the
//! completion is polled: no Rust lifetime spans that, and a data path that ties each SGE to a
//! borrowed region would have to keep every borrow alive across `test` calls from C. So
//! [`QueuePair::post_send`] and [`QueuePair::post_recv`] are `unsafe fn`s whose contract says
//! exactly what must stay valid for how long; everything else in this crate is safe to call.

mod cq;
mod device;
mod error;
mod event;
mod gid;
mod gid_table;
mod mr;
mod pd;
mod port;
mod post;
mod qp;
mod wc;

pub use cq::{CompletionChannel, CompletionQueue, MAX_POLL_BATCH};
pub use device::{devices, library_available, Context, DeviceAttr, DeviceInfo, NodeType};
pub use error::{Result, VerbsError};
pub use event::{AsyncEvent, AsyncEventKind, AsyncEventQueue, CqId, EventSubject};
pub use gid::{
    ip_in_subnet, select_gid, AddrFamily, Gid, GidEntry, GidSelector, GidType, IPV4_LOOPBACK_NET,
};
pub use mr::{AccessFlags, MemoryRegion};
pub use pd::ProtectionDomain;
pub use port::{LinkLayer, Mtu, PortAttr, PortState};
pub use post::{RecvWr, SendOp, SendWr, Sge, MAX_SGE_PER_WR, MAX_WRS_PER_POST};
pub use qp::{QpCaps, QpState, QueuePair, RtrParams, RtsParams, MAX_PSN};
pub use wc::{WcError, WcOpcode, WcStatus, WorkCompletion};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn resources_are_send_and_sync() {
        assert_send_sync::<Context>();
        assert_send_sync::<ProtectionDomain>();
        assert_send_sync::<MemoryRegion>();
        assert_send_sync::<CompletionChannel>();
        assert_send_sync::<CompletionQueue>();
        assert_send_sync::<QueuePair>();
        assert_send_sync::<AsyncEventQueue>();
        assert_send_sync::<VerbsError>();
    }
}
