//! Encoding messages to frames and verified decoding of frames to messages.
//!
//! Layout: this file holds the options and the frame type; `encode` and `decode` the two
//! directions (one match arm per message kind each); `tests` round-trips every message.

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};

use crate::error::DecodeError;
use crate::frame::LENGTH_PREFIX_BYTES;
use crate::generated::swarmbus::wire as w;
use crate::types::*;

mod decode;
mod encode;

pub use decode::decode;
pub use encode::{encode, encode_deliver_head};

/// Bytes of the `header_len` field that follows the frame length prefix.
const HEADER_LEN_BYTES: usize = 4;

/// Bounds for the FlatBuffers verifier. Every inbound frame is verified once with these.
///
/// The table budget must cover the largest message the protocol allows: a Hello that joins
/// `max_swarms_per_session` swarms with a resume point per ordered class in each is
/// `2 + ORDERED_CLASS_COUNT * max_swarms_per_session` tables (Frame, Hello, the Resumes).
/// Every other message has at most four.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Deepest table nesting accepted (the protocol needs 3: Frame, message, Resume).
    pub max_depth: usize,
    /// Most tables in one header.
    pub max_tables: usize,
}

impl DecodeOptions {
    /// Tables in messages other than Hello (Frame, message and at most two nested tables).
    const FIXED_TABLES: usize = 8;

    /// Bounds that admit a Hello joining `max_swarms_per_session` swarms with every resume
    /// point (what a router advertising that limit must accept).
    pub fn for_swarms_per_session(max_swarms_per_session: u32) -> Self {
        DecodeOptions {
            max_depth: 8,
            max_tables: Self::FIXED_TABLES
                + crate::ORDERED_CLASS_COUNT * max_swarms_per_session as usize,
        }
    }
}

impl Default for DecodeOptions {
    /// Bounds for any limit a router may advertise ([`crate::MAX_SWARMS_PER_SESSION`]).
    fn default() -> Self {
        Self::for_swarms_per_session(crate::MAX_SWARMS_PER_SESSION)
    }
}

/// An encoded frame: `head` is `frame_len | header_len | header`, `body` is the payload
/// (empty for messages without one). Write both, in order, e.g. with quinn's
/// `write_all_chunks`; `body` is never copied by encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFrame {
    pub head: Bytes,
    pub body: Bytes,
}

impl OutFrame {
    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Head and body in one buffer (tests and tools; the hot path writes the two chunks).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }
}

#[cfg(test)]
mod tests;
