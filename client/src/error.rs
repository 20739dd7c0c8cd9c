//! The client's error type.

use thiserror::Error;

/// Errors of the client library.
///
/// Recoverable without reconnecting: `Refused` (that request failed; the session goes on)
/// and `InFlightFull` (too many requests unanswered; try again later).
/// Everything else means the connection is unusable: reconnect (with backoff).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    #[error("TLS setup: {detail}")]
    Tls { detail: String },
    #[error("connecting to {router}: {detail}")]
    Connect { router: String, detail: String },
    /// A local I/O call failed (binding the connector's UDP socket).
    #[error("{during}")]
    Io {
        during: &'static str,
        #[source]
        source: IoError,
    },
    #[error("timed out after {after_ms} ms while {during}")]
    Timeout { during: &'static str, after_ms: u64 },
    /// The router refused one request with a wire error code. `retry_after_ms` is the
    /// router's advice for RateLimited (0 when it gave none): back off at least that long.
    #[error("refused by the router: code {code} ({name}): {message}")]
    Refused {
        code: u16,
        name: String,
        message: String,
        retry_after_ms: u32,
    },
    /// The connection was closed, by the router (with its error code) or locally.
    #[error("connection closed{}: {reason}", code.map(|c| format!(" with code {c}")).unwrap_or_default())]
    Closed { code: Option<u64>, reason: String },
    /// The router sent something this client does not accept.
    #[error("protocol error: {detail}")]
    Protocol { detail: String },
    #[error("invalid argument: {detail}")]
    InvalidArgument { detail: String },
    /// `max` requests are awaiting a reply and the session asked to fail rather than wait
    /// (`Session::fail_when_in_flight_full`). Recoverable: retry once replies arrive.
    #[error("{max} requests are already awaiting a reply")]
    InFlightFull { max: usize },
}

impl ClientError {
    pub(crate) fn refused(error: swarmbus_schema::ErrorMessage) -> Self {
        let name = swarmbus_schema::ErrorCode::from_u16(error.code)
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "unknown".into());
        ClientError::Refused {
            code: error.code,
            name,
            message: error.message,
            retry_after_ms: error.retry_after_ms,
        }
    }

    pub(crate) fn from_connection(error: &quinn::ConnectionError) -> Self {
        match error {
            quinn::ConnectionError::ApplicationClosed(close) => ClientError::Closed {
                code: Some(close.error_code.into_inner()),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            other => ClientError::Closed {
                code: None,
                reason: other.to_string(),
            },
        }
    }

    /// Whether trying again (later, maybe on a new connection) can succeed. False for
    /// errors of the client's own making: TLS setup, invalid arguments, protocol
    /// violations, and refusals of its Hello (unsupported version, too many swarms).
    pub fn is_transient(&self) -> bool {
        // Codes that say the client is wrong, not that the router is unavailable now, are
        // permanent (see `ErrorCode::is_permanent`); unknown codes count as transient.
        let permanent = |code: u64| {
            u16::try_from(code)
                .ok()
                .and_then(swarmbus_schema::ErrorCode::from_u16)
                .is_some_and(swarmbus_schema::ErrorCode::is_permanent)
        };
        match self {
            ClientError::Tls { .. }
            | ClientError::Protocol { .. }
            | ClientError::InvalidArgument { .. } => false,
            ClientError::Refused { code, .. } => !permanent(u64::from(*code)),
            ClientError::Closed { code, .. } => !code.is_some_and(permanent),
            ClientError::Connect { .. }
            | ClientError::Io { .. }
            | ClientError::Timeout { .. }
            | ClientError::InFlightFull { .. } => true,
        }
    }

    /// The router's advice on when to try again (0 when it gave none).
    pub fn retry_after_ms(&self) -> u32 {
        match self {
            ClientError::Refused { retry_after_ms, .. } => *retry_after_ms,
            _ => 0,
        }
    }

    /// The router's error code, for `Refused` and for closes carrying one.
    pub fn code(&self) -> Option<u64> {
        match self {
            ClientError::Refused { code, .. } => Some(u64::from(*code)),
            ClientError::Closed { code, .. } => *code,
            _ => None,
        }
    }
}

/// An [`std::io::Error`] that [`ClientError`] can clone and compare (by kind and message).
/// It is transparent: it displays as the I/O error, and its source is the I/O error's.
#[derive(Debug, Clone)]
pub struct IoError(std::sync::Arc<std::io::Error>);

impl IoError {
    pub fn kind(&self) -> std::io::ErrorKind {
        self.0.kind()
    }
}

impl From<std::io::Error> for IoError {
    fn from(error: std::io::Error) -> Self {
        IoError(std::sync::Arc::new(error))
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoError {}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_kind_and_are_transient() {
        let error = ClientError::Io {
            during: "binding a UDP socket",
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "in use").into(),
        };
        assert!(error.is_transient());
        assert_eq!(error.to_string(), "binding a UDP socket");
        let source = std::error::Error::source(&error).unwrap();
        assert_eq!(source.to_string(), "in use");
        assert_eq!(error.clone(), error);
    }
}
