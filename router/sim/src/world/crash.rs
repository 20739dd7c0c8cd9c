//! Crashes and restarts: the router's memory is gone, the log keeps what was durable
//! (a killed process keeps a seeded prefix of what it had written too), every connection
//! closes, and a new router starts from the log as the real one does.

use std::collections::BTreeSet;

use super::*;
use crate::log::CrashKind;
use crate::router::restore::restored_control;
use crate::router::SimRouter;

impl World {
    pub(super) fn crash(&mut self) -> String {
        let kind = if self.rng.chance(50) {
            CrashKind::PowerLoss
        } else {
            CrashKind::ProcessKill
        };
        let lost = self.log.crash(kind, &mut self.rng);
        let faulty = self.inject_fault();
        let mut closed = BTreeSet::new();
        for client in &mut self.clients {
            if let Some(conn) = client.conn {
                closed.insert(conn);
                client.disconnected();
            }
        }
        self.oracle.crashed();
        self.oracle.conns_closed(&closed);
        let downtime = self.rng.between(10, 1_500);
        self.clock.elapsed_ms += downtime;
        let seed = self.rng.next_u64();
        self.absorb_driver_counts();
        self.router = SimRouter::start(&self.log, self.clock.now(), seed);
        self.router.danger_skip_stamp_check = self.fault == Some(Fault::SkipStampCheck);
        self.leases_held_again();
        self.stats.crashes += 1;
        self.stats.records_lost += lost as u64;
        self.restarted = true;
        format!(
            "crash ({kind:?}): {lost} unsynced records lost{faulty}, restart after {downtime}ms"
        )
    }

    /// A restart holds each lease whose newest record names a holder for that record's
    /// TTL from now: the oracle learns of it from the records themselves.
    fn leases_held_again(&mut self) {
        let now_ms = self.now_ms();
        for ((swarm, name), lease) in restored_control(&self.log).leases {
            if let (Some(ttl_ms), false) = (lease.ttl_ms, lease.holder.is_empty()) {
                let until_ms = now_ms + ttl_ms;
                self.oracle.lease_restored(
                    &swarm,
                    &name,
                    lease.token,
                    &lease.holder,
                    until_ms,
                    now_ms,
                );
            }
        }
    }

    /// The fault a checker test injects at a crash; `""` when none.
    fn inject_fault(&mut self) -> String {
        match self.fault {
            Some(Fault::LoseDurableRecord) => {
                // The swarm whose newest durable op was acknowledged, so the loss breaks
                // a promise.
                let acked = self.oracle.acked.keys().rev().find_map(|(swarm, _, op)| {
                    let newest = self.log.swarm(swarm)?.last_durable();
                    (newest == *op).then(|| swarm.clone())
                });
                let swarm = acked.unwrap_or_else(|| "s0".to_owned());
                match self.log.lose_newest_durable(&swarm) {
                    Some(op) => format!(", fault: {swarm} op {} lost", op.0),
                    None => String::new(),
                }
            }
            _ => String::new(),
        }
    }
}
