//! Whether the node's firewall lets the cluster in on the cluster interface: firewalld (the
//! zone from the NetworkManager profile, the zone files, or the default zone) and ufw.
//!
//! Ray (GCS on 6379, workers on random ports) and RCCL's bootstrap listen on ports the peer
//! connects to, so a zone that opens only a few services stops the cluster from forming.

use std::net::Ipv4Addr;

use super::link::network;
use super::os::NetConfig;
use super::{Check, Facts};
use crate::sysroot::SysRoot;

const ID: &str = "net.firewall";
const TITLE: &str = "Firewall on the cluster interface";
const BLOCKED: &str = "Ray's 6379 and RCCL's bootstrap ports are closed to the peer";

pub fn check(root: &SysRoot, facts: &Facts) -> Check {
    let Some(iface) = facts.link.as_ref().map(|l| l.netdev.as_str()) else {
        return Check::skip(ID, TITLE, "cluster interface unknown");
    };
    let ip = facts
        .link
        .as_ref()
        .and_then(|l| l.gid.as_ref().map(|g| g.1));
    let mut found = Vec::new();
    if firewalld_enabled(root) {
        found.push(firewalld(root, facts, iface));
    }
    if let Some(check) = ufw(root, iface, ip) {
        found.push(check);
    }
    // The strictest of the enabled firewalls decides.
    found
        .into_iter()
        .max_by_key(|c| match c.verdict {
            super::Verdict::Fail => 3,
            super::Verdict::Warn => 2,
            super::Verdict::Skip => 1,
            super::Verdict::Pass => 0,
        })
        .unwrap_or_else(|| Check::pass(ID, TITLE, "no firewall enabled (firewalld, ufw)"))
}

fn firewalld_enabled(root: &SysRoot) -> bool {
    if !root.exists("/etc/firewalld") {
        return false;
    }
    // Without systemd's unit links in view, an installed firewalld counts as running.
    !root.exists("/etc/systemd/system")
        || root.present("/etc/systemd/system/multi-user.target.wants/firewalld.service")
}

/// How a zone treats incoming connections on high ports.
enum ZoneRules {
    Open(String),
    Blocks(String),
    Unknown,
}

fn zone_rules(root: &SysRoot, zone: &str) -> ZoneRules {
    let xml = root
        .read(&format!("/etc/firewalld/zones/{zone}.xml"))
        .or_else(|| root.read(&format!("/usr/lib/firewalld/zones/{zone}.xml")));
    let Some(xml) = xml else {
        // firewalld's built-in zones, when their files are not in view.
        return match zone {
            "trusted" => ZoneRules::Open("accepts everything".into()),
            "FedoraWorkstation" => ZoneRules::Open("opens TCP 1025-65535".into()),
            "public" | "FedoraServer" | "external" | "dmz" | "work" | "home" | "internal"
            | "block" | "drop" | "nm-shared" => {
                ZoneRules::Blocks("opens only a few services".into())
            }
            _ => ZoneRules::Unknown,
        };
    };
    if xml.contains("target=\"ACCEPT\"") {
        return ZoneRules::Open("accepts everything".into());
    }
    let tags = |name: &str| -> Vec<String> {
        xml.split(&format!("<{name} "))
            .skip(1)
            .filter_map(|t| t.split('>').next().map(str::to_string))
            .collect()
    };
    let attr = |tag: &str, key: &str| {
        let start = tag.find(&format!("{key}=\""))? + key.len() + 2;
        tag[start..].split('"').next().map(str::to_string)
    };
    let opens_high_tcp = tags("port").iter().any(|t| {
        attr(t, "protocol").as_deref() == Some("tcp")
            && attr(t, "port").is_some_and(|p| {
                let (lo, hi) = p.split_once('-').unwrap_or((&p, &p));
                lo.parse::<u32>().is_ok_and(|l| l <= 1025)
                    && hi.parse::<u32>().is_ok_and(|h| h >= 65535)
            })
    });
    if opens_high_tcp {
        return ZoneRules::Open("opens TCP 1025-65535".into());
    }
    let services: Vec<String> = tags("service")
        .iter()
        .filter_map(|t| attr(t, "name"))
        .collect();
    ZoneRules::Blocks(if services.is_empty() {
        "opens no service".into()
    } else {
        format!("opens only {}", services.join(", "))
    })
}

fn firewalld(root: &SysRoot, facts: &Facts, iface: &str) -> Check {
    let reload = "sudo firewall-cmd --reload";
    let profile = match facts.net() {
        NetConfig::NetworkManager { profile } => profile.as_ref(),
        _ => None,
    };
    // NetworkManager hands firewalld the zone of the connection profile (that is where
    // `firewall-cmd --permanent --zone=Z --add-interface=IF` records it for an NM interface);
    // a zone file binding comes next, then the default zone.
    let (zone, source, fix) = if let Some((p, z)) = profile.and_then(|p| Some((p, p.zone.clone()?)))
    {
        let id = &p.id;
        (
            z,
            format!("NetworkManager connection '{id}'"),
            format!("sudo nmcli connection modify '{id}' connection.zone trusted && sudo nmcli connection up '{id}'"),
        )
    } else if let Some(z) = zone_file_binding(root, iface) {
        (
            z,
            "zone file".to_string(),
            format!("sudo firewall-cmd --permanent --zone=trusted --change-interface={iface} && {reload}"),
        )
    } else {
        let default = root
            .read("/etc/firewalld/firewalld.conf")
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.trim().strip_prefix("DefaultZone=").map(str::to_string))
            })
            .unwrap_or_else(|| "public".to_string());
        (
            default,
            "default zone".to_string(),
            format!(
                "sudo firewall-cmd --permanent --zone=trusted --add-interface={iface} && {reload}"
            ),
        )
    };
    let seen = format!("{iface} in firewalld zone {zone} ({source})");
    match zone_rules(root, &zone) {
        ZoneRules::Open(how) => Check::pass(ID, TITLE, format!("{seen}: {how}")),
        ZoneRules::Blocks(how) => Check::fail(ID, TITLE, format!("{seen}: {how}; {BLOCKED}"), fix),
        ZoneRules::Unknown => Check::warn(
            ID,
            TITLE,
            format!("{seen}: rules of zone {zone} not readable; Ray and RCCL need TCP 1025-65535 from the peer"),
            fix,
        ),
    }
}

/// The zone whose file lists `<interface name="IF"/>`.
fn zone_file_binding(root: &SysRoot, iface: &str) -> Option<String> {
    let needle = format!("name=\"{iface}\"");
    root.entries("/etc/firewalld/zones")
        .into_iter()
        .filter_map(|f| f.strip_suffix(".xml").map(str::to_string))
        .find(|zone| {
            root.read(&format!("/etc/firewalld/zones/{zone}.xml"))
                .is_some_and(|xml| {
                    xml.split("<interface")
                        .skip(1)
                        .any(|tag| tag.split('>').next().is_some_and(|t| t.contains(&needle)))
                })
        })
}

/// ufw (Ubuntu): enabled in `/etc/ufw/ufw.conf`, incoming policy in `/etc/default/ufw`, the
/// user's rules in `/etc/ufw/user.rules`. `None` when ufw is not enabled.
fn ufw(root: &SysRoot, iface: &str, ip: Option<Ipv4Addr>) -> Option<Check> {
    let conf = root.read("/etc/ufw/ufw.conf")?;
    let enabled = conf
        .lines()
        .any(|l| l.trim().eq_ignore_ascii_case("ENABLED=yes"));
    if !enabled {
        return None;
    }
    let policy = root
        .read("/etc/default/ufw")
        .and_then(|d| {
            d.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("DEFAULT_INPUT_POLICY=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "DROP".to_string());
    if policy == "ACCEPT" {
        return Some(Check::pass(ID, TITLE, "ufw active, incoming policy ACCEPT"));
    }
    let rules = root.read("/etc/ufw/user.rules").unwrap_or_default();
    let allowed = rules.lines().find(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
        };
        let accepts_all = words.starts_with(&["-A", "ufw-user-input"])
            && after("-j") == Some(&"ACCEPT")
            && after("--dport").is_none()
            && after("-p").is_none();
        let on_iface = after("-i") == Some(&iface);
        let from_subnet = after("-s").is_some_and(|cidr| {
            let Some((net, len)) = cidr.split_once('/') else {
                return false;
            };
            match (net.parse::<Ipv4Addr>(), len.parse::<u8>(), ip) {
                (Ok(net), Ok(len), Some(ip)) if len <= 32 => network(ip, len) == network(net, len),
                _ => false,
            }
        });
        accepts_all && (on_iface || from_subnet)
    });
    Some(match allowed {
        Some(rule) => Check::pass(
            ID,
            TITLE,
            format!(
                "ufw active, incoming policy {policy}, rule '{}'",
                rule.trim()
            ),
        ),
        None => Check::fail(
            ID,
            TITLE,
            format!("ufw active, incoming policy {policy}, no rule allows {iface}: {BLOCKED}"),
            format!("sudo ufw allow in on {iface}"),
        ),
    })
}
