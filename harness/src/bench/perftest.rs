//! The reference: perftest's `ib_write_lat` / `ib_write_bw`, server and client as two processes
//! on the same device (the client connects to 127.0.0.1, or to the named host), parsed from the
//! client's result table.

use super::wire::WireCounter;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where perftest runs: the verbs device and GID index it is told to use.
#[derive(Clone, Debug)]
pub struct PerftestDevice {
    /// `-d`, e.g. `rxe0`.
    pub ibdev: String,
    /// `-x`: on Soft-RoCE over `lo`, index 1 is `::ffff:127.0.0.1`.
    pub gid_index: u32,
    /// First TCP port for perftest's own handshake; each run takes the next one.
    pub port: u16,
}

/// One-way latency as `ib_write_lat` reports it (half the round trip), in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyStats {
    pub typical_us: f64,
    pub avg_us: f64,
    pub p99_us: f64,
    /// Packets on the wire per one-way message, from the device's counters (see
    /// [`super::wire`]); `None` where they cannot be read.
    pub wire_pkts: Option<f64>,
}

/// `ib_write_bw`'s average bandwidth and message rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandwidthStats {
    pub gbps: f64,
    pub msgs_per_s: f64,
    /// Packets on the wire per message, as in [`LatencyStats::wire_pkts`].
    pub wire_pkts: Option<f64>,
}

/// Runs the perftest pair one size at a time.
pub struct Perftest {
    dev: PerftestDevice,
    runs: u16,
    timeout: Duration,
    wire: Option<WireCounter>,
}

impl Perftest {
    pub fn new(dev: PerftestDevice, timeout: Duration) -> Perftest {
        Perftest {
            wire: WireCounter::open(&dev.ibdev),
            dev,
            runs: 0,
            timeout,
        }
    }

    /// Runs one tool with its `messages` messages, counting the packets on the wire (server
    /// and client both on this device).
    fn counted(
        &mut self,
        tool: &str,
        size: usize,
        iters: usize,
        messages: usize,
        extra: &[&str],
    ) -> Result<(String, Option<f64>), String> {
        let wire = self.wire.clone();
        WireCounter::around(wire.as_ref(), true, messages, || {
            self.run(tool, size, iters, extra)
        })
    }

    pub fn write_lat(&mut self, size: usize, iters: usize) -> Result<LatencyStats, String> {
        let iters = iters.max(5);
        // Each iteration is a round trip: two one-way messages.
        let (out, wire_pkts) = self.counted("ib_write_lat", size, iters, 2 * iters, &[])?;
        Ok(LatencyStats {
            wire_pkts,
            ..parse_latency(&out, size)?
        })
    }

    pub fn write_bw(
        &mut self,
        size: usize,
        iters: usize,
        window: usize,
    ) -> Result<BandwidthStats, String> {
        let iters = iters.max(5);
        let depth = window.min(iters).to_string();
        let extra = ["-t", depth.as_str(), "--report_gbits"];
        let (out, wire_pkts) = self.counted("ib_write_bw", size, iters, iters, &extra)?;
        let (gbps, msgs_per_s) = parse_bandwidth(&out, size)?;
        Ok(BandwidthStats {
            gbps,
            msgs_per_s,
            wire_pkts,
        })
    }

    /// Starts the server, then the client (retried while the server is not listening yet);
    /// returns the client's output.
    fn run(
        &mut self,
        tool: &str,
        size: usize,
        iters: usize,
        extra: &[&str],
    ) -> Result<String, String> {
        let port = self.dev.port.wrapping_add(self.runs).to_string();
        self.runs = self.runs.wrapping_add(1);
        let base: Vec<String> = args(&self.dev.ibdev, self.dev.gid_index, size, iters)
            .into_iter()
            .chain(["-p".to_string(), port])
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        let mut server = Reaped(Some(
            Command::new(tool)
                .args(&base)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {tool} (perftest installed?): {e}"))?,
        ));
        let t0 = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let client = Command::new(tool)
                .args(&base)
                .arg("127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {tool}: {e}"))?;
            let out = wait_output(client, self.timeout)
                .map_err(|e| format!("{tool} -s {size} client: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() {
                // The server finishes on its own once the client is done.
                if let Some(s) = server.0.take() {
                    let _ = wait_output(s, self.timeout);
                }
                return Ok(text);
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let not_listening = text.contains("Couldn't connect")
                || err.contains("Couldn't connect")
                || err.contains("Unable to open file descriptor");
            if !not_listening || t0.elapsed() > self.timeout {
                return Err(format!(
                    "{tool} -s {size} client failed ({}): {}{}",
                    out.status,
                    text.trim(),
                    err.trim()
                ));
            }
        }
    }
}

/// A child that is killed and reaped when dropped, so no server (perftest's, or any other a
/// caller starts) outlives a failure.
pub struct Reaped(pub Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn wait_output(mut child: Child, timeout: Duration) -> Result<Output, String> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {timeout:?}; killed"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Arguments shared by the server and the client of one run: device, GID index, message size,
/// iterations, and no CPU frequency check.
pub fn args(ibdev: &str, gid_index: u32, size: usize, iters: usize) -> Vec<String> {
    vec![
        "-d".into(),
        ibdev.into(),
        "-x".into(),
        gid_index.to_string(),
        "-s".into(),
        size.to_string(),
        "-n".into(),
        iters.to_string(),
        "-F".into(),
    ]
}

/// `ib_write_lat`'s (or `ib_send_lat`'s) result for `size`.
pub fn parse_latency(out: &str, size: usize) -> Result<LatencyStats, String> {
    let row = table_row(out, size)?;
    // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
    let num = |i: usize| parse_col(&row, i, "ib_write_lat");
    Ok(LatencyStats {
        typical_us: num(4)?,
        avg_us: num(5)?,
        p99_us: num(7)?,
        wire_pkts: None,
    })
}

/// `ib_write_bw`'s result for `size`: the average bandwidth (Gb/s with `--report_gbits`, else
/// MB/s) and the message rate per second.
pub fn parse_bandwidth(out: &str, size: usize) -> Result<(f64, f64), String> {
    let row = table_row(out, size)?;
    // #bytes #iterations BW-peak BW-average MsgRate[Mpps]
    Ok((
        parse_col(&row, 3, "ib_write_bw")?,
        parse_col(&row, 4, "ib_write_bw")? * 1e6,
    ))
}

/// The result line for `size` below the `#bytes` header.
fn table_row(out: &str, size: usize) -> Result<Vec<String>, String> {
    out.lines()
        .skip_while(|l| !l.contains("#bytes"))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|w| w.first().and_then(|s| s.parse::<usize>().ok()) == Some(size))
        .ok_or_else(|| format!("no result row for {size} bytes in perftest output:\n{out}"))
}

fn parse_col(row: &[String], i: usize, tool: &str) -> Result<f64, String> {
    row.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{tool}: column {i} missing in {row:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_result_rows() {
        let lat = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] \n 8       1000          1.65           5.19         1.68     \t       1.70        \t0.07   \t\t1.88    \t\t5.19   \n";
        let r = table_row(lat, 8).unwrap();
        assert_eq!(parse_col(&r, 4, "t").unwrap(), 1.68);
        assert_eq!(parse_col(&r, 7, "t").unwrap(), 1.88);
        let bw = " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]\n 65536      5000             94.67              94.66  \t\t   0.180549\n";
        let r = table_row(bw, 65536).unwrap();
        assert_eq!(parse_col(&r, 3, "t").unwrap(), 94.66);
        assert!(table_row(bw, 8).is_err());
        assert!(parse_bandwidth("Couldn't connect to 1.2.3.4", 8).is_err());
    }

    #[test]
    fn reads_latency_and_megabyte_bandwidth_tables() {
        let lat = "
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       1000          4.98           12.31        5.23               5.31             0.40            6.85                   12.31  
---------------------------------------------------------------------------------------
";
        let bw = "
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 1048576    200              6331.12            6330.48   \t\t   0.006330
---------------------------------------------------------------------------------------
";
        let l = parse_latency(lat, 8).unwrap();
        assert_eq!((l.typical_us, l.avg_us, l.p99_us), (5.23, 5.31, 6.85));
        assert_eq!(parse_bandwidth(bw, 1048576).unwrap().0, 6330.48);
    }
}
