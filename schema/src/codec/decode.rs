//! Verified decoding: each frame's FlatBuffers table is checked by the verifier, then read
//! into the owned message, with every required field present and every limit applied.

use super::*;

pub(super) fn class_of(value: w::Class) -> Result<Class, DecodeError> {
    Class::from_u8(value.0).ok_or(DecodeError::InvalidField {
        reason: "unknown class",
    })
}

pub(super) fn role_of(value: w::Role) -> Result<Role, DecodeError> {
    match value {
        w::Role::Agent => Ok(Role::Agent),
        w::Role::Controller => Ok(Role::Controller),
        w::Role::Worker => Ok(Role::Worker),
        _ => Err(DecodeError::InvalidField {
            reason: "unknown role",
        }),
    }
}

pub(super) fn job_state_of(value: w::JobState) -> Result<JobState, DecodeError> {
    JobState::from_u8(value.0).ok_or(DecodeError::InvalidField {
        reason: "unknown job state",
    })
}

pub(super) fn required(value: Option<&str>, reason: &'static str) -> Result<String, DecodeError> {
    match value {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(DecodeError::InvalidField { reason }),
    }
}

pub(super) fn optional(value: Option<&str>) -> Option<String> {
    value.filter(|s| !s.is_empty()).map(str::to_owned)
}

/// A credential: not empty, at most [`crate::MAX_CREDENTIAL_BYTES`].
pub(super) fn credential_of(credential: &str) -> Result<Token, DecodeError> {
    if credential.is_empty() || credential.len() > crate::MAX_CREDENTIAL_BYTES {
        return Err(DecodeError::InvalidField {
            reason: "credential empty or longer than MAX_CREDENTIAL_BYTES",
        });
    }
    Ok(Token(credential.to_owned()))
}

pub(super) fn missing(kind: &'static str) -> DecodeError {
    DecodeError::Malformed { reason: kind }
}

/// Verifies and decodes one frame (the bytes after the length prefix, as returned by
/// [`crate::FrameDecoder::next_frame`]). Payloads are slices of `frame`, never copies.
// One arm per message kind, in the schema's order, mirroring `encode`: each arm checks
// that message's required fields and limits. Long by design.
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
                credential: match m.credential() {
                    Some(credential) => Some(credential_of(credential)?),
                    None => None,
                },
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
                published_us: m.published_us(),
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
                attempt: m.attempt(),
                state: job_state_of(m.state())?,
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
        w::Message::Authenticate => {
            let m = root
                .message_as_authenticate()
                .ok_or(missing("empty Authenticate"))?;
            no_body()?;
            Message::Authenticate {
                request_id: m.request_id(),
                credential: credential_of(m.credential().unwrap_or_default())?,
            }
        }
        other => return Err(DecodeError::UnknownMessage { kind: other.0 }),
    };
    Ok(message)
}
