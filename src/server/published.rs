//! A value published by one thread and read by every shard without a lock or a shared write on the
//! hot path: a shard keeps its own copy and compares a generation counter (one atomic load) before
//! each use; only when the generation moved does it take the read lock and copy again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub struct Published<T> {
    value: RwLock<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Published<T> {
    pub fn new(value: T) -> Self {
        Published { value: RwLock::new(Arc::new(value)), generation: AtomicU64::new(1) }
    }

    /// Replaces the value; every shard sees it on its next check.
    pub fn publish(&self, value: T) {
        let mut current = self.value.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(value);
        // Bumped under the write lock, so that `load` sees a value and its own generation.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current value and its generation, read together.
    pub fn load(&self) -> (u64, Arc<T>) {
        let current = self.value.read().unwrap_or_else(|p| p.into_inner());
        (self.generation(), current.clone())
    }
}
