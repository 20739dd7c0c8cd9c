//! Rate limiting and circuit breaking, driven by an injected clock.
//!
//! Every session has one bucket per class (rate and burst from `[rate_limits]`, overridden
//! per role). A publish takes one token; an empty bucket refuses it and says when the next
//! token arrives.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarmbus_schema::Class;

/// A rate: `rate_per_s` tokens per second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
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

    /// Changes the rate; tokens saved up so far are kept, up to the new burst.
    pub fn set_rate(&mut self, rate: Rate, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(rate.burst);
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.try_take_n(1.0, now)
    }

    /// Takes `n` tokens at once (at most the burst), or says how long until they are there.
    pub fn try_take_n(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        let n = n.min(self.rate.burst);
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        if self.rate.rate_per_s <= 0.0 {
            // A zero rate never refills: advise a long pause rather than dividing by zero.
            return Err(Duration::from_secs(60));
        }
        let missing = n - self.tokens;
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

/// Circuit breaker settings.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Refused or failed publishes within `window_ms` that open the breaker.
    pub failures: u32,
    pub window_ms: u64,
    /// How long an open breaker refuses everything before it lets probes through.
    pub open_ms: u64,
    /// Successful probes that close a half-open breaker.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 100,
            window_ms: 1_000,
            open_ms: 5_000,
            probes: 10,
        }
    }
}

impl BreakerConfig {
    /// Defaults of the per-swarm breaker: the refusals of many sessions add up there, so it
    /// takes ten times as many to open it.
    pub const fn swarm_default() -> Self {
        BreakerConfig {
            failures: 1_000,
            window_ms: 1_000,
            open_ms: 5_000,
            probes: 100,
        }
    }
}

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// A circuit breaker for one sender: a sustained rate of refused or failing publishes (a
/// retry storm) opens it; while open every publish is refused at once; after `open_ms` it
/// half-opens and lets publishes through as probes; `probes` successes close it, one failure
/// opens it again. Driven by an injected clock; each call that changes the state returns
/// the new state so the caller can announce it.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    window_start: Instant,
    failures: u32,
    open_until: Instant,
    probes_ok: u32,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Breaker {
            config,
            state: BreakerState::Closed,
            window_start: now,
            failures: 0,
            open_until: now,
            probes_ok: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a publish may go ahead now; `Err` carries how long the breaker stays open.
    /// An open breaker whose time is up half-opens here (returned as a transition).
    pub fn check(&mut self, now: Instant) -> (Result<(), Duration>, Option<BreakerState>) {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => (Ok(()), None),
            BreakerState::Open if now >= self.open_until => {
                self.state = BreakerState::HalfOpen;
                self.probes_ok = 0;
                (Ok(()), Some(BreakerState::HalfOpen))
            }
            BreakerState::Open => (Err(self.open_until.saturating_duration_since(now)), None),
        }
    }

    /// A publish was refused or failed.
    pub fn failure(&mut self, now: Instant) -> Option<BreakerState> {
        match self.state {
            BreakerState::Open => None,
            BreakerState::HalfOpen => Some(self.open(now)),
            BreakerState::Closed => {
                let window = Duration::from_millis(self.config.window_ms);
                if now.saturating_duration_since(self.window_start) >= window {
                    self.window_start = now;
                    self.failures = 0;
                }
                self.failures += 1;
                (self.failures >= self.config.failures).then(|| self.open(now))
            }
        }
    }

    /// A publish went through.
    pub fn success(&mut self) -> Option<BreakerState> {
        if self.state != BreakerState::HalfOpen {
            return None;
        }
        self.probes_ok += 1;
        (self.probes_ok >= self.config.probes).then(|| {
            self.state = BreakerState::Closed;
            self.failures = 0;
            BreakerState::Closed
        })
    }

    fn open(&mut self, now: Instant) -> BreakerState {
        self.state = BreakerState::Open;
        self.open_until = now + Duration::from_millis(self.config.open_ms);
        BreakerState::Open
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
    fn batches_take_many_tokens_and_wait_for_all_of_them() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(Rate::new(100.0, 64.0), start);
        bucket.try_take_n(64.0, start).unwrap();
        assert_eq!(
            bucket.try_take_n(64.0, start),
            Err(Duration::from_millis(640))
        );
        bucket
            .try_take_n(64.0, start + Duration::from_millis(640))
            .unwrap();
        // More than the burst is capped at the burst rather than waiting forever.
        assert!(bucket
            .try_take_n(1_000.0, start + Duration::from_secs(10))
            .is_ok());
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

    #[test]
    fn a_retry_storm_opens_the_breaker_which_half_opens_and_closes() {
        let t0 = Instant::now();
        let config = BreakerConfig {
            failures: 3,
            window_ms: 1_000,
            open_ms: 500,
            probes: 2,
        };
        let mut breaker = Breaker::new(config, t0);
        assert_eq!(breaker.failure(t0), None);
        assert_eq!(breaker.failure(t0), None);
        // Failures spread over more than the window do not add up.
        let t1 = t0 + Duration::from_millis(1_500);
        assert_eq!(breaker.failure(t1), None);
        assert_eq!(breaker.failure(t1), None);
        assert_eq!(breaker.failure(t1), Some(BreakerState::Open));
        // Open: refused fast, with the time left.
        let (verdict, change) = breaker.check(t1 + Duration::from_millis(100));
        assert_eq!(verdict, Err(Duration::from_millis(400)));
        assert_eq!(change, None);
        // Time up: half-open, probes go through; one failure opens it again.
        let t2 = t1 + Duration::from_millis(500);
        assert_eq!(breaker.check(t2), (Ok(()), Some(BreakerState::HalfOpen)));
        assert_eq!(breaker.failure(t2), Some(BreakerState::Open));
        let t3 = t2 + Duration::from_millis(500);
        assert_eq!(breaker.check(t3).1, Some(BreakerState::HalfOpen));
        assert_eq!(breaker.success(), None);
        assert_eq!(breaker.success(), Some(BreakerState::Closed));
        assert_eq!(breaker.check(t3), (Ok(()), None));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
