//! Issues the simulation found in the protocol machines, fixed, and kept as regression
//! tests: each once against the machine directly and once as the seed that found it.
//! `docs/simulation.md` has the analysis.

use bytes::Bytes;
use swarmbus_proto::jobs::{AckedEnd, Jobs, JobsConfig, Submitted};
use swarmbus_proto::ConnId;
use swarmbus_schema::{
    decode, DecodeOptions, JobId, JobLease, JobResult, JobState, Message, OutFrame, SubmitJob,
};
use swarmbus_sim::{run, Config};

fn message(frame: &OutFrame) -> Message {
    let bytes = Bytes::from(frame.to_vec());
    decode(bytes.slice(4..), &DecodeOptions::default()).expect("the job queue's frames decode")
}

fn leased(frames: &[(ConnId, swarmbus_proto::Lane, OutFrame)]) -> JobLease {
    frames
        .iter()
        .find_map(|(_, _, frame)| match message(frame) {
            Message::JobLease(lease) => Some(lease),
            _ => None,
        })
        .expect("a lease")
}

fn outcome(job_id: JobId, attempt: u32, ok: bool, retry: bool) -> JobResult {
    JobResult {
        request_id: 1,
        job_id,
        attempt,
        ok,
        retry,
        payload: Bytes::from_static(b"done"),
    }
}

/// A job with one attempt, whose attempt asked for a retry: dead-lettered, the end
/// durable and its submitter told. The queue, (submitter, worker, controller), the job and
/// its first lease.
fn dead_lettered_job() -> (Jobs<ConnId>, [ConnId; 3], JobId, JobLease) {
    let config = JobsConfig {
        max_attempts: 1,
        ..JobsConfig::default()
    };
    let mut jobs: Jobs<ConnId> = Jobs::new(config, [], 0, 1);
    let (submitter, worker, controller) = (ConnId(1), ConnId(2), ConnId(3));
    jobs.connect(submitter, "submitter", &submitter, None);
    jobs.connect(worker, "worker", &worker, Some(&["s".to_owned()]));
    let submit = SubmitJob {
        request_id: 1,
        swarm: "s".into(),
        idempotency_key: "k".into(),
        payload: Bytes::from_static(b"work"),
        ..SubmitJob::default()
    };
    let Ok(Submitted::New { job_id, .. }) = jobs.submit("submitter", &submitter, submit, 0) else {
        panic!("a new job");
    };
    jobs.submitted(job_id, Ok(()), 0);
    let first = leased(&jobs.credits(worker, 1, 0).frames);
    let dead = jobs
        .result(
            worker,
            &worker,
            outcome(job_id, first.attempt, false, true),
            1,
        )
        .expect("the attempt in force");
    jobs.finals_written(&dead.finals);
    (jobs, [submitter, worker, controller], job_id, first)
}

/// Found by seed 12: `JobAck` named a job, not the end it acknowledged. A submitter that
/// acknowledged a dead-letter notice late, after a controller re-drove the job and it
/// completed, acknowledged the completion it had not seen: the job was forgotten and the
/// completion never sent again, so a submitter whose connection dropped before it read it
/// never got the result.
#[test]
fn a_late_ack_of_a_dead_letter_leaves_its_redriven_completion_to_be_told() {
    // Its only attempt asked for a retry: dead-lettered, and the submitter was told.
    let (mut jobs, [submitter, worker, controller], job_id, first) = dead_lettered_job();
    // A controller re-drives it; it runs again and completes; the submitter is sent the end.
    let redriven = jobs
        .redrive("s", &controller, 2, job_id, 2)
        .expect("a durable dead letter");
    let second = leased(&redriven.frames);
    let completed = jobs
        .result(
            worker,
            &worker,
            outcome(job_id, second.attempt, true, false),
            3,
        )
        .expect("the attempt in force");
    jobs.finals_written(&redriven.finals);
    jobs.finals_written(&completed.finals);
    // The submitter's acknowledgement of the dead-letter notice arrives now; then its
    // connection drops before it read the completion, and it reconnects.
    let dead_letter = AckedEnd::Of {
        attempt: first.attempt,
        state: JobState::DeadLettered,
    };
    jobs.ack("submitter", job_id, dead_letter);
    jobs.disconnect(submitter, 4);
    let reconnected = jobs.connect(ConnId(4), "submitter", &ConnId(4), None);
    let told_again = reconnected.frames.iter().any(|(_, _, frame)| {
        matches!(message(frame), Message::JobUpdate(update) if update.state == JobState::Completed)
    });
    assert!(
        told_again,
        "the completion was acknowledged without being seen, and is lost"
    );
}

/// Found by seed 381: the end records of a call were made durable, then
/// `Jobs::finals_written` was told their job ids, and it announced (and marked durable)
/// whatever end each job had *now*. A re-driven job that completes before its
/// re-drive record is durable has its completion announced when the re-drive record is,
/// before the completion's own record is durable: a crash then loses that record, the job
/// runs again, and the submitter is told a second, different completion.
#[test]
fn a_redrive_record_being_durable_does_not_announce_a_later_completion() {
    let (mut jobs, [_, worker, controller], job_id, _) = dead_lettered_job();
    // Re-driven: its `Redriven` record is on its way to the log.
    let redriven = jobs
        .redrive("s", &controller, 2, job_id, 2)
        .expect("a durable dead letter");
    assert_eq!(redriven.finals.len(), 1);
    // The job runs again and completes: its `Completed` record is on its way too.
    let second = leased(&redriven.frames);
    let completed = jobs
        .result(
            worker,
            &worker,
            outcome(job_id, second.attempt, true, false),
            3,
        )
        .expect("the attempt in force");
    assert_eq!(completed.finals.len(), 1);
    // The `Redriven` record is durable first, and the driver says so.
    let announced = jobs.finals_written(&redriven.finals);
    let premature = announced.frames.iter().any(|(_, _, frame)| {
        matches!(message(frame), Message::JobUpdate(update) if update.state == JobState::Completed)
    });
    assert!(
        !premature,
        "the completion was announced before its record was durable"
    );
}

/// The same issue as the simulation found it: seed 381 (a re-driven job completing).
#[test]
fn seed_381_passes() {
    if let Err(violation) = run(&Config::new(381)) {
        panic!("{violation}");
    }
}

/// The same issue as the simulation found it: seed 12 (the submitter acknowledging
/// dead-letter notices, as `docs/jobs.md`'s example does).
#[test]
fn seed_12_passes() {
    if let Err(violation) = run(&Config::new(12)) {
        panic!("{violation}");
    }
}
