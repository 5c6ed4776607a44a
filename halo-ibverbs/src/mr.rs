//! Memory regions and their access rights.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys::{ibv_dereg_mr, ibv_mr, ibv_reg_dmabuf_mr, ibv_reg_mr_iova2};

use crate::error::{Result, VerbsError};
use crate::pd::{PdInner, ProtectionDomain};

/// Access rights of a memory region or a queue pair (`enum ibv_access_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccessFlags(u32);

impl AccessFlags {
    /// No rights beyond local read.
    pub const EMPTY: AccessFlags = AccessFlags(0);
    /// The adapter may write the memory (needed for RECV and READ targets).
    pub const LOCAL_WRITE: AccessFlags = AccessFlags(1);
    /// Peers may RDMA WRITE into the memory.
    pub const REMOTE_WRITE: AccessFlags = AccessFlags(1 << 1);
    /// Peers may RDMA READ the memory.
    pub const REMOTE_READ: AccessFlags = AccessFlags(1 << 2);
    /// Peers may run atomics on the memory.
    pub const REMOTE_ATOMIC: AccessFlags = AccessFlags(1 << 3);
    /// Relaxed PCIe ordering; an optional flag that devices without support ignore.
    pub const RELAXED_ORDERING: AccessFlags = AccessFlags(1 << 20);

    /// The flags a QP accepts in `qp_access_flags` (the rest only make sense on an MR).
    pub(crate) const QP_MASK: AccessFlags = AccessFlags(
        Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_READ.0 | Self::REMOTE_ATOMIC.0,
    );

    /// The raw `ibv_access_flags` bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set in `self`.
    pub fn contains(self, other: AccessFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags set in both.
    pub fn intersection(self, other: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 & other.0)
    }
}

impl BitOr for AccessFlags {
    type Output = AccessFlags;
    fn bitor(self, rhs: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for AccessFlags {
    fn bitor_assign(&mut self, rhs: AccessFlags) {
        self.0 |= rhs.0;
    }
}

/// A registered memory region, deregistered on drop. Keeps its PD alive; the memory it covers
/// must outlive it (the registration functions are `unsafe` for that reason).
pub struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    _pd: Arc<PdInner>,
}

// SAFETY: an MR is an immutable handle once registered; libibverbs allows deregistering it from any
// thread, and the fields read through it never change.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above; &MemoryRegion only reads immutable fields.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    fn raw(&self) -> &ibv_mr {
        // SAFETY: mr stays valid until Drop.
        unsafe { self.mr.as_ref() }
    }

    /// Local key, for SGEs that reference this region.
    pub fn lkey(&self) -> u32 {
        self.raw().lkey
    }

    /// Remote key, for peers that RDMA READ/WRITE this region.
    pub fn rkey(&self) -> u32 {
        self.raw().rkey
    }

    /// Start address of the region (the I/O virtual address peers use).
    pub fn addr(&self) -> u64 {
        self.raw().addr as u64
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.raw().length
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &format_args!("{:#x}", self.lkey()))
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: mr came from a successful registration and is deregistered exactly once.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

impl ProtectionDomain {
    /// Registers `len` bytes of host memory at `addr`.
    ///
    /// # Safety
    /// The memory must stay allocated (and must not be unmapped or remapped) until the returned
    /// region and every work request using it are gone; the adapter reads and writes it behind
    /// the compiler's back.
    pub unsafe fn reg_mr(
        &self,
        addr: *mut u8,
        len: usize,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        if addr.is_null() || len == 0 {
            return Err(VerbsError::InvalidArgument(format!(
                "cannot register {len} bytes at {addr:p} on {}",
                self.context().name()
            )));
        }
        // ibv_reg_mr is a header macro over ibv_reg_mr_iova2 in current rdma-core; the shim's
        // ibv_reg_mr_iova2 also falls back to the older entry points.
        // SAFETY: the PD is alive; the caller guarantees the memory outlives the region.
        let mr = unsafe {
            ibv_reg_mr_iova2(
                self.inner.as_ptr(),
                addr.cast(),
                len,
                addr as u64,
                access.bits(),
            )
        };
        self.wrap_mr(mr, "ibv_reg_mr", || format!("{len} bytes at {addr:p}"))
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (e.g. GPU memory), mapped at `iova`.
    ///
    /// # Safety
    /// The dma-buf must stay valid until the returned region and every work request using it are
    /// gone.
    pub unsafe fn reg_dmabuf_mr(
        &self,
        offset: u64,
        len: usize,
        iova: u64,
        fd: RawFd,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        if fd < 0 || len == 0 {
            return Err(VerbsError::InvalidArgument(format!(
                "cannot register {len} bytes of dma-buf fd {fd} on {}",
                self.context().name()
            )));
        }
        // SAFETY: the PD is alive; the caller guarantees the dma-buf outlives the region.
        let mr = unsafe {
            ibv_reg_dmabuf_mr(
                self.inner.as_ptr(),
                offset,
                len,
                iova,
                fd,
                access.bits() as libc::c_int,
            )
        };
        self.wrap_mr(mr, "ibv_reg_dmabuf_mr", || {
            format!("{len} bytes at offset {offset} of dma-buf fd {fd}")
        })
    }

    fn wrap_mr(
        &self,
        mr: *mut ibv_mr,
        op: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<MemoryRegion> {
        match NonNull::new(mr) {
            Some(mr) => Ok(MemoryRegion {
                mr,
                _pd: Arc::clone(&self.inner),
            }),
            None => Err(VerbsError::last_os(op, || {
                format!("{} ({})", self.context().name(), what())
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags_match_ibv_values() {
        let all = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ;
        assert_eq!(all.bits(), 0b111);
        assert!(all.contains(AccessFlags::REMOTE_READ));
        assert!(!all.contains(AccessFlags::RELAXED_ORDERING));
        assert_eq!(AccessFlags::RELAXED_ORDERING.bits(), 0x10_0000);
        let mut f = AccessFlags::EMPTY;
        f |= AccessFlags::RELAXED_ORDERING | AccessFlags::REMOTE_WRITE;
        assert_eq!(
            f.intersection(AccessFlags::QP_MASK),
            AccessFlags::REMOTE_WRITE
        );
    }
}
