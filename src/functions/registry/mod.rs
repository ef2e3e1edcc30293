//! The fleet's catalog (issue 35): with `--registry nats://…`, function and pipeline records live
//! in a NATS JetStream key-value bucket and functions' modules and tensor files in an object store
//! keyed by digest, so that every replica serves what any of them deployed.
//!
//! One thread (`client`) runs the NATS client on a tokio runtime of its own, away from the shards
//! and the catalog worker. The worker asks it to publish and remove (`Registry`, waiting at most
//! `--registry-timeout-ms` for JetStream's acknowledgement), and it hands the bucket's changes to
//! the worker (`Change`), which applies them to the local store and the catalog as it applies
//! deploys: shards see no difference. The local store is the replica's cache: it serves its last
//! known catalog while NATS is away, and a reconnect resynchronises from the bucket.

mod client;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{FunctionRecord, PipelineRecord};
use crate::error::ApiError;
use crate::metrics::{Counter, Histogram};

pub use crate::config::{NatsConfig, RegistryConfig};

pub use client::{spawn, ChangeSink, CHANGE_DEPTH};

/// A change in the fleet's catalog, for the worker to apply.
#[derive(Debug)]
pub enum Change {
    /// A function record was put (deployed, on this replica or another). `published_ms`: when
    /// JetStream stored it (Unix ms), for a change the watch saw; `None` from a resync's listing.
    Put {
        record: FunctionRecord,
        published_ms: Option<u64>,
    },
    /// The function with this id was deleted.
    Removed {
        id: String,
        published_ms: Option<u64>,
    },
    /// A pipeline's record was put, or deleted: as for functions.
    PipelinePut {
        record: PipelineRecord,
        published_ms: Option<u64>,
    },
    PipelineRemoved {
        id: String,
        published_ms: Option<u64>,
    },
    /// Every function (and pipeline) the bucket held at a resynchronisation (a connect or reconnect) as of its
    /// `revision`, after a `Put` for each: what is not among them was deleted while this replica
    /// was away, unless this replica published it later. `bucket` names the bucket (its creation
    /// time): a different one than the data dir last knew is a new or wiped registry, not
    /// deletions.
    Synced {
        ids: Vec<String>,
        pipelines: Vec<String>,
        bucket: String,
        revision: u64,
    },
}

/// Why the registry could not do what was asked.
#[derive(Debug)]
pub enum RegistryError {
    /// Not connected, or no acknowledgement within the timeout.
    Unavailable(String),
    /// The object store is full (`--registry-max-object-mb`).
    Full(String),
    /// The name's revision moved since the deploy read it: a concurrent deploy of the same name,
    /// on this replica or another, won.
    Conflict(String),
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Unavailable(why) => ApiError::RegistryUnavailable(why),
            RegistryError::Full(why) => ApiError::RegistryFull(format!("the registry's object store is full: {why}")),
            RegistryError::Conflict(why) => ApiError::DeployConflict(why),
        }
    }
}

/// A deploy's hold on its name: the key `n.<tenant>.<name in hex>` and the revision the deploy
/// read. Publishing sets the key to the new id only if it is still at that revision, so of two
/// deploys of one name that overlap, on any replicas, the first to publish wins and the other
/// gets 409 `conflict`. Deploys that do not overlap both succeed, as on a single node.
#[derive(Clone, Debug)]
pub struct NameClaim {
    key: String,
    revision: u64,
}

/// What the metrics and `observe` show of the registry. Written by the client thread alone, but
/// for the propagation figures, which the catalog worker writes alone.
#[derive(Default)]
pub struct RegistryStatus {
    /// From a change's publication in JetStream to this replica serving it: every change this
    /// replica applied from its watch.
    pub propagation: Histogram,
    /// Of those, the ones that took longer than `--registry-propagation-ms`.
    pub late_changes: Counter,
    /// Files the object store had lost that this replica stored again.
    pub repairs: Counter,
    /// Watching the bucket now.
    connected: AtomicBool,
    /// When the replica last was in step with the bucket (connected and watching), in Unix ms.
    in_step_unix_ms: AtomicU64,
    /// Resynchronisations done (connects and reconnects).
    syncs: AtomicU64,
}

/// Now, in milliseconds since the Unix epoch: the unit of the data dir's sync marker.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl RegistryStatus {
    /// Not connected yet; last in step at `synced_at` (Unix ms), if ever.
    fn since(synced_at: Option<u64>) -> RegistryStatus {
        RegistryStatus { in_step_unix_ms: AtomicU64::new(synced_at.unwrap_or(0)), ..Default::default() }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Seconds since the replica was last in step with the bucket: 0 while it watches it; `None`
    /// before it ever was.
    pub fn stale_seconds(&self) -> Option<f64> {
        if self.connected() {
            return Some(0.0);
        }
        match self.in_step_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(now_unix_ms().saturating_sub(at) as f64 / 1e3),
        }
    }

    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The watch ended: the replica was last in step now. Later failures (each retry's) leave
    /// that moment as it was.
    fn lost(&self) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.in_step_unix_ms.store(now_unix_ms(), Ordering::Relaxed);
        }
    }

    fn synced(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.in_step_unix_ms.store(now_unix_ms(), Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }
}

/// The worker's handle to the client thread.
pub struct Registry {
    commands: tokio::sync::mpsc::Sender<client::Command>,
    pub status: Arc<RegistryStatus>,
    timeout: Duration,
    /// `--registry-propagation-ms`: a change applied later than this is counted and logged.
    pub propagation_bound: Duration,
    /// `--registry-repair-interval-ms`.
    pub repair_interval: Duration,
}

impl Registry {
    /// The revision of the tenant's name in the bucket (0 when no deploy ever claimed it): read
    /// when a deploy starts, and compared and set when it is published (`NameClaim`).
    pub fn name_revision(&self, tenant: u64, name: &str) -> Result<NameClaim, RegistryError> {
        let key = client::name_key(tenant, name);
        let revision =
            self.ask(|reply, deadline| client::Command::NameRevision { key: key.clone(), reply, deadline })?;
        Ok(NameClaim { key, revision })
    }

    /// Stores the module (and tensor file) under its digest unless the object store has it,
    /// claims the name at the revision `claim` read (a deploy; `None` for a function republished
    /// from a cache), then puts the record: a deploy is acknowledged only once JetStream has all.
    /// Returns the record's revision in the bucket; `Conflict` when the name moved meanwhile.
    pub fn publish(
        &self,
        record: &FunctionRecord,
        module: &[u8],
        tensors: Option<(&str, &[u8])>,
        claim: Option<&NameClaim>,
    ) -> Result<u64, RegistryError> {
        let mut objects = vec![(record.digest.clone(), module.to_vec())];
        if let Some((digest, file)) = tensors {
            objects.push((digest.to_string(), file.to_vec()));
        }
        let claim = claim.cloned();
        self.ask(|reply, deadline| client::Command::Publish { record: record.clone(), claim, objects, reply, deadline })
    }

    /// Deletes the record; every replica's watch removes the function. The name's key goes too
    /// when it still names this function, and then the objects (digests) in `unused`, which no
    /// other function uses: best effort, after the answer is settled.
    pub fn remove(&self, record: &FunctionRecord, unused: Vec<String>) -> Result<(), RegistryError> {
        let id = record.id.clone();
        let name_key = client::name_key(record.tenant_id, &record.name);
        self.ask(|reply, deadline| client::Command::Remove { id, name_key, unused, reply, deadline })
    }

    /// Which of `digests` the object store does not hold.
    pub fn missing(&self, digests: Vec<String>) -> Result<Vec<String>, RegistryError> {
        self.ask(|reply, deadline| client::Command::Missing { digests, reply, deadline })
    }

    /// Stores `bytes` under `digest` (its SHA-256, which the caller checked).
    pub fn store_object(&self, digest: &str, bytes: Vec<u8>) -> Result<(), RegistryError> {
        let digest = digest.to_string();
        self.ask(|reply, deadline| client::Command::StoreObject { digest, bytes, reply, deadline })
    }

    /// Puts a pipeline's record: every replica's watch serves it.
    pub fn publish_pipeline(&self, record: &PipelineRecord) -> Result<u64, RegistryError> {
        let record = record.clone();
        self.ask(|reply, deadline| client::Command::PublishPipeline { record, reply, deadline })
    }

    /// Deletes a pipeline's record; every replica's watch removes it.
    pub fn remove_pipeline(&self, id: &str) -> Result<(), RegistryError> {
        let id = id.to_string();
        self.ask(|reply, deadline| client::Command::RemovePipeline { id, reply, deadline })
    }

    /// The object stored under `digest` (a module or a tensor file), at most `max_bytes` long.
    pub fn fetch(&self, digest: &str, max_bytes: u64) -> Result<Vec<u8>, RegistryError> {
        self.ask(|reply, deadline| client::Command::Fetch { digest: digest.to_string(), max_bytes, reply, deadline })
    }

    /// Sends a command and waits for its answer, at most the timeout. A change carries the same
    /// deadline: the client thread does not start its last step (the record's put or delete) past
    /// it, so that a 503 answered here leaves nothing behind in all but one case, a step already
    /// sent whose acknowledgement came too late (docs/API.md, `registry_unavailable`).
    fn ask<T>(
        &self,
        command: impl FnOnce(std::sync::mpsc::SyncSender<Result<T, RegistryError>>, std::time::Instant) -> client::Command,
    ) -> Result<T, RegistryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + self.timeout;
        self.commands.try_send(command(tx, deadline)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => {
                RegistryError::Unavailable("the registry is busy".into())
            }
            tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                RegistryError::Unavailable("the registry client stopped".into())
            }
        })?;
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).unwrap_or_else(|_| {
            Err(RegistryError::Unavailable(format!(
                "no answer from NATS within --registry-timeout-ms ({} ms)",
                self.timeout.as_millis()
            )))
        })
    }
}
