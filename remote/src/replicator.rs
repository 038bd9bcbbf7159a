//! The host-side replicator: drains the arena's dirty sessions and ships
//! them to their owner nodes, in batches, over long-lived connections.
//!
//! One thread runs one single-threaded runtime holding one future per node
//! plus a dispatcher, all sharing the state below (no locks: one thread).
//!
//! - The **dispatcher** wakes every `flush_interval_us`, takes dirty
//!   sessions from the arena (only those whose update queue is drained),
//!   and adds each SID to the pending set of every node it must reach now:
//!   its owners, or for an owner that is down the next node up in its
//!   ranking (hinted handoff). A down owner remembers the SID as *owed* and
//!   gets it when it returns.
//! - Each **node link** connects (with backoff), builds batches from its
//!   pending set — for each SID, `delta_since(version this node acked)`:
//!   the op batches it lacks or the full record — sends up to
//!   `in_flight_batches_max` batches, and applies the acks: `Applied`
//!   advances the node's acked version (and the arena's, `mark_acked`),
//!   `NeedFull` forgets it so the full record goes next, `Fenced` means this
//!   host no longer owns the session. A handshake showing an incarnation
//!   other than the one the arena recorded for the node means it restarted
//!   empty: its acks are forgotten (here and in the arena), the new
//!   incarnation is recorded, and every session is marked dirty, so its
//!   share is resent. Once every owner holds the current version again,
//!   stand-ins are told to drop their hinted copies. An idle link sleeps
//!   until the dispatcher queues work for it (or it is time to ping).
//! - A **starting** replicator marks every session dirty once and trusts
//!   the arena's acks of nodes whose recorded incarnation is known, so it
//!   sends only what those nodes lack, not everything.
//!
//! Nothing here ever blocks the arena's `update`: the replicator reads the
//! arena like any other handle, and a bank that is down only makes dirty
//! state pile up (bounded by the arena itself). See `docs/REPLICATION.md`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use sessio_engine::{Arena, Dirty, Location, OpenError, SessionError, Sid};
use sessio_net::{
    AckStatus, Backoff, Client, ClientConfig, Delta, DeltaBatch, DeltaEntry, Epoll, Identity,
    IoUring, Message, Ping, Secret,
};

use crate::placement::Placement;
use crate::runtime::Rt;

/// Default for [`ReplicatorConfig::flush_interval_us`].
pub const FLUSH_INTERVAL_US_DEFAULT: u64 = 500;
/// Default for [`ReplicatorConfig::batch_bytes_max`].
pub const BATCH_BYTES_MAX_DEFAULT: u64 = 512 * 1024;
/// Default for [`ReplicatorConfig::batch_entries_max`].
pub const BATCH_ENTRIES_MAX_DEFAULT: usize = 1024;
/// Default for [`ReplicatorConfig::dirty_take_max`].
pub const DIRTY_TAKE_MAX_DEFAULT: usize = 8192;

/// How a replicator behaves.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// The bank and the replication factor.
    pub placement: Placement,
    /// The bank's shared secret.
    pub secret: Secret,
    /// This host's id in handshakes and batches.
    pub host_id: u64,
    /// How often dirty sessions are collected, in microseconds.
    pub flush_interval_us: u64,
    /// Bytes of deltas in one batch (a larger single record still goes).
    pub batch_bytes_max: u64,
    /// Entries in one batch (at most the protocol's 4096).
    pub batch_entries_max: usize,
    /// Dirty sessions taken from the arena per tick.
    pub dirty_take_max: usize,
    /// Batches sent to one node before waiting for an ack.
    pub in_flight_batches_max: usize,
    /// An ack not received this long marks the node down, in ms.
    pub ack_timeout_ms: u64,
    /// Connect plus handshake time allowed, in ms.
    pub handshake_timeout_ms: u64,
    /// First reconnect delay, in ms.
    pub backoff_min_ms: u64,
    /// Largest reconnect delay, in ms.
    pub backoff_max_ms: u64,
    /// An idle connection is pinged this often (finds dead nodes), in ms.
    pub ping_interval_ms: u64,
    /// On stop, time allowed to ship what is pending, in ms.
    pub drain_timeout_ms: u64,
    /// Use the epoll engine even where `io_uring` works.
    pub force_epoll: bool,
}

impl ReplicatorConfig {
    /// Defaults for everything but the bank, its secret and this host's id.
    pub fn new(placement: Placement, secret: Secret, host_id: u64) -> ReplicatorConfig {
        ReplicatorConfig {
            placement,
            secret,
            host_id,
            flush_interval_us: FLUSH_INTERVAL_US_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            batch_entries_max: BATCH_ENTRIES_MAX_DEFAULT,
            dirty_take_max: DIRTY_TAKE_MAX_DEFAULT,
            in_flight_batches_max: 4,
            ack_timeout_ms: 2_000,
            handshake_timeout_ms: 1_000,
            backoff_min_ms: 20,
            backoff_max_ms: 1_000,
            ping_interval_ms: 250,
            drain_timeout_ms: 2_000,
            force_epoll: false,
        }
    }
}

/// Starting a replicator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicatorError {
    /// The arena could not be opened.
    #[error("opening the arena: {0}")]
    Open(#[from] OpenError),
    /// The replicator thread could not be started.
    #[error("starting the replicator thread: {0}")]
    Thread(std::io::Error),
    /// The replicator thread panicked.
    #[error("the replicator thread panicked")]
    Panicked,
}

/// One node as the replicator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Node id.
    pub id: u16,
    /// Connected (or not yet known to be down).
    pub up: bool,
    /// Incarnation seen in the last handshake.
    pub incarnation: Option<u64>,
    /// Sessions waiting to be sent to it.
    pub pending: u64,
    /// Delta entries sent and not yet acknowledged.
    pub in_flight: u64,
    /// Sessions changed while it was down, to resend when it returns.
    pub owed: u64,
    /// Entries it acknowledged as applied.
    pub applied: u64,
    /// `NeedFull` answers.
    pub need_full: u64,
    /// `Fenced` answers.
    pub fenced: u64,
    /// `Refused` answers.
    pub refused: u64,
    /// Bytes of batches sent.
    pub bytes_sent: u64,
    /// Successful handshakes.
    pub connects: u64,
    /// Handshakes that showed a new incarnation (a restarted node).
    pub new_incarnations: u64,
    /// The last connection error.
    pub last_error: Option<String>,
}

/// A snapshot of the replicator's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicatorStats {
    /// Sessions whose current version is not yet acknowledged by `R` nodes.
    pub dirty: u64,
    /// Per node.
    pub nodes: Vec<NodeStats>,
    /// Bytes of batches sent, all nodes.
    pub bytes_sent: u64,
    /// Bytes sent per second over the last full second.
    pub bytes_per_sec: u64,
    /// Update-to-ack lag samples (a session reaching `R` acks).
    pub lag_samples: u64,
    /// Median lag, µs (upper bound of its power-of-two bucket).
    pub lag_p50_us: u64,
    /// 99th percentile lag, µs (upper bound of its power-of-two bucket).
    pub lag_p99_us: u64,
    /// Largest lag seen, µs.
    pub lag_max_us: u64,
    /// The lag histogram since start: `lag_buckets[b]` samples took less
    /// than `2^b` µs (and at least `2^(b-1)`); the last bucket holds the
    /// rest. Subtract an earlier snapshot's to see one interval
    /// ([`lag_quantile_since`](Self::lag_quantile_since)).
    pub lag_buckets: [u64; LAG_BUCKETS],
    /// Sum of all lag samples, µs.
    pub lag_sum_us: u64,
    /// Dispatcher ticks run.
    pub ticks: u64,
    /// Which engine runs the connections.
    pub backend: &'static str,
    /// The arena's own counters (sessions, heap, collections), refreshed
    /// about once a second.
    pub arena: Option<sessio_engine::ArenaStats>,
}

impl ReplicatorStats {
    /// The `q` quantile of the lag samples taken after `earlier` (a
    /// snapshot of the same replicator), in µs: the upper bound of its
    /// power-of-two bucket, 0 without samples.
    pub fn lag_quantile_since(&self, earlier: &ReplicatorStats, q: f64) -> u64 {
        let mut h = LagHistogram::default();
        for (b, (now, then)) in self
            .lag_buckets
            .iter()
            .zip(&earlier.lag_buckets)
            .enumerate()
        {
            h.buckets[b] = now.saturating_sub(*then);
            h.count += h.buckets[b];
        }
        h.max_us = u64::MAX;
        h.quantile(q)
    }
}

/// A running replicator thread. Dropping it stops the thread (after
/// shipping what is pending, within `drain_timeout_ms`).
#[derive(Debug)]
pub struct Replicator {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ReplicatorStats>>,
    thread: Option<JoinHandle<()>>,
}

impl Replicator {
    /// Opens the arena at `location` (which must exist) and starts
    /// replicating it on a new thread.
    pub fn spawn(
        location: &Location,
        config: ReplicatorConfig,
    ) -> Result<Replicator, ReplicatorError> {
        let arena = Arena::open_existing(location)?;
        Self::spawn_with(arena, config)
    }

    /// Starts replicating through an arena handle this thread opened.
    pub fn spawn_with(
        arena: Arena,
        config: ReplicatorConfig,
    ) -> Result<Replicator, ReplicatorError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ReplicatorStats::default()));
        let thread = std::thread::Builder::new()
            .name("sessio-replicator".into())
            .spawn({
                let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
                move || {
                    if !config.force_epoll && IoUring::available() {
                        run::<IoUring>(arena, &config, &stop, &stats);
                    } else {
                        run::<Epoll>(arena, &config, &stop, &stats);
                    }
                }
            })
            .map_err(ReplicatorError::Thread)?;
        Ok(Replicator {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The latest counters (refreshed every tick).
    pub fn stats(&self) -> ReplicatorStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops after shipping what is pending (bounded by `drain_timeout_ms`).
    pub fn stop(mut self) -> Result<(), ReplicatorError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ReplicatorError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ReplicatorError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// What the replicator knows of one session.
#[derive(Debug, Default)]
struct SidState {
    version: u64,
    epoch: u64,
    /// Versions acknowledged, per node (a few entries).
    acks: Vec<(u16, u64)>,
    /// When the current, not yet fully acknowledged, version was first seen.
    since: Option<Instant>,
    removed: bool,
    fenced: bool,
}

impl SidState {
    fn acked_by(&self, node: u16) -> u64 {
        self.acks
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |&(_, v)| v)
    }

    fn set_ack(&mut self, node: u16, version: u64) {
        match self.acks.iter_mut().find(|(n, _)| *n == node) {
            Some(a) => a.1 = version,
            None => self.acks.push((node, version)),
        }
    }

    fn forget(&mut self, node: u16) {
        self.acks.retain(|(n, _)| *n != node);
    }

    fn holders(&self) -> usize {
        self.acks.iter().filter(|(_, v)| *v >= self.version).count()
    }
}

#[derive(Debug, Default)]
struct NodeLink {
    stats: NodeStats,
    pending: HashSet<Sid>,
    owed: HashSet<Sid>,
    /// Wakes the link's future when `pending` gains work.
    wake: Wake,
}

/// A one-thread wake-up: the dispatcher sets it when it queues work, the
/// idle link waits on it (with a timeout) instead of polling.
#[derive(Debug, Default)]
struct Wake {
    set: bool,
    waker: Option<std::task::Waker>,
}

impl Wake {
    fn notify(&mut self) {
        self.set = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Resolves once link `id` has been notified (or is gone).
fn notified<'a>(ctx: &'a Ctx<'_>, id: u16) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        let mut st = ctx.state.borrow_mut();
        let Some(l) = st.link(id) else {
            return std::task::Poll::Ready(());
        };
        if std::mem::take(&mut l.wake.set) {
            std::task::Poll::Ready(())
        } else {
            l.wake.waker = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
}

/// Buckets of the lag histogram (powers of two of microseconds).
pub const LAG_BUCKETS: usize = 32;

/// Power-of-two buckets of microseconds.
#[derive(Debug, Default)]
struct LagHistogram {
    buckets: [u64; LAG_BUCKETS],
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl LagHistogram {
    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let b = (64 - us.leading_zeros()) as usize;
        self.buckets[b.min(LAG_BUCKETS - 1)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // Counts stay far below 2^52: the cast is exact.
        #[allow(clippy::cast_precision_loss)]
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if b == 0 {
                    0
                } else {
                    ((1u64 << b) - 1).min(self.max_us)
                };
            }
        }
        self.max_us
    }
}

struct State {
    placement: Placement,
    sids: HashMap<Sid, SidState>,
    nodes: Vec<NodeLink>,
    lag: LagHistogram,
    ticks: u64,
    rate_mark: (Instant, u64),
    bytes_per_sec: u64,
}

impl State {
    fn link(&mut self, id: u16) -> Option<&mut NodeLink> {
        self.nodes.iter_mut().find(|n| n.stats.id == id)
    }

    fn is_up(&self, id: u16) -> bool {
        self.nodes.iter().any(|n| n.stats.id == id && n.stats.up)
    }

    /// Queues `sid` for every node that must hold it now; owners that are
    /// down owe it.
    fn route(&mut self, sid: Sid) {
        let owners = self.placement.owners(&sid.0);
        let targets = self.placement.targets(&sid.0, |id| self.is_up(id));
        for o in owners {
            if !self.is_up(o)
                && let Some(l) = self.link(o)
            {
                l.owed.insert(sid);
            }
        }
        for t in targets {
            if let Some(l) = self.link(t) {
                l.pending.insert(sid);
                l.wake.notify();
            }
        }
        // A removal also goes to every other node that acknowledged a copy
        // (a stand-in's hinted one), or is owed to it while it is down, so
        // no copy is left for a fetch to bring the session back from.
        let holders: Vec<u16> = match self.sids.get(&sid) {
            Some(s) if s.removed => s.acks.iter().filter(|a| a.1 > 0).map(|a| a.0).collect(),
            _ => Vec::new(),
        };
        for n in holders {
            let up = self.is_up(n);
            if let Some(l) = self.link(n) {
                if up {
                    l.pending.insert(sid);
                    l.wake.notify();
                } else {
                    l.owed.insert(sid);
                }
            }
        }
    }

    fn snapshot(&mut self, backend: &'static str) -> ReplicatorStats {
        let bytes_sent: u64 = self.nodes.iter().map(|n| n.stats.bytes_sent).sum();
        let (mark, at) = self.rate_mark;
        let dt = mark.elapsed();
        if dt >= Duration::from_secs(1) {
            #[allow(clippy::cast_precision_loss)] // a rate; precision is moot
            let rate = (bytes_sent - at) as f64 / dt.as_secs_f64();
            self.bytes_per_sec = rate as u64;
            self.rate_mark = (Instant::now(), bytes_sent);
        }
        ReplicatorStats {
            dirty: self.sids.values().filter(|s| s.since.is_some()).count() as u64,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeStats {
                    pending: n.pending.len() as u64,
                    owed: n.owed.len() as u64,
                    ..n.stats.clone()
                })
                .collect(),
            bytes_sent,
            bytes_per_sec: self.bytes_per_sec,
            lag_samples: self.lag.count,
            lag_p50_us: self.lag.quantile(0.5),
            lag_p99_us: self.lag.quantile(0.99),
            lag_max_us: self.lag.max_us,
            lag_buckets: self.lag.buckets,
            lag_sum_us: self.lag.sum_us,
            ticks: self.ticks,
            backend,
            arena: None,
        }
    }
}

struct Ctx<'a> {
    arena: &'a Arena,
    config: &'a ReplicatorConfig,
    state: &'a RefCell<State>,
    stop: &'a AtomicBool,
    /// Set once the dispatcher has taken its last dirty sessions.
    drained: &'a AtomicBool,
}

// The arena handle is moved in so it lives (and closes) with this thread.
#[allow(clippy::needless_pass_by_value)]
fn run<B: Rt>(
    arena: Arena,
    config: &ReplicatorConfig,
    stop: &AtomicBool,
    stats: &Mutex<ReplicatorStats>,
) {
    let placement = config.placement.clone();
    let nodes = placement
        .members()
        .iter()
        .map(|m| NodeLink {
            stats: NodeStats {
                id: m.id,
                up: true,
                // The incarnation an earlier replicator of this arena saw:
                // while the node still announces it, the acks recorded in
                // the arena hold (see `seed_acks`).
                incarnation: arena.replica_incarnation(m.id),
                ..NodeStats::default()
            },
            ..NodeLink::default()
        })
        .collect();
    let state = RefCell::new(State {
        placement,
        sids: HashMap::new(),
        nodes,
        lag: LagHistogram::default(),
        ticks: 0,
        rate_mark: (Instant::now(), 0),
        bytes_per_sec: 0,
    });
    // A fresh replicator looks at every session once: what an earlier
    // replicator saw acknowledged by nodes that kept their incarnation is
    // not sent again (`seed_acks`); the rest is.
    arena.mark_all_dirty();
    let drained = AtomicBool::new(false);
    let ctx = Ctx {
        arena: &arena,
        config,
        state: &state,
        stop,
        drained: &drained,
    };
    B::block_on(async {
        let links = config
            .placement
            .members()
            .iter()
            .map(|m| node_link::<B>(&ctx, m.id, m.addr));
        let links = futures_util::future::join_all(links);
        let dispatch = dispatcher::<B>(&ctx, stats);
        futures_util::future::join(dispatch, links).await;
    });
    if let Ok(mut s) = stats.lock() {
        *s = state.borrow_mut().snapshot(B::NAME);
    }
}

async fn dispatcher<B: Rt>(ctx: &Ctx<'_>, stats: &Mutex<ReplicatorStats>) {
    let interval = Duration::from_micros(ctx.config.flush_interval_us.max(1));
    let mut dirty = Vec::with_capacity(ctx.config.dirty_take_max);
    let mut arena_stats: Option<(Instant, sessio_engine::ArenaStats)> = None;
    loop {
        let last = ctx.stop.load(Ordering::SeqCst);
        loop {
            ctx.arena.take_dirty(ctx.config.dirty_take_max, &mut dirty);
            let now = Instant::now();
            let mut st = ctx.state.borrow_mut();
            for d in &dirty {
                let sid = match *d {
                    Dirty::Changed {
                        sid,
                        version,
                        epoch,
                        ..
                    } => {
                        if !st.sids.contains_key(&sid)
                            && seed_acks(ctx.arena, &mut st, sid, version, epoch)
                        {
                            // Every owner holds this version already.
                            continue;
                        }
                        let s = st.sids.entry(sid).or_default();
                        if s.version != version || s.epoch != epoch || s.removed {
                            if s.epoch != epoch {
                                // Acks were for copies under another owner.
                                s.acks.clear();
                            }
                            s.version = version;
                            s.epoch = epoch;
                            s.removed = false;
                            s.fenced = false;
                            s.since.get_or_insert(now);
                        }
                        sid
                    }
                    Dirty::Removed { sid } => {
                        let s = st.sids.entry(sid).or_default();
                        if s.epoch == 0 {
                            // Never seen alive by this replicator: the
                            // creation epoch is the best guess; a newer
                            // owner's copy stays (fenced), which is safe.
                            s.epoch = 1;
                        }
                        s.removed = true;
                        s.since.get_or_insert(now);
                        sid
                    }
                };
                st.route(sid);
            }
            drop(st);
            // A full take means more may be waiting: go again at once.
            if dirty.len() < ctx.config.dirty_take_max {
                break;
            }
        }
        {
            let mut st = ctx.state.borrow_mut();
            st.ticks += 1;
            let mut snap = st.snapshot(B::NAME);
            drop(st);
            // The arena's counters ask the kernel about every handle: once a
            // second is plenty.
            if arena_stats
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1))
            {
                arena_stats = Some((Instant::now(), ctx.arena.stats()));
            }
            snap.arena = arena_stats.as_ref().map(|(_, a)| a.clone());
            if let Ok(mut s) = stats.lock() {
                *s = snap;
            }
        }
        if last {
            ctx.drained.store(true, Ordering::SeqCst);
            // Idle links wait for work: wake them to see the stop.
            for l in &mut ctx.state.borrow_mut().nodes {
                l.wake.notify();
            }
            return;
        }
        B::sleep(interval).await;
    }
}

/// One delta entry sent and not yet acknowledged.
struct Sent {
    sid: Sid,
    new_version: u64,
    /// Ownership epoch it was sent under.
    epoch: u64,
    /// A `Remove` telling a stand-in to drop its hinted copy: every owner
    /// holds the current version again.
    drops_hint: bool,
}

async fn node_link<B: Rt>(ctx: &Ctx<'_>, id: u16, addr: std::net::SocketAddr) {
    let cfg = ctx.config;
    let identity = Identity {
        id: ctx.config.host_id,
        incarnation: Identity::with_random_incarnation(0).map_or(1, |i| i.incarnation),
    };
    let mut cc = ClientConfig::new(identity);
    cc.handshake_timeout_ms = cfg.handshake_timeout_ms;
    cc.io_timeout_ms = cfg.ack_timeout_ms;
    cc.in_flight_bytes_max = cfg.batch_bytes_max * cfg.in_flight_batches_max as u64 * 2;
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.backoff_min_ms),
        Duration::from_millis(cfg.backoff_max_ms),
    );
    let mut next_attempt = Instant::now();
    let mut conn: Option<Client<B>> = None;
    let mut in_flight: VecDeque<Vec<Sent>> = VecDeque::new();
    let mut last_io = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let idle_sleep = Duration::from_micros(cfg.flush_interval_us.max(1));
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                Instant::now() + Duration::from_millis(cfg.drain_timeout_ms)
            });
            let idle = ctx.drained.load(Ordering::SeqCst)
                && in_flight.is_empty()
                && ctx
                    .state
                    .borrow_mut()
                    .link(id)
                    .is_none_or(|l| l.pending.is_empty());
            if idle || conn.is_none() || Instant::now() >= deadline {
                return;
            }
        }
        let Some(client) = conn.as_mut() else {
            let now = Instant::now();
            if now < next_attempt {
                B::sleep((next_attempt - now).min(Duration::from_millis(20))).await;
                continue;
            }
            match Client::<B>::connect(addr, cc.clone(), cfg.secret.clone()).await {
                Ok(c) => {
                    backoff = Backoff::new(
                        Duration::from_millis(cfg.backoff_min_ms),
                        Duration::from_millis(cfg.backoff_max_ms),
                    );
                    on_up(ctx, id, c.peer().identity.incarnation);
                    conn = Some(c);
                    last_io = Instant::now();
                }
                Err(e) => {
                    on_down(ctx, id, &mut in_flight, &e.to_string());
                    next_attempt = Instant::now() + backoff.next_delay();
                }
            }
            continue;
        };
        let result: Result<(), String> = async {
            while in_flight.len() < cfg.in_flight_batches_max.max(1) {
                let Some((batch, sent)) = build_batch(ctx, id) else {
                    break;
                };
                let before = client.in_flight_bytes();
                client
                    .send(&Message::DeltaBatch(batch))
                    .await
                    .map_err(|e| e.to_string())?;
                let bytes = client.in_flight_bytes() - before;
                if let Some(l) = ctx.state.borrow_mut().link(id) {
                    l.stats.bytes_sent += bytes;
                    l.stats.in_flight += sent.len() as u64;
                }
                in_flight.push_back(sent);
            }
            if !in_flight.is_empty() {
                let reply = client.recv().await.map_err(|e| e.to_string())?;
                last_io = Instant::now();
                match reply {
                    Message::Ack(ack) => {
                        let sent = in_flight.pop_front().unwrap_or_default();
                        if ack.entries.len() != sent.len() {
                            return Err(format!(
                                "ack has {} entries for a batch of {}",
                                ack.entries.len(),
                                sent.len()
                            ));
                        }
                        apply_acks(ctx, id, &sent, &ack.entries);
                    }
                    Message::Pong(_) => {}
                    other => return Err(format!("unexpected {:?} from node", other.kind())),
                }
            } else if last_io.elapsed() >= Duration::from_millis(cfg.ping_interval_ms) {
                // Finds a node that died while we had nothing to say.
                let reply = client
                    .call(&Message::Ping(Ping { nonce: 0 }))
                    .await
                    .map_err(|e| e.to_string())?;
                if !matches!(reply, Message::Pong(_)) {
                    return Err(format!("unexpected {:?} to a ping", reply.kind()));
                }
                last_io = Instant::now();
            } else {
                // Until the dispatcher queues work, or it is time to ping.
                let ping =
                    Duration::from_millis(cfg.ping_interval_ms).saturating_sub(last_io.elapsed());
                let _ = B::timeout(ping.max(idle_sleep), notified(ctx, id)).await;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::info!(node = id, "replica link down: {e}");
            conn = None;
            on_down(ctx, id, &mut in_flight, &e);
            next_attempt = Instant::now() + backoff.next_delay();
        }
    }
}

/// Learns what the arena remembers of a session this replicator has not
/// seen yet: the acks of nodes whose incarnation is still the one recorded
/// with them. Returns true when every owner holds `version` already, so
/// there is nothing to send.
fn seed_acks(arena: &Arena, st: &mut State, sid: Sid, version: u64, epoch: u64) -> bool {
    let Ok(acks) = arena.acked(sid) else {
        return false;
    };
    let mut s = SidState::default();
    for (node, v) in acks {
        let trusted = st
            .nodes
            .iter()
            .any(|n| n.stats.id == node && n.stats.incarnation.is_some());
        if v > 0 && v <= version && trusted {
            s.set_ack(node, v);
        }
    }
    let current = st
        .placement
        .owners(&sid.0)
        .iter()
        .all(|&o| s.acked_by(o) == version);
    s.epoch = epoch;
    if current {
        s.version = version;
    }
    // Otherwise the caller takes the version in as a change to ship.
    st.sids.insert(sid, s);
    current
}

/// A handshake succeeded. An incarnation other than the one recorded means
/// the node lost its copies (or was never seen): its acks are forgotten,
/// here and in the arena, the new incarnation is recorded, and every
/// session is looked at again so the node's share is resent.
fn on_up(ctx: &Ctx<'_>, id: u16, incarnation: u64) {
    let mut st = ctx.state.borrow_mut();
    let Some(l) = st.link(id) else { return };
    let known = l.stats.incarnation;
    let was_down = !l.stats.up;
    l.stats.incarnation = Some(incarnation);
    l.stats.up = true;
    l.stats.connects += 1;
    l.stats.last_error = None;
    if known != Some(incarnation) {
        if known.is_some() {
            l.stats.new_incarnations += 1;
            tracing::info!(
                node = id,
                "node restarted (new incarnation): resending its share"
            );
        }
        // Queued removals stay (a node that lost its copies may still
        // hold one the failover push gave it); everything else is resent
        // from the dirty marks below.
        let (pending, owed) = (std::mem::take(&mut l.pending), std::mem::take(&mut l.owed));
        let keep: HashSet<Sid> = pending
            .into_iter()
            .chain(owed)
            .filter(|sid| st.sids.get(sid).is_some_and(|s| s.removed))
            .collect();
        if let Some(l) = st.link(id) {
            l.pending = keep;
        }
        for s in st.sids.values_mut() {
            s.forget(id);
        }
        drop(st);
        // Old acks go before the new incarnation is recorded, so a crash
        // in between leaves a mismatch, never stale acks that look valid.
        ctx.arena.forget_acks(id);
        if !ctx.arena.set_replica_incarnation(id, incarnation) {
            tracing::warn!(
                node = id,
                "the arena's replica table is full: a restarted replicator will resend this node's share"
            );
        }
        ctx.arena.mark_all_dirty();
    } else if was_down {
        // Hand back what went to stand-ins while it was away.
        let owed: Vec<Sid> = l.owed.drain().collect();
        l.pending.extend(owed);
    }
}

/// The link failed: hand its pending and unacknowledged sessions to the
/// next nodes in their rankings, and owe them to this one.
fn on_down(ctx: &Ctx<'_>, id: u16, in_flight: &mut VecDeque<Vec<Sent>>, error: &str) {
    let mut st = ctx.state.borrow_mut();
    let Some(l) = st.link(id) else { return };
    l.stats.last_error = Some(error.to_string());
    l.stats.in_flight = 0;
    let was_up = l.stats.up;
    l.stats.up = false;
    let mut moved: Vec<Sid> = l.pending.drain().collect();
    moved.extend(in_flight.drain(..).flatten().map(|s| s.sid));
    if was_up {
        tracing::warn!(node = id, "replica node down: {error}");
    }
    for sid in moved {
        if st.sids.get(&sid).is_some_and(|s| s.fenced) {
            continue;
        }
        st.route(sid);
    }
}

/// Takes sessions off the node's pending set into the next batch; `None`
/// when nothing is left to send.
fn build_batch(ctx: &Ctx<'_>, id: u16) -> Option<(DeltaBatch, Vec<Sent>)> {
    loop {
        match build_once(ctx, id) {
            Built::Batch(b, sent) => return Some((b, sent)),
            Built::UpToDate => {}
            Built::Nothing => return None,
        }
    }
}

enum Built {
    Batch(DeltaBatch, Vec<Sent>),
    /// Everything taken was already current on the node.
    UpToDate,
    Nothing,
}

/// Adds a whole-record entry; returns the bytes it adds to the batch.
fn push_full(
    entries: &mut Vec<DeltaEntry>,
    sent: &mut Vec<Sent>,
    sid: Sid,
    version: u64,
    epoch: u64,
    record: Vec<u8>,
) -> u64 {
    let bytes = record.len() as u64 + 64;
    entries.push(DeltaEntry {
        sid: sid.0,
        base_version: 0,
        new_version: version,
        epoch,
        body: Delta::Full(record),
    });
    sent.push(Sent {
        sid,
        new_version: version,
        epoch,
        drops_hint: false,
    });
    bytes
}

/// Adds a `Remove` entry at the session's current version and epoch (a
/// removal, or a stand-in dropping its hinted copy); returns the bytes it
/// adds to the batch.
fn push_remove(
    entries: &mut Vec<DeltaEntry>,
    sent: &mut Vec<Sent>,
    sid: Sid,
    s: &SidState,
    base: u64,
    drops_hint: bool,
) -> u64 {
    entries.push(DeltaEntry {
        sid: sid.0,
        base_version: base,
        new_version: s.version,
        epoch: s.epoch,
        body: Delta::Remove,
    });
    sent.push(Sent {
        sid,
        new_version: s.version,
        epoch: s.epoch,
        drops_hint,
    });
    64
}

fn build_once(ctx: &Ctx<'_>, id: u16) -> Built {
    let cfg = ctx.config;
    let entries_max = cfg.batch_entries_max.clamp(1, 4096);
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    // Owners this replicator reached and still reaches: only their acks
    // may let a stand-in drop its hinted copy.
    let confirmed: Vec<u16> = st
        .nodes
        .iter()
        .filter(|n| n.stats.up && n.stats.connects > 0)
        .map(|n| n.stats.id)
        .collect();
    let Some(link) = st.nodes.iter_mut().find(|n| n.stats.id == id) else {
        return Built::Nothing;
    };
    if link.pending.is_empty() {
        return Built::Nothing;
    }
    let mut entries = Vec::new();
    let mut sent = Vec::new();
    let mut bytes = 0u64;
    let mut taken = Vec::new();
    for &sid in &link.pending {
        if entries.len() >= entries_max || bytes >= cfg.batch_bytes_max {
            break;
        }
        taken.push(sid);
        let Some(s) = st.sids.get(&sid) else { continue };
        if s.fenced {
            continue;
        }
        let base = s.acked_by(id);
        if !s.removed
            && let Some(hinted) = stand_in(&st.placement, s, sid, id, &confirmed)
        {
            // This node stood in for an owner that holds the current
            // version again: drop the hinted copy (if any), send nothing.
            if hinted {
                bytes += push_remove(&mut entries, &mut sent, sid, s, base, true);
                // Forgotten now: should the drop never land, the cost is a
                // copy left behind, never an ack claiming one that is gone.
                let _ = ctx.arena.forget_ack(sid, id);
            }
            continue;
        }
        if s.removed {
            bytes += push_remove(&mut entries, &mut sent, sid, s, base, false);
            continue;
        }
        match ctx.arena.delta_since(sid, base) {
            // Current on the node already, or gone from the arena (its
            // removal comes as a dirty entry of its own).
            Ok(sessio_engine::Delta::UpToDate) | Err(SessionError::NotFound) => {}
            Ok(sessio_engine::Delta::Ops {
                version,
                epoch,
                batches,
            }) if batches.len() + entries.len() <= entries_max => {
                let first = version - batches.len() as u64;
                for (i, ops) in batches.into_iter().enumerate() {
                    let v = first + i as u64;
                    bytes += ops.len() as u64 + 64;
                    entries.push(DeltaEntry {
                        sid: sid.0,
                        base_version: v,
                        new_version: v + 1,
                        epoch,
                        body: Delta::Ops(ops),
                    });
                    sent.push(Sent {
                        sid,
                        new_version: v + 1,
                        epoch,
                        drops_hint: false,
                    });
                }
            }
            Ok(sessio_engine::Delta::Ops { .. }) if !entries.is_empty() => {
                // Does not fit this batch: next one.
                taken.pop();
                break;
            }
            // More op batches than one delta batch may carry at all: ship
            // the whole record instead (else this session would never fit,
            // and the link would spin on it).
            Ok(sessio_engine::Delta::Ops { .. }) => {
                if let Ok(sessio_engine::Delta::Full {
                    version,
                    epoch,
                    bytes: record,
                }) = ctx.arena.delta_since(sid, 0)
                {
                    bytes += push_full(&mut entries, &mut sent, sid, version, epoch, record);
                }
            }
            Ok(sessio_engine::Delta::Full {
                version,
                epoch,
                bytes: record,
            }) => {
                bytes += push_full(&mut entries, &mut sent, sid, version, epoch, record);
            }
            Err(e) => tracing::warn!(%sid, "cannot build a delta: {e}"),
        }
    }
    for sid in &taken {
        link.pending.remove(sid);
    }
    if entries.is_empty() {
        // Everything taken was up to date: maybe it is fully acked now.
        for sid in taken {
            settle(st, sid);
        }
        return Built::UpToDate;
    }
    Built::Batch(
        DeltaBatch {
            host_id: cfg.host_id,
            entries,
        },
        sent,
    )
}

/// For node `id`, not an owner of `sid`, whose owners (all reached by this
/// replicator and up) all hold the current version: `Some(true)` if `id` still holds a hinted copy, `Some(false)`
/// if not. `None` when `id` is an owner, or an owner still lacks the
/// current version (so `id` must stand in).
fn stand_in(
    placement: &Placement,
    s: &SidState,
    sid: Sid,
    id: u16,
    confirmed: &[u16],
) -> Option<bool> {
    // Most entries go to an owner: answer that without the ranking.
    if placement.is_owner(&sid.0, id) {
        return None;
    }
    let owners = placement.owners(&sid.0);
    if owners
        .iter()
        .any(|o| s.acked_by(*o) < s.version || !confirmed.contains(o))
    {
        return None;
    }
    Some(s.acked_by(id) > 0)
}

/// Records the lag of a session whose current version reached `R` nodes.
fn settle(st: &mut State, sid: Sid) {
    let r = st.placement.replicas();
    let Some(s) = st.sids.get_mut(&sid) else {
        return;
    };
    if s.since.is_some() && s.holders() >= r {
        if let Some(t) = s.since.take() {
            st.lag.record(t.elapsed());
        }
        if s.removed {
            st.sids.remove(&sid);
        }
    }
}

fn apply_acks(ctx: &Ctx<'_>, id: u16, sent: &[Sent], acks: &[sessio_net::AckEntry]) {
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let mut resend = Vec::new();
    let mut settled = Vec::new();
    let mut hints = Vec::new();
    let replicas = st.placement.replicas();
    let (mut applied, mut need_full, mut fenced, mut refused) = (0, 0, 0, 0);
    for (s, a) in sent.iter().zip(acks) {
        let Some(ss) = st.sids.get_mut(&s.sid) else {
            continue;
        };
        match a.status {
            AckStatus::Applied if s.drops_hint => {
                applied += 1;
                ss.forget(id);
                let _ = ctx.arena.forget_ack(s.sid, id);
            }
            // An ack for a copy under an epoch this host no longer writes
            // (the session was installed anew meanwhile) says nothing of
            // the current one.
            AckStatus::Applied if s.epoch != ss.epoch => applied += 1,
            AckStatus::Applied => {
                applied += 1;
                let v = if ss.removed {
                    s.new_version
                } else {
                    a.version.min(ss.version)
                };
                if v >= ss.acked_by(id) {
                    ss.set_ack(id, v);
                }
                if !ss.removed && v > 0 {
                    let _ = ctx.arena.mark_acked(s.sid, id, v);
                }
                // An owner caught up: stand-ins holding a hinted copy may
                // drop it now (`build_once` checks every owner).
                if !ss.removed && ss.acks.len() > replicas {
                    hints.extend(
                        ss.acks
                            .iter()
                            .filter(|&&(n, v)| n != id && v > 0)
                            .map(|&(n, _)| (n, s.sid)),
                    );
                }
                settled.push(s.sid);
            }
            AckStatus::NeedFull => {
                need_full += 1;
                ss.forget(id);
                resend.push(s.sid);
            }
            AckStatus::Fenced => {
                fenced += 1;
                ss.fenced = true;
                ss.since = None;
            }
            AckStatus::Refused => refused += 1,
        }
    }
    if let Some(l) = st.nodes.iter_mut().find(|n| n.stats.id == id) {
        l.stats.applied += applied;
        l.stats.need_full += need_full;
        l.stats.fenced += fenced;
        l.stats.refused += refused;
        l.stats.in_flight = l.stats.in_flight.saturating_sub(sent.len() as u64);
        l.pending.extend(resend);
    }
    for (n, sid) in hints {
        let is_stand_in = !st.placement.is_owner(&sid.0, n);
        if let Some(l) = st.link(n)
            && is_stand_in
            && l.stats.up
        {
            l.pending.insert(sid);
            l.wake.notify();
        }
    }
    for sid in settled {
        settle(st, sid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_quantiles_over_an_interval() {
        let mut h = LagHistogram::default();
        for _ in 0..100 {
            h.record(Duration::from_millis(50));
        }
        let earlier = ReplicatorStats {
            lag_buckets: h.buckets,
            ..ReplicatorStats::default()
        };
        for _ in 0..1000 {
            h.record(Duration::from_micros(300));
        }
        let now = ReplicatorStats {
            lag_buckets: h.buckets,
            ..ReplicatorStats::default()
        };
        assert_eq!(h.quantile(0.99), 50_000, "since start: the slow ones");
        assert_eq!(now.lag_quantile_since(&earlier, 0.99), 511);
        assert_eq!(now.lag_quantile_since(&now, 0.99), 0, "no samples");
    }

    #[test]
    fn lag_quantiles_are_bucket_bounds() {
        let mut h = LagHistogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for us in [10, 20, 30, 40, 5000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.max_us, 5000);
        assert_eq!(h.quantile(0.5), 31);
        assert_eq!(h.quantile(0.99), 5000, "never above the largest sample");
    }

    #[test]
    fn acks_are_per_node_and_counted_against_the_current_version() {
        let mut s = SidState {
            version: 5,
            ..SidState::default()
        };
        s.set_ack(1, 5);
        s.set_ack(2, 4);
        assert_eq!(s.holders(), 1);
        s.set_ack(2, 5);
        assert_eq!(s.holders(), 2);
        s.forget(1);
        assert_eq!(s.acked_by(1), 0);
        assert_eq!(s.acked_by(2), 5);
    }
}
