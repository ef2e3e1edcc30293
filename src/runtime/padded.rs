//! A value on cache lines of its own, for counters one thread writes and others read.

use std::ops::{Deref, DerefMut};

/// `T`, aligned and so padded to 128 bytes. Two 64-byte lines, not one: x86's adjacent-line
/// prefetcher fetches lines in pairs, so a neighbour on the next line still contends (crossbeam's
/// `CachePadded` and glommio's ring indices use 128 for the same reason).
///
/// Each shard's counters in a slice indexed by shard go in one of these, so that one shard's
/// writes never invalidate the line another shard is writing.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for CachePadded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::CachePadded;

    #[test]
    fn neighbours_in_a_slice_are_128_bytes_apart() {
        let slots: Vec<CachePadded<u64>> = (0..3).map(|_| CachePadded::default()).collect();
        assert_eq!(std::mem::align_of::<CachePadded<u64>>(), 128);
        assert_eq!(std::mem::size_of::<CachePadded<[u64; 2]>>(), 128);
        let (a, b) = (&*slots[0] as *const u64 as usize, &*slots[1] as *const u64 as usize);
        assert_eq!(a % 128, 0);
        assert_eq!(b - a, 128);
    }
}
