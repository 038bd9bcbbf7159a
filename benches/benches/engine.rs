//! The engine's speed against `DESIGN.md`'s performance budget.
//!
//! - `read_4k/{engine,floor}/N`: one random attribute of a random 1 KB
//!   session among N, and the physical floor (a bare read of one field of a
//!   1 KiB record through a plain index, in a mapping of the same size and
//!   page size), at 10k, 1M and 10M sessions. Two diagnostic floors go
//!   with it: `floor_fenced` (plus the engine's pin: a `SeqCst` store and
//!   fence) and `floor_chained` (each lookup waits for the previous one, so
//!   it shows latency where `floor` shows throughput).
//! - `read_2m/{engine,floor}/N`: the same at 1M and 10M on 2 MiB pages
//!   (`HugePages::Try`, after reserving pages when the process may).
//! - `update/{random_of_10k,same_session}`: one `Op::Set` of 100 B.
//! - `scope/{lone,pinned}_x4`: four reads of one random session among 10k
//!   (four of its attributes), each pinning itself, or all under one
//!   `Arena::pinned` scope.
//! - two processes updating one SID: total updates/s, and a check that no
//!   update was lost (outside criterion: it is a throughput of two processes).
//!
//! Environment: `SESSIO_BENCH_MAX_SESSIONS` (default 10 000 000) caps the
//! sizes; `SESSIO_BENCH_ONLY` (comma list of `read,huge,update,scope,two_process`)
//! picks parts. Without `--bench` (e.g. `cargo test --benches`) every part
//! runs once at 10k sessions, as a smoke test.
//!
//! At the end a summary of medians and ratios is printed (medians read back
//! from criterion's own estimates).

// Counts and nanoseconds become f64 only to print rates and seconds; no
// figure here comes near 2^52.
#![allow(clippy::cast_precision_loss)]

use criterion::{BenchmarkId, Criterion, black_box};
use sessio_benches::{
    ArenaFixture, Floor, HugePagePool, KEYS, arena_config, huge_pages_needed, picks,
};
use sessio_engine::{HugePages, Location, Op, Sid};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

/// Lookups in a precomputed random order, cycled through (a power of two).
/// Larger than the sessions a cache holds, so a cycle does not warm it.
const PICKS: usize = 1 << 22;
const SIZES: [u64; 3] = [10_000, 1_000_000, 10_000_000];
const HUGE_SIZES: [u64; 2] = [1_000_000, 10_000_000];
/// Updates each process applies per round, and rounds, of the two-process run.
const TWO_PROC_COUNT: u64 = 200_000;
const TWO_PROC_ROUNDS: usize = 7;
const COUNTER_KEY: &str = "hits";

struct Run {
    quick: bool,
    max_sessions: u64,
    only: Option<Vec<String>>,
    /// Lines of the final summary that criterion does not know about.
    notes: Vec<String>,
    /// (group, size) pairs measured, for the summary.
    reads: Vec<(&'static str, u64, bool, bool)>,
}

impl Run {
    fn part(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == name))
    }

    fn note(&mut self, line: String) {
        println!("sessio: {line}");
        self.notes.push(line);
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let max_sessions = if quick {
        10_000
    } else {
        std::env::var("SESSIO_BENCH_MAX_SESSIONS")
            .ok()
            .and_then(|s| s.replace('_', "").parse().ok())
            .unwrap_or(10_000_000)
    };
    let only = std::env::var("SESSIO_BENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
    let mut run = Run {
        quick,
        max_sessions,
        only,
        notes: Vec::new(),
        reads: Vec::new(),
    };
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let started = Instant::now();
    if run.part("read") {
        let sizes: Vec<u64> = SIZES
            .iter()
            .copied()
            .filter(|&n| n <= run.max_sessions)
            .collect();
        read_benches(&mut c, &mut run, "read_4k", &sizes, HugePages::Off);
    }
    if run.part("huge") {
        let sizes: Vec<u64> = HUGE_SIZES
            .iter()
            .copied()
            .filter(|&n| n <= run.max_sessions)
            .collect();
        let sizes = if quick { vec![10_000] } else { sizes };
        if let Some(&largest) = sizes.iter().max() {
            let pool =
                HugePagePool::reserve(huge_pages_needed(&arena_config(largest, HugePages::Try)));
            run.note(format!("huge pages: {}", pool.note));
            read_benches(&mut c, &mut run, "read_2m", &sizes, HugePages::Try);
            drop(pool);
        }
    }
    if run.part("update") {
        update_benches(&mut c, &mut run);
    }
    if run.part("scope") {
        scope_benches(&mut c);
    }
    if run.part("two_process") {
        two_processes(&mut run);
    }
    c.final_summary();
    summary(&run, started.elapsed());
}

fn read_benches(
    c: &mut Criterion,
    run: &mut Run,
    group: &'static str,
    sizes: &[u64],
    huge: HugePages,
) {
    let mut g = c.benchmark_group(group);
    for &n in sizes {
        let t = Instant::now();
        let fx = match ArenaFixture::build(&format!("{group}-{n}"), n, huge) {
            Ok(fx) => fx,
            // Arenas reserve their whole size: the largest sizes may not
            // fit this machine's shared memory. Say so, measure the rest.
            Err(e) if n > 1_000_000 => {
                run.note(format!("{group} n={n}: not measured: {e}"));
                continue;
            }
            Err(e) => panic!("building an arena of {n} sessions: {e}"),
        };
        let built = t.elapsed();
        let mapped = fx.mapped_bytes();
        let arena_huge = fx.huge_pages();
        run.note(format!(
            "{group} n={n}: arena populated in {:.1} s ({:.2} µs/session), {:.2} GiB mapped, 2 MiB pages: {}",
            built.as_secs_f64(),
            built.as_secs_f64() * 1e6 / n as f64,
            mapped as f64 / f64::from(1 << 30),
            if arena_huge { "yes" } else { "no" }
        ));
        if huge != HugePages::Off && !arena_huge {
            run.note(format!(
                "{group} n={n}: HugePages::Try fell back to 4 KiB pages; this row is NOT a huge-page measurement"
            ));
        }
        {
            let order = picks(fx.sids(), PICKS, 0x5E55_1000 ^ n);
            let arena = fx.arena();
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new("engine", n), |b| {
                b.iter(|| {
                    let (sid, attr) = order[i & (PICKS - 1)];
                    i = i.wrapping_add(1);
                    let s = arena.read(sid).expect("a created session reads");
                    let v = s
                        .get(KEYS[attr as usize])
                        .expect("every session has 8 attributes");
                    black_box(v[0])
                });
            });
        }
        // Arena and floor are never mapped together: at 10M each is ~15 GiB.
        drop(fx);
        let t = Instant::now();
        let floor = Floor::build(n, mapped, huge != HugePages::Off)
            .unwrap_or_else(|e| panic!("building the floor of {n} records: {e}"));
        let floor_huge = floor.huge_pages();
        run.note(format!(
            "{group} n={n}: floor built in {:.1} s, {:.2} GiB mapped, 2 MiB pages: {}",
            t.elapsed().as_secs_f64(),
            floor.mapped_bytes() as f64 / f64::from(1 << 30),
            if floor_huge { "yes" } else { "no" }
        ));
        {
            let order = picks(floor.keys(), PICKS, 0x5E55_1000 ^ n);
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new("floor", n), |b| {
                b.iter(|| {
                    let (key, field) = order[i & (PICKS - 1)];
                    i = i.wrapping_add(1);
                    let v = floor.read(key, field).expect("every key is in the floor");
                    black_box(v[0])
                });
            });
            // Diagnostics, not targets. `floor_fenced` adds what the
            // engine's read pays to pin itself (a SeqCst store and a SeqCst
            // fence, as in `Arena::pin`): a full barrier, so one read's cache
            // misses can no longer overlap the next one's.
            let pin = Padded(AtomicU64::new(0));
            g.bench_function(BenchmarkId::new("floor_fenced", n), |b| {
                b.iter(|| {
                    let (key, field) = order[i & (PICKS - 1)];
                    i = i.wrapping_add(1);
                    pin.0.store(i as u64, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    let v = floor.read(key, field).expect("every key is in the floor");
                    let x = v[0];
                    pin.0.store(0, Ordering::Release);
                    black_box(x)
                });
            });
            // `floor_chained`: the next lookup waits for this one's byte (it
            // is folded into the next index through an opaque zero), so no
            // two reads overlap: the floor's latency rather than throughput.
            let dep = black_box(0usize);
            g.bench_function(BenchmarkId::new("floor_chained", n), |b| {
                b.iter(|| {
                    let (key, field) = order[i & (PICKS - 1)];
                    let v = floor.read(key, field).expect("every key is in the floor");
                    let x = v[0];
                    i = i.wrapping_add(1 + (usize::from(x) & dep));
                    black_box(x)
                });
            });
        }
        drop(floor);
        run.reads.push((group, n, arena_huge, floor_huge));
    }
    g.finish();
}

/// Four reads of one session per request, each pinning itself or all
/// under one scope.
fn scope_benches(c: &mut Criterion) {
    let n = 10_000;
    let fx = ArenaFixture::build("scope", n, HugePages::Off)
        .unwrap_or_else(|e| panic!("building the scope arena: {e}"));
    let arena = fx.arena();
    let order = picks(fx.sids(), PICKS, 0x0005_C09E);
    let mut g = c.benchmark_group("scope");
    let mut i = 0usize;
    // One request's reads: four attributes of its own session, each through
    // `Arena::read`, which pins itself unless a scope holds a pin already.
    let mut four = || {
        let (sid, attr) = order[i & (PICKS - 1)];
        i = i.wrapping_add(1);
        (0..4u8).fold(0, |x, k| {
            let key = KEYS[usize::from((attr + k) % KEYS.len() as u8)];
            x ^ arena.read(sid).expect("read").get(key).expect("attr")[0]
        })
    };
    g.bench_function("lone_x4", |b| b.iter(|| black_box(four())));
    g.bench_function("pinned_x4", |b| {
        b.iter(|| {
            let _scope = arena.pinned();
            black_box(four())
        });
    });
    g.finish();
}

fn update_benches(c: &mut Criterion, run: &mut Run) {
    let n = 10_000;
    let fx = ArenaFixture::build_with("update", n, &arena_config(n, HugePages::Off))
        .unwrap_or_else(|e| panic!("building the update arena: {e}"));
    let arena = fx.arena();
    let ops = sessio_benches::update_ops();
    let order = picks(fx.sids(), 1 << 16, 0x000B_DA7E);
    let mut g = c.benchmark_group("update");
    let mut i = 0usize;
    g.bench_function("random_of_10k", |b| {
        b.iter(|| {
            let (sid, attr) = order[i & ((1 << 16) - 1)];
            i = i.wrapping_add(1);
            black_box(arena.update(sid, &ops[attr as usize]).expect("update"))
        });
    });
    let sid = fx.sids()[0];
    let mut k = 0usize;
    g.bench_function("same_session", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(arena.update(sid, &ops[k % KEYS.len()]).expect("update"))
        });
    });
    g.finish();
    let s = arena.stats();
    run.note(format!(
        "update: after the runs {} of {} heap chunks touched ({} KiB each)",
        s.chunks_touched,
        s.chunks,
        s.chunk_bytes / 1024
    ));
    if let Ok(r) = arena.read(sid) {
        run.note(format!(
            "update: the updated session's record is now {} B (as when it was created: updates do not grow a record)",
            r.bytes().len()
        ));
    }
}

/// A word on a cache line of its own, like a participant's pin.
#[repr(align(64))]
struct Padded(AtomicU64);

/// Kills and reaps the child if it is still running when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn two_processes(run: &mut Run) {
    let count = if run.quick { 1_000 } else { TWO_PROC_COUNT };
    let rounds = if run.quick { 1 } else { TWO_PROC_ROUNDS };
    let fx = ArenaFixture::build_with("two-proc", 1, &arena_config(1, HugePages::Off))
        .unwrap_or_else(|e| panic!("building the two-process arena: {e}"));
    let Location::Shm(name) = fx.location().clone() else {
        unreachable!("fixtures are named shared-memory arenas")
    };
    let sid = fx.sids()[0];
    let arena = fx.arena();
    let ops = [Op::Incr {
        key: COUNTER_KEY.into(),
        by: 1,
    }];
    let mut totals = Vec::new();
    let mut expected = 0i64;
    for round in 0..rounds {
        let (elapsed, parent_ns, child_ns) = two_process_round(&name, sid, count, arena, &ops);
        expected += 2 * count as i64;
        let got = counter(arena, sid);
        let rate = 2.0 * count as f64 / elapsed.as_secs_f64();
        run.note(format!(
            "two processes, round {round}: {rate:.0} updates/s together \
             (parent {:.0}/s, child {:.0}/s alone in its own loop); counter {got} of {expected}",
            count as f64 / (parent_ns as f64 / 1e9),
            count as f64 / (child_ns as f64 / 1e9),
        ));
        assert_eq!(got, expected, "updates were lost (or applied twice)");
        totals.push(rate);
    }
    totals.sort_by(f64::total_cmp);
    run.note(format!(
        "two processes updating one SID: median {:.0} updates/s over {rounds} rounds of 2 × {count} (min {:.0}, max {:.0}); no update lost",
        totals[totals.len() / 2],
        totals[0],
        totals[totals.len() - 1]
    ));
}

fn counter(arena: &sessio_engine::Arena, sid: Sid) -> i64 {
    let r = arena.read(sid).expect("the session lives");
    r.get(COUNTER_KEY)
        .map_or(0, |v| i64::from_le_bytes(v.try_into().expect("a counter")))
}

/// One round: both processes apply `count` updates; returns the wall time
/// from `go` until both are done, and each one's own loop time in ns.
fn two_process_round(
    name: &str,
    sid: Sid,
    count: u64,
    arena: &sessio_engine::Arena,
    ops: &[Op],
) -> (Duration, u128, u128) {
    let child = Command::new(env!("CARGO_BIN_EXE_update_worker"))
        .args([name, &sid.to_string(), &count.to_string(), COUNTER_KEY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the update worker");
    let mut w = Worker(child);
    let mut out = BufReader::new(w.0.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("reading the worker");
    assert_eq!(line.trim(), "ready", "the worker did not start");
    let mut stdin = w.0.stdin.take().expect("piped stdin");
    let t = Instant::now();
    writeln!(stdin, "go").expect("starting the worker");
    drop(stdin);
    for _ in 0..count {
        arena.update(sid, ops).expect("update");
    }
    let parent_ns = t.elapsed().as_nanos();
    line.clear();
    out.read_line(&mut line).expect("reading the worker");
    let status = w.0.wait().expect("waiting for the worker");
    let elapsed = t.elapsed();
    assert!(status.success(), "the worker failed: {status}");
    let child_ns = line
        .trim()
        .strip_prefix("done ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected worker output {line:?}"));
    (elapsed, parent_ns, child_ns)
}

/// Where criterion writes its estimates.
fn criterion_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("criterion");
    }
    // <target>/<profile>/deps/engine-<hash>
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.join("criterion")))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// The median (ns) criterion estimated for `group/id`, if it ran.
fn median_ns(group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn summary(run: &Run, elapsed: Duration) {
    let mut s = String::new();
    let _ = writeln!(s, "\n==== sessio engine bench summary (medians) ====");
    if !run.quick {
        let _ = writeln!(
            s,
            "{:<8} {:>9} {:>10} {:>9} {:>7} {:>9} {:>9} {:>9}  pages (arena / floor)",
            "group",
            "sessions",
            "engine ns",
            "floor ns",
            "ratio",
            "fenced ns",
            "chain ns",
            "vs chain"
        );
        for &(group, n, ah, fh) in &run.reads {
            let e = median_ns(group, &format!("engine/{n}"));
            let f = median_ns(group, &format!("floor/{n}"));
            let ff = median_ns(group, &format!("floor_fenced/{n}"));
            let fc = median_ns(group, &format!("floor_chained/{n}"));
            let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
            let ratio = match (e, f) {
                (Some(e), Some(f)) => format!("{:.2}x", e / f),
                _ => "-".into(),
            };
            // The engine's read (each pins itself, so reads barely
            // overlap) against the floor's isolated latency.
            let vs_chain = match (e, fc) {
                (Some(e), Some(fc)) => format!("{:.2}x", e / fc),
                _ => "-".into(),
            };
            let pages = |h: bool| if h { "2M" } else { "4K" };
            let _ = writeln!(
                s,
                "{group:<8} {n:>9} {:>10} {:>9} {ratio:>7} {:>9} {:>9} {vs_chain:>9}  {} / {}",
                fmt(e),
                fmt(f),
                fmt(ff),
                fmt(fc),
                pages(ah),
                pages(fh)
            );
        }
        for id in ["random_of_10k", "same_session"] {
            if let Some(m) = median_ns("update", id) {
                let _ = writeln!(s, "update/{id}: {m:.1} ns");
            }
        }
    }
    for n in &run.notes {
        let _ = writeln!(s, "{n}");
    }
    let _ = writeln!(s, "whole run: {:.0} s", elapsed.as_secs_f64());
    println!("{s}");
}
