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
//!   reconnects (one hook per reconnecting client).
//!
//! With the `prometheus` feature, [`ClientStats::register`] adds it to a
//! `prometheus-client` registry, read at scrape.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use swarmbus_schema::{Class, Deliver, Epoch, OpId};

use crate::reconnect::{EventHook, ReconnectEvent};

/// The last message a client received of one swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastMessage {
    pub class: Class,
    /// Its op id (`OpId::NONE` for unordered classes).
    pub op_id: OpId,
    /// When the router took it (its host's wall clock, Unix µs; 0: not stamped) and when
    /// it arrived here (this host's wall clock, Unix µs).
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
    /// Ordered deliveries of an op the same stream had received already (sent again after
    /// a reconnect or a redelivery timeout).
    pub redeliveries: u64,
    /// Ordered deliveries that came after a later op of their swarm and class (they filled
    /// a gap in the op ids the stream had received).
    pub out_of_order: u64,
    /// Connections re-established after a disconnection (see [`ClientStats::on_event`]).
    pub reconnects: u64,
    pub last_message: HashMap<String, LastMessage>,
}

/// What the figures are kept in.
#[derive(Debug)]
struct Inner {
    snapshot: StatsSnapshot,
}

/// What one delivery stream received of each swarm's ordered ops, to tell redeliveries and
/// late arrivals from new ops (kept by the stream: two streams sharing a [`ClientStats`] do
/// not see each other's ops as redeliveries).
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    /// Per swarm, per ordered class (control, command).
    swarms: HashMap<String, [ClassArrivals; 2]>,
}

#[derive(Debug, Default)]
struct ClassArrivals {
    /// The epoch of the ops seen (a new epoch starts over: op ids restart there).
    epoch: Epoch,
    highest: OpId,
    /// Op id ranges skipped so far (`from..=to`), oldest first, at most [`MAX_GAPS`]: an op
    /// in one arrived late; one below `highest` in none is a redelivery.
    gaps: VecDeque<(u64, u64)>,
}

/// Gaps remembered per swarm and class; past it the oldest is forgotten (a subscriber
/// that filters by source, or is sent only targeted ops, sees gaps that never fill).
const MAX_GAPS: usize = 64;

/// What an arrival was, as [`Arrivals::arrived`] tells it.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    New,
    Late,
    Again,
}

impl Arrivals {
    fn arrived(&mut self, delivery: &Deliver) -> Arrival {
        let slot = match delivery.class {
            Class::Control => 0,
            Class::Command => 1,
            _ => return Arrival::New,
        };
        if delivery.op_id.is_none() {
            return Arrival::New;
        }
        let class = match self.swarms.get_mut(delivery.swarm.as_str()) {
            Some(classes) => &mut classes[slot],
            None => &mut self.swarms.entry(delivery.swarm.clone()).or_default()[slot],
        };
        let op = delivery.op_id.0;
        if class.epoch != delivery.epoch {
            *class = ClassArrivals {
                epoch: delivery.epoch,
                ..ClassArrivals::default()
            };
        }
        if op > class.highest.0 {
            // Ops before the first one seen are not a gap: the stream started there.
            if class.highest.0 > 0 && op > class.highest.0 + 1 {
                if class.gaps.len() == MAX_GAPS {
                    class.gaps.pop_front();
                }
                class.gaps.push_back((class.highest.0 + 1, op - 1));
            }
            class.highest = delivery.op_id;
            return Arrival::New;
        }
        let Some(index) = class
            .gaps
            .iter()
            .position(|(from, to)| (*from..=*to).contains(&op))
        else {
            return Arrival::Again;
        };
        // Filled: the gap splits around it.
        let (from, to) = class.gaps[index];
        class.gaps.remove(index);
        if op < to {
            class.gaps.insert(index, (op + 1, to));
        }
        if from < op {
            class.gaps.insert(index, (from, op - 1));
        }
        Arrival::Late
    }
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
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only held counts: go on with them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery arrived on a stream whose ops so far are `arrivals` (what
    /// [`Deliveries::with_stats`](crate::Deliveries::with_stats) calls for each).
    pub(crate) fn received(&self, delivery: &Deliver, arrivals: &mut Arrivals) {
        let arrival = arrivals.arrived(delivery);
        let received_us = now_us();
        let mut inner = self.lock();
        match arrival {
            Arrival::New => {}
            Arrival::Late => inner.snapshot.out_of_order += 1,
            Arrival::Again => inner.snapshot.redeliveries += 1,
        }
        let last = LastMessage {
            class: delivery.class,
            op_id: delivery.op_id,
            published_us: delivery.published_us,
            received_us,
        };
        match inner.snapshot.last_message.get_mut(delivery.swarm.as_str()) {
            Some(kept) => *kept = last,
            None => {
                inner
                    .snapshot
                    .last_message
                    .insert(delivery.swarm.clone(), last);
            }
        }
    }

    /// `delivery` was applied just now: its publish -> apply lag, from the router's stamp
    /// (its host's wall clock) to this host's wall clock (the two must agree: one host, or
    /// hosts kept in step by NTP or PTP; a stamp from the future counts as 1 µs, an
    /// unstamped one not at all).
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

    /// A [`ReconnectOptions::on_event`](crate::ReconnectOptions) hook for one reconnecting
    /// client: each resubscription after a disconnection counts as a reconnect (wrap it to
    /// call another hook as well; give each client a hook of its own).
    pub fn on_event(&self) -> EventHook {
        let stats = self.clone();
        let disconnected = Arc::new(AtomicBool::new(false));
        Arc::new(move |event| match event {
            ReconnectEvent::Disconnected { .. } => disconnected.store(true, Ordering::Relaxed),
            ReconnectEvent::Resubscribed { .. } if disconnected.swap(false, Ordering::Relaxed) => {
                stats.lock().snapshot.reconnects += 1;
            }
            _ => {}
        })
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
                    "Ordered deliveries of an op their stream had received already.",
                    snapshot.redeliveries,
                ),
                (
                    "swarmbus_client_out_of_order",
                    "Ordered deliveries that came after a later op (they filled a gap).",
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
    fn arrivals_count_redeliveries_late_ops_and_keep_the_last_message() {
        let stats = ClientStats::new();
        let mut stream = Arrivals::default();
        for op in [1, 2, 2, 5, 3, 6, 4, 4] {
            stats.received(&deliver("s", Class::Command, op, 0), &mut stream);
        }
        // Control ops have their own sequence of arrivals.
        stats.received(&deliver("s", Class::Control, 1, 0), &mut stream);
        stats.received(&deliver("t", Class::Telemetry, 0, 7), &mut stream);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.redeliveries, 2, "2 again, 4 again");
        assert_eq!(snapshot.out_of_order, 2, "3 and 4 after 5");
        assert_eq!(snapshot.last_message["s"].op_id, OpId(1));
        assert_eq!(snapshot.last_message["s"].class, Class::Control);
        assert_eq!(snapshot.last_message["t"].published_us, 7);
        // Another stream sharing the stats: its first ops are new to it.
        let mut other = Arrivals::default();
        stats.received(&deliver("s", Class::Command, 1, 0), &mut other);
        assert_eq!(stats.snapshot().redeliveries, 2);
        // A new epoch starts over: op 1 of it is new.
        let mut next = deliver("s", Class::Command, 1, 0);
        next.epoch = Epoch(2);
        stats.received(&next, &mut stream);
        assert_eq!(stats.snapshot().redeliveries, 2);
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
    fn reconnects_are_resubscribes_after_a_disconnection() {
        let stats = ClientStats::new();
        let hook = stats.on_event();
        let at = std::time::Instant::now();
        let resubscribed = ReconnectEvent::Resubscribed {
            at,
            subscriptions: 1,
        };
        let disconnected = ReconnectEvent::Disconnected {
            at,
            error: crate::ClientError::Closed {
                code: None,
                reason: String::new(),
            },
        };
        hook(&resubscribed);
        assert_eq!(stats.snapshot().reconnects, 0, "the first connection");
        hook(&disconnected);
        hook(&resubscribed);
        hook(&resubscribed);
        // A second client's hook: its first connection is not a reconnect.
        stats.on_event()(&resubscribed);
        assert_eq!(stats.snapshot().reconnects, 1);
    }
}
