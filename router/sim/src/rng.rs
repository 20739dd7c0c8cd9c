//! The simulation's one source of randomness: splitmix64, seeded once per run.

/// splitmix64 (the generator the proto crate uses for epochs and job backoff): small, fast,
/// and every output depends only on the seed and how many values were drawn before it.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0). The modulo bias is far below what a run can
    /// notice for the small ranges drawn here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An index into a slice of `len` items (`None` when empty).
    pub fn index(&mut self, len: usize) -> Option<usize> {
        (len > 0).then(|| self.below(len as u64) as usize)
    }

    /// An index drawn by weight (`None` when every weight is 0).
    pub fn weighted(&mut self, weights: &[u64]) -> Option<usize> {
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return None;
        }
        let mut left = self.below(total);
        for (at, weight) in weights.iter().enumerate() {
            if left < *weight {
                return Some(at);
            }
            left -= weight;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_draws_one_sequence() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        let drawn: Vec<u64> = (0..32).map(|_| a.next_u64()).collect();
        assert!(drawn.iter().all(|v| *v == b.next_u64()));
        assert_ne!(SimRng::new(8).next_u64(), drawn[0]);
    }

    #[test]
    fn weighted_never_picks_a_zero_weight() {
        let mut rng = SimRng::new(1);
        for _ in 0..1000 {
            assert_ne!(rng.weighted(&[3, 0, 5]), Some(1));
        }
        assert_eq!(rng.weighted(&[0, 0]), None);
    }
}
