//! Out-of-band TCP bootstrap: how two plugin instances find each other and swap the
//! connection metadata their queue pairs need.
//!
//! `listen` binds an [`OobListener`] and writes a [`ListenHandle`] into RCCL's 128-byte handle;
//! RCCL carries the handle to the peer, whose `connect` starts an [`OobConnector`] to the
//! address inside. Both sides then exchange a [`ConnInfo`] as framed messages over an
//! [`OobStream`]. Everything here is non-blocking: connect and accept run on RCCL's proxy
//! service thread and are called again and again until they report a comm, so every call
//! does what it can right now and returns.

mod addr;
mod conn_info;
mod handle;
mod socket;
mod stream;
mod wire;

#[cfg(test)]
mod loopback_tests;

pub use addr::{interface_addresses, pick_bind_address};
pub use conn_info::{ConnInfo, QpInfo, CONN_INFO_MAGIC, CONN_INFO_VERSION, HELLO_LEN, MAX_QPS};
pub use handle::{
    HandleError, ListenHandle, HANDLE_MAGIC, HANDLE_SIZE, HANDLE_USED, HANDLE_VERSION,
};
pub use socket::{OobConnector, OobListener};
pub use stream::{OobStream, MAX_FRAME};

use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;

/// A failure of the bootstrap; the text names the peer (or local) address it concerns and,
/// where one exists, what the user can do about it.
#[derive(Debug)]
pub enum OobError {
    /// A socket call failed. `op` reads naturally before the address, e.g. "connect to".
    Io {
        op: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    /// The peer did not do its part within the connect timeout.
    Timeout {
        addr: SocketAddr,
        ms: u64,
        waiting_for: &'static str,
    },
    /// The peer closed the connection (`mid_frame`: in the middle of a message).
    PeerClosed { addr: SocketAddr, mid_frame: bool },
    /// A message over [`MAX_FRAME`] bytes was offered for sending or announced by the peer.
    FrameTooLarge {
        addr: SocketAddr,
        len: u64,
        max: usize,
    },
    /// The peer sent bytes that do not decode as `what`.
    BadPeerData {
        addr: SocketAddr,
        what: &'static str,
        source: HandleError,
    },
    /// The peer's messages decode but make no sense together (e.g. a wrong nonce).
    Protocol { addr: SocketAddr, reason: String },
    /// No local address qualifies for the listening socket.
    NoBindAddress { tried: String },
    /// The interface list could not be read.
    Interfaces(io::Error),
}

impl fmt::Display for OobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OobError::Io { op, addr, source } => {
                write!(f, "bootstrap: {op} {addr} failed: {source}")?;
                match source.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        f.write_str(" (nothing listens there: has the peer process exited?)")
                    }
                    io::ErrorKind::AddrNotAvailable => {
                        f.write_str(" (address not present on this host: check NCCL_SOCKET_IFNAME)")
                    }
                    _ => Ok(()),
                }
            }
            OobError::Timeout {
                addr,
                ms,
                waiting_for,
            } => write!(
                f,
                "bootstrap: no answer from {addr} after {ms} ms while waiting for {waiting_for} \
                 (is the peer alive and reachable? HALO_CONNECT_TIMEOUT_MS sets the limit)"
            ),
            OobError::PeerClosed { addr, mid_frame } => {
                write!(f, "bootstrap: {addr} closed the connection")?;
                if *mid_frame {
                    f.write_str(" in the middle of a message")?;
                }
                f.write_str(" (did the peer process fail? see its log)")
            }
            OobError::FrameTooLarge { addr, len, max } => write!(
                f,
                "bootstrap: message of {len} bytes exchanged with {addr} exceeds the \
                 {max}-byte limit (is the peer a different program or plugin version?)"
            ),
            OobError::BadPeerData { addr, what, source } => write!(
                f,
                "bootstrap: {addr} sent invalid {what}: {source} \
                 (are both sides running the same plugin version?)"
            ),
            OobError::Protocol { addr, reason } => {
                write!(f, "bootstrap: protocol error with {addr}: {reason}")
            }
            OobError::NoBindAddress { tried } => {
                write!(f, "bootstrap: no local address to listen on: {tried}")
            }
            OobError::Interfaces(e) => {
                write!(f, "bootstrap: listing network interfaces failed: {e}")
            }
        }
    }
}

impl std::error::Error for OobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OobError::Io { source, .. } => Some(source),
            OobError::BadPeerData { source, .. } => Some(source),
            OobError::Interfaces(e) => Some(e),
            _ => None,
        }
    }
}

/// A random 64-bit value from the kernel (for connection nonces and initial PSNs).
pub fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n >= 0 {
            filled += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        // Kernels before 3.17 (or seccomp filters) lack the system call.
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        break;
    }
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_differ() {
        let a = random_u64().unwrap();
        let b = random_u64().unwrap();
        let c = random_u64().unwrap();
        // Three equal draws from 2^64 would mean the source is broken.
        assert!(!(a == b && b == c));
    }

    #[test]
    fn error_texts_name_the_peer_and_a_remedy() {
        let addr: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let e = OobError::Io {
            op: "connect to",
            addr,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let t = e.to_string();
        assert!(
            t.contains("connect to 10.0.0.2:4000 failed") && t.contains("exited"),
            "{t}"
        );
        let e = OobError::Timeout {
            addr,
            ms: 60000,
            waiting_for: "a message",
        };
        let t = e.to_string();
        assert!(
            t.contains("no answer from 10.0.0.2:4000 after 60000 ms")
                && t.contains("HALO_CONNECT_TIMEOUT_MS"),
            "{t}"
        );
        let e = OobError::PeerClosed {
            addr,
            mid_frame: true,
        };
        assert!(e
            .to_string()
            .contains("10.0.0.2:4000 closed the connection in the middle"));
        let e = OobError::BadPeerData {
            addr,
            what: "connection metadata",
            source: HandleError::BadMagic,
        };
        assert!(e
            .to_string()
            .contains("10.0.0.2:4000 sent invalid connection metadata"));
    }
}
