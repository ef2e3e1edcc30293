//! Delivering a pipeline's final output to its sink: one HTTP/1.1 request per attempt, retried on
//! 5xx, 429 and connection failures with exponential backoff (or the sink's `retry-after`).
//!
//! Deliveries run on a small pool of blocking threads fed by a bounded queue, so that name lookups,
//! connects and backoff sleeps never run on a shard. A full queue is 503 `overloaded`.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::oneshot;

use super::record::Sink;
use crate::error::ApiError;
use crate::http::client::{self, Target};
use crate::http::header_rules;
use crate::wasm::envelope::Headers;

/// Longest wait between two attempts, whatever the backoff or `retry-after` says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(
        delivery
            .headers
            .iter()
            .filter(|(name, value)| header_rules::passes_from_guest(name) && header_rules::check(name, value).is_ok())
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    client::encode_request(&delivery.sink.method, target, &headers, &delivery.body)
}

/// One attempt: connect, send, and read the answer's head (only its status and `retry-after`
/// matter), all within `timeout`.
fn send(target: &Target, request: &[u8], timeout: Duration) -> Result<Answer, String> {
    let answer = client::exchange(target, request, timeout, None, None)?;
    let retry_after = answer.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
    Ok(Answer { status: answer.status, retry_after })
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
}
