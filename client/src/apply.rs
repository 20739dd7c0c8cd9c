//! Idempotent apply: at-least-once delivery becomes exactly-once effect.
//!
//! The router may deliver an ordered op more than once (redelivery after a reconnect or a
//! timeout). [`IdempotentApply`] keeps the last applied op id per swarm and admits only ops
//! above it; the application persists [`IdempotentApply::state`] with its own state (the
//! event-log work adds a file store) and restores it with [`IdempotentApply::restore`].

use std::collections::HashMap;

use swarmbus_schema::{Deliver, OpId};

#[derive(Clone, Debug, Default)]
pub struct IdempotentApply {
    last_applied: HashMap<String, OpId>,
}

impl IdempotentApply {
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores the last applied op id per swarm, as saved from [`IdempotentApply::state`].
    pub fn restore(state: impl IntoIterator<Item = (String, OpId)>) -> Self {
        IdempotentApply {
            last_applied: state.into_iter().collect(),
        }
    }

    /// Whether op `op_id` of `swarm` should be applied; records it when so. Unordered
    /// messages (op id 0) are always admitted; an ordered op at or below the last applied
    /// one is a duplicate and is refused.
    pub fn admit(&mut self, swarm: &str, op_id: OpId) -> bool {
        if op_id.is_none() {
            return true;
        }
        match self.last_applied.get_mut(swarm) {
            Some(last) if op_id <= *last => false,
            Some(last) => {
                *last = op_id;
                true
            }
            None => {
                self.last_applied.insert(swarm.to_owned(), op_id);
                true
            }
        }
    }

    /// Runs `apply` on `delivery` unless it was applied already; returns its result.
    pub fn apply<T>(&mut self, delivery: &Deliver, apply: impl FnOnce(&Deliver) -> T) -> Option<T> {
        self.admit(&delivery.swarm, delivery.op_id)
            .then(|| apply(delivery))
    }

    pub fn last_applied(&self, swarm: &str) -> OpId {
        self.last_applied.get(swarm).copied().unwrap_or_default()
    }

    /// The last applied op id per swarm, to persist.
    pub fn state(&self) -> impl Iterator<Item = (&str, OpId)> {
        self.last_applied.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_duplicates_and_older_ops_per_swarm() {
        let mut apply = IdempotentApply::new();
        assert!(apply.admit("a", OpId(1)));
        assert!(apply.admit("a", OpId(2)));
        assert!(!apply.admit("a", OpId(2)));
        assert!(!apply.admit("a", OpId(1)));
        assert!(apply.admit("b", OpId(1)));
        assert!(apply.admit("a", OpId::NONE));
        assert!(apply.admit("a", OpId::NONE));
        assert_eq!(apply.last_applied("a"), OpId(2));
        let restored = IdempotentApply::restore(apply.state().map(|(k, v)| (k.to_owned(), v)));
        assert_eq!(restored.last_applied("a"), OpId(2));
        assert_eq!(restored.last_applied("b"), OpId(1));
    }
}
