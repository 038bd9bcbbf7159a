//! Sealing and opening: round trips, and every way a record must fail to
//! open (wrong key, a flipped bit anywhere, replay, reordering, a dropped
//! record, the other direction, a cut tag, a shape no record has).

use super::*;
use crate::frame::FRAME_BYTES_MAX_DEFAULT;
use crate::record::push_message;

const MAX: u32 = FRAME_BYTES_MAX_DEFAULT;

/// Keys of one connection, as the initiator and the responder hold them.
fn pair() -> (SessionKeys, SessionKeys) {
    let transcript = [9u8; 97];
    let i = SessionKeys::derive(&[1; 32], &transcript, true);
    let r = SessionKeys::derive(&[1; 32], &transcript, false);
    (i, r)
}

/// A record's plaintext: one message of `kind` carrying `body`.
fn plaintext(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    push_message(kind, body, &mut p);
    p
}

fn sealed(sealer: &mut Sealer, kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sealer.seal(&plaintext(kind, body), &mut out).unwrap();
    out
}

/// Opens a copy of `bytes`: the record's plaintext, or the error.
fn open(opener: &mut Opener, bytes: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
    let mut buf = bytes.to_vec();
    Ok(opener.open(&mut buf, MAX)?.map(|(plain, used)| {
        assert_eq!(used, bytes.len());
        plain.to_vec()
    }))
}

#[test]
fn records_round_trip_in_both_directions() {
    let (i, r) = pair();
    let (mut i_seal, mut r_open) = (i.sealer(), r.opener());
    let (mut r_seal, mut i_open) = (r.sealer(), i.opener());
    for n in 0..5u8 {
        let body = vec![n; usize::from(n) * 37];
        let bytes = sealed(&mut i_seal, FrameKind::DeltaBatch, &body);
        let plain = plaintext(FrameKind::DeltaBatch, &body);
        assert_eq!(bytes.len(), RECORD_OVERHEAD + plain.len());
        assert_eq!(bytes.len() % BLOCK_LEN, 0);
        assert_eq!(open(&mut r_open, &bytes).unwrap(), Some(plain));
        let bytes = sealed(&mut r_seal, FrameKind::Ack, &body);
        assert_eq!(
            open(&mut i_open, &bytes).unwrap(),
            Some(plaintext(FrameKind::Ack, &body))
        );
    }
    assert_eq!(r_open.next_counter(), 5);
    assert_eq!(i_seal.next_counter(), 5);
}

/// The wire as `docs/PROTOCOL.md` describes it: a record is the header,
/// then AEGIS-256X4 of the plaintext under the direction's key, with
/// nonce `counter LE | [0; 24]` and the header as associated data, then
/// the tag. Computed here with the crate's own allocating API, apart from
/// the in-place path the sealer takes.
#[test]
fn a_record_is_aegis_256x4_as_documented() {
    let (i, _) = pair();
    let mut sealer = i.sealer();
    let plain = plaintext(FrameKind::DeltaBatch, b"what the bank is sent");
    for counter in 0..3u64 {
        let mut out = Vec::new();
        sealer.seal(&plain, &mut out).unwrap();
        let body_len = u32::try_from(plain.len() + TAG_LEN).unwrap();
        let header = record_header(body_len, counter);
        let mut nonce = [0u8; 32];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        let (cipher, tag) =
            aegis::aegis256x4::Aegis256X4::<16>::new(&i.send, &nonce).encrypt(&plain, &header);
        assert_eq!(out[..HEADER_LEN], header);
        assert_eq!(out[HEADER_LEN..HEADER_LEN + plain.len()], cipher[..]);
        assert_eq!(out[HEADER_LEN + plain.len()..], tag);
        assert_eq!(out[2], PROTOCOL_VERSION);
    }
}

#[test]
fn several_records_in_one_buffer_open_one_by_one() {
    let (i, r) = pair();
    let mut sealer = i.sealer();
    let mut buf = Vec::new();
    for n in 0..3u8 {
        sealer
            .seal(&plaintext(FrameKind::Ping, &[n; 8]), &mut buf)
            .unwrap();
    }
    let mut opener = r.opener();
    let mut at = 0;
    for n in 0..3u8 {
        let (plain, used) = opener.open(&mut buf[at..], MAX).unwrap().unwrap();
        assert_eq!(plain, plaintext(FrameKind::Ping, &[n; 8]));
        at += used;
    }
    assert_eq!(at, buf.len());
    assert_eq!(opener.open(&mut buf[at..], MAX), Ok(None));
}

#[test]
fn the_plaintext_is_not_in_the_clear() {
    let (i, _) = pair();
    let marker = [0xC3u8; 32];
    let bytes = sealed(&mut i.sealer(), FrameKind::DeltaBatch, &marker);
    assert!(!bytes.windows(4).any(|w| w == [0xC3; 4]));
    // Nor is the message kind: only the record's kind is in the header.
    assert_eq!(bytes[3], FrameKind::Sealed as u8);
}

#[test]
fn every_prefix_needs_more() {
    let (i, r) = pair();
    let bytes = sealed(&mut i.sealer(), FrameKind::Ping, b"hello, sealed records");
    for n in 0..bytes.len() {
        assert_eq!(open(&mut r.opener(), &bytes[..n]), Ok(None), "prefix {n}");
    }
}

#[test]
fn a_wrong_key_fails_to_open() {
    let (i, _) = pair();
    let other = SessionKeys::derive(&[2; 32], &[9u8; 97], false);
    let bytes = sealed(&mut i.sealer(), FrameKind::Ping, b"ping");
    assert_eq!(
        open(&mut other.opener(), &bytes),
        Err(SealError::BadTag { counter: 0 })
    );
}

#[test]
fn every_flipped_bit_is_caught() {
    let (i, r) = pair();
    let bytes = sealed(
        &mut i.sealer(),
        FrameKind::Invalidate,
        b"drop these sessions",
    );
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << bit;
            match open(&mut r.opener(), &bad) {
                // A longer length makes the record a prefix: need more.
                Ok(None) => assert!((4..8).contains(&at), "byte {at} bit {bit}"),
                Ok(Some(_)) => panic!("flip at byte {at} bit {bit} opened"),
                Err(e) => {
                    let expected = match at {
                        0..3 => matches!(e, SealError::Frame(_)),
                        3 => matches!(e, SealError::Frame(_) | SealError::NotSealed { .. }),
                        4..8 => matches!(
                            e,
                            SealError::BadTag { .. }
                                | SealError::BadLength { .. }
                                | SealError::Frame(_)
                        ),
                        8..16 => matches!(e, SealError::OutOfSequence { .. }),
                        _ => matches!(e, SealError::BadTag { .. }),
                    };
                    assert!(expected, "byte {at} bit {bit}: {e}");
                }
            }
        }
    }
}

#[test]
fn a_replayed_record_fails_to_open() {
    let (i, r) = pair();
    let mut sealer = i.sealer();
    let first = sealed(&mut sealer, FrameKind::DeltaBatch, b"batch 0");
    let mut opener = r.opener();
    assert!(open(&mut opener, &first).unwrap().is_some());
    assert_eq!(
        open(&mut opener, &first),
        Err(SealError::OutOfSequence {
            expected: 1,
            found: 0
        })
    );
    // Rewriting the counter in the header (associated data) breaks the tag.
    let mut relabelled = first.clone();
    relabelled[8..16].copy_from_slice(&1u64.to_le_bytes());
    assert_eq!(
        open(&mut opener, &relabelled),
        Err(SealError::BadTag { counter: 1 })
    );
}

#[test]
fn reordered_and_dropped_records_fail_to_open() {
    let (i, r) = pair();
    let mut sealer = i.sealer();
    let f0 = sealed(&mut sealer, FrameKind::Ping, b"0");
    let f1 = sealed(&mut sealer, FrameKind::Ping, b"1");
    let f2 = sealed(&mut sealer, FrameKind::Ping, b"2");
    // Reordered: 1 before 0.
    assert_eq!(
        open(&mut r.opener(), &f1),
        Err(SealError::OutOfSequence {
            expected: 0,
            found: 1
        })
    );
    // Dropped: 0, then 2.
    let mut opener = r.opener();
    open(&mut opener, &f0).unwrap().unwrap();
    assert_eq!(
        open(&mut opener, &f2),
        Err(SealError::OutOfSequence {
            expected: 1,
            found: 2
        })
    );
}

#[test]
fn a_record_of_the_other_direction_fails_to_open() {
    let (i, r) = pair();
    // Reflected back at its sender.
    let bytes = sealed(&mut i.sealer(), FrameKind::Ping, b"ping");
    assert!(matches!(
        open(&mut i.opener(), &bytes),
        Err(SealError::BadTag { .. })
    ));
    // A responder's record offered to the responder.
    let bytes = sealed(&mut r.sealer(), FrameKind::Pong, b"pong");
    assert!(matches!(
        open(&mut r.opener(), &bytes),
        Err(SealError::BadTag { .. })
    ));
    assert_eq!(r.mirrored().send, i.send);
}

#[test]
fn a_cut_tag_or_a_shape_no_record_has_fails_to_open() {
    let (i, r) = pair();
    let bytes = sealed(&mut i.sealer(), FrameKind::Ping, b"ping");
    // A whole block fewer, length adjusted: a wrong tag.
    let mut cut = bytes[..bytes.len() - BLOCK_LEN].to_vec();
    let len = u32::from_le_bytes(cut[4..8].try_into().unwrap()) - BLOCK_LEN as u32;
    cut[4..8].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        open(&mut r.opener(), &cut),
        Err(SealError::BadTag { .. })
    ));
    // A body that is not a tag after whole, non-empty blocks is refused
    // from the header alone.
    for body_len in (0..=TAG_LEN as u32 + 1).chain([40, 47, 49]) {
        let mut short = bytes[..HEADER_LEN].to_vec();
        short[4..8].copy_from_slice(&body_len.to_le_bytes());
        assert_eq!(
            open(&mut r.opener(), &short),
            Err(SealError::BadLength { body_len })
        );
    }
    // The sealer refuses such a record too, and leaves it alone.
    let mut sealer = i.sealer();
    for len in [0, 16, 31, 33, 47, 49] {
        let mut record = vec![7u8; len];
        assert!(matches!(
            sealer.seal_in_place(&mut record),
            Err(SealError::BadLength { .. })
        ));
        assert_eq!(record, vec![7u8; len]);
    }
    assert_eq!(sealer.next_counter(), 0);
}

#[test]
fn the_record_limit_is_checked_from_the_header() {
    let (i, r) = pair();
    let bytes = sealed(&mut i.sealer(), FrameKind::Ping, &[0; 200]);
    let mut buf = bytes[..HEADER_LEN].to_vec();
    assert!(matches!(
        r.opener().open(&mut buf, 128),
        Err(SealError::Frame(FrameError::TooLarge { .. }))
    ));
}

#[test]
fn frames_that_are_not_records_do_not_open() {
    let (_, r) = pair();
    // A checksummed (handshake) frame.
    let mut plain = Vec::new();
    crate::frame::encode_into(FrameKind::Ping, &[0; 32], &mut plain);
    assert_eq!(
        open(&mut r.opener(), &plain),
        Err(SealError::NotSealed {
            kind: FrameKind::Ping
        })
    );
    // A record whose kind byte was changed to a message kind: refused
    // from the header.
    let (i, _) = pair();
    let mut bytes = sealed(&mut i.sealer(), FrameKind::Ping, b"x");
    bytes[3] = FrameKind::DeltaBatch as u8;
    assert_eq!(
        open(&mut r.opener(), &bytes),
        Err(SealError::NotSealed {
            kind: FrameKind::DeltaBatch
        })
    );
}

#[test]
fn an_exhausted_sealer_refuses_and_leaves_the_buffer_alone() {
    let (i, _) = pair();
    let mut sealer = i.sealer();
    sealer.set_next_counter(u64::MAX);
    let mut out = vec![1, 2, 3];
    assert_eq!(
        sealer.seal(&plaintext(FrameKind::Ping, b"x"), &mut out),
        Err(SealError::Exhausted)
    );
    assert_eq!(out, [1, 2, 3]);
}
