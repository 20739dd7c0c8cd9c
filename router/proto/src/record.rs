//! The on-disk record format.
//!
//! ```text
//! len:u32le        bytes after this field
//! crc32c:u32le     CRC32C of everything after this field
//! epoch:u64le      the swarm log's epoch
//! op:u64le         op id
//! timestamp_ms:u64le  router time of sequencing (ms since the Unix epoch)
//! class:u8
//! key_len:u16le
//! key              key_len bytes
//! frame            the Deliver frame exactly as sent to subscribers (head then body)
//! ```
//!
//! The frame is stored as sent, so replaying a record to a subscriber needs no re-encode.

use bytes::{BufMut, Bytes, BytesMut};
use swarmbus_schema::{Class, Epoch, OpId};

/// Bytes before the key: len, crc, epoch, op, timestamp, class, key_len.
pub const RECORD_HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 8 + 1 + 2;
/// Bytes of the leading `len` field.
const LEN_BYTES: usize = 4;
/// Largest record accepted when reading (a frame is at most 64 MiB by configuration).
pub const MAX_RECORD_BYTES: usize = 80 << 20;

/// A record ready to append, in parts so the payload is not copied before the writer
/// coalesces a batch: `head` (record header and key), then the Deliver frame's head and body.
#[derive(Clone, Debug)]
pub struct RecordParts {
    pub head: Bytes,
    pub frame_head: Bytes,
    pub frame_body: Bytes,
}

impl RecordParts {
    pub fn len(&self) -> usize {
        self.head.len() + self.frame_head.len() + self.frame_body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The epoch in the record's head (after its length and CRC).
    pub fn epoch(&self) -> Epoch {
        let mut bytes = [0u8; 8];
        if let Some(epoch) = self.head.get(8..16) {
            bytes.copy_from_slice(epoch);
        }
        Epoch(u64::from_le_bytes(bytes))
    }

    /// The record as one buffer (tests and tools).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len());
        out.put_slice(&self.head);
        out.put_slice(&self.frame_head);
        out.put_slice(&self.frame_body);
        out.freeze()
    }
}

/// Builds a record around a Deliver frame given as `frame_head` + `frame_body`.
pub fn encode_record(
    epoch: Epoch,
    op: OpId,
    timestamp_ms: u64,
    class: Class,
    key: &[u8],
    frame_head: Bytes,
    frame_body: Bytes,
) -> RecordParts {
    let key_len = key.len().min(u16::MAX as usize);
    let key = &key[..key_len];
    let total_after_len =
        RECORD_HEADER_BYTES - LEN_BYTES + key.len() + frame_head.len() + frame_body.len();
    // Frames are at most `limits.max_frame_bytes` (64 MiB, checked at start), names and keys
    // a few KiB: every record fits what recovery accepts. One compare, always on: a record
    // recovery would refuse must never be written.
    assert!(
        total_after_len <= MAX_RECORD_BYTES,
        "a record of {total_after_len} bytes is over MAX_RECORD_BYTES"
    );
    let mut head = BytesMut::with_capacity(RECORD_HEADER_BYTES + key.len());
    head.put_u32_le(total_after_len as u32);
    head.put_u32_le(0); // crc, filled in below
    head.put_u64_le(epoch.0);
    head.put_u64_le(op.0);
    head.put_u64_le(timestamp_ms);
    head.put_u8(class as u8);
    head.put_u16_le(key_len as u16);
    head.put_slice(key);
    let mut crc = crc32c::crc32c(&head[8..]);
    crc = crc32c::crc32c_append(crc, &frame_head);
    crc = crc32c::crc32c_append(crc, &frame_body);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    let parts = RecordParts {
        head: head.freeze(),
        frame_head,
        frame_body,
    };
    // Checked before it is written as it will be after it is read (tests and debug builds).
    debug_assert!(
        parse_record(&parts.to_bytes()).is_ok_and(|(record, used)| {
            used == parts.len() && record.op == op && record.epoch == epoch
        }),
        "a record does not read back as written"
    );
    parts
}

/// A record read back from the log. `frame` is a slice of the read buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub epoch: Epoch,
    pub op: OpId,
    pub timestamp_ms: u64,
    pub class: Class,
    pub key: Bytes,
    pub frame: Bytes,
}

/// Why bytes at some offset are not a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The buffer ends before the record does (a torn write at the tail, or read more).
    Incomplete { needed: usize },
    /// Length, CRC or fields are wrong.
    Corrupt { reason: &'static str },
}

/// Parses the record at the start of `buf`; returns it and its length in bytes.
pub fn parse_record(buf: &Bytes) -> Result<(Record, usize), ParseError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(ParseError::Incomplete {
            needed: RECORD_HEADER_BYTES,
        });
    }
    let u32_at = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let len = u32_at(0) as usize;
    if !(RECORD_HEADER_BYTES - LEN_BYTES..=MAX_RECORD_BYTES).contains(&len) {
        return Err(ParseError::Corrupt {
            reason: "record length out of range",
        });
    }
    let total = LEN_BYTES + len;
    if buf.len() < total {
        return Err(ParseError::Incomplete { needed: total });
    }
    let crc = u32_at(4);
    if crc32c::crc32c(&buf[8..total]) != crc {
        return Err(ParseError::Corrupt {
            reason: "CRC mismatch",
        });
    }
    let class = Class::from_u8(buf[32]).ok_or(ParseError::Corrupt {
        reason: "unknown class",
    })?;
    let key_len = u16::from_le_bytes([buf[33], buf[34]]) as usize;
    if RECORD_HEADER_BYTES + key_len > total {
        return Err(ParseError::Corrupt {
            reason: "key longer than the record",
        });
    }
    let record = Record {
        epoch: Epoch(u64_at(8)),
        op: OpId(u64_at(16)),
        timestamp_ms: u64_at(24),
        class,
        key: buf.slice(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + key_len),
        frame: buf.slice(RECORD_HEADER_BYTES + key_len..total),
    };
    Ok((record, total))
}

/// Whether `swarm` is one of the router's internal swarms (names starting with `$`, which
/// clients cannot use).
pub fn is_internal(swarm: &str) -> bool {
    swarm.starts_with('$')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(op: u64, payload: &[u8]) -> RecordParts {
        encode_record(
            Epoch(7),
            OpId(op),
            1_700_000_000_000,
            Class::Command,
            b"task-1",
            Bytes::from_static(b"HEAD"),
            Bytes::copy_from_slice(payload),
        )
    }

    #[test]
    fn round_trip() {
        let parts = sample(42, b"payload bytes");
        let bytes = parts.to_bytes();
        let (record, used) = parse_record(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(record.op, OpId(42));
        assert_eq!(record.epoch, Epoch(7));
        assert_eq!(record.class, Class::Command);
        assert_eq!(&record.key[..], b"task-1");
        assert_eq!(&record.frame[..], b"HEADpayload bytes");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample(1, b"abc").to_bytes();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut copy = bytes.to_vec();
                copy[i] ^= 1 << bit;
                let copy = Bytes::from(copy);
                assert!(
                    parse_record(&copy).is_err(),
                    "flip at byte {i} bit {bit} undetected"
                );
            }
        }
    }

    #[test]
    fn truncation_is_incomplete_not_corrupt() {
        let bytes = sample(1, b"abcdef").to_bytes();
        for cut in 0..bytes.len() {
            let err = parse_record(&bytes.slice(..cut)).unwrap_err();
            assert!(
                matches!(err, ParseError::Incomplete { .. }),
                "cut at {cut}: {err:?}"
            );
        }
    }
}
