//! What a worker node advertises and what placement counts on it.

use std::fmt;

/// A worker node's id, stable for the node's lifetime (the router assigns it when the
/// worker registers). It is also the node's identity in every rendezvous draw, so a node
/// that re-registers under the same id gets the same sessions back in rankings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

/// A failure domain (rack, availability zone). Carried for callers and reports; placement
/// does not filter on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Zone(pub String);

/// The GPUs of one node, as it reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Gpus {
    /// Number of GPUs (0 for a node without any).
    pub count: u32,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3"; empty when unknown.
    pub model: String,
    /// Memory over all GPUs, in bytes.
    pub memory_total_bytes: u64,
    /// Memory not in use over all GPUs, in bytes.
    pub memory_free_bytes: u64,
}

/// Whether a node can take work. Only [`Health::Healthy`] nodes get new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    #[default]
    Healthy,
    /// Failed a health check or disconnected: gets nothing new, and its sessions move.
    Unhealthy,
}

/// Everything a node advertises. Placement reads `weight`, `models`, `health` and
/// `draining`; the rest is carried for the router and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: NodeId,
    pub zone: Zone,
    pub gpus: Gpus,
    /// Relative capacity: a node of weight 2 is meant to take twice the sessions of a node
    /// of weight 1, both in the rendezvous ranking and in its load bound. 0 counts as 1.
    /// [`NodeSpec::new`] sets it to the GPU count (at least 1).
    pub weight: u32,
    /// Models whose weights are resident on the node (warm): a session for one of them
    /// avoids a cold load there.
    pub models: Vec<String>,
    /// LoRA or similar adapters resident on the node. Advertised only: loading an adapter
    /// is cheap next to loading a model, so placement keys on the model.
    pub adapters: Vec<String>,
    pub health: Health,
    /// Draining: gets nothing new; its sessions move when the drain starts.
    pub draining: bool,
}

impl NodeSpec {
    /// A healthy, non-draining node with nothing loaded, weighted by its GPU count.
    pub fn new(id: NodeId, zone: Zone, gpus: Gpus) -> Self {
        Self {
            id,
            zone,
            weight: gpus.count.max(1),
            gpus,
            models: Vec::new(),
            adapters: Vec::new(),
            health: Health::Healthy,
            draining: false,
        }
    }

    /// Whether the node may receive new sessions.
    pub fn accepts_new_work(&self) -> bool {
        self.health == Health::Healthy && !self.draining
    }

    /// The weight placement uses (0 counts as 1).
    pub fn effective_weight(&self) -> u32 {
        self.weight.max(1)
    }

    /// Whether `model` is resident on the node.
    pub fn has_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }
}

/// What a node is carrying now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Sessions pinned to the node. Placement owns this counter: it changes when a session
    /// is placed on, moved off or released from the node.
    pub sessions: u32,
    /// Requests (or tokens, as the caller chooses) in flight on the node, as it last
    /// reported; used to pick a node for a non-affine request.
    pub in_flight: u32,
}
