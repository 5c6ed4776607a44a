//! Flush of receives into GPU memory, and the NIC's copies of eager messages into it.
//!
//! The NIC's writes into GPU memory may still sit in PCIe or fabric buffers when the receive's
//! completion arrives. An RDMA READ from the received buffer, issued by the same NIC after the
//! writes, returns only once they are visible to the GPU. Each receive comm owns a loopback RC
//! QP (connected to itself) for these reads; each read fetches one byte into a host sink.
//!
//! The same QP carries the copies of eager messages out of their bounce slots (host memory)
//! into receive buffers in GPU memory, which the CPU does not write: an RDMA WRITE from the
//! slot to the buffer, on our own NIC.

use super::buffer::RegisteredBuf;
use super::connect::{new_flush, ConnSettings};
use super::device::NetDevice;
use super::error::{NetError, NetResult};
use crate::protocol::{FIFO_DEPTH, MAX_EAGER_SLOTS};
use halo_ibverbs::{
    CompletionQueue, CqId, QueuePair, SendOp, SendWr, Sge, WcOpcode, WorkCompletion,
};
use std::time::{Duration, Instant};

/// Flushes in flight per receive comm: one per outstanding receive is enough.
pub const FLUSH_SLOTS: usize = FIFO_DEPTH;
/// Eager copies in flight per receive comm: one per bounce slot.
pub const EAGER_COPIES: usize = MAX_EAGER_SLOTS;
/// Work request ids of eager copies: this bit and the slot.
const COPY_TAG: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Posted,
    Done,
}

/// The flush QP of one receive comm. Field order: the QP goes before the memory it reads into.
pub struct Flush {
    qp: QueuePair,
    cq: CompletionQueue,
    sink: RegisteredBuf,
    slots: [Slot; FLUSH_SLOTS],
    reads_done: u64,
    /// Eager copies posted and completed (not yet collected), one bit per bounce slot.
    copies_out: u16,
    copies_done: u16,
    error: Option<NetError>,
}

impl Flush {
    /// `qp` must be connected to itself and `sink` hold at least [`FLUSH_SLOTS`] bytes.
    pub fn new(qp: QueuePair, cq: CompletionQueue, sink: RegisteredBuf) -> Self {
        Flush {
            qp,
            cq,
            sink,
            slots: [Slot::Free; FLUSH_SLOTS],
            reads_done: 0,
            copies_out: 0,
            copies_done: 0,
            error: None,
        }
    }

    /// The QP number and CQ, as async events name them.
    pub fn watch_ids(&self) -> (u32, CqId) {
        (self.qp.qp_num(), self.cq.id())
    }

    fn fail(&mut self, e: NetError) -> NetError {
        self.error.get_or_insert(e).clone()
    }

    /// Posts a one-byte READ of `addr` (registered under `rkey`); returns the slot to test.
    pub fn post(&mut self, addr: u64, rkey: u32) -> NetResult<usize> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let slot = self
            .slots
            .iter()
            .position(|s| *s == Slot::Free)
            .ok_or_else(|| {
                NetError::InvalidUsage(format!(
                    "iflush: more than {FLUSH_SLOTS} flushes in flight on one receive comm"
                ))
            })?;
        let sge = Sge {
            addr: self.sink.addr() + slot as u64,
            length: 1,
            lkey: self.sink.lkey(),
        };
        let wr = SendWr {
            wr_id: slot as u64,
            op: SendOp::Read {
                remote_addr: addr,
                rkey,
            },
            sge: std::slice::from_ref(&sge),
            signaled: true,
            inline: false,
        };
        // SAFETY: the READ lands in our own registered sink (alive as long as the QP) and reads
        // the caller's registered GPU buffer, which RCCL keeps until the flush is tested.
        unsafe { self.qp.post_send(&[wr]) }.map_err(|e| {
            let qpn = self.qp.qp_num();
            self.fail(NetError::System(format!(
                "posting the flush READ of {addr:#x} on flush qp {qpn:#x}: {e}"
            )))
        })?;
        self.slots[slot] = Slot::Posted;
        Ok(slot)
    }

    /// Posts the copy of `len` bytes at `src` (our registered bounce slot `slot`, under `lkey`)
    /// to `dst` (GPU memory registered under `rkey`); [`Self::take_copies_done`] reports it.
    pub fn post_copy(
        &mut self,
        slot: u16,
        src: u64,
        lkey: u32,
        len: u32,
        dst: u64,
        rkey: u32,
    ) -> NetResult<()> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if usize::from(slot) >= EAGER_COPIES || self.copies_out & 1 << slot != 0 {
            return Err(NetError::Internal(format!(
                "eager copy of slot {slot} while one is in flight or past {EAGER_COPIES} slots"
            )));
        }
        let bit = 1u16 << slot;
        let sge = Sge {
            addr: src,
            length: len,
            lkey,
        };
        let wr = SendWr {
            wr_id: COPY_TAG | u64::from(slot),
            op: SendOp::Write {
                remote_addr: dst,
                rkey,
            },
            sge: &std::slice::from_ref(&sge)[..usize::from(len > 0)],
            signaled: true,
            inline: false,
        };
        // SAFETY: the source is our bounce slot, which the protocol keeps until this copy is
        // reported; the destination is the caller's registered receive buffer, which RCCL keeps
        // until `test` reports the receive done, which waits for this copy.
        unsafe { self.qp.post_send(&[wr]) }.map_err(|e| {
            let qpn = self.qp.qp_num();
            self.fail(NetError::System(format!(
                "posting the copy of an eager message to {dst:#x} on flush qp {qpn:#x}: {e}"
            )))
        })?;
        self.copies_out |= bit;
        Ok(())
    }

    /// Eager copies completed since the last call, one bit per bounce slot.
    pub fn take_copies_done(&mut self) -> NetResult<u16> {
        self.poll()?;
        self.copies_out &= !self.copies_done;
        Ok(std::mem::take(&mut self.copies_done))
    }

    /// Polls the completions of flush READs and eager copies.
    fn poll(&mut self) -> NetResult<()> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut wcs = [WorkCompletion::default(); FLUSH_SLOTS + EAGER_COPIES];
        let n = self
            .cq
            .poll(&mut wcs)
            .map_err(|e| self.fail(NetError::System(format!("polling flush completions: {e}"))))?;
        for wc in &wcs[..n] {
            let copy = wc.wr_id & COPY_TAG != 0;
            if let Err(e) = wc.result() {
                let qpn = self.qp.qp_num();
                let what = if copy {
                    "copy of an eager message into GPU memory"
                } else {
                    "flush READ"
                };
                return Err(self.fail(NetError::Remote(format!(
                    "{what} failed: {e} (vendor error {:#x}) on flush qp {qpn:#x}",
                    wc.vendor_err
                ))));
            }
            if copy {
                self.copies_done |= 1u16.checked_shl(wc.wr_id as u32).unwrap_or(0);
                continue;
            }
            if wc.opcode == WcOpcode::RdmaRead && wc.byte_len == 1 {
                self.reads_done += 1;
            }
            if let Some(s) = self.slots.get_mut(wc.wr_id as usize) {
                *s = Slot::Done;
            }
        }
        Ok(())
    }

    /// Whether the flush in `slot` completed; a completed slot is free again afterwards.
    pub fn test(&mut self, slot: usize) -> NetResult<bool> {
        if self.slots.get(slot).is_none_or(|s| *s == Slot::Free) {
            return Err(NetError::InvalidArgument(format!(
                "test of flush request {slot}, which is not in flight"
            )));
        }
        self.poll()?;
        if self.slots[slot] == Slot::Done {
            self.slots[slot] = Slot::Free;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Completed one-byte RDMA READs since the comm was created.
    pub fn reads_done(&self) -> u64 {
        self.reads_done
    }

    /// The byte the READ of `slot` fetched.
    fn sink_byte(&self, slot: usize) -> u8 {
        // SAFETY: `slot` < FLUSH_SLOTS bytes of the sink; the READ that wrote it has completed.
        unsafe { std::ptr::read_volatile(self.sink.ptr().add(slot)) }
    }
}

/// How long the `init` probe waits for its READ.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The byte the probe reads back.
const PROBE_MARK: u8 = 0x5a;

/// Proves that `dev` can run the flush of GPU receives and the NIC's copies of eager messages
/// into GPU memory: creates a flush QP, connects it to itself, reads one byte of a registered
/// buffer through it and checks the byte, then writes that byte elsewhere in the buffer through
/// it and checks it there. Some devices may refuse a QP connected to itself; they then cannot
/// flush, and the caller must not advertise GPU memory on them. The error says which step
/// failed and the verbs error.
pub fn probe(dev: &NetDevice, s: &ConnSettings) -> Result<(), String> {
    let mut flush = new_flush(dev, s).map_err(|e| e.to_string())?;
    let src = RegisteredBuf::new(&dev.pd, 64, "flush probe source").map_err(|e| e.to_string())?;
    // SAFETY: the buffer has 64 bytes and nothing else uses it yet.
    unsafe { std::ptr::write_volatile(src.ptr().add(7), PROBE_MARK) };
    let slot = flush
        .post(src.addr() + 7, src.rkey())
        .map_err(|e| e.to_string())?;
    probe_wait("READ", || flush.test(slot).map_err(|e| e.to_string()))?;
    probe_check("READ completed but fetched", flush.sink_byte(slot))?;
    flush
        .post_copy(
            0,
            src.addr() + 7,
            src.lkey(),
            1,
            src.addr() + 40,
            src.rkey(),
        )
        .map_err(|e| e.to_string())?;
    probe_wait("WRITE", || {
        flush
            .take_copies_done()
            .map(|done| done & 1 != 0)
            .map_err(|e| e.to_string())
    })?;
    // SAFETY: byte 40 of the 64-byte buffer; the WRITE that set it has completed.
    probe_check("WRITE completed but wrote", unsafe {
        std::ptr::read_volatile(src.ptr().add(40))
    })
}

/// Polls `done` until it says the probe's loopback `op` has completed, at most [`PROBE_TIMEOUT`].
fn probe_wait(op: &str, mut done: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let t0 = Instant::now();
    while !done()? {
        if t0.elapsed() > PROBE_TIMEOUT {
            return Err(format!(
                "the loopback RDMA {op} did not complete within {} s",
                PROBE_TIMEOUT.as_secs()
            ));
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// The byte a completed probe step left: [`PROBE_MARK`], or an error saying what `step` found.
fn probe_check(step: &str, got: u8) -> Result<(), String> {
    match got {
        PROBE_MARK => Ok(()),
        b => Err(format!(
            "the loopback RDMA {step} {b:#04x}, not {PROBE_MARK:#04x}"
        )),
    }
}
