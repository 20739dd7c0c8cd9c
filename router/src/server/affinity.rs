//! Affinity handlers of a session: worker registration, affine sessions, requests and
//! replies routed through the worker registry ([`swarmbus_proto::workers`]).

use super::*;
use swarmbus_schema::{Reply, Request, WorkerStatus};

impl Session {
    /// Whom the affine sessions this session opens belong to: its verified identity (with
    /// credentials); `None` without, when affine sessions belong to no one.
    fn affinity_owner(&self) -> Option<Arc<str>> {
        self.credentialed().then(|| self.agent.clone())
    }

    pub(super) async fn register_worker(&self, status: WorkerStatus) -> Result<(), Fault> {
        if self.role != Role::Worker {
            self.refuse(
                ErrorCode::Forbidden,
                status.request_id,
                "only sessions of role worker may register worker nodes".into(),
            );
            return Ok(());
        }
        check_name("node", &status.node)?;
        if let Some(why) = self.denied(crate::auth::Action::Worker, "", None) {
            self.refuse(ErrorCode::Forbidden, status.request_id, why);
            return Ok(());
        }
        let now = self.context.clock.now();
        let registered = {
            let mut workers = self.context.workers();
            workers
                .register(self.conn, &self.outbox, &status, now)
                .map(|done| (done, workers.conn_draining(self.conn)))
        };
        match registered {
            Ok((registered, draining)) => {
                let (node_id, pins) = (registered.node, registered.pins);
                push_all(registered.failed);
                {
                    let mut jobs = self.context.jobs();
                    jobs.worker_models(self.conn, &status.models);
                    jobs.worker_draining(self.conn, draining);
                }
                if let Err(error) = self.context.write_pins(pins).await {
                    tracing::warn!(%error, "session pins of a draining node not written");
                }
                let _ = self.outbox.push(
                    Lane::Session,
                    encode(&Message::WorkerAck {
                        request_id: status.request_id,
                        node_id: node_id.0,
                    }),
                );
            }
            Err(refusal) => {
                let _ = self
                    .outbox
                    .push(Lane::Session, refusal.frame(status.request_id));
            }
        }
        Ok(())
    }

    pub(super) async fn open_session(
        &self,
        request_id: u64,
        session_key: String,
        model: Option<String>,
    ) -> Result<(), Fault> {
        check_name("session_key", &session_key)?;
        if let Some(why) = self.denied(crate::auth::Action::Affinity, "", None) {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        let now = self.context.clock.now();
        let owner = self.affinity_owner();
        let opened = self.context.workers().open_session(
            request_id,
            &session_key,
            model.as_deref(),
            owner.as_deref(),
            now,
        );
        let frame = match opened {
            Ok(opened) => match self.context.write_pins(opened.pins).await {
                Ok(()) => opened.frame,
                Err(error) => swarmbus_proto::refusal::Refusal {
                    code: ErrorCode::SwarmUnavailable,
                    message: error,
                    retry_after_ms: 1_000,
                }
                .frame(request_id),
            },
            Err(refusal) => refusal.frame(request_id),
        };
        let _ = self.outbox.push(Lane::Session, frame);
        Ok(())
    }

    pub(super) async fn close_session(
        &self,
        request_id: u64,
        session_key: String,
    ) -> Result<(), Fault> {
        if let Some(why) = self.denied(crate::auth::Action::Affinity, "", None) {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        let owner = self.affinity_owner();
        let closed = self
            .context
            .workers()
            .close_session(&session_key, owner.as_deref());
        match closed {
            Ok(Some(pin)) => {
                if let Err(error) = self.context.write_pins(vec![pin]).await {
                    tracing::warn!(%error, "end of a session pin not written");
                }
            }
            Ok(None) => {}
            Err(refusal) => {
                let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
                return Ok(());
            }
        }
        let _ = self
            .outbox
            .push(Lane::Session, encode(&Message::SubscribeAck { request_id }));
        Ok(())
    }

    pub(super) async fn request(&self, request: Request) -> Result<(), Fault> {
        let request_id = request.request_id;
        if request_id == 0 {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                "a Request needs a non-zero request_id",
            ));
        }
        if let Some(why) = self.denied(crate::auth::Action::Affinity, "", None) {
            self.refuse(ErrorCode::Forbidden, request_id, why);
            return Ok(());
        }
        for name in [request.session_key.as_deref(), request.model.as_deref()]
            .into_iter()
            .flatten()
        {
            check_name("session_key and model", name)?;
        }
        if request.payload.len() > self.max_payload_bytes {
            self.refuse(
                ErrorCode::PayloadTooLarge,
                request_id,
                format!(
                    "payload of {} bytes exceeds the maximum of {} bytes",
                    request.payload.len(),
                    self.max_payload_bytes
                ),
            );
            return Ok(());
        }
        let now = self.context.clock.now();
        let owner = self.affinity_owner();
        let routed =
            self.context
                .workers()
                .route(&self.outbox, &self.agent, request, owner.as_deref(), now);
        match routed {
            Ok(routed) => {
                if let Err(error) = self.context.write_pins(routed.pins).await {
                    tracing::warn!(%error, "session pin not written");
                }
                let _ = routed.worker.push(Lane::Session, routed.frame);
            }
            Err(refusal) => {
                let _ = self.outbox.push(Lane::Session, refusal.frame(request_id));
            }
        }
        Ok(())
    }

    pub(super) async fn reply(&self, reply: Reply) -> Result<(), Fault> {
        if self.role != Role::Worker {
            self.refuse(
                ErrorCode::Forbidden,
                0,
                "only sessions of role worker may reply to requests".into(),
            );
            return Ok(());
        }
        let answered = self.context.workers().reply(self.conn, reply);
        match answered {
            Some((requester, frame)) => {
                let _ = requester.push(Lane::Session, frame);
            }
            None => {
                self.context
                    .stats
                    .late_replies
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
