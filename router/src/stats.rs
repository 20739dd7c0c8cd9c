//! Router-wide counters (relaxed atomics; read with [`Stats::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use swarmbus_proto::core::{lag_histogram, LagHistogram};
use swarmbus_schema::Class;

#[derive(Debug, Default)]
pub struct Stats {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused_busy: AtomicU64,
    /// Sessions refused at Hello for their credential (missing, invalid, not granting).
    pub auth_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Publishes accepted, by class ([`swarmbus_schema::Class::index`]).
    pub published_by_class: [AtomicU64; 5],
    /// Messages handed to subscribers' queues, by class.
    pub delivered_by_class: [AtomicU64; 5],
    /// Sessions open now, by role (agent, controller, worker).
    pub sessions_by_role: [AtomicU64; 3],
    /// Lease requests granted (acquire or renew) and refused.
    pub lease_grants: AtomicU64,
    pub lease_refusals: AtomicU64,
    /// Agents that left presence, by reason: closed, timeout, replaced.
    pub presence_leaves: [AtomicU64; 3],
    /// Internal swarms (`$`-prefixed: the control plane, pins, jobs) whose log is
    /// unavailable now; the router is not ready while any is.
    pub internal_log_unavailable: AtomicU64,
    pub telemetry_shed: AtomicU64,
    pub lagging_disconnects: AtomicU64,
    /// Ordered-class subscribers switched to catching up from the log (queue full).
    pub lagging_catch_ups: AtomicU64,
    /// Unacknowledged publishes refused without a reply (e.g. to a swarm not joined).
    pub refused_unacknowledged: AtomicU64,
    /// Publishes refused with RateLimited.
    pub rate_limited_refused: AtomicU64,
    /// Fire-and-forget publishes dropped by the rate limit.
    pub rate_limited_dropped: AtomicU64,
    /// Circuit breaker state changes.
    pub breaker_transitions: AtomicU64,
    /// Publishes refused with CircuitOpen (an open breaker), and fire-and-forget ones it
    /// dropped.
    pub breaker_refused: AtomicU64,
    pub breaker_dropped: AtomicU64,
    /// Bytes queued for delivery in all connections' outboxes now, and the most ever.
    pub queued_bytes: AtomicU64,
    pub queued_bytes_max: AtomicU64,
    /// The most bytes ever queued for one connection.
    pub connection_queued_bytes_max: AtomicU64,
    /// Worker replies dropped: answered already, past their deadline, or from a worker the
    /// request was not sent to (failed over).
    pub late_replies: AtomicU64,
    /// Publish streams read from the bulk runtime (telemetry and job streams), and the
    /// others, read on the main runtime, since start.
    pub bulk_streams: AtomicU64,
    pub main_streams: AtomicU64,
    /// Bulk connections attached to their sessions, since start.
    pub bulk_attached: AtomicU64,
    /// Telemetry publishes sent to the other routers of the cluster, those shed because the
    /// NATS client's queue was full, and those received from other routers, since start.
    pub telemetry_bridged_out: AtomicU64,
    pub telemetry_bridge_dropped: AtomicU64,
    pub telemetry_bridged_in: AtomicU64,
    /// Messages on the telemetry subjects that were not a well-formed publish of the
    /// subject's swarm (dropped), since start.
    pub telemetry_bridge_rejected: AtomicU64,
    /// Times another router of the cluster took op ids this router had given out, so the
    /// ordered publishes holding them were refused with `Conflict` (each time counts
    /// once, however many publishes it refused), since start.
    pub publish_conflicts: AtomicU64,
    /// Control and command publishes sessions sent, since start (the governor's activity
    /// signal; the router's own records are not counted).
    pub ordered_published: AtomicU64,
    /// The governed intake budget for telemetry and job messages now, messages per second
    /// (0: unlimited).
    pub governed_intake_per_s: AtomicU64,
    /// Times the governor cut that budget, since start.
    pub governor_cuts: AtomicU64,
    /// Event log appends that failed (each takes its swarm offline until it recovers).
    pub log_write_failures: AtomicU64,
    /// Swarms whose log took writes again after a failure, since start.
    pub log_recoveries: AtomicU64,
    /// Swarms unavailable now because their log failed (not counting damage found at
    /// start-up).
    pub log_unavailable_swarms: AtomicU64,
    /// Ordered-class subscribers rewound to their last acknowledgement because it did not
    /// come within the redelivery timeout (each is sent those ops again).
    pub redeliveries: AtomicU64,
    /// Durable -> written to the subscriber's stream, per class, of live deliveries.
    pub delivery_lag: LagStripes,
    /// The QUIC path figures of connections that ended (live ones are read at a scrape).
    pub quic_ended: QuicTotals,
}

/// QUIC path counters summed over connections (quinn's `PathStats`).
#[derive(Debug, Default)]
pub struct QuicTotals {
    pub sent_packets: AtomicU64,
    pub lost_packets: AtomicU64,
    pub lost_bytes: AtomicU64,
    pub congestion_events: AtomicU64,
}

impl QuicTotals {
    /// Adds what `connection` counted.
    pub fn add(&self, connection: &quinn::Connection) {
        let path = connection.stats().path;
        for (total, value) in [
            (&self.sent_packets, path.sent_packets),
            (&self.lost_packets, path.lost_packets),
            (&self.lost_bytes, path.lost_bytes),
            (&self.congestion_events, path.congestion_events),
        ] {
            total.fetch_add(value, Ordering::Relaxed);
        }
    }
}

/// Stripes of [`LagStripes`]: writers of different connections rarely share one.
const LAG_STRIPES: usize = 8;

/// Lag histograms (µs, per class) recorded by many tasks and merged at a scrape. A task
/// records into the stripe of its connection, a batch of samples per lock, so the lanes of
/// different connections seldom wait for each other (an hdr histogram cannot be updated
/// through atomics, and one per connection would cost 150 KiB each).
#[derive(Debug)]
pub struct LagStripes {
    stripes: Box<[Mutex<[LagHistogram; 5]>]>,
}

impl Default for LagStripes {
    fn default() -> Self {
        LagStripes {
            stripes: (0..LAG_STRIPES)
                .map(|_| Mutex::new(std::array::from_fn(|_| lag_histogram())))
                .collect(),
        }
    }
}

impl LagStripes {
    /// Records, for `class`, the time from each of `since` to `now`.
    pub fn record(&self, key: u64, class: Class, since: &[Instant], now: Instant) {
        if since.is_empty() {
            return;
        }
        let stripe = &self.stripes[key as usize % self.stripes.len()];
        // A poisoned lock only held histograms: go on with them.
        let mut histograms = stripe.lock().unwrap_or_else(|p| p.into_inner());
        let histogram = &mut histograms[class.index()];
        for at in since {
            let lag = now.saturating_duration_since(*at).as_micros();
            histogram.saturating_record(lag.max(1) as u64);
        }
    }

    /// Every stripe's samples together.
    pub fn merged(&self) -> [LagHistogram; 5] {
        let mut merged: [LagHistogram; 5] = std::array::from_fn(|_| lag_histogram());
        for stripe in self.stripes.iter() {
            let histograms = stripe.lock().unwrap_or_else(|p| p.into_inner());
            for (into, from) in merged.iter_mut().zip(histograms.iter()) {
                // Same bounds on both sides: adding cannot fail.
                let _ = into.add(from);
            }
        }
        merged
    }
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connections_accepted: u64,
    pub connections_open: u64,
    pub connections_refused_busy: u64,
    pub auth_refused: u64,
    pub protocol_errors: u64,
    pub published: u64,
    pub delivered: u64,
    pub telemetry_shed: u64,
    pub lagging_disconnects: u64,
    pub lagging_catch_ups: u64,
    pub refused_unacknowledged: u64,
    pub rate_limited_refused: u64,
    pub rate_limited_dropped: u64,
    pub breaker_transitions: u64,
    pub breaker_refused: u64,
    pub breaker_dropped: u64,
    pub queued_bytes: u64,
    pub queued_bytes_max: u64,
    pub connection_queued_bytes_max: u64,
    pub late_replies: u64,
    pub bulk_streams: u64,
    pub main_streams: u64,
    pub bulk_attached: u64,
    pub telemetry_bridged_out: u64,
    pub telemetry_bridge_dropped: u64,
    pub telemetry_bridged_in: u64,
    pub telemetry_bridge_rejected: u64,
    pub publish_conflicts: u64,
    pub ordered_published: u64,
    pub governed_intake_per_s: u64,
    pub governor_cuts: u64,
    pub log_write_failures: u64,
    pub log_recoveries: u64,
    pub log_unavailable_swarms: u64,
}

/// The index of `role` in [`Stats::sessions_by_role`].
pub fn role_index(role: swarmbus_schema::Role) -> usize {
    match role {
        swarmbus_schema::Role::Agent => 0,
        swarmbus_schema::Role::Controller => 1,
        swarmbus_schema::Role::Worker => 2,
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_open: get(&self.connections_open),
            connections_refused_busy: get(&self.connections_refused_busy),
            auth_refused: get(&self.auth_refused),
            protocol_errors: get(&self.protocol_errors),
            published: self.published_by_class.iter().map(get).sum(),
            delivered: self.delivered_by_class.iter().map(get).sum(),
            telemetry_shed: get(&self.telemetry_shed),
            lagging_disconnects: get(&self.lagging_disconnects),
            lagging_catch_ups: get(&self.lagging_catch_ups),
            refused_unacknowledged: get(&self.refused_unacknowledged),
            rate_limited_refused: get(&self.rate_limited_refused),
            rate_limited_dropped: get(&self.rate_limited_dropped),
            breaker_transitions: get(&self.breaker_transitions),
            breaker_refused: get(&self.breaker_refused),
            breaker_dropped: get(&self.breaker_dropped),
            queued_bytes: get(&self.queued_bytes),
            queued_bytes_max: get(&self.queued_bytes_max),
            connection_queued_bytes_max: get(&self.connection_queued_bytes_max),
            late_replies: get(&self.late_replies),
            bulk_streams: get(&self.bulk_streams),
            main_streams: get(&self.main_streams),
            bulk_attached: get(&self.bulk_attached),
            telemetry_bridged_out: get(&self.telemetry_bridged_out),
            telemetry_bridge_dropped: get(&self.telemetry_bridge_dropped),
            telemetry_bridged_in: get(&self.telemetry_bridged_in),
            telemetry_bridge_rejected: get(&self.telemetry_bridge_rejected),
            publish_conflicts: get(&self.publish_conflicts),
            ordered_published: get(&self.ordered_published),
            governed_intake_per_s: get(&self.governed_intake_per_s),
            governor_cuts: get(&self.governor_cuts),
            log_write_failures: get(&self.log_write_failures),
            log_recoveries: get(&self.log_recoveries),
            log_unavailable_swarms: get(&self.log_unavailable_swarms),
        }
    }
}
