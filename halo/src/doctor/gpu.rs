//! The iGPU as amdgpu and KFD describe it: architecture, BIOS carve-out, GTT size; and whether
//! the NIC can register its memory through dma-buf (rdma-core and kernel versions).

use super::{human_bytes, Check, Facts};
use crate::sysroot::SysRoot;

/// `gfx_target_version` of Strix Halo's iGPU (major 11, minor 5, stepping 1).
const GFX1151: u32 = 110501;
/// Boards at the 512 MB BIOS minimum still report up to this much.
const CARVE_OUT_OK: u64 = 4 << 30;

/// "gfx1151" from 110501: decimal major, then minor and stepping as hex digits.
pub fn gfx_name(target_version: u32) -> String {
    let major = target_version / 10000;
    let minor = (target_version / 100) % 100;
    let step = target_version % 100;
    format!("gfx{major}{minor:x}{step:x}")
}

pub fn checks(root: &SysRoot, facts: &Facts) -> Vec<Check> {
    vec![arch(root), memory(root, facts), dmabuf(root)]
}

/// First rdma-core release whose irdma provider implements `ibv_reg_dmabuf_mr` (earlier ones
/// answer EOPNOTSUPP).
const RDMA_CORE_DMABUF: u32 = 45;
/// First kernel whose irdma driver registers dma-buf memory regions (Debian 12's 6.1 module has
/// no `reg_user_mr_dmabuf`).
const KERNEL_DMABUF: (u32, u32) = (6, 3);

/// The distribution family from `/etc/os-release` (`ID`, then `ID_LIKE`).
fn distro(root: &SysRoot) -> Option<&'static str> {
    let text = root
        .read("/etc/os-release")
        .or_else(|| root.read("/usr/lib/os-release"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let ids = format!("{} {}", field("ID="), field("ID_LIKE="));
    ["fedora", "ubuntu", "debian"]
        .into_iter()
        .find(|d| ids.split_whitespace().any(|w| w == *d))
}

/// What brings rdma-core and the kernel far enough on `distro`.
fn dmabuf_fix(distro: Option<&str>, old_rdma_core: bool, old_kernel: bool) -> String {
    match distro {
        Some("fedora") => {
            let mut pkgs = Vec::new();
            if old_rdma_core {
                pkgs.push("rdma-core libibverbs");
            }
            if old_kernel {
                pkgs.push("kernel");
            }
            format!(
                "sudo dnf upgrade --refresh {} && sudo reboot",
                pkgs.join(" ")
            )
        }
        Some("ubuntu") => {
            "upgrade to Ubuntu 24.04 or later (sudo do-release-upgrade), whose rdma-core \
             and kernel register dma-bufs with irdma"
                .into()
        }
        Some("debian") if old_rdma_core => {
            "upgrade to Debian 13 (trixie: rdma-core 56, kernel 6.12); \
             Debian 12 has no rdma-core >= 45, not even in bookworm-backports"
                .into()
        }
        Some("debian") => {
            "sudo apt install -t bookworm-backports linux-image-amd64 && sudo reboot \
             (Debian 12: add bookworm-backports to the apt sources first)"
                .into()
        }
        _ => format!(
            "install rdma-core >= {RDMA_CORE_DMABUF} and a kernel >= {}.{} from the distribution",
            KERNEL_DMABUF.0, KERNEL_DMABUF.1
        ),
    }
}

/// Whether irdma can register the iGPU's memory as a dma-buf (the plugin's strategy 1). Without
/// it the plugin registers GPU memory by address or RCCL stages it through host memory: a
/// warning, not a failure.
fn dmabuf(root: &SysRoot) -> Check {
    const ID: &str = "gpu.dmabuf";
    const TITLE: &str = "dma-buf GPU-direct support";
    let kernel = super::kernel::kernel_version(root);
    let Some(v) = super::software::rdma_core_version(root) else {
        return Check::skip(
            ID,
            TITLE,
            "libibverbs.so.1.* not found: rdma-core's version is unknown",
        );
    };
    let Some(kernel) = kernel else {
        return Check::skip(ID, TITLE, "kernel version unknown");
    };
    let (rdma_core, lib) = (v.major, v.source);
    let old_rdma_core = rdma_core < RDMA_CORE_DMABUF;
    let old_kernel = kernel < KERNEL_DMABUF;
    let seen = format!(
        "rdma-core {rdma_core} ({lib}), kernel {}.{}",
        kernel.0, kernel.1
    );
    if !old_rdma_core && !old_kernel {
        return Check::pass(ID, TITLE, format!("{seen}: irdma registers dma-bufs"));
    }
    let mut why = Vec::new();
    if old_rdma_core {
        why.push(format!(
            "rdma-core < {RDMA_CORE_DMABUF} has no ibv_reg_dmabuf_mr for irdma"
        ));
    }
    if old_kernel {
        why.push(format!(
            "kernel < {}.{} has no dma-buf memory regions in irdma",
            KERNEL_DMABUF.0, KERNEL_DMABUF.1
        ));
    }
    Check::warn(
        ID,
        TITLE,
        format!(
            "{seen}: GPU-direct via dma-buf unavailable ({}); GPU memory is registered by address \
             where possible, else staged through host memory",
            why.join("; ")
        ),
        dmabuf_fix(distro(root), old_rdma_core, old_kernel),
    )
}

/// The first GPU's `gfx_target_version` in the KFD topology.
pub fn gfx_target(root: &SysRoot) -> Option<u32> {
    gfx_targets(root).first().copied()
}

fn gfx_targets(root: &SysRoot) -> Vec<u32> {
    let base = "/sys/class/kfd/kfd/topology/nodes";
    root.entries(base)
        .iter()
        .filter_map(|n| root.read(&format!("{base}/{n}/properties")))
        .filter_map(|props| {
            props.lines().find_map(|l| {
                l.strip_prefix("gfx_target_version ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        // CPU nodes report 0.
        .filter(|&v| v != 0)
        .collect()
}

fn arch(root: &SysRoot) -> Check {
    const ID: &str = "gpu.arch";
    const TITLE: &str = "GPU architecture";
    match gfx_targets(root).first() {
        None => Check::fail(
            ID,
            TITLE,
            "no GPU node in the KFD topology (amdgpu/KFD not loaded?)",
            "sudo modprobe amdgpu; check `dmesg | grep -i kfd`",
        ),
        Some(&GFX1151) => Check::pass(ID, TITLE, format!("gfx1151 (gfx_target_version {GFX1151})")),
        Some(&other) => Check::warn(
            ID,
            TITLE,
            format!("{} (gfx_target_version {other}), not Strix Halo's gfx1151", gfx_name(other)),
            "check that RCCL, PyTorch and vLLM ship code objects for this GPU (HSA_OVERRIDE_GFX_VERSION is a last resort)",
        ),
    }
}

fn memory(root: &SysRoot, facts: &Facts) -> Check {
    const ID: &str = "gpu.memory";
    const TITLE: &str = "iGPU carve-out and GTT";
    let read_u64 = |p: String| root.read(&p).and_then(|v| v.parse::<u64>().ok());
    let found = root
        .entries("/sys/class/drm")
        .into_iter()
        .filter(|c| c.starts_with("card") && !c.contains('-'))
        .find_map(|card| {
            let dev = format!("/sys/class/drm/{card}/device");
            Some((
                card,
                read_u64(format!("{dev}/mem_info_vram_total"))?,
                read_u64(format!("{dev}/mem_info_gtt_total"))?,
            ))
        });
    let Some((card, vram, gtt)) = found else {
        if facts.gfx_target.is_none() {
            return Check::skip(ID, TITLE, "no AMD GPU");
        }
        return Check::fail(
            ID,
            TITLE,
            "no amdgpu card with mem_info_vram_total/mem_info_gtt_total",
            "sudo modprobe amdgpu; check `dmesg | grep -i amdgpu`",
        );
    };
    let value = format!(
        "{card}: VRAM carve-out {}, GTT {}",
        human_bytes(vram),
        human_bytes(gtt)
    );
    if vram > CARVE_OUT_OK {
        return Check::warn(
            ID,
            TITLE,
            format!("{value}: carve-out larger than needed, RAM is withheld from the GTT"),
            "set the BIOS iGPU memory allocation to its minimum (512 MB)",
        );
    }
    match facts.kernel_gtt_bytes {
        // The driver may round the ceiling; 1% covers that but not a missed reboot.
        Some(asked) if gtt.abs_diff(asked) * 100 > asked => Check::warn(
            ID,
            TITLE,
            format!(
                "{value}: the kernel command line asks for {}",
                human_bytes(asked)
            ),
            "reboot so the new GTT parameters take effect (check `cat /proc/cmdline`)",
        ),
        _ => Check::pass(ID, TITLE, value),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gfx_names() {
        assert_eq!(super::gfx_name(110501), "gfx1151");
        assert_eq!(super::gfx_name(90402), "gfx942");
        assert_eq!(super::gfx_name(90010), "gfx90a");
    }
}
