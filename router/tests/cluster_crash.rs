//! Routers sharing swarms on NATS JetStream: a router killed with SIGKILL while commands
//! are in flight loses none it acknowledged, and its agents resume on another router with
//! their resume points, missing nothing and applying nothing twice.
//!
//! Lives in the router crate because it runs the `swarmbus-router` binary (Cargo exposes a
//! binary's path only to its own package's tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Connector, IdempotentApply, PublishOptions, ReconnectOptions, Session};
use swarmbus_jetstream::testing::NatsServer;
use swarmbus_schema::{Class, Role};

mod common;

const ROUTER: &str = env!("CARGO_BIN_EXE_swarmbus-router");

/// A router process on `data`, its log on `server`; returns it and its address.
fn start_router(data: &Path, server: &NatsServer) -> (Child, SocketAddr) {
    std::fs::create_dir_all(data).unwrap();
    let config = data.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nbackend = \"jetstream\"\n\n[jetstream]\nurls = [\"{}\"]\n\
             monitor_urls = [\"{}\"]\nack_timeout_ms = 500\nappend_deadline_ms = 5000\n",
            server.url(),
            server.monitor_url()
        ),
    )
    .unwrap();
    let mut command = Command::new(ROUTER);
    command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--config")
        .arg(&config)
        .env("SWARMBUS_LOG", "warn")
        .env("SWARMBUS_ADMIN_LISTEN", "off");
    common::start(command)
}

#[tokio::test]
async fn a_router_killed_mid_load_loses_no_acknowledged_command_and_its_agents_resume_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&dir.path().join("nats"), true);
    let (mut a, addr_a) = start_router(&dir.path().join("a"), &server);
    let (mut b, addr_b) = start_router(&dir.path().join("b"), &server);
    // Both routers made their own development CA: the clients trust both. A killed router
    // closes nothing: a client notices after its idle timeout.
    let both = [
        std::fs::read(dir.path().join("a/tls/ca.pem")).unwrap(),
        std::fs::read(dir.path().join("b/tls/ca.pem")).unwrap(),
    ]
    .concat();
    let connector = Connector::builder("localhost")
        .trust_pem(both)
        .idle_timeout(Duration::from_secs(3))
        .build()
        .unwrap();

    // An agent on A that fails over to B.
    let options = ReconnectOptions {
        policy: swarmbus_client::RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_attempts: u32::MAX,
            jitter: true,
        },
        ..ReconnectOptions::default()
    };
    let (agent, mut deliveries) = connector
        .connect_resilient_cluster(
            &[addr_a, addr_b],
            Session::new("agent", Role::Agent, ["fleet"]),
            options,
        )
        .await
        .unwrap();
    agent
        .subscribe("fleet", Class::Command, None)
        .await
        .unwrap();
    assert_eq!(agent.router(), addr_a);
    // And one on B all along, which gets A's commands through B's follow of the stream.
    let (watcher, mut watched) = connector
        .connect(addr_b, Session::new("watcher", Role::Agent, ["fleet"]))
        .await
        .unwrap();
    watcher
        .subscribe("fleet", Class::Command, None)
        .await
        .unwrap();

    // A controller on A with a window of commands in flight; A is killed after 300 acks.
    let (ctl, _) = connector
        .connect(addr_a, Session::new("ctl", Role::Controller, ["fleet"]))
        .await
        .unwrap();
    let mut acked: BTreeMap<u64, Bytes> = BTreeMap::new();
    let mut in_flight = std::collections::VecDeque::new();
    let mut n = 0u64;
    while acked.len() < 300 {
        while in_flight.len() < 32 {
            n += 1;
            let payload = Bytes::from(format!("cmd-{n}"));
            let pending = ctl
                .publish_start(
                    "fleet",
                    Class::Command,
                    payload.clone(),
                    PublishOptions::default(),
                )
                .await
                .unwrap();
            in_flight.push_back((payload, pending));
        }
        let (payload, pending) = in_flight.pop_front().unwrap();
        let op = pending.wait().await.unwrap();
        acked.insert(op.0, payload);
    }
    a.kill().unwrap();
    a.wait().unwrap();
    // What was in flight may or may not have been made durable: it was never acknowledged.
    for (payload, pending) in in_flight {
        if let Ok(op) = pending.wait().await {
            acked.insert(op.0, payload);
        }
    }

    // The controller goes on through B; the agent resumes there by itself.
    let (ctl, _) = connector
        .connect(addr_b, Session::new("ctl", Role::Controller, ["fleet"]))
        .await
        .unwrap();
    let end = ctl
        .publish(
            "fleet",
            Class::Command,
            Bytes::from_static(b"END"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert!(acked.keys().all(|op| *op < end.0));
    for (name, rx) in [
        ("the agent from A", &mut deliveries),
        ("the agent on B", &mut watched),
    ] {
        let mut apply = IdempotentApply::new();
        let mut applied = Vec::new();
        loop {
            let d = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{name}: END within 30 s"))
                .expect("deliveries go on");
            if apply.apply(&d, |_| ()).is_none() {
                continue;
            }
            if d.payload.as_ref() == b"END" {
                break;
            }
            applied.push((d.op_id.0, d.payload.clone()));
        }
        // Every op up to END once, in order: the acknowledged ones with their commands.
        let ops: Vec<u64> = applied.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            ops,
            (1..end.0).collect::<Vec<_>>(),
            "{name}: gap-free, in order, once each"
        );
        for (op, payload) in &applied {
            if let Some(sent) = acked.get(op) {
                assert_eq!(sent, payload, "{name}: op {op}");
            }
        }
    }
    assert_eq!(agent.router(), addr_b, "the agent resumed on B");
    assert!(agent.reconnects() >= 1);
    b.kill().unwrap();
    b.wait().unwrap();
}
