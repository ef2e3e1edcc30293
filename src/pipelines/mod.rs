//! Pipelines: chains of functions, each step's output feeding the next, with an optional HTTP sink
//! for the final output (the in-scope part of Fiso's flows; Kafka and gRPC sources are not).
//!
//! - [`sink`]: delivering the final output, with retries, on a small pool of blocking threads.
//!
//! A pipeline's definition (`functions::pipeline`) lives in the catalog beside functions and
//! changes only through the catalog worker; `api::pipelines` runs it on the shard.

pub mod sink;
