//! Starting the job queue from the records read back from its logs.

use super::*;

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
            timings: JobTimings::default(),
            bytes_held: 0,
            bytes_by_agent: HashMap::new(),
            logs: HashSet::new(),
            forgotten: Vec::new(),
            cached_payload_bytes: 0,
        };
        jobs.restore(records, now_ms);
        jobs
    }

    // One arm per record kind, applied in log order: a replay, long by design.
    pub(super) fn restore(&mut self, records: impl IntoIterator<Item = JobRecord>, now_ms: u64) {
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
            let mut job = Job::queued(spec, now_ms);
            job.attempt = f.attempt;
            // Read back from the log: durable already.
            job.durable = true;
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
                        if end.kind == EndKind::Redriven {
                            // A re-driven job is not held to the deadline it missed (as
                            // `redrive` says in memory; the spec record keeps it).
                            let mut spec = (*job.spec).clone();
                            spec.deadline_ms = 0;
                            job.spec = Arc::new(spec);
                        }
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
}
