//! The audit log: one JSON line per protected request, in per-shard hash chains of mmapped,
//! append-only segment files. docs/AUDIT-LOG.md is the operator's view.
//!
//! - [`record`]: the line format, its hash and the chain;
//! - [`segment`]: preallocated, mapped segment files, and scanning them;
//! - [`writer`]: a shard's chain: recovery, room before the action, rotation, retention, sync;
//! - this module: configuration, the group-commit thread, and `verify` / `tail`.

pub mod record;
pub mod segment;
pub mod writer;

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use record::{Actor, ActorScope, AuditEvent};
use record::{LineError, MAX_RECORD};
use segment::{list_segments, scan};
pub use writer::{AuditTicket, CommitSlot, ShardAudit};

use crate::metrics::Histogram;

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
/// shard's active segment that has new records, and times it into `sync_seconds`.
pub fn spawn_group_commit(slots: Vec<Arc<CommitSlot>>, sync_seconds: Arc<Histogram>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("tw-audit-sync".into()).spawn(move || loop {
        std::thread::sleep(GROUP_COMMIT_INTERVAL);
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

/// The chain directories under an audit directory (`shard-N`), or the directory itself when it
/// is one.
fn chain_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    if !list_segments(dir)?.is_empty() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("shard-")))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The first broken record found by [`verify`].
#[derive(Debug)]
pub struct Broken {
    pub file: PathBuf,
    pub offset: usize,
    /// The `seq` the broken record should have had.
    pub seq: u64,
    pub reason: String,
}

/// What [`verify`] found in a log with no broken record.
#[derive(Debug)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Live segments that end in a record a crash cut short (see [`verify`]).
    pub unfinished: Vec<PathBuf>,
}

/// Checks the framing and the chains of every segment under `dir`. Returns what it checked, or
/// the first broken record.
///
/// Two things after the last record of a shard's newest segment are not damage, when that
/// segment is still live (preallocated: its last byte a zero): a zero tail, and before it at most
/// one record's prefix with no end of line. The shard formats each record in place, so a process
/// killed mid-record leaves that prefix; the record was never acknowledged, and the next start
/// cuts it away. A sealed segment has no such excuse.
pub fn verify(dir: &Path) -> io::Result<Result<Verified, Broken>> {
    let mut verified = Verified { records: 0, unfinished: Vec::new() };
    for chain in chain_dirs(dir)? {
        let segments = list_segments(&chain)?;
        let mut prev = None;
        for (i, path) in segments.iter().enumerate() {
            let bytes = fs::read(path)?;
            let found = scan(&bytes, prev.clone());
            verified.records += found.records;
            let rest = &bytes[found.valid_len..];
            let zeros_from = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let zero_tail = rest[zeros_from..].iter().all(|b| *b == 0);
            let live = i + 1 == segments.len() && bytes.last() == Some(&0);
            let unfinished = live
                && matches!(found.damage, Some(LineError::Torn))
                && zero_tail
                && (1..MAX_RECORD).contains(&zeros_from)
                && !rest[..zeros_from].contains(&b'\n');
            if unfinished {
                verified.unfinished.push(path.clone());
            } else if found.damage.is_some() || zeros_from > 0 || !zero_tail {
                let reason = match found.damage {
                    Some(d) => d.to_string(),
                    None => "bytes after the last record".into(),
                };
                let seq = found.last.as_ref().or(prev.as_ref()).map_or(0, |l| l.seq) + 1;
                return Ok(Err(Broken { file: path.clone(), offset: found.valid_len, seq, reason }));
            }
            prev = found.last.or(prev);
        }
    }
    Ok(Ok(verified))
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
