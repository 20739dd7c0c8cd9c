//! The router's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// Errors of the router crate. Where an I/O call failed, its `io::Error` is the error's
/// [`std::error::Error::source`], not repeated in the message: print the chain (the binary
/// prints `starting the router: binding 127.0.0.1:4433: Address in use`; see [`report`]).
/// Start-up errors (`Config`, `ConfigRead`, `ConfigFile`, `Tls`,
/// `NonLoopbackListen`, `Bind`, `DataDir`, `DamagedInternalLog`, `JetStream`) are fatal; per-connection failures never surface here, they close that
/// connection with a wire [`swarmbus_schema::ErrorCode`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RouterError {
    #[error("configuration: {detail}")]
    Config { detail: String },
    #[error("reading config file {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading config file {path}: {detail}")]
    ConfigFile { path: PathBuf, detail: String },
    #[error("TLS: {context}: {detail}")]
    Tls { context: String, detail: String },
    #[error(
        "refusing to listen on {addr}: with auth.mode = \"none\" nobody is identified, so the \
         router only listens on loopback addresses (127.0.0.0/8, ::1); set auth.mode = \
         \"required\" (see docs/security.md) or use e.g. --listen 127.0.0.1:4433"
    )]
    NonLoopbackListen { addr: SocketAddr },
    /// `log.backend = "jetstream"` and the cluster could not be used at start.
    #[error("the JetStream log backend")]
    JetStream {
        #[source]
        source: swarmbus_jetstream::Error,
    },
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {path}: {context}")]
    DataDir {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
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

/// An error and its sources, one after another (`a: b: c`), for logs and the reasons the
/// router gives on the wire.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_carry_their_io_error_as_the_source() {
        let error = RouterError::Bind {
            addr: "127.0.0.1:4433".parse().unwrap(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address in use"),
        };
        assert_eq!(error.to_string(), "binding 127.0.0.1:4433");
        let source = std::error::Error::source(&error).unwrap();
        assert_eq!(source.to_string(), "Address in use");
        assert_eq!(report(&error), "binding 127.0.0.1:4433: Address in use");
    }
}
