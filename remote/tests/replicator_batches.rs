//! The replicator with a batch cap smaller than what one session has queued:
//! a session with more op batches since its last ack than one delta batch
//! may carry must still be shipped (whole), not left spinning the link.

use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op};
use sessio_net::{IoUring, Secret};
use sessio_remote::node::{LocalNode, NodeConfig};
use sessio_remote::placement::{Member, Placement};
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::runtime::Rt;
use std::time::{Duration, Instant};

fn acked(arena: &Arena, sid: sessio_engine::Sid) -> u64 {
    arena.acked(sid).map_or(0, |a| a[0].1.max(a[1].1))
}

#[test]
fn more_queued_batches_than_a_batch_holds_are_shipped() {
    if !IoUring::available() {
        eprintln!("skipped: io_uring is not available on this kernel");
        return;
    }
    let secret = Secret::from_bytes([9; 32]);
    let node = LocalNode::start::<IoUring>(
        NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1),
        secret.clone(),
    )
    .expect("node serves");
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: node.addr,
        }],
        1,
    )
    .unwrap();
    let loc = Location::Shm(format!("test-repl-batches-{}", std::process::id()));
    let arena = Arena::open(&loc, &ArenaConfig::for_sessions(16, 1024)).unwrap();
    let sid = arena.create(NewSession::default(), &[("n", b"0")]).unwrap();
    let mut cfg = ReplicatorConfig::new(placement, secret, 1);
    cfg.batch_entries_max = 1;
    // Long enough that the updates below all land between two flushes.
    cfg.flush_interval_us = 200_000;
    let repl = Replicator::spawn(&loc, cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked(&arena, sid) < 1 {
        assert!(Instant::now() < deadline, "the first copy was never acked");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut version = 0;
    for i in 0..5u8 {
        version = arena
            .update(
                sid,
                &[Op::Set {
                    key: "n".into(),
                    value: vec![i],
                }],
            )
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked(&arena, sid) < version && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if acked(&arena, sid) < version {
        let stats = repl.stats();
        // A spinning replicator would never stop: do not wait for it.
        std::mem::forget(repl);
        let _ = Arena::remove(&loc);
        panic!(
            "version {version} never acked (acked {}): {stats:?}",
            acked(&arena, sid)
        );
    }
    drop(repl);
    drop(node);
    drop(arena);
    Arena::remove(&loc).unwrap();
}

/// A node whose handshake proves another id than the one the host was
/// configured with for its address is refused: it is never marked up and
/// gets nothing, and the error says what is wrong.
#[test]
fn a_node_proving_another_id_is_refused() {
    assert!(IoUring::available(), "io_uring is required here");
    let secret = Secret::from_bytes([9; 32]);
    // Node 2 answers at the address the host believes is node 1's.
    let node = LocalNode::start::<IoUring>(
        NodeConfig::new("127.0.0.1:0".parse().unwrap(), 2),
        secret.clone(),
    )
    .expect("node serves");
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: node.addr,
        }],
        1,
    )
    .unwrap();
    let loc = Location::Shm(format!("test-repl-identity-{}", std::process::id()));
    let arena = Arena::open(&loc, &ArenaConfig::for_sessions(16, 1024)).unwrap();
    let sid = arena.create(NewSession::default(), &[("n", b"0")]).unwrap();
    let repl = Replicator::spawn(&loc, ReplicatorConfig::new(placement, secret, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        let s = repl.stats();
        // A link starts up (optimistically, until a connect fails).
        if let Some(n) = s.nodes.first()
            && let Some(e) = n.last_error.clone()
        {
            assert!(!n.up, "a node with the wrong id was taken as up");
            break e;
        }
        assert!(Instant::now() < deadline, "no error after 10 s: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(error.contains("proved id 2"), "{error}");
    // A moment more: still nothing acknowledged.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(acked(&arena, sid), 0);
    assert!(!repl.stats().nodes[0].up);
    drop(repl);
    drop(arena);
    let _ = Arena::remove(&loc);
}
