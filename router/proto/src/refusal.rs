//! A refusal: what the router answers a request it does not carry out, and the one place
//! its `Error` message and frame are built.

use swarmbus_schema::{encode, ErrorCode, ErrorMessage, Message, OutFrame};

/// The error code, a message, and a retry hint in ms (0: none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u32,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    /// The same, with a hint of when to try again.
    pub fn retry_after(mut self, ms: u32) -> Self {
        self.retry_after_ms = ms;
        self
    }

    /// The `Error` message answering request `request_id` (0: none in particular).
    pub fn message(&self, request_id: u64) -> Message {
        Message::Error(ErrorMessage {
            code: self.code.as_u16(),
            message: self.message.clone(),
            request_id,
            retry_after_ms: self.retry_after_ms,
        })
    }

    /// That message as a frame.
    pub fn frame(&self, request_id: u64) -> OutFrame {
        encode(&self.message(request_id))
    }
}
