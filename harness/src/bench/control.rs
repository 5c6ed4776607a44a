//! The line-based control channel between the driving process and its peers (members): the
//! stdin/stdout pipes of a spawned member, or a TCP stream in two-node mode. Plugin traffic never
//! goes over it; it only carries handles, commands and results. `halo bench` speaks its own
//! requests to its peer node over the same channel.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

/// One end of a control channel. Reads go through a thread so that every wait has a timeout.
pub struct Control {
    lines: Receiver<std::io::Result<String>>,
    out: Box<dyn Write + Send>,
    who: String,
}

impl Control {
    pub fn new(
        input: impl std::io::Read + Send + 'static,
        out: impl Write + Send + 'static,
        who: String,
    ) -> Control {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(input).lines() {
                let eof = line.is_err();
                if tx.send(line).is_err() || eof {
                    break;
                }
            }
        });
        Control {
            lines: rx,
            out: Box::new(out),
            who,
        }
    }

    /// The member side of a spawned member: our own stdin and stdout.
    pub fn stdio() -> Control {
        Control::new(
            std::io::stdin(),
            std::io::stdout(),
            "the driving process".into(),
        )
    }

    pub fn tcp(stream: TcpStream, who: String) -> Result<Control, String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let input = stream
            .try_clone()
            .map_err(|e| format!("control stream to {who}: {e}"))?;
        Ok(Control::new(input, stream, who))
    }

    pub fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(|e| format!("cannot write to {}: {e}", self.who))
    }

    /// The next line as sent; `Ok(None)` once the other end has closed the channel.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(l)) => Ok(Some(l)),
            Ok(Err(e)) => Err(format!("cannot read from {}: {e}", self.who)),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("{} did not answer within {timeout:?}", self.who))
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
        }
    }

    /// The next line if one arrives within `timeout`, `Ok(None)` if none did; the channel
    /// closing is an error. For a process that watches the channel while it does other work.
    pub fn line_within(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(l)) => Ok(Some(l)),
            Ok(Err(e)) => Err(format!("cannot read from {}: {e}", self.who)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("{} closed the control channel", self.who))
            }
        }
    }

    /// The next line; the channel closing is an error.
    pub fn recv_line(&mut self, timeout: Duration) -> Result<String, String> {
        self.next_line(timeout)?
            .ok_or_else(|| format!("{} closed the control channel", self.who))
    }

    /// The next line, split into words.
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<String>, String> {
        let l = self.recv_line(timeout)?;
        Ok(l.split_whitespace().map(str::to_owned).collect())
    }

    /// Asks the far end to close its comms and quit, and waits for its goodbye.
    pub fn quit(&mut self, timeout: Duration) -> Result<(), String> {
        self.send("quit")?;
        self.expect("bye", timeout).map(drop)
    }

    /// The next line, which must start with `word`; returns the words after it.
    pub fn expect(&mut self, word: &str, timeout: Duration) -> Result<Vec<String>, String> {
        let mut l = self.recv(timeout)?;
        if l.first().map(String::as_str) == Some("error") {
            return Err(format!("{} failed: {}", self.who, l[1..].join(" ")));
        }
        if l.first().map(String::as_str) != Some(word) {
            return Err(format!(
                "{} answered {:?}, expected {word}",
                self.who,
                l.join(" ")
            ));
        }
        l.remove(0);
        Ok(l)
    }
}

/// Parses word `i` of an answer.
pub fn field<T: std::str::FromStr>(words: &[String], i: usize, what: &str) -> Result<T, String> {
    words
        .get(i)
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("malformed {what}: {words:?}"))
}

/// A member process started by this one; killed on drop if it has not exited by then.
pub struct SpawnedMember {
    pub ctl: Control,
    child: Child,
}

impl SpawnedMember {
    pub fn start(
        program: &std::ffi::OsStr,
        args: &[std::ffi::OsString],
        index: usize,
    ) -> Result<Self, String> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start member {index} ({}): {e}",
                    program.to_string_lossy()
                )
            })?;
        let stdin: ChildStdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        Ok(SpawnedMember {
            ctl: Control::new(
                stdout,
                stdin,
                format!("member {index} (pid {})", child.id()),
            ),
            child,
        })
    }

    /// Asks the member to close its comms and waits for it to exit.
    pub fn finish(mut self, timeout: Duration) -> Result<(), String> {
        self.ctl.quit(timeout)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => return Err(format!("member exited with {s}")),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return Err(format!("member did not exit within {timeout:?}")),
                Err(e) => return Err(format!("cannot wait for member: {e}")),
            }
        }
    }
}

impl Drop for SpawnedMember {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
