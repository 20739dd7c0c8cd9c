//! Crash safety: a router killed with SIGKILL mid-stream loses no acknowledged command, and
//! its sequencer continues after restart with no gap and no reused op id.
//!
//! Lives in the router crate because it runs the `swarmbus-router` binary (Cargo exposes a
//! binary's path only to its own package's tests).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Connector, PublishOptions, Session};
use swarmbus_router::log::recover_all;
use swarmbus_schema::{Class, DecodeOptions, Epoch, FrameDecoder, Message, OpId, Role};

mod common;

const ROUTER: &str = env!("CARGO_BIN_EXE_swarmbus-router");
const SWARMS: [&str; 2] = ["crash-a", "crash-b"];

fn start_router(data: &Path, writer: &str) -> (Child, SocketAddr) {
    start_router_on(data, writer, "127.0.0.1:0")
}

fn start_router_on(data: &Path, writer: &str, listen: &str) -> (Child, SocketAddr) {
    let mut command = Command::new(ROUTER);
    command
        .args(["--listen", listen, "--data-dir"])
        .arg(data)
        .env("SWARMBUS_LOG", "warn")
        .env("SWARMBUS_LOG_WRITER", writer)
        .env("SWARMBUS_ADMIN_LISTEN", "127.0.0.1:0");
    common::start(command)
}

/// Publishes commands with a window in flight until `acks` were acknowledged, then kills the
/// router with SIGKILL while publishes are still in flight. Returns what was acknowledged.
async fn publish_then_kill(
    data: &Path,
    writer: &str,
    acks: usize,
    round: usize,
    acked: &mut HashMap<(String, u64), Bytes>,
    epochs: &mut HashMap<String, Epoch>,
) {
    let (mut child, addr) = start_router(data, writer);
    let connector = Connector::new(&data.join("tls/ca.pem"), "localhost").unwrap();
    let (client, _deliveries) = connector
        .connect(
            addr,
            Session::new(format!("crash-{round}"), Role::Controller, SWARMS),
        )
        .await
        .unwrap();
    let mut in_flight = std::collections::VecDeque::new();
    let mut got = 0;
    let mut n = 0u64;
    while got < acks {
        let swarm = SWARMS[(n % 2) as usize];
        let payload = Bytes::from(format!(
            "round {round} message {n} {}",
            "x".repeat((n % 50) as usize)
        ));
        let pending = client
            .publish_start(
                swarm,
                Class::Command,
                payload.clone(),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        in_flight.push_back((swarm, payload, pending));
        n += 1;
        if in_flight.len() >= 32 {
            let (swarm, payload, pending) = in_flight.pop_front().unwrap();
            let receipt = pending.wait_receipt().await.unwrap();
            let epoch = epochs.entry(swarm.to_owned()).or_insert(receipt.epoch);
            assert_eq!(
                *epoch, receipt.epoch,
                "{swarm}: epoch changed across restarts"
            );
            acked.insert((swarm.to_owned(), receipt.op_id.0), payload);
            got += 1;
        }
    }
    // Kill with 32 publishes in flight: some may be durable but unacknowledged, which is
    // allowed; none acknowledged may be missing.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(client);
}

/// Every record of every swarm in the log, as (swarm, op) -> payload, checking the op ids of
/// each swarm run 1, 2, 3, ... with no gap.
fn read_log(data: &Path) -> HashMap<(String, u64), Bytes> {
    let (logs, notes) = recover_all(&data.join("log")).unwrap();
    for note in &notes {
        assert!(
            note.detail.contains("torn tail"),
            "unexpected damage: {note:?}"
        );
    }
    let mut out = HashMap::new();
    for log in logs {
        assert!(log.unavailable.is_none(), "{:?}", log.unavailable);
        let records = log.read_from(OpId(1), usize::MAX, usize::MAX).unwrap();
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.op, OpId(i as u64 + 1), "gap in {}", log.name);
            assert_eq!(record.epoch, log.epoch);
            let mut decoder = FrameDecoder::new(1 << 20);
            decoder.push(record.frame.clone());
            let Some(Message::Deliver(deliver)) =
                decoder.next_message(&DecodeOptions::default()).unwrap()
            else {
                panic!(
                    "record {} of {} is not a Deliver frame",
                    record.op.0, log.name
                );
            };
            assert_eq!(deliver.op_id, record.op);
            out.insert((log.name.clone(), record.op.0), deliver.payload);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_sigkill_and_op_ids_continue() {
    // `auto` is io_uring where the kernel allows it; `file` is the plain writer.
    for writer in ["auto", "file"] {
        crash_rounds(writer).await;
    }
}

async fn crash_rounds(writer: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut acked = HashMap::new();
    let mut last_ops: HashMap<String, u64> = HashMap::new();
    let mut epochs: HashMap<String, Epoch> = HashMap::new();
    for (round, kill_after) in [40usize, 300, 7, 150].into_iter().enumerate() {
        publish_then_kill(data, writer, kill_after, round, &mut acked, &mut epochs).await;
        let stored = read_log(data);
        for (key, payload) in &acked {
            assert_eq!(
                stored.get(key),
                Some(payload),
                "acknowledged op {key:?} lost (round {round})"
            );
        }
        // Ops never go backwards across restarts: this round's ops follow the last round's.
        for swarm in SWARMS {
            let max = stored
                .keys()
                .filter(|(s, _)| s == swarm)
                .map(|(_, op)| *op)
                .max()
                .unwrap_or(0);
            let before = last_ops.get(swarm).copied().unwrap_or(0);
            assert!(
                max >= before,
                "{swarm}: log shrank from op {before} to {max}"
            );
            last_ops.insert(swarm.to_owned(), max);
        }
    }
    // After the last kill, the restarted router continues right after the last stored op.
    let (mut child, addr) = start_router(data, writer);
    let connector = Connector::new(&data.join("tls/ca.pem"), "localhost").unwrap();
    let (client, _d) = connector
        .connect(addr, Session::new("after", Role::Controller, SWARMS))
        .await
        .unwrap();
    for swarm in SWARMS {
        let op = tokio::time::timeout(
            Duration::from_secs(10),
            client.publish(
                swarm,
                Class::Command,
                Bytes::from_static(b"after"),
                PublishOptions::default(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            op,
            OpId(last_ops[swarm] + 1),
            "{swarm}: gap or reuse after restart"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn clients_of_a_crashed_router_are_told_by_the_restarted_one() {
    // The stateless reset key lives in the data dir: the restarted process resets the
    // connections of the one that crashed at their next packet (a keep-alive within 5 s),
    // so clients reconnect long before their 30 s idle timeout.
    /// Kills the router child however the test ends.
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (child, addr) = start_router(data, "auto");
    let first = Killed(child);
    let connector = Connector::new(&data.join("tls/ca.pem"), "localhost").unwrap();
    let (client, _d) = connector
        .connect(addr, Session::new("survivor", Role::Agent, ["s"]))
        .await
        .unwrap();
    drop(first);
    let mut restarted = None;
    for _ in 0..50 {
        // The port is free once the process is gone; the kernel may take a moment.
        let attempt = std::panic::catch_unwind(|| start_router_on(data, "auto", &addr.to_string()));
        if let Ok(started) = attempt {
            restarted = Some(started);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (child, _) = restarted.expect("the router restarts on the same address");
    let _second = Killed(child);
    let closed = tokio::time::timeout(Duration::from_secs(20), client.closed())
        .await
        .expect("the client learns of the restart well before its 30 s idle timeout");
    // Told by the new process (a stateless reset, which the client may see as its own
    // close racing it), not by the idle timeout.
    assert!(
        matches!(&closed, swarmbus_client::ClientError::Closed { reason, .. } if !reason.contains("timed out")),
        "{closed}"
    );
}
