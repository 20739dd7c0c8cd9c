//! Compaction and retention of a swarm's log.
//!
//! Old segments (everything but the newest `hot_bytes` and the segment being appended to)
//! are rewritten into one compacted segment that keeps, for each key, only the latest
//! record, and drops records older than their class's maximum age. Records without a key
//! cannot be superseded and are kept until their age runs out. The compacted file is written
//! beside the log, synced, and renamed into place; the segments it replaces are deleted only
//! after that (recovery removes leftovers of a crash in between). It runs on a blocking
//! thread, so appends never wait for it.
//!
//! Size retention then deletes the oldest segments while the swarm's log is above
//! `max_bytes`. The router's internal logs (`$control`, `$affinity`, `$jobs.*`) are compacted
//! by key only: they never age out and size retention never deletes their segments, and the
//! latest record of a key is dropped once it is a tombstone (empty payload). Either way the swarm's *horizon* moves: a resync from before it gets the
//! compacted delta (the latest record per key), never the full history.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use swarmbus_schema::{Class, Epoch, OpId};

use super::record::encode_record;
use super::store::{compacted_path, Segment, SwarmLog, INDEX_EVERY_RECORDS};

/// Retention settings (see the `[log.retention]` configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The newest segments of a swarm totalling up to this many bytes are never compacted.
    pub hot_bytes: u64,
    /// Records older than this are dropped by compaction, per class (`None`: kept).
    pub max_age_ms: [Option<u64>; Class::COUNT],
    /// Past this many bytes in a swarm's log, its oldest segments are deleted (`None`: no
    /// limit).
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        let mut max_age_ms = [None; Class::COUNT];
        max_age_ms[Class::Command.index()] = Some(7 * 24 * 3600 * 1000);
        max_age_ms[Class::Control.index()] = Some(30 * 24 * 3600 * 1000);
        Retention {
            hot_bytes: 256 << 20,
            max_age_ms,
            max_bytes: None,
        }
    }
}

/// A compaction to run: the oldest segments of one swarm.
#[derive(Clone, Debug)]
pub struct CompactionJob {
    pub swarm: Arc<str>,
    pub epoch: Epoch,
    pub dir: PathBuf,
    /// The segments to replace: a prefix of the swarm's segment list.
    pub inputs: Vec<Segment>,
    pub now_ms: u64,
    pub max_age_ms: [Option<u64>; Class::COUNT],
    /// Drop the latest record of a key when its payload is empty (an internal log's
    /// tombstone). Sound because the inputs are always a prefix of the log: no older record
    /// of that key survives elsewhere to come back.
    pub drop_tombstones: bool,
}

/// A finished compaction.
#[derive(Clone, Debug)]
pub struct Compacted {
    pub swarm: Arc<str>,
    /// The files replaced (to delete once the new segment is in use).
    pub replaced: Vec<PathBuf>,
    pub segment: Segment,
    pub records_before: u64,
    pub records_after: u64,
}

/// Picks what to compact in `log`, if anything: every segment older than the hot window
/// (the newest `hot_bytes`, and always the segment being appended to), provided at least
/// one of them is not compacted yet.
pub fn plan(
    log: &SwarmLog,
    retention: &Retention,
    now_ms: u64,
    swarm: &Arc<str>,
) -> Option<CompactionJob> {
    if log.unavailable.is_some() || log.segments.len() < 2 {
        return None;
    }
    let mut hot = 0u64;
    let mut cold_end = log.segments.len() - 1; // the active segment is always hot
                                               // A segment with appends still in the writer's queue is hot whatever its age.
    while cold_end > 0 && log.segments[cold_end - 1].covers_to > log.durable_op {
        cold_end -= 1;
    }
    while cold_end > 0 {
        let candidate = &log.segments[cold_end - 1];
        if hot + candidate.len > retention.hot_bytes {
            break;
        }
        hot += candidate.len;
        cold_end -= 1;
    }
    let inputs = &log.segments[..cold_end];
    if inputs.iter().all(|s| s.compacted) {
        return None; // nothing new to compact (also when there are no inputs)
    }
    let internal = log.is_internal();
    Some(CompactionJob {
        swarm: swarm.clone(),
        epoch: log.epoch,
        dir: log.dir.clone(),
        inputs: inputs.to_vec(),
        now_ms,
        // The router's own state (leases' tokens, safety actions, pins, live jobs) is the
        // latest record per key however old it is: it never ages out.
        max_age_ms: if internal {
            [None; Class::COUNT]
        } else {
            retention.max_age_ms
        },
        drop_tombstones: internal,
    })
}

/// Runs a compaction (blocking file I/O).
pub fn run(job: &CompactionJob) -> std::io::Result<Compacted> {
    let (Some(first), Some(last)) = (job.inputs.first(), job.inputs.last()) else {
        return Err(std::io::Error::other("compaction without input segments"));
    };
    let first_op = first.first_op;
    let covers_to = last.covers_to;
    // One segment in memory at a time: a first pass finds the latest op of each key, a
    // second writes what is kept.
    let segment_reader = |segment: &Segment| SwarmLog {
        name: job.swarm.to_string(),
        dir: job.dir.clone(),
        epoch: job.epoch,
        segments: vec![segment.clone()],
        unavailable: None,
        created: true,
        horizon: OpId(0),
        durable_op: segment.covers_to,
        in_flight: Default::default(),
        generation: 0,
        cut_before_next: false,
    };
    let mut latest: HashMap<Bytes, OpId> = HashMap::new();
    let mut records_before = 0u64;
    for segment in &job.inputs {
        for record in segment_reader(segment).read_from(segment.first_op, usize::MAX, usize::MAX)? {
            records_before += 1;
            if !record.key.is_empty() {
                let key =
                    swarmbus_proto::record_key::canonical(&job.swarm, &record.key).into_owned();
                latest.insert(Bytes::from(key), record.op);
            }
        }
    }
    let path = compacted_path(&job.dir, first_op, covers_to);
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut len = 0u64;
    let mut last_op = OpId(first_op.0 - 1);
    let mut index = Vec::new();
    let mut kept = 0u64;
    for segment in &job.inputs {
        for record in
            &segment_reader(segment).read_from(segment.first_op, usize::MAX, usize::MAX)?
        {
            let superseded = !record.key.is_empty()
                && latest.get(&*swarmbus_proto::record_key::canonical(
                    &job.swarm,
                    &record.key,
                )) != Some(&record.op);
            let expired = job.max_age_ms[record.class.index()]
                .is_some_and(|age| job.now_ms.saturating_sub(record.timestamp_ms) > age);
            let tombstone = job.drop_tombstones && !superseded && is_tombstone(&record.frame);
            if superseded || expired || tombstone {
                continue;
            }
            let parts = encode_record(
                record.epoch,
                record.op,
                record.timestamp_ms,
                record.class,
                &record.key,
                record.frame.clone(),
                Bytes::new(),
            );
            if kept.is_multiple_of(INDEX_EVERY_RECORDS) {
                index.push((record.op, len));
            }
            let bytes = parts.to_bytes();
            out.write_all(&bytes)?;
            len += bytes.len() as u64;
            last_op = record.op;
            kept += 1;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &path)?;
    File::open(&job.dir)?.sync_all()?;
    Ok(Compacted {
        swarm: job.swarm.clone(),
        replaced: job.inputs.iter().map(|s| PathBuf::clone(&s.path)).collect(),
        segment: Segment {
            first_op,
            path: Arc::new(path),
            len,
            last_op,
            covers_to,
            compacted: true,
            index,
        },
        records_before,
        records_after: kept,
    })
}

/// Whether a stored Deliver frame (with its length prefix) carries an empty payload.
fn is_tombstone(frame: &Bytes) -> bool {
    frame.len() > 4
        && matches!(
            swarmbus_schema::decode(frame.slice(4..), &swarmbus_schema::DecodeOptions::default()),
            Ok(swarmbus_schema::Message::Deliver(deliver)) if deliver.payload.is_empty()
        )
}

/// Puts a finished compaction into `log` (if the log still starts with its inputs), then
/// applies size retention. Returns the files that are no longer part of the log, for
/// [`remove_files`] (the replaced inputs and what retention dropped). When the log changed
/// under the compaction its output is dropped: `Err` with that file, which must be deleted
/// before another compaction may write a file of that name.
pub fn install(
    log: &mut SwarmLog,
    done: Compacted,
    retention: &Retention,
) -> Result<Vec<PathBuf>, PathBuf> {
    // The new file's name holds a longer range than any input's, so it never is one of them.
    let count = done.replaced.len();
    let prefix_matches = log.segments.len() > count
        && log.segments[..count]
            .iter()
            .zip(&done.replaced)
            .all(|(segment, path)| *segment.path == *path);
    if !prefix_matches {
        // The log changed under the compaction (it was removed, or retention ran): drop the
        // result; the inputs are still the truth.
        return Err(Arc::unwrap_or_clone(done.segment.path));
    }
    log.horizon = log.horizon.max(done.segment.covers_to);
    log.segments.splice(..count, [done.segment]);
    let mut gone = done.replaced;
    gone.extend(enforce_max_bytes(log, retention));
    Ok(gone)
}

/// Drops the oldest segments (never the one being appended to) from `log` while it is above
/// `max_bytes`; returns their files, for [`remove_files`].
pub fn enforce_max_bytes(log: &mut SwarmLog, retention: &Retention) -> Vec<PathBuf> {
    let mut gone = Vec::new();
    let Some(max) = retention.max_bytes else {
        return gone;
    };
    // Deleting a segment of an internal log would forget live state; they are bounded by
    // compaction (latest record per key, tombstones dropped) instead.
    if log.is_internal() {
        return gone;
    }
    while log.bytes() > max && log.segments.len() > 1 && log.segments[0].covers_to <= log.durable_op
    {
        let oldest = log.segments.remove(0);
        log.horizon = log.horizon.max(oldest.covers_to);
        gone.push(Arc::unwrap_or_clone(oldest.path));
    }
    gone
}

/// Deletes files a log no longer holds (a file already gone is fine), then syncs `dir`.
/// Names of replaced inputs and of retained-away segments are never written again (the log
/// has moved past their ranges), so this may run after the log moved on. Returns the files
/// deleted.
pub fn remove_files(dir: &Path, paths: &[PathBuf]) -> std::io::Result<usize> {
    let mut deleted = 0;
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => deleted += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(deleted)
}
