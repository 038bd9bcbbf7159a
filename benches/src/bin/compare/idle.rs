//! `idle`: what a host's replicator costs when nothing changes, and per
//! shipped update, against the arena's capacity. No peer.
//!
//! For each capacity in [`IDLE_CAPACITIES`]: a fresh arena holding
//! [`IDLE_SESSIONS`] sessions, a replicator to 2 nodes (R = 2, `LocalNode`
//! threads of this process), every session acked first. Then:
//! - **idle:** no update for a window; the replicator thread's CPU time
//!   and its doorbell thread's (the kernel's `schedstat`, in ns) over the
//!   window, as a share of one
//!   core. This is what an idle `sessio agent` costs: its main thread only
//!   sleeps.
//! - **busy:** one-`Set` updates of random sessions, paced at
//!   [`BUSY_RATE`]; the replicator thread's CPU per update shipped.

use std::time::{Duration, Instant};

use sessio_engine::{Arena, ArenaConfig, HugePages, Location, NewSession, Op, Sid};
use sessio_net::Secret;
use sessio_remote::{Replicator, ReplicatorConfig};

use crate::host::Bank;
use crate::node::SECRET;
use crate::report::Report;
use crate::{BoxError, Run, Scratch};

/// Arena capacities measured.
const IDLE_CAPACITIES: [u64; 4] = [100_000, 1_000_000, 4_000_000, 10_000_000];
/// Sessions in each arena.
const IDLE_SESSIONS: u64 = 1000;
/// Idle window, `--quick` and full.
const IDLE_WINDOW: [Duration; 2] = [Duration::from_secs(3), Duration::from_secs(10)];
/// Updates per second of the busy window.
const BUSY_RATE: u64 = 20_000;
/// Busy window, `--quick` and full.
const BUSY_WINDOW: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(5)];
/// The replicator's threads, named as the kernel keeps them (15 bytes):
/// its runtime and the thread that waits on the arena's doorbell.
const THREADS: [&str; 2] = ["sessio-replicat", "sessio-doorbell"];

/// CPU time, in ns, of this process's threads named in [`THREADS`].
fn replicator_cpu_ns() -> Result<u64, BoxError> {
    crate::threads_cpu_ns(&THREADS)
}

/// One capacity's figures.
struct Point {
    capacity: u64,
    /// Share of one core, in percent, while idle.
    idle_pct: f64,
    /// Replicator CPU per update shipped, in µs.
    busy_us_per_update: f64,
    updates: u64,
    shipped: u64,
}

fn point(run: &Run, bank: &Bank, capacity: u64) -> Result<Point, BoxError> {
    let loc = Location::Shm(format!(
        "bench-{}-compare-idle-{capacity}",
        std::process::id()
    ));
    let _ = Arena::remove(&loc);
    // The heap holds the few sessions measured; the capacity sizes the
    // index and the dirty bitmap, which is what an idle tick could scan.
    let cfg = ArenaConfig {
        capacity,
        heap_bytes: 64 << 20,
        quota_bytes: 64 * 1024,
        huge_pages: HugePages::Off,
    };
    let arena = Arena::open(&loc, &cfg)?;
    let scratch = Scratch(loc.clone(), Some(()));
    let sids = (0..IDLE_SESSIONS)
        .map(|i| arena.create(NewSession::default(), &[("cart", &i.to_le_bytes())]))
        .collect::<Result<Vec<Sid>, _>>()?;
    let repl = Replicator::spawn(
        &loc,
        ReplicatorConfig::new(bank.placement.clone(), Secret::from_bytes(SECRET), 41),
    )?;
    synced(&repl, IDLE_SESSIONS)?;
    // Quick ticks after the last work end within 50 ms; a second more.
    std::thread::sleep(Duration::from_secs(1));
    let quick = usize::from(!run.quick);
    let window = IDLE_WINDOW[quick];
    let (c0, t0) = (replicator_cpu_ns()?, Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (replicator_cpu_ns()?, t0.elapsed());
    let idle_pct = (c1 - c0) as f64 / t1.as_nanos() as f64 * 100.0;
    if idle_pct > 1.0 {
        // Over the target: say what the replicator was doing.
        eprintln!(
            "idle: capacity {capacity}: {idle_pct:.2}% of a core; replicator {:?}",
            repl.stats()
        );
    }

    let ops = [Op::Set {
        key: "cart".into(),
        value: vec![b'c'; 32],
    }];
    let mut rng = fastrand::Rng::with_seed(capacity);
    let before = repl.stats();
    let (c0, t0) = (replicator_cpu_ns()?, Instant::now());
    let busy = BUSY_WINDOW[quick];
    let mut updates = 0u64;
    while t0.elapsed() < busy {
        // Paced: update i is due at i / BUSY_RATE s.
        let due = Duration::from_nanos(updates * 1_000_000_000 / BUSY_RATE);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        arena.update(sids[rng.usize(..sids.len())], &ops)?;
        updates += 1;
    }
    // What was taken in the window is shipped before the clock stops.
    let deadline = Instant::now() + Duration::from_secs(5);
    while repl.stats().dirty > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let c1 = replicator_cpu_ns()?;
    let after = repl.stats();
    let shipped: u64 = after
        .nodes
        .iter()
        .zip(&before.nodes)
        .map(|(a, b)| a.applied - b.applied)
        .sum::<u64>()
        / 2;
    repl.stop()?;
    drop(arena);
    drop(scratch);
    Ok(Point {
        capacity,
        idle_pct,
        busy_us_per_update: (c1 - c0) as f64 / 1e3 / shipped.max(1) as f64,
        updates,
        shipped,
    })
}

/// Waits until every node has applied `n` sessions' first records.
fn synced(repl: &Replicator, n: u64) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = repl.stats();
        if s.nodes.len() == 2 && s.nodes.iter().all(|x| x.applied >= n) && s.dirty == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the replicator did not sync {n} sessions in 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn idle(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let bank = Bank::start(2, 2)?;
    let mut points = Vec::new();
    for capacity in IDLE_CAPACITIES {
        let p = point(run, &bank, capacity)?;
        println!(
            "idle: capacity {} idle replicator {:.2}% of a core; busy {:.2} µs CPU per update shipped ({} updates at {BUSY_RATE}/s, {} shipped)",
            p.capacity, p.idle_pct, p.busy_us_per_update, p.updates, p.shipped
        );
        points.push(p);
    }
    let line = points
        .iter()
        .map(|p| {
            format!(
                "{}: idle {:.2}% of a core, {:.2} µs per update",
                crate::short_count(p.capacity),
                p.idle_pct,
                p.busy_us_per_update
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    rep.note(format!(
        "idle replicator ({IDLE_SESSIONS} sessions, 2 nodes, R = 2; CPU of the replicator thread over {} s idle, then per update at {BUSY_RATE}/s): {line}",
        IDLE_WINDOW[usize::from(!run.quick)].as_secs()
    ));
    let at = |c: u64| points.iter().find(|p| p.capacity == c);
    if let (Some(a), Some(b)) = (at(100_000), at(1_000_000)) {
        rep.ratio(
            "idle_agent_cpu_1m_vs_100k",
            b.idle_pct / a.idle_pct.max(1e-9),
        );
        rep.ratio(
            "update_cpu_1m_vs_100k",
            b.busy_us_per_update / a.busy_us_per_update.max(1e-9),
        );
    }
    for p in &points {
        rep.ratio(
            &format!(
                "idle_agent_cpu_pct_{}",
                crate::short_count(p.capacity).to_lowercase()
            ),
            p.idle_pct,
        );
    }
    Ok(())
}
