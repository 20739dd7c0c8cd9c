//! The job queue's client side: the session's submit, credit, progress, result, cancel,
//! ack, dead-letter and re-drive requests (methods of [`crate::Client`]), and helpers:
//! [`JobDedup`] (a submitter sees each job's end once) and the streams a
//! session receives job traffic on ([`JobEvents`] for workers, [`JobUpdates`] for
//! submitters).
//!
//! The router sends a job's end at least once: again after a reconnect, after a router
//! restart, and (rarely) twice when a crash made the job run twice. [`JobDedup`] drops every
//! end of a job after the first (a dead-letter notice is not an end: a re-driven job may
//! still complete), so the application handles each job's result once.

use std::collections::{HashSet, VecDeque};

use swarmbus_schema::{JobId, JobState, JobUpdate};
use tokio::sync::mpsc;

// The session methods of this plane (`impl Client` below) use the crate root's types.
use super::*;

/// What a worker receives on the job stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// Run this attempt; heartbeat (`Client::job_progress`) within `lease_ms`, then report
    /// with `Client::finish_job`.
    Lease(swarmbus_schema::JobLease),
    /// Stop this attempt: the job was cancelled, or the attempt fenced (its result would be
    /// rejected).
    Cancel { job_id: JobId, attempt: u32 },
}

/// Leases and cancels for a worker session (see `Client::job_events`).
#[derive(Debug)]
pub struct JobEvents {
    pub(crate) rx: mpsc::Receiver<JobEvent>,
}

impl JobEvents {
    /// The next event; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<JobEvent> {
        self.rx.recv().await
    }
}

/// Progress and ends of the jobs this agent submitted (see `Client::job_updates`).
#[derive(Debug)]
pub struct JobUpdates {
    pub(crate) rx: mpsc::Receiver<JobUpdate>,
}

impl JobUpdates {
    /// The next update; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<JobUpdate> {
        self.rx.recv().await
    }
}

/// Remembers the jobs whose end was handled, so a resent end is dropped. Bounded: past
/// `capacity` the oldest job ids are forgotten (keep it above the number of jobs whose end
/// may still be resent, i.e. those not yet acknowledged).
#[derive(Debug)]
pub struct JobDedup {
    seen: HashSet<(JobId, Option<u32>)>,
    order: VecDeque<(JobId, Option<u32>)>,
    capacity: usize,
    dropped: u64,
}

impl Default for JobDedup {
    fn default() -> Self {
        JobDedup::new(1 << 20)
    }
}

impl JobDedup {
    pub fn new(capacity: usize) -> Self {
        JobDedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    /// Whether the application should handle `update`: progress always; a job's end
    /// (completed, failed, cancelled) only the first time; a dead-letter notice once per
    /// attempt that ended in it.
    pub fn first_time(&mut self, update: &JobUpdate) -> bool {
        let key = match update.state {
            JobState::Queued | JobState::Running => return true,
            JobState::DeadLettered => (update.job_id, Some(update.attempt)),
            _ => (update.job_id, None),
        };
        if !self.seen.insert(key) {
            self.dropped += 1;
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Updates dropped as already seen.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Client {
    pub(super) fn max_job_payload_bytes(&self) -> usize {
        // The router keeps room for the job record's fields (its JOB_RECORD_OVERHEAD_BYTES).
        self.shared.max_payload_bytes.saturating_sub(2048)
    }

    pub(super) fn check_job_payload(&self, payload: &Bytes) -> Result<(), ClientError> {
        let max = self.max_job_payload_bytes();
        if payload.len() > max {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "job payload of {} bytes exceeds the maximum of {max} bytes",
                    payload.len()
                ),
            });
        }
        Ok(())
    }

    /// Submits a job (its `request_id` is set here) and waits until the router holds it
    /// durably. With an idempotency key already used within the router's dedup window, the
    /// answer names the earlier job (`duplicate`), which runs once. Refusals: `Busy` (the
    /// swarm's queue is full; retry after `retry_after_ms`), `SwarmNotJoined`,
    /// `PayloadTooLarge`.
    pub async fn submit_job(&self, job: SubmitJob) -> Result<JobStatus, ClientError> {
        check_name("swarm", &job.swarm)?;
        check_name("idempotency_key", &job.idempotency_key)?;
        if let Some(model) = job.model.as_deref() {
            check_name("model", model)?;
        }
        self.check_job_payload(&job.payload)?;
        let value = self
            .request_on(&self.shared.jobs_tx, |request_id| {
                Message::SubmitJob(SubmitJob { request_id, ..job })
            })
            .await?;
        expect_job(value)
    }

    /// Progress and ends of the jobs this agent submitted; `None` after the first call.
    /// Ends not acknowledged with [`Client::ack_job`] are sent again after a reconnect (to
    /// any session of the same agent id) and after a router restart: pass each through a
    /// [`JobDedup`]. Take it before submitting, or the updates wait in a bounded buffer.
    pub fn job_updates(&self) -> Option<JobUpdates> {
        self.shared
            .job_updates_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .map(|rx| JobUpdates { rx })
    }

    /// Tells the router the job's end `end` (as it arrived) was handled: it stops resending
    /// it (and forgets the job, except its idempotency key for the dedup window). The ack
    /// names that end, so an ack of a dead letter that a controller re-drove meanwhile
    /// does not acknowledge the job's new end, unseen.
    /// An update that is not an end (progress) acknowledges nothing: nothing is sent.
    pub async fn ack_job(&self, end: &JobUpdate) -> Result<(), ClientError> {
        if !end.state.is_final() {
            return Ok(());
        }
        let ack = Message::JobAck {
            job_id: end.job_id,
            attempt: end.attempt,
            state: end.state,
        };
        // On the job stream, in order with the session's other job traffic.
        self.shared
            .jobs_tx
            .send(encode(&ack))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// Cancels a job (its submitter or a controller): a running attempt's worker is told,
    /// and the job ends `cancelled`. Refusals: `UnknownJob`, `JobFinished`, `Forbidden`.
    pub async fn cancel_job(&self, job_id: JobId) -> Result<JobStatus, ClientError> {
        let value = self
            .request(|request_id| Message::JobCancel {
                request_id,
                job_id,
                attempt: 0,
            })
            .await?;
        expect_job(value)
    }

    /// Leases and cancels for this worker session; `None` after the first call.
    pub fn job_events(&self) -> Option<JobEvents> {
        self.shared
            .job_events_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .map(|rx| JobEvents { rx })
    }

    /// Says how many jobs this worker session can run at once (0 pauses it); the router
    /// leases jobs of the swarms the session joined while it holds fewer leases. Restate it
    /// whenever it changes.
    pub async fn set_job_credits(&self, credits: u32) -> Result<(), ClientError> {
        // On the job stream, in order with the session's other job traffic.
        self.shared
            .jobs_tx
            .send(encode(&Message::JobCredits { credits }))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// A heartbeat for a running attempt (extends its lease); a non-empty `payload` is
    /// progress, forwarded to the submitter. A heartbeat of a fenced attempt is answered
    /// with a `JobEvent::Cancel`.
    pub async fn job_progress(
        &self,
        job_id: JobId,
        attempt: u32,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        self.check_job_payload(&payload)?;
        self.shared
            .jobs_tx
            .send(encode(&Message::JobProgress(JobProgress {
                job_id,
                attempt,
                payload,
            })))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// Reports an attempt's outcome: `ok` (the payload is the result), a failure (`ok`
    /// false: the job ends failed), or a failure to retry (`retry`: another attempt after a
    /// backoff, or the dead-letter queue after the last). Resolves once the end is durable;
    /// refused with `LeaseFenced` when the attempt was fenced (its result is dropped).
    pub async fn finish_job(
        &self,
        job_id: JobId,
        attempt: u32,
        ok: bool,
        retry: bool,
        payload: Bytes,
    ) -> Result<JobStatus, ClientError> {
        self.check_job_payload(&payload)?;
        let value = self
            .request_on(&self.shared.jobs_tx, |request_id| {
                Message::JobResult(JobResult {
                    request_id,
                    job_id,
                    attempt,
                    ok,
                    retry,
                    payload,
                })
            })
            .await?;
        expect_job(value)
    }

    /// A page of the swarm's dead-letter queue after `after` (controllers only).
    pub async fn dead_letters(
        &self,
        swarm: &str,
        after: JobId,
        limit: u32,
    ) -> Result<DeadLetters, ClientError> {
        let value = self
            .request(|request_id| Message::ListDeadLetters {
                request_id,
                swarm: swarm.to_owned(),
                after_job_id: after,
                limit,
            })
            .await?;
        match value {
            ReplyValue::DeadLetters(page) => Ok(page),
            other => Err(ClientError::Protocol {
                detail: format!("expected DeadLetters, got {other:?}"),
            }),
        }
    }

    /// Queues a dead-lettered job again with a fresh attempt budget (controllers only).
    pub async fn redrive_job(&self, swarm: &str, job_id: JobId) -> Result<JobStatus, ClientError> {
        let value = self
            .request(|request_id| Message::RedriveJob {
                request_id,
                swarm: swarm.to_owned(),
                job_id,
            })
            .await?;
        expect_job(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(id: u64, state: JobState, attempt: u32) -> JobUpdate {
        JobUpdate {
            job_id: JobId(id),
            state,
            attempt,
            swarm: "s".into(),
            ..JobUpdate::default()
        }
    }

    #[test]
    fn each_end_passes_once_but_a_dead_letter_does_not_hide_a_later_completion() {
        let mut dedup = JobDedup::new(2);
        assert!(dedup.first_time(&update(1, JobState::Completed, 1)));
        assert!(!dedup.first_time(&update(1, JobState::Completed, 2)));
        assert!(dedup.first_time(&update(2, JobState::Running, 1)));
        assert!(dedup.first_time(&update(2, JobState::Running, 1)));
        assert!(dedup.first_time(&update(3, JobState::DeadLettered, 2)));
        assert!(!dedup.first_time(&update(3, JobState::DeadLettered, 2)));
        assert!(dedup.first_time(&update(3, JobState::Completed, 3)));
        assert_eq!(dedup.dropped(), 2);
        // Bounded: job 1 was forgotten.
        assert!(dedup.first_time(&update(1, JobState::Completed, 1)));
    }
}
