//! Bulk connections: a session's telemetry and job traffic on a second QUIC connection to
//! the router's bulk listener, attached with the token its Welcome offered.

use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream};
use swarmbus_client::{Connector, PublishOptions, Session};
use swarmbus_router::config::BulkListen;
use swarmbus_schema::{
    encode, Attach, BulkOffer, Class, DecodeOptions, ErrorCode, FrameDecoder, Hello, Message, Role,
    SessionId, Welcome, PROTOCOL_VERSION,
};

use crate::common::{recv_n, start_router, TestRouter};

/// A router with the default bulk listener (`auto`: listen's address, a port of its own).
async fn bulk_router() -> TestRouter {
    start_router(|c| assert_eq!(c.bulk_listen, BulkListen::Auto)).await
}

fn ack() -> PublishOptions {
    PublishOptions {
        ack: true,
        ..PublishOptions::default()
    }
}

/// Waits until the router counts `open` connections (closes are asynchronous).
async fn wait_for_open_connections(t: &TestRouter, open: u64) {
    for _ in 0..200 {
        if t.router.stats().connections_open == open {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "expected {open} open connections: {:?}",
        t.router.stats().connections_open
    );
}

#[tokio::test]
async fn a_session_attaches_its_bulk_connection_and_routes_every_class() {
    let t = bulk_router().await;
    let (agent, mut agent_rx) = t.connect("agent", Role::Agent, &["s"]).await;
    let (ctl, mut ctl_rx) = t.connect("ctl", Role::Controller, &["s"]).await;
    assert!(agent.has_bulk_connection() && ctl.has_bulk_connection());
    let offer = agent.welcome().bulk.expect("a bulk connection was offered");
    assert_eq!(offer.port, t.router.bulk_addr().unwrap().port());
    agent.subscribe("s", Class::Command, None).await.unwrap();
    ctl.subscribe("s", Class::Telemetry, None).await.unwrap();

    // A command on the main connections, telemetry on the bulk ones, in both directions.
    let op = ctl
        .publish("s", Class::Command, Bytes::from_static(b"go"), ack())
        .await
        .unwrap();
    let got = recv_n(&mut agent_rx, 1).await;
    assert_eq!((got[0].op_id, &got[0].payload[..]), (op, &b"go"[..]));
    agent
        .publish("s", Class::Telemetry, Bytes::from_static(b"t"), ack())
        .await
        .unwrap();
    let got = recv_n(&mut ctl_rx, 1).await;
    assert_eq!(
        (got[0].class, &got[0].payload[..], &got[0].source_agent[..]),
        (Class::Telemetry, &b"t"[..], "agent")
    );
    let stats = t.router.stats();
    assert_eq!(stats.bulk_attached, 2, "{stats:?}");
    assert_eq!(stats.connections_accepted, 4, "{stats:?}");
    assert!(stats.bulk_streams >= 1, "{stats:?}");

    // Closing the session closes both of its connections.
    agent.close();
    wait_for_open_connections(&t, 2).await;
    t.router.shutdown().await;
}

#[tokio::test]
async fn without_an_offer_everything_shares_the_one_connection() {
    let t = bulk_router().await;
    let (ctl, _ctl_rx) = t.connect("ctl", Role::Controller, &["s"]).await;
    // Declined by the client.
    let declined = Session {
        bulk_connection: false,
        ..Session::new("plain", Role::Agent, ["s"])
    };
    let (plain, mut plain_rx) = t
        .connector
        .connect(t.router.local_addr(), declined)
        .await
        .unwrap();
    assert!(plain.welcome().bulk.is_none() && !plain.has_bulk_connection());
    // A session on the bulk listener itself is all bulk already: no offer.
    let (direct, mut direct_rx) = t
        .connector
        .connect(
            t.router.bulk_addr().unwrap(),
            Session::new("direct", Role::Agent, ["s"]),
        )
        .await
        .unwrap();
    assert!(direct.welcome().bulk.is_none() && !direct.has_bulk_connection());
    for client in [&plain, &direct] {
        client.subscribe("s", Class::Telemetry, None).await.unwrap();
    }
    ctl.publish("s", Class::Telemetry, Bytes::from_static(b"t"), ack())
        .await
        .unwrap();
    for rx in [&mut plain_rx, &mut direct_rx] {
        assert_eq!(&recv_n(rx, 1).await[0].payload[..], b"t");
    }
    assert_eq!(t.router.stats().bulk_attached, 1);
    t.router.shutdown().await;

    // A router without a bulk listener offers none.
    let t = start_router(|c| c.bulk_listen = BulkListen::Off).await;
    let (client, _rx) = t.connect("a", Role::Agent, &["s"]).await;
    assert!(client.welcome().bulk.is_none() && !client.has_bulk_connection());
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_failed_attach_falls_back_to_the_main_connection() {
    let t = bulk_router().await;
    // Bulk connections made with the wrong server name fail their TLS handshake.
    let ca = t.router.ca_path().unwrap().to_owned();
    let wrong_name = Connector::new(&ca, "not-the-router").unwrap();
    let connector = t.connector.clone().with_bulk_connector(&wrong_name);
    let (agent, mut agent_rx) = connector
        .connect(
            t.router.local_addr(),
            Session::new("agent", Role::Agent, ["s"]),
        )
        .await
        .unwrap();
    assert!(agent.welcome().bulk.is_some());
    assert!(!agent.has_bulk_connection());
    agent.subscribe("s", Class::Telemetry, None).await.unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let (ctl, _ctl_rx) = t.connect("ctl", Role::Controller, &["s"]).await;
    // Commands flow at once; telemetry once the router stopped waiting for the attach.
    ctl.publish("s", Class::Command, Bytes::from_static(b"c"), ack())
        .await
        .unwrap();
    ctl.publish("s", Class::Telemetry, Bytes::from_static(b"t"), ack())
        .await
        .unwrap();
    let mut got: Vec<_> = recv_n(&mut agent_rx, 2)
        .await
        .into_iter()
        .map(|d| d.payload)
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![Bytes::from_static(b"c"), Bytes::from_static(b"t")]
    );
    assert_eq!(t.router.stats().bulk_attached, 1, "only the controller's");
    t.router.shutdown().await;
}

/// Reads the next message from a raw stream; `None` when the router closed it instead.
async fn next_message(recv: &mut RecvStream, decoder: &mut FrameDecoder) -> Option<Message> {
    loop {
        if let Some(message) = decoder.next_message(&DecodeOptions::default()).unwrap() {
            return Some(message);
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1 << 16, true))
            .await
            .expect("a reply in time");
        match chunk {
            Ok(Some(chunk)) => decoder.push(chunk.bytes),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Opens a raw connection to `addr` and says `hello`; returns the connection and the
/// router's answer (`None`: closed without one).
async fn raw_hello(
    t: &TestRouter,
    addr: std::net::SocketAddr,
    hello: Hello,
) -> (Connection, Option<Message>) {
    let connection = t.connector.connect_quic(addr).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&encode(&Message::Hello(hello)).to_vec())
        .await
        .unwrap();
    let mut decoder = FrameDecoder::new(1 << 20);
    let answer = next_message(&mut recv, &mut decoder).await;
    // Keep the session stream open: dropping it would end a session.
    std::mem::forget(send);
    (connection, answer)
}

async fn close_code(connection: &Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the router closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

fn hello(agent: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        swarms: vec!["s".into()],
        agent_id: agent.into(),
        role: Role::Agent,
        ..Hello::default()
    }
}

fn attach(agent: &str, session: SessionId, token: u64) -> Hello {
    Hello {
        attach: Some(Attach { session, token }),
        swarms: Vec::new(),
        ..hello(agent)
    }
}

/// A raw session of agent "agent" on the main listener that can attach: its connection,
/// session id and the bulk offer its Welcome made.
async fn offered(t: &TestRouter) -> (Connection, SessionId, BulkOffer) {
    let (main, welcome) = raw_hello(
        t,
        t.router.local_addr(),
        Hello {
            bulk: true,
            ..hello("agent")
        },
    )
    .await;
    match welcome {
        Some(Message::Welcome(Welcome {
            session_id,
            bulk: Some(offer),
            ..
        })) => (main, session_id, offer),
        other => panic!("expected a Welcome with a bulk offer, got {other:?}"),
    }
}

#[tokio::test]
async fn an_attach_needs_the_sessions_agent_and_token_once() {
    let t = bulk_router().await;
    let bulk_addr = t.router.bulk_addr().unwrap();
    let (_main, session_id, BulkOffer { port, token }) = offered(&t).await;
    assert_eq!(port, bulk_addr.port());
    let invalid = u64::from(ErrorCode::InvalidRequest.as_u16());
    // A wrong token, or another agent with the right one, is refused and spends nothing.
    let (wrong_token, _) = raw_hello(&t, bulk_addr, attach("agent", session_id, token ^ 1)).await;
    assert_eq!(close_code(&wrong_token).await, invalid);
    let (wrong_agent, _) = raw_hello(&t, bulk_addr, attach("mallory", session_id, token)).await;
    assert_eq!(close_code(&wrong_agent).await, invalid);
    // The session's own attach is welcomed, once.
    let (_bulk, answer) = raw_hello(&t, bulk_addr, attach("agent", session_id, token)).await;
    assert!(
        matches!(answer, Some(Message::Welcome(Welcome { session_id: s, bulk: None, .. })) if s == session_id),
        "{answer:?}"
    );
    let (again, _) = raw_hello(&t, bulk_addr, attach("agent", session_id, token)).await;
    assert_eq!(close_code(&again).await, invalid);
    assert_eq!(t.router.stats().bulk_attached, 1);
    t.router.shutdown().await;
}

#[tokio::test]
async fn attaches_go_to_the_bulk_listener_and_end_with_their_session() {
    let t = bulk_router().await;
    let bulk_addr = t.router.bulk_addr().unwrap();
    // An attach on the main listener is refused.
    let (main, session_id, BulkOffer { token, .. }) = offered(&t).await;
    let (wrong_listener, _) = raw_hello(
        &t,
        t.router.local_addr(),
        attach("agent", session_id, token),
    )
    .await;
    assert_eq!(
        close_code(&wrong_listener).await,
        u64::from(ErrorCode::InvalidRequest.as_u16())
    );
    // Ending the session ends its bulk connection.
    let (bulk, answer) = raw_hello(&t, bulk_addr, attach("agent", session_id, token)).await;
    assert!(matches!(answer, Some(Message::Welcome(_))), "{answer:?}");
    main.close(quinn::VarInt::from_u32(0), b"done");
    assert_eq!(close_code(&bulk).await, 0);

    // A protocol fault on the bulk connection ends the session with the fault's code, on
    // the main connection too (where the application reads why its session ended).
    let (main, session_id, BulkOffer { token, .. }) = offered(&t).await;
    let (bulk, _) = raw_hello(&t, bulk_addr, attach("agent", session_id, token)).await;
    let mut stream = bulk.open_uni().await.unwrap();
    let misplaced = encode(&Message::Subscribe(swarmbus_schema::Subscription {
        request_id: 1,
        swarm: "s".into(),
        class: Class::Telemetry,
        agent_filter: None,
    }));
    stream.write_all(&misplaced.to_vec()).await.unwrap();
    let wrong_stream = u64::from(ErrorCode::WrongStream.as_u16());
    assert_eq!(close_code(&main).await, wrong_stream);
    let _ = close_code(&bulk).await;
    wait_for_open_connections(&t, 0).await;
    t.router.shutdown().await;
}
