//! A shard's audit chain: one writer, its own directory, its own segments.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::checkpoint::{Checkpoint, CheckpointFile};
use super::helpers::Helpers;
use super::record::{encode_into, AuditEvent, Integrity, ReplicaField, GENESIS, MAX_RECORD};
use super::segment::{segment_name, ActiveSegment, Retention, Spare};
use super::{AuditConfig, AuditOnError, AuditSync, CheckpointConfig};
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
    /// `,"replica":"<id>"`, or nothing: made here once, copied into every record.
    replica: ReplicaField,
    chain: RefCell<Chain>,
    /// The record being formatted, when there is no segment to format it in (stdout only).
    line: RefCell<Vec<u8>>,
    /// Tickets given out and not yet written: room kept for their records.
    outstanding: Cell<usize>,
    commit: Arc<CommitSlot>,
    /// The next segment, reserved in the background; `None` without a directory.
    spare: Option<Arc<Spare>>,
    /// The log's helper threads, which seal, retain and reserve off the shard.
    helpers: Helpers,
    metrics: Arc<ShardMetrics>,
    /// Damage recovery found, until the shard records it.
    damage: RefCell<Vec<Integrity>>,
    /// Signs checkpoints; `None` without `--audit-signing-key` (or without a directory).
    signer: Option<Signer>,
}

struct Signer {
    config: CheckpointConfig,
    state: RefCell<SignerState>,
}

struct SignerState {
    file: CheckpointFile,
    /// The `seq` of the last checkpoint written to the file.
    signed: Option<u64>,
}

/// Room for one record, taken before the request's action runs.
pub struct AuditTicket(());

impl ShardAudit {
    /// Opens shard `shard`'s chain (`recover`): cuts a torn suffix, keeps damage as it is for
    /// [`ShardAudit::take_damage`], and continues the sequence and the chain.
    /// A log that cannot be opened is not fatal: the shard starts in the failing state. `helpers`
    /// belong to whoever opened the log, which stops them after [`ShardAudit::close`].
    pub fn open(
        shard: usize,
        config: Arc<AuditConfig>,
        metrics: Arc<ShardMetrics>,
        commit: Arc<CommitSlot>,
        helpers: Helpers,
    ) -> Self {
        let dir = config.dir.as_ref().map(|d| d.join(format!("shard-{shard}")));
        let spare = dir.as_ref().filter(|d| fs::create_dir_all(d).is_ok()).map(|d| Spare::new(d, config.segment_bytes));
        let signer = match (&config.checkpoints, &dir) {
            (Some(checkpoints), Some(dir)) => Some(Signer {
                config: checkpoints.clone(),
                state: RefCell::new(SignerState {
                    file: CheckpointFile::new(dir, checkpoints.file_bytes),
                    signed: None,
                }),
            }),
            _ => None,
        };
        let audit = ShardAudit {
            shard,
            dir,
            signer,
            damage: RefCell::default(),
            replica: ReplicaField::new(config.replica.as_ref()),
            config,
            chain: RefCell::new(Chain { seq: 0, prev_hash: GENESIS, active: None, failing: false, last_attempt: None }),
            line: RefCell::new(vec![0; MAX_RECORD]),
            outstanding: Cell::new(0),
            commit,
            spare,
            helpers,
            metrics,
        };
        if let Err(e) = audit.recover() {
            audit.fail(&format!("cannot open the audit log: {e}"));
        }
        if let Some(spare) = &audit.spare {
            spare.request(&audit.helpers);
        }
        audit
    }

    fn recover(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        fs::create_dir_all(dir)?;
        let replica = self.config.replica.as_ref();
        let recovered = super::recover::recover(dir, self.shard, self.config.segment_bytes, replica, &self.helpers)?;
        let mut chain = self.chain.borrow_mut();
        chain.seq = recovered.seq;
        chain.prev_hash = recovered.prev_hash;
        chain.active = recovered.active;
        self.publish_file(&chain);
        for _ in &recovered.damage {
            self.metrics.audit_integrity_failures.inc();
        }
        *self.damage.borrow_mut() = recovered.damage;
        Ok(())
    }

    /// The damage start-up found, for the shard to record as `audit_integrity` events before
    /// anything else (it numbers them as requests); empty after the first call.
    pub fn take_damage(&self) -> Vec<Integrity> {
        std::mem::take(&mut self.damage.borrow_mut())
    }

    /// Signs a checkpoint of the chain head if it moved since the last one (or none was signed
    /// since start-up), appends it to the shard's checkpoint file and writes it to stdout. Called
    /// by the shard's checkpoint task every `--audit-checkpoint-interval-ms` and at shutdown:
    /// never on a request's path.
    pub fn checkpoint(&self) {
        let Some(signer) = &self.signer else { return };
        let (seq, hash) = {
            let chain = self.chain.borrow();
            (chain.seq, chain.prev_hash)
        };
        let mut state = signer.state.borrow_mut();
        if seq == 0 || state.signed == Some(seq) {
            return;
        }
        let replica = self.config.replica.as_ref();
        let checkpoint =
            Checkpoint::new(signer.config.key.name(), replica, self.shard, seq, hash, AuditEvent::now_unix_ms());
        let note = signer.config.key.sign_note(&checkpoint.text());
        if let Err(e) = state.file.append(&note) {
            // The stdout copy below still leaves the host; the next tick tries the file again.
            tracing::error!(shard = self.shard, "audit: cannot write a checkpoint: {e}");
            self.metrics.audit_errors.inc();
        } else {
            state.signed = Some(seq);
        }
        let mut line = checkpoint.json_line(&note);
        line.push('\n');
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
        self.metrics.audit_checkpoints.inc();
    }

    /// How often the shard's checkpoint task runs; `None`: no checkpoints.
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        self.signer.as_ref().map(|s| s.config.interval)
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
        let helpers = &self.helpers;
        let from_spare =
            self.spare.as_ref().and_then(|spare| ActiveSegment::from_spare(spare, path.clone(), always, helpers));
        let next = match from_spare {
            Some(next) => next?,
            None => ActiveSegment::create(path.clone(), self.config.segment_bytes, always, helpers)?,
        };
        if let Some(spare) = &self.spare {
            spare.request(helpers);
        }
        if !always {
            helpers.sync_dir(path)?;
        }
        if let Some(old) = chain.active.replace(next) {
            let sealed = if always { old.seal().map(|_| ()) } else { helpers.seal(old) };
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
        // Removing a 64 MiB file takes milliseconds too: off the shard.
        let retention = Retention { segments: self.config.retain_segments, bytes: self.config.retain_bytes };
        if let Err(e) = self.helpers.retain(dir.clone(), retention) {
            tracing::error!(shard = self.shard, "audit: retention failed: {e}");
        }
        Ok(())
    }

    /// Appends the record of a request whose ticket was taken, before its response is sent.
    /// Gives back a ticket whose request ended with no answer (its client left while sending the
    /// body): nothing happened, so there is nothing to record.
    pub fn forget(&self, ticket: AuditTicket) {
        let AuditTicket(()) = ticket;
        if self.dir.is_some() {
            self.outstanding.set(self.outstanding.get().saturating_sub(1));
        }
    }

    pub fn record(&self, ticket: AuditTicket, event: &AuditEvent) {
        let AuditTicket(()) = ticket;
        if !self.config.enabled() {
            return;
        }
        let (seq, prev_hash) = {
            let chain = self.chain.borrow();
            (chain.seq + 1, chain.prev_hash)
        };
        let hash = if self.dir.is_some() {
            self.outstanding.set(self.outstanding.get().saturating_sub(1));
            match self.append(event, seq, &prev_hash) {
                Ok(hash) => hash,
                // Only under `continue`, or a segment too small for the shard's concurrency: the
                // record is lost, and counted.
                Err(e) => return self.fail(&format!("an audit record could not be written: {e}")),
            }
        } else {
            let mut line = self.line.borrow_mut();
            let Some((len, hash)) = encode_into(event, &self.replica, self.shard, seq, &prev_hash, &mut line) else {
                return self.fail("an audit record could not be written: larger than MAX_RECORD");
            };
            self.mirror(&line[..len]);
            self.count(len);
            hash
        };
        let mut chain = self.chain.borrow_mut();
        chain.seq = seq;
        chain.prev_hash = hash;
    }

    /// Formats the record straight into the active segment (rotating first when less than a
    /// record's room is left), mirrors it and makes it as durable as `--audit-sync` asks.
    fn append(&self, event: &AuditEvent, seq: u64, prev_hash: &[u8; 32]) -> Result<[u8; 32], String> {
        let fits = self.chain.borrow().active.as_ref().is_some_and(|a| a.room() >= MAX_RECORD);
        if !fits {
            self.rotate().map_err(|e| e.to_string())?;
        }
        let mut chain = self.chain.borrow_mut();
        let active = chain.active.as_mut().filter(|a| a.room() >= MAX_RECORD).ok_or("no segment")?;
        let Some((len, hash)) = encode_into(event, &self.replica, self.shard, seq, prev_hash, active.unwritten())
        else {
            // Past the valid end, but a reader of the active segment must find zeros there.
            active.unwritten()[..MAX_RECORD].fill(0);
            return Err("larger than MAX_RECORD".into());
        };
        active.commit(len);
        self.mirror(active.tail(len));
        self.count(len);
        match self.config.sync {
            AuditSync::Always => {
                // The record is in the segment either way, so the chain goes on from it.
                if let Err(e) = active.sync_tail(len) {
                    drop(chain);
                    self.fail(&format!("audit sync failed: {e}"));
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
        Ok(hash)
    }

    fn mirror(&self, line: &[u8]) {
        if self.config.stdout {
            let _ = std::io::stdout().lock().write_all(line);
        }
    }

    fn count(&self, bytes: usize) {
        self.metrics.audit_records.inc();
        self.metrics.audit_bytes.add(bytes as u64);
    }

    /// Seals nothing, but cuts the active segment to its records so that it reads as plain JSONL
    /// while the server is down. It is reopened and extended on the next start.
    pub fn close(&self) {
        // The last checkpoint covers every record: nothing written before a clean stop is left
        // outside a signed one.
        self.checkpoint();
        if let Some(spare) = &self.spare {
            spare.remove();
        }
        let mut chain = self.chain.borrow_mut();
        if let Some(active) = chain.active.take() {
            if let Err(e) = active.seal() {
                tracing::error!(shard = self.shard, "audit: cannot close the active segment: {e}");
            }
        }
        self.publish_file(&chain);
    }
}
