//! The inspected node's distribution (`os-release`) and network configuration, so every fix is
//! the command that works on that node and survives a reboot.

use std::net::Ipv4Addr;

use crate::sysroot::SysRoot;

/// Which package manager and boot-loader tooling a distribution uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Fedora, RHEL and relatives: `dnf`, `grubby`.
    Fedora,
    /// Debian, Ubuntu and relatives: `apt`, `/etc/default/grub` + `update-grub`.
    Debian,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Os {
    /// `PRETTY_NAME`, or "unknown distribution".
    pub name: String,
    pub family: Family,
}

impl Os {
    /// Reads `/etc/os-release`, falling back to `/usr/lib/os-release` as systemd does.
    pub fn read(root: &SysRoot) -> Os {
        let text = root
            .read("/etc/os-release")
            .or_else(|| root.read("/usr/lib/os-release"))
            .unwrap_or_default();
        Os::parse(&text)
    }

    pub fn parse(text: &str) -> Os {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                l.trim()
                    .strip_prefix(key)?
                    .strip_prefix('=')
                    .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            })
        };
        let ids: Vec<String> = [field("ID"), field("ID_LIKE")]
            .into_iter()
            .flatten()
            .flat_map(|v| {
                v.split_whitespace()
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>()
            })
            .collect();
        let has = |names: &[&str]| ids.iter().any(|i| names.contains(&i.as_str()));
        let family = if has(&["fedora", "rhel", "centos"]) {
            Family::Fedora
        } else if has(&["debian", "ubuntu"]) {
            Family::Debian
        } else {
            Family::Other
        };
        Os {
            name: field("PRETTY_NAME").unwrap_or_else(|| "unknown distribution".to_string()),
            family,
        }
    }

    /// Makes kernel parameters persistent: `add` is "key=value …"; every key in `add` and
    /// `remove` loses its old value first. Ends with the reboot that applies it.
    pub fn kernel_args(&self, add: &str, remove: &[&str]) -> String {
        let add_keys: Vec<&str> = add
            .split_whitespace()
            .map(|a| a.split('=').next().unwrap_or(a))
            .collect();
        match self.family {
            Family::Fedora => {
                let mut cmd = "sudo grubby --update-kernel=ALL".to_string();
                if !remove.is_empty() {
                    cmd.push_str(&format!(" --remove-args='{}'", remove.join(" ")));
                }
                if !add.is_empty() {
                    cmd.push_str(&format!(" --args='{add}'"));
                }
                cmd + " && sudo reboot"
            }
            Family::Debian => {
                let mut script = String::new();
                for key in remove.iter().chain(&add_keys) {
                    script.push_str(&format!(
                        "/^GRUB_CMDLINE_LINUX/ s/ ?\\<{}=[^ \"]*//g; ",
                        key.replace('.', "\\.")
                    ));
                }
                if !add.is_empty() {
                    script.push_str(&format!("s/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&{add} /"));
                }
                format!(
                    "sudo sed -i -E '{}' /etc/default/grub && sudo update-grub && sudo reboot",
                    script.trim_end_matches("; ")
                )
            }
            Family::Other => {
                let mut steps = Vec::new();
                if !remove.is_empty() {
                    steps.push(format!("remove {}", remove.join(" ")));
                }
                if !add.is_empty() {
                    steps.push(format!("add '{add}'"));
                }
                format!(
                    "{} on the boot loader's kernel command line, then reboot",
                    steps.join(" and ")
                )
            }
        }
    }

    /// The install command for packages named `fedora` (dnf) or `debian` (apt).
    pub fn install(&self, fedora: &str, debian: &str) -> String {
        match self.family {
            Family::Fedora => format!("sudo dnf install {fedora}"),
            Family::Debian => format!("sudo apt install {debian}"),
            Family::Other => format!("install {fedora} (Fedora names) with the package manager"),
        }
    }
}

/// What configures the node's interfaces persistently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetConfig {
    /// NetworkManager, with the connection profile bound to the interface when one is found.
    NetworkManager {
        profile: Option<NmProfile>,
    },
    /// netplan with systemd-networkd (Ubuntu Server).
    Netplan,
    /// ifupdown's `/etc/network/interfaces` (Debian without NetworkManager).
    Ifupdown,
    Unknown,
}

/// A NetworkManager keyfile (`/etc/NetworkManager/system-connections/*.nmconnection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NmProfile {
    pub id: String,
    /// `connection.zone`: the firewalld zone NetworkManager puts the interface in.
    pub zone: Option<String>,
    /// The file it was read from, as the node names it.
    pub file: String,
}

/// Keyfile directories: the administrator's, then the ones generated at boot (netplan on
/// Ubuntu writes NetworkManager's profiles to /run).
const NM_PROFILES: [&str; 2] = [
    "/etc/NetworkManager/system-connections",
    "/run/NetworkManager/system-connections",
];

/// The keyfile whose `interface-name` is `iface`.
pub fn nm_profile(root: &SysRoot, iface: &str) -> Option<NmProfile> {
    let files = NM_PROFILES
        .iter()
        .flat_map(|d| root.entries(d).into_iter().map(move |f| (d, f)));
    files.into_iter().find_map(|(dir, f)| {
        let file = format!("{dir}/{f}");
        let text = root.read(&file)?;
        let mut section = "";
        let (mut id, mut ifname, mut zone) = (None, None, None);
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if section == "[connection]" {
                match k.trim() {
                    "id" => id = Some(v.trim().to_string()),
                    "interface-name" => ifname = Some(v.trim().to_string()),
                    "zone" if !v.trim().is_empty() => zone = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        (ifname.as_deref() == Some(iface)).then(|| NmProfile {
            id: id.unwrap_or_else(|| f.trim_end_matches(".nmconnection").to_string()),
            zone,
            file,
        })
    })
}

impl NetConfig {
    pub fn read(root: &SysRoot, iface: &str) -> NetConfig {
        let netplan: Vec<String> = root
            .entries("/etc/netplan")
            .into_iter()
            .filter(|f| f.ends_with(".yaml"))
            .collect();
        let netplan_nm = netplan.iter().any(|f| {
            root.read(&format!("/etc/netplan/{f}"))
                .is_some_and(|t| t.contains("renderer: NetworkManager"))
        });
        let nm = root.exists("/etc/NetworkManager/NetworkManager.conf") || netplan_nm;
        if nm {
            NetConfig::NetworkManager {
                profile: nm_profile(root, iface),
            }
        } else if !netplan.is_empty() {
            NetConfig::Netplan
        } else if root.exists("/etc/network/interfaces") {
            NetConfig::Ifupdown
        } else {
            NetConfig::Unknown
        }
    }

    fn nm_modify(profile: &NmProfile, settings: &str) -> String {
        let id = quote(&profile.id);
        format!("sudo nmcli connection modify {id} {settings} && sudo nmcli connection up {id}")
    }

    /// Gives `iface` the cluster address `ip/prefix` persistently.
    pub fn address_fix(&self, iface: &str, ip: Option<Ipv4Addr>, prefix: u8) -> String {
        let addr = format!(
            "{}/{prefix}",
            ip.map_or("<cluster-ip>".to_string(), |i| i.to_string())
        );
        match self {
            NetConfig::NetworkManager { profile: Some(p) } => Self::nm_modify(
                p,
                &format!("ipv4.method manual ipv4.addresses {addr}"),
            ),
            NetConfig::NetworkManager { profile: None } => format!(
                "sudo nmcli connection add type ethernet ifname {iface} con-name {iface} ipv4.method manual ipv4.addresses {addr} && sudo nmcli connection up {iface}"
            ),
            NetConfig::Netplan => netplan(iface, &format!("addresses: [{addr}]")),
            NetConfig::Ifupdown => format!(
                "add 'auto {iface}' and 'iface {iface} inet static' with 'address {addr}' to /etc/network/interfaces, then sudo ifup {iface}"
            ),
            NetConfig::Unknown => format!(
                "sudo ip addr add {addr} dev {iface}, and make it persistent in the node's network configuration"
            ),
        }
    }

    /// Sets a 9000-byte MTU on `iface` persistently.
    pub fn mtu_fix(&self, iface: &str) -> String {
        match self {
            NetConfig::NetworkManager { profile: Some(p) } => {
                Self::nm_modify(p, "802-3-ethernet.mtu 9000")
            }
            NetConfig::NetworkManager { profile: None } => format!(
                "sudo nmcli connection modify <connection of {iface}> 802-3-ethernet.mtu 9000 (list them: nmcli -f NAME,DEVICE connection)"
            ),
            NetConfig::Netplan => netplan(iface, "mtu: 9000"),
            NetConfig::Ifupdown => format!(
                "add 'mtu 9000' to the 'iface {iface}' stanza of /etc/network/interfaces, then sudo ifdown {iface} && sudo ifup {iface}"
            ),
            NetConfig::Unknown => format!(
                "sudo ip link set dev {iface} mtu 9000, and make it persistent in the node's network configuration"
            ),
        }
    }

    /// Turns on link-level flow control (pause frames) on `iface` persistently.
    pub fn pause_fix(&self, iface: &str) -> String {
        let now = format!("sudo ethtool -A {iface} rx on tx on");
        match self {
            NetConfig::NetworkManager { profile: Some(p) } => {
                Self::nm_modify(p, "ethtool.pause-rx on ethtool.pause-tx on")
            }
            NetConfig::Ifupdown => format!(
                "{now}; at boot: add 'post-up /usr/sbin/ethtool -A {iface} rx on tx on' to the 'iface {iface}' stanza of /etc/network/interfaces"
            ),
            _ => format!(
                "{now}; at boot: a oneshot systemd unit with ExecStart=/usr/sbin/ethtool -A {iface} rx on tx on"
            ),
        }
    }
}

fn netplan(iface: &str, setting: &str) -> String {
    format!(
        "add '{setting}' under network: ethernets: {iface}: in /etc/netplan/60-halo.yaml, then sudo netplan apply"
    )
}

/// Single-quotes a connection name for the shell when it needs it.
fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_os_release() {
        let f = |t: &str| Os::parse(t).family;
        assert_eq!(
            f("NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=43"),
            Family::Fedora
        );
        assert_eq!(f("ID=ubuntu\nID_LIKE=debian"), Family::Debian);
        assert_eq!(f("ID=debian\nVERSION_ID=\"12\""), Family::Debian);
        assert_eq!(f("ID=linuxmint\nID_LIKE=\"ubuntu debian\""), Family::Debian);
        assert_eq!(f("ID=arch"), Family::Other);
        assert_eq!(f(""), Family::Other);
    }

    #[test]
    fn debian_kernel_args_replace_old_values() {
        let os = Os::parse("ID=ubuntu\nID_LIKE=debian");
        assert_eq!(
            os.kernel_args("ttm.pages_limit=100", &["amdgpu.gttsize"]),
            "sudo sed -i -E '/^GRUB_CMDLINE_LINUX/ s/ ?\\<amdgpu\\.gttsize=[^ \"]*//g; /^GRUB_CMDLINE_LINUX/ s/ ?\\<ttm\\.pages_limit=[^ \"]*//g; s/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&ttm.pages_limit=100 /' /etc/default/grub && sudo update-grub && sudo reboot"
        );
    }

    #[test]
    fn shell_quoting_of_profile_names() {
        assert_eq!(quote("enp1s0f0np0"), "enp1s0f0np0");
        assert_eq!(quote("Wired connection 1"), "'Wired connection 1'");
    }
}
