//! `swarmbus-affinity`: where sessions go in a fleet of GPU and model-cache nodes.
//!
//! Pure functions over (topology, load) -> placement: no I/O, no clock (callers pass
//! `now_ms`), no randomness (every choice is a fixed hash of its inputs). The router and
//! the `affinity-sim` loadgen scenario call the very same code.
//!
//! Modules:
//! - [`hash`]: the fixed FNV-1a + splitmix64 hashes every ranking is built on.
//! - [`node`]: what a node advertises ([`NodeSpec`]: GPUs, models, adapters, health,
//!   draining, weight) and what it carries ([`Load`]).
//! - [`placement`]: the registry of nodes ([`Fleet`]) and the decision: weighted rendezvous
//!   ranking, bounded loads, model-cache preference.
//! - [`session`]: sticky sessions ([`SessionTable`]) with TTL leases, failover and drain
//!   that move only the sessions of the node that left, and reaping.
//! - [`error`]: the crate's one error type, [`AffinityError`].
//!
//! ```
//! use swarmbus_affinity::{Fleet, Gpus, NodeId, NodeSpec, SessionTable, Zone};
//!
//! let mut fleet = Fleet::default();
//! for id in 0..3 {
//!     fleet.add_node(NodeSpec::new(NodeId(id), Zone::default(), Gpus::default()))?;
//! }
//! let mut sessions = SessionTable::default();
//! let pin = sessions.open(&mut fleet, "agent-7", Some("llama-3-8b"), 0)?;
//! // The worker reports the model loaded; the session stays put while its lease lives.
//! fleet.model_loaded(pin.node, "llama-3-8b")?;
//! let again = sessions.open(&mut fleet, "agent-7", Some("llama-3-8b"), 1_000)?;
//! assert_eq!(again.node, pin.node);
//! // When its node fails, it moves, and nothing else does.
//! let moves = sessions.fail_node(&mut fleet, pin.node)?;
//! assert_eq!(moves.len(), 1);
//! assert_ne!(sessions.get("agent-7").map(|lease| lease.node), Some(pin.node));
//! # Ok::<(), swarmbus_affinity::AffinityError>(())
//! ```

pub mod error;
pub mod hash;
pub mod node;
pub mod placement;
pub mod session;

pub use error::AffinityError;
pub use node::{Gpus, Health, Load, NodeId, NodeSpec, Zone};
pub use placement::{Fleet, Placement, PlacementConfig, PlacementRequest};
pub use session::{Lease, Move, Pin, PinOutcome, SessionConfig, SessionTable};
