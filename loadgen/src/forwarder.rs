//! The bare forwarder of `fanout --ceiling`: what the transport alone carries in the fan-out
//! scenario's shape, for the router's figures to be read against in the same run.
//!
//! It speaks just enough of the protocol for the same client library to use it (Hello ->
//! Welcome, Subscribe -> SubscribeAck) and writes every Publish it reads to the connections
//! subscribed to its swarm, as a Deliver whose head is encoded once and whose payload is the
//! publisher's buffer. Nothing else: no sequencing, log, lanes, classes, shedding, flow
//! control of its own, presence, heartbeats, unsubscribing or authorization. Its QUIC and
//! TLS settings are the router's defaults for its main listener (TLS 1.3 with the ring
//! provider, the same windows and ACK frequency). One difference in transport remains: a
//! router offers each session a bulk connection for its telemetry (`bulk_listen = "auto"`),
//! the forwarder does not, so against a router each agent holds two connections. A full subscriber holds its publisher back (an awaited send), so the
//! forwarder never drops: its figures are the ceiling of delivered/s and the floor of
//! latency.
//!
//! Runs as a child process of the loadgen (`swarmbus-loadgen forwarder`, hidden), so that,
//! like a spawned router, its CPU is its own and measurable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::{RecvStream, VarInt};
use swarmbus_schema::{
    encode, encode_deliver_head, Coalescer, DecodeOptions, Epoch, FrameDecoder, Limits, Message,
    OpId, OutFrame, SessionId, Welcome, ALPN, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Frames queued per subscriber connection before its publishers wait.
const SUBSCRIBER_QUEUE_FRAMES: usize = 4096;
/// Frames a subscriber's writer takes from its queue per stream write.
const WRITE_BATCH_FRAMES: usize = 256;

#[derive(Debug, clap::Args)]
pub struct ForwarderArgs {
    /// Address to listen on (UDP).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory to write the forwarder's CA certificate to (`ca.pem`).
    #[arg(long)]
    dir: PathBuf,
}

/// The connections subscribed to one swarm.
type Subscribers = Arc<Vec<mpsc::Sender<OutFrame>>>;

/// Swarm -> subscribers, copied on write: publisher streams keep a copy and take a fresh
/// one only when `generation` moved.
#[derive(Debug, Default)]
struct Table {
    swarms: Mutex<HashMap<String, Subscribers>>,
    generation: AtomicU64,
}

impl Table {
    fn subscribe(&self, swarm: &str, subscriber: mpsc::Sender<OutFrame>) {
        let mut swarms = self.swarms.lock().unwrap_or_else(|p| p.into_inner());
        let entry = swarms.entry(swarm.to_owned()).or_default();
        let mut list = Vec::clone(entry);
        list.retain(|s| !s.is_closed() && !s.same_channel(&subscriber));
        list.push(subscriber);
        *entry = Arc::new(list);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn get(&self, swarm: &str) -> Subscribers {
        let swarms = self.swarms.lock().unwrap_or_else(|p| p.into_inner());
        swarms.get(swarm).cloned().unwrap_or_default()
    }
}

/// `swarmbus-loadgen forwarder`: serves until killed. Prints `forwarder listening on ADDR`
/// once ready.
pub async fn run(args: ForwarderArgs) -> anyhow::Result<()> {
    let (certs, key) = identity(&args.dir)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config()));
    let endpoint = quinn::Endpoint::server(server, args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    println!("forwarder listening on {}", endpoint.local_addr()?);
    let table = Arc::new(Table::default());
    let mut next_session = 1u64;
    while let Some(incoming) = endpoint.accept().await {
        let table = table.clone();
        let session = next_session;
        next_session += 1;
        tokio::spawn(async move {
            if let Ok(connection) = incoming.await {
                if let Err(error) = serve(connection.clone(), table, session).await {
                    connection.close(VarInt::from_u32(1), error.to_string().as_bytes());
                }
            }
        });
    }
    Ok(())
}

/// The router's main-listener transport defaults (`router/src/server/start.rs`,
/// `transport_config`, with the default `[limits]`): kept equal by hand, since the loadgen
/// does not link the router.
fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(VarInt::from_u32(4));
    transport.max_concurrent_uni_streams(VarInt::from_u32(16));
    transport.stream_receive_window(VarInt::from_u32(1 << 20));
    transport.receive_window(VarInt::from_u32(2 << 20));
    transport.send_window(16 << 20);
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(VarInt::from_u32(15))
        .max_ack_delay(Some(Duration::from_millis(5)));
    transport.ack_frequency_config(Some(ack_frequency));
    transport.max_idle_timeout(Duration::from_secs(30).try_into().ok());
    transport
}

/// A CA written to `dir/ca.pem` and a certificate for `localhost` it signed.
fn identity(
    dir: &Path,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "swarmbus-loadgen forwarder CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem())
        .with_context(|| format!("writing {}", ca_path.display()))?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow!("the forwarder's key: {e}"))?;
    Ok((vec![leaf.der().clone()], key))
}

/// Reads the next message of `stream`; `None` at its end.
async fn next_message(
    stream: &mut RecvStream,
    decoder: &mut FrameDecoder,
    options: &DecodeOptions,
) -> anyhow::Result<Option<Message>> {
    loop {
        if let Some(message) = decoder.next_message(options)? {
            return Ok(Some(message));
        }
        match stream.read_chunk(usize::MAX, true).await? {
            Some(chunk) => decoder.push(chunk.bytes),
            None if decoder.is_idle() => return Ok(None),
            None => bail!("a stream ended inside a frame"),
        }
    }
}

/// One session: the handshake, then its subscriptions; its publish streams and its
/// delivery writer run beside.
async fn serve(
    connection: quinn::Connection,
    table: Arc<Table>,
    session: u64,
) -> anyhow::Result<()> {
    let options = DecodeOptions::default();
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let agent = match next_message(&mut recv, &mut decoder, &options).await? {
        Some(Message::Hello(hello)) => hello.agent_id,
        _ => bail!("expected Hello"),
    };
    let welcome = encode(&Message::Welcome(Welcome {
        session_id: SessionId(session),
        router_name: "swarmbus-loadgen forwarder".to_owned(),
        limits: Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES as u32,
            max_subscriptions: 1024,
            max_swarms_per_session: 64,
            queue_frames: Vec::new(),
            // No heartbeats: the forwarder keeps no presence.
            heartbeat_interval_ms: 0,
            heartbeat_timeout_ms: 0,
        },
        bulk: None,
    }));
    send.write_all_chunks(&mut [welcome.head, welcome.body])
        .await?;
    let (deliveries, queued) = mpsc::channel(SUBSCRIBER_QUEUE_FRAMES);
    tokio::spawn(write_deliveries(connection.clone(), queued));
    tokio::spawn(accept_publishes(connection.clone(), table.clone(), agent));
    while let Some(message) = next_message(&mut recv, &mut decoder, &options).await? {
        if let Message::Subscribe(subscription) = message {
            table.subscribe(&subscription.swarm, deliveries.clone());
            let ack = encode(&Message::SubscribeAck {
                request_id: subscription.request_id,
            });
            send.write_all_chunks(&mut [ack.head, ack.body]).await?;
        }
        // Heartbeats, acks and the rest: nothing to do.
    }
    Ok(())
}

async fn accept_publishes(connection: quinn::Connection, table: Arc<Table>, agent: String) {
    let agent: Arc<str> = agent.into();
    while let Ok(stream) = connection.accept_uni().await {
        tokio::spawn(forward(stream, table.clone(), agent.clone()));
    }
}

/// Forwards every Publish of one stream to its swarm's subscribers.
async fn forward(mut stream: RecvStream, table: Arc<Table>, agent: Arc<str>) {
    let options = DecodeOptions::default();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut cached: Option<(String, u64, Subscribers)> = None;
    while let Ok(Some(message)) = next_message(&mut stream, &mut decoder, &options).await {
        let Message::Publish(publish) = message else {
            continue;
        };
        let generation = table.generation.load(Ordering::Acquire);
        let fresh = matches!(&cached, Some((swarm, seen, _)) if *swarm == publish.swarm && *seen == generation);
        if !fresh {
            cached = Some((publish.swarm.clone(), generation, table.get(&publish.swarm)));
        }
        let Some((_, _, subscribers)) = &cached else {
            continue;
        };
        let head = encode_deliver_head(
            &publish.swarm,
            publish.class,
            OpId(0),
            Epoch(0),
            &agent,
            publish.target_agent.as_deref(),
            publish.key.as_deref(),
            publish.payload.len(),
            0,
            None,
            0,
        );
        for subscriber in subscribers.iter() {
            let frame = OutFrame {
                head: head.clone(),
                body: publish.payload.clone(),
            };
            // A subscriber gone is skipped; a full one holds this publisher back.
            let _ = subscriber.send(frame).await;
        }
    }
}

/// Writes one connection's deliveries on one stream, many frames per write.
async fn write_deliveries(connection: quinn::Connection, mut queued: mpsc::Receiver<OutFrame>) {
    let Ok(mut stream) = connection.open_uni().await else {
        return;
    };
    let mut batch = Vec::with_capacity(WRITE_BATCH_FRAMES);
    let mut coalescer = Coalescer::new();
    while queued.recv_many(&mut batch, WRITE_BATCH_FRAMES).await > 0 {
        for frame in batch.drain(..) {
            coalescer.push(frame);
        }
        let chunks = coalescer.chunks();
        if stream.write_all_chunks(chunks).await.is_err() {
            return;
        }
        chunks.clear();
    }
}

/// A forwarder child process for one run; killed when dropped.
#[derive(Debug)]
pub struct SpawnedForwarder {
    child: Child,
    pub addr: SocketAddr,
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl SpawnedForwarder {
    /// Starts `swarmbus-loadgen forwarder` (this executable) on 127.0.0.1, port 0.
    pub async fn start() -> anyhow::Result<SpawnedForwarder> {
        let dir = tempfile::Builder::new()
            .prefix("swarmbus-forwarder-")
            .tempdir()
            .context("creating a directory for the forwarder")?;
        let me = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(&me)
            .arg("forwarder")
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} forwarder", me.display()))?;
        let addr = crate::spawn::wait_for_start_line(&mut child, "forwarder", |line| {
            let addr = line.strip_prefix("forwarder listening on ")?;
            Some(
                addr.trim()
                    .parse::<SocketAddr>()
                    .with_context(|| format!("parsing {line:?}")),
            )
        })
        .await?;
        Ok(SpawnedForwarder {
            child,
            addr,
            ca: dir.path().join("ca.pem"),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_replaced_not_doubled() {
        let table = Table::default();
        let (a, _ra) = mpsc::channel(1);
        let (b, _rb) = mpsc::channel(1);
        table.subscribe("s", a.clone());
        table.subscribe("s", a.clone());
        table.subscribe("s", b);
        assert_eq!(table.get("s").len(), 2);
        assert_eq!(table.generation.load(Ordering::Relaxed), 3);
        assert!(table.get("other").is_empty());
    }
}
