//! The simulated clients: what each agent has queued from the router, what it sent and
//! is waiting for, and what it keeps across reconnects (its applied ops, its lease, its
//! jobs). Subscribers apply through the client library's [`IdempotentApply`] and
//! [`FencingFilter`], submitters hand job ends to its [`JobDedup`]: the same code agents
//! link.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use swarmbus_client::{FencingFilter, IdempotentApply, JobDedup};
use swarmbus_proto::{ConnId, Lane};
use swarmbus_schema::{Class, Epoch, JobId, LeaseAction, Message, OpId};

use crate::router::CLASS_LANE_CAPACITY;

/// The user swarms of every run.
pub const SWARMS: [&str; 2] = ["s0", "s1"];
/// The swarm jobs are submitted to. One only: with two, the job queue's `promote` walks a
/// hash map, so which swarm's retried jobs go first would depend on the process's hash
/// seed and a run would not replay from its seed.
pub const JOB_SWARM: &str = "s0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Publishes commands (stamped while it holds the swarm's lease), control ops and
    /// telemetry; competes for the `leader` lease of each swarm; re-drives dead letters.
    Controller,
    /// Subscribes to every class of every swarm and applies ordered ops once each.
    Subscriber,
    /// Submits jobs, handles each end once, acknowledges ends, cancels now and then.
    Submitter,
    /// Takes jobs of [`JOB_SWARM`], heartbeats, finishes, fails, asks for retries, or
    /// goes silent until its lease expires.
    Worker,
}

/// The frames queued for one connection, by lane, as the client will read them.
#[derive(Debug, Default)]
pub struct Inbox {
    lanes: [VecDeque<Message>; Lane::COUNT],
}

impl Inbox {
    pub fn queued(&self, lane: Lane) -> usize {
        self.lanes[lane.index()].len()
    }

    /// Queues `message`; `false` (nothing queued) when an ordered lane is full. A full
    /// telemetry lane sheds its oldest frame instead.
    pub fn push(&mut self, lane: Lane, message: Message, bounded: bool) -> bool {
        let queue = &mut self.lanes[lane.index()];
        if queue.len() >= CLASS_LANE_CAPACITY {
            if lane.sheddable() {
                queue.pop_front();
            } else if bounded {
                return false;
            }
        }
        queue.push_back(message);
        true
    }

    /// The lanes with something queued.
    pub fn ready_lanes(&self) -> Vec<usize> {
        (0..Lane::COUNT)
            .filter(|i| !self.lanes[*i].is_empty())
            .collect()
    }

    pub fn pop(&mut self, lane_index: usize) -> Option<Message> {
        self.lanes.get_mut(lane_index)?.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }
}

/// A publish waiting for its acknowledgement.
#[derive(Debug, Clone)]
pub struct SentPublish {
    pub swarm: String,
    pub class: Class,
    pub payload: Bytes,
}

/// A lease the client believes it holds: until `expires_at_ms` on the router's clock.
#[derive(Debug, Clone, Copy)]
pub struct Holding {
    pub token: u64,
    pub expires_at_ms: u64,
}

/// One simulated agent. Fields for roles it does not play stay empty.
#[derive(Debug)]
pub struct Client {
    pub agent: Arc<str>,
    pub role: Role,
    pub conn: Option<ConnId>,
    pub inbox: Inbox,
    next_request: u64,
    /// Controller: publishes not yet acknowledged, by request id.
    pub publishes: BTreeMap<u64, SentPublish>,
    pub lease_ttl_ms: u64,
    /// Controller: leases held, by swarm.
    pub holdings: BTreeMap<String, Holding>,
    /// Controller: the token of a holding that ran out, which it sometimes stamps with
    /// anyway (a paused leader waking up), to see it refused.
    pub stale_tokens: BTreeMap<String, u64>,
    /// Controller: lease requests in flight (swarm, action).
    pub lease_requests: BTreeMap<u64, (String, LeaseAction)>,
    /// Subscriber: the client library's duplicate filter (kept across reconnects, as an
    /// agent persists it) and fencing filter.
    pub apply: IdempotentApply,
    pub fencing: FencingFilter,
    /// Subscriber: the simulation's own record of the last op applied per swarm and
    /// class (epoch, op, payload), to check the library's and the log against.
    pub applied: BTreeMap<(String, Class), crate::check::Applied>,
    /// Submitter: its submits by request id (idempotency key), ends to acknowledge, jobs
    /// it knows of.
    pub submits: BTreeMap<u64, String>,
    pub next_key: u64,
    pub dedup: JobDedup,
    /// Ends handled and not yet acknowledged: job, attempt, state.
    pub ends_to_ack: Vec<(JobId, u32, swarmbus_schema::JobState)>,
    pub jobs: Vec<JobId>,
    /// Worker: attempts it runs, and fenced attempts whose late result it may still send.
    pub running: BTreeMap<JobId, u32>,
    pub fenced: Vec<(JobId, u32)>,
}

impl Client {
    pub fn new(agent: &str, role: Role, lease_ttl_ms: u64) -> Self {
        Client {
            agent: Arc::from(agent),
            role,
            conn: None,
            inbox: Inbox::default(),
            next_request: 1,
            publishes: BTreeMap::new(),
            lease_ttl_ms,
            holdings: BTreeMap::new(),
            stale_tokens: BTreeMap::new(),
            lease_requests: BTreeMap::new(),
            apply: IdempotentApply::new(),
            fencing: FencingFilter::new(),
            applied: BTreeMap::new(),
            submits: BTreeMap::new(),
            next_key: 0,
            dedup: JobDedup::default(),
            ends_to_ack: Vec::new(),
            jobs: Vec::new(),
            running: BTreeMap::new(),
            fenced: Vec::new(),
        }
    }

    pub fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// The connection closed: what was queued for it and every answer still awaited are
    /// lost; what the agent keeps (applied ops, leases, jobs) stays.
    pub fn disconnected(&mut self) {
        self.conn = None;
        self.inbox = Inbox::default();
        self.publishes.clear();
        self.lease_requests.clear();
        self.submits.clear();
        let running = std::mem::take(&mut self.running);
        self.fenced.extend(running);
    }

    /// The resume point of `class` in `swarm`, from the library's state.
    pub fn resume_point(&self, swarm: &str, class: Class) -> Option<(Epoch, OpId)> {
        self.apply
            .resume_points()
            .into_iter()
            .find(|point| point.swarm == swarm && point.class == class)
            .map(|point| (point.epoch, point.last_applied))
    }

    /// The lease of `swarm` the client may act with at `now_ms`.
    pub fn holding(&self, swarm: &str, now_ms: u64) -> Option<Holding> {
        self.holdings
            .get(swarm)
            .copied()
            .filter(|h| now_ms < h.expires_at_ms)
    }
}

/// The agents of every run.
pub fn cast(lease_ttl_ms: [u64; 2]) -> Vec<Client> {
    vec![
        Client::new("ctl-0", Role::Controller, lease_ttl_ms[0]),
        Client::new("ctl-1", Role::Controller, lease_ttl_ms[1]),
        Client::new("sub-0", Role::Subscriber, 0),
        Client::new("sub-1", Role::Subscriber, 0),
        Client::new("sub-2", Role::Subscriber, 0),
        Client::new("submit-0", Role::Submitter, 0),
        Client::new("worker-0", Role::Worker, 0),
        Client::new("worker-1", Role::Worker, 0),
    ]
}

/// The payload of the job submitted under `key`: the key, then padding whose length
/// comes from the key, so some payloads stay in the job queue's cache and others are read
/// back from the log for each lease.
pub fn job_payload(key: &str) -> Bytes {
    let pad = key.bytes().fold(0usize, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % 160;
    let mut text = format!("job:{key}:");
    text.extend(std::iter::repeat_n('x', pad));
    Bytes::from(text)
}

/// The key a job payload was built from ([`job_payload`]).
pub fn key_of_job_payload(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload).ok()?.strip_prefix("job:")?;
    text.split(':').next()
}
