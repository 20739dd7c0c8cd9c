//! The control plane's state: presence, leader leases with fencing tokens, and stopped
//! agents. Sans-IO: every call takes the time (router-clock milliseconds, see [`crate::Now`]) and
//! returns what to do; the driver pushes frames, publishes events and logs records.
//!
//! Durable state lives in the router's own swarm [`CONTROL_SWARM`], latest record per key
//! (keys built by [`crate::record_key`], each name length-prefixed): `lease` (swarm, name:
//! the newest fencing token granted, so tokens never go backwards across a restart),
//! `pause` (swarm), `stop` (agent) and `drain` (node).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use swarmbus_schema::{LeaseGrant, Member, Role};

use crate::conn::ConnId;
use crate::record_key;

/// The router's own swarm holding control-plane records.
pub const CONTROL_SWARM: &str = "$control";

/// `[presence]`: heartbeats and leases.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How often clients send a heartbeat (announced in Welcome).
    pub heartbeat_interval_ms: u32,
    /// An agent without a heartbeat for this long is declared gone (0: 3 intervals).
    pub heartbeat_timeout_ms: u32,
    /// Longest TTL a lease may be granted for.
    pub max_lease_ttl_ms: u32,
    /// PresenceQuery requests one session may make per second; more are refused with
    /// `Busy` (retry after 1 s).
    pub queries_per_s: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 0,
            max_lease_ttl_ms: 600_000,
            queries_per_s: 20,
        }
    }
}

impl PresenceConfig {
    pub fn timeout_ms(&self) -> u32 {
        match self.heartbeat_timeout_ms {
            0 => self.heartbeat_interval_ms.saturating_mul(3),
            set => set,
        }
    }
}

/// One present agent, reached through the runtime's handle `H` (its outbox).
#[derive(Debug, Clone)]
pub struct Present<H> {
    pub conn: ConnId,
    pub role: Role,
    pub swarms: Vec<String>,
    pub metadata: String,
    /// Router clock (ms) of its last sign of life. Shared with its session, which updates
    /// it on every message without taking the control plane's lock.
    pub last_seen: Arc<AtomicU64>,
    pub outbox: H,
}

impl<H> Present<H> {
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }
}

/// Who is present, by agent id: one entry per agent, whatever its connections did.
#[derive(Debug)]
pub struct Presence<H> {
    members: HashMap<Arc<str>, Present<H>>,
    /// The members of each swarm, in agent order: a swarm's list costs what it returns,
    /// not the whole router's membership.
    by_swarm: HashMap<String, BTreeSet<Arc<str>>>,
}

/// What a join did.
#[derive(Debug)]
pub enum Joined<H> {
    /// A new member: announce it.
    New,
    /// The agent was present on another connection, which must be closed (newest wins);
    /// nothing to announce (the member never left).
    Replaced(Present<H>),
}

impl<H> Default for Presence<H> {
    fn default() -> Self {
        Presence {
            members: HashMap::new(),
            by_swarm: HashMap::new(),
        }
    }
}

impl<H> Presence<H> {
    pub fn join(&mut self, agent: Arc<str>, present: Present<H>) -> Joined<H> {
        for swarm in &present.swarms {
            self.by_swarm
                .entry(swarm.clone())
                .or_default()
                .insert(agent.clone());
        }
        let new_swarms = present.swarms.clone();
        match self.members.insert(agent.clone(), present) {
            Some(old) => {
                for swarm in old.swarms.iter().filter(|s| !new_swarms.contains(s)) {
                    self.unindex(swarm, &agent);
                }
                Joined::Replaced(old)
            }
            None => Joined::New,
        }
    }

    /// Removes `agent` from `swarm`'s index.
    fn unindex(&mut self, swarm: &str, agent: &str) {
        if let Some(agents) = self.by_swarm.get_mut(swarm) {
            agents.remove(agent);
            if agents.is_empty() {
                self.by_swarm.remove(swarm);
            }
        }
    }

    fn remove(&mut self, agent: &str) -> Option<Present<H>> {
        let present = self.members.remove(agent)?;
        for swarm in &present.swarms {
            self.unindex(swarm, agent);
        }
        Some(present)
    }

    /// A heartbeat (or any sign of life) from `agent` on `conn`.
    pub fn seen(&mut self, agent: &str, conn: ConnId, now_ms: u64) {
        if let Some(member) = self.members.get_mut(agent) {
            if member.conn == conn {
                member.last_seen.fetch_max(now_ms, Ordering::Relaxed);
            }
        }
    }

    /// `conn` of `agent` closed: the member leaves unless a newer connection replaced it.
    pub fn leave(&mut self, agent: &str, conn: ConnId) -> Option<Present<H>> {
        if self.members.get(agent).is_some_and(|m| m.conn == conn) {
            return self.remove(agent);
        }
        None
    }

    /// Members without a heartbeat for `timeout_ms`: removed and returned.
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<(Arc<str>, Present<H>)> {
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms()) > timeout_ms)
            .map(|(agent, _)| agent.clone())
            .collect();
        gone.into_iter()
            .filter_map(|agent| self.remove(&agent).map(|m| (agent, m)))
            .collect()
    }

    pub fn get(&self, agent: &str) -> Option<&Present<H>> {
        self.members.get(agent)
    }

    /// The members that joined `swarm`, by agent id, as many as fit `budget_bytes` (each
    /// counts its agent id, its metadata and 32 bytes).
    pub fn list(&self, swarm: &str, budget_bytes: usize) -> Vec<Member> {
        let mut used = 0;
        self.by_swarm
            .get(swarm)
            .into_iter()
            .flatten()
            .filter_map(|agent| Some((agent, self.members.get(agent)?)))
            .map_while(|(agent, m)| {
                used += agent.len() + m.metadata.len() + 32;
                (used <= budget_bytes).then(|| Member {
                    agent: agent.to_string(),
                    role: m.role,
                    last_seen_ms: m.last_seen_ms(),
                    metadata: m.metadata.clone(),
                })
            })
            .collect()
    }

    /// How many members `swarm` has.
    pub fn count(&self, swarm: &str) -> usize {
        self.by_swarm.get(swarm).map_or(0, BTreeSet::len)
    }

    /// Up to `limit` members of `swarm` whose agent id sorts after `after`, in agent order.
    pub fn page(&self, swarm: &str, after: &str, limit: usize) -> Vec<Member> {
        use std::ops::Bound;
        let Some(agents) = self.by_swarm.get(swarm) else {
            return Vec::new();
        };
        agents
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .filter_map(|agent| {
                let m = self.members.get(agent)?;
                Some(Member {
                    agent: agent.to_string(),
                    role: m.role,
                    last_seen_ms: m.last_seen_ms(),
                    metadata: m.metadata.clone(),
                })
            })
            .take(limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// A lease held now.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    holder: Arc<str>,
    token: u64,
    granted_at_ms: u64,
    expires_at_ms: u64,
    /// The longest TTL in this holding's records: after a restart the holding is assumed
    /// to run for this long (its last renewal may have been just before the crash).
    logged_ttl_ms: u64,
}

/// Why a lease request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// Held by `holder` for `remaining_ms` more.
    Held { holder: String, remaining_ms: u64 },
    /// The token is not the lease's current one, or it expired.
    Lost { newest_token: u64 },
    /// A new lease past `limits.max_leases`, or a holding past the agent's
    /// `limits.max_leases_per_agent`.
    Limit(String),
}

/// Caps on leases: distinct leases the router knows (each keeps its newest token for
/// good), and leases one agent holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseLimits {
    pub max_leases: usize,
    pub max_held_per_agent: usize,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        LeaseLimits {
            max_leases: usize::MAX,
            max_held_per_agent: usize::MAX,
        }
    }
}

/// A lease decision: the grant to answer with, whether a new token was granted, and
/// whether the holding must be logged before the answer goes out (a new token, or a TTL
/// longer than any logged for this holding, so a restart never ends it early).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub grant: LeaseGrant,
    pub new_token: bool,
    pub must_log: bool,
    /// For an extension of a holding: its expiry before it (what
    /// [`Leases::undo_extension`] puts back when the longer TTL could not be logged).
    pub previous: Option<u64>,
}

/// A lease as its latest record left it: the newest token and, while held, its holder and
/// the TTL it was granted or renewed for (`None` in records written before TTLs were
/// logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredLease {
    pub token: u64,
    /// Empty once released.
    pub holder: String,
    pub ttl_ms: Option<u64>,
}

/// Why a stamped publish is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StampRefusal {
    /// The token is not the newest granted.
    Stale { newest_token: u64 },
    /// The newest token, but its holding ended (expired or released) or it is not the
    /// publisher's.
    NotHeld { newest_token: u64 },
}

/// A lease held now, as the admin view shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holding {
    pub swarm: String,
    pub name: String,
    pub holder: String,
    /// Its fencing token.
    pub token: u64,
    /// Router clock, Unix ms.
    pub expires_at_ms: u64,
}

/// Named leases per swarm. At most one holder at a time (by the router's clock); every
/// grant to a new holder takes a token larger than any granted before.
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<(String, String), Held>,
    /// The newest token granted per lease, restored from the log at start.
    newest: HashMap<(String, String), u64>,
    /// Entries of `held` per holder (expired ones until [`Leases::sweep`] drops them).
    held_by: HashMap<Arc<str>, usize>,
    /// Leases shared by a cluster: the revision of the newest write mirrored per lease
    /// (an older one seen later is ignored).
    revisions: HashMap<(String, String), u64>,
    limits: LeaseLimits,
}

impl Leases {
    /// Starts from the leases read back from the log at `now_ms`. Tokens continue from the
    /// newest granted. A lease held at the crash is held again by the same holder for the
    /// TTL it was logged with (it may still run at its holder, whose renewal can have come
    /// just before the crash): nobody else is granted it before then, and its holder may
    /// renew it with its token. A lease whose record has no TTL (an older format) is held by
    /// nobody for `unknown_ttl_ms` (the longest TTL the router grants).
    /// Leases restored count against `limits` but are never refused.
    pub fn restore(
        leases: impl IntoIterator<Item = ((String, String), RestoredLease)>,
        now_ms: u64,
        unknown_ttl_ms: u64,
        limits: LeaseLimits,
    ) -> Self {
        let mut restored = Leases {
            limits,
            ..Leases::default()
        };
        for (key, lease) in leases {
            restored.newest.insert(key.clone(), lease.token);
            let ttl_ms = match (lease.ttl_ms, lease.holder.is_empty()) {
                (Some(ttl), false) => ttl,
                (Some(_), true) => continue, // released
                (None, _) => unknown_ttl_ms,
            };
            let held = Held {
                holder: Arc::from(lease.holder.as_str()),
                token: lease.token,
                granted_at_ms: now_ms,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
                logged_ttl_ms: ttl_ms,
            };
            restored.hold(key, held);
        }
        restored
    }

    /// Records `held` as the holding of `key`, keeping the per-holder counts.
    fn hold(&mut self, key: (String, String), held: Held) {
        *self.held_by.entry(held.holder.clone()).or_default() += 1;
        if let Some(old) = self.held.insert(key, held) {
            self.unhold(&old.holder);
        }
    }

    /// Ends the holding of `key`, if any.
    fn end(&mut self, key: &(String, String)) {
        if let Some(old) = self.held.remove(key) {
            self.unhold(&old.holder);
        }
    }

    fn unhold(&mut self, holder: &Arc<str>) {
        if let Some(count) = self.held_by.get_mut(holder) {
            *count -= 1;
            if *count == 0 {
                self.held_by.remove(holder);
            }
        }
    }

    /// Drops holdings that expired by `now_ms` (they already count as free; this gives
    /// their holders' places back). Returns how many.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let expired: Vec<(String, String)> = self
            .held
            .iter()
            .filter(|(_, held)| held.expires_at_ms <= now_ms)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            self.end(key);
        }
        expired.len()
    }

    /// The holdings in force at `now_ms`, by swarm and lease name (the admin view).
    pub fn holdings(&self, now_ms: u64) -> Vec<Holding> {
        let mut holdings: Vec<Holding> = self
            .held
            .iter()
            .filter(|(_, held)| held.expires_at_ms > now_ms)
            .map(|((swarm, name), held)| Holding {
                swarm: swarm.clone(),
                name: name.clone(),
                holder: held.holder.to_string(),
                token: held.token,
                expires_at_ms: held.expires_at_ms,
            })
            .collect();
        holdings.sort_by(|a, b| (&a.swarm, &a.name).cmp(&(&b.swarm, &b.name)));
        holdings
    }

    /// Leases known (each keeps its newest token), and holdings not yet swept.
    pub fn counts(&self) -> (usize, usize) {
        (self.newest.len(), self.held.len())
    }

    /// Whether a publish stamped with `token` of lease `name` passes: only from the lease's
    /// current holder, with its current token, before the holding expires.
    pub fn check_stamp(
        &self,
        swarm: &str,
        name: &str,
        agent: &str,
        token: u64,
        now_ms: u64,
    ) -> Result<(), StampRefusal> {
        let key = (swarm.to_owned(), name.to_owned());
        let newest_token = self.newest.get(&key).copied().unwrap_or_default();
        if token != newest_token {
            return Err(StampRefusal::Stale { newest_token });
        }
        match self.held.get(&key) {
            Some(held)
                if held.token == token && &*held.holder == agent && held.expires_at_ms > now_ms =>
            {
                Ok(())
            }
            _ => Err(StampRefusal::NotHeld { newest_token }),
        }
    }

    /// The newest token granted for `name` of `swarm` (0: never granted).
    pub fn newest(&self, swarm: &str, name: &str) -> u64 {
        self.newest
            .get(&(swarm.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    pub fn acquire(
        &mut self,
        swarm: &str,
        name: &str,
        agent: &Arc<str>,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Granted, LeaseRefusal> {
        let key = (swarm.to_owned(), name.to_owned());
        if let Some(held) = self.held.get_mut(&key) {
            if held.expires_at_ms > now_ms {
                if held.holder != *agent {
                    return Err(LeaseRefusal::Held {
                        holder: held.holder.to_string(),
                        remaining_ms: held.expires_at_ms - now_ms,
                    });
                }
                // The holder asking again: same token, extended.
                let previous = Some(held.expires_at_ms);
                held.expires_at_ms = now_ms + ttl_ms;
                let must_log = ttl_ms > held.logged_ttl_ms;
                let held = held.clone();
                return Ok(Granted {
                    grant: grant(swarm, name, &held),
                    new_token: false,
                    must_log,
                    previous,
                });
            }
        }
        self.admits_new_holding(&key, agent)?;
        let newest = self.newest.get(&key).copied();
        let token = newest.unwrap_or_default() + 1;
        let held = Held {
            holder: agent.clone(),
            token,
            granted_at_ms: now_ms,
            expires_at_ms: now_ms + ttl_ms,
            // Nothing is logged until the grant's record is durable (see `logged`).
            logged_ttl_ms: 0,
        };
        self.newest.insert(key.clone(), token);
        self.hold(key, held.clone());
        Ok(Granted {
            grant: grant(swarm, name, &held),
            new_token: true,
            must_log: true,
            previous: None,
        })
    }

    /// Whether `agent` may take a new holding of `key` under the caps.
    fn admits_new_holding(
        &self,
        key: &(String, String),
        agent: &Arc<str>,
    ) -> Result<(), LeaseRefusal> {
        if !self.newest.contains_key(key) && self.newest.len() >= self.limits.max_leases {
            return Err(LeaseRefusal::Limit(format!(
                "the router knows {} leases (limits.max_leases)",
                self.limits.max_leases
            )));
        }
        if self.held_by.get(agent).copied().unwrap_or_default() >= self.limits.max_held_per_agent {
            return Err(LeaseRefusal::Limit(format!(
                "this agent holds {} leases (limits.max_leases_per_agent)",
                self.limits.max_held_per_agent
            )));
        }
        Ok(())
    }

    /// Leases shared by a cluster of routers (kept in the cluster, mirrored here): whether
    /// an acquire by `agent` passes the caps, as this router knows the leases (its holding
    /// of the lease in force, if any, is an extension and always passes).
    pub fn admits_acquire(
        &self,
        swarm: &str,
        name: &str,
        agent: &Arc<str>,
        now_ms: u64,
    ) -> Result<(), LeaseRefusal> {
        let key = (swarm.to_owned(), name.to_owned());
        match self.held.get(&key) {
            Some(held) if held.holder == *agent && held.expires_at_ms > now_ms => Ok(()),
            _ => self.admits_new_holding(&key, agent),
        }
    }

    /// Leases shared by a cluster: the lease's state as the cluster's write of `revision`
    /// left it (`holder` empty: released), from a write of this router or a change seen in
    /// the cluster. A write older than the newest mirrored is seen late, and ignored.
    #[allow(clippy::too_many_arguments)] // one lease state, field by field
    pub fn mirror(
        &mut self,
        swarm: &str,
        name: &str,
        holder: &str,
        token: u64,
        granted_at_ms: u64,
        expires_at_ms: u64,
        revision: u64,
    ) {
        let key = (swarm.to_owned(), name.to_owned());
        let seen = self.revisions.entry(key.clone()).or_default();
        if revision <= *seen {
            return;
        }
        *seen = revision;
        let newest = self.newest.entry(key.clone()).or_default();
        *newest = (*newest).max(token);
        if holder.is_empty() {
            self.end(&key);
            return;
        }
        let held = Held {
            holder: Arc::from(holder),
            token,
            granted_at_ms,
            expires_at_ms,
            // Durable in the cluster already.
            logged_ttl_ms: u64::MAX,
        };
        match self.held.get_mut(&key) {
            Some(current) if current.token == token && current.holder == held.holder => {
                current.expires_at_ms = expires_at_ms;
            }
            _ => self.hold(key, held),
        }
    }

    /// Leases shared by a cluster: the cluster named `token` the lease's newest (a refusal
    /// said so before its change was seen here). An older holding ends here.
    pub fn saw_token(&mut self, swarm: &str, name: &str, token: u64) {
        let key = (swarm.to_owned(), name.to_owned());
        let newest = self.newest.entry(key.clone()).or_default();
        if token > *newest {
            *newest = token;
            if self.held.get(&key).is_some_and(|held| held.token < token) {
                self.end(&key);
            }
        }
    }

    /// Forgets every lease (a router whose leases the cluster holds does not use the ones
    /// its own log kept).
    pub fn forget_all(&mut self) {
        self.held.clear();
        self.newest.clear();
        self.held_by.clear();
        self.revisions.clear();
    }

    pub fn renew(
        &mut self,
        swarm: &str,
        name: &str,
        agent: &Arc<str>,
        token: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Granted, LeaseRefusal> {
        let key = (swarm.to_owned(), name.to_owned());
        let newest_token = self.newest.get(&key).copied().unwrap_or_default();
        match self.held.get_mut(&key) {
            Some(held)
                if held.token == token && held.holder == *agent && held.expires_at_ms > now_ms =>
            {
                let previous = Some(held.expires_at_ms);
                held.expires_at_ms = now_ms + ttl_ms;
                let must_log = ttl_ms > held.logged_ttl_ms;
                let held = held.clone();
                Ok(Granted {
                    grant: grant(swarm, name, &held),
                    new_token: false,
                    must_log,
                    previous,
                })
            }
            _ => Err(LeaseRefusal::Lost { newest_token }),
        }
    }

    /// The record of holding `token` with `ttl_ms` is durable: a restart holds the lease
    /// for that long (what later extensions are compared with to know whether they must
    /// be logged).
    pub fn logged(&mut self, swarm: &str, name: &str, token: u64, ttl_ms: u64) {
        let key = (swarm.to_owned(), name.to_owned());
        if let Some(held) = self.held.get_mut(&key).filter(|held| held.token == token) {
            held.logged_ttl_ms = held.logged_ttl_ms.max(ttl_ms);
        }
    }

    /// Puts back the expiry a holding had before an extension (to `extended_to`) whose
    /// longer TTL could not be logged: the holding goes on as before (a restart must not
    /// end it earlier than a TTL it was told, and it was told only the old one). A later
    /// extension meanwhile (the expiry moved on since) is left alone.
    pub fn undo_extension(
        &mut self,
        swarm: &str,
        name: &str,
        token: u64,
        previous: u64,
        extended_to: u64,
    ) {
        let key = (swarm.to_owned(), name.to_owned());
        if let Some(held) = self
            .held
            .get_mut(&key)
            .filter(|held| held.token == token && held.expires_at_ms == extended_to)
        {
            held.expires_at_ms = previous;
        }
    }

    /// Takes back a new grant whose record could not be logged: nobody holds the lease
    /// then. The token stays used (the next grant takes a newer one).
    pub fn revoke(&mut self, swarm: &str, name: &str, token: u64) {
        let key = (swarm.to_owned(), name.to_owned());
        if self.held.get(&key).is_some_and(|held| held.token == token) {
            self.end(&key);
        }
    }

    pub fn release(
        &mut self,
        swarm: &str,
        name: &str,
        agent: &Arc<str>,
        token: u64,
    ) -> Result<(), LeaseRefusal> {
        let key = (swarm.to_owned(), name.to_owned());
        match self.held.get(&key) {
            Some(held) if held.token == token && held.holder == *agent => {
                self.end(&key);
                Ok(())
            }
            _ => Err(LeaseRefusal::Lost {
                newest_token: self.newest.get(&key).copied().unwrap_or_default(),
            }),
        }
    }
}

fn grant(swarm: &str, name: &str, held: &Held) -> LeaseGrant {
    LeaseGrant {
        request_id: 0,
        swarm: swarm.to_owned(),
        name: name.to_owned(),
        holder: held.holder.to_string(),
        token: held.token,
        granted_at_ms: held.granted_at_ms,
        expires_at_ms: held.expires_at_ms,
    }
}

/// Agents stopped by a controller, until when (router ms).
#[derive(Debug, Default)]
pub struct Stops {
    until: HashMap<String, u64>,
}

/// Agents stopped at once, at most (a stop of one more is refused with Busy).
pub const MAX_STOPS: usize = 100_000;

impl Stops {
    /// Forgets every stop (a router whose stops the cluster holds does not use the ones
    /// its own log kept).
    pub fn forget_all(&mut self) {
        self.until.clear();
    }

    pub fn stop(&mut self, agent: &str, until_ms: u64) {
        self.until.insert(agent.to_owned(), until_ms);
    }

    /// Whether a stop of `agent` fits: it is stopped already, or fewer than [`MAX_STOPS`]
    /// agents are (expired stops are dropped first when the map is full).
    pub fn has_room_for(&mut self, agent: &str, now_ms: u64) -> bool {
        if self.until.contains_key(agent) || self.until.len() < MAX_STOPS {
            return true;
        }
        self.until.retain(|_, until| *until > now_ms);
        self.until.len() < MAX_STOPS
    }

    /// How long `agent` is still refused, if it is.
    pub fn refused_for(&mut self, agent: &str, now_ms: u64) -> Option<Duration> {
        match self.until.get(agent) {
            Some(&until) if until > now_ms => Some(Duration::from_millis(until - now_ms)),
            Some(_) => {
                self.until.remove(agent);
                None
            }
            None => None,
        }
    }
}

/// A lease's record: its key and payload (token and TTL as big-endian u64s, then the
/// holder's agent id; an empty holder and TTL 0 once released).
pub fn lease_record(
    swarm: &str,
    name: &str,
    token: u64,
    holder: &str,
    ttl_ms: u64,
) -> (String, Bytes) {
    let mut payload = Vec::with_capacity(16 + holder.len());
    payload.extend_from_slice(&token.to_be_bytes());
    payload.extend_from_slice(&ttl_ms.to_be_bytes());
    payload.extend_from_slice(holder.as_bytes());
    (
        record_key::encode(LEASE, &[swarm, name]),
        Bytes::from(payload),
    )
}

/// Reads a lease record's payload (a bare 8-byte token in records of the older format).
fn parse_lease(payload: &[u8]) -> Option<RestoredLease> {
    let token = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    if payload.len() == 8 {
        return Some(RestoredLease {
            token,
            holder: String::new(),
            ttl_ms: None,
        });
    }
    let ttl_ms = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    let holder = std::str::from_utf8(&payload[16..]).ok()?.to_owned();
    Some(RestoredLease {
        token,
        holder,
        ttl_ms: Some(ttl_ms),
    })
}

/// The key of a swarm's pause flag (payload `1` paused, `0` resumed).
pub fn pause_key(swarm: &str) -> String {
    record_key::encode(PAUSE, &[swarm])
}

/// The key of an agent's stop (payload: until when, router ms, big-endian u64).
pub fn stop_key(agent: &str) -> String {
    record_key::encode(STOP, &[agent])
}

/// The key of a node's drain flag set by a controller (payload `1` drained, `0` not).
pub fn drain_key(node: &str) -> String {
    record_key::encode(DRAIN, &[node])
}

/// A pause or a stop, as its record says (what a cluster of routers shares, see
/// [`parse_safety`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SafetyRecord {
    Pause { swarm: String, paused: bool },
    Stop { agent: String, until_ms: u64 },
}

/// The pause or stop a record (key and payload, as [`pause_key`] and [`stop_key`] make
/// them) holds; `None` for any other record.
pub fn parse_safety(key: &str, payload: &[u8]) -> Option<SafetyRecord> {
    if let Some([swarm]) = record_key::decode_as::<1>(key, PAUSE) {
        return Some(SafetyRecord::Pause {
            swarm: swarm.to_owned(),
            paused: payload == b"1",
        });
    }
    let [agent] = record_key::decode_as::<1>(key, STOP)?;
    let until_ms = u64::from_be_bytes(payload.try_into().ok()?);
    Some(SafetyRecord::Stop {
        agent: agent.to_owned(),
        until_ms,
    })
}

const LEASE: &str = "lease";
const PAUSE: &str = "pause";
const STOP: &str = "stop";
const DRAIN: &str = "drain";

/// Control-plane state read back from the log at start.
#[derive(Debug, Default)]
pub struct Restored {
    /// The latest state of each lease (the newest token wins; among records of one token,
    /// the later).
    pub leases: HashMap<(String, String), RestoredLease>,
    pub paused: Vec<String>,
    pub stops: Vec<(String, u64)>,
    pub drained: Vec<String>,
}

impl Restored {
    /// Applies one record (in log order; later ones win).
    pub fn apply(&mut self, key: &str, payload: &[u8]) {
        let u64_of = |payload: &[u8]| payload.try_into().ok().map(u64::from_be_bytes);
        if let Some([swarm, name]) = record_key::decode_as::<2>(key, LEASE) {
            if let Some(lease) = parse_lease(payload) {
                self.lease(swarm, name, lease);
            }
        } else if let Some([swarm]) = record_key::decode_as::<1>(key, PAUSE) {
            self.pause(swarm, payload);
        } else if let Some([agent]) = record_key::decode_as::<1>(key, STOP) {
            self.stop(agent, u64_of(payload));
        } else if let Some([node]) = record_key::decode_as::<1>(key, DRAIN) {
            self.drain(node, payload);
        } else {
            self.apply_legacy(key, payload);
        }
    }

    /// Keys written before [`record_key`]: `lease/<swarm>/<name>` is ambiguous when a name
    /// holds `/`, so its token goes to every reading of it (tokens only ever grow, so a
    /// lease that never existed merely starts higher); the others have one variable part.
    fn apply_legacy(&mut self, key: &str, payload: &[u8]) {
        let u64_of = |payload: &[u8]| payload.try_into().ok().map(u64::from_be_bytes);
        if let Some(rest) = key.strip_prefix("lease/") {
            let Some(lease) = parse_lease(payload) else {
                return;
            };
            let splits: Vec<usize> = rest.match_indices('/').map(|(at, _)| at).collect();
            for at in splits {
                self.lease(&rest[..at], &rest[at + 1..], lease.clone());
            }
        } else if let Some(swarm) = key.strip_prefix("pause/") {
            self.pause(swarm, payload);
        } else if let Some(agent) = key.strip_prefix("stop/") {
            self.stop(agent, u64_of(payload));
        } else if let Some(node) = key.strip_prefix("drain/") {
            self.drain(node, payload);
        }
    }

    fn lease(&mut self, swarm: &str, name: &str, lease: RestoredLease) {
        // The largest token logged wins, whatever order the records landed in.
        let key = (swarm.to_owned(), name.to_owned());
        match self.leases.entry(key) {
            std::collections::hash_map::Entry::Occupied(known)
                if known.get().token > lease.token => {}
            std::collections::hash_map::Entry::Occupied(mut known) => {
                known.insert(lease);
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(lease);
            }
        }
    }

    fn pause(&mut self, swarm: &str, payload: &[u8]) {
        self.paused.retain(|s| s != swarm);
        if payload == b"1" {
            self.paused.push(swarm.to_owned());
        }
    }

    fn stop(&mut self, agent: &str, until: Option<u64>) {
        self.stops.retain(|(a, _)| a != agent);
        if let Some(until) = until {
            self.stops.push((agent.to_owned(), until));
        }
    }

    fn drain(&mut self, node: &str, payload: &[u8]) {
        self.drained.retain(|n| n != node);
        if payload == b"1" {
            self.drained.push(node.to_owned());
        }
    }
}

#[cfg(test)]
mod tests;
