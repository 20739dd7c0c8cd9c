//! The `fanout` scenario: one publisher per swarm, N agents per swarm subscribed to it.
//!
//! Each payload starts with the publisher's sequence number and its send time (nanoseconds
//! since the loadgen started; publishers and agents share that clock, as they run in one
//! process). Agents record end-to-end latency in an hdrhistogram and count what arrived
//! twice or out of order; for ordered classes they count after the client's idempotent-apply
//! helper, as an application would see it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use swarmbus_client::{Client, Deliveries, IdempotentApply, PublishOptions, Session};
use swarmbus_schema::{Class, Publish, Role};

use crate::spawn::{RouterArgs, Routers};
use crate::units::{parse_duration, parse_size};

/// Bytes of the sequence number and send time at the start of every payload.
const STAMP_BYTES: usize = 16;

#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Swarms, each with one publisher.
    #[arg(long, default_value_t = 10)]
    swarms: usize,
    /// Subscribing agents per swarm.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Payload size (at least 16 bytes: sequence number and send time), e.g. 256B, 4KiB.
    #[arg(long, default_value = "256B", value_parser = parse_size)]
    payload: usize,
    /// Messages per second per swarm; 0 = as fast as flow control allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long publishers publish, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Message class: telemetry, command, control, alert or reconciliation.
    #[arg(long, default_value = "telemetry")]
    class: Class,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
    /// Unacknowledged frames per write when publishing unordered classes at --rate 0.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Ordered-class publishes awaiting acknowledgement per publisher.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Longest wait for in-flight deliveries after publishing stops.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Run the same clients, shape and payload through a bare forwarder instead of a
    /// router (a child process that writes each publish to its swarm's subscribers with
    /// quinn and nothing else): the transport's ceiling, to read the router's figures
    /// against. Telemetry only.
    #[arg(long, conflicts_with_all = ["spawn_router", "router", "ca", "router_pid", "creds"])]
    ceiling: bool,
}

/// Counters shared with the progress line.
#[derive(Debug, Default)]
struct Live {
    sent: AtomicU64,
    delivered: AtomicU64,
}

#[derive(Debug)]
struct AgentResult {
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    /// Ordered deliveries the idempotent-apply helper dropped as already applied.
    apply_dropped: u64,
    /// Op ids skipped between consecutive applied ops (ordered classes).
    op_gaps: u64,
    latency_us: Histogram<u64>,
    last_delivery: Option<Instant>,
}

fn stamp(buf: &mut BytesMut, seq: u64, epoch: Instant, size: usize) -> Bytes {
    buf.reserve(size);
    buf.put_u64_le(seq);
    buf.put_u64_le(epoch.elapsed().as_nanos() as u64);
    buf.put_bytes(0xA5, size - STAMP_BYTES);
    buf.split().freeze()
}

// The scenario from set-up to report, in the order it runs (subscribers, publishers, the
// measured window, the JSON): its phases share the run's clients and histograms, and read
// best in sequence.
pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    if args.payload < STAMP_BYTES {
        bail!("--payload must be at least {STAMP_BYTES} bytes (sequence number and send time)");
    }
    crate::report::describe("deliveries", "publish -> delivery");
    if args.swarms == 0 || args.agents == 0 {
        bail!("--swarms and --agents must be at least 1");
    }
    if args.ceiling && args.class != Class::Telemetry {
        bail!(
            "--ceiling forwards telemetry only: the forwarder has no log to order or keep commands"
        );
    }
    let (routers, ca, spawned, forwarder) = if args.ceiling {
        let forwarder = crate::forwarder::SpawnedForwarder::start().await?;
        let routers = Routers::one(forwarder.addr);
        (routers, forwarder.ca.clone(), None, Some(forwarder))
    } else {
        let (routers, ca, spawned) = args.router.resolve().await?;
        (routers, ca, spawned, None)
    };
    let (measured_pid, target) = match &forwarder {
        Some(forwarder) => (forwarder.pid(), "forwarder"),
        None => (args.router.measured_pid(spawned.as_ref()), "router"),
    };

    let epoch = Instant::now();
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    let mut publishers = Vec::new();
    for s in 0..args.swarms {
        let swarm = format!("swarm-{s}");
        // One endpoint (UDP socket) per swarm spreads packet I/O over the runtime's threads.
        let connector = args
            .router
            .connector(&ca)
            .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
        for a in 0..args.agents {
            // Numbered across swarms, so every router gets agents of every swarm it can.
            let router = routers.pick(s * args.agents + a);
            let session = Session::new(format!("agent-{s}-{a}"), Role::Agent, [swarm.clone()]);
            let (client, deliveries) = connector
                .connect(router, session)
                .await
                .with_context(|| format!("connecting agent {a} of {swarm} to {router}"))?;
            client
                .subscribe(&swarm, args.class, None)
                .await
                .with_context(|| format!("subscribing agent {a} of {swarm}"))?;
            agents.push(tokio::spawn(agent(
                client,
                deliveries,
                args.class,
                epoch,
                live.clone(),
                stop.clone(),
            )));
        }
        let router = routers.pick(s);
        let session = Session::new(format!("publisher-{s}"), Role::Controller, [swarm.clone()]);
        let (client, _deliveries) = connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting the publisher of {swarm} to {router}"))?;
        publishers.push((client, swarm));
    }

    if !args.json {
        eprintln!(
            "fanout: {} swarms x {} agents, {} B {} payloads, rate {}, {:?}",
            args.swarms,
            args.agents,
            args.payload,
            args.class,
            if args.rate == 0 {
                "max".to_string()
            } else {
                format!("{}/s per swarm", args.rate)
            },
            args.duration
        );
    }
    let cpu = crate::cpu::CpuMeter::start(measured_pid, target);
    let started = Instant::now();
    let deadline = started + args.duration;
    let progress = tokio::spawn(progress_line(live.clone(), started));
    let publisher_tasks: Vec<_> = publishers
        .into_iter()
        .map(|(client, swarm)| {
            tokio::spawn(publisher(
                client,
                swarm,
                PublisherPlan {
                    class: args.class,
                    payload: args.payload,
                    rate: args.rate,
                    batch: args.batch.max(1),
                    window: args.window.max(1),
                    agents: args.agents as u64,
                    deadline,
                    epoch,
                },
                live.clone(),
            ))
        })
        .collect();
    let mut sent = 0u64;
    let mut publish_errors = Vec::new();
    // Publishers stay connected until the drain is over: closing a connection discards
    // frames still queued in it, which would show up as lost.
    let mut publisher_clients = Vec::new();
    for task in publisher_tasks {
        let (client, count, error) = task.await.context("publisher task")?;
        publisher_clients.push(client);
        // Messages written before an error still count: agents may have received them.
        sent += count;
        publish_errors.extend(error);
    }
    let publish_elapsed = started.elapsed();

    // Drain: wait until every expected delivery arrived or progress stops.
    let expected = sent * args.agents as u64;
    let drain_deadline = Instant::now() + args.drain;
    let mut last = live.delivered.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while Instant::now() < drain_deadline {
        let now_delivered = live.delivered.load(Ordering::Relaxed);
        if now_delivered >= expected {
            break;
        }
        if now_delivered != last {
            last = now_delivered;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_millis(1500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu.report();
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    drop(publisher_clients);

    let mut delivered = 0;
    let mut duplicates = 0;
    let mut reordered = 0;
    let mut apply_dropped = 0;
    let mut op_gaps = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut last_delivery = started;
    let mut agent_errors = 0;
    for task in agents {
        match task.await {
            Ok(result) => {
                delivered += result.delivered;
                duplicates += result.duplicates;
                reordered += result.reordered;
                apply_dropped += result.apply_dropped;
                op_gaps += result.op_gaps;
                latency
                    .add(&result.latency_us)
                    .context("merging histograms")?;
                if let Some(at) = result.last_delivery {
                    last_delivery = last_delivery.max(at);
                }
            }
            Err(_) => agent_errors += 1,
        }
    }
    // Throughput over the span in which deliveries happened: publishing start to the last
    // delivery observed (at least the publishing time).
    let elapsed = last_delivery.duration_since(started).max(publish_elapsed);
    let lost = expected.saturating_sub(delivered);
    // More distinct messages than were sent would mean the sent count is wrong: report it.
    let surplus = delivered.saturating_sub(expected);
    let delivered_per_s = delivered as f64 / elapsed.as_secs_f64();
    let percentile = |q: f64| {
        if latency.is_empty() {
            0
        } else {
            latency.value_at_quantile(q)
        }
    };
    let report = serde_json::json!({
        "scenario": "fanout",
        "target": target,
        "class": args.class.name(),
        "swarms": args.swarms,
        "agents": args.agents,
        "agents_total": args.swarms * args.agents,
        "payload_bytes": args.payload,
        "rate_per_swarm": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "elapsed_s": elapsed.as_secs_f64(),
        "sent": sent,
        "delivered": delivered,
        "expected": expected,
        "lost": lost,
        "duplicates": duplicates,
        "reordered": reordered,
        "surplus": surplus,
        "apply_dropped": apply_dropped,
        "op_gaps": op_gaps,
        "delivered_per_s": delivered_per_s.round(),
        "sent_per_s": (sent as f64 / publish_elapsed.as_secs_f64()).round(),
        "latency_us": {
            "p50": percentile(0.50),
            "p90": percentile(0.90),
            "p99": percentile(0.99),
            "p999": percentile(0.999),
            "max": latency.max(),
        },
        "publish_errors": publish_errors.len(),
        "agent_errors": agent_errors,
        "cpu": cpu,
    });
    for error in &publish_errors {
        eprintln!("publisher error: {error:#}");
    }
    crate::report::summary(&report);
    crate::cpu::warn_if_loadgen_bound(&report["cpu"]);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    if !publish_errors.is_empty() || agent_errors > 0 {
        bail!(
            "{} publishers and {agent_errors} agents failed",
            publish_errors.len()
        );
    }
    drop(spawned);
    drop(forwarder);
    Ok(())
}

fn print_table(report: &serde_json::Value) {
    let get = |k: &str| report[k].to_string();
    let lat = &report["latency_us"];
    println!("{:<18} fanout", "scenario");
    for key in [
        "target",
        "class",
        "swarms",
        "agents",
        "payload_bytes",
        "duration_s",
        "elapsed_s",
        "sent",
        "expected",
        "delivered",
        "lost",
        "duplicates",
        "reordered",
        "delivered_per_s",
    ] {
        println!("{key:<18} {}", get(key).trim_matches('"'));
    }
    println!(
        "{:<18} p50 {}  p90 {}  p99 {}  p999 {}  max {}",
        "latency_us", lat["p50"], lat["p90"], lat["p99"], lat["p999"], lat["max"]
    );
    println!("{:<18} {}", "cpu", report["cpu"]);
}

async fn progress_line(live: Arc<Live>, started: Instant) {
    let mut last_delivered = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let delivered = live.delivered.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] sent {:>10}  delivered {:>11}  {:>9}/s",
            started.elapsed().as_secs_f64(),
            live.sent.load(Ordering::Relaxed),
            delivered,
            delivered - last_delivered
        );
        last_delivered = delivered;
    }
}

#[derive(Clone, Copy, Debug)]
struct PublisherPlan {
    class: Class,
    payload: usize,
    rate: u64,
    batch: usize,
    window: usize,
    /// Agents of the swarm: each message should reach every one.
    agents: u64,
    deadline: Instant,
    epoch: Instant,
}

/// Publishes until the deadline. Returns how many messages were handed to the client's
/// stream writer (for ordered classes each was also acknowledged by the router before the
/// publisher returned), and the error that stopped it early, if any.
async fn publisher(
    client: Client,
    swarm: String,
    plan: PublisherPlan,
    live: Arc<Live>,
) -> (Client, u64, Option<anyhow::Error>) {
    let mut sent = 0;
    let result = publish_until_deadline(&client, &swarm, plan, &live, &mut sent).await;
    (client, sent, result.err())
}

async fn publish_until_deadline(
    client: &Client,
    swarm: &str,
    plan: PublisherPlan,
    live: &Live,
    sent: &mut u64,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut seq = 0u64;
    let mut pending = VecDeque::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < plan.deadline {
        let due = if plan.rate == 0 {
            plan.batch as u64
        } else {
            tick.tick().await;
            let target = (started.elapsed().as_secs_f64() * plan.rate as f64) as u64;
            target.saturating_sub(seq)
        };
        if due == 0 {
            continue;
        }
        if plan.class.is_ordered() {
            for _ in 0..due {
                let payload = stamp(&mut buf, seq, plan.epoch, plan.payload);
                seq += 1;
                let ack = client
                    .publish_start(swarm, plan.class, payload, PublishOptions::default())
                    .await?;
                pending.push_back(ack);
                *sent = seq;
                live.sent.fetch_add(1, Ordering::Relaxed);
                crate::report::offered(plan.agents);
                if pending.len() >= plan.window {
                    if let Some(ack) = pending.pop_front() {
                        ack.wait().await?;
                    }
                }
            }
        } else {
            let batch: Vec<Publish> = (0..due)
                .map(|_| {
                    let payload = stamp(&mut buf, seq, plan.epoch, plan.payload);
                    seq += 1;
                    Publish {
                        request_id: 0,
                        swarm: swarm.to_owned(),
                        class: plan.class,
                        target_agent: None,
                        key: None,
                        payload,
                        fencing_token: 0,
                        lease: None,
                    }
                })
                .collect();
            client.publish_batch(plan.class, batch).await?;
            *sent = seq;
            live.sent.fetch_add(due, Ordering::Relaxed);
            crate::report::offered(due * plan.agents);
        }
    }
    for ack in pending {
        ack.wait().await?;
    }
    Ok(())
}

/// A growable bitset of sequence numbers seen.
#[derive(Debug, Default)]
struct Seen(Vec<u64>);

impl Seen {
    /// Marks `seq`; returns whether it was already marked.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let was = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        was
    }
}

async fn agent(
    client: Client,
    mut deliveries: Deliveries,
    class: Class,
    epoch: Instant,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
) -> AgentResult {
    let mut result = AgentResult {
        delivered: 0,
        duplicates: 0,
        reordered: 0,
        apply_dropped: 0,
        op_gaps: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
            .expect("constant bounds are valid"),
        last_delivery: None,
    };
    let mut seen = Seen::default();
    let mut apply = IdempotentApply::new();
    let mut highest: Option<u64> = None;
    let mut batch = Vec::with_capacity(256);
    let mut reported = Vec::with_capacity(256);
    let reporting = crate::report::enabled();
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        let got = match tokio::time::timeout(
            Duration::from_millis(100),
            deliveries.recv_many(&mut batch, 256),
        )
        .await
        {
            Ok(0) => break, // connection closed
            Ok(n) => n,
            Err(_) => continue,
        };
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let mut fresh = 0;
        for delivery in &batch {
            if class.is_ordered() {
                let before = apply.last_applied_of(&delivery.swarm, delivery.class);
                if !apply.admit(
                    &delivery.swarm,
                    delivery.class,
                    delivery.epoch,
                    delivery.op_id,
                ) {
                    // A redelivered op: the application never sees it, but count it.
                    result.apply_dropped += 1;
                    continue;
                }
                // Every agent subscribes to the whole swarm, so it must see every op id.
                result.op_gaps += delivery.op_id.0.saturating_sub(before.0 + 1);
            }
            let p = &delivery.payload;
            if p.len() < STAMP_BYTES {
                continue;
            }
            let seq = u64::from_le_bytes(p[0..8].try_into().expect("8 bytes"));
            let sent_ns = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
            if seen.insert(seq) {
                result.duplicates += 1;
                continue;
            }
            if highest.is_some_and(|h| seq < h) {
                result.reordered += 1;
            }
            highest = Some(highest.map_or(seq, |h| h.max(seq)));
            let latency_us = now_ns.saturating_sub(sent_ns) / 1000;
            let _ = result.latency_us.record(latency_us.max(1));
            if reporting {
                reported.push(latency_us);
            }
            fresh += 1;
        }
        result.delivered += fresh;
        crate::report::latencies_us(&reported);
        crate::report::count(fresh);
        crate::report::arrived(fresh);
        reported.clear();
        if got > 0 {
            result.last_delivery = Some(Instant::now());
        }
        if class.is_ordered() && got > 0 {
            // Acknowledge what was applied (cumulative), as an application would; without it
            // the router redelivers after its redelivery timeout.
            if let Some(last) = batch.last() {
                let applied = apply.last_applied_of(&last.swarm, class);
                if client.ack(&last.swarm, class, applied).await.is_err() {
                    break;
                }
            }
        }
        live.delivered.fetch_add(fresh, Ordering::Relaxed);
    }
    client.close();
    result
}
