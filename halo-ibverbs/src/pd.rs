//! Protection domains: the scope within which memory regions and queue pairs may be used together.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys::{ibv_alloc_pd, ibv_dealloc_pd, ibv_pd};

use crate::device::Context;
use crate::error::{Result, VerbsError};

pub(crate) struct PdInner {
    pd: NonNull<ibv_pd>,
    ctx: Context,
}

// SAFETY: libibverbs PDs may be used from any thread; the pointer is freed only in Drop, after
// every MR and QP holding an Arc to this PD is gone.
unsafe impl Send for PdInner {}
// SAFETY: as above; verbs calls taking a PD are thread-safe.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: pd came from ibv_alloc_pd and nothing allocated on it is left (each holds an Arc).
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

impl PdInner {
    pub(crate) fn as_ptr(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }

    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }
}

/// A protection domain. Cheap to clone; freed when the last clone, MR and QP of it are dropped.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name())
            .finish()
    }
}

impl Context {
    /// Allocates a protection domain on this device.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(self.as_ptr()) };
        let pd =
            NonNull::new(pd).ok_or_else(|| VerbsError::last_os("ibv_alloc_pd", || self.name()))?;
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: self.clone(),
            }),
        })
    }
}

impl ProtectionDomain {
    /// The device this PD belongs to.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }
}
