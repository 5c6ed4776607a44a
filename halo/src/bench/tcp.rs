//! The TCP path: a ping-pong latency test and a multi-stream bandwidth test, both ends in this
//! crate, so the comparison with RDMA needs nothing but `halo` on each node.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Bytes of each ping-pong message.
pub const PING_BYTES: usize = 8;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One-way latency figures in microseconds (round trip / 2), like `ib_write_lat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    pub typical_us: f64,
    pub average_us: f64,
    pub p99_us: f64,
    pub iterations: usize,
}

impl Latency {
    /// From round-trip samples in nanoseconds.
    pub fn from_round_trips(mut rtt_ns: Vec<u64>) -> Latency {
        assert!(!rtt_ns.is_empty(), "no samples");
        rtt_ns.sort_unstable();
        let one_way = |ns: u64| ns as f64 / 2000.0;
        let n = rtt_ns.len();
        Latency {
            typical_us: one_way(rtt_ns[n / 2]),
            average_us: rtt_ns.iter().map(|&x| one_way(x)).sum::<f64>() / n as f64,
            p99_us: one_way(rtt_ns[((n * 99) / 100).min(n - 1)]),
            iterations: n,
        }
    }
}

/// Serves one ping-pong connection: echoes fixed-size messages until the peer closes.
pub fn echo(listener: &TcpListener) -> Result<()> {
    let (mut s, _) = listener
        .accept()
        .context("accepting the latency connection")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; PING_BYTES];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("latency connection"),
        }
    }
}

/// Ping-pong against an [`echo`] server.
pub fn latency(addr: SocketAddr, iterations: usize) -> Result<Latency> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; PING_BYTES];
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        buf[0] = i as u8;
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)
            .with_context(|| format!("echo from {addr}"))?;
        if buf[0] != i as u8 {
            bail!("echo from {addr} returned the wrong message");
        }
        if i >= iterations / 10 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(Latency::from_round_trips(samples))
}

/// Receives `streams` connections and counts their bytes until every one closes.
pub fn sink(listener: &TcpListener, streams: usize) -> Result<u64> {
    let mut workers = Vec::new();
    for _ in 0..streams {
        let (mut s, _) = listener.accept().context("accepting a bandwidth stream")?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        workers.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(total),
                    n => total += n as u64,
                }
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("a stream reader panicked"))??;
    }
    Ok(total)
}

/// Bandwidth of `streams` parallel streams for `duration` (like `iperf3 -P streams`), in Gbps,
/// counted on the sending side; also returns the bytes sent.
pub fn bandwidth(addr: SocketAddr, streams: usize, duration: Duration) -> Result<(f64, u64)> {
    bandwidth_over(
        || {
            TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .with_context(|| format!("connecting to {addr}"))
        },
        streams,
        duration,
    )
}

/// [`bandwidth`] over connections made by `connect`. Every stream is connected before the clock
/// starts (connecting 8 streams can take longer than a short run), each stream writes at least
/// one buffer, and a run that moved nothing is an error, never a 0 Gbps figure.
fn bandwidth_over(
    connect: impl Fn() -> Result<TcpStream>,
    streams: usize,
    duration: Duration,
) -> Result<(f64, u64)> {
    let conns = (0..streams.max(1))
        .map(|_| connect())
        .collect::<Result<Vec<_>>>()?;
    let go = Arc::new(Barrier::new(conns.len() + 1));
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let go = Arc::clone(&go);
            std::thread::spawn(move || -> std::io::Result<u64> {
                let buf = vec![0x5au8; 1 << 20];
                let mut total = 0u64;
                go.wait();
                let start = Instant::now();
                loop {
                    s.write_all(&buf)?;
                    total += buf.len() as u64;
                    if start.elapsed() >= duration {
                        return Ok(total);
                    }
                }
            })
        })
        .collect();
    go.wait();
    let start = Instant::now();
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("a stream writer panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    if total == 0 || secs <= 0.0 {
        bail!("the TCP streams moved no data in {secs:.3} s");
    }
    Ok((total as f64 * 8.0 / secs / 1e9, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_statistics_are_one_way() {
        let l = Latency::from_round_trips((1..=100).map(|i| i * 2000).collect());
        assert_eq!(l.typical_us, 51.0);
        assert_eq!(l.average_us, 50.5);
        assert_eq!(l.p99_us, 100.0);
        assert_eq!(l.iterations, 100);
    }

    #[test]
    fn loopback_latency_and_bandwidth() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || echo(&l));
        let lat = latency(addr, 200).unwrap();
        server.join().unwrap().unwrap();
        assert!(lat.typical_us > 0.0 && lat.p99_us >= lat.typical_us);

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || sink(&l, 2));
        let (gbps, sent) = bandwidth(addr, 2, Duration::from_millis(200)).unwrap();
        let received = server.join().unwrap().unwrap();
        assert_eq!(sent, received, "every byte sent is counted by the sink");
        assert!(gbps > 0.0);
    }

    /// Connecting the streams took longer than the run itself (8 streams into a slow guest): the
    /// old timer started before connecting, every stream found its time up and the run reported
    /// 0.00 Gbps. The clock now starts once all are connected.
    #[test]
    fn slow_connections_do_not_eat_the_measured_time() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || sink(&l, 4));
        let slow_connect = || {
            std::thread::sleep(Duration::from_millis(60));
            Ok(TcpStream::connect(addr)?)
        };
        let (gbps, sent) = bandwidth_over(slow_connect, 4, Duration::from_millis(100)).unwrap();
        let received = server.join().unwrap().unwrap();
        assert_eq!(sent, received);
        assert!(
            sent >= 4 << 20,
            "each stream sends at least one buffer: {sent}"
        );
        assert!(gbps > 0.0, "{gbps}");
    }
}
