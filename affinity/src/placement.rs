//! The node registry and the placement decision.
//!
//! # The decision
//!
//! For a request (session key, optional model) every node draws a weighted rendezvous
//! *race* value `-ln(u) / weight`, where `u` in (0, 1) comes from
//! [`pair_hash`] of the ranking key and the node id. The lowest
//! race wins: this is highest-random-weight hashing with the logarithmic weighting of
//! Schindelhauer and Schomaker, so a node's chance of ranking first is its share of the
//! total weight, and removing a node changes only the keys it ranked first.
//!
//! On top of the ranking:
//!
//! 1. **Eligibility.** Only healthy, non-draining nodes get new sessions.
//! 2. **Bounded loads.** A node may take a session only while its sessions stay within
//!    `ceil((1 + epsilon) * T * w / W)`, where `T` counts the sessions on eligible nodes
//!    *after* this placement, `w` is the node's weight and `W` the total weight of eligible
//!    nodes. With equal weights this is `ceil((1 + epsilon) * average)`. Some node always
//!    has room (the bounds sum to more than `T`), so a placement fails only when no node is
//!    eligible. The check is exact integer arithmetic; epsilon is kept to millionths.
//! 3. **Model-cache preference.** With a model named, the nodes that have it resident
//!    (warm) race among themselves; the rest race with `cold_load_cost` added to their race
//!    value. With the default cost (infinite) any warm node within its bound wins over every
//!    cold node; a finite cost lets a much better-ranked cold node win.
//!
//! The chosen node's session counter goes up inside [`Fleet::place`], so the next decision
//! (the next session of a burst) already sees it: a burst cannot herd onto one node beyond
//! its bound.
//!
//! # Ranking key
//!
//! Nodes are ranked by the *session key*, so each session has its own order of nodes to
//! fall back on, and the sessions of one model spread over the nodes that have it warm
//! instead of queueing on one of them. (Ranking by model name instead, so that every model
//! has one fixed list of home nodes, was tried in the `affinity-sim` scenario: it cold-loaded
//! about ten times as often, since every spill of a popular model hit the same second
//! home and evicted what that node held.)
//!
//! # Cost
//!
//! One decision reads the warm nodes of its model and, when none has room, every node once.
//! A node whose cheap lower bound on its race (`(1 - u) / weight`) cannot beat the best so
//! far is skipped before the logarithm, so only a handful of logarithms are taken per
//! decision however large the fleet.

use std::collections::{BTreeMap, HashMap};

use crate::error::AffinityError;
use crate::hash::{key_hash, node_hash, pair_hash, unit_interval, FixedState};
use crate::node::{Health, Load, NodeId, NodeSpec};

/// Epsilon is held as an integer number of millionths so that bound checks are exact.
const EPSILON_SCALE: u64 = 1_000_000;

/// Relative slack on the race lower bound (see [`Draw::lower_bound_scale`]).
const LOWER_BOUND_SLACK: f64 = 1.0 / (1u64 << 40) as f64;

/// Tunables of the placement decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacementConfig {
    /// Load slack epsilon: no placement takes a node above
    /// `ceil((1 + epsilon) * its weighted share of the sessions)`. Smaller is more even and
    /// moves more new sessions away from their first choice. Default 0.25. Negative or NaN
    /// counts as 0; kept to millionths.
    pub load_epsilon: f64,
    /// What a cold load costs, in race units (a weight-1 node's race value has mean 1):
    /// added to the race value of every node that does not have the requested model
    /// resident. Default `f64::INFINITY`: a warm node within its bound always wins. 0
    /// ignores the cache. Negative or NaN counts as 0.
    pub cold_load_cost: f64,
    /// Most nodes the fleet registers; [`Fleet::add_node`] fails past it. Default 65,536.
    pub max_nodes: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            load_epsilon: 0.25,
            cold_load_cost: f64::INFINITY,
            max_nodes: 65_536,
        }
    }
}

/// One session to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest<'a> {
    /// The session's key (an agent's session id).
    pub session_key: &'a str,
    /// The model the session will run, if any.
    pub model: Option<&'a str>,
}

impl<'a> PlacementRequest<'a> {
    pub fn new(session_key: &'a str, model: Option<&'a str>) -> Self {
        Self { session_key, model }
    }

    /// The hash nodes are ranked by: the session key's (see the module doc).
    pub fn ranking_hash(&self) -> u64 {
        key_hash(self.session_key)
    }
}

/// The outcome of [`Fleet::place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub node: NodeId,
    /// The request named a model that the node does not have resident: it must load it.
    pub cold_load: bool,
}

/// The per-node figures a decision reads for a candidate that may win: everything but
/// the descriptive [`NodeSpec`], in one place.
#[derive(Debug, Clone, Copy)]
struct Hot {
    id: NodeId,
    node_hash: u64,
    inv_weight: f64,
    weight: u32,
    sessions: u32,
    eligible: bool,
}

impl Hot {
    fn of(spec: &NodeSpec, sessions: u32) -> Self {
        let weight = spec.effective_weight();
        Self {
            id: spec.id,
            node_hash: node_hash(spec.id),
            inv_weight: 1.0 / f64::from(weight),
            weight,
            sessions,
            eligible: spec.accepts_new_work(),
        }
    }
}

/// What the full pass reads of every node, kept apart from [`Hot`] so that the pass over
/// 1,000 nodes streams 16 KB.
#[derive(Debug, Clone, Copy)]
struct Draw {
    node_hash: u64,
    /// `2^-52 / weight`, shrunk by 2^-40: `(!draw >> 12) * lower_bound_scale` is a lower
    /// bound of the node's race value (see [`lower_bound`]) with room for `ln`'s rounding.
    lower_bound_scale: f64,
}

impl Draw {
    fn of(hot: &Hot) -> Self {
        const CELL: f64 = 1.0 / (1u64 << 52) as f64;
        Self {
            node_hash: hot.node_hash,
            lower_bound_scale: CELL * (1.0 - LOWER_BOUND_SLACK) * hot.inv_weight,
        }
    }
}

/// A lower bound of `race(draw, 1 / weight)` that needs no logarithm: `-ln(u) >= 1 - u`,
/// and `1 - u` is `((!draw >> 12) + 0.5) * 2^-52` for the `u` of
/// [`unit_interval`](crate::hash::unit_interval).
#[inline]
fn lower_bound(draw: u64, lower_bound_scale: f64) -> f64 {
    (!draw >> 12) as f64 * lower_bound_scale
}

/// The best candidate of a pass so far: lowest race value, ties to the lower node id.
#[derive(Debug, Clone, Copy)]
struct Best {
    race: f64,
    id: NodeId,
    slot: usize,
}

impl Best {
    fn beaten_by(best: &Option<Best>, race: f64, id: NodeId) -> bool {
        match best {
            None => true,
            Some(b) => race < b.race || (race == b.race && id < b.id),
        }
    }
}

/// The race value of a draw for a node: `-ln(u) / weight`, lower is better.
#[inline]
fn race(draw: u64, inv_weight: f64) -> f64 {
    -unit_interval(draw).ln() * inv_weight
}

/// The registered nodes, their load, and where each model is resident.
///
/// Call order: register nodes ([`add_node`](Self::add_node)), keep them current
/// ([`update_node`](Self::update_node), [`set_health`](Self::set_health),
/// [`model_loaded`](Self::model_loaded), ...), and place sessions with
/// [`place`](Self::place) (or through a [`SessionTable`](crate::SessionTable), which also
/// releases and moves them). No method reads a clock or draws randomness; the same calls in
/// the same order give the same placements.
#[derive(Debug, Clone)]
pub struct Fleet {
    // Invariant, relied on by every `[slot]` index below: `specs`, `in_flight`, `hot` and
    // `draws` have one entry per registered node at the same index, and `slot_of` maps
    // each registered id to that index. Only add_node and remove_node change the layout.
    config: PlacementConfig,
    epsilon_millionths: u64,
    cold_load_cost: f64,
    specs: Vec<NodeSpec>,
    in_flight: Vec<u32>,
    hot: Vec<Hot>,
    draws: Vec<Draw>,
    slot_of: HashMap<NodeId, usize, FixedState>,
    /// Model name -> nodes that have it resident, sorted by id.
    warm: BTreeMap<String, Vec<NodeId>>,
    eligible_nodes: usize,
    eligible_weight: u64,
    eligible_sessions: u64,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new(PlacementConfig::default())
    }
}

impl Fleet {
    pub fn new(config: PlacementConfig) -> Self {
        let epsilon = if config.load_epsilon.is_nan() {
            0.0
        } else {
            config.load_epsilon.max(0.0)
        };
        // Saturates far above any useful epsilon (the cast clamps at u64::MAX).
        let epsilon_millionths = (epsilon * EPSILON_SCALE as f64).round() as u64;
        let cold_load_cost = if config.cold_load_cost.is_nan() {
            0.0
        } else {
            config.cold_load_cost.max(0.0)
        };
        Self {
            config,
            epsilon_millionths: epsilon_millionths.min(u64::from(u32::MAX)),
            cold_load_cost,
            specs: Vec::new(),
            in_flight: Vec::new(),
            hot: Vec::new(),
            draws: Vec::new(),
            slot_of: HashMap::with_hasher(FixedState),
            warm: BTreeMap::new(),
            eligible_nodes: 0,
            eligible_weight: 0,
            eligible_sessions: 0,
        }
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    /// Number of registered nodes.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Nodes that may take new sessions (healthy and not draining).
    pub fn eligible_len(&self) -> usize {
        self.eligible_nodes
    }

    /// Sessions on nodes that may take new sessions.
    pub fn eligible_sessions(&self) -> u64 {
        self.eligible_sessions
    }

    /// Every registered node with its load, in registration order (which shifts when a
    /// node is removed).
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeSpec, Load)> + '_ {
        self.specs
            .iter()
            .zip(&self.hot)
            .zip(&self.in_flight)
            .map(|((spec, hot), &in_flight)| {
                (
                    spec,
                    Load {
                        sessions: hot.sessions,
                        in_flight,
                    },
                )
            })
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.slot_of.get(&id).map(|&slot| &self.specs[slot])
    }

    pub fn load(&self, id: NodeId) -> Option<Load> {
        self.slot_of.get(&id).map(|&slot| Load {
            sessions: self.hot[slot].sessions,
            in_flight: self.in_flight[slot],
        })
    }

    /// Whether `id` is registered, healthy and not draining.
    pub fn accepts_new_work(&self, id: NodeId) -> bool {
        self.slot_of
            .get(&id)
            .is_some_and(|&slot| self.hot[slot].eligible)
    }

    /// The most sessions `id` may hold with the sessions now on eligible nodes:
    /// `ceil((1 + epsilon) * T * w / W)`. `None` when the node is unknown or not eligible.
    pub fn session_bound(&self, id: NodeId) -> Option<u64> {
        let &slot = self.slot_of.get(&id)?;
        let hot = &self.hot[slot];
        if !hot.eligible {
            return None;
        }
        let numerator = u128::from(EPSILON_SCALE + self.epsilon_millionths)
            * u128::from(self.eligible_sessions)
            * u128::from(hot.weight);
        let denominator = u128::from(EPSILON_SCALE) * u128::from(self.eligible_weight);
        // eligible_weight >= 1 because this node is eligible and weighs at least 1.
        Some(u64::try_from(numerator.div_ceil(denominator)).unwrap_or(u64::MAX))
    }

    /// Registers a node with no sessions.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<(), AffinityError> {
        if self.slot_of.contains_key(&spec.id) {
            return Err(AffinityError::DuplicateNode { node: spec.id });
        }
        if self.specs.len() >= self.config.max_nodes {
            return Err(AffinityError::FleetFull {
                max_nodes: self.config.max_nodes,
            });
        }
        let slot = self.specs.len();
        self.slot_of.insert(spec.id, slot);
        let hot = Hot::of(&spec, 0);
        self.draws.push(Draw::of(&hot));
        self.hot.push(hot);
        self.in_flight.push(0);
        for model in &spec.models {
            self.index_model(spec.id, model);
        }
        self.specs.push(spec);
        self.recount();
        Ok(())
    }

    /// Replaces what a registered node advertises (models, memory, health, weight, ...),
    /// keeping its session count. Sessions already pinned there stay; call
    /// [`SessionTable::evacuate`](crate::SessionTable::evacuate) if the update made the
    /// node unhealthy or draining.
    pub fn update_node(&mut self, spec: NodeSpec) -> Result<(), AffinityError> {
        let slot = self.slot(spec.id)?;
        let old_models = std::mem::take(&mut self.specs[slot].models);
        for model in &old_models {
            self.unindex_model(spec.id, model);
        }
        for model in &spec.models {
            self.index_model(spec.id, model);
        }
        self.hot[slot] = Hot::of(&spec, self.hot[slot].sessions);
        self.draws[slot] = Draw::of(&self.hot[slot]);
        self.specs[slot] = spec;
        self.recount();
        Ok(())
    }

    /// Unregisters a node and returns its last load. Sessions still pinned to it are the
    /// caller's to move first ([`SessionTable::fail_node`](crate::SessionTable::fail_node)).
    pub fn remove_node(&mut self, id: NodeId) -> Result<Load, AffinityError> {
        let slot = self.slot(id)?;
        let load = Load {
            sessions: self.hot[slot].sessions,
            in_flight: self.in_flight[slot],
        };
        let spec = self.specs.swap_remove(slot);
        self.hot.swap_remove(slot);
        self.draws.swap_remove(slot);
        self.in_flight.swap_remove(slot);
        self.slot_of.remove(&id);
        if let Some(moved) = self.specs.get(slot) {
            self.slot_of.insert(moved.id, slot);
        }
        for model in &spec.models {
            self.unindex_model(id, model);
        }
        self.recount();
        Ok(load)
    }

    pub fn set_health(&mut self, id: NodeId, health: Health) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        self.specs[slot].health = health;
        self.hot[slot].eligible = self.specs[slot].accepts_new_work();
        self.recount();
        Ok(())
    }

    pub fn set_draining(&mut self, id: NodeId, draining: bool) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        self.specs[slot].draining = draining;
        self.hot[slot].eligible = self.specs[slot].accepts_new_work();
        self.recount();
        Ok(())
    }

    /// The node reports `model` resident. Idempotent.
    pub fn model_loaded(&mut self, id: NodeId, model: &str) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        if !self.specs[slot].has_model(model) {
            self.specs[slot].models.push(model.to_owned());
            self.index_model(id, model);
        }
        Ok(())
    }

    /// The node reports `model` evicted. Idempotent.
    pub fn model_evicted(&mut self, id: NodeId, model: &str) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        let models = &mut self.specs[slot].models;
        let before = models.len();
        models.retain(|m| m != model);
        if models.len() != before {
            self.unindex_model(id, model);
        }
        Ok(())
    }

    pub fn set_memory_free(&mut self, id: NodeId, bytes: u64) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        self.specs[slot].gpus.memory_free_bytes = bytes;
        Ok(())
    }

    pub fn set_in_flight(&mut self, id: NodeId, in_flight: u32) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        self.in_flight[slot] = in_flight;
        Ok(())
    }

    /// Nodes that have `model` resident, by id.
    pub fn warm_nodes(&self, model: &str) -> &[NodeId] {
        self.warm.get(model).map_or(&[], Vec::as_slice)
    }

    /// Places one session: picks a node as the module doc describes and counts the session
    /// on it before returning.
    pub fn place(&mut self, request: &PlacementRequest<'_>) -> Result<Placement, AffinityError> {
        let (slot, cold_load) = self.choose(request)?;
        let hot = &mut self.hot[slot];
        // choose() only returns nodes below their bound, which is below u32::MAX.
        hot.sessions = hot.sessions.saturating_add(1);
        self.eligible_sessions += 1;
        Ok(Placement {
            node: hot.id,
            cold_load,
        })
    }

    /// Counts one session on `id` without choosing it: for a pin decided earlier (restored
    /// from a log after a restart). The load bound is not checked: the pin exists already.
    pub fn assign(&mut self, id: NodeId) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        let hot = &mut self.hot[slot];
        hot.sessions = hot.sessions.saturating_add(1);
        if hot.eligible {
            self.eligible_sessions += 1;
        }
        Ok(())
    }

    /// The eligible node with the fewest requests in flight per unit of weight (ties to
    /// fewer sessions, then the lower id), whatever it has loaded; `None` when no node is
    /// eligible. For a request whose model no eligible node has resident.
    pub fn least_loaded(&self) -> Option<NodeId> {
        self.hot
            .iter()
            .enumerate()
            .filter(|(_, hot)| hot.eligible)
            .min_by(|(a, a_hot), (b, b_hot)| {
                let a_load = u64::from(self.in_flight[*a]) * u64::from(b_hot.weight);
                let b_load = u64::from(self.in_flight[*b]) * u64::from(a_hot.weight);
                (a_load, a_hot.sessions, a_hot.id).cmp(&(b_load, b_hot.sessions, b_hot.id))
            })
            .map(|(_, hot)| hot.id)
    }

    /// Counts one session off `id` (closed, expired or moved). A node with no sessions
    /// stays at zero.
    pub fn release(&mut self, id: NodeId) -> Result<(), AffinityError> {
        let slot = self.slot(id)?;
        let hot = &mut self.hot[slot];
        if hot.sessions > 0 {
            hot.sessions -= 1;
            if hot.eligible {
                self.eligible_sessions -= 1;
            }
        }
        Ok(())
    }

    /// Every registered node, best first, by the weighted rendezvous race alone (no
    /// health, bounds or cache): the order a session would try nodes in if all were free.
    pub fn ranking(&self, request: &PlacementRequest<'_>) -> Vec<NodeId> {
        let key = request.ranking_hash();
        let mut raced: Vec<(f64, NodeId)> = self
            .hot
            .iter()
            .map(|hot| (race(pair_hash(key, hot.node_hash), hot.inv_weight), hot.id))
            .collect();
        raced.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        raced.into_iter().map(|(_, id)| id).collect()
    }

    /// A node for a request that needs no affinity: among eligible nodes with `model`
    /// resident, the one with the fewest requests in flight per unit of weight (ties to
    /// fewer sessions, then the lower id). `None` when no eligible node has the model.
    pub fn least_loaded_with_model(&self, model: &str) -> Option<NodeId> {
        let mut best: Option<(usize, NodeId)> = None;
        for &id in self.warm_nodes(model) {
            let Some(&slot) = self.slot_of.get(&id) else {
                continue;
            };
            if !self.hot[slot].eligible {
                continue;
            }
            let better = match best {
                None => true,
                Some((b, b_id)) => {
                    let (a_hot, b_hot) = (&self.hot[slot], &self.hot[b]);
                    let a_load = u64::from(self.in_flight[slot]) * u64::from(b_hot.weight);
                    let b_load = u64::from(self.in_flight[b]) * u64::from(a_hot.weight);
                    (a_load, a_hot.sessions, id) < (b_load, b_hot.sessions, b_id)
                }
            };
            if better {
                best = Some((slot, id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn slot(&self, id: NodeId) -> Result<usize, AffinityError> {
        self.slot_of
            .get(&id)
            .copied()
            .ok_or(AffinityError::UnknownNode { node: id })
    }

    fn index_model(&mut self, id: NodeId, model: &str) {
        let nodes = self.warm.entry(model.to_owned()).or_default();
        if let Err(at) = nodes.binary_search(&id) {
            nodes.insert(at, id);
        }
    }

    fn unindex_model(&mut self, id: NodeId, model: &str) {
        if let Some(nodes) = self.warm.get_mut(model) {
            if let Ok(at) = nodes.binary_search(&id) {
                nodes.remove(at);
            }
            if nodes.is_empty() {
                self.warm.remove(model);
            }
        }
    }

    fn recount(&mut self) {
        let (mut nodes, mut weight, mut sessions) = (0, 0u64, 0u64);
        for hot in self.hot.iter().filter(|hot| hot.eligible) {
            nodes += 1;
            weight += u64::from(hot.weight);
            sessions += u64::from(hot.sessions);
        }
        self.eligible_nodes = nodes;
        self.eligible_weight = weight;
        self.eligible_sessions = sessions;
    }

    /// Whether the node in `slot` may take one more session: its sessions after the
    /// placement stay within `ceil((1 + e) * (T + 1) * w / W)`, i.e. (for whole numbers of
    /// sessions) `sessions < (1 + e) * (T + 1) * w / W`, checked in exact integers.
    #[inline]
    fn has_room(&self, hot: &Hot) -> bool {
        let lhs =
            u128::from(hot.sessions) * u128::from(EPSILON_SCALE) * u128::from(self.eligible_weight);
        let rhs = u128::from(EPSILON_SCALE + self.epsilon_millionths)
            * u128::from(self.eligible_sessions + 1)
            * u128::from(hot.weight);
        lhs < rhs && hot.sessions < u32::MAX
    }

    /// The slot to place `request` on and whether that is a cold load.
    fn choose(&self, request: &PlacementRequest<'_>) -> Result<(usize, bool), AffinityError> {
        if self.eligible_nodes == 0 {
            return Err(AffinityError::NoEligibleNode {
                nodes: self.specs.len(),
            });
        }
        let key = request.ranking_hash();
        let warm_ids = request.model.map_or(&[][..], |m| self.warm_nodes(m));

        // Warm nodes race without the cold-load cost.
        let mut warm_best: Option<Best> = None;
        for id in warm_ids {
            let Some(&slot) = self.slot_of.get(id) else {
                continue;
            };
            let draw = pair_hash(key, self.draws[slot].node_hash);
            if warm_best
                .is_some_and(|b| lower_bound(draw, self.draws[slot].lower_bound_scale) > b.race)
            {
                continue;
            }
            let hot = &self.hot[slot];
            let r = race(draw, hot.inv_weight);
            if Best::beaten_by(&warm_best, r, hot.id) && hot.eligible && self.has_room(hot) {
                warm_best = Some(Best {
                    race: r,
                    id: hot.id,
                    slot,
                });
            }
        }
        let cost = if request.model.is_some() {
            self.cold_load_cost
        } else {
            0.0
        };
        if let Some(best) = warm_best {
            if cost.is_infinite() {
                return Ok((best.slot, false));
            }
        }

        // Every node races with the cost added. A warm node's entry here is worse than its
        // own warm entry above, so including it changes nothing.
        let finite_cost = if cost.is_finite() { cost } else { 0.0 };
        let mut cold_best: Option<Best> = None;
        let mut threshold = f64::INFINITY;
        for (slot, node) in self.draws.iter().enumerate() {
            let draw = pair_hash(key, node.node_hash);
            // A node whose lower bound cannot beat the best so far is skipped without
            // taking the logarithm; adding the same cost to both sides keeps the order.
            if lower_bound(draw, node.lower_bound_scale) + finite_cost > threshold {
                continue;
            }
            let hot = &self.hot[slot];
            let r = race(draw, hot.inv_weight) + finite_cost;
            if Best::beaten_by(&cold_best, r, hot.id) && hot.eligible && self.has_room(hot) {
                cold_best = Some(Best {
                    race: r,
                    id: hot.id,
                    slot,
                });
                threshold = r;
            }
        }
        let chosen = match (warm_best, cold_best) {
            (Some(w), Some(c)) => {
                if Best::beaten_by(&Some(w), c.race, c.id) {
                    c
                } else {
                    w
                }
            }
            (Some(w), None) => w,
            (None, Some(c)) => c,
            // Unreachable while eligible_nodes > 0: the bounds of the eligible nodes sum to
            // more than the sessions on them, so one has room. Report rather than panic.
            (None, None) => {
                return Err(AffinityError::NoEligibleNode {
                    nodes: self.specs.len(),
                })
            }
        };
        let cold_load = request
            .model
            .is_some_and(|_| warm_ids.binary_search(&chosen.id).is_err());
        Ok((chosen.slot, cold_load))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Gpus, Zone};

    fn spec(id: u64, weight: u32, models: &[&str]) -> NodeSpec {
        let mut spec = NodeSpec::new(NodeId(id), Zone::default(), Gpus::default());
        spec.weight = weight;
        spec.models = models.iter().map(|m| m.to_string()).collect();
        spec
    }

    fn fleet_of(nodes: u64, config: PlacementConfig) -> Fleet {
        let mut fleet = Fleet::new(config);
        for id in 0..nodes {
            fleet.add_node(spec(id, 1, &[])).unwrap();
        }
        fleet
    }

    #[test]
    fn empty_or_ineligible_fleets_refuse() {
        let mut fleet = Fleet::default();
        let request = PlacementRequest::new("s", None);
        assert_eq!(
            fleet.place(&request),
            Err(AffinityError::NoEligibleNode { nodes: 0 })
        );
        fleet.add_node(spec(1, 1, &[])).unwrap();
        fleet.set_draining(NodeId(1), true).unwrap();
        assert_eq!(
            fleet.place(&request),
            Err(AffinityError::NoEligibleNode { nodes: 1 })
        );
        assert_eq!(fleet.load(NodeId(1)).unwrap().sessions, 0);
    }

    #[test]
    fn registry_errors_name_the_node() {
        let mut fleet = Fleet::new(PlacementConfig {
            max_nodes: 1,
            ..PlacementConfig::default()
        });
        fleet.add_node(spec(1, 1, &[])).unwrap();
        assert_eq!(
            fleet.add_node(spec(1, 1, &[])),
            Err(AffinityError::DuplicateNode { node: NodeId(1) })
        );
        assert_eq!(
            fleet.add_node(spec(2, 1, &[])),
            Err(AffinityError::FleetFull { max_nodes: 1 })
        );
        assert_eq!(
            fleet.release(NodeId(9)),
            Err(AffinityError::UnknownNode { node: NodeId(9) })
        );
        assert_eq!(
            fleet.set_health(NodeId(9), Health::Unhealthy),
            Err(AffinityError::UnknownNode { node: NodeId(9) })
        );
    }

    #[test]
    fn the_first_eligible_node_in_the_ranking_wins_when_loads_allow() {
        let mut fleet = fleet_of(8, PlacementConfig::default());
        for i in 0..50 {
            let key = format!("s{i}");
            let request = PlacementRequest::new(&key, None);
            let ranking = fleet.ranking(&request);
            let placed = fleet.place(&request).unwrap();
            // Release at once so bounds never bind.
            fleet.release(placed.node).unwrap();
            assert_eq!(placed.node, ranking[0]);
            assert!(!placed.cold_load);
        }
    }

    #[test]
    fn a_warm_node_wins_over_a_better_ranked_cold_one() {
        let mut fleet = fleet_of(8, PlacementConfig::default());
        let request = PlacementRequest::new("session", Some("llama"));
        let ranking = fleet.ranking(&request);
        let warm = ranking[5];
        fleet.model_loaded(warm, "llama").unwrap();
        let placed = fleet.place(&request).unwrap();
        assert_eq!(
            placed,
            Placement {
                node: warm,
                cold_load: false
            }
        );
        // Without a resident copy anywhere the first node in the ranking takes it cold.
        let cold = fleet
            .place(&PlacementRequest::new("session", Some("mistral")))
            .unwrap();
        assert_eq!(
            cold,
            Placement {
                node: ranking[0],
                cold_load: true
            }
        );
    }

    #[test]
    fn zero_cold_load_cost_ignores_the_cache() {
        let mut fleet = fleet_of(
            8,
            PlacementConfig {
                cold_load_cost: 0.0,
                ..PlacementConfig::default()
            },
        );
        let request = PlacementRequest::new("session", Some("llama"));
        let ranking = fleet.ranking(&request);
        fleet.model_loaded(ranking[5], "llama").unwrap();
        let placed = fleet.place(&request).unwrap();
        assert_eq!(placed.node, ranking[0]);
        assert!(placed.cold_load);
    }

    #[test]
    fn a_burst_for_one_warm_node_spills_at_its_bound() {
        let mut fleet = fleet_of(10, PlacementConfig::default());
        fleet.model_loaded(NodeId(3), "llama").unwrap();
        let mut on_warm = 0u64;
        for i in 0..1000 {
            let key = format!("burst-{i}");
            let warm_before = fleet.warm_nodes("llama").to_vec();
            let placed = fleet
                .place(&PlacementRequest::new(&key, Some("llama")))
                .unwrap();
            assert_eq!(placed.cold_load, !warm_before.contains(&placed.node));
            if placed.node == NodeId(3) {
                on_warm += 1;
            }
            // A cold load makes the model resident, as the node would report.
            fleet.model_loaded(placed.node, "llama").unwrap();
            for node in 0..10 {
                let sessions = u64::from(fleet.load(NodeId(node)).unwrap().sessions);
                assert!(sessions <= fleet.session_bound(NodeId(node)).unwrap());
            }
        }
        // ceil(1.25 * 1000 / 10) = 125 at most, and the warm node filled to it.
        assert_eq!(fleet.session_bound(NodeId(3)), Some(125));
        assert!(on_warm >= 100, "{on_warm}");
        assert!(fleet.load(NodeId(3)).unwrap().sessions <= 125);
    }

    #[test]
    fn session_bound_is_the_weighted_ceiling() {
        let mut fleet = Fleet::default();
        fleet.add_node(spec(1, 1, &[])).unwrap();
        fleet.add_node(spec(2, 3, &[])).unwrap();
        for i in 0..10 {
            fleet
                .place(&PlacementRequest::new(&format!("s{i}"), None))
                .unwrap();
        }
        // T = 10, W = 4: ceil(1.25 * 10 * 1 / 4) = 4, ceil(1.25 * 10 * 3 / 4) = 10.
        assert_eq!(fleet.session_bound(NodeId(1)), Some(4));
        assert_eq!(fleet.session_bound(NodeId(2)), Some(10));
        fleet.set_draining(NodeId(1), true).unwrap();
        assert_eq!(fleet.session_bound(NodeId(1)), None);
    }

    #[test]
    fn heavier_nodes_rank_first_in_proportion() {
        let mut fleet = Fleet::default();
        fleet.add_node(spec(1, 1, &[])).unwrap();
        fleet.add_node(spec(2, 3, &[])).unwrap();
        let firsts = (0..20_000)
            .filter(|i| {
                let key = format!("k{i}");
                fleet.ranking(&PlacementRequest::new(&key, None))[0] == NodeId(2)
            })
            .count();
        // Expected 15,000 (weight 3 of 4); the draws are fixed, so this is exact each run.
        assert!((14_700..15_300).contains(&firsts), "{firsts}");
    }

    #[test]
    fn removing_a_node_keeps_the_others_addressable() {
        let mut fleet = Fleet::default();
        for id in 0..4 {
            fleet.add_node(spec(id, 1, &["m"])).unwrap();
        }
        fleet.set_in_flight(NodeId(3), 7).unwrap();
        assert_eq!(fleet.remove_node(NodeId(0)).unwrap().sessions, 0);
        assert_eq!(fleet.len(), 3);
        assert!(fleet.node(NodeId(0)).is_none());
        assert_eq!(fleet.load(NodeId(3)).unwrap().in_flight, 7);
        assert_eq!(fleet.warm_nodes("m"), &[NodeId(1), NodeId(2), NodeId(3)]);
        fleet.model_evicted(NodeId(1), "m").unwrap();
        fleet.model_evicted(NodeId(1), "m").unwrap();
        assert_eq!(fleet.warm_nodes("m"), &[NodeId(2), NodeId(3)]);
    }

    #[test]
    fn update_node_keeps_sessions_and_reindexes_models() {
        let mut fleet = Fleet::default();
        fleet.add_node(spec(1, 1, &["a"])).unwrap();
        fleet.place(&PlacementRequest::new("s", Some("a"))).unwrap();
        fleet.update_node(spec(1, 2, &["b"])).unwrap();
        assert_eq!(fleet.load(NodeId(1)).unwrap().sessions, 1);
        assert!(fleet.warm_nodes("a").is_empty());
        assert_eq!(fleet.warm_nodes("b"), &[NodeId(1)]);
        assert_eq!(fleet.eligible_sessions(), 1);
    }

    #[test]
    fn least_loaded_with_model_weighs_in_flight_by_capacity() {
        let mut fleet = Fleet::default();
        fleet.add_node(spec(1, 1, &["m"])).unwrap();
        fleet.add_node(spec(2, 4, &["m"])).unwrap();
        fleet.add_node(spec(3, 8, &[])).unwrap();
        fleet.set_in_flight(NodeId(1), 2).unwrap();
        fleet.set_in_flight(NodeId(2), 6).unwrap();
        // 6 / 4 < 2 / 1.
        assert_eq!(fleet.least_loaded_with_model("m"), Some(NodeId(2)));
        fleet.set_health(NodeId(2), Health::Unhealthy).unwrap();
        assert_eq!(fleet.least_loaded_with_model("m"), Some(NodeId(1)));
        assert_eq!(fleet.least_loaded_with_model("other"), None);
    }

    #[test]
    fn release_never_goes_below_zero() {
        let mut fleet = fleet_of(1, PlacementConfig::default());
        fleet.release(NodeId(0)).unwrap();
        assert_eq!(fleet.load(NodeId(0)).unwrap().sessions, 0);
        assert_eq!(fleet.eligible_sessions(), 0);
    }
}
