//! The replicator with a batch cap smaller than what one session has queued:
//! a session with more op batches since its last ack than one delta batch
//! may carry must still be shipped (whole), not left spinning the link.

use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op};
use sessio_net::test_backend::TestBackend;
use sessio_net::{Secret, on_test_backend};
use sessio_remote::node::{LocalNode, NodeConfig};
use sessio_remote::placement::{Member, Placement};
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use std::time::{Duration, Instant};

fn acked(arena: &Arena, sid: sessio_engine::Sid) -> u64 {
    arena.acked(sid).map_or(0, |a| a[0].1.max(a[1].1))
}

/// The replicator's settings for `placement`, on the engine the tests run
/// on (`io_uring` where it works here, else epoll).
fn config(placement: Placement) -> ReplicatorConfig {
    let mut cfg = ReplicatorConfig::new(placement, Secret::from_bytes(SECRET), 1);
    cfg.force_epoll = TestBackend::get().is_epoll();
    cfg
}

/// A node proving `node_id` at an address the host knows as node 1's, and
/// a fresh arena with one session: the setup of each test here.
fn setup(node_id: u16, tag: &str) -> (LocalNode, Placement, Location, Arena, sessio_engine::Sid) {
    let node = on_test_backend!(B => LocalNode::start::<B>(
        NodeConfig::new("127.0.0.1:0".parse().unwrap(), node_id),
        Secret::from_bytes(SECRET),
    ))
    .expect("node serves");
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: node.addr,
        }],
        1,
    )
    .unwrap();
    let loc = Location::Shm(format!("test-repl-{tag}-{}", std::process::id()));
    let arena = Arena::open(&loc, &ArenaConfig::for_sessions(16, 1024)).unwrap();
    let sid = arena.create(NewSession::default(), &[("n", b"0")]).unwrap();
    (node, placement, loc, arena, sid)
}

const SECRET: [u8; 32] = [9; 32];

#[test]
fn more_queued_batches_than_a_batch_holds_are_shipped() {
    let (node, placement, loc, arena, sid) = setup(1, "batches");
    let mut cfg = config(placement);
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
    // Node 2 answers at the address the host believes is node 1's.
    let (_node, placement, loc, arena, sid) = setup(2, "identity");
    let repl = Replicator::spawn(&loc, config(placement)).unwrap();
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

/// A TCP relay on loopback that holds every chunk it forwards for
/// `delay`, and forwards at most `bytes_per_s`, in both directions: a slow
/// link, without loss.
struct SlowLink {
    addr: std::net::SocketAddr,
}

impl SlowLink {
    fn start(to: std::net::SocketAddr, delay: Duration, bytes_per_s: u64) -> SlowLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            // One connection at a time is all these tests make.
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    return;
                };
                for (from, into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    Self::pipe(from, into, delay, bytes_per_s);
                }
            }
        });
        SlowLink { addr }
    }

    /// Forwards `from` to `into`, each chunk `delay` after it was read,
    /// reading no faster than `bytes_per_s` (so the sender's socket fills).
    fn pipe(
        mut from: std::net::TcpStream,
        mut into: std::net::TcpStream,
        delay: Duration,
        bytes_per_s: u64,
    ) {
        use std::io::{Read, Write};
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                let due = Instant::now() + delay;
                if n == 0 || tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / bytes_per_s));
            }
        });
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if into.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = into.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// Over a slow link (30 ms each way, 256 KB/s), sessions updated while
/// their batches are in flight are sent from the version already sent,
/// not again from the version acknowledged: the node never sees a batch
/// twice, so it never answers `NeedFull` (which made the host resend whole
/// records, a storm that tripled the bytes on a lossy link).
#[test]
fn a_slow_link_gets_each_change_once() {
    let (node, _, loc, arena, sid) = setup(1, "slow-link");
    let link = SlowLink::start(node.addr, Duration::from_millis(30), 64 * 1024);
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: link.addr,
        }],
        1,
    )
    .unwrap();
    let repl = Replicator::spawn(&loc, config(placement)).unwrap();
    // Fifteen sessions, small changes: deltas, never whole records, as long
    // as each node keeps up within the arena's delta log.
    let mut sids = vec![sid];
    sids.extend((1..15).map(|_| arena.create(NewSession::default(), &[("n", b"0")]).unwrap()));
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_millis(1500) {
        n += 1;
        arena
            .update(
                sids[n as usize % sids.len()],
                &[Op::Set {
                    key: "n".into(),
                    value: vec![n as u8],
                }],
            )
            .unwrap();
        if n.is_multiple_of(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let version = arena.read(sid).unwrap().version();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sids
        .iter()
        .any(|&s| acked(&arena, s) < arena.read(s).unwrap().version())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = repl.stats();
    drop(repl);
    let counters = |name: &str| -> u64 {
        on_test_backend!(B => sessio_remote::node::LocalBank::counter_of::<B>(
            node.addr,
            &Secret::from_bytes(SECRET),
            name,
        ))
        .unwrap()
    };
    let (need_full, applied) = (counters("need_full"), counters("applied"));
    eprintln!("{version} versions, node applied {applied}, need_full {need_full}: {st:?}");
    assert_eq!(
        acked(&arena, sid),
        version,
        "the last version was never acked"
    );
    assert_eq!(need_full, 0, "batches were sent twice ({applied} applied)");
    assert!(
        applied <= u64::from(n) + 1,
        "{applied} entries applied for {n} updates"
    );
    drop(arena);
    Arena::remove(&loc).unwrap();
}

/// One owner behind a slow link (16 KB/s) is routed around: its sessions'
/// writes go to a stand-in while it is behind, so every update still
/// reaches two nodes soon after it is made, instead of waiting for the
/// slow node to drain its backlog.
#[test]
fn a_slow_node_is_routed_around_until_it_catches_up() {
    let bank = sessio_remote::node::LocalBank::start_any(3, 2, Secret::from_bytes(SECRET)).unwrap();
    let slow = SlowLink::start(bank.nodes()[0].addr, Duration::from_millis(20), 16 * 1024);
    let members = bank
        .placement
        .members()
        .iter()
        .map(|m| Member {
            id: m.id,
            addr: if m.id == 1 { slow.addr } else { m.addr },
        })
        .collect();
    let placement = Placement::new(members, 2).unwrap();
    let loc = Location::Shm(format!("test-repl-slow-node-{}", std::process::id()));
    let arena = Arena::open(&loc, &ArenaConfig::for_sessions(64, 2048)).unwrap();
    let sids: Vec<_> = (0..30)
        .map(|_| arena.create(NewSession::default(), &[("n", b"0")]).unwrap())
        .collect();
    let repl = Replicator::spawn(&loc, config(placement.clone())).unwrap();
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(3) {
        n += 1;
        arena
            .update(
                sids[n as usize % sids.len()],
                &[Op::Set {
                    key: format!("k{}", n % 3),
                    value: vec![n as u8; 300],
                }],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    // Every session's last version reaches two nodes soon after.
    let two_acks = |sid| {
        let v = arena.read(sid).unwrap().version();
        arena
            .acked(sid)
            .unwrap()
            .iter()
            .filter(|a| a.0 != 0 && a.1 >= v)
            .count()
            >= 2
    };
    let caught_up = Instant::now();
    while !sids.iter().all(|&s| two_acks(s)) && caught_up.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let waited = caught_up.elapsed();
    let st = repl.stats();
    eprintln!("{n} updates; two acks everywhere {waited:?} after the last; {st:?}");
    drop(repl);
    drop(arena);
    Arena::remove(&loc).unwrap();
    assert!(
        waited < Duration::from_millis(750),
        "the last updates waited {waited:?} for two acks"
    );
    assert!(
        st.nodes[0].slow_episodes >= 1,
        "node 1 was never routed around"
    );
}
