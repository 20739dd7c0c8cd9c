//! The swarmbus client library that agents, controllers and workers link.
//!
//! Layout:
//! - this file: [`Connector`] (TLS trust + QUIC endpoint), [`Client`] (one session:
//!   subscribe, publish, ack) and [`Deliveries`] (the stream of messages for the session);
//! - [`apply`]: [`IdempotentApply`], which turns at-least-once delivery into an
//!   exactly-once effect by dropping ops at or below the last applied op id;
//! - [`error`]: the error type, [`ClientError`].
//! - [`gpu`]: GPU detection for worker nodes ([`gpu::detect`], [`gpu::GpuProbe`], the fake
//!   [`gpu::FakeGpus`], NVML behind the cargo feature `nvml`).
//! - [`jobs`]: the job queue's client side: [`JobDedup`] (each job's end handled once),
//!   [`JobEvents`] (leases and cancels for workers), [`JobUpdates`] (for submitters).
//! - [`retry`]: exponential backoff with full jitter ([`RetryPolicy`], [`Backoff`]).
//! - [`reconnect`]: [`ResilientClient`], a session that reconnects, resumes and
//!   resubscribes by itself ([`Connector::connect_resilient`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), swarmbus_client::ClientError> {
//! use swarmbus_client::{Connector, Session, PublishOptions};
//! use swarmbus_schema::{Class, Role};
//! let connector = Connector::new("swarmbus-data/tls/ca.pem".as_ref(), "localhost")?;
//! let session = Session::new("agent-7", Role::Agent, ["swarm-a"]);
//! let (client, mut deliveries) = connector.connect("127.0.0.1:4433".parse().unwrap(), session).await?;
//! client.subscribe("swarm-a", Class::Command, None).await?;
//! let op = client.publish("swarm-a", Class::Command, b"hello".as_slice().into(), PublishOptions::default()).await?;
//! while let Some(delivery) = deliveries.recv().await { /* apply it */ }
//! # Ok(()) }
//! ```

pub mod apply;
pub mod control;
pub mod error;
pub mod gpu;
pub mod jobs;
pub mod reconnect;
pub mod retry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use swarmbus_schema::{
    encode, max_payload_bytes, valid_name, Attach, BulkOffer, Coalescer, DecodeOptions,
    FrameDecoder, Hello, JobProgress, JobResult, LeaseAction, LeaseRequest, Message, OutFrame,
    Publish, Reply as WireReply, Request, SafetyAction, Subscription, Welcome, ALPN,
    DEFAULT_MAX_FRAME_BYTES, JOB_STREAM_PRIORITY, MAX_NAME_BYTES, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use apply::{FileOffsetStore, IdempotentApply, OffsetStore};
pub use control::{ConfigView, FencingFilter, DEFAULT_LEASE};
pub use error::ClientError;
pub use jobs::{JobDedup, JobEvent, JobEvents, JobUpdates};
pub use reconnect::{ReconnectEvent, ReconnectOptions, ResilientClient};
pub use retry::{Backoff, RetryPolicy};
/// The schema's types that this crate's API takes and returns, so that an agent depends on
/// this crate alone.
pub use swarmbus_schema::{
    Class, DeadLetter, DeadLetters, Deliver, DeltaAck, Epoch, ErrorCode, JobId, JobLease, JobState,
    JobStatus, JobUpdate, LeaseGrant, Member, OpId, ResumePoint, Role, SafetyKind, SessionPinned,
    SubmitJob, WorkerStatus,
};

/// How a session presents itself in Hello, plus client-side limits.
#[derive(Clone, Debug)]
pub struct Session {
    pub agent_id: String,
    pub role: Role,
    pub swarms: Vec<String>,
    pub client_name: String,
    pub client_version: String,
    /// Deliveries buffered for the application before the client stops reading (and QUIC
    /// flow control pushes back on the router). Default 8192.
    pub delivery_buffer: usize,
    /// Requests awaiting a reply (publishes of ordered classes, subscribes) at once;
    /// further ones wait, or fail with `InFlightFull` when `fail_when_in_flight_full` is
    /// set. Default 4096.
    pub max_in_flight: usize,
    /// Return `ClientError::InFlightFull` instead of waiting when `max_in_flight` requests
    /// are unanswered (a capped queue of unacknowledged publishes). Default false.
    pub fail_when_in_flight_full: bool,
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// Where the agent stands in each swarm (see [`IdempotentApply::resume_points`]): the
    /// router sends the ordered ops after these, then live traffic.
    pub resume: Vec<ResumePoint>,
    /// Registered with the router for presence queries (free-form, e.g. JSON).
    pub metadata: String,
    /// Attach a second connection for telemetry and jobs when the router offers one (a
    /// router with a bulk listener): that traffic then has its own socket, congestion window
    /// and connection driver, apart from commands. When the attach fails the session carries
    /// everything on its one connection. Default true.
    pub bulk_connection: bool,
}

impl Session {
    pub fn new<S: Into<String>>(
        agent_id: impl Into<String>,
        role: Role,
        swarms: impl IntoIterator<Item = S>,
    ) -> Self {
        Session {
            agent_id: agent_id.into(),
            role,
            swarms: swarms.into_iter().map(Into::into).collect(),
            client_name: "swarmbus-client".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            delivery_buffer: 8192,
            max_in_flight: 4096,
            fail_when_in_flight_full: false,
            connect_timeout: Duration::from_secs(10),
            resume: Vec::new(),
            metadata: String::new(),
            bulk_connection: true,
        }
    }

    /// Resumes from the state of `applied` (its resume points for the swarms joined).
    pub fn resume_from(mut self, applied: &IdempotentApply) -> Self {
        self.resume = applied
            .resume_points()
            .into_iter()
            .filter(|p| self.swarms.contains(&p.swarm))
            .collect();
        self
    }
}

/// Options of one publish.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// Deliver only to this agent's subscriptions.
    pub target_agent: Option<String>,
    pub key: Option<String>,
    /// Ask for an acknowledgement even for unordered classes.
    pub ack: bool,
    /// Stamp the message with this fencing token of lease `lease` ("leader" when unset):
    /// the router refuses it (`StaleFencingToken`) once a newer token was granted, and
    /// receivers using [`FencingFilter`] drop it once they saw a newer one. 0: no stamp.
    pub fencing_token: u64,
    pub lease: Option<String>,
}

/// TLS trust and a QUIC endpoint; makes any number of sessions.
#[derive(Clone, Debug)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    server_name: String,
    /// The runtime the connector was made on: its connections are driven there.
    runtime: tokio::runtime::Handle,
    /// Where sessions make their bulk connections, when not from this connector.
    bulk: Option<Box<Connector>>,
}

fn tls_error(detail: impl std::fmt::Display) -> ClientError {
    ClientError::Tls {
        detail: detail.to_string(),
    }
}

impl Connector {
    /// Trusts the CA certificates in `ca_pem` (the router's `DATA_DIR/tls/ca.pem` for a
    /// development router) and expects the router's certificate to name `server_name`.
    pub fn new(ca_pem: &Path, server_name: &str) -> Result<Self, ClientError> {
        Self::with_alpn(ca_pem, server_name, ALPN)
    }

    /// Like [`Connector::new`] but offering another ALPN id (tests of refusal use this).
    pub fn with_alpn(ca_pem: &Path, server_name: &str, alpn: &[u8]) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca_pem)
            .map_err(|e| tls_error(format!("reading {}: {e}", ca_pem.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| tls_error(format!("parsing {}: {e}", ca_pem.display())))?;
            roots.add(cert).map_err(tls_error)?;
        }
        if roots.is_empty() {
            return Err(tls_error(format!("no certificate in {}", ca_pem.display())));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_idle_timeout(Duration::from_secs(30).try_into().ok());
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
            .map_err(|e| ClientError::Connect {
                router: "-".into(),
                detail: format!("binding a UDP socket: {e}"),
            })?;
        let mut endpoint = endpoint;
        endpoint.set_default_client_config(config);
        Ok(Connector {
            endpoint,
            server_name: server_name.to_owned(),
            runtime,
            bulk: None,
        })
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
    async fn attach_bulk(
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
            requests_tx,
            requests_rx: Mutex::new(Some(requests_rx)),
            jobs_tx,
            job_events_rx: Mutex::new(Some(job_events_rx)),
            job_updates_rx: Mutex::new(Some(job_updates_rx)),
        });
        tokio::spawn(read_replies(reader, shared.clone()));
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

/// Sends a Heartbeat every `interval` (the router's, from Welcome) until the connection
/// closes. Heartbeats ride the session stream, above every class, so a telemetry flood
/// cannot delay them into a false "gone".
async fn heartbeats(
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

/// Leases and cancels a worker may have waiting before the job stream stops being read.
const JOB_EVENT_QUEUE: usize = 1024;

/// Requests from the router a worker may have waiting before it answers more with "busy".
const REQUEST_QUEUE: usize = 1024;

/// Frames queued per stream writer before publishers wait.
const WRITER_QUEUE_FRAMES: usize = 1024;
/// Frames a stream writer takes per write.
const WRITER_BATCH_FRAMES: usize = 256;

/// Owns one stream: writes the frames queued for it, many per write. Writing from one task
/// per stream keeps frames whole even when a caller's future is dropped mid-publish (the
/// queue either has the frame or it does not).
async fn stream_writer(
    connection: Connection,
    mut frames: mpsc::Receiver<OutFrame>,
    mut stream: Option<SendStream>,
    priority: i32,
) {
    let mut batch = Vec::with_capacity(WRITER_BATCH_FRAMES);
    let mut coalescer = Coalescer::new();
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
            connection.close(VarInt::from_u32(0), b"stream write failed");
            return;
        }
        chunks.clear();
    }
    if let Some(mut send) = stream {
        let _ = send.finish();
    }
}

fn closed_error(connection: &Connection) -> ClientError {
    match connection.close_reason() {
        Some(reason) => ClientError::from_connection(&reason),
        None => ClientError::Closed {
            code: None,
            reason: "the router ended the session stream".into(),
        },
    }
}

struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    options: DecodeOptions,
}

impl FrameReader {
    fn new(recv: RecvStream, max_frame_bytes: usize) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(max_frame_bytes),
            options: DecodeOptions::default(),
        }
    }

    /// The next message; `Ok(None)` when the stream ended or the connection closed.
    async fn next(&mut self) -> Result<Option<Message>, ClientError> {
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

/// What the router answered to a publish: the op id and the epoch of the swarm's log it
/// was made durable in (both 0 for unordered classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Receipt {
    pub op_id: OpId,
    pub epoch: Epoch,
}

/// What a request got back.
#[derive(Debug)]
enum ReplyValue {
    Receipt(Receipt),
    Delta(DeltaAck),
    WorkerAck(u64),
    Pinned(SessionPinned),
    Reply(WireReply),
    Presence(Vec<Member>),
    Lease(LeaseGrant),
    Job(JobStatus),
    DeadLetters(DeadLetters),
}

type ReplyResult = Result<ReplyValue, ClientError>;

/// A request awaiting its reply, holding one of the `max_in_flight` slots until answered.
#[derive(Debug)]
struct Reply {
    tx: oneshot::Sender<ReplyResult>,
    _slot: OwnedSemaphorePermit,
}

impl Reply {
    fn send(self, result: ReplyResult) {
        let _ = self.tx.send(result);
    }
}

#[derive(Debug)]
struct Shared {
    connection: Connection,
    /// The session's bulk connection (telemetry and jobs), when attached.
    bulk: Option<Connection>,
    /// Frames for the session stream (Subscribe, Unsubscribe, Ack).
    session_tx: mpsc::Sender<OutFrame>,
    /// Frames for the publish stream of each class, indexed by `Class::index`.
    publish_tx: [mpsc::Sender<OutFrame>; Class::COUNT],
    pending: Mutex<HashMap<u64, Reply>>,
    next_request: AtomicU64,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    fail_when_in_flight_full: bool,
    max_payload_bytes: usize,
    welcome: Welcome,
    agent_id: String,
    /// EpochChanged notices: swarm -> (new epoch, the epoch the resume point was in).
    epoch_changes: Mutex<HashMap<String, (Epoch, Epoch)>>,
    /// Requests the router sends this session (workers), and the receiving end until the
    /// application takes it.
    requests_tx: mpsc::Sender<Request>,
    requests_rx: Mutex<Option<mpsc::Receiver<Request>>>,
    /// Frames for the job stream (SubmitJob, JobProgress, JobResult), below commands.
    jobs_tx: mpsc::Sender<OutFrame>,
    job_events_rx: Mutex<Option<mpsc::Receiver<jobs::JobEvent>>>,
    job_updates_rx: Mutex<Option<mpsc::Receiver<JobUpdate>>>,
}

/// Closes the connection when the last `Client` clone is dropped. Background tasks hold
/// `Shared`, never this, so they do not keep an abandoned connection alive.
#[derive(Debug)]
struct Owner {
    connection: Connection,
    bulk: Option<Connection>,
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

/// How long a session tries to attach its bulk connection before it carries everything on
/// its one connection. Longer than the router waits for the attach (2 s), so that the
/// router decides first: it either takes the attach (and the client gets its Welcome) or
/// withdraws the offer (and the client gets a refusal). A client that gave up on an attach
/// the router had taken would close the connection the session's bulk traffic now uses.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the session waits, once its bulk connection was closed by the router, for the
/// router to close the main one (with the reason the application should see).
const BULK_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A session's two connections end together: when the main one closes, the bulk one is
/// closed; when the bulk one closes, the main one is, after a grace period in which the
/// router's own close of the main one (and its reason) normally arrives first.
async fn tie_connections(main: Connection, bulk: Connection) {
    tokio::select! {
        _ = main.closed() => bulk.close(VarInt::from_u32(0), b"session closed"),
        why = bulk.closed() => {
            if !matches!(why, quinn::ConnectionError::LocallyClosed)
                && tokio::time::timeout(BULK_CLOSE_GRACE, main.closed()).await.is_ok()
            {
                return;
            }
            main.close(VarInt::from_u32(0), format!("the session's bulk connection closed: {why}").as_bytes());
        }
    }
}

/// Removes a registered request from the pending map unless its frame was queued: a
/// caller that drops its future before that leaves nothing behind.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
    queued: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.queued {
            self.shared.pending().remove(&self.id);
        }
    }
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
        // Only inserts and removes happen under this lock; a poisoned map is still sound.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fail_all(&self, error: &ClientError) {
        for (_, reply) in self.pending().drain() {
            reply.send(Err(error.clone()));
        }
    }
}

/// Reads the session stream: resolves pending requests from acks and errors.
async fn read_replies(mut reader: FrameReader, shared: Arc<Shared>) {
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
                if let Err(mpsc::error::TrySendError::Full(request)) =
                    shared.requests_tx.try_send(request)
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

/// Where the router's unidirectional streams' messages go.
#[derive(Clone, Debug)]
struct Inbound {
    deliveries: DeliverySink,
    job_events: mpsc::Sender<jobs::JobEvent>,
    job_updates: mpsc::Sender<JobUpdate>,
    /// Answers to requests sent on the job stream (submits, results) come back on it.
    shared: Arc<Shared>,
}

/// Accepts the router's delivery streams (one per class) and its job stream, and forwards
/// their messages to the application.
async fn accept_deliveries(connection: Connection, inbound: Inbound, max_frame: usize) {
    while let Ok(recv) = connection.accept_uni().await {
        let inbound = inbound.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, max_frame);
            loop {
                // A send fails when the application dropped (or never took) that stream:
                // its messages are then dropped, the others still flow.
                match reader.next().await {
                    Ok(Some(Message::Deliver(deliver))) => {
                        if inbound.deliveries.send(deliver).await.is_err() {
                            return; // the application dropped Deliveries
                        }
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

/// Where a connection's deliveries go: one bounded channel per class, and optionally a
/// record of the last ordered op handed over (what a reconnecting session resumes from).
#[derive(Clone, Debug)]
pub(crate) struct DeliverySink {
    classes: [mpsc::Sender<Deliver>; Class::COUNT],
    pub(crate) handed_over: Option<Arc<Mutex<IdempotentApply>>>,
}

impl DeliverySink {
    /// Queues `deliver` in its class's channel (waiting while that channel is full: only
    /// that class's stream is held back); fails once the application dropped `Deliveries`.
    async fn send(&self, deliver: Deliver) -> Result<(), ()> {
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

/// Messages delivered to this session, in order per class. Each class has its own bounded
/// buffer (`Session::delivery_buffer` each), and [`Deliveries::recv`] takes control first,
/// then command, alert, reconciliation and telemetry last: a backlog of telemetry the
/// application has not read never holds a command back.
#[derive(Debug)]
pub struct Deliveries {
    classes: [mpsc::Receiver<Deliver>; Class::COUNT],
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
            Deliveries { classes: receivers },
        )
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
                    return std::task::Poll::Ready(Some(deliver))
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

/// Requests the router routes to this worker session (see [`Client::requests`]).
#[derive(Debug)]
pub struct Requests {
    rx: mpsc::Receiver<Request>,
}

impl Requests {
    /// The next request; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Request> {
        self.rx.recv().await
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ClientError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ClientError::InvalidArgument {
            detail: format!("{what} must be 1 to {MAX_NAME_BYTES} bytes"),
        })
    }
}

/// A pending reply to a publish.
#[derive(Debug)]
pub struct PendingAck {
    rx: Option<oneshot::Receiver<ReplyResult>>,
    shared: Arc<Shared>,
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

fn expect_job(value: ReplyValue) -> Result<JobStatus, ClientError> {
    match value {
        ReplyValue::Job(status) => Ok(status),
        other => Err(ClientError::Protocol {
            detail: format!("expected a JobStatus, got {other:?}"),
        }),
    }
}

fn expect_receipt(value: ReplyValue) -> Result<Receipt, ClientError> {
    match value {
        ReplyValue::Receipt(receipt) => Ok(receipt),
        other => Err(ClientError::Protocol {
            detail: format!("expected an acknowledgement, got {other:?}"),
        }),
    }
}

/// One session with the router. Cheap to clone; all clones share the connection, which
/// closes when the last clone is dropped (or on [`Client::close`]).
#[derive(Clone, Debug)]
pub struct Client {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

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

    async fn request(&self, build: impl FnOnce(u64) -> Message) -> ReplyResult {
        self.request_on(&self.shared.session_tx, build).await
    }

    /// A request written on `stream`; its answer comes on the session stream, or for the
    /// job stream's requests (submits, results) on the job answer stream.
    async fn request_on(
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
    async fn register(&self) -> Result<(u64, oneshot::Receiver<ReplyResult>), ClientError> {
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

    async fn subscription(
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

    /// Sets entry `name` of `swarm`'s configuration document (controllers only): a control
    /// op keyed `config/<name>`, delivered to the swarm's control subscribers as a change.
    /// An empty value removes the entry. Resolves with the op id, the document's new version.
    pub async fn set_config(
        &self,
        swarm: &str,
        name: &str,
        value: Bytes,
    ) -> Result<OpId, ClientError> {
        let options = PublishOptions {
            key: Some(format!("{}{name}", control::CONFIG_PREFIX)),
            ..PublishOptions::default()
        };
        self.publish(swarm, Class::Control, value, options).await
    }

    /// Every agent present in `swarm`: role, the router-clock time of its last heartbeat
    /// (Unix ms) and the metadata it registered in Hello.
    pub async fn presence(&self, swarm: &str) -> Result<Vec<Member>, ClientError> {
        let value = self
            .request(|request_id| Message::PresenceQuery {
                request_id,
                swarm: swarm.to_owned(),
            })
            .await?;
        match value {
            ReplyValue::Presence(members) => Ok(members),
            other => Err(ClientError::Protocol {
                detail: format!("expected a PresenceList, got {other:?}"),
            }),
        }
    }

    async fn lease(&self, request: LeaseRequest) -> Result<ReplyValue, ClientError> {
        self.request(|request_id| {
            Message::LeaseRequest(LeaseRequest {
                request_id,
                ..request
            })
        })
        .await
    }

    fn expect_grant(value: ReplyValue) -> Result<LeaseGrant, ClientError> {
        match value {
            ReplyValue::Lease(grant) => Ok(grant),
            other => Err(ClientError::Protocol {
                detail: format!("expected a LeaseGrant, got {other:?}"),
            }),
        }
    }

    /// Acquires lease `name` of `swarm` for `ttl`: granted with a fencing token larger than
    /// every token granted for it before (across router restarts too), or refused with
    /// `LeaseHeld` (27) and the time the holder's lease has left. The holder asking again
    /// gets its grant extended, same token.
    pub async fn acquire_lease(
        &self,
        swarm: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<LeaseGrant, ClientError> {
        let value = self
            .lease(LeaseRequest {
                swarm: swarm.to_owned(),
                name: name.to_owned(),
                action: LeaseAction::Acquire,
                ttl_ms: ttl.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                ..LeaseRequest::default()
            })
            .await?;
        Self::expect_grant(value)
    }

    /// Renews a held lease for `ttl` from now; `LeaseLost` (28) once it expired or a newer
    /// token was granted (stop acting as the holder then).
    pub async fn renew_lease(
        &self,
        grant: &LeaseGrant,
        ttl: Duration,
    ) -> Result<LeaseGrant, ClientError> {
        let value = self
            .lease(LeaseRequest {
                swarm: grant.swarm.clone(),
                name: grant.name.clone(),
                action: LeaseAction::Renew,
                token: grant.token,
                ttl_ms: ttl.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                ..LeaseRequest::default()
            })
            .await?;
        Self::expect_grant(value)
    }

    /// Gives a held lease up before its TTL runs out.
    pub async fn release_lease(&self, grant: &LeaseGrant) -> Result<(), ClientError> {
        self.lease(LeaseRequest {
            swarm: grant.swarm.clone(),
            name: grant.name.clone(),
            action: LeaseAction::Release,
            token: grant.token,
            ..LeaseRequest::default()
        })
        .await
        .and_then(expect_receipt)
        .map(|_| ())
    }

    /// A safety action (controller sessions only; others get `Forbidden`, 25). Returns once
    /// the router logged and applied it.
    pub async fn safety(
        &self,
        kind: SafetyKind,
        swarm: &str,
        target: &str,
        duration: Duration,
    ) -> Result<(), ClientError> {
        self.request(|request_id| {
            Message::SafetyAction(SafetyAction {
                request_id,
                kind,
                swarm: swarm.to_owned(),
                target: target.to_owned(),
                duration_ms: duration.as_millis() as u64,
            })
        })
        .await
        .and_then(expect_receipt)
        .map(|_| ())
    }

    /// Holds `swarm`'s commands (sequenced and durable, not delivered) until [`Client::resume`].
    pub async fn pause(&self, swarm: &str) -> Result<(), ClientError> {
        self.safety(SafetyKind::Pause, swarm, "", Duration::ZERO)
            .await
    }

    /// Releases the commands held by [`Client::pause`], in order.
    pub async fn resume(&self, swarm: &str) -> Result<(), ClientError> {
        self.safety(SafetyKind::Resume, swarm, "", Duration::ZERO)
            .await
    }

    /// Disconnects `agent` (closed with `Stopped`, 36) and refuses its sessions for `for_`.
    pub async fn stop_agent(&self, agent: &str, for_: Duration) -> Result<(), ClientError> {
        self.safety(SafetyKind::Stop, "", agent, for_).await
    }

    /// Drains worker node `node` (no new sessions or jobs; its sessions move; requests in
    /// flight finish), or with `draining` false takes it back.
    pub async fn drain_node(&self, node: &str, draining: bool) -> Result<(), ClientError> {
        let kind = if draining {
            SafetyKind::Drain
        } else {
            SafetyKind::Undrain
        };
        self.safety(kind, "", node, Duration::ZERO).await
    }

    fn max_job_payload_bytes(&self) -> usize {
        // The router keeps room for the job record's fields (its JOB_RECORD_OVERHEAD_BYTES).
        self.shared.max_payload_bytes.saturating_sub(2048)
    }

    fn check_job_payload(&self, payload: &Bytes) -> Result<(), ClientError> {
        let max = self.max_job_payload_bytes();
        if payload.len() > max {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "job payload of {} bytes exceeds the maximum of {max} bytes",
                    payload.len()
                ),
            });
        }
        Ok(())
    }

    /// Submits a job (its `request_id` is set here) and waits until the router holds it
    /// durably. With an idempotency key already used within the router's dedup window, the
    /// answer names the earlier job (`duplicate`), which runs once. Refusals: `Busy` (the
    /// swarm's queue is full; retry after `retry_after_ms`), `SwarmNotJoined`,
    /// `PayloadTooLarge`.
    pub async fn submit_job(&self, job: SubmitJob) -> Result<JobStatus, ClientError> {
        check_name("swarm", &job.swarm)?;
        check_name("idempotency_key", &job.idempotency_key)?;
        if let Some(model) = job.model.as_deref() {
            check_name("model", model)?;
        }
        self.check_job_payload(&job.payload)?;
        let value = self
            .request_on(&self.shared.jobs_tx, |request_id| {
                Message::SubmitJob(SubmitJob { request_id, ..job })
            })
            .await?;
        expect_job(value)
    }

    /// Progress and ends of the jobs this agent submitted; `None` after the first call.
    /// Ends not acknowledged with [`Client::ack_job`] are sent again after a reconnect (to
    /// any session of the same agent id) and after a router restart: pass each through a
    /// [`JobDedup`]. Take it before submitting, or the updates wait in a bounded buffer.
    pub fn job_updates(&self) -> Option<JobUpdates> {
        self.shared
            .job_updates_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .map(|rx| JobUpdates { rx })
    }

    /// Tells the router the job's end was handled: it stops resending it (and forgets the
    /// job, except its idempotency key for the dedup window).
    pub async fn ack_job(&self, job_id: JobId) -> Result<(), ClientError> {
        // On the job stream, in order with the session's other job traffic.
        self.shared
            .jobs_tx
            .send(encode(&Message::JobAck { job_id }))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// Cancels a job (its submitter or a controller): a running attempt's worker is told,
    /// and the job ends `cancelled`. Refusals: `UnknownJob`, `JobFinished`, `Forbidden`.
    pub async fn cancel_job(&self, job_id: JobId) -> Result<JobStatus, ClientError> {
        let value = self
            .request(|request_id| Message::JobCancel {
                request_id,
                job_id,
                attempt: 0,
            })
            .await?;
        expect_job(value)
    }

    /// Leases and cancels for this worker session; `None` after the first call.
    pub fn job_events(&self) -> Option<JobEvents> {
        self.shared
            .job_events_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .map(|rx| JobEvents { rx })
    }

    /// Says how many jobs this worker session can run at once (0 pauses it); the router
    /// leases jobs of the swarms the session joined while it holds fewer leases. Restate it
    /// whenever it changes.
    pub async fn set_job_credits(&self, credits: u32) -> Result<(), ClientError> {
        // On the job stream, in order with the session's other job traffic.
        self.shared
            .jobs_tx
            .send(encode(&Message::JobCredits { credits }))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// A heartbeat for a running attempt (extends its lease); a non-empty `payload` is
    /// progress, forwarded to the submitter. A heartbeat of a fenced attempt is answered
    /// with a `JobEvent::Cancel`.
    pub async fn job_progress(
        &self,
        job_id: JobId,
        attempt: u32,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        self.check_job_payload(&payload)?;
        self.shared
            .jobs_tx
            .send(encode(&Message::JobProgress(JobProgress {
                job_id,
                attempt,
                payload,
            })))
            .await
            .map_err(|_| closed_error(&self.shared.connection))
    }

    /// Reports an attempt's outcome: `ok` (the payload is the result), a failure (`ok`
    /// false: the job ends failed), or a failure to retry (`retry`: another attempt after a
    /// backoff, or the dead-letter queue after the last). Resolves once the end is durable;
    /// refused with `LeaseFenced` when the attempt was fenced (its result is dropped).
    pub async fn finish_job(
        &self,
        job_id: JobId,
        attempt: u32,
        ok: bool,
        retry: bool,
        payload: Bytes,
    ) -> Result<JobStatus, ClientError> {
        self.check_job_payload(&payload)?;
        let value = self
            .request_on(&self.shared.jobs_tx, |request_id| {
                Message::JobResult(JobResult {
                    request_id,
                    job_id,
                    attempt,
                    ok,
                    retry,
                    payload,
                })
            })
            .await?;
        expect_job(value)
    }

    /// A page of the swarm's dead-letter queue after `after` (controllers only).
    pub async fn dead_letters(
        &self,
        swarm: &str,
        after: JobId,
        limit: u32,
    ) -> Result<DeadLetters, ClientError> {
        let value = self
            .request(|request_id| Message::ListDeadLetters {
                request_id,
                swarm: swarm.to_owned(),
                after_job_id: after,
                limit,
            })
            .await?;
        match value {
            ReplyValue::DeadLetters(page) => Ok(page),
            other => Err(ClientError::Protocol {
                detail: format!("expected DeadLetters, got {other:?}"),
            }),
        }
    }

    /// Queues a dead-lettered job again with a fresh attempt budget (controllers only).
    pub async fn redrive_job(&self, swarm: &str, job_id: JobId) -> Result<JobStatus, ClientError> {
        let value = self
            .request(|request_id| Message::RedriveJob {
                request_id,
                swarm: swarm.to_owned(),
                job_id,
            })
            .await?;
        expect_job(value)
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
    /// (`RateLimited`, `CircuitOpen`, `Busy`) with exponential backoff and full jitter, never
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
                }) if [15, 20, 21].contains(&code) => {
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

    fn check_publish(
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

#[cfg(test)]
mod delivery_tests {
    use super::*;

    fn deliver(class: Class, op: u64) -> Deliver {
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
        }
    }

    #[tokio::test]
    async fn a_telemetry_backlog_never_holds_a_command_back() {
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
    async fn the_sink_records_the_last_ordered_op_handed_over() {
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
