//! swarmbus's client of NATS JetStream: each swarm's ordered log is a stream, and op `n`
//! of the swarm is the stream's sequence `n`.
//!
//! An append of op `n` is a publish with `Nats-Expected-Last-Sequence: n - 1` and a
//! `Nats-Msg-Id` naming the swarm's epoch and the op, so the stream never holds a gap, an
//! op twice, or an op out of order. When the answer is lost (a timeout, a broken
//! connection) or is "wrong last sequence", the op is read back from the stream and
//! compared before anything is sent again: the same bytes there mean the op is durable,
//! other bytes mean another writer took the op id, and nothing there means the publish is
//! tried again (the message id makes a repeat that did land a duplicate the server drops).
//!
//! [`Cluster::connect`] refuses a JetStream whose servers acknowledge before they fsync
//! (`sync_interval` other than `always`) unless [`JetStreamConfig::danger_unsynced_acks`]
//! says otherwise: Jepsen's analysis of NATS 2.12.1 showed acknowledged writes lost on
//! power failure and process crashes under the default two-minute interval.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod leases;
mod safety;
pub use safety::SafetyBucket;
mod monitor;
pub use leases::{LeaseAnswer, LeaseBucket, LeaseState, LeaseValue};
pub mod testing;

/// Stream metadata: the swarm's name, as given (stream names hold its bytes in hex).
const META_SWARM: &str = "swarmbus_swarm";
/// Stream metadata: the epoch the swarm's log was started with, in hex.
const META_EPOCH: &str = "swarmbus_epoch";
/// Bytes an append's headers and subject take besides its record, at most (the server
/// counts them against its `max_payload`): ids and sequences of a few dozen bytes each.
pub const HEADER_ALLOWANCE: usize = 512;

/// `[jetstream]` in the router's configuration: where the cluster is, how the router signs
/// in, and how swarms' streams are made.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    /// The NATS servers (`nats://host:port` or `tls://host:port`); the client connects to
    /// one and learns the rest of the cluster from it.
    pub urls: Vec<String>,
    /// Replicas of each swarm's stream (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// Streams are named `<stream_prefix>_<swarm in hex>` (`H` and the name's SHA-256 in
    /// hex for a name longer than 100 bytes); at most 54 characters.
    pub stream_prefix: String,
    /// Subjects are `<subject_prefix>.<the same>`.
    pub subject_prefix: String,
    /// A NATS credentials file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    pub user: Option<String>,
    /// Printed as `"(set)"` by `swarmbus-router --check-config`.
    pub password: Option<String>,
    /// Printed as `"(set)"`, like `password`.
    pub token: Option<String>,
    /// PEM roots that the servers' TLS certificates must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// Refuse servers that do not offer TLS.
    pub require_tls: bool,
    /// The servers' HTTP monitoring endpoints (`http://host:8222`), one per server of the
    /// cluster: at start the router reads each one's `/varz` and refuses to start unless
    /// every one syncs before acknowledging (`jetstream { sync_interval: always }`).
    pub monitor_urls: Vec<String>,
    /// Start without that check, or in spite of it failing: a crash or power loss on the
    /// servers may then lose commands they acknowledged. For tests and demos only.
    pub danger_unsynced_acks: bool,
    /// How long one publish waits for the stream's acknowledgement.
    pub ack_timeout_ms: u64,
    /// How long an append is retried (read back, published again) before it fails and the
    /// swarm is unavailable until the cluster takes its writes again.
    pub append_deadline_ms: u64,
    /// Publishes of one swarm sent before the first of them is acknowledged.
    pub max_in_flight: usize,
    /// How long connecting to the cluster may take at start.
    pub connect_timeout_ms: u64,
    /// Send each telemetry publish to the other routers of the cluster, and deliver theirs
    /// to this router's subscribers (core NATS subjects `<subject_prefix>.tel.<swarm>`,
    /// best effort). Off by default: every telemetry publish then costs a NATS publish,
    /// whether or not another router subscribes.
    pub share_telemetry: bool,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            urls: vec!["nats://127.0.0.1:4222".into()],
            replicas: 1,
            stream_prefix: "SWARMBUS".into(),
            subject_prefix: "swarmbus.log".into(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
            require_tls: false,
            monitor_urls: Vec::new(),
            danger_unsynced_acks: false,
            ack_timeout_ms: 2_000,
            append_deadline_ms: 10_000,
            max_in_flight: 256,
            connect_timeout_ms: 5_000,
            share_telemetry: false,
        }
    }
}

/// Errors talking to the cluster.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error("jetstream configuration: {0}")]
    Config(String),
    #[error("connecting to NATS at {urls:?}: {detail}")]
    Connect { urls: Vec<String>, detail: String },
    #[error("the JetStream server at {url} {detail}")]
    Unsynced { url: String, detail: String },
    #[error("stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    /// Another writer took op `op` of the stream (its bytes there are not this append's).
    #[error("stream {stream}: op {op} holds another record (another writer took the op id)")]
    Conflict { stream: String, op: u64 },
    #[error("stream {stream}: op {op} not acknowledged within {waited_ms} ms: {last_error}")]
    Deadline {
        stream: String,
        op: u64,
        waited_ms: u64,
        last_error: String,
    },
}

/// What the cluster holds of one swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmInfo {
    pub swarm: String,
    pub epoch: u64,
    /// The stream's last sequence: the swarm's last op.
    pub last_op: u64,
    /// The stream's first sequence (ops before it were removed by the stream's limits).
    pub first_op: u64,
    pub bytes: u64,
}

/// A connection to the cluster, shared by every swarm's stream.
#[derive(Clone, Debug)]
pub struct Cluster {
    js: jetstream::Context,
    config: Arc<JetStreamConfig>,
    /// Names this connection's appends in their message ids.
    writer: u64,
}

impl Cluster {
    /// Checks the servers' sync setting (unless `danger_unsynced_acks`), then connects.
    pub async fn connect(config: JetStreamConfig) -> Result<Cluster, Error> {
        if config.urls.is_empty() {
            return Err(Error::Config("jetstream.urls is empty".into()));
        }
        if config.replicas == 0 || config.max_in_flight == 0 {
            return Err(Error::Config(
                "jetstream.replicas and jetstream.max_in_flight must be at least 1".into(),
            ));
        }
        if !config.danger_unsynced_acks {
            monitor::check_synced(&config.monitor_urls).await?;
        } else {
            tracing::warn!(
                "jetstream.danger_unsynced_acks: the servers' sync setting is not checked; acknowledged commands may be lost if they crash"
            );
        }
        let client = connect_client(&config, "swarmbus-router", |options| options).await?;
        // No router-wide cap on acknowledgements in flight: each swarm's appender bounds
        // its own (`max_in_flight`), and a shared cap would let swarms that each hold part
        // of it wait on one another for ever.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.ack_timeout_ms))
            .max_ack_inflight(tokio::sync::Semaphore::MAX_PERMITS)
            .build(client);
        Ok(Cluster {
            js,
            config: Arc::new(config),
            writer: writer_id(),
        })
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }

    /// A second connection to the cluster, for telemetry across routers: telemetry never
    /// queues in front of the log's appends, and a slow telemetry subscription can only
    /// cost this connection. `no_echo`: it never receives its own publishes; each
    /// subscription holds at most `subscription_capacity` messages before NATS drops more.
    pub async fn connect_telemetry(
        &self,
        subscription_capacity: usize,
    ) -> Result<async_nats::Client, Error> {
        connect_client(&self.config, "swarmbus-router-telemetry", |options| {
            options
                .no_echo()
                .subscription_capacity(subscription_capacity)
        })
        .await
    }

    /// The largest message the server takes (its `max_payload`), headers included.
    pub fn max_payload(&self) -> usize {
        self.js.client().server_info().max_payload
    }

    /// The core NATS subject telemetry of `swarm` crosses routers on.
    pub fn telemetry_subject(&self, swarm: &str) -> String {
        format!("{}.tel.{}", self.config.subject_prefix, swarm_token(swarm))
    }

    /// Whether the connection to the cluster is up now (the client reconnects by itself
    /// when it is not).
    pub fn is_connected(&self) -> bool {
        self.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// The stream name of `swarm`: the name's bytes in hex, or, for a name too long for a
    /// stream name (NATS allows 255 characters), `H` and the SHA-256 of the name in hex
    /// (the name itself is in the stream's metadata).
    pub fn stream_name(&self, swarm: &str) -> String {
        format!("{}_{}", self.config.stream_prefix, swarm_token(swarm))
    }

    fn subject(&self, swarm: &str) -> String {
        format!("{}.{}", self.config.subject_prefix, swarm_token(swarm))
    }

    /// The swarms whose streams the cluster holds (those named with this router's prefix).
    pub async fn swarms(&self) -> Result<Vec<SwarmInfo>, Error> {
        let prefix = format!("{}_", self.config.stream_prefix);
        let mut names = self.js.stream_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            let name =
                name.map_err(|e| stream_error(&prefix, format_args!("listing streams: {e}")))?;
            if !name.starts_with(&prefix) {
                continue;
            }
            let stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| stream_error(&name, e))?;
            match swarm_info(&name, stream.cached_info())? {
                // Only this router's streams: a longer prefix of another deployment
                // (`SWARMBUS_B_...`) starts the same way.
                Some(info) if self.stream_name(&info.swarm) == name => out.push(info),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The stream of `swarm` if the cluster holds it (it is not created).
    pub async fn existing(&self, swarm: &str) -> Result<Option<SwarmStream>, Error> {
        let name = self.stream_name(swarm);
        let stream = match self.js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(error) => {
                if let context::GetStreamErrorKind::JetStream(inner) = error.kind() {
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND {
                        return Ok(None);
                    }
                }
                return Err(stream_error(&name, error));
            }
        };
        let Some(info) = swarm_info(&name, stream.cached_info())? else {
            return Ok(None);
        };
        Ok(Some(self.swarm_stream(stream, swarm, name, &info)))
    }

    fn swarm_stream(
        &self,
        stream: stream::Stream,
        swarm: &str,
        name: String,
        info: &SwarmInfo,
    ) -> SwarmStream {
        SwarmStream {
            js: self.js.clone(),
            stream,
            subject: self.subject(swarm).into(),
            name,
            epoch: info.epoch,
            writer: self.writer,
            config: self.config.clone(),
        }
    }

    /// Opens the stream of `swarm`, creating it with `epoch` when it does not exist. The
    /// answer carries the epoch the stream was created with (an existing stream keeps its
    /// own).
    pub async fn open(&self, swarm: &str, epoch: u64) -> Result<(SwarmStream, SwarmInfo), Error> {
        let name = self.stream_name(swarm);
        let subject = self.subject(swarm);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            num_replicas: self.config.replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            // Repeats of a publish are dropped by message id for this long.
            duplicate_window: Duration::from_secs(120),
            metadata: HashMap::from([
                (META_SWARM.to_string(), swarm.to_string()),
                (META_EPOCH.to_string(), format!("{epoch:x}")),
            ]),
            ..Default::default()
        };
        let stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| stream_error(&name, e))?;
        let info = swarm_info(&name, stream.cached_info())?.ok_or_else(|| {
            stream_error(
                &name,
                "the stream exists but was not made by swarmbus (no swarmbus metadata)",
            )
        })?;
        Ok((self.swarm_stream(stream, swarm, name, &info), info))
    }
}

/// A connection to the cluster with the configured sign-in and TLS; `adjust` adds options.
async fn connect_client(
    config: &JetStreamConfig,
    name: &str,
    adjust: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, Error> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        // A dead connection is noticed within a few pings (and /readyz says so).
        .ping_interval(Duration::from_secs(5))
        .require_tls(config.require_tls);
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| Error::Config(format!("jetstream.credentials_file {path:?}: {e}")))?;
    }
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "jetstream.user and jetstream.password go together".into(),
            ))
        }
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &config.tls_ca_file {
        options = options.add_root_certificates(path.clone());
    }
    adjust(options)
        .connect(config.urls.as_slice())
        .await
        .map_err(|e| Error::Connect {
            urls: config.urls.clone(),
            detail: e.to_string(),
        })
}

fn stream_error(stream: &str, detail: impl std::fmt::Display) -> Error {
    Error::Stream {
        stream: stream.to_owned(),
        detail: detail.to_string(),
    }
}

fn swarm_info(name: &str, info: &stream::Info) -> Result<Option<SwarmInfo>, Error> {
    let meta = &info.config.metadata;
    let (Some(swarm), Some(epoch)) = (meta.get(META_SWARM), meta.get(META_EPOCH)) else {
        return Ok(None);
    };
    let epoch = u64::from_str_radix(epoch, 16).map_err(|_| {
        stream_error(
            name,
            format_args!("metadata {META_EPOCH} {epoch:?} is not a hex number"),
        )
    })?;
    Ok(Some(SwarmInfo {
        swarm: swarm.clone(),
        epoch,
        last_op: info.state.last_sequence,
        first_op: info.state.first_sequence,
        bytes: info.state.bytes,
    }))
}

/// One swarm's stream.
#[derive(Clone, Debug)]
pub struct SwarmStream {
    js: jetstream::Context,
    stream: stream::Stream,
    name: String,
    /// Cloned per publish: a shared buffer, no allocation.
    subject: async_nats::Subject,
    epoch: u64,
    writer: u64,
    config: Arc<JetStreamConfig>,
}

/// An append to make: op `op` with the bytes `record`. A `filler` append (a void record
/// that keeps the log gap-free) is satisfied by any record already at its op.
#[derive(Clone, Debug)]
pub struct Append {
    pub op: u64,
    pub record: Bytes,
    pub filler: bool,
}

impl SwarmStream {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An error of this stream.
    fn error(&self, detail: impl std::fmt::Display) -> Error {
        stream_error(&self.name, detail)
    }

    /// The stream's state now, from the server.
    async fn info(&self) -> Result<stream::Info, Error> {
        self.stream.get_info().await.map_err(|e| self.error(e))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Unique to this writer: a repeat of its own publish is a duplicate the stream drops,
    /// another writer's op never is.
    fn message_id(&self, op: u64) -> String {
        format!("{:x}-{op}-{:x}", self.epoch, self.writer)
    }

    /// Publishes `append`. `chained`: the op before it is this writer's and not confirmed
    /// yet, so the stream must hold that one as its last message (by message id) as well as
    /// at the sequence before: a pipelined op never lands behind another writer's.
    async fn publish(
        &self,
        append: &Append,
        chained: bool,
    ) -> Result<context::PublishAckFuture, String> {
        let mut message = jetstream::message::PublishMessage::build()
            .payload(append.record.clone())
            .message_id(self.message_id(append.op))
            .expected_last_sequence(append.op - 1);
        if chained {
            message = message.expected_last_message_id(self.message_id(append.op - 1));
        }
        self.js
            .send_publish(self.subject.clone(), message)
            .await
            .map_err(|e| e.to_string())
    }

    /// Appends `appends` (consecutive ops, in order), up to `max_in_flight` publishes on
    /// the wire at once, calling `durable` with each op once the stream holds it. Stops at
    /// the first op that cannot be made durable and returns its error; the ops after it
    /// were not appended.
    pub async fn append_all(
        &self,
        appends: Vec<Append>,
        mut durable: impl FnMut(u64),
    ) -> Result<(), Error> {
        // A message past the server's limit would make it close the connection, which
        // every swarm shares: such an op is refused before it is sent, once the ops before
        // it are settled.
        let max_payload = self.js.client().server_info().max_payload;
        let mut oversized = None;
        let mut waiting = appends.into_iter();
        let mut in_flight: VecDeque<(Append, Result<context::PublishAckFuture, String>)> =
            VecDeque::new();
        loop {
            while in_flight.len() < self.config.max_in_flight && oversized.is_none() {
                let Some(append) = waiting.next() else { break };
                if max_payload > 0 && append.record.len() + HEADER_ALLOWANCE > max_payload {
                    oversized = Some(append);
                    break;
                }
                let chained = in_flight
                    .back()
                    .is_some_and(|(last, _)| last.op + 1 == append.op);
                let sent = self.publish(&append, chained).await;
                in_flight.push_back((append, sent));
            }
            if in_flight.is_empty() {
                if let Some(large) = oversized {
                    return Err(self.error(format_args!(
                        "op {}: its record of {} bytes is larger than the server's max_payload ({max_payload})",
                        large.op,
                        large.record.len()
                    )));
                }
            }
            let Some((append, sent)) = in_flight.pop_front() else {
                return Ok(());
            };
            let answer = match sent {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(error) => Err(error),
            };
            match answer {
                Ok(ack) if ack.sequence == append.op && !ack.duplicate => {}
                // A duplicate: the stream holds this message id already; what it holds is
                // checked, as after a lost answer.
                Ok(ack) if ack.sequence == append.op => {
                    self.settle(&append, "a duplicate".into()).await?
                }
                Ok(ack) => {
                    // A repeat of a message id the stream holds at another sequence: an op
                    // of another epoch or writer.
                    tracing::error!(stream = %self.name, op = append.op, at = ack.sequence, "the stream answered an append with another sequence");
                    return Err(Error::Conflict {
                        stream: self.name.clone(),
                        op: append.op,
                    });
                }
                Err(error) => self.settle(&append, error).await?,
            }
            durable(append.op);
        }
    }

    /// Makes `append` durable after a publish whose answer was lost or refused: reads the
    /// op back, and publishes again only while the stream does not hold it.
    async fn settle(&self, append: &Append, first_error: String) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_millis(self.config.append_deadline_ms);
        tracing::debug!(stream = %self.name, op = append.op, error = %first_error, "an append's answer was lost or refused; reading the op back");
        let mut last_error: String;
        let mut pause = Duration::from_millis(10);
        loop {
            match self.get_message(append.op).await {
                Ok(Some((found, _))) if found == append.record => return Ok(()),
                Ok(Some((_, id))) if append.filler => {
                    // This writer's own record of an op it gave up on (a publish that landed
                    // after its deadline, from the client's buffer or the network) is erased:
                    // its publisher was refused. Another writer's record stands.
                    if id
                        .as_deref()
                        .is_some_and(|id| id == self.message_id(append.op))
                    {
                        tracing::warn!(stream = %self.name, op = append.op, "erasing a refused op that landed after its deadline");
                        match self.stream.delete_message(append.op).await {
                            Ok(_) => return Ok(()),
                            Err(error) => last_error = format!("erasing op {}: {error}", append.op),
                        }
                    } else {
                        return Ok(());
                    }
                }
                Ok(Some(_)) => {
                    return Err(Error::Conflict {
                        stream: self.name.clone(),
                        op: append.op,
                    })
                }
                // Erased (above, by an earlier try): the op is void already.
                Ok(None) if append.filler && self.last_op().await.is_ok_and(|l| l >= append.op) => {
                    return Ok(())
                }
                Ok(None) => {
                    let answer = match self.publish(append, false).await {
                        Ok(ack) => ack.await.map_err(|e| e.to_string()),
                        Err(error) => Err(error),
                    };
                    match answer {
                        Ok(ack) if ack.sequence == append.op && !ack.duplicate => return Ok(()),
                        // Held already after all: read back on the next round.
                        Ok(ack) if ack.sequence == append.op => last_error = "a duplicate".into(),
                        Ok(_) => {
                            return Err(Error::Conflict {
                                stream: self.name.clone(),
                                op: append.op,
                            })
                        }
                        Err(error) => last_error = error,
                    }
                }
                Err(error) => last_error = error.to_string(),
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(Error::Deadline {
                    stream: self.name.clone(),
                    op: append.op,
                    waited_ms: started.elapsed().as_millis() as u64,
                    last_error,
                });
            }
            tracing::debug!(stream = %self.name, op = append.op, error = %last_error, "append not settled yet; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The record at op `op`, if the stream holds one.
    pub async fn get(&self, op: u64) -> Result<Option<Bytes>, Error> {
        Ok(self.get_message(op).await?.map(|(record, _)| record))
    }

    /// The stream's last op (erased ones count).
    async fn last_op(&self) -> Result<u64, Error> {
        Ok(self.bounds().await?.1)
    }

    /// The record at op `op` and its message id, if the stream holds one.
    async fn get_message(&self, op: u64) -> Result<Option<(Bytes, Option<String>)>, Error> {
        match self.stream.get_raw_message(op).await {
            Ok(message) => {
                let id = message
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned());
                Ok(Some((message.payload, id)))
            }
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(self.error(format_args!("reading op {op}: {error}"))),
        }
    }

    /// The records of ops `from..=to` the stream holds, in order, at most `max_records` of
    /// them and stopping once `max_bytes` are read. Empty only when the stream's leader
    /// holds none of them.
    pub async fn read(
        &self,
        from: u64,
        to: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, Error> {
        if from > to || max_records == 0 {
            return Ok(Vec::new());
        }
        let found = self
            .read_with_consumer(from, to, max_records, max_bytes)
            .await?;
        if !found.is_empty() {
            return Ok(found);
        }
        // The consumer found nothing: its replica may be behind the leader (a consumer of a
        // replicated stream lives on any of its servers), or the ops there were erased.
        // The leader answers.
        self.read_at_leader(from, to, max_records, max_bytes).await
    }

    /// [`SwarmStream::read`] one message at a time from the stream's leader (each op one
    /// request; erased ops skipped by the server).
    async fn read_at_leader(
        &self,
        from: u64,
        to: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, Error> {
        let (mut out, mut bytes, mut next) = (Vec::new(), 0, from);
        while next <= to && out.len() < max_records && bytes < max_bytes {
            match self
                .stream
                .get_first_raw_message_by_subject(&self.subject, next)
                .await
            {
                Ok(message) if message.sequence <= to && message.sequence >= next => {
                    next = message.sequence + 1;
                    bytes += message.payload.len();
                    out.push((message.sequence, message.payload));
                }
                Ok(_) => break,
                Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(error) => {
                    return Err(self.error(format_args!("reading op {next} at the leader: {error}")))
                }
            }
        }
        Ok(out)
    }

    /// [`SwarmStream::read`] through an ordered consumer from `from`.
    async fn read_with_consumer(
        &self,
        from: u64,
        to: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, Error> {
        let mut out = Vec::new();
        let reader = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.error(format_args!("starting a read from op {from}: {e}")))?;
        // Nothing at or after `from` (the ops there were erased): the consumer would wait
        // for a message that never comes.
        if reader.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| self.error(format_args!("reading from op {from}: {e}")))?;
        let mut bytes = 0;
        while let Some(message) = messages.next().await {
            let message =
                message.map_err(|e| self.error(format_args!("reading from op {from}: {e}")))?;
            let (op, pending) = {
                let info = message
                    .info()
                    .map_err(|e| self.error(format_args!("reading from op {from}: {e}")))?;
                (info.stream_sequence, info.pending)
            };
            if op > to {
                break;
            }
            bytes += message.payload.len();
            out.push((op, message.payload.clone()));
            if op == to || pending == 0 || out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Follows the stream from op `from` on: every op the stream holds from there, and
    /// each one appended later, in op order, as [`Follower::next`] yields them. The
    /// consumer is ordered: a gap or a lost connection makes the client start it again
    /// after the last op it yielded, so no op is skipped or yielded twice. Ops erased
    /// from the stream (see [`SwarmStream::append_all`]) are not yielded.
    pub async fn follow(&self, from: u64) -> Result<Follower, Error> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.error(format_args!("following from op {from}: {e}")))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| self.error(format_args!("following from op {from}: {e}")))?;
        Ok(Follower {
            stream: self.clone(),
            messages,
        })
    }

    /// The stream's replication now: its leader's server name, and for each other replica
    /// its name and whether it is current (holds every op the leader does). `None` for a
    /// stream that is not replicated.
    pub async fn replication(&self) -> Result<Option<(String, Vec<(String, bool)>)>, Error> {
        let info = self.info().await?;
        Ok(info.cluster.and_then(|cluster| {
            let leader = cluster.leader?;
            let replicas = cluster
                .replicas
                .into_iter()
                .map(|peer| {
                    (
                        peer.name,
                        peer.current && !peer.offline && peer.lag.unwrap_or(0) == 0,
                    )
                })
                .collect();
            Some((leader, replicas))
        }))
    }

    /// The stream's first and last op now.
    pub async fn bounds(&self) -> Result<(u64, u64), Error> {
        let info = self.info().await?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }
}

/// A follow of one stream (see [`SwarmStream::follow`]).
pub struct Follower {
    stream: SwarmStream,
    messages: consumer::pull::Ordered,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("stream", &self.stream.name)
            .finish_non_exhaustive()
    }
}

/// One op a [`Follower`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Followed {
    pub op: u64,
    pub record: Bytes,
    /// Appended by this connection's writer (its message id says so).
    pub own: bool,
}

impl Follower {
    /// The next op of the stream, waiting for it to be appended; `None` once the
    /// connection is closed for good. An error ends the follow (start another).
    pub async fn next(&mut self) -> Option<Result<Followed, Error>> {
        let message = match self.messages.next().await? {
            Ok(message) => message,
            Err(error) => return Some(Err(self.stream.error(format_args!("following: {error}")))),
        };
        let op = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(error) => return Some(Err(self.stream.error(format_args!("following: {error}")))),
        };
        let own = message
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .is_some_and(|id| id.as_str() == self.stream.message_id(op));
        Some(Ok(Followed {
            op,
            record: message.message.payload,
            own,
        }))
    }
}

/// A number no other writer picks in practice (not a secret): the standard library's
/// randomly seeded hasher over the process id and the time.
fn writer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// A swarm's token in stream names and subjects (see [`Cluster::stream_name`]).
fn swarm_token(swarm: &str) -> String {
    // 200 bytes of hex leave room for a prefix of up to 54 characters.
    if swarm.len() <= 100 {
        hex(swarm.as_bytes())
    } else {
        let digest = ring::digest::digest(&ring::digest::SHA256, swarm.as_bytes());
        format!("H{}", hex(digest.as_ref()))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}
