//! shop-e2e: the shop end to end, as users run it.
//!
//! Three replica nodes, two shop hosts of two worker processes each, nginx
//! in front (`hash $cookie_id consistent`, next host on error), all real
//! processes on loopback. Cookie-keeping Rust clients check every answer
//! against a model of their cart, while wrk measures throughput; one host
//! is killed (SIGKILL, workers and all) mid-run, and its clients move to
//! the other host, which fetches their sessions from the bank.
//!
//! ```text
//! cargo run --release -p sessio-web --bin shop-e2e -- --quick
//! ```
//!
//! It ends with one line, `shop-e2e: ok requests=… rps=… failovers=…
//! lost_replicated_items=0 lost_local_items=… window_us=…`, and exits 1
//! with `shop-e2e: FAILED …` when a durable item was lost, a local one was
//! lost outside the window before the kill, a client saw an item it never
//! added, or no session failed over. `--fault bank-amnesia` restarts the
//! bank empty at the kill, to show the check fails when it should.
//!
//! `--compare` runs the same app five ways through nginx instead (sessio's
//! native layer, its tower-sessions store, tower-sessions' memory store,
//! the published Redis store, no sessions) and prints rps and latency of
//! each with `ratio shop_sessio_vs_redis_store=` and
//! `ratio shop_sessio_vs_no_sessions=`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

mod client;
mod cluster;
mod wrk;

use cluster::Cluster;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    name = "shop-e2e",
    about = "The shop behind nginx, end to end, with a host killed mid-run"
)]
struct Opts {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// A short run (under a minute), for CI.
    #[arg(long)]
    quick: bool,
    /// Seconds of load; default 20, or 12 with --quick.
    #[arg(long, value_name = "SECONDS")]
    duration_s: Option<u64>,
    /// Checking clients; default 32, or 8 with --quick.
    #[arg(long, value_name = "N")]
    clients: Option<usize>,
    /// A fault to inject, to see the check fail.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
    /// Compare five session machineries instead of the failover run.
    #[arg(long)]
    compare: bool,
    /// Seconds of wrk per way (with --compare).
    #[arg(long, default_value_t = 10)]
    compare_secs: u64,
    /// Which ways to compare, comma-separated (default: all five, then the
    /// `native-solo` diagnostic).
    #[arg(long, value_delimiter = ',')]
    ways: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Internal: a replica node.
    Node {
        #[arg(long)]
        id: u16,
        #[arg(long)]
        secret_file: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Internal: a shop host or worker.
    Shop(sessio_web::shop::Args),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// Restart every node empty when the host is killed: the sessions of
    /// the dead host cannot be fetched, so durable items are lost.
    BankAmnesia,
}

fn main() {
    let opts = Opts::parse();
    let r = match &opts.cmd {
        Some(Cmd::Node {
            id,
            secret_file,
            listen,
        }) => node(*id, secret_file, *listen),
        Some(Cmd::Shop(args)) => sessio_web::shop::run(args, &["shop"]),
        None if opts.compare => compare(&opts),
        None => e2e(&opts),
    };
    if let Err(e) = r {
        println!("shop-e2e: FAILED {e}");
        std::process::exit(1);
    }
}

/// A replica node until SIGTERM.
fn node(id: u16, secret: &std::path::Path, listen: std::net::SocketAddr) -> Result<(), BoxError> {
    use sessio_net::{Backend, IoUring};
    use sessio_remote::node::{LocalNode, NodeConfig};
    let secret = sessio_net::Secret::from_file(secret)?;
    let config = NodeConfig::new(listen, id);
    let n = if IoUring::available() {
        LocalNode::start::<IoUring>(config, secret)?
    } else {
        LocalNode::start::<sessio_net::Epoll>(config, secret)?
    };
    println!("node: listening {}", n.addr);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let _ = signals.forever().next();
    drop(n);
    Ok(())
}

/// The failover run.
fn e2e(opts: &Opts) -> Result<(), BoxError> {
    let secs = opts
        .duration_s
        .unwrap_or(if opts.quick { 12 } else { 20 })
        .max(4);
    let clients = opts
        .clients
        .unwrap_or(if opts.quick { 8 } else { 32 })
        .max(1);
    let mut c = Cluster::new()?;
    for id in 1..=3 {
        c.start_node(id)?;
    }
    c.start_host(1, 2, "native")?;
    c.start_host(2, 2, "native")?;
    let nginx = c.start_nginx()?;
    let stop = Arc::new(AtomicBool::new(false));
    let kill_at = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let load = client::run_all(clients, nginx, Arc::clone(&stop), Arc::clone(&kill_at));
    // Throughput on the healthy cluster, beside the checking clients.
    std::thread::sleep(wrk::WARMUP);
    let w = wrk::run(c.dir.path(), nginx, secs / 2 - 1)?;
    // Kill host 1 mid-run: its master and workers, with SIGKILL.
    c.hosts[0].proc.kill();
    *kill_at
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    eprintln!(
        "shop-e2e: killed host 1 after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if opts.fault == Some(Fault::BankAmnesia) {
        c.restart_nodes_empty()?;
    }
    std::thread::sleep(Duration::from_secs(secs).saturating_sub(started.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let reports = load.join().map_err(|_| "the client threads panicked")?;
    let elapsed = started.elapsed();
    let sum = |f: fn(&client::Report) -> u64| reports.iter().map(f).sum::<u64>();
    let requests = sum(|r| r.requests) + w.requests;
    let failovers = reports.iter().filter(|r| r.failed_over).count();
    let (lost_replicated, lost_local) = (sum(|r| r.lost_replicated), sum(|r| r.lost_local));
    let window_us = reports.iter().map(|r| r.window_us).max().unwrap_or(0);
    let (phantoms, after_kill) = (sum(|r| r.phantoms), sum(|r| r.lost_after_kill));
    let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    eprintln!(
        "shop-e2e: {clients} clients, {} adds acked, {} in doubt, {:.1} s; wrk {} requests, p50 {:.0} µs, p99 {:.0} µs, {} non-2xx",
        sum(|r| r.adds_acked),
        sum(|r| r.in_doubt),
        elapsed.as_secs_f64(),
        w.requests,
        w.p50_us,
        w.p99_us,
        w.non_2xx
    );
    for e in errors.iter().take(10) {
        eprintln!("shop-e2e: client error: {e}");
    }
    let line = format!(
        "requests={requests} rps={:.0} failovers={failovers} lost_replicated_items={lost_replicated} lost_local_items={lost_local} window_us={window_us}",
        w.rps
    );
    let mut why = Vec::new();
    if lost_replicated > 0 {
        why.push(format!("{lost_replicated} durable items lost"));
    }
    if after_kill > 0 {
        why.push(format!("{after_kill} items acked after the kill were lost"));
    }
    if phantoms > 0 {
        why.push(format!("{phantoms} items nobody added"));
    }
    if failovers == 0 {
        why.push("no session failed over".into());
    }
    if sum(|r| r.adds_acked) == 0 {
        why.push("no add was acked".into());
    }
    if !errors.is_empty() {
        why.push(format!("{} client errors", errors.len()));
    }
    drop(c);
    if why.is_empty() {
        println!("shop-e2e: ok {line}");
        Ok(())
    } else {
        Err(format!("{line}: {}", why.join("; ")).into())
    }
}

/// The five ways, one after another on the same nodes.
fn compare(opts: &Opts) -> Result<(), BoxError> {
    let mut c = Cluster::new()?;
    for id in 1..=3 {
        c.start_node(id)?;
    }
    c.start_redis()?;
    // MemoryStore keeps sessions in one process: one host of one worker,
    // or a session would be unknown to the other processes.
    let all = [
        ("native", "sessio native layer", 2, 2),
        ("store", "sessio tower-sessions store", 2, 2),
        ("memory", "tower-sessions MemoryStore", 1, 1),
        ("redis", "tower-sessions RedisStore", 2, 2),
        ("none", "no sessions", 2, 2),
        // A diagnostic, not one of the five: the native layer with no
        // replicator, so the bank's share of these two cores is visible.
        // One host of four workers: with no bank behind them, a session
        // nginx moved to the other host would be unknown there.
        (
            "native-solo",
            "sessio native layer, no replicator, 1 host x 4 workers (diagnostic)",
            1,
            4,
        ),
    ];
    let mut rows = Vec::new();
    for (mode, label, hosts, workers) in all {
        if !opts.ways.is_empty() && !opts.ways.iter().any(|w| w == mode) {
            continue;
        }
        for id in 1..=hosts {
            c.start_host(id, workers, mode)?;
        }
        let nginx = c.start_nginx()?;
        std::thread::sleep(wrk::WARMUP);
        let before = c.cpu_ticks();
        let w = wrk::run(c.dir.path(), nginx, opts.compare_secs.max(1))?;
        let cpu = c.cpu_ticks().since(&before, opts.compare_secs.max(1));
        println!(
            "shop {label}: rps={:.0} p50_us={:.0} p99_us={:.0} non_2xx={} errors={} cpu: {cpu}",
            w.rps, w.p50_us, w.p99_us, w.non_2xx, w.errors
        );
        if w.non_2xx > 0 || w.errors > 0 {
            return Err(format!(
                "{label}: {} answers were not 2xx, {} socket errors",
                w.non_2xx, w.errors
            )
            .into());
        }
        rows.push((mode, w));
        c.stop_hosts();
    }
    let rps = |m: &str| {
        rows.iter()
            .find(|(k, _)| *k == m)
            .map_or(0.0, |(_, w)| w.rps)
    };
    println!(
        "ratio shop_sessio_vs_redis_store={:.2}",
        rps("native") / rps("redis").max(1.0)
    );
    println!(
        "ratio shop_sessio_vs_no_sessions={:.2}",
        rps("native") / rps("none").max(1.0)
    );
    println!(
        "ratio shop_sessio_store_vs_redis_store={:.2}",
        rps("store") / rps("redis").max(1.0)
    );
    if rps("native-solo") > 0.0 {
        println!(
            "ratio shop_sessio_unreplicated_vs_no_sessions={:.2}",
            rps("native-solo") / rps("none").max(1.0)
        );
    }
    Ok(())
}
