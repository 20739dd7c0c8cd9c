//! Routing: commands reach exactly the right agents in op-id order, targeted commands reach
//! only their agent, telemetry stays within its swarm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use swarmbus_client::{IdempotentApply, PublishOptions, Session};
use swarmbus_router::config::BulkListen;
use swarmbus_schema::{Class, OpId, Publish, Role};

use crate::common::{recv_keyed, recv_n, recv_until, start_router, TestRouter};

fn targeted(agent: &str) -> PublishOptions {
    PublishOptions {
        target_agent: Some(agent.into()),
        ..PublishOptions::default()
    }
}

// One scenario, step by step (targets, filters, order, acks): each step builds on the
// state the ones before it left.
#[tokio::test]
async fn commands_reach_the_right_agents_in_op_order() {
    // One shard, so that publishes acknowledged in sequence are routed in that sequence
    // across swarms too (the cross-swarm checks below rely on it).
    let t = start_router(|c| c.shards = 1).await;
    let (ctl, mut ctl_rx) = t.connect("ctl", Role::Controller, &["alpha", "beta"]).await;
    let (a1, mut a1_rx) = t.connect("a1", Role::Agent, &["alpha"]).await;
    let (a2, mut a2_rx) = t.connect("a2", Role::Agent, &["alpha"]).await;
    let (b1, mut b1_rx) = t.connect("b1", Role::Agent, &["beta"]).await;
    for (client, swarm) in [(&a1, "alpha"), (&a2, "alpha"), (&b1, "beta")] {
        client.subscribe(swarm, Class::Command, None).await.unwrap();
        client
            .subscribe(swarm, Class::Telemetry, None)
            .await
            .unwrap();
    }
    ctl.subscribe("alpha", Class::Telemetry, None)
        .await
        .unwrap();
    ctl.subscribe("beta", Class::Telemetry, None).await.unwrap();

    // Interleave broadcasts to alpha, targeted commands to a2, and broadcasts to beta.
    let mut alpha_ops = Vec::new();
    let mut beta_ops = Vec::new();
    for i in 0..30u32 {
        let payload = Bytes::from(format!("cmd-{i}"));
        let op = match i % 3 {
            0 => {
                ctl.publish("alpha", Class::Command, payload, PublishOptions::default())
                    .await
            }
            1 => {
                ctl.publish("alpha", Class::Command, payload, targeted("a2"))
                    .await
            }
            _ => {
                ctl.publish("beta", Class::Command, payload, PublishOptions::default())
                    .await
            }
        }
        .unwrap();
        if i % 3 == 2 {
            beta_ops.push(op)
        } else {
            alpha_ops.push(op)
        }
    }
    // The sequencer gives each swarm gap-free ids from 1.
    assert_eq!(alpha_ops, (1..=20).map(OpId).collect::<Vec<_>>());
    assert_eq!(beta_ops, (1..=10).map(OpId).collect::<Vec<_>>());
    for swarm in ["alpha", "beta"] {
        ctl.publish(
            swarm,
            Class::Command,
            Bytes::from_static(b"END"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }

    let a1_got = recv_until(&mut a1_rx, b"END").await;
    let a2_got = recv_until(&mut a2_rx, b"END").await;
    let b1_got = recv_until(&mut b1_rx, b"END").await;
    let ops = |v: &[swarmbus_schema::Deliver]| v.iter().map(|d| d.op_id.0).collect::<Vec<_>>();
    // a1 sees alpha's broadcasts only: odd op ids (every even one was targeted to a2).
    assert_eq!(ops(&a1_got), (1..=20).step_by(2).collect::<Vec<_>>());
    assert!(a1_got
        .iter()
        .all(|d| d.swarm == "alpha" && d.target_agent.is_none()));
    // a2 sees all of alpha's, in order, the targeted ones marked as such.
    assert_eq!(ops(&a2_got), (1..=20).collect::<Vec<_>>());
    assert_eq!(
        a2_got
            .iter()
            .filter(|d| d.target_agent.as_deref() == Some("a2"))
            .count(),
        10
    );
    assert!(a2_got
        .iter()
        .all(|d| d.source_agent == "ctl" && d.class == Class::Command));
    // b1 sees beta's only.
    assert_eq!(ops(&b1_got), (1..=10).collect::<Vec<_>>());
    assert!(b1_got.iter().all(|d| d.swarm == "beta"));

    // Telemetry from a1 stays in alpha: ctl (subscribed to both swarms) and a2 get it,
    // b1 does not. The marker on beta is published after a1's telemetry was acknowledged,
    // and one shard routes in order, so b1 would have got a1's message before the marker.
    let ack = PublishOptions {
        ack: true,
        ..PublishOptions::default()
    };
    let op = a1
        .publish(
            "alpha",
            Class::Telemetry,
            Bytes::from_static(b"temp=41"),
            ack,
        )
        .await
        .unwrap();
    assert_eq!(op, OpId::NONE, "telemetry is not sequenced");
    a1.publish(
        "alpha",
        Class::Telemetry,
        Bytes::from_static(b"T-END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    ctl.publish(
        "beta",
        Class::Telemetry,
        Bytes::from_static(b"T-END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let b1_tel = recv_until(&mut b1_rx, b"T-END").await;
    assert!(
        b1_tel.is_empty(),
        "telemetry leaked across swarms: {b1_tel:?}"
    );
    let a2_tel = recv_until(&mut a2_rx, b"T-END").await;
    assert_eq!(a2_tel.len(), 1);
    assert_eq!(a2_tel[0].payload.as_ref(), b"temp=41");
    assert_eq!(a2_tel[0].op_id, OpId::NONE);
    let ctl_tel = recv_n(&mut ctl_rx, 3).await;
    let from_alpha: Vec<_> = ctl_tel.iter().filter(|d| d.swarm == "alpha").collect();
    assert_eq!(from_alpha.len(), 2);
    assert_eq!(from_alpha[0].payload.as_ref(), b"temp=41");

    t.router.shutdown().await;
}

#[tokio::test]
async fn agent_filter_and_unsubscribe() {
    let t = start_router(|_| {}).await;
    let (ctl, mut ctl_rx) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (a1, _a1_rx) = t.connect("a1", Role::Agent, &["s"]).await;
    let (a2, _a2_rx) = t.connect("a2", Role::Agent, &["s"]).await;
    ctl.subscribe("s", Class::Alert, Some("a2")).await.unwrap();
    a1.publish(
        "s",
        Class::Alert,
        Bytes::from_static(b"from-a1"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    a2.publish(
        "s",
        Class::Alert,
        Bytes::from_static(b"from-a2"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    a2.publish(
        "s",
        Class::Alert,
        Bytes::from_static(b"END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_until(&mut ctl_rx, b"END").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_ref(), b"from-a2");
    assert_eq!(got[0].source_agent, "a2");

    ctl.unsubscribe("s", Class::Alert, Some("a2"))
        .await
        .unwrap();
    ctl.subscribe("s", Class::Alert, Some("a1")).await.unwrap();
    a2.publish(
        "s",
        Class::Alert,
        Bytes::from_static(b"dropped"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    a1.publish(
        "s",
        Class::Alert,
        Bytes::from_static(b"END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    assert!(recv_until(&mut ctl_rx, b"END").await.is_empty());
    t.router.shutdown().await;
}

#[tokio::test]
async fn requests_outside_joined_swarms_are_refused_and_the_session_goes_on() {
    let t = start_router(|c| c.limits.max_subscriptions = 2).await;
    let (client, mut rx) = t.connect("a", Role::Agent, &["mine"]).await;
    let err = client
        .publish(
            "other",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(8), "{err}"); // SwarmNotJoined
    let err = client
        .subscribe("other", Class::Command, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(8), "{err}");
    client
        .subscribe("mine", Class::Command, None)
        .await
        .unwrap();
    client
        .subscribe("mine", Class::Telemetry, None)
        .await
        .unwrap();
    client
        .subscribe("mine", Class::Telemetry, None)
        .await
        .unwrap(); // same one again: fine
    let err = client
        .subscribe("mine", Class::Alert, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(9), "{err}"); // TooManySubscriptions
    let op = client
        .publish(
            "mine",
            Class::Command,
            Bytes::from_static(b"still here"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(op, OpId(1));
    let got = recv_n(&mut rx, 1).await;
    assert_eq!(got[0].payload.as_ref(), b"still here");
    t.router.shutdown().await;
}

#[tokio::test]
async fn idempotent_apply_drops_redelivered_ops() {
    let t = start_router(|_| {}).await;
    let (ctl, _) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("a", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    for i in 0..5 {
        ctl.publish(
            "s",
            Class::Command,
            Bytes::from(vec![i]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    let got = recv_n(&mut rx, 5).await;
    let mut apply = IdempotentApply::new();
    let mut applied = Vec::new();
    // Feed every delivery twice and out of order, as redelivery after a reconnect would.
    for d in got.iter().chain(got.iter().rev()).chain(got.iter()) {
        apply.apply(d, |d| applied.push(d.op_id.0));
    }
    assert_eq!(applied, vec![1, 2, 3, 4, 5]);
    assert_eq!(apply.last_applied("s"), OpId(5));
    agent.ack("s", Class::Command, OpId(5)).await.unwrap();
    t.router.shutdown().await;
}

#[tokio::test]
async fn dropping_the_client_closes_its_connection() {
    let t = start_router(|_| {}).await;
    let (client, deliveries) = t.connect("a", Role::Agent, &["s"]).await;
    client.subscribe("s", Class::Telemetry, None).await.unwrap();
    // Its connection and the bulk connection it attached.
    assert!(client.has_bulk_connection());
    assert_eq!(t.router.stats().connections_open, 2);
    let clone = client.clone();
    drop(client);
    // A clone keeps the session alive.
    clone.subscribe("s", Class::Command, None).await.unwrap();
    drop(clone);
    drop(deliveries);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.router.stats().connections_open != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the router still holds the session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    t.router.shutdown().await;
}

#[tokio::test]
async fn publishes_above_the_rate_limit_are_refused_or_dropped() {
    let t = start_router(|c| {
        c.rate_limits.command = swarmbus_proto::limits::Rate::new(0.1, 5.0);
        c.rate_limits.telemetry = swarmbus_proto::limits::Rate::new(0.1, 1.0);
    })
    .await;
    let (client, _rx) = t.connect("noisy", Role::Agent, &["s"]).await;
    for _ in 0..5 {
        client
            .publish(
                "s",
                Class::Command,
                Bytes::from_static(b"ok"),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
    let err = client
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"one too many"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    let swarmbus_client::ClientError::Refused {
        code,
        retry_after_ms,
        ..
    } = err
    else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(code, 20); // RateLimited
    assert!(
        retry_after_ms > 0 && retry_after_ms <= 10_000,
        "{retry_after_ms}"
    );
    // Fire-and-forget telemetry above the limit is dropped and counted, not refused.
    for _ in 0..10 {
        client
            .publish(
                "s",
                Class::Telemetry,
                Bytes::from_static(b"t"),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.router.stats().rate_limited_dropped < 9 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            t.router.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(t.router.stats().rate_limited_dropped, 9);
    // Another session has buckets of its own.
    let (other, _rx) = t.connect("quiet", Role::Agent, &["s"]).await;
    other
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"fine"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_retry_storm_opens_the_breaker_and_every_transition_is_alerted() {
    let t = start_router(|c| {
        c.rate_limits.command = swarmbus_proto::limits::Rate::new(1.0, 1.0);
        c.rate_limits.breaker = swarmbus_proto::limits::BreakerConfig {
            failures: 3,
            window_ms: 10_000,
            open_ms: 2_000,
            probes: 1,
        };
    })
    .await;
    let (ctl, mut alerts) = t.connect("ctl", Role::Controller, &["s"]).await;
    ctl.subscribe("s", Class::Alert, None).await.unwrap();
    let (noisy, _rx) = t.connect("noisy", Role::Agent, &["s"]).await;
    let send = || {
        noisy.publish(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
    };
    send().await.unwrap();
    // Three refusals in a row (the bucket holds one command) open the breaker.
    for _ in 0..3 {
        assert_eq!(send().await.unwrap_err().code(), Some(20));
    }
    let err = send().await.unwrap_err();
    let swarmbus_client::ClientError::Refused {
        code,
        retry_after_ms,
        ..
    } = err
    else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(code, 21, "CircuitOpen");
    assert!(
        retry_after_ms > 0 && retry_after_ms <= 2_000,
        "{retry_after_ms}"
    );
    // After the open time, a well-behaved publish is the probe that closes it.
    tokio::time::sleep(std::time::Duration::from_millis(
        u64::from(retry_after_ms) + 150,
    ))
    .await;
    send().await.unwrap();
    let states: Vec<String> = recv_keyed(&mut alerts, "circuit-breaker", 3)
        .await
        .iter()
        .map(|d| {
            assert_eq!(d.source_agent, "swarmbus-router");
            String::from_utf8_lossy(&d.payload).into_owned()
        })
        .collect();
    assert!(
        states[0].contains("\"state\":\"open\"") && states[0].contains("noisy"),
        "{states:?}"
    );
    assert!(states[1].contains("\"state\":\"half-open\""), "{states:?}");
    assert!(states[2].contains("\"state\":\"closed\""), "{states:?}");
    let stats = t.router.stats();
    assert_eq!(stats.breaker_transitions, 3);
    // The three refusals were the rate limit's; the one while open, the breaker's.
    assert_eq!((stats.rate_limited_refused, stats.breaker_refused), (3, 1));
    t.router.shutdown().await;
}

#[tokio::test]
async fn retries_honour_the_routers_advice_and_the_unacknowledged_queue_is_capped() {
    let t =
        start_router(|c| c.rate_limits.command = swarmbus_proto::limits::Rate::new(2.0, 1.0)).await;
    let (client, _rx) = t.connect("paced", Role::Agent, &["s"]).await;
    // Five commands against a bucket of one (refilled 20/s): each refusal is retried after
    // the router's retry_after_ms, and all five get through, in order.
    let policy = swarmbus_client::RetryPolicy::default();
    // The first command takes the bucket's one token without waiting for its
    // acknowledgement, so the next one is certainly refused at first.
    let first = client
        .publish_start(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let mut ops = Vec::new();
    for _ in 0..4 {
        let op = client
            .publish_with_retry(
                "s",
                Class::Command,
                Bytes::from_static(b"x"),
                PublishOptions::default(),
                &policy,
            )
            .await
            .unwrap();
        ops.push(op.0);
    }
    ops.insert(0, first.wait().await.unwrap().0);
    assert_eq!(ops, vec![1, 2, 3, 4, 5]);
    assert!(
        t.router.stats().rate_limited_refused > 0,
        "nothing was refused"
    );

    // A capped queue of unacknowledged publishes: the second one in flight fails at once.
    let mut session = swarmbus_client::Session::new("capped", Role::Agent, ["s"]);
    session.max_in_flight = 1;
    session.fail_when_in_flight_full = true;
    let (capped, _rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await; // a full bucket
    let first = capped
        .publish_start(
            "s",
            Class::Command,
            Bytes::from_static(b"1"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let err = capped
        .publish_start(
            "s",
            Class::Command,
            Bytes::from_static(b"2"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, swarmbus_client::ClientError::InFlightFull { max: 1 }),
        "{err}"
    );
    first.wait().await.unwrap();
    t.router.shutdown().await;
}

async fn command(
    client: &swarmbus_client::Client,
    swarm: &str,
) -> Result<OpId, swarmbus_client::ClientError> {
    client
        .publish(
            swarm,
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
        .await
}

#[tokio::test]
async fn rate_overrides_per_swarm_and_role_pick_the_bucket() {
    use swarmbus_proto::limits::Rate;
    let t = start_router(|c| {
        c.rate_limits = swarmbus_router::config::RateLimitsConfig::default();
        let mut tight = swarmbus_router::config::SwarmRates {
            command: Some(Rate::new(0.0, 2.0)),
            ..Default::default()
        };
        tight.roles.insert(
            "controller".into(),
            swarmbus_router::config::RoleRates {
                command: Some(Rate::new(0.0, 4.0)),
                ..Default::default()
            },
        );
        c.rate_limits.swarms.insert("tight".into(), tight);
    })
    .await;
    let (agent, _rx) = t.connect("a", Role::Agent, &["tight", "open"]).await;
    for _ in 0..2 {
        command(&agent, "tight").await.unwrap();
    }
    assert_eq!(command(&agent, "tight").await.unwrap_err().code(), Some(20));
    // The agent's other swarm keeps the default rates.
    for _ in 0..10 {
        command(&agent, "open").await.unwrap();
    }
    // A controller in the tight swarm has its role's override there.
    let (ctl, _rx) = t.connect("c", Role::Controller, &["tight"]).await;
    for _ in 0..4 {
        command(&ctl, "tight").await.unwrap();
    }
    assert_eq!(command(&ctl, "tight").await.unwrap_err().code(), Some(20));
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_swarm_wide_storm_opens_the_swarm_breaker_which_spares_control_and_other_swarms() {
    let t = start_router(|c| {
        c.rate_limits.command = swarmbus_proto::limits::Rate::new(0.0, 1.0);
        // Session breakers stay closed: only the swarm's adds the sessions up.
        c.rate_limits.breaker.failures = 1_000;
        c.rate_limits.swarm_breaker = swarmbus_proto::limits::BreakerConfig {
            failures: 4,
            window_ms: 10_000,
            open_ms: 2_000,
            probes: 1,
        };
    })
    .await;
    let (ctl, mut alerts) = t.connect("ctl", Role::Controller, &["s", "other"]).await;
    ctl.subscribe("s", Class::Alert, None).await.unwrap();
    // Two agents spend their one command and are refused twice each: four refusals in the
    // swarm open its breaker.
    let (a1, _rx1) = t.connect("a1", Role::Agent, &["s"]).await;
    let (a2, _rx2) = t.connect("a2", Role::Agent, &["s"]).await;
    // Connected before the breaker opens, so its handshake does not eat the open time.
    let (quiet, _rx3) = t.connect("quiet", Role::Agent, &["s"]).await;
    for agent in [&a1, &a2] {
        command(agent, "s").await.unwrap();
        for _ in 0..2 {
            assert_eq!(command(agent, "s").await.unwrap_err().code(), Some(20));
        }
    }
    // A third agent that did nothing wrong is refused fast while the swarm's breaker is
    // open...
    let err = command(&quiet, "s").await.unwrap_err();
    let swarmbus_client::ClientError::Refused {
        code,
        retry_after_ms,
        message,
        ..
    } = err
    else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(code, 21, "CircuitOpen");
    assert!(message.contains("swarm"), "{message}");
    // ...but not in another swarm, and control still reaches the swarm.
    command(&ctl, "other").await.unwrap();
    ctl.publish(
        "s",
        Class::Control,
        Bytes::from_static(b"pause"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    // After the open time the next publish is the probe that closes it.
    tokio::time::sleep(std::time::Duration::from_millis(
        u64::from(retry_after_ms) + 150,
    ))
    .await;
    command(&quiet, "s").await.unwrap();
    let states: Vec<String> = recv_keyed(&mut alerts, "circuit-breaker", 3)
        .await
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    for (alert, state) in states.iter().zip(["open", "half-open", "closed"]) {
        assert!(
            alert.contains("\"scope\":\"swarm\"")
                && alert.contains(&format!("\"state\":\"{state}\"")),
            "{states:?}"
        );
    }
    t.router.shutdown().await;
}

#[tokio::test]
async fn the_router_wide_telemetry_budget_holds_senders_back_without_losing_anything() {
    // 640 messages/s, a burst of one 64-message batch: 1,000 messages cannot be read in
    // under (1000 - 64 - 64) / 640 s, whatever the machine's speed; and none is dropped.
    let t = start_router(|c| c.rate_limits.router_telemetry_per_s = 640.0).await;
    let (publisher, _p) = t.connect("sensor", Role::Agent, &["s"]).await;
    let (reader, mut rx) = t.connect("reader", Role::Agent, &["s"]).await;
    reader.subscribe("s", Class::Telemetry, None).await.unwrap();
    thousand_telemetry_at_640_per_s(&publisher, &mut rx).await;
    let stats = t.router.stats();
    assert_eq!(stats.telemetry_shed, 0, "{stats:?}");
    assert_eq!(stats.rate_limited_dropped, 0, "{stats:?}");
    t.router.shutdown().await;
}

#[tokio::test]
async fn the_governor_holds_bulk_intake_while_commands_flow_and_lifts_it_after() {
    use swarmbus_proto::governor::GovernorConfig;
    // A reserve of 1 governs whenever commands flow, whatever the host's load, so the test
    // does not depend on the machine: the budget sits at min_per_s.
    let t = start_router(|c| {
        c.governor = GovernorConfig {
            cpu_idle_reserve: 1.0,
            min_per_s: 640.0,
            interval_ms: 50,
            ordered_quiet_ms: 500,
            ..GovernorConfig::default()
        }
    })
    .await;
    let (controller, _c) = t.connect("controller", Role::Controller, &["s"]).await;
    let (publisher, _p) = t.connect("sensor", Role::Agent, &["s"]).await;
    let (reader, mut rx) = t.connect("reader", Role::Agent, &["s"]).await;
    reader.subscribe("s", Class::Telemetry, None).await.unwrap();
    let commanding = Arc::new(AtomicBool::new(true));
    let commands = tokio::spawn({
        let commanding = commanding.clone();
        async move {
            while commanding.load(Ordering::Relaxed) {
                controller
                    .publish(
                        "s",
                        Class::Command,
                        Bytes::from_static(b"go"),
                        PublishOptions {
                            ack: true,
                            ..PublishOptions::default()
                        },
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    });
    let governed = wait_for_stats(&t, |s| s.governed_intake_per_s == 640).await;
    assert!(governed.governor_cuts > 0, "{governed:?}");
    thousand_telemetry_at_640_per_s(&publisher, &mut rx).await;
    // Commands stop: ordered_quiet_ms later the budget is lifted.
    commanding.store(false, Ordering::Relaxed);
    commands.await.unwrap();
    let lifted = wait_for_stats(&t, |s| s.governed_intake_per_s == 0).await;
    assert_eq!(lifted.telemetry_shed, 0, "{lifted:?}");
    assert_eq!(lifted.rate_limited_dropped, 0, "{lifted:?}");
    t.router.shutdown().await;
}

/// Publishes 1,000 numbered telemetry messages to swarm `s` through a router-wide budget of
/// 640/s (a burst of one batch of 64, and a reader may hold one batch more), so they cannot
/// be read in under (1000 - 64 - 64) / 640 s whatever the machine's speed; and all arrive,
/// in order.
async fn thousand_telemetry_at_640_per_s(
    publisher: &swarmbus_client::Client,
    rx: &mut swarmbus_client::Deliveries,
) {
    let started = std::time::Instant::now();
    publisher
        .publish_batch(Class::Telemetry, numbered_telemetry("s", 1_000))
        .await
        .unwrap();
    let got = recv_n(rx, 1_000).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(1_300),
        "1,000 messages were read in {elapsed:?}, above the budget"
    );
    let order: Vec<u32> = got.iter().map(number_of).collect();
    assert_eq!(order, (0..1_000).collect::<Vec<_>>());
}

/// Polls the router's counters until `done` holds, failing the test after 10 s.
async fn wait_for_stats(
    t: &TestRouter,
    done: impl Fn(&swarmbus_router::StatsSnapshot) -> bool,
) -> swarmbus_router::StatsSnapshot {
    for _ in 0..500 {
        let stats = t.router.stats();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "the router's counters never got there: {:?}",
        t.router.stats()
    );
}

#[tokio::test]
async fn each_class_has_its_own_payload_limit() {
    let t = start_router(|c| {
        c.limits.max_payload_bytes.command = 1_024;
        c.limits.max_payload_bytes.telemetry = 100;
    })
    .await;
    let (client, _rx) = t.connect("heavy", Role::Agent, &["s"]).await;
    let acked = PublishOptions {
        ack: true,
        ..PublishOptions::default()
    };
    client
        .publish(
            "s",
            Class::Command,
            Bytes::from(vec![1u8; 1_024]),
            acked.clone(),
        )
        .await
        .unwrap();
    let err = client
        .publish(
            "s",
            Class::Command,
            Bytes::from(vec![1u8; 1_025]),
            acked.clone(),
        )
        .await
        .unwrap_err();
    let swarmbus_client::ClientError::Refused { code, message, .. } = err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(code, 18, "PayloadTooLarge");
    assert!(message.contains("job queue"), "{message}");
    // Another class has its own limit.
    let err = client
        .publish(
            "s",
            Class::Telemetry,
            Bytes::from(vec![1u8; 101]),
            acked.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(18), "{err}");
    client
        .publish("s", Class::Control, Bytes::from(vec![1u8; 4_096]), acked)
        .await
        .unwrap();
    t.router.shutdown().await;
}

#[tokio::test]
async fn telemetry_streams_are_read_on_the_bulk_runtime_and_commands_on_the_main_one() {
    for priority in ["nice:10", "nice:0", "shared"] {
        let t = start_router(|c| c.runtime.bulk_priority = priority.parse().unwrap()).await;
        let (publisher, _p) = t.connect("sensor", Role::Agent, &["s"]).await;
        let (reader, mut rx) = t.connect("reader", Role::Agent, &["s"]).await;
        reader.subscribe("s", Class::Telemetry, None).await.unwrap();
        reader.subscribe("s", Class::Command, None).await.unwrap();
        // Enough small messages that the writers coalesce them, in order, on both paths.
        let telemetry = numbered_telemetry("s", 2_000);
        publisher
            .publish_batch(Class::Telemetry, telemetry)
            .await
            .unwrap();
        let op = publisher
            .publish(
                "s",
                Class::Command,
                Bytes::from_static(b"cmd"),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        assert_ne!(op, OpId::NONE, "{priority}");
        let got = recv_n(&mut rx, 2_001).await;
        let telemetry: Vec<u32> = got
            .iter()
            .filter(|d| d.class == Class::Telemetry)
            .map(number_of)
            .collect();
        assert_eq!(telemetry, (0..2_000).collect::<Vec<_>>(), "{priority}");
        assert!(got
            .iter()
            .any(|d| d.class == Class::Command && d.op_id == op));
        let stats = t.router.stats();
        // One telemetry stream on the bulk runtime, one command stream on the main one.
        assert_eq!(
            (stats.bulk_streams, stats.main_streams),
            (1, 1),
            "{priority}"
        );
        assert_eq!(stats.telemetry_shed, 0, "{priority}: {stats:?}");
        t.router.shutdown().await;
    }
}

#[tokio::test]
async fn sessions_on_the_bulk_listener_route_like_any_other() {
    let t = start_router(|c| c.bulk_listen = BulkListen::At("127.0.0.1:0".parse().unwrap())).await;
    let bulk = t.router.bulk_addr().expect("bulk listener");
    assert_ne!(bulk, t.router.local_addr());
    // A sensor on the bulk listener, a controller on the main one, in one swarm.
    let (sensor, mut sensor_rx) = t
        .connector
        .connect(bulk, Session::new("sensor", Role::Agent, ["s"]))
        .await
        .unwrap();
    let (controller, mut controller_rx) = t.connect("ctl", Role::Controller, &["s"]).await;
    sensor.subscribe("s", Class::Command, None).await.unwrap();
    controller
        .subscribe("s", Class::Telemetry, None)
        .await
        .unwrap();
    controller
        .subscribe("s", Class::Command, None)
        .await
        .unwrap();
    let op = controller
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"go"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let got = recv_n(&mut sensor_rx, 1).await;
    assert_eq!((got[0].op_id, &got[0].payload[..]), (op, &b"go"[..]));
    sensor
        .publish(
            "s",
            Class::Telemetry,
            Bytes::from_static(b"t"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    // Its own commands are sequenced with the controller's.
    let own = sensor
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"ack"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(own.0, op.0 + 1);
    let got = recv_n(&mut controller_rx, 3).await;
    assert!(got
        .iter()
        .any(|d| d.class == Class::Telemetry && &d.payload[..] == b"t"));
    assert!(got
        .iter()
        .any(|d| d.class == Class::Command && d.op_id == own));
    // The sensor's one connection; the controller's and the bulk connection it attached.
    assert!(controller.has_bulk_connection() && !sensor.has_bulk_connection());
    assert_eq!(t.router.stats().connections_accepted, 3);
    t.router.shutdown().await;
}

/// Telemetry publishes to `swarm` whose payloads are their numbers 0..n (big-endian u32).
fn numbered_telemetry(swarm: &str, n: u32) -> Vec<Publish> {
    (0..n)
        .map(|i| Publish {
            request_id: 0,
            swarm: swarm.into(),
            class: Class::Telemetry,
            target_agent: None,
            key: None,
            payload: Bytes::from(i.to_be_bytes().to_vec()),
            fencing_token: 0,
            lease: None,
        })
        .collect()
}

/// The number a [`numbered_telemetry`] message carries.
fn number_of(d: &swarmbus_schema::Deliver) -> u32 {
    u32::from_be_bytes(d.payload[..4].try_into().unwrap())
}

/// A router named by `host:port` is resolved and reached; a name that does not resolve is a
/// `Connect` error saying so.
#[tokio::test]
async fn a_router_is_reached_by_host_name() {
    let t = start_router(|_| {}).await;
    let port = t.router.local_addr().port();
    let session = Session::new("named", Role::Agent, ["s"]);
    let (client, mut rx) = t
        .connector
        .connect_to(&format!("localhost:{port}"), session.clone())
        .await
        .unwrap();
    client.subscribe("s", Class::Command, None).await.unwrap();
    client
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"hi"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(recv_n(&mut rx, 1).await[0].payload.as_ref(), b"hi");
    match t
        .connector
        .connect_to("no-such-host.invalid:4433", session)
        .await
    {
        Err(swarmbus_client::ClientError::Connect { detail, .. }) => {
            assert!(detail.contains("resolving"), "{detail}")
        }
        Err(other) => panic!("expected a Connect error, got {other}"),
        Ok(_) => panic!("connected to a name that does not resolve"),
    }
    t.router.shutdown().await;
}

/// `Deliveries` is a `futures` stream: polled as one, it yields what `recv` would.
#[tokio::test]
async fn deliveries_are_a_stream() {
    use futures_core::Stream;
    let t = start_router(|_| {}).await;
    let (client, mut rx) = t.connect("streamed", Role::Agent, &["s"]).await;
    client.subscribe("s", Class::Command, None).await.unwrap();
    for text in ["one", "two"] {
        client
            .publish(
                "s",
                Class::Command,
                Bytes::from(text),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut rx).poll_next(cx));
        let deliver = tokio::time::timeout(std::time::Duration::from_secs(10), next)
            .await
            .expect("a delivery")
            .expect("the stream goes on");
        got.push(deliver.payload);
    }
    assert_eq!(got, [Bytes::from("one"), Bytes::from("two")]);
    t.router.shutdown().await;
}
