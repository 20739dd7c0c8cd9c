//! The job queue end to end: submit, lease, retry, fence, dead letters, restart, fairness,
//! cancellation. Every wait has a timeout; nothing asserts timing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Client, ClientError, JobDedup, JobEvent, JobEvents, JobUpdates};
use swarmbus_router::Config;
use swarmbus_schema::{ErrorCode, JobId, JobLease, JobState, JobUpdate, Role, SubmitJob};

use crate::common::{start_restartable, start_retrying, start_router, TestRouter};

const WAIT: Duration = Duration::from_secs(10);

fn job(swarm: &str, key: &str) -> SubmitJob {
    SubmitJob {
        swarm: swarm.into(),
        idempotency_key: key.into(),
        payload: Bytes::from(format!("payload-{key}")),
        ..SubmitJob::default()
    }
}

async fn submitter(router: &TestRouter, agent: &str, swarms: &[&str]) -> (Client, JobUpdates) {
    let (client, _deliveries) = router.connect(agent, Role::Agent, swarms).await;
    let updates = client.job_updates().unwrap();
    (client, updates)
}

async fn worker(
    router: &TestRouter,
    agent: &str,
    swarms: &[&str],
    credits: u32,
) -> (Client, JobEvents) {
    let (client, _deliveries) = router.connect(agent, Role::Worker, swarms).await;
    let events = client.job_events().unwrap();
    client.set_job_credits(credits).await.unwrap();
    (client, events)
}

async fn next_event(events: &mut JobEvents) -> JobEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("a job event within the timeout")
        .expect("the worker's connection is open")
}

async fn next_lease(events: &mut JobEvents) -> JobLease {
    loop {
        if let JobEvent::Lease(lease) = next_event(events).await {
            return lease;
        }
    }
}

/// The next end (not progress) the dedup lets through.
async fn next_end(updates: &mut JobUpdates, dedup: &mut JobDedup) -> JobUpdate {
    loop {
        let update = tokio::time::timeout(WAIT, updates.recv())
            .await
            .expect("a job update within the timeout")
            .expect("the submitter's connection is open");
        if update.state.is_final() && dedup.first_time(&update) {
            return update;
        }
    }
}

async fn finish(worker: &Client, lease: &JobLease, result: &str) -> Result<JobState, ClientError> {
    worker
        .finish_job(
            lease.job_id,
            lease.attempt,
            true,
            false,
            Bytes::from(result.to_owned()),
        )
        .await
        .map(|status| status.state)
}

fn refused_code(error: ClientError) -> u16 {
    match error {
        ClientError::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Polls `check` until it holds, failing after the timeout.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_reruns_elsewhere_and_the_submitter_gets_one_result() {
    let router = start_router(|c| c.jobs.backoff_base_ms = 10).await;
    let (agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    let (doomed, mut doomed_events) = worker(&router, "gpu-a", &["s"], 1).await;
    let status = agent.submit_job(job("s", "k1")).await.unwrap();
    assert!(!status.duplicate);
    let first = next_lease(&mut doomed_events).await;
    assert_eq!((first.job_id, first.attempt), (status.job_id, 1));
    assert_eq!(first.payload.as_ref(), b"payload-k1");
    assert_eq!(first.submitter, "agent");
    // The worker dies mid-job; another one comes.
    doomed.close();
    drop(doomed);
    let (survivor, mut events) = worker(&router, "gpu-b", &["s"], 1).await;
    let second = next_lease(&mut events).await;
    assert_eq!((second.job_id, second.attempt), (status.job_id, 2));
    assert_eq!(
        finish(&survivor, &second, "from-b").await.unwrap(),
        JobState::Completed
    );
    let mut dedup = JobDedup::default();
    let end = next_end(&mut updates, &mut dedup).await;
    assert_eq!(
        (end.job_id, end.state),
        (status.job_id, JobState::Completed)
    );
    assert_eq!(end.payload.as_ref(), b"from-b");
    agent.ack_job(&end).await.unwrap();
    eventually("the acknowledged job is forgotten", || {
        router.router.job_counts().jobs == 0
    })
    .await;
    // Acknowledged: a reconnecting submitter is not sent it again.
    drop((agent, updates));
    let (_agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), updates.recv())
            .await
            .is_err(),
        "no end is resent after its acknowledgement"
    );
    assert_eq!(router.router.job_counts().leases, 2);
}

#[tokio::test]
async fn a_fenced_workers_late_result_is_rejected() {
    let router = start_router(|c| {
        c.jobs.visibility_timeout_ms = 1_000;
        c.jobs.backoff_base_ms = 10;
    })
    .await;
    let (agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    let (slow, mut slow_events) = worker(&router, "slow", &["s"], 1).await;
    let status = agent.submit_job(job("s", "k")).await.unwrap();
    let first = next_lease(&mut slow_events).await;
    // The slow worker takes nothing more, so the requeued job goes to the fast one.
    slow.set_job_credits(0).await.unwrap();
    // No heartbeat: the lease expires and the worker is told its attempt is fenced.
    assert_eq!(
        next_event(&mut slow_events).await,
        JobEvent::Cancel {
            job_id: status.job_id,
            attempt: 1
        }
    );
    let (fast, mut fast_events) = worker(&router, "fast", &["s"], 1).await;
    let second = next_lease(&mut fast_events).await;
    // Attempt 2, unless the slow worker was leased the job again before its credits=0
    // arrived (then it is fenced once more and the fast worker gets attempt 3).
    assert!(second.attempt >= 2, "{second:?}");
    let late = finish(&slow, &first, "late").await.unwrap_err();
    assert_eq!(refused_code(late), ErrorCode::LeaseFenced.as_u16());
    assert_eq!(
        finish(&fast, &second, "fresh").await.unwrap(),
        JobState::Completed
    );
    let end = next_end(&mut updates, &mut JobDedup::default()).await;
    assert_eq!(end.payload.as_ref(), b"fresh");
    assert_eq!(router.router.job_counts().fenced_results, 1);
}

#[tokio::test]
async fn a_router_restart_loses_no_accepted_job_and_results_still_arrive() {
    let data = tempfile::tempdir().unwrap();
    let config = |listen| Config {
        listen,
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        shards: 2,
        ..Config::default()
    };
    let (test, addr, connector) = start_restartable(config).await;
    let (agent, updates) = submitter(&test, "agent", &["s"]).await;
    let mut ids = HashSet::new();
    for i in 0..10 {
        ids.insert(
            agent
                .submit_job(job("s", &format!("k{i}")))
                .await
                .unwrap()
                .job_id,
        );
    }
    // The submitter leaves; a worker finishes half the jobs and holds two more.
    drop((agent, updates));
    let (gpu, mut events) = worker(&test, "gpu", &["s"], 7).await;
    for _ in 0..5 {
        let lease = next_lease(&mut events).await;
        finish(&gpu, &lease, &format!("done-{}", lease.job_id.0))
            .await
            .unwrap();
    }
    next_lease(&mut events).await;
    test.router.shutdown().await;
    drop((gpu, events));

    let router = start_retrying(|| config(addr)).await;
    let test = TestRouter::from_parts(router, connector);
    let counts = test.router.job_counts();
    assert_eq!((counts.jobs, counts.pending_results), (10, 5), "{counts:?}");
    let (agent, mut updates) = submitter(&test, "agent", &["s"]).await;
    let (gpu, mut events) = worker(&test, "gpu", &["s"], 10).await;
    let runner = tokio::spawn(async move {
        for _ in 0..5 {
            let lease = next_lease(&mut events).await;
            finish(&gpu, &lease, &format!("done-{}", lease.job_id.0))
                .await
                .unwrap();
        }
        (gpu, events)
    });
    let mut dedup = JobDedup::default();
    let mut ended = HashSet::new();
    while ended.len() < 10 {
        let end = next_end(&mut updates, &mut dedup).await;
        assert_eq!(end.state, JobState::Completed);
        assert_eq!(end.payload, Bytes::from(format!("done-{}", end.job_id.0)));
        agent.ack_job(&end).await.unwrap();
        ended.insert(end.job_id);
    }
    assert_eq!(ended, ids, "every accepted job ended, each once");
    let _worker = runner.await.unwrap();
    eventually("all acknowledged", || test.router.job_counts().jobs == 0).await;
    // Dedup survives the restart as well.
    let again = agent.submit_job(job("s", "k3")).await.unwrap();
    assert!(again.duplicate && ids.contains(&again.job_id));
}

#[tokio::test]
async fn jobs_are_dead_lettered_after_their_last_attempt_and_can_be_redriven() {
    let router = start_router(|c| {
        // Long enough for the re-driven attempt's result to arrive on a slow machine.
        c.jobs.visibility_timeout_ms = 1_000;
        c.jobs.backoff_base_ms = 10;
    })
    .await;
    let (agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    let (controller, _rx) = router.connect("ops", Role::Controller, &["s"]).await;
    let (gpu, mut events) = worker(&router, "gpu", &["s"], 1).await;
    let mut spec = job("s", "flaky");
    spec.max_attempts = 2;
    let id = agent.submit_job(spec).await.unwrap().job_id;
    // Two attempts whose leases expire (the worker never answers).
    for attempt in 1..=2 {
        let lease = next_lease(&mut events).await;
        assert_eq!((lease.job_id, lease.attempt), (id, attempt));
    }
    let mut dedup = JobDedup::default();
    let end = next_end(&mut updates, &mut dedup).await;
    assert_eq!((end.job_id, end.state), (id, JobState::DeadLettered));
    let page = controller.dead_letters("s", JobId(0), 10).await.unwrap();
    assert_eq!(page.jobs.len(), 1);
    assert_eq!((page.jobs[0].job_id, page.jobs[0].attempts), (id, 2));
    assert_eq!(page.jobs[0].idempotency_key, "flaky");
    // Only controllers may re-drive.
    let refused = agent.redrive_job("s", id).await.unwrap_err();
    assert_eq!(refused_code(refused), ErrorCode::Forbidden.as_u16());
    let status = controller.redrive_job("s", id).await.unwrap();
    assert_eq!(status.state, JobState::Queued);
    let lease = next_lease(&mut events).await;
    assert_eq!((lease.job_id, lease.attempt), (id, 3));
    finish(&gpu, &lease, "third time").await.unwrap();
    let end = next_end(&mut updates, &mut dedup).await;
    assert_eq!((end.job_id, end.state), (id, JobState::Completed));
    assert!(controller
        .dead_letters("s", JobId(0), 10)
        .await
        .unwrap()
        .jobs
        .is_empty());
    let not_dead = controller.redrive_job("s", id).await.unwrap_err();
    assert_eq!(refused_code(not_dead), ErrorCode::JobFinished.as_u16());
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_same_job_and_runs_it_once() {
    let router = start_router(|c| c.jobs.max_jobs_per_swarm = 2).await;
    let (agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    let first = agent.submit_job(job("s", "same")).await.unwrap();
    let second = agent.submit_job(job("s", "same")).await.unwrap();
    assert_eq!(first.job_id, second.job_id);
    assert!(!first.duplicate && second.duplicate);
    // The swarm's queue is bounded: Busy with a retry hint.
    agent.submit_job(job("s", "other")).await.unwrap();
    match agent.submit_job(job("s", "third")).await.unwrap_err() {
        ClientError::Refused {
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(code, ErrorCode::Busy.as_u16());
            assert!(retry_after_ms > 0);
        }
        other => panic!("expected Busy, got {other}"),
    }
    let (gpu, mut events) = worker(&router, "gpu", &["s"], 4).await;
    let mut leased = HashMap::new();
    for _ in 0..2 {
        let lease = next_lease(&mut events).await;
        *leased.entry(lease.job_id).or_insert(0) += 1;
        finish(&gpu, &lease, "r").await.unwrap();
    }
    assert_eq!(leased.get(&first.job_id), Some(&1));
    let mut dedup = JobDedup::default();
    for _ in 0..2 {
        let end = next_end(&mut updates, &mut dedup).await;
        agent.ack_job(&end).await.unwrap();
    }
    eventually("both forgotten", || router.router.job_counts().jobs == 0).await;
    let again = agent.submit_job(job("s", "same")).await.unwrap();
    assert_eq!(
        (again.job_id, again.duplicate, again.state),
        (first.job_id, true, JobState::Completed)
    );
    assert_eq!(router.router.job_counts().leases, 2, "nothing ran twice");
}

#[tokio::test]
async fn two_swarms_submitting_ten_to_one_share_the_workers_evenly() {
    let router = start_router(|_| {}).await;
    let (agent, _updates) = submitter(&router, "agent", &["busy", "quiet"]).await;
    for i in 0..100 {
        agent
            .submit_job(job("busy", &format!("b{i}")))
            .await
            .unwrap();
        if i % 10 == 0 {
            agent
                .submit_job(job("quiet", &format!("q{i}")))
                .await
                .unwrap();
        }
    }
    let (gpu, mut events) = worker(&router, "gpu", &["busy", "quiet"], 1).await;
    let mut order = Vec::new();
    while order.len() < 30 {
        let lease = next_lease(&mut events).await;
        order.push(lease.swarm.clone());
        finish(&gpu, &lease, "r").await.unwrap();
    }
    let quiet = order[..20].iter().filter(|s| *s == "quiet").count();
    assert_eq!(quiet, 10, "while both had work they alternated: {order:?}");
    assert!(order[20..].iter().all(|s| s == "busy"), "{order:?}");
}

#[tokio::test]
async fn cancellation_reaches_the_worker_and_ends_the_job_cancelled() {
    let router = start_router(|_| {}).await;
    let (agent, mut updates) = submitter(&router, "agent", &["s"]).await;
    let (controller, _rx) = router.connect("ops", Role::Controller, &["s"]).await;
    let (stranger, _rx2) = router.connect("stranger", Role::Agent, &["s"]).await;
    let (gpu, mut events) = worker(&router, "gpu", &["s"], 1).await;
    let running = agent.submit_job(job("s", "running")).await.unwrap().job_id;
    let queued = agent.submit_job(job("s", "queued")).await.unwrap().job_id;
    let lease = next_lease(&mut events).await;
    assert_eq!(lease.job_id, running);
    let refused = stranger.cancel_job(running).await.unwrap_err();
    assert_eq!(refused_code(refused), ErrorCode::Forbidden.as_u16());
    assert_eq!(
        agent.cancel_job(running).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        next_event(&mut events).await,
        JobEvent::Cancel {
            job_id: running,
            attempt: 1
        }
    );
    let late = finish(&gpu, &lease, "too late").await.unwrap_err();
    assert_eq!(refused_code(late), ErrorCode::LeaseFenced.as_u16());
    // The freed credit takes the next job; a controller cancels that one.
    let next = next_lease(&mut events).await;
    assert_eq!(next.job_id, queued);
    assert_eq!(
        controller.cancel_job(queued).await.unwrap().state,
        JobState::Cancelled
    );
    let mut dedup = JobDedup::default();
    let mut ends = HashMap::new();
    for _ in 0..2 {
        let end = next_end(&mut updates, &mut dedup).await;
        ends.insert(end.job_id, end.state);
    }
    assert_eq!(ends.get(&running), Some(&JobState::Cancelled));
    assert_eq!(ends.get(&queued), Some(&JobState::Cancelled));
    let again = agent.cancel_job(running).await.unwrap();
    assert_eq!(again.state, JobState::Cancelled);
}

#[tokio::test]
async fn answers_to_submits_do_not_wait_behind_unread_job_updates() {
    let t = start_router(|_| {}).await;
    // A submitter that buffers two job updates and reads none until the end.
    let session = swarmbus_client::Session {
        delivery_buffer: 2,
        ..swarmbus_client::Session::new("slow-reader", Role::Agent, ["s"])
    };
    let (submitter, _deliveries) = t
        .connector
        .connect(t.router.local_addr(), session)
        .await
        .unwrap();
    let mut updates = submitter.job_updates().unwrap();
    let (worker, mut events) = worker(&t, "w", &["s"], 16).await;
    let jobs = 10;
    for i in 0..jobs {
        let status = tokio::time::timeout(WAIT, submitter.submit_job(job("s", &format!("k{i}"))))
            .await
            .expect("the submit is answered although job updates are unread")
            .unwrap();
        let lease = next_lease(&mut events).await;
        assert_eq!(lease.job_id, status.job_id);
        assert_eq!(
            finish(&worker, &lease, "ok").await.unwrap(),
            JobState::Completed
        );
    }
    // Every end arrives once the submitter reads them.
    let mut dedup = JobDedup::default();
    let mut ended = HashSet::new();
    while ended.len() < jobs {
        ended.insert(next_end(&mut updates, &mut dedup).await.job_id);
    }
    t.router.shutdown().await;
}

/// Payloads past `jobs.payload_cache_bytes` are not kept in memory: each lease reads its
/// payload back from the job log, before and after a restart, and the worker gets it
/// whole.
#[tokio::test]
async fn payloads_past_the_cache_are_read_back_from_the_log() {
    let data = tempfile::tempdir().unwrap();
    let config = |listen| {
        let mut config = Config {
            listen,
            data_dir: data.path().to_owned(),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            shards: 1,
            ..Config::default()
        };
        // Room for the first payload only.
        config.jobs.payload_cache_bytes = 10;
        config
    };
    let (test, addr, connector) = start_restartable(config).await;
    let (agent, _updates) = submitter(&test, "agent", &["s"]).await;
    for i in 0..4 {
        agent.submit_job(job("s", &format!("k{i}"))).await.unwrap();
    }
    let (gpu, mut events) = worker(&test, "gpu", &["s"], 2).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let lease = next_lease(&mut events).await;
        got.push(lease.payload.clone());
        finish(&gpu, &lease, "done").await.unwrap();
    }
    drop((gpu, events, agent));
    test.router.shutdown().await;

    // After a restart the two left are read back from the log too.
    let router = start_retrying(|| config(addr)).await;
    let test = TestRouter::from_parts(router, connector);
    let (gpu, mut events) = worker(&test, "gpu", &["s"], 2).await;
    for _ in 0..2 {
        got.push(next_lease(&mut events).await.payload);
    }
    got.sort();
    let want: Vec<Bytes> = (0..4)
        .map(|i| Bytes::from(format!("payload-k{i}")))
        .collect();
    assert_eq!(got, want);
    drop((gpu, events));
    test.router.shutdown().await;
}
