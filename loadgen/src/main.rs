//! `swarmbus-loadgen`: capacity tests against a swarmbus router. Parses arguments and
//! runs a scenario from the library modules.

mod affinity_sim;
mod chaos;
mod cpu;
mod creds;
mod durable;
mod fanout;
mod flood;
mod forwarder;
mod handshake;
mod jobs;
mod leader;
mod presence;
mod probe;
mod reconnect;
mod report;
mod rng;
mod spawn;
mod storm;
mod units;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Capacity tests for a swarmbus router. Every figure comes from what the loadgen observed
/// on the wire.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Also write DIR/: the JSON summary, a per-second series (JSON and CSV), the latency
    /// histograms as an HdrHistogram interval log, and SVG plots (see docs/loadgen.md).
    #[arg(long, global = true, value_name = "DIR")]
    report: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One publisher per swarm sends to that swarm's agents; reports delivered/s, loss,
    /// duplicates, reordering and end-to-end latency.
    Fanout(fanout::FanoutArgs),
    /// Runs the placement library over a synthetic fleet (Zipf model popularity, one node
    /// failure, one node addition) next to round-robin, ring and rendezvous; reports cache
    /// hit rate, load spread and sessions moved. Needs no router.
    AffinitySim(affinity_sim::AffinitySimArgs),
    /// Publishers send commands and wait for acknowledgements (at most --window outstanding
    /// each); reports acked/s and ack latency, and can record every acknowledged command.
    Durable(durable::DurableArgs),
    /// Reads every swarm recorded by `durable --record` back from the router's log and
    /// compares; exits 1 on any missing, mismatched, gap or duplicate op.
    Check(durable::CheckArgs),
    /// Commands at a steady rate, alone and then under a telemetry flood from --agents
    /// sessions; reports command latency in both phases, commands lost, telemetry shed and
    /// the spawned router's peak memory.
    Flood(flood::FloodArgs),
    /// Well-behaved agents exchange commands, alone and then while one agent retries every
    /// refusal at once; reports their command latency in both phases, the stormer's
    /// refusals and the circuit-breaker transitions the router announced.
    Storm(storm::StormArgs),
    /// N clients that reconnect by themselves; the spawned router is restarted (SIGTERM,
    /// then started again); reports how long until every client was subscribed again and
    /// the peak connection attempts per 100 ms, with full jitter and without.
    Reconnect(reconnect::ReconnectArgs),
    /// Submitters submit jobs (some with repeated idempotency keys); simulated workers run
    /// them and are killed at random (then reconnect). Reports jobs/s, queue wait and
    /// end-to-end latency, lost jobs and ends handled twice (both must be 0).
    Jobs(jobs::JobsArgs),
    /// Controllers contend for one swarm's `leader` lease while holders are paused and
    /// killed at random; holders publish commands stamped with their fencing token to
    /// observers that filter them. Reports grants, overlapping validity intervals and stale
    /// commands accepted (both must be 0); exits 1 on a safety violation.
    Leader(leader::LeaderArgs),
    /// Controllers, agents, lease contenders and job workers, each through a fault proxy of
    /// its own that drops, duplicates, reorders and partitions, while agents and workers are
    /// killed and restarted; checks from what each side observed that no acknowledged
    /// command was lost, applied twice or out of order, no two lease holders overlapped, no
    /// stale command was acted on, presence holds no ghost and no job was lost or ended
    /// twice. Exits 1 on any violation (and prints the seed to replay).
    Chaos(chaos::ChaosArgs),
    /// Workers connect sessions and close them again, as fast as the router admits them;
    /// reports handshakes/s and the connect latency (with `--auth`: with credentials).
    Handshake(handshake::HandshakeArgs),
    /// Agents join one swarm and heartbeat; some are killed (frozen without a close, or
    /// closed); reports how long until watchers saw each leave (p50/p99/max) and the ghosts
    /// the router still lists (must be 0).
    Presence(presence::PresenceArgs),
    /// The bare forwarder of `fanout --ceiling` (started by the loadgen itself).
    #[command(hide = true)]
    Forwarder(forwarder::ForwarderArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // In the scenarios that measure commands beside a disturbance (flood, storm), the probes
    // (publishers and receivers whose latency is measured) run here and, like the router's
    // main threads, ask for short time slices, so the load generated on the niced side
    // runtimes does not hold them off the CPU. The throughput scenarios leave the kernel's
    // default: there the loadgen is the load, and short slices would only make it preempt
    // the router's bulk threads more often.
    let probes_first = matches!(cli.scenario, Scenario::Flood(_) | Scenario::Storm(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if probes_first {
                swarmbus_host::sched::request_short_slice(swarmbus_host::sched::SHORT_SLICE);
            }
        })
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("swarmbus-loadgen: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let report = cli.report.clone();
    let result = runtime.block_on(async {
        if let Some(dir) = &report {
            report::start(dir)?;
        }
        let result = match cli.scenario {
            Scenario::Fanout(args) => fanout::run(args).await,
            Scenario::AffinitySim(args) => affinity_sim::run(args),
            Scenario::Durable(args) => durable::run(args).await,
            Scenario::Check(args) => durable::run_check(args).await,
            Scenario::Flood(args) => flood::run(args).await,
            Scenario::Storm(args) => storm::run(args).await,
            Scenario::Reconnect(args) => reconnect::run(args).await,
            Scenario::Jobs(args) => jobs::run(args).await,
            Scenario::Leader(args) => leader::run(args).await,
            Scenario::Chaos(args) => chaos::run(args).await,
            Scenario::Presence(args) => presence::run(args).await,
            Scenario::Handshake(args) => handshake::run(args).await,
            Scenario::Forwarder(args) => forwarder::run(args).await,
        };
        // A failed run's report is written too: what it saw is what explains the failure.
        let written = report::finish();
        result.and(written)
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("swarmbus-loadgen: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
