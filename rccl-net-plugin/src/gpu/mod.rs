//! GPU memory: ROCm loaded at run time and the per-device registration strategy chosen by a probe
//! at `init`. Registering `NCCL_PTR_CUDA` buffers and RCCL-exported dma-bufs through that strategy
//! is `net`'s business (`net::register`, `net::register_dmabuf`); nothing here knows `net`.
//!
//! Strategies, tried in this order (`HALO_GPU_REG` narrows the choice):
//! 1. dma-buf: `hsa_amd_portable_export_dmabuf` → `ibv_reg_dmabuf_mr(iova = address)` → close.
//!    Works on an upstream kernel where the NIC's provider supports dma-buf MRs (irdma on E810).
//! 2. by address: `ibv_reg_mr` on the GPU address; works where a peer-memory client exists, or
//!    where the GPU memory is ordinary pageable memory.
//! 3. none: `NCCL_PTR_CUDA` is not advertised and RCCL stages GPU data through host buffers.

mod rocm;

pub use rocm::{runtime, unload as unload_runtime, DeviceAlloc, DmaBuf, MemKind, Origin, Rocm};

use crate::config::GpuReg;
use crate::log::{info, INIT, NET};
use halo_ffi::{NCCL_PTR_CUDA, NCCL_PTR_DMABUF, NCCL_PTR_HOST};
use halo_ibverbs::{AccessFlags, ProtectionDomain};

/// How one device registers GPU memory, as proven by the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Self-exported dma-buf (strategy 1).
    DmaBuf,
    /// `ibv_reg_mr` on the GPU address (strategy 2).
    Va,
    /// GPU memory cannot be registered.
    None,
}

/// What the probe proved for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSupport {
    pub strategy: Strategy,
    /// `ibv_reg_dmabuf_mr` worked on this device (so `NCCL_PTR_DMABUF` is advertised).
    pub dmabuf_mr: bool,
}

impl GpuSupport {
    pub const NONE: GpuSupport = GpuSupport {
        strategy: Strategy::None,
        dmabuf_mr: false,
    };

    /// The `ptrSupport` bits this device may claim.
    pub fn ptr_support(&self) -> i32 {
        let mut p = NCCL_PTR_HOST;
        if self.strategy != Strategy::None {
            p |= NCCL_PTR_CUDA;
        }
        if self.dmabuf_mr {
            p |= NCCL_PTR_DMABUF;
        }
        p
    }

    /// Whether receives may land in GPU memory, which then needs a flush before the GPU reads it.
    pub fn gpu_receives(&self) -> bool {
        self.strategy != Strategy::None || self.dmabuf_mr
    }
}

/// Size of the probe's `hipMalloc` buffer.
const PROBE_BYTES: usize = 1 << 16;

/// Finds out how `dev` (its name, for the log) can register GPU memory with the `access` rights
/// the caller's regions need. Every outcome is logged at INFO: the winning strategy and why the
/// ones before it lost.
pub fn probe(pd: &ProtectionDomain, dev: &str, mode: GpuReg, access: AccessFlags) -> GpuSupport {
    if mode == GpuReg::None {
        info!(
            INIT | NET,
            "{dev}: GPU memory registration is off (HALO_GPU_REG=none); NCCL_PTR_CUDA is not advertised"
        );
        return GpuSupport::NONE;
    }
    let Some(rt) = runtime() else {
        return GpuSupport::NONE;
    };
    let buf = match rt.alloc(PROBE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            info!(
                INIT | NET,
                "{dev}: cannot allocate the GPU probe buffer ({e}); NCCL_PTR_CUDA is not advertised"
            );
            return GpuSupport::NONE;
        }
    };
    let kind = rt.classify(buf.ptr);
    let mut lost = Vec::new();
    if mode == GpuReg::Va {
        lost.push("dma-buf: skipped (HALO_GPU_REG=va)".to_string());
    } else {
        match probe_dmabuf(pd, rt, &buf, access) {
            Ok(()) => {
                info!(
                    INIT | NET,
                    "{dev}: GPU memory ({kind:?}) is registered through dma-buf \
                     (hsa_amd_portable_export_dmabuf + ibv_reg_dmabuf_mr); ptrSupport HOST|CUDA|DMABUF"
                );
                return GpuSupport {
                    strategy: Strategy::DmaBuf,
                    dmabuf_mr: true,
                };
            }
            Err(e) => lost.push(format!("dma-buf: {e}")),
        }
    }
    if mode == GpuReg::DmaBuf {
        lost.push("by address: skipped (HALO_GPU_REG=dmabuf)".to_string());
    } else {
        // SAFETY: `buf` stays allocated until after the region is dropped at the end of the arm.
        match unsafe { pd.reg_mr(buf.ptr as *mut u8, buf.len, access) } {
            Ok(mr) => {
                drop(mr);
                info!(
                    INIT | NET,
                    "{dev}: GPU memory ({kind:?}) is registered by address (ibv_reg_mr); \
                     ptrSupport HOST|CUDA; not through dma-buf because {}",
                    lost.join("; ")
                );
                return GpuSupport {
                    strategy: Strategy::Va,
                    dmabuf_mr: false,
                };
            }
            Err(e) => lost.push(format!("by address: {e}")),
        }
    }
    info!(
        INIT | NET,
        "{dev}: GPU memory ({kind:?}) cannot be registered ({}); NCCL_PTR_CUDA is not advertised \
         and RCCL stages GPU data through host memory",
        lost.join("; ")
    );
    GpuSupport::NONE
}

fn probe_dmabuf(
    pd: &ProtectionDomain,
    rt: &'static Rocm,
    buf: &DeviceAlloc,
    access: AccessFlags,
) -> Result<(), String> {
    let d = rt.export_dmabuf(buf.ptr, buf.len)?;
    // SAFETY: the region takes its own reference on the dma-buf; it is dropped before `buf`.
    let mr = unsafe { pd.reg_dmabuf_mr(d.offset, buf.len, buf.ptr, d.fd, access) }
        .map_err(|e| e.to_string())?;
    drop(mr);
    Ok(())
}
