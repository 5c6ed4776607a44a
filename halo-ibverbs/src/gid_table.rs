//! Reading a port's GID table: the GIDs from libibverbs, their type and netdev from sysfs
//! (`ports/<p>/gid_attrs/{types,ndevs}/<i>`), with `ibv_query_gid_ex` where sysfs has no answer.

use std::ffi::CStr;
use std::mem;
use std::path::Path;

use rdma_mummy_sys::{
    ibv_gid, ibv_gid_entry, ibv_query_gid, ibv_query_gid_ex, IBV_GID_TYPE_ROCE_V2,
};

use crate::device::Context;
use crate::error::{Result, VerbsError};
use crate::gid::{Gid, GidEntry, GidType};
use crate::port::LinkLayer;

/// What `ibv_query_gid_ex` says about an entry.
struct GidExInfo {
    kind: GidType,
    netdev: Option<String>,
}

fn read_sysfs_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.trim();
    (!line.is_empty()).then(|| line.to_string())
}

fn ifindex_to_name(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated interface name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

impl Context {
    /// The GID at `index` of port `port`'s table (all zero for an unused entry on some devices;
    /// others fail with EINVAL or ENODATA).
    pub fn query_gid(&self, port: u8, index: u32) -> Result<Gid> {
        // SAFETY: ibv_gid is a 16-byte union for which all-zero bytes are valid.
        let mut raw: ibv_gid = unsafe { mem::zeroed() };
        let idx = libc::c_int::try_from(index)
            .map_err(|_| VerbsError::InvalidArgument(format!("GID index {index} too large")))?;
        // SAFETY: the context is open and raw is a valid out-pointer.
        let ret = unsafe { ibv_query_gid(self.as_ptr(), port, idx, &mut raw) };
        if ret != 0 {
            return Err(VerbsError::from_ret(
                "ibv_query_gid",
                format!("{} port {port} index {index}", self.name()),
                ret,
            ));
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(Gid(unsafe { raw.raw }))
    }

    fn query_gid_ex(&self, port: u8, index: u32) -> Option<GidExInfo> {
        // SAFETY: ibv_gid_entry is plain old data for which all-zero bytes are valid.
        let mut entry: ibv_gid_entry = unsafe { mem::zeroed() };
        // SAFETY: the context is open and entry is a valid out-pointer of the size passed along.
        let ret = unsafe { ibv_query_gid_ex(self.as_ptr(), u32::from(port), index, &mut entry, 0) };
        if ret != 0 {
            return None;
        }
        Some(GidExInfo {
            kind: if entry.gid_type == IBV_GID_TYPE_ROCE_V2 {
                GidType::RoceV2
            } else {
                GidType::IbRoceV1
            },
            netdev: ifindex_to_name(entry.ndev_ifindex),
        })
    }

    /// The populated entries of port `port`'s GID table, in index order; all-zero (unused)
    /// entries are left out.
    pub fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>> {
        let attr = self.query_port(port)?;
        let attrs_dir = self
            .ibdev_path()
            .join("ports")
            .join(port.to_string())
            .join("gid_attrs");
        let mut table = Vec::new();
        for index in 0..attr.gid_tbl_len {
            let gid = match self.query_gid(port, index) {
                Ok(gid) => gid,
                // Unused entries of RoCE tables fail with EINVAL/ENODATA instead of reading zero.
                Err(e) if matches!(e.errno(), Some(libc::EINVAL | libc::ENODATA)) => continue,
                Err(e) => return Err(e),
            };
            if gid.is_zero() {
                continue;
            }
            let sysfs_kind = read_sysfs_line(&attrs_dir.join("types").join(index.to_string()))
                .and_then(|t| GidType::from_sysfs(&t));
            let sysfs_netdev = read_sysfs_line(&attrs_dir.join("ndevs").join(index.to_string()));
            let (kind, netdev) = match (sysfs_kind, sysfs_netdev) {
                (Some(kind), netdev @ Some(_)) => (kind, netdev),
                (sysfs_kind, sysfs_netdev) => {
                    let ex = self.query_gid_ex(port, index);
                    let kind = sysfs_kind
                        .or_else(|| ex.as_ref().map(|e| e.kind))
                        .unwrap_or(match attr.link_layer {
                            LinkLayer::Ethernet => GidType::RoceV2,
                            _ => GidType::IbRoceV1,
                        });
                    (kind, sysfs_netdev.or(ex.and_then(|e| e.netdev)))
                }
            };
            let ip = (attr.link_layer == LinkLayer::Ethernet).then(|| gid.to_ip());
            table.push(GidEntry {
                index,
                gid,
                kind,
                ip,
                netdev,
            });
        }
        Ok(table)
    }
}
