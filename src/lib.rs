//! TensorWasm: a sharded, thread-per-core serverless runtime for WebAssembly functions.
//!
//! The map of this crate is docs/ARCHITECTURE.md. In short: [`server`] starts one pinned shard per
//! CPU; each shard's connections (`server::conn`, speaking [`http`]) hand requests to [`api`],
//! which uses the shard's state ([`shard`]), the [`functions`] catalog and [`wasm`] execution;
//! [`metrics`] are per shard and merged on scrape. Below them all: [`config`] and [`runtime`].

pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod error;
pub mod functions;
pub mod http;
pub mod metrics;
pub mod pipelines;
pub mod route;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod tls;
pub mod wasm;
