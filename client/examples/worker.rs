//! A GPU worker: registers its node (the GPUs it finds, the models it has loaded), takes
//! jobs from the swarm's queue, reports progress while it works, and reports each result.
//! A job cancelled, or an attempt fenced, is dropped.
//!
//! ```text
//! cargo run -p swarmbus-router --release &          # a router on its defaults
//! cargo run -p swarmbus-client --example worker      # this worker, against it
//! ```
//!
//! Built with `--features nvml` it reports the node's NVIDIA GPUs; without, none.

use bytes::Bytes;
use swarmbus_client::gpu::detect;
use swarmbus_client::{Connector, JobEvent, Role, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector = Connector::new("swarmbus-data/tls/ca.pem".as_ref(), "localhost")?;
    let session = Session::new("gpu-node-1", Role::Worker, ["swarm-a"]);
    let (client, _deliveries) = connector
        .connect("127.0.0.1:4433".parse()?, session)
        .await?;

    // What placement sees of this node: its GPUs, and the models already loaded.
    let mut status = detect().worker_status("gpu-node-1");
    status.models = vec!["llama-3-8b".into()];
    let node = client.register_worker(status).await?;
    println!("registered as node {node}");

    // Up to two jobs at a time.
    let mut events = client
        .job_events()
        .expect("a worker session has job events");
    client.set_job_credits(2).await?;
    while let Some(event) = events.recv().await {
        match event {
            JobEvent::Lease(lease) => {
                let (job, attempt) = (lease.job_id, lease.attempt);
                // A heartbeat with progress (it also extends the lease).
                client
                    .job_progress(job, attempt, Bytes::from_static(b"50%"))
                    .await?;
                let result = Bytes::from(format!("{} bytes done", lease.payload.len()));
                let ended = client.finish_job(job, attempt, true, false, result).await;
                println!("job {} attempt {attempt}: {ended:?}", job.0);
            }
            JobEvent::Cancel { job_id, attempt } => {
                println!("job {} attempt {attempt} cancelled: dropped", job_id.0);
            }
        }
    }
    Ok(())
}
