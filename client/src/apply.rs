//! Idempotent apply: at-least-once delivery becomes exactly-once effect.
//!
//! The router may deliver an ordered op more than once (redelivery after a reconnect or a
//! timeout). [`IdempotentApply`] keeps, per swarm and ordered class (control and command share
//! one op sequence but travel on separate streams, so each is tracked on its own), the epoch
//! of the log the agent applies from and the last op applied, and admits only ops above it. A delivery from another epoch means
//! the swarm's log was lost or recreated: the state restarts in the new epoch (and the change
//! is counted), because op ids of the old epoch mean nothing in the new one.
//!
//! The state is persisted through an [`OffsetStore`] ([`FileOffsetStore`] by default: one
//! small file replaced atomically by write-and-rename) and turned into the resume points a
//! reconnecting session sends in Hello ([`IdempotentApply::resume_points`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use swarmbus_schema::{Class, Deliver, Epoch, OpId, ResumePoint};

#[derive(Clone, Debug, Default)]
pub struct IdempotentApply {
    /// (epoch, last applied op) per (swarm, ordered class).
    state: HashMap<(String, Class), (Epoch, OpId)>,
    epoch_changes: u64,
    /// Where duplicates dropped and apply lags are counted, if anywhere.
    stats: Option<crate::ClientStats>,
}

impl IdempotentApply {
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores (swarm, class, epoch, last applied op) entries, as saved from
    /// [`IdempotentApply::state`].
    pub fn restore(state: impl IntoIterator<Item = (String, Class, Epoch, OpId)>) -> Self {
        IdempotentApply {
            state: state
                .into_iter()
                .map(|(swarm, class, epoch, op)| ((swarm, class), (epoch, op)))
                .collect(),
            epoch_changes: 0,
            stats: None,
        }
    }

    /// Counts what it drops, and the apply lag of what [`IdempotentApply::apply`] runs, in
    /// `stats`.
    pub fn with_stats(mut self, stats: crate::ClientStats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Whether op `op_id` of `class` in `swarm` (from the log of `epoch`) should be applied;
    /// records it when so. Unordered messages (op id 0) are always admitted; an ordered op at
    /// or below the last applied one of its class and epoch is a duplicate and is refused.
    pub fn admit(&mut self, swarm: &str, class: Class, epoch: Epoch, op_id: OpId) -> bool {
        if op_id.is_none() || !class.is_ordered() {
            return true;
        }
        match self.state.get_mut(&(swarm.to_owned(), class)) {
            Some((known, last)) if *known == epoch => {
                if op_id <= *last {
                    if let Some(stats) = &self.stats {
                        stats.duplicate_dropped();
                    }
                    return false;
                }
                *last = op_id;
                true
            }
            Some((known, last)) => {
                *known = epoch;
                *last = op_id;
                self.epoch_changes += 1;
                true
            }
            None => {
                self.state.insert((swarm.to_owned(), class), (epoch, op_id));
                true
            }
        }
    }

    /// Runs `apply` on `delivery` unless it was applied already; returns its result.
    /// With stats, its publish -> apply lag is counted once `apply` returns.
    pub fn apply<T>(&mut self, delivery: &Deliver, apply: impl FnOnce(&Deliver) -> T) -> Option<T> {
        let admitted = self.admit(
            &delivery.swarm,
            delivery.class,
            delivery.epoch,
            delivery.op_id,
        );
        admitted.then(|| {
            let done = apply(delivery);
            if let Some(stats) = &self.stats {
                stats.applied(delivery);
            }
            done
        })
    }

    /// The last command op applied in `swarm` (see [`IdempotentApply::last_applied_of`]).
    pub fn last_applied(&self, swarm: &str) -> OpId {
        self.last_applied_of(swarm, Class::Command)
    }

    pub fn last_applied_of(&self, swarm: &str, class: Class) -> OpId {
        self.state
            .get(&(swarm.to_owned(), class))
            .map(|s| s.1)
            .unwrap_or_default()
    }

    /// The epoch the command ops of `swarm` were applied from.
    pub fn epoch(&self, swarm: &str) -> Option<Epoch> {
        self.state
            .get(&(swarm.to_owned(), Class::Command))
            .or_else(|| self.state.get(&(swarm.to_owned(), Class::Control)))
            .map(|s| s.0)
    }

    /// How many times a swarm's epoch changed under this helper.
    pub fn epoch_changes(&self) -> u64 {
        self.epoch_changes
    }

    /// (swarm, class, epoch, last applied op) per swarm and ordered class, to persist.
    pub fn state(&self) -> impl Iterator<Item = (&str, Class, Epoch, OpId)> {
        self.state
            .iter()
            .map(|((swarm, class), (epoch, op))| (swarm.as_str(), *class, *epoch, *op))
    }

    /// Resume points for Hello: the router then sends only the ops after them.
    pub fn resume_points(&self) -> Vec<ResumePoint> {
        self.state
            .iter()
            .map(|((swarm, class), (epoch, op))| ResumePoint {
                swarm: swarm.clone(),
                class: *class,
                epoch: *epoch,
                last_applied: *op,
            })
            .collect()
    }

    /// Saves the state to `store`.
    pub fn save(&self, store: &dyn OffsetStore) -> std::io::Result<()> {
        let entries: Vec<_> = self
            .state()
            .map(|(swarm, class, epoch, op)| (swarm.to_owned(), class, epoch, op))
            .collect();
        store.save(&entries)
    }

    /// Loads the state saved in `store` (empty when nothing was saved yet).
    pub fn load(store: &dyn OffsetStore) -> std::io::Result<Self> {
        Ok(Self::restore(store.load()?))
    }
}

/// Where the last applied op per swarm is kept between runs. Implement it to keep offsets
/// next to the application's own state (in the same transaction, ideally).
pub trait OffsetStore: Send + Sync {
    fn load(&self) -> std::io::Result<Vec<(String, Class, Epoch, OpId)>>;
    /// Replaces the saved state with `entries`, atomically.
    fn save(&self, entries: &[(String, Class, Epoch, OpId)]) -> std::io::Result<()>;
}

/// An [`OffsetStore`] in one file. `save` writes a temporary file beside it, syncs it and
/// renames it over the old one (then syncs the directory), so a crash leaves either the old
/// or the new state, never a mix. Format: one line per swarm and class,
/// `epoch op class hex(swarm)`.
#[derive(Clone, Debug)]
pub struct FileOffsetStore {
    path: PathBuf,
}

impl FileOffsetStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileOffsetStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn invalid(detail: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, detail)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl OffsetStore for FileOffsetStore {
    fn load(&self) -> std::io::Result<Vec<(String, Class, Epoch, OpId)>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let bad = || invalid(format!("{}: bad line {line:?}", self.path.display()));
                let mut parts = line.split(' ');
                let epoch = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let op = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let class = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let swarm = parts
                    .next()
                    .and_then(unhex)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(bad)?;
                Ok((swarm, class, Epoch(epoch), OpId(op)))
            })
            .collect()
    }

    fn save(&self, entries: &[(String, Class, Epoch, OpId)]) -> std::io::Result<()> {
        let mut text = String::new();
        for (swarm, class, epoch, op) in entries {
            text.push_str(&format!(
                "{} {} {} {}\n",
                epoch.0,
                op.0,
                class,
                hex(swarm.as_bytes())
            ));
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_duplicates_and_older_ops_per_swarm() {
        let e = Epoch(7);
        let c = Class::Command;
        let mut apply = IdempotentApply::new();
        assert!(apply.admit("a", c, e, OpId(1)));
        assert!(apply.admit("a", c, e, OpId(2)));
        assert!(!apply.admit("a", c, e, OpId(2)));
        assert!(!apply.admit("a", c, e, OpId(1)));
        assert!(apply.admit("b", c, e, OpId(1)));
        assert!(apply.admit("a", Class::Telemetry, Epoch(0), OpId::NONE));
        // Control shares the op sequence but arrives on its own stream: op 1 of control is
        // new although command op 2 was applied.
        assert!(apply.admit("a", Class::Control, e, OpId(1)));
        assert_eq!(apply.last_applied("a"), OpId(2));
        assert_eq!(apply.last_applied_of("a", Class::Control), OpId(1));
        let restored =
            IdempotentApply::restore(apply.state().map(|(k, c, e, v)| (k.to_owned(), c, e, v)));
        assert_eq!(restored.last_applied("a"), OpId(2));
        assert_eq!(restored.last_applied("b"), OpId(1));
    }

    #[test]
    fn a_new_epoch_restarts_the_sequence() {
        let c = Class::Command;
        let mut apply = IdempotentApply::new();
        assert!(apply.admit("a", c, Epoch(1), OpId(50)));
        // The log was recreated: op 3 of epoch 2 is new, not a duplicate of epoch 1's op 3.
        assert!(apply.admit("a", c, Epoch(2), OpId(3)));
        assert_eq!(apply.epoch("a"), Some(Epoch(2)));
        assert_eq!(apply.epoch_changes(), 1);
        assert!(!apply.admit("a", c, Epoch(2), OpId(2)));
    }

    #[test]
    fn file_store_round_trips_atomically() {
        let dir = std::env::temp_dir().join(format!("swarmbus-offsets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = FileOffsetStore::new(dir.join("offsets"));
        assert!(IdempotentApply::load(&store)
            .unwrap()
            .resume_points()
            .is_empty());
        let mut apply = IdempotentApply::new();
        apply.admit(
            "swarm with spaces\nand a newline",
            Class::Command,
            Epoch(9),
            OpId(41),
        );
        apply.admit("b", Class::Control, Epoch(3), OpId(2));
        apply.save(&store).unwrap();
        let loaded = IdempotentApply::load(&store).unwrap();
        assert_eq!(
            loaded.last_applied("swarm with spaces\nand a newline"),
            OpId(41)
        );
        assert_eq!(loaded.epoch("b"), Some(Epoch(3)));
        assert_eq!(loaded.last_applied_of("b", Class::Control), OpId(2));
        assert!(!dir.join("offsets.tmp").exists());
        std::fs::write(store.path(), "garbage\n").unwrap();
        assert!(IdempotentApply::load(&store).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
