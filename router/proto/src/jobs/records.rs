//! The job queue's records in its logs (`$jobs.<swarm>`): specs, leases, ends and the
//! forgetting records, with their keys and encoding.

use super::*;

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

pub(super) fn put_str(out: &mut BytesMut, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.put_u16(len as u16);
    out.put_slice(&s.as_bytes()[..len]);
}

pub(super) fn get_str(input: &mut &[u8]) -> Option<String> {
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

pub(super) fn get_u8(input: &mut &[u8]) -> Option<u8> {
    (input.remaining() >= 1).then(|| input.get_u8())
}

pub(super) fn get_u32(input: &mut &[u8]) -> Option<u32> {
    (input.remaining() >= 4).then(|| input.get_u32())
}

pub(super) fn get_u64(input: &mut &[u8]) -> Option<u64> {
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
            JobRecord::Spec(_) | JobRecord::Forget { .. } => super::hex_tagged("s", id),
            JobRecord::Lease { .. } | JobRecord::ForgetLease { .. } => super::hex_tagged("l", id),
            JobRecord::End(_) | JobRecord::ForgetEnd { .. } => super::hex_tagged("j", id),
            JobRecord::NextJob { .. } => super::hex_tagged("n", 0),
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
