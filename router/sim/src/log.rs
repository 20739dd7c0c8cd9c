//! The simulated event log: one append-only record list per swarm, a durable prefix made
//! by the simulated writer in seeded batches, and crashes that lose what is not durable.
//!
//! Records are stored as the bytes the router writes ([`RecordParts::to_bytes`]) and read
//! back through [`parse_record`], so the record format is exercised on every read.

use std::collections::BTreeMap;

use bytes::Bytes;
use swarmbus_proto::record::{parse_record, Record, RecordParts};
use swarmbus_schema::{decode, DecodeOptions, Deliver, Epoch, Message, OpId};

use crate::rng::SimRng;

/// One swarm's log.
#[derive(Debug)]
pub struct SwarmLog {
    pub epoch: Epoch,
    /// Record bytes, op `i + 1` at index `i` (the log refuses anything else).
    records: Vec<Bytes>,
    /// Records `..durable` survive a crash.
    durable: usize,
}

impl SwarmLog {
    /// The last op written (durable or not).
    pub fn last_written(&self) -> OpId {
        OpId(self.records.len() as u64)
    }

    pub fn last_durable(&self) -> OpId {
        OpId(self.durable as u64)
    }

    /// The record of `op`, parsed (written records, durable or not, as a file read sees
    /// them).
    pub fn record(&self, op: OpId) -> Option<Record> {
        let at = usize::try_from(op.0.checked_sub(1)?).ok()?;
        let bytes = self.records.get(at)?;
        parse_record(bytes).ok().map(|(record, _)| record)
    }

    /// The Deliver frame stored in the durable record of `op`, decoded.
    pub fn durable_deliver(&self, op: OpId) -> Option<Deliver> {
        if op > self.last_durable() {
            return None;
        }
        deliver_of(&self.record(op)?.frame)
    }
}

/// The Deliver message of a stored frame (length prefix included).
pub fn deliver_of(frame: &Bytes) -> Option<Deliver> {
    match decode(
        frame.get(4..).map(|_| frame.slice(4..))?,
        &DecodeOptions::default(),
    ) {
        Ok(Message::Deliver(deliver)) => Some(deliver),
        _ => None,
    }
}

/// Why the log refused an append: a hole or a repeat in the op ids (the sequencer's
/// gap-free promise broken) or an append to a log never created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRefused(pub String);

/// How a crash treats what was written but not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// Power loss: everything not durable is gone.
    PowerLoss,
    /// The process was killed: the page cache keeps a seeded prefix of each swarm's
    /// unsynced records (never a hole).
    ProcessKill,
}

/// Every swarm's log.
#[derive(Debug, Default)]
pub struct SimLog {
    swarms: BTreeMap<String, SwarmLog>,
}

impl SimLog {
    /// Creates `swarm`'s log (the router's writer makes the directory durable before the
    /// first append). A log that exists keeps its epoch.
    pub fn create(&mut self, swarm: &str, epoch: Epoch) {
        self.swarms.entry(swarm.to_owned()).or_insert(SwarmLog {
            epoch,
            records: Vec::new(),
            durable: 0,
        });
    }

    pub fn append(
        &mut self,
        swarm: &str,
        op: OpId,
        record: &RecordParts,
    ) -> Result<(), AppendRefused> {
        let Some(log) = self.swarms.get_mut(swarm) else {
            return Err(AppendRefused(format!(
                "append of op {} to {swarm}, which has no log",
                op.0
            )));
        };
        let expected = log.records.len() as u64 + 1;
        if op.0 != expected {
            return Err(AppendRefused(format!(
                "{swarm}: op {} appended where op {expected} was due",
                op.0
            )));
        }
        if record.epoch() != log.epoch {
            return Err(AppendRefused(format!(
                "{swarm}: op {} of epoch {} appended to the log of epoch {}",
                op.0,
                record.epoch().0,
                log.epoch.0
            )));
        }
        log.records.push(record.to_bytes());
        Ok(())
    }

    pub fn swarm(&self, name: &str) -> Option<&SwarmLog> {
        self.swarms.get(name)
    }

    /// Every swarm's log, by name.
    pub fn swarms(&self) -> impl Iterator<Item = (&str, &SwarmLog)> {
        self.swarms.iter().map(|(name, log)| (name.as_str(), log))
    }

    /// Swarms with records written but not yet durable.
    pub fn unsynced(&self) -> Vec<String> {
        self.swarms
            .iter()
            .filter(|(_, log)| log.durable < log.records.len())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Makes up to `count` more records of `swarm` durable; returns the durable op now
    /// when it moved.
    pub fn sync(&mut self, swarm: &str, count: usize) -> Option<OpId> {
        let log = self.swarms.get_mut(swarm)?;
        let before = log.durable;
        log.durable = log.durable.saturating_add(count).min(log.records.len());
        (log.durable > before).then(|| log.last_durable())
    }

    /// Reads up to `max` records of `swarm` from `from` on, as a file read does: written
    /// records, durable or not.
    pub fn read(&self, swarm: &str, from: OpId, max: usize) -> Vec<Record> {
        let Some(log) = self.swarms.get(swarm) else {
            return Vec::new();
        };
        let start = from.0.max(1);
        (start..=log.last_written().0)
            .take(max)
            .filter_map(|op| log.record(OpId(op)))
            .collect()
    }

    /// Every durable record of `swarm`, in log order (what recovery reads at start).
    pub fn durable_records(&self, swarm: &str) -> Vec<Record> {
        let Some(log) = self.swarms.get(swarm) else {
            return Vec::new();
        };
        (1..=log.last_durable().0)
            .filter_map(|op| log.record(OpId(op)))
            .collect()
    }

    /// A crash: what is not durable is lost (or, for a killed process, a prefix of it
    /// stays and counts as durable from now on); logs left with no record and never
    /// synced are gone. Returns how many records were lost.
    pub fn crash(&mut self, kind: CrashKind, rng: &mut SimRng) -> usize {
        let mut lost = 0;
        for log in self.swarms.values_mut() {
            let unsynced = log.records.len() - log.durable;
            let kept = match kind {
                CrashKind::PowerLoss => 0,
                CrashKind::ProcessKill => rng.below(unsynced as u64 + 1) as usize,
            };
            log.durable += kept;
            lost += unsynced - kept;
            log.records.truncate(log.durable);
        }
        lost
    }

    /// The injected fault of the checker's own test: the newest durable record of
    /// `swarm` vanishes (a disk that lied about a sync).
    pub fn lose_newest_durable(&mut self, swarm: &str) -> Option<OpId> {
        let log = self.swarms.get_mut(swarm)?;
        if log.durable == 0 {
            return None;
        }
        let lost = log.last_durable();
        log.durable -= 1;
        log.records.truncate(log.durable);
        Some(lost)
    }
}
