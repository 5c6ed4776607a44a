//! What RCCL holds as `request`: an entry in its comm's table, valid until `test` reports it done.

use super::error::{NetError, NetResult};
use super::recv_comm::RecvComm;
use super::send_comm::SendComm;
use crate::protocol::MAX_RECVS;

const REQ_MAGIC: u32 = 0x4841_4c4f;

pub struct Request {
    magic: u32,
    idx: u16,
    owner: Owner,
}

#[derive(Clone, Copy)]
enum Owner {
    Send(*mut SendComm),
    Recv(*mut RecvComm),
}

impl Request {
    /// The request table of a send comm at `owner` (which must not move while it is open).
    pub(super) fn table_for_send(owner: *mut SendComm, n: usize) -> Box<[Request]> {
        (0..n)
            .map(|i| Request {
                magic: REQ_MAGIC,
                idx: i as u16,
                owner: Owner::Send(owner),
            })
            .collect()
    }

    /// The request table of a receive comm at `owner` (which must not move while it is open).
    pub(super) fn table_for_recv(owner: *mut RecvComm, n: usize) -> Box<[Request]> {
        (0..n)
            .map(|i| Request {
                magic: REQ_MAGIC,
                idx: i as u16,
                owner: Owner::Recv(owner),
            })
            .collect()
    }

    /// Tests the request behind a pointer handed out by `isend`/`irecv`.
    ///
    /// # Safety
    /// `req` must come from this plugin's `isend`/`irecv` on a comm that is still open, and only
    /// the thread that drives that comm may call this.
    #[inline]
    pub unsafe fn test(
        req: *mut Request,
        sizes: &mut [u64; MAX_RECVS],
    ) -> NetResult<Option<usize>> {
        // SAFETY: per the contract, `req` points into a live comm's request table.
        let r = unsafe { &*req };
        if r.magic != REQ_MAGIC {
            return Err(NetError::InvalidArgument(format!(
                "test: {req:p} is not a request of this plugin"
            )));
        }
        match r.owner {
            Owner::Send(c) => {
                // SAFETY: the comm pointer was set when the comm was boxed and stays valid while
                // it is open; its driving thread is the caller.
                let c = unsafe { &mut *c };
                c.test(r.idx).map(|o| {
                    o.map(|size| {
                        sizes[0] = size;
                        1
                    })
                })
            }
            Owner::Recv(c) => {
                // SAFETY: as above.
                let c = unsafe { &mut *c };
                c.test(r.idx, sizes)
            }
        }
    }
}
