//! Kernel command line: IOMMU pass-through, PCI resource reallocation, ASPM off, and the GTT
//! ceiling that decides how much of the unified RAM the iGPU may use.

use super::{human_bytes, Check};
use crate::sysroot::SysRoot;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TTM_PAGE: u64 = 4096;
/// What the OS keeps for itself when the GPU fills its GTT.
const OS_HEADROOM: u64 = 4 * GIB;
/// First kernel line seen logging "Configuring gttsize via module parameter is deprecated".
const GTTSIZE_DEPRECATED_SINCE: (u32, u32) = (6, 14);

pub struct Cmdline {
    /// `None` when `/proc/cmdline` is unreadable.
    params: Option<Vec<String>>,
    pub gttsize_mib: Option<u64>,
    pub pages_limit: Option<u64>,
}

impl Cmdline {
    pub fn read(root: &SysRoot) -> Self {
        Self::parse(root.read("/proc/cmdline").as_deref())
    }

    fn parse(text: Option<&str>) -> Self {
        let params: Option<Vec<String>> =
            text.map(|t| t.split_whitespace().map(str::to_string).collect());
        let value = |key: &str| -> Option<u64> {
            params
                .as_ref()?
                .iter()
                .rev()
                .find_map(|p| p.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        Cmdline {
            gttsize_mib: value("amdgpu.gttsize"),
            pages_limit: value("ttm.pages_limit"),
            params,
        }
    }

    fn has(&self, param: &str) -> bool {
        self.params
            .as_ref()
            .is_some_and(|p| p.iter().any(|x| x == param))
    }

    /// The larger of the two GTT settings, in bytes: the most the iGPU may map.
    pub fn gtt_ceiling_bytes(&self) -> Option<u64> {
        let a = self.gttsize_mib.map(|m| m * MIB);
        let b = self.pages_limit.map(|p| p * TTM_PAGE);
        a.max(b)
    }
}

fn grubby(args: &str) -> String {
    format!("sudo grubby --update-kernel=ALL --args='{args}' && sudo reboot")
}

pub fn checks(root: &SysRoot, cmdline: &Cmdline, mem_total: Option<u64>) -> Vec<Check> {
    let mut out = Vec::new();
    if cmdline.params.is_none() {
        out.push(Check::fail(
            "kernel.cmdline",
            "Kernel command line",
            format!("cannot read {}", root.path("/proc/cmdline").display()),
            "run halo doctor on the node itself (or point --root at a captured tree)",
        ));
        return out;
    }
    for (id, title, param, why) in [
        (
            "kernel.iommu",
            "IOMMU pass-through",
            "iommu=pt",
            "IOMMU translation slows NIC and iGPU DMA",
        ),
        (
            "kernel.pci_realloc",
            "PCI BAR reallocation",
            "pci=realloc",
            "large BARs of the NIC/iGPU may not map",
        ),
        (
            "kernel.pcie_aspm",
            "PCIe ASPM disabled",
            "pcie_aspm=off",
            "ASPM adds latency spikes on the 100G link",
        ),
    ] {
        out.push(if cmdline.has(param) {
            Check::pass(id, title, param)
        } else {
            Check::fail(id, title, format!("{param} missing ({why})"), grubby(param))
        });
    }
    let kernel = kernel_version(root);
    out.push(gtt_form(cmdline, kernel, mem_total));
    out.push(gtt_fits_ram(cmdline, mem_total));
    out
}

/// (major, minor) of `/proc/sys/kernel/osrelease`, e.g. "6.18.5-200.fc43.x86_64" → (6, 18).
pub fn kernel_version(root: &SysRoot) -> Option<(u32, u32)> {
    let release = root.read("/proc/sys/kernel/osrelease")?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A GTT ceiling that leaves the OS its headroom, rounded down to whole GiB.
fn recommended_gib(mem_total: Option<u64>) -> Option<u64> {
    mem_total.map(|m| m.saturating_sub(OS_HEADROOM) / GIB)
}

fn recommended_args(cmdline: &Cmdline, mem_total: Option<u64>) -> String {
    let Some(gib) = recommended_gib(mem_total) else {
        return "ttm.pages_limit=<GiB x 262144>".to_string();
    };
    let pages = format!("ttm.pages_limit={}", gib * GIB / TTM_PAGE);
    if cmdline.gttsize_mib.is_some() {
        format!("amdgpu.gttsize={} {pages}", gib * 1024)
    } else {
        pages
    }
}

fn gtt_form(cmdline: &Cmdline, kernel: Option<(u32, u32)>, mem_total: Option<u64>) -> Check {
    const ID: &str = "kernel.gtt_param";
    const TITLE: &str = "GTT size parameter";
    let kernel_text = kernel.map_or("unknown kernel".to_string(), |(a, b)| {
        format!("kernel {a}.{b}")
    });
    match (cmdline.gttsize_mib, cmdline.pages_limit) {
        (None, None) => Check::warn(
            ID,
            TITLE,
            "neither ttm.pages_limit nor amdgpu.gttsize set: the iGPU gets only the driver's default share of RAM",
            grubby(&recommended_args(cmdline, mem_total)),
        ),
        (Some(mib), None) => {
            let value = format!("amdgpu.gttsize={mib} ({}) only, {kernel_text}", human_bytes(mib * MIB));
            if kernel.is_some_and(|k| k >= GTTSIZE_DEPRECATED_SINCE) {
                Check::warn(
                    ID,
                    TITLE,
                    format!("{value}: amdgpu.gttsize is deprecated since 6.14, ttm.pages_limit sets the ceiling"),
                    format!(
                        "sudo grubby --update-kernel=ALL --remove-args='amdgpu.gttsize' --args='ttm.pages_limit={}' && sudo reboot",
                        mib * MIB / TTM_PAGE
                    ),
                )
            } else {
                Check::pass(ID, TITLE, value)
            }
        }
        (None, Some(pages)) => Check::pass(
            ID,
            TITLE,
            format!("ttm.pages_limit={pages} ({})", human_bytes(pages * TTM_PAGE)),
        ),
        (Some(mib), Some(pages)) => {
            let a = mib * MIB;
            let b = pages * TTM_PAGE;
            let value = format!(
                "amdgpu.gttsize={mib} ({}), ttm.pages_limit={pages} ({})",
                human_bytes(a),
                human_bytes(b)
            );
            // Both describe one ceiling; 1% absorbs MiB-vs-page rounding in hand-made values.
            if a.abs_diff(b) * 100 <= a.max(b) {
                Check::pass(ID, TITLE, format!("{value}: consistent"))
            } else {
                Check::fail(
                    ID,
                    TITLE,
                    format!("{value}: the two disagree"),
                    grubby(&format!("amdgpu.gttsize={mib} ttm.pages_limit={}", a / TTM_PAGE)),
                )
            }
        }
    }
}

fn gtt_fits_ram(cmdline: &Cmdline, mem_total: Option<u64>) -> Check {
    const ID: &str = "kernel.gtt_ram";
    const TITLE: &str = "GTT ceiling fits RAM";
    let Some(ceiling) = cmdline.gtt_ceiling_bytes() else {
        return Check::skip(ID, TITLE, "no GTT parameter on the command line");
    };
    let Some(total) = mem_total else {
        return Check::skip(ID, TITLE, "MemTotal not readable from /proc/meminfo");
    };
    let value = format!(
        "GTT ceiling {} of MemTotal {}",
        human_bytes(ceiling),
        human_bytes(total)
    );
    let fix = grubby(&recommended_args(cmdline, mem_total));
    if ceiling > total {
        Check::fail(ID, TITLE, format!("{value}: larger than RAM"), fix)
    } else if ceiling > total.saturating_sub(OS_HEADROOM) {
        Check::warn(
            ID,
            TITLE,
            format!(
                "{value}: leaves the OS less than {}",
                human_bytes(OS_HEADROOM)
            ),
            fix,
        )
    } else {
        Check::pass(ID, TITLE, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guide_values_describe_the_same_ceiling() {
        let c = Cmdline::parse(Some(
            "iommu=pt amdgpu.gttsize=126976 ttm.pages_limit=32505856",
        ));
        assert_eq!(c.gttsize_mib, Some(126976));
        assert_eq!(c.pages_limit, Some(32505856));
        assert_eq!(c.gtt_ceiling_bytes(), Some(124 * GIB));
        assert_eq!(
            gtt_form(&c, Some((6, 18)), None).verdict,
            super::super::Verdict::Pass
        );
    }

    #[test]
    fn last_occurrence_wins_like_the_kernel() {
        let c = Cmdline::parse(Some("ttm.pages_limit=1 ttm.pages_limit=25165824"));
        assert_eq!(c.gtt_ceiling_bytes(), Some(96 * GIB));
    }
}
