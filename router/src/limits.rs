//! Rate limiting: token buckets, driven by an injected clock.
//!
//! Every session has one bucket per class (rate and burst from `[rate_limits]`, overridden
//! per role). A publish takes one token; an empty bucket refuses it and says when the next
//! token arrives.

use std::time::{Duration, Instant};

use serde::Deserialize;
use swarmbus_schema::Class;

/// A rate: `rate_per_s` tokens per second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate_per_s: f64,
    pub burst: f64,
}

impl Rate {
    pub const fn new(rate_per_s: f64, burst: f64) -> Rate {
        Rate { rate_per_s, burst }
    }
}

/// A token bucket. Starts full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.rate_per_s).min(self.rate.burst);
        self.last = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.rate.rate_per_s <= 0.0 {
            // A zero rate never refills: advise a long pause rather than dividing by zero.
            return Err(Duration::from_secs(60));
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / self.rate.rate_per_s))
    }
}

/// One bucket per class for a session.
#[derive(Clone, Debug)]
pub struct ClassBuckets {
    buckets: [TokenBucket; Class::COUNT],
}

impl ClassBuckets {
    pub fn new(rates: [Rate; Class::COUNT], now: Instant) -> Self {
        ClassBuckets {
            buckets: rates.map(|rate| TokenBucket::new(rate, now)),
        }
    }

    pub fn try_take(&mut self, class: Class, now: Instant) -> Result<(), Duration> {
        self.buckets[class.index()].try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate_with_retry_advice() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(Rate::new(10.0, 3.0), start);
        for _ in 0..3 {
            bucket.try_take(start).unwrap();
        }
        let wait = bucket.try_take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 100 ms later exactly one token is back.
        let later = start + Duration::from_millis(100);
        bucket.try_take(later).unwrap();
        assert!(bucket.try_take(later).is_err());
        // A long pause refills to the burst, not beyond.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            bucket.try_take(much_later).unwrap();
        }
        assert!(bucket.try_take(much_later).is_err());
    }

    #[test]
    fn a_zero_rate_refuses_once_the_burst_is_spent() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(Rate::new(0.0, 1.0), now);
        bucket.try_take(now).unwrap();
        assert_eq!(
            bucket.try_take(now + Duration::from_secs(5)),
            Err(Duration::from_secs(60))
        );
    }

    #[test]
    fn classes_are_limited_separately() {
        let now = Instant::now();
        let mut rates = [Rate::new(1.0, 1.0); Class::COUNT];
        rates[Class::Telemetry.index()] = Rate::new(1.0, 100.0);
        let mut buckets = ClassBuckets::new(rates, now);
        buckets.try_take(Class::Command, now).unwrap();
        assert!(buckets.try_take(Class::Command, now).is_err());
        for _ in 0..100 {
            buckets.try_take(Class::Telemetry, now).unwrap();
        }
        buckets.try_take(Class::Control, now).unwrap();
    }
}
