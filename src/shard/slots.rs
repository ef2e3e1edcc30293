//! The shard's counted resources: connections, instance slots, request-body bytes and each
//! tenant's running invocations. Each claim is a guard that gives its count back when dropped.

use std::cell::Cell;
use std::rc::Rc;

use wasmtime::Store;

use super::Shard;
use crate::error::ApiError;
use crate::wasm::GuestState;

/// Counts a connection for its whole life; the last one out during a drain ends the shard's wait.
pub struct ConnectionGuard {
    pub shard: Rc<Shard>,
}

impl ConnectionGuard {
    pub fn new(shard: Rc<Shard>) -> Self {
        shard.connections.set(shard.connections.get() + 1);
        shard.metrics.connections.set(shard.connections.get() as u64);
        ConnectionGuard { shard }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let shard = &self.shard;
        // However the connection ended, no spent store of its answers outlives it.
        shard.drop_spent();
        debug_assert!(shard.connections.get() > 0, "a connection guard dropped with none counted");
        shard.connections.set(shard.connections.get() - 1);
        shard.metrics.connections.set(shard.connections.get() as u64);
        if shard.connections.get() == 0 && shard.drain.is_fired() {
            shard.all_closed.fire();
        }
    }
}

/// A claim on one of the shard's instance slots, held for one invocation.
pub struct InstanceSlot<'a> {
    shard: &'a Shard,
}

impl Shard {
    /// Claims an instance slot, or refuses with 503 `overloaded` when the shard's share of the
    /// instance pool is in use: a bounded pool, never a queue without end.
    /// Spent stores are dropped first, so that they never hold a slot an invocation needs (a
    /// pipeline's earlier step, or an answer another connection has not sent yet).
    pub fn acquire_instance_slot(&self) -> Result<InstanceSlot<'_>, ApiError> {
        self.drop_spent();
        if self.instances.get() >= self.max_instances {
            return Err(ApiError::Overloaded("every instance slot of this shard is busy"));
        }
        self.instances.set(self.instances.get() + 1);
        debug_assert!(self.instances.get() <= self.max_instances);
        self.metrics.active_instances.set(self.instances.get() as u64);
        self.metrics.instance_spawns.inc();
        Ok(InstanceSlot { shard: self })
    }

    /// Keeps `store`, whose invocation is over, and its slot until [`Self::drop_spent`]: dropping
    /// a store resets the memory its guest dirtied (a PAGEMAP_SCAN and a memset per page, about a
    /// tenth of a JSON request's CPU), which need not delay the answer.
    pub fn keep_spent(&self, slot: InstanceSlot<'_>, store: Store<GuestState>) {
        // The slot stays counted until its store is dropped: the pool has no more slots than that.
        std::mem::forget(slot);
        let mut spent = self.spent.borrow_mut();
        spent.push(store);
        // Each spent store still holds the slot it was forgotten with.
        debug_assert!(spent.len() <= self.instances.get(), "more spent stores than slots held");
    }

    /// Drops the spent stores and frees their slots. Called once an answer has been sent, when a
    /// connection ends, and before a slot is claimed, so that no more are held than invocations
    /// running.
    pub fn drop_spent(&self) {
        let mut spent = self.spent.borrow_mut();
        let count = spent.len();
        if count == 0 {
            return;
        }
        // Kept, not freed: the vector serves the next answers without allocating.
        spent.clear();
        drop(spent);
        self.release_slots(count);
    }

    fn release_slots(&self, count: usize) {
        debug_assert!(count <= self.instances.get(), "released {count} of {} slots held", self.instances.get());
        self.instances.set(self.instances.get() - count);
        self.metrics.active_instances.set(self.instances.get() as u64);
    }
}

/// Request-body bytes held for one request, given back when it is dropped.
pub struct BodyReservation<'a> {
    shard: &'a Shard,
    tenant: Option<u64>,
    bytes: Cell<u64>,
}

impl BodyReservation<'_> {
    /// Grows the reservation to `total` bytes: a chunked body, as it is decoded.
    pub fn grow_to(&self, total: u64) -> Result<(), ApiError> {
        let more = total.saturating_sub(self.bytes.get());
        if more > 0 {
            self.shard.take_body_bytes(self.tenant, more)?;
            self.bytes.set(total);
        }
        Ok(())
    }
}

impl Drop for BodyReservation<'_> {
    fn drop(&mut self) {
        let (shard, bytes) = (self.shard, self.bytes.get());
        debug_assert!(bytes <= shard.inflight_body_bytes.get(), "a reservation larger than the shard holds");
        shard.inflight_body_bytes.set(shard.inflight_body_bytes.get() - bytes);
        if let Some(tenant) = self.tenant {
            let mut per_tenant = shard.inflight_body_per_tenant.borrow_mut();
            // A tenant with bytes reserved has its entry until they are given back.
            debug_assert!(bytes == 0 || per_tenant.get(&tenant).is_some_and(|&held| held >= bytes));
            if let Some(held) = per_tenant.get_mut(&tenant) {
                *held -= bytes;
                if *held == 0 {
                    per_tenant.remove(&tenant);
                }
            }
        }
    }
}

/// One running invocation of a tenant, counted against its share of `--max-concurrent-per-tenant`.
pub struct TenantSlot<'a> {
    shard: &'a Shard,
    tenant: u64,
}

impl Drop for TenantSlot<'_> {
    fn drop(&mut self) {
        let mut running = self.shard.running_per_tenant.borrow_mut();
        debug_assert!(running.get(&self.tenant).is_some_and(|&n| n > 0), "a tenant slot with no count");
        if let Some(n) = running.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

impl Shard {
    /// Reserves `bytes` of the shard's in-flight body budget for a request about to be read, or
    /// refuses it with 503 `overloaded` before any of its body is read.
    /// A tenant's request past its own share gets 429 `inflight_body_limited` instead, so that one
    /// tenant's slow uploads cannot take the whole budget.
    pub fn reserve_body(&self, tenant: Option<u64>, bytes: u64) -> Result<BodyReservation<'_>, ApiError> {
        self.take_body_bytes(tenant, bytes)?;
        Ok(BodyReservation { shard: self, tenant, bytes: Cell::new(bytes) })
    }

    fn take_body_bytes(&self, tenant: Option<u64>, bytes: u64) -> Result<(), ApiError> {
        if bytes == 0 {
            // Most requests (reads, probes): nothing to hold, and no map to touch.
            return Ok(());
        }
        let held = self.inflight_body_bytes.get();
        if held.saturating_add(bytes) > self.limits.max_inflight_body_bytes {
            self.metrics.body_budget_refusals.inc();
            return Err(ApiError::Overloaded("this shard holds as many request bodies as it may"));
        }
        if let Some(tenant) = tenant {
            let limit = self.limits.max_inflight_body_bytes_per_tenant;
            let mut per_tenant = self.inflight_body_per_tenant.borrow_mut();
            let tenant_held = per_tenant.entry(tenant).or_insert(0);
            if tenant_held.saturating_add(bytes) > limit {
                if *tenant_held == 0 {
                    per_tenant.remove(&tenant);
                }
                self.metrics.body_budget_refusals.inc();
                return Err(ApiError::InflightBodyLimited { limit });
            }
            *tenant_held += bytes;
            debug_assert!(*tenant_held <= limit);
        }
        self.inflight_body_bytes.set(held + bytes);
        debug_assert!(held + bytes <= self.limits.max_inflight_body_bytes);
        Ok(())
    }

    /// Counts one more running invocation for `tenant`, or refuses it with 429
    /// `concurrency_limited` when the tenant already runs its share on this shard.
    pub fn acquire_tenant_slot(&self, tenant: u64) -> Result<TenantSlot<'_>, ApiError> {
        let mut running = self.running_per_tenant.borrow_mut();
        let n = running.entry(tenant).or_insert(0);
        if *n >= self.max_running_per_tenant {
            self.metrics.concurrency_refusals.inc();
            return Err(ApiError::ConcurrencyLimited { limit: self.limits.max_concurrent_per_tenant });
        }
        *n += 1;
        debug_assert!(*n <= self.max_running_per_tenant);
        Ok(TenantSlot { shard: self, tenant })
    }
}

impl Drop for InstanceSlot<'_> {
    fn drop(&mut self) {
        self.shard.release_slots(1);
    }
}

/// Shard `id`'s share of `total` split over `shards`: the first `total % shards` shards take one
/// more, so the shares sum to exactly `total`.
pub fn exact_share(total: usize, shards: usize, id: usize) -> usize {
    debug_assert!(id < shards && shards > 0);
    total / shards + usize::from(id < total % shards)
}

#[cfg(test)]
mod share_tests {
    #[test]
    fn exact_shares_sum_to_the_total() {
        for total in [1usize, 2, 3, 4, 5, 999, 1000, 1001] {
            for shards in 1..=total.min(7) {
                let shares: Vec<usize> = (0..shards).map(|id| super::exact_share(total, shards, id)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {shards}");
                assert!(shares.iter().all(|&s| s >= 1 && s <= total.div_ceil(shards)), "{shares:?}");
            }
        }
    }
}
