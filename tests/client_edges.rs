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
