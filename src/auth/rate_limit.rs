//! Per-token rate limits that hold across shards.
//!
//! Each token has one [`GlobalBucket`]: a GCRA (generic cell rate algorithm) state, the
//! "theoretical arrival time", in one `AtomicU64`. A shard does not touch it per request: it takes
//! a small batch of admissions at once into its own [`LocalAllowance`] and spends them with no
//! shared write. Every admission therefore comes out of the one bucket, so the shards together can
//! never exceed the rate; a batch a shard does not spend expires after [`ALLOWANCE_TTL`], which
//! bounds how much the others can be short-changed.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A batch a shard took but did not spend is forfeited after this long.
pub const ALLOWANCE_TTL: Duration = Duration::from_millis(50);

/// A rate: `qps` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub qps: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The bucket counts in nanoseconds: one admission per nanosecond is the finest rate.
    pub const MAX_QPS: u32 = 1_000_000_000;
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// One token's bucket, shared by every shard.
#[derive(Debug)]
pub struct GlobalBucket {
    /// Nanoseconds between admissions at the sustained rate.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst` admissions.
    capacity: u64,
    /// The theoretical arrival time, in nanoseconds since [`epoch`].
    tat: AtomicU64,
}

impl GlobalBucket {
    pub fn new(limit: RateLimit) -> Self {
        assert!(limit.qps > 0 && limit.qps <= RateLimit::MAX_QPS && limit.burst > 0);
        let interval = 1_000_000_000 / u64::from(limit.qps);
        epoch();
        GlobalBucket { interval, capacity: interval * u64::from(limit.burst), tat: AtomicU64::new(0) }
    }

    /// Takes up to `want` admissions. `Ok(n)` with `n ≥ 1`, or `Err(wait)` until one is possible.
    pub fn take(&self, want: u32, now: u64) -> Result<u32, Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            let used = start - now;
            let available = self.capacity.saturating_sub(used) / self.interval;
            if available == 0 {
                let wait = used + self.interval - self.capacity;
                return Err(Duration::from_nanos(wait));
            }
            let n = u64::from(want).min(available);
            match self.tat.compare_exchange_weak(tat, start + n * self.interval, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(n as u32),
                Err(current) => tat = current,
            }
        }
    }
}

/// A shard's unspent admissions for one token.
#[derive(Debug, Default)]
pub struct LocalAllowance {
    left: Cell<u32>,
    expires: Cell<u64>,
}

impl LocalAllowance {
    /// Admits one request, refilling from `bucket` in batches of `batch`. `Err(wait)` when the
    /// token is over its rate.
    pub fn admit(&self, bucket: &GlobalBucket, batch: u32) -> Result<(), Duration> {
        let now = now_nanos();
        if self.left.get() > 0 && now < self.expires.get() {
            self.left.set(self.left.get() - 1);
            return Ok(());
        }
        let got = bucket.take(batch.max(1), now)?;
        self.left.set(got - 1);
        self.expires.set(now + ALLOWANCE_TTL.as_nanos() as u64);
        Ok(())
    }
}

/// The batch a shard takes: about 2% of a second's admissions split over the shards, so that
/// what shards hold unspent stays far inside the ±10% the limit promises.
pub fn batch_size(limit: RateLimit, shards: usize) -> u32 {
    (limit.qps / 50 / shards.max(1) as u32).clamp(1, (limit.burst / shards.max(1) as u32).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_burst_then_rate() {
        let b = GlobalBucket::new(RateLimit { qps: 10, burst: 5 });
        let t0 = 1_000_000_000_000;
        assert_eq!(b.take(3, t0), Ok(3));
        assert_eq!(b.take(3, t0), Ok(2));
        let wait = b.take(1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(b.take(1, t0 + 100_000_000), Ok(1));
        assert!(b.take(1, t0 + 100_000_000).is_err());
        // After a long idle time only the burst is available, not the idle time's worth.
        assert_eq!(b.take(100, t0 + 60_000_000_000), Ok(5));
    }

    #[test]
    fn local_allowance_spends_a_batch_without_the_bucket() {
        let b = GlobalBucket::new(RateLimit { qps: 1000, burst: 10 });
        let local = LocalAllowance::default();
        for _ in 0..10 {
            assert!(local.admit(&b, 5).is_ok());
        }
        assert!(local.admit(&b, 5).is_err());
        assert_eq!(batch_size(RateLimit { qps: 100, burst: 200 }, 2), 1);
        assert_eq!(batch_size(RateLimit { qps: 100_000, burst: 200 }, 2), 100);
        assert_eq!(batch_size(RateLimit { qps: 100_000, burst: 20 }, 4), 5);
    }
}
