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
//!
//! Layout: this file holds the types every part shares; the parts are
//! - `start`: recovery, the writers, shards, runtimes and endpoints; accessors, shutdown;
//! - `connection`: handshake, session loop, lane writers, publish stream readers;
//! - `bulk_path`: the second connection on the bulk runtime (telemetry, job streams);
//! - `context`: what sessions share, and the router's own publishes;
//! - `session`: admission (roles, rate limits, breakers) and the dispatch, which hands
//!   each message to its handler family: `routing`, `control`, `affinity`, `jobs`, `auth`
//!   (credential refresh);
//! - `recovery`: the internal swarms read back at start;
//! - `maintenance`: the periodic work (deadlines, governor, presence timeouts).

mod admin;
mod affinity;
mod auth;
mod bulk_path;
mod connection;
mod context;
mod control;
mod jobs;
mod maintenance;
mod recovery;
mod routing;
mod session;
mod start;
pub use start::StartOptions;

use bulk_path::*;
use connection::*;
use maintenance::*;
use recovery::*;
use session::*;

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
use crate::config::{Config, LogBackendKind};
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
use swarmbus_proto::jobs::{AckedEnd, JobCounts, JobRecord, Submitted, JOBS_SWARM_PREFIX};
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
    /// Checks credentials when `auth.mode = "required"`; replaced by a reload.
    auth: std::sync::RwLock<Option<Arc<crate::auth::Authenticator>>>,
    /// Whether the authenticator's policy denies anything (set with it, at start and on a
    /// reload): sessions skip the policy entirely when it does not.
    policy_active: std::sync::atomic::AtomicBool,
    /// Live sessions that showed a credential, re-checked on a reload.
    credentialed: Mutex<HashMap<ConnId, std::sync::Weak<Session>>>,
    /// Every connection being served, by id (the connections view, the QUIC metrics).
    live: Mutex<std::collections::BTreeMap<u64, Tracked>>,
    shards: Vec<ShardSender>,
    /// What the log writers measure (the main one's, the job queue's).
    log_metrics: Vec<Arc<crate::log::writer::LogMetrics>>,
    /// The JetStream cluster, with `log.backend = "jetstream"`.
    cluster: Option<swarmbus_jetstream::Cluster>,
    /// The cluster's lease bucket (with the cluster): leases of user swarms are granted
    /// there, and `control.leases` mirrors it.
    cluster_leases: Option<swarmbus_jetstream::LeaseBucket>,
    /// The cluster's safety bucket (with the cluster): pauses and stops are written there,
    /// and every router applies what it holds.
    cluster_safety: Option<swarmbus_jetstream::SafetyBucket>,
    /// The revision of the newest safety record applied here, per record key (records are
    /// applied in revision order, whoever applies them; the lock is held while one is).
    safety_applied: tokio::sync::Mutex<HashMap<String, u64>>,
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

/// The control plane's state, behind one lock.
#[derive(Debug)]
struct ControlState {
    presence: Presence,
    leases: Leases,
    stops: Stops,
}

/// A record for one of the router's internal swarms (`$affinity`, `$jobs.*`).
#[derive(Debug)]
struct InternalRecord {
    swarm: String,
    key: String,
    payload: Bytes,
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
    /// The admin listener (`admin_listen`): its address and task (stopped when the router
    /// is dropped), and what it serves from.
    admin: Option<(SocketAddr, AbortOnDrop<()>)>,
    admin_state: Arc<admin::AdminState>,
    /// The certificate and key served, as last read (a reload of the client CA serves them
    /// again with the new verifier).
    served_tls: Mutex<tls::ServerIdentity>,
    recovery_notes: Vec<RecoveryNote>,
    writer_kind: WriterKind,
    /// The clock's checkpoint thread: dropping the sender stops it (after a last
    /// checkpoint); shutdown waits for it.
    clock_checkpoints: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

/// A router that has shut down; its admin listener answers `/readyz` with "shutting down"
/// until this is dropped.
#[derive(Debug)]
pub struct Stopped {
    _admin: Option<(SocketAddr, AbortOnDrop<()>)>,
}

/// Which endpoint a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Main,
    /// `bulk_listen`: its sessions are bulk sessions already and are offered no bulk
    /// connection.
    Bulk,
}

/// A protocol violation: the connection is closed with `code`.
#[derive(Debug)]
struct Fault {
    code: ErrorCode,
    reason: String,
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

/// A session's rate limits and circuit breaker, behind one lock.
#[derive(Debug)]
struct SessionLimits {
    buckets: ClassBuckets,
    /// Buckets of the joined swarms that override the rates (`rate_limits.swarms`).
    swarm_buckets: HashMap<String, ClassBuckets>,
    breaker: Breaker,
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
    /// When the session's credential expires (Unix seconds; 0: no credential). A refresh
    /// moves it; the session is closed with `Unauthenticated` once it passes.
    credential_expires_s: AtomicU64,
    /// The session's credential and what it grants (`auth.mode = "required"`), replaced
    /// together by a refresh; re-verified when the trusted keys or revocations change.
    credential: Mutex<Option<SessionCredential>>,
}

/// A session's verified identity and what proved it (a token's `Debug` does not show it).
#[derive(Debug)]
struct SessionCredential {
    identity: crate::auth::Identity,
    proof: crate::auth::Proof,
}

/// Largest presence metadata an agent may register (bytes): presence events and lists carry
/// it to every watcher, and must stay far below the frame limit.
pub const MAX_METADATA_BYTES: usize = 1024;

/// A connection as the connections view and the QUIC metrics see it. A session's attached
/// bulk connection is a connection of its own here (it came in on the bulk listener).
#[derive(Debug, Clone)]
struct Tracked {
    connection: Connection,
    listener: Listener,
    /// Router clock (Unix ms) when it was accepted.
    since_ms: u64,
    /// Its session, once established.
    session: Option<std::sync::Weak<Session>>,
    /// Where its session's bulk lanes go (names its attached bulk connection).
    bulk: Option<watch::Receiver<BulkPath>>,
}

impl Tracked {
    /// Its bulk connection, when one is attached.
    fn bulk_connection(&self) -> Option<Connection> {
        match &*self.bulk.as_ref()?.borrow() {
            BulkPath::Attached(bulk) => Some(bulk.clone()),
            _ => None,
        }
    }
}

/// Keeps a connection in [`Context::live`] while it is served; when it ends, its QUIC
/// figures join the router's totals under the same lock, so that a scrape (which reads the
/// totals and takes the live connections under it) counts them once.
struct Tracking {
    context: Arc<Context>,
    conn: ConnId,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        let mut live = self.context.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tracked) = live.remove(&self.conn.0) {
            self.context.stats.quic_ended.add(&tracked.connection);
        }
    }
}

/// Counts a connection in `connections_open` while it lives.
struct OpenConnection(Arc<Stats>);

/// Counts a session in `sessions_by_role` (by role index) while it lives.
struct SessionCount(Arc<Stats>, usize);

/// What [`read_job_records`] returns.
type JobLogs = (Vec<JobRecord>, HashMap<swarmbus_schema::JobId, OpId>);
