//! The router's clock across restarts, with the host's clocks stepped by the test: a
//! wall-clock step while the router was down must not age out history.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use swarmbus_client::{Connector, PublishOptions};
use swarmbus_router::clock::ClockSource;
use swarmbus_router::{Config, Router};
use swarmbus_schema::{Class, OpId, Role};

use crate::common::TestRouter;

const DAY: u64 = 24 * 3600 * 1000;

/// The host's clocks as the test sets them.
#[derive(Debug)]
struct Stepped {
    wall: AtomicU64,
    boot_ms: AtomicU64,
    boot_id: Mutex<String>,
}

impl ClockSource for Stepped {
    fn wall_ms(&self) -> u64 {
        self.wall.load(Ordering::Relaxed)
    }
    fn boot(&self) -> Option<(String, u64)> {
        let id = self.boot_id.lock().unwrap().clone();
        Some((id, self.boot_ms.load(Ordering::Relaxed)))
    }
}

impl Stepped {
    /// Moves the clocks on: the boot clock by `elapsed_ms`, the wall clock by `wall_ms`,
    /// and a new boot id when `reboot`.
    fn step(&self, elapsed_ms: u64, wall_ms: u64, reboot: bool) {
        self.boot_ms.fetch_add(elapsed_ms, Ordering::Relaxed);
        self.wall.fetch_add(wall_ms, Ordering::Relaxed);
        if reboot {
            self.boot_id.lock().unwrap().push('+');
        }
    }
}

fn config(data: &Path) -> Config {
    let mut config = crate::common::config_in(data);
    config.shards = 1;
    config.log.segment_bytes = 4096;
    config.log.hot_bytes = 0;
    config.log.compaction_interval_ms = 50;
    config.log.command_max_age_ms = DAY;
    config.presence.heartbeat_timeout_ms = 60_000;
    config
}

async fn start(data: &Path, clock: &Arc<Stepped>) -> TestRouter {
    let router = Router::start_with_clock(config(data), clock.clone())
        .await
        .expect("router starts");
    let connector = Connector::new(router.ca_path().expect("development CA"), "localhost").unwrap();
    TestRouter::from_parts(router, connector)
}

/// Publishes 60 commands of about 100 bytes to "s" (a new 4 KiB segment every 30 or so).
async fn publish_60(t: &TestRouter) {
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    for i in 0..60 {
        let payload = Bytes::from(format!("{i:03}-{}", "x".repeat(100)));
        ctl.publish("s", Class::Command, payload, PublishOptions::default())
            .await
            .unwrap();
    }
}

/// Waits until a compaction of "s" covered ops past `op` (so the old segments were
/// compacted again, after the restart).
async fn compacted_past(data: &Path, op: u64) {
    let dir = data
        .join("log")
        .join(swarmbus_router::log::store::swarm_dir_name("s"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let covered = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| {
                let range = name.strip_suffix(".compacted.log")?;
                range.split_once('-')?.1.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0);
        if covered > op {
            return;
        }
        assert!(Instant::now() < deadline, "no compaction past op {op}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ops 1..=60 of "s" (the first 60 published) a delta finds.
async fn kept(t: &TestRouter) -> u32 {
    let (reader, _rx) = t.connect("reader", Role::Agent, &["s"]).await;
    let ack = reader.delta("s", OpId(1), OpId(60)).await.unwrap();
    ack.count
}

#[tokio::test]
async fn a_wall_clock_step_while_the_router_is_down_does_not_age_out_history() {
    let data = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let clock = Arc::new(Stepped {
        wall: AtomicU64::new(now),
        boot_ms: AtomicU64::new(1_000),
        boot_id: Mutex::new("boot".into()),
    });
    let t = start(data.path(), &clock).await;
    publish_60(&t).await;
    assert_eq!(kept(&t).await, 60);
    t.router.shutdown().await;

    // Restarted two seconds later on the same boot, the wall clock 30 days ahead (more
    // than the commands' one-day age limit). New commands make new segments, so the old
    // ones are compacted again, against the router's clock: nothing ages out.
    clock.step(2_000, 30 * DAY, false);
    let t = start(data.path(), &clock).await;
    publish_60(&t).await;
    compacted_past(data.path(), 60).await;
    assert_eq!(kept(&t).await, 60, "history aged out by a clock step");
    t.router.shutdown().await;

    // After a reboot the router cannot tell a step from downtime: 30 days later by the wall
    // clock, the first commands are past their age and compaction removes them.
    clock.step(0, 0, true);
    let t = start(data.path(), &clock).await;
    publish_60(&t).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = kept(&t).await;
        if count < 60 {
            break;
        }
        assert!(Instant::now() < deadline, "{count} ops kept past their age");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.router.shutdown().await;
}

/// A job's deadline is stored in the router's time: a wall-clock step while the router was
/// down does not make it pass early.
#[tokio::test]
async fn a_wall_clock_step_while_the_router_is_down_does_not_expire_deadlines() {
    use swarmbus_schema::SubmitJob;
    let data = tempfile::tempdir().unwrap();
    let clock = Arc::new(Stepped {
        wall: AtomicU64::new(1_000 * DAY),
        boot_ms: AtomicU64::new(1_000),
        boot_id: Mutex::new("boot".into()),
    });
    let t = start(data.path(), &clock).await;
    let (agent, _rx) = t.connect("agent", Role::Agent, &["s"]).await;
    let submit = SubmitJob {
        swarm: "s".into(),
        idempotency_key: "k".into(),
        deadline_ms: 3_600_000,
        payload: Bytes::from_static(b"work"),
        ..SubmitJob::default()
    };
    agent.submit_job(submit).await.unwrap();
    drop(agent);
    t.router.shutdown().await;
    // Back a second later by the boot clock, a day later by the wall clock: the job (an
    // hour to go) is still queued, not dead-lettered for a missed deadline.
    clock.step(1_000, DAY, false);
    let t = start(data.path(), &clock).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = t.router.job_counts();
    assert_eq!((counts.queued, counts.dead_lettered), (1, 0), "{counts:?}");
    t.router.shutdown().await;
}
