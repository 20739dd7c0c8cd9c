//! Automatic reconnection: a `ResilientClient` outlives a router restart, resumes where the
//! application stands and subscribes again; errors retrying cannot fix are not retried.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{
    Connector, PublishOptions, ReconnectEvent, ReconnectOptions, RetryPolicy, Session,
};
use swarmbus_router::{Config, Router};
use swarmbus_schema::{Class, OpId, Role};

use crate::common::{recv_n, start_retrying};

async fn start(data: &std::path::Path, listen: std::net::SocketAddr) -> Router {
    start_retrying(|| Config {
        listen,
        data_dir: data.to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        shards: 2,
        ..Config::default()
    })
    .await
}

fn fast_reconnect(events: Arc<Mutex<Vec<ReconnectEvent>>>) -> ReconnectOptions {
    ReconnectOptions {
        policy: RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_attempts: u32::MAX,
            jitter: true,
        },
        seed: Some(7),
        on_event: Some(Arc::new(move |event: &ReconnectEvent| {
            events.lock().unwrap().push(event.clone());
        })),
    }
}

/// Publishes through the resilient client, retrying a connection found closed (right after
/// the restart its old client may still be current for a moment; nothing sent on the dead
/// connection was sequenced, so the retry cannot double it).
async fn publish(ctl: &swarmbus_client::ResilientClient, payload: &'static [u8]) -> OpId {
    tokio::time::timeout(
        Duration::from_secs(30),
        ctl.publish_with_retry(
            "s",
            Class::Command,
            Bytes::from_static(payload),
            PublishOptions::default(),
            &RetryPolicy::default(),
        ),
    )
    .await
    .expect("the publisher reconnects")
    .unwrap()
}

// One scenario, step by step (publish, restart, resume, compare): each step builds on
// what the ones before it observed.
#[tokio::test]
async fn a_resilient_client_survives_a_router_restart_without_loss_or_duplicates() {
    let data = tempfile::tempdir().unwrap();
    let router = start(data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = router.local_addr();
    let connector = Connector::new(router.ca_path().unwrap(), "localhost").unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let (agent, mut rx) = connector
        .connect_resilient(
            addr,
            Session::new("agent", Role::Agent, ["s"]),
            fast_reconnect(events.clone()),
        )
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    agent.subscribe("s", Class::Telemetry, None).await.unwrap();
    let (ctl, _ctl_rx) = connector
        .connect_resilient(
            addr,
            Session::new("ctl", Role::Controller, ["s"]),
            ReconnectOptions::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        publish(&ctl, b"before").await;
    }
    let before = recv_n(&mut rx, 3).await;
    assert_eq!(
        before.iter().map(|d| d.op_id.0).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // Restart the router on the same address and data dir.
    router.shutdown().await;
    let router = start(data.path(), addr).await;
    // The publisher waits for its own reconnection; the agent resubscribes by itself.
    for _ in 0..3 {
        publish(&ctl, b"after").await;
    }
    let after = recv_n(&mut rx, 3).await;
    assert_eq!(
        after.iter().map(|d| d.op_id.0).collect::<Vec<_>>(),
        [4, 5, 6],
        "resumed after the last op handed over: nothing lost, nothing twice"
    );
    // Telemetry subscriptions came back too. Telemetry reaches the subscriptions in place
    // when it is published (it is not logged), so wait until the agent has resubscribed
    // to both classes (the commands above may arrive before the telemetry subscription is
    // back).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !events.lock().unwrap().iter().any(
        |e| matches!(e, ReconnectEvent::Resubscribed { subscriptions, .. } if *subscriptions == 2),
    ) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent resubscribes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctl.client()
        .await
        .unwrap()
        .publish(
            "s",
            Class::Telemetry,
            Bytes::from_static(b"t"),
            PublishOptions {
                ack: true,
                ..PublishOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(recv_n(&mut rx, 1).await[0].class, Class::Telemetry);
    assert_eq!(agent.reconnects(), 1);
    assert!(agent.connection_attempts() >= 2);
    {
        let events = events.lock().unwrap();
        assert!(events
            .iter()
            .any(|e| matches!(e, ReconnectEvent::Disconnected { .. })));
        let resubscribed: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                ReconnectEvent::Resubscribed { subscriptions, .. } => Some(*subscriptions),
                _ => None,
            })
            .collect();
        assert_eq!(
            resubscribed,
            [0, 2],
            "first connection, then the reconnection"
        );
    }
    // Closing ends the deliveries and stops reconnecting.
    agent.close();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(end.is_ok(), "deliveries end after close");
    assert!(agent.client().await.is_err());
    router.shutdown().await;
}

#[tokio::test]
async fn errors_that_retrying_cannot_fix_are_returned_at_once() {
    let data = tempfile::tempdir().unwrap();
    let router = start(data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let connector = Connector::new(router.ca_path().unwrap(), "localhost").unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    // More swarms than a session may join: the router refuses the Hello itself.
    let swarms: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let err = connector
        .connect_resilient(
            router.local_addr(),
            Session::new("greedy", Role::Agent, swarms),
            fast_reconnect(events.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(14), "{err}");
    assert!(!err.is_transient());
    let attempts = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, ReconnectEvent::Attempt { .. }))
        .count();
    assert_eq!(attempts, 1);
    router.shutdown().await;
}

#[tokio::test]
async fn the_first_connection_is_retried_until_the_router_is_up() {
    // Find a free port, then start the router on it only after the client began trying.
    let data = tempfile::tempdir().unwrap();
    let probe = start(data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = probe.local_addr();
    let connector = Connector::new(probe.ca_path().unwrap(), "localhost").unwrap();
    probe.shutdown().await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut session = Session::new("early", Role::Agent, ["s"]);
    session.connect_timeout = Duration::from_millis(300);
    let connecting = tokio::spawn({
        let connector = connector.clone();
        let options = fast_reconnect(events.clone());
        async move { connector.connect_resilient(addr, session, options).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let router = start(data.path(), addr).await;
    let (client, _rx) = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("connects once the router is up")
        .unwrap()
        .unwrap();
    assert!(client.connection_attempts() >= 2, "{client:?}");
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, ReconnectEvent::AttemptFailed { .. })));
    client.close();
    router.shutdown().await;
}
