use super::*;

// The tests address connections by their ids.
type Jobs = super::Jobs<ConnId>;
type Effects = super::Effects<ConnId>;
use crate::test_support::message;

fn outbox(conn: u64) -> ConnId {
    ConnId(conn)
}

fn leases(fx: &Effects) -> Vec<(ConnId, JobLease)> {
    fx.frames
        .iter()
        .filter_map(|(to, _, frame)| match message(frame) {
            Message::JobLease(lease) => Some((to.conn(), lease)),
            _ => None,
        })
        .collect()
}

fn submit(swarm: &str, key: &str, model: Option<&str>) -> SubmitJob {
    SubmitJob {
        request_id: 9,
        swarm: swarm.into(),
        idempotency_key: key.into(),
        model: model.map(str::to_owned),
        payload: Bytes::from_static(b"work"),
        ..SubmitJob::default()
    }
}

/// Submits and makes the spec durable; returns the job id and the effects.
fn accept(jobs: &mut Jobs, who: &ConnId, job: SubmitJob, now: u64) -> (JobId, Effects) {
    match jobs.submit("submitter", who, job, now).unwrap() {
        Submitted::New { job_id, .. } => (job_id, jobs.submitted(job_id, Ok(()), now)),
        other => panic!("expected a new job, got {other:?}"),
    }
}

fn worker(jobs: &mut Jobs, conn: u64, swarms: &[&str], credits: u32) -> (ConnId, Effects) {
    let out = outbox(conn);
    let swarms: Vec<String> = swarms.iter().map(|s| s.to_string()).collect();
    jobs.connect(ConnId(conn), &format!("worker-{conn}"), &out, Some(&swarms));
    let fx = jobs.credits(ConnId(conn), credits, 0);
    (out, fx)
}

fn ok_result(lease: &JobLease) -> JobResult {
    JobResult {
        request_id: 1,
        job_id: lease.job_id,
        attempt: lease.attempt,
        ok: true,
        retry: false,
        payload: Bytes::from_static(b"done"),
    }
}

/// A job queue on `config` with the submitter's session connected (conn 1).
fn with_submitter(config: JobsConfig) -> (Jobs, ConnId) {
    let mut jobs = Jobs::new(config, [], 0, 1);
    let who = outbox(1);
    jobs.connect(ConnId(1), "submitter", &who, None);
    (jobs, who)
}

/// A submit to `swarm` with key `key` and a payload of `bytes` bytes.
fn sized(swarm: &str, key: &str, bytes: usize) -> SubmitJob {
    SubmitJob {
        payload: Bytes::from(vec![0u8; bytes]),
        ..submit(swarm, key, None)
    }
}

/// A worker (conn 2) leases job `id`, finishes it, and the submitter acknowledges it.
fn finish_and_ack(jobs: &mut Jobs, id: JobId, swarm: &str, now: u64) {
    let (out, fx) = worker(jobs, 2, &[swarm], 1);
    let lease = leases(&fx).pop().unwrap().1;
    assert_eq!(lease.job_id, id);
    let fx = jobs
        .result(ConnId(2), &out, ok_result(&lease), now)
        .unwrap();
    jobs.finals_written(&fx.finals);
    jobs.ack("submitter", id, AckedEnd::Any);
}

#[test]
fn records_round_trip_through_their_payload() {
    let spec = JobSpec {
        job_id: JobId(42),
        swarm: "s".into(),
        idempotency_key: "k".into(),
        model: Some("llama".into()),
        submitter: "agent".into(),
        priority: 3,
        deadline_ms: 99,
        max_attempts: 4,
        submitted_ms: 7,
        payload: Bytes::from_static(b"payload"),
    };
    let records = [
        JobRecord::Spec(spec),
        JobRecord::Lease {
            swarm: "s".into(),
            job_id: JobId(42),
            attempt: 2,
        },
        JobRecord::End(EndRecord {
            job_id: JobId(42),
            swarm: "s".into(),
            idempotency_key: "k".into(),
            kind: EndKind::Ended(JobState::DeadLettered),
            attempt: 2,
            budget_base: 1,
            submitted_ms: 7,
            reason: "why".into(),
            payload: Bytes::from_static(b"result"),
        }),
    ];
    for record in records {
        assert_eq!(
            JobRecord::parse(&record.key(), &record.payload()),
            Some(record)
        );
    }
    assert!(JobRecord::parse("s000000000000002a", &Bytes::from_static(&[1, 0])).is_none());
    // Only the exact key form is read: no sign, no short or long ids.
    for bad in ["s+00000000000002a", "s2a", "s000000000000002a0", "s"] {
        assert!(JobRecord::parse(bad, &Bytes::new()).is_none(), "{bad}");
    }
    assert!(matches!(
        JobRecord::parse("s000000000000002a", &Bytes::new()),
        Some(JobRecord::Forget { .. })
    ));
}

#[test]
fn equal_weights_share_a_worker_evenly_between_a_busy_and_a_quiet_swarm() {
    let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
    let who = outbox(1);
    for i in 0..100 {
        accept(&mut jobs, &who, submit("busy", &format!("b{i}"), None), 0);
    }
    for i in 0..10 {
        accept(&mut jobs, &who, submit("quiet", &format!("q{i}"), None), 0);
    }
    let (out, fx) = worker(&mut jobs, 2, &["busy", "quiet"], 1);
    let mut current = leases(&fx);
    let mut order = Vec::new();
    while order.len() < 40 {
        assert_eq!(current.len(), 1, "one credit, one lease at a time");
        let (_, lease) = current.pop().unwrap();
        order.push(lease.swarm.clone());
        let fx = jobs.result(ConnId(2), &out, ok_result(&lease), 0).unwrap();
        current = leases(&fx);
    }
    let quiet_in_first_20 = order[..20].iter().filter(|s| *s == "quiet").count();
    assert_eq!(quiet_in_first_20, 10, "{order:?}");
    assert!(order[20..].iter().all(|s| s == "busy"));
}

#[test]
fn weights_and_priorities_order_dispatch() {
    let mut config = JobsConfig::default();
    config.swarm_weights.insert("heavy".into(), 3);
    let mut jobs = Jobs::new(config, [], 0, 1);
    let who = outbox(1);
    for i in 0..20 {
        accept(&mut jobs, &who, submit("heavy", &format!("h{i}"), None), 0);
        accept(&mut jobs, &who, submit("light", &format!("l{i}"), None), 0);
    }
    let mut urgent = submit("light", "urgent", None);
    urgent.priority = 9;
    let (urgent_id, _) = accept(&mut jobs, &who, urgent, 0);
    let (_, fx) = worker(&mut jobs, 2, &["heavy", "light"], 8);
    let got = leases(&fx);
    let heavy = got.iter().filter(|(_, l)| l.swarm == "heavy").count();
    assert_eq!((heavy, got.len() - heavy), (6, 2), "3:1 by weight");
    assert!(
        got.iter().any(|(_, l)| l.job_id == urgent_id),
        "priority first"
    );
}

#[test]
fn the_latest_progress_is_resent_to_a_reconnecting_submitter() {
    let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 3);
    let who = outbox(1);
    jobs.connect(ConnId(1), "submitter", &who, None);
    let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
    let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
    let lease = leases(&fx).pop().unwrap().1;
    let beat = |text: &'static [u8]| JobProgress {
        job_id: id,
        attempt: lease.attempt,
        payload: Bytes::from_static(text),
    };
    assert_eq!(jobs.progress(ConnId(2), beat(b"10%"), 10).frames.len(), 1);
    jobs.progress(ConnId(2), beat(b"50%"), 20);
    // The submitter was away: on reconnect it gets the latest progress only.
    jobs.disconnect(ConnId(1), 30);
    let again = outbox(3);
    let fx = jobs.connect(ConnId(3), "submitter", &again, None);
    let updates: Vec<JobUpdate> = fx
        .frames
        .iter()
        .filter_map(|(_, _, frame)| match message(frame) {
            Message::JobUpdate(update) => Some(update),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].state, JobState::Running);
    assert_eq!(updates[0].payload.as_ref(), b"50%");
}

#[test]
fn a_draining_worker_gets_no_new_jobs() {
    let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 5);
    let (_, _) = worker(&mut jobs, 2, &["s"], 4);
    let (_, _) = worker(&mut jobs, 3, &["s"], 4);
    jobs.worker_draining(ConnId(3), true);
    let who = outbox(1);
    for key in ["a", "b", "c"] {
        let (_, fx) = accept(&mut jobs, &who, submit("s", key, None), 0);
        assert_eq!(leases(&fx)[0].0, ConnId(2), "{key}");
    }
}

#[test]
fn workers_with_the_model_loaded_are_preferred() {
    let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
    let (_, _) = worker(&mut jobs, 2, &["s"], 4);
    let (_, _) = worker(&mut jobs, 3, &["s"], 4);
    jobs.worker_models(ConnId(3), &["llama".to_string()]);
    let who = outbox(1);
    let (_, fx) = accept(&mut jobs, &who, submit("s", "k", Some("llama")), 0);
    assert_eq!(leases(&fx)[0].0, ConnId(3));
    let (_, fx) = accept(&mut jobs, &who, submit("s", "k2", Some("mistral")), 0);
    assert_eq!(leases(&fx)[0].0, ConnId(2), "nobody has it: least loaded");
}

#[test]
fn an_expired_lease_is_fenced_retried_then_dead_lettered_and_redriven() {
    let config = JobsConfig {
        visibility_timeout_ms: 100,
        backoff_base_ms: 10,
        backoff_cap_ms: 10,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config, [], 0, 7);
    let who = outbox(1);
    jobs.connect(ConnId(1), "submitter", &who, None);
    let mut job = submit("s", "k", None);
    job.max_attempts = 2;
    let (id, _) = accept(&mut jobs, &who, job, 0);
    let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
    let first = leases(&fx).pop().unwrap().1;
    assert_eq!(first.attempt, 1);
    // A heartbeat extends the lease.
    let beat = JobProgress {
        job_id: id,
        attempt: 1,
        payload: Bytes::new(),
    };
    assert!(jobs.progress(ConnId(2), beat, 90).frames.is_empty());
    assert!(leases(&jobs.tick(150)).is_empty(), "extended to 190");
    // Expiry: the worker is told, the job waits for its backoff, then runs again.
    let fx = jobs.tick(190);
    assert!(fx
        .frames
        .iter()
        .any(|(_, _, f)| matches!(message(f), Message::JobCancel { attempt: 1, .. })));
    let second = leases(&jobs.tick(200)).pop().unwrap().1;
    assert_eq!(second.attempt, 2);
    // The fenced attempt's late result is rejected.
    let late = jobs.result(ConnId(2), &out, ok_result(&first), 201);
    assert_eq!(late.unwrap_err().code, ErrorCode::LeaseFenced);
    // The last attempt expires too: dead-lettered, and the end is written first.
    let fx = jobs.tick(400);
    assert_eq!(fx.finals.len(), 1);
    assert_eq!(jobs.counts().dead_lettered, 1);
    let told = jobs.finals_written(&fx.finals);
    let Message::JobUpdate(update) = message(&told.frames[0].2) else {
        panic!()
    };
    assert_eq!(update.state, JobState::DeadLettered);
    let page = jobs.dead_letters("s", JobId(0), 10);
    assert_eq!(page.jobs.len(), 1);
    assert_eq!(page.jobs[0].attempts, 2);
    // Re-drive: a fresh budget, and it runs (attempt 3).
    let fx = jobs.redrive("s", &who, 5, id, 500).unwrap();
    assert_eq!(leases(&fx)[0].1.attempt, 3);
    assert!(jobs.dead_letters("s", JobId(0), 10).jobs.is_empty());
    let third = leases(&fx).pop().unwrap().1;
    let fx = jobs
        .result(ConnId(2), &out, ok_result(&third), 501)
        .unwrap();
    assert_eq!(fx.finals.len(), 1);
    jobs.finals_written(&fx.finals);
    let acked = jobs.ack("submitter", id, AckedEnd::Any);
    // The end (key and state only), the spec emptied, and the lease record emptied.
    assert_eq!(acked.records.len(), 3);
    assert_eq!(jobs.counts().jobs, 0);
}

#[test]
fn job_bytes_are_capped_per_agent_and_router_wide_until_acknowledged() {
    let config = JobsConfig {
        max_bytes: 3_000,
        max_bytes_per_agent: 2_000,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config, [], 0, 1);
    let who = outbox(1);
    jobs.connect(ConnId(1), "submitter", &who, None);
    let big = |key: &str| SubmitJob {
        payload: Bytes::from(vec![0u8; 1_000]),
        ..submit("s", key, None)
    };
    let busy = |result: Result<Submitted, Refusal>| match result {
        Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
        Ok(other) => panic!("expected Busy, got {other:?}"),
    };
    let (id, _) = accept(&mut jobs, &who, big("one"), 0);
    // Each job counts its payload, names and 256 bytes: a second is past the quota.
    let (held, mine) = jobs.bytes_held("submitter");
    assert!(held == mine && mine > 1_000 + JOB_OVERHEAD_BYTES);
    busy(jobs.submit("submitter", &who, big("two"), 0));
    // Another agent has room, up to the router's cap.
    let other = outbox(3);
    assert!(matches!(
        jobs.submit("other", &other, big("three"), 0),
        Ok(Submitted::New { .. })
    ));
    busy(jobs.submit("third", &other, big("four"), 0));
    // The result counts to the submitter too, until the submitter acknowledges it.
    let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
    let lease = leases(&fx).pop().unwrap().1;
    assert_eq!(lease.job_id, id);
    let result = JobResult {
        payload: Bytes::from(vec![1u8; 500]),
        ..ok_result(&lease)
    };
    let fx = jobs.result(ConnId(2), &out, result, 1).unwrap();
    assert_eq!(jobs.bytes_held("submitter").1, mine + 500);
    jobs.finals_written(&fx.finals);
    jobs.ack("submitter", id, AckedEnd::Any);
    assert_eq!(jobs.bytes_held("submitter").1, 0);
    accept(&mut jobs, &who, big("two"), 2);
}

#[test]
fn an_acknowledged_job_leaves_the_log_after_the_dedup_window_and_ids_never_go_back() {
    let config = JobsConfig {
        dedup_window_ms: 1_000,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config.clone(), [], 0, 1);
    let who = outbox(1);
    jobs.connect(ConnId(1), "submitter", &who, None);
    let mut log: Vec<JobRecord> = Vec::new();
    let Submitted::New { job_id, record } = jobs
        .submit("submitter", &who, submit("s", "k", None), 0)
        .unwrap()
    else {
        panic!("a new job")
    };
    log.push(record);
    jobs.submitted(job_id, Ok(()), 0);
    let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
    let lease = leases(&fx).pop().unwrap().1;
    log.extend(fx.records);
    let fx = jobs.result(ConnId(2), &out, ok_result(&lease), 10).unwrap();
    jobs.finals_written(&fx.finals);
    log.extend(fx.finals);
    log.extend(jobs.ack("submitter", job_id, AckedEnd::Any).records);
    // Within the dedup window the key is still known; past it, the end record goes too.
    assert!(jobs.tick(500).records.is_empty());
    let fx = jobs.tick(1_500);
    assert!(fx
        .records
        .iter()
        .any(|r| matches!(r, JobRecord::NextJob { next, .. } if *next > job_id)));
    assert!(fx
        .records
        .iter()
        .any(|r| matches!(r, JobRecord::ForgetEnd { job_id: id, .. } if *id == job_id)));
    log.extend(fx.records);
    // Every record of the job is now empty under its key: compaction keeps only the
    // latest per key and drops the empty ones, leaving the id mark.
    let mut latest: HashMap<String, JobRecord> = HashMap::new();
    for record in log {
        let record = JobRecord::parse(&record.key(), &record.payload()).unwrap();
        latest.insert(record.key(), record);
    }
    let kept: Vec<JobRecord> = latest
        .into_values()
        .filter(|r| !r.payload().is_empty())
        .collect();
    assert!(
        matches!(kept.as_slice(), [JobRecord::NextJob { .. }]),
        "{kept:?}"
    );
    // Restarted from what is left: no job, and the next id is new.
    let mut restarted = Jobs::new(config, kept, 2_000, 1);
    assert_eq!(restarted.counts().jobs, 0);
    match restarted.submit("submitter", &who, submit("s", "k2", None), 2_000) {
        Ok(Submitted::New { job_id: next, .. }) => assert!(next > job_id),
        other => panic!("expected a new job, got {other:?}"),
    }
}

#[test]
fn payloads_past_the_cache_leave_memory_and_are_leased_from_the_log() {
    let (mut jobs, who) = with_submitter(JobsConfig {
        payload_cache_bytes: 1_500,
        ..JobsConfig::default()
    });
    let mut ids = Vec::new();
    for (n, key) in ["a", "b"].into_iter().enumerate() {
        let Submitted::New { job_id, .. } = jobs
            .submit("submitter", &who, sized("s", key, 1_000), 0)
            .unwrap()
        else {
            panic!("a new job")
        };
        jobs.spec_written_at(job_id, OpId(10 + n as u64));
        jobs.submitted(job_id, Ok(()), 0);
        ids.push(job_id);
    }
    // The first payload fits the cache; the second is dropped from memory (both still
    // count against the byte caps, which bound what the queue holds anywhere).
    let (held, _) = jobs.bytes_held("submitter");
    assert!(held > 2_000, "{held}");
    let (_, fx) = worker(&mut jobs, 2, &["s"], 2);
    assert_eq!(leases(&fx).len(), 1, "the cached one is leased at once");
    assert_eq!(fx.loads.len(), 1, "the other is read back first");
    let load = &fx.loads[0];
    assert_eq!((load.lease.job_id, load.op), (ids[1], OpId(11)));
    assert_eq!(load.log, log_swarm("s"));
    assert!(load.lease.payload.is_empty());
}

#[test]
fn duplicate_submits_waiting_for_a_spec_are_capped() {
    let (mut jobs, who) = with_submitter(JobsConfig::default());
    assert!(matches!(
        jobs.submit("submitter", &who, submit("s", "k", None), 0),
        Ok(Submitted::New { .. })
    ));
    for _ in 0..MAX_WAITERS - 1 {
        assert!(matches!(
            jobs.submit("submitter", &who, submit("s", "k", None), 0),
            Ok(Submitted::Waiting)
        ));
    }
    match jobs.submit("submitter", &who, submit("s", "k", None), 0) {
        Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
        Ok(other) => panic!("expected Busy, got {other:?}"),
    }
}

#[test]
fn a_lease_whose_payload_cannot_be_read_is_a_lost_attempt_with_its_reason() {
    let (mut jobs, who) = with_submitter(JobsConfig {
        payload_cache_bytes: 0,
        ..JobsConfig::default()
    });
    let mut job = sized("s", "k", 100);
    job.max_attempts = 1;
    let Submitted::New { job_id, .. } = jobs.submit("submitter", &who, job, 0).unwrap() else {
        panic!("a new job")
    };
    jobs.spec_written_at(job_id, OpId(3));
    jobs.submitted(job_id, Ok(()), 0);
    let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
    let load = &fx.loads[0];
    assert!(jobs.holds_lease(ConnId(2), job_id, load.lease.attempt));
    let fx = jobs.lease_undeliverable(ConnId(2), job_id, load.lease.attempt, "disk on fire", 1);
    assert_eq!(
        fx.finals.len(),
        1,
        "its only attempt is used: dead-lettered"
    );
    assert!(!jobs.holds_lease(ConnId(2), job_id, 1));
    let page = jobs.dead_letters("s", JobId(0), 10);
    assert!(
        page.jobs[0].reason.contains("disk on fire"),
        "{:?}",
        page.jobs[0]
    );
}

#[test]
fn a_refused_submit_takes_no_place_among_the_job_logs() {
    let (mut jobs, who) = with_submitter(JobsConfig {
        max_swarms: 2,
        max_bytes: 2_000,
        ..JobsConfig::default()
    });
    let (id, _) = accept(&mut jobs, &who, sized("a", "k", 1_200), 0);
    // Refused for the bytes: "c" gets no job log.
    assert!(jobs
        .submit("submitter", &who, sized("c", "k", 1_200), 0)
        .is_err());
    // The job of "a" ends and is acknowledged: room again, and "b" is the second log.
    finish_and_ack(&mut jobs, id, "a", 1);
    accept(&mut jobs, &who, sized("b", "k", 1_200), 2);
}

#[test]
fn a_job_forgotten_with_its_spec_record_lost_does_not_come_back() {
    // The acknowledgement's emptied spec was lost in a crash; the end (key only) and
    // the full spec were kept. Once the key leaves the window the forget batch empties
    // the spec again, and an emptied end alone also keeps the job gone.
    let spec = JobSpec {
        job_id: JobId(7),
        swarm: "s".into(),
        idempotency_key: "k".into(),
        model: None,
        submitter: "submitter".into(),
        priority: 0,
        deadline_ms: 0,
        max_attempts: 1,
        submitted_ms: 0,
        payload: Bytes::from_static(b"work"),
    };
    let acknowledged = JobRecord::End(EndRecord {
        job_id: JobId(7),
        swarm: "s".into(),
        idempotency_key: "k".into(),
        kind: EndKind::Acknowledged(JobState::Completed),
        attempt: 1,
        budget_base: 0,
        submitted_ms: 0,
        reason: String::new(),
        payload: Bytes::new(),
    });
    let config = JobsConfig {
        dedup_window_ms: 1_000,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(
        config.clone(),
        [JobRecord::Spec(spec.clone()), acknowledged],
        0,
        1,
    );
    assert_eq!(jobs.counts().jobs, 0);
    let forgets = jobs.tick(2_000).records;
    for wanted in ["s", "l", "j"] {
        let key = format!("{wanted}{:016x}", 7);
        assert!(
            forgets
                .iter()
                .any(|r| r.key() == key && r.payload().is_empty()),
            "{key} not emptied: {forgets:?}"
        );
    }
    // Only the emptied end survived with the full spec: still gone.
    let forgotten = JobRecord::ForgetEnd {
        swarm: "s".into(),
        job_id: JobId(7),
    };
    let restarted = Jobs::new(config, [JobRecord::Spec(spec), forgotten], 0, 1);
    assert_eq!(restarted.counts().jobs, 0);
}

#[test]
fn an_end_acknowledged_after_its_key_left_the_window_is_forgotten_too() {
    let (mut jobs, who) = with_submitter(JobsConfig {
        dedup_window_ms: 1_000,
        ..JobsConfig::default()
    });
    let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
    // The key expires before the job runs and ends.
    jobs.tick(5_000);
    finish_and_ack(&mut jobs, id, "s", 5_001);
    let fx = jobs.tick(5_002);
    assert!(fx
        .records
        .iter()
        .any(|r| matches!(r, JobRecord::ForgetEnd { job_id, .. } if *job_id == id)));
}

#[test]
fn job_logs_are_capped_counting_those_recovered() {
    let config = JobsConfig {
        max_swarms: 3,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config, [], 0, 1);
    jobs.logs_exist([log_swarm("old")]);
    let who = outbox(1);
    accept(&mut jobs, &who, submit("a", "k", None), 0);
    accept(&mut jobs, &who, submit("b", "k", None), 0);
    match jobs.submit("submitter", &who, submit("c", "k", None), 0) {
        Err(refusal) => assert_eq!(refusal.code, ErrorCode::Busy),
        Ok(other) => panic!("expected Busy, got {other:?}"),
    }
    // Swarms whose logs exist go on taking jobs.
    accept(&mut jobs, &who, submit("a", "k2", None), 0);
    accept(&mut jobs, &who, submit("old", "k", None), 0);
}

#[test]
fn a_dead_letter_counts_router_wide_not_against_its_submitter() {
    let config = JobsConfig {
        visibility_timeout_ms: 100,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config, [], 0, 7);
    let who = outbox(1);
    let mut job = submit("s", "k", None);
    job.max_attempts = 1;
    let (id, _) = accept(&mut jobs, &who, job, 0);
    let (_, fx) = worker(&mut jobs, 2, &["s"], 1);
    assert_eq!(leases(&fx).len(), 1);
    let (held, mine) = jobs.bytes_held("submitter");
    assert!(held > 0 && mine == held);
    // Its only attempt expires: dead-lettered.
    let fx = jobs.tick(200);
    assert_eq!(jobs.counts().dead_lettered, 1);
    let (router_wide, mine) = jobs.bytes_held("submitter");
    assert!(router_wide >= held, "its reason is counted too");
    assert_eq!(mine, 0);
    // Re-driven: the submitter's again.
    jobs.finals_written(&fx.finals);
    jobs.redrive("s", &who, 5, id, 300).unwrap();
    assert_eq!(jobs.bytes_held("submitter"), (held, held));
}

#[test]
fn duplicates_get_the_same_job_and_a_full_swarm_is_busy() {
    let config = JobsConfig {
        max_jobs_per_swarm: 2,
        ..JobsConfig::default()
    };
    let mut jobs = Jobs::new(config, [], 0, 1);
    let who = outbox(1);
    let Submitted::New { job_id, .. } = jobs.submit("a", &who, submit("s", "k", None), 0).unwrap()
    else {
        panic!()
    };
    // Not durable yet: the duplicate waits and is answered with the same job.
    assert!(matches!(
        jobs.submit("a", &who, submit("s", "k", None), 0).unwrap(),
        Submitted::Waiting
    ));
    let fx = jobs.submitted(job_id, Ok(()), 0);
    let answers: Vec<JobStatus> = fx
        .frames
        .iter()
        .filter_map(|(_, _, f)| match message(f) {
            Message::JobStatus(status) => Some(status),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|a| a.job_id == job_id));
    assert_eq!(
        answers.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, true]
    );
    let Submitted::Answer(frame) = jobs.submit("a", &who, submit("s", "k", None), 5).unwrap()
    else {
        panic!()
    };
    let Message::JobStatus(status) = message(&frame) else {
        panic!()
    };
    assert!(status.duplicate && status.job_id == job_id);
    accept(&mut jobs, &who, submit("s", "k2", None), 0);
    let busy = jobs
        .submit("a", &who, submit("s", "k3", None), 0)
        .unwrap_err();
    assert_eq!(busy.code, ErrorCode::Busy);
    assert!(busy.retry_after_ms > 0);
    // Past the window the key names a new job.
    let window = JobsConfig::default().dedup_window_ms;
    let mut roomy = Jobs::new(JobsConfig::default(), [], 0, 1);
    let (first, _) = accept(&mut roomy, &who, submit("s", "k", None), 0);
    let (second, _) = accept(&mut roomy, &who, submit("s", "k", None), window);
    assert_ne!(first, second);
}

#[test]
fn a_restart_requeues_unfinished_jobs_and_keeps_undelivered_ends() {
    let mut jobs = Jobs::new(JobsConfig::default(), [], 0, 1);
    let who = outbox(1);
    let mut written = Vec::new();
    for key in ["done", "running"] {
        let Submitted::New { job_id, record } = jobs
            .submit("agent", &who, submit("s", key, None), 0)
            .unwrap()
        else {
            panic!()
        };
        written.push(record);
        written.extend(jobs.submitted(job_id, Ok(()), 0).records);
    }
    let (out, fx) = worker(&mut jobs, 2, &["s"], 2);
    written.extend(fx.records.clone());
    let got = leases(&fx);
    let fx = jobs
        .result(ConnId(2), &out, ok_result(&got[0].1), 1)
        .unwrap();
    written.extend(fx.finals);
    // Restart from what was written.
    let mut restored = Jobs::new(JobsConfig::default(), written, 10, 1);
    let counts = restored.counts();
    assert_eq!(
        (counts.jobs, counts.queued, counts.pending_results),
        (2, 1, 1)
    );
    let agent = outbox(5);
    let fx = restored.connect(ConnId(5), "agent", &agent, None);
    let Message::JobUpdate(update) = message(&fx.frames[0].2) else {
        panic!()
    };
    assert_eq!(
        (update.job_id, update.state),
        (got[0].1.job_id, JobState::Completed)
    );
    assert_eq!(update.payload.as_ref(), b"done");
    // The interrupted job runs again, as its next attempt.
    let (_, fx) = worker(&mut restored, 6, &["s"], 1);
    let again = leases(&fx).pop().unwrap().1;
    assert_eq!((again.job_id, again.attempt), (got[1].1.job_id, 2));
    // Dedup survives too.
    let Submitted::Answer(_) = restored
        .submit("agent", &who, submit("s", "done", None), 20)
        .unwrap()
    else {
        panic!("a duplicate after the restart")
    };
}

#[test]
fn timings_measure_queue_wait_and_run_time_and_count_redeliveries() {
    let (mut jobs, who) = with_submitter(JobsConfig {
        max_attempts: 1,
        ..JobsConfig::default()
    });
    let (first, _) = accept(&mut jobs, &who, submit("s", "a", None), 1_000);
    // Leased 250 ms after it was submitted, and retried once at the worker's request.
    let out = outbox(2);
    jobs.connect(ConnId(2), "worker-2", &out, Some(&["s".to_string()]));
    let fx = jobs.credits(ConnId(2), 1, 1_250);
    let lease = leases(&fx).pop().unwrap().1;
    assert_eq!(lease.job_id, first);
    assert_eq!(jobs.timings().queue_wait_us.len(), 1);
    assert_eq!(jobs.timings().queue_wait_us.max() / 1000, 250);
    assert_eq!(jobs.timings().run_us.len(), 0, "still running");
    let retry = JobResult {
        ok: false,
        retry: true,
        ..ok_result(&lease)
    };
    let dead = jobs.result(ConnId(2), &out, retry, 1_300).unwrap();
    assert_eq!(jobs.timings().run_us.len(), 1);
    assert_eq!(jobs.timings().run_us.max() / 1000, 50);
    // One attempt allowed: the retry dead-letters it.
    assert_eq!(jobs.timings().dead_lettered, 1);
    assert_eq!(jobs.timings().redeliveries, 0);
    jobs.finals_written(&dead.finals);
    let fx = jobs.redrive("s", &who, 5, first, 1_400).unwrap();
    let lease = leases(&fx).pop().expect("re-driven job leased again").1;
    assert_eq!(lease.attempt, 2);
    assert_eq!(jobs.timings().redeliveries, 1);
    assert_eq!(jobs.timings().queue_wait_us.len(), 2);
}

#[test]
fn an_ack_of_a_progress_update_acknowledges_no_end() {
    assert_eq!(AckedEnd::from_wire(3, JobState::Queued), AckedEnd::Any);
    let (mut jobs, who) = with_submitter(JobsConfig::default());
    let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
    let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
    let lease = leases(&fx).pop().unwrap().1;
    let fx = jobs.result(ConnId(2), &out, ok_result(&lease), 1).unwrap();
    jobs.finals_written(&fx.finals);
    // An ack of a progress update (Running) that arrives after the end acknowledges nothing:
    // the end may not have reached the submitter yet.
    let running = AckedEnd::from_wire(lease.attempt, JobState::Running);
    assert!(jobs.ack("submitter", id, running).records.is_empty());
    assert_eq!(jobs.counts().jobs, 1);
    let completed = AckedEnd::from_wire(lease.attempt, JobState::Completed);
    assert!(!jobs.ack("submitter", id, completed).records.is_empty());
    assert_eq!(jobs.counts().jobs, 0);
}

#[test]
fn a_job_cannot_be_cancelled_before_its_spec_is_durable() {
    let (mut jobs, who) = with_submitter(JobsConfig::default());
    let Ok(Submitted::New { job_id, .. }) =
        jobs.submit("submitter", &who, submit("s", "k", None), 0)
    else {
        panic!("a new job");
    };
    // Cancelled now, its Cancelled record could be durable while the spec is not, and
    // `submitted` would then queue it and run it anyway.
    let refused = jobs
        .cancel("submitter", false, &who, 3, job_id, 1)
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Busy);
    assert!(refused.retry_after_ms > 0);
    jobs.submitted(job_id, Ok(()), 2);
    let fx = jobs.cancel("submitter", false, &who, 4, job_id, 3).unwrap();
    assert_eq!(fx.finals.len(), 1);
}

#[test]
fn a_redriven_job_has_no_deadline_after_a_restart_either() {
    let (mut jobs, who) = with_submitter(JobsConfig::default());
    let mut job = submit("s", "k", None);
    job.deadline_ms = 100;
    let Ok(Submitted::New { job_id, record }) = jobs.submit("submitter", &who, job, 0) else {
        panic!("a new job");
    };
    let mut log = vec![record];
    jobs.submitted(job_id, Ok(()), 0);
    // Its deadline passes before any worker takes it: dead-lettered.
    let fx = jobs.tick(200);
    assert_eq!(jobs.counts().dead_lettered, 1);
    jobs.finals_written(&fx.finals);
    log.extend(fx.records);
    log.extend(fx.finals);
    let fx = jobs.redrive("s", &who, 5, job_id, 300).unwrap();
    jobs.finals_written(&fx.finals);
    log.extend(fx.records);
    log.extend(fx.finals);
    // Restarted from the log: queued again, not dead-lettered by the deadline it missed.
    let mut restarted = Jobs::new(JobsConfig::default(), log, 400, 1);
    restarted.tick(500);
    assert_eq!(restarted.counts().dead_lettered, 0);
    assert_eq!(restarted.counts().queued, 1);
}

#[test]
fn a_retried_write_rewrites_only_the_ends_it_held() {
    let config = JobsConfig {
        max_attempts: 1,
        ..JobsConfig::default()
    };
    let (mut jobs, who) = with_submitter(config);
    let (id, _) = accept(&mut jobs, &who, submit("s", "k", None), 0);
    let (out, fx) = worker(&mut jobs, 2, &["s"], 1);
    let lease = leases(&fx).pop().unwrap().1;
    let retry = JobResult {
        ok: false,
        retry: true,
        ..ok_result(&lease)
    };
    let dead = jobs.result(ConnId(2), &out, retry, 1).unwrap();
    // The dead letter's write fails once: rewritten, as it still stands.
    assert_eq!(jobs.unwritten_finals(&dead.finals), dead.finals);
    jobs.finals_written(&dead.finals);
    assert!(
        jobs.unwritten_finals(&dead.finals).is_empty(),
        "durable now"
    );
    // A re-drive's write fails; meanwhile the job runs again and completes, its end
    // written by its own call. The re-drive's retry writes neither.
    let redriven = jobs.redrive("s", &who, 5, id, 2).unwrap();
    let second = leases(&redriven).pop().unwrap().1;
    let completed = jobs.result(ConnId(2), &out, ok_result(&second), 3).unwrap();
    assert!(jobs.unwritten_finals(&redriven.finals).is_empty());
    assert_eq!(jobs.unwritten_finals(&completed.finals), completed.finals);
}
