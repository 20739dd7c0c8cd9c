//! Encoding: one FlatBuffers table per message, built in a per-thread builder, behind the
//! length prefix.

use super::*;

thread_local! {
    // One builder per thread, reset between frames, so encoding allocates only the output.
    static BUILDER: RefCell<FlatBufferBuilder<'static>> = RefCell::new(FlatBufferBuilder::with_capacity(512));
}

pub(super) fn with_builder<R>(f: impl FnOnce(&mut FlatBufferBuilder<'static>) -> R) -> R {
    BUILDER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut builder) => {
            builder.reset();
            f(&mut builder)
        }
        // Re-entrant use cannot happen in this crate; fall back to a fresh builder rather
        // than panic if it ever does.
        Err(_) => f(&mut FlatBufferBuilder::with_capacity(512)),
    })
}

pub(super) fn wire_class(class: Class) -> w::Class {
    w::Class(class as u8)
}

pub(super) fn wire_role(role: Role) -> w::Role {
    match role {
        Role::Agent => w::Role::Agent,
        Role::Controller => w::Role::Controller,
        Role::Worker => w::Role::Worker,
    }
}

pub(super) fn opt_str<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    value: Option<&str>,
) -> Option<WIPOffset<&'a str>> {
    value.map(|s| fbb.create_string(s))
}

/// Finishes `message` into a frame head of `body_len` trailing bytes.
pub(super) fn finish(
    fbb: &mut FlatBufferBuilder<'static>,
    message_type: w::Message,
    message: WIPOffset<flatbuffers::UnionWIPOffset>,
    body_len: usize,
) -> Bytes {
    let frame = w::Frame::create(
        fbb,
        &w::FrameArgs {
            message_type,
            message: Some(message),
        },
    );
    fbb.finish_minimal(frame);
    let header = fbb.finished_data();
    let frame_len = HEADER_LEN_BYTES + header.len() + body_len;
    let mut head = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + HEADER_LEN_BYTES + header.len());
    head.put_u32_le(frame_len as u32);
    head.put_u32_le(header.len() as u32);
    head.put_slice(header);
    head.freeze()
}

/// Encodes the head of a Deliver frame whose body is `payload_len` bytes. The router builds
/// this once per published message and sends it, with the publisher's payload buffer, to
/// every subscriber.
#[allow(clippy::too_many_arguments)]
pub fn encode_deliver_head(
    swarm: &str,
    class: Class,
    op_id: OpId,
    epoch: Epoch,
    source_agent: &str,
    target_agent: Option<&str>,
    key: Option<&str>,
    payload_len: usize,
    fencing_token: u64,
    lease: Option<&str>,
    published_us: u64,
) -> Bytes {
    with_builder(|fbb| {
        let swarm = fbb.create_string(swarm);
        let source_agent = fbb.create_string(source_agent);
        let target_agent = opt_str(fbb, target_agent);
        let key = opt_str(fbb, key);
        let lease = opt_str(fbb, lease);
        let msg = w::Deliver::create(
            fbb,
            &w::DeliverArgs {
                swarm: Some(swarm),
                class: wire_class(class),
                op_id: op_id.0,
                epoch: epoch.0,
                source_agent: Some(source_agent),
                target_agent,
                key,
                payload_len: payload_len as u32,
                fencing_token,
                lease,
                published_us,
            },
        );
        finish(fbb, w::Message::Deliver, msg.as_union_value(), payload_len)
    })
}

/// Encodes any message. Publish and Deliver payloads become the frame body by reference.
// One arm per message kind, in the schema's order: each arm is that message's table, so
// the wire format of every message reads in one place. Long by design.
pub fn encode(message: &Message) -> OutFrame {
    let mut body = Bytes::new();
    let head = with_builder(|fbb| {
        let (kind, offset) = match message {
            Message::Hello(m) => {
                let swarms: Vec<_> = m.swarms.iter().map(|s| fbb.create_string(s)).collect();
                let swarms = fbb.create_vector(&swarms);
                let agent_id = fbb.create_string(&m.agent_id);
                let client_name = fbb.create_string(&m.client_name);
                let client_version = fbb.create_string(&m.client_version);
                let resume: Vec<_> = m
                    .resume
                    .iter()
                    .map(|r| {
                        let swarm = fbb.create_string(&r.swarm);
                        w::Resume::create(
                            fbb,
                            &w::ResumeArgs {
                                swarm: Some(swarm),
                                epoch: r.epoch.0,
                                last_applied: r.last_applied.0,
                                class: wire_class(r.class),
                            },
                        )
                    })
                    .collect();
                let resume = fbb.create_vector(&resume);
                let credential = m.credential.as_ref().map(|c| fbb.create_string(c.as_str()));
                let metadata = (!m.metadata.is_empty()).then(|| fbb.create_string(&m.metadata));
                let t = w::Hello::create(
                    fbb,
                    &w::HelloArgs {
                        protocol_version: m.protocol_version,
                        swarms: Some(swarms),
                        agent_id: Some(agent_id),
                        role: wire_role(m.role),
                        client_name: Some(client_name),
                        client_version: Some(client_version),
                        resume: Some(resume),
                        metadata,
                        bulk: m.bulk,
                        attach_session: m.attach.map_or(0, |a| a.session.0),
                        attach_token: m.attach.map_or(0, |a| a.token),
                        credential,
                    },
                );
                (w::Message::Hello, t.as_union_value())
            }
            Message::Welcome(m) => {
                let router_name = fbb.create_string(&m.router_name);
                let queue_frames = fbb.create_vector(&m.limits.queue_frames);
                let limits = w::Limits::create(
                    fbb,
                    &w::LimitsArgs {
                        max_frame_bytes: m.limits.max_frame_bytes,
                        heartbeat_interval_ms: m.limits.heartbeat_interval_ms,
                        heartbeat_timeout_ms: m.limits.heartbeat_timeout_ms,
                        max_subscriptions: m.limits.max_subscriptions,
                        max_swarms_per_session: m.limits.max_swarms_per_session,
                        queue_frames: Some(queue_frames),
                    },
                );
                let t = w::Welcome::create(
                    fbb,
                    &w::WelcomeArgs {
                        session_id: m.session_id.0,
                        router_name: Some(router_name),
                        limits: Some(limits),
                        bulk_port: m.bulk.map_or(0, |b| b.port),
                        attach_token: m.bulk.map_or(0, |b| b.token),
                    },
                );
                (w::Message::Welcome, t.as_union_value())
            }
            Message::Error(m) => {
                let text = fbb.create_string(&m.message);
                let t = w::Error::create(
                    fbb,
                    &w::ErrorArgs {
                        code: m.code,
                        message: Some(text),
                        request_id: m.request_id,
                        retry_after_ms: m.retry_after_ms,
                    },
                );
                (w::Message::Error, t.as_union_value())
            }
            Message::Subscribe(m) | Message::Unsubscribe(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let agent_filter = opt_str(fbb, m.agent_filter.as_deref());
                if matches!(message, Message::Subscribe(_)) {
                    let t = w::Subscribe::create(
                        fbb,
                        &w::SubscribeArgs {
                            request_id: m.request_id,
                            swarm: Some(swarm),
                            class: wire_class(m.class),
                            agent_filter,
                        },
                    );
                    (w::Message::Subscribe, t.as_union_value())
                } else {
                    let t = w::Unsubscribe::create(
                        fbb,
                        &w::UnsubscribeArgs {
                            request_id: m.request_id,
                            swarm: Some(swarm),
                            class: wire_class(m.class),
                            agent_filter,
                        },
                    );
                    (w::Message::Unsubscribe, t.as_union_value())
                }
            }
            Message::SubscribeAck { request_id } => {
                let t = w::SubscribeAck::create(
                    fbb,
                    &w::SubscribeAckArgs {
                        request_id: *request_id,
                    },
                );
                (w::Message::SubscribeAck, t.as_union_value())
            }
            Message::Publish(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let target_agent = opt_str(fbb, m.target_agent.as_deref());
                let key = opt_str(fbb, m.key.as_deref());
                let lease = opt_str(fbb, m.lease.as_deref());
                let t = w::Publish::create(
                    fbb,
                    &w::PublishArgs {
                        request_id: m.request_id,
                        swarm: Some(swarm),
                        class: wire_class(m.class),
                        target_agent,
                        key,
                        payload_len: m.payload.len() as u32,
                        fencing_token: m.fencing_token,
                        lease,
                    },
                );
                body = m.payload.clone();
                (w::Message::Publish, t.as_union_value())
            }
            Message::PublishAck {
                request_id,
                op_id,
                epoch,
            } => {
                let t = w::PublishAck::create(
                    fbb,
                    &w::PublishAckArgs {
                        request_id: *request_id,
                        op_id: op_id.0,
                        epoch: epoch.0,
                    },
                );
                (w::Message::PublishAck, t.as_union_value())
            }
            Message::Deliver(m) => {
                // Shares the router's hot-path encoder so both stay byte-identical.
                body = m.payload.clone();
                return encode_deliver_head(
                    &m.swarm,
                    m.class,
                    m.op_id,
                    m.epoch,
                    &m.source_agent,
                    m.target_agent.as_deref(),
                    m.key.as_deref(),
                    m.payload.len(),
                    m.fencing_token,
                    m.lease.as_deref(),
                    m.published_us,
                );
            }
            Message::Ack {
                swarm,
                class,
                op_id,
            } => {
                let swarm = fbb.create_string(swarm);
                let t = w::Ack::create(
                    fbb,
                    &w::AckArgs {
                        swarm: Some(swarm),
                        op_id: op_id.0,
                        class: wire_class(*class),
                    },
                );
                (w::Message::Ack, t.as_union_value())
            }
            Message::EpochChanged {
                swarm,
                epoch,
                previous_epoch,
            } => {
                let swarm = fbb.create_string(swarm);
                let t = w::EpochChanged::create(
                    fbb,
                    &w::EpochChangedArgs {
                        swarm: Some(swarm),
                        epoch: epoch.0,
                        previous_epoch: previous_epoch.0,
                    },
                );
                (w::Message::EpochChanged, t.as_union_value())
            }
            Message::DeltaRequest {
                request_id,
                swarm,
                from_op,
                to_op,
            } => {
                let swarm = fbb.create_string(swarm);
                let t = w::DeltaRequest::create(
                    fbb,
                    &w::DeltaRequestArgs {
                        request_id: *request_id,
                        swarm: Some(swarm),
                        from_op: from_op.0,
                        to_op: to_op.0,
                    },
                );
                (w::Message::DeltaRequest, t.as_union_value())
            }
            Message::WorkerStatus(m) => {
                let node = fbb.create_string(&m.node);
                let zone = fbb.create_string(&m.zone);
                let gpu_model = fbb.create_string(&m.gpu_model);
                let models: Vec<_> = m.models.iter().map(|s| fbb.create_string(s)).collect();
                let models = fbb.create_vector(&models);
                let adapters: Vec<_> = m.adapters.iter().map(|s| fbb.create_string(s)).collect();
                let adapters = fbb.create_vector(&adapters);
                let t = w::WorkerStatus::create(
                    fbb,
                    &w::WorkerStatusArgs {
                        request_id: m.request_id,
                        node: Some(node),
                        zone: Some(zone),
                        gpu_count: m.gpu_count,
                        gpu_model: Some(gpu_model),
                        gpu_memory_total: m.gpu_memory_total,
                        gpu_memory_free: m.gpu_memory_free,
                        weight: m.weight,
                        models: Some(models),
                        adapters: Some(adapters),
                        in_flight: m.in_flight,
                        draining: m.draining,
                    },
                );
                (w::Message::WorkerStatus, t.as_union_value())
            }
            Message::WorkerAck {
                request_id,
                node_id,
            } => {
                let t = w::WorkerAck::create(
                    fbb,
                    &w::WorkerAckArgs {
                        request_id: *request_id,
                        node_id: *node_id,
                    },
                );
                (w::Message::WorkerAck, t.as_union_value())
            }
            Message::OpenSession {
                request_id,
                session_key,
                model,
            } => {
                let session_key = fbb.create_string(session_key);
                let model = opt_str(fbb, model.as_deref());
                let t = w::OpenSession::create(
                    fbb,
                    &w::OpenSessionArgs {
                        request_id: *request_id,
                        session_key: Some(session_key),
                        model,
                    },
                );
                (w::Message::OpenSession, t.as_union_value())
            }
            Message::SessionPinned(m) => {
                let session_key = fbb.create_string(&m.session_key);
                let node = fbb.create_string(&m.node);
                let t = w::SessionPinned::create(
                    fbb,
                    &w::SessionPinnedArgs {
                        request_id: m.request_id,
                        session_key: Some(session_key),
                        node: Some(node),
                        node_id: m.node_id,
                        cold_load: m.cold_load,
                        kept: m.kept,
                    },
                );
                (w::Message::SessionPinned, t.as_union_value())
            }
            Message::CloseSession {
                request_id,
                session_key,
            } => {
                let session_key = fbb.create_string(session_key);
                let t = w::CloseSession::create(
                    fbb,
                    &w::CloseSessionArgs {
                        request_id: *request_id,
                        session_key: Some(session_key),
                    },
                );
                (w::Message::CloseSession, t.as_union_value())
            }
            Message::Request(m) => {
                let session_key = opt_str(fbb, m.session_key.as_deref());
                let model = opt_str(fbb, m.model.as_deref());
                let source_agent = opt_str(fbb, m.source_agent.as_deref());
                let t = w::Request::create(
                    fbb,
                    &w::RequestArgs {
                        request_id: m.request_id,
                        session_key,
                        model,
                        timeout_ms: m.timeout_ms,
                        source_agent,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::Request, t.as_union_value())
            }
            Message::Reply(m) => {
                let node = opt_str(fbb, m.node.as_deref());
                let t = w::Reply::create(
                    fbb,
                    &w::ReplyArgs {
                        request_id: m.request_id,
                        ok: m.ok,
                        node,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::Reply, t.as_union_value())
            }
            Message::Heartbeat { sent_at_ms } => {
                let t = w::Heartbeat::create(
                    fbb,
                    &w::HeartbeatArgs {
                        sent_at_ms: *sent_at_ms,
                    },
                );
                (w::Message::Heartbeat, t.as_union_value())
            }
            Message::PresenceQuery { request_id, swarm } => {
                let swarm = fbb.create_string(swarm);
                let t = w::PresenceQuery::create(
                    fbb,
                    &w::PresenceQueryArgs {
                        request_id: *request_id,
                        swarm: Some(swarm),
                    },
                );
                (w::Message::PresenceQuery, t.as_union_value())
            }
            Message::PresenceList {
                request_id,
                swarm,
                members,
            } => {
                let swarm = fbb.create_string(swarm);
                let agents: Vec<_> = members
                    .iter()
                    .map(|m| fbb.create_string(&m.agent))
                    .collect();
                let agents = fbb.create_vector(&agents);
                let roles: Vec<w::Role> = members.iter().map(|m| wire_role(m.role)).collect();
                let roles = fbb.create_vector(&roles);
                let seen: Vec<u64> = members.iter().map(|m| m.last_seen_ms).collect();
                let seen = fbb.create_vector(&seen);
                let metadata: Vec<_> = members
                    .iter()
                    .map(|m| fbb.create_string(&m.metadata))
                    .collect();
                let metadata = fbb.create_vector(&metadata);
                let t = w::PresenceList::create(
                    fbb,
                    &w::PresenceListArgs {
                        request_id: *request_id,
                        swarm: Some(swarm),
                        agents: Some(agents),
                        roles: Some(roles),
                        last_seen_ms: Some(seen),
                        metadata: Some(metadata),
                    },
                );
                (w::Message::PresenceList, t.as_union_value())
            }
            Message::LeaseRequest(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let name = fbb.create_string(&m.name);
                let t = w::LeaseRequest::create(
                    fbb,
                    &w::LeaseRequestArgs {
                        request_id: m.request_id,
                        swarm: Some(swarm),
                        name: Some(name),
                        action: match m.action {
                            LeaseAction::Acquire => w::LeaseAction::Acquire,
                            LeaseAction::Renew => w::LeaseAction::Renew,
                            LeaseAction::Release => w::LeaseAction::Release,
                        },
                        token: m.token,
                        ttl_ms: m.ttl_ms,
                    },
                );
                (w::Message::LeaseRequest, t.as_union_value())
            }
            Message::LeaseGrant(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let name = fbb.create_string(&m.name);
                let holder = fbb.create_string(&m.holder);
                let t = w::LeaseGrant::create(
                    fbb,
                    &w::LeaseGrantArgs {
                        request_id: m.request_id,
                        swarm: Some(swarm),
                        name: Some(name),
                        holder: Some(holder),
                        token: m.token,
                        granted_at_ms: m.granted_at_ms,
                        expires_at_ms: m.expires_at_ms,
                    },
                );
                (w::Message::LeaseGrant, t.as_union_value())
            }
            Message::SafetyAction(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let target = fbb.create_string(&m.target);
                let t = w::SafetyAction::create(
                    fbb,
                    &w::SafetyActionArgs {
                        request_id: m.request_id,
                        kind: match m.kind {
                            SafetyKind::Pause => w::SafetyKind::Pause,
                            SafetyKind::Resume => w::SafetyKind::Resume,
                            SafetyKind::Stop => w::SafetyKind::Stop,
                            SafetyKind::Drain => w::SafetyKind::Drain,
                            SafetyKind::Undrain => w::SafetyKind::Undrain,
                        },
                        swarm: Some(swarm),
                        target: Some(target),
                        duration_ms: m.duration_ms,
                    },
                );
                (w::Message::SafetyAction, t.as_union_value())
            }
            Message::SubmitJob(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let idempotency_key = fbb.create_string(&m.idempotency_key);
                let model = opt_str(fbb, m.model.as_deref());
                let t = w::SubmitJob::create(
                    fbb,
                    &w::SubmitJobArgs {
                        request_id: m.request_id,
                        swarm: Some(swarm),
                        idempotency_key: Some(idempotency_key),
                        model,
                        priority: m.priority,
                        deadline_ms: m.deadline_ms,
                        max_attempts: m.max_attempts,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::SubmitJob, t.as_union_value())
            }
            Message::JobStatus(m) => {
                let t = w::JobStatus::create(
                    fbb,
                    &w::JobStatusArgs {
                        request_id: m.request_id,
                        job_id: m.job_id.0,
                        state: w::JobState(m.state.as_u8()),
                        attempt: m.attempt,
                        duplicate: m.duplicate,
                    },
                );
                (w::Message::JobStatus, t.as_union_value())
            }
            Message::JobCredits { credits } => {
                let t = w::JobCredits::create(fbb, &w::JobCreditsArgs { credits: *credits });
                (w::Message::JobCredits, t.as_union_value())
            }
            Message::JobLease(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let model = opt_str(fbb, m.model.as_deref());
                let submitter = fbb.create_string(&m.submitter);
                let t = w::JobLease::create(
                    fbb,
                    &w::JobLeaseArgs {
                        job_id: m.job_id.0,
                        attempt: m.attempt,
                        swarm: Some(swarm),
                        model,
                        submitter: Some(submitter),
                        priority: m.priority,
                        lease_ms: m.lease_ms,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::JobLease, t.as_union_value())
            }
            Message::JobProgress(m) => {
                let t = w::JobProgress::create(
                    fbb,
                    &w::JobProgressArgs {
                        job_id: m.job_id.0,
                        attempt: m.attempt,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::JobProgress, t.as_union_value())
            }
            Message::JobResult(m) => {
                let t = w::JobResult::create(
                    fbb,
                    &w::JobResultArgs {
                        request_id: m.request_id,
                        job_id: m.job_id.0,
                        attempt: m.attempt,
                        ok: m.ok,
                        retry: m.retry,
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::JobResult, t.as_union_value())
            }
            Message::JobCancel {
                request_id,
                job_id,
                attempt,
            } => {
                let t = w::JobCancel::create(
                    fbb,
                    &w::JobCancelArgs {
                        request_id: *request_id,
                        job_id: job_id.0,
                        attempt: *attempt,
                    },
                );
                (w::Message::JobCancel, t.as_union_value())
            }
            Message::JobUpdate(m) => {
                let swarm = fbb.create_string(&m.swarm);
                let idempotency_key = fbb.create_string(&m.idempotency_key);
                let reason = fbb.create_string(&m.reason);
                let t = w::JobUpdate::create(
                    fbb,
                    &w::JobUpdateArgs {
                        job_id: m.job_id.0,
                        swarm: Some(swarm),
                        idempotency_key: Some(idempotency_key),
                        state: w::JobState(m.state.as_u8()),
                        attempt: m.attempt,
                        reason: Some(reason),
                        payload_len: m.payload.len() as u32,
                    },
                );
                body = m.payload.clone();
                (w::Message::JobUpdate, t.as_union_value())
            }
            Message::JobAck {
                job_id,
                attempt,
                state,
            } => {
                let t = w::JobAck::create(
                    fbb,
                    &w::JobAckArgs {
                        job_id: job_id.0,
                        attempt: *attempt,
                        state: w::JobState(state.as_u8()),
                    },
                );
                (w::Message::JobAck, t.as_union_value())
            }
            Message::ListDeadLetters {
                request_id,
                swarm,
                after_job_id,
                limit,
            } => {
                let swarm = fbb.create_string(swarm);
                let t = w::ListDeadLetters::create(
                    fbb,
                    &w::ListDeadLettersArgs {
                        request_id: *request_id,
                        swarm: Some(swarm),
                        after_job_id: after_job_id.0,
                        limit: *limit,
                    },
                );
                (w::Message::ListDeadLetters, t.as_union_value())
            }
            Message::DeadLetters(m) => {
                let ids: Vec<u64> = m.jobs.iter().map(|j| j.job_id.0).collect();
                let job_ids = fbb.create_vector(&ids);
                let counts: Vec<u32> = m.jobs.iter().map(|j| j.attempts).collect();
                let attempts = fbb.create_vector(&counts);
                let keys: Vec<_> = m
                    .jobs
                    .iter()
                    .map(|j| fbb.create_string(&j.idempotency_key))
                    .collect();
                let idempotency_keys = fbb.create_vector(&keys);
                let texts: Vec<_> = m
                    .jobs
                    .iter()
                    .map(|j| fbb.create_string(&j.reason))
                    .collect();
                let reasons = fbb.create_vector(&texts);
                let t = w::DeadLetters::create(
                    fbb,
                    &w::DeadLettersArgs {
                        request_id: m.request_id,
                        job_ids: Some(job_ids),
                        attempts: Some(attempts),
                        idempotency_keys: Some(idempotency_keys),
                        reasons: Some(reasons),
                        more: m.more,
                    },
                );
                (w::Message::DeadLetters, t.as_union_value())
            }
            Message::RedriveJob {
                request_id,
                swarm,
                job_id,
            } => {
                let swarm = fbb.create_string(swarm);
                let t = w::RedriveJob::create(
                    fbb,
                    &w::RedriveJobArgs {
                        request_id: *request_id,
                        swarm: Some(swarm),
                        job_id: job_id.0,
                    },
                );
                (w::Message::RedriveJob, t.as_union_value())
            }
            Message::Authenticate {
                request_id,
                credential,
            } => {
                let credential = fbb.create_string(credential.as_str());
                let t = w::Authenticate::create(
                    fbb,
                    &w::AuthenticateArgs {
                        request_id: *request_id,
                        credential: Some(credential),
                    },
                );
                (w::Message::Authenticate, t.as_union_value())
            }
            Message::DeltaAck(m) => {
                let t = w::DeltaAck::create(
                    fbb,
                    &w::DeltaAckArgs {
                        request_id: m.request_id,
                        epoch: m.epoch.0,
                        first_op: m.first_op.0,
                        last_op: m.last_op.0,
                        count: m.count,
                        more: m.more,
                        compacted: m.compacted,
                    },
                );
                (w::Message::DeltaAck, t.as_union_value())
            }
        };
        finish(fbb, kind, offset, body.len())
    });
    OutFrame { head, body }
}
