//! The log writer thread: appends with group commit.
//!
//! Shards send [`WriteRequest`]s through a bounded crossbeam channel. The writer takes every
//! request waiting (up to a batch budget), coalesces them per file into one buffer, writes
//! each buffer with one positional write, makes the touched files durable under the sync
//! policy with one `fdatasync` each (all pending appends, one sync), and then reports, per
//! shard and swarm, the highest op that is now durable.
//!
//! Two backends pass the same tests: io_uring through tokio-uring (writes and syncs of all
//! touched files in flight at once), and plain positional file I/O. The io_uring one is
//! picked when the kernel allows it; otherwise the plain one, logged once.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use rustc_hash::FxHashMap;
use swarmbus_schema::{Epoch, OpId};
use tokio::sync::mpsc::UnboundedSender;

use super::disk::{Disk, DiskOp};
use super::record::RecordParts;
use super::SyncPolicy;

/// Requests taken per group commit.
const BATCH_REQUESTS: usize = 8192;
/// Bytes taken per group commit (soft: one record may exceed it).
const BATCH_BYTES: usize = 16 << 20;
/// Open files kept per writer; past this the least recently used are closed.
const MAX_OPEN_FILES: usize = 1024;

/// One record to append at a known position.
#[derive(Debug)]
pub struct WriteRequest {
    pub path: Arc<PathBuf>,
    pub offset: u64,
    pub record: RecordParts,
    /// Whether this record starts a new file (its directory entry must be synced too).
    pub new_file: bool,
    pub shard: usize,
    pub swarm: Arc<str>,
    pub op: OpId,
    /// The swarm's write generation: it moves on after each failure, and the writer refuses
    /// requests of a generation that failed (they were placed after the failed bytes).
    pub generation: u64,
    /// Cut the file to this length before writing (the first write after a failure: the
    /// failed bytes may still be there, and must never be read back).
    pub truncate_to: Option<u64>,
    /// The swarm's first append: create its log directory first (done here, not on the
    /// shard, whose other swarms must not wait for four syncs).
    pub create: Option<Arc<super::store::NewSwarmDir>>,
}

/// What the writer reports to a shard.
#[derive(Debug)]
pub enum LogEvent {
    /// Every op of `swarm` up to `up_to` is durable under the sync policy.
    Durable { swarm: Arc<str>, up_to: OpId },
    /// Writing failed; the ops from `from` on are not durable and never will be. The writer
    /// cut the files back to the last durable record (when it could: `truncated`), and
    /// refuses the swarm's later requests of `generation`.
    Failed {
        swarm: Arc<str>,
        from: OpId,
        generation: u64,
        detail: String,
        truncated: bool,
    },
    /// A background compaction of `swarm` finished.
    Compacted {
        swarm: Arc<str>,
        result: Result<super::Compacted, String>,
    },
    /// A log shared with other routers (see [`super::LogBackend::open_shared`]): op
    /// `record.op` of `swarm` as the shared log holds it, appended by this router (`own`)
    /// or by another one. Each swarm's ops come in op order.
    Followed {
        swarm: Arc<str>,
        record: super::Record,
        own: bool,
    },
    /// A shared log: another router took op `from` of `swarm` first, so this router's
    /// appends of `generation` from `from` on were not made (and never will be).
    Conflict {
        swarm: Arc<str>,
        from: OpId,
        generation: u64,
    },
    /// A shared log: `swarm`'s log was found or made (`Ok`: the epoch it was started with,
    /// its last op and its first), or could not be (`Err`).
    Opened {
        swarm: Arc<str>,
        result: Result<super::SharedLog, String>,
    },
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterKind {
    /// io_uring when available, else plain file I/O.
    Auto,
    Uring,
    File,
}

/// Handle to the writer thread. Dropping every clone stops the thread after it drained.
#[derive(Clone, Debug)]
pub struct LogWriter {
    requests: Sender<WriteRequest>,
    kind: WriterKind,
    metrics: Arc<LogMetrics>,
}

/// What a writer measured since it started, read at a scrape of `/metrics`. The writer
/// records once per group commit (one uncontended lock each), never per append.
#[derive(Debug)]
pub struct LogMetrics {
    /// A group commit, from taking its batch to reporting it (writes and syncs), µs.
    pub commit_us: std::sync::Mutex<swarmbus_proto::core::LagHistogram>,
    /// Appends per group commit.
    pub batch_appends: std::sync::Mutex<swarmbus_proto::core::LagHistogram>,
    /// One `fdatasync` of one file (with its directory's sync when the file is new), µs.
    pub fsync_us: std::sync::Mutex<swarmbus_proto::core::LagHistogram>,
    /// Bytes appended (records, before any compaction).
    pub appended_bytes: std::sync::atomic::AtomicU64,
}

impl LogMetrics {
    fn new() -> Self {
        LogMetrics {
            commit_us: std::sync::Mutex::new(swarmbus_proto::core::lag_histogram()),
            batch_appends: std::sync::Mutex::new(swarmbus_proto::core::lag_histogram()),
            fsync_us: std::sync::Mutex::new(swarmbus_proto::core::lag_histogram()),
            appended_bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records one sync that started at `started`.
    fn synced(&self, started: Instant) {
        let took = started.elapsed().as_micros().max(1) as u64;
        // A poisoned lock only held a histogram: go on with it.
        self.fsync_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(took);
    }
}

impl LogWriter {
    /// Starts the writer thread. `shards` receive the events of the requests they sent.
    /// `bulk`: the writer serves bulk work (job records) and runs at that priority (its
    /// io_uring workers with it); otherwise commands wait for it and it asks for short time
    /// slices. Its file operations go through `disk` (the real one but in tests).
    pub fn start(
        kind: WriterKind,
        policy: SyncPolicy,
        capacity: usize,
        shards: Vec<UnboundedSender<LogEvent>>,
        bulk: Option<crate::config::BulkPriority>,
        disk: Disk,
    ) -> std::io::Result<LogWriter> {
        let (tx, rx) = crossbeam::channel::bounded(capacity.max(1));
        let name = match bulk {
            Some(_) => "swarmbus-log-bulk",
            None => "swarmbus-log-writer",
        };
        let marks = match policy {
            SyncPolicy::Always => Some(start_watermarks(name)?),
            _ => None,
        };
        let metrics = Arc::new(LogMetrics::new());
        let mut state = WriterState::new(policy, shards, marks, metrics.clone(), disk);
        // The backend is chosen on the writer thread itself: io_uring runtimes cannot be
        // started (not even probed) from a thread that already runs tokio.
        let (chosen_tx, chosen_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                match bulk {
                    // Before the io_uring instance exists: its workers inherit the priority.
                    Some(priority) => crate::bulk::lower_thread_priority(priority),
                    // Commands wait for this thread: it preempts bulk work when it wakes.
                    None => {
                        crate::bulk::request_short_slice(crate::bulk::SHORT_SLICE);
                    }
                }
                let runtime = match kind {
                    WriterKind::File => None,
                    WriterKind::Uring | WriterKind::Auto => match uring_runtime() {
                        Ok(runtime) => Some(runtime),
                        Err(error) if kind == WriterKind::Uring => {
                            let _ = chosen_tx.send(Err(std::io::Error::other(format!(
                                "log.writer = \"uring\" but io_uring is unavailable: {error}"
                            ))));
                            return;
                        }
                        Err(error) => {
                            tracing::info!(%error, "io_uring unavailable; the event log uses plain file writes");
                            None
                        }
                    },
                };
                match runtime {
                    Some(runtime) => {
                        let _ = chosen_tx.send(Ok(WriterKind::Uring));
                        run_uring(&runtime, rx, &mut state)
                    }
                    None => {
                        let _ = chosen_tx.send(Ok(WriterKind::File));
                        run_file(rx, &mut state)
                    }
                }
            })?;
        let resolved = chosen_rx
            .recv()
            .map_err(|_| std::io::Error::other("the log writer thread died while starting"))??;
        Ok(LogWriter {
            requests: tx,
            kind: resolved,
            metrics,
        })
    }

    /// What this writer measured (group commits, bytes).
    pub fn metrics(&self) -> Arc<LogMetrics> {
        self.metrics.clone()
    }

    /// The backend in use (`Uring` or `File`).
    pub fn kind(&self) -> WriterKind {
        self.kind
    }

    /// Queues a request without waiting: a full queue gives it back (`Ok(Some)`), for the
    /// caller to hold and offer again (the writer drains the queue continuously and never
    /// waits on shards, so the wait is bounded by disk speed; it is the backpressure that
    /// slows publishers of logged classes).
    pub fn try_submit(&self, request: WriteRequest) -> Result<Option<WriteRequest>, WriterStopped> {
        match self.requests.try_send(request) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(request)) => Ok(Some(request)),
            Err(TrySendError::Disconnected(_)) => Err(WriterStopped),
        }
    }
}

impl std::str::FromStr for WriterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(WriterKind::Auto),
            "uring" => Ok(WriterKind::Uring),
            "file" => Ok(WriterKind::File),
            other => Err(format!(
                "log.writer {other:?}: expected auto, uring or file"
            )),
        }
    }
}

impl std::fmt::Display for WriterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriterKind::Auto => "auto",
            WriterKind::Uring => "uring",
            WriterKind::File => "file",
        })
    }
}

/// The writer thread is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStopped;

/// An io_uring runtime, proven to work with one real operation (a kernel can allow the
/// setup call while filtering the rest).
fn uring_runtime() -> std::io::Result<tokio_uring::Runtime> {
    let runtime = tokio_uring::Runtime::new(&tokio_uring::builder())?;
    runtime.block_on(async {
        let file = tokio_uring::fs::File::open("/dev/null").await?;
        file.close().await
    })?;
    Ok(runtime)
}

/// One file's share of a batch: contiguous bytes starting at `offset`.
struct FileBatch {
    path: Arc<PathBuf>,
    offset: u64,
    bytes: BytesMut,
    new_file: bool,
    truncate_to: Option<u64>,
}

/// Files of a batch that failed, with why.
type FailedFiles = HashMap<Arc<PathBuf>, String>;

/// What one batch did for one swarm of one shard.
struct SwarmReach<'a> {
    swarm: &'a Arc<str>,
    /// The highest op written (none when every write of the swarm failed).
    up_to: OpId,
    /// A file the swarm wrote (its directory holds the swarm's watermark), and its epoch.
    file: Option<(&'a Arc<PathBuf>, Epoch)>,
    /// The first op whose write failed, with why.
    failed: Option<(OpId, String)>,
}

/// Batch planning and completion bookkeeping shared by both backends.
struct WriterState {
    policy: SyncPolicy,
    shards: Vec<UnboundedSender<LogEvent>>,
    last_sync: Instant,
    /// Files written since the last sync (interval policy), each with whether it was
    /// created since (its directory is synced with it).
    unsynced: Vec<(Arc<PathBuf>, bool)>,
    /// Swarms whose appends failed, with the generation that failed: their later requests
    /// of that generation are not written.
    failed: FxHashMap<Arc<str>, u64>,
    /// The watermark thread (only under `always`: what is reported durable otherwise need
    /// not be synced): each swarm directory's highest durable op goes there.
    marks: Option<Sender<(PathBuf, Epoch, OpId)>>,
    metrics: Arc<LogMetrics>,
    /// When the batch being written was taken.
    batch_started: Instant,
    disk: Disk,
}

/// How long a durable op may wait to be in its swarm's watermark file. A watermark that
/// lags only narrows what recovery can tell was acknowledged.
const MARK_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the thread that keeps the swarms' durable watermarks (see
/// [`super::store::WATERMARK_FILE`]): it takes (directory, durable op) from the writer,
/// keeps the highest per directory, and writes and syncs the files every `MARK_INTERVAL`,
/// off the writer's thread so that appends never wait for these syncs. It writes what it
/// holds and stops when the writer is gone.
fn start_watermarks(name: &str) -> std::io::Result<Sender<(PathBuf, Epoch, OpId)>> {
    let (tx, rx) = crossbeam::channel::unbounded::<(PathBuf, Epoch, OpId)>();
    std::thread::Builder::new()
        .name(format!("{name}-marks"))
        .spawn(move || {
            let mut pending: HashMap<PathBuf, (Epoch, OpId)> = HashMap::new();
            // Writes so far per directory: they alternate between its two slots.
            let mut writes: HashMap<PathBuf, u64> = HashMap::new();
            let mut last = Instant::now();
            let mut open = true;
            while open {
                match rx.recv_deadline(last + MARK_INTERVAL) {
                    Ok((dir, epoch, op)) => {
                        let mark = pending.entry(dir).or_insert((epoch, op));
                        // A new epoch (a swarm made again) starts over.
                        *mark = if mark.0 == epoch {
                            (epoch, mark.1.max(op))
                        } else {
                            (epoch, op)
                        };
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
                last = Instant::now();
                for (dir, (epoch, op)) in pending.drain() {
                    let seq = writes.entry(dir.clone()).or_default();
                    if let Err(error) = super::store::write_watermark(&dir, epoch, op, *seq) {
                        // Recovery then knows a little less of what was acknowledged; the
                        // swarm's next durable op tries again.
                        tracing::warn!(dir = %dir.display(), %error, "writing a durable watermark failed");
                    }
                    *seq += 1;
                }
            }
        })?;
    Ok(tx)
}

impl WriterState {
    fn new(
        policy: SyncPolicy,
        shards: Vec<UnboundedSender<LogEvent>>,
        marks: Option<Sender<(PathBuf, Epoch, OpId)>>,
        metrics: Arc<LogMetrics>,
        disk: Disk,
    ) -> Self {
        WriterState {
            disk,
            policy,
            shards,
            last_sync: Instant::now(),
            unsynced: Vec::new(),
            failed: FxHashMap::default(),
            marks,
            metrics,
            batch_started: Instant::now(),
        }
    }

    /// Waits for the first request (or the interval deadline), then takes what is queued.
    fn next_batch(&mut self, rx: &Receiver<WriteRequest>) -> Result<Vec<WriteRequest>, Stop> {
        let first = match self.policy {
            SyncPolicy::IntervalMs(ms) if !self.unsynced.is_empty() => {
                let deadline = self.last_sync + Duration::from_millis(ms);
                match rx.recv_deadline(deadline) {
                    Ok(request) => Some(request),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(Stop),
                }
            }
            _ => Some(rx.recv().map_err(|_| Stop)?),
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        if let Some(first) = first {
            bytes += first.record.len();
            batch.push(first);
            while batch.len() < BATCH_REQUESTS && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(request) => {
                        bytes += request.record.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
        }
        self.batch_started = Instant::now();
        self.metrics
            .appended_bytes
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(batch)
    }

    /// Creates the directories of new swarms in the batch. A swarm whose directory could not
    /// be created fails its requests of the batch: returns their files, with why.
    fn create_dirs(
        batch: &[WriteRequest],
        failed: &FxHashMap<Arc<str>, u64>,
        disk: &Disk,
    ) -> FailedFiles {
        let mut failures = FailedFiles::new();
        let mut tried = Vec::new();
        for request in batch.iter().filter(|r| !refused(failed, r)) {
            let Some(dir) = &request.create else {
                continue;
            };
            if tried.contains(&request.swarm) {
                continue;
            }
            tried.push(request.swarm.clone());
            let created = disk
                .begin(DiskOp::CreateDir, &dir.dir)
                .and_then(|grant| grant.end(dir.create()));
            if let Err(error) = created {
                let detail = format!("creating {}: {error}", dir.dir.display());
                tracing::error!(swarm = %request.swarm, %detail, "creating a swarm's event log failed");
                for r in batch.iter().filter(|r| r.swarm == request.swarm) {
                    failures.insert(r.path.clone(), detail.clone());
                }
            }
        }
        failures
    }

    /// Coalesces a batch into per-file contiguous buffers (one copy of each record), leaving
    /// out the requests of failed generations and of files that failed already.
    fn plan(
        batch: &[WriteRequest],
        failed: &FxHashMap<Arc<str>, u64>,
        failed_files: &FailedFiles,
    ) -> Vec<FileBatch> {
        let mut files: Vec<FileBatch> = Vec::new();
        // Where each file's bytes end so far: the buffers are sized before anything is
        // copied, so none of them grows (and copies itself again) on the way.
        let mut ends: Vec<u64> = Vec::new();
        // Files by their path's bytes (`OsStr` hashes and compares them as bytes; `Path`'s
        // `Hash` walks its components, and with SipHash that was a quarter of the writer's
        // time per append).
        let mut open: FxHashMap<&std::ffi::OsStr, usize> = FxHashMap::default();
        let mut placed: Vec<(usize, &WriteRequest)> = Vec::with_capacity(batch.len());
        for request in batch
            .iter()
            .filter(|r| !refused(failed, r) && !failed_files.contains_key(&r.path))
        {
            let key = request.path.as_os_str();
            let slot = open
                .get(&key)
                .copied()
                .filter(|&i| ends[i] == request.offset && request.truncate_to.is_none());
            let index = match slot {
                Some(i) => i,
                None => {
                    files.push(FileBatch {
                        path: request.path.clone(),
                        offset: request.offset,
                        bytes: BytesMut::new(),
                        new_file: request.new_file,
                        truncate_to: request.truncate_to,
                    });
                    ends.push(request.offset);
                    open.insert(key, files.len() - 1);
                    files.len() - 1
                }
            };
            ends[index] += request.record.len() as u64;
            placed.push((index, request));
        }
        for (f, end) in files.iter_mut().zip(&ends) {
            f.bytes.reserve((end - f.offset) as usize);
        }
        for (index, request) in placed {
            let bytes = &mut files[index].bytes;
            bytes.put_slice(&request.record.head);
            bytes.put_slice(&request.record.frame_head);
            bytes.put_slice(&request.record.frame_body);
        }
        files
    }

    /// How to sync this batch: each file before completing (`always`), and whether the
    /// files written since the last interval sync are due now (`interval_ms`).
    fn sync_plan(&mut self, files: &[FileBatch]) -> (bool, bool) {
        match self.policy {
            SyncPolicy::Always => (true, false),
            SyncPolicy::NeverDanger => (false, false),
            SyncPolicy::IntervalMs(ms) => {
                for f in files {
                    match self.unsynced.iter_mut().find(|(path, _)| *path == f.path) {
                        Some((_, new_file)) => *new_file |= f.new_file,
                        None => self.unsynced.push((f.path.clone(), f.new_file)),
                    }
                }
                (false, self.last_sync.elapsed() >= Duration::from_millis(ms))
            }
        }
    }

    /// Reports durability (or failure) of a batch to the shards. Once an append of a swarm
    /// failed, nothing after the failed op is reported durable (even if its write happened
    /// to succeed), its bytes are cut off, and the swarm's later requests of the same
    /// generation are refused; the shard starts a new generation to recover.
    fn complete(&mut self, batch: Vec<WriteRequest>, failed: &HashMap<Arc<PathBuf>, String>) {
        if !batch.is_empty() {
            let took = self.batch_started.elapsed().as_micros().max(1) as u64;
            // A poisoned lock only held a histogram: go on with it.
            self.metrics
                .commit_us
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(took);
            self.metrics
                .batch_appends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(batch.len() as u64);
        }
        // Requests of a generation that failed before this batch were not written; their
        // shard refused their publishers when it heard of that failure.
        let written: Vec<&WriteRequest> =
            batch.iter().filter(|r| !refused(&self.failed, r)).collect();
        let mut reach: FxHashMap<(usize, &str), SwarmReach<'_>> = FxHashMap::default();
        for request in &written {
            let swarm = reach
                .entry((request.shard, &*request.swarm))
                .or_insert_with(|| SwarmReach {
                    swarm: &request.swarm,
                    up_to: OpId(0),
                    file: None,
                    failed: None,
                });
            match failed.get(&request.path) {
                Some(detail) => match &mut swarm.failed {
                    Some((op, _)) => *op = (*op).min(request.op),
                    None => swarm.failed = Some((request.op, detail.clone())),
                },
                None => {
                    swarm.up_to = swarm.up_to.max(request.op);
                    swarm
                        .file
                        .get_or_insert((&request.path, request.record.epoch()));
                }
            }
        }
        let mut failures = Vec::new();
        for ((shard, _), swarm) in reach {
            // Ops are durable only up to the first failed one of the swarm.
            let up_to = match &swarm.failed {
                Some((first_failed, _)) if *first_failed <= swarm.up_to => OpId(first_failed.0 - 1),
                _ => swarm.up_to,
            };
            if let Some((from, detail)) = swarm.failed {
                failures.push((shard, swarm.swarm.clone(), from, detail));
            }
            if up_to.is_none() {
                continue;
            }
            if let (Some(marks), Some((path, epoch))) = (&self.marks, swarm.file) {
                let _ = marks.send((parent_of(path).to_owned(), epoch, up_to));
            }
            if let Some(tx) = self.shards.get(shard) {
                let _ = tx.send(LogEvent::Durable {
                    swarm: swarm.swarm.clone(),
                    up_to,
                });
            }
        }
        for (shard, swarm, from, detail) in failures {
            let generation = written
                .iter()
                .filter(|r| r.swarm == swarm)
                .map(|r| r.generation)
                .max()
                .unwrap_or_default();
            self.failed.insert(swarm.clone(), generation);
            let truncated = truncate_failed(&written, &swarm, from, &self.disk);
            if let Some(tx) = self.shards.get(shard) {
                let _ = tx.send(LogEvent::Failed {
                    swarm,
                    from,
                    generation,
                    detail,
                    truncated,
                });
            }
        }
    }
}

/// Whether `request` belongs to a generation of its swarm that failed.
fn refused(failed: &FxHashMap<Arc<str>, u64>, request: &WriteRequest) -> bool {
    failed
        .get(&request.swarm)
        .is_some_and(|&generation| request.generation <= generation)
}

/// Cuts every file of `swarm` that this batch wrote at or after op `from` back to where that
/// op's bytes begin, and syncs it: bytes whose publishers are told "failed" must never be
/// read back (after a failed fsync the page cache may still hold them, and write them back
/// later). Plain positional I/O on the writer thread: this runs only after a failure.
/// Returns whether every cut was made.
fn truncate_failed(batch: &[&WriteRequest], swarm: &Arc<str>, from: OpId, disk: &Disk) -> bool {
    let mut cuts: HashMap<&Arc<PathBuf>, u64> = HashMap::new();
    for request in batch.iter().filter(|r| r.swarm == *swarm && r.op >= from) {
        let cut = cuts.entry(&request.path).or_insert(request.offset);
        *cut = (*cut).min(request.offset);
    }
    let mut all = true;
    for (path, len) in cuts {
        let result = disk.begin(DiskOp::Cut(len), path).and_then(|grant| {
            grant.end(
                OpenOptions::new()
                    .write(true)
                    .open(&**path)
                    .and_then(|file| file.set_len(len).and_then(|()| file.sync_data())),
            )
        });
        match result {
            Ok(()) => {}
            // Nothing was created, so nothing is there to read back.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cutting failed appends off the event log failed");
                all = false;
            }
        }
    }
    all
}

/// Cuts `path` to `len` (the first write after a failure), synced.
fn truncate_before_write(disk: &Disk, path: &Path, len: u64) -> std::io::Result<()> {
    let grant = disk.begin(DiskOp::Cut(len), path)?;
    grant.end((|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(len)?;
        file.sync_data()
    })())
}

/// [`sync_file`] of a file written since the last interval sync whose handle was closed
/// since (open files are capped; a failed write closes its file): plain I/O, rare. A file
/// a rollback removed has nothing to sync.
fn sync_by_path(path: &Path, new_file: bool) -> std::io::Result<()> {
    match std::fs::File::open(path) {
        Ok(file) => sync_file(&file, path, new_file),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// `fdatasync` of `file`, and of its directory when it is `new_file` (plain I/O).
fn sync_file(file: &std::fs::File, path: &Path, new_file: bool) -> std::io::Result<()> {
    file.sync_data()?;
    if new_file {
        std::fs::File::open(parent_of(path))?.sync_all()?;
    }
    Ok(())
}

/// The channel closed: every sender is gone.
struct Stop;

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

fn run_file(rx: Receiver<WriteRequest>, state: &mut WriterState) {
    let mut files: HashMap<Arc<PathBuf>, std::fs::File> = HashMap::new();
    while let Ok(batch) = state.next_batch(&rx) {
        let disk = state.disk.clone();
        let mut failed = WriterState::create_dirs(&batch, &state.failed, &disk);
        let planned = WriterState::plan(&batch, &state.failed, &failed);
        let (sync, flush_interval) = state.sync_plan(&planned);
        for f in &planned {
            if files.len() >= MAX_OPEN_FILES && !files.contains_key(&f.path) {
                files.clear();
            }
            let result = (|| -> std::io::Result<()> {
                if let Some(len) = f.truncate_to {
                    truncate_before_write(&disk, &f.path, len)?;
                }
                if f.new_file || f.truncate_to.is_some() {
                    // A path can name a new file after a rollback removed the old one: never
                    // write through a handle to an unlinked inode.
                    files.remove(&f.path);
                }
                let file = match files.get(&f.path) {
                    Some(file) => file,
                    None => {
                        let grant = disk.begin(DiskOp::Open, &f.path)?;
                        let file = grant.end(
                            OpenOptions::new()
                                .write(true)
                                .create(true)
                                .truncate(false)
                                .open(&*f.path),
                        )?;
                        files.entry(f.path.clone()).or_insert(file)
                    }
                };
                let grant = disk.begin(DiskOp::Write(f.bytes.len()), &f.path)?;
                let limit = grant.limit.unwrap_or(f.bytes.len());
                grant.end(file.write_all_at(&f.bytes[..limit], f.offset))?;
                if sync {
                    let grant = disk.begin(DiskOp::Sync { dir: f.new_file }, &f.path)?;
                    std::thread::sleep(grant.delay);
                    let started = Instant::now();
                    grant.end(sync_file(file, &f.path, f.new_file))?;
                    state.metrics.synced(started);
                }
                Ok(())
            })();
            if let Err(error) = result {
                tracing::error!(path = %f.path.display(), %error, "event log write failed");
                files.remove(&f.path);
                failed.insert(f.path.clone(), error.to_string());
            }
        }
        if flush_interval {
            for (path, new_file) in std::mem::take(&mut state.unsynced) {
                let result = disk
                    .begin(DiskOp::Sync { dir: new_file }, &path)
                    .and_then(|grant| {
                        std::thread::sleep(grant.delay);
                        let started = Instant::now();
                        let result = grant.end(match files.get(&path) {
                            Some(file) => sync_file(file, &path, new_file),
                            None => sync_by_path(&path, new_file),
                        });
                        state.metrics.synced(started);
                        result
                    });
                if let Err(error) = result {
                    tracing::error!(path = %path.display(), %error, "event log sync failed");
                }
            }
            state.last_sync = Instant::now();
        }
        state.complete(batch, &failed);
    }
}

fn run_uring(runtime: &tokio_uring::Runtime, rx: Receiver<WriteRequest>, state: &mut WriterState) {
    runtime.block_on(async {
        let mut files: HashMap<Arc<PathBuf>, Rc<tokio_uring::fs::File>> = HashMap::new();
        // Blocking on the channel is fine here: nothing else runs on this thread, and every
        // operation of the previous batch has completed before we wait again.
        while let Ok(batch) = state.next_batch(&rx) {
            // Rare (a swarm's first append): plain I/O on this thread.
            let disk = state.disk.clone();
            let mut failed = WriterState::create_dirs(&batch, &state.failed, &disk);
            let planned = WriterState::plan(&batch, &state.failed, &failed);
            let (sync, flush_interval) = state.sync_plan(&planned);
            if files.len() >= MAX_OPEN_FILES {
                files.clear();
            }
            let mut tasks = Vec::with_capacity(planned.len());
            for f in planned {
                if let Some(len) = f.truncate_to {
                    // Rare (the first write after a failure): plain I/O on this thread.
                    if let Err(error) = truncate_before_write(&disk, &f.path, len) {
                        tasks.push((f.path.clone(), None, Some(error.to_string())));
                        continue;
                    }
                }
                if f.new_file || f.truncate_to.is_some() {
                    // Never write through a handle to an unlinked inode (see run_file).
                    files.remove(&f.path);
                }
                let file = match files.get(&f.path) {
                    Some(file) => Ok(file.clone()),
                    None => match disk.begin(DiskOp::Open, &f.path) {
                        Ok(grant) => grant.end(
                            tokio_uring::fs::OpenOptions::new()
                                .write(true)
                                .create(true)
                                .open(&*f.path)
                                .await
                                .map(Rc::new),
                        ),
                        Err(error) => Err(error),
                    },
                };
                let file = match file {
                    Ok(file) => {
                        files.insert(f.path.clone(), file.clone());
                        file
                    }
                    Err(error) => {
                        tasks.push((f.path.clone(), None, Some(error.to_string())));
                        continue;
                    }
                };
                let path = f.path.clone();
                let new_file = f.new_file;
                let metrics = state.metrics.clone();
                let disk = disk.clone();
                let handle = tokio_uring::spawn(async move {
                    let mut bytes: Bytes = f.bytes.freeze();
                    let grant = disk.begin(DiskOp::Write(bytes.len()), &path)?;
                    if let Some(limit) = grant.limit {
                        bytes.truncate(limit);
                    }
                    let (result, _) = file.write_all_at(bytes, f.offset).await;
                    grant.end(result)?;
                    if sync {
                        let grant = disk.begin(DiskOp::Sync { dir: new_file }, &path)?;
                        if !grant.delay.is_zero() {
                            tokio::time::sleep(grant.delay).await;
                        }
                        let started = Instant::now();
                        grant.end(uring_sync(&file, &path, new_file).await)?;
                        metrics.synced(started);
                    }
                    Ok::<(), std::io::Error>(())
                });
                tasks.push((f.path.clone(), Some(handle), None));
            }
            for (path, handle, error) in tasks {
                let error = match (handle, error) {
                    (_, Some(error)) => Some(error),
                    (Some(handle), None) => match handle.await {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(error.to_string()),
                        Err(join) => Some(join.to_string()),
                    },
                    (None, None) => None,
                };
                if let Some(error) = error {
                    tracing::error!(path = %path.display(), %error, "event log write failed");
                    files.remove(&path);
                    failed.insert(path, error);
                }
            }
            if flush_interval {
                for (path, new_file) in std::mem::take(&mut state.unsynced) {
                    let result = match disk.begin(DiskOp::Sync { dir: new_file }, &path) {
                        Ok(grant) => {
                            if !grant.delay.is_zero() {
                                tokio::time::sleep(grant.delay).await;
                            }
                            let started = Instant::now();
                            let synced = match files.get(&path) {
                                Some(file) => uring_sync(file, &path, new_file).await,
                                None => sync_by_path(&path, new_file),
                            };
                            state.metrics.synced(started);
                            grant.end(synced)
                        }
                        Err(error) => Err(error),
                    };
                    if let Err(error) = result {
                        tracing::error!(path = %path.display(), %error, "event log sync failed");
                    }
                }
                state.last_sync = Instant::now();
            }
            state.complete(batch, &failed);
        }
    });
}

/// `fdatasync` of `file`, and of its directory when it is `new_file` (io_uring).
async fn uring_sync(
    file: &tokio_uring::fs::File,
    path: &Path,
    new_file: bool,
) -> std::io::Result<()> {
    file.sync_data().await?;
    if new_file {
        let dir = tokio_uring::fs::File::open(parent_of(path)).await?;
        dir.sync_all().await?;
        dir.close().await?;
    }
    Ok(())
}
