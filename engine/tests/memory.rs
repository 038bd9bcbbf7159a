//! What `Arena::memory` reports, against a collection's own count and
//! against the config that laid the arena out.

mod common;

use common::TempArena;
use sessio_engine::{
    Arena, ArenaConfig, FREE_WALK_DEFAULT, HEAP_SLACK_BYTES, NewSession, Op, SessionCost,
};

const SESSIONS: u64 = 2000;

fn fill(a: &Arena, n: u64) -> Vec<sessio_engine::Sid> {
    let value = [b'v'; 100];
    let keys = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"];
    let attrs: Vec<(&str, &[u8])> = keys.iter().map(|k| (*k, &value[..])).collect();
    (0..n)
        .map(|_| a.create(NewSession::default(), &attrs).unwrap())
        .collect()
}

#[test]
fn memory_agrees_with_a_collection_and_the_config() {
    let t = TempArena::new("memory");
    let cfg = ArenaConfig::for_sessions(SESSIONS, 1024);
    let a = t.open(&cfg);
    let sids = fill(&a, SESSIONS);
    for sid in &sids {
        a.update(
            *sid,
            &[Op::Set {
                key: "a0".into(),
                value: vec![b'w'; 100],
            }],
        )
        .unwrap();
    }
    let report = a.collect().unwrap();
    let m = a.memory(u64::MAX);
    assert!(m.free_walk_complete);
    assert_eq!(m.live, SESSIONS);
    assert_eq!(
        m.heap_in_use_bytes(),
        report.in_use_bytes,
        "{m:#?} {report:#?}"
    );
    // A collection counts the never-carved rest of a chunk as free too.
    assert_eq!(
        m.heap_class_free_bytes(),
        report.free_bytes,
        "{m:#?} {report:#?}"
    );
    // Each session's record is one block of 1–2 KiB (8 × 100 B, keys and
    // header; an update does not grow it).
    let per = m.per_session(m.heap_in_use_bytes()).unwrap();
    assert!((1024..=2048).contains(&per), "{per} B per session: {m:#?}");
    // The sizing is the config's on the pages the arena got (`for_sessions`
    // asks for 2 MiB pages where there are some), and the file is
    // reserved whole.
    let pages = if a.huge_pages() {
        cfg.clone()
    } else {
        ArenaConfig {
            huge_pages: sessio_engine::HugePages::Off,
            ..cfg.clone()
        }
    };
    assert_eq!(m.sizing, pages.sizing());
    assert_eq!(m.sizing.mapped_bytes, a.stats().mapped_bytes);
    assert!(m.reserved_bytes >= m.sizing.mapped_bytes, "{m:#?}");
    let touched = m.touched_bytes.expect("mincore answers");
    assert!(touched > m.heap_in_use_bytes() && touched <= m.sizing.mapped_bytes);
    // Classes own what they own; the rest is unassigned.
    let owned: u64 = m.classes.iter().map(|c| c.chunks).sum();
    assert_eq!(
        owned * m.chunk_bytes + m.heap_unassigned_bytes(),
        m.sizing.heap_bytes
    );
    assert_eq!(
        m.heap_in_use_bytes() + m.heap_class_free_bytes(),
        m.classes
            .iter()
            .map(|c| c.chunks * c.blocks_per_chunk * c.block_bytes)
            .sum::<u64>()
    );
}

#[test]
fn the_free_walk_is_bounded_and_says_so() {
    let t = TempArena::new("memory-walk");
    let a = t.open(&ArenaConfig::for_sessions(SESSIONS, 1024));
    let sids = fill(&a, 200);
    for sid in &sids {
        a.invalidate(*sid).unwrap();
    }
    a.collect().unwrap();
    let all = a.memory(FREE_WALK_DEFAULT);
    assert!(all.free_walk_complete);
    assert_eq!(all.live, 0);
    let cut = a.memory(10);
    assert!(!cut.free_walk_complete, "{cut:#?}");
    let free =
        |m: &sessio_engine::MemoryStats| m.classes.iter().map(|c| c.free_blocks).sum::<u64>();
    assert_eq!(free(&cut), 10);
    assert!(free(&all) > 10);
}

/// An arena remembers the heap it was made with and refuses a config that
/// asks for another, so `for_sessions` must not drift: a change here
/// refuses every arena made by an older build.
#[test]
fn for_sessions_is_the_sum_of_its_terms_and_does_not_drift() {
    let c = SessionCost::new(1024);
    assert_eq!(
        (c.record_header_bytes, c.rounding_bytes, c.slack_bytes),
        (64, 0, 272)
    );
    assert_eq!(c.heap_bytes(), 1360);
    let cfg = ArenaConfig::for_sessions(1_000_000, 1024);
    assert_eq!(cfg.heap_bytes, 1_000_000 * 1360 + HEAP_SLACK_BYTES);
    let s = cfg.sizing();
    // 4/3 of the capacity, to a multiple of 64: 85 B a session.
    assert_eq!(s.index_slots, 1_333_376);
    assert_eq!(s.index_bytes, 1_333_376 * 64);
    assert_eq!(
        s.mapped_bytes,
        s.index_bytes + s.heap_bytes + s.delta_log_bytes + s.fixed_bytes
    );
    // 1/64 of the heap (1.36 GB), within its bounds.
    assert_eq!(
        s.delta_log_bytes,
        (s.heap_bytes / 64).next_multiple_of(4096)
    );
    assert!(s.fixed_bytes < 16 << 20, "{s:?}");
    assert_eq!(SessionCost::new(1000).rounding_bytes, 24);
}
