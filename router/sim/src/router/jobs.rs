//! The job queue's inputs and effects, as `router/src/server/jobs.rs` and
//! `Context::apply_job_effects` carry them out: frames pushed at once, records appended
//! without waiting, ends made durable before they are announced, payloads kept on disk
//! read back from the job log for their lease.

use swarmbus_proto::jobs::{log_swarm, AckedEnd, Effects, JobRecord, PayloadLoad, Submitted};
use swarmbus_schema::{JobLease, JobProgress, JobResult, SubmitJob};

use super::*;

/// Effects of the job queue, with the simulation's handle.
type JobEffects = Effects<ConnId>;

impl SimRouter {
    /// A session was established; workers take jobs of `worker_swarms`.
    pub fn connect_jobs(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        agent: &str,
        worker_swarms: Option<&[String]>,
    ) {
        let mut effects = self.jobs.connect(conn, agent, &conn, worker_swarms);
        // `connect` lists the progress of running jobs in hash-map order; sorted (the
        // frames are independent of each other) so a run replays from its seed.
        effects.frames.sort_by_key(|(_, _, frame)| frame.to_vec());
        self.apply_job_effects(io, effects);
        self.settle(io);
    }

    pub fn credits(&mut self, io: &mut Io<'_>, conn: ConnId, credits: u32) {
        let effects = self.jobs.credits(conn, credits, io.now.unix_ms);
        self.apply_job_effects(io, effects);
        self.settle(io);
    }

    /// A submit (`Session::submit_job`): a new job's spec is written, and the submit
    /// answered, once durable.
    pub fn submit(&mut self, io: &mut Io<'_>, conn: ConnId, agent: &str, submit: SubmitJob) {
        let request_id = submit.request_id;
        match self.jobs.submit(agent, &conn, submit, io.now.unix_ms) {
            Err(refused) => io
                .out
                .push(conn, Lane::JobAnswers, refused.frame(request_id)),
            Ok(Submitted::Answer(frame)) => io.out.push(conn, Lane::JobAnswers, frame),
            Ok(Submitted::Waiting) => {}
            Ok(Submitted::New { job_id, record }) => {
                let (swarm, key, payload) = internal_of(&record);
                self.write_internal(io, swarm, key, payload, Some(Waiter::Spec { job_id }));
            }
        }
        self.settle(io);
    }

    pub(super) fn spec_written(
        &mut self,
        io: &mut Io<'_>,
        job_id: JobId,
        result: Result<OpId, String>,
    ) {
        if let Ok(op) = &result {
            self.jobs.spec_written_at(job_id, *op);
        }
        let effects = self
            .jobs
            .submitted(job_id, result.map(|_| ()), io.now.unix_ms);
        self.apply_job_effects(io, effects);
    }

    pub fn progress(&mut self, io: &mut Io<'_>, conn: ConnId, progress: JobProgress) {
        let effects = self.jobs.progress(conn, progress, io.now.unix_ms);
        self.apply_job_effects(io, effects);
        self.settle(io);
    }

    /// A worker's result; returns whether the job queue accepted it (not fenced).
    pub fn result(&mut self, io: &mut Io<'_>, conn: ConnId, result: JobResult) -> bool {
        let request_id = result.request_id;
        let accepted = match self.jobs.result(conn, &conn, result, io.now.unix_ms) {
            Ok(effects) => {
                self.apply_job_effects(io, effects);
                true
            }
            Err(refused) => {
                io.out
                    .push(conn, Lane::JobAnswers, refused.frame(request_id));
                false
            }
        };
        self.settle(io);
        accepted
    }

    /// A submitter's cancel.
    pub fn cancel(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        agent: &str,
        request_id: u64,
        job_id: JobId,
    ) {
        let now_ms = io.now.unix_ms;
        match self
            .jobs
            .cancel(agent, false, &conn, request_id, job_id, now_ms)
        {
            Ok(effects) => self.apply_job_effects(io, effects),
            Err(refused) => io.out.push(conn, Lane::Session, refused.frame(request_id)),
        }
        self.settle(io);
    }

    /// The submitter handled a job's end.
    pub fn job_ack(&mut self, io: &mut Io<'_>, agent: &str, job_id: JobId, end: AckedEnd) {
        let effects = self.jobs.ack(agent, job_id, end);
        self.apply_job_effects(io, effects);
        self.settle(io);
    }

    /// A controller re-drives a dead letter of `swarm`.
    pub fn redrive(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        swarm: &str,
        request_id: u64,
        job_id: JobId,
    ) {
        match self
            .jobs
            .redrive(swarm, &conn, request_id, job_id, io.now.unix_ms)
        {
            Ok(effects) => self.apply_job_effects(io, effects),
            Err(refused) => io.out.push(conn, Lane::Session, refused.frame(request_id)),
        }
        self.settle(io);
    }

    /// `Context::apply_job_effects`.
    pub(super) fn apply_job_effects(&mut self, io: &mut Io<'_>, effects: JobEffects) {
        let Effects {
            frames,
            records,
            finals,
            after_finals,
            loads,
        } = effects;
        for (to, lane, frame) in frames {
            io.out.push(to, lane, frame);
        }
        for load in loads {
            self.send_loaded_lease(io, load);
        }
        if records.is_empty() && finals.is_empty() {
            for (to, lane, frame) in after_finals {
                io.out.push(to, lane, frame);
            }
            return;
        }
        for record in &records {
            let (swarm, key, payload) = internal_of(record);
            self.write_internal(io, swarm, key, payload, None);
        }
        if finals.is_empty() {
            return;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.finals.insert(
            group,
            FinalsGroup {
                written: finals.clone(),
                left: finals.len(),
                after: after_finals,
            },
        );
        for record in &finals {
            let (swarm, key, payload) = internal_of(record);
            self.write_internal(io, swarm, key, payload, Some(Waiter::Finals { group }));
        }
    }

    /// One end of a group is durable; once all are, the ends are announced.
    pub(super) fn final_written(&mut self, io: &mut Io<'_>, group: u64) {
        let Some(entry) = self.finals.get_mut(&group) else {
            return;
        };
        entry.left -= 1;
        if entry.left > 0 {
            return;
        }
        let Some(entry) = self.finals.remove(&group) else {
            return;
        };
        let announced = self.jobs.finals_written(&entry.written);
        for (to, lane, frame) in announced.frames.into_iter().chain(entry.after) {
            io.out.push(to, lane, frame);
        }
    }

    /// A lease whose payload is on disk only: read back from the job log, then sent; one
    /// that cannot be read ends its attempt (`send_loaded_lease`).
    fn send_loaded_lease(&mut self, io: &mut Io<'_>, load: PayloadLoad<ConnId>) {
        let PayloadLoad { to, log, op, lease } = load;
        let payload = io
            .log
            .swarm(&log)
            .and_then(|swarm| swarm.record(op))
            .and_then(|record| deliver_of(&record.frame))
            .and_then(|deliver| JobRecord::parse(deliver.key.as_deref()?, &deliver.payload))
            .and_then(|record| match record {
                JobRecord::Spec(spec) => Some(spec.payload),
                _ => None,
            });
        match payload {
            Some(payload) => {
                let lease = JobLease { payload, ..lease };
                io.out
                    .push(to, Lane::Jobs, encode(&Message::JobLease(lease)));
            }
            None => {
                let why = format!("op {} of {log} is not a job's spec", op.0);
                let effects = self.jobs.lease_undeliverable(
                    to,
                    lease.job_id,
                    lease.attempt,
                    &why,
                    io.now.unix_ms,
                );
                self.apply_job_effects(io, effects);
            }
        }
    }
}

/// The internal swarm, key and payload of a job record (`InternalRecord::from`).
fn internal_of(record: &JobRecord) -> (String, String, Bytes) {
    (log_swarm(record.swarm()), record.key(), record.payload())
}
