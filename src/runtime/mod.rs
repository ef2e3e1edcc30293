//! Runtime primitives that know nothing of HTTP, functions or the server: a value one thread
//! publishes and shards copy when its generation moves (`published`), shard-local events and a
//! two-way race (`event`), the fair yield of long-running guests (`fair_yield`) and the timer that
//! ends their slices on time (`slice_timer`), the spin before a
//! shard parks (`idle_spin`), CPU sets and pinning (`cpu`), threads that work every interval until
//! their owner stops them (`periodic`), watched files (`watch`), and a value on cache lines of its
//! own (`padded`).
//!
//! Boundary: these modules import nothing from the rest of the crate, so every other module may
//! use them.

pub mod cpu;
pub mod event;
pub mod fair_yield;
pub mod idle_spin;
pub mod padded;
pub mod periodic;
pub mod published;
pub mod slice_timer;
pub mod watch;
