//! Routing shards: each owns a [`Core`] for the swarms hashed to it and runs as one task,
//! fed through two bounded channels. Nothing is shared between shards, so the hot path takes
//! no global lock.
//!
//! Inbound isolation: telemetry publishes arrive on the shard's **bulk** channel, everything
//! else (control, command, alert, reconciliation, subscriptions, acks, disconnects) on its
//! **urgent** channel, and the shard always empties the urgent one first. A full channel makes
//! the sending stream reader wait, which is the backpressure that reaches the publisher through
//! QUIC flow control - on that class's stream only, so a telemetry flood cannot hold up a
//! command on its way in.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use swarmbus_schema::{encode, Class, Epoch, ErrorMessage, Message, OpId, Publish, Subscription};
use tokio::sync::mpsc;

use crate::core::{Action, ConnId, Core, CoreError, Now};
use crate::log::{LogBackend, LogEvent};
use crate::outbox::{Lane, Outbox};
use crate::stats::Stats;

/// The subscriptions a session holds, as (swarm, class, agent filter).
pub type HeldSubscriptions = Arc<Mutex<HashSet<(String, Class, Option<String>)>>>;

/// Inputs of a shard.
#[derive(Debug)]
pub enum ShardCommand {
    Subscribe {
        conn: ConnId,
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        subscription: Subscription,
        /// The session's set, from which a refused subscription is removed again.
        held: HeldSubscriptions,
    },
    Unsubscribe {
        outbox: Arc<Outbox>,
        subscription: Subscription,
    },
    Publish {
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        publish: Publish,
    },
    Ack {
        outbox: Arc<Outbox>,
        swarm: String,
        op_id: OpId,
    },
    Disconnect {
        conn: ConnId,
    },
}

impl ShardCommand {
    /// Telemetry publishes go to the bulk channel; everything else is urgent.
    fn is_bulk(&self) -> bool {
        matches!(self, ShardCommand::Publish { publish, .. } if publish.class == Class::Telemetry)
    }
}

/// The sending side of one shard's two channels.
#[derive(Clone, Debug)]
pub struct ShardSender {
    urgent: mpsc::Sender<ShardCommand>,
    bulk: mpsc::Sender<ShardCommand>,
}

impl ShardSender {
    /// Queues a command, waiting while its channel is full. Fails only once the shard has
    /// stopped (router shutdown).
    pub async fn send(&self, command: ShardCommand) -> Result<(), ShardStopped> {
        let channel = if command.is_bulk() {
            &self.bulk
        } else {
            &self.urgent
        };
        channel.send(command).await.map_err(|_| ShardStopped)
    }
}

/// The shard is gone (the router is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStopped;

/// Starts a shard on the current runtime; `capacity` bounds each of its two input
/// channels. The shard's swarms are those `log` recovered plus any created later; `events`
/// carries the log writer's reports for this shard.
pub fn spawn_shard(
    capacity: usize,
    max_swarms: usize,
    epoch_seed: u64,
    log: Box<dyn LogBackend>,
    events: mpsc::UnboundedReceiver<LogEvent>,
    stats: Arc<Stats>,
) -> ShardSender {
    let (urgent_tx, urgent_rx) = mpsc::channel(capacity);
    let (bulk_tx, bulk_rx) = mpsc::channel(capacity);
    let mut core = Core::with_epoch_seed(max_swarms, epoch_seed);
    for (name, state) in log.swarms() {
        core.restore_swarm(&name, state.epoch, state.last_op, state.unavailable);
    }
    let shard = Shard { core, log, stats };
    tokio::spawn(shard.run(urgent_rx, bulk_rx, events));
    ShardSender {
        urgent: urgent_tx,
        bulk: bulk_tx,
    }
}

/// Which shard owns `swarm`. A fixed-key hash, so placement is stable across restarts.
pub fn shard_of(swarm: &str, shards: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    swarm.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

/// Commands handled per wake-up before the shard flushes its actions.
const BATCH: usize = 256;

fn reply(outbox: &Outbox, message: &Message) {
    // A full session lane closes the connection (Lagging); nothing more to do here.
    let _ = outbox.push(Lane::Session, encode(message));
}

fn refuse(outbox: &Outbox, request_id: u64, error: &CoreError) {
    let code = error.code();
    reply(
        outbox,
        &Message::Error(ErrorMessage {
            code: code.as_u16(),
            message: error.to_string(),
            request_id,
        }),
    );
}

/// One shard: the routing core for its swarms and their log.
struct Shard {
    core: Core<Arc<Outbox>>,
    log: Box<dyn LogBackend>,
    stats: Arc<Stats>,
}

impl Shard {
    /// Runs until every input sender is dropped. Log events go first (they release
    /// acknowledgements and deliveries), then urgent work, then telemetry.
    async fn run(
        mut self,
        mut urgent: mpsc::Receiver<ShardCommand>,
        mut bulk: mpsc::Receiver<ShardCommand>,
        mut events: mpsc::UnboundedReceiver<LogEvent>,
    ) {
        let mut urgent_batch = Vec::with_capacity(BATCH);
        let mut bulk_batch = Vec::with_capacity(BATCH);
        let mut event_batch = Vec::with_capacity(BATCH);
        let mut urgent_open = true;
        let mut bulk_open = true;
        while urgent_open || bulk_open {
            tokio::select! {
                biased;
                n = events.recv_many(&mut event_batch, BATCH) => {
                    if n == 0 {
                        // The writer is gone (shutdown): nothing more becomes durable.
                        break;
                    }
                }
                n = urgent.recv_many(&mut urgent_batch, BATCH), if urgent_open => urgent_open = n > 0,
                n = bulk.recv_many(&mut bulk_batch, BATCH), if bulk_open => bulk_open = n > 0,
            }
            let now = Now::system();
            for event in event_batch.drain(..) {
                match event {
                    LogEvent::Durable { swarm, up_to } => {
                        self.core.handle_durable(&swarm, up_to);
                    }
                    LogEvent::Failed {
                        swarm,
                        from,
                        detail,
                    } => {
                        tracing::error!(%swarm, op = from.0, %detail, "event log append failed; swarm unavailable");
                        self.core.handle_log_failed(&swarm, from, &detail);
                    }
                }
            }
            for command in urgent_batch.drain(..).chain(bulk_batch.drain(..)) {
                self.handle(command, now);
            }
            self.flush();
        }
    }

    /// Carries out what the core asked for.
    fn flush(&mut self) {
        let mut delivered = 0u64;
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Deliver { to, class, frame } => {
                    // A lagging subscriber is closed by its connection driver, which then
                    // sends Disconnect; until then pushes are discarded by the closed outbox.
                    let _ = to.push(Lane::Class(class), frame);
                    delivered += 1;
                }
                Action::Reply { to, message } => reply(&to, &message),
                Action::CreateLog { swarm, epoch } => {
                    if let Err(error) = self.log.create(&swarm, epoch) {
                        tracing::error!(%swarm, %error, "creating the swarm's event log failed");
                        self.core
                            .handle_log_failed(&swarm, OpId(1), &error.to_string());
                    }
                }
                Action::Append { swarm, op, record } => {
                    if let Err(error) = self.log.append(&swarm, op, record) {
                        self.core.handle_log_failed(&swarm, op, &error.to_string());
                    }
                }
            }
        }
        self.stats.delivered.fetch_add(delivered, Ordering::Relaxed);
    }

    fn handle(&mut self, command: ShardCommand, now: Now) {
        let core = &mut self.core;
        match command {
            ShardCommand::Subscribe {
                conn,
                agent,
                outbox,
                subscription,
                held,
            } => {
                // The connection may have closed (and its Disconnect been handled) while
                // this was queued: registering it now would leave a subscriber nobody removes.
                if outbox.is_closed() {
                    return;
                }
                let result = core.handle_subscribe(
                    conn,
                    &agent,
                    outbox.clone(),
                    &subscription.swarm,
                    subscription.class,
                    subscription.agent_filter.as_deref(),
                );
                match result {
                    Ok(_) => reply(
                        &outbox,
                        &Message::SubscribeAck {
                            request_id: subscription.request_id,
                        },
                    ),
                    Err(error) => {
                        held.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .remove(&(
                                subscription.swarm.clone(),
                                subscription.class,
                                subscription.agent_filter.clone(),
                            ));
                        refuse(&outbox, subscription.request_id, &error)
                    }
                }
            }
            ShardCommand::Unsubscribe {
                outbox,
                subscription,
            } => {
                core.handle_unsubscribe(
                    outbox.conn(),
                    &subscription.swarm,
                    subscription.class,
                    subscription.agent_filter.as_deref(),
                );
                reply(
                    &outbox,
                    &Message::SubscribeAck {
                        request_id: subscription.request_id,
                    },
                );
            }
            ShardCommand::Publish {
                agent,
                outbox,
                publish,
            } => match core.handle_publish(&agent, outbox.clone(), &publish, now) {
                Ok(outcome) => {
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                    // Ordered ops are acknowledged by the core once durable.
                    if !outcome.awaiting_durability && publish.request_id != 0 {
                        reply(
                            &outbox,
                            &Message::PublishAck {
                                request_id: publish.request_id,
                                op_id: outcome.op_id,
                                epoch: Epoch::default(),
                            },
                        );
                    }
                }
                Err(error) => {
                    if publish.request_id != 0 || publish.class.is_ordered() {
                        refuse(&outbox, publish.request_id, &error)
                    }
                }
            },
            ShardCommand::Ack {
                outbox,
                swarm,
                op_id,
            } => {
                if !outbox.is_closed() {
                    core.handle_ack(outbox.conn(), &swarm, op_id);
                }
            }
            ShardCommand::Disconnect { conn } => core.handle_disconnect(conn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_placement_is_stable_and_in_range() {
        for shards in 1..8 {
            for swarm in ["a", "b", "swarm-17", ""] {
                let s = shard_of(swarm, shards);
                assert!(s < shards);
                assert_eq!(s, shard_of(swarm, shards));
            }
        }
    }
}
