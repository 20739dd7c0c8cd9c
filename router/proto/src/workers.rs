//! Worker nodes, affine sessions and request/reply: the router side of GPU affinity.
//!
//! Workers (role `worker`) register with `WorkerStatus` and restate it whenever something
//! changes (a model loaded or evicted, free memory, load, draining). Agents open affine
//! sessions (`OpenSession{session_key, model}`): the placement library
//! ([`swarmbus_affinity`]) picks the node, and the pin is written to the event log (the
//! router's own swarm [`PINS_SWARM`], latest record per session key) before the agent is
//! answered, so it survives a router restart. `Request`s go to the session's pinned node, or
//! without a session to the least-loaded node that has the model; the worker's `Reply` goes
//! back to the requester. Each request has a deadline; a request whose node disconnects is
//! failed with `NodeGone`, and the node's sessions move, each to its next choice.
//!
//! Everything here is synchronous and sans-IO under one lock; the caller pushes the frames
//! it returns and writes the pins it returns to the log.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::conn::Handle;
use crate::time::Now;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use swarmbus_affinity::{
    hash::key_hash, AffinityError, Fleet, Gpus, Health, Move, NodeId, NodeSpec, PinOutcome,
    PlacementConfig, SessionConfig, SessionTable, Zone,
};
use swarmbus_schema::{
    encode, ErrorCode, Message, OutFrame, Reply, Request, SessionPinned, WorkerStatus,
};

use crate::conn::ConnId;

/// The router's own swarm holding session pins (names starting with `$` are reserved).
pub const PINS_SWARM: &str = "$affinity";

/// `[affinity]`: placement and request settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    /// No node takes more than ceil((1 + epsilon) x its weighted share) of the sessions.
    pub load_epsilon: f64,
    /// What a cold load costs in placement (race units; a weight-1 node's draw has mean 1).
    /// Unset: a node with the model loaded always wins while within its bound.
    pub cold_load_cost: Option<f64>,
    /// An affine session not used (opened or requested on) for this long is closed.
    pub session_ttl_ms: u64,
    /// Affine sessions the router keeps; opening more is refused with NoWorker.
    pub max_sessions: usize,
    /// A request's timeout when it gives none.
    pub request_timeout_ms: u32,
    /// The longest timeout a request may ask for.
    pub max_request_timeout_ms: u32,
    /// Requests awaiting a reply, router-wide; more are refused with Busy.
    pub max_pending_requests: usize,
    /// After a restart, how long a session whose pinned node has not registered again waits
    /// for it (requests are refused with Busy meanwhile) before it is placed afresh.
    pub restore_grace_ms: u64,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            load_epsilon: 0.25,
            cold_load_cost: None,
            session_ttl_ms: 600_000,
            max_sessions: 1_000_000,
            request_timeout_ms: 30_000,
            max_request_timeout_ms: 600_000,
            max_pending_requests: 65_536,
            restore_grace_ms: 30_000,
        }
    }
}

/// The key of a session's pin record in [`PINS_SWARM`] (see [`crate::record_key`]).
pub fn pin_key(session_key: &str) -> String {
    crate::record_key::encode("pin", &[session_key])
}

/// The session key a pin record is about: from a [`pin_key`], or a bare session key as
/// written before that format.
pub fn pin_session_of(key: &str) -> &str {
    match crate::record_key::decode_as::<1>(key, "pin") {
        Some([session]) => session,
        None => key,
    }
}

/// A pin to write to the log: the session's node and model, or `None` when it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinWrite {
    pub session_key: String,
    pub pin: Option<(String, Option<String>)>,
    /// The identity that opened the session (with credentials), kept with the pin so that
    /// a restart keeps it that identity's.
    pub owner: Option<String>,
}

impl PinWrite {
    /// The record payload: node, model and (when there is one) owner, each as a u16 length
    /// and bytes; empty for an ended session.
    pub fn payload(&self) -> Bytes {
        let Some((node, model)) = &self.pin else {
            return Bytes::new();
        };
        let model = model.as_deref().unwrap_or_default();
        let owner = self.owner.as_deref();
        let size = 6 + node.len() + model.len() + owner.map_or(0, str::len);
        let mut out = BytesMut::with_capacity(size);
        for part in [Some(node.as_str()), Some(model), owner]
            .into_iter()
            .flatten()
        {
            out.put_u16(part.len() as u16);
            out.put_slice(part.as_bytes());
        }
        out.freeze()
    }

    /// Reads a record payload back (`None` for a malformed one).
    pub fn parse(session_key: &str, payload: &[u8]) -> Option<PinWrite> {
        if payload.is_empty() {
            return Some(PinWrite {
                session_key: session_key.to_owned(),
                pin: None,
                owner: None,
            });
        }
        // Node and model, then the owner in records written with one.
        let mut parts = Vec::with_capacity(3);
        let mut rest = payload;
        while !rest.is_empty() && parts.len() < 3 {
            let (len, tail) = rest.split_at_checked(2)?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            let (part, tail) = tail.split_at_checked(len)?;
            parts.push(std::str::from_utf8(part).ok()?.to_owned());
            rest = tail;
        }
        if parts.len() < 2 || !rest.is_empty() {
            return None;
        }
        let owner = (parts.len() == 3).then(|| parts.pop()).flatten();
        let model = parts.pop().filter(|m| !m.is_empty());
        let node = parts.pop()?;
        Some(PinWrite {
            session_key: session_key.to_owned(),
            pin: Some((node, model)),
            owner,
        })
    }
}

use crate::refusal::Refusal;

fn no_worker(error: AffinityError) -> Refusal {
    Refusal::new(ErrorCode::NoWorker, error.to_string())
}

/// A frame for some connection's session lane.
pub type Outgoing<H> = (H, OutFrame);

/// A registered worker's connection.
#[derive(Debug)]
struct Node<H> {
    conn: ConnId,
    outbox: H,
    in_flight: u32,
}

/// A request awaiting its worker's reply.
#[derive(Debug)]
struct Call<H> {
    requester: H,
    request_id: u64,
    node: NodeId,
    deadline: Instant,
}

/// A pin read from the log whose node has not registered since the restart.
#[derive(Debug)]
struct RestoredPin {
    node: NodeId,
    model: Option<String>,
}

#[derive(Debug)]
struct State<H> {
    fleet: Fleet,
    sessions: SessionTable,
    /// Connected workers.
    nodes: HashMap<NodeId, Node<H>>,
    /// Names of every node registered since the start (or named by a restored pin).
    names: HashMap<NodeId, String>,
    calls: HashMap<u64, Call<H>>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_call: u64,
    restored: HashMap<String, RestoredPin>,
    /// Session key -> the identity that opened it (sessions opened with credentials). An
    /// entry whose session ended is forgotten when the key is next used.
    owners: HashMap<String, String>,
    /// Nodes a controller drained: they stay draining whatever they report themselves.
    admin_drained: std::collections::HashSet<NodeId>,
}

/// What the router knows about workers, sessions and requests in flight.
#[derive(Debug)]
pub struct Workers<H> {
    config: AffinityConfig,
    state: State<H>,
    started: Instant,
}

/// A request routed to a worker: push `frame` to `worker`, after writing `pins`.
#[derive(Debug)]
pub struct Routed<H> {
    pub worker: H,
    pub frame: OutFrame,
    pub pins: Vec<PinWrite>,
}

/// A worker registered (see [`Workers::register`]).
#[derive(Debug)]
pub struct Registered<H> {
    pub node: NodeId,
    /// Requests failed because another connection took the node over: push them.
    pub failed: Vec<Outgoing<H>>,
    /// Pins to write: sessions moved off a node that started draining.
    pub pins: Vec<PinWrite>,
}

/// A session opened: answer with `frame` once `pins` are written.
#[derive(Debug)]
pub struct Opened {
    pub frame: OutFrame,
    pub pins: Vec<PinWrite>,
}

/// The node id of a node name: stable, so a node that registers again (after a reconnect or
/// a router restart) is the same node, with the same rankings and pins.
pub fn node_id(name: &str) -> NodeId {
    NodeId(key_hash(name))
}

impl<H: Handle + Clone> Workers<H> {
    /// Starts with the pins read from the log (latest per session key, ended ones removed).
    pub fn new(config: AffinityConfig, pins: impl IntoIterator<Item = PinWrite>, now: Now) -> Self {
        let placement = PlacementConfig {
            load_epsilon: config.load_epsilon,
            cold_load_cost: config.cold_load_cost.unwrap_or(f64::INFINITY),
            ..PlacementConfig::default()
        };
        let sessions = SessionTable::new(SessionConfig {
            lease_ttl_ms: config.session_ttl_ms,
            max_sessions: config.max_sessions,
        });
        let mut names = HashMap::new();
        let mut restored = HashMap::new();
        let mut owners = HashMap::new();
        for pin in pins {
            match pin.pin {
                Some((node, model)) => {
                    let id = node_id(&node);
                    names.insert(id, node);
                    match pin.owner {
                        Some(owner) => owners.insert(pin.session_key.clone(), owner),
                        None => owners.remove(&pin.session_key),
                    };
                    restored.insert(pin.session_key, RestoredPin { node: id, model });
                }
                None => {
                    owners.remove(&pin.session_key);
                    restored.remove(&pin.session_key);
                }
            }
        }
        Workers {
            config,
            state: State {
                fleet: Fleet::new(placement),
                sessions,
                nodes: HashMap::new(),
                names,
                calls: HashMap::new(),
                deadlines: BTreeSet::new(),
                next_call: 1,
                restored,
                owners,
                admin_drained: std::collections::HashSet::new(),
            },
            started: now.instant,
        }
    }

    /// Milliseconds since the start: the affinity session table's time.
    fn now_ms(&self, now: Now) -> u64 {
        now.instant
            .saturating_duration_since(self.started)
            .as_millis() as u64
    }

    /// Sessions pinned (live leases and restored pins waiting for their node).
    pub fn sessions(&self) -> usize {
        let state = &self.state;
        state.sessions.len() + state.restored.len()
    }

    /// Requests awaiting a reply.
    pub fn pending_requests(&self) -> usize {
        self.state.calls.len()
    }

    /// Registers a worker or applies its restated status.
    pub fn register(
        &mut self,
        conn: ConnId,
        outbox: &H,
        status: &WorkerStatus,
        now: Now,
    ) -> Result<Registered<H>, Refusal> {
        let id = node_id(&status.node);
        let now_ms = self.now_ms(now);
        let state = &mut self.state;
        let mut out = Vec::new();
        // Newest wins: another connection registering the same node takes it over, and the
        // requests sent to the old one are failed (they will never be answered there).
        if let Some(old) = state.nodes.get(&id) {
            if old.conn != conn {
                out.extend(fail_calls_to(state, id, "the worker node re-registered"));
            }
        }
        let gpus = Gpus {
            count: status.gpu_count,
            model: status.gpu_model.clone(),
            memory_total_bytes: status.gpu_memory_total,
            memory_free_bytes: status.gpu_memory_free,
        };
        let mut spec = NodeSpec::new(id, Zone(status.zone.clone()), gpus);
        if status.weight > 0 {
            spec.weight = status.weight;
        }
        spec.models = status.models.clone();
        spec.adapters = status.adapters.clone();
        spec.draining = status.draining || state.admin_drained.contains(&id);
        spec.health = Health::Healthy;
        let was_draining = state.fleet.node(id).is_some_and(|n| n.draining);
        let known = state.fleet.node(id).is_some();
        let result = if known {
            state.fleet.update_node(spec)
        } else {
            state.fleet.add_node(spec)
        };
        result.map_err(no_worker)?;
        let in_flight = state.nodes.get(&id).map_or(0, |n| n.in_flight);
        state.nodes.insert(
            id,
            Node {
                conn,
                outbox: outbox.clone(),
                in_flight,
            },
        );
        state.names.insert(id, status.node.clone());
        let _ = state.fleet.set_in_flight(id, in_flight);
        let mut pins = Vec::new();
        if spec_draining(state, id) && !was_draining {
            let moves = state.sessions.evacuate(&mut state.fleet, id);
            pins.extend(moves_to_pins(state, &moves));
        }
        // Pins read from the log that wait for this node come back now.
        let waiting: Vec<String> = state
            .restored
            .iter()
            .filter(|(_, pin)| pin.node == id)
            .map(|(key, _)| key.clone())
            .collect();
        for key in waiting {
            if let Some(pin) = state.restored.remove(&key) {
                let _ = state.sessions.restore(
                    &mut state.fleet,
                    &key,
                    id,
                    pin.model.as_deref(),
                    now_ms,
                );
            }
        }
        Ok(Registered {
            node: id,
            failed: out,
            pins,
        })
    }

    /// A connection ended: a worker's sessions move to their next choices (pins to write)
    /// and its requests fail with NodeGone; requests it made are forgotten.
    pub fn disconnect(&mut self, conn: ConnId) -> (Vec<Outgoing<H>>, Vec<PinWrite>) {
        let state = &mut self.state;
        // Requests this connection was waiting for: their replies have nowhere to go.
        let orphaned: Vec<u64> = state
            .calls
            .iter()
            .filter(|(_, call)| call.requester.conn() == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            remove_call(state, id);
        }
        // Every node this connection registered (usually one).
        let nodes: Vec<NodeId> = state
            .nodes
            .iter()
            .filter(|(_, node)| node.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        let mut pins = Vec::new();
        for id in nodes {
            out.extend(fail_calls_to(state, id, "the worker node disconnected"));
            state.nodes.remove(&id);
            let moves = state
                .sessions
                .fail_node(&mut state.fleet, id)
                .unwrap_or_default();
            pins.extend(moves_to_pins(state, &moves));
        }
        (out, pins)
    }

    /// Opens or renews an affine session. `owner`: the caller's verified identity (with
    /// credentials), to whom the session then belongs; another identity is refused it.
    pub fn open_session(
        &mut self,
        request_id: u64,
        session_key: &str,
        model: Option<&str>,
        owner: Option<&str>,
        now: Now,
    ) -> Result<Opened, Refusal> {
        let (node, outcome, pins) = self.pin_owned(session_key, model, owner, now)?;
        let state = &self.state;
        let frame = encode(&Message::SessionPinned(SessionPinned {
            request_id,
            session_key: session_key.to_owned(),
            node: state.names.get(&node).cloned().unwrap_or_default(),
            node_id: node.0,
            cold_load: matches!(outcome, PinOutcome::Placed { cold_load: true }),
            kept: outcome == PinOutcome::Kept,
        }));
        Ok(Opened { frame, pins })
    }

    /// [`Workers::pin`] for `owner` (see [`Workers::open_session`]): refused when another
    /// identity holds the session; the session is `owner`'s from then on.
    fn pin_owned(
        &mut self,
        session_key: &str,
        model: Option<&str>,
        owner: Option<&str>,
        now: Now,
    ) -> Result<(NodeId, PinOutcome, Vec<PinWrite>), Refusal> {
        let Some(owner) = owner else {
            return self.pin(session_key, model, now);
        };
        self.check_owner(session_key, owner)?;
        let claimed = !self.state.owners.contains_key(session_key);
        if claimed {
            self.state
                .owners
                .insert(session_key.to_owned(), owner.to_owned());
        }
        let mut pinned = self.pin(session_key, model, now);
        match &mut pinned {
            Err(_) if claimed => {
                self.state.owners.remove(session_key);
            }
            // A session kept on its node writes no pin: one that just got its owner (a pin
            // written without one) is written again, with it, so a restart keeps it.
            Ok((node, PinOutcome::Kept, pins)) if claimed => {
                let state = &self.state;
                let model = state
                    .sessions
                    .get(session_key)
                    .and_then(|lease| lease.model.clone());
                pins.push(PinWrite {
                    session_key: session_key.to_owned(),
                    pin: Some((state.names.get(node).cloned().unwrap_or_default(), model)),
                    owner: Some(owner.to_owned()),
                });
            }
            _ => {}
        }
        pinned
    }

    /// Refuses `caller` a session another identity opened. An owner whose session has
    /// ended (closed, reaped, or lost with its node) is forgotten here.
    fn check_owner(&mut self, session_key: &str, caller: &str) -> Result<(), Refusal> {
        let state = &mut self.state;
        let Some(owner) = state.owners.get(session_key) else {
            return Ok(());
        };
        let live =
            state.sessions.get(session_key).is_some() || state.restored.contains_key(session_key);
        if !live {
            state.owners.remove(session_key);
            return Ok(());
        }
        if owner == caller {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorCode::Forbidden,
            format!("the affine session {session_key:?} belongs to agent {owner:?}"),
        ))
    }

    /// The session's node (placing it if needed), and the pins to write.
    fn pin(
        &mut self,
        session_key: &str,
        model: Option<&str>,
        now: Now,
    ) -> Result<(NodeId, PinOutcome, Vec<PinWrite>), Refusal> {
        let now_ms = self.now_ms(now);
        let state = &mut self.state;
        if let Some(restored) = state.restored.get(session_key) {
            let waited = now.instant.saturating_duration_since(self.started);
            let grace = Duration::from_millis(self.config.restore_grace_ms);
            if waited < grace {
                let node = state.names.get(&restored.node).cloned().unwrap_or_default();
                return Err(Refusal {
                    code: ErrorCode::Busy,
                    message: format!(
                        "session {session_key:?} is pinned to node {node:?}, which has not \
                         registered since the router restarted"
                    ),
                    retry_after_ms: (grace - waited).as_millis().clamp(1, 1_000) as u32,
                });
            }
            state.restored.remove(session_key);
        }
        let pin = state
            .sessions
            .open(&mut state.fleet, session_key, model, now_ms)
            .map_err(no_worker)?;
        let mut pins = Vec::new();
        if pin.outcome != PinOutcome::Kept {
            pins.push(PinWrite {
                session_key: session_key.to_owned(),
                pin: Some((
                    state.names.get(&pin.node).cloned().unwrap_or_default(),
                    model.map(str::to_owned),
                )),
                owner: state.owners.get(session_key).cloned(),
            });
        }
        Ok((pin.node, pin.outcome, pins))
    }

    /// Ends an affine session; the pin to write when there was one. `owner`: the caller's
    /// verified identity (with credentials); another identity's session is refused.
    pub fn close_session(
        &mut self,
        session_key: &str,
        owner: Option<&str>,
    ) -> Result<Option<PinWrite>, Refusal> {
        if let Some(owner) = owner {
            self.check_owner(session_key, owner)?;
        }
        let state = &mut self.state;
        state.owners.remove(session_key);
        let had = state.restored.remove(session_key).is_some()
            | state
                .sessions
                .close(&mut state.fleet, session_key)
                .is_some();
        Ok(had.then(|| PinWrite {
            session_key: session_key.to_owned(),
            pin: None,
            owner: None,
        }))
    }

    /// Routes a request to its worker: the session's pinned node, or the least-loaded
    /// eligible node that has the model (any eligible node when none has it).
    ///
    /// `owner`: the requester's verified identity (with credentials): a request into
    /// another identity's session is refused, and a session it opens is its own.
    pub fn route(
        &mut self,
        requester: &H,
        agent: &str,
        request: Request,
        owner: Option<&str>,
        now: Now,
    ) -> Result<Routed<H>, Refusal> {
        if self.state.calls.len() >= self.config.max_pending_requests {
            return Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "{} requests are awaiting replies (affinity.max_pending_requests)",
                    self.state.calls.len()
                ),
                retry_after_ms: 100,
            });
        }
        let (node, pins) = match request.session_key.as_deref() {
            Some(key) => {
                let (node, _, pins) = self.pin_owned(key, request.model.as_deref(), owner, now)?;
                (node, pins)
            }
            None => {
                let node = request
                    .model
                    .as_deref()
                    .and_then(|model| self.state.fleet.least_loaded_with_model(model))
                    .or_else(|| self.state.fleet.least_loaded())
                    .ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::NoWorker,
                            "no worker node is registered, healthy and not draining",
                        )
                    })?;
                (node, Vec::new())
            }
        };
        let state = &mut self.state;
        let Some(worker) = state.nodes.get_mut(&node) else {
            return Err(Refusal::new(
                ErrorCode::NodeGone,
                "the session's worker node is not connected",
            ));
        };
        worker.in_flight = worker.in_flight.saturating_add(1);
        let worker_outbox = worker.outbox.clone();
        let in_flight = worker.in_flight;
        let _ = state.fleet.set_in_flight(node, in_flight);
        let max = self.config.max_request_timeout_ms;
        let timeout_ms = match request.timeout_ms {
            0 => self.config.request_timeout_ms,
            asked => asked,
        }
        .min(max);
        let call_id = state.next_call;
        state.next_call += 1;
        let deadline = now.instant + Duration::from_millis(u64::from(timeout_ms));
        state.calls.insert(
            call_id,
            Call {
                requester: requester.clone(),
                request_id: request.request_id,
                node,
                deadline,
            },
        );
        state.deadlines.insert((deadline, call_id));
        let frame = encode(&Message::Request(Request {
            request_id: call_id,
            session_key: request.session_key,
            model: request.model,
            timeout_ms,
            source_agent: Some(agent.to_owned()),
            payload: request.payload,
        }));
        Ok(Routed {
            worker: worker_outbox,
            frame,
            pins,
        })
    }

    /// A worker's reply: the frame for the requester, or `None` when the call is unknown
    /// (answered already, timed out, failed over) or was not sent to this worker.
    pub fn reply(&mut self, conn: ConnId, reply: Reply) -> Option<Outgoing<H>> {
        let state = &mut self.state;
        let call = state.calls.get(&reply.request_id)?;
        let node = state.nodes.get(&call.node)?;
        if node.conn != conn {
            return None;
        }
        let call = remove_call(state, reply.request_id)?;
        let frame = encode(&Message::Reply(Reply {
            request_id: call.request_id,
            ok: reply.ok,
            node: state.names.get(&call.node).cloned(),
            payload: reply.payload,
        }));
        Some((call.requester, frame))
    }

    /// A controller drains node `name` (no new sessions; its sessions move, requests in
    /// flight finish) or takes it back. Sticky: the node's own status cannot undo it.
    /// Returns the pins to write.
    pub fn set_admin_drain(&mut self, name: &str, draining: bool) -> Vec<PinWrite> {
        let id = node_id(name);
        let state = &mut self.state;
        state.names.entry(id).or_insert_with(|| name.to_owned());
        if draining {
            state.admin_drained.insert(id);
        } else {
            state.admin_drained.remove(&id);
        }
        let Some(spec) = state.fleet.node(id) else {
            return Vec::new();
        };
        let was = spec.draining;
        let _ = state.fleet.set_draining(id, draining);
        if draining && !was {
            let moves = state.sessions.evacuate(&mut state.fleet, id);
            return moves_to_pins(state, &moves);
        }
        Vec::new()
    }

    /// Whether a node registered on `conn` is draining (by itself or by a controller).
    pub fn conn_draining(&self, conn: ConnId) -> bool {
        let state = &self.state;
        state
            .nodes
            .iter()
            .any(|(id, node)| node.conn == conn && spec_draining(state, *id))
    }

    /// The connection node `name` is registered on.
    pub fn conn_of(&self, name: &str) -> Option<ConnId> {
        self.state.nodes.get(&node_id(name)).map(|node| node.conn)
    }

    /// Fails the requests whose deadline passed (DeadlineExceeded).
    pub fn expire(&mut self, now: Now) -> Vec<Outgoing<H>> {
        let state = &mut self.state;
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = state.deadlines.first() {
            if deadline > now.instant {
                break;
            }
            if let Some(call) = remove_call(state, id) {
                let node = state.names.get(&call.node).cloned().unwrap_or_default();
                out.push((
                    call.requester,
                    Refusal::new(
                        ErrorCode::DeadlineExceeded,
                        format!("no reply from worker node {node:?} within the timeout"),
                    )
                    .frame(call.request_id),
                ));
            } else {
                state.deadlines.pop_first();
            }
        }
        out
    }

    /// Closes sessions unused for `session_ttl_ms`; the pins to write.
    pub fn reap(&mut self, now: Now) -> Vec<PinWrite> {
        let now_ms = self.now_ms(now);
        let state = &mut self.state;
        state
            .sessions
            .reap(&mut state.fleet, now_ms)
            .into_iter()
            .map(|session_key| {
                state.owners.remove(&session_key);
                PinWrite {
                    session_key,
                    pin: None,
                    owner: None,
                }
            })
            .collect()
    }
}

fn spec_draining<H>(state: &State<H>, id: NodeId) -> bool {
    state.fleet.node(id).is_some_and(|n| n.draining)
}

/// Removes a call and its deadline, counting it off its node.
fn remove_call<H>(state: &mut State<H>, id: u64) -> Option<Call<H>> {
    let call = state.calls.remove(&id)?;
    state.deadlines.remove(&(call.deadline, id));
    if let Some(node) = state.nodes.get_mut(&call.node) {
        node.in_flight = node.in_flight.saturating_sub(1);
        let in_flight = node.in_flight;
        let _ = state.fleet.set_in_flight(call.node, in_flight);
    }
    Some(call)
}

/// Fails every request sent to `node` with NodeGone.
fn fail_calls_to<H>(state: &mut State<H>, node: NodeId, why: &str) -> Vec<Outgoing<H>> {
    let ids: Vec<u64> = state
        .calls
        .iter()
        .filter(|(_, call)| call.node == node)
        .map(|(id, _)| *id)
        .collect();
    let name = state.names.get(&node).cloned().unwrap_or_default();
    ids.into_iter()
        .filter_map(|id| remove_call(state, id))
        .map(|call| {
            let frame = Refusal::new(
                ErrorCode::NodeGone,
                format!("{why} ({name}) before replying; retrying goes to the session's new node"),
            )
            .frame(call.request_id);
            (call.requester, frame)
        })
        .collect()
}

fn moves_to_pins<H>(state: &State<H>, moves: &[Move]) -> Vec<PinWrite> {
    moves
        .iter()
        .map(|m| PinWrite {
            session_key: m.session_key.clone(),
            pin: m.to.map(|to| {
                let model = state
                    .sessions
                    .get(&m.session_key)
                    .and_then(|lease| lease.model.clone());
                (state.names.get(&to).cloned().unwrap_or_default(), model)
            }),
            owner: state.owners.get(&m.session_key).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::message;

    /// The handle is the connection id itself.
    fn outbox(conn: u64) -> ConnId {
        ConnId(conn)
    }

    fn start() -> Now {
        Now {
            instant: Instant::now(),
            unix_ms: 1_700_000_000_000,
            wall_us: 1_700_000_000_000_000,
        }
    }

    fn status(node: &str, models: &[&str]) -> WorkerStatus {
        WorkerStatus {
            node: node.into(),
            gpu_count: 1,
            models: models.iter().map(|m| m.to_string()).collect(),
            ..WorkerStatus::default()
        }
    }

    fn request(key: Option<&str>, model: Option<&str>, timeout_ms: u32) -> Request {
        Request {
            request_id: 7,
            session_key: key.map(str::to_owned),
            model: model.map(str::to_owned),
            timeout_ms,
            source_agent: None,
            payload: Bytes::from_static(b"prompt"),
        }
    }

    #[test]
    fn pins_round_trip_through_their_payload() {
        for pin in [
            Some(("gpu-a".to_string(), Some("llama".to_string()))),
            Some(("gpu-b".to_string(), None)),
            None,
        ] {
            for owner in [None, Some("agent-7".to_string())] {
                let write = PinWrite {
                    session_key: "s".into(),
                    owner: owner.filter(|_| pin.is_some()),
                    pin: pin.clone(),
                };
                assert_eq!(PinWrite::parse("s", &write.payload()), Some(write));
            }
        }
        assert_eq!(PinWrite::parse("s", &[0, 9, 1]), None);
        // A record with a fourth part, or bytes after its parts, is malformed.
        assert_eq!(PinWrite::parse("s", &[0, 1, b'a', 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(PinWrite::parse("s", &[0, 1, b'a', 0, 0, 7]), None);
    }

    #[test]
    fn sessions_go_to_the_node_with_the_model_and_replies_come_back() {
        let now = start();
        let mut workers = Workers::new(AffinityConfig::default(), [], now);
        let (a, b, agent) = (outbox(1), outbox(2), outbox(3));
        workers
            .register(ConnId(1), &a, &status("a", &["llama"]), now)
            .unwrap();
        workers
            .register(ConnId(2), &b, &status("b", &["mistral"]), now)
            .unwrap();
        for key in ["k1", "k2"] {
            let opened = workers
                .open_session(1, key, Some("mistral"), None, now)
                .unwrap();
            let Message::SessionPinned(pin) = message(&opened.frame) else {
                panic!()
            };
            assert_eq!(pin.node, "b");
            assert_eq!(opened.pins.len(), 1);
            // Opening again keeps the pin and writes nothing.
            let again = workers
                .open_session(2, key, Some("mistral"), None, now)
                .unwrap();
            assert!(again.pins.is_empty());
        }
        let routed = workers
            .route(
                &agent,
                "agent",
                request(Some("k1"), Some("mistral"), 0),
                None,
                now,
            )
            .unwrap();
        assert_eq!(routed.worker, ConnId(2));
        let Message::Request(sent) = message(&routed.frame) else {
            panic!()
        };
        assert_eq!(sent.source_agent.as_deref(), Some("agent"));
        // A reply from the wrong worker is dropped; the right one goes to the requester.
        let reply = || Reply {
            request_id: sent.request_id,
            ok: true,
            node: None,
            payload: Bytes::from_static(b"tokens"),
        };
        assert!(workers.reply(ConnId(1), reply()).is_none());
        let (to, frame) = workers.reply(ConnId(2), reply()).unwrap();
        assert_eq!(to, ConnId(3));
        let Message::Reply(back) = message(&frame) else {
            panic!()
        };
        assert_eq!((back.request_id, back.node.as_deref()), (7, Some("b")));
        // Answered once: a second reply is dropped.
        assert!(workers.reply(ConnId(2), reply()).is_none());
        // Without a session: the least-loaded node with the model.
        let routed = workers
            .route(&agent, "agent", request(None, Some("llama"), 0), None, now)
            .unwrap();
        assert_eq!(routed.worker, ConnId(1));
    }

    #[test]
    fn a_disconnected_worker_fails_its_requests_and_its_sessions_move() {
        let now = start();
        let mut workers = Workers::new(AffinityConfig::default(), [], now);
        let (a, b, agent) = (outbox(1), outbox(2), outbox(3));
        workers
            .register(ConnId(1), &a, &status("a", &["m"]), now)
            .unwrap();
        workers.open_session(1, "k", Some("m"), None, now).unwrap();
        workers
            .register(ConnId(2), &b, &status("b", &[]), now)
            .unwrap();
        workers
            .route(&agent, "agent", request(Some("k"), Some("m"), 0), None, now)
            .unwrap();
        let (failed, pins) = workers.disconnect(ConnId(1));
        assert_eq!(failed.len(), 1);
        let Message::Error(error) = message(&failed[0].1) else {
            panic!()
        };
        assert_eq!(error.code, ErrorCode::NodeGone.as_u16());
        assert_eq!(
            pins,
            vec![PinWrite {
                session_key: "k".into(),
                pin: Some(("b".into(), Some("m".into()))),
                owner: None,
            }]
        );
        assert_eq!(workers.pending_requests(), 0);
        let routed = workers
            .route(&agent, "agent", request(Some("k"), Some("m"), 0), None, now)
            .unwrap();
        assert_eq!(routed.worker, ConnId(2));
    }

    #[test]
    fn requests_past_their_deadline_fail_and_late_replies_are_dropped() {
        let now = start();
        let mut workers = Workers::new(AffinityConfig::default(), [], now);
        let (a, agent) = (outbox(1), outbox(3));
        workers
            .register(ConnId(1), &a, &status("a", &[]), now)
            .unwrap();
        let routed = workers
            .route(&agent, "agent", request(None, None, 50), None, now)
            .unwrap();
        let Message::Request(sent) = message(&routed.frame) else {
            panic!()
        };
        assert!(workers.expire(now + Duration::from_millis(49)).is_empty());
        let expired = workers.expire(now + Duration::from_millis(50));
        assert_eq!(expired.len(), 1);
        let Message::Error(error) = message(&expired[0].1) else {
            panic!()
        };
        assert_eq!(error.code, ErrorCode::DeadlineExceeded.as_u16());
        let late = Reply {
            request_id: sent.request_id,
            ok: true,
            node: None,
            payload: Bytes::new(),
        };
        assert!(workers.reply(ConnId(1), late).is_none());
    }

    #[test]
    fn an_owned_session_is_refused_to_other_identities_and_its_owner_survives_a_restart() {
        let now = start();
        let mut workers = Workers::new(AffinityConfig::default(), [], now);
        let (a, agent) = (outbox(1), outbox(3));
        workers
            .register(ConnId(1), &a, &status("a", &["m"]), now)
            .unwrap();
        let opened = workers
            .open_session(1, "k", Some("m"), Some("alice"), now)
            .unwrap();
        assert_eq!(opened.pins[0].owner.as_deref(), Some("alice"));
        let forbidden = |refusal: Refusal| assert_eq!(refusal.code, ErrorCode::Forbidden);
        forbidden(
            workers
                .open_session(2, "k", Some("m"), Some("bob"), now)
                .unwrap_err(),
        );
        let into_k = || request(Some("k"), None, 0);
        let refused = workers.route(&agent, "bob", into_k(), Some("bob"), now);
        forbidden(refused.err().unwrap());
        forbidden(workers.close_session("k", Some("bob")).unwrap_err());
        // Without credentials (no owner given) nothing is checked.
        workers.route(&agent, "x", into_k(), None, now).unwrap();
        // The owner comes back with the pins after a restart.
        let restarted = Workers::<ConnId>::new(AffinityConfig::default(), opened.pins, now);
        assert_eq!(
            restarted.state.owners.get("k").map(String::as_str),
            Some("alice")
        );
        // A session opened without credentials is claimed by the first identity that uses
        // it, and the claim is written.
        workers.open_session(4, "u", Some("m"), None, now).unwrap();
        let claimed = workers
            .open_session(5, "u", Some("m"), Some("carol"), now)
            .unwrap();
        assert_eq!(claimed.pins.len(), 1);
        assert_eq!(claimed.pins[0].owner.as_deref(), Some("carol"));
        let again = workers
            .open_session(6, "u", Some("m"), Some("carol"), now)
            .unwrap();
        assert!(again.pins.is_empty(), "kept and owned: nothing to write");
        // Closed by its owner, the key is free for anyone.
        assert!(workers.close_session("k", Some("alice")).unwrap().is_some());
        workers
            .open_session(3, "k", Some("m"), Some("bob"), now)
            .unwrap();
    }

    #[test]
    fn pin_keys_read_back_as_the_session_key_and_legacy_keys_are_kept() {
        for session in ["plain", "a/b", "pin:1:x", "with:colons:"] {
            assert_eq!(pin_session_of(&pin_key(session)), session);
        }
        assert_ne!(pin_key("a"), "a");
        assert_eq!(pin_session_of("legacy-session"), "legacy-session");
    }

    #[test]
    fn restored_pins_wait_for_their_node_then_stick() {
        let config = AffinityConfig {
            restore_grace_ms: 60_000,
            ..AffinityConfig::default()
        };
        let pins = [
            PinWrite {
                session_key: "k".into(),
                pin: Some(("a".into(), None)),
                owner: None,
            },
            PinWrite {
                session_key: "gone".into(),
                pin: Some(("a".into(), None)),
                owner: None,
            },
            PinWrite {
                session_key: "gone".into(),
                pin: None,
                owner: None,
            },
        ];
        let now = start();
        let mut workers = Workers::new(config, pins, now);
        assert_eq!(workers.sessions(), 1);
        let agent = outbox(3);
        // Another node registers first: the session waits for its own node.
        workers
            .register(ConnId(2), &outbox(2), &status("b", &[]), now)
            .unwrap();
        let refused = workers
            .route(&agent, "agent", request(Some("k"), None, 0), None, now)
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::Busy);
        assert!(refused.retry_after_ms > 0);
        workers
            .register(ConnId(1), &outbox(1), &status("a", &[]), now)
            .unwrap();
        let routed = workers
            .route(&agent, "agent", request(Some("k"), None, 0), None, now)
            .unwrap();
        assert_eq!(routed.worker, ConnId(1));
        assert!(routed.pins.is_empty(), "the pin was kept, not placed again");
    }
}
