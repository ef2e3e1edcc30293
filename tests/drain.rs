//! Drain and restart: a rolling restart of two servers on two ports, under keep-alive load whose
//! clients do what HTTP clients and balancers do (reconnect when a response says
//! `connection: close`; send an idempotent request again, to the other server, when a connection
//! dies before its answer or a server refuses it with 503 and Retry-After), loses no request.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, guests, Client, Server};

fn start(data: &Path, functions: &Path, addr: SocketAddr) -> Server {
    let listen = addr.to_string();
    Server::start_in(
        data,
        &["--listen", &listen, "--functions-dir", functions.to_str().unwrap(), "--drain-grace-ms", "300"],
    )
}

/// One client: invokes round-robin over `addrs` until `stop`, at most 60 s.
fn client(
    addrs: [SocketAddr; 2],
    path: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let mut connections: [Option<Client>; 2] = [None, None];
    let started = Instant::now();
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
        turn += 1;
        let mut answered = false;
        // The request, then again on the other server if a connection dies under it.
        for attempt in 0..4 {
            let i = (turn + attempt) % 2;
            let connection = match &mut connections[i] {
                Some(c) => c,
                // A draining server may close its listener at any moment, so the connection that
                // succeeded is the one used.
                slot => match std::net::TcpStream::connect(addrs[i]) {
                    Ok(stream) => slot.insert(Client::over(stream)),
                    Err(_) => continue,
                },
            };
            match connection.try_request("POST", &path, &[], b"") {
                Ok(r) => {
                    if r.header("connection") == Some("close") {
                        connections[i] = None;
                    }
                    // A server still starting (or draining) refuses with 503 and Retry-After and
                    // runs nothing: like a balancer that follows readiness, go to the other one.
                    if r.status == 503 && r.header("retry-after").is_some() {
                        continue;
                    }
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(format!("{} {}", r.status, r.text()));
                    }
                    answered = true;
                    break;
                }
                Err(_) => connections[i] = None,
            }
        }
        if !answered {
            // Both servers down at once: that is a failed rolling restart.
            failures.lock().unwrap().push("no server answered".into());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_rolling_restart_of_two_servers_loses_nothing() {
    let functions = tempfile::tempdir().unwrap();
    std::fs::write(functions.path().join("hello.wasm"), guests::hello()).unwrap();
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let addrs = [free_port(), free_port()];
    let mut a = start(data_a.path(), functions.path(), addrs[0]);
    let mut b = start(data_b.path(), functions.path(), addrs[1]);
    // A directory function has the same id on both.
    let list = a.client().request("GET", "/functions", &[], b"").json();
    let id = list["functions"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(b.client().request("GET", "/functions", &[], b"").json()["functions"][0]["id"], id.as_str());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (path, stop, ok, failures) =
                (format!("/functions/{id}/invoke"), stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || client(addrs, path, stop, ok, failures))
        })
        .collect();

    let mut restarts = Vec::new();
    for (server, data) in [(&mut a, data_a.path()), (&mut b, data_b.path())] {
        std::thread::sleep(Duration::from_millis(300));
        let before = ok.load(Ordering::Relaxed);
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status:?}");
        *server = start(data, functions.path(), server.addr);
        restarts.push(ok.load(Ordering::Relaxed) - before);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let served = ok.load(Ordering::Relaxed);
    eprintln!("rolling restart: {served} invokes, {} failed; served during each restart: {restarts:?}", failures.len());
    assert!(failures.is_empty(), "requests failed: {:?}", &failures[..failures.len().min(10)]);
    assert!(served > 100 && restarts.iter().all(|n| *n > 0), "the load ran through both restarts");
}
