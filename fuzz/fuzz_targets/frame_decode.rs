//! Arbitrary bytes into both frame decoders. The checksummed (handshake)
//! decoder never panics, a prefix of a frame is "need more", and a decoded
//! frame re-encodes to the same bytes. The opener of sealed frames (a fixed
//! key) never panics and never opens bytes nobody sealed; the bytes sealed
//! as a body open to themselves, once, and a flipped bit, a replay or a cut
//! frame never opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::frame::{Frame, FrameKind};
use sessio_net::seal::{SessionKeys, TAG_LEN};

fuzz_target!(|data: &[u8]| {
    let limit = 1 << 16;
    match Frame::decode(data, limit) {
        Ok(Some((frame, used))) => {
            assert!(used <= data.len());
            let mut again = Vec::new();
            frame.encode_into(&mut again);
            assert_eq!(&again[..], &data[..used]);
            for n in 0..used {
                assert_eq!(Frame::decode(&data[..n], limit), Ok(None));
            }
        }
        Ok(None) | Err(_) => {}
    }

    // The sending side's keys, and the receiving side's (mirrored).
    let keys = SessionKeys::from_raw([1; 32], [2; 32]);
    let mut buf = data.to_vec();
    let mut opener = keys.mirrored().opener();
    assert!(
        !matches!(opener.open(&mut buf, limit), Ok(Some(_))),
        "bytes nobody sealed opened"
    );

    if data.len() + 16 + TAG_LEN > limit as usize {
        return;
    }
    let mut sealer = keys.sealer();
    let mut wire = Vec::new();
    sealer.seal(FrameKind::DeltaBatch, data, &mut wire).unwrap();
    let one = wire.len();
    sealer.seal(FrameKind::Ack, data, &mut wire).unwrap();
    let mut opener = keys.mirrored().opener();
    for n in 0..one.min(64) {
        let mut prefix = wire[..n].to_vec();
        assert_eq!(opener.open(&mut prefix, limit), Ok(None));
    }
    let mut first = wire[..one].to_vec();
    let (frame, used) = opener.open(&mut first, limit).unwrap().unwrap();
    assert_eq!(
        (frame.kind, frame.body, used),
        (FrameKind::DeltaBatch, data, one)
    );
    // A replay of the first frame.
    let mut replay = wire[..one].to_vec();
    assert!(opener.open(&mut replay, limit).is_err());
    // The second frame with one bit flipped where the input says.
    let pick = data.iter().fold(data.len(), |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let mut bad = wire[one..].to_vec();
    let at = pick % bad.len();
    bad[at] ^= 1 << (pick % 8);
    assert!(
        !matches!(opener.open(&mut bad, limit), Ok(Some(_))),
        "flip at {at} opened"
    );
    // The second frame cut short of its tag (length adjusted).
    let mut cut = wire[one..wire.len() - 1].to_vec();
    let len = u32::from_le_bytes(cut[4..8].try_into().unwrap()) - 1;
    cut[4..8].copy_from_slice(&len.to_le_bytes());
    assert!(opener.open(&mut cut, limit).is_err());
    // Untouched, it opens.
    let mut second = wire[one..].to_vec();
    let (frame, _) = opener.open(&mut second, limit).unwrap().unwrap();
    assert_eq!((frame.kind, frame.body), (FrameKind::Ack, data));
});
