//! Another tenant's traffic while an attack or a bad input is handled: a client on its own
//! connection that keeps calling `/healthz` and invoking its own function until stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{guests, Client, Server};

/// The longest any bystander loop runs, whatever happens.
const BYSTANDER_LIMIT: Duration = Duration::from_secs(120);

pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<Duration>, Vec<String>)>,
}

/// What a bystander saw.
pub struct Seen {
    /// Every request's round trip, sorted.
    pub latencies: Vec<Duration>,
}

impl Seen {
    pub fn p99(&self) -> Duration {
        self.latencies[(self.latencies.len() * 99 / 100).min(self.latencies.len() - 1)]
    }

    /// Fails the test when the P99 is over `limit`.
    pub fn p99_within(&self, limit: Duration) {
        assert!(self.p99() <= limit, "the bystander's P99 was {:?}, over {limit:?}", self.p99());
    }
}

impl Bystander {
    /// A dev-mode bystander (no token, tenant 0).
    pub fn start(server: &Server) -> Bystander {
        Bystander::start_as(server, &[])
    }

    /// A bystander that sends `headers` (its token and tenant) with every request.
    pub fn start_as(server: &Server, headers: &[(&str, &str)]) -> Bystander {
        let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let hello = deploy_as(server, "bystander", &guests::hello(), &headers);
        let (addr, stop) = (server.addr, Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let mut client = Client::connect(addr);
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < BYSTANDER_LIMIT {
                for (method, path) in [("GET", "/healthz".to_string()), ("POST", format!("/functions/{hello}/invoke"))]
                {
                    let t = Instant::now();
                    let r = client.request(method, &path, &headers, b"");
                    latencies.push(t.elapsed());
                    if r.status != 200 {
                        failures.push(format!("{method} {path}: {} {}", r.status, r.text()));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (latencies, failures)
        });
        std::thread::sleep(Duration::from_millis(50));
        Bystander { stop, thread }
    }

    /// Stops; fails if the bystander was refused anything; prints and returns what it saw.
    pub fn finish(self, row: &str) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let (mut latencies, failures) = self.thread.join().unwrap();
        assert!(failures.is_empty(), "{row}: the bystander was refused: {failures:?}");
        assert!(!latencies.is_empty(), "{row}: the bystander made no request");
        latencies.sort();
        let seen = Seen { latencies };
        let max = seen.latencies[seen.latencies.len() - 1];
        eprintln!("bystander during {row}: {} requests, P99 {:?}, max {max:?}", seen.latencies.len(), seen.p99());
        seen
    }
}

/// Deploys `wasm` as `name` with `headers` (a token, a tenant); returns its id.
pub fn deploy_as(server: &Server, name: &str, wasm: &[u8], headers: &[(String, String)]) -> String {
    let r = deploy_request(&mut server.client(), headers, name, wasm, serde_json::json!({}));
    assert_eq!(r.status, 201, "deploy {name}: {}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// `POST /functions` of `wasm` as `name`, with `headers` and the fields of `extra`; the answer.
pub fn deploy_request(
    client: &mut Client,
    headers: &[(String, String)],
    name: &str,
    wasm: &[u8],
    extra: serde_json::Value,
) -> super::Response {
    let mut body = serde_json::json!({
        "name": name,
        "wasm_b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, wasm),
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    client.request("POST", "/functions", &headers, body.to_string().as_bytes())
}
