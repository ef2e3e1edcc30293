//! A fleet on NATS JetStream (issue 35, items 1 to 3): three replicas, each with a data dir of its
//! own, share a real `nats-server -js` started here. A deploy answered by one serves on all, a
//! delete stops all, NATS going away leaves every replica serving what it had while changes are
//! refused with 503 `registry_unavailable`, and a replica catches up with what it missed.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::nats::Nats;
use common::{guests, within, Server};
use serde_json::json;

/// How long a change may take to reach every replica here: the issue's bound is 1 s; a loaded CI
/// machine gets room, and each test prints what it measured.
const PROPAGATION: Duration = Duration::from_secs(5);

fn replica(nats: &Nats, data_dir: &std::path::Path) -> Server {
    Server::start_in(data_dir, &["--registry", &nats.url(), "--registry-timeout-ms", "2000"])
}

fn status_of(server: &Server, id: &str) -> u16 {
    server.client().invoke(id, b"").status
}

/// Waits until `id` answers `status` on every replica; returns how long the slowest took.
fn everywhere(servers: &[&Server], id: &str, status: u16, what: &str) -> Duration {
    let started = Instant::now();
    for s in servers {
        within(PROPAGATION, what, || status_of(s, id) == status);
    }
    started.elapsed()
}

#[test]
fn a_deploy_on_one_replica_serves_on_every_replica_and_a_delete_stops_every_one() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Server> = dirs.iter().map(|d| replica(&nats, d.path())).collect();
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    for s in &servers {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }

    let id = a.deploy("hello", &guests::hello());
    // The answering replica serves it at once.
    assert_eq!(status_of(a, &id), 200);
    let took = everywhere(&[b, c], &id, 200, "the deploy reaching B and C");
    eprintln!("fleet: a deploy reached the other two replicas within {took:?}");
    // Each timed it, from JetStream's timestamp to serving it; A, which answered, applied nothing.
    for s in [b, c] {
        assert_eq!(s.metric("tensor_wasm_registry_propagation_seconds_count", &[]), 1.0);
        let on_time = s.metric("tensor_wasm_registry_propagation_seconds_bucket", &[("le", "5")]);
        assert_eq!(on_time, 1.0, "a deploy on loopback took more than 5 s to propagate");
    }
    assert_eq!(a.metric("tensor_wasm_registry_propagation_seconds_count", &[]), 0.0);
    let listed = b.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!((listed["name"].as_str(), listed["source"].as_str()), (Some("hello"), Some("api")));

    // Resident tensors travel too: the digits example, deployed on B with its weights, classifies
    // on C, which fetched the module and the safetensors file from the object store.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let weights = std::fs::read(repo.join("examples/digits/digits.safetensors")).unwrap();
    let holdout = std::fs::read_to_string(repo.join("examples/digits/holdout.jsonl")).unwrap();
    let sample = holdout.lines().next().unwrap();
    let tensors = base64::engine::general_purpose::STANDARD.encode(&weights);
    let r = b.client().deploy("digits", &guests::digits_example(), json!({ "tensors_b64": tensors }));
    assert_eq!(r.status, 201, "{}", r.text());
    let digits = r.json()["id"].as_str().unwrap().to_string();
    within(PROPAGATION, "digits reaching C", || c.client().invoke(&digits, sample.as_bytes()).status == 200);
    let classified = c.client().invoke(&digits, sample.as_bytes()).json();
    assert_eq!(classified["class"], 1, "sample 1000 is a 1: {classified}");

    // A delete on C stops every replica.
    let r = c.client().request("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    let took = everywhere(&[a, b, c], &id, 404, "the delete reaching every replica");
    eprintln!("fleet: a delete reached every replica within {took:?}");
    // Each replica deployed and deleted through the registry alone: one sync each, no reconnect.
    for s in &servers {
        assert_eq!(s.metric("tensor_wasm_registry_syncs_total", &[]), 1.0);
    }
}

#[test]
fn without_nats_replicas_serve_on_refuse_changes_and_catch_up_when_it_returns() {
    let mut nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let mut b = replica(&nats, dirs[1].path());
    let kept = a.deploy("kept", &guests::hello());
    let doomed = a.deploy("doomed", &guests::hello());
    everywhere(&[&b], &kept, 200, "kept reaching B");
    everywhere(&[&b], &doomed, 200, "doomed reaching B");

    nats.stop();
    for s in [&a, &b] {
        within(PROPAGATION, "the replica noticing NATS is gone", || {
            s.metric("tensor_wasm_registry_connected", &[]) == 0.0
        });
        // Serving its last known catalog.
        assert_eq!(status_of(s, &kept), 200);
    }
    // Changes are refused, not half made.
    let r = a.client().deploy("refused", &guests::hello(), json!({}));
    assert_eq!((r.status, r.error_kind()), (503, "registry_unavailable".to_string()), "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let r = b.client().request("DELETE", &format!("/functions/{kept}"), &[], b"");
    assert_eq!((r.status, r.error_kind()), (503, "registry_unavailable".to_string()), "{}", r.text());
    assert_eq!(status_of(&a, &kept), 200);
    assert!(a.function_id("refused").is_none(), "a refused deploy left a function behind");
    assert!(a.metric("tensor_wasm_registry_stale_seconds", &[]) > 0.0);
    // The operator's board says so, and calls the replica unhealthy; /readyz stays 200 on the
    // last known catalog.
    let server = format!("http://{}", a.addr);
    let (code, out, _) = common::tensor_wasm(&["observe", "--once", "--interval", "200ms", "--server", &server], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("registry     AWAY for") && out.contains("the registry is away for"), "{out}");
    assert!(out.contains("readyz 200"), "{out}");

    // B goes away too; meanwhile NATS returns, and A deletes one function and deploys another.
    b.kill9();
    nats.restart();
    a.wait_for_metric("tensor_wasm_registry_syncs_total", &[], 2.0);
    assert_eq!(a.metric("tensor_wasm_registry_connected", &[]), 1.0);
    let r = a.client().request("DELETE", &format!("/functions/{doomed}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    // The deploy refused during the outage, retried.
    let retried = a.deploy("refused", &guests::hello());
    drop(b);

    // B restarts from its cache: it serves at once what it knew, then catches up with what it
    // missed: the deploy made while it was away, and the delete.
    let b = replica(&nats, dirs[1].path());
    assert_eq!(status_of(&b, &kept), 200);
    everywhere(&[&b], &retried, 200, "B catching up with a deploy it missed");
    everywhere(&[&b], &doomed, 404, "B catching up with a delete it missed");
}

#[test]
fn a_replica_without_a_cache_is_ready_only_once_in_step_with_nats() {
    let mut nats = Nats::start();
    nats.stop();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(dir.path(), &["--registry", &nats.url(), "--registry-timeout-ms", "2000"], |_| {});
    // It listens, but with no catalog to serve it is not ready.
    within(PROPAGATION, "the replica listening", || {
        server.client().try_request("GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(server.client().request("GET", "/readyz", &[], b"").status, 503);
    nats.restart();
    within(PROPAGATION, "the replica ready once in step", || {
        server.client().request("GET", "/readyz", &[], b"").status == 200
    });
}

#[test]
fn a_replica_started_while_nats_is_down_serves_from_its_cache() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let a = replica(&nats, dir.path());
        a.deploy("cached", &guests::hello())
    };
    nats.stop();
    // Ready from its data dir, with NATS nowhere: it serves, and refuses changes.
    let a = replica(&nats, dir.path());
    assert_eq!(status_of(&a, &id), 200);
    assert_eq!(a.metric("tensor_wasm_registry_connected", &[]), 0.0);
    // How old its catalog is counts from the cache's last sync, kept in the data dir.
    assert!(a.metric("tensor_wasm_registry_stale_seconds", &[]) > 0.0);
    let r = a.client().deploy("new", &guests::hello(), json!({}));
    assert_eq!(r.status, 503, "{}", r.text());
    // And joins once NATS is back.
    nats.restart();
    a.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    let r = a.client().deploy("new", &guests::hello(), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn a_registry_that_lost_its_storage_is_filled_again_from_the_replicas_caches() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&nats, dir.path());
    let id = a.deploy("survivor", &guests::hello());
    // NATS comes back empty: a new bucket, not a fleet that deleted everything.
    nats.wipe();
    within(PROPAGATION, "A in step with the new registry", || {
        a.metric("tensor_wasm_registry_syncs_total", &[]) >= 2.0
            && a.metric("tensor_wasm_registry_connected", &[]) == 1.0
    });
    assert_eq!(status_of(&a, &id), 200, "A kept its function");
    assert!(a.stderr().contains("publishing this cache's functions to it"), "{}", a.stderr());
    // A replica that joins now gets it from the registry A filled again.
    let fresh = tempfile::tempdir().unwrap();
    let b = replica(&nats, fresh.path());
    everywhere(&[&b], &id, 200, "the republished function reaching a new replica");
}

#[test]
fn a_function_whose_files_could_not_be_fetched_is_fetched_again() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let id = a.deploy("first", &guests::hello());
    let digest =
        a.client().request("GET", &format!("/functions/{id}"), &[], b"").json()["digest"].as_str().unwrap().to_string();
    // The module's object goes missing from the store.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let objects = async_nats::jetstream::new(client).get_object_store("tensor-wasm-objects").await.unwrap();
        objects.delete(digest.strip_prefix("sha256:").unwrap()).await.unwrap();
    });
    // A new replica lists the function as broken: it cannot fetch its module.
    let b = replica(&nats, dirs[1].path());
    within(PROPAGATION, "B listing the function", || {
        b.client().request("GET", &format!("/functions/{id}"), &[], b"").status == 200
    });
    let r = b.client().invoke(&id, b"");
    assert_eq!((r.status, r.error_kind()), (503, "function_unavailable".to_string()), "{}", r.text());
    // The same module deployed again puts the object back; B fetches it at its next retry.
    a.deploy("again", &guests::hello());
    within(Duration::from_secs(15), "B fetching the module again", || status_of(&b, &id) == 200);
}

#[test]
fn a_full_object_store_refuses_deploys_with_507_and_changes_nothing() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--registry", &nats.url(), "--registry-max-object-mb", "1"];
    let a = Server::start_in(dir.path(), &args);
    // A module of 1.5 MiB (a data segment of zeros) cannot fit a store of 1 MiB.
    let big = wat::parse_str(format!(
        r#"(module (memory 32) (data (i32.const 0) "{}") (func (export "_start")))"#,
        "\\00".repeat(3 << 19)
    ))
    .unwrap();
    let r = a.client().deploy("big", &big, json!({}));
    assert_eq!((r.status, r.error_kind()), (507, "registry_full".to_string()), "{}", r.text());
    assert!(r.text().contains("object store is full"), "{}", r.text());
    assert!(r.header("retry-after").is_none(), "a retry cannot help");
    assert!(a.function_id("big").is_none());
    // Small ones still fit, and the replica serves on.
    let small = a.deploy("small", &guests::hello());
    assert_eq!(status_of(&a, &small), 200);
}

/// Puts `value` under `key` in the registry's bucket, as anyone with access to NATS could.
/// The functions named `name` that `server` lists: their ids.
fn named(server: &Server, name: &str) -> Vec<String> {
    let list = server.client().request("GET", "/functions", &[], b"").json();
    let functions = list["functions"].as_array().cloned().unwrap_or_default();
    functions.iter().filter(|f| f["name"] == name).map(|f| f["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn deploys_of_one_name_that_overlap_on_two_replicas_leave_one_winner_everywhere() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Server> = dirs.iter().map(|d| replica(&nats, d.path())).collect();
    for s in &servers {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    for round in 0..3u32 {
        let name = format!("raced-{round}");
        // Two different modules, each compiled on its replica after the deploy read the name's
        // revision: both have read it before either publishes.
        let modules = [guests::slow_to_compile(2 * round), guests::slow_to_compile(2 * round + 1)];
        let start = std::sync::Barrier::new(2);
        let answers: Vec<common::Response> = std::thread::scope(|scope| {
            let racers: Vec<_> = servers[..2]
                .iter()
                .zip(&modules)
                .map(|(server, module)| {
                    let (start, name) = (&start, &name);
                    scope.spawn(move || {
                        let mut client = server.client();
                        start.wait();
                        client.deploy(name, module, json!({}))
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
        let winner = statuses.iter().position(|&s| s == 201);
        let loser = statuses.iter().position(|&s| s == 409);
        let (Some(winner), Some(loser)) = (winner, loser) else {
            panic!(
                "round {round}: one deploy must win and the other get 409, got {statuses:?}: {:?}",
                answers.iter().map(|r| r.text()).collect::<Vec<_>>()
            );
        };
        assert_eq!(answers[loser].error_kind(), "conflict", "{}", answers[loser].text());
        let id = answers[winner].json()["id"].as_str().unwrap().to_string();
        // The winner, and only it, on every replica: the loser left nothing anywhere.
        for s in &servers {
            within(PROPAGATION, "the winner on every replica", || named(s, &name) == [id.clone()]);
        }
        assert_eq!(status_of(&servers[loser], &id), 200);
    }
    // A deploy of a taken name that starts after the last one finished is no race: it is
    // deployed beside it, as on a single node.
    let again = servers[2].client().deploy("raced-0", &guests::hello(), json!({}));
    assert_eq!(again.status, 201, "{}", again.text());
    for s in &servers {
        within(PROPAGATION, "both functions of the name", || named(s, "raced-0").len() == 2);
    }
}

/// The ids of the functions named `name` that the registry's bucket holds, read from NATS itself.
fn registered(nats: &Nats, name: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use futures_util::TryStreamExt as _;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let kv = async_nats::jetstream::new(client).get_key_value("tensor-wasm-functions").await.unwrap();
        let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
        let mut ids = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with("f.")) {
            let Some(value) = kv.get(key.as_str()).await.unwrap() else { continue };
            let record: serde_json::Value = serde_json::from_slice(&value).unwrap();
            if record["name"] == name {
                ids.push(record["id"].as_str().unwrap().to_string());
            }
        }
        ids
    })
}

#[test]
fn a_replica_killed_mid_deploy_leaves_the_deploy_on_every_replica_or_on_none() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Server> = dirs.iter().map(|d| replica(&nats, d.path())).collect();
    for s in &servers {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    // How long such a deploy takes here, undisturbed: the kill moments spread over 0 to 1.5 times
    // it, so that some rounds die before the publish and some after, on a fast machine or a slow.
    let started = Instant::now();
    servers[1].deploy("probe", &guests::slow_to_compile(99));
    let deploy_time = started.elapsed();
    eprintln!("fleet: an undisturbed deploy took {deploy_time:?}");
    let (mut landed, mut acknowledged) = (0, 0);
    for round in 0..10u32 {
        let name = format!("killed-{round}");
        let module = guests::slow_to_compile(100 + round);
        let addr = servers[0].addr;
        // The deploy runs on A while A is killed at a different moment each round: before the
        // compile ends, while it publishes, and after it answered.
        let deploy = std::thread::spawn(move || {
            let mut body = json!({"name": name, "wasm_b64": base64::engine::general_purpose::STANDARD.encode(&module)});
            body["timeout_ms"] = json!(1000);
            common::Client::connect(addr)
                .try_request("POST", "/functions", &[("content-type", "application/json")], body.to_string().as_bytes())
                .map(|r| r.status)
        });
        // Round 9 waits for the answer: at least one deploy lands, whatever this machine's pace.
        // Rounds 0 to 8 spread over 0 to twice the undisturbed time: a loaded machine compiles
        // slower than the probe did.
        let answered = if round == 9 {
            let answered = deploy.join().unwrap();
            servers[0].kill9();
            answered
        } else {
            std::thread::sleep(deploy_time * round / 4);
            servers[0].kill9();
            deploy.join().unwrap()
        };
        servers[0] = replica(&nats, dirs[0].path());
        servers[0].wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
        let name = format!("killed-{round}");
        let truth = registered(&nats, &name);
        assert!(truth.len() <= 1, "round {round}: {truth:?}");
        if matches!(answered, Ok(201)) {
            acknowledged += 1;
            assert_eq!(truth.len(), 1, "round {round}: a deploy answered 201 is in the registry");
        }
        landed += truth.len();
        // Every replica, the killed one included, shows exactly what the registry holds.
        for s in &servers {
            within(PROPAGATION, "the registry's state on every replica", || named(s, &name) == truth);
        }
    }
    eprintln!("fleet: of 10 deploys killed midway, {landed} landed everywhere ({acknowledged} answered before the kill), the rest nowhere");
    // Round 0's kill comes before any compile could end, round 9's after the answer.
    assert!(landed > 0 && landed < 10, "{landed} of 10 deploys landed");
    // Nothing half-done is served by the replicas that stayed up: no function whose files are
    // missing there.
    for s in &servers {
        assert_eq!(s.metric("tensor_wasm_functions_broken", &[]), 0.0);
    }
}

const FLEET_TOKEN: &str = "fleet-token-0123456789abcdef0123";
/// The fleet's rate for FLEET_TOKEN, and its burst.
const FLEET_QPS: f64 = 100.0;
const FLEET_BURST: f64 = 10.0;

/// A replica whose token FLEET_TOKEN may make FLEET_QPS requests a second across the fleet.
fn rate_limited_replica(nats: &Nats, data_dir: &std::path::Path) -> Server {
    let args = ["--registry", &nats.url(), "--rate-limit-qps", "100", "--rate-limit-burst", "10"];
    Server::start_with(data_dir, &args, |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", format!("{FLEET_TOKEN}:tenant=*"));
    })
}

/// Sends `GET /functions` with FLEET_TOKEN to each server at its own steady rate (requests a
/// second), one thread each, for `warmup + window`. Returns, per server, the requests admitted and
/// refused that were sent within the window.
fn paced(servers: &[&Server], rates: &[f64], warmup: Duration, window: Duration) -> Vec<(u64, u64)> {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let senders: Vec<_> = servers
            .iter()
            .zip(rates)
            .map(|(server, &rate)| {
                scope.spawn(move || {
                    let mut client = server.client();
                    let auth = format!("Bearer {FLEET_TOKEN}");
                    let gap = Duration::from_secs_f64(1.0 / rate);
                    let (mut admitted, mut refused) = (0, 0);
                    // Bounded in count by the rate and in time by the window.
                    let sends = (rate * (warmup + window).as_secs_f64()) as u32;
                    for i in 0..sends {
                        let due = started + gap * i;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let sent = started.elapsed();
                        if sent >= warmup + window {
                            break;
                        }
                        let r = client.request("GET", "/functions", &[("authorization", &auth)], b"");
                        if sent < warmup {
                            continue;
                        }
                        match r.status {
                            200 => admitted += 1,
                            429 => refused += 1,
                            other => panic!("unexpected {other}: {}", r.text()),
                        }
                    }
                    (admitted, refused)
                })
            })
            .collect();
        senders.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

#[test]
fn three_replicas_with_uneven_load_admit_the_configured_rate_between_them() {
    let mut nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Server> = dirs.iter().map(|d| rate_limited_replica(&nats, d.path())).collect();
    for s in &servers {
        within(PROPAGATION, "every replica hearing the other two", || {
            s.metric("tensor_wasm_fleet_replicas", &[]) == 3.0
        });
    }
    // Twice the rate, split 70/20/10: each replica alone would admit up to the whole rate.
    let window = Duration::from_secs(10);
    let rates = [1.4 * FLEET_QPS, 0.4 * FLEET_QPS, 0.2 * FLEET_QPS];
    let counts = paced(&servers.iter().collect::<Vec<_>>(), &rates, Duration::from_secs(2), window);
    let admitted: u64 = counts.iter().map(|c| c.0).sum();
    let due = FLEET_QPS * window.as_secs_f64();
    let (low, high) = (0.9 * due, 1.1 * due + FLEET_BURST);
    eprintln!("fleet: 3 replicas offered 70/20/10 of twice the rate admitted {admitted} in {window:?} ({counts:?}); due {due}");
    assert!((low..=high).contains(&(admitted as f64)), "admitted {admitted}, expected {low}..={high}: {counts:?}");
    // Each replica admitted some: the busy one did not take it all, and the quiet ones were
    // not starved.
    assert!(counts.iter().all(|&(a, _)| a > 0), "{counts:?}");

    // A replica that stops reporting is forgotten, and the others share the rate between them.
    servers.pop().unwrap().kill9();
    for s in &servers {
        within(PROPAGATION, "the killed replica forgotten", || s.metric("tensor_wasm_fleet_replicas", &[]) == 2.0);
    }

    // Without NATS, each replica admits the rate divided by the replicas it last knew of, never
    // the whole rate: here the busy one alone gets half.
    nats.stop();
    within(PROPAGATION, "the replica noticing NATS gone", || {
        servers[0].metric("tensor_wasm_fleet_limits_connected", &[]) == 0.0
    });
    let window = Duration::from_secs(4);
    let counts = paced(&[&servers[0]], &[FLEET_QPS], Duration::from_millis(500), window);
    let due = FLEET_QPS / 2.0 * window.as_secs_f64();
    let (low, high) = (0.9 * due, 1.1 * due + FLEET_BURST);
    eprintln!("fleet: with NATS away, one of 2 replicas admitted {counts:?} in {window:?}; due {due}");
    assert!((low..=high).contains(&(counts[0].0 as f64)), "admitted {counts:?}, expected {low}..={high}");
    assert_eq!(servers[0].metric("tensor_wasm_fleet_replicas", &[]), 2.0);
    let board = format!("http://{}", servers[0].addr);
    let (_, out, _) = common::tensor_wasm(&["observe", "--once", "--interval", "200ms", "--server", &board], &[]);
    assert!(out.contains("limits       2 replicas   NATS AWAY"), "{out}");

    // Restarted with NATS still away, a replica divides by the count its data dir kept.
    drop(servers.remove(1));
    servers[0].kill9();
    let restarted = rate_limited_replica(&nats, dirs[0].path());
    assert_eq!(restarted.metric("tensor_wasm_fleet_replicas", &[]), 2.0);
}

/// Whether the registry's object store holds the object of `digest` (`sha256:<hex>`), read from
/// NATS itself.
fn object_stored(nats: &Nats, digest: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let store = async_nats::jetstream::new(client).get_object_store("tensor-wasm-objects").await.unwrap();
        let name = digest.strip_prefix("sha256:").unwrap();
        store.info(name).await.is_ok_and(|info| !info.deleted)
    })
}

/// A module of about `kib` KiB whose bytes differ with `seed`: a data segment of them.
fn module_of(kib: usize, seed: u32) -> Vec<u8> {
    let bytes: String =
        (0..kib * 1024).map(|i| format!("\\{:02x}", (i as u32).wrapping_mul(seed | 1) >> 3 & 0xff)).collect();
    let pages = kib / 64 + 1;
    wat::parse_str(format!(r#"(module (memory {pages}) (data (i32.const 0) "{bytes}") (func (export "_start")))"#))
        .unwrap()
}

#[test]
fn a_deleted_functions_files_leave_the_object_store_once_no_function_uses_them() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // A store of 1 MiB: three of the modules below fill it.
    // The delete's clean-up 2.1 s after it (the timeout and the propagation bound).
    let args = [
        "--registry",
        &nats.url(),
        "--registry-max-object-mb",
        "1",
        "--registry-timeout-ms",
        "2000",
        "--registry-propagation-ms",
        "100",
    ];
    let (a, b) = (Server::start_in(dirs[0].path(), &args), Server::start_in(dirs[1].path(), &args));
    for s in [&a, &b] {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    // A tenant that deploys and deletes new modules, over and over, never fills the store for
    // everyone else: each delete takes its module out.
    for round in 0..8u32 {
        let module = module_of(300, round);
        let r = a.client().deploy(&format!("churn-{round}"), &module, json!({}));
        assert_eq!(r.status, 201, "round {round}: {}", r.text());
        let (id, digest) =
            (r.json()["id"].as_str().unwrap().to_string(), r.json()["digest"].as_str().unwrap().to_string());
        assert!(object_stored(&nats, &digest));
        let r = b.client().request("DELETE", &format!("/functions/{id}"), &[], b"");
        assert_eq!(r.status, 204, "{}", r.text());
        within(PROPAGATION, "the unused module leaving the store", || !object_stored(&nats, &digest));
    }
    // A module two functions run stays until the second goes.
    let module = module_of(300, 99);
    let first = a.deploy("shared-1", &module);
    within(PROPAGATION, "the first on B", || status_of(&b, &first) == 200);
    let second = b.deploy("shared-2", &module);
    let digest = a.client().request("GET", &format!("/functions/{first}"), &[], b"").json()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    within(PROPAGATION, "the second on A", || status_of(&a, &second) == 200);
    assert_eq!(a.client().request("DELETE", &format!("/functions/{first}"), &[], b"").status, 204);
    assert!(object_stored(&nats, &digest), "a module another function runs was removed");
    within(PROPAGATION, "the delete reaching B", || status_of(&b, &first) == 404);
    // B, which never had the module from A's deploy alone, still serves the second, and a new
    // replica fetches it.
    assert_eq!(status_of(&b, &second), 200);
    let dir = tempfile::tempdir().unwrap();
    let c = Server::start_in(dir.path(), &args);
    within(PROPAGATION, "the second on a new replica", || status_of(&c, &second) == 200);
    assert_eq!(b.client().request("DELETE", &format!("/functions/{second}"), &[], b"").status, 204);
    within(PROPAGATION, "the module leaving with its last function", || !object_stored(&nats, &digest));
}

#[test]
fn pipelines_are_fleet_wide_and_records_put_into_the_bucket_by_others_are_checked() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Server> = dirs.iter().map(|d| replica(&nats, d.path())).collect();
    for s in &servers {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    a.deploy("shout", &guests::echo());
    let spec = json!({"name": "twice", "steps": ["shout", "shout"]}).to_string();
    let r = a.client().request("POST", "/pipelines", &[("content-type", "application/json")], spec.as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let invoke = |s: &Server| s.client().request("POST", &format!("/pipelines/{id}/invoke"), &[], b"hi").status;
    // Created on A, it runs on B and C.
    for s in [b, c] {
        within(PROPAGATION, "the pipeline on every replica", || invoke(s) == 200);
    }
    let listed = c.client().request("GET", &format!("/pipelines/{id}"), &[], b"").json();
    assert_eq!(listed["name"], "twice", "{listed}");
    // Deleted on C, it is gone everywhere.
    assert_eq!(c.client().request("DELETE", &format!("/pipelines/{id}"), &[], b"").status, 204);
    for s in [a, b] {
        within(PROPAGATION, "the delete on every replica", || invoke(s) == 404);
    }
    // A replica away while one pipeline is created and another deleted catches up at its resync.
    let create = |s: &Server, name: &str| {
        let spec = json!({"name": name, "steps": ["shout"]}).to_string();
        let r = s.client().request("POST", "/pipelines", &[("content-type", "application/json")], spec.as_bytes());
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let get = |s: &Server, id: &str| s.client().request("GET", &format!("/pipelines/{id}"), &[], b"").status;
    let doomed = create(a, "doomed");
    within(PROPAGATION, "doomed on C", || get(c, &doomed) == 200);
    servers[2].kill9();
    let kept = create(&servers[1], "kept");
    assert_eq!(servers[0].client().request("DELETE", &format!("/pipelines/{doomed}"), &[], b"").status, 204);
    servers[2] = replica(&nats, dirs[2].path());
    within(PROPAGATION, "C caught up", || get(&servers[2], &kept) == 200 && get(&servers[2], &doomed) == 404);

    // Records others wrote into the bucket go through this server's own checks: a sink to the
    // cloud metadata address, a pipeline of more steps than any server takes, an id that is not
    // of our form, a directory pipeline. None is served anywhere.
    let good = |id: &str| {
        json!({"id": id, "name": "forged", "tenant_id": 0, "created_unix_ms": 1, "timeout_ms": 1000,
               "steps": [{"function": "shout", "timeout_ms": null}], "sink": null, "source": "api"})
    };
    let mut metadata_sink = good("0123456789abcdef0123456789abcde1");
    metadata_sink["sink"] = json!({"url": "http://169.254.169.254/latest", "method": "POST", "max_attempts": 1,
                                    "timeout_ms": 1000, "backoff_ms": 100});
    let mut too_long = good("0123456789abcdef0123456789abcde2");
    too_long["steps"] = json!(vec![json!({"function": "shout", "timeout_ms": null}); 33]);
    let mut directory = good("0123456789abcdef0123456789abcde3");
    directory["source"] = json!("directory");
    let bad_id = good("../../etc/passwd");
    for (key, record) in [
        ("p.0123456789abcdef0123456789abcde1", metadata_sink),
        ("p.0123456789abcdef0123456789abcde2", too_long),
        ("p.0123456789abcdef0123456789abcde3", directory),
        ("p.0123456789abcdef0123456789abcde4", bad_id),
    ] {
        put_raw(&nats, key, record);
    }
    // One well-formed forged record, put last, shows the watch got this far.
    put_raw(&nats, "p.0123456789abcdef0123456789abcde5", good("0123456789abcdef0123456789abcde5"));
    for s in &servers {
        let path = "/pipelines/0123456789abcdef0123456789abcde5";
        within(PROPAGATION, "the well-formed record applied", || {
            s.client().request("GET", path, &[], b"").status == 200
        });
        let list = s.client().request("GET", "/pipelines", &[], b"").json();
        let ids: Vec<&str> = list["pipelines"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 2, "only kept and the well-formed one: {ids:?}");
        assert!(ids.contains(&kept.as_str()), "{ids:?}");
    }
}

/// Messages in the registry bucket's stream: a live entry or a delete marker each.
fn bucket_messages(nats: &Nats) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut stream = async_nats::jetstream::new(client).get_stream("KV_tensor-wasm-functions").await.unwrap();
        stream.info().await.unwrap().state.messages
    })
}

#[test]
fn deletes_leave_no_markers_behind_once_every_replica_has_seen_them() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Markers are purged ten propagation bounds after their delete, and at least a deploy's
    // timeout and a bound: 1.1 s here.
    let args = ["--registry", &nats.url(), "--registry-propagation-ms", "100", "--registry-timeout-ms", "1000"];
    let (a, b) = (Server::start_in(dirs[0].path(), &args), Server::start_in(dirs[1].path(), &args));
    for s in [&a, &b] {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    // A tenant deploying and deleting in a loop, with a pipeline each time.
    for round in 0..5 {
        let id = a.deploy(&format!("churn-{round}"), &guests::echo());
        let spec = json!({"name": format!("p-{round}"), "steps": [format!("churn-{round}")]}).to_string();
        let r = a.client().request("POST", "/pipelines", &[("content-type", "application/json")], spec.as_bytes());
        let pipeline = r.json()["id"].as_str().unwrap().to_string();
        within(PROPAGATION, "the function on B", || status_of(&b, &id) == 200);
        assert_eq!(b.client().request("DELETE", &format!("/pipelines/{pipeline}"), &[], b"").status, 204);
        assert_eq!(b.client().request("DELETE", &format!("/functions/{id}"), &[], b"").status, 204);
        within(PROPAGATION, "the delete on A", || status_of(&a, &id) == 404);
    }
    let kept = a.deploy("kept", &guests::echo());
    // What stays: the kept function's record and its name's key.
    within(PROPAGATION, "the markers purged", || bucket_messages(&nats) == 2);
    // The purge took nothing live: both replicas serve the kept function, and one started now
    // lists exactly it.
    let dir = tempfile::tempdir().unwrap();
    let c = Server::start_in(dir.path(), &args);
    for s in [&a, &b, &c] {
        within(PROPAGATION, "the kept function everywhere", || status_of(s, &kept) == 200);
        let list = s.client().request("GET", "/functions", &[], b"").json();
        assert_eq!(list["functions"].as_array().unwrap().len(), 1, "{list}");
    }
    // A name deployed again after its marker went is claimed afresh.
    let r = a.client().deploy("churn-0", &guests::echo(), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Deletes an object from the registry's store behind every replica's back: a NATS that lost it.
fn lose_object(nats: &Nats, digest: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let store = async_nats::jetstream::new(client).get_object_store("tensor-wasm-objects").await.unwrap();
        store.delete(digest.strip_prefix("sha256:").unwrap()).await.unwrap();
    })
}

#[test]
fn a_file_the_object_store_lost_is_stored_again_by_a_replica_that_has_it() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = ["--registry", &nats.url(), "--registry-repair-interval-ms", "200"];
    let a = Server::start_in(dirs[0].path(), &args);
    a.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    let module = module_of(16, 31337);
    let r = a.client().deploy("precious", &module, json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let (id, digest) = (r.json()["id"].as_str().unwrap().to_string(), r.json()["digest"].as_str().unwrap().to_string());
    lose_object(&nats, &digest);
    assert!(!object_stored(&nats, &digest));
    // A, which serves it from its own copy, notices and stores it again.
    within(PROPAGATION, "the lost module stored again", || object_stored(&nats, &digest));
    // Counted once NATS acknowledged it, a moment after it is visible there.
    a.wait_for_metric("tensor_wasm_registry_repairs_total", &[], 1.0);
    // A replica that joins now fetches it.
    let b = Server::start_in(dirs[1].path(), &args);
    within(PROPAGATION, "the function on a new replica", || status_of(&b, &id) == 200);
}

fn put_raw(nats: &Nats, key: &str, value: serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let kv = async_nats::jetstream::new(client).get_key_value("tensor-wasm-functions").await.unwrap();
        kv.put(key, value.to_string().into()).await.unwrap();
    });
}

#[test]
fn records_written_into_the_bucket_by_others_are_checked_before_anything_is_trusted() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&nats, dir.path());
    let good = a.deploy("good", &guests::hello());
    let record = a.client().request("GET", &format!("/functions/{good}"), &[], b"").json();
    let digest = record["digest"].as_str().unwrap().to_string();
    let base = json!({
        "id": "", "name": "evil", "digest": digest, "created_unix_ms": 1, "timeout_ms": 1000,
        "memory_limit_mb": 16, "tenant_id": 0, "abi": "command", "source": "api", "env": {},
    });
    let hex = "0123456789abcdef0123456789abcdef";
    // The record with `id`, and `field` set to `value`.
    let record_with = |id: &str, field: &str, value: serde_json::Value| {
        let mut r = base.clone();
        r["id"] = json!(id);
        r[field] = value;
        r
    };
    let outside = dir.path().join("functions").join("a");
    let key = format!("f.{hex}");
    for (key, value) in [
        // An id that would name a file in another folder (NATS refuses keys with empty tokens,
        // so `..` cannot come through as `a/../..`; a slash can).
        ("f.a/escaped".to_string(), record_with("a/escaped", "name", json!("evil"))),
        // An id that is not its key's.
        (key.clone(), record_with("ffffffffffffffffffffffffffffffff", "name", json!("evil"))),
        (key.clone(), record_with(hex, "digest", json!("sha256:../../x"))),
        (key.clone(), record_with(hex, "tensors", json!("../weights"))),
        (key.clone(), record_with(hex, "source", json!("directory"))),
        (key.clone(), record_with(hex, "timeout_ms", json!(u64::MAX))),
        (key.clone(), record_with(hex, "name", json!("../x"))),
        ("f.notjson".to_string(), json!("just a string")),
    ] {
        put_raw(&nats, &key, value);
    }
    // Well-formed, but an envelope function whose module is no WASI command: listed as broken,
    // as a deploy here would have been refused.
    let exports = a.deploy("exports", &guests::arithmetic());
    let exports_digest = a.client().request("GET", &format!("/functions/{exports}"), &[], b"").json()["digest"].clone();
    let envelope = "abcdefabcdefabcdefabcdefabcdefab";
    let mut record = record_with(envelope, "abi", json!("envelope"));
    record["digest"] = exports_digest;
    put_raw(&nats, &format!("f.{envelope}"), record);
    // A well-formed record after them all: once it serves, the others have been looked at.
    let later = "fedcba9876543210fedcba9876543210";
    put_raw(&nats, &format!("f.{later}"), record_with(later, "name", json!("later")));
    within(PROPAGATION, "the well-formed record serving", || status_of(&a, later) == 200);
    for id in [hex, "ffffffffffffffffffffffffffffffff"] {
        assert_eq!(status_of(&a, id), 404, "{id}");
    }
    assert!(!outside.exists(), "a record's id named a folder in the data dir");
    let r = a.client().invoke(envelope, b"{}");
    assert_eq!((r.status, r.error_kind()), (503, "function_unavailable".to_string()), "{}", r.text());
    // good, exports, the envelope one (broken) and the later one.
    assert_eq!(a.metric("tensor_wasm_functions_total", &[]), 4.0);
    assert_eq!(a.metric("tensor_wasm_functions_broken", &[]), 1.0);
    let log = a.stderr();
    assert!(log.contains("a registry record refused"), "{log}");
}

#[test]
fn each_replicas_audit_records_name_it_by_default_its_host_name() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let b = Server::start_in(
        dirs[1].path(),
        &["--registry", &nats.url(), "--registry-timeout-ms", "2000", "--replica-id", "b-1"],
    );
    for server in [&a, &b] {
        assert_eq!(server.client().request("GET", &format!("/functions/{:032x}", 7), &[], b"").status, 404);
    }
    // In Kubernetes the host name is the pod's name: what tells a fleet's replicas apart.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for (dir, named) in [(dirs[0].path(), host.as_str()), (dirs[1].path(), "b-1")] {
        let audit = dir.join("audit");
        let (code, out, err) = common::tensor_wasm(&["audit", "tail", "-n", "100", audit.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(!records.is_empty());
        assert!(records.iter().all(|r| r["replica"] == named), "{named}: {out}");
    }
}

#[test]
fn registry_flags_that_cannot_work_are_refused_at_start() {
    for (args, says) in [
        (&["--registry", "redis://127.0.0.1:6379"][..], "is not `file` or nats://"),
        (&["--registry", "nats://127.0.0.1"][..], "is not `file` or nats://"),
        (&["--registry", "nats://:4222"][..], "is not `file` or nats://"),
        (&["--registry", "file", "--registry-creds", "/nonexistent"][..], "--registry-creds needs --registry nats://"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-timeout-ms", "0"][..], "registry-timeout-ms"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-creds", "/nonexistent.creds"][..], "/nonexistent.creds"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-creds", "/tmp"][..], "is not a file"),
        (
            &["--registry", "nats://127.0.0.1:4222", "--registry-replicas", "0"][..],
            "--registry-replicas must be 1 to 5",
        ),
        (
            &["--registry", "nats://127.0.0.1:4222", "--registry-replicas", "6"][..],
            "--registry-replicas must be 1 to 5",
        ),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-max-object-mb", "0"][..], "registry-max-object-mb"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-propagation-ms", "0"][..], "registry-propagation-ms"),
        (
            &["--registry", "nats://127.0.0.1:4222", "--registry-repair-interval-ms", "5"][..],
            "registry-repair-interval-ms",
        ),
        (&["--rate-limit-share-interval-ms", "0"][..], "rate-limit-share-interval-ms"),
        (&["--rate-limit-peer-timeout-ms", "10"][..], "rate-limit-peer-timeout-ms"),
        (
            &["--rate-limit-share-interval-ms", "1000", "--rate-limit-peer-timeout-ms", "1500"][..],
            "must be at least twice --rate-limit-share-interval-ms",
        ),
        (&["--replica-id", "a/b"][..], "--replica-id"),
    ] {
        let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let (code, _out, err) = common::tensor_wasm(&full, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Attacks on the fleet: each of these failed before its fix (a reviewer's findings).
// ---------------------------------------------------------------------------------------------

/// A replica with FLEET_TOKEN limited to `qps` requests a second (burst `burst`) across the fleet,
/// plus `extra` flags.
fn limited_replica(nats_url: &str, dir: &std::path::Path, (qps, burst): (u32, u32), extra: &[&str]) -> Server {
    let (qps, burst) = (qps.to_string(), burst.to_string());
    let mut args = vec!["--registry", nats_url, "--rate-limit-qps", &qps, "--rate-limit-burst", &burst];
    args.extend_from_slice(extra);
    Server::start_with(dir, &args, |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", format!("{FLEET_TOKEN}:tenant=*"));
    })
}

/// One rate-limited request with FLEET_TOKEN: its status and Retry-After.
fn limited_request(client: &mut common::Client) -> (u16, Option<String>) {
    let auth = format!("Bearer {FLEET_TOKEN}");
    let r = client.request("GET", "/functions", &[("authorization", &auth)], b"");
    assert!(r.status == 200 || r.status == 429, "unexpected {}: {}", r.status, r.text());
    (r.status, r.header("retry-after").map(str::to_string))
}

/// `count` requests to `server`, `gap` apart: how many were admitted, and the last Retry-After.
fn spaced(server: &Server, count: u32, gap: Duration) -> (u32, Option<String>) {
    let mut client = server.client();
    let (mut admitted, mut retry_after) = (0, None);
    for _ in 0..count {
        let (status, retry) = limited_request(&mut client);
        if status == 200 {
            admitted += 1;
        } else {
            retry_after = retry;
        }
        std::thread::sleep(gap);
    }
    (admitted, retry_after)
}

/// GlobalBucket::set_share changes the interval and capacity but never the bucket's theoretical
/// arrival time (tat). While a replica's share is tiny its interval is long (1 / (qps × share)), so
/// one admission then pushes tat that far ahead; when the share grows back, tat stays there and the
/// replica refuses every request until the clock catches up, though the fleet is idle. Here: B is
/// hammered (its refusals count as demand), so A's share falls to ~0.5/(B's demand); A admits one
/// request then; the load moves to A, and A keeps refusing at a tenth of the fleet's rate.
#[test]
fn a_share_that_shrank_and_grew_back_admits_again_at_once() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Server> = dirs.iter().map(|d| limited_replica(&nats.url(), d.path(), (10, 10), &[])).collect();
    let (a, b) = (&servers[0], &servers[1]);
    for s in &servers {
        within(PROPAGATION, "both replicas hearing each other", || s.metric("tensor_wasm_fleet_replicas", &[]) == 2.0);
    }
    let during = std::thread::scope(|scope| {
        let hammer = scope.spawn(|| {
            let mut client = b.client();
            let until = Instant::now() + Duration::from_secs(3);
            let mut sent = 0u32;
            while Instant::now() < until && sent < 200_000 {
                limited_request(&mut client);
                sent += 1;
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(1500));
        let during = limited_request(&mut a.client());
        let sent = hammer.join().unwrap();
        eprintln!("fleet: B was sent {sent} requests in 3 s; A's one request meanwhile: {during:?}");
        during
    });
    // B is idle now; the fleet's reports catch up within half a second (the demand window).
    std::thread::sleep(Duration::from_secs(2));
    // A: 12 requests at 4 a second, under half the fleet's rate of 10, which nobody else uses.
    let (admitted, retry_after) = spaced(a, 12, Duration::from_millis(250));
    eprintln!("fleet: A then admitted {admitted} of 12 (Retry-After {retry_after:?}); during the load: {during:?}");
    assert!(admitted >= 10, "A admitted {admitted} of 12 at 4/s with the fleet idle: Retry-After {retry_after:?}");
}

/// The token ids a replica reports on the demand subject, read by a subscriber: what anyone who
/// can reach NATS learns.
fn reported_ids(nats: &Nats, server: &Server) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use futures_util::StreamExt as _;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut reports = client.subscribe("tensor-wasm.limits.demand").await.unwrap();
        client.flush().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut requests = server.client();
        // Bounded: 5 s, at most 100 requests.
        for _ in 0..100 {
            limited_request(&mut requests);
            let Ok(Some(message)) = tokio::time::timeout_at(deadline, reports.next()).await else { break };
            let report: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let ids: Vec<String> = report["tokens"].as_object().unwrap().keys().cloned().collect();
            if !ids.is_empty() {
                return ids;
            }
        }
        panic!("no report named a token");
    })
}

/// Publishes `count` forged reports, `gap` apart, from the replica `replica`.
fn forge(nats: &Nats, replica: &str, tokens: serde_json::Value, count: u32, gap: Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let payload = json!({ "replica": replica, "tokens": tokens }).to_string();
        for _ in 0..count {
            client.publish("tensor-wasm.limits.demand", payload.clone().into()).await.unwrap();
            client.flush().await.unwrap();
            tokio::time::sleep(gap).await;
        }
    });
}

/// Reports are trusted for any finite demand: one forged report of 1e300 requests a second (for
/// a token id every report shows) makes the share f64::MIN_POSITIVE, whose interval is clamped to
/// u64::MAX / 4 ns. The next request pushes the bucket's tat ~146 years ahead, and since
/// set_share never pulls tat back, the token is refused on that replica until it restarts, long
/// after the forged peer is forgotten and the replica counts itself alone again.
#[test]
fn a_forged_demand_report_does_not_lock_a_token_out_for_good() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let a = limited_replica(&nats.url(), dir.path(), (100, 10), &[]);
    within(PROPAGATION, "A connected", || a.metric("tensor_wasm_fleet_limits_connected", &[]) == 1.0);
    let ids = reported_ids(&nats, &a);
    let tokens: serde_json::Map<String, serde_json::Value> = ids.iter().map(|id| (id.clone(), json!(1e300))).collect();
    std::thread::scope(|scope| {
        let forger = scope.spawn(|| forge(&nats, "forged", tokens.into(), 20, Duration::from_millis(50)));
        std::thread::sleep(Duration::from_millis(600));
        eprintln!("fleet: one request while forged: {:?}", limited_request(&mut a.client()));
        forger.join().unwrap();
    });
    // The forged peer is forgotten after --rate-limit-peer-timeout-ms: A is alone again.
    within(PROPAGATION, "the forged peer forgotten", || a.metric("tensor_wasm_fleet_replicas", &[]) == 1.0);
    std::thread::sleep(Duration::from_secs(1));
    let (admitted, retry_after) = spaced(&a, 5, Duration::from_millis(200));
    assert!(admitted >= 4, "alone and idle, A admitted {admitted} of 5 at 5/s of 100/s: Retry-After {retry_after:?}");
}

/// The delete's sweep decides "no other function uses this object" from the deleting replica's
/// own catalog, which is not the fleet's: a record that replica refused (here a timeout above its
/// --max-timeout-ms, as during a rolling change of that flag) is in the bucket and served by the
/// others, yet its module is swept. The deploy was answered 201 before the delete began; a
/// replica that has to fetch it then lists the function as broken for good.
#[test]
fn a_delete_does_not_sweep_a_module_a_function_the_deleter_refused_still_uses() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = |extra: &'static [&'static str]| {
        let mut args = vec!["--registry".to_string(), nats.url(), "--registry-timeout-ms".into(), "2000".into()];
        // The delete's clean-up 2.1 s after it.
        args.extend(["--registry-propagation-ms".to_string(), "100".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let strict = args(&["--max-timeout-ms", "5000"]);
    let a = Server::start_in(dirs[0].path(), &strict.iter().map(String::as_str).collect::<Vec<_>>());
    let plain = args(&[]);
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    let b = Server::start_in(dirs[1].path(), &plain);
    let module = module_of(8, 4242);
    let x = b.deploy("sweep-x", &module);
    within(PROPAGATION, "X on A", || status_of(&a, &x) == 200);
    let r = b.client().deploy("sweep-y", &module, json!({ "timeout_ms": 30000 }));
    assert_eq!(r.status, 201, "{}", r.text());
    let (y, digest) = (r.json()["id"].as_str().unwrap().to_string(), r.json()["digest"].as_str().unwrap().to_string());
    a.wait_for_stderr("a registry record refused");
    // Y was acknowledged; now X, which shares its module, is deleted on A.
    assert_eq!(a.client().request("DELETE", &format!("/functions/{x}"), &[], b"").status, 204);
    within(PROPAGATION, "the delete reaching B", || status_of(&b, &x) == 404);
    // Past A's clean-up, which must find Y's record in the bucket.
    std::thread::sleep(Duration::from_secs(3));
    let stored = object_stored(&nats, &digest);
    // A new replica with B's settings must be able to serve Y.
    let c = Server::start_in(dirs[2].path(), &plain);
    // Bounded: 40 looks, 200 ms apart.
    let served = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        status_of(&c, &y) == 200
    });
    assert!(stored && served, "Y (201) lost its module: stored {stored}, served on a new replica {served}");
}

/// The sweep races a deploy of the same module on another replica: the deleter computes "unused"
/// from its catalog, which the deploy's record reaches only after a propagation delay, and the
/// deploy's re-check (`still_stored`) runs right after its record, before the deleter's object
/// delete lands. Rounds at spread offsets; every deploy answered 201 must keep its module.
#[test]
fn a_sweep_racing_a_deploy_of_the_same_module_never_loses_it() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // The clean-up comes 2.1 s after a delete (the timeout and the bound): every round's, then.
    let args = ["--registry", &nats.url(), "--registry-timeout-ms", "2000", "--registry-propagation-ms", "100"];
    let (a, b) = (Server::start_in(dirs[0].path(), &args), Server::start_in(dirs[1].path(), &args));
    for s in [&a, &b] {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    let mut deployed_digests = Vec::new();
    for round in 0..16u32 {
        let module = module_of(4, 7000 + round);
        let x = a.deploy(&format!("race-x-{round}"), &module);
        within(PROPAGATION, "X on B", || status_of(&b, &x) == 200);
        // The delete starts 0 to 7.5 ms after the deploy, in half-millisecond steps.
        let offset = Duration::from_micros(500 * u64::from(round));
        let barrier = std::sync::Barrier::new(2);
        let (deployed, deleted) = std::thread::scope(|scope| {
            let deploy = scope.spawn(|| {
                let mut client = b.client();
                barrier.wait();
                client.deploy(&format!("race-y-{round}"), &module, json!({}))
            });
            let delete = scope.spawn(|| {
                let mut client = a.client();
                barrier.wait();
                std::thread::sleep(offset);
                client.request("DELETE", &format!("/functions/{x}"), &[], b"").status
            });
            (deploy.join().unwrap(), delete.join().unwrap())
        });
        assert_eq!(deleted, 204);
        if deployed.status != 201 {
            continue;
        }
        deployed_digests.push((round, offset, deployed.json()["digest"].as_str().unwrap().to_string()));
    }
    assert!(!deployed_digests.is_empty(), "no deploy landed: the race was never run");
    // Past every round's clean-up.
    std::thread::sleep(Duration::from_secs(3));
    let lost: Vec<_> = deployed_digests.iter().filter(|(_, _, digest)| !object_stored(&nats, digest)).collect();
    assert!(lost.is_empty(), "deploys answered 201 whose module a concurrent sweep removed: {lost:?}");
}

/// Releasing the name's key on delete moves its revision, so a deploy of that name that started
/// before a delete of an older function of the name gets 409 `conflict`, though no other deploy
/// overlapped it (on a single node both succeed; docs/DEPLOYMENT.md promises 409 only for two
/// deploys that overlap). The release buys nothing: a deleted key stays in the bucket as a marker.
#[test]
fn a_delete_of_an_older_function_of_the_name_does_not_fail_a_deploy_of_it() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b) = (replica(&nats, dirs[0].path()), replica(&nats, dirs[1].path()));
    for s in [&a, &b] {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    let old = a.deploy("renamed", &guests::hello());
    within(PROPAGATION, "the old one on B", || status_of(&b, &old) == 200);
    let started = Instant::now();
    let (deployed, deleted_at) = std::thread::scope(|scope| {
        let deploy = scope.spawn(|| b.client().deploy("renamed", &guests::slow_to_compile(4242), json!({})));
        // B has read the name's revision and is compiling.
        std::thread::sleep(Duration::from_millis(100));
        let r = a.client().request("DELETE", &format!("/functions/{old}"), &[], b"");
        assert_eq!(r.status, 204, "{}", r.text());
        let deleted_at = started.elapsed();
        (deploy.join().unwrap(), deleted_at)
    });
    eprintln!("fleet: delete done at {deleted_at:?}, deploy answered at {:?}", started.elapsed());
    assert_eq!(deployed.status, 201, "a deploy no other deploy overlapped: {}", deployed.text());
}

/// "While NATS is away … a replica admits the rate divided by the replicas it last knew of …
/// never the whole rate" (docs/DEPLOYMENT.md). Not until the share thread's first connect attempt
/// ends: buckets start at share 1.0 and the first tick runs only after `Connection::open`, which
/// waits up to --registry-timeout-ms for a NATS that does not answer (a partition drops packets,
/// here a port that accepts and never speaks). Meanwhile every replica admits the whole burst and
/// rate.
#[test]
fn a_replica_started_while_nats_hangs_never_admits_the_whole_rate() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    {
        let mut first = limited_replica(&nats.url(), dir.path(), (100, 10), &[]);
        first.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
        first.kill9();
    }
    // It knew of 4 replicas: a quarter of the rate (25/s) and of the burst (3).
    std::fs::write(dir.path().join("fleet-replicas"), "4\n").unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let a = limited_replica(&url, dir.path(), (100, 10), &["--registry-timeout-ms", "10000"]);
    assert_eq!(a.metric("tensor_wasm_fleet_replicas", &[]), 4.0);
    let started = Instant::now();
    let mut client = a.client();
    let admitted = (0..30).filter(|_| limited_request(&mut client).0 == 200).count();
    let took = started.elapsed();
    eprintln!("fleet: with NATS hanging, admitted {admitted} of 30 back to back in {took:?}");
    // A quarter: the burst of 3, plus 25/s over the time taken (under 10 s of connect timeout).
    let due = 3.0 + 25.0 * took.as_secs_f64();
    assert!((admitted as f64) <= due * 1.1 + 1.0, "admitted {admitted} in {took:?}, due at most {due}");
    drop(silent);
}

/// Reports are unauthenticated and MAX_PEERS (256) is first come, first kept: whoever can publish
/// on the subject fills a replica's table with made-up replica ids (empty reports, 256 small
/// messages a refresh), and a real replica that starts afterwards is never counted by it. Its
/// demand is then missing from the shares (the fleet over-admits), and the count kept in the data
/// dir (257) divides the rate while NATS is away.
#[test]
fn made_up_replica_ids_do_not_crowd_out_a_real_replica() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = limited_replica(&nats.url(), dirs[0].path(), (100, 10), &[]);
    within(PROPAGATION, "A connected", || a.metric("tensor_wasm_fleet_limits_connected", &[]) == 1.0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let client = async_nats::connect(nats.url()).await.unwrap();
                // Bounded: 100 refreshes, 200 ms apart (20 s).
                for _ in 0..100 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    for i in 0..256 {
                        let report = json!({ "replica": format!("made-up-{i}"), "tokens": {} }).to_string();
                        client.publish("tensor-wasm.limits.demand", report.into()).await.unwrap();
                    }
                    client.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        });
        let crowded = within(PROPAGATION, "A counting the made-up replicas", || {
            a.metric("tensor_wasm_fleet_replicas", &[]) >= 257.0
        });
        eprintln!("fleet: A counted 257 replicas after {crowded:?}");
        let b = limited_replica(&nats.url(), dirs[1].path(), (100, 10), &[]);
        within(PROPAGATION, "B connected", || b.metric("tensor_wasm_fleet_limits_connected", &[]) == 1.0);
        // The table stays bounded while the flood goes on: at most 256 others.
        std::thread::sleep(Duration::from_secs(1));
        assert!(a.metric("tensor_wasm_fleet_replicas", &[]) <= 257.0);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Once the made-up names stop, they are forgotten, and B, which reports every interval,
        // was never crowded out: A counts exactly itself and B.
        within(PROPAGATION, "A counting itself and B", || a.metric("tensor_wasm_fleet_replicas", &[]) == 2.0);
        let kept = std::fs::read_to_string(dirs[0].path().join("fleet-replicas")).unwrap_or_default();
        assert_eq!(kept.trim(), "2");
    });
}

/// The name is claimed before the files are uploaded: a deploy that claims it and then fails
/// (here 507 registry_full) still moves the name's revision, so a deploy of the name that
/// overlapped it gets 409 `conflict` ("a concurrent deploy of the same name won") though nothing
/// won: both fail, and the name's key names an id no record has.
#[test]
fn a_deploy_that_failed_after_claiming_the_name_does_not_make_another_lose() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = ["--registry", &nats.url(), "--registry-max-object-mb", "1", "--registry-timeout-ms", "2000"];
    let (a, b) = (Server::start_in(dirs[0].path(), &args), Server::start_in(dirs[1].path(), &args));
    for s in [&a, &b] {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }
    let too_big = module_of(1200, 5);
    let (good, bad) = std::thread::scope(|scope| {
        let good = scope.spawn(|| a.client().deploy("contested", &guests::slow_to_compile(999), json!({})));
        // A has read the name's revision and is compiling; B's deploy claims it first, then finds
        // no room for its module.
        std::thread::sleep(Duration::from_millis(30));
        let bad = b.client().deploy("contested", &too_big, json!({}));
        (good.join().unwrap(), bad)
    });
    eprintln!("fleet: the deploy with no room: {} {}", bad.status, bad.text());
    assert_eq!(bad.status, 507, "{}", bad.text());
    assert_eq!(good.status, 201, "the deploy that nothing beat: {}", good.text());
}
