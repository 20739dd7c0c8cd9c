//! The `presence` scenario: how long until a dead agent is known to be gone?
//!
//! `--agents` sessions (role agent) join one swarm and heartbeat by themselves (the client
//! library does it at the interval the router announces in Welcome). `--watchers` sessions
//! join the same swarm and subscribe to its alert class, where the router announces every
//! join and leave (source agent `swarmbus-router`, key `presence`). Once every watcher saw
//! every agent join, `--kill` agents chosen at random (seeded) die at the same instant, and
//! the scenario records when each watcher saw each of their leaves. Then it asks the router
//! who is present and counts ghosts (killed agents still listed, and agents listed twice).
//!
//! Killing without a goodbye (`--kill-mode timeout`) must stop the agents' heartbeats
//! without closing their QUIC connections: dropping a quinn connection or endpoint on a
//! running runtime sends CONNECTION_CLOSE (quinn's implicit close on the last handle), and
//! the router would then see a clean close. So the agents to kill are connected on a
//! single-threaded runtime of their own, on a thread of their own: killing them is
//! returning from that runtime's `block_on`. From then on none of their tasks runs (no
//! heartbeat, no ACK, no close), while their sockets stay open until the end of the run,
//! as for a process that froze or a host that lost its network. `--kill-mode close` closes
//! their connections cleanly instead (the router sees the close at once).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use serde::Deserialize;
use swarmbus_client::{Client, Deliveries, Session};
use swarmbus_schema::{Class, Role};
use tokio::sync::oneshot;

use crate::rng::Rng;
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

/// Clients per UDP socket (one `Connector` each): a few thousand connections behind one
/// socket lose packets in its receive buffer.
const CLIENTS_PER_SOCKET: usize = 25;

/// The source agent of the router's own announcements.
const ROUTER_AGENT: &str = "swarmbus-router";

/// The key of presence announcements on the alert class.
const PRESENCE_KEY: &str = "presence";

/// How often the waits look at what the watchers recorded.
const POLL_EVERY: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KillMode {
    /// Freeze the agents (no heartbeat, no close): the router must notice the silence.
    Timeout,
    /// Close the agents' connections cleanly.
    Close,
}

impl KillMode {
    fn name(self) -> &'static str {
        match self {
            KillMode::Timeout => "timeout",
            KillMode::Close => "close",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PresenceArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Agent sessions joining the swarm (role agent), 25 per UDP socket.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Heartbeat interval in ms: a spawned router runs with `[presence]
    /// heartbeat_interval_ms` set to it (declaring an agent gone after 3 intervals by
    /// default); against --router it must match what the router announces.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// Agents killed, all at the same instant, once every watcher saw every join.
    #[arg(long, default_value_t = 10)]
    kill: usize,
    /// `timeout`: the killed agents freeze (no heartbeat, no close; the router must detect
    /// the silence); `close`: their connections are closed cleanly.
    #[arg(long, value_enum, default_value = "timeout")]
    kill_mode: KillMode,
    /// Watcher sessions subscribed to the swarm's alerts, where joins and leaves are
    /// announced; the leave-detection times are theirs.
    #[arg(long, default_value_t = 4)]
    watchers: usize,
    /// Wait between the last join seen and the kill (default: two heartbeat intervals).
    #[arg(long, value_parser = parse_duration)]
    settle: Option<Duration>,
    /// Agents connecting at once during set-up.
    #[arg(long, default_value_t = 50)]
    connect_concurrency: usize,
    /// Each agent's connect timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest wait for all joins to be seen, and again for all leaves after the kill.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    /// Seed of the choice of agents to kill.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// A presence announcement (the router's JSON payload; other fields are ignored).
#[derive(Debug, Deserialize)]
struct PresenceEvent {
    event: String,
    agent: String,
    #[serde(default)]
    reason: String,
}

/// What one watcher saw, with the time it saw it.
#[derive(Debug, Default)]
struct WatcherLog {
    /// First join seen per agent.
    joins: HashMap<String, Instant>,
    /// First leave seen per agent, and its reason.
    leaves: HashMap<String, (Instant, String)>,
    /// Presence announcements whose payload did not parse.
    unparsed: u64,
    /// Whether the watcher's delivery stream ended (its session closed).
    ended: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// The scenario from set-up to report, in the order it runs (members, the churn, the
// queries, the checks, the JSON): its phases share the run's clients and counters, and
// read best in sequence.
pub async fn run(args: PresenceArgs) -> anyhow::Result<()> {
    crate::report::describe("leaves seen", "kill -> every watcher saw the leave");
    if args.agents == 0 || args.watchers == 0 || args.heartbeat_ms == 0 {
        bail!("--agents, --watchers and --heartbeat-ms must be at least 1");
    }
    if args.kill > args.agents {
        bail!("--kill ({}) exceeds --agents ({})", args.kill, args.agents);
    }
    let config = format!(
        "[presence]\nheartbeat_interval_ms = {}\n",
        args.heartbeat_ms
    );
    let (routers, ca, spawned) = args.router.resolve_with_config(Some(&config)).await?;
    let router = routers
        .only("presence takes one router: a router announces and lists only its own sessions")?;
    // Fresh names per run, so a run against a long-lived router never meets the agents of
    // an earlier one.
    let run_tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 & 0xff_ffff)
        .unwrap_or_default();
    let swarm = format!("presence-{run_tag:06x}");
    let agent_name = |i: usize| format!("{swarm}-agent-{i}");
    let progress = |text: String| {
        if !args.json {
            eprintln!("presence: {text}");
        }
    };

    // Watchers first: they must see every join.
    let watcher_connector = args
        .router
        .connector(&ca)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    let mut watchers = Vec::new();
    let mut logs = Vec::new();
    let mut watch_tasks = Vec::new();
    for w in 0..args.watchers {
        let session = Session::new(format!("{swarm}-watcher-{w}"), Role::Agent, [&swarm]);
        let (client, deliveries) = watcher_connector
            .connect(router, session)
            .await
            .with_context(|| format!("connecting watcher {w} to {router}"))?;
        client
            .subscribe(&swarm, Class::Alert, Some(ROUTER_AGENT))
            .await
            .with_context(|| format!("watcher {w} subscribing to alerts"))?;
        let announced = client.welcome().limits.heartbeat_interval_ms;
        if announced != args.heartbeat_ms {
            bail!(
                "the router announces heartbeats every {announced} ms, --heartbeat-ms says {} \
                 (it sets the interval of a spawned router only)",
                args.heartbeat_ms
            );
        }
        let log = Arc::new(Mutex::new(WatcherLog::default()));
        watch_tasks.push(tokio::spawn(watch(deliveries, log.clone())));
        logs.push(log);
        watchers.push(client);
    }
    let heartbeat_timeout_ms = watchers[0].welcome().limits.heartbeat_timeout_ms;

    // Which agents die is decided up front: they are connected on the doomed runtime.
    let mut rng = Rng::new(args.seed);
    let doomed_indices: HashSet<usize> = rng.sample(args.agents, args.kill).into_iter().collect();
    let doomed_names: Vec<String> = (0..args.agents)
        .filter(|i| doomed_indices.contains(i))
        .map(agent_name)
        .collect();
    let survivor_names: Vec<String> = (0..args.agents)
        .filter(|i| !doomed_indices.contains(i))
        .map(agent_name)
        .collect();

    let setup_started = Instant::now();
    progress(format!(
        "connecting {} agents ({} to be killed, {}) and {} watchers to {router}",
        args.agents,
        args.kill,
        args.kill_mode.name(),
        args.watchers
    ));
    let plan = ConnectPlan {
        ca: ca.clone(),
        server_name: args.router.server_name().to_owned(),
        signer: args.router.signer(),
        router,
        swarm: swarm.clone(),
        concurrency: args.connect_concurrency.max(1),
        connect_timeout: args.connect_timeout,
    };
    let (mut doomed, doomed_ready) =
        Doomed::start(plan.clone(), doomed_names.clone(), args.kill_mode)?;
    let survivors = connect_agents(&plan, &survivor_names).await?;
    let doomed_connected = doomed_ready
        .await
        .map_err(|_| anyhow!("the doomed agents' thread ended early"))??;
    if doomed_connected != doomed_names.len() {
        bail!(
            "{doomed_connected} of {} agents to kill connected",
            doomed_names.len()
        );
    }

    // Every watcher must have seen every agent join before anything dies.
    let all_names: Vec<&String> = survivor_names.iter().chain(&doomed_names).collect();
    let joined_everywhere = wait_until(Instant::now() + args.timeout, || {
        logs.iter().all(|log| {
            let log = lock(log);
            all_names.iter().all(|name| log.joins.contains_key(*name))
        })
    })
    .await;
    if !joined_everywhere {
        let seen: Vec<usize> = logs
            .iter()
            .map(|log| {
                let log = lock(log);
                all_names
                    .iter()
                    .filter(|n| log.joins.contains_key(**n))
                    .count()
            })
            .collect();
        bail!(
            "not every join was seen within --timeout: joins seen per watcher {seen:?} of {}",
            args.agents
        );
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    let settle = args
        .settle
        .unwrap_or(Duration::from_millis(2 * u64::from(args.heartbeat_ms)));
    progress(format!(
        "all joins seen after {setup_s:.1} s; killing {} agents in {settle:?}",
        args.kill
    ));
    tokio::time::sleep(settle).await;

    // The kill, then the wait for every watcher to see every leave.
    let killed_at = doomed.kill().await?;
    let leave_deadline = killed_at + args.timeout;
    let all_left = wait_until(leave_deadline, || {
        logs.iter().all(|log| {
            let log = lock(log);
            doomed_names
                .iter()
                .all(|name| log.leaves.contains_key(name))
        })
    })
    .await;
    if !all_left {
        eprintln!("presence: not every leave was seen within --timeout");
    }

    // Who does the router still list?
    let members = watchers[0]
        .presence(&swarm)
        .await
        .context("the presence query")?;
    let doomed_set: HashSet<&str> = doomed_names.iter().map(String::as_str).collect();
    let listed: HashSet<&str> = members.iter().map(|m| m.agent.as_str()).collect();
    let listed_killed = members
        .iter()
        .filter(|m| doomed_set.contains(m.agent.as_str()))
        .count();
    let duplicate_members = members.len() - listed.len();
    let ghosts = listed_killed + duplicate_members;
    let watcher_names: Vec<String> = (0..args.watchers)
        .map(|w| format!("{swarm}-watcher-{w}"))
        .collect();
    let members_missing = survivor_names
        .iter()
        .chain(&watcher_names)
        .filter(|name| !listed.contains(name.as_str()))
        .count();

    // Leave-detection time per killed agent: until the last watcher saw its leave.
    let mut detect_ms = Histogram::<u64>::new(3)?;
    let mut leaves_seen = 0u64;
    let mut reasons: HashMap<String, u64> = HashMap::new();
    let mut false_leaves = HashSet::new();
    let mut unparsed = 0;
    let mut watcher_sessions_ended = 0;
    {
        let logs: Vec<MutexGuard<'_, WatcherLog>> = logs.iter().map(|log| lock(log)).collect();
        for name in &doomed_names {
            let seen: Option<Vec<Instant>> = logs
                .iter()
                .map(|log| log.leaves.get(name).map(|(at, _)| *at))
                .collect();
            if let Some(seen) = seen {
                leaves_seen += 1;
                let last = seen.into_iter().max().unwrap_or(killed_at);
                let took = last.saturating_duration_since(killed_at);
                detect_ms.record(took.as_millis() as u64)?;
                crate::report::at(last, Some(took.as_micros() as u64));
            }
            if let Some((_, reason)) = logs[0].leaves.get(name) {
                *reasons.entry(reason.clone()).or_default() += 1;
            }
        }
        for log in &logs {
            false_leaves.extend(
                log.leaves
                    .keys()
                    .filter(|agent| !doomed_set.contains(agent.as_str()))
                    .cloned(),
            );
            unparsed += log.unparsed;
            watcher_sessions_ended += u64::from(log.ended);
        }
    }
    let quantile = |q: f64| (!detect_ms.is_empty()).then(|| detect_ms.value_at_quantile(q));
    let report = serde_json::json!({
        "scenario": "presence",
        "agents": args.agents,
        "killed": args.kill,
        "kill_mode": args.kill_mode.name(),
        "watchers": args.watchers,
        "heartbeat_ms": args.heartbeat_ms,
        "heartbeat_timeout_ms": heartbeat_timeout_ms,
        "leaves_seen": leaves_seen,
        "leave_detect_ms": {
            "p50": quantile(0.5),
            "p99": quantile(0.99),
            "max": (!detect_ms.is_empty()).then(|| detect_ms.max()),
            "min": (!detect_ms.is_empty()).then(|| detect_ms.min()),
        },
        "leave_reasons": reasons,
        "ghosts": ghosts,
        "duplicate_members": duplicate_members,
        "members": members.len(),
        "members_missing": members_missing,
        "false_leaves": false_leaves.len(),
        "unparsed_events": unparsed,
        "watcher_sessions_ended": watcher_sessions_ended,
        "setup_s": (setup_s * 10.0).round() / 10.0,
        "seed": args.seed,
    });
    crate::report::summary(&report);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }

    for client in watchers.iter().chain(survivors.iter().map(|(c, _)| c)) {
        client.close();
    }
    for task in watch_tasks {
        task.abort();
    }
    doomed.release().await;
    drop(survivors);
    drop(spawned);
    if ghosts > 0 || leaves_seen < args.kill as u64 {
        bail!(
            "{ghosts} ghosts; {leaves_seen} of {} leaves seen by every watcher",
            args.kill
        );
    }
    Ok(())
}

/// Records the presence announcements a watcher receives, with their arrival time.
async fn watch(mut deliveries: Deliveries, log: Arc<Mutex<WatcherLog>>) {
    let mut batch = Vec::with_capacity(256);
    while deliveries.recv_many(&mut batch, 256).await > 0 {
        let at = Instant::now();
        let mut log = lock(&log);
        for delivery in batch.drain(..) {
            if delivery.class != Class::Alert
                || delivery.source_agent != ROUTER_AGENT
                || delivery.key.as_deref() != Some(PRESENCE_KEY)
            {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<PresenceEvent>(&delivery.payload) else {
                log.unparsed += 1;
                continue;
            };
            match event.event.as_str() {
                "join" => {
                    log.joins.entry(event.agent).or_insert(at);
                }
                "leave" => {
                    log.leaves.entry(event.agent).or_insert((at, event.reason));
                }
                _ => {}
            }
        }
    }
    lock(&log).ended = true;
}

/// Polls `done` until it holds or `deadline` passes; whether it held.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// How agents connect.
#[derive(Clone, Debug)]
struct ConnectPlan {
    ca: PathBuf,
    server_name: String,
    /// Credentials, for a router that requires them.
    signer: Option<std::sync::Arc<crate::creds::Signer>>,
    router: SocketAddr,
    swarm: String,
    concurrency: usize,
    connect_timeout: Duration,
}

/// Connects one agent session per name, `plan.concurrency` at a time, 25 per UDP socket.
/// The sockets' I/O runs on the runtime this is called on.
async fn connect_agents(
    plan: &ConnectPlan,
    names: &[String],
) -> anyhow::Result<Vec<(Client, Deliveries)>> {
    let connectors = (0..names.len().div_ceil(CLIENTS_PER_SOCKET))
        .map(|_| crate::spawn::connector(&plan.ca, &plan.server_name, plan.signer.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("TLS setup with CA {}", plan.ca.display()))?;
    let mut clients = Vec::with_capacity(names.len());
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while clients.len() < names.len() {
        while next < names.len() && pending.len() < plan.concurrency {
            let connector = connectors[next / CLIENTS_PER_SOCKET].clone();
            let mut session = Session::new(names[next].clone(), Role::Agent, [&plan.swarm]);
            session.connect_timeout = plan.connect_timeout;
            session.metadata = format!("{{\"loadgen\":\"presence\",\"index\":{next}}}");
            let router = plan.router;
            pending.spawn(async move {
                let agent = session.agent_id.clone();
                connector
                    .connect(router, session)
                    .await
                    .with_context(|| format!("{agent} connecting to {router}"))
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(joined) => clients.push(joined.context("a connecting task failed")??),
            None => break,
        }
    }
    Ok(clients)
}

/// The agents to kill, on a single-threaded runtime driven by a thread of their own (see
/// the module docs: no longer driving that runtime silences them without a close).
#[derive(Debug)]
struct Doomed {
    kill: Option<oneshot::Sender<()>>,
    killed: Option<oneshot::Receiver<Instant>>,
    release: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The doomed thread's side of the channels.
#[derive(Debug)]
struct DoomedChannels {
    /// How many agents connected (or why they did not).
    ready: oneshot::Sender<anyhow::Result<usize>>,
    kill: oneshot::Receiver<()>,
    /// The instant of the kill.
    killed: oneshot::Sender<Instant>,
    /// The end of the run: the agents may be dropped.
    release: oneshot::Receiver<()>,
}

impl Doomed {
    /// Starts the thread, which connects `names`; the receiver says how many connected.
    fn start(
        plan: ConnectPlan,
        names: Vec<String>,
        mode: KillMode,
    ) -> anyhow::Result<(Self, oneshot::Receiver<anyhow::Result<usize>>)> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (kill_tx, kill_rx) = oneshot::channel();
        let (killed_tx, killed_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the doomed agents' runtime")?;
        let channels = DoomedChannels {
            ready: ready_tx,
            kill: kill_rx,
            killed: killed_tx,
            release: release_rx,
        };
        let thread = std::thread::Builder::new()
            .name("doomed-agents".into())
            .spawn(move || doomed_thread(runtime, plan, names, mode, channels))
            .context("starting the doomed agents' thread")?;
        let doomed = Doomed {
            kill: Some(kill_tx),
            killed: Some(killed_rx),
            release: Some(release_tx),
            thread: Some(thread),
        };
        Ok((doomed, ready_rx))
    }

    /// Kills every doomed agent at once; returns the instant of the kill (from then on
    /// none of them sends anything in `timeout` mode; in `close` mode they close).
    async fn kill(&mut self) -> anyhow::Result<Instant> {
        let (Some(kill), Some(killed)) = (self.kill.take(), self.killed.take()) else {
            bail!("the doomed agents were killed already");
        };
        kill.send(())
            .map_err(|_| anyhow!("the doomed agents' thread ended before the kill"))?;
        killed
            .await
            .map_err(|_| anyhow!("the doomed agents' thread ended during the kill"))
    }

    /// Lets the thread drop the doomed agents, and waits for it to end.
    async fn release(mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The doomed agents' thread: connects them and heartbeats (the client library's tasks)
/// until the kill.
fn doomed_thread(
    runtime: tokio::runtime::Runtime,
    plan: ConnectPlan,
    names: Vec<String>,
    mode: KillMode,
    channels: DoomedChannels,
) {
    let DoomedChannels {
        ready,
        kill,
        killed,
        release,
    } = channels;
    let mut release = Some(release);
    // Everything the agents own (sockets, connection drivers, heartbeat tasks) is spawned
    // on this runtime, from inside its `block_on`.
    let agents = runtime.block_on(async {
        let agents = match connect_agents(&plan, &names).await {
            Ok(agents) => agents,
            Err(error) => {
                let _ = ready.send(Err(error));
                return Vec::new();
            }
        };
        let _ = ready.send(Ok(agents.len()));
        if kill.await.is_err() {
            return agents; // the scenario ended before the kill
        }
        let at = Instant::now();
        match mode {
            // Returning from block_on is the kill: no task of this runtime runs again.
            KillMode::Timeout => {
                let _ = killed.send(at);
            }
            KillMode::Close => {
                for (client, _) in &agents {
                    client.close();
                }
                let _ = killed.send(at);
                // Keep driving the runtime, so the closes go out, until the run ends.
                if let Some(release) = release.take() {
                    let _ = release.await;
                }
            }
        }
        agents
    });
    // Frozen (timeout mode) until the end of the run.
    if let Some(release) = release {
        let _ = release.blocking_recv();
    }
    // The runtime goes first: its tasks are dropped without being polled, so even now
    // nothing is sent for the frozen agents.
    drop(runtime);
    drop(agents);
}

fn print_table(report: &serde_json::Value) {
    println!("{:<24} presence", "scenario");
    for key in [
        "agents",
        "killed",
        "kill_mode",
        "watchers",
        "heartbeat_ms",
        "heartbeat_timeout_ms",
        "leaves_seen",
        "leave_reasons",
        "ghosts",
        "duplicate_members",
        "members",
        "members_missing",
        "false_leaves",
        "setup_s",
    ] {
        println!("{key:<24} {}", report[key]);
    }
    let l = &report["leave_detect_ms"];
    println!(
        "{:<24} p50 {}  p99 {}  max {}  min {}",
        "leave_detect_ms", l["p50"], l["p99"], l["max"], l["min"]
    );
}
