//! Event log faults under a live router: a disk that refuses writes for a while, and one
//! that does not answer.
//!
//! The faults: directories stand where the swarm's next segment files would be created, so
//! the writer's open of the next segment fails (EISDIR) exactly as on a disk that refuses
//! new files, until the test removes them; a FIFO stands where a file is read or created,
//! so opening it blocks until the test opens its other end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use swarmbus_client::{Client, PublishOptions};
use swarmbus_router::log::disk::{FaultDisk, WriteFault};
use swarmbus_router::log::WriterKind;
use swarmbus_router::Config;
use swarmbus_schema::{Class, OpId, Role};

use crate::common::TestRouter;

fn config(data: &Path) -> Config {
    let mut config = crate::common::config_in(data);
    config.shards = 1;
    config.log.segment_bytes = 4096;
    config.presence.heartbeat_timeout_ms = 60_000;
    config
}

/// Blocks the creation of segments starting at ops 2..=limit of `swarm`.
pub(crate) fn block_new_segments(data: &Path, swarm: &str, limit: u64) -> Vec<PathBuf> {
    let dir = data
        .join("log")
        .join(swarmbus_router::log::store::swarm_dir_name(swarm));
    (2..=limit)
        .map(|op| dir.join(format!("{op:020}.log")))
        .inspect(|path| std::fs::create_dir(path).unwrap())
        .collect()
}

async fn command(client: &Client, text: String) -> Result<OpId, swarmbus_client::ClientError> {
    client
        .publish(
            "s",
            Class::Command,
            Bytes::from(text),
            PublishOptions::default(),
        )
        .await
}

/// A failed append refuses that batch with SwarmUnavailable; once the disk takes writes
/// again the swarm recovers by itself, op ids continue past the refused ones (never given
/// out twice), nothing refused is ever delivered or read back, and a restart finds the log
/// undamaged.
#[tokio::test]
async fn a_swarm_recovers_by_itself_when_the_disk_takes_writes_again() {
    let data = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(config(data.path())).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut rx) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let mut acked = vec![command(&ctl, "ok-0".into()).await.unwrap()];
    let blocked = block_new_segments(data.path(), "s", 400);

    // Fill the first segment until the roll to a new one fails.
    let mut refused = None;
    for i in 1..400 {
        match command(&ctl, format!("ok-{i}")).await {
            Ok(op) => acked.push(op),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    let refused = refused.expect("an append into a new segment fails");
    assert_eq!(refused.code(), Some(19), "SwarmUnavailable: {refused}");
    // Refused while the disk refuses; the router carries on (other work is unaffected).
    let again = command(&ctl, "refused".into()).await.unwrap_err();
    assert_eq!(again.code(), Some(19), "{again}");
    assert!(t.router.stats().log_write_failures >= 1);
    assert_eq!(t.router.stats().log_unavailable_swarms, 1);

    for path in &blocked {
        std::fs::remove_dir(path).unwrap();
    }
    // It recovers by itself within its backoff (tries 100 ms, 200 ms, ... apart).
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovered_op = loop {
        match command(&ctl, "after".into()).await {
            Ok(op) => break op,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(error.code(), Some(19), "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the swarm did not recover: {error}"),
        }
    };
    let last_acked = *acked.last().unwrap();
    assert!(
        recovered_op.0 > last_acked.0 + 1,
        "refused op ids given out again: {recovered_op:?} after {last_acked:?}"
    );
    assert_eq!(t.router.stats().log_recoveries, 1);
    assert_eq!(t.router.stats().log_unavailable_swarms, 0);

    // The subscriber gets every acknowledged command in order, then the one after the
    // recovery, and nothing that was refused.
    let mut expected: Vec<(u64, String)> = acked
        .iter()
        .enumerate()
        .map(|(i, op)| (op.0, format!("ok-{i}")))
        .collect();
    expected.push((recovered_op.0, "after".into()));
    let got = crate::common::recv_n(&mut rx, expected.len()).await;
    let got: Vec<(u64, String)> = got
        .iter()
        .map(|d| (d.op_id.0, String::from_utf8_lossy(&d.payload).into_owned()))
        .collect();
    assert_eq!(got, expected);
    drop((ctl, agent, rx));

    // After a restart: nothing damaged, nothing refused read back, op ids continue.
    let TestRouter { router, .. } = t;
    router.shutdown().await;
    let (logs, notes) = swarmbus_router::log::recover_all(&data.path().join("log")).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    let log = logs.iter().find(|l| l.name == "s").unwrap();
    assert!(log.unavailable.is_none());
    let stored: Vec<(u64, Bytes)> = log
        .read_from(OpId(1), usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.op.0, r.frame))
        .collect();
    let ops: Vec<u64> = stored.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, (1..=recovered_op.0).collect::<Vec<_>>(), "gap-free");
    for (op, frame) in &stored {
        let text = String::from_utf8_lossy(frame);
        assert!(
            !text.contains("refused"),
            "op {op}: refused bytes read back"
        );
        if !acked.iter().any(|a| a.0 == *op) && *op != recovered_op.0 {
            assert!(frame.is_empty(), "op {op} was refused but holds a frame");
        }
    }
    let t = TestRouter::start_on(config(data.path())).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    let next = command(&ctl, "restarted".into()).await.unwrap();
    assert_eq!(next.0, recovered_op.0 + 1);
    t.router.shutdown().await;
}

/// What fails in the middle of a group commit.
#[derive(Clone, Copy, Debug)]
enum MidBatch {
    /// The batch's first file write goes through, the next ones fail so.
    Write(WriteFault),
    /// Every sync fails with EIO.
    Sync,
}

/// Publishes `count` commands at once, alternating between the swarms; records each
/// acknowledged one (swarm -> (op, payload)) and each refused payload (SwarmUnavailable
/// only). Returns how many were refused.
async fn burst(
    ctl: &Client,
    tag: &str,
    count: usize,
    acked: &mut HashMap<String, Vec<(u64, Bytes)>>,
    refused: &mut Vec<Bytes>,
) -> usize {
    let mut pending = Vec::new();
    for i in 0..count {
        let swarm = ["s1", "s2"][i % 2];
        let payload = Bytes::from(format!("{tag}-{i}-{swarm}"));
        let started = ctl
            .publish_start(
                swarm,
                Class::Command,
                payload.clone(),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        pending.push((swarm, payload, started));
    }
    let mut refusals = 0;
    for (swarm, payload, started) in pending {
        match started.wait_receipt().await {
            Ok(receipt) => acked
                .entry(swarm.to_owned())
                .or_default()
                .push((receipt.op_id.0, payload)),
            Err(error) => {
                assert_eq!(error.code(), Some(19), "SwarmUnavailable: {error}");
                refused.push(payload);
                refusals += 1;
            }
        }
    }
    refusals
}

/// A batch that fails part way (ENOSPC, EIO, a short write, a failing fsync) is refused
/// whole for its swarm: none of it is delivered or read back, even the bytes a short write
/// left; the swarms recover by themselves once the disk does, and a restart finds the log
/// undamaged. With both writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_part_way_is_refused_whole_and_the_swarms_recover_with_the_disk() {
    for writer in [WriterKind::Auto, WriterKind::File] {
        for fault in [
            MidBatch::Write(WriteFault::NoSpace),
            MidBatch::Write(WriteFault::Io),
            MidBatch::Write(WriteFault::Short),
            MidBatch::Sync,
        ] {
            part_way_failure(writer, fault).await;
        }
    }
}

async fn part_way_failure(writer: WriterKind, fault: MidBatch) {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.log.writer = writer;
    config.log.segment_bytes = 64 << 10;
    let disk = FaultDisk::new(0);
    let t = TestRouter::start_on_disk(config.clone(), disk.clone()).await;
    let (ctl, _c) = t.connect("ctl", Role::Controller, &["s1", "s2"]).await;
    let (agent, mut rx) = t.connect("agent", Role::Agent, &["s1", "s2"]).await;
    for swarm in ["s1", "s2"] {
        agent.subscribe(swarm, Class::Command, None).await.unwrap();
    }
    let mut acked = HashMap::new();
    let mut refused = Vec::new();
    assert_eq!(burst(&ctl, "before", 40, &mut acked, &mut refused).await, 0);

    match fault {
        MidBatch::Write(fault) => disk.fail_writes_after(1, fault),
        MidBatch::Sync => disk.fail_syncs(),
    }
    let mut refusals = 0;
    for round in 0..20 {
        refusals += burst(
            &ctl,
            &format!("during-{round}"),
            64,
            &mut acked,
            &mut refused,
        )
        .await;
        if refusals > 0 {
            break;
        }
    }
    assert!(refusals > 0, "{writer} {fault:?}: nothing refused");
    assert!(disk.counts().injected > 0);

    disk.heal();
    // Each swarm recovers by itself within its backoff.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0;
    while ["s1", "s2"].iter().any(|s| {
        !acked[*s]
            .last()
            .is_some_and(|(_, p)| p.starts_with(b"after"))
    }) {
        assert!(
            Instant::now() < deadline,
            "{writer} {fault:?}: the swarms did not recover"
        );
        burst(&ctl, &format!("after-{round}"), 2, &mut acked, &mut refused).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(burst(&ctl, "final", 40, &mut acked, &mut refused).await, 0);
    let stats = t.router.stats();
    assert!(stats.log_write_failures >= 1, "{stats:?}");
    assert_eq!(stats.log_unavailable_swarms, 0);

    // Delivered: exactly what was acknowledged, in op order per swarm.
    let total: usize = acked.values().map(Vec::len).sum();
    let got = crate::common::recv_n(&mut rx, total).await;
    for swarm in ["s1", "s2"] {
        let mut expected = acked[swarm].clone();
        expected.sort();
        let delivered: Vec<(u64, Bytes)> = got
            .iter()
            .filter(|d| d.swarm == swarm)
            .map(|d| (d.op_id.0, d.payload.clone()))
            .collect();
        assert_eq!(delivered, expected, "{writer} {fault:?} {swarm}");
    }
    drop((ctl, agent, rx));
    let TestRouter { router, .. } = t;
    router.shutdown().await;

    // Nothing damaged after a restart; no refused byte read back, a short write's included.
    let (logs, notes) = swarmbus_router::log::recover_all(&data.path().join("log")).unwrap();
    assert!(notes.is_empty(), "{writer} {fault:?}: {notes:?}");
    for swarm in ["s1", "s2"] {
        let log = logs.iter().find(|l| l.name == swarm).unwrap();
        assert!(log.unavailable.is_none());
        let stored = log.read_from(OpId(1), usize::MAX, usize::MAX).unwrap();
        let ops: Vec<u64> = stored.iter().map(|r| r.op.0).collect();
        assert_eq!(ops, (1..=ops.len() as u64).collect::<Vec<_>>(), "gap-free");
        for record in &stored {
            for payload in &refused {
                assert!(
                    !record
                        .frame
                        .windows(payload.len())
                        .any(|w| w == payload.as_ref()),
                    "{writer} {fault:?}: refused {payload:?} read back at op {}",
                    record.op.0
                );
            }
        }
    }
}

/// A job's end is announced only once its record is durable: while the job log refuses
/// writes the submitter hears nothing and the worker's finish is not answered; once the
/// disk takes writes again the end is written, announced once, and the worker answered.
#[tokio::test]
async fn a_job_end_is_announced_only_once_durable() {
    use swarmbus_client::JobDedup;
    use swarmbus_schema::{JobState, SubmitJob};
    let data = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(config(data.path())).await;
    let (agent, _d) = t.connect("agent", Role::Agent, &["s"]).await;
    let mut updates = agent.job_updates().unwrap();
    // A spec of ~4 KB fills the job log's first 4 KiB segment: the next record rolls.
    let submit = SubmitJob {
        swarm: "s".into(),
        idempotency_key: "k".into(),
        payload: Bytes::from(vec![b'p'; 4_000]),
        ..SubmitJob::default()
    };
    let accepted = agent.submit_job(submit).await.unwrap();
    let job_log = swarmbus_proto::jobs::log_swarm("s");
    let blocked = block_new_segments(data.path(), &job_log, 100);

    let (worker, _w) = t.connect("gpu", Role::Worker, &["s"]).await;
    let mut events = worker.job_events().unwrap();
    worker.set_job_credits(1).await.unwrap();
    let lease = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("a lease")
            .expect("worker connected");
        if let swarmbus_client::JobEvent::Lease(lease) = event {
            break lease;
        }
    };
    assert_eq!(lease.job_id, accepted.job_id);
    let finishing = tokio::spawn(async move {
        let status = worker
            .finish_job(
                lease.job_id,
                lease.attempt,
                true,
                false,
                Bytes::from_static(b"result"),
            )
            .await;
        (worker, status)
    });
    // Not durable, so not announced.
    let early = tokio::time::timeout(Duration::from_millis(1_500), async {
        loop {
            match updates.recv().await {
                Some(update) if update.state.is_final() => return update,
                Some(_) => {}
                None => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(
        early.is_err(),
        "a job end announced before it was durable: {early:?}"
    );
    assert!(
        !finishing.is_finished(),
        "the worker was answered before the end was durable"
    );

    for path in &blocked {
        std::fs::remove_dir(path).unwrap();
    }
    let mut dedup = JobDedup::default();
    let end = loop {
        let update = tokio::time::timeout(Duration::from_secs(20), updates.recv())
            .await
            .expect("the end after the disk recovered")
            .expect("submitter connected");
        if update.state.is_final() && dedup.first_time(&update) {
            break update;
        }
    };
    assert_eq!(end.state, JobState::Completed);
    assert_eq!(end.payload.as_ref(), b"result");
    let (_worker, status) = tokio::time::timeout(Duration::from_secs(10), finishing)
        .await
        .expect("the worker is answered")
        .unwrap();
    assert_eq!(status.unwrap().state, JobState::Completed);
    t.router.shutdown().await;
}

/// Makes `path` a FIFO: opening it blocks until the other end is opened, as a read or a
/// file creation on a disk that does not answer. Returns what stood there.
fn stall_at(path: &Path) -> Option<PathBuf> {
    let moved = path.with_extension("moved");
    let had = std::fs::rename(path, &moved).is_ok().then_some(moved);
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
    had
}

/// Opens the other end of the FIFO at `path` without waiting (so a stalled open goes on,
/// and finds the FIFO empty or closed), then puts back what stood there. Returns whether
/// the router had the FIFO open to write (a read end opens without a writer, so for a
/// stalled read it is `true` when the router was there to be let go).
fn unstall(path: &Path, had: Option<PathBuf>, stalled_opens_for_reading: bool) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.custom_flags(libc::O_NONBLOCK);
    if stalled_opens_for_reading {
        // Fails (ENXIO) unless a reader, the stalled open, is there.
        options.write(true);
    } else {
        options.read(true);
    }
    let opened = options.open(path).is_ok();
    // The stalled side sees the other end close: its read ends, its write fails.
    std::thread::sleep(Duration::from_millis(50));
    std::fs::remove_file(path).unwrap();
    if let Some(had) = had {
        std::fs::rename(had, path).unwrap();
    }
    opened
}

fn segment_of(data: &Path, swarm: &str, first_op: u64) -> PathBuf {
    data.join("log")
        .join(swarmbus_router::log::store::swarm_dir_name(swarm))
        .join(format!("{first_op:020}.log"))
}

/// A log read that blocks (a slow disk, a long catch-up) holds up only the request that
/// needs it: the shard's other swarms go on. Here one shard holds both swarms and a delta
/// read of "s" waits on a file that does not answer, while commands to "t" are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_read_does_not_hold_up_the_shard() {
    let data = tempfile::tempdir().unwrap();
    let t = TestRouter::start_on(config(data.path())).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s", "t"]).await;
    for i in 0..3 {
        command(&ctl, format!("s-{i}")).await.unwrap();
    }
    let segment = segment_of(data.path(), "s", 1);
    let had = stall_at(&segment);
    let (agent, _rx) = t.connect("agent", Role::Agent, &["s"]).await;
    let reading = tokio::spawn(async move { agent.delta("s", OpId(1), OpId(3)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other_swarm = tokio::time::timeout(
        Duration::from_secs(10),
        ctl.publish(
            "t",
            Class::Command,
            Bytes::from_static(b"t-0"),
            PublishOptions::default(),
        ),
    )
    .await;
    assert!(
        unstall(&segment, had, true),
        "the delta never read the file"
    );
    assert!(
        matches!(other_swarm, Ok(Ok(_))),
        "a command to another swarm waited for the stalled read: {other_swarm:?}"
    );
    // The stalled read ends (the FIFO gives no records) and the swarm is read again as
    // it is.
    let _ = tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the stalled delta is answered");
    let (agent, _rx) = t.connect("agent2", Role::Agent, &["s"]).await;
    let ack = agent.delta("s", OpId(1), OpId(3)).await.unwrap();
    assert_eq!(ack.count, 3);
    t.router.shutdown().await;
}

/// A writer that cannot take more (its queue full behind a file creation that does not
/// answer) holds back only appends: the shard holds them in order and goes on serving its
/// other work (here a subscription to another swarm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writer_queue_does_not_hold_up_the_shard() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.log.writer_queue = 4;
    let t = TestRouter::start_on(config).await;
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s", "t"]).await;
    // The first segment of "s" is a FIFO: the writer's open of it stalls.
    let segment = segment_of(data.path(), "s", 1);
    std::fs::create_dir_all(segment.parent().unwrap()).unwrap();
    let had = stall_at(&segment);
    // Sent, not waited for: their acknowledgements wait for the writer.
    let mut publishing = Vec::new();
    for i in 0..400 {
        let payload = Bytes::from(format!("{i}-{}", "x".repeat(200)));
        let options = PublishOptions::default();
        publishing.push(
            ctl.publish_start("s", Class::Command, payload, options)
                .await,
        );
    }
    let (agent, _rx) = t.connect("agent", Role::Agent, &["t"]).await;
    let subscribed = tokio::time::timeout(
        Duration::from_secs(10),
        agent.subscribe("t", Class::Command, None),
    )
    .await;
    unstall(&segment, had, false);
    assert!(
        matches!(subscribed, Ok(Ok(()))),
        "a subscription waited for the writer: {subscribed:?}"
    );
    drop(publishing);
    t.router.shutdown().await;
}
