//! sessio side by side with Redis (and memcached), in one run on one machine.
//!
//! ```sh
//! cargo run --release -p sessio-benches --bin compare            # full
//! cargo run --release -p sessio-benches --bin compare -- --quick # < 3 min
//! ```
//!
//! Starts its own `redis-server` (persistence off) and, when installed,
//! `memcached` on free loopback ports, then runs each workload on both sides,
//! [`ROUNDS`] times, and reports the median and the spread (min–max) of the
//! rounds:
//!
//! | workload | sessio | peer |
//! | --- | --- | --- |
//! | read | `arena.read(sid)?.get(attr)`, 1M sessions | `HGET` (and `GET` of the 1 KB blob, memcached `get`), one synchronous client |
//! | update | `arena.update(sid, &[Op::Set])`, 100 B | `HSET`, 100 B |
//! | transport | `Server/Client<IoUring>` | `Server/Client<Epoll>` (same `DeltaBatch`es) |
//! | replication | deltas applied and acked by a node | `SET` pipelined 64 deep from 4 connections |
//! | failover fetch | fetch + install + read | `GET` of a 1 KB value |
//!
//! and two workloads of the host API alone (no peer; see `host.rs`):
//! `forged` (what made-up SIDs at 10k/s cost the bank) and `durability`
//! (update latency with `Durability::Local` and `Replicated`), and one of
//! the replicator alone, `idle` (its CPU with nothing to ship, and per
//! update shipped, against the arena's capacity; see `idle.rs`), and
//! `memory`: bytes per session of the host arena, a replica node and
//! Redis on the same data (see `memory.rs`).
//!
//! plus the scaling curves (read latency against sessions in the arena;
//! transport and replication throughput against batch size), drawn into
//! `docs/*.svg`. The results go to stdout (a markdown table and one
//! `ratio NAME=VALUE` line per ratio) and into a marked section of
//! `docs/PERFORMANCE.md` (`--no-doc` leaves the docs alone).
//!
//! Every load loop stops at a count or a time limit, whichever comes first.
//! Environment: `SESSIO_BENCH_MAX_SESSIONS` caps the read curve (default
//! 10 000 000; `--quick` stops at 1M); `SESSIO_COMPARE_ONLY` (comma list of
//! `read,update,transport,fanin,replication,failover,forged,durability,idle,memory`) runs only
//! those workloads, e.g. under a profiler, and then leaves the docs alone;
//! the peers are started only when one of the selected workloads needs them.

// Counts and nanoseconds become f64 only to print rates and ratios; no
// figure here comes near 2^52.
#![allow(clippy::cast_precision_loss)]

mod fanin;
mod host;
mod idle;
mod memory;
mod node;
mod peers;
mod report;
mod transport;

use std::error::Error;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sessio_benches::{ArenaFixture, Floor, KEYS, VALUE_BYTES, arena_config, picks, session_values};
use sessio_engine::{Arena, HugePages, Location, Sid};
use sessio_net::{Epoll, FoundRecord, IoUring};

use node::{Node, NodeServer};
use peers::{Memcache, PeerProcess, Reply, Resp};
use report::{Report, Row, Stat, Unit};
use transport::{Pump, transport};

pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// Rounds of every workload; the median and spread are over these.
const ROUNDS: usize = 5;
/// Rounds of each side of a ratio that is a target of its own and whose
/// gap is small next to a shared machine's noise (sealed against unsealed
/// records, the node's store against the ack-only transport).
const TARGET_ROUNDS: usize = 9;
/// Sessions of the read curve, and the one the headline read is taken at.
const READ_SIZES: [u64; 4] = [10_000, 100_000, 1_000_000, 10_000_000];
const READ_HEADLINE: u64 = 1_000_000;
/// Largest curve point in `--quick` mode.
const QUICK_MAX_SESSIONS: u64 = 1_000_000;
/// Precomputed (SID, attribute) lookups, cycled: more than any cache holds.
const PICKS: usize = 1 << 22;
/// Sessions (hashes, and as many 1 KB blobs) loaded into the peers.
const PEER_SESSIONS: u64 = 100_000;
/// Sessions updated on both sides.
const UPDATE_SESSIONS: u64 = 10_000;
/// Bytes of the whole-session blob of `GET`.
const BLOB_BYTES: usize = 1024;
/// Batch sizes of the transport and replication curves.
const BATCHES: [usize; 5] = [1, 4, 16, 32, 64];
/// Batch size of the headline transport ratio (the brief's "batch ≥ 32").
const TRANSPORT_HEADLINE_BATCH: usize = 32;
/// Pipeline depth and connections of the Redis replication peer.
const REDIS_PIPELINE: usize = 64;
const REDIS_CONNECTIONS: usize = 4;
/// Sessions a replication run cycles through.
const REPL_SESSIONS: usize = 10_000;
/// Bytes of one delta / one pipelined `SET` payload.
const DELTA_BYTES: usize = 100;
/// Sessions the failover node holds (each fetched at most once).
const FAILOVER_SESSIONS: u64 = 40_000;
/// Ops per round at most, for the synchronous round-trip workloads.
const SYNC_OPS_MAX: u64 = 50_000;
/// Ops per round at most, for the local workloads.
const LOCAL_OPS_MAX: u64 = 20_000_000;
/// Batches per round at most, for the pipelined workloads.
const BATCHES_MAX: u64 = 5_000_000;

/// One run's settings.
struct Run {
    quick: bool,
    /// Time limit of one round of one workload.
    round: Duration,
    max_sessions: u64,
    write_doc: bool,
    /// `SESSIO_COMPARE_ONLY`: the workloads to run (all when `None`).
    only: Option<Vec<String>>,
}

impl Run {
    fn part(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == name))
    }

    /// Whether a selected workload needs Redis (and memcached).
    fn needs_peers(&self) -> bool {
        PEER_WORKLOADS.iter().any(|w| self.part(w))
    }
}

/// The workloads that compare with the peers.
const PEER_WORKLOADS: [&str; 4] = ["read", "update", "replication", "failover"];

/// The peer servers, for the length of the run.
struct Peers {
    redis: PeerProcess,
    memcached: Option<PeerProcess>,
}

impl Peers {
    /// Starts Redis (and memcached, when installed) and loads them.
    fn start(rep: &mut Report) -> Result<Peers, BoxError> {
        let redis = PeerProcess::redis()?;
        rep.note(format!("redis-server started on {}", redis.addr));
        let memcached = if peers::installed("memcached") {
            let m = PeerProcess::memcached()?;
            rep.note(format!("memcached started on {}", m.addr));
            Some(m)
        } else {
            rep.note("memcached not installed: its rows are skipped".into());
            None
        };
        load_peers(&redis, memcached.as_ref())?;
        Ok(Peers { redis, memcached })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [child, n] = &args[..]
        && child == memory::NODE_CHILD_ARG
    {
        return match n
            .parse()
            .map_err(BoxError::from)
            .and_then(memory::node_child)
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("memory node child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: compare [--quick] [--no-doc]");
        return ExitCode::SUCCESS;
    }
    if let Some(a) = args.iter().find(|a| *a != "--quick" && *a != "--no-doc") {
        eprintln!("unknown argument {a}; usage: compare [--quick] [--no-doc]");
        return ExitCode::from(2);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = std::env::var("SESSIO_COMPARE_ONLY")
        .ok()
        .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
    let cap = std::env::var("SESSIO_BENCH_MAX_SESSIONS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(READ_SIZES[READ_SIZES.len() - 1]);
    let run = Run {
        quick,
        round: Duration::from_millis(if quick { 250 } else { 1000 }),
        max_sessions: if quick {
            cap.min(QUICK_MAX_SESSIONS)
        } else {
            cap
        },
        // A partial run (for a profiler) never overwrites the docs.
        write_doc: only.is_none() && !args.iter().any(|a| a == "--no-doc"),
        only,
    };
    if run.needs_peers() && !peers::installed("redis-server") {
        eprintln!(
            "redis-server not found on PATH. Install it (Debian/Ubuntu: `apt-get install -y redis-server`; \
             optional: `memcached`) and run again."
        );
        return ExitCode::from(2);
    }
    match compare(&run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn compare(run: &Run) -> Result<(), BoxError> {
    let started = Instant::now();
    let mut rep = Report::new(run.quick);
    // The local read curve first, alone on the machine: its 10M point maps
    // ~14 GiB and nothing else should be running.
    let setup = if run.part("read") {
        Some(read_curve(run, &mut rep)?)
    } else {
        None
    };
    let peers = if run.needs_peers() {
        Some(Peers::start(&mut rep)?)
    } else {
        None
    };
    if let Some(p) = &peers {
        if let Some(setup) = setup {
            read_peers(run, &mut rep, &setup, &p.redis, p.memcached.as_ref())?;
        }
        if run.part("update") {
            update(run, &mut rep, &p.redis)?;
        }
    }
    if run.part("transport") {
        match node::uring_available() {
            Ok(()) => transport(run, &mut rep)?,
            Err(e) => rep.note(format!(
                "io_uring unavailable ({e}): transport rows skipped"
            )),
        }
    }
    if run.part("fanin") {
        match node::uring_available() {
            Ok(()) => fanin::fanin(run, &mut rep)?,
            Err(e) => rep.note(format!("io_uring unavailable ({e}): fan-in rows skipped")),
        }
    }
    if let Some(p) = &peers {
        if run.part("replication") {
            replication(run, &mut rep, &p.redis)?;
        }
        if run.part("failover") {
            failover_fetch(run, &mut rep, &p.redis)?;
        }
    }
    drop(peers);
    if run.part("memory") {
        memory::memory(run, &mut rep)?;
    }
    if run.part("forged") || run.part("durability") || run.part("idle") {
        match node::uring_available() {
            Ok(()) => {
                if run.part("forged") {
                    host::forged(run, &mut rep)?;
                }
                if run.part("durability") {
                    host::durability(run, &mut rep)?;
                }
                if run.part("idle") {
                    idle::idle(run, &mut rep)?;
                }
            }
            Err(e) => rep.note(format!(
                "io_uring unavailable ({e}): forged, durability and idle skipped"
            )),
        }
    }
    rep.finish(started.elapsed(), run.write_doc)
}

/// Runs `round` [`ROUNDS`] times; each returns one value.
fn rounds(mut round: impl FnMut() -> Result<f64, BoxError>) -> Result<Stat, BoxError> {
    let mut v = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        v.push(round()?);
    }
    Ok(Stat::new(v))
}

/// Runs every workload once per round, round after round, so that all of
/// them meet the same spells of noise on a shared machine and their ratio
/// is taken under the same conditions.
fn interleaved(
    ws: &mut [&mut dyn FnMut() -> Result<f64, BoxError>],
) -> Result<Vec<Stat>, BoxError> {
    interleaved_n(ws, ROUNDS)
}

/// CPU time, in ns, of this process's threads named `names` (as the
/// kernel keeps them: 15 bytes), from the kernel's `schedstat`.
fn threads_cpu_ns(names: &[&str]) -> Result<u64, BoxError> {
    let mut sum = 0;
    let mut found = false;
    for t in std::fs::read_dir("/proc/self/task")? {
        let dir = t?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !names.contains(&comm.trim_end()) {
            continue;
        }
        let sched = std::fs::read_to_string(dir.join("schedstat"))?;
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("unreadable schedstat {sched:?}"))?;
        sum += ns;
        found = true;
    }
    if !found {
        return Err(format!("no thread named {names:?} in this process").into());
    }
    Ok(sum)
}

/// [`interleaved`], `rounds` rounds each.
fn interleaved_n(
    ws: &mut [&mut dyn FnMut() -> Result<f64, BoxError>],
    rounds: usize,
) -> Result<Vec<Stat>, BoxError> {
    let mut v = vec![Vec::with_capacity(rounds); ws.len()];
    for _ in 0..rounds {
        for (w, out) in ws.iter_mut().zip(&mut v) {
            out.push(w()?);
        }
    }
    Ok(v.into_iter().map(Stat::new).collect())
}

/// Calls `op(i)` for i = 0, 1, … until `max_ops` calls or `max_time`;
/// returns the mean time per call in ns. Time is read every 256 calls.
fn timed(
    max_ops: u64,
    max_time: Duration,
    mut op: impl FnMut(u64) -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    let start = Instant::now();
    let mut i = 0;
    while i < max_ops {
        op(i)?;
        i += 1;
        if i % 256 == 0 && start.elapsed() >= max_time {
            break;
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / i as f64)
}

/// A populated arena and the order its reads follow.
struct ReadSetup {
    fx: ArenaFixture,
    order: Vec<(Sid, u8)>,
}

impl ReadSetup {
    fn build(n: u64, rep: &mut Report) -> Result<ReadSetup, BoxError> {
        let t = Instant::now();
        let fx = ArenaFixture::build(&format!("compare-{n}"), n, HugePages::Off)?;
        rep.note(format!(
            "arena of {n} sessions filled in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        let order = picks(fx.sids(), PICKS, 0xC0_4E4D ^ n);
        Ok(ReadSetup { fx, order })
    }

    /// One round of reads: mean ns per `read(sid).get(attr)`.
    fn round(&self, max_time: Duration) -> Result<f64, BoxError> {
        let arena = self.fx.arena();
        timed(LOCAL_OPS_MAX, max_time, |i| {
            let (sid, attr) = self.order[i as usize & (PICKS - 1)];
            let s = arena.read(sid)?;
            let v = s.get(KEYS[attr as usize]).ok_or("attribute missing")?;
            black_box(v[0]);
            Ok(())
        })
    }

    /// [`ReadSetup::round`] with each read waiting for the one before (its
    /// byte goes into the next pick through an opaque zero): the isolated
    /// latency a request pays, where `round` lets reads overlap.
    fn round_chained(&self, max_time: Duration) -> Result<f64, BoxError> {
        let arena = self.fx.arena();
        let dep = black_box(0usize);
        let mut j = 0usize;
        timed(LOCAL_OPS_MAX, max_time, |_| {
            let (sid, attr) = self.order[j & (PICKS - 1)];
            let s = arena.read(sid)?;
            let x = s.get(KEYS[attr as usize]).ok_or("attribute missing")?[0];
            j = j.wrapping_add(1 + (usize::from(x) & dep));
            black_box(x);
            Ok(())
        })
    }
}

/// [`floor_round`] with each read waiting for the one before, as
/// [`ReadSetup::round_chained`].
fn floor_round_chained(
    floor: &Floor,
    order: &[(u64, u8)],
    max_time: Duration,
) -> Result<f64, BoxError> {
    let dep = black_box(0usize);
    let mut j = 0usize;
    timed(LOCAL_OPS_MAX, max_time, |_| {
        let (key, field) = order[j & (PICKS - 1)];
        let x = floor.read(key, field).ok_or("floor key missing")?[0];
        j = j.wrapping_add(1 + (usize::from(x) & dep));
        black_box(x);
        Ok(())
    })
}

fn floor_round(floor: &Floor, order: &[(u64, u8)], max_time: Duration) -> Result<f64, BoxError> {
    timed(LOCAL_OPS_MAX, max_time, |i| {
        let (key, field) = order[i as usize & (PICKS - 1)];
        let v = floor.read(key, field).ok_or("floor key missing")?;
        black_box(v[0]);
        Ok(())
    })
}

/// Local read latency and its floor against sessions in the arena. Up to
/// the headline size the arena and its floor are mapped together and their
/// rounds alternate; above it (10M: ~14 GiB each) they run one after the
/// other. The headline size goes last and its arena is kept for the
/// comparison with the peers.
fn read_curve(run: &Run, rep: &mut Report) -> Result<ReadSetup, BoxError> {
    let headline = READ_HEADLINE.min(run.max_sessions);
    let mut sizes: Vec<u64> = READ_SIZES
        .iter()
        .copied()
        .filter(|&n| n <= run.max_sessions && n != headline)
        .collect();
    sizes.push(headline);
    let mut kept = None;
    for n in sizes {
        let point = read_point(run, rep, n, n == headline)
            .map_err(|e| format!("read curve at {n} sessions: {e}"));
        let (engine, bare, setup) = match point {
            Ok(p) => p,
            // Only the points past the headline are optional: they need
            // ~14 GiB of memory twice over, one after the other.
            Err(e) if n > headline => {
                rep.note(format!("{e}; point skipped"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        println!(
            "read n={n}: sessio {} ns, floor {} ns",
            engine.fmt(),
            bare.fmt()
        );
        if n == headline {
            rep.row(Row::new(
                &format!("read: 1 attribute of a 1 KB session, {} sessions (sessio) vs the bare random-read floor", short_count(n)),
                Unit::Ns,
                engine.clone(),
                "floor",
                bare.clone(),
            ));
            rep.ratio("read_vs_floor", bare.median() / engine.median());
            kept = setup;
        }
        rep.read_curve.push((n, engine, bare));
    }
    rep.read_curve.sort_by_key(|(n, ..)| *n);
    kept.ok_or_else(|| "no read size measured".into())
}

/// Reads at `n` sessions and the floor's; with `keep`, the arena and the
/// floor are mapped together, their rounds alternate, and the arena is
/// returned for the peers' comparison; without, one after the other.
fn read_point(
    run: &Run,
    rep: &mut Report,
    n: u64,
    keep: bool,
) -> Result<(Stat, Stat, Option<ReadSetup>), BoxError> {
    let setup = ReadSetup::build(n, rep)?;
    let mapped = setup.fx.mapped_bytes();
    let mut floor = |setup: Option<&ReadSetup>| -> Result<(Option<Stat>, Stat), BoxError> {
        let floor = Floor::build(n, mapped, false).map_err(|e| {
            format!(
                "building the floor ({:.1} GiB): {e}",
                mapped as f64 / f64::from(1 << 30)
            )
        })?;
        let order = picks(floor.keys(), PICKS, 0xC0_4E4D ^ n);
        let mut f = || floor_round(&floor, &order, run.round);
        match setup {
            Some(setup) => {
                // The overlapped reads and, beside them, the chained ones:
                // what one request pays for one read.
                let mut e = || setup.round(run.round);
                let mut ec = || setup.round_chained(run.round);
                let mut fc = || floor_round_chained(&floor, &order, run.round);
                let s = interleaved(&mut [&mut e, &mut f, &mut ec, &mut fc])?;
                let [e, f, ec, fc] = <[Stat; 4]>::try_from(s).expect("four stats");
                println!(
                    "read n={n} chained: sessio {} ns, floor {} ns",
                    ec.fmt(),
                    fc.fmt()
                );
                rep.row(Row::new(
                    &format!(
                        "read, chained (each read waits for the one before): {} sessions (sessio) vs the chained floor",
                        short_count(n)
                    ),
                    Unit::Ns,
                    ec.clone(),
                    "floor, chained",
                    fc.clone(),
                ));
                rep.ratio("read_vs_floor_chained", fc.median() / ec.median());
                Ok((Some(e), f))
            }
            None => Ok((None, rounds(f)?)),
        }
    };
    if keep {
        let (e, f) = floor(Some(&setup))?;
        Ok((e.expect("measured with the floor"), f, Some(setup)))
    } else {
        let e = rounds(|| setup.round(run.round))?;
        drop(setup);
        let (_, f) = floor(None)?;
        Ok((e, f, None))
    }
}

pub(crate) fn redis_hash_key(i: u64) -> Vec<u8> {
    format!("s:{i}").into_bytes()
}

fn blob_key(i: u64) -> Vec<u8> {
    format!("b:{i}").into_bytes()
}

/// Loads [`PEER_SESSIONS`] sessions into Redis (as hashes of the same 8
/// attributes, and as 1 KB blobs) and memcached (blobs), pipelined.
fn load_peers(redis: &PeerProcess, mc: Option<&PeerProcess>) -> Result<(), BoxError> {
    let values = session_values(1);
    let blob: Vec<u8> = values
        .concat()
        .into_iter()
        .cycle()
        .take(BLOB_BYTES)
        .collect();
    let mut r = Resp::connect(redis.addr)?;
    let mut m = mc.map(|p| Memcache::connect(p.addr)).transpose()?;
    let chunk = 1000;
    for start in (0..PEER_SESSIONS).step_by(chunk) {
        let end = (start + chunk as u64).min(PEER_SESSIONS);
        for i in start..end {
            let (k, b) = (redis_hash_key(i), blob_key(i));
            let mut args: Vec<&[u8]> = vec![b"HSET", &k];
            for (key, v) in KEYS.iter().zip(&values) {
                args.push(key.as_bytes());
                args.push(v);
            }
            r.queue(&args);
            r.queue(&[b"SET", &b, &blob]);
            if let Some(m) = m.as_mut() {
                m.queue_set(&b, &blob);
            }
        }
        r.flush()?;
        for _ in start..end {
            match (r.read()?, r.read()?) {
                (Reply::Int(_), Reply::Simple(_)) => {}
                other => return Err(format!("loading redis: {other:?}").into()),
            }
        }
        if let Some(m) = m.as_mut() {
            m.flush()?;
            for _ in start..end {
                m.read_stored()?;
            }
        }
    }
    Ok(())
}

fn read_peers(
    run: &Run,
    rep: &mut Report,
    setup: &ReadSetup,
    redis: &PeerProcess,
    mc: Option<&PeerProcess>,
) -> Result<(), BoxError> {
    let order = picks(&(0..PEER_SESSIONS).collect::<Vec<_>>(), 1 << 16, 0x4ED1);
    let keys: Vec<(Vec<u8>, Vec<u8>)> = order
        .iter()
        .map(|&(i, _)| (redis_hash_key(i), blob_key(i)))
        .collect();
    let at = |i: u64| i as usize & ((1 << 16) - 1);
    let mut r = Resp::connect(redis.addr)?;
    let mut m = mc.map(|p| Memcache::connect(p.addr)).transpose()?;
    let mut sessio = || setup.round(run.round);
    let mut hget = || {
        timed(SYNC_OPS_MAX, run.round, |i| {
            let (k, _) = &keys[at(i)];
            match r.call(&[b"HGET", k, KEYS[order[at(i)].1 as usize].as_bytes()])? {
                Reply::Bulk(n) if n == VALUE_BYTES => Ok(()),
                other => Err(format!("HGET answered {other:?}").into()),
            }
        })
    };
    let mut r2 = Resp::connect(redis.addr)?;
    let mut get = || {
        timed(SYNC_OPS_MAX, run.round, |i| {
            match r2.call(&[b"GET", &keys[at(i)].1])? {
                Reply::Bulk(BLOB_BYTES) => Ok(()),
                other => Err(format!("GET answered {other:?}").into()),
            }
        })
    };
    let mut mget = || match m.as_mut() {
        Some(m) => timed(SYNC_OPS_MAX, run.round, |i| {
            match m.get(&keys[at(i)].1)? {
                Some(BLOB_BYTES) => Ok(()),
                other => Err(format!("memcached get answered {other:?}").into()),
            }
        }),
        None => Ok(f64::NAN),
    };
    let s = interleaved(&mut [&mut sessio, &mut hget, &mut get, &mut mget])?;
    let [sessio, hget, get, mget] = <[Stat; 4]>::try_from(s).expect("four stats");
    let n = short_count(setup.fx.sids().len() as u64);
    rep.row(Row::new(
        &format!(
            "read: sessio `read(sid).get(attr)`, {n} sessions vs Redis `HGET` (one client, sync)"
        ),
        Unit::Ns,
        sessio.clone(),
        "Redis HGET",
        hget.clone(),
    ));
    rep.ratio("read_vs_redis_hget", hget.median() / sessio.median());
    rep.row(Row::new(
        "read: sessio one attribute vs Redis `GET` of the whole 1 KB blob",
        Unit::Ns,
        sessio.clone(),
        "Redis GET",
        get.clone(),
    ));
    rep.ratio("read_vs_redis_get", get.median() / sessio.median());
    if mc.is_some() {
        rep.row(Row::new(
            "read: sessio one attribute vs memcached `get` of the 1 KB blob",
            Unit::Ns,
            sessio.clone(),
            "memcached get",
            mget.clone(),
        ));
        rep.ratio("read_vs_memcached_get", mget.median() / sessio.median());
    }
    Ok(())
}

pub(crate) fn short_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn update(run: &Run, rep: &mut Report, redis: &PeerProcess) -> Result<(), BoxError> {
    let fx = ArenaFixture::build_with(
        "compare-update",
        UPDATE_SESSIONS,
        &arena_config(UPDATE_SESSIONS, HugePages::Off),
    )?;
    let arena = fx.arena();
    let ops = sessio_benches::update_ops();
    let order = picks(fx.sids(), 1 << 16, 0x0B_DA7E);
    let at = |i: u64| i as usize & ((1 << 16) - 1);
    let mut sessio = || {
        timed(LOCAL_OPS_MAX, run.round, |i| {
            let (sid, attr) = order[at(i)];
            black_box(arena.update(sid, &ops[attr as usize])?);
            Ok(())
        })
    };
    let keys: Vec<Vec<u8>> = (0..UPDATE_SESSIONS).map(redis_hash_key).collect();
    let rorder = picks(
        &(0..UPDATE_SESSIONS).collect::<Vec<_>>(),
        1 << 16,
        0x0B_DA7E,
    );
    let value = vec![b'U'; VALUE_BYTES];
    let mut r = Resp::connect(redis.addr)?;
    let mut hset = || {
        timed(SYNC_OPS_MAX, run.round, |i| {
            let (k, a) = rorder[at(i)];
            match r.call(&[
                b"HSET",
                &keys[k as usize],
                KEYS[a as usize].as_bytes(),
                &value,
            ])? {
                Reply::Int(_) => Ok(()),
                other => Err(format!("HSET answered {other:?}").into()),
            }
        })
    };
    let s = interleaved(&mut [&mut sessio, &mut hset])?;
    let [sessio, hset] = <[Stat; 2]>::try_from(s).expect("two stats");
    rep.row(Row::new(
        "update: sessio `update(sid, &[Op::Set])` of 100 B, 10k sessions vs Redis `HSET` (sync)",
        Unit::Ns,
        sessio.clone(),
        "Redis HSET",
        hset.clone(),
    ));
    rep.ratio("update_vs_redis_hset", hset.median() / sessio.median());
    // The update target is a median of 1 µs for a random session of 10k:
    // above 1 means met.
    rep.ratio("update_random_vs_1us", 1000.0 / sessio.median());
    drop(fx);
    Ok(())
}

fn random_sids(n: usize, seed: u64) -> Vec<[u8; 16]> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u128(..).to_le_bytes()).collect()
}

fn at_batch(curve: &[(usize, Stat)], batch: usize) -> Stat {
    curve
        .iter()
        .find(|(b, _)| *b == batch)
        .map(|(_, s)| s.clone())
        .expect("every batch size is measured")
}

/// Two throughput workloads per batch size, their rounds alternating.
fn two_curves(
    a: &mut dyn FnMut(usize) -> Result<f64, BoxError>,
    b: &mut dyn FnMut(usize) -> Result<f64, BoxError>,
    names: [&str; 2],
) -> Result<[Vec<(usize, Stat)>; 2], BoxError> {
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    for &batch in &BATCHES {
        let mut fa = || a(batch);
        let mut fb = || b(batch);
        let s = interleaved(&mut [&mut fa, &mut fb])?;
        let [sa, sb] = <[Stat; 2]>::try_from(s).expect("two stats");
        println!(
            "batch {batch}: {} {} /s, {} {} /s",
            names[0],
            sa.fmt(),
            names[1],
            sb.fmt()
        );
        ca.push((batch, sa));
        cb.push((batch, sb));
    }
    Ok([ca, cb])
}

/// Redis `SET`s of [`DELTA_BYTES`] per second, `depth` pipelined per
/// connection, from [`REDIS_CONNECTIONS`] connections on as many threads.
fn redis_pipelined_set(
    addr: std::net::SocketAddr,
    depth: usize,
    max_time: Duration,
) -> Result<f64, BoxError> {
    let value = vec![b'r'; DELTA_BYTES];
    let start = Instant::now();
    let done: Vec<Result<u64, BoxError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..REDIS_CONNECTIONS)
            .map(|c| {
                let value = &value;
                s.spawn(move || -> Result<u64, BoxError> {
                    let mut r = Resp::connect(addr)?;
                    let keys: Vec<Vec<u8>> = (0..REPL_SESSIONS)
                        .map(|i| format!("r:{c}:{i}").into_bytes())
                        .collect();
                    let mut sets = 0u64;
                    let mut k = 0;
                    while start.elapsed() < max_time && sets < BATCHES_MAX {
                        for _ in 0..depth {
                            r.queue(&[b"SET", &keys[k], value]);
                            k = (k + 1) % keys.len();
                        }
                        r.flush()?;
                        for _ in 0..depth {
                            match r.read()? {
                                Reply::Simple(ok) if ok == "OK" => sets += 1,
                                other => return Err(format!("SET answered {other:?}").into()),
                            }
                        }
                    }
                    Ok(sets)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("a redis client thread panicked".into()))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for d in done {
        total += d?;
    }
    Ok(total as f64 / secs)
}

fn replication(run: &Run, rep: &mut Report, redis: &PeerProcess) -> Result<(), BoxError> {
    // One replica node (the store of `sessio-remote` behind a `sessio-net`
    // server) acknowledging pipelined batches of 100 B op deltas: what the
    // bank does with a host's replication stream. The whole host path
    // (arena, replicator, node) is `benches/benches/replication.rs`.
    let mut node = Pump::<IoUring>::start(Node::Store)?;
    let [stand_in, redis_curve] = two_curves(
        &mut |b| node.round(b, run.round),
        &mut |depth| redis_pipelined_set(redis.addr, depth, run.round),
        ["replica node", "Redis SET pipelined"],
    )?;
    let (s, r) = (
        at_batch(&stand_in, REDIS_PIPELINE),
        at_batch(&redis_curve, REDIS_PIPELINE),
    );
    rep.row(Row::new(
        "replication: one replica node (sessio-remote store, io_uring) applying 100 B op deltas, batch 64, 1 connection, vs Redis `SET` 100 B pipelined 64 deep, 4 connections",
        Unit::PerSec,
        s.clone(),
        "Redis SET -P 64",
        r.clone(),
    ));
    rep.ratio(
        "replication_vs_redis_pipelined_set",
        s.median() / r.median(),
    );
    // What the store costs beside the transport: the same pump against a
    // node that only acknowledges, rounds alternating.
    let mut ack = Pump::<IoUring>::start(Node::Ack)?;
    let mut store_round = || node.round(REDIS_PIPELINE, run.round);
    let mut ack_round = || ack.round(REDIS_PIPELINE, run.round);
    let st = interleaved_n(&mut [&mut store_round, &mut ack_round], TARGET_ROUNDS)?;
    let [store, ack_only] = <[Stat; 2]>::try_from(st).expect("two stats");
    rep.row(Row::new(
        "replication: the replica node (store) vs the ack-only transport, batch 64, io_uring, 1 connection",
        Unit::PerSec,
        store.clone(),
        "ack only",
        ack_only.clone(),
    ));
    rep.ratio(
        "replication_vs_transport_batch64",
        store.median() / ack_only.median(),
    );
    rep.batch_curve.push((
        "replica node (io_uring, sessio-remote store)".into(),
        stand_in,
    ));
    rep.batch_curve.push((
        format!("Redis SET pipelined, depth = batch, {REDIS_CONNECTIONS} conns"),
        redis_curve,
    ));
    Ok(())
}

fn failover_fetch(run: &Run, rep: &mut Report, redis: &PeerProcess) -> Result<(), BoxError> {
    // The records a bank would hold: real archived sessions of this engine.
    let src = ArenaFixture::build("compare-bank", FAILOVER_SESSIONS, HugePages::Off)?;
    let records: Vec<(sessio_net::Sid, FoundRecord)> = src
        .sids()
        .iter()
        .map(|&sid| {
            let g = src.arena().read(sid)?;
            Ok((
                *sid.as_bytes(),
                FoundRecord {
                    version: g.version(),
                    epoch: g.epoch() + 1,
                    record: g.bytes().to_vec(),
                },
            ))
        })
        .collect::<Result<_, BoxError>>()?;
    let sids: Vec<sessio_net::Sid> = records.iter().map(|(s, _)| *s).collect();
    drop(src);
    // A replica node's store holding these sessions; the client side is a
    // worker's first request: `Fetch`, `Arena::install`, read (what
    // `sessio_remote::failover::fetch_and_install` does for one owner).
    let node = NodeServer::start::<IoUring>(Node::Records(records.clone()))?;
    // The same over the epoll transport: tells the transport's share of
    // the failover time from the rest (a diagnostic, not a target).
    let node_epoll = NodeServer::start::<Epoll>(Node::Records(records))?;
    let loc = Location::Shm(format!("bench-{}-compare-failover", std::process::id()));
    let local = Scratch(
        loc.clone(),
        Some(Arena::open(
            &loc,
            &arena_config(FAILOVER_SESSIONS, HugePages::Off),
        )?),
    );
    let arena = local.get();
    let install = |sid, rec: &FoundRecord| -> Result<(), BoxError> {
        let sid = Sid(sid);
        arena.install(sid, &rec.record, rec.version, rec.epoch)?;
        let g = arena.read(sid)?;
        black_box(g.get(KEYS[0]).ok_or("attribute missing after install")?[0]);
        Ok(())
    };
    // Every fetch is of a session not yet installed: each round, each
    // transport, its own slice of the SIDs.
    let per_round = sids.len() / ROUNDS / 2;
    let mut slices = sids.chunks_exact(per_round);
    let mut slices_epoll = sids[sids.len() / 2..].chunks_exact(per_round);
    let (mut fetch, mut all_total, mut all_epoll) = (Vec::new(), Vec::new(), Vec::new());
    let mut sessio = || -> Result<f64, BoxError> {
        let mine = slices.next().expect("a slice per round");
        let t = node::failover::<IoUring>(node.addr, mine, run.round, install)?;
        fetch.push(mean(&t.fetch_ns));
        all_total.extend_from_slice(&t.total_ns);
        Ok(mean(&t.total_ns))
    };
    let mut sessio_epoll = || -> Result<f64, BoxError> {
        let mine = slices_epoll.next().expect("a slice per round");
        let t = node::failover::<Epoll>(node_epoll.addr, mine, run.round, install)?;
        all_epoll.extend_from_slice(&t.total_ns);
        Ok(mean(&t.total_ns))
    };
    let keys: Vec<Vec<u8>> = (0..PEER_SESSIONS).map(blob_key).collect();
    let mut rng = fastrand::Rng::with_seed(0xFA11);
    let mut r = Resp::connect(redis.addr)?;
    let mut redis_all = Vec::new();
    let mut get = || {
        timed(SYNC_OPS_MAX, run.round, |_| {
            let t0 = Instant::now();
            let reply = r.call(&[b"GET", &keys[rng.usize(..keys.len())]])?;
            redis_all.push(t0.elapsed().as_nanos() as f64);
            match reply {
                Reply::Bulk(BLOB_BYTES) => Ok(()),
                other => Err(format!("GET answered {other:?}").into()),
            }
        })
    };
    let s = interleaved(&mut [&mut sessio, &mut get, &mut sessio_epoll])?;
    let [total, get, total_epoll] = <[Stat; 3]>::try_from(s).expect("three stats");
    let fetch = Stat::new(fetch);
    drop(local);
    drop(node);
    drop(node_epoll);
    rep.row(Row::new(
        "failover fetch: `Fetch` from a replica node (io_uring) + `Arena::install` + read vs Redis `GET` 1 KB (sync)",
        Unit::Ns,
        total.clone(),
        "Redis GET",
        get.clone(),
    ));
    rep.row(Row::new(
        "failover fetch, the network round trip alone (`Fetch` → `FetchReply`, 1.1 KB record) vs Redis `GET` 1 KB",
        Unit::Ns,
        fetch,
        "Redis GET",
        get.clone(),
    ));
    rep.row(Row::new(
        "failover fetch (diagnostic): the same first request over the epoll transport vs Redis `GET` 1 KB",
        Unit::Ns,
        total_epoll,
        "Redis GET",
        get.clone(),
    ));
    rep.ratio("failover_fetch_vs_redis_get", get.median() / total.median());
    rep.note(format!(
        "failover first request: p50 {:.1} µs, p99 {:.1} µs over {} fetches; Redis GET p50 {:.1} µs, p99 {:.1} µs",
        percentile(&all_total, 0.50) / 1e3,
        percentile(&all_total, 0.99) / 1e3,
        all_total.len(),
        percentile(&redis_all, 0.50) / 1e3,
        percentile(&redis_all, 0.99) / 1e3,
    ));
    rep.note(format!(
        "failover first request over epoll (diagnostic): p50 {:.1} µs, p99 {:.1} µs over {} fetches",
        percentile(&all_epoll, 0.50) / 1e3,
        percentile(&all_epoll, 0.99) / 1e3,
        all_epoll.len(),
    ));
    Ok(())
}

/// A scratch arena and what uses it: when dropped, the user goes first,
/// then the arena is removed.
struct Scratch<T>(Location, Option<T>);

impl<T> Scratch<T> {
    fn get(&self) -> &T {
        self.1.as_ref().expect("held until dropped")
    }
}

impl<T> Drop for Scratch<T> {
    fn drop(&mut self) {
        drop(self.1.take());
        if let Err(e) = Arena::remove(&self.0) {
            eprintln!("could not remove the scratch arena {:?}: {e}", self.0);
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The `q` quantile of latencies in ns, through an HDR histogram (3
/// significant digits); NaN when there are none.
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant digits are valid");
    for &ns in v {
        let ns = ns.max(0.0).round() as u64;
        if h.record(ns).is_err() {
            h.saturating_record(ns);
        }
    }
    h.value_at_quantile(q) as f64
}
