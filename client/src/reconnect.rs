//! Automatic reconnection: a session that outlives its connections.
//!
//! [`ResilientClient`] keeps one session with the router alive: when the connection ends
//! (router restart, network blip, `Lagging`), it reconnects with exponential backoff and
//! full jitter (never sooner than a refusal's `retry_after_ms`), resumes every ordered class
//! from the last op it handed to the application (so nothing is lost or sent twice across
//! the gap), and subscribes again to everything the application subscribed to. Deliveries
//! from every connection arrive on one [`Deliveries`] stream.
//!
//! Given several routers of one cluster ([`Connector::connect_resilient_cluster`]), it tries
//! them in turn: each failed attempt moves to the next, and a lost connection resumes on
//! the router after the one lost (op ids are the cluster's, so a resume point is good on
//! any of them).
//!
//! Jitter matters here most of all: when a router restarts, every client notices at the same
//! moment, and without jitter they all come back in lock-step waves. So a reconnection
//! waits a jittered backoff before its first attempt as well.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use swarmbus_schema::{Class, OpId};
use tokio::sync::watch;

use crate::{
    Backoff, Client, ClientError, Connector, Deliveries, DeliverySink, IdempotentApply,
    PublishOptions, RetryPolicy, Session,
};

/// What happened to a [`ResilientClient`]'s connection, for logs and measurements.
#[derive(Clone, Debug)]
pub enum ReconnectEvent {
    /// A connection attempt starts (the first connection's attempts included).
    Attempt { at: Instant, attempt: u32 },
    /// An attempt failed; the next one comes after `wait`.
    AttemptFailed {
        at: Instant,
        error: ClientError,
        wait: Duration,
    },
    /// Connected, and every subscription of the session is registered again.
    Resubscribed { at: Instant, subscriptions: usize },
    /// The connection ended; reconnection starts.
    Disconnected { at: Instant, error: ClientError },
    /// Reconnection stopped for good (an error retrying cannot fix, or the attempts ran out);
    /// the deliveries stream ends.
    GaveUp { at: Instant, error: ClientError },
}

/// Called with every [`ReconnectEvent`]; keep it short (it runs on the reconnecting task).
pub type EventHook = Arc<dyn Fn(&ReconnectEvent) + Send + Sync>;

/// How a [`ResilientClient`] reconnects.
#[derive(Clone)]
pub struct ReconnectOptions {
    /// Waits between attempts: `base` doubling up to `cap`, full jitter unless
    /// `policy.jitter` is off; `max_attempts` per outage (the default never gives up).
    pub policy: RetryPolicy,
    /// Seed of the jitter; `None` seeds from the clock.
    pub seed: Option<u64>,
    pub on_event: Option<EventHook>,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            policy: RetryPolicy {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(10),
                max_attempts: u32::MAX,
                jitter: true,
            },
            seed: None,
            on_event: None,
        }
    }
}

impl std::fmt::Debug for ReconnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectOptions")
            .field("policy", &self.policy)
            .field("seed", &self.seed)
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

type SubscriptionKey = (String, Class, Option<String>);

struct Inner {
    connector: Connector,
    /// The routers to connect to, tried in turn from `next_router` (not empty).
    routers: Vec<SocketAddr>,
    /// Index into `routers` of the router of the live connection, or of the next attempt.
    next_router: AtomicUsize,
    options: ReconnectOptions,
    /// The live connection's client; `None` while reconnecting or after giving up.
    current: watch::Sender<Option<Client>>,
    /// What the application subscribed to, re-registered on every new connection.
    subscriptions: Mutex<Vec<SubscriptionKey>>,
    /// Why reconnection stopped, once it has.
    gave_up: Mutex<Option<ClientError>>,
    closed: AtomicBool,
    reconnects: AtomicU64,
    attempts: AtomicU64,
    /// The application's delivery channels, which every connection feeds; taken on close
    /// so the application's `Deliveries` end.
    sink: Mutex<Option<DeliverySink>>,
}

impl Inner {
    fn emit(&self, event: ReconnectEvent) {
        if let Some(hook) = &self.options.on_event {
            hook(&event);
        }
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, Vec<SubscriptionKey>> {
        self.subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn router(&self) -> SocketAddr {
        self.routers[self.next_router.load(Ordering::Relaxed) % self.routers.len()]
    }

    /// The next attempt goes to the router after the current one.
    fn rotate(&self) {
        if self.routers.len() > 1 {
            self.next_router.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn backoff(&self) -> Backoff {
        match self.options.seed {
            Some(seed) => Backoff::new(
                self.options.policy.clone(),
                seed ^ self.attempts.load(Ordering::Relaxed),
            ),
            None => Backoff::from_clock(self.options.policy.clone()),
        }
    }

    /// Connects and subscribes again, retrying with backoff until it works, an error that
    /// retrying cannot fix comes, or the attempts of this outage are used up. A
    /// reconnection (`after_loss`) waits one backoff before its first attempt too: every
    /// client of a restarting router loses its connection at the same moment, and only
    /// that first jittered wait keeps them from all coming back in the same instant.
    async fn establish(&self, session: &Session, after_loss: bool) -> Result<Client, ClientError> {
        let mut backoff = self.backoff();
        if after_loss {
            if let Some(wait) = backoff.next_wait(Duration::ZERO) {
                tokio::time::sleep(wait).await;
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.attempts.fetch_add(1, Ordering::Relaxed);
            self.emit(ReconnectEvent::Attempt {
                at: Instant::now(),
                attempt,
            });
            let sink = self
                .sink
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
                .ok_or_else(|| ClientError::Closed {
                    code: Some(0),
                    reason: "client closed".into(),
                })?;
            let error = match self
                .connector
                .connect_into(self.router(), session.clone(), sink)
                .await
            {
                Ok(client) => match self.resubscribe(&client).await {
                    Ok(count) => {
                        self.emit(ReconnectEvent::Resubscribed {
                            at: Instant::now(),
                            subscriptions: count,
                        });
                        return Ok(client);
                    }
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if !error.is_transient() || self.closed.load(Ordering::Acquire) {
                return Err(error);
            }
            self.rotate();
            let floor = Duration::from_millis(u64::from(error.retry_after_ms()));
            let Some(wait) = backoff.next_wait(floor) else {
                return Err(error);
            };
            self.emit(ReconnectEvent::AttemptFailed {
                at: Instant::now(),
                error,
                wait,
            });
            tokio::time::sleep(wait).await;
        }
    }

    async fn resubscribe(&self, client: &Client) -> Result<usize, ClientError> {
        let subscriptions = self.subscriptions().clone();
        for (swarm, class, from) in &subscriptions {
            client.subscribe(swarm, *class, from.as_deref()).await?;
        }
        Ok(subscriptions.len())
    }
}

/// A session that reconnects by itself. Cheap to clone; the session ends when the last
/// clone is dropped or on [`ResilientClient::close`].
///
/// Publishing during an outage: [`ResilientClient::publish`] waits for the next
/// connection; a publish whose connection dropped before its acknowledgement fails with
/// `Closed` and may or may not have been sequenced: retry it
/// ([`ResilientClient::publish_with_retry`]) only if applying it twice is harmless (give it a
/// `key`, or make the payload idempotent).
#[derive(Clone)]
pub struct ResilientClient {
    inner: Arc<Inner>,
    _owner: Arc<Closer>,
}

impl std::fmt::Debug for ResilientClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilientClient")
            .field("router", &self.inner.router())
            .field("connected", &self.current().is_some())
            .field("reconnects", &self.reconnects())
            .finish()
    }
}

/// Closes the session when the last clone of the client goes.
struct Closer {
    inner: Arc<Inner>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        close(&self.inner);
    }
}

fn close(inner: &Inner) {
    inner.closed.store(true, Ordering::Release);
    // Dropping the sink lets the application's deliveries end once the connection's
    // readers are done.
    inner
        .sink
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    inner.current.send_modify(|current| {
        if let Some(client) = current.take() {
            client.close();
        }
    });
}

impl Connector {
    /// Connects a session that reconnects by itself (see [`ResilientClient`]). Returns once
    /// the first connection is up, retrying it like any later one; fails with the error of
    /// the last attempt when reconnection gives up.
    pub async fn connect_resilient(
        &self,
        router: SocketAddr,
        session: Session,
        options: ReconnectOptions,
    ) -> Result<(ResilientClient, Deliveries), ClientError> {
        self.connect_resilient_cluster(&[router], session, options)
            .await
    }

    /// Like [`Connector::connect_resilient`], over several routers of one cluster (routers
    /// sharing their swarms' logs on NATS JetStream): the first connection goes to
    /// `routers[0]`, each failed attempt moves to the next router, and a lost connection
    /// resumes on the router after the one lost. The backoff is per outage, not per
    /// router. Fails with `InvalidArgument` for an empty list.
    pub async fn connect_resilient_cluster(
        &self,
        routers: &[SocketAddr],
        session: Session,
        options: ReconnectOptions,
    ) -> Result<(ResilientClient, Deliveries), ClientError> {
        if routers.is_empty() {
            return Err(ClientError::InvalidArgument {
                detail: "connect_resilient_cluster needs at least one router".into(),
            });
        }
        let (current, _) = watch::channel(None);
        let (mut sink, deliveries) = Deliveries::channels(session.delivery_buffer);
        // Where the application stands in every ordered class: a new connection resumes
        // after the last op handed over.
        let handed_over = Arc::new(Mutex::new(IdempotentApply::restore(
            session
                .resume
                .iter()
                .map(|p| (p.swarm.clone(), p.class, p.epoch, p.last_applied)),
        )));
        sink.handed_over = Some(handed_over.clone());
        let inner = Arc::new(Inner {
            connector: self.clone(),
            routers: routers.to_vec(),
            next_router: AtomicUsize::new(0),
            options,
            current,
            subscriptions: Mutex::new(Vec::new()),
            gave_up: Mutex::new(None),
            closed: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            sink: Mutex::new(Some(sink)),
        });
        let client = match inner.establish(&session, false).await {
            Ok(client) => client,
            Err(error) => {
                close(&inner);
                return Err(error);
            }
        };
        inner.current.send_replace(Some(client.clone()));
        tokio::spawn(supervise(inner.clone(), session, client, handed_over));
        Ok((
            ResilientClient {
                _owner: Arc::new(Closer {
                    inner: inner.clone(),
                }),
                inner,
            },
            deliveries,
        ))
    }
}

/// Waits for the connection to end, then reconnects (resuming after the last ordered op
/// handed to the application); repeats until closed or reconnection gives up. Every
/// connection feeds the application's delivery channels directly.
async fn supervise(
    inner: Arc<Inner>,
    mut session: Session,
    mut client: Client,
    handed_over: Arc<Mutex<IdempotentApply>>,
) {
    loop {
        let error = client.closed().await;
        drop(client);
        inner.current.send_replace(None);
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.emit(ReconnectEvent::Disconnected {
            at: Instant::now(),
            error,
        });
        // The router lost may be gone: resume on the next one.
        inner.rotate();
        session.resume = handed_over
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .resume_points()
            .into_iter()
            .filter(|p| session.swarms.contains(&p.swarm))
            .collect();
        match inner.establish(&session, true).await {
            Ok(next) => {
                // Installed under the watch's lock, checking `closed` there: a concurrent
                // close either finds this client (and closes it) or is seen here.
                let mut installed = false;
                inner.current.send_modify(|current| {
                    if !inner.closed.load(Ordering::Acquire) {
                        *current = Some(next.clone());
                        installed = true;
                    }
                });
                if !installed {
                    next.close();
                    return;
                }
                inner.reconnects.fetch_add(1, Ordering::Relaxed);
                client = next;
            }
            Err(error) => {
                inner.emit(ReconnectEvent::GaveUp {
                    at: Instant::now(),
                    error: error.clone(),
                });
                *inner
                    .gave_up
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
                close(&inner);
                // Wakes whoever waits in `client()`.
                inner.current.send_replace(None);
                return;
            }
        }
    }
}

impl ResilientClient {
    /// The router of the live connection (while reconnecting: of the next attempt).
    pub fn router(&self) -> SocketAddr {
        self.inner.router()
    }

    /// The live connection's client, or `None` while reconnecting.
    pub fn current(&self) -> Option<Client> {
        self.inner.current.borrow().clone()
    }

    /// The live connection's client, waiting for a reconnection when there is none. Fails
    /// once the session is closed or reconnection gave up.
    pub async fn client(&self) -> Result<Client, ClientError> {
        let mut watcher = self.inner.current.subscribe();
        loop {
            if let Some(error) = self
                .inner
                .gave_up
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
            {
                return Err(error);
            }
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed {
                    code: Some(0),
                    reason: "client closed".into(),
                });
            }
            if let Some(client) = watcher.borrow_and_update().clone() {
                return Ok(client);
            }
            if watcher.changed().await.is_err() {
                return Err(ClientError::Closed {
                    code: None,
                    reason: "client dropped".into(),
                });
            }
        }
    }

    /// Subscribes now and on every future connection.
    pub async fn subscribe(
        &self,
        swarm: &str,
        class: Class,
        from_agent: Option<&str>,
    ) -> Result<(), ClientError> {
        let key = (swarm.to_owned(), class, from_agent.map(str::to_owned));
        // Recorded first, so a reconnection meanwhile subscribes again too.
        let added = {
            let mut subscriptions = self.inner.subscriptions();
            let added = !subscriptions.contains(&key);
            if added {
                subscriptions.push(key.clone());
            }
            added
        };
        let result = match self.client().await {
            Ok(client) => client.subscribe(swarm, class, from_agent).await,
            Err(error) => Err(error),
        };
        if let Err(error @ ClientError::Refused { .. }) = &result {
            // Refused (not joined, too many): not a subscription to keep.
            if added {
                self.inner.subscriptions().retain(|held| *held != key);
            }
            return Err(error.clone());
        }
        result
    }

    /// Unsubscribes now and on every future connection.
    pub async fn unsubscribe(
        &self,
        swarm: &str,
        class: Class,
        from_agent: Option<&str>,
    ) -> Result<(), ClientError> {
        let key = (swarm.to_owned(), class, from_agent.map(str::to_owned));
        self.inner.subscriptions().retain(|held| *held != key);
        self.client()
            .await?
            .unsubscribe(swarm, class, from_agent)
            .await
    }

    /// Publishes once on the live connection, waiting for one during an outage.
    pub async fn publish(
        &self,
        swarm: &str,
        class: Class,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<OpId, ClientError> {
        self.client()
            .await?
            .publish(swarm, class, payload, options)
            .await
    }

    /// Publishes, retrying (with backoff and full jitter, never sooner than a refusal's
    /// `retry_after_ms`) refusals that say "not now" and lost connections. A retried publish
    /// may be sequenced twice if its connection dropped after the router took it: use this
    /// for messages that are safe to apply twice.
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
            let error = match self
                .publish(swarm, class, payload.clone(), options.clone())
                .await
            {
                Ok(op) => return Ok(op),
                Err(error) => error,
            };
            let retry = match &error {
                ClientError::Refused { code, .. } => crate::retry::RETRIED_REFUSALS.contains(code),
                ClientError::Closed { .. } | ClientError::Timeout { .. } => {
                    !self.inner.closed.load(Ordering::Acquire)
                }
                _ => false,
            };
            if !retry {
                return Err(error);
            }
            let floor = Duration::from_millis(u64::from(error.retry_after_ms()));
            match backoff.next_wait(floor) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(error),
            }
        }
    }

    /// Acknowledges `op_id` on the live connection (after a reconnection the router resumes
    /// from the last op handed to the application, so a lost acknowledgement costs nothing).
    pub async fn ack(&self, swarm: &str, class: Class, op_id: OpId) -> Result<(), ClientError> {
        self.client().await?.ack(swarm, class, op_id).await
    }

    /// Connections made after the first one.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Connection attempts in all, the first connection's included.
    pub fn connection_attempts(&self) -> u64 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// Ends the session: closes the connection, stops reconnecting, ends the deliveries.
    pub fn close(&self) {
        close(&self.inner);
    }
}
