//! Catching up from the log: subscribers behind (a resume point, a full queue, a
//! redelivery timeout) replay ranges of their swarm's log, then go live without a gap or a
//! repeat; DeltaRequests are cut to `delta_max_ops`.

use super::*;

impl<H: Clone> Core<H> {
    /// Subscribers catching up from the log, with the range each still needs.
    pub fn catching_up(&mut self) -> Vec<CatchUp<H>> {
        let mut out = Vec::new();
        let swarms = &self.swarms;
        self.catching_swarms.retain(|name| {
            let Some(swarm) = swarms.get(name) else {
                return false;
            };
            let before = out.len();
            for class in [Class::Control, Class::Command] {
                if swarm.paused && class == Class::Command {
                    // Held until resumed; keep the swarm listed so resuming finds it.
                    if swarm.subscribers[class.index()]
                        .iter()
                        .any(|s| s.cursor.is_some())
                    {
                        return true;
                    }
                    continue;
                }
                for s in &swarm.subscribers[class.index()] {
                    if let Some(from) = s.cursor {
                        out.push(CatchUp {
                            conn: s.conn,
                            swarm: swarm.name.clone(),
                            class,
                            from,
                            to: swarm.durable_op,
                            handle: s.handle.clone(),
                        });
                    }
                }
            }
            out.len() > before
        });
        out
    }

    /// The driver read `ops` (every op of the swarm from the catch-up's `from` through
    /// `read_up_to`, any class) from the log for the subscriber `conn`: queue those it wants,
    /// in order, and move its cursor on. Once past the durable op it receives live ops. A
    /// read for a cursor the subscriber no longer has (it subscribed again meanwhile) is
    /// dropped: the driver reads again from the cursor it has.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_replayed(
        &mut self,
        conn: ConnId,
        swarm_name: &str,
        class: Class,
        from: OpId,
        ops: &[ReplayedOp],
        read_up_to: OpId,
        now: Instant,
    ) -> usize {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return 0;
        };
        let durable = swarm.durable_op;
        let Some(subscriber) = swarm.subscribers[class.index()]
            .iter_mut()
            .find(|s| s.conn == conn)
        else {
            return 0;
        };
        let Some(cursor) = subscriber.cursor.filter(|cursor| *cursor == from) else {
            return 0;
        };
        let mut queued = 0;
        for op in ops
            .iter()
            .filter(|op| op.op >= cursor && op.op <= read_up_to)
        {
            if op.class == class && subscriber.wants(&op.source, op.target.as_deref()) {
                self.actions.push_back(Action::Deliver {
                    to: subscriber.handle.clone(),
                    class,
                    frame: OutFrame {
                        head: op.frame.clone(),
                        body: Bytes::new(),
                    },
                    swarm: swarm.name.clone(),
                    op: op.op,
                    durable_at: None,
                });
                // Only ops actually sent count as awaiting an acknowledgement.
                subscriber.delivered = subscriber.delivered.max(op.op);
                subscriber.unacked_since.get_or_insert(now);
                queued += 1;
            }
        }
        if read_up_to >= cursor {
            let next = OpId(read_up_to.0.saturating_add(1));
            subscriber.cursor = (next <= durable).then_some(next);
        }
        queued
    }

    /// Op `op` (ordered) did not fit the queue of subscriber `conn`: it stops receiving live
    /// ops and catches up from the log, from that op on, once its queue drains. Nothing is
    /// lost and nothing buffers without bound.
    pub fn handle_lagging(&mut self, conn: ConnId, swarm_name: &str, class: Class, op: OpId) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if !class.is_ordered() || op.is_none() {
            return;
        }
        if let Some(s) = swarm.subscribers[class.index()]
            .iter_mut()
            .find(|s| s.conn == conn)
        {
            s.cursor = Some(s.cursor.map_or(op, |c| c.min(op)));
            self.catching_swarms.insert(swarm.name.clone());
        }
    }

    /// Periodic work: ordered ops delivered but unacknowledged for longer than the
    /// redelivery timeout are sent again, from the subscriber's last acknowledged op on.
    pub fn handle_tick(&mut self, now: Instant) -> usize {
        let timeout = self.config.redelivery_timeout;
        let mut rewound = 0;
        for (name, swarm) in self.swarms.iter_mut() {
            for class in [Class::Control, Class::Command] {
                for s in &mut swarm.subscribers[class.index()] {
                    let acked = swarm
                        .acked
                        .get(&(s.conn, class))
                        .copied()
                        .unwrap_or_default();
                    let overdue = s
                        .unacked_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= timeout);
                    if s.cursor.is_none() && s.delivered > acked && overdue {
                        s.cursor = Some(OpId(acked.0.saturating_add(1)));
                        s.unacked_since = None;
                        self.catching_swarms.insert(name.clone());
                        rewound += 1;
                    }
                }
            }
        }
        rewound
    }

    /// A DeltaRequest from `agent`: ops `from..=to` (`to` 0: the latest durable op) of the
    /// swarm, at most `delta_max_ops`, answered through a `ReadDelta` action.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_delta_request(
        &mut self,
        agent: &Arc<str>,
        handle: H,
        swarm_name: &str,
        request_id: u64,
        from: OpId,
        to: OpId,
    ) -> Result<(), CoreError> {
        let Some(swarm) = self.swarms.get(swarm_name) else {
            // A swarm with no log yet: an empty answer.
            self.actions.push_back(Action::Reply {
                to: handle,
                message: Message::DeltaAck(swarmbus_schema::DeltaAck {
                    request_id,
                    ..Default::default()
                }),
            });
            return Ok(());
        };
        swarm.check_available()?;
        let from = from.max(OpId(1));
        let wanted_end = if to.is_none() {
            swarm.durable_op
        } else {
            to.min(swarm.durable_op)
        };
        let capped = OpId(
            wanted_end
                .0
                .min(from.0.saturating_add(self.config.delta_max_ops) - 1),
        );
        self.actions.push_back(Action::ReadDelta(DeltaQuery {
            to_handle: handle,
            agent: agent.clone(),
            swarm: swarm.name.clone(),
            epoch: swarm.epoch,
            request_id,
            from,
            to: capped,
            more: capped < wanted_end,
        }));
        Ok(())
    }
}
