//! Submits, credits and dispatch: jobs queued per swarm and leased to workers.

use super::*;

impl<H: Handle + Clone> Jobs<H> {
    pub(super) fn queue(&mut self, swarm: &str) -> &mut SwarmQueue {
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

    pub(super) fn remember_key(
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
    pub(super) fn prune_keys(&mut self, now_ms: u64) {
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

    pub(super) fn random(&mut self) -> u64 {
        // splitmix64, as the client's Backoff.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The wait before retry number `failures` (1 = after the first lost attempt): uniform
    /// in [0, min(cap, base x 2^(failures-1))] (full jitter).
    pub(super) fn backoff_ms(&mut self, failures: u32) -> u64 {
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

    /// Queue wait and run time histograms and counts, since the queue started.
    pub fn timings(&self) -> &JobTimings {
        &self.timings
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
    // A submit's checks in the order they apply (payload, deadline, swarm caps, the
    // duplicate window with its answers, byte caps), then the new job: each check may answer
    // alone, and they read best in sequence.
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
        let record = JobRecord::Spec(spec.clone());
        let mut job = Job::queued(spec, now_ms);
        job.waiters.push((outbox.clone(), submit.request_id));
        self.jobs.insert(job_id, job);
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
    pub(super) fn make_ready(&mut self, job_id: JobId, now_ms: u64) {
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

    pub(super) fn remove_from_queue(&mut self, job_id: JobId) {
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
    pub(super) fn promote(&mut self, now_ms: u64) {
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
    pub(super) fn pick_worker(&self, swarm: &str, model: Option<&str>) -> Option<ConnId> {
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
    pub(super) fn dispatch(&mut self, now_ms: u64, fx: &mut Effects<H>) {
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

    pub(super) fn lease(&mut self, job_id: JobId, conn: ConnId, now_ms: u64, fx: &mut Effects<H>) {
        let lease_ms = self.config.visibility_timeout_ms;
        let (Some(job), Some(worker)) = (self.jobs.get_mut(&job_id), self.workers.get_mut(&conn))
        else {
            return;
        };
        job.attempt += 1;
        job.state = JobState::Running;
        JobTimings::record(&mut self.timings.queue_wait_us, job.ready_at_ms, now_ms);
        if job.attempt > 1 {
            self.timings.redeliveries += 1;
        }
        let expires_ms = now_ms + u64::from(lease_ms);
        job.lease = Some(Lease {
            worker: conn,
            expires_ms,
            leased_ms: now_ms,
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

    /// Ends the current lease of a job (if any) at `now_ms`, freeing its worker's credit.
    /// Returns the worker's outbox.
    pub(super) fn end_lease(&mut self, job_id: JobId, now_ms: u64) -> Option<H> {
        let job = self.jobs.get_mut(&job_id)?;
        let lease = job.lease.take()?;
        JobTimings::record(&mut self.timings.run_us, lease.leased_ms, now_ms);
        self.leases.remove(&(lease.expires_ms, job_id, job.attempt));
        let worker = self.workers.get_mut(&lease.worker)?;
        worker.leases.remove(&job_id);
        Some(worker.outbox.clone())
    }
}
