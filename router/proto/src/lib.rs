//! The swarmbus protocol, sans-IO, in the manner of `quinn-proto`: the state machines the
//! router's runtime drives. Nothing here reads a clock, touches a socket or a file, or
//! spawns a task; Cargo enforces it (the crate depends on schema, affinity, bytes, crc32c,
//! serde and thiserror only).
//!
//! Call convention, for every machine: the runtime passes each input with the current time
//! ([`Now`], or its router-clock milliseconds), then carries out what the machine asked
//! for: the frames to send, each addressed to a connection handle `H` chosen by the
//! runtime (its outbox; tests use plain ids), and the records to append. The machines
//! never block and never call back.
//!
//! Layout:
//! - [`conn`]: connection ids and outbound lanes.
//! - [`time`]: [`Now`], the one time type passed in.
//! - [`core`]: routing: swarms, subscriptions, the per-swarm op sequencer, durable
//!   acknowledgement, catch-up and the delta cut.
//! - [`record`]: the event log's record format and the internal-swarm names.
//! - [`record_key`]: unambiguous keys of the router's internal records.
//! - [`control`]: presence, fenced leases, safety stops, pauses and drains, with their
//!   records.
//! - [`workers`]: the worker registry, affine sessions and request/reply.
//! - [`jobs`]: the durable job queue (leases, retries, dead letters) and its records.
//! - [`limits`]: token buckets and circuit breakers.
//! - [`governor`]: the bulk-intake governor's decision step.
//! - [`quota`]: the router-wide and per-agent swarm budget.
//! - [`refusal`]: a refused request and its `Error` frame, built in one place.
//! - `test_support` (tests only): what the machines' tests share.

// Tests build times from the real clock; the machines themselves never read it.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod conn;
pub mod control;
pub mod core;
pub mod governor;
pub mod jobs;
pub mod limits;
pub mod quota;
pub mod record;
pub mod record_key;
pub mod refusal;
pub mod time;
pub mod workers;

#[cfg(test)]
mod test_support;

pub use conn::{ConnId, Handle, Lane};
pub use refusal::Refusal;
pub use time::Now;
