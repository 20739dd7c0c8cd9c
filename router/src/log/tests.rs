//! Log tests, run against both writer backends where the kernel allows io_uring.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use swarmbus_schema::{Class, Epoch, OpId};
use tokio::sync::mpsc;

use super::*;

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
    LogWriter::start(WriterKind::Uring, SyncPolicy::Always, 16, vec![tx]).is_ok()
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
        match events.blocking_recv().expect("writer alive") {
            LogEvent::Durable { swarm: s, up_to } if s == *swarm => durable = durable.max(up_to),
            LogEvent::Durable { .. } => {}
            LogEvent::Failed { detail, .. } => panic!("append failed: {detail}"),
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
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = LogWriter::start(kind, SyncPolicy::Always, 1024, vec![tx]).unwrap();
    assert_eq!(writer.kind(), kind);
    let (logs, notes) = recover_all(dir).unwrap();
    (
        ShardLog::new(0, dir, segment_bytes, writer, logs),
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
        // Tear the last record: cut 5 bytes off the end, as a crash mid-write would.
        let segment = last_segment(dir.path(), &swarm);
        let len = std::fs::metadata(&segment).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let (damaged, healthy, tail): (Arc<str>, Arc<str>, Arc<str>) =
        ("damaged".into(), "healthy".into(), "tail".into());
    {
        let (mut log, mut events, _) = open(dir.path(), WriterKind::File, 1 << 20);
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
    flip(&tail, Some(3));
    let (log, _events, notes) = open(dir.path(), WriterKind::File, 1 << 20);
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = LogWriter::start(WriterKind::File, policy, 1024, vec![tx]).unwrap();
        let mut log = ShardLog::new(0, dir.path(), 1 << 20, writer, Vec::new());
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
