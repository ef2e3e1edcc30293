//! Per-tenant device memory: a reservation before every allocation, so a tenant over its quota is
//! refused before anything reaches a device.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One tenant's device memory across every device and shard.
#[derive(Debug, Default)]
pub struct TenantMemory {
    pub tenant: u64,
    used: AtomicU64,
    rejections: AtomicU64,
}

impl TenantMemory {
    /// Takes `bytes` of the tenant's quota, or counts a rejection and returns false.
    pub fn reserve(&self, bytes: u64, limit: u64) -> bool {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = current.checked_add(bytes).filter(|&n| n <= limit) else {
                self.rejections.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match self.used.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    pub fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more than reserved");
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
}

/// Every tenant that has used a device. Looked up once per invocation that makes a tensor.
pub struct Quotas {
    pub limit_bytes: u64,
    tenants: Mutex<HashMap<u64, Arc<TenantMemory>>>,
    /// Tenants kept at most; idle ones (nothing held, no invocation using them) are dropped first.
    max_tenants: usize,
}

impl Quotas {
    pub fn new(limit_bytes: u64, max_tenants: usize) -> Self {
        Quotas { limit_bytes, tenants: Mutex::new(HashMap::new()), max_tenants }
    }

    pub fn tenant(&self, tenant: u64) -> Arc<TenantMemory> {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(&tenant) {
            return t.clone();
        }
        if map.len() >= self.max_tenants {
            map.retain(|_, t| t.used() > 0 || Arc::strong_count(t) > 1);
        }
        let entry = Arc::new(TenantMemory { tenant, ..Default::default() });
        map.insert(tenant, entry.clone());
        entry
    }

    /// A snapshot for metrics: (tenant, bytes used, rejections), sorted by tenant.
    pub fn snapshot(&self) -> Vec<(u64, u64, u64)> {
        let map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map.values().map(|t| (t.tenant, t.used(), t.rejections())).collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_count_rejections() {
        let q = Quotas::new(100, 8);
        let t = q.tenant(7);
        assert!(t.reserve(60, q.limit_bytes));
        assert!(!t.reserve(41, q.limit_bytes));
        assert!(t.reserve(40, q.limit_bytes));
        t.release(100);
        assert!(t.reserve(100, q.limit_bytes));
        assert_eq!(q.snapshot(), vec![(7, 100, 1)]);
    }
}
