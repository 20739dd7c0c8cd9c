//! A session's admission (roles, rate limits, breakers) and its dispatch: a short match that
//! hands each message to its handler family (routing, control, affinity, jobs).

use super::*;
use crate::auth::Action;

impl SessionLimits {
    pub(super) fn buckets_for(&mut self, swarm: &str) -> &mut ClassBuckets {
        match self.swarm_buckets.get_mut(swarm) {
            Some(buckets) => buckets,
            None => &mut self.buckets,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let guards = std::mem::take(&mut self.swarm_guards);
        self.context.release_swarm_guards(guards);
    }
}

impl Session {
    pub(super) fn joined(&self, swarm: &str) -> bool {
        self.swarms.contains(swarm)
    }

    pub(super) fn refuse(&self, code: ErrorCode, request_id: u64, message: String) {
        self.refuse_with_retry(code, request_id, message, 0);
    }

    pub(super) fn refuse_with_retry(
        &self,
        code: ErrorCode,
        request_id: u64,
        message: String,
        retry_after_ms: u32,
    ) {
        let refusal = Refusal::new(code, message).retry_after(retry_after_ms);
        let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
    }

    pub(super) async fn to_shard(&self, swarm: &str, command: ShardCommand) {
        // A send fails only while the router shuts down; the connection closes then too.
        let _ = self.context.shard_for(swarm).send(command).await;
    }

    /// Largest job payload (spec or result): the record holding it must fit a frame.
    pub(super) fn max_job_payload_bytes(&self) -> usize {
        self.max_payload_bytes
            .saturating_sub(swarmbus_proto::jobs::JOB_RECORD_OVERHEAD_BYTES)
    }

    /// Whether this session may list and re-drive the dead letters of `swarm`: a controller
    /// (or allowed `jobs.redrive`) that joined it, not denied `jobs.redrive` there; refuses
    /// the request otherwise.
    pub(super) fn controller_of(&self, swarm: &str, request_id: u64) -> bool {
        if !self.controls(crate::auth::Action::JobsRedrive, swarm) {
            self.refuse(
                ErrorCode::Forbidden,
                request_id,
                "only controllers (or sessions the policy allows jobs.redrive) may list and \
                 re-drive dead letters"
                    .into(),
            );
            return false;
        }
        if !self.joined(swarm) {
            self.not_joined(swarm, request_id);
            return false;
        }
        if let Some(why) = self.denied(crate::auth::Action::JobsRedrive, swarm, None) {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return false;
        }
        true
    }

    pub(super) fn not_joined(&self, swarm: &str, request_id: u64) {
        self.refuse(
            ErrorCode::SwarmNotJoined,
            request_id,
            format!("swarm {swarm:?} was not joined in Hello"),
        );
    }

    /// Refuses a publish: with an Error when the publisher expects a reply; fire-and-forget
    /// messages get none (a flood of them must not become a flood of replies) and are
    /// counted and logged instead.
    pub(super) fn refuse_publish(&self, publish: &Publish, code: ErrorCode, message: String) {
        if publish.request_id != 0 || publish.class.is_ordered() {
            self.refuse(code, publish.request_id, message);
        } else {
            self.context
                .stats
                .refused_unacknowledged
                .fetch_add(1, Ordering::Relaxed);
            debug!(swarm = %publish.swarm, %code, %message, "unacknowledged publish dropped");
        }
    }

    /// Checks a publish (swarm joined, names, rate limit, payload size); refuses it and
    /// returns false when it may not go on.
    pub(super) fn admit_publish(
        &self,
        publish: &Publish,
        limits: &mut SessionLimits,
        now: std::time::Instant,
    ) -> bool {
        if !self.joined(&publish.swarm) {
            let text = format!("swarm {:?} was not joined in Hello", publish.swarm);
            self.refuse_publish(publish, ErrorCode::SwarmNotJoined, text);
            return false;
        }
        let names_ok = [publish.target_agent.as_deref(), publish.key.as_deref()]
            .into_iter()
            .flatten()
            .all(valid_name);
        if !names_ok {
            let text = format!("target_agent and key must be 1 to {MAX_NAME_BYTES} bytes");
            self.refuse_publish(publish, ErrorCode::InvalidRequest, text);
            return false;
        }
        let sets_config = publish.class == Class::Control
            && publish
                .key
                .as_deref()
                .is_some_and(|k| k.starts_with(CONFIG_KEY_PREFIX));
        if sets_config {
            let action = crate::auth::Action::Config;
            let refused = match self.controls(action, &publish.swarm) {
                false => Some(
                    "only controllers (or sessions the policy allows config) may change a \
                     swarm's configuration"
                        .to_owned(),
                ),
                true => self.denied(action, &publish.swarm, None),
            };
            if let Some(text) = refused {
                self.refuse_publish(publish, ErrorCode::Forbidden, text);
                return false;
            }
        }
        if publish.fencing_token != 0 {
            let lease = publish.lease.as_deref().unwrap_or(DEFAULT_LEASE);
            let now_ms = self.context.clock.now_ms();
            let checked = self.context.control().leases.check_stamp(
                &publish.swarm,
                lease,
                &self.agent,
                publish.fencing_token,
                now_ms,
            );
            if let Err(refusal) = checked {
                let text = match refusal {
                    swarmbus_proto::control::StampRefusal::Stale { newest_token } => format!(
                        "fencing token {} of lease {lease:?} is not the newest ({newest_token})",
                        publish.fencing_token
                    ),
                    swarmbus_proto::control::StampRefusal::NotHeld { .. } => format!(
                        "fencing token {} of lease {lease:?} is not held by this agent \
                         (expired, released or another's)",
                        publish.fencing_token
                    ),
                };
                self.refuse_publish(publish, ErrorCode::StaleFencingToken, text);
                return false;
            }
        }
        if let Err(wait) = limits
            .buckets_for(&publish.swarm)
            .try_take(publish.class, now)
        {
            self.refuse_fast(
                publish,
                ErrorCode::RateLimited,
                "above this session's rate limit",
                wait,
            );
            return false;
        }
        let class_max = self
            .context
            .config
            .limits
            .max_payload_bytes
            .for_class(publish.class) as usize;
        let max = self.max_payload_bytes.min(class_max);
        if publish.payload.len() > max {
            let text = format!(
                "payload of {} bytes exceeds the {} class's maximum of {max} bytes \
                 (limits.max_payload_bytes); heavy work belongs in the job queue",
                publish.payload.len(),
                publish.class
            );
            self.refuse_publish(publish, ErrorCode::PayloadTooLarge, text);
            return false;
        }
        true
    }

    /// A publish refused by the rate limit (`RateLimited`) or an open breaker
    /// (`CircuitOpen`). Publishes that expect a reply are refused with a retry hint;
    /// fire-and-forget ones are dropped, counted, and the sender is told at most once a
    /// second how many were dropped.
    pub(super) fn refuse_fast(
        &self,
        publish: &Publish,
        code: ErrorCode,
        why: &str,
        wait: Duration,
    ) {
        let retry_after_ms = wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let stats = &self.context.stats;
        let (refused, dropped) = if code == ErrorCode::CircuitOpen {
            (&stats.breaker_refused, &stats.breaker_dropped)
        } else {
            (&stats.rate_limited_refused, &stats.rate_limited_dropped)
        };
        if publish.request_id != 0 || publish.class.is_ordered() {
            refused.fetch_add(1, Ordering::Relaxed);
            self.refuse_with_retry(
                code,
                publish.request_id,
                format!("{} publish refused: {why}", publish.class),
                retry_after_ms,
            );
            return;
        }
        dropped.fetch_add(1, Ordering::Relaxed);
        let notice = {
            let mut state = self
                .fast_refusals
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.0 += 1;
            if state.1.elapsed() >= Duration::from_secs(1) {
                let dropped = std::mem::take(&mut state.0);
                state.1 = std::time::Instant::now();
                Some(dropped)
            } else {
                None
            }
        };
        if let Some(dropped) = notice {
            self.refuse_with_retry(
                code,
                0,
                format!("{dropped} unacknowledged publishes dropped: {why}"),
                retry_after_ms,
            );
        }
    }

    /// Publishes a breaker transition on the alert class: a session breaker's on every swarm
    /// the session joined, a swarm breaker's on that swarm.
    pub(super) async fn announce_breaker(
        &self,
        scope: BreakerScope,
        swarm: &str,
        state: BreakerState,
    ) {
        self.context
            .stats
            .breaker_transitions
            .fetch_add(1, Ordering::Relaxed);
        let payload = match scope {
            BreakerScope::Session => {
                tracing::info!(agent = %self.agent, state = state.name(), "session circuit breaker");
                format!(
                    "{{\"event\":\"circuit-breaker\",\"scope\":\"session\",\"agent\":{},\"state\":\"{}\"}}",
                    json_string(&self.agent),
                    state.name()
                )
            }
            BreakerScope::Swarm => {
                tracing::info!(swarm, state = state.name(), "swarm circuit breaker");
                format!(
                    "{{\"event\":\"circuit-breaker\",\"scope\":\"swarm\",\"swarm\":{},\"state\":\"{}\"}}",
                    json_string(swarm),
                    state.name()
                )
            }
        };
        let context = &self.context;
        match scope {
            BreakerScope::Session => {
                let swarms = self.swarms.iter().map(String::as_str);
                context.announce(swarms, "circuit-breaker", payload).await
            }
            BreakerScope::Swarm => context.announce([swarm], "circuit-breaker", payload).await,
        }
    }

    /// Runs a publish past the session's breaker, the swarm's breaker (control messages
    /// pass it) and the session's rate limit, under one lock of the session's limits. Fills
    /// `changes` with the breaker transitions to announce.
    pub(super) fn admit(
        &self,
        publish: &Publish,
        now: std::time::Instant,
        changes: &mut Vec<(BreakerScope, BreakerState)>,
    ) -> Admission {
        // Before the breakers: a denial is the policy working, not a failure that should
        // trip this session's breaker or the swarm's.
        let class = publish.class.name();
        if let Some(why) = self.denied(Action::Publish, &publish.swarm, Some(class)) {
            self.refuse_publish(publish, ErrorCode::Forbidden, why);
            return Admission::Refused;
        }
        let mut limits = self
            .limits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (verdict, half_opened) = limits.breaker.check(now);
        changes.extend(half_opened.map(|state| (BreakerScope::Session, state)));
        if let Err(wait) = verdict {
            return Admission::Open(BreakerScope::Session, wait);
        }
        let guard = self
            .swarm_guards
            .get(&publish.swarm)
            .filter(|_| publish.class != Class::Control);
        if let Some(guard) = guard {
            let (verdict, half_opened) = guard.check(now);
            changes.extend(half_opened.map(|state| (BreakerScope::Swarm, state)));
            if let Err(wait) = verdict {
                // Not this session's failure: its own breaker is left alone.
                return Admission::Open(BreakerScope::Swarm, wait);
            }
        }
        let admitted = self.admit_publish(publish, &mut limits, now);
        let (session_change, swarm_change) = if admitted {
            (limits.breaker.success(), guard.and_then(|g| g.success()))
        } else {
            (
                limits.breaker.failure(now),
                guard.and_then(|g| g.failure(now)),
            )
        };
        changes.extend(session_change.map(|state| (BreakerScope::Session, state)));
        changes.extend(swarm_change.map(|state| (BreakerScope::Swarm, state)));
        if admitted {
            Admission::Admitted
        } else {
            Admission::Refused
        }
    }

    /// Handles one message of an established session.
    pub(super) async fn dispatch(&self, message: Message) -> Result<(), Fault> {
        match message {
            Message::Publish(publish) => self.publish(publish).await?,
            Message::Subscribe(subscription) => self.subscribe(subscription).await?,
            Message::Unsubscribe(subscription) => self.unsubscribe(subscription).await?,
            Message::Ack {
                swarm,
                class,
                op_id,
            } => self.ack(swarm, class, op_id).await?,
            Message::DeltaRequest {
                request_id,
                swarm,
                from_op,
                to_op,
            } => self.delta(request_id, swarm, from_op, to_op).await?,
            // Liveness is recorded by the session loop for every message it reads.
            Message::Heartbeat { .. } => {}
            Message::PresenceQuery { request_id, swarm } => {
                self.presence_query(request_id, swarm).await?
            }
            Message::LeaseRequest(request) => self.lease(request).await?,
            Message::SafetyAction(action) => self.safety(action).await?,
            Message::WorkerStatus(status) => self.register_worker(status).await?,
            Message::OpenSession {
                request_id,
                session_key,
                model,
            } => self.open_session(request_id, session_key, model).await?,
            Message::CloseSession {
                request_id,
                session_key,
            } => self.close_session(request_id, session_key).await?,
            Message::Request(request) => self.request(request).await?,
            Message::Reply(reply) => self.reply(reply).await?,
            Message::SubmitJob(submit) => self.submit_job(submit).await?,
            Message::JobCredits { credits } => self.job_credits(credits).await?,
            Message::JobProgress(progress) => self.job_progress(progress).await?,
            Message::JobResult(result) => self.job_result(result).await?,
            Message::JobCancel {
                request_id, job_id, ..
            } => self.cancel_job(request_id, job_id).await?,
            Message::JobAck {
                job_id,
                attempt,
                state,
            } => {
                self.ack_job(job_id, AckedEnd::from_wire(attempt, state))
                    .await?
            }
            Message::ListDeadLetters {
                request_id,
                swarm,
                after_job_id,
                limit,
            } => {
                self.list_dead_letters(request_id, swarm, after_job_id, limit)
                    .await?
            }
            Message::Authenticate {
                request_id,
                credential,
            } => self.authenticate(request_id, credential).await?,
            Message::RedriveJob {
                request_id,
                swarm,
                job_id,
            } => self.redrive_job(request_id, swarm, job_id).await?,
            Message::Hello(_) => {
                return Err(Fault::new(
                    ErrorCode::DuplicateHello,
                    "Hello on an established session",
                ))
            }
            other => {
                return Err(Fault::new(
                    ErrorCode::UnexpectedMessage,
                    format!("{} is sent by the router, not by clients", other.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// Counts one request in a one-second window (start, requests so far): whether it is past
/// `max_per_s`.
pub(super) fn over_per_second(window: &Mutex<(std::time::Instant, u32)>, max_per_s: u32) -> bool {
    let mut window = window
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if window.0.elapsed() >= Duration::from_secs(1) {
        *window = (std::time::Instant::now(), 0);
    }
    window.1 = window.1.saturating_add(1);
    window.1 > max_per_s
}

pub(super) fn subscription_key(s: &Subscription) -> (String, Class, Option<String>) {
    (s.swarm.clone(), s.class, s.agent_filter.clone())
}

pub(super) fn check_name(what: &str, name: &str) -> Result<(), Fault> {
    if !valid_name(name) {
        return Err(Fault::new(
            ErrorCode::InvalidRequest,
            format!("{what} must be 1 to {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// `text` as a JSON string literal.
pub(super) fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
