//! What one shard remembers of refused callers, so that refusals cost the refused, not everyone:
//!
//! - a GCRA bucket per source address for requests that fail authentication: past
//!   `--unauthenticated-rate-limit-qps` (on this shard) they get 429
//!   `unauthenticated_rate_limited` instead of 401. It saves no work (the token was checked),
//!   but tells a client that retries a bad token to slow down, and lets its refusals be counted
//!   apart;
//! - the coalescing of repeated refusals in the audit log: of the 401s and 429s with the same
//!   source (or token) and kind, at most one is recorded per [`WINDOW`]. The next record of that
//!   source and kind, or a summary written when its window ends, carries how many were left out
//!   (`"repeated"`). A `wrk` client hammering with a bad token thus writes a record a second, not
//!   27 MB/s of them.
//!
//! The table is bounded (`--max-refusal-sources` entries per shard): a new source past it evicts
//! the oldest, whose left-out count is then written as a summary like any other. IPv6 sources are
//! keyed by their /64, since one host is usually handed a whole /64.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::RateLimit;

/// At most one audit record per source (or token) and kind in this long.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Who was refused: an address for a failed authentication, a token for its rate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    Source(IpAddr),
    Token(Rc<str>),
}

impl Refused {
    /// The key of a source address: the address itself for IPv4, its /64 for IPv6.
    pub fn source(ip: IpAddr) -> Refused {
        match ip {
            IpAddr::V4(_) => Refused::Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Refused::Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Refused::Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// A summary of refusals left out of the audit log, to be written as one record.
#[derive(Debug, PartialEq, Eq)]
pub struct LeftOut {
    pub who: Refused,
    /// The `ApiError` kind of the refusals.
    pub kind: &'static str,
    pub count: u64,
}

/// Whether a refusal is recorded, and with how many left out before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Record { repeated: u64 },
    LeaveOut,
}

#[derive(Debug)]
struct Entry {
    /// GCRA's theoretical arrival time of the source's next unauthenticated request.
    tat: Instant,
    /// Per kind: when its window began, and how many were left out since.
    windows: Vec<(&'static str, Instant, u64)>,
}

impl Entry {
    fn is_hot(&self, now: Instant) -> bool {
        self.tat > now
            || self.windows.iter().any(|(_, began, left_out)| *left_out > 0 || now.duration_since(*began) < WINDOW)
    }
}

/// How many hot entries eviction passes over before it forgets one anyway.
const EVICTION_TRIES: usize = 8;

pub struct Refusals {
    /// Nanoseconds between unauthenticated requests of one source at this shard's share of the
    /// rate, and how many may come at once; `None`: unlimited.
    limit: Option<(Duration, Duration)>,
    max_entries: usize,
    table: RefCell<HashMap<Refused, Entry>>,
    /// Keys in the order they were added, for eviction; may hold keys already removed.
    order: RefCell<VecDeque<Refused>>,
    /// Left-out counts of evicted entries, written at the next [`Refusals::ended`].
    evicted: RefCell<Vec<LeftOut>>,
}

impl Refusals {
    /// `limit` is a source's rate on this shard. Each shard enforces all of it on its own: a
    /// connection stays on one shard, so a split would leave a single-connection client a
    /// `1/shards` share, and a refusal costs about what a 401 does.
    pub fn new(limit: Option<RateLimit>, max_entries: usize) -> Refusals {
        assert!(max_entries > 0);
        let limit = limit.map(|l| {
            let interval = Duration::from_nanos(1_000_000_000 / u64::from(l.qps));
            (interval, interval * l.burst)
        });
        Refusals {
            limit,
            max_entries,
            table: RefCell::default(),
            order: RefCell::default(),
            evicted: RefCell::default(),
        }
    }

    /// Charges a request from `ip` that failed authentication. `Err(wait)` when the source is
    /// over its rate.
    pub fn charge_unauthenticated(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some((interval, capacity)) = self.limit else { return Ok(()) };
        self.with_entry(Refused::source(ip), now, |entry| {
            let tat = entry.tat.max(now);
            let ahead = tat - now;
            if ahead + interval > capacity {
                return Err((ahead + interval).saturating_sub(capacity));
            }
            entry.tat = tat + interval;
            Ok(())
        })
    }

    /// Whether a refusal of `who` with `kind` is recorded now, or left out and counted.
    pub fn audit(&self, who: Refused, kind: &'static str, now: Instant) -> Verdict {
        self.with_entry(who, now, |entry| match entry.windows.iter_mut().find(|(k, ..)| *k == kind) {
            Some((_, began, left_out)) if now.duration_since(*began) < WINDOW => {
                *left_out += 1;
                Verdict::LeaveOut
            }
            Some((_, began, left_out)) => {
                *began = now;
                Verdict::Record { repeated: std::mem::take(left_out) }
            }
            None => {
                entry.windows.push((kind, now, 0));
                Verdict::Record { repeated: 0 }
            }
        })
    }

    /// The left-out counts of windows that have ended (and of evicted entries), to be written as
    /// summaries; forgets sources that have nothing left to remember.
    pub fn ended(&self, now: Instant) -> Vec<LeftOut> {
        let mut out = std::mem::take(&mut *self.evicted.borrow_mut());
        let mut table = self.table.borrow_mut();
        table.retain(|who, entry| {
            entry.windows.retain_mut(|(kind, began, left_out)| {
                if now.duration_since(*began) < WINDOW {
                    return true;
                }
                if *left_out > 0 {
                    out.push(LeftOut { who: who.clone(), kind, count: *left_out });
                }
                false
            });
            !entry.windows.is_empty() || entry.tat > now
        });
        self.order.borrow_mut().retain(|who| table.contains_key(who));
        out
    }

    fn with_entry<R>(&self, who: Refused, now: Instant, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut table = self.table.borrow_mut();
        if !table.contains_key(&who) {
            let mut order = self.order.borrow_mut();
            let mut skipped_hot = 0;
            while table.len() >= self.max_entries {
                let Some(oldest) = order.pop_front() else { break };
                // A source still over its rate or inside a window goes to the back, a few times at
                // most: forgetting it would hand it a fresh burst, while a cold entry costs nothing
                // to forget. A flood of new sources, all hot, still evicts in O(EVICTION_TRIES).
                let hot = table.get(&oldest).is_some_and(|e| e.is_hot(now));
                if hot && skipped_hot < EVICTION_TRIES {
                    skipped_hot += 1;
                    order.push_back(oldest);
                    continue;
                }
                if let Some(entry) = table.remove(&oldest) {
                    let mut evicted = self.evicted.borrow_mut();
                    for (kind, _, count) in entry.windows.into_iter().filter(|w| w.2 > 0) {
                        // Bounded like the table: past it the count is only in the metrics.
                        if evicted.len() < self.max_entries {
                            evicted.push(LeftOut { who: oldest.clone(), kind, count });
                        }
                    }
                }
            }
            order.push_back(who.clone());
        }
        f(table.entry(who).or_insert_with(|| Entry { tat: now, windows: Vec::new() }))
    }

    /// Sources and tokens remembered now: the tests' view of the table's bound.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.borrow().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_past_its_rate_waits_and_others_do_not() {
        let refusals = Refusals::new(Some(RateLimit { qps: 10, burst: 3 }), 16);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(refusals.charge_unauthenticated(ip("10.0.0.1"), t0), Ok(()));
        }
        let wait = refusals.charge_unauthenticated(ip("10.0.0.1"), t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(refusals.charge_unauthenticated(ip("10.0.0.2"), t0), Ok(()));
        // A tenth of a second later one more is allowed.
        assert_eq!(refusals.charge_unauthenticated(ip("10.0.0.1"), t0 + Duration::from_millis(100)), Ok(()));
    }

    #[test]
    fn one_record_per_window_carries_what_was_left_out() {
        let refusals = Refusals::new(None, 16);
        let t0 = Instant::now();
        let who = Refused::source(ip("10.0.0.1"));
        assert_eq!(refusals.audit(who.clone(), "unauthorized", t0), Verdict::Record { repeated: 0 });
        for i in 0..5 {
            assert_eq!(refusals.audit(who.clone(), "unauthorized", t0 + Duration::from_millis(i)), Verdict::LeaveOut);
        }
        // Another kind has a window of its own.
        assert_eq!(refusals.audit(who.clone(), "rate_limited", t0), Verdict::Record { repeated: 0 });
        let later = t0 + WINDOW;
        assert_eq!(refusals.audit(who.clone(), "unauthorized", later), Verdict::Record { repeated: 5 });
        // Left out and never followed: the summary says so once the window ends.
        assert_eq!(refusals.audit(who.clone(), "unauthorized", later), Verdict::LeaveOut);
        assert_eq!(refusals.ended(later + WINDOW), vec![LeftOut { who, kind: "unauthorized", count: 1 }]);
        assert!(refusals.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_evicted_counts_are_kept() {
        let refusals = Refusals::new(None, 2);
        let t0 = Instant::now();
        let first = Refused::source(ip("10.0.0.1"));
        refusals.audit(first.clone(), "unauthorized", t0);
        refusals.audit(first.clone(), "unauthorized", t0);
        refusals.audit(Refused::source(ip("10.0.0.2")), "unauthorized", t0);
        refusals.audit(Refused::source(ip("10.0.0.3")), "unauthorized", t0);
        assert_eq!(refusals.len(), 2);
        assert_eq!(refusals.ended(t0), vec![LeftOut { who: first, kind: "unauthorized", count: 1 }]);
    }

    #[test]
    fn eviction_forgets_a_cold_source_before_a_hot_one() {
        let refusals = Refusals::new(Some(RateLimit { qps: 1, burst: 1 }), 2);
        let t0 = Instant::now();
        let (hot, cold) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(refusals.charge_unauthenticated(hot, t0), Ok(()));
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(refusals.charge_unauthenticated(cold, t0), Ok(()));
        // At `later` the cold source has nothing left to remember, the hot one charges again.
        assert_eq!(refusals.charge_unauthenticated(hot, later), Ok(()));
        assert!(refusals.charge_unauthenticated(hot, later).is_err());
        refusals.charge_unauthenticated(ip("10.0.0.3"), later).unwrap();
        // The hot source is still remembered, still over its rate.
        assert!(refusals.charge_unauthenticated(hot, later).is_err());
    }

    #[test]
    fn an_ipv6_host_is_its_64_and_a_mapped_v4_is_the_v4() {
        assert_eq!(Refused::source(ip("2001:db8:1:2:aaaa::1")), Refused::source(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(Refused::source(ip("2001:db8:1:2::1")), Refused::source(ip("2001:db8:1:3::1")));
        assert_eq!(Refused::source(ip("::ffff:10.0.0.1")), Refused::source(ip("10.0.0.1")));
    }
}
