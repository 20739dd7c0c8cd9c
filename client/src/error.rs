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
