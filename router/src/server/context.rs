//! What every session shares ([`Context`]): the shards, the control plane's state, the job
//! queue and worker registry behind their locks, and the router's own publishes (internal
//! records and alerts).

use super::*;

impl Context {
    /// The credential checker now (`None`: `auth.mode = "none"`).
    pub(super) fn authenticator(&self) -> Option<Arc<crate::auth::Authenticator>> {
        self.auth
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The shard that owns `swarm`: the job queue's swarms have shards of their own.
    pub(super) fn shard_for(&self, swarm: &str) -> &ShardSender {
        if swarm.starts_with(JOBS_SWARM_PREFIX) {
            &self.job_shards[shard_of(swarm, self.job_shards.len())]
        } else {
            &self.shards[shard_of(swarm, self.shards.len())]
        }
    }

    /// A new connection's budget for unfinished frames.
    pub(super) fn partial_frames(&self) -> Arc<PartialFrames> {
        PartialFrames::new(
            self.config.limits.partial_frame_bytes,
            self.partial_frames.clone(),
        )
    }

    pub(super) fn attachments(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PendingAttach>> {
        self.attachments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn control(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes a router event (JSON payload) on the alert class of `swarms`, from agent
    /// `swarmbus-router` with `key`.
    pub(super) async fn announce<'a>(
        &self,
        swarms: impl IntoIterator<Item = &'a str> + Send,
        key: &str,
        payload: String,
    ) {
        let payload = Bytes::from(payload);
        for swarm in swarms {
            let publish = RouterPublish {
                swarm: swarm.to_owned(),
                class: Class::Alert,
                key: key.to_owned(),
                payload: payload.clone(),
                reply: None,
            };
            let _ = self
                .shard_for(swarm)
                .send(ShardCommand::RouterPublish(publish))
                .await;
        }
    }

    /// Announces a presence change of `agent` on its swarms.
    pub(super) async fn announce_presence(
        &self,
        agent: &str,
        present: &Present,
        event: &str,
        reason: &str,
    ) {
        let role = present.role.name();
        let payload = format!(
            "{{\"event\":\"{event}\",\"agent\":{},\"role\":\"{role}\",\"reason\":\"{reason}\",\"last_seen_ms\":{},\"metadata\":{}}}",
            json_string(agent),
            present.last_seen_ms(),
            json_string(&present.metadata)
        );
        let swarms = present.swarms.iter().map(String::as_str);
        self.announce(swarms, "presence", payload).await;
    }
}

impl From<JobRecord> for InternalRecord {
    fn from(record: JobRecord) -> Self {
        InternalRecord {
            swarm: swarmbus_proto::jobs::log_swarm(record.swarm()),
            key: record.key(),
            payload: record.payload(),
        }
    }
}

impl Context {
    /// Writes session pins to the router's pin log and waits until they are durable (or
    /// refused). Pins are written in order; the latest per session key wins on recovery.
    pub(super) async fn write_pins(&self, pins: Vec<PinWrite>) -> Result<(), String> {
        let records = pins
            .into_iter()
            .map(|pin| InternalRecord {
                swarm: PINS_SWARM.to_owned(),
                key: swarmbus_proto::workers::pin_key(&pin.session_key),
                payload: pin.payload(),
            })
            .collect();
        self.write_records(records, true).await
    }

    /// Writes records to the router's internal swarms (class control, so they go through
    /// the shards' sequencers and the event log like any command) and, with `wait`, waits
    /// until every one is durable (or refused). Records of one swarm are written in order;
    /// the latest per key wins on recovery and in compaction.
    pub(super) async fn write_records(
        &self,
        records: Vec<InternalRecord>,
        wait: bool,
    ) -> Result<(), String> {
        self.write_records_at(records, wait).await.map(|_| ())
    }

    /// [`Context::write_records`], returning with `wait` the op id each record got (in
    /// order; empty without `wait`).
    pub(super) async fn write_records_at(
        &self,
        records: Vec<InternalRecord>,
        wait: bool,
    ) -> Result<Vec<OpId>, String> {
        let mut answers = Vec::with_capacity(if wait { records.len() } else { 0 });
        for record in records {
            let (reply, answer) = if wait {
                let (reply, answer) = oneshot::channel();
                (Some(reply), Some(answer))
            } else {
                (None, None)
            };
            // Records of one swarm go to one shard's channel, in order.
            self.shard_for(&record.swarm)
                .send(ShardCommand::RouterPublish(RouterPublish {
                    swarm: record.swarm,
                    class: Class::Control,
                    key: record.key,
                    payload: record.payload,
                    reply,
                }))
                .await
                .map_err(|_| "the router is shutting down".to_owned())?;
            answers.extend(answer);
        }
        let count = answers.len();
        let wait =
            async {
                let mut ops = Vec::with_capacity(count);
                for answer in answers {
                    match answer.await {
                        Ok(Ok(op)) => ops.push(op),
                        Ok(Err(why)) => return Err(format!("writing to the router's log: {why}")),
                        // The shard went away with the record queued or in the log.
                        Err(_) => return Err(
                            "the router shut down before the record was durable (it may still be)"
                                .to_owned(),
                        ),
                    }
                }
                Ok(ops)
            };
        // The shard answers every record, durable or refused, so the outcome is never
        // guessed: a slow disk is waited for (and logged every 30 s); only a router shutting
        // down gives up waiting, and then says the outcome is unknown.
        tokio::pin!(wait);
        loop {
            match tokio::time::timeout(Duration::from_secs(30), &mut wait).await {
                Ok(result) => return result,
                Err(_) if self.shutting_down.load(Ordering::Acquire) => {
                    return Err(
                        "the router shut down before the record was durable (it may still be)"
                            .to_owned(),
                    )
                }
                Err(_) => tracing::warn!(
                    records = count,
                    "internal records not durable after 30 s; still waiting"
                ),
            }
        }
    }

    /// Reads a leased job's payload back from its job log and sends the lease, if it is
    /// still the job's current one (it may have been cancelled or expired meanwhile). A read
    /// that found its file gone (a compaction ran) is tried again; one that fails ends the
    /// attempt at once, as lost, with why.
    pub(super) async fn send_loaded_lease(self: &Arc<Self>, load: PayloadLoad) {
        let swarmbus_proto::jobs::PayloadLoad { to, log, op, lease } = load;
        let mut tries = 0;
        let payload = loop {
            let (reply, read) = oneshot::channel();
            let asked = self
                .shard_for(&log)
                .send(ShardCommand::ReadRecord {
                    swarm: log.clone(),
                    op,
                    reply,
                })
                .await;
            match (asked, read.await) {
                (Ok(()), Ok(Ok(frame))) => break spec_payload(&frame),
                (Ok(()), Ok(Err((true, _)))) if tries < 3 => tries += 1,
                (Ok(()), Ok(Err((_, error)))) => break Err(error),
                _ => return, // the router is shutting down
            }
        };
        let (job_id, attempt) = (lease.job_id, lease.attempt);
        match payload {
            Ok(payload) => {
                if self.jobs().holds_lease(to.conn(), job_id, attempt) {
                    let lease = swarmbus_schema::JobLease { payload, ..lease };
                    let _ = to.push(Lane::Jobs, encode(&Message::JobLease(lease)));
                }
            }
            Err(error) => {
                tracing::error!(job = job_id.0, %log, op = op.0, %error, "a job's payload could not be read back from its log");
                let why = format!("its payload could not be read back from the job log: {error}");
                let now_ms = self.now_ms();
                let effects =
                    self.jobs()
                        .lease_undeliverable(to.conn(), job_id, attempt, &why, now_ms);
                self.apply_job_effects(effects);
            }
        }
    }

    /// The job queue's clock: milliseconds.
    pub(super) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(super) fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        // As for the job queue: every change completes under the lock.
        self.workers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        // Every change under this lock completes before it is released; a panic cannot leave
        // it half-done in a way later calls would trip on, so a poisoned lock is still used.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Carries out what the job queue asked for: frames now; records appended and ends
    /// made durable in a task (so no session waits for the log), after which the ends are
    /// announced and the answers that waited for them pushed.
    pub(super) fn apply_job_effects(self: &Arc<Self>, effects: Effects) {
        let Effects {
            frames,
            records,
            finals,
            after_finals,
            loads,
        } = effects;
        for (outbox, lane, frame) in frames {
            let _ = outbox.push(lane, frame);
        }
        for load in loads {
            let context = self.clone();
            tokio::spawn(async move { context.send_loaded_lease(load).await });
        }
        if records.is_empty() && finals.is_empty() {
            for (outbox, lane, frame) in after_finals {
                let _ = outbox.push(lane, frame);
            }
            return;
        }
        let context = self.clone();
        tokio::spawn(async move {
            let records: Vec<InternalRecord> = records.into_iter().map(Into::into).collect();
            if let Err(error) = context.write_records(records, false).await {
                debug!(%error, "job records not appended");
            }
            if finals.is_empty() {
                return;
            }
            // What is written is what is announced: a retry writes the ends as they stand
            // then, and only those are told.
            let mut written = finals;
            let mut finals: Vec<InternalRecord> = written.iter().cloned().map(Into::into).collect();
            // Only a durable end is announced: a refused write (its bytes truncated away) is
            // written again, from the job's state now, until the log takes it.
            let mut backoff = Duration::from_millis(100);
            while let Err(error) = context.write_records(finals, true).await {
                if context.shutting_down.load(Ordering::Acquire) {
                    debug!(%error, "job ends not announced: the router is shutting down");
                    return;
                }
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "job ends not written to the log; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                written = context.jobs().unwritten_finals(&written);
                finals = written.iter().cloned().map(Into::into).collect();
                if finals.is_empty() {
                    break;
                }
            }
            let announced = context.jobs().finals_written(&written);
            for (outbox, lane, frame) in announced.frames.into_iter().chain(after_finals) {
                let _ = outbox.push(lane, frame);
            }
        });
    }

    /// The breaker of `swarm`, shared by every session that joined it.
    pub(super) fn swarm_guard(&self, swarm: &str) -> Arc<SwarmGuard> {
        let mut guards = self
            .swarm_guards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(guard) = guards.get(swarm).and_then(std::sync::Weak::upgrade) {
            return guard;
        }
        let guard = Arc::new(SwarmGuard::new(self.config.rate_limits.swarm_breaker));
        guards.insert(swarm.to_owned(), Arc::downgrade(&guard));
        guard
    }

    /// Forgets the breakers no session holds any more.
    pub(super) fn release_swarm_guards(&self, held: HashMap<String, Arc<SwarmGuard>>) {
        let mut guards = self
            .swarm_guards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (swarm, guard) in held {
            drop(guard);
            if guards
                .get(&swarm)
                .is_some_and(|weak| weak.strong_count() == 0)
            {
                guards.remove(&swarm);
            }
        }
    }
}

impl SwarmGuard {
    pub(super) fn new(config: swarmbus_proto::limits::BreakerConfig) -> Self {
        SwarmGuard {
            closed: std::sync::atomic::AtomicBool::new(true),
            breaker: Mutex::new(Breaker::new(config, std::time::Instant::now())),
        }
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breaker = self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(&mut breaker);
        self.closed
            .store(breaker.state() == BreakerState::Closed, Ordering::Release);
        result
    }

    pub(super) fn check(
        &self,
        now: std::time::Instant,
    ) -> (Result<(), Duration>, Option<BreakerState>) {
        if self.closed.load(Ordering::Acquire) {
            return (Ok(()), None);
        }
        self.with(|breaker| breaker.check(now))
    }

    pub(super) fn failure(&self, now: std::time::Instant) -> Option<BreakerState> {
        self.with(|breaker| breaker.failure(now))
    }

    pub(super) fn success(&self) -> Option<BreakerState> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.with(|breaker| breaker.success())
    }
}
