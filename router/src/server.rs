//! The tokio driver: QUIC endpoint, connections, stream readers and lane writers.
//!
//! Streams of a connection:
//! - one bidirectional **session stream**, opened by the client: Hello, then Subscribe,
//!   Unsubscribe, Ack (and Publish if the client likes); the router answers Welcome,
//!   SubscribeAck, PublishAck and Error on it, at the highest stream priority;
//! - client-opened **unidirectional streams** carrying Publish (the client library opens one
//!   per class, with that class's priority);
//! - router-opened **unidirectional streams**, one per class, carrying Deliver frames, with
//!   priorities control > command > alert > reconciliation > telemetry.
//!
//! A protocol violation closes only the offending connection, with the wire error code as
//! the QUIC application close code and a human-readable reason.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use swarmbus_schema::{
    encode, max_payload_bytes, valid_name, Class, Coalescer, DecodeOptions, Epoch, ErrorCode,
    FrameDecoder, Hello, Limits, Message, OpId, OutFrame, Publish, Role, SessionId, Subscription,
    Welcome, MAX_NAME_BYTES, PROTOCOL_VERSION,
};
use swarmbus_schema::{Attach, BulkOffer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, Instrument};

use crate::bulk::{AbortOnDrop, BulkRuntime};
use crate::config::Config;
use crate::error::RouterError;
use swarmbus_proto::core::CoreConfig;
use swarmbus_proto::limits::{Breaker, BreakerState, ClassBuckets};
use swarmbus_proto::ConnId;

/// Control-class keys of a swarm's configuration document (controllers only).
const CONFIG_KEY_PREFIX: &str = "config/";
/// The lease a fencing token belongs to when a publish names none.
const DEFAULT_LEASE: &str = "leader";

/// The source agent of messages the router itself publishes (breaker alerts).
pub const ROUTER_AGENT: &str = "swarmbus-router";
use crate::clock::Clock;
use crate::log::{self, LogWriter, RecoveryNote, ShardLog, WriterKind};
use crate::outbox::Outbox;
use crate::partial_frames::{PartialFrames, RouterPartialFrames};
use crate::shard::{
    shard_of, spawn_shard, HeldSubscriptions, RouterPublish, ShardCommand, ShardSender,
};
use crate::stats::{Stats, StatsSnapshot};
use crate::tls;
use swarmbus_proto::control::{Joined, LeaseLimits, Leases, Restored, Stops, CONTROL_SWARM};
use swarmbus_proto::jobs::{JobCounts, JobRecord, Submitted, JOBS_SWARM_PREFIX};
use swarmbus_proto::quota::SwarmBudget;
use swarmbus_proto::refusal::Refusal;
use swarmbus_proto::workers::{PinWrite, PINS_SWARM};
use swarmbus_proto::Lane;

// The protocol's machines address connections through their outboxes.
type Jobs = swarmbus_proto::jobs::Jobs<Arc<Outbox>>;
type Effects = swarmbus_proto::jobs::Effects<Arc<Outbox>>;
type PayloadLoad = swarmbus_proto::jobs::PayloadLoad<Arc<Outbox>>;
type Presence = swarmbus_proto::control::Presence<Arc<Outbox>>;
type Present = swarmbus_proto::control::Present<Arc<Outbox>>;
type Workers = swarmbus_proto::workers::Workers<Arc<Outbox>>;
type Outgoing = swarmbus_proto::workers::Outgoing<Arc<Outbox>>;

/// Frames a lane writer takes per write.
const WRITE_BATCH_FRAMES: usize = 256;
/// Bytes a lane writer takes per write (soft limit: one frame may exceed it).
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Shared state of a running router.
#[derive(Debug)]
struct Context {
    config: Config,
    shards: Vec<ShardSender>,
    /// The shards of the job queue's swarms (`$jobs.*`), on the bulk runtime.
    job_shards: Vec<ShardSender>,
    stats: Arc<Stats>,
    next_conn: AtomicU64,
    decode: DecodeOptions,
    /// Per-swarm circuit breakers of the swarms some session joined (weak: a swarm's
    /// breaker lives while sessions hold it).
    swarm_guards: Mutex<HashMap<String, std::sync::Weak<SwarmGuard>>>,
    /// Worker nodes, affine sessions and requests in flight.
    workers: Mutex<Workers>,
    /// Set by [`Router::shutdown`]: connections closing now are not worker failures (their
    /// sessions stay pinned for after the restart).
    shutting_down: std::sync::atomic::AtomicBool,
    /// `rate_limits.router_telemetry_per_s`, when set.
    telemetry_intake: Option<crate::intake::IntakeBudget>,
    /// The budget the governor sets for telemetry and job messages, when it is enabled
    /// (unlimited unless it governs).
    bulk_intake: Option<crate::intake::IntakeBudget>,
    /// Where telemetry and job streams are read and written (see [`crate::bulk`]).
    bulk: BulkRuntime,
    /// The bulk listener's port, offered in Welcome to sessions that can attach a bulk
    /// connection.
    bulk_port: Option<u16>,
    /// Sessions waiting for their bulk connection, by session id.
    attachments: Mutex<HashMap<u64, PendingAttach>>,
    /// Presence, leases and stopped agents.
    control: Mutex<ControlState>,
    clock: Clock,
    /// The job queue (sans-IO, under one lock like `workers`).
    jobs: Mutex<Jobs>,
    /// Bytes of unfinished frames across the router (see [`crate::partial_frames`]).
    partial_frames: Arc<RouterPartialFrames>,
}

/// A session's offer of a bulk connection, until a connection attaches with its token.
#[derive(Debug)]
struct PendingAttach {
    token: u64,
    agent: Arc<str>,
    attached: tokio::sync::oneshot::Sender<Connection>,
    /// Changes (or closes) when the session ends: the attached connection ends with it.
    ended: watch::Receiver<bool>,
}

/// Where a session's bulk lanes (telemetry, jobs) are written and its bulk publishes read.
#[derive(Clone, Debug)]
enum BulkPath {
    /// A bulk connection was offered and is not attached yet.
    Waiting,
    /// The session's bulk connection.
    Attached(Connection),
    /// The session's one connection carries everything.
    Main,
}

/// How long a shutdown waits for the bulk endpoint's connections to close.
const BULK_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// How long a session that was offered a bulk connection waits for it before its bulk
/// lanes go on its main connection (capped by `limits.hello_timeout_ms`).
const ATTACH_WAIT: Duration = Duration::from_secs(2);

/// A fresh attach token: random, never 0 (0 means "no offer" on the wire).
fn attach_token() -> u64 {
    let mut bytes = [0u8; 8];
    let random = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&random, &mut bytes).is_err() {
        // No system randomness: no offer can be made safely; 0 is never accepted.
        return 0;
    }
    u64::from_le_bytes(bytes).max(1)
}

/// The control plane's state, behind one lock.
#[derive(Debug)]
struct ControlState {
    presence: Presence,
    leases: Leases,
    stops: Stops,
}

impl Context {
    /// The shard that owns `swarm`: the job queue's swarms have shards of their own.
    fn shard_for(&self, swarm: &str) -> &ShardSender {
        if swarm.starts_with(JOBS_SWARM_PREFIX) {
            &self.job_shards[shard_of(swarm, self.job_shards.len())]
        } else {
            &self.shards[shard_of(swarm, self.shards.len())]
        }
    }

    /// A new connection's budget for unfinished frames.
    fn partial_frames(&self) -> Arc<PartialFrames> {
        PartialFrames::new(
            self.config.limits.partial_frame_bytes,
            self.partial_frames.clone(),
        )
    }

    fn attachments(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PendingAttach>> {
        self.attachments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn control(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes a router event (JSON payload) on the alert class of `swarms`, from agent
    /// `swarmbus-router` with `key`.
    async fn announce<'a>(
        &self,
        swarms: impl IntoIterator<Item = &'a str> + Send,
        key: &str,
        payload: String,
    ) {
        let payload = Bytes::from(payload);
        for swarm in swarms {
            let publish = RouterPublish {
                swarm: swarm.to_owned(),
                class: Class::Alert,
                key: key.to_owned(),
                payload: payload.clone(),
                reply: None,
            };
            let _ = self
                .shard_for(swarm)
                .send(ShardCommand::RouterPublish(publish))
                .await;
        }
    }

    /// Announces a presence change of `agent` on its swarms.
    async fn announce_presence(&self, agent: &str, present: &Present, event: &str, reason: &str) {
        let role = match present.role {
            Role::Agent => "agent",
            Role::Controller => "controller",
            Role::Worker => "worker",
        };
        let payload = format!(
            "{{\"event\":\"{event}\",\"agent\":{},\"role\":\"{role}\",\"reason\":\"{reason}\",\"last_seen_ms\":{},\"metadata\":{}}}",
            json_string(agent),
            present.last_seen_ms(),
            json_string(&present.metadata)
        );
        let swarms = present.swarms.iter().map(String::as_str);
        self.announce(swarms, "presence", payload).await;
    }
}

/// A record for one of the router's internal swarms (`$affinity`, `$jobs.*`).
#[derive(Debug)]
struct InternalRecord {
    swarm: String,
    key: String,
    payload: Bytes,
}

impl From<JobRecord> for InternalRecord {
    fn from(record: JobRecord) -> Self {
        InternalRecord {
            swarm: swarmbus_proto::jobs::log_swarm(record.swarm()),
            key: record.key(),
            payload: record.payload(),
        }
    }
}

impl Context {
    /// Writes session pins to the router's pin log and waits until they are durable (or
    /// refused). Pins are written in order; the latest per session key wins on recovery.
    async fn write_pins(&self, pins: Vec<PinWrite>) -> Result<(), String> {
        let records = pins
            .into_iter()
            .map(|pin| InternalRecord {
                swarm: PINS_SWARM.to_owned(),
                key: swarmbus_proto::workers::pin_key(&pin.session_key),
                payload: pin.payload(),
            })
            .collect();
        self.write_records(records, true).await
    }

    /// Writes records to the router's internal swarms (class control, so they go through
    /// the shards' sequencers and the event log like any command) and, with `wait`, waits
    /// until every one is durable (or refused). Records of one swarm are written in order;
    /// the latest per key wins on recovery and in compaction.
    async fn write_records(&self, records: Vec<InternalRecord>, wait: bool) -> Result<(), String> {
        self.write_records_at(records, wait).await.map(|_| ())
    }

    /// [`Context::write_records`], returning with `wait` the op id each record got (in
    /// order; empty without `wait`).
    async fn write_records_at(
        &self,
        records: Vec<InternalRecord>,
        wait: bool,
    ) -> Result<Vec<OpId>, String> {
        let mut answers = Vec::with_capacity(if wait { records.len() } else { 0 });
        for record in records {
            let (reply, answer) = if wait {
                let (reply, answer) = oneshot::channel();
                (Some(reply), Some(answer))
            } else {
                (None, None)
            };
            // Records of one swarm go to one shard's channel, in order.
            self.shard_for(&record.swarm)
                .send(ShardCommand::RouterPublish(RouterPublish {
                    swarm: record.swarm,
                    class: Class::Control,
                    key: record.key,
                    payload: record.payload,
                    reply,
                }))
                .await
                .map_err(|_| "the router is shutting down".to_owned())?;
            answers.extend(answer);
        }
        let count = answers.len();
        let wait = async {
            let mut ops = Vec::with_capacity(count);
            for answer in answers {
                match answer.await {
                    Ok(Ok(op)) => ops.push(op),
                    Ok(Err(why)) => return Err(format!("writing to the router's log: {why}")),
                    Err(_) => return Err("the router is shutting down".to_owned()),
                }
            }
            Ok(ops)
        };
        // The shard answers every record, durable or refused, so the outcome is never
        // guessed: a slow disk is waited for (and logged every 30 s); only a router shutting
        // down gives up waiting, and then says the outcome is unknown.
        tokio::pin!(wait);
        loop {
            match tokio::time::timeout(Duration::from_secs(30), &mut wait).await {
                Ok(result) => return result,
                Err(_) if self.shutting_down.load(Ordering::Acquire) => {
                    return Err(
                        "the router shut down before the record was durable (it may still be)"
                            .to_owned(),
                    )
                }
                Err(_) => tracing::warn!(
                    records = count,
                    "internal records not durable after 30 s; still waiting"
                ),
            }
        }
    }

    /// Reads a leased job's payload back from its job log and sends the lease, if it is
    /// still the job's current one (it may have been cancelled or expired meanwhile). A read
    /// that found its file gone (a compaction ran) is tried again; one that fails ends the
    /// attempt at once, as lost, with why.
    async fn send_loaded_lease(self: &Arc<Self>, load: PayloadLoad) {
        let swarmbus_proto::jobs::PayloadLoad { to, log, op, lease } = load;
        let mut tries = 0;
        let payload = loop {
            let (reply, read) = oneshot::channel();
            let asked = self
                .shard_for(&log)
                .send(ShardCommand::ReadRecord {
                    swarm: log.clone(),
                    op,
                    reply,
                })
                .await;
            match (asked, read.await) {
                (Ok(()), Ok(Ok(frame))) => break spec_payload(&frame),
                (Ok(()), Ok(Err((true, _)))) if tries < 3 => tries += 1,
                (Ok(()), Ok(Err((_, error)))) => break Err(error),
                _ => return, // the router is shutting down
            }
        };
        let (job_id, attempt) = (lease.job_id, lease.attempt);
        match payload {
            Ok(payload) => {
                if self.jobs().holds_lease(to.conn(), job_id, attempt) {
                    let lease = swarmbus_schema::JobLease { payload, ..lease };
                    let _ = to.push(Lane::Jobs, encode(&Message::JobLease(lease)));
                }
            }
            Err(error) => {
                tracing::error!(job = job_id.0, %log, op = op.0, %error, "a job's payload could not be read back from its log");
                let why = format!("its payload could not be read back from the job log: {error}");
                let now_ms = self.now_ms();
                let effects =
                    self.jobs()
                        .lease_undeliverable(to.conn(), job_id, attempt, &why, now_ms);
                self.apply_job_effects(effects);
            }
        }
    }

    /// The job queue's clock: milliseconds.
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        // As for the job queue: every change completes under the lock.
        self.workers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        // Every change under this lock completes before it is released; a panic cannot leave
        // it half-done in a way later calls would trip on, so a poisoned lock is still used.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Carries out what the job queue asked for: frames now; records appended and ends
    /// made durable in a task (so no session waits for the log), after which the ends are
    /// announced and the answers that waited for them pushed.
    fn apply_job_effects(self: &Arc<Self>, effects: Effects) {
        let Effects {
            frames,
            records,
            finals,
            after_finals,
            loads,
        } = effects;
        for (outbox, lane, frame) in frames {
            let _ = outbox.push(lane, frame);
        }
        for load in loads {
            let context = self.clone();
            tokio::spawn(async move { context.send_loaded_lease(load).await });
        }
        if records.is_empty() && finals.is_empty() {
            for (outbox, lane, frame) in after_finals {
                let _ = outbox.push(lane, frame);
            }
            return;
        }
        let context = self.clone();
        tokio::spawn(async move {
            let records: Vec<InternalRecord> = records.into_iter().map(Into::into).collect();
            if let Err(error) = context.write_records(records, false).await {
                debug!(%error, "job records not appended");
            }
            if finals.is_empty() {
                return;
            }
            let ids: Vec<_> = finals.iter().map(JobRecord::job_id).collect();
            let mut finals: Vec<InternalRecord> = finals.into_iter().map(Into::into).collect();
            // Only a durable end is announced: a refused write (its bytes truncated away) is
            // written again, from the job's state now, until the log takes it.
            let mut backoff = Duration::from_millis(100);
            while let Err(error) = context.write_records(finals, true).await {
                if context.shutting_down.load(Ordering::Acquire) {
                    debug!(%error, "job ends not announced: the router is shutting down");
                    return;
                }
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "job ends not written to the log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                finals = context
                    .jobs()
                    .unwritten_finals(&ids)
                    .into_iter()
                    .map(Into::into)
                    .collect();
                if finals.is_empty() {
                    break;
                }
            }
            let announced = context.jobs().finals_written(&ids);
            for (outbox, lane, frame) in announced.frames.into_iter().chain(after_finals) {
                let _ = outbox.push(lane, frame);
            }
        });
    }

    /// The breaker of `swarm`, shared by every session that joined it.
    fn swarm_guard(&self, swarm: &str) -> Arc<SwarmGuard> {
        let mut guards = self
            .swarm_guards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(guard) = guards.get(swarm).and_then(std::sync::Weak::upgrade) {
            return guard;
        }
        let guard = Arc::new(SwarmGuard::new(self.config.rate_limits.swarm_breaker));
        guards.insert(swarm.to_owned(), Arc::downgrade(&guard));
        guard
    }

    /// Forgets the breakers no session holds any more.
    fn release_swarm_guards(&self, held: HashMap<String, Arc<SwarmGuard>>) {
        let mut guards = self
            .swarm_guards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (swarm, guard) in held {
            drop(guard);
            if guards
                .get(&swarm)
                .is_some_and(|weak| weak.strong_count() == 0)
            {
                guards.remove(&swarm);
            }
        }
    }
}

/// The circuit breaker of one swarm: the refusals of all its sessions add up, so a swarm
/// whose agents storm together is refused fast as a whole (control messages excepted, so
/// controllers can still act), sparing the router and every other swarm.
#[derive(Debug)]
struct SwarmGuard {
    /// Mirrors `breaker.state() == Closed`, so the common case takes no lock.
    closed: std::sync::atomic::AtomicBool,
    breaker: Mutex<Breaker>,
}

impl SwarmGuard {
    fn new(config: swarmbus_proto::limits::BreakerConfig) -> Self {
        SwarmGuard {
            closed: std::sync::atomic::AtomicBool::new(true),
            breaker: Mutex::new(Breaker::new(config, std::time::Instant::now())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breaker = self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(&mut breaker);
        self.closed
            .store(breaker.state() == BreakerState::Closed, Ordering::Release);
        result
    }

    fn check(&self, now: std::time::Instant) -> (Result<(), Duration>, Option<BreakerState>) {
        if self.closed.load(Ordering::Acquire) {
            return (Ok(()), None);
        }
        self.with(|breaker| breaker.check(now))
    }

    fn failure(&self, now: std::time::Instant) -> Option<BreakerState> {
        self.with(|breaker| breaker.failure(now))
    }

    fn success(&self) -> Option<BreakerState> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.with(|breaker| breaker.success())
    }
}

/// Whose breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BreakerScope {
    /// The session's own breaker (announced on every swarm it joined).
    Session,
    /// The breaker of the swarm the publish went to.
    Swarm,
}

/// A running router. Dropping it does not stop it; call [`Router::shutdown`].
#[derive(Debug)]
pub struct Router {
    context: Arc<Context>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    ca_path: Option<PathBuf>,
    stats: Arc<Stats>,
    accept_task: JoinHandle<()>,
    /// The bulk listener (`bulk_listen`), when configured: its endpoint, address and accept
    /// loop, all on the bulk runtime.
    bulk_listener: Option<(quinn::Endpoint, SocketAddr, JoinHandle<()>)>,
    recovery_notes: Vec<RecoveryNote>,
    writer_kind: WriterKind,
    /// The clock's checkpoint thread: dropping the sender stops it (after a last
    /// checkpoint); shutdown waits for it.
    clock_checkpoints: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Router {
    /// Validates `config`, prepares TLS and binds the endpoint. Must be called within a
    /// tokio runtime.
    pub async fn start(config: Config) -> Result<Router, RouterError> {
        Self::start_with_clock(config, Arc::new(crate::clock::SystemClock)).await
    }

    /// [`Router::start`], reading the time at start from `clock` (tests step it to show
    /// what a clock step across a restart does).
    pub async fn start_with_clock(
        config: Config,
        clock: Arc<dyn crate::clock::ClockSource>,
    ) -> Result<Router, RouterError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| RouterError::DataDir {
            path: config.data_dir.clone(),
            detail: e.to_string(),
        })?;
        let clock_path = config.data_dir.join("clock");
        let router_clock =
            crate::clock::RouterClock::start(&clock_path, clock, config.clock.max_restart_step_ms);
        match router_clock.started {
            crate::clock::Started::SameBoot {
                stepped_ms,
                bounded: true,
            } => tracing::warn!(
                stepped_ms,
                max_restart_step_ms = config.clock.max_restart_step_ms,
                "the wall clock moved while the router was down; the router's clock moved by at most max_restart_step_ms"
            ),
            crate::clock::Started::Rebooted { behind_ms } if behind_ms > 0 => tracing::warn!(
                behind_ms,
                "the wall clock is behind the router's last checkpoint; the router's clock starts at the checkpoint"
            ),
            _ => {}
        }
        let router_clock = Arc::new(router_clock);
        let (clock_stop, clock_stopped) = std::sync::mpsc::channel();
        let clock_thread =
            router_clock
                .keep_checkpoint(clock_stopped)
                .map_err(|e| RouterError::DataDir {
                    path: clock_path.clone(),
                    detail: format!("starting the clock checkpoint thread: {e}"),
                })?;
        let (cert, key, ca_path) = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), None),
            _ => {
                let paths = tls::ensure_dev_tls(&config.data_dir)?;
                (paths.server_cert, paths.server_key, Some(paths.ca_cert))
            }
        };
        let mut server_config = tls::server_config(&cert, &key)?;
        server_config.transport_config(Arc::new(transport_config(&config, Listener::Main)));
        let bind_error = |e: std::io::Error| RouterError::Bind {
            addr: config.listen,
            detail: e.to_string(),
        };
        let (reset_key, cid_key) = tls::stateless_reset_key(&config.data_dir)?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        // Stateless resets tell clients of the previous process at once that it is gone;
        // quinn's default spacing (20 ms) would take 20 s to reach 1,000 of them.
        endpoint_config.min_reset_interval(Duration::from_millis(1));
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_error)?;
        // Bound now, so a busy address fails the start before anything else; the endpoint
        // is made on the bulk runtime once it runs.
        let bulk_socket = match config.bulk_listen_addr() {
            Some(addr) => Some(
                std::net::UdpSocket::bind(addr).map_err(|e| RouterError::Bind {
                    addr,
                    detail: e.to_string(),
                })?,
            ),
            None => None,
        };
        // Clients attach at the offered port on the address they reached the router at, so
        // bulk connections are offered only when both listeners share their address.
        let bulk_port = match &bulk_socket {
            Some(bulk_socket) => {
                let bulk_addr = config_bulk_addr(bulk_socket, &config)?;
                let main_ip = socket.local_addr().map_err(bind_error)?.ip();
                if bulk_addr.ip() == main_ip {
                    Some(bulk_addr.port())
                } else {
                    tracing::warn!(
                        %bulk_addr, %main_ip,
                        "the bulk listener's address differs from listen's: sessions are not offered bulk connections (clients may still connect to it directly)"
                    );
                    None
                }
            }
            None => None,
        };
        let endpoint = quinn::Endpoint::new(
            endpoint_config.clone(),
            Some(server_config.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let local_addr = endpoint.local_addr().map_err(|e| RouterError::Bind {
            addr: config.listen,
            detail: e.to_string(),
        })?;
        let stats = Arc::new(Stats::default());
        // Recover every swarm's log before accepting anyone: sequencers continue after the
        // last durable op.
        let log_dir = config.data_dir.join("log");
        let (recovered, recovery_notes) =
            // Only a router that syncs before it acknowledges keeps watermarks up to date.
            log::store::recover_all_with(&log_dir, config.log.sync == log::SyncPolicy::Always)
                .map_err(|e| RouterError::DataDir {
                path: log_dir.clone(),
                detail: format!("recovering the event log: {e}"),
            })?;
        check_internal_logs(&recovered)?;
        let unknown_lease_ttl_ms = u64::from(config.presence.max_lease_ttl_ms);
        let mut workers = Workers::new(
            config.affinity.clone(),
            read_pins(&recovered)?,
            router_clock.clock.now(),
        );
        let mut restored = Restored::default();
        for (key, payload) in read_records(&recovered, CONTROL_SWARM)? {
            restored.apply(&key, &payload);
        }
        for node in &restored.drained {
            workers.set_admin_drain(node, true);
        }
        let clock = router_clock.clock;
        let (job_records, spec_ops) = read_job_records(&recovered)?;
        let mut jobs = Jobs::new(
            config.jobs.clone(),
            job_records,
            clock.now_ms(),
            log::store::new_epoch().0,
        );
        jobs.restored_spec_ops(&spec_ops);
        jobs.logs_exist(
            recovered
                .iter()
                .filter(|log| log.name.starts_with(JOBS_SWARM_PREFIX))
                .map(|log| log.name.clone()),
        );
        let shard_count = config.shard_count();
        // The job queue's swarms get shards of their own, on the bulk runtime, after the
        // main ones (their log events are numbered after the main shards').
        let job_shard_count = shard_count;
        let (event_senders, event_receivers): (Vec<_>, Vec<_>) = (0..shard_count + job_shard_count)
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let bulk = BulkRuntime::start(
            config.runtime.bulk_thread_count(),
            config.runtime.bulk_priority,
        )
        .map_err(|e| RouterError::Config {
            detail: format!("starting the bulk runtime: {e}"),
        })?;
        let start_writer = |bulk| {
            LogWriter::start(
                config.log.writer,
                config.log.sync,
                config.log.writer_queue,
                event_senders.clone(),
                bulk,
            )
            .map_err(|e| RouterError::Config {
                detail: format!("starting the event log writer: {e}"),
            })
        };
        let writer = start_writer(None)?;
        // The job queue's records get a writer of their own, at the bulk threads' priority:
        // commands never wait for the sync of a batch of job records, nor for its thread.
        let jobs_writer = start_writer(Some(config.runtime.bulk_priority))?;
        info!(writer = %writer.kind(), sync = %config.log.sync, swarms = recovered.len(), "event log ready");
        let mut per_shard: Vec<Vec<log::SwarmLog>> = (0..shard_count + job_shard_count)
            .map(|_| Vec::new())
            .collect();
        for swarm in recovered {
            let index = if swarm.name.starts_with(JOBS_SWARM_PREFIX) {
                shard_count + shard_of(&swarm.name, job_shard_count)
            } else {
                shard_of(&swarm.name, shard_count)
            };
            per_shard[index].push(swarm);
        }
        let retention = config.log.retention();
        // One count of swarms for every shard: `limits.max_swarms` is router-wide.
        let swarm_budget = SwarmBudget::new(
            config.limits.max_swarms as usize,
            config.limits.max_swarms_per_agent as usize,
        );
        let mut shards: Vec<ShardSender> = per_shard
            .into_iter()
            .zip(event_receivers.into_iter().zip(event_senders))
            .enumerate()
            .map(|(index, (logs, (events, events_tx)))| {
                let job_shard = index >= shard_count;
                let shard_log = ShardLog::new(
                    index,
                    &log_dir,
                    config.log.segment_bytes,
                    if job_shard {
                        jobs_writer.clone()
                    } else {
                        writer.clone()
                    },
                    logs,
                    retention.clone(),
                    events_tx,
                );
                // A shard runs on the runtime it is started from.
                let _inside = job_shard.then(|| bulk.handle().enter());
                let core_config = CoreConfig {
                    swarms: swarm_budget.clone(),
                    epoch_seed: log::store::new_epoch().0,
                    redelivery_timeout: Duration::from_millis(config.log.redelivery_timeout_ms),
                    delta_max_ops: config.log.delta_max_ops,
                };
                spawn_shard(
                    config.limits.shard_queue,
                    core_config,
                    Duration::from_millis(config.log.compaction_interval_ms),
                    Box::new(shard_log),
                    events,
                    stats.clone(),
                    clock,
                )
            })
            .collect();
        let job_shards = shards.split_off(shard_count);
        let writer_kind = writer.kind();
        drop(writer);
        drop(jobs_writer);
        let telemetry_per_s = config.rate_limits.router_telemetry_per_s;
        let telemetry_intake = (telemetry_per_s > 0.0)
            .then(|| crate::intake::IntakeBudget::new(Some(telemetry_per_s)));
        let bulk_intake = config
            .governor
            .enabled
            .then(|| crate::intake::IntakeBudget::new(None));
        let partial_frames = RouterPartialFrames::new(config.limits.router_partial_frame_bytes);
        let lease_limits = LeaseLimits {
            max_leases: config.limits.max_leases as usize,
            max_held_per_agent: config.limits.max_leases_per_agent as usize,
        };
        let context = Arc::new(Context {
            decode: DecodeOptions::for_swarms_per_session(config.limits.max_swarms_per_session),
            config,
            shards,
            job_shards,
            stats: stats.clone(),
            next_conn: AtomicU64::new(1),
            swarm_guards: Mutex::new(HashMap::new()),
            workers: Mutex::new(workers),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            telemetry_intake,
            bulk_intake,
            bulk,
            bulk_port,
            attachments: Mutex::new(HashMap::new()),
            control: Mutex::new(ControlState {
                presence: Presence::default(),
                leases: Leases::restore(
                    restored.leases,
                    clock.now_ms(),
                    unknown_lease_ttl_ms,
                    lease_limits,
                ),
                stops: {
                    let mut stops = Stops::default();
                    for (agent, until) in restored.stops {
                        stops.stop(&agent, until);
                    }
                    stops
                },
            }),
            clock,
            jobs: Mutex::new(jobs),
            partial_frames,
        });
        for swarm in restored.paused {
            let shard = context.shard_for(&swarm);
            let _ = shard
                .send(ShardCommand::Pause {
                    swarm,
                    paused: true,
                })
                .await;
        }
        tokio::spawn(presence_maintenance(Arc::downgrade(&context)));
        if context.config.governor.enabled {
            tokio::spawn(govern_bulk_intake(Arc::downgrade(&context)));
        }
        tokio::spawn(worker_maintenance(Arc::downgrade(&context)));
        context
            .bulk
            .handle()
            .spawn(job_maintenance(Arc::downgrade(&context)));
        let bulk_listener = match bulk_socket {
            Some(socket) => {
                let addr = config_bulk_addr(&socket, &context.config)?;
                // quinn spawns the endpoint's driver, and each connection's, on the runtime
                // it is called from: the bulk one.
                let _inside = context.bulk.handle().enter();
                let mut server_config = server_config;
                server_config
                    .transport_config(Arc::new(transport_config(&context.config, Listener::Bulk)));
                let bulk_endpoint = quinn::Endpoint::new(
                    endpoint_config,
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(|e| RouterError::Bind {
                    addr,
                    detail: e.to_string(),
                })?;
                let task = context.bulk.handle().spawn(accept_loop(
                    bulk_endpoint.clone(),
                    context.clone(),
                    Listener::Bulk,
                ));
                // The bulk listener lives as long as the main runtime: when that runtime
                // goes (even without a shutdown), this guard task is dropped with it and
                // closes the bulk endpoint and its accept loop.
                let guard = (bulk_endpoint.clone(), task.abort_handle());
                tokio::spawn(async move {
                    struct Guard(quinn::Endpoint, tokio::task::AbortHandle);
                    impl Drop for Guard {
                        fn drop(&mut self) {
                            self.1.abort();
                            self.0.close(VarInt::from_u32(0), b"router stopped");
                        }
                    }
                    let _guard = Guard(guard.0, guard.1);
                    std::future::pending::<()>().await
                });
                info!(%addr, "bulk listener ready");
                Some((bulk_endpoint, addr, task))
            }
            None => None,
        };
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            context.clone(),
            Listener::Main,
        ));
        info!(%local_addr, "router listening");
        Ok(Router {
            context,
            endpoint,
            local_addr,
            ca_path,
            stats,
            accept_task,
            bulk_listener,
            recovery_notes,
            writer_kind,
            clock_checkpoints: Some((clock_stop, clock_thread)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The development CA clients should trust, when the router runs on one.
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.ca_path.as_deref()
    }

    /// What recovery repaired (torn tails truncated) or found damaged at start-up.
    pub fn recovery_notes(&self) -> &[RecoveryNote] {
        &self.recovery_notes
    }

    /// The event log writer backend in use (`Uring` or `File`).
    pub fn writer_kind(&self) -> WriterKind {
        self.writer_kind
    }

    /// Requests to worker nodes awaiting their replies.
    pub fn worker_requests_pending(&self) -> usize {
        self.context.workers().pending_requests()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// What the job queue holds now.
    pub fn job_counts(&self) -> JobCounts {
        self.context.jobs().counts()
    }

    /// Closes every connection with `ShuttingDown` and waits (up to 5 s) for the peers to
    /// be told.
    pub async fn shutdown(mut self) {
        self.context.shutting_down.store(true, Ordering::Release);
        let code = VarInt::from(ErrorCode::ShuttingDown.as_u16());
        self.endpoint.close(code, b"router shutting down");
        self.accept_task.abort();
        if let Some((endpoint, _, task)) = &self.bulk_listener {
            endpoint.close(code, b"router shutting down");
            task.abort();
        }
        // Waiting for idle endpoints lets the peers receive the close (and reconnect at once
        // rather than time out). The bulk endpoint gets a short grace only: its driver runs
        // on the niced bulk threads, which a reconnecting crowd can starve, and a session's
        // client learns of the end from its main connection anyway.
        let bulk = async {
            if let Some((endpoint, _, _)) = &self.bulk_listener {
                let _ = tokio::time::timeout(BULK_SHUTDOWN_GRACE, endpoint.wait_idle()).await;
            }
        };
        let main = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle());
        let _ = tokio::join!(main, bulk);
        if let Some((stop, thread)) = self.clock_checkpoints.take() {
            // The last checkpoint, after the connections closed, before the next router on
            // this data directory may start.
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// The bulk listener's address (with the port the OS picked), when `bulk_listen` is set.
    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        self.bulk_listener.as_ref().map(|(_, addr, _)| *addr)
    }
}

/// The bound address of the bulk listener's socket.
fn config_bulk_addr(
    socket: &std::net::UdpSocket,
    config: &Config,
) -> Result<SocketAddr, RouterError> {
    socket.local_addr().map_err(|e| RouterError::Bind {
        addr: config.bulk_listen_addr().unwrap_or(config.listen),
        detail: e.to_string(),
    })
}

fn transport_config(config: &Config, listener: Listener) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Streams per connection: one session stream, one uni stream per class, plus slack.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(4));
    transport.max_concurrent_uni_streams(VarInt::from_u32(16));
    // Windows sized for bursts of fan-out on a LAN/loopback hop.
    // Inbound windows bound what a connection can make the router buffer before it reads;
    // they are what holds a flooding sender back once the router stops reading it.
    let limits = &config.limits;
    let (connection_window, stream_window) = match listener {
        Listener::Main => (
            limits.receive_window_bytes,
            limits.stream_receive_window_bytes,
        ),
        Listener::Bulk => (
            limits.bulk_receive_window_bytes,
            limits.bulk_stream_receive_window_bytes,
        ),
    };
    transport.stream_receive_window(VarInt::from_u32(stream_window));
    transport.receive_window(VarInt::from_u32(connection_window));
    transport.send_window(16 << 20);
    // Ask the peer to acknowledge every 16th packet (or after 5 ms) instead of every
    // second: a fan-out hop sends many small packets, and the ACKs it gets back cost as much
    // CPU and softirq time as the data.
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(VarInt::from_u32(15))
        .max_ack_delay(Some(Duration::from_millis(5)));
    transport.ack_frequency_config(Some(ack_frequency));
    let idle = Duration::from_millis(config.limits.idle_timeout_ms);
    transport.max_idle_timeout(idle.try_into().ok());
    transport
}

/// Which endpoint a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Main,
    /// `bulk_listen`: its sessions are bulk sessions already and are offered no bulk
    /// connection.
    Bulk,
}

async fn accept_loop(endpoint: quinn::Endpoint, context: Arc<Context>, listener: Listener) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        let conn = ConnId(context.next_conn.fetch_add(1, Ordering::Relaxed));
        let span = tracing::debug_span!("conn", id = conn.0, remote = %incoming.remote_address());
        tokio::spawn(
            async move {
                match incoming.await {
                    Ok(connection) => run_connection(conn, connection, context, listener).await,
                    // Handshake failures (wrong ALPN, bad TLS) end here.
                    Err(error) => debug!(%error, "handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

/// A protocol violation: the connection is closed with `code`.
#[derive(Debug)]
struct Fault {
    code: ErrorCode,
    reason: String,
}

impl Fault {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Fault {
            code,
            reason: reason.into(),
        }
    }
}

/// What a stream reader got.
enum Read {
    Message(Message),
    /// The peer finished the stream cleanly.
    End,
    /// The stream or connection is gone (not a protocol error).
    Gone,
}

struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    /// The connection's budget for unfinished frames, and what this reader holds of it.
    partial: Arc<PartialFrames>,
    charged: usize,
}

impl FrameReader {
    fn new(recv: RecvStream, max_frame_bytes: usize, partial: Arc<PartialFrames>) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_frame_bytes),
            partial,
            charged: 0,
        }
    }

    /// Charges what the decoder holds now against the connection's budget.
    fn settle(&mut self) -> Result<(), Fault> {
        let held = self.decoder.held_bytes();
        match self.partial.recharge(self.charged, held) {
            Ok(()) => {
                self.charged = held;
                Ok(())
            }
            Err(refused) => Err(Fault::new(ErrorCode::Busy, refused.to_string())),
        }
    }

    async fn next(&mut self, options: &DecodeOptions) -> Result<Read, Fault> {
        loop {
            match self.decoder.next_message(options) {
                Ok(Some(message)) => return Ok(Read::Message(message)),
                // Every whole frame is out: what is left is unfinished, charged before more
                // is read (once per chunk, not per message, on counters shared router-wide).
                Ok(None) => self.settle()?,
                Err(error) => return Err(Fault::new(error.code(), error.to_string())),
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.push(chunk.bytes),
                Ok(None) if self.decoder.is_idle() => return Ok(Read::End),
                Ok(None) => {
                    return Err(Fault::new(
                        ErrorCode::TruncatedFrame,
                        format!(
                            "stream ended inside a frame ({} bytes buffered)",
                            self.decoder.buffered_bytes()
                        ),
                    ))
                }
                Err(_) => return Ok(Read::Gone),
            }
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.partial.give_back(self.charged);
    }
}

fn close_with(connection: &Connection, stats: &Stats, fault: &Fault) {
    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    debug!(code = %fault.code, reason = %fault.reason, "closing connection");
    // QUIC limits the reason to fit one packet; keep it short.
    let reason: String = fault.reason.chars().take(200).collect();
    connection.close(VarInt::from(fault.code.as_u16()), reason.as_bytes());
}

/// A session's rate limits and circuit breaker, behind one lock.
#[derive(Debug)]
struct SessionLimits {
    buckets: ClassBuckets,
    /// Buckets of the joined swarms that override the rates (`rate_limits.swarms`).
    swarm_buckets: HashMap<String, ClassBuckets>,
    breaker: Breaker,
}

impl SessionLimits {
    fn buckets_for(&mut self, swarm: &str) -> &mut ClassBuckets {
        match self.swarm_buckets.get_mut(swarm) {
            Some(buckets) => buckets,
            None => &mut self.buckets,
        }
    }
}

/// What became of a publish at the limits.
enum Admission {
    Admitted,
    /// Refused already (rate limit, invalid, ...).
    Refused,
    /// A breaker is open: refuse fast for this long.
    Open(BreakerScope, Duration),
}

/// An established session.
#[derive(Debug)]
struct Session {
    conn: ConnId,
    agent: Arc<str>,
    role: Role,
    /// Router clock (ms) of the last message read on the session stream (presence).
    last_seen: Arc<AtomicU64>,
    swarms: HashSet<String>,
    /// Resume points from Hello: (epoch, last applied op) per swarm and ordered class.
    resume: HashMap<(String, Class), (Epoch, OpId)>,
    outbox: Arc<Outbox>,
    subscriptions: HeldSubscriptions,
    context: Arc<Context>,
    /// Largest payload a publish may carry (the Deliver made of it must fit a frame).
    max_payload_bytes: usize,
    /// DeltaRequests answered in the current one-second window: (window start, count).
    delta_window: Mutex<(std::time::Instant, u32)>,
    /// The same for PresenceQuery requests.
    presence_window: Mutex<(std::time::Instant, u32)>,
    /// Rate limits and circuit breaker.
    limits: Mutex<SessionLimits>,
    /// The breakers of the joined swarms.
    swarm_guards: HashMap<String, Arc<SwarmGuard>>,
    /// Fire-and-forget publishes dropped (rate limit, open breaker) since the last notice,
    /// and when the last notice went out.
    fast_refusals: Mutex<(u64, std::time::Instant)>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let guards = std::mem::take(&mut self.swarm_guards);
        self.context.release_swarm_guards(guards);
    }
}

impl Session {
    fn joined(&self, swarm: &str) -> bool {
        self.swarms.contains(swarm)
    }

    fn refuse(&self, code: ErrorCode, request_id: u64, message: String) {
        self.refuse_with_retry(code, request_id, message, 0);
    }

    fn refuse_with_retry(
        &self,
        code: ErrorCode,
        request_id: u64,
        message: String,
        retry_after_ms: u32,
    ) {
        let refusal = Refusal::new(code, message).retry_after(retry_after_ms);
        let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
    }

    async fn to_shard(&self, swarm: &str, command: ShardCommand) {
        // A send fails only while the router shuts down; the connection closes then too.
        let _ = self.context.shard_for(swarm).send(command).await;
    }

    /// Largest job payload (spec or result): the record holding it must fit a frame.
    fn max_job_payload_bytes(&self) -> usize {
        self.max_payload_bytes
            .saturating_sub(swarmbus_proto::jobs::JOB_RECORD_OVERHEAD_BYTES)
    }

    /// Whether this session is a controller that joined `swarm`; refuses the request
    /// otherwise.
    fn controller_of(&self, swarm: &str, request_id: u64) -> bool {
        if self.role != Role::Controller {
            self.refuse(
                ErrorCode::Forbidden,
                request_id,
                "only controllers may list and re-drive dead letters".into(),
            );
            return false;
        }
        if !self.joined(swarm) {
            self.not_joined(swarm, request_id);
            return false;
        }
        true
    }

    fn not_joined(&self, swarm: &str, request_id: u64) {
        self.refuse(
            ErrorCode::SwarmNotJoined,
            request_id,
            format!("swarm {swarm:?} was not joined in Hello"),
        );
    }

    /// Refuses a publish: with an Error when the publisher expects a reply; fire-and-forget
    /// messages get none (a flood of them must not become a flood of replies) and are
    /// counted and logged instead.
    fn refuse_publish(&self, publish: &Publish, code: ErrorCode, message: String) {
        if publish.request_id != 0 || publish.class.is_ordered() {
            self.refuse(code, publish.request_id, message);
        } else {
            self.context
                .stats
                .refused_unacknowledged
                .fetch_add(1, Ordering::Relaxed);
            debug!(swarm = %publish.swarm, %code, %message, "unacknowledged publish dropped");
        }
    }

    /// Checks a publish (swarm joined, names, rate limit, payload size); refuses it and
    /// returns false when it may not go on.
    fn admit_publish(
        &self,
        publish: &Publish,
        limits: &mut SessionLimits,
        now: std::time::Instant,
    ) -> bool {
        if !self.joined(&publish.swarm) {
            let text = format!("swarm {:?} was not joined in Hello", publish.swarm);
            self.refuse_publish(publish, ErrorCode::SwarmNotJoined, text);
            return false;
        }
        let names_ok = [publish.target_agent.as_deref(), publish.key.as_deref()]
            .into_iter()
            .flatten()
            .all(valid_name);
        if !names_ok {
            let text = format!("target_agent and key must be 1 to {MAX_NAME_BYTES} bytes");
            self.refuse_publish(publish, ErrorCode::InvalidRequest, text);
            return false;
        }
        if publish.class == Class::Control
            && self.role != Role::Controller
            && publish
                .key
                .as_deref()
                .is_some_and(|k| k.starts_with(CONFIG_KEY_PREFIX))
        {
            let text = "only controllers may change a swarm's configuration".to_owned();
            self.refuse_publish(publish, ErrorCode::Forbidden, text);
            return false;
        }
        if publish.fencing_token != 0 {
            let lease = publish.lease.as_deref().unwrap_or(DEFAULT_LEASE);
            let now_ms = self.context.clock.now_ms();
            let checked = self.context.control().leases.check_stamp(
                &publish.swarm,
                lease,
                &self.agent,
                publish.fencing_token,
                now_ms,
            );
            if let Err(refusal) = checked {
                let text = match refusal {
                    swarmbus_proto::control::StampRefusal::Stale { newest_token } => format!(
                        "fencing token {} of lease {lease:?} is not the newest ({newest_token})",
                        publish.fencing_token
                    ),
                    swarmbus_proto::control::StampRefusal::NotHeld { .. } => format!(
                        "fencing token {} of lease {lease:?} is not held by this agent \
                         (expired, released or another's)",
                        publish.fencing_token
                    ),
                };
                self.refuse_publish(publish, ErrorCode::StaleFencingToken, text);
                return false;
            }
        }
        if let Err(wait) = limits
            .buckets_for(&publish.swarm)
            .try_take(publish.class, now)
        {
            self.refuse_fast(
                publish,
                ErrorCode::RateLimited,
                "above this session's rate limit",
                wait,
            );
            return false;
        }
        let class_max = self
            .context
            .config
            .limits
            .max_payload_bytes
            .for_class(publish.class) as usize;
        let max = self.max_payload_bytes.min(class_max);
        if publish.payload.len() > max {
            let text = format!(
                "payload of {} bytes exceeds the {} class's maximum of {max} bytes \
                 (limits.max_payload_bytes); heavy work belongs in the job queue",
                publish.payload.len(),
                publish.class
            );
            self.refuse_publish(publish, ErrorCode::PayloadTooLarge, text);
            return false;
        }
        true
    }

    /// A publish refused by the rate limit (`RateLimited`) or an open breaker
    /// (`CircuitOpen`). Publishes that expect a reply are refused with a retry hint;
    /// fire-and-forget ones are dropped, counted, and the sender is told at most once a
    /// second how many were dropped.
    fn refuse_fast(&self, publish: &Publish, code: ErrorCode, why: &str, wait: Duration) {
        let retry_after_ms = wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let stats = &self.context.stats;
        if publish.request_id != 0 || publish.class.is_ordered() {
            stats.rate_limited_refused.fetch_add(1, Ordering::Relaxed);
            self.refuse_with_retry(
                code,
                publish.request_id,
                format!("{} publish refused: {why}", publish.class),
                retry_after_ms,
            );
            return;
        }
        stats.rate_limited_dropped.fetch_add(1, Ordering::Relaxed);
        let notice = {
            let mut state = self
                .fast_refusals
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.0 += 1;
            if state.1.elapsed() >= Duration::from_secs(1) {
                let dropped = std::mem::take(&mut state.0);
                state.1 = std::time::Instant::now();
                Some(dropped)
            } else {
                None
            }
        };
        if let Some(dropped) = notice {
            self.refuse_with_retry(
                code,
                0,
                format!("{dropped} unacknowledged publishes dropped: {why}"),
                retry_after_ms,
            );
        }
    }

    /// Publishes a breaker transition on the alert class: a session breaker's on every swarm
    /// the session joined, a swarm breaker's on that swarm.
    async fn announce_breaker(&self, scope: BreakerScope, swarm: &str, state: BreakerState) {
        self.context
            .stats
            .breaker_transitions
            .fetch_add(1, Ordering::Relaxed);
        let payload = match scope {
            BreakerScope::Session => {
                tracing::info!(agent = %self.agent, state = state.name(), "session circuit breaker");
                format!(
                    "{{\"event\":\"circuit-breaker\",\"scope\":\"session\",\"agent\":{},\"state\":\"{}\"}}",
                    json_string(&self.agent),
                    state.name()
                )
            }
            BreakerScope::Swarm => {
                tracing::info!(swarm, state = state.name(), "swarm circuit breaker");
                format!(
                    "{{\"event\":\"circuit-breaker\",\"scope\":\"swarm\",\"swarm\":{},\"state\":\"{}\"}}",
                    json_string(swarm),
                    state.name()
                )
            }
        };
        let context = &self.context;
        match scope {
            BreakerScope::Session => {
                let swarms = self.swarms.iter().map(String::as_str);
                context.announce(swarms, "circuit-breaker", payload).await
            }
            BreakerScope::Swarm => context.announce([swarm], "circuit-breaker", payload).await,
        }
    }

    /// Runs a publish past the session's breaker, the swarm's breaker (control messages
    /// pass it) and the session's rate limit, under one lock of the session's limits. Fills
    /// `changes` with the breaker transitions to announce.
    fn admit(
        &self,
        publish: &Publish,
        now: std::time::Instant,
        changes: &mut Vec<(BreakerScope, BreakerState)>,
    ) -> Admission {
        let mut limits = self
            .limits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (verdict, half_opened) = limits.breaker.check(now);
        changes.extend(half_opened.map(|state| (BreakerScope::Session, state)));
        if let Err(wait) = verdict {
            return Admission::Open(BreakerScope::Session, wait);
        }
        let guard = self
            .swarm_guards
            .get(&publish.swarm)
            .filter(|_| publish.class != Class::Control);
        if let Some(guard) = guard {
            let (verdict, half_opened) = guard.check(now);
            changes.extend(half_opened.map(|state| (BreakerScope::Swarm, state)));
            if let Err(wait) = verdict {
                // Not this session's failure: its own breaker is left alone.
                return Admission::Open(BreakerScope::Swarm, wait);
            }
        }
        let admitted = self.admit_publish(publish, &mut limits, now);
        let (session_change, swarm_change) = if admitted {
            (limits.breaker.success(), guard.and_then(|g| g.success()))
        } else {
            (
                limits.breaker.failure(now),
                guard.and_then(|g| g.failure(now)),
            )
        };
        changes.extend(session_change.map(|state| (BreakerScope::Session, state)));
        changes.extend(swarm_change.map(|state| (BreakerScope::Swarm, state)));
        if admitted {
            Admission::Admitted
        } else {
            Admission::Refused
        }
    }

    /// Acquire, renew or release a lease; a new token is logged before it is granted.
    async fn lease(&self, request: swarmbus_schema::LeaseRequest) -> Result<(), Fault> {
        use swarmbus_proto::control::LeaseRefusal;
        use swarmbus_schema::LeaseAction;
        let request_id = request.request_id;
        if !self.joined(&request.swarm) {
            self.not_joined(&request.swarm, request_id);
            return Ok(());
        }
        check_name("lease name", &request.name)?;
        let max_ttl = self.context.config.presence.max_lease_ttl_ms;
        let ttl_ms = u64::from(request.ttl_ms.min(max_ttl).max(1));
        let now_ms = self.context.clock.now_ms();
        let decision = {
            let mut control = self.context.control();
            let leases = &mut control.leases;
            match request.action {
                LeaseAction::Acquire => leases
                    .acquire(&request.swarm, &request.name, &self.agent, ttl_ms, now_ms)
                    .map(Some),
                LeaseAction::Renew => leases
                    .renew(
                        &request.swarm,
                        &request.name,
                        &self.agent,
                        request.token,
                        ttl_ms,
                        now_ms,
                    )
                    .map(Some),
                LeaseAction::Release => leases
                    .release(&request.swarm, &request.name, &self.agent, request.token)
                    .map(|()| None),
            }
        };
        match decision {
            Ok(Some(granted)) => {
                if granted.must_log {
                    let record = swarmbus_proto::control::lease_record(
                        &request.swarm,
                        &request.name,
                        granted.grant.token,
                        &self.agent,
                        ttl_ms,
                    );
                    if let Err(error) = self
                        .context
                        .write_records(vec![control_record(record)], true)
                        .await
                    {
                        // The token must never go backwards, and a restart must not end a
                        // holding early: no grant without its record. A longer renewal that
                        // could not be logged leaves the holding as it was (its holder is
                        // refused, and keeps the expiry it was told before).
                        let mut control = self.context.control();
                        match granted.previous {
                            Some(previous) => control.leases.undo_extension(
                                &request.swarm,
                                &request.name,
                                granted.grant.token,
                                previous,
                                granted.grant.expires_at_ms,
                            ),
                            None => control.leases.revoke(
                                &request.swarm,
                                &request.name,
                                granted.grant.token,
                            ),
                        }
                        drop(control);
                        self.refuse_with_retry(
                            ErrorCode::SwarmUnavailable,
                            request_id,
                            format!("the grant could not be logged: {error}"),
                            1_000,
                        );
                        return Ok(());
                    }
                    self.context.control().leases.logged(
                        &request.swarm,
                        &request.name,
                        granted.grant.token,
                        ttl_ms,
                    );
                }
                let grant = swarmbus_schema::LeaseGrant {
                    request_id,
                    ..granted.grant
                };
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::LeaseGrant(grant)));
            }
            Ok(None) => {
                // Logged so a restart does not hold the lease for its TTL; if the record is
                // lost, the restart holds it for the old holder until then (safe).
                let record = swarmbus_proto::control::lease_record(
                    &request.swarm,
                    &request.name,
                    request.token,
                    "",
                    0,
                );
                if let Err(error) = self
                    .context
                    .write_records(vec![control_record(record)], true)
                    .await
                {
                    tracing::warn!(swarm = %request.swarm, lease = %request.name, %error, "a lease release was not logged");
                }
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
            }
            Err(LeaseRefusal::Held {
                holder,
                remaining_ms,
            }) => self.refuse_with_retry(
                ErrorCode::LeaseHeld,
                request_id,
                format!(
                    "lease {:?} of {:?} is held by {holder:?}",
                    request.name, request.swarm
                ),
                remaining_ms.clamp(1, u64::from(u32::MAX)) as u32,
            ),
            Err(LeaseRefusal::Limit(why)) => self.refuse_with_retry(
                ErrorCode::Busy,
                request_id,
                format!(
                    "lease {:?} of {:?} refused: {why}",
                    request.name, request.swarm
                ),
                1_000,
            ),
            Err(LeaseRefusal::Lost { newest_token }) => self.refuse(
                ErrorCode::LeaseLost,
                request_id,
                format!(
                    "token {} of lease {:?} is not held (newest token {newest_token})",
                    request.token, request.name
                ),
            ),
        }
        Ok(())
    }

    /// A controller's safety action: logged, applied, announced on the swarm's alert class,
    /// then acknowledged.
    async fn safety(&self, action: swarmbus_schema::SafetyAction) -> Result<(), Fault> {
        use swarmbus_schema::SafetyKind;
        let request_id = action.request_id;
        if self.role != Role::Controller {
            self.refuse(
                ErrorCode::Forbidden,
                request_id,
                "only sessions of role controller may take safety actions".into(),
            );
            return Ok(());
        }
        let context = &self.context;
        let now_ms = context.clock.now_ms();
        let (record, announce_on) = match action.kind {
            SafetyKind::Pause | SafetyKind::Resume => {
                check_name("swarm", &action.swarm)?;
                let flag = if action.kind == SafetyKind::Pause {
                    "1"
                } else {
                    "0"
                };
                (
                    (
                        swarmbus_proto::control::pause_key(&action.swarm),
                        Bytes::from(flag),
                    ),
                    vec![action.swarm.clone()],
                )
            }
            SafetyKind::Stop => {
                check_name("agent", &action.target)?;
                if !context.control().stops.has_room_for(&action.target, now_ms) {
                    self.refuse_with_retry(
                        ErrorCode::Busy,
                        request_id,
                        format!(
                            "{} agents are stopped already (the most at once)",
                            swarmbus_proto::control::MAX_STOPS
                        ),
                        1_000,
                    );
                    return Ok(());
                }
                let until = now_ms.saturating_add(action.duration_ms);
                let swarms = context
                    .control()
                    .presence
                    .get(&action.target)
                    .map(|p| p.swarms.clone())
                    .unwrap_or_default();
                (
                    (
                        swarmbus_proto::control::stop_key(&action.target),
                        Bytes::from(until.to_be_bytes().to_vec()),
                    ),
                    swarms,
                )
            }
            SafetyKind::Drain | SafetyKind::Undrain => {
                check_name("node", &action.target)?;
                let flag = if action.kind == SafetyKind::Drain {
                    "1"
                } else {
                    "0"
                };
                (
                    (
                        swarmbus_proto::control::drain_key(&action.target),
                        Bytes::from(flag),
                    ),
                    Vec::new(),
                )
            }
        };
        if let Err(error) = context
            .write_records(vec![control_record(record)], true)
            .await
        {
            self.refuse_with_retry(
                ErrorCode::SwarmUnavailable,
                request_id,
                format!("the action could not be logged: {error}"),
                1_000,
            );
            return Ok(());
        }
        match action.kind {
            SafetyKind::Pause | SafetyKind::Resume => {
                self.to_shard(
                    &action.swarm,
                    ShardCommand::Pause {
                        swarm: action.swarm.clone(),
                        paused: action.kind == SafetyKind::Pause,
                    },
                )
                .await;
            }
            SafetyKind::Stop => {
                let mut control = context.control();
                control
                    .stops
                    .stop(&action.target, now_ms.saturating_add(action.duration_ms));
                if let Some(present) = control.presence.get(&action.target) {
                    present.outbox.request_close(ErrorCode::Stopped);
                }
            }
            SafetyKind::Drain | SafetyKind::Undrain => {
                let draining = action.kind == SafetyKind::Drain;
                let pins = context.workers().set_admin_drain(&action.target, draining);
                if let Some(conn) = context.workers().conn_of(&action.target) {
                    context.jobs().worker_draining(conn, draining);
                }
                if let Err(error) = context.write_pins(pins).await {
                    tracing::warn!(%error, "pins of a drained node's sessions not written");
                }
            }
        }
        let kind = format!("{:?}", action.kind).to_lowercase();
        tracing::info!(controller = %self.agent, action = %kind, swarm = %action.swarm, target = %action.target, "safety action");
        let payload = format!(
            "{{\"event\":\"safety\",\"action\":\"{kind}\",\"by\":{},\"swarm\":{},\"target\":{},\"duration_ms\":{}}}",
            json_string(&self.agent),
            json_string(&action.swarm),
            json_string(&action.target),
            action.duration_ms
        );
        let swarms = announce_on.iter().map(String::as_str);
        context.announce(swarms, "safety", payload).await;
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
        Ok(())
    }

    /// Handles one message of an established session.
    async fn dispatch(&self, message: Message) -> Result<(), Fault> {
        match message {
            Message::Publish(publish) => {
                let now = std::time::Instant::now();
                let mut changes = Vec::new();
                let admission = self.admit(&publish, now, &mut changes);
                for (scope, state) in changes {
                    self.announce_breaker(scope, &publish.swarm, state).await;
                }
                match admission {
                    Admission::Admitted => {}
                    Admission::Refused => return Ok(()),
                    Admission::Open(scope, wait) => {
                        let why = match scope {
                            BreakerScope::Session => "this session's circuit breaker is open",
                            BreakerScope::Swarm => "this swarm's circuit breaker is open",
                        };
                        self.refuse_fast(&publish, ErrorCode::CircuitOpen, why, wait);
                        return Ok(());
                    }
                }
                if publish.class.is_ordered() {
                    // The governor's signal that commands are flowing (sessions' own only:
                    // the router's internal records are control publishes too).
                    self.context
                        .stats
                        .ordered_published
                        .fetch_add(1, Ordering::Relaxed);
                }
                let swarm = publish.swarm.clone();
                self.to_shard(
                    &swarm,
                    ShardCommand::Publish {
                        agent: self.agent.clone(),
                        outbox: self.outbox.clone(),
                        publish,
                    },
                )
                .await;
            }
            Message::Subscribe(subscription) => {
                if !self.joined(&subscription.swarm) {
                    self.not_joined(&subscription.swarm, subscription.request_id);
                    return Ok(());
                }
                if !subscription.agent_filter.as_deref().is_none_or(valid_name) {
                    self.refuse(
                        ErrorCode::InvalidRequest,
                        subscription.request_id,
                        format!("agent_filter must be 1 to {MAX_NAME_BYTES} bytes"),
                    );
                    return Ok(());
                }
                let max = self.context.config.limits.max_subscriptions as usize;
                {
                    let mut held = self
                        .subscriptions
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    let key = subscription_key(&subscription);
                    if !held.contains(&key) && held.len() >= max {
                        drop(held);
                        self.refuse(
                            ErrorCode::TooManySubscriptions,
                            subscription.request_id,
                            format!("a session may hold at most {max} subscriptions"),
                        );
                        return Ok(());
                    }
                    held.insert(key);
                }
                let swarm = subscription.swarm.clone();
                let resume = self
                    .resume
                    .get(&(swarm.clone(), subscription.class))
                    .copied();
                self.to_shard(
                    &swarm,
                    ShardCommand::Subscribe {
                        conn: self.conn,
                        agent: self.agent.clone(),
                        outbox: self.outbox.clone(),
                        subscription,
                        held: self.subscriptions.clone(),
                        resume,
                    },
                )
                .await;
            }
            Message::Unsubscribe(subscription) => {
                self.subscriptions
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&subscription_key(&subscription));
                let swarm = subscription.swarm.clone();
                self.to_shard(
                    &swarm,
                    ShardCommand::Unsubscribe {
                        outbox: self.outbox.clone(),
                        subscription,
                    },
                )
                .await;
            }
            Message::Ack {
                swarm,
                class,
                op_id,
            } => {
                if !self.joined(&swarm) {
                    self.not_joined(&swarm, 0);
                    return Ok(());
                }
                let key = swarm.clone();
                self.to_shard(
                    &key,
                    ShardCommand::Ack {
                        outbox: self.outbox.clone(),
                        swarm,
                        class,
                        op_id,
                    },
                )
                .await;
            }
            Message::DeltaRequest {
                request_id,
                swarm,
                from_op,
                to_op,
            } => {
                if !self.joined(&swarm) {
                    self.not_joined(&swarm, request_id);
                    return Ok(());
                }
                // Deltas are read from disk on the shard: each session gets a budget.
                let max_per_s = self.context.config.log.delta_requests_per_s;
                if over_per_second(&self.delta_window, max_per_s) {
                    self.refuse(
                        ErrorCode::Busy,
                        request_id,
                        format!("at most {max_per_s} delta requests per second per session; retry in 1 s"),
                    );
                    return Ok(());
                }
                let key = swarm.clone();
                self.to_shard(
                    &key,
                    ShardCommand::Delta {
                        agent: self.agent.clone(),
                        outbox: self.outbox.clone(),
                        request_id,
                        swarm,
                        from: from_op,
                        to: to_op,
                    },
                )
                .await;
            }
            // Liveness is recorded by the session loop for every message it reads.
            Message::Heartbeat { .. } => {}
            Message::PresenceQuery { request_id, swarm } => {
                if !self.joined(&swarm) {
                    self.not_joined(&swarm, request_id);
                    return Ok(());
                }
                // Each session gets a budget (the list is built under the control lock).
                let max_per_s = self.context.config.presence.queries_per_s;
                if over_per_second(&self.presence_window, max_per_s) {
                    self.refuse_with_retry(
                        ErrorCode::Busy,
                        request_id,
                        format!("at most {max_per_s} presence queries per second per session"),
                        1_000,
                    );
                    return Ok(());
                }
                // Keep the answer well within a frame (agent ids and metadata are bounded,
                // so this cuts only very large swarms; the list is sorted by agent id).
                let budget = self.context.config.limits.max_frame_bytes as usize / 2;
                let members = self.context.control().presence.list(&swarm, budget);
                let _ = self.outbox.push(
                    Lane::Session,
                    encode(&Message::PresenceList {
                        request_id,
                        swarm,
                        members,
                    }),
                );
            }
            Message::LeaseRequest(request) => self.lease(request).await?,
            Message::SafetyAction(action) => self.safety(action).await?,
            Message::WorkerStatus(status) => {
                if self.role != Role::Worker {
                    self.refuse(
                        ErrorCode::Forbidden,
                        status.request_id,
                        "only sessions of role worker may register worker nodes".into(),
                    );
                    return Ok(());
                }
                check_name("node", &status.node)?;
                let now = self.context.clock.now();
                let registered = {
                    let mut workers = self.context.workers();
                    workers
                        .register(self.conn, &self.outbox, &status, now)
                        .map(|done| (done, workers.conn_draining(self.conn)))
                };
                match registered {
                    Ok((registered, draining)) => {
                        let (node_id, pins) = (registered.node, registered.pins);
                        push_all(registered.failed);
                        {
                            let mut jobs = self.context.jobs();
                            jobs.worker_models(self.conn, &status.models);
                            jobs.worker_draining(self.conn, draining);
                        }
                        if let Err(error) = self.context.write_pins(pins).await {
                            tracing::warn!(%error, "session pins of a draining node not written");
                        }
                        let _ = self.outbox.push(
                            Lane::Session,
                            encode(&Message::WorkerAck {
                                request_id: status.request_id,
                                node_id: node_id.0,
                            }),
                        );
                    }
                    Err(refusal) => {
                        let _ = self
                            .outbox
                            .push(Lane::Session, refusal.frame(status.request_id));
                    }
                }
            }
            Message::OpenSession {
                request_id,
                session_key,
                model,
            } => {
                check_name("session_key", &session_key)?;
                let now = self.context.clock.now();
                let opened = self.context.workers().open_session(
                    request_id,
                    &session_key,
                    model.as_deref(),
                    now,
                );
                let frame = match opened {
                    Ok(opened) => match self.context.write_pins(opened.pins).await {
                        Ok(()) => opened.frame,
                        Err(error) => swarmbus_proto::refusal::Refusal {
                            code: ErrorCode::SwarmUnavailable,
                            message: error,
                            retry_after_ms: 1_000,
                        }
                        .frame(request_id),
                    },
                    Err(refusal) => refusal.frame(request_id),
                };
                let _ = self.outbox.push(Lane::Session, frame);
            }
            Message::CloseSession {
                request_id,
                session_key,
            } => {
                let closed = self.context.workers().close_session(&session_key);
                if let Some(pin) = closed {
                    if let Err(error) = self.context.write_pins(vec![pin]).await {
                        tracing::warn!(%error, "end of a session pin not written");
                    }
                }
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
            }
            Message::Request(request) => {
                let request_id = request.request_id;
                if request_id == 0 {
                    return Err(Fault::new(
                        ErrorCode::InvalidRequest,
                        "a Request needs a non-zero request_id",
                    ));
                }
                for name in [request.session_key.as_deref(), request.model.as_deref()]
                    .into_iter()
                    .flatten()
                {
                    check_name("session_key and model", name)?;
                }
                if request.payload.len() > self.max_payload_bytes {
                    self.refuse(
                        ErrorCode::PayloadTooLarge,
                        request_id,
                        format!(
                            "payload of {} bytes exceeds the maximum of {} bytes",
                            request.payload.len(),
                            self.max_payload_bytes
                        ),
                    );
                    return Ok(());
                }
                let now = self.context.clock.now();
                let routed = self
                    .context
                    .workers()
                    .route(&self.outbox, &self.agent, request, now);
                match routed {
                    Ok(routed) => {
                        if let Err(error) = self.context.write_pins(routed.pins).await {
                            tracing::warn!(%error, "session pin not written");
                        }
                        let _ = routed.worker.push(Lane::Session, routed.frame);
                    }
                    Err(refusal) => {
                        let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
                    }
                }
            }
            Message::Reply(reply) => {
                if self.role != Role::Worker {
                    self.refuse(
                        ErrorCode::Forbidden,
                        0,
                        "only sessions of role worker may reply to requests".into(),
                    );
                    return Ok(());
                }
                match self.context.workers().reply(self.conn, reply) {
                    Some((requester, frame)) => {
                        let _ = requester.push(Lane::Session, frame);
                    }
                    None => {
                        self.context
                            .stats
                            .late_replies
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Message::SubmitJob(submit) => {
                let request_id = submit.request_id;
                if request_id == 0 {
                    return Err(Fault::new(
                        ErrorCode::InvalidRequest,
                        "a SubmitJob needs a non-zero request_id",
                    ));
                }
                check_name("idempotency_key", &submit.idempotency_key)?;
                if let Some(model) = submit.model.as_deref() {
                    check_name("model", model)?;
                }
                if !self.joined(&submit.swarm) {
                    self.not_joined(&submit.swarm, request_id);
                    return Ok(());
                }
                let max = self.max_job_payload_bytes();
                if submit.payload.len() > max {
                    self.refuse(
                        ErrorCode::PayloadTooLarge,
                        request_id,
                        format!(
                            "job payload of {} bytes exceeds the maximum of {max} bytes",
                            submit.payload.len()
                        ),
                    );
                    return Ok(());
                }
                let context = &self.context;
                let now_ms = context.now_ms();
                let outcome = context
                    .jobs()
                    .submit(&self.agent, &self.outbox, submit, now_ms);
                // Answered on the job answer stream, beside the job stream: a backlog of
                // submissions and their answers stays off the session stream (and, with a
                // bulk connection, off the main connection).
                match outcome {
                    Err(refusal) => {
                        let _ = self
                            .outbox
                            .push(Lane::JobAnswers, refusal.frame(request_id));
                    }
                    Ok(Submitted::Answer(frame)) => {
                        let _ = self.outbox.push(Lane::JobAnswers, frame);
                    }
                    Ok(Submitted::Waiting) => {}
                    Ok(Submitted::New { job_id, record }) => {
                        // Written in a task: a submitter keeps many submits in flight, and
                        // group commit makes them durable together.
                        let context = context.clone();
                        tokio::spawn(async move {
                            let written = context.write_records_at(vec![record.into()], true).await;
                            let now_ms = context.now_ms();
                            let mut jobs = context.jobs();
                            if let Some(op) = written.as_ref().ok().and_then(|ops| ops.first()) {
                                jobs.spec_written_at(job_id, *op);
                            }
                            let effects = jobs.submitted(job_id, written.map(|_| ()), now_ms);
                            drop(jobs);
                            context.apply_job_effects(effects);
                        });
                    }
                }
            }
            Message::JobCredits { credits } => {
                if self.role != Role::Worker {
                    self.refuse(
                        ErrorCode::Forbidden,
                        0,
                        "only sessions of role worker may take jobs".into(),
                    );
                    return Ok(());
                }
                let now_ms = self.context.now_ms();
                let effects = self.context.jobs().credits(self.conn, credits, now_ms);
                self.context.apply_job_effects(effects);
            }
            Message::JobProgress(progress) => {
                if self.role != Role::Worker {
                    return Ok(());
                }
                let now_ms = self.context.now_ms();
                let effects = self.context.jobs().progress(self.conn, progress, now_ms);
                self.context.apply_job_effects(effects);
            }
            Message::JobResult(result) => {
                let request_id = result.request_id;
                if self.role != Role::Worker {
                    self.refuse(
                        ErrorCode::Forbidden,
                        request_id,
                        "only sessions of role worker may report job results".into(),
                    );
                    return Ok(());
                }
                let max = self.max_job_payload_bytes();
                if result.payload.len() > max {
                    self.refuse(
                        ErrorCode::PayloadTooLarge,
                        request_id,
                        format!(
                            "job result of {} bytes exceeds the maximum of {max} bytes",
                            result.payload.len()
                        ),
                    );
                    return Ok(());
                }
                let now_ms = self.context.now_ms();
                let outcome = self
                    .context
                    .jobs()
                    .result(self.conn, &self.outbox, result, now_ms);
                match outcome {
                    Ok(effects) => self.context.apply_job_effects(effects),
                    Err(refusal) => {
                        debug!(code = %refusal.code, message = %refusal.message, "job result rejected");
                        let _ = self
                            .outbox
                            .push(Lane::JobAnswers, refusal.frame(request_id));
                    }
                }
            }
            Message::JobCancel {
                request_id, job_id, ..
            } => {
                let now_ms = self.context.now_ms();
                let outcome = self.context.jobs().cancel(
                    &self.agent,
                    self.role == Role::Controller,
                    &self.outbox,
                    request_id,
                    job_id,
                    now_ms,
                );
                match outcome {
                    Ok(effects) => self.context.apply_job_effects(effects),
                    Err(refusal) => {
                        let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
                    }
                }
            }
            Message::JobAck { job_id } => {
                let effects = self.context.jobs().ack(&self.agent, job_id);
                self.context.apply_job_effects(effects);
            }
            Message::ListDeadLetters {
                request_id,
                swarm,
                after_job_id,
                limit,
            } => {
                if !self.controller_of(&swarm, request_id) {
                    return Ok(());
                }
                let mut page = self
                    .context
                    .jobs()
                    .dead_letters(&swarm, after_job_id, limit);
                page.request_id = request_id;
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::DeadLetters(page)));
            }
            Message::RedriveJob {
                request_id,
                swarm,
                job_id,
            } => {
                if !self.controller_of(&swarm, request_id) {
                    return Ok(());
                }
                let now_ms = self.context.now_ms();
                let outcome =
                    self.context
                        .jobs()
                        .redrive(&swarm, &self.outbox, request_id, job_id, now_ms);
                match outcome {
                    Ok(effects) => self.context.apply_job_effects(effects),
                    Err(refusal) => {
                        let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
                    }
                }
            }
            Message::Hello(_) => {
                return Err(Fault::new(
                    ErrorCode::DuplicateHello,
                    "Hello on an established session",
                ))
            }
            other => {
                return Err(Fault::new(
                    ErrorCode::UnexpectedMessage,
                    format!("{} is sent by the router, not by clients", other.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// Counts one request in a one-second window (start, requests so far): whether it is past
/// `max_per_s`.
fn over_per_second(window: &Mutex<(std::time::Instant, u32)>, max_per_s: u32) -> bool {
    let mut window = window
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if window.0.elapsed() >= Duration::from_secs(1) {
        *window = (std::time::Instant::now(), 0);
    }
    window.1 = window.1.saturating_add(1);
    window.1 > max_per_s
}

fn subscription_key(s: &Subscription) -> (String, Class, Option<String>) {
    (s.swarm.clone(), s.class, s.agent_filter.clone())
}

fn check_name(what: &str, name: &str) -> Result<(), Fault> {
    if !valid_name(name) {
        return Err(Fault::new(
            ErrorCode::InvalidRequest,
            format!("{what} must be 1 to {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Largest presence metadata an agent may register (bytes): presence events and lists carry
/// it to every watcher, and must stay far below the frame limit.
pub const MAX_METADATA_BYTES: usize = 1024;

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn check_hello(hello: &Hello, config: &Config) -> Result<(), Fault> {
    if hello.metadata.len() > MAX_METADATA_BYTES {
        return Err(Fault::new(
            ErrorCode::InvalidRequest,
            format!("metadata is limited to {MAX_METADATA_BYTES} bytes"),
        ));
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Fault::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this router speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            ),
        ));
    }
    let max = config.limits.max_swarms_per_session as usize;
    if hello.swarms.len() > max {
        return Err(Fault::new(
            ErrorCode::TooManySwarms,
            format!("a session may join at most {max} swarms"),
        ));
    }
    check_name("agent_id", &hello.agent_id)?;
    for swarm in &hello.swarms {
        check_name("swarm name", swarm)?;
        if swarm.starts_with('$') {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!("swarm {swarm:?}: names starting with $ are reserved for the router"),
            ));
        }
    }
    let mut seen = HashSet::with_capacity(hello.resume.len());
    for point in &hello.resume {
        if !point.class.is_ordered() || !seen.insert((point.swarm.as_str(), point.class)) {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!(
                    "resume point for swarm {:?} and class {:?}: at most one per swarm and \
                     ordered class (control, command)",
                    point.swarm, point.class
                ),
            ));
        }
        if !hello.swarms.contains(&point.swarm) {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!(
                    "resume point for swarm {:?}, which Hello does not join",
                    point.swarm
                ),
            ));
        }
    }
    Ok(())
}

/// Waits for the session stream and its Hello.
async fn handshake(
    connection: &Connection,
    context: &Context,
    partial: Arc<PartialFrames>,
) -> Result<(SendStream, FrameReader, Hello), Fault> {
    let max_frame = context.config.limits.max_frame_bytes as usize;
    // Publish streams a client opens right behind its Hello (pipelining) wait, unaccepted,
    // until the session is established; they are read only after Hello was checked.
    let (send, recv) = connection
        .accept_bi()
        .await
        .map_err(|e| Fault::new(ErrorCode::HelloRequired, e.to_string()))?;
    let mut reader = FrameReader::new(recv, max_frame, partial);
    match reader.next(&context.decode).await? {
        Read::Message(Message::Hello(hello)) => {
            check_hello(&hello, &context.config)?;
            Ok((send, reader, hello))
        }
        Read::Message(other) => Err(Fault::new(
            ErrorCode::HelloRequired,
            format!("{} before Hello", other.kind()),
        )),
        Read::End | Read::Gone => Err(Fault::new(
            ErrorCode::HelloRequired,
            "session stream ended before Hello",
        )),
    }
}

/// Drains one lane onto its stream until the outbox closes or the stream fails.
async fn lane_writer(
    connection: Connection,
    outbox: Arc<Outbox>,
    lane: Lane,
    mut stream: Option<SendStream>,
) {
    let mut frames: Vec<OutFrame> = Vec::with_capacity(WRITE_BATCH_FRAMES);
    let mut batch = Coalescer::new();
    loop {
        if outbox.is_closed() {
            break;
        }
        if outbox.drain(lane, WRITE_BATCH_FRAMES, WRITE_BATCH_BYTES, &mut frames) == 0 {
            outbox.ready(lane).await;
            continue;
        }
        for frame in frames.drain(..) {
            batch.push(frame);
        }
        if stream.is_none() {
            let Ok(opened) = connection.open_uni().await else {
                break;
            };
            let _ = opened.set_priority(lane.stream_priority());
            stream = Some(opened);
        }
        let Some(send) = stream.as_mut() else {
            break;
        };
        let chunks = batch.chunks();
        if send.write_all_chunks(chunks).await.is_err() {
            // The stream is unusable (the peer stopped it or the connection is gone); the
            // session cannot work without it, so end the connection.
            connection.close(
                VarInt::from(ErrorCode::WrongStream.as_u16()),
                b"a delivery or session stream failed",
            );
            outbox.close();
            break;
        }
        chunks.clear();
    }
}

/// Counts a connection in `connections_open` while it lives.
struct OpenConnection(Arc<Stats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_connection(
    conn: ConnId,
    connection: Connection,
    context: Arc<Context>,
    listener: Listener,
) {
    let stats = context.stats.clone();
    stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
    let open = stats.connections_open.fetch_add(1, Ordering::Relaxed) + 1;
    // Counted open until this function returns, whichever way it does.
    let _open = OpenConnection(stats.clone());
    if open > context.config.limits.max_connections as u64 {
        stats
            .connections_refused_busy
            .fetch_add(1, Ordering::Relaxed);
        connection.close(
            VarInt::from(ErrorCode::Busy.as_u16()),
            b"router at its connection limit",
        );
        return;
    }
    let hello_timeout = Duration::from_millis(context.config.limits.hello_timeout_ms);
    // One budget for the unfinished frames of all this connection's streams.
    let partial = context.partial_frames();
    let handshake = tokio::time::timeout(
        hello_timeout,
        handshake(&connection, &context, partial.clone()),
    )
    .await;
    let (send, mut session_reader, hello) = match handshake {
        Ok(Ok(ok)) => ok,
        Ok(Err(fault)) => {
            close_with(&connection, &stats, &fault);
            return;
        }
        Err(_) => {
            let fault = Fault::new(
                ErrorCode::HelloRequired,
                "no Hello within the hello timeout",
            );
            close_with(&connection, &stats, &fault);
            return;
        }
    };
    if let Some(attach) = hello.attach {
        if listener == Listener::Bulk {
            attach_bulk_connection(connection, send, &hello, attach, &context).await;
        } else {
            let fault = Fault::new(
                ErrorCode::InvalidRequest,
                "a bulk connection attaches on the bulk listener, at the port Welcome offered",
            );
            close_with(&connection, &stats, &fault);
        }
        return;
    }
    // A stopped agent is refused until its stop runs out, with the time left.
    let stopped_for = {
        let now_ms = context.clock.now_ms();
        context.control().stops.refused_for(&hello.agent_id, now_ms)
    };
    if let Some(left) = stopped_for {
        let mut send = send;
        let refusal = Refusal::new(
            ErrorCode::Stopped,
            format!("agent {:?} was stopped by a controller", hello.agent_id),
        )
        .retry_after(left.as_millis().clamp(1, u128::from(u32::MAX)) as u32)
        .frame(0);
        let _ = send
            .write_all_chunks(&mut [refusal.head, refusal.body])
            .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        connection.close(
            VarInt::from(ErrorCode::Stopped.as_u16()),
            b"stopped by a controller",
        );
        return;
    }
    debug!(agent = %hello.agent_id, role = ?hello.role, swarms = hello.swarms.len(), "session established");
    let config = &context.config;
    let outbox = Arc::new(Outbox::new(conn, &config.queues, stats.clone()));
    // Replies outrank every class stream.
    let _ = send.set_priority(i32::MAX);
    // A client that can attach a bulk connection is offered the bulk listener: its
    // telemetry and job traffic then has a socket, a connection and a congestion window of
    // its own, all driven on the bulk runtime.
    let (bulk_path_tx, bulk_path) = watch::channel(BulkPath::Main);
    let (ended_tx, ended) = watch::channel(false);
    let mut attached_rx = None;
    let bulk_offer = match context.bulk_port {
        Some(port) if hello.bulk && listener == Listener::Main => {
            let token = attach_token();
            (token != 0).then(|| {
                let (attached, rx) = oneshot::channel();
                attached_rx = Some(rx);
                context.attachments().insert(
                    conn.0,
                    PendingAttach {
                        token,
                        agent: Arc::from(hello.agent_id.as_str()),
                        attached,
                        ended: ended.clone(),
                    },
                );
                bulk_path_tx.send_replace(BulkPath::Waiting);
                BulkOffer { port, token }
            })
        }
        _ => None,
    };
    let mut writers = Vec::with_capacity(Lane::COUNT);
    let mut session_send = Some(send);
    for lane in Lane::all() {
        let stream = if lane == Lane::Session {
            session_send.take()
        } else {
            None
        };
        writers.push(if lane.is_bulk() {
            let writer =
                bulk_lane_writer(connection.clone(), bulk_path.clone(), outbox.clone(), lane);
            context.bulk.handle().spawn(writer)
        } else {
            tokio::spawn(lane_writer(
                connection.clone(),
                outbox.clone(),
                lane,
                stream,
            ))
        });
    }
    let welcome = Welcome {
        session_id: SessionId(conn.0),
        router_name: config.router_name.clone(),
        limits: welcome_limits(config),
        bulk: bulk_offer,
    };
    let _ = outbox.push(Lane::Session, encode(&Message::Welcome(welcome)));
    let now = std::time::Instant::now();
    let swarm_buckets = hello
        .swarms
        .iter()
        .filter_map(|swarm| {
            let rates = config.rate_limits.swarm_rates_for(swarm, hello.role)?;
            Some((swarm.clone(), ClassBuckets::new(rates, now)))
        })
        .collect();
    let swarm_guards = hello
        .swarms
        .iter()
        .map(|swarm| (swarm.clone(), context.swarm_guard(swarm)))
        .collect();
    let session = Arc::new(Session {
        conn,
        agent: hello.agent_id.into(),
        role: hello.role,
        last_seen: Arc::new(AtomicU64::new(context.clock.now_ms())),
        resume: hello
            .resume
            .into_iter()
            .filter(|r| r.class.is_ordered())
            .map(|r| ((r.swarm, r.class), (r.epoch, r.last_applied)))
            .collect(),
        swarms: hello.swarms.into_iter().collect(),
        outbox: outbox.clone(),
        subscriptions: Arc::new(Mutex::new(HashSet::new())),
        context: context.clone(),
        max_payload_bytes: max_payload_bytes(config.limits.max_frame_bytes as usize),
        delta_window: Mutex::new((std::time::Instant::now(), 0)),
        presence_window: Mutex::new((std::time::Instant::now(), 0)),
        limits: Mutex::new(SessionLimits {
            buckets: ClassBuckets::new(
                config.rate_limits.rates_for(hello.role),
                std::time::Instant::now(),
            ),
            swarm_buckets,
            breaker: Breaker::new(config.rate_limits.breaker, std::time::Instant::now()),
        }),
        swarm_guards,
        // The first drop of a session is reported at once.
        fast_refusals: Mutex::new((
            0,
            std::time::Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(std::time::Instant::now),
        )),
    });
    // Presence: the newest session of an agent id wins; the one it replaces is closed.
    let present = Present {
        conn,
        role: session.role,
        swarms: session.swarms.iter().cloned().collect(),
        metadata: hello.metadata.clone(),
        last_seen: session.last_seen.clone(),
        outbox: outbox.clone(),
    };
    // The stop check and the join under one lock: a Stop between them cannot miss us.
    let joined = {
        let mut control = context.control();
        let now_ms = context.clock.now_ms();
        if control.stops.refused_for(&session.agent, now_ms).is_some() {
            None
        } else {
            Some(
                control
                    .presence
                    .join(session.agent.clone(), present.clone()),
            )
        }
    };
    let Some(joined) = joined else {
        outbox.request_close(ErrorCode::Stopped);
        connection.close(
            VarInt::from(ErrorCode::Stopped.as_u16()),
            b"stopped by a controller",
        );
        outbox.close();
        for writer in writers {
            writer.abort();
        }
        context.attachments().remove(&conn.0);
        return;
    };
    match joined {
        Joined::New => {
            context
                .announce_presence(&session.agent, &present, "join", "connected")
                .await
        }
        Joined::Replaced(old) => old.outbox.request_close(ErrorCode::Replaced),
    }
    let worker_swarms: Option<Vec<String>> =
        (session.role == Role::Worker).then(|| session.swarms.iter().cloned().collect());
    let joined = context
        .jobs()
        .connect(conn, &session.agent, &outbox, worker_swarms.as_deref());
    context.apply_job_effects(joined);
    let uni_task = tokio::spawn(
        accept_publish_streams(
            connection.clone(),
            partial,
            session.clone(),
            connection.clone(),
        )
        .in_current_span(),
    );
    let attach_wait = ATTACH_WAIT.min(hello_timeout);
    let bulk_task = attached_rx.map(|attached| {
        tokio::spawn(
            serve_bulk_connection(
                attached,
                bulk_path_tx,
                session.clone(),
                connection.clone(),
                attach_wait,
            )
            .in_current_span(),
        )
    });

    let session_loop = async {
        loop {
            match session_reader.next(&context.decode).await? {
                Read::Message(message) => {
                    // Anything on the session stream is a sign of life, even while an
                    // earlier message waits for the log.
                    session
                        .last_seen
                        .fetch_max(context.clock.now_ms(), Ordering::Relaxed);
                    session.dispatch(message).await?
                }
                Read::End | Read::Gone => return Ok::<(), Fault>(()),
            }
        }
    };
    tokio::select! {
        result = session_loop => match result {
            Err(fault) => close_with(&connection, &stats, &fault),
            Ok(()) => connection.close(VarInt::from_u32(0), b"session stream closed"),
        },
        code = outbox.close_requested() => {
            let reason = match code {
                ErrorCode::Replaced => "another session with this agent id connected",
                ErrorCode::HeartbeatTimeout => "no heartbeat within the heartbeat timeout",
                ErrorCode::Stopped => "stopped by a controller",
                _ => "outbound queue overflow: the subscriber is lagging and missed messages",
            };
            close_with(&connection, &stats, &Fault::new(code, reason));
        }
        _ = connection.closed() => {}
        error = bulk_connection_closed(bulk_path.clone()) => {
            // The session's two connections live and end together.
            match error {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    connection.close(close.error_code, &close.reason)
                }
                other => connection.close(
                    VarInt::from_u32(0),
                    format!("the session's bulk connection was lost: {other}").as_bytes(),
                ),
            }
        }
    }
    // Close the outbox before Disconnect reaches the shards: a command still queued from a
    // stream reader then finds it closed and leaves nothing behind.
    outbox.close();
    uni_task.abort();
    context.attachments().remove(&conn.0);
    // The attached connection (if any, even one handed over just now) ends with the session.
    ended_tx.send_replace(true);
    if let Some(task) = bulk_task {
        task.abort();
        let _ = task.await;
    }
    if let BulkPath::Attached(bulk) = &*bulk_path.borrow() {
        bulk.close(VarInt::from_u32(0), b"session ended");
    }
    for shard in context.shards.iter().chain(&context.job_shards) {
        let _ = shard.send(ShardCommand::Disconnect { conn }).await;
    }
    let left = context.control().presence.leave(&session.agent, conn);
    if let Some(present) = left {
        if !context.shutting_down.load(Ordering::Acquire) {
            context
                .announce_presence(&session.agent, &present, "leave", "closed")
                .await;
        }
    }
    // A worker that leaves takes its sessions with it (they move to their next choices),
    // unless the router itself is stopping: then the pins stay for after the restart.
    if !context.shutting_down.load(Ordering::Acquire) {
        let now_ms = context.now_ms();
        let left = context.jobs().disconnect(conn, now_ms);
        context.apply_job_effects(left);
        let (failed, pins) = context.workers().disconnect(conn);
        push_all(failed);
        if let Err(error) = context.write_pins(pins).await {
            tracing::warn!(%error, "moved session pins not written");
        }
    }
    for writer in writers {
        writer.abort();
    }
    debug!("connection closed");
}

/// The limits a Welcome announces.
fn welcome_limits(config: &Config) -> Limits {
    Limits {
        max_frame_bytes: config.limits.max_frame_bytes,
        max_subscriptions: config.limits.max_subscriptions,
        max_swarms_per_session: config.limits.max_swarms_per_session,
        queue_frames: Class::ALL
            .iter()
            .map(|c| config.queues.for_class(*c) as u32)
            .collect(),
        heartbeat_interval_ms: config.presence.heartbeat_interval_ms,
        heartbeat_timeout_ms: config.presence.timeout_ms(),
    }
}

/// Drains a bulk lane onto the session's bulk connection once it is attached, or onto its
/// main connection when none was offered or it did not come in time.
async fn bulk_lane_writer(
    main: Connection,
    mut path: watch::Receiver<BulkPath>,
    outbox: Arc<Outbox>,
    lane: Lane,
) {
    let connection = match path.wait_for(|p| !matches!(p, BulkPath::Waiting)).await {
        Ok(path) => match &*path {
            BulkPath::Attached(bulk) => bulk.clone(),
            _ => main,
        },
        // The session ended while waiting.
        Err(_) => return,
    };
    lane_writer(connection, outbox, lane, None).await
}

/// Resolves when the session's attached bulk connection closes, with why; never when the
/// session has none.
async fn bulk_connection_closed(mut path: watch::Receiver<BulkPath>) -> quinn::ConnectionError {
    let attached = match path.wait_for(|p| !matches!(p, BulkPath::Waiting)).await {
        Ok(path) => match &*path {
            BulkPath::Attached(bulk) => Some(bulk.clone()),
            _ => None,
        },
        Err(_) => None,
    };
    match attached {
        Some(bulk) => bulk.closed().await,
        None => std::future::pending().await,
    }
}

/// Waits (at most `wait`) for the session's bulk connection, then reads the publish
/// streams the client opens on it, as the session's. Not attached in time: the session's
/// bulk lanes go on its main connection and a late attach finds no offer.
async fn serve_bulk_connection(
    mut attached: oneshot::Receiver<Connection>,
    path: watch::Sender<BulkPath>,
    session: Arc<Session>,
    main: Connection,
    wait: Duration,
) {
    let context = &session.context;
    let bulk = match tokio::time::timeout(wait, &mut attached).await {
        Ok(Ok(bulk)) => Some(bulk),
        Ok(Err(_)) => None,
        Err(_) => {
            // Withdraw the offer; if an attach has taken it already, its connection is on
            // the way (it is handed over before it is welcomed): wait for it.
            if context.attachments().remove(&session.conn.0).is_some() {
                None
            } else {
                attached.await.ok()
            }
        }
    };
    let Some(bulk) = bulk else {
        path.send_replace(BulkPath::Main);
        debug!(agent = %session.agent, "no bulk connection attached; bulk classes use the main one");
        return;
    };
    path.send_replace(BulkPath::Attached(bulk.clone()));
    context.stats.bulk_attached.fetch_add(1, Ordering::Relaxed);
    let handle = context.bulk.handle().clone();
    // Aborting this task (the session ended) aborts the accept loop with it. A fault on a
    // bulk stream closes the session's main connection, whose close the application sees.
    let mut accepting = AbortOnDrop(
        handle.spawn(
            accept_publish_streams(bulk, context.partial_frames(), session.clone(), main)
                .in_current_span(),
        ),
    );
    let _ = (&mut accepting.0).await;
}

/// A connection whose Hello attaches it to a session as that session's bulk connection:
/// checked against the session's offer (agent and token, one use), answered with a
/// Welcome, handed to the session, and held until it closes. Without a matching offer it is
/// closed with `InvalidRequest`.
async fn attach_bulk_connection(
    connection: Connection,
    mut send: SendStream,
    hello: &Hello,
    attach: Attach,
    context: &Context,
) {
    let offer = {
        let mut attachments = context.attachments();
        match attachments.remove(&attach.session.0) {
            Some(offer) if offer.token == attach.token && *offer.agent == *hello.agent_id => {
                Some(offer)
            }
            Some(offer) => {
                // A wrong token spends nothing: the session's own attach may still come.
                attachments.insert(attach.session.0, offer);
                None
            }
            None => None,
        }
    };
    let Some(offer) = offer else {
        let fault = Fault::new(
            ErrorCode::InvalidRequest,
            "no session of this agent waits for a bulk connection with this token",
        );
        close_with(&connection, &context.stats, &fault);
        return;
    };
    // Handed over before it is welcomed: a client that has its Welcome finds the session
    // using the connection.
    let PendingAttach {
        attached,
        mut ended,
        ..
    } = offer;
    if attached.send(connection.clone()).is_err() {
        connection.close(VarInt::from_u32(0), b"the session ended");
        return;
    }
    let welcome = encode(&Message::Welcome(Welcome {
        session_id: attach.session,
        router_name: context.config.router_name.clone(),
        limits: welcome_limits(&context.config),
        bulk: None,
    }));
    if send
        .write_all_chunks(&mut [welcome.head, welcome.body])
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
    debug!(agent = %hello.agent_id, session = attach.session.0, "bulk connection attached");
    tokio::select! {
        _ = connection.closed() => {}
        _ = ended.wait_for(|ended| *ended) => {
            connection.close(VarInt::from_u32(0), b"session ended");
        }
    }
}

/// Accepts the publish streams the client opens on `connection`; a protocol fault on one
/// closes `faults_to` (the session's main connection).
async fn accept_publish_streams(
    connection: Connection,
    partial: Arc<PartialFrames>,
    session: Arc<Session>,
    faults_to: Connection,
) {
    let max_frame = session.context.config.limits.max_frame_bytes as usize;
    // Stream readers live in this set, so aborting this task (when the connection ends)
    // aborts them too.
    let mut readers = JoinSet::new();
    while let Ok(recv) = connection.accept_uni().await {
        // Reap finished readers so the set stays as small as the open streams.
        while readers.try_join_next().is_some() {}
        let reader = FrameReader::new(recv, max_frame, partial.clone());
        readers.spawn(
            read_publish_stream(reader, session.clone(), faults_to.clone()).in_current_span(),
        );
    }
}

/// Reads one publish stream. The client keeps one stream per class, so the first message
/// tells what the stream carries: a telemetry or job stream is read on from the bulk
/// runtime (see [`crate::bulk`]), every other stream here on the main one.
async fn read_publish_stream(
    mut reader: FrameReader,
    session: Arc<Session>,
    connection: Connection,
) {
    let first = match reader.next(&session.context.decode).await {
        Ok(Read::Message(message)) => message,
        Ok(Read::End | Read::Gone) => return,
        Err(fault) => {
            close_with(&connection, &session.context.stats, &fault);
            return;
        }
    };
    let bulk = match &first {
        Message::Publish(publish) => publish.class == Class::Telemetry,
        Message::SubmitJob(_)
        | Message::JobResult(_)
        | Message::JobProgress(_)
        | Message::JobAck { .. }
        | Message::JobCredits { .. } => true,
        _ => false,
    };
    let stats = &session.context.stats;
    if bulk {
        stats.bulk_streams.fetch_add(1, Ordering::Relaxed);
        let handle = session.context.bulk.handle().clone();
        // Aborting this task (the connection ended) aborts the bulk reader with it.
        let mut reading = AbortOnDrop(
            handle
                .spawn(read_publishes(reader, session, connection, Some(first)).in_current_span()),
        );
        let _ = (&mut reading.0).await;
    } else {
        stats.main_streams.fetch_add(1, Ordering::Relaxed);
        read_publishes(reader, session, connection, Some(first)).await;
    }
}

/// Dispatches a publish stream's messages, `first` (already read) first. Telemetry waits
/// for the router-wide intake budget when one is set; a full shard queue holds the reader
/// (and so, through QUIC flow control, the sender).
async fn read_publishes(
    mut reader: FrameReader,
    session: Arc<Session>,
    connection: Connection,
    mut first: Option<Message>,
) {
    let decode = session.context.decode.clone();
    let result = async {
        // Telemetry this reader may still read before it takes another batch from the
        // router-wide intake budget, and the same for the governed budget (telemetry and
        // job messages).
        let mut telemetry_allowance = 0u32;
        let mut governed_allowance = 0u32;
        loop {
            let read = match first.take() {
                Some(message) => Read::Message(message),
                None => reader.next(&decode).await?,
            };
            match read {
                Read::Message(
                    message @ (Message::Publish(_)
                    | Message::SubmitJob(_)
                    | Message::JobResult(_)
                    | Message::JobProgress(_)
                    | Message::JobAck { .. }
                    | Message::JobCredits { .. }),
                ) => {
                    let telemetry =
                        matches!(&message, Message::Publish(p) if p.class == Class::Telemetry);
                    let governed = telemetry
                        || matches!(
                            &message,
                            Message::SubmitJob(_) | Message::JobResult(_) | Message::JobProgress(_)
                        );
                    session.dispatch(message).await?;
                    let context = &session.context;
                    if let (true, Some(budget)) = (telemetry, &context.telemetry_intake) {
                        budget.spend_one(&mut telemetry_allowance).await;
                    }
                    if let (true, Some(budget)) = (governed, &context.bulk_intake) {
                        budget.spend_one(&mut governed_allowance).await;
                    }
                }
                Read::Message(other) => {
                    return Err(Fault::new(
                        ErrorCode::WrongStream,
                        format!(
                            "{} on a publish stream (only Publish and job messages are allowed)",
                            other.kind()
                        ),
                    ))
                }
                Read::End | Read::Gone => return Ok::<(), Fault>(()),
            }
        }
    }
    .await;
    if let Err(fault) = result {
        close_with(&connection, &session.context.stats, &fault);
    }
}

/// The payload of the job spec in a job log's record (a Deliver frame with its prefix).
fn spec_payload(frame: &Bytes) -> Result<Bytes, String> {
    let deliver = match frame
        .get(4..)
        .map(|_| swarmbus_schema::decode(frame.slice(4..), &DecodeOptions::default()))
    {
        Some(Ok(Message::Deliver(deliver))) => deliver,
        _ => return Err("the record holds no Deliver frame".to_owned()),
    };
    let key = deliver.key.as_deref().unwrap_or_default();
    match JobRecord::parse(key, &deliver.payload) {
        Some(JobRecord::Spec(spec)) => Ok(spec.payload),
        _ => Err(format!("the record {key:?} is not a job's spec")),
    }
}

/// A record of the router's control swarm.
fn control_record((key, payload): (String, Bytes)) -> InternalRecord {
    InternalRecord {
        swarm: CONTROL_SWARM.to_owned(),
        key,
        payload,
    }
}

/// Pushes frames to the session lanes they are for.
fn push_all(frames: Vec<Outgoing>) {
    for (outbox, frame) in frames {
        let _ = outbox.push(Lane::Session, frame);
    }
}

/// Refuses to start on a damaged internal log (see [`RouterError::DamagedInternalLog`]).
fn check_internal_logs(recovered: &[log::SwarmLog]) -> Result<(), RouterError> {
    match recovered
        .iter()
        .find(|s| s.is_internal() && s.unavailable.is_some())
    {
        Some(swarm) => Err(damaged(
            swarm,
            swarm.unavailable.clone().unwrap_or_default(),
        )),
        None => Ok(()),
    }
}

fn damaged(swarm: &log::SwarmLog, reason: String) -> RouterError {
    let (holds, without) = if swarm.name == CONTROL_SWARM {
        (
            "the lease tokens, paused swarms, stopped agents and drained nodes",
            "paused swarms run, stopped agents may reconnect, and lease tokens start again \
             at 1, so fenced resources must reset their token checks",
        )
    } else if swarm.name == PINS_SWARM {
        (
            "the affine sessions' pins",
            "sessions are placed afresh and may move to other nodes",
        )
    } else {
        (
            "the swarm's accepted jobs, their attempts and their results",
            "those jobs are gone: submitters must submit them again",
        )
    };
    RouterError::DamagedInternalLog {
        swarm: swarm.name.clone(),
        path: swarm.dir.clone(),
        reason,
        holds,
        without,
    }
}

/// The session pins in the router's pin log, oldest first (the latest per key wins).
fn read_pins(recovered: &[log::SwarmLog]) -> Result<Vec<PinWrite>, RouterError> {
    Ok(read_records(recovered, PINS_SWARM)?
        .into_iter()
        .filter_map(|(key, payload)| {
            PinWrite::parse(swarmbus_proto::workers::pin_session_of(&key), &payload)
        })
        .collect())
}

/// The Deliver frames of one of the router's own logs, oldest first; a log that cannot be
/// read refuses the start (never a silent fresh state).
fn read_internal(swarm: &log::SwarmLog) -> Result<Vec<swarmbus_schema::Deliver>, RouterError> {
    let records = swarm
        .read_from(OpId(1), usize::MAX, usize::MAX)
        .map_err(|error| damaged(swarm, format!("reading it failed: {error}")))?;
    let options = DecodeOptions::default();
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        if record.frame.is_empty() {
            continue; // a void record: an op refused when the log failed
        }
        let mut decoder = FrameDecoder::new(record.frame.len().max(1024));
        decoder.push(record.frame);
        match decoder.next_message(&options) {
            Ok(Some(Message::Deliver(deliver))) => out.push(deliver),
            other => {
                let what = match other {
                    Err(error) => error.to_string(),
                    _ => "not a Deliver frame".to_owned(),
                };
                return Err(damaged(swarm, format!("op {}: {what}", record.op.0)));
            }
        }
    }
    Ok(out)
}

/// The (key, payload) records of one of the router's own swarms, oldest first.
fn read_records(
    recovered: &[log::SwarmLog],
    name: &str,
) -> Result<Vec<(String, Bytes)>, RouterError> {
    let Some(swarm) = recovered.iter().find(|s| s.name == name) else {
        return Ok(Vec::new());
    };
    Ok(read_internal(swarm)?
        .into_iter()
        .filter_map(|deliver| Some((deliver.key?, deliver.payload)))
        .collect())
}

/// The job logs' records (`$jobs.*`), in log order per log, and the op of each job's spec
/// record.
fn read_job_records(recovered: &[log::SwarmLog]) -> Result<JobLogs, RouterError> {
    let mut out = Vec::new();
    let mut spec_ops = HashMap::new();
    for swarm in recovered
        .iter()
        .filter(|s| s.name.starts_with(JOBS_SWARM_PREFIX))
    {
        for deliver in read_internal(swarm)? {
            if let Some(parsed) = deliver
                .key
                .as_deref()
                .and_then(|key| JobRecord::parse(key, &deliver.payload))
            {
                if let JobRecord::Spec(spec) = &parsed {
                    spec_ops.insert(spec.job_id, deliver.op_id);
                }
                out.push(parsed);
            }
        }
    }
    Ok((out, spec_ops))
}

/// What [`read_job_records`] returns.
type JobLogs = (Vec<JobRecord>, HashMap<swarmbus_schema::JobId, OpId>);

/// The job queue's clock (lease expiry, backoff, deadlines; every 10 ms), on the bulk
/// runtime with the rest of the job traffic.
async fn job_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let due = context.jobs().tick(context.now_ms());
        context.apply_job_effects(due);
    }
}

async fn worker_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_reap = std::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let now = context.clock.now();
        push_all(context.workers().expire(now));
        if now.instant.duration_since(last_reap) >= Duration::from_secs(10) {
            last_reap = now.instant;
            let pins = context.workers().reap(now);
            if let Err(error) = context.write_pins(pins).await {
                tracing::warn!(%error, "ends of expired session pins not written");
            }
        }
    }
}

/// The governor's loop (see [`swarmbus_proto::governor`]): samples the host's idle CPU and the
/// router's counters, and sets the budget for bulk intake (telemetry and job messages).
async fn govern_bulk_intake(context: std::sync::Weak<Context>) {
    let Some(mut host) = crate::host_cpu::HostCpu::open() else {
        tracing::warn!("the governor cannot read /proc/stat: it stays idle");
        return;
    };
    let Some(config) = context.upgrade().map(|c| c.config.governor.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut governor = swarmbus_proto::governor::Governor::new(config);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let Some(budget) = &context.bulk_intake else {
            return;
        };
        let stats = &context.stats;
        let before = (governor.rate(), governor.cuts());
        let rate = governor.step(swarmbus_proto::governor::Sample {
            now: std::time::Instant::now(),
            idle: host.idle_since_last(),
            ordered: stats.ordered_published.load(Ordering::Relaxed),
            intake: budget.taken(),
        });
        if (rate, governor.cuts()) != before {
            budget.set(rate);
            stats
                .governed_intake_per_s
                .store(rate.map_or(0, |rate| rate.ceil() as u64), Ordering::Relaxed);
            stats
                .governor_cuts
                .store(governor.cuts(), Ordering::Relaxed);
        }
    }
}

/// Declares agents without a heartbeat for the heartbeat timeout gone (every 100 ms): their
/// leave is announced and their connection closed with HeartbeatTimeout.
async fn presence_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sweeps = 0u64;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let timeout = u64::from(context.config.presence.timeout_ms());
        if timeout == 0 {
            continue;
        }
        let now_ms = context.clock.now_ms();
        sweeps += 1;
        if sweeps.is_multiple_of(10) {
            // Once a second: expired lease holdings give their holders' places back.
            context.control().leases.sweep(now_ms);
        }
        let gone = context.control().presence.expire(now_ms, timeout);
        for (agent, present) in gone {
            present.outbox.request_close(ErrorCode::HeartbeatTimeout);
            context
                .announce_presence(&agent, &present, "leave", "timeout")
                .await;
        }
    }
}
