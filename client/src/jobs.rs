//! Job queue helpers: [`JobDedup`] (a submitter sees each job's end once) and the streams a
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
