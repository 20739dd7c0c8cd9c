//! The affinity plane of a session: worker registration, affine sessions, requests to
//! workers and their replies.

use super::*;

impl Client {
    /// Registers this session's node as a worker (role `worker` only), or restates what it
    /// advertises: call it again whenever a model is loaded or evicted, free memory or load
    /// changes, or to start draining. Returns the node's id in placement.
    pub async fn register_worker(&self, status: WorkerStatus) -> Result<u64, ClientError> {
        let value = self
            .request(|request_id| {
                Message::WorkerStatus(WorkerStatus {
                    request_id,
                    ..status
                })
            })
            .await?;
        match value {
            ReplyValue::WorkerAck(node_id) => Ok(node_id),
            other => Err(ClientError::Protocol {
                detail: format!("expected a WorkerAck, got {other:?}"),
            }),
        }
    }

    /// Opens (or renews) an affine session: the router pins `session_key` to a worker node
    /// (preferring one with `model` loaded) and keeps the pin, in its event log, until the
    /// session is closed or unused for the router's session TTL.
    pub async fn open_session(
        &self,
        session_key: &str,
        model: Option<&str>,
    ) -> Result<SessionPinned, ClientError> {
        check_name("session_key", session_key)?;
        let value = self
            .request(|request_id| Message::OpenSession {
                request_id,
                session_key: session_key.to_owned(),
                model: model.map(str::to_owned),
            })
            .await?;
        match value {
            ReplyValue::Pinned(pinned) => Ok(pinned),
            other => Err(ClientError::Protocol {
                detail: format!("expected SessionPinned, got {other:?}"),
            }),
        }
    }

    /// Ends an affine session (its node's load drops; the next open places it afresh).
    pub async fn close_session(&self, session_key: &str) -> Result<(), ClientError> {
        self.request(|request_id| Message::CloseSession {
            request_id,
            session_key: session_key.to_owned(),
        })
        .await
        .and_then(expect_receipt)
        .map(|_| ())
    }

    /// Sends a request to a worker and waits for its reply: with a `session_key` to the
    /// session's pinned node (opening the session if needed), without one to the
    /// least-loaded node that has `model`. Fails with `Refused` codes `NodeGone` (the node
    /// disconnected first; a retry goes to the session's new node), `DeadlineExceeded` (no
    /// reply within `timeout`), `NoWorker` or `Busy`. A worker's own failure is a reply with
    /// `ok == false`.
    pub async fn request_worker(
        &self,
        session_key: Option<&str>,
        model: Option<&str>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<WireReply, ClientError> {
        for name in [session_key, model].into_iter().flatten() {
            check_name("session_key and model", name)?;
        }
        if payload.len() > self.shared.max_payload_bytes {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "payload of {} bytes exceeds the maximum of {} bytes",
                    payload.len(),
                    self.shared.max_payload_bytes
                ),
            });
        }
        let timeout_ms = timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let request = self.request(|request_id| {
            Message::Request(Request {
                request_id,
                session_key: session_key.map(str::to_owned),
                model: model.map(str::to_owned),
                timeout_ms,
                source_agent: None,
                payload,
            })
        });
        // The router enforces the deadline; the local one only guards against a router
        // that never answers.
        let value = tokio::time::timeout(timeout + Duration::from_secs(5), request)
            .await
            .map_err(|_| ClientError::Timeout {
                during: "waiting for a worker's reply",
                after_ms: u64::from(timeout_ms) + 5_000,
            })??;
        match value {
            ReplyValue::Reply(reply) => Ok(reply),
            other => Err(ClientError::Protocol {
                detail: format!("expected a Reply, got {other:?}"),
            }),
        }
    }

    /// The requests the router sends this worker session; `None` after the first call.
    /// Answer each with [`Client::reply`]. While the application holds 1,024 unanswered
    /// requests in this stream, further ones are answered "busy" (`ok == false`) at once.
    pub fn requests(&self) -> Option<Requests> {
        self.shared
            .requests_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .map(|rx| Requests { rx })
    }

    /// Answers request `request_id` (the id the router gave it): `ok` false reports a
    /// failure, with `payload` saying why. A reply after the request's deadline, or after
    /// the router failed it over, is dropped by the router.
    pub async fn reply(
        &self,
        request_id: u64,
        ok: bool,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        let frame = encode(&Message::Reply(WireReply {
            request_id,
            ok,
            node: None,
            payload,
        }));
        self.shared
            .session_tx
            .send(frame)
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }
}
