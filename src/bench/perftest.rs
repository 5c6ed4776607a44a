//! The reference: perftest's `ib_write_lat` / `ib_write_bw`, server and client as two processes
//! on the same device (the client connects to 127.0.0.1, or to the named host), parsed from the
//! client's result table.

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
}

/// `ib_write_bw`'s average bandwidth and message rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandwidthStats {
    pub gbps: f64,
    pub msgs_per_s: f64,
}

/// Runs the perftest pair one size at a time.
pub struct Perftest {
    dev: PerftestDevice,
    runs: u16,
    timeout: Duration,
}

impl Perftest {
    pub fn new(dev: PerftestDevice, timeout: Duration) -> Perftest {
        Perftest {
            dev,
            runs: 0,
            timeout,
        }
    }

    pub fn write_lat(&mut self, size: usize, iters: usize) -> Result<LatencyStats, String> {
        let extra = [];
        let out = self.run("ib_write_lat", size, iters.max(5), &extra)?;
        let row = table_row(&out, size)?;
        // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
        let num = |i: usize| parse_col(&row, i, "ib_write_lat");
        Ok(LatencyStats {
            typical_us: num(4)?,
            avg_us: num(5)?,
            p99_us: num(7)?,
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
        let out = self.run("ib_write_bw", size, iters, &extra)?;
        let row = table_row(&out, size)?;
        // #bytes #iterations BW-peak BW-average MsgRate[Mpps]
        Ok(BandwidthStats {
            gbps: parse_col(&row, 3, "ib_write_bw")?,
            msgs_per_s: parse_col(&row, 4, "ib_write_bw")? * 1e6,
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
        let gid = self.dev.gid_index.to_string();
        let (size_s, iters_s) = (size.to_string(), iters.to_string());
        let base: Vec<&str> = [
            "-d",
            self.dev.ibdev.as_str(),
            "-x",
            gid.as_str(),
            "-s",
            size_s.as_str(),
            "-n",
            iters_s.as_str(),
            "-F",
            "-p",
            port.as_str(),
        ]
        .into_iter()
        .chain(extra.iter().copied())
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

/// A child that is killed and reaped when dropped, so no perftest server outlives a failure.
struct Reaped(Option<Child>);

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
    }
}
