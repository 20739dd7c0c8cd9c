//! The router's metrics as Prometheus scrapes them (OpenMetrics text, `prometheus-client`):
//! every value is read at scrape time from counters and histograms kept where the work
//! happens (relaxed atomics; histograms per shard, per log writer, and striped over the
//! lane writers, recorded once per batch), so a scrape adds no work to the path of a
//! message. Names carry the `swarmbus_` prefix and base units; labels are bounded (class,
//! role, outcome, reason, state): never an agent or a swarm.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use swarmbus_proto::core::LagHistogram;
use swarmbus_schema::Class;

use crate::stats::Stats;

/// The media type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the event lag buckets, in seconds: 100 µs to 30 s.
const LAG_BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// Upper bounds of the job queue wait and run time buckets, in seconds: 1 ms to an hour.
const JOB_BUCKETS_S: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Upper bounds of the group-commit size buckets, in appends.
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// What a scrape reads: the router's counters, and what the shards measured.
#[derive(Debug)]
pub struct Scrape {
    pub stats: Arc<Stats>,
    /// Event lag per class, microseconds: publish received -> durable (every shard's,
    /// merged), durable -> written to the subscriber's stream (every lane writer's), and
    /// publish received -> the subscriber's acknowledgement (every shard's).
    pub durable_lag_us: [LagHistogram; 5],
    pub delivered_lag_us: [LagHistogram; 5],
    pub ack_lag_us: [LagHistogram; 5],
    /// Acks that moved a subscriber but named an op too old to be measured.
    pub ack_lag_unmeasured: u64,
    /// Whether `/readyz` answers ready.
    pub ready: bool,
    /// The control plane and the job queue, counted at scrape.
    pub state: StateCounts,
    pub job_timings: swarmbus_proto::jobs::JobTimings,
    pub log: LogFigures,
    pub quic: QuicFigures,
}

/// The log writers' figures, merged: group commits' time (µs) and size (appends), syncs'
/// time (µs), and the bytes appended.
#[derive(Debug)]
pub struct LogFigures {
    pub commit_us: LagHistogram,
    pub batch_appends: LagHistogram,
    pub fsync_us: LagHistogram,
    pub appended_bytes: u64,
}

/// QUIC path counters of every connection served (ended and live, with their attached bulk
/// connections), and the round-trip times of the live ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuicFigures {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub congestion_events: u64,
    /// Live connections, the sum and the largest of their smoothed RTTs (seconds).
    pub connections: u64,
    pub rtt_sum_s: f64,
    pub rtt_max_s: f64,
}

/// What the control plane and the job queue hold at a scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct StateCounts {
    pub presence_members: u64,
    pub leases_held: u64,
    pub jobs_queued: u64,
    pub jobs_running: u64,
    pub jobs_dead_lettered: u64,
    pub jobs_pending_results: u64,
}

/// The exposition of `scrape`, ending with `# EOF`.
pub fn encode(scrape: Scrape) -> String {
    let mut registry = Registry::with_prefix("swarmbus");
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.stats;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let class_labels = |class: Class| [("class", class.name())];
        let roles = ["agent", "controller", "worker"];
        let by_role: Vec<(&str, u64)> = roles
            .into_iter()
            .zip(stats.sessions_by_role.iter().map(get))
            .collect();
        labelled(
            &mut encoder,
            "sessions",
            "Sessions open now, by role.",
            Kind::Gauge,
            "role",
            &by_role,
        )?;
        for (name, help, counts) in [
            (
                "published",
                "Publishes accepted, by class.",
                &stats.published_by_class,
            ),
            (
                "delivered",
                "Messages handed to subscribers' queues, by class.",
                &stats.delivered_by_class,
            ),
        ] {
            let by_class: Vec<(&str, u64)> = Class::ALL
                .iter()
                .map(|class| (class.name(), get(&counts[class.index()])))
                .collect();
            labelled(&mut encoder, name, help, Kind::Counter, "class", &by_class)?;
        }
        labelled(
            &mut encoder,
            "rate_limited",
            "Publishes over a rate limit: refused with RateLimited, or dropped (fire-and-forget).",
            Kind::Counter,
            "outcome",
            &[
                ("refused", get(&stats.rate_limited_refused)),
                ("dropped", get(&stats.rate_limited_dropped)),
            ],
        )?;
        labelled(
            &mut encoder,
            "breaker_refusals",
            "Publishes an open circuit breaker stopped: refused with CircuitOpen, or dropped (fire-and-forget).",
            Kind::Counter,
            "outcome",
            &[
                ("refused", get(&stats.breaker_refused)),
                ("dropped", get(&stats.breaker_dropped)),
            ],
        )?;
        let reasons = ["closed", "timeout", "replaced"];
        let by_reason: Vec<(&str, u64)> = reasons
            .into_iter()
            .zip(stats.presence_leaves.iter().map(get))
            .collect();
        labelled(
            &mut encoder,
            "presence_leaves",
            "Agents that left presence, by reason: closed (their session ended), timeout (no heartbeat), replaced (a newer session of the same agent).",
            Kind::Counter,
            "reason",
            &by_reason,
        )?;
        let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 19] = [
            (
                "lease_grants",
                "Lease requests granted (acquire or renew).",
                &stats.lease_grants,
            ),
            (
                "lease_refusals",
                "Lease requests refused (held by another, a stale token, a limit).",
                &stats.lease_refusals,
            ),
            (
                "connections_accepted",
                "Connections accepted.",
                &stats.connections_accepted,
            ),
            (
                "connections_refused_busy",
                "Connections refused at the connection limit.",
                &stats.connections_refused_busy,
            ),
            (
                "auth_refused",
                "Sessions refused at Hello for their identity (credential or certificate).",
                &stats.auth_refused,
            ),
            (
                "protocol_errors",
                "Connections closed for a protocol error.",
                &stats.protocol_errors,
            ),
            (
                "telemetry_shed",
                "Telemetry messages shed (a subscriber's queue full, or over the router's budget).",
                &stats.telemetry_shed,
            ),
            (
                "telemetry_bridged_out",
                "Telemetry publishes sent to the other routers of the cluster.",
                &stats.telemetry_bridged_out,
            ),
            (
                "telemetry_bridge_dropped",
                "Telemetry publishes not sent to the other routers (the NATS client's queue full).",
                &stats.telemetry_bridge_dropped,
            ),
            (
                "telemetry_bridged_in",
                "Telemetry publishes received from the other routers of the cluster.",
                &stats.telemetry_bridged_in,
            ),
            (
                "telemetry_bridge_rejected",
                "Messages on the telemetry subjects that were not a well-formed publish of their swarm (dropped).",
                &stats.telemetry_bridge_rejected,
            ),
            (
                "publish_conflicts",
                "Times another router of the cluster took op ids this router had given out (its ordered publishes holding them refused with Conflict).",
                &stats.publish_conflicts,
            ),
            (
                "lagging_disconnects",
                "Subscribers disconnected for lagging behind.",
                &stats.lagging_disconnects,
            ),
            (
                "catch_ups",
                "Ordered-class subscribers switched to catching up from the log (queue full).",
                &stats.lagging_catch_ups,
            ),
            (
                "breaker_transitions",
                "Circuit breaker state changes (session and swarm breakers).",
                &stats.breaker_transitions,
            ),
            (
                "late_replies",
                "Worker replies that came after their request's deadline.",
                &stats.late_replies,
            ),
            (
                "governor_cuts",
                "Times the governor cut the bulk intake budget for commands.",
                &stats.governor_cuts,
            ),
            (
                "log_write_failures",
                "Event log appends or syncs that failed.",
                &stats.log_write_failures,
            ),
            (
                "log_recoveries",
                "Swarms whose log took writes again after a failure.",
                &stats.log_recoveries,
            ),
        ];
        for (name, help, count) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(get(count)).encode(family)?;
        }
        let quic = &self.quic;
        let jobs = &self.job_timings;
        let totals: [(&str, &str, u64); 8] = [
            (
                "event_lag_ack_unmeasured",
                "Acknowledgements not in event_lag_ack: their op was older than the last 16,384 ops with subscribers of its shard (a subscriber far behind).",
                self.ack_lag_unmeasured,
            ),
            (
                "redeliveries",
                "Ordered-class subscribers sent their unacknowledged ops again (no ack within the redelivery timeout).",
                get(&stats.redeliveries),
            ),
            (
                "job_redeliveries",
                "Job leases of attempts after a job's first (retries, lost leases, re-drives).",
                jobs.redeliveries,
            ),
            (
                "jobs_dead_lettered",
                "Jobs dead-lettered (attempts used, or their deadline passed).",
                jobs.dead_lettered,
            ),
            (
                "quic_sent_packets",
                "QUIC packets sent, all connections together.",
                quic.sent_packets,
            ),
            (
                "quic_lost_packets",
                "QUIC packets declared lost (their frames are sent again), all connections together.",
                quic.lost_packets,
            ),
            (
                "quic_lost_bytes",
                "Bytes of the QUIC packets declared lost.",
                quic.lost_bytes,
            ),
            (
                "quic_congestion_events",
                "QUIC congestion events (the congestion window cut), all connections together.",
                quic.congestion_events,
            ),
        ];
        for (name, help, value) in totals {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        let rtt_mean = if quic.connections == 0 {
            0.0
        } else {
            quic.rtt_sum_s / quic.connections as f64
        };
        for (name, help, value) in [
            (
                "quic_rtt_mean",
                "Mean smoothed round-trip time of the connections open now (0: none).",
                rtt_mean,
            ),
            (
                "quic_rtt_max",
                "Largest smoothed round-trip time of the connections open now (0: none).",
                quic.rtt_max_s,
            ),
        ] {
            let family =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        let gauges: [(&str, &str, Option<&Unit>, i64); 5] = [
            (
                "queued",
                "Bytes queued for subscribers, all connections together.",
                Some(&Unit::Bytes),
                get(&stats.queued_bytes) as i64,
            ),
            (
                "governor_intake_per_second",
                "The bulk intake budget the governor allows now (messages per second; 0: off).",
                None,
                get(&stats.governed_intake_per_s) as i64,
            ),
            (
                "log_unavailable_swarms",
                "Swarms whose event log is unavailable now.",
                None,
                get(&stats.log_unavailable_swarms) as i64,
            ),
            (
                "internal_log_unavailable_swarms",
                "The router's own swarms ($control, $affinity, $jobs.*) whose log is unavailable now.",
                None,
                get(&stats.internal_log_unavailable) as i64,
            ),
            (
                "ready",
                "1 while /readyz answers ready.",
                None,
                i64::from(self.ready),
            ),
        ];
        for (name, help, unit, value) in gauges {
            let family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        let state = &self.state;
        for (name, help, value) in [
            (
                "presence_members",
                "Agents present, all swarms together (an agent in two swarms counts once).",
                state.presence_members,
            ),
            ("leases_held", "Leases held now.", state.leases_held),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(family)?;
        }
        labelled(
            &mut encoder,
            "jobs",
            "Jobs in the queue, by state (pending_result: finished, its result not yet taken).",
            Kind::Gauge,
            "state",
            &[
                ("queued", state.jobs_queued),
                ("running", state.jobs_running),
                ("dead_lettered", state.jobs_dead_lettered),
                ("pending_result", state.jobs_pending_results),
            ],
        )?;
        {
            let family = encoder.encode_descriptor(
                "log_appended",
                "Bytes appended to the event logs (records, before compaction).",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            ConstCounter::new(self.log.appended_bytes).encode(family)?;
        }
        for (name, help, unit, histogram, bounds, scale) in [
            (
                "log_commit",
                "One group commit of a log writer: its writes and syncs, from taking the batch to reporting it.",
                Some(&Unit::Seconds),
                &self.log.commit_us,
                &LAG_BUCKETS_S[..],
                1e6,
            ),
            (
                "log_fsync",
                "One fdatasync of one log file (with its directory's when the file is new).",
                Some(&Unit::Seconds),
                &self.log.fsync_us,
                &LAG_BUCKETS_S[..],
                1e6,
            ),
            (
                "log_batch_appends",
                "Appends per group commit (one fdatasync each under log.sync = always).",
                None,
                &self.log.batch_appends,
                &BATCH_BUCKETS[..],
                1.0,
            ),
            (
                "job_queue_wait",
                "A job attempt's wait from ready (submitted, or its retry's backoff over) to leased to a worker.",
                Some(&Unit::Seconds),
                &self.job_timings.queue_wait_us,
                &JOB_BUCKETS_S[..],
                1e6,
            ),
            (
                "job_run",
                "A job attempt's run: leased -> its result, its loss (lease expired, worker gone) or its cancel.",
                Some(&Unit::Seconds),
                &self.job_timings.run_us,
                &JOB_BUCKETS_S[..],
                1e6,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Histogram)?;
            let (sum, count, buckets) = buckets_scaled(histogram, bounds, scale);
            family.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
        }
        for (name, help, histograms) in [
            (
                "event_lag_durable",
                "Publish received -> durable in the event log (and acknowledged to the publisher), by ordered class.",
                &self.durable_lag_us,
            ),
            (
                "event_lag_delivered",
                "Durable -> written to a subscriber's stream, by ordered class (live deliveries; catch-ups from the log are not counted).",
                &self.delivered_lag_us,
            ),
            (
                "event_lag_ack",
                "Publish received -> a subscriber's acknowledgement of it, by ordered class (publish -> apply for applications that ack after applying).",
                &self.ack_lag_us,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for class in Class::ALL.into_iter().filter(|c| c.is_ordered()) {
                let (sum, count, buckets) = buckets_of(&histograms[class.index()]);
                family
                    .encode_family(&class_labels(class))?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        Ok(())
    }
}

/// Whether a family's values are counters or gauges.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A family of one label: each `(label value, number)` of `values`.
fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let metric_type = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
    };
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (value, number) in values {
        let labels = [(label, *value)];
        let metric = family.encode_family(&labels)?;
        match kind {
            Kind::Counter => ConstCounter::new(*number).encode(metric)?,
            Kind::Gauge => ConstGauge::new(*number as i64).encode(metric)?,
        }
    }
    Ok(())
}

/// A microsecond histogram as Prometheus buckets in seconds: the sum, the count, and each
/// bucket's own count (the encoder makes them cumulative), `+Inf` last.
fn buckets_of(histogram: &LagHistogram) -> (f64, u64, Vec<(f64, u64)>) {
    buckets_scaled(histogram, &LAG_BUCKETS_S, 1e6)
}

/// `histogram`'s values divided by `scale`, in buckets of `bounds` (in the scaled unit).
/// An hdr bin that holds a bound counts under it whole: a bucket's edge is exact to the
/// histogram's two significant digits.
fn buckets_scaled(
    histogram: &LagHistogram,
    bounds: &[f64],
    scale: f64,
) -> (f64, u64, Vec<(f64, u64)>) {
    let mut buckets = Vec::with_capacity(bounds.len() + 1);
    let mut below = 0;
    for &bound in bounds {
        let upto = histogram.count_between(0, (bound * scale) as u64);
        buckets.push((bound, upto.saturating_sub(below)));
        below = upto;
    }
    let count = histogram.len();
    buckets.push((f64::MAX, count.saturating_sub(below)));
    let sum = histogram
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / scale;
    (sum, count, buckets)
}

/// Adds `from`'s samples to `into` (the shards' histograms, merged at scrape).
pub fn merge(into: &mut [LagHistogram; 5], from: &[LagHistogram; 5]) {
    for (into, from) in into.iter_mut().zip(from) {
        // Same bounds on both sides: adding cannot fail.
        let _ = into.add(from);
    }
}

/// The log writers' figures, merged.
pub fn log_figures(writers: &[Arc<crate::log::writer::LogMetrics>]) -> LogFigures {
    let mut figures = LogFigures {
        commit_us: swarmbus_proto::core::lag_histogram(),
        batch_appends: swarmbus_proto::core::lag_histogram(),
        fsync_us: swarmbus_proto::core::lag_histogram(),
        appended_bytes: 0,
    };
    // A poisoned lock only held a histogram: read it anyway.
    let read = |lock: &std::sync::Mutex<LagHistogram>, into: &mut LagHistogram| {
        let _ = into.add(&*lock.lock().unwrap_or_else(|p| p.into_inner()));
    };
    for writer in writers {
        read(&writer.commit_us, &mut figures.commit_us);
        read(&writer.batch_appends, &mut figures.batch_appends);
        read(&writer.fsync_us, &mut figures.fsync_us);
        figures.appended_bytes += writer.appended_bytes.load(Ordering::Relaxed);
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_buckets_count_each_sample_once_and_sum_in_seconds() {
        let mut histogram = swarmbus_proto::core::lag_histogram();
        for us in [50, 300, 300, 2_000_000, 100_000_000] {
            histogram.record(us).unwrap();
        }
        let (sum, count, buckets) = buckets_of(&histogram);
        assert_eq!(count, 5);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 5);
        assert_eq!(buckets[0], (0.0001, 1), "50 us under 100 us");
        assert_eq!(buckets[2], (0.0005, 2), "300 us under 500 us");
        assert_eq!(buckets.last().unwrap().1, 1, "100 s above every bound");
        // Two significant digits: within 1%.
        assert!((sum - 102.00065).abs() < 1.1, "{sum}");
    }
}
