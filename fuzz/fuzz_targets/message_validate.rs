//! Arbitrary bytes as the body of every message kind: validated access
//! never panics, and whatever validates re-encodes to a frame that decodes
//! to the same message (the decoded message is the reference model).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::frame::{Frame, FrameKind};
use sessio_net::Codec;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = FrameKind::ALL[selector as usize % FrameKind::ALL.len()];
    let mut codec = Codec::default();
    let Ok(msg) = codec.decode(&Frame { kind, body }) else {
        return;
    };
    assert_eq!(msg.kind(), kind);
    let encoded = codec.encode(&msg).expect("a message that passed the limits encodes");
    let (frame, used) = Frame::decode(&encoded, u32::MAX).unwrap().unwrap();
    assert_eq!(used, encoded.len());
    assert_eq!(codec.decode(&frame).unwrap(), msg);
});
