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
    /// This replica's share of it, in (0, 1], as `f64` bits: one word, so that a `take` never
    /// sees the interval of one share with the burst of another.
    share: AtomicU64,
    /// The theoretical arrival time, in nanoseconds since [`epoch`].
    tat: AtomicU64,
}

/// The longest interval between admissions a share may make: one an hour. A share so small that
/// it asks for less is a replica told to admit nearly nothing; an hour keeps the arithmetic far
/// from overflow.
const MAX_INTERVAL_NS: f64 = 3_600e9;

impl GlobalBucket {
    pub fn new(limit: RateLimit) -> Self {
        assert!(limit.qps > 0 && limit.qps <= RateLimit::MAX_QPS && limit.burst > 0);
        epoch();
        GlobalBucket { limit, share: AtomicU64::new(1.0f64.to_bits()), tat: AtomicU64::new(0) }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Admits `share` (0 < share ≤ 1) of the configured rate and burst from now on: this replica's
    /// part of a fleet's. The burst never falls below one admission.
    pub fn set_share(&self, share: f64) {
        assert!(share > 0.0 && share <= 1.0, "a share is in (0, 1]: {share}");
        self.share.store(share.to_bits(), Ordering::Relaxed);
        // A share that grew back must not keep the arrival time where a smaller one pushed it (an
        // admission at a share of a millionth books a long interval): no further ahead than a
        // full burst of the new share, the furthest any run of admissions at it can leave it, so
        // that at an unchanged share (every tick sets it again) this changes nothing.
        let (_, capacity) = self.setting(share);
        self.tat.fetch_min(now_nanos().saturating_add(capacity), Ordering::AcqRel);
    }

    /// The interval between admissions and the capacity (the burst's worth of intervals), in ns,
    /// at `share`.
    fn setting(&self, share: f64) -> (u64, u64) {
        let qps = f64::from(self.limit.qps) * share;
        let interval = (1e9 / qps).round().clamp(1.0, MAX_INTERVAL_NS) as u64;
        let burst = (f64::from(self.limit.burst) * share).round().max(1.0) as u64;
        (interval, interval.saturating_mul(burst))
    }

    /// Takes up to `want` admissions. `Ok(n)` with `n ≥ 1`, or `Err(wait)` until one is possible.
    pub fn take(&self, want: u32, now: u64) -> Result<u32, Duration> {
        let (interval, capacity) = self.setting(f64::from_bits(self.share.load(Ordering::Relaxed)));
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
    fn a_share_that_grows_back_frees_what_a_tiny_one_booked() {
        let b = GlobalBucket::new(RateLimit { qps: 100, burst: 10 });
        b.set_share(1e-9);
        // One admission at a share of a billionth books an hour ahead.
        let now = now_nanos();
        assert_eq!(b.take(1, now), Ok(1));
        assert!(b.take(1, now).unwrap_err() > Duration::from_secs(3000));
        b.set_share(1.0);
        // At most one interval of the new share (10 ms) away, not the hour.
        let now = now_nanos();
        let wait = b.take(1, now).map_or_else(|wait| wait, |_| Duration::ZERO);
        assert!(wait <= Duration::from_millis(10), "still locked out after the share grew back: {wait:?}");
        assert_eq!(b.take(1, now + 10_000_000), Ok(1));
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
