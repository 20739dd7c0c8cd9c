//! The swarmbus client library that agents, controllers and workers link.
//!
//! Layout, by plane:
//! - this file: the types the planes share: [`Session`] (what a Hello asks for),
//!   [`PublishOptions`], [`Client`] (one session) and [`Deliveries`] (its messages);
//! - `connector`: [`Connector`] (TLS trust + QUIC endpoint), the handshake, the bulk
//!   connection, stream writers and heartbeats;
//! - `client`: the routing plane: subscribe, publish (receipts, retries, batches), ack,
//!   deltas, close;
//! - `replies`: requests and the reader that matches the router's answers to them;
//! - `deliveries`: the class streams read into [`Deliveries`] (a `futures_core::Stream`);
//! - [`control`]: the control plane: leases, safety actions, presence, configuration
//!   ([`ConfigView`], [`FencingFilter`]);
//! - `affinity`: worker registration, affine sessions, requests to workers and replies;
//! - [`jobs`]: the job queue: submits, results, cancels, dead letters ([`JobDedup`],
//!   [`JobEvents`] for workers, [`JobUpdates`] for submitters);
//! - [`apply`]: [`IdempotentApply`], which turns at-least-once delivery into an
//!   exactly-once effect by dropping ops at or below the last applied op id;
//! - [`error`]: the error type, [`ClientError`];
//! - [`gpu`]: GPU detection for worker nodes ([`gpu::detect`], [`gpu::GpuProbe`], the fake
//!   [`gpu::FakeGpus`], NVML behind the cargo feature `nvml`);
//! - [`retry`]: exponential backoff with full jitter ([`RetryPolicy`], [`Backoff`]);
//! - [`reconnect`]: [`ResilientClient`], a session that reconnects, resumes and
//!   resubscribes by itself ([`Connector::connect_resilient`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), swarmbus_client::ClientError> {
//! use swarmbus_client::{Connector, Session, PublishOptions};
//! use swarmbus_schema::{Class, Role};
//! let connector = Connector::new("swarmbus-data/tls/ca.pem".as_ref(), "localhost")?;
//! let session = Session::new("agent-7", Role::Agent, ["swarm-a"]);
//! let (client, mut deliveries) = connector.connect("127.0.0.1:4433".parse().unwrap(), session).await?;
//! client.subscribe("swarm-a", Class::Command, None).await?;
//! let op = client.publish("swarm-a", Class::Command, b"hello".as_slice().into(), PublishOptions::default()).await?;
//! while let Some(delivery) = deliveries.recv().await { /* apply it */ }
//! # Ok(()) }
//! ```

mod affinity;
pub mod apply;
mod client;
mod connector;
pub mod control;
mod deliveries;
pub mod error;
pub mod gpu;
pub mod jobs;
pub mod reconnect;
mod replies;
pub mod retry;
pub mod stats;
mod trust;

use connector::*;
use deliveries::*;
use replies::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use swarmbus_schema::{
    encode, max_payload_bytes, valid_name, Attach, BulkOffer, Coalescer, DecodeOptions,
    FrameDecoder, Hello, JobProgress, JobResult, LeaseAction, LeaseRequest, Message, OutFrame,
    Publish, Reply as WireReply, Request, SafetyAction, Subscription, Welcome, ALPN,
    DEFAULT_MAX_FRAME_BYTES, JOB_STREAM_PRIORITY, MAX_NAME_BYTES, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use apply::{FileOffsetStore, IdempotentApply, OffsetStore};
pub use control::{ConfigView, FencingFilter, DEFAULT_LEASE};
pub use error::{ClientError, IoError};
pub use jobs::{JobDedup, JobEvent, JobEvents, JobUpdates};
pub use reconnect::{ReconnectEvent, ReconnectOptions, ResilientClient};
pub use retry::{Backoff, RetryPolicy};
pub use stats::{ClientStats, LastMessage, StatsSnapshot};
/// The schema's types that this crate's API takes and returns, so that an agent depends on
/// this crate alone.
pub use swarmbus_schema::{
    Class, DeadLetter, DeadLetters, Deliver, DeltaAck, Epoch, ErrorCode, JobId, JobLease, JobState,
    JobStatus, JobUpdate, LeaseGrant, Member, OpId, ResumePoint, Role, SafetyKind, SessionPinned,
    SubmitJob, WorkerStatus,
};
pub use trust::{ConnectorBuilder, TrustRoots};

/// How a session presents itself in Hello, plus client-side limits.
#[derive(Clone, Debug)]
pub struct Session {
    pub agent_id: String,
    pub role: Role,
    pub swarms: Vec<String>,
    pub client_name: String,
    pub client_version: String,
    /// Deliveries buffered for the application before the client stops reading (and QUIC
    /// flow control pushes back on the router). Default 8192.
    pub delivery_buffer: usize,
    /// Requests awaiting a reply (publishes of ordered classes, subscribes) at once;
    /// further ones wait, or fail with `InFlightFull` when `fail_when_in_flight_full` is
    /// set. Default 4096.
    pub max_in_flight: usize,
    /// Return `ClientError::InFlightFull` instead of waiting when `max_in_flight` requests
    /// are unanswered (a capped queue of unacknowledged publishes). Default false.
    pub fail_when_in_flight_full: bool,
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// Where the agent stands in each swarm (see [`IdempotentApply::resume_points`]): the
    /// router sends the ordered ops after these, then live traffic.
    pub resume: Vec<ResumePoint>,
    /// Registered with the router for presence queries (free-form, e.g. JSON).
    pub metadata: String,
    /// Attach a second connection for telemetry and jobs when the router offers one (a
    /// router with a bulk listener): that traffic then has its own socket, congestion window
    /// and connection driver, apart from commands. When the attach fails the session carries
    /// everything on its one connection. Default true.
    pub bulk_connection: bool,
    /// The session's credential, for a router that requires one (`auth.mode = "required"`):
    /// see [`Session::with_credential`] and [`Session::credential_from`].
    pub credential: Option<Credential>,
}

/// A session's credential (a compact JWT): a fixed token, or a source asked for a fresh one
/// at every connect (a resilient client's reconnects too). Its `Debug` never shows it.
#[derive(Clone)]
pub enum Credential {
    Token(String),
    Source(Arc<dyn Fn() -> Result<String, String> + Send + Sync>),
}

impl Credential {
    /// The token to send now.
    pub fn token(&self) -> Result<String, ClientError> {
        match self {
            Credential::Token(token) => Ok(token.clone()),
            Credential::Source(source) => source().map_err(|detail| ClientError::InvalidArgument {
                detail: format!("the credential source failed: {detail}"),
            }),
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Credential::Token(..)"),
            Credential::Source(_) => f.write_str("Credential::Source(..)"),
        }
    }
}

impl Session {
    pub fn new<S: Into<String>>(
        agent_id: impl Into<String>,
        role: Role,
        swarms: impl IntoIterator<Item = S>,
    ) -> Self {
        Session {
            agent_id: agent_id.into(),
            role,
            swarms: swarms.into_iter().map(Into::into).collect(),
            client_name: "swarmbus-client".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            delivery_buffer: 8192,
            max_in_flight: 4096,
            fail_when_in_flight_full: false,
            connect_timeout: Duration::from_secs(10),
            resume: Vec::new(),
            metadata: String::new(),
            bulk_connection: true,
            credential: None,
        }
    }

    /// Shows `token` (a JWT issued for this agent id) in Hello.
    pub fn with_credential(mut self, token: impl Into<String>) -> Self {
        self.credential = Some(Credential::Token(token.into()));
        self
    }

    /// Asks `source` for a credential at every connect (and reconnect).
    pub fn credential_from(
        mut self,
        source: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        self.credential = Some(Credential::Source(Arc::new(source)));
        self
    }

    /// Resumes from the state of `applied` (its resume points for the swarms joined).
    pub fn resume_from(mut self, applied: &IdempotentApply) -> Self {
        self.resume = applied
            .resume_points()
            .into_iter()
            .filter(|p| self.swarms.contains(&p.swarm))
            .collect();
        self
    }
}

/// Options of one publish.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// Deliver only to this agent's subscriptions.
    pub target_agent: Option<String>,
    pub key: Option<String>,
    /// Ask for an acknowledgement even for unordered classes.
    pub ack: bool,
    /// Stamp the message with this fencing token of lease `lease` ("leader" when unset):
    /// the router refuses it (`StaleFencingToken`) once a newer token was granted, and
    /// receivers using [`FencingFilter`] drop it once they saw a newer one. 0: no stamp.
    pub fencing_token: u64,
    pub lease: Option<String>,
}

/// TLS trust and a QUIC endpoint; makes any number of sessions.
#[derive(Clone, Debug)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    server_name: String,
    /// The runtime the connector was made on: its connections are driven there.
    runtime: tokio::runtime::Handle,
    /// Where sessions make their bulk connections, when not from this connector.
    bulk: Option<Box<Connector>>,
    /// Credentials for sessions that bring none (see [`Connector::with_credentials`]).
    credentials: Option<AgentCredentials>,
}

/// A credential source for many agents: asked with the agent id at every connect of a
/// session that has no credential of its own. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct AgentCredentials(Arc<CredentialFor>);

/// The function behind [`AgentCredentials`]: agent id -> credential, or why not.
type CredentialFor = dyn Fn(&str) -> Result<String, String> + Send + Sync;

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCredentials(..)")
    }
}

/// Leases and cancels a worker may have waiting before the job stream stops being read.
const JOB_EVENT_QUEUE: usize = 1024;

/// Requests from the router a worker may have waiting before it answers more with "busy".
const REQUEST_QUEUE: usize = 1024;

/// Frames queued per stream writer before publishers wait.
const WRITER_QUEUE_FRAMES: usize = 1024;
/// Frames a stream writer takes per write.
const WRITER_BATCH_FRAMES: usize = 256;

struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    options: DecodeOptions,
}

/// What the router answered to a publish: the op id and the epoch of the swarm's log it
/// was made durable in (both 0 for unordered classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Receipt {
    pub op_id: OpId,
    pub epoch: Epoch,
}

/// What a request got back.
#[derive(Debug)]
enum ReplyValue {
    Receipt(Receipt),
    Delta(DeltaAck),
    WorkerAck(u64),
    Pinned(SessionPinned),
    Reply(WireReply),
    Presence(Vec<Member>),
    Lease(LeaseGrant),
    Job(JobStatus),
    DeadLetters(DeadLetters),
}

type ReplyResult = Result<ReplyValue, ClientError>;

/// A request awaiting its reply, holding one of the `max_in_flight` slots until answered.
#[derive(Debug)]
struct Reply {
    tx: oneshot::Sender<ReplyResult>,
    _slot: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct Shared {
    connection: Connection,
    /// The session's bulk connection (telemetry and jobs), when attached.
    bulk: Option<Connection>,
    /// Frames for the session stream (Subscribe, Unsubscribe, Ack).
    session_tx: mpsc::Sender<OutFrame>,
    /// Frames for the publish stream of each class, indexed by `Class::index`.
    publish_tx: [mpsc::Sender<OutFrame>; Class::COUNT],
    pending: Mutex<HashMap<u64, Reply>>,
    next_request: AtomicU64,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    fail_when_in_flight_full: bool,
    max_payload_bytes: usize,
    welcome: Welcome,
    agent_id: String,
    /// EpochChanged notices: swarm -> (new epoch, the epoch the resume point was in).
    epoch_changes: Mutex<HashMap<String, (Epoch, Epoch)>>,
    /// The receiving end of the requests the router sends this session (workers), until
    /// the application takes it. The sending end belongs to the session stream's reader,
    /// so the stream ends with the connection.
    requests_rx: Mutex<Option<mpsc::Receiver<Request>>>,
    /// Frames for the job stream (SubmitJob, JobProgress, JobResult), below commands.
    jobs_tx: mpsc::Sender<OutFrame>,
    job_events_rx: Mutex<Option<mpsc::Receiver<jobs::JobEvent>>>,
    job_updates_rx: Mutex<Option<mpsc::Receiver<JobUpdate>>>,
}

/// Closes the connection when the last `Client` clone is dropped. Background tasks hold
/// `Shared`, never this, so they do not keep an abandoned connection alive.
#[derive(Debug)]
struct Owner {
    connection: Connection,
    bulk: Option<Connection>,
}

/// How long a session tries to attach its bulk connection before it carries everything on
/// its one connection. Longer than the router waits for the attach (2 s), so that the
/// router decides first: it either takes the attach (and the client gets its Welcome) or
/// withdraws the offer (and the client gets a refusal). A client that gave up on an attach
/// the router had taken would close the connection the session's bulk traffic now uses.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client waits for the router's close of a connection (with the reason the
/// application should see) once the router stopped reading one of its streams, or closed
/// the session's bulk connection, before it closes the connection itself.
const BULK_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Removes a registered request from the pending map unless its frame was queued: a
/// caller that drops its future before that leaves nothing behind.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
    queued: bool,
}

/// Where the router's unidirectional streams' messages go.
#[derive(Clone, Debug)]
struct Inbound {
    deliveries: DeliverySink,
    job_events: mpsc::Sender<jobs::JobEvent>,
    job_updates: mpsc::Sender<JobUpdate>,
    /// Answers to requests sent on the job stream (submits, results) come back on it.
    shared: Arc<Shared>,
}

/// Where a connection's deliveries go: one bounded channel per class, and optionally a
/// record of the last ordered op handed over (what a reconnecting session resumes from).
#[derive(Clone, Debug)]
pub(crate) struct DeliverySink {
    classes: [mpsc::Sender<Deliver>; Class::COUNT],
    pub(crate) handed_over: Option<Arc<Mutex<IdempotentApply>>>,
}

/// Messages delivered to this session, in order per class. Each class has its own bounded
/// buffer (`Session::delivery_buffer` each), and [`Deliveries::recv`] takes control first,
/// then command, alert, reconciliation and telemetry last: a backlog of telemetry the
/// application has not read never holds a command back.
#[derive(Debug)]
pub struct Deliveries {
    classes: [mpsc::Receiver<Deliver>; Class::COUNT],
    /// Where every delivery handed out is counted, if anywhere, with what this stream
    /// received so far.
    stats: Option<(ClientStats, stats::Arrivals)>,
}

/// Requests the router routes to this worker session (see [`Client::requests`]).
#[derive(Debug)]
pub struct Requests {
    rx: mpsc::Receiver<Request>,
}

fn check_name(what: &str, name: &str) -> Result<(), ClientError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ClientError::InvalidArgument {
            detail: format!("{what} must be 1 to {MAX_NAME_BYTES} bytes"),
        })
    }
}

/// A pending reply to a publish.
#[derive(Debug)]
pub struct PendingAck {
    rx: Option<oneshot::Receiver<ReplyResult>>,
    shared: Arc<Shared>,
}

/// One session with the router. Cheap to clone; all clones share the connection, which
/// closes when the last clone is dropped (or on [`Client::close`]).
#[derive(Clone, Debug)]
pub struct Client {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl Client {}
