//! The peer side of `halo bench`: a small line protocol on a TCP control port.
//!
//! The measuring node asks, one request per line, and the peer answers one line:
//!
//! | request | answer |
//! |---|---|
//! | `CHECK DEVICE <dev> <gid>` | `OK`, or `ERROR <why>`: the device, its RoCE v2 GID and perftest are there |
//! | `CHECK PLUGIN` | `OK <path>`, or `ERROR <why>`: a plugin library was named and exists |
//! | `TCP-LAT` | `PORT <p>`, then echoes one ping-pong connection on that port |
//! | `TCP-BW <streams>` | `PORT <p>`, then `BYTES <n>` once every stream has closed |
//! | `RUN <program> <args…>` | `STARTED`, then `EXIT <code> [<last output lines>]` when it ends (only the servers in [`ALLOWED`]) |
//! | `STOP` (while a `RUN` program runs) | the program is killed; its `EXIT` line follows |
//! | `PLUGIN <version>` | `PORT <p>`: the plugin benchmark's member now serves one driver there |
//! | `QUIT` | `BYE`, and the daemon ends |
//!
//! Every `RUN` is answered by exactly one `EXIT`, whether the program ends by itself or is
//! stopped, so the next request always reads its own answer. A `STOP` that arrives after the
//! program ended by itself is ignored. Nothing else is run: the control port never executes
//! arbitrary commands. The lines travel over the benchmark engine's control channel ([`Control`]).

use super::tcp;
use super::validate;
use crate::sysroot::SysRoot;
use anyhow::{anyhow, bail, Context, Result};
use halo_harness::bench::control::Control;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default control port.
pub const CONTROL_PORT: u16 = 18700;
/// Programs the peer may start: the perftest servers.
pub const ALLOWED: [&str; 3] = ["ib_write_lat", "ib_write_bw", "ib_send_lat"];
/// Port of the plugin benchmark's member (`PLUGIN` request).
pub const PLUGIN_PORT: u16 = 18701;
/// Longest a server program may run.
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// Output lines of a server program kept for its `EXIT` answer.
const TAIL_LINES: usize = 4;

fn reply(s: &mut Control, line: &str) -> Result<()> {
    s.send(line).map_err(anyhow::Error::msg)
}

/// What the peer side serves with.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub bind: SocketAddr,
    /// This node's plugin library, for the `PLUGIN` request.
    pub plugin: Option<PathBuf>,
    /// Where `/sys` is read for `CHECK DEVICE` (`/` but in tests).
    pub root: SysRoot,
}

/// Serves control connections until a `QUIT`.
pub fn serve(o: &ListenOptions) -> Result<()> {
    let bind = o.bind;
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
        if serve_client(o, &mut s, peer)? {
            return Ok(());
        }
    }
    Ok(())
}

/// One control connection; `Ok(true)` after a `QUIT`.
fn serve_client(o: &ListenOptions, s: &mut Control, peer: SocketAddr) -> Result<bool> {
    let bind = o.bind;
    while let Some(line) = s.next_line(Duration::MAX).map_err(anyhow::Error::msg)? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["CHECK", "DEVICE", dev, gid] => {
                let checked = gid
                    .parse::<u32>()
                    .map_err(|_| format!("GID index {gid:?} is not a number"))
                    .and_then(|gid| validate::rdma_device(&o.root, dev, gid))
                    .and_then(|()| validate::perftest_installed());
                match checked {
                    Ok(()) => reply(s, "OK")?,
                    Err(e) => reply(s, &format!("ERROR {e}"))?,
                }
            }
            ["CHECK", "PLUGIN"] => match &o.plugin {
                Some(lib) if lib.is_file() => reply(s, &format!("OK {}", lib.display()))?,
                Some(lib) => reply(
                    s,
                    &format!("ERROR the plugin library {} does not exist", lib.display()),
                )?,
                None => reply(
                    s,
                    "ERROR no plugin library here: start `halo bench --listen --plugin PATH`",
                )?,
            },
            ["TCP-LAT"] => {
                let l = TcpListener::bind((bind.ip(), 0))?;
                reply(s, &format!("PORT {}", l.local_addr()?.port()))?;
                tcp::echo(&l)?;
            }
            ["TCP-BW", n] => {
                let streams: usize = n.parse().context("stream count")?;
                let l = TcpListener::bind((bind.ip(), 0))?;
                reply(s, &format!("PORT {}", l.local_addr()?.port()))?;
                let bytes = tcp::sink(&l, streams)?;
                reply(s, &format!("BYTES {bytes}"))?;
            }
            ["RUN", prog, args @ ..] if ALLOWED.contains(prog) => {
                if !run_server(s, prog, args)? {
                    return Ok(false);
                }
            }
            ["PLUGIN", version] => {
                let Some(lib) = &o.plugin else {
                    reply(
                        s,
                        "ERROR no plugin library here: start `halo bench --listen --plugin PATH`",
                    )?;
                    continue;
                };
                let cfg = halo_harness::bench::MemberConfig {
                    plugin: lib.clone(),
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
                reply(s, &format!("PORT {PLUGIN_PORT}"))?;
            }
            ["RUN", prog, ..] => reply(s, &format!("ERROR {prog} is not a benchmark server"))?,
            // The program it was meant for ended by itself and has been answered for.
            ["STOP"] => {}
            ["QUIT"] => {
                reply(s, "BYE")?;
                return Ok(true);
            }
            _ => reply(s, &format!("ERROR unknown request from {peer}: {line}"))?,
        }
    }
    Ok(false)
}

/// The last lines a child wrote on stdout and stderr.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn follow(&self, out: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<()> {
        let tail = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let line = line.trim().to_string();
                if line.is_empty() {
                    continue;
                }
                let mut t = tail.0.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
    }

    fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

/// Runs one allowed server program, watching the control channel for `STOP` meanwhile; answers
/// `STARTED` and then exactly one `EXIT`. `Ok(false)` when the client went away.
fn run_server(s: &mut Control, prog: &str, args: &[&str]) -> Result<bool> {
    let mut child = match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            reply(s, &format!("ERROR cannot start {prog}: {e}"))?;
            return Ok(true);
        }
    };
    let tail = Tail::default();
    let readers = [
        tail.follow(child.stdout.take().expect("piped")),
        tail.follow(child.stderr.take().expect("piped")),
    ];
    reply(s, "STARTED")?;
    let started = Instant::now();
    let (code, note) = loop {
        if let Some(st) = child.try_wait()? {
            break (st.code().unwrap_or(-1), "");
        }
        if started.elapsed() > RUN_LIMIT {
            break (stop(&mut child), "killed: ran too long");
        }
        match s.line_within(Duration::from_millis(20)) {
            Ok(None) => {}
            Ok(Some(l)) if l.trim() == "STOP" => break (stop(&mut child), "stopped"),
            Ok(Some(l)) => reply(s, &format!("ERROR {prog} still runs; not now: {l}"))?,
            Err(_) => {
                stop(&mut child);
                return Ok(false);
            }
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let text = [note.to_string(), tail.text()]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    reply(s, format!("EXIT {code} {text}").trim_end())?;
    Ok(true)
}

fn stop(child: &mut Child) -> i32 {
    let _ = child.kill();
    child.wait().map(|st| st.code().unwrap_or(-1)).unwrap_or(-1)
}

/// How a server program on the peer ended: its exit code and last output lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub code: i32,
    pub output: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.code)?;
        if !self.output.is_empty() {
            write!(f, ": {}", self.output)?;
        }
        Ok(())
    }
}

fn parse_exit(line: &str) -> Result<Exit> {
    let rest = line
        .strip_prefix("EXIT ")
        .ok_or_else(|| anyhow!("expected EXIT from the peer, got {line:?}"))?;
    let (code, output) = rest.split_once(' ').unwrap_or((rest, ""));
    Ok(Exit {
        code: code
            .parse()
            .map_err(|_| anyhow!("malformed EXIT from the peer: {line:?}"))?,
        output: output.to_string(),
    })
}

/// The measuring side's connection to a peer's control port.
pub struct Peer {
    pub ip: IpAddr,
    ctl: Control,
}

impl Peer {
    /// Connects, retrying for up to `wait` (the peer may still be starting). `waiting` is told
    /// after each failed attempt how long it has been and why; it may end the wait with an error
    /// (e.g. when the process that should start the peer has died).
    pub fn connect(
        addr: SocketAddr,
        wait: Duration,
        waiting: &mut dyn FnMut(Duration, &std::io::Error) -> Result<()>,
    ) -> Result<Peer> {
        let start = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < wait => {
                    waiting(start.elapsed(), &e)?;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => bail!(
                    "no `halo bench --listen` answers at {addr} after {} s: {e} (start it on the peer node, or run `halo bench` with a cluster.toml to start it over SSH)",
                    wait.as_secs()
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

    /// Asks a `CHECK …` question; `Ok` carries what follows `OK`.
    pub fn check(&mut self, request: &str) -> Result<String> {
        self.send(&format!("CHECK {request}"))?;
        let a = self.answer()?;
        match a.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("unexpected answer {a:?} to CHECK {request}"),
        }
    }

    /// Asks for a data port (`TCP-LAT` / `TCP-BW n`) and returns its address.
    pub fn data_port(&mut self, request: &str) -> Result<SocketAddr> {
        self.send(request)?;
        let a = self.answer()?;
        let port: u16 = a
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("unexpected answer {a:?} to {request}"))?;
        Ok(SocketAddr::new(self.ip, port))
    }

    /// Starts an allowed server program on the peer. Its `EXIT` must then be collected with
    /// [`Peer::finish`], [`Peer::exited`] or [`Peer::stop`].
    pub fn start(&mut self, program: &str, args: &[String]) -> Result<()> {
        self.send(&format!("RUN {program} {}", args.join(" ")))?;
        match self.answer()?.as_str() {
            "STARTED" => Ok(()),
            a => bail!("starting {program} on the peer: unexpected answer {a:?}"),
        }
    }

    /// Waits up to `limit` for the started program to end.
    pub fn finish(&mut self, limit: Duration) -> Result<Exit> {
        match self.ctl.line_within(limit).map_err(anyhow::Error::msg)? {
            Some(line) => parse_exit(&line),
            None => {
                let e = self.stop()?;
                bail!(
                    "the server on the peer did not end within {} s ({e})",
                    limit.as_secs()
                )
            }
        }
    }

    /// The started program's end, if it has already ended.
    pub fn exited(&mut self) -> Result<Option<Exit>> {
        match self
            .ctl
            .line_within(Duration::ZERO)
            .map_err(anyhow::Error::msg)?
        {
            Some(line) => parse_exit(&line).map(Some),
            None => Ok(None),
        }
    }

    /// Stops the started program and collects its end.
    pub fn stop(&mut self) -> Result<Exit> {
        self.send("STOP")?;
        let line = self
            .ctl
            .next_line(Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| anyhow!("the peer closed the control connection"))?;
        parse_exit(&line)
    }

    pub fn quit(mut self) -> Result<()> {
        self.send("QUIT")?;
        let _ = self.answer();
        Ok(())
    }
}

/// For `Peer::connect` where nobody needs to hear about the wait.
pub fn wait_silently(_: Duration, _: &std::io::Error) -> Result<()> {
    Ok(())
}

/// For `Peer::connect`: one line on stderr when the peer does not answer at once, then one
/// every 5 s, so a wait never looks like a hang.
pub fn wait_with_progress(
    addr: SocketAddr,
    wait: Duration,
) -> impl FnMut(Duration, &std::io::Error) -> Result<()> {
    let mut next = Duration::ZERO;
    move |elapsed, e| {
        if elapsed >= next {
            eprintln!(
                "halo bench: waiting for `halo bench --listen` at {addr} ({e}; {} s of {} s)",
                elapsed.as_secs(),
                wait.as_secs()
            );
            next = elapsed + Duration::from_secs(5);
        }
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
        let daemon = std::thread::spawn(move || {
            serve(&ListenOptions {
                bind: addr,
                plugin: None,
                root: SysRoot::new("/nonexistent"),
            })
        });
        let mut peer = Peer::connect(addr, Duration::from_secs(10), &mut wait_silently).unwrap();

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
