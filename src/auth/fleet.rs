//! Rate limits that hold across a fleet (issue 35): with `--registry nats://…` and
//! `--rate-limit-qps`, each replica admits only its share of a token's rate.
//!
//! One thread (`tw-limits`, a tokio runtime of its own like the registry's client, never a shard)
//! does it all. Every `--rate-limit-share-interval-ms` it reads each token's requests (admitted and
//! refused, the counters the shards keep anyway: nothing is added to the request path), publishes
//! this replica's demand per token on [`SUBJECT`], and sets every token's bucket to this replica's
//! share ([`GlobalBucket::set_share`]): its demand over the fleet's, each replica's demand counted
//! with a floor so that an idle replica can start admitting before its first report lands.
//! Replicas not heard from for `--rate-limit-peer-timeout-ms` are forgotten. While NATS is away,
//! and until the peers have had time to report after a connect, a replica admits the rate divided
//! by the replicas it last knew of (kept in the data dir across restarts), never the full rate.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::TokenSet;
use crate::nats::NatsConfig;
use crate::runtime::published::Published;

/// Where replicas publish their demand: plain NATS, not JetStream (a report is worth nothing
/// once the next one is out).
pub const SUBJECT: &str = "tensor-wasm.limits.demand";
/// A replica's demand is its requests over the last this many ticks (half a second at the
/// default interval): one tick's count is too noisy at low rates.
const WINDOW_TICKS: usize = 5;
/// Each replica's demand counts at least the rate ÷ (this × replicas): a replica that starts
/// getting requests admits some before its first report reaches the others.
const FLOOR_DIVISOR: f64 = 10.0;
/// A replica's demand counts at most this many times the token's rate.
const DEMAND_CAP_PER_QPS: f64 = 100.0;
/// Peers remembered at most: past it, the one heard from longest ago is forgotten (and logged).
const MAX_PEERS: usize = 256;
/// Tokens a report names at most, the busiest first: a report stays far under NATS's 1 MiB
/// payload limit. A token left out counts as idle on this replica for the others.
const MAX_REPORT_TOKENS: usize = 4096;
/// How long to wait before connecting again after NATS went away.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct FleetLimitConfig {
    pub nats: NatsConfig,
    /// How often demand is published and shares are set.
    pub interval: Duration,
    /// A replica not heard from for this long is forgotten.
    pub peer_timeout: Duration,
    /// The data dir's file that keeps the last known replica count.
    pub count_file: PathBuf,
}

/// What `/metrics` shows: written by the share thread alone.
#[derive(Default)]
pub struct FleetStatus {
    /// Replicas this one counts, itself included: the last known while NATS is away.
    replicas: AtomicU64,
    /// Hearing the fleet now.
    connected: AtomicBool,
}

impl FleetStatus {
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// The share thread; dropping it stops the thread and waits for it.
pub struct FleetLimiter {
    pub status: Arc<FleetStatus>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FleetLimiter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the share thread for the tokens `tokens` publishes.
pub fn spawn(config: FleetLimitConfig, tokens: Arc<Published<TokenSet>>) -> io::Result<FleetLimiter> {
    let last_known = read_count(&config.count_file).unwrap_or(1);
    // From the start, before NATS answers (a connect may take --registry-timeout-ms): the rate
    // divided by the replicas last known, never the whole of it.
    for (_, entry) in tokens.load().1.entries() {
        if let Some(bucket) = &entry.bucket {
            bucket.set_share(1.0 / last_known as f64);
        }
    }
    let status = Arc::new(FleetStatus { replicas: AtomicU64::new(last_known as u64), ..Default::default() });
    let (stop_tx, stop_rx) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut limits = Limits::new(config, tokens, status.clone(), last_known);
    let thread = std::thread::Builder::new().name("tw-limits".into()).spawn(move || {
        runtime.block_on(limits.run(stop_rx));
    })?;
    Ok(FleetLimiter { status, stop: Some(stop_tx), thread: Some(thread) })
}

/// One replica's report: its demand per token, in requests per second.
#[derive(Serialize, Deserialize)]
struct Report {
    replica: String,
    tokens: HashMap<String, f64>,
}

struct Limits {
    config: FleetLimitConfig,
    tokens: Arc<Published<TokenSet>>,
    status: Arc<FleetStatus>,
    /// This process's name in reports: random, so that two replicas never share one (a copied
    /// data dir, a host name reused) and a restarted replica is a new one.
    me: String,
    demand: Demand,
    shares: Shares,
    /// The rate-limited tokens' ids, as of the token list's generation: what reports are kept for.
    known: (u64, std::collections::HashSet<String>),
}

impl Limits {
    fn new(
        config: FleetLimitConfig,
        tokens: Arc<Published<TokenSet>>,
        status: Arc<FleetStatus>,
        last_known: usize,
    ) -> Limits {
        let mut random = [0u8; 8];
        // As for function ids: without the OS random source nothing here is safe to run.
        getrandom::fill(&mut random).expect("the OS random source is available");
        let me = random.iter().map(|b| format!("{b:02x}")).collect();
        let (demand, shares) = (Demand::default(), Shares::new(last_known));
        Limits { config, tokens, status, me, demand, shares, known: (0, Default::default()) }
    }

    /// Connects, shares, and after any failure waits and connects again, until stopped.
    async fn run(&mut self, mut stop: oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = &mut stop => return,
                why = self.session(&mut tick) => why,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            tracing::warn!(
                replicas = self.shares.last_known,
                "fleet rate limits: NATS unavailable ({why}); admitting each token's rate ÷ the replicas last known"
            );
            // Away: the fallback share, every tick, until the next attempt.
            let retry = tokio::time::sleep(RECONNECT_DELAY);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = &mut retry => break,
                    _ = tick.tick() => drop(self.apply(false)),
                }
            }
        }
    }

    /// One connection: listens to the others' reports and, every tick, sets the shares and
    /// reports. Returns why it ended.
    async fn session(&mut self, tick: &mut tokio::time::Interval) -> String {
        let connection = match crate::nats::Connection::open(&self.config.nats, "tensor-wasm-limits").await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut reports = match connection.client.subscribe(SUBJECT).await {
            Ok(s) => s,
            Err(e) => return format!("subscribe: {e}"),
        };
        self.status.connected.store(true, Ordering::Relaxed);
        // The peers report within an interval or two: until then the shares would be computed
        // as if this replica were alone.
        let listening_since = Instant::now();
        let settled = self.config.interval * 2;
        loop {
            tokio::select! {
                message = reports.next() => match message {
                    None => return "the subscription ended".into(),
                    Some(message) => self.heard(&message.payload),
                },
                _ = tick.tick() => {
                    if connection.is_down() {
                        return "the connection dropped".into();
                    }
                    let now = Instant::now();
                    self.shares.forget_silent(now, self.config.peer_timeout);
                    let demand = self.apply(listening_since.elapsed() >= settled);
                    let report = Report { replica: self.me.clone(), tokens: busiest(demand) };
                    let payload = serde_json::to_vec(&report).unwrap_or_default();
                    if let Err(e) = connection.client.publish(SUBJECT, payload.into()).await {
                        return format!("publish: {e}");
                    }
                }
            }
        }
    }

    /// A report from the fleet: kept for the tokens this replica knows, unless it is this
    /// replica's own or does not parse.
    fn heard(&mut self, payload: &[u8]) {
        let Ok(report) = serde_json::from_slice::<Report>(payload) else {
            tracing::debug!("fleet rate limits: a report that does not parse: ignored");
            return;
        };
        if report.replica == self.me {
            return;
        }
        let (generation, tokens) = self.tokens.load();
        if self.known.0 != generation {
            let ids = tokens.entries().filter(|(_, e)| e.bucket.is_some()).map(|(_, e)| e.id.clone()).collect();
            self.known = (generation, ids);
        }
        let known: HashMap<String, f64> = report
            .tokens
            .into_iter()
            .filter(|(id, demand)| demand.is_finite() && *demand >= 0.0 && self.known.1.contains(id))
            .collect();
        self.shares.heard(report.replica, known, Instant::now());
    }

    /// Samples this replica's demand and sets every token's share: from the fleet's reports
    /// (`from_reports`: connected, and the peers have had time to report) or the fallback.
    /// Returns the demand sampled.
    fn apply(&mut self, from_reports: bool) -> HashMap<String, f64> {
        let (_, tokens) = self.tokens.load();
        let demand = self.demand.sample(&tokens, self.config.interval);
        if from_reports {
            let replicas = self.shares.replicas();
            if replicas != self.shares.last_known {
                self.shares.last_known = replicas;
                write_count(&self.config.count_file, replicas);
            }
        }
        self.status.replicas.store(self.shares.last_known as u64, Ordering::Relaxed);
        for (_, entry) in tokens.entries() {
            let Some(bucket) = &entry.bucket else { continue };
            let share = if from_reports {
                let mine = demand.get(&entry.id).copied().unwrap_or(0.0);
                self.shares.share(&entry.id, mine, bucket.limit().qps)
            } else {
                1.0 / self.shares.last_known as f64
            };
            bucket.set_share(share);
        }
        demand
    }
}

/// The non-zero demands, at most [`MAX_REPORT_TOKENS`] of them, the busiest first.
fn busiest(demand: HashMap<String, f64>) -> HashMap<String, f64> {
    let mut busy: Vec<(String, f64)> = demand.into_iter().filter(|(_, d)| *d > 0.0).collect();
    if busy.len() > MAX_REPORT_TOKENS {
        busy.sort_by(|a, b| b.1.total_cmp(&a.1));
        busy.truncate(MAX_REPORT_TOKENS);
    }
    busy.into_iter().collect()
}

/// This replica's requests per token, over the last [`WINDOW_TICKS`] ticks.
#[derive(Default)]
struct Demand {
    per_token: HashMap<String, TokenDemand>,
}

#[derive(Default)]
struct TokenDemand {
    /// The token's admitted + refused count at the last tick.
    last_total: u64,
    /// Requests in each of the last ticks, a ring.
    ticks: [u64; WINDOW_TICKS],
    next: usize,
}

impl Demand {
    /// Reads the counters of every rate-limited token; returns each one's requests per second
    /// over the window. Tokens no longer in the list are forgotten.
    fn sample(&mut self, tokens: &TokenSet, interval: Duration) -> HashMap<String, f64> {
        let window_s = interval.as_secs_f64() * WINDOW_TICKS as f64;
        let mut rates = HashMap::new();
        let mut seen = HashMap::with_capacity(self.per_token.len());
        for (_, entry) in tokens.entries() {
            if entry.bucket.is_none() {
                continue;
            }
            let (admitted, limited) = entry.totals();
            let total = admitted + limited;
            let mut demand =
                self.per_token.remove(&entry.id).unwrap_or(TokenDemand { last_total: total, ..Default::default() });
            demand.ticks[demand.next] = total.saturating_sub(demand.last_total);
            demand.next = (demand.next + 1) % WINDOW_TICKS;
            demand.last_total = total;
            rates.insert(entry.id.clone(), demand.ticks.iter().sum::<u64>() as f64 / window_s);
            seen.insert(entry.id.clone(), demand);
        }
        self.per_token = seen;
        rates
    }
}

/// What the fleet reported, and the share it leaves this replica.
struct Shares {
    peers: HashMap<String, Peer>,
    /// Replicas, this one included, when the fleet was last heard: the fallback's divisor.
    last_known: usize,
}

struct Peer {
    heard: Instant,
    demand: HashMap<String, f64>,
}

impl Shares {
    fn new(last_known: usize) -> Shares {
        Shares { peers: HashMap::new(), last_known: last_known.max(1) }
    }

    fn heard(&mut self, replica: String, demand: HashMap<String, f64>, now: Instant) {
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&replica) {
            // The one heard from longest ago goes: a flood of made-up names cannot keep a real
            // replica, which reports every interval, out for good.
            let oldest = self.peers.iter().min_by_key(|(_, p)| p.heard).map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
            }
            tracing::warn!(max = MAX_PEERS, "fleet rate limits: more replicas report than are remembered");
        }
        self.peers.insert(replica, Peer { heard: now, demand });
    }

    fn forget_silent(&mut self, now: Instant, timeout: Duration) {
        self.peers.retain(|_, peer| now.saturating_duration_since(peer.heard) < timeout);
    }

    /// Replicas heard from, this one included.
    fn replicas(&self) -> usize {
        self.peers.len() + 1
    }

    /// This replica's share of `token`'s rate `qps`, in (0, 1]: its demand `mine` over the
    /// fleet's, each replica's counted with a floor of qps ÷ (10 × replicas).
    fn share(&self, token: &str, mine: f64, qps: u32) -> f64 {
        let floor = f64::from(qps) / (FLOOR_DIVISOR * self.replicas() as f64);
        // No replica's demand counts for more than a hundred times the rate: more says nothing
        // more about how to split it, and a forged report of 1e300 would leave the others none.
        let cap = f64::from(qps) * DEMAND_CAP_PER_QPS;
        let demand = |d: f64| d.min(cap) + floor;
        let others: f64 = self.peers.values().map(|p| demand(p.demand.get(token).copied().unwrap_or(0.0))).sum();
        let mine = demand(mine);
        (mine / (mine + others)).clamp(f64::MIN_POSITIVE, 1.0)
    }
}

fn read_count(path: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse::<usize>().ok().filter(|n| (1..=MAX_PEERS + 1).contains(n))
}

/// Best effort: a count that cannot be kept only means a restart with NATS away divides by an
/// older one.
fn write_count(path: &std::path::Path, replicas: usize) {
    let temp = path.with_extension("tmp");
    let written = std::fs::write(&temp, format!("{replicas}\n")).and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "cannot keep the fleet's replica count: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(token: &str, rate: f64) -> HashMap<String, f64> {
        HashMap::from([(token.to_string(), rate)])
    }

    #[test]
    fn shares_follow_demand_and_sum_to_the_whole() {
        let now = Instant::now();
        // Three replicas offered twice the rate of 300/s, split 70/20/10.
        let offered = [420.0, 120.0, 60.0];
        let mut admitted = 0.0;
        for me in 0..3 {
            let mut shares = Shares::new(1);
            for (peer, rate) in offered.iter().enumerate().filter(|(p, _)| *p != me) {
                shares.heard(format!("r{peer}"), demand("t", *rate), now);
            }
            let share = shares.share("t", offered[me], 300);
            admitted += (share * 300.0).min(offered[me]);
        }
        assert!((admitted - 300.0).abs() < 30.0, "{admitted}");
    }

    #[test]
    fn an_idle_fleet_leaves_a_busy_replica_nearly_all_of_the_rate() {
        let now = Instant::now();
        let mut shares = Shares::new(1);
        shares.heard("a".into(), HashMap::new(), now);
        shares.heard("b".into(), HashMap::new(), now);
        let share = shares.share("t", 600.0, 300);
        assert!(share > 0.95 && share < 1.0, "{share}");
        // And an idle replica still has a floor to start from.
        let idle = shares.share("t", 0.0, 300);
        assert!(idle > 0.0, "{idle}");
    }

    #[test]
    fn silent_replicas_are_forgotten() {
        let now = Instant::now();
        let mut shares = Shares::new(1);
        shares.heard("a".into(), demand("t", 100.0), now);
        shares.heard("b".into(), demand("t", 100.0), now + Duration::from_millis(900));
        assert_eq!(shares.replicas(), 3);
        // A forged report of any size weighs at most a hundred times the rate.
        let mut forged = Shares::new(1);
        forged.heard("x".into(), demand("t", 1e300), now);
        assert!(forged.share("t", 50.0, 100) > 1e-4);
        shares.forget_silent(now + Duration::from_millis(1500), Duration::from_secs(1));
        assert_eq!(shares.replicas(), 2);
        assert!(shares.peers.contains_key("b"));
    }

    #[test]
    fn the_report_names_only_busy_tokens_and_at_most_the_cap() {
        let many: HashMap<String, f64> = (0..MAX_REPORT_TOKENS + 10).map(|i| (format!("t{i}"), i as f64)).collect();
        let report = busiest(many);
        assert_eq!(report.len(), MAX_REPORT_TOKENS);
        assert!(!report.contains_key("t0") && report.contains_key(&format!("t{}", MAX_REPORT_TOKENS + 9)));
    }

    #[test]
    fn the_replica_count_survives_in_the_data_dir_and_junk_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet-replicas");
        assert_eq!(read_count(&path), None);
        write_count(&path, 3);
        assert_eq!(read_count(&path), Some(3));
        for junk in ["0", "-1", "many", "100000"] {
            std::fs::write(&path, junk).unwrap();
            assert_eq!(read_count(&path), None, "{junk}");
        }
    }
}
