//! Length-prefixed framing.
//!
//! A frame on the wire is `frame_len:u32le` followed by `frame_len` bytes. The decoder yields
//! those `frame_len` bytes (without the prefix) as [`Bytes`]. When a whole frame lies inside
//! one received chunk the result is a slice of that chunk (no copy); a frame split across
//! chunks is assembled once into a buffer of its own.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::DecodeError;

/// Default maximum frame size (everything after the 4-byte length prefix): 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// Bytes of the `frame_len` prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Cuts frames out of a stream of chunks.
///
/// Call order: [`FrameDecoder::push`] a chunk, then [`FrameDecoder::next_frame`] until it
/// returns `Ok(None)`; at end of stream [`FrameDecoder::is_idle`] tells whether a frame was
/// cut short. After an error the decoder must be dropped (the stream is unusable).
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
    /// Unconsumed rest of the latest chunk, when nothing is buffered in `partial`.
    chunk: Bytes,
    /// A frame that spans chunks, being assembled.
    partial: BytesMut,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            max_frame_bytes,
            chunk: Bytes::new(),
            partial: BytesMut::new(),
        }
    }

    /// Changes the maximum frame size (e.g. once the peer announced its limits); frames
    /// already buffered are kept.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if self.partial.is_empty() && self.chunk.is_empty() {
            self.chunk = chunk;
        } else {
            self.spill();
            self.grow_for(chunk.len());
            self.partial.extend_from_slice(&chunk);
        }
    }

    /// Makes room for `incoming` more bytes of the frame in assembly: the buffer at least
    /// doubles (few copies) but never grows past the frame's announced end (or what
    /// arrived, when that is more), so what it holds stays within twice what arrived and
    /// within the frame's size. The buffer is allocated at exactly that size: `reserve`
    /// may round a growth up to twice the old capacity, past the frame.
    fn grow_for(&mut self, incoming: usize) {
        let wanted = self.partial.len() + incoming;
        if wanted <= self.partial.capacity() {
            return;
        }
        let frame_end = match self.frame_len(&self.partial) {
            Ok(Some(len)) => LENGTH_PREFIX_BYTES + len,
            // No length yet, or one past the limit (refused by the next `next_frame`).
            _ => wanted,
        };
        let target = wanted.max((2 * self.partial.len()).min(frame_end));
        let mut bigger = BytesMut::with_capacity(target);
        bigger.extend_from_slice(&self.partial);
        self.partial = bigger;
    }

    /// Moves the rest of `chunk` into `partial` (a frame crosses the chunk boundary).
    fn spill(&mut self) {
        if !self.chunk.is_empty() {
            self.partial.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
    }

    fn frame_len(&self, prefix: &[u8]) -> Result<Option<usize>, DecodeError> {
        if prefix.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        Ok(Some(len))
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if !self.chunk.is_empty() {
            if let Some(len) = self.frame_len(&self.chunk)? {
                if self.chunk.len() >= LENGTH_PREFIX_BYTES + len {
                    let mut frame = self.chunk.split_to(LENGTH_PREFIX_BYTES + len);
                    frame.advance(LENGTH_PREFIX_BYTES);
                    return Ok(Some(frame));
                }
            }
            self.spill();
            return Ok(None);
        }
        match self.frame_len(&self.partial)? {
            Some(len) if self.partial.len() >= LENGTH_PREFIX_BYTES + len => {
                let mut frame = self.partial.split_to(LENGTH_PREFIX_BYTES + len);
                frame.advance(LENGTH_PREFIX_BYTES);
                if self.partial.is_empty() {
                    // Nothing of the next frame yet: hold no spare room for it (an idle
                    // stream would keep it, counted against its connection).
                    self.partial = BytesMut::new();
                }
                Ok(Some(frame.freeze()))
            }
            // Nothing is reserved for the announced length: the buffer grows as the bytes
            // arrive, so a peer that announces a large frame and stops costs only what it
            // sent.
            _ => Ok(None),
        }
    }

    /// The next complete frame, verified and decoded (see [`crate::decode`]).
    pub fn next_message(
        &mut self,
        options: &crate::DecodeOptions,
    ) -> Result<Option<crate::Message>, DecodeError> {
        match self.next_frame()? {
            Some(frame) => crate::decode(frame, options).map(Some),
            None => Ok(None),
        }
    }

    /// True when no partial frame is buffered; false at end of stream means a truncated frame.
    pub fn is_idle(&self) -> bool {
        self.chunk.is_empty() && self.partial.is_empty()
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.chunk.len() + self.partial.len()
    }

    /// Memory the decoder holds for frames not yet returned: the buffered rest of the
    /// latest chunk and the assembly buffer's capacity. What a reader charges against its
    /// connection's budget for partial frames.
    pub fn held_bytes(&self) -> usize {
        self.chunk.len() + self.partial.capacity()
    }
}

/// Payloads at least this large are handed to the stream as chunks of their own, without a
/// copy; smaller pieces (every head, small bodies) are copied into a shared buffer.
pub const COALESCE_COPY_BELOW: usize = 4096;

/// The shared buffer is cut into a chunk once it holds this much.
pub const COALESCE_CHUNK_BYTES: usize = 64 * 1024;

/// Turns a batch of encoded frames into few, large chunks for one stream write.
///
/// QUIC stacks keep each written chunk as one segment until the peer acknowledges it, and
/// quinn finds the segment to send by walking that list from its start: thousands of
/// 30-byte heads and 256-byte bodies in flight make every packet cost a walk through
/// thousands of entries. Copying small frames into shared buffers of
/// [`COALESCE_CHUNK_BYTES`] costs one `memcpy` per frame and keeps the list short; large
/// payloads still go out zero-copy.
#[derive(Debug, Default)]
pub struct Coalescer {
    buffer: BytesMut,
    chunks: Vec<Bytes>,
}

impl Coalescer {
    pub fn new() -> Self {
        Coalescer::default()
    }

    /// Appends one frame (its head, then its body).
    pub fn push(&mut self, frame: crate::codec::OutFrame) {
        self.copy(&frame.head);
        if frame.body.len() < COALESCE_COPY_BELOW {
            self.copy(&frame.body);
        } else {
            self.cut();
            self.chunks.push(frame.body);
        }
    }

    fn copy(&mut self, piece: &[u8]) {
        if piece.is_empty() {
            return;
        }
        if self.buffer.capacity() - self.buffer.len() < piece.len() {
            // Cut first, so reserving never moves bytes already buffered.
            self.cut();
            self.buffer.reserve(COALESCE_CHUNK_BYTES.max(piece.len()));
        }
        self.buffer.extend_from_slice(piece);
        if self.buffer.len() >= COALESCE_CHUNK_BYTES {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if !self.buffer.is_empty() {
            self.chunks.push(self.buffer.split().freeze());
        }
    }

    /// Everything pushed since the last call, in order, as chunks to write; the caller
    /// writes them (e.g. quinn's `write_all_chunks`) and clears the vector.
    pub fn chunks(&mut self) -> &mut Vec<Bytes> {
        self.cut();
        &mut self.chunks
    }

    /// True when nothing was pushed since the chunks were last taken and cleared.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty() && self.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn whole_frames_in_one_chunk_are_slices_of_it() {
        let mut wire = framed(b"hello");
        wire.extend(framed(b"world!"));
        let chunk = Bytes::from(wire);
        let base = chunk.as_ptr() as usize;
        let mut dec = FrameDecoder::new(64);
        dec.push(chunk);
        let a = dec.next_frame().unwrap().unwrap();
        let b = dec.next_frame().unwrap().unwrap();
        assert_eq!(&a[..], b"hello");
        assert_eq!(&b[..], b"world!");
        assert_eq!(a.as_ptr() as usize, base + 4);
        assert!(dec.next_frame().unwrap().is_none());
        assert!(dec.is_idle());
    }

    #[test]
    fn frames_split_at_every_byte_are_reassembled() {
        let mut wire = framed(b"abc");
        wire.extend(framed(b""));
        wire.extend(framed(b"0123456789"));
        for split in 0..wire.len() {
            let mut dec = FrameDecoder::new(64);
            let mut out = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                dec.push(Bytes::copy_from_slice(part));
                while let Some(f) = dec.next_frame().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out.len(), 3, "split at {split}");
            assert_eq!(&out[2][..], b"0123456789");
            assert!(dec.is_idle());
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(16);
        dec.push(Bytes::from_static(&[17, 0, 0, 0, 1]));
        assert_eq!(
            dec.next_frame(),
            Err(DecodeError::FrameTooLarge { len: 17, max: 16 })
        );
    }

    #[test]
    fn truncated_stream_is_not_idle() {
        let mut dec = FrameDecoder::new(64);
        dec.push(Bytes::from_static(&[8, 0, 0, 0, 1, 2]));
        assert!(dec.next_frame().unwrap().is_none());
        assert!(!dec.is_idle());
    }

    #[test]
    fn an_announced_length_reserves_nothing_until_its_bytes_arrive() {
        // A 5-byte chunk announcing a 1 MiB frame must not make the decoder hold 1 MiB.
        let mut dec = FrameDecoder::new(1 << 20);
        let mut header = (1u32 << 20).to_le_bytes().to_vec();
        header.push(7);
        dec.push(Bytes::from(header));
        assert!(dec.next_frame().unwrap().is_none());
        assert!(
            dec.held_bytes() < 4096,
            "{} bytes held for 5 received",
            dec.held_bytes()
        );
        // The rest arrives in pieces (small ones, as QUIC delivers them, and large ones):
        // what is held grows with it, at most twice what came and never past the frame, and
        // the frame comes out whole. Nothing is held after it.
        for piece_len in [1_200, 64 << 10] {
            let mut dec = FrameDecoder::new(1 << 20);
            let mut received = 0;
            let mut wire = (1u32 << 20).to_le_bytes().to_vec();
            wire.resize(4 + (1 << 20), 7);
            for piece in wire.chunks(piece_len) {
                dec.push(Bytes::copy_from_slice(piece));
                received += piece.len();
                if received < wire.len() {
                    assert!(dec.next_frame().unwrap().is_none());
                    let held = dec.held_bytes();
                    assert!(held <= 2 * received.max(5), "{held} held for {received}");
                    assert!(held <= wire.len(), "{held} held for a frame of 1 MiB");
                }
            }
            let frame = dec.next_frame().unwrap().unwrap();
            assert_eq!(frame.len(), 1 << 20);
            assert!(frame.iter().all(|b| *b == 7));
            assert!(dec.is_idle());
            assert_eq!(dec.held_bytes(), 0, "spare room held after the frame");
        }
    }

    fn out_frame(head: &[u8], body: Vec<u8>) -> crate::codec::OutFrame {
        crate::codec::OutFrame {
            head: Bytes::copy_from_slice(head),
            body: Bytes::from(body),
        }
    }

    #[test]
    fn coalescer_keeps_bytes_in_order_in_few_chunks() {
        let mut coalescer = Coalescer::new();
        let mut expected = Vec::new();
        let mut large = None;
        for i in 0..1000u32 {
            // Mostly small frames, one body large enough to pass through uncopied.
            let body_len = if i == 500 {
                COALESCE_COPY_BELOW
            } else {
                (i % 300) as usize
            };
            let body: Vec<u8> = (0..body_len).map(|b| (b as u32 ^ i) as u8).collect();
            let head = i.to_le_bytes();
            expected.extend_from_slice(&head);
            expected.extend_from_slice(&body);
            let frame = out_frame(&head, body);
            if i == 500 {
                large = Some(frame.body.clone());
            }
            coalescer.push(frame);
        }
        let chunks = coalescer.chunks();
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined, expected);
        // About 150 KiB of small frames: a handful of chunks, not 2,000.
        assert!(chunks.len() <= 8, "{} chunks", chunks.len());
        // The large body is the very same allocation, not a copy.
        let large = large.unwrap();
        assert!(chunks
            .iter()
            .any(|c| c.as_ptr() == large.as_ptr() && c.len() == large.len()));
        chunks.clear();
        assert!(coalescer.is_empty());
        coalescer.push(out_frame(b"h", b"body".to_vec()));
        assert_eq!(coalescer.chunks().concat(), b"hbody");
    }
}
