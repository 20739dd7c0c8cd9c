//! The bulk path: a session's second connection, on the bulk runtime, for telemetry and job
//! streams.

use super::*;

/// A fresh attach token: random, never 0 (0 means "no offer" on the wire).
pub(super) fn attach_token() -> u64 {
    let mut bytes = [0u8; 8];
    let random = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&random, &mut bytes).is_err() {
        // No system randomness: no offer can be made safely; 0 is never accepted.
        return 0;
    }
    u64::from_le_bytes(bytes).max(1)
}

/// Drains a bulk lane onto the session's bulk connection once it is attached, or onto its
/// main connection when none was offered or it did not come in time.
pub(super) async fn bulk_lane_writer(
    main: Connection,
    mut path: watch::Receiver<BulkPath>,
    outbox: Arc<Outbox>,
    lane: Lane,
) {
    let connection = match path.wait_for(|p| !matches!(p, BulkPath::Waiting)).await {
        Ok(path) => match &*path {
            BulkPath::Attached(bulk) => bulk.clone(),
            _ => main,
        },
        // The session ended while waiting.
        Err(_) => return,
    };
    lane_writer(connection, outbox, lane, None).await
}

/// Resolves when the session's attached bulk connection closes, with why; never when the
/// session has none.
pub(super) async fn bulk_connection_closed(
    mut path: watch::Receiver<BulkPath>,
) -> quinn::ConnectionError {
    let attached = match path.wait_for(|p| !matches!(p, BulkPath::Waiting)).await {
        Ok(path) => match &*path {
            BulkPath::Attached(bulk) => Some(bulk.clone()),
            _ => None,
        },
        Err(_) => None,
    };
    match attached {
        Some(bulk) => bulk.closed().await,
        None => std::future::pending().await,
    }
}

/// Waits (at most `wait`) for the session's bulk connection, then reads the publish
/// streams the client opens on it, as the session's. Not attached in time: the session's
/// bulk lanes go on its main connection and a late attach finds no offer.
pub(super) async fn serve_bulk_connection(
    mut attached: oneshot::Receiver<Connection>,
    path: watch::Sender<BulkPath>,
    session: Arc<Session>,
    main: Connection,
    wait: Duration,
) {
    let context = &session.context;
    let bulk = match tokio::time::timeout(wait, &mut attached).await {
        Ok(Ok(bulk)) => Some(bulk),
        Ok(Err(_)) => None,
        Err(_) => {
            // Withdraw the offer; if an attach has taken it already, its connection is on
            // the way (it is handed over before it is welcomed): wait for it.
            if context.attachments().remove(&session.conn.0).is_some() {
                None
            } else {
                attached.await.ok()
            }
        }
    };
    let Some(bulk) = bulk else {
        path.send_replace(BulkPath::Main);
        debug!(agent = %session.agent, "no bulk connection attached; bulk classes use the main one");
        return;
    };
    path.send_replace(BulkPath::Attached(bulk.clone()));
    context.stats.bulk_attached.fetch_add(1, Ordering::Relaxed);
    let handle = context.bulk.handle().clone();
    // Aborting this task (the session ended) aborts the accept loop with it. A fault on a
    // bulk stream closes the session's main connection, whose close the application sees.
    let mut accepting = AbortOnDrop(
        handle.spawn(
            accept_publish_streams(bulk, context.partial_frames(), session.clone(), main)
                .in_current_span(),
        ),
    );
    let _ = (&mut accepting.0).await;
}

/// A connection whose Hello attaches it to a session as that session's bulk connection:
/// checked against the session's offer (agent and token, one use), answered with a
/// Welcome, handed to the session, and held until it closes. Without a matching offer it is
/// closed with `InvalidRequest`.
pub(super) async fn attach_bulk_connection(
    connection: Connection,
    mut send: SendStream,
    hello: &Hello,
    attach: Attach,
    context: &Context,
) {
    let offer = {
        let mut attachments = context.attachments();
        match attachments.remove(&attach.session.0) {
            Some(offer) if offer.token == attach.token && *offer.agent == *hello.agent_id => {
                Some(offer)
            }
            Some(offer) => {
                // A wrong token spends nothing: the session's own attach may still come.
                attachments.insert(attach.session.0, offer);
                None
            }
            None => None,
        }
    };
    let Some(offer) = offer else {
        let fault = Fault::new(
            ErrorCode::InvalidRequest,
            "no session of this agent waits for a bulk connection with this token",
        );
        close_with(&connection, &context.stats, &fault);
        return;
    };
    // Handed over before it is welcomed: a client that has its Welcome finds the session
    // using the connection.
    let PendingAttach {
        attached,
        mut ended,
        ..
    } = offer;
    if attached.send(connection.clone()).is_err() {
        connection.close(VarInt::from_u32(0), b"the session ended");
        return;
    }
    let welcome = encode(&Message::Welcome(Welcome {
        session_id: attach.session,
        router_name: context.config.router_name.clone(),
        limits: welcome_limits(&context.config),
        bulk: None,
    }));
    if send
        .write_all_chunks(&mut [welcome.head, welcome.body])
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
    debug!(agent = %hello.agent_id, session = attach.session.0, "bulk connection attached");
    tokio::select! {
        _ = connection.closed() => {}
        _ = ended.wait_for(|ended| *ended) => {
            connection.close(VarInt::from_u32(0), b"session ended");
        }
    }
}
