//! Safety actions shared by the routers of a cluster (pauses and stops): one JetStream
//! key-value bucket, `<stream_prefix>_SAFETY`, holding the latest record of each (the
//! router's own control-record keys and payloads, the key in hex), which every router
//! watches and applies.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::{hex, stream_error, Cluster, Error};

/// The cluster's bucket of safety actions.
#[derive(Clone, Debug)]
pub struct SafetyBucket {
    store: kv::Store,
    name: String,
}

impl Cluster {
    /// The safety bucket, made when missing (file storage, `jetstream.replicas` replicas,
    /// one value per key).
    pub async fn safety_bucket(&self) -> Result<SafetyBucket, Error> {
        let (store, name) = self.bucket("SAFETY").await?;
        Ok(SafetyBucket { store, name })
    }
}

impl SafetyBucket {
    /// Writes the latest record of `key` (acknowledged once the cluster holds it); returns
    /// the write's revision (later writes have larger ones).
    pub async fn put(&self, key: &str, payload: Bytes) -> Result<u64, Error> {
        self.store
            .put(hex(key.as_bytes()), payload)
            .await
            .map_err(|e| stream_error(&self.name, format_args!("writing a safety action: {e}")))
    }

    /// Every record the bucket holds now, with its revision, each read from the bucket's
    /// leader.
    pub async fn snapshot(&self) -> Result<Vec<(String, Bytes, u64)>, Error> {
        let failed = |e: &dyn std::fmt::Display| {
            stream_error(&self.name, format_args!("reading the safety actions: {e}"))
        };
        let mut keys = self.store.keys().await.map_err(|e| failed(&e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| failed(&e))?;
            let subject = format!("{}{key}", self.store.prefix);
            let message = match self
                .store
                .stream
                .get_last_raw_message_by_subject(&subject)
                .await
            {
                Ok(message) => message,
                Err(error)
                    if error.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    continue
                }
                Err(error) => return Err(failed(&error)),
            };
            if let Some(key) = unhex(&key) {
                out.push((key, message.payload, message.sequence));
            }
        }
        Ok(out)
    }

    /// Every record now, then each as it is written (a watch that fails is started again
    /// after a pause, from the records then), sent to `to` as (key, payload, revision)
    /// until `to` is closed.
    pub async fn follow(&self, to: tokio::sync::mpsc::UnboundedSender<(String, Bytes, u64)>) {
        let mut pause = Duration::from_millis(50);
        while !to.is_closed() {
            match self.store.watch_with_history(">").await {
                Ok(mut watch) => {
                    pause = Duration::from_millis(50);
                    while let Some(entry) = watch.next().await {
                        let entry = match entry {
                            Ok(entry) => entry,
                            Err(error) => {
                                tracing::warn!(bucket = %self.name, %error, "watching the safety bucket; watching again");
                                break;
                            }
                        };
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        let Some(key) = unhex(&entry.key) else {
                            tracing::warn!(bucket = %self.name, key = %entry.key, "a key of the safety bucket that is not hex; skipped");
                            continue;
                        };
                        if to.send((key, entry.value, entry.revision)).is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(bucket = %self.name, %error, "watching the safety bucket")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

fn unhex(text: &str) -> Option<String> {
    if text.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_go_through_hex_and_back() {
        let key = "pause\u{1}swarm/ä";
        assert_eq!(
            super::unhex(&crate::hex(key.as_bytes())).as_deref(),
            Some(key)
        );
        assert_eq!(super::unhex("abc"), None);
        assert_eq!(super::unhex("zz"), None);
    }
}
