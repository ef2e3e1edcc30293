//! The audit log: one JSON line per protected request, in per-shard hash chains of mmapped,
//! append-only segment files. docs/AUDIT-LOG.md is the operator's view.
//!
//! - [`record`]: the line format, its hash and the chain;
//! - [`segment`]: preallocated, mapped segment files, their spares and retention, and scanning them;
//! - [`helpers`]: the helper threads that seal and prefault them (owned by whoever opens the log);
//! - [`chain`]: walking a chain's segments: which records verify, where damage is;
//! - [`recover`]: start-up recovery, which cuts a torn suffix and nothing else;
//! - [`writer`]: a shard's chain: room before the action, rotation, retention, sync, checkpoints;
//! - [`checkpoint`]: signed checkpoints (C2SP signed notes) and their keys;
//! - [`verify`]: `tensor-wasm audit verify`, with or without checkpoints;
//! - this module: configuration, the group-commit thread, and `tail`.

pub mod chain;
pub mod checkpoint;
pub mod helpers;
pub mod record;
pub mod recover;
pub mod segment;
pub mod verify;
pub mod writer;

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use record::{Actor, ActorScope, AuditEvent, ReplicaId};
use segment::{list_segments, scan};
use verify::chain_dirs;
pub use writer::{AuditTicket, CommitSlot, ShardAudit};

use crate::metrics::Histogram;
use crate::runtime::periodic::Periodic;

/// How often `--audit-sync interval` makes records durable.
pub const GROUP_COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// Smallest segment accepted.
pub const MIN_SEGMENT_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditSync {
    /// Group commit: an fdatasync every 10 ms, off the request path.
    Interval,
    /// Each record is durable before its response is sent.
    Always,
    /// The page cache only: survives a crash of the process, not of the machine.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOnError {
    /// Protected routes answer 503 `audit_unavailable` while the log cannot be written.
    Reject,
    /// Serve on; count and log the records lost.
    Continue,
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Where the segment files go; `None`: no file.
    pub dir: Option<PathBuf>,
    /// Mirror every record to stdout, for log shippers.
    pub stdout: bool,
    pub segment_bytes: usize,
    /// Sealed segments kept per shard; `None`: no limit by count.
    pub retain_segments: Option<usize>,
    /// Bytes of sealed segments kept per shard; `None`: no limit by size.
    pub retain_bytes: Option<u64>,
    pub sync: AuditSync,
    pub on_error: AuditOnError,
    /// The fleet replica this server is (`--replica-id`): every record and checkpoint names it.
    /// `None`: a single node, whose records name no replica.
    pub replica: Option<ReplicaId>,
    /// Signed checkpoints (`--audit-signing-key`); `None`: none are made.
    pub checkpoints: Option<CheckpointConfig>,
}

/// How the shards sign checkpoints of their chains.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    pub key: Arc<checkpoint::SigningKey>,
    /// A shard signs its chain head at least this often while records flow
    /// (`--audit-checkpoint-interval-ms`).
    pub interval: Duration,
    /// A shard's checkpoint file is renamed to `checkpoints.1` before it passes this size
    /// (`--audit-checkpoint-file-bytes`).
    pub file_bytes: u64,
}

impl AuditConfig {
    pub fn enabled(&self) -> bool {
        self.dir.is_some() || self.stdout
    }
}

/// Parses `TENSOR_WASM_API_AUDIT_LOG`: `file:/path`, `stdout`, `none`, or a comma-separated
/// list such as `file:/var/lib/tensor-wasm/audit,stdout`. Returns (dir, stdout).
pub fn parse_destination(spec: &str) -> Result<(Option<PathBuf>, bool), String> {
    let (mut dir, mut stdout) = (None, false);
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "none" => return Ok((None, false)),
            "stdout" => stdout = true,
            _ => match part.strip_prefix("file:") {
                Some(path) if !path.is_empty() => dir = Some(PathBuf::from(path)),
                _ => return Err(format!("`{part}` is not `file:/path`, `stdout` or `none`")),
            },
        }
    }
    Ok((dir, stdout))
}

/// Starts the group-commit thread for `--audit-sync interval`: every 10 ms it fdatasyncs each
/// shard's active segment that has new records, and times it into `sync_seconds`. Its owner stops
/// it once the shards have closed their segments.
pub fn spawn_group_commit(slots: Vec<Arc<CommitSlot>>, sync_seconds: Arc<Histogram>) -> io::Result<Periodic> {
    Periodic::spawn("tw-audit-sync", GROUP_COMMIT_INTERVAL, move || {
        for slot in &slots {
            if !slot.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let file = slot.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(file) = file {
                let started = Instant::now();
                if let Err(e) = file.sync_data() {
                    tracing::error!("audit group commit failed: {e}");
                    slot.dirty.store(true, Ordering::Release);
                }
                sync_seconds.observe(started.elapsed());
            }
        }
    })
}

/// The last `n` records under `dir` (every shard, in time order), as JSON lines.
pub fn tail(dir: &Path, n: usize) -> io::Result<Vec<String>> {
    // Sorted by (time, shard, seq): each shard's records in chain order, the shards interleaved by
    // time.
    let mut lines: Vec<((u64, u64, u64), String)> = Vec::new();
    for chain in chain_dirs(dir)? {
        for path in list_segments(&chain)?.iter().rev() {
            let bytes = fs::read(path)?;
            let found = scan(&bytes, None);
            let text = String::from_utf8_lossy(&bytes[..found.valid_len]);
            let before = lines.len();
            for line in text.lines().rev().take(n) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                let key = |f: &str| v[f].as_u64().unwrap_or(0);
                lines.push(((key("ts_unix_ms"), key("shard"), key("seq")), line.to_string()));
            }
            if lines.len() - before >= n {
                break;
            }
        }
    }
    lines.sort_by_key(|(key, _)| *key);
    let skip = lines.len().saturating_sub(n);
    Ok(lines.into_iter().skip(skip).map(|(_, l)| l).collect())
}

/// `tensor-wasm audit tail -f`: prints new records as they arrive, until interrupted. It keeps
/// only the last `seq` printed per shard.
pub fn follow(dir: &Path, n: usize) -> io::Result<()> {
    let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut out = io::stdout().lock();
    let mut first = true;
    loop {
        for line in tail(dir, if first { n } else { 10_000 })? {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let (shard, seq) = (v["shard"].as_u64().unwrap_or(0), v["seq"].as_u64().unwrap_or(0));
            let seen = last.entry(shard).or_insert(0);
            if seq > *seen || first {
                *seen = (*seen).max(seq);
                writeln!(out, "{line}")?;
            }
        }
        out.flush()?;
        first = false;
        std::thread::sleep(Duration::from_millis(200));
    }
}
