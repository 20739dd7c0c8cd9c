//! The client's session around its edges: an application that dropped its deliveries, and
//! requests made once the router closed the connection.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::PublishOptions;
use swarmbus_schema::{Class, Role};

#[tokio::test]
async fn a_session_whose_application_dropped_its_deliveries_keeps_working() {
    let t = crate::common::start_router(|_| {}).await;
    let session = swarmbus_client::Session::new("a", Role::Controller, ["s"]);
    let (client, deliveries) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    drop(deliveries);
    client.subscribe("s", Class::Command, None).await.unwrap();
    for _ in 0..20 {
        let publish = client.publish(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        );
        tokio::time::timeout(Duration::from_secs(10), publish)
            .await
            .expect("answered")
            .expect("the session still works: only its deliveries are dropped");
    }
    client.presence("s").await.unwrap();
}

#[tokio::test]
async fn requests_after_the_router_closed_the_connection_fail_at_once() {
    let t = crate::common::start_router(|_| {}).await;
    let connect = |agent: &'static str, role| {
        let session = swarmbus_client::Session::new(agent, role, ["s"]);
        t.connector.connect(t.router.local_addr(), session)
    };
    let (controller, _d) = connect("boss", Role::Controller).await.unwrap();
    for round in 0..5 {
        let agent = ["a0", "a1", "a2", "a3", "a4"][round];
        let (victim, _deliveries) = connect(agent, Role::Agent).await.unwrap();
        controller
            .stop_agent(agent, Duration::from_millis(1))
            .await
            .unwrap();
        victim.closed().await;
        // Every request made once the close is known fails, none waits forever.
        for _ in 0..10 {
            let publish = victim.publish(
                "s",
                Class::Command,
                Bytes::from_static(b"x"),
                PublishOptions::default(),
            );
            let answered = tokio::time::timeout(Duration::from_secs(5), publish).await;
            assert!(matches!(answered, Ok(Err(_))), "{answered:?}");
            let presence = tokio::time::timeout(Duration::from_secs(5), victim.presence("s")).await;
            assert!(matches!(presence, Ok(Err(_))), "{presence:?}");
        }
    }
}

/// A publisher that keeps its command stream full still gets its heartbeats through: the
/// session stream outranks every class stream, so the router never takes it for gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_keeping_its_command_stream_full_is_not_taken_for_gone() {
    let t = crate::common::start_router(|c| {
        c.presence.heartbeat_interval_ms = 100;
        c.presence.heartbeat_timeout_ms = 1_000;
        c.log.sync = swarmbus_router::log::SyncPolicy::NeverDanger;
    })
    .await;
    let (publisher, _rx) = t.connect("busy", Role::Controller, &["s"]).await;
    let payload = Bytes::from(vec![0u8; 16 * 1024]);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut pending = std::collections::VecDeque::new();
    while std::time::Instant::now() < deadline {
        let ack = publisher
            .publish_start(
                "s",
                Class::Command,
                payload.clone(),
                PublishOptions::default(),
            )
            .await
            .expect("the session stays open");
        pending.push_back(ack);
        if pending.len() >= 256 {
            pending
                .pop_front()
                .unwrap()
                .wait()
                .await
                .expect("acknowledged");
        }
    }
    for ack in pending {
        ack.wait().await.expect("acknowledged");
    }
    assert_eq!(t.router.stats().protocol_errors, 0);
}
