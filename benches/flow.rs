//! Flow control on the publish and delivery paths: a token bucket take, the circuit
//! breaker's per-publish checks, and the outbound queues (enqueue, shed, priority drain,
//! coalescing into stream writes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swarmbus_proto::limits::{Breaker, BreakerConfig, ClassBuckets, Rate, TokenBucket};
use swarmbus_proto::ConnId;
use swarmbus_proto::Lane;
use swarmbus_router::config::QueueConfig;
use swarmbus_router::outbox::Outbox;
use swarmbus_router::stats::Stats;
use swarmbus_schema::{Class, Coalescer, OutFrame};

fn token_bucket(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_bucket");
    group.throughput(Throughput::Elements(1));
    let start = Instant::now();
    // Admitted: a bucket that never runs dry.
    let mut bucket = TokenBucket::new(Rate::new(1e12, 1e12), start);
    let mut tick = 0u64;
    group.bench_function("take_admitted", |b| {
        b.iter(|| {
            tick += 1;
            bucket.try_take(start + Duration::from_nanos(tick))
        })
    });
    // Refused: an empty bucket computing the retry advice.
    let mut empty = TokenBucket::new(Rate::new(1.0, 1.0), start);
    let _ = empty.try_take(start);
    group.bench_function("take_refused", |b| {
        b.iter(|| empty.try_take(start + Duration::from_nanos(1)))
    });
    let mut buckets = ClassBuckets::new([Rate::new(1e12, 1e12); Class::COUNT], start);
    group.bench_function("class_buckets_take", |b| {
        b.iter(|| {
            tick += 1;
            buckets.try_take(Class::Command, start + Duration::from_nanos(tick))
        })
    });
    group.finish();
}

fn breaker(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");
    group.throughput(Throughput::Elements(1));
    let start = Instant::now();
    // The per-publish cost when all is well: check, then success.
    let mut closed = Breaker::new(BreakerConfig::default(), start);
    group.bench_function("closed_check_success", |b| {
        b.iter(|| {
            let verdict = closed.check(start);
            (verdict, closed.success())
        })
    });
    // An open breaker refusing fast.
    let config = BreakerConfig {
        failures: 1,
        window_ms: 1_000,
        open_ms: 3_600_000,
        probes: 1,
    };
    let mut open = Breaker::new(config, start);
    let _ = open.failure(start);
    group.bench_function("open_refuse", |b| b.iter(|| open.check(start)));
    // Counting failures while closed (never reaching the threshold).
    let never = BreakerConfig {
        failures: u32::MAX,
        ..BreakerConfig::default()
    };
    let mut counting = Breaker::new(never, start);
    group.bench_function("closed_failure", |b| b.iter(|| counting.failure(start)));
    group.finish();
}

fn frame(size: usize) -> OutFrame {
    OutFrame {
        head: Bytes::from(vec![0u8; 48]),
        body: Bytes::from(vec![1u8; size]),
    }
}

/// Fills every class lane with `batch` frames as a shard's flush does: the ordered
/// classes' stamped with the time they became durable (one clock reading per flush).
fn push_all(outbox: &Outbox, batch: usize, proto: &OutFrame) {
    let durable = Instant::now();
    for class in Class::ALL {
        let lane = Lane::Class(class);
        for _ in 0..batch {
            let _ = if class.is_ordered() {
                outbox.try_push_durable(lane, proto.clone(), durable)
            } else {
                outbox.try_push(lane, proto.clone())
            };
        }
    }
}

fn outbox_queues(c: &mut Criterion) {
    let mut group = c.benchmark_group("outbox");
    let queues = QueueConfig::default();
    let stats = Arc::new(Stats::default());
    let outbox = Outbox::new(ConnId(1), &queues, stats.clone());
    let proto = frame(256);
    let batch = 256usize;
    let mut chunks = Vec::with_capacity(2 * batch);
    let mut durable_at = Vec::with_capacity(batch);
    // Fill every class lane with `batch` frames, then drain them in priority order, as the
    // lane writers do (control first, telemetry last): the cost per frame in and out.
    group.throughput(Throughput::Elements((batch * Class::COUNT) as u64));
    group.bench_function(BenchmarkId::new("enqueue_drain", "5x256_frames"), |b| {
        b.iter(|| {
            push_all(&outbox, batch, &proto);
            let mut drained = 0;
            for class in Class::ALL {
                let lane = Lane::Class(class);
                drained += outbox.drain(lane, batch, usize::MAX, &mut chunks, &mut durable_at);
                // As the lane writer does after its write: the event lag of the live
                // ordered deliveries.
                outbox.written(lane, &durable_at);
                durable_at.clear();
                chunks.clear();
            }
            drained
        })
    });
    // The same, plus what a lane writer does next: copy the small frames into few large
    // chunks for the stream write.
    let mut coalescer = Coalescer::new();
    group.bench_function(
        BenchmarkId::new("enqueue_drain_coalesce", "5x256_frames"),
        |b| {
            b.iter(|| {
                push_all(&outbox, batch, &proto);
                let mut written = 0;
                for class in Class::ALL {
                    let lane = Lane::Class(class);
                    outbox.drain(lane, batch, usize::MAX, &mut chunks, &mut durable_at);
                    outbox.written(lane, &durable_at);
                    durable_at.clear();
                    for frame in chunks.drain(..) {
                        coalescer.push(frame);
                    }
                    let out = coalescer.chunks();
                    written += out.len();
                    out.clear();
                }
                written
            })
        },
    );
    // A full telemetry lane: each push sheds the oldest frame.
    let small = QueueConfig {
        telemetry: 64,
        ..QueueConfig::default()
    };
    let shedding = Outbox::new(ConnId(2), &small, stats);
    for _ in 0..64 {
        shedding
            .push(Lane::Class(Class::Telemetry), proto.clone())
            .unwrap();
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("telemetry_push_shedding", |b| {
        b.iter(|| shedding.push(Lane::Class(Class::Telemetry), proto.clone()))
    });
    group.finish();
}

criterion_group!(benches, token_bucket, breaker, outbox_queues);
criterion_main!(benches);
