//! What RCCL holds as a send or receive comm.
//!
//! RCCL calls `regMr`/`deregMr` on its proxy *service* thread with a comm that its *progress*
//! thread drives at the same time through `isend`/`irecv`/`test`. The progress thread holds the
//! comm mutably, so the service thread must not read through it, not even a field nobody writes.
//! The pointer RCCL gets is therefore a small header that is never written after creation: the
//! comm's kind and its device (all a registration needs), plus the comm itself in its own
//! allocation, which only the driving thread dereferences.

use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::recv_comm::RecvComm;
use super::send_comm::SendComm;
use std::ffi::c_void;
use std::sync::Arc;

/// `kind` of a send comm's handle.
pub const COMM_SEND: u32 = 0x4853_4e44;
/// `kind` of a receive comm's handle.
pub const COMM_RECV: u32 = 0x4852_4356;

/// The header behind a comm pointer; immutable from creation to close.
#[repr(C)]
pub struct CommHandle {
    kind: u32,
    dev: Arc<NetDevice>,
    /// `Box<SendComm>` or `Box<RecvComm>` (by `kind`), from `Box::into_raw`.
    comm: *mut c_void,
}

impl CommHandle {
    /// Boxes a send comm's handle; the pointer goes to RCCL.
    pub fn send(c: Box<SendComm>) -> *mut c_void {
        let dev = Arc::clone(&c.link.dev);
        Self::boxed(COMM_SEND, dev, Box::into_raw(c) as *mut c_void)
    }

    /// Boxes a receive comm's handle; the pointer goes to RCCL.
    pub fn recv(c: Box<RecvComm>) -> *mut c_void {
        let dev = Arc::clone(&c.link.dev);
        Self::boxed(COMM_RECV, dev, Box::into_raw(c) as *mut c_void)
    }

    fn boxed(kind: u32, dev: Arc<NetDevice>, comm: *mut c_void) -> *mut c_void {
        Box::into_raw(Box::new(CommHandle { kind, dev, comm })) as *mut c_void
    }

    /// The header behind `p`, checked to be one of ours.
    ///
    /// # Safety
    /// `p` must be NULL or a pointer from [`CommHandle::send`]/[`CommHandle::recv`] not yet
    /// closed.
    unsafe fn header<'a>(p: *mut c_void) -> NetResult<&'a CommHandle> {
        // SAFETY: per the contract; the header is never written after creation, so shared
        // references from several threads are fine.
        let h = unsafe { (p as *const CommHandle).as_ref() }
            .ok_or_else(|| NetError::InvalidArgument("NULL comm".into()))?;
        match h.kind {
            COMM_SEND | COMM_RECV => Ok(h),
            k => Err(NetError::InvalidArgument(format!(
                "{p:p} is not a comm of this plugin (kind {k:#x})"
            ))),
        }
    }

    /// The device of the comm behind `p`: what `regMr` needs, read without touching the comm.
    ///
    /// # Safety
    /// As [`CommHandle::header`]; any thread may call this while another drives the comm.
    pub unsafe fn device(p: *mut c_void) -> NetResult<Arc<NetDevice>> {
        // SAFETY: forwarded contract.
        Ok(Arc::clone(&unsafe { Self::header(p) }?.dev))
    }

    /// The send comm behind `p`, for the thread that drives it.
    ///
    /// # Safety
    /// As [`CommHandle::header`], and no other reference to the comm may be alive (RCCL drives
    /// a comm from one thread at a time).
    #[inline]
    pub unsafe fn send_comm<'a>(p: *mut c_void) -> NetResult<&'a mut SendComm> {
        // SAFETY: forwarded contract.
        match unsafe { Self::send_comm_if(p) } {
            Some(c) => Ok(c),
            // SAFETY: forwarded contract.
            None => Err(unsafe { Self::not_a_send_comm(p) }),
        }
    }

    /// Why `p` is not a send comm.
    ///
    /// # Safety
    /// As [`CommHandle::header`].
    #[cold]
    unsafe fn not_a_send_comm(p: *mut c_void) -> NetError {
        // SAFETY: forwarded contract.
        match unsafe { Self::header(p) } {
            Err(e) => e,
            Ok(_) => {
                NetError::InvalidArgument(format!("{p:p} is a receive comm, used as a send comm"))
            }
        }
    }

    /// The send comm behind `p` when `p` is one (`None` for anything else, which
    /// [`Self::send_comm`] then reports).
    ///
    /// # Safety
    /// As [`Self::send_comm`].
    #[inline]
    unsafe fn send_comm_if<'a>(p: *mut c_void) -> Option<&'a mut SendComm> {
        // SAFETY: per the contract (NULL is refused by `as_ref`).
        let h = unsafe { (p as *const CommHandle).as_ref() }?;
        if h.kind != COMM_SEND {
            return None;
        }
        // SAFETY: a send handle's comm is a live Box<SendComm>; the caller is its only user.
        Some(unsafe { &mut *(h.comm as *mut SendComm) })
    }

    /// The receive comm behind `p`, for the thread that drives it.
    ///
    /// # Safety
    /// As [`CommHandle::send_comm`].
    pub unsafe fn recv_comm<'a>(p: *mut c_void) -> NetResult<&'a mut RecvComm> {
        // SAFETY: forwarded contract.
        let h = unsafe { Self::header(p) }?;
        if h.kind != COMM_RECV {
            return Err(NetError::InvalidArgument(format!(
                "{p:p} is a send comm, used as a receive comm"
            )));
        }
        // SAFETY: a receive handle's comm is a live Box<RecvComm>; the caller is its only user.
        Ok(unsafe { &mut *(h.comm as *mut RecvComm) })
    }

    /// Closes the comm behind `p` (`closeSend`/`closeRecv`); `kind` says which it must be.
    ///
    /// # Safety
    /// `p` must come from [`CommHandle::send`]/[`CommHandle::recv`], be closed once, and not be
    /// used by any thread afterwards.
    pub unsafe fn close(p: *mut c_void, kind: u32) -> NetResult<()> {
        // SAFETY: forwarded contract (checks the kind before taking ownership).
        let h = unsafe { Self::header(p) }?;
        if h.kind != kind {
            return Err(NetError::InvalidArgument(format!(
                "{p:p} closed as the wrong kind of comm"
            )));
        }
        // SAFETY: the header came from Box::into_raw in `boxed` and is closed once.
        let h = unsafe { Box::from_raw(p as *mut CommHandle) };
        // SAFETY: the comm came from Box::into_raw of the type `kind` names.
        unsafe {
            match h.kind {
                COMM_SEND => drop(Box::from_raw(h.comm as *mut SendComm)),
                _ => drop(Box::from_raw(h.comm as *mut RecvComm)),
            }
        }
        Ok(())
    }
}
