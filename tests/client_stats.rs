//! `ClientStats` against a live router: the publish time every delivery carries, the apply
//! lag measured from it, and the duplicates a resumed session's replay brings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use swarmbus_client::{ClientStats, IdempotentApply, PublishOptions, Session};
use swarmbus_schema::{Class, OpId, ResumePoint, Role};

use crate::common::{recv_n, start_router};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test]
async fn deliveries_carry_the_publish_time_and_stats_count_what_the_agent_saw() {
    let t = start_router(|_| {}).await;
    let (ctl, _c) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, deliveries) = t.connect("agent", Role::Agent, &["s"]).await;
    let stats = ClientStats::new();
    let mut deliveries = deliveries.with_stats(stats.clone());
    let mut apply = IdempotentApply::new().with_stats(stats.clone());
    agent.subscribe("s", Class::Command, None).await.unwrap();
    agent.subscribe("s", Class::Telemetry, None).await.unwrap();
    let before = now_us();
    for _ in 0..3 {
        ctl.publish(
            "s",
            Class::Command,
            Bytes::from_static(b"c"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    ctl.publish(
        "s",
        Class::Telemetry,
        Bytes::from_static(b"t"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_n(&mut deliveries, 4).await;
    let after = now_us();
    for delivery in &got {
        // Stamped by the router between the first publish and the last delivery (one
        // host: one clock, up to the router clock's millisecond start).
        assert!(
            delivery.published_us + 1_000 >= before && delivery.published_us <= after,
            "{} not in {before}..={after}",
            delivery.published_us
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(apply.apply(delivery, |_| ()).is_some());
    }
    let snapshot = stats.snapshot();
    let command = &snapshot.apply_lag_us[Class::Command.index()];
    assert_eq!(command.len(), 3);
    assert!(
        command.max() >= 20_000,
        "applied after 20 ms: {}",
        command.max()
    );
    assert_eq!(snapshot.apply_lag_us[Class::Telemetry.index()].len(), 1);
    assert_eq!(snapshot.redeliveries, 0);
    assert!(snapshot.last_message["s"].published_us > 0);

    // A second session resumes from before op 1: the ops come again, and the idempotent
    // apply drops them.
    let epoch = got[0].epoch;
    let mut session = Session::new("agent-2", Role::Agent, ["s"]);
    session.resume = vec![ResumePoint {
        swarm: "s".into(),
        class: Class::Command,
        epoch,
        last_applied: OpId(0),
    }];
    let (again, replayed) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    let mut replayed = replayed.with_stats(stats.clone());
    again.subscribe("s", Class::Command, None).await.unwrap();
    for delivery in recv_n(&mut replayed, 3).await {
        assert!(
            delivery.published_us > 0,
            "stored in the log with its stamp"
        );
        assert!(apply.apply(&delivery, |_| ()).is_none(), "applied already");
    }
    let snapshot = stats.snapshot();
    // New to that stream (not redeliveries of it), applied already all the same.
    assert_eq!(snapshot.redeliveries, 0);
    assert_eq!(snapshot.duplicates_dropped, 3);
    assert_eq!(snapshot.apply_lag_us[Class::Command.index()].len(), 3);
}
