//! Packets on the wire per message, read from the verbs device's own counters around a timed
//! loop. Unlike times under emulation, these counts repeat from run to run, and they show what a
//! protocol costs the device: a clear-to-send write and its acknowledgement are packets that
//! `ib_write_lat` never sends.
//!
//! Soft-RoCE keeps `sent_pkts` / `rcvd_pkts` under `ports/1/hw_counters`; hardware devices
//! (`irdma`, `mlx5`) keep the standard `port_xmit_packets` / `port_rcv_packets` under
//! `ports/1/counters`. The kernel serves `hw_counters` from a cache that it refreshes only when
//! it is older than `hw_counters/lifespan` (milliseconds, 10 by default): a reading waits that
//! long first, or a short loop would read the same numbers before and after.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The packet counters of one verbs device (port 1).
#[derive(Clone, Debug)]
pub struct WireCounter {
    ibdev: String,
    sent: PathBuf,
    received: PathBuf,
    /// How long the kernel may serve a cached reading.
    lifespan: Duration,
}

/// A reading: packets this device has sent and received so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packets {
    pub sent: u64,
    pub received: u64,
}

const SYSFS: &str = "/sys/class/infiniband";

impl WireCounter {
    /// The counters of `ibdev` under `/sys/class/infiniband`, or `None` if it has none readable.
    pub fn open(ibdev: &str) -> Option<WireCounter> {
        WireCounter::open_in(Path::new(SYSFS), ibdev)
    }

    fn open_in(root: &Path, ibdev: &str) -> Option<WireCounter> {
        let port = root.join(ibdev).join("ports/1");
        [
            ("hw_counters", "sent_pkts", "rcvd_pkts"),
            ("counters", "port_xmit_packets", "port_rcv_packets"),
        ]
        .iter()
        .map(|(dir, tx, rx)| WireCounter {
            ibdev: ibdev.to_string(),
            sent: port.join(dir).join(tx),
            received: port.join(dir).join(rx),
            lifespan: std::fs::read_to_string(port.join(dir).join("lifespan"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map_or(Duration::ZERO, Duration::from_millis),
        })
        .find(|c| c.read_now().is_some())
    }

    pub fn ibdev(&self) -> &str {
        &self.ibdev
    }

    /// A fresh reading: waits out the kernel's cache first.
    pub fn read(&self) -> Option<Packets> {
        if !self.lifespan.is_zero() {
            std::thread::sleep(self.lifespan + Duration::from_millis(1));
        }
        self.read_now()
    }

    fn read_now(&self) -> Option<Packets> {
        let get = |p: &Path| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        Some(Packets {
            sent: get(&self.sent)?,
            received: get(&self.received)?,
        })
    }

    /// Runs `f` and returns its result with the packets on the wire per message over it; see
    /// [`per_message`]. `None` when the counters could not be read at either end.
    pub fn around<T, E>(
        counter: Option<&WireCounter>,
        both_ends_here: bool,
        messages: usize,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Option<f64>), E> {
        let before = counter.and_then(WireCounter::read);
        let out = f()?;
        let after = counter.and_then(WireCounter::read);
        let per = match (before, after) {
            (Some(b), Some(a)) => per_message(b, a, both_ends_here, messages),
            _ => None,
        };
        Ok((out, per))
    }
}

/// Packets on the wire per message between two readings of one device. With both ends on this
/// device (one host: every packet leaves and enters it), each wire packet is counted once as
/// sent; with the far end on another device, every wire packet is either sent or received here.
pub fn per_message(
    before: Packets,
    after: Packets,
    both_ends_here: bool,
    messages: usize,
) -> Option<f64> {
    let sent = after.sent.checked_sub(before.sent)?;
    let received = after.received.checked_sub(before.received)?;
    let packets = if both_ends_here {
        sent
    } else {
        sent + received
    };
    (messages > 0).then(|| packets as f64 / messages as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_device(root: &Path, dev: &str, dir: &str, files: &[(&str, &str)]) {
        let d = root.join(dev).join("ports/1").join(dir);
        std::fs::create_dir_all(&d).unwrap();
        for (name, value) in files {
            std::fs::write(d.join(name), value).unwrap();
        }
    }

    #[test]
    fn reads_soft_roce_and_hardware_counters() {
        let root = std::env::temp_dir().join(format!("halo-wire-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fake_device(
            &root,
            "rxe0",
            "hw_counters",
            &[
                ("sent_pkts", "120\n"),
                ("rcvd_pkts", "118\n"),
                ("lifespan", "10\n"),
            ],
        );
        fake_device(
            &root,
            "irdma0",
            "counters",
            &[("port_xmit_packets", "7\n"), ("port_rcv_packets", "9\n")],
        );
        // Soft-RoCE's hw_counters also has no port_xmit_packets; a device with neither is None.
        fake_device(&root, "mlx5_0", "counters", &[("port_xmit_packets", "x")]);
        let rxe = WireCounter::open_in(&root, "rxe0").expect("rxe0 counters");
        assert_eq!(
            rxe.read(),
            Some(Packets {
                sent: 120,
                received: 118
            })
        );
        assert_eq!(rxe.ibdev(), "rxe0");
        assert_eq!(rxe.lifespan, Duration::from_millis(10));
        let irdma = WireCounter::open_in(&root, "irdma0").expect("irdma0 counters");
        assert_eq!(irdma.lifespan, Duration::ZERO);
        assert_eq!(
            irdma.read(),
            Some(Packets {
                sent: 7,
                received: 9
            })
        );
        assert!(WireCounter::open_in(&root, "mlx5_0").is_none());
        assert!(WireCounter::open_in(&root, "nodev").is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn counts_each_wire_packet_once() {
        let b = Packets {
            sent: 100,
            received: 50,
        };
        let a = Packets {
            sent: 140,
            received: 90,
        };
        // One host: the 40 packets sent are the 40 received.
        assert_eq!(per_message(b, a, true, 10), Some(4.0));
        // Two hosts: 40 out and 40 in.
        assert_eq!(per_message(b, a, false, 10), Some(8.0));
        assert_eq!(per_message(b, a, true, 0), None);
        // A counter that went backwards (device reset) gives no figure.
        assert_eq!(per_message(a, b, true, 10), None);
    }

    #[test]
    fn around_passes_errors_and_results_through() {
        let r: Result<(u8, Option<f64>), String> = WireCounter::around(None, true, 4, || Ok(7));
        assert_eq!(r, Ok((7, None)));
        let e: Result<(u8, Option<f64>), String> =
            WireCounter::around(None, true, 4, || Err("lost".to_string()));
        assert_eq!(e, Err("lost".to_string()));
    }
}
