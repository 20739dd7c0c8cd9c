//! Swarms in memory, counted router-wide (`limits.max_swarms`, shared by every shard) and
//! per creating agent (`limits.max_swarms_per_agent`): one atomic and one short lock, taken
//! per new swarm, never per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a new swarm was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwarmRefused {
    /// The router holds `limits.max_swarms` swarms.
    Router { max: usize },
    /// The agent created `limits.max_swarms_per_agent` of the swarms in memory.
    Agent { max: usize },
}

/// Swarms in memory, counted router-wide and per creating agent. Shards take a place
/// before they create a swarm and give it back when they collect one.
#[derive(Debug)]
pub struct SwarmBudget {
    held: AtomicUsize,
    max: usize,
    max_per_agent: usize,
    by_agent: Mutex<HashMap<Arc<str>, usize>>,
}

impl SwarmBudget {
    pub fn new(max: usize, max_per_agent: usize) -> Arc<Self> {
        Arc::new(SwarmBudget {
            held: AtomicUsize::new(0),
            max,
            max_per_agent,
            by_agent: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a swarm recovered from the log (no creator): recovered swarms are never
    /// refused, but they take room from new ones.
    pub fn restored(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a place for a new swarm created by `agent` (`None`: the router itself, which
    /// only the router-wide cap applies to).
    pub fn take(&self, agent: Option<&str>) -> Result<(), SwarmRefused> {
        let held = self.held.fetch_add(1, Ordering::Relaxed);
        if held >= self.max {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return Err(SwarmRefused::Router { max: self.max });
        }
        if let Some(agent) = agent {
            let mut by_agent = self.agents();
            let count = by_agent.get(agent).copied().unwrap_or_default();
            if count >= self.max_per_agent {
                drop(by_agent);
                self.held.fetch_sub(1, Ordering::Relaxed);
                return Err(SwarmRefused::Agent {
                    max: self.max_per_agent,
                });
            }
            by_agent.insert(Arc::from(agent), count + 1);
        }
        Ok(())
    }

    /// Gives back the place of a swarm collected from memory.
    pub fn give_back(&self, agent: Option<&str>) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        if let Some(agent) = agent {
            let mut by_agent = self.agents();
            if let Some(count) = by_agent.get_mut(agent) {
                *count -= 1;
                if *count == 0 {
                    by_agent.remove(agent);
                }
            }
        }
    }

    /// Swarms in memory, router-wide.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        // Every update under this lock is one insert or decrement: a poisoned lock still
        // holds consistent counts.
        self.by_agent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarms_are_capped_router_wide_and_per_agent() {
        let budget = SwarmBudget::new(3, 2);
        let (a, b) = ("a", "b");
        budget.restored();
        assert_eq!(budget.take(Some(a)), Ok(()));
        assert_eq!(budget.take(Some(a)), Ok(()));
        assert_eq!(budget.held(), 3);
        assert_eq!(budget.take(Some(b)), Err(SwarmRefused::Router { max: 3 }));
        assert_eq!(budget.take(None), Err(SwarmRefused::Router { max: 3 }));
        // The recovered swarm is collected: room again, but not for `a`.
        budget.give_back(None);
        assert_eq!(budget.take(Some(a)), Err(SwarmRefused::Agent { max: 2 }));
        assert_eq!(budget.held(), 2);
        assert_eq!(budget.take(Some(b)), Ok(()));
        // One of `a`'s is collected: `a` may create one more.
        budget.give_back(Some(a));
        assert_eq!(budget.take(Some(a)), Ok(()));
        assert_eq!(budget.held(), 3);
    }
}
