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
    match request.uri().path() {
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
        other => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!("no {other:?}: the admin listener serves /metrics, /healthz and /readyz\n"),
        ),
    }
}

/// How long a scrape waits for the shards, all together.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(1);

/// Reads the counters and asks every shard for its histograms, within one deadline (a busy
/// shard's channel can be full): a shard that does not answer in time is reported as it
/// last answered. One scrape at a time.
async fn scrape(state: &AdminState, context: &Context) -> crate::metrics::Scrape {
    let shards: Vec<&ShardSender> = context.shards.iter().chain(&context.job_shards).collect();
    let mut last = state.last.lock().await;
    last.resize(shards.len(), None);
    let mut fresh: Vec<Option<crate::shard::ShardMetrics>> = vec![None; shards.len()];
    let ask = async {
        for (i, shard) in shards.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            if shard.send(ShardCommand::Metrics { reply }).await.is_ok() {
                fresh[i] = answer.await.ok();
            }
        }
    };
    let _ = tokio::time::timeout(SCRAPE_DEADLINE, ask).await;
    let mut durable_lag_us = std::array::from_fn(|_| swarmbus_proto::core::lag_histogram());
    for (kept, fresh) in last.iter_mut().zip(fresh) {
        if fresh.is_some() {
            *kept = fresh;
        }
        if let Some(metrics) = kept {
            crate::metrics::merge(&mut durable_lag_us, &metrics.durable_lag_us);
        }
    }
    crate::metrics::Scrape {
        stats: context.stats.clone(),
        durable_lag_us,
        ready: state.not_ready().is_none(),
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
