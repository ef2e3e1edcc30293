//! The hostile scenario (issue 31): the attacks of tests/hostile.rs at rate, beside a bystander.
//!
//! A server started with two tenants' tokens, an attacker's and a bystander's. The bystander sends
//! the harness's usual open-loop load ([`super::load`]): `/healthz`, and invokes of its own hello.
//! The first phase is quiet, the bystander alone; then the same load runs again beside each attack
//! in turn, and beside all of them together; last, the bystander is alone again, which shows
//! whether the server came back to its quiet latency. Each phase is one [`Measurement`] of the
//! bystander, and each attack's answers are counted by status and kind. A phase passes when the
//! bystander was never failed, its P99 stayed within 2× of the quiet phase's
//! ([`slo::QUIET_P99_RATIO`]), and the attacker got only the refusals its attack is meant to get
//! ([`slo::ONLY_REFUSALS`]).
//!
//! An attack is a few threads, each sending at its own due times (together at most
//! `--attack-rate` a second), one request at a time: an attacker who waits for its answers, so
//! that an attack costs the server what its requests cost, not what a backlog in the harness
//! would. Every attack ends when the bystander's load does, or at a hard deadline, and then waits
//! for the answers it is still owed, so that the next phase starts without it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{Connection, Response};
use super::guests;
use super::interrupt;
use super::load::RequestClass;
use super::measure::Measurement;
use super::scenario::{deploy, deploy_request, deploy_with, Prepared, ServerSettings};
use super::session::{Session, Settings};
use super::slo::{self, TrafficClass, Verdict};
use super::target::Endpoint;

const ATTACKER_TENANT: u64 = 1;
const BYSTANDER_TENANT: u64 = 2;
const ATTACKER_TOKEN: &str = "tensor-wasm-bench-attacker-0123456789";
const BYSTANDER_TOKEN: &str = "tensor-wasm-bench-bystander-012345678";

/// The attacker's running invocations per shard (`--max-concurrent-per-tenant`): low enough that
/// a few dozen connections go past it, as a quarter of the default pool (250) would need hundreds.
const CONCURRENCY_PER_SHARD: usize = 8;
/// The attacker's deploys waiting for the catalog worker (`--admin-queue-depth-per-tenant`).
/// Small, so that a deploy flood is refused quickly and the deploys still owed answers when a
/// phase ends are a second or two of compiling, not a queue of them.
const DEPLOY_QUEUE_PER_TENANT: usize = 2;

/// A spinning guest's deadline: long enough that the attacker's running guests pile up to its
/// cap and past it.
const SPIN_TIMEOUT_MS: u64 = 1000;
/// The deadline of the guests that loop `random_get` or `memory.fill`, as in tests/hostile.rs.
const HOST_CALL_TIMEOUT_MS: u64 = 100;
/// Their memory: 64 MiB, the default `--max-memory-limit-mb`, so the worst the defaults allow.
const GUEST_MEMORY_PAGES: u64 = 1024;
const GUEST_MEMORY_MB: u64 = GUEST_MEMORY_PAGES / 16;
/// The body an anonymous request declares: 64 MiB, tests/hostile.rs's.
const BIG_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How much of it is sent before the answer is read: the server must answer from the head.
const BIG_BODY_SENT: usize = 64 * 1024;
/// Functions of the deploy flood's module: about a second of compiling on the development VM
/// (perf/HOSTILE.md: 100,000 such functions took 6.2 s), distinct for every deploy.
const HEAVY_MODULE_FUNCTIONS: usize = 20_000;
/// How long an attacker waits for one answer: a spinner's deadline, or a deploy behind a queue
/// of compiles, and time to spare.
const ATTACK_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// An attack's hard end, past the bystander's warm-up and measured window.
const ATTACK_GRACE: Duration = Duration::from_secs(5);
/// How many times the deploy flood tries to delete what it created, and how long it waits between
/// tries (the `retry-after: 1` of a 429).
const DELETE_TRIES: usize = 10;
const DELETE_RETRY: Duration = Duration::from_secs(1);
/// The longest a sleeping attack thread goes without looking at the flag that ends it.
const ATTACK_NAP: Duration = Duration::from_millis(50);

/// One attack of tests/hostile.rs that can run at rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Anonymous POSTs declaring 64 MiB bodies: to `/healthz` (405), and deploys and invokes with
    /// `expect: 100-continue` (401, or 429 past the per-source limit). Memory before auth.
    BigBodies,
    /// Requests with a bad token on keep-alive connections: 401, then 429
    /// `unauthenticated_rate_limited` (per-source GCRA).
    AuthFlood,
    /// The attacker's guests that never yield on their own, up to and past its concurrency cap:
    /// 504 at their deadline, 429 `concurrency_limited` past the cap.
    Spinners,
    /// A guest looping `random_get` over its 64 MiB: 504 at its 100 ms deadline.
    RandomGet,
    /// A guest looping `memory.fill` over its 64 MiB, one instruction per turn: 504.
    BulkMemory,
    /// Deploys of large, distinct modules (seconds of compiling), each deleted once created: 201,
    /// or 429 `admin_queue_limited` past the tenant's share of the catalog worker's queue.
    DeployFlood,
}

impl Attack {
    pub const ALL: [Attack; 6] = [
        Attack::BigBodies,
        Attack::AuthFlood,
        Attack::Spinners,
        Attack::RandomGet,
        Attack::BulkMemory,
        Attack::DeployFlood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::BigBodies => "big-bodies",
            Attack::AuthFlood => "auth-flood",
            Attack::Spinners => "spinners",
            Attack::RandomGet => "random-get",
            Attack::BulkMemory => "bulk-memory",
            Attack::DeployFlood => "deploy-flood",
        }
    }

    /// The answers the attack is meant to get, as [`label`] writes them. Every invoking attack may
    /// meet the attacker's concurrency cap, which the spinners fill in the phase of all attacks.
    fn expected(self) -> &'static [&'static str] {
        match self {
            Attack::BigBodies => &["405 method_not_allowed", "401 unauthorized", "429 unauthenticated_rate_limited"],
            Attack::AuthFlood => &["401 unauthorized", "429 unauthenticated_rate_limited"],
            Attack::Spinners | Attack::RandomGet | Attack::BulkMemory => {
                &["504 invoke_timeout", "429 concurrency_limited"]
            }
            // A delete waits in the same share of the queue as the attacker's own deploys, which
            // may keep it full for longer than the flood retries the delete.
            Attack::DeployFlood => &["201", "429 admin_queue_limited", "delete 429 admin_queue_limited"],
        }
    }

    /// Threads the attack sends from: past the cap for the spinners (twice it, so that both
    /// shards' shares fill however the kernel spreads the connections), past the queue share for
    /// the deploys, and a couple for the rest, whose answers come at once or at a short deadline.
    fn workers(self, shards: usize) -> usize {
        match self {
            Attack::BigBodies => 4,
            Attack::AuthFlood | Attack::RandomGet | Attack::BulkMemory => 2,
            Attack::Spinners => 2 * CONCURRENCY_PER_SHARD * shards,
            Attack::DeployFlood => DEPLOY_QUEUE_PER_TENANT + 2,
        }
    }
}

/// The hostile scenario's settings.
#[derive(Clone, Debug)]
pub struct HostileOptions {
    /// The attacks, each a phase of its own; with more than one, a last phase runs them together.
    pub attacks: Vec<Attack>,
    /// The most requests a second each attack sends.
    pub attack_rate: f64,
}

impl Default for HostileOptions {
    fn default() -> Self {
        HostileOptions { attacks: Attack::ALL.to_vec(), attack_rate: 100.0 }
    }
}

/// The tokens of both tenants and the attacker's caps, for a server of `shards` shards.
pub fn server_settings(shards: usize) -> ServerSettings {
    ServerSettings {
        args: vec![
            "--max-concurrent-per-tenant".into(),
            (CONCURRENCY_PER_SHARD * shards).to_string(),
            "--admin-queue-depth-per-tenant".into(),
            DEPLOY_QUEUE_PER_TENANT.to_string(),
        ],
        env: vec![(
            "TENSOR_WASM_API_TOKENS".into(),
            format!("{ATTACKER_TOKEN}:tenant={ATTACKER_TENANT},{BYSTANDER_TOKEN}:tenant={BYSTANDER_TENANT}"),
        )],
    }
}

/// The bystander's load: `/healthz` as a probe sends it, and invokes of its own hello.
pub fn prepare_bystander(endpoint: &Endpoint) -> Result<Prepared, String> {
    let bystander = endpoint.acting_as(Some(BYSTANDER_TOKEN.into()), Some(BYSTANDER_TENANT));
    let id = deploy(&bystander, "bench-bystander", &guests::hello())?;
    Ok(Prepared {
        classes: vec![
            RequestClass {
                name: "bystander healthz".into(),
                request: endpoint.request("GET", "/healthz", b"").into(),
                weight: 1,
            },
            RequestClass {
                name: "bystander invoke".into(),
                request: bystander.request("POST", &format!("/functions/{id}/invoke"), b"").into(),
                weight: 1,
            },
        ],
        traffic: TrafficClass::Hostile,
        expected: Vec::new(),
        judge_admitted: false,
        storm: false,
        functions: vec![(bystander, id)],
    })
}

/// What one attack did in one phase.
#[derive(Clone, Debug, Serialize)]
pub struct AttackReport {
    pub attack: Attack,
    pub workers: usize,
    pub offered_rate: f64,
    pub attempts: u64,
    /// Answers by `status kind` (`status` alone for a success), and `no answer`.
    pub answers: BTreeMap<String, u64>,
    /// Answers not among the attack's expected ones.
    pub unexpected: u64,
    pub first_unexpected: Option<String>,
}

/// One phase: the bystander's measurement beside the attacks of the phase (none when quiet).
#[derive(Clone, Debug, Serialize)]
pub struct HostilePhase {
    /// `quiet`, an attack's name, `all`, or `quiet again`.
    pub name: &'static str,
    pub attacks: Vec<AttackReport>,
    /// The bystander's requests due in the measured window, answered or not.
    pub bystander_requests: u64,
    /// The share of them answered 2xx.
    pub bystander_success_ratio: Option<f64>,
    /// The bystander's P99 over its P99 in the quiet phase.
    pub p99_over_quiet: Option<f64>,
    /// The server's resident high-water mark (VmHWM) at the end of the phase, in MiB: since the
    /// server started, so it shows whether any phase raised it. The phase's own peak is in
    /// `bystander.server_memory`.
    pub server_vm_hwm_mib: Option<f64>,
    pub bystander: Measurement,
}

/// The whole scenario.
#[derive(Clone, Debug, Serialize)]
pub struct HostileRun {
    pub offered_rate: f64,
    pub attack_rate: f64,
    pub shards: Option<usize>,
    pub phases: Vec<HostilePhase>,
    /// Every phase's gated verdicts held.
    pub pass: bool,
}

/// The attacker's functions, deployed before the first phase.
struct Targets {
    attacker: Endpoint,
    spinner: String,
    random: String,
    bulk: String,
    /// The deploy flood's module, to which each deploy appends a distinct custom section.
    heavy: Vec<u8>,
}

impl Targets {
    fn deploy(endpoint: &Endpoint) -> Result<Targets, String> {
        let attacker = endpoint.acting_as(Some(ATTACKER_TOKEN.into()), Some(ATTACKER_TENANT));
        let extra =
            |timeout_ms: u64| serde_json::json!({ "timeout_ms": timeout_ms, "memory_limit_mb": GUEST_MEMORY_MB });
        let spinner = deploy_with(&attacker, "hostile-spin", &guests::infinite_loop(), extra(SPIN_TIMEOUT_MS))?;
        let random = deploy_with(
            &attacker,
            "hostile-random",
            &guests::random_get_loop(GUEST_MEMORY_PAGES),
            extra(HOST_CALL_TIMEOUT_MS),
        )?;
        let bulk = deploy_with(
            &attacker,
            "hostile-fill",
            &guests::memory_fill_loop(GUEST_MEMORY_PAGES),
            extra(HOST_CALL_TIMEOUT_MS),
        )?;
        Ok(Targets { attacker, spinner, random, bulk, heavy: guests::many_functions(HEAVY_MODULE_FUNCTIONS) })
    }
}

/// Runs the quiet phase, a phase per attack (and one of all of them, where there are several),
/// and the quiet one again, the bystander at `rate`, on `session`'s server.
pub fn run(session: &Session, rate: f64, settings: &Settings) -> Result<HostileRun, String> {
    let options = &settings.scenario.hostile;
    if !(options.attack_rate.is_finite() && options.attack_rate > 0.0) {
        return Err(format!(
            "--attack-rate must be a positive number of requests per second, not {}",
            options.attack_rate
        ));
    }
    let targets = Targets::deploy(session.endpoint())?;
    let mut plan: Vec<(&'static str, Vec<Attack>)> = vec![("quiet", Vec::new())];
    plan.extend(options.attacks.iter().map(|a| (a.name(), vec![*a])));
    if options.attacks.len() > 1 {
        plan.push(("all", options.attacks.clone()));
    }
    // Judged like the others: an attack whose cost outlives it (memory, slots, a backlog) shows
    // here, and so does how far two quiet windows of this machine differ.
    plan.push(("quiet again", Vec::new()));
    let mut phases: Vec<HostilePhase> = Vec::new();
    for (name, attacks) in plan {
        let mut phase = measure_phase(session, rate, settings, &targets, name, &attacks)?;
        if let Some(quiet) = phases.first() {
            let quiet_p99 = quiet.bystander.latency.p99_us;
            let ratio = (quiet_p99 > 0.0).then(|| phase.bystander.latency.p99_us / quiet_p99);
            phase.p99_over_quiet = ratio;
            let unexpected: u64 = phase.attacks.iter().map(|a| a.unexpected).sum();
            phase.bystander.add_verdict(Verdict::judge(slo::QUIET_P99_RATIO, ratio), settings.gate);
            phase.bystander.add_verdict(Verdict::judge(slo::ONLY_REFUSALS, Some(unexpected as f64)), settings.gate);
        }
        phases.push(phase);
        // The server's lingering connections and spent stores go before the next phase.
        std::thread::sleep(Duration::from_millis(300));
    }
    let pass = phases.iter().all(|p| p.bystander.pass);
    Ok(HostileRun { offered_rate: rate, attack_rate: options.attack_rate, shards: session.shards, phases, pass })
}

fn measure_phase(
    session: &Session,
    rate: f64,
    settings: &Settings,
    targets: &Targets,
    name: &'static str,
    attacks: &[Attack],
) -> Result<HostilePhase, String> {
    let shards = session.shards.unwrap_or(1);
    let attack_rate = settings.scenario.hostile.attack_rate;
    let limit = Instant::now() + settings.warmup + settings.duration + ATTACK_GRACE;
    let (mut bystander, reports) = session.measure_beside(rate, settings, |running| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = attacks
                .iter()
                .map(|&attack| scope.spawn(move || run_attack(attack, targets, shards, attack_rate, running, limit)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("an attack thread does not panic")).collect::<Vec<_>>()
        })
    })?;
    // The server's histogram of the invoke route holds the attacker's invokes too (seconds long,
    // at their deadline): it does not say what the bystander's requests spent inside.
    bystander.in_server = None;
    let answered: u64 = bystander.statuses.values().sum();
    let succeeded: u64 = bystander.statuses.iter().filter(|(s, _)| s.starts_with('2')).map(|(_, n)| n).sum();
    let requests = answered + bystander.io_errors + bystander.unsent;
    Ok(HostilePhase {
        name,
        attacks: reports,
        bystander_requests: requests,
        bystander_success_ratio: (requests > 0).then(|| succeeded as f64 / requests as f64),
        p99_over_quiet: None,
        server_vm_hwm_mib: session.server_pid().and_then(vm_hwm_mib),
        bystander,
    })
}

/// The server's resident high-water mark, from /proc.
fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    Some(kib.parse::<f64>().ok()? / 1024.0)
}

/// One attack until `running` clears or `limit` passes.
fn run_attack(
    attack: Attack,
    targets: &Targets,
    shards: usize,
    rate: f64,
    running: &AtomicBool,
    limit: Instant,
) -> AttackReport {
    let endpoint = &targets.attacker;
    let workers = attack.workers(shards);
    let invoke = |id: &str| endpoint.request("POST", &format!("/functions/{id}/invoke"), b"");
    let outcome = match attack {
        Attack::BigBodies => {
            drive(workers, rate, running, limit, || (), |_, n| answer(big_body(endpoint, &targets.spinner, n)))
        }
        Attack::AuthFlood => {
            let bad = endpoint.acting_as(Some("not-a-token-not-a-token-not-a-token".into()), None);
            let request = bad.request("GET", "/functions", b"");
            drive(workers, rate, running, limit, || None, |conn, _| answer(keep_alive(conn, endpoint, &request)))
        }
        Attack::Spinners | Attack::RandomGet | Attack::BulkMemory => {
            let id = match attack {
                Attack::Spinners => &targets.spinner,
                Attack::RandomGet => &targets.random,
                _ => &targets.bulk,
            };
            let request = invoke(id);
            drive(workers, rate, running, limit, || None, |conn, _| answer(keep_alive(conn, endpoint, &request)))
        }
        Attack::DeployFlood => {
            drive(workers, rate, running, limit, || (), |_, n| deploy_heavy(endpoint, &targets.heavy, n))
        }
    };
    let expected = attack.expected();
    let mut report = AttackReport {
        attack,
        workers,
        offered_rate: rate,
        attempts: outcome.values().map(|(n, _)| n).sum(),
        answers: BTreeMap::new(),
        unexpected: 0,
        first_unexpected: None,
    };
    for (label, (n, detail)) in outcome {
        if !expected.contains(&label.as_str()) {
            report.unexpected += n;
            report.first_unexpected.get_or_insert_with(|| detail.unwrap_or_else(|| label.clone()));
        }
        report.answers.insert(label, n);
    }
    report
}

/// Answers by label, each with the first one's text.
type Outcome = BTreeMap<String, (u64, Option<String>)>;

/// One attempt's label (`status kind`, `no answer`, ...) and its text.
type Answer = (String, Option<String>);

/// The label of an answer, or `no answer` with why.
fn answer(r: Result<Response, String>) -> Answer {
    match r {
        Ok(r) => label(&r),
        Err(e) => ("no answer".into(), Some(e)),
    }
}

/// Runs `attempt` from `workers` threads, each with a state that `state` makes, until `running`
/// clears, a signal came, or `limit` passes. Worker `w`'s attempt `i` is due at
/// `start + (w + i·workers)/rate`, so that together they send at most `rate` a second; one whose
/// previous attempt ended late sends at once. `attempt` gets the attempt's number over all
/// workers. The attempts still running when the flag clears are waited for.
fn drive<W>(
    workers: usize,
    rate: f64,
    running: &AtomicBool,
    limit: Instant,
    state: impl Fn() -> W + Sync,
    attempt: impl Fn(&mut W, u64) -> Answer + Sync,
) -> Outcome {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let go = || running.load(Ordering::Relaxed) && !interrupt::interrupted() && Instant::now() < limit;
    let parts: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers as u64)
            .map(|w| {
                let (state, attempt, go) = (&state, &attempt, &go);
                scope.spawn(move || {
                    let mut mine = state();
                    let mut outcome = Outcome::new();
                    // Bounded by the clock: at most (limit − start)·rate attempts over all workers.
                    for i in 0u64.. {
                        let n = w + i * workers as u64;
                        let due = start + interval.mul_f64(n as f64);
                        while go() && Instant::now() < due {
                            std::thread::sleep(due.saturating_duration_since(Instant::now()).min(ATTACK_NAP));
                        }
                        if !go() {
                            break;
                        }
                        let (label, detail) = attempt(&mut mine, n);
                        let entry = outcome.entry(label).or_insert((0, None));
                        entry.0 += 1;
                        if entry.1.is_none() {
                            entry.1 = detail;
                        }
                    }
                    outcome
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("an attack worker does not panic")).collect()
    });
    let mut all = Outcome::new();
    for part in parts {
        for (label, (n, detail)) in part {
            let entry = all.entry(label).or_insert((0, None));
            entry.0 += n;
            if entry.1.is_none() {
                entry.1 = detail;
            }
        }
    }
    all
}

/// `status kind` of an answer (`status` where it names no kind), and its text, for the report's
/// first unexpected answer.
fn label(r: &Response) -> Answer {
    let kind = r.json().ok().and_then(|v| v["error"]["kind"].as_str().map(String::from));
    let label = match kind {
        Some(kind) => format!("{} {kind}", r.status),
        None => r.status.to_string(),
    };
    let text = r.text();
    let detail = (!text.is_empty()).then(|| format!("{label}: {}", text.chars().take(200).collect::<String>()));
    (label, detail)
}

/// Sends `request` on the attacker's keep-alive connection in `conn`, connecting first where
/// there is none; after an error the connection is dropped, as its framing is lost.
fn keep_alive(conn: &mut Option<Connection>, endpoint: &Endpoint, request: &[u8]) -> Result<Response, String> {
    if conn.is_none() {
        *conn = Some(
            Connection::connect(endpoint.addr, endpoint.tls.as_ref(), ATTACK_IO_TIMEOUT).map_err(|e| e.to_string())?,
        );
    }
    let c = conn.as_mut().expect("connected above");
    c.round_trip(request).map_err(|e| {
        *conn = None;
        e.to_string()
    })
}

/// One anonymous request declaring a 64 MiB body, on a connection of its own: to `/healthz`
/// with the first 64 KiB of the body sent, or a deploy or invoke that asks for `100 Continue`
/// and sends nothing until it comes (it must not: the answer is the refusal). Attempt `n` picks
/// which.
fn big_body(endpoint: &Endpoint, function: &str, n: u64) -> Result<Response, String> {
    let host = &endpoint.host;
    let (head, sent) = match n % 3 {
        0 => (
            format!("POST /healthz HTTP/1.1\r\nhost: {host}\r\ncontent-length: {BIG_BODY_BYTES}\r\n\r\n"),
            BIG_BODY_SENT,
        ),
        1 => (
            format!(
                "POST /functions HTTP/1.1\r\nhost: {host}\r\nexpect: 100-continue\r\ncontent-length: \
                 {BIG_BODY_BYTES}\r\n\r\n"
            ),
            0,
        ),
        _ => (
            format!(
                "POST /functions/{function}/invoke HTTP/1.1\r\nhost: {host}\r\nexpect: 100-continue\r\n\
                 content-length: {BIG_BODY_BYTES}\r\n\r\n"
            ),
            0,
        ),
    };
    let mut bytes = head.into_bytes();
    bytes.resize(bytes.len() + sent, b'x');
    let mut c =
        Connection::connect(endpoint.addr, endpoint.tls.as_ref(), ATTACK_IO_TIMEOUT).map_err(|e| e.to_string())?;
    // A `100 Continue` would be read as the answer, and counted as the unexpected 100 it is.
    c.round_trip(&bytes).map_err(|e| e.to_string())
}

/// Deploys the heavy module with a custom section numbered `n`, so that no two are alike and each
/// compiles; deletes it once created, so that the attacker's quotas never answer instead.
fn deploy_heavy(endpoint: &Endpoint, heavy: &[u8], n: u64) -> Answer {
    let mut wasm = heavy.to_vec();
    // A custom section (id 0): its size, then its name ("n") and eight bytes of `n`.
    wasm.extend_from_slice(&[0, 10, 1, b'n']);
    wasm.extend_from_slice(&n.to_le_bytes());
    let r = match deploy_request(endpoint, &format!("hostile-heavy-{n}"), &wasm, serde_json::json!({})) {
        Ok(r) => r,
        Err(e) => return answer(Err(e)),
    };
    if r.status != 201 {
        return label(&r);
    }
    let Some(id) = r.json().ok().and_then(|v| v["id"].as_str().map(String::from)) else {
        return ("201 without an id".into(), Some(r.text()));
    };
    // A delete is a change like a deploy, and waits in the same share of the worker's queue: past
    // it, it is refused with 429 too, and tried again as `retry-after` says, a bounded number of
    // times. The attacker's other threads keep that share full, so the last refusal may stand:
    // the function then stays, within the attacker's quotas for a run's few dozen deploys.
    for attempt in 1..=DELETE_TRIES {
        match endpoint.call("DELETE", &format!("/functions/{id}"), b"") {
            Ok(d) if d.status == 204 => return label(&r),
            Ok(d) if d.status == 429 && attempt < DELETE_TRIES => std::thread::sleep(DELETE_RETRY),
            Ok(d) => {
                let (refusal, _) = label(&d);
                return (format!("delete {refusal}"), Some(format!("deleting {id}: {}", d.text())));
            }
            Err(e) => return ("delete: no answer".into(), Some(e)),
        }
    }
    unreachable!("the last try returns")
}
