//! Running perftest (`ib_write_lat`, `ib_write_bw`) and reading its result tables.

use anyhow::{anyhow, bail, Result};

/// The data row under perftest's `#bytes` header, as numbers.
fn data_row(output: &str) -> Result<Vec<f64>> {
    let mut lines = output
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines
        .next()
        .ok_or_else(|| anyhow!("no result table in perftest output:\n{output}"))?;
    for l in lines {
        let nums: Vec<f64> = l
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if nums.len() >= 3 {
            return Ok(nums);
        }
    }
    bail!("no result row in perftest output:\n{output}")
}

/// `ib_write_lat` / `ib_send_lat`: (typical, average, p99) one-way latency in µs.
/// Columns: #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9.
pub fn parse_latency(output: &str) -> Result<(f64, f64, f64)> {
    let r = data_row(output)?;
    if r.len() < 8 {
        bail!("short latency row {r:?}");
    }
    Ok((r[4], r[5], r[7]))
}

/// `ib_write_bw`: average bandwidth in MB/s. Columns: #bytes #iterations peak average msgrate.
pub fn parse_bandwidth(output: &str) -> Result<f64> {
    let r = data_row(output)?;
    if r.len() < 4 {
        bail!("short bandwidth row {r:?}");
    }
    Ok(r[3])
}

/// Arguments shared by the server and client of one perftest run.
pub fn args(dev: &str, gid_index: u32, size: u64, iters: u32) -> Vec<String> {
    vec![
        "-d".into(),
        dev.into(),
        "-x".into(),
        gid_index.to_string(),
        "-s".into(),
        size.to_string(),
        "-n".into(),
        iters.to_string(),
        "-F".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAT: &str = "
---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       1000          4.98           12.31        5.23               5.31             0.40            6.85                   12.31  
---------------------------------------------------------------------------------------
";
    const BW: &str = "
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 1048576    200              6331.12            6330.48   		   0.006330
---------------------------------------------------------------------------------------
";

    #[test]
    fn reads_perftest_tables() {
        assert_eq!(parse_latency(LAT).unwrap(), (5.23, 5.31, 6.85));
        assert_eq!(parse_bandwidth(BW).unwrap(), 6330.48);
        assert!(parse_bandwidth("Couldn't connect to 1.2.3.4").is_err());
    }
}
