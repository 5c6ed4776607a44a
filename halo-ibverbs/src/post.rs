//! Posting work requests. A batch is chained and handed to the provider in one call, built in
//! fixed-size stack arrays so the data path never allocates.

use std::mem::{self, MaybeUninit};
use std::ptr;

use rdma_mummy_sys::{
    ibv_post_recv, ibv_post_send, ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode,
    rdma_t,
};

use crate::error::{Result, VerbsError};
use crate::qp::QueuePair;

/// Most work requests one `post_send`/`post_recv` call accepts.
pub const MAX_WRS_PER_POST: usize = 16;
/// Most scatter/gather entries one work request may carry.
pub const MAX_SGE_PER_WR: usize = 4;

/// One scatter/gather entry: a byte range of a registered memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sge {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// `lkey` of the MR covering the range (ignored for inline sends).
    pub lkey: u32,
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA WRITE the local SGEs to `remote_addr` of the peer's MR `rkey`.
    Write {
        /// Peer address.
        remote_addr: u64,
        /// Peer MR key.
        rkey: u32,
    },
    /// RDMA WRITE, then consume a peer receive that completes with `imm` (host byte order).
    WriteImm {
        /// Peer address.
        remote_addr: u64,
        /// Peer MR key.
        rkey: u32,
        /// Immediate data delivered in the peer's completion.
        imm: u32,
    },
    /// RDMA READ from `remote_addr` of the peer's MR `rkey` into the local SGEs.
    Read {
        /// Peer address.
        remote_addr: u64,
        /// Peer MR key.
        rkey: u32,
    },
    /// SEND the local SGEs into the peer's next posted receive.
    Send,
    /// SEND with immediate data (host byte order).
    SendImm {
        /// Immediate data delivered in the peer's completion.
        imm: u32,
    },
}

/// A send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// The operation.
    pub op: SendOp,
    /// Local data (at most [`MAX_SGE_PER_WR`] entries; may be empty for zero-byte messages).
    pub sge: &'a [Sge],
    /// Whether a completion is generated on success (errors always complete).
    pub signaled: bool,
    /// Copy the data into the work request; needs no MR, limited to the QP's `max_inline_data`.
    pub inline: bool,
}

/// A receive-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Where a SEND's data lands; empty for receives that only catch WRITE-with-immediate.
    pub sge: &'a [Sge],
}

fn check_batch(qp: &QueuePair, n: usize, sges: impl Iterator<Item = usize>) -> Result<()> {
    if n > MAX_WRS_PER_POST {
        return Err(too_many(qp, n));
    }
    for (i, count) in sges.enumerate() {
        if count > MAX_SGE_PER_WR {
            return Err(too_many_sges(qp, i, count));
        }
    }
    Ok(())
}

fn too_many(qp: &QueuePair, n: usize) -> VerbsError {
    VerbsError::InvalidArgument(format!(
        "{n} work requests in one post on {}, at most {MAX_WRS_PER_POST}",
        qp.describe()
    ))
}

fn too_many_sges(qp: &QueuePair, i: usize, count: usize) -> VerbsError {
    VerbsError::InvalidArgument(format!(
        "work request {i} on {} has {count} SGEs, at most {MAX_SGE_PER_WR}",
        qp.describe()
    ))
}

/// An inline work request must fit the QP's inline room and cannot be a READ. Inlined: checked
/// on every small send of the data path; the error is built out of line.
#[inline]
fn check_inline(qp: &QueuePair, i: usize, wr: &SendWr<'_>) -> Result<()> {
    let bytes: u64 = wr.sge.iter().map(|s| u64::from(s.length)).sum();
    if bytes <= u64::from(qp.caps().max_inline_data) && !matches!(wr.op, SendOp::Read { .. }) {
        return Ok(());
    }
    Err(inline_error(qp, i, wr, bytes))
}

#[cold]
fn inline_error(qp: &QueuePair, i: usize, wr: &SendWr<'_>, bytes: u64) -> VerbsError {
    if matches!(wr.op, SendOp::Read { .. }) {
        return VerbsError::InvalidArgument(format!(
            "work request {i} on {}: an RDMA READ cannot be inline",
            qp.describe()
        ));
    }
    VerbsError::InvalidArgument(format!(
        "inline work request {i} on {} carries {bytes} bytes, the QP allows {}",
        qp.describe(),
        qp.caps().max_inline_data
    ))
}

/// Copies `src` into the slot of work request `i` and returns the pointer to hand to the provider.
/// The slots start uninitialised (the data path posts on every call: no 1 KiB memset each time);
/// only the entries written here are read by the provider.
fn stage_sges(slots: &mut [MaybeUninit<ibv_sge>], i: usize, src: &[Sge]) -> *mut ibv_sge {
    if src.is_empty() {
        return ptr::null_mut();
    }
    let slot = &mut slots[i * MAX_SGE_PER_WR..i * MAX_SGE_PER_WR + src.len()];
    for (dst, s) in slot.iter_mut().zip(src) {
        dst.write(ibv_sge {
            addr: s.addr,
            length: s.length,
            lkey: s.lkey,
        });
    }
    slot.as_mut_ptr().cast()
}

/// Index of `bad` in the array starting at `base`, clamped to the batch.
fn failed_index<T>(base: *const T, bad: *const T, n: usize) -> usize {
    if bad.is_null() {
        return 0;
    }
    let offset = (bad as usize).wrapping_sub(base as usize) / mem::size_of::<T>();
    offset.min(n.saturating_sub(1))
}

/// The verbs form of `wr`, its SGEs at `sg_list` (`next` NULL).
#[inline]
fn build_send_wr(wr: &SendWr<'_>, sg_list: *mut ibv_sge) -> ibv_send_wr {
    // SAFETY: ibv_send_wr is plain old data (integers, pointers, unions of them) for which
    // all-zero bytes are valid.
    let mut w: ibv_send_wr = unsafe { mem::zeroed() };
    w.wr_id = wr.wr_id;
    w.sg_list = sg_list;
    w.num_sge = wr.sge.len() as libc::c_int;
    let mut flags = 0;
    if wr.signaled {
        flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
    }
    if wr.inline {
        flags |= ibv_send_flags::IBV_SEND_INLINE.0;
    }
    w.send_flags = flags;
    let rdma = |remote_addr, rkey| rdma_t { remote_addr, rkey };
    match wr.op {
        SendOp::Write { remote_addr, rkey } => {
            w.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            w.wr.rdma = rdma(remote_addr, rkey);
        }
        SendOp::WriteImm {
            remote_addr,
            rkey,
            imm,
        } => {
            w.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            w.wr.rdma = rdma(remote_addr, rkey);
            w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        SendOp::Read { remote_addr, rkey } => {
            w.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            w.wr.rdma = rdma(remote_addr, rkey);
        }
        SendOp::Send => w.opcode = ibv_wr_opcode::IBV_WR_SEND,
        SendOp::SendImm { imm } => {
            w.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
            w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
    }
    w
}

impl QueuePair {
    /// Posts a batch of send-queue work requests with one `ibv_post_send`. On failure the error
    /// names the first work request not posted; those before it were posted.
    ///
    /// # Safety
    /// The SGEs are raw addresses that the provider or the NIC dereference, so the caller
    /// promises for every work request:
    /// - inline: the bytes are readable until this call returns;
    /// - otherwise: the range lies in a memory region registered under its `lkey`, which stays
    ///   registered and allocated until the work request's completion has been polled (or the
    ///   QP is destroyed); for an RDMA READ, nothing else reads or writes the range meanwhile;
    /// - the peer's `remote_addr`/`rkey` are the peer's business (a bad one fails the work
    ///   request with a remote access error, never touches local memory).
    pub unsafe fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        if wrs.len() > MAX_WRS_PER_POST {
            return Err(too_many(self, wrs.len()));
        }
        let mut sges =
            [const { MaybeUninit::<ibv_sge>::uninit() }; MAX_WRS_PER_POST * MAX_SGE_PER_WR];
        let mut raw = [const { MaybeUninit::<ibv_send_wr>::uninit() }; MAX_WRS_PER_POST];
        // One pass: check each work request and build it in place (the data path posts on every
        // call, so nothing is built twice or copied).
        for (i, wr) in wrs.iter().enumerate() {
            if wr.sge.len() > MAX_SGE_PER_WR {
                return Err(too_many_sges(self, i, wr.sge.len()));
            }
            if wr.inline {
                check_inline(self, i, wr)?;
            }
            let sg_list = stage_sges(&mut sges, i, wr.sge);
            raw[i].write(build_send_wr(wr, sg_list));
        }
        let n = wrs.len();
        let base = raw.as_mut_ptr().cast::<ibv_send_wr>();
        for i in 0..n - 1 {
            // SAFETY: entries 0..n are initialised and the array does not move while posting.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is alive; the chain of n initialised work requests and their SGE arrays
        // live on this stack frame until the call returns, and the provider copies what it keeps.
        let ret = unsafe { ibv_post_send(self.as_ptr(), base, &mut bad) };
        if ret != 0 {
            return Err(VerbsError::Post {
                op: "ibv_post_send",
                qp_num: self.qp_num(),
                wr_index: failed_index(base, bad, n),
                errno: ret.abs(),
            });
        }
        Ok(())
    }

    /// Posts one send-queue work request: [`Self::post_send`] of a single work request with up
    /// to two SGEs (the data path's common case), built on the stack without the batch arrays.
    ///
    /// # Safety
    /// As [`Self::post_send`].
    #[inline]
    pub unsafe fn post_send_one(&self, wr: &SendWr<'_>) -> Result<()> {
        if wr.sge.len() > 2 {
            // SAFETY: forwarded contract.
            return unsafe { self.post_send(std::slice::from_ref(wr)) };
        }
        if wr.inline {
            check_inline(self, 0, wr)?;
        }
        let mut sges = [const { MaybeUninit::<ibv_sge>::uninit() }; 2];
        let sg_list = if wr.sge.is_empty() {
            ptr::null_mut()
        } else {
            for (dst, s) in sges.iter_mut().zip(wr.sge) {
                dst.write(ibv_sge {
                    addr: s.addr,
                    length: s.length,
                    lkey: s.lkey,
                });
            }
            sges.as_mut_ptr().cast()
        };
        let mut w = build_send_wr(wr, sg_list);
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is alive; the work request and its SGEs live on this stack frame until
        // the call returns, and the provider copies what it keeps.
        let ret = unsafe { ibv_post_send(self.as_ptr(), &mut w, &mut bad) };
        if ret != 0 {
            return Err(VerbsError::Post {
                op: "ibv_post_send",
                qp_num: self.qp_num(),
                wr_index: 0,
                errno: ret.abs(),
            });
        }
        Ok(())
    }

    /// Posts a batch of receive work requests with one `ibv_post_recv`. On failure the error names
    /// the first work request not posted; those before it were posted.
    ///
    /// # Safety
    /// Every SGE's range lies in a memory region registered under its `lkey` that stays
    /// registered, allocated and otherwise unused until the receive's completion has been polled
    /// (or the QP is destroyed): an incoming SEND writes it. Receives without SGEs (for
    /// WRITE_WITH_IMM only) have nothing to promise.
    pub unsafe fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        check_batch(self, wrs.len(), wrs.iter().map(|w| w.sge.len()))?;
        let mut sges =
            [const { MaybeUninit::<ibv_sge>::uninit() }; MAX_WRS_PER_POST * MAX_SGE_PER_WR];
        let mut raw = [const { MaybeUninit::<ibv_recv_wr>::uninit() }; MAX_WRS_PER_POST];
        for (i, wr) in wrs.iter().enumerate() {
            raw[i].write(ibv_recv_wr {
                wr_id: wr.wr_id,
                next: ptr::null_mut(),
                sg_list: stage_sges(&mut sges, i, wr.sge),
                num_sge: wr.sge.len() as libc::c_int,
            });
        }
        let n = wrs.len();
        let base = raw.as_mut_ptr().cast::<ibv_recv_wr>();
        for i in 0..n - 1 {
            // SAFETY: entries 0..n are initialised and the array does not move while posting.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is alive; the chain and its SGE arrays outlive the call, and the
        // provider copies what it keeps.
        let ret = unsafe { ibv_post_recv(self.as_ptr(), base, &mut bad) };
        if ret != 0 {
            return Err(VerbsError::Post {
                op: "ibv_post_recv",
                qp_num: self.qp_num(),
                wr_index: failed_index(base, bad, n),
                errno: ret.abs(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sges_are_staged_per_work_request() {
        let mut slots =
            [const { MaybeUninit::<ibv_sge>::uninit() }; MAX_WRS_PER_POST * MAX_SGE_PER_WR];
        let src = [
            Sge {
                addr: 1,
                length: 2,
                lkey: 3,
            },
            Sge {
                addr: 4,
                length: 5,
                lkey: 6,
            },
        ];
        let p = stage_sges(&mut slots, 2, &src);
        assert_eq!(p, slots[2 * MAX_SGE_PER_WR..].as_mut_ptr().cast());
        // SAFETY: entries 8 and 9 were just written by stage_sges.
        let (a, b) = unsafe { (slots[8].assume_init(), slots[9].assume_init()) };
        assert_eq!((a.addr, b.lkey), (1, 6));
        assert!(stage_sges(&mut slots, 0, &[]).is_null());
    }

    #[test]
    fn failed_index_points_into_the_batch() {
        let arr = [0u64; 4];
        let base = arr.as_ptr();
        assert_eq!(failed_index(base, base.wrapping_add(2), 4), 2);
        assert_eq!(failed_index(base, ptr::null(), 4), 0);
        assert_eq!(failed_index(base, base.wrapping_add(9), 4), 3);
    }
}
