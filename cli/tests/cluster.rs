//! The failure cases of the design brief with real processes on loopback:
//! `sessio node` replica nodes and `sessio test-host` web hosts, killed with
//! SIGKILL or frozen with SIGSTOP, and in-process hosts (an arena plus a
//! replicator thread) that keep serving and take sessions over.
//!
//! Tests run one at a time (a lock) so their processes do not fight over
//! the two cores; every process and arena is cleaned up by a Drop guard.
//!
//! They run on `io_uring` where it works here, else on epoll, and say which
//! on stderr; `SESSIO_TEST_BACKEND=epoll` runs them on epoll anyway (the
//! nodes, agents and test hosts get `--epoll`, the replicators
//! `force_epoll`). See [`sessio_net::test_backend`].

mod common;

use common::{TestArena, serial, unique};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessio_engine::session::decode_session;
use sessio_engine::{Arena, NewSession, Op, Sid};
use sessio_net::test_backend::TestBackend;
use sessio_net::{
    Backend, Client, ClientConfig, Epoll, Fetch, FoundRecord, Identity, IoUring, Message, Secret,
    StatsRequest, on_test_backend,
};
use sessio_remote::failover::{
    FailoverConfig, FailoverError, Fetched, NodeClients, Singleflight, fetch_and_install,
};
use sessio_remote::placement::{Member, Placement};
use sessio_remote::replicator::{Replicator, ReplicatorConfig, ReplicatorStats};

/// The bank's secret, random per test process: a node of another process
/// that happens to bind a port one of ours just freed (a restarted node's)
/// cannot pass for ours.
static SECRET: std::sync::LazyLock<[u8; 32]> = std::sync::LazyLock::new(|| {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).expect("random bytes");
    s
});
const BIN: &str = env!("CARGO_BIN_EXE_sessio");

/// `--epoll` for the processes a test starts, when the tests run on epoll.
fn engine_flag() -> &'static [&'static str] {
    if TestBackend::get().is_epoll() {
        &["--epoll"]
    } else {
        &[]
    }
}

/// A secret file (owner-only, as tempfile makes it), removed on drop.
struct SecretFile(tempfile::NamedTempFile);

impl SecretFile {
    fn new() -> SecretFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &*SECRET).unwrap();
        SecretFile(f)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

/// A child process, killed with `SIGKILL` and reaped on drop.
struct Proc(Child);

impl Proc {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, sig);
        }
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// A `sessio node` process.
struct Node {
    id: u16,
    addr: SocketAddr,
    proc: Proc,
}

impl Node {
    fn spawn(id: u16, listen: SocketAddr, secret: &SecretFile) -> Node {
        Node::spawn_with(id, listen, secret, &[])
    }

    fn spawn_with(id: u16, listen: SocketAddr, secret: &SecretFile, extra: &[&str]) -> Node {
        let mut child = Command::new(BIN)
            .args(["node", "--listen", &listen.to_string(), "--node-id"])
            .arg(id.to_string())
            .arg("--secret-file")
            .arg(secret.path())
            .args(engine_flag())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sessio node");
        let stdout = child.stdout.take().unwrap();
        let proc = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("node {id} printed {line:?}"));
        Node { id, addr, proc }
    }

    fn restart(&mut self, secret: &SecretFile) {
        self.proc.kill9();
        *self = Node::spawn(self.id, self.addr, secret);
    }
}

fn bank(n: u16, secret: &SecretFile) -> Vec<Node> {
    (1..=n)
        .map(|id| Node::spawn(id, "127.0.0.1:0".parse().unwrap(), secret))
        .collect()
}

fn placement(nodes: &[Node], r: usize) -> Placement {
    let members = nodes
        .iter()
        .map(|n| Member {
            id: n.id,
            addr: n.addr,
        })
        .collect();
    Placement::new(members, r).unwrap()
}

fn nodes_flag(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.addr))
        .collect::<Vec<_>>()
        .join(",")
}

fn replicator(arena: &TestArena, p: &Placement, host_id: u64) -> Replicator {
    let mut cfg = ReplicatorConfig::new(p.clone(), Secret::from_bytes(*SECRET), host_id);
    cfg.ack_timeout_ms = 1000;
    cfg.backoff_max_ms = 200;
    cfg.force_epoll = TestBackend::get().is_epoll();
    Replicator::spawn_with(arena.get().try_clone().unwrap(), cfg).unwrap()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn converged(r: &Replicator) -> bool {
    let s = r.stats();
    s.ticks > 0 && s.dirty == 0 && s.nodes.iter().all(|n| n.pending == 0 && n.in_flight == 0)
}

fn counter(data: &sessio_engine::SessionData) -> i64 {
    i64::from_le_bytes(data.get("n").unwrap().try_into().unwrap())
}

/// A connection to the node at `addr` as host `id`, with this bank's secret.
async fn connect<B: Backend>(addr: SocketAddr, id: u64) -> Client<B> {
    let cc = ClientConfig::new(Identity { id, incarnation: 1 });
    Client::connect(addr, cc, Secret::from_bytes(*SECRET))
        .await
        .unwrap()
}

/// Every node's copy of each SID, fetched over one pipelined connection.
fn node_copies(addr: SocketAddr, sids: &[Sid]) -> Vec<Option<FoundRecord>> {
    on_test_backend!(B => B::block_on(async {
        let mut c = connect::<B>(addr, 999).await;
        let mut out = Vec::with_capacity(sids.len());
        for (i, sid) in sids.iter().enumerate() {
            let msg = Message::Fetch(Fetch {
                request_id: i as u64,
                sid: sid.0,
            });
            c.send_with(&msg, |m| out.push(m)).await.unwrap();
        }
        while out.len() < sids.len() {
            out.push(c.recv().await.unwrap());
        }
        out.into_iter()
            .zip(sids)
            .map(|(m, sid)| match m {
                Message::FetchReply(r) => {
                    assert_eq!(r.sid, sid.0);
                    r.found
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }))
}

fn create_sessions(arena: &Arena, n: usize) -> Vec<Sid> {
    (0..n)
        .map(|_| {
            arena
                .create(
                    NewSession::default(),
                    &[("n", &0i64.to_le_bytes()), ("owner", b"H")],
                )
                .unwrap()
        })
        .collect()
}

fn bump(arena: &Arena, sid: Sid) -> u64 {
    arena
        .update(
            sid,
            &[
                Op::Incr {
                    key: "n".into(),
                    by: 1,
                },
                Op::Set {
                    key: "pad".into(),
                    value: vec![7; 100],
                },
            ],
        )
        .unwrap()
}

/// Updates round-robin for `d`, returning (updates, slowest update).
fn load(arena: &Arena, sids: &[Sid], d: Duration) -> (u64, Duration) {
    let t = Instant::now();
    let (mut n, mut slowest) = (0u64, Duration::ZERO);
    while t.elapsed() < d && n < 200_000 {
        let u = Instant::now();
        bump(arena, sids[n as usize % sids.len()]);
        slowest = slowest.max(u.elapsed());
        n += 1;
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    (n, slowest)
}

/// Asserts every owner holds exactly the arena's version and attributes.
fn assert_owners_match(arena: &Arena, p: &Placement, nodes: &[Node], sids: &[Sid]) {
    for node in nodes {
        let copies = node_copies(node.addr, sids);
        for (sid, copy) in sids.iter().zip(copies) {
            if !p.owners(&sid.0).contains(&node.id) {
                continue;
            }
            let g = arena.read(*sid).unwrap();
            let copy = copy.unwrap_or_else(|| panic!("node {} lacks {sid}", node.id));
            assert_eq!(copy.version, g.version(), "node {} {sid}", node.id);
            let d = decode_session(&copy.record).unwrap();
            assert_eq!(d.attrs, g.to_owned().attrs, "node {} {sid}", node.id);
        }
    }
}

/// A test host's progress: per session, and its replicator's counters.
type Status = (Vec<(Sid, u64, u64)>, Vec<(String, u64)>);

/// Parses a test host's status file: `(sid, last_version, acked)` lines
/// and the stats line's fields.
fn read_status(path: &PathBuf) -> Status {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = Vec::new();
    let mut stats = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"stats") {
            stats = f[1..]
                .chunks(2)
                .map(|c| (c[0].to_string(), c[1].parse().unwrap()))
                .collect();
        } else if f.len() == 3 {
            rows.push((
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            ));
        }
    }
    (rows, stats)
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(n, _)| n == name).map_or(0, |s| s.1)
}

struct TestHost {
    proc: Proc,
    status: PathBuf,
    /// Holds the status file and its temporary twin; removed on drop.
    _dir: tempfile::TempDir,
    _arena: TestArena,
}

impl TestHost {
    fn spawn(
        nodes: &[Node],
        secret: &SecretFile,
        sessions: u64,
        duration_ms: u64,
        owner: &str,
    ) -> TestHost {
        let name = unique("host");
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("status");
        let child = Command::new(BIN)
            .args(["test-host", "--arena", &name, "--nodes", &nodes_flag(nodes)])
            .arg("--secret-file")
            .arg(secret.path())
            .args(["--sessions", &sessions.to_string()])
            .arg("--status")
            .arg(&status)
            .args(["--duration-ms", &duration_ms.to_string(), "--owner", owner])
            .args(["--pace-us", "100", "--host-id", "77"])
            .args(engine_flag())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sessio test-host");
        TestHost {
            proc: Proc(child),
            status,
            _dir: dir,
            _arena: TestArena::foreign(&name),
        }
    }

    fn status(&self) -> Status {
        read_status(&self.status)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGCONT);
        self.proc.kill9();
    }
}

/// A bank of `n` nodes (R = 2) and a host: an arena of `sessions`
/// sessions, updated for `load_for`, replicated by a thread, after the
/// first sync.
struct Cluster {
    secret: SecretFile,
    nodes: Vec<Node>,
    p: Placement,
    host: TestArena,
    repl: Replicator,
    sids: Vec<Sid>,
}

fn synced_cluster(n: u16, sessions: usize, load_for: Duration) -> Cluster {
    let secret = SecretFile::new();
    let nodes = bank(n, &secret);
    let p = placement(&nodes, 2);
    let host = TestArena::new("h", 1000);
    let repl = replicator(&host, &p, 1);
    let sids = create_sessions(host.get(), sessions);
    load(host.get(), &sids, load_for);
    wait_until("first sync", Duration::from_secs(10), || converged(&repl));
    Cluster {
        secret,
        nodes,
        p,
        host,
        repl,
        sids,
    }
}

/// Failover clients of host `host_id`, on the engine the tests run on.
enum Clients {
    IoUring(NodeClients<IoUring>),
    Epoll(NodeClients<Epoll>),
}

impl Clients {
    /// [`fetch_and_install`] through these clients.
    fn fetch(&mut self, arena: &Arena, sid: Sid, p: &Placement) -> Result<Fetched, FailoverError> {
        match self {
            Clients::IoUring(c) => fetch_and_install(arena, sid, p, c),
            Clients::Epoll(c) => fetch_and_install(arena, sid, p, c),
        }
    }
}

fn clients(host_id: u64) -> Clients {
    let config = FailoverConfig::new(host_id, Secret::from_bytes(*SECRET));
    let flights = Arc::new(Singleflight::default());
    match TestBackend::get() {
        TestBackend::IoUring => Clients::IoUring(NodeClients::new(config, flights).unwrap()),
        TestBackend::Epoll => Clients::Epoll(NodeClients::new(config, flights).unwrap()),
    }
}

#[test]
fn host_killed_failover_serves_every_acked_update() {
    let _serial = serial();
    let secret = SecretFile::new();
    let nodes = bank(3, &secret);
    let p = placement(&nodes, 2);
    let mut a = TestHost::spawn(&nodes, &secret, 200, 60_000, "A");
    wait_until("host A to ship updates", Duration::from_secs(20), || {
        a.status.exists() && a.status().0.iter().all(|r| r.2 > 1)
    });
    std::thread::sleep(Duration::from_millis(700));
    a.proc.kill9();
    let (rows, stats) = a.status();
    assert_eq!(stat(&stats, "updating"), 1, "A was killed mid-load");

    let b = TestArena::new("b", 1000);
    let mut cl = clients(2);
    let mut lat = sessio_remote::replicator::Lag::default();
    let (mut lost, mut worst) = (0u64, 0u64);
    for &(sid, last, acked) in &rows {
        let t = Instant::now();
        let f = cl.fetch(b.get(), sid, &p).unwrap();
        lat.record(t.elapsed());
        assert!(
            f.version >= acked,
            "{sid}: fetched v{} < acked v{acked}",
            f.version
        );
        assert_eq!(f.epoch, 2, "installed under the next epoch");
        let g = b.get().read(sid).unwrap();
        let d = g.to_owned();
        assert_eq!(
            counter(&d) as u64,
            g.version() - 1,
            "every update applied once"
        );
        assert_eq!(d.get("owner"), Some(&b"A"[..]));
        let gap = last.saturating_sub(f.version);
        lost += gap;
        worst = worst.max(gap);
    }
    eprintln!(
        "host kill: {} sessions; unacked updates lost: {lost} in all, at most {worst} per session \
         (A's replication lag p50 {} us, p99 {} us, max {} us); failover fetch p50 {} us p99 {} us",
        rows.len(),
        stat(&stats, "lag_p50_us"),
        stat(&stats, "lag_p99_us"),
        stat(&stats, "lag_max_us"),
        lat.quantile_us(0.5),
        lat.quantile_us(0.99),
    );
}

#[test]
fn replica_killed_no_session_lost_and_host_keeps_serving() {
    let _serial = serial();
    let Cluster {
        secret: _secret,
        mut nodes,
        p,
        host,
        repl,
        sids,
    } = synced_cluster(3, 300, Duration::from_millis(300));

    nodes[0].proc.kill9();
    let (n, slowest) = load(host.get(), &sids, Duration::from_secs(1));
    eprintln!("node down: {n} updates, slowest {slowest:?}");
    assert!(n > 200, "host kept serving: {n} updates in 1 s");
    wait_until("node 1 seen down", Duration::from_secs(10), || {
        !repl.stats().nodes[0].up
    });
    wait_until("resync on the survivors", Duration::from_secs(15), || {
        converged(&repl)
    });

    // A new host with only nodes 2 and 3 alive finds every session,
    // current. (Taking them over tells the first host to drop its copies,
    // so their versions are read first.)
    let versions: Vec<u64> = sids
        .iter()
        .map(|&sid| host.get().read(sid).unwrap().version())
        .collect();
    let other = TestArena::new("c", 1000);
    let mut cl = clients(3);
    for (&sid, &v) in sids.iter().zip(&versions) {
        let f = cl.fetch(other.get(), sid, &p).unwrap();
        assert_eq!(f.version, v, "{sid}");
    }
    let s: ReplicatorStats = repl.stats();
    assert!(s.lag_samples > 0);
    drop(repl);
}

#[test]
fn bank_down_under_load_then_every_change_converges() {
    let _serial = serial();
    let Cluster {
        secret,
        mut nodes,
        p,
        host,
        repl,
        sids,
    } = synced_cluster(2, 200, Duration::ZERO);

    for n in &mut nodes {
        n.proc.kill9();
    }
    let (n, slowest) = load(host.get(), &sids, Duration::from_secs(2));
    eprintln!("bank down: {n} updates, slowest {slowest:?}");
    assert!(n > 400, "host kept serving with the bank down: {n} updates");
    assert!(repl.stats().nodes.iter().all(|n| !n.up));
    assert!(
        repl.stats().dirty > 0,
        "changes are kept while the bank is down"
    );

    for n in &mut nodes {
        n.restart(&secret);
    }
    let t = Instant::now();
    wait_until(
        "resync after the bank returns",
        Duration::from_secs(20),
        || converged(&repl),
    );
    eprintln!("bank back: converged in {:?}", t.elapsed());
    assert_owners_match(host.get(), &p, &nodes, &sids);
}

#[test]
fn node_restarted_empty_gets_its_whole_share_again() {
    let _serial = serial();
    let Cluster {
        secret,
        mut nodes,
        p,
        host,
        repl,
        sids,
    } = synced_cluster(3, 300, Duration::from_millis(200));

    // No updates from here on: only the new incarnation can trigger a resend.
    nodes[1].restart(&secret);
    let mine: Vec<Sid> = sids
        .iter()
        .copied()
        .filter(|s| p.owners(&s.0).contains(&2))
        .collect();
    assert!(!mine.is_empty());
    wait_until(
        "node 2 to hold its share again",
        Duration::from_secs(15),
        || {
            node_copies(nodes[1].addr, &mine)
                .iter()
                .all(Option::is_some)
        },
    );
    wait_until("replicator settles", Duration::from_secs(10), || {
        converged(&repl)
    });
    assert_eq!(repl.stats().nodes[1].new_incarnations, 1);
    assert_owners_match(host.get(), &p, &nodes, &sids);
}

#[test]
fn old_owner_late_deltas_are_fenced() {
    let _serial = serial();
    let secret = SecretFile::new();
    let nodes = bank(2, &secret);
    let p = placement(&nodes, 2);
    let a = TestHost::spawn(&nodes, &secret, 20, 60_000, "A");
    wait_until("host A to ship updates", Duration::from_secs(20), || {
        a.status.exists() && a.status().0.iter().all(|r| r.2 > 1)
    });
    // A partition, not a death: A stops, with updates in flight.
    a.proc.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    let (rows, _) = a.status();
    let sids: Vec<Sid> = rows.iter().map(|r| r.0).collect();

    // Host B takes every session over and writes to it.
    let b = TestArena::new("b", 100);
    let repl_b = replicator(&b, &p, 2);
    let mut cl = clients(2);
    for &sid in &sids {
        let f = cl.fetch(b.get(), sid, &p).unwrap();
        assert_eq!(f.epoch, 2);
        assert_eq!(f.fenced, 2, "both owners hold the new epoch");
        b.get()
            .update(
                sid,
                &[Op::Set {
                    key: "owner".into(),
                    value: b"B".to_vec(),
                }],
            )
            .unwrap();
    }
    wait_until("B's writes acked", Duration::from_secs(10), || {
        converged(&repl_b)
    });

    // A wakes up and carries on shipping its own, older-epoch updates.
    a.proc.signal(libc::SIGCONT);
    wait_until("A's late deltas fenced", Duration::from_secs(15), || {
        stat(&a.status().1, "fenced") > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    for node in &nodes {
        for (sid, copy) in sids.iter().zip(node_copies(node.addr, &sids)) {
            let copy = copy.unwrap();
            let g = b.get().read(*sid).unwrap();
            assert_eq!(copy.epoch, 2, "node {} {sid}", node.id);
            assert_eq!(copy.version, g.version(), "node {} {sid}", node.id);
            let d = decode_session(&copy.record).unwrap();
            assert_eq!(
                d.get("owner"),
                Some(&b"B"[..]),
                "node {} kept B's copy",
                node.id
            );
        }
    }
    eprintln!(
        "fenced: A got {} fenced acks",
        stat(&a.status().1, "fenced")
    );
}

#[test]
fn node_survives_bad_peers_and_refuses_bad_records() {
    use sessio_net::{AckStatus, Delta, DeltaBatch, DeltaEntry};
    let _serial = serial();
    let secret = SecretFile::new();
    let nodes = bank(1, &secret);
    let addr = nodes[0].addr;
    // A stranger sends garbage, and a peer with the wrong key tries in.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&[0xFF; 4096]);
    }
    let wrong = on_test_backend!(B => B::block_on(async {
        let cc = ClientConfig::new(Identity {
            id: 5,
            incarnation: 1,
        });
        Client::<B>::connect(addr, cc, Secret::from_bytes([1; 32]))
            .await
            .map(drop)
    }));
    assert!(wrong.is_err(), "a wrong key is refused");
    // Records and ops that do not validate are refused, one by one.
    let reply = on_test_backend!(B => B::block_on(async {
        let mut c = connect::<B>(addr, 5).await;
        let entry = |body| DeltaEntry {
            sid: [9; 16],
            base_version: 0,
            new_version: 1,
            epoch: 1,
            body,
        };
        let batch = DeltaBatch {
            host_id: 5,
            entries: vec![
                entry(Delta::Full(vec![0xAB; 300])),
                entry(Delta::Ops(vec![1; 10])),
            ],
        };
        c.call(&Message::DeltaBatch(batch)).await.unwrap()
    }));
    let Message::Ack(ack) = reply else {
        panic!("expected an ack, got {reply:?}")
    };
    assert_eq!(ack.entries[0].status, AckStatus::Refused);
    assert_eq!(
        ack.entries[1].status,
        AckStatus::NeedFull,
        "no base to apply ops on"
    );
    assert!(node_copies(addr, &[Sid([9; 16])])[0].is_none());
}

/// A node's `applied` counter (delta entries applied or acknowledged as
/// replays since it started).
fn node_applied(addr: SocketAddr) -> u64 {
    let reply = on_test_backend!(B => B::block_on(async {
        let mut c = connect::<B>(addr, 999).await;
        c.call(&Message::StatsRequest(StatsRequest { request_id: 1 }))
            .await
            .unwrap()
    }));
    let Message::Stats(s) = reply else {
        panic!("expected stats, got {reply:?}")
    };
    s.counters
        .iter()
        .find(|c| c.name == "applied")
        .map(|c| c.value)
        .expect("an applied counter")
}

/// A `sessio agent` process replicating `arena`.
fn agent(arena: &str, nodes: &[Node], secret: &SecretFile) -> Proc {
    let child = Command::new(BIN)
        .args(["agent", "--arena", arena, "--nodes", &nodes_flag(nodes)])
        .arg("--secret-file")
        .arg(secret.path())
        .args([
            "--replicas",
            "2",
            "--host-id",
            "5",
            "--stats-interval-ms",
            "0",
        ])
        .args(engine_flag())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sessio agent");
    Proc(child)
}

/// Whether the arena records an ack of `version` from every node for every SID.
fn all_acked(arena: &Arena, nodes: &[Node], sids: &[Sid], version: u64) -> bool {
    sids.iter().all(|&sid| {
        let acks = arena.acked(sid).unwrap();
        nodes.iter().all(|n| acks.contains(&(n.id, version)))
    })
}

#[test]
fn restarted_agent_resends_only_what_changed() {
    let _serial = serial();
    let secret = SecretFile::new();
    let mut nodes = bank(2, &secret);
    let host = TestArena::new("agent", 1000);
    let name = host.name.clone();
    let sids = create_sessions(host.get(), 500);
    let mut first = agent(&name, &nodes, &secret);
    wait_until("the first agent's acks", Duration::from_secs(15), || {
        all_acked(host.get(), &nodes, &sids, 1)
    });
    let before: Vec<u64> = nodes.iter().map(|n| node_applied(n.addr)).collect();
    assert!(before.iter().all(|&a| a >= 500), "{before:?}");

    // Killed mid-life; ten sessions change while no agent runs.
    first.kill9();
    let changed = &sids[..10];
    for &sid in changed {
        assert_eq!(bump(host.get(), sid), 2);
    }
    let second = agent(&name, &nodes, &secret);
    wait_until(
        "the changed sessions' acks",
        Duration::from_secs(15),
        || all_acked(host.get(), &nodes, changed, 2),
    );
    // Anything resent would be in flight with the changes: give it time.
    std::thread::sleep(Duration::from_millis(500));
    for (n, b) in nodes.iter().zip(&before) {
        let more = node_applied(n.addr) - b;
        assert!(
            (10..50).contains(&more),
            "node {} applied {more} entries after the restart, for 10 changed sessions",
            n.id
        );
    }
    assert!(all_acked(host.get(), &nodes, &sids[10..], 1));
    assert_owners_match(host.get(), &placement(&nodes, 2), &nodes, &sids);

    // A node that restarted empty while no agent ran gets its whole share
    // from the next agent; the other node gets nothing again.
    drop(second);
    let other_before = node_applied(nodes[1].addr);
    nodes[0].restart(&secret);
    let _third = agent(&name, &nodes, &secret);
    wait_until(
        "node 1 to hold every session",
        Duration::from_secs(15),
        || {
            node_copies(nodes[0].addr, &sids)
                .iter()
                .all(Option::is_some)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let more = node_applied(nodes[1].addr) - other_before;
    assert!(more < 50, "node 2 applied {more} entries it already held");
    assert_owners_match(host.get(), &placement(&nodes, 2), &nodes, &sids);
}

/// How many of `sids` each node holds without owning them (hinted copies).
fn hinted_copies(p: &Placement, nodes: &[Node], sids: &[Sid]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| {
            let foreign: Vec<Sid> = sids
                .iter()
                .copied()
                .filter(|s| !p.owners(&s.0).contains(&n.id))
                .collect();
            node_copies(n.addr, &foreign)
                .iter()
                .filter(|c| c.is_some())
                .count()
        })
        .collect()
}

#[test]
fn paused_owner_gets_its_writes_back_and_stand_ins_drop_them() {
    let _serial = serial();
    let Cluster {
        secret: _secret,
        nodes,
        p,
        host,
        repl,
        sids,
    } = synced_cluster(3, 300, Duration::ZERO);
    assert_eq!(hinted_copies(&p, &nodes, &sids), [0, 0, 0]);

    // Node 1 freezes (same process, same incarnation, when it thaws): its
    // writes go to the next node in each ranking meanwhile.
    nodes[0].proc.signal(libc::SIGSTOP);
    let mut updates = 0;
    wait_until("node 1 seen down", Duration::from_secs(10), || {
        updates += load(host.get(), &sids, Duration::from_millis(100)).0;
        !repl.stats().nodes[0].up
    });
    load(host.get(), &sids, Duration::from_millis(300));
    wait_until(
        "stand-ins take node 1's writes",
        Duration::from_secs(10),
        || converged(&repl),
    );
    let owed = repl.stats().nodes[0].owed;
    let hinted = hinted_copies(&p, &nodes[1..], &sids);
    assert!(owed > 0, "node 1 is owed its writes");
    assert!(
        hinted.iter().sum::<usize>() > 0,
        "stand-ins hold hinted copies: {hinted:?}"
    );

    nodes[0].proc.signal(libc::SIGCONT);
    wait_until("node 1 back", Duration::from_secs(10), || {
        let s = repl.stats();
        s.nodes[0].up && s.nodes[0].owed == 0 && converged(&repl)
    });
    assert_eq!(
        repl.stats().nodes[0].new_incarnations,
        0,
        "same process, same incarnation"
    );
    assert_owners_match(host.get(), &p, &nodes, &sids);
    wait_until(
        "stand-ins drop the hinted copies",
        Duration::from_secs(10),
        || hinted_copies(&p, &nodes, &sids) == [0, 0, 0],
    );
    assert_owners_match(host.get(), &p, &nodes, &sids);
}

#[test]
fn node_on_two_threads_is_one_store_for_every_connection() {
    use sessio_net::{Delta, DeltaBatch, DeltaEntry};
    let _serial = serial();
    let secret = SecretFile::new();
    let node = Node::spawn_with(
        1,
        "127.0.0.1:0".parse().unwrap(),
        &secret,
        &["--threads", "2"],
    );
    let comms: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", node.proc.0.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        comms.iter().any(|c| c.trim() == "node-1-1"),
        "a second serving thread: {comms:?}"
    );
    let record =
        sessio_engine::session::encode_session(&sessio_engine::SessionData::default()).to_vec();
    let sids: Vec<Sid> = (0..64u8).map(|i| Sid([i; 16])).collect();
    on_test_backend!(B => B::block_on(async {
        let mut conns = Vec::new();
        for host in 0..6u64 {
            let c = connect::<B>(node.addr, 100 + host).await;
            conns.push(c);
        }
        // Each connection writes its part of the SIDs...
        for (k, chunk) in sids.chunks(11).enumerate() {
            let batch = DeltaBatch {
                host_id: 100 + k as u64,
                entries: chunk
                    .iter()
                    .map(|s| DeltaEntry {
                        sid: s.0,
                        base_version: 0,
                        new_version: 5,
                        epoch: 1,
                        body: Delta::Full(record.clone()),
                    })
                    .collect(),
            };
            let entries = batch.entries.len();
            let reply = conns[k].call(&Message::DeltaBatch(batch)).await.unwrap();
            // Every entry applied at the version it named: the short answer.
            assert!(
                matches!(reply, Message::AllApplied(a) if a.entries as usize == entries),
                "{reply:?}"
            );
        }
        // ...and every connection sees every copy.
        for c in &mut conns {
            for (i, s) in sids.iter().enumerate() {
                let reply = c
                    .call(&Message::Fetch(Fetch {
                        request_id: i as u64,
                        sid: s.0,
                    }))
                    .await
                    .unwrap();
                let Message::FetchReply(r) = reply else {
                    panic!("{reply:?}")
                };
                assert_eq!(r.found.map(|f| f.version), Some(5), "{s}");
            }
        }
        let reply = conns[0]
            .call(&Message::StatsRequest(StatsRequest { request_id: 1 }))
            .await
            .unwrap();
        let Message::Stats(st) = reply else {
            panic!("{reply:?}")
        };
        let sessions = st
            .counters
            .iter()
            .find(|c| c.name == "sessions")
            .unwrap()
            .value;
        assert_eq!(sessions, 64);
    }));
}

#[test]
fn node_drops_expired_copies_on_its_own() {
    use sessio_net::{Delta, DeltaBatch, DeltaEntry};
    let _serial = serial();
    let secret = SecretFile::new();
    let node = Node::spawn_with(
        1,
        "127.0.0.1:0".parse().unwrap(),
        &secret,
        &["--expiry-grace-ms", "0"],
    );
    let now = sessio_engine::clock::now_ms();
    let record = |expires_at_ms: u64| {
        sessio_engine::session::encode_session(&sessio_engine::SessionData {
            updated_ms: now,
            expires_at_ms,
            ..Default::default()
        })
        .to_vec()
    };
    let (gone, kept) = (Sid([1; 16]), Sid([2; 16]));
    on_test_backend!(B => B::block_on(async {
        let mut c = connect::<B>(node.addr, 7).await;
        let entry = |sid: Sid, expires| DeltaEntry {
            sid: sid.0,
            base_version: 0,
            new_version: 1,
            epoch: 1,
            body: Delta::Full(record(expires)),
        };
        let batch = DeltaBatch {
            host_id: 7,
            entries: vec![entry(gone, now - 1), entry(kept, now + 3_600_000)],
        };
        c.call(&Message::DeltaBatch(batch)).await.unwrap();
    }));
    wait_until("the expired copy to go", Duration::from_secs(5), || {
        node_copies(node.addr, &[gone])[0].is_none()
    });
    assert!(node_copies(node.addr, &[kept])[0].is_some());
}

#[test]
fn agent_killed_at_random_points_under_load_then_the_bank_converges() {
    let _serial = serial();
    let secret = SecretFile::new();
    let mut nodes = bank(2, &secret);
    let p = placement(&nodes, 2);
    let host = TestArena::new("agentkill", 1000);
    let name = host.name.clone();
    let sids = create_sessions(host.get(), 700);
    let mut seed = u64::from(std::process::id()) ^ sessio_engine::clock::now_ms();
    eprintln!("seed {seed}");
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Half the sessions change all along; the other half never again, so
    // only a correct resend (never a later update) brings them back to a
    // node that lost them.
    let busy = &sids[..100];
    for round in 0..8 {
        let mut a = agent(&name, &nodes, &secret);
        // Kill it at a random point: while it starts, syncs, or ships.
        let (n, _) = load(host.get(), busy, Duration::from_millis(20 + rand(300)));
        if round % 2 == 1 {
            // A node restarts empty while an agent runs; that agent and
            // the next ones are killed soon after they start, maybe after
            // one saw the new incarnation and before it resent the share.
            nodes[round % 4 / 2].restart(&secret);
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(rand(40)));
                a.kill9();
                a = agent(&name, &nodes, &secret);
            }
        }
        a.kill9();
        eprintln!("round {round}: {n} updates, agent killed");
    }
    if rand(2) == 0 {
        // And once while no agent runs.
        nodes[0].restart(&secret);
    }
    let _last = agent(&name, &nodes, &secret);
    // Asked of the nodes, not of the arena: until the agent meets a node
    // that restarted, the arena still shows that node's old acks.
    let versions: Vec<u64> = sids
        .iter()
        .map(|&s| host.get().read(s).unwrap().version())
        .collect();
    wait_until(
        "every node to hold every current version",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                node_copies(n.addr, &sids)
                    .iter()
                    .zip(&versions)
                    .all(|(c, &v)| c.as_ref().is_some_and(|c| c.version == v))
            })
        },
    );
    assert_owners_match(host.get(), &p, &nodes, &sids);
    // And the arena's acks say so, once the agent has heard back.
    wait_until("the arena's acks", Duration::from_secs(10), || {
        sids.iter().zip(&versions).all(|(&sid, &v)| {
            let acks = host.get().acked(sid).unwrap();
            nodes.iter().all(|n| acks.contains(&(n.id, v)))
        })
    });
}

/// Raises this process's soft limit on open files to `want` (or the hard
/// limit): the flood below holds a thousand sockets.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = want.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
}

/// The counters a node reports (its store's and its transport's `net_*`).
fn node_stats(addr: SocketAddr) -> Vec<(String, u64)> {
    on_test_backend!(B => B::block_on(async {
        let mut c = connect::<B>(addr, 998).await;
        match c
            .call(&Message::StatsRequest(StatsRequest { request_id: 1 }))
            .await
            .unwrap()
        {
            Message::Stats(s) => s.counters.into_iter().map(|c| (c.name, c.value)).collect(),
            other => panic!("not stats: {other:?}"),
        }
    }))
}

/// One unauthenticated peer of the flood: connected from `from`, it sends
/// nothing (idle) or the first bytes of a real handshake, one every 400 ms
/// (trickling), and is reopened whenever the node closes it.
struct Intruder {
    socket: Option<std::net::TcpStream>,
    sent: usize,
    trickle: bool,
}

fn intrude(from: std::net::IpAddr, to: SocketAddr) -> Option<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(from, 0).into()).ok()?;
    s.connect_timeout(&to.into(), Duration::from_millis(500))
        .ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s.into())
}

/// Whether the node closed `s` (or reset it).
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 64];
    // End of stream, or a Reject frame (the node is closing it), or a reset.
    s.read(&mut b)
        .map_or_else(|e| e.kind() != std::io::ErrorKind::WouldBlock, |_| true)
}

/// 1000 unauthenticated connections from another address, half idle, half
/// trickling a handshake, each reopened as soon as the node closes it,
/// while a host replicates: the host keeps replicating with bounded lag, a
/// new client still gets in, and the node counts what it evicted.
#[test]
fn a_flood_of_unauthenticated_peers_does_not_lock_hosts_out() {
    let _serial = serial();
    raise_nofile(4096);
    let secret = SecretFile::new();
    let node = Node::spawn_with(
        1,
        "127.0.0.1:0".parse().unwrap(),
        &secret,
        &["--connections-max", "2048"],
    );
    let addr = node.addr;
    let nodes = vec![node];
    let p = placement(&nodes, 1);
    let arena = TestArena::new("flood", 1000);
    let repl = replicator(&arena, &p, 7);
    let sids = create_sessions(arena.get(), 100);
    wait_until("the first sync", Duration::from_secs(20), || {
        converged(&repl)
    });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hello = sessio_net::frame::header_bytes(sessio_net::FrameKind::Hello, &[0; 48]);
    let flood: Vec<_> = (0..4)
        .map(|t| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                use std::io::Write;
                let from: std::net::IpAddr = "127.0.0.2".parse().unwrap();
                let mut peers: Vec<Intruder> = (0..250)
                    .map(|i| Intruder {
                        socket: intrude(from, addr),
                        sent: 0,
                        trickle: (t + i) % 2 == 0,
                    })
                    .collect();
                let (mut opened, mut round) = (250u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    round += 1;
                    for p in &mut peers {
                        let gone = p.socket.as_mut().is_none_or(closed_by_peer);
                        if gone {
                            p.socket = intrude(from, addr);
                            p.sent = 0;
                            opened += 1;
                        } else if p.trickle && round % 8 == 0 && p.sent < hello.len() {
                            let s = p.socket.as_mut().expect("checked above");
                            if s.write_all(&hello[p.sent..=p.sent]).is_ok() {
                                p.sent += 1;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                opened
            })
        })
        .collect();
    // Let the flood fill every handshake slot.
    std::thread::sleep(Duration::from_secs(2));

    // The host keeps replicating: an update every 2 ms for 6 s, all acked.
    let (updates, _) = load(arena.get(), &sids, Duration::from_secs(6));
    wait_until(
        "every update acked during the flood",
        Duration::from_secs(10),
        || converged(&repl),
    );
    let st = repl.stats();
    // A new client (a failover fetch, the metrics exporter) gets in too.
    let other_host = TestArena::new("flood-b", 1000);
    let mut found = clients(8).fetch(other_host.get(), sids[0], &p);
    for _ in 0..2 {
        // A real client retries once or twice, as a host does.
        if found.is_ok() {
            break;
        }
        found = clients(8).fetch(other_host.get(), sids[0], &p);
    }
    let stats = node_stats(addr);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened: u64 = flood.into_iter().map(|h| h.join().unwrap()).sum();
    eprintln!(
        "flood: {opened} unauthenticated connections opened, {updates} updates, lag p99 {} µs max {} µs, node: {stats:?}",
        st.lag_p99_us, st.lag_max_us
    );
    assert!(opened >= 1000, "the flood opened only {opened} connections");
    assert!(updates > 1000, "only {updates} updates went through");
    assert!(st.nodes[0].up, "the link went down: {st:?}");
    assert!(
        st.lag_p99_us < 2_000_000,
        "lag p99 {} µs under the flood",
        st.lag_p99_us
    );
    assert!(found.is_ok(), "a new client was locked out: {found:?}");
    let evicted = stat(&stats, "net_evicted") + stat(&stats, "net_refused");
    assert!(
        evicted >= 100,
        "the node evicted or refused only {evicted}: {stats:?}"
    );
    assert!(stat(&stats, "net_handshaking") <= 64, "{stats:?}");
}

/// `sessio fetch` tells an operator what each node holds of a session,
/// without installing it anywhere or fencing its owner: the host's next
/// update is still applied by the bank.
#[test]
fn fetch_shows_each_nodes_copy_and_changes_nothing() {
    let _serial = serial();
    let secret = SecretFile::new();
    let nodes = bank(2, &secret);
    let p = placement(&nodes, 1);
    let arena = TestArena::new("fetch-cli", 100);
    let repl = replicator(&arena, &p, 3);
    let sids = create_sessions(arena.get(), 1);
    let v = bump(arena.get(), sids[0]);
    wait_until("the copy is acked", Duration::from_secs(20), || {
        converged(&repl)
    });
    let out = Command::new(BIN)
        .args([
            "fetch",
            &sids[0].to_string(),
            "--nodes",
            &nodes_flag(&nodes),
        ])
        .arg("--secret-file")
        .arg(secret.path())
        .args(["--replicas", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner = p.owners(&sids[0].0)[0];
    assert!(
        text.contains(&format!("node {owner} ("))
            && text.contains(&format!("owner): version {v}  epoch 1")),
        "{text}"
    );
    assert!(text.contains("other): no copy"), "{text}");
    // Nothing was fenced: the host's next update is applied as usual.
    let v2 = bump(arena.get(), sids[0]);
    wait_until("the next update is acked", Duration::from_secs(20), || {
        arena.get().acked(sids[0]).unwrap().contains(&(owner, v2))
    });
    assert_eq!(repl.stats().nodes.iter().map(|n| n.fenced).sum::<u64>(), 0);
}
