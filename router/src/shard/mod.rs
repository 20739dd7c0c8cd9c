//! Routing shards: each owns a [`Core`] for the swarms hashed to it and runs as one task,
//! fed through two bounded channels. Nothing is shared between shards, so the hot path takes
//! no global lock.
//!
//! Inbound isolation: telemetry never enters the shard. It is neither sequenced nor logged,
//! so the session that reads it routes it itself, on the runtime that read it, from a copy
//! of the swarm's telemetry subscribers that the shard keeps up to date
//! ([`TelemetryRoutes`]). The job queue's swarms (`$jobs.*`) have shards of their own on the
//! bulk runtime; their records arrive on the **bulk** channel, everything else
//! (control, command, alert, reconciliation, subscriptions, acks, disconnects) on its
//! **urgent** channel, and the shard always empties the urgent one first. A full channel makes
//! the sending stream reader wait, which is the backpressure that reaches the publisher through
//! QUIC flow control - on that class's stream only, so neither a telemetry flood nor a job
//! backlog can hold up a command on its way in or take the shard's time.
//!
//! Layout: this file holds the commands, the senders and the shard's loop; `reads` the log
//! reads on the blocking pool (catch-ups, deltas); `recovery` a swarm whose log failed.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use swarmbus_schema::{
    decode, encode, Class, DecodeOptions, DeltaAck, Epoch, Message, OpId, OutFrame, Publish,
    Subscription,
};
use tokio::sync::mpsc;

mod reads;
mod recovery;
mod shared;

use crate::log::{LogBackend, LogEvent};
use crate::outbox::Outbox;
use crate::stats::Stats;
use swarmbus_proto::core::{
    deliver_head, targeted_elsewhere, Action, Core, CoreConfig, CoreError, DeltaQuery, ReplayedOp,
    TelemetryRoute,
};
use swarmbus_proto::Lane;
use swarmbus_proto::{ConnId, Now};

/// The subscriptions a session holds, as (swarm, class, agent filter).
pub type HeldSubscriptions = Arc<Mutex<HashSet<(String, Class, Option<String>)>>>;

/// Inputs of a shard.
#[derive(Debug)]
pub enum ShardCommand {
    Subscribe {
        conn: ConnId,
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        subscription: Subscription,
        /// The session's set, from which a refused subscription is removed again.
        held: HeldSubscriptions,
        /// The agent's resume point in this swarm (ordered classes), from its Hello.
        resume: Option<(Epoch, OpId)>,
    },
    Delta {
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        request_id: u64,
        swarm: String,
        from: OpId,
        to: OpId,
    },
    Unsubscribe {
        outbox: Arc<Outbox>,
        subscription: Subscription,
    },
    Publish {
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        publish: Publish,
        /// When the session read an ordered publish: its event lag counts the wait for the
        /// shard too. `None` for telemetry, which is never made durable (no clock read).
        received: Option<std::time::Instant>,
    },
    Ack {
        outbox: Arc<Outbox>,
        swarm: String,
        class: Class,
        op_id: OpId,
    },
    Disconnect {
        conn: ConnId,
    },
    /// A controller paused or resumed the swarm.
    Pause {
        swarm: String,
        paused: bool,
    },
    /// A message the router itself publishes.
    RouterPublish(RouterPublish),
    /// The shard's event lag histograms, for a scrape of `/metrics`.
    Metrics {
        reply: tokio::sync::oneshot::Sender<ShardMetrics>,
    },
    /// A summary of each of the shard's swarms, for the admin view.
    Swarms {
        reply: tokio::sync::oneshot::Sender<Vec<swarmbus_proto::core::SwarmSummary>>,
    },
    /// Reads back the record of op `op` of `swarm` (a job's payload kept on disk only):
    /// its Deliver frame, with its length prefix; or why not, and whether to ask again (a
    /// compaction removed the file the read was planned on).
    ReadRecord {
        swarm: String,
        op: OpId,
        reply: tokio::sync::oneshot::Sender<Result<bytes::Bytes, (bool, String)>>,
    },
}

/// A message the router itself publishes, as agent `swarmbus-router`: a record of one of
/// its internal swarms (class control, to `$control`, `$affinity`, `$jobs.*`), sequenced and
/// made durable like any control message, or an alert (breaker and presence events).
/// `reply`, when given, gets the op id once durable (`OpId::NONE` at once for an unordered
/// class), or why it was refused.
#[derive(Debug)]
pub struct RouterPublish {
    pub swarm: String,
    pub class: Class,
    pub key: String,
    pub payload: bytes::Bytes,
    pub reply: Option<InternalReply>,
}

/// The answer to a [`RouterPublish`]: the op id once durable.
pub type InternalReply = tokio::sync::oneshot::Sender<Result<OpId, String>>;

/// The publisher handle of the router's own publishes in every shard's core: the shard
/// answers what the core replies to it through the publishes' [`InternalReply`]s, so
/// nothing is ever queued on it. Connection ids are counted up from 1 and never reach it.
const INTERNAL_CONN: ConnId = ConnId(u64::MAX);

impl ShardCommand {
    /// The job queue's records and reads (and telemetry, were it sent through the channels)
    /// go to the bulk channel; everything else is urgent, so a job backlog does not delay
    /// commands.
    fn is_bulk(&self) -> bool {
        match self {
            ShardCommand::Publish { publish, .. } => {
                publish.class == Class::Telemetry
                    || publish
                        .swarm
                        .starts_with(swarmbus_proto::jobs::JOBS_SWARM_PREFIX)
            }
            ShardCommand::RouterPublish(publish) => publish
                .swarm
                .starts_with(swarmbus_proto::jobs::JOBS_SWARM_PREFIX),
            ShardCommand::ReadRecord { .. } => true,
            _ => false,
        }
    }
}

/// The telemetry subscribers of a shard's swarms, as copies the shard replaces whenever a
/// subscription, a disconnect or a swarm's availability changes them. Sessions route
/// telemetry from these copies on their own runtime (the bulk runtime for telemetry
/// streams), so a telemetry flood takes none of the shard's time. Readers hold the lock
/// only to clone one `Arc`; the shard holds it only to swap entries.
#[derive(Debug, Default)]
pub struct TelemetryRoutes {
    swarms: RwLock<HashMap<Arc<str>, Arc<Route>>>,
    /// The other routers of the cluster, with `jetstream.share_telemetry`.
    bridge: std::sync::OnceLock<Arc<crate::bridge::TelemetryBridge>>,
}

/// One swarm's telemetry route, with the router's subscriber handles.
type Route = TelemetryRoute<Arc<Outbox>>;

impl TelemetryRoutes {
    fn route(&self, swarm: &str) -> Option<Arc<Route>> {
        self.swarms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(swarm)
            .cloned()
    }

    fn apply(&self, changes: Vec<(Arc<str>, Option<Route>)>) {
        if changes.is_empty() {
            return;
        }
        let mut swarms = self
            .swarms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bridge = self.bridge.get();
        for (name, route) in changes {
            if let Some(bridge) = bridge {
                let wanted = route.as_ref().is_some_and(Route::has_subscribers);
                bridge.interest(name.clone(), wanted);
            }
            match route {
                Some(route) => swarms.insert(name, Arc::new(route)),
                None => swarms.remove(&name),
            };
        }
    }

    /// Sends this shard's telemetry to the other routers too, and asks for theirs in the
    /// swarms with subscribers here (from now on; set at start, before any subscriber).
    pub fn set_bridge(&self, bridge: Arc<crate::bridge::TelemetryBridge>) {
        let _ = self.bridge.set(bridge);
    }

    /// Delivers a telemetry publish another router took, as [`TelemetryRoutes::publish`]
    /// would have here (no acknowledgement, not sent on again).
    pub fn deliver_bridged(&self, stats: &Stats, bridged: &crate::bridge::Bridged) {
        let publish = &bridged.publish;
        let Some(route) = self.route(&publish.swarm) else {
            return;
        };
        let (source, target) = (&bridged.source_agent, publish.target_agent.as_deref());
        if route.unavailable.is_some() || !route.wanted(source, target) {
            return;
        }
        let frame = OutFrame {
            head: deliver_head(
                publish,
                source,
                OpId::NONE,
                Epoch::default(),
                bridged.published_us,
            ),
            body: publish.payload.clone(),
        };
        let mut delivered = 0u64;
        for to in route.recipients(source, target) {
            let _ = to.push(Lane::Class(Class::Telemetry), frame.clone());
            delivered += 1;
        }
        stats.delivered_by_class[Class::Telemetry.index()].fetch_add(delivered, Ordering::Relaxed);
    }

    /// Routes one telemetry publish of `agent` (whose session is behind `outbox`), as the
    /// core would: every subscriber that wants it gets it once on its telemetry lane (which
    /// sheds its oldest frames when full); a swarm nobody subscribes in takes nothing; an
    /// unavailable swarm refuses it. Acknowledged (`request_id` set) like any publish.
    fn publish(&self, stats: &Stats, agent: &str, outbox: &Outbox, publish: &Publish) {
        let mut delivered = 0u64;
        let route = self.route(&publish.swarm);
        if let Some(reason) = route.as_ref().and_then(|r| r.unavailable.as_ref()) {
            if publish.request_id != 0 {
                refuse(
                    outbox,
                    publish.request_id,
                    &CoreError::Unavailable {
                        swarm: publish.swarm.clone(),
                        reason: reason.clone(),
                    },
                );
            }
            return;
        }
        let target = publish.target_agent.as_deref();
        let route = route.filter(|route| route.wanted(agent, target));
        // Stamped only when someone may receive it: the clock is read once per publish
        // that goes somewhere (to another router, whose subscribers may want it, too).
        let bridge = self.bridge.get();
        let published_us = (bridge.is_some() || route.is_some()).then(crate::clock::wall_us_now);
        if let (Some(bridge), Some(at)) = (bridge, published_us) {
            bridge.send(agent, publish, at);
        }
        if let (Some(route), Some(published_us)) = (route, published_us) {
            let frame = OutFrame {
                head: deliver_head(publish, agent, OpId::NONE, Epoch::default(), published_us),
                body: publish.payload.clone(),
            };
            for to in route.recipients(agent, target) {
                // A lagging subscriber is closed by its connection driver; until then
                // pushes are discarded.
                let _ = to.push(Lane::Class(Class::Telemetry), frame.clone());
                delivered += 1;
            }
        }
        let telemetry = Class::Telemetry.index();
        stats.published_by_class[telemetry].fetch_add(1, Ordering::Relaxed);
        stats.delivered_by_class[telemetry].fetch_add(delivered, Ordering::Relaxed);
        if publish.request_id != 0 {
            reply(
                outbox,
                &Message::PublishAck {
                    request_id: publish.request_id,
                    op_id: OpId::NONE,
                    epoch: Epoch::default(),
                },
            );
        }
    }
}

/// The sending side of one shard's two channels, and the telemetry routes it keeps.
#[derive(Clone, Debug)]
pub struct ShardSender {
    urgent: mpsc::Sender<ShardCommand>,
    bulk: mpsc::Sender<ShardCommand>,
    telemetry: Arc<TelemetryRoutes>,
    stats: Arc<Stats>,
}

impl ShardSender {
    /// The shard's telemetry routes (the bridge to other routers delivers into them).
    pub fn telemetry_routes(&self) -> &Arc<TelemetryRoutes> {
        &self.telemetry
    }

    /// Queues a command, waiting while its channel is full; a telemetry publish is routed
    /// at once by the caller instead ([`TelemetryRoutes`]). Fails only once the shard has
    /// stopped (router shutdown).
    pub async fn send(&self, command: ShardCommand) -> Result<(), ShardStopped> {
        if let ShardCommand::Publish {
            agent,
            outbox,
            publish,
            ..
        } = &command
        {
            if publish.class == Class::Telemetry {
                if self.urgent.is_closed() {
                    return Err(ShardStopped);
                }
                self.telemetry.publish(&self.stats, agent, outbox, publish);
                return Ok(());
            }
        }
        let channel = if command.is_bulk() {
            &self.bulk
        } else {
            &self.urgent
        };
        channel.send(command).await.map_err(|_| ShardStopped)
    }
}

/// What a shard measured, since it started.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// Publish received -> durable, per class, microseconds.
    pub durable_lag_us: [swarmbus_proto::core::LagHistogram; 5],
    /// Publish received -> a subscriber's acknowledgement, per class, microseconds.
    pub ack_lag_us: [swarmbus_proto::core::LagHistogram; 5],
    /// Acks not measured in `ack_lag_us` (their op was out of the window).
    pub ack_lag_unmeasured: u64,
}

/// The shard is gone (the router is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStopped;

/// Starts a shard on the current runtime; `capacity` bounds each of its two input
/// channels. The shard's swarms are those `log` recovered plus any created later; `events`
/// carries the log writer's reports for this shard.
pub fn spawn_shard(
    capacity: usize,
    core_config: CoreConfig,
    maintenance_interval: std::time::Duration,
    log: Box<dyn LogBackend>,
    events: mpsc::UnboundedReceiver<LogEvent>,
    stats: Arc<Stats>,
    clock: crate::clock::Clock,
) -> ShardSender {
    let (urgent_tx, urgent_rx) = mpsc::channel(capacity);
    let (bulk_tx, bulk_rx) = mpsc::channel(capacity);
    let mut core = Core::with_config(core_config);
    for (name, state) in log.swarms() {
        core.restore_swarm(&name, state.epoch, state.last_op, state.unavailable);
        if log.is_shared(&name) {
            core.mark_shared(&name);
        }
    }
    let telemetry = Arc::new(TelemetryRoutes::default());
    telemetry.apply(core.take_telemetry_changes());
    let (reads_done, reads_rx) = mpsc::unbounded_channel();
    let shard = Shard {
        core,
        log,
        stats: stats.clone(),
        maintenance_interval,
        telemetry: telemetry.clone(),
        recovering: HashMap::new(),
        clock,
        reads_done,
        catch_up_reads: HashSet::new(),
        delta_reads: HashSet::new(),
        waiting_deltas: std::collections::VecDeque::new(),
        internal: Arc::new(Outbox::new(
            INTERNAL_CONN,
            &crate::config::QueueConfig::default(),
            stats.clone(),
        )),
        internal_waiters: HashMap::new(),
        next_internal: 1,
        parked: HashMap::new(),
    };
    tokio::spawn(shard.run(urgent_rx, bulk_rx, events, reads_rx));
    ShardSender {
        urgent: urgent_tx,
        bulk: bulk_tx,
        telemetry,
        stats,
    }
}

/// Which shard owns `swarm`. A fixed-key hash, so placement is stable across restarts.
pub fn shard_of(swarm: &str, shards: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    swarm.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

/// Commands handled per wake-up before the shard flushes its actions.
const BATCH: usize = 256;
/// Ops read from the log per catch-up step of one subscriber.
const CATCH_UP_CHUNK_OPS: usize = 512;
/// Bytes read from the log per catch-up step or delta answer (soft: one record may exceed it).
const CATCH_UP_CHUNK_BYTES: usize = 4 << 20;
/// How often the shard checks redelivery timeouts.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// How soon a shard with subscribers catching up looks again at their queues.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

/// Class, source and target of a stored Deliver frame (with its length prefix).
fn deliver_meta(frame: &bytes::Bytes) -> Option<(Class, String, Option<String>)> {
    if frame.len() < 4 {
        return None;
    }
    match decode(frame.slice(4..), &DecodeOptions::default()) {
        Ok(Message::Deliver(d)) => Some((d.class, d.source_agent, d.target_agent)),
        _ => None,
    }
}

fn reply(outbox: &Outbox, message: &Message) {
    // A full session lane closes the connection (Lagging); nothing more to do here.
    let _ = outbox.push(Lane::Session, encode(message));
}

fn refuse(outbox: &Outbox, request_id: u64, error: &CoreError) {
    reply(
        outbox,
        &swarmbus_proto::refusal::Refusal::new(error.code(), error.to_string()).message(request_id),
    );
}

/// One shard: the routing core for its swarms and their log.
struct Shard {
    core: Core<Arc<Outbox>>,
    log: Box<dyn LogBackend>,
    stats: Arc<Stats>,
    /// How often the log is compacted and retention applied.
    maintenance_interval: std::time::Duration,
    /// The copies of the telemetry subscribers that sessions route telemetry from.
    telemetry: Arc<TelemetryRoutes>,
    /// Swarms whose log failed, being brought back.
    recovering: HashMap<Arc<str>, Recovery>,
    /// The router's clock: what log records are stamped with and retention ages by.
    clock: crate::clock::Clock,
    /// Log reads run on the blocking pool (a slow disk or a long catch-up must not hold up
    /// the shard's other swarms); they report here.
    reads_done: mpsc::UnboundedSender<ReadDone>,
    /// Catch-up reads in flight, by subscriber (connection, swarm, class).
    catch_up_reads: HashSet<(ConnId, Arc<str>, Class)>,
    /// Connections with a delta read in flight: one each, so that the room each answer
    /// counts on in the connection's reconciliation queue is not counted twice.
    delta_reads: HashSet<ConnId>,
    /// Delta answers waiting for a read slot.
    waiting_deltas: std::collections::VecDeque<DeltaRead>,
    /// The publisher handle of the router's own publishes (see [`INTERNAL_CONN`]).
    internal: Arc<Outbox>,
    /// Router publishes waiting to be durable, by the request id the core answers with.
    internal_waiters: HashMap<u64, InternalReply>,
    next_internal: u64,
    /// Requests waiting, in order, for their swarm's shared log to open (see [`shared`]).
    parked: HashMap<Arc<str>, Vec<ShardCommand>>,
}

/// Appends a shard holds while the writer's queue is full before it stops taking input
/// (its other work goes on meanwhile: acknowledgements, deliveries, catch-ups).
const MAX_BACKLOG: usize = 4096;

/// How soon a shard holding appends offers them to the writer again.
const BACKLOG_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Log reads one shard runs at once (catch-ups and deltas together); more wait.
const MAX_READS: usize = 8;

/// How often a read that found its file removed (a compaction or retention ran meanwhile)
/// is planned again before it is reported failed.
const READ_RETRIES: u32 = 3;

/// A log read that finished on the blocking pool.
#[derive(Debug)]
enum ReadDone {
    CatchUp {
        conn: ConnId,
        swarm: Arc<str>,
        class: Class,
        from: OpId,
        to: OpId,
        handle: Arc<Outbox>,
        result: Result<Vec<crate::log::Record>, crate::log::ReadFailed>,
    },
    /// A delta for `conn` was answered (or its read found a file gone and is to be planned
    /// again).
    Delta {
        conn: ConnId,
        retry: Option<(DeltaRead, std::path::PathBuf)>,
    },
}

/// A DeltaRequest being answered, and how often its read was planned again.
#[derive(Debug)]
struct DeltaRead {
    query: DeltaQuery<Arc<Outbox>>,
    tries: u32,
}

/// A swarm whose log write failed, on its way back.
#[derive(Debug)]
struct Recovery {
    /// Failed tries so far (the backoff doubles with each).
    attempts: u32,
    next_try: std::time::Instant,
    /// The last void record of the try in flight.
    voiding_to: Option<OpId>,
    /// The first op the log reported not durable (a shared log's earlier ops are in it,
    /// whether or not its follower has reported them yet).
    from: OpId,
}

impl Shard {
    /// Runs until every input sender is dropped. Log events go first (they release
    /// acknowledgements and deliveries), then urgent work, then telemetry.
    async fn run(
        mut self,
        mut urgent: mpsc::Receiver<ShardCommand>,
        mut bulk: mpsc::Receiver<ShardCommand>,
        mut events: mpsc::UnboundedReceiver<LogEvent>,
        mut reads: mpsc::UnboundedReceiver<ReadDone>,
    ) {
        let mut urgent_batch = Vec::with_capacity(BATCH);
        let mut bulk_batch = Vec::with_capacity(BATCH);
        let mut event_batch = Vec::with_capacity(BATCH);
        let mut read_batch = Vec::with_capacity(BATCH);
        let mut urgent_open = true;
        let mut bulk_open = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut catching_up = false;
        let mut last_maintenance = std::time::Instant::now();
        while urgent_open || bulk_open {
            let backlog = self.log.backlog();
            let taking = backlog < MAX_BACKLOG;
            tokio::select! {
                biased;
                n = events.recv_many(&mut event_batch, BATCH) => {
                    if n == 0 {
                        // The writer is gone (shutdown): nothing more becomes durable.
                        break;
                    }
                }
                // The sender lives in `self`: this channel never closes while the loop runs.
                _ = reads.recv_many(&mut read_batch, BATCH) => {}
                n = urgent.recv_many(&mut urgent_batch, BATCH), if urgent_open && taking => urgent_open = n > 0,
                n = bulk.recv_many(&mut bulk_batch, BATCH), if bulk_open && taking => bulk_open = n > 0,
                _ = tokio::time::sleep(BACKLOG_RETRY), if backlog > 0 => {}
                _ = tick.tick() => {
                    let now = self.now();
                    let rewound = self.core.handle_tick(now.instant);
                    self.stats
                        .redeliveries
                        .fetch_add(rewound as u64, Ordering::Relaxed);
                    self.core.collect_idle();
                    self.try_recoveries(now);
                    if now.instant.duration_since(last_maintenance) >= self.maintenance_interval {
                        last_maintenance = now.instant;
                        self.log.maintain(now.unix_ms);
                    }
                }
                _ = tokio::time::sleep(CATCH_UP_RETRY), if catching_up => {}
            }
            let now = self.now();
            if backlog > 0 {
                if let Err(error) = self.log.flush_backlog() {
                    // Only at shutdown: nothing more becomes durable.
                    tracing::warn!(%error, "the event log writer stopped with appends held");
                }
            }
            for event in event_batch.drain(..) {
                match event {
                    LogEvent::Durable { swarm, up_to } => {
                        self.log.on_durable(&swarm, up_to);
                        // A shared log's ops are durable here as its follower reports them
                        // (in the log's order, see `shared`).
                        if !self.log.is_shared(&swarm) {
                            self.core.handle_durable(&swarm, up_to, now.instant);
                        } else if let Some(recovery) = self.recovering.get_mut(&swarm) {
                            // Voided already, whatever the follow reported so far.
                            recovery.from = recovery.from.max(OpId(up_to.0 + 1));
                        }
                        self.recovery_progress(&swarm, up_to);
                    }
                    LogEvent::Failed {
                        swarm,
                        from,
                        generation,
                        detail,
                        truncated,
                    } => self.log_failed(swarm, from, generation, &detail, truncated, now),
                    LogEvent::Compacted { swarm, result } => {
                        self.log.on_compacted(&swarm, result);
                    }
                    LogEvent::Followed { swarm, record, own } => {
                        self.followed(swarm, record, own, now)
                    }
                    LogEvent::Conflict {
                        swarm,
                        from,
                        generation,
                    } => self.conflicted(&swarm, from, generation),
                    LogEvent::Opened { swarm, result } => {
                        self.shared_log_opened(swarm, result, now)
                    }
                }
            }
            for done in read_batch.drain(..) {
                self.read_done(done, now);
            }
            for command in urgent_batch.drain(..).chain(bulk_batch.drain(..)) {
                self.handle(command, now);
            }
            self.flush();
            catching_up = self.pump_catch_ups();
            self.flush();
        }
        // Shutting down: appends the writer's queue did not take yet get a last chance (at
        // most a second; they were never acknowledged, so nothing promised is lost if not).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.log.backlog() > 0 && std::time::Instant::now() < deadline {
            match self.log.flush_backlog() {
                Ok(0) | Err(_) => break,
                Ok(_) => tokio::time::sleep(BACKLOG_RETRY).await,
            }
        }
    }

    /// The time now, on the router's clock.
    fn now(&self) -> Now {
        self.clock.now()
    }

    /// Publishes for the router itself (see [`RouterPublish`]).
    fn router_publish(&mut self, publish: RouterPublish, now: Now) {
        let RouterPublish {
            swarm,
            class,
            key,
            payload,
            reply,
        } = publish;
        let request_id = self.next_internal;
        self.next_internal += 1;
        let publish = Publish {
            request_id,
            swarm,
            class,
            target_agent: None,
            key: Some(key),
            payload,
            fencing_token: 0,
            lease: None,
        };
        let router: &str = crate::server::ROUTER_AGENT;
        match self
            .core
            .handle_publish(router, self.internal.clone(), &publish, now)
        {
            Ok(outcome) => {
                self.stats.published_by_class[publish.class.index()]
                    .fetch_add(1, Ordering::Relaxed);
                match reply {
                    Some(reply) if outcome.awaiting_durability => {
                        self.internal_waiters.insert(request_id, reply);
                    }
                    Some(reply) => {
                        let _ = reply.send(Ok(outcome.op_id));
                    }
                    None => {}
                }
            }
            Err(error) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
        }
    }

    /// What the core replied to a router publish: its acknowledgement once durable, or its
    /// refusal (the swarm's log failed).
    fn answer_internal(&mut self, message: Message) {
        let (request_id, result) = match message {
            Message::PublishAck {
                request_id, op_id, ..
            } => (request_id, Ok(op_id)),
            Message::Error(error) => (error.request_id, Err(error.message)),
            _ => return,
        };
        if let Some(reply) = self.internal_waiters.remove(&request_id) {
            let _ = reply.send(result);
        }
    }

    /// Carries out what the core asked for.
    fn flush(&mut self) {
        let mut delivered = [0u64; 5];
        // Subscriptions (connection, class, swarm) that turned out lagging in this flush: their later
        // deliveries of the flush are skipped too, so they come from the log, in order.
        let mut lagged: Vec<(ConnId, Class, Arc<str>)> = Vec::new();
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Deliver {
                    to,
                    class,
                    frame,
                    swarm,
                    op,
                    durable_at,
                } if class.is_ordered() && !op.is_none() => {
                    let key = (to.conn(), class, swarm);
                    if lagged.contains(&key) {
                        continue;
                    }
                    // A full queue does not disconnect an ordered-class subscriber: it
                    // catches up from the log once its queue drains.
                    let lane = Lane::Class(class);
                    let pushed = match durable_at {
                        Some(at) => to.try_push_durable(lane, frame, at),
                        // Replayed from the log: its durable -> delivered is not measured.
                        None => to.try_push(lane, frame),
                    };
                    if pushed.is_err() {
                        self.stats.lagging_catch_ups.fetch_add(1, Ordering::Relaxed);
                        self.core.handle_lagging(to.conn(), &key.2, class, op);
                        lagged.push(key);
                    } else {
                        delivered[class.index()] += 1;
                    }
                }
                Action::Deliver {
                    to, class, frame, ..
                } => {
                    // A lagging subscriber of another class is closed by its connection
                    // driver, which then sends Disconnect; until then pushes are discarded.
                    let _ = to.push(Lane::Class(class), frame);
                    delivered[class.index()] += 1;
                }
                Action::Reply { to, message } if to.conn() == INTERNAL_CONN => {
                    self.answer_internal(message)
                }
                Action::Reply { to, message } => reply(&to, &message),
                Action::CreateLog { swarm, epoch } => {
                    if let Err(error) = self.log.create(&swarm, epoch) {
                        let detail = format!(
                            "creating the swarm's event log: {}",
                            crate::error::report(&error)
                        );
                        self.log_failed(swarm, OpId(1), 0, &detail, true, self.now());
                    }
                }
                Action::Append { swarm, op, record } => {
                    if let Err(error) = self.log.append(&swarm, op, record) {
                        let generation = self.log.generation(&swarm);
                        let detail = crate::error::report(&error);
                        self.log_failed(swarm, op, generation, &detail, true, self.now());
                    }
                }
                Action::ReadDelta(query) => {
                    self.waiting_deltas.push_back(DeltaRead { query, tries: 0 });
                    self.start_deltas();
                }
            }
        }
        for (class, count) in delivered.into_iter().enumerate() {
            if count > 0 {
                self.stats.delivered_by_class[class].fetch_add(count, Ordering::Relaxed);
            }
        }
        // A swarm whose log failed refuses telemetry too.
        self.telemetry.apply(self.core.take_telemetry_changes());
    }

    fn handle(&mut self, command: ShardCommand, now: Now) {
        let Some(command) = self.park_for_shared_log(command, now) else {
            return;
        };
        self.handle_command(command, now);
        // Disconnects: the copies stop naming a closed session's outbox.
        self.telemetry.apply(self.core.take_telemetry_changes());
    }

    // One arm per shard command, each the core call and the replies it needs: a dispatch,
    // long by design (the longer steps are methods of their own).
    fn handle_command(&mut self, command: ShardCommand, now: Now) {
        let core = &mut self.core;
        match command {
            ShardCommand::Subscribe {
                conn,
                agent,
                outbox,
                subscription,
                held,
                resume,
            } => {
                // The connection may have closed (and its Disconnect been handled) while
                // this was queued: registering it now would leave a subscriber nobody removes.
                if outbox.is_closed() {
                    return;
                }
                let result = core.handle_subscribe(
                    conn,
                    &agent,
                    outbox.clone(),
                    &subscription.swarm,
                    subscription.class,
                    subscription.agent_filter.as_deref(),
                    resume,
                );
                match result {
                    Ok(_) => {
                        // Before the acknowledgement: telemetry published after the agent
                        // has it reaches the agent.
                        self.telemetry.apply(core.take_telemetry_changes());
                        reply(
                            &outbox,
                            &Message::SubscribeAck {
                                request_id: subscription.request_id,
                            },
                        )
                    }
                    Err(error) => {
                        held.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .remove(&(
                                subscription.swarm.clone(),
                                subscription.class,
                                subscription.agent_filter.clone(),
                            ));
                        refuse(&outbox, subscription.request_id, &error)
                    }
                }
            }
            ShardCommand::Unsubscribe {
                outbox,
                subscription,
            } => {
                core.handle_unsubscribe(
                    outbox.conn(),
                    &subscription.swarm,
                    subscription.class,
                    subscription.agent_filter.as_deref(),
                );
                self.telemetry.apply(core.take_telemetry_changes());
                reply(
                    &outbox,
                    &Message::SubscribeAck {
                        request_id: subscription.request_id,
                    },
                );
            }
            ShardCommand::Publish {
                agent,
                outbox,
                publish,
                received,
            } => match core.handle_publish(
                &agent,
                outbox.clone(),
                &publish,
                // The batch's time, or the read's when earlier: the lag starts there.
                match received {
                    // Both readings moved back to the read: no clock is read per publish.
                    Some(read) if read < now.instant => swarmbus_proto::time::Now {
                        instant: read,
                        wall_us: now.wall_us.saturating_sub(
                            now.instant.saturating_duration_since(read).as_micros() as u64,
                        ),
                        ..now
                    },
                    _ => now,
                },
            ) {
                Ok(outcome) => {
                    self.stats.published_by_class[publish.class.index()]
                        .fetch_add(1, Ordering::Relaxed);
                    // Ordered ops are acknowledged by the core once durable.
                    if !outcome.awaiting_durability && publish.request_id != 0 {
                        reply(
                            &outbox,
                            &Message::PublishAck {
                                request_id: publish.request_id,
                                op_id: outcome.op_id,
                                epoch: Epoch::default(),
                            },
                        );
                    }
                }
                Err(error) => {
                    if publish.request_id != 0 || publish.class.is_ordered() {
                        refuse(&outbox, publish.request_id, &error)
                    }
                }
            },
            ShardCommand::RouterPublish(publish) => self.router_publish(publish, now),
            ShardCommand::Swarms { reply } => {
                let bytes: HashMap<Arc<str>, u64> = self
                    .log
                    .swarms()
                    .into_iter()
                    .map(|(name, state)| (name, state.bytes))
                    .collect();
                let mut summaries = self.core.swarm_summaries();
                for summary in &mut summaries {
                    summary.log_bytes = bytes.get(summary.name.as_str()).copied().unwrap_or(0);
                }
                let _ = reply.send(summaries);
            }
            ShardCommand::Metrics { reply } => {
                let _ = reply.send(ShardMetrics {
                    durable_lag_us: self.core.durable_lag().clone(),
                    ack_lag_us: self.core.ack_lag().clone(),
                    ack_lag_unmeasured: self.core.ack_lag_unmeasured(),
                });
            }
            ShardCommand::Ack {
                outbox,
                swarm,
                class,
                op_id,
            } => {
                if !outbox.is_closed() {
                    core.handle_ack(outbox.conn(), &swarm, class, op_id, now.instant);
                }
            }
            ShardCommand::Delta {
                agent,
                outbox,
                request_id,
                swarm,
                from,
                to,
            } => {
                if let Err(error) =
                    core.handle_delta_request(&agent, outbox.clone(), &swarm, request_id, from, to)
                {
                    refuse(&outbox, request_id, &error);
                }
            }
            ShardCommand::Disconnect { conn } => core.handle_disconnect(conn),
            ShardCommand::ReadRecord { swarm, op, reply } => {
                let Some(plan) = self.log.plan_read(&swarm, op) else {
                    let _ = reply.send(Err((false, format!("no log for swarm {swarm:?}"))));
                    return;
                };
                // Like catch-up reads: file reads off the shard.
                tokio::task::spawn_blocking(move || {
                    let record = match plan.read_noting_file(1, usize::MAX) {
                        Err(failed) => {
                            let again = failed.error.kind() == std::io::ErrorKind::NotFound;
                            Err((again, failed.to_string()))
                        }
                        Ok(records) => records
                            .into_iter()
                            .find(|record| record.op == op)
                            .map(|record| record.frame)
                            .ok_or_else(|| (false, format!("op {} is not in the log", op.0))),
                    };
                    let _ = reply.send(record);
                });
            }
            ShardCommand::Pause { swarm, paused } => {
                if let Err(error) = core.handle_pause(&swarm, paused) {
                    tracing::warn!(%swarm, %error, "pausing the swarm");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
