//! Hostile input: each case closes only the offending connection, with its error code,
//! while a well-behaved client carries on.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Connector, PublishOptions};
use swarmbus_schema::{
    decode, encode, Class, DecodeError, DecodeOptions, ErrorCode, Hello, Message, OpId, Publish,
    Role, PROTOCOL_VERSION,
};

use crate::common::{recv_n, start_router, TestRouter};

fn hello_frame() -> Vec<u8> {
    encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        swarms: vec!["s".into()],
        agent_id: "mallory".into(),
        role: Role::Agent,
        client_name: "hostile-test".into(),
        client_version: "0".into(),
        resume: Vec::new(),
        metadata: String::new(),
        bulk: false,
        attach: None,
        credential: None,
    }))
    .to_vec()
}

/// Connects and opens a raw session stream; with `hello`, says Hello and reads the
/// Welcome's length prefix (so the session is established).
async fn raw_session(t: &TestRouter, hello: bool) -> (quinn::Connection, quinn::SendStream) {
    let connection = t
        .connector
        .connect_quic(t.router.local_addr())
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    if hello {
        send.write_all(&hello_frame()).await.unwrap();
        let mut prefix = [0u8; 4];
        recv.read_exact(&mut prefix).await.unwrap();
    }
    (connection, send)
}

/// The code the router closes `connection` with (it must, within 10 s).
async fn close_code(connection: &quinn::Connection) -> u64 {
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("router closes the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

/// Opens a raw session stream, optionally says Hello (and reads Welcome), then writes
/// `bytes` (finishing the stream when `finish`), and returns the close code the router
/// chose.
async fn close_code_after(t: &TestRouter, hello: bool, bytes: &[u8], finish: bool) -> u64 {
    let (connection, mut send) = raw_session(t, hello).await;
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    close_code(&connection).await
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// An Ack frame whose union type byte is changed to an unknown kind (found by search, so
/// the test does not depend on the builder's layout).
fn unknown_kind_frame() -> Vec<u8> {
    let wire = encode(&Message::Ack {
        swarm: "s".into(),
        class: Class::Command,
        op_id: OpId(1),
    })
    .to_vec();
    for i in 8..wire.len() {
        let mut copy = wire.clone();
        copy[i] = 200;
        let frame = Bytes::copy_from_slice(&copy[4..]);
        if let Err(DecodeError::UnknownMessage { .. }) = decode(frame, &DecodeOptions::default()) {
            return copy;
        }
    }
    panic!("no byte of the Ack frame selects the union kind");
}

fn code(c: ErrorCode) -> u64 {
    u64::from(c.as_u16())
}

// One connection per kind of hostile input, each checked for its error code while a
// well-behaved session goes on: a table of cases, long by design.
#[tokio::test]
async fn hostile_connections_are_closed_alone_with_their_error_code() {
    let t = start_router(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let (good, mut good_rx) = t.connect("good", Role::Agent, &["s"]).await;
    good.subscribe("s", Class::Command, None).await.unwrap();

    // Garbage: pseudo-random bytes (fixed seed) on the session stream.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let garbage: Vec<u8> = (0..96)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let got = close_code_after(&t, true, &garbage, false).await;
    assert!(
        [
            ErrorCode::MalformedFrame,
            ErrorCode::FrameTooLarge,
            ErrorCode::VerificationFailed
        ]
        .map(code)
        .contains(&got),
        "garbage closed with {got}"
    );

    // Truncated frame: a prefix announcing 100 bytes, 10 sent, stream finished.
    let mut truncated = 100u32.to_le_bytes().to_vec();
    truncated.extend_from_slice(&[1; 10]);
    assert_eq!(
        close_code_after(&t, true, &truncated, true).await,
        code(ErrorCode::TruncatedFrame)
    );

    // Length prefix above the maximum (64 KiB here).
    let oversized = (64u32 * 1024 + 1).to_le_bytes();
    assert_eq!(
        close_code_after(&t, true, &oversized, false).await,
        code(ErrorCode::FrameTooLarge)
    );

    // A frame whose FlatBuffers header fails verification.
    let mut bad = 12u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&[0xEE; 12]);
    assert_eq!(
        close_code_after(&t, true, &framed(&bad), false).await,
        code(ErrorCode::VerificationFailed)
    );

    // Header length beyond the frame.
    let mut malformed = 1000u32.to_le_bytes().to_vec();
    malformed.extend_from_slice(&[0; 4]);
    assert_eq!(
        close_code_after(&t, true, &framed(&malformed), false).await,
        code(ErrorCode::MalformedFrame)
    );

    // An unknown message kind.
    assert_eq!(
        close_code_after(&t, true, &unknown_kind_frame(), false).await,
        code(ErrorCode::UnknownMessage)
    );

    // Publish before Hello.
    let publish = encode(&Message::Publish(Publish {
        request_id: 1,
        swarm: "s".into(),
        class: Class::Command,
        target_agent: None,
        key: None,
        payload: Bytes::from_static(b"sneaky"),
        fencing_token: 0,
        lease: None,
    }))
    .to_vec();
    assert_eq!(
        close_code_after(&t, false, &publish, false).await,
        code(ErrorCode::HelloRequired)
    );

    // A router-only message from a client, and a second Hello.
    let deliver = encode(&Message::PublishAck {
        request_id: 1,
        op_id: OpId(1),
        epoch: swarmbus_schema::Epoch(1),
    })
    .to_vec();
    assert_eq!(
        close_code_after(&t, true, &deliver, false).await,
        code(ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        close_code_after(&t, true, &hello_frame(), false).await,
        code(ErrorCode::DuplicateHello)
    );

    // The well-behaved client was not disturbed.
    let op = good
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"still fine"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(op, OpId(1));
    assert_eq!(
        recv_n(&mut good_rx, 1).await[0].payload.as_ref(),
        b"still fine"
    );
    assert!(t.router.stats().protocol_errors >= 9);
    t.router.shutdown().await;
}

#[tokio::test]
async fn garbage_on_a_publish_stream_closes_that_connection() {
    let t = start_router(|_| {}).await;
    let (connection, _session) = raw_session(&t, true).await;
    let mut uni = connection.open_uni().await.unwrap();
    uni.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0])
        .await
        .unwrap();
    assert_eq!(
        close_code(&connection).await,
        code(ErrorCode::FrameTooLarge)
    );
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_client_with_the_wrong_alpn_is_refused() {
    let t = start_router(|_| {}).await;
    let ca = t.router.ca_path().unwrap().to_owned();
    let wrong = Connector::with_alpn(&ca, "localhost", b"h3").unwrap();
    let err = wrong.connect_quic(t.router.local_addr()).await.unwrap_err();
    // TLS alert 120 is no_application_protocol.
    assert!(err.to_string().contains("error 120"), "{err}");
    // The right ALPN still works.
    let (client, _) = t.connect("ok", Role::Agent, &["s"]).await;
    assert_eq!(client.welcome().limits.max_frame_bytes, 1 << 20);
    t.router.shutdown().await;
}

#[tokio::test]
async fn an_unsupported_protocol_version_is_refused() {
    let t = start_router(|_| {}).await;
    let mut hello = hello_frame();
    // Re-encode with version 99.
    hello.clear();
    hello.extend(
        encode(&Message::Hello(Hello {
            protocol_version: 99,
            swarms: vec![],
            agent_id: "future".into(),
            role: Role::Agent,
            client_name: String::new(),
            client_version: String::new(),
            resume: Vec::new(),
            metadata: String::new(),
            bulk: false,
            attach: None,
            credential: None,
        }))
        .to_vec(),
    );
    let connection = t
        .connector
        .connect_quic(t.router.local_addr())
        .await
        .unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&hello).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .unwrap();
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("expected an application close, got {closed}");
    };
    assert_eq!(
        close.error_code.into_inner(),
        code(ErrorCode::UnsupportedVersion)
    );
    t.router.shutdown().await;
}

/// Reads frames from a raw session stream until an Error arrives.
async fn next_error(recv: &mut quinn::RecvStream) -> swarmbus_schema::ErrorMessage {
    let mut decoder = swarmbus_schema::FrameDecoder::new(1 << 20);
    loop {
        while let Some(message) = decoder.next_message(&DecodeOptions::default()).unwrap() {
            if let Message::Error(error) = message {
                return error;
            }
        }
        let chunk =
            tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(usize::MAX, true))
                .await
                .expect("a reply in time")
                .unwrap()
                .expect("stream open");
        decoder.push(chunk.bytes);
    }
}

#[tokio::test]
async fn a_payload_too_large_for_delivery_is_refused_and_the_session_goes_on() {
    let t = start_router(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let connection = t
        .connector
        .connect_quic(t.router.local_addr())
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&hello_frame()).await.unwrap();
    // The frame fits the limit, but the Deliver made of it (with a longer header) might not.
    let max_payload = swarmbus_schema::max_payload_bytes(64 * 1024);
    let publish = encode(&Message::Publish(Publish {
        request_id: 7,
        swarm: "s".into(),
        class: Class::Command,
        target_agent: None,
        key: None,
        payload: Bytes::from(vec![0u8; max_payload + 1]),
        fencing_token: 0,
        lease: None,
    }));
    let mut uni = connection.open_uni().await.unwrap();
    uni.write_all(&publish.to_vec()).await.unwrap();
    let error = next_error(&mut recv).await;
    assert_eq!(error.code, ErrorCode::PayloadTooLarge.as_u16());
    assert_eq!(error.request_id, 7);
    assert!(
        connection.close_reason().is_none(),
        "the session must go on"
    );

    // The client library refuses such a payload before sending it.
    let (client, _) = t.connect("c", Role::Agent, &["s"]).await;
    let err = client
        .publish(
            "s",
            Class::Command,
            Bytes::from(vec![0u8; max_payload + 1]),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, swarmbus_client::ClientError::InvalidArgument { .. }),
        "{err}"
    );
    let op = client
        .publish(
            "s",
            Class::Command,
            Bytes::from(vec![0u8; max_payload]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(op, OpId(1));
    t.router.shutdown().await;
}

#[tokio::test]
async fn only_publish_is_accepted_on_publish_streams() {
    let t = start_router(|_| {}).await;
    let connection = t
        .connector
        .connect_quic(t.router.local_addr())
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&hello_frame()).await.unwrap();
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.unwrap();
    let subscribe = encode(&Message::Subscribe(swarmbus_schema::Subscription {
        request_id: 1,
        swarm: "s".into(),
        class: Class::Command,
        agent_filter: None,
    }));
    let mut uni = connection.open_uni().await.unwrap();
    uni.write_all(&subscribe.to_vec()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .unwrap();
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("expected an application close, got {closed}");
    };
    assert_eq!(close.error_code.into_inner(), code(ErrorCode::WrongStream));
    t.router.shutdown().await;
}

/// Unfinished frames count against the connection as their bytes arrive: a client that
/// starts large frames on several streams and never finishes them is closed with `Busy`
/// once they hold more than `limits.partial_frame_bytes`; a client sending frames of that
/// size whole carries on.
#[tokio::test]
async fn unfinished_frames_are_capped_per_connection() {
    let max_frame = 64 << 10;
    let t = start_router(|c| {
        c.limits.max_frame_bytes = max_frame;
        c.limits.max_payload_bytes.command = max_frame / 2;
        c.limits.partial_frame_bytes = 2 * (max_frame as usize + 4);
        c.queues.connection_bytes = 4 * (max_frame as usize + 4);
    })
    .await;
    let (good, mut good_rx) = t.connect("good", Role::Agent, &["s"]).await;
    good.subscribe("s", Class::Command, None).await.unwrap();

    let (connection, _session) = raw_session(&t, true).await;
    // Three streams, each with 90% of a largest frame: each alone is within the cap, all
    // three are not.
    let body = vec![0u8; max_frame as usize * 9 / 10];
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut uni = connection.open_uni().await.unwrap();
        let _ = uni.write_all(&max_frame.to_le_bytes()).await;
        let _ = uni.write_all(&body).await;
        streams.push(uni);
    }
    assert_eq!(close_code(&connection).await, code(ErrorCode::Busy));

    // Frames of the largest payload, sent whole, pass.
    let payload = Bytes::from(vec![7u8; max_frame as usize / 2]);
    for _ in 0..4 {
        good.publish(
            "s",
            Class::Command,
            payload.clone(),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    assert_eq!(recv_n(&mut good_rx, 4).await.len(), 4);
    t.router.shutdown().await;
}

/// `limits.max_swarms` counts every shard's swarms together, a swarm that holds nothing
/// (no log, no member) is freed, and one agent may not take every place.
#[tokio::test]
async fn swarms_are_capped_router_wide_and_freed_when_empty() {
    let t = start_router(|c| {
        c.shards = 2;
        c.limits.max_swarms = 4;
        c.limits.max_swarms_per_agent = 3;
    })
    .await;
    let busy = |result: Result<(), swarmbus_client::ClientError>| match result {
        Err(swarmbus_client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::Busy.as_u16())
        }
        other => panic!("expected Busy, got {other:?}"),
    };
    let names = ["a", "b", "c", "d", "e", "f"];
    let (first, _rx1) = t.connect("first", Role::Agent, &names).await;
    for swarm in &names[..3] {
        first
            .subscribe(swarm, Class::Telemetry, None)
            .await
            .unwrap();
    }
    // The agent's quota.
    busy(first.subscribe("d", Class::Telemetry, None).await);
    let (second, _rx2) = t.connect("second", Role::Agent, &names).await;
    second.subscribe("d", Class::Telemetry, None).await.unwrap();
    // The router-wide cap, over both shards.
    busy(second.subscribe("e", Class::Telemetry, None).await);
    // Subscribing where a swarm exists creates nothing.
    second.subscribe("a", Class::Telemetry, None).await.unwrap();
    drop(first);
    second
        .unsubscribe("a", Class::Telemetry, None)
        .await
        .unwrap();
    // a, b and c are empty now: freed within a tick or so, then there is room again.
    let mut tries = 0;
    loop {
        match second.subscribe("e", Class::Telemetry, None).await {
            Ok(()) => break,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("empty swarms were not freed: {error}"),
        }
    }
    second.subscribe("f", Class::Telemetry, None).await.unwrap();
    t.router.shutdown().await;
}
