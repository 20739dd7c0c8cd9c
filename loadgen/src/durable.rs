//! The `durable` scenario (acknowledged commands: throughput and ack latency, optionally
//! recording every acknowledged command) and the `check` scenario (reads recorded swarms back
//! from the router's log and compares).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use sha2::{Digest, Sha256};
use swarmbus_client::{Client, PendingAck, PublishOptions, Session};
use swarmbus_schema::{Class, OpId, Role};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::spawn::RouterArgs;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, clap::Args)]
pub struct DurableArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Swarms, each with one publisher.
    #[arg(long, default_value_t = 10)]
    swarms: usize,
    /// Commands awaiting acknowledgement per publisher.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// How long to publish, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Commands per second per swarm; 0 = as fast as acknowledgements allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Payload size, e.g. 256B.
    #[arg(long, default_value = "256B", value_parser = parse_size)]
    payload: usize,
    /// Append one JSON line per acknowledged command to FILE:
    /// {"swarm", "op", "epoch", "sha256"} (sha256 of the payload, hex).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    fn line(&self, swarm: &str, op: u64, epoch: u64, payload: &[u8]) -> anyhow::Result<()> {
        let digest = Sha256::digest(payload);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let line = serde_json::json!({"swarm": swarm, "op": op, "epoch": epoch, "sha256": hex});
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(out, "{line}").context("writing the record file")
    }
}

struct PublisherResult {
    acked: u64,
    latency_us: Histogram<u64>,
    error: Option<anyhow::Error>,
}

// The scenario from set-up to report, in the order it runs (publishers, the measured
// window, the JSON): its phases share the run's clients and histograms, and read best in
// sequence.
pub async fn run(args: DurableArgs) -> anyhow::Result<()> {
    crate::report::describe("acknowledged commands", "publish -> acknowledgement");
    if args.swarms == 0 || args.window == 0 {
        bail!("--swarms and --window must be at least 1");
    }
    let (routers, ca, spawned) = args.router.resolve().await?;
    let recorder = match &args.record {
        Some(path) => Some(Arc::new(Recorder {
            out: Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )),
        })),
        None => None,
    };
    let connector = args
        .router
        .connector(&ca)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    let acked_live = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // Each run publishes to its own swarms, so records of several runs never mix.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    for s in 0..args.swarms {
        let swarm = format!("durable-{run_id}-{s}");
        let session = Session::new(
            format!("durable-publisher-{s}"),
            Role::Controller,
            [swarm.clone()],
        );
        let router = routers.pick(s);
        let (client, _deliveries) = connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting the publisher of {swarm} to {router}"))?;
        clients.push((client, swarm));
    }
    let cpu = crate::cpu::CpuMeter::start(args.router.measured_pid(spawned.as_ref()), "router");
    let started = Instant::now();
    let deadline = started + args.duration;
    let progress = {
        let acked = acked_live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = acked.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>5.1}s] acked {:>10}  {:>8}/s",
                    started.elapsed().as_secs_f64(),
                    now,
                    now - last
                );
                last = now;
            }
        })
    };
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, swarm)| {
            tokio::spawn(publish(
                client,
                swarm,
                args.window,
                args.rate,
                args.payload,
                deadline,
                recorder.clone(),
                acked_live.clone(),
            ))
        })
        .collect();
    let mut acked = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut errors = Vec::new();
    for task in tasks {
        let result = task.await.context("publisher task")?;
        acked += result.acked;
        latency
            .add(&result.latency_us)
            .context("merging histograms")?;
        errors.extend(result.error);
    }
    let elapsed = started.elapsed();
    let cpu = cpu.report();
    progress.abort();
    if let Some(recorder) = &recorder {
        recorder
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()?;
    }
    let q = |q: f64| {
        if latency.is_empty() {
            0
        } else {
            latency.value_at_quantile(q)
        }
    };
    let report = serde_json::json!({
        "scenario": "durable",
        "swarms": args.swarms,
        "window": args.window,
        "payload_bytes": args.payload,
        "rate_per_swarm": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "elapsed_s": elapsed.as_secs_f64(),
        "acked": acked,
        "acked_per_s": (acked as f64 / elapsed.as_secs_f64()).round(),
        "ack_latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": latency.max()},
        "errors": errors.len(),
        "cpu": cpu,
    });
    crate::report::summary(&report);
    crate::cpu::warn_if_loadgen_bound(&report["cpu"]);
    for error in &errors {
        eprintln!("publisher error: {error:#}");
    }
    if args.json {
        println!("{report}");
    } else {
        for key in [
            "swarms",
            "window",
            "payload_bytes",
            "elapsed_s",
            "acked",
            "acked_per_s",
        ] {
            println!("{key:<16} {}", report[key]);
        }
        let l = &report["ack_latency_us"];
        println!(
            "{:<16} p50 {}  p90 {}  p99 {}  p999 {}  max {}",
            "ack_latency_us", l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
        );
    }
    drop(spawned);
    if !errors.is_empty() {
        bail!("{} publishers failed", errors.len());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    client: Client,
    swarm: String,
    window: usize,
    rate: u64,
    payload_bytes: usize,
    deadline: Instant,
    recorder: Option<Arc<Recorder>>,
    acked_live: Arc<AtomicU64>,
) -> PublisherResult {
    // The window: a permit per command awaiting its acknowledgement.
    let window_permits = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes, PendingAck, OwnedSemaphorePermit)>(window);
    let collector_swarm = swarm.clone();
    let collector = tokio::spawn(async move {
        let mut result = PublisherResult {
            acked: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant bounds are valid"),
            error: None,
        };
        let outcome: anyhow::Result<()> = async {
            // Acknowledgements arrive in publish order (one stream, one sequencer).
            while let Some((at, payload, pending, permit)) = rx.recv().await {
                let receipt = pending.wait_receipt().await?;
                let us = (at.elapsed().as_micros() as u64).max(1);
                let _ = result.latency_us.record(us);
                crate::report::latency_us(us);
                crate::report::count(1);
                drop(permit);
                result.acked += 1;
                acked_live.fetch_add(1, Ordering::Relaxed);
                if let Some(recorder) = &recorder {
                    recorder.line(&collector_swarm, receipt.op_id.0, receipt.epoch.0, &payload)?;
                }
            }
            Ok(())
        }
        .await;
        result.error = outcome.err();
        result
    });
    let mut buf = BytesMut::new();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let publishing: anyhow::Result<()> = async {
        while Instant::now() < deadline {
            let due = if rate == 0 {
                1
            } else {
                tick.tick().await;
                let target = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                target.saturating_sub(sent)
            };
            for _ in 0..due {
                let permit = window_permits
                    .clone()
                    .acquire_owned()
                    .await
                    .context("window closed")?;
                buf.put_u64_le(sent);
                buf.put_bytes(0x5A, payload_bytes.saturating_sub(8));
                let payload = buf.split().freeze();
                let at = Instant::now();
                let pending = client
                    .publish_start(
                        &swarm,
                        Class::Command,
                        payload.clone(),
                        PublishOptions::default(),
                    )
                    .await?;
                sent += 1;
                if tx.send((at, payload, pending, permit)).await.is_err() {
                    break; // the collector stopped on an error; it reports it
                }
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let mut result = match collector.await {
        Ok(result) => result,
        Err(join) => PublisherResult {
            acked: 0,
            latency_us: Histogram::new(3).expect("constant precision is valid"),
            error: Some(anyhow::anyhow!("acknowledgement collector failed: {join}")),
        },
    };
    if let Err(error) = publishing {
        result.error.get_or_insert(error);
    }
    result
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// The file written by `durable --record`.
    #[arg(long, value_name = "FILE")]
    record: PathBuf,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// What was recorded for one op.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    epoch: u64,
    sha256: String,
}

// The crash check in the order it runs (publish, kill, restart, read back, compare): its
// steps share what was acknowledged before the kill, and read best in sequence.
pub async fn run_check(args: CheckArgs) -> anyhow::Result<()> {
    crate::report::describe("ops checked", "no latency measured");
    let file = std::fs::File::open(&args.record)
        .with_context(|| format!("opening {}", args.record.display()))?;
    let mut recorded: BTreeMap<String, BTreeMap<u64, Recorded>> = BTreeMap::new();
    let mut duplicate_ops = 0u64;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", args.record.display(), n + 1))?;
        let field = |k: &str| {
            value
                .get(k)
                .with_context(|| format!("line {}: no {k}", n + 1))
        };
        let swarm = field("swarm")?
            .as_str()
            .context("swarm is not a string")?
            .to_owned();
        let op = field("op")?.as_u64().context("op is not a number")?;
        let entry = Recorded {
            epoch: field("epoch")?.as_u64().context("epoch is not a number")?,
            sha256: field("sha256")?
                .as_str()
                .context("sha256 is not a string")?
                .to_owned(),
        };
        if recorded
            .entry(swarm)
            .or_default()
            .insert(op, entry)
            .is_some()
        {
            // The router acknowledged the same op id twice: a reused op id.
            duplicate_ops += 1;
        }
    }
    let (routers, ca, spawned) = args.router.resolve().await?;
    let connector = args.router.connector(&ca)?;
    let mut checked = 0u64;
    let mut missing = 0u64;
    let mut mismatched = 0u64;
    let mut gaps = 0u64;
    let swarms: Vec<String> = recorded.keys().cloned().collect();
    for (c, chunk) in swarms.chunks(32).enumerate() {
        let router = routers.pick(c);
        let session = Session::new("swarmbus-check", Role::Controller, chunk.iter().cloned());
        let (client, mut deliveries) = connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting to {router}"))?;
        for swarm in chunk {
            let mut stored: HashMap<u64, (u64, String)> = HashMap::new();
            let mut from = OpId(1);
            loop {
                let ack = client.delta(swarm, from, OpId::NONE).await?;
                for _ in 0..ack.count {
                    let d = tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
                        .await
                        .context("waiting for delta ops")?
                        .context("connection closed while reading a delta")?;
                    let digest = Sha256::digest(&d.payload);
                    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                    if stored.insert(d.op_id.0, (d.epoch.0, hex)).is_some() {
                        duplicate_ops += 1;
                    }
                }
                if !ack.more {
                    break;
                }
                from = OpId(ack.last_op.0 + 1);
            }
            let mut ops: Vec<u64> = stored.keys().copied().collect();
            ops.sort_unstable();
            let mut expected = 1;
            for op in &ops {
                gaps += op - expected;
                expected = op + 1;
            }
            for (op, want) in &recorded[swarm] {
                checked += 1;
                crate::report::count(1);
                match stored.get(op) {
                    None => missing += 1,
                    Some((epoch, sha)) if *epoch != want.epoch || *sha != want.sha256 => {
                        mismatched += 1
                    }
                    Some(_) => {}
                }
            }
        }
        client.close();
    }
    drop(spawned);
    let report = serde_json::json!({
        "scenario": "check",
        "swarms": recorded.len(),
        "checked": checked,
        "missing": missing,
        "mismatched": mismatched,
        "gaps": gaps,
        "duplicate_ops": duplicate_ops,
    });
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        for key in [
            "swarms",
            "checked",
            "missing",
            "mismatched",
            "gaps",
            "duplicate_ops",
        ] {
            println!("{key:<14} {}", report[key]);
        }
    }
    if missing + mismatched + gaps + duplicate_ops > 0 {
        // Exits here (with 1, not main's error path): the report first.
        if let Err(error) = crate::report::finish() {
            eprintln!("swarmbus-loadgen: {error:#}");
        }
        std::process::exit(1);
    }
    Ok(())
}
