//! NCCL/RCCL environment variables that silently change which transport RCCL uses.

use std::collections::BTreeMap;

use super::plugin::{is_halo_plugin, PLUGIN_FILE};

/// The first ROCm whose RCCL opens `NCCL_NET_PLUGIN` as given (a path) before trying
/// `librccl-net-<value>.so`; 6.1 and 6.2 only try the latter.
const ROCM_PLUGIN_PATH: (u32, u32) = (6, 3);
use super::{Check, Facts};

pub fn checks(env: &BTreeMap<String, String>, facts: &Facts) -> Vec<Check> {
    let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let iface = facts.cluster.as_ref().map(|c| c.netdev.as_str());
    vec![
        ib_disable(get("NCCL_IB_DISABLE")),
        net_plugin(get("NCCL_NET_PLUGIN"), facts.rccl_rocm),
        gdr_level(get("NCCL_NET_GDR_LEVEL")),
        gid_index(get("NCCL_IB_GID_INDEX"), facts),
        socket_ifname(get("NCCL_SOCKET_IFNAME"), iface),
    ]
}

fn ib_disable(v: Option<&str>) -> Check {
    const ID: &str = "env.ib_disable";
    const TITLE: &str = "NCCL_IB_DISABLE";
    match v {
        Some("1") => Check::warn(
            ID,
            TITLE,
            "NCCL_IB_DISABLE=1: if the net plugin does not load, RCCL falls back to TCP sockets instead of RDMA",
            "unset NCCL_IB_DISABLE",
        ),
        Some(other) => Check::pass(ID, TITLE, format!("NCCL_IB_DISABLE={other}")),
        None => Check::pass(ID, TITLE, "not set"),
    }
}

fn net_plugin(v: Option<&str>, rocm: Option<(u32, u32)>) -> Check {
    const ID: &str = "env.net_plugin";
    const TITLE: &str = "NCCL_NET_PLUGIN";
    let fix = format!(
        "export NCCL_NET_PLUGIN=halo LD_LIBRARY_PATH=/opt/halo/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} \
         (the directory of {PLUGIN_FILE}; halo cluster up sets both)"
    );
    match v {
        None => Check::warn(
            ID,
            TITLE,
            "not set: RCCL uses its built-in transports, not the halo plugin",
            fix,
        ),
        Some(p) if p.contains('/') && is_halo_plugin(p) => match rocm {
            Some((major, minor)) if (major, minor) < ROCM_PLUGIN_PATH => Check::fail(
                ID,
                TITLE,
                format!(
                    "{p}: RCCL of ROCm {major}.{minor} only loads librccl-net-<NCCL_NET_PLUGIN>.so \
                     by name, so a path is ignored and RCCL silently falls back to its own transports"
                ),
                fix,
            ),
            Some(_) => Check::pass(ID, TITLE, p),
            None => Check::warn(
                ID,
                TITLE,
                format!(
                    "{p}: a path is only loaded by RCCL of ROCm 6.3 and later (6.1/6.2 ignore it); \
                     the RCCL version is unknown"
                ),
                fix,
            ),
        },
        Some(p) if is_halo_plugin(p) => Check::pass(ID, TITLE, p),
        Some("none") => Check::warn(ID, TITLE, "none: net plugins disabled", fix),
        Some(p) => Check::warn(
            ID,
            TITLE,
            format!("{p}: not the halo plugin ({PLUGIN_FILE})"),
            fix,
        ),
    }
}

fn gdr_level(v: Option<&str>) -> Check {
    const ID: &str = "env.gdr_level";
    const TITLE: &str = "NCCL_NET_GDR_LEVEL";
    // The iGPU and a slot NIC sit under different PCIe bridges; RCCL's default distance (PXB)
    // then refuses GPU-direct and stages every transfer through host bounce buffers.
    let fix = "export NCCL_NET_GDR_LEVEL=SYS";
    match v.map(str::to_ascii_uppercase).as_deref() {
        None => Check::warn(
            ID,
            TITLE,
            "not set: RCCL's default (PXB) rejects GPU-direct between the iGPU and a slot NIC",
            fix,
        ),
        Some(l @ ("SYS" | "5" | "PHB" | "4")) => Check::pass(
            ID,
            TITLE,
            format!("{l}: GPU buffers registered with the NIC directly"),
        ),
        Some(l @ ("0" | "LOC")) => Check::warn(
            ID,
            TITLE,
            format!("{l}: GPU-direct disabled, every transfer is copied through host memory"),
            fix,
        ),
        Some(l) => Check::warn(
            ID,
            TITLE,
            format!("{l}: too close for an APU's iGPU and a slot NIC"),
            fix,
        ),
    }
}

fn gid_index(v: Option<&str>, facts: &Facts) -> Check {
    const ID: &str = "env.gid_index";
    const TITLE: &str = "NCCL_IB_GID_INDEX";
    let Some(cluster) = &facts.cluster else {
        return Check::skip(ID, TITLE, "cluster GID unknown");
    };
    let want = cluster.gid_index.to_string();
    match v {
        None => Check::pass(ID, TITLE, format!("not set (halo cluster up sets {want})")),
        Some(i) if i == want => Check::pass(ID, TITLE, i),
        Some(i) => Check::fail(
            ID,
            TITLE,
            format!("{i}, but the RoCE v2 GID of {} is index {want}", cluster.ip),
            format!("export NCCL_IB_GID_INDEX={want}"),
        ),
    }
}

fn socket_ifname(v: Option<&str>, iface: Option<&str>) -> Check {
    const ID: &str = "env.socket_ifname";
    const TITLE: &str = "NCCL_SOCKET_IFNAME";
    let Some(iface) = iface else {
        return Check::skip(ID, TITLE, "cluster interface unknown");
    };
    let fix = format!("export NCCL_SOCKET_IFNAME={iface} GLOO_SOCKET_IFNAME={iface}");
    let Some(value) = v else {
        return Check::warn(
            ID,
            TITLE,
            "not set: RCCL and Gloo may bootstrap over another interface",
            fix,
        );
    };
    // NCCL syntax: comma list of prefixes, '=' for exact names, a leading '^' excludes.
    let (exclude, list) = match value.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (exact, list) = match list.strip_prefix('=') {
        Some(rest) => (true, rest),
        None => (false, list),
    };
    let hit = list.split(',').any(|item| {
        if exact {
            item == iface
        } else {
            !item.is_empty() && iface.starts_with(item)
        }
    });
    if hit != exclude {
        Check::pass(ID, TITLE, value)
    } else {
        Check::warn(ID, TITLE, format!("{value} does not select {iface}"), fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    #[test]
    fn ifname_syntax() {
        let v = |s| socket_ifname(Some(s), Some("enp1s0f0np0")).verdict;
        assert_eq!(v("enp1s0f0np0"), Verdict::Pass);
        assert_eq!(v("enp1"), Verdict::Pass);
        assert_eq!(v("=enp1"), Verdict::Warn);
        assert_eq!(v("eth,enp"), Verdict::Pass);
        assert_eq!(v("^lo,docker"), Verdict::Pass);
        assert_eq!(v("^enp"), Verdict::Warn);
    }

    #[test]
    fn plugin_names() {
        assert!(is_halo_plugin("halo"));
        assert!(is_halo_plugin("/opt/halo/lib/librccl-net-halo.so"));
        assert!(!is_halo_plugin("/usr/lib64/librccl-net-ib.so"));
    }
}
