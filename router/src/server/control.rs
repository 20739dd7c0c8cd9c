//! Control-plane handlers of a session: presence queries, fenced leases and safety actions.

use super::*;

impl Session {
    pub(super) async fn presence_query(&self, request_id: u64, swarm: String) -> Result<(), Fault> {
        if !self.joined(&swarm) {
            self.not_joined(&swarm, request_id);
            return Ok(());
        }
        if let Some(why) = self.denied(crate::auth::Action::Presence, &swarm, None) {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        // Each session gets a budget (the list is built under the control lock).
        let max_per_s = self.context.config.presence.queries_per_s;
        if over_per_second(&self.presence_window, max_per_s) {
            self.refuse_with_retry(
                ErrorCode::Busy,
                request_id,
                format!("at most {max_per_s} presence queries per second per session"),
                1_000,
            );
            return Ok(());
        }
        // Keep the answer well within a frame (agent ids and metadata are bounded,
        // so this cuts only very large swarms; the list is sorted by agent id).
        let budget = self.context.config.limits.max_frame_bytes as usize / 2;
        let members = self.context.control().presence.list(&swarm, budget);
        let _ = self.outbox.push(
            Lane::Session,
            encode(&Message::PresenceList {
                request_id,
                swarm,
                members,
            }),
        );
        Ok(())
    }

    /// Acquire, renew or release a lease; a new token is logged before it is granted.
    pub(super) async fn lease(&self, request: swarmbus_schema::LeaseRequest) -> Result<(), Fault> {
        use swarmbus_schema::LeaseAction;
        let request_id = request.request_id;
        if !self.joined(&request.swarm) {
            self.not_joined(&request.swarm, request_id);
            return Ok(());
        }
        check_name("lease name", &request.name)?;
        // A release is never denied: a holder must be able to let go.
        let action = crate::auth::Action::Lease;
        let denied = (request.action != LeaseAction::Release)
            .then(|| self.denied(action, &request.swarm, Some(&request.name)))
            .flatten();
        if let Some(why) = denied {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        let max_ttl = self.context.config.presence.max_lease_ttl_ms;
        let ttl_ms = u64::from(request.ttl_ms.min(max_ttl).max(1));
        let now_ms = self.context.clock.now_ms();
        if let Some(bucket) = self.context.cluster_leases.clone() {
            self.cluster_lease(&bucket, &request, ttl_ms, now_ms).await;
            return Ok(());
        }
        let decision = {
            let mut control = self.context.control();
            let leases = &mut control.leases;
            match request.action {
                LeaseAction::Acquire => leases
                    .acquire(&request.swarm, &request.name, &self.agent, ttl_ms, now_ms)
                    .map(Some),
                LeaseAction::Renew => leases
                    .renew(
                        &request.swarm,
                        &request.name,
                        &self.agent,
                        request.token,
                        ttl_ms,
                        now_ms,
                    )
                    .map(Some),
                LeaseAction::Release => leases
                    .release(&request.swarm, &request.name, &self.agent, request.token)
                    .map(|()| None),
            }
        };
        let stats = &self.context.stats;
        match decision {
            Ok(Some(granted)) => {
                stats.lease_grants.fetch_add(1, Ordering::Relaxed);
                self.grant_lease(&request, granted, ttl_ms).await
            }
            Ok(None) => self.release_lease(&request).await,
            Err(refusal) => {
                stats.lease_refusals.fetch_add(1, Ordering::Relaxed);
                self.refuse_lease(&request, refusal)
            }
        }
        Ok(())
    }

    /// A lease request on a cluster: decided by a compare-and-set in the cluster's lease
    /// bucket (the new holding's fencing token is that write's revision), so two routers
    /// never grant one lease at once.
    async fn cluster_lease(
        &self,
        bucket: &swarmbus_jetstream::LeaseBucket,
        request: &swarmbus_schema::LeaseRequest,
        ttl_ms: u64,
        now_ms: u64,
    ) {
        use swarmbus_jetstream::LeaseAnswer;
        use swarmbus_schema::LeaseAction;
        let (swarm, name, agent) = (&request.swarm, &request.name, &self.agent);
        let stats = &self.context.stats;
        if request.action == LeaseAction::Acquire {
            let admitted = self
                .context
                .control()
                .leases
                .admits_acquire(swarm, name, agent, now_ms);
            if let Err(refusal) = admitted {
                stats.lease_refusals.fetch_add(1, Ordering::Relaxed);
                self.refuse_lease(request, refusal);
                return;
            }
        }
        let answer = match request.action {
            LeaseAction::Acquire => bucket.acquire(swarm, name, agent, ttl_ms, now_ms).await,
            LeaseAction::Renew => {
                bucket
                    .renew(swarm, name, agent, request.token, ttl_ms, now_ms)
                    .await
            }
            LeaseAction::Release => bucket.release(swarm, name, agent, request.token).await,
        };
        use swarmbus_proto::control::LeaseRefusal;
        match answer {
            Ok(LeaseAnswer::Granted {
                token,
                granted_at_ms,
                expires_at_ms,
                revision,
                ..
            }) => {
                // Mirrored at once: the holder's next stamped publish here passes.
                self.context.control().leases.mirror(
                    swarm,
                    name,
                    agent,
                    token,
                    granted_at_ms,
                    expires_at_ms,
                    revision,
                );
                stats.lease_grants.fetch_add(1, Ordering::Relaxed);
                let grant = swarmbus_schema::LeaseGrant {
                    request_id: request.request_id,
                    swarm: swarm.clone(),
                    name: name.clone(),
                    holder: agent.to_string(),
                    token,
                    granted_at_ms,
                    expires_at_ms,
                };
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::LeaseGrant(grant)));
            }
            Ok(LeaseAnswer::Released { revision }) => {
                self.context.control().leases.mirror(
                    swarm,
                    name,
                    "",
                    request.token,
                    0,
                    0,
                    revision,
                );
                let request_id = request.request_id;
                let _ = self
                    .outbox
                    .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
            }
            Ok(LeaseAnswer::Held {
                holder,
                expires_at_ms,
            }) => {
                stats.lease_refusals.fetch_add(1, Ordering::Relaxed);
                let remaining_ms = expires_at_ms.saturating_sub(now_ms);
                self.refuse_lease(
                    request,
                    LeaseRefusal::Held {
                        holder,
                        remaining_ms,
                    },
                );
            }
            Ok(LeaseAnswer::Lost { newest_token }) => {
                // A newer holding this router may not have seen yet: stamps of the old
                // token are refused here from now on.
                self.context
                    .control()
                    .leases
                    .saw_token(swarm, name, newest_token);
                stats.lease_refusals.fetch_add(1, Ordering::Relaxed);
                self.refuse_lease(request, LeaseRefusal::Lost { newest_token });
            }
            Err(error) => self.refuse_with_retry(
                ErrorCode::SwarmUnavailable,
                request.request_id,
                format!("the cluster's lease bucket did not answer: {error}"),
                1_000,
            ),
        }
    }

    /// Logs a new or extended holding before it is granted.
    async fn grant_lease(
        &self,
        request: &swarmbus_schema::LeaseRequest,
        granted: swarmbus_proto::control::Granted,
        ttl_ms: u64,
    ) {
        let request_id = request.request_id;
        if granted.must_log {
            let record = swarmbus_proto::control::lease_record(
                &request.swarm,
                &request.name,
                granted.grant.token,
                &self.agent,
                ttl_ms,
            );
            if let Err(error) = self
                .context
                .write_records(vec![control_record(record)], true)
                .await
            {
                // The token must never go backwards, and a restart must not end a
                // holding early: no grant without its record. A longer renewal that
                // could not be logged leaves the holding as it was (its holder is
                // refused, and keeps the expiry it was told before).
                let mut control = self.context.control();
                match granted.previous {
                    Some(previous) => control.leases.undo_extension(
                        &request.swarm,
                        &request.name,
                        granted.grant.token,
                        previous,
                        granted.grant.expires_at_ms,
                    ),
                    None => {
                        control
                            .leases
                            .revoke(&request.swarm, &request.name, granted.grant.token)
                    }
                }
                drop(control);
                self.refuse_with_retry(
                    ErrorCode::SwarmUnavailable,
                    request_id,
                    format!("the grant could not be logged: {error}"),
                    1_000,
                );
                return;
            }
            self.context.control().leases.logged(
                &request.swarm,
                &request.name,
                granted.grant.token,
                ttl_ms,
            );
        }
        let grant = swarmbus_schema::LeaseGrant {
            request_id,
            ..granted.grant
        };
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::LeaseGrant(grant)));
    }

    /// Logs a release so a restart does not hold the lease for its TTL; if the record is
    /// lost, the restart holds it for the old holder until then (safe).
    async fn release_lease(&self, request: &swarmbus_schema::LeaseRequest) {
        let request_id = request.request_id;
        // Logged so a restart does not hold the lease for its TTL; if the record is
        // lost, the restart holds it for the old holder until then (safe).
        let record = swarmbus_proto::control::lease_record(
            &request.swarm,
            &request.name,
            request.token,
            "",
            0,
        );
        if let Err(error) = self
            .context
            .write_records(vec![control_record(record)], true)
            .await
        {
            tracing::warn!(swarm = %request.swarm, lease = %request.name, %error, "a lease release was not logged");
        }
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
    }

    fn refuse_lease(
        &self,
        request: &swarmbus_schema::LeaseRequest,
        refusal: swarmbus_proto::control::LeaseRefusal,
    ) {
        use swarmbus_proto::control::LeaseRefusal;
        let request_id = request.request_id;
        match refusal {
            LeaseRefusal::Held {
                holder,
                remaining_ms,
            } => self.refuse_with_retry(
                ErrorCode::LeaseHeld,
                request_id,
                format!(
                    "lease {:?} of {:?} is held by {holder:?}",
                    request.name, request.swarm
                ),
                remaining_ms.clamp(1, u64::from(u32::MAX)) as u32,
            ),
            LeaseRefusal::Limit(why) => self.refuse_with_retry(
                ErrorCode::Busy,
                request_id,
                format!(
                    "lease {:?} of {:?} refused: {why}",
                    request.name, request.swarm
                ),
                1_000,
            ),
            LeaseRefusal::Lost { newest_token } => self.refuse(
                ErrorCode::LeaseLost,
                request_id,
                format!(
                    "token {} of lease {:?} is not held (newest token {newest_token})",
                    request.token, request.name
                ),
            ),
        }
    }

    /// A controller's safety action: logged, applied, announced on the swarm's alert class,
    /// then acknowledged.
    pub(super) async fn safety(&self, action: swarmbus_schema::SafetyAction) -> Result<(), Fault> {
        let request_id = action.request_id;
        // A stop or a drain names no swarm (whatever `swarm` says): only `safety:*` matches.
        let scope = match action.kind {
            swarmbus_schema::SafetyKind::Pause | swarmbus_schema::SafetyKind::Resume => {
                action.swarm.as_str()
            }
            _ => "",
        };
        if !self.controls(crate::auth::Action::Safety, scope) {
            self.refuse(
                ErrorCode::Forbidden,
                request_id,
                "only sessions of role controller (or that the policy allows safety) may take \
                 safety actions"
                    .into(),
            );
            return Ok(());
        }
        if let Some(why) = self
            .safety_not_granted(&action)
            .or_else(|| self.denied(crate::auth::Action::Safety, scope, None))
        {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        let context = &self.context;
        let now_ms = context.clock.now_ms();
        let Some((record, announce_on)) = self.safety_record(&action, now_ms)? else {
            return Ok(());
        };
        // On a cluster a pause or a stop goes to the cluster's safety bucket, which every
        // router applies (drains are of this router's worker registry, its own log).
        let shared = match &context.cluster_safety {
            Some(bucket)
                if !matches!(
                    action.kind,
                    swarmbus_schema::SafetyKind::Drain | swarmbus_schema::SafetyKind::Undrain
                ) =>
            {
                Some(bucket)
            }
            _ => None,
        };
        let (key, payload) = (record.0.clone(), record.1.clone());
        let written = match shared {
            Some(bucket) => bucket
                .put(&record.0, record.1)
                .await
                .map(Some)
                .map_err(|error| error.to_string()),
            None => context
                .write_records(vec![control_record(record)], true)
                .await
                .map(|_| None)
                .map_err(|error| error.to_string()),
        };
        if let Err(error) = written {
            self.refuse_with_retry(
                ErrorCode::SwarmUnavailable,
                request_id,
                format!("the action could not be logged: {error}"),
                1_000,
            );
            return Ok(());
        }
        match written {
            // Applied in the cluster's order of writes (see `apply_cluster_safety_record`).
            Ok(Some(revision)) => {
                super::start::apply_cluster_safety_record(context, &key, &payload, revision).await
            }
            _ => self.apply_safety(&action, now_ms).await,
        }
        let kind = format!("{:?}", action.kind).to_lowercase();
        tracing::info!(controller = %self.agent, action = %kind, swarm = %action.swarm, target = %action.target, "safety action");
        let payload = format!(
            "{{\"event\":\"safety\",\"action\":\"{kind}\",\"by\":{},\"swarm\":{},\"target\":{},\"duration_ms\":{}}}",
            json_string(&self.agent),
            json_string(&action.swarm),
            json_string(&action.target),
            action.duration_ms
        );
        let swarms = announce_on.iter().map(String::as_str);
        context.announce(swarms, "safety", payload).await;
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
        Ok(())
    }

    /// With credentials, what a safety action needs beyond the controller role: a pause or
    /// resume names a swarm the session joined (so its credential grants it as
    /// controller); a stop or a drain, which no swarm bounds, needs controller (or admin)
    /// granted in every swarm (`*`), or the policy's `safety` allowed on `*`. `None`:
    /// allowed.
    fn safety_not_granted(&self, action: &swarmbus_schema::SafetyAction) -> Option<String> {
        use swarmbus_schema::SafetyKind;
        let credential = self.credential.lock().unwrap_or_else(|p| p.into_inner());
        let identity = &credential.as_ref()?.identity;
        match action.kind {
            SafetyKind::Pause | SafetyKind::Resume if !self.joined(&action.swarm) => Some(format!(
                "a pause or resume needs swarm {:?} joined, granted as controller",
                action.swarm
            )),
            SafetyKind::Stop | SafetyKind::Drain | SafetyKind::Undrain
                if !identity.everywhere(Role::Controller)
                    && !self.allowed(crate::auth::Action::Safety, "") =>
            {
                Some(
                    "stopping an agent or draining a node needs controller granted in every swarm (\"*\")"
                        .into(),
                )
            }
            _ => None,
        }
    }

    /// The record of a safety action and the swarms to announce it on; `None` when it was
    /// refused (answered already).
    fn safety_record(
        &self,
        action: &swarmbus_schema::SafetyAction,
        now_ms: u64,
    ) -> Result<Option<SafetyRecord>, Fault> {
        use swarmbus_schema::SafetyKind;
        let context = &self.context;
        let request_id = action.request_id;
        let chosen = match action.kind {
            SafetyKind::Pause | SafetyKind::Resume => {
                check_name("swarm", &action.swarm)?;
                let flag = if action.kind == SafetyKind::Pause {
                    "1"
                } else {
                    "0"
                };
                (
                    (
                        swarmbus_proto::control::pause_key(&action.swarm),
                        Bytes::from(flag),
                    ),
                    vec![action.swarm.clone()],
                )
            }
            SafetyKind::Stop => {
                check_name("agent", &action.target)?;
                if !context.control().stops.has_room_for(&action.target, now_ms) {
                    self.refuse_with_retry(
                        ErrorCode::Busy,
                        request_id,
                        format!(
                            "{} agents are stopped already (the most at once)",
                            swarmbus_proto::control::MAX_STOPS
                        ),
                        1_000,
                    );
                    return Ok(None);
                }
                let until = now_ms.saturating_add(action.duration_ms);
                let swarms = context
                    .control()
                    .presence
                    .get(&action.target)
                    .map(|p| p.swarms.clone())
                    .unwrap_or_default();
                (
                    (
                        swarmbus_proto::control::stop_key(&action.target),
                        Bytes::from(until.to_be_bytes().to_vec()),
                    ),
                    swarms,
                )
            }
            SafetyKind::Drain | SafetyKind::Undrain => {
                check_name("node", &action.target)?;
                let flag = if action.kind == SafetyKind::Drain {
                    "1"
                } else {
                    "0"
                };
                (
                    (
                        swarmbus_proto::control::drain_key(&action.target),
                        Bytes::from(flag),
                    ),
                    Vec::new(),
                )
            }
        };
        Ok(Some(chosen))
    }

    /// Applies a logged safety action.
    async fn apply_safety(&self, action: &swarmbus_schema::SafetyAction, now_ms: u64) {
        use swarmbus_schema::SafetyKind;
        let context = &self.context;
        match action.kind {
            SafetyKind::Pause | SafetyKind::Resume => {
                self.to_shard(
                    &action.swarm,
                    ShardCommand::Pause {
                        swarm: action.swarm.clone(),
                        paused: action.kind == SafetyKind::Pause,
                    },
                )
                .await;
            }
            SafetyKind::Stop => {
                let mut control = context.control();
                control
                    .stops
                    .stop(&action.target, now_ms.saturating_add(action.duration_ms));
                if let Some(present) = control.presence.get(&action.target) {
                    present.outbox.request_close(ErrorCode::Stopped);
                }
            }
            SafetyKind::Drain | SafetyKind::Undrain => {
                let draining = action.kind == SafetyKind::Drain;
                let pins = context.workers().set_admin_drain(&action.target, draining);
                // One lock at a time: the registry's is released before the job queue's.
                let conn = context.workers().conn_of(&action.target);
                if let Some(conn) = conn {
                    context.jobs().worker_draining(conn, draining);
                }
                if let Err(error) = context.write_pins(pins).await {
                    tracing::warn!(%error, "pins of a drained node's sessions not written");
                }
            }
        }
    }
}

/// A safety action's record (key, payload) and the swarms it is announced on.
type SafetyRecord = ((String, Bytes), Vec<String>);
