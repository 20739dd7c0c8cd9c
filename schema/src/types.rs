//! Domain types: what the router and client work with. Converted from and to wire types
//! in [`crate::codec`] only.

use bytes::Bytes;

/// Message class. The discriminant is the priority rank (0 = highest) and the wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Control = 0,
    Command = 1,
    Alert = 2,
    Reconciliation = 3,
    Telemetry = 4,
}

impl Class {
    /// All classes, highest priority first.
    pub const ALL: [Class; 5] = [
        Class::Control,
        Class::Command,
        Class::Alert,
        Class::Reconciliation,
        Class::Telemetry,
    ];
    pub const COUNT: usize = 5;

    /// Index into per-class arrays (0 = control).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether this class is sequenced with op ids by the swarm's sequencer.
    pub fn is_ordered(self) -> bool {
        matches!(self, Class::Control | Class::Command)
    }

    /// Whether a full queue may shed this class (telemetry only); every other class is never
    /// dropped.
    pub fn is_sheddable(self) -> bool {
        matches!(self, Class::Telemetry)
    }

    /// QUIC stream priority (higher is sent first): control 4 ... telemetry 0.
    pub fn stream_priority(self) -> i32 {
        4 - self as i32
    }

    pub fn from_u8(value: u8) -> Option<Class> {
        Class::ALL.get(value as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Control => "control",
            Class::Command => "command",
            Class::Alert => "alert",
            Class::Reconciliation => "reconciliation",
            Class::Telemetry => "telemetry",
        }
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!("unknown class {s:?} (control, command, alert, reconciliation, telemetry)")
            })
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// QUIC stream priority of job traffic (leases, results, updates) in both directions: below
/// control (4) and command (3), so a backlog of jobs never delays commands; level with
/// alerts, above reconciliation and telemetry.
pub const JOB_STREAM_PRIORITY: i32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Role {
    #[default]
    Agent,
    Controller,
    Worker,
}

impl Role {
    /// The role as configuration, credentials and events name it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Controller => "controller",
            Role::Worker => "worker",
        }
    }
}

/// Operation id given by a swarm's sequencer to control and command messages.
/// Ids start at 1 and increase by one per op; 0 means "no op id" (unordered classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct OpId(pub u64);

impl OpId {
    pub const NONE: OpId = OpId(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

/// Identity of one incarnation of a swarm's log. A log that is lost or recreated gets a new
/// epoch, so op ids of different epochs are never confused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

/// Session id chosen by the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub u64);

/// Where a reconnecting agent stands in one swarm (see the schema's `Resume`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    pub swarm: String,
    /// The ordered class (control or command) this point is for.
    pub class: Class,
    pub epoch: Epoch,
    pub last_applied: OpId,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Hello {
    pub protocol_version: u16,
    pub swarms: Vec<String>,
    pub agent_id: String,
    pub role: Role,
    pub client_name: String,
    pub client_version: String,
    pub resume: Vec<ResumePoint>,
    /// Registered for presence queries (free-form).
    pub metadata: String,
    /// The client can attach a bulk connection when the router offers one.
    pub bulk: bool,
    /// Set on a connection that attaches to an existing session as its bulk connection.
    pub attach: Option<Attach>,
    /// The session's credential (a compact JWT), at most [`crate::MAX_CREDENTIAL_BYTES`].
    pub credential: Option<Token>,
}

/// A credential as it travels: its `Debug` never shows it, so a logged Hello or message
/// leaks no token.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Token(pub String);

impl Token {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// Which session a bulk connection attaches to, and the token its Welcome gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attach {
    pub session: SessionId,
    pub token: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub max_subscriptions: u32,
    pub max_swarms_per_session: u32,
    /// Outbound queue capacity per class in frames, indexed by [`Class::index`].
    pub queue_frames: Vec<u32>,
    /// How often the client sends Heartbeat, and after how long without one the router
    /// declares the agent gone (0: the client's defaults).
    pub heartbeat_interval_ms: u32,
    pub heartbeat_timeout_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Welcome {
    pub session_id: SessionId,
    pub router_name: String,
    pub limits: Limits,
    /// The bulk connection offered to this session, if any.
    pub bulk: Option<BulkOffer>,
}

/// Where and how a session attaches its bulk connection: the router's bulk listener port
/// (on the address the session connected to) and the attach token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkOffer {
    pub port: u16,
    pub token: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMessage {
    /// Raw code; see [`crate::ErrorCode::from_u16`].
    pub code: u16,
    pub message: String,
    /// The request that failed, 0 for a session-level error.
    pub request_id: u64,
    /// When to try again (RateLimited); 0 = no advice.
    pub retry_after_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub request_id: u64,
    pub swarm: String,
    pub class: Class,
    /// Only messages published by this agent are delivered.
    pub agent_filter: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Non-zero asks for a PublishAck; ordered classes must set it.
    pub request_id: u64,
    pub swarm: String,
    pub class: Class,
    pub target_agent: Option<String>,
    pub key: Option<String>,
    pub payload: Bytes,
    /// A fencing token of lease `lease` ("leader" when unset); 0: none.
    pub fencing_token: u64,
    pub lease: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deliver {
    pub swarm: String,
    pub class: Class,
    pub op_id: OpId,
    /// Epoch of the swarm's log for ordered classes; `Epoch(0)` otherwise.
    pub epoch: Epoch,
    pub source_agent: String,
    pub target_agent: Option<String>,
    pub key: Option<String>,
    pub payload: Bytes,
    /// The publisher's fencing token and lease (0 / `None`: none).
    pub fencing_token: u64,
    pub lease: Option<String>,
    /// When the router took the publish, on its host's wall clock, in Unix microseconds
    /// (0: unknown).
    pub published_us: u64,
}

/// The answer to a DeltaRequest (see the schema).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeltaAck {
    pub request_id: u64,
    pub epoch: Epoch,
    pub first_op: OpId,
    pub last_op: OpId,
    pub count: u32,
    pub more: bool,
    pub compacted: bool,
}

/// Everything a worker node advertises (see the schema's `WorkerStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkerStatus {
    pub request_id: u64,
    pub node: String,
    pub zone: String,
    pub gpu_count: u32,
    pub gpu_model: String,
    pub gpu_memory_total: u64,
    pub gpu_memory_free: u64,
    /// Relative capacity; 0 means the GPU count (at least 1).
    pub weight: u32,
    pub models: Vec<String>,
    pub adapters: Vec<String>,
    pub in_flight: u32,
    pub draining: bool,
}

/// Where an affine session is pinned (see the schema's `SessionPinned`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SessionPinned {
    pub request_id: u64,
    pub session_key: String,
    pub node: String,
    pub node_id: u64,
    pub cold_load: bool,
    pub kept: bool,
}

/// A request for a worker (see the schema's `Request`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Request {
    pub request_id: u64,
    pub session_key: Option<String>,
    pub model: Option<String>,
    /// 0: the router's default.
    pub timeout_ms: u32,
    /// The requesting agent (set by the router on the way to the worker).
    pub source_agent: Option<String>,
    pub payload: Bytes,
}

/// A worker's answer to a Request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    pub request_id: u64,
    /// False: the worker failed the request; the payload says why.
    pub ok: bool,
    /// The node that answered (set by the router on the way to the requester).
    pub node: Option<String>,
    pub payload: Bytes,
}

/// One agent in a presence list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub agent: String,
    pub role: Role,
    /// Router clock (Unix ms) of its last heartbeat.
    pub last_seen_ms: u64,
    pub metadata: String,
}

/// What a LeaseRequest asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LeaseAction {
    #[default]
    Acquire,
    Renew,
    Release,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LeaseRequest {
    pub request_id: u64,
    pub swarm: String,
    pub name: String,
    pub action: LeaseAction,
    /// The token held (renew, release).
    pub token: u64,
    pub ttl_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LeaseGrant {
    pub request_id: u64,
    pub swarm: String,
    pub name: String,
    pub holder: String,
    pub token: u64,
    /// Router clock, Unix ms.
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A safety action's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SafetyKind {
    #[default]
    Pause,
    Resume,
    Stop,
    Drain,
    Undrain,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SafetyAction {
    pub request_id: u64,
    pub kind: SafetyKind,
    pub swarm: String,
    pub target: String,
    pub duration_ms: u64,
}

/// A job's id, given by the router (ids start at 1 and are never reused by one router's log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct JobId(pub u64);

/// Where a job stands (see the schema's `JobState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum JobState {
    #[default]
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    DeadLettered,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::DeadLettered,
    ];

    pub fn from_u8(value: u8) -> Option<JobState> {
        JobState::ALL.get(value as usize).copied()
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether the job has ended (a dead-lettered job may still be re-driven).
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::DeadLettered => "dead_lettered",
        }
    }
}

/// A job for a swarm's workers (see the schema's `SubmitJob`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SubmitJob {
    pub request_id: u64,
    pub swarm: String,
    pub idempotency_key: String,
    pub model: Option<String>,
    /// Higher runs first within the swarm.
    pub priority: u8,
    /// The job must start within this many ms of submission; 0: no deadline.
    pub deadline_ms: u64,
    /// 0: the router's default.
    pub max_attempts: u32,
    pub payload: Bytes,
}

/// The router's answer about one job (see the schema's `JobStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobStatus {
    pub request_id: u64,
    pub job_id: JobId,
    pub state: JobState,
    pub attempt: u32,
    pub duplicate: bool,
}

/// One attempt of a job, leased to a worker (see the schema's `JobLease`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobLease {
    pub job_id: JobId,
    pub attempt: u32,
    pub swarm: String,
    pub model: Option<String>,
    pub submitter: String,
    pub priority: u8,
    pub lease_ms: u32,
    pub payload: Bytes,
}

/// A worker's heartbeat, with progress for the submitter when the payload is not empty.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobProgress {
    pub job_id: JobId,
    pub attempt: u32,
    pub payload: Bytes,
}

/// A worker's outcome of one attempt (see the schema's `JobResult`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobResult {
    pub request_id: u64,
    pub job_id: JobId,
    pub attempt: u32,
    pub ok: bool,
    pub retry: bool,
    pub payload: Bytes,
}

/// Progress or the end of a job, for its submitter (see the schema's `JobUpdate`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct JobUpdate {
    pub job_id: JobId,
    pub swarm: String,
    pub idempotency_key: String,
    /// Running for progress; a final state for the job's end.
    pub state: JobState,
    pub attempt: u32,
    pub reason: String,
    pub payload: Bytes,
}

/// One entry of a swarm's dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeadLetter {
    pub job_id: JobId,
    pub attempts: u32,
    pub idempotency_key: String,
    pub reason: String,
}

/// A page of a swarm's dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeadLetters {
    pub request_id: u64,
    pub jobs: Vec<DeadLetter>,
    pub more: bool,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Error(ErrorMessage),
    Subscribe(Subscription),
    Unsubscribe(Subscription),
    SubscribeAck {
        request_id: u64,
    },
    Publish(Publish),
    PublishAck {
        request_id: u64,
        op_id: OpId,
        epoch: Epoch,
    },
    Deliver(Deliver),
    Ack {
        swarm: String,
        class: Class,
        op_id: OpId,
    },
    EpochChanged {
        swarm: String,
        epoch: Epoch,
        previous_epoch: Epoch,
    },
    DeltaRequest {
        request_id: u64,
        swarm: String,
        from_op: OpId,
        to_op: OpId,
    },
    DeltaAck(DeltaAck),
    WorkerStatus(WorkerStatus),
    WorkerAck {
        request_id: u64,
        node_id: u64,
    },
    OpenSession {
        request_id: u64,
        session_key: String,
        model: Option<String>,
    },
    SessionPinned(SessionPinned),
    CloseSession {
        request_id: u64,
        session_key: String,
    },
    Request(Request),
    Reply(Reply),
    Heartbeat {
        sent_at_ms: u64,
    },
    PresenceQuery {
        request_id: u64,
        swarm: String,
    },
    PresenceList {
        request_id: u64,
        swarm: String,
        members: Vec<Member>,
    },
    LeaseRequest(LeaseRequest),
    LeaseGrant(LeaseGrant),
    SafetyAction(SafetyAction),
    SubmitJob(SubmitJob),
    JobStatus(JobStatus),
    JobCredits {
        credits: u32,
    },
    JobLease(JobLease),
    JobProgress(JobProgress),
    JobResult(JobResult),
    /// Client -> router: cancel (request_id set); router -> worker: stop the attempt.
    JobCancel {
        request_id: u64,
        job_id: JobId,
        attempt: u32,
    },
    JobUpdate(JobUpdate),
    /// The end of `job_id` with `attempt` and `state` (those of its JobUpdate) was
    /// handled; `state` Queued: whatever end the job has.
    JobAck {
        job_id: JobId,
        attempt: u32,
        state: JobState,
    },
    ListDeadLetters {
        request_id: u64,
        swarm: String,
        after_job_id: JobId,
        limit: u32,
    },
    DeadLetters(DeadLetters),
    RedriveJob {
        request_id: u64,
        swarm: String,
        job_id: JobId,
    },
    /// Client -> router: a fresh credential for the session, before the current one
    /// expires (at most [`crate::MAX_CREDENTIAL_BYTES`]).
    Authenticate {
        request_id: u64,
        credential: Token,
    },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Error(_) => "Error",
            Message::Subscribe(_) => "Subscribe",
            Message::Unsubscribe(_) => "Unsubscribe",
            Message::SubscribeAck { .. } => "SubscribeAck",
            Message::Publish(_) => "Publish",
            Message::PublishAck { .. } => "PublishAck",
            Message::Deliver(_) => "Deliver",
            Message::Ack { .. } => "Ack",
            Message::EpochChanged { .. } => "EpochChanged",
            Message::DeltaRequest { .. } => "DeltaRequest",
            Message::DeltaAck(_) => "DeltaAck",
            Message::WorkerStatus(_) => "WorkerStatus",
            Message::WorkerAck { .. } => "WorkerAck",
            Message::OpenSession { .. } => "OpenSession",
            Message::SessionPinned(_) => "SessionPinned",
            Message::CloseSession { .. } => "CloseSession",
            Message::Request(_) => "Request",
            Message::Reply(_) => "Reply",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::PresenceQuery { .. } => "PresenceQuery",
            Message::PresenceList { .. } => "PresenceList",
            Message::LeaseRequest(_) => "LeaseRequest",
            Message::LeaseGrant(_) => "LeaseGrant",
            Message::SafetyAction(_) => "SafetyAction",
            Message::SubmitJob(_) => "SubmitJob",
            Message::JobStatus(_) => "JobStatus",
            Message::JobCredits { .. } => "JobCredits",
            Message::JobLease(_) => "JobLease",
            Message::JobProgress(_) => "JobProgress",
            Message::JobResult(_) => "JobResult",
            Message::JobCancel { .. } => "JobCancel",
            Message::JobUpdate(_) => "JobUpdate",
            Message::JobAck { .. } => "JobAck",
            Message::ListDeadLetters { .. } => "ListDeadLetters",
            Message::DeadLetters(_) => "DeadLetters",
            Message::RedriveJob { .. } => "RedriveJob",
            Message::Authenticate { .. } => "Authenticate",
        }
    }
}
