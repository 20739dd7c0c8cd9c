//! What the router promised, recorded as the promises leave it (the frames pushed to the
//! clients), and checked as they are made: acknowledged ops, lease grants, fenced stamps,
//! job answers, leases and ends. It reads the machines' outputs only, never their state,
//! and draws no randomness. Checks that need the log run in [`crate::check`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use swarmbus_proto::ConnId;
use swarmbus_schema::{Epoch, JobId, JobLease, JobState, JobUpdate, LeaseGrant, Message, OpId};

use crate::clients::{job_payload, key_of_job_payload, Client, Role};
use crate::router::restore::jobs_config;

/// An invariant that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub invariant: &'static str,
    pub detail: String,
}

/// An op acknowledged to its publisher, to be found in the log with its payload.
#[derive(Debug, Clone)]
pub struct AckedOp {
    pub swarm: String,
    pub epoch: Epoch,
    pub op: OpId,
    pub payload: Bytes,
}

/// One holding of a lease as its holder was told (or as a restart held it again).
#[derive(Debug, Clone)]
pub struct Told {
    pub token: u64,
    pub holder: String,
    pub granted_at_ms: u64,
    /// The latest expiry told (or held after a restart).
    pub until_ms: u64,
    pub released_at_ms: Option<u64>,
}

impl Told {
    /// Until when this holding may be in effect.
    fn ends_ms(&self) -> u64 {
        self.released_at_ms
            .map_or(self.until_ms, |r| r.min(self.until_ms))
    }
}

/// What the oracle knows of one job.
#[derive(Debug, Default)]
pub struct JobWatch {
    /// The submitter was told the job is durable (a new submit's answer).
    pub durable: bool,
    pub acked_by_submitter: bool,
    /// The attempt in force as the workers were told: (worker, attempt, last heartbeat).
    pub lease: Option<(ConnId, u32, u64)>,
    /// Results accepted, by attempt.
    pub results: BTreeMap<u32, Bytes>,
    /// The end told to the submitter (not counting dead letters, which a re-drive may
    /// follow with another end).
    pub end: Option<(JobState, u32, Bytes)>,
    /// Any end (a dead letter too) reached the submitter.
    pub ended: bool,
    /// Ends the submitter's JobDedup let through (dead letters aside).
    pub handled: u32,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Oracle {
    pub broken: Vec<Broken>,
    /// Acks not yet checked against the log, then all of them.
    pub new_acks: Vec<AckedOp>,
    pub acked: BTreeMap<(String, Epoch, OpId), Bytes>,
    /// Holdings told, per (swarm, lease).
    pub told: BTreeMap<(String, String), Vec<Told>>,
    /// Extensions decided and being logged (held in memory meanwhile), per (swarm, lease,
    /// token): until when.
    pub extending: BTreeMap<(String, String, u64), u64>,
    pub jobs: BTreeMap<JobId, JobWatch>,
    /// The job each idempotency key was told to be.
    pub job_of_key: BTreeMap<String, JobId>,
    pub stamps_accepted: u64,
    pub stamps_refused: u64,
    pub lease_grants: u64,
    pub jobs_durable: u64,
    pub jobs_finished: u64,
    pub jobs_dead_lettered: u64,
}

impl Oracle {
    pub fn broke(&mut self, invariant: &'static str, detail: String) {
        self.broken.push(Broken { invariant, detail });
    }

    /// A frame is pushed to `client` at `now_ms`: the promises it makes.
    pub fn sent(&mut self, client: &Client, conn: ConnId, message: &Message, now_ms: u64) {
        match message {
            Message::PublishAck {
                request_id,
                op_id,
                epoch,
            } if !op_id.is_none() => self.publish_acked(client, *request_id, *epoch, *op_id),
            Message::LeaseGrant(grant) => self.lease_told(grant),
            Message::JobStatus(status) if client.role == Role::Submitter => {
                if let Some(key) = client.submits.get(&status.request_id) {
                    let key = key.clone();
                    self.submit_answered(key, status.job_id, status.duplicate, status.state);
                }
            }
            Message::JobLease(lease) => self.lease_sent(conn, lease, now_ms),
            Message::JobCancel {
                job_id, attempt, ..
            } => {
                if let Some(watch) = self.jobs.get_mut(job_id) {
                    if watch
                        .lease
                        .is_some_and(|(c, a, _)| c == conn && a == *attempt)
                    {
                        watch.lease = None;
                    }
                }
            }
            Message::JobUpdate(update)
                if update.state.is_final() && client.role == Role::Submitter =>
            {
                self.end_told(update)
            }
            _ => {}
        }
    }

    /// A lease to a worker: it carries the payload submitted under its job's key, and
    /// becomes the attempt in force.
    fn lease_sent(&mut self, conn: ConnId, lease: &JobLease, now_ms: u64) {
        let key = key_of_job_payload(&lease.payload).map(str::to_owned);
        let why = match &key {
            None => Some("the payload is no job payload".to_owned()),
            Some(key) if job_payload(key) != lease.payload => {
                Some(format!("the payload of key {key} changed"))
            }
            Some(key) => match self.job_of_key.get(key) {
                Some(job) if *job != lease.job_id => Some(format!("key {key} is job {}", job.0)),
                _ => None,
            },
        };
        if let Some(why) = why {
            let detail = format!("job {} attempt {}: {why}", lease.job_id.0, lease.attempt);
            self.broke("a job's lease carries its submitted payload", detail);
        }
        self.jobs.entry(lease.job_id).or_default().lease = Some((conn, lease.attempt, now_ms));
    }

    fn publish_acked(&mut self, client: &Client, request_id: u64, epoch: Epoch, op: OpId) {
        let Some(sent) = client.publishes.get(&request_id) else {
            return;
        };
        let key = (sent.swarm.clone(), epoch, op);
        if let Some(earlier) = self.acked.get(&key) {
            if *earlier != sent.payload {
                self.broke(
                    "an op id is never given to two acknowledged publishes",
                    format!(
                        "{} op {} (epoch {}) acknowledged twice",
                        sent.swarm, op.0, epoch.0
                    ),
                );
            }
        }
        self.new_acks.push(AckedOp {
            swarm: sent.swarm.clone(),
            epoch,
            op,
            payload: sent.payload.clone(),
        });
    }

    /// A grant told to its holder: a new token is larger than every token told before
    /// and its holding starts after every other holding ended; a renewal keeps the holder.
    fn lease_told(&mut self, grant: &LeaseGrant) {
        let key = (grant.swarm.clone(), grant.name.clone());
        let told = self.told.entry(key.clone()).or_default();
        if let Some(same) = told.iter_mut().find(|t| t.token == grant.token) {
            if same.holder != grant.holder {
                let detail = format!(
                    "{}/{} token {} told to {} and to {}",
                    key.0, key.1, grant.token, same.holder, grant.holder
                );
                self.broke("one token, one holder", detail);
                return;
            }
            same.until_ms = same.until_ms.max(grant.expires_at_ms);
            return;
        }
        let newest = told.iter().map(|t| t.token).max().unwrap_or(0);
        let overlapping = told
            .iter()
            .find(|t| t.ends_ms() > grant.granted_at_ms)
            .map(|t| (t.token, t.holder.clone(), t.ends_ms()));
        told.push(Told {
            token: grant.token,
            holder: grant.holder.clone(),
            granted_at_ms: grant.granted_at_ms,
            until_ms: grant.expires_at_ms,
            released_at_ms: None,
        });
        self.lease_grants += 1;
        if grant.token <= newest {
            let detail = format!(
                "{}/{}: token {} told after token {newest}",
                key.0, key.1, grant.token
            );
            self.broke("fencing tokens strictly increase", detail);
        }
        if let Some((token, holder, ends)) = overlapping {
            let detail = format!(
                "{}/{}: token {} granted to {} at {} while token {token} of {holder} ran until {ends}",
                key.0, key.1, grant.token, grant.holder, grant.granted_at_ms
            );
            self.broke("at most one lease holder at any instant", detail);
        }
    }

    /// A restart holds a lease again for its logged holder and TTL.
    pub fn lease_restored(
        &mut self,
        swarm: &str,
        name: &str,
        token: u64,
        holder: &str,
        until_ms: u64,
        now_ms: u64,
    ) {
        let told = self
            .told
            .entry((swarm.to_owned(), name.to_owned()))
            .or_default();
        match told.iter_mut().find(|t| t.token == token) {
            Some(same) => {
                same.until_ms = same.until_ms.max(until_ms);
                same.released_at_ms = None;
            }
            // Held again though never told (its grant was durable, its answer lost).
            None => told.push(Told {
                token,
                holder: holder.to_owned(),
                granted_at_ms: now_ms,
                until_ms,
                released_at_ms: None,
            }),
        }
    }

    /// The holder released `token`: its holding ends now.
    pub fn lease_released(&mut self, swarm: &str, name: &str, token: u64, now_ms: u64) {
        let key = (swarm.to_owned(), name.to_owned());
        if let Some(t) = self
            .told
            .get_mut(&key)
            .and_then(|told| told.iter_mut().find(|t| t.token == token))
        {
            t.released_at_ms.get_or_insert(now_ms);
        }
    }

    /// The router accepted a publish of `agent` stamped with `token` at `now_ms`: the token
    /// is the newest told, told to this agent, and its holding runs (as told, as being
    /// extended, or as held again after a restart).
    pub fn stamp_accepted(
        &mut self,
        swarm: &str,
        name: &str,
        agent: &str,
        token: u64,
        now_ms: u64,
    ) {
        self.stamps_accepted += 1;
        let key = (swarm.to_owned(), name.to_owned());
        let told = self.told.get(&key).map(Vec::as_slice).unwrap_or_default();
        let newest = told.iter().map(|t| t.token).max().unwrap_or(0);
        let extended = self
            .extending
            .get(&(swarm.to_owned(), name.to_owned(), token))
            .copied()
            .unwrap_or(0);
        let holding = told.iter().find(|t| t.token == token);
        let why = match holding {
            _ if token < newest => Some(format!("token {token} is older than token {newest}")),
            None => Some(format!("token {token} was never told")),
            Some(t) if t.holder != agent => Some(format!("token {token} is {}'s", t.holder)),
            Some(t) if now_ms >= t.ends_ms().max(extended) => Some(format!(
                "token {token}'s holding ended at {}",
                t.ends_ms().max(extended)
            )),
            Some(_) => None,
        };
        if let Some(why) = why {
            let detail = format!("{swarm}/{name}: a command of {agent} at {now_ms}: {why}");
            self.broke(
                "a command with a stale fencing token is never accepted",
                detail,
            );
        }
    }

    fn submit_answered(&mut self, key: String, job_id: JobId, duplicate: bool, state: JobState) {
        match self.job_of_key.get(&key) {
            Some(known) if *known != job_id => {
                let detail = format!("key {key}: job {} and job {}", known.0, job_id.0);
                self.broke("one idempotency key, one job", detail);
            }
            Some(_) => {}
            None if !duplicate && state == JobState::Queued => {
                self.job_of_key.insert(key, job_id);
                self.jobs_durable += 1;
                self.jobs.entry(job_id).or_default().durable = true;
            }
            None => {}
        }
    }

    /// The attempt of `job_id` in force as the workers were told: (worker, attempt, last
    /// heartbeat). Read before a result is handed to the router, whose answer may lease
    /// the job again at once.
    pub fn in_force(&self, job_id: JobId) -> Option<(ConnId, u32, u64)> {
        self.jobs.get(&job_id).and_then(|watch| watch.lease)
    }

    /// A worker's result for `attempt` of `job_id`, with the attempt that was in force
    /// when it arrived: accepted, it must be that attempt, on that worker, within its
    /// lease; refused, it must not have been.
    #[allow(clippy::too_many_arguments)] // one result's facts, checked together
    pub fn result(
        &mut self,
        conn: ConnId,
        job_id: JobId,
        attempt: u32,
        in_force: Option<(ConnId, u32, u64)>,
        accepted: Option<Bytes>,
        now_ms: u64,
    ) {
        let timeout = u64::from(jobs_config().visibility_timeout_ms);
        let valid = in_force
            .is_some_and(|(c, a, beat)| c == conn && a == attempt && now_ms < beat + timeout);
        let Some(payload) = accepted else {
            if valid {
                let detail = format!(
                    "job {} attempt {attempt} from {conn:?} at {now_ms}",
                    job_id.0
                );
                self.broke("the attempt in force may report its result", detail);
            }
            return;
        };
        let watch = self.jobs.entry(job_id).or_default();
        watch.results.insert(attempt, payload);
        if watch.lease == in_force {
            watch.lease = None;
        }
        if !valid {
            let detail = format!(
                "job {} attempt {attempt} from {conn:?} at {now_ms}; in force: {in_force:?}",
                job_id.0
            );
            self.broke("a fenced attempt's result is never accepted", detail);
        }
    }

    /// A heartbeat of the attempt in force moves its lease on.
    pub fn heartbeat(&mut self, conn: ConnId, job_id: JobId, attempt: u32, now_ms: u64) {
        let timeout = u64::from(jobs_config().visibility_timeout_ms);
        if let Some(watch) = self.jobs.get_mut(&job_id) {
            if let Some((c, a, beat)) = watch.lease.as_mut() {
                if *c == conn && *a == attempt && now_ms < *beat + timeout {
                    *beat = now_ms;
                }
            }
        }
    }

    /// An end told to the submitter agrees with every end told before (dead letters
    /// aside) and, completed, carries a result a worker had accepted.
    fn end_told(&mut self, update: &JobUpdate) {
        let watch = self.jobs.entry(update.job_id).or_default();
        watch.ended = true;
        if update.state == JobState::DeadLettered {
            return;
        }
        let end = (update.state, update.attempt, update.payload.clone());
        let mut broken = Vec::new();
        if update.state == JobState::Completed
            && watch.results.get(&update.attempt) != Some(&update.payload)
        {
            broken.push(format!(
                "attempt {} completed with a result no worker reported",
                update.attempt
            ));
        }
        match &watch.end {
            Some(known) if *known != end => broken.push(format!(
                "ended {:?} (attempt {}) after ending {:?} (attempt {})",
                end.0, end.1, known.0, known.1
            )),
            Some(_) => {}
            None => watch.end = Some(end),
        }
        for why in broken {
            let detail = format!("job {}: {why}", update.job_id.0);
            self.broke("a job ends once, with its accepted result", detail);
        }
    }

    /// The submitter's JobDedup let an end of `job_id` through.
    pub fn end_handled(&mut self, job_id: JobId, state: JobState) {
        let watch = self.jobs.entry(job_id).or_default();
        if state == JobState::DeadLettered {
            self.jobs_dead_lettered += 1;
            return;
        }
        watch.handled += 1;
        self.jobs_finished += 1;
        if watch.handled > 1 {
            let detail = format!("job {} handled {} times", job_id.0, watch.handled);
            self.broke(
                "each job's result reaches its submitter at most once",
                detail,
            );
        }
    }

    /// Connections closed: no attempt runs on them any more.
    pub fn conns_closed(&mut self, closed: &BTreeSet<ConnId>) {
        for watch in self.jobs.values_mut() {
            if watch.lease.is_some_and(|(c, _, _)| closed.contains(&c)) {
                watch.lease = None;
            }
        }
    }

    /// A crash: every attempt and every extension in memory is gone.
    pub fn crashed(&mut self) {
        self.extending.clear();
        for watch in self.jobs.values_mut() {
            watch.lease = None;
        }
    }
}
