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

// One sample of every message kind, for the round-trip tests: a list, long by design.
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
                            // A credential when the client name is long enough to be one.
                            credential: (n.len() > 4).then(|| crate::Token(n.clone())),
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
                        published_us: op.rotate_left(13),
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
                credential: None,
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
        (any::<u64>(), name(), any::<u64>(), any::<u64>()).prop_map(|(request_id, swarm, f, t)| {
            Message::DeltaRequest {
                request_id,
                swarm,
                from_op: OpId(f),
                to_op: OpId(t),
            }
        }),
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
        (any::<u64>(), any::<u32>(), job_state()).prop_map(|(id, attempt, state)| {
            Message::JobAck {
                job_id: JobId(id),
                attempt,
                state,
            }
        }),
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
        (any::<u64>(), "[A-Za-z0-9._-]{1,64}").prop_map(|(request_id, credential)| {
            Message::Authenticate {
                request_id,
                credential: crate::Token(credential),
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
        credential: Some(crate::Token("c".repeat(crate::MAX_CREDENTIAL_BYTES))),
    }
}

fn decode_one(message: &Message, options: &DecodeOptions) -> Result<Message, DecodeError> {
    let out = encode(message);
    let mut dec = FrameDecoder::new(crate::DEFAULT_MAX_FRAME_BYTES);
    dec.push(Bytes::from(out.to_vec()));
    decode(dec.next_frame().unwrap().unwrap(), options)
}

#[test]
fn a_credential_never_shows_in_debug_output() {
    let token = crate::Token("eyJhbGciOiJFZERTQSJ9.secret.sig".into());
    let hello = Hello {
        credential: Some(token.clone()),
        ..Hello::default()
    };
    let refresh = Message::Authenticate {
        request_id: 1,
        credential: token,
    };
    for shown in [format!("{hello:?}"), format!("{refresh:?}")] {
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("Token(31 bytes)"), "{shown}");
    }
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
        u64::MAX,
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
