//! On-disk layout, recovery and reads of the per-swarm logs.
//!
//! ```text
//! DATA_DIR/log/<dir>/name                  the swarm's name (dir is a sanitised prefix + hash)
//! DATA_DIR/log/<dir>/epoch                 the log's epoch, decimal
//! DATA_DIR/log/<dir>/<first_op:020>.log    segments, each starting at op `first_op`
//! DATA_DIR/log/<dir>/<first:020>-<last:020>.compacted.log
//!                                          ops first..=last compacted (latest per key)
//! ```
//!
//! Each segment keeps a sparse in-memory index (op -> byte offset, one entry every
//! [`INDEX_EVERY_RECORDS`] records) built while recovering and extended on append, used to
//! seek by op id. Recovery verifies every record's CRC and the op sequence: a torn or
//! CRC-failing **tail** (the damage runs to the end of the last segment) is truncated and the
//! byte count logged; damage anywhere else marks that swarm unavailable, and the other swarms
//! are served.

use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use swarmbus_schema::{Epoch, OpId};

use super::record::{is_internal, parse_record, ParseError, Record, RECORD_HEADER_BYTES};

/// Sparse index density.
pub const INDEX_EVERY_RECORDS: u64 = 64;
/// Read size when scanning or serving ranges.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// One segment file.
#[derive(Clone, Debug)]
pub struct Segment {
    pub first_op: OpId,
    /// Shared with every append to the segment (its writes name the file).
    pub path: Arc<PathBuf>,
    /// Bytes of valid records (the append position).
    pub len: u64,
    /// Last op stored; `first_op - 1` when empty.
    pub last_op: OpId,
    /// The last op of the range this segment stands for. Equal to `last_op` for plain
    /// segments; a compacted segment may have dropped the ops at the end of its range.
    pub covers_to: OpId,
    /// Written by compaction: op ids increase but have gaps.
    pub compacted: bool,
    /// (op, offset) of every `INDEX_EVERY_RECORDS`-th record.
    pub index: Vec<(OpId, u64)>,
}

impl Segment {
    fn empty(dir: &Path, first_op: OpId) -> Segment {
        Segment {
            first_op,
            path: Arc::new(segment_path(dir, first_op)),
            len: 0,
            last_op: OpId(first_op.0 - 1),
            covers_to: OpId(first_op.0 - 1),
            compacted: false,
            index: Vec::new(),
        }
    }
}

/// Where the log of one swarm stands.
#[derive(Clone, Debug)]
pub struct SwarmLog {
    pub name: String,
    pub dir: PathBuf,
    pub epoch: Epoch,
    pub segments: Vec<Segment>,
    /// Set when recovery found damage before the tail; the swarm is not served.
    pub unavailable: Option<String>,
    /// Whether the directory and epoch file exist on disk yet.
    pub created: bool,
    /// Ops up to here were compacted (latest per key kept) or removed by retention.
    pub horizon: OpId,
    /// The highest op the writer reported durable (everything recovered is).
    pub durable_op: OpId,
    /// Where each op placed but not yet durable went, in op order (what a failed write is
    /// rolled back to).
    pub in_flight: std::collections::VecDeque<Placed>,
    /// The write generation, moved on by each rollback (see `WriteRequest::generation`).
    pub generation: u64,
    /// After a rollback: the next write first cuts its file to its offset.
    pub cut_before_next: bool,
}

/// Where one op not yet durable was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub op: OpId,
    /// The first op of the segment it went to.
    pub segment: OpId,
    pub offset: u64,
}

/// A problem found while recovering, reported but not fatal to the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryNote {
    pub swarm: String,
    pub detail: String,
}

/// Directory name for a swarm: a filesystem-safe prefix of its name and a hash of it.
pub fn swarm_dir_name(name: &str) -> String {
    let prefix: String = name
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(name.as_bytes());
    format!("{prefix}-{:016x}", hasher.finish())
}

fn segment_path(dir: &Path, first_op: OpId) -> PathBuf {
    dir.join(format!("{:020}.log", first_op.0))
}

/// The file of a compacted segment standing for ops `first..=last`.
pub fn compacted_path(dir: &Path, first: OpId, last: OpId) -> PathBuf {
    dir.join(format!("{:020}-{:020}.compacted.log", first.0, last.0))
}

/// What a file name in a swarm directory is.
enum SegmentName {
    Plain(OpId),
    Compacted(OpId, OpId),
}

fn parse_segment_name(path: &Path) -> Option<SegmentName> {
    let name = path.file_name()?.to_str()?;
    if let Some(range) = name.strip_suffix(".compacted.log") {
        let (first, last) = range.split_once('-')?;
        let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
        // Op ids start at 1; a range must be ordered and leave room for the next op.
        return (first >= 1 && last >= first && last < u64::MAX)
            .then_some(SegmentName::Compacted(OpId(first), OpId(last)));
    }
    let first = name.strip_suffix(".log")?;
    let first: u64 = (first.len() == 20).then(|| first.parse().ok()).flatten()?;
    (first >= 1).then_some(SegmentName::Plain(OpId(first)))
}

/// A fresh epoch: random per call (std's randomly keyed hasher) and never 0.
pub fn new_epoch() -> Epoch {
    use std::hash::BuildHasher;
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    Epoch(hasher.finish().max(1))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A swarm log's directory to create: the directory, then its epoch and name files, each
/// synced, then the directory entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSwarmDir {
    pub dir: PathBuf,
    pub epoch: Epoch,
    pub name: String,
}

impl NewSwarmDir {
    /// Creates it (again: the files are rewritten with the same contents).
    pub fn create(&self) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        // The name file goes last: it marks the directory as a complete swarm log.
        for (file, contents) in [
            ("epoch", self.epoch.0.to_string()),
            ("name", self.name.clone()),
        ] {
            let tmp = self.dir.join(format!("{file}.tmp"));
            let mut f = File::create(&tmp)?;
            f.write_all(contents.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(file))?;
        }
        sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl SwarmLog {
    /// A log for a swarm not on disk yet; [`SwarmLog::create_on_disk`] makes it durable.
    pub fn new(log_dir: &Path, name: &str, epoch: Epoch) -> Self {
        let dir = log_dir.join(swarm_dir_name(name));
        SwarmLog {
            name: name.to_owned(),
            segments: vec![Segment::empty(&dir, OpId(1))],
            dir,
            epoch,
            unavailable: None,
            created: false,
            horizon: OpId(0),
            durable_op: OpId(0),
            in_flight: Default::default(),
            generation: 0,
            cut_before_next: false,
        }
    }

    /// Writes the directory, name and epoch files (synced) before the first append, on the
    /// calling thread.
    pub fn create_on_disk(&mut self) -> std::io::Result<()> {
        if self.created {
            return Ok(());
        }
        self.new_dir().create()?;
        self.created = true;
        Ok(())
    }

    /// What creating the log's directory takes (for the writer thread, which creates it
    /// before the first append).
    pub fn new_dir(&self) -> NewSwarmDir {
        NewSwarmDir {
            dir: self.dir.clone(),
            epoch: self.epoch,
            name: self.name.clone(),
        }
    }

    /// Whether this is one of the router's internal logs (names starting with `$`, which
    /// clients cannot use): compacted by key only, never aged out or size-trimmed.
    pub fn is_internal(&self) -> bool {
        is_internal(&self.name)
    }

    /// The last op stored (0 when empty).
    pub fn last_op(&self) -> OpId {
        self.segments.last().map_or(OpId(0), |s| s.covers_to)
    }

    /// Bytes of all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Reserves the position of the next record (op `last_op + 1`, `len` bytes), rolling to a
    /// new segment past `segment_bytes`. Returns the file and offset to write at, and whether
    /// the file is new.
    pub fn place(&mut self, op: OpId, len: u64, segment_bytes: u64) -> (Arc<PathBuf>, u64, bool) {
        let roll = match self.segments.last() {
            Some(segment) => segment.len > 0 && segment.len + len > segment_bytes,
            None => true,
        };
        if roll {
            self.segments.push(Segment::empty(&self.dir, op));
        }
        let segment = self
            .segments
            .last_mut()
            .expect("a segment exists: pushed above when missing");
        let offset = segment.len;
        if (op.0 - segment.first_op.0).is_multiple_of(INDEX_EVERY_RECORDS) {
            segment.index.push((op, offset));
        }
        segment.len += len;
        segment.last_op = op;
        segment.covers_to = op;
        self.in_flight.push_back(Placed {
            op,
            segment: segment.first_op,
            offset,
        });
        (segment.path.clone(), offset, offset == 0)
    }

    /// The writer reported ops up to `up_to` durable.
    pub fn durable(&mut self, up_to: OpId) {
        self.durable_op = self.durable_op.max(up_to);
        while self.in_flight.front().is_some_and(|p| p.op <= up_to) {
            self.in_flight.pop_front();
        }
    }

    /// Forgets every op from `from` on (a write failed there): the log ends again where op
    /// `from` began, the next write cuts the file there first, and the generation moves on.
    /// Returns the files of segments that began after that point (to delete), or `None`
    /// when `from` was not in flight (nothing to roll back).
    pub fn roll_back(&mut self, from: OpId) -> Option<Vec<PathBuf>> {
        let placed = *self.in_flight.iter().find(|p| p.op >= from)?;
        let at = self
            .segments
            .iter()
            .position(|s| s.first_op == placed.segment)?;
        let dropped = self
            .segments
            .split_off(at + 1)
            .into_iter()
            .map(|s| Arc::unwrap_or_clone(s.path))
            .collect();
        let segment = &mut self.segments[at];
        segment.len = placed.offset;
        segment.last_op = OpId(placed.op.0 - 1);
        segment.covers_to = segment.last_op;
        segment.index.retain(|(op, _)| *op < placed.op);
        self.in_flight.retain(|p| p.op < placed.op);
        self.generation += 1;
        self.cut_before_next = true;
        Some(dropped)
    }

    /// Reads records from op `from` on, at most `max_records` and about `max_bytes`.
    /// Records are read from disk, so only ops already durable should be asked for.
    pub fn read_from(
        &self,
        from: OpId,
        max_records: usize,
        max_bytes: usize,
    ) -> std::io::Result<Vec<Record>> {
        self.plan_read(from).read(max_records, max_bytes)
    }

    /// What reading from op `from` on needs (the files, where to start in the first, and
    /// each file's length now): taken on the log's owner thread in memory, carried out
    /// anywhere with [`ReadPlan::read`].
    pub fn plan_read(&self, from: OpId) -> ReadPlan {
        let start = self
            .segments
            .partition_point(|s| s.last_op < from)
            .min(self.segments.len());
        // Only what is durable is read: a segment that begins past the durable op may not
        // exist on disk yet (its first append can still be queued for the writer).
        let files = self.segments[start..]
            .iter()
            .filter(|segment| segment.len > 0 && segment.first_op <= self.durable_op)
            .map(|segment| {
                let offset = match segment.index.partition_point(|(op, _)| *op <= from) {
                    0 => 0,
                    n => segment.index[n - 1].1,
                };
                (PathBuf::clone(&segment.path), offset, segment.len)
            })
            .collect();
        ReadPlan {
            from,
            files,
            remote: None,
        }
    }

    /// Whether `path` is one of the log's segments now (a read that found it gone raced a
    /// compaction or retention, and can be planned again).
    pub fn has_segment(&self, path: &Path) -> bool {
        self.segments.iter().any(|s| *s.path == path)
    }
}

/// A read of a swarm's log planned by [`SwarmLog::plan_read`]: plain file reads, to run off
/// the thread that owns the log (or a read from a replicated backend, [`ReadPlan::remote`]).
#[derive(Clone, Debug)]
pub struct ReadPlan {
    pub from: OpId,
    /// (file, offset to start at, length when planned).
    files: Vec<(PathBuf, u64, u64)>,
    remote: Option<std::sync::Arc<dyn RemoteRead>>,
}

/// A log read carried out by a backend other than the files: called on a thread that may
/// block (the blocking pool), never on a shard's.
pub trait RemoteRead: std::fmt::Debug + Send + Sync {
    /// The records from op `from` on, bounded by count and bytes, as [`ReadPlan::read`].
    fn read(
        &self,
        from: OpId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadFailed>;
}

/// A planned read failed.
#[derive(Debug)]
pub struct ReadFailed {
    /// The file it failed on.
    pub path: PathBuf,
    pub error: std::io::Error,
}

impl std::fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

impl ReadPlan {
    /// A read from op `from` on that `remote` carries out.
    pub fn remote(from: OpId, remote: std::sync::Arc<dyn RemoteRead>) -> ReadPlan {
        ReadPlan {
            from,
            files: Vec::new(),
            remote: Some(remote),
        }
    }

    /// Reads the planned files: the records from `from` on, bounded by count and bytes.
    pub fn read(&self, max_records: usize, max_bytes: usize) -> std::io::Result<Vec<Record>> {
        self.read_noting_file(max_records, max_bytes)
            .map_err(|failed| std::io::Error::new(failed.error.kind(), failed.to_string()))
    }

    /// [`ReadPlan::read`], saying which file failed.
    pub fn read_noting_file(
        &self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadFailed> {
        if let Some(remote) = &self.remote {
            return remote.read(self.from, max_records, max_bytes);
        }
        let mut out = Vec::new();
        let mut bytes_out = 0;
        for (path, offset, len) in &self.files {
            let failed = |error| ReadFailed {
                path: path.clone(),
                error,
            };
            let file = File::open(path).map_err(failed)?;
            let mut position = *offset;
            let mut pending = BytesMut::new();
            while position < *len {
                let want = READ_CHUNK_BYTES.min((len - position) as usize);
                let mut chunk = vec![0u8; want];
                // Appends are placed before they are written: the file may still be shorter
                // than `len`. Read what is there; callers only use durable ops.
                let got = read_at_most(&file, &mut chunk, position).map_err(failed)?;
                if got == 0 {
                    break;
                }
                chunk.truncate(got);
                position += got as u64;
                pending.extend_from_slice(&chunk);
                let mut buf = pending.split().freeze();
                loop {
                    match parse_record(&buf) {
                        Ok((record, used)) => {
                            bytes::Buf::advance(&mut buf, used);
                            if record.op < self.from {
                                continue;
                            }
                            bytes_out += record.frame.len();
                            out.push(record);
                            if out.len() >= max_records || bytes_out >= max_bytes {
                                return Ok(out);
                            }
                        }
                        Err(ParseError::Incomplete { .. }) => break,
                        Err(ParseError::Corrupt { reason }) => {
                            return Err(failed(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                reason,
                            )))
                        }
                    }
                }
                pending.extend_from_slice(&buf);
            }
        }
        Ok(out)
    }
}

/// Reads into `buf` at `position` until it is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], position: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], position + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What scanning one segment found.
struct Scan {
    len: u64,
    last_op: OpId,
    index: Vec<(OpId, u64)>,
    /// Offset and reason of the first bad record, if any.
    damage: Option<(u64, String)>,
    /// Whether valid records follow the damage (so it is not a torn tail).
    damage_is_mid: bool,
}

/// Reads a segment, checking every record. Plain segments hold `first_op, first_op + 1, ...`;
/// compacted ones (`covers_to` set) hold increasing ops within `first_op..=covers_to`.
fn scan_segment(
    path: &Path,
    first_op: OpId,
    covers_to: Option<OpId>,
    epoch: Epoch,
) -> std::io::Result<Scan> {
    let data = Bytes::from(fs::read(path)?);
    let mut offset = 0usize;
    let mut expected = first_op;
    let mut count = 0u64;
    let mut index = Vec::new();
    let mut scan = Scan {
        len: 0,
        last_op: OpId(first_op.0 - 1),
        index: Vec::new(),
        damage: None,
        damage_is_mid: false,
    };
    while offset < data.len() {
        let rest = data.slice(offset..);
        let problem = match parse_record(&rest) {
            Ok((record, used)) => {
                let in_order = match covers_to {
                    None => record.op == expected,
                    Some(last) => record.op >= expected && record.op <= last,
                };
                if !in_order {
                    Some(format!(
                        "op {} where {} was expected",
                        record.op.0, expected.0
                    ))
                } else if record.epoch != epoch {
                    Some(format!(
                        "epoch {} in a log of epoch {}",
                        record.epoch.0, epoch.0
                    ))
                } else {
                    if count.is_multiple_of(INDEX_EVERY_RECORDS) {
                        index.push((record.op, offset as u64));
                    }
                    count += 1;
                    scan.last_op = record.op;
                    expected = OpId(record.op.0 + 1);
                    offset += used;
                    None
                }
            }
            Err(ParseError::Incomplete { needed }) => Some(format!(
                "record of {needed} bytes cut short at {} bytes",
                rest.len()
            )),
            Err(ParseError::Corrupt { reason }) => Some(reason.to_string()),
        };
        if let Some(reason) = problem {
            // A bit flip leaves the records after it intact; a torn write leaves nothing valid.
            let next = match covers_to {
                None => OpId(expected.0 + 1),
                Some(_) => expected,
            };
            scan.damage_is_mid = valid_record_follows(&data, offset, epoch, next);
            scan.damage = Some((offset as u64, reason));
            break;
        }
    }
    scan.len = offset as u64;
    scan.index = index;
    Ok(scan)
}

/// Whether records of this log continue after damage at `from`: a record of `epoch` with
/// an op of at least `next` starts at some later offset, and the records after it follow
/// in op order to the end of the data (or to a torn last one). A payload can hold bytes
/// that parse as a record (a copy of an earlier one, say): its epoch or op gives it away,
/// or the bytes after it do. Each offset costs a comparison of the header's epoch and op
/// before any CRC is computed, so the scan is linear in practice.
fn valid_record_follows(data: &Bytes, from: usize, epoch: Epoch, next: OpId) -> bool {
    const EPOCH_AT: usize = 8;
    const OP_AT: usize = 16;
    let end = data.len().saturating_sub(RECORD_HEADER_BYTES - 1);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(b)
    };
    // Ops after the damage cannot exceed one per header's worth of the remaining bytes.
    let most_ops = ((data.len() - from) / RECORD_HEADER_BYTES) as u64;
    ((from + 1)..end).any(|at| {
        let op = u64_at(at + OP_AT);
        if u64_at(at + EPOCH_AT) != epoch.0 || op < next.0 || op > next.0.saturating_add(most_ops) {
            return false;
        }
        chain_reaches_the_end(data, at, epoch)
    })
}

/// Whether the records from `at` on follow one another (each op one more than the last,
/// all of `epoch`) to the end of `data`, a torn last record allowed.
fn chain_reaches_the_end(data: &Bytes, mut at: usize, epoch: Epoch) -> bool {
    let mut last: Option<OpId> = None;
    while at < data.len() {
        match parse_record(&data.slice(at..)) {
            Ok((record, used)) => {
                let in_order = last.is_none_or(|op| record.op.0 == op.0 + 1);
                if record.epoch != epoch || !in_order {
                    return false;
                }
                last = Some(record.op);
                at += used;
            }
            Err(ParseError::Incomplete { .. }) => return last.is_some(),
            Err(ParseError::Corrupt { .. }) => return false,
        }
    }
    last.is_some()
}

/// The durable watermark's file in a swarm's directory: the highest op the writer synced and
/// reported durable (so acknowledged, under `log.sync = always`). It is a lower bound (the
/// writer updates it a little after the ops themselves, see [`super::writer`]): recovery
/// knows every op up to it was acknowledged, and that damage past it is a write the crash
/// cut short.
pub const WATERMARK_FILE: &str = "durable";

/// Two slots, written in turn, so a torn write of one leaves the other.
const WATERMARK_SLOT: usize = 32;
const WATERMARK_MAGIC: &[u8; 4] = b"SBWM";

/// Writes the watermark `op` of the log of `epoch` (the `seq`th write: it picks the slot)
/// and syncs it.
pub fn write_watermark(dir: &Path, epoch: Epoch, op: OpId, seq: u64) -> std::io::Result<()> {
    let mut slot = [0u8; WATERMARK_SLOT];
    slot[..4].copy_from_slice(WATERMARK_MAGIC);
    slot[4..12].copy_from_slice(&seq.to_le_bytes());
    slot[12..20].copy_from_slice(&op.0.to_le_bytes());
    slot[20..28].copy_from_slice(&epoch.0.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..28]);
    slot[28..32].copy_from_slice(&crc.to_le_bytes());
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(WATERMARK_FILE))?;
    file.write_all_at(&slot, (seq % 2) * WATERMARK_SLOT as u64)?;
    file.sync_data()
}

/// The watermark of a swarm's directory for the log of `epoch`: the op of its highest
/// intact slot of that epoch (`None`: no watermark, or none intact).
pub fn read_watermark(dir: &Path, epoch: Epoch) -> Option<OpId> {
    let bytes = fs::read(dir.join(WATERMARK_FILE)).ok()?;
    bytes
        .chunks_exact(WATERMARK_SLOT)
        .take(2)
        .filter_map(|slot| {
            let u64_at =
                |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(slot[28..32].try_into().ok()?);
            let intact = &slot[..4] == WATERMARK_MAGIC
                && crc32c::crc32c(&slot[..28]) == crc
                && u64_at(20) == epoch.0;
            intact.then(|| (u64_at(4), OpId(u64_at(12))))
        })
        // The highest op wins: a swarm's watermark only grows (the write count restarts
        // with the router, so it only picks the slot to write).
        .map(|(_, op)| op)
        .max()
}

fn read_epoch(dir: &Path) -> Result<Epoch, String> {
    let text = fs::read_to_string(dir.join("epoch")).map_err(|e| format!("epoch file: {e}"))?;
    text.trim()
        .parse()
        .map(Epoch)
        .map_err(|e| format!("epoch file: {e}"))
}

/// Recovers every swarm log under `log_dir`, truncating torn tails, using the swarms'
/// durable watermarks. Returns the logs and notes on what was repaired or found damaged.
pub fn recover_all(log_dir: &Path) -> std::io::Result<(Vec<SwarmLog>, Vec<RecoveryNote>)> {
    recover_all_with(log_dir, true)
}

/// [`recover_all`]; without `watermarks` (a router that does not sync before it
/// acknowledges keeps none up to date) the watermark files are ignored and removed, so a
/// stale one never speaks for ops written since.
pub fn recover_all_with(
    log_dir: &Path,
    watermarks: bool,
) -> std::io::Result<(Vec<SwarmLog>, Vec<RecoveryNote>)> {
    fs::create_dir_all(log_dir)?;
    let mut logs = Vec::new();
    let mut notes = Vec::new();
    let mut dirs: Vec<PathBuf> = fs::read_dir(log_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        // A directory without its name file was never fully created: nothing was appended.
        let Ok(name) = fs::read_to_string(dir.join("name")) else {
            continue;
        };
        if !watermarks {
            match fs::remove_file(dir.join(WATERMARK_FILE)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        let (log, mut found) = recover_swarm(dir, name)?;
        notes.append(&mut found);
        logs.push(log);
    }
    Ok((logs, notes))
}

// The scan of one swarm's segments in op order, with the rules for its tail: one pass,
// so each segment is judged knowing the ones before it (the damage itself is
// `settle_damage`).
fn recover_swarm(dir: PathBuf, name: String) -> std::io::Result<(SwarmLog, Vec<RecoveryNote>)> {
    let mut notes = Vec::new();
    let note = |detail: String| RecoveryNote {
        swarm: name.clone(),
        detail,
    };
    let mut log = SwarmLog {
        name: name.clone(),
        dir: dir.clone(),
        epoch: Epoch(0),
        segments: Vec::new(),
        unavailable: None,
        created: true,
        horizon: OpId(0),
        durable_op: OpId(0),
        in_flight: Default::default(),
        generation: 0,
        cut_before_next: false,
    };
    match read_epoch(&dir) {
        Ok(epoch) => log.epoch = epoch,
        Err(detail) => {
            log.unavailable = Some(detail.clone());
            notes.push(note(detail));
            return Ok((log, notes));
        }
    }
    let segments = list_segments(&dir)?;
    let count = segments.len();
    // Every op up to the watermark was acknowledged; damage past it is a write the crash
    // cut short (a torn record, a page written back before the one before it, a segment
    // begun while the previous one's tail was not on disk yet).
    let watermark = read_watermark(&dir, log.epoch);
    let unacknowledged = |op: OpId| watermark.is_some_and(|w| op > w);
    let paths: Vec<PathBuf> = segments.iter().map(|(_, _, path)| path.clone()).collect();
    let first_ops: Vec<OpId> = segments.iter().map(|(first, _, _)| *first).collect();
    // Removes the segments from the `from`th on (all past the damage: never acknowledged).
    let drop_segments_from = |from: usize, notes: &mut Vec<RecoveryNote>| -> std::io::Result<()> {
        for path in &paths[from..] {
            fs::remove_file(path)?;
            notes.push(note(format!(
                "removed {}: it begins past a write the crash cut short, after the \
                 durable watermark",
                path.display()
            )));
        }
        if from < paths.len() {
            sync_dir(&dir)?;
        }
        Ok(())
    };
    for (i, (first_op, covers_to, path)) in segments.into_iter().enumerate() {
        let is_last = i + 1 == count;
        let expected_first = OpId(log.last_op().0 + 1);
        if i > 0 && first_op != expected_first {
            if is_last && unacknowledged(expected_first) {
                // The previous segment is short: its tail never reached the disk.
                drop_segments_from(i, &mut notes)?;
                break;
            }
            let detail = format!(
                "segment {} starts at op {} but op {} was expected",
                path.display(),
                first_op.0,
                expected_first.0
            );
            notes.push(note(detail.clone()));
            log.unavailable = Some(detail);
            break;
        }
        let scan = scan_segment(&path, first_op, covers_to, log.epoch)?;
        let cut_after = match &scan.damage {
            Some(damage) => {
                let tail = Tail {
                    is_last,
                    near_tail: i + 2 >= count
                        && first_ops[i + 1..]
                            .iter()
                            .all(|first| unacknowledged(*first)),
                    compacted: covers_to.is_some(),
                };
                settle_damage(&mut log, &path, &scan, damage, tail, watermark, &mut notes)?
            }
            None => false,
        };
        if i == 0 && first_op > OpId(1) {
            // Retention removed the ops before this segment.
            log.horizon = OpId(first_op.0 - 1);
        }
        if let Some(last) = covers_to {
            log.horizon = log.horizon.max(last);
        }
        log.segments.push(Segment {
            first_op,
            path: Arc::new(path),
            len: scan.len,
            last_op: scan.last_op,
            covers_to: covers_to.unwrap_or(scan.last_op),
            compacted: covers_to.is_some(),
            index: scan.index,
        });
        if log.unavailable.is_some() {
            break;
        }
        if cut_after {
            drop_segments_from(i + 1, &mut notes)?;
            break;
        }
    }
    finish_recovery(&mut log, watermark, &mut notes);
    Ok((log, notes))
}

/// Where a damaged segment lies: the last one; in the tail a crash can have cut short (the
/// last segment, or the one before it when the crash hit a roll, with every segment after
/// it beginning past the watermark: damage deeper in the log is not a write cut short,
/// whatever a watermark that may lag says; a batch that spans more than two segments, only
/// possible with `log.segment_bytes` below the writer's 16 MiB batch, is refused rather
/// than guessed at); a compacted file.
#[derive(Clone, Copy, Debug)]
struct Tail {
    is_last: bool,
    near_tail: bool,
    compacted: bool,
}

/// A segment's damage: a torn tail (a write the crash cut short) is cut off; anything else
/// makes the swarm unavailable. Returns whether the segments after this one are to be
/// removed (they begin past the torn write).
fn settle_damage(
    log: &mut SwarmLog,
    path: &Path,
    scan: &Scan,
    damage: &(u64, String),
    tail: Tail,
    watermark: Option<OpId>,
    notes: &mut Vec<RecoveryNote>,
) -> std::io::Result<bool> {
    let name = log.name.clone();
    let note = |detail: String| RecoveryNote {
        swarm: name.clone(),
        detail,
    };
    let unacknowledged = |op: OpId| watermark.is_some_and(|w| op > w);
    let mut cut_after = false;
    let (offset, reason) = damage;
    let file_len = fs::metadata(path)?.len();
    let damaged_op = OpId(scan.last_op.0 + 1);
    let torn = match watermark {
        Some(_) => !tail.compacted && tail.near_tail && unacknowledged(damaged_op),
        // No watermark (written before there was one, or not under `always`):
        // the shape of the damage decides.
        None => tail.is_last && !tail.compacted && !scan.damage_is_mid,
    };
    if torn {
        cut_after = !tail.is_last;
        // Torn tail: cut it off; acknowledged ops all precede it.
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(scan.len)?;
        File::open(path)?.sync_all()?;
        let detail = format!(
            "truncated a torn tail of {} bytes at offset {offset} of {} ({reason})",
            file_len - scan.len,
            path.display()
        );
        tracing::warn!(swarm = %name, "{detail}");
        notes.push(note(detail));
    } else {
        let acknowledged = match watermark {
            Some(w) if damaged_op <= w => format!(
                "; op {} and those before it up to {} were acknowledged (the durable \
                 watermark)",
                damaged_op.0, w.0
            ),
            _ => String::new(),
        };
        let detail = format!(
            "damaged record at offset {offset} of {} ({reason}){acknowledged}; the \
             swarm is unavailable until the log is repaired or removed",
            path.display()
        );
        tracing::error!(swarm = %name, "{detail}");
        notes.push(note(detail.clone()));
        log.unavailable = Some(detail);
    }

    Ok(cut_after)
}

/// After the scan: a log with no segment left goes on after its watermark; a log that ends
/// before its watermark is unavailable (acknowledged ops are missing); appends go into a
/// plain segment after the last one.
fn finish_recovery(log: &mut SwarmLog, watermark: Option<OpId>, notes: &mut Vec<RecoveryNote>) {
    let name = log.name.clone();
    let dir = log.dir.clone();
    let note = |detail: String| RecoveryNote {
        swarm: name.clone(),
        detail,
    };
    // (Not for the router's own logs, which retention never trims: one without segments
    // lost its state, and refuses the start below.)
    if let (true, false, Some(w)) = (log.segments.is_empty(), is_internal(&name), watermark) {
        // Retention removed every segment and the crash came before the next one was on
        // disk: the log goes on after the ops acknowledged, never giving their ids out again.
        log.horizon = w;
        log.segments.push(Segment::empty(&dir, OpId(w.0 + 1)));
        notes.push(note(format!(
            "no segment left; the log goes on after op {} (the durable watermark)",
            w.0
        )));
    }
    if let Some(w) = watermark.filter(|w| log.unavailable.is_none() && log.last_op() < *w) {
        // Acknowledged ops are missing (a file shortened or removed by hand, or a disk
        // that lost synced data): never hand their op ids out again.
        let detail = format!(
            "the log ends at op {} but ops up to {} were acknowledged (the durable \
             watermark); the swarm is unavailable until the log is repaired or removed",
            log.last_op().0,
            w.0
        );
        tracing::error!(swarm = %name, "{detail}");
        notes.push(note(detail.clone()));
        log.unavailable = Some(detail);
    }
    log.durable_op = log.last_op();
    match log.segments.last() {
        None => log.segments.push(Segment::empty(&dir, OpId(1))),
        // Appends never go into a compacted segment: start a plain one after it.
        Some(last) if last.compacted => {
            let next = OpId(last.covers_to.0 + 1);
            log.segments.push(Segment::empty(&dir, next));
        }
        Some(_) => {}
    }
}

/// The segment files of a swarm's directory, in op order: (first op, last op of a
/// compacted file, path). Leftovers of interrupted compactions are removed: `.tmp` files
/// (their inputs are still in place) and files inside a compacted file's range (the
/// compaction was interrupted after its rename).
fn list_segments(dir: &Path) -> std::io::Result<Vec<(OpId, Option<OpId>, PathBuf)>> {
    let mut plain: Vec<(OpId, PathBuf)> = Vec::new();
    let mut compacted: Vec<(OpId, OpId, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            // An interrupted compaction: its inputs are still in place.
            fs::remove_file(&path)?;
            continue;
        }
        match parse_segment_name(&path) {
            Some(SegmentName::Plain(first)) => plain.push((first, path)),
            Some(SegmentName::Compacted(first, last)) => compacted.push((first, last, path)),
            None => {}
        }
    }
    // A compacted file replaces everything in its range; files still inside a range are
    // leftovers of a compaction interrupted after its rename, and are removed now.
    compacted.sort_by_key(|(first, last, _)| (*first, std::cmp::Reverse(*last)));
    let mut kept: Vec<(OpId, OpId, PathBuf)> = Vec::new();
    for (first, last, path) in compacted {
        if kept.iter().any(|(f, l, _)| *f <= first && last <= *l) {
            fs::remove_file(&path)?;
        } else {
            kept.push((first, last, path));
        }
    }
    let mut removed_leftovers = false;
    plain.retain(|(first, path)| {
        let inside = kept.iter().any(|(f, l, _)| f <= first && first <= l);
        if inside {
            removed_leftovers |= fs::remove_file(path).is_ok();
        }
        !inside
    });
    if removed_leftovers {
        sync_dir(dir)?;
    }
    let mut segments: Vec<(OpId, Option<OpId>, PathBuf)> = kept
        .into_iter()
        .map(|(first, last, path)| (first, Some(last), path))
        .chain(plain.into_iter().map(|(first, path)| (first, None, path)))
        .collect();
    segments.sort_by_key(|(first, _, _)| *first);
    Ok(segments)
}
