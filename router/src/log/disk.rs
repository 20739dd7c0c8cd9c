//! The seam between the log writer and the disk, and a disk that fails on demand.
//!
//! Every file operation of the writers (opening a segment, writing a batch into it, syncing
//! it and its directory, cutting failed bytes off, creating a swarm's directory) goes
//! through a [`Disk`]. In production that is the real disk and the seam costs one branch
//! per operation. Tests start the router with a [`FaultDisk`]
//! ([`crate::Router::start_with`]), which injects ENOSPC, EIO, short writes and slow or
//! failing syncs, and simulates **power loss**: it remembers how much of each file was
//! made durable (by a sync that returned), and [`FaultDisk::power_loss`] stops every
//! further operation and discards the rest (optionally tearing the first unsynced page).
//!
//! The model of power loss, stated so that a test knows what it covers:
//! - A file's bytes survive up to the length it had when its last `fdatasync` returned
//!   (or a synced cut); everything after is discarded.
//! - A file this disk saw created survives only once its directory was synced after it
//!   was created; before that, power loss removes it. A file that existed before its first
//!   operation here counts as durable at the length it had then.
//! - A torn page: of the discarded bytes, a seeded prefix of the first unsynced 4 KiB page
//!   is kept and the rest of that page reads as zeros, as when a page was part written.
//! - Operations in flight at the cut are finished before the files are cut, and all of them
//!   (and all later ones) return EIO to the writer: it never learns that they succeeded.
//! - Outside the seam: a swarm directory's epoch and name files and the durable watermarks,
//!   each written and synced before anything relies on it, and compaction's output
//!   (written, synced and renamed into place); power loss keeps them as they are. Removals
//!   of files (retention, rollback) count as durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The disk under a log writer: the real one, or a [`FaultDisk`].
#[derive(Clone, Debug, Default)]
pub struct Disk(Option<Arc<FaultDisk>>);

impl Disk {
    /// The real disk, with nothing injected.
    pub fn real() -> Self {
        Disk(None)
    }

    /// Operations go through `faults` first.
    pub fn faulty(faults: Arc<FaultDisk>) -> Self {
        Disk(Some(faults))
    }

    /// Starts an operation on `path`: refused (with the injected error) or granted. The
    /// caller performs it and hands the result to [`Grant::end`].
    pub(crate) fn begin(&self, op: DiskOp, path: &Path) -> std::io::Result<Grant> {
        match &self.0 {
            None => Ok(Grant::default()),
            Some(faults) => faults.begin(op, path),
        }
    }
}

/// A file operation of a log writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DiskOp {
    /// Creating a swarm's log directory (with its epoch and name files).
    CreateDir,
    /// Opening (creating if needed) a segment for writing.
    Open,
    /// Writing this many bytes.
    Write(usize),
    /// `fdatasync` of the file, with a sync of its directory when `true`.
    Sync { dir: bool },
    /// Cutting the file to this length, then syncing it.
    Cut(u64),
}

/// Permission for one operation. With a fault disk it holds the operation in flight until
/// [`Grant::end`] (or drop), so that a power loss waits for it.
#[derive(Debug, Default)]
pub(crate) struct Grant {
    held: Option<Held>,
    /// A write: how many of its bytes to write (a short write writes fewer).
    pub limit: Option<usize>,
    /// How long to wait before a sync (a slow disk).
    pub delay: Duration,
}

#[derive(Debug)]
struct Held {
    disk: Arc<FaultDisk>,
    path: PathBuf,
    /// The error to return once the operation ran (after a short write).
    then: Option<i32>,
    /// What the operation makes durable once it returns: the file's length (taken when a
    /// sync began: bytes written during it may have missed it) and whether its directory
    /// entry too.
    durable: Option<(u64, bool)>,
}

impl Grant {
    /// Finishes the operation with what the real one returned: a fault disk records what
    /// became durable, turns a short write into its error, and fails everything that ends
    /// after a power loss.
    pub(crate) fn end<T>(mut self, result: std::io::Result<T>) -> std::io::Result<T> {
        match self.held.take() {
            None => result,
            Some(held) => held.disk.clone().end(held, result),
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            // Ended without a result (an early return): it no longer holds a power loss up.
            let _ = held.disk.clone().end(held, Err::<(), _>(eio()));
        }
    }
}

/// What an injected write fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// The disk is full: the write fails with ENOSPC, none of its bytes written (also the
    /// creation of a swarm's directory).
    NoSpace,
    /// The write fails with EIO, none of its bytes written.
    Io,
    /// Half the bytes are written, then ENOSPC (a short write on a disk that filled up).
    Short,
}

/// What a power loss discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerLoss {
    /// Files cut back to their durable length.
    pub files_cut: u64,
    /// Files removed: created, never made durable in their directory.
    pub files_removed: u64,
    /// Bytes discarded, over all files.
    pub bytes_discarded: u64,
    /// Files whose first unsynced page was left torn.
    pub pages_torn: u64,
}

/// What a fault disk did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounts {
    pub writes: u64,
    pub syncs: u64,
    /// Operations that failed because of an injected fault (not counting those after a
    /// power loss).
    pub injected: u64,
    /// Operations refused or failed because the power was lost.
    pub after_power_loss: u64,
}

/// A disk that fails on demand, for tests (see the module docs for its model of power
/// loss). Share it (`Arc`) between the test and [`crate::Router::start_with`]; one power
/// loss per instance: the next router on the same data directory gets a new one.
#[derive(Debug)]
pub struct FaultDisk {
    state: Mutex<State>,
    /// Signalled when the last operation in flight ends.
    idle: Condvar,
}

#[derive(Debug)]
struct State {
    powered: bool,
    in_flight: usize,
    /// Writes still allowed before `write_fault` applies.
    writes_before_fault: u64,
    write_fault: Option<WriteFault>,
    sync_fails: bool,
    sync_delay: Duration,
    files: HashMap<PathBuf, Track>,
    counts: DiskCounts,
    rng: u64,
}

/// What survives of a file on power loss.
#[derive(Clone, Copy, Debug)]
struct Track {
    /// Bytes made durable.
    durable_len: u64,
    /// Whether its directory entry is durable.
    entry_durable: bool,
}

const PAGE: u64 = 4096;

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl FaultDisk {
    /// A disk that works until told otherwise; `seed` decides the torn pages.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(FaultDisk {
            state: Mutex::new(State {
                powered: true,
                in_flight: 0,
                writes_before_fault: 0,
                write_fault: None,
                sync_fails: false,
                sync_delay: Duration::ZERO,
                files: HashMap::new(),
                counts: DiskCounts::default(),
                rng: seed,
            }),
            idle: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it left only counters behind: go on with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every write (and every creation of a swarm directory) fails with `fault`,
    /// until [`FaultDisk::heal`].
    pub fn fail_writes(&self, fault: WriteFault) {
        self.fail_writes_after(0, fault);
    }

    /// The next `writes` writes go through; the ones after fail with `fault`, until
    /// [`FaultDisk::heal`] (a disk that fills up in the middle of a group commit). Creations
    /// of swarm directories do not count as writes: they fail once the writes do.
    pub fn fail_writes_after(&self, writes: u64, fault: WriteFault) {
        let mut state = self.lock();
        state.writes_before_fault = writes;
        state.write_fault = Some(fault);
    }

    /// From now on every sync fails with EIO (cuts of failed bytes, which sync, too), until
    /// [`FaultDisk::heal`].
    pub fn fail_syncs(&self) {
        self.lock().sync_fails = true;
    }

    /// Every sync takes `delay` longer (zero: as fast as the disk is).
    pub fn slow_syncs(&self, delay: Duration) {
        self.lock().sync_delay = delay;
    }

    /// Ends the injected failures and delays (not a power loss).
    pub fn heal(&self) {
        let mut state = self.lock();
        state.write_fault = None;
        state.sync_fails = false;
        state.sync_delay = Duration::ZERO;
    }

    /// What this disk did so far.
    pub fn counts(&self) -> DiskCounts {
        self.lock().counts
    }

    /// How many files a power loss now would cut or remove: written past their durable
    /// length, or not durable in their directory yet.
    pub fn at_risk(&self) -> usize {
        let state = self.lock();
        state
            .files
            .iter()
            .filter(|(path, track)| match std::fs::metadata(path) {
                Ok(meta) => !track.entry_durable || meta.len() > track.durable_len,
                Err(_) => false,
            })
            .count()
    }

    /// Cuts the power: waits for the operations in flight, refuses every later one with
    /// EIO, and discards from every file what was not durable (`tear`: the first unsynced
    /// page of each file left torn, seeded). The router above keeps running on a dead disk;
    /// stop it and start a new one on the data directory to recover.
    pub fn power_loss(&self, tear: bool) -> PowerLoss {
        let mut state = self.lock();
        state.powered = false;
        while state.in_flight > 0 {
            state = self.idle.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let mut loss = PowerLoss::default();
        let mut files: Vec<(PathBuf, Track)> = state.files.drain().collect();
        // The same seed tears the same pages, whatever the map's order.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, track) in files {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // Removed: removals count as durable.
            };
            let len = meta.len();
            if !track.entry_durable {
                if std::fs::remove_file(&path).is_ok() {
                    loss.files_removed += 1;
                    loss.bytes_discarded += len;
                }
                continue;
            }
            if len <= track.durable_len {
                continue;
            }
            // Bytes not kept as written.
            let result = (|| -> std::io::Result<u64> {
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                if tear {
                    // Keep a prefix of the first unsynced page; the rest of it reads as zeros.
                    let page_end = (track.durable_len / PAGE + 1) * PAGE;
                    let span = page_end.min(len) - track.durable_len;
                    let keep = track.durable_len + splitmix(&mut state.rng) % (span + 1);
                    file.set_len(keep)?;
                    file.set_len(page_end.min(len))?;
                    Ok(len - keep)
                } else {
                    file.set_len(track.durable_len)?;
                    Ok(len - track.durable_len)
                }
            })();
            match result {
                Ok(discarded) => {
                    loss.files_cut += 1;
                    loss.pages_torn += u64::from(tear);
                    loss.bytes_discarded += discarded;
                }
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "simulating power loss failed")
                }
            }
        }
        loss
    }

    fn begin(self: &Arc<Self>, op: DiskOp, path: &Path) -> std::io::Result<Grant> {
        let mut state = self.lock();
        if !state.powered {
            state.counts.after_power_loss += 1;
            return Err(eio());
        }
        let mut grant = Grant::default();
        let mut then = None;
        match op {
            DiskOp::CreateDir | DiskOp::Write(_) => {
                // Only writes count against the writes allowed before the fault.
                let fault = match (state.write_fault, op) {
                    (Some(_), _) if state.writes_before_fault > 0 => {
                        if let DiskOp::Write(_) = op {
                            state.writes_before_fault -= 1;
                        }
                        None
                    }
                    (fault, _) => fault,
                };
                if let DiskOp::Write(_) = op {
                    state.counts.writes += 1;
                }
                match (fault, op) {
                    (None, _) => {}
                    (Some(WriteFault::Io), _) => {
                        state.counts.injected += 1;
                        return Err(eio());
                    }
                    (Some(WriteFault::Short), DiskOp::Write(len)) if len > 1 => {
                        state.counts.injected += 1;
                        grant.limit = Some(len / 2);
                        then = Some(libc::ENOSPC);
                    }
                    (Some(_), _) => {
                        state.counts.injected += 1;
                        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                }
            }
            DiskOp::Sync { .. } | DiskOp::Cut(_) => {
                // A cut syncs too.
                state.counts.syncs += 1;
                if state.sync_fails {
                    state.counts.injected += 1;
                    return Err(eio());
                }
                grant.delay = state.sync_delay;
            }
            DiskOp::Open => {}
        }
        let exists = path.exists();
        let creates = matches!(op, DiskOp::Open | DiskOp::Cut(_)) && !exists;
        if op != DiskOp::CreateDir && (creates || !state.files.contains_key(path)) {
            // A file created here is not in its directory for good until that is synced; one
            // there before this disk saw it is durable as it is.
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            state.files.insert(
                path.to_owned(),
                Track {
                    durable_len: len,
                    entry_durable: exists,
                },
            );
        }
        let durable = match op {
            DiskOp::Sync { dir } => Some((std::fs::metadata(path).map_or(0, |m| m.len()), dir)),
            DiskOp::Cut(len) => Some((len, false)),
            _ => None,
        };
        state.in_flight += 1;
        grant.held = Some(Held {
            disk: self.clone(),
            path: path.to_owned(),
            then,
            durable,
        });
        Ok(grant)
    }

    fn end<T>(&self, held: Held, result: std::io::Result<T>) -> std::io::Result<T> {
        let mut state = self.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.idle.notify_all();
        }
        if !state.powered {
            state.counts.after_power_loss += 1;
            return Err(eio());
        }
        let value = result?;
        if let Some(code) = held.then {
            return Err(std::io::Error::from_raw_os_error(code));
        }
        if let (Some((len, dir)), Some(track)) = (held.durable, state.files.get_mut(&held.path)) {
            track.durable_len = len;
            track.entry_durable |= dir;
        }
        Ok(value)
    }
}

/// splitmix64: the torn-page lengths of a seed (no cryptographic use; a crate would add
/// a dependency for four lines).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn write(disk: &Disk, path: &Path, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let grant = disk.begin(DiskOp::Open, path)?;
        let file = grant.end(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path),
        )?;
        let grant = disk.begin(DiskOp::Write(bytes.len()), path)?;
        let limit = grant.limit.unwrap_or(bytes.len());
        grant.end(file.write_all_at(&bytes[..limit], offset))
    }

    fn sync(disk: &Disk, path: &Path, dir: bool) -> std::io::Result<()> {
        let grant = disk.begin(DiskOp::Sync { dir }, path)?;
        grant.end(std::fs::File::open(path).and_then(|f| f.sync_data()))
    }

    #[test]
    fn power_loss_keeps_what_was_synced_and_removes_files_never_synced_in_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultDisk::new(1);
        let disk = Disk::faulty(faults.clone());
        let (a, b, old) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("old"),
        );
        std::fs::File::create(&old)
            .unwrap()
            .write_all(b"before")
            .unwrap();
        write(&disk, &a, 0, b"synced").unwrap();
        sync(&disk, &a, true).unwrap();
        write(&disk, &a, 6, b" lost").unwrap();
        write(&disk, &b, 0, b"data synced, entry not").unwrap();
        sync(&disk, &b, false).unwrap();
        write(&disk, &old, 6, b" and after").unwrap();
        let loss = faults.power_loss(false);
        assert_eq!(std::fs::read(&a).unwrap(), b"synced");
        assert!(!b.exists());
        assert_eq!(std::fs::read(&old).unwrap(), b"before");
        assert_eq!(
            loss,
            PowerLoss {
                files_cut: 2,
                files_removed: 1,
                bytes_discarded: 5 + 22 + 10,
                pages_torn: 0
            }
        );
        // Dead from then on.
        let refused = write(&disk, &a, 6, b"x").unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EIO));
        assert_eq!(std::fs::read(&a).unwrap(), b"synced");
    }

    #[test]
    fn a_torn_page_keeps_a_seeded_prefix_and_zeros_to_the_page_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut kept = Vec::new();
        for seed in 0..8 {
            let faults = FaultDisk::new(seed);
            let disk = Disk::faulty(faults.clone());
            let _ = std::fs::remove_file(&path);
            write(&disk, &path, 0, &[1u8; 100]).unwrap();
            sync(&disk, &path, true).unwrap();
            write(&disk, &path, 100, &[2u8; 10_000]).unwrap();
            let loss = faults.power_loss(true);
            assert_eq!(loss.pages_torn, 1);
            let data = std::fs::read(&path).unwrap();
            assert_eq!(
                data.len(),
                4096,
                "cut at the end of the first unsynced page"
            );
            assert!(data[..100].iter().all(|&b| b == 1));
            let prefix = data[100..].iter().take_while(|&&b| b == 2).count();
            assert!(data[100 + prefix..].iter().all(|&b| b == 0));
            kept.push(prefix);
        }
        kept.sort();
        kept.dedup();
        assert!(kept.len() > 1, "seeds tear at different points: {kept:?}");
    }

    #[test]
    fn injected_faults_fail_writes_and_syncs_until_healed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let faults = FaultDisk::new(0);
        let disk = Disk::faulty(faults.clone());
        faults.fail_writes_after(1, WriteFault::NoSpace);
        write(&disk, &path, 0, b"first").unwrap();
        let full = write(&disk, &path, 5, b"second").unwrap_err();
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
        faults.fail_writes(WriteFault::Short);
        let short = write(&disk, &path, 5, b"1234").unwrap_err();
        assert_eq!(short.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"first12",
            "half of it written"
        );
        faults.fail_writes(WriteFault::Io);
        assert_eq!(
            write(&disk, &path, 5, b"x").unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        faults.heal();
        faults.fail_syncs();
        assert_eq!(
            sync(&disk, &path, false).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        faults.heal();
        write(&disk, &path, 5, b" again").unwrap();
        sync(&disk, &path, false).unwrap();
        assert_eq!(faults.counts().injected, 4);
        assert_eq!(std::fs::read(&path).unwrap(), b"first again");
    }
}
