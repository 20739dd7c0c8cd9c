//! The control plane: the session's lease, safety, presence and configuration requests
//! (methods of [`crate::Client`]), and helpers for applications: fencing (a stale leader
//! cannot act) and a swarm's versioned configuration document.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use swarmbus_schema::{Class, Deliver, LeaseGrant, OpId};

// The session methods of this plane (`impl Client` below) use the crate root's types.
use super::*;

/// The lease a fencing token belongs to when a publish names none.
pub const DEFAULT_LEASE: &str = "leader";

/// The key prefix of configuration entries on a swarm's control class.
pub const CONFIG_PREFIX: &str = "config/";

/// Drops commands stamped with a fencing token older than the newest one seen for the same
/// swarm and lease, so a leader that lost its lease (paused, cut off) cannot act through
/// agents even if the router sequenced its command before it heard of the new grant.
///
/// Feed it every delivery before acting on it ([`FencingFilter::admit`]); grants the
/// application sees ([`FencingFilter::observe_grant`]) count too. Unstamped messages
/// always pass.
#[derive(Clone, Debug, Default)]
pub struct FencingFilter {
    newest: HashMap<(String, String), u64>,
    rejected: u64,
}

impl FencingFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `delivery` may be acted on; records its token when it is the newest.
    pub fn admit(&mut self, delivery: &Deliver) -> bool {
        if delivery.fencing_token == 0 {
            return true;
        }
        let lease = delivery.lease.as_deref().unwrap_or(DEFAULT_LEASE);
        self.admit_token(&delivery.swarm, lease, delivery.fencing_token)
    }

    /// The same for a token seen elsewhere (e.g. a command's own field).
    pub fn admit_token(&mut self, swarm: &str, lease: &str, token: u64) -> bool {
        let newest = self
            .newest
            .entry((swarm.to_owned(), lease.to_owned()))
            .or_default();
        if token < *newest {
            self.rejected += 1;
            return false;
        }
        *newest = token;
        true
    }

    /// A lease grant seen by the application: its token is the newest at least.
    pub fn observe_grant(&mut self, grant: &LeaseGrant) {
        let newest = self
            .newest
            .entry((grant.swarm.clone(), grant.name.clone()))
            .or_default();
        *newest = (*newest).max(grant.token);
    }

    /// The newest token seen for `lease` of `swarm` (0: none).
    pub fn newest(&self, swarm: &str, lease: &str) -> u64 {
        self.newest
            .get(&(swarm.to_owned(), lease.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Messages dropped as stale so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}

/// A swarm's configuration document as an agent sees it: entries are control-class ops
/// keyed `config/<name>` (published by controllers with [`crate::Client::set_config`]); the
/// version is the op id of the newest entry applied. An empty value removes the entry.
///
/// An agent subscribed to the control class gets the retained history on its first join
/// (resume from nothing: compacted to the latest op per key past the log's hot part, so it
/// ends at the current version) and, resuming with its resume point, only the changes after
/// it.
#[derive(Clone, Debug)]
pub struct ConfigView {
    swarm: String,
    values: BTreeMap<String, Bytes>,
    version: OpId,
    /// The epoch of the log the version is in; a new epoch starts the document afresh.
    epoch: Option<swarmbus_schema::Epoch>,
}

impl ConfigView {
    pub fn new(swarm: impl Into<String>) -> Self {
        ConfigView {
            swarm: swarm.into(),
            values: BTreeMap::new(),
            version: OpId::NONE,
            epoch: None,
        }
    }

    /// Applies `delivery` if it is a newer configuration op of this swarm; returns whether
    /// it changed the document.
    pub fn apply(&mut self, delivery: &Deliver) -> bool {
        if delivery.swarm != self.swarm || delivery.class != Class::Control {
            return false;
        }
        if self.epoch.is_some_and(|epoch| epoch != delivery.epoch) {
            // The swarm's log was lost or recreated: op ids start again, and the router
            // resends the new epoch's ops from the start.
            self.values.clear();
            self.version = OpId::NONE;
        }
        self.epoch = Some(delivery.epoch);
        if delivery.op_id <= self.version {
            return false;
        }
        let Some(name) = delivery
            .key
            .as_deref()
            .and_then(|key| key.strip_prefix(CONFIG_PREFIX))
        else {
            return false;
        };
        self.version = delivery.op_id;
        if delivery.payload.is_empty() {
            self.values.remove(name);
        } else {
            self.values
                .insert(name.to_owned(), delivery.payload.clone());
        }
        true
    }

    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.values.get(name)
    }

    /// The op id of the newest configuration op applied.
    pub fn version(&self) -> OpId {
        self.version
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl Client {
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

    pub(super) async fn lease(&self, request: LeaseRequest) -> Result<ReplyValue, ClientError> {
        self.request(|request_id| {
            Message::LeaseRequest(LeaseRequest {
                request_id,
                ..request
            })
        })
        .await
    }

    pub(super) fn expect_grant(value: ReplyValue) -> Result<LeaseGrant, ClientError> {
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

    /// Shows the router a fresh credential for this session (the same agent id) before the
    /// current one expires: the session goes on under the new one. Refused with
    /// `Unauthenticated` (invalid) or `Forbidden` (it no longer grants the session's swarms
    /// and role); the session then keeps the credential it had, until that expires.
    pub async fn refresh_credential(&self, token: &str) -> Result<(), ClientError> {
        // The router cannot decode a longer (or empty) one, and would end the session.
        if token.is_empty() || token.len() > swarmbus_schema::MAX_CREDENTIAL_BYTES {
            return Err(ClientError::InvalidArgument {
                detail: format!(
                    "a credential is 1 to {} bytes",
                    swarmbus_schema::MAX_CREDENTIAL_BYTES
                ),
            });
        }
        self.request(|request_id| Message::Authenticate {
            request_id,
            credential: swarmbus_schema::Token(token.to_owned()),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmbus_schema::Epoch;

    fn deliver(op: u64, key: Option<&str>, token: u64, payload: &'static [u8]) -> Deliver {
        Deliver {
            swarm: "s".into(),
            class: Class::Control,
            op_id: OpId(op),
            epoch: Epoch(1),
            source_agent: "ctl".into(),
            target_agent: None,
            key: key.map(str::to_owned),
            payload: Bytes::from_static(payload),
            fencing_token: token,
            lease: None,
            published_us: 0,
        }
    }

    #[test]
    fn stale_tokens_are_dropped_once_a_newer_one_was_seen() {
        let mut filter = FencingFilter::new();
        assert!(filter.admit(&deliver(1, None, 0, b"unstamped")));
        assert!(filter.admit(&deliver(2, None, 3, b"leader 3")));
        assert!(filter.admit(&deliver(3, None, 3, b"leader 3 again")));
        assert!(filter.admit(&deliver(4, None, 4, b"leader 4")));
        assert!(!filter.admit(&deliver(5, None, 3, b"late leader 3")));
        assert_eq!(filter.rejected(), 1);
        // Another lease of the same swarm is tracked on its own.
        let mut other = deliver(6, None, 1, b"other lease");
        other.lease = Some("scheduler".into());
        assert!(filter.admit(&other));
        // A grant seen directly counts too.
        filter.observe_grant(&LeaseGrant {
            swarm: "s".into(),
            name: DEFAULT_LEASE.into(),
            token: 9,
            ..LeaseGrant::default()
        });
        assert!(!filter.admit(&deliver(7, None, 8, b"too old")));
        assert_eq!(filter.newest("s", DEFAULT_LEASE), 9);
    }

    #[test]
    fn the_config_view_applies_newer_entries_only() {
        let mut view = ConfigView::new("s");
        assert!(view.apply(&deliver(1, Some("config/model"), 0, b"llama")));
        assert!(view.apply(&deliver(2, Some("config/temp"), 0, b"0.7")));
        assert!(
            !view.apply(&deliver(3, Some("other"), 0, b"x")),
            "not config"
        );
        assert!(
            !view.apply(&deliver(2, Some("config/model"), 0, b"old")),
            "replayed"
        );
        assert!(
            view.apply(&deliver(4, Some("config/temp"), 0, b"")),
            "removed"
        );
        assert_eq!(view.get("model").unwrap().as_ref(), b"llama");
        assert!(view.get("temp").is_none());
        assert_eq!(view.version(), OpId(4));
    }
}
