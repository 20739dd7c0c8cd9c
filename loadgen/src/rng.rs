//! A small seeded generator (splitmix64) for the scenarios' random draws (kills, pauses,
//! duplicates), so a run's choices can be replayed from its seed.

/// splitmix64: fast, seedable, good enough for choosing what to disturb.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / ((1u64 << 53) as f64)
    }

    /// True with probability `p` (never for `p <= 0`).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `low..=high` (`low <= high`).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// `count` distinct indices out of `0..len`, in random order (partial Fisher-Yates).
    pub fn sample(&mut self, len: usize, count: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..len).collect();
        let count = count.min(len);
        for i in 0..count {
            let j = i + (self.next() % (len - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(count);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_replayable_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next(), b.next());
        }
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert!((3..=5).contains(&rng.between(3, 5)));
            assert!((0.0..1.0).contains(&rng.unit()));
        }
        assert!(!rng.chance(0.0));
        assert!(rng.chance(1.0));
        let mut picked = rng.sample(50, 20);
        assert_eq!(picked.len(), 20);
        picked.sort_unstable();
        picked.dedup();
        assert_eq!(picked.len(), 20, "distinct");
        assert!(picked.iter().all(|&i| i < 50));
        assert_eq!(rng.sample(3, 10).len(), 3);
    }
}
