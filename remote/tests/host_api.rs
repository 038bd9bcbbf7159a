//! The host API ([`Sessions`]) against real nodes on loopback and real
//! worker processes sharing one arena:
//!
//! - a miss fetches once, across threads and across processes of a host;
//! - made-up SIDs cost a bounded bank query each, then nothing (negative
//!   cache), and an empty fetch bucket throttles instead of asking;
//! - expiry runs by itself, with no sweep call from the application, and
//!   the removals reach the bank;
//! - a session that is only read keeps its idle clock across failover;
//! - a `Replicated` update returns once the bank acked it, and times out,
//!   applied locally, when the bank is gone;
//! - the nodes fold the op batches of a copy that went idle into its
//!   record by themselves, and a failover then finds the last write;
//! - a host whose session another host took over drops its stale copy
//!   (the bank tells it), so when the session comes back it is fetched
//!   anew, not served stale.
//!
//! A test here runs this binary again as a worker process (`reader`
//! mode), so the harness is `libtest-mimic`, with the usual filters.

use std::process::Command;
use std::time::{Duration, Instant};

use sessio_engine::{Arena, ArenaConfig, FetchClaim, Location, NewSession, Op, Sid};
use sessio_net::test_backend::TestBackend;
use sessio_net::{Secret, on_test_backend};
use sessio_remote::failover::{FailoverConfig, NodeClients, Singleflight, fetch_and_install};
use sessio_remote::node::LocalBank;
use sessio_remote::placement::Placement;
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::{Durability, Engine, HostConfig, HostError, Sessions, SweepConfig};

const SECRET: [u8; 32] = [4; 32];

#[path = "../../engine/tests/support/run.rs"]
mod run;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("reader") {
        return reader(&args[2..]);
    }
    let tests: Vec<(&'static str, fn())> = vec![
        (
            "a_miss_fetches_once_for_all_threads",
            a_miss_fetches_once_for_all_threads,
        ),
        (
            "processes_of_a_host_wait_for_one_fetch",
            processes_of_a_host_wait_for_one_fetch,
        ),
        (
            "made_up_sids_cost_a_bounded_query_once",
            made_up_sids_cost_a_bounded_query_once,
        ),
        (
            "an_empty_fetch_bucket_throttles",
            an_empty_fetch_bucket_throttles,
        ),
        ("expiry_runs_by_itself", expiry_runs_by_itself),
        (
            "a_read_session_keeps_its_idle_clock_across_failover",
            a_read_session_keeps_its_idle_clock_across_failover,
        ),
        (
            "replicated_updates_wait_for_the_bank",
            replicated_updates_wait_for_the_bank,
        ),
        (
            "a_taken_over_copy_leaves_its_old_host",
            a_taken_over_copy_leaves_its_old_host,
        ),
        (
            "durable_writes_among_local_bursts_are_all_acked",
            durable_writes_among_local_bursts_are_all_acked,
        ),
        (
            "the_bank_folds_copies_gone_idle",
            the_bank_folds_copies_gone_idle,
        ),
    ];
    run::run_tests(tests, true);
}

/// A bank of `n` nodes on this process's threads.
struct Bank(LocalBank);

impl Bank {
    fn start(n: u16, replicas: usize) -> Bank {
        Bank(
            LocalBank::start_any(n, replicas, Secret::from_bytes(SECRET)).expect("the bank starts"),
        )
    }

    /// A counter every node reports, summed over the bank.
    fn counter(&self, name: &str) -> u64 {
        self.0.counter_any(name).expect("the nodes answer")
    }
}

impl std::ops::Deref for Bank {
    type Target = LocalBank;
    fn deref(&self) -> &LocalBank {
        &self.0
    }
}

/// The engine fetches use: the one the tests run on.
fn engine() -> Engine {
    match TestBackend::get() {
        TestBackend::IoUring => Engine::IoUring,
        TestBackend::Epoll => Engine::Epoll,
    }
}

/// A host: its arena's name, removed when dropped.
struct Host(Location);

impl Host {
    fn new(tag: &str) -> Host {
        let loc = Location::Shm(format!("test-host-{tag}-{}", std::process::id()));
        let _ = Arena::remove(&loc);
        Host(loc)
    }

    fn config(&self, bank: &Bank, host_id: u64, capacity: u64) -> HostConfig {
        let mut cfg = HostConfig::new(
            self.0.clone(),
            ArenaConfig::for_sessions(capacity, 1024),
            bank.placement.clone(),
            FailoverConfig::new(host_id, Secret::from_bytes(SECRET)),
        );
        cfg.engine = engine();
        cfg
    }

    fn replicator(&self, bank: &Bank, host_id: u64) -> Replicator {
        let mut cfg =
            ReplicatorConfig::new(bank.placement.clone(), Secret::from_bytes(SECRET), host_id);
        cfg.force_epoll = TestBackend::get().is_epoll();
        Replicator::spawn(&self.0, cfg).unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Arena::remove(&self.0);
    }
}

/// Creates a session on a first host and waits until the bank holds it;
/// the first host is gone when this returns.
fn session_in_bank(bank: &Bank, attrs: &[(&str, &[u8])], opts: NewSession) -> Sid {
    let a = Host::new("origin");
    let sessions = Sessions::open(a.config(bank, 1, 64)).unwrap();
    let repl = a.replicator(bank, 1);
    let sid = sessions.create(opts, attrs).unwrap();
    sessions
        .wait_replicated(sid, 1, Duration::from_secs(10))
        .expect("the bank acks the new session");
    drop(repl);
    sid
}

fn a_miss_fetches_once_for_all_threads() {
    let bank = Bank::start(2, 2);
    let sid = session_in_bank(&bank, &[("user", b"ada")], NewSession::default());
    let fetches_before = bank.counter("fetches");
    let b = Host::new("threads");
    let sessions = Sessions::open(b.config(&bank, 2, 64)).unwrap();
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let mine = sessions.try_clone().unwrap();
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let g = mine.read(sid).expect("every thread reads the session");
                assert_eq!(g.get("user"), Some(&b"ada"[..]));
            });
        }
    });
    let st = sessions.stats();
    assert_eq!(st.fetches, 1, "{st:?}");
    assert_eq!(st.fetched, 1, "{st:?}");
    // The bank was asked by one fetch: its owners (2), and the fetch then
    // told them the new epoch; nothing more.
    assert_eq!(bank.counter("fetches") - fetches_before, 2);
    // Now local.
    assert!(sessions.is_local(sid));
    sessions.read(sid).unwrap();
    assert_eq!(sessions.stats().fetches, 1);
}

/// A worker process: opens the host's sessions, waits for the go file,
/// reads the SID, and prints its counters.
fn reader(args: &[String]) {
    let (loc, addrs, sid, go) = (&args[0], &args[1], &args[2], &args[3]);
    let members = Placement::parse_members(addrs).unwrap();
    let placement = Placement::new(members, 2).unwrap();
    let mut cfg = HostConfig::new(
        Location::Shm(loc.clone()),
        ArenaConfig::for_sessions(64, 1024),
        placement,
        FailoverConfig::new(3, Secret::from_bytes(SECRET)),
    );
    cfg.sweep = None;
    cfg.engine = engine();
    let sessions = Sessions::open(cfg).unwrap();
    let sid: Sid = sid.parse().unwrap();
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(go).exists() {
        assert!(Instant::now() < deadline, "no go in 30 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    let found = sessions
        .read(sid)
        .map(|g| g.get("user").map(<[u8]>::to_vec));
    let st = sessions.stats();
    println!(
        "found={} fetches={} waited={}",
        matches!(found, Ok(Some(ref u)) if u == b"ada"),
        st.fetches,
        st.waited
    );
}

fn processes_of_a_host_wait_for_one_fetch() {
    let bank = Bank::start(2, 2);
    let sid = session_in_bank(&bank, &[("user", b"ada")], NewSession::default());
    let b = Host::new("procs");
    let sessions = Sessions::open(b.config(&bank, 2, 64)).unwrap();
    let Location::Shm(name) = &b.0 else {
        unreachable!()
    };
    // This process claims the fetch, as a worker about to fetch would...
    let claim = match sessions.arena().claim_fetch(sid) {
        FetchClaim::Mine(g) => g,
        FetchClaim::Theirs => panic!("nobody else fetches"),
    };
    let go = std::env::temp_dir().join(format!("sessio-go-{}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let addrs: Vec<String> = bank
        .placement
        .members()
        .iter()
        .map(|m| format!("{}={}", m.id, m.addr))
        .collect();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["reader", name, &addrs.join(","), &sid.to_string()])
                .arg(&go)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // ...and the others, started meanwhile, miss the same SID.
    std::fs::write(&go, b"go").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let arena = sessions.arena();
    on_test_backend!(B => {
        let mut clients = NodeClients::<B>::new(
            FailoverConfig::new(2, Secret::from_bytes(SECRET)),
            std::sync::Arc::new(Singleflight::default()),
        )
        .unwrap();
        fetch_and_install(arena, sid, &bank.placement, &mut clients).unwrap();
    });
    drop(claim);
    let mut waited = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default().to_string();
        assert!(last.contains("found=true"), "{text}");
        assert!(
            last.contains("fetches=0"),
            "a second process fetched: {text}"
        );
        if last.contains("waited=1") {
            waited += 1;
        }
    }
    let _ = std::fs::remove_file(&go);
    assert_eq!(waited, 3, "every process waited for the claimed fetch");
}

fn made_up_sids_cost_a_bounded_query_once() {
    // Five nodes, two copies: a made-up SID asks two owners and at most two
    // stand-ins, never all five.
    let bank = Bank::start(5, 2);
    let h = Host::new("forged");
    let mut cfg = h.config(&bank, 2, 64);
    // Longer than this test runs, however slow the machine.
    cfg.limits.negative_ttl_ms = 600_000;
    let sessions = Sessions::open(cfg).unwrap();
    let before = bank.counter("fetches");
    let forged: Vec<Sid> = (0..200).map(|_| Sid::random()).collect();
    for &sid in &forged {
        assert_eq!(sessions.read(sid).err(), Some(HostError::NotFound));
    }
    let asked = bank.counter("fetches") - before;
    assert!(asked <= 4 * 200, "{asked} node fetches for 200 SIDs");
    assert!(asked >= 2 * 200, "{asked}: every SID asks its owners");
    // Again: the negative cache answers, the bank is not asked.
    for &sid in &forged {
        assert_eq!(sessions.read(sid).err(), Some(HostError::NotFound));
    }
    assert_eq!(bank.counter("fetches") - before, asked);
    let st = sessions.stats();
    assert_eq!(
        (st.fetches, st.not_found, st.negative_hits),
        (200, 200, 200),
        "{st:?}"
    );
}

fn an_empty_fetch_bucket_throttles() {
    let bank = Bank::start(1, 1);
    let h = Host::new("throttle");
    let mut cfg = h.config(&bank, 2, 64);
    cfg.limits.fetches_per_s = 1;
    cfg.limits.fetch_burst = 10;
    let sessions = Sessions::open(cfg).unwrap();
    let before = bank.counter("fetches");
    let results: Vec<_> = (0..50)
        .map(|_| sessions.read(Sid::random()).err())
        .collect();
    let throttled = results
        .iter()
        .filter(|r| **r == Some(HostError::Throttled))
        .count();
    assert_eq!(throttled, 40, "{results:?}");
    assert_eq!(bank.counter("fetches") - before, 10);
    // A second handle of the host shares the bucket.
    let other = sessions.try_clone().unwrap();
    assert_eq!(other.read(Sid::random()).err(), Some(HostError::Throttled));
}

fn expiry_runs_by_itself() {
    let bank = Bank::start(1, 1);
    let h = Host::new("expiry");
    let mut cfg = h.config(&bank, 2, 100);
    cfg.sweep = Some(SweepConfig {
        every_ms: 10,
        pass_ms: 100,
    });
    let sessions = Sessions::open(cfg).unwrap();
    let repl = h.replicator(&bank, 2);
    let capacity = sessions.arena().stats().capacity;
    let opts = NewSession {
        idle_ttl_ms: 100,
        lifetime_ms: 0,
    };
    // Ten times the capacity, faster than the arena could hold them without
    // a sweep, and no sweep call here.
    let mut last = Vec::new();
    let started = Instant::now();
    for i in 0..capacity * 10 {
        let sid = sessions
            .create(opts, &[("n", &i.to_le_bytes())])
            .unwrap_or_else(|e| panic!("create {i} of {}: {e}", capacity * 10));
        last.push(sid);
        if last.len() > 8 {
            last.remove(0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let swept = sessions.stats().swept;
    assert!(swept >= capacity * 8, "swept {swept}");
    // The removals reach the bank: it ends up holding none of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bank.counter("sessions") > 0 {
        assert!(
            Instant::now() < deadline,
            "the bank still holds {}; arena {:?}; replicator {:?}",
            bank.counter("sessions"),
            sessions.arena().stats(),
            repl.stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(repl);
}

fn a_read_session_keeps_its_idle_clock_across_failover() {
    let bank = Bank::start(1, 1);
    let a = Host::new("idle-a");
    let sessions = Sessions::open(a.config(&bank, 1, 64)).unwrap();
    let repl = a.replicator(&bank, 1);
    let opts = NewSession {
        idle_ttl_ms: 800,
        lifetime_ms: 0,
    };
    let sid = sessions.create(opts, &[("user", b"ada")]).unwrap();
    // Only read, for well over the idle TTL.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        sessions.read(sid).expect("a session read in time stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sessions.stats().touches >= 2, "{:?}", sessions.stats());
    let v = sessions.read(sid).unwrap().version();
    sessions
        .wait_replicated(sid, v, Duration::from_secs(5))
        .unwrap();
    drop(repl);
    drop(sessions);
    // The host is gone; another one serves the session's next request.
    let b = Host::new("idle-b");
    let other = Sessions::open(b.config(&bank, 2, 64)).unwrap();
    let g = other
        .read(sid)
        .expect("the session comes up with idle time left");
    assert_eq!(g.get("user"), Some(&b"ada"[..]));
}

fn replicated_updates_wait_for_the_bank() {
    let bank = Bank::start(2, 2);
    let h = Host::new("durable");
    let sessions = Sessions::open(h.config(&bank, 1, 64)).unwrap();
    let repl = h.replicator(&bank, 1);
    let sid = sessions.create(NewSession::default(), &[]).unwrap();
    let set = |v: &[u8]| Op::Set {
        key: "cart".into(),
        value: v.to_vec(),
    };
    let durable = Durability::Replicated {
        timeout: Duration::from_secs(5),
    };
    let v = sessions.update(sid, &[set(b"1")], durable).unwrap();
    assert_eq!(sessions.acks(sid, v).unwrap(), 2, "both owners acked");
    // The bank is gone: a durable update times out, applied locally.
    drop(bank);
    let short = Durability::Replicated {
        timeout: Duration::from_millis(300),
    };
    let t = Instant::now();
    let e = sessions.update(sid, &[set(b"2")], short).unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(e, HostError::NotReplicated { version, acked: 0, wanted: 2 } if version == v + 1),
        "{e:?}"
    );
    assert_eq!(sessions.read(sid).unwrap().get("cart"), Some(&b"2"[..]));
    assert_eq!(sessions.stats().replication_timeouts, 1);
    // A local update does not wait.
    sessions
        .update(sid, &[set(b"3")], Durability::Local)
        .unwrap();
    drop(repl);
}

/// A session updated a few times, then left alone: its copies hold the
/// updates as pending op batches until the nodes' idle pass (every expiry
/// interval, a second by default) folds them in; the record a failover
/// fetches then has every update.
fn the_bank_folds_copies_gone_idle() {
    let bank = Bank::start(2, 2);
    let h = Host::new("idle-fold");
    let sessions = Sessions::open(h.config(&bank, 1, 64)).unwrap();
    let repl = h.replicator(&bank, 1);
    let sid = sessions.create(NewSession::default(), &[]).unwrap();
    let durable = Durability::Replicated {
        timeout: Duration::from_secs(5),
    };
    for i in 0..5u8 {
        let op = Op::Set {
            key: format!("k{i}"),
            value: vec![i; 100],
        };
        sessions.update(sid, &[op], durable).unwrap();
    }
    drop(repl);
    assert_eq!(bank.counter("idle_folds"), 0, "nothing is idle yet");
    // Both owners fold their copy once it has been idle for a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bank.counter("idle_folds") < 2 {
        assert!(Instant::now() < deadline, "no idle fold within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(bank.counter("idle_folds"), 2, "each copy folds once");
    // Another host fails over to the folded copy.
    let b = Host::new("idle-fold-b");
    let other = Sessions::open(b.config(&bank, 2, 64)).unwrap();
    let r = other.read(sid).unwrap();
    for i in 0..5u8 {
        assert_eq!(r.get(&format!("k{i}")), Some(&vec![i; 100][..]));
    }
}

/// Sequential `Replicated` writes between bursts of `Local` ones, as a web
/// host mixes them. A batch is built from the arena, which can be ahead of
/// the version the replicator took: the node's ack of that newer version
/// used to be clamped to the taken one, leaving the newer one marked sent
/// and never acked, and a durable write of it waited out its timeout.
fn durable_writes_among_local_bursts_are_all_acked() {
    let bank = Bank::start(2, 2);
    let h = Host::new("mixed");
    let sessions = Sessions::open(h.config(&bank, 1, 2048)).unwrap();
    let repl = h.replicator(&bank, 1);
    let sids: Vec<Sid> = (0..1000)
        .map(|_| sessions.create(NewSession::default(), &[]).unwrap())
        .collect();
    let durable = Durability::Replicated {
        timeout: Duration::from_secs(2),
    };
    // A fixed sequence of picks (an LCG), the same every run.
    let mut x = 7u64;
    let mut pick = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        sids[(x >> 33) as usize % sids.len()]
    };
    let (mut timeouts, mut durable_writes) = (0, 0);
    let t = Instant::now();
    for round in 0..5u8 {
        for (durability, n) in [(Durability::Local, 400), (durable, 400)] {
            for _ in 0..n {
                let sid = pick();
                let op = Op::Set {
                    key: "cart".into(),
                    value: vec![round; 32],
                };
                match sessions.update(sid, &[op], durability) {
                    Ok(_) => {}
                    Err(HostError::NotReplicated { .. }) => timeouts += 1,
                    Err(e) => panic!("{e}"),
                }
                if durability != Durability::Local {
                    durable_writes += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(t.elapsed() < Duration::from_secs(60), "bounded in time");
    }
    assert_eq!(
        timeouts, 0,
        "{timeouts} of {durable_writes} durable writes waited out their timeout"
    );
    drop(repl);
}

fn a_taken_over_copy_leaves_its_old_host() {
    let bank = Bank::start(2, 2);
    let a = Host::new("moved-a");
    let at_a = Sessions::open(a.config(&bank, 1, 64)).unwrap();
    let _repl_a = a.replicator(&bank, 1);
    let sid = at_a
        .create(NewSession::default(), &[("user", b"ada")])
        .unwrap();
    at_a.wait_replicated(sid, 1, Duration::from_secs(10))
        .unwrap();
    // The session moves to host B (nginx sent a request there), which
    // writes to it.
    let b = Host::new("moved-b");
    let at_b = Sessions::open(b.config(&bank, 2, 64)).unwrap();
    let _repl_b = b.replicator(&bank, 2);
    let set = |v: &[u8]| Op::Set {
        key: "cart".into(),
        value: v.to_vec(),
    };
    let durable = Durability::Replicated {
        timeout: Duration::from_secs(5),
    };
    let v = at_b.update(sid, &[set(b"from b")], durable).unwrap();
    // Host A learns from the bank that its copy is stale, and drops it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while at_a.is_local(sid) {
        assert!(
            Instant::now() < deadline,
            "host A still serves its stale copy: {:?}",
            at_a.arena().stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(at_a.arena().stats().evicted_total, 1);
    // The session comes back to A: fetched, with B's write.
    let g = at_a.read(sid).unwrap();
    assert_eq!(g.get("cart"), Some(&b"from b"[..]));
    assert_eq!(g.version(), v);
    // Two moves (to B, back to A), each seen by both owners.
    assert_eq!(bank.counter("takeovers"), 4);
}
