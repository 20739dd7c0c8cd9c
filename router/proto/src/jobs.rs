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
//! Dispatch: each swarm has a ready queue ordered by priority (then submission order);
//! swarms with ready jobs take turns by deficit round robin, each turn worth its weight in
//! jobs. A job goes to a worker session (role worker, joined to the swarm) with a free
//! credit, preferring workers whose node has the job's model loaded (from its
//! `WorkerStatus`), then the least loaded (leases per credit).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;
use swarmbus_affinity::hash::key_hash;
use swarmbus_schema::{
    encode, DeadLetter, DeadLetters, ErrorCode, JobId, JobLease, JobProgress, JobResult, JobState,
    JobStatus, JobUpdate, Message, OpId, OutFrame, SubmitJob,
};

use crate::conn::ConnId;
use crate::conn::{Handle, Lane};
use crate::refusal::Refusal;

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
    format!("{JOBS_SWARM_PREFIX}{:016x}", key_hash(swarm))
}

/// `[jobs]`: the job queue's settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
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

/// What a job asks for, as written at submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub job_id: JobId,
    pub swarm: String,
    pub idempotency_key: String,
    pub model: Option<String>,
    pub submitter: String,
    pub priority: u8,
    /// Router clock ms by which the job must have started; 0: none.
    pub deadline_ms: u64,
    pub max_attempts: u32,
    pub submitted_ms: u64,
    pub payload: Bytes,
}

/// How a job's `j` record says it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// A final state (completed, failed, cancelled, dead-lettered).
    Ended(JobState),
    /// Re-driven out of the dead-letter queue: queued again with a fresh attempt budget.
    Redriven,
    /// The submitter acknowledged the end; only the dedup entry remains.
    Acknowledged(JobState),
}

/// The `j` record of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndRecord {
    pub job_id: JobId,
    pub swarm: String,
    pub idempotency_key: String,
    pub kind: EndKind,
    pub attempt: u32,
    /// Attempts made before the latest re-drive (the budget counts from here).
    pub budget_base: u32,
    pub submitted_ms: u64,
    pub reason: String,
    pub payload: Bytes,
}

/// One record of the job log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobRecord {
    Spec(JobSpec),
    /// Attempt `attempt` was leased.
    Lease {
        swarm: String,
        job_id: JobId,
        attempt: u32,
    },
    End(EndRecord),
    /// The spec is no longer needed (empty `s` record).
    Forget {
        swarm: String,
        job_id: JobId,
    },
    /// The job's lease record is no longer needed (empty `l` record): written when its
    /// submitter acknowledges the end.
    ForgetLease {
        swarm: String,
        job_id: JobId,
    },
    /// The job's end is no longer needed (empty `j` record): written once its
    /// idempotency key is past the dedup window. Compaction then drops all of the job.
    ForgetEnd {
        swarm: String,
        job_id: JobId,
    },
    /// Job ids below `next` were given out (key `n` + 16 zeros, compacted to the latest):
    /// once a job's records are all gone, the ids still never go back.
    NextJob {
        swarm: String,
        next: JobId,
    },
}

fn put_str(out: &mut BytesMut, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.put_u16(len as u16);
    out.put_slice(&s.as_bytes()[..len]);
}

fn get_str(input: &mut &[u8]) -> Option<String> {
    if input.remaining() < 2 {
        return None;
    }
    let len = input.get_u16() as usize;
    if input.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&input[..len]).ok()?.to_owned();
    input.advance(len);
    Some(s)
}

fn get_u8(input: &mut &[u8]) -> Option<u8> {
    (input.remaining() >= 1).then(|| input.get_u8())
}
fn get_u32(input: &mut &[u8]) -> Option<u32> {
    (input.remaining() >= 4).then(|| input.get_u32())
}
fn get_u64(input: &mut &[u8]) -> Option<u64> {
    (input.remaining() >= 8).then(|| input.get_u64())
}

const RECORD_VERSION: u8 = 1;

impl JobRecord {
    pub fn job_id(&self) -> JobId {
        match self {
            JobRecord::Spec(spec) => spec.job_id,
            JobRecord::Lease { job_id, .. }
            | JobRecord::Forget { job_id, .. }
            | JobRecord::ForgetLease { job_id, .. }
            | JobRecord::ForgetEnd { job_id, .. } => *job_id,
            JobRecord::End(end) => end.job_id,
            JobRecord::NextJob { .. } => JobId(0),
        }
    }

    /// The user swarm the job belongs to.
    pub fn swarm(&self) -> &str {
        match self {
            JobRecord::Spec(spec) => &spec.swarm,
            JobRecord::Lease { swarm, .. }
            | JobRecord::Forget { swarm, .. }
            | JobRecord::ForgetLease { swarm, .. }
            | JobRecord::ForgetEnd { swarm, .. }
            | JobRecord::NextJob { swarm, .. } => swarm,
            JobRecord::End(end) => &end.swarm,
        }
    }

    /// The record's key in the log (compaction keeps the latest per key).
    pub fn key(&self) -> String {
        let id = self.job_id().0;
        match self {
            JobRecord::Spec(_) | JobRecord::Forget { .. } => format!("s{id:016x}"),
            JobRecord::Lease { .. } | JobRecord::ForgetLease { .. } => format!("l{id:016x}"),
            JobRecord::End(_) | JobRecord::ForgetEnd { .. } => format!("j{id:016x}"),
            JobRecord::NextJob { .. } => format!("n{:016x}", 0),
        }
    }

    pub fn payload(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            JobRecord::Forget { .. }
            | JobRecord::ForgetLease { .. }
            | JobRecord::ForgetEnd { .. } => return Bytes::new(),
            JobRecord::NextJob { next, .. } => {
                out.put_u8(RECORD_VERSION);
                out.put_u64(next.0);
            }
            JobRecord::Spec(spec) => {
                out.reserve(64 + spec.payload.len());
                out.put_u8(RECORD_VERSION);
                out.put_u64(spec.job_id.0);
                put_str(&mut out, &spec.swarm);
                put_str(&mut out, &spec.idempotency_key);
                put_str(&mut out, spec.model.as_deref().unwrap_or_default());
                put_str(&mut out, &spec.submitter);
                out.put_u8(spec.priority);
                out.put_u64(spec.deadline_ms);
                out.put_u32(spec.max_attempts);
                out.put_u64(spec.submitted_ms);
                out.put_slice(&spec.payload);
            }
            JobRecord::Lease {
                swarm,
                job_id,
                attempt,
            } => {
                out.put_u8(RECORD_VERSION);
                out.put_u64(job_id.0);
                put_str(&mut out, swarm);
                out.put_u32(*attempt);
            }
            JobRecord::End(end) => {
                out.reserve(64 + end.payload.len());
                out.put_u8(RECORD_VERSION);
                out.put_u64(end.job_id.0);
                put_str(&mut out, &end.swarm);
                put_str(&mut out, &end.idempotency_key);
                let (tag, state) = match end.kind {
                    EndKind::Ended(state) => (0u8, state),
                    EndKind::Redriven => (1, JobState::Queued),
                    EndKind::Acknowledged(state) => (2, state),
                };
                out.put_u8(tag);
                out.put_u8(state.as_u8());
                out.put_u32(end.attempt);
                out.put_u32(end.budget_base);
                out.put_u64(end.submitted_ms);
                put_str(&mut out, &end.reason);
                out.put_slice(&end.payload);
            }
        }
        out.freeze()
    }

    /// Reads a record back from its key and payload (`None` for a malformed one).
    pub fn parse(key: &str, payload: &Bytes) -> Option<JobRecord> {
        // `<kind><id:016x>`: one letter and exactly 16 hex digits, so no two records share
        // a key (the job's swarm is the log the record is in).
        let (kind, id) = key.split_at_checked(1)?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let key_id = JobId(u64::from_str_radix(id, 16).ok()?);
        if payload.is_empty() {
            let (swarm, job_id) = (String::new(), key_id);
            return match kind {
                "s" => Some(JobRecord::Forget { swarm, job_id }),
                "l" => Some(JobRecord::ForgetLease { swarm, job_id }),
                "j" => Some(JobRecord::ForgetEnd { swarm, job_id }),
                _ => None,
            };
        }
        let mut input: &[u8] = payload;
        if get_u8(&mut input)? != RECORD_VERSION {
            return None;
        }
        if kind == "n" {
            return (key_id == JobId(0)).then_some(()).and_then(|()| {
                Some(JobRecord::NextJob {
                    swarm: String::new(),
                    next: JobId(get_u64(&mut input)?),
                })
            });
        }
        let job_id = JobId(get_u64(&mut input)?);
        if job_id != key_id {
            return None;
        }
        let swarm = get_str(&mut input)?;
        let body_at = |input: &[u8]| payload.len() - input.len();
        match kind {
            "s" => {
                let idempotency_key = get_str(&mut input)?;
                let model = Some(get_str(&mut input)?).filter(|m| !m.is_empty());
                let submitter = get_str(&mut input)?;
                let priority = get_u8(&mut input)?;
                let deadline_ms = get_u64(&mut input)?;
                let max_attempts = get_u32(&mut input)?;
                let submitted_ms = get_u64(&mut input)?;
                Some(JobRecord::Spec(JobSpec {
                    job_id,
                    swarm,
                    idempotency_key,
                    model,
                    submitter,
                    priority,
                    deadline_ms,
                    max_attempts,
                    submitted_ms,
                    payload: payload.slice(body_at(input)..),
                }))
            }
            "l" => Some(JobRecord::Lease {
                swarm,
                job_id,
                attempt: get_u32(&mut input)?,
            }),
            "j" => {
                let idempotency_key = get_str(&mut input)?;
                let tag = get_u8(&mut input)?;
                let state = JobState::from_u8(get_u8(&mut input)?)?;
                let kind = match tag {
                    0 => EndKind::Ended(state),
                    1 => EndKind::Redriven,
                    2 => EndKind::Acknowledged(state),
                    _ => return None,
                };
                let attempt = get_u32(&mut input)?;
                let budget_base = get_u32(&mut input)?;
                let submitted_ms = get_u64(&mut input)?;
                let reason = get_str(&mut input)?;
                Some(JobRecord::End(EndRecord {
                    job_id,
                    swarm,
                    idempotency_key,
                    kind,
                    attempt,
                    budget_base,
                    submitted_ms,
                    reason,
                    payload: payload.slice(body_at(input)..),
                }))
            }
            _ => None,
        }
    }
}

/// What the driver does after a call: push `frames` now; append `records` to the log
/// without waiting; make `finals` durable, then call [`Jobs::finals_written`] with their
/// job ids and push what it returns, then push `after_finals`.
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

#[derive(Debug)]
struct Lease {
    worker: ConnId,
    expires_ms: u64,
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

impl<H: Handle + Clone> Jobs<H> {
    /// Starts from the records read back from the log (in log order per internal swarm).
    pub fn new(
        config: JobsConfig,
        records: impl IntoIterator<Item = JobRecord>,
        now_ms: u64,
        seed: u64,
    ) -> Self {
        let mut jobs = Jobs {
            config,
            jobs: HashMap::new(),
            swarms: HashMap::new(),
            round: VecDeque::new(),
            workers: HashMap::new(),
            sessions: HashMap::new(),
            online: HashMap::new(),
            pending: HashMap::new(),
            leases: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            dedup_order: VecDeque::new(),
            next_job: 1,
            rng: seed,
            fenced_results: 0,
            leases_made: 0,
            bytes_held: 0,
            bytes_by_agent: HashMap::new(),
            logs: HashSet::new(),
            forgotten: Vec::new(),
            cached_payload_bytes: 0,
        };
        jobs.restore(records, now_ms);
        jobs
    }

    fn restore(&mut self, records: impl IntoIterator<Item = JobRecord>, now_ms: u64) {
        struct Found {
            spec: Option<JobSpec>,
            attempt: u32,
            end: Option<EndRecord>,
        }
        let mut found: HashMap<JobId, Found> = HashMap::new();
        for record in records {
            if let JobRecord::NextJob { next, .. } = record {
                self.next_job = self.next_job.max(next.0);
                continue;
            }
            let id = record.job_id();
            self.next_job = self.next_job.max(id.0 + 1);
            let entry = found.entry(id).or_insert(Found {
                spec: None,
                attempt: 0,
                end: None,
            });
            match record {
                JobRecord::Spec(spec) => entry.spec = Some(spec),
                JobRecord::Forget { .. } => entry.spec = None,
                JobRecord::ForgetLease { .. } => {}
                // Only an acknowledged job is forgotten: nothing of it is to come back.
                JobRecord::ForgetEnd { .. } => {
                    entry.end = None;
                    entry.spec = None;
                }
                JobRecord::NextJob { .. } => {}
                JobRecord::Lease { attempt, .. } => entry.attempt = entry.attempt.max(attempt),
                JobRecord::End(end) => {
                    entry.attempt = entry.attempt.max(end.attempt);
                    entry.end = Some(end);
                }
            }
        }
        let mut ids: Vec<JobId> = found.keys().copied().collect();
        ids.sort();
        for id in ids {
            let Some(f) = found.remove(&id) else { continue };
            if let Some(EndRecord {
                kind: EndKind::Acknowledged(state),
                swarm,
                idempotency_key,
                submitted_ms,
                ..
            }) = &f.end
            {
                self.remember_key(swarm, idempotency_key, id, *submitted_ms, Some(*state));
                continue;
            }
            let Some(spec) = f.spec else { continue };
            let swarm = spec.swarm.clone();
            self.remember_key(&swarm, &spec.idempotency_key, id, spec.submitted_ms, None);
            let spec_len = spec.payload.len();
            let mut job = Job {
                spec: Arc::new(spec),
                state: JobState::Queued,
                attempt: f.attempt,
                budget_base: 0,
                lease: None,
                ready_at_ms: now_ms,
                durable: true,
                waiters: Vec::new(),
                reason: String::new(),
                result: Bytes::new(),
                final_durable: false,
                progress: None,
                charged: 0,
                charged_agent: 0,
                spec_op: None,
                payload_on_disk: false,
                payload_len: spec_len,
            };
            let submitter: Arc<str> = Arc::from(job.spec.submitter.as_str());
            match f.end {
                Some(end) if matches!(end.kind, EndKind::Ended(_)) => {
                    let EndKind::Ended(state) = end.kind else {
                        continue;
                    };
                    job.state = state;
                    job.budget_base = end.budget_base;
                    job.reason = end.reason;
                    job.result = end.payload;
                    job.final_durable = true;
                    let queue = self.queue(&swarm);
                    queue.held += 1;
                    if state == JobState::DeadLettered {
                        queue.dead.insert(id);
                    }
                    self.pending.entry(submitter).or_default().insert(id);
                    self.jobs.insert(id, job);
                    self.account(id);
                }
                other => {
                    if let Some(end) = other {
                        job.budget_base = end.budget_base;
                    }
                    self.queue(&swarm).held += 1;
                    if job.spec.deadline_ms > 0 {
                        self.deadlines.insert((job.spec.deadline_ms, id));
                    }
                    self.jobs.insert(id, job);
                    self.account(id);
                    self.make_ready(id, now_ms);
                }
            }
        }
    }

    /// The spec record of `job_id` is durable at op `op` of its job log. Its payload stays
    /// in memory while the payload cache has room, else it is dropped from memory and read
    /// back from the log for each lease.
    pub fn spec_written_at(&mut self, job_id: JobId, op: OpId) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if job.spec_op.is_some() {
            return;
        }
        job.spec_op = Some(op);
        let len = job.spec.payload.len() as u64;
        let runs_again = !job.state.is_final() || job.state == JobState::DeadLettered;
        if runs_again && self.cached_payload_bytes + len <= self.config.payload_cache_bytes {
            self.cached_payload_bytes += len;
            return;
        }
        let mut spec = (*job.spec).clone();
        spec.payload = Bytes::new();
        job.spec = Arc::new(spec);
        job.payload_on_disk = true;
        self.account(job_id);
    }

    /// The ops of the spec records read back at start, by job: the jobs restored get them
    /// (and their payloads leave memory past the payload cache, as at submit).
    pub fn restored_spec_ops(&mut self, ops: &HashMap<JobId, OpId>) {
        let mut ids: Vec<JobId> = self.jobs.keys().copied().collect();
        ids.sort();
        for id in ids {
            if let Some(op) = ops.get(&id) {
                self.spec_written_at(id, *op);
            }
        }
    }

    /// The job logs recovered at start (names of `$jobs.*` swarms): they count against
    /// `max_swarms`.
    pub fn logs_exist(&mut self, names: impl IntoIterator<Item = String>) {
        self.logs.extend(names);
    }

    fn queue(&mut self, swarm: &str) -> &mut SwarmQueue {
        if !self.swarms.contains_key(swarm) {
            let weight = self.config.weight(swarm);
            self.swarms.insert(
                swarm.to_owned(),
                SwarmQueue {
                    weight,
                    ..SwarmQueue::default()
                },
            );
        }
        self.swarms
            .get_mut(swarm)
            .expect("inserted just above when missing")
    }

    fn remember_key(
        &mut self,
        swarm: &str,
        key: &str,
        job: JobId,
        submitted_ms: u64,
        ended: Option<JobState>,
    ) {
        self.queue(swarm)
            .dedup
            .insert(key.to_owned(), (job, submitted_ms, ended));
        self.dedup_order
            .push_back((submitted_ms, swarm.to_owned(), key.to_owned(), job));
    }

    /// Forgets idempotency keys past the window, or past the cap (oldest first).
    fn prune_keys(&mut self, now_ms: u64) {
        while let Some((at, _, _, _)) = self.dedup_order.front() {
            let expired = now_ms.saturating_sub(*at) >= self.config.dedup_window_ms;
            if !expired && self.dedup_order.len() <= self.config.max_dedup_keys {
                break;
            }
            let Some((_, swarm, key, job)) = self.dedup_order.pop_front() else {
                break;
            };
            if let Some(queue) = self.swarms.get_mut(&swarm) {
                if let Some(entry) = queue.dedup.get(&key).filter(|entry| entry.0 == job) {
                    if entry.2.is_some() {
                        // Acknowledged: its end record only kept the key; now it may go.
                        self.forgotten.push((swarm.clone(), job));
                    }
                    queue.dedup.remove(&key);
                }
            }
        }
    }

    fn random(&mut self) -> u64 {
        // splitmix64, as the client's Backoff.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The wait before retry number `failures` (1 = after the first lost attempt): uniform
    /// in [0, min(cap, base x 2^(failures-1))] (full jitter).
    fn backoff_ms(&mut self, failures: u32) -> u64 {
        let exponent = failures.saturating_sub(1).min(31);
        let bound = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << exponent)
            .min(self.config.backoff_cap_ms);
        if bound == 0 {
            0
        } else {
            self.random() % (bound + 1)
        }
    }

    pub fn counts(&self) -> JobCounts {
        let mut counts = JobCounts {
            jobs: self.jobs.len(),
            fenced_results: self.fenced_results,
            leases: self.leases_made,
            pending_results: self.pending.values().map(BTreeSet::len).sum(),
            ..JobCounts::default()
        };
        for job in self.jobs.values() {
            match job.state {
                JobState::Queued => counts.queued += 1,
                JobState::Running => counts.running += 1,
                JobState::DeadLettered => counts.dead_lettered += 1,
                _ => {}
            }
        }
        counts
    }

    /// A session was established. Workers (role worker) may run jobs of `swarms`; every
    /// session gets the ends of its agent's jobs that it has not acknowledged.
    pub fn connect(
        &mut self,
        conn: ConnId,
        agent: &str,
        outbox: &H,
        worker_swarms: Option<&[String]>,
    ) -> Effects<H> {
        let agent: Arc<str> = Arc::from(agent);
        self.sessions.insert(
            conn,
            SessionEntry {
                agent: agent.clone(),
                outbox: outbox.clone(),
            },
        );
        self.online.entry(agent.clone()).or_default().push(conn);
        if let Some(swarms) = worker_swarms {
            self.workers.insert(
                conn,
                WorkerSlot {
                    outbox: outbox.clone(),
                    swarms: swarms.iter().cloned().collect(),
                    credits: 0,
                    leases: HashSet::new(),
                    models: Vec::new(),
                    draining: false,
                },
            );
        }
        let mut fx = Effects::default();
        let ids: Vec<JobId> = self
            .pending
            .get(&agent)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if let Some(job) = self.jobs.get(&id) {
                fx.frames.push((outbox.clone(), Lane::Jobs, end_frame(job)));
            }
        }
        // The latest progress of its jobs still running, which it may have missed.
        for job in self.jobs.values() {
            let current = job
                .progress
                .as_ref()
                .is_some_and(|(attempt, _)| *attempt == job.attempt);
            if current && job.state == JobState::Running && *job.spec.submitter == *agent {
                fx.frames
                    .push((outbox.clone(), Lane::Jobs, progress_frame(job)));
            }
        }
        fx
    }

    /// Whether a worker's node is draining: it gets no new leases while it is.
    pub fn worker_draining(&mut self, conn: ConnId, draining: bool) {
        if let Some(worker) = self.workers.get_mut(&conn) {
            worker.draining = draining;
        }
    }

    /// The models a worker's node has loaded (from its WorkerStatus).
    pub fn worker_models(&mut self, conn: ConnId, models: &[String]) {
        if let Some(worker) = self.workers.get_mut(&conn) {
            worker.models = models.to_vec();
        }
    }

    /// A worker says how many jobs it can run at once.
    pub fn credits(&mut self, conn: ConnId, credits: u32, now_ms: u64) -> Effects<H> {
        let mut fx = Effects::default();
        if let Some(worker) = self.workers.get_mut(&conn) {
            worker.credits = credits;
            self.dispatch(now_ms, &mut fx);
        }
        fx
    }

    /// A submit (the driver checked the session joined the swarm and the sizes).
    pub fn submit(
        &mut self,
        agent: &str,
        outbox: &H,
        submit: SubmitJob,
        now_ms: u64,
    ) -> Result<Submitted, Refusal> {
        self.prune_keys(now_ms);
        let existing = self
            .swarms
            .get(&submit.swarm)
            .and_then(|q| q.dedup.get(&submit.idempotency_key))
            .copied();
        if let Some((job_id, _, ended)) = existing {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                if !job.durable {
                    if job.waiters.len() >= MAX_WAITERS {
                        return Err(Refusal {
                            code: ErrorCode::Busy,
                            message: format!(
                                "{MAX_WAITERS} submits of this key wait for its job to be durable"
                            ),
                            retry_after_ms: self.config.busy_retry_after_ms,
                        });
                    }
                    job.waiters.push((outbox.clone(), submit.request_id));
                    return Ok(Submitted::Waiting);
                }
                return Ok(Submitted::Answer(status_frame(
                    submit.request_id,
                    job_id,
                    job.state,
                    job.attempt,
                    true,
                )));
            }
            let state = ended.unwrap_or(JobState::Completed);
            return Ok(Submitted::Answer(status_frame(
                submit.request_id,
                job_id,
                state,
                0,
                true,
            )));
        }
        let max_jobs = self.config.max_jobs_per_swarm;
        let retry_after_ms = self.config.busy_retry_after_ms;
        // Nothing is kept for a refused submit (no queue, no place among the job logs).
        let log = log_swarm(&submit.swarm);
        if !self.logs.contains(&log) && self.logs.len() >= self.config.max_swarms {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "the router keeps the job logs of {} swarms (jobs.max_swarms)",
                    self.logs.len()
                ),
                retry_after_ms,
            });
        }
        let held = self.swarms.get(&submit.swarm).map_or(0, |q| q.held);
        if held >= max_jobs {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "swarm {:?} holds {held} jobs (jobs.max_jobs_per_swarm)",
                    submit.swarm
                ),
                retry_after_ms,
            });
        }
        let asked_bytes = JOB_OVERHEAD_BYTES
            + (submit.payload.len() + submit.idempotency_key.len() + submit.swarm.len()) as u64;
        let agent_bytes = self.bytes_by_agent.get(agent).copied().unwrap_or_default();
        let over = if self.bytes_held + asked_bytes > self.config.max_bytes {
            Some(format!(
                "the router's jobs hold {} bytes (jobs.max_bytes = {})",
                self.bytes_held, self.config.max_bytes
            ))
        } else if agent_bytes + asked_bytes > self.config.max_bytes_per_agent {
            Some(format!(
                "this agent's jobs hold {agent_bytes} bytes (jobs.max_bytes_per_agent = {})",
                self.config.max_bytes_per_agent
            ))
        } else {
            None
        };
        if let Some(message) = over {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message,
                retry_after_ms,
            });
        }
        self.logs.insert(log);
        let queue = self.queue(&submit.swarm);
        queue.held += 1;
        let max_attempts = match submit.max_attempts {
            0 => self.config.max_attempts,
            asked => asked.min(self.config.max_attempts_limit),
        };
        let job_id = JobId(self.next_job);
        self.next_job += 1;
        let spec = JobSpec {
            job_id,
            swarm: submit.swarm,
            idempotency_key: submit.idempotency_key,
            model: submit.model,
            submitter: agent.to_owned(),
            priority: submit.priority,
            deadline_ms: if submit.deadline_ms == 0 {
                0
            } else {
                now_ms.saturating_add(submit.deadline_ms)
            },
            max_attempts,
            submitted_ms: now_ms,
            payload: submit.payload,
        };
        self.remember_key(&spec.swarm, &spec.idempotency_key, job_id, now_ms, None);
        let spec_len = spec.payload.len();
        let record = JobRecord::Spec(spec.clone());
        self.jobs.insert(
            job_id,
            Job {
                spec: Arc::new(spec),
                state: JobState::Queued,
                attempt: 0,
                budget_base: 0,
                lease: None,
                ready_at_ms: now_ms,
                durable: false,
                waiters: vec![(outbox.clone(), submit.request_id)],
                reason: String::new(),
                result: Bytes::new(),
                final_durable: false,
                progress: None,
                charged: 0,
                charged_agent: 0,
                spec_op: None,
                payload_on_disk: false,
                payload_len: spec_len,
            },
        );
        self.account(job_id);
        Ok(Submitted::New { job_id, record })
    }

    /// The spec of `job_id` was written (`Ok`) or could not be (`Err(why)`): answers the
    /// submits waiting for it and, when durable, queues the job.
    pub fn submitted(
        &mut self,
        job_id: JobId,
        written: Result<(), String>,
        now_ms: u64,
    ) -> Effects<H> {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        let waiters = std::mem::take(&mut job.waiters);
        match written {
            Ok(()) => {
                job.durable = true;
                for (index, (outbox, request_id)) in waiters.into_iter().enumerate() {
                    let frame = status_frame(request_id, job_id, JobState::Queued, 0, index > 0);
                    // Submits are answered on the job answer stream, beside the job stream.
                    fx.frames.push((outbox, Lane::JobAnswers, frame));
                }
                if job.spec.deadline_ms > 0 {
                    self.deadlines.insert((job.spec.deadline_ms, job_id));
                }
                self.make_ready(job_id, now_ms);
                self.dispatch(now_ms, &mut fx);
            }
            Err(why) => {
                let spec = job.spec.clone();
                self.drop_job(job_id);
                let queue = self.queue(&spec.swarm);
                queue.held = queue.held.saturating_sub(1);
                if queue
                    .dedup
                    .get(&spec.idempotency_key)
                    .is_some_and(|e| e.0 == job_id)
                {
                    queue.dedup.remove(&spec.idempotency_key);
                }
                for (outbox, request_id) in waiters {
                    let refusal = Refusal {
                        code: ErrorCode::SwarmUnavailable,
                        message: format!("the job could not be written to the log: {why}"),
                        retry_after_ms: 1_000,
                    };
                    fx.frames
                        .push((outbox, Lane::JobAnswers, refusal.frame(request_id)));
                }
            }
        }
        fx
    }

    /// Puts a queued job in its swarm's ready queue (or the delayed set while backing off).
    fn make_ready(&mut self, job_id: JobId, now_ms: u64) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let (swarm, priority, ready_at) =
            (job.spec.swarm.clone(), job.spec.priority, job.ready_at_ms);
        let delayed = ready_at > now_ms;
        let queue = self.queue(&swarm);
        if delayed {
            queue.delayed.insert((ready_at, job_id));
        } else {
            queue.ready.insert((Reverse(priority), job_id));
        }
        if !queue.active && !queue.ready.is_empty() {
            queue.active = true;
            self.round.push_back(swarm);
        }
    }

    fn remove_from_queue(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let (swarm, priority, ready_at) =
            (job.spec.swarm.clone(), job.spec.priority, job.ready_at_ms);
        if let Some(queue) = self.swarms.get_mut(&swarm) {
            queue.ready.remove(&(Reverse(priority), job_id));
            queue.delayed.remove(&(ready_at, job_id));
        }
        self.deadlines.remove(&(job.spec.deadline_ms, job_id));
    }

    /// Moves jobs whose backoff ended to their ready queues.
    fn promote(&mut self, now_ms: u64) {
        let mut due = Vec::new();
        for queue in self.swarms.values_mut() {
            while let Some(&(at, id)) = queue.delayed.first() {
                if at > now_ms {
                    break;
                }
                queue.delayed.pop_first();
                due.push(id);
            }
        }
        for id in due {
            if let Some(job) = self.jobs.get(&id) {
                let (swarm, priority) = (job.spec.swarm.clone(), job.spec.priority);
                let queue = self.queue(&swarm);
                queue.ready.insert((Reverse(priority), id));
                if !queue.active {
                    queue.active = true;
                    self.round.push_back(swarm);
                }
            }
        }
    }

    /// The worker for a job of `swarm` needing `model`: a worker of the swarm with a free
    /// credit, with the model loaded when one is, least loaded first (ties: lowest conn).
    fn pick_worker(&self, swarm: &str, model: Option<&str>) -> Option<ConnId> {
        let mut best: Option<(bool, u64, ConnId)> = None;
        for (conn, worker) in &self.workers {
            let held = worker.leases.len() as u32;
            if held >= worker.credits || worker.draining || !worker.swarms.contains(swarm) {
                continue;
            }
            let cold = model.is_some_and(|m| !worker.models.iter().any(|have| have == m));
            // Load as leases per credit, scaled to stay in integers.
            let load = (u64::from(held) << 20) / u64::from(worker.credits);
            let key = (cold, load, *conn);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|(_, _, conn)| conn)
    }

    /// Leases ready jobs to workers: deficit round robin over the swarms by weight, by
    /// priority within a swarm.
    fn dispatch(&mut self, now_ms: u64, fx: &mut Effects<H>) {
        self.promote(now_ms);
        let mut budget = DISPATCH_BUDGET;
        let mut stalled = 0;
        while budget > 0 && stalled < self.round.len() {
            let Some(swarm) = self.round.pop_front() else {
                break;
            };
            let Some(queue) = self.swarms.get_mut(&swarm) else {
                continue;
            };
            let weight = u64::from(queue.weight);
            queue.deficit = (queue.deficit + weight).min(weight);
            let mut leased = 0;
            while let Some(queue) = self.swarms.get_mut(&swarm) {
                if queue.deficit == 0 || budget == 0 {
                    break;
                }
                let Some(&(_, job_id)) = queue.ready.first() else {
                    break;
                };
                let Some(job) = self.jobs.get(&job_id) else {
                    queue.ready.pop_first();
                    continue;
                };
                if job.spec.deadline_ms > 0 && job.spec.deadline_ms <= now_ms {
                    queue.ready.pop_first();
                    self.dead_letter(job_id, "its deadline passed before it started", fx);
                    continue;
                }
                let model = job.spec.model.clone();
                let Some(conn) = self.pick_worker(&swarm, model.as_deref()) else {
                    break;
                };
                if let Some(queue) = self.swarms.get_mut(&swarm) {
                    queue.ready.pop_first();
                    queue.deficit -= 1;
                }
                self.lease(job_id, conn, now_ms, fx);
                leased += 1;
                budget -= 1;
            }
            let Some(queue) = self.swarms.get_mut(&swarm) else {
                continue;
            };
            if queue.ready.is_empty() {
                queue.active = false;
                queue.deficit = 0;
            } else {
                self.round.push_back(swarm);
            }
            stalled = if leased == 0 { stalled + 1 } else { 0 };
        }
    }

    fn lease(&mut self, job_id: JobId, conn: ConnId, now_ms: u64, fx: &mut Effects<H>) {
        let lease_ms = self.config.visibility_timeout_ms;
        let (Some(job), Some(worker)) = (self.jobs.get_mut(&job_id), self.workers.get_mut(&conn))
        else {
            return;
        };
        job.attempt += 1;
        job.state = JobState::Running;
        let expires_ms = now_ms + u64::from(lease_ms);
        job.lease = Some(Lease {
            worker: conn,
            expires_ms,
        });
        worker.leases.insert(job_id);
        self.leases.insert((expires_ms, job_id, job.attempt));
        self.deadlines.remove(&(job.spec.deadline_ms, job_id));
        self.leases_made += 1;
        let lease = JobLease {
            job_id,
            attempt: job.attempt,
            swarm: job.spec.swarm.clone(),
            model: job.spec.model.clone(),
            submitter: job.spec.submitter.clone(),
            priority: job.spec.priority,
            lease_ms,
            payload: job.spec.payload.clone(),
        };
        match (job.payload_on_disk, job.spec_op) {
            (true, Some(op)) => fx.loads.push(PayloadLoad {
                to: worker.outbox.clone(),
                log: log_swarm(&job.spec.swarm),
                op,
                lease,
            }),
            _ => {
                let frame = encode(&Message::JobLease(lease));
                fx.frames.push((worker.outbox.clone(), Lane::Jobs, frame));
            }
        }
        fx.records.push(JobRecord::Lease {
            swarm: job.spec.swarm.clone(),
            job_id,
            attempt: job.attempt,
        });
    }

    /// A lease that could not be sent (its payload could not be read back): the attempt
    /// ends now, as lost, with `why` (retried with backoff, dead-lettered with that reason
    /// once the attempts are used).
    pub fn lease_undeliverable(
        &mut self,
        conn: ConnId,
        job_id: JobId,
        attempt: u32,
        why: &str,
        now_ms: u64,
    ) -> Effects<H> {
        let mut fx = Effects::default();
        if self.holds_lease(conn, job_id, attempt) {
            self.lose_attempt(job_id, why, now_ms, &mut fx);
            self.dispatch(now_ms, &mut fx);
        }
        fx
    }

    /// Ends the current lease of a job (if any), freeing its worker's credit. Returns the
    /// worker's outbox.
    fn end_lease(&mut self, job_id: JobId) -> Option<H> {
        let job = self.jobs.get_mut(&job_id)?;
        let lease = job.lease.take()?;
        self.leases.remove(&(lease.expires_ms, job_id, job.attempt));
        let worker = self.workers.get_mut(&lease.worker)?;
        worker.leases.remove(&job_id);
        Some(worker.outbox.clone())
    }

    /// An attempt was lost (lease expired, worker gone, worker asked for a retry): the job
    /// is queued again after a backoff, or dead-lettered after its last attempt.
    fn lose_attempt(&mut self, job_id: JobId, why: &str, now_ms: u64, fx: &mut Effects<H>) {
        self.end_lease(job_id);
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let used = job.attempt.saturating_sub(job.budget_base);
        if used >= job.spec.max_attempts {
            let reason = format!("{why}; {used} attempts used");
            self.dead_letter(job_id, &reason, fx);
            return;
        }
        let wait = self.backoff_ms(used);
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.state = JobState::Queued;
            job.ready_at_ms = now_ms + wait;
            if job.spec.deadline_ms > 0 {
                self.deadlines.insert((job.spec.deadline_ms, job_id));
            }
        }
        self.make_ready(job_id, now_ms);
    }

    /// Ends a job in a final state; the end is written before anyone is told.
    fn finish(&mut self, job_id: JobId, state: JobState, reason: &str, result: Bytes) -> bool {
        self.remove_from_queue(job_id);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        job.state = state;
        job.reason = reason.to_owned();
        job.result = result;
        job.final_durable = false;
        if state != JobState::DeadLettered && !job.payload_on_disk {
            // It never runs again (only dead letters are re-driven): its payload leaves
            // memory, and the cache.
            if job.spec_op.is_some() {
                self.cached_payload_bytes -= job.spec.payload.len() as u64;
            }
            let mut spec = (*job.spec).clone();
            spec.payload = Bytes::new();
            job.spec = Arc::new(spec);
            job.payload_on_disk = true;
        }
        self.account(job_id);
        true
    }

    /// Counts what job `job_id` holds now against the byte caps (after it was inserted, or
    /// its state, result, reason or progress changed). A dead letter counts router-wide
    /// only: it stays until a controller re-drives it, which its submitter cannot do, so it
    /// must not use up the submitter's quota.
    fn account(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let now = job_bytes(job);
        let now_agent = if job.state == JobState::DeadLettered {
            0
        } else {
            now
        };
        let before = std::mem::replace(&mut job.charged, now);
        let before_agent = std::mem::replace(&mut job.charged_agent, now_agent);
        self.bytes_held = self.bytes_held - before + now;
        if before_agent == now_agent {
            return; // the common case (a heartbeat, a re-account): no lookup at all
        }
        let submitter = &job.spec.submitter;
        let agent = match self.bytes_by_agent.get_mut(submitter) {
            Some(agent) => agent,
            None => self.bytes_by_agent.entry(submitter.clone()).or_default(),
        };
        *agent = *agent - before_agent + now_agent;
        if *agent == 0 {
            self.bytes_by_agent.remove(submitter);
        }
    }

    /// Removes job `job_id` and gives back what it was counted for.
    fn drop_job(&mut self, job_id: JobId) -> Option<Job<H>> {
        let job = self.jobs.remove(&job_id)?;
        if job.spec_op.is_some() && !job.payload_on_disk {
            self.cached_payload_bytes -= job.spec.payload.len() as u64;
        }
        self.bytes_held -= job.charged;
        if let Some(agent) = self.bytes_by_agent.get_mut(&job.spec.submitter) {
            *agent -= job.charged_agent;
            if *agent == 0 {
                self.bytes_by_agent.remove(&job.spec.submitter);
            }
        }
        Some(job)
    }

    /// Bytes the jobs hold as the caps count them: all, and `agent`'s.
    pub fn bytes_held(&self, agent: &str) -> (u64, u64) {
        (
            self.bytes_held,
            self.bytes_by_agent.get(agent).copied().unwrap_or_default(),
        )
    }

    fn end_record(job: &Job<H>, kind: EndKind) -> JobRecord {
        JobRecord::End(EndRecord {
            job_id: job.spec.job_id,
            swarm: job.spec.swarm.clone(),
            idempotency_key: job.spec.idempotency_key.clone(),
            kind,
            attempt: job.attempt,
            budget_base: job.budget_base,
            submitted_ms: job.spec.submitted_ms,
            reason: job.reason.clone(),
            payload: job.result.clone(),
        })
    }

    fn dead_letter(&mut self, job_id: JobId, reason: &str, fx: &mut Effects<H>) {
        if !self.finish(job_id, JobState::DeadLettered, reason, Bytes::new()) {
            return;
        }
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        fx.finals.push(Self::end_record(
            job,
            EndKind::Ended(JobState::DeadLettered),
        ));
        let swarm = job.spec.swarm.clone();
        self.queue(&swarm).dead.insert(job_id);
    }

    /// The end records of `job_ids` still to be made durable (jobs that are still ended
    /// and not yet durable; a job re-driven or forgotten meanwhile needs none).
    pub fn unwritten_finals(&self, job_ids: &[JobId]) -> Vec<JobRecord> {
        job_ids
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|job| job.state.is_final() && !job.final_durable)
            .map(|job| Self::end_record(job, EndKind::Ended(job.state)))
            .collect()
    }

    /// The ends in `job_ids` are durable: their submitters are told (and told again on
    /// every reconnect until they acknowledge).
    pub fn finals_written(&mut self, job_ids: &[JobId]) -> Effects<H> {
        let mut fx = Effects::default();
        for id in job_ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            if !job.state.is_final() {
                continue; // re-driven meanwhile
            }
            job.final_durable = true;
            let submitter: Arc<str> = Arc::from(job.spec.submitter.as_str());
            let frame = end_frame(job);
            for conn in self.online.get(&submitter).into_iter().flatten() {
                if let Some(session) = self.sessions.get(conn) {
                    fx.frames
                        .push((session.outbox.clone(), Lane::Jobs, frame.clone()));
                }
            }
            self.pending.entry(submitter).or_default().insert(*id);
        }
        fx
    }

    /// Checks that `conn` holds the current lease of attempt `attempt` of `job_id`.
    pub fn holds_lease(&self, conn: ConnId, job_id: JobId, attempt: u32) -> bool {
        self.jobs.get(&job_id).is_some_and(|job| {
            job.attempt == attempt
                && job.state == JobState::Running
                && job.lease.as_ref().is_some_and(|l| l.worker == conn)
        })
    }

    /// A worker's heartbeat (with progress when the payload is not empty). A heartbeat for
    /// a fenced attempt is answered with a JobCancel: the worker should stop.
    pub fn progress(&mut self, conn: ConnId, progress: JobProgress, now_ms: u64) -> Effects<H> {
        let mut fx = Effects::default();
        let JobProgress {
            job_id,
            attempt,
            payload,
        } = progress;
        if !self.holds_lease(conn, job_id, attempt) {
            if let Some(worker) = self.workers.get(&conn) {
                fx.frames.push((
                    worker.outbox.clone(),
                    Lane::Jobs,
                    cancel_frame(job_id, attempt),
                ));
            }
            return fx;
        }
        let expires_ms = now_ms + u64::from(self.config.visibility_timeout_ms);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        if let Some(lease) = job.lease.as_mut() {
            self.leases.remove(&(lease.expires_ms, job_id, attempt));
            lease.expires_ms = expires_ms;
            self.leases.insert((expires_ms, job_id, attempt));
        }
        if !payload.is_empty() {
            job.progress = Some((attempt, payload));
            let frame = progress_frame(job);
            let submitter = job.spec.submitter.as_str();
            for conn in self.online.get(submitter).into_iter().flatten() {
                if let Some(session) = self.sessions.get(conn) {
                    fx.frames
                        .push((session.outbox.clone(), Lane::Jobs, frame.clone()));
                }
            }
            self.account(job_id);
        }
        fx
    }

    /// A worker's result. Refused with LeaseFenced when the attempt is not the job's
    /// current lease held by this worker. The worker's answer is in `after_finals` (or
    /// `frames` when nothing needs writing).
    pub fn result(
        &mut self,
        conn: ConnId,
        outbox: &H,
        result: JobResult,
        now_ms: u64,
    ) -> Result<Effects<H>, Refusal> {
        let job_id = result.job_id;
        if !self.jobs.contains_key(&job_id) {
            self.fenced_results += 1;
            return Err(Refusal {
                code: ErrorCode::UnknownJob,
                message: format!("job {} is not known (finished long ago?)", job_id.0),
                retry_after_ms: 0,
            });
        }
        if !self.holds_lease(conn, job_id, result.attempt) {
            self.fenced_results += 1;
            let current = self.jobs.get(&job_id).map_or(0, |j| j.attempt);
            return Err(Refusal {
                code: ErrorCode::LeaseFenced,
                message: format!(
                    "attempt {} of job {} was fenced (the job is at attempt {current}); its \
                     result is rejected",
                    result.attempt, job_id.0
                ),
                retry_after_ms: 0,
            });
        }
        let mut fx = Effects::default();
        if !result.ok && result.retry {
            self.lose_attempt(job_id, "the worker asked for a retry", now_ms, &mut fx);
        } else {
            self.end_lease(job_id);
            let state = if result.ok {
                JobState::Completed
            } else {
                JobState::Failed
            };
            let reason = if result.ok {
                ""
            } else {
                "the worker reported a failure"
            };
            self.finish(job_id, state, reason, result.payload);
            if let Some(job) = self.jobs.get(&job_id) {
                fx.finals.push(Self::end_record(job, EndKind::Ended(state)));
            }
        }
        let (state, attempt) = self
            .jobs
            .get(&job_id)
            .map_or((JobState::Completed, result.attempt), |j| {
                (j.state, j.attempt)
            });
        let answer = status_frame(result.request_id, job_id, state, attempt, false);
        // Results are answered on the job answer stream, beside the job stream.
        if fx.finals.is_empty() {
            fx.frames.push((outbox.clone(), Lane::JobAnswers, answer));
        } else {
            fx.after_finals
                .push((outbox.clone(), Lane::JobAnswers, answer));
        }
        self.dispatch(now_ms, &mut fx);
        Ok(fx)
    }

    /// Cancels a job for its submitter or a controller: a running attempt's worker is told
    /// (JobCancel) and the job ends `cancelled`.
    pub fn cancel(
        &mut self,
        agent: &str,
        is_controller: bool,
        outbox: &H,
        request_id: u64,
        job_id: JobId,
        now_ms: u64,
    ) -> Result<Effects<H>, Refusal> {
        let Some(job) = self.jobs.get(&job_id) else {
            return Err(unknown_job(job_id));
        };
        if !is_controller && job.spec.submitter != agent {
            return Err(Refusal {
                code: ErrorCode::Forbidden,
                message: "only the job's submitter or a controller may cancel it".into(),
                retry_after_ms: 0,
            });
        }
        let mut fx = Effects::default();
        if job.state == JobState::Cancelled {
            fx.frames.push((
                outbox.clone(),
                Lane::Session,
                status_frame(request_id, job_id, job.state, job.attempt, false),
            ));
            return Ok(fx);
        }
        if job.state.is_final() {
            return Err(Refusal {
                code: ErrorCode::JobFinished,
                message: format!("job {} already ended {}", job_id.0, job.state.name()),
                retry_after_ms: 0,
            });
        }
        let attempt = job.attempt;
        if let Some(worker) = self.end_lease(job_id) {
            fx.frames
                .push((worker, Lane::Jobs, cancel_frame(job_id, attempt)));
        }
        self.finish(job_id, JobState::Cancelled, "cancelled", Bytes::new());
        if let Some(job) = self.jobs.get(&job_id) {
            fx.finals
                .push(Self::end_record(job, EndKind::Ended(JobState::Cancelled)));
        }
        fx.after_finals.push((
            outbox.clone(),
            Lane::Session,
            status_frame(request_id, job_id, JobState::Cancelled, attempt, false),
        ));
        self.dispatch(now_ms, &mut fx);
        Ok(fx)
    }

    /// The submitter handled a job's end. A completed, failed or cancelled job is then
    /// forgotten (its idempotency key stays for the dedup window); a dead letter stays in
    /// its queue until re-driven.
    pub fn ack(&mut self, agent: &str, job_id: JobId) -> Effects<H> {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get(&job_id) else {
            return fx;
        };
        if job.spec.submitter != agent || !job.state.is_final() || !job.final_durable {
            return fx;
        }
        if let Some(pending) = self.pending.get_mut(agent) {
            pending.remove(&job_id);
            if pending.is_empty() {
                self.pending.remove(agent);
            }
        }
        if job.state == JobState::DeadLettered {
            return fx;
        }
        let state = job.state;
        // Kept for the dedup window only: the key and state, not the result or reason.
        let mut acknowledged = Self::end_record(job, EndKind::Acknowledged(state));
        if let JobRecord::End(end) = &mut acknowledged {
            end.reason.clear();
            end.payload = Bytes::new();
        }
        fx.records.push(acknowledged);
        let swarm = job.spec.swarm.clone();
        let key = job.spec.idempotency_key.clone();
        fx.records.push(JobRecord::Forget {
            swarm: swarm.clone(),
            job_id,
        });
        fx.records.push(JobRecord::ForgetLease {
            swarm: swarm.clone(),
            job_id,
        });
        self.drop_job(job_id);
        let queue = self.queue(&swarm);
        queue.held = queue.held.saturating_sub(1);
        match queue.dedup.get_mut(&key) {
            Some(entry) if entry.0 == job_id => entry.2 = Some(state),
            // The key left the dedup window before the end was acknowledged: nothing will
            // forget the end later, so it is forgotten now (by the next tick).
            _ => self.forgotten.push((swarm, job_id)),
        }
        fx
    }

    /// A page of the swarm's dead letters after `after`.
    pub fn dead_letters(&self, swarm: &str, after: JobId, limit: u32) -> DeadLetters {
        let limit = limit.clamp(1, MAX_DEAD_LETTERS_PAGE) as usize;
        let mut out = DeadLetters::default();
        let Some(queue) = self.swarms.get(swarm) else {
            return out;
        };
        let mut ids = queue
            .dead
            .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
        for id in ids.by_ref().take(limit) {
            if let Some(job) = self.jobs.get(id) {
                out.jobs.push(DeadLetter {
                    job_id: *id,
                    attempts: job.attempt.saturating_sub(job.budget_base),
                    idempotency_key: job.spec.idempotency_key.clone(),
                    reason: job.reason.clone(),
                });
            }
        }
        out.more = ids.next().is_some();
        out
    }

    /// Queues a dead-lettered job again with a fresh attempt budget.
    pub fn redrive(
        &mut self,
        swarm: &str,
        outbox: &H,
        request_id: u64,
        job_id: JobId,
        now_ms: u64,
    ) -> Result<Effects<H>, Refusal> {
        let Some(job) = self.jobs.get_mut(&job_id).filter(|j| j.spec.swarm == swarm) else {
            return Err(unknown_job(job_id));
        };
        if job.state != JobState::DeadLettered {
            return Err(Refusal {
                code: ErrorCode::JobFinished,
                message: format!(
                    "job {} is {}, not dead-lettered",
                    job_id.0,
                    job.state.name()
                ),
                retry_after_ms: 0,
            });
        }
        if !job.final_durable {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: "the job's dead-lettering is still being written".into(),
                retry_after_ms: 10,
            });
        }
        job.state = JobState::Queued;
        job.budget_base = job.attempt;
        job.reason.clear();
        job.ready_at_ms = now_ms;
        job.final_durable = false;
        let attempt = job.attempt;
        let submitter = job.spec.submitter.clone();
        let deadline = job.spec.deadline_ms;
        let mut fx = Effects::default();
        fx.finals.push(Self::end_record(job, EndKind::Redriven));
        self.account(job_id);
        self.queue(swarm).dead.remove(&job_id);
        if let Some(pending) = self.pending.get_mut(submitter.as_str()) {
            pending.remove(&job_id);
        }
        if deadline > 0 {
            // A re-driven job is not held to the deadline it already missed.
            if let Some(job) = self.jobs.get_mut(&job_id) {
                let mut spec = (*job.spec).clone();
                spec.deadline_ms = 0;
                job.spec = Arc::new(spec);
            }
        }
        fx.after_finals.push((
            outbox.clone(),
            Lane::Session,
            status_frame(request_id, job_id, JobState::Queued, attempt, false),
        ));
        self.make_ready(job_id, now_ms);
        self.dispatch(now_ms, &mut fx);
        Ok(fx)
    }

    /// Expires leases (the attempt is fenced, its worker told, the job retried or
    /// dead-lettered), dead-letters queued jobs past their deadline, and dispatches.
    pub fn tick(&mut self, now_ms: u64) -> Effects<H> {
        let mut fx = Effects::default();
        self.prune_keys(now_ms);
        if !self.forgotten.is_empty() {
            // The id high-water mark goes first, in the same log: once the job's records
            // are compacted away, the ids still never go back.
            let mut marked = HashSet::new();
            for (swarm, job_id) in std::mem::take(&mut self.forgotten) {
                if marked.insert(swarm.clone()) {
                    fx.records.push(JobRecord::NextJob {
                        swarm: swarm.clone(),
                        next: JobId(self.next_job),
                    });
                }
                // All three emptied again, the end last: whichever of the acknowledgement's
                // records a crash lost, no full spec outlives the end that masked it.
                fx.records.push(JobRecord::Forget {
                    swarm: swarm.clone(),
                    job_id,
                });
                fx.records.push(JobRecord::ForgetLease {
                    swarm: swarm.clone(),
                    job_id,
                });
                fx.records.push(JobRecord::ForgetEnd { swarm, job_id });
            }
        }
        while let Some(&(expires, job_id, attempt)) = self.leases.first() {
            if expires > now_ms {
                break;
            }
            let worker = self
                .jobs
                .get(&job_id)
                .filter(|j| j.attempt == attempt)
                .and_then(|j| j.lease.as_ref())
                .filter(|l| l.expires_ms == expires)
                .map(|l| l.worker);
            let Some(worker) = worker else {
                // Not the job's current lease (cannot happen while every lease change
                // updates this set; dropped rather than looping).
                self.leases.pop_first();
                continue;
            };
            if let Some(worker) = self.workers.get(&worker) {
                fx.frames.push((
                    worker.outbox.clone(),
                    Lane::Jobs,
                    cancel_frame(job_id, attempt),
                ));
            }
            // Removes the entry (end_lease).
            self.lose_attempt(
                job_id,
                "the lease expired without a heartbeat",
                now_ms,
                &mut fx,
            );
        }
        while let Some(&(deadline, job_id)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            let queued = self
                .jobs
                .get(&job_id)
                .is_some_and(|j| j.state == JobState::Queued && j.durable);
            if queued {
                self.dead_letter(job_id, "its deadline passed before it started", &mut fx);
            }
        }
        self.dispatch(now_ms, &mut fx);
        fx
    }

    /// A connection ended: a worker's attempts are fenced and their jobs retried (or
    /// dead-lettered); the session stops receiving job ends.
    pub fn disconnect(&mut self, conn: ConnId, now_ms: u64) -> Effects<H> {
        let mut fx = Effects::default();
        if let Some(session) = self.sessions.remove(&conn) {
            if let Some(conns) = self.online.get_mut(&session.agent) {
                conns.retain(|c| *c != conn);
                if conns.is_empty() {
                    self.online.remove(&session.agent);
                }
            }
        }
        let Some(worker) = self.workers.get(&conn) else {
            return fx;
        };
        let mut leased: Vec<JobId> = worker.leases.iter().copied().collect();
        leased.sort();
        for job_id in leased {
            self.lose_attempt(job_id, "its worker disconnected", now_ms, &mut fx);
        }
        self.workers.remove(&conn);
        self.dispatch(now_ms, &mut fx);
        fx
    }
}

fn unknown_job(job_id: JobId) -> Refusal {
    Refusal {
        code: ErrorCode::UnknownJob,
        message: format!("no job {} in this swarm", job_id.0),
        retry_after_ms: 0,
    }
}

fn status_frame(
    request_id: u64,
    job_id: JobId,
    state: JobState,
    attempt: u32,
    duplicate: bool,
) -> OutFrame {
    encode(&Message::JobStatus(JobStatus {
        request_id,
        job_id,
        state,
        attempt,
        duplicate,
    }))
}

fn cancel_frame(job_id: JobId, attempt: u32) -> OutFrame {
    encode(&Message::JobCancel {
        request_id: 0,
        job_id,
        attempt,
    })
}

/// A JobUpdate with the job's latest progress (the caller checked there is one).
fn progress_frame<H>(job: &Job<H>) -> OutFrame {
    let (attempt, payload) = job.progress.clone().unwrap_or_default();
    encode(&Message::JobUpdate(JobUpdate {
        job_id: job.spec.job_id,
        swarm: job.spec.swarm.clone(),
        idempotency_key: job.spec.idempotency_key.clone(),
        state: JobState::Running,
        attempt,
        reason: String::new(),
        payload,
    }))
}

fn end_frame<H>(job: &Job<H>) -> OutFrame {
    encode(&Message::JobUpdate(JobUpdate {
        job_id: job.spec.job_id,
        swarm: job.spec.swarm.clone(),
        idempotency_key: job.spec.idempotency_key.clone(),
        state: job.state,
        attempt: job.attempt,
        reason: job.reason.clone(),
        payload: job.result.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The tests address connections by their ids.
    type Jobs = super::Jobs<ConnId>;
    type Effects = super::Effects<ConnId>;
    use swarmbus_schema::{decode, DecodeOptions, FrameDecoder};

    fn outbox(conn: u64) -> ConnId {
        ConnId(conn)
    }

    fn message(frame: &OutFrame) -> Message {
        let mut decoder = FrameDecoder::new(1 << 20);
        decoder.push(Bytes::from(frame.to_vec()));
        decode(
            decoder.next_frame().unwrap().unwrap(),
            &DecodeOptions::default(),
        )
        .unwrap()
    }

    fn leases(fx: &Effects) -> Vec<(ConnId, JobLease)> {
        fx.frames
            .iter()
            .filter_map(|(to, _, frame)| match message(frame) {
                Message::JobLease(lease) => Some((to.conn(), lease)),
                _ => None,
            })
            .collect()
    }

    fn submit(swarm: &str, key: &str, model: Option<&str>) -> SubmitJob {
        SubmitJob {
            request_id: 9,
            swarm: swarm.into(),
            idempotency_key: key.into(),
            model: model.map(str::to_owned),
            payload: Bytes::from_static(b"work"),
            ..SubmitJob::default()
        }
    }

    /// Submits and makes the spec durable; returns the job id and the effects.
    fn accept(jobs: &mut Jobs, who: &ConnId, job: SubmitJob, now: u64) -> (JobId, Effects) {
        match jobs.submit("submitter", who, job, now).unwrap() {
            Submitted::New { job_id, .. } => (job_id, jobs.submitted(job_id, Ok(()), now)),
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    fn worker(jobs: &mut Jobs, conn: u64, swarms: &[&str], credits: u32) -> (ConnId, Effects) {
        let out = outbox(conn);
        let swarms: Vec<String> = swarms.iter().map(|s| s.to_string()).collect();
        jobs.connect(ConnId(conn), &format!("worker-{conn}"), &out, Some(&swarms));
        let fx = jobs.credits(ConnId(conn), credits, 0);
        (out, fx)
    }

    fn ok_result(lease: &JobLease) -> JobResult {
        JobResult {
            request_id: 1,
            job_id: lease.job_id,
            attempt: lease.attempt,
            ok: true,
            retry: false,
            payload: Bytes::from_static(b"done"),
        }
    }

    /// A job queue on `config` with the submitter's session connected (conn 1).
    fn with_submitter(config: JobsConfig) -> (Jobs, ConnId) {
        let mut jobs = Jobs::new(config, [], 0, 1);
        let who = outbox(1);
        jobs.connect(ConnId(1), "submitter", &who, None);
        (jobs, who)
    }

    /// A submit to `swarm` with key `key` and a payload of `bytes` bytes.
    fn sized(swarm: &str, key: &str, bytes: usize) -> SubmitJob {
        SubmitJob {
            payload: Bytes::from(vec![0u8; bytes]),
            ..submit(swarm, key, None)
        }
    }

    /// A worker (conn 2) leases job `id`, finishes it, and the submitter acknowledges it.
    fn finish_and_ack(jobs: &mut Jobs, id: JobId, swarm: &str, now: u64) {
        let (out, fx) = worker(jobs, 2, &[swarm], 1);
        let lease = leases(&fx).pop().unwrap().1;
        assert_eq!(lease.job_id, id);
        jobs.result(ConnId(2), &out, ok_result(&lease), now)
            .unwrap();
        jobs.finals_written(&[id]);
        jobs.ack("submitter", id);
    }

    #[test]
    fn records_round_trip_through_their_payload() {
        let spec = JobSpec {
            job_id: JobId(42),
            swarm: "s".into(),
            idempotency_key: "k".into(),
            model: Some("llama".into()),
            submitter: "agent".into(),
            priority: 3,
            deadline_ms: 99,
            max_attempts: 4,
            submitted_ms: 7,
            payload: Bytes::from_static(b"payload"),
        };
        let records = [
            JobRecord::Spec(spec),
            JobRecord::Lease {
                swarm: "s".into(),
                job_id: JobId(42),
                attempt: 2,
            },
            JobRecord::End(EndRecord {
                job_id: JobId(42),
                swarm: "s".into(),
                idempotency_key: "k".into(),
                kind: EndKind::Ended(JobState::DeadLettered),
                attempt: 2,
                budget_base: 1,
                submitted_ms: 7,
                reason: "why".into(),
                payload: Bytes::from_static(b"result"),
            }),
        ];
        for record in records {
            assert_eq!(
                JobRecord::parse(&record.key(), &record.payload()),
                Some(record)
            );
        }
        assert!(JobRecord::parse("s000000000000002a", &Bytes::from_static(&[1, 0])).is_none());
        // Only the exact key form is read: no sign, no short or long ids.
        for bad in ["s+00000000000002a", "s2a", "s000000000000002a0", "s"] {
            assert!(JobRecord::parse(bad, &Bytes::new()).is_none(), "{bad}");
        }
        assert!(matches!(
            JobRecord::parse("s000000000000002a", &Bytes::new()),
            Some(JobRecord::Forget { .. })
        ));
    }

    #[test]
    fn equal_weights_share_a_worker_evenly_between_a_busy_and_a_quiet_swarm() {
        let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
        let who = outbox(1);
        for i in 0..100 {
            accept(&mut jobs, &who, submit("busy", &format!("b{i}"), None), 0);
        }
        for i in 0..10 {
            accept(&mut jobs, &who, submit("quiet", &format!("q{i}"), None), 0);
        }
        let (out, fx) = worker(&mut jobs, 2, &["busy", "quiet"], 1);
        let mut current = leases(&fx);
        let mut order = Vec::new();
        while order.len() < 40 {
            assert_eq!(current.len(), 1, "one credit, one lease at a time");
            let (_, lease) = current.pop().unwrap();
            order.push(lease.swarm.clone());
            let fx = jobs.result(ConnId(2), &out, ok_result(&lease), 0).unwrap();
            current = leases(&fx);
        }
        let quiet_in_first_20 = order[..20].iter().filter(|s| *s == "quiet").count();
        assert_eq!(quiet_in_first_20, 10, "{order:?}");
        assert!(order[20..].iter().all(|s| s == "busy"));
    }

    #[test]
    fn weights_and_priorities_order_dispatch() {
        let mut config = JobsConfig::default();
        config.swarm_weights.insert("heavy".into(), 3);
        let mut jobs = Jobs::new(config, [], 0, 1);
        let who = outbox(1);
        for i in 0..20 {
            accept(&mut jobs, &who, submit("heavy", &format!("h{i}"), None), 0);
            accept(&mut jobs, &who, submit("light", &format!("l{i}"), None), 0);
        }
        let mut urgent = submit("light", "urgent", None);
        urgent.priority = 9;
        let (urgent_id, _) = accept(&mut jobs, &who, urgent, 0);
        let (_, fx) = worker(&mut jobs, 2, &["heavy", "light"], 8);
        let got = leases(&fx);
        let heavy = got.iter().filter(|(_, l)| l.swarm == "heavy").count();
        assert_eq!((heavy, got.len() - heavy), (6, 2), "3:1 by weight");
        assert!(
            got.iter().any(|(_, l)| l.job_id == urgent_id),
            "priority first"
        );
    }

    #[test]
    fn the_latest_progress_is_resent_to_a_reconnecting_submitter() {
        let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 3);
        let who = outbox(1);
        jobs.connect(ConnId(1), "submitter", &who, None);
        let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
        let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
        let lease = leases(&fx).pop().unwrap().1;
        let beat = |text: &'static [u8]| JobProgress {
            job_id: id,
            attempt: lease.attempt,
            payload: Bytes::from_static(text),
        };
        assert_eq!(jobs.progress(ConnId(2), beat(b"10%"), 10).frames.len(), 1);
        jobs.progress(ConnId(2), beat(b"50%"), 20);
        // The submitter was away: on reconnect it gets the latest progress only.
        jobs.disconnect(ConnId(1), 30);
        let again = outbox(3);
        let fx = jobs.connect(ConnId(3), "submitter", &again, None);
        let updates: Vec<JobUpdate> = fx
            .frames
            .iter()
            .filter_map(|(_, _, frame)| match message(frame) {
                Message::JobUpdate(update) => Some(update),
                _ => None,
            })
            .collect();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].state, JobState::Running);
        assert_eq!(updates[0].payload.as_ref(), b"50%");
    }

    #[test]
    fn a_draining_worker_gets_no_new_jobs() {
        let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 5);
        let (_, _) = worker(&mut jobs, 2, &["s"], 4);
        let (_, _) = worker(&mut jobs, 3, &["s"], 4);
        jobs.worker_draining(ConnId(3), true);
        let who = outbox(1);
        for key in ["a", "b", "c"] {
            let (_, fx) = accept(&mut jobs, &who, submit("s", key, None), 0);
            assert_eq!(leases(&fx)[0].0, ConnId(2), "{key}");
        }
    }

    #[test]
    fn workers_with_the_model_loaded_are_preferred() {
        let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
        let (_, _) = worker(&mut jobs, 2, &["s"], 4);
        let (_, _) = worker(&mut jobs, 3, &["s"], 4);
        jobs.worker_models(ConnId(3), &["llama".to_string()]);
        let who = outbox(1);
        let (_, fx) = accept(&mut jobs, &who, submit("s", "k", Some("llama")), 0);
        assert_eq!(leases(&fx)[0].0, ConnId(3));
        let (_, fx) = accept(&mut jobs, &who, submit("s", "k2", Some("mistral")), 0);
        assert_eq!(leases(&fx)[0].0, ConnId(2), "nobody has it: least loaded");
    }

    #[test]
    fn an_expired_lease_is_fenced_retried_then_dead_lettered_and_redriven() {
        let config = JobsConfig {
            visibility_timeout_ms: 100,
            backoff_base_ms: 10,
            backoff_cap_ms: 10,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config, [], 0, 7);
        let who = outbox(1);
        jobs.connect(ConnId(1), "submitter", &who, None);
        let mut job = submit("s", "k", None);
        job.max_attempts = 2;
        let (id, _) = accept(&mut jobs, &who, job, 0);
        let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
        let first = leases(&fx).pop().unwrap().1;
        assert_eq!(first.attempt, 1);
        // A heartbeat extends the lease.
        let beat = JobProgress {
            job_id: id,
            attempt: 1,
            payload: Bytes::new(),
        };
        assert!(jobs.progress(ConnId(2), beat, 90).frames.is_empty());
        assert!(leases(&jobs.tick(150)).is_empty(), "extended to 190");
        // Expiry: the worker is told, the job waits for its backoff, then runs again.
        let fx = jobs.tick(190);
        assert!(fx
            .frames
            .iter()
            .any(|(_, _, f)| matches!(message(f), Message::JobCancel { attempt: 1, .. })));
        let second = leases(&jobs.tick(200)).pop().unwrap().1;
        assert_eq!(second.attempt, 2);
        // The fenced attempt's late result is rejected.
        let late = jobs.result(ConnId(2), &out, ok_result(&first), 201);
        assert_eq!(late.unwrap_err().code, ErrorCode::LeaseFenced);
        // The last attempt expires too: dead-lettered, and the end is written first.
        let fx = jobs.tick(400);
        assert_eq!(fx.finals.len(), 1);
        assert_eq!(jobs.counts().dead_lettered, 1);
        let told = jobs.finals_written(&[id]);
        let Message::JobUpdate(update) = message(&told.frames[0].2) else {
            panic!()
        };
        assert_eq!(update.state, JobState::DeadLettered);
        let page = jobs.dead_letters("s", JobId(0), 10);
        assert_eq!(page.jobs.len(), 1);
        assert_eq!(page.jobs[0].attempts, 2);
        // Re-drive: a fresh budget, and it runs (attempt 3).
        let fx = jobs.redrive("s", &who, 5, id, 500).unwrap();
        assert_eq!(leases(&fx)[0].1.attempt, 3);
        assert!(jobs.dead_letters("s", JobId(0), 10).jobs.is_empty());
        let third = leases(&fx).pop().unwrap().1;
        let fx = jobs
            .result(ConnId(2), &out, ok_result(&third), 501)
            .unwrap();
        assert_eq!(fx.finals.len(), 1);
        jobs.finals_written(&[id]);
        let acked = jobs.ack("submitter", id);
        // The end (key and state only), the spec emptied, and the lease record emptied.
        assert_eq!(acked.records.len(), 3);
        assert_eq!(jobs.counts().jobs, 0);
    }

    #[test]
    fn job_bytes_are_capped_per_agent_and_router_wide_until_acknowledged() {
        let config = JobsConfig {
            max_bytes: 3_000,
            max_bytes_per_agent: 2_000,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config, [], 0, 1);
        let who = outbox(1);
        jobs.connect(ConnId(1), "submitter", &who, None);
        let big = |key: &str| SubmitJob {
            payload: Bytes::from(vec![0u8; 1_000]),
            ..submit("s", key, None)
        };
        let busy = |result: Result<Submitted, Refusal>| match result {
            Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
            Ok(other) => panic!("expected Busy, got {other:?}"),
        };
        let (id, _) = accept(&mut jobs, &who, big("one"), 0);
        // Each job counts its payload, names and 256 bytes: a second is past the quota.
        let (held, mine) = jobs.bytes_held("submitter");
        assert!(held == mine && mine > 1_000 + JOB_OVERHEAD_BYTES);
        busy(jobs.submit("submitter", &who, big("two"), 0));
        // Another agent has room, up to the router's cap.
        let other = outbox(3);
        assert!(matches!(
            jobs.submit("other", &other, big("three"), 0),
            Ok(Submitted::New { .. })
        ));
        busy(jobs.submit("third", &other, big("four"), 0));
        // The result counts to the submitter too, until the submitter acknowledges it.
        let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
        let lease = leases(&fx).pop().unwrap().1;
        assert_eq!(lease.job_id, id);
        let result = JobResult {
            payload: Bytes::from(vec![1u8; 500]),
            ..ok_result(&lease)
        };
        jobs.result(ConnId(2), &out, result, 1).unwrap();
        assert_eq!(jobs.bytes_held("submitter").1, mine + 500);
        jobs.finals_written(&[id]);
        jobs.ack("submitter", id);
        assert_eq!(jobs.bytes_held("submitter").1, 0);
        accept(&mut jobs, &who, big("two"), 2);
    }

    #[test]
    fn an_acknowledged_job_leaves_the_log_after_the_dedup_window_and_ids_never_go_back() {
        let config = JobsConfig {
            dedup_window_ms: 1_000,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config.clone(), [], 0, 1);
        let who = outbox(1);
        jobs.connect(ConnId(1), "submitter", &who, None);
        let mut log: Vec<JobRecord> = Vec::new();
        let Submitted::New { job_id, record } = jobs
            .submit("submitter", &who, submit("s", "k", None), 0)
            .unwrap()
        else {
            panic!("a new job")
        };
        log.push(record);
        jobs.submitted(job_id, Ok(()), 0);
        let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
        let lease = leases(&fx).pop().unwrap().1;
        log.extend(fx.records);
        let fx = jobs.result(ConnId(2), &out, ok_result(&lease), 10).unwrap();
        log.extend(fx.finals);
        jobs.finals_written(&[job_id]);
        log.extend(jobs.ack("submitter", job_id).records);
        // Within the dedup window the key is still known; past it, the end record goes too.
        assert!(jobs.tick(500).records.is_empty());
        let fx = jobs.tick(1_500);
        assert!(fx
            .records
            .iter()
            .any(|r| matches!(r, JobRecord::NextJob { next, .. } if *next > job_id)));
        assert!(fx
            .records
            .iter()
            .any(|r| matches!(r, JobRecord::ForgetEnd { job_id: id, .. } if *id == job_id)));
        log.extend(fx.records);
        // Every record of the job is now empty under its key: compaction keeps only the
        // latest per key and drops the empty ones, leaving the id mark.
        let mut latest: HashMap<String, JobRecord> = HashMap::new();
        for record in log {
            let record = JobRecord::parse(&record.key(), &record.payload()).unwrap();
            latest.insert(record.key(), record);
        }
        let kept: Vec<JobRecord> = latest
            .into_values()
            .filter(|r| !r.payload().is_empty())
            .collect();
        assert!(
            matches!(kept.as_slice(), [JobRecord::NextJob { .. }]),
            "{kept:?}"
        );
        // Restarted from what is left: no job, and the next id is new.
        let mut restarted = Jobs::new(config, kept, 2_000, 1);
        assert_eq!(restarted.counts().jobs, 0);
        match restarted.submit("submitter", &who, submit("s", "k2", None), 2_000) {
            Ok(Submitted::New { job_id: next, .. }) => assert!(next > job_id),
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    #[test]
    fn payloads_past_the_cache_leave_memory_and_are_leased_from_the_log() {
        let (mut jobs, who) = with_submitter(JobsConfig {
            payload_cache_bytes: 1_500,
            ..JobsConfig::default()
        });
        let mut ids = Vec::new();
        for (n, key) in ["a", "b"].into_iter().enumerate() {
            let Submitted::New { job_id, .. } = jobs
                .submit("submitter", &who, sized("s", key, 1_000), 0)
                .unwrap()
            else {
                panic!("a new job")
            };
            jobs.spec_written_at(job_id, OpId(10 + n as u64));
            jobs.submitted(job_id, Ok(()), 0);
            ids.push(job_id);
        }
        // The first payload fits the cache; the second is dropped from memory (both still
        // count against the byte caps, which bound what the queue holds anywhere).
        let (held, _) = jobs.bytes_held("submitter");
        assert!(held > 2_000, "{held}");
        let (_, fx) = worker(&mut jobs, 2, &["s"], 2);
        assert_eq!(leases(&fx).len(), 1, "the cached one is leased at once");
        assert_eq!(fx.loads.len(), 1, "the other is read back first");
        let load = &fx.loads[0];
        assert_eq!((load.lease.job_id, load.op), (ids[1], OpId(11)));
        assert_eq!(load.log, log_swarm("s"));
        assert!(load.lease.payload.is_empty());
    }

    #[test]
    fn duplicate_submits_waiting_for_a_spec_are_capped() {
        let (mut jobs, who) = with_submitter(JobsConfig::default());
        assert!(matches!(
            jobs.submit("submitter", &who, submit("s", "k", None), 0),
            Ok(Submitted::New { .. })
        ));
        for _ in 0..MAX_WAITERS - 1 {
            assert!(matches!(
                jobs.submit("submitter", &who, submit("s", "k", None), 0),
                Ok(Submitted::Waiting)
            ));
        }
        match jobs.submit("submitter", &who, submit("s", "k", None), 0) {
            Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
            Ok(other) => panic!("expected Busy, got {other:?}"),
        }
    }

    #[test]
    fn a_lease_whose_payload_cannot_be_read_is_a_lost_attempt_with_its_reason() {
        let (mut jobs, who) = with_submitter(JobsConfig {
            payload_cache_bytes: 0,
            ..JobsConfig::default()
        });
        let mut job = sized("s", "k", 100);
        job.max_attempts = 1;
        let Submitted::New { job_id, .. } = jobs.submit("submitter", &who, job, 0).unwrap() else {
            panic!("a new job")
        };
        jobs.spec_written_at(job_id, OpId(3));
        jobs.submitted(job_id, Ok(()), 0);
        let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
        let load = &fx.loads[0];
        assert!(jobs.holds_lease(ConnId(2), job_id, load.lease.attempt));
        let fx = jobs.lease_undeliverable(ConnId(2), job_id, load.lease.attempt, "disk on fire", 1);
        assert_eq!(
            fx.finals.len(),
            1,
            "its only attempt is used: dead-lettered"
        );
        assert!(!jobs.holds_lease(ConnId(2), job_id, 1));
        let page = jobs.dead_letters("s", JobId(0), 10);
        assert!(
            page.jobs[0].reason.contains("disk on fire"),
            "{:?}",
            page.jobs[0]
        );
    }

    #[test]
    fn a_refused_submit_takes_no_place_among_the_job_logs() {
        let (mut jobs, who) = with_submitter(JobsConfig {
            max_swarms: 2,
            max_bytes: 2_000,
            ..JobsConfig::default()
        });
        let (id, _) = accept(&mut jobs, &who, sized("a", "k", 1_200), 0);
        // Refused for the bytes: "c" gets no job log.
        assert!(jobs
            .submit("submitter", &who, sized("c", "k", 1_200), 0)
            .is_err());
        // The job of "a" ends and is acknowledged: room again, and "b" is the second log.
        finish_and_ack(&mut jobs, id, "a", 1);
        accept(&mut jobs, &who, sized("b", "k", 1_200), 2);
    }

    #[test]
    fn a_job_forgotten_with_its_spec_record_lost_does_not_come_back() {
        // The acknowledgement's emptied spec was lost in a crash; the end (key only) and
        // the full spec were kept. Once the key leaves the window the forget batch empties
        // the spec again, and an emptied end alone also keeps the job gone.
        let spec = JobSpec {
            job_id: JobId(7),
            swarm: "s".into(),
            idempotency_key: "k".into(),
            model: None,
            submitter: "submitter".into(),
            priority: 0,
            deadline_ms: 0,
            max_attempts: 1,
            submitted_ms: 0,
            payload: Bytes::from_static(b"work"),
        };
        let acknowledged = JobRecord::End(EndRecord {
            job_id: JobId(7),
            swarm: "s".into(),
            idempotency_key: "k".into(),
            kind: EndKind::Acknowledged(JobState::Completed),
            attempt: 1,
            budget_base: 0,
            submitted_ms: 0,
            reason: String::new(),
            payload: Bytes::new(),
        });
        let config = JobsConfig {
            dedup_window_ms: 1_000,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(
            config.clone(),
            [JobRecord::Spec(spec.clone()), acknowledged],
            0,
            1,
        );
        assert_eq!(jobs.counts().jobs, 0);
        let forgets = jobs.tick(2_000).records;
        for wanted in ["s", "l", "j"] {
            let key = format!("{wanted}{:016x}", 7);
            assert!(
                forgets
                    .iter()
                    .any(|r| r.key() == key && r.payload().is_empty()),
                "{key} not emptied: {forgets:?}"
            );
        }
        // Only the emptied end survived with the full spec: still gone.
        let forgotten = JobRecord::ForgetEnd {
            swarm: "s".into(),
            job_id: JobId(7),
        };
        let restarted = Jobs::new(config, [JobRecord::Spec(spec), forgotten], 0, 1);
        assert_eq!(restarted.counts().jobs, 0);
    }

    #[test]
    fn an_end_acknowledged_after_its_key_left_the_window_is_forgotten_too() {
        let (mut jobs, who) = with_submitter(JobsConfig {
            dedup_window_ms: 1_000,
            ..JobsConfig::default()
        });
        let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
        // The key expires before the job runs and ends.
        jobs.tick(5_000);
        finish_and_ack(&mut jobs, id, "s", 5_001);
        let fx = jobs.tick(5_002);
        assert!(fx
            .records
            .iter()
            .any(|r| matches!(r, JobRecord::ForgetEnd { job_id, .. } if *job_id == id)));
    }

    #[test]
    fn job_logs_are_capped_counting_those_recovered() {
        let config = JobsConfig {
            max_swarms: 3,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config, [], 0, 1);
        jobs.logs_exist([log_swarm("old")]);
        let who = outbox(1);
        accept(&mut jobs, &who, submit("a", "k", None), 0);
        accept(&mut jobs, &who, submit("b", "k", None), 0);
        match jobs.submit("submitter", &who, submit("c", "k", None), 0) {
            Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
            Ok(other) => panic!("expected Busy, got {other:?}"),
        }
        // Swarms whose logs exist go on taking jobs.
        accept(&mut jobs, &who, submit("a", "k2", None), 0);
        accept(&mut jobs, &who, submit("old", "k", None), 0);
    }

    #[test]
    fn a_dead_letter_counts_router_wide_not_against_its_submitter() {
        let config = JobsConfig {
            visibility_timeout_ms: 100,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config, [], 0, 7);
        let who = outbox(1);
        let mut job = submit("s", "k", None);
        job.max_attempts = 1;
        let (id, _) = accept(&mut jobs, &who, job, 0);
        let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
        assert_eq!(leases(&fx).len(), 1);
        let (held, mine) = jobs.bytes_held("submitter");
        assert!(held > 0 && mine == held);
        // Its only attempt expires: dead-lettered.
        jobs.tick(200);
        assert_eq!(jobs.counts().dead_lettered, 1);
        let (router_wide, mine) = jobs.bytes_held("submitter");
        assert!(router_wide >= held, "its reason is counted too");
        assert_eq!(mine, 0);
        // Re-driven: the submitter's again.
        jobs.finals_written(&[id]);
        jobs.redrive("s", &who, 5, id, 300).unwrap();
        assert_eq!(jobs.bytes_held("submitter"), (held, held));
    }

    #[test]
    fn duplicates_get_the_same_job_and_a_full_swarm_is_busy() {
        let config = JobsConfig {
            max_jobs_per_swarm: 2,
            ..JobsConfig::default()
        };
        let mut jobs = Jobs::new(config, [], 0, 1);
        let who = outbox(1);
        let Submitted::New { job_id, .. } =
            jobs.submit("a", &who, submit("s", "k", None), 0).unwrap()
        else {
            panic!()
        };
        // Not durable yet: the duplicate waits and is answered with the same job.
        assert!(matches!(
            jobs.submit("a", &who, submit("s", "k", None), 0).unwrap(),
            Submitted::Waiting
        ));
        let fx = jobs.submitted(job_id, Ok(()), 0);
        let answers: Vec<JobStatus> = fx
            .frames
            .iter()
            .filter_map(|(_, _, f)| match message(f) {
                Message::JobStatus(status) => Some(status),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 2);
        assert!(answers.iter().all(|a| a.job_id == job_id));
        assert_eq!(
            answers.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
            [false, true]
        );
        let Submitted::Answer(frame) = jobs.submit("a", &who, submit("s", "k", None), 5).unwrap()
        else {
            panic!()
        };
        let Message::JobStatus(status) = message(&frame) else {
            panic!()
        };
        assert!(status.duplicate && status.job_id == job_id);
        accept(&mut jobs, &who, submit("s", "k2", None), 0);
        let busy = jobs
            .submit("a", &who, submit("s", "k3", None), 0)
            .unwrap_err();
        assert_eq!(busy.code, ErrorCode::Busy);
        assert!(busy.retry_after_ms > 0);
        // Past the window the key names a new job.
        let window = JobsConfig::default().dedup_window_ms;
        let mut roomy = Jobs::new(JobsConfig::default(), [], 0, 1);
        let (first, _) = accept(&mut roomy, &who, submit("s", "k", None), 0);
        let (second, _) = accept(&mut roomy, &who, submit("s", "k", None), window);
        assert_ne!(first, second);
    }

    #[test]
    fn a_restart_requeues_unfinished_jobs_and_keeps_undelivered_ends() {
        let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
        let who = outbox(1);
        let mut written = Vec::new();
        for key in ["done", "running"] {
            let Submitted::New { job_id, record } = jobs
                .submit("agent", &who, submit("s", key, None), 0)
                .unwrap()
            else {
                panic!()
            };
            written.push(record);
            written.extend(jobs.submitted(job_id, Ok(()), 0).records);
        }
        let (out, fx) = worker(&mut jobs, 2, &["s"], 2);
        written.extend(fx.records.clone());
        let got = leases(&fx);
        let fx = jobs
            .result(ConnId(2), &out, ok_result(&got[0].1), 1)
            .unwrap();
        written.extend(fx.finals);
        // Restart from what was written.
        let mut restored = Jobs::new(JobsConfig::default(), written, 10, 1);
        let counts = restored.counts();
        assert_eq!(
            (counts.jobs, counts.queued, counts.pending_results),
            (2, 1, 1)
        );
        let agent = outbox(5);
        let fx = restored.connect(ConnId(5), "agent", &agent, None);
        let Message::JobUpdate(update) = message(&fx.frames[0].2) else {
            panic!()
        };
        assert_eq!(
            (update.job_id, update.state),
            (got[0].1.job_id, JobState::Completed)
        );
        assert_eq!(update.payload.as_ref(), b"done");
        // The interrupted job runs again, as its next attempt.
        let (_, fx) = worker(&mut restored, 6, &["s"], 1);
        let again = leases(&fx).pop().unwrap().1;
        assert_eq!((again.job_id, again.attempt), (got[1].1.job_id, 2));
        // Dedup survives too.
        let Submitted::Answer(_) = restored
            .submit("agent", &who, submit("s", "done", None), 20)
            .unwrap()
        else {
            panic!("a duplicate after the restart")
        };
    }
}
