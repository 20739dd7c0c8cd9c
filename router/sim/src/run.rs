//! Running seeds: the configuration of a run, what it reports, and the failure report
//! that names the seed, the step and the command that replays it.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::world::World;

/// Steps per seed unless told otherwise.
pub const DEFAULT_STEPS: u64 = 2_000;

/// A fault that only the checker's own tests inject, to show that the checks can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// At every crash, the newest durable record of a swarm vanishes (a disk that lied
    /// about a sync).
    LoseDurableRecord,
    /// The router lets stamped publishes pass without checking their fencing token.
    SkipStampCheck,
}

/// One run.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Seeded steps before the drain.
    pub steps: u64,
    /// Hand every trace line to the caller (`--trace`).
    pub trace: bool,
    pub fault: Option<Fault>,
}

impl Config {
    pub fn new(seed: u64) -> Self {
        Config {
            seed,
            steps: DEFAULT_STEPS,
            trace: false,
            fault: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ops_published: u64,
    pub ops_acked: u64,
    pub ops_applied: u64,
    pub duplicates_dropped: u64,
    pub telemetry_delivered: u64,
    pub crashes: u64,
    pub records_lost: u64,
    pub lease_grants: u64,
    pub stamps_accepted: u64,
    pub stamps_refused: u64,
    pub jobs_submitted: u64,
    pub jobs_finished: u64,
    pub jobs_dead_lettered: u64,
    pub fenced_results: u64,
    pub lagging: u64,
    pub redeliveries: u64,
    pub catch_up_reads: u64,
}

impl Stats {
    /// Adds another run's figures (a summary of many seeds).
    pub fn add(&mut self, other: &Stats) {
        let pairs = [
            (&mut self.ops_published, other.ops_published),
            (&mut self.ops_acked, other.ops_acked),
            (&mut self.ops_applied, other.ops_applied),
            (&mut self.duplicates_dropped, other.duplicates_dropped),
            (&mut self.telemetry_delivered, other.telemetry_delivered),
            (&mut self.crashes, other.crashes),
            (&mut self.records_lost, other.records_lost),
            (&mut self.lease_grants, other.lease_grants),
            (&mut self.stamps_accepted, other.stamps_accepted),
            (&mut self.stamps_refused, other.stamps_refused),
            (&mut self.jobs_submitted, other.jobs_submitted),
            (&mut self.jobs_finished, other.jobs_finished),
            (&mut self.jobs_dead_lettered, other.jobs_dead_lettered),
            (&mut self.fenced_results, other.fenced_results),
            (&mut self.lagging, other.lagging),
            (&mut self.redeliveries, other.redeliveries),
            (&mut self.catch_up_reads, other.catch_up_reads),
        ];
        for (total, more) in pairs {
            *total += more;
        }
    }
}

/// A run that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    /// Steps taken, the drain's included.
    pub steps: u64,
    pub stats: Stats,
    /// A fingerprint of the whole trace: equal for two runs of one seed.
    pub trace_hash: u64,
}

/// A check that failed: the seed and step, the invariant, and the last steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub steps: u64,
    pub step: u64,
    pub invariant: String,
    pub detail: String,
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invariant violated: {}", self.invariant)?;
        writeln!(
            f,
            "  seed {} step {}: {}",
            self.seed, self.step, self.detail
        )?;
        let steps = if self.steps == DEFAULT_STEPS {
            String::new()
        } else {
            format!(" --steps {}", self.steps)
        };
        writeln!(
            f,
            "  replay: cargo run -p swarmbus-sim --release -- --seed {}{steps} --trace",
            self.seed
        )?;
        writeln!(f, "  last steps:")?;
        for line in &self.trace {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Runs one seed.
pub fn run(config: &Config) -> Result<Report, Violation> {
    run_with(config, &mut |_| {})
}

/// Runs one seed, handing each trace line to `on_line` when `config.trace` is set. A
/// panic inside the machines is reported as a violation of its own, with the seed.
pub fn run_with(config: &Config, on_line: &mut dyn FnMut(&str)) -> Result<Report, Violation> {
    let mut world = World::new(config);
    let fail = |world: &World, invariant: String, detail: String| Violation {
        seed: config.seed,
        steps: config.steps,
        step: world.step,
        invariant,
        detail,
        trace: world.trace.tail(),
    };
    for _ in 0..config.steps {
        let outcome = catch_unwind(AssertUnwindSafe(|| world.step()));
        for line in world.trace.take_new() {
            on_line(&line);
        }
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(broken)) => {
                return Err(fail(&world, broken.invariant.to_owned(), broken.detail))
            }
            Err(panic) => {
                return Err(fail(
                    &world,
                    "the machines do not panic".into(),
                    panic_text(&panic),
                ))
            }
        }
    }
    let drained = catch_unwind(AssertUnwindSafe(|| world.drain()));
    for line in world.trace.take_new() {
        on_line(&line);
    }
    match drained {
        Ok(Ok(())) => Ok(world.report()),
        Ok(Err(broken)) => Err(fail(&world, broken.invariant.to_owned(), broken.detail)),
        Err(panic) => Err(fail(
            &world,
            "the machines do not panic".into(),
            panic_text(&panic),
        )),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic".to_owned())
}
