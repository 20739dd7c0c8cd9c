//! The router-wide intake budget that stream readers take tokens from before they read on.

use std::time::{Duration, Instant};

use swarmbus_proto::limits::{Rate, TokenBucket};

/// A router-wide intake budget (the static one for telemetry, `router_telemetry_per_s`, or
/// the governed one for telemetry and job messages): publish-stream readers take tokens
/// before they read on, so above the budget those messages are not read at all and QUIC
/// flow control stops the senders (no CPU spent on messages that would be shed anyway). Readers take
/// tokens in batches to keep the shared lock off the per-message path. The budget may be
/// unlimited (readers only count what they read) and is changed at run time by the
/// governor ([`swarmbus_proto::governor`]).
#[derive(Debug)]
pub struct IntakeBudget {
    bucket: std::sync::Mutex<TokenBucket>,
    limited: std::sync::atomic::AtomicBool,
    /// Messages read against this budget since start (counted a batch at a time).
    taken: std::sync::atomic::AtomicU64,
}

impl IntakeBudget {
    /// Messages taken from the shared bucket at once by one reader.
    pub const BATCH: u32 = 64;

    /// A budget of `rate_per_s` messages per second, or none (`None`).
    pub fn new(rate_per_s: Option<f64>) -> Self {
        let now = Instant::now();
        IntakeBudget {
            bucket: std::sync::Mutex::new(TokenBucket::new(
                Self::rate(rate_per_s.unwrap_or(f64::from(Self::BATCH))),
                now,
            )),
            limited: std::sync::atomic::AtomicBool::new(rate_per_s.is_some()),
            taken: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn rate(rate_per_s: f64) -> Rate {
        // A burst of a tenth of a second, at least one batch.
        Rate::new(rate_per_s, (rate_per_s / 10.0).max(f64::from(Self::BATCH)))
    }

    /// Sets the budget (`None`: unlimited). Readers waiting for tokens see the new rate at
    /// their next try.
    pub fn set(&self, rate_per_s: Option<f64>) {
        if let Some(rate) = rate_per_s {
            let mut bucket = self
                .bucket
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            bucket.set_rate(Self::rate(rate), Instant::now());
        }
        self.limited
            .store(rate_per_s.is_some(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Messages read against this budget since start, in batches of [`Self::BATCH`].
    pub fn taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts one message read against a reader's `allowance`, taking another batch (and
    /// waiting for it) when the allowance is spent.
    pub async fn spend_one(&self, allowance: &mut u32) {
        if *allowance == 0 {
            self.take_batch().await;
            *allowance = Self::BATCH;
        }
        *allowance -= 1;
    }

    /// Waits until a batch of [`Self::BATCH`] messages may be read.
    pub async fn take_batch(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Counted once granted, so a reader still waiting is not counted as reading.
        let granted = || {
            self.taken.fetch_add(u64::from(Self::BATCH), Relaxed);
        };
        while self.limited.load(Relaxed) {
            let verdict = self
                .bucket
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .try_take_n(f64::from(Self::BATCH), Instant::now());
            match verdict {
                Ok(()) => return granted(),
                Err(wait) => {
                    tokio::time::sleep(
                        wait.clamp(Duration::from_millis(1), Duration::from_millis(20)),
                    )
                    .await
                }
            }
        }
        granted();
    }
}
