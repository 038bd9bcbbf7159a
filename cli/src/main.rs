//! `sessio`: the binary of the session engine. It runs a replica node of
//! the bank (`sessio node`) or a host's replicator (`sessio agent`), looks
//! into an arena (`sessio inspect`, `sessio stats`), and runs the whole
//! system on loopback (`sessio demo`). See `docs/REPLICATION.md` and
//! `docs/OPERATIONS.md`.
//!
//! The libraries do the work; this crate holds what only a binary needs:
//!
//! - [`arena`]: `sessio inspect` and `sessio stats`, with `--json`;
//! - [`config`]: TOML config files for `sessio node` and `sessio agent`;
//! - [`metrics`]: the Prometheus exporter (`--metrics-addr`) for both;
//! - [`demo`]: `sessio demo`, the end-to-end run, and its worker processes;
//! - [`signals`]: SIGTERM and SIGINT as a stop flag.

mod arena;
mod config;
mod demo;
mod metrics;
mod signals;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use config::{AgentFile, NodeFile};
use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};
use sessio_net::{Epoll, IoUring, Secret};
use sessio_remote::node::{self, NodeConfig, NodeLimits};
use sessio_remote::placement::{Placement, REPLICAS_DEFAULT};
use sessio_remote::replicator::{FLUSH_INTERVAL_US_DEFAULT, Replicator, ReplicatorConfig};
use sessio_remote::runtime::Rt;
use signals::{install_stop_signals, stop_requested, stopped};

#[derive(Parser, Debug)]
#[command(
    name = "sessio",
    version,
    about = "sessio session engine: replica nodes, host replicators, arena tools and an end-to-end demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a replica node of the bank.
    Node(NodeArgs),
    /// Replicate a host's arena to the bank (one per host).
    Agent(AgentArgs),
    /// Run the whole system on loopback and check every session.
    ///
    /// 3 replica nodes, 2 web hosts of 2 worker processes each, simulated
    /// shoppers; a node is killed and restarted empty, the bank frozen,
    /// host 1 killed; at the end every session is compared with what its
    /// client expects. The last line is `demo: ok ...` or `demo: FAILED ...`.
    Demo(demo::DemoArgs),
    /// List an arena's sessions, or show one session's attributes.
    Inspect(arena::InspectArgs),
    /// Show an arena's counters.
    Stats(arena::StatsArgs),
    /// One worker process of a demo web host (driven over stdin/stdout).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
    /// A web host for the integration tests: creates sessions, updates
    /// them, replicates them and writes its progress to a file.
    #[command(hide = true)]
    TestHost(TestHostArgs),
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// TOML file with any of these settings (keys named like the flags,
    /// `_` for `-`); flags win over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// This node's id in the bank (1-65535).
    #[arg(long)]
    node_id: Option<u16>,
    /// File holding the bank's 32-byte secret (raw, or 64 hex digits).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Most sessions held; more are refused [default: 10000000].
    #[arg(long)]
    sessions_max: Option<u64>,
    /// Most record bytes held; more are refused [default: 4 GiB].
    #[arg(long)]
    bytes_max: Option<u64>,
    /// Most open connections [default: the server's].
    #[arg(long)]
    connections_max: Option<u32>,
    /// Threads serving connections, sharing the port and the store (1-64)
    /// [default: 1].
    #[arg(long)]
    threads: Option<usize>,
    /// Drop a copy once its session's absolute expiry passed this long ago,
    /// in ms [default: 60000].
    #[arg(long)]
    expiry_grace_ms: Option<u64>,
    /// Drop a copy not written for this long, in ms; host reads do not
    /// reach the node, so keep it well above the longest idle TTL
    /// [default: 0, never].
    #[arg(long)]
    copy_idle_max_ms: Option<u64>,
    /// Use the epoll engine instead of `io_uring`.
    #[arg(long)]
    epoll: bool,
    /// Serve Prometheus text metrics on this address (GET /metrics).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct BankArgs {
    /// The bank: id=ip:port,id=ip:port,...
    #[arg(long)]
    nodes: Option<String>,
    /// File holding the bank's 32-byte secret.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Copies kept per session [default: 2].
    #[arg(long)]
    replicas: Option<usize>,
    /// This host's id [default: 1].
    #[arg(long)]
    host_id: Option<u64>,
    /// How often dirty sessions are shipped, in microseconds [default: 500].
    #[arg(long)]
    flush_interval_us: Option<u64>,
    /// Use the epoll engine instead of `io_uring`.
    #[arg(long)]
    epoll: bool,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// TOML file with any of these settings (keys named like the flags,
    /// `_` for `-`); flags win over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shared-memory arena name (or a path, with --file).
    #[arg(long)]
    arena: Option<String>,
    /// Treat --arena as a file path (file-backed arena).
    #[arg(long)]
    file: bool,
    #[command(flatten)]
    bank: BankArgs,
    /// Print stats this often, in ms (0: never) [default: 5000].
    #[arg(long)]
    stats_interval_ms: Option<u64>,
    /// Serve Prometheus text metrics on this address (GET /metrics).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct TestHostArgs {
    /// Shared-memory arena name (created).
    #[arg(long)]
    arena: String,
    #[command(flatten)]
    bank: BankArgs,
    /// Sessions to create.
    #[arg(long)]
    sessions: u64,
    /// Progress file, rewritten atomically every 20 ms.
    #[arg(long)]
    status: PathBuf,
    /// Update for this long, then idle until killed.
    #[arg(long)]
    duration_ms: u64,
    /// Pause between updates, in microseconds.
    #[arg(long, default_value_t = 200)]
    pace_us: u64,
    /// Value of the "owner" attribute this host writes.
    #[arg(long, default_value = "A")]
    owner: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Node(a) => run_node(&a),
        Command::Agent(a) => run_agent(&a),
        Command::TestHost(a) => run_test_host(&a),
        Command::Inspect(a) => print_or_fail(arena::inspect(&a)),
        Command::Stats(a) => print_or_fail(arena::stats(&a)),
        Command::DemoWorker(a) => demo::run_worker(&a),
        Command::Demo(a) => {
            return if demo::run_demo(&a) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessio: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn print_or_fail(r: Result<String, String>) -> Res {
    print!("{}", r?);
    Ok(())
}

fn load_secret(path: &PathBuf) -> Result<Secret, Box<dyn std::error::Error>> {
    let (secret, warnings) = Secret::load(path)?;
    for w in warnings {
        eprintln!("sessio: warning: {w}");
    }
    Ok(secret)
}

fn run_node(a: &NodeArgs) -> Res {
    let f: NodeFile = match &a.config {
        Some(p) => config::load(p)?,
        None => NodeFile::default(),
    };
    let node_id = config::required(a.node_id, f.node_id, "node_id")?;
    if node_id == 0 {
        return Err("node_id 0 is reserved; use 1-65535".into());
    }
    let listen = config::required(a.listen, f.listen, "listen")?;
    let secret_file = config::required(a.secret_file.clone(), f.secret_file, "secret_file")?;
    let secret = load_secret(&secret_file)?;
    let mut config = NodeConfig::new(listen, node_id);
    config.limits = NodeLimits {
        sessions_max: a
            .sessions_max
            .or(f.sessions_max)
            .unwrap_or(node::SESSIONS_MAX_DEFAULT),
        bytes_max: a
            .bytes_max
            .or(f.bytes_max)
            .unwrap_or(node::BYTES_MAX_DEFAULT),
    };
    config.connections_max = a
        .connections_max
        .or(f.connections_max)
        .unwrap_or(sessio_net::server::CONNECTIONS_MAX_DEFAULT);
    config.threads = a.threads.or(f.threads).unwrap_or(1);
    config.expiry = node::ExpiryRule {
        grace_ms: a
            .expiry_grace_ms
            .or(f.expiry_grace_ms)
            .unwrap_or(node::EXPIRY_GRACE_MS_DEFAULT),
        idle_max_ms: a.copy_idle_max_ms.or(f.copy_idle_max_ms).unwrap_or(0),
    };
    if !(1..=sessio_remote::node::SHARDS_MAX).contains(&config.threads) {
        return Err(format!(
            "threads must be 1-{}, not {}",
            sessio_remote::node::SHARDS_MAX,
            config.threads
        )
        .into());
    }
    let epoll = a.epoll || f.epoll.unwrap_or(false);
    install_stop_signals();
    let metrics_addr = a.metrics_addr.or(f.metrics_addr);
    // Started once the node's address is known; stopped when it returns.
    let metrics = std::cell::RefCell::new(None);
    let on_bound = |addr: SocketAddr, incarnation: u64| {
        if let Some(m) = metrics_addr {
            match metrics::serve_node(m, addr, node_id, secret.clone()) {
                Ok(server) => {
                    println!("metrics {}", server.addr());
                    *metrics.borrow_mut() = Some(server);
                }
                Err(e) => eprintln!("sessio node {node_id}: metrics on {m}: {e}"),
            }
        }
        println!("listening {addr} node {node_id} incarnation {incarnation:016x}");
        let _ = std::io::stdout().flush();
    };
    if epoll || !IoUring::available() {
        node::serve::<Epoll>(&config, secret.clone(), on_bound, stopped())?;
    } else {
        node::serve::<IoUring>(&config, secret.clone(), on_bound, stopped())?;
    }
    drop(metrics.take());
    eprintln!("sessio node {node_id}: stopped");
    Ok(())
}

fn replicator_config(
    b: &BankArgs,
    f: &AgentFile,
) -> Result<ReplicatorConfig, Box<dyn std::error::Error>> {
    let nodes = config::required(
        b.nodes.clone(),
        f.nodes.as_ref().map(config::Nodes::joined),
        "nodes",
    )?;
    let members = Placement::parse_members(&nodes)?;
    let replicas = b.replicas.or(f.replicas).unwrap_or(REPLICAS_DEFAULT);
    let placement = Placement::new(members, replicas)?;
    let secret_file =
        config::required(b.secret_file.clone(), f.secret_file.clone(), "secret_file")?;
    let host_id = b.host_id.or(f.host_id).unwrap_or(1);
    let mut config = ReplicatorConfig::new(placement, load_secret(&secret_file)?, host_id);
    config.flush_interval_us = b
        .flush_interval_us
        .or(f.flush_interval_us)
        .unwrap_or(FLUSH_INTERVAL_US_DEFAULT);
    config.force_epoll = b.epoll || f.epoll.unwrap_or(false);
    Ok(config)
}

fn run_agent(a: &AgentArgs) -> Res {
    let f: AgentFile = match &a.config {
        Some(p) => config::load(p)?,
        None => AgentFile::default(),
    };
    let config = replicator_config(&a.bank, &f)?;
    let arena = config::required(a.arena.clone(), f.arena.clone(), "arena")?;
    let loc = if a.file || f.file.unwrap_or(false) {
        Location::File(arena.into())
    } else {
        Location::Shm(arena)
    };
    let stats_interval_ms = a.stats_interval_ms.or(f.stats_interval_ms).unwrap_or(5000);
    install_stop_signals();
    let repl = std::sync::Arc::new(Replicator::spawn(&loc, config)?);
    let metrics = match a.metrics_addr.or(f.metrics_addr) {
        Some(m) => {
            let server = metrics::serve_agent(m, std::sync::Arc::clone(&repl))?;
            println!("metrics {}", server.addr());
            let _ = std::io::stdout().flush();
            Some(server)
        }
        None => None,
    };
    let mut last = Instant::now();
    while !stop_requested() {
        std::thread::sleep(Duration::from_millis(50));
        if stats_interval_ms != 0 && last.elapsed() >= Duration::from_millis(stats_interval_ms) {
            last = Instant::now();
            let s = repl.stats();
            let up = s.nodes.iter().filter(|n| n.up).count();
            println!(
                "dirty {} nodes_up {up}/{} bytes_per_sec {} lag_p50_us {} lag_p99_us {}",
                s.dirty,
                s.nodes.len(),
                s.bytes_per_sec,
                s.lag_p50_us,
                s.lag_p99_us
            );
        }
    }
    // Stopping the metrics thread drops its reference to the replicator.
    drop(metrics);
    match std::sync::Arc::try_unwrap(repl) {
        Ok(r) => r.stop()?,
        Err(r) => drop(r),
    }
    Ok(())
}

fn run_test_host(a: &TestHostArgs) -> Res {
    let config = replicator_config(&a.bank, &AgentFile::default())?;
    let loc = Location::Shm(a.arena.clone());
    let arena = Arena::open(&loc, &ArenaConfig::for_sessions(a.sessions * 2 + 16, 1024))?;
    let repl = Replicator::spawn(&loc, config)?;
    let sids: Vec<Sid> = (0..a.sessions)
        .map(|_| {
            arena.create(
                NewSession::default(),
                &[("n", &0i64.to_le_bytes()), ("owner", a.owner.as_bytes())],
            )
        })
        .collect::<Result<_, _>>()?;
    let mut last = vec![1u64; sids.len()];
    let start = Instant::now();
    let mut written: Option<Instant> = None;
    let mut i = 0usize;
    loop {
        let updating = start.elapsed() < Duration::from_millis(a.duration_ms);
        if updating {
            let k = i % sids.len();
            let ops = [
                Op::Incr {
                    key: "n".into(),
                    by: 1,
                },
                Op::Set {
                    key: "owner".into(),
                    value: a.owner.as_bytes().to_vec(),
                },
            ];
            // A session moved to another host stays ours here; keep going.
            if let Ok(v) = arena.update(sids[k], &ops) {
                last[k] = v;
            }
            i += 1;
            if a.pace_us > 0 {
                std::thread::sleep(Duration::from_micros(a.pace_us));
            }
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
        if written.is_none_or(|w| w.elapsed() >= Duration::from_millis(20)) {
            written = Some(Instant::now());
            write_status(a, &arena, &sids, &last, &repl, updating)?;
        }
    }
}

/// One line per session: `sid last_version acked_max`, then a stats line.
fn write_status(
    a: &TestHostArgs,
    arena: &Arena,
    sids: &[Sid],
    last: &[u64],
    repl: &Replicator,
    updating: bool,
) -> Res {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (sid, v) in sids.iter().zip(last) {
        let acked = arena.acked(*sid).map_or(0, |a| a[0].1.max(a[1].1));
        let _ = writeln!(out, "{sid} {v} {acked}");
    }
    let s = repl.stats();
    let fenced: u64 = s.nodes.iter().map(|n| n.fenced).sum();
    let _ = writeln!(
        out,
        "stats updating {} dirty {} fenced {fenced} lag_p50_us {} lag_p99_us {} lag_max_us {} lag_samples {}",
        u8::from(updating),
        s.dirty,
        s.lag_p50_us,
        s.lag_p99_us,
        s.lag_max_us,
        s.lag_samples
    );
    let tmp = a.status.with_extension("tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, &a.status)?;
    Ok(())
}
