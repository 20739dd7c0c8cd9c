//! What an agent observed of its deliveries ([`ClientStats`]): publish -> apply lag by
//! class, duplicates its idempotent apply dropped, redeliveries and out-of-order arrivals it
//! saw, reconnects, and the last message of each swarm. The application owns the handle and
//! shares it with what records into it:
//!
//! - [`Deliveries::with_stats`](crate::Deliveries::with_stats): every delivery received
//!   (redeliveries, out-of-order arrivals, last message per swarm);
//! - [`IdempotentApply::with_stats`](crate::IdempotentApply::with_stats): duplicates dropped,
//!   and the apply lag of each op [`IdempotentApply::apply`](crate::IdempotentApply::apply)
//!   ran (an application applying by hand calls [`ClientStats::applied`]);
//! - [`ClientStats::on_event`] as a [`ReconnectOptions`](crate::ReconnectOptions) hook:
//!   reconnects.
//!
//! With the `prometheus` feature, [`ClientStats::register`] adds it to a
//! `prometheus-client` registry, read at scrape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use swarmbus_schema::{Class, Deliver, OpId};

use crate::reconnect::{EventHook, ReconnectEvent};

/// The last message a client received of one swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastMessage {
    pub class: Class,
    /// Its op id (`OpId::NONE` for unordered classes).
    pub op_id: OpId,
    /// When the router took it (its clock, Unix µs; 0: not stamped) and when it arrived
    /// here (this host's clock, Unix µs).
    pub published_us: u64,
    pub received_us: u64,
}

/// A copy of the figures at one moment (see [`ClientStats::snapshot`]).
#[derive(Clone, Debug)]
pub struct StatsSnapshot {
    /// Publish (the router taking it) -> applied here, per class ([`Class::index`]), µs.
    pub apply_lag_us: [Histogram<u64>; Class::COUNT],
    /// Ordered ops the idempotent apply refused as applied already.
    pub duplicates_dropped: u64,
    /// Ordered deliveries at or below the highest op id already received of their swarm
    /// and class (sent again after a reconnect or a redelivery timeout).
    pub redeliveries: u64,
    /// Ordered deliveries more than one op id above the highest received (an op between
    /// them is missing or comes later).
    pub out_of_order: u64,
    /// Connections re-established (a reconnecting client's resubscribes after the first).
    pub reconnects: u64,
    pub last_message: HashMap<String, LastMessage>,
}

#[derive(Debug)]
struct Inner {
    snapshot: StatsSnapshot,
    /// Highest op id received per (swarm, class), for redeliveries and order.
    highest: HashMap<(String, Class), OpId>,
    /// Resubscribes seen (the first is the connection, not a reconnect).
    resubscribes: u64,
}

/// What a client observed (see the module docs). Cloning shares it.
#[derive(Clone, Debug)]
pub struct ClientStats {
    inner: Arc<Mutex<Inner>>,
}

impl Default for ClientStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Microseconds from 1 µs to 10 minutes, two significant digits.
fn lag_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("constant bounds are valid")
}

/// This host's clock, Unix µs.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl ClientStats {
    pub fn new() -> Self {
        ClientStats {
            inner: Arc::new(Mutex::new(Inner {
                snapshot: StatsSnapshot {
                    apply_lag_us: std::array::from_fn(|_| lag_histogram()),
                    duplicates_dropped: 0,
                    redeliveries: 0,
                    out_of_order: 0,
                    reconnects: 0,
                    last_message: HashMap::new(),
                },
                highest: HashMap::new(),
                resubscribes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only held counts: go on with them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery arrived (what [`Deliveries::with_stats`](crate::Deliveries::with_stats)
    /// calls for each).
    pub fn received(&self, delivery: &Deliver) {
        let received_us = now_us();
        let mut inner = self.lock();
        if delivery.class.is_ordered() && !delivery.op_id.is_none() {
            let key = (delivery.swarm.clone(), delivery.class);
            let highest = inner.highest.get(&key).copied();
            match highest {
                Some(highest) if delivery.op_id <= highest => {
                    inner.snapshot.redeliveries += 1;
                }
                Some(highest) if delivery.op_id.0 > highest.0 + 1 => {
                    inner.snapshot.out_of_order += 1;
                    inner.highest.insert(key, delivery.op_id);
                }
                _ => {
                    inner.highest.insert(key, delivery.op_id);
                }
            }
        }
        let last = LastMessage {
            class: delivery.class,
            op_id: delivery.op_id,
            published_us: delivery.published_us,
            received_us,
        };
        match inner.snapshot.last_message.get_mut(&delivery.swarm) {
            Some(kept) => *kept = last,
            None => {
                inner
                    .snapshot
                    .last_message
                    .insert(delivery.swarm.clone(), last);
            }
        }
    }

    /// `delivery` was applied just now: its publish -> apply lag, from the router's stamp to
    /// this host's clock (the two clocks must agree: one host, or hosts kept in step by
    /// NTP or PTP; a stamp from the future counts as 1 µs, an unstamped one not at all).
    pub fn applied(&self, delivery: &Deliver) {
        if delivery.published_us == 0 {
            return;
        }
        let lag = now_us().saturating_sub(delivery.published_us).max(1);
        self.lock().snapshot.apply_lag_us[delivery.class.index()].saturating_record(lag);
    }

    /// An ordered op the idempotent apply refused as applied already.
    pub fn duplicate_dropped(&self) {
        self.lock().snapshot.duplicates_dropped += 1;
    }

    /// Counts reconnects from a reconnecting client's events.
    pub fn observe(&self, event: &ReconnectEvent) {
        if let ReconnectEvent::Resubscribed { .. } = event {
            let mut inner = self.lock();
            inner.resubscribes += 1;
            inner.snapshot.reconnects = inner.resubscribes.saturating_sub(1);
        }
    }

    /// [`ClientStats::observe`] as a [`ReconnectOptions::on_event`](crate::ReconnectOptions)
    /// hook (wrap it to call another hook as well).
    pub fn on_event(&self) -> EventHook {
        let stats = self.clone();
        Arc::new(move |event| stats.observe(event))
    }

    /// The figures now.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.lock().snapshot.clone()
    }
}

#[cfg(feature = "prometheus")]
mod prometheus {
    //! `ClientStats` as a `prometheus-client` collector: read at scrape, names with the
    //! `swarmbus_client_` prefix (under the registry's own prefix), no per-swarm labels.

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::MetricType;
    use prometheus_client::registry::{Registry, Unit};
    use swarmbus_schema::Class;

    use super::ClientStats;

    /// Upper bounds of the apply lag buckets, seconds: 100 µs to 30 s.
    const BUCKETS_S: [f64; 16] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        10.0, 30.0,
    ];

    impl ClientStats {
        /// Adds these figures to `registry`, read at each scrape.
        pub fn register(&self, registry: &mut Registry) {
            registry.register_collector(Box::new(self.clone()));
        }
    }

    impl Collector for ClientStats {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let snapshot = self.snapshot();
            for (name, help, value) in [
                (
                    "swarmbus_client_duplicates_dropped",
                    "Ordered ops the idempotent apply refused as applied already.",
                    snapshot.duplicates_dropped,
                ),
                (
                    "swarmbus_client_redeliveries",
                    "Ordered deliveries at or below the highest op id already received.",
                    snapshot.redeliveries,
                ),
                (
                    "swarmbus_client_out_of_order",
                    "Ordered deliveries more than one op id above the highest received.",
                    snapshot.out_of_order,
                ),
                (
                    "swarmbus_client_reconnects",
                    "Connections re-established by the reconnecting client.",
                    snapshot.reconnects,
                ),
            ] {
                let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(family)?;
            }
            let mut family = encoder.encode_descriptor(
                "swarmbus_client_apply_lag",
                "The router taking a publish -> this client applying it, by class.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for class in Class::ALL {
                let histogram = &snapshot.apply_lag_us[class.index()];
                let mut buckets = Vec::with_capacity(BUCKETS_S.len() + 1);
                let mut below = 0;
                for bound in BUCKETS_S {
                    let upto = histogram.count_between(0, (bound * 1e6) as u64);
                    buckets.push((bound, upto.saturating_sub(below)));
                    below = upto;
                }
                buckets.push((f64::MAX, histogram.len().saturating_sub(below)));
                let sum = histogram
                    .iter_recorded()
                    .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
                    .sum::<f64>()
                    / 1e6;
                family
                    .encode_family(&[("class", class.name())])?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum,
                    histogram.len(),
                    &buckets,
                    None,
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use swarmbus_schema::Epoch;

    fn deliver(swarm: &str, class: Class, op: u64, published_us: u64) -> Deliver {
        Deliver {
            swarm: swarm.into(),
            class,
            op_id: OpId(op),
            epoch: Epoch(1),
            source_agent: "ctl".into(),
            target_agent: None,
            key: None,
            payload: Bytes::new(),
            fencing_token: 0,
            lease: None,
            published_us,
        }
    }

    #[test]
    fn arrivals_count_redeliveries_gaps_and_keep_the_last_message() {
        let stats = ClientStats::new();
        for op in [1, 2, 2, 5, 3, 6] {
            stats.received(&deliver("s", Class::Command, op, 0));
        }
        // Control ops have their own sequence of arrivals.
        stats.received(&deliver("s", Class::Control, 1, 0));
        stats.received(&deliver("t", Class::Telemetry, 0, 7));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.redeliveries, 2, "2 again, and 3 below 5");
        assert_eq!(snapshot.out_of_order, 1, "5 after 2");
        assert_eq!(snapshot.last_message["s"].op_id, OpId(1));
        assert_eq!(snapshot.last_message["s"].class, Class::Control);
        assert_eq!(snapshot.last_message["t"].published_us, 7);
    }

    #[test]
    fn apply_lag_runs_from_the_router_stamp_to_now() {
        let stats = ClientStats::new();
        let published = now_us() - 250_000;
        stats.applied(&deliver("s", Class::Command, 1, published));
        stats.applied(&deliver("s", Class::Command, 2, 0)); // not stamped: not counted
        stats.applied(&deliver("s", Class::Telemetry, 0, now_us() + 10_000_000));
        let snapshot = stats.snapshot();
        let command = &snapshot.apply_lag_us[Class::Command.index()];
        assert_eq!(command.len(), 1);
        assert!(command.max() >= 250_000 && command.max() < 10_000_000);
        // A stamp from the future (clocks apart) counts as no lag.
        assert_eq!(snapshot.apply_lag_us[Class::Telemetry.index()].max(), 1);
    }

    #[cfg(feature = "prometheus")]
    #[test]
    fn registered_stats_encode_as_prometheus_text() {
        let stats = ClientStats::new();
        stats.applied(&deliver("s", Class::Command, 1, now_us() - 1_000));
        stats.duplicate_dropped();
        let mut registry = prometheus_client::registry::Registry::default();
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("swarmbus_client_duplicates_dropped_total 1"),
            "{text}"
        );
        assert!(
            text.contains("swarmbus_client_apply_lag_seconds_count{class=\"command\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn reconnects_are_resubscribes_after_the_first() {
        let stats = ClientStats::new();
        let hook = stats.on_event();
        let resubscribed = ReconnectEvent::Resubscribed {
            at: std::time::Instant::now(),
            subscriptions: 1,
        };
        hook(&resubscribed);
        assert_eq!(stats.snapshot().reconnects, 0, "the first connection");
        hook(&resubscribed);
        hook(&resubscribed);
        assert_eq!(stats.snapshot().reconnects, 2);
    }
}
