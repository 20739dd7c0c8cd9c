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
use swarmbus_schema::{Class, Epoch, JobId, OpId, Role, SubmitJob};

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
    #[arg(long, default_value_t = 3)]
    agents: usize,
    #[arg(long, default_value_t = 3)]
    contenders: usize,
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
    /// Set when the faulty phase ends: no partition from then on.
    calm: AtomicBool,
    proxies_made: AtomicU64,
    live: Mutex<Vec<Arc<FaultProxy>>>,
    retired: Mutex<Faults>,
}

impl Net {
    /// A new proxy in front of the router, partitioning at random unless calm.
    async fn proxy(&self) -> anyhow::Result<Arc<FaultProxy>> {
        let n = self.proxies_made.fetch_add(1, Ordering::Relaxed);
        let seed = self.seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let proxy = Arc::new(
            FaultProxy::start(self.router, seed, self.faults.clone(), self.faults.clone())
                .await
                .context("starting a fault proxy")?,
        );
        if let Some(plan) = &self.partitions {
            if !self.calm.load(Ordering::Acquire) {
                proxy.partition_at_random(plan.clone());
            }
        }
        lock(&self.live).push(proxy.clone());
        Ok(proxy)
    }

    /// Takes `proxy` out of the run (its session is killed): its counts are kept.
    fn retire(&self, proxy: &Arc<FaultProxy>) {
        lock(&self.live).retain(|p| !Arc::ptr_eq(p, proxy));
        lock(&self.retired).add(proxy);
    }

    /// Ends the partitions, now and for proxies made later.
    fn calm_down(&self) {
        self.calm.store(true, Ordering::Release);
        for proxy in lock(&self.live).iter() {
            proxy.stop_partitions();
        }
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

/// Ends an incarnation whose session was killed or lost: its network vanishes first (so a
/// killed one says no goodbye), then it stays down for 0.2 to 1 s.
async fn go_down(net: &Net, proxy: Arc<FaultProxy>, rng: &mut Rng) {
    net.retire(&proxy);
    drop(proxy);
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
    let mut rng = Rng::new(net.seed ^ (index as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    // Every command from the first, even those published before this agent first got
    // through: a resume point of no epoch (epochs start at 1) makes the router answer
    // EpochChanged and replay from op 1. Without one a subscription starts with the next op.
    let mut applied =
        IdempotentApply::restore([(swarm.clone(), Class::Command, Epoch(0), OpId(0))]);
    let mut filter = FencingFilter::new();
    let mut batch = Vec::with_capacity(256);
    while !phase.done.load(Ordering::Relaxed) {
        let Ok(proxy) = net.proxy().await else { return };
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
            net.retire(&proxy);
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
                            if log.observer.take(&mut applied, &mut filter, &delivery) {
                                log.applied.push(delivery.op_id.0);
                            }
                        }
                    }
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
                        return;
                    }
                },
            }
        }
        drop((client, deliveries));
        go_down(&net, proxy, &mut rng).await;
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
    leases: u64,
    kills: u64,
}

// One worker's life, as an agent's: connect, take leases and finish them, be killed.
async fn worker(
    index: usize,
    net: Arc<Net>,
    swarm: String,
    phase: Arc<Phase>,
    kills: Kills,
    log: Arc<Mutex<WorkerLog>>,
) {
    let name = format!("{swarm}-worker-{index}");
    let mut rng = Rng::new(net.seed ^ (index as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    while !phase.done.load(Ordering::Relaxed) {
        let Ok(proxy) = net.proxy().await else { return };
        let session = Net::session(&name, Role::Worker, &swarm);
        let Some((client, _deliveries)) = connect(&net, proxy.addr(), session, &phase).await else {
            net.retire(&proxy);
            continue;
        };
        let Some(mut events) = client.job_events() else {
            return;
        };
        if client.set_job_credits(4).await.is_err() {
            net.retire(&proxy);
            continue;
        }
        let mut kill_at = next_kill(&mut rng, &kills);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    None => break,
                    Some(JobEvent::Lease(lease)) => {
                        lock(&log).leases += 1;
                        let client = client.clone();
                        let ms = rng.between(0, 20);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            // The result names its job; a refused (fenced) one runs again.
                            let result = Bytes::from(format!("done {}", lease.job_id.0));
                            let _ = client
                                .finish_job(lease.job_id, lease.attempt, true, false, result)
                                .await;
                        });
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
                        return;
                    }
                },
            }
        }
        drop(client);
        go_down(&net, proxy, &mut rng).await;
    }
}

#[derive(Debug, Default)]
struct SubmitterLog {
    /// Jobs the router accepted (a status came back).
    accepted: HashSet<JobId>,
    /// Final results let through by the submitter's `JobDedup`, per job.
    results: HashMap<JobId, u32>,
    resubmits: u64,
    dead_lettered: u64,
}

// The submitter: a job every `every` while the faults last, resubmitted under its key
// until acknowledged; every end deduplicated and acknowledged, across reconnects.
async fn submitter(
    net: Arc<Net>,
    swarm: String,
    every: Duration,
    phase: Arc<Phase>,
    log: Arc<Mutex<SubmitterLog>>,
) {
    let name = format!("{swarm}-submitter");
    let Ok(proxy) = net.proxy().await else { return };
    let mut dedup = JobDedup::default();
    let mut next = 0u64;
    let mut pending: Option<String> = None;
    let mut next_submit = Instant::now();
    while !phase.done.load(Ordering::Relaxed) {
        let session = Net::session(&name, Role::Agent, &swarm);
        let Some((client, _deliveries)) = connect(&net, proxy.addr(), session, &phase).await else {
            continue;
        };
        let Some(mut updates) = client.job_updates() else {
            return;
        };
        loop {
            if pending.is_none()
                && !phase.calm.load(Ordering::Relaxed)
                && Instant::now() >= next_submit
            {
                pending = Some(format!("k{next}"));
                next += 1;
                next_submit = Instant::now() + every;
            }
            if let Some(key) = pending.clone() {
                let job = SubmitJob {
                    swarm: swarm.clone(),
                    idempotency_key: key,
                    payload: Bytes::from_static(b"chaos"),
                    ..SubmitJob::default()
                };
                match client.submit_job(job).await {
                    Ok(status) => {
                        lock(&log).accepted.insert(status.job_id);
                        pending = None;
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
                    if !update.state.is_final() || !dedup.first_time(&update) {
                        continue;
                    }
                    {
                        let mut log = lock(&log);
                        *log.results.entry(update.job_id).or_insert(0) += 1;
                        if update.state == swarmbus_schema::JobState::DeadLettered {
                            log.dead_lettered += 1;
                        }
                    }
                    let _ = client.ack_job(&update).await;
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
    /// Applies of an op id below one the agent had applied before.
    reordered_applies: u64,
    lease_grants: u64,
    lease_overlaps: u64,
    stale_commands_accepted: u64,
    jobs_accepted: u64,
    jobs_lost: u64,
    job_results_twice: u64,
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
            + ghosts
    }
}

/// Judges the applies of each agent (`applied`: op ids in apply order), the leases and
/// stale commands (the `leader` scenario's analysis) and the jobs.
fn judge(
    contenders: &[ContenderLog],
    agents: &[AgentLog],
    jobs: &SubmitterLog,
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
        let mut seen = HashSet::new();
        let mut highest = 0;
        for &op in &agent.applied {
            verdict.applied += 1;
            if !seen.insert(op) {
                verdict.duplicated_applies += 1;
            } else if op < highest {
                verdict.reordered_applies += 1;
            }
            highest = highest.max(op);
        }
    }
    verdict.jobs_lost = jobs
        .accepted
        .iter()
        .filter(|job| !jobs.results.contains_key(job))
        .count() as u64;
    verdict.job_results_twice = jobs.results.values().filter(|&&n| n > 1).count() as u64;
    Ok(verdict)
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
    let (router, ca, spawned) = args.router.resolve_with_config(Some(&config)).await?;
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
        proxies_made: AtomicU64::new(0),
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
    let worker_logs = spawn_each(args.workers, &mut tasks, |w, log| {
        worker(w, net.clone(), swarm.clone(), phase.clone(), kills, log)
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
    for _ in 0..args.contenders {
        contender_routers.push(net.proxy().await?);
    }
    let plan = Arc::new(leader::Plan {
        connector,
        routers: contender_routers.iter().map(|p| p.addr()).collect(),
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
            let seed = args.seed ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
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
    let mut contender_logs = Vec::new();
    for task in contenders {
        contender_logs.push(task.await.context("a contender task")?);
    }
    tokio::time::sleep_until((started + args.duration).into()).await;
    phase.calm.store(true, Ordering::Release);
    net.calm_down();
    let calm_at = Instant::now();

    // The drain: every acked command applied everywhere, every job ended, presence exact.
    let acked: HashSet<u64> = contender_logs
        .iter()
        .flat_map(|log| log.acked.iter().map(|&(op, _)| op))
        .collect();
    let mut expected: HashSet<String> = (0..args.agents)
        .map(|i| format!("{swarm}-agent-{i}"))
        .chain((0..args.workers).map(|w| format!("{swarm}-worker-{w}")))
        .collect();
    expected.insert(format!("{swarm}-submitter"));
    expected.insert(format!("{swarm}-watcher"));
    let mut presence = (u64::MAX, u64::MAX);
    let mut presence_converged_ms = None;
    let drained = loop {
        let applied_all = agent_logs
            .iter()
            .all(|log| acked.iter().all(|op| lock(log).observer.ops.contains(op)));
        let jobs_ended = {
            let jobs = lock(&jobs_log);
            jobs.accepted
                .iter()
                .all(|job| jobs.results.contains_key(job))
        };
        if let Some(gaps) = presence_gaps(&watcher, &swarm, &expected).await {
            presence = gaps;
            if gaps == (0, 0) && presence_converged_ms.is_none() {
                presence_converged_ms = Some(calm_at.elapsed().as_millis() as u64);
            } else if gaps != (0, 0) {
                presence_converged_ms = None;
            }
        }
        if applied_all && jobs_ended && presence == (0, 0) {
            break true;
        }
        if calm_at.elapsed() >= args.drain {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    phase.done.store(true, Ordering::Release);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    watcher.close();
    drop(contender_routers);
    let faults = net.faults();
    drop(spawned);

    let agents: Vec<AgentLog> = agent_logs
        .iter()
        .map(|log| std::mem::take(&mut *lock(log)))
        .collect();
    let jobs = std::mem::take(&mut *lock(&jobs_log));
    let verdict = judge(&contender_logs, &agents, &jobs)?;
    report_losses(&acked, &agents);
    let (ghosts, presence_missing) = presence;
    let sum = |field: fn(&ContenderLog) -> u64| contender_logs.iter().map(field).sum::<u64>();
    let report = serde_json::json!({
        "scenario": "chaos",
        "seed": args.seed,
        "duration_s": args.duration.as_secs_f64(),
        "acked": verdict.acked,
        "applied": verdict.applied,
        "lost": verdict.lost,
        "duplicated_applies": verdict.duplicated_applies,
        "reordered_applies": verdict.reordered_applies,
        "lease_overlaps": verdict.lease_overlaps,
        "stale_commands_accepted": verdict.stale_commands_accepted,
        "stale_refused": sum(|l| l.stale_refused),
        "lease_grants": verdict.lease_grants,
        "ghosts": ghosts,
        "presence_missing": presence_missing,
        "presence_converged_ms": presence_converged_ms,
        "jobs_accepted": verdict.jobs_accepted,
        "jobs_lost": verdict.jobs_lost,
        "job_results_twice": verdict.job_results_twice,
        "jobs_dead_lettered": jobs.dead_lettered,
        "job_resubmits": jobs.resubmits,
        "job_leases": worker_logs.iter().map(|l| lock(l).leases).sum::<u64>(),
        "agent_kills": agents.iter().map(|a| a.kills).sum::<u64>(),
        "worker_kills": worker_logs.iter().map(|l| lock(l).kills).sum::<u64>(),
        "contender_pauses": sum(|l| l.pauses),
        "contender_kills": sum(|l| l.kills),
        "drained": drained,
        "faults": {
            "dropped": faults.dropped,
            "duplicated": faults.duplicated,
            "reordered": faults.reordered,
            "partitions": faults.partitions,
        },
    });
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        for (key, value) in report.as_object().into_iter().flatten() {
            println!("{key:<24} {value}");
        }
    }
    let violations = verdict.violations(ghosts);
    if violations > 0 || !drained {
        bail!(
            "chaos seed {}: {violations} violations (lost {}, duplicated {}, reordered {}, \
             lease overlaps {}, stale accepted {}, ghosts {ghosts}, jobs lost {}, results \
             twice {}){}; replay with --seed {}",
            args.seed,
            verdict.lost,
            verdict.duplicated_applies,
            verdict.reordered_applies,
            verdict.lease_overlaps,
            verdict.stale_commands_accepted,
            verdict.jobs_lost,
            verdict.job_results_twice,
            if drained { "" } else { ", the drain timed out" },
            args.seed,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_applying(ops: &[u64]) -> AgentLog {
        AgentLog {
            applied: ops.to_vec(),
            ..AgentLog::default()
        }
    }

    #[test]
    fn duplicated_and_reordered_applies_and_lost_jobs_are_counted() {
        let jobs = SubmitterLog {
            accepted: [JobId(1), JobId(2), JobId(3)].into(),
            results: [(JobId(1), 1), (JobId(2), 2)].into(),
            ..SubmitterLog::default()
        };
        let verdict = judge(
            &[],
            &[agent_applying(&[1, 2, 3]), agent_applying(&[1, 3, 2, 3])],
            &jobs,
        )
        .unwrap();
        assert_eq!(verdict.applied, 7);
        assert_eq!(verdict.duplicated_applies, 1);
        assert_eq!(verdict.reordered_applies, 1);
        assert_eq!((verdict.jobs_accepted, verdict.jobs_lost), (3, 1));
        assert_eq!(verdict.job_results_twice, 1);
        assert_eq!(verdict.violations(2), 1 + 1 + 1 + 1 + 2);
        let clean = judge(&[], &[agent_applying(&[1, 2, 3])], &SubmitterLog::default()).unwrap();
        assert_eq!(clean.violations(0), 0);
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
