//! Arbitrary bytes into both frame decoders. The checksummed (handshake)
//! decoder never panics, a prefix of a frame is "need more", and a decoded
//! frame re-encodes to the same bytes. The opener of sealed records (a
//! fixed key) never panics and never opens bytes nobody sealed, and walking
//! any plaintext for messages never panics. The bytes sealed as one
//! message, and as two messages coalesced into one record, open to
//! themselves, once; a flipped bit, a replay or a cut record never opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::frame::{Frame, FrameKind};
use sessio_net::record::{self, RecordWriter};
use sessio_net::seal::{RECORD_OVERHEAD, SessionKeys};

/// Every message of an opened record's plaintext, or the first error.
fn messages(mut plain: &[u8], limit: u32) -> Result<Vec<(FrameKind, Vec<u8>)>, ()> {
    let mut out = Vec::new();
    while !plain.is_empty() {
        let (frame, used) = record::next_message(plain, limit).map_err(|_| ())?;
        assert!(used > 0 && used <= plain.len());
        out.push((frame.kind, frame.body.to_vec()));
        plain = &plain[used..];
    }
    Ok(out)
}

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
    // Any bytes as an opened record's plaintext: no panic.
    let _ = messages(data, limit);

    // The sending side's keys, and the receiving side's (mirrored).
    let keys = SessionKeys::from_raw([1; 32], [2; 32]);
    let mut buf = data.to_vec();
    let mut opener = keys.mirrored().opener();
    assert!(
        !matches!(opener.open(&mut buf, limit), Ok(Some(_))),
        "bytes nobody sealed opened"
    );

    if RECORD_OVERHEAD + record::message_len(data.len()) > limit as usize {
        return;
    }
    // Record 0: the data as one message. Record 1: two messages, the data
    // then a Ping, coalesced.
    let mut writer = RecordWriter::new(keys.sealer());
    writer.push_raw(FrameKind::DeltaBatch, data).unwrap();
    let mut wire = Vec::new();
    writer.take_sealed(&mut wire).unwrap();
    let one = wire.len();
    writer.push_raw(FrameKind::Ack, data).unwrap();
    writer.push_raw(FrameKind::Ping, b"ping").unwrap();
    let mut second = Vec::new();
    writer.take_sealed(&mut second).unwrap();
    wire.extend_from_slice(&second);

    let mut opener = keys.mirrored().opener();
    for n in 0..one.min(64) {
        let mut prefix = wire[..n].to_vec();
        assert_eq!(opener.open(&mut prefix, limit), Ok(None));
    }
    let mut first = wire[..one].to_vec();
    let (plain, used) = opener.open(&mut first, limit).unwrap().unwrap();
    assert_eq!(used, one);
    assert_eq!(
        messages(plain, limit),
        Ok(vec![(FrameKind::DeltaBatch, data.to_vec())])
    );
    // A replay of the first record.
    let mut replay = wire[..one].to_vec();
    assert!(opener.open(&mut replay, limit).is_err());
    // The second record with one bit flipped where the input says.
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
    // The second record cut short by one block (length adjusted).
    let mut cut = wire[one..wire.len() - 16].to_vec();
    let len = u32::from_le_bytes(cut[4..8].try_into().unwrap()) - 16;
    cut[4..8].copy_from_slice(&len.to_le_bytes());
    assert!(opener.open(&mut cut, limit).is_err());
    // Untouched, it opens, to both messages.
    let mut second = wire[one..].to_vec();
    let (plain, _) = opener.open(&mut second, limit).unwrap().unwrap();
    assert_eq!(
        messages(plain, limit),
        Ok(vec![
            (FrameKind::Ack, data.to_vec()),
            (FrameKind::Ping, b"ping".to_vec())
        ])
    );
});
