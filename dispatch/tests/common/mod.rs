//! What the dispatch crate's test files share: a reproducible random source and the deadline of
//! a blocking call.

use std::time::{Duration, Instant};

/// xorshift64*: reproducible per seed, and different per test run through the time seed (printed,
/// so that a failing run can be repeated).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        eprintln!("rng seed {seed}");
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-2, 2], never exactly zero.
    pub fn value(&mut self) -> f32 {
        let x = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
        if x == 0.0 {
            0.5
        } else {
            x
        }
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

/// When a blocking call gives up: far beyond any op here, so that only a hang reaches it.
pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}
