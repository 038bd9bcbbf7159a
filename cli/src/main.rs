//! `sessio`: the binary of the session engine. It runs a replica node of
//! the bank (`sessio node`) or a host's replicator (`sessio agent`), looks
//! into an arena (`sessio inspect`, `sessio stats`), and runs the whole
//! system on loopback (`sessio demo`). See `docs/REPLICATION.md` and
//! `docs/OPERATIONS.md`.
//!
//! The libraries do the work; this crate holds what only a binary needs:
//!
//! - [`arena`]: `sessio inspect` and `sessio stats`, with `--json`;
//! - [`config`]: the settings of `sessio node` and `sessio agent`, as flags
//!   and TOML config files from one struct per command;
//! - [`metrics`]: the Prometheus exporter (`--metrics-addr`) for both;
//! - [`demo`]: `sessio demo`, the end-to-end run, and its worker processes;
//! - [`signals`]: SIGTERM and SIGINT as a stop flag.

mod arena;
mod config;
mod demo;
mod fetch;
mod metrics;
mod signals;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use config::{AgentSettings, Layered, NodeSettings, required};
use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};
use sessio_net::{Epoll, IoUring, Secret};
use sessio_remote::node::{self, NodeConfig, NodeLimits};
use sessio_remote::placement::Placement;
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
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
    Node(NodeSettings),
    /// Replicate a host's arena to the bank (one per host).
    Agent(AgentSettings),
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
    /// Ask every node of the bank what it holds of one session (read-only:
    /// nothing is installed, no owner is fenced).
    Fetch(fetch::FetchArgs),
    /// One worker process of a demo web host (driven over stdin/stdout).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
    /// A web host for the integration tests: creates sessions, updates
    /// them, replicates them and writes its progress to a file.
    #[command(hide = true)]
    TestHost(TestHostArgs),
}

#[derive(Args, Debug)]
struct TestHostArgs {
    /// The agent's settings: the bank, and the arena, which this host
    /// creates (it prints no stats and serves no metrics).
    #[command(flatten)]
    agent: AgentSettings,
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
    // The matches say which settings were given as flags, so that those
    // alone win over a config file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = matches.subcommand().map_or(&matches, |(_, m)| m);
    let r = match cli.command {
        Command::Node(a) => run_node(a, given),
        Command::Agent(a) => run_agent(a, given),
        Command::TestHost(a) => run_test_host(a, given),
        Command::Inspect(a) => print_or_fail(arena::inspect(&a)),
        Command::Stats(a) => print_or_fail(arena::stats(&a)),
        Command::Fetch(a) => print_or_fail(fetch::run(&a)),
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

/// Descriptors a node needs beyond one per connection: listeners, the
/// metrics server, files, the runtime's own.
const DESCRIPTORS_SPARE: u64 = 64;

/// Raises the soft limit on open files to fit `connections_max`
/// connections, or refuses to start, naming the limit, if the hard limit is
/// below it: a node must not discover at its thousandth connection that it
/// cannot accept one more.
fn fit_descriptors(connections_max: u32) -> Result<(), String> {
    let need = u64::from(connections_max) + DESCRIPTORS_SPARE;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(format!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        ));
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        return Err(format!(
            "--connections-max {connections_max} needs {need} open files, but the hard limit is {}: raise it (ulimit -Hn, or LimitNOFILE= in a unit) or lower --connections-max",
            lim.rlim_max
        ));
    }
    lim.rlim_cur = need;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
        return Err(format!(
            "cannot raise the open-file limit to {need}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn run_node(a: NodeSettings, given: &ArgMatches) -> Res {
    let a = a.resolve(given)?;
    let node_id = required(a.node_id, "node_id")?;
    if node_id == 0 {
        return Err("node_id 0 is reserved; use 1-65535".into());
    }
    let listen = required(a.listen, "listen")?;
    let secret = load_secret(&required(a.secret_file.clone(), "secret_file")?)?;
    let mut config = NodeConfig::new(listen, node_id);
    config.limits = NodeLimits {
        sessions_max: a.sessions_max,
        bytes_max: a.bytes_max,
    };
    config.connections_max = a.connections_max;
    config.threads = a.threads;
    config.allow.clone_from(&a.allow);
    config.handshakes_max = a.handshakes_max.max(1);
    config.handshakes_per_addr_max = a.handshakes_per_addr_max.max(1);
    config.expiry = node::ExpiryRule {
        grace_ms: a.expiry_grace_ms,
        idle_max_ms: a.copy_idle_max_ms,
    };
    if !(1..=sessio_remote::node::SHARDS_MAX).contains(&config.threads) {
        return Err(format!(
            "threads must be 1-{}, not {}",
            sessio_remote::node::SHARDS_MAX,
            config.threads
        )
        .into());
    }
    fit_descriptors(config.connections_max)?;
    install_stop_signals();
    let metrics_addr = a.metrics_addr;
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
    if a.epoll || !IoUring::available() {
        node::serve::<Epoll>(&config, secret.clone(), on_bound, stopped())?;
    } else {
        node::serve::<IoUring>(&config, secret.clone(), on_bound, stopped())?;
    }
    drop(metrics.take());
    eprintln!("sessio node {node_id}: stopped");
    Ok(())
}

fn replicator_config(a: &AgentSettings) -> Result<ReplicatorConfig, Box<dyn std::error::Error>> {
    let nodes = required(a.nodes.as_ref(), "nodes")?.joined();
    let placement = Placement::new(Placement::parse_members(&nodes)?, a.replicas)?;
    let secret = load_secret(&required(a.secret_file.clone(), "secret_file")?)?;
    let mut config = ReplicatorConfig::new(placement, secret, a.host_id);
    config.flush_interval_us = a.flush_interval_us;
    config.ack_timeout_ms = a.ack_timeout_ms.max(1);
    config.force_epoll = a.epoll;
    Ok(config)
}

/// Where the agent's (or test host's) arena lives.
fn arena_location(a: &AgentSettings) -> Result<Location, String> {
    let arena = required(a.arena.clone(), "arena")?;
    Ok(if a.file {
        Location::File(arena.into())
    } else {
        Location::Shm(arena)
    })
}

fn run_agent(a: AgentSettings, given: &ArgMatches) -> Res {
    let a = a.resolve(given)?;
    let config = replicator_config(&a)?;
    let loc = arena_location(&a)?;
    let stats_interval_ms = a.stats_interval_ms;
    install_stop_signals();
    let repl = std::sync::Arc::new(Replicator::spawn(&loc, config)?);
    let metrics = match a.metrics_addr {
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
                "dirty {} oldest_unacked_ms {} nodes_up {up}/{} bytes_per_sec {} lag_p50_us {} lag_p99_us {}",
                s.dirty,
                s.oldest_unacked_us / 1000,
                s.nodes.len(),
                s.bytes_per_sec,
                s.lag_p50_us,
                s.lag_p99_us
            );
            for n in &s.nodes {
                println!(
                    "  node {} {} pending {} in_flight {} owed {} fenced {} evicted {}{}",
                    n.id,
                    if n.up { "up" } else { "down" },
                    n.pending,
                    n.in_flight,
                    n.owed,
                    n.fenced,
                    n.evicted,
                    n.last_error
                        .as_ref()
                        .map(|e| format!(" last_error {e:?}"))
                        .unwrap_or_default()
                );
            }
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

fn run_test_host(mut a: TestHostArgs, given: &ArgMatches) -> Res {
    a.agent = a.agent.resolve(given)?;
    let config = replicator_config(&a.agent)?;
    let loc = arena_location(&a.agent)?;
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
            write_status(&a, &arena, &sids, &last, &repl, updating)?;
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
