//! Arbitrary delta batches applied to a replica node's store, checked
//! against a model of what the node must hold: per session the version and
//! ownership epoch, fencing of older epochs, base-version checks for op
//! deltas, and byte accounting (records plus the charge of op batches not
//! yet folded in). Whole batches go through the wire format and are read
//! where they lie, as a node reads them; single entries go as owned
//! values. Bodies are drawn from valid records and op batches as
//! well as from raw fuzz bytes, so both paths are exercised; fetches fold
//! pending batches in between.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sessio_engine::session::{Op, SessionData, decode_session, encode_ops, encode_session};
use sessio_net::message::{Ack, AckStatus, Delta, DeltaBatch, DeltaEntry};
use sessio_net::{Codec, Frame, Limits, Message, Received};
use sessio_remote::node::PENDING_BATCHES_MAX;
use sessio_remote::{NodeLimits, Store};
use std::collections::HashMap;

#[derive(Arbitrary, Debug)]
enum Body {
    ValidFull(u8),
    ValidOps(u8),
    Incr(i8),
    Invalidate,
    Remove,
    RawFull(Vec<u8>),
    RawOps(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    sid: u8,
    base: u8,
    new: u8,
    epoch: u8,
    body: Body,
}

fn record(n: u8) -> Vec<u8> {
    let mut s = SessionData::default();
    s.apply(&[Op::Set { key: "k".into(), value: vec![n; usize::from(n % 40)] }], 0, 1 << 20).unwrap();
    encode_session(&s).to_vec()
}

fn ops(n: u8) -> Vec<u8> {
    encode_ops(&[Op::Set { key: format!("a{}", n % 4), value: vec![n; 8] }]).to_vec()
}

fuzz_target!(|batches: Vec<Vec<Entry>>| {
    let limits = NodeLimits { sessions_max: 3, bytes_max: 4096 };
    let mut store = Store::new(limits, 1);
    // The model: sid -> (version, epoch).
    let mut model: HashMap<[u8; 16], (u64, u64)> = HashMap::new();
    let mut fold_next = false;
    for (round, batch) in batches.into_iter().take(16).enumerate() {
        let entries: Vec<DeltaEntry> = batch
            .into_iter()
            .take(32)
            .map(|e| {
                let mut sid = [0u8; 16];
                sid[0] = e.sid % 4;
                let body = match e.body {
                    Body::ValidFull(n) => Delta::Full(record(n)),
                    Body::ValidOps(n) => Delta::Ops(ops(n)),
                    // Applied at once (its outcome depends on the value).
                    Body::Incr(by) => Delta::Ops(encode_ops(&[Op::Incr { key: "c".into(), by: i64::from(by) }]).to_vec()),
                    Body::Invalidate => Delta::Ops(encode_ops(&[Op::Invalidate]).to_vec()),
                    Body::Remove => Delta::Remove,
                    Body::RawFull(b) => Delta::Full(b),
                    Body::RawOps(b) => Delta::Ops(b),
                };
                DeltaEntry {
                    sid,
                    base_version: u64::from(e.base % 8),
                    new_version: u64::from(e.new % 8),
                    epoch: u64::from(e.epoch % 4),
                    body,
                }
            })
            .collect();
        // Even batches go whole (one ack entry per delta, in order); odd ones
        // entry by entry, so the model can be checked after every entry.
        let whole = entries.len() % 2 == 0;
        let sent = entries.clone();
        let acks: Vec<_> = if whole {
            // Through the wire: archived, then read where it lies, as a
            // node reads what a host sends.
            let msg = Message::DeltaBatch(DeltaBatch { host_id: 7, entries });
            let mut codec = Codec::new(Limits::default());
            let mut wire = Vec::new();
            codec.encode_into(&msg, &mut wire).unwrap();
            let (frame, _) = Frame::decode(&wire, Limits::default().frame_bytes_max).unwrap().unwrap();
            let received = codec.receive(&frame).unwrap();
            assert!(matches!(received, Received::DeltaBatch(_)), "a batch is read where it lies");
            let entries = match store.handle(7, received) {
                Some(Message::Ack(ack)) => ack.entries,
                // Short for every entry applied at the version it named.
                Some(Message::AllApplied(_)) => {
                    Ack::all_applied(sent.iter().map(|e| (e.sid, e.new_version))).entries
                }
                other => panic!("a delta batch is answered with an ack, not {other:?}"),
            };
            assert_eq!(entries.len(), sent.len(), "one ack entry per delta");
            entries
        } else {
            Vec::new()
        };
        for (k, e) in sent.iter().enumerate() {
            let a = if whole {
                acks[k].clone()
            } else {
                let ack = store.apply_batch(&DeltaBatch { host_id: 7, entries: vec![e.clone()] });
                assert_eq!(ack.entries.len(), 1);
                ack.entries[0].clone()
            };
            let key = e.sid;
            let held = model.get(&key).copied();
            match a.status {
                AckStatus::Fenced => {
                    assert!(held.is_some_and(|(_, ep)| e.epoch < ep), "fenced without a newer epoch held");
                }
                AckStatus::Applied => {
                    assert!(held.is_none_or(|(_, ep)| e.epoch >= ep), "applied over a newer epoch");
                    match &e.body {
                        Delta::Remove => {
                            // A removal older than the copy (same epoch) keeps it.
                            let overtaken = held.is_some_and(|(v, ep)| {
                                ep == e.epoch && e.new_version != 0 && v > e.new_version
                            });
                            if !overtaken {
                                model.remove(&key);
                            }
                        }
                        Delta::Full(_) => {
                            let replay = held.is_some_and(|(v, ep)| ep == e.epoch && e.new_version <= v);
                            if !replay {
                                model.insert(key, (e.new_version, e.epoch));
                            }
                        }
                        Delta::Ops(body) => {
                            let (v, _) = held.expect("ops applied to a session the node holds");
                            assert_eq!(e.base_version, v, "ops applied on another base");
                            let invalidates = sessio_engine::session::decode_ops(body)
                                .is_ok_and(|ops| ops.contains(&Op::Invalidate));
                            if invalidates {
                                model.remove(&key);
                            } else {
                                model.insert(key, (e.new_version, e.epoch));
                            }
                        }
                    }
                }
                AckStatus::NeedFull | AckStatus::Refused => {}
            }
            // The store agrees with the model after every entry (after the
            // whole batch, for batches applied whole).
            if !whole {
                let got = store.get(&e.sid).map(|c| (c.version(), c.epoch()));
                assert_eq!(got, model.get(&key).copied(), "store and model disagree after {e:?} -> {a:?}");
            }
        }
        for (key, want) in &model {
            assert_eq!(store.get(key).map(|c| (c.version(), c.epoch())), Some(*want), "after the batch");
        }
        // Byte accounting and limits hold, and every copy is a valid record.
        let mut bytes = 0u64;
        let mut count = 0u64;
        for k in 0..4u8 {
            let mut sid = [0u8; 16];
            sid[0] = k;
            if let Some(c) = store.get(&sid) {
                bytes += c.bytes();
                count += 1;
                assert!(c.pending_batches() <= PENDING_BATCHES_MAX);
                assert_eq!(c.base_version() + c.pending_batches() as u64, c.version());
                assert!(c.bytes() >= c.record().len() as u64);
            }
        }
        assert_eq!(bytes, store.bytes());
        assert_eq!(count, model.len() as u64, "the store holds a session the model does not");
        assert!(count <= limits.sessions_max && bytes <= limits.bytes_max);
        // Every other batch, fold one session, as a fetch does: its record
        // is then the session at its version, valid, and no larger than
        // it was charged (records here are this engine's own).
        if fold_next {
            let mut sid = [0u8; 16];
            sid[0] = (round % 4) as u8;
            let charged = store.get(&sid).map(|c| c.bytes());
            if let Some(c) = store.folded(&sid) {
                assert_eq!(c.pending_batches(), 0);
                assert_eq!(Some((c.version(), c.epoch())), model.get(&sid).copied());
                decode_session(c.record()).expect("a folded record is valid");
                assert!(c.bytes() <= charged.unwrap(), "a fold grew past its charge");
            }
        }
        fold_next = !fold_next;
    }
});
