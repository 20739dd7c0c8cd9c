//! The start-up check that every JetStream server syncs before it acknowledges, read from
//! the servers' HTTP monitoring endpoint (`/varz`: `jetstream.config.sync_always`). NATS
//! gives no other way to learn a server's sync setting without system-account rights.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::Error;

/// How long one server's `/varz` may take.
const VARZ_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses unless every server of `urls` answers that it syncs before acknowledging.
pub(crate) async fn check_synced(urls: &[String]) -> Result<(), Error> {
    if urls.is_empty() {
        return Err(Error::Config(
            "jetstream.monitor_urls is empty: list every server's HTTP monitoring endpoint \
             (http://host:8222) so the router can check that it syncs before acknowledging, \
             or set jetstream.danger_unsynced_acks = true"
                .into(),
        ));
    }
    for url in urls {
        let unsynced = |detail: String| Error::Unsynced {
            url: url.clone(),
            detail,
        };
        let body = tokio::time::timeout(VARZ_TIMEOUT, varz(url))
            .await
            .map_err(|_| unsynced(format!("did not answer /varz within {VARZ_TIMEOUT:?}")))?
            .map_err(|e| unsynced(format!("answered /varz with an error: {e}")))?;
        let varz: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| unsynced(format!("answered /varz with something not JSON: {e}")))?;
        let Some(config) = varz.get("jetstream").and_then(|j| j.get("config")) else {
            return Err(unsynced("does not have JetStream enabled".into()));
        };
        if config.get("sync_always").and_then(|v| v.as_bool()) != Some(true) {
            let interval = config
                .get("sync_interval")
                .and_then(|v| v.as_u64())
                .map_or("the default (2 minutes)".to_string(), |ns| {
                    format!("{} ms", ns / 1_000_000)
                });
            return Err(unsynced(format!(
                "acknowledges before it syncs (sync_interval {interval}): set \
                 `jetstream {{ sync_interval: always }}` in its configuration, or set \
                 jetstream.danger_unsynced_acks = true to accept losing acknowledged commands \
                 on a crash"
            )));
        }
    }
    Ok(())
}

async fn varz(url: &str) -> Result<Bytes, String> {
    let base = url.trim_end_matches('/');
    let uri: hyper::Uri = format!("{base}/varz")
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{url:?}: only http:// monitoring endpoints are supported"
        ));
    }
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(uri.path())
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body.to_bytes())
}
