//! `sessio demo-worker`: one worker process of a demo web host. It serves
//! the driver's requests (see [`super::protocol`]) from the host's shared
//! arena, fetches sessions it misses from the bank, and, with
//! `--replicate`, runs the host's replicator thread.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};
use sessio_net::{Epoll, IoUring, Secret};

use super::protocol::{digest, encode_attrs};
use sessio_remote::failover::{
    FailoverConfig, FailoverError, NodeClients, Singleflight, fetch_and_install,
};
use sessio_remote::placement::{Placement, REPLICAS_DEFAULT};
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::runtime::Rt;

/// Items kept in a cart's `history` attribute.
pub const HISTORY_ITEMS_MAX: u32 = 8;
/// Bytes budgeted per session when the arena is created.
const SESSION_BYTES: u64 = 2048;

/// Arguments of `sessio demo-worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Shared-memory arena name of this host.
    #[arg(long)]
    pub arena: String,
    /// Create the arena (the host's first worker) for this many sessions.
    #[arg(long)]
    pub create: Option<u64>,
    /// This host's id.
    #[arg(long)]
    pub host_id: u64,
    /// This worker's index within the host.
    #[arg(long)]
    pub worker: u64,
    /// The bank: id=ip:port,...
    #[arg(long)]
    pub nodes: String,
    /// File holding the bank's secret.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Run the host's replicator thread in this worker.
    #[arg(long)]
    pub replicate: bool,
    /// Fault injection, to show the demo's check is real: store a wrong
    /// quantity on every Nth `add` while answering as if it were right
    /// (0: never).
    #[arg(long, default_value_t = 0, hide = true)]
    pub fault_every: u64,
}

/// Runs a worker until its stdin closes.
pub fn run(a: &WorkerArgs) -> Result<(), Box<dyn std::error::Error>> {
    // A Ctrl-C reaches the whole process group: leave the shutdown to the
    // driver, which kills its workers and removes their arenas itself.
    crate::signals::install_stop_signals();
    let loc = Location::Shm(a.arena.clone());
    let arena = match a.create {
        Some(n) => Arena::open(&loc, &ArenaConfig::for_sessions(n, SESSION_BYTES))?,
        None => Arena::open_existing(&loc)?,
    };
    let (secret, _) = Secret::load(&a.secret_file)?;
    let placement = Placement::new(Placement::parse_members(&a.nodes)?, REPLICAS_DEFAULT)?;
    let repl = if a.replicate {
        let mut cfg = ReplicatorConfig::new(placement.clone(), secret.clone(), a.host_id);
        // Notice a frozen or dead node fast: the demo freezes the bank.
        cfg.ack_timeout_ms = 1000;
        cfg.backoff_max_ms = 200;
        Some(Replicator::spawn_with(arena.try_clone()?, cfg)?)
    } else {
        None
    };
    let failover = FailoverConfig::new(a.host_id * 100 + a.worker, secret);
    let w = Worker {
        arena: &arena,
        placement: &placement,
        repl: repl.as_ref(),
        fault_every: a.fault_every,
        adds: std::cell::Cell::new(0),
    };
    if IoUring::available() {
        serve::<IoUring>(&w, failover)
    } else {
        serve::<Epoll>(&w, failover)
    }
}

/// What a request needs besides its failover connections.
struct Worker<'a> {
    arena: &'a Arena,
    placement: &'a Placement,
    repl: Option<&'a Replicator>,
    fault_every: u64,
    adds: std::cell::Cell<u64>,
}

fn serve<B: Rt>(
    w: &Worker<'_>,
    failover: FailoverConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut clients = NodeClients::<B>::new(failover, Arc::new(Singleflight::default()))?;
    let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let mut out = BufWriter::new(std::io::stdout().lock());
    writeln!(out, "0 ready")?;
    out.flush()?;
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = handle(w, &mut clients, line.trim());
        writeln!(out, "{answer}")?;
        // Answer a pipelined burst in one write, but never sit on an
        // answer while the driver waits.
        if input.buffer().is_empty() {
            out.flush()?;
        }
    }
}

fn handle<B: Rt>(w: &Worker<'_>, clients: &mut NodeClients<B>, line: &str) -> String {
    let mut it = line.split_whitespace();
    let seq = it.next().unwrap_or("0");
    let cmd = it.next().unwrap_or("");
    let args: Vec<&str> = it.collect();
    match request(w, clients, cmd, &args) {
        Ok(s) => format!("{seq} {s}"),
        Err(e) => format!("{seq} err why={}", e.replace(char::is_whitespace, "_")),
    }
}

fn request<B: Rt>(
    w: &Worker<'_>,
    clients: &mut NodeClients<B>,
    cmd: &str,
    args: &[&str],
) -> Result<String, String> {
    let (arena, placement) = (w.arena, w.placement);
    match cmd {
        "stats" => {
            let s = w.repl.ok_or("no replicator in this worker")?.stats();
            let up = s.nodes.iter().filter(|n| n.up).count();
            let fenced: u64 = s.nodes.iter().map(|n| n.fenced).sum();
            Ok(format!(
                "stats dirty={} lag_p50_us={} lag_p99_us={} lag_max_us={} lag_samples={} nodes_up={up} fenced={fenced} bytes_sent={}",
                s.dirty, s.lag_p50_us, s.lag_p99_us, s.lag_max_us, s.lag_samples, s.bytes_sent
            ))
        }
        "new" => {
            let user = args.first().ok_or("new: USER missing")?;
            let sid = arena
                .create(NewSession::default(), &[("user", user.as_bytes())])
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let g = arena.read(sid).map_err(|e| e.to_string())?;
            let (v, e) = (g.version(), g.epoch());
            let read_ns = t.elapsed().as_nanos();
            let d = g.to_owned();
            drop(g);
            let d = digest(d.attrs.iter().map(|a| (a.key.as_str(), &a.value[..])));
            Ok(format!(
                "ok sid={sid} v={v} e={e} read_ns={read_ns} d={d:x}"
            ))
        }
        "add" | "del" | "view" | "dump" => {
            let sid: Sid = args.first().and_then(|s| s.parse().ok()).ok_or("bad SID")?;
            let mut fetched = String::new();
            if arena.read(sid).is_err() {
                let t = Instant::now();
                match fetch_and_install(arena, sid, placement, clients) {
                    Ok(f) => {
                        let us = t.elapsed().as_micros();
                        let g = arena.read(sid).map_err(|e| e.to_string())?;
                        let d = g.to_owned();
                        let state =
                            encode_attrs(d.attrs.iter().map(|a| (a.key.as_str(), &a.value[..])));
                        fetched = format!(" fetch_us={us} fetched_v={} fetched={state}", f.version);
                    }
                    Err(FailoverError::NotFound { .. }) => {
                        return Ok(format!("gone fetch_us={}", t.elapsed().as_micros()));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            // The request's read: what every page view does.
            let t = Instant::now();
            let g = arena.read(sid).map_err(|e| e.to_string())?;
            let has_user = g.get("user").is_some();
            let (mut v, e) = (g.version(), g.epoch());
            let read_ns = t.elapsed().as_nanos();
            let d = g.to_owned();
            drop(g);
            let attrs = || d.attrs.iter().map(|a| (a.key.as_str(), &a.value[..]));
            let dump = (cmd == "dump").then(|| encode_attrs(attrs()));
            let seen = digest(attrs());
            if !has_user {
                return Err("session without user".into());
            }
            let ops = match (cmd, args) {
                ("add", [_, item, qty]) => vec![
                    Op::Set {
                        key: format!("cart:{item}"),
                        value: w.fault(qty).as_bytes().to_vec(),
                    },
                    history(format!("add {item} {qty}")),
                ],
                ("del", [_, item]) => vec![
                    Op::Remove {
                        key: format!("cart:{item}"),
                    },
                    history(format!("del {item}")),
                ],
                ("view" | "dump", [_]) => vec![],
                _ => return Err(format!("bad arguments for {cmd}")),
            };
            if !ops.is_empty() {
                v = arena.update(sid, &ops).map_err(|e| e.to_string())?;
            }
            let dump = dump.map(|d| format!(" attrs={d}")).unwrap_or_default();
            Ok(format!(
                "ok v={v} e={e} read_ns={read_ns} d={seen:x}{fetched}{dump}"
            ))
        }
        _ => Err(format!("unknown command {cmd:?}")),
    }
}

fn history(item: String) -> Op {
    Op::Append {
        key: "history".into(),
        item: item.into_bytes(),
        max_items: HISTORY_ITEMS_MAX,
    }
}

impl Worker<'_> {
    /// The quantity to store: `qty`, or a wrong one when a fault is due.
    fn fault<'q>(&self, qty: &'q str) -> &'q str {
        if self.fault_every == 0 {
            return qty;
        }
        self.adds.set(self.adds.get() + 1);
        if self.adds.get().is_multiple_of(self.fault_every) {
            if qty == "0" { "1" } else { "0" }
        } else {
            qty
        }
    }
}
