//! The replicated backend: each swarm's ordered log in a NATS JetStream stream (see
//! `swarmbus-jetstream` for the append protocol), and [`SplitLog`], which keeps the
//! router's own swarms (`$...`: control, pins, jobs) in the embedded log beside it.
//!
//! Each swarm has an appender task on the shard's runtime: it takes the swarm's appends in
//! op order, pipelines them to the stream and reports [`LogEvent::Durable`] as the stream
//! acknowledges them, [`LogEvent::Conflict`] when another router took an op id first, or
//! [`LogEvent::Failed`] from the first op it could not make durable within
//! `jetstream.append_deadline_ms` (the swarm is then unavailable and recovers with void
//! records, as with the embedded log). A follower task per swarm reads the stream as it
//! grows and reports each op, this router's and other routers', as [`LogEvent::Followed`]:
//! that is how ops appended through another router reach this router's subscribers.
//!
//! Routers share a swarm through its stream: before a swarm takes ordered requests on a
//! router, the router opens its stream ([`LogBackend::open_shared`]: found, or made with the
//! epoch this router proposes when no router made it yet), so every router serves the
//! swarm with the stream's epoch and ops.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use swarmbus_jetstream::{Append, Cluster, Error as StreamError, SwarmInfo, SwarmStream};
use swarmbus_schema::{Epoch, OpId};
use tokio::sync::mpsc;

use super::record::{parse_record, ParseError};
use super::store::RemoteRead;
use super::{
    is_internal, void_record, Compacted, LogBackend, LogError, LogEvent, LogState, ReadFailed,
    ReadPlan, Record, RecordParts, ShardLog, SharedLog,
};

/// How long one read from a stream may take before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Appends one appender takes from its queue at once.
const APPEND_BATCH: usize = 1024;
/// A Durable event is sent at least every this many ops of a batch.
const DURABLE_EVERY: u64 = 64;
/// Longest pause between a follower's tries to find or follow its swarm's stream.
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(2);
/// A follow silent this long while the stream holds ops it has not yielded is started
/// again (an ordered consumer notices a lost leader only after two missed 15 s
/// heartbeats, and the swarm's acknowledgements wait for the follow). This router's
/// acknowledged appends are known without asking; the stream's end is asked after five
/// silences, then less and less often while the follow is caught up (at most every 5 min).
const FOLLOW_STALL: Duration = Duration::from_secs(1);

/// The swarms of one shard whose logs are JetStream streams.
#[derive(Debug)]
pub struct JetStreamLog {
    cluster: Cluster,
    runtime: tokio::runtime::Handle,
    events: mpsc::UnboundedSender<LogEvent>,
    swarms: HashMap<Arc<str>, StreamSwarm>,
    /// Streams opened by [`LogBackend::open_shared`], until [`LogBackend::on_opened`]
    /// installs them.
    opened: Arc<Mutex<HashMap<Arc<str>, SwarmStream>>>,
}

#[derive(Debug)]
struct StreamSwarm {
    epoch: Epoch,
    durable: OpId,
    /// Ops up to here are not in the stream (removed by its limits).
    horizon: OpId,
    bytes: u64,
    generation: u64,
    appends: mpsc::UnboundedSender<Queued>,
    /// The stream, once the appender opened it (reads open their own until then).
    stream: Arc<OnceLock<SwarmStream>>,
}

#[derive(Debug)]
struct Queued {
    generation: u64,
    append: Append,
}

impl JetStreamLog {
    /// The shard's swarms found in the cluster at start (`recovered`); call on the runtime
    /// the shard runs on.
    pub fn new(
        cluster: Cluster,
        recovered: Vec<SwarmInfo>,
        events: mpsc::UnboundedSender<LogEvent>,
    ) -> Self {
        let mut log = JetStreamLog {
            cluster,
            runtime: tokio::runtime::Handle::current(),
            events,
            swarms: HashMap::new(),
            opened: Arc::default(),
        };
        for info in recovered {
            let swarm: Arc<str> = Arc::from(info.swarm.as_str());
            let shared = SharedLog {
                epoch: Epoch(info.epoch),
                last_op: OpId(info.last_op),
                first_op: OpId(info.first_op),
                bytes: info.bytes,
            };
            let state = log.start_swarm(&swarm, &shared, None);
            log.swarms.insert(swarm, state);
        }
        log
    }

    /// The swarm's state, its appender, and its follower from the op after `log.last_op`.
    fn start_swarm(
        &self,
        swarm: &Arc<str>,
        log: &SharedLog,
        opened: Option<SwarmStream>,
    ) -> StreamSwarm {
        let (appends, queue) = mpsc::unbounded_channel();
        let stream = Arc::new(OnceLock::new());
        if let Some(opened) = opened {
            let _ = stream.set(opened);
        }
        let acknowledged = Arc::new(AtomicU64::new(log.last_op.0));
        self.runtime.spawn(run_appender(
            self.cluster.clone(),
            swarm.clone(),
            log.epoch,
            queue,
            stream.clone(),
            self.events.clone(),
            acknowledged.clone(),
        ));
        self.runtime.spawn(run_follower(
            self.cluster.clone(),
            swarm.clone(),
            log.last_op.0 + 1,
            stream.clone(),
            self.events.clone(),
            acknowledged,
        ));
        StreamSwarm {
            epoch: log.epoch,
            durable: log.last_op,
            horizon: OpId(log.first_op.0.saturating_sub(1)),
            bytes: log.bytes,
            generation: 0,
            appends,
            stream,
        }
    }

    fn queue(
        &mut self,
        swarm: &Arc<str>,
        op: OpId,
        record: bytes::Bytes,
        filler: bool,
    ) -> Result<(), LogError> {
        let state = self
            .swarms
            .get_mut(swarm)
            .ok_or_else(|| LogError::NotCreated {
                swarm: swarm.to_string(),
            })?;
        state.bytes += record.len() as u64;
        let queued = Queued {
            generation: state.generation,
            append: Append {
                op: op.0,
                record,
                filler,
            },
        };
        state.appends.send(queued).map_err(|_| LogError::Stopped)
    }
}

/// Takes `swarm`'s appends in order and makes them durable in its stream.
async fn run_appender(
    cluster: Cluster,
    swarm: Arc<str>,
    epoch: Epoch,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    opened: Arc<OnceLock<SwarmStream>>,
    events: mpsc::UnboundedSender<LogEvent>,
    acked_by_stream: Arc<AtomicU64>,
) {
    let mut batch: VecDeque<Queued> = VecDeque::with_capacity(APPEND_BATCH);
    let mut received = Vec::with_capacity(APPEND_BATCH);
    // Appends of a generation that failed are not made: the shard refuses them and writes
    // void records for their ops in the next generation.
    let mut failed_generation: Option<u64> = None;
    let fail = |from: u64, generation: u64, detail: String| {
        tracing::error!(%swarm, op = from, %detail, "a JetStream append failed");
        let _ = events.send(LogEvent::Failed {
            swarm: swarm.clone(),
            from: OpId(from),
            generation,
            detail,
            truncated: false,
        });
    };
    loop {
        if batch.is_empty() {
            if queue.recv_many(&mut received, APPEND_BATCH).await == 0 {
                return; // the shard is gone
            }
            batch.extend(received.drain(..));
        }
        batch.retain(|q| failed_generation.is_none_or(|failed| q.generation > failed));
        let Some(first) = batch.front() else {
            continue;
        };
        let (generation, first_op) = (first.generation, first.append.op);
        let same = batch
            .iter()
            .take_while(|q| q.generation == generation)
            .count();
        let run: Vec<Append> = batch.drain(..same).map(|q| q.append).collect();
        let stream = match opened.get() {
            Some(stream) => stream.clone(),
            None => match cluster.open(&swarm, epoch.0).await {
                Ok((stream, info)) if info.epoch == epoch.0 => {
                    let _ = opened.set(stream.clone());
                    stream
                }
                Ok((_, info)) => {
                    let detail = format!(
                        "the swarm's stream was started with another epoch ({:x}, not {:x}): \
                         another router created the swarm",
                        info.epoch, epoch.0
                    );
                    fail(first_op, generation, detail);
                    failed_generation = Some(generation);
                    continue;
                }
                Err(error) => {
                    fail(first_op, generation, error.to_string());
                    failed_generation = Some(generation);
                    continue;
                }
            },
        };
        let last_in_run = run.last().map_or(0, |a| a.op);
        let (mut reported, mut acknowledged) = (None, None);
        let result = stream
            .append_all(run, |op| {
                acknowledged = Some(op);
                acked_by_stream.fetch_max(op, Ordering::Relaxed);
                if op == last_in_run || op % DURABLE_EVERY == 0 {
                    reported = Some(op);
                    let _ = events.send(LogEvent::Durable {
                        swarm: swarm.clone(),
                        up_to: OpId(op),
                    });
                }
            })
            .await;
        if let Err(error) = result {
            // Every op the stream acknowledged is reported durable before the rest fail.
            if let Some(op) = acknowledged.filter(|&op| Some(op) != reported) {
                let _ = events.send(LogEvent::Durable {
                    swarm: swarm.clone(),
                    up_to: OpId(op),
                });
            }
            let from = acknowledged.map_or(first_op, |op| op + 1);
            failed_generation = Some(generation);
            if let StreamError::Conflict { op, .. } = error {
                // Another router's op is there: this generation's later appends were
                // chained to this one and fail with it (or are dropped here).
                tracing::debug!(%swarm, op, "another router took the op id first");
                let _ = events.send(LogEvent::Conflict {
                    swarm: swarm.clone(),
                    from: OpId(op),
                    generation,
                });
            } else {
                fail(from, generation, error.to_string());
            }
        }
    }
}

/// Reads `swarm`'s stream from op `next` on, for ever, reporting each op in order as
/// [`LogEvent::Followed`]; waits for the stream to exist, and follows again after the op
/// it reported last when a follow fails. Ends once the shard is gone.
async fn run_follower(
    cluster: Cluster,
    swarm: Arc<str>,
    mut next: u64,
    opened: Arc<OnceLock<SwarmStream>>,
    events: mpsc::UnboundedSender<LogEvent>,
    acknowledged: Arc<AtomicU64>,
) {
    let initial = Duration::from_millis(50);
    // Silences (of FOLLOW_STALL each) before a follow behind the stream is started again:
    // doubles with each start that found nothing new (ops erased at the stream's end
    // leave it behind for good), back to one once an op comes.
    let mut patience = 1u32;
    let mut pause = initial;
    while !events.is_closed() {
        let stream = match opened.get() {
            Some(stream) => Some(stream.clone()),
            None => match cluster.existing(&swarm).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::debug!(%swarm, %error, "looking for the swarm's stream to follow");
                    None
                }
            },
        };
        let follower = match &stream {
            Some(stream) => stream.follow(next).await.map_err(|e| e.to_string()),
            None => Err("the stream does not exist yet".into()),
        };
        match follower {
            Ok(mut follower) => {
                pause = initial;
                let mut silences = 0u32;
                // Silences between two asks of the stream's end: doubles while the stream
                // says the follow is caught up (an idle swarm costs one ask per few
                // minutes), back to five once an op comes.
                let mut ask_every = 5u32;
                loop {
                    let item = match tokio::time::timeout(FOLLOW_STALL, follower.next()).await {
                        Ok(Some(item)) => item,
                        Ok(None) => break,
                        Err(_) => {
                            silences += 1;
                            if silences < patience {
                                continue;
                            }
                            let mut behind = acknowledged.load(Ordering::Relaxed) >= next;
                            if !behind && silences.is_multiple_of(ask_every) {
                                behind = match &stream {
                                    Some(s) => s.bounds().await.is_ok_and(|(_, last)| last >= next),
                                    None => false,
                                };
                                if !behind {
                                    ask_every = (ask_every * 2).min(300);
                                    silences = 0;
                                }
                            }
                            if behind {
                                tracing::debug!(%swarm, op = next, "the follow is behind the stream; following again");
                                patience = (patience * 2).min(30);
                                break;
                            }
                            continue;
                        }
                    };
                    silences = 0;
                    patience = 1;
                    ask_every = 5;
                    let followed = match item {
                        Ok(followed) => followed,
                        Err(error) => {
                            tracing::warn!(%swarm, op = next, %error, "following the swarm's stream; following again");
                            break;
                        }
                    };
                    if followed.op < next {
                        continue;
                    }
                    next = followed.op + 1;
                    let record = match parse_whole(&followed.record) {
                        Ok(record) if record.op.0 == followed.op => record,
                        Ok(record) => {
                            tracing::error!(%swarm, op = followed.op, holds = record.op.0, "a message of the swarm's stream holds another op; skipped");
                            continue;
                        }
                        Err(reason) => {
                            tracing::error!(%swarm, op = followed.op, %reason, "a message of the swarm's stream is not a record; skipped");
                            continue;
                        }
                    };
                    let event = LogEvent::Followed {
                        swarm: swarm.clone(),
                        record,
                        own: followed.own,
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%swarm, op = next, %error, "following the swarm's stream")
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(FOLLOW_RETRY_MAX);
    }
}

impl LogBackend for JetStreamLog {
    fn swarms(&self) -> Vec<(Arc<str>, LogState)> {
        self.swarms
            .iter()
            .map(|(name, s)| {
                let state = LogState {
                    epoch: s.epoch,
                    last_op: s.durable,
                    unavailable: None,
                    bytes: s.bytes,
                };
                (name.clone(), state)
            })
            .collect()
    }

    /// In memory, and the swarm's appender; the appender creates the stream before the
    /// swarm's first append (a failure there fails that append).
    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError> {
        let new = SharedLog {
            epoch,
            last_op: OpId(0),
            first_op: OpId(1),
            bytes: 0,
        };
        let state = self.start_swarm(swarm, &new, None);
        self.swarms.insert(swarm.clone(), state);
        Ok(())
    }

    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError> {
        self.queue(swarm, op, record.to_bytes(), false)
    }

    /// Appends wait in their swarm's queue, never in the shard.
    fn backlog(&self) -> usize {
        0
    }

    fn flush_backlog(&mut self) -> Result<usize, LogError> {
        Ok(0)
    }

    fn plan_read(&self, swarm: &str, from: OpId) -> Option<ReadPlan> {
        let state = self.swarms.get(swarm)?;
        let reader = StreamRead {
            cluster: self.cluster.clone(),
            runtime: self.runtime.clone(),
            swarm: swarm.to_owned(),
            stream: state.stream.clone(),
            durable: state.durable,
        };
        Some(ReadPlan::remote(from, Arc::new(reader)))
    }

    fn has_segment(&self, _swarm: &str, _path: &Path) -> bool {
        false
    }

    fn horizon(&self, swarm: &str) -> OpId {
        self.swarms.get(swarm).map_or(OpId(0), |s| s.horizon)
    }

    /// The streams keep every op: nothing to compact here.
    fn maintain(&mut self, _now_ms: u64) {}

    fn on_compacted(&mut self, _swarm: &Arc<str>, _result: Result<Compacted, String>) {}

    fn on_durable(&mut self, swarm: &str, up_to: OpId) {
        if let Some(state) = self.swarms.get_mut(swarm) {
            state.durable = state.durable.max(up_to);
        }
    }

    fn on_failed(&mut self, swarm: &str, _from: OpId, generation: u64) -> bool {
        let Some(state) = self.swarms.get_mut(swarm) else {
            return true;
        };
        if generation != state.generation {
            return false;
        }
        state.generation += 1;
        true
    }

    fn exists(&self, swarm: &str) -> bool {
        self.swarms.contains_key(swarm)
    }

    fn generation(&self, swarm: &str) -> u64 {
        self.swarms.get(swarm).map_or(0, |s| s.generation)
    }

    fn append_voids(
        &mut self,
        swarm: &Arc<str>,
        from: OpId,
        to: OpId,
        now_ms: u64,
    ) -> Result<(), LogError> {
        let epoch = match self.swarms.get(swarm) {
            Some(state) => state.epoch,
            None => return Err(LogError::Stopped),
        };
        for op in from.0..=to.0 {
            let void = void_record(epoch, OpId(op), now_ms);
            self.queue(swarm, OpId(op), void.to_bytes(), true)?;
        }
        Ok(())
    }

    fn needs_open(&self, swarm: &str) -> bool {
        !self.swarms.contains_key(swarm)
    }

    fn is_shared(&self, swarm: &str) -> bool {
        self.swarms.contains_key(swarm)
    }

    fn open_shared(&mut self, swarm: &Arc<str>, epoch: Epoch) {
        let (cluster, events, opened) = (
            self.cluster.clone(),
            self.events.clone(),
            self.opened.clone(),
        );
        let swarm = swarm.clone();
        self.runtime.spawn(async move {
            let result =
                match tokio::time::timeout(READ_TIMEOUT, cluster.open(&swarm, epoch.0)).await {
                    Err(_) => Err(format!(
                        "opening the swarm's stream: no answer within {READ_TIMEOUT:?}"
                    )),
                    Ok(Err(error)) => Err(error.to_string()),
                    Ok(Ok((stream, info))) => {
                        opened
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .insert(swarm.clone(), stream);
                        Ok(SharedLog {
                            epoch: Epoch(info.epoch),
                            last_op: OpId(info.last_op),
                            first_op: OpId(info.first_op),
                            bytes: info.bytes,
                        })
                    }
                };
            let _ = events.send(LogEvent::Opened { swarm, result });
        });
    }

    fn on_opened(&mut self, swarm: &Arc<str>, log: &SharedLog) {
        let stream = self
            .opened
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(swarm);
        if !self.swarms.contains_key(swarm) {
            let state = self.start_swarm(swarm, log, stream);
            self.swarms.insert(swarm.clone(), state);
        }
    }

    fn on_conflict(&mut self, swarm: &str, generation: u64) -> bool {
        match self.swarms.get_mut(swarm) {
            Some(state) if state.generation == generation => {
                state.generation += 1;
                true
            }
            _ => false,
        }
    }
}

/// A read of one swarm's stream, up to the op durable when it was planned.
#[derive(Debug)]
struct StreamRead {
    cluster: Cluster,
    runtime: tokio::runtime::Handle,
    swarm: String,
    stream: Arc<OnceLock<SwarmStream>>,
    durable: OpId,
}

impl RemoteRead for StreamRead {
    fn read(
        &self,
        from: OpId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadFailed> {
        let failed = |detail: String| ReadFailed {
            path: format!("jetstream stream of swarm {:?}", self.swarm).into(),
            error: std::io::Error::other(detail),
        };
        if from > self.durable || max_records == 0 {
            return Ok(Vec::new());
        }
        let read = async {
            let stream = match self.stream.get() {
                Some(stream) => stream.clone(),
                None => match self.cluster.existing(&self.swarm).await {
                    Ok(Some(stream)) => stream,
                    Ok(None) => return Ok(Vec::new()),
                    Err(error) => return Err(error.to_string()),
                },
            };
            stream
                .read(from.0, self.durable.0, max_records, max_bytes)
                .await
                .map_err(|e| e.to_string())
        };
        let found = self
            .runtime
            .block_on(async { tokio::time::timeout(READ_TIMEOUT, read).await })
            .map_err(|_| failed(format!("no answer within {READ_TIMEOUT:?}")))?
            .map_err(failed)?;
        let mut out = Vec::with_capacity(found.len());
        for (op, bytes) in found {
            let record =
                parse_whole(&bytes).map_err(|reason| failed(format!("op {op}: {reason}")))?;
            if record.op.0 != op {
                return Err(failed(format!(
                    "the message at op {op} holds op {}",
                    record.op.0
                )));
            }
            out.push(record);
        }
        Ok(out)
    }
}

/// The backend of a router whose swarms' logs are on JetStream: the router's own swarms
/// (`$...`, read back at start from the disk) stay in the embedded log.
#[derive(Debug)]
pub struct SplitLog {
    pub embedded: ShardLog,
    pub streams: JetStreamLog,
}

impl SplitLog {
    fn of(&self, swarm: &str) -> &dyn LogBackend {
        if is_internal(swarm) {
            &self.embedded
        } else {
            &self.streams
        }
    }

    fn of_mut(&mut self, swarm: &str) -> &mut dyn LogBackend {
        if is_internal(swarm) {
            &mut self.embedded
        } else {
            &mut self.streams
        }
    }
}

impl LogBackend for SplitLog {
    fn swarms(&self) -> Vec<(Arc<str>, LogState)> {
        let mut all = self.embedded.swarms();
        all.extend(self.streams.swarms());
        all
    }

    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError> {
        self.of_mut(swarm).create(swarm, epoch)
    }

    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError> {
        self.of_mut(swarm).append(swarm, op, record)
    }

    fn backlog(&self) -> usize {
        self.embedded.backlog()
    }

    fn flush_backlog(&mut self) -> Result<usize, LogError> {
        self.embedded.flush_backlog()
    }

    fn plan_read(&self, swarm: &str, from: OpId) -> Option<ReadPlan> {
        self.of(swarm).plan_read(swarm, from)
    }

    fn has_segment(&self, swarm: &str, path: &Path) -> bool {
        self.of(swarm).has_segment(swarm, path)
    }

    fn horizon(&self, swarm: &str) -> OpId {
        self.of(swarm).horizon(swarm)
    }

    fn maintain(&mut self, now_ms: u64) {
        self.embedded.maintain(now_ms);
    }

    fn on_compacted(&mut self, swarm: &Arc<str>, result: Result<Compacted, String>) {
        self.of_mut(swarm).on_compacted(swarm, result)
    }

    fn on_durable(&mut self, swarm: &str, up_to: OpId) {
        self.of_mut(swarm).on_durable(swarm, up_to)
    }

    fn on_failed(&mut self, swarm: &str, from: OpId, generation: u64) -> bool {
        self.of_mut(swarm).on_failed(swarm, from, generation)
    }

    fn exists(&self, swarm: &str) -> bool {
        self.of(swarm).exists(swarm)
    }

    fn generation(&self, swarm: &str) -> u64 {
        self.of(swarm).generation(swarm)
    }

    fn append_voids(
        &mut self,
        swarm: &Arc<str>,
        from: OpId,
        to: OpId,
        now_ms: u64,
    ) -> Result<(), LogError> {
        self.of_mut(swarm).append_voids(swarm, from, to, now_ms)
    }

    fn needs_open(&self, swarm: &str) -> bool {
        self.of(swarm).needs_open(swarm)
    }

    fn is_shared(&self, swarm: &str) -> bool {
        self.of(swarm).is_shared(swarm)
    }

    fn open_shared(&mut self, swarm: &Arc<str>, epoch: Epoch) {
        self.of_mut(swarm).open_shared(swarm, epoch)
    }

    fn on_opened(&mut self, swarm: &Arc<str>, log: &SharedLog) {
        self.of_mut(swarm).on_opened(swarm, log)
    }

    fn on_conflict(&mut self, swarm: &str, generation: u64) -> bool {
        self.of_mut(swarm).on_conflict(swarm, generation)
    }
}

/// The record a stream's message holds (one whole record, nothing after it).
fn parse_whole(bytes: &bytes::Bytes) -> Result<Record, String> {
    match parse_record(bytes) {
        Ok((record, used)) if used == bytes.len() => Ok(record),
        Ok((_, used)) => Err(format!("{} bytes after the record", bytes.len() - used)),
        Err(ParseError::Incomplete { needed }) => Err(format!(
            "a cut-off record ({} bytes of {needed})",
            bytes.len()
        )),
        Err(ParseError::Corrupt { reason }) => Err(reason.to_string()),
    }
}
