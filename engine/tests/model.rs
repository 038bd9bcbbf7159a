//! The arena against a plain model, one process: random sequences of
//! creates, updates of every op kind, reads, invalidations, sweeps,
//! installs and reopens, checked after every step against a `BTreeMap` of
//! each live session's attributes, version, epoch and expiry.
//!
//! Expiry is made deterministic by keeping every TTL at an hour or more
//! (real time never reaches it during a run) and sweeping at chosen clock
//! values: `now`, two hours on (the one-hour TTLs are due), or a day on
//! (every TTL is due).
//!
//! `PROPTEST_CASES` raises the number of cases (64 by default, which keeps
//! the test to a few seconds in a debug build).

mod common;

use common::TempArena;
use proptest::prelude::*;
use sessio_engine::session::{SessionData, encode_ops, encode_session};
use sessio_engine::{
    Arena, ArenaConfig, HugePages, NewSession, Op, OpError, SessionError, Sid, clock,
};
use std::collections::{BTreeMap, BTreeSet};

/// Small enough that creates and installs run into it.
const CAPACITY: u64 = 6;
/// Two attributes of the larger value size often go over it.
const QUOTA: u64 = 4096;
/// An encoded batch this much over the quota is refused before it is
/// queued (it could never apply).
const BATCH_SLACK_BYTES: u64 = 4096;
/// Room for every record copy and queued batch the cases make, so no step
/// fails for want of heap (which the model does not predict).
const HEAP_BYTES: u64 = 16 << 20;
const HOUR_MS: u64 = 3_600_000;
/// Longest key the engine takes.
const KEY_BYTES_MAX: usize = 255;
/// Most items a bounded append may keep.
const APPEND_ITEMS_MAX: u32 = 4096;

fn config() -> ArenaConfig {
    ArenaConfig {
        capacity: CAPACITY,
        heap_bytes: HEAP_BYTES,
        quota_bytes: QUOTA,
        huge_pages: HugePages::Off,
    }
}

/// How a session expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ttl {
    None,
    Idle1h,
    Life1h,
    Idle10h,
    Life10h,
}

impl Ttl {
    fn new_session(self) -> NewSession {
        let (idle_ttl_ms, lifetime_ms) = match self {
            Ttl::None => (0, 0),
            Ttl::Idle1h => (HOUR_MS, 0),
            Ttl::Life1h => (0, HOUR_MS),
            Ttl::Idle10h => (10 * HOUR_MS, 0),
            Ttl::Life10h => (0, 10 * HOUR_MS),
        };
        NewSession {
            idle_ttl_ms,
            lifetime_ms,
        }
    }

    /// Whether a sweep `ahead_ms` past the real clock removes the session
    /// (created, updated and read within the run, which is far shorter
    /// than an hour).
    fn due(self, ahead_ms: u64) -> bool {
        match self {
            Ttl::None => false,
            Ttl::Idle1h | Ttl::Life1h => ahead_ms >= 2 * HOUR_MS,
            Ttl::Idle10h | Ttl::Life10h => ahead_ms >= 20 * HOUR_MS,
        }
    }
}

/// The model of one live session.
#[derive(Debug, Clone)]
struct Entry {
    attrs: BTreeMap<String, Vec<u8>>,
    version: u64,
    epoch: u64,
    ttl: Ttl,
}

#[derive(Debug, Default)]
struct Model {
    live: BTreeMap<Sid, Entry>,
    /// Sessions that existed and were removed: they must read as gone.
    gone: Vec<Sid>,
}

impl Model {
    fn remove(&mut self, sid: Sid) {
        self.live.remove(&sid);
        self.gone.push(sid);
    }

    /// A live session, a removed one, or one that never existed.
    fn pick(&self, t: Target) -> Sid {
        match t {
            Target::Live(i) if !self.live.is_empty() => {
                *self.live.keys().nth(i % self.live.len()).expect("in range")
            }
            Target::Gone(i) if !self.gone.is_empty() => self.gone[i % self.gone.len()],
            _ => Sid::random(),
        }
    }
}

/// Items of an append list: `u32 LE length, bytes`, repeated.
fn list_items(value: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut items = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        items.push(rest.get(4..4 + len)?.to_vec());
        rest = &rest[4 + len..];
    }
    Some(items)
}

fn valid_key(key: &str) -> Result<(), OpError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        Err(OpError::BadKey)
    } else {
        Ok(())
    }
}

fn attr_bytes(attrs: &BTreeMap<String, Vec<u8>>) -> u64 {
    attrs
        .iter()
        .map(|(k, v)| (k.len() + v.len() + 16) as u64)
        .sum()
}

/// What a batch does to a session's attributes: the new attributes and
/// whether it ends the session, or why it is refused (all or nothing).
fn apply(
    attrs: &BTreeMap<String, Vec<u8>>,
    ops: &[Op],
) -> Result<(BTreeMap<String, Vec<u8>>, bool), OpError> {
    let mut next = attrs.clone();
    let mut ends = false;
    for op in ops {
        match op {
            Op::Set { key, value } => {
                valid_key(key)?;
                next.insert(key.clone(), value.clone());
            }
            Op::Remove { key } => {
                valid_key(key)?;
                next.remove(key);
            }
            Op::Append {
                key,
                item,
                max_items,
            } => {
                if *max_items == 0 || *max_items > APPEND_ITEMS_MAX {
                    return Err(OpError::NotAList);
                }
                let mut items = match next.get(key) {
                    None => Vec::new(),
                    Some(v) => list_items(v).ok_or(OpError::NotAList)?,
                };
                items.push(item.clone());
                let drop = items.len().saturating_sub(*max_items as usize);
                items.drain(..drop);
                valid_key(key)?;
                let mut value = Vec::new();
                for it in items {
                    value.extend_from_slice(&(it.len() as u32).to_le_bytes());
                    value.extend_from_slice(&it);
                }
                next.insert(key.clone(), value);
            }
            Op::Incr { key, by } => {
                let cur = match next.get(key) {
                    None => 0,
                    Some(v) => i64::from_le_bytes(
                        v.as_slice().try_into().map_err(|_| OpError::NotACounter)?,
                    ),
                };
                let new = cur.checked_add(*by).ok_or(OpError::NotACounter)?;
                valid_key(key)?;
                next.insert(key.clone(), new.to_le_bytes().to_vec());
            }
            Op::Touch => {}
            Op::Invalidate => ends = true,
        }
    }
    let needed = attr_bytes(&next);
    if needed > QUOTA {
        return Err(OpError::OverQuota {
            needed,
            quota: QUOTA,
        });
    }
    Ok((next, ends))
}

// ----- the operations ---------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Target {
    Live(usize),
    Gone(usize),
    Unknown,
}

#[derive(Debug, Clone)]
enum Snapshot {
    /// The archived bytes of a live session (what a replica holds).
    Of(Target),
    /// A session encoded from scratch.
    Fresh {
        attrs: Vec<(String, Vec<u8>)>,
        ttl: Ttl,
    },
    /// Bytes that are no session.
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Step {
    Create {
        ttl: Ttl,
        attrs: Vec<(String, Vec<u8>)>,
    },
    Update {
        target: Target,
        ops: Vec<Op>,
    },
    Read(Target),
    Invalidate(Target),
    /// A sweep at the real clock plus this many ms.
    Sweep(u64),
    /// An install of `snapshot` into `target`, at the target's version and
    /// epoch moved by these steps (-1, 0, +1); or, for a session not live,
    /// at version `dv + 2` and epoch `de + 2`.
    Install {
        snapshot: Snapshot,
        target: Target,
        dv: i8,
        de: i8,
    },
    /// Drop the handle and open the arena file again.
    Reopen,
}

/// Mostly `usual`, so ops of one kind meet values of their kind, sometimes
/// any other key, an empty or an over-long one.
fn key(usual: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(usual.to_string()),
        4 => prop_oneof![Just("a"), Just("b"), Just("list"), Just("n")].prop_map(str::to_string),
        1 => Just(String::new()),
        1 => Just("k".repeat(KEY_BYTES_MAX + 1)),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..24),
        2 => any::<i64>().prop_map(|n| n.to_le_bytes().to_vec()),
        1 => (1500usize..3000).prop_map(|n| vec![0x5a; n]),
    ]
}

fn ttl() -> impl Strategy<Value = Ttl> {
    prop_oneof![
        Just(Ttl::None),
        Just(Ttl::Idle1h),
        Just(Ttl::Life1h),
        Just(Ttl::Idle10h),
        Just(Ttl::Life10h),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        8 => any::<usize>().prop_map(Target::Live),
        1 => any::<usize>().prop_map(Target::Gone),
        1 => Just(Target::Unknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key("a"), value()).prop_map(|(key, value)| Op::Set { key, value }),
        1 => key("b").prop_map(|key| Op::Remove { key }),
        3 => (
            key("list"),
            proptest::collection::vec(any::<u8>(), 0..12),
            prop_oneof![8 => 0u32..4, 1 => Just(APPEND_ITEMS_MAX + 1)],
        )
            .prop_map(|(key, item, max_items)| Op::Append {
                key,
                item,
                max_items
            }),
        3 => (key("n"), prop_oneof![8 => -100i64..100, 1 => Just(i64::MAX), 1 => Just(i64::MIN)])
            .prop_map(|(key, by)| Op::Incr { key, by }),
        1 => Just(Op::Touch),
        1 => Just(Op::Invalidate),
    ]
}

fn attrs() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec((key("a"), value()), 0..4)
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    prop_oneof![
        4 => target().prop_map(Snapshot::Of),
        2 => (
            proptest::collection::vec(
                (prop_oneof![Just("a"), Just("b"), Just("z")].prop_map(str::to_string), value()),
                0..4
            ),
            ttl()
        )
            .prop_map(|(attrs, ttl)| Snapshot::Fresh { attrs, ttl }),
        // Shorter than the smallest archived session: never one.
        1 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Snapshot::Garbage),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (ttl(), attrs()).prop_map(|(ttl, attrs)| Step::Create { ttl, attrs }),
        8 => (target(), proptest::collection::vec(op(), 1..4))
            .prop_map(|(target, ops)| Step::Update { target, ops }),
        // Big values: over the quota, and some batches too big to queue.
        1 => (target(), proptest::collection::vec((key("a"), 2000usize..4500), 1..4))
            .prop_map(|(target, sets)| Step::Update {
                target,
                ops: sets
                    .into_iter()
                    .map(|(key, n)| Op::Set { key, value: vec![0xa5; n] })
                    .collect(),
            }),
        1 => target().prop_map(Step::Read),
        1 => target().prop_map(Step::Invalidate),
        1 => prop_oneof![Just(0), Just(2 * HOUR_MS), Just(24 * HOUR_MS)].prop_map(Step::Sweep),
        // New sessions as often as replacements, so installs meet a full
        // arena too.
        3 => (snapshot(), prop_oneof![Just(Target::Unknown), target()], -1i8..=1, -1i8..=1)
            .prop_map(|(snapshot, target, dv, de)| Step::Install { snapshot, target, dv, de }),
        1 => Just(Step::Reopen),
    ]
}

// ----- running and checking ---------------------------------------------

fn moved(base: u64, by: i8) -> u64 {
    base.saturating_add_signed(i64::from(by))
}

fn run_step(arena: &Arena, model: &mut Model, step: &Step) {
    match step {
        Step::Create { ttl, attrs } => {
            let ops: Vec<Op> = attrs
                .iter()
                .map(|(key, value)| Op::Set {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            let pairs: Vec<(&str, &[u8])> = attrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let got = arena.create(ttl.new_session(), &pairs);
            match apply(&BTreeMap::new(), &ops) {
                Err(e) => assert_eq!(got, Err(SessionError::Op(e)), "create {attrs:?}"),
                Ok(_) if model.live.len() as u64 >= CAPACITY => {
                    assert_eq!(got, Err(SessionError::Full(CAPACITY)), "create when full");
                }
                Ok((attrs, _)) => {
                    let sid = got.expect("create within quota and capacity");
                    assert!(!model.live.contains_key(&sid), "a fresh SID is fresh");
                    model.live.insert(
                        sid,
                        Entry {
                            attrs,
                            version: 1,
                            epoch: 1,
                            ttl: *ttl,
                        },
                    );
                }
            }
        }
        Step::Update { target, ops } => {
            let sid = model.pick(*target);
            let got = arena.update(sid, ops);
            let encoded = encode_ops(ops).len() as u64;
            if encoded > QUOTA + BATCH_SLACK_BYTES {
                let refused = OpError::OverQuota {
                    needed: encoded,
                    quota: QUOTA,
                };
                assert_eq!(got, Err(SessionError::Op(refused)), "oversized batch");
                return;
            }
            let Some(e) = model.live.get_mut(&sid) else {
                assert_eq!(
                    got,
                    Err(SessionError::NotFound),
                    "update of a missing session"
                );
                return;
            };
            match apply(&e.attrs, ops) {
                Err(err) => assert_eq!(got, Err(SessionError::Op(err)), "update {ops:?}"),
                Ok((_, true)) => {
                    // An ending batch answers with the last version.
                    assert_eq!(got, Ok(e.version), "ending batch {ops:?}");
                    model.remove(sid);
                }
                Ok((attrs, false)) => {
                    e.version += 1;
                    e.attrs = attrs;
                    assert_eq!(got, Ok(e.version), "update {ops:?}");
                }
            }
        }
        Step::Read(target) => {
            let sid = model.pick(*target);
            match model.live.get(&sid) {
                Some(e) => check_session(arena, sid, e),
                None => assert_eq!(arena.read(sid).err(), Some(SessionError::NotFound)),
            }
        }
        Step::Invalidate(target) => {
            let sid = model.pick(*target);
            let got = arena.invalidate(sid);
            if model.live.contains_key(&sid) {
                assert_eq!(got, Ok(()), "invalidate");
                model.remove(sid);
            } else {
                assert_eq!(
                    got,
                    Err(SessionError::NotFound),
                    "invalidate a missing session"
                );
            }
        }
        Step::Sweep(ahead_ms) => {
            let due: Vec<Sid> = model
                .live
                .iter()
                .filter(|(_, e)| e.ttl.due(*ahead_ms))
                .map(|(sid, _)| *sid)
                .collect();
            let stats = arena.sweep(clock::now_ms() + ahead_ms, u64::MAX);
            assert_eq!(stats.expired, due.len() as u64, "sweep {ahead_ms} ms ahead");
            assert!(stats.scanned >= CAPACITY, "a full sweep scans the index");
            for sid in due {
                model.remove(sid);
            }
        }
        Step::Install {
            snapshot,
            target,
            dv,
            de,
        } => install(arena, model, snapshot, *target, *dv, *de),
        Step::Reopen => unreachable!("the driver reopens"),
    }
}

fn install(arena: &Arena, model: &mut Model, snapshot: &Snapshot, target: Target, dv: i8, de: i8) {
    let (bytes, attrs, ttl) = match snapshot {
        Snapshot::Of(source) => {
            let src = model.pick(*source);
            let Some(e) = model.live.get(&src) else {
                return;
            };
            let bytes = arena.read(src).expect("live source").bytes().to_vec();
            (bytes, Some(e.attrs.clone()), e.ttl)
        }
        Snapshot::Fresh { attrs, ttl } => {
            let now = clock::now_ms();
            let mut data = SessionData::default();
            let ops: Vec<Op> = attrs
                .iter()
                .map(|(key, value)| Op::Set {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect();
            data.apply(&ops, now, u64::MAX).expect("valid keys");
            let new = ttl.new_session();
            data.created_ms = now;
            data.updated_ms = now;
            data.idle_ttl_ms = new.idle_ttl_ms;
            data.expires_at_ms = if new.lifetime_ms == 0 {
                0
            } else {
                now + new.lifetime_ms
            };
            let model_attrs: BTreeMap<String, Vec<u8>> = attrs.iter().cloned().collect();
            (encode_session(&data).to_vec(), Some(model_attrs), *ttl)
        }
        Snapshot::Garbage(bytes) => (bytes.clone(), None, Ttl::None),
    };
    let sid = model.pick(target);
    let held = model.live.get(&sid).map(|e| (e.version, e.epoch));
    let (version, epoch) = match held {
        Some((v, e)) => (moved(v, dv), moved(e, de)),
        None => (moved(2, dv), moved(2, de)),
    };
    let got = arena.install(sid, &bytes, version, epoch);
    let Some(attrs) = attrs else {
        assert!(
            matches!(got, Err(SessionError::BadSnapshot(_))),
            "garbage installed: {got:?}"
        );
        return;
    };
    let needed = attr_bytes(&attrs);
    if needed > QUOTA {
        assert_eq!(
            got,
            Err(SessionError::Op(OpError::OverQuota {
                needed,
                quota: QUOTA
            })),
            "install over quota"
        );
        return;
    }
    match held {
        Some((hv, he)) if epoch < he || (epoch == he && version <= hv) => {
            assert_eq!(
                got,
                Err(SessionError::StaleEpoch {
                    offered: epoch,
                    held: he
                }),
                "install of version {version} epoch {epoch} over {hv}/{he}"
            );
        }
        None if model.live.len() as u64 >= CAPACITY => {
            assert_eq!(got, Err(SessionError::Full(CAPACITY)), "install when full");
        }
        _ => {
            assert_eq!(got, Ok(version), "install");
            if held.is_none() {
                model.gone.retain(|g| *g != sid);
            }
            model.live.insert(
                sid,
                Entry {
                    attrs,
                    version,
                    epoch,
                    ttl,
                },
            );
        }
    }
}

/// Drops the only handle, which closes the arena, and opens the file
/// again: alone, so recovery runs, and it must find nothing to repair.
fn reopen(arena: Arena, t: &TempArena, model: &Model) -> Arena {
    drop(arena);
    let arena = Arena::open_existing(&t.loc).expect("reopen");
    let r = arena
        .recovery_report()
        .expect("a handle opened alone runs recovery");
    assert_eq!(r.sessions, model.live.len() as u64, "{r:?}");
    assert_eq!(r.corrupt_records, 0, "{r:?}");
    assert_eq!(r.broken_queues, 0, "{r:?}");
    assert_eq!(r.finished_removals, 0, "{r:?}");
    assert_eq!(r.leaked_blocks, 0, "{r:?}");
    assert_eq!(r.pending_applied, 0, "{r:?}");
    arena
}

/// One live session reads exactly as the model has it.
fn check_session(arena: &Arena, sid: Sid, e: &Entry) {
    let g = arena
        .read(sid)
        .unwrap_or_else(|err| panic!("{sid:?} live in the model: {err:?}"));
    assert!(g.verify(), "{sid:?} checksum");
    assert_eq!(g.version(), e.version, "{sid:?} version");
    assert_eq!(g.epoch(), e.epoch, "{sid:?} epoch");
    let got: BTreeMap<String, Vec<u8>> = g
        .to_owned()
        .attrs
        .into_iter()
        .map(|a| (a.key, a.value))
        .collect();
    assert_eq!(got, e.attrs, "{sid:?} attributes");
    for (k, v) in &e.attrs {
        assert_eq!(g.get(k), Some(v.as_slice()), "{sid:?} get({k:?})");
    }
    assert_eq!(g.get("absent"), None);
}

/// The whole arena reads exactly as the model has it.
fn check_all(arena: &Arena, model: &Model) {
    let stats = arena.stats();
    assert_eq!(stats.live, model.live.len() as u64, "live count");
    let sids: BTreeSet<Sid> = arena.sids().into_iter().collect();
    let want: BTreeSet<Sid> = model.live.keys().copied().collect();
    assert_eq!(sids, want, "live SIDs");
    for (sid, e) in &model.live {
        check_session(arena, *sid, e);
    }
    for sid in model.gone.iter().rev().take(8) {
        if !model.live.contains_key(sid) {
            assert_eq!(
                arena.read(*sid).err(),
                Some(SessionError::NotFound),
                "{sid:?} was removed"
            );
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arena_matches_model(steps in proptest::collection::vec(step(), 1..48)) {
        let t = TempArena::new("model");
        let mut arena = t.open(&config());
        let mut model = Model::default();
        for step in &steps {
            if let Step::Reopen = step {
                arena = reopen(arena, &t, &model);
            } else {
                run_step(&arena, &mut model, step);
            }
            check_all(&arena, &model);
        }
        drop(arena);
    }
}
