//! Routing shards: each owns a [`Core`] for the swarms hashed to it and runs as one task,
//! fed through a bounded channel. Nothing is shared between shards, so the hot path takes
//! no global lock; a full channel makes connection readers wait, which is the backpressure
//! that reaches publishers through QUIC flow control.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use swarmbus_schema::{encode, ErrorCode, ErrorMessage, Message, OpId, Publish, Subscription};
use tokio::sync::mpsc;

use crate::core::{Action, ConnId, Core, CoreError};
use crate::outbox::{Lane, Outbox};
use crate::stats::Stats;

/// Inputs of a shard.
#[derive(Debug)]
pub enum ShardCommand {
    Subscribe {
        conn: ConnId,
        agent: Arc<str>,
        outbox: Arc<Outbox>,
        subscription: Subscription,
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
        conn: ConnId,
        swarm: String,
        op_id: OpId,
    },
    Disconnect {
        conn: ConnId,
    },
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
    let code = match error {
        CoreError::TooManySwarms { .. } => ErrorCode::Busy,
    };
    reply(
        outbox,
        &Message::Error(ErrorMessage {
            code: code.as_u16(),
            message: error.to_string(),
            request_id,
        }),
    );
}

/// Runs one shard until every sender is dropped.
pub async fn run_shard(
    mut commands: mpsc::Receiver<ShardCommand>,
    max_swarms: usize,
    stats: Arc<Stats>,
) {
    let mut core: Core<Arc<Outbox>> = Core::new(max_swarms);
    let mut batch = Vec::with_capacity(BATCH);
    while commands.recv_many(&mut batch, BATCH).await > 0 {
        let now = Instant::now();
        for command in batch.drain(..) {
            handle(&mut core, command, now, &stats);
        }
        let mut delivered = 0u64;
        while let Some(Action::Deliver { to, class, frame }) = core.poll_action() {
            // A lagging subscriber is closed by its connection driver, which then sends
            // Disconnect; until then further pushes are discarded by the closed outbox.
            let _ = to.push(Lane::Class(class), frame);
            delivered += 1;
        }
        stats.delivered.fetch_add(delivered, Ordering::Relaxed);
    }
}

fn handle(core: &mut Core<Arc<Outbox>>, command: ShardCommand, now: Instant, stats: &Stats) {
    match command {
        ShardCommand::Subscribe {
            conn,
            agent,
            outbox,
            subscription,
        } => {
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
                Err(error) => refuse(&outbox, subscription.request_id, &error),
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
        } => match core.handle_publish(&agent, &publish, now) {
            Ok(outcome) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
                if publish.class.is_ordered() || publish.request_id != 0 {
                    reply(
                        &outbox,
                        &Message::PublishAck {
                            request_id: publish.request_id,
                            op_id: outcome.op_id,
                        },
                    );
                }
            }
            Err(error) => refuse(&outbox, publish.request_id, &error),
        },
        ShardCommand::Ack { conn, swarm, op_id } => core.handle_ack(conn, &swarm, op_id),
        ShardCommand::Disconnect { conn } => core.handle_disconnect(conn),
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
