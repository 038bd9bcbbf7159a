//! The store's rules, one message at a time, and against an eager model.

use super::*;
use proptest::prelude::*;
use sessio_engine::Op;
use sessio_engine::session::{Applied, KEY_BYTES_MAX, SessionData};
use sessio_engine::session::{decode_ops, decode_session, encode_ops, encode_session};
use sessio_net::{Delta, DeltaEntry, InvalidateEntry};

const SID: Sid = [7; 16];

fn record(attrs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut d = SessionData::default();
    d.apply(&Op::sets(attrs), 1, 1 << 20).unwrap();
    encode_session(&d).to_vec()
}

fn entry(base: u64, new: u64, epoch: u64, body: Delta) -> DeltaEntry {
    DeltaEntry {
        sid: SID,
        base_version: base,
        new_version: new,
        epoch,
        body,
    }
}

fn one(store: &mut Store, e: DeltaEntry) -> AckEntry {
    from_host(store, 1, e)
}

/// `e` from host `host`.
fn from_host(store: &mut Store, host: u64, e: DeltaEntry) -> AckEntry {
    let ack = store.apply_batch(&DeltaBatch {
        host_id: host,
        entries: vec![e],
    });
    assert_eq!(ack.entries.len(), 1);
    ack.entries[0]
}

fn set(key: &str, v: &[u8]) -> Delta {
    Delta::Ops(
        encode_ops(&[Op::Set {
            key: key.into(),
            value: v.to_vec(),
        }])
        .to_vec(),
    )
}

#[test]
fn ops_need_the_base_version() {
    let mut s = Store::new(NodeLimits::default(), 1);
    assert_eq!(
        one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
        AckStatus::NeedFull
    );
    let full = one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
    assert_eq!((full.status, full.version), (AckStatus::Applied, 1));
    assert_eq!(
        one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
        AckStatus::Applied
    );
    // The same delta again: base no longer matches.
    assert_eq!(
        one(&mut s, entry(1, 2, 1, set("a", b"y"))).status,
        AckStatus::NeedFull
    );
    // A value of the same length: written over the record where it lies.
    assert_eq!(s.get(&SID).unwrap().pending_batches(), 0);
    assert_eq!(s.counters.patched, 1);
    let c = s.folded(&SID).unwrap();
    assert_eq!((c.version(), c.pending_batches()), (2, 0));
    let d = decode_session(c.record()).unwrap();
    assert_eq!(d.get("a"), Some(&b"x"[..]));
}

/// Applies `ops` to the copy of `SID` at `v` → `v + 1`, at `now_ms`.
fn ops_at(s: &mut Store, v: u64, ops: &[Op], now_ms: u64) -> AckEntry {
    let ack = s.apply_batch_at(
        &DeltaBatch {
            host_id: 1,
            entries: vec![entry(v, v + 1, 1, Delta::Ops(encode_ops(ops).to_vec()))],
        },
        now_ms,
    );
    ack.entries[0]
}

fn set_op(key: &str, value: &[u8]) -> Op {
    Op::Set {
        key: key.into(),
        value: value.to_vec(),
    }
}

#[test]
fn a_value_of_the_same_length_is_written_where_it_lies() {
    let mut s = Store::new(NodeLimits::default(), 1);
    let base = record(&[("a", b"aaa"), ("b", b"bbb"), ("c", b"ccc")]);
    one(&mut s, entry(0, 1, 1, Delta::Full(base.clone())));
    let mut eager = decode_session(&base).unwrap();
    // Applies `ops` to both; then `patched` batches were written in place
    // in all, and `pending` wait.
    let check =
        |s: &mut Store, eager: &mut SessionData, v, ops: &[Op], now_ms, patched, pending| {
            let a = ops_at(s, v, ops, now_ms);
            assert_eq!((a.status, a.version), (AckStatus::Applied, v + 1));
            eager.apply(ops, now_ms, 1 << 20).unwrap();
            let c = s.get(&SID).unwrap();
            assert_eq!(
                (s.counters.patched, c.pending_batches()),
                (patched, pending)
            );
            assert_eq!(
                c.bytes(),
                s.bytes(),
                "one copy, charged all the store holds"
            );
        };
    // Two values and the time, in one batch; a touch alone.
    check(
        &mut s,
        &mut eager,
        1,
        &[set_op("a", b"xyz"), set_op("c", b"123"), Op::Touch],
        50,
        1,
        0,
    );
    check(&mut s, &mut eager, 2, &[Op::Touch], 60, 2, 0);
    // The same key twice in a batch: the last write wins, as in a fold.
    check(
        &mut s,
        &mut eager,
        3,
        &[set_op("b", b"one"), set_op("b", b"two")],
        70,
        3,
        0,
    );
    let c = s.get(&SID).unwrap();
    assert_eq!(c.record().len(), base.len(), "same layout, same size");
    assert_eq!(c.bytes(), base.len() as u64);
    assert_eq!(
        c.record(),
        &encode_session(&eager)[..],
        "what a fold writes"
    );
    assert_eq!(decode_session(c.record()).unwrap().updated_ms, 70);
    // Another length, or a new key: pending, as before; and while a batch
    // is pending, even a same-length value waits behind it.
    check(&mut s, &mut eager, 4, &[set_op("a", b"longer")], 80, 3, 1);
    check(&mut s, &mut eager, 5, &[set_op("d", b"new")], 90, 3, 2);
    check(&mut s, &mut eager, 6, &[set_op("b", b"xxx")], 95, 3, 3);
    // A batch with an op that is not a plain write is not written over
    // the record either.
    let c = s.folded(&SID).unwrap();
    assert_eq!(c.record(), &encode_session(&eager)[..]);
    check(
        &mut s,
        &mut eager,
        7,
        &[set_op("b", b"yyy"), Op::Remove { key: "d".into() }],
        99,
        3,
        1,
    );
    assert_eq!(
        s.folded(&SID).unwrap().record(),
        &encode_session(&eager)[..]
    );
}

#[test]
fn older_epochs_are_fenced() {
    let mut s = Store::new(NodeLimits::default(), 1);
    one(
        &mut s,
        entry(0, 5, 3, Delta::Full(record(&[("o", b"new")]))),
    );
    assert_eq!(
        one(&mut s, entry(5, 6, 2, set("o", b"old"))).status,
        AckStatus::Fenced
    );
    assert_eq!(
        one(
            &mut s,
            entry(0, 9, 2, Delta::Full(record(&[("o", b"old")])))
        )
        .status,
        AckStatus::Fenced
    );
    assert_eq!(
        one(&mut s, entry(0, 9, 2, Delta::Remove)).status,
        AckStatus::Fenced
    );
    // The newer owner's ops on the same base move the copy forward.
    assert_eq!(
        one(&mut s, entry(5, 6, 4, set("o", b"b"))).status,
        AckStatus::Applied
    );
    assert_eq!(s.get(&SID).unwrap().epoch(), 4);
    assert_eq!(s.counters.fenced, 3);
    // A replayed full copy of the same epoch is acknowledged, not applied.
    let r = one(&mut s, entry(0, 5, 4, Delta::Full(record(&[]))));
    assert_eq!((r.status, r.version), (AckStatus::Applied, 6));
}

#[test]
fn each_kind_of_write_under_a_newer_epoch_leaves_a_takeover_notice() {
    let mut s = Store::new(NodeLimits::default(), 1);
    let none: Vec<InvalidateEntry> = Vec::new();
    assert_eq!(s.take_stale(1, 10), none);
    let base = || Delta::Full(record(&[("a", b"aaa")]));
    // Host 1 writes at epoch 1, then host 2 takes over at epoch 2 with an
    // op delta written in place.
    from_host(&mut s, 1, entry(0, 1, 1, base()));
    let r = from_host(&mut s, 2, entry(1, 2, 2, set("a", b"bbb")));
    assert_eq!(r.status, AckStatus::Applied);
    assert_eq!(s.counters.patched, 1);
    let notice = |epoch| vec![InvalidateEntry { sid: SID, epoch }];
    assert_eq!(s.take_stale(1, 10), notice(2));
    // Host 3 at epoch 3, with an op delta that waits pending (a new
    // attribute: not written in place).
    let r = from_host(&mut s, 3, entry(2, 3, 3, set("new", b"x")));
    assert_eq!(r.status, AckStatus::Applied);
    assert_eq!(s.get(&SID).unwrap().pending_batches(), 1);
    assert_eq!(s.take_stale(2, 10), notice(3));
    // Host 3 again: its own writes leave no notice.
    from_host(&mut s, 3, entry(3, 4, 3, set("a", b"ccc")));
    assert_eq!(s.take_stale(3, 10), none);
    // Host 4 at epoch 4 with a full record, host 5 at epoch 5 with an op
    // batch that applies at once (an `Incr` may fail, so it never waits).
    from_host(&mut s, 4, entry(0, 9, 4, base()));
    assert_eq!(s.take_stale(3, 10), notice(4));
    let incr = Delta::Ops(
        encode_ops(&[Op::Incr {
            key: "n".into(),
            by: 1,
        }])
        .to_vec(),
    );
    assert_eq!(
        from_host(&mut s, 5, entry(9, 10, 5, incr)).status,
        AckStatus::Applied
    );
    assert_eq!(s.take_stale(4, 10), notice(5));
    // Host 6 at epoch 6 removes it.
    from_host(&mut s, 6, entry(10, 0, 6, Delta::Remove));
    assert_eq!(s.take_stale(5, 10), notice(6));
    assert!(s.get(&SID).is_none());
    assert_eq!(s.counters.takeovers, 5);
    // A fenced write (older epoch) is no takeover.
    from_host(&mut s, 7, entry(0, 1, 7, base()));
    from_host(&mut s, 8, entry(1, 2, 6, set("a", b"ddd")));
    assert_eq!(s.take_stale(7, 10), none);
    assert_eq!(s.counters.takeovers, 5);
}

#[test]
fn bad_records_and_full_stores_are_refused() {
    let mut s = Store::new(
        NodeLimits {
            sessions_max: 1,
            bytes_max: 1 << 20,
        },
        1,
    );
    assert_eq!(
        one(&mut s, entry(0, 1, 1, Delta::Full(vec![0xFF; 40]))).status,
        AckStatus::Refused
    );
    assert_eq!(
        one(&mut s, entry(0, 1, 1, Delta::Full(record(&[])))).status,
        AckStatus::Applied
    );
    assert_eq!(
        one(&mut s, entry(1, 2, 1, Delta::Ops(vec![1, 2, 3]))).status,
        AckStatus::Refused
    );
    // An empty body sits at no particular address: refused, not a failed
    // alignment assertion (found by fuzzing).
    assert_eq!(
        one(&mut s, entry(1, 2, 1, Delta::Ops(Vec::new()))).status,
        AckStatus::Refused
    );
    let other = DeltaEntry {
        sid: [8; 16],
        ..entry(0, 1, 1, Delta::Full(record(&[])))
    };
    assert_eq!(one(&mut s, other).status, AckStatus::Refused);
    assert_eq!(s.len(), 1);
}

#[test]
fn fetch_remove_and_invalidate() {
    let mut s = Store::new(NodeLimits::default(), 1);
    one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
    let r = s.fetch(Fetch {
        request_id: 9,
        sid: SID,
    });
    assert_eq!(r.found.unwrap().version, 3);
    s.invalidate(&Invalidate {
        entries: vec![InvalidateEntry { sid: SID, epoch: 2 }],
    });
    assert_eq!(s.len(), 1, "same epoch is not older");
    s.invalidate(&Invalidate {
        entries: vec![InvalidateEntry { sid: SID, epoch: 3 }],
    });
    assert!(s.is_empty());
    assert_eq!(s.bytes(), 0);
    one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
    assert_eq!(
        one(&mut s, entry(3, 4, 2, Delta::Remove)).status,
        AckStatus::Applied
    );
    assert!(
        s.fetch(Fetch {
            request_id: 1,
            sid: SID
        })
        .found
        .is_none()
    );
    let inv = encode_ops(&[Op::Invalidate]).to_vec();
    one(&mut s, entry(0, 3, 2, Delta::Full(record(&[]))));
    assert_eq!(
        one(&mut s, entry(3, 4, 2, Delta::Ops(inv))).status,
        AckStatus::Applied
    );
    assert!(s.is_empty());
}

#[test]
fn versions_at_the_top_of_the_range_are_refused_not_a_panic() {
    let mut s = Store::new(NodeLimits::default(), 1);
    one(
        &mut s,
        entry(0, u64::MAX, 2, Delta::Full(record(&[("k", b"v")]))),
    );
    let a = one(&mut s, entry(u64::MAX, 0, 2, set("k", b"w")));
    assert_eq!(a.status, AckStatus::NeedFull);
    let a = one(&mut s, entry(u64::MAX, u64::MAX, 2, set("k", b"w")));
    assert_eq!(a.status, AckStatus::NeedFull);
}

/// What the store answers `entries` from host 1 with, as a node serves it.
fn answer(store: &mut Store, entries: Vec<DeltaEntry>) -> Option<Message> {
    let batch = Message::DeltaBatch(DeltaBatch {
        host_id: 1,
        entries,
    });
    store.handle(1, Received::Message(batch))
}

#[test]
fn a_batch_applied_whole_is_answered_short_anything_else_whole() {
    let mut s = Store::new(NodeLimits::default(), 1);
    let at = |n: u8, e: DeltaEntry| DeltaEntry { sid: [n; 16], ..e };
    let full = || Delta::Full(record(&[("k", b"v")]));
    let short = Some(Message::AllApplied(sessio_net::AllApplied { entries: 2 }));
    assert_eq!(
        answer(
            &mut s,
            vec![at(1, entry(0, 3, 1, full())), at(2, entry(0, 5, 1, full()))]
        ),
        short
    );
    assert_eq!(
        answer(
            &mut s,
            vec![
                at(1, entry(3, 4, 1, set("k", b"w"))),
                at(2, entry(5, 6, 1, set("k", b"w")))
            ]
        ),
        short
    );
    // One entry not applied: every entry's answer goes back.
    let Some(Message::Ack(a)) = answer(
        &mut s,
        vec![
            at(1, entry(4, 5, 1, set("k", b"x"))),
            at(2, entry(9, 10, 1, set("k", b"x"))),
        ],
    ) else {
        panic!("a batch not applied whole gets its whole ack")
    };
    let statuses: Vec<_> = a.entries.iter().map(|e| (e.status, e.version)).collect();
    assert_eq!(
        statuses,
        [(AckStatus::Applied, 5), (AckStatus::NeedFull, 6)]
    );
    // Applied, but the node holds another version than the one named (a
    // removal leaves none): the whole ack says which.
    let Some(Message::Ack(a)) = answer(&mut s, vec![at(1, entry(5, 6, 1, Delta::Remove))]) else {
        panic!("a removal's ack names the version left")
    };
    assert_eq!(
        (a.entries[0].status, a.entries[0].version),
        (AckStatus::Applied, 0)
    );
}

#[test]
fn a_removal_overtaken_by_a_write_keeps_the_copy() {
    let mut s = Store::new(NodeLimits::default(), 1);
    one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
    assert_eq!(
        one(&mut s, entry(3, 4, 2, set("k", b"w"))).status,
        AckStatus::Applied
    );
    // A stand-in's drop of version 3, read after the write of 4.
    let a = one(&mut s, entry(3, 3, 2, Delta::Remove));
    assert_eq!((a.status, a.version), (AckStatus::Applied, 4));
    assert_eq!(s.get(&SID).map(Copy::version), Some(4));
    // At the copy's version, or from a newer owner, it goes.
    assert_eq!(one(&mut s, entry(4, 4, 2, Delta::Remove)).version, 0);
    assert!(s.is_empty());
    one(&mut s, entry(0, 9, 2, Delta::Full(record(&[]))));
    one(&mut s, entry(0, 1, 3, Delta::Remove));
    assert!(s.is_empty(), "a newer epoch removes any version");
}

#[test]
fn expiry_drops_expired_and_idle_copies_within_budget() {
    let rec = |updated_ms: u64, expires_at_ms: u64| {
        encode_session(&SessionData {
            updated_ms,
            expires_at_ms,
            ..SessionData::default()
        })
        .to_vec()
    };
    let full = |sid: Sid, record: Vec<u8>| DeltaEntry {
        sid,
        ..entry(0, 1, 1, Delta::Full(record))
    };
    let mut s = Store::new(NodeLimits::default(), 1);
    let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
    let ack = s.apply_batch_at(
        &DeltaBatch {
            host_id: 1,
            entries: vec![
                full(a, rec(500, 1_000)),
                full(b, rec(500, 0)),
                full(c, rec(500, 0)),
            ],
        },
        500,
    );
    assert!(ack.entries.iter().all(|e| e.status == AckStatus::Applied));
    // C is written later, by an op delta kept pending.
    let ack = s.apply_batch_at(
        &DeltaBatch {
            host_id: 1,
            entries: vec![DeltaEntry {
                sid: c,
                ..entry(1, 2, 1, set("k", b"v"))
            }],
        },
        5_000,
    );
    assert_eq!(ack.entries[0].status, AckStatus::Applied);
    assert_eq!(s.get(&c).unwrap().pending_batches(), 1);
    let rule = ExpiryRule {
        grace_ms: 100,
        idle_max_ms: 0,
    };
    assert_eq!(s.expire(1_099, rule, 100), 0, "within the grace");
    assert_eq!(s.expire(1_100, rule, 100), 1);
    assert!(s.get(&a).is_none());
    let idle = ExpiryRule {
        idle_max_ms: 2_000,
        ..rule
    };
    assert_eq!(s.expire(2_499, idle, 100), 0);
    assert_eq!(s.expire(2_500, idle, 100), 1, "B, idle since 500");
    assert!(s.get(&c).is_some(), "C was written at 5000");
    assert_eq!(s.expire(7_000, idle, 100), 1);
    assert!(s.is_empty());
    assert_eq!(s.bytes(), 0);
    assert_eq!(s.counters.expired, 3);

    // A pass looks at `budget` copies; passes go round the whole store.
    let many: Vec<DeltaEntry> = (0..100u8)
        .map(|i| full([i; 16], rec(0, if i % 2 == 0 { 10 } else { 0 })))
        .collect();
    s.apply_batch_at(
        &DeltaBatch {
            host_id: 1,
            entries: many,
        },
        0,
    );
    assert_eq!(s.len(), 100);
    let first = s.expire(1_000, rule, 10);
    assert!(first <= 10, "{first}");
    let mut passes = 1;
    while s.len() > 50 {
        s.expire(1_000, rule, 10);
        passes += 1;
        assert!(
            passes <= 12,
            "{} copies left after {passes} passes",
            s.len()
        );
    }
    assert_eq!(s.len(), 50);
    assert!(s.copies.values().all(|c| c.pending_batches() == 0));
}

/// Sessions with a long absolute lifetime, created and ended over and
/// over (and some sent again after a removal), leave the deadline heap no
/// larger than twice the copies held plus `DEADLINES_SLACK`, and expiry
/// still drops the copies that remain when their time comes.
#[test]
fn deadlines_of_copies_gone_do_not_pile_up() {
    let rec = |expires_at_ms: u64| {
        encode_session(&SessionData {
            expires_at_ms,
            ..SessionData::default()
        })
        .to_vec()
    };
    let sid = |i: u32| {
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&i.to_le_bytes());
        s
    };
    let full = |i: u32, expires: u64| DeltaEntry {
        sid: sid(i),
        ..entry(0, 1, 1, Delta::Full(rec(expires)))
    };
    let remove = |i: u32| DeltaEntry {
        sid: sid(i),
        ..entry(1, 1, 1, Delta::Remove)
    };
    let mut s = Store::new(NodeLimits::default(), 1);
    // 100 copies that stay, due at 5 000.
    for i in 0..100 {
        assert_eq!(one(&mut s, full(i, 5_000)).status, AckStatus::Applied);
    }
    let mut peak = 0;
    for round in 0..20u32 {
        // 1 000 sessions of a day, each ended at once; every other one
        // comes back (a host's resend) and is ended again.
        for k in 0..1_000 {
            let i = 1_000 + round * 1_000 + k;
            for _ in 0..=(k % 2) {
                assert_eq!(one(&mut s, full(i, 86_400_000)).status, AckStatus::Applied);
                assert_eq!(one(&mut s, remove(i)).status, AckStatus::Applied);
            }
            peak = peak.max(s.deadlines.len());
        }
    }
    assert_eq!(s.len(), 100);
    assert!(
        peak <= 2 * (s.len() + 1) + DEADLINES_SLACK,
        "the deadline heap reached {peak} entries for {} copies",
        s.len()
    );
    let rule = ExpiryRule {
        grace_ms: 0,
        idle_max_ms: 0,
    };
    assert_eq!(s.expire(4_999, rule, 10_000), 0);
    assert_eq!(s.expire(5_000, rule, 10_000), 100);
    assert!(s.is_empty());
}

/// The `i`th of a run of `Set`s over five keys; each key's value changes
/// length from one write to the next, so none is written in place.
fn set_n(i: usize, bytes: usize) -> Delta {
    set(&format!("k{}", i % 5), &vec![i as u8; bytes + (i / 5) % 2])
}

/// Full at version 1, then `n` op deltas of one `bytes`-byte `Set`.
fn loaded(n: usize, bytes: usize) -> Store {
    let mut s = Store::new(NodeLimits::default(), 1);
    one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
    for i in 0..n {
        let v = i as u64 + 1;
        let a = one(&mut s, entry(v, v + 1, 1, set_n(i, bytes)));
        assert_eq!((a.status, a.version), (AckStatus::Applied, v + 1));
    }
    s
}

#[test]
fn op_deltas_wait_until_a_fetch_folds_them() {
    let mut s = loaded(5, 100);
    let c = s.get(&SID).unwrap();
    assert_eq!(
        (c.version(), c.base_version(), c.pending_batches()),
        (6, 1, 5)
    );
    assert_eq!(s.counters.folds, 0);
    assert_eq!(
        s.bytes(),
        record(&[("a", b"0")]).len() as u64 + 5 * pending_charge(ops_len(&set_n(0, 100))),
        "each pending batch is charged"
    );
    let r = s.fetch(Fetch {
        request_id: 1,
        sid: SID,
    });
    let found = r.found.unwrap();
    assert_eq!((found.version, found.epoch), (6, 1));
    let d = decode_session(&found.record).unwrap();
    assert_eq!(d.get("a"), Some(&b"0"[..]));
    assert_eq!(d.get("k4"), Some(&[4u8; 100][..]));
    assert_eq!(s.counters.folds, 1);
    let c = s.get(&SID).unwrap();
    assert_eq!((c.pending_batches(), c.base_version()), (0, 6));
    assert_eq!(s.bytes(), found.record.len() as u64, "charged as folded");
    // A second fetch has nothing to fold.
    s.fetch(Fetch {
        request_id: 2,
        sid: SID,
    });
    assert_eq!(s.counters.folds, 1);
}

#[test]
fn idle_copies_fold_and_busy_ones_wait() {
    let at = |s: &mut Store, sid: Sid, base: u64, now_ms: u64, d: Delta| {
        let ack = s.apply_batch_at(
            &DeltaBatch {
                host_id: 1,
                entries: vec![DeltaEntry {
                    sid,
                    ..entry(base, base + 1, 1, d)
                }],
            },
            now_ms,
        );
        assert_eq!(ack.entries[0].status, AckStatus::Applied);
    };
    let (quiet, busy, gone) = ([1; 16], [2; 16], [3; 16]);
    let mut s = Store::new(NodeLimits::default(), 1);
    for sid in [quiet, busy, gone] {
        at(&mut s, sid, 0, 1_000, Delta::Full(record(&[("a", b"0")])));
        at(&mut s, sid, 1, 1_000, set_n(1, 100));
        at(&mut s, sid, 2, 1_100, set_n(2, 100));
    }
    // `busy` is written again later; `gone` is removed.
    at(&mut s, busy, 3, 1_900, set_n(3, 100));
    s.invalidate(&Invalidate {
        entries: vec![InvalidateEntry {
            sid: gone,
            epoch: 2,
        }],
    });
    let unfolded_bytes = s.bytes();
    // Not yet idle: nothing folds.
    assert_eq!(s.fold_idle(1_500, 1_000, 10), 0);
    assert_eq!(s.get(&quiet).unwrap().pending_batches(), 2);
    // `quiet` was last written at 1100: idle at 2100. `busy` at 2900.
    assert_eq!(s.fold_idle(2_100, 1_000, 10), 1);
    let q = s.get(&quiet).unwrap();
    assert_eq!((q.pending_batches(), q.version()), (0, 3));
    assert_eq!(s.get(&busy).unwrap().pending_batches(), 3);
    assert!(
        s.bytes() < unfolded_bytes,
        "a fold gives back the pending charge"
    );
    assert_eq!(s.fold_idle(2_899, 1_000, 10), 0);
    assert_eq!(s.fold_idle(2_900, 1_000, 10), 1);
    assert_eq!(s.counters.idle_folds, 2);
    assert_eq!(s.counters.folds, 2);
    // What was folded is what the host wrote.
    let d = decode_session(
        &s.fetch(Fetch {
            request_id: 1,
            sid: busy,
        })
        .found
        .unwrap()
        .record,
    )
    .unwrap();
    assert_eq!(d.get("k3"), Some(&[3u8; 100][..]));
    assert_eq!(d.updated_ms, 1_900, "a fold keeps the last write's time");
    // Nothing is left to look at.
    assert!(s.unfolded.is_empty());
    assert_eq!(s.fold_idle(u64::MAX, 1_000, 10), 0);
}

#[test]
fn the_idle_queue_stays_bounded_by_the_copies() {
    // One copy, folded by a fetch after each write: every write queues it
    // anew; the queue is compacted before it holds more than twice the
    // copies plus the slack.
    let mut s = loaded(0, 0);
    for v in 1..(3 * DEADLINES_SLACK as u64) {
        let a = one(&mut s, entry(v, v + 1, 1, set_n(v as usize, 10)));
        assert_eq!(a.status, AckStatus::Applied);
        s.fetch(Fetch {
            request_id: v,
            sid: SID,
        });
        assert!(s.unfolded.len() <= 2 * s.len() + DEADLINES_SLACK + 1);
    }
}

#[test]
fn pending_batches_are_bounded_by_count_and_bytes() {
    let n = (PENDING_BATCHES_MAX + 1) * 3 + 5;
    let s = loaded(n, 10);
    let c = s.get(&SID).unwrap();
    assert_eq!(c.version(), n as u64 + 1);
    assert_eq!(c.pending_batches(), 5);
    assert_eq!(s.counters.folds, 3, "a batch past the bound folds");

    let big = 3000;
    let s = loaded(20, big);
    let c = s.get(&SID).unwrap();
    let per = pending_charge(ops_len(&set_n(0, big)));
    assert!(c.pending_batches() as u64 * per <= PENDING_BYTES_MAX);
    assert!(c.bytes() - c.record().len() as u64 <= PENDING_BYTES_MAX);
    // Each run: as many batches as the byte bound holds, then a fold.
    let run = PENDING_BYTES_MAX / per + 1;
    assert!(run < PENDING_BATCHES_MAX as u64);
    assert_eq!(s.counters.folds, 20 / run);
}

#[test]
fn batches_that_could_fail_apply_at_once() {
    // A counter, an append list, a bad key, an invalidation that fails:
    // each folds what is pending and gets the eager answer.
    let mut s = loaded(3, 10);
    let incr = |by| {
        Delta::Ops(
            encode_ops(&[Op::Incr {
                key: "n".into(),
                by,
            }])
            .to_vec(),
        )
    };
    assert_eq!(
        one(&mut s, entry(4, 5, 1, incr(2))).status,
        AckStatus::Applied
    );
    assert_eq!(s.get(&SID).unwrap().pending_batches(), 0);
    assert_eq!(s.counters.folds, 1);
    // Overflows: the host could not have applied this; resync.
    let a = one(&mut s, entry(5, 6, 1, incr(i64::MAX)));
    assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
    let a = one(&mut s, entry(5, 6, 1, set("", b"x")));
    assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
    let bad_then_invalidate = Delta::Ops(
        encode_ops(&[
            Op::Invalidate,
            Op::Set {
                key: "x".repeat(KEY_BYTES_MAX + 1),
                value: vec![],
            },
        ])
        .to_vec(),
    );
    let a = one(&mut s, entry(5, 6, 1, bad_then_invalidate));
    assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
    let append = Delta::Ops(
        encode_ops(&[Op::Append {
            key: "h".into(),
            item: b"e1".to_vec(),
            max_items: 4,
        }])
        .to_vec(),
    );
    assert_eq!(
        one(&mut s, entry(5, 6, 1, append)).status,
        AckStatus::Applied
    );
    let d = decode_session(s.folded(&SID).unwrap().record()).unwrap();
    assert_eq!(d.get("n"), Some(&2i64.to_le_bytes()[..]));
    assert_eq!(d.get("h"), Some(&[2, 0, 0, 0, b'e', b'1'][..]));
    // A safe invalidation with batches pending drops the copy at once.
    one(&mut s, entry(6, 7, 1, set("a", b"1")));
    let inv = Delta::Ops(encode_ops(&[Op::Touch, Op::Invalidate]).to_vec());
    let a = one(&mut s, entry(7, 8, 1, inv));
    assert_eq!((a.status, a.version), (AckStatus::Applied, 0));
    assert!(s.is_empty());
    assert_eq!(s.bytes(), 0);
}

#[test]
fn bytes_max_counts_pending_batches() {
    let base = record(&[("a", b"0")]).len() as u64;
    let per = pending_charge(ops_len(&set_n(0, 100)));
    let mut s = Store::new(
        NodeLimits {
            sessions_max: 10,
            bytes_max: base + 2 * per,
        },
        1,
    );
    one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
    for v in 1..=2 {
        assert_eq!(
            one(&mut s, entry(v, v + 1, 1, set_n(0, 100))).status,
            AckStatus::Applied
        );
    }
    assert_eq!(s.bytes(), base + 2 * per);
    assert_eq!(s.get(&SID).unwrap().pending_batches(), 2);
    // No room to charge a third: it is applied at once, and the folded
    // record (the same key set again) fits.
    let a = one(&mut s, entry(3, 4, 1, set_n(0, 100)));
    assert_eq!((a.status, a.version), (AckStatus::Applied, 4));
    let c = s.get(&SID).unwrap();
    assert_eq!(c.pending_batches(), 0);
    assert!(s.bytes() <= base + 2 * per);
    assert_eq!(s.bytes(), c.record().len() as u64);
    // A value the folded record has no room for is refused; the copy
    // stays as it was.
    let a = one(&mut s, entry(4, 5, 1, set_n(1, 2 * per as usize)));
    assert_eq!((a.status, a.version), (AckStatus::Refused, 4));
    assert_eq!(s.get(&SID).unwrap().version(), 4);
}

fn ops_len(d: &Delta) -> usize {
    match d {
        Delta::Ops(b) => b.len(),
        _ => panic!("not ops"),
    }
}

mod eager;
