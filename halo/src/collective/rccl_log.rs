//! What RCCL's `NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET` lines say about the transport a run
//! really used: the network selected ("Using network X", printed by every RCCL), the external
//! net plugin loaded, and whether the channels' network connections went through GPU-direct
//! ("via NET/<name>/<dev>/GDRDMA").
//!
//! How RCCL reports a loaded plugin differs between releases, so each form is recognised:
//! - ROCm 6.1/6.2 print "Plugin name set by env to librccl-net-X.so" before they try to open
//!   it (so it proves nothing alone; a failure follows as "... using internal implementation")
//!   and say nothing more when the newest ABI they know (v6 / v8) is found;
//! - ROCm 6.3/6.4 print "NET/Plugin: Plugin name set by env to FILE" once FILE has opened;
//! - ROCm 7.x print "NET/Plugin: Loaded net plugin NAME (vN)" and then "Successfully loaded
//!   external plugin FILE" (7.1/7.2) or "Successfully loaded external network plugin PATH".
//!
//! "Using network NAME" is what decides: it names the network every channel of the run uses.

use serde::Serialize;

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct TransportSeen {
    /// From "Using network NAME" (RCCL's selected net: "IB", "Socket", or a plugin's name).
    pub network: Option<String>,
    /// The external net plugin RCCL loaded: its name, or its library where only that is printed.
    pub plugin: Option<String>,
    /// The plugin ABI RCCL took, where it says ("Loaded net plugin NAME (vN)").
    pub plugin_abi: Option<u32>,
    /// Channel connections over the network with and without GDRDMA.
    pub net_channels: usize,
    pub gdr_channels: usize,
    /// The lines that show the above (what `halo report` quotes as proof).
    pub evidence: Vec<String>,
}

impl TransportSeen {
    pub fn gdr(&self) -> bool {
        self.gdr_channels > 0
    }
}

/// The text after "NCCL INFO " (the prefix is "host:pid:tid [dev] NCCL INFO ").
fn info_body(line: &str) -> Option<&str> {
    line.split_once("NCCL INFO ").map(|(_, b)| b.trim())
}

/// "NAME (vN)" -> (NAME, N).
fn name_and_abi(rest: &str) -> (String, Option<u32>) {
    match rest.trim().rsplit_once(" (v") {
        Some((name, v)) => (
            name.trim().to_string(),
            v.trim_end_matches(')').parse().ok(),
        ),
        None => (rest.trim().to_string(), None),
    }
}

/// The first word after " via " of a channel line, e.g. "NET/halo/0/GDRDMA" from
/// "Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/halo/0/GDRDMA comm 0x55d0 nRanks 02".
fn via(body: &str) -> Option<&str> {
    body.split_once(" via ")?.1.split_whitespace().next()
}

pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> TransportSeen {
    let mut seen = TransportSeen::default();
    // ROCm 6.1/6.2: the library asked for, before RCCL tried it; and whether it then gave up.
    let mut asked: Option<String> = None;
    let mut gave_up = false;
    for line in lines {
        let Some(body) = info_body(line) else {
            continue;
        };
        let mut keep = false;
        if let Some(name) = body.strip_prefix("Using network ") {
            seen.network = Some(name.trim().to_string());
            keep = true;
        } else if let Some(rest) = body.strip_prefix("NET/Plugin: Loaded net plugin ") {
            let (name, abi) = name_and_abi(rest);
            seen.plugin = Some(name);
            seen.plugin_abi = abi;
            keep = true;
        } else if let Some(file) = body
            .strip_prefix("NET/Plugin: Plugin name set by env to ")
            .or_else(|| body.strip_prefix("Successfully loaded external network plugin "))
            .or_else(|| body.strip_prefix("Successfully loaded external plugin "))
        {
            seen.plugin.get_or_insert_with(|| file.trim().to_string());
            keep = true;
        } else if let Some(file) = body.strip_prefix("Plugin name set by env to ") {
            asked = Some(file.trim().to_string());
            keep = true;
        } else if body.starts_with("NET/")
            && !body.starts_with("NET/Plugin")
            && body.contains(" : Using ")
        {
            // "NET/IB : Using [0]rocep1s0f0:1/RoCE [RO]; OOB ...", "NET/Socket : Using [0]eth0:..."
            keep = true;
        } else if body.starts_with("Channel ") {
            if let Some(net) = via(body).and_then(|v| v.strip_prefix("NET/")) {
                seen.net_channels += 1;
                // "/GDRDMA", or "/GDRDMA(PCI)" where the GPU reaches the NIC over PCI
                if net
                    .split('/')
                    .any(|part| part == "GDRDMA" || part.starts_with("GDRDMA("))
                {
                    seen.gdr_channels += 1;
                }
                keep = seen.net_channels <= 4;
            }
        } else if body.starts_with("NET/Plugin")
            || body.starts_with("NCCL_NET_PLUGIN set by environment")
            || body.starts_with("Initialized NET plugin")
            || body.starts_with("Assigned NET plugin")
        {
            gave_up |= body.contains("using internal implementation");
            keep = true;
        }
        if keep {
            seen.evidence.push(line.trim().to_string());
        }
    }
    if seen.plugin.is_none() && !gave_up {
        seen.plugin = asked;
    }
    seen
}

/// The transport a variant claims to use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claim {
    /// Expected "Using network" name.
    pub network: String,
    /// Some(false): GDRDMA must not appear; Some(true): it must; None: either (reported).
    pub gdr: Option<bool>,
}

/// Err(why) when the log does not show the claimed transport.
pub fn verify(seen: &TransportSeen, claim: &Claim) -> Result<(), String> {
    match &seen.network {
        None => {
            return Err(format!(
                "no \"Using network\" line in RCCL's log (expected {}); is NCCL_DEBUG=INFO reaching the ranks?",
                claim.network
            ))
        }
        Some(n) if n != &claim.network => {
            return Err(format!(
                "RCCL used network {n}, not {} (plugin loaded: {})",
                claim.network,
                seen.plugin.as_deref().unwrap_or("none")
            ))
        }
        Some(_) => {}
    }
    if seen.net_channels == 0 {
        return Err("no channel went over the network (\"via NET/…\"): ranks on one node?".into());
    }
    match claim.gdr {
        Some(false) if seen.gdr() => Err(format!(
            "GPU-direct was to be off but {} of {} network channels use GDRDMA",
            seen.gdr_channels, seen.net_channels
        )),
        Some(true) if seen.gdr_channels < seen.net_channels => Err(format!(
            "GPU-direct was required but only {} of {} network channels use GDRDMA",
            seen.gdr_channels, seen.net_channels
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as each RCCL release prints them with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET,
    // NCCL_NET_PLUGIN=halo (or none with NCCL_NET=IB / Socket), halo exporting v6..v12.

    /// ROCm 6.1 (RCCL 2.18): takes v6 without a word; the busId is printed in hex.
    const ROCM61_PLUGIN_GDR: &str = "\
strix1:4120:4120 [0] NCCL INFO Plugin name set by env to librccl-net-halo.so
strix1:4120:4188 [0] NCCL INFO Using network halo
strix1:4120:4188 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [receive] via NET/halo/0/GDRDMA comm 0x5583d0e0 nRanks 02
strix1:4120:4188 [0] NCCL INFO Channel 01/0 : 1[c1000] -> 0[c1000] [receive] via NET/halo/0/GDRDMA comm 0x5583d0e0 nRanks 02
strix1:4120:4188 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/halo/0/GDRDMA comm 0x5583d0e0 nRanks 02
strix1:4120:4188 [0] NCCL INFO Channel 01/0 : 0[c1000] -> 1[c1000] [send] via NET/halo/0/GDRDMA comm 0x5583d0e0 nRanks 02
";

    /// ROCm 6.1, NCCL_NET_PLUGIN=none NCCL_NET=IB: "none" names a library that is not there.
    const ROCM61_BUILTIN_IB: &str = "\
strix1:4200:4200 [0] NCCL INFO Plugin name set by env to librccl-net-none.so
strix1:4200:4200 [0] NCCL INFO NET/Plugin : Plugin load (librccl-net-none.so) returned 2 : librccl-net-none.so: cannot open shared object file: No such file or directory
strix1:4200:4200 [0] NCCL INFO NET/Plugin : No plugin found, using internal implementation
strix1:4200:4266 [0] NCCL INFO NET/IB : Using [0]rocep1s0f0:1/RoCE [RO]; OOB enp1s0f0np0:192.168.100.1<0>
strix1:4200:4266 [0] NCCL INFO Using network IB
strix1:4200:4266 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [receive] via NET/IB/0 comm 0x55e1a2b0 nRanks 02
strix1:4200:4266 [0] NCCL INFO Channel 01/0 : 1[c1000] -> 0[c1000] [receive] via NET/IB/0 comm 0x55e1a2b0 nRanks 02
strix1:4200:4266 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/IB/0 comm 0x55e1a2b0 nRanks 02
strix1:4200:4266 [0] NCCL INFO Channel 01/0 : 0[c1000] -> 1[c1000] [send] via NET/IB/0 comm 0x55e1a2b0 nRanks 02
";

    /// ROCm 6.2 (RCCL 2.20): takes v8 without a word.
    const ROCM62_PLUGIN_NO_GDR: &str = "\
strix2:20931:20931 [0] NCCL INFO Plugin name set by env to librccl-net-halo.so
strix2:20931:20988 [0] NCCL INFO Using non-device net plugin version 0
strix2:20931:20988 [0] NCCL INFO Using network halo
strix2:20931:20988 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [receive] via NET/halo/0 comm 0x55d6a1e0 nRanks 02
strix2:20931:20988 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [send] via NET/halo/0 comm 0x55d6a1e0 nRanks 02
";

    /// ROCm 6.2, NCCL_NET_PLUGIN=none NCCL_NET=Socket NCCL_IB_DISABLE=1.
    const ROCM62_SOCKET: &str = "\
strix1:42007:42007 [0] NCCL INFO Plugin name set by env to librccl-net-none.so
strix1:42007:42007 [0] NCCL INFO NET/Plugin : dlerror=librccl-net-none.so: cannot open shared object file: No such file or directory No plugin found (librccl-net-none.so), using internal implementation
strix1:42007:42070 [0] NCCL INFO NET/Socket : Using [0]enp1s0f0np0:192.168.100.1<0>
strix1:42007:42070 [0] NCCL INFO Using non-device net plugin version 0
strix1:42007:42070 [0] NCCL INFO Using network Socket
strix1:42007:42070 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [receive] via NET/Socket/0 comm 0x55c3b4a0 nRanks 02
strix1:42007:42070 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/Socket/0 comm 0x55c3b4a0 nRanks 02
";

    /// ROCm 6.3 (RCCL 2.21): tries the value as given, then librccl-net-<value>.so.
    const ROCM63_PLUGIN_GDR: &str = "\
strix1:5010:5010 [0] NCCL INFO NET/Plugin: No plugin found (halo)
strix1:5010:5010 [0] NCCL INFO NET/Plugin: Plugin name set by env to librccl-net-halo.so
strix1:5010:5077 [0] NCCL INFO Using non-device net plugin version 0
strix1:5010:5077 [0] NCCL INFO Using network halo
strix1:5010:5077 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [receive] via NET/halo/0/GDRDMA comm 0x561e0c30 nRanks 02
strix1:5010:5077 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/halo/0/GDRDMA comm 0x561e0c30 nRanks 02
";

    /// ROCm 6.3, NCCL_NET_PLUGIN=none NCCL_NET=IB.
    const ROCM63_BUILTIN_IB: &str = "\
strix1:5300:5300 [0] NCCL INFO NET/Plugin: No plugin found (none)
strix1:5300:5300 [0] NCCL INFO NET/Plugin: No plugin found (librccl-net-none.so)
strix1:5300:5300 [0] NCCL INFO NET/Plugin: Using internal network plugin.
strix1:5300:5361 [0] NCCL INFO NET/IB : Using [0]rocep1s0f0:1/RoCE [RO]; OOB enp1s0f0np0:192.168.100.1<0>
strix1:5300:5361 [0] NCCL INFO Using non-device net plugin version 0
strix1:5300:5361 [0] NCCL INFO Using network IB
strix1:5300:5361 [0] NCCL INFO Channel 00/0 : 1[c1000] -> 0[c1000] [receive] via NET/IB/0 comm 0x55a0e8f0 nRanks 02
strix1:5300:5361 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/IB/0 comm 0x55a0e8f0 nRanks 02
";

    /// ROCm 7.1/7.2 (RCCL 2.27): v10 is the newest it takes.
    const ROCM71_PLUGIN: &str = "\
strix1:6100:6160 [0] NCCL INFO NET/Plugin: Plugin name set by env to librccl-net-halo.so
strix1:6100:6160 [0] NCCL INFO NET/Plugin: Loaded net plugin halo (v10)
strix1:6100:6160 [0] NCCL INFO Successfully loaded external plugin librccl-net-halo.so
strix1:6100:6160 [0] NCCL INFO Initialized NET plugin halo
strix1:6100:6160 [0] NCCL INFO Assigned NET plugin halo to comm
strix1:6100:6160 [0] NCCL INFO Using network halo
strix1:6100:6160 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/halo/0 comm 0x55b7c0a0 nRanks 02
strix1:6100:6160 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/halo/0 comm 0x55b7c0a0 nRanks 02
";

    /// Current RCCL (NCCL 2.28+ base): v12, the library's path, "(PCI)" after GDRDMA where
    /// the GPU reaches the NIC over PCI.
    const CURRENT_PLUGIN_GDR: &str = "\
strix1:7001:7050 [0] NCCL INFO NCCL_NET_PLUGIN set by environment to halo
strix1:7001:7050 [0] NCCL INFO NET/Plugin: Loaded net plugin halo (v12)
strix1:7001:7050 [0] NCCL INFO Successfully loaded external network plugin /opt/halo/lib/librccl-net-halo.so
strix1:7001:7050 [0] NCCL INFO Initialized NET plugin halo
strix1:7001:7050 [0] NCCL INFO Assigned NET plugin halo to comm
strix1:7001:7050 [0] NCCL INFO Using network halo
strix1:7001:7050 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/halo/0/GDRDMA comm 0x55f0a1c0 nRanks 02
strix1:7001:7050 [0] NCCL INFO Channel 01/0 : 1[0] -> 0[0] [receive] via NET/halo/0/GDRDMA(PCI) comm 0x55f0a1c0 nRanks 02
strix1:7001:7050 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/halo/0/GDRDMA/Shared comm 0x55f0a1c0 nRanks 02
strix1:7001:7050 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[0] [send] via NET/halo/0(1)/GDRDMA comm 0x55f0a1c0 nRanks 02
";

    /// Current RCCL, NCCL_NET_PLUGIN=none (no external plugin at all) NCCL_NET=IB.
    const CURRENT_BUILTIN_IB: &str = "\
strix1:7200:7251 [0] NCCL INFO NCCL_NET_PLUGIN set by environment to none
strix1:7200:7251 [0] NCCL INFO NET/IB : Using [0]rocep1s0f0:1/RoCE [RO]; OOB enp1s0f0np0:192.168.100.1<0>
strix1:7200:7251 [0] NCCL INFO Initialized NET plugin IB
strix1:7200:7251 [0] NCCL INFO Assigned NET plugin IB to comm
strix1:7200:7251 [0] NCCL INFO Using network IB
strix1:7200:7251 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/IB/0 comm 0x55c2d0e0 nRanks 02
strix1:7200:7251 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0 comm 0x55c2d0e0 nRanks 02
";

    fn claim(net: &str, gdr: Option<bool>) -> Claim {
        Claim {
            network: net.into(),
            gdr,
        }
    }

    fn seen(log: &str) -> (Option<String>, Option<String>, Option<u32>, usize, usize) {
        let s = parse(log.lines());
        (
            s.network,
            s.plugin,
            s.plugin_abi,
            s.net_channels,
            s.gdr_channels,
        )
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn every_release_shows_network_plugin_and_gdr() {
        let file = some("librccl-net-halo.so");
        for (log, want) in [
            (ROCM61_PLUGIN_GDR, (some("halo"), file.clone(), None, 4, 4)),
            (ROCM61_BUILTIN_IB, (some("IB"), None, None, 4, 0)),
            (
                ROCM62_PLUGIN_NO_GDR,
                (some("halo"), file.clone(), None, 2, 0),
            ),
            (ROCM62_SOCKET, (some("Socket"), None, None, 2, 0)),
            (ROCM63_PLUGIN_GDR, (some("halo"), file.clone(), None, 2, 2)),
            (ROCM63_BUILTIN_IB, (some("IB"), None, None, 2, 0)),
            (ROCM71_PLUGIN, (some("halo"), some("halo"), Some(10), 2, 0)),
            (
                CURRENT_PLUGIN_GDR,
                (some("halo"), some("halo"), Some(12), 4, 4),
            ),
            (CURRENT_BUILTIN_IB, (some("IB"), None, None, 2, 0)),
        ] {
            assert_eq!(seen(log), want, "{log}");
        }
    }

    #[test]
    fn builtin_ib() {
        for log in [ROCM61_BUILTIN_IB, ROCM63_BUILTIN_IB, CURRENT_BUILTIN_IB] {
            let s = parse(log.lines());
            assert!(
                s.evidence
                    .iter()
                    .any(|l| l.contains("NET/IB : Using [0]rocep1s0f0:1/RoCE")),
                "{log}"
            );
            assert_eq!(verify(&s, &claim("IB", Some(false))), Ok(()));
            assert!(verify(&s, &claim("halo", None))
                .unwrap_err()
                .contains("used network IB"));
        }
    }

    #[test]
    fn plugin_with_gdr() {
        for log in [ROCM61_PLUGIN_GDR, ROCM63_PLUGIN_GDR, CURRENT_PLUGIN_GDR] {
            let s = parse(log.lines());
            assert!(s.gdr());
            assert_eq!(verify(&s, &claim("halo", None)), Ok(()));
            assert_eq!(verify(&s, &claim("halo", Some(true))), Ok(()));
            // Claimed off, but GDRDMA is in the channel lines: an error.
            let e = verify(&s, &claim("halo", Some(false))).unwrap_err();
            assert!(e.contains("network channels use GDRDMA"), "{e}");
        }
        let s = parse(CURRENT_PLUGIN_GDR.lines());
        assert!(s.evidence.iter().any(|l| l.ends_with(
            "Successfully loaded external network plugin /opt/halo/lib/librccl-net-halo.so"
        )));
    }

    #[test]
    fn plugin_without_gdr() {
        for log in [ROCM62_PLUGIN_NO_GDR, ROCM71_PLUGIN] {
            let s = parse(log.lines());
            assert!(!s.gdr());
            assert_eq!(verify(&s, &claim("halo", Some(false))), Ok(()));
            assert!(verify(&s, &claim("halo", Some(true))).is_err());
        }
    }

    #[test]
    fn sockets() {
        let s = parse(ROCM62_SOCKET.lines());
        assert!(s.evidence.iter().any(|l| l.contains("NET/Socket : Using")));
        assert!(s
            .evidence
            .iter()
            .any(|l| l.contains("using internal implementation")));
        assert_eq!(verify(&s, &claim("Socket", Some(false))), Ok(()));
        // The plugin was claimed, but RCCL fell back to sockets: not a row.
        assert!(verify(&s, &claim("halo", None))
            .unwrap_err()
            .contains("used network Socket, not halo (plugin loaded: none)"));
    }

    #[test]
    fn a_plugin_that_failed_to_load_is_not_reported_as_loaded() {
        // ROCm 6.2 with a full path in NCCL_NET_PLUGIN: it only ever tries librccl-net-<value>.so.
        let log = "\
strix1:1:1 [0] NCCL INFO Plugin name set by env to librccl-net-/opt/halo/lib/librccl-net-halo.so.so
strix1:1:1 [0] NCCL INFO NET/Plugin : dlerror=librccl-net-/opt/halo/lib/librccl-net-halo.so.so: cannot open shared object file: No such file or directory No plugin found (librccl-net-/opt/halo/lib/librccl-net-halo.so.so), using internal implementation
strix1:1:2 [0] NCCL INFO Using network IB
strix1:1:2 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c1000] [send] via NET/IB/0 comm 0x5 nRanks 02
";
        let s = parse(log.lines());
        assert_eq!(
            (s.network.as_deref(), s.plugin.as_deref()),
            (Some("IB"), None)
        );
        assert!(verify(&s, &claim("halo", None))
            .unwrap_err()
            .contains("used network IB, not halo (plugin loaded: none)"));
    }

    #[test]
    fn no_info_lines_or_no_network_channels() {
        let s = parse(["plain output", "strix1:1:1 [0] NCCL WARN something"]);
        assert!(verify(&s, &claim("IB", None))
            .unwrap_err()
            .contains("no \"Using network\" line"));
        // Both ranks on one node: P2P/SHM channels only.
        let s = parse([
            "h:1:2 [0] NCCL INFO Using network IB",
            "h:1:2 [0] NCCL INFO Channel 00/0 : 0[c1000] -> 1[c2000] via P2P/IPC comm 0x5 nRanks 02",
        ]);
        assert!(verify(&s, &claim("IB", None))
            .unwrap_err()
            .contains("no channel went over the network"));
    }
}
