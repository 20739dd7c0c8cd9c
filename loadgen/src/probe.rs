//! Command probes, shared by the `flood` and `storm` scenarios: publishers that send
//! acknowledged commands at a steady rate, and receivers that record, per phase, the latency
//! of every probe command and which ones arrived.
//!
//! Both scenarios run two phases of equal length over one [`Timeline`]: a baseline, then the
//! same probe traffic under a disturbance (a telemetry flood, a retry storm). Every probe
//! payload carries its publisher's index, the phase it was sent in, a sequence number and the
//! send time (nanoseconds since the loadgen's epoch; publishers and receivers run in one
//! process, so they share that clock). Receivers count commands after the client's
//! [`IdempotentApply`] and acknowledge what they applied, as an application would.
//! Commands a receiver never got are found by comparing, per publisher, the sequence numbers
//! the router acknowledged with those the receiver saw.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use swarmbus_client::PublishOptions;
use swarmbus_client::{Client, ClientError, Deliveries, IdempotentApply, PendingAck};
use swarmbus_schema::Class;
use tokio::sync::mpsc;

/// Bytes of the probe stamp at the start of every probe payload: publisher index (4),
/// phase (1), sequence number (8), send time (8).
pub const STAMP_BYTES: usize = 21;

/// Deliveries a receiver takes from the client per wake-up.
const RECEIVE_BATCH: usize = 1024;

/// Which part of a run a command was sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No disturbance.
    Baseline = 0,
    /// Under the scenario's disturbance (flood, storm).
    Disturbed = 1,
}

/// The run's clock and phase boundaries: baseline from `started` to `disturbed_from`, the
/// disturbed phase from there to `deadline`.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    /// Zero of every send and receive time stamped in payloads.
    pub epoch: Instant,
    pub started: Instant,
    pub disturbed_from: Instant,
    pub deadline: Instant,
}

impl Timeline {
    /// Two phases of `phase` each, starting now.
    pub fn two_phases(epoch: Instant, phase: Duration) -> Self {
        let started = Instant::now();
        Timeline {
            epoch,
            started,
            disturbed_from: started + phase,
            deadline: started + 2 * phase,
        }
    }

    pub fn phase_at(&self, at: Instant) -> Phase {
        if at >= self.disturbed_from {
            Phase::Disturbed
        } else {
            Phase::Baseline
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What a probe payload carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub phase: Phase,
    pub seq: u64,
    pub sent_ns: u64,
}

impl Stamp {
    /// A payload of `size` bytes (at least [`STAMP_BYTES`]) starting with this stamp.
    pub fn payload(&self, buf: &mut BytesMut, size: usize) -> Bytes {
        let size = size.max(STAMP_BYTES);
        buf.reserve(size);
        buf.put_u32_le(self.publisher);
        buf.put_u8(self.phase as u8);
        buf.put_u64_le(self.seq);
        buf.put_u64_le(self.sent_ns);
        buf.put_bytes(0x5A, size - STAMP_BYTES);
        buf.split().freeze()
    }

    /// The stamp at the start of `payload`, if it has one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let publisher = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
        let phase = match payload.get(4)? {
            0 => Phase::Baseline,
            1 => Phase::Disturbed,
            _ => return None,
        };
        let seq = u64::from_le_bytes(payload.get(5..13)?.try_into().ok()?);
        let sent_ns = u64::from_le_bytes(payload.get(13..21)?.try_into().ok()?);
        Some(Stamp {
            publisher,
            phase,
            seq,
            sent_ns,
        })
    }
}

/// A growable bitset of sequence numbers.
#[derive(Clone, Debug, Default)]
pub struct SeqSet(Vec<u64>);

impl SeqSet {
    /// Marks `seq`; returns whether it was already marked.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let was = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        was
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Members of `self` missing from `other`.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let theirs = other.0.get(i).copied().unwrap_or(0);
                u64::from((w & !theirs).count_ones())
            })
            .sum()
    }
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// `{p50, p90, p99, max, samples}` of a latency histogram; percentiles are `null` when no
/// sample was recorded.
pub fn latency_json(histogram: &Histogram<u64>) -> serde_json::Value {
    let q = |q: f64| (!histogram.is_empty()).then(|| histogram.value_at_quantile(q));
    serde_json::json!({
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": (!histogram.is_empty()).then(|| histogram.max()),
        "samples": histogram.len(),
    })
}

/// `disturbed p99 / baseline p99`, `null` when either phase has no sample.
pub fn p99_ratio(baseline: &Histogram<u64>, disturbed: &Histogram<u64>) -> Option<f64> {
    if baseline.is_empty() || disturbed.is_empty() {
        return None;
    }
    let ratio = disturbed.value_at_quantile(0.99) as f64 / baseline.value_at_quantile(0.99) as f64;
    Some((ratio * 100.0).round() / 100.0)
}

/// Counters read by the progress line and the drain.
#[derive(Debug, Default)]
pub struct Live {
    pub commands_acked: AtomicU64,
    /// Distinct probe commands received, all receivers together.
    pub commands_received: AtomicU64,
    pub telemetry_sent: AtomicU64,
    pub telemetry_received: AtomicU64,
}

/// How a probe publisher runs.
#[derive(Clone, Copy, Debug)]
pub struct PublishPlan {
    pub publisher: u32,
    /// The ordered class the probe messages go on (command or control).
    pub class: Class,
    /// Commands per second.
    pub rate: f64,
    pub payload_bytes: usize,
    /// Commands awaiting acknowledgement at most.
    pub window: usize,
    pub timeline: Timeline,
}

/// What a probe publisher did.
#[derive(Debug)]
pub struct PublisherReport {
    pub sent: u64,
    /// Sequence numbers the router acknowledged.
    pub acked: SeqSet,
    /// Publishes the router refused (none expected from a probe).
    pub refused: u64,
    /// Publish to acknowledgement (durable in the router's log), by the phase the command
    /// was sent in: the router's share of the delivery latency, without the receivers'.
    pub ack_latency_us: [Histogram<u64>; 2],
    pub error: Option<anyhow::Error>,
}

impl PublisherReport {
    fn empty() -> Self {
        PublisherReport {
            sent: 0,
            acked: SeqSet::default(),
            refused: 0,
            ack_latency_us: [latency_histogram(), latency_histogram()],
            error: None,
        }
    }
}

/// Publishes commands to `swarm` at `plan.rate` until the timeline's deadline, each
/// stamped with the phase it is sent in, and collects their acknowledgements.
pub async fn publish_probes(
    client: Client,
    swarm: String,
    plan: PublishPlan,
    live: Arc<Live>,
) -> PublisherReport {
    let (tx, mut rx) = mpsc::channel::<(Stamp, Instant, PendingAck)>(plan.window.max(1));
    // Acknowledgements arrive in publish order (one stream, one sequencer), so one
    // collector awaiting them in turn sees each as soon as it comes.
    let collector = tokio::spawn(async move {
        let mut report = PublisherReport::empty();
        while let Some((stamp, at, pending)) = rx.recv().await {
            match pending.wait().await {
                Ok(_) => {
                    let _ = report.ack_latency_us[stamp.phase as usize]
                        .record((at.elapsed().as_micros() as u64).max(1));
                    report.acked.insert(stamp.seq);
                    live.commands_acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(ClientError::Refused { .. }) => {
                    report.refused += 1;
                    crate::report::refused(1);
                }
                Err(error) => {
                    report.error = Some(anyhow::Error::new(error));
                    break;
                }
            }
        }
        report
    });
    let mut buf = BytesMut::new();
    let timeline = plan.timeline;
    let mut sent = 0u64;
    let publishing: anyhow::Result<()> = async {
        loop {
            let now = Instant::now();
            if now >= timeline.deadline {
                return Ok(());
            }
            let due = (now.duration_since(timeline.started).as_secs_f64() * plan.rate) as u64;
            if due <= sent {
                // Sleep until the next command is due (tokio's timer has 1 ms granularity;
                // at higher rates the commands due meanwhile go out together).
                let next =
                    timeline.started + Duration::from_secs_f64((sent + 1) as f64 / plan.rate);
                tokio::time::sleep_until(next.min(timeline.deadline).into()).await;
                continue;
            }
            while sent < due {
                let at = Instant::now();
                let stamp = Stamp {
                    publisher: plan.publisher,
                    phase: timeline.phase_at(at),
                    seq: sent,
                    sent_ns: timeline.now_ns(),
                };
                let payload = stamp.payload(&mut buf, plan.payload_bytes);
                let pending = client
                    .publish_start(&swarm, plan.class, payload, PublishOptions::default())
                    .await?;
                sent += 1;
                if tx.send((stamp, at, pending)).await.is_err() {
                    return Ok(()); // the collector stopped on an error; it reports it
                }
            }
        }
    }
    .await;
    drop(tx);
    let mut report = match collector.await {
        Ok(report) => report,
        Err(join) => PublisherReport {
            error: Some(anyhow::anyhow!("acknowledgement collector failed: {join}")),
            ..PublisherReport::empty()
        },
    };
    report.sent = sent;
    if let Err(error) = publishing {
        report.error.get_or_insert(error);
    }
    report
}

/// What a receiver saw.
#[derive(Debug)]
pub struct ReceiverReport {
    /// Probe commands received per publisher index.
    pub seen: Vec<SeqSet>,
    /// Latency of probe commands, by the phase they were sent in.
    pub latency_us: [Histogram<u64>; 2],
    pub duplicates: u64,
    /// Commands stamped with a publisher index outside the tracked ones (the storm's
    /// misbehaving agent): applied and acknowledged, but no latency or loss is recorded.
    pub untracked_commands: u64,
    pub telemetry: u64,
    /// Deliveries of other classes (the storm's receivers subscribe to commands only).
    pub other: u64,
    /// When the last telemetry message arrived.
    pub last_telemetry: Option<Instant>,
    /// When the last delivery of any class arrived.
    pub last_delivery: Option<Instant>,
}

/// Receives until `stop` is set or the connection closes. Probe commands of publishers
/// `0..publishers` are tracked; telemetry is counted.
pub async fn receive(
    client: Client,
    mut deliveries: Deliveries,
    publishers: usize,
    timeline: Timeline,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
) -> ReceiverReport {
    let mut report = ReceiverReport {
        seen: vec![SeqSet::default(); publishers],
        latency_us: [latency_histogram(), latency_histogram()],
        duplicates: 0,
        untracked_commands: 0,
        telemetry: 0,
        other: 0,
        last_telemetry: None,
        last_delivery: None,
    };
    let mut apply = IdempotentApply::new();
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        let got = match tokio::time::timeout(
            Duration::from_millis(100),
            deliveries.recv_many(&mut batch, RECEIVE_BATCH),
        )
        .await
        {
            Ok(0) => break, // connection closed
            Ok(n) => n,
            Err(_) => continue,
        };
        let now_ns = timeline.now_ns();
        let mut telemetry = 0;
        let mut fresh = 0;
        let mut last_command = None;
        for delivery in &batch[..got] {
            match delivery.class {
                Class::Telemetry => telemetry += 1,
                Class::Command | Class::Control => {
                    last_command = Some((&delivery.swarm, delivery.class));
                    if !apply.admit(
                        &delivery.swarm,
                        delivery.class,
                        delivery.epoch,
                        delivery.op_id,
                    ) {
                        // Redelivered: the application never sees it twice.
                        continue;
                    }
                    let Some(stamp) = Stamp::read(&delivery.payload) else {
                        report.other += 1;
                        continue;
                    };
                    let Some(seen) = report.seen.get_mut(stamp.publisher as usize) else {
                        report.untracked_commands += 1;
                        continue;
                    };
                    if seen.insert(stamp.seq) {
                        report.duplicates += 1;
                        continue;
                    }
                    let latency_us = now_ns.saturating_sub(stamp.sent_ns) / 1000;
                    let _ = report.latency_us[stamp.phase as usize].record(latency_us.max(1));
                    crate::report::latency_us(latency_us);
                    crate::report::count(1);
                    fresh += 1;
                }
                _ => report.other += 1,
            }
        }
        let received_at = Instant::now();
        report.last_delivery = Some(received_at);
        if telemetry > 0 {
            report.last_telemetry = Some(received_at);
        }
        report.telemetry += telemetry;
        crate::report::arrived(telemetry);
        live.telemetry_received
            .fetch_add(telemetry, Ordering::Relaxed);
        live.commands_received.fetch_add(fresh, Ordering::Relaxed);
        if let Some((swarm, class)) = last_command {
            // Acknowledge what was applied (cumulative); without it the router redelivers
            // after its redelivery timeout.
            let applied = apply.last_applied_of(swarm, class);
            if client.ack(swarm, class, applied).await.is_err() {
                break;
            }
        }
    }
    client.close();
    report
}

/// Probe commands acknowledged to their publisher but never seen by a receiver, summed
/// over receivers.
pub fn commands_lost(publishers: &[PublisherReport], receivers: &[ReceiverReport]) -> u64 {
    receivers
        .iter()
        .map(|receiver| {
            publishers
                .iter()
                .zip(&receiver.seen)
                .map(|(publisher, seen)| publisher.acked.missing_from(seen))
                .sum::<u64>()
        })
        .sum()
}

/// Waits after publishing stopped until every acknowledged probe command reached every
/// receiver (`expected_commands`) and telemetry stopped arriving for `quiet`, or nothing
/// arrived for 1.5 s (commands are missing then), or `limit` passed. Returns whether
/// deliveries went quiet, i.e. `false` when the limit cut them off.
pub async fn drain(live: &Live, expected_commands: u64, quiet: Duration, limit: Duration) -> bool {
    let stall = Duration::from_millis(1500).max(quiet);
    let deadline = Instant::now() + limit;
    let counters = || {
        (
            live.commands_received.load(Ordering::Relaxed),
            live.telemetry_received.load(Ordering::Relaxed),
        )
    };
    let mut last = counters();
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counters();
        if now != last {
            last = now;
            last_change = Instant::now();
            continue;
        }
        let quiet_for = last_change.elapsed();
        if (now.0 >= expected_commands && quiet_for >= quiet) || quiet_for >= stall {
            return true;
        }
    }
    false
}

/// Prints a progress line to stderr every second until aborted; `telemetry` adds the
/// telemetry counters.
pub async fn progress_line(
    live: Arc<Live>,
    timeline: Timeline,
    disturbance: &'static str,
    telemetry: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_telemetry = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let phase = if now >= timeline.deadline {
            "drain"
        } else {
            match timeline.phase_at(now) {
                Phase::Baseline => "baseline",
                Phase::Disturbed => disturbance,
            }
        };
        let mut line = format!(
            "[{:>5.1}s] {phase:<8} commands acked {:>8} received {:>9}",
            timeline.started.elapsed().as_secs_f64(),
            live.commands_acked.load(Ordering::Relaxed),
            live.commands_received.load(Ordering::Relaxed),
        );
        if telemetry {
            let received = live.telemetry_received.load(Ordering::Relaxed);
            line += &format!(
                "  telemetry sent {:>11} received {:>11} ({}/s)",
                live.telemetry_sent.load(Ordering::Relaxed),
                received,
                received - last_telemetry,
            );
            last_telemetry = received;
        }
        eprintln!("{line}");
    }
}

/// A runtime for the load that disturbs the probes (flooders, the stormer), so it cannot
/// take more than its `threads` cores from the probes' receivers. Dropped without blocking:
/// a runtime dropped the ordinary way inside another runtime's task panics, and the tasks
/// left on it are done or moot by then.
#[derive(Debug)]
pub struct SideRuntime(Option<tokio::runtime::Runtime>);

/// Lowers the calling thread's scheduling priority (nice +10, Linux): the load the side
/// runtime generates then only takes CPU the router and the loadgen's own probes leave
/// free, as load from other machines would. Best effort: elsewhere nothing changes.
#[allow(unsafe_code)] // one libc call with integer arguments; no memory is shared
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; who = 0 is the calling
        // thread on Linux.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    }
}

impl SideRuntime {
    pub fn new(threads: usize, name: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()
            .with_context(|| format!("starting the {name} runtime"))?;
        Ok(SideRuntime(Some(runtime)))
    }
}

impl std::ops::Deref for SideRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        // Invariant: the runtime is only taken out in `drop`.
        self.0
            .as_ref()
            .expect("the runtime is present until dropped")
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Waits for the receiver tasks: their reports, and how many of them failed.
pub async fn join_receivers<T>(receivers: Vec<tokio::task::JoinHandle<T>>) -> (Vec<T>, usize) {
    let mut reports = Vec::with_capacity(receivers.len());
    let mut failed = 0;
    for task in receivers {
        match task.await {
            Ok(report) => reports.push(report),
            Err(_) => failed += 1,
        }
    }
    (reports, failed)
}

/// Adds `from` into `into`, naming what failed.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> anyhow::Result<()> {
    into.add(from).context("merging latency histograms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let mut buf = BytesMut::new();
        let stamp = Stamp {
            publisher: 7,
            phase: Phase::Disturbed,
            seq: 123_456,
            sent_ns: 987_654_321,
        };
        let payload = stamp.payload(&mut buf, 64);
        assert_eq!(payload.len(), 64);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(Stamp::read(&payload[..STAMP_BYTES - 1]), None);
        // A payload shorter than the stamp still carries a whole stamp.
        assert_eq!(stamp.payload(&mut buf, 4).len(), STAMP_BYTES);
    }

    #[test]
    fn missing_sequence_numbers_are_counted() {
        let mut acked = SeqSet::default();
        let mut seen = SeqSet::default();
        for seq in 0..200 {
            acked.insert(seq);
            if seq % 50 != 3 {
                seen.insert(seq);
            }
        }
        assert_eq!(acked.len(), 200);
        assert_eq!(acked.missing_from(&seen), 4);
        assert_eq!(seen.missing_from(&acked), 0);
        assert!(!seen.insert(1000));
        assert!(seen.insert(1000));
    }

    #[test]
    fn ratio_needs_both_phases() {
        let mut baseline = latency_histogram();
        let mut disturbed = latency_histogram();
        assert_eq!(p99_ratio(&baseline, &disturbed), None);
        baseline.record(100).unwrap();
        disturbed.record(250).unwrap();
        assert_eq!(p99_ratio(&baseline, &disturbed), Some(2.5));
    }
}
