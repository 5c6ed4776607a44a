//! What RCCL's `NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET` lines say about the transport a run
//! really used: the network selected ("Using network X"), the plugin loaded, and whether the
//! channels' network connections went through GPU-direct ("via NET/<name>/<dev>/GDRDMA").

use serde::Serialize;

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct TransportSeen {
    /// From "Using network NAME" (RCCL's selected net: "IB", "Socket", or a plugin's name).
    pub network: Option<String>,
    /// From "NET/Plugin: Loaded net plugin NAME (vN)".
    pub plugin: Option<String>,
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

pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> TransportSeen {
    let mut seen = TransportSeen::default();
    for line in lines {
        let Some(body) = info_body(line) else {
            continue;
        };
        let mut keep = false;
        if let Some(name) = body.strip_prefix("Using network ") {
            seen.network = Some(name.trim().to_string());
            keep = true;
        } else if let Some(rest) = body
            .strip_prefix("NET/Plugin: Loaded net plugin ")
            .or_else(|| body.strip_prefix("NET/Plugin : Loaded net plugin "))
        {
            let name = rest.rsplit_once(" (").map_or(rest, |(n, _)| n);
            seen.plugin = Some(name.trim().to_string());
            keep = true;
        } else if body.starts_with("NET/") && body.contains(" : Using ") {
            // "NET/IB : Using [0]mlx5_0:1/RoCE ...", "NET/Socket : Using [0]eth0:..."
            keep = true;
        } else if body.starts_with("Channel ") {
            if let Some((_, via)) = body.split_once(" via ") {
                if let Some(net) = via.strip_prefix("NET/") {
                    seen.net_channels += 1;
                    if net.split('/').any(|part| part.trim() == "GDRDMA") {
                        seen.gdr_channels += 1;
                    }
                    keep = seen.net_channels <= 4;
                }
            }
        } else if body.starts_with("NET/Plugin") {
            keep = true;
        }
        if keep {
            seen.evidence.push(line.trim().to_string());
        }
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

    // Recorded in the shape RCCL 2.27 prints with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET.
    const BUILTIN_IB: &str = "\
strix1:41210:41210 [0] NCCL INFO NET/Plugin: Could not find: none libnccl-net-none.so. Using internal net plugin.
strix1:41210:41210 [0] NCCL INFO NCCL_IB_HCA set to rocep1s0f0
strix1:41210:41297 [0] NCCL INFO NET/IB : Using [0]rocep1s0f0:1/RoCE [RO]; OOB enp1s0f0np0:192.168.100.1<0>
strix1:41210:41297 [0] NCCL INFO Using network IB
strix1:41210:41297 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/IB/0
strix1:41210:41297 [0] NCCL INFO Channel 01/0 : 1[0] -> 0[0] [receive] via NET/IB/0
strix1:41210:41297 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/IB/0
strix1:41210:41297 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[0] [send] via NET/IB/0
";

    const PLUGIN_GDR: &str = "\
strix1:41522:41522 [0] NCCL INFO NET/Plugin: Plugin name set by env to /opt/halo/lib/librccl-net-halo.so
strix1:41522:41522 [0] NCCL INFO NET/Plugin: Loaded net plugin halo (v10)
strix1:41522:41601 [0] NCCL INFO Using network halo
strix1:41522:41601 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/halo/0/GDRDMA
strix1:41522:41601 [0] NCCL INFO Channel 01/0 : 1[0] -> 0[0] [receive] via NET/halo/0/GDRDMA
strix1:41522:41601 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/halo/0/GDRDMA
strix1:41522:41601 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[0] [send] via NET/halo/0/GDRDMA
";

    const PLUGIN_NO_GDR: &str = "\
strix2:20931:20931 [0] NCCL INFO NET/Plugin: Loaded net plugin halo (v10)
strix2:20931:20988 [0] NCCL INFO NCCL_NET_GDR_LEVEL set by environment to LOC
strix2:20931:20988 [0] NCCL INFO Using network halo
strix2:20931:20988 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [receive] via NET/halo/0
strix2:20931:20988 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [send] via NET/halo/0
";

    const SOCKET: &str = "\
strix1:42007:42007 [0] NCCL INFO NET/Plugin: Could not find: none libnccl-net-none.so. Using internal net plugin.
strix1:42007:42070 [0] NCCL INFO NET/Socket : Using [0]enp1s0f0np0:192.168.100.1<0>
strix1:42007:42070 [0] NCCL INFO Using network Socket
strix1:42007:42070 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/Socket/0
strix1:42007:42070 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
";

    fn claim(net: &str, gdr: Option<bool>) -> Claim {
        Claim {
            network: net.into(),
            gdr,
        }
    }

    #[test]
    fn builtin_ib() {
        let s = parse(BUILTIN_IB.lines());
        assert_eq!(s.network.as_deref(), Some("IB"));
        assert_eq!(s.plugin, None);
        assert_eq!((s.net_channels, s.gdr_channels), (4, 0));
        assert!(s
            .evidence
            .iter()
            .any(|l| l.contains("NET/IB : Using [0]rocep1s0f0:1/RoCE")));
        assert_eq!(verify(&s, &claim("IB", Some(false))), Ok(()));
        assert!(verify(&s, &claim("halo", None))
            .unwrap_err()
            .contains("used network IB"));
    }

    #[test]
    fn plugin_with_gdr() {
        let s = parse(PLUGIN_GDR.lines());
        assert_eq!(s.network.as_deref(), Some("halo"));
        assert_eq!(s.plugin.as_deref(), Some("halo"));
        assert_eq!((s.net_channels, s.gdr_channels), (4, 4));
        assert!(s.gdr());
        assert_eq!(verify(&s, &claim("halo", None)), Ok(()));
        assert_eq!(verify(&s, &claim("halo", Some(true))), Ok(()));
        // Claimed off, but GDRDMA is in the channel lines: an error.
        let e = verify(&s, &claim("halo", Some(false))).unwrap_err();
        assert!(e.contains("4 of 4 network channels use GDRDMA"), "{e}");
    }

    #[test]
    fn plugin_without_gdr() {
        let s = parse(PLUGIN_NO_GDR.lines());
        assert_eq!(s.network.as_deref(), Some("halo"));
        assert_eq!((s.net_channels, s.gdr_channels), (2, 0));
        assert!(!s.gdr());
        assert_eq!(verify(&s, &claim("halo", Some(false))), Ok(()));
        assert!(verify(&s, &claim("halo", Some(true))).is_err());
    }

    #[test]
    fn sockets() {
        let s = parse(SOCKET.lines());
        assert_eq!(s.network.as_deref(), Some("Socket"));
        assert_eq!((s.net_channels, s.gdr_channels), (2, 0));
        assert!(s.evidence.iter().any(|l| l.contains("NET/Socket : Using")));
        assert_eq!(verify(&s, &claim("Socket", Some(false))), Ok(()));
        // The plugin was claimed, but RCCL fell back to sockets: not a row.
        assert!(verify(&s, &claim("halo", None))
            .unwrap_err()
            .contains("used network Socket, not halo"));
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
            "h:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/IPC",
        ]);
        assert!(verify(&s, &claim("IB", None))
            .unwrap_err()
            .contains("no channel went over the network"));
    }
}
