//! When a streaming receive's `test` keeps finding nothing, give the CPU away for a moment. On a
//! software RDMA device (Soft-RoCE, siw) the "NIC" is the kernel: its packet work runs on the
//! same CPUs as the caller's polling loop, and a loop that never sleeps takes those CPUs from it.
//! A receive comm streams while at least [`STREAMING_BYTES`] of receive buffers are posted on it
//! (RCCL's Simple protocol posts 512 KiB and more per step, its LL protocol of small messages 64
//! KiB): after `spin` of fruitless polls, each further fruitless poll sleeps `nap`; any
//! completion ends it. A sleep costs its wake-up (about 110 us more than asked in a Soft-RoCE
//! guest), which a stream of large messages hides and a small message's latency would not.
//! The logic here only decides; the receive comm sleeps.

use std::time::{Duration, Instant};

/// Receive buffers posted on a comm from which its fruitless polls may nap.
pub const STREAMING_BYTES: u64 = 1 << 20;

/// Fruitless polls between two looks at the clock while spinning.
const CLOCK_EVERY: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NapConfig {
    /// How long a receive spins on fruitless polls before it naps.
    pub spin: Duration,
    /// Each nap (zero: never nap).
    pub nap: Duration,
}

impl NapConfig {
    pub const OFF: NapConfig = NapConfig {
        spin: Duration::ZERO,
        nap: Duration::ZERO,
    };
}

/// One receive comm's state: spinning since when, or napping.
#[derive(Debug)]
pub struct Napper {
    cfg: NapConfig,
    /// First fruitless poll the clock saw since the last completion.
    since: Option<Instant>,
    idle: u32,
    napping: bool,
}

impl Napper {
    pub fn new(cfg: NapConfig) -> Self {
        Napper {
            cfg,
            since: None,
            idle: 0,
            napping: false,
        }
    }

    /// A poll found completions: spin again from the next fruitless one.
    #[inline]
    pub fn progress(&mut self) {
        if self.idle != 0 || self.napping || self.since.is_some() {
            *self = Napper::new(self.cfg);
        }
    }

    /// A poll found nothing with `posted` bytes of receive buffers posted: how long to sleep
    /// now, if at all.
    #[inline]
    pub fn idle(&mut self, posted: u64) -> Option<Duration> {
        if self.cfg.nap.is_zero() || posted < STREAMING_BYTES {
            return None;
        }
        if self.napping {
            return Some(self.cfg.nap);
        }
        self.idle = self.idle.wrapping_add(1);
        if self.idle % CLOCK_EVERY != 1 {
            return None;
        }
        self.idle_at(Instant::now())
    }

    /// [`Self::idle`] at a look at the clock reading `now`.
    fn idle_at(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.cfg.spin {
            self.napping = true;
            return Some(self.cfg.nap);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(spin_us: u64, nap_us: u64) -> NapConfig {
        NapConfig {
            spin: Duration::from_micros(spin_us),
            nap: Duration::from_micros(nap_us),
        }
    }

    #[test]
    fn off_never_naps() {
        let mut n = Napper::new(NapConfig::OFF);
        for _ in 0..10_000 {
            assert_eq!(n.idle(64 << 20), None);
        }
    }

    #[test]
    fn only_a_streaming_comm_naps() {
        let mut n = Napper::new(cfg(0, 5));
        assert_eq!(n.idle(STREAMING_BYTES - 1), None);
        assert_eq!(n.idle(0), None);
        assert_eq!(n.idle(STREAMING_BYTES), Some(Duration::from_micros(5)));
        // Napping ends when the posted buffers fall below the mark, until they are back.
        assert_eq!(n.idle(64 << 10), None);
        assert_eq!(n.idle(4 << 20), Some(Duration::from_micros(5)));
    }

    #[test]
    fn naps_only_after_spinning_and_until_progress() {
        let mut n = Napper::new(cfg(1000, 20));
        let t0 = Instant::now();
        assert_eq!(n.idle_at(t0), None);
        assert_eq!(n.idle_at(t0 + Duration::from_micros(999)), None);
        assert_eq!(
            n.idle_at(t0 + Duration::from_micros(1000)),
            Some(Duration::from_micros(20))
        );
        // Napping: every fruitless poll sleeps, without a look at the clock.
        assert_eq!(n.idle(STREAMING_BYTES), Some(Duration::from_micros(20)));
        n.progress();
        assert!(!n.napping && n.since.is_none() && n.idle == 0);
        // The spin starts over at the next fruitless poll the clock sees.
        let t1 = t0 + Duration::from_millis(5);
        assert_eq!(n.idle_at(t1), None);
        assert_eq!(n.idle_at(t1 + Duration::from_micros(500)), None);
    }

    #[test]
    fn the_clock_is_read_once_per_batch_of_polls() {
        // A spin of zero naps at the first look at the clock, which is the first fruitless poll;
        // with a long spin, polls between looks never nap.
        let mut n = Napper::new(cfg(0, 5));
        assert_eq!(n.idle(STREAMING_BYTES), Some(Duration::from_micros(5)));
        let mut n = Napper::new(cfg(60_000_000, 5));
        for _ in 0..1000 {
            assert_eq!(n.idle(STREAMING_BYTES), None);
        }
        assert_eq!(n.idle, 1000);
        assert!(n.since.is_some());
    }
}
