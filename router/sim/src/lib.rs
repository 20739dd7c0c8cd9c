//! A deterministic, seeded simulation of the swarmbus protocol machines, in the manner of
//! TigerBeetle's VOPR: one seed drives every choice (which client acts, what it sends, when
//! the log syncs, when durable reports and reads arrive, when the router crashes), the
//! clock is simulated, and invariants are checked after every step. A failing check names
//! the seed, the step and the command that replays it.
//!
//! The machines are the router's own (`swarmbus-proto`: `Core`, `Leases`, `Jobs`, the
//! record format), driven the way `router/src` drives them, and restored from the
//! simulated log at every restart through the same entry points the router's start-up uses.
//!
//! Layout:
//! - [`rng`]: the seeded generator (splitmix64).
//! - [`log`]: the simulated event log: appends, seeded syncs, crashes that lose what is
//!   not durable.
//! - [`router`]: the machines and the driver around them (the shard's action loop, the
//!   control plane's and the job queue's handlers, the start from the log).
//! - [`clients`]: the simulated agents (controllers, subscribers, a submitter, workers)
//!   and what each keeps across reconnects.
//! - [`oracle`]: the promises the router made, checked as they are made.
//! - [`check`]: the invariants that read the log: after each step, after a restart, after
//!   the final drain.
//! - [`world`]: the state of a run and the seeded choice of its steps.
//! - [`trace`]: one line per step, a fingerprint of the run, the tail for failure reports.
//! - [`run`]: running a seed, its report, the failure report.

pub mod check;
pub mod clients;
pub mod log;
pub mod oracle;
pub mod rng;
pub mod router;
pub mod run;
pub mod trace;
pub mod world;

pub use run::{run, run_with, Config, Fault, Report, Stats, Violation, DEFAULT_STEPS};
