//! The router's clock across restarts.
//!
//! In a running router every time that is stored or compared (log record timestamps and
//! retention, lease validity, stops, job deadlines and dedup windows, presence) is
//! [`Clock`] time: the router's Unix milliseconds at start plus the time passed since on
//! the boot clock (`CLOCK_BOOTTIME`: it counts suspend and ignores wall-clock steps), so a
//! wall-clock step while it runs changes nothing.
//!
//! At start the clock is chosen against a checkpoint it keeps in the data directory
//! (`DATA_DIR/clock`: the host's boot id, the boot clock, the router's time, and the offset
//! between them chosen at the first start of this boot; rewritten every second). It never
//! starts before the checkpoint plus what the router can have stamped after it (the
//! checkpoint interval, or on the same boot the time passed if less):
//! - Same boot (the router restarted, the host did not): the router takes the wall clock
//!   only within `clock.max_restart_step_ms` of the time its first start on this boot would
//!   read now: a step of the wall clock while the router was down moves the router's clock
//!   by at most that much, however often it restarts.
//! - After a reboot the downtime cannot be measured: the router takes the wall clock, but
//!   never a time before its checkpoint (a clock stepped back never makes history or
//!   deadlines move backwards). A forward step across a reboot cannot be told from downtime.
//! - No checkpoint, or one that cannot be read: the wall clock.
//!
//! The sources (wall clock, boot id, boot clock) are a trait so tests can step them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the router reads the time from at start.
pub trait ClockSource: Send + Sync + std::fmt::Debug {
    /// The wall clock, Unix milliseconds.
    fn wall_ms(&self) -> u64;
    /// The host's boot id and milliseconds since that boot, when the host tells them.
    fn boot(&self) -> Option<(String, u64)>;
}

/// The host's clocks: `SystemTime`, `/proc/sys/kernel/random/boot_id` and
/// `CLOCK_BOOTTIME` (Linux: elsewhere there is no boot clock, and every start counts as
/// after a reboot).
#[derive(Debug, Default)]
pub struct SystemClock;

impl ClockSource for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default()
    }

    fn boot(&self) -> Option<(String, u64)> {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some((id.trim().to_owned(), boot_clock_ms()?))
    }
}

/// The boot clock (`CLOCK_BOOTTIME`), milliseconds: monotonic, counting time suspended,
/// unmoved by wall-clock steps, and the host's even inside a container (where
/// `/proc/uptime` may be the container's). `None` off Linux.
pub fn boot_clock_ms() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through the pointer, which points at a
        // live local of that type.
        #[allow(unsafe_code)] // one clock_gettime into a timespec we own
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
        (rc == 0).then(|| now.tv_sec as u64 * 1_000 + now.tv_nsec as u64 / 1_000_000)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The router's clock: Unix milliseconds that never go backwards (the time chosen at start,
/// see the module doc, plus the time passed since on the boot clock, which counts suspend
/// and ignores wall-clock steps; on hosts without one, monotonic time). Every time the
/// router stores or compares is stated in it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_unix_ms: u64,
    start_boot_ms: Option<u64>,
}

impl Clock {
    /// Starts at the wall clock (tests and tools; the router starts from
    /// [`RouterClock`]).
    pub fn new() -> Self {
        Self::starting_at(
            Instant::now(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
        )
    }

    /// A clock that reads `unix_ms` now (`start`).
    pub fn starting_at(start: Instant, unix_ms: u64) -> Self {
        Clock {
            start,
            start_unix_ms: unix_ms,
            start_boot_ms: boot_clock_ms(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        match (self.start_boot_ms, boot_clock_ms()) {
            (Some(start), Some(now)) => self.start_unix_ms + now.saturating_sub(start),
            _ => {
                self.start_unix_ms
                    + Instant::now()
                        .saturating_duration_since(self.start)
                        .as_millis() as u64
            }
        }
    }

    /// The time to pass to the protocol's state machines.
    pub fn now(&self) -> swarmbus_proto::Now {
        let instant = Instant::now();
        swarmbus_proto::Now {
            instant,
            unix_ms: self.now_ms(),
            wall_us: wall_us_now(),
        }
    }
}

/// The host's wall clock now (Unix µs). For stamps that measure lag across processes (the
/// other side reads its wall clock), never for times the router stores or compares (those
/// are the router's clock, which never steps back).
pub fn wall_us_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What the checkpoint file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Checkpoint {
    boot_id: Option<String>,
    boot_ms: u64,
    router_ms: u64,
    /// Router time minus boot time as chosen at the first start of this boot: restarts on
    /// the same boot stay within the step bound of it, so repeated restarts (a crash loop)
    /// cannot add their steps up.
    base_offset_ms: i64,
}

impl Checkpoint {
    fn parse(text: &str) -> Option<Checkpoint> {
        let mut fields = text.split_whitespace();
        let boot_id = fields.next()?;
        let boot_ms: u64 = fields.next()?.parse().ok()?;
        let router_ms: u64 = fields.next()?.parse().ok()?;
        let base_offset_ms = match fields.next() {
            Some(base) => base.parse().ok()?,
            None => (router_ms as i64).saturating_sub(boot_ms as i64),
        };
        Some(Checkpoint {
            boot_id: (boot_id != "-").then(|| boot_id.to_owned()),
            boot_ms,
            router_ms,
            base_offset_ms,
        })
    }

    fn render(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.boot_id.as_deref().unwrap_or("-"),
            self.boot_ms,
            self.router_ms,
            self.base_offset_ms
        )
    }
}

/// How often the checkpoint is rewritten. What the router stamped after its last one is
/// at most this much later, so a start never comes before the checkpoint plus this.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// How the start time was chosen (for the start-up log line and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// No checkpoint: the wall clock.
    Fresh,
    /// Same boot: the wall clock, or the nearest time within the step bound (`stepped_ms`:
    /// how far the wall clock was from the time measured by the boot clock).
    SameBoot { stepped_ms: i64, bounded: bool },
    /// After a reboot: the wall clock, or the checkpoint when the wall clock is before it.
    Rebooted { behind_ms: u64 },
}

/// The router's clock and its checkpoint file.
#[derive(Debug)]
pub struct RouterClock {
    pub clock: Clock,
    pub started: Started,
    path: PathBuf,
    source: Arc<dyn ClockSource>,
    /// The boot this run started in, and that boot's base offset.
    base: (Option<String>, i64),
}

impl RouterClock {
    /// Chooses the start time from `source` and the checkpoint at `path` (see the module
    /// docs) and writes a checkpoint for it. A checkpoint that cannot be read counts as
    /// none and one that cannot be written leaves the clock as chosen: both are logged and
    /// neither stops the router (it then cannot bound a step at its next start).
    pub fn start(
        path: &Path,
        source: Arc<dyn ClockSource>,
        max_restart_step_ms: u64,
    ) -> RouterClock {
        let wall = source.wall_ms();
        let boot = source.boot();
        let checkpoint = match std::fs::read(path) {
            Ok(bytes) => {
                let parsed = std::str::from_utf8(&bytes).ok().and_then(Checkpoint::parse);
                if parsed.is_none() {
                    tracing::warn!(path = %path.display(), "the clock checkpoint is unreadable; the router's clock starts at the wall clock");
                }
                parsed
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "the clock checkpoint cannot be read; the router's clock starts at the wall clock");
                None
            }
        };
        let (start_ms, started) = choose(
            wall,
            boot.as_ref(),
            checkpoint.as_ref(),
            max_restart_step_ms,
        );
        let base_offset_ms = match (&checkpoint, started) {
            (Some(checkpoint), Started::SameBoot { .. }) => checkpoint.base_offset_ms,
            _ => start_ms as i64 - boot.as_ref().map_or(0, |(_, ms)| *ms as i64),
        };
        let router = RouterClock {
            clock: Clock::starting_at(Instant::now(), start_ms),
            started,
            path: path.to_owned(),
            base: (boot.map(|(id, _)| id), base_offset_ms),
            source,
        };
        if let Err(error) = router.checkpoint() {
            tracing::warn!(path = %path.display(), %error, "writing the clock checkpoint failed");
        }
        router
    }

    /// Writes the checkpoint (the router's time now, with the boot clock's), atomically.
    pub fn checkpoint(&self) -> std::io::Result<()> {
        let (boot_id, boot_ms) = match self.source.boot() {
            Some((id, ms)) => (Some(id), ms),
            None => (None, 0),
        };
        let router_ms = self.clock.now_ms();
        let base_offset_ms = if boot_id == self.base.0 {
            self.base.1
        } else {
            router_ms as i64 - boot_ms as i64
        };
        let checkpoint = Checkpoint {
            boot_id,
            boot_ms,
            router_ms,
            base_offset_ms,
        };
        // A name of its own: a router shutting down may write its last checkpoint while the
        // next one on the same data directory writes its first.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .path
            .with_extension(format!("{}.{n}.tmp", std::process::id()));
        let written = (|| {
            std::fs::write(&tmp, checkpoint.render())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // Its directory entry too, so that the first checkpoint survives a power loss.
            match self.path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Rewrites the checkpoint every [`CHECKPOINT_INTERVAL`] until `stop` is dropped (on a
    /// thread: it syncs a file), and once more then.
    pub fn keep_checkpoint(
        self: &Arc<Self>,
        stop: std::sync::mpsc::Receiver<()>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let clock = self.clone();
        std::thread::Builder::new()
            .name("swarmbus-clock".into())
            .spawn(move || loop {
                let stopping = !matches!(
                    stop.recv_timeout(CHECKPOINT_INTERVAL),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
                if let Err(error) = clock.checkpoint() {
                    tracing::warn!(%error, path = %clock.path.display(), "writing the clock checkpoint failed");
                }
                if stopping {
                    return;
                }
            })
    }
}

/// The start time for `wall`, the boot clock now and the checkpoint (see the module docs).
fn choose(
    wall: u64,
    boot: Option<&(String, u64)>,
    checkpoint: Option<&Checkpoint>,
    max_step_ms: u64,
) -> (u64, Started) {
    let Some(checkpoint) = checkpoint else {
        return (wall, Started::Fresh);
    };
    // Stamps after the last checkpoint are at most an interval later (and, on the same
    // boot, no later than the time passed since): never start before.
    let interval = CHECKPOINT_INTERVAL.as_millis() as u64;
    let floor = checkpoint.router_ms.saturating_add(interval);
    let same_boot = match (boot, &checkpoint.boot_id) {
        (Some((id, ms)), Some(was)) if id == was && *ms >= checkpoint.boot_ms => Some(*ms),
        _ => None,
    };
    match same_boot {
        Some(boot_now) => {
            let floor = checkpoint
                .router_ms
                .saturating_add(interval.min(boot_now - checkpoint.boot_ms));
            // What the first start of this boot would read now: the bound is around it, so
            // that restarts cannot add their steps up.
            let based = checkpoint
                .base_offset_ms
                .saturating_add(boot_now.min(i64::MAX as u64) as i64)
                .max(0) as u64;
            let low = based.saturating_sub(max_step_ms).max(floor);
            let high = based.saturating_add(max_step_ms).max(low);
            let start = wall.clamp(low, high);
            let stepped_ms =
                (wall as i128 - based as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
            (
                start,
                Started::SameBoot {
                    stepped_ms,
                    bounded: start != wall,
                },
            )
        }
        None => (
            wall.max(floor),
            Started::Rebooted {
                behind_ms: floor.saturating_sub(wall),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// A clock source the test steps.
    #[derive(Debug, Default)]
    pub struct Stepped {
        wall: AtomicU64,
        boot_ms: AtomicU64,
        boot_id: Mutex<String>,
    }

    impl ClockSource for Stepped {
        fn wall_ms(&self) -> u64 {
            self.wall.load(Ordering::Relaxed)
        }
        fn boot(&self) -> Option<(String, u64)> {
            Some((
                self.boot_id.lock().unwrap().clone(),
                self.boot_ms.load(Ordering::Relaxed),
            ))
        }
    }

    const DAY: u64 = 24 * 3600 * 1000;

    #[test]
    fn a_wall_clock_step_while_down_moves_the_router_by_at_most_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let source = Arc::new(Stepped::default());
        *source.boot_id.lock().unwrap() = "boot-a".into();
        source.wall.store(100 * DAY, Ordering::Relaxed);
        source.boot_ms.store(5_000, Ordering::Relaxed);
        let first = RouterClock::start(&path, source.clone(), 60_000);
        assert_eq!(first.started, Started::Fresh);
        let t0 = first.clock.now_ms();
        assert!((100 * DAY..100 * DAY + 1_000).contains(&t0));
        drop(first);

        // Ten seconds later by the boot clock, the wall clock 5 s ahead of that (a small
        // correction): taken.
        source.boot_ms.store(15_000, Ordering::Relaxed);
        source.wall.store(100 * DAY + 15_000, Ordering::Relaxed);
        let second = RouterClock::start(&path, source.clone(), 60_000);
        assert!(matches!(
            second.started,
            Started::SameBoot { bounded: false, .. }
        ));
        let t1 = second.clock.now_ms();
        assert!(
            (100 * DAY + 15_000..100 * DAY + 16_000).contains(&t1),
            "{t1}"
        );
        drop(second);

        // Another ten seconds, and the wall clock jumped 30 days ahead: the router moves by
        // at most the bound past the time the boot clock measured.
        source.boot_ms.store(25_000, Ordering::Relaxed);
        source.wall.store(130 * DAY, Ordering::Relaxed);
        let third = RouterClock::start(&path, source.clone(), 60_000);
        assert!(matches!(
            third.started,
            Started::SameBoot { bounded: true, .. }
        ));
        let t2 = third.clock.now_ms();
        assert!(t2 <= 100 * DAY + 20_000 + 60_000 + 1_000, "{t2}");
        drop(third);

        // Stepped back a day while down: the router never goes back past its checkpoint.
        let last = read_checkpoint(&path).router_ms;
        source.boot_ms.store(26_000, Ordering::Relaxed);
        source.wall.store(t2 - DAY, Ordering::Relaxed);
        let fourth = RouterClock::start(&path, source.clone(), 60_000);
        assert!(fourth.clock.now_ms() >= last + CHECKPOINT_INTERVAL.as_millis() as u64);
    }

    fn read_checkpoint(path: &Path) -> Checkpoint {
        Checkpoint::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn after_a_reboot_the_wall_clock_counts_but_never_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let source = Arc::new(Stepped::default());
        *source.boot_id.lock().unwrap() = "boot-a".into();
        source.wall.store(100 * DAY, Ordering::Relaxed);
        let before = RouterClock::start(&path, source.clone(), 60_000);
        drop(before);
        let t0 = read_checkpoint(&path).router_ms;
        // Rebooted with a clock a day behind: the checkpoint's time (plus the interval the
        // last stamps may have come after it).
        *source.boot_id.lock().unwrap() = "boot-b".into();
        source.boot_ms.store(1_000, Ordering::Relaxed);
        source.wall.store(99 * DAY, Ordering::Relaxed);
        let after = RouterClock::start(&path, source.clone(), 60_000);
        assert_eq!(
            after.started,
            Started::Rebooted {
                behind_ms: t0 + 1_000 - 99 * DAY
            }
        );
        assert!(after.clock.now_ms() >= t0 + 1_000);
        drop(after);
        // Rebooted again, a week later by the wall clock: taken (downtime looks the same).
        *source.boot_id.lock().unwrap() = "boot-c".into();
        source.wall.store(107 * DAY, Ordering::Relaxed);
        let later = RouterClock::start(&path, source.clone(), 60_000);
        assert!(later.clock.now_ms() >= 107 * DAY);
    }

    #[test]
    fn the_checkpoint_reads_back_and_junk_counts_as_none() {
        let checkpoint = Checkpoint {
            boot_id: Some("abc".into()),
            boot_ms: 7,
            router_ms: 9,
            base_offset_ms: -3,
        };
        assert_eq!(Checkpoint::parse(&checkpoint.render()), Some(checkpoint));
        let anonymous = Checkpoint {
            boot_id: None,
            boot_ms: 0,
            router_ms: 9,
            base_offset_ms: 9,
        };
        assert_eq!(Checkpoint::parse(&anonymous.render()), Some(anonymous));
        // Three fields (no base offset yet): the offset of the checkpoint itself.
        assert_eq!(
            Checkpoint::parse("abc 7 9").map(|c| c.base_offset_ms),
            Some(2)
        );
        assert_eq!(Checkpoint::parse("garbage"), None);
    }

    #[test]
    fn restarts_in_a_row_cannot_add_their_steps_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let source = Arc::new(Stepped::default());
        *source.boot_id.lock().unwrap() = "boot-a".into();
        source.wall.store(100 * DAY, Ordering::Relaxed);
        source.boot_ms.store(1_000, Ordering::Relaxed);
        let first = RouterClock::start(&path, source.clone(), 60_000);
        let t0 = first.clock.now_ms();
        drop(first);
        // The wall clock jumps 30 days ahead; the router crashes and restarts 300 times, a
        // second apart by the boot clock, then 300 times 100 ms apart.
        source.wall.store(130 * DAY, Ordering::Relaxed);
        let mut boot_ms = 1_000;
        let mut last = t0;
        for restart in 0..600u64 {
            boot_ms += if restart < 300 { 1_000 } else { 100 };
            source.boot_ms.store(boot_ms, Ordering::Relaxed);
            let clock = RouterClock::start(&path, source.clone(), 60_000);
            last = clock.clock.now_ms();
        }
        // 330 s passed by the boot clock: the router is at most one step past that.
        let passed = boot_ms - 1_000;
        assert!(
            last <= t0 + passed + 60_000 + 1_000,
            "{} ms past",
            last - t0 - passed
        );
    }

    #[test]
    fn an_unreadable_or_unwritable_checkpoint_does_not_stop_the_router() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Stepped::default());
        source.wall.store(100 * DAY, Ordering::Relaxed);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, [0xff, 0xfe, 0x00]).unwrap();
        let clock = RouterClock::start(&junk, source.clone(), 60_000);
        assert_eq!(clock.started, Started::Fresh);
        // A checkpoint path in a directory that does not exist: nothing can be written.
        let nowhere = dir.path().join("missing").join("clock");
        let clock = RouterClock::start(&nowhere, source, 60_000);
        assert!(clock.clock.now_ms() >= 100 * DAY);
        assert!(clock.checkpoint().is_err());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
