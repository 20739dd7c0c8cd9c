//! Leases shared by the routers of a cluster: one JetStream key-value bucket,
//! `<stream_prefix>_LEASES`, a key per lease (the swarm's and the lease's names, each as
//! in stream names). Every change is a compare-and-set on the key's revision, so two
//! routers never both grant a lease, and a new holder's fencing token is the revision of
//! the write that granted it: revisions of a bucket only grow, so tokens do too, across
//! routers, restarts and releases.
//!
//! Expiry is by the routers' wall clocks: a holding written by one router with
//! `expires_at_ms` is free for every router once its own clock passes that (keep the
//! routers' clocks in step, NTP; a skew of `s` lets a new holder in `s` early or late).

use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{stream_error, swarm_token, Cluster, Error};

/// A lease as the bucket holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    pub swarm: String,
    pub name: String,
    /// Empty once released.
    pub holder: String,
    /// The holding's fencing token; 0 in the write that granted it (the token is then that
    /// write's revision).
    pub token: u64,
    /// Wall clock, Unix ms: when the holding started, and when it ends.
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A lease read from the bucket: its value and its effective token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub value: LeaseValue,
    pub token: u64,
    revision: u64,
}

impl LeaseState {
    fn from_entry(entry: &kv::Entry) -> Option<LeaseState> {
        if entry.operation != kv::Operation::Put {
            return None;
        }
        Self::from_value(&entry.value, entry.revision)
    }

    fn from_value(bytes: &[u8], revision: u64) -> Option<LeaseState> {
        let value: LeaseValue = serde_json::from_slice(bytes).ok()?;
        let token = if value.token == 0 {
            revision
        } else {
            value.token
        };
        Some(LeaseState {
            value,
            token,
            revision,
        })
    }

    /// The revision of the write this state is (later writes have larger ones).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Held at `now_ms` (by anyone).
    pub fn held(&self, now_ms: u64) -> bool {
        !self.value.holder.is_empty() && self.value.expires_at_ms > now_ms
    }
}

/// What a lease request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Held by the asker with `token` until `expires_at_ms`; `new_token` for a new holding.
    Granted {
        token: u64,
        granted_at_ms: u64,
        expires_at_ms: u64,
        new_token: bool,
        /// The revision of the write that made it.
        revision: u64,
    },
    /// Held by another until `expires_at_ms`.
    Held { holder: String, expires_at_ms: u64 },
    /// The asker does not hold the lease with that token (expired, released, another's);
    /// `newest_token` is the lease's newest (0: never granted).
    Lost { newest_token: u64 },
    /// Released, by the write of `revision`.
    Released { revision: u64 },
}

/// The cluster's lease bucket.
#[derive(Clone, Debug)]
pub struct LeaseBucket {
    store: kv::Store,
    name: String,
}

/// Compare-and-set tries of one request before it gives up (each lost to another router's
/// write to the same lease meanwhile).
const CAS_TRIES: usize = 8;

impl Cluster {
    /// The lease bucket, made when missing (file storage, `jetstream.replicas` replicas,
    /// one value per key).
    pub async fn lease_bucket(&self) -> Result<LeaseBucket, Error> {
        let (store, name) = self.bucket("LEASES").await?;
        Ok(LeaseBucket { store, name })
    }
}

impl Cluster {
    /// The key-value bucket `<stream_prefix>_<suffix>`, made when missing (file storage,
    /// `jetstream.replicas` replicas, one value per key), and its name.
    pub(crate) async fn bucket(&self, suffix: &str) -> Result<(kv::Store, String), Error> {
        let name = format!("{}_{suffix}", self.config.stream_prefix);
        let store = match self.js.get_key_value(&name).await {
            Ok(store) => store,
            Err(_) => self
                .js
                .create_key_value(kv::Config {
                    bucket: name.clone(),
                    history: 1,
                    num_replicas: self.config.replicas,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| stream_error(&name, format_args!("making the bucket: {e}")))?,
        };
        Ok((store, name))
    }
}

impl LeaseBucket {
    fn key(swarm: &str, name: &str) -> String {
        format!("{}.{}", swarm_token(swarm), swarm_token(name))
    }

    fn error(&self, detail: impl std::fmt::Display) -> Error {
        stream_error(&self.name, detail)
    }

    /// The lease `name` of `swarm` as the bucket holds it now, read from the bucket's
    /// leader (a replica answering a direct read may lag, and a decision on a stale value
    /// would refuse what is free; the writes are compare-and-set whatever was read).
    pub async fn get(&self, swarm: &str, name: &str) -> Result<Option<LeaseState>, Error> {
        let subject = format!("{}{}", self.store.prefix, Self::key(swarm, name));
        match self
            .store
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => Ok(LeaseState::from_value(&message.payload, message.sequence)),
            Err(error)
                if error.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(error) => {
                Err(self.error(format_args!("reading lease {name:?} of {swarm:?}: {error}")))
            }
        }
    }

    /// Writes `value` where the key's revision is `revision` (0: the key has no value),
    /// returning the new revision, or `None` when another write came first.
    async fn put(&self, value: &LeaseValue, revision: u64) -> Result<Option<u64>, Error> {
        let key = Self::key(&value.swarm, &value.name);
        let bytes = bytes::Bytes::from(serde_json::to_vec(value).expect("a lease encodes"));
        let written = if revision == 0 {
            match self.store.create(&key, bytes).await {
                Ok(revision) => Ok(revision),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return Ok(None)
                }
                Err(error) => Err(error.to_string()),
            }
        } else {
            match self.store.update(&key, bytes, revision).await {
                Ok(revision) => Ok(revision),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    return Ok(None)
                }
                Err(error) => Err(error.to_string()),
            }
        };
        written
            .map(Some)
            .map_err(|e| self.error(format_args!("writing lease {:?}: {e}", value.name)))
    }

    /// Grants the lease to `agent` for `ttl_ms` from `now_ms` when nobody else holds it
    /// (the holder asking again extends its holding, same token).
    pub async fn acquire(
        &self,
        swarm: &str,
        name: &str,
        agent: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<LeaseAnswer, Error> {
        for _ in 0..CAS_TRIES {
            let current = self.get(swarm, name).await?;
            let (token, granted_at_ms, new_token) = match &current {
                Some(state) if state.held(now_ms) && state.value.holder != agent => {
                    return Ok(LeaseAnswer::Held {
                        holder: state.value.holder.clone(),
                        expires_at_ms: state.value.expires_at_ms,
                    })
                }
                Some(state) if state.held(now_ms) => {
                    (state.token, state.value.granted_at_ms, false)
                }
                _ => (0, now_ms, true),
            };
            let value = LeaseValue {
                swarm: swarm.to_owned(),
                name: name.to_owned(),
                holder: agent.to_owned(),
                token,
                granted_at_ms,
                expires_at_ms: now_ms + ttl_ms,
            };
            let revision = current.as_ref().map_or(0, |s| s.revision);
            if let Some(written) = self.put(&value, revision).await? {
                return Ok(LeaseAnswer::Granted {
                    token: if new_token { written } else { token },
                    granted_at_ms,
                    expires_at_ms: value.expires_at_ms,
                    new_token,
                    revision: written,
                });
            }
        }
        Err(self.error(format_args!(
            "lease {name:?} of {swarm:?}: {CAS_TRIES} writes in a row lost to other routers"
        )))
    }

    /// Extends `agent`'s holding of `token` to `ttl_ms` from `now_ms`.
    pub async fn renew(
        &self,
        swarm: &str,
        name: &str,
        agent: &str,
        token: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<LeaseAnswer, Error> {
        for _ in 0..CAS_TRIES {
            let Some(state) = self.get(swarm, name).await? else {
                return Ok(LeaseAnswer::Lost { newest_token: 0 });
            };
            if !state.held(now_ms) || state.value.holder != agent || state.token != token {
                return Ok(LeaseAnswer::Lost {
                    newest_token: state.token,
                });
            }
            let value = LeaseValue {
                token,
                expires_at_ms: now_ms + ttl_ms,
                ..state.value.clone()
            };
            if let Some(revision) = self.put(&value, state.revision).await? {
                return Ok(LeaseAnswer::Granted {
                    token,
                    granted_at_ms: value.granted_at_ms,
                    expires_at_ms: value.expires_at_ms,
                    new_token: false,
                    revision,
                });
            }
        }
        Err(self.error(format_args!(
            "lease {name:?} of {swarm:?}: {CAS_TRIES} writes in a row lost to other routers"
        )))
    }

    /// Ends `agent`'s holding of `token`.
    pub async fn release(
        &self,
        swarm: &str,
        name: &str,
        agent: &str,
        token: u64,
    ) -> Result<LeaseAnswer, Error> {
        for _ in 0..CAS_TRIES {
            let Some(state) = self.get(swarm, name).await? else {
                return Ok(LeaseAnswer::Lost { newest_token: 0 });
            };
            if state.value.holder != agent || state.token != token {
                return Ok(LeaseAnswer::Lost {
                    newest_token: state.token,
                });
            }
            let value = LeaseValue {
                holder: String::new(),
                token,
                expires_at_ms: 0,
                ..state.value.clone()
            };
            if let Some(revision) = self.put(&value, state.revision).await? {
                return Ok(LeaseAnswer::Released { revision });
            }
        }
        Err(self.error(format_args!(
            "lease {name:?} of {swarm:?}: {CAS_TRIES} writes in a row lost to other routers"
        )))
    }

    /// Every lease's value now, then each change as it is written (a watch that fails is
    /// started again after a pause, from the values then), until `seen`, which gets each,
    /// returns false.
    pub async fn follow(&self, mut seen: impl FnMut(LeaseState) -> bool) {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.store.watch_with_history(">").await {
                Ok(mut watch) => {
                    pause = Duration::from_millis(50);
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(entry) => {
                                if let Some(state) = LeaseState::from_entry(&entry) {
                                    if !seen(state) {
                                        return;
                                    }
                                }
                            }
                            Err(error) => {
                                tracing::warn!(bucket = %self.name, %error, "watching the lease bucket; watching again");
                                break;
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(bucket = %self.name, %error, "watching the lease bucket")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}
