//! A vLLM process as `serve` and `bench-serve` run it: in its own process group (so stopping it
//! stops its engine and worker processes too), its output in a log file that halo follows,
//! Ctrl-C and SIGTERM forwarded to it, and the probe of its `/v1/models` endpoint.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Lines of vLLM's log kept for error messages.
const TAIL_LINES: usize = 25;
/// How long a stopped vLLM gets to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The last of SIGINT/SIGTERM/SIGHUP halo received (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP so they can be passed on to vLLM's process group (which
/// the terminal's Ctrl-C no longer reaches directly).
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `on_signal` only stores into an atomic, which is async-signal-safe, and has
        // the `extern "C" fn(c_int)` signature `signal` expects.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The signal halo received since it started vLLM, if any.
pub fn signalled() -> Option<i32> {
    match SIGNALLED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// One line of vLLM's output; `redraw` when it ended in `\r` (a progress bar drawing itself).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub text: String,
    pub redraw: bool,
}

/// Reads what has been appended to a log file since the last call.
struct Follower {
    file: File,
    pending: Vec<u8>,
    tail: VecDeque<String>,
}

impl Follower {
    fn lines(&mut self) -> Vec<Line> {
        let mut buf = Vec::new();
        let _ = self.file.read_to_end(&mut buf);
        self.pending.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let redraw = self.pending[i] == b'\r';
            let raw: Vec<u8> = self.pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&raw[..raw.len() - 1])
                .trim_end()
                .to_string();
            if text.is_empty() {
                continue;
            }
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(text.clone());
            out.push(Line { text, redraw });
        }
        out
    }
}

pub struct VllmProcess {
    child: Child,
    follower: Follower,
    log: PathBuf,
    pub started: Instant,
}

impl VllmProcess {
    /// Starts `cmd` with stdout + stderr into `log` (created or truncated). Its stdin gets
    /// `input` (the cluster's secrets, see `ClusterConfig::env_command`) and is then closed.
    pub fn spawn(
        cmd: &mut Command,
        input: Option<&str>,
        log: &Path,
        program: &str,
    ) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        catch_signals();
        let mut child = cmd
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {program} (is vLLM installed? --vllm PATH)"))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // A few short lines: they fit in the pipe, so this cannot block on the child.
            if let Err(e) = stdin.write_all(text.as_bytes()) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("cannot pass the secrets to {program}: {e}");
            }
        }
        let file = File::open(log).with_context(|| format!("cannot read {}", log.display()))?;
        Ok(VllmProcess {
            child,
            follower: Follower {
                file,
                pending: Vec::new(),
                tail: VecDeque::new(),
            },
            log: log.to_path_buf(),
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Lines written since the last call.
    pub fn lines(&mut self) -> Vec<Line> {
        self.follower.lines()
    }

    /// The newest non-empty line seen so far.
    pub fn last_line(&self) -> Option<&str> {
        self.follower.tail.back().map(String::as_str)
    }

    /// The last lines of the log (what is left unread is read first), indented for a message.
    pub fn tail(&mut self) -> String {
        let _ = self.follower.lines();
        let lines: Vec<&str> = self.follower.tail.iter().map(String::as_str).collect();
        if lines.is_empty() {
            format!("({} is empty)", self.log.display())
        } else {
            format!(
                "last lines of {}:\n    {}",
                self.log.display(),
                lines.join("\n    ")
            )
        }
    }

    /// `Some(status)` once vLLM has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends `sig` to vLLM's process group, waits up to 20 s for it to exit, then kills the group.
    pub fn stop(&mut self, sig: i32) -> ExitStatus {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group vLLM leads
        // (`process_group(0)` at spawn); it touches no memory of ours.
        unsafe {
            libc::kill(-group, sig);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its engine and workers share the group: take them down too.
                // SAFETY: as above.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                }
                return status;
            }
            if Instant::now() >= deadline {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                }
                return self
                    .child
                    .wait()
                    .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What `GET /v1/models` on the local port gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Nothing listens (or it did not answer in time).
    Nothing,
    /// An HTTP status other than 200.
    Status(u16),
    /// 200, and these model ids.
    Models(Vec<String>),
    /// 200, but not the OpenAI model list.
    NotAModelList,
}

pub fn probe_models(port: u16) -> Answer {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return Answer::Nothing;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return Answer::Nothing;
    }
    let mut response = Vec::new();
    let _ = stream.take(4 << 20).read_to_end(&mut response);
    parse_models_response(&response)
}

/// Parses an HTTP response to `GET /v1/models` (plain or chunked body).
pub fn parse_models_response(response: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Answer::Nothing;
    };
    let status: Option<u16> = head
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    let Some(status) = status else {
        return Answer::Nothing;
    };
    if status != 200 {
        return Answer::Status(status);
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
        return Answer::NotAModelList;
    };
    let Some(data) = json["data"].as_array() else {
        return Answer::NotAModelList;
    };
    Answer::Models(
        data.iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect(),
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn model_lists() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 60\r\n\r\n{\"object\":\"list\",\"data\":[{\"id\":\"Qwen/Qwen3-8B\",\"object\":\"model\"}]}";
        assert_eq!(
            parse_models_response(ok),
            Answer::Models(vec!["Qwen/Qwen3-8B".into()])
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"data\":[{\"id\":\"\r\nd\r\na/b\"}],\"x\":1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_models_response(chunked),
            Answer::Models(vec!["a/b".into()])
        );
        assert_eq!(
            parse_models_response(b"HTTP/1.0 200 OK\r\n\r\n{}"),
            Answer::NotAModelList
        );
        assert_eq!(
            parse_models_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Answer::Status(503)
        );
        assert_eq!(parse_models_response(b""), Answer::Nothing);
    }

    #[test]
    fn follower_splits_lines_and_redraws() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, "INFO a\n 10%|#\r 20%|##\rpart").unwrap();
        let mut f = Follower {
            file: File::open(&path).unwrap(),
            pending: Vec::new(),
            tail: VecDeque::new(),
        };
        let got = f.lines();
        assert_eq!(
            got,
            [
                Line {
                    text: "INFO a".into(),
                    redraw: false
                },
                Line {
                    text: " 10%|#".into(),
                    redraw: true
                },
                Line {
                    text: " 20%|##".into(),
                    redraw: true
                },
            ]
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"ial\n")
            .unwrap();
        assert_eq!(f.lines()[0].text, "partial");
    }
}
