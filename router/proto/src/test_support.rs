//! What the state machines' tests share.

use bytes::Bytes;
use swarmbus_schema::{decode, DecodeOptions, FrameDecoder, Message, OutFrame};

/// The message a frame a machine asked to send carries.
pub fn message(frame: &OutFrame) -> Message {
    let mut decoder = FrameDecoder::new(1 << 20);
    decoder.push(Bytes::from(frame.to_vec()));
    decode(
        decoder.next_frame().unwrap().unwrap(),
        &DecodeOptions::default(),
    )
    .unwrap()
}
