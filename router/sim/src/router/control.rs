//! Leases and publishes, as the router's session handlers carry them out
//! (`router/src/server/control.rs`, `session.rs`): a new token, or a TTL longer than the
//! holding logged, is written to `$control` and answered once durable; a publish stamped
//! with a fencing token is checked against the leases (`Leases::check_stamp`) before it
//! reaches the core, which does not look at tokens itself.

use swarmbus_client::DEFAULT_LEASE;
use swarmbus_proto::control::{lease_record, LeaseRefusal, StampRefusal, CONTROL_SWARM};
use swarmbus_schema::{ErrorCode, LeaseAction, LeaseGrant, LeaseRequest};

use super::restore::MAX_LEASE_TTL_MS;
use super::*;

/// What the lease machine decided for one request (the oracle learns of it here).
#[derive(Debug, Clone)]
pub enum LeaseDecision {
    Granted(Granted),
    Released { token: u64 },
    Refused(LeaseRefusal),
}

/// How a publish's fencing stamp fared (`None`: not stamped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StampCheck {
    Unstamped,
    Accepted,
    Refused(StampRefusal),
}

impl SimRouter {
    /// A publish from `agent` on `conn`: a stamped one passes the fencing check first (as
    /// `Session::admit_publish` does), then the core sequences it.
    pub fn publish(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        agent: &str,
        publish: &Publish,
    ) -> StampCheck {
        let stamp = self.check_stamp(agent, publish, io.now.unix_ms);
        if let StampCheck::Refused(refused) = &stamp {
            let text = format!(
                "fencing token {} refused: {refused:?}",
                publish.fencing_token
            );
            let message = refusal(ErrorCode::StaleFencingToken, text, publish.request_id);
            io.out.push(conn, Lane::Session, encode(&message));
            return stamp;
        }
        match self.core.handle_publish(agent, conn, publish, io.now) {
            Ok(outcome) if !outcome.awaiting_durability && publish.request_id != 0 => {
                let ack = Message::PublishAck {
                    request_id: publish.request_id,
                    op_id: outcome.op_id,
                    epoch: Epoch::default(),
                };
                io.out.push(conn, Lane::Session, encode(&ack));
            }
            Ok(_) => {}
            Err(error) if publish.request_id != 0 || publish.class.is_ordered() => {
                let message = refusal(error.code(), error.to_string(), publish.request_id);
                io.out.push(conn, Lane::Session, encode(&message));
            }
            Err(_) => {}
        }
        self.settle(io);
        stamp
    }

    fn check_stamp(&self, agent: &str, publish: &Publish, now_ms: u64) -> StampCheck {
        if publish.fencing_token == 0 {
            return StampCheck::Unstamped;
        }
        if self.danger_skip_stamp_check {
            return StampCheck::Accepted;
        }
        let lease = publish.lease.as_deref().unwrap_or(DEFAULT_LEASE);
        match self
            .leases
            .check_stamp(&publish.swarm, lease, agent, publish.fencing_token, now_ms)
        {
            Ok(()) => StampCheck::Accepted,
            Err(refused) => StampCheck::Refused(refused),
        }
    }

    /// Acquire, renew or release (`Session::lease`).
    pub fn lease(
        &mut self,
        io: &mut Io<'_>,
        conn: ConnId,
        agent: &Arc<str>,
        request: &LeaseRequest,
    ) -> LeaseDecision {
        let ttl_ms = u64::from(request.ttl_ms).clamp(1, MAX_LEASE_TTL_MS);
        let (swarm, name, now_ms) = (&request.swarm, &request.name, io.now.unix_ms);
        let decision = match request.action {
            LeaseAction::Acquire => self.leases.acquire(swarm, name, agent, ttl_ms, now_ms),
            LeaseAction::Renew => {
                self.leases
                    .renew(swarm, name, agent, request.token, ttl_ms, now_ms)
            }
            LeaseAction::Release => {
                return match self.leases.release(swarm, name, agent, request.token) {
                    Ok(()) => {
                        self.write_release(io, conn, request);
                        LeaseDecision::Released {
                            token: request.token,
                        }
                    }
                    Err(refused) => self.refuse_lease(io, conn, request.request_id, refused),
                };
            }
        };
        match decision {
            Ok(granted) => {
                self.grant(io, conn, request.request_id, granted.clone(), ttl_ms);
                LeaseDecision::Granted(granted)
            }
            Err(refused) => self.refuse_lease(io, conn, request.request_id, refused),
        }
    }

    /// Logs a new or extended holding before it is answered (`grant_lease`).
    fn grant(
        &mut self,
        io: &mut Io<'_>,
        to: ConnId,
        request_id: u64,
        granted: Granted,
        ttl_ms: u64,
    ) {
        if !granted.must_log {
            push_grant(io, to, request_id, &granted.grant);
            return;
        }
        let grant = &granted.grant;
        let (key, payload) = lease_record(
            &grant.swarm,
            &grant.name,
            grant.token,
            &grant.holder,
            ttl_ms,
        );
        let waiter = Waiter::Grant {
            to,
            request_id,
            granted,
            ttl_ms,
        };
        self.write_internal(io, CONTROL_SWARM.to_owned(), key, payload, Some(waiter));
        self.settle(io);
    }

    /// The holding's record is durable (or could not be written): answer the holder.
    pub(super) fn grant_written(
        &mut self,
        io: &mut Io<'_>,
        to: ConnId,
        request_id: u64,
        granted: Granted,
        ttl_ms: u64,
        result: Result<OpId, String>,
    ) {
        let grant = &granted.grant;
        if let Err(error) = result {
            match granted.previous {
                Some(previous) => self.leases.undo_extension(
                    &grant.swarm,
                    &grant.name,
                    grant.token,
                    previous,
                    grant.expires_at_ms,
                ),
                None => self.leases.revoke(&grant.swarm, &grant.name, grant.token),
            }
            let message = refusal(ErrorCode::SwarmUnavailable, error, request_id);
            io.out.push(to, Lane::Session, encode(&message));
            return;
        }
        self.leases
            .logged(&grant.swarm, &grant.name, grant.token, ttl_ms);
        push_grant(io, to, request_id, grant);
    }

    /// Logs a release (a lost one holds the lease for the old holder after a restart).
    fn write_release(&mut self, io: &mut Io<'_>, to: ConnId, request: &LeaseRequest) {
        let (key, payload) = lease_record(&request.swarm, &request.name, request.token, "", 0);
        let waiter = Waiter::Release {
            to,
            request_id: request.request_id,
        };
        self.write_internal(io, CONTROL_SWARM.to_owned(), key, payload, Some(waiter));
        self.settle(io);
    }

    fn refuse_lease(
        &mut self,
        io: &mut Io<'_>,
        to: ConnId,
        request_id: u64,
        refused: LeaseRefusal,
    ) -> LeaseDecision {
        let code = match &refused {
            LeaseRefusal::Held { .. } => ErrorCode::LeaseHeld,
            LeaseRefusal::Lost { .. } => ErrorCode::LeaseLost,
            LeaseRefusal::Limit(_) => ErrorCode::Busy,
        };
        let message = refusal(code, format!("{refused:?}"), request_id);
        io.out.push(to, Lane::Session, encode(&message));
        LeaseDecision::Refused(refused)
    }
}

fn push_grant(io: &mut Io<'_>, to: ConnId, request_id: u64, grant: &LeaseGrant) {
    let grant = LeaseGrant {
        request_id,
        ..grant.clone()
    };
    io.out
        .push(to, Lane::Session, encode(&Message::LeaseGrant(grant)));
}
