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
/// the default epoch for unordered classes); the payload follows it unchanged.
pub fn deliver_head(publish: &Publish, source_agent: &str, op_id: OpId, epoch: Epoch) -> Bytes {
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

/// Whether a subscriber (`agent`, subscribed to every source or to `sources`) wants a
/// message from `source` targeted at `target`.
fn subscriber_wants(
    agent: &str,
    all_sources: bool,
    sources: &[Box<str>],
    source: &str,
    target: Option<&str>,
) -> bool {
    if targeted_elsewhere(target, agent) {
        return false;
    }
    all_sources || sources.iter().any(|s| **s == *source)
}

impl<H> Subscriber<H> {
    fn wants(&self, source: &str, target: Option<&str>) -> bool {
        subscriber_wants(&self.agent, self.all_sources, &self.sources, source, target)
    }
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

impl<H> TelemetryRoute<H> {
    /// The handles of the subscribers that want telemetry from `source` targeted at
    /// `target`, each once.
    pub fn recipients<'a>(
        &'a self,
        source: &'a str,
        target: Option<&'a str>,
    ) -> impl Iterator<Item = &'a H> + 'a {
        self.subscribers
            .iter()
            .filter(move |s| subscriber_wants(&s.agent, s.all_sources, &s.sources, source, target))
            .map(|s| &s.handle)
    }

    /// Whether any subscriber wants telemetry from `source` targeted at `target`.
    pub fn wanted(&self, source: &str, target: Option<&str>) -> bool {
        self.recipients(source, target).next().is_some()
    }
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
}

impl<H> Swarm<H> {
    fn new(name: &str, epoch: Epoch, last_op: OpId) -> Self {
        Swarm {
            name: name.into(),
            epoch,
            next_op: last_op.0 + 1,
            durable_op: last_op,
            unavailable: None,
            log_created: false,
            pending: VecDeque::new(),
            subscribers: Default::default(),
            acked: HashMap::new(),
            last_publish: None,
            paused: false,
            creator: None,
        }
    }

    fn check_available(&self) -> Result<(), CoreError> {
        match &self.unavailable {
            Some(reason) => Err(CoreError::Unavailable {
                swarm: self.name.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Queues `frame` (of op `op`, `OpId::NONE` for unordered classes) for every live
    /// subscriber of `class` that wants it; returns how many.
    #[allow(clippy::too_many_arguments)] // the hot path: plain arguments, no bundling struct
    fn fan_out(
        &mut self,
        class: Class,
        op: OpId,
        source: &str,
        target: Option<&str>,
        frame: &OutFrame,
        now: Instant,
        actions: &mut VecDeque<Action<H>>,
    ) -> usize
    where
        H: Clone,
    {
        let mut recipients = 0;
        let name = &self.name;
        let hold = self.paused && class == Class::Command;
        for subscriber in &mut self.subscribers[class.index()] {
            if hold {
                // Paused: the op waits in the log; the subscriber reads it from there, in
                // order, once the swarm is resumed.
                subscriber.cursor.get_or_insert(op);
                continue;
            }
            if subscriber.cursor.is_some() {
                // Catching up from the log: it will read this op there, in order.
                continue;
            }
            if subscriber.wants(source, target) {
                if !op.is_none() {
                    subscriber.delivered = op;
                    subscriber.unacked_since.get_or_insert(now);
                }
                actions.push_back(Action::Deliver {
                    to: subscriber.handle.clone(),
                    class,
                    frame: frame.clone(),
                    swarm: name.clone(),
                    op,
                });
                recipients += 1;
            }
        }
        recipients
    }
}

/// splitmix64: the core's seeded source of new epochs (replayable from the seed).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
        }
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

    /// Subscribers catching up from the log, with the range each still needs.
    pub fn catching_up(&mut self) -> Vec<CatchUp<H>> {
        let mut out = Vec::new();
        let swarms = &self.swarms;
        self.catching_swarms.retain(|name| {
            let Some(swarm) = swarms.get(name) else {
                return false;
            };
            let before = out.len();
            for class in [Class::Control, Class::Command] {
                if swarm.paused && class == Class::Command {
                    // Held until resumed; keep the swarm listed so resuming finds it.
                    if swarm.subscribers[class.index()]
                        .iter()
                        .any(|s| s.cursor.is_some())
                    {
                        return true;
                    }
                    continue;
                }
                for s in &swarm.subscribers[class.index()] {
                    if let Some(from) = s.cursor {
                        out.push(CatchUp {
                            conn: s.conn,
                            swarm: swarm.name.clone(),
                            class,
                            from,
                            to: swarm.durable_op,
                            handle: s.handle.clone(),
                        });
                    }
                }
            }
            out.len() > before
        });
        out
    }

    /// The driver read `ops` (every op of the swarm from the catch-up's `from` through
    /// `read_up_to`, any class) from the log for the subscriber `conn`: queue those it wants,
    /// in order, and move its cursor on. Once past the durable op it receives live ops. A
    /// read for a cursor the subscriber no longer has (it subscribed again meanwhile) is
    /// dropped: the driver reads again from the cursor it has.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_replayed(
        &mut self,
        conn: ConnId,
        swarm_name: &str,
        class: Class,
        from: OpId,
        ops: &[ReplayedOp],
        read_up_to: OpId,
        now: Instant,
    ) -> usize {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return 0;
        };
        let durable = swarm.durable_op;
        let Some(subscriber) = swarm.subscribers[class.index()]
            .iter_mut()
            .find(|s| s.conn == conn)
        else {
            return 0;
        };
        let Some(cursor) = subscriber.cursor.filter(|cursor| *cursor == from) else {
            return 0;
        };
        let mut queued = 0;
        for op in ops
            .iter()
            .filter(|op| op.op >= cursor && op.op <= read_up_to)
        {
            if op.class == class && subscriber.wants(&op.source, op.target.as_deref()) {
                self.actions.push_back(Action::Deliver {
                    to: subscriber.handle.clone(),
                    class,
                    frame: OutFrame {
                        head: op.frame.clone(),
                        body: Bytes::new(),
                    },
                    swarm: swarm.name.clone(),
                    op: op.op,
                });
                // Only ops actually sent count as awaiting an acknowledgement.
                subscriber.delivered = subscriber.delivered.max(op.op);
                subscriber.unacked_since.get_or_insert(now);
                queued += 1;
            }
        }
        if read_up_to >= cursor {
            let next = OpId(read_up_to.0.saturating_add(1));
            subscriber.cursor = (next <= durable).then_some(next);
        }
        queued
    }

    /// Op `op` (ordered) did not fit the queue of subscriber `conn`: it stops receiving live
    /// ops and catches up from the log, from that op on, once its queue drains. Nothing is
    /// lost and nothing buffers without bound.
    pub fn handle_lagging(&mut self, conn: ConnId, swarm_name: &str, class: Class, op: OpId) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if !class.is_ordered() || op.is_none() {
            return;
        }
        if let Some(s) = swarm.subscribers[class.index()]
            .iter_mut()
            .find(|s| s.conn == conn)
        {
            s.cursor = Some(s.cursor.map_or(op, |c| c.min(op)));
            self.catching_swarms.insert(swarm.name.clone());
        }
    }

    /// Periodic work: ordered ops delivered but unacknowledged for longer than the
    /// redelivery timeout are sent again, from the subscriber's last acknowledged op on.
    pub fn handle_tick(&mut self, now: Instant) -> usize {
        let timeout = self.config.redelivery_timeout;
        let mut rewound = 0;
        for (name, swarm) in self.swarms.iter_mut() {
            for class in [Class::Control, Class::Command] {
                for s in &mut swarm.subscribers[class.index()] {
                    let acked = swarm
                        .acked
                        .get(&(s.conn, class))
                        .copied()
                        .unwrap_or_default();
                    let overdue = s
                        .unacked_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= timeout);
                    if s.cursor.is_none() && s.delivered > acked && overdue {
                        s.cursor = Some(OpId(acked.0.saturating_add(1)));
                        s.unacked_since = None;
                        self.catching_swarms.insert(name.clone());
                        rewound += 1;
                    }
                }
            }
        }
        rewound
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
                && swarm.unavailable.is_none();
            if idle {
                budget.give_back(swarm.creator.as_deref());
                catching.remove(name);
            }
            !idle
        });
        before - self.swarms.len()
    }

    /// A DeltaRequest from `agent`: ops `from..=to` (`to` 0: the latest durable op) of the
    /// swarm, at most `delta_max_ops`, answered through a `ReadDelta` action.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_delta_request(
        &mut self,
        agent: &Arc<str>,
        handle: H,
        swarm_name: &str,
        request_id: u64,
        from: OpId,
        to: OpId,
    ) -> Result<(), CoreError> {
        let Some(swarm) = self.swarms.get(swarm_name) else {
            // A swarm with no log yet: an empty answer.
            self.actions.push_back(Action::Reply {
                to: handle,
                message: Message::DeltaAck(swarmbus_schema::DeltaAck {
                    request_id,
                    ..Default::default()
                }),
            });
            return Ok(());
        };
        swarm.check_available()?;
        let from = from.max(OpId(1));
        let wanted_end = if to.is_none() {
            swarm.durable_op
        } else {
            to.min(swarm.durable_op)
        };
        let capped = OpId(
            wanted_end
                .0
                .min(from.0.saturating_add(self.config.delta_max_ops) - 1),
        );
        self.actions.push_back(Action::ReadDelta(DeltaQuery {
            to_handle: handle,
            agent: agent.clone(),
            swarm: swarm.name.clone(),
            epoch: swarm.epoch,
            request_id,
            from,
            to: capped,
            more: capped < wanted_end,
        }));
        Ok(())
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
    pub fn handle_publish(
        &mut self,
        source_agent: &str,
        publisher: H,
        publish: &Publish,
        now: Now,
    ) -> Result<PublishOutcome, CoreError> {
        let class = publish.class;
        let target = publish.target_agent.as_deref();
        let head_for =
            |op_id: OpId, epoch: Epoch| deliver_head(publish, source_agent, op_id, epoch);
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
        swarm.durable_op = swarm.durable_op.max(up_to);
        let mut delivered = 0;
        while swarm.pending.front().is_some_and(|p| p.op <= up_to) {
            let Some(op) = swarm.pending.pop_front() else {
                break;
            };
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
        swarm.unavailable = Some(reason.clone());
        self.telemetry_changed.insert(swarm.name.clone());
        for op in swarm.pending.drain(..) {
            self.actions.push_back(Action::Reply {
                to: op.publisher,
                message: crate::refusal::Refusal::new(ErrorCode::SwarmUnavailable, reason.clone())
                    .message(op.request_id),
            });
        }
    }

    /// The swarm's log takes appends again after a failure (the refused ops were voided and
    /// are durable): the swarm is served again. Op ids continue after the voided ones.
    pub fn handle_log_recovered(&mut self, swarm_name: &str) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        debug_assert!(swarm.pending.is_empty() && swarm.durable_op.0 + 1 == swarm.next_op);
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
mod tests {
    use super::*;
    use bytes::Bytes;

    const PUBLISHER: u64 = 1000;

    fn publish(swarm: &str, class: Class, target: Option<&str>, payload: &'static [u8]) -> Publish {
        Publish {
            request_id: 1,
            swarm: swarm.into(),
            class,
            target_agent: target.map(Into::into),
            key: None,
            payload: Bytes::from_static(payload),
            fencing_token: 0,
            lease: None,
        }
    }

    /// Everything the core asked for, with appends made durable at once (as a log would).
    #[derive(Default)]
    struct Drained {
        deliveries: Vec<(u64, Class, OutFrame)>,
        replies: Vec<(u64, Message)>,
        appends: Vec<(Arc<str>, OpId)>,
        created: Vec<(Arc<str>, Epoch)>,
    }

    fn drain(core: &mut Core<u64>) -> Drained {
        let mut out = Drained::default();
        loop {
            let mut durable: Vec<(Arc<str>, OpId)> = Vec::new();
            while let Some(action) = core.poll_action() {
                match action {
                    Action::Deliver {
                        to, class, frame, ..
                    } => out.deliveries.push((to, class, frame)),
                    Action::Reply { to, message } => out.replies.push((to, message)),
                    Action::CreateLog { swarm, epoch } => out.created.push((swarm, epoch)),
                    Action::Append { swarm, op, .. } => {
                        out.appends.push((swarm.clone(), op));
                        durable.push((swarm, op));
                    }
                    Action::ReadDelta(_) => {}
                }
            }
            if durable.is_empty() {
                return out;
            }
            for (swarm, op) in durable {
                core.handle_durable(&swarm, op, Instant::now());
            }
        }
    }

    fn agent(name: &str) -> Arc<str> {
        name.into()
    }

    fn now() -> Now {
        Now {
            instant: Instant::now(),
            unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_paused_swarm_holds_commands_and_resume_releases_them_in_order() {
        let mut core: Core<u64> = Core::new(16);
        let now = now();
        core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
            .unwrap();
        core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Control, None, None)
            .unwrap();
        core.handle_pause("s", true).unwrap();
        assert!(core.is_paused("s"));
        for payload in [&b"c1"[..], b"c2"] {
            core.handle_publish(
                "ctl",
                PUBLISHER,
                &publish("s", Class::Command, None, payload),
                now,
            )
            .unwrap();
        }
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Control, None, b"k"),
            now,
        )
        .unwrap();
        let drained = drain(&mut core);
        // Publishers are acknowledged, control goes through, commands are held.
        let acks = drained
            .replies
            .iter()
            .filter(|(to, m)| *to == PUBLISHER && matches!(m, Message::PublishAck { .. }))
            .count();
        assert_eq!(acks, 3);
        let delivered: Vec<Class> = drained.deliveries.iter().map(|(_, c, _)| *c).collect();
        assert_eq!(delivered, vec![Class::Control]);
        assert!(core.catching_up().is_empty(), "held while paused");
        core.handle_pause("s", false).unwrap();
        let catch_up = core.catching_up();
        assert_eq!(catch_up.len(), 1);
        assert_eq!(
            (catch_up[0].class, catch_up[0].from),
            (Class::Command, OpId(1))
        );
    }

    #[test]
    fn op_ids_are_gap_free_per_swarm_and_only_for_ordered_classes() {
        let mut core = Core::<u64>::new(10);
        let mut op = |swarm: &str, class| {
            core.handle_publish("c", PUBLISHER, &publish(swarm, class, None, b"x"), now())
                .unwrap()
                .op_id
        };
        assert_eq!(op("a", Class::Command), OpId(1));
        assert_eq!(op("a", Class::Control), OpId(2));
        assert_eq!(op("b", Class::Command), OpId(1));
        assert_eq!(op("a", Class::Telemetry), OpId::NONE);
        assert_eq!(op("a", Class::Command), OpId(3));
        assert_eq!(core.next_op("a"), OpId(4));
        let drained = drain(&mut core);
        assert_eq!(drained.created.len(), 2);
        assert_ne!(
            drained.created[0].1, drained.created[1].1,
            "each swarm gets its own epoch"
        );
        assert_eq!(drained.appends.len(), 4);
    }

    #[test]
    fn ordered_ops_are_acknowledged_and_delivered_only_once_durable() {
        let mut core = Core::<u64>::new(10);
        core.handle_subscribe(ConnId(1), &agent("a1"), 1, "s", Class::Command, None, None)
            .unwrap();
        for _ in 0..3 {
            core.handle_publish(
                "ctl",
                PUBLISHER,
                &publish("s", Class::Command, None, b"x"),
                now(),
            )
            .unwrap();
        }
        let mut appends = Vec::new();
        while let Some(action) = core.poll_action() {
            match action {
                Action::Append { op, record, .. } => {
                    let (parsed, _) = crate::record::parse_record(&record.to_bytes()).unwrap();
                    assert_eq!(parsed.op, op);
                    appends.push(op);
                }
                Action::CreateLog { .. } => {}
                other => panic!("nothing but appends before durability: {other:?}"),
            }
        }
        assert_eq!(appends, vec![OpId(1), OpId(2), OpId(3)]);
        // Durable up to 2: two acks and two deliveries, in order; op 3 still waits.
        core.handle_durable("s", OpId(2), Instant::now());
        let mut order = Vec::new();
        while let Some(action) = core.poll_action() {
            match action {
                Action::Reply {
                    to,
                    message: Message::PublishAck { op_id, .. },
                } => {
                    assert_eq!(to, PUBLISHER);
                    order.push(("ack", op_id.0));
                }
                Action::Deliver { to, .. } => {
                    assert_eq!(to, 1);
                    order.push(("deliver", 0));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            order,
            vec![("ack", 1), ("deliver", 0), ("ack", 2), ("deliver", 0)]
        );
        assert_eq!(core.durable_op("s"), OpId(2));
        core.handle_durable("s", OpId(3), Instant::now());
        assert_eq!(drain(&mut core).deliveries.len(), 1);
    }

    #[test]
    fn a_failed_log_makes_the_swarm_unavailable_and_refuses_pending_publishers() {
        let mut core = Core::<u64>::new(10);
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
        while core.poll_action().is_some() {}
        core.handle_log_failed("s", OpId(1), "disk full");
        let Some(Action::Reply {
            message: Message::Error(error),
            ..
        }) = core.poll_action()
        else {
            panic!("pending publisher not told");
        };
        assert_eq!(error.code, ErrorCode::SwarmUnavailable.as_u16());
        let err = core
            .handle_publish(
                "ctl",
                PUBLISHER,
                &publish("s", Class::Command, None, b"x"),
                now(),
            )
            .unwrap_err();
        assert!(matches!(err, CoreError::Unavailable { .. }));
        assert!(core
            .handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Telemetry, None, None)
            .is_err());
        // Other swarms are served.
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("t", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
    }

    #[test]
    fn restored_swarms_continue_their_sequence_in_their_epoch() {
        let mut core = Core::<u64>::new(10);
        core.restore_swarm("s", Epoch(42), OpId(17), None);
        let outcome = core
            .handle_publish(
                "ctl",
                PUBLISHER,
                &publish("s", Class::Command, None, b"x"),
                now(),
            )
            .unwrap();
        assert_eq!(outcome.op_id, OpId(18));
        assert_eq!(core.epoch("s"), Some(Epoch(42)));
        let drained = drain(&mut core);
        assert!(
            drained.created.is_empty(),
            "a restored swarm's log exists already"
        );
        core.restore_swarm("bad", Epoch(1), OpId(3), Some("damaged".into()));
        assert!(core
            .handle_publish(
                "ctl",
                PUBLISHER,
                &publish("bad", Class::Command, None, b"x"),
                now()
            )
            .is_err());
    }

    /// The routes a driver would hold after applying every change so far.
    fn telemetry_routes(
        core: &mut Core<u64>,
        routes: &mut HashMap<Arc<str>, TelemetryRoute<u64>>,
    ) -> usize {
        let changes = core.take_telemetry_changes();
        let count = changes.len();
        for (name, route) in changes {
            match route {
                Some(route) => routes.insert(name, route),
                None => routes.remove(&name),
            };
        }
        count
    }

    fn recipients(route: &TelemetryRoute<u64>, source: &str, target: Option<&str>) -> Vec<u64> {
        let mut to: Vec<u64> = route.recipients(source, target).copied().collect();
        to.sort_unstable();
        to
    }

    #[test]
    fn telemetry_routes_follow_subscriptions_disconnects_and_failures() {
        let mut core = Core::<u64>::new(10);
        let mut routes = HashMap::new();
        let sub = |core: &mut Core<u64>, conn: u64, name: &str, class, filter| {
            core.handle_subscribe(ConnId(conn), &agent(name), conn, "s", class, filter, None)
                .unwrap()
        };
        assert!(sub(&mut core, 1, "a1", Class::Telemetry, None));
        assert!(sub(&mut core, 2, "a2", Class::Telemetry, Some("a1")));
        // Command subscriptions are no telemetry route's business.
        sub(&mut core, 3, "a3", Class::Command, None);
        assert_eq!(telemetry_routes(&mut core, &mut routes), 1);
        let route = &routes["s"];
        assert!(route.unavailable.is_none());
        assert_eq!(recipients(route, "a1", None), vec![1, 2]);
        assert_eq!(recipients(route, "a9", None), vec![1]);
        assert_eq!(recipients(route, "a1", Some("a2")), vec![2]);
        assert!(!route.wanted("a9", Some("a2")));
        // Nothing changed, nothing to take.
        sub(&mut core, 1, "a1", Class::Telemetry, None);
        assert_eq!(telemetry_routes(&mut core, &mut routes), 0);

        assert!(core.handle_unsubscribe(ConnId(2), "s", Class::Telemetry, Some("a1")));
        telemetry_routes(&mut core, &mut routes);
        assert_eq!(recipients(&routes["s"], "a1", None), vec![1]);
        core.handle_disconnect(ConnId(3));
        assert_eq!(telemetry_routes(&mut core, &mut routes), 0);
        core.handle_disconnect(ConnId(1));
        telemetry_routes(&mut core, &mut routes);
        assert!(!routes.contains_key("s"), "no subscriber, no route");

        // An unavailable swarm keeps a route that refuses, subscribers or not.
        sub(&mut core, 4, "a4", Class::Telemetry, None);
        core.handle_log_failed("s", OpId(1), "disk gone");
        telemetry_routes(&mut core, &mut routes);
        assert!(routes["s"]
            .unavailable
            .as_deref()
            .unwrap()
            .contains("disk gone"));
        core.handle_disconnect(ConnId(4));
        telemetry_routes(&mut core, &mut routes);
        assert!(routes["s"].unavailable.is_some());
        core.restore_swarm("bad", Epoch(1), OpId(3), Some("damaged".into()));
        telemetry_routes(&mut core, &mut routes);
        assert_eq!(routes["bad"].unavailable.as_deref(), Some("damaged"));
    }

    #[test]
    fn targeted_and_filtered_delivery() {
        let mut core = Core::<u64>::new(10);
        core.handle_subscribe(ConnId(1), &agent("a1"), 1, "s", Class::Command, None, None)
            .unwrap();
        core.handle_subscribe(ConnId(2), &agent("a2"), 2, "s", Class::Command, None, None)
            .unwrap();
        core.handle_subscribe(
            ConnId(3),
            &agent("ctl"),
            3,
            "s",
            Class::Telemetry,
            Some("a1"),
            None,
        )
        .unwrap();
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, Some("a2"), b"x"),
            now(),
        )
        .unwrap();
        let out = drain(&mut core);
        assert_eq!(
            out.deliveries.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![2]
        );
        core.handle_publish(
            "a2",
            PUBLISHER,
            &publish("s", Class::Telemetry, None, b"t"),
            now(),
        )
        .unwrap();
        assert!(
            drain(&mut core).deliveries.is_empty(),
            "filter on a1 must drop a2's telemetry"
        );
        core.handle_publish(
            "a1",
            PUBLISHER,
            &publish("s", Class::Telemetry, None, b"t"),
            now(),
        )
        .unwrap();
        assert_eq!(drain(&mut core).deliveries.len(), 1);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_and_unsubscribe_is_exact() {
        let mut core = Core::<u64>::new(10);
        let a = agent("a");
        assert!(core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, Some("x"), None)
            .unwrap());
        assert!(core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None, None)
            .unwrap());
        assert!(!core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None, None)
            .unwrap());
        let send = |core: &mut Core<u64>, from: &str| {
            core.handle_publish(
                from,
                PUBLISHER,
                &publish("s", Class::Alert, None, b"!"),
                now(),
            )
            .unwrap();
            drain(core).deliveries.len()
        };
        assert_eq!(send(&mut core, "x"), 1);
        assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, None));
        assert_eq!(send(&mut core, "y"), 0);
        assert_eq!(send(&mut core, "x"), 1);
        assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
        assert_eq!(core.subscriber_count("s", Class::Alert), 0);
        assert!(!core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
    }

    #[test]
    fn fan_out_shares_one_head_and_the_payload_buffer() {
        let mut core = Core::<u64>::new(10);
        for i in 0..5 {
            core.handle_subscribe(ConnId(i), &agent("a"), i, "s", Class::Telemetry, None, None)
                .unwrap();
        }
        let p = publish("s", Class::Telemetry, None, &[9u8; 4096]);
        let outcome = core.handle_publish("ctl", PUBLISHER, &p, now()).unwrap();
        assert_eq!(outcome.recipients, 5);
        let out = drain(&mut core).deliveries;
        for (_, _, frame) in &out {
            assert_eq!(frame.body.as_ptr(), p.payload.as_ptr());
            assert_eq!(frame.head.as_ptr(), out[0].2.head.as_ptr());
        }
    }

    #[test]
    fn disconnect_removes_subscriptions_but_keeps_the_sequencer() {
        let mut core = Core::<u64>::new(10);
        core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
            .unwrap();
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"1"),
            now(),
        )
        .unwrap();
        drain(&mut core);
        core.handle_ack(ConnId(1), "s", Class::Command, OpId(1), Instant::now());
        core.handle_ack(ConnId(1), "s", Class::Command, OpId(99), Instant::now()); // beyond what is durable: ignored
        assert_eq!(core.acked(ConnId(1), "s"), OpId(1));
        // An ack from a connection that never subscribed is freed on disconnect too.
        core.handle_ack(ConnId(2), "s", Class::Command, OpId(1), Instant::now());
        assert_eq!(core.acked(ConnId(2), "s"), OpId(1));
        core.handle_disconnect(ConnId(2));
        assert_eq!(core.acked(ConnId(2), "s"), OpId(0));
        assert!(!core.conn_swarms.contains_key(&ConnId(2)));
        core.handle_disconnect(ConnId(1));
        assert_eq!(core.subscriber_count("s", Class::Command), 0);
        assert!(core.conn_swarms.is_empty());
        assert_eq!(core.acked(ConnId(1), "s"), OpId(0));
        let next = core
            .handle_publish(
                "c",
                PUBLISHER,
                &publish("s", Class::Command, None, b"2"),
                now(),
            )
            .unwrap();
        assert_eq!(next.op_id, OpId(2));
    }

    #[test]
    fn swarm_cap_refuses_new_swarms_only() {
        let mut core = Core::<u64>::new(1);
        let send = |core: &mut Core<u64>, swarm: &str, class| {
            core.handle_publish("c", PUBLISHER, &publish(swarm, class, None, b""), now())
        };
        send(&mut core, "one", Class::Command).unwrap();
        assert_eq!(
            send(&mut core, "two", Class::Command),
            Err(CoreError::TooManySwarms { max: 1 })
        );
        assert!(core
            .handle_subscribe(ConnId(1), &agent("a"), 1, "two", Class::Command, None, None)
            .is_err());
        send(&mut core, "one", Class::Command).unwrap();
        // Telemetry to an unknown swarm creates nothing and is not an error.
        assert_eq!(
            send(&mut core, "three", Class::Telemetry)
                .unwrap()
                .recipients,
            0
        );
        assert_eq!(core.swarm_count(), 1);
    }

    #[test]
    fn the_swarm_cap_is_shared_by_shards_and_idle_swarms_are_freed() {
        let swarms = SwarmBudget::new(3, 2);
        let config = CoreConfig {
            swarms: swarms.clone(),
            ..CoreConfig::default()
        };
        let (mut one, mut two) = (
            Core::<u64>::with_config(config.clone()),
            Core::<u64>::with_config(config),
        );
        let subscribe = |core: &mut Core<u64>, conn: u64, who: &str, swarm: &str| {
            core.handle_subscribe(
                ConnId(conn),
                &agent(who),
                conn,
                swarm,
                Class::Telemetry,
                None,
                None,
            )
        };
        subscribe(&mut one, 1, "a", "s1").unwrap();
        subscribe(&mut one, 1, "a", "s2").unwrap();
        // The agent's quota is full: in either shard.
        assert_eq!(
            subscribe(&mut two, 1, "a", "s3"),
            Err(CoreError::AgentSwarmQuota { max: 2 })
        );
        // An ordered publish gives s3 a log: it stays in memory.
        two.handle_publish(
            "b",
            PUBLISHER,
            &publish("s3", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
        drain(&mut two);
        // The router-wide cap counts both shards.
        assert_eq!(
            subscribe(&mut two, 2, "b", "s4"),
            Err(CoreError::TooManySwarms { max: 3 })
        );
        // Subscribed swarms, and swarms with a log, are not freed.
        assert_eq!(one.collect_idle() + two.collect_idle(), 0);
        one.handle_disconnect(ConnId(1));
        assert_eq!(one.collect_idle(), 2);
        assert_eq!(
            (one.swarm_count(), two.swarm_count(), swarms.held()),
            (0, 1, 1)
        );
        assert_eq!(two.collect_idle(), 0);
        // Room again, and the agent's quota was given back.
        subscribe(&mut two, 1, "a", "s1").unwrap();
        subscribe(&mut one, 1, "a", "s2").unwrap();
        assert_eq!(swarms.held(), 3);
    }

    #[test]
    fn a_left_ordered_subscription_frees_its_swarm_and_its_tracking() {
        let mut core = Core::<u64>::new(10);
        for name in ["o", "p"] {
            core.handle_subscribe(ConnId(5), &agent("c"), 5, name, Class::Command, None, None)
                .unwrap();
        }
        core.handle_ack(ConnId(5), "o", Class::Command, OpId(0), Instant::now());
        assert!(core.handle_unsubscribe(ConnId(5), "o", Class::Command, None));
        // "o" is no longer the connection's; "p" still is.
        assert_eq!(core.conn_swarms[&ConnId(5)].len(), 1);
        assert_eq!(core.collect_idle(), 1);
        assert_eq!(core.swarm_count(), 1);
        assert!(core.handle_unsubscribe(ConnId(5), "p", Class::Command, None));
        assert!(!core.conn_swarms.contains_key(&ConnId(5)));
        assert_eq!(core.collect_idle(), 1);
    }

    #[test]
    fn redelivery_rewinds_to_the_last_ack_never_before_the_subscription() {
        let mut core = Core::<u64>::with_config(CoreConfig {
            redelivery_timeout: Duration::from_secs(1),
            ..CoreConfig::default()
        });
        let send = |core: &mut Core<u64>| {
            core.handle_publish(
                "c",
                PUBLISHER,
                &publish("s", Class::Command, None, b"x"),
                now(),
            )
            .unwrap();
            drain(core)
        };
        for _ in 0..5 {
            send(&mut core);
        }
        core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
            .unwrap();
        assert_eq!(send(&mut core).deliveries.len(), 1); // op 6
        let start = Instant::now();
        assert_eq!(core.handle_tick(start), 0, "not overdue yet");
        assert_eq!(core.handle_tick(start + Duration::from_secs(2)), 1);
        let catch_up = core.catching_up();
        assert_eq!(catch_up.len(), 1);
        // Ops 1..=5 were durable before it subscribed: only op 6 is sent again.
        assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(6), OpId(6)));
        // Acknowledged: no more redelivery.
        core.handle_replayed(ConnId(1), "s", Class::Command, OpId(6), &[], OpId(6), start);
        core.handle_ack(ConnId(1), "s", Class::Command, OpId(6), start);
        assert_eq!(core.handle_tick(start + Duration::from_secs(10)), 0);
    }

    #[test]
    fn a_resume_point_catches_up_then_goes_live_without_gap_or_repeat() {
        let mut core = Core::<u64>::new(10);
        for _ in 0..10 {
            core.handle_publish(
                "c",
                PUBLISHER,
                &publish("s", Class::Command, None, b"x"),
                now(),
            )
            .unwrap();
        }
        drain(&mut core);
        let epoch = core.epoch("s").unwrap();
        core.handle_subscribe(
            ConnId(1),
            &agent("a"),
            1,
            "s",
            Class::Command,
            None,
            Some((epoch, OpId(4))),
        )
        .unwrap();
        let catch_up = core.catching_up();
        assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(5), OpId(10)));
        // A live op while catching up is not sent live: it will be read from the log.
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
        assert!(drain(&mut core).deliveries.is_empty());
        let replayed: Vec<ReplayedOp> = (5..=10)
            .map(|op| ReplayedOp {
                op: OpId(op),
                class: Class::Command,
                source: "c".into(),
                target: None,
                frame: Bytes::from(vec![op as u8]),
            })
            .collect();
        // A read planned from another cursor (it finished late) is dropped.
        core.handle_replayed(
            ConnId(1),
            "s",
            Class::Command,
            OpId(4),
            &replayed,
            OpId(10),
            Instant::now(),
        );
        assert!(drain(&mut core).deliveries.is_empty());
        core.handle_replayed(
            ConnId(1),
            "s",
            Class::Command,
            OpId(5),
            &replayed,
            OpId(10),
            Instant::now(),
        );
        assert_eq!(drain(&mut core).deliveries.len(), 6);
        // Op 11 became durable meanwhile: one more step, then live.
        let catch_up = core.catching_up();
        assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(11), OpId(11)));
        core.handle_replayed(
            ConnId(1),
            "s",
            Class::Command,
            OpId(11),
            &[],
            OpId(11),
            Instant::now(),
        );
        assert!(core.catching_up().is_empty());
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
        assert_eq!(drain(&mut core).deliveries.len(), 1);
    }
}
