//! The router's clock across restarts.
//!
//! In a running router every time that is stored or compared (log record timestamps and
//! retention, lease validity, stops, job deadlines and dedup windows, presence) is
//! [`Clock`] time: the router's Unix milliseconds at start plus monotonic time since, so a
//! wall-clock step while it runs changes nothing.
//!
//! At start the clock is chosen against a checkpoint it keeps in the data directory
//! (`DATA_DIR/clock`: the host's boot id, milliseconds since boot, and the router's time,
//! rewritten every second):
//! - Same boot (the router restarted, the host did not): the time that really passed is
//!   known from the boot clock (`CLOCK_BOOTTIME`, which counts suspend and ignores wall
//!   steps). The router takes the wall clock only within `clock.max_restart_step_ms` of the
//!   time so measured: a step of the wall clock while the router was down moves the
//!   router's clock by at most that much.
//! - After a reboot the downtime cannot be measured: the router takes the wall clock, but
//!   never a time before its checkpoint (a clock stepped back never makes history or
//!   deadlines move backwards). A forward step across a reboot cannot be told from downtime.
//! - No checkpoint (a new data directory): the wall clock.
//!
//! The sources (wall clock, boot id, boot clock) are a trait so tests can step them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::control::Clock;

/// Where the router reads the time from at start.
pub trait ClockSource: Send + Sync + std::fmt::Debug {
    /// The wall clock, Unix milliseconds.
    fn wall_ms(&self) -> u64;
    /// The host's boot id and milliseconds since that boot, when the host tells them.
    fn boot(&self) -> Option<(String, u64)>;
}

/// The host's clocks: `SystemTime`, `/proc/sys/kernel/random/boot_id` and `/proc/uptime`
/// (`CLOCK_BOOTTIME`; Linux: elsewhere there is no boot clock, and every start counts as
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
        // The first field of /proc/uptime is CLOCK_BOOTTIME in seconds, to 10 ms.
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        Some((id.trim().to_owned(), (seconds * 1_000.0) as u64))
    }
}

/// What the checkpoint file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Checkpoint {
    boot_id: Option<String>,
    boot_ms: u64,
    router_ms: u64,
}

impl Checkpoint {
    fn parse(text: &str) -> Option<Checkpoint> {
        let mut fields = text.split_whitespace();
        let boot_id = fields.next()?;
        let boot_ms = fields.next()?.parse().ok()?;
        let router_ms = fields.next()?.parse().ok()?;
        Some(Checkpoint {
            boot_id: (boot_id != "-").then(|| boot_id.to_owned()),
            boot_ms,
            router_ms,
        })
    }

    fn render(&self) -> String {
        format!(
            "{} {} {}\n",
            self.boot_id.as_deref().unwrap_or("-"),
            self.boot_ms,
            self.router_ms
        )
    }
}

/// How the start time was chosen (for the start-up log line and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// No checkpoint: the wall clock.
    Fresh,
    /// Same boot: the wall clock, or the nearest time within the step bound of the time
    /// measured by the boot clock (`stepped_ms`: how far the wall clock was off it).
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
}

impl RouterClock {
    /// Chooses the start time from `source` and the checkpoint at `path` (see the module
    /// docs) and writes a checkpoint for it.
    pub fn start(
        path: &Path,
        source: Arc<dyn ClockSource>,
        max_restart_step_ms: u64,
    ) -> std::io::Result<RouterClock> {
        let wall = source.wall_ms();
        let boot = source.boot();
        let checkpoint = match std::fs::read_to_string(path) {
            Ok(text) => Checkpoint::parse(&text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error),
        };
        let (start_ms, started) = choose(
            wall,
            boot.as_ref(),
            checkpoint.as_ref(),
            max_restart_step_ms,
        );
        let clock = Clock::starting_at(Instant::now(), start_ms);
        let router = RouterClock {
            clock,
            started,
            path: path.to_owned(),
            source,
        };
        router.checkpoint()?;
        Ok(router)
    }

    /// Writes the checkpoint (the router's time now, with the boot clock's), atomically.
    pub fn checkpoint(&self) -> std::io::Result<()> {
        let (boot_id, boot_ms) = match self.source.boot() {
            Some((id, ms)) => (Some(id), ms),
            None => (None, 0),
        };
        let checkpoint = Checkpoint {
            boot_id,
            boot_ms,
            router_ms: self.clock.now_ms(),
        };
        // A name of its own: a router shutting down may write its last checkpoint while the
        // next one on the same data directory writes its first.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .path
            .with_extension(format!("{}.{n}.tmp", std::process::id()));
        std::fs::write(&tmp, checkpoint.render())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Rewrites the checkpoint every `interval` until `stop` is dropped (on a thread: it
    /// syncs a file).
    pub fn keep_checkpoint(
        self: &Arc<Self>,
        interval: Duration,
        stop: std::sync::mpsc::Receiver<()>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let clock = self.clone();
        std::thread::Builder::new()
            .name("swarmbus-clock".into())
            .spawn(move || loop {
                match stop.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(error) = clock.checkpoint() {
                            tracing::warn!(%error, path = %clock.path.display(), "writing the clock checkpoint failed");
                        }
                    }
                    _ => {
                        let _ = clock.checkpoint();
                        return;
                    }
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
    let same_boot = match (boot, &checkpoint.boot_id) {
        (Some((id, ms)), Some(was)) if id == was && *ms >= checkpoint.boot_ms => {
            Some(ms - checkpoint.boot_ms)
        }
        _ => None,
    };
    match same_boot {
        Some(elapsed) => {
            let measured = checkpoint.router_ms.saturating_add(elapsed);
            let low = measured
                .saturating_sub(max_step_ms)
                .max(checkpoint.router_ms);
            let high = measured.saturating_add(max_step_ms);
            let start = wall.clamp(low, high);
            let stepped_ms =
                (wall as i128 - measured as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
            (
                start,
                Started::SameBoot {
                    stepped_ms,
                    bounded: start != wall,
                },
            )
        }
        None => (
            wall.max(checkpoint.router_ms),
            Started::Rebooted {
                behind_ms: checkpoint.router_ms.saturating_sub(wall),
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
        let first = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        assert_eq!(first.started, Started::Fresh);
        let t0 = first.clock.now_ms();
        assert!((100 * DAY..100 * DAY + 1_000).contains(&t0));
        drop(first);

        // Ten seconds later by the boot clock, but the wall clock jumped 30 days ahead.
        source.boot_ms.store(15_000, Ordering::Relaxed);
        source.wall.store(130 * DAY, Ordering::Relaxed);
        let second = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        let t1 = second.clock.now_ms();
        assert!(matches!(
            second.started,
            Started::SameBoot { bounded: true, .. }
        ));
        assert!(
            t1 >= t0 + 10_000 && t1 <= t0 + 10_000 + 60_000 + 1_000,
            "{t1} vs {t0}"
        );
        // A wall clock running the router's own time plus a small correction is taken.
        let now = second.clock.now_ms();
        drop(second);
        source.boot_ms.store(16_000, Ordering::Relaxed);
        source.wall.store(now + 1_000 + 5_000, Ordering::Relaxed);
        let third = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        assert!(matches!(
            third.started,
            Started::SameBoot { bounded: false, .. }
        ));
        let t2 = third.clock.now_ms();
        assert!((now + 6_000..now + 7_000).contains(&t2), "{t2} vs {now}");

        // Stepped back a day while down: the router never goes back past its checkpoint.
        drop(third);
        let last = read_checkpoint(&path).router_ms;
        source.boot_ms.store(17_000, Ordering::Relaxed);
        source.wall.store(t2 - DAY, Ordering::Relaxed);
        let fourth = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        assert!(fourth.clock.now_ms() >= last + 1_000 - 60_000);
        assert!(fourth.clock.now_ms() >= last);
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
        let before = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        drop(before);
        let t0 = read_checkpoint(&path).router_ms;
        // Rebooted with a clock a day behind: the checkpoint's time.
        *source.boot_id.lock().unwrap() = "boot-b".into();
        source.boot_ms.store(1_000, Ordering::Relaxed);
        source.wall.store(99 * DAY, Ordering::Relaxed);
        let after = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        assert_eq!(
            after.started,
            Started::Rebooted {
                behind_ms: t0 - 99 * DAY
            }
        );
        assert!(after.clock.now_ms() >= t0);
        drop(after);
        // Rebooted again, a week later by the wall clock: taken (downtime looks the same).
        *source.boot_id.lock().unwrap() = "boot-c".into();
        source.wall.store(107 * DAY, Ordering::Relaxed);
        let later = RouterClock::start(&path, source.clone(), 60_000).unwrap();
        assert!(later.clock.now_ms() >= 107 * DAY);
    }

    #[test]
    fn the_checkpoint_reads_back_and_junk_counts_as_none() {
        let checkpoint = Checkpoint {
            boot_id: Some("abc".into()),
            boot_ms: 7,
            router_ms: 9,
        };
        assert_eq!(Checkpoint::parse(&checkpoint.render()), Some(checkpoint));
        let anonymous = Checkpoint {
            boot_id: None,
            boot_ms: 0,
            router_ms: 9,
        };
        assert_eq!(Checkpoint::parse(&anonymous.render()), Some(anonymous));
        assert_eq!(Checkpoint::parse("garbage"), None);
    }
}
