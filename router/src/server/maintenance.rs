//! The router's periodic work: job and worker deadlines, the bulk-intake governor, presence
//! timeouts.

use super::*;

/// Pushes frames to the session lanes they are for.
pub(super) fn push_all(frames: Vec<Outgoing>) {
    for (outbox, frame) in frames {
        let _ = outbox.push(Lane::Session, frame);
    }
}

/// The job queue's clock (lease expiry, backoff, deadlines; every 10 ms), on the bulk
/// runtime with the rest of the job traffic.
pub(super) async fn job_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let due = context.jobs().tick(context.now_ms());
        context.apply_job_effects(due);
    }
}

pub(super) async fn worker_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_reap = std::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let now = context.clock.now();
        let expired = context.workers().expire(now);
        push_all(expired);
        if now.instant.duration_since(last_reap) >= Duration::from_secs(10) {
            last_reap = now.instant;
            let pins = context.workers().reap(now);
            if let Err(error) = context.write_pins(pins).await {
                tracing::warn!(%error, "ends of expired session pins not written");
            }
        }
    }
}

/// The governor's loop (see [`swarmbus_proto::governor`]): samples the host's idle CPU and the
/// router's counters, and sets the budget for bulk intake (telemetry and job messages).
pub(super) async fn govern_bulk_intake(context: std::sync::Weak<Context>) {
    let Some(mut host) = crate::host_cpu::HostCpu::open() else {
        tracing::warn!("the governor cannot read /proc/stat: it stays idle");
        return;
    };
    let Some(config) = context.upgrade().map(|c| c.config.governor.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut governor = swarmbus_proto::governor::Governor::new(config);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let Some(budget) = &context.bulk_intake else {
            return;
        };
        let stats = &context.stats;
        let before = (governor.rate(), governor.cuts());
        let rate = governor.step(swarmbus_proto::governor::Sample {
            now: std::time::Instant::now(),
            idle: host.idle_since_last(),
            ordered: stats.ordered_published.load(Ordering::Relaxed),
            intake: budget.taken(),
        });
        if (rate, governor.cuts()) != before {
            budget.set(rate);
            stats
                .governed_intake_per_s
                .store(rate.map_or(0, |rate| rate.ceil() as u64), Ordering::Relaxed);
            stats
                .governor_cuts
                .store(governor.cuts(), Ordering::Relaxed);
        }
    }
}

/// Declares agents without a heartbeat for the heartbeat timeout gone (every 100 ms): their
/// leave is announced and their connection closed with HeartbeatTimeout.
pub(super) async fn presence_maintenance(context: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sweeps = 0u64;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(context) = context.upgrade() else {
            return;
        };
        let timeout = u64::from(context.config.presence.timeout_ms());
        if timeout == 0 {
            continue;
        }
        let now_ms = context.clock.now_ms();
        sweeps += 1;
        if sweeps.is_multiple_of(10) {
            // Once a second: expired lease holdings give their holders' places back.
            context.control().leases.sweep(now_ms);
        }
        let gone = context.control().presence.expire(now_ms, timeout);
        for (agent, present) in gone {
            context.stats.presence_leaves[1].fetch_add(1, Ordering::Relaxed);
            present.outbox.request_close(ErrorCode::HeartbeatTimeout);
            context
                .announce_presence(&agent, &present, "leave", "timeout")
                .await;
        }
    }
}
