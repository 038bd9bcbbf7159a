//! The arena's API, one process.

mod common;

use common::{TempArena, small_config};
use sessio_engine::session::{append_items, decode_ops};
use sessio_engine::{
    Arena, ArenaConfig, Delta, Dirty, Location, NewSession, Op, OpError, OpenError, SessionError,
    Sid,
};

fn set(key: &str, value: &[u8]) -> Op {
    Op::Set {
        key: key.into(),
        value: value.to_vec(),
    }
}

#[test]
fn create_read_update_invalidate() {
    let t = TempArena::new("crud");
    let a = t.open(&small_config());
    let sid = a
        .create(NewSession::default(), &[("user", b"ada")])
        .unwrap();
    {
        let g = a.read(sid).unwrap();
        assert_eq!(g.get("user"), Some(&b"ada"[..]));
        assert_eq!(g.version(), 1);
        assert!(g.verify());
    }
    assert_eq!(a.update(sid, &[set("cart", b"apples")]).unwrap(), 2);
    assert_eq!(
        a.update(
            sid,
            &[Op::Incr {
                key: "n".into(),
                by: 5
            }]
        )
        .unwrap(),
        3
    );
    assert_eq!(
        a.update(
            sid,
            &[Op::Incr {
                key: "n".into(),
                by: -2
            }]
        )
        .unwrap(),
        4
    );
    for i in 0..5u8 {
        a.update(
            sid,
            &[Op::Append {
                key: "h".into(),
                item: vec![i],
                max_items: 3,
            }],
        )
        .unwrap();
    }
    a.update(sid, &[Op::Remove { key: "user".into() }, Op::Touch])
        .unwrap();
    {
        let g = a.read(sid).unwrap();
        assert_eq!(g.get("cart"), Some(&b"apples"[..]));
        assert_eq!(g.get("n"), Some(&3i64.to_le_bytes()[..]));
        assert_eq!(
            append_items(g.get("h").unwrap()).unwrap(),
            vec![&[2u8][..], &[3], &[4]]
        );
        assert_eq!(g.get("user"), None);
        assert!(g.verify());
        let owned = g.to_owned();
        assert_eq!(owned.get("cart"), Some(&b"apples"[..]));
    }
    a.invalidate(sid).unwrap();
    assert_eq!(a.read(sid).err(), Some(SessionError::NotFound));
    assert_eq!(
        a.update(sid, &[set("x", b"y")]).err(),
        Some(SessionError::NotFound)
    );
    assert_eq!(a.invalidate(sid).err(), Some(SessionError::NotFound));
    assert_eq!(a.stats().live, 0);
}

#[test]
fn unknown_sids_are_never_created() {
    let t = TempArena::new("fixation");
    let a = t.open(&small_config());
    let sid = Sid::random();
    assert_eq!(a.read(sid).err(), Some(SessionError::NotFound));
    assert_eq!(
        a.update(sid, &[set("a", b"b")]).err(),
        Some(SessionError::NotFound)
    );
    assert_eq!(a.stats().live, 0);
}

#[test]
fn refused_batches_change_nothing() {
    let t = TempArena::new("refused");
    let a = t.open(&small_config());
    let sid = a
        .create(NewSession::default(), &[("c", b"not eight")])
        .unwrap();
    let err = a
        .update(
            sid,
            &[
                set("a", b"1"),
                Op::Incr {
                    key: "c".into(),
                    by: 1,
                },
            ],
        )
        .unwrap_err();
    assert_eq!(err, SessionError::Op(OpError::NotACounter));
    assert_eq!(
        a.update(sid, &[set("", b"1")]).unwrap_err(),
        SessionError::Op(OpError::BadKey)
    );
    let g = a.read(sid).unwrap();
    assert_eq!(g.get("a"), None, "a refused batch is all-or-nothing");
    assert_eq!(g.version(), 1);
}

#[test]
fn quota_is_enforced() {
    let t = TempArena::new("quota");
    let mut cfg = small_config();
    cfg.quota_bytes = 4096;
    let a = t.open(&cfg);
    let sid = a.create(NewSession::default(), &[]).unwrap();
    a.update(sid, &[set("a", &[1; 3000])]).unwrap();
    let err = a.update(sid, &[set("b", &[2; 3000])]).unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::Op(OpError::OverQuota { quota: 4096, .. })
        ),
        "{err:?}"
    );
    // Far over quota is refused before it is even queued.
    assert!(matches!(
        a.update(sid, &[set("c", &vec![3; 100_000])]),
        Err(SessionError::Op(OpError::OverQuota { .. }))
    ));
    assert!(
        a.create(NewSession::default(), &[("big", &[0; 5000])])
            .is_err()
    );
    let g = a.read(sid).unwrap();
    assert_eq!(g.get("a").map(<[u8]>::len), Some(3000));
    assert_eq!(g.get("b"), None);
}

#[test]
fn capacity_full_and_heap_full_are_clear_errors() {
    let t = TempArena::new("full");
    let cfg = ArenaConfig {
        capacity: 50,
        heap_bytes: 1 << 20,
        quota_bytes: 32 * 1024,
        huge_pages: sessio_engine::HugePages::Off,
    };
    let a = t.open(&cfg);
    let mut sids = Vec::new();
    for _ in 0..50 {
        sids.push(a.create(NewSession::default(), &[("k", b"v")]).unwrap());
    }
    assert!(matches!(
        a.create(NewSession::default(), &[]),
        Err(SessionError::Full(50))
    ));
    // Fill the heap with big values until it refuses.
    let mut refused = None;
    'fill: for round in 0..100 {
        for s in &sids {
            if let Err(e) = a.update(*s, &[set(&format!("v{round}"), &[7; 8000])]) {
                refused = Some(e);
                break 'fill;
            }
        }
    }
    let e = refused.expect("a 1 MiB heap must fill up");
    assert!(
        matches!(
            e,
            SessionError::HeapFull(_) | SessionError::Op(OpError::OverQuota { .. })
        ),
        "{e:?}"
    );
    // Everything still reads and verifies.
    for s in &sids {
        assert!(a.read(*s).unwrap().verify());
    }
    // Freeing sessions gives capacity back.
    for s in &sids[..25] {
        a.invalidate(*s).unwrap();
    }
    a.create(NewSession::default(), &[]).unwrap();
    a.update(sids[30], &[set("after", b"ok")]).unwrap();
}

#[test]
fn churn_keeps_full_capacity() {
    let t = TempArena::new("churn");
    let cfg = ArenaConfig::for_sessions(500, 512);
    let a = t.open(&cfg);
    let value = [9u8; 300];
    for _round in 0..10 {
        let mut sids = Vec::new();
        for _ in 0..500 {
            sids.push(
                a.create(
                    NewSession {
                        idle_ttl_ms: 0,
                        lifetime_ms: 1,
                    },
                    &[("v", &value)],
                )
                .unwrap(),
            );
        }
        for s in &sids[..100] {
            a.update(*s, &[set("w", &value)]).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(15));
        let swept = a.sweep(sessio_engine::clock::now_ms(), u64::MAX);
        assert_eq!(swept.expired, 500);
        assert_eq!(a.stats().live, 0);
    }
    // After 10x the capacity has come and gone, all of it is there again.
    let mut sids = Vec::new();
    for _ in 0..500 {
        sids.push(a.create(NewSession::default(), &[("v", &value)]).unwrap());
    }
    assert_eq!(a.stats().live, 500);
    assert!(a.stats().chunks_touched <= a.stats().chunks);
}

#[test]
fn idle_expiry_honours_reads() {
    let t = TempArena::new("idle");
    let a = t.open(&small_config());
    let sid = a
        .create(
            NewSession {
                idle_ttl_ms: 60_000,
                lifetime_ms: 0,
            },
            &[],
        )
        .unwrap();
    let now = sessio_engine::clock::now_ms();
    assert_eq!(a.sweep(now, u64::MAX).expired, 0);
    assert!(a.read(sid).is_ok());
    assert_eq!(a.sweep(now + 120_000, u64::MAX).expired, 1);
    assert_eq!(a.read(sid).err(), Some(SessionError::NotFound));
}

#[test]
fn replication_view_dirty_delta_acks() {
    let t = TempArena::new("repl");
    let a = t.open(&small_config());
    let sid = a.create(NewSession::default(), &[("a", b"1")]).unwrap();
    let mut out = Vec::new();
    a.take_dirty(100, &mut out);
    assert!(matches!(out.as_slice(), [Dirty::Changed { sid: s, version: 1, .. }] if *s == sid));
    a.take_dirty(100, &mut out);
    assert!(out.is_empty(), "taking clears the mark");
    a.update(sid, &[set("b", b"2")]).unwrap();
    a.update(sid, &[set("c", b"3")]).unwrap();
    a.take_dirty(100, &mut out);
    assert!(matches!(
        out.as_slice(),
        [Dirty::Changed { version: 3, .. }]
    ));
    match a.delta_since(sid, 1).unwrap() {
        Delta::Ops {
            version: 3,
            batches,
            ..
        } => {
            assert_eq!(batches.len(), 2);
            assert_eq!(decode_ops(&batches[0]).unwrap(), vec![set("b", b"2")]);
        }
        d => panic!("{d:?}"),
    }
    assert_eq!(a.delta_since(sid, 3).unwrap(), Delta::UpToDate);
    assert!(matches!(
        a.delta_since(sid, 0).unwrap(),
        Delta::Full { version: 3, .. }
    ));
    a.mark_acked(sid, 7, 3).unwrap();
    a.mark_acked(sid, 9, 2).unwrap();
    a.mark_acked(sid, 9, 1).unwrap();
    assert_eq!(a.acked(sid).unwrap(), [(7, 3), (9, 2)]);
    a.mark_acked(sid, 11, 3).unwrap();
    assert_eq!(
        a.acked(sid).unwrap(),
        [(7, 3), (11, 3)],
        "a third node replaces the oldest ack"
    );
    a.forget_ack(sid, 7).unwrap();
    assert_eq!(a.acked(sid).unwrap(), [(0, 0), (11, 3)]);
    a.invalidate(sid).unwrap();
    a.take_dirty(100, &mut out);
    assert_eq!(out, vec![Dirty::Removed { sid }]);
}

#[test]
fn replica_incarnations_survive_reopen_and_gate_acks() {
    let dir = std::env::temp_dir().join(format!("sessio-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let loc = Location::File(dir.join("arena"));
    let (s1, s2) = {
        let a = Arena::open(&loc, &small_config()).unwrap();
        assert_eq!(a.replica_incarnation(3), None);
        assert!(a.set_replica_incarnation(3, 0xabc));
        assert!(a.set_replica_incarnation(0, 0xdef));
        assert!(a.set_replica_incarnation(3, 0x123), "same node: updated");
        let s1 = a.create(NewSession::default(), &[("a", b"1")]).unwrap();
        let s2 = a.create(NewSession::default(), &[("a", b"1")]).unwrap();
        a.mark_acked(s1, 3, 1).unwrap();
        a.mark_acked(s1, 0, 1).unwrap();
        a.mark_acked(s2, 3, 1).unwrap();
        (s1, s2)
    };
    let a = Arena::open_existing(&loc).unwrap();
    assert_eq!(a.replica_incarnation(3), Some(0x123));
    assert_eq!(a.replica_incarnation(0), Some(0xdef));
    assert_eq!(a.replica_incarnation(4), None);
    assert_eq!(a.forget_acks(3), 2);
    assert_eq!(a.acked(s1).unwrap(), [(0, 0), (0, 1)]);
    assert_eq!(a.acked(s2).unwrap(), [(0, 0), (0, 0)]);
    // The table is bounded: every further node is refused, none is lost.
    let fits = (10..200u16)
        .take_while(|&n| a.set_replica_incarnation(n, u64::from(n)))
        .count();
    assert_eq!(fits, Arena::REPLICAS_MAX - 2);
    assert!(!a.set_replica_incarnation(500, 1));
    assert_eq!(a.replica_incarnation(10), Some(10));
    assert_eq!(a.replica_incarnation(3), Some(0x123));
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn install_moves_ownership() {
    let t = TempArena::new("install");
    let a = t.open(&small_config());
    let src = a
        .create(NewSession::default(), &[("cart", b"pears")])
        .unwrap();
    let Delta::Full { bytes, version, .. } = a.delta_since(src, 0).unwrap() else {
        panic!()
    };
    let sid = Sid::random();
    assert_eq!(a.install(sid, &bytes, version, 2).unwrap(), version);
    assert_eq!(a.read(sid).unwrap().get("cart"), Some(&b"pears"[..]));
    assert_eq!(a.read(sid).unwrap().epoch(), 2);
    // An older epoch is fenced; a newer one replaces.
    assert!(matches!(
        a.install(sid, &bytes, version + 5, 1),
        Err(SessionError::StaleEpoch {
            offered: 1,
            held: 2
        })
    ));
    a.install(sid, &bytes, version + 1, 3).unwrap();
    assert_eq!(a.read(sid).unwrap().epoch(), 3);
    // Garbage snapshots are refused.
    assert!(matches!(
        a.install(Sid::random(), b"garbage!", 1, 1),
        Err(SessionError::BadSnapshot(_))
    ));
    a.update(sid, &[set("more", b"x")]).unwrap();
    assert_eq!(a.read(sid).unwrap().version(), version + 2);
}

#[test]
fn reopen_finds_sessions_and_rejects_bad_files() {
    let dir = std::env::temp_dir().join(format!("sessio-reopen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("arena");
    let loc = Location::File(path.clone());
    let sid = {
        let a = Arena::open(&loc, &small_config()).unwrap();
        let sid = a.create(NewSession::default(), &[("k", b"v")]).unwrap();
        a.update(sid, &[set("k2", b"v2")]).unwrap();
        sid
    };
    {
        let a = Arena::open_existing(&loc).unwrap();
        assert!(a.recovery_report().is_some());
        assert_eq!(a.read(sid).unwrap().get("k2"), Some(&b"v2"[..]));
    }
    // Garbage, truncation and another layout are clear errors. (Written
    // mode 0600: a file others may read is refused before it is read.)
    let write = |p: &std::path::Path, bytes: &[u8]| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .and_then(|mut f| f.write_all(bytes))
            .unwrap();
    };
    let garbage = dir.join("garbage");
    write(&garbage, &[0xab; 10_000]);
    assert!(matches!(
        Arena::open_existing(&Location::File(garbage)),
        Err(OpenError::NotAnArena { .. })
    ));
    let short = dir.join("short");
    write(&short, b"SESS");
    assert!(matches!(
        Arena::open_existing(&Location::File(short)),
        Err(OpenError::NotAnArena { .. })
    ));
    let bytes = std::fs::read(&path).unwrap();
    let trunc = dir.join("trunc");
    write(&trunc, &bytes[..bytes.len() / 2]);
    assert!(matches!(
        Arena::open_existing(&Location::File(trunc)),
        Err(OpenError::Truncated { .. })
    ));
    let mut other = bytes.clone();
    other[12] ^= 0xff; // participants count: a different layout
    let other_path = dir.join("other");
    write(&other_path, &other);
    assert!(matches!(
        Arena::open_existing(&Location::File(other_path)),
        Err(OpenError::Layout { .. })
    ));
    let mut fmt = bytes;
    fmt[8] = 99;
    let fmt_path = dir.join("fmt");
    write(&fmt_path, &fmt);
    assert!(matches!(
        Arena::open_existing(&Location::File(fmt_path)),
        Err(OpenError::Format { found: 99, .. })
    ));
    assert!(matches!(
        Arena::open_existing(&Location::Shm("bad/name".into())),
        Err(OpenError::BadName(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_record_is_dropped_at_recovery() {
    let dir = std::env::temp_dir().join(format!("sessio-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("arena");
    let loc = Location::File(path.clone());
    let (good, bad) = {
        let a = Arena::open(&loc, &small_config()).unwrap();
        let good = a
            .create(NewSession::default(), &[("k", b"good-value")])
            .unwrap();
        let bad = a
            .create(NewSession::default(), &[("k", b"damaged-value")])
            .unwrap();
        (good, bad)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"damaged-value")
        .unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let a = Arena::open_existing(&loc).unwrap();
    let r = a.recovery_report().unwrap();
    assert_eq!((r.sessions, r.corrupt_records), (1, 1));
    assert!(a.read(good).unwrap().verify());
    assert_eq!(a.read(bad).err(), Some(SessionError::NotFound));
    drop(a);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn handles_on_threads_share_sessions() {
    let t = TempArena::new("threads");
    let a = t.open(&small_config());
    let sid = a.create(NewSession::default(), &[]).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|w| {
            let h = a.try_clone().unwrap();
            std::thread::spawn(move || {
                for i in 0..2000u32 {
                    h.update(
                        sid,
                        &[
                            Op::Incr {
                                key: "n".into(),
                                by: 1,
                            },
                            Op::Append {
                                key: format!("w{w}"),
                                item: i.to_le_bytes().to_vec(),
                                max_items: 4096,
                            },
                        ],
                    )
                    .unwrap();
                    assert!(h.read(sid).unwrap().verify());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let g = a.read(sid).unwrap();
    assert_eq!(g.get("n"), Some(&4000i64.to_le_bytes()[..]));
    for w in 0..2 {
        let items = append_items(g.get(&format!("w{w}")).unwrap()).unwrap();
        let seqs: Vec<u32> = items
            .iter()
            .map(|b| u32::from_le_bytes((*b).try_into().unwrap()))
            .collect();
        assert_eq!(
            seqs,
            (0..2000).collect::<Vec<_>>(),
            "each writer's events exactly once, in order"
        );
    }
}

/// An arena that exists with another configuration is not silently used
/// for the one asked for; adopting it is a choice the caller makes.
#[test]
fn an_existing_arena_of_another_configuration_is_refused_unless_adopted() {
    let t = TempArena::new("mismatch");
    let made = ArenaConfig::for_sessions(1000, 1024);
    let sid = t
        .open(&made)
        .create(NewSession::default(), &[("k", b"v")])
        .unwrap();
    let bigger = ArenaConfig::for_sessions(2000, 1024);
    match Arena::open(&t.loc, &bigger) {
        Err(OpenError::ConfigMismatch { found, asked, .. }) => {
            assert!(found.contains("capacity 1000 sessions"), "{found}");
            assert!(asked.contains("capacity 2000 sessions"), "{asked}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("opened an arena made for 1000 sessions as one for 2000"),
    }
    // Its own configuration opens it; adopting takes it as it is.
    assert!(Arena::open(&t.loc, &made).unwrap().read(sid).is_ok());
    let adopted = Arena::open_adopting(&t.loc, &bigger).unwrap();
    assert_eq!(adopted.stats().capacity, 1000);
    assert!(adopted.read(sid).is_ok());
}

/// In an arena a replicator serves, a removed session's index slot keeps
/// its SID until the replicator has taken the removal: churn does not
/// overwrite it. Only when every free slot waits (a stalled replicator)
/// is one reused, counted, and creates still succeed.
#[test]
fn a_removal_waits_for_the_replicator_before_its_slot_is_reused() {
    let t = TempArena::new("removal-kept");
    let a = t.open(&ArenaConfig {
        capacity: 16,
        ..small_config()
    });
    assert!(a.set_replica_incarnation(1, 7), "a replicator served it");
    let mut out = Vec::new();
    let gone = a.create(NewSession::default(), &[]).unwrap();
    a.take_dirty(usize::MAX, &mut out);
    a.invalidate(gone).unwrap();
    let slots = a.stats().index_slots;
    let mut removed = vec![gone];
    for _ in 0..slots / 2 {
        let s = a.create(NewSession::default(), &[]).unwrap();
        a.invalidate(s).unwrap();
        removed.push(s);
    }
    assert_eq!(a.stats().removals_dropped, 0);
    a.take_dirty(usize::MAX, &mut out);
    for sid in &removed {
        assert!(
            out.contains(&Dirty::Removed { sid: *sid }),
            "the removal of {sid} was lost"
        );
    }
    // A stalled replicator: churn past every free slot. Creates go on.
    for _ in 0..slots * 2 {
        let s = a.create(NewSession::default(), &[]).unwrap();
        a.invalidate(s).unwrap();
    }
    assert!(a.stats().removals_dropped > 0);
}

/// A copy another host took over goes only if it is held under an older
/// epoch, and its removal is counted as an eviction, not an expiry.
#[test]
fn evict_older_removes_only_copies_under_an_older_epoch() {
    let t = TempArena::new("evict");
    let a = t.open(&small_config());
    let sid = a.create(NewSession::default(), &[("k", b"v")]).unwrap();
    // Held under epoch 1: a takeover at epoch 1 (ours) leaves it.
    assert!(!a.evict_older(sid, 1).unwrap());
    assert!(a.read(sid).is_ok());
    // Installed anew under epoch 3 (this host fetched it back meanwhile):
    // a late notice for epoch 2 leaves it too.
    let bytes = a.read(sid).unwrap().bytes().to_vec();
    a.install(sid, &bytes, 5, 3).unwrap();
    assert!(!a.evict_older(sid, 2).unwrap());
    assert!(!a.evict_older(sid, 3).unwrap());
    // Another host owns it under epoch 4: our copy goes.
    assert!(a.evict_older(sid, 4).unwrap());
    assert_eq!(a.read(sid).err(), Some(SessionError::NotFound));
    let s = a.stats();
    assert_eq!((s.evicted_total, s.expired_total, s.live), (1, 0, 0));
    // Gone already, or never here: nothing to do.
    assert!(!a.evict_older(sid, 9).unwrap());
    assert!(!a.evict_older(Sid::random(), 9).unwrap());
}

/// Every taken SID, as a set; panics on a SID taken twice in one pass.
fn take_all(a: &Arena, max: usize) -> (std::collections::HashSet<Sid>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut takes = 0;
    loop {
        a.take_dirty(max, &mut out);
        takes += 1;
        assert!(
            out.len() <= max,
            "a take of {} past its max {max}",
            out.len()
        );
        if out.is_empty() {
            return (seen, takes);
        }
        for d in &out {
            let sid = match d {
                Dirty::Changed { sid, .. } | Dirty::Removed { sid } => *sid,
            };
            assert!(seen.insert(sid), "{sid} taken twice");
        }
        assert!(takes < 100_000, "takes never ran dry");
    }
}

#[test]
fn dirty_takes_walk_the_summaries_and_lose_nothing_when_cut_short() {
    let t = TempArena::new("summaries");
    // 512 Ki index slots: 8192 bitmap words under 128 and 2 summary words.
    let a = t.open(&ArenaConfig {
        heap_bytes: 32 << 20,
        ..ArenaConfig::for_sessions(300_000, 64)
    });
    let sids: Vec<Sid> = (0..3000u32)
        .map(|i| {
            a.create(NewSession::default(), &[("n", &i.to_le_bytes())])
                .unwrap()
        })
        .collect();
    // Cut short at every 7th: the rest stays marked, summaries included.
    let (seen, takes) = take_all(&a, 7);
    let all: std::collections::HashSet<Sid> = sids.iter().copied().collect();
    assert_eq!(seen, all, "every creation once");
    assert!(takes <= 3000 / 7 + 2, "{takes} takes for 3000 at 7 each");
    let (again, _) = take_all(&a, 7);
    assert!(
        again.is_empty(),
        "taking clears the marks: {} again",
        again.len()
    );
    // A few scattered changes: exactly those.
    let picked: std::collections::HashSet<Sid> = sids.iter().step_by(577).copied().collect();
    for &sid in &picked {
        a.update(sid, &[set("n", b"x")]).unwrap();
    }
    a.invalidate(sids[1]).unwrap();
    let (seen, _) = take_all(&a, usize::MAX);
    let mut want = picked.clone();
    want.insert(sids[1]);
    assert_eq!(seen, want);
}

#[test]
fn a_sleeping_replicator_is_woken_by_the_next_mark_of_another_handle() {
    let t = TempArena::new("bell");
    let a = t.open(&small_config());
    let sid = a.create(NewSession::default(), &[]).unwrap();
    assert!(!a.dirty_sleep(), "something is marked: take it first");
    let mut out = Vec::new();
    a.take_dirty(100, &mut out);
    assert_eq!(out.len(), 1);
    assert!(a.dirty_sleep(), "nothing marked: asleep");
    let bell = a.dirty_bell();
    assert!(bell.asleep());
    // Nothing marked: the wait runs out its time.
    let t0 = std::time::Instant::now();
    bell.wait(std::time::Duration::from_millis(100));
    assert!(t0.elapsed() >= std::time::Duration::from_millis(100));
    assert!(bell.asleep());
    // Another handle (its own mapping) marks: the waiter wakes at once.
    let loc = t.loc.clone();
    let waiter = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        bell.wait(std::time::Duration::from_secs(30));
        (t0.elapsed(), bell.asleep())
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let other = Arena::open_existing(&loc).unwrap();
    other.update(sid, &[set("a", b"1")]).unwrap();
    let (waited, asleep) = waiter.join().unwrap();
    assert!(!asleep, "the mark set the hint");
    assert!(
        waited < std::time::Duration::from_secs(10),
        "woken by the mark, not the timeout: {waited:?}"
    );
    a.take_dirty(100, &mut out);
    assert!(matches!(
        out.as_slice(),
        [Dirty::Changed { version: 2, .. }]
    ));
    // `ring` wakes it with nothing marked; the take finds nothing.
    assert!(a.dirty_sleep());
    a.dirty_bell().ring();
    assert!(!a.dirty_bell().asleep());
    a.take_dirty(100, &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_pinned_scope_reads_as_lone_reads_do_and_keeps_retired_records() {
    let t = TempArena::new("scope");
    let a = t.open(&small_config());
    let sids: Vec<Sid> = (0..4u8)
        .map(|i| a.create(NewSession::default(), &[("n", &[i])]).unwrap())
        .collect();
    let in_use = |a: &Arena| {
        a.memory(sessio_engine::FREE_WALK_DEFAULT)
            .heap_in_use_bytes()
    };
    let before = in_use(&a);
    let during = {
        let scope = a.pinned();
        for (i, &sid) in sids.iter().enumerate() {
            assert_eq!(scope.read(sid).unwrap().get("n"), Some(&[i as u8][..]));
        }
        assert_eq!(
            scope.read(Sid::random()).err(),
            Some(SessionError::NotFound)
        );
        // Updates under the scope: each retires the record it replaces,
        // which the scope's pin keeps from being freed.
        for k in 0..200u8 {
            a.update(sids[0], &[set("n", &[k])]).unwrap();
        }
        let g = scope.read(sids[0]).unwrap();
        assert_eq!((g.version(), g.get("n")), (201, Some(&[199u8][..])));
        drop(g);
        in_use(&a)
    };
    // 200 records of 128 B (a lone update frees what it retired once 16
    // have piled up and no pin holds them).
    assert!(
        during >= before + 200 * 128,
        "200 retired records are kept while pinned: {before} then {during}"
    );
    // The scope is gone: the next mutation's reclaim frees them.
    a.update(sids[1], &[Op::Touch]).unwrap();
    let after = in_use(&a);
    assert!(after < during, "{before}, {during}, {after}");
    assert!(after <= before + 4 * 1024, "{before}, {during}, {after}");
}
