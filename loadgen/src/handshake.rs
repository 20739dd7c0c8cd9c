//! `handshake`: how many sessions per second the router admits. Each of `--concurrency`
//! workers connects a session (QUIC and TLS handshake, Hello with its credential when the
//! router requires one, Welcome, and the bulk connection's attach when the router offers
//! one: two handshakes per session), closes it, and connects the next, for `--duration`.
//! Reports handshakes/s, the connect latency and the errors; run it with `--auth` and
//! without, in turn, to see what credentials cost at admission.

use std::time::{Duration, Instant};

use anyhow::Context;
use swarmbus_client::{Role, Session};

use crate::probe::{latency_histogram, latency_json};
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub struct HandshakeArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Sessions connecting at once (each worker has a UDP socket of its own).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to connect, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one worker saw.
struct Worker {
    handshakes: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: hdrhistogram::Histogram<u64>,
}

pub async fn run(args: HandshakeArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let (router, ca, spawned) = args.router.resolve().await?;
    let deadline = Instant::now() + args.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency {
        let connector = args.router.connector(&ca)?;
        workers.spawn(async move {
            let mut seen = Worker {
                handshakes: 0,
                errors: 0,
                first_error: None,
                latency_us: latency_histogram(),
            };
            let mut i = 0u64;
            while Instant::now() < deadline {
                let mut session = Session::new(format!("handshake-{w}-{i}"), Role::Agent, ["hs"]);
                // A router that stops answering ends the run soon after its duration.
                session.connect_timeout = Duration::from_secs(2);
                i += 1;
                let started = Instant::now();
                match connector.connect(router, session).await {
                    Ok((client, _deliveries)) => {
                        let us = started.elapsed().as_micros().max(1) as u64;
                        let _ = seen.latency_us.record(us);
                        seen.handshakes += 1;
                        client.close();
                    }
                    Err(error) => {
                        seen.errors += 1;
                        seen.first_error.get_or_insert_with(|| error.to_string());
                    }
                }
            }
            seen
        });
    }
    let started = Instant::now();
    let mut handshakes = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut latency_us = latency_histogram();
    while let Some(worker) = workers.join_next().await {
        let worker = worker.context("a handshake worker failed")?;
        handshakes += worker.handshakes;
        errors += worker.errors;
        first_error = first_error.or(worker.first_error);
        latency_us
            .add(&worker.latency_us)
            .context("merging latencies")?;
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .max(args.duration.as_secs_f64());
    drop(spawned);
    let per_s = (handshakes as f64 / elapsed).round();
    if args.json {
        let report = serde_json::json!({
            "scenario": "handshake",
            "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(),
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "handshakes": handshakes,
            "handshakes_per_s": per_s,
            "errors": errors,
            "first_error": first_error,
            "latency_us": latency_json(&latency_us),
        });
        println!("{report}");
    } else {
        println!("handshakes {handshakes} ({per_s}/s), errors {errors}");
        println!(
            "connect latency p50 {} us, p99 {} us",
            latency_us.value_at_quantile(0.5),
            latency_us.value_at_quantile(0.99)
        );
        if let Some(error) = first_error {
            println!("first error: {error}");
        }
    }
    if handshakes == 0 {
        anyhow::bail!("no session was admitted");
    }
    Ok(())
}
