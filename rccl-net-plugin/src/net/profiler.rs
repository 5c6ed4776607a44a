//! The profiler callback RCCL/NCCL hands to `init` from ncclNet v10 on, and the per-request
//! events a comm reports through it.
//!
//! The events follow NCCL's own IB transport: queue-pair events (`ncclProfileQp`) with
//! `pluginId` = `NCCL_PROFILER_NET_TYPE_IB | 1` and an [`ncclProfilerNetIbDescr_v1_t`] as
//! `extData`, started with the `phandle` the caller gave to `isend`/`irecv` and stopped with a
//! NULL `phandle`, `pluginId` 0 and no `extData`. A start is never made with a NULL `phandle`:
//! NCCL's callback reads through it. Without a callback (ABI before v10, or NULL) a comm has no
//! [`Profiler`] at all, and a request without a `phandle` is never armed: one branch each.

use crate::protocol::{OnWire, Post, PostSink, WrId, FIFO_DEPTH, MAX_RECVS};
use halo_ffi::{
    ncclProfileQp, ncclProfilerNetEventStart, ncclProfilerNetEventStop,
    ncclProfilerNetIbDescr_v1_t, ncclProfilerNetIbQp_v1_t, ncclResult_t, NCCL_PROFILER_NET_IB_VER,
    NCCL_PROFILER_NET_TYPE_IB,
};
use halo_ibverbs::QueuePair;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

/// The callback without its `Option`.
pub type ProfilerFn =
    unsafe extern "C" fn(*mut *mut c_void, c_int, *mut c_void, i64, *mut c_void) -> ncclResult_t;

/// `pluginId` of every start event.
pub const PLUGIN_ID: i64 = (NCCL_PROFILER_NET_TYPE_IB | NCCL_PROFILER_NET_IB_VER) as i64;

/// `ibv_wr_opcode` values reported in events.
pub const IBV_WR_RDMA_WRITE: c_int = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: c_int = 1;

/// Events of one request at once: a refused eager send is sent again before (or after) its
/// eager write completes.
const EVENTS_PER_REQ: usize = 2;

static CALLBACK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Stores the callback of the latest `init` (`None`: no profiling for comms created from now).
pub fn set_callback(f: Option<ProfilerFn>) {
    let p = f.map_or(std::ptr::null_mut(), |f| f as *mut ());
    CALLBACK.store(p, Ordering::Release);
}

/// The callback comms created now report to.
pub fn callback() -> Option<ProfilerFn> {
    let p = CALLBACK.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: the slot holds null or a pointer made from a `ProfilerFn` in `set_callback`; fn
    // and data pointers have the same size on our targets.
    Some(unsafe { std::mem::transmute::<*mut (), ProfilerFn>(p) })
}

/// Where a started event is in flight: what completion stops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key(pub u64);

#[derive(Clone, Copy)]
struct Event {
    /// The profiler's handle (written by the start call, read by the stop call).
    ehandle: *mut c_void,
    /// `extData` of the start; kept here until the stop, as NCCL keeps it in its request.
    descr: ncclProfilerNetIbDescr_v1_t,
    key: Key,
    live: bool,
}

#[derive(Clone, Copy)]
struct Slot {
    /// The `phandle` of the request's `isend`/`irecv`; NULL: not profiled.
    phandle: *mut c_void,
    /// Payload bytes (send) or capacity (receive) of the request.
    len: u64,
    events: [Event; EVENTS_PER_REQ],
}

/// The events of one comm, one slot per request (per buffer for receives).
pub struct Profiler {
    f: ProfilerFn,
    device: c_int,
    slots: Box<[Slot]>,
}

impl Profiler {
    /// `None` without a callback. Allocates its slots once, here.
    pub fn new(slots: usize, device: usize) -> Option<Box<Self>> {
        let f = callback()?;
        let ev = Event {
            ehandle: std::ptr::null_mut(),
            descr: ncclProfilerNetIbDescr_v1_t::zeroed(),
            key: Key(0),
            live: false,
        };
        let slot = Slot {
            phandle: std::ptr::null_mut(),
            len: 0,
            events: [ev; EVENTS_PER_REQ],
        };
        Some(Box::new(Profiler {
            f,
            device: device as c_int,
            slots: vec![slot; slots].into_boxed_slice(),
        }))
    }

    /// Request slot `i` was accepted with `phandle` (NULL: it is not profiled).
    pub fn arm(&mut self, i: usize, phandle: *mut c_void, len: u64) {
        if let Some(s) = self.slots.get_mut(i) {
            s.phandle = phandle;
            s.len = len;
        }
    }

    /// Whether slot `i` reports events.
    pub fn armed(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| !s.phandle.is_null())
    }

    /// Starts a queue-pair event for slot `i` (if armed): work request `wr_id` (`opcode`) on
    /// queue pair `qp_num`, stopped by [`Self::stop`] with `key`.
    pub fn start(&mut self, i: usize, key: Key, qp_num: u32, wr_id: u64, opcode: c_int) {
        let f = self.f;
        let device = self.device;
        let Some(s) = self.slots.get_mut(i).filter(|s| !s.phandle.is_null()) else {
            return;
        };
        let len = s.len;
        let phandle = s.phandle;
        let k = match s.events.iter().position(|e| !e.live) {
            Some(k) => k,
            None => {
                // More events than a request ever has: end the oldest first.
                stop_event(f, &mut s.events[0]);
                0
            }
        };
        let e = &mut s.events[k];
        e.descr = ncclProfilerNetIbDescr_v1_t {
            type_: ncclProfileQp as u8,
            qp: ncclProfilerNetIbQp_v1_t {
                device,
                wr_id,
                opcode,
                qpNum: qp_num as c_int,
                length: len as usize,
            },
        };
        e.ehandle = std::ptr::null_mut();
        e.key = key;
        e.live = true;
        // SAFETY: `f` is the callback RCCL handed to init; `phandle` is the non-NULL handle it
        // gave with this request; the event handle and the descriptor live in this comm's slots
        // until the event is stopped.
        unsafe {
            f(
                &mut e.ehandle,
                ncclProfilerNetEventStart,
                phandle,
                PLUGIN_ID,
                (&mut e.descr as *mut ncclProfilerNetIbDescr_v1_t).cast(),
            )
        };
    }

    /// The completion `key` was seen: stops the events of `slots` that wait for it.
    pub fn stop(&mut self, slots: impl IntoIterator<Item = usize>, key: Key) {
        let f = self.f;
        for i in slots {
            let Some(s) = self.slots.get_mut(i) else {
                continue;
            };
            for e in s.events.iter_mut().filter(|e| e.live && e.key == key) {
                stop_event(f, e);
            }
        }
    }

    /// Slot `i`'s request is finished (reported done, failed, or its comm closes): stops what
    /// is still open and disarms it.
    pub fn finish(&mut self, i: usize) {
        let f = self.f;
        if let Some(s) = self.slots.get_mut(i) {
            for e in s.events.iter_mut().filter(|e| e.live) {
                stop_event(f, e);
            }
            s.phandle = std::ptr::null_mut();
        }
    }

    /// Stops every open event (the comm closes).
    pub fn finish_all(&mut self) {
        for i in 0..self.slots.len() {
            self.finish(i);
        }
    }
}

/// Records which requests the core's posts carry ([`OnWire`]) while passing the posts on, so
/// that the comm can start their events once it knows the request just accepted. Used only by
/// comms with a [`Profiler`].
pub struct Tap<'a, S: PostSink> {
    inner: &'a mut S,
    seen: [OnWire; TAP_ROWS],
    n: usize,
}

/// Rows one call can put on the wire: every deferred row plus an eager one and a fresh one.
const TAP_ROWS: usize = FIFO_DEPTH + 2;

impl<'a, S: PostSink> Tap<'a, S> {
    pub fn new(inner: &'a mut S) -> Self {
        Tap {
            inner,
            seen: [OnWire {
                seq: 0,
                reqs: [0; MAX_RECVS],
                nreqs: 0,
                qp: 0,
                eager: false,
            }; TAP_ROWS],
            n: 0,
        }
    }

    /// Starts the events of the armed requests whose work requests went on the wire: each is
    /// stopped by the completion of the row's signaled work request (its wr_id is the key).
    pub fn start_events(&self, p: &mut Profiler, qps: &[QueuePair]) {
        for w in &self.seen[..self.n] {
            let wr_id = if w.eager {
                WrId::Eager(w.seq)
            } else {
                WrId::Transmit(w.seq)
            }
            .encode();
            let qp_num = qps.get(w.qp).map_or(0, QueuePair::qp_num);
            for &i in &w.reqs[..usize::from(w.nreqs)] {
                p.start(
                    usize::from(i),
                    Key(wr_id),
                    qp_num,
                    wr_id,
                    IBV_WR_RDMA_WRITE_WITH_IMM,
                );
            }
        }
    }
}

impl<S: PostSink> PostSink for Tap<'_, S> {
    fn post(&mut self, p: &Post<'_>) {
        self.inner.post(p);
    }

    fn on_wire(&mut self, w: &OnWire) {
        if let Some(slot) = self.seen.get_mut(self.n) {
            *slot = *w;
            self.n += 1;
        }
    }
}

fn stop_event(f: ProfilerFn, e: &mut Event) {
    e.live = false;
    // SAFETY: `e` was started through `f`, which wrote its handle; stop events carry no phandle
    // and no extData, as NCCL's own transports send them.
    unsafe {
        f(
            &mut e.ehandle,
            ncclProfilerNetEventStop,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::{Mutex, MutexGuard};

    /// One call of the recording callback: (type, eHandle slot address, handle value given
    /// back or stopped, phandle, pluginId, descriptor copy).
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Call {
        pub ty: c_int,
        pub ehandle: usize,
        pub phandle: usize,
        pub plugin_id: i64,
        pub qp: Option<(u8, c_int, u64, c_int, c_int, usize)>,
    }

    thread_local! {
        static CALLS: RefCell<Vec<Call>> = const { RefCell::new(Vec::new()) };
        static NEXT: RefCell<usize> = const { RefCell::new(0x1000) };
    }

    /// Hands out handles 0x1000, 0x1001, … at start; records every call.
    unsafe extern "C" fn record(
        eh: *mut *mut c_void,
        ty: c_int,
        ph: *mut c_void,
        id: i64,
        ext: *mut c_void,
    ) -> ncclResult_t {
        let handle = if ty == ncclProfilerNetEventStart {
            let h = NEXT.with(|n| {
                let mut n = n.borrow_mut();
                *n += 1;
                *n
            });
            // SAFETY: the plugin passes a valid handle slot.
            unsafe { *eh = h as *mut c_void };
            h
        } else {
            // SAFETY: as above.
            unsafe { *eh as usize }
        };
        // SAFETY: start events carry a descriptor of this layout, stops none.
        let qp = unsafe { (ext as *const ncclProfilerNetIbDescr_v1_t).as_ref() }.map(|d| {
            (
                d.type_,
                d.qp.device,
                d.qp.wr_id,
                d.qp.opcode,
                d.qp.qpNum,
                d.qp.length,
            )
        });
        CALLS.with(|c| {
            c.borrow_mut().push(Call {
                ty,
                ehandle: handle,
                phandle: ph as usize,
                plugin_id: id,
                qp,
            })
        });
        halo_ffi::ncclSuccess
    }

    static INSTALLED: Mutex<()> = Mutex::new(());

    /// Installs the recording callback for one test.
    pub fn install() -> MutexGuard<'static, ()> {
        let g = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        set_callback(Some(record));
        CALLS.with(|c| c.borrow_mut().clear());
        g
    }

    pub fn take() -> Vec<Call> {
        CALLS.with(|c| std::mem::take(&mut *c.borrow_mut()))
    }

    #[test]
    fn no_callback_no_profiler() {
        let _g = install();
        set_callback(None);
        assert!(Profiler::new(4, 0).is_none());
    }

    #[test]
    fn starts_carry_phandle_and_descriptor_stops_match_them() {
        let _g = install();
        let mut p = Profiler::new(16, 3).expect("a callback is set");
        set_callback(None);
        let ph = 0xabc0 as *mut c_void;
        // Slot 1 is not profiled (NULL phandle): nothing is reported for it.
        p.arm(0, ph, 4096);
        p.arm(1, std::ptr::null_mut(), 64);
        assert!(p.armed(0) && !p.armed(1));
        p.start(0, Key(7), 0x11, 0x8000_0007, IBV_WR_RDMA_WRITE_WITH_IMM);
        p.start(1, Key(7), 0x11, 0x8000_0007, IBV_WR_RDMA_WRITE_WITH_IMM);
        // A completion of something else stops nothing; the right one stops the event once.
        p.stop(0..8, Key(8));
        p.stop(0..8, Key(7));
        p.stop(0..8, Key(7));
        p.finish(0);
        let calls = take();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].ty, ncclProfilerNetEventStart);
        assert_eq!(calls[0].phandle, 0xabc0);
        assert_eq!(calls[0].plugin_id, 0x1_0001);
        assert_eq!(
            calls[0].qp,
            Some((1, 3, 0x8000_0007, IBV_WR_RDMA_WRITE_WITH_IMM, 0x11, 4096))
        );
        assert_eq!(calls[1].ty, ncclProfilerNetEventStop);
        assert_eq!(
            calls[1].ehandle, calls[0].ehandle,
            "the stop names the started event"
        );
        assert_eq!(
            (calls[1].phandle, calls[1].plugin_id, calls[1].qp),
            (0, 0, None)
        );
        assert!(!p.armed(0), "finish disarms");
    }

    #[test]
    fn finish_stops_what_is_open_and_a_request_holds_two_events() {
        let _g = install();
        let mut p = Profiler::new(2, 0).unwrap();
        set_callback(None);
        p.arm(1, 0x10 as *mut c_void, 8);
        p.start(1, Key(1), 1, 1, IBV_WR_RDMA_WRITE_WITH_IMM);
        p.start(1, Key(2), 1, 2, IBV_WR_RDMA_WRITE_WITH_IMM);
        p.finish_all();
        let calls = take();
        let starts: Vec<_> = calls
            .iter()
            .filter(|c| c.ty == ncclProfilerNetEventStart)
            .map(|c| c.ehandle)
            .collect();
        let mut stops: Vec<_> = calls
            .iter()
            .filter(|c| c.ty == ncclProfilerNetEventStop)
            .map(|c| c.ehandle)
            .collect();
        stops.sort();
        assert_eq!(starts, stops);
        assert_eq!(starts.len(), 2);
    }
}
