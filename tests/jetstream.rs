//! `log.backend = "jetstream"`: the swarms' ordered logs in a real nats-server's JetStream
//! on 127.0.0.1 (installed by `scripts/nats-server`).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use swarmbus_client::{Client, FileOffsetStore, IdempotentApply, PublishOptions, Session};
use swarmbus_jetstream::testing::NatsServer;
use swarmbus_jetstream::{Cluster, JetStreamConfig};
use swarmbus_router::config::LogBackendKind;
use swarmbus_router::Config;
use swarmbus_schema::{Class, Deliver, OpId, Role};

use crate::common::{ops, recv_n, recv_until, TestRouter};

pub fn jetstream(server: &NatsServer) -> JetStreamConfig {
    JetStreamConfig {
        urls: vec![server.url()],
        monitor_urls: vec![server.monitor_url()],
        ack_timeout_ms: 500,
        append_deadline_ms: 1_500,
        ..Default::default()
    }
}

pub fn config(data: &Path, server: &NatsServer) -> Config {
    let mut config = crate::common::config_in(data);
    config.shards = 2;
    config.presence.heartbeat_timeout_ms = 60_000;
    // Redelivery of unacknowledged ops is not what these tests look at.
    config.log.redelivery_timeout_ms = 120_000;
    config.log.backend = LogBackendKind::Jetstream;
    config.jetstream = jetstream(server);
    config
}

async fn command(client: &Client, text: &str) -> Result<OpId, swarmbus_client::ClientError> {
    client
        .publish(
            "s",
            Class::Command,
            Bytes::from(text.to_owned()),
            PublishOptions::default(),
        )
        .await
}

/// The log lives in the cluster: a router started on an empty data directory serves the
/// swarm from its stream, with the same epoch and op ids that continue, and an agent
/// resumes there with exactly the ops it missed.
#[tokio::test]
async fn a_swarms_log_outlives_the_router_and_its_data_directory() {
    let nats_dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(nats_dir.path(), true);
    let offsets = tempfile::tempdir().unwrap();
    let store = FileOffsetStore::new(offsets.path().join("offsets"));

    let first_data = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(config(first_data.path(), &server)).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    {
        let (agent, mut rx) = t.connect("a1", Role::Agent, &["s"]).await;
        agent.subscribe("s", Class::Command, None).await.unwrap();
        for i in 1..=5 {
            assert_eq!(command(&ctl, &format!("cmd-{i}")).await.unwrap(), OpId(i));
        }
        let mut apply = IdempotentApply::new();
        for d in recv_n(&mut rx, 5).await {
            assert!(apply.apply(&d, |_| ()).is_some());
        }
        apply.save(&store).unwrap();
        agent.ack("s", Class::Command, OpId(5)).await.unwrap();
        agent.close();
    }
    for i in 6..=15 {
        command(&ctl, &format!("cmd-{i}")).await.unwrap();
    }
    drop(ctl);
    let TestRouter { router, .. } = t;
    router.shutdown().await;

    // The stream holds every op, gap-free.
    let cluster = Cluster::connect(jetstream(&server)).await.unwrap();
    let stream = cluster
        .existing("s")
        .await
        .unwrap()
        .expect("the swarm's stream");
    assert_eq!(stream.bounds().await.unwrap(), (1, 15));

    let second_data = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(config(second_data.path(), &server)).await;
    let apply = IdempotentApply::load(&store).unwrap();
    let session = Session::new("a1", Role::Agent, ["s"]).resume_from(&apply);
    let (agent, mut rx) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    assert_eq!(command(&ctl, "cmd-16").await.unwrap(), OpId(16));
    command(&ctl, "END").await.unwrap();
    let got = recv_until(&mut rx, b"END").await;
    assert_eq!(ops(&got), (6..=16).collect::<Vec<_>>());
    assert!(got.iter().all(|d| Some(d.epoch) == apply.epoch("s")));
    assert!(
        agent.epoch_changes().is_empty(),
        "the epoch is the stream's"
    );
    let payloads: Vec<String> = got[..10]
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (6..=15).map(|i| format!("cmd-{i}")).collect::<Vec<_>>()
    );
    t.router.shutdown().await;
}

/// Without NATS the router acknowledges no command (it refuses them with SwarmUnavailable
/// once an append misses its deadline); when NATS is back the swarm recovers by itself,
/// and the stream stays gap-free, nothing refused delivered.
#[tokio::test]
async fn a_router_without_nats_refuses_commands_and_recovers_when_it_is_back() {
    let nats_dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(nats_dir.path(), true);
    let data = tempfile::tempdir().unwrap();
    let mut with_admin = config(data.path(), &server);
    with_admin.admin_listen =
        swarmbus_router::config::AdminListen::At("127.0.0.1:0".parse().unwrap());
    let t = TestRouter::start_on(with_admin).await;
    let admin = t.router.admin_addr().expect("the admin listener");
    assert_eq!(crate::admin::get(admin, "/readyz").await.0, 200);
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let first = command(&ctl, "before").await.unwrap();

    server.kill();
    let refused = command(&ctl, "refused").await.unwrap_err();
    assert_eq!(refused.code(), Some(19), "SwarmUnavailable: {refused}");
    assert!(t.router.stats().log_write_failures >= 1);
    // The router says it is not ready while it has no connection to the cluster.
    let (status, why) = crate::admin::get(admin, "/readyz").await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("JetStream"), "{why}");

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match command(&ctl, "after").await {
            Ok(op) => break op,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(error.code(), Some(19), "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the swarm did not recover: {error}"),
        }
    };
    assert!(after.0 > first.0 + 1, "a refused op id given out again");
    assert_eq!(crate::admin::get(admin, "/readyz").await.0, 200);
    let got = recv_n(&mut rx, 2).await;
    let got: Vec<(u64, String)> = got
        .iter()
        .map(|d| (d.op_id.0, String::from_utf8_lossy(&d.payload).into_owned()))
        .collect();
    assert_eq!(
        got,
        vec![
            (first.0, "before".to_string()),
            (after.0, "after".to_string())
        ]
    );
    let cluster = Cluster::connect(jetstream(&server)).await.unwrap();
    let stream = cluster.existing("s").await.unwrap().unwrap();
    assert_eq!(stream.bounds().await.unwrap(), (1, after.0), "gap-free");
    // A refused op holds a void record, or nothing: the client may have sent its publish
    // again once NATS was back, after the router gave up on it, and the router erased it.
    for op in first.0 + 1..after.0 {
        if let Some(record) = stream.get(op).await.unwrap() {
            assert!(
                !String::from_utf8_lossy(&record).contains("refused"),
                "op {op}: refused bytes in the stream"
            );
        }
    }
    let read = stream.read(1, after.0, 100, usize::MAX).await.unwrap();
    assert!(read
        .iter()
        .all(|(_, r)| !String::from_utf8_lossy(r).contains("refused")));
    assert_eq!(read.last().map(|(op, _)| *op), Some(after.0));
    t.router.shutdown().await;
}

/// A start-up with swarms' logs in the embedded log, or against a server that does not
/// sync before it acknowledges, is refused with the reason.
#[tokio::test]
async fn the_router_refuses_to_start_on_what_would_hide_or_lose_commands() {
    let nats_dir = tempfile::tempdir().unwrap();
    let unsynced = NatsServer::start(nats_dir.path(), false);
    let data = tempfile::tempdir().unwrap();
    let Err(error) = swarmbus_router::Router::start(config(data.path(), &unsynced)).await else {
        panic!("a router on a server that acknowledges before syncing started");
    };
    let text = swarmbus_router::error::report(&error);
    assert!(text.contains("sync_interval"), "{text}");
    drop(unsynced);

    let embedded = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(crate::common::config_in(embedded.path())).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    command(&ctl, "embedded").await.unwrap();
    drop(ctl);
    let TestRouter { router, .. } = t;
    router.shutdown().await;
    let other_dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(other_dir.path(), true);
    let Err(error) = swarmbus_router::Router::start(config(embedded.path(), &server)).await else {
        panic!("a router with swarms in its embedded log started on JetStream");
    };
    let text = swarmbus_router::error::report(&error);
    assert!(text.contains("embedded log"), "{text}");

    // A server whose messages are smaller than the largest command record.
    let small_dir = tempfile::tempdir().unwrap();
    let small = NatsServer::start_configured(small_dir.path(), "max_payload: 65536");
    let data = tempfile::tempdir().unwrap();
    let Err(error) = swarmbus_router::Router::start(config(data.path(), &small)).await else {
        panic!("a router started on a server whose max_payload cannot hold a command");
    };
    let text = swarmbus_router::error::report(&error);
    assert!(text.contains("max_payload"), "{text}");
    let mut fitting = config(data.path(), &small);
    fitting.limits.max_payload_bytes.command = 32 << 10;
    fitting.limits.max_payload_bytes.control = 32 << 10;
    let t = TestRouter::start_on(fitting).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    command(&ctl, "fits").await.unwrap();
    t.router.shutdown().await;
}

/// Three nats-servers, the swarm's stream on all three: the leader of the stream killed
/// mid-load, every command is still acknowledged (after the election) and delivered in
/// order; restarted, it catches up.
#[tokio::test]
async fn commands_carry_on_when_the_streams_leader_stops_and_it_catches_up_when_back() {
    let nats_dir = tempfile::tempdir().unwrap();
    let mut servers = NatsServer::start_cluster(nats_dir.path(), 3);
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path(), &servers[0]);
    config.jetstream = JetStreamConfig {
        urls: servers.iter().map(NatsServer::url).collect(),
        monitor_urls: servers.iter().map(NatsServer::monitor_url).collect(),
        replicas: 3,
        // A new leader is elected within seconds; appends wait for it.
        append_deadline_ms: 30_000,
        ..Default::default()
    };
    let js = config.jetstream.clone();
    // JetStream's meta leader is elected after the servers met: the start retries until
    // the cluster takes the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let t = loop {
        match swarmbus_router::Router::start(config.clone()).await {
            Ok(router) => {
                let connector =
                    swarmbus_client::Connector::new(router.ca_path().unwrap(), "localhost")
                        .unwrap();
                break TestRouter::from_parts(router, connector);
            }
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("the router starts on the cluster: {error}"),
        }
    };
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    // The first command makes the stream; until the cluster has a meta leader it may be
    // refused, and is sent again.
    loop {
        match command(&ctl, "cmd-0").await {
            Ok(_) => break,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(error.code(), Some(19), "{error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("the first command: {error}"),
        }
    }
    for i in 1..50 {
        command(&ctl, &format!("cmd-{i}")).await.unwrap();
    }
    let cluster = Cluster::connect(js.clone()).await.unwrap();
    let stream = cluster.existing("s").await.unwrap().unwrap();
    let (leader, _) = stream
        .replication()
        .await
        .unwrap()
        .expect("a replicated stream");
    let stopped = servers
        .iter()
        .position(|s| s.name() == Some(leader.as_str()))
        .expect("the leader is one of the servers");
    // Killed with commands in flight: ten sent and not yet acknowledged, forty after.
    let mut in_flight = Vec::new();
    for i in 50..100 {
        let payload = Bytes::from(format!("cmd-{i}"));
        let sent = ctl
            .publish_start("s", Class::Command, payload, PublishOptions::default())
            .await
            .unwrap();
        in_flight.push(sent);
        if i == 59 {
            servers[stopped].kill();
        }
    }
    for sent in in_flight {
        sent.wait().await.unwrap();
    }
    let got = recv_n(&mut rx, 100).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..100).map(|i| format!("cmd-{i}")).collect::<Vec<_>>()
    );
    let first = got[0].op_id.0;
    assert_eq!(ops(&got), (first..first + 100).collect::<Vec<_>>());

    servers[stopped].restart();
    let stopped_name = servers[stopped].name().unwrap().to_owned();
    let caught_up = Instant::now() + Duration::from_secs(30);
    loop {
        let replication = stream.replication().await;
        let current = match &replication {
            Ok(Some((leader, replicas))) => {
                *leader == stopped_name
                    || replicas
                        .iter()
                        .any(|(name, current)| *name == stopped_name && *current)
            }
            _ => false,
        };
        if current {
            break;
        }
        assert!(
            Instant::now() < caught_up,
            "the restarted server did not catch up: {replication:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, last) = stream.bounds().await.unwrap();
    assert_eq!(last, first + 99);
    t.router.shutdown().await;
}

/// Two routers on one cluster: telemetry published on either reaches the subscribers on
/// both, each once (a router never gets its own telemetry back from NATS).
#[tokio::test]
async fn telemetry_crosses_routers_once() {
    let nats_dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(nats_dir.path(), true);
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sharing = |data: &Path| {
        let mut config = config(data, &server);
        config.jetstream.share_telemetry = true;
        config
    };
    let a = TestRouter::start_on(sharing(data_a.path())).await;
    let b = TestRouter::start_on(sharing(data_b.path())).await;
    let (on_a, mut rx_a) = a.connect("watch-a", Role::Controller, &["s"]).await;
    let (on_b, mut rx_b) = b.connect("watch-b", Role::Controller, &["s"]).await;
    on_a.subscribe("s", Class::Telemetry, None).await.unwrap();
    on_b.subscribe("s", Class::Telemetry, None).await.unwrap();
    let (gpu, _) = a.connect("gpu-1", Role::Agent, &["s"]).await;
    let telemetry = |text: String| {
        let gpu = gpu.clone();
        async move {
            gpu.publish(
                "s",
                Class::Telemetry,
                Bytes::from(text),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        }
    };
    // The other router's subscription reaches NATS a moment after the subscribe: probes
    // until one arrives there.
    let deadline = Instant::now() + Duration::from_secs(20);
    'probing: loop {
        telemetry("probe".into()).await;
        let wait = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                got = rx_b.recv() => {
                    if got.is_some_and(|d| d.payload == "probe") { break 'probing; }
                }
                _ = &mut wait => break,
            }
        }
        assert!(
            Instant::now() < deadline,
            "no telemetry crossed to router B"
        );
    }
    // A burst: a thousand sent without waiting, so that the router reads many in one go.
    let mut sent = Vec::new();
    for i in 0..1000 {
        let payload = Bytes::from(format!("t-{i}"));
        let options = PublishOptions::default();
        sent.push(
            gpu.publish_start("s", Class::Telemetry, payload, options)
                .await
                .unwrap(),
        );
    }
    for sent in sent {
        sent.wait().await.unwrap();
    }
    telemetry("END".into()).await;
    let texts = |got: Vec<Deliver>| -> Vec<String> {
        got.iter()
            .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
            .filter(|t| t.starts_with("t-"))
            .collect()
    };
    let expected: Vec<String> = (0..1000).map(|i| format!("t-{i}")).collect();
    assert_eq!(texts(recv_until(&mut rx_b, b"END").await), expected, "on B");
    assert_eq!(
        texts(recv_until(&mut rx_a, b"END").await),
        expected,
        "on A, once each"
    );
    let got = b.router.stats();
    assert!(
        got.telemetry_bridged_in >= 21,
        "{}",
        got.telemetry_bridged_in
    );
    assert!(a.router.stats().telemetry_bridged_out >= 21);

    // And the other way: published on B, delivered on A.
    let (gpu_b, _) = b.connect("gpu-2", Role::Agent, &["s"]).await;
    gpu_b
        .publish(
            "s",
            Class::Telemetry,
            Bytes::from_static(b"from-b"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let got = recv_until(&mut rx_a, b"from-b").await;
    assert!(got
        .iter()
        .all(|d| d.source_agent != "gpu-2" || d.payload == "from-b"));
    drop((on_a, on_b, gpu, gpu_b));
    a.router.shutdown().await;
    b.router.shutdown().await;
}
