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

/// A shard's copy of a published value, refreshed when its generation moves.
pub struct Subscription<T> {
    generation: std::cell::Cell<u64>,
    value: std::cell::RefCell<Option<Arc<T>>>,
}

impl<T> Default for Subscription<T> {
    fn default() -> Self {
        Subscription { generation: std::cell::Cell::new(0), value: std::cell::RefCell::new(None) }
    }
}

impl<T> Subscription<T> {
    /// The current value: an atomic load, plus the read lock only when it changed.
    pub fn get(&self, published: &Published<T>) -> Arc<T> {
        if published.generation() != self.generation.get() || self.value.borrow().is_none() {
            let (generation, value) = published.load();
            self.generation.set(generation);
            self.value.replace(Some(value));
        }
        self.value.borrow().clone().expect("set just above")
    }
}
