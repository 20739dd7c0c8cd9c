//! A controller: takes the swarm's `leader` lease, publishes commands stamped with its
//! fencing token (the router refuses them once another controller holds a newer token),
//! renews the lease while it works, then pauses and resumes the swarm (a safety action).
//!
//! ```text
//! cargo run -p swarmbus-router --release &             # a router on its defaults
//! cargo run -p swarmbus-client --example controller     # this controller, against it
//! cargo run -p swarmbus-client --example controller -- HOST:PORT CA.pem   # another router
//! ```

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Class, Connector, PublishOptions, Role, SafetyKind, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The router and the CA it was started with; by default, a router on its defaults.
    let mut args = std::env::args().skip(1);
    let router = args.next().unwrap_or_else(|| "127.0.0.1:4433".into());
    let ca = args
        .next()
        .unwrap_or_else(|| "swarmbus-data/tls/ca.pem".into());
    let connector = Connector::new(ca.as_ref(), "localhost")?;
    let session = Session::new("controller-1", Role::Controller, ["swarm-a"]);
    let (client, _deliveries) = connector.connect_to(&router, session).await?;

    // One leader at a time: a second controller is refused with LeaseHeld (27) and the
    // time left.
    let ttl = Duration::from_secs(10);
    let mut grant = client.acquire_lease("swarm-a", "leader", ttl).await?;
    println!("leader with token {}", grant.token);
    for step in 0..5 {
        let stamped = PublishOptions {
            fencing_token: grant.token,
            lease: Some("leader".into()),
            ..PublishOptions::default()
        };
        let payload = Bytes::from(format!("step {step}"));
        let op = client
            .publish("swarm-a", Class::Command, payload, stamped)
            .await?;
        println!("command {step} is op {}", op.0);
        // Renewed well within its TTL; LeaseLost (28) means another leader took over.
        grant = client.renew_lease(&grant, ttl).await?;
    }
    client.release_lease(&grant).await?;

    // Hold the swarm's commands (they are still sequenced and made durable), then let
    // them go: subscribers catch up from the log, in order.
    client
        .safety(SafetyKind::Pause, "swarm-a", "", Duration::ZERO)
        .await?;
    client
        .safety(SafetyKind::Resume, "swarm-a", "", Duration::ZERO)
        .await?;
    println!("paused and resumed swarm-a");
    Ok(())
}
