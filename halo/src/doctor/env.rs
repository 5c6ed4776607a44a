//! NCCL/RCCL environment variables that silently change which transport RCCL uses.

use std::collections::BTreeMap;

use super::plugin::{is_halo_plugin, PLUGIN_FILE};

/// The first ROCm whose RCCL opens `NCCL_NET_PLUGIN` as given (a path) before trying
/// `librccl-net-<value>.so`; 6.1 and 6.2 only try the latter.
const ROCM_PLUGIN_PATH: (u32, u32) = (6, 3);
use super::{Check, Facts};

pub fn checks(env: &BTreeMap<String, String>, facts: &Facts) -> Vec<Check> {
    let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let iface = facts.link.as_ref().map(|l| l.netdev.as_str());
    vec![
        ib_disable(get("NCCL_IB_DISABLE")),
        net_plugin(get("NCCL_NET_PLUGIN"), facts.rccl_rocm),
        gdr_level(get("NCCL_NET_GDR_LEVEL")),
        gid_index(get("NCCL_IB_GID_INDEX"), facts),
        socket_ifname(get("NCCL_SOCKET_IFNAME"), iface),
        ib_hca(get("NCCL_IB_HCA"), facts),
        hsa_override(get("HSA_OVERRIDE_GFX_VERSION"), facts.gfx_target),
    ]
}

/// `NCCL_IB_HCA` as RCCL and the plugin read it: `[^][=]dev[:port][,dev[:port]…]`, names
/// matched as prefixes unless `=` asks for exact ones, `^` excluding what is listed.
/// `None` when the value is malformed (the plugin's init refuses it).
pub fn hca_selects(value: &str, ports: &[(String, u32)]) -> Option<Vec<(String, u32)>> {
    let mut rest = value.trim();
    let exclude = rest.starts_with('^');
    if exclude {
        rest = &rest[1..];
    }
    let exact = rest.starts_with('=');
    if exact {
        rest = &rest[1..];
    }
    let mut entries = Vec::new();
    for e in rest.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, port) = match e.split_once(':') {
            None => (e, None),
            Some((n, p)) => match p.trim().parse::<u8>() {
                Ok(p) if p >= 1 && !n.trim().is_empty() => (n.trim(), Some(u32::from(p))),
                _ => return None,
            },
        };
        entries.push((name.to_string(), port));
    }
    if entries.is_empty() {
        return None;
    }
    Some(
        ports
            .iter()
            .filter(|(dev, port)| {
                let listed = entries.iter().any(|(name, p)| {
                    let name_ok = if exact {
                        dev == name
                    } else {
                        dev.starts_with(name.as_str())
                    };
                    name_ok && p.is_none_or(|p| p == *port)
                });
                listed != exclude
            })
            .cloned()
            .collect(),
    )
}

fn ib_hca(v: Option<&str>, facts: &Facts) -> Check {
    const ID: &str = "env.ib_hca";
    const TITLE: &str = "NCCL_IB_HCA";
    let shown = |p: &[(String, u32)]| {
        p.iter()
            .map(|(d, n)| format!("{d}:{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(value) = v else {
        return Check::pass(ID, TITLE, "not set: every ACTIVE RDMA port may be used");
    };
    if facts.rdma_devices.is_empty() {
        return Check::skip(
            ID,
            TITLE,
            format!("{value}; no RDMA device to check it against"),
        );
    }
    let cluster = facts.link.as_ref().and_then(|l| l.port.clone());
    let fix = match &cluster {
        Some((dev, _)) => format!("export NCCL_IB_HCA={dev} (or unset it)"),
        None => format!(
            "export NCCL_IB_HCA=<one of {}> (or unset it)",
            shown(&facts.rdma_devices)
        ),
    };
    let Some(selected) = hca_selects(value, &facts.rdma_devices) else {
        return Check::fail(
            ID,
            TITLE,
            format!("{value}: not a list of dev[:port] entries, the plugin's init refuses it"),
            fix,
        );
    };
    if selected.is_empty() {
        return Check::fail(
            ID,
            TITLE,
            format!(
                "{value} selects none of this node's RDMA ports ({})",
                shown(&facts.rdma_devices)
            ),
            fix,
        );
    }
    match &cluster {
        Some(c) if !selected.contains(c) => Check::fail(
            ID,
            TITLE,
            format!(
                "{value} selects {} but not the cluster port {}:{}",
                shown(&selected),
                c.0,
                c.1
            ),
            fix,
        ),
        _ => Check::pass(ID, TITLE, format!("{value}: selects {}", shown(&selected))),
    }
}

/// "11.5.1" for gfx_target_version 110501.
fn gfx_dotted(target: u32) -> String {
    format!(
        "{}.{}.{}",
        target / 10000,
        (target / 100) % 100,
        target % 100
    )
}

fn hsa_override(v: Option<&str>, gfx_target: Option<u32>) -> Check {
    const ID: &str = "env.hsa_override";
    const TITLE: &str = "HSA_OVERRIDE_GFX_VERSION";
    let Some(value) = v else {
        return Check::pass(ID, TITLE, "not set");
    };
    let fix = "unset HSA_OVERRIDE_GFX_VERSION (and remove it from ~/.bashrc, the container's environment and job scripts)";
    let parse =
        |s: &str| -> Option<Vec<u32>> { s.split('.').map(|p| p.trim().parse().ok()).collect() };
    match gfx_target {
        Some(t) if parse(value) == parse(&gfx_dotted(t)) => Check::pass(
            ID,
            TITLE,
            format!(
                "{value}: the GPU's own version ({}), changes nothing",
                super::gpu::gfx_name(t)
            ),
        ),
        Some(t) => {
            let parts = parse(value).unwrap_or_default();
            let posed = match parts.as_slice() {
                [a, b, c] => super::gpu::gfx_name(a * 10000 + b * 100 + c),
                _ => "another GPU".to_string(),
            };
            Check::fail(
                ID,
                TITLE,
                format!(
                    "{value}: the {} poses as {posed}, HIP loads {posed} code objects and gfx1151 kernels fail",
                    super::gpu::gfx_name(t)
                ),
                fix,
            )
        }
        None => Check::warn(
            ID,
            TITLE,
            format!(
                "{value}: overrides the GPU architecture HIP sees (a leftover from older ROCm?)"
            ),
            fix,
        ),
    }
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
    // An APU's iGPU sits on the root complex and a slot NIC behind a root port: they meet at
    // the host bridge (PHB). RCCL's default distance (PXB) then refuses GPU-direct and stages
    // every transfer through host bounce buffers; PHB is the closest level that allows it.
    let fix = "export NCCL_NET_GDR_LEVEL=PHB";
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
        return Check::skip(
            ID,
            TITLE,
            "no RoCE v2 GID for the cluster IP (see its check)",
        );
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
    fn hca_lists() {
        let ports = vec![
            ("mlx5_0".to_string(), 1),
            ("mlx5_1".to_string(), 1),
            ("rocep1s0f0".to_string(), 1),
        ];
        let names = |v: &str| {
            hca_selects(v, &ports).map(|s| s.into_iter().map(|(d, _)| d).collect::<Vec<_>>())
        };
        assert_eq!(names("mlx5").unwrap(), ["mlx5_0", "mlx5_1"]);
        assert_eq!(names("=mlx5").unwrap(), Vec::<String>::new());
        assert_eq!(names("^mlx5_1").unwrap(), ["mlx5_0", "rocep1s0f0"]);
        assert_eq!(names("mlx5_0:2").unwrap(), Vec::<String>::new());
        assert_eq!(names("rocep1s0f0:1").unwrap(), ["rocep1s0f0"]);
        assert_eq!(names("mlx5_0:0"), None);
        assert_eq!(names(","), None);
    }

    #[test]
    fn plugin_names() {
        assert!(is_halo_plugin("halo"));
        assert!(is_halo_plugin("/opt/halo/lib/librccl-net-halo.so"));
        assert!(!is_halo_plugin("/usr/lib64/librccl-net-ib.so"));
    }
}
