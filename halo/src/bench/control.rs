//! The peer side of `halo bench`: a small line protocol on a TCP control port.
//!
//! The measuring node asks, one request per line, and the peer answers one line:
//!
//! | request | answer |
//! |---|---|
//! | `TCP-LAT` | `PORT <p>`, then echoes one ping-pong connection on that port |
//! | `TCP-BW <streams>` | `PORT <p>`, then `BYTES <n>` once every stream has closed |
//! | `RUN <program> <args…>` | `STARTED`, then `EXIT <code>` when it ends (only the servers listed in [`ALLOWED`]) |
//! | `PLUGIN <version>` | `PORT <p>`: the plugin benchmark's member now serves one driver there |
//! | `QUIT` | `BYE`, and the daemon ends |
//!
//! Nothing else is run: the control port never executes arbitrary commands. The lines travel
//! over the benchmark engine's control channel ([`Control`]).

use super::tcp;
use anyhow::{anyhow, bail, Context, Result};
use halo_harness::bench::control::Control;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Default control port.
pub const CONTROL_PORT: u16 = 18700;
/// Programs the peer may start: the perftest servers.
pub const ALLOWED: [&str; 3] = ["ib_write_lat", "ib_write_bw", "ib_send_lat"];
/// Port of the plugin benchmark's member (`PLUGIN` request).
pub const PLUGIN_PORT: u16 = 18701;
/// Longest a server program may run.
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn reply(s: &mut Control, line: &str) -> Result<()> {
    s.send(line).map_err(anyhow::Error::msg)
}

/// Serves control connections on `bind` until a `QUIT`. `plugin` is this node's plugin library,
/// for the `PLUGIN` request.
pub fn serve(bind: SocketAddr, plugin: Option<&std::path::Path>) -> Result<()> {
    let listener =
        TcpListener::bind(bind).with_context(|| format!("binding the control port {bind}"))?;
    eprintln!(
        "halo bench: peer side listening on {}",
        listener.local_addr()?
    );
    for conn in listener.incoming() {
        let conn = conn.context("accepting a control connection")?;
        let peer = conn.peer_addr()?;
        let mut s =
            Control::tcp(conn, format!("control client {peer}")).map_err(anyhow::Error::msg)?;
        while let Some(line) = s.next_line(Duration::MAX).map_err(anyhow::Error::msg)? {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["TCP-LAT"] => {
                    let l = TcpListener::bind((bind.ip(), 0))?;
                    reply(&mut s, &format!("PORT {}", l.local_addr()?.port()))?;
                    tcp::echo(&l)?;
                }
                ["TCP-BW", n] => {
                    let streams: usize = n.parse().context("stream count")?;
                    let l = TcpListener::bind((bind.ip(), 0))?;
                    reply(&mut s, &format!("PORT {}", l.local_addr()?.port()))?;
                    let bytes = tcp::sink(&l, streams)?;
                    reply(&mut s, &format!("BYTES {bytes}"))?;
                }
                ["RUN", prog, args @ ..] if ALLOWED.contains(prog) => {
                    let mut child = match Command::new(prog)
                        .args(args)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                    {
                        Ok(c) => c,
                        Err(e) => {
                            reply(&mut s, &format!("ERROR cannot start {prog}: {e}"))?;
                            continue;
                        }
                    };
                    reply(&mut s, "STARTED")?;
                    let code = wait_bounded(&mut child, RUN_LIMIT);
                    reply(&mut s, &format!("EXIT {code}"))?;
                }
                ["PLUGIN", version] => {
                    let Some(lib) = plugin else {
                        reply(&mut s, "ERROR no plugin library here: start `halo bench --listen --plugin PATH`")?;
                        continue;
                    };
                    let cfg = halo_harness::bench::MemberConfig {
                        plugin: lib.to_path_buf(),
                        version: version.parse().context("plugin ABI version")?,
                        dev: 0,
                        timeout: Duration::from_secs(120),
                    };
                    let bind_to = format!("{}:{PLUGIN_PORT}", bind.ip());
                    std::thread::spawn(move || {
                        if let Err(e) = halo_harness::bench::serve_tcp(&cfg, &bind_to) {
                            eprintln!("halo bench: plugin member: {e}");
                        }
                    });
                    reply(&mut s, &format!("PORT {PLUGIN_PORT}"))?;
                }
                ["RUN", prog, ..] => {
                    reply(&mut s, &format!("ERROR {prog} is not a benchmark server"))?
                }
                ["QUIT"] => {
                    reply(&mut s, "BYE")?;
                    return Ok(());
                }
                _ => reply(
                    &mut s,
                    &format!("ERROR unknown request from {peer}: {line}"),
                )?,
            }
        }
    }
    Ok(())
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> i32 {
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.code().unwrap_or(-1),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return -1;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return -1,
        }
    }
}

/// The measuring side's connection to a peer's control port.
pub struct Peer {
    pub ip: IpAddr,
    ctl: Control,
}

impl Peer {
    /// Connects, retrying for up to `wait` (the peer may still be starting).
    pub fn connect(addr: SocketAddr, wait: Duration) -> Result<Peer> {
        let start = std::time::Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < wait => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => bail!(
                    "no `halo bench --listen` answers at {addr}: {e} (start it on the peer node)"
                ),
            }
        };
        let ctl = Control::tcp(stream, format!("the peer {addr}")).map_err(anyhow::Error::msg)?;
        Ok(Peer { ip: addr.ip(), ctl })
    }

    /// Sends one request line.
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.ctl.send(line).map_err(anyhow::Error::msg)
    }

    /// The next answer line; `ERROR …` answers become errors.
    pub fn answer(&mut self) -> Result<String> {
        let line = self
            .ctl
            .next_line(RUN_LIMIT)
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| anyhow!("the peer closed the control connection"))?;
        if let Some(e) = line.strip_prefix("ERROR ") {
            bail!("peer: {e}");
        }
        Ok(line)
    }

    /// Asks for a data port (`TCP-LAT` / `TCP-BW n`) and returns its address.
    pub fn data_port(&mut self, request: &str) -> Result<SocketAddr> {
        self.send(request)?;
        let a = self.answer()?;
        let port: u16 = a
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("unexpected answer {a:?}"))?;
        Ok(SocketAddr::new(self.ip, port))
    }

    /// Starts an allowed server program on the peer; `finish` then waits for its exit code.
    pub fn start(&mut self, program: &str, args: &[String]) -> Result<()> {
        self.send(&format!("RUN {program} {}", args.join(" ")))?;
        match self.answer()?.as_str() {
            "STARTED" => Ok(()),
            a => bail!("starting {program} on the peer: unexpected answer {a:?}"),
        }
    }

    pub fn finish(&mut self) -> Result<i32> {
        let a = self.answer()?;
        a.strip_prefix("EXIT ")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("unexpected answer {a:?}"))
    }

    pub fn quit(mut self) -> Result<()> {
        self.send("QUIT")?;
        let _ = self.answer();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_daemon_serves_tcp_tests_and_refuses_other_programs() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let daemon = std::thread::spawn(move || serve(addr, None));
        let mut peer = Peer::connect(addr, Duration::from_secs(10)).unwrap();

        let lat_addr = peer.data_port("TCP-LAT").unwrap();
        let lat = tcp::latency(lat_addr, 50).unwrap();
        assert!(lat.typical_us > 0.0);

        let bw_addr = peer.data_port("TCP-BW 2").unwrap();
        let (_, sent) = tcp::bandwidth(bw_addr, 2, Duration::from_millis(100)).unwrap();
        assert_eq!(peer.answer().unwrap(), format!("BYTES {sent}"));

        peer.send("RUN sh -c true").unwrap();
        assert!(peer
            .answer()
            .unwrap_err()
            .to_string()
            .contains("sh is not a benchmark server"));
        assert!(peer
            .data_port("PLUGIN 10")
            .unwrap_err()
            .to_string()
            .contains("no plugin library here"));
        peer.quit().unwrap();
        daemon.join().unwrap().unwrap();
    }
}
