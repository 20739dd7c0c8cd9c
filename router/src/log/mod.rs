//! The event log: the source of truth for coordination.
//!
//! - [`record`]: the record format (length, CRC32C, epoch, op, timestamp, class, key, frame),
//!   defined in the protocol crate and re-exported here.
//! - [`store`]: per-swarm segmented files, sparse index, recovery and reads.
//! - [`writer`]: the writer thread with group commit (io_uring or plain file backend).
//! - [`disk`]: the seam between the writers and the disk, and a disk that fails on demand
//!   (ENOSPC, EIO, short writes, slow syncs, power loss) for tests.
//! - [`compact`]: compaction (latest record per key, age limits) and size retention.
//!
//! The router uses the log through [`LogBackend`]; [`ShardLog`] is the embedded
//! implementation (one per shard, all sharing one writer thread). A replicated backend on an
//! existing distributed engine can implement the same trait later.

pub mod compact;
pub mod disk;
pub mod jetstream;
pub mod store;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use swarmbus_schema::{Epoch, OpId};
use thiserror::Error;

pub use compact::{Compacted, Retention};
pub use record::{encode_record, is_internal, Record, RecordParts};
pub use store::{recover_all, ReadFailed, ReadPlan, RecoveryNote, SwarmLog};
/// The record format is the protocol crate's: the routing core builds records, the log stores them.
pub use swarmbus_proto::record;
pub use writer::{LogEvent, LogWriter, WriterKind};

/// When appends are made durable. A publisher's command is acknowledged once it is durable
/// under this policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum SyncPolicy {
    /// fdatasync before acknowledging, one sync per file per group commit (default).
    Always,
    /// Acknowledge once written; fdatasync every N ms. A crash can lose the last N ms.
    IntervalMs(u64),
    /// Never sync; the OS writes back when it likes. A crash can lose anything recent.
    NeverDanger,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "never_danger" => Ok(SyncPolicy::NeverDanger),
            other => match other.strip_prefix("interval_ms:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(SyncPolicy::IntervalMs(ms)),
                _ => Err(format!(
                    "log.sync {other:?}: expected always, interval_ms:N (N > 0) or never_danger"
                )),
            },
        }
    }
}

impl From<SyncPolicy> for String {
    fn from(value: SyncPolicy) -> String {
        match value {
            SyncPolicy::Always => "always".into(),
            SyncPolicy::IntervalMs(ms) => format!("interval_ms:{ms}"),
            SyncPolicy::NeverDanger => "never_danger".into(),
        }
    }
}

impl TryFrom<String> for SyncPolicy {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncPolicy::Always => f.write_str("always"),
            SyncPolicy::IntervalMs(ms) => write!(f, "interval_ms:{ms}"),
            SyncPolicy::NeverDanger => f.write_str("never_danger"),
        }
    }
}

/// Errors of the log. `Unavailable` is per swarm (others are served); `Io`, `NotCreated`
/// and `Stopped` mean the request was not carried out and will not be.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("swarm {swarm:?} is unavailable: {reason}")]
    Unavailable { swarm: String, reason: String },
    #[error("event log I/O for swarm {swarm:?}")]
    Io {
        swarm: String,
        #[source]
        source: std::io::Error,
    },
    /// An append to a swarm whose log the shard never created (a bug in the caller).
    #[error("append to swarm {swarm:?}, whose log was never created")]
    NotCreated { swarm: String },
    #[error("the event log writer has stopped")]
    Stopped,
}

/// What the log knows of a swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogState {
    pub epoch: Epoch,
    pub last_op: OpId,
    /// Set when the swarm's log is damaged; such a swarm is not served.
    pub unavailable: Option<String>,
    /// Bytes of its segments on disk.
    pub bytes: u64,
}

/// A swarm's log shared with other routers, as found or made by
/// [`LogBackend::open_shared`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLog {
    pub epoch: Epoch,
    pub last_op: OpId,
    /// Ops before it were removed by the log's limits.
    pub first_op: OpId,
    pub bytes: u64,
}

/// The log as a shard sees it. Appends complete asynchronously: the backend reports
/// [`LogEvent::Durable`] (or `Failed`) on the shard's event channel.
pub trait LogBackend: Send {
    /// Every swarm the log holds, with its state (after recovery).
    fn swarms(&self) -> Vec<(Arc<str>, LogState)>;
    /// Starts the log of a new swarm with `epoch`.
    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError>;
    /// Appends op `op` (the next one of the swarm). Never waits: when the writer's queue is
    /// full the append is held in order (see [`LogBackend::backlog`]).
    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError>;
    /// Appends held because the writer's queue was full.
    fn backlog(&self) -> usize;
    /// Offers the held appends to the writer again, in order, as far as its queue takes
    /// them. Returns how many are still held.
    fn flush_backlog(&mut self) -> Result<usize, LogError>;
    /// Plans a read of records from op `from` on, to be carried out off the shard (the file
    /// reads of [`ReadPlan::read`] may block on the disk); `None` when the swarm has no log.
    fn plan_read(&self, swarm: &str, from: OpId) -> Option<ReadPlan>;
    /// Whether `path` is still one of `swarm`'s segments (a planned read that found its file
    /// gone raced a compaction or retention and may be planned again).
    fn has_segment(&self, swarm: &str, path: &Path) -> bool;
    /// Ops of `swarm` up to here were compacted or removed by retention.
    fn horizon(&self, swarm: &str) -> OpId;
    /// Starts background compaction and applies retention where due. Results come back as
    /// [`LogEvent::Compacted`] on the shard's event channel.
    fn maintain(&mut self, now_ms: u64);
    /// Installs a finished compaction (from [`LogEvent::Compacted`]).
    fn on_compacted(&mut self, swarm: &Arc<str>, result: Result<Compacted, String>);
    /// The writer reported `swarm` durable up to `up_to` (from [`LogEvent::Durable`]).
    fn on_durable(&mut self, swarm: &str, up_to: OpId);
    /// The writer reported a failed append of `swarm` from op `from` in `generation` (from
    /// [`LogEvent::Failed`]). Returns whether it is news: the log forgets the ops from
    /// `from` on (the next append cuts the file back there first); a report of an earlier
    /// generation, already handled, returns false.
    fn on_failed(&mut self, swarm: &str, from: OpId, generation: u64) -> bool;
    /// Whether the log of `swarm` exists (was created, or recovered at start).
    fn exists(&self, swarm: &str) -> bool;
    /// The swarm's current write generation (0 for a swarm without a log).
    fn generation(&self, swarm: &str) -> u64;
    /// Appends void records for ops `from..=to` (refused ops whose bytes were cut off), so
    /// the log stays gap-free and op ids are never given out twice. Void records hold no
    /// frame: they are never delivered, replayed or read back as anything.
    fn append_voids(
        &mut self,
        swarm: &Arc<str>,
        from: OpId,
        to: OpId,
        now_ms: u64,
    ) -> Result<(), LogError>;
    /// Whether `swarm`'s log is shared with other routers and not open here yet: the shard
    /// then opens it ([`LogBackend::open_shared`]) before the swarm takes ordered
    /// requests, so that every router serves it with the same epoch and ops.
    fn needs_open(&self, _swarm: &str) -> bool {
        false
    }
    /// Whether `swarm`'s log is shared with other routers (its ops then come back as
    /// [`LogEvent::Followed`], which is what makes them durable for the shard).
    fn is_shared(&self, _swarm: &str) -> bool {
        false
    }
    /// Finds `swarm`'s shared log, or makes it with `epoch` when no router has; reported as
    /// [`LogEvent::Opened`]. Only for a swarm [`LogBackend::needs_open`] names.
    fn open_shared(&mut self, _swarm: &Arc<str>, _epoch: Epoch) {}
    /// Installs what [`LogEvent::Opened`] reported: the swarm's appends and reads go to the
    /// shared log from now on, and its ops come as [`LogEvent::Followed`].
    fn on_opened(&mut self, _swarm: &Arc<str>, _log: &SharedLog) {}
    /// A shared log: another router took op ids of `swarm` that this router's appends of
    /// `generation` were for (reported by [`LogEvent::Conflict`], or seen in
    /// [`LogEvent::Followed`]). Returns whether it is news; the appends of that generation
    /// still queued are dropped.
    fn on_conflict(&mut self, _swarm: &str, _generation: u64) -> bool {
        false
    }
}

/// The embedded log of one shard: the swarms hashed to it, appending through the shared
/// writer thread.
#[derive(Debug)]
pub struct ShardLog {
    shard: usize,
    log_dir: PathBuf,
    segment_bytes: u64,
    writer: LogWriter,
    swarms: HashMap<Arc<str>, SwarmLog>,
    retention: Retention,
    /// This shard's event channel, where finished compactions are reported.
    events: tokio::sync::mpsc::UnboundedSender<LogEvent>,
    /// Swarms with a compaction running.
    compacting: HashSet<Arc<str>>,
    /// Appends the writer's full queue did not take yet, in order.
    backlog: std::collections::VecDeque<writer::WriteRequest>,
}

impl ShardLog {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: usize,
        log_dir: &Path,
        segment_bytes: u64,
        writer: LogWriter,
        recovered: Vec<SwarmLog>,
        retention: Retention,
        events: tokio::sync::mpsc::UnboundedSender<LogEvent>,
    ) -> Self {
        ShardLog {
            shard,
            log_dir: log_dir.to_owned(),
            segment_bytes,
            writer,
            swarms: recovered
                .into_iter()
                .map(|log| (Arc::from(log.name.as_str()), log))
                .collect(),
            retention,
            events,
            compacting: HashSet::new(),
            backlog: std::collections::VecDeque::new(),
        }
    }
}

impl ShardLog {
    /// Reads durable records of `swarm` from op `from` on, bounded by count and bytes, on
    /// the calling thread (the shard reads through [`LogBackend::plan_read`], off its
    /// thread).
    pub fn read_from(
        &self,
        swarm: &str,
        from: OpId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError> {
        let Some(log) = self.swarms.get(swarm) else {
            return Ok(Vec::new());
        };
        log.read_from(from, max_records, max_bytes)
            .map_err(|source| LogError::Io {
                swarm: swarm.to_owned(),
                source,
            })
    }
}

impl LogBackend for ShardLog {
    fn swarms(&self) -> Vec<(Arc<str>, LogState)> {
        self.swarms
            .iter()
            .map(|(name, log)| {
                (
                    name.clone(),
                    LogState {
                        epoch: log.epoch,
                        last_op: log.last_op(),
                        unavailable: log.unavailable.clone(),
                        bytes: log.bytes(),
                    },
                )
            })
            .collect()
    }

    /// In memory only: the writer thread creates the directory before the swarm's first
    /// append (a failure there fails that append, like a failed write).
    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError> {
        let log = SwarmLog::new(&self.log_dir, swarm, epoch);
        self.swarms.insert(swarm.clone(), log);
        Ok(())
    }

    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError> {
        let log = self
            .swarms
            .get_mut(swarm)
            .ok_or_else(|| LogError::NotCreated {
                swarm: swarm.to_string(),
            })?;
        if let Some(reason) = &log.unavailable {
            return Err(LogError::Unavailable {
                swarm: swarm.to_string(),
                reason: reason.clone(),
            });
        }
        let (path, offset, new_file) = log.place(op, record.len() as u64, self.segment_bytes);
        let truncate_to = std::mem::take(&mut log.cut_before_next).then_some(offset);
        let create = (!std::mem::replace(&mut log.created, true)).then(|| Arc::new(log.new_dir()));
        let request = writer::WriteRequest {
            path,
            offset,
            record,
            new_file,
            shard: self.shard,
            swarm: swarm.clone(),
            op,
            generation: log.generation,
            truncate_to,
            create,
        };
        if !self.backlog.is_empty() {
            // Behind appends held already: in order, after them.
            self.backlog.push_back(request);
            return Ok(());
        }
        match self.writer.try_submit(request) {
            Ok(None) => Ok(()),
            Ok(Some(request)) => {
                self.backlog.push_back(request);
                Ok(())
            }
            Err(_) => Err(LogError::Stopped),
        }
    }

    fn backlog(&self) -> usize {
        self.backlog.len()
    }

    fn flush_backlog(&mut self) -> Result<usize, LogError> {
        while let Some(request) = self.backlog.pop_front() {
            match self.writer.try_submit(request) {
                Ok(None) => {}
                Ok(Some(request)) => {
                    self.backlog.push_front(request);
                    break;
                }
                Err(_) => {
                    self.backlog.clear();
                    return Err(LogError::Stopped);
                }
            }
        }
        Ok(self.backlog.len())
    }

    fn plan_read(&self, swarm: &str, from: OpId) -> Option<ReadPlan> {
        self.swarms.get(swarm).map(|log| log.plan_read(from))
    }

    fn has_segment(&self, swarm: &str, path: &Path) -> bool {
        self.swarms
            .get(swarm)
            .is_some_and(|log| log.has_segment(path))
    }

    fn horizon(&self, swarm: &str) -> OpId {
        self.swarms.get(swarm).map_or(OpId(0), |log| log.horizon)
    }

    fn maintain(&mut self, now_ms: u64) {
        for (name, log) in &mut self.swarms {
            if log.unavailable.is_some() {
                continue;
            }
            let gone = compact::enforce_max_bytes(log, &self.retention);
            remove_off_thread(name, &log.dir, gone);
            // One compaction per shard at a time bounds the threads and memory it uses.
            if !self.compacting.is_empty() {
                continue;
            }
            let Some(job) = compact::plan(log, &self.retention, now_ms, name) else {
                continue;
            };
            self.compacting.insert(name.clone());
            let events = self.events.clone();
            // Compaction reads and writes whole segments: a thread of its own, so neither
            // the shard nor the writer waits for it. A panic is reported like an error, so
            // the swarm is not left marked as compacting.
            let spawned = std::thread::Builder::new()
                .name("swarmbus-compaction".into())
                .spawn(move || {
                    let result = std::panic::catch_unwind(|| compact::run(&job))
                        .map_err(|_| "compaction panicked".to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = events.send(LogEvent::Compacted {
                        swarm: job.swarm.clone(),
                        result,
                    });
                });
            if spawned.is_err() {
                self.compacting.remove(name);
            }
        }
    }

    fn on_durable(&mut self, swarm: &str, up_to: OpId) {
        if let Some(log) = self.swarms.get_mut(swarm) {
            log.durable(up_to);
        }
    }

    fn on_failed(&mut self, swarm: &str, from: OpId, generation: u64) -> bool {
        let Some(log) = self.swarms.get_mut(swarm) else {
            return true;
        };
        if generation != log.generation {
            return false;
        }
        if log.durable_op.is_none() {
            // Nothing of the swarm was ever durable: its directory may not exist (its
            // creation may be what failed), so the next append creates it again.
            log.created = false;
        }
        let Some(dropped) = log.roll_back(from) else {
            return true;
        };
        // Segments begun after the failed op (two rolls within the ops in flight: rare):
        // their files go, so recovery never finds them after the cut.
        let removed = !dropped.is_empty();
        for path in dropped {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(path = %path.display(), %error, "removing a segment begun after a failed append");
                }
            }
        }
        if removed {
            if let Err(error) = std::fs::File::open(&log.dir).and_then(|d| d.sync_all()) {
                tracing::error!(dir = %log.dir.display(), %error, "syncing a swarm's log directory");
            }
        }
        true
    }

    fn exists(&self, swarm: &str) -> bool {
        self.swarms.contains_key(swarm)
    }

    fn generation(&self, swarm: &str) -> u64 {
        self.swarms.get(swarm).map_or(0, |log| log.generation)
    }

    fn append_voids(
        &mut self,
        swarm: &Arc<str>,
        from: OpId,
        to: OpId,
        now_ms: u64,
    ) -> Result<(), LogError> {
        let epoch = match self.swarms.get(swarm) {
            Some(log) => log.epoch,
            None => return Err(LogError::Stopped),
        };
        for op in from.0..=to.0 {
            self.append(swarm, OpId(op), void_record(epoch, OpId(op), now_ms))?;
        }
        Ok(())
    }

    fn on_compacted(&mut self, swarm: &Arc<str>, result: Result<Compacted, String>) {
        self.compacting.remove(swarm);
        let Some(log) = self.swarms.get_mut(swarm) else {
            return;
        };
        match result {
            Ok(done) => {
                let (before, after) = (done.records_before, done.records_after);
                match compact::install(log, done, &self.retention) {
                    Ok(gone) => {
                        tracing::info!(
                            %swarm, records_before = before, records_after = after, files_deleted = gone.len(),
                            horizon = log.horizon.0, "log compacted"
                        );
                        remove_off_thread(swarm, &log.dir, gone);
                    }
                    Err(output) => {
                        // Rare (the log changed under the compaction), and the name may be
                        // written again by the next compaction: deleted here and now.
                        if let Err(error) = compact::remove_files(&log.dir, &[output]) {
                            tracing::error!(%swarm, %error, "removing a compaction's discarded output failed");
                        }
                    }
                }
            }
            Err(error) => tracing::error!(%swarm, %error, "log compaction failed; will retry"),
        }
    }
}

/// The void record of op `op`: no frame, so never delivered, replayed or read back as
/// anything; it keeps the log gap-free where an op was refused.
pub fn void_record(epoch: Epoch, op: OpId, now_ms: u64) -> RecordParts {
    encode_record(
        epoch,
        op,
        now_ms,
        swarmbus_schema::Class::Command,
        b"",
        bytes::Bytes::new(),
        bytes::Bytes::new(),
    )
}

/// Deletes the files `swarm`'s log no longer holds on the blocking pool, so that neither
/// the shard nor its other swarms wait for the unlinks and the directory sync (inline when
/// called outside a runtime, as in the log's own tests).
fn remove_off_thread(swarm: &str, dir: &Path, paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    let (swarm, dir) = (swarm.to_owned(), dir.to_owned());
    let remove = move || {
        if let Err(error) = compact::remove_files(&dir, &paths) {
            tracing::error!(%swarm, %error, "deleting segments the log no longer holds failed");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(remove)),
        Err(_) => remove(),
    }
}

#[cfg(test)]
mod tests;
