//! The routing plane of a session: subscribe, unsubscribe, deltas, publish (with its
//! receipts, retries and batches), ack, and the session's end.

use super::*;

impl Client {
    pub fn welcome(&self) -> &Welcome {
        &self.shared.welcome
    }

    pub fn agent_id(&self) -> &str {
        &self.shared.agent_id
    }

    /// Whether the session attached a bulk connection (see [`Session::bulk_connection`]).
    pub fn has_bulk_connection(&self) -> bool {
        self.shared.bulk.is_some()
    }

    pub(super) async fn request(&self, build: impl FnOnce(u64) -> Message) -> ReplyResult {
        self.request_on(&self.shared.session_tx, build).await
    }

    /// A request written on `stream`; its answer comes on the session stream, or for the
    /// job stream's requests (submits, results) on the job answer stream.
    pub(super) async fn request_on(
        &self,
        stream: &mpsc::Sender<OutFrame>,
        build: impl FnOnce(u64) -> Message,
    ) -> ReplyResult {
        let (id, rx) = self.register().await?;
        let mut registration = Registration {
            shared: &self.shared,
            id,
            queued: false,
        };
        stream
            .send(encode(&build(id)))
            .await
            .map_err(|_| closed_error(&self.shared.connection))?;
        registration.queued = true;
        drop(registration);
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(closed_error(&self.shared.connection)),
        }
    }

    /// Takes an in-flight slot (waiting for one) and registers a request id.
    pub(super) async fn register(
        &self,
    ) -> Result<(u64, oneshot::Receiver<ReplyResult>), ClientError> {
        let slot = if self.shared.fail_when_in_flight_full {
            self.shared
                .in_flight
                .clone()
                .try_acquire_owned()
                .map_err(|_| ClientError::InFlightFull {
                    max: self.shared.max_in_flight,
                })?
        } else {
            self.shared
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| closed_error(&self.shared.connection))?
        };
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(id, Reply { tx, _slot: slot });
        // The session reader fails every pending request once the connection's close is
        // visible here: a request registered after that would wait forever.
        if let Some(reason) = self.shared.connection.close_reason() {
            self.shared.pending().remove(&id);
            return Err(ClientError::from_connection(&reason));
        }
        Ok((id, rx))
    }

    /// Subscribes to `class` messages of `swarm`, from every agent or from `from_agent`
    /// only. Returns once the router has registered it: every message published after that
    /// is delivered.
    pub async fn subscribe(
        &self,
        swarm: &str,
        class: Class,
        from_agent: Option<&str>,
    ) -> Result<(), ClientError> {
        self.subscription(swarm, class, from_agent, Message::Subscribe)
            .await
    }

    pub async fn unsubscribe(
        &self,
        swarm: &str,
        class: Class,
        from_agent: Option<&str>,
    ) -> Result<(), ClientError> {
        self.subscription(swarm, class, from_agent, Message::Unsubscribe)
            .await
    }

    pub(super) async fn subscription(
        &self,
        swarm: &str,
        class: Class,
        from_agent: Option<&str>,
        kind: fn(Subscription) -> Message,
    ) -> Result<(), ClientError> {
        self.request(|request_id| {
            kind(Subscription {
                request_id,
                swarm: swarm.to_owned(),
                class,
                agent_filter: from_agent.map(str::to_owned),
            })
        })
        .await
        .and_then(expect_receipt)
        .map(|_| ())
    }

    /// Asks for ops `from..=to` of `swarm` from the router's log (`to` = `OpId::NONE`: up to
    /// the latest durable op). The ops not targeted at other agents arrive on
    /// [`Deliveries`] (reconciliation stream); the answer says which range was covered, how
    /// many ops were sent and whether more follow (ask again from `last_op + 1`).
    pub async fn delta(&self, swarm: &str, from: OpId, to: OpId) -> Result<DeltaAck, ClientError> {
        let value = self
            .request(|request_id| Message::DeltaRequest {
                request_id,
                swarm: swarm.to_owned(),
                from_op: from,
                to_op: to,
            })
            .await?;
        match value {
            ReplyValue::Delta(ack) => Ok(ack),
            other => Err(ClientError::Protocol {
                detail: format!("expected a DeltaAck, got {other:?}"),
            }),
        }
    }

    /// EpochChanged notices received: swarm -> (current epoch, the epoch of the resume point).
    pub fn epoch_changes(&self) -> HashMap<String, (Epoch, Epoch)> {
        self.shared
            .epoch_changes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Acknowledges every op of `class` (control or command) in `swarm` up to and including
    /// `op_id` (cumulative). Ops delivered but not acknowledged within the router's
    /// redelivery timeout are sent again.
    pub async fn ack(&self, swarm: &str, class: Class, op_id: OpId) -> Result<(), ClientError> {
        let frame = encode(&Message::Ack {
            swarm: swarm.to_owned(),
            class,
            op_id,
        });
        self.shared
            .session_tx
            .send(frame)
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// Publishes and waits for the acknowledgement when there is one: ordered classes
    /// (control, command) resolve with their op id, others with `OpId::NONE` as soon as the
    /// frame is written (unless `options.ack`).
    pub async fn publish(
        &self,
        swarm: &str,
        class: Class,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<OpId, ClientError> {
        self.publish_start(swarm, class, payload, options)
            .await?
            .wait()
            .await
    }

    /// Publishes like [`Client::publish`], retrying refusals that say "not now"
    /// (`RateLimited`, `CircuitOpen`, `Busy`, and `Conflict`: another router of a cluster
    /// took the op id first) with exponential backoff and full jitter, never
    /// sooner than the router's `retry_after_ms`. Other errors, and the last refusal once
    /// `policy.max_attempts` are used, are returned.
    pub async fn publish_with_retry(
        &self,
        swarm: &str,
        class: Class,
        payload: Bytes,
        options: PublishOptions,
        policy: &RetryPolicy,
    ) -> Result<OpId, ClientError> {
        let mut backoff = Backoff::from_clock(policy.clone());
        loop {
            match self
                .publish(swarm, class, payload.clone(), options.clone())
                .await
            {
                Err(ClientError::Refused {
                    code,
                    name,
                    message,
                    retry_after_ms,
                }) if crate::retry::RETRIED_REFUSALS.contains(&code) => {
                    let floor = Duration::from_millis(u64::from(retry_after_ms));
                    match backoff.next_wait(floor) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => {
                            return Err(ClientError::Refused {
                                code,
                                name,
                                message,
                                retry_after_ms,
                            })
                        }
                    }
                }
                other => return other,
            }
        }
    }

    /// Writes a publish and returns without waiting for its acknowledgement, so a caller
    /// can keep a window of publishes in flight. At most `Session::max_in_flight`
    /// acknowledgements are awaited at once; past that this waits for a free slot.
    pub async fn publish_start(
        &self,
        swarm: &str,
        class: Class,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<PendingAck, ClientError> {
        let wants_ack = class.is_ordered() || options.ack;
        self.check_publish(swarm, &payload, &options)?;
        let (request_id, rx) = if wants_ack {
            let (id, rx) = self.register().await?;
            (id, Some(rx))
        } else {
            (0, None)
        };
        let registration = rx.as_ref().map(|_| Registration {
            shared: &self.shared,
            id: request_id,
            queued: false,
        });
        let frame = encode(&Message::Publish(Publish {
            request_id,
            swarm: swarm.to_owned(),
            class,
            target_agent: options.target_agent,
            key: options.key,
            payload,
            fencing_token: options.fencing_token,
            lease: options.lease,
        }));
        self.shared.publish_tx[class.index()]
            .send(frame)
            .await
            .map_err(|_| closed_error(&self.shared.connection))?;
        if let Some(mut registration) = registration {
            registration.queued = true;
        }
        Ok(PendingAck {
            rx,
            shared: self.shared.clone(),
        })
    }

    pub(super) fn check_publish(
        &self,
        swarm: &str,
        payload: &Bytes,
        options: &PublishOptions,
    ) -> Result<(), ClientError> {
        if payload.len() > self.shared.max_payload_bytes {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "payload of {} bytes exceeds the router's maximum of {} bytes",
                    payload.len(),
                    self.shared.max_payload_bytes
                ),
            });
        }
        let names = [
            Some(swarm),
            options.target_agent.as_deref(),
            options.key.as_deref(),
            options.lease.as_deref(),
        ];
        if !names.into_iter().flatten().all(valid_name) {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "swarm, target agent, key and lease must be 1 to {MAX_NAME_BYTES} bytes"
                ),
            });
        }
        Ok(())
    }

    /// Queues several unacknowledged messages of one class; the stream writer sends them in
    /// as few writes as it can (telemetry producers use this to batch). Ordered classes must
    /// use [`Client::publish`].
    pub async fn publish_batch(
        &self,
        class: Class,
        messages: impl IntoIterator<Item = Publish>,
    ) -> Result<usize, ClientError> {
        if class.is_ordered() {
            return Err(ClientError::InvalidArgument {
                detail: "publish_batch is for unordered classes; ordered ones need acks".into(),
            });
        }
        let mut count = 0;
        for mut publish in messages {
            let options = PublishOptions {
                target_agent: publish.target_agent.take(),
                key: publish.key.take(),
                ack: false,
                fencing_token: publish.fencing_token,
                lease: publish.lease.take(),
            };
            self.check_publish(&publish.swarm, &publish.payload, &options)?;
            publish.class = class;
            publish.request_id = 0;
            publish.target_agent = options.target_agent;
            publish.key = options.key;
            publish.lease = options.lease;
            self.shared.publish_tx[class.index()]
                .send(encode(&Message::Publish(publish)))
                .await
                .map_err(|_| closed_error(&self.shared.connection))?;
            count += 1;
        }
        Ok(count)
    }

    /// Closes the session (code 0).
    pub fn close(&self) {
        self.shared
            .connection
            .close(VarInt::from_u32(0), b"client closed");
        if let Some(bulk) = &self.shared.bulk {
            bulk.close(VarInt::from_u32(0), b"client closed");
        }
    }

    /// Waits until the connection is closed and says why.
    pub async fn closed(&self) -> ClientError {
        ClientError::from_connection(&self.shared.connection.closed().await)
    }
}
