//! Delivering a pipeline's final output to its sink: one HTTP/1.1 request per attempt, retried on
//! 5xx, 429 and connection failures with exponential backoff (or the sink's `retry-after`).
//!
//! Deliveries run on a small pool of blocking threads fed by a bounded queue, so that name lookups,
//! connects and backoff sleeps never run on a shard. A full queue is 503 `overloaded`.

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::oneshot;

use super::record::Sink;
use crate::cidr::{not_public, Cidr};
use crate::error::ApiError;
use crate::http::client::{self, Target};
use crate::http::header_rules;
use crate::wasm::envelope::Headers;

/// Longest wait between two attempts, whatever the backoff or `retry-after` says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The addresses a sink may be delivered to. Tenants choose sink URLs, and the server makes the
/// request from inside the operator's network, so where it may go is the operator's to say.
///
/// By default only public addresses ([`crate::cidr::not_public`] names the rest): a sink is a
/// tenant's service on the internet, and anything else is the operator's, the host's loopback
/// and the server's own API, the cloud's metadata service with the node's credentials, the
/// cluster and the data centre. `--sink-allowed-cidrs` replaces that with the networks it lists;
/// the word `public` in the list keeps public addresses allowed beside them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkNetworks {
    public: bool,
    listed: Vec<Cidr>,
}

impl Default for SinkNetworks {
    fn default() -> Self {
        SinkNetworks { public: true, listed: Vec::new() }
    }
}

impl SinkNetworks {
    /// `--sink-allowed-cidrs`: networks such as `10.0.0.0/8,fd00::/8`, and optionally the word
    /// `public`. Empty: the default, public addresses only.
    ///
    /// ```
    /// use tensor_wasm::pipelines::sink::SinkNetworks;
    /// let default = SinkNetworks::parse("").unwrap();
    /// assert!(default.allows("8.8.8.8".parse().unwrap()));
    /// for refused in ["10.1.2.3", "127.0.0.1", "169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"] {
    ///     assert!(!default.allows(refused.parse().unwrap()), "{refused}");
    /// }
    /// let only = SinkNetworks::parse("10.0.0.0/8").unwrap();
    /// assert!(only.allows("10.1.2.3".parse().unwrap()));
    /// assert!(!only.allows("127.0.0.1".parse().unwrap()));
    /// assert!(!only.allows("8.8.8.8".parse().unwrap()));
    /// let both = SinkNetworks::parse("public, 10.0.0.0/8").unwrap();
    /// assert!(both.allows("10.1.2.3".parse().unwrap()) && both.allows("8.8.8.8".parse().unwrap()));
    /// assert!(!both.allows("127.0.0.1".parse().unwrap()));
    /// ```
    pub fn parse(list: &str) -> Result<SinkNetworks, String> {
        let mut networks = SinkNetworks { public: false, listed: Vec::new() };
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.eq_ignore_ascii_case("public") {
                networks.public = true;
            } else {
                networks.listed.push(Cidr::parse(entry)?);
            }
        }
        if networks.listed.is_empty() && !networks.public {
            return Ok(SinkNetworks::default());
        }
        Ok(networks)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.listed.iter().any(|net| net.contains(ip)) || (self.public && not_public(ip).is_none())
    }

    /// Why `ip` is refused.
    pub fn refusal(&self, ip: IpAddr) -> String {
        match (self.public, not_public(ip)) {
            (true, Some(why)) => {
                format!("{ip} is {why}, where sinks may not go unless --sink-allowed-cidrs lists it")
            }
            _ => format!("{ip} is outside --sink-allowed-cidrs"),
        }
    }
}

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
                    _ => send(&allowed, &target, &request, Duration::from_millis(sink.timeout_ms), networks),
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

    #[test]
    fn a_name_that_resolves_only_to_refused_addresses_is_never_connected() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://localhost:{}/", listener.local_addr().unwrap().port());
        let sink = Sink { url, method: "POST".into(), max_attempts: 3, timeout_ms: 1_000, backoff_ms: 10 };
        let delivery = Delivery { sink, headers: Headers::new(), body: b"{}".to_vec() };
        let e = deliver(&delivery, &SinkNetworks::default()).unwrap_err();
        assert_eq!(e.kind(), "sink_delivery_failed", "{e}");
        assert!(e.to_string().contains("loopback") && e.to_string().contains("not retried"), "{e}");
        assert!(e.to_string().contains("1 attempt(s)"), "{e}");
        assert_eq!(listener.accept().map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    }
}
