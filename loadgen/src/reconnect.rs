//! The `reconnect` scenario: how fast do N clients come back after a router restart, and
//! how hard do they hit it on the way?
//!
//! N `ResilientClient`s connect (a few at a time) and subscribe to commands. The spawned
//! router is then restarted (SIGTERM, which closes every connection with ShuttingDown, then
//! a new process on the same address and data dir). Every client reconnects by itself, with
//! its backoff, and subscribes again. The loadgen records, from the clients' own events,
//! when each connection attempt started and when each client was subscribed again, and
//! reports the time from the restart until each client was back (p50, p99, max) and the
//! most attempts started in any 100 ms window. It runs once with full jitter and once
//! without (every client waits the same exponential bound), unless `--jitter` picks one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use swarmbus_client::{ReconnectEvent, ReconnectOptions, RetryPolicy, Session};
use swarmbus_schema::{Class, Role};

use crate::spawn::RouterArgs;
use crate::units::parse_duration;

/// Clients per UDP socket (one `Connector` each).
const CLIENTS_PER_SOCKET: usize = 25;

/// Width of the window in which connection attempts are counted.
const ATTEMPT_WINDOW: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JitterMode {
    On,
    Off,
    Both,
}

#[derive(Debug, clap::Args)]
pub struct ReconnectArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Clients connected when the router restarts.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Run with full jitter (`on`), without (`off`), or both, one after the other.
    #[arg(long, value_enum, default_value = "both")]
    jitter: JitterMode,
    /// First backoff bound; it doubles with every attempt (the client library's default).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    base: Duration,
    /// Largest backoff bound (the client library's default).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    cap: Duration,
    /// Swarms the clients are spread over (each client joins one).
    #[arg(long, default_value_t = 10)]
    swarms: usize,
    /// Clients connecting at once during set-up.
    #[arg(long, default_value_t = 50)]
    connect_concurrency: usize,
    /// Each attempt's connect timeout.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest wait for every client to be back.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the clients' event hooks saw.
#[derive(Debug, Default)]
struct Observed {
    /// When every connection attempt started.
    attempts: Vec<Instant>,
    /// When each client (by index) was last subscribed again.
    resubscribed: Vec<Option<Instant>>,
}

#[derive(Debug)]
struct RunResult {
    jitter: bool,
    back: u64,
    resubscribe_ms: Histogram<u64>,
    max_attempts_per_100ms: u64,
    attempts: u64,
    reconnects: u64,
    router_down_ms: f64,
}

pub async fn run(args: ReconnectArgs) -> anyhow::Result<()> {
    crate::report::describe("clients subscribed again", "restart -> subscribed again");
    if args.clients == 0 || args.swarms == 0 {
        bail!("--clients and --swarms must be at least 1");
    }
    let (_, _, spawned) = args.router.resolve().await?;
    let Some(mut router) = spawned else {
        bail!("reconnect restarts the router: it needs --spawn-router");
    };
    let modes: &[bool] = match args.jitter {
        JitterMode::On => &[true],
        JitterMode::Off => &[false],
        JitterMode::Both => &[true, false],
    };
    let mut results = Vec::new();
    for &jitter in modes {
        let result = run_once(&args, &mut router, jitter).await?;
        if !args.json {
            eprintln!(
                "jitter {}: {} of {} clients back, p99 {} ms, peak {} attempts per 100 ms",
                if jitter { "on" } else { "off" },
                result.back,
                args.clients,
                result.resubscribe_ms.value_at_quantile(0.99),
                result.max_attempts_per_100ms
            );
        }
        results.push(result);
    }
    report(&args, &results);
    if results.iter().any(|r| r.back < args.clients as u64) {
        bail!("some clients were not back within --timeout");
    }
    Ok(())
}

// One round in the order it runs (crowd, restart, reconnects, the checks): its steps
// share the crowd's clients and what each observed, and read best in sequence.
async fn run_once(
    args: &ReconnectArgs,
    router: &mut crate::spawn::SpawnedRouter,
    jitter: bool,
) -> anyhow::Result<RunResult> {
    // Clients share a UDP socket per CLIENTS_PER_SOCKET: real clients each have their own,
    // and a thousand connections behind one socket lose packets in its receive buffer when
    // they all hear from the router at once.
    let connectors = (0..args.clients.div_ceil(CLIENTS_PER_SOCKET))
        .map(|_| args.router.connector(&router.ca))
        .collect::<Result<Vec<_>, _>>()?;
    let observed = Arc::new(Mutex::new(Observed {
        attempts: Vec::new(),
        resubscribed: vec![None; args.clients],
    }));
    let policy = RetryPolicy {
        base: args.base,
        cap: args.cap,
        max_attempts: u32::MAX,
        jitter,
    };
    // Set-up: connect every client, a few at a time.
    let mut clients = Vec::with_capacity(args.clients);
    let mut deliveries = Vec::with_capacity(args.clients);
    let addr = router.addr;
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while clients.len() < args.clients {
        while next < args.clients && pending.len() < args.connect_concurrency.max(1) {
            let index = next;
            next += 1;
            let connector = connectors[index / CLIENTS_PER_SOCKET].clone();
            let observed = observed.clone();
            let swarm = format!("swarm-{}", index % args.swarms);
            let mut session = Session::new(format!("client-{index}"), Role::Agent, [&swarm]);
            session.connect_timeout = args.connect_timeout;
            let options = ReconnectOptions {
                policy: policy.clone(),
                seed: Some(0x5eed ^ index as u64),
                on_event: Some(Arc::new(move |event: &ReconnectEvent| {
                    let mut observed = observed.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        ReconnectEvent::Attempt { at, .. } => observed.attempts.push(*at),
                        ReconnectEvent::Resubscribed { at, .. } => {
                            observed.resubscribed[index] = Some(*at)
                        }
                        _ => {}
                    }
                })),
            };
            pending.spawn(async move {
                let (client, rx) = connector
                    .connect_resilient(addr, session, options)
                    .await
                    .with_context(|| format!("client-{index} connecting"))?;
                client
                    .subscribe(&swarm, Class::Command, None)
                    .await
                    .with_context(|| format!("client-{index} subscribing"))?;
                anyhow::Ok((client, rx))
            });
        }
        match pending.join_next().await {
            Some(joined) => {
                let (client, rx) = joined.context("a connecting task failed")??;
                clients.push(client);
                deliveries.push(rx);
            }
            None => break,
        }
    }
    // The restart.
    let restart_at = Instant::now();
    router.restart().await?;
    let router_down_ms = restart_at.elapsed().as_secs_f64() * 1e3;
    // Wait until every client was subscribed again after the restart.
    let deadline = restart_at + args.timeout;
    loop {
        let back = {
            let observed = observed.lock().unwrap_or_else(|p| p.into_inner());
            observed
                .resubscribed
                .iter()
                .filter(|at| at.is_some_and(|at| at > restart_at))
                .count()
        };
        if back == args.clients || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let observed = std::mem::take(&mut *observed.lock().unwrap_or_else(|p| p.into_inner()));
    let mut resubscribe_ms = Histogram::<u64>::new(3)?;
    let mut back = 0;
    for at in observed.resubscribed.iter().flatten() {
        if *at > restart_at {
            back += 1;
            let took = at.duration_since(restart_at);
            resubscribe_ms.record(took.as_millis() as u64)?;
            crate::report::at(*at, Some(took.as_micros() as u64));
        }
    }
    // Attempts after the restart, counted per 100 ms window.
    let mut windows = std::collections::HashMap::<u128, u64>::new();
    let mut attempts = 0;
    for at in observed.attempts.iter().filter(|at| **at > restart_at) {
        attempts += 1;
        let window = at.duration_since(restart_at).as_nanos() / ATTEMPT_WINDOW.as_nanos();
        *windows.entry(window).or_default() += 1;
    }
    let reconnects = clients.iter().map(|c| c.reconnects()).sum();
    for client in &clients {
        client.close();
    }
    drop(deliveries);
    Ok(RunResult {
        jitter,
        back,
        resubscribe_ms,
        max_attempts_per_100ms: windows.values().copied().max().unwrap_or(0),
        attempts,
        reconnects,
        router_down_ms,
    })
}

fn report(args: &ReconnectArgs, results: &[RunResult]) {
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let h = &r.resubscribe_ms;
            serde_json::json!({
                "jitter": r.jitter,
                "clients": args.clients,
                "resubscribed": r.back,
                "resubscribe_ms": {
                    "p50": h.value_at_quantile(0.5),
                    "p99": h.value_at_quantile(0.99),
                    "max": h.max(),
                },
                "max_attempts_per_100ms": r.max_attempts_per_100ms,
                "attempts": r.attempts,
                "reconnects": r.reconnects,
                "router_restart_ms": (r.router_down_ms * 10.0).round() / 10.0,
            })
        })
        .collect();
    if args.json || crate::report::enabled() {
        let by_mode = |jitter: bool| {
            results
                .iter()
                .position(|r| r.jitter == jitter)
                .map(|i| runs[i].clone())
                .unwrap_or(serde_json::Value::Null)
        };
        let json = serde_json::json!({
            "scenario": "reconnect",
            "clients": args.clients,
            "base_ms": args.base.as_millis() as u64,
            "cap_ms": args.cap.as_millis() as u64,
            "jitter_on": by_mode(true),
            "jitter_off": by_mode(false),
        });
        crate::report::summary(&json);
        if args.json {
            println!("{json}");
            return;
        }
    }
    println!(
        "{:<8} {:>8} {:>10} {:>10} {:>10} {:>14} {:>10}",
        "jitter", "back", "p50 ms", "p99 ms", "max ms", "peak/100ms", "attempts"
    );
    for r in results {
        let h = &r.resubscribe_ms;
        println!(
            "{:<8} {:>8} {:>10} {:>10} {:>10} {:>14} {:>10}",
            if r.jitter { "on" } else { "off" },
            r.back,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max(),
            r.max_attempts_per_100ms,
            r.attempts
        );
    }
}
