//! Errors of the codec, and the stable numeric error codes used on the wire.

use thiserror::Error;

/// Stable error codes carried in `Error` frames and as QUIC application close codes.
///
/// A code's number never changes and a retired code is never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame's length fields are inconsistent (header longer than the frame, ...).
    MalformedFrame = 1,
    /// The length prefix is above the negotiated maximum frame size.
    FrameTooLarge = 2,
    /// The FlatBuffers header failed verification.
    VerificationFailed = 3,
    /// The header holds a message kind this router does not know.
    UnknownMessage = 4,
    /// A message other than Hello arrived before the session was established.
    HelloRequired = 5,
    /// The client speaks a protocol version the router does not.
    UnsupportedVersion = 6,
    /// The stream ended in the middle of a frame.
    TruncatedFrame = 7,
    /// Publish or subscribe on a swarm the session did not join in Hello.
    SwarmNotJoined = 8,
    /// The session holds the maximum number of subscriptions.
    TooManySubscriptions = 9,
    /// The subscriber's queue for an ordered class overflowed; it missed ops and is disconnected.
    Lagging = 10,
    /// A request with invalid fields (empty swarm name, body length mismatch, ...).
    InvalidRequest = 11,
    /// A message that only the router sends (Welcome, Deliver, ...) was sent by a client.
    UnexpectedMessage = 12,
    /// The router is shutting down.
    ShuttingDown = 13,
    /// Hello named more swarms than the router allows per session.
    TooManySwarms = 14,
    /// The router is at its connection limit.
    Busy = 15,
    /// A second Hello on an established session.
    DuplicateHello = 16,
    /// A frame arrived on a stream that does not carry that message kind.
    WrongStream = 17,
    /// A publish whose payload exceeds [`crate::max_payload_bytes`] of the frame limit.
    PayloadTooLarge = 18,
    /// The swarm's event log is damaged or failed; the swarm is not served until repaired.
    SwarmUnavailable = 19,
    /// The sender is above its rate limit for this class; retry after `retry_after_ms`.
    RateLimited = 20,
    /// The sender's circuit breaker is open (a sustained rate of refused publishes); retry
    /// after `retry_after_ms`.
    CircuitOpen = 21,
    /// The worker node a request was sent to (or its session was pinned to) disconnected
    /// before replying; the session is pinned elsewhere now, so a retry goes there.
    NodeGone = 22,
    /// No reply within the request's timeout; a late reply is dropped.
    DeadlineExceeded = 23,
    /// No worker node can take the request (none registered, or all draining or unhealthy).
    NoWorker = 24,
    /// The session's role may not do this (e.g. WorkerStatus from a non-worker).
    Forbidden = 25,
    /// Another agent with the same agent id connected: the newest session wins, this one
    /// is closed.
    Replaced = 26,
    /// The lease is held by another agent until it expires (`retry_after_ms`).
    LeaseHeld = 27,
    /// Renew or release of a lease this agent no longer holds (expired, or a newer token).
    LeaseLost = 28,
    /// A publish stamped with a fencing token older than the newest granted for its lease.
    StaleFencingToken = 29,
    /// No heartbeat within the heartbeat timeout: the agent was declared gone.
    HeartbeatTimeout = 35,
    /// A controller stopped this agent; it may reconnect after `retry_after_ms`.
    Stopped = 36,
    /// A job result, progress or heartbeat for an attempt that is no longer the job's lease:
    /// the lease expired, its worker was taken for gone, the job was cancelled, or another
    /// attempt finished it. The worker should drop the work.
    LeaseFenced = 30,
    /// No such job (never submitted, or finished and acknowledged long ago), or not in the
    /// swarm named.
    UnknownJob = 31,
    /// The job already ended (cancel of a finished job; re-drive of a job not dead-lettered).
    JobFinished = 32,
    /// The router requires a credential and this session's is missing, malformed, expired,
    /// not yet valid, not signed by a key it trusts, or revoked. A fresh credential (or a
    /// router that trusts its key) may pass.
    Unauthenticated = 37,
    /// Another router of the cluster took this op id of the swarm first (routers sharing a
    /// swarm's log on NATS JetStream): the publish was not made durable and is not
    /// delivered; sending it again gives it the next free op id.
    Conflict = 38,
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Whether the code says the client is wrong (a malformed or unexpected frame, an
    /// unsupported version, an invalid request, too many swarms), so doing the same again
    /// fails the same way; every other code is about the router's state now (busy, rate
    /// limited, unavailable, a lease held...) and may pass later. Every code is decided
    /// here, so a new one must be.
    pub fn is_permanent(self) -> bool {
        use ErrorCode::*;
        match self {
            MalformedFrame | FrameTooLarge | VerificationFailed | UnknownMessage
            | HelloRequired | UnsupportedVersion | TruncatedFrame | InvalidRequest
            | UnexpectedMessage | TooManySwarms | DuplicateHello | WrongStream => true,
            SwarmNotJoined | TooManySubscriptions | Lagging | ShuttingDown | Busy
            | PayloadTooLarge | SwarmUnavailable | RateLimited | CircuitOpen | NodeGone
            | DeadlineExceeded | NoWorker | Forbidden | Replaced | LeaseHeld | LeaseLost
            | StaleFencingToken | HeartbeatTimeout | Stopped | LeaseFenced | UnknownJob
            | JobFinished | Unauthenticated | Conflict => false,
        }
    }

    /// Maps a number received on the wire back to a code; unknown numbers give `None`.
    pub fn from_u16(code: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match code {
            1 => MalformedFrame,
            2 => FrameTooLarge,
            3 => VerificationFailed,
            4 => UnknownMessage,
            5 => HelloRequired,
            6 => UnsupportedVersion,
            7 => TruncatedFrame,
            8 => SwarmNotJoined,
            9 => TooManySubscriptions,
            10 => Lagging,
            11 => InvalidRequest,
            12 => UnexpectedMessage,
            13 => ShuttingDown,
            14 => TooManySwarms,
            15 => Busy,
            16 => DuplicateHello,
            17 => WrongStream,
            18 => PayloadTooLarge,
            19 => SwarmUnavailable,
            20 => RateLimited,
            21 => CircuitOpen,
            22 => NodeGone,
            23 => DeadlineExceeded,
            24 => NoWorker,
            25 => Forbidden,
            26 => Replaced,
            27 => LeaseHeld,
            28 => LeaseLost,
            29 => StaleFencingToken,
            35 => HeartbeatTimeout,
            36 => Stopped,
            30 => LeaseFenced,
            31 => UnknownJob,
            32 => JobFinished,
            37 => Unauthenticated,
            38 => Conflict,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self, *self as u16)
    }
}

/// Why a frame could not be decoded. None of these is recoverable for the connection
/// that sent the frame: the router closes it with [`DecodeError::code`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed frame: {reason}")]
    Malformed { reason: &'static str },
    #[error("frame header failed verification: {detail}")]
    Verification { detail: String },
    #[error("unknown message kind {kind}")]
    UnknownMessage { kind: u8 },
    #[error("invalid field: {reason}")]
    InvalidField { reason: &'static str },
}

impl DecodeError {
    /// The wire error code that reports this failure to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::Malformed { .. } => ErrorCode::MalformedFrame,
            DecodeError::Verification { .. } => ErrorCode::VerificationFailed,
            DecodeError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
            DecodeError::InvalidField { .. } => ErrorCode::InvalidRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_stable() {
        for n in 0..64u16 {
            if let Some(code) = ErrorCode::from_u16(n) {
                assert_eq!(code.as_u16(), n);
            }
        }
        assert_eq!(ErrorCode::FrameTooLarge.as_u16(), 2);
        assert_eq!(ErrorCode::Lagging.as_u16(), 10);
        assert_eq!(ErrorCode::from_u16(0), None);
    }

    #[test]
    fn only_the_codes_that_blame_the_client_are_permanent() {
        let permanent: Vec<u16> = (0..64u16)
            .filter(|n| ErrorCode::from_u16(*n).is_some_and(ErrorCode::is_permanent))
            .collect();
        assert_eq!(permanent, [1, 2, 3, 4, 5, 6, 7, 11, 12, 14, 16, 17]);
    }
}
