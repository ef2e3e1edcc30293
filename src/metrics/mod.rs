//! Metrics. Each shard owns a [`ShardMetrics`] and is its only writer; `/metrics` merges every
//! shard's figures at scrape time and renders the Prometheus text format, which [`exposition`]
//! reads back for the tools that watch a server from outside.

pub mod exposition;
mod render;
mod shard;

pub use render::{render, DirectoryStats, RegistryFigures, ScrapeContext, TokenCounts};
pub use shard::{Counter, Histogram, IoDriverKind, ShardMetrics, DURATION_BUCKETS};
