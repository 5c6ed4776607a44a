//! Registration cache of one device: page-aligned, reference-counted memory regions.
//!
//! RCCL may register the same user buffer once per operation (`regIsGlobal = 1` tells it that is
//! cheap), so a range inside an existing registration of the same kind only takes a reference.
//! Registrations by address (host or GPU) and self-exported dma-bufs are found again by address
//! range; a dma-buf RCCL hands in is never shared: its fd number says nothing about the memory
//! behind it (RCCL closes it right away and the number is reused).

use super::device::NetDevice;
use super::error::{NetError, NetResult};
use halo_ibverbs::{AccessFlags, MemoryRegion};
use std::sync::{Arc, Mutex};

/// What RCCL holds as `mhandle`: the keys for the data path, the registration behind them, and
/// the device whose cache holds it, so that `deregMr` never has to look at the comm.
pub struct MrHandle {
    pub lkey: u32,
    pub rkey: u32,
    /// Range the registration covers (page-aligned for registrations by address).
    pub start: u64,
    pub end: u64,
    /// The memory is GPU memory: a receive into it needs a flush.
    pub gpu: bool,
    mr: Arc<MemoryRegion>,
    dev: Arc<NetDevice>,
}

impl MrHandle {
    /// The device the memory is registered with.
    pub fn device(&self) -> &Arc<NetDevice> {
        &self.dev
    }

    /// Gives the handle back to its device's cache (`deregMr`); the last one deregisters.
    pub fn release(self) -> NetResult<()> {
        let dev = Arc::clone(&self.dev);
        dev.regs.release(self)
    }
}

/// The handle of a data-path buffer of `size` bytes at `addr`, checked: the bytes must lie in its
/// registration, and only an empty buffer may come without one (`Ok(None)`). `what` names the
/// buffer in errors (`isend data`, `irecv buffer 3`).
pub fn checked_handle(
    mh: Option<&MrHandle>,
    addr: u64,
    size: u64,
    what: impl std::fmt::Display,
) -> NetResult<Option<&MrHandle>> {
    match mh {
        Some(m) if size > 0 && (addr < m.start || addr + size > m.end) => {
            Err(NetError::InvalidArgument(format!(
                "{what} {addr:#x}+{size} outside its registration {:#x}..{:#x}",
                m.start, m.end
            )))
        }
        None if size > 0 => Err(NetError::InvalidArgument(format!(
            "{what} has no memory handle"
        ))),
        mh => Ok(mh),
    }
}

/// How a registration was made; lookups only match registrations of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegKind {
    /// `ibv_reg_mr` of host memory.
    Host,
    /// `ibv_reg_mr` of GPU memory (page-aligned range).
    GpuVa,
    /// GPU memory through a dma-buf the plugin exported itself (exact range, iova = address).
    GpuExport,
    /// A dma-buf RCCL exported; never shared.
    DmaBuf,
}

impl RegKind {
    fn shared(self) -> bool {
        self != RegKind::DmaBuf
    }

    fn gpu(self) -> bool {
        self != RegKind::Host
    }
}

struct Entry {
    kind: RegKind,
    start: u64,
    end: u64,
    refs: usize,
    mr: Arc<MemoryRegion>,
}

/// All registrations of one device's protection domain.
pub struct RegCache {
    page: u64,
    entries: Mutex<Vec<Entry>>,
}

/// Access rights every registration gets: the data path writes into and reads from it.
pub fn data_access() -> AccessFlags {
    AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_READ
}

impl Default for RegCache {
    fn default() -> Self {
        Self::new()
    }
}

impl RegCache {
    pub fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        RegCache {
            page: if page > 0 { page as u64 } else { 4096 },
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The page-aligned range holding `[addr, addr + len)` (at least one byte).
    pub fn page_range(&self, addr: u64, len: u64) -> NetResult<(u64, u64)> {
        let end = addr.checked_add(len.max(1)).ok_or_else(|| {
            NetError::InvalidArgument(format!("buffer {addr:#x}+{len} wraps the address space"))
        })?;
        let start = addr & !(self.page - 1);
        let end = end.div_ceil(self.page) * self.page;
        Ok((start, end))
    }

    /// Registers host memory `[addr, addr + len)` with `owner`'s protection domain (this cache
    /// is `owner.regs`) or takes a reference on a registration that covers it.
    ///
    /// # Safety
    /// The memory must stay mapped until the handle is given back to [`RegCache::release`].
    pub unsafe fn acquire(
        &self,
        owner: &Arc<NetDevice>,
        addr: u64,
        len: u64,
    ) -> NetResult<Box<MrHandle>> {
        // SAFETY: forwarded contract.
        unsafe { self.acquire_va(owner, RegKind::Host, addr, len) }
    }

    /// Registers `[addr, addr + len)` by address (whole pages) as `kind`, or takes a reference
    /// on a registration of that kind that covers it.
    ///
    /// # Safety
    /// The memory must stay mapped until the handle is given back to [`RegCache::release`].
    pub unsafe fn acquire_va(
        &self,
        owner: &Arc<NetDevice>,
        kind: RegKind,
        addr: u64,
        len: u64,
    ) -> NetResult<Box<MrHandle>> {
        let (start, end) = self.page_range(addr, len)?;
        let pd = &owner.pd;
        self.acquire_with(owner, kind, start, end, || {
            // SAFETY: the caller keeps [start, end) mapped (whole pages of a mapped buffer are mapped).
            unsafe { pd.reg_mr(start as *mut u8, (end - start) as usize, data_access()) }.map_err(
                |e| {
                    NetError::System(format!(
                        "cannot register {:#x}..{:#x} ({} bytes) with {}: {e}",
                        start,
                        end,
                        end - start,
                        pd.context().name()
                    ))
                },
            )
        })
    }

    /// Takes a reference on a shareable registration of `kind` of exactly `[start, end)`, or
    /// makes a new one with `register`. Only exact ranges are shared: a registration kept alive
    /// by one handle may cover memory that was freed and handed out again, and a range inside it
    /// must not land on the old pages. `owner` is the device this cache belongs to.
    pub fn acquire_with(
        &self,
        owner: &Arc<NetDevice>,
        kind: RegKind,
        start: u64,
        end: u64,
        register: impl FnOnce() -> NetResult<MemoryRegion>,
    ) -> NetResult<Box<MrHandle>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if kind.shared() {
            if let Some(e) = entries
                .iter_mut()
                .find(|e| e.kind == kind && e.start == start && e.end == end)
            {
                e.refs += 1;
                return Ok(Self::handle(owner, e));
            }
        }
        let mr = register()?;
        entries.push(Entry {
            kind,
            start,
            end,
            refs: 1,
            mr: Arc::new(mr),
        });
        Ok(Self::handle(owner, entries.last().expect("just pushed")))
    }

    fn handle(owner: &Arc<NetDevice>, e: &Entry) -> Box<MrHandle> {
        Box::new(MrHandle {
            lkey: e.mr.lkey(),
            rkey: e.mr.rkey(),
            start: e.start,
            end: e.end,
            gpu: e.kind.gpu(),
            mr: Arc::clone(&e.mr),
            dev: Arc::clone(owner),
        })
    }

    /// Gives back a handle from [`RegCache::acquire`]; the last one deregisters the memory.
    pub fn release(&self, handle: MrHandle) -> NetResult<()> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pos) = entries.iter().position(|e| Arc::ptr_eq(&e.mr, &handle.mr)) else {
            return Err(NetError::InvalidUsage(format!(
                "deregMr of {:#x}..{:#x}: not registered with this device",
                handle.start, handle.end
            )));
        };
        entries[pos].refs -= 1;
        if entries[pos].refs == 0 {
            entries.swap_remove(pos);
        }
        Ok(())
    }

    /// Registrations currently held (distinct memory regions).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registrations of `kind` currently held.
    pub fn count(&self, kind: RegKind) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_range_rounds_out_to_whole_pages() {
        let c = RegCache::new();
        let p = c.page;
        assert_eq!(c.page_range(p + 1, 10).unwrap(), (p, 2 * p));
        assert_eq!(c.page_range(p, p).unwrap(), (p, 2 * p));
        assert_eq!(
            c.page_range(p, 0).unwrap(),
            (p, 2 * p),
            "zero bytes still map a page"
        );
        assert_eq!(c.page_range(p - 1, 2).unwrap(), (0, 2 * p));
        assert!(c.page_range(u64::MAX - 1, 5).is_err());
    }
}
