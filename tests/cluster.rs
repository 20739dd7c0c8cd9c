//! Routers sharing swarms on one NATS JetStream (`log.backend = "jetstream"`): ordered ops
//! published through one router reach the subscribers on the others, in the log's order.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use swarmbus_client::{Client, Deliveries, IdempotentApply, PublishOptions};
use swarmbus_jetstream::testing::NatsServer;
use swarmbus_schema::{Class, Deliver, Role};

use crate::common::{ops, recv_until, TestRouter};
use crate::jetstream::config;

/// What a test's cluster keeps alive besides its routers: a nats-server and the data
/// directories.
struct Kept {
    _dirs: Vec<tempfile::TempDir>,
    _server: NatsServer,
    _nats_dir: tempfile::TempDir,
}

/// Starts a nats-server and `n` routers on it, each on a data directory of its own, with
/// an admin listener.
async fn cluster(n: usize) -> (Vec<TestRouter>, Kept) {
    let nats_dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(nats_dir.path(), true);
    let mut routers = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &server);
        config.admin_listen =
            swarmbus_router::config::AdminListen::At("127.0.0.1:0".parse().unwrap());
        routers.push(TestRouter::start_on(config).await);
        dirs.push(dir);
    }
    let kept = Kept {
        _dirs: dirs,
        _server: server,
        _nats_dir: nats_dir,
    };
    (routers, kept)
}

/// Waits (at most 10 s) until `router`'s admin view shows swarm `swarm` paused or not.
async fn until_paused(router: &TestRouter, swarm: &str, paused: bool) {
    let admin = router.router.admin_addr().expect("the admin listener");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, body) = crate::admin::get(admin, "/v1/swarms").await;
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        let shown = view["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == swarm && s["paused"] == paused);
        if shown {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{swarm} not shown paused={paused}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Applies `got` through an idempotent applier, returning the payloads applied, in order.
fn apply_all(got: &[Deliver]) -> Vec<String> {
    let mut apply = IdempotentApply::new();
    let mut applied = Vec::new();
    for d in got {
        apply.apply(d, |d| {
            applied.push(String::from_utf8_lossy(&d.payload).into_owned())
        });
    }
    applied
}

async fn subscribed(router: &TestRouter, agent: &str) -> (Client, Deliveries) {
    let (client, rx) = router.connect(agent, Role::Agent, &["fleet"]).await;
    client
        .subscribe("fleet", Class::Command, None)
        .await
        .unwrap();
    (client, rx)
}

/// A controller on router A commands agents on routers B and C, who subscribed before the
/// swarm had a log anywhere: each agent gets every command once, in op-id order, gap-free,
/// with the epoch every router serves the swarm with.
#[tokio::test]
async fn commands_from_one_router_reach_agents_on_two_others_in_op_order() {
    let (r, _cluster) = cluster(3).await;
    let (_b, mut on_b) = subscribed(&r[1], "agent-b").await;
    let (_c, mut on_c) = subscribed(&r[2], "agent-c").await;
    let (ctl, _) = r[0].connect("ctl", Role::Controller, &["fleet"]).await;
    let mut sent = Vec::new();
    for i in 1..=200 {
        let payload = Bytes::from(format!("cmd-{i}"));
        sent.push(
            ctl.publish_start("fleet", Class::Command, payload, PublishOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut acked = Vec::new();
    for pending in sent {
        acked.push(pending.wait().await.unwrap().0);
    }
    assert_eq!(
        acked,
        (1..=200).collect::<Vec<_>>(),
        "acknowledged in op order"
    );
    ctl.publish(
        "fleet",
        Class::Command,
        Bytes::from_static(b"END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let expected: Vec<String> = (1..=200).map(|i| format!("cmd-{i}")).collect();
    let mut epochs = HashSet::new();
    for (name, rx) in [("B", &mut on_b), ("C", &mut on_c)] {
        let got = recv_until(rx, b"END").await;
        assert_eq!(ops(&got), (1..=200).collect::<Vec<_>>(), "on {name}");
        assert_eq!(apply_all(&got), expected, "on {name}: each applied once");
        epochs.extend(got.iter().map(|d| d.epoch));
    }
    assert_eq!(epochs.len(), 1, "one epoch on every router: {epochs:?}");
    for router in r {
        router.router.shutdown().await;
    }
}

/// Controllers on two routers command one swarm at once, each with a window of commands in
/// flight: op ids taken by the other router are refused with Conflict (38) and sent again,
/// so every command is acknowledged once, with the op id it is delivered with, and agents
/// on all three routers (the two publishing ones included) get them all in op order,
/// gap-free, none twice.
#[tokio::test]
async fn two_routers_publishing_to_one_swarm_give_one_gap_free_order() {
    let (r, _cluster) = cluster(3).await;
    let mut agents = Vec::new();
    for (i, router) in r.iter().enumerate() {
        agents.push(subscribed(router, &format!("agent-{i}")).await);
    }
    let run = |ctl: Client, name: &'static str| {
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut waiting: std::collections::VecDeque<(String, _)> = Default::default();
            let (mut next, mut conflicts) = (1, 0u64);
            while next <= 150 || !waiting.is_empty() {
                while next <= 150 && waiting.len() < 16 {
                    let text = format!("{name}-{next}");
                    next += 1;
                    let pending = ctl
                        .publish_start(
                            "fleet",
                            Class::Command,
                            Bytes::from(text.clone()),
                            PublishOptions::default(),
                        )
                        .await
                        .unwrap();
                    waiting.push_back((text, pending));
                }
                let (text, pending) = waiting.pop_front().unwrap();
                match pending.wait().await {
                    Ok(op) => acked.push((op.0, text)),
                    Err(error) if error.code() == Some(38) => {
                        // Sent again, behind what is in flight (a retry takes a new op id).
                        conflicts += 1;
                        let again = ctl
                            .publish_start(
                                "fleet",
                                Class::Command,
                                Bytes::from(text.clone()),
                                PublishOptions::default(),
                            )
                            .await
                            .unwrap();
                        waiting.push_back((text, again));
                    }
                    Err(error) => panic!("{text}: {error}"),
                }
            }
            (acked, conflicts)
        })
    };
    let (ctl_a, _) = r[0].connect("ctl-a", Role::Controller, &["fleet"]).await;
    let (ctl_b, _) = r[1].connect("ctl-b", Role::Controller, &["fleet"]).await;
    let (a, b) = (run(ctl_a.clone(), "a"), run(ctl_b, "b"));
    let ((from_a, conflicts_a), (from_b, conflicts_b)) = (a.await.unwrap(), b.await.unwrap());
    let mut acked: HashMap<u64, String> = HashMap::new();
    for (op, text) in from_a.into_iter().chain(from_b) {
        assert!(
            acked.insert(op, text).is_none(),
            "op {op} acknowledged twice"
        );
    }
    assert_eq!(acked.len(), 300);
    let counted: u64 = r.iter().map(|t| t.router.stats().publish_conflicts).sum();
    assert!(
        conflicts_a + conflicts_b > 0 && counted > 0,
        "the two windows never met: {conflicts_a} + {conflicts_b} refused, {counted} counted"
    );
    ctl_a
        .publish(
            "fleet",
            Class::Command,
            Bytes::from_static(b"END"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    for (i, (_, rx)) in agents.iter_mut().enumerate() {
        let got = recv_until(rx, b"END").await;
        assert_eq!(
            ops(&got),
            (1..=300).collect::<Vec<_>>(),
            "router {i}: gap-free, in order"
        );
        for d in &got {
            assert_eq!(
                acked.get(&d.op_id.0).map(String::as_bytes),
                Some(d.payload.as_ref()),
                "router {i}: op {} is delivered with the command acknowledged with it",
                d.op_id.0
            );
        }
        assert_eq!(apply_all(&got).len(), 300, "router {i}: each applied once");
    }
    for router in r {
        router.router.shutdown().await;
    }
}

/// One lease contended by agents on two routers, with pauses past its TTL: the cluster
/// grants it to one holder at a time (no two holdings overlap, each new holder's token is
/// larger), a paused holder's renewal is refused and its late stamped command too, and an
/// agent filtering by fencing token applies no command of an older token after a newer one.
#[tokio::test]
async fn a_lease_contended_across_routers_has_one_holder_at_a_time_and_fences_stale_commands() {
    let (r, _cluster) = cluster(2).await;
    let (_watcher, mut watched) = subscribed(&r[1], "watcher").await;
    let (a, _) = r[0].connect("leader-a", Role::Controller, &["fleet"]).await;
    let (b, _) = r[1].connect("leader-b", Role::Controller, &["fleet"]).await;
    // Long enough that a busy machine answers the other router's acquire within it.
    let ttl = std::time::Duration::from_secs(2);
    let stamped = |token| PublishOptions {
        fencing_token: token,
        ..PublishOptions::default()
    };
    let command = |text: &'static str| Bytes::from_static(text.as_bytes());

    let grant_a = a.acquire_lease("fleet", "leader", ttl).await.unwrap();
    let held = b.acquire_lease("fleet", "leader", ttl).await.unwrap_err();
    assert_eq!(
        held.code(),
        Some(27),
        "LeaseHeld through the other router: {held}"
    );
    a.publish(
        "fleet",
        Class::Command,
        command("a-1"),
        stamped(grant_a.token),
    )
    .await
    .unwrap();
    // a is paused past its TTL; b takes over through the other router.
    tokio::time::sleep(ttl + std::time::Duration::from_millis(100)).await;
    let grant_b = b.acquire_lease("fleet", "leader", ttl).await.unwrap();
    assert!(grant_b.token > grant_a.token);
    assert!(grant_b.granted_at_ms >= grant_a.expires_at_ms, "no overlap");
    let lost = a.renew_lease(&grant_a, ttl).await.unwrap_err();
    assert_eq!(lost.code(), Some(28), "LeaseLost: {lost}");
    let stale = a
        .publish(
            "fleet",
            Class::Command,
            command("a-late"),
            stamped(grant_a.token),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some(29), "StaleFencingToken: {stale}");
    b.publish(
        "fleet",
        Class::Command,
        command("b-1"),
        stamped(grant_b.token),
    )
    .await
    .unwrap();

    // A grant through B is what A checks stamps against once it has seen it (A learns
    // of it from the cluster's bucket alone), and a release through B ends it on A too.
    let (holder_a, _) = r[0].connect("holder", Role::Controller, &["fleet"]).await;
    let (holder_b, _) = r[1].connect("holder", Role::Controller, &["fleet"]).await;
    let held = holder_b
        .acquire_lease("fleet", "other", std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let through_a = |token| {
        let holder_a = holder_a.clone();
        async move {
            let options = PublishOptions {
                fencing_token: token,
                lease: Some("other".into()),
                ..PublishOptions::default()
            };
            holder_a
                .publish("fleet", Class::Command, command("h"), options)
                .await
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(error) = through_a(held.token).await {
        assert_eq!(error.code(), Some(29), "{error}");
        assert!(
            std::time::Instant::now() < deadline,
            "A never saw B's grant"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    holder_b.release_lease(&held).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while through_a(held.token).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "A never saw B's release"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Both keep trying for the lease, each pausing past its TTL now and then: each holding
    // ends (released, or expired) before the next begins.
    let wall_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let short = std::time::Duration::from_millis(400);
    let contend = move |client: Client, pause_every: u64| {
        tokio::spawn(async move {
            let mut grants = Vec::new();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
            let mut round = 0u64;
            while std::time::Instant::now() < until {
                round += 1;
                match client.acquire_lease("fleet", "leader", short).await {
                    Ok(grant) => {
                        let wait = if round.is_multiple_of(pause_every) {
                            500
                        } else {
                            50
                        };
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                        // Ended by now at the latest (released, or expired meanwhile).
                        let ended = wall_ms().min(grant.expires_at_ms);
                        let _ = client.release_lease(&grant).await;
                        grants.push((grant, ended));
                        // Room for the other one.
                        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
                    }
                    Err(error) => {
                        // Held by the other (27), or the bucket slow to answer on a busy
                        // machine (19, to be sent again).
                        assert!(matches!(error.code(), Some(27 | 19)), "{error}");
                        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                    }
                }
            }
            grants
        })
    };
    let (from_a, from_b) = (contend(a.clone(), 3), contend(b.clone(), 4));
    let (from_a, from_b) = (from_a.await.unwrap(), from_b.await.unwrap());
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "both won the lease: {} and {} grants",
        from_a.len(),
        from_b.len()
    );
    let mut grants: Vec<_> = from_a.into_iter().chain(from_b).collect();
    grants.sort_by_key(|(g, _)| g.token);
    for pair in grants.windows(2) {
        let ((first, ended), (next, _)) = (&pair[0], &pair[1]);
        assert!(next.token > first.token);
        assert!(
            next.granted_at_ms >= *ended,
            "two holdings at once: {first:?} (ended {ended}) and {next:?}"
        );
    }
    // The agent applies a-1 then b-1; a's late command never reached it.
    a.publish(
        "fleet",
        Class::Command,
        command("END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_until(&mut watched, b"END").await;
    let mut fencing = swarmbus_client::FencingFilter::new();
    let applied: Vec<&[u8]> = got
        .iter()
        .filter(|d| fencing.admit(d))
        .map(|d| d.payload.as_ref())
        .collect();
    // (and the holder's commands stamped with the other lease, through A)
    assert_eq!(applied[..2], [&b"a-1"[..], b"b-1"]);
    assert!(applied.len() > 2 && applied[2..].iter().all(|p| *p == b"h"));
    for router in r {
        router.router.shutdown().await;
    }
}

/// A controller on router A pauses a swarm and stops an agent: router B holds the swarm's
/// commands for its subscriber until the resume (then delivers them in order), and closes
/// the stopped agent's session there and refuses it until the stop ends.
#[tokio::test]
async fn a_pause_and_a_stop_taken_on_one_router_hold_on_the_others() {
    let (r, _cluster) = cluster(2).await;
    let (_agent, mut on_b) = subscribed(&r[1], "agent-b").await;
    let (ctl, _) = r[0].connect("ctl", Role::Controller, &["fleet"]).await;
    let command = |text: &str| Bytes::from(text.to_owned());
    ctl.publish(
        "fleet",
        Class::Command,
        command("before"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    ctl.pause("fleet").await.unwrap();
    until_paused(&r[1], "fleet", true).await;
    for i in 1..=3 {
        ctl.publish(
            "fleet",
            Class::Command,
            command(&format!("held-{i}")),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    ctl.resume("fleet").await.unwrap();
    ctl.publish(
        "fleet",
        Class::Command,
        command("END"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got = recv_until(&mut on_b, b"END").await;
    let texts: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(texts, ["before", "held-1", "held-2", "held-3"]);
    assert_eq!(ops(&got), [1, 2, 3, 4]);

    // A stop taken on A closes the agent's session on B and keeps it out there.
    let (victim, _) = r[1].connect("victim", Role::Agent, &["fleet"]).await;
    ctl.stop_agent("victim", std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), victim.closed())
        .await
        .expect("the stopped agent's session on B is closed");
    assert_eq!(closed.code(), Some(36), "Stopped: {closed}");
    let refused = r[1]
        .connector
        .connect(
            r[1].router.local_addr(),
            swarmbus_client::Session::new("victim", Role::Agent, ["fleet"]),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(36), "refused while stopped: {refused}");
    for router in r {
        router.router.shutdown().await;
    }
}
