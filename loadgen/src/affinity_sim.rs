//! The `affinity-sim` scenario: the placement library over a synthetic fleet, against
//! three textbook policies.
//!
//! The run: `--nodes` equal nodes (8 GPUs each, weight 8) and `--sessions` session
//! arrivals, each asking for one of `--models` models drawn from a Zipf distribution
//! (model k, counting from 1, with probability proportional to 1 / k^Z). Sessions stay open
//! to the end. When half of them have arrived, one node (picked by the seed) fails; when
//! three quarters have, a new node joins. Every policy sees the same arrivals and events.
//!
//! Model caches: each node keeps `--cache-models` models resident, least recently used
//! evicted first. A session placed on a node (new, or moved there) uses its model there: if
//! the model is resident that is a cache hit, otherwise a cold load that makes it resident.
//!
//! Policies:
//! - `round-robin`: session i goes to live node `i mod n` (live nodes in joining order).
//!   No session table: when membership changes, every session's node is recomputed so.
//! - `ring`: consistent hashing of the session key on a ring with `--vnodes` points per
//!   node; recomputed on membership change (only sessions whose arc changed owner move).
//! - `rendezvous`: plain highest-random-weight of the session key over live nodes, equal
//!   weights, no bounds, no cache preference; recomputed on membership change.
//! - `swarmbus`: `swarmbus_affinity` itself: a `Fleet` kept current with every cache change
//!   and a `SessionTable` of sticky leases. Membership changes go through the library: the
//!   failed node is marked unhealthy, then every session is opened again, which keeps its
//!   pin unless its node can no longer take work.
//!
//! Figures per policy:
//! - `cache_hit_rate`: hits over all placements (arrivals and moves).
//! - `max_over_avg_load`: the busiest live node's sessions over the mean of live nodes,
//!   the worse of two moments: right after the failed node's sessions moved, and at the
//!   end. (Right after the addition the newcomer is empty by design of sticky sessions, so
//!   that moment is not taken.)
//! - `moved_on_failure`, `moved_on_addition`: sessions whose node changed, over all live
//!   sessions at that moment.

use std::collections::BTreeSet;

use anyhow::{bail, ensure};
use swarmbus_affinity::hash::{key_hash, node_hash, pair_hash};
use swarmbus_affinity::{
    Fleet, Gpus, NodeId, NodeSpec, PlacementConfig, SessionConfig, SessionTable, Zone,
};

/// GPU memory one resident model takes in the synthetic fleet (for the node model only).
const MODEL_BYTES: u64 = 16 << 30;
/// GPUs per synthetic node (its placement weight).
const GPUS_PER_NODE: u32 = 8;

#[derive(Debug, clap::Args)]
pub struct AffinitySimArgs {
    /// Nodes in the fleet at the start (at least 2: one of them fails during the run).
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    /// Distinct models sessions ask for.
    #[arg(long, default_value_t = 50)]
    models: usize,
    /// Session arrivals over the run; every session stays open to the end.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Zipf exponent of model popularity: model k (from 1) is asked for with probability
    /// proportional to 1 / k^zipf. 0 makes every model equally popular.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seed of the model draws and of which node fails; the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Models each node keeps resident (least recently used evicted first).
    #[arg(long, default_value_t = 4)]
    cache_models: usize,
    /// Load slack epsilon of the swarmbus policy: no node above
    /// ceil((1 + epsilon) x average sessions) when a session is placed.
    #[arg(long, default_value_t = 0.25)]
    epsilon: f64,
    /// Points per node on the ring policy's hash ring.
    #[arg(long, default_value_t = 100)]
    vnodes: usize,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// splitmix64: a small seeded generator, enough for synthetic arrivals.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Zipf sampling by inverse transform over the cumulative distribution.
#[derive(Debug)]
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(items: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let mut cumulative: Vec<f64> = (1..=items)
            .map(|k| {
                total += 1.0 / (k as f64).powf(exponent);
                total
            })
            .collect();
        for c in &mut cumulative {
            *c /= total;
        }
        Self { cumulative }
    }

    /// An item index in 0..items (0 is the most popular).
    fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.next_unit();
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.cumulative.len() - 1)
    }
}

#[derive(Debug)]
struct SimSession {
    key: String,
    model: usize,
}

/// A least-recently-used set of resident models; the most recent is last.
#[derive(Debug, Clone, Default)]
struct ModelCache {
    resident: Vec<usize>,
}

impl ModelCache {
    /// Uses `model`: returns whether it was resident, and the model evicted to make room.
    fn touch(&mut self, model: usize, capacity: usize) -> (bool, Option<usize>) {
        if let Some(at) = self.resident.iter().position(|&m| m == model) {
            self.resident.remove(at);
            self.resident.push(model);
            return (true, None);
        }
        let evicted = if self.resident.len() >= capacity {
            Some(self.resident.remove(0))
        } else {
            None
        };
        self.resident.push(model);
        (false, evicted)
    }
}

trait Policy {
    fn name(&self) -> &'static str;
    /// Places a new session; `index` is its arrival number.
    fn place(&mut self, index: usize, session: &SimSession) -> anyhow::Result<NodeId>;
    fn node_failed(&mut self, node: NodeId) -> anyhow::Result<()>;
    fn node_added(&mut self, node: NodeId) -> anyhow::Result<()>;
    /// Where a live session belongs after a membership change (it is on `current`).
    /// Called for every live session in arrival order.
    fn relocate(
        &mut self,
        index: usize,
        session: &SimSession,
        current: NodeId,
    ) -> anyhow::Result<NodeId>;
    /// A node's resident models changed.
    fn cache_changed(&mut self, _node: NodeId, _loaded: usize, _evicted: Option<usize>) {}
}

#[derive(Debug)]
struct RoundRobin {
    live: Vec<NodeId>,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn place(&mut self, index: usize, _: &SimSession) -> anyhow::Result<NodeId> {
        // Never empty: the run starts with at least two nodes and only one fails.
        Ok(self.live[index % self.live.len()])
    }
    fn node_failed(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.live.retain(|&n| n != node);
        Ok(())
    }
    fn node_added(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.live.push(node);
        Ok(())
    }
    fn relocate(&mut self, index: usize, s: &SimSession, _: NodeId) -> anyhow::Result<NodeId> {
        self.place(index, s)
    }
}

#[derive(Debug)]
struct Ring {
    vnodes: usize,
    /// (point, node), sorted.
    points: Vec<(u64, NodeId)>,
}

impl Ring {
    fn new(nodes: &[NodeId], vnodes: usize) -> Self {
        let mut ring = Self {
            vnodes,
            points: Vec::new(),
        };
        for &node in nodes {
            ring.insert(node);
        }
        ring
    }

    fn insert(&mut self, node: NodeId) {
        for v in 0..self.vnodes {
            self.points
                .push((key_hash(&format!("{}#{v}", node.0)), node));
        }
        self.points.sort_unstable();
    }
}

impl Policy for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }
    fn place(&mut self, _: usize, session: &SimSession) -> anyhow::Result<NodeId> {
        let point = key_hash(&session.key);
        let at = self.points.partition_point(|&(p, _)| p < point);
        // Past the last point the ring wraps to the first; the ring is never empty
        // (the run keeps at least one node).
        Ok(self.points[at % self.points.len()].1)
    }
    fn node_failed(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.points.retain(|&(_, n)| n != node);
        Ok(())
    }
    fn node_added(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.insert(node);
        Ok(())
    }
    fn relocate(&mut self, index: usize, s: &SimSession, _: NodeId) -> anyhow::Result<NodeId> {
        self.place(index, s)
    }
}

#[derive(Debug)]
struct Rendezvous {
    live: Vec<(u64, NodeId)>,
}

impl Policy for Rendezvous {
    fn name(&self) -> &'static str {
        "rendezvous"
    }
    fn place(&mut self, _: usize, session: &SimSession) -> anyhow::Result<NodeId> {
        let key = key_hash(&session.key);
        self.live
            .iter()
            .max_by_key(|&&(hash, _)| pair_hash(key, hash))
            .map(|&(_, node)| node)
            .ok_or_else(|| anyhow::anyhow!("no live node"))
    }
    fn node_failed(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.live.retain(|&(_, n)| n != node);
        Ok(())
    }
    fn node_added(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.live.push((node_hash(node), node));
        Ok(())
    }
    fn relocate(&mut self, index: usize, s: &SimSession, _: NodeId) -> anyhow::Result<NodeId> {
        self.place(index, s)
    }
}

#[derive(Debug)]
struct Swarmbus {
    fleet: Fleet,
    table: SessionTable,
    model_names: Vec<String>,
    cache_models: usize,
}

impl Swarmbus {
    fn spec(node: NodeId, cache_models: usize) -> NodeSpec {
        let memory = MODEL_BYTES * cache_models as u64;
        NodeSpec::new(
            node,
            Zone(format!("zone-{}", node.0 % 4)),
            Gpus {
                count: GPUS_PER_NODE,
                model: "synthetic".into(),
                memory_total_bytes: memory,
                memory_free_bytes: memory,
            },
        )
    }

    fn open(&mut self, index: usize, session: &SimSession) -> anyhow::Result<NodeId> {
        // Arrival number as the clock; leases outlive the run.
        let pin = self.table.open(
            &mut self.fleet,
            &session.key,
            Some(&self.model_names[session.model]),
            index as u64,
        )?;
        Ok(pin.node)
    }
}

impl Policy for Swarmbus {
    fn name(&self) -> &'static str {
        "swarmbus"
    }
    fn place(&mut self, index: usize, session: &SimSession) -> anyhow::Result<NodeId> {
        self.open(index, session)
    }
    fn node_failed(&mut self, node: NodeId) -> anyhow::Result<()> {
        // Sessions move one by one in `relocate`, so each cold load is visible to the
        // next decision, as on a real fleet.
        self.fleet
            .set_health(node, swarmbus_affinity::Health::Unhealthy)?;
        Ok(())
    }
    fn node_added(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.fleet.add_node(Self::spec(node, self.cache_models))?;
        Ok(())
    }
    fn relocate(&mut self, index: usize, s: &SimSession, _: NodeId) -> anyhow::Result<NodeId> {
        self.open(index, s)
    }
    fn cache_changed(&mut self, node: NodeId, loaded: usize, evicted: Option<usize>) {
        // The node exists: the harness only touches caches of nodes the policy placed on.
        if let Some(evicted) = evicted {
            let _ = self.fleet.model_evicted(node, &self.model_names[evicted]);
        }
        let _ = self.fleet.model_loaded(node, &self.model_names[loaded]);
        let resident = self.fleet.node(node).map_or(0, |spec| spec.models.len());
        let free = MODEL_BYTES * self.cache_models.saturating_sub(resident) as u64;
        let _ = self.fleet.set_memory_free(node, free);
    }
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    name: &'static str,
    cache_hit_rate: f64,
    max_over_avg_load: f64,
    moved_on_failure: f64,
    moved_on_addition: f64,
}

#[derive(Debug)]
struct Plan {
    sessions: Vec<SimSession>,
    initial_nodes: Vec<NodeId>,
    failed: NodeId,
    failure_at: usize,
    added: NodeId,
    addition_at: usize,
    cache_models: usize,
}

/// Runs one policy over the plan and measures it.
fn simulate(plan: &Plan, policy: &mut dyn Policy) -> anyhow::Result<Figures> {
    let node_slots = plan.initial_nodes.len() + 1;
    let mut caches = vec![ModelCache::default(); node_slots];
    let mut assigned: Vec<NodeId> = Vec::with_capacity(plan.sessions.len());
    let mut live: BTreeSet<NodeId> = plan.initial_nodes.iter().copied().collect();
    let (mut placements, mut hits) = (0u64, 0u64);
    let mut touch = |policy: &mut dyn Policy, node: NodeId, model: usize| {
        let (hit, evicted) = caches[node.0 as usize].touch(model, plan.cache_models);
        placements += 1;
        if hit {
            hits += 1;
        } else {
            policy.cache_changed(node, model, evicted);
        }
    };
    let (mut moved_on_failure, mut moved_on_addition, mut worst_ratio) = (0.0, 0.0, 0.0f64);
    for (index, session) in plan.sessions.iter().enumerate() {
        let event = if index == plan.failure_at {
            policy.node_failed(plan.failed)?;
            live.remove(&plan.failed);
            Some(true)
        } else if index == plan.addition_at {
            policy.node_added(plan.added)?;
            live.insert(plan.added);
            Some(false)
        } else {
            None
        };
        if let Some(failure) = event {
            let mut moved = 0usize;
            for (earlier, s) in plan.sessions[..index].iter().enumerate() {
                let now = policy.relocate(earlier, s, assigned[earlier])?;
                ensure!(
                    live.contains(&now),
                    "{} placed on dead {now}",
                    policy.name()
                );
                if now != assigned[earlier] {
                    moved += 1;
                    assigned[earlier] = now;
                    touch(policy, now, s.model);
                }
            }
            let fraction = moved as f64 / index.max(1) as f64;
            if failure {
                moved_on_failure = fraction;
                worst_ratio = worst_ratio.max(max_over_avg(&assigned, &live));
            } else {
                moved_on_addition = fraction;
            }
        }
        let node = policy.place(index, session)?;
        ensure!(
            live.contains(&node),
            "{} placed on dead {node}",
            policy.name()
        );
        assigned.push(node);
        touch(policy, node, session.model);
    }
    worst_ratio = worst_ratio.max(max_over_avg(&assigned, &live));
    Ok(Figures {
        name: policy.name(),
        cache_hit_rate: hits as f64 / placements.max(1) as f64,
        max_over_avg_load: worst_ratio,
        moved_on_failure,
        moved_on_addition,
    })
}

fn max_over_avg(assigned: &[NodeId], live: &BTreeSet<NodeId>) -> f64 {
    let Some(&last) = live.last() else {
        return 0.0;
    };
    let mut counts = vec![0usize; last.0 as usize + 1];
    for node in assigned {
        counts[node.0 as usize] += 1;
    }
    let max = live.iter().map(|n| counts[n.0 as usize]).max().unwrap_or(0);
    let average = assigned.len() as f64 / live.len() as f64;
    if average == 0.0 {
        0.0
    } else {
        max as f64 / average
    }
}

// The simulation in the order it runs (fleet, sessions, failures, the checks, the JSON):
// its steps share the fleet and the counters, and read best in sequence.
pub fn run(args: AffinitySimArgs) -> anyhow::Result<()> {
    // A simulation: no router, nothing timed; its report holds the summary.
    crate::report::describe("placements", "no latency measured");
    if args.nodes < 2 {
        bail!("--nodes must be at least 2 (one fails during the run)");
    }
    if args.models == 0 || args.cache_models == 0 || args.vnodes == 0 {
        bail!("--models, --cache-models and --vnodes must be at least 1");
    }
    if args.sessions < 4 {
        bail!("--sessions must be at least 4");
    }
    if !(args.zipf.is_finite() && args.zipf >= 0.0) {
        bail!("--zipf must be a finite number >= 0");
    }
    if !(args.epsilon.is_finite() && args.epsilon >= 0.0) {
        bail!("--epsilon must be a finite number >= 0");
    }
    let mut rng = SplitMix64(args.seed);
    let zipf = Zipf::new(args.models, args.zipf);
    let sessions: Vec<SimSession> = (0..args.sessions)
        .map(|i| SimSession {
            key: format!("session-{i}"),
            model: zipf.sample(&mut rng),
        })
        .collect();
    let initial_nodes: Vec<NodeId> = (0..args.nodes as u64).map(NodeId).collect();
    let plan = Plan {
        failed: initial_nodes[(rng.next_u64() % args.nodes as u64) as usize],
        added: NodeId(args.nodes as u64),
        failure_at: args.sessions / 2,
        addition_at: args.sessions * 3 / 4,
        initial_nodes,
        sessions,
        cache_models: args.cache_models,
    };
    let model_names: Vec<String> = (0..args.models).map(|m| format!("model-{m}")).collect();

    let mut fleet = Fleet::new(PlacementConfig {
        load_epsilon: args.epsilon,
        ..PlacementConfig::default()
    });
    for &node in &plan.initial_nodes {
        fleet.add_node(Swarmbus::spec(node, args.cache_models))?;
    }
    let mut policies: Vec<Box<dyn Policy>> = vec![
        Box::new(RoundRobin {
            live: plan.initial_nodes.clone(),
        }),
        Box::new(Ring::new(&plan.initial_nodes, args.vnodes)),
        Box::new(Rendezvous {
            live: plan
                .initial_nodes
                .iter()
                .map(|&n| (node_hash(n), n))
                .collect(),
        }),
        Box::new(Swarmbus {
            fleet,
            table: SessionTable::new(SessionConfig {
                lease_ttl_ms: u64::MAX,
                max_sessions: args.sessions,
            }),
            model_names,
            cache_models: args.cache_models,
        }),
    ];
    let mut figures = Vec::new();
    for policy in &mut policies {
        figures.push(simulate(&plan, policy.as_mut())?);
    }

    if args.json || crate::report::enabled() {
        let policies: Vec<_> = figures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "cache_hit_rate": f.cache_hit_rate,
                    "max_over_avg_load": f.max_over_avg_load,
                    "moved_on_failure": f.moved_on_failure,
                    "moved_on_addition": f.moved_on_addition,
                })
            })
            .collect();
        let report = serde_json::json!({
            "scenario": "affinity-sim",
            "nodes": args.nodes,
            "models": args.models,
            "sessions": args.sessions,
            "zipf": args.zipf,
            "seed": args.seed,
            "cache_models": args.cache_models,
            "epsilon": args.epsilon,
            "failed_node": plan.failed.0,
            "failure_at": plan.failure_at,
            "added_node": plan.added.0,
            "addition_at": plan.addition_at,
            "policies": policies,
        });
        crate::report::summary(&report);
        if args.json {
            println!("{report}");
        }
    }
    if !args.json {
        println!(
            "affinity-sim: {} nodes, {} models (zipf {}), {} sessions, {} models cached per \
             node, seed {}; {} fails at session {}, {} joins at session {}",
            args.nodes,
            args.models,
            args.zipf,
            args.sessions,
            args.cache_models,
            args.seed,
            plan.failed,
            plan.failure_at,
            plan.added,
            plan.addition_at
        );
        println!(
            "{:<12} {:>14} {:>17} {:>16} {:>17}",
            "policy",
            "cache_hit_rate",
            "max_over_avg_load",
            "moved_on_failure",
            "moved_on_addition"
        );
        for f in &figures {
            println!(
                "{:<12} {:>14.4} {:>17.4} {:>16.4} {:>17.4}",
                f.name,
                f.cache_hit_rate,
                f.max_over_avg_load,
                f.moved_on_failure,
                f.moved_on_addition
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_the_first_items() {
        let zipf = Zipf::new(10, 1.0);
        let mut rng = SplitMix64(7);
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        // p(1) = 1 / H(10) = 0.341, p(2) = 0.171, p(10) = 0.034.
        assert!((33_000..35_300).contains(&counts[0]), "{counts:?}");
        assert!((16_300..17_900).contains(&counts[1]), "{counts:?}");
        assert!((3_000..3_800).contains(&counts[9]), "{counts:?}");
        let uniform = Zipf::new(4, 0.0);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[uniform.sample(&mut rng)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut cache = ModelCache::default();
        assert_eq!(cache.touch(1, 2), (false, None));
        assert_eq!(cache.touch(2, 2), (false, None));
        assert_eq!(cache.touch(1, 2), (true, None));
        assert_eq!(cache.touch(3, 2), (false, Some(2)));
        assert_eq!(cache.touch(1, 2), (true, None));
    }
}
