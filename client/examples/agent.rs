//! An agent: joins a swarm, resumes after the last command it applied, applies each command
//! once, and acknowledges it. The part between the `README` markers is the README's example,
//! kept identical to it by a test (`tests/readme.rs`).
//!
//! ```text
//! cargo run -p swarmbus-router --release &          # a router on its defaults
//! cargo run -p swarmbus-client --example agent       # this agent, against it
//! ```
//!
//! It publishes one command to its swarm and prints every command it applies; run it twice
//! to see the second run resume after the commands the first one applied (kept in
//! `agent-7.offsets`).

use bytes::Bytes;
use swarmbus_client::{
    Class, Connector, Deliver, FileOffsetStore, IdempotentApply, OpId, PublishOptions, Role,
    Session,
};

/// What the agent does with a command: here, print it.
fn handle(d: &Deliver) {
    println!(
        "applied op {} from {}: {}",
        d.op_id.0,
        d.source_agent,
        String::from_utf8_lossy(&d.payload)
    );
}

/// The README's example, as it reads there (so not reformatted).
#[rustfmt::skip]
async fn run(payload: Bytes) -> Result<OpId, Box<dyn std::error::Error>> {
    // README: begin
    let store = FileOffsetStore::new("agent-7.offsets");          // where applied ops are kept
    let mut apply = IdempotentApply::load(&store)?;               // empty on the first run
    let connector = Connector::new("swarmbus-data/tls/ca.pem".as_ref(), "localhost")?;
    let session = Session::new("agent-7", Role::Agent, ["swarm-a"]).resume_from(&apply);
    let (client, mut deliveries) = connector.connect("127.0.0.1:4433".parse()?, session).await?;
    client.subscribe("swarm-a", Class::Command, None).await?;   // missed ops first, then live
    let op = client.publish("swarm-a", Class::Command, payload, PublishOptions::default()).await?;
    while let Some(d) = deliveries.recv().await {
        if apply.apply(&d, handle).is_some() {                   // each op applied once
            apply.save(&store)?;                                 // atomic write-rename
            client.ack(&d.swarm, d.class, d.op_id).await?;       // or every N ops
        }
    }
    // README: end
    Ok(op)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let op = run(Bytes::from_static(b"hello from agent-7")).await?;
    println!("published op {}; the connection closed", op.0);
    Ok(())
}
