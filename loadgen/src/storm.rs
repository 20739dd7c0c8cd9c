//! The `storm` scenario: does one agent's retry storm hurt the well-behaved ones?
//!
//! One swarm. `--agents` well-behaved agents each publish acknowledged commands at
//! `--command-rate` and all subscribe to the swarm's commands; their commands' delivery
//! latency is measured at every receiver. An observer subscribes to the swarm's alerts, where
//! the router announces circuit-breaker transitions (source agent `swarmbus-router`, key
//! `circuit-breaker`, payload `{"event":"circuit-breaker","agent":..,"state":..}`).
//! Phase 1 (baseline) runs the well-behaved agents alone; in phase 2 one more agent,
//! `storm-0`, publishes commands as fast as it can and retries every refusal (RateLimited,
//! CircuitOpen) at once, ignoring `retry_after_ms`.
//!
//! A spawned router gets [`ROUTER_CONFIG`] (unless `--router-config` replaces it): a
//! per-agent command rate low enough for the storm to hit it on a small machine, yet 50
//! times the well-behaved agents' default rate, and a breaker that cycles within seconds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use swarmbus_client::{Client, ClientError, Deliveries, PublishOptions, Session};
use swarmbus_schema::{Class, ErrorCode, Role};

use crate::probe::{self, Live, Phase, PublishPlan, SideRuntime, Stamp, Timeline, STAMP_BYTES};
use crate::spawn::{RouterArgs, RssSampler};
use crate::units::{parse_duration, parse_size};

/// The spawned router's configuration unless `--router-config` is given.
pub const ROUTER_CONFIG: &str = r#"# swarmbus-loadgen storm: the spawned router's configuration.
# Agents may publish 1,000 commands/s (burst 1,000): far above the well-behaved agents'
# 20/s, far below what the stormer attempts.
[rate_limits.roles.agent]
command = { rate_per_s = 1000.0, burst = 1000.0 }

# 100 refusals within 1 s open an agent's breaker for 1 s; 10 good probes close it again.
# A storm phase of a few seconds sees several open / half-open / closed cycles.
[rate_limits.breaker]
failures = 100
window_ms = 1000
open_ms = 1000
probes = 10
"#;

/// The misbehaving agent's id, as the router's alerts name it.
const STORMER: &str = "storm-0";
/// The publisher index stamped on the stormer's commands: outside the well-behaved agents'
/// `0..--agents`, so receivers apply and acknowledge them without tracking them.
const STORMER_PUBLISHER: u32 = u32::MAX;
/// The source agent of the router's own alerts.
const ROUTER_AGENT: &str = "swarmbus-router";
/// Breaker states kept in order of arrival for the report; more are counted only.
const STATES_LISTED_MAX: usize = 64;
const SWARM: &str = "storm";
/// How often a spawned router's resident memory is sampled.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, clap::Args)]
pub struct StormArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Well-behaved agents, each publishing commands and subscribed to all of the swarm's.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Commands per second each well-behaved agent publishes.
    #[arg(long, default_value_t = 20.0)]
    command_rate: f64,
    /// Length of each phase (baseline, then storm), e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Payload size of every command (at least the 21-byte stamp), e.g. 256B.
    #[arg(long, default_value = "256B", value_parser = parse_size)]
    payload: usize,
    /// Publishes the stormer keeps in flight, each retried at once when refused.
    #[arg(long, default_value_t = 64)]
    storm_concurrency: usize,
    /// Commands awaiting acknowledgement at most, per well-behaved agent.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Longest wait for deliveries in flight after publishing stops.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the stormer's publishing loops counted.
#[derive(Debug, Default)]
struct StormCounts {
    attempts: u64,
    accepted: u64,
    rate_limited: u64,
    circuit_open: u64,
    /// Refusals with any other code.
    refused_other: u64,
    error: Option<anyhow::Error>,
}

impl StormCounts {
    fn add(&mut self, other: StormCounts) {
        self.attempts += other.attempts;
        self.accepted += other.accepted;
        self.rate_limited += other.rate_limited;
        self.circuit_open += other.circuit_open;
        self.refused_other += other.refused_other;
        if self.error.is_none() {
            self.error = other.error;
        }
    }
}

/// Breaker transitions announced on the swarm's alert class.
#[derive(Debug, Default)]
struct Transitions {
    /// Of the stormer, in order of arrival (at most [`STATES_LISTED_MAX`]).
    states: Vec<String>,
    /// Of the stormer, per state.
    counts: BTreeMap<String, u64>,
    /// Of any other agent (the well-behaved ones should never trip).
    others: u64,
    /// Alerts that were not breaker transitions.
    other_alerts: u64,
}

// The scenario from set-up to report, in the order it runs (the crowd, the storm, the
// probes, the checks, the JSON): its phases share the run's clients and counters, and
// read best in sequence.
pub async fn run(args: StormArgs) -> anyhow::Result<()> {
    crate::report::describe("commands delivered", "publish -> delivery");
    if args.agents == 0 || args.storm_concurrency == 0 {
        bail!("--agents and --storm-concurrency must be at least 1");
    }
    if !(args.command_rate.is_finite() && args.command_rate > 0.0) {
        bail!("--command-rate must be a positive number of commands per second");
    }
    if args.payload < STAMP_BYTES {
        bail!("--payload must be at least {STAMP_BYTES} bytes (the command stamp)");
    }
    let (routers, ca, spawned) = args.router.resolve_with_config(Some(ROUTER_CONFIG)).await?;
    let router = routers.only(
        "storm takes one router: its agents all publish commands into one swarm, which \
         publishers on several routers contend for (Conflict), and the rate limits and \
         breaker under test are each router's own",
    )?;
    let connector = args
        .router
        .connector(&ca)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    let epoch = Instant::now();
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));

    let (observer, observer_deliveries) = connector
        .connect(
            router,
            Session::new("storm-observer", Role::Controller, [SWARM]),
        )
        .await
        .with_context(|| format!("connecting the alert observer to {router}"))?;
    observer
        .subscribe(SWARM, Class::Alert, Some(ROUTER_AGENT))
        .await
        .context("subscribing the observer to alerts")?;
    // Every agent subscribes before any publishes, so each must receive every command.
    let mut agents = Vec::new();
    for a in 0..args.agents {
        let session = Session::new(format!("agent-{a}"), Role::Agent, [SWARM]);
        let (client, deliveries) = connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting agent {a} to {router}"))?;
        client
            .subscribe(SWARM, Class::Command, None)
            .await
            .with_context(|| format!("subscribing agent {a}"))?;
        agents.push((client, deliveries));
    }
    // The stormer runs on a runtime of its own, so its loops cannot take more than one
    // core from the agents' receivers on a small machine.
    let storm_runtime = SideRuntime::new(1, "stormer")?;
    let stormer = {
        let connector = {
            let _inside = storm_runtime.enter();
            args.router
                .connector(&ca)
                .with_context(|| format!("TLS setup with CA {}", ca.display()))?
        };
        let (client, _deliveries) = storm_runtime
            .spawn(async move {
                connector
                    .connect(router, Session::new(STORMER, Role::Agent, [SWARM]))
                    .await
            })
            .await
            .context("stormer connect task")?
            .with_context(|| format!("connecting the stormer to {router}"))?;
        client
    };

    if !args.json {
        eprintln!(
            "storm: {} agents at {} commands/s each; {STORMER} storms in phase 2 with {} in flight; {:?} per phase",
            args.agents, args.command_rate, args.storm_concurrency, args.duration
        );
    }
    let rss = spawned
        .as_ref()
        .and_then(|router| router.pid())
        .map(|pid| RssSampler::start(pid, RSS_SAMPLE_EVERY));
    let timeline = Timeline::two_phases(epoch, args.duration);
    let progress = tokio::spawn(probe::progress_line(live.clone(), timeline, "storm", false));
    let observer_task = tokio::spawn(observe(observer_deliveries, stop.clone()));
    let mut receivers = Vec::new();
    let mut publishers = Vec::new();
    for (a, (client, deliveries)) in agents.into_iter().enumerate() {
        receivers.push(tokio::spawn(probe::receive(
            client.clone(),
            deliveries,
            args.agents,
            timeline,
            live.clone(),
            stop.clone(),
        )));
        publishers.push(tokio::spawn(probe::publish_probes(
            client,
            SWARM.to_owned(),
            PublishPlan {
                publisher: a as u32,
                class: Class::Command,
                rate: args.command_rate,
                payload_bytes: args.payload,
                window: args.window.max(1),
                timeline,
            },
            live.clone(),
        )));
    }
    let storm_tasks: Vec<_> = (0..args.storm_concurrency)
        .map(|_| storm_runtime.spawn(storm(stormer.clone(), args.payload, timeline)))
        .collect();

    let mut publisher_reports = Vec::new();
    for task in publishers {
        publisher_reports.push(task.await.context("command publisher task")?);
    }
    let mut storm = StormCounts::default();
    for task in storm_tasks {
        storm.add(task.await.context("stormer task")?);
    }
    let commands_acked: u64 = publisher_reports.iter().map(|p| p.acked.len()).sum();
    let drained = probe::drain(
        &live,
        commands_acked * args.agents as u64,
        Duration::from_millis(100),
        args.drain,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    let router_rss_max_bytes = rss.and_then(RssSampler::stop);
    let (receiver_reports, receiver_errors) = probe::join_receivers(receivers).await;
    let transitions = observer_task.await.context("alert observer task")?;
    observer.close();
    drop(stormer);
    drop(storm_runtime);

    let mut baseline = probe::latency_histogram();
    let mut stormy = probe::latency_histogram();
    let mut commands_received = 0;
    let mut command_duplicates = 0;
    let mut storm_commands_received = 0;
    for report in &receiver_reports {
        probe::merge(&mut baseline, &report.latency_us[Phase::Baseline as usize])?;
        probe::merge(&mut stormy, &report.latency_us[Phase::Disturbed as usize])?;
        commands_received += report.seen.iter().map(|s| s.len()).sum::<u64>();
        command_duplicates += report.duplicates;
        storm_commands_received += report.untracked_commands;
    }
    let mut baseline_ack = probe::latency_histogram();
    let mut storm_ack = probe::latency_histogram();
    for report in &publisher_reports {
        probe::merge(
            &mut baseline_ack,
            &report.ack_latency_us[Phase::Baseline as usize],
        )?;
        probe::merge(
            &mut storm_ack,
            &report.ack_latency_us[Phase::Disturbed as usize],
        )?;
    }
    let commands_lost = probe::commands_lost(&publisher_reports, &receiver_reports);
    let commands_sent: u64 = publisher_reports.iter().map(|p| p.sent).sum();
    let commands_refused: u64 = publisher_reports.iter().map(|p| p.refused).sum();
    let publish_errors: Vec<&anyhow::Error> = publisher_reports
        .iter()
        .filter_map(|p| p.error.as_ref())
        .chain(storm.error.as_ref())
        .collect();
    let refused = storm.rate_limited + storm.circuit_open + storm.refused_other;
    let report = serde_json::json!({
        "scenario": "storm",
        "agents": args.agents,
        "command_rate": args.command_rate,
        "duration_s": args.duration.as_secs_f64(),
        "payload_bytes": args.payload,
        "storm_concurrency": args.storm_concurrency,
        "commands_sent": commands_sent,
        "commands_acked": commands_acked,
        "commands_refused": commands_refused,
        "commands_received": commands_received,
        "commands_expected": commands_acked * args.agents as u64,
        "commands_lost": commands_lost,
        "command_duplicates": command_duplicates,
        "baseline_command_latency_us": probe::latency_json(&baseline),
        "storm_command_latency_us": probe::latency_json(&stormy),
        "p99_ratio": probe::p99_ratio(&baseline, &stormy),
        "baseline_ack_latency_us": probe::latency_json(&baseline_ack),
        "storm_ack_latency_us": probe::latency_json(&storm_ack),
        "storm_attempts": storm.attempts,
        "storm_accepted": storm.accepted,
        "storm_attempts_per_s": (storm.attempts as f64 / args.duration.as_secs_f64()).round(),
        "storm_commands_received": storm_commands_received,
        "refused": refused,
        "rate_limited": storm.rate_limited,
        "circuit_open": storm.circuit_open,
        "refused_other": storm.refused_other,
        "breaker_transitions": transitions.counts.values().sum::<u64>() + transitions.others,
        "breaker_states_seen": transitions.states,
        "breaker_transition_counts": transitions.counts,
        "breaker_transitions_other_agents": transitions.others,
        "drained": drained,
        "router_rss_max_bytes": router_rss_max_bytes,
        "publish_errors": publish_errors.len(),
        "receiver_errors": receiver_errors,
    });
    for error in &publish_errors {
        eprintln!("publisher error: {error:#}");
    }
    if transitions.other_alerts > 0 {
        eprintln!(
            "storm: {} alerts from the router were not breaker transitions",
            transitions.other_alerts
        );
    }
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    drop(spawned);
    if !publish_errors.is_empty() || receiver_errors > 0 {
        bail!(
            "{} publishers and {receiver_errors} receivers failed",
            publish_errors.len()
        );
    }
    Ok(())
}

/// One of the stormer's loops: from the start of phase 2 to the deadline, publish a command
/// and wait for the answer; on a refusal send it again at once (ignoring `retry_after_ms`,
/// which is the misbehaviour under test), else go on with the next.
async fn storm(client: Client, payload_bytes: usize, timeline: Timeline) -> StormCounts {
    tokio::time::sleep_until(timeline.disturbed_from.into()).await;
    let mut counts = StormCounts::default();
    let mut buf = BytesMut::new();
    let mut seq = 0;
    let next_payload = |buf: &mut BytesMut, seq: u64| {
        Stamp {
            publisher: STORMER_PUBLISHER,
            phase: Phase::Disturbed,
            seq,
            sent_ns: timeline.epoch.elapsed().as_nanos() as u64,
        }
        .payload(buf, payload_bytes)
    };
    let mut payload = next_payload(&mut buf, seq);
    while Instant::now() < timeline.deadline {
        counts.attempts += 1;
        let result = client
            .publish(
                SWARM,
                Class::Command,
                payload.clone(),
                PublishOptions::default(),
            )
            .await;
        match result {
            Ok(_) => {
                counts.accepted += 1;
                seq += 1;
                payload = next_payload(&mut buf, seq);
            }
            Err(ClientError::Refused { code, .. }) => {
                crate::report::refused(1);
                match ErrorCode::from_u16(code) {
                    Some(ErrorCode::RateLimited) => counts.rate_limited += 1,
                    Some(ErrorCode::CircuitOpen) => counts.circuit_open += 1,
                    _ => counts.refused_other += 1,
                }
            }
            Err(error) => {
                counts.error = Some(anyhow::Error::new(error).context("the stormer's session"));
                break;
            }
        }
    }
    counts
}

/// Collects the router's breaker alerts until `stop` is set.
async fn observe(mut deliveries: Deliveries, stop: Arc<AtomicBool>) -> Transitions {
    let mut transitions = Transitions::default();
    while !stop.load(Ordering::Relaxed) {
        let delivery =
            match tokio::time::timeout(Duration::from_millis(100), deliveries.recv()).await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => break, // connection closed
                Err(_) => continue,
            };
        let alert: Option<serde_json::Value> = (delivery.class == Class::Alert
            && delivery.source_agent == ROUTER_AGENT
            && delivery.key.as_deref() == Some("circuit-breaker"))
        .then(|| serde_json::from_slice(&delivery.payload).ok())
        .flatten();
        let Some(alert) = alert.filter(|a| a["event"] == "circuit-breaker") else {
            transitions.other_alerts += 1;
            continue;
        };
        if alert["agent"] != STORMER {
            transitions.others += 1;
            continue;
        }
        let state = alert["state"].as_str().unwrap_or("unknown").to_owned();
        if transitions.states.len() < STATES_LISTED_MAX {
            transitions.states.push(state.clone());
        }
        *transitions.counts.entry(state).or_default() += 1;
    }
    transitions
}

fn print_table(report: &serde_json::Value) {
    println!("{:<34} storm", "scenario");
    for key in [
        "agents",
        "command_rate",
        "duration_s",
        "commands_acked",
        "commands_received",
        "commands_lost",
        "p99_ratio",
        "storm_attempts",
        "storm_accepted",
        "refused",
        "rate_limited",
        "circuit_open",
        "breaker_transitions",
        "breaker_states_seen",
        "breaker_transitions_other_agents",
    ] {
        println!("{key:<34} {}", report[key]);
    }
    for key in [
        "baseline_command_latency_us",
        "storm_command_latency_us",
        "baseline_ack_latency_us",
        "storm_ack_latency_us",
    ] {
        let l = &report[key];
        println!(
            "{key:<34} p50 {}  p90 {}  p99 {}  max {}  ({} samples)",
            l["p50"], l["p90"], l["p99"], l["max"], l["samples"]
        );
    }
}
