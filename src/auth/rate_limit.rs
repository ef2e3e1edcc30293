//! Per-token rate limits that hold across shards.
//!
//! Each token has one [`GlobalBucket`]: a GCRA (generic cell rate algorithm) state, the
//! "theoretical arrival time", in one `AtomicU64`. A shard does not touch it per request: it takes
//! a small batch of admissions at once into its own [`LocalAllowance`] and spends them with no
//! shared write. Every admission therefore comes out of the one bucket, so the shards together can
//! never exceed the rate; a batch a shard does not spend expires after [`ALLOWANCE_TTL`], which
//! bounds how much the others can be short-changed.
//!
//! In a fleet (`auth::fleet`), a replica admits only its share of the rate: the share thread
//! scales the bucket's interval and capacity ([`GlobalBucket::set_share`]) every tick.

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
    /// The configured rate, for the whole fleet.
    limit: RateLimit,
    /// Nanoseconds between admissions at this replica's share of the sustained rate.
    interval_ns: AtomicU64,
    /// How far ahead of now the arrival time may run: the share of `burst` admissions, in ns.
    capacity_ns: AtomicU64,
    /// The theoretical arrival time, in nanoseconds since [`epoch`].
    tat: AtomicU64,
}

impl GlobalBucket {
    pub fn new(limit: RateLimit) -> Self {
        assert!(limit.qps > 0 && limit.qps <= RateLimit::MAX_QPS && limit.burst > 0);
        epoch();
        let bucket = GlobalBucket {
            limit,
            interval_ns: AtomicU64::new(0),
            capacity_ns: AtomicU64::new(0),
            tat: AtomicU64::new(0),
        };
        bucket.set_share(1.0);
        bucket
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Admits `share` (0 < share ≤ 1) of the configured rate and burst from now on: this replica's
    /// part of a fleet's. The burst never falls below one admission.
    pub fn set_share(&self, share: f64) {
        assert!(share > 0.0 && share <= 1.0, "a share is in (0, 1]: {share}");
        let qps = f64::from(self.limit.qps) * share;
        let interval_ns = (1e9 / qps).round().clamp(1.0, u64::MAX as f64 / 4.0) as u64;
        let burst = (f64::from(self.limit.burst) * share).round().max(1.0) as u64;
        // Capacity first: a `take` between the two stores sees the new capacity with the old
        // interval, which admits no more than either setting would alone.
        self.capacity_ns.store(interval_ns.saturating_mul(burst), Ordering::Relaxed);
        self.interval_ns.store(interval_ns, Ordering::Relaxed);
    }

    /// Takes up to `want` admissions. `Ok(n)` with `n ≥ 1`, or `Err(wait)` until one is possible.
    pub fn take(&self, want: u32, now: u64) -> Result<u32, Duration> {
        let interval = self.interval_ns.load(Ordering::Relaxed);
        let capacity = self.capacity_ns.load(Ordering::Relaxed).max(interval);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            let used = start - now;
            let available = capacity.saturating_sub(used) / interval;
            if available == 0 {
                let wait = used + interval - capacity;
                return Err(Duration::from_nanos(wait));
            }
            let n = u64::from(want).min(available);
            match self.tat.compare_exchange_weak(tat, start + n * interval, Ordering::AcqRel, Ordering::Relaxed) {
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
    fn a_share_scales_the_rate_and_the_burst() {
        let b = GlobalBucket::new(RateLimit { qps: 100, burst: 10 });
        b.set_share(0.2);
        let t0 = 1_000_000_000_000;
        // 20 per second, a burst of 2.
        assert_eq!(b.take(10, t0), Ok(2));
        assert_eq!(b.take(1, t0).unwrap_err(), Duration::from_millis(50));
        assert_eq!(b.take(1, t0 + 50_000_000), Ok(1));
        // A tiny share still admits one at a time.
        b.set_share(0.001);
        assert_eq!(b.take(5, t0 + 60_000_000_000), Ok(1));
        b.set_share(1.0);
        assert_eq!(b.take(100, t0 + 120_000_000_000), Ok(10));
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
