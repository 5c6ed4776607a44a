//! Child processes with a deadline: every external command halo runs is bounded in time.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(Debug)]
pub struct Captured {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with stdin closed and both outputs captured; kills it at `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Captured> {
    run_bounded_input(cmd, limit, None)
}

/// As [`run_bounded`], with `input` written to the child's stdin (then closed). This is how
/// secrets reach a remote command: never on a command line, where `ps` and logs would show them.
pub fn run_bounded_input(
    cmd: &mut Command,
    limit: Duration,
    input: Option<&str>,
) -> Result<Captured> {
    let shown = describe(cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let text = text.to_string();
        // A child that never reads its stdin must not block us.
        thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    // Readers on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(50));
    };
    Ok(Captured {
        success: status.success(),
        code: status.code(),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Runs `cmd` with the terminal's stdin/stdout/stderr (for long, chatty tools such as image
/// pulls); kills it at `limit`. Returns the exit code (`None` when killed by a signal).
pub fn run_inherited_bounded(cmd: &mut Command, limit: Duration) -> Result<Option<i32>> {
    let shown = describe(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The command line as a user would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a word for a POSIX shell only when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            shell_quote("NCCL_IB_HCA=rocep1s0f0"),
            "NCCL_IB_HCA=rocep1s0f0"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn deadline_kills() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let err = run_bounded(&mut cmd, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
    }
}
