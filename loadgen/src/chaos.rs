//! The `chaos` scenario: the router's guarantees through a faulty network.
//!
//! Every session connects through a fault proxy of its own (`swarmbus-chaos`), seeded from
//! `--seed`, that drops, duplicates and reorders datagrams and, with `--partitions`, cuts
//! that session's network (one way or both) at random for `--partition-length` every
//! `--partition-gap`. Through it run:
//!
//! - `--contenders` controllers contending for the swarm's `leader` lease and publishing
//!   commands stamped with their fencing token while they hold it (the `leader`
//!   scenario's contenders, paused and closed at random as there);
//! - `--agents` agents subscribed to those commands, applying them with the client's
//!   `IdempotentApply` and `FencingFilter` (their state kept across restarts, as a file
//!   store would) and resuming from it after every reconnect;
//! - `--workers` job workers and one submitter: a job every `--job-every`, resubmitted
//!   under the same idempotency key when the answer is lost; ends deduplicated with
//!   `JobDedup` and acknowledged.
//!
//! With `--kill-agents`, agents and workers are killed at random (about one kill per
//! `--kill-every` each): their proxy vanishes mid-flight, so the router hears nothing more
//! (no close), and they restart after 0.2 to 1 s on a new one.
//!
//! After `--duration` the partitions and kills stop (loss, duplication and reordering go
//! on) and the run drains: until every acknowledged command reached every agent, every
//! accepted job ended and the swarm's presence (queried directly, not through a proxy)
//! lists exactly the sessions still running, or `--drain` passes. The checks use only what
//! each side observed on the wire (see [`Verdict`]); any violation exits 1.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use swarmbus_chaos::{FaultPlan, FaultProxy, RandomPartitions};
use swarmbus_client::{
    Client, ClientError, Connector, FencingFilter, IdempotentApply, JobDedup, JobEvent, Session,
};
use swarmbus_schema::{Class, Epoch, JobId, JobState, JobUpdate, OpId, Role, SubmitJob};

use crate::leader::{self, ContenderLog, ObserverLog};
use crate::rng::Rng;
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Seed of every fault and every draw of the run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected, e.g. 60s (then the run drains).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Chance that a datagram is dropped, each way.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Chance that a datagram is sent twice, each way.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Chance that a datagram is held back (by up to --reorder-by) so later ones overtake it.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// The longest a reordered datagram is held back.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    reorder_by: Duration,
    /// Added to every datagram, each way (default none).
    #[arg(long, value_parser = parse_duration)]
    latency: Option<Duration>,
    /// Partition each session's network at random (one way or both, each way alike).
    #[arg(long)]
    partitions: bool,
    /// How long a partition lasts: a range, e.g. 1s-5s.
    #[arg(long, default_value = "1s-5s", value_parser = parse_range)]
    partition_length: (Duration, Duration),
    /// The time between one session's partitions: a range.
    #[arg(long, default_value = "3s-10s", value_parser = parse_range)]
    partition_gap: (Duration, Duration),
    /// Kill agents and workers at random, without a goodbye, and restart them.
    #[arg(long)]
    kill_agents: bool,
    /// The mean time between two kills of one agent or worker.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_every: Duration,
    /// Agents applying the commands.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Controllers contending for the lease and commanding while they hold it.
    #[arg(long, default_value_t = 3)]
    contenders: usize,
    /// Job workers (one submitter feeds them).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// The lease's TTL; holders renew every third of it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ttl: Duration,
    /// How often a holder publishes a stamped command.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    command_every: Duration,
    /// How often the submitter submits a job.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    job_every: Duration,
    /// The spawned router's presence heartbeat interval (an agent is declared gone after 3).
    #[arg(long, default_value_t = 250)]
    heartbeat_ms: u32,
    /// Longest wait, after the faults stop, for the checks to settle.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain: Duration,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// `LOW-HIGH`, two durations.
fn parse_range(text: &str) -> Result<(Duration, Duration), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected a range such as 1s-5s"))?;
    let (low, high) = (parse_duration(low)?, parse_duration(high)?);
    if low > high {
        return Err(format!("{text:?}: the range is empty"));
    }
    Ok((low, high))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The faults of every proxy of the run, the discarded ones included.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    partitions: u64,
}

impl Faults {
    fn add(&mut self, proxy: &FaultProxy) {
        let totals = proxy.totals();
        let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
        self.dropped += count(&totals.dropped);
        self.duplicated += count(&totals.duplicated);
        self.reordered += count(&totals.reordered);
        self.partitions += count(&totals.partitions);
    }
}

/// The run's network: it hands out a proxy per session incarnation.
struct Net {
    router: SocketAddr,
    connector: Connector,
    seed: u64,
    faults: FaultPlan,
    partitions: Option<RandomPartitions>,
    /// Set when the faulty phase ends (under `live`'s lock): no partition from then on.
    calm: AtomicBool,
    live: Mutex<Vec<Arc<FaultProxy>>>,
    retired: Mutex<Faults>,
}

/// Who a proxy serves: its faults are drawn from the run's seed and this, so that a seed
/// gives each session the same faults whatever order the sessions start in.
#[derive(Clone, Copy)]
struct Who {
    role: u64,
    index: usize,
    incarnation: u64,
}

impl Who {
    const AGENT: u64 = 1;
    const WORKER: u64 = 2;
    const SUBMITTER: u64 = 3;
    const CONTENDER: u64 = 4;

    fn new(role: u64, index: usize) -> Self {
        Who {
            role,
            index,
            incarnation: 0,
        }
    }

    /// This session's seed of `stream` (each of its draws its own stream).
    fn seed(&self, run_seed: u64, stream: u64) -> u64 {
        let mut rng = Rng::new(run_seed);
        for part in [self.role, self.index as u64, self.incarnation, stream] {
            rng = Rng::new(rng.next() ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        rng.next()
    }
}

/// The draws of a session, each from its own stream.
const PROXY_STREAM: u64 = 1;
const KILL_STREAM: u64 = 2;
const WORK_STREAM: u64 = 3;

impl Net {
    /// A new proxy in front of the router for `who`, partitioning at random unless calm.
    async fn proxy(&self, who: Who) -> anyhow::Result<Arc<FaultProxy>> {
        let seed = who.seed(self.seed, PROXY_STREAM);
        let proxy = Arc::new(
            FaultProxy::start(self.router, seed, self.faults.clone(), self.faults.clone())
                .await
                .context("starting a fault proxy")?,
        );
        // Under the lock `calm_down` takes: a proxy made while the run calms down is either
        // calmed by it or sees that it is calm.
        let mut live = lock(&self.live);
        if let Some(plan) = &self.partitions {
            if !self.calm.load(Ordering::Acquire) {
                proxy.partition_at_random(plan.clone());
            }
        }
        live.push(proxy.clone());
        Ok(proxy)
    }

    /// Takes `proxy` out of the run (its session is killed): its counts are kept.
    fn retire(&self, proxy: &Arc<FaultProxy>) {
        lock(&self.live).retain(|p| !Arc::ptr_eq(p, proxy));
        lock(&self.retired).add(proxy);
    }

    /// Ends the partitions, now and for proxies made later.
    fn calm_down(&self) {
        let live = lock(&self.live);
        self.calm.store(true, Ordering::Release);
        for proxy in live.iter() {
            proxy.stop_partitions();
        }
    }

    /// The faults of every proxy; the proxies still running stop.
    fn close(&self) -> Faults {
        let faults = self.faults();
        lock(&self.live).clear();
        faults
    }

    fn faults(&self) -> Faults {
        let mut faults = *lock(&self.retired);
        for proxy in lock(&self.live).iter() {
            faults.add(proxy);
        }
        faults
    }

    /// A session that goes through the proxy only: no bulk connection of its own.
    fn session(agent: &str, role: Role, swarm: &str) -> Session {
        let mut session = Session::new(agent, role, [swarm]);
        session.bulk_connection = false;
        session
    }
}

/// The run's phases, as every task sees them.
#[derive(Default)]
struct Phase {
    /// The faulty phase is over: no more kills or submits.
    calm: AtomicBool,
    /// The run is over: tasks end.
    done: AtomicBool,
}

/// What ended one incarnation of an agent or a worker, besides its session ending.
enum Ended {
    Killed,
    Done,
}

/// Waits for the incarnation's kill (at `kill_at`; once the run is calm it never comes) or
/// the run's end: the branch an incarnation's loop selects beside its own events.
async fn killed_or_done(kill_at: &mut Option<Instant>, phase: &Phase) -> Ended {
    loop {
        let kill = async {
            match *kill_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = kill => {
                if !phase.calm.load(Ordering::Relaxed) {
                    return Ended::Killed;
                }
                *kill_at = None;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if phase.done.load(Ordering::Relaxed) {
                    return Ended::Done;
                }
            }
        }
    }
}

/// Ends an incarnation whose session was killed or lost: its network vanishes first, then
/// the session (whose drop sends a close, which so goes nowhere: a killed one says no
/// goodbye), and it stays down for 0.2 to 1 s.
async fn go_down<S>(net: &Net, proxy: Arc<FaultProxy>, session: S, rng: &mut Rng) {
    net.retire(&proxy);
    drop(proxy);
    // The proxy's tasks end at their next poll, after the abort its drop asked for.
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(session);
    tokio::time::sleep(Duration::from_millis(rng.between(200, 1_000))).await;
}

/// When the next kill of one agent or worker comes (uniform around the mean), or never.
fn next_kill(rng: &mut Rng, args: &Kills) -> Option<Instant> {
    let mean = args.every?.as_millis() as u64;
    Some(Instant::now() + Duration::from_millis(rng.between(mean / 2, mean * 3 / 2)))
}

#[derive(Clone, Copy)]
struct Kills {
    every: Option<Duration>,
}

/// What one agent observed over all its incarnations.
#[derive(Debug, Default)]
struct AgentLog {
    observer: ObserverLog,
    /// Command op ids in the order they arrived, redeliveries included.
    arrived: Vec<u64>,
    /// Op ids in the order the application applied them.
    applied: Vec<u64>,
    kills: u64,
}

// One agent's life: connect (resuming), apply, be killed, restart; long because the
// select over deliveries, the kill timer and the phases is one loop.
async fn agent(
    index: usize,
    net: Arc<Net>,
    swarm: String,
    phase: Arc<Phase>,
    kills: Kills,
    log: Arc<Mutex<AgentLog>>,
) {
    let name = format!("{swarm}-agent-{index}");
    let mut who = Who::new(Who::AGENT, index);
    let mut rng = Rng::new(who.seed(net.seed, KILL_STREAM));
    // Every command from the first, even those published before this agent first got
    // through: a resume point of no epoch (epochs are never 0) makes the router answer
    // EpochChanged and replay from op 1. Without one a subscription starts with the next op.
    // Kept across restarts, as its `FileOffsetStore` would keep it.
    let mut applied =
        IdempotentApply::restore([(swarm.clone(), Class::Command, Epoch(0), OpId(0))]);
    // The newest fencing token seen, kept across restarts with the offsets: a restarted
    // agent's fresh filter must not admit a stale command sequenced after its resume point.
    let mut newest_token = 0;
    let mut batch = Vec::with_capacity(256);
    while !phase.done.load(Ordering::Relaxed) {
        who.incarnation += 1;
        let Ok(proxy) = net.proxy(who).await else {
            return;
        };
        let mut filter = FencingFilter::new();
        filter.admit_token(&swarm, leader::LEASE, newest_token);
        let session = Net::session(&name, Role::Agent, &swarm).resume_from(&applied);
        let Some((client, mut deliveries)) = connect(&net, proxy.addr(), session, &phase).await
        else {
            net.retire(&proxy);
            continue;
        };
        if client
            .subscribe(&swarm, Class::Command, None)
            .await
            .is_err()
        {
            go_down(&net, proxy, (client, deliveries), &mut rng).await;
            continue;
        }
        let mut kill_at = next_kill(&mut rng, &kills);
        loop {
            tokio::select! {
                got = deliveries.recv_many(&mut batch, 256) => {
                    if got == 0 {
                        break; // the session ended: connect again
                    }
                    {
                        let mut log = lock(&log);
                        for delivery in batch.drain(..) {
                            if delivery.class == Class::Command {
                                log.arrived.push(delivery.op_id.0);
                            }
                            if log.observer.take(&mut applied, &mut filter, &delivery) {
                                log.applied.push(delivery.op_id.0);
                            }
                        }
                    }
                    newest_token = filter.newest(&swarm, leader::LEASE);
                    let last = applied.last_applied_of(&swarm, Class::Command);
                    let _ = client.ack(&swarm, Class::Command, last).await;
                }
                ended = killed_or_done(&mut kill_at, &phase) => match ended {
                    Ended::Killed => {
                        lock(&log).kills += 1;
                        break;
                    }
                    Ended::Done => {
                        client.close();
                        net.retire(&proxy);
                        return;
                    }
                },
            }
        }
        go_down(&net, proxy, (client, deliveries), &mut rng).await;
    }
}

/// Connects `session` to `router` (a proxy), retrying while the run lasts; `None` once
/// it is over or after a few failures (the caller makes a new proxy).
async fn connect(
    net: &Net,
    router: SocketAddr,
    session: Session,
    phase: &Phase,
) -> Option<(Client, swarmbus_client::Deliveries)> {
    for _ in 0..3 {
        if phase.done.load(Ordering::Relaxed) {
            return None;
        }
        match net.connector.connect(router, session.clone()).await {
            Ok(connected) => return Some(connected),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

#[derive(Debug, Default)]
struct WorkerLog {
    /// The agent id of its current incarnation (each has its own, as a new worker process
    /// would: a killed one's session must leave presence by itself).
    name: String,
    leases: u64,
    kills: u64,
}

/// What the workers' `finish_job` calls were told, all workers together.
#[derive(Debug, Default)]
struct Finishes {
    /// Results the router accepted, per job.
    accepted: HashMap<JobId, u32>,
}

// One worker's life, as an agent's: connect, take leases and finish them, be killed.
async fn worker(
    index: usize,
    net: Arc<Net>,
    swarm: String,
    phase: Arc<Phase>,
    kills: Kills,
    (log, finishes): (Arc<Mutex<WorkerLog>>, Arc<Mutex<Finishes>>),
) {
    let mut who = Who::new(Who::WORKER, index);
    let mut rng = Rng::new(who.seed(net.seed, KILL_STREAM));
    let mut work = Rng::new(who.seed(net.seed, WORK_STREAM));
    while !phase.done.load(Ordering::Relaxed) {
        who.incarnation += 1;
        let name = format!("{swarm}-worker-{index}-{}", who.incarnation);
        lock(&log).name = name.clone();
        let Ok(proxy) = net.proxy(who).await else {
            return;
        };
        let session = Net::session(&name, Role::Worker, &swarm);
        let Some((client, deliveries)) = connect(&net, proxy.addr(), session, &phase).await else {
            net.retire(&proxy);
            continue;
        };
        // A worker session always has its job events (the role asks for them).
        let Some(mut events) = client.job_events() else {
            return;
        };
        if client.set_job_credits(4).await.is_err() {
            go_down(&net, proxy, (client, deliveries), &mut rng).await;
            continue;
        }
        let mut kill_at = next_kill(&mut rng, &kills);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    None => break,
                    Some(JobEvent::Lease(lease)) => {
                        lock(&log).leases += 1;
                        let ms = work.between(0, 20);
                        tokio::spawn(run_job(client.clone(), lease, ms, finishes.clone()));
                    }
                    Some(_) => {}
                },
                ended = killed_or_done(&mut kill_at, &phase) => match ended {
                    Ended::Killed => {
                        lock(&log).kills += 1;
                        break;
                    }
                    Ended::Done => {
                        client.close();
                        net.retire(&proxy);
                        return;
                    }
                },
            }
        }
        go_down(&net, proxy, (client, deliveries, events), &mut rng).await;
    }
}

/// Runs one attempt for `ms` and reports its result, which names the job; a refused
/// (fenced) one runs again elsewhere.
async fn run_job(
    client: Client,
    lease: swarmbus_schema::JobLease,
    ms: u64,
    finishes: Arc<Mutex<Finishes>>,
) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let result = Bytes::from(format!("done {}", lease.job_id.0));
    let finished = client
        .finish_job(lease.job_id, lease.attempt, true, false, result)
        .await;
    if matches!(finished, Ok(status) if status.state == JobState::Completed && !status.duplicate) {
        *lock(&finishes).accepted.entry(lease.job_id).or_insert(0) += 1;
    }
}

#[derive(Debug, Default)]
struct SubmitterLog {
    /// Jobs the router accepted (a status came back), and the key of each.
    accepted: HashMap<JobId, String>,
    /// The key being submitted, until a status comes back for it.
    pending: Option<String>,
    /// Every distinct (attempt, state) of the ends that arrived, per job, before `JobDedup`.
    ends: HashMap<JobId, HashSet<(u32, JobState)>>,
    /// Ends let through by the submitter's `JobDedup`, per job.
    results: HashMap<JobId, u32>,
    /// Completed ends whose result is not the one its worker reported.
    wrong_results: u64,
    resubmits: u64,
    dead_lettered: u64,
}

impl SubmitterLog {
    /// Takes one update; whether it is an end to acknowledge.
    fn take(&mut self, update: &JobUpdate, dedup: &mut JobDedup) -> bool {
        if !update.state.is_final() {
            return false;
        }
        let end = (update.attempt, update.state);
        self.ends.entry(update.job_id).or_default().insert(end);
        if !dedup.first_time(update) {
            return false;
        }
        *self.results.entry(update.job_id).or_insert(0) += 1;
        match update.state {
            JobState::DeadLettered => self.dead_lettered += 1,
            JobState::Completed if update.payload != format!("done {}", update.job_id.0) => {
                self.wrong_results += 1
            }
            _ => {}
        }
        true
    }
}

// The submitter: a job every `every` while the faults last, resubmitted under its key
// until a status comes back; every end deduplicated and acknowledged, across reconnects.
// Long because submitting and receiving share one loop over one session.
async fn submitter(
    net: Arc<Net>,
    swarm: String,
    every: Duration,
    phase: Arc<Phase>,
    log: Arc<Mutex<SubmitterLog>>,
) {
    let name = format!("{swarm}-submitter");
    let Ok(proxy) = net.proxy(Who::new(Who::SUBMITTER, 0)).await else {
        return;
    };
    let mut dedup = JobDedup::default();
    let mut next = 0u64;
    let mut next_submit = Instant::now();
    while !phase.done.load(Ordering::Relaxed) {
        let session = Net::session(&name, Role::Agent, &swarm);
        let Some((client, _deliveries)) = connect(&net, proxy.addr(), session, &phase).await else {
            continue;
        };
        // An agent session always has its job updates.
        let Some(mut updates) = client.job_updates() else {
            return;
        };
        loop {
            let pending = {
                let mut log = lock(&log);
                if log.pending.is_none()
                    && !phase.calm.load(Ordering::Relaxed)
                    && Instant::now() >= next_submit
                {
                    log.pending = Some(format!("k{next}"));
                    next += 1;
                    next_submit = Instant::now() + every;
                }
                log.pending.clone()
            };
            if let Some(key) = pending {
                let job = SubmitJob {
                    swarm: swarm.clone(),
                    idempotency_key: key.clone(),
                    payload: Bytes::from_static(b"chaos"),
                    ..SubmitJob::default()
                };
                match client.submit_job(job).await {
                    Ok(status) => {
                        let mut log = lock(&log);
                        log.accepted.insert(status.job_id, key);
                        log.pending = None;
                    }
                    Err(error) => {
                        lock(&log).resubmits += 1;
                        if is_refusal(&error) {
                            let wait = u64::from(error.retry_after_ms()).max(10);
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            continue;
                        }
                        break; // connection lost: resubmit the same key on the next one
                    }
                }
            }
            let wait = next_submit.saturating_duration_since(Instant::now());
            tokio::select! {
                update = updates.recv() => {
                    let Some(update) = update else { break };
                    if lock(&log).take(&update, &mut dedup) {
                        let _ = client.ack_job(&update).await;
                    }
                }
                _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {
                    if phase.done.load(Ordering::Relaxed) {
                        client.close();
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_refusal(error: &ClientError) -> bool {
    matches!(error, ClientError::Refused { .. })
}

/// The spawned router's configuration: no bulk listener (every connection through the
/// proxies), heartbeats fast enough that a partition outlives them, and job leases that
/// come back within the drain.
fn router_config(args: &ChaosArgs) -> String {
    format!(
        "bulk_listen = \"off\"\n\
         [presence]\nheartbeat_interval_ms = {}\n\
         [jobs]\nvisibility_timeout_ms = 3000\nbackoff_base_ms = 10\nmax_attempts = 50\n",
        args.heartbeat_ms
    )
}

fn check_args(args: &ChaosArgs) -> anyhow::Result<()> {
    for (flag, p) in [
        ("--loss", args.loss),
        ("--duplicate", args.duplicate),
        ("--reorder", args.reorder),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{flag} must be a probability from 0 to 1, not {p}");
        }
    }
    if args.agents == 0 || args.contenders == 0 || args.workers == 0 {
        bail!("--agents, --contenders and --workers must be at least 1");
    }
    if args.ttl < Duration::from_millis(3) {
        bail!("--ttl must be at least 3ms (holders renew every third of it)");
    }
    if args.heartbeat_ms == 0 || args.kill_every.is_zero() || args.job_every.is_zero() {
        bail!("--heartbeat-ms, --kill-every and --job-every must be more than 0");
    }
    Ok(())
}

/// The checks of the run, from what each side observed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    acked: u64,
    applied: u64,
    /// Acknowledged commands an agent never applied, summed over agents.
    lost: u64,
    /// Applies of an op id the agent had applied before.
    duplicated_applies: u64,
    /// Commands that first arrived after a later one had: `IdempotentApply` drops them as
    /// duplicates, so the application never applies them.
    reordered_applies: u64,
    /// Arrivals of a command that had arrived before (the protocol allows them).
    redeliveries: u64,
    lease_grants: u64,
    lease_overlaps: u64,
    stale_commands_accepted: u64,
    jobs_accepted: u64,
    /// Accepted jobs whose end never reached the submitter, and keys never accepted.
    jobs_lost: u64,
    /// Jobs whose end passed `JobDedup` twice, that ended twice (two distinct ends), or
    /// whose result the router accepted from two attempts.
    job_results_twice: u64,
    /// Ends of jobs never accepted, ends with a result no worker reported, and keys that
    /// became two jobs.
    job_results_wrong: u64,
}

impl Verdict {
    fn violations(&self, ghosts: u64) -> u64 {
        self.lost
            + self.duplicated_applies
            + self.reordered_applies
            + self.lease_overlaps
            + self.stale_commands_accepted
            + self.jobs_lost
            + self.job_results_twice
            + self.job_results_wrong
            + ghosts
    }
}

/// Judges the arrivals and applies of each agent, the leases and stale commands (the
/// `leader` scenario's analysis, over the agents' filters) and the jobs (the submitter's
/// view and the workers' accepted results).
fn judge(
    contenders: &[ContenderLog],
    agents: &[AgentLog],
    jobs: &SubmitterLog,
    finishes: &Finishes,
) -> anyhow::Result<Verdict> {
    let observers: Vec<ObserverLog> = agents
        .iter()
        .map(|a| ObserverLog {
            seen: a.observer.seen.clone(),
            ops: a.observer.ops.clone(),
        })
        .collect();
    let analysis = leader::analyse(contenders, &observers)?;
    let mut verdict = Verdict {
        acked: contenders.iter().map(|c| c.acked.len() as u64).sum(),
        lost: analysis.lost,
        lease_grants: analysis.grants,
        lease_overlaps: analysis.overlapping_holders + analysis.shared_tokens,
        stale_commands_accepted: analysis.stale_commands_accepted,
        jobs_accepted: jobs.accepted.len() as u64,
        ..Verdict::default()
    };
    for agent in agents {
        judge_agent(agent, &mut verdict);
    }
    judge_jobs(jobs, finishes, &mut verdict);
    Ok(verdict)
}

fn judge_agent(agent: &AgentLog, verdict: &mut Verdict) {
    let mut applied = HashSet::new();
    for &op in &agent.applied {
        verdict.applied += 1;
        if !applied.insert(op) {
            verdict.duplicated_applies += 1;
        }
    }
    let (mut arrived, mut highest) = (HashSet::new(), 0);
    for &op in &agent.arrived {
        if !arrived.insert(op) {
            verdict.redeliveries += 1;
        } else if op < highest {
            verdict.reordered_applies += 1;
        }
        highest = highest.max(op);
    }
}

fn judge_jobs(jobs: &SubmitterLog, finishes: &Finishes, verdict: &mut Verdict) {
    let lost = jobs
        .accepted
        .keys()
        .filter(|job| !jobs.results.contains_key(job))
        .count();
    verdict.jobs_lost = lost as u64 + u64::from(jobs.pending.is_some());
    let twice = |job: &JobId| {
        jobs.results.get(job).is_some_and(|&n| n > 1)
            || jobs.ends.get(job).is_some_and(|ends| ends.len() > 1)
            || finishes.accepted.get(job).is_some_and(|&n| n > 1)
    };
    let all: HashSet<&JobId> = jobs
        .results
        .keys()
        .chain(finishes.accepted.keys())
        .collect();
    verdict.job_results_twice = all.iter().filter(|job| twice(job)).count() as u64;
    let unknown = jobs
        .ends
        .keys()
        .filter(|job| !jobs.accepted.contains_key(job))
        .count();
    let keys: HashSet<&String> = jobs.accepted.values().collect();
    let doubled_keys = jobs.accepted.len() - keys.len();
    verdict.job_results_wrong = (unknown + doubled_keys) as u64 + jobs.wrong_results;
}

/// On stderr, for each agent that missed acknowledged commands: the first few missed and
/// what it applied around the first (where to start reading a replay).
fn report_losses(acked: &HashSet<u64>, agents: &[AgentLog]) {
    for (i, agent) in agents.iter().enumerate() {
        let mut missed: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|op| !agent.observer.ops.contains(op))
            .collect();
        if missed.is_empty() {
            continue;
        }
        missed.sort_unstable();
        let first = missed[0];
        let at = agent.applied.partition_point(|&op| op < first);
        let around = &agent.applied[at.saturating_sub(3)..(at + 3).min(agent.applied.len())];
        eprintln!(
            "chaos: agent {i} missed {} acknowledged commands, first {:?}; applied around \
             the first: {around:?} ({} applies, {} kills)",
            missed.len(),
            &missed[..missed.len().min(10)],
            agent.applied.len(),
            agent.kills
        );
    }
}

/// Spawns `count` tasks made by `task` (its index and its log), into `tasks`; their logs.
fn spawn_each<L, F>(
    count: usize,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    task: impl Fn(usize, Arc<Mutex<L>>) -> F,
) -> Vec<Arc<Mutex<L>>>
where
    L: Default,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    (0..count)
        .map(|i| {
            let log = Arc::new(Mutex::new(L::default()));
            tasks.push(tokio::spawn(task(i, log.clone())));
            log
        })
        .collect()
}

/// Presence as the watcher sees it: (listed but not running or listed twice, running
/// but not listed).
async fn presence_gaps(
    watcher: &Client,
    swarm: &str,
    expected: &HashSet<String>,
) -> Option<(u64, u64)> {
    let members = watcher.presence(swarm).await.ok()?;
    let mut listed = HashSet::new();
    let mut ghosts = 0;
    for member in &members {
        if !expected.contains(&member.agent) || !listed.insert(member.agent.clone()) {
            ghosts += 1;
        }
    }
    let missing = expected.iter().filter(|a| !listed.contains(*a)).count() as u64;
    Some((ghosts, missing))
}

// The scenario from set-up to report, in the order it runs (router, network, sessions,
// the faulty phase, the drain, the checks, the JSON): its phases share the run's tasks
// and logs, and read best in sequence.
pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    crate::report::describe("leases granted", "acquire -> grant");
    check_args(&args)?;
    let config = router_config(&args);
    let (routers, ca, spawned) = args.router.resolve_with_config(Some(&config)).await?;
    let router = routers.only(
        "chaos takes one router: its leases, job queue and presence are each router's own, \
         so its checks hold only on one",
    )?;
    let connector = args.router.connector(&ca)?;
    let run_tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 & 0xff_ffff)
        .unwrap_or_default();
    let swarm = format!("chaos-{run_tag:06x}");
    let faults = FaultPlan {
        loss: args.loss,
        duplicate: args.duplicate,
        reorder: args.reorder,
        reorder_by: args.reorder_by,
        latency: args.latency.unwrap_or_default(),
        ..FaultPlan::default()
    };
    let net = Arc::new(Net {
        router,
        connector: connector.clone(),
        seed: args.seed,
        faults,
        partitions: args.partitions.then_some(RandomPartitions {
            gap: args.partition_gap,
            length: args.partition_length,
            one_way: 0.5,
        }),
        calm: AtomicBool::new(false),
        live: Mutex::new(Vec::new()),
        retired: Mutex::new(Faults::default()),
    });
    let phase = Arc::new(Phase::default());
    let kills = Kills {
        every: args.kill_agents.then_some(args.kill_every),
    };
    // The watcher asks the router directly: the truth the proxied sessions are judged by.
    let (watcher, _watcher_deliveries) = connector
        .connect(
            router,
            Net::session(&format!("{swarm}-watcher"), Role::Controller, &swarm),
        )
        .await
        .with_context(|| format!("connecting the watcher to {router}"))?;

    let started = Instant::now();
    let mut tasks = Vec::new();
    let agent_logs = spawn_each(args.agents, &mut tasks, |i, log| {
        agent(i, net.clone(), swarm.clone(), phase.clone(), kills, log)
    });
    let finishes = Arc::new(Mutex::new(Finishes::default()));
    let worker_logs = spawn_each(args.workers, &mut tasks, |w, log| {
        let logs = (log, finishes.clone());
        worker(w, net.clone(), swarm.clone(), phase.clone(), kills, logs)
    });
    let jobs_log = Arc::new(Mutex::new(SubmitterLog::default()));
    tasks.push(tokio::spawn(submitter(
        net.clone(),
        swarm.clone(),
        args.job_every,
        phase.clone(),
        jobs_log.clone(),
    )));
    let mut contender_routers = Vec::new();
    for c in 0..args.contenders {
        contender_routers.push(net.proxy(Who::new(Who::CONTENDER, c)).await?.addr());
    }
    let plan = Arc::new(leader::Plan {
        connector,
        routers: contender_routers,
        swarm: swarm.clone(),
        ttl: args.ttl,
        command_every: args.command_every,
        pause_prob: 0.05,
        kill_prob: if args.kill_agents { 0.05 } else { 0.0 },
        deadline: started + args.duration,
        bulk_connection: false,
    });
    let contenders: Vec<_> = (0..args.contenders)
        .map(|c| {
            let seed = Who::new(Who::CONTENDER, c).seed(args.seed, KILL_STREAM);
            tokio::spawn(leader::contend(c, plan.clone(), Rng::new(seed)))
        })
        .collect();
    if !args.json {
        eprintln!(
            "chaos: seed {} for {:?}: loss {} duplicate {} reorder {}, partitions {}, kills {}",
            args.seed,
            args.duration,
            args.loss,
            args.duplicate,
            args.reorder,
            args.partitions,
            args.kill_agents
        );
    }
    tokio::time::sleep_until((started + args.duration).into()).await;
    phase.calm.store(true, Ordering::Release);
    net.calm_down();
    let calm_at = Instant::now();
    // Contenders stop at the deadline, once their request in flight is answered.
    let mut contender_logs = Vec::new();
    let mut contenders_stuck = 0;
    for task in contenders {
        match tokio::time::timeout_at((calm_at + args.drain).into(), task).await {
            Ok(log) => contender_logs.push(log.context("a contender task")?),
            Err(_) => contenders_stuck += 1,
        }
    }

    let acked: HashSet<u64> = contender_logs
        .iter()
        .flat_map(|log| log.acked.iter().map(|&(op, _)| op))
        .collect();
    let drain = Drain {
        watcher: &watcher,
        swarm: &swarm,
        acked: &acked,
        agents: &agent_logs,
        workers: &worker_logs,
        jobs: &jobs_log,
    };
    let drained = drain.run(calm_at, args.drain).await;
    phase.done.store(true, Ordering::Release);
    let stop_by = tokio::time::Instant::now() + Duration::from_secs(5);
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(stop_by, task).await.is_err() {
            abort.abort();
        }
    }
    watcher.close();
    let faults = net.close();
    drop(spawned);

    let agents: Vec<AgentLog> = agent_logs
        .iter()
        .map(|log| std::mem::take(&mut *lock(log)))
        .collect();
    let jobs = std::mem::take(&mut *lock(&jobs_log));
    let verdict = judge(&contender_logs, &agents, &jobs, &lock(&finishes))?;
    report_losses(&acked, &agents);
    let run = Ran {
        args: &args,
        verdict: &verdict,
        drained: &drained,
        contender_logs: &contender_logs,
        contenders_stuck,
        agents: &agents,
        workers: &worker_logs,
        jobs: &jobs,
        faults,
    };
    let report = run.report();
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        for (key, value) in report.as_object().into_iter().flatten() {
            println!("{key:<24} {value}");
        }
    }
    run.verdict_line()
}

/// What the drain waits for, and where it looks.
struct Drain<'a> {
    watcher: &'a Client,
    swarm: &'a str,
    acked: &'a HashSet<u64>,
    agents: &'a [Arc<Mutex<AgentLog>>],
    workers: &'a [Arc<Mutex<WorkerLog>>],
    jobs: &'a Mutex<SubmitterLog>,
}

/// How the drain ended.
struct Drained {
    /// Everything settled before the drain's time ran out.
    done: bool,
    /// Presence at the last look: (listed but not running, running but not listed).
    presence: (u64, u64),
    /// From the end of the faults to the look since which presence has been exact.
    presence_converged_ms: Option<u64>,
}

impl Drain<'_> {
    /// Until every acknowledged command reached every agent, no submit is pending, every
    /// accepted job ended and presence lists exactly the sessions running, or `limit`
    /// after `calm_at`.
    async fn run(&self, calm_at: Instant, limit: Duration) -> Drained {
        let mut drained = Drained {
            done: false,
            presence: (u64::MAX, u64::MAX),
            presence_converged_ms: None,
        };
        loop {
            if let Some(gaps) = presence_gaps(self.watcher, self.swarm, &self.expected()).await {
                drained.presence = gaps;
                if gaps != (0, 0) {
                    drained.presence_converged_ms = None;
                } else if drained.presence_converged_ms.is_none() {
                    drained.presence_converged_ms = Some(calm_at.elapsed().as_millis() as u64);
                }
            }
            if self.settled() && drained.presence == (0, 0) {
                drained.done = true;
                return drained;
            }
            if calm_at.elapsed() >= limit {
                return drained;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn settled(&self) -> bool {
        let applied_all = self.agents.iter().all(|log| {
            let log = lock(log);
            self.acked.iter().all(|op| log.observer.ops.contains(op))
        });
        let jobs = lock(self.jobs);
        let jobs_ended = jobs
            .accepted
            .keys()
            .all(|job| jobs.results.contains_key(job));
        applied_all && jobs.pending.is_none() && jobs_ended
    }

    /// The sessions running: the agents, the workers' current incarnations, the submitter
    /// and the watcher (the contenders have closed theirs).
    fn expected(&self) -> HashSet<String> {
        let mut expected: HashSet<String> = (0..self.agents.len())
            .map(|i| format!("{}-agent-{i}", self.swarm))
            .chain(self.workers.iter().map(|log| lock(log).name.clone()))
            .collect();
        expected.insert(format!("{}-submitter", self.swarm));
        expected.insert(format!("{}-watcher", self.swarm));
        expected
    }
}

/// A finished run, for its report.
struct Ran<'a> {
    args: &'a ChaosArgs,
    verdict: &'a Verdict,
    drained: &'a Drained,
    contender_logs: &'a [ContenderLog],
    contenders_stuck: u64,
    agents: &'a [AgentLog],
    workers: &'a [Arc<Mutex<WorkerLog>>],
    jobs: &'a SubmitterLog,
    faults: Faults,
}

impl Ran<'_> {
    fn report(&self) -> serde_json::Value {
        let (verdict, faults) = (self.verdict, &self.faults);
        let sum =
            |field: fn(&ContenderLog) -> u64| self.contender_logs.iter().map(field).sum::<u64>();
        let workers = |field: fn(&WorkerLog) -> u64| {
            self.workers.iter().map(|l| field(&lock(l))).sum::<u64>()
        };
        serde_json::json!({
            "scenario": "chaos",
            "seed": self.args.seed,
            "duration_s": self.args.duration.as_secs_f64(),
            "acked": verdict.acked,
            "applied": verdict.applied,
            "lost": verdict.lost,
            "duplicated_applies": verdict.duplicated_applies,
            "reordered_applies": verdict.reordered_applies,
            "redeliveries": verdict.redeliveries,
            "lease_overlaps": verdict.lease_overlaps,
            "stale_commands_accepted": verdict.stale_commands_accepted,
            "stale_refused": sum(|l| l.stale_refused),
            "lease_grants": verdict.lease_grants,
            "contenders_stuck": self.contenders_stuck,
            "ghosts": self.drained.presence.0,
            "presence_missing": self.drained.presence.1,
            "presence_converged_ms": self.drained.presence_converged_ms,
            "jobs_accepted": verdict.jobs_accepted,
            "jobs_lost": verdict.jobs_lost,
            "job_results_twice": verdict.job_results_twice,
            "job_results_wrong": verdict.job_results_wrong,
            "jobs_dead_lettered": self.jobs.dead_lettered,
            "job_resubmits": self.jobs.resubmits,
            "job_leases": workers(|l| l.leases),
            "agent_kills": self.agents.iter().map(|a| a.kills).sum::<u64>(),
            "worker_kills": workers(|l| l.kills),
            "contender_pauses": sum(|l| l.pauses),
            "contender_kills": sum(|l| l.kills),
            "drained": self.drained.done,
            "faults": {
                "dropped": faults.dropped,
                "duplicated": faults.duplicated,
                "reordered": faults.reordered,
                "partitions": faults.partitions,
            },
        })
    }

    /// Ok, or the violations with the seed to replay.
    fn verdict_line(&self) -> anyhow::Result<()> {
        let (v, ghosts) = (self.verdict, self.drained.presence.0);
        let violations = v.violations(ghosts) + self.contenders_stuck;
        if violations == 0 && self.drained.done {
            return Ok(());
        }
        bail!(
            "chaos seed {}: {violations} violations (lost {}, duplicated {}, reordered {}, \
             lease overlaps {}, stale accepted {}, ghosts {ghosts}, jobs lost {}, results \
             twice {}, results wrong {}, contenders stuck {}){}; replay with --seed {}",
            self.args.seed,
            v.lost,
            v.duplicated_applies,
            v.reordered_applies,
            v.lease_overlaps,
            v.stale_commands_accepted,
            v.jobs_lost,
            v.job_results_twice,
            v.job_results_wrong,
            self.contenders_stuck,
            if self.drained.done {
                ""
            } else {
                ", the drain timed out"
            },
            self.args.seed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(arrived: &[u64], applied: &[u64]) -> AgentLog {
        AgentLog {
            arrived: arrived.to_vec(),
            applied: applied.to_vec(),
            ..AgentLog::default()
        }
    }

    fn update(job: u64, attempt: u32, state: JobState, result: &str) -> JobUpdate {
        JobUpdate {
            job_id: JobId(job),
            attempt,
            state,
            payload: Bytes::from(result.to_owned()),
            ..JobUpdate::default()
        }
    }

    #[test]
    fn applies_twice_and_commands_overtaken_are_counted_redeliveries_are_not() {
        // The second agent got 3 before 2 (IdempotentApply then dropped 2) and 3 again.
        let agents = [
            agent(&[1, 2, 3], &[1, 2, 3]),
            agent(&[1, 3, 2, 3], &[1, 3, 3]),
        ];
        let verdict = judge(&[], &agents, &SubmitterLog::default(), &Finishes::default()).unwrap();
        assert_eq!(verdict.applied, 6);
        assert_eq!(verdict.duplicated_applies, 1);
        assert_eq!(verdict.reordered_applies, 1);
        assert_eq!(verdict.redeliveries, 1);
        assert_eq!(verdict.violations(2), 1 + 1 + 2);
        let clean = judge(
            &[],
            &agents[..1],
            &SubmitterLog::default(),
            &Finishes::default(),
        );
        assert_eq!(clean.unwrap().violations(0), 0);
    }

    #[test]
    fn lost_doubled_and_wrong_job_ends_are_counted() {
        let mut jobs = SubmitterLog::default();
        let mut dedup = JobDedup::default();
        for (job, key) in [(1, "k1"), (2, "k2"), (3, "k3"), (4, "k3")] {
            jobs.accepted.insert(JobId(job), key.to_owned());
        }
        jobs.pending = Some("k5".into());
        assert!(jobs.take(&update(1, 1, JobState::Completed, "done 1"), &mut dedup));
        // Job 2 ends twice under two attempts (JobDedup passes one), with a wrong result.
        assert!(jobs.take(&update(2, 1, JobState::Completed, "nonsense"), &mut dedup));
        assert!(!jobs.take(&update(2, 2, JobState::Completed, "done 2"), &mut dedup));
        // An end of a job never accepted.
        assert!(jobs.take(&update(9, 1, JobState::Completed, "done 9"), &mut dedup));
        let finishes = Finishes {
            accepted: [(JobId(1), 1), (JobId(3), 2)].into(),
        };
        let verdict = judge(&[], &[], &jobs, &finishes).unwrap();
        assert_eq!(verdict.jobs_accepted, 4);
        // Jobs 3 and 4 never ended; k5 never got a status.
        assert_eq!(verdict.jobs_lost, 3);
        // Job 2 ended twice; job 3's result was accepted from two attempts.
        assert_eq!(verdict.job_results_twice, 2);
        // Job 2's result, job 9, and k3 made two jobs.
        assert_eq!(verdict.job_results_wrong, 3);
    }

    #[test]
    fn ranges_parse_and_empty_ones_are_refused() {
        assert_eq!(
            parse_range("1s-5s").unwrap(),
            (Duration::from_secs(1), Duration::from_secs(5))
        );
        assert!(parse_range("5s-1s").unwrap_err().contains("empty"));
        assert!(parse_range("5s").is_err());
    }
}
