//! The admin listener: `/metrics` parsed as Prometheus parses it and moving with traffic,
//! `/healthz`, and `/readyz` through a shutdown and an unavailable internal log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use swarmbus_client::PublishOptions;
use swarmbus_router::config::AdminListen;
use swarmbus_schema::{Class, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{start_router, TestRouter};

/// `GET path` on the admin listener: the status code and the body.
pub(crate) async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    get_as(admin, path, None).await
}

/// [`get`], with `Authorization: Bearer token` when there is one.
async fn get_as(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the admin listener answers")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// Publishes `n` commands to `swarm`, each acknowledged.
async fn commands(client: &swarmbus_client::Client, swarm: &str, n: usize) {
    for _ in 0..n {
        client
            .publish(
                swarm,
                Class::Command,
                Bytes::from_static(b"x"),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
}

async fn with_admin() -> (TestRouter, SocketAddr) {
    let t =
        start_router(|c| c.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap())).await;
    let admin = t.router.admin_addr().expect("an admin listener");
    (t, admin)
}

/// The samples of a scrape, parsed by `prometheus-parse`: name and labels -> value.
struct Samples {
    samples: Vec<prometheus_parse::Sample>,
    types: HashMap<String, String>,
}

impl Samples {
    async fn scrape(admin: SocketAddr) -> Samples {
        let (status, body) = get(admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.ends_with("# EOF\n"),
            "OpenMetrics text ends with # EOF"
        );
        let lines = body.lines().map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
        let types = body
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
            .collect();
        Samples {
            samples: scrape.samples,
            types,
        }
    }

    /// The value of `metric` with `labels` (a counter, a gauge, or one histogram series).
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = self
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {metric} {labels:?}"));
        match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            other => panic!("{metric}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_and_move_with_traffic() {
    let (t, admin) = with_admin().await;
    let before = Samples::scrape(admin).await;
    // Every family is there from the start, with its type.
    for (family, kind) in [
        ("swarmbus_sessions", "gauge"),
        ("swarmbus_published", "counter"),
        ("swarmbus_delivered", "counter"),
        ("swarmbus_rate_limited", "counter"),
        ("swarmbus_breaker_refusals", "counter"),
        ("swarmbus_telemetry_shed", "counter"),
        ("swarmbus_catch_ups", "counter"),
        ("swarmbus_breaker_transitions", "counter"),
        ("swarmbus_queued_bytes", "gauge"),
        ("swarmbus_governor_intake_per_second", "gauge"),
        ("swarmbus_log_unavailable_swarms", "gauge"),
        ("swarmbus_internal_log_unavailable_swarms", "gauge"),
        ("swarmbus_ready", "gauge"),
        ("swarmbus_presence_members", "gauge"),
        ("swarmbus_leases_held", "gauge"),
        ("swarmbus_jobs", "gauge"),
        ("swarmbus_lease_grants", "counter"),
        ("swarmbus_lease_refusals", "counter"),
        ("swarmbus_presence_leaves", "counter"),
        ("swarmbus_log_appended_bytes", "counter"),
        ("swarmbus_log_commit_seconds", "histogram"),
        ("swarmbus_log_batch_appends", "histogram"),
        ("swarmbus_event_lag_durable_seconds", "histogram"),
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    assert_eq!(before.value("swarmbus_ready", &[]), 1.0);
    let (controller, _c) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut deliveries) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    commands(&controller, "s", 5).await;
    for _ in 0..5 {
        deliveries.recv().await.unwrap();
    }
    // A lease granted, and refused to another holder.
    let ttl = Duration::from_secs(30);
    controller.acquire_lease("s", "leader", ttl).await.unwrap();
    agent.acquire_lease("s", "leader", ttl).await.unwrap_err();
    let after = Samples::scrape(admin).await;
    let command = [("class", "command")];
    assert_eq!(after.value("swarmbus_sessions", &[("role", "agent")]), 1.0);
    assert_eq!(after.value("swarmbus_presence_members", &[]), 2.0);
    assert_eq!(after.value("swarmbus_jobs", &[("state", "queued")]), 0.0);
    assert_eq!(
        after.value("swarmbus_sessions", &[("role", "controller")]),
        1.0
    );
    let moved = |metric: &str, labels: &[(&str, &str)]| {
        after.value(metric, labels) - before.value(metric, labels)
    };
    assert_eq!(moved("swarmbus_published_total", &command), 5.0);
    assert_eq!(moved("swarmbus_lease_grants_total", &[]), 1.0);
    assert_eq!(moved("swarmbus_lease_refusals_total", &[]), 1.0);
    assert_eq!(after.value("swarmbus_leases_held", &[]), 1.0);
    // The five commands went to the log: at least their bytes, in group commits (the
    // router's own records, such as the lease's, may share them).
    assert!(moved("swarmbus_log_appended_bytes_total", &[]) >= 5.0 * 20.0);
    let commits = moved("swarmbus_log_commit_seconds_count", &[]);
    assert!(commits >= 1.0, "{commits} commits");
    assert!(moved("swarmbus_log_batch_appends_sum", &[]) >= 5.0);
    assert_eq!(moved("swarmbus_delivered_total", &command), 5.0);
    assert_eq!(
        moved("swarmbus_published_total", &[("class", "telemetry")]),
        0.0
    );
    assert_eq!(
        moved("swarmbus_event_lag_durable_seconds_count", &command),
        5.0
    );
    assert!(after.value("swarmbus_event_lag_durable_seconds_sum", &command) > 0.0);
    // Two sessions, each with its bulk connection.
    assert_eq!(moved("swarmbus_connections_accepted_total", &[]), 4.0);
    // The agent leaves: its role's gauge goes back.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = Samples::scrape(admin).await;
        if now.value("swarmbus_sessions", &[("role", "agent")]) == 0.0 {
            let leaves = now.value("swarmbus_presence_leaves_total", &[("reason", "closed")]);
            assert_eq!(leaves, 1.0, "the agent left, closed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's session is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scrapes until `done` holds for the samples (acks and lane writes are counted a moment
/// after the client saw their effect), failing after ten seconds.
async fn scrape_until(admin: SocketAddr, done: impl Fn(&Samples) -> bool) -> Samples {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = Samples::scrape(admin).await;
        if done(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "the metrics never got there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn event_lag_jobs_and_quic_families_move_with_traffic() {
    let (t, admin) = with_admin().await;
    let before = Samples::scrape(admin).await;
    for (family, kind) in [
        ("swarmbus_event_lag_delivered_seconds", "histogram"),
        ("swarmbus_event_lag_ack_seconds", "histogram"),
        ("swarmbus_event_lag_ack_unmeasured", "counter"),
        ("swarmbus_log_fsync_seconds", "histogram"),
        ("swarmbus_redeliveries", "counter"),
        ("swarmbus_job_queue_wait_seconds", "histogram"),
        ("swarmbus_job_run_seconds", "histogram"),
        ("swarmbus_job_redeliveries", "counter"),
        ("swarmbus_jobs_dead_lettered", "counter"),
        ("swarmbus_quic_sent_packets", "counter"),
        ("swarmbus_quic_lost_packets", "counter"),
        ("swarmbus_quic_lost_bytes", "counter"),
        ("swarmbus_quic_congestion_events", "counter"),
        ("swarmbus_quic_rtt_mean_seconds", "gauge"),
        ("swarmbus_quic_rtt_max_seconds", "gauge"),
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    let command = [("class", "command")];
    let (controller, _c) = t.connect("ctl", Role::Controller, &["s"]).await;
    let (agent, mut deliveries) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    commands(&controller, "s", 3).await;
    let mut last = None;
    for _ in 0..3 {
        last = deliveries.recv().await;
    }
    // A slow subscriber: it acknowledges a good while after the commands were published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let op = last.expect("three deliveries").op_id;
    agent.ack("s", Class::Command, op).await.unwrap();
    // A job, leased to a worker and finished.
    let (worker, _w) = t.connect("gpu", Role::Worker, &["s"]).await;
    let mut events = worker.job_events().unwrap();
    worker.set_job_credits(1).await.unwrap();
    agent
        .submit_job(swarmbus_schema::SubmitJob {
            swarm: "s".into(),
            idempotency_key: "k".into(),
            payload: Bytes::from_static(b"work"),
            ..Default::default()
        })
        .await
        .unwrap();
    let lease = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(swarmbus_client::JobEvent::Lease(lease))) => break lease,
            Ok(Some(_)) => continue,
            other => panic!("no lease: {other:?}"),
        }
    };
    worker
        .finish_job(lease.job_id, lease.attempt, true, false, Bytes::new())
        .await
        .unwrap();
    let count = |s: &Samples, metric: &str, labels: &[(&str, &str)]| {
        s.value(metric, labels) - before.value(metric, labels)
    };
    let after = scrape_until(admin, |s| {
        count(s, "swarmbus_event_lag_ack_seconds_count", &command) >= 1.0
            && count(s, "swarmbus_event_lag_delivered_seconds_count", &command) >= 3.0
            && count(s, "swarmbus_job_run_seconds_count", &[]) >= 1.0
    })
    .await;
    // One cumulative ack: one sample, of at least the 300 ms the subscriber took.
    assert_eq!(
        count(&after, "swarmbus_event_lag_ack_seconds_count", &command),
        1.0
    );
    let ack_lag = after.value("swarmbus_event_lag_ack_seconds_sum", &command);
    assert!(ack_lag >= 0.3, "{ack_lag} s");
    // Each live delivery written to the agent's stream once.
    assert_eq!(
        count(
            &after,
            "swarmbus_event_lag_delivered_seconds_count",
            &command
        ),
        3.0
    );
    assert_eq!(
        count(
            &after,
            "swarmbus_event_lag_delivered_seconds_count",
            &[("class", "control")]
        ),
        0.0
    );
    // Paused, then resumed: the subscriber catches up from the log, which is not a live
    // delivery; a command targeted at another agent is never sent to it.
    controller.pause("s").await.unwrap();
    commands(&controller, "s", 2).await;
    controller.resume("s").await.unwrap();
    let mut caught_up = None;
    for _ in 0..2 {
        caught_up = deliveries.recv().await;
    }
    let elsewhere = PublishOptions {
        target_agent: Some("someone-else".into()),
        ..PublishOptions::default()
    };
    controller
        .publish("s", Class::Command, Bytes::from_static(b"y"), elsewhere)
        .await
        .unwrap();
    agent
        .ack("s", Class::Command, caught_up.expect("two caught up").op_id)
        .await
        .unwrap();
    let after = scrape_until(admin, |s| {
        count(s, "swarmbus_event_lag_ack_seconds_count", &command) >= 2.0
    })
    .await;
    assert_eq!(
        count(
            &after,
            "swarmbus_event_lag_delivered_seconds_count",
            &command
        ),
        3.0,
        "catch-ups are not live deliveries"
    );
    let (_, swarms) = get_json(admin, "/v1/swarms", None).await;
    let s = swarms["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "s")
        .unwrap()
        .clone();
    assert_eq!(s["durable_op"], 6, "{s}");
    assert_eq!(s["ack_lag_ops"], 0, "it acked all it was sent: {s}");
    assert!(count(&after, "swarmbus_log_fsync_seconds_count", &[]) >= 1.0);
    assert_eq!(
        count(&after, "swarmbus_job_queue_wait_seconds_count", &[]),
        1.0
    );
    assert_eq!(count(&after, "swarmbus_job_run_seconds_count", &[]), 1.0);
    assert_eq!(count(&after, "swarmbus_job_redeliveries_total", &[]), 0.0);
    assert_eq!(count(&after, "swarmbus_redeliveries_total", &[]), 0.0);
    assert!(count(&after, "swarmbus_quic_sent_packets_total", &[]) > 0.0);
    assert!(after.value("swarmbus_quic_rtt_max_seconds", &[]) > 0.0);
    assert!(
        after.value("swarmbus_quic_rtt_mean_seconds", &[])
            <= after.value("swarmbus_quic_rtt_max_seconds", &[])
    );
    // The connections view: three sessions, who they are, their path.
    let (status, view) = get_json(admin, "/v1/connections", None).await;
    assert_eq!(status, 200, "{view}");
    let items = view["items"].as_array().unwrap();
    let mut agents: Vec<&str> = items.iter().filter_map(|c| c["agent"].as_str()).collect();
    agents.sort();
    assert_eq!(agents, ["agent", "ctl", "gpu"], "{view}");
    let gpu = items.iter().find(|c| c["agent"] == "gpu").unwrap();
    assert_eq!(gpu["role"], "worker", "{gpu}");
    assert_eq!(gpu["swarms"], serde_json::json!(["s"]), "{gpu}");
    assert!(gpu["sent_packets"].as_u64().unwrap() > 0, "{gpu}");
    assert!(
        gpu["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{gpu}"
    );
    // Pages of one walk every connection once, in id order.
    let mut walked = Vec::new();
    let mut path = "/v1/connections?limit=1".to_owned();
    loop {
        let (_, page) = get_json(admin, &path, None).await;
        walked.push(page["items"][0]["id"].as_u64().unwrap());
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/connections?limit=1&after={next}"),
            None => break,
        }
    }
    let ids: Vec<u64> = items.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert_eq!(walked, ids);
    assert_eq!(
        get_json(admin, "/v1/connections?after=x", None).await.0,
        400
    );
    // Each connection counted once: a scrape's totals never exceed the rows read after it
    // (a session's bulk connection is a row of its own, named by `bulk_of`).
    let totals = Samples::scrape(admin).await;
    let (_, view) = get_json(admin, "/v1/connections", None).await;
    let rows = view["items"].as_array().unwrap();
    let sent_rows: u64 = rows
        .iter()
        .map(|c| c["sent_packets"].as_u64().unwrap())
        .sum();
    let sent_total = totals.value("swarmbus_quic_sent_packets_total", &[])
        - before.value("swarmbus_quic_sent_packets_total", &[]);
    assert!(sent_total <= sent_rows as f64, "{sent_total} > {sent_rows}");
    for bulk in rows.iter().filter(|c| c["listener"] == "bulk") {
        let main = rows
            .iter()
            .find(|c| c["id"] == bulk["bulk_of"])
            .unwrap_or_else(|| panic!("the session of {bulk}"));
        assert_eq!(main["bulk_attached"], true, "{main}");
    }
    // A connection that ends leaves the view, and its packets stay counted.
    let sent = after.value("swarmbus_quic_sent_packets_total", &[]);
    drop((worker, events));
    let later = scrape_until(admin, |s| {
        s.value("swarmbus_sessions", &[("role", "worker")]) == 0.0
    })
    .await;
    assert!(later.value("swarmbus_quic_sent_packets_total", &[]) >= sent);
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let (t, admin) = with_admin().await;
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".to_owned()));
    let (status, body) = get(admin, "/nothing").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(
            b"POST /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    // Shut down: not ready, while the listener still answers (and alive).
    let stopped = t.router.shutdown().await;
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "shutting down\n"));
    assert_eq!(get(admin, "/healthz").await.0, 200);
    drop(stopped);
    // Then the listener is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(admin).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the admin listener outlived its router"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An internal log that takes no writes makes the router not ready; its recovery makes it
/// ready again.
#[tokio::test]
async fn an_unavailable_internal_log_makes_the_router_not_ready() {
    let data = tempfile::tempdir().unwrap();
    let mut config = crate::common::config_in(data.path());
    config.shards = 1;
    config.log.segment_bytes = 4096;
    config.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap());
    let t = TestRouter::start_on(config).await;
    let admin = t.router.admin_addr().unwrap();
    let (ctl, _r) = t.connect("ctl", Role::Controller, &["s"]).await;
    ctl.pause("s").await.unwrap();
    let blocked = crate::log_faults::block_new_segments(data.path(), "$control", 400);
    // Pauses and resumes are records of `$control`: fill its segment until one fails.
    let mut failed = false;
    for i in 0..400 {
        let step = if i % 2 == 0 {
            ctl.resume("s").await
        } else {
            ctl.pause("s").await
        };
        if step.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a $control append into a new segment fails");
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("own swarms"), "{body}");
    let samples = Samples::scrape(admin).await;
    assert_eq!(
        samples.value("swarmbus_internal_log_unavailable_swarms", &[]),
        1.0
    );
    assert_eq!(samples.value("swarmbus_ready", &[]), 0.0);
    for path in &blocked {
        std::fs::remove_dir(path).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(admin, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the router did not become ready again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` with `Authorization: Bearer token`: the status and the JSON body.
async fn get_json(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let (status, body) = get_as(admin, path, token).await;
    (status, serde_json::from_str(body.trim()).unwrap())
}

#[tokio::test]
async fn json_views_show_swarms_presence_leases_and_jobs() {
    let (t, admin) = with_admin().await;
    let (controller, _c) = t.connect("ctl", Role::Controller, &["s", "t"]).await;
    let (agent, _d) = t.connect("agent", Role::Agent, &["s"]).await;
    agent.subscribe("s", Class::Command, None).await.unwrap();
    commands(&controller, "s", 3).await;
    commands(&controller, "t", 1).await;
    controller
        .acquire_lease("s", "leader", Duration::from_secs(30))
        .await
        .unwrap();
    let (status, swarms) = get_json(admin, "/v1/swarms", None).await;
    assert_eq!(status, 200, "{swarms}");
    let s = swarms["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "s")
        .unwrap_or_else(|| panic!("s in {swarms}"));
    assert_eq!(s["last_op"], 3, "{s}");
    assert_eq!(s["durable_op"], 3, "{s}");
    assert_eq!(s["members"], 2, "{s}");
    assert_eq!(s["subscribers"]["command"], 1, "{s}");
    // The agent acknowledged nothing of the three: it lags by all of them.
    assert_eq!(s["ack_lag_ops"], 3, "{s}");
    assert!(s["log_bytes"].as_u64().unwrap() >= 3 * 20, "{s}");
    // Pages of one, walked to the end, give the whole list once, in order.
    let whole: Vec<serde_json::Value> = swarms["items"].as_array().unwrap().clone();
    assert!(whole.len() >= 3, "s, t and the router's own: {swarms}");
    let mut walked = Vec::new();
    let mut path = "/v1/swarms?limit=1".to_owned();
    loop {
        let (status, page) = get_json(admin, &path, None).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
        walked.push(page["items"][0]["name"].clone());
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/swarms?limit=1&after={next}"),
            None => break,
        }
    }
    let names: Vec<serde_json::Value> = whole.iter().map(|s| s["name"].clone()).collect();
    assert_eq!(walked, names);
    assert_eq!(get_json(admin, "/v1/swarms?limit=zero", None).await.0, 400);
    let (_, presence) = get_json(admin, "/v1/presence?swarm=s", None).await;
    let agents: Vec<&str> = presence["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["agent"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["agent", "ctl"], "{presence}");
    assert_eq!(get_json(admin, "/v1/presence", None).await.0, 400);
    let (_, leases) = get_json(admin, "/v1/leases", None).await;
    assert_eq!(leases["items"][0]["holder"], "ctl", "{leases}");
    assert_eq!(leases["items"][0]["name"], "leader", "{leases}");
    let (status, jobs) = get_json(admin, "/v1/jobs", None).await;
    assert_eq!(
        (status, &jobs["queued"]),
        (200, &serde_json::json!(0)),
        "{jobs}"
    );
    let (status, letters) = get_json(admin, "/v1/dead-letters?swarm=s", None).await;
    assert_eq!(status, 200, "{letters}");
    assert_eq!(letters["items"], serde_json::json!([]));
}

#[tokio::test]
async fn with_credentials_the_views_need_an_admin_credential() {
    let t = start_router(|c| {
        c.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap());
        c.auth.mode = swarmbus_router::auth::AuthMode::Required;
    })
    .await;
    let admin = t.router.admin_addr().unwrap();
    let key = crate::common::signing_key(t._data.as_ref().unwrap().path());
    let issue = |agent: &str, role| {
        swarmbus_router::auth::issue(
            &key,
            &swarmbus_router::auth::Issue {
                agent: agent.into(),
                grants: [("*".to_string(), role)].into(),
                ttl_s: 600,
                now_s: crate::common::now_s(),
                jti: format!("{agent}-1"),
            },
        )
        .unwrap()
    };
    let (status, body) = get_json(admin, "/v1/swarms", None).await;
    assert_eq!(status, 401, "{body}");
    let controller = issue("ctl", swarmbus_router::auth::GrantRole::Controller);
    assert_eq!(
        get_json(admin, "/v1/swarms", Some(&controller)).await.0,
        403
    );
    assert_eq!(
        get_json(admin, "/v1/swarms", Some("not.a.token")).await.0,
        401
    );
    let expired = swarmbus_router::auth::issue(
        &key,
        &swarmbus_router::auth::Issue {
            agent: "ops".into(),
            grants: [("*".to_string(), swarmbus_router::auth::GrantRole::Admin)].into(),
            ttl_s: 10,
            now_s: crate::common::now_s() - 1_000,
            jti: "ops-old".into(),
        },
    )
    .unwrap();
    let (status, body) = get_json(admin, "/v1/swarms", Some(&expired)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let operator = issue("ops", swarmbus_router::auth::GrantRole::Admin);
    assert_eq!(get_json(admin, "/v1/swarms", Some(&operator)).await.0, 200);
    // Metrics and health stay open on loopback.
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert_eq!(get(admin, "/metrics").await.0, 200);
}

#[tokio::test]
async fn closed_metrics_need_the_admin_credential_too() {
    let t = start_router(|c| {
        c.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap());
        c.auth.mode = swarmbus_router::auth::AuthMode::Required;
        c.admin_metrics_open = false;
    })
    .await;
    let admin = t.router.admin_addr().unwrap();
    let key = crate::common::signing_key(t._data.as_ref().unwrap().path());
    let operator = swarmbus_router::auth::issue(
        &key,
        &swarmbus_router::auth::Issue {
            agent: "ops".into(),
            grants: [("*".to_string(), swarmbus_router::auth::GrantRole::Admin)].into(),
            ttl_s: 600,
            now_s: crate::common::now_s(),
            jti: "ops-1".into(),
        },
    )
    .unwrap();
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(admin, path).await.0, 401, "{path}");
        let (status, _) = get_as(admin, path, Some(&operator)).await;
        assert_eq!(status, 200, "{path}");
    }
}

/// A clock that keeps the router's start waiting until the test lets it go.
#[derive(Debug, Default)]
struct Gated {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gated {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl swarmbus_router::clock::ClockSource for Gated {
    fn wall_ms(&self) -> u64 {
        self.wait();
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }
    fn boot(&self) -> Option<(String, u64)> {
        self.wait();
        None
    }
}

struct ReleaseOnDrop(std::sync::Arc<Gated>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// `/readyz` says "starting" from the moment the admin listener is bound until the router
/// takes sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_starting_until_the_router_serves() {
    // A free loopback port for the admin listener, known before the start returns.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = crate::common::config_in(data.path());
    config.admin_listen = AdminListen::At(admin);
    let clock = std::sync::Arc::new(Gated::default());
    // Released however the test ends: a start left waiting would hold the runtime.
    let _release = ReleaseOnDrop(clock.clone());
    let source: std::sync::Arc<dyn swarmbus_router::clock::ClockSource> = clock.clone();
    // Started from a thread of its own (the clock blocks it): the tasks it spawns, the
    // admin listener's among them, run on the runtime's workers meanwhile.
    let runtime = tokio::runtime::Handle::current();
    let starting = tokio::task::spawn_blocking(move || {
        runtime.block_on(swarmbus_router::Router::start_with_clock(config, source))
    });
    // The start waits on the clock, after binding the admin listener.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the admin listener was never bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("starting"), "{body}");
    assert_eq!(get(admin, "/metrics").await.0, 503);
    assert_eq!(get(admin, "/healthz").await.0, 200);
    clock.release();
    let router = starting.await.unwrap().expect("the router starts");
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".to_owned()));
    router.shutdown().await;
}

#[tokio::test]
async fn refusal_families_move_with_a_retry_storm() {
    let (t, admin) = {
        let t = start_router(|c| {
            c.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap());
            c.rate_limits.command = swarmbus_proto::limits::Rate::new(1.0, 1.0);
            c.rate_limits.breaker = swarmbus_proto::limits::BreakerConfig {
                failures: 3,
                window_ms: 10_000,
                open_ms: 60_000,
                probes: 1,
            };
        })
        .await;
        let admin = t.router.admin_addr().unwrap();
        (t, admin)
    };
    let before = Samples::scrape(admin).await;
    let (noisy, _rx) = t.connect("noisy", Role::Agent, &["s"]).await;
    let send = || {
        noisy.publish(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
    };
    send().await.unwrap();
    // Three over the rate limit open the breaker; the next is the breaker's.
    for _ in 0..3 {
        assert_eq!(send().await.unwrap_err().code(), Some(20));
    }
    assert_eq!(send().await.unwrap_err().code(), Some(21));
    let after = Samples::scrape(admin).await;
    let moved = |metric: &str, labels: &[(&str, &str)]| {
        after.value(metric, labels) - before.value(metric, labels)
    };
    let refused = [("outcome", "refused")];
    assert_eq!(moved("swarmbus_rate_limited_total", &refused), 3.0);
    assert_eq!(moved("swarmbus_breaker_refusals_total", &refused), 1.0);
    assert_eq!(moved("swarmbus_breaker_transitions_total", &[]), 1.0);
}

#[tokio::test]
async fn backlog_families_move_when_a_subscriber_stops_reading() {
    let t = start_router(|c| {
        c.admin_listen = AdminListen::At("127.0.0.1:0".parse().unwrap());
        c.queues.telemetry = 8;
        c.queues.command = 4;
    })
    .await;
    let admin = t.router.admin_addr().unwrap();
    let before = Samples::scrape(admin).await;
    let (ctl, _c) = t.connect("ctl", Role::Controller, &["s"]).await;
    // An agent connects twice: its older session is replaced in presence.
    let (_first, _f) = t.connect("twice", Role::Agent, &["s"]).await;
    let (_second, _s) = t.connect("twice", Role::Agent, &["s"]).await;
    let replaced = [("reason", "replaced")];
    scrape_until(admin, |s| {
        s.value("swarmbus_presence_leaves_total", &replaced)
            - before.value("swarmbus_presence_leaves_total", &replaced)
            == 1.0
    })
    .await;
    // Subscribed, and never reads its deliveries (a buffer of one each in the client).
    let mut session = swarmbus_client::Session::new("stuck", Role::Agent, ["s"]);
    session.delivery_buffer = 1;
    let (stuck, _unread) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    stuck.subscribe("s", Class::Telemetry, None).await.unwrap();
    stuck.subscribe("s", Class::Command, None).await.unwrap();
    let payload = Bytes::from(vec![7u8; 1024]);
    let moved = |s: &Samples, metric: &str| s.value(metric, &[]) - before.value(metric, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let shed = loop {
        for _ in 0..500 {
            ctl.publish(
                "s",
                Class::Telemetry,
                payload.clone(),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        }
        // Shed once its queue is full; queued for good once its buffers and flow control
        // windows are full too.
        let now = Samples::scrape(admin).await;
        if moved(&now, "swarmbus_telemetry_shed_total") > 0.0
            && now.value("swarmbus_queued_bytes", &[]) > 0.0
        {
            break now;
        }
        assert!(Instant::now() < deadline, "no telemetry was shed and held");
    };
    assert!(shed.value("swarmbus_queued_bytes", &[]) > 0.0);
    // Commands past its buffers, flow control windows and command queue: it catches up
    // from the log instead.
    for _ in 0..40 {
        ctl.publish(
            "s",
            Class::Command,
            Bytes::from(vec![1u8; 256 * 1024]),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    let caught = scrape_until(admin, |s| moved(s, "swarmbus_catch_ups_total") > 0.0).await;
    assert_eq!(moved(&caught, "swarmbus_lagging_disconnects_total"), 0.0);
}
