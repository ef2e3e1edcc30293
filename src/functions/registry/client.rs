//! The NATS client thread: a current-thread tokio runtime (async-nats needs one), which connects,
//! resynchronises the catalog from the key-value bucket, watches it, and answers the worker's
//! commands. Nothing here runs on a shard or the catalog worker.
//!
//! The bucket `tensor-wasm-functions` holds one key per function, `f.<id>`, and per pipeline,
//! `p.<id>`, whose value is the record's JSON, and one per tenant's function name,
//! `n.<tenant>.<name in hex>`, whose revision orders deploys of the name. The object store
//! `tensor-wasm-objects` holds modules and tensor files under their SHA-256 in hex. Any
//! disconnection ends the watch: the thread reconnects (with a backoff of 0.1 to 2 s) and
//! resynchronises from the bucket, so a change missed while away is never lost. A delete's
//! clean-up (its markers, its unused objects) waits (`Later`) until every replica has seen it.

use std::collections::HashSet;
use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, object_store};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::{Change, NameClaim, NatsConfig, Registry, RegistryError, RegistryStatus};
use crate::functions::record::hex;
use crate::functions::{FunctionRecord, PipelineRecord};

const BUCKET: &str = "tensor-wasm-functions";
const OBJECTS: &str = "tensor-wasm-objects";
/// A function's key in the bucket.
const KEY_PREFIX: &str = "f.";
/// A pipeline's key in the bucket.
const PIPELINE_PREFIX: &str = "p.";
/// A tenant's function name's key: `n.<tenant>.<name in hex>` (hex, because a name may hold dots,
/// which would split the key into subject tokens), whose value is the id that last claimed it.
const NAME_PREFIX: &str = "n.";
/// Commands the worker may have waiting: it sends one at a time, so this only bounds a stall.
const COMMAND_DEPTH: usize = 16;
/// Changes on their way to the worker. Full, the watch waits: JetStream holds the rest.
pub const CHANGE_DEPTH: usize = 256;
/// A delete's clean-up waits this many `--registry-propagation-ms` (and at least a deploy's
/// `--registry-timeout-ms` more than one): by then every replica's watch has applied it, or the
/// replica counts a late change and, if away, will resynchronise from the listing.
const TOMBSTONE_AGE_PER_BOUND: u32 = 10;
/// Clean-up chores waiting at most; past it the oldest is left undone.
const MAX_CHORES: usize = 65_536;
/// How often the connection's state is looked at while watching.
const STATE_TICK: Duration = Duration::from_millis(100);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(super) type Reply<T> = std::sync::mpsc::SyncSender<Result<T, RegistryError>>;

pub(super) enum Command {
    /// Not started past `deadline`, the moment the worker stops waiting; answered with the
    /// record's revision in the bucket.
    Publish {
        record: FunctionRecord,
        claim: Option<NameClaim>,
        objects: Vec<(String, Vec<u8>)>,
        reply: Reply<u64>,
        deadline: Instant,
    },
    Remove {
        id: String,
        name_key: String,
        /// Objects no other function uses, deleted after the record.
        unused: Vec<String>,
        reply: Reply<()>,
        deadline: Instant,
    },
    NameRevision {
        key: String,
        reply: Reply<u64>,
        deadline: Instant,
    },
    Missing {
        digests: Vec<String>,
        reply: Reply<Vec<String>>,
        deadline: Instant,
    },
    StoreObject {
        digest: String,
        bytes: Vec<u8>,
        reply: Reply<()>,
        deadline: Instant,
    },
    PublishPipeline {
        record: PipelineRecord,
        reply: Reply<u64>,
        deadline: Instant,
    },
    RemovePipeline {
        id: String,
        reply: Reply<()>,
        deadline: Instant,
    },
    Fetch {
        digest: String,
        max_bytes: u64,
        reply: Reply<Vec<u8>>,
        deadline: Instant,
    },
}

/// Where changes go: a bounded channel the worker drains, and a nudge that queues the worker's
/// job to drain it (at most one outstanding, `nudge` decides).
pub struct ChangeSink {
    pub changes: mpsc::Sender<Change>,
    pub nudge: Box<dyn Fn() + Send>,
}

/// Starts the client thread. The worker holds the returned `Registry` and drains the receiver
/// of the channel whose sender is in `sink`.
/// `synced_at`: when the local cache was last in step (Unix ms), which the staleness counts from
/// until the first resynchronisation.
pub fn spawn(config: NatsConfig, sink: ChangeSink, synced_at: Option<u64>) -> io::Result<(Registry, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(COMMAND_DEPTH);
    let status = std::sync::Arc::new(RegistryStatus::since(synced_at));
    let registry = Registry {
        commands: tx,
        status: status.clone(),
        timeout: config.timeout,
        propagation_bound: config.propagation,
        repair_interval: config.repair_interval,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new().name("tw-registry".into()).spawn(move || {
        runtime.block_on(run(config, rx, sink, status));
    })?;
    Ok((registry, thread))
}

/// Connects, serves, and after any failure reconnects, until the worker drops its `Registry`.
async fn run(
    config: NatsConfig,
    mut commands: mpsc::Receiver<Command>,
    sink: ChangeSink,
    status: std::sync::Arc<RegistryStatus>,
) {
    let mut backoff = BACKOFF_FIRST;
    // Kept across reconnects: a marker due for purging while NATS was away is purged after.
    let later = Later::new((config.propagation * TOMBSTONE_AGE_PER_BOUND).max(config.timeout + config.propagation));
    loop {
        let why = match Session::open(&config, &later).await {
            Ok(session) => {
                let opened = Instant::now();
                let served = session.serve(&mut commands, &sink, &status).await;
                // A server that accepts and then drops connections must not make this resync
                // every 100 ms: the backoff starts over only after a session that lasted.
                if opened.elapsed() >= BACKOFF_MAX {
                    backoff = BACKOFF_FIRST;
                }
                match served {
                    Ok(()) => return, // the worker is gone
                    Err(why) => why,
                }
            }
            Err(why) => why,
        };
        status.lost();
        tracing::warn!(servers = ?crate::nats::redacted(&config.servers), retry_ms = backoff.as_millis() as u64, "registry unavailable: {why}");
        // While away, every command is refused at once: the worker answers 503, it does not wait.
        let retry = tokio::time::sleep(backoff);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = &mut retry => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => refuse(command, &why),
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn refuse(command: Command, why: &str) {
    let e = || RegistryError::Unavailable(format!("NATS is unreachable: {why}"));
    match command {
        Command::Publish { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::Remove { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::Fetch { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::NameRevision { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::PublishPipeline { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::Missing { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::StoreObject { reply, .. } => drop(reply.try_send(Err(e()))),
        Command::RemovePipeline { reply, .. } => drop(reply.try_send(Err(e()))),
    }
}

/// The bucket key of a tenant's function name (`NAME_PREFIX`).
pub(super) fn name_key(tenant: u64, name: &str) -> String {
    format!("{NAME_PREFIX}{tenant}.{}", hex(name.as_bytes()))
}

/// Clean-up a delete leaves for later, once every replica has seen the delete:
///
/// - its delete markers in the bucket (a function's, a pipeline's, a name's key). Left there,
///   each delete would stay in the bucket's stream for ever, and a tenant that deploys and
///   deletes in a loop would grow it without bound. A replica whose watch missed one (away
///   longer) resynchronises from the listing, which needs no marker;
/// - the objects the deleted function used, when no record in the bucket (not this replica's
///   catalog, which may lag or have refused a record) names them by then. Waiting for longer
///   than a deploy may take lets a deploy of the same module on another replica that found it
///   stored land its record first.
#[derive(Clone)]
struct Later {
    /// Chores and when they are due, oldest first.
    due: std::rc::Rc<std::cell::RefCell<std::collections::VecDeque<(Instant, Chore)>>>,
    delay: Duration,
}

enum Chore {
    /// A key whose delete marker to purge.
    Marker(String),
    /// An object (a digest) to remove if nothing names it.
    Object(String),
}

impl Later {
    fn new(delay: Duration) -> Later {
        Later { due: Default::default(), delay }
    }

    fn add(&self, chore: Chore) {
        let mut due = self.due.borrow_mut();
        if due.len() >= MAX_CHORES {
            // The oldest is left undone: a marker or an object stays in NATS, nothing is lost.
            due.pop_front();
        }
        due.push_back((Instant::now() + self.delay, chore));
    }

    /// The chores due now.
    fn take_due(&self) -> Vec<Chore> {
        let mut due = self.due.borrow_mut();
        let now = Instant::now();
        let ready = due.iter().take_while(|(at, _)| *at <= now).count();
        due.drain(..ready).map(|(_, chore)| chore).collect()
    }
}

struct Session {
    connection: crate::nats::Connection,
    js: jetstream::Context,
    kv: kv::Store,
    /// The bucket's stream, for purging delete markers.
    kv_stream: jetstream::stream::Stream,
    later: Later,
    objects: object_store::ObjectStore,
    /// The bucket's identity: its stream's creation time. A wiped or new registry has another.
    bucket: String,
}

impl Session {
    async fn open(config: &NatsConfig, later: &Later) -> Result<Session, String> {
        let connection = crate::nats::Connection::open(config, "tensor-wasm").await?;
        let js = jetstream::new(connection.client.clone());
        // Created on first use by whichever replica comes first; the same config everywhere, so a
        // second create is a no-op. History 1: the bucket is the catalog, not its log. The bucket's
        // stream is made here as async-nats's `create_key_value` makes it, because that call first
        // reads the account's info, whose reply from a 2.9 server (Debian's) lacks fields the
        // client requires ("data did not match any variant of untagged enum Response").
        js.get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{BUCKET}"),
            subjects: vec![format!("$KV.{BUCKET}.>")],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            discard: jetstream::stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("the key-value bucket {BUCKET}: {e}"))?;
        let kv = js.get_key_value(BUCKET).await.map_err(|e| format!("the key-value bucket {BUCKET}: {e}"))?;
        // Its identity: when its stream was made, in nanoseconds since the epoch.
        let created = kv.status().await.map_err(|e| format!("bucket status: {e}"))?.info.created;
        let bucket = created.unix_timestamp_nanos().to_string();
        // The store as the first replica made it: a second create with another size would fail
        // ("already in use with a different configuration") on every connect.
        let objects = match js.get_object_store(OBJECTS).await {
            Ok(objects) => objects,
            // Missing, most likely; if it was not, the create's error says why, with this one.
            Err(get) => js
                .create_object_store(object_store::Config {
                    bucket: OBJECTS.into(),
                    max_bytes: i64::try_from(config.max_object_bytes).unwrap_or(i64::MAX),
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("the object store {OBJECTS}: {e} (opening it: {get})"))?,
        };
        let kv_stream = js.get_stream(format!("KV_{BUCKET}")).await.map_err(|e| format!("the bucket's stream: {e}"))?;
        Ok(Session { connection, js, kv, kv_stream, later: later.clone(), objects, bucket })
    }

    /// Resynchronises, then watches the bucket and answers commands until the connection drops
    /// (`Err`) or the worker is gone (`Ok`).
    async fn serve(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        sink: &ChangeSink,
        status: &RegistryStatus,
    ) -> Result<(), String> {
        let last = self.kv.status().await.map_err(|e| format!("bucket status: {e}"))?.info.state.last_sequence;
        let keys = self.keys().await?;
        let (mut ids, mut pipelines) = (Vec::new(), Vec::new());
        // Functions first: a pipeline's steps name them.
        let listed = keys
            .iter()
            .filter(|k| k.starts_with(KEY_PREFIX))
            .chain(keys.iter().filter(|k| k.starts_with(PIPELINE_PREFIX)));
        for key in listed {
            let Some(entry) = self.kv.entry(key.as_str()).await.map_err(|e| format!("get {key}: {e}"))? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            match change_of(&entry, None) {
                Some(change @ Change::Put { .. }) => {
                    ids.extend(key.strip_prefix(KEY_PREFIX).map(str::to_string));
                    self.hand_over(sink, commands, change).await?;
                }
                Some(change @ Change::PipelinePut { .. }) => {
                    pipelines.extend(key.strip_prefix(PIPELINE_PREFIX).map(str::to_string));
                    self.hand_over(sink, commands, change).await?;
                }
                _ => {}
            }
        }
        let listed = (ids.len(), pipelines.len());
        let synced = Change::Synced { ids, pipelines, bucket: self.bucket.clone(), revision: last };
        self.hand_over(sink, commands, synced).await?;
        // Every change after the listing's start: one the listing saw already comes again, and
        // applying it again changes nothing.
        let mut watch = self.kv.watch_all_from_revision(last + 1).await.map_err(|e| format!("watch: {e}"))?;
        status.synced();
        tracing::info!(
            functions = listed.0,
            pipelines = listed.1,
            revision = last,
            "registry synchronised; watching for changes"
        );
        let mut tick = tokio::time::interval(STATE_TICK);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return Ok(()),
                    Some(command) => self.execute(command).await,
                },
                entry = watch.next() => match entry {
                    None => return Err("the bucket's watch ended".into()),
                    Some(Err(e)) => return Err(format!("watch: {e}")),
                    Some(Ok(entry)) => {
                        // JetStream's clock, not this replica's: hosts' clocks agree to NTP's
                        // milliseconds, and a replica that lags behind the fleet is what counts.
                        let published_ms = u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).ok();
                        if let Some(change) = change_of(&entry, published_ms) {
                            self.hand_over(sink, commands, change).await?;
                        }
                    }
                },
                _ = tick.tick() => {
                    if self.connection.is_down() {
                        return Err("the connection to NATS dropped".into());
                    }
                    self.do_chores().await;
                }
            }
        }
    }

    /// Hands a change to the worker. While its channel is full the worker's commands are still
    /// answered: the worker may be waiting on one (a deploy's publish) before it drains again.
    async fn hand_over(
        &self,
        sink: &ChangeSink,
        commands: &mut mpsc::Receiver<Command>,
        change: Change,
    ) -> Result<(), String> {
        loop {
            tokio::select! {
                permit = sink.changes.reserve() => {
                    permit.map_err(|_| "the catalog worker stopped".to_string())?.send(change);
                    (sink.nudge)();
                    return Ok(());
                }
                command = commands.recv() => match command {
                    None => return Err("the catalog worker stopped".into()),
                    Some(command) => self.execute(command).await,
                },
            }
        }
    }

    /// `Err` once the worker has stopped waiting, or the connection dropped: a change it answered
    /// 503 must not start, nor one the client would only queue until NATS is back.
    fn in_time(&self, deadline: Instant) -> Result<(), RegistryError> {
        if Instant::now() >= deadline {
            return Err(RegistryError::Unavailable("the worker stopped waiting before NATS answered".into()));
        }
        if self.connection.is_down() {
            return Err(RegistryError::Unavailable("the connection to NATS dropped".into()));
        }
        Ok(())
    }

    async fn execute(&self, command: Command) {
        match command {
            Command::Publish { record, claim, objects, reply, deadline } => {
                let _ = reply.try_send(self.publish(&record, claim, objects, deadline).await);
            }
            Command::Remove { id, name_key, unused, reply, deadline } => {
                let removed = match self.in_time(deadline) {
                    Ok(()) => self.kv.delete(format!("{KEY_PREFIX}{id}")).await,
                    Err(e) => return drop(reply.try_send(Err(e))),
                };
                let removed = removed.map_err(|e| RegistryError::Unavailable(format!("delete: {e}")));
                let done = removed.is_ok();
                if done {
                    self.later.add(Chore::Marker(format!("{KEY_PREFIX}{id}")));
                }
                // Answered first: what follows is clean-up, which a failure leaves for later.
                let _ = reply.try_send(removed);
                if done {
                    self.release_name(&name_key, &id).await;
                    for digest in unused {
                        self.later.add(Chore::Object(digest));
                    }
                }
            }
            Command::Missing { digests, reply, deadline } => {
                let looked = tokio::time::timeout_at(deadline.into(), async {
                    let mut missing = Vec::new();
                    for digest in digests {
                        // Only what NATS says is gone: an error of another kind proves nothing.
                        let gone = match self.objects.info(object_name(&digest).as_str()).await {
                            Ok(info) => info.deleted,
                            Err(e) => e.kind() == object_store::InfoErrorKind::NotFound,
                        };
                        if gone {
                            missing.push(digest);
                        }
                    }
                    missing
                })
                .await;
                let _ =
                    reply.try_send(looked.map_err(|_| RegistryError::Unavailable("past --registry-timeout-ms".into())));
            }
            Command::StoreObject { digest, bytes, reply, deadline } => {
                let stored = match self.in_time(deadline) {
                    Ok(()) => self.store(&object_name(&digest), &bytes).await,
                    Err(e) => Err(e),
                };
                let _ = reply.try_send(stored);
            }
            Command::PublishPipeline { record, reply, deadline } => {
                let published = match self.in_time(deadline) {
                    Ok(()) => self.create_record(&format!("{PIPELINE_PREFIX}{}", record.id), &record).await,
                    Err(e) => Err(e),
                };
                let _ = reply.try_send(published);
            }
            Command::RemovePipeline { id, reply, deadline } => {
                let removed = match self.in_time(deadline) {
                    Ok(()) => self.kv.delete(format!("{PIPELINE_PREFIX}{id}")).await,
                    Err(e) => return drop(reply.try_send(Err(e))),
                };
                if removed.is_ok() {
                    self.later.add(Chore::Marker(format!("{PIPELINE_PREFIX}{id}")));
                }
                let _ = reply.try_send(removed.map_err(|e| RegistryError::Unavailable(format!("delete: {e}"))));
            }
            Command::NameRevision { key, reply, deadline } => {
                let read = match self.in_time(deadline) {
                    Ok(()) => self.kv.entry(key.as_str()).await,
                    Err(e) => return drop(reply.try_send(Err(e))),
                };
                let revision = read
                    .map(|entry| entry.map_or(0, |e| e.revision))
                    .map_err(|e| RegistryError::Unavailable(format!("read the name {key}: {e}")));
                let _ = reply.try_send(revision);
            }
            Command::Fetch { digest, max_bytes, reply, deadline } => {
                // Not past the worker's wait: a large object nobody waits for would hold up the
                // commands behind it.
                let fetched = tokio::time::timeout_at(deadline.into(), self.fetch(&digest, max_bytes)).await;
                let _ = reply.try_send(fetched.unwrap_or_else(|_| {
                    Err(RegistryError::Unavailable(format!("fetch {digest}: past --registry-timeout-ms")))
                }));
            }
        }
    }

    /// Publishes a deploy (`publish_steps`), then checks its objects are still there.
    async fn publish(
        &self,
        record: &FunctionRecord,
        claim: Option<NameClaim>,
        objects: Vec<(String, Vec<u8>)>,
        deadline: Instant,
    ) -> Result<u64, RegistryError> {
        let mut sent = Vec::new();
        let published = self.publish_steps(record, claim, &objects, deadline, &mut sent).await;
        match &published {
            Ok(_) => self.still_stored(&objects).await,
            // What this deploy stored and no record names goes with the next clean-up, unless a
            // record names it by then (the same module, deployed by another).
            Err(_) => sent.into_iter().for_each(|digest| self.later.add(Chore::Object(digest))),
        }
        published
    }

    /// The objects first (a full store refuses before anything else moved), then the name's
    /// claim (so that only a deploy about to land moves it), then the record: each acknowledged
    /// by JetStream before the next. `sent`: the objects this deploy stored.
    async fn publish_steps(
        &self,
        record: &FunctionRecord,
        claim: Option<NameClaim>,
        objects: &[(String, Vec<u8>)],
        deadline: Instant,
        sent: &mut Vec<String>,
    ) -> Result<u64, RegistryError> {
        for (digest, bytes) in objects {
            self.in_time(deadline)?;
            let name = object_name(digest);
            if self.holds(&name, bytes.len()).await {
                continue;
            }
            self.store(&name, bytes).await?;
            sent.push(digest.clone());
        }
        if let Some(claim) = claim {
            self.in_time(deadline)?;
            self.claim_name(&claim, &record.id).await?;
        }
        // The record is the change itself.
        self.in_time(deadline)?;
        self.create_record(&format!("{KEY_PREFIX}{}", record.id), record).await
    }

    /// Creates `key` with the record's JSON; returns its revision.
    async fn create_record(&self, key: &str, record: &impl serde::Serialize) -> Result<u64, RegistryError> {
        let value = serde_json::to_vec(record).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        match self.kv.create(key, value.into()).await {
            Ok(revision) => Ok(revision),
            // Another replica published the same record first (a cache published back to a new
            // registry by two replicas): it is there, which is what was asked.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = self.kv.entry(key).await;
                Ok(entry.ok().flatten().map_or(0, |e| e.revision))
            }
            Err(e) => Err(RegistryError::Unavailable(format!("put the record: {e}"))),
        }
    }

    /// Stores `bytes` as the object `name`, if the store has room for them.
    async fn store(&self, name: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        self.room_for(bytes.len() as u64).await?;
        self.objects.put(name, &mut &bytes[..]).await.map(drop).map_err(|e| {
            let text = e.to_string();
            // JetStream's words for a stream at its max_bytes.
            if text.contains("maximum bytes") || text.contains("insufficient resources") {
                RegistryError::Full(text)
            } else {
                RegistryError::Unavailable(format!("store {name}: {text}"))
            }
        })
    }

    /// Whether the store holds the object `name`, of `len` bytes.
    async fn holds(&self, name: &str, len: usize) -> bool {
        self.objects.info(name).await.is_ok_and(|info| !info.deleted && info.size == len)
    }

    /// After the record: stores again an object that a delete elsewhere removed as unused while
    /// this deploy, having found it stored, did not send it. Best effort: a replica that cannot
    /// fetch it lists the function as broken and fetches again every 5 s.
    async fn still_stored(&self, objects: &[(String, Vec<u8>)]) {
        for (digest, bytes) in objects {
            let name = object_name(digest);
            if self.holds(&name, bytes.len()).await {
                continue;
            }
            tracing::info!(object = name, "an object removed while this deploy used it: stored again");
            if let Err(e) = self.store(&name, bytes).await {
                tracing::warn!(object = name, "cannot store again an object a function needs: {e:?}");
            }
        }
    }

    /// Sets the name's key to `id` if it is still at the revision the deploy read: create for a
    /// name never claimed, compare-and-set otherwise (a deleted key keeps its revision).
    async fn claim_name(&self, claim: &NameClaim, id: &str) -> Result<(), RegistryError> {
        let value = || id.as_bytes().to_vec().into();
        let lost = || {
            RegistryError::Conflict(format!(
                "the name changed after this deploy started (its revision moved past {}): another deploy of it, or a delete, on some replica",
                claim.revision
            ))
        };
        if claim.revision == 0 {
            return match self.kv.create(claim.key.as_str(), value()).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(lost()),
                Err(e) => Err(RegistryError::Unavailable(format!("claim the name: {e}"))),
            };
        }
        match self.kv.update(claim.key.as_str(), value(), claim.revision).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // A delete of the function the name named moved it (or a marker's purge): that is
                // no deploy of the name, so this one may still take it, at the key's state now.
                let released = match self.kv.entry(claim.key.as_str()).await {
                    Ok(None) => Some(0),
                    Ok(Some(entry)) if entry.operation != kv::Operation::Put => Some(entry.revision),
                    _ => None,
                };
                match released {
                    Some(0) => match self.kv.create(claim.key.as_str(), value()).await {
                        Ok(_) => Ok(()),
                        Err(_) => Err(lost()),
                    },
                    Some(revision) => {
                        self.kv.update(claim.key.as_str(), value(), revision).await.map(drop).map_err(|_| lost())
                    }
                    None => Err(lost()),
                }
            }
            Err(e) => Err(RegistryError::Unavailable(format!("claim the name: {e}"))),
        }
    }

    /// Deletes the name's key after its function's record, if it still names that function: a
    /// later deploy of the name holds it otherwise. Best effort: a key left behind only counts
    /// the name's deploys.
    /// Does the clean-up that is due: purges markers, and removes the objects no record names.
    async fn do_chores(&self) {
        let mut objects = HashSet::new();
        for chore in self.later.take_due() {
            match chore {
                Chore::Marker(key) => self.purge_marker(&key).await,
                Chore::Object(digest) => drop(objects.insert(digest)),
            }
        }
        if objects.is_empty() {
            return;
        }
        match self.named_objects().await {
            Ok(named) => {
                for digest in objects.difference(&named) {
                    let name = object_name(digest);
                    if let Err(e) = self.objects.delete(name.as_str()).await {
                        tracing::debug!(object = name, "an unused object stays in the store: {e}");
                    }
                }
            }
            // Left in the store: an object too many, never one too few.
            Err(e) => tracing::debug!("unused objects stay in the store: {e}"),
        }
    }

    /// Every key the bucket holds (deleted ones aside).
    async fn keys(&self) -> Result<Vec<String>, String> {
        let keys = self.kv.keys().await.map_err(|e| format!("list: {e}"))?;
        keys.try_collect().await.map_err(|e| format!("list: {e}"))
    }

    /// Every object (module and tensor file digests) some function record in the bucket names.
    async fn named_objects(&self) -> Result<HashSet<String>, String> {
        let keys = self.keys().await?;
        let mut named = HashSet::new();
        for key in keys.iter().filter(|k| k.starts_with(KEY_PREFIX)) {
            let Some(value) = self.kv.get(key.as_str()).await.map_err(|e| format!("get {key}: {e}"))? else { continue };
            // A record that does not parse names nothing this server can tell: its objects, if
            // any, are kept (only an unreadable record's key can name them).
            match serde_json::from_slice::<FunctionRecord>(&value) {
                Ok(record) => named.extend(std::iter::once(record.digest).chain(record.tensors)),
                Err(_) => return Err(format!("{key} does not parse")),
            }
        }
        Ok(named)
    }

    /// Purges `key`'s delete marker, if it is still the key's last entry: anything put after it
    /// (a name claimed again) has a later sequence and stays.
    async fn purge_marker(&self, key: &str) {
        let Ok(Some(entry)) = self.kv.entry(key).await else { return };
        if entry.operation == kv::Operation::Put {
            return;
        }
        let subject = format!("$KV.{BUCKET}.{key}");
        if let Err(e) = self.kv_stream.purge().filter(subject).sequence(entry.revision + 1).await {
            tracing::debug!(key, "a delete marker stays in the bucket: {e}");
        }
    }

    async fn release_name(&self, key: &str, id: &str) {
        let Ok(Some(entry)) = self.kv.entry(key).await else { return };
        if entry.operation == kv::Operation::Put && entry.value.as_ref() == id.as_bytes() {
            match self.kv.delete_expect_revision(key, Some(entry.revision)).await {
                Ok(()) => self.later.add(Chore::Marker(key.to_string())),
                Err(e) => tracing::debug!(key, "the name's key stays: {e}"),
            }
        }
    }

    /// Refuses an object the store has no room for, before any of it is sent: an upload that
    /// JetStream stops midway leaves the chunks it took behind, under a name nothing refers to.
    async fn room_for(&self, bytes: u64) -> Result<(), RegistryError> {
        let unavailable = |e: String| RegistryError::Unavailable(format!("the object store's size: {e}"));
        let mut stream = self.js.get_stream(format!("OBJ_{OBJECTS}")).await.map_err(|e| unavailable(e.to_string()))?;
        let info = stream.info().await.map_err(|e| unavailable(e.to_string()))?;
        let limit = info.config.max_bytes;
        // Chunks carry headers and subjects besides the bytes: a margin of an eighth.
        let needed = info.state.bytes.saturating_add(bytes).saturating_add(bytes / 8);
        if limit >= 0 && needed > limit as u64 {
            return Err(RegistryError::Full(format!(
                "{bytes} more bytes would take it past its {limit} (--registry-max-object-mb), {} used",
                info.state.bytes
            )));
        }
        Ok(())
    }

    async fn fetch(&self, digest: &str, max_bytes: u64) -> Result<Vec<u8>, RegistryError> {
        let name = object_name(digest);
        let unavailable = |e: String| RegistryError::Unavailable(format!("fetch {name}: {e}"));
        let object = self.objects.get(&name).await.map_err(|e| unavailable(e.to_string()))?;
        let mut bytes = Vec::new();
        // One byte past the bound tells a file that is too long.
        object.take(max_bytes + 1).read_to_end(&mut bytes).await.map_err(|e| unavailable(e.to_string()))?;
        if bytes.len() as u64 > max_bytes {
            return Err(unavailable(format!("more than {max_bytes} bytes")));
        }
        Ok(bytes)
    }
}

/// An object's name: a digest's hex, without `sha256:`.
fn object_name(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).to_string()
}

/// The change an entry of the bucket makes: a function's or a pipeline's record put or deleted;
/// `None` for a name's key, a key that is not ours, or a record that does not parse.
fn change_of(entry: &kv::Entry, published_ms: Option<u64>) -> Option<Change> {
    let put = entry.operation == kv::Operation::Put;
    if let Some(id) = entry.key.strip_prefix(KEY_PREFIX) {
        return Some(match put {
            true => Change::Put { record: record_of(entry, id, |r: &FunctionRecord| &r.id)?, published_ms },
            false => Change::Removed { id: id.to_string(), published_ms },
        });
    }
    let id = entry.key.strip_prefix(PIPELINE_PREFIX)?;
    Some(match put {
        true => Change::PipelinePut { record: record_of(entry, id, |r: &PipelineRecord| &r.id)?, published_ms },
        false => Change::PipelineRemoved { id: id.to_string(), published_ms },
    })
}

/// A record from an entry's value, whose id must be its key's (`id`); one that does not parse is
/// skipped, and logged: another version's record, or a key that is not ours.
fn record_of<T: serde::de::DeserializeOwned>(entry: &kv::Entry, id: &str, id_of: fn(&T) -> &str) -> Option<T> {
    match serde_json::from_slice::<T>(&entry.value) {
        Ok(record) if id_of(&record) == id => Some(record),
        Ok(_) => {
            tracing::warn!(key = entry.key, "a registry record whose id is not its key's: skipped");
            None
        }
        Err(e) => {
            tracing::warn!(key = entry.key, "an unreadable registry record: skipped: {e}");
            None
        }
    }
}
