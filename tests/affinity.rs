//! GPU affinity through the router: workers register, affine sessions are pinned to the
//! node with their model, requests reach the pinned node and replies come back, a pinned
//! session fails over when its worker disconnects, and pins survive a router restart.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_affinity::{Fleet, Gpus, NodeSpec, PlacementRequest, Zone};
use swarmbus_client::{Client, ClientError, Connector, Session};
use swarmbus_proto::workers::node_id;
use swarmbus_router::{Config, Router};
use swarmbus_schema::{Role, WorkerStatus};

use crate::common::{start_retrying, start_router};

fn status(node: &str, models: &[&str]) -> WorkerStatus {
    WorkerStatus {
        node: node.into(),
        zone: "z1".into(),
        gpu_count: 1,
        gpu_model: "test-gpu".into(),
        gpu_memory_total: 80 << 30,
        gpu_memory_free: 60 << 30,
        models: models.iter().map(|m| m.to_string()).collect(),
        ..WorkerStatus::default()
    }
}

/// A worker that answers every request with "<node>:<payload>" (or never, when `silent`).
async fn worker(
    connector: &Connector,
    addr: std::net::SocketAddr,
    node: &str,
    models: &[&str],
    silent: bool,
) -> Client {
    let (client, _rx) = connector
        .connect(addr, Session::new(node, Role::Worker, ["fleet"]))
        .await
        .unwrap();
    client.register_worker(status(node, models)).await.unwrap();
    let mut requests = client.requests().unwrap();
    let answering = client.clone();
    let node = node.to_owned();
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            if silent {
                continue;
            }
            let mut answer = format!("{node}:").into_bytes();
            answer.extend_from_slice(&request.payload);
            if answering
                .reply(request.request_id, true, Bytes::from(answer))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    client
}

async fn ask(
    agent: &Client,
    key: Option<&str>,
    model: Option<&str>,
) -> Result<String, ClientError> {
    let reply = agent
        .request_worker(
            key,
            model,
            Bytes::from_static(b"hi"),
            Duration::from_secs(10),
        )
        .await?;
    assert!(reply.ok);
    Ok(String::from_utf8(reply.payload.to_vec()).unwrap())
}

#[tokio::test]
async fn sessions_are_pinned_to_the_worker_with_their_model_and_fail_over() {
    let t = start_router(|_| {}).await;
    let addr = t.router.local_addr();
    let llama = worker(&t.connector, addr, "gpu-llama", &["llama"], false).await;
    let _mistral = worker(&t.connector, addr, "gpu-mistral", &["mistral"], false).await;
    let (agent, _rx) = t.connect("agent", Role::Agent, &["fleet"]).await;
    // Each session goes to the node that has its model loaded.
    let pinned = agent.open_session("chat-1", Some("llama")).await.unwrap();
    assert_eq!(pinned.node, "gpu-llama");
    assert!(!pinned.cold_load);
    let pinned = agent.open_session("chat-2", Some("mistral")).await.unwrap();
    assert_eq!(pinned.node, "gpu-mistral");
    // Opening again keeps the pin.
    assert!(
        agent
            .open_session("chat-1", Some("llama"))
            .await
            .unwrap()
            .kept
    );
    for _ in 0..3 {
        assert_eq!(
            ask(&agent, Some("chat-1"), Some("llama")).await.unwrap(),
            "gpu-llama:hi"
        );
        assert_eq!(
            ask(&agent, Some("chat-2"), Some("mistral")).await.unwrap(),
            "gpu-mistral:hi"
        );
    }
    // Without a session: the node that has the model.
    assert_eq!(
        ask(&agent, None, Some("mistral")).await.unwrap(),
        "gpu-mistral:hi"
    );
    // The llama worker goes away: its session moves to the other node (cold).
    llama.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ask(&agent, Some("chat-1"), Some("llama")).await {
            Ok(answer) => {
                assert_eq!(answer, "gpu-mistral:hi");
                break;
            }
            // The close may not have reached the router yet.
            Err(error) if std::time::Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("no failover: {error}"),
        }
    }
    // chat-2 never moved.
    assert!(
        agent
            .open_session("chat-2", Some("mistral"))
            .await
            .unwrap()
            .kept
    );
    t.router.shutdown().await;
}

#[tokio::test]
async fn requests_fail_clearly_when_the_node_is_gone_or_silent() {
    let t = start_router(|_| {}).await;
    let addr = t.router.local_addr();
    let (agent, _rx) = t.connect("agent", Role::Agent, &["fleet"]).await;
    // No worker at all.
    let err = ask(&agent, None, Some("llama")).await.unwrap_err();
    assert_eq!(err.code(), Some(24), "NoWorker: {err}");
    // A worker that never answers: the deadline passes.
    let silent = worker(&t.connector, addr, "gpu-silent", &["llama"], true).await;
    let err = agent
        .request_worker(
            Some("s1"),
            Some("llama"),
            Bytes::from_static(b"x"),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(23), "DeadlineExceeded: {err}");
    // A request in flight when its worker disconnects fails with NodeGone.
    let pending = tokio::spawn({
        let agent = agent.clone();
        async move {
            agent
                .request_worker(
                    Some("s1"),
                    Some("llama"),
                    Bytes::from_static(b"x"),
                    Duration::from_secs(30),
                )
                .await
        }
    });
    // Close the worker only once the router has sent it the request.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.router.worker_requests_pending() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the router"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    silent.close();
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(22), "NodeGone: {err}");
    // Only workers may register.
    let err = agent
        .register_worker(status("fake", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(25), "Forbidden: {err}");
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_pin_survives_a_router_restart() {
    // A session key that a fresh placement over {a, b} would give to b: the pin to a (made
    // while b was not there) must outlive the restart.
    let mut fleet = Fleet::default();
    for name in ["gpu-a", "gpu-b"] {
        fleet
            .add_node(NodeSpec::new(
                node_id(name),
                Zone::default(),
                Gpus::default(),
            ))
            .unwrap();
    }
    let key = (0..)
        .map(|i| format!("session-{i}"))
        .find(|key| fleet.ranking(&PlacementRequest::new(key, None))[0] == node_id("gpu-b"))
        .unwrap();

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
    let connector = Connector::new(router.ca_path().unwrap(), "localhost").unwrap();
    let a = worker(&connector, addr, "gpu-a", &[], false).await;
    let (agent, _rx) = connector
        .connect(addr, Session::new("agent", Role::Agent, ["fleet"]))
        .await
        .unwrap();
    assert_eq!(agent.open_session(&key, None).await.unwrap().node, "gpu-a");
    let b = worker(&connector, addr, "gpu-b", &[], false).await;
    // A new node never steals a sticky session.
    assert_eq!(ask(&agent, Some(&key), None).await.unwrap(), "gpu-a:hi");
    // Shut down with the workers still connected (a restart, not a worker failure).
    router.shutdown().await;
    drop((a, b, agent));

    let router = start_retrying(|| config(addr)).await;
    // b comes back first; the session still belongs to a.
    let _b = worker(&connector, addr, "gpu-b", &[], false).await;
    let _a = worker(&connector, addr, "gpu-a", &[], false).await;
    let (agent, _rx) = connector
        .connect(addr, Session::new("agent", Role::Agent, ["fleet"]))
        .await
        .unwrap();
    let pinned = agent.open_session(&key, None).await.unwrap();
    assert_eq!((pinned.node.as_str(), pinned.kept), ("gpu-a", true));
    assert_eq!(ask(&agent, Some(&key), None).await.unwrap(), "gpu-a:hi");
    router.shutdown().await;
}

#[tokio::test]
async fn reserved_swarm_names_are_refused() {
    let t = start_router(|_| {}).await;
    let err = t
        .connector
        .connect(
            t.router.local_addr(),
            Session::new("sneaky", Role::Agent, ["$affinity"]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(11), "InvalidRequest: {err}");
    t.router.shutdown().await;
}

#[tokio::test]
async fn a_workers_request_stream_ends_with_its_connection() {
    let t = start_router(|_| {}).await;
    let (client, _rx) = t
        .connector
        .connect(
            t.router.local_addr(),
            Session::new("w1", Role::Worker, ["fleet"]),
        )
        .await
        .unwrap();
    let mut requests = client.requests().unwrap();
    client.close();
    // The client is still held: the stream ends because the connection did.
    let ended = tokio::time::timeout(Duration::from_secs(10), requests.recv()).await;
    assert!(
        matches!(ended, Ok(None)),
        "the request stream ends once the connection is closed"
    );
    drop(client);
}
