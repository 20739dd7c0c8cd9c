//! Connecting: TLS trust, the QUIC endpoint, the handshake, the bulk connection, and the
//! tasks every connection runs (stream writers, heartbeats).

use super::*;

impl Connector {
    /// Trusts the CA certificates in `ca_pem` (the router's `DATA_DIR/tls/ca.pem` for a
    /// development router) and expects the router's certificate to name `server_name`.
    /// [`Connector::builder`] takes trust roots from memory or the system, and a client
    /// certificate.
    pub fn new(ca_pem: &Path, server_name: &str) -> Result<Self, ClientError> {
        Self::builder(server_name).trust_file(ca_pem).build()
    }

    /// Like [`Connector::new`] but offering another ALPN id (tests of refusal use this).
    pub fn with_alpn(ca_pem: &Path, server_name: &str, alpn: &[u8]) -> Result<Self, ClientError> {
        Self::builder(server_name)
            .trust_file(ca_pem)
            .alpn(alpn)
            .build()
    }

    /// A connector to routers whose certificate names `server_name`, trusting the
    /// system's roots unless told otherwise (see [`ConnectorBuilder`]).
    pub fn builder(server_name: &str) -> ConnectorBuilder {
        ConnectorBuilder::new(server_name)
    }

    /// The connector `builder` describes (see [`ConnectorBuilder::build`]).
    pub(crate) fn from_builder(builder: ConnectorBuilder) -> Result<Self, ClientError> {
        let (roots, client_certificate) = builder.tls_material()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_root_certificates(roots);
        let mut tls = match client_certificate {
            Some((chain, key)) => tls
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_error(format!("the client certificate and key: {e}")))?,
            None => tls.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![builder.alpn.clone()];
        let server_name = builder.server_name;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some((builder.idle_timeout / 3).min(Duration::from_secs(5))));
        transport.max_idle_timeout(builder.idle_timeout.try_into().ok());
        transport.max_concurrent_uni_streams(VarInt::from_u32(16));
        transport.stream_receive_window(VarInt::from_u32(4 << 20));
        transport.receive_window(VarInt::from_u32(16 << 20));
        transport.send_window(16 << 20);
        // Ask the peer to acknowledge every 16th packet (or after 5 ms) instead of every
        // second: a fan-out hop sends many small packets, and the ACKs it gets back cost as much
        // CPU and softirq time as the data.
        let mut ack_frequency = quinn::AckFrequencyConfig::default();
        ack_frequency
            .ack_eliciting_threshold(VarInt::from_u32(15))
            .max_ack_delay(Some(Duration::from_millis(5)));
        transport.ack_frequency_config(Some(ack_frequency));
        config.transport_config(Arc::new(transport));
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| ClientError::Connect {
            router: "-".into(),
            detail: format!("a connector needs a tokio runtime: {e}"),
        })?;
        let bind: SocketAddr = "[::]:0".parse().expect("constant address parses");
        let endpoint = quinn::Endpoint::client(bind)
            .or_else(|_| {
                quinn::Endpoint::client("0.0.0.0:0".parse().expect("constant address parses"))
            })
            .map_err(|source| ClientError::Io {
                during: "binding a UDP socket",
                source: source.into(),
            })?;
        let mut endpoint = endpoint;
        endpoint.set_default_client_config(config);
        Ok(Connector {
            endpoint,
            server_name: server_name.to_owned(),
            runtime,
            bulk: None,
            credentials: None,
        })
    }

    /// Gives each session that brings no credential of its own one from `source`, asked
    /// with the session's agent id at every connect: for a process that runs many agents
    /// (a test harness, the loadgen, a host of agents) against a router that requires
    /// credentials.
    pub fn with_credentials(
        mut self,
        source: impl Fn(&str) -> Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        self.credentials = Some(AgentCredentials(Arc::new(source)));
        self
    }

    /// Makes sessions' bulk connections (see [`Session::bulk_connection`]) from `bulk`'s
    /// endpoint, and drives them and their telemetry and job streams on the runtime `bulk`
    /// was made on: e.g. a runtime of lower priority, so that a flood of telemetry takes the
    /// application's command handling no CPU.
    pub fn with_bulk_connector(mut self, bulk: &Connector) -> Self {
        self.bulk = Some(Box::new(Connector {
            bulk: None,
            ..bulk.clone()
        }));
        self
    }

    /// Opens a bare QUIC connection with the swarmbus TLS settings, for tools and tests that
    /// speak the protocol by hand. Applications use [`Connector::connect`].
    pub async fn connect_quic(&self, router: SocketAddr) -> Result<Connection, ClientError> {
        let connect_error = |detail: String| ClientError::Connect {
            router: router.to_string(),
            detail,
        };
        let connecting = {
            // quinn drives a connection on the runtime it is made from.
            let _inside = self.runtime.enter();
            self.endpoint
                .connect(router, &self.server_name)
                .map_err(|e| connect_error(e.to_string()))?
        };
        connecting.await.map_err(|e| connect_error(e.to_string()))
    }

    /// Attaches a bulk connection to the session `welcome` opened, as its `offer` says.
    pub(super) async fn attach_bulk(
        &self,
        router: SocketAddr,
        session: &Session,
        welcome: &Welcome,
        offer: BulkOffer,
    ) -> Result<Connection, ClientError> {
        let connection = self
            .connect_quic(SocketAddr::new(router.ip(), offer.port))
            .await?;
        let attached = async {
            let (mut send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| ClientError::from_connection(&e))?;
            let hello = encode(&Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: session.agent_id.clone(),
                role: session.role,
                client_name: session.client_name.clone(),
                client_version: session.client_version.clone(),
                attach: Some(Attach {
                    session: welcome.session_id,
                    token: offer.token,
                }),
                ..Hello::default()
            }));
            send.write_all_chunks(&mut [hello.head, hello.body])
                .await
                .map_err(|_| closed_error(&connection))?;
            let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME_BYTES);
            match reader.next().await? {
                Some(Message::Welcome(_)) => Ok(()),
                Some(Message::Error(error)) => Err(ClientError::refused(error)),
                Some(other) => Err(ClientError::Protocol {
                    detail: format!(
                        "expected Welcome on the bulk connection, got {}",
                        other.kind()
                    ),
                }),
                None => Err(closed_error(&connection)),
            }
        }
        .await;
        match attached {
            Ok(()) => Ok(connection),
            Err(error) => {
                connection.close(VarInt::from_u32(0), b"attach failed");
                Err(error)
            }
        }
    }

    /// [`Connector::connect`] to `router` given as `host:port` (a name or an address): the
    /// name is resolved and its addresses are tried in order until one answers. The TLS
    /// name checked is still the connector's.
    pub async fn connect_to(
        &self,
        router: &str,
        session: Session,
    ) -> Result<(Client, Deliveries), ClientError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(router)
            .await
            .map_err(|error| ClientError::Connect {
                router: router.to_owned(),
                detail: format!("resolving it: {error}"),
            })?
            .collect();
        let mut last = None;
        for addr in addrs {
            match self.connect(addr, session.clone()).await {
                Ok(connected) => return Ok(connected),
                // Only a failure to reach the address moves on to the next one.
                Err(error @ (ClientError::Connect { .. } | ClientError::Timeout { .. })) => {
                    last = Some(error)
                }
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect {
            router: router.to_owned(),
            detail: "the name has no address".to_owned(),
        }))
    }

    /// Connects, says Hello and waits for Welcome.
    pub async fn connect(
        &self,
        router: SocketAddr,
        session: Session,
    ) -> Result<(Client, Deliveries), ClientError> {
        let timeout = session.connect_timeout;
        let after_ms = timeout.as_millis() as u64;
        let (client, deliveries) =
            tokio::time::timeout(timeout, self.establish(router, session, None))
                .await
                .map_err(|_| ClientError::Timeout {
                    during: "connecting",
                    after_ms,
                })??;
        let deliveries = deliveries.ok_or_else(|| ClientError::Protocol {
            detail: "no delivery stream was made".into(),
        })?;
        Ok((client, deliveries))
    }

    /// [`Connector::connect`] into an existing sink (a reconnecting session's channels).
    pub(crate) async fn connect_into(
        &self,
        router: SocketAddr,
        session: Session,
        sink: DeliverySink,
    ) -> Result<Client, ClientError> {
        let timeout = session.connect_timeout;
        let after_ms = timeout.as_millis() as u64;
        let (client, _) =
            tokio::time::timeout(timeout, self.establish(router, session, Some(sink)))
                .await
                .map_err(|_| ClientError::Timeout {
                    during: "connecting",
                    after_ms,
                })??;
        Ok(client)
    }

    /// Connects into `sink` when given (a reconnecting session keeps its application's
    /// delivery channels), else into new channels returned with the client.
    // The handshake in the order it happens on the wire (session stream, Hello, Welcome, the
    // tasks of the session, the bulk connection): each step needs the ones before it.
    pub(crate) async fn establish(
        &self,
        router: SocketAddr,
        session: Session,
        sink: Option<DeliverySink>,
    ) -> Result<(Client, Option<Deliveries>), ClientError> {
        let connection = self.connect_quic(router).await?;
        let lost = |e: &quinn::ConnectionError| ClientError::from_connection(e);
        let (mut send, recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            swarms: session.swarms.clone(),
            agent_id: session.agent_id.clone(),
            role: session.role,
            client_name: session.client_name.clone(),
            client_version: session.client_version.clone(),
            resume: session.resume.clone(),
            metadata: session.metadata.clone(),
            bulk: session.bulk_connection,
            attach: None,
            credential: match (&session.credential, &self.credentials) {
                (Some(own), _) => Some(own.token()?),
                (None, Some(source)) => Some((source.0)(&session.agent_id).map_err(|detail| {
                    ClientError::InvalidArgument {
                        detail: format!("the connector's credential source failed: {detail}"),
                    }
                })?),
                (None, None) => None,
            }
            .map(swarmbus_schema::Token),
        };
        let hello = encode(&Message::Hello(hello));
        send.write_all_chunks(&mut [hello.head, hello.body])
            .await
            .map_err(|_| closed_error(&connection))?;
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME_BYTES);
        let welcome = match reader.next().await {
            Ok(Some(Message::Welcome(welcome))) => welcome,
            Ok(Some(Message::Error(error))) => return Err(ClientError::refused(error)),
            Ok(Some(other)) => {
                return Err(ClientError::Protocol {
                    detail: format!("expected Welcome, got {}", other.kind()),
                })
            }
            Ok(None) => return Err(closed_error(&connection)),
            Err(error) => return Err(error),
        };
        let max_frame = (welcome.limits.max_frame_bytes as usize).max(1024);
        // Keep whatever arrived behind Welcome; only the limit changes.
        reader.decoder.set_max_frame_bytes(max_frame);
        // The bulk connection, when offered; without it (not offered, or the attach failed)
        // everything goes on the one connection, and the router, which waits a short while
        // for the attach, does the same.
        let bulk_connector = self.bulk.as_deref().unwrap_or(self);
        let bulk = match welcome.bulk {
            Some(offer) if session.bulk_connection => {
                let attach = bulk_connector.attach_bulk(router, &session, &welcome, offer);
                let attached = tokio::time::timeout(ATTACH_TIMEOUT, attach)
                    .await
                    .unwrap_or(Err(ClientError::Timeout {
                        during: "attaching the bulk connection",
                        after_ms: ATTACH_TIMEOUT.as_millis() as u64,
                    }));
                match attached {
                    Ok(bulk) => Some(bulk),
                    Err(error) => {
                        tracing::warn!(%error, "bulk connection not attached; telemetry and jobs share the session's connection");
                        None
                    }
                }
            }
            _ => None,
        };
        // Telemetry and job streams: on the bulk connection and its runtime when attached.
        let (bulk_runtime, bulk_path) = match &bulk {
            Some(bulk) => (&bulk_connector.runtime, bulk),
            None => (&self.runtime, &connection),
        };
        let (deliveries_tx, deliveries) = match sink {
            Some(sink) => (sink, None),
            None => {
                let (sink, deliveries) = Deliveries::channels(session.delivery_buffer);
                (sink, Some(deliveries))
            }
        };
        let (session_tx, session_rx) = mpsc::channel(WRITER_QUEUE_FRAMES);
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        tokio::spawn(stream_writer(
            connection.clone(),
            session_rx,
            Some(send),
            i32::MAX,
        ));
        let publish_tx = Class::ALL.map(|class| {
            let (tx, rx) = mpsc::channel(WRITER_QUEUE_FRAMES);
            if class == Class::Telemetry {
                bulk_runtime.spawn(stream_writer(
                    bulk_path.clone(),
                    rx,
                    None,
                    class.stream_priority(),
                ));
            } else {
                tokio::spawn(stream_writer(
                    connection.clone(),
                    rx,
                    None,
                    class.stream_priority(),
                ));
            }
            tx
        });
        let (jobs_tx, jobs_rx) = mpsc::channel(WRITER_QUEUE_FRAMES);
        bulk_runtime.spawn(stream_writer(
            bulk_path.clone(),
            jobs_rx,
            None,
            JOB_STREAM_PRIORITY,
        ));
        let (job_events_tx, job_events_rx) = mpsc::channel(JOB_EVENT_QUEUE);
        let (job_updates_tx, job_updates_rx) = mpsc::channel(session.delivery_buffer.max(1));
        let shared = Arc::new(Shared {
            connection: connection.clone(),
            bulk: bulk.clone(),
            session_tx,
            publish_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            in_flight: Arc::new(Semaphore::new(session.max_in_flight.max(1))),
            max_in_flight: session.max_in_flight.max(1),
            fail_when_in_flight_full: session.fail_when_in_flight_full,
            max_payload_bytes: max_payload_bytes(max_frame),
            welcome,
            agent_id: session.agent_id,
            epoch_changes: Mutex::new(HashMap::new()),
            requests_rx: Mutex::new(Some(requests_rx)),
            jobs_tx,
            job_events_rx: Mutex::new(Some(job_events_rx)),
            job_updates_rx: Mutex::new(Some(job_updates_rx)),
        });
        tokio::spawn(read_replies(reader, shared.clone(), requests_tx));
        let interval = shared.welcome.limits.heartbeat_interval_ms;
        if interval > 0 {
            tokio::spawn(heartbeats(
                shared.session_tx.clone(),
                connection.clone(),
                Duration::from_millis(u64::from(interval)),
            ));
        }
        let inbound = Inbound {
            deliveries: deliveries_tx,
            job_events: job_events_tx,
            job_updates: job_updates_tx,
            shared: shared.clone(),
        };
        if let Some(bulk) = &bulk {
            bulk_runtime.spawn(accept_deliveries(bulk.clone(), inbound.clone(), max_frame));
            tokio::spawn(tie_connections(connection.clone(), bulk.clone()));
        }
        tokio::spawn(accept_deliveries(connection.clone(), inbound, max_frame));
        let client = Client {
            shared,
            _owner: Arc::new(Owner { connection, bulk }),
        };
        Ok((client, deliveries))
    }
}

pub(super) fn tls_error(detail: impl std::fmt::Display) -> ClientError {
    ClientError::Tls {
        detail: detail.to_string(),
    }
}

/// Sends a Heartbeat every `interval` (the router's, from Welcome) until the connection
/// closes. Heartbeats ride the session stream, above every class, so a telemetry flood
/// cannot delay them into a false "gone".
pub(super) async fn heartbeats(
    session_tx: mpsc::Sender<OutFrame>,
    connection: Connection,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = connection.closed() => return,
        }
        let sent_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        if session_tx
            .send(encode(&Message::Heartbeat { sent_at_ms }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A session's two connections end together: when the main one closes, the bulk one is
/// closed; when the bulk one closes, the main one is, after a grace period in which the
/// router's own close of the main one (and its reason) normally arrives first.
pub(super) async fn tie_connections(main: Connection, bulk: Connection) {
    tokio::select! {
        _ = main.closed() => bulk.close(VarInt::from_u32(0), b"session closed"),
        why = bulk.closed() => {
            // Closed by the router, or here because the router stopped reading a bulk
            // stream (a session it is ending): the main connection's close, which carries
            // the reason the application should see, is on its way.
            if tokio::time::timeout(BULK_CLOSE_GRACE, main.closed()).await.is_ok() {
                return;
            }
            main.close(VarInt::from_u32(0), format!("the session's bulk connection closed: {why}").as_bytes());
        }
    }
}

/// Owns one stream: writes the frames queued for it, many per write. Writing from one task
/// per stream keeps frames whole even when a caller's future is dropped mid-publish (the
/// queue either has the frame or it does not).
pub(super) async fn stream_writer(
    connection: Connection,
    mut frames: mpsc::Receiver<OutFrame>,
    mut stream: Option<SendStream>,
    priority: i32,
) {
    let mut batch = Vec::with_capacity(WRITER_BATCH_FRAMES);
    let mut coalescer = Coalescer::new();
    if let Some(given) = &stream {
        // A stream opened before (the session stream, Hello's) gets its priority here: left
        // at quinn's default it would yield to every class stream, and a publisher that
        // keeps its command stream full would starve its own heartbeats into a timeout.
        let _ = given.set_priority(priority);
    }
    while frames.recv_many(&mut batch, WRITER_BATCH_FRAMES).await > 0 {
        for frame in batch.drain(..) {
            coalescer.push(frame);
        }
        if stream.is_none() {
            let Ok(opened) = connection.open_uni().await else {
                return;
            };
            let _ = opened.set_priority(priority);
            stream = Some(opened);
        }
        let Some(send) = stream.as_mut() else {
            return;
        };
        let chunks = coalescer.chunks();
        if send.write_all_chunks(chunks).await.is_err() {
            // The router stopped reading this stream: it is ending the session, and its
            // close, with the reason the application should see, is on its way. Closed here
            // only if it does not come. Frames queued meanwhile are not sent (the session
            // is ending); requests waiting for a reply fail with the close.
            if tokio::time::timeout(BULK_CLOSE_GRACE, connection.closed())
                .await
                .is_err()
            {
                connection.close(VarInt::from_u32(0), b"stream write failed");
            }
            return;
        }
        chunks.clear();
    }
    if let Some(mut send) = stream {
        let _ = send.finish();
    }
}

pub(super) fn closed_error(connection: &Connection) -> ClientError {
    match connection.close_reason() {
        Some(reason) => ClientError::from_connection(&reason),
        None => ClientError::Closed {
            code: None,
            reason: "the router ended the session stream".into(),
        },
    }
}

impl FrameReader {
    pub(super) fn new(recv: RecvStream, max_frame_bytes: usize) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_frame_bytes),
            options: DecodeOptions::default(),
        }
    }

    /// The next message; `Ok(None)` when the stream ended or the connection closed.
    pub(super) async fn next(&mut self) -> Result<Option<Message>, ClientError> {
        loop {
            if let Some(message) =
                self.decoder
                    .next_message(&self.options)
                    .map_err(|e| ClientError::Protocol {
                        detail: e.to_string(),
                    })?
            {
                return Ok(Some(message));
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.push(chunk.bytes),
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }
}
