//! The one time type of the protocol.

use std::ops::Add;
use std::time::{Duration, Instant};

/// The current time, passed in by the runtime with every call that needs it: the state
/// machines never read a clock. `instant` measures intervals (rate limits, ack timeouts,
/// request deadlines); `unix_ms` is the router clock's reading (Unix milliseconds that never
/// go backwards, also across restarts), which is what the router stores in its records and
/// compares with stored times (lease and stop expiries, job deadlines, last-seen).
///
/// Where a machine only stores or compares router-clock times, it takes `unix_ms` alone
/// (`now_ms: u64`); that is the same reading, not another clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
    /// The host's wall clock at this reading, Unix microseconds: stamped on deliveries for
    /// measuring publish -> apply across processes, never stored as a time the router
    /// compares (those are `unix_ms`, the router's clock).
    pub wall_us: u64,
}

/// Later by `elapsed` on both readings (tests step time this way).
impl Add<Duration> for Now {
    type Output = Now;
    fn add(self, elapsed: Duration) -> Now {
        Now {
            instant: self.instant + elapsed,
            unix_ms: self.unix_ms + elapsed.as_millis() as u64,
            wall_us: self.wall_us + elapsed.as_micros() as u64,
        }
    }
}
