//! Property tests of the placement invariants the design promises (guarantee 6):
//! determinism, failover moves only the failed node's sessions (each to its own next
//! choice), additions move no sticky session, no node is placed above its bound, and
//! draining or unhealthy nodes get nothing new.

use proptest::prelude::*;
use swarmbus_affinity::{
    Fleet, Gpus, Health, NodeId, NodeSpec, PinOutcome, PlacementConfig, PlacementRequest,
    SessionConfig, SessionTable, Zone,
};

const MODELS: [&str; 6] = ["llama", "mistral", "qwen", "phi", "gemma", "yi"];
const LEASE_MS: u64 = 1_000_000;

#[derive(Debug, Clone)]
struct NodePlan {
    weight: u32,
    /// Bit i set: MODELS[i] is resident.
    models: u8,
    unhealthy: bool,
    draining: bool,
}

#[derive(Debug, Clone)]
struct Plan {
    nodes: Vec<NodePlan>,
    /// Each session's model (index into MODELS), if any.
    sessions: Vec<Option<usize>>,
    /// Epsilon as a fraction `numerator / 100`, so the test can check bounds exactly.
    epsilon_percent: u64,
}

fn node_plan(uniform: bool) -> impl Strategy<Value = NodePlan> {
    let weight = if uniform {
        Just(1u32).boxed()
    } else {
        (1u32..=8).boxed()
    };
    (
        weight,
        any::<u8>(),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(weight, models, unhealthy, draining)| NodePlan {
            weight,
            models: models & 0b11_1111,
            unhealthy,
            draining,
        })
}

fn plan() -> impl Strategy<Value = Plan> {
    any::<bool>().prop_flat_map(|uniform| {
        (
            prop::collection::vec(node_plan(uniform), 1..24),
            prop::collection::vec(prop::option::weighted(0.8, 0..MODELS.len()), 0..300),
            prop::sample::select(vec![0u64, 10, 25, 100]),
        )
            .prop_map(|(nodes, sessions, epsilon_percent)| Plan {
                nodes,
                sessions,
                epsilon_percent,
            })
    })
}

fn build(plan: &Plan) -> (Fleet, SessionTable) {
    let mut fleet = Fleet::new(PlacementConfig {
        load_epsilon: plan.epsilon_percent as f64 / 100.0,
        ..PlacementConfig::default()
    });
    for (id, node) in plan.nodes.iter().enumerate() {
        let mut spec = NodeSpec::new(NodeId(id as u64), Zone::default(), Gpus::default());
        spec.weight = node.weight;
        spec.models = MODELS
            .iter()
            .enumerate()
            .filter(|(i, _)| node.models & (1 << i) != 0)
            .map(|(_, m)| m.to_string())
            .collect();
        spec.health = if node.unhealthy {
            Health::Unhealthy
        } else {
            Health::Healthy
        };
        spec.draining = node.draining;
        fleet.add_node(spec).unwrap();
    }
    let table = SessionTable::new(SessionConfig {
        lease_ttl_ms: LEASE_MS,
        max_sessions: 10_000,
    });
    (fleet, table)
}

fn key(i: usize) -> String {
    format!("session-{i}")
}

fn model(plan: &Plan, i: usize) -> Option<&'static str> {
    plan.sessions[i].map(|m| MODELS[m])
}

/// Opens every session of the plan; a cold load makes the model resident, as a worker
/// would report. Returns each session's node (None if nothing could take it).
fn open_all(plan: &Plan, fleet: &mut Fleet, table: &mut SessionTable) -> Vec<Option<NodeId>> {
    (0..plan.sessions.len())
        .map(|i| {
            let pin = table.open(fleet, &key(i), model(plan, i), 0).ok()?;
            if let (PinOutcome::Placed { cold_load: true }, Some(m)) = (pin.outcome, model(plan, i))
            {
                fleet.model_loaded(pin.node, m).unwrap();
            }
            Some(pin.node)
        })
        .collect()
}

fn eligible(plan: &Plan) -> impl Iterator<Item = NodeId> + '_ {
    plan.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.unhealthy && !n.draining)
        .map(|(id, _)| NodeId(id as u64))
}

/// ceil((100 + e) * T * w / (100 * W)) in exact integers.
fn bound(plan: &Plan, total: u64, node: NodeId) -> u64 {
    let weight = u64::from(plan.nodes[node.0 as usize].weight);
    let total_weight: u64 = eligible(plan)
        .map(|n| u64::from(plan.nodes[n.0 as usize].weight))
        .sum();
    ((100 + plan.epsilon_percent) * total * weight).div_ceil(100 * total_weight)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn placement_is_deterministic(plan in plan()) {
        let (mut fleet_a, mut table_a) = build(&plan);
        let (mut fleet_b, mut table_b) = build(&plan);
        prop_assert_eq!(
            open_all(&plan, &mut fleet_a, &mut table_a),
            open_all(&plan, &mut fleet_b, &mut table_b)
        );
        let request = PlacementRequest::new("probe", Some(MODELS[0]));
        prop_assert_eq!(fleet_a.ranking(&request), fleet_b.ranking(&request));
    }

    #[test]
    fn no_node_is_placed_above_its_bound(plan in plan()) {
        let (mut fleet, mut table) = build(&plan);
        let has_eligible = eligible(&plan).next().is_some();
        for i in 0..plan.sessions.len() {
            let pin = table.open(&mut fleet, &key(i), model(&plan, i), 0);
            // Capacity exists whenever some node is eligible.
            prop_assert_eq!(pin.is_ok(), has_eligible);
            let total = i as u64 + 1;
            for node in eligible(&plan) {
                let sessions = u64::from(fleet.load(node).unwrap().sessions);
                prop_assert!(
                    sessions <= bound(&plan, total, node),
                    "{} holds {} > bound {} after {} sessions", node, sessions,
                    bound(&plan, total, node), total
                );
                prop_assert_eq!(fleet.session_bound(node), Some(bound(&plan, total, node)));
            }
        }
    }

    #[test]
    fn draining_and_unhealthy_nodes_get_nothing_new(plan in plan(), drained in any::<prop::sample::Index>()) {
        let (mut fleet, mut table) = build(&plan);
        let placed = open_all(&plan, &mut fleet, &mut table);
        for node in placed.iter().flatten() {
            let n = &plan.nodes[node.0 as usize];
            prop_assert!(!n.unhealthy && !n.draining);
        }
        // Drain one more node: its sessions leave and later sessions avoid it.
        let target = NodeId(drained.index(plan.nodes.len()) as u64);
        table.drain_node(&mut fleet, target).unwrap();
        prop_assert_eq!(fleet.load(target).unwrap().sessions, 0);
        for i in 0..plan.sessions.len() {
            let late = format!("late-{i}");
            if let Ok(pin) = table.open(&mut fleet, &late, model(&plan, i), 0) {
                prop_assert_ne!(pin.node, target);
            }
        }
        prop_assert!(table.iter().all(|(_, lease)| lease.node != target));
    }

    #[test]
    fn failover_moves_only_the_failed_nodes_sessions(plan in plan(), failed in any::<prop::sample::Index>()) {
        let (mut fleet, mut table) = build(&plan);
        let before = open_all(&plan, &mut fleet, &mut table);
        let failed = NodeId(failed.index(plan.nodes.len()) as u64);
        let moves = table.fail_node(&mut fleet, failed).unwrap();
        let on_failed = before.iter().filter(|n| **n == Some(failed)).count();
        prop_assert_eq!(moves.len(), on_failed);
        for (i, was) in before.iter().enumerate() {
            let now = table.get(&key(i)).map(|lease| lease.node);
            match was {
                Some(node) if *node == failed => {
                    prop_assert_ne!(now, Some(failed));
                    if let Some(now) = now {
                        prop_assert!(fleet.accepts_new_work(now));
                    }
                }
                other => prop_assert_eq!(now, *other, "{} moved off a healthy node", key(i)),
            }
        }
        prop_assert_eq!(fleet.load(failed).unwrap().sessions, 0);
    }

    #[test]
    fn moved_sessions_go_to_their_own_next_choice(
        nodes in 2usize..20,
        sessions in 1usize..200,
        failed in any::<prop::sample::Index>(),
    ) {
        // No models and a loose bound: nothing but the ranking decides.
        let plan = Plan {
            nodes: vec![NodePlan { weight: 1, models: 0, unhealthy: false, draining: false }; nodes],
            sessions: vec![None; sessions],
            epsilon_percent: 100 * sessions as u64,
        };
        let (mut fleet, mut table) = build(&plan);
        open_all(&plan, &mut fleet, &mut table);
        let failed = NodeId(failed.index(nodes) as u64);
        for moved in table.fail_node(&mut fleet, failed).unwrap() {
            let ranking = fleet.ranking(&PlacementRequest::new(&moved.session_key, None));
            prop_assert_eq!(ranking[0], failed);
            prop_assert_eq!(moved.to, Some(ranking[1]));
        }
    }

    #[test]
    fn an_added_node_takes_no_sticky_session(plan in plan()) {
        let (mut fleet, mut table) = build(&plan);
        let before = open_all(&plan, &mut fleet, &mut table);
        let newcomer = NodeId(plan.nodes.len() as u64);
        let mut spec = NodeSpec::new(newcomer, Zone::default(), Gpus { count: 8, ..Gpus::default() });
        spec.models = MODELS.iter().map(|m| m.to_string()).collect();
        fleet.add_node(spec).unwrap();
        for (i, was) in before.iter().enumerate() {
            let Some(was) = was else { continue };
            let pin = table.open(&mut fleet, &key(i), model(&plan, i), 1).unwrap();
            prop_assert_eq!(pin.outcome, PinOutcome::Kept);
            prop_assert_eq!(pin.node, *was);
        }
        prop_assert_eq!(fleet.load(newcomer).unwrap().sessions, 0);
    }
}
