//! Shared helpers: an in-process router on a loopback port 0 and connected clients.

use std::time::Duration;

use swarmbus_client::{Client, Connector, Deliveries, Session};
use swarmbus_router::{Config, Router};
use swarmbus_schema::{Deliver, Role};

pub struct TestRouter {
    pub router: Router,
    pub connector: Connector,
    pub _data: Option<tempfile::TempDir>,
}

pub async fn start_router(adjust: impl FnOnce(&mut Config)) -> TestRouter {
    let data = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        shards: 2,
        ..Config::default()
    };
    // Tests that are not about presence must not lose agents to a stalled CI machine.
    config.presence.heartbeat_timeout_ms = 60_000;
    adjust(&mut config);
    let router = Router::start(config).await.expect("router starts");
    let ca = router.ca_path().expect("development CA").to_owned();
    let connector = Connector::new(&ca, "localhost").expect("connector");
    TestRouter {
        router,
        connector,
        _data: Some(data),
    }
}

/// Starts a router on `config` at a port the OS picks, for a test that restarts it at the
/// same address (with [`start_retrying`]); returns it, that address, and a connector that
/// trusts its development CA (which stays in its data dir across the restart).
pub async fn start_restartable(
    config: impl Fn(std::net::SocketAddr) -> Config,
) -> (TestRouter, std::net::SocketAddr, Connector) {
    let router = Router::start(config("127.0.0.1:0".parse().unwrap()))
        .await
        .expect("router starts");
    let addr = router.local_addr();
    let connector =
        Connector::new(router.ca_path().expect("development CA"), "localhost").expect("connector");
    (
        TestRouter::from_parts(router, connector.clone()),
        addr,
        connector,
    )
}

/// Starts a router on `config()`'s address, retrying for a few seconds: the port of a
/// router that just shut down may take a moment to be free again.
pub async fn start_retrying(config: impl Fn() -> Config) -> Router {
    let mut tries = 0;
    loop {
        let config = config();
        let listen = config.listen;
        match Router::start(config).await {
            Ok(router) => return router,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("router starts on {listen}: {error}"),
        }
    }
}

/// A router on loopback port 0 keeping its data in `data` (a test that restarts the router
/// on the same data dir manages the dir itself).
pub fn config_in(data: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        ..Config::default()
    }
}

impl TestRouter {
    /// Starts a router on `config`, with a connector that trusts its development CA; the
    /// data dir is the test's to manage.
    pub async fn start_on(config: Config) -> Self {
        let router = Router::start(config).await.expect("router starts");
        let connector = Connector::new(router.ca_path().expect("development CA"), "localhost")
            .expect("connector");
        TestRouter::from_parts(router, connector)
    }

    /// Starts a router on `config` over `disk` (a fault-injecting disk under its event
    /// log); the data dir is the test's to manage.
    pub async fn start_on_disk(
        config: Config,
        disk: std::sync::Arc<swarmbus_router::log::disk::FaultDisk>,
    ) -> Self {
        let options = swarmbus_router::StartOptions {
            disk: swarmbus_router::log::disk::Disk::faulty(disk),
            ..swarmbus_router::StartOptions::default()
        };
        let router = Router::start_with(config, options)
            .await
            .expect("router starts");
        let connector = Connector::new(router.ca_path().expect("development CA"), "localhost")
            .expect("connector");
        TestRouter::from_parts(router, connector)
    }

    /// A router started by the test itself (its data dir is the test's to manage).
    pub fn from_parts(router: Router, connector: Connector) -> Self {
        TestRouter {
            router,
            connector,
            _data: None,
        }
    }

    pub async fn connect(&self, agent: &str, role: Role, swarms: &[&str]) -> (Client, Deliveries) {
        self.connector
            .connect(
                self.router.local_addr(),
                Session::new(agent, role, swarms.iter().copied()),
            )
            .await
            .unwrap_or_else(|e| panic!("{agent} connects: {e}"))
    }
}

/// The op ids of `deliveries`, in order.
pub fn ops(deliveries: &[Deliver]) -> Vec<u64> {
    deliveries.iter().map(|d| d.op_id.0).collect()
}

/// Receives exactly `n` deliveries, failing the test after 10 s.
pub async fn recv_n(deliveries: &mut Deliveries, n: usize) -> Vec<Deliver> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await {
            Ok(Some(d)) => out.push(d),
            Ok(None) => panic!("connection closed after {} of {n} deliveries", out.len()),
            Err(_) => panic!("timed out after {} of {n} deliveries", out.len()),
        }
    }
    out
}

/// Receives until a delivery whose payload is `marker` arrives; returns those before it.
pub async fn recv_until(deliveries: &mut Deliveries, marker: &[u8]) -> Vec<Deliver> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await {
            Ok(Some(d)) if d.payload.as_ref() == marker => return out,
            Ok(Some(d)) => out.push(d),
            Ok(None) => panic!("connection closed before the marker"),
            Err(_) => panic!("timed out waiting for the marker ({} received)", out.len()),
        }
    }
}

/// Receives until `n` deliveries with key `key` arrived (others, e.g. presence alerts, are
/// skipped), failing the test after 10 s.
pub async fn recv_keyed(deliveries: &mut Deliveries, key: &str, n: usize) -> Vec<Deliver> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await {
            Ok(Some(d)) if d.key.as_deref() == Some(key) => out.push(d),
            Ok(Some(_)) => {}
            Ok(None) => panic!(
                "connection closed after {} of {n} {key} deliveries",
                out.len()
            ),
            Err(_) => panic!("timed out after {} of {n} {key} deliveries", out.len()),
        }
    }
    out
}

/// Unix seconds now (credentials' times).
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The development signing key a router that requires credentials made in `data_dir`.
pub fn signing_key(data_dir: &std::path::Path) -> Vec<u8> {
    let (private, _) = swarmbus_router::auth::dev_key_paths(data_dir);
    std::fs::read(private).expect("the router made its development key")
}

/// Publishes a command to `swarm`: the session is served.
pub async fn works(client: &Client, swarm: &str) {
    client
        .publish(
            swarm,
            swarmbus_schema::Class::Command,
            bytes::Bytes::from_static(b"x"),
            swarmbus_client::PublishOptions::default(),
        )
        .await
        .expect("the session is served");
}
