//! The shop: an example web app on sessio, run as a host of worker
//! processes sharing one arena (the `shop` binary; `shop-e2e` runs it
//! behind nginx).
//!
//! ```text
//! shop --listen 127.0.0.1:8080 --workers 2 --arena shop-a \
//!      --nodes 1=127.0.0.1:7001,2=127.0.0.1:7002 --secret-file bank.key --host-id 1
//! ```
//!
//! The first process (the host) creates the arena, runs the host's one
//! replicator, binds the listening socket and starts `--workers` worker
//! processes that inherit it (pre-fork) and serve the app. It ends them
//! and removes the arena on SIGTERM or SIGINT.
//!
//! Routes (the response bodies are one line, `key=value ...`):
//! - `POST /login?user=U` starts a session (the cookie `id`), durable
//!   before it answers, so the next request may go to any host;
//! - `POST /cart/add?item=I[&durable=1]` pushes an item; answers the cart's
//!   item count and the session version;
//! - `GET /cart` answers the count, version, user and items;
//! - `POST /logout` ends the session.
//!
//! `--mode` picks the session machinery, for side-by-side runs: `native`
//! (sessio's layer), `store` (tower-sessions with sessio's store), `memory`
//! (tower-sessions' in-process store: one worker, no failover), `redis`
//! (the published Redis store) and `none` (no sessions at all).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{WebConfig, WebHost};
use clap::{Parser, ValueEnum};
use sessio_engine::{ArenaConfig, Location};
use sessio_net::Secret;
use sessio_remote::failover::FailoverConfig;
use sessio_remote::placement::{Placement, REPLICAS_DEFAULT};
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::{Durability, HostConfig};

mod routes;

/// Items a cart keeps (the oldest go first).
const CART_MAX: u32 = 50;
/// How long a durable write waits for the bank.
const DURABLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The session machinery of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// sessio's native axum layer.
    Native,
    /// tower-sessions over sessio's store.
    Store,
    /// tower-sessions' in-process memory store (no failover).
    Memory,
    /// tower-sessions over the published Redis store.
    Redis,
    /// No sessions.
    None,
}

/// The shop's command line.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "shop",
    about = "An example shop on sessio, as one host of worker processes"
)]
pub struct Args {
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Shared-memory arena name of this host.
    #[arg(long, default_value = "shop")]
    pub arena: String,
    /// Sessions the arena holds.
    #[arg(long, default_value_t = 100_000)]
    pub capacity: u64,
    /// The bank: id=ip:port,id=ip:port,...
    #[arg(long, default_value = "")]
    pub nodes: String,
    /// Copies kept per session.
    #[arg(long, default_value_t = REPLICAS_DEFAULT)]
    pub replicas: usize,
    /// File holding the bank's 32-byte secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// This host's id in the bank's handshakes.
    #[arg(long, default_value_t = 1)]
    pub host_id: u64,
    /// The session machinery.
    #[arg(long, value_enum, default_value_t = Mode::Native)]
    pub mode: Mode,
    /// redis-server address (with --mode redis).
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: SocketAddr,
    /// Internal: serve as a worker on this inherited listening socket.
    #[arg(long, hide = true)]
    pub listen_fd: Option<i32>,
    /// Diagnostic: run no replicator, so changes are never shipped (the
    /// bank only answers fetches). Measures what the sessions cost the
    /// host alone; never for use in production.
    #[arg(long, hide = true)]
    pub no_replicator: bool,
}

/// What the shop's setup can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the shop with `args` (a host, or one of its workers). The host
/// starts its workers as this executable with `reexec` before the shop's
/// own arguments (the `shop` binary passes none; a binary that embeds the
/// shop under a subcommand passes that subcommand).
pub fn run(args: &Args, reexec: &[&str]) -> Result<(), BoxError> {
    match args.listen_fd {
        Some(fd) => worker(args, fd),
        None => host(args, reexec),
    }
}

impl Args {
    /// These arguments as a command line (for the workers).
    fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--listen={}", self.listen),
            format!("--workers={}", self.workers),
            format!("--arena={}", self.arena),
            format!("--capacity={}", self.capacity),
            format!("--nodes={}", self.nodes),
            format!("--replicas={}", self.replicas),
            format!("--host-id={}", self.host_id),
            format!("--redis={}", self.redis),
            format!(
                "--mode={}",
                self.mode
                    .to_possible_value()
                    .expect("no mode is skipped")
                    .get_name()
            ),
        ];
        if let Some(f) = &self.secret_file {
            v.push(format!("--secret-file={}", f.display()));
        }
        if self.no_replicator {
            v.push("--no-replicator".into());
        }
        v
    }

    fn uses_sessio(&self) -> bool {
        matches!(self.mode, Mode::Native | Mode::Store)
    }

    fn placement(&self) -> Result<Placement, BoxError> {
        Ok(Placement::new(
            Placement::parse_members(&self.nodes)?,
            self.replicas,
        )?)
    }

    fn secret(&self) -> Result<Secret, BoxError> {
        let path = self
            .secret_file
            .as_ref()
            .ok_or("--secret-file is needed with --mode native or store")?;
        Ok(Secret::from_file(path)?)
    }

    fn location(&self) -> Location {
        Location::Shm(self.arena.clone())
    }

    fn web_config(&self, sweep: bool) -> Result<WebConfig, BoxError> {
        let mut host = HostConfig::new(
            self.location(),
            ArenaConfig::for_sessions(self.capacity, 2048),
            self.placement()?,
            FailoverConfig::new(self.host_id, self.secret()?),
        );
        if !sweep {
            host.sweep = None;
        }
        let mut web = WebConfig::new(host);
        web.durability = Durability::Local;
        Ok(web)
    }
}

/// The host process: arena, replicator, listener, workers.
fn host(args: &Args, reexec: &[&str]) -> Result<(), BoxError> {
    let mut workers = args.workers.max(1);
    if args.mode == Mode::Memory && workers > 1 {
        eprintln!("shop: --mode memory keeps sessions in one process: one worker");
        workers = 1;
    }
    let listener = std::net::TcpListener::bind(args.listen)?;
    let addr = listener.local_addr()?;
    // The workers inherit the socket (pre-fork): no CLOEXEC on it.
    let fd = listener.as_raw_fd();
    // SAFETY: F_SETFD on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // The host's arena and its one replicator (its sweeper is elected
    // among the workers).
    let arena_and_replicator = if args.uses_sessio() {
        let web = WebHost::open(args.web_config(false)?)?;
        let repl = if args.no_replicator {
            eprintln!("shop: --no-replicator: changes stay on this host (diagnostic only)");
            None
        } else {
            Some(Replicator::spawn(
                &args.location(),
                ReplicatorConfig::new(args.placement()?, args.secret()?, args.host_id),
            )?)
        };
        Some((web, repl))
    } else {
        None
    };
    let mut children: Vec<Child> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let me = std::env::current_exe()?;
        children.push(
            Command::new(me)
                .args(reexec)
                .args(args.to_args())
                .arg("--listen-fd")
                .arg(fd.to_string())
                .spawn()?,
        );
    }
    println!(
        "shop: listening {addr} workers={workers} mode={:?}",
        args.mode
    );
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    let mut signals = signals?;
    let stop = loop {
        if let Some(sig) = signals.pending().next() {
            break format!("signal {sig}");
        }
        if let Some((i, status)) = children
            .iter_mut()
            .enumerate()
            .find_map(|(i, c)| c.try_wait().ok().flatten().map(|s| (i, s)))
        {
            break format!("worker {i} exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("shop: stopping ({stop})");
    for c in &mut children {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for c in &mut children {
        let _ = c.wait();
    }
    drop(arena_and_replicator);
    if args.uses_sessio() {
        let _ = sessio_engine::Arena::remove(&args.location());
    }
    Ok(())
}

/// A worker process: serves the app on the inherited socket.
fn worker(args: &Args, fd: i32) -> Result<(), BoxError> {
    // SAFETY: the host passed us this descriptor, a listening TCP socket
    // it does not use itself; we own it from here.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(16)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = routes::app(args).await?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            term.recv().await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    })
}
