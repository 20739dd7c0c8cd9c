//! The `jobs` scenario: submitters submit jobs (some with repeated idempotency keys),
//! simulated workers run them for `--job-ms` and are killed at random at `--kill-rate` per
//! lease (then reconnect as a new worker). Reports throughput, latencies, and the checks
//! the job queue promises: nothing lost, no end handled twice after the client's dedup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use hdrhistogram::Histogram;
use swarmbus_client::{ClientError, JobDedup, JobEvent, Session};
use swarmbus_schema::{JobId, JobState, Role, SubmitJob};
use tokio::sync::Semaphore;

use crate::rng::Rng;
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Submitting agents, each in its own swarm (at most 64: workers join every swarm).
    #[arg(long, default_value_t = 4)]
    submitters: usize,
    /// Simulated workers, spread over the routers in turn (at least one per router: a job
    /// runs only on the workers of the router it was submitted on).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs to submit in all (duplicates included).
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// How long a job runs, in ms: a constant (`0`, `5`) or a uniform range (`1-20`).
    #[arg(long, default_value = "0")]
    job_ms: JobMs,
    /// Probability that a worker is killed when it receives a lease (it reconnects as a new
    /// worker; its running attempts are retried elsewhere).
    #[arg(long, default_value_t = 0.0)]
    kill_rate: f64,
    /// Share of submits that repeat an earlier idempotency key of the same submitter.
    #[arg(long, default_value_t = 0.05)]
    duplicate_rate: f64,
    /// Jobs each worker runs at once (its credits).
    #[arg(long, default_value_t = 64)]
    credits: u32,
    /// Submits awaiting their acknowledgement per submitter.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Longest wait for the last job ends after the last submit, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain: Duration,
    /// Seed of the kill and duplicate draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Job run time: constant or uniform in a range, in ms.
#[derive(Clone, Copy, Debug)]
pub struct JobMs {
    low: u64,
    high: u64,
}

impl std::str::FromStr for JobMs {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|e| format!("job ms {text:?}: {e}"))
        };
        match text.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (parse(low)?, parse(high)?);
                if low > high {
                    return Err(format!("job ms {text:?}: the range is empty"));
                }
                Ok(JobMs { low, high })
            }
            None => {
                let value = parse(text)?;
                Ok(JobMs {
                    low: value,
                    high: value,
                })
            }
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    submitted: AtomicU64,
    completed: AtomicU64,
    dead_lettered: AtomicU64,
    failed: AtomicU64,
    handled_twice: AtomicU64,
    busy_retries: AtomicU64,
    kills: AtomicU64,
}

struct SubmitterResult {
    unique: usize,
    ended: usize,
    queue_wait_us: Histogram<u64>,
    end_to_end_us: Histogram<u64>,
    last_end: Option<Instant>,
}

fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

// The scenario from set-up to report, in the order it runs (router, workers, submitters,
// the measured phase, the checks, the JSON): its phases share the run's clients and
// counters, and read best in sequence.
pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    crate::report::describe("jobs ended", "submit -> end at the submitter");
    if args.submitters == 0 || args.submitters > 64 || args.workers == 0 || args.jobs == 0 {
        bail!("--submitters must be 1 to 64, --workers and --jobs at least 1");
    }
    let (routers, ca, spawned) = args.router.resolve().await?;
    if args.workers < routers.len() {
        // Each router's job queue is its own: a job submitted on a router without workers
        // would never run.
        bail!(
            "--workers must be at least the number of routers ({}): a job runs only on \
             workers connected to the router it was submitted on",
            routers.len()
        );
    }
    let connector = args.router.connector(&ca).context("TLS setup")?;
    let swarms: Vec<String> = (0..args.submitters).map(|i| format!("jobs-{i}")).collect();
    let totals = Arc::new(Totals::default());
    let runs: Arc<Mutex<HashMap<JobId, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let cpu = crate::cpu::CpuMeter::start(args.router.measured_pid(spawned.as_ref()), "router");
    let start = Instant::now();

    let mut workers = Vec::new();
    for w in 0..args.workers {
        let connector = connector.clone();
        let swarms = swarms.clone();
        let (totals, runs, stop) = (totals.clone(), runs.clone(), stop.clone());
        let (job_ms, kill_rate, credits) = (args.job_ms, args.kill_rate, args.credits);
        let seed = args.seed ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        // Every incarnation of a worker comes back to the same router.
        let router = routers.pick(w);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let mut incarnation = 0;
            while !stop.load(Ordering::Relaxed) {
                incarnation += 1;
                let session = Session::new(
                    format!("worker-{w}-{incarnation}"),
                    Role::Worker,
                    swarms.iter().cloned(),
                );
                let Ok((client, _deliveries)) = connector.connect(router, session).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some(mut events) = client.job_events() else {
                    break;
                };
                if client.set_job_credits(credits).await.is_err() {
                    continue;
                }
                loop {
                    let event = tokio::select! {
                        event = events.recv() => event,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stop.load(Ordering::Relaxed) { break } else { continue }
                        }
                    };
                    let Some(JobEvent::Lease(lease)) = event else {
                        if event.is_none() {
                            break;
                        }
                        continue;
                    };
                    let leased_us = micros(start);
                    *runs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(lease.job_id)
                        .or_insert(0) += 1;
                    if rng.chance(kill_rate) {
                        totals.kills.fetch_add(1, Ordering::Relaxed);
                        client.close();
                        break;
                    }
                    let ms = rng.between(job_ms.low, job_ms.high);
                    let client = client.clone();
                    tokio::spawn(async move {
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let mut result = BytesMut::with_capacity(16);
                        result.put_slice(&lease.payload[..8.min(lease.payload.len())]);
                        result.put_u64(leased_us);
                        // A fenced or closed attempt's result is refused; the job runs again.
                        let _ = client
                            .finish_job(lease.job_id, lease.attempt, true, false, result.freeze())
                            .await;
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let per_submitter = args.jobs.div_ceil(args.submitters);
    let mut submitters = Vec::new();
    for (i, swarm) in swarms.iter().enumerate() {
        let count = per_submitter.min(args.jobs.saturating_sub(i * per_submitter));
        let connector = connector.clone();
        let swarm = swarm.clone();
        let totals = totals.clone();
        let (window, duplicate_rate, drain) = (args.window, args.duplicate_rate, args.drain);
        let seed = args.seed ^ (i as u64 + 1).wrapping_mul(0x9FB2_1C65_1E98_DF25);
        let router = routers.pick(i);
        submitters.push(tokio::spawn(async move {
            let session = Session::new(format!("submitter-{i}"), Role::Agent, [swarm.clone()]);
            let (client, _deliveries) = connector
                .connect(router, session)
                .await
                .with_context(|| format!("submitter {i} connecting to {router}"))?;
            let mut updates = client.job_updates().context("job updates")?;
            let submit_at = Arc::new(Mutex::new(HashMap::<JobId, u64>::with_capacity(count)));
            let window = Arc::new(Semaphore::new(window.max(1)));
            let mut rng = Rng::new(seed);
            let sender = {
                let (client, totals, submit_at) =
                    (client.clone(), totals.clone(), submit_at.clone());
                tokio::spawn(async move {
                    // Finished submits are reaped as the loop goes: a task's memory is
                    // held until its handle is joined, and keeping every handle to the
                    // end made the loadgen fault in fresh pages for each job.
                    let mut tasks = tokio::task::JoinSet::new();
                    for n in 0..count {
                        while let Some(done) = tasks.try_join_next() {
                            done??;
                        }
                        let key = if n > 0 && rng.chance(duplicate_rate) {
                            format!("k{}", rng.next() % n as u64)
                        } else {
                            format!("k{n}")
                        };
                        let permit = window.clone().acquire_owned().await?;
                        let (client, totals, submit_at) =
                            (client.clone(), totals.clone(), submit_at.clone());
                        let swarm = swarm.clone();
                        tasks.spawn(async move {
                            let _permit = permit;
                            let at = micros(start);
                            let mut payload = BytesMut::with_capacity(8);
                            payload.put_u64(at);
                            let job = SubmitJob {
                                swarm,
                                idempotency_key: key,
                                payload: payload.freeze(),
                                ..SubmitJob::default()
                            };
                            loop {
                                match client.submit_job(job.clone()).await {
                                    Ok(status) => {
                                        totals.submitted.fetch_add(1, Ordering::Relaxed);
                                        submit_at
                                            .lock()
                                            .unwrap_or_else(|p| p.into_inner())
                                            .entry(status.job_id)
                                            .or_insert(at);
                                        return Ok::<(), ClientError>(());
                                    }
                                    Err(ClientError::Refused {
                                        code: 15,
                                        retry_after_ms,
                                        ..
                                    }) => {
                                        totals.busy_retries.fetch_add(1, Ordering::Relaxed);
                                        crate::report::refused(1);
                                        let wait = u64::from(retry_after_ms).max(1);
                                        tokio::time::sleep(Duration::from_millis(wait)).await;
                                    }
                                    Err(error) => return Err(error),
                                }
                            }
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done??;
                    }
                    anyhow::Ok(())
                })
            };
            let mut dedup = JobDedup::default();
            let mut handled: HashMap<JobId, u32> = HashMap::with_capacity(count);
            let mut queue_wait_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut end_to_end_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut last_end = None;
            let mut sent_all_at: Option<Instant> = None;
            loop {
                let unique = submit_at.lock().unwrap_or_else(|p| p.into_inner()).len();
                if sender.is_finished() && sent_all_at.is_none() {
                    sent_all_at = Some(Instant::now());
                }
                if sent_all_at.is_some() && handled.len() >= unique {
                    break;
                }
                if sent_all_at.is_some_and(|at| at.elapsed() > drain) {
                    break;
                }
                let update = tokio::select! {
                    update = updates.recv() => update,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                };
                let Some(update) = update else { break };
                if !update.state.is_final() || !dedup.first_time(&update) {
                    continue;
                }
                let now = micros(start);
                let count = handled.entry(update.job_id).or_insert(0);
                *count += 1;
                if *count > 1 {
                    totals.handled_twice.fetch_add(1, Ordering::Relaxed);
                }
                match update.state {
                    JobState::Completed => {
                        totals.completed.fetch_add(1, Ordering::Relaxed);
                        if update.payload.len() >= 16 {
                            let mut p: &[u8] = &update.payload;
                            let submitted = bytes::Buf::get_u64(&mut p);
                            let leased = bytes::Buf::get_u64(&mut p);
                            queue_wait_us
                                .saturating_record(leased.saturating_sub(submitted).max(1));
                        }
                    }
                    JobState::DeadLettered => {
                        totals.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        totals.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let submitted = submit_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&update.job_id)
                    .copied();
                if let Some(at) = submitted {
                    end_to_end_us.saturating_record(now.saturating_sub(at).max(1));
                    crate::report::latency_us(now.saturating_sub(at));
                }
                crate::report::count(1);
                last_end = Some(Instant::now());
                let _ = client.ack_job(&update).await;
            }
            if !sender.is_finished() {
                sender.abort();
            } else {
                sender.await.context("the submit task")??;
            }
            let unique = submit_at.lock().unwrap_or_else(|p| p.into_inner()).len();
            anyhow::Ok(SubmitterResult {
                unique,
                ended: handled.len(),
                queue_wait_us,
                end_to_end_us,
                last_end,
            })
        }));
    }

    let progress = {
        let totals = totals.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "jobs: {:.0}s submitted {} completed {} dead-lettered {} kills {}",
                    start.elapsed().as_secs_f64(),
                    totals.submitted.load(Ordering::Relaxed),
                    totals.completed.load(Ordering::Relaxed),
                    totals.dead_lettered.load(Ordering::Relaxed),
                    totals.kills.load(Ordering::Relaxed),
                );
            }
        })
    };

    let mut unique_jobs = 0;
    let mut ended = 0;
    let mut queue_wait = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut end_to_end = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut last_end = start;
    for submitter in submitters {
        let result = submitter.await.context("a submitter task")??;
        unique_jobs += result.unique;
        ended += result.ended;
        queue_wait.add(&result.queue_wait_us)?;
        end_to_end.add(&result.end_to_end_us)?;
        if let Some(at) = result.last_end {
            last_end = last_end.max(at);
        }
    }
    let cpu = cpu.report();
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), worker).await;
    }
    drop(spawned);

    let executed_more_than_once: u64 = runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|runs| u64::from(runs.saturating_sub(1)))
        .sum();
    let completed = totals.completed.load(Ordering::Relaxed);
    let dead_lettered = totals.dead_lettered.load(Ordering::Relaxed);
    let elapsed_s = last_end.duration_since(start).as_secs_f64().max(1e-9);
    let report = serde_json::json!({
        "scenario": "jobs",
        "submitters": args.submitters,
        "workers": args.workers,
        "kill_rate": args.kill_rate,
        "submitted": totals.submitted.load(Ordering::Relaxed),
        "unique_jobs": unique_jobs,
        "completed": completed,
        "failed": totals.failed.load(Ordering::Relaxed),
        "lost": unique_jobs.saturating_sub(ended),
        "results_delivered_twice": totals.handled_twice.load(Ordering::Relaxed),
        "executed_more_than_once": executed_more_than_once,
        "dead_lettered": dead_lettered,
        "kills": totals.kills.load(Ordering::Relaxed),
        "busy_retries": totals.busy_retries.load(Ordering::Relaxed),
        "elapsed_s": elapsed_s,
        "jobs_per_s": completed as f64 / elapsed_s,
        "queue_wait_us": {"p50": queue_wait.value_at_quantile(0.5), "p99": queue_wait.value_at_quantile(0.99)},
        "end_to_end_us": {"p50": end_to_end.value_at_quantile(0.5), "p99": end_to_end.value_at_quantile(0.99)},
        "cpu": cpu,
    });
    crate::report::summary(&report);
    crate::cpu::warn_if_loadgen_bound(&report["cpu"]);
    if args.json {
        println!("{report}");
    } else {
        for (key, value) in report.as_object().into_iter().flatten() {
            println!("{key:>24}  {value}");
        }
    }
    if unique_jobs > ended {
        bail!("{} jobs never ended", unique_jobs - ended);
    }
    Ok(())
}
