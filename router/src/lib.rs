//! The swarmbus router: the runtime that drives the protocol's state machines
//! ([`swarmbus_proto`]: routing, control plane, affinity, jobs) over QUIC and the event log.
//!
//! Layout:
//! - [`auth`]: credentials (Ed25519 JWTs), the keys trusted, what grants allow.
//! - [`clock`]: the router's clock, monotonic while it runs and bounded across restarts.
//! - [`config`]: typed configuration, TOML file, `SWARMBUS_*` overrides, validation.
//! - [`tls`]: development CA (rcgen) and the rustls/quinn server configuration.
//! - [`shard`]: one task per shard driving a `Core`; swarms are hashed to shards.
//! - [`outbox`]: per-connection bounded outbound lanes (session + one per class).
//! - [`server`]: the QUIC endpoint, connection lifecycle, stream readers and lane writers.
//! - [`intake`]: the router-wide intake budgets stream readers take tokens from.
//! - [`host_cpu`]: the host's idle CPU share, sampled for the governor.
//! - [`partial_frames`]: the caps on bytes of frames started and not finished.
//! - [`stats`]: router-wide counters.
//! - [`error`]: the crate's error type.

pub mod auth;
pub mod bridge;
pub mod bulk;
pub mod clock;
pub mod config;
pub mod error;
pub mod host_cpu;
pub mod intake;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod partial_frames;
pub mod reload;
pub mod server;
pub mod shard;
pub mod stats;
pub mod tls;

pub use config::Config;
pub use error::RouterError;
pub use server::{Router, StartOptions, Stopped};
pub use stats::StatsSnapshot;
