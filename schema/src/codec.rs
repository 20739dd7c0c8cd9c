//! Encoding messages to frames and verified decoding of frames to messages.

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};

use crate::error::DecodeError;
use crate::frame::LENGTH_PREFIX_BYTES;
use crate::generated::swarmbus::wire as w;
use crate::types::*;

/// Bytes of the `header_len` field that follows the frame length prefix.
const HEADER_LEN_BYTES: usize = 4;

/// Bounds for the FlatBuffers verifier. Every inbound frame is verified once with these.
///
/// The table budget must cover the largest message the protocol allows: a Hello that joins
/// `max_swarms_per_session` swarms with a resume point per ordered class in each is
/// `2 + ORDERED_CLASS_COUNT * max_swarms_per_session` tables (Frame, Hello, the Resumes).
/// Every other message has at most four.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Deepest table nesting accepted (the protocol needs 3: Frame, message, Resume).
    pub max_depth: usize,
    /// Most tables in one header.
    pub max_tables: usize,
}

impl DecodeOptions {
    /// Tables in messages other than Hello (Frame, message and at most two nested tables).
    const FIXED_TABLES: usize = 8;

    /// Bounds that admit a Hello joining `max_swarms_per_session` swarms with every resume
    /// point (what a router advertising that limit must accept).
    pub fn for_swarms_per_session(max_swarms_per_session: u32) -> Self {
        DecodeOptions {
            max_depth: 8,
            max_tables: Self::FIXED_TABLES
                + crate::ORDERED_CLASS_COUNT * max_swarms_per_session as usize,
        }
    }
}

impl Default for DecodeOptions {
    /// Bounds for any limit a router may advertise ([`crate::MAX_SWARMS_PER_SESSION`]).
    fn default() -> Self {
        Self::for_swarms_per_session(crate::MAX_SWARMS_PER_SESSION)
    }
}

/// An encoded frame: `head` is `frame_len | header_len | header`, `body` is the payload
/// (empty for messages without one). Write both, in order, e.g. with quinn's
/// `write_all_chunks`; `body` is never copied by encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFrame {
    pub head: Bytes,
    pub body: Bytes,
}

impl OutFrame {
    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Head and body in one buffer (tests and tools; the hot path writes the two chunks).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }
}

thread_local! {
    // One builder per thread, reset between frames, so encoding allocates only the output.
    static BUILDER: RefCell<FlatBufferBuilder<'static>> = RefCell::new(FlatBufferBuilder::with_capacity(512));
}

fn with_builder<R>(f: impl FnOnce(&mut FlatBufferBuilder<'static>) -> R) -> R {
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

fn wire_class(class: Class) -> w::Class {
    w::Class(class as u8)
}

fn wire_role(role: Role) -> w::Role {
    match role {
        Role::Agent => w::Role::Agent,
        Role::Controller => w::Role::Controller,
        Role::Worker => w::Role::Worker,
    }
}

fn opt_str<'a>(fbb: &mut FlatBufferBuilder<'a>, value: Option<&str>) -> Option<WIPOffset<&'a str>> {
    value.map(|s| fbb.create_string(s))
}

/// Finishes `message` into a frame head of `body_len` trailing bytes.
fn finish(
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
            },
        );
        finish(fbb, w::Message::Deliver, msg.as_union_value(), payload_len)
    })
}

/// Encodes any message. Publish and Deliver payloads become the frame body by reference.
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
            Message::JobAck { job_id } => {
                let t = w::JobAck::create(fbb, &w::JobAckArgs { job_id: job_id.0 });
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

fn class_of(value: w::Class) -> Result<Class, DecodeError> {
    Class::from_u8(value.0).ok_or(DecodeError::InvalidField {
        reason: "unknown class",
    })
}

fn role_of(value: w::Role) -> Result<Role, DecodeError> {
    match value {
        w::Role::Agent => Ok(Role::Agent),
        w::Role::Controller => Ok(Role::Controller),
        w::Role::Worker => Ok(Role::Worker),
        _ => Err(DecodeError::InvalidField {
            reason: "unknown role",
        }),
    }
}

fn job_state_of(value: w::JobState) -> Result<JobState, DecodeError> {
    JobState::from_u8(value.0).ok_or(DecodeError::InvalidField {
        reason: "unknown job state",
    })
}

fn required(value: Option<&str>, reason: &'static str) -> Result<String, DecodeError> {
    match value {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(DecodeError::InvalidField { reason }),
    }
}

fn optional(value: Option<&str>) -> Option<String> {
    value.filter(|s| !s.is_empty()).map(str::to_owned)
}

fn missing(kind: &'static str) -> DecodeError {
    DecodeError::Malformed { reason: kind }
}

/// Verifies and decodes one frame (the bytes after the length prefix, as returned by
/// [`crate::FrameDecoder::next_frame`]). Payloads are slices of `frame`, never copies.
pub fn decode(frame: Bytes, options: &DecodeOptions) -> Result<Message, DecodeError> {
    if frame.len() < HEADER_LEN_BYTES {
        return Err(DecodeError::Malformed {
            reason: "frame shorter than its header length field",
        });
    }
    let header_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let header_end = HEADER_LEN_BYTES
        .checked_add(header_len)
        .filter(|end| *end <= frame.len())
        .ok_or(DecodeError::Malformed {
            reason: "header length exceeds the frame",
        })?;
    let header = &frame[HEADER_LEN_BYTES..header_end];
    let verifier = VerifierOptions {
        max_depth: options.max_depth,
        max_tables: options.max_tables,
        max_apparent_size: frame.len().saturating_mul(4).max(1024),
        ignore_missing_null_terminator: false,
    };
    let root = flatbuffers::root_with_opts::<w::Frame>(&verifier, header).map_err(|e| {
        DecodeError::Verification {
            detail: e.to_string(),
        }
    })?;
    let body = frame.slice(header_end..);
    let check_body = |payload_len: u32| -> Result<Bytes, DecodeError> {
        if payload_len as usize != body.len() {
            return Err(DecodeError::InvalidField {
                reason: "payload_len does not match the frame body",
            });
        }
        Ok(body.clone())
    };
    let no_body = || -> Result<(), DecodeError> {
        if body.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::InvalidField {
                reason: "unexpected frame body",
            })
        }
    };
    let message = match root.message_type() {
        w::Message::Hello => {
            let m = root.message_as_hello().ok_or(missing("empty Hello"))?;
            no_body()?;
            Message::Hello(Hello {
                protocol_version: m.protocol_version(),
                swarms: m
                    .swarms()
                    .map(|v| v.iter().map(str::to_owned).collect())
                    .unwrap_or_default(),
                agent_id: required(m.agent_id(), "Hello without agent_id")?,
                role: role_of(m.role())?,
                client_name: m.client_name().unwrap_or_default().to_owned(),
                client_version: m.client_version().unwrap_or_default().to_owned(),
                resume: match m.resume() {
                    Some(points) => points
                        .iter()
                        .map(|r| {
                            Ok(ResumePoint {
                                swarm: required(r.swarm(), "Resume without swarm")?,
                                class: class_of(r.class())?,
                                epoch: Epoch(r.epoch()),
                                last_applied: OpId(r.last_applied()),
                            })
                        })
                        .collect::<Result<_, DecodeError>>()?,
                    None => Vec::new(),
                },
                metadata: m.metadata().unwrap_or_default().to_owned(),
                bulk: m.bulk(),
                // A token of 0 is never given out: it means "not an attach".
                attach: (m.attach_token() != 0).then(|| Attach {
                    session: SessionId(m.attach_session()),
                    token: m.attach_token(),
                }),
            })
        }
        w::Message::Welcome => {
            let m = root.message_as_welcome().ok_or(missing("empty Welcome"))?;
            no_body()?;
            let limits = m.limits().map(|l| Limits {
                max_frame_bytes: l.max_frame_bytes(),
                max_subscriptions: l.max_subscriptions(),
                max_swarms_per_session: l.max_swarms_per_session(),
                queue_frames: l
                    .queue_frames()
                    .map(|v| v.iter().collect())
                    .unwrap_or_default(),
                heartbeat_interval_ms: l.heartbeat_interval_ms(),
                heartbeat_timeout_ms: l.heartbeat_timeout_ms(),
            });
            Message::Welcome(Welcome {
                session_id: SessionId(m.session_id()),
                router_name: m.router_name().unwrap_or_default().to_owned(),
                limits: limits.unwrap_or_default(),
                bulk: (m.attach_token() != 0).then(|| BulkOffer {
                    port: m.bulk_port(),
                    token: m.attach_token(),
                }),
            })
        }
        w::Message::Error => {
            let m = root.message_as_error().ok_or(missing("empty Error"))?;
            no_body()?;
            Message::Error(ErrorMessage {
                code: m.code(),
                message: m.message().unwrap_or_default().to_owned(),
                request_id: m.request_id(),
                retry_after_ms: m.retry_after_ms(),
            })
        }
        w::Message::Subscribe => {
            let m = root
                .message_as_subscribe()
                .ok_or(missing("empty Subscribe"))?;
            no_body()?;
            Message::Subscribe(Subscription {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "Subscribe without swarm")?,
                class: class_of(m.class())?,
                agent_filter: optional(m.agent_filter()),
            })
        }
        w::Message::Unsubscribe => {
            let m = root
                .message_as_unsubscribe()
                .ok_or(missing("empty Unsubscribe"))?;
            no_body()?;
            Message::Unsubscribe(Subscription {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "Unsubscribe without swarm")?,
                class: class_of(m.class())?,
                agent_filter: optional(m.agent_filter()),
            })
        }
        w::Message::SubscribeAck => {
            let m = root
                .message_as_subscribe_ack()
                .ok_or(missing("empty SubscribeAck"))?;
            no_body()?;
            Message::SubscribeAck {
                request_id: m.request_id(),
            }
        }
        w::Message::Publish => {
            let m = root.message_as_publish().ok_or(missing("empty Publish"))?;
            Message::Publish(Publish {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "Publish without swarm")?,
                class: class_of(m.class())?,
                target_agent: optional(m.target_agent()),
                key: optional(m.key()),
                payload: check_body(m.payload_len())?,
                fencing_token: m.fencing_token(),
                lease: optional(m.lease()),
            })
        }
        w::Message::PublishAck => {
            let m = root
                .message_as_publish_ack()
                .ok_or(missing("empty PublishAck"))?;
            no_body()?;
            Message::PublishAck {
                request_id: m.request_id(),
                op_id: OpId(m.op_id()),
                epoch: Epoch(m.epoch()),
            }
        }
        w::Message::Deliver => {
            let m = root.message_as_deliver().ok_or(missing("empty Deliver"))?;
            Message::Deliver(Deliver {
                swarm: required(m.swarm(), "Deliver without swarm")?,
                class: class_of(m.class())?,
                op_id: OpId(m.op_id()),
                epoch: Epoch(m.epoch()),
                source_agent: m.source_agent().unwrap_or_default().to_owned(),
                target_agent: optional(m.target_agent()),
                key: optional(m.key()),
                payload: check_body(m.payload_len())?,
                fencing_token: m.fencing_token(),
                lease: optional(m.lease()),
            })
        }
        w::Message::Ack => {
            let m = root.message_as_ack().ok_or(missing("empty Ack"))?;
            no_body()?;
            Message::Ack {
                swarm: required(m.swarm(), "Ack without swarm")?,
                class: class_of(m.class())?,
                op_id: OpId(m.op_id()),
            }
        }
        w::Message::EpochChanged => {
            let m = root
                .message_as_epoch_changed()
                .ok_or(missing("empty EpochChanged"))?;
            no_body()?;
            Message::EpochChanged {
                swarm: required(m.swarm(), "EpochChanged without swarm")?,
                epoch: Epoch(m.epoch()),
                previous_epoch: Epoch(m.previous_epoch()),
            }
        }
        w::Message::DeltaRequest => {
            let m = root
                .message_as_delta_request()
                .ok_or(missing("empty DeltaRequest"))?;
            no_body()?;
            Message::DeltaRequest {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "DeltaRequest without swarm")?,
                from_op: OpId(m.from_op()),
                to_op: OpId(m.to_op()),
            }
        }
        w::Message::DeltaAck => {
            let m = root
                .message_as_delta_ack()
                .ok_or(missing("empty DeltaAck"))?;
            no_body()?;
            Message::DeltaAck(DeltaAck {
                request_id: m.request_id(),
                epoch: Epoch(m.epoch()),
                first_op: OpId(m.first_op()),
                last_op: OpId(m.last_op()),
                count: m.count(),
                more: m.more(),
                compacted: m.compacted(),
            })
        }
        w::Message::WorkerStatus => {
            let m = root
                .message_as_worker_status()
                .ok_or(missing("empty WorkerStatus"))?;
            no_body()?;
            let strings =
                |v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<&str>>>| {
                    v.map(|v| v.iter().map(str::to_owned).collect())
                        .unwrap_or_default()
                };
            Message::WorkerStatus(WorkerStatus {
                request_id: m.request_id(),
                node: required(m.node(), "WorkerStatus without node")?,
                zone: m.zone().unwrap_or_default().to_owned(),
                gpu_count: m.gpu_count(),
                gpu_model: m.gpu_model().unwrap_or_default().to_owned(),
                gpu_memory_total: m.gpu_memory_total(),
                gpu_memory_free: m.gpu_memory_free(),
                weight: m.weight(),
                models: strings(m.models()),
                adapters: strings(m.adapters()),
                in_flight: m.in_flight(),
                draining: m.draining(),
            })
        }
        w::Message::WorkerAck => {
            let m = root
                .message_as_worker_ack()
                .ok_or(missing("empty WorkerAck"))?;
            no_body()?;
            Message::WorkerAck {
                request_id: m.request_id(),
                node_id: m.node_id(),
            }
        }
        w::Message::OpenSession => {
            let m = root
                .message_as_open_session()
                .ok_or(missing("empty OpenSession"))?;
            no_body()?;
            Message::OpenSession {
                request_id: m.request_id(),
                session_key: required(m.session_key(), "OpenSession without session_key")?,
                model: optional(m.model()),
            }
        }
        w::Message::SessionPinned => {
            let m = root
                .message_as_session_pinned()
                .ok_or(missing("empty SessionPinned"))?;
            no_body()?;
            Message::SessionPinned(SessionPinned {
                request_id: m.request_id(),
                session_key: required(m.session_key(), "SessionPinned without session_key")?,
                node: m.node().unwrap_or_default().to_owned(),
                node_id: m.node_id(),
                cold_load: m.cold_load(),
                kept: m.kept(),
            })
        }
        w::Message::CloseSession => {
            let m = root
                .message_as_close_session()
                .ok_or(missing("empty CloseSession"))?;
            no_body()?;
            Message::CloseSession {
                request_id: m.request_id(),
                session_key: required(m.session_key(), "CloseSession without session_key")?,
            }
        }
        w::Message::Request => {
            let m = root.message_as_request().ok_or(missing("empty Request"))?;
            Message::Request(Request {
                request_id: m.request_id(),
                session_key: optional(m.session_key()),
                model: optional(m.model()),
                timeout_ms: m.timeout_ms(),
                source_agent: optional(m.source_agent()),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::Reply => {
            let m = root.message_as_reply().ok_or(missing("empty Reply"))?;
            Message::Reply(Reply {
                request_id: m.request_id(),
                ok: m.ok(),
                node: optional(m.node()),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::Heartbeat => {
            let m = root
                .message_as_heartbeat()
                .ok_or(missing("empty Heartbeat"))?;
            no_body()?;
            Message::Heartbeat {
                sent_at_ms: m.sent_at_ms(),
            }
        }
        w::Message::PresenceQuery => {
            let m = root
                .message_as_presence_query()
                .ok_or(missing("empty PresenceQuery"))?;
            no_body()?;
            Message::PresenceQuery {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "PresenceQuery without swarm")?,
            }
        }
        w::Message::PresenceList => {
            let m = root
                .message_as_presence_list()
                .ok_or(missing("empty PresenceList"))?;
            no_body()?;
            let agents: Vec<&str> = m.agents().map(|v| v.iter().collect()).unwrap_or_default();
            let roles: Vec<w::Role> = m.roles().map(|v| v.iter().collect()).unwrap_or_default();
            let seen: Vec<u64> = m
                .last_seen_ms()
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let metadata: Vec<&str> = m.metadata().map(|v| v.iter().collect()).unwrap_or_default();
            if roles.len() != agents.len()
                || seen.len() != agents.len()
                || metadata.len() != agents.len()
            {
                return Err(DecodeError::InvalidField {
                    reason: "PresenceList vectors differ in length",
                });
            }
            let members = agents
                .into_iter()
                .zip(roles)
                .zip(seen)
                .zip(metadata)
                .map(|(((agent, role), last_seen_ms), metadata)| {
                    Ok(Member {
                        agent: agent.to_owned(),
                        role: role_of(role)?,
                        last_seen_ms,
                        metadata: metadata.to_owned(),
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::PresenceList {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "PresenceList without swarm")?,
                members,
            }
        }
        w::Message::LeaseRequest => {
            let m = root
                .message_as_lease_request()
                .ok_or(missing("empty LeaseRequest"))?;
            no_body()?;
            Message::LeaseRequest(LeaseRequest {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "LeaseRequest without swarm")?,
                name: required(m.name(), "LeaseRequest without name")?,
                action: match m.action() {
                    w::LeaseAction::Acquire => LeaseAction::Acquire,
                    w::LeaseAction::Renew => LeaseAction::Renew,
                    w::LeaseAction::Release => LeaseAction::Release,
                    _ => {
                        return Err(DecodeError::InvalidField {
                            reason: "unknown lease action",
                        })
                    }
                },
                token: m.token(),
                ttl_ms: m.ttl_ms(),
            })
        }
        w::Message::LeaseGrant => {
            let m = root
                .message_as_lease_grant()
                .ok_or(missing("empty LeaseGrant"))?;
            no_body()?;
            Message::LeaseGrant(LeaseGrant {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "LeaseGrant without swarm")?,
                name: required(m.name(), "LeaseGrant without name")?,
                holder: m.holder().unwrap_or_default().to_owned(),
                token: m.token(),
                granted_at_ms: m.granted_at_ms(),
                expires_at_ms: m.expires_at_ms(),
            })
        }
        w::Message::SafetyAction => {
            let m = root
                .message_as_safety_action()
                .ok_or(missing("empty SafetyAction"))?;
            no_body()?;
            Message::SafetyAction(SafetyAction {
                request_id: m.request_id(),
                kind: match m.kind() {
                    w::SafetyKind::Pause => SafetyKind::Pause,
                    w::SafetyKind::Resume => SafetyKind::Resume,
                    w::SafetyKind::Stop => SafetyKind::Stop,
                    w::SafetyKind::Drain => SafetyKind::Drain,
                    w::SafetyKind::Undrain => SafetyKind::Undrain,
                    _ => {
                        return Err(DecodeError::InvalidField {
                            reason: "unknown safety action",
                        })
                    }
                },
                swarm: m.swarm().unwrap_or_default().to_owned(),
                target: m.target().unwrap_or_default().to_owned(),
                duration_ms: m.duration_ms(),
            })
        }
        w::Message::SubmitJob => {
            let m = root
                .message_as_submit_job()
                .ok_or(missing("empty SubmitJob"))?;
            Message::SubmitJob(SubmitJob {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "SubmitJob without swarm")?,
                idempotency_key: required(
                    m.idempotency_key(),
                    "SubmitJob without idempotency_key",
                )?,
                model: optional(m.model()),
                priority: m.priority(),
                deadline_ms: m.deadline_ms(),
                max_attempts: m.max_attempts(),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::JobStatus => {
            let m = root
                .message_as_job_status()
                .ok_or(missing("empty JobStatus"))?;
            no_body()?;
            Message::JobStatus(JobStatus {
                request_id: m.request_id(),
                job_id: JobId(m.job_id()),
                state: job_state_of(m.state())?,
                attempt: m.attempt(),
                duplicate: m.duplicate(),
            })
        }
        w::Message::JobCredits => {
            let m = root
                .message_as_job_credits()
                .ok_or(missing("empty JobCredits"))?;
            no_body()?;
            Message::JobCredits {
                credits: m.credits(),
            }
        }
        w::Message::JobLease => {
            let m = root
                .message_as_job_lease()
                .ok_or(missing("empty JobLease"))?;
            Message::JobLease(JobLease {
                job_id: JobId(m.job_id()),
                attempt: m.attempt(),
                swarm: required(m.swarm(), "JobLease without swarm")?,
                model: optional(m.model()),
                submitter: m.submitter().unwrap_or_default().to_owned(),
                priority: m.priority(),
                lease_ms: m.lease_ms(),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::JobProgress => {
            let m = root
                .message_as_job_progress()
                .ok_or(missing("empty JobProgress"))?;
            Message::JobProgress(JobProgress {
                job_id: JobId(m.job_id()),
                attempt: m.attempt(),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::JobResult => {
            let m = root
                .message_as_job_result()
                .ok_or(missing("empty JobResult"))?;
            Message::JobResult(JobResult {
                request_id: m.request_id(),
                job_id: JobId(m.job_id()),
                attempt: m.attempt(),
                ok: m.ok(),
                retry: m.retry(),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::JobCancel => {
            let m = root
                .message_as_job_cancel()
                .ok_or(missing("empty JobCancel"))?;
            no_body()?;
            Message::JobCancel {
                request_id: m.request_id(),
                job_id: JobId(m.job_id()),
                attempt: m.attempt(),
            }
        }
        w::Message::JobUpdate => {
            let m = root
                .message_as_job_update()
                .ok_or(missing("empty JobUpdate"))?;
            Message::JobUpdate(JobUpdate {
                job_id: JobId(m.job_id()),
                swarm: required(m.swarm(), "JobUpdate without swarm")?,
                idempotency_key: m.idempotency_key().unwrap_or_default().to_owned(),
                state: job_state_of(m.state())?,
                attempt: m.attempt(),
                reason: m.reason().unwrap_or_default().to_owned(),
                payload: check_body(m.payload_len())?,
            })
        }
        w::Message::JobAck => {
            let m = root.message_as_job_ack().ok_or(missing("empty JobAck"))?;
            no_body()?;
            Message::JobAck {
                job_id: JobId(m.job_id()),
            }
        }
        w::Message::ListDeadLetters => {
            let m = root
                .message_as_list_dead_letters()
                .ok_or(missing("empty ListDeadLetters"))?;
            no_body()?;
            Message::ListDeadLetters {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "ListDeadLetters without swarm")?,
                after_job_id: JobId(m.after_job_id()),
                limit: m.limit(),
            }
        }
        w::Message::DeadLetters => {
            let m = root
                .message_as_dead_letters()
                .ok_or(missing("empty DeadLetters"))?;
            no_body()?;
            let ids: Vec<u64> = m.job_ids().map(|v| v.iter().collect()).unwrap_or_default();
            let attempts: Vec<u32> = m.attempts().map(|v| v.iter().collect()).unwrap_or_default();
            let keys: Vec<&str> = m
                .idempotency_keys()
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let reasons: Vec<&str> = m.reasons().map(|v| v.iter().collect()).unwrap_or_default();
            if attempts.len() != ids.len() || keys.len() != ids.len() || reasons.len() != ids.len()
            {
                return Err(DecodeError::InvalidField {
                    reason: "DeadLetters vectors of different lengths",
                });
            }
            Message::DeadLetters(DeadLetters {
                request_id: m.request_id(),
                jobs: ids
                    .into_iter()
                    .zip(attempts)
                    .zip(keys.into_iter().zip(reasons))
                    .map(|((id, attempts), (key, reason))| DeadLetter {
                        job_id: JobId(id),
                        attempts,
                        idempotency_key: key.to_owned(),
                        reason: reason.to_owned(),
                    })
                    .collect(),
                more: m.more(),
            })
        }
        w::Message::RedriveJob => {
            let m = root
                .message_as_redrive_job()
                .ok_or(missing("empty RedriveJob"))?;
            no_body()?;
            Message::RedriveJob {
                request_id: m.request_id(),
                swarm: required(m.swarm(), "RedriveJob without swarm")?,
                job_id: JobId(m.job_id()),
            }
        }
        other => return Err(DecodeError::UnknownMessage { kind: other.0 }),
    };
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use proptest::prelude::*;

    fn round_trip(message: &Message) -> Message {
        let out = encode(message);
        let mut dec = FrameDecoder::new(crate::DEFAULT_MAX_FRAME_BYTES);
        dec.push(Bytes::from(out.to_vec()));
        let frame = dec.next_frame().unwrap().unwrap();
        assert!(dec.is_idle());
        decode(frame, &DecodeOptions::default()).unwrap()
    }

    fn class() -> impl Strategy<Value = Class> {
        (0u8..5).prop_map(|v| Class::from_u8(v).unwrap())
    }
    fn job_state() -> impl Strategy<Value = JobState> {
        (0u8..6).prop_map(|v| JobState::from_u8(v).unwrap())
    }
    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,24}"
    }
    fn opt_name() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(name())
    }
    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                proptest::collection::vec(name(), 0..5),
                name(),
                0u8..3,
                ".{0,16}",
                ".{0,16}"
            )
                .prop_flat_map(|(swarms, agent_id, role, n, v)| {
                    let points = swarms.len() * crate::ORDERED_CLASS_COUNT;
                    (
                        any::<bool>(),
                        proptest::option::of((any::<u64>(), 1..=u64::MAX)),
                        proptest::collection::vec((any::<u64>(), any::<u64>()), points),
                    )
                        .prop_map(move |(bulk, attach, positions)| {
                            let resume = positions
                                .iter()
                                .enumerate()
                                .map(|(i, &(epoch, op))| ResumePoint {
                                    swarm: swarms[i / crate::ORDERED_CLASS_COUNT].clone(),
                                    class: [Class::Control, Class::Command][i % 2],
                                    epoch: Epoch(epoch),
                                    last_applied: OpId(op),
                                })
                                .collect();
                            Message::Hello(Hello {
                                protocol_version: 1,
                                swarms: swarms.clone(),
                                agent_id: agent_id.clone(),
                                role: [Role::Agent, Role::Controller, Role::Worker][role as usize],
                                client_name: n.clone(),
                                client_version: v.clone(),
                                resume,
                                metadata: v.clone(),
                                bulk,
                                attach: attach.map(|(session, token)| Attach {
                                    session: SessionId(session),
                                    token,
                                }),
                            })
                        })
                }),
            (
                any::<u64>(),
                name(),
                any::<u32>(),
                proptest::collection::vec(any::<u32>(), 0..6),
                proptest::option::of((any::<u16>(), 1..=u64::MAX))
            )
                .prop_map(|(id, router_name, max, queue_frames, bulk)| {
                    Message::Welcome(Welcome {
                        bulk: bulk.map(|(port, token)| BulkOffer { port, token }),
                        session_id: SessionId(id),
                        router_name,
                        limits: Limits {
                            max_frame_bytes: max,
                            max_subscriptions: max / 2,
                            max_swarms_per_session: 7,
                            queue_frames,
                            heartbeat_interval_ms: max / 3,
                            heartbeat_timeout_ms: max / 5,
                        },
                    })
                }),
            (any::<u16>(), ".{0,40}", any::<u64>(), any::<u32>()).prop_map(
                |(code, message, request_id, retry_after_ms)| {
                    Message::Error(ErrorMessage {
                        code,
                        message,
                        request_id,
                        retry_after_ms,
                    })
                }
            ),
            (any::<u64>(), name(), class(), opt_name(), any::<bool>()).prop_map(
                |(request_id, swarm, class, agent_filter, sub)| {
                    let s = Subscription {
                        request_id,
                        swarm,
                        class,
                        agent_filter,
                    };
                    if sub {
                        Message::Subscribe(s)
                    } else {
                        Message::Unsubscribe(s)
                    }
                }
            ),
            any::<u64>().prop_map(|request_id| Message::SubscribeAck { request_id }),
            (
                any::<u64>(),
                name(),
                class(),
                opt_name(),
                opt_name(),
                payload()
            )
                .prop_map(|(request_id, swarm, class, target_agent, key, payload)| {
                    Message::Publish(Publish {
                        request_id,
                        swarm,
                        class,
                        target_agent,
                        lease: key.clone(),
                        key,
                        payload,
                        fencing_token: request_id / 3,
                    })
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(request_id, op, epoch)| {
                Message::PublishAck {
                    request_id,
                    op_id: OpId(op),
                    epoch: Epoch(epoch),
                }
            }),
            (
                name(),
                class(),
                any::<u64>(),
                name(),
                opt_name(),
                opt_name(),
                payload()
            )
                .prop_map(
                    |(swarm, class, op, source_agent, target_agent, key, payload)| {
                        Message::Deliver(Deliver {
                            swarm,
                            class,
                            op_id: OpId(op),
                            epoch: Epoch(op.rotate_left(7)),
                            source_agent,
                            target_agent,
                            lease: key.clone(),
                            key,
                            payload,
                            fencing_token: op / 5,
                        })
                    }
                ),
            (name(), class(), any::<u64>()).prop_map(|(swarm, class, op)| Message::Ack {
                swarm,
                class,
                op_id: OpId(op)
            }),
            (
                name(),
                any::<u64>(),
                proptest::collection::vec((name(), any::<u64>(), any::<u64>()), 0..4)
            )
                .prop_map(|(agent_id, epoch, points)| Message::Hello(Hello {
                    protocol_version: 1,
                    swarms: points.iter().map(|p| p.0.clone()).collect(),
                    agent_id,
                    role: Role::Agent,
                    client_name: String::new(),
                    client_version: String::new(),
                    resume: points
                        .into_iter()
                        .map(|(swarm, e, op)| ResumePoint {
                            swarm,
                            class: if op % 2 == 0 {
                                Class::Command
                            } else {
                                Class::Control
                            },
                            epoch: Epoch(e ^ epoch),
                            last_applied: OpId(op),
                        })
                        .collect(),
                    metadata: String::new(),
                    bulk: false,
                    attach: None,
                })),
            (name(), any::<u64>(), any::<u64>()).prop_map(|(swarm, e, p)| {
                Message::EpochChanged {
                    swarm,
                    epoch: Epoch(e),
                    previous_epoch: Epoch(p),
                }
            }),
            (any::<u64>(), name(), any::<u64>(), any::<u64>()).prop_map(
                |(request_id, swarm, f, t)| Message::DeltaRequest {
                    request_id,
                    swarm,
                    from_op: OpId(f),
                    to_op: OpId(t),
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(request_id, e, op, count, more, compacted)| {
                    Message::DeltaAck(DeltaAck {
                        request_id,
                        epoch: Epoch(e),
                        first_op: OpId(op / 2),
                        last_op: OpId(op),
                        count,
                        more,
                        compacted,
                    })
                }),
            (
                any::<u64>(),
                (name(), ".{0,8}", any::<u32>(), ".{0,16}"),
                (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
                proptest::collection::vec(name(), 0..4),
                proptest::collection::vec(name(), 0..3),
                any::<bool>()
            )
                .prop_map(
                    |(
                        request_id,
                        (node, zone, gpu_count, gpu_model),
                        (t, f, weight, in_flight),
                        models,
                        adapters,
                        draining,
                    )| {
                        Message::WorkerStatus(WorkerStatus {
                            request_id,
                            node,
                            zone,
                            gpu_count,
                            gpu_model,
                            gpu_memory_total: t,
                            gpu_memory_free: f,
                            weight,
                            models,
                            adapters,
                            in_flight,
                            draining,
                        })
                    }
                ),
            (any::<u64>(), any::<u64>()).prop_map(|(request_id, node_id)| Message::WorkerAck {
                request_id,
                node_id
            }),
            (any::<u64>(), name(), opt_name()).prop_map(|(request_id, session_key, model)| {
                Message::OpenSession {
                    request_id,
                    session_key,
                    model,
                }
            }),
            (
                any::<u64>(),
                name(),
                name(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(
                    |(request_id, session_key, node, node_id, cold_load, kept)| {
                        Message::SessionPinned(SessionPinned {
                            request_id,
                            session_key,
                            node,
                            node_id,
                            cold_load,
                            kept,
                        })
                    }
                ),
            (any::<u64>(), name()).prop_map(|(request_id, session_key)| Message::CloseSession {
                request_id,
                session_key
            }),
            (
                any::<u64>(),
                opt_name(),
                opt_name(),
                any::<u32>(),
                opt_name(),
                payload()
            )
                .prop_map(
                    |(request_id, session_key, model, timeout_ms, source_agent, payload)| {
                        Message::Request(Request {
                            request_id,
                            session_key,
                            model,
                            timeout_ms,
                            source_agent,
                            payload,
                        })
                    }
                ),
            (any::<u64>(), any::<bool>(), opt_name(), payload()).prop_map(
                |(request_id, ok, node, payload)| Message::Reply(Reply {
                    request_id,
                    ok,
                    node,
                    payload,
                })
            ),
            any::<u64>().prop_map(|sent_at_ms| Message::Heartbeat { sent_at_ms }),
            (any::<u64>(), name())
                .prop_map(|(request_id, swarm)| Message::PresenceQuery { request_id, swarm }),
            (
                any::<u64>(),
                name(),
                proptest::collection::vec((name(), 0u8..3, any::<u64>(), ".{0,12}"), 0..6)
            )
                .prop_map(|(request_id, swarm, members)| Message::PresenceList {
                    request_id,
                    swarm,
                    members: members
                        .into_iter()
                        .map(|(agent, role, last_seen_ms, metadata)| Member {
                            agent,
                            role: [Role::Agent, Role::Controller, Role::Worker][role as usize],
                            last_seen_ms,
                            metadata,
                        })
                        .collect(),
                }),
            (
                any::<u64>(),
                name(),
                name(),
                0u8..3,
                any::<u64>(),
                any::<u32>()
            )
                .prop_map(|(request_id, swarm, name, action, token, ttl_ms)| {
                    Message::LeaseRequest(LeaseRequest {
                        request_id,
                        swarm,
                        name,
                        action: [
                            LeaseAction::Acquire,
                            LeaseAction::Renew,
                            LeaseAction::Release,
                        ][action as usize],
                        token,
                        ttl_ms,
                    })
                }),
            (
                any::<u64>(),
                name(),
                name(),
                name(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(request_id, swarm, name, holder, token, at)| {
                    Message::LeaseGrant(LeaseGrant {
                        request_id,
                        swarm,
                        name,
                        holder,
                        token,
                        granted_at_ms: at / 2,
                        expires_at_ms: at,
                    })
                }),
            (any::<u64>(), 0u8..5, name(), name(), any::<u64>()).prop_map(
                |(request_id, kind, swarm, target, duration_ms)| {
                    Message::SafetyAction(SafetyAction {
                        request_id,
                        kind: [
                            SafetyKind::Pause,
                            SafetyKind::Resume,
                            SafetyKind::Stop,
                            SafetyKind::Drain,
                            SafetyKind::Undrain,
                        ][kind as usize],
                        swarm,
                        target,
                        duration_ms,
                    })
                }
            ),
            (
                any::<u64>(),
                (name(), name(), opt_name()),
                (any::<u8>(), any::<u64>(), any::<u32>()),
                payload()
            )
                .prop_map(
                    |(
                        request_id,
                        (swarm, idempotency_key, model),
                        (priority, deadline_ms, max_attempts),
                        payload,
                    )| {
                        Message::SubmitJob(SubmitJob {
                            request_id,
                            swarm,
                            idempotency_key,
                            model,
                            priority,
                            deadline_ms,
                            max_attempts,
                            payload,
                        })
                    }
                ),
            (
                any::<u64>(),
                any::<u64>(),
                job_state(),
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(|(request_id, id, state, attempt, duplicate)| {
                    Message::JobStatus(JobStatus {
                        request_id,
                        job_id: JobId(id),
                        state,
                        attempt,
                        duplicate,
                    })
                }),
            any::<u32>().prop_map(|credits| Message::JobCredits { credits }),
            (
                (any::<u64>(), any::<u32>(), name(), opt_name(), name()),
                (any::<u8>(), any::<u32>()),
                payload()
            )
                .prop_map(
                    |((id, attempt, swarm, model, submitter), (priority, lease_ms), payload)| {
                        Message::JobLease(JobLease {
                            job_id: JobId(id),
                            attempt,
                            swarm,
                            model,
                            submitter,
                            priority,
                            lease_ms,
                            payload,
                        })
                    }
                ),
            (any::<u64>(), any::<u32>(), payload()).prop_map(|(id, attempt, payload)| {
                Message::JobProgress(JobProgress {
                    job_id: JobId(id),
                    attempt,
                    payload,
                })
            }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<bool>(),
                any::<bool>(),
                payload()
            )
                .prop_map(|(request_id, id, attempt, ok, retry, payload)| {
                    Message::JobResult(JobResult {
                        request_id,
                        job_id: JobId(id),
                        attempt,
                        ok,
                        retry,
                        payload,
                    })
                }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(request_id, id, attempt)| {
                Message::JobCancel {
                    request_id,
                    job_id: JobId(id),
                    attempt,
                }
            }),
            (
                (any::<u64>(), name(), name(), job_state()),
                (any::<u32>(), ".{0,24}"),
                payload()
            )
                .prop_map(
                    |((id, swarm, idempotency_key, state), (attempt, reason), payload)| {
                        Message::JobUpdate(JobUpdate {
                            job_id: JobId(id),
                            swarm,
                            idempotency_key,
                            state,
                            attempt,
                            reason,
                            payload,
                        })
                    }
                ),
            any::<u64>().prop_map(|id| Message::JobAck { job_id: JobId(id) }),
            (any::<u64>(), name(), any::<u64>(), any::<u32>()).prop_map(
                |(request_id, swarm, after, limit)| Message::ListDeadLetters {
                    request_id,
                    swarm,
                    after_job_id: JobId(after),
                    limit,
                }
            ),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<u32>(), name(), ".{0,24}"), 0..40),
                any::<bool>()
            )
                .prop_map(|(request_id, jobs, more)| {
                    Message::DeadLetters(DeadLetters {
                        request_id,
                        jobs: jobs
                            .into_iter()
                            .map(|(id, attempts, idempotency_key, reason)| DeadLetter {
                                job_id: JobId(id),
                                attempts,
                                idempotency_key,
                                reason,
                            })
                            .collect(),
                        more,
                    })
                }),
            (any::<u64>(), name(), any::<u64>()).prop_map(|(request_id, swarm, id)| {
                Message::RedriveJob {
                    request_id,
                    swarm,
                    job_id: JobId(id),
                }
            }),
        ]
    }

    /// A Hello joining `swarms` swarms (names of `name_len` bytes) with a resume point per
    /// ordered class in each, and text fields at their documented maximum.
    fn hello_at_limit(swarms: u32, name_len: usize, seed: u64) -> Hello {
        let names: Vec<String> = (0..swarms)
            .map(|i| {
                let unique = format!("{seed:x}-{i}");
                let pad = name_len.saturating_sub(unique.len());
                format!("{unique}{}", "s".repeat(pad))
            })
            .collect();
        let resume = names
            .iter()
            .enumerate()
            .flat_map(|(i, swarm)| {
                [Class::Control, Class::Command].map(|class| ResumePoint {
                    swarm: swarm.clone(),
                    class,
                    epoch: Epoch(seed.wrapping_add(i as u64) | 1),
                    last_applied: OpId(u64::MAX - i as u64),
                })
            })
            .collect();
        let text = "t".repeat(crate::HELLO_TEXT_BYTES);
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            swarms: names,
            agent_id: "a".repeat(crate::MAX_NAME_BYTES),
            role: Role::Agent,
            client_name: text.clone(),
            client_version: text.clone(),
            resume,
            metadata: text,
            bulk: true,
            attach: None,
        }
    }

    fn decode_one(message: &Message, options: &DecodeOptions) -> Result<Message, DecodeError> {
        let out = encode(message);
        let mut dec = FrameDecoder::new(crate::DEFAULT_MAX_FRAME_BYTES);
        dec.push(Bytes::from(out.to_vec()));
        decode(dec.next_frame().unwrap().unwrap(), options)
    }

    #[test]
    fn a_hello_at_the_highest_limit_any_router_may_advertise_decodes() {
        let hello = Message::Hello(hello_at_limit(
            crate::MAX_SWARMS_PER_SESSION,
            crate::MAX_NAME_BYTES,
            7,
        ));
        let wire = encode(&hello).wire_len() - LENGTH_PREFIX_BYTES;
        assert!(wire <= crate::max_hello_frame_bytes(crate::MAX_SWARMS_PER_SESSION));
        assert_eq!(
            decode_one(&hello, &DecodeOptions::default()).unwrap(),
            hello
        );
    }

    #[test]
    fn the_table_budget_refuses_more_resume_points_than_the_limit_allows() {
        let mut hello = hello_at_limit(64, 8, 1);
        let options = DecodeOptions::for_swarms_per_session(64);
        // Six tables of slack over a full Hello, then the verifier refuses.
        let extra = hello.resume[0].clone();
        hello.resume.extend(std::iter::repeat_n(extra, 64));
        let error = decode_one(&Message::Hello(hello), &options).unwrap_err();
        assert!(error.to_string().contains("Too many tables"), "{error}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every limit a router may advertise (1 ..= MAX_SWARMS_PER_SESSION swarms, names up
        /// to MAX_NAME_BYTES): a Hello using it in full decodes under the bounds derived from
        /// it, and fits the frame bound the router's configuration is checked against.
        #[test]
        fn a_hello_at_every_advertised_limit_decodes(
            limit in prop_oneof![1u32..=8, 56u32..=72, (crate::MAX_SWARMS_PER_SESSION - 8)..=crate::MAX_SWARMS_PER_SESSION],
            name_len in prop_oneof![Just(1usize), 1..=crate::MAX_NAME_BYTES, Just(crate::MAX_NAME_BYTES)],
            seed in any::<u64>(),
        ) {
            let hello = Message::Hello(hello_at_limit(limit, name_len, seed));
            let wire = encode(&hello).wire_len() - LENGTH_PREFIX_BYTES;
            prop_assert!(wire <= crate::max_hello_frame_bytes(limit));
            let options = DecodeOptions::for_swarms_per_session(limit);
            prop_assert_eq!(decode_one(&hello, &options).unwrap(), hello);
        }
    }

    proptest! {
        #[test]
        fn encode_verify_decode_round_trips(msg in message()) {
            prop_assert_eq!(round_trip(&msg), msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new(1024);
            dec.push(Bytes::from(bytes));
            while let Ok(Some(frame)) = dec.next_frame() {
                let _ = decode(frame, &DecodeOptions::default());
            }
        }

        #[test]
        fn corrupted_frames_error_or_decode_but_never_panic(msg in message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut wire = encode(&msg).to_vec();
            for (at, value) in flips {
                let i = 8 + at % (wire.len() - 8).max(1);
                if i < wire.len() { wire[i] ^= value; }
            }
            let mut dec = FrameDecoder::new(1 << 20);
            dec.push(Bytes::from(wire));
            if let Ok(Some(frame)) = dec.next_frame() {
                let _ = decode(frame, &DecodeOptions::default());
            }
        }
    }

    #[test]
    fn payload_is_a_slice_of_the_received_frame() {
        let msg = Message::Publish(Publish {
            request_id: 1,
            swarm: "s".into(),
            class: Class::Telemetry,
            target_agent: None,
            key: None,
            payload: Bytes::from_static(&[7u8; 300]),
            fencing_token: 0,
            lease: None,
        });
        let wire = Bytes::from(encode(&msg).to_vec());
        let start = wire.as_ptr() as usize;
        let end = start + wire.len();
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(wire);
        let Message::Publish(p) = decode(
            dec.next_frame().unwrap().unwrap(),
            &DecodeOptions::default(),
        )
        .unwrap() else {
            panic!("not a publish");
        };
        let at = p.payload.as_ptr() as usize;
        assert!(at >= start && at + 300 == end, "payload was copied");
    }

    #[test]
    fn deliver_header_stays_within_its_bound() {
        let long = "x".repeat(crate::MAX_NAME_BYTES);
        let head = encode_deliver_head(
            &long,
            Class::Command,
            OpId(u64::MAX),
            Epoch(u64::MAX),
            &long,
            Some(&long),
            Some(&long),
            u32::MAX as usize,
            u64::MAX,
            Some(&long),
        );
        // The head includes frame_len; the bound covers everything after it.
        assert!(
            head.len() - 4 <= crate::MAX_DELIVER_HEADER_BYTES,
            "{}",
            head.len()
        );
    }

    #[test]
    fn body_length_mismatch_is_rejected() {
        let msg = Message::Publish(Publish {
            request_id: 1,
            swarm: "s".into(),
            class: Class::Command,
            target_agent: None,
            key: None,
            payload: Bytes::from_static(b"abcd"),
            fencing_token: 0,
            lease: None,
        });
        let mut wire = encode(&msg).to_vec();
        wire.pop();
        let len = (wire.len() - 4) as u32;
        wire[..4].copy_from_slice(&len.to_le_bytes());
        let frame = Bytes::from(wire).slice(4..);
        assert_eq!(
            decode(frame, &DecodeOptions::default()).unwrap_err().code(),
            crate::ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn garbage_header_fails_verification() {
        let mut wire = vec![0u8; 4];
        wire.extend_from_slice(&(12u32).to_le_bytes());
        wire.extend_from_slice(&[0xFF; 12]);
        let frame = Bytes::from(wire).slice(4..);
        assert_eq!(
            decode(frame, &DecodeOptions::default()).unwrap_err().code(),
            crate::ErrorCode::VerificationFailed
        );
    }

    #[test]
    fn unknown_union_kind_is_reported() {
        // Encode an Ack, then change the union type byte to a value past the known ones.
        let wire = encode(&Message::Ack {
            swarm: "s".into(),
            class: Class::Command,
            op_id: OpId(1),
        })
        .to_vec();
        let header = &wire[8..];
        let mut found = None;
        for i in 0..header.len() {
            let mut copy = header.to_vec();
            if copy[i] == w::Message::Ack.0 {
                copy[i] = 99;
                let mut frame = (copy.len() as u32).to_le_bytes().to_vec();
                frame.extend_from_slice(&copy);
                if let Err(DecodeError::UnknownMessage { kind: 99 }) =
                    decode(Bytes::from(frame), &DecodeOptions::default())
                {
                    found = Some(i);
                    break;
                }
            }
        }
        assert!(found.is_some(), "no byte position produced UnknownMessage");
    }
}
