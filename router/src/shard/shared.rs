//! Swarms whose log is shared with other routers (`log.backend = "jetstream"`): a swarm
//! takes ordered requests only once its shared log is open here, so every router serves
//! it with the log's epoch and ops. The requests that arrive first wait, in order, for the
//! open; ops appended through other routers come back from the log and are delivered here.

use std::sync::Arc;

use swarmbus_proto::core::{CoreError, ReplayedOp};
use swarmbus_schema::OpId;

use super::{deliver_meta, refuse, Shard, ShardCommand};
use crate::log::{Record, SharedLog};

impl Shard {
    /// Whether `command` waits for its swarm's shared log to open (starting the open when
    /// it is the first to). Every request naming a swarm waits while earlier ones do, so
    /// a connection's requests for one swarm are handled in the order they came.
    pub(super) fn park_for_shared_log(
        &mut self,
        command: ShardCommand,
        now: swarmbus_proto::time::Now,
    ) -> Option<ShardCommand> {
        let Some((swarm, needs_log, creator)) = command_swarm(&command) else {
            return Some(command);
        };
        if let Some(waiting) = self.parked.get_mut(swarm) {
            waiting.push(command);
            return None;
        }
        if !needs_log || self.core.has_log(swarm) || !self.log.needs_open(swarm) {
            return Some(command);
        }
        // The swarm counts against the caps from here, as a new swarm of the embedded log
        // does at its first request (and is freed again if its log does not open).
        let swarm: Arc<str> = Arc::from(swarm);
        let epoch = match self.core.prepare_shared(&swarm, Some(creator)) {
            Ok(epoch) => epoch,
            Err(error) => {
                self.refuse_waiting(command, &error, now);
                return None;
            }
        };
        self.log.open_shared(&swarm, epoch);
        self.parked.insert(swarm, vec![command]);
        None
    }

    /// The shared log of `swarm` was opened (or could not be): the requests that waited
    /// are handled now (or refused).
    pub(super) fn shared_log_opened(
        &mut self,
        swarm: Arc<str>,
        result: Result<SharedLog, String>,
        now: swarmbus_proto::time::Now,
    ) {
        let waiting = self.parked.remove(&swarm).unwrap_or_default();
        match result {
            Ok(log) => {
                self.log.on_opened(&swarm, &log);
                self.core.adopt_log(&swarm, log.epoch, log.last_op);
                for command in waiting {
                    self.handle(command, now);
                }
            }
            Err(detail) => {
                tracing::warn!(%swarm, %detail, "the swarm's shared log could not be opened");
                self.core.open_failed(&swarm);
                let error = CoreError::Unavailable {
                    swarm: swarm.to_string(),
                    reason: format!("its log on the cluster could not be opened: {detail}"),
                };
                for command in waiting {
                    self.refuse_waiting(command, &error, now);
                }
            }
        }
    }

    /// Refuses a request that waited for a shared log that did not open; requests that
    /// need no log are handled.
    fn refuse_waiting(
        &mut self,
        command: ShardCommand,
        error: &CoreError,
        now: swarmbus_proto::time::Now,
    ) {
        match command {
            ShardCommand::Subscribe {
                outbox,
                subscription,
                held,
                ..
            } if subscription.class.is_ordered() => {
                held.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&(
                        subscription.swarm.clone(),
                        subscription.class,
                        subscription.agent_filter.clone(),
                    ));
                refuse(&outbox, subscription.request_id, error);
            }
            ShardCommand::Publish {
                outbox, publish, ..
            } if publish.class.is_ordered() => refuse(&outbox, publish.request_id, error),
            ShardCommand::Delta {
                outbox, request_id, ..
            } => refuse(&outbox, request_id, error),
            other => self.handle(other, now),
        }
    }

    /// Op `record.op` of `swarm` from its shared log (this router's when `own`).
    pub(super) fn followed(
        &mut self,
        swarm: Arc<str>,
        record: Record,
        own: bool,
        now: swarmbus_proto::time::Now,
    ) {
        // A void record holds no Deliver frame: it takes its op id and delivers nothing.
        let replayed = deliver_meta(&record.frame).map(|(class, source, target)| ReplayedOp {
            op: record.op,
            class,
            source,
            target,
            frame: record.frame.clone(),
        });
        let taken = self.core.handle_followed(
            &swarm,
            record.epoch,
            record.op,
            own,
            replayed.as_ref(),
            now.instant,
        );
        if let Some(conflicted) = taken {
            self.log.on_durable(&swarm, record.op);
            if conflicted {
                let generation = self.log.generation(&swarm);
                self.log.on_conflict(&swarm, generation);
                self.stats
                    .publish_conflicts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The shared log refused this router's appends of `swarm` from `from` on, in
    /// `generation`: another router took the op id first.
    pub(super) fn conflicted(&mut self, swarm: &str, from: OpId, generation: u64) {
        if self.log.on_conflict(swarm, generation) {
            // A void run that conflicted (fillers rarely do) is tried again.
            if let Some(recovery) = self.recovering.get_mut(swarm) {
                recovery.voiding_to = None;
            }
            self.core.handle_conflict(swarm, from);
            self.stats
                .publish_conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The swarm a command names, whether it needs the swarm's log (an ordered subscribe or
/// publish, a delta), and the agent it is for.
fn command_swarm(command: &ShardCommand) -> Option<(&str, bool, &str)> {
    match command {
        ShardCommand::Subscribe {
            subscription,
            agent,
            ..
        } => Some((
            subscription.swarm.as_str(),
            subscription.class.is_ordered(),
            agent,
        )),
        ShardCommand::Unsubscribe { subscription, .. } => {
            Some((subscription.swarm.as_str(), false, ""))
        }
        ShardCommand::Publish { publish, agent, .. } => {
            Some((publish.swarm.as_str(), publish.class.is_ordered(), agent))
        }
        ShardCommand::Delta { swarm, agent, .. } => Some((swarm.as_str(), true, agent)),
        // A pause needs no log (it holds what is delivered here), only its turn.
        ShardCommand::Pause { swarm, .. } => Some((swarm.as_str(), false, "")),
        ShardCommand::Ack { swarm, .. } => Some((swarm.as_str(), false, "")),
        ShardCommand::RouterPublish(_)
        | ShardCommand::Disconnect { .. }
        | ShardCommand::Metrics { .. }
        | ShardCommand::Swarms { .. }
        | ShardCommand::ReadRecord { .. } => None,
    }
}
