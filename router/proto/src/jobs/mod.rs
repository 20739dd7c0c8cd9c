//! The async job queue: durable jobs, leases to workers, retries with backoff and jitter,
//! dead letters, and results that reach their submitter.
//!
//! A job lives in the router's own event log, in one internal swarm per user swarm
//! ([`log_swarm`], names starting with `$` are reserved), as three records per job, each
//! compacted to its latest version:
//! - `s<id>` the spec (swarm, idempotency key, model, priority, deadline, attempts, payload),
//!   written once when the job is submitted, before the submitter is answered; emptied once
//!   the submitter acknowledged the job's end;
//! - `l<id>` the latest attempt leased (written without waiting: an attempt lost to a crash
//!   is simply run again); emptied with the spec;
//! - `j<id>` the job's end (completed, failed, cancelled, dead-lettered, with the result),
//!   its re-drive, or the submitter's acknowledgement (which keeps only the idempotency key
//!   and state, for deduplication); emptied once the key leaves the dedup window. Ends are
//!   durable before anyone hears of them. Lease and end records use different keys, so
//!   their order in the log never matters.
//!
//! Compaction drops empty records, so an acknowledged job leaves the log entirely; `n` +
//! 16 zeros holds the next job id, written before the first end of a log is emptied, so
//! ids never go back after a restart.
//!
//! [`Jobs`] is sans-IO: every method takes `now` (milliseconds on the router's clock) and
//! returns [`Effects<H>`]: frames to push, records to append, and job ends to make durable
//! before [`Jobs::finals_written`] releases their notifications. Call order for a driver:
//! `connect` when a session is established, then any of `submit` (then `submitted` once the
//! spec is durable), `credits`, `progress`, `result`, `cancel`, `ack`, `dead_letters`,
//! `redrive`, with `tick` every few milliseconds (lease expiry, backoff, deadlines), and
//! `disconnect` when the connection ends. Backoff jitter comes from a seeded generator.
//!
//! Layout: this file holds the configuration, the state and what calls return;
//! `records` the log records; `restore` the start from them; `queue` submits, credits and
//! dispatch; `ends` results, cancels, retries, dead letters, acknowledgements and the tick.
//!
//! Dispatch: each swarm has a ready queue ordered by priority (then submission order);
//! swarms with ready jobs take turns by deficit round robin, each turn worth its weight in
//! jobs. A job goes to a worker session (role worker, joined to the swarm) with a free
//! credit, preferring workers whose node has the job's model loaded (from its
//! `WorkerStatus`), then the least loaded (leases per credit).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use swarmbus_affinity::hash::key_hash;
use swarmbus_schema::{
    encode, DeadLetter, DeadLetters, ErrorCode, JobId, JobLease, JobProgress, JobResult, JobState,
    JobStatus, JobUpdate, Message, OpId, OutFrame, SubmitJob,
};

use crate::conn::ConnId;
use crate::conn::{Handle, Lane};
use crate::refusal::Refusal;

mod ends;
mod queue;
mod records;
mod restore;

use ends::*;
pub use records::{EndKind, EndRecord, JobRecord, JobSpec};

/// Prefix of the internal swarms holding job records.
pub const JOBS_SWARM_PREFIX: &str = "$jobs.";

/// Most jobs one `dispatch` pass leases (the rest wait for the next tick).
const DISPATCH_BUDGET: usize = 4096;
/// Room a job record needs besides the payload (its names and fields), so that the record
/// and every frame carrying the payload fit the frame limit.
pub const JOB_RECORD_OVERHEAD_BYTES: usize = 2048;
/// Most dead letters one listing returns.
pub const MAX_DEAD_LETTERS_PAGE: u32 = 256;

/// The internal swarm that holds the records of `swarm`'s jobs (one per user swarm, so the
/// writes of different swarms spread over the shards).
pub fn log_swarm(swarm: &str) -> String {
    hex_tagged(JOBS_SWARM_PREFIX, key_hash(swarm))
}

/// `prefix` then `value` as exactly 16 lower-case hex digits: what
/// `format!("{prefix}{value:016x}")` makes, without the formatting machinery, which was
/// a few percent of the router's CPU per job (six records per job, each with such a key
/// and its log's name).
pub(crate) fn hex_tagged(prefix: &str, value: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(prefix.len() + 16);
    out.push_str(prefix);
    for shift in (0..16).rev() {
        out.push(char::from(DIGITS[((value >> (shift * 4)) & 0xf) as usize]));
    }
    out
}

#[cfg(test)]
#[test]
fn hex_tagged_is_format_016x() {
    let mut value = 0x9e37_79b9_7f4a_7c15u64;
    for special in [0, 1, 0xf, 0x10, u64::MAX, 1 << 63] {
        assert_eq!(hex_tagged("s", special), format!("s{special:016x}"));
    }
    for _ in 0..10_000 {
        value = value
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        assert_eq!(hex_tagged("$jobs.", value), format!("$jobs.{value:016x}"));
    }
}

/// `[jobs]`: the job queue's settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs the router holds per swarm (queued, running, waiting to retry, dead-lettered,
    /// or ended but not yet acknowledged by the submitter); a submit past it is refused
    /// with Busy.
    pub max_jobs_per_swarm: usize,
    /// The `retry_after_ms` of that Busy.
    pub busy_retry_after_ms: u32,
    /// Bytes the router's jobs may hold in memory (payloads, results, progress, and 256
    /// bytes of bookkeeping per job), all swarms together; a submit past it is refused with
    /// Busy.
    pub max_bytes: u64,
    /// The same for the jobs of one submitting agent.
    pub max_bytes_per_agent: u64,
    /// Bytes of job payloads kept in memory once their specs are durable; past it a
    /// payload is read back from the job log when its job is leased.
    pub payload_cache_bytes: u64,
    /// Swarms whose job logs (`$jobs.*`) the router keeps: every swarm that ever had a job
    /// on this data directory (job logs are compacted, never removed). A submit to one
    /// more swarm is refused with Busy.
    pub max_swarms: usize,
    /// A submit with an idempotency key seen within this window returns the earlier job.
    pub dedup_window_ms: u64,
    /// Idempotency keys remembered router-wide; past it the oldest are forgotten first.
    pub max_dedup_keys: usize,
    /// How long a lease lasts without a heartbeat (JobProgress) from its worker.
    pub visibility_timeout_ms: u32,
    /// The first retry waits up to this long (full jitter); the bound doubles per attempt.
    pub backoff_base_ms: u64,
    /// The retry wait's bound never grows past this.
    pub backoff_cap_ms: u64,
    /// Attempts of a job that does not say (SubmitJob max_attempts 0).
    pub max_attempts: u32,
    /// The most attempts a job may ask for.
    pub max_attempts_limit: u32,
    /// Deficit round robin weight of swarms not in `swarm_weights`.
    pub default_weight: u32,
    /// Weight per swarm: a swarm of weight 2 gets twice the dispatches of one of weight 1
    /// while both have jobs waiting.
    pub swarm_weights: HashMap<String, u32>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            max_jobs_per_swarm: 100_000,
            busy_retry_after_ms: 100,
            max_bytes: 1 << 30,
            max_bytes_per_agent: 256 << 20,
            payload_cache_bytes: 256 << 20,
            max_swarms: 10_000,
            dedup_window_ms: 600_000,
            max_dedup_keys: 1_000_000,
            visibility_timeout_ms: 30_000,
            backoff_base_ms: 100,
            backoff_cap_ms: 30_000,
            max_attempts: 5,
            max_attempts_limit: 100,
            default_weight: 1,
            swarm_weights: HashMap::new(),
        }
    }
}

impl JobsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_jobs_per_swarm == 0
            || self.max_bytes == 0
            || self.max_bytes_per_agent == 0
            || self.max_swarms == 0
            || self.visibility_timeout_ms == 0
            || self.max_attempts == 0
            || self.max_attempts_limit < self.max_attempts
            || self.default_weight == 0
            || self.backoff_cap_ms < self.backoff_base_ms
        {
            return Err(
                "jobs: max_jobs_per_swarm, max_bytes, max_bytes_per_agent, max_swarms, \
                        visibility_timeout_ms, max_attempts and default_weight must be at \
                        least 1, max_attempts_limit at least \
                        max_attempts, backoff_cap_ms at least backoff_base_ms"
                    .into(),
            );
        }
        if let Some((swarm, _)) = self.swarm_weights.iter().find(|(_, w)| **w == 0) {
            return Err(format!("jobs.swarm_weights.{swarm:?} must be at least 1"));
        }
        Ok(())
    }

    fn weight(&self, swarm: &str) -> u32 {
        self.swarm_weights
            .get(swarm)
            .copied()
            .unwrap_or(self.default_weight)
    }
}

/// Which end of a job a submitter acknowledged ([`Jobs::ack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckedEnd {
    /// The end with this attempt and state (those of the JobUpdate that told it).
    Of { attempt: u32, state: JobState },
    /// Whatever end the job has now (an ack that names none).
    Any,
}

impl AckedEnd {
    /// From a JobAck's fields: `Queued` (the field absent, as older clients send it) names
    /// no end; any other state names the end it is, and one that is not final (an ack of
    /// a progress update) matches no end.
    pub fn from_wire(attempt: u32, state: JobState) -> Self {
        if state == JobState::Queued {
            AckedEnd::Any
        } else {
            AckedEnd::Of { attempt, state }
        }
    }
}

/// What the driver does after a call: push `frames` now; append `records` to the log
/// without waiting; make `finals` durable, then call [`Jobs::finals_written`] with the
/// records written and push what it returns, then push `after_finals`.
#[derive(Debug)]
pub struct Effects<H> {
    pub frames: Vec<(H, Lane, OutFrame)>,
    pub records: Vec<JobRecord>,
    pub finals: Vec<JobRecord>,
    pub after_finals: Vec<(H, Lane, OutFrame)>,
    /// Leases whose payload is on disk only: read it back from the job log, then send.
    pub loads: Vec<PayloadLoad<H>>,
}

/// A lease to send once its job's payload is read back from the job log (the payload was
/// not kept in memory: `jobs.payload_cache_bytes`).
#[derive(Debug)]
pub struct PayloadLoad<H> {
    pub to: H,
    /// The job log (`$jobs.*`) and the op of the job's spec record in it.
    pub log: String,
    pub op: OpId,
    /// The lease, its payload empty.
    pub lease: JobLease,
}

impl<H> Default for Effects<H> {
    fn default() -> Self {
        Effects {
            frames: Vec::new(),
            records: Vec::new(),
            finals: Vec::new(),
            after_finals: Vec::new(),
            loads: Vec::new(),
        }
    }
}

impl<H> Effects<H> {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
            && self.records.is_empty()
            && self.finals.is_empty()
            && self.after_finals.is_empty()
            && self.loads.is_empty()
    }

    pub fn merge(&mut self, other: Effects<H>) {
        self.frames.extend(other.frames);
        self.records.extend(other.records);
        self.finals.extend(other.finals);
        self.after_finals.extend(other.after_finals);
        self.loads.extend(other.loads);
    }
}

/// What became of a submit.
#[derive(Debug)]
pub enum Submitted {
    /// A new job: write `record`, then call [`Jobs::submitted`].
    New { job_id: JobId, record: JobRecord },
    /// A duplicate whose answer is ready (push it on the session lane).
    Answer(OutFrame),
    /// A duplicate of a job not yet durable: answered by [`Jobs::submitted`].
    Waiting,
}

/// Counters for tests and the loadgen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub jobs: usize,
    pub queued: usize,
    pub running: usize,
    pub dead_lettered: usize,
    pub pending_results: usize,
    pub fenced_results: u64,
    pub leases: u64,
}

/// One job as the admin view lists it (see [`Jobs::list`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSummary {
    pub job_id: JobId,
    pub swarm: String,
    pub submitter: String,
    pub state: JobState,
    /// Attempts leased so far.
    pub attempt: u32,
    pub priority: u8,
    pub model: Option<String>,
    /// Router clock ms.
    pub submitted_ms: u64,
    /// When the running attempt's lease runs out (router clock ms), while one runs.
    pub lease_expires_ms: Option<u64>,
}

#[derive(Debug)]
struct Lease {
    worker: ConnId,
    expires_ms: u64,
    /// When it was leased (the attempt's run time ends at its result, loss or cancel).
    leased_ms: u64,
}

/// What the queue measured since it started: ready -> leased and leased -> the attempt's
/// end, in microseconds (the queue's clock counts milliseconds; up to a day, two
/// significant digits), and counts of attempts after a job's first and of jobs
/// dead-lettered.
#[derive(Debug, Clone)]
pub struct JobTimings {
    pub queue_wait_us: crate::core::LagHistogram,
    pub run_us: crate::core::LagHistogram,
    /// Leases of attempts after a job's first (retries, re-drives, lost leases).
    pub redeliveries: u64,
    pub dead_lettered: u64,
}

impl Default for JobTimings {
    fn default() -> Self {
        JobTimings {
            queue_wait_us: job_histogram(),
            run_us: job_histogram(),
            redeliveries: 0,
            dead_lettered: 0,
        }
    }
}

/// A histogram of job times: 1 µs to a day (jobs wait and run far longer than messages).
fn job_histogram() -> crate::core::LagHistogram {
    crate::core::LagHistogram::new_with_bounds(1, 86_400_000_000, 2)
        .expect("constant bounds are valid")
}

impl JobTimings {
    fn record(histogram: &mut crate::core::LagHistogram, from_ms: u64, to_ms: u64) {
        histogram.saturating_record(to_ms.saturating_sub(from_ms).saturating_mul(1000).max(1));
    }
}

#[derive(Debug)]
struct Job<H> {
    spec: Arc<JobSpec>,
    state: JobState,
    attempt: u32,
    budget_base: u32,
    lease: Option<Lease>,
    /// When queued: not before this (backoff).
    ready_at_ms: u64,
    /// The spec is durable (the job may run and be reported).
    durable: bool,
    /// Submits answered once the spec is durable: (outbox, request id).
    waiters: Vec<(H, u64)>,
    /// The end's reason and result.
    reason: String,
    result: Bytes,
    /// The end is durable: it may be told and is resent until acknowledged.
    final_durable: bool,
    /// The latest progress of the running attempt (attempt, payload), resent to the
    /// submitter when it reconnects.
    progress: Option<(u32, Bytes)>,
    /// What this job is counted for against `max_bytes`, and against its submitter's
    /// `max_bytes_per_agent` (see [`Jobs::account`]).
    charged: u64,
    charged_agent: u64,
    /// The op of the job's spec record in its job log, once durable.
    spec_op: Option<OpId>,
    /// The payload was dropped from memory (`spec.payload` is empty): it is read back from
    /// the job log at `spec_op` for each lease.
    payload_on_disk: bool,
    /// The payload's length, in memory or not: the byte caps count it either way (they
    /// bound what the job queue holds, memory and disk).
    payload_len: usize,
}

impl<H> Job<H> {
    /// A job of `spec` queued at `now_ms`, first attempt not yet leased, its spec not yet
    /// durable, nothing charged yet.
    fn queued(spec: JobSpec, now_ms: u64) -> Self {
        let payload_len = spec.payload.len();
        Job {
            spec: Arc::new(spec),
            state: JobState::Queued,
            attempt: 0,
            budget_base: 0,
            lease: None,
            ready_at_ms: now_ms,
            durable: false,
            waiters: Vec::new(),
            reason: String::new(),
            result: Bytes::new(),
            final_durable: false,
            progress: None,
            charged: 0,
            charged_agent: 0,
            spec_op: None,
            payload_on_disk: false,
            payload_len,
        }
    }
}

/// Submits of one idempotency key that may wait for its job's spec to be durable; more
/// are refused with Busy (a client repeating a submit in a loop holds no more).
const MAX_WAITERS: usize = 1_024;

/// Bytes a job is counted for besides its payloads: its names and bookkeeping. So jobs
/// with empty payloads are bounded by the byte caps too.
const JOB_OVERHEAD_BYTES: u64 = 256;

/// What `job` holds in memory, as the byte caps count it.
fn job_bytes<H>(job: &Job<H>) -> u64 {
    let spec = &job.spec;
    let held = job.payload_len
        + spec.idempotency_key.len()
        + spec.swarm.len()
        + job.result.len()
        + job.reason.len()
        + job.progress.as_ref().map_or(0, |(_, p)| p.len());
    JOB_OVERHEAD_BYTES + held as u64
}

#[derive(Debug, Default)]
struct SwarmQueue {
    weight: u32,
    deficit: u64,
    /// In the round-robin list.
    active: bool,
    ready: BTreeSet<(Reverse<u8>, JobId)>,
    delayed: BTreeSet<(u64, JobId)>,
    /// Jobs held (counted against `max_jobs_per_swarm`).
    held: usize,
    dead: BTreeSet<JobId>,
    /// Idempotency key -> (job, submitted at, final state once the job was forgotten).
    dedup: HashMap<String, (JobId, u64, Option<JobState>)>,
}

#[derive(Debug)]
struct WorkerSlot<H> {
    outbox: H,
    swarms: HashSet<String>,
    credits: u32,
    leases: HashSet<JobId>,
    models: Vec<String>,
    /// Its node is draining (by itself or a controller): no new leases; current ones finish.
    draining: bool,
}

#[derive(Debug)]
struct SessionEntry<H> {
    agent: Arc<str>,
    outbox: H,
}

/// The job queue's state (see the module doc for the call order).
#[derive(Debug)]
pub struct Jobs<H> {
    config: JobsConfig,
    jobs: HashMap<JobId, Job<H>>,
    swarms: HashMap<String, SwarmQueue>,
    /// Swarms with ready jobs, in round-robin order.
    round: VecDeque<String>,
    workers: HashMap<ConnId, WorkerSlot<H>>,
    sessions: HashMap<ConnId, SessionEntry<H>>,
    /// Agent id -> its connected sessions.
    online: HashMap<Arc<str>, Vec<ConnId>>,
    /// Agent id -> ended jobs whose end it has not acknowledged.
    pending: HashMap<Arc<str>, BTreeSet<JobId>>,
    leases: BTreeSet<(u64, JobId, u32)>,
    deadlines: BTreeSet<(u64, JobId)>,
    /// Idempotency keys in submission order: (submitted at, swarm, key, job).
    dedup_order: VecDeque<(u64, String, String, JobId)>,
    next_job: u64,
    rng: u64,
    fenced_results: u64,
    leases_made: u64,
    timings: JobTimings,
    /// Bytes counted for all jobs, and per submitter (see [`Jobs::account`]).
    bytes_held: u64,
    bytes_by_agent: HashMap<String, u64>,
    /// The job logs that exist (see [`JobsConfig::max_swarms`]).
    logs: HashSet<String>,
    /// Acknowledged jobs whose keys left the dedup window: their end records are to be
    /// emptied (by the next [`Jobs::tick`]).
    forgotten: Vec<(String, JobId)>,
    /// Payload bytes kept in memory of jobs whose specs are durable.
    cached_payload_bytes: u64,
}

#[cfg(test)]
mod tests;
