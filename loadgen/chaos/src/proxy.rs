//! The UDP fault proxy (see the crate docs).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Which way datagrams go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client -> router.
    ToRouter,
    /// Router -> client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToRouter => 0,
            Direction::ToClient => 1,
        }
    }
}

/// The faults of one direction. Probabilities are per datagram, in `0.0..=1.0`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    /// Dropped.
    pub loss: f64,
    /// Sent twice (the copy right behind the original).
    pub duplicate: f64,
    /// Held back by up to `reorder_by` more than the others, so later ones overtake it.
    pub reorder: f64,
    pub reorder_by: Duration,
    /// Added to every datagram.
    pub latency: Duration,
    /// Bytes per second the direction carries (0: no cap); datagrams wait their turn.
    pub bandwidth_bytes_per_s: u64,
}

/// Which directions a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cut {
    /// Client -> router only: the router hears nothing, the client still hears the router.
    ToRouter,
    /// Router -> client only.
    ToClient,
    /// Both ways.
    Both,
}

impl Cut {
    fn directions(self) -> &'static [Direction] {
        match self {
            Cut::ToRouter => &[Direction::ToRouter],
            Cut::ToClient => &[Direction::ToClient],
            Cut::Both => &[Direction::ToRouter, Direction::ToClient],
        }
    }
}

/// One partition of a schedule: `after` the previous one healed (or the schedule began),
/// `cut` for `length`, then healed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub after: Duration,
    pub length: Duration,
    pub cut: Cut,
}

/// Partitions at random, one after another until the proxy is dropped: each starts after a
/// gap drawn uniformly from `gap`, lasts a length drawn from `length`, and is one way (each
/// way equally likely) with probability `one_way`, else both ways. Drawn from the proxy's
/// seed: the same seed, the same schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomPartitions {
    pub gap: (Duration, Duration),
    pub length: (Duration, Duration),
    pub one_way: f64,
}

impl RandomPartitions {
    /// The first `count` partitions this plan draws from `seed` (what
    /// [`FaultProxy::partition_at_random`] will run, for a report or a replay).
    pub fn schedule(&self, seed: u64, count: usize) -> Vec<Scheduled> {
        self.draws(seed).take(count).collect()
    }

    /// The partitions this plan draws from `seed`, without end.
    fn draws(&self, seed: u64) -> impl Iterator<Item = Scheduled> + Send + 'static {
        // A stream of its own: the datagram lanes' draws never shift it.
        let mut rng = Rng(seed ^ 0x5041_5254_4954_494F);
        let plan = self.clone();
        std::iter::from_fn(move || {
            let after = rng.between(plan.gap);
            let length = rng.between(plan.length);
            let one_way = rng.chance(plan.one_way);
            let toward_router = rng.next() & 1 == 0;
            let cut = match (one_way, toward_router) {
                (false, _) => Cut::Both,
                (true, true) => Cut::ToRouter,
                (true, false) => Cut::ToClient,
            };
            Some(Scheduled { after, length, cut })
        })
    }
}

/// What the proxy did, all flows and directions together.
#[derive(Debug, Default)]
pub struct FaultTotals {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Datagrams dropped because their direction was partitioned.
    pub partitioned: AtomicU64,
    /// Partitions started.
    pub partitions: AtomicU64,
}

/// splitmix64: small, seedable; the proxy's faults replay from its seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]` (to the nanosecond); `low` when the range is empty.
    fn between(&mut self, (low, high): (Duration, Duration)) -> Duration {
        let span = high.saturating_sub(low).as_nanos() as u64;
        low + Duration::from_nanos(self.next() % span.saturating_add(1))
    }

    /// True with probability `p`; one draw whatever `p` is, so the draws after it do not
    /// depend on it.
    fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        p > 0.0 && unit < p
    }
}

/// What one datagram gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Drop,
    /// Sent after this extra delay, once or twice.
    Send {
        extra: Duration,
        twice: bool,
    },
}

/// One direction of one flow: its generator and where its bandwidth cap stands.
#[derive(Debug)]
struct Lane {
    rng: Rng,
    plan: FaultPlan,
    /// When the cap lets the next datagram go.
    free_at: Instant,
    /// Datagrams drawn for so far (their order among equal send times).
    seq: u64,
}

impl Lane {
    fn new(seed: u64, flow: u64, direction: Direction, plan: FaultPlan) -> Self {
        // Each lane its own stream of draws (flows do not shift each other's faults), mixed
        // through the generator so that no two (seed, flow, direction) share one.
        let mut mix = Rng(seed);
        for part in [flow, direction.index() as u64] {
            mix.0 ^= mix.next() ^ part;
        }
        Lane {
            rng: Rng(mix.next()),
            plan,
            free_at: Instant::now(),
            seq: 0,
        }
    }

    /// The fate of the next datagram (of `len` bytes), drawn in arrival order: four draws
    /// each, whatever the plan, so one probability's change does not move the others'
    /// draws. A datagram of a `cut` direction is drawn for and dropped, and uses no
    /// bandwidth.
    fn fate(&mut self, len: usize, now: Instant, cut: bool) -> (Fate, Duration) {
        let lost = self.rng.chance(self.plan.loss);
        let twice = self.rng.chance(self.plan.duplicate);
        let late = self.rng.chance(self.plan.reorder);
        let jitter_ns = 1 + self.rng.next() % (self.plan.reorder_by.as_nanos() as u64).max(1);
        if lost || cut {
            return (Fate::Drop, Duration::ZERO);
        }
        let mut wait = self.plan.latency;
        // A copy takes the link's time too.
        let copies = if twice { 2 } else { 1 };
        let nanos = (len as u64 * copies)
            .saturating_mul(1_000_000_000)
            .checked_div(self.plan.bandwidth_bytes_per_s);
        if let Some(nanos) = nanos {
            let start = self.free_at.max(now);
            let takes = Duration::from_nanos(nanos);
            self.free_at = start + takes;
            wait += start.saturating_duration_since(now) + takes;
        }
        let extra = if late {
            Duration::from_nanos(jitter_ns)
        } else {
            Duration::ZERO
        };
        (Fate::Send { extra, twice }, wait)
    }
}

/// A client's flow: its two lanes and, per direction, the sender that lets datagrams go
/// when their time comes.
#[derive(Debug)]
struct Flow {
    lanes: Mutex<[Lane; 2]>,
    senders: [mpsc::UnboundedSender<Timed>; 2],
}

/// A datagram waiting for its time; senders let them go by (time, arrival).
#[derive(Debug, PartialEq, Eq)]
struct Timed {
    at: Instant,
    seq: u64,
    bytes: Vec<u8>,
    twice: bool,
}

impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug)]
struct Shared {
    seed: u64,
    router: SocketAddr,
    plans: [FaultPlan; 2],
    /// Partitioned directions, of every flow.
    cut: [AtomicBool; 2],
    totals: FaultTotals,
    /// Every task the proxy started, ended with it.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The partition schedules running, ended by `stop_partitions` too.
    schedules: Mutex<Schedules>,
}

/// The schedules started since the last `stop_partitions`, and how many stops came before
/// them. A schedule cuts and heals only under this lock and only while the generation it
/// started in lasts: aborting a task does not stop one that is running on another thread
/// between its sleep and its cut, and that cut must not land after the stop's heal.
#[derive(Debug, Default)]
struct Schedules {
    generation: u64,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Shared {
    /// Cuts the directions of `cut`; a partition is counted when a direction that was
    /// open is cut.
    fn cut(&self, cut: Cut) {
        let mut opened = false;
        for direction in cut.directions() {
            opened |= !self.cut[direction.index()].swap(true, Ordering::AcqRel);
        }
        if opened {
            self.totals.partitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn heal(&self) {
        for cut in &self.cut {
            cut.store(false, Ordering::Release);
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    fn schedules(&self) -> std::sync::MutexGuard<'_, Schedules> {
        self.schedules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the partitions of `schedule` one after another in a task of its own.
    fn spawn_schedule(
        self: &Arc<Self>,
        schedule: impl Iterator<Item = Scheduled> + Send + 'static,
    ) {
        let mut schedules = self.schedules();
        let generation = schedules.generation;
        let shared = self.clone();
        let task = tokio::spawn(async move {
            for partition in schedule {
                tokio::time::sleep(partition.after).await;
                if !shared.in_generation(generation, |s| s.cut(partition.cut)) {
                    return;
                }
                tokio::time::sleep(partition.length).await;
                if !shared.in_generation(generation, Shared::heal) {
                    return;
                }
            }
        });
        schedules.tasks.push(task.abort_handle());
    }

    /// Runs `step` if the schedules of `generation` were not stopped; whether it ran.
    fn in_generation(&self, generation: u64, step: impl FnOnce(&Self)) -> bool {
        let schedules = self.schedules();
        if schedules.generation != generation {
            return false;
        }
        step(self);
        true
    }
}

/// A running proxy: clients connect to [`FaultProxy::addr`] instead of the router. It
/// stops, every flow with it, when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop_partitions();
        let tasks =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

impl FaultProxy {
    /// Starts a proxy on a loopback port of its own in front of `router`, with `to_router`
    /// and `to_client` faults, drawn from `seed`. Runs on the current tokio runtime.
    pub async fn start(
        router: SocketAddr,
        seed: u64,
        to_router: FaultPlan,
        to_client: FaultPlan,
    ) -> std::io::Result<FaultProxy> {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            seed,
            router,
            plans: [to_router, to_client],
            cut: [AtomicBool::new(false), AtomicBool::new(false)],
            totals: FaultTotals::default(),
            tasks: Mutex::new(Vec::new()),
            schedules: Mutex::new(Schedules::default()),
        });
        shared.spawn(serve(listen, shared.clone()));
        Ok(FaultProxy { addr, shared })
    }

    /// Where clients send instead of the router.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts `direction` (both, called twice) for every flow until [`FaultProxy::heal`]:
    /// datagrams arriving meanwhile, and those still waiting out a delay, are dropped.
    pub fn partition(&self, direction: Direction) {
        self.shared.cut(match direction {
            Direction::ToRouter => Cut::ToRouter,
            Direction::ToClient => Cut::ToClient,
        });
    }

    /// Ends every partition (a schedule's included: its next one still comes).
    pub fn heal(&self) {
        self.shared.heal();
    }

    /// Runs `schedule` from now on, in the background, for every flow: each partition
    /// starts its `after` past the end of the one before. Ends with the proxy.
    pub fn partition_on_schedule(&self, schedule: Vec<Scheduled>) {
        self.shared.spawn_schedule(schedule.into_iter());
    }

    /// Partitions at random from now on (see [`RandomPartitions`]), until the proxy is
    /// dropped.
    pub fn partition_at_random(&self, plan: RandomPartitions) {
        self.shared.spawn_schedule(plan.draws(self.shared.seed));
    }

    /// Ends the schedules started so far and heals: from now on the network is partitioned
    /// only by hand (its other faults go on).
    pub fn stop_partitions(&self) {
        let mut schedules = self.shared.schedules();
        schedules.generation += 1;
        for task in schedules.tasks.drain(..) {
            task.abort();
        }
        self.shared.heal();
    }

    /// Whether any direction is cut now.
    pub fn is_partitioned(&self) -> bool {
        self.shared
            .cut
            .iter()
            .any(|cut| cut.load(Ordering::Acquire))
    }

    pub fn totals(&self) -> &FaultTotals {
        &self.shared.totals
    }
}

/// The largest datagram relayed (QUIC's are at most 64 KiB with GSO off).
const MAX_DATAGRAM: usize = 65_536;

/// Relays the clients' datagrams; a client address seen for the first time opens a flow.
/// Flows live as long as the proxy.
async fn serve(listen: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut flows: HashMap<SocketAddr, Arc<Flow>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, client)) = listen.recv_from(&mut buf).await else {
            return;
        };
        let flow = match flows.get(&client) {
            Some(flow) => flow.clone(),
            None => {
                let Ok(flow) = open_flow(&listen, &shared, client, flows.len() as u64).await else {
                    continue;
                };
                flows.insert(client, flow.clone());
                flow
            }
        };
        relay(&shared, &flow, Direction::ToRouter, buf[..len].to_vec());
    }
}

/// A new client's flow: a socket of its own towards the router (the router tells clients
/// apart by address), a sender per direction, and the task relaying the router's answers.
async fn open_flow(
    listen: &Arc<UdpSocket>,
    shared: &Arc<Shared>,
    client: SocketAddr,
    number: u64,
) -> std::io::Result<Arc<Flow>> {
    let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let lanes = [Direction::ToRouter, Direction::ToClient]
        .map(|d| Lane::new(shared.seed, number, d, shared.plans[d.index()].clone()));
    let (to_router, to_router_rx) = mpsc::unbounded_channel();
    let (to_client, to_client_rx) = mpsc::unbounded_channel();
    shared.spawn(sender(
        to_router_rx,
        upstream.clone(),
        shared.router,
        shared.clone(),
        Direction::ToRouter,
    ));
    shared.spawn(sender(
        to_client_rx,
        listen.clone(),
        client,
        shared.clone(),
        Direction::ToClient,
    ));
    let flow = Arc::new(Flow {
        lanes: Mutex::new(lanes),
        senders: [to_router, to_client],
    });
    let back = flow.clone();
    let answers = shared.clone();
    shared.spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok((len, _)) = upstream.recv_from(&mut buf).await {
            relay(&answers, &back, Direction::ToClient, buf[..len].to_vec());
        }
    });
    Ok(flow)
}

/// Draws one datagram's fate and hands what is left to its direction's sender.
fn relay(shared: &Shared, flow: &Flow, direction: Direction, datagram: Vec<u8>) {
    let totals = &shared.totals;
    let now = Instant::now();
    let cut = shared.cut[direction.index()].load(Ordering::Acquire);
    let (fate, wait, seq) = {
        let mut lanes = flow.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let lane = &mut lanes[direction.index()];
        let (fate, wait) = lane.fate(datagram.len(), now, cut);
        lane.seq += 1;
        (fate, wait, lane.seq)
    };
    if cut {
        totals.partitioned.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Fate::Send { extra, twice } = fate else {
        totals.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if !extra.is_zero() {
        totals.reordered.fetch_add(1, Ordering::Relaxed);
    }
    if twice {
        totals.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    let _ = flow.senders[direction.index()].send(Timed {
        at: now + wait + extra,
        seq,
        bytes: datagram,
        twice,
    });
}

/// Sends one direction's datagrams to `to` through `socket` when their time comes, in
/// (time, arrival) order: without delays, in the order they came.
async fn sender(
    mut queue: mpsc::UnboundedReceiver<Timed>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    shared: Arc<Shared>,
    direction: Direction,
) {
    let mut waiting: BinaryHeap<Reverse<Timed>> = BinaryHeap::new();
    loop {
        let next = waiting.peek().map(|Reverse(t)| t.at);
        tokio::select! {
            datagram = queue.recv() => match datagram {
                Some(datagram) => waiting.push(Reverse(datagram)),
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while waiting.peek().is_some_and(|Reverse(t)| t.at <= now) {
                    let Some(Reverse(datagram)) = waiting.pop() else {
                        break;
                    };
                    if shared.cut[direction.index()].load(Ordering::Acquire) {
                        shared.totals.partitioned.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    shared.totals.forwarded.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&datagram.bytes, to).await;
                    if datagram.twice {
                        let _ = socket.send_to(&datagram.bytes, to).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fates(seed: u64, plan: &FaultPlan, n: usize) -> Vec<Fate> {
        let mut lane = Lane::new(seed, 0, Direction::ToRouter, plan.clone());
        let now = Instant::now();
        (0..n).map(|_| lane.fate(1200, now, false).0).collect()
    }

    #[tokio::test]
    async fn the_same_seed_draws_the_same_faults_and_rates_hold() {
        let plan = FaultPlan {
            loss: 0.05,
            duplicate: 0.02,
            reorder: 0.05,
            reorder_by: Duration::from_millis(5),
            ..FaultPlan::default()
        };
        let a = fates(7, &plan, 20_000);
        assert_eq!(a, fates(7, &plan, 20_000), "replayable from the seed");
        assert_ne!(a, fates(8, &plan, 20_000), "another seed, other faults");
        let dropped = a.iter().filter(|f| **f == Fate::Drop).count();
        let twice = a
            .iter()
            .filter(|f| matches!(f, Fate::Send { twice: true, .. }))
            .count();
        // 5% and 2% of 20,000, within a generous margin.
        assert!((800..1200).contains(&dropped), "{dropped}");
        assert!((250..550).contains(&twice), "{twice}");
    }

    /// Sends a ping and waits a little for its echo.
    async fn round_trip(
        client: &UdpSocket,
        buf: &mut [u8],
    ) -> Result<std::io::Result<usize>, tokio::time::error::Elapsed> {
        client.send(b"ping").await.unwrap();
        tokio::time::timeout(Duration::from_millis(300), client.recv(buf)).await
    }

    #[tokio::test]
    async fn datagrams_pass_are_dropped_while_partitioned_and_pass_again_after() {
        let proxy = FaultProxy::start(echo().await, 1, FaultPlan::default(), FaultPlan::default())
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1500];
        let got = round_trip(&client, &mut buf)
            .await
            .expect("echoed")
            .unwrap();
        assert_eq!(&buf[..got], b"ping");
        proxy.partition(Direction::ToClient);
        assert!(
            round_trip(&client, &mut buf).await.is_err(),
            "cut on the way back"
        );
        proxy.heal();
        assert!(round_trip(&client, &mut buf).await.is_ok());
        let totals = proxy.totals();
        assert_eq!(totals.partitions.load(Ordering::Relaxed), 1);
        assert_eq!(totals.partitioned.load(Ordering::Relaxed), 1);
    }

    /// An echo server on loopback: its address.
    async fn echo() -> SocketAddr {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((len, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..len], from).await;
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_faults_order_holds_and_a_dropped_proxy_relays_nothing() {
        let proxy = FaultProxy::start(echo().await, 5, FaultPlan::default(), FaultPlan::default())
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy.addr()).await.unwrap();
        for i in 0u32..200 {
            client.send(&i.to_le_bytes()).await.unwrap();
        }
        let mut buf = [0u8; 16];
        for i in 0u32..200 {
            let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("echoed")
                .unwrap();
            assert_eq!(&buf[..len], i.to_le_bytes(), "in the order sent");
        }
        drop(proxy);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = client.send(b"after").await;
        let late = tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await;
        assert!(
            late.is_err() || late.unwrap().is_err(),
            "nothing relayed once dropped"
        );
    }

    #[test]
    fn random_partitions_replay_from_the_seed_within_their_ranges() {
        let plan = RandomPartitions {
            gap: (Duration::from_millis(500), Duration::from_secs(2)),
            length: (Duration::from_secs(1), Duration::from_secs(5)),
            one_way: 0.5,
        };
        let drawn = plan.schedule(9, 200);
        assert_eq!(drawn, plan.schedule(9, 200), "replayable from the seed");
        assert_eq!(
            drawn[..50],
            plan.schedule(9, 50)[..],
            "a prefix of a longer draw"
        );
        assert_ne!(drawn, plan.schedule(10, 200));
        for p in &drawn {
            assert!((plan.gap.0..=plan.gap.1).contains(&p.after), "{p:?}");
            assert!((plan.length.0..=plan.length.1).contains(&p.length), "{p:?}");
        }
        let both = drawn.iter().filter(|p| p.cut == Cut::Both).count();
        let to_router = drawn.iter().filter(|p| p.cut == Cut::ToRouter).count();
        assert!((60..140).contains(&both), "about half both ways: {both}");
        assert!((20..80).contains(&to_router), "{to_router}");
    }

    /// Polls until the proxy has started `count` partitions; when it saw it. Counting
    /// cannot miss a partition that a slow poll would (the count only grows).
    async fn until_partitions(proxy: &FaultProxy, count: u64) -> Instant {
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while proxy.totals().partitions.load(Ordering::Relaxed) < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited.await.expect("the schedule moves on");
        Instant::now()
    }

    #[tokio::test]
    async fn a_schedule_cuts_after_its_gaps_and_heals_when_done() {
        let proxy = FaultProxy::start(echo().await, 2, FaultPlan::default(), FaultPlan::default())
            .await
            .unwrap();
        let (gap, length) = (Duration::from_millis(100), Duration::from_millis(150));
        let begun = Instant::now();
        let partition = |cut| Scheduled {
            after: gap,
            length,
            cut,
        };
        proxy.partition_on_schedule(vec![partition(Cut::Both), partition(Cut::ToClient)]);
        // Sleeps end late, never early: only lower bounds hold on a loaded machine.
        assert!(until_partitions(&proxy, 1).await - begun >= gap);
        assert!(until_partitions(&proxy, 2).await - begun >= gap + length + gap);
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while proxy.is_partitioned() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited.await.expect("the last partition heals");
        assert!(begun.elapsed() >= 2 * (gap + length));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!proxy.is_partitioned(), "the schedule is over");
        assert_eq!(proxy.totals().partitions.load(Ordering::Relaxed), 2);

        // A stopped random schedule cuts no more, not even one that was about to.
        proxy.partition_at_random(RandomPartitions {
            gap: (Duration::ZERO, Duration::ZERO),
            length: (Duration::from_secs(60), Duration::from_secs(60)),
            one_way: 0.0,
        });
        until_partitions(&proxy, 3).await;
        proxy.stop_partitions();
        assert!(!proxy.is_partitioned());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!proxy.is_partitioned(), "stopped");
        assert_eq!(proxy.totals().partitions.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_bandwidth_cap_spaces_datagrams_out() {
        let plan = FaultPlan {
            bandwidth_bytes_per_s: 1_000_000,
            ..FaultPlan::default()
        };
        let mut lane = Lane::new(3, 0, Direction::ToClient, plan);
        let now = Instant::now();
        let waits: Vec<Duration> = (0..3).map(|_| lane.fate(1000, now, false).1).collect();
        // 1,000 bytes at 1 MB/s: 1 ms each, queued behind one another.
        assert_eq!(
            waits,
            [1, 2, 3].map(Duration::from_millis).to_vec(),
            "{waits:?}"
        );
    }
}
