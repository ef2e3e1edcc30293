//! A shard's audit chain: one writer, its own directory, its own segments.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::record::{encode, AuditEvent, GENESIS, MAX_RECORD};
use super::segment::{finish_seal, list_segments, scan, segment_name, ActiveSegment, Sealer};
use super::{AuditConfig, AuditOnError, AuditSync};
use crate::error::ApiError;
use crate::metrics::ShardMetrics;

/// After a failure, a new segment is tried at most this often.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// What the group-commit thread needs of a shard: the active segment's file, and whether it has
/// unsynced records.
#[derive(Default)]
pub struct CommitSlot {
    pub file: Mutex<Option<Arc<fs::File>>>,
    pub dirty: std::sync::atomic::AtomicBool,
}

struct Chain {
    seq: u64,
    prev_hash: [u8; 32],
    active: Option<ActiveSegment>,
    /// Set while the log cannot be written; cleared when a segment opens again.
    failing: bool,
    last_attempt: Option<Instant>,
}

pub struct ShardAudit {
    shard: usize,
    dir: Option<PathBuf>,
    config: Arc<AuditConfig>,
    chain: RefCell<Chain>,
    line: RefCell<String>,
    /// Tickets given out and not yet written: room kept for their records.
    outstanding: Cell<usize>,
    commit: Arc<CommitSlot>,
    metrics: Arc<ShardMetrics>,
}

/// Room for one record, taken before the request's action runs.
pub struct AuditTicket(());

impl ShardAudit {
    /// Opens shard `shard`'s chain: repairs a torn tail and continues the sequence and the chain.
    /// A log that cannot be opened is not fatal: the shard starts in the failing state.
    pub fn open(shard: usize, config: Arc<AuditConfig>, metrics: Arc<ShardMetrics>, commit: Arc<CommitSlot>) -> Self {
        let dir = config.dir.as_ref().map(|d| d.join(format!("shard-{shard}")));
        let audit = ShardAudit {
            shard,
            dir,
            config,
            chain: RefCell::new(Chain { seq: 0, prev_hash: GENESIS, active: None, failing: false, last_attempt: None }),
            line: RefCell::new(String::with_capacity(1024)),
            outstanding: Cell::new(0),
            commit,
            metrics,
        };
        if let Err(e) = audit.recover() {
            audit.fail(&format!("cannot open the audit log: {e}"));
        }
        audit
    }

    fn recover(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        fs::create_dir_all(dir)?;
        let segments = list_segments(dir)?;
        // Seals a crash interrupted (in the background sealer) are finished first.
        for path in segments.iter().rev().skip(1) {
            if !finish_seal(path)? {
                break;
            }
            tracing::info!(shard = self.shard, file = %path.display(), "audit: finished an interrupted seal");
        }
        let mut chain = self.chain.borrow_mut();
        // The newest segment with a record tells where the chain stands.
        for (i, path) in segments.iter().enumerate().rev() {
            let bytes = fs::read(path)?;
            let found = scan(&bytes, None);
            let is_newest = i + 1 == segments.len();
            if is_newest {
                let garbage = bytes[found.valid_len..].iter().filter(|b| **b != 0).count();
                if garbage > 0 {
                    tracing::warn!(shard = self.shard, file = %path.display(), cut_bytes = garbage, "audit: torn tail cut away");
                }
                // Always continue in the newest segment, even an empty one: its name is taken.
                chain.active = Some(ActiveSegment::reopen(path.clone(), found.valid_len, self.config.segment_bytes)?);
                self.publish_file(&chain);
            }
            if let Some(last) = found.last {
                chain.seq = last.seq;
                chain.prev_hash = last.hash;
                break;
            }
        }
        Ok(())
    }

    fn publish_file(&self, chain: &Chain) {
        let file = chain.active.as_ref().map(ActiveSegment::file);
        *self.commit.file.lock().unwrap_or_else(|p| p.into_inner()) = file;
    }

    fn fail(&self, what: &str) {
        let mut chain = self.chain.borrow_mut();
        if !chain.failing {
            tracing::error!(shard = self.shard, "{what}");
        }
        chain.failing = true;
        chain.last_attempt = Some(Instant::now());
        self.metrics.audit_errors.inc();
    }

    /// Takes room for this request's record before its action runs, rotating to a new segment when
    /// needed. When the log cannot be written: 503 `audit_unavailable` under `reject`; a ticket
    /// anyway under `continue` (the record is then counted as lost).
    pub fn ticket(&self) -> Result<AuditTicket, ApiError> {
        if self.dir.is_none() {
            // stdout needs no room; with no destination at all `record` does nothing.
            return Ok(AuditTicket(()));
        }
        // Room for every record promised and this one, up to what a fresh segment holds; beyond
        // that, `record` rotates as it goes.
        let needed = ((self.outstanding.get() + 1) * MAX_RECORD).min(self.config.segment_bytes);
        let has_room = self.chain.borrow().active.as_ref().is_some_and(|a| a.room() >= needed);
        if !has_room {
            let may_try = self.chain.borrow().last_attempt.is_none_or(|t| t.elapsed() >= RETRY_INTERVAL)
                || !self.chain.borrow().failing;
            if may_try {
                if let Err(e) = self.rotate() {
                    self.fail(&format!("the audit log cannot be written: {e}"));
                }
            }
        }
        let ok = self.chain.borrow().active.as_ref().is_some_and(|a| a.room() >= needed);
        if !ok && self.config.on_error == AuditOnError::Reject {
            return Err(ApiError::AuditUnavailable);
        }
        self.outstanding.set(self.outstanding.get() + 1);
        Ok(AuditTicket(()))
    }

    /// Seals the active segment (if any) and opens the next one; applies retention.
    fn rotate(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut chain = self.chain.borrow_mut();
        chain.last_attempt = Some(Instant::now());
        if chain.active.as_ref().is_some_and(ActiveSegment::is_empty) {
            return Ok(()); // a fresh segment already: nothing to gain
        }
        // Under `always` every durability step happens before the next answer; otherwise the
        // directory entry and the old segment's seal go to the background sealer.
        let always = self.config.sync == AuditSync::Always;
        let path = dir.join(segment_name(chain.seq + 1));
        let next = ActiveSegment::create(path.clone(), self.config.segment_bytes, always)?;
        if !always {
            Sealer::sync_dir(path)?;
        }
        if let Some(old) = chain.active.replace(next) {
            let sealed = if always { old.seal().map(|_| ()) } else { Sealer::seal(old) };
            if let Err(e) = sealed {
                tracing::error!(shard = self.shard, "audit: cannot seal a segment: {e}");
            }
        }
        if chain.failing {
            tracing::info!(shard = self.shard, "audit log writable again");
        }
        chain.failing = false;
        self.publish_file(&chain);
        drop(chain);
        self.apply_retention(dir);
        Ok(())
    }

    fn apply_retention(&self, dir: &std::path::Path) {
        let Ok(segments) = list_segments(dir) else { return };
        // The newest is the active one: never removed.
        let sealed = &segments[..segments.len().saturating_sub(1)];
        let sizes: Vec<u64> = sealed.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).collect();
        let mut total: u64 = sizes.iter().sum();
        let mut count = sealed.len();
        for (path, size) in sealed.iter().zip(sizes) {
            let over_count = self.config.retain_segments.is_some_and(|n| count > n);
            let over_bytes = self.config.retain_bytes.is_some_and(|b| total > b);
            if !over_count && !over_bytes {
                break;
            }
            if fs::remove_file(path).is_ok() {
                count -= 1;
                total -= size;
            }
        }
    }

    /// Appends the record of a request whose ticket was taken, before its response is sent.
    pub fn record(&self, ticket: AuditTicket, event: &AuditEvent) {
        let AuditTicket(()) = ticket;
        if !self.config.enabled() {
            return;
        }
        if self.dir.is_some() {
            self.outstanding.set(self.outstanding.get().saturating_sub(1));
        }
        let mut line = self.line.borrow_mut();
        let (seq, prev_hash) = {
            let chain = self.chain.borrow();
            (chain.seq + 1, chain.prev_hash)
        };
        let hash = encode(event, self.shard, seq, &prev_hash, &mut line);
        if self.config.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
        }
        if self.dir.is_some() {
            let fits = self.chain.borrow().active.as_ref().is_some_and(|a| a.room() >= line.len());
            if !fits {
                if let Err(e) = self.rotate() {
                    // Only under `continue`, or a segment too small for the shard's concurrency:
                    // the record is lost, and counted.
                    self.fail(&format!("an audit record could not be written: {e}"));
                    return;
                }
            }
            let mut chain = self.chain.borrow_mut();
            let Some(active) = chain.active.as_mut().filter(|a| a.room() >= line.len()) else {
                drop(chain);
                self.fail("an audit record could not be written: no segment");
                return;
            };
            active.append(line.as_bytes());
            match self.config.sync {
                AuditSync::Always => {
                    if let Err(e) = active.sync_tail(line.len()) {
                        drop(chain);
                        self.fail(&format!("audit sync failed: {e}"));
                        return;
                    }
                }
                AuditSync::Interval => {
                    // Stored only when clear: the shared line is written once per commit interval,
                    // not once per record.
                    if !self.commit.dirty.load(std::sync::atomic::Ordering::Relaxed) {
                        self.commit.dirty.store(true, std::sync::atomic::Ordering::Release);
                    }
                }
                AuditSync::None => {}
            }
        }
        let mut chain = self.chain.borrow_mut();
        chain.seq = seq;
        chain.prev_hash = hash;
        self.metrics.audit_records.inc();
        self.metrics.audit_bytes.add(line.len() as u64);
    }

    /// Seals nothing, but cuts the active segment to its records so that it reads as plain JSONL
    /// while the server is down. It is reopened and extended on the next start.
    pub fn close(&self) {
        let mut chain = self.chain.borrow_mut();
        if let Some(active) = chain.active.take() {
            if let Err(e) = active.seal() {
                tracing::error!(shard = self.shard, "audit: cannot close the active segment: {e}");
            }
        }
        self.publish_file(&chain);
    }
}
