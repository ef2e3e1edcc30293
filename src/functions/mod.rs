//! Functions: what is deployed, where it is stored, and how shards learn of changes.
//!
//! - [`record`]: a function's metadata, as stored and as the API shows it.
//! - [`pipeline`]: a pipeline's definition, as the API and the functions directory give it,
//!   checked against the server's limits, and as it is stored beside the functions.
//! - [`store`]: the data dir: content-addressed modules, verified precompiled artifacts, records;
//!   every write atomic (temp file, rename, fsync of the directory).
//! - [`catalog`]: the process's authoritative map of live functions, shared by the shards; written
//!   only by the worker, read by a shard only when its generation moved.
//! - [`loader`]: a digest to a compiled module, from its verified artifact or by compiling its
//!   verified bytes; many at once at start-up.
//! - [`worker`]: the thread that loads the store at start-up and performs deploys and deletes, so
//!   that compiling and fsyncing never run on a shard. It also applies the functions directory.
//!   One file per concern: its job queue (`jobs`), deploys, pipelines and directory sync.
//! - [`directory`] and [`manifest`]: the functions directory's files (`--functions-dir`), and the
//!   `NAME.toml` manifest beside a module.
//! - [`registry`]: the fleet's catalog on NATS JetStream (`--registry`), whose changes the worker
//!   applies; the local store is then the replica's cache.

pub mod catalog;
pub mod directory;
pub mod loader;
pub mod manifest;
pub mod pipeline;
pub mod queue;
pub mod record;
pub mod registry;
pub mod store;
pub mod worker;

pub use catalog::{Catalog, DeployedFunction};
pub use pipeline::{PipelineRecord, PipelineSpec};
pub use record::FunctionRecord;
pub use store::FunctionStore;
pub use worker::{AdminHandle, DeployRequest};
pub mod cache;
pub use cache::{FunctionCache, LocalFunction};
