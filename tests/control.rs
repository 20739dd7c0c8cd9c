//! The control plane: presence (join, leave on close and on timeout, newest session wins),
//! leader leases with fencing tokens, configuration deltas, and safety actions.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{ConfigView, IdempotentApply, PublishOptions, Session};
use swarmbus_router::{Config, Router};
use swarmbus_schema::{encode, Class, Hello, Message, OpId, Role, PROTOCOL_VERSION};

use crate::common::{recv_keyed, recv_n, start_retrying, start_router, TestRouter};

fn fast_heartbeats(c: &mut Config) {
    c.presence.heartbeat_interval_ms = 100;
    // Twenty intervals: a stalled test machine must not make live agents look gone.
    c.presence.heartbeat_timeout_ms = 2_000;
}

fn event(d: &swarmbus_schema::Deliver) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

#[tokio::test]
async fn presence_sees_joins_and_leaves_on_close_and_on_timeout() {
    let t = start_router(fast_heartbeats).await;
    let (watcher, mut alerts) = t.connect("watcher", Role::Controller, &["s"]).await;
    watcher.subscribe("s", Class::Alert, None).await.unwrap();
    let mut session = Session::new("a1", Role::Agent, ["s"]);
    session.metadata = r#"{"gpu":"h100"}"#.into();
    let (a1, _rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    let joined = recv_keyed(&mut alerts, "presence", 1).await;
    assert!(
        event(&joined[0]).contains(r#""event":"join","agent":"a1""#),
        "{}",
        event(&joined[0])
    );
    // Heartbeats keep a1 present well past the timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let members = watcher.presence("s").await.unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.agent.as_str()).collect();
    assert_eq!(names, ["a1", "watcher"]);
    assert_eq!(members[0].role, Role::Agent);
    assert_eq!(members[0].metadata, r#"{"gpu":"h100"}"#);
    assert!(members[0].last_seen_ms > 0);
    // Closing the connection: a leave, reason closed.
    a1.close();
    let left = recv_keyed(&mut alerts, "presence", 1).await;
    assert!(event(&left[0]).contains(r#""event":"leave","agent":"a1""#));
    assert!(event(&left[0]).contains(r#""reason":"closed""#));

    // A session that never heartbeats (a bare connection saying Hello by hand) is declared
    // gone after the timeout, and its connection is closed with HeartbeatTimeout.
    let connection = t
        .connector
        .connect_quic(t.router.local_addr())
        .await
        .unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    let hello = encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        swarms: vec!["s".into()],
        agent_id: "silent".into(),
        role: Role::Agent,
        client_name: "test".into(),
        client_version: "0".into(),
        resume: Vec::new(),
        metadata: String::new(),
        bulk: false,
        attach: None,
        credential: None,
    }));
    send.write_all(&hello.to_vec()).await.unwrap();
    let events = recv_keyed(&mut alerts, "presence", 2).await;
    assert!(event(&events[0]).contains(r#""event":"join","agent":"silent""#));
    assert!(event(&events[1]).contains(r#""event":"leave","agent":"silent""#));
    assert!(event(&events[1]).contains(r#""reason":"timeout""#));
    let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed())
        .await
        .unwrap();
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("{closed:?}");
    };
    assert_eq!(close.error_code.into_inner(), 35, "HeartbeatTimeout");
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_under_the_same_agent_id_replaces_the_old_session_without_ghosts() {
    let t = start_router(|_| {}).await;
    let (watcher, mut alerts) = t.connect("watcher", Role::Controller, &["s"]).await;
    watcher.subscribe("s", Class::Alert, None).await.unwrap();
    let (old, _rx1) = t.connect("dup", Role::Agent, &["s"]).await;
    let (_new, _rx2) = t.connect("dup", Role::Agent, &["s"]).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), old.closed())
        .await
        .unwrap();
    assert_eq!(closed.code(), Some(26), "Replaced: {closed}");
    let members = watcher.presence("s").await.unwrap();
    assert_eq!(
        members.iter().filter(|m| m.agent == "dup").count(),
        1,
        "{members:?}"
    );
    // One join, and no leave for the replaced session.
    let events = recv_keyed(&mut alerts, "presence", 1).await;
    assert!(event(&events[0]).contains(r#""event":"join","agent":"dup""#));
    watcher
        .publish(
            "s",
            Class::Alert,
            Bytes::from_static(b"marker"),
            PublishOptions {
                key: Some("presence".into()),
                ack: true,
                ..PublishOptions::default()
            },
        )
        .await
        .unwrap();
    let next = recv_keyed(&mut alerts, "presence", 1).await;
    assert_eq!(
        next[0].payload.as_ref(),
        b"marker",
        "no ghost leave or second join"
    );
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_paused_leader_loses_its_lease_and_its_late_commands_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let config = |listen| Config {
        listen,
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        shards: 2,
        ..Config::default()
    };
    let router = Router::start(config("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = router.local_addr();
    let t = TestRouter::from_parts(
        router,
        swarmbus_client::Connector::new(&data.path().join("tls/ca.pem"), "localhost").unwrap(),
    );
    let (a, _ra) = t.connect("leader-a", Role::Controller, &["s"]).await;
    let (b, _rb) = t.connect("leader-b", Role::Controller, &["s"]).await;
    let ttl = Duration::from_millis(2_000);
    let grant_a = a.acquire_lease("s", "leader", ttl).await.unwrap();
    assert_eq!(grant_a.token, 1);
    assert!(grant_a.expires_at_ms > grant_a.granted_at_ms);
    let held = b.acquire_lease("s", "leader", ttl).await.unwrap_err();
    assert_eq!(held.code(), Some(27), "LeaseHeld: {held}");
    assert!(held.retry_after_ms() > 0);
    // a stamps its commands with its token while it holds the lease.
    let stamped = |token| PublishOptions {
        fencing_token: token,
        ..PublishOptions::default()
    };
    a.publish("s", Class::Command, Bytes::from_static(b"a1"), stamped(1))
        .await
        .unwrap();
    // a is paused past its TTL; b takes over with a newer token.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let grant_b = b.acquire_lease("s", "leader", ttl).await.unwrap();
    assert_eq!(grant_b.token, 2);
    assert!(grant_b.granted_at_ms >= grant_a.expires_at_ms, "no overlap");
    // a wakes up: its renewal is refused and its late command too.
    let lost = a.renew_lease(&grant_a, ttl).await.unwrap_err();
    assert_eq!(lost.code(), Some(28), "LeaseLost: {lost}");
    let stale = a
        .publish("s", Class::Command, Bytes::from_static(b"late"), stamped(1))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some(29), "StaleFencingToken: {stale}");
    b.publish("s", Class::Command, Bytes::from_static(b"b1"), stamped(2))
        .await
        .unwrap();
    drop((a, b));
    // Tokens never go backwards across a restart.
    let TestRouter { router, .. } = t;
    router.shutdown().await;
    let router = start_retrying(|| config(addr)).await;
    let t = TestRouter::from_parts(
        router,
        swarmbus_client::Connector::new(&data.path().join("tls/ca.pem"), "localhost").unwrap(),
    );
    let (c, _rc) = t.connect("leader-c", Role::Controller, &["s"]).await;
    // b's holding may still run at b (the router cannot know when b last renewed): it is
    // restored for its TTL, and nobody else gets the lease until then.
    let restarted = std::time::Instant::now();
    let held = c.acquire_lease("s", "leader", ttl).await.unwrap_err();
    assert_eq!(held.code(), Some(27), "LeaseHeld after the restart: {held}");
    tokio::time::sleep(ttl.saturating_sub(restarted.elapsed()) + Duration::from_millis(100)).await;
    let grant_c = c.acquire_lease("s", "leader", ttl).await.unwrap();
    assert_eq!(grant_c.token, 3);
    // The lease holder can release early.
    c.release_lease(&grant_c).await.unwrap();
    let (d, _rd) = t.connect("leader-d", Role::Controller, &["s"]).await;
    assert_eq!(d.acquire_lease("s", "leader", ttl).await.unwrap().token, 4);
    t.router.shutdown().await;
}

#[tokio::test]
async fn config_changes_arrive_as_deltas_and_only_newer_ones_after_a_reconnect() {
    let t = start_router(|_| {}).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    ctl.set_config("s", "model", Bytes::from_static(b"llama"))
        .await
        .unwrap();
    // A joining agent without a resume point replays the control log from its start
    // (epoch 0 asks for the current epoch's ops from op 1) and ends at the current version.
    let mut applied = IdempotentApply::new();
    let mut view = ConfigView::new("s");
    let from_start = Session {
        resume: vec![swarmbus_schema::ResumePoint {
            swarm: "s".into(),
            class: Class::Control,
            epoch: swarmbus_schema::Epoch(0),
            last_applied: OpId(0),
        }],
        ..Session::new("agent", Role::Agent, ["s"])
    };
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), from_start)
        .await
        .unwrap();
    agent.subscribe("s", Class::Control, None).await.unwrap();
    let first = recv_n(&mut rx, 1).await;
    for d in &first {
        applied.apply(d, |d| view.apply(d));
    }
    assert_eq!(view.get("model").unwrap().as_ref(), b"llama");
    let version = view.version();
    agent.close();
    // Changes while it is away...
    ctl.set_config("s", "model", Bytes::from_static(b"mistral"))
        .await
        .unwrap();
    ctl.set_config("s", "temperature", Bytes::from_static(b"0.2"))
        .await
        .unwrap();
    // ...arrive as exactly those deltas when it resumes.
    let session = Session::new("agent", Role::Agent, ["s"]).resume_from(&applied);
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Control, None).await.unwrap();
    let deltas = recv_n(&mut rx, 2).await;
    assert!(deltas.iter().all(|d| d.op_id > version));
    for d in &deltas {
        applied.apply(d, |d| view.apply(d));
    }
    assert_eq!(view.get("model").unwrap().as_ref(), b"mistral");
    assert_eq!(view.get("temperature").unwrap().as_ref(), b"0.2");
    // Agents may not change the configuration.
    let err = agent
        .set_config("s", "model", Bytes::from_static(b"evil"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(25), "Forbidden: {err}");
    t.router.shutdown().await;
}

#[tokio::test]
async fn pause_holds_commands_and_resume_releases_them_in_order() {
    let t = start_router(|_| {}).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    // Only controllers may pause.
    let err = agent.pause("s").await.unwrap_err();
    assert_eq!(err.code(), Some(25), "Forbidden: {err}");
    ctl.pause("s").await.unwrap();
    let mut ops = Vec::new();
    for payload in [&b"one"[..], b"two", b"three"] {
        ops.push(
            ctl.publish(
                "s",
                Class::Command,
                Bytes::copy_from_slice(payload),
                PublishOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    // Acknowledged (durable) but held: nothing reaches the agent while paused.
    let held = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(held.is_err(), "delivered while paused: {held:?}");
    ctl.resume("s").await.unwrap();
    let got = recv_n(&mut rx, 3).await;
    assert_eq!(got.iter().map(|d| d.op_id).collect::<Vec<_>>(), ops);
    assert_eq!(got[0].payload.as_ref(), b"one");
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_stopped_agent_is_disconnected_and_refused_for_a_while() {
    let t = start_router(|_| {}).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, _rx) = t.connect("rogue", Role::Agent, &["s"]).await;
    let err = agent
        .stop_agent("ctl", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(25), "only controllers stop agents: {err}");
    ctl.stop_agent("rogue", Duration::from_secs(30))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), agent.closed())
        .await
        .unwrap();
    assert_eq!(closed.code(), Some(36), "Stopped: {closed}");
    let refused = t
        .connector
        .connect(
            t.router.local_addr(),
            Session::new("rogue", Role::Agent, ["s"]),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(36), "{refused}");
    assert!(refused.retry_after_ms() > 20_000, "{refused:?}");
    t.router.shutdown().await;
}

/// A `$control` log damaged before its tail refuses the start with an error that names the
/// directory and the way out, instead of starting with the swarm's pause forgotten.
#[tokio::test]
async fn a_damaged_control_log_refuses_the_start_instead_of_forgetting_a_pause() {
    let data = tempfile::tempdir().unwrap();
    let config = || crate::common::config_in(data.path());
    let t = TestRouter::start_on(config()).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    ctl.pause("s").await.unwrap();
    ctl.pause("other").await.unwrap();
    drop(ctl);
    t.router.shutdown().await;

    // Flip a byte inside the first record: a valid record follows, so this is not a torn
    // tail but damage to acknowledged state.
    let dir = data
        .path()
        .join("log")
        .join(swarmbus_router::log::store::swarm_dir_name("$control"));
    let segment = dir.join(format!("{:020}.log", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();

    let error = Router::start(config())
        .await
        .expect_err("a damaged $control log must not be skipped");
    assert!(
        matches!(
            error,
            swarmbus_router::RouterError::DamagedInternalLog { .. }
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(text.contains("paused swarms"), "{text}");
    assert!(text.contains("move it"), "{text}");

    // Moved away, as the error says: the router starts without that state.
    std::fs::rename(&dir, data.path().join("control-damaged")).unwrap();
    let router = Router::start(config()).await.unwrap();
    router.shutdown().await;
}

/// An expired holder's stamped commands are refused at its expiry, before anyone else has
/// acquired the lease; a session of another agent cannot use the holder's token either.
#[tokio::test]
async fn an_expired_holders_stamped_commands_are_refused_at_expiry() {
    let t = start_router(|_| {}).await;
    let (a, _ra) = t.connect("leader-a", Role::Controller, &["s"]).await;
    let (other, _ro) = t.connect("other", Role::Controller, &["s"]).await;
    let ttl = Duration::from_millis(300);
    let grant = a.acquire_lease("s", "leader", ttl).await.unwrap();
    let stamped = PublishOptions {
        fencing_token: grant.token,
        ..PublishOptions::default()
    };
    a.publish(
        "s",
        Class::Command,
        Bytes::from_static(b"held"),
        stamped.clone(),
    )
    .await
    .unwrap();
    let borrowed = other
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            stamped.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        borrowed.code(),
        Some(29),
        "another agent's token: {borrowed}"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let late = a
        .publish("s", Class::Command, Bytes::from_static(b"late"), stamped)
        .await
        .unwrap_err();
    assert_eq!(late.code(), Some(29), "StaleFencingToken at expiry: {late}");
    t.router.shutdown().await;
}

/// PresenceQuery is answered within `presence.queries_per_s` per session; past it the
/// query is refused with Busy and a retry hint, and other sessions are not held to it.
#[tokio::test]
async fn presence_queries_are_throttled_per_session() {
    let t = start_router(|c| c.presence.queries_per_s = 2).await;
    let (greedy, _rx) = t.connect("greedy", Role::Agent, &["s"]).await;
    let (other, _rx2) = t.connect("other", Role::Agent, &["s"]).await;
    let mut refused = 0;
    for _ in 0..10 {
        match greedy.presence("s").await {
            Ok(members) => assert_eq!(members.len(), 2),
            Err(swarmbus_client::ClientError::Refused {
                code,
                retry_after_ms,
                ..
            }) => {
                assert_eq!(code, swarmbus_schema::ErrorCode::Busy.as_u16());
                assert!(retry_after_ms > 0);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    // Ten queries within fewer than four seconds pass at most eight.
    assert!(refused >= 2, "{refused} refused");
    assert_eq!(other.presence("s").await.unwrap().len(), 2);
    t.router.shutdown().await;
}

/// Leases are capped: an agent holds at most `limits.max_leases_per_agent` at once and the
/// router knows at most `limits.max_leases`; past either an acquire is refused with Busy,
/// and a release gives the holder's place back.
#[tokio::test]
async fn leases_are_capped_per_agent_and_router_wide() {
    let t = start_router(|c| {
        c.limits.max_leases = 3;
        c.limits.max_leases_per_agent = 2;
    })
    .await;
    let busy =
        |result: Result<swarmbus_schema::LeaseGrant, swarmbus_client::ClientError>| match result {
            Err(swarmbus_client::ClientError::Refused { code, .. }) => {
                assert_eq!(code, swarmbus_schema::ErrorCode::Busy.as_u16())
            }
            other => panic!("expected Busy, got {other:?}"),
        };
    let ttl = Duration::from_secs(60);
    let (a, _rx) = t.connect("a", Role::Agent, &["s"]).await;
    let (b, _rx2) = t.connect("b", Role::Agent, &["s"]).await;
    let one = a.acquire_lease("s", "one", ttl).await.unwrap();
    a.acquire_lease("s", "two", ttl).await.unwrap();
    busy(a.acquire_lease("s", "three", ttl).await);
    b.acquire_lease("s", "three", ttl).await.unwrap();
    busy(b.acquire_lease("s", "four", ttl).await);
    a.release_lease(&one).await.unwrap();
    // "one" stays known (its token never goes back), so b may take it, not a new name.
    busy(b.acquire_lease("s", "four", ttl).await);
    assert_eq!(b.acquire_lease("s", "one", ttl).await.unwrap().token, 2);
    t.router.shutdown().await;
}
