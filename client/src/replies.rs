//! Requests and their replies: one reader task matches what the router answers on the
//! session stream to the request that waits for it.

use super::*;

impl Shared {
    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
        // Only inserts and removes happen under this lock; a poisoned map is still sound.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn fail_all(&self, error: &ClientError) {
        for (_, reply) in self.pending().drain() {
            reply.send(Err(error.clone()));
        }
    }
}

/// Reads the session stream: resolves pending requests from acks and errors.
// One arm per kind of answer the router sends on the session stream, each handed to the
// request that waits for it: a dispatch, long by design.
pub(super) async fn read_replies(
    mut reader: FrameReader,
    shared: Arc<Shared>,
    requests_tx: mpsc::Sender<Request>,
) {
    loop {
        match reader.next().await {
            Ok(Some(Message::PublishAck {
                request_id,
                op_id,
                epoch,
            })) => {
                if let Some(reply) = shared.pending().remove(&request_id) {
                    reply.send(Ok(ReplyValue::Receipt(Receipt { op_id, epoch })));
                }
            }
            Ok(Some(Message::SubscribeAck { request_id })) => {
                if let Some(reply) = shared.pending().remove(&request_id) {
                    reply.send(Ok(ReplyValue::Receipt(Receipt::default())));
                }
            }
            Ok(Some(Message::DeltaAck(ack))) => {
                if let Some(reply) = shared.pending().remove(&ack.request_id) {
                    reply.send(Ok(ReplyValue::Delta(ack)));
                }
            }
            Ok(Some(Message::WorkerAck {
                request_id,
                node_id,
            })) => {
                if let Some(reply) = shared.pending().remove(&request_id) {
                    reply.send(Ok(ReplyValue::WorkerAck(node_id)));
                }
            }
            Ok(Some(Message::SessionPinned(pinned))) => {
                if let Some(reply) = shared.pending().remove(&pinned.request_id) {
                    reply.send(Ok(ReplyValue::Pinned(pinned)));
                }
            }
            Ok(Some(Message::PresenceList {
                request_id,
                members,
                ..
            })) => {
                if let Some(reply) = shared.pending().remove(&request_id) {
                    reply.send(Ok(ReplyValue::Presence(members)));
                }
            }
            Ok(Some(Message::LeaseGrant(grant))) => {
                if let Some(reply) = shared.pending().remove(&grant.request_id) {
                    reply.send(Ok(ReplyValue::Lease(grant)));
                }
            }
            Ok(Some(Message::JobStatus(status))) => {
                if let Some(reply) = shared.pending().remove(&status.request_id) {
                    reply.send(Ok(ReplyValue::Job(status)));
                }
            }
            Ok(Some(Message::DeadLetters(page))) => {
                if let Some(reply) = shared.pending().remove(&page.request_id) {
                    reply.send(Ok(ReplyValue::DeadLetters(page)));
                }
            }
            Ok(Some(Message::Reply(answer))) => {
                if let Some(reply) = shared.pending().remove(&answer.request_id) {
                    reply.send(Ok(ReplyValue::Reply(answer)));
                }
            }
            Ok(Some(Message::Request(request))) => {
                // A worker that does not keep up is told at once rather than stalling the
                // session stream (and every acknowledgement behind it).
                if let Err(mpsc::error::TrySendError::Full(request)) = requests_tx.try_send(request)
                {
                    let busy = encode(&Message::Reply(WireReply {
                        request_id: request.request_id,
                        ok: false,
                        node: None,
                        payload: Bytes::from_static(b"worker busy: its request queue is full"),
                    }));
                    let _ = shared.session_tx.try_send(busy);
                }
            }
            Ok(Some(Message::EpochChanged {
                swarm,
                epoch,
                previous_epoch,
            })) => {
                tracing::info!(%swarm, epoch = epoch.0, previous = previous_epoch.0, "the swarm's log has a new epoch");
                shared
                    .epoch_changes
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(swarm, (epoch, previous_epoch));
            }
            Ok(Some(Message::Error(error))) => {
                let reply = shared.pending().remove(&error.request_id);
                match reply {
                    Some(reply) => {
                        reply.send(Err(ClientError::refused(error)));
                    }
                    None => {
                        tracing::warn!(code = error.code, message = %error.message, "router reported an error")
                    }
                }
            }
            Ok(Some(other)) => {
                let detail = format!("unexpected {} on the session stream", other.kind());
                shared
                    .connection
                    .close(VarInt::from_u32(0), detail.as_bytes());
                shared.fail_all(&ClientError::Protocol { detail });
                return;
            }
            Ok(None) => break,
            Err(error) => {
                shared
                    .connection
                    .close(VarInt::from_u32(0), b"protocol error");
                shared.fail_all(&error);
                return;
            }
        }
    }
    let closed = shared.connection.closed().await;
    shared.fail_all(&ClientError::from_connection(&closed));
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.connection
            .close(VarInt::from_u32(0), b"client dropped");
        if let Some(bulk) = &self.bulk {
            bulk.close(VarInt::from_u32(0), b"client dropped");
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.queued {
            self.shared.pending().remove(&self.id);
        }
    }
}

impl Reply {
    pub(super) fn send(self, result: ReplyResult) {
        let _ = self.tx.send(result);
    }
}

pub(super) fn expect_job(value: ReplyValue) -> Result<JobStatus, ClientError> {
    match value {
        ReplyValue::Job(status) => Ok(status),
        other => Err(ClientError::Protocol {
            detail: format!("expected a JobStatus, got {other:?}"),
        }),
    }
}

pub(super) fn expect_receipt(value: ReplyValue) -> Result<Receipt, ClientError> {
    match value {
        ReplyValue::Receipt(receipt) => Ok(receipt),
        other => Err(ClientError::Protocol {
            detail: format!("expected an acknowledgement, got {other:?}"),
        }),
    }
}

impl Requests {
    /// The next request; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Request> {
        self.rx.recv().await
    }
}

impl PendingAck {
    /// The op id given by the swarm's sequencer (or `OpId::NONE` for unordered classes).
    pub async fn wait(self) -> Result<OpId, ClientError> {
        self.wait_receipt().await.map(|receipt| receipt.op_id)
    }

    /// The op id and the epoch of the log it is durable in.
    pub async fn wait_receipt(mut self) -> Result<Receipt, ClientError> {
        match self.rx.take() {
            Some(rx) => match rx.await {
                Ok(result) => result.and_then(expect_receipt),
                Err(_) => Err(closed_error(&self.shared.connection)),
            },
            None => Ok(Receipt::default()),
        }
    }
}
