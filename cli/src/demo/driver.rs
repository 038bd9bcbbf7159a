//! The demo driver: starts the bank and the hosts, runs the clients, breaks
//! things on a schedule, and checks every session at the end (see the
//! parent module).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use clap::Args;
use sessio_engine::{Arena, Location};

use super::model::{CATALOG, CartOp, Expected};
use super::procs::{Line, NodeProc, WorkerProc};
use crate::signals::install_stop_signals;
use sessio_remote::Samples;

/// Replica nodes in the demo bank.
const NODES: u16 = 3;
/// Web hosts.
const HOSTS: usize = 2;
/// Worker processes per host.
const WORKERS_PER_HOST: usize = 2;
/// Requests in flight per worker.
const WINDOW_PER_WORKER: usize = 16;
/// Most clients a run may simulate.
const CLIENTS_MAX: usize = 10_000;
/// Highest `--rate`.
const RATE_MAX: u64 = 10_000_000;
/// Longest load phase.
const DURATION_S_MAX: u64 = 600;
/// How long a worker may take to start, the drain, and the final check.
const START_TIMEOUT_MS: u64 = 10_000;
const DRAIN_TIMEOUT_MS: u64 = 10_000;
const CHECK_TIMEOUT_MS: u64 = 15_000;
/// Pause before a client retries a request that failed.
const RETRY_MS: u64 = 50;
/// Replicator stats are polled this often.
const STATS_INTERVAL_MS: u64 = 500;

/// Arguments of `sessio demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// A short run (about 10 s in all), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Seconds of load (start-up and the final check come on top);
    /// default 40, or 10 with --quick.
    #[arg(long, value_name = "SECONDS")]
    pub duration_s: Option<u64>,
    /// Simulated clients; default 200, or 100 with --quick.
    #[arg(long, value_name = "N")]
    pub clients: Option<usize>,
    /// Most requests per second, all clients together.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Fault injection for the demo's own test: host 2's workers store a
    /// wrong quantity on every Nth cart addition (0: never).
    #[arg(long, default_value_t = 0, hide = true)]
    pub fault_every: u64,
    /// Fault injection for the demo's own test: right after host 1 dies,
    /// every replica node restarts empty, so acknowledged updates are lost.
    #[arg(long, hide = true)]
    pub fault_wipe_bank: bool,
}

/// When each failure is injected, as seconds into the load.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    node_kill: f64,
    node_restart: f64,
    bank_stop: f64,
    bank_resume: f64,
    host_kill: f64,
    end: f64,
}

impl Schedule {
    #[allow(clippy::cast_precision_loss)]
    fn new(duration_s: u64, quick: bool) -> Schedule {
        let d = duration_s as f64;
        let stop_s: f64 = if quick { 1.5 } else { 3.0 };
        Schedule {
            node_kill: 0.15 * d,
            node_restart: 0.25 * d,
            bank_stop: 0.35 * d,
            bank_resume: 0.35 * d + stop_s.min(0.2 * d),
            host_kill: 0.6 * d,
            end: d,
        }
    }
}

/// Runs the demo; prints the report on stdout, its last line
/// `demo: ok ...` or `demo: FAILED ...`. Returns whether it passed.
pub fn run(a: &DemoArgs) -> bool {
    install_stop_signals();
    let duration_s = a
        .duration_s
        .unwrap_or(if a.quick { 10 } else { 40 })
        .clamp(4, DURATION_S_MAX);
    let clients = a
        .clients
        .unwrap_or(if a.quick { 100 } else { 200 })
        .clamp(2, CLIENTS_MAX);
    let started = Instant::now();
    let result = Demo::start(clients, a.rate.clamp(100, RATE_MAX), a.fault_every)
        .and_then(|mut d| d.run(Schedule::new(duration_s, a.quick), a.fault_wipe_bank));
    // `Demo` is dropped here: every process is gone and every file removed
    // before the verdict is printed.
    let total_s = started.elapsed().as_secs_f64();
    match result {
        Ok(r) => {
            let ok = r.failure.is_none();
            print!("{}", r.text);
            let verdict = match &r.failure {
                None => "demo: ok".to_string(),
                Some(why) => format!("demo: FAILED {why}"),
            };
            println!("{verdict} total_s={total_s:.1} {}", r.figures);
            ok
        }
        Err(why) => {
            println!("demo: FAILED {why} total_s={total_s:.1}");
            false
        }
    }
}

/// The finished report: human lines, the key=value figures, and why it
/// failed, if it did.
struct Report {
    text: String,
    figures: String,
    failure: Option<String>,
}

/// What a client is waiting for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    New,
    Update(CartOp),
    View,
    Dump,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    kind: Kind,
    /// When the request went out: the update is applied after this, so a
    /// lost update's age is measured from here.
    sent: Instant,
}

/// What the driver knew about a session when its host died.
#[derive(Debug, Clone, Copy)]
struct Orphan {
    /// Highest version acknowledged by `R` nodes, per the dead host's arena.
    bank_acked: u64,
    /// The version its client last saw.
    local_version: u64,
    /// An update sent to the dead host whose answer never came: it may
    /// have been applied (at `local_version + 1`) and even shipped.
    maybe: Option<CartOp>,
}

struct Client {
    user: String,
    /// Index of the host serving it (sticky; moves when its host dies).
    host: usize,
    /// Worker within the host.
    worker: usize,
    sid: Option<String>,
    exp: Expected,
    created_at: Instant,
    /// The client's own workload, seeded from its id: the same clients
    /// make the same choices in every run.
    rng: fastrand::Rng,
    inflight: Option<InFlight>,
    orphan: Option<Orphan>,
    retry_at: Option<Instant>,
    checked: bool,
    /// Already counted as differing from its model.
    mismatched: bool,
}

impl Client {
    fn next_kind(&mut self) -> Kind {
        if self.sid.is_none() {
            return Kind::New;
        }
        let item = self.rng.u8(..CATALOG.len() as u8);
        let qty = self.rng.u8(1..=9);
        match self.rng.u8(..100) {
            0..45 => Kind::Update(CartOp::Add { item, qty }),
            45..65 => {
                let items: Vec<u8> = self.exp.now.items.keys().copied().collect();
                if items.is_empty() {
                    Kind::Update(CartOp::Add { item, qty })
                } else {
                    let item = items[self.rng.usize(..items.len())];
                    Kind::Update(CartOp::Del { item })
                }
            }
            _ => Kind::View,
        }
    }
}

/// Counters of the run.
#[derive(Default)]
struct Tally {
    requests: u64,
    updates: u64,
    errors: u64,
    last_error: String,
    read_ns: Samples,
    fetch_us: Samples,
    gone: u64,
    /// Updates at or below the bank's ack that host 2 did not get back.
    lost_acked: u64,
    /// Updates host 1 acknowledged to clients but never got acked by `R`
    /// nodes, and that did not come back.
    unacked_lost: u64,
    unacked_sessions: u64,
    /// Longest time between the request of a lost unacknowledged update
    /// and the host's death.
    unacked_window: Duration,
    /// Updates in flight at the host's death that the bank still had.
    inflight_recovered: u64,
    /// Versions of host 1's sessions acked by the bank when it died.
    bank_acked_at_kill: u64,
    /// Versions of host 1's sessions its clients had seen when it died.
    local_at_kill: u64,
    mismatches: u64,
    mismatch_examples: Vec<String>,
    unexpected_fetches: u64,
}

impl Tally {
    /// Counts a session that differs from its client's model, once.
    fn mismatch(&mut self, c: &mut Client, why: String) {
        if c.mismatched {
            return;
        }
        c.mismatched = true;
        self.mismatches += 1;
        if self.mismatch_examples.len() < 5 {
            self.mismatch_examples.push(why);
        }
    }
}

#[derive(Default, Clone)]
struct ReplStats {
    dirty: u64,
    lag_p50_us: u64,
    lag_p99_us: u64,
    lag_samples: u64,
    lag_max_us: u64,
    nodes_up: u64,
}

enum Pending {
    Client(usize),
    Stats(usize),
}

/// The bank's secret, in a private directory removed on drop.
struct SecretDir {
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl SecretDir {
    fn new() -> Result<SecretDir, String> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // The prefix names this run: the nodes' command lines carry the
        // path, and the demo's own test looks for leftovers by it.
        let dir = tempfile::Builder::new()
            .prefix(&format!("sessio-demo-{}-", std::process::id()))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| format!("creating the secret's directory: {e}"))?;
        let file = dir.path().join("bank.key");
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("random secret: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(|e| format!("writing the secret: {e}"))?;
        f.write_all(&key)
            .map_err(|e| format!("writing the secret: {e}"))?;
        Ok(SecretDir { file, _dir: dir })
    }
}

/// A host's arena name, removed on drop.
struct ArenaName(Location);

impl Drop for ArenaName {
    fn drop(&mut self) {
        let _ = Arena::remove(&self.0);
    }
}

struct Demo {
    exe: PathBuf,
    // Field order is drop order: processes first, then their files.
    workers: Vec<WorkerProc>,
    nodes: Vec<NodeProc>,
    arenas: Vec<ArenaName>,
    secret: SecretDir,
    rx: Receiver<Line>,
    clients: Vec<Client>,
    rate: u64,
}

fn stable_hash(i: usize) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&(i as u64).to_le_bytes())
}

impl Demo {
    fn start(clients: usize, rate: u64, fault_every: u64) -> Result<Demo, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
        let secret = SecretDir::new()?;
        let mut nodes = Vec::new();
        for id in 1..=NODES {
            let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
            nodes.push(NodeProc::spawn(&exe, id, any, &secret.file)?);
        }
        let bank = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let (tx, rx) = channel();
        let mut demo = Demo {
            exe,
            workers: Vec::new(),
            nodes,
            arenas: Vec::new(),
            secret,
            rx,
            clients: Vec::new(),
            rate,
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        for h in 0..HOSTS {
            let name = format!("demo-{}-{nanos:x}-h{}", std::process::id(), h + 1);
            let loc = Location::Shm(name.clone());
            let _ = Arena::remove(&loc);
            demo.arenas.push(ArenaName(loc));
            for w in 0..WORKERS_PER_HOST {
                let mut cmd = Command::new(&demo.exe);
                cmd.args(["demo-worker", "--arena", &name, "--nodes", &bank])
                    .args(["--host-id", &(h + 1).to_string()])
                    .args(["--worker", &w.to_string()])
                    .arg("--secret-file")
                    .arg(&demo.secret.file);
                if std::env::var_os("RUST_LOG").is_none() {
                    // Node-down warnings are expected here; the progress
                    // line reports the bank's state.
                    cmd.env("RUST_LOG", "error");
                }
                if h == 1 && fault_every > 0 {
                    cmd.args(["--fault-every", &fault_every.to_string()]);
                }
                if w == 0 {
                    // Room for every client, recreated sessions, and moves.
                    cmd.args(["--create", &(clients as u64 * 3 + 64).to_string()])
                        .arg("--replicate");
                }
                let index = demo.workers.len();
                demo.workers
                    .push(WorkerProc::spawn(&mut cmd, index, tx.clone())?);
                demo.wait_ready(index)?;
            }
        }
        let now = Instant::now();
        demo.clients = (0..clients)
            .map(|i| {
                let h = stable_hash(i);
                Client {
                    user: format!("shopper-{i}"),
                    host: (h % HOSTS as u64) as usize,
                    worker: ((h >> 8) % WORKERS_PER_HOST as u64) as usize,
                    sid: None,
                    exp: Expected::new(false),
                    created_at: now,
                    rng: fastrand::Rng::with_seed(h),
                    inflight: None,
                    orphan: None,
                    retry_at: None,
                    checked: false,
                    mismatched: false,
                }
            })
            .collect();
        Ok(demo)
    }

    fn wait_ready(&self, index: usize) -> Result<(), String> {
        match self
            .rx
            .recv_timeout(Duration::from_millis(START_TIMEOUT_MS))
        {
            Ok((i, Some(line))) if i == index && line.trim() == "0 ready" => Ok(()),
            Ok((i, line)) => Err(format!("worker {i} did not start: {line:?}")),
            Err(_) => Err(format!("worker {index} did not start in time")),
        }
    }

    fn run(&mut self, plan: Schedule, wipe_bank: bool) -> Result<Report, String> {
        Run::new(self, plan).go(wipe_bank)
    }

    /// Kills every node and starts it again, empty, on its address.
    fn wipe_bank(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.nodes[i].proc.kill9();
            let (id, addr) = (self.nodes[i].id, self.nodes[i].addr);
            self.nodes[i] = NodeProc::spawn(&self.exe, id, addr, &self.secret.file)?;
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill9();
        }
        for n in &mut self.nodes {
            n.proc.kill9();
        }
    }
}

mod run;
use run::Run;

/// How often the progress bar's counters are updated, on a terminal.
const PROGRESS_TICK_MS: u64 = 250;
/// How often a progress line is written when stderr is not a terminal.
const PROGRESS_LOG_MS: u64 = 5000;
