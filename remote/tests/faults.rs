//! Real network faults between hosts and the bank, as root: every node runs
//! as a child process (this binary again, in `node` mode) in a network
//! namespace of its own, joined to the test's namespace by veth pairs; the
//! hosts (an arena plus a [`Replicator`]) run in this process.
//!
//! Scenarios, each a few seconds:
//!
//! 1. `partition_then_heal`: every link from the host to the bank down
//!    (`ip link set ... down`), then up again;
//! 2. `one_node_cut_off_from_one_host`: node 1 unreachable from host A only,
//!    host B (other links) still reaches it;
//! 3. `delay_and_loss`: 50 ms each way and 5% "loss" on every bank link,
//!    through a relay in this process (see [`Relay`]: this kernel class has
//!    no `sch_netem`, so a relay emulates what loss does to a TCP stream);
//! 4. `a_long_delay_sends_each_change_once`: 100 ms each way through the
//!    relay, sessions changing while several batches are in flight: no
//!    change is sent twice (the resend storm's regression test);
//! 5. `a_node_paused_past_every_timeout`: `SIGSTOP` for longer than the
//!    replicator's ack, handshake and slow-node timeouts, then `SIGCONT`;
//! 6. `nodes_restarted_during_a_resync`: a node comes back from a
//!    partition and is killed (`SIGKILL`) and restarted empty while its
//!    backlog is being resent, and so is a second node;
//! 7. `a_node_slowed_to_1_mbit`: `tc qdisc ... tbf rate 1mbit` on both ends
//!    of one node's link;
//! 8. `a_pre_auth_flood`: 1000 unauthenticated connections, idle or
//!    trickling a handshake, from another namespace, against a node while
//!    a host replicates to it.
//!
//! Each checks that the host never blocks (no update takes more than
//! [`UPDATE_MAX`]), that the lag stays bounded while links are degraded
//! (`oldest_unacked_us`, the lag histogram), that everything converges
//! within a stated time once the fault is healed, and that nothing the bank
//! acknowledged is lost: after convergence every session's owners hold its
//! current version, which is at least the highest version the arena ever
//! showed as acknowledged by `R` nodes.
//!
//! `SESSIO_SOAK_S=600` runs instead one `soak` test that loops the
//! scenarios on one bank for that long, and checks that the RSS of the host
//! process and of a node that is never restarted grows by at most 10% after
//! the first round (warm-up), that neither leaks descriptors, and that
//! node 1 holds no copy of a session once the round's hosts ended it.
//!
//! These tests need root (namespaces, links, qdiscs) and `ip`/`tc`
//! (iproute2); without them they fail, they do not skip. Namespaces and
//! links are named after this process's id and removed by Drop guards, even
//! when a check fails; a run killed outright leaves namespaces that the
//! next run removes.

#![allow(clippy::cast_precision_loss, clippy::too_many_lines)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};
use sessio_net::test_backend::TestBackend;
use sessio_net::{
    Backend, Client, ClientConfig, Fetch, Identity, Message, Secret, StatsRequest, on_test_backend,
};
use sessio_remote::node::{NodeConfig, serve};
use sessio_remote::placement::{Member, Placement};
use sessio_remote::replicator::{Replicator, ReplicatorConfig, ReplicatorStats};

/// A scenario: the lab, how long its fault lasts; its figures.
type Scenario = fn(&mut Lab, Duration) -> Figures;

const SECRET: [u8; 32] = [0x5f; 32];
/// Every node listens on this port, in its own namespace.
const PORT: u16 = 7700;
/// The longest an update may take: a host never waits for the bank.
const UPDATE_MAX: Duration = Duration::from_millis(50);
/// Sessions per host.
const SESSIONS: usize = 200;
/// The replicator's ack timeout here (a node silent this long is down).
const ACK_TIMEOUT_MS: u64 = 1000;
/// How long after a heal everything must have converged.
const CONVERGE_MAX: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("node") => return node_mode(&args[2..]),
        Some("flood") => return flood_mode(&args[2..]),
        _ => {}
    }
    let soak_s: Option<u64> = std::env::var("SESSIO_SOAK_S")
        .ok()
        .map(|s| s.parse().expect("SESSIO_SOAK_S is a number of seconds"));
    let scenarios: Vec<(&'static str, Scenario)> = vec![
        ("partition_then_heal", partition_then_heal),
        (
            "one_node_cut_off_from_one_host",
            one_node_cut_off_from_one_host,
        ),
        ("delay_and_loss", delay_and_loss),
        (
            "a_long_delay_sends_each_change_once",
            a_long_delay_sends_each_change_once,
        ),
        (
            "a_node_paused_past_every_timeout",
            a_node_paused_past_every_timeout,
        ),
        (
            "nodes_restarted_during_a_resync",
            nodes_restarted_during_a_resync,
        ),
        ("a_node_slowed_to_1_mbit", a_node_slowed_to_1_mbit),
        ("a_pre_auth_flood", a_pre_auth_flood),
    ];
    let mut run = libtest_mimic::Arguments::from_args();
    // One at a time: each builds a bank of its own, and they share 2 cores.
    run.test_threads = Some(1);
    let trials = if let Some(secs) = soak_s {
        vec![libtest_mimic::Trial::test("soak", move || {
            preflight()?;
            soak(&scenarios, Duration::from_secs(secs));
            Ok(())
        })]
    } else {
        scenarios
            .into_iter()
            .map(|(name, f)| {
                libtest_mimic::Trial::test(name, move || {
                    preflight()?;
                    let mut lab = Lab::new();
                    let figures = f(&mut lab, Duration::from_secs(3));
                    eprintln!("faults: {name}: {figures}");
                    Ok(())
                })
            })
            .collect()
    };
    libtest_mimic::run(&run, trials).exit();
}

/// Root and iproute2, or a loud failure: these tests never pass unrun.
fn preflight() -> Result<(), libtest_mimic::Failed> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Err(format!(
            "these tests create network namespaces, veth links and qdiscs and need root \
             (effective uid here: {euid}); CI runs them as root"
        )
        .into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool)
            .arg("-V")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Err(format!("`{tool}` (iproute2) is needed and missing").into());
        }
    }
    sweep_stale_namespaces();
    Ok(())
}

// ---------------------------------------------------------------------------
// Child modes.

/// A node: serves on `0.0.0.0:PORT` in whatever namespace it was started
/// in, until killed. Args: node id, connection cap.
fn node_mode(args: &[String]) {
    let id: u16 = args[0].parse().unwrap();
    let mut cfg = NodeConfig::new(SocketAddr::from(([0, 0, 0, 0], PORT)), id);
    cfg.connections_max = args[1].parse().unwrap();
    raise_nofile(u64::from(cfg.connections_max) + 256);
    let secret = Secret::from_bytes(SECRET);
    let on_bound = |addr: SocketAddr, inc: u64| {
        println!("listening {addr} {inc}");
        std::io::stdout().flush().unwrap();
    };
    let forever = std::future::pending::<()>();
    on_test_backend!(B => serve::<B>(&cfg, secret, on_bound, forever))
        .unwrap_or_else(|e| panic!("node {id}: {e}"));
}

/// The flood: `count` unauthenticated connections to `addr`, half idle,
/// half trickling a handshake one byte every 400 ms, each reopened as soon
/// as the node closes it, for `secs`. Prints how many it opened.
fn flood_mode(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap();
    let count: usize = args[1].parse().unwrap();
    let secs: u64 = args[2].parse().unwrap();
    raise_nofile(count as u64 + 256);
    let hello = sessio_net::frame::header_bytes(sessio_net::FrameKind::Hello, &[0; 48]);
    let open = || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut peers: Vec<(Option<TcpStream>, usize)> = (0..count).map(|_| (open(), 0)).collect();
    let mut opened = count as u64;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        for (i, (sock, sent)) in peers.iter_mut().enumerate() {
            let gone = sock.as_mut().is_none_or(|s| {
                let mut b = [0u8; 64];
                s.read(&mut b)
                    .map_or_else(|e| e.kind() != std::io::ErrorKind::WouldBlock, |_| true)
            });
            if gone {
                *sock = open();
                *sent = 0;
                opened += 1;
            } else if i % 2 == 0
                && round.is_multiple_of(8)
                && *sent < hello.len()
                && let Some(s) = sock.as_mut()
                && s.write_all(&hello[*sent..=*sent]).is_ok()
            {
                *sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("opened={opened}");
}

fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to an rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        if lim.rlim_max < want {
            lim.rlim_max = want; // root may raise the hard limit
        }
        lim.rlim_cur = lim.rlim_cur.max(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
}

// ---------------------------------------------------------------------------
// The lab: namespaces, links, node processes.

/// Runs `ip` (or `tc`) and panics with its error output if it fails.
fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same, ignoring failure (cleanup).
fn sh_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

const NS_PREFIX: &str = "sessio-faults-";

/// Removes namespaces left by runs of this test that were killed outright.
fn sweep_stale_namespaces() {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            sh_quiet("ip", &["netns", "del", name]);
        }
    }
}

/// A network namespace, deleted on drop (with the links in it, and so
/// their peers in this namespace).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        sh_quiet("ip", &["netns", "del", &self.0]);
    }
}

/// A child process, resumed, killed and reaped on drop.
struct Proc {
    child: Child,
    reaped: bool,
}

impl Proc {
    fn new(child: Child) -> Proc {
        Proc {
            child,
            reaped: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: libc::c_int) {
        if self.reaped {
            return;
        }
        // SAFETY: a plain kill(2) of our own child, not yet reaped (so its
        // pid cannot have been reused).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// Starts this binary in `mode` inside namespace `ns`, dying with this
/// process's thread if that goes first.
fn spawn_in(ns: &str, mode: &str, args: &[String]) -> Child {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .arg(mode)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child
    // between fork and exec. `ip netns exec` execs the command in place,
    // so the signal reaches the node itself.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn ip netns exec")
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// Three nodes, each in a namespace with two links to this one (`a` links
/// for host A, `b` links for host B), and a flood namespace linked to
/// node 1's.
struct Lab {
    // Dropped in this order: processes first, then namespaces.
    nodes: Vec<Proc>,
    /// Namespaces of nodes 1..=3, then the flood's.
    ns: Vec<Netns>,
    /// 10.`net`.x.y: the private /16 this run uses.
    net: u8,
    /// The first of this lab's 30 /24s in it (labs of a run take turns,
    /// and a deleted namespace's links can outlive `ip netns del` for a
    /// moment).
    base: u8,
    /// This lab's link names: `{tag}a{i}`, `{tag}b{i}`.
    tag: String,
}

const NODES: u16 = 3;

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let k = LABS.fetch_add(1, Ordering::Relaxed);
        let net = free_net(pid);
        let tag = format!("sf{pid:x}.{k}");
        let name = |what: &str| format!("{NS_PREFIX}{pid}-{k}-{what}");
        let mut lab = Lab {
            nodes: Vec::new(),
            ns: Vec::new(),
            net,
            base: (k % 8) as u8 * 30,
            tag,
        };
        let base = lab.base;
        for i in 1..=NODES {
            let ns = name(&format!("n{i}"));
            sh("ip", &["netns", "add", &ns]);
            lab.ns.push(Netns(ns.clone()));
            sh("ip", &["-n", &ns, "link", "set", "dev", "lo", "up"]);
            for (side, third) in [("a", base + i as u8), ("b", base + 10 + i as u8)] {
                let host_end = format!("{}{side}{i}", lab.tag);
                let dev = format!("v{side}");
                sh(
                    "ip",
                    &[
                        "link", "add", "name", &host_end, "type", "veth", "peer", "name", &dev,
                        "netns", &ns,
                    ],
                );
                sh(
                    "ip",
                    &[
                        "addr",
                        "add",
                        &format!("10.{net}.{third}.1/24"),
                        "dev",
                        &host_end,
                    ],
                );
                sh("ip", &["link", "set", "dev", &host_end, "up"]);
                sh(
                    "ip",
                    &[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("10.{net}.{third}.2/24"),
                        "dev",
                        &dev,
                    ],
                );
                sh("ip", &["-n", &ns, "link", "set", "dev", &dev, "up"]);
            }
        }
        let flood = name("flood");
        sh("ip", &["netns", "add", &flood]);
        lab.ns.push(Netns(flood.clone()));
        let n1 = lab.ns[0].0.clone();
        sh(
            "ip",
            &[
                "-n", &flood, "link", "add", "name", "vf", "type", "veth", "peer", "name", "vg",
                "netns", &n1,
            ],
        );
        for (ns, dev, addr) in [
            (&flood, "vf", format!("10.{net}.{}.2/24", base + 20)),
            (&n1, "vg", format!("10.{net}.{}.1/24", base + 20)),
        ] {
            sh("ip", &["-n", ns, "addr", "add", &addr, "dev", dev]);
            sh("ip", &["-n", ns, "link", "set", "dev", dev, "up"]);
            sh("ip", &["-n", ns, "link", "set", "dev", "lo", "up"]);
        }
        for i in 1..=NODES {
            let p = lab.start_node(i);
            lab.nodes.push(p);
        }
        lab
    }

    fn start_node(&self, id: u16) -> Proc {
        let mut child = spawn_in(
            &self.ns[usize::from(id) - 1].0,
            "node",
            &[id.to_string(), "2048".into()],
        );
        let stdout = child.stdout.take().unwrap();
        let proc = Proc::new(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening"), "node {id} printed {line:?}");
        proc
    }

    /// Kills node `id` with SIGKILL and starts it again, empty, on the
    /// same address.
    fn restart(&mut self, id: u16) {
        let i = usize::from(id) - 1;
        self.nodes[i].kill();
        let fresh = self.start_node(id);
        self.nodes[i] = fresh;
    }

    fn node(&self, id: u16) -> &Proc {
        &self.nodes[usize::from(id) - 1]
    }

    /// Node `id`'s address on the `a` (host A) or `b` (host B) links.
    fn addr(&self, side: &str, id: u16) -> SocketAddr {
        let third = self.base + if side == "a" { id as u8 } else { 10 + id as u8 };
        SocketAddr::new([10, self.net, third, 2].into(), PORT)
    }

    fn members(&self, side: &str) -> Vec<Member> {
        (1..=NODES)
            .map(|id| Member {
                id,
                addr: self.addr(side, id),
            })
            .collect()
    }

    /// This namespace's end of node `id`'s link on `side`.
    fn link(&self, side: &str, id: u16) -> String {
        format!("{}{side}{id}", self.tag)
    }

    fn set_link(&self, side: &str, id: u16, up: bool) {
        sh(
            "ip",
            &[
                "link",
                "set",
                "dev",
                &self.link(side, id),
                if up { "up" } else { "down" },
            ],
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.nodes.clear();
        self.ns.clear();
        // The kernel tears namespaces down in the background: wait until
        // this lab's links here are gone too.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let out = Command::new("ip").args(["-br", "link"]).output().unwrap();
            if !String::from_utf8_lossy(&out.stdout).contains(&self.tag) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A 10.x/16 no route of this machine uses.
fn free_net(pid: u32) -> u8 {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..100)
        .map(|k| 100 + ((pid + k) % 100) as u8)
        .find(|n| !routes.contains(&format!("10.{n}.")))
        .expect("a free 10.x/16 among 10.100-199")
}

// ---------------------------------------------------------------------------
// Hosts.

static HOSTS: AtomicU32 = AtomicU32::new(0);

/// A host: an arena of its own, a replicator, and the sessions it writes.
struct Host {
    repl: Option<Replicator>,
    arena: Arena,
    loc: Location,
    placement: Placement,
    sids: Vec<Sid>,
    /// Per session, the highest version the arena ever showed as acked by
    /// `R` nodes.
    acked_max: Vec<u64>,
    next: usize,
    pad: usize,
}

impl Host {
    fn start(members: Vec<Member>, host_id: u64, pad: usize) -> Host {
        Host::start_with(members, host_id, pad, SESSIONS, |_| {})
    }

    /// A host of `sessions` sessions, its replicator's settings changed by
    /// `tune`.
    fn start_with(
        members: Vec<Member>,
        host_id: u64,
        pad: usize,
        sessions: usize,
        tune: impl FnOnce(&mut ReplicatorConfig),
    ) -> Host {
        let loc = Location::Shm(format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            HOSTS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = Arena::remove(&loc);
        let arena =
            Arena::open(&loc, &ArenaConfig::for_sessions(SESSIONS as u64 * 2, 2048)).unwrap();
        let sids: Vec<Sid> = (0..sessions)
            .map(|_| {
                arena
                    .create(NewSession::default(), &[("n", &0i64.to_le_bytes())])
                    .unwrap()
            })
            .collect();
        let placement = Placement::new(members, 2).unwrap();
        let mut cfg = ReplicatorConfig::new(placement.clone(), Secret::from_bytes(SECRET), host_id);
        cfg.ack_timeout_ms = ACK_TIMEOUT_MS;
        cfg.backoff_max_ms = 200;
        cfg.drain_timeout_ms = 200;
        cfg.force_epoll = TestBackend::get().is_epoll();
        tune(&mut cfg);
        let repl = Replicator::spawn_with(arena.try_clone().unwrap(), cfg).unwrap();
        let acked_max = vec![0; sids.len()];
        Host {
            repl: Some(repl),
            arena,
            loc,
            placement,
            sids,
            acked_max,
            next: 0,
            pad,
        }
    }

    fn stats(&self) -> ReplicatorStats {
        self.repl.as_ref().unwrap().stats()
    }

    /// One update of the next session, timed.
    fn bump(&mut self) -> Duration {
        let sid = self.sids[self.next % self.sids.len()];
        self.next += 1;
        let t = Instant::now();
        self.arena
            .update(
                sid,
                &[
                    Op::Incr {
                        key: "n".into(),
                        by: 1,
                    },
                    Op::Set {
                        key: "pad".into(),
                        value: vec![7; self.pad],
                    },
                ],
            )
            .unwrap();
        t.elapsed()
    }

    /// The version `R` (2) nodes acknowledged, as the arena shows it.
    fn r_acked(&self, sid: Sid) -> u64 {
        let a = self.arena.acked(sid).unwrap();
        if a[0].0 == 0 || a[1].0 == 0 {
            0
        } else {
            a[0].1.min(a[1].1)
        }
    }

    fn version(&self, sid: Sid) -> u64 {
        self.arena.read(sid).unwrap().version()
    }

    fn observe(&mut self) {
        for i in 0..self.sids.len() {
            let v = self.r_acked(self.sids[i]);
            self.acked_max[i] = self.acked_max[i].max(v);
        }
    }

    /// Acked by `R` nodes everywhere, nothing queued, owed or in flight.
    fn settled(&self) -> bool {
        let s = self.stats();
        s.ticks > 0
            && s.dirty == 0
            && s.nodes
                .iter()
                .all(|n| n.pending == 0 && n.in_flight == 0 && n.owed == 0)
            && self
                .sids
                .iter()
                .all(|&sid| self.r_acked(sid) >= self.version(sid))
    }

    /// What the replicator and the arena say, for a failure message.
    fn diagnose(&self) -> String {
        let s = self.stats();
        let unacked: Vec<String> = self
            .sids
            .iter()
            .filter(|&&sid| self.r_acked(sid) < self.version(sid))
            .take(5)
            .map(|&sid| {
                format!(
                    "{sid}: version {} acked {:?} owners {:?}",
                    self.version(sid),
                    self.arena.acked(sid).unwrap(),
                    self.placement.owners(&sid.0)
                )
            })
            .collect();
        format!(
            "dirty {} oldest_unacked_us {} nodes {:?}; not acked by R: {unacked:?}",
            s.dirty, s.oldest_unacked_us, s.nodes
        )
    }

    /// Sessions whose owners do not all hold the current version (each
    /// node's copy fetched), with what they hold.
    fn owners_behind(&self) -> Vec<String> {
        let mut behind = Vec::new();
        for m in self.placement.members() {
            let mine: Vec<Sid> = self
                .sids
                .iter()
                .copied()
                .filter(|s| self.placement.owners(&s.0).contains(&m.id))
                .collect();
            let copies = match copies(m.addr, &mine) {
                Ok(c) => c,
                Err(e) => {
                    behind.push(format!("node {}: {e}", m.id));
                    continue;
                }
            };
            for (sid, held) in mine.iter().zip(copies) {
                let i = self.sids.iter().position(|s| s == sid).unwrap();
                let want = self.version(*sid);
                assert!(
                    want >= self.acked_max[i],
                    "the arena's version went back below an acked one"
                );
                if held.is_none_or(|v| v < want) {
                    behind.push(format!(
                        "{sid}: node {} holds {held:?}, current {want}, acked once {}",
                        m.id, self.acked_max[i]
                    ));
                }
            }
        }
        behind
    }

    /// Ends every session and waits (a little) for the removals to be
    /// taken, sent and acknowledged, so a long run does not pile copies up
    /// on the nodes (the soak checks that node 1 holds none after a round).
    fn finish(&mut self) {
        for &sid in &self.sids {
            let _ = self.arena.invalidate(sid);
        }
        let t = Instant::now();
        let busy = |s: &ReplicatorStats| {
            s.dirty > 0
                || s.nodes
                    .iter()
                    .any(|n| n.up && (n.pending > 0 || n.in_flight > 0))
        };
        while busy(&self.stats()) && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        drop(self.repl.take());
        let _ = Arena::remove(&self.loc);
    }
}

/// What one phase of load saw.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    updates: u64,
    slowest: Duration,
    /// Per host, the largest `oldest_unacked_us`.
    oldest_unacked_max_us: [u64; 2],
}

/// Updates round-robin, one per host about every millisecond, for `d`;
/// samples acks and the replicators' stats every 25 ms.
fn load(hosts: &mut [&mut Host], d: Duration) -> Seen {
    let mut seen = Seen::default();
    let t = Instant::now();
    let mut sampled = Instant::now();
    while t.elapsed() < d {
        for h in hosts.iter_mut() {
            seen.slowest = seen.slowest.max(h.bump());
            seen.updates += 1;
        }
        if sampled.elapsed() >= Duration::from_millis(25) {
            sampled = Instant::now();
            for (i, h) in hosts.iter_mut().enumerate() {
                h.observe();
                let o = h.stats().oldest_unacked_us;
                seen.oldest_unacked_max_us[i] = seen.oldest_unacked_max_us[i].max(o);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for h in hosts.iter_mut() {
        h.observe();
    }
    assert!(
        seen.slowest <= UPDATE_MAX,
        "an update took {:?} (max {UPDATE_MAX:?}): the host blocked",
        seen.slowest
    );
    seen
}

/// Waits (no new updates) until every host has settled and every owner
/// holds every session's current version; returns how long it took.
/// Fails after [`CONVERGE_MAX`].
fn converge(hosts: &mut [&mut Host]) -> Duration {
    let t = Instant::now();
    loop {
        for h in hosts.iter_mut() {
            h.observe();
        }
        if hosts.iter().all(|h| h.settled()) {
            let behind: Vec<String> = hosts.iter().flat_map(|h| h.owners_behind()).collect();
            if behind.is_empty() {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < CONVERGE_MAX,
                "settled but owners are behind after {:?}: {behind:?}",
                t.elapsed()
            );
        }
        if t.elapsed() >= CONVERGE_MAX {
            let state: Vec<String> = hosts.iter().map(|h| h.diagnose()).collect();
            panic!("not converged within {CONVERGE_MAX:?}: {state:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Talking to nodes directly.

/// The version each node copy holds (`None`: no copy), fetched over one
/// pipelined connection.
fn copies(addr: SocketAddr, sids: &[Sid]) -> Result<Vec<Option<u64>>, String> {
    on_test_backend!(B => copies_on::<B>(addr, sids))
}

fn client_config() -> ClientConfig {
    ClientConfig::new(Identity {
        id: 900,
        incarnation: 1,
    })
}

fn copies_on<B: Backend>(addr: SocketAddr, sids: &[Sid]) -> Result<Vec<Option<u64>>, String> {
    let rt = B::runtime().map_err(|e| e.to_string())?;
    B::run(&rt, async {
        let mut c = Client::<B>::connect(addr, client_config(), Secret::from_bytes(SECRET))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(sids.len());
        for (i, sid) in sids.iter().enumerate() {
            let msg = Message::Fetch(Fetch {
                request_id: i as u64,
                sid: sid.0,
            });
            c.send_with(&msg, |m| out.push(m))
                .await
                .map_err(|e| e.to_string())?;
        }
        while out.len() < sids.len() {
            out.push(c.recv().await.map_err(|e| e.to_string())?);
        }
        out.into_iter()
            .zip(sids)
            .map(|(m, sid)| match m {
                Message::FetchReply(r) if r.sid == sid.0 => Ok(r.found.map(|f| f.version)),
                other => Err(format!("unexpected {other:?}")),
            })
            .collect()
    })
}

/// A node's counters (its store's and its transport's `net_*`).
fn node_stats(addr: SocketAddr) -> Vec<(String, u64)> {
    fn on<B: Backend>(addr: SocketAddr) -> Vec<(String, u64)> {
        B::block_on(async {
            let mut c = Client::<B>::connect(addr, client_config(), Secret::from_bytes(SECRET))
                .await
                .unwrap();
            match c
                .call(&Message::StatsRequest(StatsRequest { request_id: 1 }))
                .await
                .unwrap()
            {
                Message::Stats(s) => s.counters.into_iter().map(|c| (c.name, c.value)).collect(),
                other => panic!("not stats: {other:?}"),
            }
        })
    }
    on_test_backend!(B => on::<B>(addr))
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(n, _)| n == name).map_or(0, |s| s.1)
}

// ---------------------------------------------------------------------------
// A relay for delay and loss.

/// What a [`Relay`] does to the bytes it forwards, changeable while it runs.
#[derive(Default)]
struct Knobs {
    /// Each chunk is held this long, each way, in ms.
    delay_ms: AtomicU64,
    /// Per 1000 chunks, how many are "lost".
    loss_permille: AtomicU64,
    /// Per 100 000 chunks, how many tear the connection down.
    reset_per_100k: AtomicU64,
}

/// A TCP relay in this namespace to a node, in both directions. It cannot
/// drop a segment of a TCP stream (its sockets would resend it), so it
/// models what loss does to the stream above TCP: a "lost" chunk, and
/// every chunk behind it, is delivered one retransmission timeout late
/// (200 ms, Linux's minimum RTO), and rarely a connection is torn down, as
/// a run of losses ends one. Delay holds each chunk `delay_ms` each way.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
}

const RTO: Duration = Duration::from_millis(200);

impl Relay {
    fn start(to: SocketAddr, knobs: Arc<Knobs>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let (stop, socks) = (stop.clone(), socks.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    {
                        let mut s = socks.lock().unwrap();
                        s.retain(|t: &TcpStream| t.peer_addr().is_ok());
                        s.push(client.try_clone().unwrap());
                        s.push(server.try_clone().unwrap());
                    }
                    for (from, into) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        pipe(from, into, knobs.clone());
                    }
                }
            }
        });
        Relay { addr, stop, socks }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A small xorshift, seeded per pipe: the relay's dice.
fn dice(seed: u64) -> impl FnMut(u64) -> bool {
    let mut x = seed | 1;
    move |per: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        per > 0 && x.is_multiple_of(per)
    }
}

fn pipe(mut from: TcpStream, mut into: TcpStream, knobs: Arc<Knobs>) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let seed =
        Instant::now().elapsed().as_nanos() as u64 ^ u64::from(from.local_addr().unwrap().port());
    let (a, b) = (from.try_clone().unwrap(), into.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut roll = dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut buf = vec![0u8; 16 * 1024];
        let mut last_due = Instant::now();
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let loss = knobs.loss_permille.load(Ordering::Relaxed);
            let reset = knobs.reset_per_100k.load(Ordering::Relaxed);
            if reset > 0 && roll(100_000 / reset) {
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
                break;
            }
            let mut due =
                Instant::now() + Duration::from_millis(knobs.delay_ms.load(Ordering::Relaxed));
            if loss > 0 && roll(1000 / loss) {
                due += RTO;
            }
            // In order: nothing overtakes a chunk held back.
            due = due.max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if into.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = into.shutdown(std::net::Shutdown::Both);
    });
}

// ---------------------------------------------------------------------------
// Scenarios. Each takes the lab and how long its fault lasts, and returns
// its figures.

#[derive(Default, Debug)]
struct Figures {
    updates: u64,
    slowest_update_us: u64,
    /// Largest `oldest_unacked_us` while degraded (host A, host B).
    degraded_oldest_unacked_ms: [u64; 2],
    /// Lag p99 of the sessions that caught up while degraded, ms.
    degraded_lag_p99_ms: u64,
    converged_ms: u64,
    extra: String,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "updates={} slowest_update_us={} degraded_oldest_unacked_ms={:?} degraded_lag_p99_ms={} converged_ms={} {}",
            self.updates,
            self.slowest_update_us,
            self.degraded_oldest_unacked_ms,
            self.degraded_lag_p99_ms,
            self.converged_ms,
            self.extra
        )
    }
}

/// The common shape: steady load, the fault (`break_it`), load while
/// degraded, the heal, convergence.
fn run_fault(
    hosts: &mut [&mut Host],
    fault: Duration,
    break_it: impl FnOnce(),
    heal: impl FnOnce(),
) -> (Figures, Seen) {
    let steady = load(hosts, Duration::from_millis(500));
    converge(hosts);
    let before = hosts[0].stats();
    break_it();
    let degraded = load(hosts, fault);
    let after = hosts[0].stats();
    heal();
    let converged = converge(hosts);
    let figures = Figures {
        updates: steady.updates + degraded.updates,
        slowest_update_us: steady.slowest.max(degraded.slowest).as_micros() as u64,
        degraded_oldest_unacked_ms: degraded.oldest_unacked_max_us.map(|u| u / 1000),
        degraded_lag_p99_ms: after.lag_quantile_since(&before, 0.99) / 1000,
        converged_ms: converged.as_millis() as u64,
        extra: String::new(),
    };
    (figures, degraded)
}

fn bound(what: &str, got_ms: u64, max_ms: u64) {
    assert!(got_ms <= max_ms, "{what}: {got_ms} ms (bound {max_ms} ms)");
}

fn partition_then_heal(lab: &mut Lab, fault: Duration) -> Figures {
    let mut a = Host::start(lab.members("a"), 1, 100);
    let (f, seen) = run_fault(
        &mut [&mut a],
        fault,
        || (1..=NODES).for_each(|i| lab.set_link("a", i, false)),
        || (1..=NODES).for_each(|i| lab.set_link("a", i, true)),
    );
    // The stall shows while it lasts (the gauge is not hidden until the
    // sessions catch up), and no longer than the partition.
    let fault_ms = fault.as_millis() as u64;
    assert!(
        seen.oldest_unacked_max_us[0] / 1000 >= fault_ms / 2,
        "oldest_unacked never showed the partition: {f}"
    );
    bound(
        "oldest unacked during the partition",
        f.degraded_oldest_unacked_ms[0],
        fault_ms + 1000,
    );
    a.finish();
    f
}

fn one_node_cut_off_from_one_host(lab: &mut Lab, fault: Duration) -> Figures {
    let mut a = Host::start(lab.members("a"), 1, 100);
    let mut b = Host::start(lab.members("b"), 2, 100);
    let (mut f, _) = run_fault(
        &mut [&mut a, &mut b],
        fault,
        || lab.set_link("a", 1, false),
        || lab.set_link("a", 1, true),
    );
    // Host A routes around node 1 once it is found down (ack timeout);
    // host B never notices.
    bound(
        "host A's oldest unacked",
        f.degraded_oldest_unacked_ms[0],
        ACK_TIMEOUT_MS + 1000,
    );
    bound(
        "host B's oldest unacked",
        f.degraded_oldest_unacked_ms[1],
        500,
    );
    let sa = a.stats();
    let sb = b.stats();
    f.extra = format!(
        "host_a_node1_connects={} host_b_node1_connects={}",
        sa.nodes[0].connects, sb.nodes[0].connects
    );
    assert_eq!(sb.nodes[0].connects, 1, "host B lost node 1: {sb:?}");
    a.finish();
    b.finish();
    f
}

fn delay_and_loss(lab: &mut Lab, fault: Duration) -> Figures {
    let knobs = Arc::new(Knobs::default());
    let relays: Vec<Relay> = (1..=NODES)
        .map(|i| Relay::start(lab.addr("a", i), knobs.clone()))
        .collect();
    let members = relays
        .iter()
        .zip(1..)
        .map(|(r, id)| Member { id, addr: r.addr })
        .collect();
    let mut a = Host::start(members, 1, 100);
    let (mut f, _) = run_fault(
        &mut [&mut a],
        fault,
        || {
            knobs.delay_ms.store(50, Ordering::Relaxed);
            knobs.loss_permille.store(50, Ordering::Relaxed);
            knobs.reset_per_100k.store(20, Ordering::Relaxed);
        },
        || {
            knobs.delay_ms.store(0, Ordering::Relaxed);
            knobs.loss_permille.store(0, Ordering::Relaxed);
            knobs.reset_per_100k.store(0, Ordering::Relaxed);
        },
    );
    bound(
        "oldest unacked under delay and loss",
        f.degraded_oldest_unacked_ms[0],
        ACK_TIMEOUT_MS + 1000,
    );
    let s = a.stats();
    let need_full: u64 = s.nodes.iter().map(|n| n.need_full).sum();
    let applied: u64 = s.nodes.iter().map(|n| n.applied).sum();
    let connects: u64 = s.nodes.iter().map(|n| n.connects).sum();
    f.extra = format!("applied={applied} need_full={need_full} connects={connects}");
    // The resend storm (a batch resent from the acked version) showed as
    // tens of thousands of NeedFull; a torn-down connection may cost a few.
    assert!(
        need_full * 20 <= applied.max(1),
        "resends refused as NeedFull: {}",
        f.extra
    );
    a.finish();
    drop(a);
    drop(relays);
    f
}

/// The resend storm's regression test. With 100 ms each way and 100
/// sessions updated 1000 times a second, each session changes about twice
/// per round trip, while batches carrying it are in flight. A replicator
/// that built the next batch from the version the node acknowledged
/// (rather than the one it sent) sent those changes again from an old
/// base: the node refused them as `NeedFull` and the host sent the whole
/// record (20–40 times in this scenario's 3 s). No loss here and no
/// connection drops: every change reaches each node once, so no node
/// answers `NeedFull` at all.
fn a_long_delay_sends_each_change_once(lab: &mut Lab, fault: Duration) -> Figures {
    let knobs = Arc::new(Knobs::default());
    let relays: Vec<Relay> = (1..=NODES)
        .map(|i| Relay::start(lab.addr("a", i), knobs.clone()))
        .collect();
    let members = relays
        .iter()
        .zip(1..)
        .map(|(r, id)| Member { id, addr: r.addr })
        .collect();
    let node_need_full = || -> u64 {
        (1..=NODES)
            .map(|i| stat(&node_stats(lab.addr("a", i)), "need_full"))
            .sum()
    };
    // Node 1 lives on across the rounds of a soak: count from here.
    let node_before = node_need_full();
    // Batches of 8 entries: with about 65 sessions changing on each node
    // per round trip, its link keeps several batches in flight (up to
    // `in_flight_batches_max`), and builds the next one when the first of
    // them is acked, while the others are still on their way.
    let mut a = Host::start_with(members, 1, 100, 100, |c| c.batch_entries_max = 8);
    let (mut f, _) = run_fault(
        &mut [&mut a],
        fault,
        || knobs.delay_ms.store(100, Ordering::Relaxed),
        || knobs.delay_ms.store(0, Ordering::Relaxed),
    );
    // No bound on the oldest unacked here: a session that changes more
    // often than a round trip never has its current version acked by `R`
    // nodes until the load stops, and the gauge counts from its first
    // unacked change (RELIABILITY.md), so it shows the whole fault.
    let s = a.stats();
    let host_need_full: u64 = s.nodes.iter().map(|n| n.need_full).sum();
    let applied: u64 = s.nodes.iter().map(|n| n.applied).sum();
    let connects: u64 = s.nodes.iter().map(|n| n.connects).sum();
    let node_need_full = node_need_full() - node_before;
    f.extra = format!(
        "applied={applied} node_need_full={node_need_full} host_need_full={host_need_full} \
         connects={connects} bytes_sent={}",
        s.bytes_sent
    );
    assert_eq!(
        connects, 3,
        "a link dropped, which may cost a NeedFull: {}",
        f.extra
    );
    assert_eq!(
        node_need_full, 0,
        "changes were sent again from an old base: {}",
        f.extra
    );
    assert_eq!(host_need_full, 0, "whole records were resent: {}", f.extra);
    a.finish();
    drop(a);
    drop(relays);
    f
}

fn a_node_paused_past_every_timeout(lab: &mut Lab, fault: Duration) -> Figures {
    let mut a = Host::start(lab.members("a"), 1, 100);
    // Longer than the ack timeout, the handshake timeout (1 s), the slow
    // threshold (500 ms) and several reconnect backoffs.
    let pause = fault.max(Duration::from_millis(ACK_TIMEOUT_MS * 2 + 500));
    let (mut f, _) = run_fault(
        &mut [&mut a],
        pause,
        || lab.node(2).signal(libc::SIGSTOP),
        || lab.node(2).signal(libc::SIGCONT),
    );
    bound(
        "oldest unacked with a node paused",
        f.degraded_oldest_unacked_ms[0],
        ACK_TIMEOUT_MS + 1000,
    );
    let s = a.stats();
    f.extra = format!(
        "node2_connects={} node2_slow_episodes={}",
        s.nodes[1].connects, s.nodes[1].slow_episodes
    );
    a.finish();
    f
}

fn nodes_restarted_during_a_resync(lab: &mut Lab, fault: Duration) -> Figures {
    let mut a = Host::start(lab.members("a"), 1, 100);
    let steady = load(&mut [&mut a], Duration::from_millis(500));
    converge(&mut [&mut a]);
    // Node 2 misses a while of updates: owed to it, the stand-in holds them.
    lab.set_link("a", 2, false);
    let degraded = load(&mut [&mut a], fault);
    let owed = a.stats().nodes[1].owed;
    lab.set_link("a", 2, true);
    // Its resync begins; mid-way it is killed and comes back empty, and so
    // does node 3, under load.
    let t = Instant::now();
    while a.stats().nodes[1].connects < 2 && t.elapsed() < Duration::from_secs(3) {
        a.bump();
        std::thread::sleep(Duration::from_millis(1));
    }
    let during = load(&mut [&mut a], Duration::from_millis(50));
    lab.restart(2);
    let during2 = load(&mut [&mut a], Duration::from_millis(300));
    lab.restart(3);
    let after = load(&mut [&mut a], Duration::from_millis(500));
    let converged = converge(&mut [&mut a]);
    let s = a.stats();
    assert!(
        s.nodes[1].new_incarnations >= 1 && s.nodes[2].new_incarnations >= 1,
        "the restarts went unseen: {s:?}"
    );
    let seen = [steady, degraded, during, during2, after];
    let f = Figures {
        updates: seen.iter().map(|s| s.updates).sum(),
        slowest_update_us: seen.iter().map(|s| s.slowest).max().unwrap().as_micros() as u64,
        degraded_oldest_unacked_ms: [
            [degraded, during, during2, after]
                .iter()
                .map(|s| s.oldest_unacked_max_us[0] / 1000)
                .max()
                .unwrap(),
            0,
        ],
        degraded_lag_p99_ms: 0,
        converged_ms: converged.as_millis() as u64,
        extra: format!("owed_to_node2={owed}"),
    };
    bound(
        "oldest unacked across the restarts",
        f.degraded_oldest_unacked_ms[0],
        ACK_TIMEOUT_MS + 1500,
    );
    a.finish();
    f
}

fn a_node_slowed_to_1_mbit(lab: &mut Lab, fault: Duration) -> Figures {
    // Large updates: a few Mbit/s to each owner, more than 1 Mbit/s.
    let mut a = Host::start(lab.members("a"), 1, 1000);
    let ns3 = lab.ns[2].0.clone();
    let link = lab.link("a", 3);
    let tbf = [
        "root", "tbf", "rate", "1mbit", "burst", "16kb", "latency", "100ms",
    ];
    let (mut f, _) = run_fault(
        &mut [&mut a],
        fault,
        || {
            let mut host_side = vec!["qdisc", "add", "dev", &link];
            host_side.extend(tbf);
            sh("tc", &host_side);
            let mut node_side = vec!["-n", &ns3, "qdisc", "add", "dev", "va"];
            node_side.extend(tbf);
            sh("tc", &node_side);
        },
        || {
            sh("tc", &["qdisc", "del", "dev", &link, "root"]);
            sh("tc", &["-n", &ns3, "qdisc", "del", "dev", "va", "root"]);
        },
    );
    let s = a.stats();
    f.extra = format!(
        "node3_slow_episodes={} bytes_sent={}",
        s.nodes[2].slow_episodes, s.bytes_sent
    );
    assert!(
        s.nodes[2].slow_episodes >= 1,
        "node 3 was never routed around: {s:?}"
    );
    // Routed around after `slow_after_ms` (500): a second copy goes to a
    // stand-in, so nothing waits long for its second ack.
    bound(
        "oldest unacked with a node at 1 Mbit/s",
        f.degraded_oldest_unacked_ms[0],
        1500,
    );
    a.finish();
    f
}

fn a_pre_auth_flood(lab: &mut Lab, fault: Duration) -> Figures {
    let mut a = Host::start(lab.members("a"), 1, 100);
    let target = SocketAddr::new([10, lab.net, lab.base + 20, 1].into(), PORT);
    let secs = fault.as_secs() + 2;
    let mut flood: Option<Proc> = None;
    let (mut f, _) = run_fault(
        &mut [&mut a],
        fault,
        || {
            flood = Some(Proc::new(spawn_in(
                &lab.ns[3].0,
                "flood",
                &[target.to_string(), "1000".into(), secs.to_string()],
            )));
            // Let it fill every handshake slot.
            std::thread::sleep(Duration::from_secs(1));
        },
        || {},
    );
    let stats = node_stats(lab.addr("a", 1));
    let mut flood = flood.unwrap();
    let mut out = String::new();
    flood
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let opened: u64 = out
        .trim()
        .strip_prefix("opened=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the flood printed {out:?}"));
    let s = a.stats();
    let evicted = stat(&stats, "net_evicted") + stat(&stats, "net_refused");
    f.extra = format!(
        "flood_opened={opened} node1_evicted_or_refused={evicted} node1_handshaking={}",
        stat(&stats, "net_handshaking")
    );
    assert!(
        opened >= 1000,
        "the flood opened only {opened}: {}",
        f.extra
    );
    assert!(s.nodes[0].up, "node 1 went down under the flood: {s:?}");
    assert_eq!(
        s.nodes[0].connects, 1,
        "host A's link to node 1 broke: {s:?}"
    );
    assert!(evicted >= 100, "{}", f.extra);
    bound(
        "oldest unacked under the flood",
        f.degraded_oldest_unacked_ms[0],
        1000,
    );
    a.finish();
    f
}

// ---------------------------------------------------------------------------
// Soak.

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Loops every scenario on one lab for `d`. Node 1 is never restarted:
/// its RSS and descriptors, and this process's (the hosts'), are measured
/// after every round; the first round is the warm-up. Growth is the median
/// of the later half of the rounds against the median of the earlier half,
/// so one round's allocator swing is not taken for a trend; this process
/// gives its freed heap back (`malloc_trim`) before it is measured, as its
/// RSS is small and mostly the test's own. Every host ends its sessions
/// before it goes, so node 1 must hold no copy after a round: a copy left
/// is a removal lost, and memory the node keeps for good.
fn soak(scenarios: &[(&'static str, Scenario)], d: Duration) {
    let mut lab = Lab::new();
    let me = std::process::id();
    let node1 = lab.node(1).pid();
    let t = Instant::now();
    let mut samples: Vec<(u64, u64, usize, usize)> = Vec::new();
    let mut rounds = 0;
    let mut copies_left = Vec::new();
    while rounds < 3 || t.elapsed() < d {
        for (name, f) in scenarios {
            let figures = f(&mut lab, Duration::from_secs(3));
            eprintln!("faults: round {rounds} {name}: {figures}");
        }
        assert_eq!(lab.node(1).pid(), node1);
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
        let now = (rss_kib(me), rss_kib(node1), fds(me), fds(node1));
        let held = node_stats(lab.addr("a", 1));
        let (sessions, bytes) = (stat(&held, "sessions"), stat(&held, "bytes"));
        eprintln!(
            "soak: round {rounds} at {:?}: host rss {} KiB, node 1 rss {} KiB, host fds {}, node 1 fds {}, node 1 copies {sessions} ({bytes} bytes)",
            t.elapsed(),
            now.0,
            now.1,
            now.2,
            now.3
        );
        copies_left.push(sessions);
        if rounds > 0 {
            samples.push(now);
        }
        rounds += 1;
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let half = samples.len() / 2;
    let (early, late) = samples.split_at(half);
    let rss = |s: &[(u64, u64, usize, usize)], node: bool| {
        median(&mut s.iter().map(|x| if node { x.1 } else { x.0 }).collect())
    };
    let (host0, host1) = (rss(early, false), rss(late, false));
    let (node0, node1_rss) = (rss(early, true), rss(late, true));
    let (first, last) = (samples[0], *samples.last().unwrap());
    eprintln!(
        "soak: {rounds} rounds in {:?}: median RSS host {host0} -> {host1} KiB, node 1 {node0} -> {node1_rss} KiB; descriptors {first:?} -> {last:?}",
        t.elapsed()
    );
    assert!(
        copies_left.iter().all(|&n| n == 0),
        "node 1 kept copies of sessions its hosts ended (removals lost), after each round: {copies_left:?}"
    );
    assert!(
        host1 * 10 <= host0 * 11,
        "host RSS grew: median {host0} KiB over the earlier rounds, {host1} KiB over the later ones ({samples:?})"
    );
    assert!(
        node1_rss * 10 <= node0 * 11,
        "node 1 RSS grew: median {node0} KiB over the earlier rounds, {node1_rss} KiB over the later ones ({samples:?})"
    );
    assert!(
        last.2 <= first.2 + 4,
        "host descriptors leak: {first:?} -> {last:?}"
    );
    assert!(
        last.3 <= first.3 + 4,
        "node 1 descriptors leak: {first:?} -> {last:?}"
    );
}
