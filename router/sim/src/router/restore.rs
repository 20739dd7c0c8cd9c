//! Starting the router from the log, as `router/src/server/start.rs` (`recover`) and
//! `spawn_shard` do: every swarm's sequencer continues after its last record, the control
//! plane's leases come back from `$control`, the job queue from the `$jobs.*` logs.

use std::collections::HashMap;

use swarmbus_proto::control::{LeaseLimits, Leases, Restored, CONTROL_SWARM};
use swarmbus_proto::core::{Core, CoreConfig};
use swarmbus_proto::jobs::{JobRecord, Jobs, JobsConfig, JOBS_SWARM_PREFIX};
use swarmbus_proto::quota::SwarmBudget;
use swarmbus_schema::{JobId, OpId};

use super::*;

/// The longest lease TTL the simulated router grants (and holds a lease of unknown TTL for
/// after a restart).
pub const MAX_LEASE_TTL_MS: u64 = 600_000;

/// The job queue's settings in the simulation: short leases and backoffs so that expiry,
/// retries and dead letters happen within a run, and a payload cache small enough that
/// some leases read their payload back from the log.
pub fn jobs_config() -> JobsConfig {
    JobsConfig {
        visibility_timeout_ms: 400,
        backoff_base_ms: 20,
        backoff_cap_ms: 400,
        max_attempts: 3,
        payload_cache_bytes: 96,
        ..JobsConfig::default()
    }
}

impl SimRouter {
    /// A router started on `log` at `now` (a fresh start on an empty log, or a restart after
    /// a crash): the machines hold only what the log's records give back. `seed` seeds the
    /// core's epochs and the job queue's backoff jitter.
    pub fn start(log: &SimLog, now: Now, seed: u64) -> Self {
        let mut core = Core::with_config(CoreConfig {
            swarms: SwarmBudget::new(1_000, usize::MAX),
            epoch_seed: seed,
            redelivery_timeout: REDELIVERY_TIMEOUT,
            delta_max_ops: 4_096,
        });
        for (name, swarm) in log.swarms() {
            core.restore_swarm(name, swarm.epoch, swarm.last_written(), None);
        }
        SimRouter {
            core,
            leases: restore_leases(log, now.unix_ms),
            jobs: restore_jobs(log, now.unix_ms, seed.rotate_left(17)),
            waiters: BTreeMap::new(),
            finals: BTreeMap::new(),
            next_internal: 1,
            next_group: 1,
            reads: Vec::new(),
            reads_in_flight: BTreeSet::new(),
            notifications: Vec::new(),
            internal_answers: Vec::new(),
            last_core_tick_ms: now.unix_ms,
            last_sweep_ms: now.unix_ms,
            refused_appends: Vec::new(),
            counts: DriverCounts::default(),
            danger_skip_stamp_check: false,
        }
    }
}

/// The (key, payload) of each durable record of one of the router's own swarms, oldest
/// first (`read_records`).
pub fn internal_records(log: &SimLog, swarm: &str) -> Vec<(String, Bytes)> {
    log.durable_records(swarm)
        .iter()
        .filter_map(|record| deliver_of(&record.frame))
        .filter_map(|deliver| Some((deliver.key?, deliver.payload)))
        .collect()
}

/// The control plane's records read back (what `Leases::restore` starts from).
pub fn restored_control(log: &SimLog) -> Restored {
    let mut restored = Restored::default();
    for (key, payload) in internal_records(log, CONTROL_SWARM) {
        restored.apply(&key, &payload);
    }
    restored
}

fn restore_leases(log: &SimLog, now_ms: u64) -> Leases {
    Leases::restore(
        restored_control(log).leases,
        now_ms,
        MAX_LEASE_TTL_MS,
        LeaseLimits::default(),
    )
}

/// The job queue from every job log's durable records (`read_job_records`), with the op
/// of each spec record so payloads past the cache are read back from the log.
fn restore_jobs(log: &SimLog, now_ms: u64, seed: u64) -> Jobs<ConnId> {
    let mut records = Vec::new();
    let mut spec_ops: HashMap<JobId, OpId> = HashMap::new();
    let mut names = Vec::new();
    for (name, _) in log
        .swarms()
        .filter(|(name, _)| name.starts_with(JOBS_SWARM_PREFIX))
    {
        names.push(name.to_owned());
        for record in log.durable_records(name) {
            let Some(deliver) = deliver_of(&record.frame) else {
                continue;
            };
            let parsed = deliver
                .key
                .as_deref()
                .and_then(|key| JobRecord::parse(key, &deliver.payload));
            if let Some(parsed) = parsed {
                if let JobRecord::Spec(spec) = &parsed {
                    spec_ops.insert(spec.job_id, record.op);
                }
                records.push(parsed);
            }
        }
    }
    let mut jobs = Jobs::new(jobs_config(), records, now_ms, seed);
    jobs.restored_spec_ops(&spec_ops);
    jobs.logs_exist(names);
    jobs
}
