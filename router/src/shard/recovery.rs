//! A swarm whose log failed: unavailable, refused to its pending publishers, and brought
//! back with backoff once its log takes appends again.

use super::*;

impl Shard {
    /// A write of `swarm` failed: its pending publishers are refused, the log is rolled
    /// back to its last durable op (the writer cut the bytes off), and the swarm is
    /// unavailable until [`Shard::try_recoveries`] gets the log to take appends again.
    pub(super) fn log_failed(
        &mut self,
        swarm: Arc<str>,
        from: OpId,
        generation: u64,
        detail: &str,
        truncated: bool,
        now: Now,
    ) {
        if !self.log.on_failed(&swarm, from, generation) {
            return; // an earlier generation's failure, handled already
        }
        self.stats
            .log_write_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(%swarm, op = from.0, %detail, truncated, "event log append failed; the swarm is unavailable until its log takes writes again");
        self.core.handle_log_failed(&swarm, from, detail);
        let internal = swarm.starts_with('$');
        let recovery = self.recovering.entry(swarm).or_insert(Recovery {
            attempts: 0,
            next_try: now.instant,
            voiding_to: None,
            from,
        });
        recovery.from = recovery.from.min(from);
        if recovery.voiding_to.take().is_some() {
            recovery.attempts += 1;
        } else {
            self.stats
                .log_unavailable_swarms
                .fetch_add(1, Ordering::Relaxed);
            if internal {
                self.stats
                    .internal_log_unavailable
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        recovery.next_try = now.instant + recovery_backoff(recovery.attempts);
    }

    /// Tries again, for each swarm whose log failed and whose backoff has passed, to make
    /// the log take writes: the refused ops are written as void records (the first write
    /// cuts the file back to the last durable record first). Once they are durable the
    /// swarm is served again ([`Shard::recovery_progress`]).
    pub(super) fn try_recoveries(&mut self, now: Now) {
        let due: Vec<Arc<str>> = self
            .recovering
            .iter()
            .filter(|(_, r)| r.voiding_to.is_none() && r.next_try <= now.instant)
            .map(|(swarm, _)| swarm.clone())
            .collect();
        for swarm in due {
            let mut from = OpId(self.core.durable_op(&swarm).0 + 1);
            if self.log.is_shared(&swarm) {
                // The ops before the failure are in the log (their follower may not have
                // reported them yet): voiding them would erase them.
                if let Some(recovery) = self.recovering.get(&swarm) {
                    from = from.max(recovery.from);
                }
            }
            let to = OpId(self.core.next_op(&swarm).0 - 1);
            let result = match self.core.epoch(&swarm) {
                Some(epoch) if !self.log.exists(&swarm) => self.log.create(&swarm, epoch),
                _ => Ok(()),
            }
            .and_then(|()| self.log.append_voids(&swarm, from, to, now.unix_ms));
            let Some(recovery) = self.recovering.get_mut(&swarm) else {
                continue;
            };
            match result {
                Ok(()) => recovery.voiding_to = Some(to),
                Err(error) => {
                    recovery.attempts += 1;
                    recovery.next_try = now.instant + recovery_backoff(recovery.attempts);
                    tracing::warn!(%swarm, error = %crate::error::report(&error), attempts = recovery.attempts, "the event log still refuses the swarm's writes");
                }
            }
            if from > to {
                // Nothing was refused (the failure came before any op): served again now.
                self.recovery_progress(&swarm, to);
            }
        }
    }

    /// Ops of `swarm` up to `up_to` are durable: a recovering swarm whose void records all
    /// are is served again.
    pub(super) fn recovery_progress(&mut self, swarm: &Arc<str>, up_to: OpId) {
        let done = self
            .recovering
            .get(swarm)
            .is_some_and(|r| r.voiding_to.is_some_and(|to| up_to >= to));
        if done {
            if let Some(recovery) = self.recovering.remove(swarm) {
                self.core.handle_log_recovered(swarm);
                self.stats.log_recoveries.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .log_unavailable_swarms
                    .fetch_sub(1, Ordering::Relaxed);
                if swarm.starts_with('$') {
                    self.stats
                        .internal_log_unavailable
                        .fetch_sub(1, Ordering::Relaxed);
                }
                tracing::warn!(%swarm, attempts = recovery.attempts, "the event log takes the swarm's writes again; the swarm is served");
            }
        }
    }
}

/// How long a swarm waits before its log is tried again: 100 ms, doubling, at most 30 s.
pub(super) fn recovery_backoff(attempts: u32) -> std::time::Duration {
    let ms = 100u64.saturating_mul(1 << attempts.min(9));
    std::time::Duration::from_millis(ms.min(30_000))
}
