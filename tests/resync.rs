//! Delta resync, epochs, DeltaRequest and redelivery against in-process routers.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{FileOffsetStore, IdempotentApply, PublishOptions, Session};
use swarmbus_router::Router;
use swarmbus_schema::{Class, OpId, Role};

use crate::common::{ops, recv_keyed, recv_n, recv_until, start_router, TestRouter};

async fn publish_commands(
    client: &swarmbus_client::Client,
    swarm: &str,
    range: std::ops::RangeInclusive<u32>,
) {
    for i in range {
        client
            .publish(
                swarm,
                Class::Command,
                Bytes::from(format!("cmd-{i}")),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_reconnecting_agent_gets_exactly_the_ops_it_missed() {
    let t = start_router(|_| {}).await;
    let offsets_dir = tempfile::tempdir().unwrap();
    let store = FileOffsetStore::new(offsets_dir.path().join("offsets"));
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;

    // First session: apply ops 1..=5, persist, go away.
    {
        let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
        agent.subscribe("s", Class::Command, None).await.unwrap();
        publish_commands(&ctl, "s", 1..=5).await;
        let mut apply = IdempotentApply::new();
        for d in recv_n(&mut rx, 5).await {
            assert!(apply.apply(&d, |_| ()).is_some());
        }
        apply.save(&store).unwrap();
        agent.ack("s", Class::Command, OpId(5)).await.unwrap();
        agent.close();
    }
    // Missed while away: ops 6..=15.
    publish_commands(&ctl, "s", 6..=15).await;

    let apply = IdempotentApply::load(&store).unwrap();
    assert_eq!(apply.last_applied("s"), OpId(5));
    let session = Session::new("a1", Role::Agent, ["s"]).resume_from(&apply);
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    publish_commands(&ctl, "s", 16..=16).await;
    ctl.publish(
        "s",
        Class::Command,
        Bytes::from_static(b"END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_until(&mut rx, b"END").await;
    // Exactly the missed ops, then live traffic; not the history before the resume point.
    assert_eq!(ops(&got), (6..=16).collect::<Vec<_>>());
    assert!(got.iter().all(|d| d.epoch == apply.epoch("s").unwrap()));
    assert!(agent.epoch_changes().is_empty());
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_lost_log_is_reported_as_a_new_epoch() {
    let data = tempfile::tempdir().unwrap();
    let config = || crate::common::config_in(data.path());
    let t = TestRouter::start_on(config()).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    publish_commands(&ctl, "s", 1..=3).await;
    let mut apply = IdempotentApply::new();
    for d in recv_n(&mut rx, 3).await {
        apply.apply(&d, |_| ());
    }
    let old_epoch = apply.epoch("s").unwrap();
    drop((ctl, agent, rx));
    let TestRouter {
        router, connector, ..
    } = t;
    router.shutdown().await;

    // The swarm's log is lost; the router starts again on the same data dir (same CA).
    std::fs::remove_dir_all(data.path().join("log")).unwrap();
    let router = Router::start(config()).await.unwrap();
    let session = Session::new("a1", Role::Agent, ["s"]).resume_from(&apply);
    let (agent, mut rx) = connector
        .connect(router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let changes = agent.epoch_changes();
    let (new_epoch, previous) = changes.get("s").copied().expect("EpochChanged received");
    assert_eq!(previous, old_epoch);
    assert_ne!(new_epoch, old_epoch);
    let (ctl, _) = connector
        .connect(
            router.local_addr(),
            Session::new("ctl", Role::Controller, ["s"]),
        )
        .await
        .unwrap();
    let op = ctl
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"new"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(op, OpId(1));
    let d = recv_n(&mut rx, 1).await.remove(0);
    assert_eq!(d.epoch, new_epoch);
    // Op 1 of the new epoch is applied although op 3 of the old one was.
    assert!(apply.apply(&d, |_| ()).is_some());
    assert_eq!(apply.epoch_changes(), 1);
    router.shutdown().await;
}

#[tokio::test]
async fn delta_requests_are_answered_from_the_log_in_bounded_pieces() {
    let t = start_router(|c| c.log.delta_max_ops = 8).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    for i in 1..=20u32 {
        let options = PublishOptions {
            target_agent: (i % 5 == 0).then(|| "someone-else".to_string()),
            ..PublishOptions::default()
        };
        ctl.publish("s", Class::Command, Bytes::from(format!("{i}")), options)
            .await
            .unwrap();
    }
    let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
    let mut received = Vec::new();
    let mut from = OpId(3);
    loop {
        let ack = agent.delta("s", from, OpId::NONE).await.unwrap();
        assert!(
            ack.last_op.0 - ack.first_op.0 < 8,
            "more than delta_max_ops in one answer"
        );
        received.extend(recv_n(&mut rx, ack.count as usize).await);
        if !ack.more {
            assert_eq!(ack.last_op, OpId(20));
            break;
        }
        from = OpId(ack.last_op.0 + 1);
    }
    // Ops 3..=20 except those targeted at another agent (5, 10, 15, 20).
    let expected: Vec<u64> = (3..=20).filter(|i| i % 5 != 0).collect();
    assert_eq!(ops(&received), expected);
    assert!(received.iter().all(|d| d.payload == d.op_id.0.to_string()));
    // A range past the end is empty, not an error.
    let ack = agent.delta("s", OpId(100), OpId::NONE).await.unwrap();
    assert_eq!(ack.count, 0);
    t.router.shutdown().await;
}

/// A delta answer cut short by the read's byte bound (large commands) says so (`more`,
/// `last_op` the last op read), so the agent asks for the rest instead of missing it.
#[tokio::test]
async fn a_delta_cut_short_by_its_byte_bound_says_there_is_more() {
    let t = start_router(|_| {}).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    // 24 commands of 250 KiB: 6 MB, past the 4 MiB a read takes at once.
    for i in 1..=24u32 {
        let mut payload = format!("{i}:").into_bytes();
        payload.resize(250 << 10, b'x');
        ctl.publish(
            "s",
            Class::Command,
            Bytes::from(payload),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
    let mut received = Vec::new();
    let mut from = OpId(1);
    let mut answers = 0;
    loop {
        let ack = agent.delta("s", from, OpId::NONE).await.unwrap();
        answers += 1;
        received.extend(recv_n(&mut rx, ack.count as usize).await);
        if !ack.more {
            assert_eq!(ack.last_op, OpId(24));
            break;
        }
        from = OpId(ack.last_op.0 + 1);
        assert!(answers < 30, "no end to the answers");
    }
    assert!(
        answers > 1,
        "6 MB in one answer: the byte bound did not cut it"
    );
    assert_eq!(ops(&received), (1..=24).collect::<Vec<_>>());
    t.router.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_ops_are_redelivered_and_dropped_by_the_helper() {
    let t = start_router(|c| c.log.redelivery_timeout_ms = 200).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    publish_commands(&ctl, "s", 1..=3).await;
    let mut apply = IdempotentApply::new();
    let first = recv_n(&mut rx, 3).await;
    for d in &first {
        assert!(apply.apply(d, |_| ()).is_some());
    }
    // No ack: the same ops come again after the redelivery timeout.
    let again = tokio::time::timeout(Duration::from_secs(10), recv_n(&mut rx, 3))
        .await
        .unwrap();
    assert_eq!(ops(&again), vec![1, 2, 3]);
    assert!(
        again.iter().all(|d| apply.apply(d, |_| ()).is_none()),
        "the helper must drop redeliveries"
    );
    // Once acknowledged, nothing more is redelivered: the next thing to arrive is new.
    agent.ack("s", Class::Command, OpId(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish_commands(&ctl, "s", 4..=4).await;
    let next = recv_n(&mut rx, 1).await;
    let mut seen = ops(&next);
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
        seen.push(d.op_id.0);
    }
    assert!(
        seen.iter().all(|op| *op >= 4),
        "acknowledged ops redelivered: {seen:?}"
    );
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_resync_from_before_the_compaction_horizon_gets_the_latest_op_per_key() {
    let t = start_router(|c| {
        c.log.segment_bytes = 4096;
        c.log.hot_bytes = 4096;
        c.log.compaction_interval_ms = 1;
    })
    .await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    for i in 1..=200u32 {
        let options = PublishOptions {
            key: Some(format!("k{}", i % 5)),
            ..PublishOptions::default()
        };
        ctl.publish("s", Class::Command, Bytes::from(format!("{i}")), options)
            .await
            .unwrap();
    }
    // Wait for the background compaction to move the horizon.
    let (reader, _reader_rx) = t.connect("reader", Role::Controller, &["s"]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ack = reader.delta("s", OpId(1), OpId(1)).await.unwrap();
        if ack.compacted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An agent resuming from before the horizon (it applied nothing of this epoch).
    let (probe, mut probe_rx) = t.connect("probe", Role::Agent, &["s"]).await;
    probe.subscribe("s", Class::Command, None).await.unwrap();
    ctl.publish(
        "s",
        Class::Command,
        Bytes::from_static(b"201"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let epoch = recv_n(&mut probe_rx, 1).await[0].epoch;
    let mut apply = IdempotentApply::restore([("s".to_string(), Class::Command, epoch, OpId(0))]);
    let session = Session::new("a1", Role::Agent, ["s"]).resume_from(&apply);
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    ctl.publish(
        "s",
        Class::Command,
        Bytes::from_static(b"END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_until(&mut rx, b"END").await;
    let got_ops = ops(&got);
    assert!(
        got_ops.windows(2).all(|w| w[0] < w[1]),
        "not in order: {got_ops:?}"
    );
    assert!(
        got_ops.len() < 201,
        "a full history replay: {} ops",
        got_ops.len()
    );
    // The latest op of every key, and everything after the horizon, are there.
    for op in 196..=201 {
        assert!(got_ops.contains(&op), "op {op} missing from {got_ops:?}");
    }
    // Op 1's key was written again later: compaction dropped it, so the resync starts later.
    assert!(got_ops[0] > 1, "op 1 survived compaction: {got_ops:?}");
    // Every key's latest op is there (the unit tests check that only the latest is).
    for key in 0..5 {
        let latest = (1..=200u64).rev().find(|i| i % 5 == key).unwrap();
        assert!(
            got_ops.contains(&latest),
            "latest op {latest} of k{key} missing"
        );
    }
    for d in &got {
        apply.apply(d, |_| ());
    }
    assert_eq!(apply.last_applied("s"), OpId(201));
    t.router.shutdown().await;
}

#[tokio::test]
async fn control_and_command_are_tracked_per_class() {
    let t = start_router(|_| {}).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Control, None).await.unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    // One op sequence, two streams: interleave the classes.
    for i in 0..20u32 {
        let class = if i % 3 == 0 {
            Class::Control
        } else {
            Class::Command
        };
        ctl.publish(
            "s",
            class,
            Bytes::from(format!("{i}")),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    let got = recv_n(&mut rx, 20).await;
    let mut apply = IdempotentApply::new();
    // Whatever order the two streams interleave in, nothing is dropped as a duplicate.
    let applied = got
        .iter()
        .filter(|d| apply.apply(d, |_| ()).is_some())
        .count();
    assert_eq!(applied, 20);
    let control_last = got
        .iter()
        .filter(|d| d.class == Class::Control)
        .map(|d| d.op_id)
        .max();
    assert_eq!(
        Some(apply.last_applied_of("s", Class::Control)),
        control_last
    );
    assert_eq!(apply.resume_points().len(), 2);
    t.router.shutdown().await;
}

#[tokio::test]
async fn delta_requests_are_rate_limited_per_session() {
    let t = start_router(|c| c.log.delta_requests_per_s = 2).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    publish_commands(&ctl, "s", 1..=3).await;
    let (agent, _rx) = t.connect("a1", Role::Agent, &["s"]).await;
    agent.delta("s", OpId(1), OpId(1)).await.unwrap();
    agent.delta("s", OpId(2), OpId(2)).await.unwrap();
    let err = agent.delta("s", OpId(3), OpId(3)).await.unwrap_err();
    assert_eq!(err.code(), Some(15), "{err}"); // Busy
                                               // Another session has its own budget.
    let (other, _rx) = t.connect("a2", Role::Agent, &["s"]).await;
    other.delta("s", OpId(1), OpId(3)).await.unwrap();
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_slow_command_subscriber_catches_up_from_the_log_instead_of_being_dropped() {
    // A tiny command queue and big payloads: the reader below stops reading, QUIC flow
    // control stalls the router's writer, and the queue overflows many times over.
    let t = start_router(|c| c.queues.command = 4).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let mut session = Session::new("slow", Role::Agent, ["s"]);
    session.delivery_buffer = 1;
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let payload = Bytes::from(vec![7u8; 60 * 1024]);
    for _ in 0..150 {
        ctl.publish(
            "s",
            Class::Command,
            payload.clone(),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    // Now read everything: all 150 ops, in order, none twice, on the same connection.
    let got = recv_n(&mut rx, 150).await;
    assert_eq!(ops(&got), (1..=150).collect::<Vec<_>>());
    let stats = t.router.stats();
    assert!(
        stats.lagging_catch_ups > 0,
        "the queue never overflowed: {stats:?}"
    );
    assert_eq!(stats.lagging_disconnects, 0);
    // Live again afterwards.
    publish_commands(&ctl, "s", 151..=151).await;
    assert_eq!(recv_n(&mut rx, 1).await[0].op_id, OpId(151));
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_flood_stays_within_the_memory_caps_and_loses_no_command() {
    // Byte caps far below what the flood below queues: a subscriber that stops reading gets
    // 150 commands of 60 KiB and 2,000 telemetry messages of 16 KiB (41 MB in all).
    let connection_cap = 512 * 1024;
    let router_cap = 1024 * 1024;
    let t = start_router(|c| {
        c.limits.max_frame_bytes = 128 * 1024;
        c.queues.connection_bytes = connection_cap;
        c.queues.router_bytes = router_cap;
        // The slow agent never acknowledges: no redelivery may interleave with the check.
        c.log.redelivery_timeout_ms = 600_000;
    })
    .await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (flooder, _) = t.connect("flooder", Role::Agent, &["s"]).await;
    let mut session = Session::new("slow", Role::Agent, ["s"]);
    session.delivery_buffer = 1;
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    agent.subscribe("s", Class::Telemetry, None).await.unwrap();
    let command = Bytes::from(vec![7u8; 60 * 1024]);
    let telemetry = Bytes::from(vec![9u8; 16 * 1024]);
    for round in 0..150 {
        ctl.publish(
            "s",
            Class::Command,
            command.clone(),
            PublishOptions::default(),
        )
        .await
        .unwrap();
        if round % 15 == 0 {
            // Telemetry from another session, acknowledged so the flood is paced by the
            // router rather than by this test's buffers.
            let batch: Vec<_> = (0..200)
                .map(|_| {
                    flooder.publish(
                        "s",
                        Class::Telemetry,
                        telemetry.clone(),
                        PublishOptions {
                            ack: true,
                            ..PublishOptions::default()
                        },
                    )
                })
                .collect();
            for publish in batch {
                publish.await.unwrap();
            }
        }
    }
    let stats = t.router.stats();
    assert!(
        stats.connection_queued_bytes_max <= connection_cap as u64,
        "{stats:?}"
    );
    assert!(stats.queued_bytes_max <= router_cap as u64, "{stats:?}");
    assert!(stats.telemetry_shed > 0, "nothing was shed: {stats:?}");
    // Every command arrives, in order, once; telemetry in between is whatever was not shed.
    let mut commands = Vec::new();
    while commands.len() < 150 {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .expect("deliveries keep coming")
            .expect("the connection stays up");
        if delivery.class == Class::Command {
            commands.push(delivery);
        }
    }
    assert_eq!(ops(&commands), (1..=150).collect::<Vec<_>>());
    let stats = t.router.stats();
    assert_eq!(stats.lagging_disconnects, 0, "{stats:?}");
    assert!(stats.queued_bytes_max <= router_cap as u64, "{stats:?}");
    t.router.shutdown().await;
}

/// An agent at the router's advertised `max_swarms_per_session`, with a resume point for
/// both ordered classes in every swarm, reconnects with them all and gets only new ops.
#[tokio::test]
async fn an_agent_at_the_swarm_limit_resumes_with_every_resume_point() {
    let t = start_router(|_| {}).await;
    let limit = swarmbus_router::Config::default()
        .limits
        .max_swarms_per_session as usize;
    let names: Vec<String> = (0..limit).map(|i| format!("fleet-{i}")).collect();
    let swarms: Vec<&str> = names.iter().map(String::as_str).collect();
    let (ctl, _) = t.connect("ctl", Role::Controller, &swarms).await;
    let mut apply = IdempotentApply::new();
    {
        let (agent, mut rx) = t.connect("a1", Role::Agent, &swarms).await;
        for swarm in &swarms {
            agent.subscribe(swarm, Class::Control, None).await.unwrap();
            agent.subscribe(swarm, Class::Command, None).await.unwrap();
        }
        for swarm in &swarms {
            for class in [Class::Control, Class::Command] {
                let options = PublishOptions {
                    key: Some("k".into()),
                    ..PublishOptions::default()
                };
                ctl.publish(swarm, class, Bytes::from_static(b"x"), options)
                    .await
                    .unwrap();
            }
        }
        for d in recv_keyed(&mut rx, "k", 2 * limit).await {
            assert!(apply.apply(&d, |_| ()).is_some());
        }
        agent.close();
    }
    let session = Session::new("a1", Role::Agent, swarms.iter().copied()).resume_from(&apply);
    assert_eq!(session.resume.len(), 2 * limit);
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .expect("an agent at the swarm limit connects with all its resume points");
    for swarm in &swarms {
        agent.subscribe(swarm, Class::Control, None).await.unwrap();
        agent.subscribe(swarm, Class::Command, None).await.unwrap();
    }
    for swarm in &swarms {
        let options = PublishOptions {
            key: Some("end".into()),
            ..PublishOptions::default()
        };
        ctl.publish(swarm, Class::Command, Bytes::from_static(b"END"), options)
            .await
            .unwrap();
    }
    // Nothing applied before the disconnect comes again: the first delivery in each swarm
    // after the resume is new to the agent.
    let mut ends = 0;
    while ends < limit {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("deliveries after the resume")
            .expect("the session stays open");
        assert_eq!(
            d.key.as_deref(),
            Some("end"),
            "{} op {} again",
            d.swarm,
            d.op_id.0
        );
        assert!(
            apply.apply(&d, |_| ()).is_some(),
            "{} op {}",
            d.swarm,
            d.op_id.0
        );
        ends += 1;
    }
    assert!(agent.epoch_changes().is_empty());
    t.router.shutdown().await;
}
