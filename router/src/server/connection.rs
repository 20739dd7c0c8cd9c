//! A connection's lifecycle: the handshake, the session loop, lane writers, the publish
//! stream readers and the close.

use super::*;
use rustls::pki_types::CertificateDer;

impl Fault {
    pub(super) fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Fault {
            code,
            reason: reason.into(),
        }
    }
}

impl FrameReader {
    pub(super) fn new(
        recv: RecvStream,
        max_frame_bytes: usize,
        partial: Arc<PartialFrames>,
    ) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_frame_bytes),
            partial,
            charged: 0,
        }
    }

    /// Charges what the decoder holds now against the connection's budget.
    pub(super) fn settle(&mut self) -> Result<(), Fault> {
        let held = self.decoder.held_bytes();
        match self.partial.recharge(self.charged, held) {
            Ok(()) => {
                self.charged = held;
                Ok(())
            }
            Err(refused) => Err(Fault::new(ErrorCode::Busy, refused.to_string())),
        }
    }

    pub(super) async fn next(&mut self, options: &DecodeOptions) -> Result<Read, Fault> {
        loop {
            match self.decoder.next_message(options) {
                Ok(Some(message)) => return Ok(Read::Message(message)),
                // Every whole frame is out: what is left is unfinished, charged before more
                // is read (once per chunk, not per message, on counters shared router-wide).
                Ok(None) => self.settle()?,
                Err(error) => return Err(Fault::new(error.code(), error.to_string())),
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.push(chunk.bytes),
                Ok(None) if self.decoder.is_idle() => return Ok(Read::End),
                Ok(None) => {
                    return Err(Fault::new(
                        ErrorCode::TruncatedFrame,
                        format!(
                            "stream ended inside a frame ({} bytes buffered)",
                            self.decoder.buffered_bytes()
                        ),
                    ))
                }
                Err(_) => return Ok(Read::Gone),
            }
        }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.partial.give_back(self.charged);
    }
}

pub(super) fn close_with(connection: &Connection, stats: &Stats, fault: &Fault) {
    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    debug!(code = %fault.code, reason = %fault.reason, "closing connection");
    // QUIC limits the reason to fit one packet; keep it short.
    let reason: String = fault.reason.chars().take(200).collect();
    connection.close(VarInt::from(fault.code.as_u16()), reason.as_bytes());
}

pub(super) fn check_hello(hello: &Hello, config: &Config) -> Result<(), Fault> {
    if hello.metadata.len() > MAX_METADATA_BYTES {
        return Err(Fault::new(
            ErrorCode::InvalidRequest,
            format!("metadata is limited to {MAX_METADATA_BYTES} bytes"),
        ));
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Fault::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this router speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            ),
        ));
    }
    let max = config.limits.max_swarms_per_session as usize;
    if hello.swarms.len() > max {
        return Err(Fault::new(
            ErrorCode::TooManySwarms,
            format!("a session may join at most {max} swarms"),
        ));
    }
    check_name("agent_id", &hello.agent_id)?;
    if hello.agent_id == ROUTER_AGENT {
        return Err(Fault::new(
            ErrorCode::Forbidden,
            format!("agent id {ROUTER_AGENT:?} is the router's own"),
        ));
    }
    for swarm in &hello.swarms {
        check_name("swarm name", swarm)?;
        if swarm.starts_with('$') {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!("swarm {swarm:?}: names starting with $ are reserved for the router"),
            ));
        }
    }
    let mut seen = HashSet::with_capacity(hello.resume.len());
    for point in &hello.resume {
        if !point.class.is_ordered() || !seen.insert((point.swarm.as_str(), point.class)) {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!(
                    "resume point for swarm {:?} and class {:?}: at most one per swarm and \
                     ordered class (control, command)",
                    point.swarm, point.class
                ),
            ));
        }
        if !hello.swarms.contains(&point.swarm) {
            return Err(Fault::new(
                ErrorCode::InvalidRequest,
                format!(
                    "resume point for swarm {:?}, which Hello does not join",
                    point.swarm
                ),
            ));
        }
    }
    Ok(())
}

/// Waits for the session stream and its Hello.
pub(super) async fn handshake(
    connection: &Connection,
    context: &Context,
    partial: Arc<PartialFrames>,
) -> Result<(SendStream, FrameReader, Hello), Fault> {
    let max_frame = context.config.limits.max_frame_bytes as usize;
    // Publish streams a client opens right behind its Hello (pipelining) wait, unaccepted,
    // until the session is established; they are read only after Hello was checked.
    let (send, recv) = connection
        .accept_bi()
        .await
        .map_err(|e| Fault::new(ErrorCode::HelloRequired, e.to_string()))?;
    let mut reader = FrameReader::new(recv, max_frame, partial);
    match reader.next(&context.decode).await? {
        Read::Message(Message::Hello(hello)) => {
            check_hello(&hello, &context.config)?;
            Ok((send, reader, hello))
        }
        Read::Message(other) => Err(Fault::new(
            ErrorCode::HelloRequired,
            format!("{} before Hello", other.kind()),
        )),
        Read::End | Read::Gone => Err(Fault::new(
            ErrorCode::HelloRequired,
            "session stream ended before Hello",
        )),
    }
}

/// Drains one lane onto its stream until the outbox closes or the stream fails.
pub(super) async fn lane_writer(
    connection: Connection,
    outbox: Arc<Outbox>,
    lane: Lane,
    mut stream: Option<SendStream>,
) {
    let mut frames: Vec<OutFrame> = Vec::with_capacity(WRITE_BATCH_FRAMES);
    let mut durable_at = Vec::new();
    let mut batch = Coalescer::new();
    loop {
        if outbox.is_closed() {
            break;
        }
        let drained = outbox.drain(
            lane,
            WRITE_BATCH_FRAMES,
            WRITE_BATCH_BYTES,
            &mut frames,
            &mut durable_at,
        );
        if drained == 0 {
            outbox.ready(lane).await;
            continue;
        }
        for frame in frames.drain(..) {
            batch.push(frame);
        }
        if stream.is_none() {
            let Ok(opened) = connection.open_uni().await else {
                break;
            };
            let _ = opened.set_priority(lane.stream_priority());
            stream = Some(opened);
        }
        let Some(send) = stream.as_mut() else {
            break;
        };
        let chunks = batch.chunks();
        if send.write_all_chunks(chunks).await.is_err() {
            // The stream is unusable (the peer stopped it or the connection is gone); the
            // session cannot work without it, so end the connection.
            connection.close(
                VarInt::from(ErrorCode::WrongStream.as_u16()),
                b"a delivery or session stream failed",
            );
            outbox.close();
            break;
        }
        chunks.clear();
        if !durable_at.is_empty() {
            outbox.written(lane, &durable_at);
            durable_at.clear();
        }
    }
}

impl SessionCount {
    fn new(stats: &Arc<Stats>, role: Role) -> SessionCount {
        let role = crate::stats::role_index(role);
        stats.sessions_by_role[role].fetch_add(1, Ordering::Relaxed);
        SessionCount(stats.clone(), role)
    }
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.sessions_by_role[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection from its handshake to its close. Sessions on the main listener
/// run here; a bulk connection (Hello with `attach`) is handed to its session.
pub(super) async fn run_connection(
    conn: ConnId,
    connection: Connection,
    context: Arc<Context>,
    listener: Listener,
) {
    let stats = context.stats.clone();
    stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
    let open = stats.connections_open.fetch_add(1, Ordering::Relaxed) + 1;
    // Counted open until this function returns, whichever way it does.
    let _open = OpenConnection(stats.clone());
    context
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            conn.0,
            Tracked {
                connection: connection.clone(),
                listener,
                since_ms: context.clock.now_ms(),
                session: None,
                bulk: None,
            },
        );
    // Served until this function returns; a bulk connection's attach waits in `greet` for
    // as long as the connection is used.
    let _tracking = Tracking {
        context: context.clone(),
        conn,
    };
    if open > context.config.limits.max_connections as u64 {
        stats
            .connections_refused_busy
            .fetch_add(1, Ordering::Relaxed);
        connection.close(
            VarInt::from(ErrorCode::Busy.as_u16()),
            b"router at its connection limit",
        );
        return;
    }
    // One budget for the unfinished frames of all this connection's streams.
    let partial = context.partial_frames();
    let Some((send, session_reader, hello, identity)) =
        greet(&connection, &context, listener, partial.clone()).await
    else {
        return;
    };
    debug!(agent = %hello.agent_id, role = ?hello.role, swarms = hello.swarms.len(), "session established");
    let outbox = Arc::new(Outbox::new(conn, &context.config.queues, stats.clone()));
    // Replies outrank every class stream.
    let _ = send.set_priority(i32::MAX);
    let bulk = BulkSide::offer(conn, &hello, listener, &context);
    let writers = spawn_lane_writers(&connection, &context, &outbox, &bulk.path, send);
    let welcome = Welcome {
        session_id: SessionId(conn.0),
        router_name: context.config.router_name.clone(),
        limits: welcome_limits(&context.config),
        bulk: bulk.offer,
    };
    let _ = outbox.push(Lane::Session, encode(&Message::Welcome(welcome)));
    let metadata = hello.metadata.clone();
    let session = new_session(conn, hello, &outbox, &context);
    if let Some(tracked) = context
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&conn.0)
    {
        tracked.session = Some(Arc::downgrade(&session));
        tracked.bulk = Some(bulk.path.clone());
    }
    if let Some((identity, proof, used)) = identity {
        // Registered first, so that a reload from now on re-checks it; kept second, which
        // re-checks it if a reload came in between.
        context
            .credentialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, Arc::downgrade(&session));
        session.keep_credential(identity, proof, &used);
    }
    if !join(&session, metadata, &context).await {
        context
            .credentialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
        outbox.request_close(ErrorCode::Stopped);
        connection.close(
            VarInt::from(ErrorCode::Stopped.as_u16()),
            b"stopped by a controller",
        );
        outbox.close();
        for writer in writers {
            writer.abort();
        }
        context.attachments().remove(&conn.0);
        return;
    }
    // Counted until this function returns, whichever way it does.
    let _role = SessionCount::new(&stats, session.role);
    let uni_task = tokio::spawn(
        accept_publish_streams(
            connection.clone(),
            partial,
            session.clone(),
            connection.clone(),
        )
        .in_current_span(),
    );
    let hello_timeout = Duration::from_millis(context.config.limits.hello_timeout_ms);
    let attach_wait = ATTACH_WAIT.min(hello_timeout);
    let bulk_task = bulk.attached.map(|attached| {
        tokio::spawn(
            serve_bulk_connection(
                attached,
                bulk.path_tx,
                session.clone(),
                connection.clone(),
                attach_wait,
            )
            .in_current_span(),
        )
    });
    serve_session(&connection, session_reader, &session, &bulk.path).await;
    // Close the outbox before Disconnect reaches the shards: a command still queued from a
    // stream reader then finds it closed and leaves nothing behind.
    outbox.close();
    uni_task.abort();
    context.attachments().remove(&conn.0);
    // The attached connection (if any, even one handed over just now) ends with the session.
    bulk.ended_tx.send_replace(true);
    if let Some(task) = bulk_task {
        task.abort();
        let _ = task.await;
    }
    if let BulkPath::Attached(bulk) = &*bulk.path.borrow() {
        bulk.close(VarInt::from_u32(0), b"session ended");
    }
    leave(conn, &session, &context).await;
    for writer in writers {
        writer.abort();
    }
    debug!("connection closed");
}

/// The handshake, within the hello timeout: the session stream, its reader and the Hello,
/// or `None` once the connection is dealt with (closed, refused, or handed over as a
/// session's bulk connection).
async fn greet(
    connection: &Connection,
    context: &Arc<Context>,
    listener: Listener,
    partial: Arc<PartialFrames>,
) -> Option<(SendStream, FrameReader, Hello, Option<Verified>)> {
    let stats = &context.stats;
    let hello_timeout = Duration::from_millis(context.config.limits.hello_timeout_ms);
    let handshake =
        tokio::time::timeout(hello_timeout, handshake(connection, context, partial)).await;
    let (send, session_reader, hello) = match handshake {
        Ok(Ok(ok)) => ok,
        Ok(Err(fault)) => {
            close_with(connection, stats, &fault);
            return None;
        }
        Err(_) => {
            let fault = Fault::new(
                ErrorCode::HelloRequired,
                "no Hello within the hello timeout",
            );
            close_with(connection, stats, &fault);
            return None;
        }
    };
    if let Some(attach) = hello.attach {
        if listener == Listener::Bulk {
            attach_bulk_connection(connection.clone(), send, &hello, attach, context).await;
        } else {
            let fault = Fault::new(
                ErrorCode::InvalidRequest,
                "a bulk connection attaches on the bulk listener, at the port Welcome offered",
            );
            close_with(connection, stats, &fault);
        }
        return None;
    }
    let identity = match context.authenticator() {
        Some(auth) => match authenticate(&auth, &hello, peer_certificates(connection)) {
            Ok((identity, proof)) => Some((identity, proof, auth)),
            Err(fault) => {
                context.stats.auth_refused.fetch_add(1, Ordering::Relaxed);
                close_with(connection, stats, &fault);
                return None;
            }
        },
        None => None,
    };
    // A stopped agent is refused until its stop runs out, with the time left.
    let stopped_for = {
        let now_ms = context.clock.now_ms();
        context.control().stops.refused_for(&hello.agent_id, now_ms)
    };
    if let Some(left) = stopped_for {
        let mut send = send;
        let refusal = Refusal::new(
            ErrorCode::Stopped,
            format!("agent {:?} was stopped by a controller", hello.agent_id),
        )
        .retry_after(left.as_millis().clamp(1, u128::from(u32::MAX)) as u32)
        .frame(0);
        let _ = send
            .write_all_chunks(&mut [refusal.head, refusal.body])
            .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        connection.close(
            VarInt::from(ErrorCode::Stopped.as_u16()),
            b"stopped by a controller",
        );
        return None;
    }
    Some((send, session_reader, hello, identity))
}

/// A session's identity, what proved it, and the authenticator that verified it.
type Verified = (
    crate::auth::Identity,
    crate::auth::Proof,
    Arc<crate::auth::Authenticator>,
);

/// The client certificate chain the connection's handshake verified, if it presented one.
fn peer_certificates(connection: &Connection) -> Option<Arc<[CertificateDer<'static>]>> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    (!chain.is_empty()).then(|| Arc::from(*chain))
}

/// Who the session is: the Hello's credential when it carries one (signed by a trusted
/// key, not revoked), else the client certificate the handshake verified (its agent id,
/// and what the policy grants it); for this agent id, granting the Hello's role in every
/// swarm it joins.
fn authenticate(
    auth: &crate::auth::Authenticator,
    hello: &Hello,
    certificates: Option<Arc<[CertificateDer<'static>]>>,
) -> Result<(crate::auth::Identity, crate::auth::Proof), Fault> {
    let refused = |refusal: crate::auth::AuthRefusal| Fault::new(refusal.code, refusal.reason);
    let (identity, proof) = match (&hello.credential, certificates) {
        (Some(token), _) => (
            auth.verify(token.as_str()).map_err(refused)?,
            crate::auth::Proof::Token(token.clone()),
        ),
        (None, Some(chain)) => (
            auth.identify_certificate(&chain).map_err(refused)?,
            crate::auth::Proof::Certificate(chain),
        ),
        (None, None) => {
            let what = match auth.client_verifier() {
                Some(_) => "a credential or a client certificate",
                None => "a credential",
            };
            return Err(Fault::new(
                ErrorCode::Unauthenticated,
                format!("this router requires {what} (auth.mode = \"required\")"),
            ));
        }
    };
    admit(&identity, &hello.agent_id, hello.role, &hello.swarms).map_err(refused)?;
    Ok((identity, proof))
}

/// Whether `identity` may be agent `agent` in `role` in every one of `swarms`.
pub(super) fn admit(
    identity: &crate::auth::Identity,
    agent: &str,
    role: Role,
    swarms: &[String],
) -> Result<(), crate::auth::AuthRefusal> {
    if identity.agent != agent {
        return Err(crate::auth::AuthRefusal::forbidden(format!(
            "the credential is for agent {:?}, not {agent:?}",
            identity.agent
        )));
    }
    if swarms.is_empty() && !identity.has_role(role) {
        return Err(crate::auth::AuthRefusal::forbidden(format!(
            "the credential grants no {} role",
            role.name()
        )));
    }
    if let Some(swarm) = identity.refused_swarm(role, swarms) {
        return Err(crate::auth::AuthRefusal::forbidden(format!(
            "the credential grants no {} role in swarm {swarm:?}",
            role.name()
        )));
    }
    Ok(())
}

/// A session's bulk side: the offer in its Welcome, and the path its bulk lanes take (the
/// main connection until a bulk connection attaches).
struct BulkSide {
    offer: Option<BulkOffer>,
    path_tx: watch::Sender<BulkPath>,
    path: watch::Receiver<BulkPath>,
    ended_tx: watch::Sender<bool>,
    attached: Option<oneshot::Receiver<Connection>>,
}

impl BulkSide {
    /// A client that can attach a bulk connection is offered the bulk listener: its
    /// telemetry and job traffic then has a socket, a connection and a congestion window of
    /// its own, all driven on the bulk runtime.
    fn offer(conn: ConnId, hello: &Hello, listener: Listener, context: &Context) -> BulkSide {
        let (path_tx, path) = watch::channel(BulkPath::Main);
        let (ended_tx, ended) = watch::channel(false);
        let mut attached_rx = None;
        let offer = match context.bulk_port {
            Some(port) if hello.bulk && listener == Listener::Main => {
                let token = attach_token();
                (token != 0).then(|| {
                    let (attached, rx) = oneshot::channel();
                    attached_rx = Some(rx);
                    context.attachments().insert(
                        conn.0,
                        PendingAttach {
                            token,
                            agent: Arc::from(hello.agent_id.as_str()),
                            attached,
                            ended: ended.clone(),
                        },
                    );
                    path_tx.send_replace(BulkPath::Waiting);
                    BulkOffer { port, token }
                })
            }
            _ => None,
        };
        BulkSide {
            offer,
            path_tx,
            path,
            ended_tx,
            attached: attached_rx,
        }
    }
}

/// One writer per lane: bulk lanes on the bulk runtime (on the bulk connection once one
/// attaches), the others here; the session lane writes on the session stream.
fn spawn_lane_writers(
    connection: &Connection,
    context: &Context,
    outbox: &Arc<Outbox>,
    bulk_path: &watch::Receiver<BulkPath>,
    send: SendStream,
) -> Vec<JoinHandle<()>> {
    let mut writers = Vec::with_capacity(Lane::COUNT);
    let mut session_send = Some(send);
    for lane in Lane::all() {
        let stream = if lane == Lane::Session {
            session_send.take()
        } else {
            None
        };
        writers.push(if lane.is_bulk() {
            let writer =
                bulk_lane_writer(connection.clone(), bulk_path.clone(), outbox.clone(), lane);
            context.bulk.handle().spawn(writer)
        } else {
            tokio::spawn(lane_writer(
                connection.clone(),
                outbox.clone(),
                lane,
                stream,
            ))
        });
    }
    writers
}

/// The session of an accepted Hello, with its rate limits and breakers.
fn new_session(
    conn: ConnId,
    hello: Hello,
    outbox: &Arc<Outbox>,
    context: &Arc<Context>,
) -> Arc<Session> {
    let config = &context.config;
    let now = std::time::Instant::now();
    let swarm_buckets = hello
        .swarms
        .iter()
        .filter_map(|swarm| {
            let rates = config.rate_limits.swarm_rates_for(swarm, hello.role)?;
            Some((swarm.clone(), ClassBuckets::new(rates, now)))
        })
        .collect();
    let swarm_guards = hello
        .swarms
        .iter()
        .map(|swarm| (swarm.clone(), context.swarm_guard(swarm)))
        .collect();
    Arc::new(Session {
        conn,
        agent: hello.agent_id.into(),
        role: hello.role,
        last_seen: Arc::new(AtomicU64::new(context.clock.now_ms())),
        resume: hello
            .resume
            .into_iter()
            .filter(|r| r.class.is_ordered())
            .map(|r| ((r.swarm, r.class), (r.epoch, r.last_applied)))
            .collect(),
        swarms: hello.swarms.into_iter().collect(),
        outbox: outbox.clone(),
        subscriptions: Arc::new(Mutex::new(HashSet::new())),
        context: context.clone(),
        max_payload_bytes: max_payload_bytes(config.limits.max_frame_bytes as usize),
        delta_window: Mutex::new((std::time::Instant::now(), 0)),
        presence_window: Mutex::new((std::time::Instant::now(), 0)),
        limits: Mutex::new(SessionLimits {
            buckets: ClassBuckets::new(
                config.rate_limits.rates_for(hello.role),
                std::time::Instant::now(),
            ),
            swarm_buckets,
            breaker: Breaker::new(config.rate_limits.breaker, std::time::Instant::now()),
        }),
        swarm_guards,
        // The first drop of a session is reported at once.
        fast_refusals: Mutex::new((
            0,
            std::time::Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(std::time::Instant::now),
        )),
        credential_expires_s: AtomicU64::new(0),
        credential: Mutex::new(None),
    })
}

/// Joins the agent's presence (the newest session of an agent id wins; the one it replaces
/// is closed) and its job queue side. False when the agent was stopped meanwhile.
async fn join(session: &Arc<Session>, metadata: String, context: &Arc<Context>) -> bool {
    let present = Present {
        conn: session.conn,
        role: session.role,
        swarms: session.swarms.iter().cloned().collect(),
        metadata,
        last_seen: session.last_seen.clone(),
        outbox: session.outbox.clone(),
    };
    // The stop check and the join under one lock: a Stop between them cannot miss us.
    let joined = {
        let mut control = context.control();
        let now_ms = context.clock.now_ms();
        if control.stops.refused_for(&session.agent, now_ms).is_some() {
            None
        } else {
            Some(
                control
                    .presence
                    .join(session.agent.clone(), present.clone()),
            )
        }
    };
    let Some(joined) = joined else {
        return false;
    };
    match joined {
        Joined::New => {
            context
                .announce_presence(&session.agent, &present, "join", "connected")
                .await
        }
        Joined::Replaced(old) => {
            context.stats.presence_leaves[2].fetch_add(1, Ordering::Relaxed);
            old.outbox.request_close(ErrorCode::Replaced)
        }
    }
    let worker_swarms: Option<Vec<String>> =
        (session.role == Role::Worker).then(|| session.swarms.iter().cloned().collect());
    let joined = context.jobs().connect(
        session.conn,
        &session.agent,
        &session.outbox,
        worker_swarms.as_deref(),
    );
    context.apply_job_effects(joined);
    true
}

/// Reads and dispatches the session stream until the session ends: the client closes it,
/// a fault closes the connection, the router asks for a close (replaced, heartbeat timeout,
/// stopped, lagging), or either of the session's connections is lost.
async fn serve_session(
    connection: &Connection,
    mut session_reader: FrameReader,
    session: &Arc<Session>,
    bulk_path: &watch::Receiver<BulkPath>,
) {
    let context = &session.context;
    let stats = &context.stats;
    let outbox = &session.outbox;
    let session_loop = async {
        loop {
            match session_reader.next(&context.decode).await? {
                Read::Message(message) => {
                    // Anything on the session stream is a sign of life, even while an
                    // earlier message waits for the log.
                    session
                        .last_seen
                        .fetch_max(context.clock.now_ms(), Ordering::Relaxed);
                    session.dispatch(message).await?
                }
                Read::End | Read::Gone => return Ok::<(), Fault>(()),
            }
        }
    };
    tokio::select! {
        result = session_loop => match result {
            Err(fault) => close_with(connection, stats, &fault),
            Ok(()) => connection.close(VarInt::from_u32(0), b"session stream closed"),
        },
        code = outbox.close_requested() => {
            let reason = match code {
                ErrorCode::Replaced => "another session with this agent id connected",
                ErrorCode::HeartbeatTimeout => "no heartbeat within the heartbeat timeout",
                ErrorCode::Stopped => "stopped by a controller",
                ErrorCode::Unauthenticated => {
                    "the session's credential was revoked or its key is no longer trusted"
                }
                _ => "outbound queue overflow: the subscriber is lagging and missed messages",
            };
            close_with(connection, stats, &Fault::new(code, reason));
        }
        _ = connection.closed() => {}
        () = credential_expired(session) => {
            let fault = Fault::new(ErrorCode::Unauthenticated, "the session's credential or client certificate expired");
            close_with(connection, stats, &fault);
        }
        error = bulk_connection_closed(bulk_path.clone()) => {
            // The session's two connections live and end together.
            match error {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    connection.close(close.error_code, &close.reason)
                }
                other => connection.close(
                    VarInt::from_u32(0),
                    format!("the session's bulk connection was lost: {other}").as_bytes(),
                ),
            }
        }
    }
}

/// Returns once the session's credential has expired (never for a session without one). A
/// refresh moves the expiry; this looks again when it wakes.
async fn credential_expired(session: &Session) {
    loop {
        let expires_s = session.credential_expires_s.load(Ordering::Relaxed);
        if expires_s == 0 {
            return std::future::pending().await;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Credentials are stated in wall-clock seconds (their issuer's clock); the leeway
        // allowed at verification applies here too.
        let leeway_s = session.context.config.auth.leeway_s;
        let deadline_ms = expires_s.saturating_add(leeway_s).saturating_mul(1_000);
        if now_ms >= deadline_ms
            && session.credential_expires_s.load(Ordering::Relaxed) == expires_s
        {
            return;
        }
        let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms).clamp(10, 60_000));
        tokio::time::sleep(wait).await;
    }
}

/// What a session leaves behind: its subscriptions (the shards drop them), its presence
/// (announced), its job queue side and, for a worker, its affine sessions and requests.
async fn leave(conn: ConnId, session: &Arc<Session>, context: &Arc<Context>) {
    context
        .credentialed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&conn);
    for shard in context.shards.iter().chain(&context.job_shards) {
        let _ = shard.send(ShardCommand::Disconnect { conn }).await;
    }
    let left = context.control().presence.leave(&session.agent, conn);
    if let Some(present) = left {
        context.stats.presence_leaves[0].fetch_add(1, Ordering::Relaxed);
        if !context.shutting_down.load(Ordering::Acquire) {
            context
                .announce_presence(&session.agent, &present, "leave", "closed")
                .await;
        }
    }
    // A worker that leaves takes its sessions with it (they move to their next choices),
    // unless the router itself is stopping: then the pins stay for after the restart.
    if !context.shutting_down.load(Ordering::Acquire) {
        let now_ms = context.now_ms();
        let left = context.jobs().disconnect(conn, now_ms);
        context.apply_job_effects(left);
        let (failed, pins) = context.workers().disconnect(conn);
        push_all(failed);
        if let Err(error) = context.write_pins(pins).await {
            tracing::warn!(%error, "moved session pins not written");
        }
    }
}

/// The limits a Welcome announces.
pub(super) fn welcome_limits(config: &Config) -> Limits {
    Limits {
        max_frame_bytes: config.limits.max_frame_bytes,
        max_subscriptions: config.limits.max_subscriptions,
        max_swarms_per_session: config.limits.max_swarms_per_session,
        queue_frames: Class::ALL
            .iter()
            .map(|c| config.queues.for_class(*c) as u32)
            .collect(),
        heartbeat_interval_ms: config.presence.heartbeat_interval_ms,
        heartbeat_timeout_ms: config.presence.timeout_ms(),
    }
}

/// Accepts the publish streams the client opens on `connection`; a protocol fault on one
/// closes `faults_to` (the session's main connection).
pub(super) async fn accept_publish_streams(
    connection: Connection,
    partial: Arc<PartialFrames>,
    session: Arc<Session>,
    faults_to: Connection,
) {
    let max_frame = session.context.config.limits.max_frame_bytes as usize;
    // Stream readers live in this set, so aborting this task (when the connection ends)
    // aborts them too.
    let mut readers = JoinSet::new();
    while let Ok(recv) = connection.accept_uni().await {
        // Reap finished readers so the set stays as small as the open streams.
        while readers.try_join_next().is_some() {}
        let reader = FrameReader::new(recv, max_frame, partial.clone());
        readers.spawn(
            read_publish_stream(reader, session.clone(), faults_to.clone()).in_current_span(),
        );
    }
}

/// Reads one publish stream. The client keeps one stream per class, so the first message
/// tells what the stream carries: a telemetry or job stream is read on from the bulk
/// runtime (see [`crate::bulk`]), every other stream here on the main one.
pub(super) async fn read_publish_stream(
    mut reader: FrameReader,
    session: Arc<Session>,
    connection: Connection,
) {
    let first = match reader.next(&session.context.decode).await {
        Ok(Read::Message(message)) => message,
        Ok(Read::End | Read::Gone) => return,
        Err(fault) => {
            close_with(&connection, &session.context.stats, &fault);
            return;
        }
    };
    let bulk = match &first {
        Message::Publish(publish) => publish.class == Class::Telemetry,
        Message::SubmitJob(_)
        | Message::JobResult(_)
        | Message::JobProgress(_)
        | Message::JobAck { .. }
        | Message::JobCredits { .. } => true,
        _ => false,
    };
    let stats = &session.context.stats;
    if bulk {
        stats.bulk_streams.fetch_add(1, Ordering::Relaxed);
        let handle = session.context.bulk.handle().clone();
        // Aborting this task (the connection ended) aborts the bulk reader with it.
        let mut reading = AbortOnDrop(
            handle
                .spawn(read_publishes(reader, session, connection, Some(first)).in_current_span()),
        );
        let _ = (&mut reading.0).await;
    } else {
        stats.main_streams.fetch_add(1, Ordering::Relaxed);
        read_publishes(reader, session, connection, Some(first)).await;
    }
}

/// Dispatches a publish stream's messages, `first` (already read) first. Telemetry waits
/// for the router-wide intake budget when one is set; a full shard queue holds the reader
/// (and so, through QUIC flow control, the sender).
pub(super) async fn read_publishes(
    mut reader: FrameReader,
    session: Arc<Session>,
    connection: Connection,
    mut first: Option<Message>,
) {
    let decode = session.context.decode.clone();
    let result = async {
        // Telemetry this reader may still read before it takes another batch from the
        // router-wide intake budget, and the same for the governed budget (telemetry and
        // job messages).
        let mut telemetry_allowance = 0u32;
        let mut governed_allowance = 0u32;
        loop {
            let read = match first.take() {
                Some(message) => Read::Message(message),
                None => reader.next(&decode).await?,
            };
            match read {
                Read::Message(
                    message @ (Message::Publish(_)
                    | Message::SubmitJob(_)
                    | Message::JobResult(_)
                    | Message::JobProgress(_)
                    | Message::JobAck { .. }
                    | Message::JobCredits { .. }),
                ) => {
                    let telemetry =
                        matches!(&message, Message::Publish(p) if p.class == Class::Telemetry);
                    let governed = telemetry
                        || matches!(
                            &message,
                            Message::SubmitJob(_) | Message::JobResult(_) | Message::JobProgress(_)
                        );
                    session.dispatch(message).await?;
                    let context = &session.context;
                    if let (true, Some(budget)) = (telemetry, &context.telemetry_intake) {
                        budget.spend_one(&mut telemetry_allowance).await;
                    }
                    if let (true, Some(budget)) = (governed, &context.bulk_intake) {
                        budget.spend_one(&mut governed_allowance).await;
                    }
                }
                Read::Message(other) => {
                    return Err(Fault::new(
                        ErrorCode::WrongStream,
                        format!(
                            "{} on a publish stream (only Publish and job messages are allowed)",
                            other.kind()
                        ),
                    ))
                }
                Read::End | Read::Gone => return Ok::<(), Fault>(()),
            }
        }
    }
    .await;
    if let Err(fault) = result {
        close_with(&connection, &session.context.stats, &fault);
    }
}
