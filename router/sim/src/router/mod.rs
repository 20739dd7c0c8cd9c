//! The simulated router: the proto machines ([`Core`], [`Leases`], [`Jobs`]) and the driver
//! around them, written after the router's own (`router/src/shard`, `router/src/server`):
//! every input is followed by [`SimRouter::settle`], which carries out the core's actions as
//! the shard's `flush` does, answers the router's own log writes once durable (lease grants,
//! job specs and ends wait for them, as `Context::write_records` does), and plans catch-up
//! reads as `pump_catch_ups` does. What the real router does on other threads (the log
//! writer's durable reports, catch-up reads) is left pending here and completed by later,
//! seeded steps of the simulation.
//!
//! Layout: this file holds the state, the inputs of routing and the action loop;
//! `restore` the start from the log; `control` leases and fenced publishes; `jobs` the job
//! queue's inputs and effects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use swarmbus_proto::control::{Granted, Leases};
use swarmbus_proto::core::{Action, Core, ReplayedOp};
use swarmbus_proto::jobs::{JobRecord, Jobs};
use swarmbus_proto::{ConnId, Lane, Now};
use swarmbus_schema::{encode, Class, Epoch, JobId, Message, OpId, OutFrame, Publish};

use crate::log::{deliver_of, AppendRefused, SimLog};

mod control;
mod jobs;
pub mod restore;

pub use control::{LeaseDecision, StampCheck};

/// The publisher handle of the router's own writes (`INTERNAL_CONN` in the shard).
pub const INTERNAL: ConnId = ConnId(u64::MAX);
/// The agent id the router's own records are published as.
pub const ROUTER_AGENT: &str = "swarmbus-router";
/// Ordered deliveries queued per connection and class before the subscriber is lagging
/// (kept small so that the catch-up path runs often).
pub const CLASS_LANE_CAPACITY: usize = 16;
/// Catch-up reads in flight at once (`MAX_READS` in the shard).
const MAX_READS: usize = 8;
/// Ops one catch-up read returns at most (`CATCH_UP_CHUNK_OPS`).
const CATCH_UP_CHUNK_OPS: usize = 512;
/// The shard's redelivery tick (`TICK`), in router-clock ms.
const CORE_TICK_MS: u64 = 100;
/// How often expired lease holdings are swept (the presence task's once a second).
const LEASE_SWEEP_MS: u64 = 1_000;

/// Where the router's frames go: the simulated clients' queues (the router's `Outbox`).
pub trait Outboxes {
    /// Queues a frame; a closed connection drops it, a full telemetry lane sheds its oldest.
    fn push(&mut self, to: ConnId, lane: Lane, frame: OutFrame);
    /// Queues an ordered delivery; `false` when the lane is full (the subscriber lags).
    fn try_push(&mut self, to: ConnId, lane: Lane, frame: OutFrame) -> bool;
    fn queued(&self, to: ConnId, lane: Lane) -> usize;
    fn is_open(&self, to: ConnId) -> bool;
}

/// What one input may touch besides the router: the log, the clients' queues, the time.
pub struct Io<'a> {
    pub log: &'a mut SimLog,
    pub out: &'a mut dyn Outboxes,
    pub now: Now,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// A router write waiting for its record to be durable.
#[derive(Debug)]
enum Waiter {
    Grant {
        to: ConnId,
        request_id: u64,
        granted: Granted,
        ttl_ms: u64,
    },
    Release {
        to: ConnId,
        request_id: u64,
    },
    Spec {
        job_id: JobId,
    },
    Finals {
        group: u64,
    },
}

/// Job ends written together; announced once all are durable.
#[derive(Debug)]
struct FinalsGroup {
    written: Vec<JobRecord>,
    left: usize,
    after: Vec<(ConnId, Lane, OutFrame)>,
}

/// A catch-up read planned for a subscriber, completed by a later step.
#[derive(Debug, Clone)]
pub struct PendingRead {
    pub conn: ConnId,
    pub swarm: Arc<str>,
    pub class: Class,
    pub from: OpId,
    pub to: OpId,
    pub chunk: usize,
}

/// Counters of what the driver did, for the run's summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverCounts {
    pub lagging: u64,
    pub redeliveries: u64,
    pub catch_up_reads: u64,
}

/// The router's machines and driver state; everything here is lost at a crash.
#[derive(Debug)]
pub struct SimRouter {
    pub core: Core<ConnId>,
    pub leases: Leases,
    pub jobs: Jobs<ConnId>,
    waiters: BTreeMap<u64, Waiter>,
    finals: BTreeMap<u64, FinalsGroup>,
    next_internal: u64,
    next_group: u64,
    /// Catch-up reads planned, not yet done.
    pub reads: Vec<PendingRead>,
    reads_in_flight: BTreeSet<(ConnId, Arc<str>, Class)>,
    /// The log writer's durable reports, not yet handled by the core.
    pub notifications: Vec<(Arc<str>, OpId)>,
    internal_answers: Vec<(u64, Result<OpId, String>)>,
    last_core_tick_ms: u64,
    last_sweep_ms: u64,
    /// Appends the log refused: each breaks the sequencer's promise (checked after each
    /// step).
    pub refused_appends: Vec<AppendRefused>,
    pub counts: DriverCounts,
    /// The fault of a checker test: stamped publishes pass without the fencing check.
    pub danger_skip_stamp_check: bool,
}

impl SimRouter {
    /// Subscribes `conn` (agent `agent`) to `class` of `swarm`, from `resume` when given.
    pub fn subscribe(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        agent: &Arc<str>,
        swarm: &str,
        class: Class,
        resume: Option<(Epoch, OpId)>,
    ) {
        let result = self
            .core
            .handle_subscribe(conn, agent, conn, swarm, class, None, resume);
        let message = match result {
            Ok(_) => Message::SubscribeAck { request_id: 0 },
            Err(error) => refusal(error.code(), error.to_string(), 0),
        };
        io.out.push(conn, Lane::Session, encode(&message));
        self.settle(io);
    }

    /// A subscriber's cumulative acknowledgement.
    pub fn ack(&mut self, io: &mut Io<'_>, conn: ConnId, swarm: &str, class: Class, op: OpId) {
        self.core.handle_ack(conn, swarm, class, op, io.now.instant);
        self.settle(io);
    }

    /// A connection closed: the core forgets its subscriptions, the job queue fences its
    /// attempts. Its reads in flight finish into nothing, as the shard's do.
    pub fn disconnect(&mut self, io: &mut Io<'_>, conn: ConnId) {
        self.core.handle_disconnect(conn);
        let effects = self.jobs.disconnect(conn, io.now.unix_ms);
        self.apply_job_effects(io, effects);
        self.settle(io);
    }

    /// The log writer's report that `swarm` is durable up to `up_to`.
    pub fn durable(&mut self, io: &mut Io<'_>, swarm: &str, up_to: OpId) {
        self.core.handle_durable(swarm, up_to, io.now.instant);
        self.settle(io);
    }

    /// Completes the planned read at `index`: reads the log as it is now (the shard reads
    /// on the blocking pool, after planning) and hands the ops to the core.
    pub fn complete_read(&mut self, io: &mut Io<'_>, index: usize) {
        if index >= self.reads.len() {
            return;
        }
        let read = self.reads.remove(index);
        self.reads_in_flight
            .remove(&(read.conn, read.swarm.clone(), read.class));
        self.counts.catch_up_reads += 1;
        let records = io.log.read(&read.swarm, read.from, read.chunk);
        let read_up_to = records.last().map_or(read.to, |r| r.op).min(read.to);
        let ops: Vec<ReplayedOp> = records
            .into_iter()
            .filter(|r| r.op <= read.to)
            .filter_map(|r| {
                let deliver = deliver_of(&r.frame)?;
                Some(ReplayedOp {
                    op: r.op,
                    class: deliver.class,
                    source: deliver.source_agent,
                    target: deliver.target_agent,
                    frame: r.frame,
                })
            })
            .collect();
        self.core.handle_replayed(
            read.conn,
            &read.swarm,
            read.class,
            read.from,
            &ops,
            read_up_to,
            io.now.instant,
        );
        self.settle(io);
    }

    /// The router's periodic work once the clock moved: the shard's redelivery tick, the
    /// job queue's tick (at every step of the clock, where the router's runs every 10 ms,
    /// so a lease is fenced before any input at or after its expiry) and the lease sweep.
    pub fn periodic(&mut self, io: &mut Io<'_>) {
        let now_ms = io.now.unix_ms;
        if now_ms - self.last_core_tick_ms >= CORE_TICK_MS {
            self.last_core_tick_ms = now_ms;
            self.counts.redeliveries += self.core.handle_tick(io.now.instant) as u64;
            self.core.collect_idle();
        }
        let effects = self.jobs.tick(now_ms);
        self.apply_job_effects(io, effects);
        if now_ms - self.last_sweep_ms >= LEASE_SWEEP_MS {
            self.last_sweep_ms = now_ms;
            self.leases.sweep(now_ms);
        }
        self.settle(io);
    }

    /// Whether anything is still on its way inside the router (for the final drain).
    pub fn busy(&self) -> bool {
        !self.reads.is_empty() || !self.notifications.is_empty() || !self.waiters.is_empty()
    }

    /// Carries out the core's actions and the answers to the router's own writes until
    /// none are left, then plans catch-up reads.
    pub fn settle(&mut self, io: &mut Io<'_>) {
        loop {
            self.flush(io);
            if self.internal_answers.is_empty() {
                break;
            }
            for (request_id, result) in std::mem::take(&mut self.internal_answers) {
                self.answer_internal(io, request_id, result);
            }
        }
        self.pump_catch_ups(io);
    }

    /// The shard's `flush`: deliveries (an ordered one that does not fit makes its
    /// subscriber lag, and it and its later deliveries of this flush come from the log),
    /// replies, log creation and appends.
    fn flush(&mut self, io: &mut Io<'_>) {
        let mut lagged: Vec<(ConnId, Class, Arc<str>)> = Vec::new();
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Deliver {
                    to,
                    class,
                    frame,
                    swarm,
                    op,
                    ..
                } if class.is_ordered() && !op.is_none() => {
                    let key = (to, class, swarm);
                    if lagged.contains(&key) {
                        continue;
                    }
                    if !io.out.try_push(to, Lane::Class(class), frame) {
                        self.counts.lagging += 1;
                        self.core.handle_lagging(to, &key.2, class, op);
                        lagged.push(key);
                    }
                }
                Action::Deliver {
                    to, class, frame, ..
                } => io.out.push(to, Lane::Class(class), frame),
                Action::Reply { to, message } if to == INTERNAL => {
                    self.internal_answers.push(internal_answer(message))
                }
                Action::Reply { to, message } => io.out.push(to, Lane::Session, encode(&message)),
                Action::CreateLog { swarm, epoch } => io.log.create(&swarm, epoch),
                Action::Append { swarm, op, record } => {
                    if let Err(refused) = io.log.append(&swarm, op, &record) {
                        self.refused_appends.push(refused);
                    }
                }
                // The simulated clients send no DeltaRequest.
                Action::ReadDelta(_) => {}
            }
        }
    }

    /// Plans a read for each subscriber catching up whose queue has room, as the shard's
    /// `pump_catch_ups` does (half the lane's capacity, one read per subscriber at once).
    fn pump_catch_ups(&mut self, io: &mut Io<'_>) {
        let mut catch_ups = self.core.catching_up();
        // The core lists them in hash-set order; sorted so a run replays from its seed.
        catch_ups.sort_by(|a, b| (a.conn, &a.swarm, a.class).cmp(&(b.conn, &b.swarm, b.class)));
        for c in catch_ups {
            let lane = Lane::Class(c.class);
            let room = CLASS_LANE_CAPACITY / 2;
            let key = (c.conn, c.swarm.clone(), c.class);
            let queued = io.out.queued(c.conn, lane);
            if !io.out.is_open(c.conn)
                || self.reads_in_flight.contains(&key)
                || queued >= room
                || self.reads_in_flight.len() >= MAX_READS
                || io.log.swarm(&c.swarm).is_none()
            {
                continue;
            }
            self.reads_in_flight.insert(key);
            self.reads.push(PendingRead {
                conn: c.conn,
                swarm: c.swarm,
                class: c.class,
                from: c.from,
                to: c.to,
                chunk: CATCH_UP_CHUNK_OPS.min(room - queued).max(1),
            });
        }
    }

    /// Publishes a record of one of the router's own swarms (class control, sequenced and
    /// logged like a command); `waiter` is answered once it is durable.
    fn write_internal(
        &mut self,
        io: &mut Io<'_>,
        swarm: String,
        key: String,
        payload: Bytes,
        waiter: Option<Waiter>,
    ) {
        let request_id = self.next_internal;
        self.next_internal += 1;
        let publish = Publish {
            request_id,
            swarm,
            class: Class::Control,
            target_agent: None,
            key: Some(key),
            payload,
            fencing_token: 0,
            lease: None,
        };
        match self
            .core
            .handle_publish(ROUTER_AGENT, INTERNAL, &publish, io.now)
        {
            Ok(outcome) if outcome.awaiting_durability => {
                if let Some(waiter) = waiter {
                    self.waiters.insert(request_id, waiter);
                }
            }
            Ok(outcome) => {
                if let Some(waiter) = waiter {
                    self.waiters.insert(request_id, waiter);
                    self.internal_answers.push((request_id, Ok(outcome.op_id)));
                }
            }
            Err(error) => {
                if let Some(waiter) = waiter {
                    self.waiters.insert(request_id, waiter);
                    self.internal_answers
                        .push((request_id, Err(error.to_string())));
                }
            }
        }
    }

    fn answer_internal(&mut self, io: &mut Io<'_>, request_id: u64, result: Result<OpId, String>) {
        let Some(waiter) = self.waiters.remove(&request_id) else {
            return;
        };
        match waiter {
            Waiter::Grant {
                to,
                request_id,
                granted,
                ttl_ms,
            } => self.grant_written(io, to, request_id, granted, ttl_ms, result),
            Waiter::Release { to, request_id } => {
                io.out.push(
                    to,
                    Lane::Session,
                    encode(&Message::SubscribeAck { request_id }),
                );
            }
            Waiter::Spec { job_id } => self.spec_written(io, job_id, result),
            Waiter::Finals { group } => self.final_written(io, group),
        }
    }
}

/// What the core replied to one of the router's own writes.
fn internal_answer(message: Message) -> (u64, Result<OpId, String>) {
    match message {
        Message::PublishAck {
            request_id, op_id, ..
        } => (request_id, Ok(op_id)),
        Message::Error(error) => (error.request_id, Err(error.message)),
        other => (0, Err(format!("unexpected reply {other:?}"))),
    }
}

/// An Error message refusing request `request_id`.
fn refusal(code: swarmbus_schema::ErrorCode, text: String, request_id: u64) -> Message {
    swarmbus_proto::Refusal::new(code, text).message(request_id)
}

/// The redelivery timeout of the simulated router: short, so redelivery runs often.
pub const REDELIVERY_TIMEOUT: Duration = Duration::from_millis(1_000);
