//! The swarmbus router.
//!
//! Layout:
//! - [`clock`]: the router's clock, monotonic while it runs and bounded across restarts.
//! - [`config`]: typed configuration, TOML file, `SWARMBUS_*` overrides, validation.
//! - [`tls`]: development CA (rcgen) and the rustls/quinn server configuration.
//! - [`core`]: the sans-IO routing state machine (swarms, subscriptions, op sequencer).
//! - [`shard`]: one task per shard driving a `Core`; swarms are hashed to shards.
//! - [`outbox`]: per-connection bounded outbound lanes (session + one per class).
//! - [`server`]: the QUIC endpoint, connection lifecycle, stream readers and lane writers.
//! - [`limits`]: token buckets for per-session, per-class rate limits.
//! - [`governor`]: the governor (bulk intake budget that follows the host's idle CPU while commands flow).
//! - [`workers`]: worker nodes, affine sessions and request/reply (GPU affinity).
//! - [`jobs`]: the async job queue (durable jobs, leases, retries, dead letters).
//! - [`refusal`]: a refused request and its `Error` frame, built in one place.
//! - [`record_key`]: unambiguous keys of the router's internal records.
//! - [`quota`]: router-wide caps and per-agent quotas (unfinished frames, swarms).
//! - [`stats`]: router-wide counters.
//! - [`error`]: the crate's error type.

pub mod bulk;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
pub mod error;
pub mod governor;
pub mod jobs;
pub mod limits;
pub mod log;
pub mod outbox;
pub mod quota;
pub mod record_key;
pub mod refusal;
pub mod server;
pub mod shard;
pub mod stats;
pub mod tls;
pub mod workers;

pub use config::Config;
pub use error::RouterError;
pub use server::Router;
pub use stats::StatsSnapshot;
