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

/// Appends `batch` records of 256 B and waits until the writer reports them durable.
fn append_batch(
    log: &mut ShardLog,
    events: &mut mpsc::UnboundedReceiver<LogEvent>,
    swarm: &Arc<str>,
    next: &mut u64,
    batch: usize,
) {
    let body = Bytes::from(vec![3u8; 256]);
    let head = Bytes::from(vec![4u8; 96]);
    let last = *next + batch as u64 - 1;
    for op in *next..=last {
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
    *next = last + 1;
    loop {
        match events.blocking_recv().unwrap() {
            LogEvent::Durable { up_to, .. } if up_to.0 >= last => return,
            LogEvent::Durable { .. } => {}
            LogEvent::Failed { detail, .. } => panic!("{detail}"),
            LogEvent::Compacted { .. } => {}
        }
    }
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
            let dir = match base {
                Some(base) => tempfile::tempdir_in(base).unwrap(),
                None => tempfile::tempdir().unwrap(),
            };
            let (tx, mut events) = mpsc::unbounded_channel();
            let Ok(writer) = LogWriter::start(
                kind,
                SyncPolicy::Always,
                65_536,
                vec![tx.clone()],
                None,
                swarmbus_router::log::disk::Disk::real(),
            ) else {
                eprintln!("{kind} writer unavailable here; skipped");
                continue;
            };
            let mut log = ShardLog::new(
                0,
                dir.path(),
                64 << 20,
                writer,
                Vec::new(),
                Default::default(),
                tx,
            );
            let swarm: Arc<str> = "bench".into();
            log.create(&swarm, Epoch(1)).unwrap();
            let mut next = 1u64;
            for batch in [1usize, 64] {
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(BenchmarkId::new(format!("{place}/{kind}"), batch), |b| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            append_batch(&mut log, &mut events, &swarm, &mut next, batch);
                        }
                        start.elapsed()
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, records, appends);
criterion_main!(benches);
