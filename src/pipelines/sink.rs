//! Delivering a pipeline's final output to its sink: one HTTP/1.1 request per attempt, retried on
//! 5xx, 429 and connection failures with exponential backoff (or the sink's `retry-after`).
//!
//! Deliveries run on a small pool of blocking threads fed by a bounded queue, so that name lookups,
//! connects and backoff sleeps never run on a shard. A full queue is 503 `overloaded`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_channel::oneshot;

use super::record::Sink;
use crate::error::ApiError;
use crate::http::header_rules;
use crate::wasm::envelope::Headers;

/// Longest wait between two attempts, whatever the backoff or `retry-after` says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most bytes of a sink's response head read.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// An `http://host[:port][/path]` URL, split. Only plain HTTP: a sink is a service beside the
/// runtime (in-cluster), as in Fiso's flows.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("user info in the URL is not supported".into());
        }
        let (host, port) = match authority.rsplit_once(':').filter(|(h, _)| !h.ends_with(']') || h.starts_with('[')) {
            Some((host, port)) if !host.is_empty() && !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| format!("bad port {port:?}"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(format!("bad host {host:?}"));
        }
        if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err("the path holds whitespace or control characters".into());
        }
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        Ok(Target { host: host.to_string(), port, path })
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

/// Starts `workers` delivery threads behind a queue of `queue_depth` deliveries.
pub fn spawn(workers: usize, queue_depth: usize) -> std::io::Result<SinkHandle> {
    let (tx, rx) = sync_channel::<Job>(queue_depth);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..workers {
        let rx = rx.clone();
        std::thread::Builder::new().name(format!("tw-sink-{i}")).spawn(move || serve(&rx))?;
    }
    Ok(SinkHandle { tx })
}

fn serve(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while delivering.
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((delivery, reply)) = job else { return };
        let _ = reply.send(deliver(&delivery));
    }
}

/// Attempts the delivery until it succeeds, fails for good, or runs out of attempts.
pub fn deliver(delivery: &Delivery) -> Result<Delivered, ApiError> {
    let sink = &delivery.sink;
    let failed = |attempts: u32, last: String| ApiError::SinkDeliveryFailed { url: sink.url.clone(), attempts, last };
    let target = Target::parse(&sink.url).map_err(|e| failed(0, e))?;
    let request = encode_request(&target, delivery);
    let mut backoff = Duration::from_millis(sink.backoff_ms);
    let mut last = String::new();
    for attempt in 1..=sink.max_attempts {
        let mut wait = backoff;
        match send(&target, &request, Duration::from_millis(sink.timeout_ms)) {
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
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}:{}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        delivery.sink.method,
        target.path,
        target.host,
        target.port,
        delivery.body.len()
    );
    for (name, value) in &delivery.headers {
        if header_rules::passes_from_guest(name) && header_rules::check(name, value).is_ok() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(&delivery.body);
    request
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
}

/// One attempt: connect, send, and read the response head, all within `timeout`.
fn send(target: &Target, request: &[u8], timeout: Duration) -> Result<Answer, String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let addrs = (target.host.as_str(), target.port).to_socket_addrs().map_err(|e| format!("resolving: {e}"))?;
    let mut stream = None;
    let mut error = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => error = format!("connecting to {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(error)?;
    stream.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
    stream.write_all(request).map_err(|e| format!("sending: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
        let n = stream.read(&mut chunk).map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("the sink closed the connection without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let status = response.code.unwrap_or(0);
                let retry_after = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                return Ok(Answer { status, retry_after });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("the sink's response head is too large".into()),
            Err(e) => return Err(format!("the sink's answer is not HTTP: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = |host: &str, port, path: &str| Target { host: host.into(), port, path: path.into() };
        assert_eq!(Target::parse("http://user-service:8082").unwrap(), t("user-service", 8082, "/"));
        assert_eq!(Target::parse("http://127.0.0.1:9/events?x=1").unwrap(), t("127.0.0.1", 9, "/events?x=1"));
        assert_eq!(Target::parse("http://[::1]:81/a").unwrap(), t("::1", 81, "/a"));
        assert_eq!(Target::parse("http://example").unwrap(), t("example", 80, "/"));
        for bad in ["https://x", "ftp://x", "http://", "http://a:b", "http://u@h/", "http://h/a b"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
