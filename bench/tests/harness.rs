//! The harness measures correctly: against a loopback server with a known injected delay, the
//! reported percentiles come out as the delay dictates, coordinated omission included. Then the
//! `tensor-wasm-bench` binary end to end, against a real `tensor-wasm`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tensor_wasm::exposition::DURATION_BUCKETS;
use tensor_wasm_bench::harness::client::encode;
use tensor_wasm_bench::harness::load::{self, LoadOutcome, LoadPlan, Progress, RequestClass};

#[path = "../../tests/common/ca.rs"]
mod ca;

/// The time the server itself spent on each answer, from its request head to its written
/// response: the injected delay as the machine actually slept it.
type ServiceTimes = Arc<Mutex<Vec<Duration>>>;

/// A keep-alive HTTP/1.1 server on loopback that answers every GET after `delay(n)`, where `n`
/// counts requests over all connections from 0. It serves until the test process ends.
/// One test at a time: each measures latency or starts servers that load the machine, and on a
/// 2-core CI machine two at once measure each other (the hostile scenario's bulk-memory phase
/// beside another test left the bystander's requests unsent for want of a CPU).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn delaying_server(delay: impl Fn(u64) -> Duration + Send + Sync + 'static) -> (SocketAddr, ServiceTimes) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let delay = Arc::new(delay);
    let count = Arc::new(AtomicU64::new(0));
    let times = ServiceTimes::default();
    let recorded = times.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (delay, count, times) = (delay.clone(), count.clone(), times.clone());
            std::thread::spawn(move || serve_connection(stream, &*delay, &count, &times));
        }
    });
    (addr, recorded)
}

fn serve_connection(mut stream: TcpStream, delay: &dyn Fn(u64) -> Duration, count: &AtomicU64, times: &ServiceTimes) {
    stream.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head per answer; the harness does not pipeline.
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
        let started = Instant::now();
        std::thread::sleep(delay(count.fetch_add(1, Ordering::SeqCst)));
        if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
            return;
        }
        times.lock().unwrap().push(started.elapsed());
    }
}

fn run(addr: SocketAddr, rate: f64, connections: usize, warmup_ms: u64, duration_ms: u64) -> LoadOutcome {
    run_with(addr, rate, connections, warmup_ms, duration_ms, false)
}

fn run_with(
    addr: SocketAddr,
    rate: f64,
    connections: usize,
    warmup_ms: u64,
    duration_ms: u64,
    spin: bool,
) -> LoadOutcome {
    let plan = LoadPlan {
        addr,
        tls: None,
        rate,
        warmup: Duration::from_millis(warmup_ms),
        duration: Duration::from_millis(duration_ms),
        connections,
        threads: 1,
        classes: vec![RequestClass {
            name: "get".into(),
            request: encode("GET", "/", "test", &[], b"").into(),
            weight: 1,
        }],
        io_timeout: Duration::from_secs(10),
        spin,
    };
    load::run(&plan, &Progress::default()).unwrap()
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn a_constant_delay_is_reported_as_that_delay() {
    let _serial = serial();
    constant_delay_reads_as_itself(false);
}

#[test]
fn a_spinning_generator_reports_a_constant_delay_as_that_delay_too() {
    let _serial = serial();
    constant_delay_reads_as_itself(true);
}

fn constant_delay_reads_as_itself(spin: bool) {
    let (addr, times) = delaying_server(|_| Duration::from_millis(5));
    // 400/s over 8 connections: each connection sends every 20 ms, so nothing queues.
    let outcome = run_with(addr, 400.0, 8, 300, 1500, spin);
    let all = outcome.total();
    assert_eq!(all.statuses.get(&200), Some(&600), "every due request answered: {:?}", all.statuses);
    assert_eq!((all.io_errors, all.unsent), (0, 0));
    let h = &all.latency;
    // Never below the injected delay.
    assert!(ms(h.min()) >= 5.0, "min {} ms", ms(h.min()));
    // The typical latency is the delay as the server slept it (a busy VM oversleeps a 5 ms sleep
    // by milliseconds), plus a loopback round trip.
    let mut slept = times.lock().unwrap().clone();
    slept.sort();
    let slept_p50 = slept[slept.len() / 2].as_secs_f64() * 1e3;
    let p50 = ms(h.value_at_quantile(0.5));
    assert!(
        slept_p50 >= 5.0 && (slept_p50 - 0.5..slept_p50 + 2.5).contains(&p50),
        "P50 {p50} ms, slept {slept_p50} ms"
    );
    assert!(ms(h.max()) < 100.0 + slept.last().unwrap().as_secs_f64() * 1e3, "max {} ms", ms(h.max()));
}

#[test]
fn a_stall_is_charged_to_every_request_it_delayed() {
    let _serial = serial();
    // One connection at 500/s (a request every 2 ms); the 600th request overall (the 100 of the
    // warm-up come first) is held for 400 ms. During the stall 200 requests fall due, and an open
    // loop charges each with its wait: their latencies run evenly from 400 ms down to about 0.
    // Of the 1,000 measured, the top 10% are then above 200 ms and the top 1% above 380 ms. A
    // closed loop would report one slow request and a P99 of well under a millisecond.
    let (addr, _) = delaying_server(|n| if n == 600 { Duration::from_millis(400) } else { Duration::ZERO });
    let outcome = run(addr, 500.0, 1, 200, 2000);
    let all = outcome.total();
    assert_eq!(all.answered() + all.unsent, 1000, "{:?}, unsent {}", all.statuses, all.unsent);
    assert_eq!(all.io_errors, 0);
    let h = &all.latency;
    let (p50, p90, p99, max) =
        (ms(h.value_at_quantile(0.50)), ms(h.value_at_quantile(0.90)), ms(h.value_at_quantile(0.99)), ms(h.max()));
    assert!(p50 < 50.0, "P50 {p50} ms");
    assert!((170.0..250.0).contains(&p90), "P90 {p90} ms (expected about 200)");
    assert!((350.0..430.0).contains(&p99), "P99 {p99} ms (expected about 380)");
    assert!((399.0..500.0).contains(&max), "max {max} ms (expected about 400)");
}

#[test]
fn a_mix_follows_its_weights() {
    let _serial = serial();
    let (addr, _) = delaying_server(|_| Duration::ZERO);
    let class = |name: &str, weight| RequestClass {
        name: name.into(),
        request: encode("GET", &format!("/{name}"), "test", &[], b"").into(),
        weight,
    };
    let plan = LoadPlan {
        addr,
        tls: None,
        rate: 800.0,
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(1000),
        connections: 4,
        threads: 2,
        classes: vec![class("heavy", 3), class("light", 1)],
        io_timeout: Duration::from_secs(10),
        spin: false,
    };
    let outcome = load::run(&plan, &Progress::default()).unwrap();
    let (heavy, light) = (outcome.class("heavy").unwrap().answered(), outcome.class("light").unwrap().answered());
    // 800 due in the window; a due time that falls exactly on its edge may land either side.
    assert!((796..=804).contains(&(heavy + light)), "{heavy} + {light}");
    let ratio = heavy as f64 / light as f64;
    assert!((2.9..3.1).contains(&ratio), "{heavy} : {light}");
}

fn bench_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tensor-wasm-bench"))
}

/// `tensor-wasm` beside the harness, as `cargo test --workspace` builds it.
fn server_binary() -> PathBuf {
    let path = bench_binary().with_file_name("tensor-wasm");
    assert!(path.is_file(), "{} is missing: run `cargo test --workspace`", path.display());
    path
}

/// A `--server-bin` that writes its arguments to `dir/args`, a line per start, and then runs
/// `tensor-wasm` with them.
fn recording_server(dir: &Path) -> PathBuf {
    let script = dir.join("tensor-wasm");
    let text = format!(
        "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
        dir.join("args").display(),
        server_binary().display()
    );
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// The arguments of every start of a `recording_server`.
fn recorded_starts(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("args")).unwrap().lines().map(String::from).collect()
}

/// Runs the harness with `--out` to a fresh folder. It must exit 0 or 1, a verdict and not a usage
/// error. Returns its output, the parsed results.json, and the folder (results.md is there).
fn run_with_report(mut cmd: Command) -> (std::process::Output, serde_json::Value, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let run = cmd.arg("--out").arg(out.path()).output().unwrap();
    let code = run.status.code();
    assert!(code == Some(0) || code == Some(1), "exit {code:?}: {}", String::from_utf8_lossy(&run.stderr));
    let report = serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    (run, report, out)
}

#[test]
fn the_binary_measures_a_real_server_and_gates_on_the_slo() {
    let _serial = serial();
    let bin = tempfile::tempdir().unwrap();
    let common = |extra: &[&str]| {
        let mut cmd = Command::new(bench_binary());
        cmd.arg("--server-bin")
            .arg(recording_server(bin.path()))
            .args(["--scenario", "healthz,hello", "--rate", "200", "--warmup", "300ms", "--duration", "1s"])
            .args(["--connections", "4", "--shards", "1", "--quiet"])
            .args(extra);
        cmd
    };

    let (run, report, out) = run_with_report(common(&[]));
    let code = run.status.code();
    // The exit status is the report's verdict.
    assert_eq!(report["pass"].as_bool(), Some(code == Some(0)));
    let measurements = report["measurements"].as_array().unwrap();
    assert_eq!(measurements.len(), 2);
    for (m, scenario) in measurements.iter().zip(["healthz", "hello"]) {
        assert_eq!(m["scenario"], scenario);
        // 200/s for 1 s, every one answered 200 by a server with every CPU to spare.
        assert_eq!(m["statuses"]["200"], 200, "{m}");
        assert_eq!(m["latency"]["count"], 200);
        assert!(m["latency"]["p50_us"].as_f64().unwrap() > 0.0);
        assert!(m["cpu"]["server_us_per_answer"].as_f64().unwrap() > 0.0);
        assert!(m["verdicts"].as_array().unwrap().iter().any(|v| v["target"]["source"] == "seed"));
        // The server's own histogram of the scenario's route, scraped around the run, holds
        // exactly its requests: 60 in the 300 ms warm-up and the 200 measured.
        let inside = &m["in_server"];
        assert_eq!(inside["samples"], 260, "{m}");
        // Inside the server a request spends less than the round trip the client measured: the
        // bucket that holds the server's median starts below the client's median.
        let bound = inside["p50_bound_us"].as_f64().unwrap();
        assert!(DURATION_BUCKETS.seconds.iter().any(|s| (s * 1e6 - bound).abs() < 1e-6), "{m}");
        let lower_edge =
            DURATION_BUCKETS.seconds.iter().map(|s| s * 1e6).filter(|b| *b < bound - 1e-6).fold(0.0, f64::max);
        assert!(lower_edge < m["latency"]["p50_us"].as_f64().unwrap(), "{m}");
    }
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("| healthz | tensor-wasm | 1 | 200 |"), "{markdown}");
    assert!(markdown.contains("| in-server P99 ≤ µs |"), "{markdown}");
    assert_eq!(String::from_utf8_lossy(&run.stdout), markdown);
    // Beside the servers, the generator keeps to one thread, so as to take one CPU at most.
    assert_eq!(report["threads"], 1);
    // Beside the generator, the shards float rather than wait for it on their own CPUs.
    let starts = recorded_starts(bin.path());
    assert!(!starts.is_empty() && starts.iter().all(|a| a.contains("--pin-shards never")), "{starts:?}");

    // No HTTP round trip takes a microsecond: an objective that tight fails, and so does the run.
    let strict = common(&["--p99-target", "1us"]).output().unwrap();
    assert_eq!(strict.status.code(), Some(1), "{}", String::from_utf8_lossy(&strict.stderr));
    let text = String::from_utf8_lossy(&strict.stdout);
    assert!(text.contains("P99 ≤ the given --p99-target") && text.contains("Result: FAIL"), "{text}");
}

#[test]
fn started_servers_and_the_generator_can_be_kept_on_separate_cpus() {
    let _serial = serial();
    let allowed = tensor_wasm::cpu::allowed_cpus().unwrap();
    if allowed.len() < 2 {
        eprintln!("one CPU only: nothing to keep apart");
        return;
    }
    let server_cpu = allowed[0].to_string();
    let bin = tempfile::tempdir().unwrap();
    let bench = |extra: &[&str]| {
        let mut cmd = Command::new(bench_binary());
        cmd.arg("--server-bin")
            .arg(recording_server(bin.path()))
            .args(["--scenario", "healthz", "--rate", "200", "--warmup", "300ms", "--duration", "1s"])
            .args(["--connections", "4", "--server-cpus", &server_cpu, "--quiet"])
            .args(extra);
        cmd
    };
    // The harness checks the started server's CPU list in /proc and exits 2 when it differs.
    let (_, report, _) = run_with_report(bench(&[]));
    // On CPUs of their own, the shards are pinned.
    let starts = recorded_starts(bin.path());
    assert!(!starts.is_empty() && starts.iter().all(|a| a.contains("--pin-shards always")), "{starts:?}");
    let machine = &report["machine"];
    assert_eq!(machine["server_cpus"], server_cpu.as_str());
    let harness = tensor_wasm::cpu::parse_list(machine["harness_cpus"].as_str().unwrap()).unwrap();
    assert_eq!(harness, allowed[1..].to_vec());
    // A generator thread for each CPU left to it, and no more than there are connections.
    assert_eq!(report["threads"].as_u64(), Some(harness.len().min(4) as u64));
    // The default shard count follows the server's CPUs: one.
    let m = &report["measurements"][0];
    assert_eq!((m["shards"].as_u64(), m["statuses"]["200"].as_u64()), (Some(1), Some(200)), "{m}");

    // With CPUs of its own the generator may spin: it then takes its whole CPU (at 200/s, about
    // 5 ms of CPU per answer, where one that sleeps takes well under a millisecond) and measures
    // as before.
    let (_, report, out) = run_with_report(bench(&["--threads", "1", "--spin"]));
    assert_eq!(report["spin"], true);
    let m = &report["measurements"][0];
    assert_eq!(m["statuses"]["200"].as_u64(), Some(200), "{m}");
    assert!(m["cpu"]["harness_us_per_answer"].as_f64().unwrap() > 1000.0, "{m}");
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("4 connections over 1 spinning generator thread,"), "{markdown}");
}

#[test]
fn the_baseline_comparison_judges_p99_by_the_median_of_rounds_at_equal_load() {
    let _serial = serial();
    let mut cmd = Command::new(bench_binary());
    cmd.arg("--server-bin")
        .arg(server_binary())
        .arg("--baseline-bin")
        .arg(bench_binary().with_file_name("tensor-wasm-baseline"))
        .args(["--scenario", "healthz", "--baseline", "--rate", "200", "--warmup", "200ms", "--duration", "500ms"])
        .args(["--step-start", "200", "--step-factor", "2", "--step-max", "400", "--step-refine", "0"])
        .args(["--connections", "4", "--shards", "1", "--equal-load-rounds", "2", "--quiet"]);
    let (_, report, out) = run_with_report(cmd);
    let comparison = &report["comparisons"][0];
    assert_eq!(comparison["scenario"], "healthz");
    let rate = comparison["equal_load_rate"].as_f64().unwrap();
    assert!((100.0..=320.0).contains(&rate), "80% of a best rate of 200 or 400: {rate}");
    // Each search's best rate was confirmed: it passed at least twice, and missed only while the
    // machine stalled.
    for side in ["ours", "baseline"] {
        let search = &comparison[side];
        let steps = search["steps"].as_array().unwrap();
        let best = &steps[search["best"].as_u64().unwrap() as usize];
        let at_best: Vec<&serde_json::Value> =
            steps.iter().filter(|m| m["offered_rate"] == best["offered_rate"]).collect();
        let passed = |m: &serde_json::Value| m["pass"].as_bool().unwrap();
        assert!(at_best.iter().filter(|m| passed(m)).count() >= 2, "{side}: {at_best:?}");
        assert!(at_best.iter().all(|m| passed(m) || m["machine_stalled"].as_bool().unwrap()), "{side}");
    }
    let median_p99 = |side: &str, server: &str| {
        // Two rounds, each on its own server, and each taken again if the machine stalled.
        let rounds = comparison[side].as_array().unwrap();
        let stalled = |m: &&serde_json::Value| m["machine_stalled"].as_bool().unwrap();
        assert!(rounds.len() >= 2, "{side}: {} rounds", rounds.len());
        let repeats = rounds.len() - 2;
        assert!(repeats <= rounds.iter().filter(stalled).count(), "{side}: {} rounds", rounds.len());
        for m in rounds {
            assert_eq!((m["offered_rate"].as_f64(), m["server"].as_str()), (Some(rate), Some(server)));
            assert!(m["statuses"]["200"].as_u64().unwrap() > 0, "{m}");
            // Only ours exports its own time per request.
            assert_eq!(m["in_server"].is_null(), server == "baseline", "{m}");
        }
        let clean: Vec<&serde_json::Value> = rounds.iter().filter(|m| !stalled(m)).collect();
        let counted = if clean.is_empty() { rounds.iter().collect() } else { clean };
        let mut p99: Vec<f64> = counted.iter().map(|m| m["latency"]["p99_us"].as_f64().unwrap()).collect();
        p99.sort_by(f64::total_cmp);
        let mid = p99.len() / 2;
        if p99.len() % 2 == 1 {
            p99[mid]
        } else {
            (p99[mid - 1] + p99[mid]) / 2.0
        }
    };
    let ours = median_p99("ours_at_equal_load", "tensor-wasm");
    let baseline = median_p99("baseline_at_equal_load", "baseline");
    // serde_json reads floats to within an ulp, and a median of an even count averages two.
    for (key, expected) in [("ours_equal_load_p99_us", ours), ("baseline_equal_load_p99_us", baseline)] {
        let reported = comparison[key].as_f64().unwrap();
        assert!((reported - expected).abs() <= 1e-9 * expected, "{key}: {reported} against {expected}");
    }
    let ratio = comparison["p99_ratio"].as_f64().unwrap();
    assert!((ratio - baseline / ours).abs() < 1e-9, "{ratio} vs {baseline} / {ours}");
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("P99 ours µs (median of rounds)"), "{markdown}");
}

#[test]
fn the_binary_measures_a_live_server_over_tls_with_a_client_certificate() {
    let _serial = serial();
    use tensor_wasm::client::ClientTls;
    use tensor_wasm_bench::harness::client::Tls;
    use tensor_wasm_bench::harness::target::{Implementation, StartedServer};

    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, other_pem) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    let ca = ca::Ca::new("Bench CA");
    ca.write_ca(&ca_pem);
    let (server_cert, server_key) = ca.issue(dir.path(), "server", "localhost");
    let (client_cert, client_key) = ca.issue(dir.path(), "client", "bench-client");
    let token = "bench-token-0123456789abcdef";
    let tokens = ("TENSOR_WASM_API_TOKENS".to_string(), format!("{token}:tenant=7"));
    let tls_flags: Vec<String> =
        [("--tls-cert", &server_cert), ("--tls-key", &server_key), ("--tls-client-ca", &ca_pem)]
            .iter()
            .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
            .collect();
    // Started and made ready (over TLS) as the harness starts its own; here the harness is pointed
    // at it.
    let client = ClientTls::new(Some(&ca_pem), Some((&client_cert, &client_key))).unwrap();
    let tls = Tls::new(&client, "localhost").unwrap();
    let server =
        StartedServer::start(Implementation::TensorWasm, &server_binary(), 1, None, &tls_flags, &[tokens], Some(&tls))
            .unwrap();
    let url = format!("https://localhost:{}", server.endpoint.addr.port());

    let harness =
        |tls_args: &[&std::ffi::OsStr], scenarios: &str| {
            let mut cmd = Command::new(bench_binary());
            cmd.args(["--server", &url, "--token", token, "--tenant", "7", "--scenario", scenarios])
                .args(tls_args)
                .args(["--rate", "200", "--warmup", "300ms", "--duration", "1s", "--connections", "4", "--quiet"]);
            cmd
        };
    let trusted: [&std::ffi::OsStr; 6] = [
        "--ca-cert".as_ref(),
        ca_pem.as_os_str(),
        "--client-cert".as_ref(),
        client_cert.as_os_str(),
        "--client-key".as_ref(),
        client_key.as_os_str(),
    ];
    let (_, report, _out) = run_with_report(harness(&trusted, "healthz,hello"));
    // The server is on this machine, so the generator keeps to one thread beside it.
    assert_eq!(report["threads"], 1);
    let measurements = report["measurements"].as_array().unwrap();
    assert_eq!(measurements.len(), 2);
    for m in measurements {
        // Every request over TLS, every one answered 200, and none lost to a handshake.
        assert_eq!(m["statuses"]["200"], 200, "{m}");
        assert_eq!(m["io_errors"], 0, "{m}");
        // The server's own histogram, scraped over TLS around the run: the warm-up's 60 and the
        // 200 measured.
        assert_eq!(m["in_server"]["samples"], 260, "{m}");
    }

    // A server that the given CA did not sign, and one that wants a certificate the harness does
    // not present: the run cannot be made, and the harness says why.
    let other = ca::Ca::new("Other CA");
    other.write_ca(&other_pem);
    let untrusted = harness(&["--ca-cert".as_ref(), other_pem.as_os_str()], "hello").output().unwrap();
    let anonymous = harness(&trusted[..2], "hello").output().unwrap();
    for (case, out) in [("untrusted", untrusted), ("no client certificate", anonymous)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
        let says_why = stderr.to_lowercase().contains("certificate");
        assert!(stderr.starts_with("tensor-wasm-bench: ") && says_why, "{case}: {stderr}");
    }
}

#[test]
fn with_tls_the_harness_starts_ours_speaking_it_and_measures_over_it() {
    let _serial = serial();
    use tensor_wasm_bench::harness::target::{Endpoint, Implementation, StartedServer, StartedTls};

    let bin = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bench_binary());
    cmd.arg("--server-bin").arg(recording_server(bin.path())).arg("--tls");
    cmd.args(["--scenario", "healthz,hello", "--rate", "200", "--warmup", "300ms", "--duration", "1s"]);
    cmd.args(["--connections", "4", "--shards", "1", "--quiet"]);
    let (_, report, out) = run_with_report(cmd);
    assert_eq!(report["tls"], true);
    let measurements = report["measurements"].as_array().unwrap();
    assert_eq!(measurements.len(), 2);
    for m in measurements {
        // Every request went over TLS and was answered 200: a server speaking plain HTTP would
        // have answered none of them. The scrapes around the run went over TLS too.
        assert_eq!((&m["tls"], &m["statuses"]["200"], &m["io_errors"]), (&true.into(), &200.into(), &0.into()), "{m}");
        assert_eq!(m["in_server"]["samples"], 260, "{m}");
    }
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("4 TLS connections over 1 generator thread"), "{markdown}");
    let starts = recorded_starts(bin.path());
    assert!(starts.iter().all(|a| a.contains("--tls-cert") && a.contains("--tls-key")), "{starts:?}");

    // A server started with the harness's certificate answers its client over TLS and refuses
    // plain HTTP.
    let tls = StartedTls::self_signed().unwrap();
    let server = StartedServer::start(
        Implementation::TensorWasm,
        &server_binary(),
        1,
        None,
        &tls.server_args(),
        &[],
        Some(&tls.client),
    )
    .unwrap();
    assert_eq!(server.endpoint.call("GET", "/healthz", b"").unwrap().status, 200);
    let plain = Endpoint { tls: None, ..server.endpoint.clone() };
    assert!(plain.call("GET", "/healthz", b"").is_err(), "a TLS listener answered plain HTTP");

    // The baseline speaks plain HTTP only: said before anything starts. The trust flags are for a
    // live server, whose URL says https://.
    let refused = tempfile::tempdir().unwrap();
    let baseline = Command::new(bench_binary())
        .arg("--server-bin")
        .arg(recording_server(refused.path()))
        .args(["--tls", "--baseline", "--scenario", "hello", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&baseline.stderr);
    assert_eq!(baseline.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("plain HTTP only"), "{stderr}");
    assert!(!refused.path().join("args").exists(), "a server was started: {:?}", recorded_starts(refused.path()));
    let trust = Command::new(bench_binary()).arg("--ca-cert").arg(tls.cert()).args(["--quiet"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&trust.stderr);
    assert_eq!(trust.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("live https:// --server"), "{stderr}");
}

#[test]
fn ctrl_c_on_a_live_server_deletes_what_the_harness_deployed() {
    let _serial = serial();
    use tensor_wasm_bench::harness::target::{Implementation, StartedServer};

    let token = "bench-token-0123456789abcdef";
    let tokens = ("TENSOR_WASM_API_TOKENS".to_string(), format!("{token}:tenant=7"));
    // Started and made ready as the harness starts its own; here the harness is pointed at it.
    let server =
        StartedServer::start(Implementation::TensorWasm, &server_binary(), 1, None, &[], &[tokens], None).unwrap();
    let url = format!("http://{}", server.endpoint.addr);
    let endpoint = server.endpoint.acting_as(Some(token.into()), Some(7));
    let names = || -> Vec<String> {
        let listing = endpoint.call("GET", "/functions", b"").map(|r| r.json().unwrap()).unwrap_or_default();
        let functions = listing["functions"].as_array().cloned().unwrap_or_default();
        functions.iter().filter_map(|f| f["name"].as_str().map(String::from)).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);

    // A run far longer than the test, interrupted once its function is deployed and load flows.
    let mut harness = Command::new(bench_binary())
        .args(["--server", &url, "--token", token, "--tenant", "7", "--scenario", "hello"])
        .args(["--rate", "100", "--warmup", "0s", "--duration", "10m", "--connections", "2", "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !names().contains(&"bench-hello".to_string()) {
        assert!(Instant::now() < deadline, "the harness never deployed its function");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill with a valid signal on the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(harness.id() as libc::pid_t, libc::SIGINT) }, 0);
    let stopped_by = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = harness.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > stopped_by {
            let _ = harness.kill();
            panic!("the harness did not stop within 10 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    harness.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(names().iter().all(|n| !n.starts_with("bench-")), "left behind: {:?}", names());
}

/// The pids of the live processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command name's closing parenthesis: state, then the parent's pid.
            let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
            fields.get(1) == Some(&parent.to_string().as_str()) && fields.first() != Some(&"Z")
        })
        .collect()
}

#[test]
fn a_started_server_dies_with_the_harness() {
    let _serial = serial();
    let mut harness = Command::new(bench_binary())
        .arg("--server-bin")
        .arg(server_binary())
        .args(["--scenario", "healthz", "--rate", "50", "--warmup", "0s", "--duration", "60s", "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let server = loop {
        if let Some(pid) = children_of(harness.id()).first() {
            break *pid;
        }
        assert!(Instant::now() < deadline, "the harness started no server");
        std::thread::sleep(Duration::from_millis(50));
    };
    harness.kill().unwrap();
    harness.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie waiting for its new parent to reap it.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{server}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    };
    while alive() {
        assert!(Instant::now() < deadline, "server {server} outlived the harness that started it");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_hostile_scenario_measures_the_bystander_beside_each_attack() {
    let _serial = serial();
    let mut cmd = Command::new(bench_binary());
    cmd.arg("--server-bin").arg(server_binary());
    cmd.args(["--scenario", "hostile", "--rate", "200", "--warmup", "300ms", "--duration", "1s"]);
    cmd.args(["--connections", "4", "--shards", "2", "--quiet"]);
    let (run, report, out) = run_with_report(cmd);
    // The exit status is the report's verdict, which the hostile phases are part of; no plain
    // measurement is taken beside them.
    assert_eq!(report["pass"].as_bool(), Some(run.status.code() == Some(0)));
    assert_eq!(report["measurements"].as_array().map(Vec::len), Some(0));
    let hostile = &report["hostile"][0];
    assert_eq!(hostile["pass"], report["pass"]);
    let phases = hostile["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "quiet",
            "big-bodies",
            "auth-flood",
            "spinners",
            "random-get",
            "bulk-memory",
            "deploy-flood",
            "all",
            "quiet again"
        ]
    );
    for phase in phases {
        let (name, m) = (phase["name"].as_str().unwrap(), &phase["bystander"]);
        // Every request of the bystander due in the window (200/s for 1 s) was answered 200,
        // beside every attack: refusals and deadlines are the attacker's alone.
        assert_eq!(phase["bystander_requests"], 200, "{name}: {m}");
        assert_eq!(phase["bystander_success_ratio"].as_f64(), Some(1.0), "{name}: {m}");
        assert_eq!((&m["statuses"]["200"], &m["io_errors"], &m["unsent"]), (&200.into(), &0.into(), &0.into()));
        assert!(m["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{name}");
        let verdict = |objective: &str| {
            m["verdicts"].as_array().unwrap().iter().find(|v| v["target"]["name"] == objective).cloned()
        };
        assert_eq!(verdict("no bystander failure").unwrap()["pass"], true, "{name}");
        // The server's memory, sampled and from its high-water mark.
        assert!(m["server_memory"]["rss_peak_mib"].as_f64().unwrap() > 0.0, "{name}: {m}");
        assert!(phase["server_vm_hwm_mib"].as_f64().unwrap() > 0.0, "{name}");
        let attacks = phase["attacks"].as_array().unwrap();
        if name == "quiet" {
            assert!(attacks.is_empty() && phase["p99_over_quiet"].is_null(), "{phase}");
            continue;
        }
        // Against the quiet phase's P99; judged, whatever the verdict.
        let ratio =
            m["latency"]["p99_us"].as_f64().unwrap() / phases[0]["bystander"]["latency"]["p99_us"].as_f64().unwrap();
        assert!((phase["p99_over_quiet"].as_f64().unwrap() - ratio).abs() < 1e-9, "{name}");
        assert!(verdict("bystander P99 ≤ 2× its quiet P99").is_some(), "{name}");
        assert_eq!(verdict("attacker got only its refusals").unwrap()["pass"], true, "{name}");
        // The attacker got the precise refusals (or deadlines) its attack is meant to, and nothing else.
        let expected_attacks = match name {
            "all" => 6,
            "quiet again" => 0,
            _ => 1,
        };
        assert_eq!(attacks.len(), expected_attacks, "{name}");
        for a in attacks {
            assert_eq!((&a["unexpected"], &a["first_unexpected"]), (&0.into(), &serde_json::Value::Null), "{a}");
            if name == "all" {
                continue;
            }
            let got = |label: &str| a["answers"][label].as_u64().unwrap_or(0) > 0;
            let wanted: &[&str] = match name {
                "big-bodies" => &["405 method_not_allowed", "401 unauthorized"],
                "auth-flood" => &["401 unauthorized", "429 unauthenticated_rate_limited"],
                "spinners" => &["504 invoke_timeout", "429 concurrency_limited"],
                "random-get" | "bulk-memory" => &["504 invoke_timeout"],
                "deploy-flood" => &["201", "429 admin_queue_limited"],
                other => panic!("unknown phase {other}"),
            };
            assert!(wanted.iter().all(|l| got(l)), "{name}: {a}");
        }
    }
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("### Hostile tenants: the bystander beside each attack"), "{markdown}");
    assert!(markdown.contains("| spinners | 200 | 100.00% |"), "{markdown}");
    assert!(markdown.contains("| all | attacker got only its refusals | ours | 0 | pass |"), "{markdown}");
}

#[test]
fn unusable_requests_exit_2_with_a_sentence() {
    let _serial = serial();
    let every_cpu = tensor_wasm::cpu::format_list(&tensor_wasm::cpu::allowed_cpus().unwrap());
    let cases: [&[&str]; 14] = [
        &["--server-cpus", "1000"],
        &["--tls", "--server", "http://127.0.0.1:9"],
        &["--server-cpus", &every_cpu],
        &["--scenario", "tenant-mix", "--server", "http://127.0.0.1:9"],
        &["--server", "ftp://127.0.0.1:9"],
        &["--server", "http://127.0.0.1:9/api"],
        &["--rate", "0"],
        &["--threads", "5", "--connections", "4"],
        // Spinning beside the servers would take their CPU.
        &["--spin"],
        &["--spin", "--server", "http://127.0.0.1:9"],
        // The hostile scenario compares phases at one rate, on a server it configures.
        &["--scenario", "hostile", "--step"],
        &["--scale", "--scale-scenario", "hostile"],
        &["--scenario", "hostile", "--server", "http://127.0.0.1:9"],
        &["--scenario", "hostile", "--attack-rate", "0"],
    ];
    for args in cases {
        let out = Command::new(bench_binary()).args(args).arg("--quiet").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("tensor-wasm-bench: "), "{args:?}: {stderr}");
    }
}

#[test]
fn the_fleet_scenario_times_deploys_and_propagation_and_compares_a_replica_with_a_node() {
    let _serial = serial();
    let mut cmd = Command::new(bench_binary());
    cmd.arg("--server-bin").arg(server_binary());
    cmd.args(["--scenario", "fleet", "--rate", "200", "--warmup", "300ms", "--duration", "1s"]);
    cmd.args(["--connections", "4", "--shards", "1", "--quiet"]);
    let (run, report, out) = run_with_report(cmd);
    assert_eq!(report["pass"].as_bool(), Some(run.status.code() == Some(0)));
    let fleet = &report["fleet"][0];
    assert_eq!(fleet["pass"], report["pass"], "{fleet}");
    assert_eq!((fleet["replicas"].as_u64(), fleet["deploys"].as_u64()), (Some(3), Some(30)));
    // Every deploy was timed on each side, and every one reached the other replicas.
    for what in ["deploy_single", "deploy_fleet", "propagation"] {
        assert_eq!(fleet[what]["count"], 30, "{what}: {fleet}");
        assert!(fleet[what]["p50_us"].as_f64().unwrap() > 0.0, "{what}");
    }
    // Both invoke runs answered every request due (200/s for 1 s) with 200, and the ratio is theirs.
    for side in ["single", "replica"] {
        let m = &fleet[side];
        assert_eq!((&m["statuses"]["200"], &m["io_errors"]), (&200.into(), &0.into()), "{side}: {m}");
    }
    let cpu = |side: &str| fleet[side]["cpu"]["server_us_per_answer"].as_f64().unwrap();
    let ratio = fleet["invoke_cpu_ratio"].as_f64().unwrap();
    assert!((ratio - cpu("replica") / cpu("single")).abs() < 1e-9, "{fleet}");
    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(md.contains("### Fleet: 3 replicas") && md.contains("propagation to every replica"), "{md}");
}
