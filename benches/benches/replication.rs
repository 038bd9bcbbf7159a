//! Replication benchmarks, one process, everything on loopback:
//!
//! - `throughput`: sessions updated as fast as one thread can, shipped by the
//!   replicator to one node; deltas acknowledged per second, at several batch
//!   sizes (`batch_entries_max`).
//! - `lag`: updates paced at a fixed 100k/s for a few seconds; the
//!   replicator's update-to-ack lag p50/p99 (upper bounds of power-of-two
//!   buckets, as `ReplicatorStats` reports them).
//! - `failover_fetch` (criterion): a second host's first request for a
//!   session it does not hold: fetch from the node and install.
//!
//! `cargo bench -p sessio-benches --bench replication`. The node, the
//! replicator and the updating thread share this machine's two cores, so
//! the figures are a floor for what separate hosts would see.

#![allow(clippy::cast_precision_loss)] // rates and seconds for display

use criterion::Criterion;
use sessio_benches::ArenaFixture;
use sessio_engine::{Arena, HugePages, Location, Op};
use sessio_net::{Epoll, IoUring, Secret};
use sessio_remote::failover::{FailoverConfig, NodeClients, Singleflight, fetch_and_install};
use sessio_remote::node::{LocalNode, NodeConfig};
use sessio_remote::placement::{Member, Placement};
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::runtime::Rt;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SESSIONS: u64 = 20_000;

const VALUE_BYTES: usize = 100;

/// A replica node on a thread of this process, stopped on drop.
type Node = LocalNode;

fn start_node(secret: &Secret) -> Node {
    LocalNode::start::<IoUring>(
        NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1),
        secret.clone(),
    )
    .expect("node serves")
}

fn set(i: u64) -> [Op; 1] {
    [Op::Set {
        key: "cart".into(),
        value: vec![(i % 251) as u8; VALUE_BYTES],
    }]
}

/// Waits until every session in `sids` has its current version acked.
fn wait_acked(arena: &Arena, sids: &[sessio_engine::Sid], deadline: Instant) -> bool {
    for &sid in sids {
        let want = arena.read(sid).map_or(0, |g| g.version());
        while arena.acked(sid).map_or(0, |a| a[0].1.max(a[1].1)) < want {
            if Instant::now() > deadline {
                eprintln!(
                    "not acked: {sid} wants {want}, acked {:?}",
                    arena.acked(sid)
                );
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    true
}

fn replicator(fx: &ArenaFixture, node: &Node, secret: &Secret, batch: usize) -> Replicator {
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: node.addr,
        }],
        1,
    )
    .unwrap();
    let mut cfg = ReplicatorConfig::new(placement, secret.clone(), 1);
    cfg.batch_entries_max = batch;
    Replicator::spawn(fx.location(), cfg).expect("replicator starts")
}

/// A host arena of `SESSIONS` sessions replicated to `node`, after its
/// initial full records are all acknowledged.
fn synced(node: &Node, secret: &Secret, label: &str, batch: usize) -> (ArenaFixture, Replicator) {
    let fx = ArenaFixture::build_with(
        label,
        SESSIONS,
        &sessio_benches::arena_config(SESSIONS, HugePages::Off),
    )
    .expect("arena");
    let repl = replicator(&fx, node, secret, batch);
    let synced = wait_acked(
        fx.arena(),
        fx.sids(),
        Instant::now() + Duration::from_secs(60),
    );
    assert!(synced, "initial sync: {:?}", repl.stats());
    (fx, repl)
}

fn throughput(secret: &Secret) {
    println!("\n## throughput: deltas of {VALUE_BYTES} B acknowledged by one node");
    println!("| batch entries max | updates | seconds to all acked | deltas acked/s |");
    println!("| --: | --: | --: | --: |");
    let batches: Vec<usize> = std::env::var("SESSIO_BENCH_BATCHES").ok().map_or_else(
        || vec![1, 8, 32, 128],
        |v| v.split(',').filter_map(|b| b.parse().ok()).collect(),
    );
    for batch in batches {
        let node = start_node(secret);
        // The initial full records first, so the run measures deltas.
        let (fx, repl) = synced(&node, secret, &format!("repl-tp-{batch}"), batch);
        let rounds = 10u64;
        let t = Instant::now();
        for r in 0..rounds {
            for (i, &sid) in fx.sids().iter().enumerate() {
                fx.arena()
                    .update(sid, &set(r * SESSIONS + i as u64))
                    .expect("update");
            }
        }
        let ok = wait_acked(
            fx.arena(),
            fx.sids(),
            Instant::now() + Duration::from_secs(60),
        );
        if !ok {
            eprintln!("replicator: {:?}", repl.stats());
        }
        let secs = t.elapsed().as_secs_f64();
        let n = rounds * SESSIONS;
        drop(repl);
        // Updates of one session between two flushes coalesce into one
        // delta batch per flush; count updates, the work the host asked for.
        println!(
            "| {batch} | {n} | {secs:.2}{} | {:.0} |",
            if ok { "" } else { " (timed out)" },
            n as f64 / secs
        );
    }
}

fn lag(secret: &Secret) {
    const RATE: u64 = 100_000;
    const SECONDS: u64 = 3;
    println!("\n## lag: update → acked by the node, updates paced at {RATE}/s for {SECONDS} s");
    let node = start_node(secret);
    let (fx, repl) = synced(&node, secret, "repl-lag", 128);
    // The initial sync's samples (20k full records at once) are not part
    // of the run: quantiles are taken over the difference.
    std::thread::sleep(Duration::from_millis(50));
    let before = repl.stats();
    let t = Instant::now();
    let total = RATE * SECONDS;
    let mut behind = 0u64;
    // Pace: the 100 updates of millisecond m are due at m ms and run back to
    // back; the updater sleeps in between, leaving the cores to the
    // replicator and the node (as a web host's workers idle between
    // requests), instead of spinning through the gaps.
    //
    // End to end, the first update of every millisecond is also timed from
    // `update` returning to its ack recorded in the arena, by a sampler
    // thread polling every 20 µs: this includes the wait for the
    // dispatcher's tick, which the replicator's own histogram does not.
    let per_ms = RATE / 1000;
    let (tx, rx) = std::sync::mpsc::channel::<(sessio_engine::Sid, u64, Instant)>();
    let sampler = {
        let arena = fx.arena().try_clone().expect("second handle");
        std::thread::spawn(move || {
            let mut open: Vec<(sessio_engine::Sid, u64, Instant)> = Vec::new();
            let mut lags = sessio_remote::replicator::Lag::default();
            let mut done = false;
            while !done || !open.is_empty() {
                loop {
                    match rx.try_recv() {
                        Ok(s) => open.push(s),
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            done = true;
                            break;
                        }
                    }
                }
                open.retain(|&(sid, v, at)| {
                    let acked = arena.acked(sid).map_or(0, |a| a[0].1.max(a[1].1));
                    if acked >= v {
                        lags.record(at.elapsed());
                        false
                    } else {
                        at.elapsed() < Duration::from_secs(10)
                    }
                });
                std::thread::sleep(Duration::from_micros(20));
            }
            lags
        })
    };
    for m in 0..total / per_ms {
        let due = Duration::from_millis(m);
        let now = t.elapsed();
        if let Some(early) = due.checked_sub(now) {
            std::thread::sleep(early);
        } else if now > due + Duration::from_millis(1) {
            behind += per_ms;
        }
        for j in 0..per_ms {
            let k = m * per_ms + j;
            let sid = fx.sids()[(k % SESSIONS) as usize];
            let v = fx.arena().update(sid, &set(k)).expect("update");
            if j == 0 {
                let _ = tx.send((sid, v, Instant::now()));
            }
        }
    }
    drop(tx);
    let achieved = total as f64 / t.elapsed().as_secs_f64();
    wait_acked(
        fx.arena(),
        fx.sids(),
        Instant::now() + Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(50));
    let s = repl.stats();
    let lags = sampler.join().expect("sampler");
    let q = |q: f64| lags.quantile_us(q);
    println!(
        "| offered/s | achieved/s | updates > 1 ms late | replicator: samples, p50, p99, p99.9 | end to end: samples, p50, p99, p99.9, max |"
    );
    println!("| --: | --: | --: | --: | --: |");
    println!(
        "| {RATE} | {achieved:.0} | {behind} | {}, {} µs, {} µs, {} µs | {}, {} µs, {} µs, {} µs, {} µs |",
        s.lag_samples - before.lag_samples,
        s.lag_quantile_since(&before, 0.5),
        s.lag_quantile_since(&before, 0.99),
        s.lag_quantile_since(&before, 0.999),
        lags.count(),
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0),
    );
    drop(repl);
}

fn failover(c: &mut Criterion, secret: &Secret) {
    let node = start_node(secret);
    let (fx, repl) = synced(&node, secret, "repl-fo", 128);
    drop(repl);
    let placement = Placement::new(
        vec![Member {
            id: 1,
            addr: node.addr,
        }],
        1,
    )
    .unwrap();
    let loc = Location::Shm(format!("bench-{}-repl-fo-b", std::process::id()));
    let cfg = sessio_benches::arena_config(SESSIONS, HugePages::Off);
    let host_b = Arena::open(&loc, &cfg).expect("host b");
    let mut clients = NodeClients::<IoUring>::new(
        FailoverConfig::new(2, secret.clone()),
        Arc::new(Singleflight::default()),
    )
    .expect("clients");
    let mut next = 0usize;
    c.bench_function("failover_fetch/first_request_1KB", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if next == fx.sids().len() {
                    // Every session fetched once: forget them and start over.
                    for &sid in fx.sids() {
                        let _ = host_b.invalidate(sid);
                    }
                    next = 0;
                }
                let sid = fx.sids()[next];
                next += 1;
                let t = Instant::now();
                fetch_and_install(&host_b, sid, &placement, &mut clients).expect("fetch");
                spent += t.elapsed();
            }
            spent
        });
    });
    // The tail, which criterion's mean and median do not show: one pass of
    // first requests, each timed alone; then one without the synchronous
    // push that fences the owners (the replicator ships the new epoch
    // within a flush interval anyway); then the first over epoll.
    let n = fx.sids().len().min(9_000) / 3;
    println!(
        "\n## failover first request, {n} sessions each\n| | p50 | p90 | p99 | p99.9 | max |\n| --- | --: | --: | --: | --: | --: |"
    );
    let runs: [(&str, bool, bool); 3] = [
        ("io_uring: fetch + install + fence the owners", true, false),
        ("io_uring: fetch + install", false, false),
        ("epoll: fetch + install + fence the owners", true, true),
    ];
    for (i, (label, fence, epoll)) in runs.into_iter().enumerate() {
        let sids = &fx.sids()[i * n..(i + 1) * n];
        for &sid in sids {
            let _ = host_b.invalidate(sid);
        }
        let mut config = FailoverConfig::new(2, secret.clone());
        config.fence_owners = fence;
        let mut times = if epoll {
            first_requests::<Epoll>(&host_b, sids, &placement, config)
        } else {
            first_requests::<IoUring>(&host_b, sids, &placement, config)
        };
        times.sort();
        let q = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_micros();
        println!(
            "| {label} | {} µs | {} µs | {} µs | {} µs | {} µs |",
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            q(1.0)
        );
    }
    drop(host_b);
    let _ = Arena::remove(&loc);
}

/// Each of `sids` fetched and installed once, timed alone.
fn first_requests<B: Rt>(
    host: &Arena,
    sids: &[sessio_engine::Sid],
    placement: &Placement,
    config: FailoverConfig,
) -> Vec<Duration> {
    let mut clients =
        NodeClients::<B>::new(config, Arc::new(Singleflight::default())).expect("clients");
    sids.iter()
        .map(|&sid| {
            let t = Instant::now();
            fetch_and_install(host, sid, placement, &mut clients).expect("fetch");
            t.elapsed()
        })
        .collect()
}

fn main() {
    if !IoUring::available() {
        println!("io_uring is not available on this kernel: replication benches skipped");
        return;
    }
    let secret = Secret::from_bytes([42; 32]);
    let only = std::env::var("SESSIO_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if run("throughput") {
        throughput(&secret);
    }
    if run("lag") {
        lag(&secret);
    }
    if run("failover") {
        let mut c = Criterion::default()
            .sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1))
            .configure_from_args();
        failover(&mut c, &secret);
        c.final_summary();
    }
}
