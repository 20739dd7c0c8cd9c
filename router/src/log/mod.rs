//! The event log: the source of truth for coordination.
//!
//! - [`record`]: the record format (length, CRC32C, epoch, op, timestamp, class, key, frame).
//! - [`store`]: per-swarm segmented files, sparse index, recovery and reads.
//! - [`writer`]: the writer thread with group commit (io_uring or plain file backend).
//!
//! The router uses the log through [`LogBackend`]; [`ShardLog`] is the embedded
//! implementation (one per shard, all sharing one writer thread). A replicated backend on an
//! existing distributed engine can implement the same trait later.

pub mod record;
pub mod store;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use swarmbus_schema::{Epoch, OpId};
use thiserror::Error;

pub use record::{encode_record, Record, RecordParts};
pub use store::{recover_all, RecoveryNote, SwarmLog};
pub use writer::{LogEvent, LogWriter, WriterKind};

/// When appends are made durable. A publisher's command is acknowledged once it is durable
/// under this policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
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

/// Errors of the log. `Unavailable` is per swarm (others are served); `Io` and `Stopped`
/// mean the append was not made and will not be.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogError {
    #[error("swarm {swarm:?} is unavailable: {reason}")]
    Unavailable { swarm: String, reason: String },
    #[error("event log I/O for swarm {swarm:?}: {detail}")]
    Io { swarm: String, detail: String },
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
}

/// The log as a shard sees it. Appends complete asynchronously: the backend reports
/// [`LogEvent::Durable`] (or `Failed`) on the shard's event channel.
pub trait LogBackend: Send {
    /// Every swarm the log holds, with its state (after recovery).
    fn swarms(&self) -> Vec<(Arc<str>, LogState)>;
    /// Starts the log of a new swarm with `epoch`.
    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError>;
    /// Appends op `op` (the next one of the swarm).
    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError>;
    /// Reads durable records from op `from` on, bounded by count and bytes.
    fn read_from(
        &self,
        swarm: &str,
        from: OpId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError>;
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
}

impl ShardLog {
    pub fn new(
        shard: usize,
        log_dir: &Path,
        segment_bytes: u64,
        writer: LogWriter,
        recovered: Vec<SwarmLog>,
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
        }
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
                    },
                )
            })
            .collect()
    }

    fn create(&mut self, swarm: &Arc<str>, epoch: Epoch) -> Result<(), LogError> {
        let mut log = SwarmLog::new(&self.log_dir, swarm, epoch);
        log.create_on_disk().map_err(|e| LogError::Io {
            swarm: swarm.to_string(),
            detail: e.to_string(),
        })?;
        self.swarms.insert(swarm.clone(), log);
        Ok(())
    }

    fn append(&mut self, swarm: &Arc<str>, op: OpId, record: RecordParts) -> Result<(), LogError> {
        let log = self.swarms.get_mut(swarm).ok_or_else(|| LogError::Io {
            swarm: swarm.to_string(),
            detail: "append to a swarm log that was never created".into(),
        })?;
        if let Some(reason) = &log.unavailable {
            return Err(LogError::Unavailable {
                swarm: swarm.to_string(),
                reason: reason.clone(),
            });
        }
        let (path, offset, new_file) = log.place(op, record.len() as u64, self.segment_bytes);
        self.writer
            .submit(writer::WriteRequest {
                path: Arc::new(path),
                offset,
                record,
                new_file,
                shard: self.shard,
                swarm: swarm.clone(),
                op,
            })
            .map_err(|_| LogError::Stopped)
    }

    fn read_from(
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
            .map_err(|e| LogError::Io {
                swarm: swarm.to_owned(),
                detail: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests;
