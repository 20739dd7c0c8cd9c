//! The router's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// Errors of the router crate. Start-up errors (`Config`, `Tls`, `NonLoopbackListen`,
/// `Bind`, `DataDir`, `DamagedInternalLog`) are fatal; per-connection failures never surface here, they close that
/// connection with a wire [`swarmbus_schema::ErrorCode`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RouterError {
    #[error("configuration: {detail}")]
    Config { detail: String },
    #[error("reading config file {path}: {detail}")]
    ConfigFile { path: PathBuf, detail: String },
    #[error("TLS: {context}: {detail}")]
    Tls { context: String, detail: String },
    #[error(
        "refusing to listen on {addr}: swarmbus has no client authentication yet, so it only \
         listens on loopback addresses (127.0.0.0/8, ::1); use e.g. --listen 127.0.0.1:4433"
    )]
    NonLoopbackListen { addr: SocketAddr },
    #[error("binding {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
    #[error("data dir {path}: {detail}")]
    DataDir { path: PathBuf, detail: String },
    /// One of the router's own logs (`$control`, `$affinity`, `$jobs.*`) is damaged before
    /// its tail. Starting without it would silently forget paused swarms, stopped agents,
    /// lease tokens, pins or accepted jobs, so the router does not start.
    #[error(
        "the router's own log {swarm:?} in {path} is damaged: {reason}. It holds {holds}; the \
         router does not start without it. Restore that directory from a backup, or move it \
         out of the data dir to start without that state (then {without})"
    )]
    DamagedInternalLog {
        swarm: String,
        path: PathBuf,
        reason: String,
        holds: &'static str,
        without: &'static str,
    },
}
