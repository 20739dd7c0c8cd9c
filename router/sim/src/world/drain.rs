//! The end of a run: no more faults; everyone connects, the writer syncs everything, every
//! report and read completes, clients read all they are sent, workers finish what they
//! run, and the clock moves on until nothing is left to do. Then the liveness checks: what
//! is durable reached its subscribers, every durable job ended at its submitter.

use super::*;
use crate::clients::Role;

/// Rounds of the drain at most (each moves the clock 25 ms, so retries, backoffs and
/// lease expiries all come due).
const DRAIN_ROUNDS: u64 = 400;

impl World {
    /// Drains the run, checking after every round, then the liveness checks.
    pub fn drain(&mut self) -> Result<(), Broken> {
        for round in 0..DRAIN_ROUNDS {
            self.step += 1;
            self.drain_round();
            self.trace.record(self.step, format!("drain round {round}"));
            self.check()?;
            if round > 40 && self.quiet() {
                break;
            }
        }
        crate::check::after_drain(&self.oracle, &self.log, &self.clients)
    }

    fn drain_round(&mut self) {
        for index in 0..self.clients.len() {
            if self.clients[index].conn.is_none() {
                self.connect(index);
            }
        }
        for swarm in self.log.unsynced() {
            if let Some(up_to) = self.log.sync(&swarm, usize::MAX) {
                self.router
                    .notifications
                    .push((swarm.as_str().into(), up_to));
            }
        }
        while !self.router.notifications.is_empty() {
            let (swarm, up_to) = self.router.notifications.remove(0);
            self.drive(|router, io| router.durable(io, &swarm, up_to));
        }
        while !self.router.reads.is_empty() {
            self.drive(|router, io| router.complete_read(io, 0));
        }
        for index in 0..self.clients.len() {
            self.drain_client(index);
        }
        self.advance_by(25);
    }

    /// A client reads everything queued, then does what is left: subscribers acknowledge,
    /// workers finish, submitters acknowledge ends.
    fn drain_client(&mut self, index: usize) {
        while let Some(lane) = self.clients[index].inbox.ready_lanes().first().copied() {
            if let Some(message) = self.clients[index].inbox.pop(lane) {
                self.handle(index, message);
            }
        }
        match self.clients[index].role {
            Role::Worker => {
                let running: Vec<_> = self.clients[index]
                    .running
                    .iter()
                    .map(|(j, a)| (*j, *a))
                    .collect();
                for (job_id, attempt) in running {
                    self.send_result(index, job_id, attempt, true, false);
                }
            }
            Role::Submitter => {
                while !self.clients[index].ends_to_ack.is_empty() {
                    self.ack_end(index);
                }
            }
            Role::Subscriber => {
                let applied: Vec<_> = self.clients[index]
                    .applied
                    .iter()
                    .map(|((swarm, class), (_, op, _))| (swarm.clone(), *class, *op))
                    .collect();
                let conn = self.clients[index].conn.unwrap_or(ConnId(0));
                for (swarm, class, op) in applied {
                    self.drive(|router, io| router.ack(io, conn, &swarm, class, op));
                }
            }
            Role::Controller => {}
        }
    }

    /// Nothing left anywhere: no unsynced record, nothing in flight in the router, nothing
    /// queued for a client, no attempt running.
    fn quiet(&self) -> bool {
        self.log.unsynced().is_empty()
            && !self.router.busy()
            && self
                .clients
                .iter()
                .all(|c| c.inbox.is_empty() && c.running.is_empty())
            && self.router.jobs.counts().queued == 0
    }
}
