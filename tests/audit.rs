//! The audit log against a real server: what is recorded, crash consistency under kill -9,
//! tamper evidence, torn-tail repair, rotation and retention, a full disk, and concurrent shards.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{guests, within, Client, Server};
use serde_json::{json, Value};

const ADMIN: &str = "admin-0123456789abcdef0123456789";
const SVC7: &str = "svc7-0123456789abcdef0123456789ab";

fn tensor_wasm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(dir: &Path) -> (i32, String, String) {
    tensor_wasm(&["audit", "verify", dir.to_str().unwrap()])
}

/// Every record under `dir`, via `audit tail`.
fn records(dir: &Path) -> Vec<Value> {
    let (code, out, err) = tensor_wasm(&["audit", "tail", "-n", "1000000", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn deploy_body(name: &str) -> Vec<u8> {
    json!({"name": name, "wasm_b64": base64::engine::general_purpose::STANDARD.encode(guests::hello())})
        .to_string()
        .into_bytes()
}

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn every_protected_request_is_recorded_before_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_with(&dir.path().join("data"), &["--rate-limit-qps", "1", "--rate-limit-burst", "3"], |cmd| {
            cmd.env("TENSOR_WASM_API_TOKENS", format!("{ADMIN}:tenant=*,{SVC7}:tenant=7"));
        });
    let mut c = server.client();
    let (admin, svc7) = (auth(ADMIN), auth(SVC7));
    let r =
        c.request("POST", "/functions", &[("authorization", &svc7), ("x-tensor-wasm-tenant", "7")], &deploy_body("a"));
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let created_rid = r.header("x-request-id").unwrap().to_string();
    // `{process}-{shard}-{count}`: 8 hex digits, then decimal numbers.
    let parts: Vec<&str> = created_rid.split('-').collect();
    assert_eq!(parts.len(), 3, "{created_rid}");
    assert!(parts[0].len() == 8 && parts[0].bytes().all(|b| b.is_ascii_hexdigit()), "{created_rid}");
    assert!(parts[1..].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())), "{created_rid}");
    let r = c.request(
        "POST",
        &format!("/functions/{id}/invoke"),
        &[("authorization", &svc7), ("x-tensor-wasm-tenant", "7")],
        b"{}",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        c.request("GET", "/functions", &[("authorization", &svc7), ("x-tensor-wasm-tenant", "8")], b"").status,
        403
    );
    assert_eq!(c.request("GET", "/functions", &[("authorization", "Bearer wrong-wrong-wrong-wrong")], b"").status, 401);
    assert_eq!(
        c.request("GET", "/functions", &[("authorization", &svc7), ("x-tensor-wasm-tenant", "7")], b"").status,
        429
    );
    assert_eq!(c.request("GET", "/functions", &[("authorization", &admin)], b"").status, 200);
    // Probes are not protected: no records.
    c.request("GET", "/healthz", &[], b"");

    let audit_dir = server.data_dir.join("audit");
    let all = records(&audit_dir);
    let summary: Vec<(String, u64)> = all
        .iter()
        .map(|r| (r["action"].as_str().unwrap().to_string(), r["outcome"]["status_code"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("create_function".into(), 201),
            ("invoke_function".into(), 200),
            ("list_functions".into(), 403),
            ("auth_failure".into(), 401),
            ("list_functions".into(), 429),
            ("list_functions".into(), 200),
        ]
    );
    let created = &all[0];
    assert_eq!(created["request_id"], created_rid.as_str());
    assert_eq!(created["resource"], json!({"function_id": id, "tenant_id": 7}));
    assert_eq!(created["actor"]["kind"], "bearer");
    assert_eq!(created["actor"]["scope"], json!({"kind": "tenant_set", "tenants": [7]}));
    assert_eq!(created["actor"]["token_id"].as_str().unwrap().len(), 16);
    assert_eq!(all[2]["outcome"]["error_kind"], "tenant_scope_denied");
    assert_eq!(all[3]["actor"], json!({"kind": "bearer", "token_id": null, "scope": null}));
    assert_eq!(all[4]["outcome"]["error_kind"], "rate_limited");
    assert_eq!(all[5]["actor"]["scope"]["kind"], "wildcard");
    assert!(all.iter().all(|r| r["peer_addr"].as_str().unwrap().starts_with("127.0.0.1:")));
    // No token in any record.
    let text = std::fs::read_to_string(audit_dir.join("shard-0").join("00000000000000000001.jsonl"))
        .unwrap_or_default()
        + &std::fs::read_to_string(audit_dir.join("shard-1").join("00000000000000000001.jsonl")).unwrap_or_default();
    assert!(!text.contains(ADMIN) && !text.contains(SVC7));
    let (code, out, err) = verify(&audit_dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 records"), "{out}");
    assert_eq!(server.metric("tensor_wasm_audit_records_total", &[]), 6.0);
}

#[test]
fn kill_9_loses_no_answered_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Thousands of deploys from the one dev caller: past the default function quota.
    let args = ["--max-functions-per-tenant", "1000000"];
    for round in 0..3 {
        let mut server = Server::start_in(&data, &args);
        let answered = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Instant::now() + Duration::from_millis(400 + 150 * round);
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (answered, addr) = (answered.clone(), server.addr);
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    for i in 0..100_000 {
                        if Instant::now() > stop {
                            break;
                        }
                        let body = deploy_body(&format!("f-{t}-{i}"));
                        match c.try_request("POST", "/functions", &[], &body) {
                            Ok(r) => answered.lock().unwrap().push(r.header("x-request-id").unwrap().to_string()),
                            Err(_) => break, // killed mid-request: not answered
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + 150 * round));
        server.kill9();
        for w in workers {
            w.join().unwrap();
        }
        let audit_dir = data.join("audit");
        let (code, out, err) = verify(&audit_dir);
        assert_eq!(code, 0, "round {round}: {out}{err}");
        let recorded: HashSet<String> =
            records(&audit_dir).iter().map(|r| r["request_id"].as_str().unwrap().to_string()).collect();
        let answered = answered.lock().unwrap();
        assert!(!answered.is_empty());
        for rid in answered.iter() {
            assert!(recorded.contains(rid), "round {round}: answered request {rid} has no record");
        }
    }
    // After the last kill, a restart repairs and continues the chains.
    let server = Server::start_in(&data, &args);
    assert_eq!(server.client().request("POST", "/functions", &[], &deploy_body("after")).status, 201);
    drop(server);
    let (code, out, err) = verify(&data.join("audit"));
    assert_eq!(code, 0, "{out}{err}");
}

fn load(server: &Server, n: usize) {
    let mut c = server.client();
    for i in 0..n {
        let r = c.request("GET", &format!("/functions/{:032x}", i), &[], b"");
        assert_eq!(r.status, 404);
    }
}

#[test]
fn rotation_retention_and_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_in(
        &data,
        &["--shards", "1", "--audit-segment-bytes", "65536", "--audit-retention-segments", "2"],
    );
    load(&server, 1200);
    // The next segment waits ready, reserved in the background, under a name no reader lists.
    let spare = data.join("audit/shard-0/next.jsonl.spare");
    within(Duration::from_secs(5), "a spare segment reserved", || {
        std::fs::metadata(&spare).map(|m| m.len()).ok() == Some(65536)
    });
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(!spare.exists(), "its blocks are given back at shutdown");
    let shard = data.join("audit/shard-0");
    let mut files: Vec<_> = std::fs::read_dir(&shard).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 3, "two sealed segments kept, plus the active one: {files:?}");
    for f in &files[..2] {
        let len = std::fs::metadata(f).unwrap().len();
        // Cut to its records; it rotated when less than one record's reserve was left.
        assert!(len < 65536 && len > 65536 / 2, "a sealed segment is cut to its records: {len}");
        assert!(std::fs::read_to_string(f).unwrap().lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
    }
    let (code, out, err) = verify(&data.join("audit"));
    assert_eq!(code, 0, "{out}{err}");

    // One flipped byte in a sealed segment: verify fails at that record.
    let victim = &files[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let third_line = bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(1).unwrap().0 + 1;
    bytes[third_line + 30] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();
    let (code, _, err) = verify(&data.join("audit"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(victim.file_name().unwrap().to_str().unwrap()), "{err}");
    assert!(err.contains(&format!("offset {third_line}")), "{err}");
    let first_seq: u64 = victim.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(err.contains(&format!("seq {}", first_seq + 2)), "{err}");
}

/// A one-shard server's data dir holding 10 records, stopped by `stop`; and its active segment.
fn ten_records_then(stop: impl FnOnce(&mut Server)) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_in(&data, &["--shards", "1"]);
    load(&server, 10);
    stop(&mut server);
    let active = data.join("audit/shard-0/00000000000000000001.jsonl");
    (dir, data, active)
}

/// Restarts on `data`, which must log that it cut a torn tail, appends 5 more records, and
/// returns every record after `verify` passed.
fn restart_cuts_the_tail_and_continues(data: &Path) -> Vec<Value> {
    let server = Server::start_in(data, &["--shards", "1"]);
    server.wait_for_stderr("torn tail cut away");
    load(&server, 5);
    drop(server);
    let (code, out, err) = verify(&data.join("audit"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("cut short"), "{out}");
    records(&data.join("audit"))
}

#[test]
fn a_torn_tail_is_repaired_and_the_chain_continues() {
    let (_dir, data, active) = ten_records_then(|server| {
        server.signal(libc::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(10)).success());
    });
    // Half a record, as a crash in the middle of a write leaves it.
    let mut bytes = std::fs::read(&active).unwrap();
    let last_line = String::from_utf8_lossy(&bytes).lines().last().unwrap().to_string();
    bytes.extend_from_slice(&last_line.as_bytes()[..last_line.len() / 2]);
    std::fs::write(&active, &bytes).unwrap();
    assert_eq!(verify(&data.join("audit")).0, 1, "the torn tail is visible");

    let all = restart_cuts_the_tail_and_continues(&data);
    assert_eq!(all.len(), 15);
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
}

#[test]
fn a_record_cut_short_by_kill_9_is_not_damage_but_a_cut_record_elsewhere_is() {
    let (_dir, data, active) = ten_records_then(Server::kill9);
    // The live segment is preallocated: records, then zeros. A kill in the middle of formatting
    // a record in place leaves its prefix where the zeros begin.
    let live = std::fs::read(&active).unwrap();
    let end = live.iter().position(|b| *b == 0).expect("a live segment has a zero tail");
    let last_line = String::from_utf8_lossy(&live[..end]).lines().last().unwrap().to_string();
    let prefix = &last_line.as_bytes()[..last_line.len() / 2];
    let with_prefix_at = |at: usize| {
        let mut bytes = live.clone();
        bytes[at..at + prefix.len()].copy_from_slice(prefix);
        std::fs::write(&active, &bytes).unwrap();
    };

    with_prefix_at(end);
    let (code, out, err) = verify(&data.join("audit"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 10 records") && out.contains("cut short by a crash"), "{out}");

    // The same prefix with zeros before it is not a write in progress.
    with_prefix_at(end + 4096);
    let (code, _, err) = verify(&data.join("audit"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("offset {end}")) && err.contains("bytes after the last record"), "{err}");

    with_prefix_at(end);
    assert_eq!(restart_cuts_the_tail_and_continues(&data).len(), 15);
}

fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit { rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY), rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on our own child with a valid rlimit.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn a_full_disk_rejects_then_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(&dir.path().join("data"), &["--shards", "1", "--audit-segment-bytes", "65536"]);
    load(&server, 1); // the first segment exists
                      // New segments can no longer be written (as with a full disk): RLIMIT_FSIZE below their size.
    set_file_size_limit(server.pid(), Some(16 * 1024));
    let mut c = server.client();
    let mut rejected = None;
    for i in 0..2000 {
        let r = c.request("GET", &format!("/functions/{:032x}", i), &[], b"");
        if r.status == 503 {
            rejected = Some(r);
            break;
        }
    }
    let r = rejected.expect("the segment filled up and no new one could be made");
    assert_eq!(r.error_kind(), "audit_unavailable");
    assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200, "probes stay up");
    assert!(server.metric("tensor_wasm_audit_errors_total", &[]) >= 1.0);
    // Room again: the server resumes by itself.
    set_file_size_limit(server.pid(), None);
    within(Duration::from_secs(5), "recovery", || {
        c.request("GET", &format!("/functions/{:032x}", 1), &[], b"").status != 503
    });
    server.wait_for_stderr("audit log writable again");
    let (code, out, err) = verify(&server.data_dir.join("audit"));
    assert_eq!(code, 0, "{out}{err}");

    // Under `continue`, the same failure serves on and counts the records lost.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &dir.path().join("data"),
        &["--shards", "1", "--audit-segment-bytes", "65536", "--audit-on-error", "continue"],
    );
    load(&server, 1);
    set_file_size_limit(server.pid(), Some(16 * 1024));
    load(&server, 400);
    assert!(server.metric("tensor_wasm_audit_errors_total", &[]) >= 1.0);
}

#[test]
fn the_audit_helper_threads_do_not_share_a_shards_cpu() {
    let server = Server::start(&["--shards", "1", "--pin-shards", "always"]);
    load(&server, 1);
    // A thread names itself and sets its priority once it runs, which may be after the server
    // answered: wait for both helpers to have done so.
    let helpers_started = |threads: &[common::ThreadInfo]| {
        let seal = threads.iter().any(|t| t.name == "tw-audit-seal" && t.nice == 19);
        seal && threads.iter().any(|t| t.name == "tw-audit-prefau" && t.policy == 5)
    };
    let mut threads = Vec::new();
    within(Duration::from_secs(5), "the audit helpers' start", || {
        threads = common::threads(server.pid());
        helpers_started(&threads)
    });
    let thread = |name: &str| threads.iter().find(|t| t.name == name).unwrap();
    // The main thread never pins itself: it holds the process's CPUs.
    let all = &threads.iter().find(|t| t.tid == server.pid()).unwrap().cpus;
    // The shard is pinned; the helpers reserve, seal and prefault on any of the process's CPUs.
    if all.contains([',', '-']) {
        assert_ne!(&thread("tw-shard-0").cpus, all, "{threads:?}");
    }
    let (seal, prefault) = (thread("tw-audit-seal"), thread("tw-audit-prefau"));
    assert_eq!((&seal.cpus, &prefault.cpus), (all, all), "{threads:?}");
    // Where they do share a shard's CPU, they yield it: the sealer at nice 19, the prefaulter
    // only when the CPU is otherwise idle.
    assert_eq!((seal.nice, seal.policy), (19, 0), "{threads:?}");
    assert_eq!(prefault.policy, 5, "{threads:?}");
    assert_eq!((thread("tw-shard-0").nice, thread("tw-shard-0").policy), (0, 0), "{threads:?}");
}

/// The `VmFlags` of each mapping of a file under `dir` in process `pid` (proc(5), smaps).
fn mapping_flags_under(pid: u32, dir: &Path) -> Vec<(String, Vec<String>)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let dir = dir.canonicalize().unwrap();
    let mut found = Vec::new();
    let mut file = None;
    for line in smaps.lines() {
        // A mapping starts with its address range and ends with the path, if it has one; its
        // `VmFlags:` line closes it.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|range| range.contains('-') && !range.ends_with(':')) {
            file = fields.get(5).filter(|p| Path::new(p).starts_with(&dir)).map(|p| p.to_string());
        } else if let (Some(flags), Some(path)) = (line.strip_prefix("VmFlags:"), &file) {
            found.push((path.clone(), flags.split_whitespace().map(str::to_string).collect()));
        }
    }
    found
}

#[test]
fn a_fault_on_the_active_segment_reads_no_pages_around_it() {
    // Without MADV_RANDOM a fault on the reserved, unwritten segment makes the kernel zero the
    // device's whole read-ahead window at once: 8 MiB and 9 ms on a disk with read_ahead_kb 8192.
    let server = Server::start(&["--shards", "1"]);
    load(&server, 1);
    let mappings = mapping_flags_under(server.pid(), &server.data_dir.join("audit"));
    assert!(!mappings.is_empty(), "no audit segment is mapped");
    for (path, flags) in &mappings {
        assert!(flags.iter().any(|f| f == "rr"), "{path} is mapped without MADV_RANDOM: {flags:?}");
    }
}

#[test]
fn every_shard_appends_concurrently() {
    let server = Server::start(&["--shards", "2", "--audit-sync", "always"]);
    let addr = server.addr;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for i in 0..50 {
                    assert_eq!(c.request("GET", &format!("/functions/{:032x}", i), &[], b"").status, 404);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let audit_dir = server.data_dir.join("audit");
    let all = records(&audit_dir);
    assert_eq!(all.len(), 800);
    let shards: HashSet<u64> = all.iter().map(|r| r["shard"].as_u64().unwrap()).collect();
    assert_eq!(shards, HashSet::from([0, 1]));
    let (code, out, err) = verify(&audit_dir);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn destinations_none_and_stdout() {
    let none = Server::start(&["--audit-log", "none"]);
    load(&none, 3);
    assert!(!none.data_dir.join("audit").exists());
    let (code, _, err) = tensor_wasm(&["serve", "--audit-log", "s3://bucket"]);
    assert_eq!(code, 2, "{err}");
}
