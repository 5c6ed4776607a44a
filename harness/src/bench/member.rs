//! A member: the far end of every measurement. It loads the plugin in its own process, publishes
//! its listen handle and then does what the driving process asks over the control channel.

use super::control::{field, Control};
use super::ops::{Net, Polls, Ring};
use crate::driver::{handle_from_hex, handle_to_hex, Opaque, Plugin};
use crate::log::quiet_logger;
use halo_ffi::NCCL_NET_HANDLE_MAXSIZE;
use std::path::PathBuf;
use std::time::Duration;

/// How a member loads the plugin; passed on its command line by the driving process.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub plugin: PathBuf,
    pub version: u32,
    pub dev: i32,
    pub timeout: Duration,
}

/// The argument that turns a program embedding the benchmark into a member; see [`member_main`].
pub const MEMBER_FLAG: &str = "--bench-member";

impl MemberConfig {
    /// Arguments appended to the member command line.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            MEMBER_FLAG.into(),
            self.plugin.clone().into_os_string(),
            self.version.to_string().into(),
            self.dev.to_string().into(),
            self.timeout.as_secs().to_string().into(),
        ]
    }
}

/// Call first thing in `main` of any program that runs the benchmark with a spawned peer: when
/// `args` (without the program name) hold [`MEMBER_FLAG`], this process is a member: it serves
/// on stdin/stdout and the result is returned; otherwise `None`.
pub fn member_main(args: &[String]) -> Option<Result<(), String>> {
    let i = args.iter().position(|a| a == MEMBER_FLAG)?;
    let rest = &args[i + 1..];
    let cfg = (|| {
        Ok::<_, String>(MemberConfig {
            plugin: PathBuf::from(rest.first().ok_or("missing plugin path")?),
            version: field(rest, 1, "member version")?,
            dev: field(rest, 2, "member device")?,
            timeout: Duration::from_secs(field(rest, 3, "member timeout")?),
        })
    })();
    Some(cfg.and_then(|cfg| serve(&cfg, Control::stdio())))
}

/// Serves one driving process until it says `quit` or goes away. Errors are also reported to
/// the driver as an `error` line so that it can name the cause.
pub fn serve(cfg: &MemberConfig, mut ctl: Control) -> Result<(), String> {
    let r = serve_inner(cfg, &mut ctl);
    if let Err(e) = &r {
        let _ = ctl.send(&format!("error {e}"));
    }
    r
}

/// Commands may be far apart: the driver runs perftest and other members in between.
const IDLE: Duration = Duration::from_secs(3600);

fn serve_inner(cfg: &MemberConfig, ctl: &mut Control) -> Result<(), String> {
    let mut plugin = Plugin::load(&cfg.plugin, cfg.version)?;
    plugin
        .init(quiet_logger(), u64::from(std::process::id()))
        .map_err(|e| e.to_string())?;
    let net = Net {
        plugin: &plugin,
        timeout: cfg.timeout,
    };
    let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
    let listen = plugin
        .listen(cfg.dev, &mut handle)
        .map_err(|e| e.to_string())?;
    // The plugin's name follows, so that a driver running another plugin (a server started
    // out of turn) stops with a clear error instead of a handle it cannot read.
    ctl.send(&format!(
        "handle {} {}",
        handle_to_hex(&handle),
        plugin.name()
    ))?;
    let mut listen = Some(listen);
    let mut comms: Option<(Opaque, Opaque)> = None;
    let pair = |comms: Option<(Opaque, Opaque)>| comms.ok_or("not connected yet".to_string());
    loop {
        let cmd = ctl.recv(IDLE)?;
        let word = cmd.first().map(String::as_str).unwrap_or("");
        let mut polls = Polls::default();
        match word {
            "connect" => {
                let mut peer = handle_from_hex(cmd.get(1).ok_or("connect needs a handle")?)?;
                let lc = listen.take().ok_or("already connected")?;
                comms = Some(net.connect_pair(cfg.dev, lc, &mut peer)?);
                plugin.close_listen(lc).map_err(|e| e.to_string())?;
                ctl.send("connected")?;
            }
            "lat" => {
                let (send, recv) = pair(comms)?;
                net.pong(
                    send,
                    recv,
                    field(&cmd, 1, "lat size")?,
                    field(&cmd, 2, "lat iterations")?,
                    &mut polls,
                )?;
                ctl.send(&format!("done {}", polls_words(&polls)))?;
            }
            "stream" => {
                let (_, recv) = pair(comms)?;
                let (size, count, window) = (
                    field(&cmd, 1, "stream size")?,
                    field(&cmd, 2, "stream count")?,
                    field(&cmd, 3, "stream window")?,
                );
                net.stream_recv(recv, size, count, window, &mut polls, || ctl.send("ready"))?;
                ctl.send(&format!("done {}", polls_words(&polls)))?;
            }
            "ar" => {
                let (send, recv) = pair(comms)?;
                let count: usize = field(&cmd, 1, "ar count")?;
                let mut ring = Ring::new(
                    net,
                    field(&cmd, 4, "ar rank")?,
                    field(&cmd, 5, "ar ranks")?,
                    send,
                    recv,
                    count,
                )?;
                let t = ring.run(
                    count,
                    field(&cmd, 2, "ar warmup")?,
                    field(&cmd, 3, "ar iterations")?,
                    &mut polls,
                );
                ring.release()?;
                let t = t?;
                ctl.send(&format!("ar {} {}", t.time_us, t.wrong))?;
            }
            "decode" => {
                let (send, recv) = pair(comms)?;
                let count: usize = field(&cmd, 1, "decode count")?;
                let mut ring = Ring::new(
                    net,
                    field(&cmd, 5, "decode rank")?,
                    field(&cmd, 6, "decode ranks")?,
                    send,
                    recv,
                    count,
                )?;
                let t = ring.decode(
                    count,
                    field(&cmd, 2, "decode all-reduces per step")?,
                    field(&cmd, 3, "decode warmup")?,
                    field(&cmd, 4, "decode steps")?,
                    field::<u8>(&cmd, 7, "decode receives ahead")? != 0,
                    &mut polls,
                );
                ring.release()?;
                let t = t?;
                let steps: Vec<String> = t.step_us.iter().map(|x| x.to_string()).collect();
                ctl.send(&format!("decode {} {}", t.wrong, steps.join(" ")))?;
            }
            "quit" => {
                if let Some((send, recv)) = comms.take() {
                    plugin.close_send(send).map_err(|e| e.to_string())?;
                    plugin.close_recv(recv).map_err(|e| e.to_string())?;
                }
                if let Some(lc) = listen.take() {
                    plugin.close_listen(lc).map_err(|e| e.to_string())?;
                }
                plugin.finalize().map_err(|e| e.to_string())?;
                ctl.send("bye")?;
                return Ok(());
            }
            _ => return Err(format!("unknown command {:?}", cmd.join(" "))),
        }
    }
}

pub fn polls_words(p: &Polls) -> String {
    format!(
        "{} {} {} {}",
        p.null_sends, p.null_recvs, p.tests, p.requests
    )
}

pub fn polls_from_words(w: &[String]) -> Result<Polls, String> {
    Ok(Polls {
        null_sends: field(w, 0, "poll counts")?,
        null_recvs: field(w, 1, "poll counts")?,
        tests: field(w, 2, "poll counts")?,
        requests: field(w, 3, "poll counts")?,
    })
}
