//! What the simulated agents do: publish, lead, apply, acknowledge, submit and run jobs.
//! Each step picks a connected agent of the role it needs.

use swarmbus_client::DEFAULT_LEASE;
use swarmbus_proto::control::LeaseRefusal;
use swarmbus_proto::jobs::AckedEnd;
use swarmbus_schema::{
    Class, JobId, JobProgress, JobResult, JobState, LeaseAction, LeaseRequest, Message, OpId,
    Publish, SubmitJob,
};

use super::*;
use crate::clients::{job_payload, Holding, Role, SentPublish, JOB_SWARM, SWARMS};
use crate::router::{LeaseDecision, StampCheck};

impl World {
    /// A connected client of `role` (that `also` accepts), chosen by seed.
    fn pick(&mut self, role: Role, also: impl Fn(&Client) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.clients.len())
            .filter(|i| {
                let c = &self.clients[*i];
                c.role == role && c.conn.is_some() && also(c)
            })
            .collect();
        self.rng.index(candidates.len()).map(|at| candidates[at])
    }

    fn swarm(&mut self) -> &'static str {
        SWARMS[self.rng.below(SWARMS.len() as u64) as usize]
    }

    /// Holdings whose expiry passed are stale tokens now.
    fn expire_holdings(&mut self, index: usize) {
        let now_ms = self.now_ms();
        let client = &mut self.clients[index];
        let expired: Vec<String> = client
            .holdings
            .iter()
            .filter(|(_, h)| now_ms >= h.expires_at_ms)
            .map(|(swarm, _)| swarm.clone())
            .collect();
        for swarm in expired {
            if let Some(h) = client.holdings.remove(&swarm) {
                client.stale_tokens.insert(swarm, h.token);
            }
        }
    }

    /// The token a controller stamps a command of `swarm` with: its lease's while it holds
    /// it, now and then a stale one, else none.
    fn stamp_for(&mut self, index: usize, swarm: &str) -> u64 {
        self.expire_holdings(index);
        let now_ms = self.now_ms();
        let held = self.clients[index].holding(swarm, now_ms).map(|h| h.token);
        let stale = self.clients[index].stale_tokens.get(swarm).copied();
        match (held, stale) {
            (Some(token), _) if self.rng.chance(85) => token,
            (_, Some(token)) if self.rng.chance(25) => token,
            _ => 0,
        }
    }

    /// A controller publishes a command (stamped while it leads) or a control op, now and
    /// then targeted at one subscriber.
    pub(super) fn publish(&mut self) -> String {
        let Some(index) = self.pick(Role::Controller, |_| true) else {
            return "publish: no controller connected".into();
        };
        let swarm = self.swarm();
        let class = if self.rng.chance(75) {
            Class::Command
        } else {
            Class::Control
        };
        let target = self
            .rng
            .chance(20)
            .then(|| format!("sub-{}", self.rng.below(3)));
        let key = self
            .rng
            .chance(30)
            .then(|| format!("k{}", self.rng.below(4)));
        let token = if class == Class::Command {
            self.stamp_for(index, swarm)
        } else {
            0
        };
        let agent = self.clients[index].agent.clone();
        let payload = self.payload(&agent);
        let client = &mut self.clients[index];
        let request_id = client.request_id();
        client.publishes.insert(
            request_id,
            SentPublish {
                swarm: swarm.to_owned(),
                class,
                payload: payload.clone(),
            },
        );
        let conn = client.conn.unwrap_or(ConnId(0));
        let publish = Publish {
            request_id,
            swarm: swarm.to_owned(),
            class,
            target_agent: target.clone(),
            key,
            payload,
            fencing_token: token,
            lease: None,
        };
        let check = self.drive(|router, io| router.publish(io, conn, &agent, &publish));
        let now_ms = self.now_ms();
        match &check {
            StampCheck::Accepted => {
                self.oracle
                    .stamp_accepted(swarm, DEFAULT_LEASE, &agent, token, now_ms)
            }
            StampCheck::Refused(_) => self.oracle.stamps_refused += 1,
            StampCheck::Unstamped => {}
        }
        self.stats.ops_published += 1;
        format!("publish {agent} {swarm} {class:?} req {request_id} target {target:?} token {token}: {check:?}")
    }

    pub(super) fn telemetry(&mut self) -> String {
        let Some(index) = self.pick(Role::Controller, |_| true) else {
            return "telemetry: no controller connected".into();
        };
        let swarm = self.swarm();
        let agent = self.clients[index].agent.clone();
        let conn = self.clients[index].conn.unwrap_or(ConnId(0));
        let publish = Publish {
            request_id: 0,
            swarm: swarm.to_owned(),
            class: Class::Telemetry,
            target_agent: None,
            key: None,
            payload: self.payload(&agent),
            fencing_token: 0,
            lease: None,
        };
        self.drive(|router, io| router.publish(io, conn, &agent, &publish));
        format!("telemetry {agent} {swarm}")
    }

    /// A connected client reads a few frames, each from a lane of its choosing (streams
    /// are independent; each is read in order).
    pub(super) fn process(&mut self) -> String {
        let queued: Vec<usize> = (0..self.clients.len())
            .filter(|i| !self.clients[*i].inbox.is_empty())
            .collect();
        let Some(at) = self.rng.index(queued.len()) else {
            return "process: nothing queued".into();
        };
        let index = queued[at];
        let count = self.rng.between(1, 4);
        let mut seen = Vec::new();
        for _ in 0..count {
            let lanes = self.clients[index].inbox.ready_lanes();
            let Some(at) = self.rng.index(lanes.len()) else {
                break;
            };
            if let Some(message) = self.clients[index].inbox.pop(lanes[at]) {
                seen.push(self.handle(index, message));
            }
        }
        format!("{} reads [{}]", self.clients[index].agent, seen.join("; "))
    }

    /// What a client does with one frame it read.
    pub(super) fn handle(&mut self, index: usize, message: Message) -> String {
        let client = &mut self.clients[index];
        match message {
            Message::Deliver(deliver) => {
                let applied =
                    crate::check::apply_delivery(client, &deliver, &self.log, &mut self.oracle);
                match (deliver.class.is_ordered(), applied) {
                    (false, _) => self.stats.telemetry_delivered += 1,
                    (true, true) => self.stats.ops_applied += 1,
                    (true, false) => self.stats.duplicates_dropped += 1,
                }
                format!(
                    "deliver {} {:?} op {} applied {applied}",
                    deliver.swarm, deliver.class, deliver.op_id.0
                )
            }
            Message::PublishAck {
                request_id, op_id, ..
            } => {
                client.publishes.remove(&request_id);
                self.stats.ops_acked += u64::from(!op_id.is_none());
                format!("ack of req {request_id}: op {}", op_id.0)
            }
            Message::LeaseGrant(grant) => {
                client.lease_requests.remove(&grant.request_id);
                let held = Holding {
                    token: grant.token,
                    expires_at_ms: grant.expires_at_ms,
                };
                if let Some(old) = client.holdings.insert(grant.swarm.clone(), held) {
                    if old.token != grant.token {
                        client.stale_tokens.insert(grant.swarm.clone(), old.token);
                    }
                }
                format!(
                    "grant {} token {} until {}",
                    grant.swarm, grant.token, grant.expires_at_ms
                )
            }
            Message::Error(error) => {
                client.publishes.remove(&error.request_id);
                client.lease_requests.remove(&error.request_id);
                format!("error {} for req {}", error.code, error.request_id)
            }
            other => self.handle_job_message(index, other),
        }
    }

    fn handle_job_message(&mut self, index: usize, message: Message) -> String {
        let client = &mut self.clients[index];
        match message {
            Message::JobLease(lease) if client.role == Role::Worker => {
                client.running.insert(lease.job_id, lease.attempt);
                format!("lease job {} attempt {}", lease.job_id.0, lease.attempt)
            }
            Message::JobCancel {
                job_id, attempt, ..
            } if client.role == Role::Worker => {
                if client.running.get(&job_id) == Some(&attempt) {
                    client.running.remove(&job_id);
                    client.fenced.push((job_id, attempt));
                }
                format!("cancel job {} attempt {attempt}", job_id.0)
            }
            Message::JobUpdate(update)
                if update.state.is_final() && client.role == Role::Submitter =>
            {
                let first = client.dedup.first_time(&update);
                // Every end is acknowledged, dead letters too (as docs/jobs.md's example
                // does): the ack names the end, so a late one of a dead letter re-driven
                // since acknowledges nothing.
                if first {
                    client
                        .ends_to_ack
                        .push((update.job_id, update.attempt, update.state));
                }
                if first {
                    self.oracle.end_handled(update.job_id, update.state);
                }
                format!(
                    "end job {} {:?} first {first}",
                    update.job_id.0, update.state
                )
            }
            Message::JobStatus(status) if client.role == Role::Submitter => {
                if !status.duplicate && !client.jobs.contains(&status.job_id) {
                    client.jobs.push(status.job_id);
                }
                format!(
                    "status job {} {:?} dup {}",
                    status.job_id.0, status.state, status.duplicate
                )
            }
            other => message_name(&other).to_owned(),
        }
    }

    pub(super) fn ack(&mut self) -> String {
        let Some(index) = self.pick(Role::Subscriber, |c| !c.applied.is_empty()) else {
            return "ack: nothing applied".into();
        };
        let keys: Vec<(String, Class)> = self.clients[index].applied.keys().cloned().collect();
        let at = self.rng.index(keys.len()).unwrap_or(0);
        let (swarm, class) = keys[at].clone();
        let client = &self.clients[index];
        let op = client
            .applied
            .get(&(swarm.clone(), class))
            .map_or(OpId(0), |a| a.1);
        let conn = client.conn.unwrap_or(ConnId(0));
        let agent = client.agent.clone();
        self.drive(|router, io| router.ack(io, conn, &swarm, class, op));
        format!("{agent} acks {swarm} {class:?} op {}", op.0)
    }

    /// A controller acquires the lease of a swarm, or, holding it, renews, re-acquires or
    /// releases it.
    pub(super) fn lease(&mut self) -> String {
        let Some(index) = self.pick(Role::Controller, |_| true) else {
            return "lease: no controller connected".into();
        };
        let swarm = self.swarm();
        self.expire_holdings(index);
        let now_ms = self.now_ms();
        let (action, token) = match self.clients[index].holding(swarm, now_ms) {
            None => (LeaseAction::Acquire, 0),
            Some(h) => match self.rng.below(10) {
                0..=5 => (LeaseAction::Renew, h.token),
                6 => (LeaseAction::Release, h.token),
                7 => (LeaseAction::Acquire, 0),
                _ => return format!("{} leads {swarm}, waits", self.clients[index].agent),
            },
        };
        let client = &mut self.clients[index];
        let request = LeaseRequest {
            request_id: client.request_id(),
            swarm: swarm.to_owned(),
            name: DEFAULT_LEASE.to_owned(),
            action,
            token,
            ttl_ms: u32::try_from(client.lease_ttl_ms).unwrap_or(u32::MAX),
        };
        client
            .lease_requests
            .insert(request.request_id, (swarm.to_owned(), action));
        let (conn, agent) = (client.conn.unwrap_or(ConnId(0)), client.agent.clone());
        let decision = self.drive(|router, io| router.lease(io, conn, &agent, &request));
        self.lease_decided(index, &request, &decision);
        format!(
            "{agent} {action:?} {swarm} token {token}: {}",
            decision_name(&decision)
        )
    }

    /// What the oracle and the client learn from a lease decision at once (grants are
    /// learnt when read).
    fn lease_decided(&mut self, index: usize, request: &LeaseRequest, decision: &LeaseDecision) {
        let now_ms = self.now_ms();
        let (swarm, name) = (request.swarm.as_str(), request.name.as_str());
        match decision {
            LeaseDecision::Granted(granted) if !granted.new_token && granted.must_log => {
                let key = (swarm.to_owned(), name.to_owned(), granted.grant.token);
                let until = self.oracle.extending.entry(key).or_default();
                *until = (*until).max(granted.grant.expires_at_ms);
            }
            LeaseDecision::Granted(_) => {}
            LeaseDecision::Released { token } => {
                self.oracle.lease_released(swarm, name, *token, now_ms);
                self.clients[index].holdings.remove(swarm);
            }
            LeaseDecision::Refused(LeaseRefusal::Lost { .. }) => {
                if let Some(h) = self.clients[index].holdings.remove(swarm) {
                    self.clients[index]
                        .stale_tokens
                        .insert(swarm.to_owned(), h.token);
                }
            }
            LeaseDecision::Refused(_) => {}
        }
    }

    /// The submitter submits a job, now and then again under a key it used before.
    pub(super) fn submit(&mut self) -> String {
        let Some(index) = self.pick(Role::Submitter, |_| true) else {
            return "submit: no submitter connected".into();
        };
        let used = self.clients[index].next_key;
        let key = if used > 0 && self.rng.chance(15) {
            format!("key-{}", self.rng.below(used))
        } else {
            self.clients[index].next_key += 1;
            format!("key-{used}")
        };
        let deadline_ms = if self.rng.chance(10) {
            self.rng.between(50, 800)
        } else {
            0
        };
        let priority = self.rng.below(3) as u8;
        let client = &mut self.clients[index];
        let request_id = client.request_id();
        client.submits.insert(request_id, key.clone());
        let submit = SubmitJob {
            request_id,
            swarm: JOB_SWARM.to_owned(),
            idempotency_key: key.clone(),
            model: None,
            priority,
            deadline_ms,
            max_attempts: 0,
            payload: job_payload(&key),
        };
        let (conn, agent) = (client.conn.unwrap_or(ConnId(0)), client.agent.clone());
        self.drive(|router, io| router.submit(io, conn, &agent, submit));
        format!("submit {key} req {request_id} deadline {deadline_ms}")
    }

    /// A worker heartbeats, finishes, fails or asks for a retry of an attempt it runs,
    /// goes silent, or reports a fenced attempt late.
    pub(super) fn work(&mut self) -> String {
        let Some(index) = self.pick(Role::Worker, |c| {
            !c.running.is_empty() || !c.fenced.is_empty()
        }) else {
            return "work: nothing to run".into();
        };
        let roll = self.rng.below(100);
        let client = &mut self.clients[index];
        if roll < 10 || client.running.is_empty() {
            let Some((job_id, attempt)) = client.fenced.pop() else {
                return "work: idle".into();
            };
            return self.send_result(index, job_id, attempt, true, false);
        }
        let running: Vec<(JobId, u32)> = client.running.iter().map(|(j, a)| (*j, *a)).collect();
        let at = self.rng.index(running.len()).unwrap_or(0);
        let (job_id, attempt) = running[at];
        match roll {
            10..=39 => self.heartbeat(index, job_id, attempt),
            40..=74 => self.send_result(index, job_id, attempt, true, false),
            75..=84 => self.send_result(index, job_id, attempt, false, false),
            85..=91 => self.send_result(index, job_id, attempt, false, true),
            _ => format!(
                "{} lets job {} attempt {attempt} run",
                self.clients[index].agent, job_id.0
            ),
        }
    }

    fn heartbeat(&mut self, index: usize, job_id: JobId, attempt: u32) -> String {
        let (conn, now_ms) = (self.clients[index].conn.unwrap_or(ConnId(0)), self.now_ms());
        self.oracle.heartbeat(conn, job_id, attempt, now_ms);
        let progress = JobProgress {
            job_id,
            attempt,
            payload: bytes::Bytes::from(format!("progress {now_ms}")),
        };
        self.drive(|router, io| router.progress(io, conn, progress));
        format!("heartbeat job {} attempt {attempt}", job_id.0)
    }

    /// A worker's result for an attempt; the oracle checks the router's verdict against
    /// the attempt in force when it arrived.
    pub(super) fn send_result(
        &mut self,
        index: usize,
        job_id: JobId,
        attempt: u32,
        ok: bool,
        retry: bool,
    ) -> String {
        let client = &mut self.clients[index];
        client.running.remove(&job_id);
        let request_id = client.request_id();
        let conn = client.conn.unwrap_or(ConnId(0));
        let payload = bytes::Bytes::from(format!("result {} {attempt}", job_id.0));
        let result = JobResult {
            request_id,
            job_id,
            attempt,
            ok,
            retry,
            payload: payload.clone(),
        };
        let in_force = self.oracle.in_force(job_id);
        let accepted = self.drive(|router, io| router.result(io, conn, result));
        let now_ms = self.now_ms();
        self.oracle.result(
            conn,
            job_id,
            attempt,
            in_force,
            accepted.then_some(payload),
            now_ms,
        );
        if !accepted {
            self.stats.fenced_results += 1;
        }
        format!(
            "result job {} attempt {attempt} ok {ok} retry {retry}: accepted {accepted}",
            job_id.0
        )
    }

    pub(super) fn job_ack(&mut self) -> String {
        let Some(index) = self.pick(Role::Submitter, |c| !c.ends_to_ack.is_empty()) else {
            return "job ack: nothing to acknowledge".into();
        };
        self.ack_end(index)
    }

    /// The submitter `index` acknowledges the oldest end it handled.
    pub(super) fn ack_end(&mut self, index: usize) -> String {
        if self.clients[index].ends_to_ack.is_empty() {
            return "job ack: nothing to acknowledge".into();
        }
        let (job_id, attempt, state) = self.clients[index].ends_to_ack.remove(0);
        let agent = self.clients[index].agent.clone();
        let end = AckedEnd::Of { attempt, state };
        self.drive(|router, io| router.job_ack(io, &agent, job_id, end));
        if state != JobState::DeadLettered {
            self.oracle
                .jobs
                .entry(job_id)
                .or_default()
                .acked_by_submitter = true;
        }
        format!("{agent} acknowledges job {} ({state:?})", job_id.0)
    }

    pub(super) fn cancel(&mut self) -> String {
        let Some(index) = self.pick(Role::Submitter, |c| !c.jobs.is_empty()) else {
            return "cancel: no job".into();
        };
        let at = self.rng.index(self.clients[index].jobs.len()).unwrap_or(0);
        let client = &mut self.clients[index];
        let job_id = client.jobs[at];
        let request_id = client.request_id();
        let (conn, agent) = (client.conn.unwrap_or(ConnId(0)), client.agent.clone());
        self.drive(|router, io| router.cancel(io, conn, &agent, request_id, job_id));
        format!("{agent} cancels job {}", job_id.0)
    }

    /// A controller lists the dead letters and re-drives one.
    pub(super) fn redrive(&mut self) -> String {
        let Some(index) = self.pick(Role::Controller, |_| true) else {
            return "redrive: no controller connected".into();
        };
        let dead = self.router.jobs.dead_letters(JOB_SWARM, JobId(0), 16).jobs;
        let Some(at) = self.rng.index(dead.len()) else {
            return "redrive: no dead letter".into();
        };
        let job_id = dead[at].job_id;
        let client = &mut self.clients[index];
        let request_id = client.request_id();
        let conn = client.conn.unwrap_or(ConnId(0));
        self.drive(|router, io| router.redrive(io, conn, JOB_SWARM, request_id, job_id));
        format!("redrive job {}", job_id.0)
    }
}

fn decision_name(decision: &LeaseDecision) -> String {
    match decision {
        LeaseDecision::Granted(g) => format!(
            "token {} until {} (new {}, logged {})",
            g.grant.token, g.grant.expires_at_ms, g.new_token, g.must_log
        ),
        LeaseDecision::Released { token } => format!("released {token}"),
        LeaseDecision::Refused(refused) => format!("refused {refused:?}"),
    }
}

/// A short name of a message the agent only notes.
fn message_name(message: &Message) -> &'static str {
    match message {
        Message::SubscribeAck { .. } => "subscribed",
        Message::EpochChanged { .. } => "epoch changed",
        Message::JobUpdate(_) => "job update",
        Message::JobStatus(_) => "job status",
        Message::JobCancel { .. } => "job cancel",
        _ => "other",
    }
}
