//! Routing handlers of a session: publish, subscribe, unsubscribe, ack and delta requests.
//! Each hands the swarm's shard its command; the shard's core decides.

use super::*;

impl Session {
    pub(super) async fn publish(&self, publish: Publish) -> Result<(), Fault> {
        let now = std::time::Instant::now();
        let mut changes = Vec::new();
        let admission = self.admit(&publish, now, &mut changes);
        for (scope, state) in changes {
            self.announce_breaker(scope, &publish.swarm, state).await;
        }
        match admission {
            Admission::Admitted => {}
            Admission::Refused => return Ok(()),
            Admission::Open(scope, wait) => {
                let why = match scope {
                    BreakerScope::Session => "this session's circuit breaker is open",
                    BreakerScope::Swarm => "this swarm's circuit breaker is open",
                };
                self.refuse_fast(&publish, ErrorCode::CircuitOpen, why, wait);
                return Ok(());
            }
        }
        if publish.class.is_ordered() {
            // The governor's signal that commands are flowing (sessions' own only:
            // the router's internal records are control publishes too).
            self.context
                .stats
                .ordered_published
                .fetch_add(1, Ordering::Relaxed);
        }
        let swarm = publish.swarm.clone();
        let received = publish.class.is_ordered().then(std::time::Instant::now);
        self.to_shard(
            &swarm,
            ShardCommand::Publish {
                agent: self.agent.clone(),
                outbox: self.outbox.clone(),
                publish,
                received,
            },
        )
        .await;
        Ok(())
    }

    pub(super) async fn subscribe(&self, subscription: Subscription) -> Result<(), Fault> {
        if !self.joined(&subscription.swarm) {
            self.not_joined(&subscription.swarm, subscription.request_id);
            return Ok(());
        }
        if !subscription.agent_filter.as_deref().is_none_or(valid_name) {
            self.refuse(
                ErrorCode::InvalidRequest,
                subscription.request_id,
                format!("agent_filter must be 1 to {MAX_NAME_BYTES} bytes"),
            );
            return Ok(());
        }
        let max = self.context.config.limits.max_subscriptions as usize;
        let key = subscription_key(&subscription);
        {
            let mut held = self
                .subscriptions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Checked under the lock a policy reload drops denied subscriptions under: the
            // reload either sees this one held, or this check sees the reloaded policy.
            let class = Some(subscription.class.name());
            let action = crate::auth::Action::Subscribe;
            if let Some(why) = self.denied(action, &subscription.swarm, class) {
                drop(held);
                self.refuse(ErrorCode::Forbidden, subscription.request_id, why);
                return Ok(());
            }
            if !held.contains(&key) && held.len() >= max {
                drop(held);
                self.refuse(
                    ErrorCode::TooManySubscriptions,
                    subscription.request_id,
                    format!("a session may hold at most {max} subscriptions"),
                );
                return Ok(());
            }
            held.insert(key.clone());
        }
        let swarm = subscription.swarm.clone();
        let resume = self
            .resume
            .get(&(swarm.clone(), subscription.class))
            .copied();
        let forget = subscription.clone();
        self.to_shard(
            &swarm,
            ShardCommand::Subscribe {
                conn: self.conn,
                agent: self.agent.clone(),
                outbox: self.outbox.clone(),
                subscription,
                held: self.subscriptions.clone(),
                resume,
            },
        )
        .await;
        // A policy reload that dropped it while the Subscribe was on its way may have told
        // the shard to forget it first: forgotten again, after the Subscribe.
        let dropped = self.credentialed()
            && !self
                .subscriptions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(&key);
        if dropped {
            let command = ShardCommand::Unsubscribe {
                outbox: self.outbox.clone(),
                subscription: forget,
            };
            self.to_shard(&swarm, command).await;
        }
        Ok(())
    }

    pub(super) async fn unsubscribe(&self, subscription: Subscription) -> Result<(), Fault> {
        self.subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&subscription_key(&subscription));
        let swarm = subscription.swarm.clone();
        self.to_shard(
            &swarm,
            ShardCommand::Unsubscribe {
                outbox: self.outbox.clone(),
                subscription,
            },
        )
        .await;
        Ok(())
    }

    pub(super) async fn ack(&self, swarm: String, class: Class, op_id: OpId) -> Result<(), Fault> {
        if !self.joined(&swarm) {
            self.not_joined(&swarm, 0);
            return Ok(());
        }
        let key = swarm.clone();
        self.to_shard(
            &key,
            ShardCommand::Ack {
                outbox: self.outbox.clone(),
                swarm,
                class,
                op_id,
            },
        )
        .await;
        Ok(())
    }

    pub(super) async fn delta(
        &self,
        request_id: u64,
        swarm: String,
        from_op: OpId,
        to_op: OpId,
    ) -> Result<(), Fault> {
        if !self.joined(&swarm) {
            self.not_joined(&swarm, request_id);
            return Ok(());
        }
        // A delta reads the swarm's control and command ops: denied when subscribing to
        // either is.
        let action = crate::auth::Action::Subscribe;
        let denied = [Class::Control, Class::Command]
            .into_iter()
            .find_map(|class| self.denied(action, &swarm, Some(class.name())));
        if let Some(why) = denied {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        // Deltas are read from disk on the shard: each session gets a budget.
        let max_per_s = self.context.config.log.delta_requests_per_s;
        if over_per_second(&self.delta_window, max_per_s) {
            self.refuse(
                ErrorCode::Busy,
                request_id,
                format!("at most {max_per_s} delta requests per second per session; retry in 1 s"),
            );
            return Ok(());
        }
        let key = swarm.clone();
        self.to_shard(
            &key,
            ShardCommand::Delta {
                agent: self.agent.clone(),
                outbox: self.outbox.clone(),
                request_id,
                swarm,
                from: from_op,
                to: to_op,
            },
        )
        .await;
        Ok(())
    }
}
