//! Fault injection for swarmbus's tests and the loadgen.
//!
//! [`FaultProxy`] is a seeded UDP proxy on loopback that sits between QUIC clients and a
//! router: each direction of each flow (one client address) drops, duplicates, delays and
//! reorders datagrams, caps bandwidth, and can be partitioned (one way or both) and healed,
//! by the caller, on a schedule or at random.
//! The fault of each datagram is drawn from a generator seeded by the proxy's seed, the
//! flow's number and the direction, in the order the datagrams arrive: the same seed and
//! the same datagrams give the same faults (see docs/chaos.md for what that means with
//! QUIC, whose own traffic varies from run to run).

mod proxy;

pub use proxy::{Cut, Direction, FaultPlan, FaultProxy, FaultTotals, RandomPartitions, Scheduled};
