//! Page-aligned, zeroed memory the plugin registers for itself (FIFO, sizes array, staging).

use super::error::{NetError, NetResult};
use super::regcache::data_access;
use halo_ibverbs::{MemoryRegion, ProtectionDomain};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// A registered buffer. The region is deregistered before the memory is freed (field order).
pub struct RegisteredBuf {
    mr: MemoryRegion,
    mem: AlignedMem,
}

struct AlignedMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the memory is plain bytes owned by this value; who writes it when is the data path's
// business (the NIC writes, the owning comm reads with volatile loads).
unsafe impl Send for AlignedMem {}
// SAFETY: as above; shared references only expose the address.
unsafe impl Sync for AlignedMem {}

impl Drop for AlignedMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `RegisteredBuf::new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl RegisteredBuf {
    /// `len` zeroed bytes on their own pages, registered for local and remote access.
    pub fn new(pd: &ProtectionDomain, len: usize, what: &str) -> NetResult<Self> {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(4096), 4096)
            .map_err(|e| NetError::Internal(format!("{what}: bad layout: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| NetError::System(format!("{what}: out of memory ({len} bytes)")))?;
        let mem = AlignedMem { ptr, layout };
        // SAFETY: `mem` lives as long as the region (dropped after it, see field order).
        let mr = unsafe { pd.reg_mr(ptr.as_ptr(), layout.size(), data_access()) }.map_err(|e| {
            NetError::System(format!(
                "{what}: cannot register {} bytes with {}: {e}",
                layout.size(),
                pd.context().name()
            ))
        })?;
        Ok(RegisteredBuf { mr, mem })
    }

    pub fn addr(&self) -> u64 {
        self.mem.ptr.as_ptr() as u64
    }

    pub fn ptr(&self) -> *mut u8 {
        self.mem.ptr.as_ptr()
    }

    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}
