//! Non-blocking listen/accept and connect for the bootstrap.

use super::{OobError, OobStream};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Pending connections the kernel holds for us between two `poll_accept` calls.
const BACKLOG: i32 = 128;

/// The receiving side's listening socket.
#[derive(Debug)]
pub struct OobListener {
    sock: Socket,
    local: SocketAddr,
}

impl OobListener {
    /// Listens on an ephemeral port of `ip`; returns the listener and the address to put
    /// into the listen handle.
    pub fn bind(ip: IpAddr) -> Result<(Self, SocketAddr), OobError> {
        Self::bind_with_backlog(ip, BACKLOG)
    }

    pub(super) fn bind_with_backlog(
        ip: IpAddr,
        backlog: i32,
    ) -> Result<(Self, SocketAddr), OobError> {
        let want = SocketAddr::new(ip, 0);
        let io_err = |op, source| OobError::Io {
            op,
            addr: want,
            source,
        };
        let sock = Socket::new(Domain::for_address(want), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| io_err("create a socket for", e))?;
        // Lets a restarted job reuse an address whose old connections sit in TIME_WAIT.
        sock.set_reuse_address(true)
            .map_err(|e| io_err("set SO_REUSEADDR for", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io_err("make non-blocking the socket for", e))?;
        sock.bind(&want.into()).map_err(|e| io_err("bind to", e))?;
        sock.listen(backlog).map_err(|e| io_err("listen on", e))?;
        let local = sock
            .local_addr()
            .map_err(|e| io_err("read the local address of", e))?
            .as_socket()
            .ok_or_else(|| {
                io_err(
                    "read the local address of",
                    io::ErrorKind::InvalidData.into(),
                )
            })?;
        Ok((OobListener { sock, local }, local))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Takes one pending connection, if any.
    pub fn poll_accept(&self) -> Result<Option<OobStream>, OobError> {
        loop {
            match self.sock.accept() {
                Ok((sock, peer)) => {
                    let Some(peer) = peer.as_socket() else {
                        return Err(OobError::Io {
                            op: "accept an IP connection on",
                            addr: self.local,
                            source: io::ErrorKind::InvalidData.into(),
                        });
                    };
                    return OobStream::new(sock, peer).map(Some);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A connection reset before we took it: the next call takes the next one.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    return Ok(None)
                }
                Err(source) => {
                    return Err(OobError::Io {
                        op: "accept a connection on",
                        addr: self.local,
                        source,
                    })
                }
            }
        }
    }
}

/// A TCP connect in progress.
#[derive(Debug)]
pub struct OobConnector {
    /// `None` once the connection has been handed out.
    sock: Option<Socket>,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
}

impl OobConnector {
    /// Starts connecting to `addr`; [`poll`](Self::poll) reports the outcome, or a timeout
    /// once `timeout` has passed without one.
    pub fn start(addr: SocketAddr, timeout: Duration) -> Result<Self, OobError> {
        let io_err = |op, source| OobError::Io { op, addr, source };
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| io_err("create a socket to connect to", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io_err("make non-blocking the socket to", e))?;
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(io_err("connect to", e)),
        }
        Ok(OobConnector {
            sock: Some(sock),
            addr,
            deadline: Instant::now() + timeout,
            timeout,
        })
    }

    /// The address being connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The stream once the connection is established; `None` while it is still in progress.
    /// After it has returned the stream, further calls are an error.
    pub fn poll(&mut self) -> Result<Option<OobStream>, OobError> {
        let addr = self.addr;
        let io_err = |source| OobError::Io {
            op: "connect to",
            addr,
            source,
        };
        let Some(sock) = self.sock.as_ref() else {
            return Err(OobError::Protocol {
                addr,
                reason: "connection already handed out".into(),
            });
        };
        // A failed connect leaves its errno in SO_ERROR; an established one has a peer.
        match sock.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Err(io_err(e)),
        }
        match sock.peer_addr() {
            Ok(_) => {
                let sock = self.sock.take().expect("checked above");
                OobStream::new(sock, addr).map(Some)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                if Instant::now() >= self.deadline {
                    Err(OobError::Timeout {
                        addr,
                        ms: self.timeout.as_millis() as u64,
                        waiting_for: "the TCP connection to be accepted",
                    })
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(io_err(e)),
        }
    }
}
