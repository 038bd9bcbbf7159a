//! Arbitrary bytes as the body of every message kind: validated access
//! never panics, and whatever validates re-encodes to a frame that decodes
//! to the same message (the decoded message is the reference model), both
//! checksummed and sealed (a fixed key) as a connection sends it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::Codec;
use sessio_net::frame::{Frame, FrameKind};
use sessio_net::seal::SessionKeys;

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
    let encoded = codec
        .encode(&msg)
        .expect("a message that passed the limits encodes");
    let (frame, used) = Frame::decode(&encoded, u32::MAX).unwrap().unwrap();
    assert_eq!(used, encoded.len());
    assert_eq!(codec.decode(&frame).unwrap(), msg);

    let keys = SessionKeys::from_raw([5; 32], [6; 32]);
    let (mut sealer, mut opener) = (keys.sealer(), keys.mirrored().opener());
    let mut wire = Vec::new();
    for _ in 0..2 {
        codec
            .encode_sealed_into(&msg, &mut sealer, &mut wire)
            .expect("a message that passed the limits seals");
    }
    let mut at = 0;
    for _ in 0..2 {
        let (frame, used) = opener.open(&mut wire[at..], u32::MAX).unwrap().unwrap();
        assert_eq!(codec.decode(&frame).unwrap(), msg);
        at += used;
    }
    assert_eq!(at, wire.len());
});
