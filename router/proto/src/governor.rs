//! The governor: while control or commands flow, the router reads bulk traffic (telemetry,
//! and job submits, results and progress) only as fast as the host can take it with CPU to
//! spare.
//!
//! Priorities inside the router (streams, lanes, the bulk runtime's lower scheduling
//! priority) decide who goes first, but they cannot give back the CPU that a telemetry
//! flood or a draining job backlog takes in the kernel (packet receive, acknowledgements,
//! disk completions) and in the bulk threads once the host's cores are saturated: command
//! latency then follows the bulk load. The governor closes that loop. Every `interval_ms`
//! it samples the host's idle CPU time; while ordered traffic (control or command
//! publishes) was seen within `ordered_quiet_ms` and the idle share is below
//! `cpu_idle_reserve`, it sets the router-wide budget for bulk messages to a fifth less than
//! the lower of the budget and the intake it measured (multiplicative decrease), and raises it by a twentieth per
//! interval while there is headroom. Readers over the budget stop reading, so QUIC flow
//! control holds the senders back before the router spends anything on their messages.
//! With no ordered traffic the budget is lifted. `rate_limits.router_telemetry_per_s`, a
//! static budget for telemetry alone, applies besides.
//!
//! The decision ([`Governor::step`]) is a pure function of its samples, tested with
//! injected values; the router's `HostCpu` reads `/proc/stat` (Linux; elsewhere the governor stays
//! idle and says so at start).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[governor]` in the router's configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GovernorConfig {
    /// Off: bulk intake is bounded by `rate_limits.router_telemetry_per_s` (telemetry) only.
    pub enabled: bool,
    /// Share of the host's CPU time (all cores together, 0 to 1) kept idle while ordered
    /// traffic flows; 1 holds bulk intake at `min_per_s` whenever commands flow.
    pub cpu_idle_reserve: f64,
    /// The governor never sets the budget below this many bulk messages per second.
    pub min_per_s: f64,
    /// How often it samples and decides.
    pub interval_ms: u64,
    /// How long after the last control or command publish it keeps governing.
    pub ordered_quiet_ms: u64,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig {
            enabled: true,
            cpu_idle_reserve: 0.25,
            min_per_s: 10_000.0,
            interval_ms: 100,
            ordered_quiet_ms: 1_000,
        }
    }
}

impl GovernorConfig {
    /// Why this configuration is invalid, if it is.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.cpu_idle_reserve) {
            return Err("governor.cpu_idle_reserve must be from 0 to 1".into());
        }
        // A floor of ten batches a second: a stream waits at most a tenth of a second per
        // batch, far inside a lease's visibility timeout.
        if !(640.0..UNLIMITED_ABOVE).contains(&self.min_per_s) {
            return Err("governor.min_per_s must be at least 640 and below 100000000".into());
        }
        // /proc/stat counts in clock ticks (10 ms): shorter intervals see too few of them.
        if !(50..=10_000).contains(&self.interval_ms) {
            return Err("governor.interval_ms must be from 50 to 10000".into());
        }
        if self.ordered_quiet_ms < self.interval_ms {
            return Err("governor.ordered_quiet_ms must be at least governor.interval_ms".into());
        }
        Ok(())
    }
}

/// Below the measured intake by this factor when the host has too little idle CPU.
const DECREASE: f64 = 0.8;
/// Up by this factor per interval while the host has headroom.
const INCREASE: f64 = 1.05;

/// What the governor sees at one tick.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub now: Instant,
    /// Share of the host's CPU time idle since the last sample (0 to 1), if known.
    pub idle: Option<f64>,
    /// Control and command publishes accepted since start.
    pub ordered: u64,
    /// Bulk messages (telemetry and job messages) read since start.
    pub intake: u64,
}

/// The governor's state between ticks.
#[derive(Debug)]
pub struct Governor {
    config: GovernorConfig,
    /// The budget now (None: unlimited).
    rate: Option<f64>,
    last: Option<Sample>,
    last_ordered_at: Option<Instant>,
    cuts: u64,
}

impl Governor {
    pub fn new(config: GovernorConfig) -> Self {
        Governor {
            config,
            rate: None,
            last: None,
            last_ordered_at: None,
            cuts: 0,
        }
    }

    /// The budget now, messages per second (None: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// How often the governor has cut the budget.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// Takes one sample and returns the budget to apply (None: unlimited).
    pub fn step(&mut self, sample: Sample) -> Option<f64> {
        let Some(last) = self.last.replace(sample) else {
            return self.rate;
        };
        if sample.ordered != last.ordered {
            self.last_ordered_at = Some(sample.now);
        }
        let quiet = Duration::from_millis(self.config.ordered_quiet_ms);
        let governing = self.config.enabled
            && self
                .last_ordered_at
                .is_some_and(|at| sample.now.saturating_duration_since(at) < quiet);
        if !governing {
            self.rate = None;
            return self.rate;
        }
        // No idle figure this tick (no clock tick of CPU time passed): keep the budget.
        let Some(idle) = sample.idle else {
            return self.rate;
        };
        let seconds = sample.now.saturating_duration_since(last.now).as_secs_f64();
        if seconds <= 0.0 {
            return self.rate;
        }
        if idle < self.config.cpu_idle_reserve || self.config.cpu_idle_reserve >= 1.0 {
            let intake = sample.intake.saturating_sub(last.intake) as f64 / seconds;
            let from = self.rate.map_or(intake, |rate| rate.min(intake));
            self.rate = Some((from * DECREASE).max(self.config.min_per_s));
            self.cuts += 1;
        } else if let Some(rate) = self.rate {
            // Far past any intake a host reaches, the budget is no budget: lifted.
            let raised = rate * INCREASE;
            self.rate = (raised < UNLIMITED_ABOVE).then_some(raised);
        }
        self.rate
    }
}

/// A governed budget this high no longer limits anything on any host.
const UNLIMITED_ABOVE: f64 = 100_000_000.0;

#[cfg(test)]
mod tests {
    use super::*;

    struct Clock {
        start: Instant,
        ms: u64,
        ordered: u64,
        intake: u64,
    }

    impl Clock {
        fn new() -> Self {
            Clock {
                start: Instant::now(),
                ms: 0,
                ordered: 0,
                intake: 0,
            }
        }

        /// One 100 ms tick with the given idle share, bulk messages read per second, and
        /// whether a command was published during it.
        fn tick(&mut self, idle: f64, intake_per_s: u64, command: bool) -> Sample {
            self.ms += 100;
            self.intake += intake_per_s / 10;
            self.ordered += u64::from(command);
            Sample {
                now: self.start + Duration::from_millis(self.ms),
                idle: Some(idle),
                ordered: self.ordered,
                intake: self.intake,
            }
        }
    }

    #[test]
    fn without_ordered_traffic_bulk_intake_is_not_governed() {
        let mut governor = Governor::new(GovernorConfig::default());
        let mut clock = Clock::new();
        for _ in 0..20 {
            assert_eq!(governor.step(clock.tick(0.0, 300_000, false)), None);
        }
        assert_eq!(governor.cuts(), 0);
    }

    #[test]
    fn a_saturated_host_cuts_the_intake_below_what_was_read() {
        let mut governor = Governor::new(GovernorConfig::default());
        let mut clock = Clock::new();
        governor.step(clock.tick(0.9, 0, true));
        // Commands flow and the host has 5% idle: cut to 80% of the 200k/s just read.
        let rate = governor.step(clock.tick(0.05, 200_000, true)).unwrap();
        assert!((rate - 160_000.0).abs() < 1.0, "{rate}");
        // Still saturated at the new intake: cut again, from the lower of budget and intake.
        let rate = governor.step(clock.tick(0.1, 150_000, true)).unwrap();
        assert!((rate - 120_000.0).abs() < 1.0, "{rate}");
        assert_eq!(governor.cuts(), 2);
        // Never below the floor.
        for _ in 0..50 {
            governor.step(clock.tick(0.0, 0, true));
        }
        assert_eq!(governor.rate(), Some(10_000.0));
    }

    #[test]
    fn headroom_raises_the_budget_until_it_no_longer_limits() {
        let mut governor = Governor::new(GovernorConfig::default());
        let mut clock = Clock::new();
        governor.step(clock.tick(0.9, 0, true));
        let cut = governor.step(clock.tick(0.0, 100_000, true)).unwrap();
        let raised = governor.step(clock.tick(0.5, 80_000, true)).unwrap();
        assert!((raised - cut * INCREASE).abs() < 1e-6, "{cut} -> {raised}");
        // Commands keep flowing with headroom: the budget grows back to unlimited.
        let mut ticks = 0;
        while governor.step(clock.tick(0.5, 80_000, true)).is_some() {
            ticks += 1;
            assert!(ticks < 1_000, "the budget never went back to unlimited");
        }
    }

    #[test]
    fn the_budget_is_released_once_commands_stop() {
        let config = GovernorConfig::default();
        let quiet_ticks = config.ordered_quiet_ms / 100;
        let mut governor = Governor::new(config);
        let mut clock = Clock::new();
        governor.step(clock.tick(0.9, 0, true));
        assert!(governor.step(clock.tick(0.0, 100_000, true)).is_some());
        // No command for less than ordered_quiet_ms: still governed (and cut: no idle).
        for _ in 0..quiet_ticks - 1 {
            assert!(governor.step(clock.tick(0.0, 100_000, false)).is_some());
        }
        assert_eq!(governor.step(clock.tick(0.0, 100_000, false)), None);
    }

    #[test]
    fn unknown_idle_keeps_the_budget_and_a_disabled_governor_lifts_it() {
        let mut governor = Governor::new(GovernorConfig::default());
        let mut clock = Clock::new();
        governor.step(clock.tick(0.9, 0, true));
        assert!(governor.step(clock.tick(0.0, 50_000, true)).is_some());
        let governed = governor.rate();
        assert!(governed.is_some());
        // An unknown idle share while commands flow keeps the budget as it is.
        let mut sample = clock.tick(0.0, 50_000, true);
        sample.idle = None;
        assert_eq!(governor.step(sample), governed);
        let disabled = GovernorConfig {
            enabled: false,
            ..GovernorConfig::default()
        };
        let mut off = Governor::new(disabled);
        for _ in 0..10 {
            assert_eq!(off.step(clock.tick(0.0, 200_000, true)), None);
        }
        assert_eq!(off.cuts(), 0);
    }

    #[test]
    fn configuration_is_checked() {
        GovernorConfig::default().check().unwrap();
        for bad in [
            GovernorConfig {
                cpu_idle_reserve: 1.5,
                ..GovernorConfig::default()
            },
            GovernorConfig {
                min_per_s: 0.0,
                ..GovernorConfig::default()
            },
            GovernorConfig {
                interval_ms: 1,
                ..GovernorConfig::default()
            },
            GovernorConfig {
                interval_ms: 20,
                ..GovernorConfig::default()
            },
            GovernorConfig {
                min_per_s: 100.0,
                ..GovernorConfig::default()
            },
            GovernorConfig {
                ordered_quiet_ms: 50,
                ..GovernorConfig::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
