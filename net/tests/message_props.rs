//! Property tests: any message within the limits survives encode → frame
//! decode → validated decode unchanged, and any truncation of its frame is
//! "need more", never an error or a panic.

use proptest::collection::vec;
use proptest::prelude::*;
use sessio_net::frame::Frame;
use sessio_net::message::{AckEntry, AllApplied, Counter, InvalidateEntry, Stats};
use sessio_net::{
    Ack, AckStatus, Codec, Delta, DeltaBatch, DeltaEntry, Fetch, FetchReply, FoundRecord,
    Invalidate, Message, Ping, Pong, StatsRequest,
};

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..300)
}

fn delta() -> impl Strategy<Value = Delta> {
    prop_oneof![
        bytes().prop_map(Delta::Ops),
        bytes().prop_map(Delta::Full),
        Just(Delta::Remove)
    ]
}

fn status() -> impl Strategy<Value = AckStatus> {
    prop_oneof![
        Just(AckStatus::Applied),
        Just(AckStatus::NeedFull),
        Just(AckStatus::Fenced),
        Just(AckStatus::Refused)
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let entry = (
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        delta(),
    )
        .prop_map(|(sid, base_version, new_version, epoch, body)| DeltaEntry {
            sid,
            base_version,
            new_version,
            epoch,
            body,
        });
    prop_oneof![
        (any::<u64>(), vec(entry, 0..20))
            .prop_map(|(host_id, entries)| Message::DeltaBatch(DeltaBatch { host_id, entries })),
        vec((any::<[u8; 16]>(), any::<u64>(), status()), 0..50).prop_map(|e| Message::Ack(Ack {
            entries: e
                .into_iter()
                .map(|(sid, version, status)| AckEntry {
                    sid,
                    version,
                    status
                })
                .collect()
        })),
        (1..=1024u32).prop_map(|entries| Message::AllApplied(AllApplied { entries })),
        (any::<u64>(), any::<[u8; 16]>())
            .prop_map(|(request_id, sid)| Message::Fetch(Fetch { request_id, sid })),
        (
            any::<u64>(),
            any::<[u8; 16]>(),
            proptest::option::of((any::<u64>(), any::<u64>(), bytes()))
        )
            .prop_map(|(request_id, sid, found)| Message::FetchReply(FetchReply {
                request_id,
                sid,
                found: found.map(|(version, epoch, record)| FoundRecord {
                    version,
                    epoch,
                    record
                }),
            })),
        vec((any::<[u8; 16]>(), any::<u64>()), 0..50).prop_map(|e| Message::Invalidate(
            Invalidate {
                entries: e
                    .into_iter()
                    .map(|(sid, epoch)| InvalidateEntry { sid, epoch })
                    .collect()
            }
        )),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Message::Pong(Pong {
            nonce,
            stale: Vec::new()
        })),
        any::<u64>().prop_map(|request_id| Message::StatsRequest(StatsRequest { request_id })),
        (
            any::<u64>(),
            any::<u64>(),
            vec(("[a-z_]{0,40}", any::<u64>()), 0..20)
        )
            .prop_map(|(request_id, incarnation, c)| Message::Stats(Stats {
                request_id,
                incarnation,
                counters: c
                    .into_iter()
                    .map(|(name, value)| Counter { name, value })
                    .collect(),
            })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_round_trip(msg in message(), pad in 0usize..8) {
        let mut codec = Codec::default();
        let encoded = codec.encode(&msg).unwrap();
        let mut buf = vec![0u8; pad];
        buf.extend_from_slice(&encoded);
        let (frame, used) = Frame::decode(&buf[pad..], u32::MAX).unwrap().unwrap();
        prop_assert_eq!(used, encoded.len());
        prop_assert_eq!(codec.decode(&frame).unwrap(), msg);
        // Re-encoding the decoded frame gives the same bytes.
        let mut again = Vec::new();
        frame.encode_into(&mut again);
        prop_assert_eq!(&again, &encoded);
    }

    #[test]
    fn truncated_frames_need_more(msg in message(), cut in any::<prop::sample::Index>()) {
        let encoded = Codec::default().encode(&msg).unwrap();
        let n = cut.index(encoded.len());
        prop_assert_eq!(Frame::decode(&encoded[..n], u32::MAX), Ok(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
        let mut codec = Codec::default();
        if let Ok(Some((frame, _))) = Frame::decode(&data, 1 << 20) {
            let _ = codec.decode(&frame);
        }
    }
}
