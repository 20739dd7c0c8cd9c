//! Deliveries: the class streams the router opens, read into one [`Deliveries`] queue per
//! session, which is a `futures_core::Stream`.

use super::*;

/// Accepts the router's delivery streams (one per class) and its job stream, and forwards
/// their messages to the application.
pub(super) async fn accept_deliveries(connection: Connection, inbound: Inbound, max_frame: usize) {
    while let Ok(recv) = connection.accept_uni().await {
        let inbound = inbound.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, max_frame);
            loop {
                match reader.next().await {
                    Ok(Some(Message::Deliver(deliver))) => {
                        // A send fails once the application dropped Deliveries: the stream
                        // is still read and its deliveries dropped. Leaving it unread would
                        // stop it, and the router ends a session whose stream is stopped.
                        let _ = inbound.deliveries.send(deliver).await;
                    }
                    Ok(Some(Message::JobLease(lease))) => {
                        let _ = inbound.job_events.send(jobs::JobEvent::Lease(lease)).await;
                    }
                    Ok(Some(Message::JobCancel {
                        job_id, attempt, ..
                    })) => {
                        let event = jobs::JobEvent::Cancel { job_id, attempt };
                        let _ = inbound.job_events.send(event).await;
                    }
                    Ok(Some(Message::JobUpdate(update))) => {
                        let _ = inbound.job_updates.send(update).await;
                    }
                    Ok(Some(Message::JobStatus(status))) => {
                        if let Some(reply) = inbound.shared.pending().remove(&status.request_id) {
                            reply.send(Ok(ReplyValue::Job(status)));
                        }
                    }
                    Ok(Some(Message::Error(error))) => {
                        let reply = inbound.shared.pending().remove(&error.request_id);
                        match reply {
                            Some(reply) => reply.send(Err(ClientError::refused(error))),
                            None => tracing::warn!(
                                code = error.code,
                                message = %error.message,
                                "router reported an error on the job stream"
                            ),
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(
                            kind = other.kind(),
                            "unexpected message on a delivery stream"
                        );
                        connection.close(
                            VarInt::from_u32(0),
                            b"unexpected message on a delivery stream",
                        );
                        return;
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%error, "bad frame on a delivery stream");
                        connection.close(VarInt::from_u32(0), b"bad frame from router");
                        return;
                    }
                }
            }
        });
    }
}

impl DeliverySink {
    /// Queues `deliver` in its class's channel (waiting while that channel is full: only
    /// that class's stream is held back); fails once the application dropped `Deliveries`.
    pub(super) async fn send(&self, deliver: Deliver) -> Result<(), ()> {
        let class = deliver.class;
        let permit = self.classes[class.index()]
            .reserve()
            .await
            .map_err(|_| ())?;
        if let (Some(tracker), true) = (&self.handed_over, class.is_ordered()) {
            // Decided with the slot in hand: while a reconnection resumes, the old and the
            // new connection may both hold the same ops; each is handed over once, in order.
            let fresh = tracker
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .admit(&deliver.swarm, class, deliver.epoch, deliver.op_id);
            if !fresh {
                return Ok(());
            }
        }
        permit.send(deliver);
        Ok(())
    }
}

/// Deliveries are a stream too, highest-priority class first, ending once the connection is
/// closed and everything was read.
impl futures_core::Stream for Deliveries {
    type Item = Deliver;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Deliver>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Deliveries {
    pub(crate) fn channels(buffer: usize) -> (DeliverySink, Deliveries) {
        let channels: [(mpsc::Sender<Deliver>, mpsc::Receiver<Deliver>); Class::COUNT] =
            std::array::from_fn(|_| mpsc::channel(buffer.max(1)));
        let (senders, receivers): (Vec<_>, Vec<_>) = channels.into_iter().unzip();
        let classes = senders
            .try_into()
            .unwrap_or_else(|_| unreachable!("one sender per class"));
        let receivers = receivers
            .try_into()
            .unwrap_or_else(|_| unreachable!("one receiver per class"));
        (
            DeliverySink {
                classes,
                handed_over: None,
            },
            Deliveries {
                classes: receivers,
                stats: None,
            },
        )
    }

    /// Counts every delivery handed out from now on in `stats` (redeliveries, out-of-order
    /// arrivals, the last message of each swarm).
    pub fn with_stats(mut self, stats: crate::ClientStats) -> Self {
        self.stats = Some((stats, crate::stats::Arrivals::default()));
        self
    }

    /// The next delivery, highest-priority class first; `None` once the connection is
    /// closed and everything was read.
    pub async fn recv(&mut self) -> Option<Deliver> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Deliveries::recv`] as a poll (what the [`futures_core::Stream`] implementation
    /// calls).
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Deliver>> {
        let mut open = false;
        // Class::ALL is in priority order: control, command, alert, reconciliation,
        // telemetry.
        for rx in &mut self.classes {
            match rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(deliver)) => {
                    if let Some((stats, arrivals)) = &mut self.stats {
                        stats.received(&deliver, arrivals);
                    }
                    return std::task::Poll::Ready(Some(deliver));
                }
                std::task::Poll::Ready(None) => {}
                std::task::Poll::Pending => open = true,
            }
        }
        if open {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(None)
        }
    }

    /// Up to `limit` deliveries appended to `out`, highest-priority class first (waiting
    /// for the first one); 0 once closed.
    pub async fn recv_many(&mut self, out: &mut Vec<Deliver>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let Some(first) = self.recv().await else {
            return 0;
        };
        out.push(first);
        let mut taken = 1;
        for rx in &mut self.classes {
            while taken < limit {
                match rx.try_recv() {
                    Ok(deliver) => {
                        if let Some((stats, arrivals)) = &mut self.stats {
                            stats.received(&deliver, arrivals);
                        }
                        out.push(deliver);
                        taken += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        taken
    }
}

#[cfg(test)]
mod delivery_tests {
    use super::*;

    pub(super) fn deliver(class: Class, op: u64) -> Deliver {
        Deliver {
            swarm: "s".into(),
            class,
            op_id: OpId(op),
            epoch: Epoch(1),
            source_agent: "a".into(),
            target_agent: None,
            key: None,
            payload: Bytes::new(),
            fencing_token: 0,
            lease: None,
            published_us: 0,
        }
    }

    #[tokio::test]
    pub(super) async fn a_telemetry_backlog_never_holds_a_command_back() {
        let (sink, mut deliveries) = Deliveries::channels(2);
        sink.send(deliver(Class::Telemetry, 0)).await.unwrap();
        sink.send(deliver(Class::Telemetry, 0)).await.unwrap();
        // The telemetry buffer is full; a command still goes in at once...
        tokio::time::timeout(
            Duration::from_secs(5),
            sink.send(deliver(Class::Command, 1)),
        )
        .await
        .expect("a full telemetry buffer does not block commands")
        .unwrap();
        sink.send(deliver(Class::Control, 2)).await.unwrap();
        // ...and comes out before the telemetry queued ahead of it (control first).
        let order: Vec<Class> = [
            deliveries.recv().await,
            deliveries.recv().await,
            deliveries.recv().await,
        ]
        .into_iter()
        .map(|d| d.unwrap().class)
        .collect();
        assert_eq!(order, [Class::Control, Class::Command, Class::Telemetry]);
        let mut rest = Vec::new();
        assert_eq!(deliveries.recv_many(&mut rest, 10).await, 1);
        drop(sink);
        assert!(
            deliveries.recv().await.is_none(),
            "ends when every sender is gone"
        );
    }

    #[tokio::test]
    pub(super) async fn the_sink_records_the_last_ordered_op_handed_over() {
        let (mut sink, _deliveries) = Deliveries::channels(8);
        let tracker = Arc::new(Mutex::new(IdempotentApply::new()));
        sink.handed_over = Some(tracker.clone());
        sink.send(deliver(Class::Command, 7)).await.unwrap();
        sink.send(deliver(Class::Telemetry, 0)).await.unwrap();
        assert_eq!(
            tracker.lock().unwrap().last_applied_of("s", Class::Command),
            OpId(7)
        );
    }
}
