//! Length-prefixed messages over a non-blocking TCP socket.
//!
//! A frame is a little-endian u32 length followed by that many bytes. Reads and writes stop
//! at `EAGAIN` and resume on the next poll from where they stopped.

use super::OobError;
use socket2::Socket;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest message either side may send; bootstrap messages are a few hundred bytes.
pub const MAX_FRAME: usize = 64 * 1024;

const HEADER: usize = 4;

/// One end of a bootstrap connection.
#[derive(Debug)]
pub struct OobStream {
    sock: Socket,
    peer: SocketAddr,
    /// Framed bytes not yet accepted by the kernel, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    header: [u8; HEADER],
    header_len: usize,
    /// The payload of the frame being received, once its header is complete.
    payload: Option<Vec<u8>>,
    payload_len: usize,
    deadline: Option<(Instant, Duration)>,
}

impl OobStream {
    /// Wraps a connected socket; makes it non-blocking and turns Nagle off, since every
    /// message is waited for by the peer.
    pub(super) fn new(sock: Socket, peer: SocketAddr) -> Result<Self, OobError> {
        let io_err = |source| OobError::Io {
            op: "set up the connection with",
            addr: peer,
            source,
        };
        sock.set_nonblocking(true).map_err(io_err)?;
        sock.set_tcp_nodelay(true).map_err(io_err)?;
        Ok(OobStream {
            sock,
            peer,
            out: Vec::new(),
            out_pos: 0,
            header: [0; HEADER],
            header_len: 0,
            payload: None,
            payload_len: 0,
            deadline: None,
        })
    }

    /// The address of the other end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Turns Nagle's algorithm off (`true`, the default) or on.
    pub fn set_nodelay(&self, nodelay: bool) -> Result<(), OobError> {
        self.sock
            .set_tcp_nodelay(nodelay)
            .map_err(|source| OobError::Io {
                op: "set TCP_NODELAY on the connection with",
                addr: self.peer,
                source,
            })
    }

    /// From now on, a `poll_recv` or `poll_flush` that still has to wait after `timeout`
    /// has passed fails with [`OobError::Timeout`]; `None` waits forever.
    pub fn set_deadline(&mut self, timeout: Option<Duration>) {
        self.deadline = timeout.map(|t| (Instant::now() + t, t));
    }

    /// Appends one message to the send queue; [`poll_flush`](Self::poll_flush) sends it.
    pub fn queue_send(&mut self, msg: &[u8]) -> Result<(), OobError> {
        if msg.len() > MAX_FRAME {
            return Err(OobError::FrameTooLarge {
                addr: self.peer,
                len: msg.len() as u64,
                max: MAX_FRAME,
            });
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out
            .extend_from_slice(&(msg.len() as u32).to_le_bytes());
        self.out.extend_from_slice(msg);
        Ok(())
    }

    /// Sends as much of the queue as the socket takes now; `true` once all of it is sent.
    pub fn poll_flush(&mut self) -> Result<bool, OobError> {
        while self.out_pos < self.out.len() {
            // MSG_NOSIGNAL: a peer that went away must give EPIPE, not kill the host process.
            match self
                .sock
                .send_with_flags(&self.out[self.out_pos..], libc::MSG_NOSIGNAL)
            {
                Ok(0) => return self.not_yet("the send to drain").map(|()| false),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.not_yet("the send to drain").map(|()| false);
                }
                Err(source) => {
                    return Err(OobError::Io {
                        op: "send to",
                        addr: self.peer,
                        source,
                    })
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// Returns the next complete message if one has arrived.
    pub fn poll_recv(&mut self) -> Result<Option<Vec<u8>>, OobError> {
        loop {
            let (buf, filled) = match self.payload.as_mut() {
                Some(p) if self.payload_len == p.len() => {
                    let msg = self.payload.take();
                    self.header_len = 0;
                    self.payload_len = 0;
                    return Ok(msg);
                }
                Some(p) => (&mut p[..], &mut self.payload_len),
                None => (&mut self.header[..], &mut self.header_len),
            };
            // Read only up to the end of the current part, so a following frame stays in
            // the kernel's buffer until it is asked for.
            match (&self.sock).read(&mut buf[*filled..]) {
                Ok(0) => {
                    return Err(OobError::PeerClosed {
                        addr: self.peer,
                        mid_frame: self.header_len > 0,
                    })
                }
                Ok(n) => *filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.not_yet("a message").map(|()| None);
                }
                Err(source) => {
                    return Err(OobError::Io {
                        op: "receive from",
                        addr: self.peer,
                        source,
                    })
                }
            }
            if self.payload.is_none() && self.header_len == HEADER {
                let len = u32::from_le_bytes(self.header) as usize;
                if len > MAX_FRAME {
                    return Err(OobError::FrameTooLarge {
                        addr: self.peer,
                        len: len as u64,
                        max: MAX_FRAME,
                    });
                }
                self.payload = Some(vec![0; len]);
            }
        }
    }

    /// The caller has to wait: fine unless the deadline has passed.
    fn not_yet(&self, waiting_for: &'static str) -> Result<(), OobError> {
        match self.deadline {
            Some((at, timeout)) if Instant::now() >= at => Err(OobError::Timeout {
                addr: self.peer,
                ms: timeout.as_millis() as u64,
                waiting_for,
            }),
            _ => Ok(()),
        }
    }
}
