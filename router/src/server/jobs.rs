//! Job handlers of a session: submits, credits, progress, results, cancels, acknowledgements,
//! dead letters and re-drives, answered by the job queue ([`swarmbus_proto::jobs`]).

use super::*;
use swarmbus_schema::{JobId, JobProgress, JobResult, SubmitJob};

impl Session {
    pub(super) async fn submit_job(&self, submit: SubmitJob) -> Result<(), Fault> {
        let request_id = submit.request_id;
        if request_id == 0 {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                "a SubmitJob needs a non-zero request_id",
            ));
        }
        check_name("idempotency_key", &submit.idempotency_key)?;
        if let Some(why) = self.denied(crate::auth::Action::JobsSubmit, &submit.swarm, None) {
            let refusal = Refusal::new(ErrorCode::Forbidden, why);
            let _ = self
                .outbox
                .push(Lane::JobAnswers, refusal.frame(request_id));
            return Ok(());
        }
        if let Some(model) = submit.model.as_deref() {
            check_name("model", model)?;
        }
        if !self.joined(&submit.swarm) {
            self.not_joined(&submit.swarm, request_id);
            return Ok(());
        }
        let max = self.max_job_payload_bytes();
        if submit.payload.len() > max {
            self.refuse(
                ErrorCode::PayloadTooLarge,
                request_id,
                format!(
                    "job payload of {} bytes exceeds the maximum of {max} bytes",
                    submit.payload.len()
                ),
            );
            return Ok(());
        }
        let context = &self.context;
        let now_ms = context.now_ms();
        let outcome = context
            .jobs()
            .submit(&self.agent, &self.outbox, submit, now_ms);
        // Answered on the job answer stream, beside the job stream: a backlog of
        // submissions and their answers stays off the session stream (and, with a
        // bulk connection, off the main connection).
        match outcome {
            Err(refusal) => {
                let _ = self
                    .outbox
                    .push(Lane::JobAnswers, refusal.frame(request_id));
            }
            Ok(Submitted::Answer(frame)) => {
                let _ = self.outbox.push(Lane::JobAnswers, frame);
            }
            Ok(Submitted::Waiting) => {}
            Ok(Submitted::New { job_id, record }) => {
                // Written in a task: a submitter keeps many submits in flight, and
                // group commit makes them durable together.
                let context = context.clone();
                tokio::spawn(async move {
                    let written = context.write_records_at(vec![record.into()], true).await;
                    let now_ms = context.now_ms();
                    let mut jobs = context.jobs();
                    if let Some(op) = written.as_ref().ok().and_then(|ops| ops.first()) {
                        jobs.spec_written_at(job_id, *op);
                    }
                    let effects = jobs.submitted(job_id, written.map(|_| ()), now_ms);
                    drop(jobs);
                    context.apply_job_effects(effects);
                });
            }
        }
        Ok(())
    }

    pub(super) async fn job_credits(&self, credits: u32) -> Result<(), Fault> {
        if self.role != Role::Worker {
            self.refuse(
                ErrorCode::Forbidden,
                0,
                "only sessions of role worker may take jobs".into(),
            );
            return Ok(());
        }
        if let Some(why) = self.denied(crate::auth::Action::JobsTake, "", None) {
            self.refuse(ErrorCode::Forbidden, 0, why);
            return Ok(());
        }
        let now_ms = self.context.now_ms();
        let effects = self.context.jobs().credits(self.conn, credits, now_ms);
        self.context.apply_job_effects(effects);
        Ok(())
    }

    pub(super) async fn job_progress(&self, progress: JobProgress) -> Result<(), Fault> {
        if self.role != Role::Worker {
            return Ok(());
        }
        let now_ms = self.context.now_ms();
        let effects = self.context.jobs().progress(self.conn, progress, now_ms);
        self.context.apply_job_effects(effects);
        Ok(())
    }

    pub(super) async fn job_result(&self, result: JobResult) -> Result<(), Fault> {
        let request_id = result.request_id;
        if self.role != Role::Worker {
            self.refuse(
                ErrorCode::Forbidden,
                request_id,
                "only sessions of role worker may report job results".into(),
            );
            return Ok(());
        }
        let max = self.max_job_payload_bytes();
        if result.payload.len() > max {
            self.refuse(
                ErrorCode::PayloadTooLarge,
                request_id,
                format!(
                    "job result of {} bytes exceeds the maximum of {max} bytes",
                    result.payload.len()
                ),
            );
            return Ok(());
        }
        let now_ms = self.context.now_ms();
        let outcome = self
            .context
            .jobs()
            .result(self.conn, &self.outbox, result, now_ms);
        match outcome {
            Ok(effects) => self.context.apply_job_effects(effects),
            Err(refusal) => {
                debug!(code = %refusal.code, message = %refusal.message, "job result rejected");
                let _ = self
                    .outbox
                    .push(Lane::JobAnswers, refusal.frame(request_id));
            }
        }
        Ok(())
    }

    pub(super) async fn cancel_job(&self, request_id: u64, job_id: JobId) -> Result<(), Fault> {
        let now_ms = self.context.now_ms();
        // With credentials, a controller cancels others' jobs only in swarms it joined (its
        // credential grants them to it as controller); elsewhere it is one submitter among
        // others.
        let scoped = self.credentialed();
        let mut jobs = self.context.jobs();
        let swarm = jobs.swarm_of(job_id).unwrap_or_default().to_owned();
        if let Some(why) = self.denied(crate::auth::Action::JobsCancel, &swarm, None) {
            drop(jobs);
            let _ = self.outbox.push(
                Lane::Session,
                Refusal::new(ErrorCode::Forbidden, why).frame(request_id),
            );
            return Ok(());
        }
        let controls = self.controls(crate::auth::Action::JobsCancel, &swarm)
            && (!scoped
                || jobs
                    .swarm_of(job_id)
                    .is_some_and(|swarm| self.joined(swarm)));
        let outcome = jobs.cancel(
            &self.agent,
            controls,
            &self.outbox,
            request_id,
            job_id,
            now_ms,
        );
        drop(jobs);
        match outcome {
            Ok(effects) => self.context.apply_job_effects(effects),
            Err(refusal) => {
                let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
            }
        }
        Ok(())
    }

    pub(super) async fn ack_job(&self, job_id: JobId, end: AckedEnd) -> Result<(), Fault> {
        let effects = self.context.jobs().ack(&self.agent, job_id, end);
        self.context.apply_job_effects(effects);
        Ok(())
    }

    pub(super) async fn list_dead_letters(
        &self,
        request_id: u64,
        swarm: String,
        after_job_id: JobId,
        limit: u32,
    ) -> Result<(), Fault> {
        if !self.controller_of(&swarm, request_id) {
            return Ok(());
        }
        let mut page = self
            .context
            .jobs()
            .dead_letters(&swarm, after_job_id, limit);
        page.request_id = request_id;
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::DeadLetters(page)));
        Ok(())
    }

    pub(super) async fn redrive_job(
        &self,
        request_id: u64,
        swarm: String,
        job_id: JobId,
    ) -> Result<(), Fault> {
        if !self.controller_of(&swarm, request_id) {
            return Ok(());
        }
        let now_ms = self.context.now_ms();
        let outcome = self
            .context
            .jobs()
            .redrive(&swarm, &self.outbox, request_id, job_id, now_ms);
        match outcome {
            Ok(effects) => self.context.apply_job_effects(effects),
            Err(refusal) => {
                let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
            }
        }
        Ok(())
    }
}
