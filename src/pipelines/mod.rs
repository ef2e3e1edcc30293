//! Pipelines: chains of functions, each step's output feeding the next, with an optional HTTP sink
//! for the final output (the in-scope part of Fiso's flows; Kafka and gRPC sources are not).
//!
//! - [`record`]: a pipeline's definition as the API and the functions directory give it, checked
//!   against the server's limits, and as it is stored.
//! - [`sink`]: delivering the final output, with retries, on a small pool of blocking threads.
//!
//! Pipelines live in the catalog beside functions and change only through the catalog worker;
//! `api::pipelines` runs them on the shard.

pub mod record;
pub mod sink;

pub use record::{PipelineRecord, PipelineSpec};
