//! `swarmbus-sim`: runs seeds of the protocol simulation; see `docs/simulation.md`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use swarmbus_sim::{run_with, Config, Stats, DEFAULT_STEPS};

/// Deterministic, seeded simulation of the swarmbus protocol machines with invariant
/// checks. A failure prints the seed and the command that replays it.
#[derive(Parser, Debug)]
#[command(name = "swarmbus-sim", version)]
struct Args {
    /// Replay this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, from `--from` on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Seeded steps per seed (a drain follows).
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: u64,
    /// Print every step (with `--seed`).
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seeds = match args.seed {
        Some(seed) => seed..seed + 1,
        None => args.from..args.from.saturating_add(args.seeds),
    };
    let started = Instant::now();
    let (mut total, mut steps, mut runs) = (Stats::default(), 0u64, 0u64);
    for seed in seeds {
        let config = Config {
            seed,
            steps: args.steps,
            trace: args.trace && args.seed.is_some(),
            ..Config::new(seed)
        };
        match run_with(&config, &mut |line| println!("{line}")) {
            Ok(report) => {
                let s = &report.stats;
                println!(
                    "seed {seed}: ok, {} steps, {} acked, {} applied, {} crashes, {} grants, {} jobs finished, trace {:016x}",
                    report.steps, s.ops_acked, s.ops_applied, s.crashes, s.lease_grants, s.jobs_finished, report.trace_hash
                );
                total.add(s);
                steps += report.steps;
                runs += 1;
            }
            Err(violation) => {
                eprintln!("{violation}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{}",
        summary(runs, steps, &total, started.elapsed().as_secs_f64())
    );
    ExitCode::SUCCESS
}

fn summary(runs: u64, steps: u64, s: &Stats, elapsed_s: f64) -> String {
    format!(
        "{{\"seeds\": {runs}, \"steps\": {steps}, \"ops_published\": {}, \"ops_acked\": {}, \"ops_applied\": {}, \
         \"duplicates_dropped\": {}, \"crashes\": {}, \"records_lost\": {}, \"lease_grants\": {}, \
         \"stamps_accepted\": {}, \"stamps_refused\": {}, \"jobs_submitted\": {}, \"jobs_finished\": {}, \
         \"jobs_dead_lettered\": {}, \"fenced_results\": {}, \"lagging\": {}, \"redeliveries\": {}, \
         \"catch_up_reads\": {}, \"elapsed_s\": {elapsed_s:.2}}}",
        s.ops_published, s.ops_acked, s.ops_applied, s.duplicates_dropped, s.crashes, s.records_lost,
        s.lease_grants, s.stamps_accepted, s.stamps_refused, s.jobs_submitted, s.jobs_finished,
        s.jobs_dead_lettered, s.fenced_results, s.lagging, s.redeliveries, s.catch_up_reads
    )
}
