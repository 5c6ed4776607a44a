//! Who listens on a TCP port: `/proc/net/tcp{,6}` for the listening sockets, `/proc/PID/fd`
//! for the processes that hold them (what `ss -ltnp` shows, without needing `ss`).

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};

use crate::sysroot::SysRoot;

/// TCP state code of a listening socket in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

#[derive(Debug, Clone, PartialEq)]
pub struct Socket {
    pub addr: IpAddr,
    pub port: u16,
    pub uid: u32,
    pub inode: u64,
}

/// The listening sockets of one `/proc/net/tcp` or `/proc/net/tcp6` table.
pub fn parse_listeners(table: &str) -> Vec<Socket> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            Some(Socket {
                addr: parse_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address in host byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// A listening socket and, when this user may see it, the process holding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub socket: Socket,
    pub pid: Option<u32>,
    /// `/proc/PID/cmdline`, arguments joined by spaces (shortened).
    pub command: Option<String>,
    pub user: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = match self.socket.addr {
            IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        write!(f, "{addr}:{} is held by ", self.socket.port)?;
        let user = self
            .user
            .clone()
            .unwrap_or_else(|| format!("uid {}", self.socket.uid));
        match (self.pid, &self.command) {
            (Some(pid), Some(cmd)) => write!(f, "pid {pid} ({cmd}, user {user})"),
            (Some(pid), None) => write!(f, "pid {pid} (user {user})"),
            _ => write!(
                f,
                "a process of user {user} that halo cannot see (`sudo ss -ltnp 'sport = :{}'` names it)",
                self.socket.port
            ),
        }
    }
}

/// Every listener on `port` (IPv4 and IPv6), with its process where it can be found.
pub fn holders(root: &SysRoot, port: u16) -> Vec<Holder> {
    let sockets: Vec<Socket> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(root.path(t)).ok())
        .flat_map(|text| parse_listeners(&text))
        .filter(|s| s.port == port)
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let owners = socket_owners(root, &sockets);
    sockets
        .into_iter()
        .map(|socket| {
            let pid = owners
                .iter()
                .find(|(inode, _)| *inode == socket.inode)
                .map(|(_, pid)| *pid);
            Holder {
                command: pid.and_then(|p| command_line(root, p)),
                user: user_name(root, socket.uid),
                pid,
                socket,
            }
        })
        .collect()
}

/// (inode, pid) for every open file descriptor `socket:[inode]` among `sockets`.
fn socket_owners(root: &SysRoot, sockets: &[Socket]) -> Vec<(u64, u32)> {
    let mut found = Vec::new();
    for pid in root.entries("/proc") {
        let Ok(pid_n) = pid.parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(root.path(&format!("/proc/{pid}/fd"))) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if sockets.iter().any(|s| s.inode == inode) && !found.contains(&(inode, pid_n)) {
                found.push((inode, pid_n));
            }
        }
    }
    found
}

fn command_line(root: &SysRoot, pid: u32) -> Option<String> {
    let raw = fs::read(root.path(&format!("/proc/{pid}/cmdline"))).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let line = if words.is_empty() {
        root.read(&format!("/proc/{pid}/comm"))?
    } else {
        words.join(" ")
    };
    Some(if line.chars().count() > 120 {
        format!("{}…", line.chars().take(120).collect::<String>())
    } else {
        line
    })
}

fn user_name(root: &SysRoot, uid: u32) -> Option<String> {
    root.read("/etc/passwd")?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(uid)).then(|| f[0].to_string())
    })
}

/// Why `port` cannot be served on all addresses, or `None` when it is free: binds it as vLLM
/// will (0.0.0.0, SO_REUSEADDR), and on "address in use" names who holds it.
pub fn check_free(port: u16) -> Option<String> {
    match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let held = holders(&SysRoot::new("/"), port);
            Some(if held.is_empty() {
                format!("port {port} is already in use (no listener found in /proc/net/tcp; `ss -tanp 'sport = :{port}'` shows what holds it)")
            } else {
                let list: Vec<String> = held.iter().map(|h| h.to_string()).collect();
                format!("port {port} is already in use: {}", list.join("; "))
            })
        }
        Err(e) => Some(format!("cannot listen on 0.0.0.0:{port}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_of_both_tables() {
        // Two listeners (127.0.0.1:8000 and *:22) and one established connection.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F40 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0000000000000000 100 0 0 10 0
";
        let got = parse_listeners(v4);
        assert_eq!(got.len(), 2);
        if cfg!(target_endian = "little") {
            assert_eq!(got[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        assert_eq!((got[0].port, got[0].uid, got[0].inode), (8000, 1000, 4242));
        assert_eq!((got[1].port, got[1].inode), (22, 17));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
";
        let got = parse_listeners(v6);
        assert_eq!(got[0].addr, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(got[0].port, 8000);
    }

    #[test]
    fn names_the_process_holding_a_real_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let why = check_free(port).expect("the port is taken");
        assert!(
            why.contains(&format!(
                "127.0.0.1:{port} is held by pid {}",
                std::process::id()
            )),
            "{why}"
        );
        drop(listener);
        assert_eq!(check_free(port), None);
    }
}
