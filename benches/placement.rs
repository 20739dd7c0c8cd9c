//! One placement decision over fleets of 100 and 1,000 nodes (target: <= 2 us at 1,000).
//!
//! Nodes have mixed weights (1, 2, 4 or 8 GPUs) and four resident models each out of 64.
//! `cold` asks for a model no node has (the full pass over every node); `warm` asks for a
//! resident one (the warm nodes race first; the full pass runs only if all are at their
//! bound); `no_model` places by session key. Each iteration places one session, which
//! counts on its node, and then releases it, so the fleet's load stays where it started.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use swarmbus_affinity::{Fleet, Gpus, NodeId, NodeSpec, PlacementRequest, Zone};

fn fleet(nodes: u64) -> Fleet {
    let mut fleet = Fleet::default();
    for n in 0..nodes {
        let mut spec = NodeSpec::new(
            NodeId(n),
            Zone(format!("zone-{}", n % 4)),
            Gpus {
                count: 1 << (n % 4),
                model: "bench GPU".into(),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: 40 << 30,
            },
        );
        spec.models = (0..4)
            .map(|m| format!("model-{}", (n * 4 + m) % 64))
            .collect();
        fleet
            .add_node(spec)
            .expect("ids are distinct and below max_nodes");
    }
    // Give the fleet a realistic spread of sessions to bound against.
    for s in 0..(nodes * 20) {
        let key = format!("warmup-{s}");
        let model = format!("model-{}", s % 64);
        fleet
            .place(&PlacementRequest::new(&key, Some(&model)))
            .expect("the fleet has eligible nodes");
    }
    fleet
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("place");
    for nodes in [100u64, 1_000] {
        let mut fleet = fleet(nodes);
        let keys: Vec<String> = (0..1024).map(|i| format!("session-{i}")).collect();
        for (name, model) in [
            ("cold", Some("model-not-resident")),
            ("warm", Some("model-7")),
            ("no_model", None),
        ] {
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::new(name, nodes), &nodes, |b, _| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    let placed = fleet
                        .place(black_box(&PlacementRequest::new(&keys[i], model)))
                        .expect("the fleet has eligible nodes");
                    fleet.release(placed.node).expect("the node is registered");
                    placed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
