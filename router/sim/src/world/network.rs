//! Connections, and the router's background work that the simulation schedules: the
//! clock, the log writer's syncs in seeded batches, its durable reports delivered late
//! and out of order, and catch-up reads finishing.

use std::collections::BTreeSet;

use swarmbus_proto::ConnId;
use swarmbus_schema::Class;

use super::*;
use crate::clients::{Role, JOB_SWARM, SWARMS};

impl World {
    /// The clock moves on by a seeded amount (mostly short), and the router's periodic
    /// work runs.
    pub(super) fn advance(&mut self) -> String {
        let elapsed = if self.rng.chance(80) {
            self.rng.between(1, 40)
        } else {
            self.rng.between(40, 600)
        };
        self.advance_by(elapsed);
        format!("advance {elapsed}ms to t={}", self.clock.elapsed_ms)
    }

    pub(super) fn advance_by(&mut self, elapsed_ms: u64) {
        self.clock.elapsed_ms += elapsed_ms;
        self.drive(|router, io| router.periodic(io));
    }

    /// The writer syncs a seeded batch: a prefix of some swarms' unsynced records, each
    /// reported durable (the report reaches the core later).
    pub(super) fn sync(&mut self) -> String {
        let mut synced = Vec::new();
        for swarm in self.log.unsynced() {
            if !self.rng.chance(60) {
                continue;
            }
            let count = self.rng.between(1, 8) as usize;
            if let Some(up_to) = self.log.sync(&swarm, count) {
                synced.push(format!("{swarm}<={}", up_to.0));
                self.router
                    .notifications
                    .push((swarm.as_str().into(), up_to));
            }
        }
        format!("sync [{}]", synced.join(" "))
    }

    /// One durable report reaches the core, in seeded order.
    pub(super) fn notify(&mut self) -> String {
        let Some(at) = self.rng.index(self.router.notifications.len()) else {
            return "notify: none".into();
        };
        let (swarm, up_to) = self.router.notifications.remove(at);
        self.drive(|router, io| router.durable(io, &swarm, up_to));
        format!("durable {swarm} up to {}", up_to.0)
    }

    /// One planned catch-up read finishes.
    pub(super) fn read(&mut self) -> String {
        let Some(at) = self.rng.index(self.router.reads.len()) else {
            return "read: none".into();
        };
        let read = self.router.reads[at].clone();
        self.drive(|router, io| router.complete_read(io, at));
        format!(
            "read {} {:?} of {:?} from {} to {}",
            read.swarm, read.class, read.conn, read.from.0, read.to.0
        )
    }

    pub(super) fn connect_one(&mut self) -> String {
        let offline: Vec<usize> = (0..self.clients.len())
            .filter(|i| self.clients[*i].conn.is_none())
            .collect();
        let Some(at) = self.rng.index(offline.len()) else {
            return "connect: all connected".into();
        };
        self.connect(offline[at])
    }

    /// Client `index` connects (a new connection id) and sets up as its role does:
    /// subscribers resume every ordered class from what they applied, workers give credits.
    pub(super) fn connect(&mut self, index: usize) -> String {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.clients[index].conn = Some(conn);
        let agent = self.clients[index].agent.clone();
        let role = self.clients[index].role;
        let worker_swarms = vec![JOB_SWARM.to_owned()];
        let worker = (role == Role::Worker).then_some(worker_swarms.as_slice());
        self.drive(|router, io| router.connect_jobs(io, conn, &agent, worker));
        let mut resumed = Vec::new();
        if role == Role::Subscriber {
            for swarm in SWARMS {
                for class in [Class::Control, Class::Command, Class::Telemetry] {
                    let resume = self.clients[index].resume_point(swarm, class);
                    if let Some((_, op)) = resume {
                        resumed.push(format!("{swarm}/{class:?}>{}", op.0));
                    }
                    self.drive(|router, io| {
                        router.subscribe(io, conn, &agent, swarm, class, resume)
                    });
                }
            }
        }
        if role == Role::Worker {
            let credits = self.rng.between(1, 3) as u32;
            self.drive(|router, io| router.credits(io, conn, credits));
            resumed.push(format!("credits {credits}"));
        }
        format!("connect {agent} as {conn:?} [{}]", resumed.join(" "))
    }

    pub(super) fn disconnect_one(&mut self) -> String {
        let online: Vec<usize> = (0..self.clients.len())
            .filter(|i| self.clients[*i].conn.is_some())
            .collect();
        let Some(at) = self.rng.index(online.len()) else {
            return "disconnect: none connected".into();
        };
        self.disconnect(online[at])
    }

    /// Client `index`'s connection closes; the router forgets it.
    pub(super) fn disconnect(&mut self, index: usize) -> String {
        let Some(conn) = self.clients[index].conn else {
            return "disconnect: not connected".into();
        };
        self.clients[index].disconnected();
        self.oracle.conns_closed(&BTreeSet::from([conn]));
        self.drive(|router, io| router.disconnect(io, conn));
        format!("disconnect {} ({conn:?})", self.clients[index].agent)
    }
}
