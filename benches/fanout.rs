//! Fan-out enqueue: one published message through the routing core to N subscriber
//! outboxes (the shard's hot path, without the network).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swarmbus_proto::core::{Action, Core};
use swarmbus_proto::ConnId;
use swarmbus_proto::Lane;
use swarmbus_router::config::QueueConfig;
use swarmbus_router::outbox::Outbox;
use swarmbus_router::stats::Stats;
use swarmbus_schema::{Class, Publish};

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_enqueue");
    for subscribers in [1u64, 10, 100] {
        for size in [256usize, 16 * 1024] {
            let stats = Arc::new(Stats::default());
            let mut core: Core<Arc<Outbox>> = Core::new(16);
            let outboxes: Vec<_> = (0..subscribers)
                .map(|i| {
                    Arc::new(Outbox::new(
                        ConnId(i),
                        &QueueConfig::default(),
                        stats.clone(),
                    ))
                })
                .collect();
            let agent: Arc<str> = "agent".into();
            let publisher = Arc::new(Outbox::new(
                ConnId(u64::MAX),
                &QueueConfig::default(),
                stats.clone(),
            ));
            for o in &outboxes {
                core.handle_subscribe(
                    o.conn(),
                    &agent,
                    o.clone(),
                    "swarm",
                    Class::Telemetry,
                    None,
                    None,
                )
                .unwrap();
            }
            let publish = Publish {
                request_id: 0,
                swarm: "swarm".into(),
                class: Class::Telemetry,
                target_agent: None,
                key: None,
                payload: Bytes::from(vec![1u8; size]),
                fencing_token: 0,
                lease: None,
            };
            let now = swarmbus_router::clock::Clock::new().now();
            let mut chunks = Vec::with_capacity(1 << 16);
            let mut published = 0u64;
            group.throughput(Throughput::Elements(subscribers));
            group.bench_function(
                BenchmarkId::new(format!("{size}B"), format!("{subscribers}_subscribers")),
                |b| {
                    b.iter(|| {
                        core.handle_publish("ctl", publisher.clone(), &publish, now)
                            .unwrap();
                        while let Some(Action::Deliver {
                            to, class, frame, ..
                        }) = core.poll_action()
                        {
                            let _ = to.push(Lane::Class(class), frame);
                        }
                        published += 1;
                        // Empty the queues now and then, as the lane writers would.
                        if published.is_multiple_of(1024) {
                            for o in &outboxes {
                                chunks.clear();
                                o.drain(
                                    Lane::Class(Class::Telemetry),
                                    usize::MAX,
                                    usize::MAX,
                                    &mut chunks,
                                    &mut Vec::new(),
                                );
                            }
                        }
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
