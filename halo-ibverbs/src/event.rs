//! Asynchronous events of a device: port state changes, fatal QP or CQ errors, device failure.
//!
//! libibverbs queues them on the context's async fd; [`AsyncEventQueue`] makes that fd
//! non-blocking, so reading it never waits. Each event is copied into a plain [`AsyncEvent`] and
//! acknowledged (`ibv_ack_async_event`) before it is returned: the caller never holds a raw event,
//! so it can neither forget the ack (which would make destroying the QP or CQ hang) nor use the
//! QP or CQ pointer after the ack.

use std::fmt;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr::addr_of;

use rdma_mummy_sys::{ibv_ack_async_event, ibv_async_event, ibv_get_async_event};

use crate::cq::CompletionQueue;
use crate::device::Context;
use crate::error::{Result, VerbsError};

/// What happened (`enum ibv_event_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AsyncEventKind {
    CqErr,
    QpFatal,
    QpReqErr,
    QpAccessErr,
    CommEst,
    SqDrained,
    PathMig,
    PathMigErr,
    DeviceFatal,
    PortActive,
    PortErr,
    LidChange,
    PkeyChange,
    SmChange,
    SrqErr,
    SrqLimitReached,
    QpLastWqeReached,
    ClientReregister,
    GidChange,
    WqFatal,
    DeviceSpeedChange,
    /// A type this crate does not know (a newer kernel or library).
    Unknown(u32),
}

impl AsyncEventKind {
    /// From the raw `ibv_event_type` value.
    pub fn from_raw(raw: u32) -> AsyncEventKind {
        use AsyncEventKind::*;
        match raw {
            0 => CqErr,
            1 => QpFatal,
            2 => QpReqErr,
            3 => QpAccessErr,
            4 => CommEst,
            5 => SqDrained,
            6 => PathMig,
            7 => PathMigErr,
            8 => DeviceFatal,
            9 => PortActive,
            10 => PortErr,
            11 => LidChange,
            12 => PkeyChange,
            13 => SmChange,
            14 => SrqErr,
            15 => SrqLimitReached,
            16 => QpLastWqeReached,
            17 => ClientReregister,
            18 => GidChange,
            19 => WqFatal,
            20 => DeviceSpeedChange,
            other => Unknown(other),
        }
    }

    /// The name libibverbs' headers give it, e.g. `IBV_EVENT_PORT_ERR`.
    pub fn name(self) -> &'static str {
        use AsyncEventKind::*;
        match self {
            CqErr => "IBV_EVENT_CQ_ERR",
            QpFatal => "IBV_EVENT_QP_FATAL",
            QpReqErr => "IBV_EVENT_QP_REQ_ERR",
            QpAccessErr => "IBV_EVENT_QP_ACCESS_ERR",
            CommEst => "IBV_EVENT_COMM_EST",
            SqDrained => "IBV_EVENT_SQ_DRAINED",
            PathMig => "IBV_EVENT_PATH_MIG",
            PathMigErr => "IBV_EVENT_PATH_MIG_ERR",
            DeviceFatal => "IBV_EVENT_DEVICE_FATAL",
            PortActive => "IBV_EVENT_PORT_ACTIVE",
            PortErr => "IBV_EVENT_PORT_ERR",
            LidChange => "IBV_EVENT_LID_CHANGE",
            PkeyChange => "IBV_EVENT_PKEY_CHANGE",
            SmChange => "IBV_EVENT_SM_CHANGE",
            SrqErr => "IBV_EVENT_SRQ_ERR",
            SrqLimitReached => "IBV_EVENT_SRQ_LIMIT_REACHED",
            QpLastWqeReached => "IBV_EVENT_QP_LAST_WQE_REACHED",
            ClientReregister => "IBV_EVENT_CLIENT_REREGISTER",
            GidChange => "IBV_EVENT_GID_CHANGE",
            WqFatal => "IBV_EVENT_WQ_FATAL",
            DeviceSpeedChange => "IBV_EVENT_DEVICE_SPEED_CHANGE",
            Unknown(_) => "IBV_EVENT_(unknown)",
        }
    }

    /// Which object the event's `element` names, as libibverbs fills it in.
    fn subject_kind(self) -> SubjectKind {
        use AsyncEventKind::*;
        match self {
            CqErr => SubjectKind::Cq,
            QpFatal | QpReqErr | QpAccessErr | CommEst | SqDrained | PathMig | PathMigErr
            | QpLastWqeReached => SubjectKind::Qp,
            SrqErr | SrqLimitReached => SubjectKind::Srq,
            WqFatal => SubjectKind::Wq,
            DeviceFatal => SubjectKind::Device,
            // libibverbs stores the raw element as a port number for every other type.
            PortActive | PortErr | LidChange | PkeyChange | SmChange | ClientReregister
            | GidChange | DeviceSpeedChange | Unknown(_) => SubjectKind::Port,
        }
    }
}

impl fmt::Display for AsyncEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AsyncEventKind::Unknown(raw) => write!(f, "IBV_EVENT_(unknown {raw})"),
            k => f.write_str(k.name()),
        }
    }
}

#[derive(Clone, Copy)]
enum SubjectKind {
    Qp,
    Cq,
    Srq,
    Wq,
    Port,
    Device,
}

/// Identity of a completion queue in [`EventSubject::Cq`]; compare with
/// [`CompletionQueue::id`]. Unique among the live CQs of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqId(pub usize);

impl CompletionQueue {
    /// This CQ's identity, as events about it carry it.
    pub fn id(&self) -> CqId {
        CqId(self.as_ptr() as usize)
    }
}

/// The object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventSubject {
    /// A queue pair, by number.
    Qp(u32),
    /// A completion queue.
    Cq(CqId),
    /// A shared receive queue (not used by this crate's users).
    Srq,
    /// A work queue (not used by this crate's users).
    Wq,
    /// A port, numbered from 1.
    Port(u8),
    /// The whole device.
    Device,
}

impl fmt::Display for EventSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventSubject::Qp(n) => write!(f, "qp {n:#x}"),
            EventSubject::Cq(id) => write!(f, "cq {:#x}", id.0),
            EventSubject::Srq => f.write_str("an SRQ"),
            EventSubject::Wq => f.write_str("a WQ"),
            EventSubject::Port(p) => write!(f, "port {p}"),
            EventSubject::Device => f.write_str("the device"),
        }
    }
}

/// One asynchronous event, already acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AsyncEvent {
    pub kind: AsyncEventKind,
    pub subject: EventSubject,
}

impl fmt::Display for AsyncEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.kind, self.subject)
    }
}

/// The async events of one open device, read without blocking.
pub struct AsyncEventQueue {
    ctx: Context,
}

impl std::fmt::Debug for AsyncEventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEventQueue")
            .field("device", &self.ctx.name())
            .finish()
    }
}

impl Context {
    /// The context's async event fd.
    fn async_fd(&self) -> RawFd {
        // SAFETY: the context is open; async_fd is set at open and never changes.
        unsafe { (*self.as_ptr()).async_fd }
    }

    /// Makes this context's async event fd non-blocking and returns the queue that reads it.
    /// From then on nobody may wait on the fd with a blocking `ibv_get_async_event`.
    pub fn async_events(&self) -> Result<AsyncEventQueue> {
        let fd = self.async_fd();
        // SAFETY: fd is the context's open async fd; F_GETFL/F_SETFL only change its flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(VerbsError::last_os("fcntl(async fd, F_GETFL)", || {
                self.name()
            }));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(VerbsError::last_os(
                "fcntl(async fd, F_SETFL O_NONBLOCK)",
                || self.name(),
            ));
        }
        Ok(AsyncEventQueue { ctx: self.clone() })
    }
}

impl AsyncEventQueue {
    /// The device these events come from.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The next pending event, acknowledged; `None` when none is pending. Never blocks.
    pub fn next(&self) -> Result<Option<AsyncEvent>> {
        let mut raw = MaybeUninit::<ibv_async_event>::uninit();
        // SAFETY: the context is open and raw is a valid out-pointer; the fd is non-blocking, so
        // the call returns -1 with EAGAIN instead of waiting when nothing is queued.
        let ret = unsafe { ibv_get_async_event(self.ctx.as_ptr(), raw.as_mut_ptr()) };
        if ret != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK || errno == libc::EINTR {
                return Ok(None);
            }
            return Err(VerbsError::Os {
                op: "ibv_get_async_event",
                on: self.ctx.name().to_string(),
                errno: if errno == 0 { libc::EIO } else { errno },
            });
        }
        let p = raw.as_mut_ptr();
        // The type is read as the C int it is: the binding's Rust enum would be undefined
        // behaviour for a value a newer kernel adds.
        // SAFETY: the call filled the event; event_type is a 4-byte C enum.
        let kind =
            AsyncEventKind::from_raw(unsafe { addr_of!((*p).event_type).cast::<u32>().read() });
        let subject = match kind.subject_kind() {
            // SAFETY: for QP events libibverbs stores the QP's pointer, valid until the ack below
            // (destroying the QP waits for it).
            SubjectKind::Qp => EventSubject::Qp(unsafe { (*(*p).element.qp).qp_num }),
            // SAFETY: for CQ events the element is the CQ's pointer; only its value is kept.
            SubjectKind::Cq => EventSubject::Cq(CqId(unsafe { (*p).element.cq } as usize)),
            SubjectKind::Srq => EventSubject::Srq,
            SubjectKind::Wq => EventSubject::Wq,
            SubjectKind::Device => EventSubject::Device,
            SubjectKind::Port => {
                // SAFETY: for port events the element holds the port number.
                let port = unsafe { (*p).element.port_num };
                EventSubject::Port(u8::try_from(port).unwrap_or(0))
            }
        };
        // SAFETY: the event came from ibv_get_async_event and is acknowledged exactly once; no
        // pointer from it is used afterwards.
        unsafe { ibv_ack_async_event(p) };
        Ok(Some(AsyncEvent { kind, subject }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_type_round_trips_and_has_its_header_name() {
        for raw in 0..=20u32 {
            let k = AsyncEventKind::from_raw(raw);
            assert!(!matches!(k, AsyncEventKind::Unknown(_)), "{raw}");
            assert!(k.name().starts_with("IBV_EVENT_"), "{raw}");
        }
        assert_eq!(AsyncEventKind::from_raw(10).name(), "IBV_EVENT_PORT_ERR");
        assert_eq!(AsyncEventKind::from_raw(1).name(), "IBV_EVENT_QP_FATAL");
        assert_eq!(
            AsyncEventKind::from_raw(99).to_string(),
            "IBV_EVENT_(unknown 99)"
        );
    }

    #[test]
    fn raw_values_match_the_binding() {
        use rdma_mummy_sys::ibv_event_type as T;
        for (t, k) in [
            (T::IBV_EVENT_CQ_ERR, AsyncEventKind::CqErr),
            (T::IBV_EVENT_QP_FATAL, AsyncEventKind::QpFatal),
            (T::IBV_EVENT_PATH_MIG_ERR, AsyncEventKind::PathMigErr),
            (T::IBV_EVENT_DEVICE_FATAL, AsyncEventKind::DeviceFatal),
            (T::IBV_EVENT_PORT_ACTIVE, AsyncEventKind::PortActive),
            (T::IBV_EVENT_PORT_ERR, AsyncEventKind::PortErr),
            (T::IBV_EVENT_GID_CHANGE, AsyncEventKind::GidChange),
            (
                T::IBV_EVENT_DEVICE_SPEED_CHANGE,
                AsyncEventKind::DeviceSpeedChange,
            ),
        ] {
            assert_eq!(AsyncEventKind::from_raw(t as u32), k);
        }
    }

    #[test]
    fn events_name_their_subject() {
        let e = AsyncEvent {
            kind: AsyncEventKind::QpFatal,
            subject: EventSubject::Qp(0x11),
        };
        assert_eq!(e.to_string(), "IBV_EVENT_QP_FATAL on qp 0x11");
        let e = AsyncEvent {
            kind: AsyncEventKind::PortErr,
            subject: EventSubject::Port(1),
        };
        assert_eq!(e.to_string(), "IBV_EVENT_PORT_ERR on port 1");
    }
}
