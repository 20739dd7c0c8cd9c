//! Swarms whose log is shared with other routers (a cluster on NATS JetStream): the
//! driver opens the swarm's shared log before the swarm takes ordered requests
//! ([`Core::adopt_log`]), every op of the log comes back in op order, this router's and
//! the others' ([`Core::handle_followed`]), and an op id another router took first refuses
//! this router's ops from there ([`Core::handle_conflict`]), which their publishers may
//! send again.
//!
//! The sequencer still gives out op ids locally; the log decides. An append of op `n` is
//! made only where the log's last op is `n - 1` (and, pipelined, only behind this router's
//! own op `n - 1`), so this router's ops that the log takes follow every op the core knew
//! of when it gave them out, and delivery here is in the log's order.

use super::*;

impl<H: Clone> Core<H> {
    /// Whether `swarm` is known with its log (recovered, created here, or adopted).
    pub fn has_log(&self, swarm: &str) -> bool {
        self.swarms.get(swarm).is_some_and(|s| s.log_created)
    }

    /// A new epoch from the core's generator, for a swarm's log this router may be first
    /// to make.
    pub fn new_epoch(&mut self) -> Epoch {
        Epoch(splitmix64(&mut self.epoch_rng).max(1))
    }

    /// `swarm`'s shared log was opened: it holds ops up to `last_op`, of `epoch`. The swarm
    /// (known here so far only for telemetry, if at all) takes that epoch and continues
    /// after that op.
    pub fn adopt_log(&mut self, name: &str, epoch: Epoch, last_op: OpId) {
        match self.swarms.get_mut(name) {
            Some(swarm) if swarm.log_created => {}
            Some(swarm) => {
                // Ordered requests waited for the log: nothing here has an op id yet.
                debug_assert!(swarm.pending.is_empty() && swarm.acked.is_empty());
                swarm.epoch = epoch;
                swarm.next_op = last_op.0 + 1;
                swarm.durable_op = last_op;
                swarm.log_created = true;
            }
            None => self.restore_swarm(name, epoch, last_op, None),
        }
    }

    /// Op `op` of `swarm`'s shared log, of `epoch`, as the log holds it: appended by this
    /// router (`own`) or another; `replayed` is what it delivers (`None`: a void record).
    /// Ops come in op order. This router's op is durable (acknowledged and delivered like
    /// after [`Core::handle_durable`]); another router's is delivered to the subscribers
    /// here, and refuses the ops this router gave out from there on (they conflict with
    /// it). Returns `None` for an op of another epoch or one known already, else whether
    /// it refused ops of this router: the driver then tells the log, whose queued appends
    /// of them are dropped.
    pub fn handle_followed(
        &mut self,
        swarm_name: &str,
        epoch: Epoch,
        op: OpId,
        own: bool,
        replayed: Option<&ReplayedOp>,
        now: Instant,
    ) -> Option<bool> {
        let swarm = self.swarms.get_mut(swarm_name)?;
        if epoch != swarm.epoch || op <= swarm.durable_op {
            return None;
        }
        if own {
            // Ours and still awaited: durable now. Ours and not awaited: an op refused
            // after its deadline that landed late; its void record erases it.
            if swarm.pending.front().is_some_and(|p| p.op <= op) {
                self.handle_durable(swarm_name, op, now);
            }
            return Some(false);
        }
        let conflicted = !swarm.pending.is_empty();
        if conflicted {
            let reason = format!(
                "another router of the cluster took op {} of swarm {swarm_name:?} first; \
                 send the publish again",
                op.0
            );
            swarm.refuse_pending(ErrorCode::Conflict, &reason, &mut self.actions);
        }
        if op.0 > swarm.durable_op.0 + 1 {
            // Ops between were not seen here (erased from the log, or skipped as
            // unreadable): subscribers going live read what the log holds of them first.
            let from = OpId(swarm.durable_op.0 + 1);
            for class in [Class::Control, Class::Command] {
                for s in &mut swarm.subscribers[class.index()] {
                    s.cursor.get_or_insert(from);
                }
            }
            self.catching_swarms.insert(swarm.name.clone());
        }
        swarm.durable_op = op;
        swarm.next_op = op.0 + 1;
        if let Some(replayed) = replayed {
            if !swarm.subscribers[replayed.class.index()].is_empty() {
                self.received.insert(&swarm.name, op, now);
            }
            let frame = OutFrame {
                head: replayed.frame.clone(),
                body: Bytes::new(),
            };
            swarm.fan_out(
                replayed.class,
                op,
                &replayed.source,
                replayed.target.as_deref(),
                &frame,
                now,
                &mut self.actions,
            );
        }
        Some(conflicted)
    }

    /// Another router took op `from` of `swarm_name` first (the log refused this router's
    /// append there): the ops this router gave out from `from` on are refused, so their
    /// publishers may send them again, and op ids continue after the last durable op.
    pub fn handle_conflict(&mut self, swarm_name: &str, from: OpId) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if swarm.pending.is_empty() {
            return;
        }
        let reason = format!(
            "another router of the cluster took op {} of swarm {swarm_name:?} first; send \
             the publish again",
            from.0
        );
        swarm.refuse_pending(ErrorCode::Conflict, &reason, &mut self.actions);
        swarm.next_op = swarm.durable_op.0 + 1;
    }
}
