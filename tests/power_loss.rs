//! Power loss under a live router, on a [`FaultDisk`]: the power is cut while acknowledged
//! commands stream in, everything not fsynced is discarded (in some rounds with the first
//! unsynced page torn), and a new router starts on what remains. Every acknowledged op
//! survives with its payload, every op a subscriber was delivered survives (nothing
//! undurable is ever delivered), and op ids are never given out twice. With both writers,
//! and, to show the check can fail, with `log.sync = "never_danger"`, which loses
//! acknowledged ops at the first power loss.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{ClientError, PublishOptions, Receipt, Session};
use swarmbus_router::log::disk::FaultDisk;
use swarmbus_router::log::{SyncPolicy, WriterKind};
use swarmbus_router::Config;
use swarmbus_schema::{Class, Epoch, ResumePoint, Role};

use crate::common::TestRouter;

const SWARMS: [&str; 2] = ["power-a", "power-b"];
/// Publishes kept in flight: the cut always finds some of them unacknowledged.
const WINDOW: usize = 32;

fn config(data: &Path, writer: WriterKind, sync: SyncPolicy) -> Config {
    let mut config = crate::common::config_in(data);
    config.shards = 2;
    config.log.writer = writer;
    config.log.sync = sync;
    // Small segments: cuts land before, at and after segment rolls.
    config.log.segment_bytes = 8 << 10;
    config.presence.heartbeat_timeout_ms = 60_000;
    config
}

/// What the test knows across rounds: per swarm, op -> payload.
#[derive(Default)]
struct Known {
    /// Acknowledged to the publisher.
    acked: HashMap<String, BTreeMap<u64, Bytes>>,
    /// Delivered to the subscriber before a power loss.
    delivered: HashMap<String, BTreeMap<u64, Bytes>>,
    /// What a restarted router served (all of it durable by then).
    stored: HashMap<String, BTreeMap<u64, Bytes>>,
    epochs: HashMap<String, Epoch>,
    /// Bytes the power losses discarded, over all rounds.
    discarded: u64,
}

impl Known {
    /// Records an acknowledged publish.
    fn settle(&mut self, swarm: &str, payload: Bytes, result: Result<Receipt, ClientError>) {
        if let Ok(receipt) = result {
            self.acked
                .entry(swarm.to_owned())
                .or_default()
                .insert(receipt.op_id.0, payload);
        }
    }
}

/// What one round found missing or changed (empty: every guarantee held).
#[derive(Debug, Default)]
struct Violations {
    lost_acked: Vec<(String, u64)>,
    lost_delivered: Vec<(String, u64)>,
    changed: Vec<(String, u64)>,
    gaps: Vec<(String, u64)>,
    reused: Vec<(String, u64)>,
    epoch_changed: Vec<String>,
}

impl Violations {
    fn is_empty(&self) -> bool {
        self.lost_acked.is_empty()
            && self.lost_delivered.is_empty()
            && self.changed.is_empty()
            && self.gaps.is_empty()
            && self.reused.is_empty()
            && self.epoch_changed.is_empty()
    }
}

/// Reads everything the router holds (from op 1, through a resuming subscriber) and checks
/// it against what was acknowledged and delivered before; then streams commands with
/// `WINDOW` in flight and cuts the power after `cut_after` acknowledgements.
async fn round(
    data: &Path,
    writer: WriterKind,
    sync: SyncPolicy,
    seed: u64,
    cut_after: usize,
    tear: bool,
    known: &mut Known,
) -> Round {
    let faults = FaultDisk::new(seed);
    let t = TestRouter::start_on_disk(config(data, writer, sync), faults.clone()).await;
    let (ctl, _c) = t.connect("ctl", Role::Controller, &SWARMS).await;
    let mut session = Session::new("agent", Role::Agent, SWARMS);
    session.resume = known
        .epochs
        .iter()
        .map(|(swarm, epoch)| ResumePoint {
            swarm: swarm.clone(),
            class: Class::Command,
            epoch: *epoch,
            last_applied: swarmbus_schema::OpId(0),
        })
        .collect();
    let (agent, mut deliveries) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .expect("agent connects");
    for swarm in SWARMS {
        agent.subscribe(swarm, Class::Command, None).await.unwrap();
    }

    let mut violations = Violations::default();
    // What the restarted router serves: everything up to a marker published now.
    let mut markers = HashMap::new();
    for swarm in SWARMS {
        let receipt = ctl
            .publish_start(
                swarm,
                Class::Command,
                Bytes::from_static(b"marker"),
                PublishOptions::default(),
            )
            .await
            .unwrap()
            .wait_receipt()
            .await
            .expect("the marker is acknowledged");
        markers.insert(swarm.to_owned(), receipt.op_id.0);
        let epoch = *known
            .epochs
            .entry(swarm.to_owned())
            .or_insert(receipt.epoch);
        if epoch != receipt.epoch {
            violations.epoch_changed.push(swarm.to_owned());
        }
    }
    let mut served: HashMap<String, BTreeMap<u64, Bytes>> = HashMap::new();
    let mut open: Vec<&str> = SWARMS.to_vec();
    while !open.is_empty() {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
            .await
            .expect("the log is served within 10 s")
            .expect("the agent stays connected");
        if d.epoch != known.epochs[&d.swarm] {
            violations.epoch_changed.push(d.swarm.clone());
        }
        if markers.get(&d.swarm) == Some(&d.op_id.0) {
            open.retain(|s| *s != d.swarm);
        }
        served
            .entry(d.swarm)
            .or_default()
            .insert(d.op_id.0, d.payload);
    }
    for swarm in SWARMS {
        let served = served.remove(swarm).unwrap_or_default();
        let marker = markers[swarm];
        // Gap-free from op 1 to the marker.
        for op in 1..marker {
            if !served.contains_key(&op) {
                violations.gaps.push((swarm.to_owned(), op));
            }
        }
        let mut check = |expected: Option<&BTreeMap<u64, Bytes>>, lost: &mut Vec<_>| {
            for (op, payload) in expected.into_iter().flatten() {
                match served.get(op) {
                    Some(got) if got == payload => {}
                    Some(_) => violations.changed.push((swarm.to_owned(), *op)),
                    None => lost.push((swarm.to_owned(), *op)),
                }
            }
        };
        let mut lost = Vec::new();
        check(known.acked.get(swarm), &mut lost);
        violations.lost_acked.append(&mut lost);
        check(known.delivered.get(swarm), &mut lost);
        violations.lost_delivered.append(&mut lost);
        check(known.stored.get(swarm), &mut lost);
        // A stored op gone means its id comes again: reused.
        violations.reused.append(&mut lost);
        known.stored.insert(swarm.to_owned(), served);
    }

    // Stream commands; a task records what the agent is delivered.
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let delivered = delivered.clone();
        tokio::spawn(async move {
            while let Some(d) = deliveries.recv().await {
                delivered.lock().unwrap().push(d);
            }
        })
    };
    let mut in_flight = std::collections::VecDeque::new();
    let mut acks = 0;
    let mut n = 0u64;
    // Slow syncs: the cut lands between a batch's write and its sync's return.
    faults.slow_syncs(Duration::from_millis(5));
    while acks < cut_after {
        let swarm = SWARMS[(n % 2) as usize];
        let payload = Bytes::from(format!(
            "seed {seed} message {n} {}",
            "x".repeat((n * 37 % 300) as usize)
        ));
        let pending = ctl
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
        if in_flight.len() >= WINDOW {
            let (swarm, payload, pending) = in_flight.pop_front().unwrap();
            let result = pending.wait_receipt().await;
            assert!(result.is_ok(), "refused before the cut: {result:?}");
            known.settle(swarm, payload, result);
            acks += 1;
        }
    }
    let loss = tokio::task::spawn_blocking(move || faults.power_loss(tear))
        .await
        .unwrap();
    // Those in flight at the cut: acknowledged only if durable before it.
    for (swarm, payload, pending) in in_flight {
        let result = tokio::time::timeout(Duration::from_secs(10), pending.wait_receipt())
            .await
            .expect("an in-flight publish is answered");
        known.settle(swarm, payload, result);
    }
    known.discarded += loss.bytes_discarded;
    let writer = t.router.writer_kind();
    drop(ctl);
    drop(agent);
    let _stopped = t.router.shutdown().await;
    recorder.abort();
    for d in delivered.lock().unwrap().drain(..) {
        known
            .delivered
            .entry(d.swarm)
            .or_default()
            .insert(d.op_id.0, d.payload);
    }
    Round {
        found: violations,
        loss,
        writer,
    }
}

/// What a round found of the power loss before it, what its own cut discarded, and the
/// writer that ran.
struct Round {
    found: Violations,
    loss: swarmbus_router::log::disk::PowerLoss,
    writer: WriterKind,
}

fn cuts() -> [(usize, bool); 5] {
    [(5, false), (120, true), (40, false), (300, true), (1, true)]
}

async fn power_loss_rounds(writer: WriterKind) {
    let dir = tempfile::tempdir().unwrap();
    let mut known = Known::default();
    let mut torn = 0;
    for (i, (cut_after, tear)) in cuts().into_iter().enumerate() {
        let Round {
            found,
            loss,
            writer: ran,
        } = round(
            dir.path(),
            writer,
            SyncPolicy::Always,
            i as u64,
            cut_after,
            tear,
            &mut known,
        )
        .await;
        assert!(
            found.is_empty(),
            "{writer}, round {i} found what the power loss before it broke: {found:?}"
        );
        torn += loss.pages_torn;
        if writer == WriterKind::Auto && ran != WriterKind::Uring && i == 0 {
            eprintln!("io_uring is unavailable here: the plain writer ran instead");
        }
    }
    // The last power loss, checked by one more start.
    let found = round(
        dir.path(),
        writer,
        SyncPolicy::Always,
        99,
        1,
        false,
        &mut known,
    )
    .await
    .found;
    assert!(found.is_empty(), "{writer}, last check: {found:?}");
    let acked: usize = known.acked.values().map(BTreeMap::len).sum();
    assert!(acked > 450, "{acked} acknowledged in all");
    assert!(
        known.discarded > 0,
        "the cuts found written, unsynced bytes to discard"
    );
    // Syncs are slowed, so a cut mostly finds a batch written and not yet durable; a cut
    // may also fall while the writer waits for work, with nothing to tear.
    assert!(torn > 0, "{writer}: no torn round tore a page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_power_loss_with_the_io_uring_writer() {
    // `auto`: io_uring where the kernel allows it, else the plain writer (logged).
    power_loss_rounds(WriterKind::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_power_loss_with_the_file_writer() {
    power_loss_rounds(WriterKind::File).await;
}

/// The same check catches what `never_danger` risks: acknowledged ops gone after power
/// loss, their ids given out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_danger_loses_acknowledged_commands_at_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut known = Known::default();
    let sync = SyncPolicy::NeverDanger;
    let first = round(dir.path(), WriterKind::File, sync, 1, 50, false, &mut known)
        .await
        .found;
    assert!(first.is_empty(), "nothing was lost before: {first:?}");
    let second = round(dir.path(), WriterKind::File, sync, 2, 1, false, &mut known)
        .await
        .found;
    assert!(
        !second.lost_acked.is_empty(),
        "acknowledged, never synced, lost: {second:?}"
    );
}
