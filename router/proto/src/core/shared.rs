//! Swarms whose log is shared with other routers (a cluster on NATS JetStream): the
//! driver opens the swarm's shared log before the swarm takes ordered requests
//! ([`Core::prepare_shared`], then [`Core::adopt_log`]), and every op of the log comes
//! back in op order, this router's and the others' ([`Core::handle_followed`]): that, not
//! the append's acknowledgement, makes an op durable here, so every router acknowledges
//! and delivers in the log's order. An op id another router took first refuses this
//! router's ops from there ([`Core::handle_conflict`]); their publishers may send them
//! again.
//!
//! The sequencer still gives out op ids locally (the next after the last op it knows of)
//! and the log decides: an append of op `n` is made only where the log's last op is
//! `n - 1` and, pipelined, only right behind this router's own op `n - 1`, so once one of
//! this router's ops is refused every later one of the same run is refused too.

use super::*;

impl<H: Clone> Core<H> {
    /// Whether `swarm` is known with its log (recovered, created here, or adopted).
    pub fn has_log(&self, swarm: &str) -> bool {
        self.swarms.get(swarm).is_some_and(|s| s.log_created)
    }

    /// Makes room for `swarm` before its shared log is opened, for `creator` (`None`: a
    /// safety action, or the router's own), under the same caps as any new swarm; returns
    /// the epoch to propose should no router have made its log yet.
    pub fn prepare_shared(
        &mut self,
        name: &str,
        creator: Option<&str>,
    ) -> Result<Epoch, CoreError> {
        let swarm = self.swarm_entry(name, creator)?;
        swarm.opening = true;
        Ok(swarm.epoch)
    }

    /// The shared log of a swarm [`Core::prepare_shared`] made room for did not open: the
    /// swarm may be freed again (once idle).
    pub fn open_failed(&mut self, name: &str) {
        if let Some(swarm) = self.swarms.get_mut(name) {
            swarm.opening = false;
        }
    }

    /// Marks `swarm`'s log as shared (a swarm recovered from a shared log at start).
    pub fn mark_shared(&mut self, name: &str) {
        if let Some(swarm) = self.swarms.get_mut(name) {
            swarm.shared = true;
        }
    }

    /// `swarm`'s shared log was opened: it holds ops up to `last_op`, of `epoch`. The swarm
    /// (made by [`Core::prepare_shared`], and known so far for telemetry at most) takes
    /// that epoch and continues after that op.
    pub fn adopt_log(&mut self, name: &str, epoch: Epoch, last_op: OpId) {
        if !self.swarms.contains_key(name) {
            self.restore_swarm(name, epoch, last_op, None);
        }
        let Some(swarm) = self.swarms.get_mut(name) else {
            return;
        };
        swarm.shared = true;
        swarm.opening = false;
        if !swarm.log_created {
            // Ordered requests waited for the log: nothing here has an op id yet.
            debug_assert!(swarm.pending.is_empty() && swarm.acked.is_empty());
            swarm.epoch = epoch;
            swarm.next_op = last_op.0 + 1;
            swarm.durable_op = last_op;
            swarm.log_created = true;
        }
    }

    /// Op `op` of `swarm`'s shared log, of `epoch`, as the log holds it, in op order:
    /// appended by this router (`own`) or another; `replayed` is what it delivers (`None`:
    /// a void record). This router's op awaited here is durable: acknowledged and
    /// delivered (as after [`Core::handle_durable`]). Anything else at an op id this router
    /// awaits refuses every op it still awaits (the log took that id from the first of
    /// them, and the rest were appended behind it). Every other op takes its op id and is
    /// delivered here as every router delivers it (another router's op; or this router's
    /// publish refused at its deadline that landed late). Returns `None` for an op of
    /// another epoch or one seen already, else whether it refused ops of this router: the
    /// driver then tells the log, whose queued appends of them are dropped.
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
        if op.0 > swarm.durable_op.0 + 1 {
            // Ops between were not seen (erased from the log, or skipped as unreadable):
            // subscribers read what the log holds of them before they go on live.
            let from = OpId(swarm.durable_op.0 + 1);
            for class in [Class::Control, Class::Command] {
                for s in &mut swarm.subscribers[class.index()] {
                    s.cursor.get_or_insert(from);
                }
            }
            self.catching_swarms.insert(swarm.name.clone());
        }
        // Ops this router gave out after it learned of this one are not affected.
        let awaited = swarm.pending.front().is_some_and(|p| p.op <= op);
        if own && awaited && replayed.is_some() {
            self.handle_durable(swarm_name, op, now);
            return Some(false);
        }
        let conflicted = awaited;
        if conflicted {
            let reason = conflict_reason(swarm_name, op);
            swarm.refuse_pending(OpId(0), ErrorCode::Conflict, &reason, &mut self.actions);
        }
        swarm.durable_op = op;
        // The refused ops' ids can be given out again: none of them can land (each was
        // appended right behind the one before it). A swarm being recovered keeps the ids
        // it is voiding.
        swarm.next_op = if conflicted && swarm.unavailable.is_none() {
            op.0 + 1
        } else {
            swarm.next_op.max(op.0 + 1)
        };
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

    /// The log refused this router's append of op `from` of `swarm_name` (another router
    /// took the op id first): the ops this router gave out from `from` on are refused, so
    /// their publishers may send them again, and op ids continue from `from` (the log's
    /// follower says soon what is there).
    pub fn handle_conflict(&mut self, swarm_name: &str, from: OpId) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if !swarm.pending.iter().any(|p| p.op >= from) {
            return;
        }
        let reason = conflict_reason(swarm_name, from);
        swarm.refuse_pending(from, ErrorCode::Conflict, &reason, &mut self.actions);
        swarm.next_op = swarm.next_op.min(from.0).max(swarm.durable_op.0 + 1);
    }
}

/// Why a publish of `swarm` holding op id `op` was refused with `Conflict`.
fn conflict_reason(swarm: &str, op: OpId) -> String {
    format!(
        "another router of the cluster took op {} of swarm {swarm:?} first; send the \
         publish again",
        op.0
    )
}
