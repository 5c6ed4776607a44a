//! `regMr` and `regMrDmaBuf` for every memory type, through the device's proven strategy.

use super::device::NetDevice;
use super::error::{NetError, NetResult};
use super::regcache::{data_access, MrHandle, RegKind};
use crate::gpu::{runtime, MemKind, Strategy};
use crate::log::{info, warn_once, NET};
use halo_ffi::{NCCL_PTR_CUDA, NCCL_PTR_HOST};
use std::sync::Arc;

/// `regMr(type)`: host memory by address; GPU memory through the device's strategy.
///
/// # Safety
/// The memory must stay allocated until the handle is given back to the device's cache.
pub unsafe fn register(
    dev: &Arc<NetDevice>,
    ty: i32,
    addr: u64,
    len: u64,
) -> NetResult<Box<MrHandle>> {
    match ty {
        // SAFETY: forwarded contract.
        NCCL_PTR_HOST => unsafe { dev.regs.acquire(dev, addr, len) },
        // SAFETY: forwarded contract.
        NCCL_PTR_CUDA => unsafe { register_gpu(dev, addr, len) },
        t => Err(NetError::InvalidArgument(format!(
            "regMr of memory type {t} (NCCL_PTR_HOST = {NCCL_PTR_HOST}, NCCL_PTR_CUDA = {NCCL_PTR_CUDA})"
        ))),
    }
}

/// # Safety
/// As [`register`].
unsafe fn register_gpu(dev: &Arc<NetDevice>, addr: u64, len: u64) -> NetResult<Box<MrHandle>> {
    let rt = match (dev.gpu.strategy, runtime()) {
        (Strategy::None, _) | (_, None) => {
            warn_once!(
                NET,
                "RCCL asked to register GPU memory, but no GPU memory registration works here \
                 (see the INFO lines of init; HALO_GPU_REG)"
            );
            return Err(NetError::InvalidUsage(format!(
                "regMr of GPU memory {addr:#x}+{len} on {}: this device does not advertise \
                 NCCL_PTR_CUDA (no GPU memory registration strategy worked at init)",
                dev.describe()
            )));
        }
        (_, Some(rt)) => rt,
    };
    match (rt.classify(addr), dev.gpu.strategy) {
        // RCCL also calls host-resident allocations "CUDA" memory; they register like host memory.
        // SAFETY: forwarded contract.
        (MemKind::Host, _) => unsafe { dev.regs.acquire(dev, addr, len) },
        // Managed memory is pageable system memory the kernel can pin.
        // SAFETY: forwarded contract.
        (MemKind::Managed { .. }, _) | (MemKind::Device { .. }, Strategy::Va) => unsafe {
            dev.regs.acquire_va(dev, RegKind::GpuVa, addr, len)
        },
        (MemKind::Device { .. }, _) => {
            let end = addr.checked_add(len).ok_or_else(|| {
                NetError::InvalidArgument(format!("buffer {addr:#x}+{len} wraps the address space"))
            })?;
            dev.regs
                .acquire_with(dev, RegKind::GpuExport, addr, end, || {
                    let buf = rt.export_dmabuf(addr, len as usize).map_err(|e| {
                        NetError::System(format!("regMr of GPU memory on {}: {e}", dev.describe()))
                    })?;
                    // SAFETY: the region holds its own reference on the dma-buf; `buf` closes only
                    // the fd. The caller keeps the allocation alive while the region exists.
                    unsafe {
                        dev.pd
                            .reg_dmabuf_mr(buf.offset, len as usize, addr, buf.fd, data_access())
                    }
                    .map_err(|e| {
                        NetError::System(format!(
                            "registering the dma-buf of GPU memory {addr:#x}+{len}: {e}"
                        ))
                    })
                })
        }
    }
}

/// `regMrDmaBuf`: registers `len` bytes at `offset` of RCCL's dma-buf `fd`, mapped at `addr`,
/// before returning (RCCL closes the fd right after). A negative fd means "no dma-buf": plain
/// `regMr`. Where the device cannot register dma-bufs but registers GPU memory by address
/// (strategy 2), the buffer is registered by address instead, so a job with
/// `NCCL_DMABUF_ENABLE=1` keeps working; otherwise the registration fails with the reason.
///
/// # Safety
/// As [`register`]; `fd` must be a file descriptor RCCL owns for the duration of the call.
pub unsafe fn register_dmabuf(
    dev: &Arc<NetDevice>,
    ty: i32,
    addr: u64,
    len: u64,
    offset: u64,
    fd: i32,
) -> NetResult<Box<MrHandle>> {
    if fd < 0 {
        // SAFETY: forwarded contract.
        return unsafe { register(dev, ty, addr, len) };
    }
    let end = addr.checked_add(len).ok_or_else(|| {
        NetError::InvalidArgument(format!("buffer {addr:#x}+{len} wraps the address space"))
    })?;
    let r = dev.regs.acquire_with(dev, RegKind::DmaBuf, addr, end, || {
        // SAFETY: the kernel takes its own reference on the dma-buf during the call, so RCCL
        // may close `fd` afterwards; RCCL keeps the memory allocated until deregMr.
        unsafe {
            dev.pd
                .reg_dmabuf_mr(offset, len as usize, addr, fd, data_access())
        }
        .map_err(|e| {
            NetError::System(format!(
                "regMrDmaBuf of {len} bytes at offset {offset} of fd {fd} (address {addr:#x}) on {}: {e}",
                dev.describe()
            ))
        })
    });
    match r {
        Err(e) if !dev.gpu.dmabuf_mr && dev.gpu.strategy == Strategy::Va => {
            info!(
                NET,
                "{e}; {} registers GPU memory by address, so {addr:#x}+{len} is registered that way",
                dev.describe()
            );
            // SAFETY: forwarded contract.
            unsafe { register(dev, ty, addr, len) }
        }
        r => r,
    }
}
