//! Telemetry across routers: with `log.backend = "jetstream"` and
//! `jetstream.share_telemetry`, each telemetry publish a router takes is
//! also published on the NATS subject `<jetstream.subject_prefix>.tel.<swarm token>`, and
//! each router subscribes to the subjects of the swarms it has telemetry subscribers in,
//! delivering what other routers send to them as if it had been published locally. Best
//! effort, like telemetry on one router: a publish the NATS client cannot queue at once is
//! shed and counted (`telemetry_bridge_dropped`), never waited for. Telemetry has a NATS
//! connection of its own (never queued in front of the log's appends), opened with
//! `no_echo`, so a router never gets its own publishes back.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use swarmbus_schema::Publish;
use tokio::sync::mpsc;

use crate::stats::Stats;

/// The first byte of a bridged publish: its layout's version.
const VERSION: u8 = 1;

/// A telemetry publish as it crosses routers: the publish (no acknowledgement asked), who
/// published it, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Bridged {
    pub publish: Publish,
    pub source_agent: String,
    pub published_us: u64,
}

/// `VERSION`, then `published_us` and the fencing token (u64 each), then swarm, source,
/// target, key and lease, each a u16 length (0xffff for none) and its bytes, then the
/// payload to the end. Written straight from the publish, with one copy of the payload.
/// Hand-written: a few fields, read by swarmbus routers only, where a schema would add a
/// verifier pass per message on the telemetry path.
pub fn encode(publish: &Publish, source_agent: &str, published_us: u64) -> Bytes {
    let texts = [
        Some(publish.swarm.as_str()),
        Some(source_agent),
        publish.target_agent.as_deref(),
        publish.key.as_deref(),
        publish.lease.as_deref(),
    ];
    let names: usize = texts.iter().flatten().map(|t| t.len()).sum();
    let mut out = BytesMut::with_capacity(1 + 16 + 2 * texts.len() + names + publish.payload.len());
    out.put_u8(VERSION);
    out.put_u64(published_us);
    out.put_u64(publish.fencing_token);
    for text in texts {
        put_text(&mut out, text);
    }
    out.put_slice(&publish.payload);
    out.freeze()
}

impl Bridged {
    pub fn encode(&self) -> Bytes {
        encode(&self.publish, &self.source_agent, self.published_us)
    }

    /// The publish `encode` made, or `None` for anything else (names longer than the
    /// protocol allows included: anyone who may publish on the subjects can send bytes).
    pub fn decode(mut bytes: Bytes) -> Option<Bridged> {
        if bytes.len() < 17 || bytes.get_u8() != VERSION {
            return None;
        }
        let published_us = bytes.get_u64();
        let fencing_token = bytes.get_u64();
        let swarm = take_text(&mut bytes)??;
        let source_agent = take_text(&mut bytes)??;
        let target_agent = take_text(&mut bytes)?;
        let key = take_text(&mut bytes)?;
        let lease = take_text(&mut bytes)?;
        let names = [
            Some(&swarm),
            Some(&source_agent),
            target_agent.as_ref(),
            key.as_ref(),
            lease.as_ref(),
        ];
        if names
            .iter()
            .flatten()
            .any(|name| name.len() > swarmbus_schema::MAX_NAME_BYTES)
            || swarm.is_empty()
            || source_agent.is_empty()
        {
            return None;
        }
        let publish = Publish {
            request_id: 0,
            swarm,
            class: swarmbus_schema::Class::Telemetry,
            target_agent,
            key,
            payload: bytes,
            fencing_token,
            lease,
        };
        Some(Bridged {
            publish,
            source_agent,
            published_us,
        })
    }
}

const NONE: u16 = u16::MAX;

fn put_text(out: &mut BytesMut, text: Option<&str>) {
    match text {
        // Names are at most `MAX_NAME_BYTES` (256): always under `NONE`.
        Some(text) => {
            out.put_u16(text.len().min(NONE as usize - 1) as u16);
            out.put_slice(&text.as_bytes()[..text.len().min(NONE as usize - 1)]);
        }
        None => out.put_u16(NONE),
    }
}

/// `None`: malformed; `Some(None)`: absent.
fn take_text(bytes: &mut Bytes) -> Option<Option<String>> {
    if bytes.len() < 2 {
        return None;
    }
    let len = bytes.get_u16();
    if len == NONE {
        return Some(None);
    }
    let len = len as usize;
    if bytes.len() < len {
        return None;
    }
    let text = bytes.split_to(len);
    String::from_utf8(text.to_vec()).ok().map(Some)
}

/// Where bridged telemetry is delivered: the routes of the swarm's shard.
pub type Deliver = Arc<dyn Fn(&Bridged) + Send + Sync>;

/// The router's side of the bridge: sends its telemetry out, and keeps the subscriptions
/// of the swarms it has telemetry subscribers in. Its task ends once the bridge is dropped
/// (with the shards' routes, at shutdown).
#[derive(Debug)]
pub struct TelemetryBridge {
    client: async_nats::Client,
    cluster: swarmbus_jetstream::Cluster,
    interest: mpsc::UnboundedSender<(Arc<str>, bool)>,
    stats: Arc<Stats>,
}

impl TelemetryBridge {
    /// Starts the subscription keeper on the current runtime, on `client` (the telemetry
    /// connection, [`swarmbus_jetstream::Cluster::connect_telemetry`]); `deliver` takes what
    /// other routers send. `deliver` must not hold the bridge (it holds routes weakly).
    pub fn start(
        client: async_nats::Client,
        cluster: &swarmbus_jetstream::Cluster,
        stats: Arc<Stats>,
        deliver: Deliver,
    ) -> Arc<TelemetryBridge> {
        let (interest, changes) = mpsc::unbounded_channel();
        tokio::spawn(keep_subscriptions(
            client.clone(),
            cluster.clone(),
            stats.clone(),
            changes,
            deliver,
        ));
        Arc::new(TelemetryBridge {
            client,
            cluster: cluster.clone(),
            interest,
            stats,
        })
    }

    /// Sends one telemetry publish of `agent` to the other routers, or sheds it.
    pub fn send(&self, agent: &str, publish: &Publish, published_us: u64) {
        let subject = self.cluster.telemetry_subject(&publish.swarm);
        // Queued at once or not at all: telemetry never waits for the cluster. Outside
        // tokio's cooperative budget, so that a reader handling many frames in one poll
        // does not see a free queue as full.
        let sent = tokio::task::unconstrained(
            self.client
                .publish(subject, encode(publish, agent, published_us)),
        )
        .now_or_never();
        let counter = match sent {
            Some(Ok(())) => &self.stats.telemetry_bridged_out,
            _ => &self.stats.telemetry_bridge_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// This router has telemetry subscribers in `swarm` now (`true`) or no more (`false`).
    pub fn interest(&self, swarm: Arc<str>, wanted: bool) {
        let _ = self.interest.send((swarm, wanted));
    }
}

/// Subscribes to each swarm this router wants telemetry of, and unsubscribes when it no
/// longer does; each subscription's messages go to `deliver`. A subscription that fails is
/// tried again at the swarm's next change of interest.
async fn keep_subscriptions(
    client: async_nats::Client,
    cluster: swarmbus_jetstream::Cluster,
    stats: Arc<Stats>,
    mut changes: mpsc::UnboundedReceiver<(Arc<str>, bool)>,
    deliver: Deliver,
) {
    let mut subscribed: HashMap<Arc<str>, crate::bulk::AbortOnDrop<()>> = HashMap::new();
    while let Some((swarm, wanted)) = changes.recv().await {
        if !wanted {
            subscribed.remove(&swarm);
            continue;
        }
        if subscribed.contains_key(&swarm) {
            continue;
        }
        let subject = cluster.telemetry_subject(&swarm);
        let mut subscription = match client.subscribe(subject).await {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(%swarm, %error, "subscribing to other routers' telemetry failed");
                continue;
            }
        };
        let (deliver, stats, name) = (deliver.clone(), stats.clone(), swarm.clone());
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                // Only this swarm's, well formed: anyone allowed to publish on the subject
                // can send anything there.
                match Bridged::decode(message.payload) {
                    Some(bridged) if *bridged.publish.swarm == *name => {
                        stats.telemetry_bridged_in.fetch_add(1, Ordering::Relaxed);
                        deliver(&bridged);
                    }
                    _ => {
                        stats
                            .telemetry_bridge_rejected
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        subscribed.insert(swarm, crate::bulk::AbortOnDrop(task));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridged_publish_decodes_to_itself_and_garbage_to_nothing() {
        let bridged = Bridged {
            publish: Publish {
                request_id: 0,
                swarm: "fleet/α".into(),
                class: swarmbus_schema::Class::Telemetry,
                target_agent: Some("ctl".into()),
                key: None,
                payload: Bytes::from_static(b"\x00\x01telemetry"),
                fencing_token: 7,
                lease: Some("leader".into()),
            },
            source_agent: "gpu-7".into(),
            published_us: 1_733_000_000_000_000,
        };
        assert_eq!(Bridged::decode(bridged.encode()), Some(bridged.clone()));
        let mut untargeted = bridged.clone();
        untargeted.publish.target_agent = None;
        untargeted.publish.key = Some("k".into());
        untargeted.publish.payload = Bytes::new();
        assert_eq!(
            Bridged::decode(untargeted.encode()),
            Some(untargeted.clone())
        );
        let whole = untargeted.encode();
        for cut in 0..whole.len() - 1 {
            // Cut inside the fields: refused (a cut in the payload is a shorter payload).
            let decoded = Bridged::decode(whole.slice(..cut));
            assert!(decoded.is_none() || cut >= whole.len() - untargeted.publish.payload.len());
        }
        assert_eq!(
            Bridged::decode(Bytes::from_static(b"\x02garbage-garbage-garbage")),
            None
        );
        let mut too_long = untargeted;
        too_long.source_agent = "a".repeat(swarmbus_schema::MAX_NAME_BYTES + 1);
        assert_eq!(Bridged::decode(too_long.encode()), None);
    }
}
