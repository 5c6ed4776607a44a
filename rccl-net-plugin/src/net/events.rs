//! Asynchronous device events: a port that goes down, a QP or CQ the device declares broken, a
//! device that dies. Without them such faults surface only when the transport's retries run out
//! (about 35 s with `NCCL_IB_TIMEOUT=20`, `NCCL_IB_RETRY_CNT=7`) or when the bootstrap socket
//! closes.
//!
//! No thread: the device's async fd is non-blocking and read by whichever call on the device's
//! comms is waiting (a `test` or `isend` that made no progress), at most every
//! [`POLL_EVERY_MS`]. Each comm owns a [`CommAlarm`] registered with its device; an event raises
//! the alarms of the comms it breaks, and their next call fails. Raised alarms stay raised: a
//! port that comes back (`PORT_ACTIVE`) serves new connections, never the comms that failed.
//!
//! Which event fails what ([`verdict`]) differs from NCCL's IB transport in one place on purpose:
//! NCCL fails comms on QP, CQ and device errors and only logs `PORT_ERR`, so a link that goes
//! down is noticed when the retries run out. Here `PORT_ERR` fails every comm on the port at once,
//! with the same `ncclRemoteError` the exhausted retries would have given (a brief link flap that
//! NCCL's retries would ride out therefore fails the comms).

use super::error::NetError;
use crate::log::{info, warn, NET};
use halo_ibverbs::{AsyncEvent, AsyncEventKind, AsyncEventQueue, CqId, EventSubject, Gid};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Least time between two reads of a device's async fd.
pub const POLL_EVERY_MS: u64 = 50;

/// What a comm is made of, as events name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub port: u8,
    /// The GID the comm's QPs send from.
    pub gid_index: u32,
    pub gid: Gid,
    pub qps: Vec<u32>,
    pub cqs: Vec<CqId>,
}

/// Which comms an event breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Qp(u32),
    Cq(CqId),
    Port(u8),
    Device,
}

impl Target {
    fn hits(self, w: &Watched) -> bool {
        match self {
            Target::Qp(n) => w.qps.contains(&n),
            Target::Cq(id) => w.cqs.contains(&id),
            Target::Port(p) => w.port == p,
            Target::Device => true,
        }
    }
}

/// How a log line about an event is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Warn,
    Info,
}

/// The error a failed comm reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The path to the peer is broken (`ncclRemoteError`, as exhausted retries would report).
    Remote,
    /// The local device is broken (`ncclSystemError`).
    System,
}

impl FaultKind {
    fn error(self, text: String) -> NetError {
        match self {
            FaultKind::Remote => NetError::Remote(text),
            FaultKind::System => NetError::System(text),
        }
    }
}

/// What an event means for this device's comms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Fail the comms `target` hits with an error of `kind` saying `why`.
    Fail {
        target: Target,
        kind: FaultKind,
        why: &'static str,
    },
    /// The port's GID table changed: fail the comms of the port whose GID is gone.
    CheckGids(u8),
    /// Nothing fails; the event is logged at `level`.
    Note(Level, &'static str),
}

/// The decision for one event (pure: no device needed).
pub fn verdict(ev: &AsyncEvent) -> Verdict {
    use AsyncEventKind::*;
    let fail = |target, kind, why| Verdict::Fail { target, kind, why };
    match (ev.kind, ev.subject) {
        (QpFatal, EventSubject::Qp(n)) => fail(
            Target::Qp(n),
            FaultKind::Remote,
            "the device put the queue pair in the error state",
        ),
        (QpReqErr, EventSubject::Qp(n)) => fail(
            Target::Qp(n),
            FaultKind::Remote,
            "the peer reported an invalid request on the queue pair",
        ),
        (QpAccessErr, EventSubject::Qp(n)) => fail(
            Target::Qp(n),
            FaultKind::Remote,
            "the peer reported an access violation on the queue pair",
        ),
        (PathMigErr, EventSubject::Qp(n)) => fail(
            Target::Qp(n),
            FaultKind::Remote,
            "the queue pair's path failed and no alternate path took over",
        ),
        (CqErr, EventSubject::Cq(id)) => fail(
            Target::Cq(id),
            FaultKind::System,
            "the completion queue overran or failed",
        ),
        (PortErr, EventSubject::Port(p)) => {
            fail(Target::Port(p), FaultKind::Remote, "the port went down")
        }
        (DeviceFatal, _) => fail(
            Target::Device,
            FaultKind::System,
            "the device reported a fatal error",
        ),
        (GidChange, EventSubject::Port(p)) => Verdict::CheckGids(p),
        (PortActive, _) => Verdict::Note(
            Level::Info,
            "the port is active (comms that failed while it was down stay failed)",
        ),
        (CommEst | SqDrained | QpLastWqeReached | PathMig | SrqLimitReached, _) => {
            Verdict::Note(Level::Info, "informational")
        }
        (LidChange | PkeyChange | SmChange | ClientReregister | DeviceSpeedChange, _) => {
            Verdict::Note(Level::Info, "port attributes changed")
        }
        (SrqErr | WqFatal, _) => Verdict::Note(Level::Warn, "about an object halo does not use"),
        _ => Verdict::Note(Level::Warn, "unexpected event"),
    }
}

/// The failure state of one comm, shared with its device's event dispatcher.
#[derive(Debug)]
pub struct CommAlarm {
    watched: Watched,
    raised: AtomicBool,
    fault: OnceLock<NetError>,
}

impl CommAlarm {
    pub fn new(watched: Watched) -> Arc<Self> {
        Arc::new(CommAlarm {
            watched,
            raised: AtomicBool::new(false),
            fault: OnceLock::new(),
        })
    }

    /// The one load of the hot path.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The error that raised the alarm.
    pub fn fault(&self) -> Option<&NetError> {
        self.is_raised().then(|| self.fault.get()).flatten()
    }

    /// Raises the alarm with `e` unless it is raised already (the first fault stays).
    fn raise(&self, e: NetError) -> bool {
        let first = self.fault.set(e).is_ok();
        self.raised.store(true, Ordering::Release);
        first
    }
}

/// The comms of one device context (every port of it), by weak reference: a closed comm
/// simply drops out.
#[derive(Default)]
pub struct Registry {
    alarms: Mutex<Vec<Weak<CommAlarm>>>,
}

/// What [`Registry::dispatch`] did with an event, for its log line.
#[derive(Debug, PartialEq, Eq)]
pub struct Dispatched {
    pub level: Level,
    pub text: String,
    /// Comms whose alarm this event raised.
    pub failed: usize,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<CommAlarm>>> {
        self.alarms.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, alarm: &Arc<CommAlarm>) {
        let mut v = self.lock();
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(alarm));
    }

    /// Live comms registered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().iter().filter(|w| w.strong_count() > 0).count()
    }

    /// Applies `ev` to the registered comms of device `dev` (its name). `gid_present(port,
    /// index, gid)` says whether that GID is still in the port's table (asked on GID_CHANGE only).
    pub fn dispatch(
        &self,
        dev: &str,
        ev: &AsyncEvent,
        gid_present: impl Fn(u8, u32, &Gid) -> bool,
    ) -> Dispatched {
        let live: Vec<Arc<CommAlarm>> = self.lock().iter().filter_map(Weak::upgrade).collect();
        let at = match ev.subject {
            EventSubject::Port(p) => format!("{dev}:{p}"),
            EventSubject::Qp(n) => match live.iter().find(|a| a.watched.qps.contains(&n)) {
                Some(a) => format!("{dev}:{} qp {n:#x}", a.watched.port),
                None => format!("{dev} qp {n:#x}"),
            },
            EventSubject::Cq(_) | EventSubject::Srq | EventSubject::Wq | EventSubject::Device => {
                dev.to_string()
            }
        };
        let head = format!("{at}: async event {}", ev.kind);
        let raise = |hit: &dyn Fn(&Watched) -> bool, e: &dyn Fn() -> NetError| {
            live.iter()
                .filter(|a| hit(&a.watched))
                .filter(|a| a.raise(e()))
                .count()
        };
        match verdict(ev) {
            Verdict::Fail { target, kind, why } => {
                let failed = raise(&|w| target.hits(w), &|| {
                    kind.error(format!("{head}: {why}"))
                });
                Dispatched {
                    level: Level::Warn,
                    text: format!("{head}: {why}; {failed} comm(s) failed"),
                    failed,
                }
            }
            Verdict::CheckGids(port) => {
                let failed = raise(
                    &|w| w.port == port && !gid_present(port, w.gid_index, &w.gid),
                    &|| {
                        NetError::Remote(format!(
                            "{head}: the GID the comm sends from left the port's table"
                        ))
                    },
                );
                Dispatched {
                    level: if failed > 0 { Level::Warn } else { Level::Info },
                    text: format!(
                        "{head}: {failed} comm(s) lost their GID and failed; the others keep theirs"
                    ),
                    failed,
                }
            }
            Verdict::Note(level, why) => Dispatched {
                level,
                text: format!("{head}: {why}"),
                failed: 0,
            },
        }
    }
}

/// A coarse monotonic clock in milliseconds: a few loads from the vDSO page, no system call.
fn coarse_now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC_COARSE exists on every supported kernel.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// The event watch of one device context, shared by the [`super::NetDevice`]s of its ports.
pub struct DeviceEvents {
    name: String,
    /// `None` when the async fd could not be made non-blocking (then nothing is watched).
    queue: Option<AsyncEventQueue>,
    registry: Registry,
    /// Coarse-clock time from which the next call may read the fd.
    next_poll_ms: AtomicU64,
    /// Held while reading the fd: one reader at a time, the others go on.
    reading: Mutex<()>,
}

impl DeviceEvents {
    pub fn new(name: &str, queue: Option<AsyncEventQueue>) -> Arc<Self> {
        Arc::new(DeviceEvents {
            name: name.to_string(),
            next_poll_ms: AtomicU64::new(if queue.is_some() { 0 } else { u64::MAX }),
            queue,
            registry: Registry::default(),
            reading: Mutex::new(()),
        })
    }

    /// Watches the comm `alarm` belongs to.
    pub fn register(&self, alarm: &Arc<CommAlarm>) {
        self.registry.register(alarm);
    }

    /// Reads and dispatches pending events if the last read is [`POLL_EVERY_MS`] old; called by
    /// comms that are waiting. Otherwise costs a clock read and a compare.
    #[inline]
    pub fn poll_if_due(&self) {
        let now = coarse_now_ms();
        if now >= self.next_poll_ms.load(Ordering::Relaxed) {
            self.poll(now);
        }
    }

    #[cold]
    fn poll(&self, now: u64) {
        let Some(queue) = &self.queue else { return };
        let Ok(_reading) = self.reading.try_lock() else {
            return;
        };
        self.next_poll_ms
            .store(now.saturating_add(POLL_EVERY_MS), Ordering::Relaxed);
        loop {
            match queue.next() {
                Ok(Some(ev)) => self.handle(queue, &ev),
                Ok(None) => return,
                Err(e) => {
                    warn!(
                        NET,
                        "{}: reading async events failed, no longer watching them: {e}", self.name
                    );
                    self.next_poll_ms.store(u64::MAX, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn handle(&self, queue: &AsyncEventQueue, ev: &AsyncEvent) {
        let ctx = queue.context();
        let d = self.registry.dispatch(
            &self.name,
            ev,
            |port, index, gid| matches!(ctx.query_gid(port, index), Ok(g) if g == *gid),
        );
        match d.level {
            Level::Warn => warn!(NET, "{}", d.text),
            Level::Info => info!(NET, "{}", d.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halo_ibverbs::AsyncEventKind as K;

    fn watched(port: u8, qps: &[u32], cq: usize) -> Watched {
        Watched {
            port,
            gid_index: 1,
            gid: Gid([0; 16]),
            qps: qps.to_vec(),
            cqs: vec![CqId(cq)],
        }
    }

    fn ev(kind: K, subject: EventSubject) -> AsyncEvent {
        AsyncEvent { kind, subject }
    }

    fn never_asked(_: u8, _: u32, _: &Gid) -> bool {
        panic!("GID table read for an event that is not GID_CHANGE")
    }

    /// Port 1: a (qps 0x10, 0x11), b (0x20); port 2: c (0x30).
    fn three() -> (Registry, [Arc<CommAlarm>; 3]) {
        let r = Registry::default();
        let a = CommAlarm::new(watched(1, &[0x10, 0x11], 0xa));
        let b = CommAlarm::new(watched(1, &[0x20], 0xb));
        let c = CommAlarm::new(watched(2, &[0x30], 0xc));
        for x in [&a, &b, &c] {
            r.register(x);
        }
        (r, [a, b, c])
    }

    fn raised(alarms: &[Arc<CommAlarm>; 3]) -> [bool; 3] {
        alarms.each_ref().map(|a| a.is_raised())
    }

    #[test]
    fn port_down_fails_every_comm_on_that_port_only() {
        let (r, al) = three();
        let d = r.dispatch("rxe0", &ev(K::PortErr, EventSubject::Port(1)), never_asked);
        assert_eq!(raised(&al), [true, true, false]);
        assert_eq!(d.failed, 2);
        assert_eq!(d.level, Level::Warn);
        assert_eq!(
            d.text,
            "rxe0:1: async event IBV_EVENT_PORT_ERR: the port went down; 2 comm(s) failed"
        );
        let e = al[0].fault().unwrap();
        assert!(matches!(e, NetError::Remote(_)), "{e:?}");
        assert!(e.message().contains("IBV_EVENT_PORT_ERR"), "{e}");
        assert!(e.message().contains("rxe0:1"), "{e}");
    }

    #[test]
    fn port_active_again_does_not_resurrect_failed_comms() {
        let (r, al) = three();
        r.dispatch("rxe0", &ev(K::PortErr, EventSubject::Port(1)), never_asked);
        let d = r.dispatch(
            "rxe0",
            &ev(K::PortActive, EventSubject::Port(1)),
            never_asked,
        );
        assert_eq!(d.failed, 0);
        assert_eq!(d.level, Level::Info);
        assert_eq!(raised(&al), [true, true, false]);
        assert!(al[0].fault().unwrap().message().contains("PORT_ERR"));
        // A comm made after the port came back is not touched by the old event.
        let late = CommAlarm::new(watched(1, &[0x40], 0xd));
        r.register(&late);
        assert!(!late.is_raised());
        assert!(late.fault().is_none());
    }

    #[test]
    fn qp_events_fail_only_the_comm_owning_the_qp() {
        for kind in [K::QpFatal, K::QpReqErr, K::QpAccessErr, K::PathMigErr] {
            let (r, al) = three();
            let d = r.dispatch("rxe0", &ev(kind, EventSubject::Qp(0x11)), never_asked);
            assert_eq!(raised(&al), [true, false, false], "{kind}");
            assert_eq!(d.failed, 1);
            assert!(
                d.text.starts_with("rxe0:1 qp 0x11: async event"),
                "{}",
                d.text
            );
            assert!(d.text.contains(kind.name()), "{}", d.text);
            assert!(matches!(al[0].fault(), Some(NetError::Remote(_))));
        }
    }

    #[test]
    fn an_event_on_an_unknown_qp_fails_nothing() {
        let (r, al) = three();
        let d = r.dispatch("rxe0", &ev(K::QpFatal, EventSubject::Qp(0x99)), never_asked);
        assert_eq!(raised(&al), [false; 3]);
        assert_eq!(d.failed, 0);
        assert!(d.text.starts_with("rxe0 qp 0x99"), "{}", d.text);
    }

    #[test]
    fn cq_error_fails_the_comm_owning_the_cq_as_a_system_error() {
        let (r, al) = three();
        r.dispatch(
            "rxe0",
            &ev(K::CqErr, EventSubject::Cq(CqId(0xb))),
            never_asked,
        );
        assert_eq!(raised(&al), [false, true, false]);
        assert!(matches!(al[1].fault(), Some(NetError::System(_))));
    }

    #[test]
    fn device_fatal_fails_every_comm_of_every_port() {
        let (r, al) = three();
        let d = r.dispatch(
            "rxe0",
            &ev(K::DeviceFatal, EventSubject::Device),
            never_asked,
        );
        assert_eq!(raised(&al), [true; 3]);
        assert_eq!(d.failed, 3);
        assert!(matches!(al[2].fault(), Some(NetError::System(_))));
    }

    #[test]
    fn the_first_fault_stays_and_is_counted_once() {
        let (r, al) = three();
        r.dispatch("rxe0", &ev(K::QpFatal, EventSubject::Qp(0x20)), never_asked);
        let d = r.dispatch("rxe0", &ev(K::PortErr, EventSubject::Port(1)), never_asked);
        assert_eq!(d.failed, 1, "b had failed already");
        assert!(al[1].fault().unwrap().message().contains("QP_FATAL"));
        assert!(al[0].fault().unwrap().message().contains("PORT_ERR"));
    }

    #[test]
    fn gid_change_fails_only_comms_whose_gid_left_the_table() {
        let (r, al) = three();
        let d = r.dispatch(
            "rxe0",
            &ev(K::GidChange, EventSubject::Port(1)),
            |_, _, _| true,
        );
        assert_eq!(
            (raised(&al), d.failed, d.level),
            ([false; 3], 0, Level::Info)
        );
        let d = r.dispatch(
            "rxe0",
            &ev(K::GidChange, EventSubject::Port(1)),
            |p, i, _| {
                assert_eq!((p, i), (1, 1));
                false
            },
        );
        assert_eq!(
            (raised(&al), d.failed, d.level),
            ([true, true, false], 2, Level::Warn)
        );
    }

    #[test]
    fn informational_events_fail_nothing() {
        for (kind, subject) in [
            (K::CommEst, EventSubject::Qp(0x10)),
            (K::SqDrained, EventSubject::Qp(0x10)),
            (K::QpLastWqeReached, EventSubject::Qp(0x10)),
            (K::PathMig, EventSubject::Qp(0x10)),
            (K::LidChange, EventSubject::Port(1)),
            (K::PkeyChange, EventSubject::Port(1)),
            (K::SmChange, EventSubject::Port(1)),
            (K::ClientReregister, EventSubject::Port(1)),
            (K::DeviceSpeedChange, EventSubject::Port(1)),
            (K::SrqErr, EventSubject::Srq),
            (K::WqFatal, EventSubject::Wq),
            (K::Unknown(77), EventSubject::Port(1)),
        ] {
            let (r, al) = three();
            let d = r.dispatch("rxe0", &ev(kind, subject), never_asked);
            assert_eq!((raised(&al), d.failed), ([false; 3], 0), "{kind}");
        }
    }

    #[test]
    fn closed_comms_drop_out_of_the_registry() {
        let (r, al) = three();
        let [a, b, c] = al;
        drop(b);
        assert_eq!(r.len(), 2);
        let d = r.dispatch("rxe0", &ev(K::PortErr, EventSubject::Port(1)), never_asked);
        assert_eq!(d.failed, 1);
        assert!(a.is_raised() && !c.is_raised());
    }

    #[test]
    fn a_device_without_an_event_queue_never_polls() {
        let d = DeviceEvents::new("rxe9", None);
        d.poll_if_due();
        assert_eq!(d.next_poll_ms.load(Ordering::Relaxed), u64::MAX);
    }

    #[test]
    fn the_coarse_clock_moves_forward() {
        let a = coarse_now_ms();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(coarse_now_ms() >= a + 20);
    }
}
