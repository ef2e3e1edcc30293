//! Delivering a pipeline's final output to its sink: one HTTP/1.1 request per attempt, retried on
//! 5xx, 429 and connection failures with exponential backoff (or the sink's `retry-after`).
//!
//! Deliveries run on a small pool of blocking threads fed by a bounded queue, so that name lookups,
//! connects and backoff sleeps never run on a shard. A full queue is 503 `overloaded`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::oneshot;

use super::record::Sink;
use crate::cidr::Cidr;
use crate::error::ApiError;
use crate::http::client::{self, Target};
use crate::http::header_rules;
use crate::wasm::envelope::Headers;

/// Longest wait between two attempts, whatever the backoff or `retry-after` says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The addresses a sink may be delivered to. Tenants choose sink URLs, and the server makes the
/// request from inside the operator's network, so where it may go is the operator's to say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkNetworks {
    /// Every address but the link-local ones (169.254.0.0/16, fe80::/10), where cloud metadata
    /// services hand out the node's credentials.
    AnyButLinkLocal,
    /// Only addresses inside these networks.
    Only(Vec<Cidr>),
}

impl SinkNetworks {
    /// ```
    /// use tensor_wasm::pipelines::sink::SinkNetworks;
    /// use tensor_wasm::cidr::parse_cidrs;
    /// let any = SinkNetworks::AnyButLinkLocal;
    /// assert!(any.allows("10.1.2.3".parse().unwrap()));
    /// assert!(!any.allows("169.254.169.254".parse().unwrap()));
    /// assert!(!any.allows("::ffff:169.254.169.254".parse().unwrap()));
    /// let only = SinkNetworks::Only(parse_cidrs("10.0.0.0/8").unwrap());
    /// assert!(!only.allows("127.0.0.1".parse().unwrap()));
    /// ```
    pub fn allows(&self, ip: IpAddr) -> bool {
        match self {
            SinkNetworks::AnyButLinkLocal => !LINK_LOCAL.iter().any(|net| net.contains(ip)),
            SinkNetworks::Only(networks) => networks.iter().any(|net| net.contains(ip)),
        }
    }

    /// Why `ip` is refused.
    pub fn refusal(&self, ip: IpAddr) -> String {
        match self {
            SinkNetworks::AnyButLinkLocal => {
                format!("{ip} is link-local, where sinks may not go unless --sink-allowed-cidrs lists it")
            }
            SinkNetworks::Only(_) => format!("{ip} is outside --sink-allowed-cidrs"),
        }
    }
}

const LINK_LOCAL: [Cidr; 2] = [
    Cidr::new_const(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
    Cidr::new_const(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
];

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

type Job = (Delivery, oneshot::Sender<Result<Delivered, ApiError>>);

/// A shard's handle to the delivery pool.
#[derive(Clone)]
pub struct SinkHandle {
    tx: SyncSender<Job>,
}

impl SinkHandle {
    pub async fn deliver(&self, delivery: Delivery) -> Result<Delivered, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx.try_send((delivery, tx)).map_err(|e| match e {
            TrySendError::Full(_) => ApiError::Overloaded("the sink delivery queue is full"),
            TrySendError::Disconnected(_) => ApiError::Internal("the sink workers stopped".into()),
        })?;
        rx.await.map_err(|_| ApiError::Internal("the sink workers stopped".into()))?
    }
}

/// Starts `workers` delivery threads behind a queue of `queue_depth` deliveries, which reach
/// only addresses that `networks` allows.
pub fn spawn(workers: usize, queue_depth: usize, networks: SinkNetworks) -> std::io::Result<SinkHandle> {
    let (tx, rx) = sync_channel::<Job>(queue_depth);
    let rx = Arc::new(Mutex::new(rx));
    let networks = Arc::new(networks);
    for i in 0..workers {
        let (rx, networks) = (rx.clone(), networks.clone());
        std::thread::Builder::new().name(format!("tw-sink-{i}")).spawn(move || serve(&rx, &networks))?;
    }
    Ok(SinkHandle { tx })
}

fn serve(rx: &Mutex<Receiver<Job>>, networks: &SinkNetworks) {
    loop {
        // The lock is held only while waiting for the next job, never while delivering.
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((delivery, reply)) = job else { return };
        let _ = reply.send(deliver(&delivery, networks));
    }
}

/// Attempts the delivery until it succeeds, fails for good, or runs out of attempts. The sink's
/// host is looked up at every attempt, and only the addresses `networks` allows are tried: a
/// name that resolves to none of them fails for good.
pub fn deliver(delivery: &Delivery, networks: &SinkNetworks) -> Result<Delivered, ApiError> {
    let sink = &delivery.sink;
    let failed = |attempts: u32, last: String| ApiError::SinkDeliveryFailed { url: sink.url.clone(), attempts, last };
    let target = Target::parse(&sink.url).map_err(|e| failed(0, e))?;
    let request = encode_request(&target, delivery);
    let mut backoff = Duration::from_millis(sink.backoff_ms);
    let mut last = String::new();
    for attempt in 1..=sink.max_attempts {
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
                    _ => send(&allowed, &target, &request, Duration::from_millis(sink.timeout_ms)),
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
            std::thread::sleep(wait.min(MAX_BACKOFF));
            backoff = (backoff * 2).min(MAX_BACKOFF);
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
/// matter), all within `timeout`.
fn send(addrs: &[SocketAddr], target: &Target, request: &[u8], timeout: Duration) -> Result<Answer, String> {
    let answer = client::exchange_at(addrs, target, request, client::Exchange { timeout, max_body: None, tls: None })?;
    let retry_after = answer.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
    Ok(Answer { status: answer.status, retry_after })
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
}
