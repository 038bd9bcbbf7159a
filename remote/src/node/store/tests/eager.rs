//! The store against an eager model: the node as it was before op deltas
//! were deferred, by example and by proptest.

use super::*;

/// The node before op deltas were deferred: every delta decoded,
/// applied to the decoded record and re-encoded at once. The reference
/// the store must agree with (acks and fetched records), except where
/// `bytes_max` comes into it.
#[derive(Default)]
struct Eager {
    copies: std::collections::HashMap<Sid, (u64, u64, Vec<u8>)>,
    sessions_max: u64,
}

impl Eager {
    fn apply(&mut self, e: &DeltaEntry, now_ms: u64) -> AckEntry {
        let status = self.status(e, now_ms);
        AckEntry {
            sid: e.sid,
            version: self.copies.get(&e.sid).map_or(0, |c| c.0),
            status,
        }
    }

    fn status(&mut self, e: &DeltaEntry, now_ms: u64) -> AckStatus {
        let held = self.copies.get(&e.sid).map(|c| (c.0, c.1));
        if held.is_some_and(|(_, ep)| e.epoch < ep) {
            return AckStatus::Fenced;
        }
        match &e.body {
            Delta::Remove => {
                if !held
                    .is_some_and(|(v, ep)| ep == e.epoch && e.new_version != 0 && v > e.new_version)
                {
                    self.copies.remove(&e.sid);
                }
                AckStatus::Applied
            }
            Delta::Full(record) => {
                if held.is_some_and(|(v, ep)| e.epoch == ep && e.new_version <= v) {
                    return AckStatus::Applied;
                }
                if decode_session(record).is_err() {
                    return AckStatus::Refused;
                }
                self.put(e, record.clone())
            }
            Delta::Ops(ops) => {
                let Some((v, _)) = held else {
                    return AckStatus::NeedFull;
                };
                if e.base_version != v || e.new_version != v + 1 {
                    return AckStatus::NeedFull;
                }
                let Ok(decoded) = decode_ops(ops) else {
                    return AckStatus::Refused;
                };
                let mut data = decode_session(&self.copies[&e.sid].2).unwrap();
                match data.apply(&decoded, now_ms, APPLY_QUOTA_BYTES) {
                    Ok(Applied::Changed) => {}
                    Ok(Applied::Invalidated) => {
                        self.copies.remove(&e.sid);
                        return AckStatus::Applied;
                    }
                    Err(_) => return AckStatus::NeedFull,
                }
                self.put(e, encode_session(&data).to_vec())
            }
        }
    }

    fn put(&mut self, e: &DeltaEntry, record: Vec<u8>) -> AckStatus {
        let count = self.copies.len() as u64 + u64::from(!self.copies.contains_key(&e.sid));
        if count > self.sessions_max {
            return AckStatus::Refused;
        }
        self.copies.insert(e.sid, (e.new_version, e.epoch, record));
        AckStatus::Applied
    }
}

#[test]
fn fold_gives_the_record_eager_applies_give() {
    let touch = || vec![Op::Touch];
    let setb = |n: usize| {
        vec![Op::Set {
            key: "a".into(),
            value: vec![1; n],
        }]
    };
    let runs: Vec<Vec<Vec<Op>>> = vec![
        // Many batches that change nothing but the time.
        (0..40).map(|_| touch()).collect(),
        // Many that rewrite one value.
        (0..10).map(|_| setb(300)).collect(),
        // Values that grow and shrink.
        vec![setb(10), setb(10), setb(1100), setb(10), setb(20)],
        vec![setb(10), setb(1100)],
    ];
    let (mut patched, mut pending) = (0, 0);
    for run in runs {
        let mut s = Store::new(NodeLimits::default(), 1);
        let mut eager = Eager {
            sessions_max: 1,
            ..Eager::default()
        };
        let full = entry(0, 1, 1, Delta::Full(record(&[("a", b"0")])));
        eager.apply(&full, 0);
        one(&mut s, full);
        // Half the run folded along the way, then the rest pending, so
        // both a folded record and pending batches count.
        for (i, ops) in run.iter().enumerate() {
            let v = i as u64 + 1;
            let e = entry(v, v + 1, 1, Delta::Ops(encode_ops(ops).to_vec()));
            eager.apply(&e, v);
            s.apply_batch_at(
                &DeltaBatch {
                    host_id: 1,
                    entries: vec![e],
                },
                v,
            );
            if i + 1 == run.len() / 2 {
                s.fold(&SID);
            }
        }
        let want = &eager.copies[&SID].2;
        patched += s.counters.patched;
        pending += s.get(&SID).unwrap().pending_batches();
        assert_eq!(s.folded(&SID).unwrap().record(), &want[..]);
    }
    // Both ways were taken: batches written in place, batches folded.
    assert!(patched > 0 && pending > 0, "{patched} {pending}");
}

#[derive(Debug, Clone)]
enum Step {
    Full {
        sid: u8,
        ahead: u8,
        epoch: u8,
        value: u8,
    },
    Ops {
        sid: u8,
        base_off: i8,
        epoch: u8,
        ops: Vec<Op>,
    },
    Remove {
        sid: u8,
        epoch: u8,
    },
    Fetch {
        sid: u8,
    },
    Invalidate {
        sid: u8,
        epoch: u8,
    },
}

fn any_op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "n"]).prop_map(String::from),
        1 => Just(String::new()),
        1 => Just("k".repeat(KEY_BYTES_MAX + 1)),
    ];
    prop_oneof![
        8 => (key.clone(), prop_oneof![
                8 => prop::collection::vec(any::<u8>(), 0..120),
                // One length, so a value is often rewritten where it lies.
                4 => prop::collection::vec(any::<u8>(), 16..17),
                // Large values.
                1 => prop::collection::vec(any::<u8>(), 900..1100),
            ])
            .prop_map(|(key, value)| Op::Set { key, value }),
        2 => key.clone().prop_map(|key| Op::Remove { key }),
        2 => (key.clone(), prop::collection::vec(any::<u8>(), 0..8), 0u32..4)
            .prop_map(|(key, item, max_items)| Op::Append { key, item, max_items }),
        2 => (key, prop_oneof![Just(i64::MAX), -5i64..5])
            .prop_map(|(key, by)| Op::Incr { key, by }),
        1 => Just(Op::Touch),
        1 => Just(Op::Invalidate),
    ]
}

fn any_step() -> impl Strategy<Value = Step> {
    let epoch = prop_oneof![6 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8)];
    prop_oneof![
        2 => (0u8..3, 0u8..3, epoch.clone(), any::<u8>())
            .prop_map(|(sid, ahead, epoch, value)| Step::Full { sid, ahead, epoch, value }),
        16 => (0u8..3, prop_oneof![10 => Just(0i8), 1 => -1i8..2], epoch.clone(),
               prop::collection::vec(any_op(), 0..3))
            .prop_map(|(sid, base_off, epoch, ops)| Step::Ops { sid, base_off, epoch, ops }),
        1 => (0u8..3, epoch.clone()).prop_map(|(sid, epoch)| Step::Remove { sid, epoch }),
        2 => (0u8..3).prop_map(|sid| Step::Fetch { sid }),
        1 => (0u8..3, epoch).prop_map(|(sid, epoch)| Step::Invalidate { sid, epoch }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Deferring op deltas and folding them (on fetch, at the bounds,
    /// before a batch that could fail) gives the same acks and the same
    /// fetched records, byte for byte, as applying each delta at once.
    #[test]
    fn folding_matches_applying_each_delta_at_once(
        steps in prop::collection::vec(any_step(), 1..200),
        batch_len in 1usize..6,
    ) {
        let mut store = Store::new(NodeLimits { sessions_max: 2, bytes_max: u64::MAX }, 1);
        let mut eager = Eager { sessions_max: 2, ..Eager::default() };
        let sid = |n: u8| [n; 16];
        let mut batch: Vec<DeltaEntry> = Vec::new();
        let mut now_ms = 1_000;
        let flush = |store: &mut Store, eager: &mut Eager, batch: &mut Vec<DeltaEntry>, now_ms: u64|
            -> Result<(), TestCaseError> {
            let want: Vec<AckEntry> = batch.iter().map(|e| eager.apply(e, now_ms)).collect();
            let got = store.apply_batch_at(&DeltaBatch { host_id: 1, entries: std::mem::take(batch) }, now_ms);
            prop_assert_eq!(got.entries, want);
            Ok(())
        };
        for step in steps {
            // Versions as the eager node holds them when the batch is
            // built, as a host would see them.
            let held = |eager: &Eager, n: u8| eager.copies.get(&sid(n)).map_or(0, |c| c.0)
                + batch.iter().filter(|e| e.sid == sid(n)).count() as u64;
            match step {
                Step::Full { sid: n, ahead, epoch, value } => {
                    let v = held(&eager, n) + u64::from(ahead);
                    batch.push(DeltaEntry {
                        sid: sid(n), base_version: 0, new_version: v, epoch: u64::from(epoch),
                        body: Delta::Full(record(&[("a", &[value; 30]), ("n", &[0; 8])])),
                    });
                }
                Step::Ops { sid: n, base_off, epoch, ops } => {
                    let base = held(&eager, n).saturating_add_signed(i64::from(base_off));
                    batch.push(DeltaEntry {
                        sid: sid(n), base_version: base, new_version: base + 1,
                        epoch: u64::from(epoch), body: Delta::Ops(encode_ops(&ops).to_vec()),
                    });
                }
                Step::Remove { sid: n, epoch } => batch.push(DeltaEntry {
                    sid: sid(n), base_version: 0, new_version: 0, epoch: u64::from(epoch),
                    body: Delta::Remove,
                }),
                Step::Fetch { sid: n } => {
                    flush(&mut store, &mut eager, &mut batch, now_ms)?;
                    let got = store.fetch(Fetch { request_id: 1, sid: sid(n) }).found;
                    let want = eager.copies.get(&sid(n)).map(|c| FoundRecord {
                        version: c.0, epoch: c.1, record: c.2.clone(),
                    });
                    prop_assert_eq!(got, want);
                }
                Step::Invalidate { sid: n, epoch } => {
                    flush(&mut store, &mut eager, &mut batch, now_ms)?;
                    let entry = InvalidateEntry { sid: sid(n), epoch: u64::from(epoch) };
                    store.invalidate(&Invalidate { entries: vec![entry] });
                    if eager.copies.get(&sid(n)).is_some_and(|c| c.1 < entry.epoch) {
                        eager.copies.remove(&sid(n));
                    }
                }
            }
            if batch.len() >= batch_len {
                flush(&mut store, &mut eager, &mut batch, now_ms)?;
            }
            now_ms += 3;
        }
        flush(&mut store, &mut eager, &mut batch, now_ms)?;
        // Each copy's charge covered what folding it added.
        let charged = store.bytes();
        let mut folded = 0;
        for n in 0..3 {
            let want = eager.copies.get(&sid(n)).map(|c| (c.0, c.1, c.2.clone()));
            let got = store.folded(&sid(n)).map(|c| (c.version(), c.epoch(), c.record().to_vec()));
            prop_assert_eq!(&got, &want);
            folded += got.map_or(0, |c| c.2.len() as u64);
        }
        prop_assert_eq!(store.bytes(), folded);
        prop_assert!(folded <= charged, "folded {} over the charge {}", folded, charged);
    }
}
