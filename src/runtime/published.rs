//! A value published by one thread and read by every shard without a lock or a shared write on the
//! hot path: a shard keeps its own copy and compares a generation counter (one atomic load) before
//! each use; only when the generation moved does it take the read lock and copy again
//! (`Subscription`), or rebuild what it derives from the value (`Derived`).

use std::cell::{Cell, Ref, RefCell};
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

/// A shard's own value derived from a published one (a copy, an index, pre-linked modules),
/// rebuilt only when the published value's generation moves: otherwise one atomic load. The one
/// implementation of "compare a generation, rebuild my copy" (`Subscription`, the function cache,
/// a shard's token list).
pub struct Derived<D> {
    /// The generation `value` was built from; `NEVER` before the first build.
    generation: Cell<u64>,
    value: RefCell<D>,
}

/// No published value has this generation: they start at 1 and count up.
const NEVER: u64 = u64::MAX;

impl<D: Default> Default for Derived<D> {
    fn default() -> Self {
        Derived { generation: Cell::new(NEVER), value: RefCell::default() }
    }
}

impl<D: Default> Derived<D> {
    /// The derived value, first rebuilt if `published` moved since it was built:
    /// `rebuild(new source, old derived value)` may keep what did not change.
    pub fn get<T>(&self, published: &Published<T>, rebuild: impl FnOnce(&Arc<T>, D) -> D) -> Ref<'_, D> {
        if published.generation() != self.generation.get() {
            let (generation, source) = published.load();
            let old = self.value.take();
            self.value.replace(rebuild(&source, old));
            self.generation.set(generation);
        }
        debug_assert_ne!(self.generation.get(), NEVER, "a published generation never reaches NEVER");
        self.value.borrow()
    }
}

/// A shard's copy of a published value, refreshed when its generation moves.
pub struct Subscription<T>(Derived<Option<Arc<T>>>);

impl<T> Default for Subscription<T> {
    fn default() -> Self {
        Subscription(Derived::default())
    }
}

impl<T> Subscription<T> {
    /// The current value: an atomic load, plus the read lock only when it changed.
    pub fn get(&self, published: &Published<T>) -> Arc<T> {
        let copy = self.0.get(published, |source, _| Some(source.clone()));
        // Not a `bug!`: `get` hands back the value, with no error to return, and the rebuild
        // above stores `Some` whenever the copy is empty (its generation starts at `NEVER`).
        copy.clone().expect("set by the first get")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_rebuilds_only_when_the_generation_moves() {
        let published = Published::new(1u32);
        let derived = Derived::<Vec<u32>>::default();
        let builds = Cell::new(0);
        let rebuild = |source: &Arc<u32>, mut old: Vec<u32>| {
            builds.set(builds.get() + 1);
            old.push(**source);
            old
        };
        assert_eq!(*derived.get(&published, rebuild), [1]);
        assert_eq!(*derived.get(&published, rebuild), [1], "unchanged: no rebuild");
        assert_eq!(builds.get(), 1);
        published.publish(2);
        assert_eq!(*derived.get(&published, rebuild), [1, 2], "the old value is handed to the rebuild");
        assert_eq!(builds.get(), 2);
    }

    #[test]
    fn a_subscription_follows_the_published_value() {
        let published = Published::new("a");
        let copy = Subscription::default();
        assert_eq!(*copy.get(&published), "a");
        published.publish("b");
        assert_eq!(*copy.get(&published), "b");
    }
}
