//! Kernel command line: IOMMU pass-through, PCI resource reallocation, ASPM off, and the GTT
//! ceiling that decides how much of the unified RAM the iGPU may use.

use super::os::Os;
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

pub fn checks(root: &SysRoot, cmdline: &Cmdline, mem_total: Option<u64>, os: &Os) -> Vec<Check> {
    let mut out = Vec::new();
    if cmdline.params.is_none() {
        out.push(Check::skip(
            "kernel.cmdline",
            "Kernel command line",
            format!(
                "cannot read {}: run halo doctor on the node itself (or point --root at a captured tree)",
                root.path("/proc/cmdline").display()
            ),
        ));
        return out;
    }
    out.push(iommu(root, cmdline, os));
    for (id, title, param, why) in [
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
            Check::warn(
                id,
                title,
                format!("{param} missing ({why})"),
                os.kernel_args(param, &[]),
            )
        });
    }
    let kernel = kernel_version(root);
    out.push(gtt_form(cmdline, kernel, mem_total, os));
    out.push(gtt_fits_ram(cmdline, mem_total, os));
    out
}

/// The IOMMU mode in effect, from the default domain type of every IOMMU group
/// (`/sys/kernel/iommu_groups/N/type`: "identity" is pass-through, "DMA"/"DMA-FQ" translate),
/// with the command line as the fallback when the groups are not in view.
fn iommu(root: &SysRoot, cmdline: &Cmdline, os: &Os) -> Check {
    const ID: &str = "kernel.iommu";
    const TITLE: &str = "IOMMU pass-through";
    const GROUPS: &str = "/sys/kernel/iommu_groups";
    let on_cmdline = cmdline.has("iommu=pt");
    let slow = "IOMMU translation slows NIC and iGPU DMA";
    if !root.exists(GROUPS) {
        return if on_cmdline {
            Check::pass(
                ID,
                TITLE,
                "iommu=pt (command line; IOMMU groups not in view)",
            )
        } else {
            Check::warn(
                ID,
                TITLE,
                format!("iommu=pt missing ({slow})"),
                os.kernel_args("iommu=pt", &[]),
            )
        };
    }
    let mut types: Vec<String> = root
        .entries(GROUPS)
        .iter()
        .filter_map(|g| root.read(&format!("{GROUPS}/{g}/type")))
        .collect();
    if types.is_empty() {
        return Check::pass(
            ID,
            TITLE,
            "no IOMMU groups: the IOMMU is off, DMA is untranslated",
        );
    }
    let groups = types.len();
    types.sort();
    types.dedup();
    let translated: Vec<&String> = types.iter().filter(|t| t.starts_with("DMA")).collect();
    if translated.is_empty() {
        return Check::pass(
            ID,
            TITLE,
            format!("{} in effect ({groups} groups)", types.join(", ")),
        );
    }
    let kinds: Vec<&str> = translated.iter().map(|t| t.as_str()).collect();
    if on_cmdline {
        Check::warn(
            ID,
            TITLE,
            format!(
                "{} in effect although the command line has iommu=pt ({slow})",
                kinds.join(", ")
            ),
            "reboot so iommu=pt takes effect; if it still translates, check for amd_iommu=force_isolation or iommu.passthrough=0 in `cat /proc/cmdline`",
        )
    } else {
        Check::warn(
            ID,
            TITLE,
            format!("{} in effect, iommu=pt missing ({slow})", kinds.join(", ")),
            os.kernel_args("iommu=pt", &[]),
        )
    }
}

/// (major, minor) of `/proc/sys/kernel/osrelease`, e.g. "6.18.5-200.fc43.x86_64" → (6, 18).
pub fn kernel_version(root: &SysRoot) -> Option<(u32, u32)> {
    let release = root.read("/proc/sys/kernel/osrelease")?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What a GTT ceiling should be for this much RAM.
enum Recommended {
    /// Leaves the OS its headroom, in whole GiB.
    Gib(u64),
    /// RAM too small for a ceiling above the driver's default (half of RAM).
    DriverDefault(u64),
    Unknown,
}

fn recommended(mem_total: Option<u64>) -> Recommended {
    let Some(total) = mem_total else {
        return Recommended::Unknown;
    };
    let gib = total.saturating_sub(OS_HEADROOM) / GIB;
    if gib * GIB <= total / 2 {
        Recommended::DriverDefault(total)
    } else {
        Recommended::Gib(gib)
    }
}

/// The GTT fix for this RAM size: new parameters, or none at all on a small machine.
fn recommended_fix(cmdline: &Cmdline, mem_total: Option<u64>, os: &Os) -> String {
    let gib = match recommended(mem_total) {
        Recommended::Gib(g) => g,
        Recommended::DriverDefault(_) => {
            return os.kernel_args("", &["amdgpu.gttsize", "ttm.pages_limit"]);
        }
        Recommended::Unknown => return os.kernel_args("ttm.pages_limit=<GiB x 262144>", &[]),
    };
    let pages = format!("ttm.pages_limit={}", gib * GIB / TTM_PAGE);
    let args = if cmdline.gttsize_mib.is_some() {
        format!("amdgpu.gttsize={} {pages}", gib * 1024)
    } else {
        pages
    };
    os.kernel_args(&args, &[])
}

fn gtt_form(
    cmdline: &Cmdline,
    kernel: Option<(u32, u32)>,
    mem_total: Option<u64>,
    os: &Os,
) -> Check {
    const ID: &str = "kernel.gtt_param";
    const TITLE: &str = "GTT size parameter";
    let kernel_text = kernel.map_or("unknown kernel".to_string(), |(a, b)| {
        format!("kernel {a}.{b}")
    });
    match (cmdline.gttsize_mib, cmdline.pages_limit) {
        (None, None) => match recommended(mem_total) {
            Recommended::DriverDefault(total) => Check::pass(
                ID,
                TITLE,
                format!(
                    "neither set: with {} of RAM the driver's default (half of RAM) is all the OS can spare",
                    human_bytes(total)
                ),
            ),
            _ => Check::warn(
                ID,
                TITLE,
                "neither ttm.pages_limit nor amdgpu.gttsize set: the iGPU gets only the driver's default share of RAM",
                recommended_fix(cmdline, mem_total, os),
            ),
        },
        (Some(mib), None) => {
            let value = format!("amdgpu.gttsize={mib} ({}) only, {kernel_text}", human_bytes(mib * MIB));
            if kernel.is_some_and(|k| k >= GTTSIZE_DEPRECATED_SINCE) {
                Check::warn(
                    ID,
                    TITLE,
                    format!("{value}: amdgpu.gttsize is deprecated since 6.14, ttm.pages_limit sets the ceiling"),
                    os.kernel_args(
                        &format!("ttm.pages_limit={}", mib * MIB / TTM_PAGE),
                        &["amdgpu.gttsize"],
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
                    os.kernel_args(
                        &format!("amdgpu.gttsize={mib} ttm.pages_limit={}", a / TTM_PAGE),
                        &[],
                    ),
                )
            }
        }
    }
}

fn gtt_fits_ram(cmdline: &Cmdline, mem_total: Option<u64>, os: &Os) -> Check {
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
    let fix = recommended_fix(cmdline, mem_total, os);
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
            gtt_form(&c, Some((6, 18)), None, &Os::parse("ID=fedora")).verdict,
            super::super::Verdict::Pass
        );
    }

    #[test]
    fn last_occurrence_wins_like_the_kernel() {
        let c = Cmdline::parse(Some("ttm.pages_limit=1 ttm.pages_limit=25165824"));
        assert_eq!(c.gtt_ceiling_bytes(), Some(96 * GIB));
    }
}
