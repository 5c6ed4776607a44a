//! What a comm says about itself when it closes: with `HALO_STATS=1` one INFO line with every
//! counter and the per-message ratios; without it only the eager path's line, when that path
//! was used (it is opt-in, so its use is worth a line).

use crate::log::{info, NET};
use crate::protocol::Counters;
use std::fmt::{self, Display};

/// What the comm counts itself (the protocol core counts the rest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommCounters {
    /// `test` calls on the comm's requests.
    pub tests: u64,
    /// `isend`/`irecv` calls that returned a NULL request (not ready).
    pub nulls: u64,
    /// Fruitless receive `test`s that slept (`HALO_RECV_NAP_US`).
    pub naps: u64,
}

/// Which end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Send,
    Recv,
}

/// `a / msgs` with two decimals, `-` when no message completed.
struct Ratio(u64, u64);

impl Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            0 => f.write_str("-"),
            m => write!(f, "{:.2}", self.0 as f64 / m as f64),
        }
    }
}

/// The close line of a comm with `HALO_STATS=1` (without the logger's prefix).
pub fn stats_line(side: Side, peer: impl Display, c: &Counters, own: &CommCounters) -> String {
    let m = c.msgs;
    let common = format!(
        "msgs={m} bytes={} bytes/msg={} wrs={} wr/msg={} cqes={} cqe/msg={} tests={} tests/msg={} nulls={} nulls/msg={}",
        c.bytes,
        Ratio(c.bytes, m),
        c.wrs,
        Ratio(c.wrs, m),
        c.cqes(),
        Ratio(c.cqes(), m),
        own.tests,
        Ratio(own.tests, m),
        own.nulls,
        Ratio(own.nulls, m),
    );
    match side {
        Side::Send => format!(
            "stats: send comm to {peer} closed: {common} (transmit={} eager={} landed={}) cts_waits={} eager_sent={} eager_accepted={} eager_carried={}",
            c.cqe_transmit, c.cqe_eager, c.cqe_landed, c.cts_waits, c.eager_sent, c.eager_accepted,
            c.eager_carried
        ),
        Side::Recv => format!(
            "stats: receive comm from {peer} closed: {common} (cts={} imm={}) eager_taken={} eager_dma={} eager_dropped={} naps={}",
            c.cqe_cts, c.cqe_imm, c.eager_taken, c.eager_dma, c.eager_dropped, own.naps
        ),
    }
}

/// Logs what a closing comm has to say (see the module documentation).
pub fn log_close(stats: bool, side: Side, peer: impl Display, c: &Counters, own: &CommCounters) {
    if stats {
        info!(NET, "{}", stats_line(side, peer, c, own));
        return;
    }
    match side {
        Side::Send if c.eager_sent > 0 => info!(
            NET,
            "send comm to {peer} closed: {} eager sends, {} of them taken by a later receive",
            c.eager_sent,
            c.eager_carried
        ),
        Side::Recv if c.eager_taken + c.eager_dropped > 0 => info!(
            NET,
            "receive comm from {peer} closed: {} eager messages taken ({} copied by the NIC), {} too large for their receive",
            c.eager_taken,
            c.eager_dma,
            c.eager_dropped
        ),
        _ => {}
    }
}

#[cfg(all(
    test,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod tests {
    use super::*;
    use crate::log::capture::{install, take};

    fn sample() -> (Counters, CommCounters) {
        let c = Counters {
            msgs: 4,
            bytes: 4096,
            wrs: 6,
            cqe_transmit: 4,
            cqe_eager: 1,
            cts_waits: 3,
            eager_sent: 1,
            eager_carried: 1,
            ..Counters::default()
        };
        (
            c,
            CommCounters {
                tests: 10,
                nulls: 2,
                naps: 0,
            },
        )
    }

    #[test]
    fn stats_line_of_a_send_comm() {
        let _log = install();
        let (c, own) = sample();
        log_close(true, Side::Send, "10.0.0.2:4000", &c, &own);
        let got = take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].level, crate::log::INFO);
        assert_eq!(
            got[0].text,
            "NET/halo : stats: send comm to 10.0.0.2:4000 closed: msgs=4 bytes=4096 bytes/msg=1024.00 \
             wrs=6 wr/msg=1.50 cqes=5 cqe/msg=1.25 tests=10 tests/msg=2.50 nulls=2 nulls/msg=0.50 \
             (transmit=4 eager=1 landed=0) cts_waits=3 eager_sent=1 eager_accepted=0 eager_carried=1"
        );
    }

    #[test]
    fn stats_line_of_a_receive_comm_without_messages() {
        let _log = install();
        let c = Counters {
            wrs: 2,
            cqe_cts: 1,
            ..Counters::default()
        };
        log_close(
            true,
            Side::Recv,
            "peer",
            &c,
            &CommCounters {
                tests: 3,
                nulls: 0,
                naps: 5,
            },
        );
        let got = take();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].text,
            "NET/halo : stats: receive comm from peer closed: msgs=0 bytes=0 bytes/msg=- wrs=2 \
             wr/msg=- cqes=1 cqe/msg=- tests=3 tests/msg=- nulls=0 nulls/msg=- (cts=1 imm=0) \
             eager_taken=0 eager_dma=0 eager_dropped=0 naps=5"
        );
    }

    #[test]
    fn without_stats_only_the_eager_path_speaks() {
        let _log = install();
        let (c, own) = sample();
        log_close(false, Side::Send, "p", &c, &own);
        log_close(false, Side::Send, "p", &Counters::default(), &own);
        let recv = Counters {
            eager_taken: 2,
            eager_dma: 1,
            eager_dropped: 1,
            ..Counters::default()
        };
        log_close(false, Side::Recv, "p", &recv, &own);
        log_close(false, Side::Recv, "p", &Counters::default(), &own);
        let got: Vec<_> = take().into_iter().map(|m| m.text).collect();
        assert_eq!(
            got,
            [
                "NET/halo : send comm to p closed: 1 eager sends, 1 of them taken by a later receive",
                "NET/halo : receive comm from p closed: 2 eager messages taken (1 copied by the NIC), \
                 1 too large for their receive",
            ]
        );
    }
}
