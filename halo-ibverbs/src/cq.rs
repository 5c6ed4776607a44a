//! Completion queues and completion channels.

use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_comp_channel, ibv_cq, ibv_create_comp_channel, ibv_create_cq,
    ibv_destroy_comp_channel, ibv_destroy_cq, ibv_get_cq_event, ibv_poll_cq, ibv_req_notify_cq,
    ibv_wc,
};

use crate::device::Context;
use crate::error::{Result, VerbsError};
use crate::wc::WorkCompletion;

/// Most completions one [`CompletionQueue::poll`] call returns; they are read into a stack buffer
/// of this size so polling never allocates.
pub const MAX_POLL_BATCH: usize = 64;

struct ChannelInner {
    ch: NonNull<ibv_comp_channel>,
    ctx: Context,
}

// SAFETY: a completion channel is a file descriptor wrapper; libibverbs allows using it from any
// thread and it is destroyed only in Drop, after every CQ bound to it (each holds an Arc).
unsafe impl Send for ChannelInner {}
// SAFETY: as above.
unsafe impl Sync for ChannelInner {}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: ch came from ibv_create_comp_channel; no CQ uses it any more.
        unsafe { ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

/// A completion channel: a file descriptor that becomes readable when a CQ bound to it, armed
/// with [`CompletionQueue::req_notify`], gets a completion. Lets a thread sleep instead of spin.
#[derive(Clone)]
pub struct CompletionChannel {
    inner: Arc<ChannelInner>,
}

impl std::fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionChannel")
            .field("fd", &self.fd())
            .finish()
    }
}

impl Context {
    /// Creates a completion channel. Its fd is non-blocking so it can sit in an epoll set.
    pub fn create_comp_channel(&self) -> Result<CompletionChannel> {
        // SAFETY: the context is open.
        let ch = unsafe { ibv_create_comp_channel(self.as_ptr()) };
        let ch = NonNull::new(ch)
            .ok_or_else(|| VerbsError::last_os("ibv_create_comp_channel", || self.name()))?;
        let channel = CompletionChannel {
            inner: Arc::new(ChannelInner {
                ch,
                ctx: self.clone(),
            }),
        };
        let fd = channel.fd();
        // SAFETY: fd is the channel's open descriptor; F_GETFL/F_SETFL only change its flags.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(VerbsError::last_os("fcntl(O_NONBLOCK)", || {
                format!("{} completion channel fd {fd}", self.name())
            }));
        }
        Ok(channel)
    }

    /// Creates a completion queue with room for at least `depth` completions, optionally bound to
    /// `channel` (which must belong to this device).
    pub fn create_cq(
        &self,
        depth: u32,
        channel: Option<&CompletionChannel>,
    ) -> Result<CompletionQueue> {
        let cqe = libc::c_int::try_from(depth)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| {
                VerbsError::InvalidArgument(format!("CQ depth {depth} on {}", self.name()))
            })?;
        if let Some(ch) = channel {
            if ch.inner.ctx.as_ptr() != self.as_ptr() {
                return Err(VerbsError::InvalidArgument(format!(
                    "completion channel of {} used for a CQ on {}",
                    ch.inner.ctx.name(),
                    self.name()
                )));
            }
        }
        let ch_ptr = channel.map_or(ptr::null_mut(), |c| c.inner.ch.as_ptr());
        // SAFETY: the context is open; the channel (if any) belongs to it and is kept alive by
        // the CQ's Arc.
        let cq = unsafe { ibv_create_cq(self.as_ptr(), cqe, ptr::null_mut(), ch_ptr, 0) };
        let cq = NonNull::new(cq).ok_or_else(|| {
            VerbsError::last_os("ibv_create_cq", || {
                format!("{} (depth {depth})", self.name())
            })
        })?;
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                ctx: self.clone(),
                _channel: channel.cloned(),
            }),
        })
    }
}

impl CompletionChannel {
    /// The file descriptor to watch for readability.
    pub fn fd(&self) -> RawFd {
        // SAFETY: ch stays valid until Drop; fd never changes.
        unsafe { self.inner.ch.as_ref() }.fd
    }

    /// Waits up to `timeout` for a completion event and acknowledges it. Returns whether an event
    /// arrived; the caller then polls the CQs bound to this channel and re-arms them with
    /// [`CompletionQueue::req_notify`].
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfd is a valid array of one pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let err = VerbsError::last_os("poll", || self.describe());
            return if err.errno() == Some(libc::EINTR) {
                Ok(false)
            } else {
                Err(err)
            };
        }
        if n == 0 {
            return Ok(false);
        }
        let mut cq: *mut ibv_cq = ptr::null_mut();
        let mut cq_ctx: *mut libc::c_void = ptr::null_mut();
        // SAFETY: the channel is alive; the out-pointers are valid. The fd is non-blocking, so a
        // concurrent waiter that took the event leaves us with EAGAIN instead of blocking.
        let ret = unsafe { ibv_get_cq_event(self.inner.ch.as_ptr(), &mut cq, &mut cq_ctx) };
        if ret != 0 {
            let err = VerbsError::last_os("ibv_get_cq_event", || self.describe());
            return if err.errno() == Some(libc::EAGAIN) {
                Ok(false)
            } else {
                Err(err)
            };
        }
        // SAFETY: cq is the CQ the event was reported for; it is alive because destroying a CQ
        // requires all its events to be acknowledged, which we do right here.
        unsafe { ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }

    fn describe(&self) -> String {
        format!(
            "{} completion channel fd {}",
            self.inner.ctx.name(),
            self.fd()
        )
    }
}

struct CqInner {
    cq: NonNull<ibv_cq>,
    ctx: Context,
    _channel: Option<CompletionChannel>,
}

// SAFETY: libibverbs CQs are thread-safe (providers lock around polling); the pointer is freed
// only in Drop, after every QP using the CQ (each holds an Arc) is destroyed.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: cq came from ibv_create_cq; no QP uses it and channel events were acked in wait().
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A completion queue. Cheap to clone; destroyed when the last clone and every QP using it are gone.
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.inner.ctx.name())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl CompletionQueue {
    pub(crate) fn as_ptr(&self) -> *mut ibv_cq {
        self.inner.cq.as_ptr()
    }

    pub(crate) fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// The number of entries the device granted (at least the depth asked for).
    pub fn capacity(&self) -> u32 {
        // SAFETY: cq stays valid until Drop; cqe is set at creation.
        u32::try_from(unsafe { self.inner.cq.as_ref() }.cqe).unwrap_or(0)
    }

    /// Fills the front of `out` with up to `min(out.len(), MAX_POLL_BATCH)` completions and returns
    /// how many. Never blocks and never allocates.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        // SAFETY: `MaybeUninit<T>` has `T`'s layout, and `poll_into` only writes whole, valid
        // values into the slice, so viewing initialised completions this way keeps them valid
        // (`WorkCompletion` is `Copy`: nothing is dropped or leaked).
        let out =
            unsafe { &mut *(out as *mut [WorkCompletion] as *mut [MaybeUninit<WorkCompletion>]) };
        self.poll_into(out).map(<[WorkCompletion]>::len)
    }

    /// Like [`Self::poll`], into uninitialised storage (the data path polls on every `test`:
    /// no initialising a batch of completions each time). Returns the completions polled.
    pub fn poll_into<'a>(
        &self,
        out: &'a mut [MaybeUninit<WorkCompletion>],
    ) -> Result<&'a [WorkCompletion]> {
        let want = out.len().min(MAX_POLL_BATCH);
        if want == 0 {
            return Ok(&[]);
        }
        let mut raw = [const { MaybeUninit::<ibv_wc>::uninit() }; MAX_POLL_BATCH];
        // SAFETY: the CQ is alive and raw has room for `want` entries; poll_cq writes at most that.
        let n = unsafe { ibv_poll_cq(self.as_ptr(), want as libc::c_int, raw[0].as_mut_ptr()) };
        if n < 0 {
            return Err(VerbsError::from_ret(
                "ibv_poll_cq",
                format!("{} CQ", self.inner.ctx.name()),
                n,
            ));
        }
        let n = n as usize;
        for (dst, src) in out.iter_mut().zip(&raw[..n]) {
            // SAFETY: poll_cq initialised the first n entries.
            dst.write(WorkCompletion::from_raw(unsafe { src.assume_init_ref() }));
        }
        // SAFETY: the first n entries of `out` were just written.
        Ok(unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<WorkCompletion>(), n) })
    }

    /// [`Self::poll_into`] of up to `N` completions (at most [`MAX_POLL_BATCH`]), for a caller
    /// that polls on every call: always inlined (a call and its register saves cost as much as
    /// an empty poll's own work), with a raw batch of `N` entries only and the error path out of
    /// line, so an empty poll costs little beyond the provider's own.
    #[inline(always)]
    pub fn poll_batch<'a, const N: usize>(
        &self,
        out: &'a mut [MaybeUninit<WorkCompletion>; N],
    ) -> Result<&'a [WorkCompletion]> {
        const { assert!(N > 0 && N <= MAX_POLL_BATCH) };
        let mut raw = [const { MaybeUninit::<ibv_wc>::uninit() }; N];
        // SAFETY: the CQ is alive and raw has room for N entries; poll_cq writes at most that.
        let n = unsafe { ibv_poll_cq(self.as_ptr(), N as libc::c_int, raw[0].as_mut_ptr()) };
        if n == 0 {
            return Ok(&[]);
        }
        if n < 0 {
            return Err(self.poll_error(n));
        }
        let n = (n as usize).min(N);
        for (dst, src) in out.iter_mut().zip(&raw[..n]) {
            // SAFETY: poll_cq initialised the first n entries.
            dst.write(WorkCompletion::from_raw(unsafe { src.assume_init_ref() }));
        }
        // SAFETY: the first n entries of `out` were just written.
        Ok(unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<WorkCompletion>(), n) })
    }

    #[cold]
    fn poll_error(&self, ret: libc::c_int) -> VerbsError {
        VerbsError::from_ret("ibv_poll_cq", format!("{} CQ", self.inner.ctx.name()), ret)
    }

    /// Arms the CQ: the next completion (or the next solicited one) raises an event on its
    /// completion channel.
    pub fn req_notify(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: the CQ is alive.
        let ret = unsafe { ibv_req_notify_cq(self.as_ptr(), i32::from(solicited_only)) };
        if ret != 0 {
            return Err(VerbsError::from_ret(
                "ibv_req_notify_cq",
                format!("{} CQ", self.inner.ctx.name()),
                ret,
            ));
        }
        Ok(())
    }
}
