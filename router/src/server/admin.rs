//! The admin listener (`admin_listen`): HTTP/1 on loopback TCP, with hyper and no
//! framework. `GET /metrics` (Prometheus), `GET /healthz` (the process serves HTTP),
//! `GET /readyz` (the router takes sessions: its logs recovered, its listeners bound, not
//! shutting down, every internal log available). Bound before recovery starts, so that
//! `/readyz` says "starting" while the router recovers.

use std::sync::atomic::AtomicU8;
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use super::*;

/// Where the router is in its life, for `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    Starting = 0,
    Ready = 1,
    ShuttingDown = 2,
}

/// What the admin listener serves from: the phase, and the context once it exists.
#[derive(Debug)]
pub(super) struct AdminState {
    phase: AtomicU8,
    context: OnceLock<Arc<Context>>,
    /// Each shard's histograms as last answered: a shard that misses a scrape's deadline
    /// is reported as it was, so that no histogram ever goes down.
    last: tokio::sync::Mutex<Vec<Option<crate::shard::ShardMetrics>>>,
}

impl AdminState {
    pub(super) fn new() -> Arc<AdminState> {
        Arc::new(AdminState {
            phase: AtomicU8::new(Phase::Starting as u8),
            context: OnceLock::new(),
            last: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    pub(super) fn set_context(&self, context: &Arc<Context>) {
        let _ = self.context.set(context.clone());
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Why the router is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        match self.phase.load(Ordering::Acquire) {
            0 => return Some("starting: recovering the event log".into()),
            2 => return Some("shutting down".into()),
            _ => {}
        }
        let context = self.context.get()?;
        if context.cluster.as_ref().is_some_and(|c| !c.is_connected()) {
            return Some(
                "not connected to the JetStream cluster: commands and control are refused \
                 once their appends miss jetstream.append_deadline_ms"
                    .into(),
            );
        }
        let unavailable = context
            .stats
            .internal_log_unavailable
            .load(Ordering::Relaxed);
        (unavailable > 0).then(|| {
            format!("{unavailable} of the router's own swarms have no available event log")
        })
    }
}

/// Binds `admin_listen` (none when `off`) and serves it on the current runtime.
pub(super) fn start_admin(
    config: &Config,
    state: &Arc<AdminState>,
) -> Result<Option<(SocketAddr, AbortOnDrop<()>)>, RouterError> {
    let crate::config::AdminListen::At(addr) = config.admin_listen else {
        return Ok(None);
    };
    let bind_error = |source| RouterError::Bind { addr, source };
    let socket = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    let listener = tokio::net::TcpListener::from_std(socket).map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let task = tokio::spawn(serve_admin(listener, state.clone()));
    Ok(Some((addr, AbortOnDrop(task))))
}

/// How long one admin connection may take to send its request.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more wait in the kernel's backlog.
const ADMIN_MAX_CONNECTIONS: usize = 64;

async fn serve_admin(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: try again a little later, not in a loop.
                tracing::warn!(%error, "the admin listener failed to accept");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_READ_TIMEOUT);
            let _ = builder.serve_connection(io, service).await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn answer(
    state: &AdminState,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let path = request.uri().path();
    let gated = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if let (true, Some(context)) = (gated, state.context.get()) {
        if !context.config.admin_metrics_open {
            if let Err(refused) = admitted(context, &request) {
                return *refused;
            }
        }
    }
    match path {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match state.not_ready() {
            None => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        "/metrics" => match state.context.get() {
            Some(context) => {
                let scrape = scrape(state, context).await;
                text(
                    StatusCode::OK,
                    crate::metrics::CONTENT_TYPE,
                    crate::metrics::encode(scrape),
                )
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                "starting: metrics are served once the event log is recovered\n".into(),
            ),
        },
        path if path.starts_with("/v1/") => match state.context.get() {
            Some(context) => view(context, &request, path).await,
            None => json_error(StatusCode::SERVICE_UNAVAILABLE, "starting"),
        },
        other => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "no {other:?}: the admin listener serves /metrics, /healthz, /readyz and the \
                 JSON views under /v1/ (swarms, connections, presence, leases, jobs, \
                 dead-letters)\n"
            ),
        ),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, "application/json", format!("{value}\n"))
}

fn json_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": error }))
}

/// The query's parameters, percent-decoded. Hand-written: a few lines, and the views take
/// only names and numbers (a malformed escape is kept as it is).
fn query(request: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
            match (bytes[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

/// Items a page holds unless `limit` says fewer, and at most.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// Who may read the views: anyone on loopback without credentials (`auth.mode = "none"`);
/// with them, a bearer credential granting `admin` on every swarm (`"*"`). Boxed: the
/// refusal is the large side.
fn admitted(
    context: &Context,
    request: &Request<hyper::body::Incoming>,
) -> Result<(), Box<Response<Full<Bytes>>>> {
    let Some(auth) = context.authenticator() else {
        return Ok(());
    };
    let token = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110).
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    let Some(token) = token else {
        let mut response = json_error(
            StatusCode::UNAUTHORIZED,
            "this router requires credentials: send Authorization: Bearer CREDENTIAL (admin on \"*\")",
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return Err(Box::new(response));
    };
    let identity = auth
        .verify(token.trim())
        .map_err(|refusal| Box::new(json_error(StatusCode::UNAUTHORIZED, &refusal.reason)))?;
    let admin = identity
        .grants
        .get("*")
        .is_some_and(|role| *role == crate::auth::GrantRole::Admin);
    if !admin {
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            &format!(
                "the credential of {:?} does not grant admin on \"*\"",
                identity.agent
            ),
        )));
    }
    Ok(())
}

/// A page of `items` (sorted by `key`) after `after`, at most `limit`, and the key to ask
/// the next page with.
fn page<T: serde::Serialize>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    limit: usize,
    after: &str,
) -> serde_json::Value {
    items.sort_by_key(|item| key(item));
    let start = items.partition_point(|item| key(item).as_str() <= after);
    let rest = items.len() - start;
    let page: Vec<&T> = items[start..].iter().take(limit).collect();
    let next = (rest > limit)
        .then(|| page.last().map(|item| key(item)))
        .flatten();
    serde_json::json!({ "items": page, "next": next })
}

/// The JSON views: `/v1/swarms`, `/v1/connections`, `/v1/presence?swarm=S`, `/v1/leases`, `/v1/jobs`,
/// `/v1/dead-letters?swarm=S`; paged ones take `after` and `limit` and answer
/// `{"items": [...], "next": KEY or null}`.
async fn view(
    context: &Context,
    request: &Request<hyper::body::Incoming>,
    path: &str,
) -> Response<Full<Bytes>> {
    if let Err(refused) = admitted(context, request) {
        return *refused;
    }
    let params = query(request);
    let swarm = params.get("swarm").filter(|s| !s.is_empty()).cloned();
    // A page size or a position that does not parse is refused: taken as the default, a
    // client walking pages could loop back to the start for ever.
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => PAGE_DEFAULT,
        Some(Ok(limit)) if limit >= 1 => limit.min(PAGE_MAX),
        Some(_) => return json_error(StatusCode::BAD_REQUEST, "limit is a number from 1"),
    };
    let after = params.get("after").cloned().unwrap_or_default();
    match (path, swarm) {
        ("/v1/swarms", _) => swarms_view(context, limit, &after).await,
        ("/v1/connections", _) => {
            let after = match after.as_str() {
                "" => 0,
                text => match text.parse::<u64>() {
                    Ok(id) => id,
                    Err(_) => {
                        return json_error(StatusCode::BAD_REQUEST, "after is a connection id")
                    }
                },
            };
            json(StatusCode::OK, &connections_view(context, after, limit))
        }
        ("/v1/presence", Some(swarm)) => {
            // One more than the page, to know whether another follows.
            let mut members = context.control().presence.page(&swarm, &after, limit + 1);
            let more = members.len() > limit;
            members.truncate(limit);
            let next = more
                .then(|| members.last().map(|m| m.agent.clone()))
                .flatten();
            let items: Vec<serde_json::Value> = members
                .into_iter()
                .map(|m| {
                    serde_json::json!({
                        "agent": m.agent,
                        "role": m.role.name(),
                        "last_seen_ms": m.last_seen_ms,
                        "metadata": m.metadata,
                    })
                })
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({ "items": items, "next": next }),
            )
        }
        ("/v1/leases", _) => {
            let now_ms = context.clock.now_ms();
            let holdings = context.control().leases.holdings(now_ms);
            // The pair as JSON: a key no two leases share, whatever their names hold.
            let key = |h: &swarmbus_proto::control::Holding| {
                serde_json::json!([h.swarm, h.name]).to_string()
            };
            json(StatusCode::OK, &page(holdings, key, limit, &after))
        }
        ("/v1/jobs", swarm) => {
            let after = match after.as_str() {
                "" => 0,
                text => match text.parse() {
                    Ok(job) => job,
                    Err(_) => return json_error(StatusCode::BAD_REQUEST, "after is a job id"),
                },
            };
            let (counts, (jobs, more)) = {
                let jobs = context.jobs();
                let page = jobs.list(swarm.as_deref(), swarmbus_schema::JobId(after), limit);
                (jobs.counts(), page)
            };
            let items: Vec<serde_json::Value> = jobs
                .iter()
                .map(|j| {
                    serde_json::json!({
                        "job_id": j.job_id.0,
                        "swarm": j.swarm,
                        "submitter": j.submitter,
                        "state": j.state.name(),
                        "attempt": j.attempt,
                        "priority": j.priority,
                        "model": j.model,
                        "submitted_ms": j.submitted_ms,
                        "lease_expires_ms": j.lease_expires_ms,
                    })
                })
                .collect();
            let next = more
                .then(|| jobs.last().map(|j| j.job_id.0.to_string()))
                .flatten();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "jobs": counts.jobs,
                    "queued": counts.queued,
                    "running": counts.running,
                    "dead_lettered": counts.dead_lettered,
                    "pending_results": counts.pending_results,
                    "leases": counts.leases,
                    "items": items,
                    "next": next,
                }),
            )
        }
        ("/v1/dead-letters", Some(swarm)) => {
            let after = match after.as_str() {
                "" => 0,
                text => match text.parse() {
                    Ok(job) => job,
                    Err(_) => return json_error(StatusCode::BAD_REQUEST, "after is a job id"),
                },
            };
            // The job queue's pages hold at most 256 (MAX_DEAD_LETTERS_PAGE).
            let letters =
                context
                    .jobs()
                    .dead_letters(&swarm, swarmbus_schema::JobId(after), limit as u32);
            let items: Vec<serde_json::Value> = letters
                .jobs
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "job_id": d.job_id.0,
                        "attempts": d.attempts,
                        "idempotency_key": d.idempotency_key,
                        "reason": d.reason,
                    })
                })
                .collect();
            let next = letters
                .more
                .then(|| letters.jobs.last().map(|d| d.job_id.0.to_string()))
                .flatten();
            json(
                StatusCode::OK,
                &serde_json::json!({ "items": items, "next": next }),
            )
        }
        ("/v1/presence" | "/v1/dead-letters", None) => json_error(
            StatusCode::BAD_REQUEST,
            &format!("{} needs ?swarm=NAME", &path[4..]),
        ),
        (other, _) => json_error(StatusCode::NOT_FOUND, &format!("no view {other:?}")),
    }
}

/// `/v1/connections`: the connections being served after id `after`, in id order: who
/// (once its session is established), where from, since when, what it has queued, and its
/// QUIC path. A session's attached bulk connection is a row of its own (listener `bulk`,
/// `bulk_of` naming the session's connection).
fn connections_view(context: &Context, after: u64, limit: usize) -> serde_json::Value {
    // Copied out under the lock, read outside it: connections come and go meanwhile, and
    // a session dropped here must not end under the lock.
    let (page, more, bulk_of) = {
        let live = context.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut rest = live.range(after.saturating_add(1)..);
        let page: Vec<(u64, Tracked)> = rest
            .by_ref()
            .take(limit)
            .map(|(id, tracked)| (*id, tracked.clone()))
            .collect();
        let more = rest.next().is_some();
        let bulk_of: HashMap<usize, u64> = live
            .iter()
            .filter_map(|(id, t)| Some((t.bulk_connection()?.stable_id(), *id)))
            .collect();
        (page, more, bulk_of)
    };
    let mut items = Vec::with_capacity(page.len());
    for (id, tracked) in &page {
        let session = tracked.session.as_ref().and_then(std::sync::Weak::upgrade);
        let path = tracked.connection.stats().path;
        let mut item = serde_json::json!({
            "id": id,
            "remote": tracked.connection.remote_address().to_string(),
            "listener": match tracked.listener {
                Listener::Main => "main",
                Listener::Bulk => "bulk",
            },
            "since_ms": tracked.since_ms,
            "bulk_attached": tracked.bulk_connection().is_some(),
            "bulk_of": bulk_of.get(&tracked.connection.stable_id()),
            "rtt_ms": tracked.connection.rtt().as_secs_f64() * 1e3,
            "sent_packets": path.sent_packets,
            "lost_packets": path.lost_packets,
            "lost_bytes": path.lost_bytes,
            "congestion_events": path.congestion_events,
            "agent": null,
        });
        if let Some(session) = session {
            let mut swarms: Vec<&String> = session.swarms.iter().collect();
            swarms.sort();
            item["agent"] = session.agent.as_ref().into();
            item["role"] = session.role.name().into();
            item["swarms"] = serde_json::json!(swarms);
            item["queued_bytes"] = session.outbox.queued_bytes().into();
        }
        items.push(item);
    }
    let next = more
        .then(|| page.last().map(|(id, _)| id.to_string()))
        .flatten();
    serde_json::json!({ "items": items, "next": next })
}

/// The QUIC figures of every connection ever served: the totals of those that ended and
/// the live ones' (each connection once: a bulk connection is one of its own), with the
/// live ones' round-trip times. The totals and the live set are taken under one lock, so a
/// connection ending meanwhile is counted live and not again.
fn quic_figures(context: &Context) -> crate::metrics::QuicFigures {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (mut figures, live) = {
        let live = context.live.lock().unwrap_or_else(|p| p.into_inner());
        let ended = &context.stats.quic_ended;
        let figures = crate::metrics::QuicFigures {
            sent_packets: get(&ended.sent_packets),
            lost_packets: get(&ended.lost_packets),
            lost_bytes: get(&ended.lost_bytes),
            congestion_events: get(&ended.congestion_events),
            ..Default::default()
        };
        let connections: Vec<Connection> = live.values().map(|t| t.connection.clone()).collect();
        (figures, connections)
    };
    for connection in live {
        let path = connection.stats().path;
        figures.sent_packets += path.sent_packets;
        figures.lost_packets += path.lost_packets;
        figures.lost_bytes += path.lost_bytes;
        figures.congestion_events += path.congestion_events;
        let rtt = connection.rtt().as_secs_f64();
        figures.rtt_sum_s += rtt;
        figures.rtt_max_s = figures.rtt_max_s.max(rtt);
        figures.connections += 1;
    }
    figures
}

/// `/v1/swarms`: every shard asked within one deadline; those that miss it are counted in
/// `missing_shards` (busy), and their swarms left out of the answer.
async fn swarms_view(context: &Context, limit: usize, after: &str) -> Response<Full<Bytes>> {
    let parts = ask_shards(context, |reply| ShardCommand::Swarms { reply }).await;
    let missing = parts.iter().filter(|p| p.is_none()).count();
    let swarms: Vec<swarmbus_proto::core::SwarmSummary> =
        parts.into_iter().flatten().flatten().collect();
    let views: Vec<serde_json::Value> = {
        let control = context.control();
        swarms
            .into_iter()
            .map(|s| {
                let subscribers: serde_json::Map<String, serde_json::Value> = Class::ALL
                    .iter()
                    .map(|c| (c.name().to_owned(), s.subscribers[c.index()].into()))
                    .collect();
                serde_json::json!({
                    "name": s.name,
                    "epoch": s.epoch,
                    "last_op": s.last_op,
                    "durable_op": s.durable_op,
                    "members": control.presence.count(&s.name),
                    "subscribers": subscribers,
                    "paused": s.paused,
                    "unavailable": s.unavailable,
                    "ack_lag_ops": s.ack_lag_ops,
                    "log_bytes": s.log_bytes,
                })
            })
            .collect()
    };
    let key = |v: &serde_json::Value| v["name"].as_str().unwrap_or_default().to_owned();
    let mut answer = page(views, key, limit, after);
    answer["missing_shards"] = missing.into();
    json(StatusCode::OK, &answer)
}

/// How long a scrape or a view waits for the shards, all together.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(1);

/// Asks every shard (the job queue's too) the command `ask` makes with its reply channel,
/// all within [`SCRAPE_DEADLINE`] (a busy shard's channel can be full): each shard's
/// answer, in shard order, or `None` for one that did not answer in time.
async fn ask_shards<T>(
    context: &Context,
    ask: impl Fn(oneshot::Sender<T>) -> ShardCommand,
) -> Vec<Option<T>> {
    let shards: Vec<&ShardSender> = context.shards.iter().chain(&context.job_shards).collect();
    let mut answers: Vec<Option<T>> = shards.iter().map(|_| None).collect();
    // Every shard is asked before any answer is awaited: they answer side by side, and one
    // that misses the deadline loses only its own answer.
    let mut waiting = Vec::with_capacity(shards.len());
    let asking = async {
        for (i, shard) in shards.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            if shard.send(ask(reply)).await.is_ok() {
                waiting.push((i, answer));
            }
        }
        for (i, answer) in &mut waiting {
            answers[*i] = answer.await.ok();
        }
    };
    let _ = tokio::time::timeout(SCRAPE_DEADLINE, asking).await;
    // Past the deadline: what came in meanwhile still counts.
    for (i, mut answer) in waiting {
        if answers[i].is_none() {
            answers[i] = answer.try_recv().ok();
        }
    }
    answers
}

/// Reads the counters and asks every shard for its histograms, within one deadline (a busy
/// shard's channel can be full): a shard that does not answer in time is reported as it
/// last answered. One scrape at a time.
async fn scrape(state: &AdminState, context: &Context) -> crate::metrics::Scrape {
    let mut last = state.last.lock().await;
    let fresh = ask_shards(context, |reply| ShardCommand::Metrics { reply }).await;
    last.resize(fresh.len(), None);
    let mut durable_lag_us = std::array::from_fn(|_| swarmbus_proto::core::lag_histogram());
    let mut ack_lag_us = std::array::from_fn(|_| swarmbus_proto::core::lag_histogram());
    let mut ack_lag_unmeasured = 0;
    for (kept, fresh) in last.iter_mut().zip(fresh) {
        if fresh.is_some() {
            *kept = fresh;
        }
        if let Some(metrics) = kept {
            crate::metrics::merge(&mut durable_lag_us, &metrics.durable_lag_us);
            crate::metrics::merge(&mut ack_lag_us, &metrics.ack_lag_us);
            ack_lag_unmeasured += metrics.ack_lag_unmeasured;
        }
    }
    let now_ms = context.clock.now_ms();
    let (presence_members, leases_held) = {
        let control = context.control();
        (
            control.presence.len(),
            control.leases.holdings(now_ms).len(),
        )
    };
    let (jobs, job_timings) = {
        let jobs = context.jobs();
        (jobs.counts(), jobs.timings().clone())
    };
    crate::metrics::Scrape {
        log: crate::metrics::log_figures(&context.log_metrics),
        stats: context.stats.clone(),
        durable_lag_us,
        ack_lag_us,
        ack_lag_unmeasured,
        delivered_lag_us: context.stats.delivery_lag.merged(),
        quic: quic_figures(context),
        job_timings,
        ready: state.not_ready().is_none(),
        state: crate::metrics::StateCounts {
            presence_members: presence_members as u64,
            leases_held: leases_held as u64,
            jobs_queued: jobs.queued as u64,
            jobs_running: jobs.running as u64,
            jobs_dead_lettered: jobs.dead_lettered as u64,
            jobs_pending_results: jobs.pending_results as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_phase() {
        let state = AdminState::new();
        assert!(state.not_ready().unwrap().starts_with("starting"));
        state.set_phase(Phase::Ready);
        assert_eq!(state.not_ready(), None);
        state.set_phase(Phase::ShuttingDown);
        assert_eq!(state.not_ready().as_deref(), Some("shutting down"));
    }
}
