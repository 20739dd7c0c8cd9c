//! Sticky sessions: session key -> node, under a lease the caller renews.
//!
//! The table never reads a clock: every call that cares about time takes `now_ms`, a
//! millisecond timestamp from whatever clock the caller uses (the same one throughout).
//!
//! Stickiness rules:
//! - A session stays on its node while its lease is live and the node is healthy and not
//!   draining. Adding a node never moves it, even when the newcomer would rank first now.
//! - When a node fails or drains ([`SessionTable::fail_node`],
//!   [`SessionTable::drain_node`]), only the sessions on that node move, each placed afresh
//!   as its own request (its next choice in its ranking that is eligible and has room).
//! - Expired leases stay in the table until [`SessionTable::reap`] is called; an expired
//!   session that is opened again before that is placed afresh.

use std::collections::HashMap;

use crate::error::AffinityError;
use crate::hash::FixedState;
use crate::node::{Health, NodeId};
use crate::placement::{Fleet, PlacementRequest};

/// Limits of a [`SessionTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// How long a lease lives after it is granted or renewed. Default 10 minutes.
    pub lease_ttl_ms: u64,
    /// Most sessions held; [`SessionTable::open`] fails past it. Default 1,000,000.
    pub max_sessions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            lease_ttl_ms: 600_000,
            max_sessions: 1_000_000,
        }
    }
}

/// Where one session is pinned and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub node: NodeId,
    pub model: Option<String>,
    /// The lease is live while `now_ms < expires_at_ms`.
    pub expires_at_ms: u64,
}

/// How [`SessionTable::open`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// The session already had a live lease on an eligible node; the lease was renewed.
    Kept,
    /// The session was placed (new, expired, asked for another model, or its node can no
    /// longer take it).
    Placed { cold_load: bool },
}

/// The node a session is pinned to after [`SessionTable::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub node: NodeId,
    pub outcome: PinOutcome,
}

/// One session moved off a failed or draining node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub session_key: String,
    pub from: NodeId,
    /// `None` when no node could take it: the session was dropped from the table.
    pub to: Option<NodeId>,
    pub cold_load: bool,
}

/// Sessions and their leases. Keeps the fleet's session counters in step: every pin
/// counts on its node, every close, move and reap counts off.
#[derive(Debug, Clone)]
pub struct SessionTable {
    config: SessionConfig,
    leases: HashMap<String, Lease, FixedState>,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new(SessionConfig::default())
    }
}

impl SessionTable {
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            leases: HashMap::with_hasher(FixedState),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn get(&self, session_key: &str) -> Option<&Lease> {
        self.leases.get(session_key)
    }

    /// Every session and its lease, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Lease)> + '_ {
        self.leases.iter().map(|(key, lease)| (key.as_str(), lease))
    }

    /// Opens or resumes a session: keeps its pin when the lease is live, the node can take
    /// work and the model is the same (renewing the lease), and otherwise places it.
    pub fn open(
        &mut self,
        fleet: &mut Fleet,
        session_key: &str,
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pin, AffinityError> {
        let expires_at_ms = now_ms.saturating_add(self.config.lease_ttl_ms);
        if let Some(lease) = self.leases.get_mut(session_key) {
            if now_ms < lease.expires_at_ms
                && fleet.accepts_new_work(lease.node)
                && lease.model.as_deref() == model
            {
                lease.expires_at_ms = expires_at_ms;
                return Ok(Pin {
                    node: lease.node,
                    outcome: PinOutcome::Kept,
                });
            }
        } else if self.leases.len() >= self.config.max_sessions {
            return Err(AffinityError::SessionTableFull {
                max_sessions: self.config.max_sessions,
            });
        }
        // Place before releasing the old pin: on failure the table and fleet are unchanged.
        let placement = fleet.place(&PlacementRequest::new(session_key, model))?;
        let lease = Lease {
            node: placement.node,
            model: model.map(str::to_owned),
            expires_at_ms,
        };
        if let Some(old) = self.leases.insert(session_key.to_owned(), lease) {
            // The old node may have been removed since; then there is nothing to count off.
            let _ = fleet.release(old.node);
        }
        Ok(Pin {
            node: placement.node,
            outcome: PinOutcome::Placed {
                cold_load: placement.cold_load,
            },
        })
    }

    /// Extends a live lease to `now_ms + lease_ttl_ms`. Returns false when the session is
    /// unknown or its lease has expired (open it again instead).
    pub fn renew(&mut self, session_key: &str, now_ms: u64) -> bool {
        match self.leases.get_mut(session_key) {
            Some(lease) if now_ms < lease.expires_at_ms => {
                lease.expires_at_ms = now_ms.saturating_add(self.config.lease_ttl_ms);
                true
            }
            _ => false,
        }
    }

    /// Ends a session and counts it off its node.
    pub fn close(&mut self, fleet: &mut Fleet, session_key: &str) -> Option<Lease> {
        let lease = self.leases.remove(session_key)?;
        let _ = fleet.release(lease.node);
        Some(lease)
    }

    /// Puts back a pin decided earlier (read from a log after a restart): the session is
    /// pinned to `node`, which must be registered, with a fresh lease, and counted on it.
    /// A lease the session held already is replaced.
    pub fn restore(
        &mut self,
        fleet: &mut Fleet,
        session_key: &str,
        node: NodeId,
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<(), AffinityError> {
        if !self.leases.contains_key(session_key) && self.leases.len() >= self.config.max_sessions {
            return Err(AffinityError::SessionTableFull {
                max_sessions: self.config.max_sessions,
            });
        }
        fleet.assign(node)?;
        let lease = Lease {
            node,
            model: model.map(str::to_owned),
            expires_at_ms: now_ms.saturating_add(self.config.lease_ttl_ms),
        };
        if let Some(old) = self.leases.insert(session_key.to_owned(), lease) {
            let _ = fleet.release(old.node);
        }
        Ok(())
    }

    /// Marks `node` unhealthy and moves its sessions (see [`evacuate`](Self::evacuate)).
    pub fn fail_node(
        &mut self,
        fleet: &mut Fleet,
        node: NodeId,
    ) -> Result<Vec<Move>, AffinityError> {
        fleet.set_health(node, Health::Unhealthy)?;
        Ok(self.evacuate(fleet, node))
    }

    /// Marks `node` draining and moves its sessions (see [`evacuate`](Self::evacuate)).
    pub fn drain_node(
        &mut self,
        fleet: &mut Fleet,
        node: NodeId,
    ) -> Result<Vec<Move>, AffinityError> {
        fleet.set_draining(node, true)?;
        Ok(self.evacuate(fleet, node))
    }

    /// Moves every session pinned to `node`, and no other, in session-key order (so the
    /// outcome does not depend on the table's history). Each is placed as its own request;
    /// if `node` can still take work some may land on it again. A session that no node can
    /// take is dropped from the table and reported with `to: None`. Leases keep their
    /// expiry.
    pub fn evacuate(&mut self, fleet: &mut Fleet, node: NodeId) -> Vec<Move> {
        let mut keys: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.node == node)
            .map(|(key, _)| key.clone())
            .collect();
        keys.sort_unstable();
        let mut moves = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(lease) = self.leases.get_mut(&key) else {
                continue;
            };
            let _ = fleet.release(node);
            match fleet.place(&PlacementRequest::new(&key, lease.model.as_deref())) {
                Ok(placement) => {
                    lease.node = placement.node;
                    moves.push(Move {
                        session_key: key,
                        from: node,
                        to: Some(placement.node),
                        cold_load: placement.cold_load,
                    });
                }
                Err(_) => {
                    self.leases.remove(&key);
                    moves.push(Move {
                        session_key: key,
                        from: node,
                        to: None,
                        cold_load: false,
                    });
                }
            }
        }
        moves
    }

    /// Drops every lease with `expires_at_ms <= now_ms`, counts each off its node, and
    /// returns their keys in order.
    pub fn reap(&mut self, fleet: &mut Fleet, now_ms: u64) -> Vec<String> {
        let mut expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_at_ms <= now_ms)
            .map(|(key, _)| key.clone())
            .collect();
        expired.sort_unstable();
        for key in &expired {
            if let Some(lease) = self.leases.remove(key) {
                let _ = fleet.release(lease.node);
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Gpus, NodeSpec, Zone};

    const TTL_MS: u64 = 1_000;

    fn setup(nodes: u64) -> (Fleet, SessionTable) {
        let mut fleet = Fleet::default();
        for id in 0..nodes {
            fleet
                .add_node(NodeSpec::new(NodeId(id), Zone::default(), Gpus::default()))
                .unwrap();
        }
        let table = SessionTable::new(SessionConfig {
            lease_ttl_ms: TTL_MS,
            max_sessions: 100,
        });
        (fleet, table)
    }

    #[test]
    fn a_live_lease_keeps_its_pin_and_is_renewed() {
        let (mut fleet, mut table) = setup(4);
        let first = table.open(&mut fleet, "a", Some("m"), 0).unwrap();
        assert_eq!(first.outcome, PinOutcome::Placed { cold_load: true });
        let again = table.open(&mut fleet, "a", Some("m"), 900).unwrap();
        assert_eq!(again.node, first.node);
        assert_eq!(again.outcome, PinOutcome::Kept);
        assert_eq!(table.get("a").unwrap().expires_at_ms, 1_900);
        assert!(table.renew("a", 1_800));
        assert_eq!(table.get("a").unwrap().expires_at_ms, 2_800);
        assert!(!table.renew("a", 2_800));
        assert!(!table.renew("unknown", 0));
        assert_eq!(fleet.eligible_sessions(), 1);
    }

    #[test]
    fn a_restored_pin_is_kept_and_counted() {
        let (mut fleet, mut table) = setup(4);
        // Whatever placement would pick, the restored pin wins and stays sticky.
        let fresh = fleet.ranking(&PlacementRequest::new("a", None))[0];
        let other = (0..4).map(NodeId).find(|id| *id != fresh).unwrap();
        table.restore(&mut fleet, "a", other, None, 0).unwrap();
        assert_eq!(fleet.load(other).unwrap().sessions, 1);
        let pin = table.open(&mut fleet, "a", None, 10).unwrap();
        assert_eq!((pin.node, pin.outcome), (other, PinOutcome::Kept));
        assert_eq!(fleet.eligible_sessions(), 1);
        // Restoring again replaces the lease without counting twice.
        table.restore(&mut fleet, "a", other, None, 20).unwrap();
        assert_eq!(fleet.load(other).unwrap().sessions, 1);
        assert!(table.restore(&mut fleet, "b", NodeId(99), None, 0).is_err());
    }

    #[test]
    fn reap_drops_expired_leases_and_their_load() {
        let (mut fleet, mut table) = setup(2);
        table.open(&mut fleet, "b", None, 0).unwrap();
        table.open(&mut fleet, "a", None, 500).unwrap();
        assert!(table.reap(&mut fleet, 999).is_empty());
        assert_eq!(table.reap(&mut fleet, 1_000), vec!["b".to_string()]);
        assert_eq!(table.len(), 1);
        assert_eq!(fleet.eligible_sessions(), 1);
        assert_eq!(table.reap(&mut fleet, 10_000), vec!["a".to_string()]);
        assert!(table.is_empty());
        assert_eq!(fleet.eligible_sessions(), 0);
    }

    #[test]
    fn an_expired_lease_is_placed_afresh_without_double_counting() {
        let (mut fleet, mut table) = setup(3);
        table.open(&mut fleet, "a", None, 0).unwrap();
        let pin = table.open(&mut fleet, "a", None, TTL_MS).unwrap();
        assert!(matches!(pin.outcome, PinOutcome::Placed { .. }));
        assert_eq!(fleet.eligible_sessions(), 1);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn asking_for_another_model_places_again() {
        let (mut fleet, mut table) = setup(3);
        table.open(&mut fleet, "a", Some("m1"), 0).unwrap();
        let pin = table.open(&mut fleet, "a", Some("m2"), 1).unwrap();
        assert!(matches!(pin.outcome, PinOutcome::Placed { .. }));
        assert_eq!(table.get("a").unwrap().model.as_deref(), Some("m2"));
        assert_eq!(fleet.eligible_sessions(), 1);
    }

    #[test]
    fn close_counts_the_session_off() {
        let (mut fleet, mut table) = setup(2);
        let pin = table.open(&mut fleet, "a", None, 0).unwrap();
        assert_eq!(table.close(&mut fleet, "a").unwrap().node, pin.node);
        assert!(table.close(&mut fleet, "a").is_none());
        assert_eq!(fleet.load(pin.node).unwrap().sessions, 0);
    }

    #[test]
    fn the_table_refuses_past_its_limit() {
        let (mut fleet, _) = setup(2);
        let mut table = SessionTable::new(SessionConfig {
            lease_ttl_ms: TTL_MS,
            max_sessions: 2,
        });
        table.open(&mut fleet, "a", None, 0).unwrap();
        table.open(&mut fleet, "b", None, 0).unwrap();
        assert_eq!(
            table.open(&mut fleet, "c", None, 0),
            Err(AffinityError::SessionTableFull { max_sessions: 2 })
        );
        // Sessions already held can still be opened again.
        assert!(table.open(&mut fleet, "a", None, 1).is_ok());
        assert_eq!(fleet.eligible_sessions(), 2);
    }

    #[test]
    fn draining_moves_every_session_off_the_node() {
        let (mut fleet, mut table) = setup(4);
        for i in 0..40 {
            table.open(&mut fleet, &format!("s{i}"), None, 0).unwrap();
        }
        let busiest = (0..4)
            .map(NodeId)
            .max_by_key(|&n| fleet.load(n).unwrap().sessions)
            .unwrap();
        let had = fleet.load(busiest).unwrap().sessions as usize;
        let moves = table.drain_node(&mut fleet, busiest).unwrap();
        assert_eq!(moves.len(), had);
        assert!(moves
            .iter()
            .all(|m| m.from == busiest && m.to.is_some() && m.to != Some(busiest)));
        assert_eq!(fleet.load(busiest).unwrap().sessions, 0);
        assert!(table.iter().all(|(_, lease)| lease.node != busiest));
        assert_eq!(fleet.eligible_sessions(), 40);
    }

    #[test]
    fn failing_the_last_node_drops_its_sessions() {
        let (mut fleet, mut table) = setup(1);
        table.open(&mut fleet, "a", None, 0).unwrap();
        let moves = table.fail_node(&mut fleet, NodeId(0)).unwrap();
        assert_eq!(
            moves,
            vec![Move {
                session_key: "a".into(),
                from: NodeId(0),
                to: None,
                cold_load: false
            }]
        );
        assert!(table.is_empty());
        assert_eq!(
            table.open(&mut fleet, "a", None, 0),
            Err(AffinityError::NoEligibleNode { nodes: 1 })
        );
        assert_eq!(
            table.fail_node(&mut fleet, NodeId(5)),
            Err(AffinityError::UnknownNode { node: NodeId(5) })
        );
    }
}
