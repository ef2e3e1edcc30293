//! Delivering a pipeline's final output to its sink: one HTTP/1.1 request per attempt, retried on
//! 5xx, 429 and connection failures with exponential backoff (or the sink's `retry-after`).
//!
//! Deliveries run on a small pool of blocking threads fed by a bounded queue, so that name lookups,
//! connects and backoff sleeps never run on a shard. A full queue is 503 `overloaded`. Two more
//! bounds keep a tenant's slow sink that tenant's problem:
//!
//! - a tenant has at most `--sink-max-inflight-per-tenant` deliveries queued or running, fewer
//!   than there are workers, so a tarpit sink cannot hold every worker: past it, 429
//!   `sink_concurrency_limited`;
//! - a delivery ends within `--sink-max-delivery-ms` of being queued, waiting, attempts and
//!   backoff included: past it, 504 `sink_delivery_timeout`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_channel::oneshot;

pub use crate::config::SinkNetworks;
use crate::error::ApiError;
use crate::functions::pipeline::Sink;
use crate::http::client::{self, Target};
use crate::http::header_rules;
use crate::runtime::event::{race, Either};
use crate::wasm::envelope::Headers;

/// Longest wait between two attempts, whatever the backoff or `retry-after` says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long past `--sink-max-delivery-ms` a shard waits for its worker's answer. The worker bounds
/// every step by the deadline but two: the system resolver's lookup, which runs to its own
/// timeouts, and the wait in the queue for a worker, which ends only when one is free. The grace
/// lets the worker's own, more precise answer win in every other case.
const LOOKUP_GRACE: Duration = Duration::from_millis(250);

/// One delivery: the pipeline's final output and headers.
pub struct Delivery {
    pub sink: Sink,
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// A successful delivery.
#[derive(Debug)]
pub struct Delivered {
    pub status: u16,
    pub attempts: u32,
}

/// When a delivery must have ended, and the cap that set it (for the refusal's message).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub deadline: Instant,
    pub cap: Duration,
}

impl Budget {
    pub fn starting_now(cap: Duration) -> Budget {
        Budget { deadline: Instant::now() + cap, cap }
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// What a worker takes from the queue.
enum Work {
    Deliver(Job),
    /// Sent once per worker by [`SinkWorkers::stop`]: the shards' handles may outlive the drain,
    /// so the queue cannot be relied on to close.
    Stop,
}

struct Job {
    delivery: Delivery,
    budget: Budget,
    /// Held until the delivery has ended, whether or not anyone still waits for it.
    slot: Slot,
    reply: oneshot::Sender<Result<Delivered, ApiError>>,
}

/// Each tenant's deliveries queued or running, across every shard, and the most one may have.
/// The lock is held for one hash-map update, by a shard when a pipeline hands over its output
/// and by a worker when a delivery ends: never across I/O, so a shard never waits on a delivery.
struct Inflight {
    max: u32,
    per_tenant: Mutex<HashMap<u64, u32>>,
}

impl Inflight {
    fn count(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.per_tenant.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refusal(&self) -> ApiError {
        ApiError::SinkConcurrencyLimited { limit: self.max }
    }

    fn acquire(self: &Arc<Self>, tenant: u64) -> Result<Slot, ApiError> {
        let mut count = self.count();
        let n = count.entry(tenant).or_insert(0);
        if *n >= self.max {
            return Err(self.refusal());
        }
        *n += 1;
        Ok(Slot { inflight: self.clone(), tenant })
    }
}

/// One of a tenant's in-flight deliveries. Dropping it gives the place back: the worker once the
/// delivery has ended, or the shard when the queue refused it. A tenant's entry goes with its
/// last delivery, so the map holds at most the deliveries in flight.
struct Slot {
    inflight: Arc<Inflight>,
    tenant: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut count = self.inflight.count();
        if let Some(n) = count.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                count.remove(&self.tenant);
            }
        }
    }
}

/// A shard's handle to the delivery pool.
#[derive(Clone)]
pub struct SinkHandle {
    tx: SyncSender<Work>,
    inflight: Arc<Inflight>,
    max_delivery: Duration,
}

impl SinkHandle {
    /// 429 `sink_concurrency_limited` when `tenant` already has its most deliveries in flight:
    /// checked before a pipeline runs steps whose output could not be handed over. `deliver`
    /// checks again, since others may have started meanwhile.
    pub fn admit(&self, tenant: u64) -> Result<(), ApiError> {
        match self.inflight.count().get(&tenant) {
            Some(n) if *n >= self.inflight.max => Err(self.inflight.refusal()),
            _ => Ok(()),
        }
    }

    pub async fn deliver(&self, tenant: u64, delivery: Delivery) -> Result<Delivered, ApiError> {
        let slot = self.inflight.acquire(tenant)?;
        let budget = Budget::starting_now(self.max_delivery);
        let url = delivery.sink.url.clone();
        let (tx, rx) = oneshot::channel();
        // A refused job is dropped here, and its slot with it.
        self.tx.try_send(Work::Deliver(Job { delivery, budget, slot, reply: tx })).map_err(|e| match e {
            TrySendError::Full(_) => ApiError::Overloaded("the sink delivery queue is full"),
            TrySendError::Disconnected(_) => ApiError::Internal("the sink workers stopped".into()),
        })?;
        match race(rx, monoio::time::sleep(self.max_delivery + LOOKUP_GRACE)).await {
            Either::Left(reply) => reply.map_err(|_| ApiError::Internal("the sink workers stopped".into()))?,
            // The job keeps its slot until a worker has ended it: the tenant's place stays taken.
            Either::Right(()) => Err(ApiError::SinkDeliveryTimeout {
                url,
                limit_ms: self.max_delivery.as_millis() as u64,
                attempts: 0,
                last: "no answer from the sink workers: the delivery was still queued, or its host name still \
                       being looked up"
                    .into(),
            }),
        }
    }
}

/// Starts `workers` delivery threads behind a queue of `queue_depth` deliveries, which reach
/// only addresses that `networks` allows; a tenant may have `max_inflight_per_tenant` of them
/// queued or running, and each must end within `max_delivery` of being queued.
///
/// The caller stops and joins the threads with [`SinkWorkers::stop`]. Dropped instead, they are
/// let go, and end once every clone of the handle is gone too and the queue has closed.
pub fn spawn(
    workers: usize,
    queue_depth: usize,
    max_inflight_per_tenant: u32,
    max_delivery: Duration,
    networks: SinkNetworks,
) -> std::io::Result<(SinkHandle, SinkWorkers)> {
    let (tx, rx) = sync_channel::<Work>(queue_depth);
    let rx = Arc::new(Mutex::new(rx));
    let networks = Arc::new(networks);
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let (rx, networks) = (rx.clone(), networks.clone());
        threads.push(std::thread::Builder::new().name(format!("tw-sink-{i}")).spawn(move || serve(&rx, &networks))?);
    }
    let inflight = Arc::new(Inflight { max: max_inflight_per_tenant, per_tenant: Mutex::default() });
    Ok((SinkHandle { tx: tx.clone(), inflight, max_delivery }, SinkWorkers { threads, tx, max_delivery }))
}

/// The delivery threads, held by the server's one owner of its helper threads.
pub struct SinkWorkers {
    threads: Vec<JoinHandle<()>>,
    /// Where the stop is sent.
    tx: SyncSender<Work>,
    /// `--sink-max-delivery-ms`: how long any delivery still queued or running may take.
    max_delivery: Duration,
}

impl SinkWorkers {
    /// Stops and joins the workers, once nothing sends them deliveries any more (the shards
    /// have stopped). Each finds its stop behind the deliveries queued before it, and each of
    /// those ends within `--sink-max-delivery-ms` of being queued, so the wait is bounded by it
    /// and [`LOOKUP_GRACE`] (a name lookup may outlast the budget); a worker still busy then is
    /// let go and logged. Returns how many were let go.
    pub fn stop(self) -> usize {
        let SinkWorkers { mut threads, tx, max_delivery } = self;
        let deadline = Instant::now() + max_delivery + LOOKUP_GRACE;
        let mut stops = threads.len();
        while stops > 0 && Instant::now() < deadline {
            match tx.try_send(Work::Stop) {
                Ok(()) => stops -= 1,
                // Deliveries fill the queue: a worker makes room as it takes the next one.
                Err(TrySendError::Full(_)) => std::thread::sleep(Duration::from_millis(5)),
                // Every worker has ended already.
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        while !threads.is_empty() && Instant::now() < deadline {
            // `std` joins without a timeout: only a finished thread is joined.
            let (done, running): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
            for thread in done {
                if thread.join().is_err() {
                    tracing::error!("a sink worker panicked");
                }
            }
            threads = running;
            if !threads.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !threads.is_empty() {
            tracing::warn!(
                workers = threads.len(),
                waited_ms = (max_delivery + LOOKUP_GRACE).as_millis() as u64,
                "sink workers still delivering past --sink-max-delivery-ms; not waiting for them"
            );
        }
        threads.len()
    }
}

fn serve(rx: &Mutex<Receiver<Work>>, networks: &SinkNetworks) {
    loop {
        // The lock is held only while waiting for the next job, never while delivering.
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Work::Deliver(Job { delivery, budget, slot, reply })) = job else { return };
        let outcome = deliver(&delivery, networks, budget);
        // The place is free before the answer leaves: a client that sends its next delivery as
        // soon as it has the answer must not find its own last one still counted.
        drop(slot);
        let _ = reply.send(outcome);
    }
}

/// Attempts the delivery until it succeeds, fails for good, runs out of attempts or out of
/// `budget`. The sink's host is looked up at every attempt, and only the addresses `networks`
/// allows are tried: a name that resolves to none of them fails for good. Each attempt's
/// timeout, and each wait before the next, is cut to what the budget has left; a wait that would
/// end past it ends the delivery now, since no attempt could follow.
pub fn deliver(delivery: &Delivery, networks: &SinkNetworks, budget: Budget) -> Result<Delivered, ApiError> {
    let sink = &delivery.sink;
    let failed = |attempts: u32, last: String| ApiError::SinkDeliveryFailed { url: sink.url.clone(), attempts, last };
    let timed_out = |attempts: u32, last: String| ApiError::SinkDeliveryTimeout {
        url: sink.url.clone(),
        limit_ms: budget.cap.as_millis() as u64,
        attempts,
        last,
    };
    let target = Target::parse(&sink.url).map_err(|e| failed(0, e))?;
    let request = encode_request(&target, delivery);
    let mut backoff = Duration::from_millis(sink.backoff_ms);
    let mut last = String::from("it waited for a free sink worker the whole time");
    for attempt in 1..=sink.max_attempts {
        if budget.left().is_zero() {
            return Err(timed_out(attempt - 1, last));
        }
        let mut wait = backoff;
        // Only the addresses the operator allows; a name that resolves to none of them is refused
        // for good, where a failed lookup is retried.
        let sent = match client::resolve(&target) {
            Err(e) => Err(e),
            Ok(all) => {
                let allowed: Vec<_> = all.iter().copied().filter(|a| networks.allows(a.ip())).collect();
                match all.first() {
                    Some(refused) if allowed.is_empty() => {
                        let refusal = networks.refusal(refused.ip());
                        return Err(failed(attempt, format!("{refusal} (not retried)")));
                    }
                    // The lookup may have used up the budget.
                    _ if budget.left().is_zero() => return Err(timed_out(attempt - 1, last)),
                    _ => {
                        let timeout = Duration::from_millis(sink.timeout_ms).min(budget.left());
                        send(&allowed, &target, &request, timeout, networks)
                    }
                }
            }
        };
        match sent {
            Ok(answer) if (200..300).contains(&answer.status) => {
                return Ok(Delivered { status: answer.status, attempts: attempt });
            }
            Ok(answer) if answer.status == 429 || answer.status >= 500 => {
                last = format!("HTTP {}", answer.status);
                wait = answer.retry_after.unwrap_or(wait);
            }
            // Anything else is the sink refusing this output: retrying would not change it.
            Ok(answer) => return Err(failed(attempt, format!("HTTP {} (not retried)", answer.status))),
            Err(e) => last = e,
        }
        if attempt < sink.max_attempts {
            let wait = wait.min(MAX_BACKOFF);
            if wait >= budget.left() {
                return Err(timed_out(attempt, last));
            }
            std::thread::sleep(wait);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else if budget.left().is_zero() {
            // The last attempt was cut short by the budget, not by its own timeout.
            return Err(timed_out(attempt, last));
        }
    }
    Err(failed(sink.max_attempts, last))
}

fn encode_request(target: &Target, delivery: &Delivery) -> Vec<u8> {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(
        delivery
            .headers
            .iter()
            .filter(|(name, value)| header_rules::passes_to_sink(name) && header_rules::check(name, value).is_ok())
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    client::encode_request(&delivery.sink.method, target, &headers, &delivery.body)
}

/// One attempt: connect, send, and read the answer's head (only its status and `retry-after`
/// matter), all within `timeout`. The client checks each address against `networks` again as it
/// connects, and the peer it reached: `addrs` were checked when resolved, but nothing may ever
/// connect to an address that was not checked.
fn send(
    addrs: &[SocketAddr],
    target: &Target,
    request: &[u8],
    timeout: Duration,
    networks: &SinkNetworks,
) -> Result<Answer, String> {
    let allow = |ip: IpAddr| networks.allows(ip);
    let how = client::Exchange { timeout, max_body: None, tls: None, allow: Some(&allow) };
    let answer = client::exchange_at(addrs, target, request, how)?;
    let retry_after = answer.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
    Ok(Answer { status: answer.status, retry_after })
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn sink(url: String, max_attempts: u32, timeout_ms: u64) -> Delivery {
        let sink = Sink { url, method: "POST".into(), max_attempts, timeout_ms, backoff_ms: 10 };
        Delivery { sink, headers: Headers::new(), body: b"{}".to_vec() }
    }

    fn loopback() -> SinkNetworks {
        SinkNetworks::parse("127.0.0.0/8").unwrap()
    }

    #[test]
    fn a_tenant_holds_at_most_its_slots_and_gives_them_back() {
        let inflight = Arc::new(Inflight { max: 2, per_tenant: Mutex::default() });
        let a = inflight.acquire(7).unwrap();
        let b = inflight.acquire(7).unwrap();
        let refused = inflight.acquire(7).err().unwrap();
        assert_eq!((refused.status().code(), refused.kind()), (429, "sink_concurrency_limited"));
        assert_eq!(refused.extra_headers(), Some(("retry-after", "1".to_string())));
        // Another tenant is not affected.
        let other = inflight.acquire(8).unwrap();
        drop(a);
        let c = inflight.acquire(7).unwrap();
        drop((b, c, other));
        // Nothing in flight, nothing kept.
        assert!(inflight.count().is_empty());
    }

    #[test]
    fn the_workers_stop_while_handles_still_live() {
        // As at a drain, where the shards' copies of the handle outlive them.
        let (handle, workers) = spawn(3, 4, 2, Duration::from_millis(100), loopback()).unwrap();
        let copy = handle.clone();
        assert_eq!(workers.stop(), 0);
        drop((handle, copy));
    }

    #[test]
    fn a_stop_waits_for_the_deliveries_queued_before_it() {
        let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", tarpit.local_addr().unwrap());
        let max_delivery = Duration::from_millis(300);
        let (handle, workers) = spawn(1, 4, 2, max_delivery, loopback()).unwrap();
        let slot = handle.inflight.acquire(7).unwrap();
        let (reply, mut answer) = oneshot::channel();
        let job = Job { delivery: sink(url, 1, 60_000), budget: Budget::starting_now(max_delivery), slot, reply };
        assert!(handle.tx.try_send(Work::Deliver(job)).is_ok());
        assert_eq!(workers.stop(), 0);
        // Answered before its worker ended: the stop waited for the delivery.
        let delivered = answer.try_recv().unwrap().expect("an answer");
        assert_eq!(delivered.unwrap_err().kind(), "sink_delivery_timeout");
        assert!(handle.inflight.count().is_empty());
    }

    #[test]
    fn a_tarpit_sink_is_given_up_at_the_budget() {
        // Accepts and never answers.
        let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", tarpit.local_addr().unwrap());
        let started = Instant::now();
        let budget = Budget::starting_now(Duration::from_millis(300));
        let e = deliver(&sink(url, 10, 60_000), &loopback(), budget).unwrap_err();
        let took = started.elapsed();
        assert_eq!((e.status().code(), e.kind()), (504, "sink_delivery_timeout"), "{e}");
        assert!(e.to_string().contains("--sink-max-delivery-ms (300 ms)"), "{e}");
        assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_wait_past_the_budget_ends_the_delivery_at_once() {
        // Answers 503 with `retry-after: 5`: no attempt could follow within 1 s.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 4096]).unwrap();
            s.write_all(b"HTTP/1.1 503 Busy\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n").unwrap();
        });
        let started = Instant::now();
        let e = deliver(&sink(url, 10, 5_000), &loopback(), Budget::starting_now(Duration::from_secs(1))).unwrap_err();
        assert_eq!(e.kind(), "sink_delivery_timeout", "{e}");
        assert!(e.to_string().contains("after 1 attempt(s); last: HTTP 503"), "{e}");
        assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
        server.join().unwrap();
    }

    #[test]
    fn a_name_that_resolves_only_to_refused_addresses_is_never_connected() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://localhost:{}/", listener.local_addr().unwrap().port());
        let budget = Budget::starting_now(Duration::from_secs(5));
        let e = deliver(&sink(url, 3, 1_000), &SinkNetworks::default(), budget).unwrap_err();
        assert_eq!(e.kind(), "sink_delivery_failed", "{e}");
        assert!(e.to_string().contains("loopback") && e.to_string().contains("not retried"), "{e}");
        assert!(e.to_string().contains("1 attempt(s)"), "{e}");
        assert_eq!(listener.accept().map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    }
}
