//! Crash consistency: mixed load (deploys, invokes, deletes), `kill -9` at a random moment, 20
//! times, restarting on the same data dir each time. After every restart:
//! - every acknowledged deploy is present and invocable, unless a delete of it was sent;
//! - no acknowledged delete has come back;
//! - every answered request has its audit record, and `audit verify` passes;
//! - /readyz becomes ready.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{guests, Client, Rng, Server};
use serde_json::json;

const ROUNDS: usize = 20;

/// What the clients were told, across every round.
#[derive(Default)]
struct Ledger {
    /// Acknowledged deploys (201): id to the text the function prints.
    deployed: BTreeMap<String, String>,
    /// Deletes sent, answered or not: such a function may be gone.
    delete_sent: BTreeSet<String>,
    /// Acknowledged deletes (204): these must stay gone.
    deleted: BTreeSet<String>,
    /// `x-request-id` of every answered protected request.
    answered: BTreeSet<String>,
}

/// One client's mixed load until `stop`, recording every answer in `ledger`.
fn load(addr: std::net::SocketAddr, seed: u64, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let mut rng = Rng(seed | 1);
    let mut client = Client::connect(addr);
    let started = Instant::now();
    let mut serial = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
        let live: Vec<String> = {
            let l = ledger.lock().unwrap();
            l.deployed.keys().filter(|id| !l.delete_sent.contains(*id)).cloned().collect()
        };
        let pick = rng.below(10);
        let result = if pick < 3 || live.is_empty() {
            serial += 1;
            let text = format!("f-{seed:x}-{serial}");
            let body = json!({"name": "crash", "wasm_b64": base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD, guests::write_and_exit(&text, "", 0))});
            client.try_request("POST", "/functions", &[], body.to_string().as_bytes()).inspect(|r| {
                if r.status == 201 {
                    let id = r.json()["id"].as_str().unwrap().to_string();
                    ledger.lock().unwrap().deployed.insert(id, text);
                }
            })
        } else if pick < 4 {
            let id = live[rng.index(live.len())].clone();
            ledger.lock().unwrap().delete_sent.insert(id.clone());
            client.try_request("DELETE", &format!("/functions/{id}"), &[], b"").inspect(|r| {
                if r.status == 204 {
                    ledger.lock().unwrap().deleted.insert(id.clone());
                }
            })
        } else {
            let id = &live[rng.index(live.len())];
            client.try_request("POST", &format!("/functions/{id}/invoke"), &[], b"")
        };
        match result {
            Ok(r) => {
                if let Some(request_id) = r.header("x-request-id") {
                    ledger.lock().unwrap().answered.insert(request_id.to_string());
                }
            }
            // The server died under us: this request was not answered.
            Err(_) => return,
        }
    }
}

fn tensor_wasm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn twenty_kill_9s_under_mixed_load_lose_nothing_acknowledged() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed | 1);
    let data = tempfile::tempdir().unwrap();
    let audit = data.path().join("audit");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..ROUNDS {
        let mut server = Server::start_in(data.path(), &[]);
        check(&server, &ledger.lock().unwrap(), round);

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..2)
            .map(|i| {
                let (addr, stop, ledger, seed) = (server.addr, stop.clone(), ledger.clone(), rng.next() ^ i);
                std::thread::spawn(move || load(addr, seed, stop, ledger))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        let (ok, out) = tensor_wasm(&["audit", "verify", audit.to_str().unwrap()]);
        assert!(ok, "round {round}: audit verify failed:\n{out}");
    }
    let server = Server::start_in(data.path(), &[]);
    let ledger = ledger.lock().unwrap();
    check(&server, &ledger, ROUNDS);
    eprintln!(
        "{ROUNDS} kills: {} deploys acknowledged, {} deletes acknowledged, {} answered requests all audited",
        ledger.deployed.len(),
        ledger.deleted.len(),
        ledger.answered.len()
    );
    assert!(ledger.deployed.len() >= ROUNDS, "the load did too little to mean anything");
}

/// The invariants, on a freshly restarted (and ready) server.
fn check(server: &Server, ledger: &Ledger, round: usize) {
    let mut client = server.client();
    for (id, text) in &ledger.deployed {
        let r = client.invoke(id, b"");
        if ledger.deleted.contains(id) {
            assert_eq!(r.status, 404, "round {round}: acknowledged delete of {id} came back");
        } else if !ledger.delete_sent.contains(id) {
            assert_eq!((r.status, r.text()), (200, text.clone()), "round {round}: acknowledged deploy {id} lost");
        }
    }
    let (ok, out) = tensor_wasm(&["audit", "tail", "-n", "10000000", server.data_dir.join("audit").to_str().unwrap()]);
    assert!(ok, "{out}");
    let recorded: BTreeSet<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["request_id"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<_> = ledger.answered.difference(&recorded).collect();
    assert!(missing.is_empty(), "round {round}: answered requests without an audit record: {missing:?}");
}
