//! Event log: record encoding and parsing, and durable appends (group commit) with both
//! writer backends, to memory (tmpfs, /dev/shm) and to disk (the temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swarmbus_proto::record::parse_record;
use swarmbus_router::log::{
    encode_record, LogBackend, LogEvent, LogWriter, ShardLog, SyncPolicy, WriterKind,
};
use swarmbus_schema::{Class, Epoch, OpId};
use tokio::sync::mpsc;

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for size in [256usize, 4096] {
        let head = Bytes::from(vec![1u8; 96]);
        let body = Bytes::from(vec![2u8; size]);
        group.throughput(Throughput::Bytes((96 + size) as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &size, |b, _| {
            b.iter(|| {
                encode_record(
                    Epoch(1),
                    OpId(7),
                    0,
                    Class::Command,
                    b"key",
                    head.clone(),
                    body.clone(),
                )
            })
        });
        let bytes = encode_record(
            Epoch(1),
            OpId(7),
            0,
            Class::Command,
            b"key",
            head.clone(),
            body.clone(),
        )
        .to_bytes();
        group.bench_with_input(BenchmarkId::new("parse", size), &bytes, |b, bytes| {
            b.iter(|| parse_record(black_box(bytes)).unwrap())
        });
    }
    group.finish();
}

/// A shard's log in a new directory under `base` (the temp dir when `None`), with its own
/// writer; `None` when that writer cannot start here.
fn start_log(
    base: Option<&std::path::Path>,
    kind: WriterKind,
    policy: SyncPolicy,
) -> Option<(
    tempfile::TempDir,
    ShardLog,
    mpsc::UnboundedReceiver<LogEvent>,
)> {
    let dir = match base {
        Some(base) => tempfile::tempdir_in(base).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let (tx, events) = mpsc::unbounded_channel();
    let Ok(writer) = LogWriter::start(
        kind,
        policy,
        65_536,
        vec![tx.clone()],
        None,
        swarmbus_router::log::disk::Disk::real(),
    ) else {
        eprintln!("{kind} writer unavailable here; skipped");
        return None;
    };
    let log = ShardLog::new(
        0,
        dir.path(),
        64 << 20,
        writer,
        Vec::new(),
        Default::default(),
        tx,
    );
    Some((dir, log, events))
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_durable");
    group.measurement_time(Duration::from_secs(3));
    let memory = std::path::Path::new("/dev/shm");
    for (place, base) in [
        ("memory", memory.exists().then_some(memory)),
        ("disk", None),
    ] {
        for kind in [WriterKind::File, WriterKind::Uring] {
            let Some((_dir, mut log, mut events)) = start_log(base, kind, SyncPolicy::Always)
            else {
                continue;
            };
            let swarms: [Arc<str>; 1] = ["bench".into()];
            log.create(&swarms[0], Epoch(1)).unwrap();
            let mut next = 1u64;
            for batch in [1usize, 64] {
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(BenchmarkId::new(format!("{place}/{kind}"), batch), |b| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            append_windows(&mut log, &mut events, &swarms, &mut next, batch as u64);
                        }
                        start.elapsed()
                    })
                });
            }
        }
    }
    group.finish();
}

/// Swarms and ops in flight per swarm of the streaming bench: the shape of
/// `swarmbus-loadgen durable --swarms 10 --window 64`.
const STREAM_SWARMS: usize = 10;
const STREAM_WINDOW: u64 = 64;

/// Appends `window` records of 256 B to each of `swarms`, interleaved op by op as publishes
/// of many swarms reach a shard, and waits until the writer reports every one durable.
fn append_windows(
    log: &mut ShardLog,
    events: &mut mpsc::UnboundedReceiver<LogEvent>,
    swarms: &[Arc<str>],
    next: &mut u64,
    window: u64,
) {
    let body = Bytes::from(vec![3u8; 256]);
    let head = Bytes::from(vec![4u8; 96]);
    let last = *next + window - 1;
    for op in *next..=last {
        for swarm in swarms {
            let record = encode_record(
                Epoch(1),
                OpId(op),
                0,
                Class::Command,
                b"",
                head.clone(),
                body.clone(),
            );
            log.append(swarm, OpId(op), record).unwrap();
        }
    }
    *next = last + 1;
    let mut behind = swarms.len();
    while behind > 0 {
        match events.blocking_recv().unwrap() {
            LogEvent::Durable { up_to, .. } if up_to.0 >= last => behind -= 1,
            LogEvent::Durable { .. } => {}
            LogEvent::Failed { detail, .. } => panic!("{detail}"),
            LogEvent::Compacted { .. } => {}
            other => panic!("the embedded log reported {other:?}"),
        }
    }
}

/// Many swarms with a window each in flight: the writer's cost per append when a batch
/// spans many files (planning, coalescing, completion per swarm).
fn streaming(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_streaming");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(STREAM_SWARMS as u64 * STREAM_WINDOW));
    let memory = std::path::Path::new("/dev/shm");
    let cases = [
        ("memory", SyncPolicy::NeverDanger, WriterKind::File),
        ("memory", SyncPolicy::NeverDanger, WriterKind::Uring),
        ("memory", SyncPolicy::Always, WriterKind::Uring),
        ("disk", SyncPolicy::Always, WriterKind::Uring),
    ];
    for (place, policy, kind) in cases {
        let base = (place == "memory" && memory.exists()).then_some(memory);
        let Some((_dir, mut log, mut events)) = start_log(base, kind, policy) else {
            continue;
        };
        let swarms: Vec<Arc<str>> = (0..STREAM_SWARMS)
            .map(|i| Arc::from(format!("stream-{i}")))
            .collect();
        for swarm in &swarms {
            log.create(swarm, Epoch(1)).unwrap();
        }
        let mut next = 1u64;
        let name = format!("{place}/{kind}/{policy}");
        group.bench_function(BenchmarkId::new(name, STREAM_SWARMS), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    append_windows(&mut log, &mut events, &swarms, &mut next, STREAM_WINDOW);
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, records, appends, streaming);
criterion_main!(benches);
