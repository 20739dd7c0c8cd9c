//! The invariants that read the log: run after every step, read-only, drawing no
//! randomness (so checking never changes a run). The oracle ([`crate::oracle`]) checks
//! promises as they are made; this module checks them against what is stored, and what
//! each subscriber applied against the log.

use std::collections::BTreeSet;

use bytes::Bytes;
use swarmbus_proto::core::targeted_elsewhere;
use swarmbus_schema::{Class, Deliver, Epoch, JobId, OpId};

use crate::clients::{Client, Role};
use crate::log::SimLog;
use crate::oracle::{Broken, Oracle};
use crate::router::SimRouter;

fn broken(invariant: &'static str, detail: String) -> Result<(), Broken> {
    Err(Broken { invariant, detail })
}

/// What a subscriber applied, kept to check it against the log later.
pub type Applied = (Epoch, OpId, Bytes);

/// A subscriber runs `deliver` through the client library's `IdempotentApply`; what it
/// applies must be a durable op of the log, with its payload, the next one of its class
/// it wants (none skipped, none twice), and pass its `FencingFilter`. Returns whether it
/// was applied.
pub fn apply_delivery(
    client: &mut Client,
    deliver: &Deliver,
    log: &SimLog,
    oracle: &mut Oracle,
) -> bool {
    if !deliver.class.is_ordered() {
        if !deliver.op_id.is_none() {
            let detail = format!("telemetry of {} with op {}", deliver.swarm, deliver.op_id.0);
            oracle.broke("unordered classes are never sequenced", detail);
        }
        return false;
    }
    if client.apply.apply(deliver, |_| ()).is_none() {
        return false;
    }
    let key = (deliver.swarm.clone(), deliver.class);
    let previous = client.applied.get(&key).cloned();
    if let Err(why) = applied_in_log(deliver, previous.as_ref(), &client.agent, log) {
        oracle.broken.push(why);
    }
    client
        .applied
        .insert(key, (deliver.epoch, deliver.op_id, deliver.payload.clone()));
    if deliver.class == Class::Command && !client.fencing.admit(deliver) {
        let detail = format!(
            "{} op {}: token {} after a newer one in op order",
            deliver.swarm, deliver.op_id.0, deliver.fencing_token
        );
        oracle.broke(
            "a command with a stale fencing token is never accepted",
            detail,
        );
    }
    true
}

fn applied_in_log(
    deliver: &Deliver,
    previous: Option<&Applied>,
    agent: &str,
    log: &SimLog,
) -> Result<(), Broken> {
    let (swarm, op) = (&deliver.swarm, deliver.op_id);
    let Some(stored) = log.swarm(swarm) else {
        return broken(
            "subscribers apply only durable ops",
            format!("{swarm} has no log"),
        );
    };
    let record = stored.durable_deliver(op);
    let matches = stored.epoch == deliver.epoch
        && record
            .as_ref()
            .is_some_and(|r| r.payload == deliver.payload && r.class == deliver.class);
    if !matches {
        let detail = format!(
            "{agent} applied {swarm} op {} (epoch {}), not durable as delivered",
            op.0, deliver.epoch.0
        );
        return broken("subscribers apply only durable ops", detail);
    }
    let Some((epoch, last, _)) = previous.filter(|(epoch, _, _)| *epoch == deliver.epoch) else {
        return Ok(());
    };
    if op <= *last {
        let detail = format!("{agent} applied {swarm} op {} after op {}", op.0, last.0);
        return broken("each op is applied once, in op order", detail);
    }
    let skipped = (last.0 + 1..op.0).find(|between| {
        stored.durable_deliver(OpId(*between)).is_some_and(|r| {
            r.class == deliver.class && !targeted_elsewhere(r.target_agent.as_deref(), agent)
        })
    });
    if let Some(skipped) = skipped {
        let detail = format!(
            "{agent} applied {swarm} {:?} op {} after op {} (epoch {}), skipping op {skipped}",
            deliver.class, op.0, last.0, epoch.0
        );
        return broken("op ids are gap-free as applied", detail);
    }
    Ok(())
}

/// Checks after every step.
pub fn after_step(
    oracle: &mut Oracle,
    router: &SimRouter,
    log: &SimLog,
    clients: &[Client],
) -> Result<(), Broken> {
    if let Some(first) = oracle.broken.first() {
        return Err(first.clone());
    }
    if let Some(refused) = router.refused_appends.first() {
        return broken("op ids are gap-free in the log", refused.0.clone());
    }
    sequencers_match_log(router, log)?;
    new_acks_in_log(oracle, log)?;
    library_agrees(clients)
}

/// Every swarm's sequencer gives out the op after the last one logged, and reports no
/// more durable than the log holds (durable <= next).
fn sequencers_match_log(router: &SimRouter, log: &SimLog) -> Result<(), Broken> {
    for (name, stored) in log.swarms() {
        let next = router.core.next_op(name);
        let durable = router.core.durable_op(name);
        if next.0 != stored.last_written().0 + 1 || durable > stored.last_durable() {
            let detail = format!(
                "{name}: next op {}, durable {}; the log holds {} ops, {} durable",
                next.0,
                durable.0,
                stored.last_written().0,
                stored.last_durable().0
            );
            return broken("op ids are gap-free in the log", detail);
        }
    }
    Ok(())
}

/// An acknowledged op is durable in the log, with the payload its publisher sent.
fn acked_in_log(
    log: &SimLog,
    swarm: &str,
    epoch: Epoch,
    op: OpId,
    payload: &Bytes,
) -> Result<(), Broken> {
    let stored = log.swarm(swarm);
    let found = stored
        .filter(|s| s.epoch == epoch)
        .and_then(|s| s.durable_deliver(op))
        .is_some_and(|d| d.payload == *payload);
    if found {
        return Ok(());
    }
    let detail = format!(
        "{swarm} op {} (epoch {}) is not in the log as acknowledged",
        op.0, epoch.0
    );
    broken("nothing acknowledged to a publisher is lost", detail)
}

fn new_acks_in_log(oracle: &mut Oracle, log: &SimLog) -> Result<(), Broken> {
    for acked in std::mem::take(&mut oracle.new_acks) {
        acked_in_log(log, &acked.swarm, acked.epoch, acked.op, &acked.payload)?;
        oracle
            .acked
            .insert((acked.swarm, acked.epoch, acked.op), acked.payload);
    }
    Ok(())
}

/// The simulation's record of what each subscriber applied agrees with the library's.
fn library_agrees(clients: &[Client]) -> Result<(), Broken> {
    for client in clients.iter().filter(|c| c.role == Role::Subscriber) {
        for ((swarm, class), (_, op, _)) in &client.applied {
            let library = client.apply.last_applied_of(swarm, *class);
            if library != *op {
                let detail = format!(
                    "{} {swarm} {class:?}: library at {}, applied {}",
                    client.agent, library.0, op.0
                );
                return broken("each op is applied once, in op order", detail);
            }
        }
    }
    Ok(())
}

/// Checks after a restart: every op acknowledged or applied is still in the log, lease
/// tokens did not go back, and every job the submitter was told is durable is back.
pub fn after_restart(
    oracle: &Oracle,
    router: &SimRouter,
    log: &SimLog,
    clients: &[Client],
) -> Result<(), Broken> {
    for ((swarm, epoch, op), payload) in &oracle.acked {
        acked_in_log(log, swarm, *epoch, *op, payload)?;
    }
    for client in clients.iter().filter(|c| c.role == Role::Subscriber) {
        for ((swarm, _), (epoch, op, payload)) in &client.applied {
            if acked_in_log(log, swarm, *epoch, *op, payload).is_err() {
                let detail = format!(
                    "{} applied {swarm} op {}, gone after the restart",
                    client.agent, op.0
                );
                return broken("nothing delivered to a subscriber is lost", detail);
            }
        }
    }
    for ((swarm, name), told) in &oracle.told {
        let told_max = told.iter().map(|t| t.token).max().unwrap_or(0);
        let newest = router.leases.newest(swarm, name);
        if newest < told_max {
            let detail = format!(
                "{swarm}/{name}: newest token {newest} after a restart, {told_max} was told"
            );
            return broken("fencing tokens strictly increase", detail);
        }
    }
    jobs_restored(oracle, router)
}

fn jobs_restored(oracle: &Oracle, router: &SimRouter) -> Result<(), Broken> {
    let (listed, _) = router.jobs.list(None, JobId(0), usize::MAX);
    let held: BTreeSet<JobId> = listed.iter().map(|j| j.job_id).collect();
    let lost = oracle
        .jobs
        .iter()
        .find(|(id, w)| w.durable && !w.acked_by_submitter && !held.contains(id));
    match lost {
        Some((id, _)) => broken(
            "no durably submitted job is lost",
            format!("job {} is not held after the restart", id.0),
        ),
        None => Ok(()),
    }
}

/// Checks once the run has drained (no faults, everything delivered): every durable job
/// ended at its submitter, and every subscriber applied the last op it wants of each
/// class it applies.
pub fn after_drain(oracle: &Oracle, log: &SimLog, clients: &[Client]) -> Result<(), Broken> {
    if let Some((id, _)) = oracle.jobs.iter().find(|(_, w)| w.durable && !w.ended) {
        let detail = format!("job {} never ended at its submitter", id.0);
        return broken("no durably submitted job is lost", detail);
    }
    for client in clients.iter().filter(|c| c.role == Role::Subscriber) {
        for ((swarm, class), (epoch, op, _)) in &client.applied {
            let Some(stored) = log.swarm(swarm).filter(|s| s.epoch == *epoch) else {
                continue;
            };
            let last_wanted = (1..=stored.last_durable().0).rev().find(|o| {
                stored.durable_deliver(OpId(*o)).is_some_and(|r| {
                    r.class == *class
                        && !targeted_elsewhere(r.target_agent.as_deref(), &client.agent)
                })
            });
            if last_wanted.is_some_and(|last| last > op.0) {
                let detail = format!(
                    "{} applied {swarm} {class:?} up to op {}, the log holds op {}",
                    client.agent,
                    op.0,
                    last_wanted.unwrap_or_default()
                );
                return broken("every durable op reaches its subscribers", detail);
            }
        }
    }
    Ok(())
}
