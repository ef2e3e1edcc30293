//! Hostile tenants and clients (docs/BAD-INPUT.md, "Hostile tenants"): one test per attack, each
//! against a real server on loopback while a bystander tenant calls `/healthz` and invokes its
//! own function. Each asserts the attacker's precise status and kind, that the bystander was never
//! refused (with its P99 under 50 ms here; the real figure is the benchmark's), and that the
//! server's memory stayed within its limits. Every loop is bounded in count and time.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::bystander::{deploy_as, deploy_request, Bystander};
use common::starve::{last_cpu, on_cpu, CpuHog};
use common::{guests, within, Client, Response, Server};
use serde_json::{json, Value};

const ATTACKER: &str = "attacker-0123456789abcdef01234567";
const VICTIM: &str = "victim-0123456789abcdef0123456789a";
const OTHER: &str = "other-0123456789abcdef0123456789ab";
const BYSTANDER_P99: Duration = Duration::from_millis(50);

/// One attack at a time: each measures a bystander's latency, which another test's spinning
/// guests on the same two CPUs would measure instead.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tokens() -> String {
    format!("{ATTACKER}:tenant=1,{VICTIM}:tenant=2,{OTHER}:tenant=3")
}

/// A server with the two tenants' tokens, plus `args`.
fn start(args: &[&str]) -> Server {
    Server::start_fresh_with(args, |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", tokens());
    })
}

fn as_tenant(token: &str, tenant: &str) -> Vec<(String, String)> {
    vec![("authorization".into(), format!("Bearer {token}")), ("x-tensor-wasm-tenant".into(), tenant.into())]
}

fn headers(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

fn victim(server: &Server) -> Bystander {
    Bystander::start_as(server, &headers(&as_tenant(VICTIM, "2")))
}

fn expect(r: &Response, status: u16, kind: &str) {
    assert_eq!((r.status, r.error_kind().as_str()), (status, kind), "{}", r.text());
}

/// Deploys `wasm` as `who` with the deploy's `extra` settings; its id.
fn deploy_with(server: &Server, who: &[(String, String)], name: &str, wasm: &[u8], extra: Value) -> String {
    let r = deploy_request(&mut server.client(), who, name, wasm, extra);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// The server's resident memory, from /proc.
fn rss_bytes(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    kb * 1024
}

/// Sends a head declaring `len` body bytes and `sent` of them, then reads the answer without
/// sending the rest.
fn head_then_answer(server: &Server, head: &str, sent: usize) -> (Client, Response) {
    let mut c = server.client();
    c.send_raw(head.as_bytes());
    c.send_raw(&vec![b'x'; sent]);
    let r = c.read_response();
    (c, r)
}

#[test]
fn bodies_are_not_read_for_requests_that_will_be_refused() {
    let _serial = serial();
    let server = start(&[]);
    let b = victim(&server);
    let before = rss_bytes(&server);
    let big = 64 * 1024 * 1024;
    // The issue's attack: anonymous 64 MiB bodies to a probe. Each is answered from its head (405),
    // with the connection closing, and nothing of the body is kept.
    let mut held = Vec::new();
    for _ in 0..8 {
        let head = format!("POST /healthz HTTP/1.1\r\nhost: t\r\ncontent-length: {big}\r\n\r\n");
        let (c, r) = head_then_answer(&server, &head, 1024 * 1024);
        expect(&r, 405, "method_not_allowed");
        assert_eq!(r.header("connection"), Some("close"));
        held.push(c);
    }
    // Unauthenticated deploys and invokes: 401 before their bodies, and no `100 Continue`.
    for path in ["/functions", "/functions/0123456789abcdef0123456789abcdef/invoke"] {
        let head = format!("POST {path} HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: {big}\r\n\r\n");
        let mut c = server.client();
        c.send_raw(head.as_bytes());
        let mut first = [0u8; 12];
        c.stream.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 401", "no 100 Continue before the refusal");
        held.push(c);
    }
    // An authenticated invoke over the invoke limit: 413 from its head, naming the limit.
    let head = format!(
        "POST /functions/0123456789abcdef0123456789abcdef/invoke HTTP/1.1\r\nhost: t\r\nauthorization: Bearer \
         {ATTACKER}\r\nx-tensor-wasm-tenant: 1\r\ncontent-length: {}\r\n\r\n",
        8 * 1024 * 1024 + 1
    );
    let (_c, r) = head_then_answer(&server, &head, 0);
    expect(&r, 413, "body_too_large");
    assert!(r.text().contains("8388608"), "{}", r.text());
    // A body on a probe is refused too: probes take none.
    let r = server.client().request("GET", "/healthz", &[("content-length", "5")], b"hello");
    expect(&r, 413, "body_too_large");
    let grown = rss_bytes(&server).saturating_sub(before);
    assert!(grown < 32 * 1024 * 1024, "the server grew by {grown} bytes");
    drop(held);
    b.finish("bodies of refused requests").p99_within(BYSTANDER_P99);
}

#[test]
fn a_shard_holds_at_most_its_in_flight_body_budget_and_a_tenant_half_of_it() {
    let _serial = serial();
    let mib = 1024 * 1024;
    let server = start(&[
        "--shards",
        "1",
        "--max-inflight-body-bytes",
        &(2 * mib).to_string(),
        "--max-invoke-body-bytes",
        &mib.to_string(),
        "--max-body-bytes",
        &mib.to_string(),
    ]);
    let (attacker, second, other) = (as_tenant(ATTACKER, "1"), as_tenant(VICTIM, "2"), as_tenant(OTHER, "3"));
    let echo = |who: &[(String, String)]| deploy_as(&server, "echo", &guests::echo(), who);
    let echoes = [echo(&attacker), echo(&second), echo(&other)];
    let b = victim(&server);
    let head = |who: &[(String, String)], id: &str| {
        let mut h = format!("POST /functions/{id}/invoke HTTP/1.1\r\nhost: t\r\ncontent-length: {mib}\r\n");
        for (n, v) in who {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h + "\r\n"
    };
    // A slow upload of a whole MiB: the head, then a little of the body.
    let slow = |who: &[(String, String)], id: &str| {
        let mut c = server.client();
        c.send_raw(head(who, id).as_bytes());
        c.send_raw(&vec![b'a'; 1000]);
        c
    };
    let refused = |who: &[(String, String)], id: &str, status: u16| {
        let mut r = None;
        within(Duration::from_secs(10), "a refusal for the body budget", || {
            let (_c, answer) = head_then_answer(&server, &head(who, id), 0);
            let done = answer.status == status;
            r = Some(answer);
            done
        });
        r.unwrap()
    };
    // The attacker holds its share (half the shard's budget); its next body is refused.
    let mut uploads = vec![slow(&attacker, &echoes[0])];
    let r = refused(&attacker, &echoes[0], 429);
    expect(&r, 429, "inflight_body_limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another tenant takes the other half; a third is refused for the shard's budget.
    uploads.push(slow(&second, &echoes[1]));
    let r = refused(&other, &echoes[2], 503);
    expect(&r, 503, "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(server.metric("tensor_wasm_body_budget_refusals_total", &[]) >= 2.0);
    // The slow uploads finish and are served whole.
    for c in &mut uploads {
        c.send_raw(&vec![b'a'; mib - 1000]);
        let r = c.read_response();
        assert_eq!((r.status, r.body.len()), (200, mib), "{}", r.text());
    }
    // Their budget is back: the refused request now passes.
    let body = vec![b'b'; mib];
    let r = server.client().request("POST", &format!("/functions/{}/invoke", echoes[2]), &headers(&other), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    b.finish("the in-flight body budget").p99_within(BYSTANDER_P99);
}

/// Calls `random_get` once on all of its `pages` of memory, then exits 0 straight away: no loop,
/// so no epoch check after the call. A call that ran to its end, past the deadline, would answer
/// 200; only a call that stops at the deadline answers 504.
fn random_once(pages: u32) -> Vec<u8> {
    guests::wasm(&format!(
        r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") {pages})
  (func (export "_start")
    (drop (call $random_get (i32.const 0) (i32.const {bytes})))
    (call $proc_exit (i32.const 0))))"#,
        bytes = pages as u64 * 65536
    ))
}

#[test]
fn a_host_call_stops_at_the_deadline_and_never_holds_the_shard() {
    let _serial = serial();
    let server = start(&["--shards", "1", "--max-memory-limit-mb", "1024"]);
    let attacker = as_tenant(ATTACKER, "1");
    let extra = json!({"memory_limit_mb": 1024, "timeout_ms": 100});
    let id = deploy_with(&server, &attacker, "random", &random_once(16384), extra);
    let b = victim(&server);
    for _ in 0..3 {
        // About four seconds of work (the call took 3.9 s before it was cut into chunks), and a
        // deadline of 100 ms: 504 says the call stopped there.
        let r = server.client().request("POST", &format!("/functions/{id}/invoke"), &headers(&attacker), b"");
        expect(&r, 504, "invoke_timeout");
    }
    b.finish("random_get over 1 GiB").p99_within(BYSTANDER_P99);
}

/// Runs `op` over its `pages` of memory 32 times in straight-line code, then returns: no loop
/// and no call (a host call checks the deadline), so no epoch check after `_start`'s entry unless
/// the instructions themselves are checked. Uninterrupted, it holds its shard for its whole
/// course (hundreds of milliseconds here), and the bystander's P99 shows it.
fn bulk_memory(pages: u32, op: &str) -> Vec<u8> {
    let bytes = pages as u64 * 65536;
    let instruction = match op {
        "fill" => format!("(memory.fill (i32.const 0) (i32.const 7) (i32.const {bytes}))"),
        _ => format!("(memory.copy (i32.const {half}) (i32.const 0) (i32.const {half}))", half = bytes / 2),
    };
    guests::wasm(&format!(
        r#"(module
  (memory (export "memory") {pages})
  (func (export "_start")
    {body}))"#,
        body = vec![instruction; 32].join("\n    ")
    ))
}

#[test]
fn a_bulk_memory_instruction_stops_at_the_deadline_and_never_holds_the_shard() {
    let _serial = serial();
    let server = start(&["--shards", "1", "--max-memory-limit-mb", "256"]);
    let attacker = as_tenant(ATTACKER, "1");
    let extra = json!({"memory_limit_mb": 256, "timeout_ms": 100});
    let ids: Vec<String> = ["fill", "copy"]
        .iter()
        .map(|op| deploy_with(&server, &attacker, op, &bulk_memory(4096, op), extra.clone()))
        .collect();
    let b = victim(&server);
    for id in ids.iter().chain(&ids) {
        // 32 instructions over 256 MiB each, each one libcall of wasmtime's that no epoch check
        // interrupts unless it is cut into chunks (wasm::bulk_memory).
        let r = server.client().request("POST", &format!("/functions/{id}/invoke"), &headers(&attacker), b"");
        expect(&r, 504, "invoke_timeout");
    }
    b.finish("memory.fill and memory.copy over 256 MiB").p99_within(BYSTANDER_P99);
}

#[test]
fn fd_write_refuses_more_buffers_than_iov_max() {
    let _serial = serial();
    let server = start(&[]);
    let attacker = as_tenant(ATTACKER, "1");
    // 100,000 empty iovecs in one call: EINVAL (28), which the guest returns as its exit code.
    let wasm = guests::wasm(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 16)
  (func (export "_start")
    (call $proc_exit (call $fd_write (i32.const 2) (i32.const 0) (i32.const 100000) (i32.const 900000)))))"#,
    );
    let id = deploy_as(&server, "iovecs", &wasm, &attacker);
    let r = server.client().request("POST", &format!("/functions/{id}/invoke"), &headers(&attacker), b"");
    expect(&r, 502, "guest_exit");
    assert!(r.text().contains("code 28"), "{}", r.text());
}

/// Starts `n` invocations of `id` as `who`, each on its own connection, without waiting.
fn start_invokes(server: &Server, id: &str, who: &[(String, String)], n: usize) -> Vec<Client> {
    let h = headers(who);
    (0..n)
        .map(|_| {
            let mut c = server.client();
            c.send_raw(&common::encode_request("POST", &format!("/functions/{id}/invoke"), &h, b""));
            c
        })
        .collect()
}

fn spinner(server: &Server, who: &[(String, String)], timeout_ms: u64) -> String {
    deploy_with(server, who, "spin", &guests::infinite_loop(), json!({"timeout_ms": timeout_ms}))
}

#[test]
fn a_tenant_past_its_concurrency_gets_429_and_others_keep_their_share() {
    let _serial = serial();
    let server = start(&["--shards", "1", "--max-instances", "16", "--max-concurrent-per-tenant", "4"]);
    let attacker = as_tenant(ATTACKER, "1");
    let spin = spinner(&server, &attacker, 3000);
    let b = victim(&server);
    let running = start_invokes(&server, &spin, &attacker, 4);
    server.wait_for_metric("tensor_wasm_active_instances", &[], 4.0);
    let r = server.client().request("POST", &format!("/functions/{spin}/invoke"), &headers(&attacker), b"");
    expect(&r, 429, "concurrency_limited");
    assert!(r.header("retry-after").is_some());
    assert_eq!(server.metric("tensor_wasm_concurrency_limited_total", &[]), 1.0);
    for mut c in running {
        expect(&c.read_response(), 504, "invoke_timeout");
    }
    // Its slots are its own again once they finished.
    let r = server.client().request("POST", &format!("/functions/{spin}/invoke"), &headers(&attacker), b"");
    expect(&r, 504, "invoke_timeout");
    b.finish("a tenant at its concurrency limit").p99_within(BYSTANDER_P99);
}

#[test]
fn the_shard_s_slice_timer_ticks_only_while_a_guest_runs_long() {
    let _serial = serial();
    let server = start(&["--shards", "1"]);
    let ticks = || server.metric("tensor_wasm_slice_timer_ticks_total", &[]);
    let attacker = as_tenant(ATTACKER, "1");
    // Short invocations never arm it: each ends before it yields as a long runner.
    let hello = deploy_with(&server, &attacker, "hello", &guests::hello(), json!({}));
    for _ in 0..50 {
        assert_eq!(
            server.client().request("POST", &format!("/functions/{hello}/invoke"), &headers(&attacker), b"").status,
            200
        );
    }
    assert_eq!(ticks(), 0.0, "the timer ticked for short invocations");
    // A guest that spins past its first slices arms it, and it ticks while the guest runs.
    let spin = spinner(&server, &attacker, 1500);
    let mut running = start_invokes(&server, &spin, &attacker, 1);
    within(Duration::from_secs(10), "slice-timer ticks while a guest spins", || ticks() >= 20.0);
    expect(&running[0].read_response(), 504, "invoke_timeout");
    // With no long runner left it stops: at most one tick was on its way.
    let after = ticks();
    std::thread::sleep(Duration::from_millis(200));
    assert!(ticks() <= after + 1.0, "the timer kept ticking after the long runner ended: {after} then {}", ticks());
}

#[test]
fn probes_answer_while_every_instance_slot_spins() {
    let _serial = serial();
    // Four tenants, each near its share (a quarter of the pool by default), fill all but four
    // slots of the one shard with guests that never yield on their own; a fifth tenant's short
    // invocations come and go beside them, each ending while spinners wait for their turn.
    let dir = tempfile::tempdir().unwrap();
    let list = (1..=4).map(|t| format!("spinner{t}-0123456789abcdef0123456789:tenant={t}")).collect::<Vec<_>>();
    let list = format!("{},{VICTIM}:tenant=5", list.join(","));
    let server = Server::start_with(dir.path(), &["--shards", "1", "--max-instances", "64"], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", &list);
    });
    let mut running = Vec::new();
    for t in 1..=4 {
        let who = as_tenant(&format!("spinner{t}-0123456789abcdef0123456789"), &t.to_string());
        let spin = spinner(&server, &who, 6000);
        running.extend(start_invokes(&server, &spin, &who, 15));
    }
    let metric = || server.metric("tensor_wasm_active_instances", &[]);
    within(Duration::from_secs(20), "the spinners running", || metric() >= 60.0);
    let b = Bystander::start_as(&server, &headers(&as_tenant(VICTIM, "5")));
    // While 60 spin and short requests end beside them: the probe's round trips.
    let mut probe = server.client();
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        assert_eq!(probe.request("GET", "/healthz", &[], b"").status, 200);
        latencies.push(t.elapsed());
    }
    assert!(metric() >= 60.0, "the guests ended before the probes did");
    latencies.sort();
    let p99 = latencies[197];
    eprintln!("/healthz with 60 spinning guests: P50 {:?}, P99 {p99:?}", latencies[100]);
    assert!(p99 <= BYSTANDER_P99, "/healthz P99 {p99:?} with every slot spinning");
    b.finish("60 spinning guests").p99_within(BYSTANDER_P99);
    for mut c in running {
        expect(&c.read_response(), 504, "invoke_timeout");
    }
}

/// Every audit record under the server's data dir.
fn records(audit: &Path) -> Vec<Value> {
    let (code, out, err) = common::tensor_wasm(&["audit", "tail", "-n", "1000000", audit.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// How many refusals the records of `kind` account for: each record of a refusal is one, plus
/// the ones it says were left out before it; a summary counts only those.
fn accounted(records: &[Value], kind: &str) -> u64 {
    records
        .iter()
        .filter(|r| r["outcome"]["error_kind"] == kind)
        .map(|r| u64::from(r["action"] != "refusals_left_out") + r["outcome"]["repeated"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn failed_authentication_is_coalesced_in_the_audit_log_and_rate_limited_per_source() {
    let _serial = serial();
    let server = start(&[
        "--unauthenticated-rate-limit-qps",
        "10",
        "--unauthenticated-rate-limit-burst",
        "20",
        "--rate-limit-qps",
        "1",
        "--rate-limit-burst",
        "1",
    ]);
    let mut c = server.client();
    let (mut unauthorized, mut limited) = (0u64, 0u64);
    for _ in 0..300 {
        let r = c.request("GET", "/functions", &[("authorization", "Bearer not-a-token-not-a-token")], b"");
        match r.status {
            401 => unauthorized += 1,
            429 => {
                expect(&r, 429, "unauthenticated_rate_limited");
                assert!(r.header("retry-after").is_some());
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    // One connection stays on one shard, which enforces the whole burst.
    assert!(limited > 0 && unauthorized >= 20, "{unauthorized} 401s, {limited} 429s");
    // A token over its own rate: its 429s are coalesced too.
    let attacker = as_tenant(ATTACKER, "1");
    let mut token_limited = 0u64;
    for _ in 0..50 {
        let r = c.request("GET", "/functions", &headers(&attacker), b"");
        if r.status == 429 {
            expect(&r, 429, "rate_limited");
            token_limited += 1;
        }
    }
    assert!(token_limited >= 45, "{token_limited}");
    // The log holds a few records that account for every refusal, once the windows ended.
    let audit = server.data_dir.join("audit");
    // Each check reads whole segments: once every half second is plenty.
    within(Duration::from_secs(10), "every refusal accounted for", || {
        std::thread::sleep(Duration::from_millis(500));
        let all = records(&audit);
        accounted(&all, "unauthorized") == unauthorized
            && accounted(&all, "unauthenticated_rate_limited") == limited
            && accounted(&all, "rate_limited") == token_limited
    });
    let all = records(&audit);
    assert!(all.len() < 40, "{} records for {} refusals", all.len(), unauthorized + limited + token_limited);
    assert!(server.metric("tensor_wasm_audit_refusals_coalesced_total", &[]) > 300.0);
    let (code, out, err) = common::tensor_wasm(&["audit", "verify", audit.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // Another source is not limited by this one: a valid token still passes at once.
    let victim = as_tenant(VICTIM, "2");
    assert_eq!(server.client().request("GET", "/functions", &headers(&victim), b"").status, 200);
}

#[test]
fn guest_stderr_cannot_forge_log_lines() {
    let _serial = serial();
    let server = start(&[]);
    let attacker = as_tenant(ATTACKER, "1");
    let forged = "ok\n2026-12-07T00:00:00Z  INFO function deleted tenant=8 token_id=ADMIN\x1b[2K\r";
    let id = deploy_as(&server, "forger", &guests::write_and_exit("out", forged, 3), &attacker);
    let r = server.client().request("POST", &format!("/functions/{id}/invoke"), &headers(&attacker), b"");
    expect(&r, 502, "guest_exit");
    let log = server.wait_for_stderr("invocation failed");
    let line = log.lines().find(|l| l.contains("invocation failed")).unwrap();
    assert!(
        line.contains(r"ok\n2026-12-07T00:00:00Z  INFO function deleted tenant=8 token_id=ADMIN\x1b[2K\r"),
        "{line}"
    );
    assert!(!log.lines().any(|l| l.starts_with("2026-12-07T00:00:00Z")), "{log}");
    assert!(!log.contains('\x1b'), "{log}");
}

/// A module of `functions` functions, each with a body of about `body_bytes` bytes.
/// The nice value of every thread of the server's child processes (its compiles), from /proc.
/// The scheduling policy of every thread of the server's children (the compile children): 0 is
/// SCHED_OTHER, 5 SCHED_IDLE.
fn compile_threads_policy(server: &Server) -> Vec<i64> {
    // The fields after `(comm)`: state, ppid, …; the policy is the 41st field of the line, the 39th
    // here.
    let fields = |stat: &str| -> Vec<String> {
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().map(String::from).collect()).unwrap_or_default()
    };
    let mut policy = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if fields(&stat).get(1).map(String::as_str) != Some(server.pid().to_string().as_str()) {
            continue;
        }
        for task in std::fs::read_dir(entry.path().join("task")).into_iter().flatten().flatten() {
            if let Some(n) =
                std::fs::read_to_string(task.path().join("stat")).ok().and_then(|s| fields(&s).get(38)?.parse().ok())
            {
                policy.push(n);
            }
        }
    }
    policy
}

fn module_of(functions: usize, body_bytes: usize) -> Vec<u8> {
    let body = "(drop (i32.const 0))".repeat(body_bytes / 3);
    let funcs = (0..functions).map(|_| format!("(func {body})")).collect::<String>();
    guests::wasm(&format!(r#"(module {funcs} (func (export "_start")))"#))
}

#[test]
fn a_module_is_refused_for_its_shape_before_it_is_compiled() {
    let _serial = serial();
    let server = start(&[
        "--max-module-functions",
        "100",
        "--max-module-code-bytes",
        "65536",
        "--max-function-body-bytes",
        "4096",
    ]);
    let attacker = as_tenant(ATTACKER, "1");
    let b = victim(&server);
    let deploy = |wasm: Vec<u8>| deploy_module(&server, &attacker, "shape", &wasm);
    let r = deploy(module_of(200, 0));
    expect(&r, 400, "too_many_functions");
    assert!(r.text().contains("201 functions") && r.text().contains("100"), "{}", r.text());
    let r = deploy(module_of(50, 2000));
    expect(&r, 400, "code_too_large");
    let r = deploy(module_of(2, 6000));
    expect(&r, 400, "function_too_large");
    // Within every limit: deployed and served.
    let r = deploy(module_of(50, 100));
    assert_eq!(r.status, 201, "{}", r.text());
    b.finish("modules over their shape").p99_within(BYSTANDER_P99);
}

/// A module whose data segment holds `bytes` bytes: storage without compile time.
fn module_with_data(bytes: usize, seed: u8) -> Vec<u8> {
    let pages = bytes.div_ceil(65536) + 1;
    let data = format!("\\{seed:02x}").repeat(bytes);
    guests::wasm(&format!(r#"(module (memory {pages}) (data (i32.const 0) "{data}") (func (export "_start")))"#))
}

fn deploy_module(server: &Server, who: &[(String, String)], name: &str, wasm: &[u8]) -> Response {
    deploy_request(&mut server.client(), who, name, wasm, json!({}))
}

#[test]
fn a_tenant_is_held_to_its_function_and_storage_quotas() {
    let _serial = serial();
    let server = start(&["--max-functions-per-tenant", "3", "--max-storage-mb-per-tenant", "1"]);
    let attacker = as_tenant(ATTACKER, "1");
    let b = victim(&server);
    // Storage: a 300 KB module and its artifact fit in 1 MiB; a second one does not.
    let r = deploy_module(&server, &attacker, "a", &module_with_data(300_000, 1));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = deploy_module(&server, &attacker, "b", &module_with_data(300_000, 2));
    expect(&r, 403, "quota_exceeded");
    assert!(r.text().contains("`storage`"), "{}", r.text());
    // A module over the quota by itself is refused before it is compiled.
    let r = deploy_module(&server, &attacker, "huge", &module_with_data(1_200_000, 3));
    expect(&r, 403, "quota_exceeded");
    // The same module again costs nothing more.
    let r = deploy_module(&server, &attacker, "a2", &module_with_data(300_000, 1));
    assert_eq!(r.status, 201, "{}", r.text());
    // Functions: three, then 403 naming the quota.
    let r = deploy_module(&server, &attacker, "h", &guests::hello());
    assert_eq!(r.status, 201, "{}", r.text());
    let r = deploy_module(&server, &attacker, "h2", &guests::hello());
    expect(&r, 403, "quota_exceeded");
    assert!(r.text().contains("`functions`") && r.text().contains("3"), "{}", r.text());
    // Another tenant's quotas are its own.
    let r = deploy_module(&server, &as_tenant(OTHER, "3"), "b", &module_with_data(300_000, 2));
    assert_eq!(r.status, 201, "{}", r.text());
    b.finish("a tenant at its quotas").p99_within(BYSTANDER_P99);
}

/// Free bytes on the file system of `path`.
fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

#[test]
fn deploys_never_take_the_audit_logs_reserve() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // The reserve is all but 16 MiB of what is free now: small deploys fit, a 32 MiB one does not.
    let reserve_mb = (free_bytes(dir.path()) / (1024 * 1024)).saturating_sub(16).to_string();
    let server = Server::start_with(
        dir.path(),
        &["--audit-reserve-mb", &reserve_mb, "--audit-segment-bytes", "65536", "--max-storage-mb-per-tenant", "1024"],
        |cmd| {
            cmd.env("TENSOR_WASM_API_TOKENS", tokens());
        },
    );
    let attacker = as_tenant(ATTACKER, "1");
    let b = victim(&server);
    let r = deploy_module(&server, &attacker, "big", &module_with_data(32 * 1024 * 1024, 7));
    expect(&r, 507, "insufficient_storage");
    // Everyone else keeps being served and audited.
    let hello = deploy_as(&server, "small", &guests::hello(), &as_tenant(OTHER, "3"));
    let r =
        server.client().request("POST", &format!("/functions/{hello}/invoke"), &headers(&as_tenant(OTHER, "3")), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    b.finish("deploys against the audit reserve").p99_within(BYSTANDER_P99);
    let audit = server.data_dir.join("audit");
    assert!(records(&audit).iter().any(|r| r["outcome"]["error_kind"] == "insufficient_storage"));
}

#[test]
fn one_tenants_compiles_delay_neither_anothers_deletes_nor_its_deploys() {
    let _serial = serial();
    let server = start(&["--admin-queue-depth", "8", "--admin-queue-depth-per-tenant", "3"]);
    let (attacker, other) = (as_tenant(ATTACKER, "1"), as_tenant(OTHER, "3"));
    let b = victim(&server);
    let doomed = deploy_as(&server, "doomed", &guests::hello(), &other);
    // The attacker queues several large modules, each seconds of compiling.
    let started = Instant::now();
    let big: Vec<_> = (0..5u8)
        .map(|i| {
            let (server_addr, who) = (server.addr, attacker.clone());
            std::thread::spawn(move || {
                let mut wasm = module_of(20_000, 30);
                // Each distinct, so that none is live already.
                wasm.extend_from_slice(&[0, 5, 3, b'p', b'a', b'd', i]);
                let r = deploy_request(&mut Client::connect(server_addr), &who, &format!("big{i}"), &wasm, json!({}));
                let kind = serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v["error"]["kind"].as_str().map(String::from));
                (r.status, kind, Instant::now())
            })
        })
        .collect();
    within(Duration::from_secs(30), "the attacker's deploys queued", || {
        server.metric("tensor_wasm_http_requests_total", &[("route", "/functions"), ("method", "POST")]) >= 1.0
            || big.iter().any(|t| t.is_finished())
    });
    // The compile runs in a child under SCHED_IDLE (`--compile-priority idle`), every thread of
    // it: it gets only the CPU the shards leave.
    // A child is under SCHED_OTHER for the moment between its spawn and the server's
    // sched_setscheduler, before it has read its module: wait for one seen after that, or for the
    // deploys to end.
    const SCHED_IDLE: i64 = 5;
    let mut policy = Vec::new();
    within(Duration::from_secs(30), "a compile child seen under SCHED_IDLE", || {
        policy = compile_threads_policy(&server);
        (!policy.is_empty() && policy.iter().all(|&p| p == SCHED_IDLE)) || big.iter().all(|t| t.is_finished())
    });
    assert!(
        !policy.is_empty() && policy.iter().all(|&p| p == SCHED_IDLE),
        "compile threads' scheduling policies: {policy:?}"
    );
    // Another tenant's delete and deploy are served while the attacker's modules compile.
    let r = server.client().request("DELETE", &format!("/functions/{doomed}"), &headers(&other), b"");
    assert_eq!(r.status, 204, "{}", r.text());
    let deleted = Instant::now();
    let sent = Instant::now();
    let r = deploy_module(&server, &other, "small", &guests::hello());
    assert_eq!(r.status, 201, "{}", r.text());
    let deployed = Instant::now();
    let outcomes: Vec<_> = big.into_iter().map(|t| t.join().unwrap()).collect();
    let created: Vec<Instant> = outcomes.iter().filter(|o| o.0 == 201).map(|o| o.2).collect();
    let limited = outcomes.iter().filter(|o| o.0 == 429 && o.1.as_deref() == Some("admin_queue_limited")).count();
    assert!(limited >= 1, "no deploy past the tenant's share was refused: {outcomes:?}");
    assert!(created.len() >= 2, "{outcomes:?}");
    // The delete never waited for a compile; the deploy waited for at most the one running.
    assert!(created.iter().all(|&c| deleted < c), "a delete waited behind a compile: {outcomes:?}");
    // Of the attacker's compiles that ended while it was queued, at most two: the one running when
    // it came, and the attacker's turn if it stood before this tenant's in the round robin (one
    // job a tenant a turn). Not the attacker's whole line, which a first-come queue would make it
    // wait for. (Those that ended before it was sent are no wait of its.)
    let waited_for = created.iter().filter(|&&c| sent < c && c < deployed).count();
    assert!(waited_for <= 2, "queued behind the attacker's line: {outcomes:?}");
    eprintln!("attacker's deploys took {:?}", started.elapsed());
    b.finish("another tenant's compiles").p99_within(BYSTANDER_P99);
}

#[test]
fn a_module_over_its_compile_budget_is_refused_and_the_server_keeps_none_of_it() {
    let _serial = serial();
    let (memory, time) = (start(&["--compile-memory-mb", "256"]), start(&["--compile-timeout-ms", "300"]));
    let attacker = as_tenant(ATTACKER, "1");
    let b = victim(&memory);
    let before = rss_bytes(&memory);
    // 100,000 functions (the shape limit): about a gigabyte of address space and seconds of
    // compiling (perf/HOSTILE.md).
    let heavy = module_of(99_999, 0);
    let r = deploy_module(&memory, &attacker, "heavy", &heavy);
    expect(&r, 400, "module_too_complex");
    assert!(r.text().contains("--compile-memory-mb"), "{}", r.text());
    let r = deploy_module(&time, &attacker, "heavy", &heavy);
    expect(&r, 400, "module_too_complex");
    assert!(r.text().contains("--compile-timeout-ms (300 ms) of CPU time"), "{}", r.text());
    // The server compiled nothing itself: its memory did not grow by the compile's.
    let grown = rss_bytes(&memory).saturating_sub(before);
    assert!(grown < 64 * 1024 * 1024, "the server grew by {grown} bytes");
    // A module within the budget compiles in the child and serves.
    let hello = deploy_as(&memory, "hello", &guests::hello(), &attacker);
    let r = memory.client().request("POST", &format!("/functions/{hello}/invoke"), &headers(&attacker), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    b.finish("a module over its compile budget").p99_within(BYSTANDER_P99);
}

#[test]
fn a_compile_is_held_to_its_cpu_time_and_one_starved_of_cpu_is_answered_overloaded() {
    let _serial = serial();
    // The server on one CPU, and beside it a thread that keeps that CPU busy: the compile child,
    // under SCHED_IDLE, gets a fraction of a percent of it.
    let cpu = last_cpu();
    let args = ["--shards", "1", "--compile-timeout-ms", "1000", "--compile-wall-timeout-ms", "3000"];
    let server = Server::start_fresh_with(&args, |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", tokens());
        on_cpu(cmd, cpu);
    });
    let attacker = as_tenant(ATTACKER, "1");
    // 3,000 functions, each module distinct: tens of milliseconds of compiling, well within the
    // CPU budget, and far more than a starved child gets in seconds.
    let module = |n: u8| {
        let mut wasm = module_of(3_000, 0);
        wasm.extend_from_slice(&[0, 5, 3, b'p', b'a', b'd', n]);
        wasm
    };
    let hog = CpuHog::on(cpu);
    // Starved past the wall-clock backstop: the host's fault, not the module's, so 503.
    let r = deploy_module(&server, &attacker, "starved", &module(0));
    expect(&r, 503, "overloaded");
    assert!(r.header("retry-after").is_some(), "{}", r.text());
    assert!(r.text().contains("--compile-wall-timeout-ms (3000 ms)"), "{}", r.text());
    // Starved for longer than its CPU budget, then given the CPU: it compiles, since what it was
    // judged by is the CPU time it used.
    let (addr, who) = (server.addr, attacker.clone());
    let waiting =
        std::thread::spawn(move || deploy_request(&mut Client::connect(addr), &who, "late", &module(1), json!({})));
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(!waiting.is_finished(), "the compile was not starved: the test proves nothing");
    drop(hog);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    // The module refused while the host was busy deploys now.
    let r = deploy_module(&server, &attacker, "starved", &module(0));
    assert_eq!(r.status, 201, "{}", r.text());
}
