//! Log tests, run against both writer backends where the kernel allows io_uring.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use swarmbus_schema::{Class, Epoch, OpId};
use tokio::sync::mpsc;

use super::*;
use crate::log::compact;

/// The next log event, failing the test instead of hanging when none comes.
fn next_event(events: &mut mpsc::UnboundedReceiver<LogEvent>) -> LogEvent {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match events.try_recv() {
            Ok(event) => return event,
            Err(mpsc::error::TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(error) => panic!("no log event within 20 s: {error}"),
        }
    }
}

fn kinds() -> Vec<WriterKind> {
    let mut kinds = vec![WriterKind::File];
    if writer_probe() {
        kinds.push(WriterKind::Uring);
    } else {
        eprintln!("io_uring is unavailable here: only the plain file writer is tested");
    }
    kinds
}

fn writer_probe() -> bool {
    let (tx, _rx) = mpsc::unbounded_channel();
    LogWriter::start(
        WriterKind::Uring,
        SyncPolicy::Always,
        16,
        vec![tx],
        None,
        disk::Disk::real(),
    )
    .is_ok()
}

fn record(epoch: Epoch, op: u64, payload: &str) -> RecordParts {
    encode_record(
        epoch,
        OpId(op),
        0,
        Class::Command,
        format!("key-{}", op % 3).as_bytes(),
        Bytes::from_static(b"H"),
        Bytes::from(payload.to_owned()),
    )
}

/// Appends ops 1..=n to `swarm` and waits until all are durable.
fn append_all(
    log: &mut ShardLog,
    events: &mut mpsc::UnboundedReceiver<LogEvent>,
    swarm: &Arc<str>,
    epoch: Epoch,
    from: u64,
    to: u64,
) {
    for op in from..=to {
        log.append(swarm, OpId(op), record(epoch, op, &format!("payload-{op}")))
            .unwrap();
    }
    let mut durable = OpId(0);
    while durable < OpId(to) {
        match next_event(events) {
            LogEvent::Durable { swarm: s, up_to } if s == *swarm => {
                log.on_durable(&s, up_to);
                durable = durable.max(up_to)
            }
            LogEvent::Durable { .. } => {}
            LogEvent::Failed { detail, .. } => panic!("append failed: {detail}"),
            LogEvent::Compacted { .. } => panic!("no compaction was asked for"),
            other => panic!("the embedded log reported {other:?}"),
        }
    }
}

fn open(
    dir: &std::path::Path,
    kind: WriterKind,
    segment_bytes: u64,
) -> (
    ShardLog,
    mpsc::UnboundedReceiver<LogEvent>,
    Vec<RecoveryNote>,
) {
    open_with(dir, kind, segment_bytes, Retention::default())
}

fn open_with(
    dir: &std::path::Path,
    kind: WriterKind,
    segment_bytes: u64,
    retention: Retention,
) -> (
    ShardLog,
    mpsc::UnboundedReceiver<LogEvent>,
    Vec<RecoveryNote>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = LogWriter::start(
        kind,
        SyncPolicy::Always,
        1024,
        vec![tx.clone()],
        None,
        disk::Disk::real(),
    )
    .unwrap();
    assert_eq!(writer.kind(), kind);
    let (logs, notes) = recover_all(dir).unwrap();
    (
        ShardLog::new(0, dir, segment_bytes, writer, logs, retention, tx),
        rx,
        notes,
    )
}

fn state(log: &ShardLog, swarm: &str) -> LogState {
    log.swarms()
        .into_iter()
        .find(|(n, _)| &**n == swarm)
        .expect("swarm recovered")
        .1
}

#[test]
fn appends_survive_reopen_and_read_back_across_segments() {
    for kind in kinds() {
        let dir = tempfile::tempdir().unwrap();
        let swarm: Arc<str> = "alpha/β".into();
        let epoch = Epoch(99);
        {
            // Tiny segments: every few records roll to a new file.
            let (mut log, mut events, _) = open(dir.path(), kind, 200);
            log.create(&swarm, epoch).unwrap();
            append_all(&mut log, &mut events, &swarm, epoch, 1, 150);
        }
        let (log, _events, notes) = open(dir.path(), kind, 200);
        assert!(notes.is_empty(), "{notes:?}");
        let s = state(&log, &swarm);
        assert_eq!(
            (s.epoch, s.last_op, s.unavailable),
            (epoch, OpId(150), None)
        );
        let all = log
            .read_from(&swarm, OpId(1), usize::MAX, usize::MAX)
            .unwrap();
        assert_eq!(all.len(), 150, "{kind:?}");
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.op, OpId(i as u64 + 1));
            assert_eq!(&r.frame[1..], format!("payload-{}", i + 1).as_bytes());
        }
        let some = log.read_from(&swarm, OpId(77), 5, usize::MAX).unwrap();
        assert_eq!(
            some.iter().map(|r| r.op.0).collect::<Vec<_>>(),
            vec![77, 78, 79, 80, 81]
        );
        let segments = std::fs::read_dir(dir.path().join(store::swarm_dir_name(&swarm)))
            .unwrap()
            .count();
        assert!(segments > 10, "expected many segments, found {segments}");
    }
}

/// Sets `swarm`'s durable watermark back to `op` (as a crash before the writer synced the
/// ops after it leaves it), once the writer wrote its own, past `op`.
fn set_watermark(dir: &std::path::Path, swarm: &str, op: u64) {
    let swarm_dir = dir.join(store::swarm_dir_name(swarm));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store::read_watermark(&swarm_dir, epoch_of(&swarm_dir)).is_none_or(|w| w.0 <= op) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer wrote no watermark"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(swarm_dir.join(store::WATERMARK_FILE)).unwrap();
    store::write_watermark(&swarm_dir, epoch_of(&swarm_dir), OpId(op), 0).unwrap();
}

/// The epoch of the swarm log in `swarm_dir`.
fn epoch_of(swarm_dir: &std::path::Path) -> Epoch {
    Epoch(
        std::fs::read_to_string(swarm_dir.join("epoch"))
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    )
}

/// Cuts the file at `path` to `len` bytes (what a crash leaves of a write).
fn cut_to(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Recovers the logs under `dir` and checks that `swarm` is refused; returns the notes.
fn reopen_unavailable(dir: &std::path::Path, swarm: &str) -> Vec<RecoveryNote> {
    let (log, _events, notes) = open(dir, WriterKind::File, 1024);
    assert!(state(&log, swarm).unavailable.is_some(), "{notes:?}");
    notes
}

/// Where each record of the segment at `path` starts and ends, with its op.
fn record_spans(path: &std::path::Path) -> Vec<(u64, usize, usize)> {
    let data = Bytes::from(std::fs::read(path).unwrap());
    let mut at = 0;
    let mut spans = Vec::new();
    while at < data.len() {
        let (record, used) = record::parse_record(&data.slice(at..)).unwrap();
        spans.push((record.op.0, at, at + used));
        at += used;
    }
    spans
}

fn segments_of(dir: &std::path::Path, swarm: &str) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(dir.join(store::swarm_dir_name(swarm)))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// 40 ops in segments of 1 KiB (20 records each), all durable; returns the segments.
fn forty_ops(dir: &std::path::Path, swarm: &Arc<str>) -> Vec<std::path::PathBuf> {
    ops_in_segments(dir, swarm, 40)
}

/// `n` ops in segments of 1 KiB (20 records each), all durable, the watermark at `n`.
fn ops_in_segments(dir: &std::path::Path, swarm: &Arc<str>, n: u64) -> Vec<std::path::PathBuf> {
    let (mut log, mut events, _) = open(dir, WriterKind::File, 1024);
    log.create(swarm, Epoch(3)).unwrap();
    append_all(&mut log, &mut events, swarm, Epoch(3), 1, n);
    drop(log);
    let segments = segments_of(dir, swarm);
    assert!(segments.len() >= 2, "{segments:?}");
    // The writer leaves its watermark at the last durable op (within 100 ms, or when it
    // stops).
    let swarm_dir = dir.join(store::swarm_dir_name(swarm));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store::read_watermark(&swarm_dir, Epoch(3)) != Some(OpId(n)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no watermark at op {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    segments
}

#[test]
fn bit_rot_in_the_last_acknowledged_record_makes_the_swarm_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "rot".into();
    let segments = forty_ops(dir.path(), &swarm);
    // Op 40 was synced and acknowledged; a bit of it rots on the disk.
    let last = segments.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    let end = bytes.len();
    bytes[end - 3] ^= 0x10;
    std::fs::write(last, bytes).unwrap();
    let (log, _events, notes) = open(dir.path(), WriterKind::File, 1024);
    let recovered = state(&log, &swarm);
    assert!(recovered.unavailable.is_some(), "{notes:?}");
    assert!(notes[0].detail.contains("acknowledged"), "{notes:?}");
    // Never given out again: the swarm takes no appends until the log is repaired.
    let mut log = log;
    assert!(matches!(
        log.append(&swarm, OpId(40), record(Epoch(3), 40, "x")),
        Err(LogError::Unavailable { .. })
    ));
}

#[test]
fn a_crash_during_a_segment_roll_is_cut_back_to_the_watermark() {
    for watermark in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let swarm: Arc<str> = "roll".into();
        let segments = forty_ops(dir.path(), &swarm);
        // The crash hit a batch that rolled: the old segment's last record is torn, the new
        // segment's records are on disk, nothing of the batch was synced.
        let old = &segments[segments.len() - 2];
        let spans = record_spans(old);
        let (torn_op, start, end) = *spans.last().unwrap();
        cut_to(old, ((start + end) / 2) as u64);
        if watermark {
            reopen_cut_back_to(dir.path(), &swarm, torn_op - 1);
            assert_eq!(segments_of(dir.path(), &swarm).len(), segments.len() - 1);
        } else {
            std::fs::remove_file(
                dir.path()
                    .join(store::swarm_dir_name(&swarm))
                    .join(store::WATERMARK_FILE),
            )
            .unwrap();
            // Without a watermark the router cannot tell this from damage: refused.
            reopen_unavailable(dir.path(), &swarm);
        }
    }
}

#[test]
fn a_short_segment_before_a_new_one_is_cut_back_to_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "short".into();
    let segments = forty_ops(dir.path(), &swarm);
    // The old segment's last record never reached the disk at all (cut at its start).
    let old = &segments[segments.len() - 2];
    let (lost_op, start, _) = *record_spans(old).last().unwrap();
    cut_to(old, start as u64);
    reopen_cut_back_to(dir.path(), &swarm, lost_op - 1);
}

/// Sets the watermark at `op` (where the crash left it), recovers, and checks that the
/// swarm's log was cut back to it and is served.
fn reopen_cut_back_to(dir: &std::path::Path, swarm: &str, op: u64) -> ShardLog {
    set_watermark(dir, swarm, op);
    let (log, _events, notes) = open(dir, WriterKind::File, 1024);
    let recovered = state(&log, swarm);
    assert_eq!(recovered.unavailable, None, "{notes:?}");
    assert_eq!(recovered.last_op, OpId(op));
    assert_eq!(read_ops(&log, swarm), (1..=op).collect::<Vec<_>>());
    log
}

#[test]
fn pages_written_back_out_of_order_are_cut_back_to_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "pages".into();
    let segments = forty_ops(dir.path(), &swarm);
    // A batch's later page reached the disk, an earlier one did not: a hole of zeros, then
    // valid records (ops 38..=40 of the last segment).
    let last = segments.last().unwrap();
    let spans = record_spans(last);
    let (hole_op, start, end) = spans[spans.len() - 3];
    let mut bytes = std::fs::read(last).unwrap();
    bytes[start..end].fill(0);
    std::fs::write(last, bytes).unwrap();
    reopen_cut_back_to(dir.path(), &swarm, hole_op - 1);
}

#[test]
fn damage_deep_in_the_log_past_a_stale_watermark_is_not_taken_for_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "stale".into();
    let segments = ops_in_segments(dir.path(), &swarm, 100);
    assert!(segments.len() >= 4, "{segments:?}");
    // A watermark left far behind (it lags, or a write of it failed) and a bit flip in the
    // second segment: not a write the crash cut short, so the segments after it stay and the
    // swarm is refused.
    set_watermark(dir.path(), &swarm, 10);
    let mut bytes = std::fs::read(&segments[1]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&segments[1], bytes).unwrap();
    reopen_unavailable(dir.path(), &swarm);
    assert_eq!(segments_of(dir.path(), &swarm), segments);
}

#[test]
fn without_watermarks_recovery_ignores_and_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "nomarks".into();
    let segments = forty_ops(dir.path(), &swarm);
    // The last record torn, a watermark that says it was acknowledged: under a policy that
    // keeps no watermark the shape decides (a torn tail), and the stale file goes.
    let last = segments.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    cut_to(last, len - 5);
    let (logs, notes) = store::recover_all_with(dir.path(), false).unwrap();
    let log = logs.iter().find(|l| l.name == *swarm).unwrap();
    assert_eq!(
        (log.unavailable.clone(), log.last_op()),
        (None, OpId(39)),
        "{notes:?}"
    );
    let swarm_dir = dir.path().join(store::swarm_dir_name(&swarm));
    assert!(!swarm_dir.join(store::WATERMARK_FILE).exists());
}

#[test]
fn a_log_whose_every_segment_is_gone_goes_on_after_its_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "emptied".into();
    // Retention removed the old segments and the crash came before the next one was on
    // disk: nothing is left but the watermark.
    for segment in forty_ops(dir.path(), &swarm) {
        std::fs::remove_file(segment).unwrap();
    }
    let (mut log, mut events, notes) = open(dir.path(), WriterKind::File, 1024);
    let recovered = state(&log, &swarm);
    assert_eq!(
        (recovered.unavailable, recovered.last_op),
        (None, OpId(40)),
        "{notes:?}"
    );
    assert_eq!(log.horizon(&swarm), OpId(40));
    append_all(&mut log, &mut events, &swarm, Epoch(3), 41, 45);
    assert_eq!(read_ops(&log, &swarm), (41..=45).collect::<Vec<_>>());
}

#[test]
fn an_internal_log_whose_every_segment_is_gone_is_unavailable() {
    // The router's own logs are never trimmed by retention: no segments is lost state.
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "$control".into();
    for segment in forty_ops(dir.path(), &swarm) {
        std::fs::remove_file(segment).unwrap();
    }
    reopen_unavailable(dir.path(), &swarm);
}

#[test]
fn acknowledged_ops_missing_from_the_log_make_the_swarm_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "missing".into();
    let segments = forty_ops(dir.path(), &swarm);
    // The last segment is gone (removed by hand, or lost by the disk): ops up to 40 were
    // acknowledged, so their ids must never be given out again.
    std::fs::remove_file(segments.last().unwrap()).unwrap();
    let notes = reopen_unavailable(dir.path(), &swarm);
    assert!(
        notes.iter().any(|n| n.detail.contains("were acknowledged")),
        "{notes:?}"
    );
}

fn last_segment(dir: &std::path::Path, swarm: &str) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir.join(store::swarm_dir_name(swarm)))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    for kind in kinds() {
        let dir = tempfile::tempdir().unwrap();
        let swarm: Arc<str> = "torn".into();
        {
            let (mut log, mut events, _) = open(dir.path(), kind, 1 << 20);
            log.create(&swarm, Epoch(1)).unwrap();
            append_all(&mut log, &mut events, &swarm, Epoch(1), 1, 20);
        }
        // Tear the last record: cut 5 bytes off the end, as a crash mid-write would (so op
        // 20 was never synced, nor acknowledged: the watermark is at 19).
        set_watermark(dir.path(), &swarm, 19);
        let segment = last_segment(dir.path(), &swarm);
        let len = std::fs::metadata(&segment).unwrap().len();
        cut_to(&segment, len - 5);
        let (mut log, mut events, notes) = open(dir.path(), kind, 1 << 20);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].detail.contains("truncated a torn tail"),
            "{notes:?}"
        );
        assert_eq!(state(&log, &swarm).last_op, OpId(19));
        assert_eq!(state(&log, &swarm).unavailable, None);
        // Op 20 was never acknowledged; the sequencer reuses its id for the next op.
        append_all(&mut log, &mut events, &swarm, Epoch(1), 20, 25);
        let ops: Vec<u64> = log
            .read_from(&swarm, OpId(1), usize::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.op.0)
            .collect();
        assert_eq!(ops, (1..=25).collect::<Vec<_>>());
    }
}

#[test]
fn bit_flip_at_the_tail_is_truncated_but_in_the_middle_makes_the_swarm_unavailable() {
    for kind in kinds() {
        bit_flips_with(kind);
    }
}

fn bit_flips_with(kind: WriterKind) {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, healthy, tail): (Arc<str>, Arc<str>, Arc<str>) =
        ("damaged".into(), "healthy".into(), "tail".into());
    {
        let (mut log, mut events, _) = open(dir.path(), kind, 1 << 20);
        for swarm in [&damaged, &healthy, &tail] {
            log.create(swarm, Epoch(5)).unwrap();
            append_all(&mut log, &mut events, swarm, Epoch(5), 1, 30);
        }
    }
    let flip = |swarm: &str, at_from_end: Option<u64>| {
        let segment = last_segment(dir.path(), swarm);
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = match at_from_end {
            Some(back) => bytes.len() - back as usize,
            None => bytes.len() / 2,
        };
        bytes[at] ^= 0x10;
        std::fs::write(&segment, bytes).unwrap();
    };
    flip(&damaged, None);
    // The tail's last record was never synced (the crash hit while it was written): the
    // watermark is before it.
    flip(&tail, Some(3));
    set_watermark(dir.path(), &tail, 29);
    let (log, _events, notes) = open(dir.path(), kind, 1 << 20);
    assert!(state(&log, &damaged).unavailable.is_some(), "{notes:?}");
    assert_eq!(state(&log, &healthy).unavailable, None);
    assert_eq!(state(&log, &healthy).last_op, OpId(30));
    let tail_state = state(&log, &tail);
    assert_eq!(
        (tail_state.last_op, tail_state.unavailable),
        (OpId(29), None)
    );
    assert_eq!(
        log.read_from(&healthy, OpId(1), usize::MAX, usize::MAX)
            .unwrap()
            .len(),
        30
    );
    let mut log = log;
    assert!(matches!(
        log.append(&damaged, OpId(31), record(Epoch(5), 31, "x")),
        Err(LogError::Unavailable { .. })
    ));
}

#[test]
fn interval_and_never_policies_complete_without_waiting_for_sync() {
    for policy in [SyncPolicy::IntervalMs(5), SyncPolicy::NeverDanger] {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut rx) = policy_log(
            dir.path(),
            WriterKind::File,
            policy,
            1 << 20,
            disk::Disk::real(),
        );
        let swarm: Arc<str> = "p".into();
        log.create(&swarm, Epoch(3)).unwrap();
        append_all(&mut log, &mut rx, &swarm, Epoch(3), 1, 50);
        // Give the interval sync a chance to run, then check the data is all there.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            log.read_from(&swarm, OpId(1), usize::MAX, usize::MAX)
                .unwrap()
                .len(),
            50
        );
    }
}

/// A log of one shard under `policy`, over `disk`, with a writer of `kind`.
fn policy_log(
    dir: &std::path::Path,
    kind: WriterKind,
    policy: SyncPolicy,
    segment_bytes: u64,
    disk: disk::Disk,
) -> (ShardLog, mpsc::UnboundedReceiver<LogEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = LogWriter::start(kind, policy, 1024, vec![tx.clone()], None, disk).unwrap();
    let log = ShardLog::new(
        0,
        dir,
        segment_bytes,
        writer,
        Vec::new(),
        Retention::default(),
        tx,
    );
    (log, rx)
}

/// The interval sync makes a new segment's directory entry durable with its bytes: after
/// the interval, a power loss discards nothing.
#[test]
fn an_interval_sync_makes_new_segments_durable_in_their_directory() {
    for kind in [WriterKind::File, WriterKind::Auto] {
        let dir = tempfile::tempdir().unwrap();
        let faults = disk::FaultDisk::new(0);
        let (mut log, mut rx) = policy_log(
            dir.path(),
            kind,
            SyncPolicy::IntervalMs(5),
            4096,
            disk::Disk::faulty(faults.clone()),
        );
        let swarm: Arc<str> = "p".into();
        log.create(&swarm, Epoch(3)).unwrap();
        append_all(&mut log, &mut rx, &swarm, Epoch(3), 1, 200);
        // The interval syncs leave nothing a power loss could take.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while faults.at_risk() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind}: {} files still not durable",
                faults.at_risk()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let loss = faults.power_loss(false);
        assert_eq!(loss, disk::PowerLoss::default(), "{kind}");
        drop(log);
        let (logs, notes) = recover_all(dir.path()).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(logs[0].last_op(), OpId(200), "{kind}");
    }
}

#[test]
fn sync_policy_parses_and_prints() {
    for (text, policy) in [
        ("always", SyncPolicy::Always),
        ("interval_ms:10", SyncPolicy::IntervalMs(10)),
        ("never_danger", SyncPolicy::NeverDanger),
    ] {
        assert_eq!(text.parse::<SyncPolicy>().unwrap(), policy);
        assert_eq!(policy.to_string(), text);
    }
    for bad in ["never", "interval_ms:0", "interval_ms:x", ""] {
        assert!(bad.parse::<SyncPolicy>().is_err(), "{bad}");
    }
}

fn keyed(epoch: Epoch, op: u64, key: &str, timestamp_ms: u64) -> RecordParts {
    encode_record(
        epoch,
        OpId(op),
        timestamp_ms,
        Class::Command,
        key.as_bytes(),
        Bytes::from_static(b"H"),
        Bytes::from(format!("payload-{op}")),
    )
}

/// Appends `ops` with keys `key-{op % keys}` (no key when `keys` is 0) and waits.
fn append_keyed(
    log: &mut ShardLog,
    events: &mut mpsc::UnboundedReceiver<LogEvent>,
    swarm: &Arc<str>,
    ops: std::ops::RangeInclusive<u64>,
    keys: u64,
    timestamp_ms: u64,
) {
    let last = *ops.end();
    for op in ops {
        let key = if keys == 0 {
            String::new()
        } else {
            format!("key-{}", op % keys)
        };
        log.append(swarm, OpId(op), keyed(Epoch(1), op, &key, timestamp_ms))
            .unwrap();
    }
    loop {
        match next_event(events) {
            LogEvent::Durable { swarm, up_to } => {
                log.on_durable(&swarm, up_to);
                if up_to.0 >= last {
                    return;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn compact_now(log: &mut ShardLog, events: &mut mpsc::UnboundedReceiver<LogEvent>, now_ms: u64) {
    log.maintain(now_ms);
    match next_event(events) {
        LogEvent::Compacted { swarm, result } => log.on_compacted(&swarm, result),
        other => panic!("expected a compaction, got {other:?}"),
    }
}

fn read_ops(log: &ShardLog, swarm: &str) -> Vec<u64> {
    log.read_from(swarm, OpId(1), usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.op.0)
        .collect()
}

#[test]
fn compaction_keeps_the_latest_record_per_key_and_survives_reopen() {
    for kind in kinds() {
        compaction_with(kind);
    }
}

fn compaction_with(kind: WriterKind) {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "compacted".into();
    let retention = Retention {
        hot_bytes: 400,
        max_age_ms: [None; Class::COUNT],
        max_bytes: None,
    };
    let (mut log, mut events, _) = open_with(dir.path(), kind, 300, retention.clone());
    log.create(&swarm, Epoch(1)).unwrap();
    append_keyed(&mut log, &mut events, &swarm, 1..=100, 3, 0);
    let before = read_ops(&log, &swarm);
    assert_eq!(before.len(), 100);
    compact_now(&mut log, &mut events, 1);
    let horizon = log.horizon(&swarm);
    assert!(
        horizon > OpId(0) && horizon < OpId(100),
        "horizon {horizon:?}"
    );
    let after = read_ops(&log, &swarm);
    // Up to the horizon: the latest op of each of the three keys; after it: every op.
    let expected: Vec<u64> = (1..=horizon.0)
        .filter(|op| op + 3 > horizon.0)
        .chain(horizon.0 + 1..=100)
        .collect();
    assert_eq!(after, expected);
    // Appends go on, and a reopened log reads the same.
    append_keyed(&mut log, &mut events, &swarm, 101..=110, 3, 0);
    drop(log);
    let (log, _events, notes) = open_with(dir.path(), kind, 300, retention);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(log.horizon(&swarm), horizon);
    let reopened = read_ops(&log, &swarm);
    assert_eq!(&reopened[..expected.len()], &expected[..]);
    assert_eq!(reopened.len(), expected.len() + 10);
    assert_eq!(state(&log, &swarm).last_op, OpId(110));
}

#[test]
fn a_compaction_interrupted_after_its_rename_is_finished_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "interrupted".into();
    let retention = Retention {
        hot_bytes: 0,
        max_age_ms: [None; Class::COUNT],
        max_bytes: None,
    };
    let (mut log, mut events, _) = open_with(dir.path(), WriterKind::File, 300, retention.clone());
    log.create(&swarm, Epoch(1)).unwrap();
    append_keyed(&mut log, &mut events, &swarm, 1..=40, 2, 0);
    // Run the compaction but never install it: the new file exists beside its inputs, as
    // after a crash between the rename and the deletions.
    let (logs, _) = recover_all(dir.path()).unwrap();
    let job = compact::plan(&logs[0], &retention, 1, &swarm).expect("something to compact");
    let done = compact::run(&job).unwrap();
    assert!(done.segment.path.exists() && done.replaced.iter().all(|p| p.exists()));
    drop(log);
    let (log, _events, notes) = open_with(dir.path(), WriterKind::File, 300, retention);
    assert!(notes.is_empty(), "{notes:?}");
    assert!(
        done.replaced.iter().all(|p| !p.exists()),
        "leftovers not removed"
    );
    let ops = read_ops(&log, &swarm);
    let covered = done.segment.covers_to.0;
    let expected: Vec<u64> = (1..=covered)
        .filter(|op| op + 2 > covered)
        .chain(covered + 1..=40)
        .collect();
    assert_eq!(ops, expected);
}

#[test]
fn age_and_size_retention_remove_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "retained".into();
    let mut max_age_ms = [None; Class::COUNT];
    max_age_ms[Class::Command.index()] = Some(1_000);
    let retention = Retention {
        hot_bytes: 300,
        max_age_ms,
        max_bytes: None,
    };
    let (mut log, mut events, _) = open_with(dir.path(), WriterKind::File, 300, retention);
    log.create(&swarm, Epoch(1)).unwrap();
    // Old keyless records, then recent ones.
    append_keyed(&mut log, &mut events, &swarm, 1..=30, 0, 10);
    append_keyed(&mut log, &mut events, &swarm, 31..=60, 0, 50_000);
    compact_now(&mut log, &mut events, 50_500);
    let ops = read_ops(&log, &swarm);
    assert!(
        ops.iter().all(|op| *op > 30),
        "expired records kept: {ops:?}"
    );
    assert_eq!(ops.last(), Some(&60));

    // Size: a limit smaller than the log deletes the oldest segments.
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        hot_bytes: u64::MAX,
        max_age_ms: [None; Class::COUNT],
        max_bytes: Some(1_000),
    };
    let (mut log, mut events, _) = open_with(dir.path(), WriterKind::File, 300, retention);
    log.create(&swarm, Epoch(1)).unwrap();
    append_keyed(&mut log, &mut events, &swarm, 1..=100, 0, 0);
    log.maintain(0);
    let ops = read_ops(&log, &swarm);
    assert!(ops.len() < 100 && ops.last() == Some(&100), "{ops:?}");
    let first_kept = ops[0];
    assert_eq!(log.horizon(&swarm), OpId(first_kept - 1));
    let bytes: u64 = std::fs::read_dir(dir.path().join(store::swarm_dir_name(&swarm)))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(bytes < 1_000 + 300, "{bytes} bytes on disk");
}

/// A record holding a real Deliver frame, as the shards write them (`payload` empty: a
/// tombstone).
fn delivered(
    swarm: &str,
    op: u64,
    key: &str,
    payload: &'static [u8],
    timestamp_ms: u64,
) -> RecordParts {
    let frame = swarmbus_schema::encode(&swarmbus_schema::Message::Deliver(
        swarmbus_schema::Deliver {
            swarm: swarm.into(),
            class: Class::Control,
            op_id: OpId(op),
            epoch: Epoch(1),
            source_agent: "swarmbus-router".into(),
            target_agent: None,
            key: Some(key.into()),
            payload: Bytes::from_static(payload),
            fencing_token: 0,
            lease: None,
            published_us: 0,
        },
    ));
    encode_record(
        Epoch(1),
        OpId(op),
        timestamp_ms,
        Class::Control,
        key.as_bytes(),
        frame.head,
        frame.body,
    )
}

/// Internal logs (`$control`, `$affinity`, `$jobs.*`) keep their latest record per key
/// however old it is and whatever the size limit, and drop keys whose latest record is a
/// tombstone; a user swarm under the same retention loses its old records.
#[test]
fn internal_logs_are_compacted_by_key_and_never_aged_out() {
    let day_ms = 24 * 3600 * 1000;
    let mut kept = Vec::new();
    for name in ["$control", "user"] {
        let retention = Retention {
            hot_bytes: 0,
            // A user swarm's segments would be deleted before compaction could run.
            max_bytes: name.starts_with('$').then_some(1),
            ..Retention::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let swarm: Arc<str> = name.into();
        let (mut log, mut events, _) = open_with(dir.path(), WriterKind::File, 300, retention);
        log.create(&swarm, Epoch(1)).unwrap();
        // lease-a twice, pin-b then its tombstone, then enough to roll segments.
        let records = [
            ("lease-a", &b"1"[..]),
            ("pin-b", &b"node"[..]),
            ("lease-a", &b"2"[..]),
            ("pin-b", &b""[..]),
        ];
        for (i, (key, payload)) in records.iter().enumerate() {
            let op = i as u64 + 1;
            log.append(&swarm, OpId(op), delivered(name, op, key, payload, 0))
                .unwrap();
        }
        for op in 5..=12 {
            log.append(&swarm, OpId(op), delivered(name, op, "filler", b"x", 0))
                .unwrap();
        }
        let mut durable = OpId(0);
        while durable < OpId(12) {
            if let LogEvent::Durable { swarm, up_to } = next_event(&mut events) {
                log.on_durable(&swarm, up_to);
                durable = up_to;
            }
        }
        // 31 days later (past the 30-day control age and the 1-byte size limit).
        compact_now(&mut log, &mut events, 31 * day_ms);
        kept.push(read_ops(&log, &swarm));
    }
    let (internal, user) = (&kept[0], &kept[1]);
    assert!(
        internal.contains(&3),
        "lease-a's latest token aged out: {internal:?}"
    );
    assert!(
        !internal.contains(&1),
        "lease-a's superseded record kept: {internal:?}"
    );
    assert!(
        !internal.contains(&2) && !internal.contains(&4),
        "pin-b's record or tombstone kept: {internal:?}"
    );
    assert_eq!(internal.last(), Some(&12));
    assert!(
        !user.contains(&3),
        "a user swarm's old control record kept: {user:?}"
    );
}

/// A torn last record whose payload holds bytes that parse as a record (here a copy of an
/// earlier record of the same log) is a torn tail, not mid-log damage: the tail scanner
/// checks epoch and op continuity, not only that some record parses.
#[test]
fn a_torn_record_holding_a_record_lookalike_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "lookalike".into();
    {
        let (mut log, mut events, _) = open(dir.path(), WriterKind::File, 1 << 20);
        log.create(&swarm, Epoch(1)).unwrap();
        append_all(&mut log, &mut events, &swarm, Epoch(1), 1, 3);
    }
    // Op 4 carries a copy of op 2's record (and op 5's, a record from the future of another
    // epoch) in its payload, and is torn after them.
    let mut payload = record(Epoch(1), 2, "copied").to_bytes().to_vec();
    payload.extend_from_slice(&record(Epoch(9), 5, "other epoch").to_bytes());
    payload.extend_from_slice(&[0u8; 64]);
    let torn = encode_record(
        Epoch(1),
        OpId(4),
        0,
        Class::Command,
        b"",
        Bytes::from_static(b"H"),
        Bytes::from(payload),
    )
    .to_bytes();
    let segment = last_segment(dir.path(), &swarm);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&torn[..torn.len() - 32]);
    std::fs::write(&segment, bytes).unwrap();
    let (log, _events, notes) = open(dir.path(), WriterKind::File, 1 << 20);
    assert_eq!(state(&log, &swarm).unavailable, None, "{notes:?}");
    assert_eq!(state(&log, &swarm).last_op, OpId(3));
    assert!(
        notes[0].detail.contains("truncated a torn tail"),
        "{notes:?}"
    );
}

/// A pin written under the former bare key and ended under the new one: compaction drops
/// both (the new tombstone supersedes the old key), so the ended pin never comes back.
#[test]
fn a_legacy_pin_ended_under_the_new_key_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let swarm: Arc<str> = "$affinity".into();
    let retention = Retention {
        hot_bytes: 0,
        ..Retention::default()
    };
    let (mut log, mut events, _) = open_with(dir.path(), WriterKind::File, 300, retention);
    log.create(&swarm, Epoch(1)).unwrap();
    let new_key = swarmbus_proto::workers::pin_key("sess");
    let records = [("sess", &b"node"[..]), (new_key.as_str(), &b""[..])];
    for (i, (key, payload)) in records.iter().enumerate() {
        let op = i as u64 + 1;
        log.append(&swarm, OpId(op), delivered(&swarm, op, key, payload, 0))
            .unwrap();
    }
    for op in 3..=10 {
        log.append(&swarm, OpId(op), delivered(&swarm, op, "filler", b"x", 0))
            .unwrap();
    }
    let mut durable = OpId(0);
    while durable < OpId(10) {
        if let LogEvent::Durable { swarm, up_to } = next_event(&mut events) {
            log.on_durable(&swarm, up_to);
            durable = up_to;
        }
    }
    compact_now(&mut log, &mut events, 0);
    let kept = read_ops(&log, &swarm);
    assert!(!kept.contains(&1) && !kept.contains(&2), "{kept:?}");
}
