//! How attempts and jobs end: results, progress, cancels, lost leases, dead letters,
//! re-drives, acknowledgements, and the periodic tick; and the frames they send.

use super::*;

impl<H: Handle + Clone> Jobs<H> {
    /// An attempt was lost (lease expired, worker gone, worker asked for a retry): the job
    /// is queued again after a backoff, or dead-lettered after its last attempt.
    pub(super) fn lose_attempt(
        &mut self,
        job_id: JobId,
        why: &str,
        now_ms: u64,
        fx: &mut Effects<H>,
    ) {
        self.end_lease(job_id, now_ms);
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
    pub(super) fn finish(
        &mut self,
        job_id: JobId,
        state: JobState,
        reason: &str,
        result: Bytes,
    ) -> bool {
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
    pub(super) fn account(&mut self, job_id: JobId) {
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
    pub(super) fn drop_job(&mut self, job_id: JobId) -> Option<Job<H>> {
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

    pub(super) fn end_record(job: &Job<H>, kind: EndKind) -> JobRecord {
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

    pub(super) fn dead_letter(&mut self, job_id: JobId, reason: &str, fx: &mut Effects<H>) {
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
        self.timings.dead_lettered += 1;
        let swarm = job.spec.swarm.clone();
        self.queue(&swarm).dead.insert(job_id);
    }

    /// The end records of `written` (a call's `finals` whose write failed) still to be
    /// made durable: those whose job still has that end, not yet durable (a job re-driven
    /// or forgotten meanwhile needs none; its new end has a write of its own).
    pub fn unwritten_finals(&self, written: &[JobRecord]) -> Vec<JobRecord> {
        written
            .iter()
            .filter(|record| {
                let JobRecord::End(end) = record else {
                    return false;
                };
                let EndKind::Ended(state) = end.kind else {
                    // A re-drive whose write failed stays unwritten: written late, it
                    // could land after the job's next end and undo it at a restart.
                    return false;
                };
                self.jobs.get(&end.job_id).is_some_and(|job| {
                    !job.final_durable
                        && (job.state, job.attempt, job.budget_base)
                            == (state, end.attempt, end.budget_base)
                })
            })
            .cloned()
            .collect()
    }

    /// The records in `written` (a call's `finals`) are durable: the submitters of the ends
    /// among them are told (and told again on every reconnect until they acknowledge).
    /// Only the end a record holds is announced: a job that moved on since (re-driven,
    /// then ended again) waits for the record of its new end, which may not be durable
    /// yet; a re-drive's record announces nothing.
    pub fn finals_written(&mut self, written: &[JobRecord]) -> Effects<H> {
        let mut fx = Effects::default();
        for record in written {
            let JobRecord::End(EndRecord {
                job_id: id,
                kind: EndKind::Ended(state),
                attempt,
                budget_base,
                ..
            }) = record
            else {
                continue;
            };
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            if (job.state, job.attempt, job.budget_base) != (*state, *attempt, *budget_base) {
                continue; // not the end written: re-driven (and maybe ended) meanwhile
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
            self.end_lease(job_id, now_ms);
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

    /// The swarm a job was submitted to, while the queue holds it.
    pub fn swarm_of(&self, job_id: JobId) -> Option<&str> {
        self.jobs.get(&job_id).map(|job| job.spec.swarm.as_str())
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
        if !job.durable {
            // Its spec's write may still fail; and once it succeeds, `submitted` queues it.
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: "the job is still being written".into(),
                retry_after_ms: 10,
            });
        }
        let attempt = job.attempt;
        if let Some(worker) = self.end_lease(job_id, now_ms) {
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
    pub fn ack(&mut self, agent: &str, job_id: JobId, end: AckedEnd) -> Effects<H> {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get(&job_id) else {
            return fx;
        };
        if job.spec.submitter != agent || !job.state.is_final() || !job.final_durable {
            return fx;
        }
        if let AckedEnd::Of { attempt, state } = end {
            if (job.attempt, job.state) != (attempt, state) {
                // An end the job no longer has: a dead letter re-driven since, whose new
                // end its submitter may not have seen.
                return fx;
            }
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
        forget_spec_and_lease(&mut fx, &swarm, job_id);
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

    /// The jobs held (of `swarm` when given) after `after` in id order, at most `limit`,
    /// and whether more follow (the admin view; sorts what it selects: not for a hot path).
    pub fn list(&self, swarm: Option<&str>, after: JobId, limit: usize) -> (Vec<JobSummary>, bool) {
        let mut ids: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(id, job)| **id > after && swarm.is_none_or(|s| job.spec.swarm == s))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        let page = ids
            .into_iter()
            .take(limit)
            .filter_map(|id| {
                let job = self.jobs.get(&id)?;
                Some(JobSummary {
                    job_id: id,
                    swarm: job.spec.swarm.clone(),
                    submitter: job.spec.submitter.clone(),
                    state: job.state,
                    attempt: job.attempt,
                    priority: job.spec.priority,
                    model: job.spec.model.clone(),
                    submitted_ms: job.spec.submitted_ms,
                    lease_expires_ms: job.lease.as_ref().map(|l| l.expires_ms),
                })
            })
            .collect();
        (page, more)
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
                forget_spec_and_lease(&mut fx, &swarm, job_id);
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

pub(super) fn unknown_job(job_id: JobId) -> Refusal {
    Refusal {
        code: ErrorCode::UnknownJob,
        message: format!("no job {} in this swarm", job_id.0),
        retry_after_ms: 0,
    }
}

pub(super) fn status_frame(
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

pub(super) fn cancel_frame(job_id: JobId, attempt: u32) -> OutFrame {
    encode(&Message::JobCancel {
        request_id: 0,
        job_id,
        attempt,
    })
}

/// A JobUpdate with the job's latest progress (the caller checked there is one).
pub(super) fn progress_frame<H>(job: &Job<H>) -> OutFrame {
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

pub(super) fn end_frame<H>(job: &Job<H>) -> OutFrame {
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

/// Empties a job's spec and lease records (compaction then drops them).
fn forget_spec_and_lease<H>(fx: &mut Effects<H>, swarm: &str, job_id: JobId) {
    fx.records.push(JobRecord::Forget {
        swarm: swarm.to_owned(),
        job_id,
    });
    fx.records.push(JobRecord::ForgetLease {
        swarm: swarm.to_owned(),
        job_id,
    });
}
