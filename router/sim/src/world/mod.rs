//! The simulated world: the log, the router, the clients, the clock and the oracle, and
//! the seeded choice of what happens next.
//!
//! Layout: this file holds the state, the clock, the clients' side of the router's
//! outboxes and the step dispatch; `network` the clients' connections and the router's
//! background work (the writer's syncs, its durable reports, catch-up reads); `agents`
//! what the clients do; `crash` crashes and restarts; `drain` the fault-free end of a run.

use std::time::{Duration, Instant};

use swarmbus_proto::{ConnId, Lane, Now};
use swarmbus_schema::{decode, DecodeOptions, Message, OutFrame};

use crate::clients::{cast, Client};
use crate::log::SimLog;
use crate::oracle::{Broken, Oracle};
use crate::rng::SimRng;
use crate::router::{Io, Outboxes, SimRouter, CLASS_LANE_CAPACITY};
use crate::run::{Fault, Stats};
use crate::trace::Trace;

mod agents;
mod crash;
mod drain;
mod network;

/// The router clock's reading at the start of every run (Unix ms).
const UNIX_START_MS: u64 = 1_700_000_000_000;

/// The simulated clock: milliseconds since the run began. Instants are taken from one
/// base read once per run; the machines only ever compare them, so a run does not depend
/// on when it ran.
#[derive(Debug)]
struct SimClock {
    base: Instant,
    elapsed_ms: u64,
}

impl SimClock {
    fn now(&self) -> Now {
        let unix_ms = UNIX_START_MS + self.elapsed_ms;
        Now {
            instant: self.base + Duration::from_millis(self.elapsed_ms),
            unix_ms,
            wall_us: unix_ms * 1_000,
        }
    }
}

/// What may happen in one step, with its weight (out of their sum).
#[derive(Clone, Copy, Debug)]
enum StepKind {
    Advance,
    Sync,
    Notify,
    Read,
    Connect,
    Disconnect,
    Publish,
    Telemetry,
    Process,
    Ack,
    Lease,
    Submit,
    Work,
    JobAck,
    Cancel,
    Redrive,
    Crash,
}

const STEP_WEIGHTS: [(StepKind, u64); 17] = [
    (StepKind::Advance, 100),
    (StepKind::Sync, 80),
    (StepKind::Notify, 100),
    (StepKind::Read, 60),
    (StepKind::Connect, 40),
    (StepKind::Disconnect, 12),
    (StepKind::Publish, 110),
    (StepKind::Telemetry, 25),
    (StepKind::Process, 200),
    (StepKind::Ack, 50),
    (StepKind::Lease, 50),
    (StepKind::Submit, 40),
    (StepKind::Work, 80),
    (StepKind::JobAck, 20),
    (StepKind::Cancel, 6),
    (StepKind::Redrive, 6),
    (StepKind::Crash, 3),
];

/// See the module doc.
#[derive(Debug)]
pub struct World {
    pub seed: u64,
    rng: SimRng,
    clock: SimClock,
    pub log: SimLog,
    pub router: SimRouter,
    pub clients: Vec<Client>,
    pub oracle: Oracle,
    pub stats: Stats,
    pub trace: Trace,
    pub step: u64,
    next_conn: u64,
    next_payload: u64,
    fault: Option<Fault>,
    /// Controllers re-drive dead letters; the submitter acknowledges dead-letter notices
    /// (see [`crate::Config`]).
    /// A restart happened in this step: the restart checks run after it.
    restarted: bool,
}

impl World {
    pub fn new(config: &crate::run::Config) -> Self {
        let (seed, fault) = (config.seed, config.fault);
        let mut rng = SimRng::new(seed);
        let clock = SimClock {
            base: Instant::now(),
            elapsed_ms: 0,
        };
        let log = SimLog::default();
        let mut router = SimRouter::start(&log, clock.now(), rng.next_u64());
        router.danger_skip_stamp_check = fault == Some(Fault::SkipStampCheck);
        let lease_ttl_ms = [rng.between(150, 1_500), rng.between(150, 1_500)];
        World {
            seed,
            rng,
            clock,
            log,
            router,
            clients: cast(lease_ttl_ms),
            oracle: Oracle::default(),
            stats: Stats::default(),
            trace: Trace::new(config.trace),
            step: 0,
            next_conn: 1,
            next_payload: 1,
            fault,
            restarted: false,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now().unix_ms
    }

    /// One seeded step, traced, then the checks.
    pub fn step(&mut self) -> Result<(), Broken> {
        self.step += 1;
        let weights: Vec<u64> = STEP_WEIGHTS.iter().map(|(_, w)| *w).collect();
        let kind = self
            .rng
            .weighted(&weights)
            .map_or(StepKind::Advance, |at| STEP_WEIGHTS[at].0);
        let line = self.run_step(kind);
        self.trace.record(self.step, line);
        self.check()
    }

    fn run_step(&mut self, kind: StepKind) -> String {
        match kind {
            StepKind::Advance => self.advance(),
            StepKind::Sync => self.sync(),
            StepKind::Notify => self.notify(),
            StepKind::Read => self.read(),
            StepKind::Connect => self.connect_one(),
            StepKind::Disconnect => self.disconnect_one(),
            StepKind::Publish => self.publish(),
            StepKind::Telemetry => self.telemetry(),
            StepKind::Process => self.process(),
            StepKind::Ack => self.ack(),
            StepKind::Lease => self.lease(),
            StepKind::Submit => self.submit(),
            StepKind::Work => self.work(),
            StepKind::JobAck => self.job_ack(),
            StepKind::Cancel => self.cancel(),
            StepKind::Redrive => self.redrive(),
            StepKind::Crash => self.crash(),
        }
    }

    /// The invariants, after every step (and the restart ones after a restart).
    pub fn check(&mut self) -> Result<(), Broken> {
        crate::check::after_step(&mut self.oracle, &self.router, &self.log, &self.clients)?;
        if std::mem::take(&mut self.restarted) {
            crate::check::after_restart(&self.oracle, &self.router, &self.log, &self.clients)?;
        }
        Ok(())
    }

    /// Runs `input` on the router with the log, the clients' queues and the time now.
    fn drive<R>(&mut self, input: impl FnOnce(&mut SimRouter, &mut Io<'_>) -> R) -> R {
        let now = self.clock.now();
        let mut net = Net {
            clients: &mut self.clients,
            oracle: &mut self.oracle,
            now_ms: now.unix_ms,
        };
        let mut io = Io {
            log: &mut self.log,
            out: &mut net,
            now,
        };
        input(&mut self.router, &mut io)
    }

    /// A fresh payload for a publish of `agent`: unique in the run, so every op in the
    /// log names the publish it came from.
    fn payload(&mut self, agent: &str) -> bytes::Bytes {
        let n = self.next_payload;
        self.next_payload += 1;
        bytes::Bytes::from(format!("{agent}#{n}"))
    }
}

/// The clients' side of the router's outboxes: frames are decoded as a client would read
/// them, shown to the oracle, and queued by lane.
struct Net<'a> {
    clients: &'a mut [Client],
    oracle: &'a mut Oracle,
    now_ms: u64,
}

impl Net<'_> {
    fn queue(&mut self, to: ConnId, lane: Lane, frame: &OutFrame, bounded: bool) -> bool {
        let Some(client) = self.clients.iter_mut().find(|c| c.conn == Some(to)) else {
            return true; // a closed connection's outbox discards what it is given
        };
        let Some(message) = message_of(frame) else {
            let detail = format!("a frame for {} does not decode", client.agent);
            self.oracle
                .broke("every frame the router sends decodes", detail);
            return true;
        };
        if bounded && client.inbox.queued(lane) >= CLASS_LANE_CAPACITY {
            return false;
        }
        self.oracle.sent(client, to, &message, self.now_ms);
        client.inbox.push(lane, message, bounded)
    }
}

impl Outboxes for Net<'_> {
    fn push(&mut self, to: ConnId, lane: Lane, frame: OutFrame) {
        self.queue(to, lane, &frame, false);
    }

    fn try_push(&mut self, to: ConnId, lane: Lane, frame: OutFrame) -> bool {
        self.queue(to, lane, &frame, true)
    }

    fn queued(&self, to: ConnId, lane: Lane) -> usize {
        self.clients
            .iter()
            .find(|c| c.conn == Some(to))
            .map_or(0, |c| c.inbox.queued(lane))
    }

    fn is_open(&self, to: ConnId) -> bool {
        self.clients.iter().any(|c| c.conn == Some(to))
    }
}

/// The message a frame carries, decoded as the client library's reader does.
fn message_of(frame: &OutFrame) -> Option<Message> {
    let bytes = bytes::Bytes::from(frame.to_vec());
    decode(
        bytes.get(4..).map(|_| bytes.slice(4..))?,
        &DecodeOptions::default(),
    )
    .ok()
}

impl World {
    /// Moves the router's driver counts into the run's figures (before a crash drops the
    /// router, and at the end).
    fn absorb_driver_counts(&mut self) {
        let counts = std::mem::take(&mut self.router.counts);
        self.stats.lagging += counts.lagging;
        self.stats.redeliveries += counts.redeliveries;
        self.stats.catch_up_reads += counts.catch_up_reads;
    }

    /// The run's report, once it passed.
    pub fn report(&mut self) -> crate::run::Report {
        self.absorb_driver_counts();
        let mut stats = self.stats.clone();
        stats.lease_grants = self.oracle.lease_grants;
        stats.stamps_accepted = self.oracle.stamps_accepted;
        stats.stamps_refused = self.oracle.stamps_refused;
        stats.jobs_submitted = self.oracle.jobs_durable;
        stats.jobs_finished = self.oracle.jobs_finished;
        stats.jobs_dead_lettered = self.oracle.jobs_dead_lettered;
        crate::run::Report {
            seed: self.seed,
            steps: self.step,
            stats,
            trace_hash: self.trace.hash(),
        }
    }
}
