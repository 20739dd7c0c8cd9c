//! Retry discipline: exponential backoff with full jitter, honouring the router's
//! `retry_after_ms`.
//!
//! A retry storm is what takes coordination down: every client that retries at once, at the
//! same pace, multiplies the load the moment the router is weakest. Full jitter spreads the
//! retries out (each waits a random time between 0 and the exponential bound), and a
//! refusal's `retry_after_ms` is a floor no retry goes under.

use std::time::Duration;

/// How to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The bound of the first wait; it doubles with every attempt.
    pub base: Duration,
    /// The bound never grows past this.
    pub cap: Duration,
    /// Attempts in all (the first one included) before the error is returned.
    pub max_attempts: u32,
    /// Full jitter: each wait is random between 0 and its bound. Off, every wait is the
    /// bound itself, so clients that failed together retry together (for comparison only).
    pub jitter: bool,
}

/// Refusal codes that say "not now", which `publish_with_retry` sends again: `Busy` (15),
/// `RateLimited` (20), `CircuitOpen` (21) and `Conflict` (38: another router of a cluster
/// took the op id first).
pub(crate) const RETRIED_REFUSALS: [u16; 4] = [15, 20, 21, 38];

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(10),
            max_attempts: 10,
            jitter: true,
        }
    }
}

/// The waits of one retry sequence. Seeded, so a run can be replayed.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(policy: RetryPolicy, seed: u64) -> Self {
        Backoff {
            policy,
            attempt: 0,
            rng: seed,
        }
    }

    /// A backoff seeded from the clock (for applications; tests use [`Backoff::new`]).
    pub fn from_clock(policy: RetryPolicy) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Self::new(policy, seed ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The wait before the next attempt, or `None` when the attempts are used up.
    /// `retry_after` is the router's advice, a floor for the wait.
    pub fn next_wait(&mut self, retry_after: Duration) -> Option<Duration> {
        self.attempt += 1;
        if self.attempt >= self.policy.max_attempts {
            return None;
        }
        let exponent = (self.attempt - 1).min(32);
        let bound = self
            .policy
            .base
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.policy.cap);
        let bound_ns = bound.as_nanos().min(u128::from(u64::MAX)) as u64;
        let wait = if !self.policy.jitter {
            bound_ns
        } else if bound_ns == 0 {
            0
        } else {
            self.next_random() % (bound_ns + 1)
        };
        Some(Duration::from_nanos(wait).max(retry_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_exponentially_within_full_jitter_and_the_cap() {
        let policy = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            max_attempts: 8,
            jitter: true,
        };
        let mut backoff = Backoff::new(policy.clone(), 42);
        let mut waits = Vec::new();
        while let Some(wait) = backoff.next_wait(Duration::ZERO) {
            waits.push(wait);
        }
        assert_eq!(waits.len(), 7, "max_attempts counts the first attempt");
        for (i, wait) in waits.iter().enumerate() {
            let bound = Duration::from_millis(10 << i).min(Duration::from_millis(100));
            assert!(*wait <= bound, "attempt {i}: {wait:?} above {bound:?}");
        }
        // Full jitter: the same seed gives the same waits, another seed others.
        let again: Vec<_> = std::iter::from_fn({
            let mut b = Backoff::new(policy.clone(), 42);
            move || b.next_wait(Duration::ZERO)
        })
        .collect();
        assert_eq!(again, waits);
        let other: Vec<_> = std::iter::from_fn({
            let mut b = Backoff::new(policy, 7);
            move || b.next_wait(Duration::ZERO)
        })
        .collect();
        assert_ne!(other, waits);
    }

    #[test]
    fn without_jitter_every_wait_is_its_bound() {
        let policy = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_attempts: 6,
            jitter: false,
        };
        let waits: Vec<_> = std::iter::from_fn({
            let mut b = Backoff::new(policy, 3);
            move || b.next_wait(Duration::ZERO)
        })
        .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, vec![ms(10), ms(20), ms(40), ms(50), ms(50)]);
    }

    #[test]
    fn the_routers_retry_after_is_a_floor() {
        let mut backoff = Backoff::new(RetryPolicy::default(), 1);
        let wait = backoff.next_wait(Duration::from_millis(700)).unwrap();
        assert!(wait >= Duration::from_millis(700));
    }
}
