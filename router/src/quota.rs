//! Router-wide caps and per-agent quotas on what network input can make the router hold.
//!
//! - [`PartialFrames`]: bytes of frames a connection has started and not finished, counted
//!   as they arrive against the connection's cap (`limits.partial_frame_bytes`) and the
//!   router's (`limits.router_partial_frame_bytes`). QUIC flow control bounds only what the
//!   router has not read yet; what it has read into an unfinished frame is counted here.
//! - [`SwarmBudget`]: swarms in memory, router-wide (`limits.max_swarms`, shared by every
//!   shard) and per creating agent (`limits.max_swarms_per_agent`).
//!
//! Each is a few atomics or one short lock: they are taken per received chunk and per new
//! swarm, never per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The router-wide side of [`PartialFrames`].
#[derive(Debug)]
pub struct RouterPartialFrames {
    held: AtomicUsize,
    cap: usize,
}

impl RouterPartialFrames {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(RouterPartialFrames {
            held: AtomicUsize::new(0),
            cap,
        })
    }

    /// Bytes held in unfinished frames across the router.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Why bytes could not be charged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartialRefused {
    /// The connection's unfinished frames would hold more than its cap.
    Connection { held: usize, cap: usize },
    /// The router's unfinished frames would hold more than its cap.
    Router { cap: usize },
}

impl std::fmt::Display for PartialRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartialRefused::Connection { held, cap } => write!(
                f,
                "unfinished frames on this connection would hold {held} bytes \
                 (limits.partial_frame_bytes = {cap})"
            ),
            PartialRefused::Router { cap } => write!(
                f,
                "unfinished frames across the router would hold more than {cap} bytes \
                 (limits.router_partial_frame_bytes); retry later"
            ),
        }
    }
}

/// One connection's budget for unfinished frames (shared by its stream readers).
#[derive(Debug)]
pub struct PartialFrames {
    held: AtomicUsize,
    cap: usize,
    router: Arc<RouterPartialFrames>,
}

impl PartialFrames {
    pub fn new(cap: usize, router: Arc<RouterPartialFrames>) -> Arc<Self> {
        Arc::new(PartialFrames {
            held: AtomicUsize::new(0),
            cap,
            router,
        })
    }

    /// Moves a reader's charge from `from` bytes to `to`. A rise past either cap is
    /// refused and leaves the charge at `from`.
    pub fn recharge(&self, from: usize, to: usize) -> Result<(), PartialRefused> {
        if to <= from {
            self.give_back(from - to);
            return Ok(());
        }
        let more = to - from;
        let held = self.held.fetch_add(more, Ordering::Relaxed) + more;
        if held > self.cap {
            self.held.fetch_sub(more, Ordering::Relaxed);
            return Err(PartialRefused::Connection {
                held,
                cap: self.cap,
            });
        }
        let router_held = self.router.held.fetch_add(more, Ordering::Relaxed) + more;
        if router_held > self.router.cap {
            self.router.held.fetch_sub(more, Ordering::Relaxed);
            self.held.fetch_sub(more, Ordering::Relaxed);
            return Err(PartialRefused::Router {
                cap: self.router.cap,
            });
        }
        Ok(())
    }

    /// Gives back `bytes` a reader held (its frame finished, or the reader ended).
    pub fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.router.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

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
    fn partial_frames_are_capped_per_connection_and_router_wide() {
        let router = RouterPartialFrames::new(300);
        let a = PartialFrames::new(200, router.clone());
        let b = PartialFrames::new(200, router.clone());
        assert_eq!(a.recharge(0, 150), Ok(()));
        assert_eq!(
            a.recharge(150, 201),
            Err(PartialRefused::Connection {
                held: 201,
                cap: 200
            })
        );
        assert_eq!(a.held(), 150);
        assert_eq!(b.recharge(0, 150), Ok(()));
        assert_eq!(
            b.recharge(150, 151),
            Err(PartialRefused::Router { cap: 300 })
        );
        assert_eq!((b.held(), router.held()), (150, 300));
        // A finished frame gives its bytes back, to both.
        a.recharge(150, 10).unwrap();
        assert_eq!((a.held(), router.held()), (10, 160));
        assert_eq!(b.recharge(150, 190), Ok(()));
        a.give_back(10);
        b.give_back(190);
        assert_eq!(router.held(), 0);
    }

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
