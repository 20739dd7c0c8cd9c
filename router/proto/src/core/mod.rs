//! The sans-IO routing core: swarms, subscriptions and the per-swarm op sequencer.
//!
//! [`Core`] is a deterministic state machine in the manner of `quinn-proto`: it never reads
//! a clock or touches a socket. Call order:
//!
//! 1. feed inputs with `handle_subscribe`, `handle_unsubscribe`, `handle_publish`,
//!    `handle_ack` and `handle_disconnect`, passing the current time where it matters;
//! 2. drain the resulting work with [`Core::poll_action`] until it returns `None`.
//!
//! Each routing shard owns one `Core` for the swarms hashed to it, so nothing here is
//! shared between threads and no lock is taken. The core is generic over the subscriber
//! handle `H` (the router passes its per-connection outbox; tests pass plain ids) and hands
//! that handle back in [`Action::Deliver`].
//!
//! Fan-out encodes the Deliver header once per published message and shares it, and the
//! publisher's payload buffer, with every recipient: a delivery costs two reference-count
//! increments, whatever the payload size.
//!
//! Layout: this file holds the types, the state and the inputs of routing; `catch_up`
//! the replays from the log and the delta cut; `swarm` one swarm's subscribers and
//! sequencer.
//!
//! Ordered classes (control, command) are durable before anything else happens: the core
//! gives the op its id and asks the driver to `Append` it to the swarm's log; only when the
//! driver reports it durable (`handle_durable`) does the core acknowledge the publisher and
//! deliver the op, so no subscriber ever applies an op that a crash could erase.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use swarmbus_schema::{
    encode_deliver_head, Class, Epoch, ErrorCode, Message, OpId, OutFrame, Publish,
};
use thiserror::Error;

use crate::conn::ConnId;
use crate::quota::{SwarmBudget, SwarmRefused};
mod catch_up;
mod shared;
mod swarm;

use swarm::*;

use crate::record::{encode_record, RecordParts};
use crate::time::Now;

/// Refusals of the core. All are recoverable: the request is refused, the session goes on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    #[error("the router holds its maximum of {max} swarms (limits.max_swarms)")]
    TooManySwarms { max: usize },
    #[error("this agent created {max} of the swarms in memory (limits.max_swarms_per_agent)")]
    AgentSwarmQuota { max: usize },
    #[error("swarm {swarm:?} is unavailable: {reason}")]
    Unavailable { swarm: String, reason: String },
}

impl CoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::TooManySwarms { .. } | CoreError::AgentSwarmQuota { .. } => ErrorCode::Busy,
            CoreError::Unavailable { .. } => ErrorCode::SwarmUnavailable,
        }
    }
}

/// Work for the driver.
#[derive(Debug)]
pub enum Action<H> {
    /// Queue `frame` (op `op` of `swarm`, `OpId::NONE` for unordered classes) for the
    /// subscriber behind `to` on the stream of `class`. When an ordered op does not fit the
    /// subscriber's queue, the driver reports it with [`Core::handle_lagging`].
    Deliver {
        to: H,
        class: Class,
        frame: OutFrame,
        swarm: Arc<str>,
        op: OpId,
        /// When the op became durable, for a live delivery of an ordered op (`None`: an
        /// unordered message, or an op replayed from the log to a catching-up subscriber).
        durable_at: Option<Instant>,
    },
    /// Send `message` on the session stream of `to` (acknowledgements, refusals).
    Reply { to: H, message: Message },
    /// Start the log of a new swarm with this epoch (before its first append).
    CreateLog { swarm: Arc<str>, epoch: Epoch },
    /// Append op `op` to the swarm's log; report durability with `handle_durable`.
    Append {
        swarm: Arc<str>,
        op: OpId,
        record: RecordParts,
    },
    /// Answer a DeltaRequest.
    ReadDelta(DeltaQuery<H>),
}

/// A DeltaRequest to answer: read `from..=to` of the swarm's log, queue the ops not targeted
/// at other agents than `agent` on `to_handle`'s reconciliation stream, then reply with a
/// DeltaAck (`more` tells whether the requested range goes on past `to`).
#[derive(Debug)]
pub struct DeltaQuery<H> {
    pub to_handle: H,
    pub agent: Arc<str>,
    pub swarm: Arc<str>,
    pub epoch: Epoch,
    pub request_id: u64,
    pub from: OpId,
    pub to: OpId,
    pub more: bool,
}

/// A subscriber catching up from the log (after a resume point, a redelivery timeout):
/// the driver reads ops `from..=to` (or a prefix) and hands them to
/// [`Core::handle_replayed`].
#[derive(Debug, Clone)]
pub struct CatchUp<H> {
    pub conn: ConnId,
    pub swarm: Arc<str>,
    pub class: Class,
    pub from: OpId,
    pub to: OpId,
    pub handle: H,
}

/// One op read back from the log, as the driver hands it to the core.
#[derive(Debug, Clone)]
pub struct ReplayedOp {
    pub op: OpId,
    pub class: Class,
    pub source: String,
    pub target: Option<String>,
    /// The whole Deliver frame as stored (length prefix included).
    pub frame: Bytes,
}

/// The Deliver header of `publish` from `source_agent` (op and epoch: `OpId::NONE` and
/// the default epoch for unordered classes), taken by the router at `published_us` (its
/// host's wall clock, Unix µs); the payload follows it unchanged.
pub fn deliver_head(
    publish: &Publish,
    source_agent: &str,
    op_id: OpId,
    epoch: Epoch,
    published_us: u64,
) -> Bytes {
    encode_deliver_head(
        &publish.swarm,
        publish.class,
        op_id,
        epoch,
        source_agent,
        publish.target_agent.as_deref(),
        publish.key.as_deref(),
        publish.payload.len(),
        publish.fencing_token,
        publish.lease.as_deref(),
        published_us,
    )
}

/// Whether an op targeted at `target` is for someone other than `agent`.
pub fn targeted_elsewhere(target: Option<&str>, agent: &str) -> bool {
    target.is_some_and(|t| t != agent)
}

/// Tunables of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Swarms in memory, router-wide and per creating agent (shared by every shard).
    pub swarms: Arc<SwarmBudget>,
    /// Seed of the generator that gives new swarms their epochs.
    pub epoch_seed: u64,
    /// An ordered op delivered but not acknowledged for this long is sent again (from the
    /// subscriber's last acknowledged op on).
    pub redelivery_timeout: Duration,
    /// Most ops one DeltaRequest is answered with.
    pub delta_max_ops: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            swarms: SwarmBudget::new(100_000, usize::MAX),
            epoch_seed: 0x5EED,
            redelivery_timeout: Duration::from_secs(10),
            delta_max_ops: 4096,
        }
    }
}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The op id given by the swarm's sequencer; [`OpId::NONE`] for unordered classes.
    pub op_id: OpId,
    /// Subscriptions the message was queued for (0 while an ordered op awaits durability).
    pub recipients: usize,
    /// An ordered op: acknowledged and delivered once `handle_durable` covers it.
    pub awaiting_durability: bool,
}

#[derive(Debug)]
struct Subscriber<H> {
    conn: ConnId,
    /// The subscribing session's agent id, matched against a publish's target.
    agent: Arc<str>,
    /// Subscribed without an agent filter: every source matches.
    all_sources: bool,
    /// Source agents subscribed to by filter (when `all_sources` is false).
    sources: Vec<Box<str>>,
    handle: H,
    /// Ordered classes: the next op to replay from the log while catching up; `None` when
    /// the subscriber receives live ops.
    cursor: Option<OpId>,
    /// Ordered classes: the highest op queued to this subscriber.
    delivered: OpId,
    /// Ordered classes: since when ops were delivered but not acknowledged.
    unacked_since: Option<Instant>,
}

/// A copy of one swarm's telemetry subscribers, for the driver to route telemetry without
/// the core: telemetry is neither sequenced nor logged, so it needs nothing else of the
/// swarm's state. [`Core::take_telemetry_changes`] says when a copy is out of date.
#[derive(Debug, Clone)]
pub struct TelemetryRoute<H> {
    /// Set when the swarm is unavailable (its log failed): telemetry is refused too.
    pub unavailable: Option<String>,
    subscribers: Vec<TelemetrySubscriber<H>>,
}

#[derive(Debug, Clone)]
struct TelemetrySubscriber<H> {
    agent: Arc<str>,
    all_sources: bool,
    sources: Vec<Box<str>>,
    handle: H,
}

/// An ordered op waiting for the log to make it durable.
#[derive(Debug)]
struct PendingOp<H> {
    op: OpId,
    class: Class,
    source: Box<str>,
    target: Option<Box<str>>,
    frame: OutFrame,
    publisher: H,
    request_id: u64,
    /// When the publish arrived: its durable lag is measured from here.
    received: Instant,
}

#[derive(Debug)]
struct Swarm<H> {
    name: Arc<str>,
    epoch: Epoch,
    /// Next op id to give out; ids start at 1 and never repeat or skip.
    next_op: u64,
    /// Highest op the log reported durable.
    durable_op: OpId,
    /// Set when the swarm's log is damaged or failed; nothing is served then.
    unavailable: Option<String>,
    /// Whether the swarm's log exists (created on the first ordered publish, not on a
    /// subscribe, so subscribing to arbitrary names costs no disk).
    log_created: bool,
    /// Ordered ops sequenced but not yet durable, in op order.
    pending: VecDeque<PendingOp<H>>,
    /// Subscribers per class, indexed by [`Class::index`]; one entry per connection.
    subscribers: [Vec<Subscriber<H>>; Class::COUNT],
    /// Highest op id each connection acknowledged (cumulative), per ordered class.
    acked: HashMap<(ConnId, Class), OpId>,
    last_publish: Option<Instant>,
    /// Paused by a controller: commands are sequenced and made durable but not delivered;
    /// their subscribers catch up from the log on resume.
    paused: bool,
    /// The agent whose request created the swarm (counted against its quota while the
    /// swarm is in memory); `None` for swarms recovered from the log or created by a
    /// safety action.
    creator: Option<Arc<str>>,
    /// Its log is shared with other routers (see [`shared`]): ops become durable as the
    /// log's follower reports them, in the log's order, and the log, not this sequencer,
    /// decides which op ids are taken.
    shared: bool,
    /// Its shared log is being opened (requests for it wait): kept, not collected as idle.
    opening: bool,
}

/// Routing state of one shard. See the module docs for the call order.
#[derive(Debug)]
pub struct Core<H> {
    swarms: HashMap<Arc<str>, Swarm<H>>,
    /// Swarms each connection holds state in, for cleanup on disconnect (a swarm leaves
    /// the set when the connection holds nothing there any more).
    conn_swarms: HashMap<ConnId, HashSet<Box<str>>>,
    config: CoreConfig,
    epoch_rng: u64,
    actions: VecDeque<Action<H>>,
    /// Swarms that may have subscribers catching up, so the driver's per-batch look at
    /// catch-ups costs nothing when there are none.
    catching_swarms: HashSet<Arc<str>>,
    /// Swarms whose telemetry subscribers or availability changed since the driver last
    /// took the changes.
    telemetry_changed: HashSet<Arc<str>>,
    /// Publish received -> durable, per class ([`Class::index`]), microseconds.
    durable_lag: [LagHistogram; 5],
    /// Publish received -> a subscriber's acknowledgement of it, per class, microseconds.
    ack_lag: [LagHistogram; 5],
    /// When the most recent durable ops with subscribers were received, for `ack_lag`.
    received: RecentOps,
    /// Acks that moved a subscriber forward but named an op out of `received`'s window.
    ack_lag_unmeasured: u64,
}

/// Most ops whose receive time a core keeps for measuring acknowledgement lag. An ack of
/// an op older than the last this many (of every swarm of the core together) is not
/// measured: its subscriber is far behind, which the catch-up counters show.
pub const ACK_LAG_WINDOW: usize = 16_384;

/// The receive times of the last [`ACK_LAG_WINDOW`] durable ops that had subscribers, by
/// swarm and op: bounded whatever the number of swarms (one entry per op, oldest first
/// out), where a window per swarm would grow with them.
#[derive(Debug, Default)]
struct RecentOps {
    at: HashMap<(Arc<str>, u64), Instant>,
    order: VecDeque<(Arc<str>, u64)>,
}

impl RecentOps {
    fn insert(&mut self, swarm: &Arc<str>, op: OpId, received: Instant) {
        if self.order.len() >= ACK_LAG_WINDOW {
            if let Some(oldest) = self.order.pop_front() {
                self.at.remove(&oldest);
            }
        }
        let key = (swarm.clone(), op.0);
        if self.at.insert(key.clone(), received).is_none() {
            self.order.push_back(key);
        }
    }

    fn get(&self, swarm: &Arc<str>, op: OpId) -> Option<Instant> {
        self.at.get(&(swarm.clone(), op.0)).copied()
    }
}

/// One swarm as the admin view shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmSummary {
    pub name: String,
    pub epoch: u64,
    /// The last op id given out, and the last durable one.
    pub last_op: u64,
    pub durable_op: u64,
    /// Subscribers (connections) per class, by [`Class::index`].
    pub subscribers: [usize; 5],
    pub paused: bool,
    /// Why its log is unavailable, when it is.
    pub unavailable: Option<String>,
    /// Ops the slowest ordered-class subscriber has not acknowledged (0: none): of those
    /// sent to it, or, while it catches up from the log, of every durable op (an upper
    /// bound: ops of the other class or filtered out count too).
    pub ack_lag_ops: u64,
    /// Bytes of its event log (filled by the driver, which holds the log; 0 here).
    pub log_bytes: u64,
}

/// Microseconds from 1 µs to 10 minutes, two significant digits (about 30 KiB).
pub type LagHistogram = hdrhistogram::Histogram<u64>;

/// A histogram of [`LagHistogram`]'s range, empty.
pub fn lag_histogram() -> LagHistogram {
    LagHistogram::new_with_bounds(1, 600_000_000, 2).expect("constant bounds are valid")
}

impl<H: Clone> Core<H> {
    /// A core with default tunables and a fixed epoch seed (tests and benches), holding at
    /// most `max_swarms` swarms.
    pub fn new(max_swarms: usize) -> Self {
        Self::with_config(CoreConfig {
            swarms: SwarmBudget::new(max_swarms, usize::MAX),
            ..CoreConfig::default()
        })
    }

    pub fn with_config(config: CoreConfig) -> Self {
        Core {
            swarms: HashMap::new(),
            conn_swarms: HashMap::new(),
            epoch_rng: config.epoch_seed,
            config,
            actions: VecDeque::new(),
            catching_swarms: HashSet::new(),
            telemetry_changed: HashSet::new(),
            durable_lag: std::array::from_fn(|_| lag_histogram()),
            ack_lag: std::array::from_fn(|_| lag_histogram()),
            received: RecentOps::default(),
            ack_lag_unmeasured: 0,
        }
    }

    /// A summary of every swarm of this core (the admin view), in no order.
    pub fn swarm_summaries(&self) -> Vec<SwarmSummary> {
        self.swarms
            .values()
            .map(|swarm| SwarmSummary {
                name: swarm.name.to_string(),
                epoch: swarm.epoch.0,
                last_op: swarm.next_op.saturating_sub(1),
                durable_op: swarm.durable_op.0,
                subscribers: std::array::from_fn(|i| swarm.subscribers[i].len()),
                paused: swarm.paused,
                unavailable: swarm.unavailable.clone(),
                ack_lag_ops: [Class::Control, Class::Command]
                    .into_iter()
                    .flat_map(|class| {
                        swarm.subscribers[class.index()].iter().map(move |s| {
                            let acked = swarm.acked.get(&(s.conn, class)).copied();
                            // Live: what it was sent (filtered and targeted ops are not);
                            // catching up: everything durable, at most.
                            let owed = if s.cursor.is_some() {
                                swarm.durable_op
                            } else {
                                s.delivered
                            };
                            owed.0.saturating_sub(acked.unwrap_or_default().0)
                        })
                    })
                    .max()
                    .unwrap_or(0),
                log_bytes: 0,
            })
            .collect()
    }

    /// Publish received -> durable, per class ([`Class::index`]; telemetry, which is never
    /// made durable, stays empty), in microseconds, since the core started.
    pub fn durable_lag(&self) -> &[LagHistogram; 5] {
        &self.durable_lag
    }

    /// Publish received -> a subscriber acknowledged it, per class, in microseconds, since
    /// the core started: one sample per acknowledgement that moves a subscriber forward,
    /// for the op it names (a cumulative ack of several ops counts once, for the newest),
    /// while that op is among the core's last [`ACK_LAG_WINDOW`] with subscribers. An
    /// application that acks after applying makes this publish -> apply.
    pub fn ack_lag(&self) -> &[LagHistogram; 5] {
        &self.ack_lag
    }

    /// Acks that moved a subscriber forward without a sample in [`Core::ack_lag`]: their op
    /// was older than the window (the subscriber is far behind).
    pub fn ack_lag_unmeasured(&self) -> u64 {
        self.ack_lag_unmeasured
    }

    /// Restores a swarm recovered from the log: its sequencer continues after `last_op`.
    pub fn restore_swarm(
        &mut self,
        name: &str,
        epoch: Epoch,
        last_op: OpId,
        unavailable: Option<String>,
    ) {
        let mut swarm = Swarm::new(name, epoch, last_op);
        if unavailable.is_some() {
            self.telemetry_changed.insert(swarm.name.clone());
        }
        swarm.unavailable = unavailable;
        swarm.log_created = true;
        if self.swarms.insert(swarm.name.clone(), swarm).is_none() {
            self.config.swarms.restored();
        }
    }

    /// The swarm named `name`, created for `creator` (`None`: a controller's safety
    /// action) with a new epoch when missing and the router-wide cap and the creator's
    /// quota allow.
    fn swarm_entry(
        &mut self,
        name: &str,
        creator: Option<&str>,
    ) -> Result<&mut Swarm<H>, CoreError> {
        if !self.swarms.contains_key(name) {
            if crate::record::is_internal(name) {
                // The router's own swarms are counted but never refused: the control
                // plane and the job queue must not fail because users filled the router.
                self.config.swarms.restored();
            } else {
                self.config
                    .swarms
                    .take(creator)
                    .map_err(|refused| match refused {
                        SwarmRefused::Router { max } => CoreError::TooManySwarms { max },
                        SwarmRefused::Agent { max } => CoreError::AgentSwarmQuota { max },
                    })?;
            }
            let epoch = Epoch(splitmix64(&mut self.epoch_rng).max(1));
            let mut swarm = Swarm::new(name, epoch, OpId(0));
            swarm.creator = creator
                .filter(|_| !crate::record::is_internal(name))
                .map(Arc::from);
            self.swarms.insert(swarm.name.clone(), swarm);
        }
        Ok(self
            .swarms
            .get_mut(name)
            .expect("present: inserted above when missing"))
    }

    /// Pauses or resumes `swarm` (a controller's safety action). While paused, its commands
    /// are sequenced, made durable and acknowledged to their publishers, but held back from
    /// subscribers; on resume every command subscriber catches up from the log, in op order.
    /// Control messages are never held.
    pub fn handle_pause(&mut self, swarm_name: &str, paused: bool) -> Result<(), CoreError> {
        let swarm = self.swarm_entry(swarm_name, None)?;
        swarm.paused = paused;
        let name = swarm.name.clone();
        if !paused {
            self.catching_swarms.insert(name);
        }
        Ok(())
    }

    /// Whether `swarm` is paused.
    pub fn is_paused(&self, swarm: &str) -> bool {
        self.swarms.get(swarm).is_some_and(|s| s.paused)
    }

    /// Adds a subscription. Subscribing twice is harmless; a connection holding several
    /// subscriptions that match one message receives it once. Returns whether it was new.
    ///
    /// For ordered classes, `resume` is the agent's (epoch, last applied op) in this swarm:
    /// the subscriber first catches up on the ops after it from the log, then goes live. A
    /// resume point of another epoch gets an `EpochChanged` reply and a catch-up from op 1 of
    /// the current epoch. Without one the subscriber starts with the next op.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_subscribe(
        &mut self,
        conn: ConnId,
        agent: &Arc<str>,
        handle: H,
        swarm_name: &str,
        class: Class,
        agent_filter: Option<&str>,
        resume: Option<(Epoch, OpId)>,
    ) -> Result<bool, CoreError> {
        let handle_for_reply = handle.clone();
        let swarm = self.swarm_entry(swarm_name, Some(agent))?;
        swarm.check_available()?;
        let mut cursor = None;
        let mut epoch_changed = None;
        if let (true, Some((epoch, last_applied))) = (class.is_ordered(), resume) {
            let from = if epoch == swarm.epoch {
                OpId(last_applied.0.saturating_add(1))
            } else {
                epoch_changed = Some(Message::EpochChanged {
                    swarm: swarm_name.to_owned(),
                    epoch: swarm.epoch,
                    previous_epoch: epoch,
                });
                OpId(1)
            };
            if from <= swarm.durable_op {
                cursor = Some(from);
            }
        }
        let durable = swarm.durable_op;
        if class.is_ordered() {
            // Where the subscription starts counts as acknowledged, so a redelivery never
            // rewinds before it: the resume point, op 0 of a new epoch, or (no resume point)
            // the ops that were durable before it subscribed.
            let start = match resume {
                Some((epoch, last_applied)) if epoch == swarm.epoch => last_applied.min(durable),
                Some(_) => OpId(0),
                None => durable,
            };
            let acked = swarm.acked.entry((conn, class)).or_insert(start);
            if resume.is_some() {
                *acked = start.max(if epoch_changed.is_some() {
                    OpId(0)
                } else {
                    *acked
                });
            }
        }
        let list = &mut swarm.subscribers[class.index()];
        let added = match list.iter_mut().find(|s| s.conn == conn) {
            Some(existing) => match agent_filter {
                None => !std::mem::replace(&mut existing.all_sources, true),
                Some(source) if existing.sources.iter().any(|s| **s == *source) => false,
                Some(source) => {
                    existing.sources.push(source.into());
                    true
                }
            },
            None => {
                list.push(Subscriber {
                    conn,
                    agent: agent.clone(),
                    all_sources: agent_filter.is_none(),
                    sources: agent_filter.map(|s| vec![s.into()]).unwrap_or_default(),
                    handle,
                    cursor: None,
                    delivered: durable,
                    unacked_since: None,
                });
                true
            }
        };
        let telemetry_changed = (class == Class::Telemetry && added).then(|| swarm.name.clone());
        if let Some(from) = cursor {
            if let Some(subscriber) = list.iter_mut().find(|s| s.conn == conn) {
                if subscriber.cursor.is_none() {
                    subscriber.cursor = Some(from);
                }
            }
        }
        if cursor.is_some() {
            self.catching_swarms.insert(Arc::from(swarm_name));
        }
        if let Some(name) = telemetry_changed {
            self.telemetry_changed.insert(name);
        }
        if let Some(message) = epoch_changed {
            self.actions.push_back(Action::Reply {
                to: handle_for_reply,
                message,
            });
        }
        self.track(conn, swarm_name);
        Ok(added)
    }

    /// Frees the swarms that hold nothing: no log, no subscriber, nothing in flight, not
    /// paused, available. Such a swarm is only a name (subscribed to and left, or created
    /// by a refused request); a later request creates it again, with a new epoch, which no
    /// one can notice as it never gave out an op. Returns how many were freed.
    pub fn collect_idle(&mut self) -> usize {
        let budget = &self.config.swarms;
        let catching = &mut self.catching_swarms;
        let before = self.swarms.len();
        self.swarms.retain(|name, swarm| {
            let idle = !swarm.log_created
                && swarm.pending.is_empty()
                && swarm.subscribers.iter().all(Vec::is_empty)
                && swarm.acked.is_empty()
                && !swarm.paused
                && !swarm.opening
                && swarm.unavailable.is_none();
            if idle {
                budget.give_back(swarm.creator.as_deref());
                catching.remove(name);
            }
            !idle
        });
        before - self.swarms.len()
    }

    /// Remembers that `conn` holds state in `swarm_name`, so disconnect frees it.
    fn track(&mut self, conn: ConnId, swarm_name: &str) {
        let swarms = self.conn_swarms.entry(conn).or_default();
        if !swarms.contains(swarm_name) {
            swarms.insert(swarm_name.into());
        }
    }

    /// Removes a subscription; returns whether it existed.
    pub fn handle_unsubscribe(
        &mut self,
        conn: ConnId,
        swarm_name: &str,
        class: Class,
        agent_filter: Option<&str>,
    ) -> bool {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return false;
        };
        let list = &mut swarm.subscribers[class.index()];
        let Some(at) = list.iter().position(|s| s.conn == conn) else {
            return false;
        };
        let entry = &mut list[at];
        let removed = match agent_filter {
            None => std::mem::replace(&mut entry.all_sources, false),
            Some(source) => {
                let before = entry.sources.len();
                entry.sources.retain(|s| **s != *source);
                entry.sources.len() != before
            }
        };
        if !entry.all_sources && entry.sources.is_empty() {
            list.swap_remove(at);
            // Its acknowledgements are of no use any more (a new subscription starts from
            // the live end or its resume point), and they would keep the swarm in memory.
            swarm.acked.remove(&(conn, class));
            let holds_more = swarm.subscribers.iter().flatten().any(|s| s.conn == conn)
                || swarm.acked.keys().any(|(c, _)| *c == conn);
            if !holds_more {
                if let Some(swarms) = self.conn_swarms.get_mut(&conn) {
                    swarms.remove(swarm_name);
                    if swarms.is_empty() {
                        self.conn_swarms.remove(&conn);
                    }
                }
            }
        }
        if class == Class::Telemetry && removed {
            self.telemetry_changed.insert(swarm.name.clone());
        }
        removed
    }

    /// Routes a published message from `source_agent`, whose session is behind `publisher`.
    ///
    /// Unordered classes are delivered at once (the driver acknowledges them if asked).
    /// Ordered classes get the swarm's next op id and an `Append` action; they are
    /// acknowledged (`Reply` to `publisher`) and delivered only when the log reports them
    /// durable through [`Core::handle_durable`]. `payload` is shared, not copied, with every
    /// recipient.
    // Unordered then ordered classes, each from admission to its action, in one place so the
    // path of a publish reads in order.
    pub fn handle_publish(
        &mut self,
        source_agent: &str,
        publisher: H,
        publish: &Publish,
        now: Now,
    ) -> Result<PublishOutcome, CoreError> {
        let class = publish.class;
        let target = publish.target_agent.as_deref();
        let head_for = |op_id: OpId, epoch: Epoch| {
            deliver_head(publish, source_agent, op_id, epoch, now.wall_us)
        };
        if !class.is_ordered() {
            // Unordered messages to a swarm nobody subscribes in go nowhere; creating the
            // swarm for them would only cost memory.
            let Some(swarm) = self.swarms.get_mut(publish.swarm.as_str()) else {
                return Ok(PublishOutcome {
                    op_id: OpId::NONE,
                    recipients: 0,
                    awaiting_durability: false,
                });
            };
            swarm.check_available()?;
            swarm.last_publish = Some(now.instant);
            let wanted = swarm.subscribers[class.index()]
                .iter()
                .any(|s| s.wants(source_agent, target));
            let recipients = if wanted {
                let frame = OutFrame {
                    head: head_for(OpId::NONE, Epoch::default()),
                    body: publish.payload.clone(),
                };
                swarm.fan_out(
                    class,
                    OpId::NONE,
                    source_agent,
                    target,
                    &frame,
                    now.instant,
                    &mut self.actions,
                )
            } else {
                0
            };
            return Ok(PublishOutcome {
                op_id: OpId::NONE,
                recipients,
                awaiting_durability: false,
            });
        }
        let swarm = self.swarm_entry(&publish.swarm, Some(source_agent))?;
        swarm.check_available()?;
        let create_log = (!swarm.log_created).then(|| (swarm.name.clone(), swarm.epoch));
        swarm.log_created = true;
        let op = OpId(swarm.next_op);
        swarm.next_op += 1;
        // Op ids are gap-free: each pending op follows the one before it (or the last
        // durable op), so the log never holds a hole a subscriber would wait on for ever.
        debug_assert!(
            swarm.shared || swarm.pending.back().map_or(swarm.durable_op, |p| p.op).0 + 1 == op.0,
            "op ids of {} are not gap-free",
            swarm.name
        );
        swarm.last_publish = Some(now.instant);
        let frame = OutFrame {
            head: head_for(op, swarm.epoch),
            body: publish.payload.clone(),
        };
        let record = encode_record(
            swarm.epoch,
            op,
            now.unix_ms,
            class,
            publish.key.as_deref().unwrap_or_default().as_bytes(),
            frame.head.clone(),
            frame.body.clone(),
        );
        swarm.pending.push_back(PendingOp {
            op,
            class,
            source: source_agent.into(),
            target: target.map(Into::into),
            frame,
            publisher,
            request_id: publish.request_id,
            received: now.instant,
        });
        let name = swarm.name.clone();
        if let Some((swarm, epoch)) = create_log {
            self.actions.push_back(Action::CreateLog { swarm, epoch });
        }
        self.actions.push_back(Action::Append {
            swarm: name,
            op,
            record,
        });
        Ok(PublishOutcome {
            op_id: op,
            recipients: 0,
            awaiting_durability: true,
        })
    }

    /// The log made every op of `swarm_name` up to `up_to` durable: acknowledge those ops
    /// to their publishers and deliver them, in op order.
    pub fn handle_durable(&mut self, swarm_name: &str, up_to: OpId, now: Instant) -> usize {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return 0;
        };
        // The log reports only ops the core gave out: durable <= next - 1. A report past
        // that would acknowledge ops nobody published; it is ignored, loudly in tests.
        debug_assert!(
            up_to.0 < swarm.next_op,
            "{swarm_name}: durable {} reported past the last op given out ({})",
            up_to.0,
            swarm.next_op - 1
        );
        let up_to = OpId(up_to.0.min(swarm.next_op - 1));
        swarm.durable_op = swarm.durable_op.max(up_to);
        let mut delivered = 0;
        while swarm.pending.front().is_some_and(|p| p.op <= up_to) {
            let Some(op) = swarm.pending.pop_front() else {
                break;
            };
            let lag = now.saturating_duration_since(op.received).as_micros();
            self.durable_lag[op.class.index()].saturating_record(lag.max(1) as u64);
            if !swarm.subscribers[op.class.index()].is_empty() {
                self.received.insert(&swarm.name, op.op, op.received);
            }
            self.actions.push_back(Action::Reply {
                to: op.publisher.clone(),
                message: Message::PublishAck {
                    request_id: op.request_id,
                    op_id: op.op,
                    epoch: swarm.epoch,
                },
            });
            delivered += swarm.fan_out(
                op.class,
                op.op,
                &op.source,
                op.target.as_deref(),
                &op.frame,
                now,
                &mut self.actions,
            );
        }
        delivered
    }

    /// The log failed to append ops of `swarm_name` from `from` on. Nothing after the last
    /// durable op can be trusted to be stored, so the swarm becomes unavailable and the
    /// publishers of the ops still pending are told.
    pub fn handle_log_failed(&mut self, swarm_name: &str, from: OpId, detail: &str) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        let reason = format!("the event log failed at op {}: {detail}", from.0);
        self.telemetry_changed.insert(swarm.name.clone());
        // A shared log's ops before `from` are in it, and their follower makes them
        // durable here: only the later ones are refused.
        let refused_from = if swarm.shared { from } else { OpId(0) };
        swarm.refuse_pending(
            refused_from,
            ErrorCode::SwarmUnavailable,
            &reason,
            &mut self.actions,
        );
        swarm.unavailable = Some(reason);
    }

    /// The swarm's log takes appends again after a failure (the refused ops were voided and
    /// are durable): the swarm is served again. Op ids continue after the voided ones.
    pub fn handle_log_recovered(&mut self, swarm_name: &str) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        // (A shared log's durable op follows its follower, which may be behind.)
        debug_assert!(
            swarm.shared || (swarm.pending.is_empty() && swarm.durable_op.0 + 1 == swarm.next_op)
        );
        swarm.unavailable = None;
        self.telemetry_changed.insert(swarm.name.clone());
    }

    /// Records a subscriber's cumulative acknowledgement (kept for redelivery, which the
    /// event log drives). Acks never move backwards.
    pub fn handle_ack(
        &mut self,
        conn: ConnId,
        swarm_name: &str,
        class: Class,
        op_id: OpId,
        now: Instant,
    ) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if !class.is_ordered() || op_id.is_none() || op_id > swarm.durable_op {
            return;
        }
        let acked = swarm.acked.entry((conn, class)).or_default();
        if op_id <= *acked {
            return;
        }
        *acked = op_id;
        let acked = *acked;
        match self.received.get(&swarm.name, op_id) {
            Some(received) => {
                let lag = now.saturating_duration_since(received).as_micros();
                self.ack_lag[class.index()].saturating_record(lag.max(1) as u64);
            }
            None => self.ack_lag_unmeasured += 1,
        }
        // Progress restarts the redelivery clock; everything acknowledged stops it.
        for s in swarm.subscribers[class.index()]
            .iter_mut()
            .filter(|s| s.conn == conn)
        {
            s.unacked_since = (s.delivered > acked).then_some(now);
        }
        self.track(conn, swarm_name);
    }

    /// Forgets every subscription and ack of a connection. Swarms stay: their sequencers
    /// must continue where they were.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let Some(names) = self.conn_swarms.remove(&conn) else {
            return;
        };
        for name in names {
            if let Some(swarm) = self.swarms.get_mut(&*name) {
                if swarm.subscribers[Class::Telemetry.index()]
                    .iter()
                    .any(|s| s.conn == conn)
                {
                    self.telemetry_changed.insert(swarm.name.clone());
                }
                for list in &mut swarm.subscribers {
                    list.retain(|s| s.conn != conn);
                }
                swarm.acked.retain(|(c, _), _| *c != conn);
            }
        }
    }

    /// The telemetry route of every swarm whose telemetry subscribers or availability
    /// changed since the last call: `None` where the swarm routes no telemetry any more (no
    /// subscriber, available). A driver that routes telemetry from copies replaces its
    /// copies with these before it answers the request that changed them.
    pub fn take_telemetry_changes(&mut self) -> Vec<(Arc<str>, Option<TelemetryRoute<H>>)> {
        if self.telemetry_changed.is_empty() {
            return Vec::new();
        }
        let swarms = &self.swarms;
        self.telemetry_changed
            .drain()
            .map(|name| {
                let route = swarms.get(&name).and_then(|swarm| {
                    let subscribers: Vec<_> = swarm.subscribers[Class::Telemetry.index()]
                        .iter()
                        .map(|s| TelemetrySubscriber {
                            agent: s.agent.clone(),
                            all_sources: s.all_sources,
                            sources: s.sources.clone(),
                            handle: s.handle.clone(),
                        })
                        .collect();
                    (!subscribers.is_empty() || swarm.unavailable.is_some()).then(|| {
                        TelemetryRoute {
                            unavailable: swarm.unavailable.clone(),
                            subscribers,
                        }
                    })
                });
                (name, route)
            })
            .collect()
    }

    /// The next piece of work for the driver.
    pub fn poll_action(&mut self) -> Option<Action<H>> {
        self.actions.pop_front()
    }

    /// The op id the next ordered message of `swarm` will get (1 for a new swarm).
    pub fn next_op(&self, swarm: &str) -> OpId {
        OpId(self.swarms.get(swarm).map_or(1, |s| s.next_op))
    }

    /// The highest op of `swarm` the log reported durable.
    pub fn durable_op(&self, swarm: &str) -> OpId {
        self.swarms.get(swarm).map_or(OpId(0), |s| s.durable_op)
    }

    pub fn epoch(&self, swarm: &str) -> Option<Epoch> {
        self.swarms.get(swarm).map(|s| s.epoch)
    }

    /// The highest op id `conn` acknowledged in `swarm`.
    pub fn acked(&self, conn: ConnId, swarm: &str) -> OpId {
        self.swarms
            .get(swarm)
            .and_then(|s| s.acked.get(&(conn, Class::Command)).copied())
            .unwrap_or_default()
    }

    pub fn swarm_count(&self) -> usize {
        self.swarms.len()
    }

    pub fn subscriber_count(&self, swarm: &str, class: Class) -> usize {
        self.swarms
            .get(swarm)
            .map_or(0, |s| s.subscribers[class.index()].len())
    }
}

#[cfg(test)]
mod tests;
