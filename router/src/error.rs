//! The router's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// Errors of the router crate. Start-up errors (`Config`, `Tls`, `NonLoopbackListen`,
/// `Bind`) are fatal; per-connection failures never surface here, they close that
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
}
