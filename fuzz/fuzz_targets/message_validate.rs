//! Arbitrary bytes as the body of every message kind: validated access
//! never panics, and whatever validates re-encodes to a frame that decodes
//! to the same message (the decoded message is the reference model), both
//! checksummed and in sealed records (a fixed key) as a connection sends
//! it: coalesced with a copy of itself into one record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::Codec;
use sessio_net::frame::{Frame, FrameKind};
use sessio_net::record::{self, RecordWriter};
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
    let mut opener = keys.mirrored().opener();
    let mut writer = RecordWriter::new(keys.sealer());
    for _ in 0..2 {
        writer
            .push(&mut codec, &msg)
            .expect("a message that passed the limits seals");
    }
    let mut wire = Vec::new();
    writer.take_sealed(&mut wire).unwrap();
    let limit = Codec::default().limits().frame_bytes_max;
    let mut at = 0;
    let mut opened = 0;
    while at < wire.len() {
        let (plain, used) = opener
            .open(&mut wire[at..], record::record_bytes_max(limit))
            .unwrap()
            .unwrap();
        let mut p = 0;
        while p < plain.len() {
            let (frame, n) = record::next_message(&plain[p..], limit).unwrap();
            assert_eq!(codec.decode(&frame).unwrap(), msg);
            p += n;
            opened += 1;
        }
        at += used;
    }
    assert_eq!(opened, 2);
});
