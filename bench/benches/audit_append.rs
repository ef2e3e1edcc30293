//! Audit append speed on one shard: `ShardAudit::ticket` + `record` (format in place in the mapped
//! segment, SHA-256, chain), as the request path does it.
//!
//! Protects: 1 M appends/s per shard with P99 ≤ 10 µs (issue 4's floor: see
//! perf/AUDIT.md), so that the audit log adds ≤ 2 µs to an invoke.
//!
//! With signed checkpoints (`--audit-signing-key`), the shard's checkpoint task signs once a
//! second between requests: the "checkpoints every 1 s" row counts each signature in the append
//! that waits behind it, and the "checkpoint alone" row times one (sign, file append, stdout line).
//! The checkpoints' JSON lines go to stdout: filter them out with `grep -v audit_checkpoint`.
//!
//! `cargo bench -p tensor-wasm-bench --bench audit_append`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm::audit_log::{
    Actor, ActorScope, AuditConfig, AuditEvent, AuditOnError, AuditSync, CheckpointConfig, CommitSlot, ShardAudit,
};
use tensor_wasm::audit_log::{HelperThreads, Helpers};
use tensor_wasm::audit_log::{ShardMetrics, SigningKey};
use tensor_wasm_bench::{histogram, pin_like_a_shard, record, row, TABLE_HEAD};

const WARMUP: usize = 100_000;
/// Throughput windows per sync mode.
const WINDOWS: usize = 5;

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        ts_unix_ms: 1_795_000_000_000 + i / 1000,
        request_id: format!("e8f6b952-0-{i}"),
        actor: Actor::Bearer { token_id: Some("0011223344556677".into()), scope: ActorScope::TenantSet(vec![7]) },
        action: "invoke_function",
        function_id: Some("69b9b105b8603c223d1da105b67830b0".into()),
        pipeline_id: None,
        tenant_id: Some(7),
        status_code: 200,
        error_kind: None,
        failed_step: None,
        latency_us: 9,
        peer_addr: "127.0.0.1:47436".parse().unwrap(),
        client_cert_subject: None,
        repeated: 0,
        integrity: None,
    }
}

/// Latency per append (each timed) and, separately, throughput (`rounds` appends timed as a
/// whole, with no clock read inside the loop).
/// The checkpoint interval the server defaults to.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

fn run(
    sync: AuditSync,
    rounds: usize,
    checkpoints: bool,
    helpers: &Helpers,
) -> (hdrhistogram::Histogram<u64>, Vec<Duration>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(AuditConfig {
        dir: Some(dir.path().to_path_buf()),
        stdout: false,
        segment_bytes: 64 * 1024 * 1024,
        retain_segments: Some(2),
        retain_bytes: None,
        sync,
        on_error: AuditOnError::Reject,
        replica: None,
        checkpoints: checkpoints.then(|| CheckpointConfig {
            key: Arc::new(SigningKey::generate("bench/audit").expect("a key")),
            interval: CHECKPOINT_INTERVAL,
            file_bytes: 1 << 20,
        }),
    });
    let metrics = Arc::new(ShardMetrics::new(0, 1));
    let audit = ShardAudit::open(0, config, metrics.clone(), Arc::new(CommitSlot::default()), helpers.clone());
    let events: Vec<AuditEvent> = (0..1024).map(event).collect();
    let mut h = histogram();
    let mut last_checkpoint = Instant::now();
    for i in 0..WARMUP.min(rounds) + rounds {
        let t = Instant::now();
        // As the shard's checkpoint task: between requests, once an interval has passed; its time
        // is charged to the append that waited behind it.
        if checkpoints && last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            audit.checkpoint();
            last_checkpoint = Instant::now();
        }
        let ticket = audit.ticket().expect("writable");
        audit.record(ticket, &events[i % events.len()]);
        if i >= WARMUP.min(rounds) {
            record(&mut h, t.elapsed());
        }
    }
    let bytes = metrics.audit_bytes.get();
    // Throughput in windows, so that one stall of a shared machine spoils one window, not the
    // figure: their median is reported, and their range beside it.
    let window = (rounds / WINDOWS).max(1);
    let mut per_window: Vec<Duration> = (0..WINDOWS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..window {
                let ticket = audit.ticket().expect("writable");
                audit.record(ticket, &events[i % events.len()]);
            }
            started.elapsed() / window as u32
        })
        .collect();
    per_window.sort_unstable();
    audit.close();
    (h, per_window, bytes)
}

/// One checkpoint (Ed25519 signature, append to the shard's file, stdout line), `rounds` times,
/// each after one append so that the head moved.
fn checkpoint_only(rounds: usize, helpers: &Helpers) -> hdrhistogram::Histogram<u64> {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(AuditConfig {
        dir: Some(dir.path().to_path_buf()),
        stdout: false,
        segment_bytes: 64 * 1024 * 1024,
        retain_segments: Some(2),
        retain_bytes: None,
        sync: AuditSync::Interval,
        on_error: AuditOnError::Reject,
        replica: None,
        checkpoints: Some(CheckpointConfig {
            key: Arc::new(SigningKey::generate("bench/audit").expect("a key")),
            interval: CHECKPOINT_INTERVAL,
            file_bytes: 1 << 20,
        }),
    });
    let audit = ShardAudit::open(
        0,
        config,
        Arc::new(ShardMetrics::new(0, 1)),
        Arc::new(CommitSlot::default()),
        helpers.clone(),
    );
    let mut h = histogram();
    for i in 0..rounds {
        let ticket = audit.ticket().expect("writable");
        audit.record(ticket, &event(i as u64));
        let t = Instant::now();
        audit.checkpoint();
        record(&mut h, t.elapsed());
    }
    audit.close();
    h
}

/// The record's formatting and hashing alone, into a reused buffer rather than a segment.
fn encode_only(rounds: usize) -> hdrhistogram::Histogram<u64> {
    let events: Vec<AuditEvent> = (0..1024).map(event).collect();
    let mut line = vec![0u8; tensor_wasm::audit_log::MAX_RECORD];
    let mut prev = [0u8; 32];
    let mut h = histogram();
    for i in 0..rounds {
        let t = Instant::now();
        let encoded = tensor_wasm::audit_log::encode_into(
            &events[i % events.len()],
            &tensor_wasm::audit_log::ReplicaField::NONE,
            0,
            i as u64 + 1,
            &prev,
            &mut line,
        );
        prev = encoded.expect("fits").1;
        record(&mut h, t.elapsed());
    }
    h
}

fn main() {
    // As the server does: the audit log's helper threads first, on the process's CPUs, then the
    // pinned shard.
    let threads = HelperThreads::start();
    let helpers = threads.helpers();
    pin_like_a_shard();
    println!("{TABLE_HEAD}");
    println!("{}", row("encode only (format + SHA-256)", &encode_only(1_000_000)));
    println!("{}", row("checkpoint alone (sign + file + stdout)", &checkpoint_only(2_000, &helpers)));
    for (name, sync, rounds, checkpoints) in [
        ("append, sync interval", AuditSync::Interval, 2_000_000, false),
        ("append, sync interval, checkpoints every 1 s", AuditSync::Interval, 2_000_000, true),
        ("append, sync none", AuditSync::None, 2_000_000, false),
        ("append, sync always", AuditSync::Always, 2_000, false),
    ] {
        let (h, per_record_time, bytes) = run(sync, rounds, checkpoints, &helpers);
        println!("{}", row(name, &h));
        let per_record = bytes / (rounds + WARMUP.min(rounds)) as u64;
        let rate = |d: &Duration| 1.0 / d.as_secs_f64().max(1e-12);
        let median = rate(&per_record_time[per_record_time.len() / 2]);
        let (worst, best) = (rate(&per_record_time[per_record_time.len() - 1]), rate(&per_record_time[0]));
        eprintln!(
            "{name}: {:.2} M records/s (median of {WINDOWS} windows; {:.2} to {:.2}), {:.0} MB/s, {per_record} bytes per record",
            median / 1e6,
            worst / 1e6,
            best / 1e6,
            median * per_record as f64 / 1e6
        );
    }
    threads.stop();
}
