//! The crate's one error type.

use crate::node::NodeId;

/// Why a placement or registry call failed. Every variant is recoverable: the fleet and the
/// session table are left as they were before the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AffinityError {
    /// No node is healthy and not draining (out of `nodes` registered). Retry once a node
    /// registers or recovers.
    #[error("no node can take a new session ({nodes} registered, none healthy and not draining)")]
    NoEligibleNode { nodes: usize },
    /// The node id is not registered.
    #[error("{node} is not registered")]
    UnknownNode { node: NodeId },
    /// A node with this id is already registered; update it instead.
    #[error("{node} is already registered")]
    DuplicateNode { node: NodeId },
    /// The fleet holds its maximum number of nodes.
    #[error("the fleet is full ({max_nodes} nodes)")]
    FleetFull { max_nodes: usize },
    /// The session table holds its maximum number of sessions; close or reap some first.
    #[error("the session table is full ({max_sessions} sessions)")]
    SessionTableFull { max_sessions: usize },
}
