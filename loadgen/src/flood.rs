//! The `flood` scenario: does a telemetry flood delay commands?
//!
//! One swarm. A controller publishes acknowledged commands at `--command-rate`; receivers
//! (agents) subscribe to the swarm's commands and telemetry, so one connection carries both
//! classes. Phase 1 (baseline) runs the commands alone; phase 2 adds `--agents` sessions
//! that publish telemetry as fast as they can, fire-and-forget. The report compares command
//! latency in both phases, counts commands acknowledged but never received (must be 0) and
//! the telemetry shed on the way (published minus received, whatever dropped it), and
//! samples a spawned router's resident memory.
//!
//! The flooders run on a runtime of their own (`--flood-threads` worker threads, one by
//! default) and yield between batches: on a small machine they would otherwise take every
//! core from the loadgen's own receivers, and the latency measured would be the loadgen's.
//! With `--flood-listener bulk` they connect to the router's bulk listener instead of its
//! main one (the controller and the receivers stay on the main one).
//!
//! With several routers (`--router A,B,C`) the receivers and the flooders spread over them
//! in turn and the controller connects to the first, so one router takes every command;
//! `--flood-listener bulk` with `--flood-router` takes one router.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use swarmbus_client::{Client, Session};
use swarmbus_schema::{Class, Publish, Role};

use crate::probe::{self, Live, PublishPlan, SideRuntime, Timeline, STAMP_BYTES};
use crate::spawn::{RouterArgs, Routers, RssSampler};
use crate::units::{parse_duration, parse_size};

/// How often the spawned router's resident memory is sampled.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// The ordered class the probe messages go on: command (default) or control.
    #[arg(long, default_value = "command", value_parser = parse_ordered_class)]
    class: Class,
    /// Flooding agents in phase 2, each its own session publishing telemetry as fast as it
    /// can.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Commands per second the controller publishes, in both phases.
    #[arg(long, default_value_t = 1000.0)]
    command_rate: f64,
    /// Length of each phase (baseline, then flood), e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Command receivers, each subscribed to the swarm's commands and telemetry.
    #[arg(long, default_value_t = 1)]
    receivers: usize,
    /// Payload size of commands and telemetry (commands carry a 21-byte stamp), e.g. 256B.
    #[arg(long, default_value = "256B", value_parser = parse_size)]
    payload: usize,
    /// Telemetry messages each flooder queues per write before it yields.
    #[arg(long, default_value_t = 64)]
    flood_batch: usize,
    /// Worker threads of the flooders' own runtime.
    #[arg(long, default_value_t = 1)]
    flood_threads: usize,
    /// Where the flooders connect: the router's main listener (`main`); its bulk listener
    /// (`bulk`; with --spawn-router one is opened on the spawned router); or the main
    /// listener of a router with a bulk listener (`attach`; opened on a spawned router), so
    /// that every session attaches a bulk connection for its telemetry by itself.
    #[arg(long, default_value = "main", value_parser = ["main", "bulk", "attach"])]
    flood_listener: String,
    /// The bulk listener's address, HOST:PORT, for --flood-listener bulk with --router
    /// (one router).
    #[arg(long, value_name = "HOST:PORT")]
    flood_router: Option<String>,
    /// Commands awaiting acknowledgement at most.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Longest wait for deliveries in flight after publishing stops (the router may hold a
    /// large telemetry backlog by then).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain: Duration,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

const SWARM: &str = "flood";

// The scenario from set-up to report, in the order it runs (routers, the flood, the
// probes, the checks, the JSON): its phases share the run's clients and counters, and
// read best in sequence.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    crate::report::describe("commands delivered", "publish -> delivery");
    if args.agents == 0 || args.receivers == 0 || args.flood_batch == 0 || args.flood_threads == 0 {
        bail!("--agents, --receivers, --flood-batch and --flood-threads must be at least 1");
    }
    if !(args.command_rate.is_finite() && args.command_rate > 0.0) {
        bail!("--command-rate must be a positive number of commands per second");
    }
    if args.payload < STAMP_BYTES {
        bail!("--payload must be at least {STAMP_BYTES} bytes (the command stamp)");
    }
    let bulk_listener = args.flood_listener == "bulk";
    let attach = args.flood_listener == "attach";
    // `flood_routers`: where the flooders connect, flooder i to `flood_routers.pick(i)`.
    let (routers, flood_routers, ca, spawned) = if (bulk_listener || attach) && args.router.spawns()
    {
        let (routers, bulk, ca, spawned) = args.router.resolve_with_bulk_listener().await?;
        let flood_routers = if attach {
            routers.clone()
        } else {
            Routers::one(bulk)
        };
        (routers, flood_routers, ca, Some(spawned))
    } else {
        let (routers, ca, spawned) = args.router.resolve().await?;
        let flood_routers = match (bulk_listener, &args.flood_router) {
            (false, _) => routers.clone(),
            (true, Some(addr)) => {
                // --flood-router names one router's bulk listener: the flooders would
                // all go to that router while the receivers spread.
                routers.only(
                    "--flood-listener bulk takes one router (--flood-router is one \
                         router's bulk listener)",
                )?;
                Routers::one(
                    tokio::net::lookup_host(addr.as_str())
                        .await
                        .with_context(|| format!("resolving {addr}"))?
                        .next()
                        .with_context(|| format!("{addr} resolves to no address"))?,
                )
            }
            (true, None) => {
                bail!("--flood-listener bulk with --router needs --flood-router (the bulk listener's address)")
            }
        };
        (routers, flood_routers, ca, spawned)
    };
    let connector = args
        .router
        .connector(&ca)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    let cpu = crate::cpu::CpuMeter::start(args.router.measured_pid(spawned.as_ref()), "router");
    let epoch = Instant::now();
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));

    // Receivers first, so every command published afterwards reaches them. When the router
    // offers bulk connections, theirs (the telemetry) are driven on a runtime of lower
    // priority, as an agent that cares for its commands first would set it up.
    let receiver_bulk_runtime = SideRuntime::new(1, "receiver-bulk")?;
    let receiver_connector = {
        let _inside = receiver_bulk_runtime.enter();
        let bulk = args
            .router
            .connector(&ca)
            .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
        connector.clone().with_bulk_connector(&bulk)
    };
    let mut receiver_sessions = Vec::new();
    for r in 0..args.receivers {
        let router = routers.pick(r);
        let session = Session::new(format!("flood-receiver-{r}"), Role::Agent, [SWARM]);
        let (client, deliveries) = receiver_connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting receiver {r} to {router}"))?;
        for class in [args.class, Class::Telemetry] {
            client
                .subscribe(SWARM, class, None)
                .await
                .with_context(|| format!("subscribing receiver {r} to {class}"))?;
        }
        receiver_sessions.push((client, deliveries));
    }
    // One controller, on the first router: the swarm's commands all come in there, so
    // several routers never contend for its op ids.
    let router = routers.first();
    let (controller, _controller_deliveries) = connector
        .connect(
            router,
            Session::new("flood-controller", Role::Controller, [SWARM]),
        )
        .await
        .with_context(|| format!("connecting the controller to {router}"))?;

    // The flooders connect before the baseline starts (connecting 200 sessions is load
    // too), on their own runtime, and wait for phase 2.
    let flood_runtime = SideRuntime::new(args.flood_threads, "flooder")?;
    let flood_connector = {
        // The endpoint's I/O driver runs on the runtime it is made in.
        let _inside = flood_runtime.enter();
        args.router
            .connector(&ca)
            .with_context(|| format!("TLS setup with CA {}", ca.display()))?
    };
    let mut flooders = Vec::new();
    for a in 0..args.agents {
        let connector = flood_connector.clone();
        let flood_router = flood_routers.pick(a);
        let session = Session::new(format!("flood-agent-{a}"), Role::Agent, [SWARM]);
        let (client, _deliveries) = flood_runtime
            .spawn(async move { connector.connect(flood_router, session).await })
            .await
            .context("flooder connect task")?
            .with_context(|| format!("connecting flooder {a} to {flood_router}"))?;
        flooders.push(client);
    }

    // Sessions that attached a bulk connection (the router offers one when it has a bulk
    // listener and the session came in on the main one).
    let bulk_connections = receiver_sessions
        .iter()
        .map(|(client, _)| client)
        .chain(&flooders)
        .chain([&controller])
        .filter(|client| client.has_bulk_connection())
        .count();
    if !args.json {
        eprintln!(
            "flood: {} commands/s to {} receivers; {} telemetry flooders in phase 2; {} B payloads; {:?} per phase",
            args.command_rate, args.receivers, args.agents, args.payload, args.duration
        );
    }
    let rss = spawned
        .as_ref()
        .and_then(|router| router.pid())
        .map(|pid| RssSampler::start(pid, RSS_SAMPLE_EVERY));
    let timeline = Timeline::two_phases(epoch, args.duration);
    let progress = tokio::spawn(probe::progress_line(live.clone(), timeline, "flood", true));
    let receivers: Vec<_> = receiver_sessions
        .into_iter()
        .map(|(client, deliveries)| {
            tokio::spawn(probe::receive(
                client,
                deliveries,
                1,
                timeline,
                live.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let publisher = tokio::spawn(probe::publish_probes(
        controller.clone(),
        SWARM.to_owned(),
        PublishPlan {
            publisher: 0,
            class: args.class,
            rate: args.command_rate,
            payload_bytes: args.payload,
            window: args.window.max(1),
            timeline,
        },
        live.clone(),
    ));
    let telemetry_payload = Bytes::from(vec![0xA5; args.payload]);
    let flood_tasks: Vec<_> = flooders
        .into_iter()
        .map(|client| {
            flood_runtime.spawn(flood(
                client,
                telemetry_payload.clone(),
                args.flood_batch,
                args.receivers as u64,
                timeline,
                live.clone(),
            ))
        })
        .collect();

    let publisher = publisher.await.context("command publisher task")?;
    let mut telemetry_sent = 0;
    let mut flood_errors = Vec::new();
    // Flooders stay connected until the drain is over: closing a connection discards the
    // frames still queued in it, which would count as shed.
    let mut flooder_clients = Vec::new();
    for task in flood_tasks {
        let (client, sent, error) = task.await.context("flooder task")?;
        telemetry_sent += sent;
        flood_errors.extend(error);
        flooder_clients.push(client);
    }
    let receivers_count = args.receivers as u64;
    let drained = probe::drain(
        &live,
        publisher.acked.len() * receivers_count,
        Duration::from_millis(300),
        args.drain,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    let router_rss_max_bytes = rss.and_then(RssSampler::stop);

    let (receiver_reports, receiver_errors) = probe::join_receivers(receivers).await;
    drop(flooder_clients);
    drop(controller);
    drop(flood_runtime);
    drop(receiver_bulk_runtime);

    let mut idle = probe::latency_histogram();
    let mut flooded = probe::latency_histogram();
    let mut commands_received = 0;
    let mut command_duplicates = 0;
    let mut telemetry_received = 0;
    let mut last_telemetry = None;
    let mut last_delivery = None;
    for report in &receiver_reports {
        last_telemetry = last_telemetry.max(report.last_telemetry);
        last_delivery = last_delivery.max(report.last_delivery);
        probe::merge(&mut idle, &report.latency_us[0])?;
        probe::merge(&mut flooded, &report.latency_us[1])?;
        commands_received += report.seen.iter().map(|s| s.len()).sum::<u64>();
        command_duplicates += report.duplicates;
        telemetry_received += report.telemetry;
    }
    let commands_acked = publisher.acked.len();
    let commands_lost = probe::commands_lost(std::slice::from_ref(&publisher), &receiver_reports);
    let telemetry_expected = telemetry_sent * receivers_count;
    // Signed: more received than published would be a counting bug, and must show.
    let telemetry_shed = telemetry_expected as i64 - telemetry_received as i64;
    // Telemetry reaches the receivers from the start of the flood until the router has
    // worked off its backlog, which may be well after the flood stopped.
    let telemetry_seconds = last_telemetry
        .map(|at| at.saturating_duration_since(timeline.disturbed_from))
        .unwrap_or_default()
        .max(args.duration)
        .as_secs_f64();
    let drain_s = last_delivery
        .map(|at| {
            at.saturating_duration_since(timeline.deadline)
                .as_secs_f64()
        })
        .unwrap_or_default();
    let report = serde_json::json!({
        "scenario": "flood",
        "flood_listener": args.flood_listener,
        "bulk_connections": bulk_connections,
        "agents": args.agents,
        "receivers": args.receivers,
        "command_rate": args.command_rate,
        "class": args.class.to_string(),
        "duration_s": args.duration.as_secs_f64(),
        "drain_s": (drain_s * 1000.0).round() / 1000.0,
        "drained": drained,
        "payload_bytes": args.payload,
        "flood_batch": args.flood_batch,
        "flood_threads": args.flood_threads,
        "commands_sent": publisher.sent,
        "commands_acked": commands_acked,
        "commands_refused": publisher.refused,
        "commands_received": commands_received,
        "commands_expected": commands_acked * receivers_count,
        "commands_lost": commands_lost,
        "command_duplicates": command_duplicates,
        "idle_command_latency_us": probe::latency_json(&idle),
        "flood_command_latency_us": probe::latency_json(&flooded),
        "p99_ratio": probe::p99_ratio(&idle, &flooded),
        "idle_ack_latency_us": probe::latency_json(&publisher.ack_latency_us[0]),
        "flood_ack_latency_us": probe::latency_json(&publisher.ack_latency_us[1]),
        "telemetry_sent": telemetry_sent,
        "telemetry_expected": telemetry_expected,
        "telemetry_received": telemetry_received,
        "telemetry_shed": telemetry_shed,
        "telemetry_sent_per_s": (telemetry_sent as f64 / args.duration.as_secs_f64()).round(),
        "telemetry_received_per_s": (telemetry_received as f64 / telemetry_seconds).round(),
        "router_rss_max_bytes": router_rss_max_bytes,
        "publish_errors": usize::from(publisher.error.is_some()) + flood_errors.len(),
        "receiver_errors": receiver_errors,
        "cpu": cpu.report(),
    });
    for error in publisher.error.iter().chain(&flood_errors) {
        eprintln!("publisher error: {error:#}");
    }
    crate::report::summary(&report);
    crate::cpu::warn_if_loadgen_bound(&report["cpu"]);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    drop(spawned);
    if publisher.error.is_some() || !flood_errors.is_empty() || receiver_errors > 0 {
        bail!(
            "{} publishers and {receiver_errors} receivers failed",
            usize::from(publisher.error.is_some()) + flood_errors.len()
        );
    }
    Ok(())
}

/// Publishes telemetry from the start of phase 2 until the deadline, `batch` messages per
/// write, yielding between writes. Returns the client (kept open until the drain is over),
/// the messages handed to the client's stream writer, and the error that stopped it early.
async fn flood(
    client: Client,
    payload: Bytes,
    batch: usize,
    receivers: u64,
    timeline: Timeline,
    live: Arc<Live>,
) -> (Client, u64, Option<anyhow::Error>) {
    tokio::time::sleep_until(timeline.disturbed_from.into()).await;
    let mut sent = 0;
    while Instant::now() < timeline.deadline {
        let messages = (0..batch).map(|_| Publish {
            request_id: 0,
            swarm: SWARM.to_owned(),
            class: Class::Telemetry,
            target_agent: None,
            key: None,
            payload: payload.clone(),
            fencing_token: 0,
            lease: None,
        });
        match client.publish_batch(Class::Telemetry, messages).await {
            Ok(count) => {
                sent += count as u64;
                live.telemetry_sent
                    .fetch_add(count as u64, Ordering::Relaxed);
                crate::report::offered(count as u64 * receivers);
            }
            Err(error) => return (client, sent, Some(error.into())),
        }
        tokio::task::yield_now().await;
    }
    (client, sent, None)
}

fn print_table(report: &serde_json::Value) {
    println!("{:<26} flood", "scenario");
    for key in [
        "agents",
        "receivers",
        "command_rate",
        "duration_s",
        "commands_sent",
        "commands_acked",
        "commands_received",
        "commands_lost",
        "p99_ratio",
        "telemetry_sent",
        "telemetry_received",
        "telemetry_shed",
        "telemetry_received_per_s",
        "drain_s",
        "drained",
        "router_rss_max_bytes",
    ] {
        println!("{key:<26} {}", report[key]);
    }
    for key in [
        "idle_command_latency_us",
        "flood_command_latency_us",
        "idle_ack_latency_us",
        "flood_ack_latency_us",
    ] {
        let l = &report[key];
        println!(
            "{key:<26} p50 {}  p90 {}  p99 {}  max {}  ({} samples)",
            l["p50"], l["p90"], l["p99"], l["max"], l["samples"]
        );
    }
}

fn parse_ordered_class(text: &str) -> Result<Class, String> {
    let class = text.parse::<Class>().map_err(|e| e.to_string())?;
    if class.is_ordered() {
        Ok(class)
    } else {
        Err(format!("{class} is not ordered: use command or control"))
    }
}
