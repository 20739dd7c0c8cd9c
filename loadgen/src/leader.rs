//! The `leader` scenario: one leader at a time, and a stale leader cannot act.
//!
//! `--contenders` sessions (role controller) contend for the `leader` lease of one swarm
//! with `--ttl`. A holder renews every third of the TTL and, while it believes it holds the
//! lease (less than a TTL since it sent its last successful acquire or renewal, by its own
//! clock), publishes a command stamped with its fencing token every `--command-every`. At
//! each renewal tick it is paused with probability `--pause-prob` (it stops renewing and
//! acting for 1.2 to 2 TTLs, then wakes up and, unaware, publishes one command with its old
//! token before it tries to renew), or killed with probability `--kill-prob` (its connection
//! is closed; after 0 to 2 TTLs it connects again as a new session under the same agent id
//! and contends again). Contenders that do not hold the lease retry their acquire when the
//! router says the holder's time runs out.
//!
//! `--observers` agents subscribe to the swarm's commands and pass every delivery through
//! the client's `FencingFilter`, as an application acting on commands would.
//!
//! With several routers (`--router A,B,C`) the observers spread over them in turn, while
//! every contender connects to the first: a lease is each router's own, so contenders on
//! two routers could both hold it.
//!
//! Every figure comes from the wire: each contender logs the (token, granted_at_ms,
//! expires_at_ms) of every grant and renewal it received (router clock), the op id and
//! token of every command the router acknowledged, and every refusal; each observer logs
//! every delivery (op id, token, admitted or not) in arrival order. The checks (see
//! [`analyse`]) run on those logs after the run.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use swarmbus_client::{
    Client, ClientError, Connector, Deliveries, FencingFilter, IdempotentApply, PublishOptions,
    Session,
};
use swarmbus_schema::{Class, LeaseGrant, Role};

use crate::rng::Rng;
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

/// The lease contended for.
pub(crate) const LEASE: &str = "leader";

/// Error codes the scenario expects (see docs/protocol.md's error table).
const LEASE_HELD: u64 = 27;
const LEASE_LOST: u64 = 28;
const STALE_FENCING_TOKEN: u64 = 29;

/// Error messages kept for the report, at most.
const ERRORS_KEPT: usize = 8;

#[derive(Debug, clap::Args)]
pub struct LeaderArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Sessions (role controller) contending for the swarm's `leader` lease, all on the
    /// first router given.
    #[arg(long, default_value_t = 3)]
    contenders: usize,
    /// How long they contend, e.g. 60s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Chance per renewal tick that the holder is paused: it stops renewing for 1.2 to 2
    /// TTLs, then wakes up and publishes one command with its old token before it tries to
    /// renew.
    #[arg(long, default_value_t = 0.1)]
    pause_prob: f64,
    /// Chance per renewal tick that the holder is killed: its connection is closed and it
    /// reconnects as a new session (same agent id) after 0 to 2 TTLs (default: half of
    /// --pause-prob).
    #[arg(long)]
    kill_prob: Option<f64>,
    /// The lease's TTL; the holder renews every third of it.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    ttl: Duration,
    /// How often a holder publishes a stamped command while it believes it holds the lease.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    command_every: Duration,
    /// Agents subscribed to the swarm's commands, each passing them through a
    /// FencingFilter; spread over the routers in turn.
    #[arg(long, default_value_t = 2)]
    observers: usize,
    /// Longest wait, after the run, for every acknowledged command to reach every observer.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain: Duration,
    /// Seed of the pause and kill draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// What every contender shares.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) connector: Connector,
    /// Where contender `i` connects: `routers[i % len]` (the chaos scenario gives each its
    /// own fault proxy).
    pub(crate) routers: Vec<SocketAddr>,
    pub(crate) swarm: String,
    pub(crate) ttl: Duration,
    pub(crate) command_every: Duration,
    pub(crate) pause_prob: f64,
    pub(crate) kill_prob: f64,
    pub(crate) deadline: Instant,
    /// Whether sessions may open a bulk connection (the chaos scenario's go through their
    /// proxy only).
    pub(crate) bulk_connection: bool,
}

/// A validity interval by the router's clock: `[granted_at_ms, expires_at_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Interval {
    granted_at_ms: u64,
    expires_at_ms: u64,
}

/// What one contender observed, over all its sessions.
#[derive(Debug, Default)]
pub(crate) struct ContenderLog {
    /// Per token: the interval it believed it held (from its grants; renewals move the
    /// expiry).
    beliefs: BTreeMap<u64, Interval>,
    /// Acknowledged stamped commands: (op id, token).
    pub(crate) acked: Vec<(u64, u64)>,
    /// Acquires granted with a token this contender held already (the holder asking
    /// again, e.g. after reconnecting within the TTL).
    same_token_regrants: u64,
    acquire_refused: u64,
    renewals: u64,
    lease_lost: u64,
    pub(crate) stale_refused: u64,
    late_commands: u64,
    late_commands_accepted: u64,
    pub(crate) pauses: u64,
    pub(crate) kills: u64,
    errors: u64,
    error_messages: Vec<String>,
}

impl ContenderLog {
    /// Records a grant or renewal; whether its token was new to this contender.
    fn believe(&mut self, grant: &LeaseGrant) -> bool {
        let fresh = !self.beliefs.contains_key(&grant.token);
        let interval = self.beliefs.entry(grant.token).or_insert(Interval {
            granted_at_ms: grant.granted_at_ms,
            expires_at_ms: grant.expires_at_ms,
        });
        interval.granted_at_ms = interval.granted_at_ms.min(grant.granted_at_ms);
        interval.expires_at_ms = interval.expires_at_ms.max(grant.expires_at_ms);
        fresh
    }

    fn error(&mut self, during: &str, error: &ClientError) {
        self.errors += 1;
        if self.error_messages.len() < ERRORS_KEPT {
            self.error_messages.push(format!("{during}: {error}"));
        }
    }
}

/// One delivery as an observer saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    op: u64,
    token: u64,
    admitted: bool,
}

/// What one observer received, in arrival order (after dropping redeliveries).
#[derive(Debug, Default)]
pub(crate) struct ObserverLog {
    pub(crate) seen: Vec<Seen>,
    pub(crate) ops: HashSet<u64>,
}

impl ObserverLog {
    /// Takes one delivery as an application would: a command not seen before (by
    /// `applied`) is logged with whether `filter` admits it. Whether it was new.
    pub(crate) fn take(
        &mut self,
        applied: &mut IdempotentApply,
        filter: &mut FencingFilter,
        delivery: &swarmbus_schema::Deliver,
    ) -> bool {
        if delivery.class != Class::Command
            || !applied.admit(
                &delivery.swarm,
                delivery.class,
                delivery.epoch,
                delivery.op_id,
            )
        {
            return false;
        }
        let admitted = filter.admit(delivery);
        self.seen.push(Seen {
            op: delivery.op_id.0,
            token: delivery.fencing_token,
            admitted,
        });
        self.ops.insert(delivery.op_id.0);
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// The scenario from set-up to report, in the order it runs (contenders, the kills, the
// checks, the JSON): its phases share the run's clients and what each observed, and read
// best in sequence.
pub async fn run(args: LeaderArgs) -> anyhow::Result<()> {
    crate::report::describe("leases granted", "acquire -> grant");
    if args.contenders == 0 || args.observers == 0 {
        bail!("--contenders and --observers must be at least 1");
    }
    let kill_prob = args.kill_prob.unwrap_or(args.pause_prob / 2.0);
    for (flag, p) in [
        ("--pause-prob", args.pause_prob),
        ("--kill-prob", kill_prob),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{flag} must be a probability from 0 to 1, not {p}");
        }
    }
    if args.ttl < Duration::from_millis(3) {
        bail!("--ttl must be at least 3ms (the holder renews every third of it)");
    }
    let (routers, ca, spawned) = args.router.resolve().await?;
    let connector = args
        .router
        .connector(&ca)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    let run_tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 & 0xff_ffff)
        .unwrap_or_default();
    let swarm = format!("leader-{run_tag:06x}");

    // Observers first, so they receive every command.
    let mut observers = Vec::new();
    let mut observer_logs = Vec::new();
    for o in 0..args.observers {
        let router = routers.pick(o);
        let session = Session::new(format!("{swarm}-observer-{o}"), Role::Agent, [&swarm]);
        let (client, deliveries) = connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting observer {o} to {router}"))?;
        client
            .subscribe(&swarm, Class::Command, None)
            .await
            .with_context(|| format!("observer {o} subscribing to commands"))?;
        let log = Arc::new(Mutex::new(ObserverLog::default()));
        observers.push(tokio::spawn(observe(
            client.clone(),
            deliveries,
            log.clone(),
        )));
        observer_logs.push((client, log));
    }

    if !args.json {
        eprintln!(
            "leader: {} contenders for {:?}, ttl {:?}, pause {} / kill {} per renewal tick",
            args.contenders, args.duration, args.ttl, args.pause_prob, kill_prob
        );
    }
    let plan = Arc::new(Plan {
        connector,
        // A lease is each router's own: contenders on several routers would each be
        // granted it. They all contend on the first router; the observers spread.
        routers: vec![routers.first()],
        swarm: swarm.clone(),
        ttl: args.ttl,
        command_every: args.command_every,
        pause_prob: args.pause_prob,
        kill_prob,
        deadline: Instant::now() + args.duration,
        bulk_connection: true,
    });
    let contenders: Vec<_> = (0..args.contenders)
        .map(|c| {
            let seed = args.seed ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            tokio::spawn(contend(c, plan.clone(), Rng::new(seed)))
        })
        .collect();
    let mut logs = Vec::new();
    for task in contenders {
        logs.push(task.await.context("a contender task")?);
    }

    // Every acknowledged command should reach every observer.
    let acked: HashSet<u64> = logs
        .iter()
        .flat_map(|log| log.acked.iter().map(|&(op, _)| op))
        .collect();
    let drain_deadline = Instant::now() + args.drain;
    let drained = loop {
        let complete = observer_logs
            .iter()
            .all(|(_, log)| acked.iter().all(|op| lock(log).ops.contains(op)));
        if complete {
            break true;
        }
        if Instant::now() >= drain_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (client, _) in &observer_logs {
        client.close();
    }
    for task in observers {
        let _ = task.await;
    }
    let observed: Vec<ObserverLog> = observer_logs
        .into_iter()
        .map(|(_, log)| std::mem::take(&mut *lock(&log)))
        .collect();
    drop(spawned);

    let analysis = analyse(&logs, &observed)?;
    let sum = |field: fn(&ContenderLog) -> u64| logs.iter().map(field).sum::<u64>();
    let gap = &analysis.handover_gap_ms;
    let gap_field = |q: f64| (!gap.is_empty()).then(|| gap.value_at_quantile(q));
    let report = serde_json::json!({
        "scenario": "leader",
        "contenders": args.contenders,
        "observers": args.observers,
        "duration_s": args.duration.as_secs_f64(),
        "ttl_ms": args.ttl.as_millis() as u64,
        "pause_prob": args.pause_prob,
        "kill_prob": kill_prob,
        "grants": analysis.grants,
        "max_token": analysis.max_token,
        "first_token": analysis.first_token,
        "token_gaps": analysis.token_gaps,
        "overlapping_holders": analysis.overlapping_holders,
        "shared_tokens": analysis.shared_tokens,
        "stale_commands_accepted": analysis.stale_commands_accepted,
        "stale_sequenced": analysis.stale_sequenced,
        "commands_accepted": acked.len(),
        "commands_delivered": analysis.delivered,
        "commands_filtered": analysis.filtered,
        "commands_lost": analysis.lost,
        "drained": drained,
        "renewals": sum(|l| l.renewals),
        "lease_lost": sum(|l| l.lease_lost),
        "acquire_refused": sum(|l| l.acquire_refused),
        "same_token_regrants": sum(|l| l.same_token_regrants),
        "stale_refused": sum(|l| l.stale_refused),
        "late_commands": sum(|l| l.late_commands),
        "late_commands_accepted": sum(|l| l.late_commands_accepted),
        "pauses": sum(|l| l.pauses),
        "kills": sum(|l| l.kills),
        "handover_gap_ms": {
            "p50": gap_field(0.5),
            "p99": gap_field(0.99),
            "max": (!gap.is_empty()).then(|| gap.max()),
        },
        "errors": sum(|l| l.errors),
        "seed": args.seed,
    });
    for message in logs.iter().flat_map(|log| &log.error_messages) {
        eprintln!("leader: contender error: {message}");
    }
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    if analysis.overlapping_holders > 0
        || analysis.stale_commands_accepted > 0
        || analysis.shared_tokens > 0
    {
        bail!(
            "safety violated: {} overlapping holders, {} stale commands accepted, {} tokens \
             held by two contenders",
            analysis.overlapping_holders,
            analysis.stale_commands_accepted,
            analysis.shared_tokens
        );
    }
    Ok(())
}

/// How a spell as holder ended.
#[derive(Debug, PartialEq, Eq)]
enum HoldEnd {
    /// The lease is gone (renewal refused, or a command fenced): contend again.
    Lost,
    /// The connection was closed (killed, or it failed): reconnect.
    Disconnected,
    /// The run is over.
    Deadline,
}

/// One contender: acquire, hold (renew, act, get paused or killed), repeat until the
/// deadline. Returns what it observed.
pub(crate) async fn contend(index: usize, plan: Arc<Plan>, mut rng: Rng) -> ContenderLog {
    let agent = format!("{}-contender-{index}", plan.swarm);
    let router = plan.routers[index % plan.routers.len()];
    let mut log = ContenderLog::default();
    let mut session: Option<(Client, Deliveries)> = None;
    let mut seq = 0u64;
    while Instant::now() < plan.deadline {
        let client = match &session {
            Some((client, _)) => client.clone(),
            None => {
                let mut hello = Session::new(agent.clone(), Role::Controller, [&plan.swarm]);
                hello.bulk_connection = plan.bulk_connection;
                match plan.connector.connect(router, hello).await {
                    Ok(connected) => {
                        let client = connected.0.clone();
                        session = Some(connected);
                        client
                    }
                    Err(error) => {
                        log.error("connecting", &error);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let sent_at = Instant::now();
        match client.acquire_lease(&plan.swarm, LEASE, plan.ttl).await {
            Ok(grant) => {
                crate::report::latency_us(sent_at.elapsed().as_micros() as u64);
                crate::report::count(1);
                if !log.believe(&grant) {
                    log.same_token_regrants += 1;
                }
                let end = hold(&plan, &client, grant, sent_at, &mut rng, &mut log, &mut seq).await;
                if end == HoldEnd::Disconnected {
                    session = None;
                }
            }
            Err(error) if error.code() == Some(LEASE_HELD) => {
                log.acquire_refused += 1;
                crate::report::refused(1);
                // Come back when the holder's time runs out (the router says when), with a
                // little jitter so the contenders do not all ask at the same instant.
                let wait = Duration::from_millis(u64::from(error.retry_after_ms())).min(plan.ttl)
                    + Duration::from_millis(rng.between(0, 5));
                sleep_until_at_most(wait, plan.deadline).await;
            }
            Err(error) => {
                log.error("acquiring", &error);
                client.close();
                session = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Some((client, _)) = session {
        client.close();
    }
    log
}

/// Holds the lease from `grant` (acquired by a request sent at `sent_at`) until it is lost,
/// the contender is killed or the run ends.
async fn hold(
    plan: &Plan,
    client: &Client,
    mut grant: LeaseGrant,
    sent_at: Instant,
    rng: &mut Rng,
    log: &mut ContenderLog,
    seq: &mut u64,
) -> HoldEnd {
    let renew_every = plan.ttl / 3;
    // The holder's own belief: the router started the TTL after this request was sent, so
    // the lease is surely still held until a TTL after the send, by the local clock.
    let mut believed_until = sent_at + plan.ttl;
    let mut last_renewal = sent_at;
    loop {
        if Instant::now() >= plan.deadline {
            return HoldEnd::Deadline;
        }
        if last_renewal.elapsed() >= renew_every {
            if rng.chance(plan.pause_prob) {
                log.pauses += 1;
                let factor = 1.2 + 0.8 * rng.unit();
                tokio::time::sleep(plan.ttl.mul_f64(factor)).await;
                // Awake, and unaware of the pause: it acts on its old token at once.
                log.late_commands += 1;
                match command(plan, client, grant.token, seq).await {
                    Ok(op) => {
                        log.late_commands_accepted += 1;
                        log.acked.push((op, grant.token));
                    }
                    Err(error) if error.code() == Some(STALE_FENCING_TOKEN) => {
                        log.stale_refused += 1;
                    }
                    Err(error) => {
                        log.error("publishing after a pause", &error);
                        return HoldEnd::Disconnected;
                    }
                }
            } else if rng.chance(plan.kill_prob) {
                log.kills += 1;
                client.close();
                let down = plan.ttl.mul_f64(2.0 * rng.unit());
                sleep_until_at_most(down, plan.deadline).await;
                return HoldEnd::Disconnected;
            }
            let sent = Instant::now();
            match client.renew_lease(&grant, plan.ttl).await {
                Ok(renewed) => {
                    log.believe(&renewed);
                    log.renewals += 1;
                    grant = renewed;
                    believed_until = sent + plan.ttl;
                    last_renewal = sent;
                }
                Err(error) if error.code() == Some(LEASE_LOST) => {
                    log.lease_lost += 1;
                    return HoldEnd::Lost;
                }
                Err(error) => {
                    log.error("renewing", &error);
                    return HoldEnd::Disconnected;
                }
            }
        }
        if Instant::now() < believed_until {
            match command(plan, client, grant.token, seq).await {
                Ok(op) => log.acked.push((op, grant.token)),
                Err(error) if error.code() == Some(STALE_FENCING_TOKEN) => {
                    // A newer token exists: this holder was fenced off.
                    log.stale_refused += 1;
                    return HoldEnd::Lost;
                }
                Err(error) => {
                    log.error("publishing", &error);
                    return HoldEnd::Disconnected;
                }
            }
        }
        tokio::time::sleep(plan.command_every).await;
    }
}

/// Publishes one command stamped with `token`; its op id once acknowledged.
async fn command(
    plan: &Plan,
    client: &Client,
    token: u64,
    seq: &mut u64,
) -> Result<u64, ClientError> {
    *seq += 1;
    let payload = Bytes::from(format!("{} token {token} seq {seq}", client.agent_id()));
    let options = PublishOptions {
        fencing_token: token,
        lease: Some(LEASE.to_owned()),
        ..PublishOptions::default()
    };
    client
        .publish(&plan.swarm, Class::Command, payload, options)
        .await
        .map(|op| op.0)
}

async fn sleep_until_at_most(wait: Duration, deadline: Instant) {
    let until = (Instant::now() + wait).min(deadline);
    tokio::time::sleep_until(until.into()).await;
}

/// An observer: drops redeliveries (`IdempotentApply`), passes every command through a
/// `FencingFilter`, logs both, and acknowledges what it took.
async fn observe(client: Client, mut deliveries: Deliveries, log: Arc<Mutex<ObserverLog>>) {
    let mut applied = IdempotentApply::new();
    let mut filter = FencingFilter::new();
    let mut batch = Vec::with_capacity(256);
    while deliveries.recv_many(&mut batch, 256).await > 0 {
        let mut last = None;
        {
            let mut log = lock(&log);
            for delivery in batch.drain(..) {
                if log.take(&mut applied, &mut filter, &delivery) {
                    last = Some(delivery.swarm);
                }
            }
        }
        if let Some(swarm) = last {
            let op = applied.last_applied_of(&swarm, Class::Command);
            if client.ack(&swarm, Class::Command, op).await.is_err() {
                break;
            }
        }
    }
}

/// The checks, from the logs alone.
#[derive(Debug)]
pub(crate) struct Analysis {
    /// Distinct tokens granted to the contenders.
    pub(crate) grants: u64,
    pub(crate) max_token: u64,
    pub(crate) first_token: u64,
    /// Tokens between the first and the largest that no contender was granted.
    pub(crate) token_gaps: u64,
    /// Pairs of validity intervals with different tokens that overlap (router clock).
    pub(crate) overlapping_holders: u64,
    /// Tokens granted to more than one contender.
    pub(crate) shared_tokens: u64,
    /// Commands an observer's filter admitted although a newer token had been seen.
    pub(crate) stale_commands_accepted: u64,
    /// Acknowledged commands sequenced after a command with a newer token.
    pub(crate) stale_sequenced: u64,
    pub(crate) delivered: u64,
    pub(crate) filtered: u64,
    /// Acknowledged commands missing at an observer, summed over observers.
    pub(crate) lost: u64,
    /// Router-clock time from one holder's expiry to the next grant.
    pub(crate) handover_gap_ms: Histogram<u64>,
}

/// Judges the run from what the contenders and observers logged:
///
/// - *overlapping_holders*: every token's interval is `[granted_at_ms, expires_at_ms)` as
///   the router reported it in the grants and renewals its holder received; two intervals
///   with different tokens overlap when each starts before the other ends.
/// - *stale_commands_accepted*: a delivery an observer's `FencingFilter` admitted although
///   its token is older than a token already known to be in force when it was sequenced:
///   older than a token that observer had received before (arrival order), or older than
///   the token of an acknowledged command with a smaller op id (the router's order). It
///   does not trust the filter's own state.
/// - *stale_sequenced*: acknowledged commands with a smaller token than an acknowledged
///   command with a smaller op id: the router sequenced a command of a deposed leader
///   after its successor's (its check and its sequencing are not atomic); the observers'
///   filters must drop these.
// Every check of the leader scenario over what each side observed, one after another:
// each is a few lines over the same timelines. Long by design.
pub(crate) fn analyse(
    contenders: &[ContenderLog],
    observers: &[ObserverLog],
) -> anyhow::Result<Analysis> {
    // Intervals per token; a token logged by two contenders is shared.
    let mut by_token: BTreeMap<u64, (usize, Interval)> = BTreeMap::new();
    let mut shared_tokens = 0;
    for (c, log) in contenders.iter().enumerate() {
        for (&token, &interval) in &log.beliefs {
            match by_token.get_mut(&token) {
                None => {
                    by_token.insert(token, (c, interval));
                }
                Some((holder, _)) if *holder != c => shared_tokens += 1,
                Some(_) => {}
            }
        }
    }
    let mut intervals: Vec<(u64, Interval)> = by_token.iter().map(|(&t, &(_, i))| (t, i)).collect();
    intervals.sort_by_key(|(_, i)| (i.granted_at_ms, i.expires_at_ms));
    let mut overlapping_holders = 0;
    for (a, (token_a, first)) in intervals.iter().enumerate() {
        for (token_b, second) in &intervals[a + 1..] {
            if second.granted_at_ms >= first.expires_at_ms {
                break; // sorted by start: no later interval starts before `first` ends
            }
            if token_a != token_b && first.granted_at_ms < second.expires_at_ms {
                overlapping_holders += 1;
            }
        }
    }
    let mut handover_gap_ms = Histogram::<u64>::new(3)?;
    let by_token_order: Vec<Interval> = by_token.values().map(|&(_, i)| i).collect();
    for pair in by_token_order.windows(2) {
        handover_gap_ms.record(pair[1].granted_at_ms.saturating_sub(pair[0].expires_at_ms))?;
    }
    let grants = by_token.len() as u64;
    let first_token = by_token.keys().next().copied().unwrap_or_default();
    let max_token = by_token.keys().next_back().copied().unwrap_or_default();
    let token_gaps = if grants == 0 {
        0
    } else {
        (max_token - first_token + 1) - grants
    };

    // The router's order of acknowledged commands, with the newest token before each.
    let mut acked: Vec<(u64, u64)> = contenders
        .iter()
        .flat_map(|log| log.acked.iter().copied())
        .collect();
    acked.sort_unstable();
    let mut newest_before = Vec::with_capacity(acked.len()); // newest token at ops < acked[i].0
    let mut newest = 0;
    let mut stale_sequenced = 0;
    for &(_, token) in &acked {
        newest_before.push(newest);
        if token < newest {
            stale_sequenced += 1;
        }
        newest = newest.max(token);
    }
    let newest_sequenced_before = |op: u64| {
        let index = acked.partition_point(|&(acked_op, _)| acked_op < op);
        if index == 0 {
            0
        } else {
            // The newest token among acked ops below `op`: the one before index, or earlier.
            newest_before[index - 1].max(acked[index - 1].1)
        }
    };

    let mut stale_commands_accepted = 0;
    let mut delivered = 0;
    let mut filtered = 0;
    let mut lost = 0;
    let acked_ops: HashSet<u64> = acked.iter().map(|&(op, _)| op).collect();
    for observer in observers {
        let mut newest_received = 0;
        for seen in &observer.seen {
            delivered += 1;
            if seen.admitted {
                if seen.token < newest_received || seen.token < newest_sequenced_before(seen.op) {
                    stale_commands_accepted += 1;
                }
            } else {
                filtered += 1;
            }
            newest_received = newest_received.max(seen.token);
        }
        lost += acked_ops
            .iter()
            .filter(|op| !observer.ops.contains(op))
            .count() as u64;
    }
    Ok(Analysis {
        grants,
        max_token,
        first_token,
        token_gaps,
        overlapping_holders,
        shared_tokens,
        stale_commands_accepted,
        stale_sequenced,
        delivered,
        filtered,
        lost,
        handover_gap_ms,
    })
}

fn print_table(report: &serde_json::Value) {
    println!("{:<24} leader", "scenario");
    for key in [
        "contenders",
        "duration_s",
        "ttl_ms",
        "grants",
        "max_token",
        "overlapping_holders",
        "stale_commands_accepted",
        "stale_sequenced",
        "commands_accepted",
        "commands_delivered",
        "commands_filtered",
        "commands_lost",
        "renewals",
        "lease_lost",
        "stale_refused",
        "late_commands",
        "late_commands_accepted",
        "pauses",
        "kills",
        "errors",
    ] {
        println!("{key:<24} {}", report[key]);
    }
    let g = &report["handover_gap_ms"];
    println!(
        "{:<24} p50 {}  p99 {}  max {}",
        "handover_gap_ms", g["p50"], g["p99"], g["max"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(token: u64, from: u64, to: u64) -> LeaseGrant {
        LeaseGrant {
            token,
            granted_at_ms: from,
            expires_at_ms: to,
            ..LeaseGrant::default()
        }
    }

    fn contender(grants: &[LeaseGrant], acked: &[(u64, u64)]) -> ContenderLog {
        let mut log = ContenderLog::default();
        for g in grants {
            log.believe(g);
        }
        log.acked = acked.to_vec();
        log
    }

    fn observer(seen: &[(u64, u64, bool)]) -> ObserverLog {
        ObserverLog {
            seen: seen
                .iter()
                .map(|&(op, token, admitted)| Seen {
                    op,
                    token,
                    admitted,
                })
                .collect(),
            ops: seen.iter().map(|&(op, _, _)| op).collect(),
        }
    }

    #[test]
    fn back_to_back_leases_are_clean() {
        // a holds 1 (renewed to 1_500), b gets 2 exactly at expiry, a gets 3 later.
        let a = contender(
            &[
                grant(1, 0, 1_000),
                grant(1, 0, 1_500),
                grant(3, 2_600, 3_100),
            ],
            &[(1, 1), (2, 1), (5, 3)],
        );
        let b = contender(&[grant(2, 1_500, 2_000)], &[(3, 2), (4, 2)]);
        let watcher = observer(&[(1, 1, true), (2, 1, true), (3, 2, true), (4, 2, true)]);
        let analysis = analyse(&[a, b], &[watcher]).unwrap();
        assert_eq!(analysis.grants, 3);
        assert_eq!((analysis.first_token, analysis.max_token), (1, 3));
        assert_eq!(analysis.token_gaps, 0);
        assert_eq!(analysis.overlapping_holders, 0);
        assert_eq!(analysis.shared_tokens, 0);
        assert_eq!(analysis.stale_commands_accepted, 0);
        assert_eq!(analysis.stale_sequenced, 0);
        assert_eq!(analysis.lost, 1, "op 5 never reached the observer");
        assert_eq!(analysis.handover_gap_ms.max(), 600);
    }

    #[test]
    fn overlaps_and_stale_acceptance_are_caught() {
        // b's grant starts before a's renewed expiry: one overlapping pair.
        let a = contender(&[grant(1, 0, 1_000), grant(1, 0, 1_400)], &[(1, 1), (3, 1)]);
        let b = contender(&[grant(2, 1_200, 1_700)], &[(2, 2)]);
        // The router sequenced a's op 3 after b's op 2; a broken filter admitted it.
        let broken = observer(&[(1, 1, true), (2, 2, true), (3, 1, true)]);
        // A filter that saw op 2 late (out of order) still must not admit op 3: the
        // router's order says token 2 was in force before op 3.
        let blind = observer(&[(1, 1, true), (3, 1, true), (2, 2, true)]);
        let good = observer(&[(1, 1, true), (2, 2, true), (3, 1, false)]);
        let analysis = analyse(&[a, b], &[broken, blind, good]).unwrap();
        assert_eq!(analysis.overlapping_holders, 1);
        assert_eq!(analysis.stale_sequenced, 1);
        assert_eq!(analysis.stale_commands_accepted, 2);
        assert_eq!(analysis.filtered, 1);
        assert_eq!(analysis.delivered, 9);
        assert_eq!(analysis.lost, 0);
    }

    #[test]
    fn a_token_held_by_two_contenders_is_shared() {
        let a = contender(&[grant(1, 0, 1_000)], &[]);
        let b = contender(&[grant(1, 0, 1_000), grant(2, 1_000, 2_000)], &[]);
        let analysis = analyse(&[a, b], &[]).unwrap();
        assert_eq!(analysis.shared_tokens, 1);
        assert_eq!(analysis.grants, 2);
        assert_eq!(analysis.overlapping_holders, 0);
    }
}
