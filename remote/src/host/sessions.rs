//! The host API: what a web worker opens to use sessions, in one object.
//!
//! [`Sessions`] wraps an arena handle and the bank behind it:
//!
//! - [`Sessions::read`] reads locally and, on a miss, fetches the session
//!   from the bank and installs it, in one call. Misses of one SID at once
//!   cause one fetch: threads of a process share a [`Singleflight`], and
//!   processes of a host share a claim word in the arena
//!   ([`Arena::claim_fetch`]); a process that finds another fetching waits
//!   for it.
//! - **Forged and expired SIDs stay cheap.** A miss the bank answered is
//!   remembered in a bounded negative cache, and the host's fetches share
//!   one token bucket in the arena ([`Arena::take_fetch_token`]); an empty
//!   bucket answers [`HostError::Throttled`] without asking anyone. A fetch
//!   asks the session's owners, then at most as many stand-ins: never the
//!   whole bank.
//! - **Expiry runs by itself.** Each process runs a sweeper thread; one
//!   handle per host is elected ([`Arena::lead_sweep`]) and sweeps a slice
//!   of the index every tick. Removals reach the bank through the
//!   replicator like any other change.
//! - **The idle clock survives failover.** A read of a session whose last
//!   update is older than a quarter of its idle TTL touches it, so the
//!   replicated copy carries a recent `updated_ms` and comes up on another
//!   host with (at most a quarter TTL less of) its idle time left.
//! - **Durability per update:** [`Durability::Local`] returns once the
//!   update is in the arena; [`Durability::Replicated`] waits until the
//!   bank acked that version (see [`Sessions::update`]).
//!
//! A `Sessions` is `Send`, not `Sync`, like the arena handle inside it:
//! each thread uses its own ([`Sessions::try_clone`] shares everything a
//! process shares).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sessio_engine::{
    Arena, ArenaConfig, FetchClaim, Location, NewSession, Op, OpenError, ReadGuard, SessionError,
    Sid,
};
use sessio_net::{Backend, Epoll, IoUring};

use crate::failover::{
    FailoverConfig, FailoverError, NodeClients, Singleflight, fetch_and_install,
};
use crate::placement::Placement;

/// How many acks the arena remembers per session, so the most a
/// [`Durability::Replicated`] update can wait for.
pub const ACKS_TRACKED: usize = 2;

/// How an update is to be durable before [`Sessions::update`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Applied in the arena; the replicator ships it within its lag. A
    /// host killed inside that window loses it (like Redis without `WAIT`).
    #[default]
    Local,
    /// Applied in the arena and acked by `min(R, 2)` bank nodes, or a
    /// [`HostError::NotReplicated`] after `timeout`, the update still
    /// applied locally (like Redis `WAIT` or Kafka `acks=all`).
    Replicated {
        /// How long to wait for the acks.
        timeout: Duration,
    },
}

/// Bounds on what misses may cost the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissLimits {
    /// Fetches a second the whole host may send the bank (token bucket).
    pub fetches_per_s: u32,
    /// Fetches the bucket may give at once.
    pub fetch_burst: u32,
    /// How long a SID the bank did not have is answered `NotFound` without
    /// asking again, in ms.
    pub negative_ttl_ms: u64,
    /// Entries of the negative cache (rounded up to a power of two).
    pub negative_entries: usize,
}

impl Default for MissLimits {
    fn default() -> MissLimits {
        MissLimits {
            fetches_per_s: 2000,
            fetch_burst: 4000,
            negative_ttl_ms: 5000,
            negative_entries: 1 << 16,
        }
    }
}

/// How expired sessions are swept (by the one handle the host elects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepConfig {
    /// Time between two sweep steps, in ms.
    pub every_ms: u64,
    /// Time one pass over the whole index takes, in ms: an expired session
    /// is removed at most about this long after it expired.
    pub pass_ms: u64,
}

impl Default for SweepConfig {
    fn default() -> SweepConfig {
        SweepConfig {
            every_ms: 100,
            pass_ms: 10_000,
        }
    }
}

/// Which I/O engine fetches use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// `io_uring` where it works here, else epoll.
    #[default]
    Auto,
    /// `io_uring` (compio).
    IoUring,
    /// epoll (tokio).
    Epoll,
}

/// What a worker process needs to open [`Sessions`].
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where the host's arena lives.
    pub location: Location,
    /// The arena's geometry, used if this process creates it.
    pub arena: ArenaConfig,
    /// The bank.
    pub placement: Placement,
    /// Host id, secret and timeouts of fetches.
    pub failover: FailoverConfig,
    /// Bounds on what misses cost the bank.
    pub limits: MissLimits,
    /// The sweeper of this process; `None`: this process never sweeps
    /// (another one of the host, or an agent, does).
    pub sweep: Option<SweepConfig>,
    /// The I/O engine of fetches.
    pub engine: Engine,
}

impl HostConfig {
    /// Defaults for everything but where the arena is and the bank.
    pub fn new(
        location: Location,
        arena: ArenaConfig,
        placement: Placement,
        failover: FailoverConfig,
    ) -> HostConfig {
        HostConfig {
            location,
            arena,
            placement,
            failover,
            limits: MissLimits::default(),
            sweep: Some(SweepConfig::default()),
            engine: Engine::Auto,
        }
    }
}

/// Why a host call failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// No such session here or in the bank (never existed, ended, expired,
    /// or forged).
    #[error("no such session")]
    NotFound,
    /// The host has asked the bank as often as [`MissLimits`] allows; try
    /// again shortly. Nothing was lost: the session may still exist.
    #[error("too many bank fetches on this host; try again shortly")]
    Throttled,
    /// No bank node answered: whether the session exists is unknown.
    #[error("the bank did not answer ({asked} nodes asked)")]
    BankUnavailable {
        /// Nodes asked.
        asked: usize,
    },
    /// The arena refused (full, over quota, corrupt...).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A fetch failed for another reason (install refused, no runtime).
    #[error(transparent)]
    Fetch(FailoverError),
    /// A [`Durability::Replicated`] update did not get its acks in time.
    /// It is applied locally and will still replicate.
    #[error("version {version} acked by {acked} of {wanted} nodes before the timeout")]
    NotReplicated {
        /// The version the update produced.
        version: u64,
        /// Nodes that acked it.
        acked: usize,
        /// Nodes waited for.
        wanted: usize,
    },
    /// The arena could not be opened.
    #[error("opening the arena: {0}")]
    Open(String),
}

impl From<OpenError> for HostError {
    fn from(e: OpenError) -> HostError {
        HostError::Open(e.to_string())
    }
}

/// Counters of one process's host API (all handles of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Reads that found the session locally.
    pub local_hits: u64,
    /// Fetches sent to the bank.
    pub fetches: u64,
    /// Sessions those fetches installed.
    pub fetched: u64,
    /// Misses answered `NotFound` by the bank.
    pub not_found: u64,
    /// Misses answered from the negative cache.
    pub negative_hits: u64,
    /// Misses that waited for another process's fetch.
    pub waited: u64,
    /// Misses refused for want of fetch tokens.
    pub throttled: u64,
    /// Fetches no node answered.
    pub bank_unavailable: u64,
    /// Reads that touched a session to keep its idle clock replicated.
    pub touches: u64,
    /// Sessions this process's sweeper removed.
    pub swept: u64,
    /// `Replicated` updates that timed out.
    pub replication_timeouts: u64,
}

#[derive(Default)]
struct Counters {
    local_hits: AtomicU64,
    fetches: AtomicU64,
    fetched: AtomicU64,
    not_found: AtomicU64,
    negative_hits: AtomicU64,
    waited: AtomicU64,
    throttled: AtomicU64,
    bank_unavailable: AtomicU64,
    touches: AtomicU64,
    swept: AtomicU64,
    replication_timeouts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// SIDs the bank recently did not have: a table of 4-way buckets, so its
/// size is fixed, a lookup reads one cache line's worth, and a SID is
/// pushed out only by the oldest of four that share its bucket.
struct NegativeCache {
    slots: Vec<(Sid, u64)>,
    ttl_ms: u64,
}

/// Entries of one bucket of the negative cache.
const NEGATIVE_WAYS: usize = 4;

impl NegativeCache {
    fn new(entries: usize, ttl_ms: u64) -> NegativeCache {
        let n = entries.clamp(NEGATIVE_WAYS, 1 << 24).next_power_of_two();
        NegativeCache {
            slots: vec![(Sid([0; 16]), 0); n],
            ttl_ms,
        }
    }

    /// The slots of `sid`'s bucket.
    fn bucket(&self, sid: Sid) -> std::ops::Range<usize> {
        let b = sid.as_bytes();
        let x = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(b[8..].try_into().expect("8 bytes")).rotate_left(23);
        let buckets = self.slots.len() / NEGATIVE_WAYS;
        let start = ((x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20) as usize & (buckets - 1))
            * NEGATIVE_WAYS;
        start..start + NEGATIVE_WAYS
    }

    fn contains(&self, sid: Sid, now_ms: u64) -> bool {
        self.slots[self.bucket(sid)]
            .iter()
            .any(|&(s, until)| s == sid && now_ms < until)
    }

    fn insert(&mut self, sid: Sid, now_ms: u64) {
        let until = now_ms + self.ttl_ms;
        let r = self.bucket(sid);
        let slots = &mut self.slots[r];
        // The SID's own entry, else the one that ends first (an expired or
        // empty one ends first of all).
        let i = slots
            .iter()
            .position(|&(s, _)| s == sid)
            .or_else(|| (0..NEGATIVE_WAYS).min_by_key(|&i| slots[i].1))
            .expect("a bucket has entries");
        slots[i] = (sid, until);
    }

    fn remove(&mut self, sid: Sid) {
        let r = self.bucket(sid);
        for e in &mut self.slots[r] {
            if e.0 == sid {
                e.1 = 0;
            }
        }
    }
}

/// The sweeper thread's stop signal.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

/// What the handles of one process share.
struct Shared {
    id: u64,
    config: HostConfig,
    engine: Engine,
    flights: Arc<Singleflight>,
    negative: Mutex<NegativeCache>,
    counters: Arc<Counters>,
    sweeper: Option<(Arc<Stop>, JoinHandle<()>)>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // This thread's connections go now; other threads' go with them.
        let _ = CLIENTS.try_with(|c| c.borrow_mut().retain(|(id, _)| *id != self.id));
        if let Some((stop, thread)) = self.sweeper.take() {
            *stop
                .stopped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            stop.wake.notify_all();
            let _ = thread.join();
        }
    }
}

/// One thread's connections to the bank, on the engine chosen at open.
enum Clients {
    IoUring(NodeClients<IoUring>),
    Epoll(NodeClients<Epoll>),
}

thread_local! {
    /// This thread's connections, by [`Shared::id`]: connections live on
    /// the thread's runtime, so they stay with the thread, not the handle
    /// (which may move between threads).
    static CLIENTS: RefCell<Vec<(u64, Clients)>> = const { RefCell::new(Vec::new()) };
}

/// Tells the process's [`Shared`] apart in [`CLIENTS`].
static NEXT_SHARED_ID: AtomicU64 = AtomicU64::new(1);

/// A worker's handle on the host's sessions: the arena and the bank behind
/// it. See the module docs.
pub struct Sessions {
    arena: Arena,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("arena", &self.arena.path())
            .field("engine", &self.shared.engine)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Opens (or creates) the host's arena and starts this process's
    /// sweeper thread (if `config.sweep` asks for one).
    pub fn open(config: HostConfig) -> Result<Sessions, HostError> {
        let arena = Arena::open(&config.location, &config.arena)?;
        let engine = match config.engine {
            Engine::Auto if IoUring::available() => Engine::IoUring,
            Engine::Auto => Engine::Epoll,
            e => e,
        };
        let counters = Arc::new(Counters::default());
        let sweeper = match config.sweep {
            Some(sweep) => Some(spawn_sweeper(
                arena.try_clone()?,
                sweep,
                Arc::clone(&counters),
            )?),
            None => None,
        };
        let shared = Shared {
            id: NEXT_SHARED_ID.fetch_add(1, Ordering::Relaxed),
            negative: Mutex::new(NegativeCache::new(
                config.limits.negative_entries,
                config.limits.negative_ttl_ms,
            )),
            config,
            engine,
            flights: Arc::new(Singleflight::default()),
            counters,
            sweeper,
        };
        Ok(Sessions {
            arena,
            shared: Arc::new(shared),
        })
    }

    /// Another handle for another thread of this process, sharing its
    /// caches, counters and sweeper.
    pub fn try_clone(&self) -> Result<Sessions, HostError> {
        Ok(Sessions {
            arena: self.arena.try_clone()?,
            shared: Arc::clone(&self.shared),
        })
    }

    /// The arena handle, for what this API does not wrap.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// The configuration this was opened with.
    pub fn config(&self) -> &HostConfig {
        &self.shared.config
    }

    /// Creates a session.
    pub fn create(&self, opts: NewSession, attrs: &[(&str, &[u8])]) -> Result<Sid, HostError> {
        Ok(self.arena.create(opts, attrs)?)
    }

    /// Reads a session: locally, or on a miss from the bank (installed
    /// here, so the next read is local). A zero-copy view, valid while the
    /// guard lives; do not hold it across an `.await`.
    pub fn read(&self, sid: Sid) -> Result<ReadGuard<'_>, HostError> {
        match self.arena.read(sid) {
            Ok(g) => {
                bump(&self.shared.counters.local_hits);
                self.keep_idle_clock(sid, &g);
                return Ok(g);
            }
            Err(SessionError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.fetch(sid)?;
        match self.arena.read(sid) {
            Ok(g) => Ok(g),
            Err(SessionError::NotFound) => Err(HostError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the session is in this host's arena now (no bank query).
    pub fn is_local(&self, sid: Sid) -> bool {
        self.arena.read(sid).is_ok()
    }

    /// Applies `ops` to a session (fetched from the bank first if this
    /// host does not hold it), durable as `durability` asks. Returns the
    /// version produced.
    pub fn update(&self, sid: Sid, ops: &[Op], durability: Durability) -> Result<u64, HostError> {
        let version = match self.arena.update(sid, ops) {
            Err(SessionError::NotFound) => {
                self.fetch(sid)?;
                self.arena.update(sid, ops).map_err(|e| match e {
                    SessionError::NotFound => HostError::NotFound,
                    e => e.into(),
                })?
            }
            r => r?,
        };
        if let Durability::Replicated { timeout } = durability {
            self.wait_replicated(sid, version, timeout)?;
        }
        Ok(version)
    }

    /// Ends a session, here and (through the replicator) in the bank. A
    /// session that does not exist is not an error. The SID is remembered
    /// as gone, so a replayed cookie does not ask the bank.
    pub fn invalidate(&self, sid: Sid) -> Result<(), HostError> {
        self.shared
            .negative
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sid, sessio_engine::clock::now_ms());
        match self.arena.invalidate(sid) {
            Ok(()) | Err(SessionError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// How many bank nodes a [`Durability::Replicated`] update waits for.
    pub fn acks_wanted(&self) -> usize {
        self.shared.config.placement.replicas().min(ACKS_TRACKED)
    }

    /// How many bank nodes have acked `version` (or newer) of `sid`; for
    /// callers that wait their own way (an async task polling).
    pub fn acks(&self, sid: Sid, version: u64) -> Result<usize, HostError> {
        let acked = self.arena.acked(sid).map_err(|e| match e {
            SessionError::NotFound => HostError::NotFound,
            e => e.into(),
        })?;
        Ok(acked
            .iter()
            .filter(|&&(node, v)| node != 0 && v >= version)
            .count())
    }

    /// Waits until `version` of `sid` is acked by [`Sessions::acks_wanted`]
    /// nodes, or `timeout` passes.
    pub fn wait_replicated(
        &self,
        sid: Sid,
        version: u64,
        timeout: Duration,
    ) -> Result<(), HostError> {
        self.arena.urge_replication();
        let wanted = self.acks_wanted();
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(20);
        loop {
            let acked = self.acks(sid, version)?;
            if acked >= wanted {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bump(&self.shared.counters.replication_timeouts);
                return Err(HostError::NotReplicated {
                    version,
                    acked,
                    wanted,
                });
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_micros(250));
        }
    }

    /// Tells the replicator that a writer waits for acks, so it ships at
    /// once (see [`Arena::urge_replication`]); [`Sessions::wait_replicated`]
    /// does it itself.
    pub fn urge_replication(&self) {
        self.arena.urge_replication();
    }

    /// The counters of this process's host API.
    pub fn stats(&self) -> HostStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HostStats {
            local_hits: g(&c.local_hits),
            fetches: g(&c.fetches),
            fetched: g(&c.fetched),
            not_found: g(&c.not_found),
            negative_hits: g(&c.negative_hits),
            waited: g(&c.waited),
            throttled: g(&c.throttled),
            bank_unavailable: g(&c.bank_unavailable),
            touches: g(&c.touches),
            swept: g(&c.swept),
            replication_timeouts: g(&c.replication_timeouts),
        }
    }

    /// Touches a session whose last update is older than a quarter of its
    /// idle TTL, so the bank's copy carries a recent idle clock.
    fn keep_idle_clock(&self, sid: Sid, g: &ReadGuard<'_>) {
        let d = g.data();
        let ttl = d.idle_ttl_ms.to_native();
        if ttl == 0 {
            return;
        }
        let now = sessio_engine::clock::now_ms();
        if now.saturating_sub(d.updated_ms.to_native()) >= ttl / 4 {
            bump(&self.shared.counters.touches);
            // Best effort: a touch that fails leaves the session as it was.
            let _ = self.arena.update(sid, &[Op::Touch]);
        }
    }

    /// Brings `sid` from the bank into the arena, or says why not.
    fn fetch(&self, sid: Sid) -> Result<(), HostError> {
        let c = &self.shared.counters;
        let limits = self.shared.config.limits;
        let now = sessio_engine::clock::now_ms();
        let negative = || {
            self.shared
                .negative
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if negative().contains(sid, now) {
            bump(&c.negative_hits);
            return Err(HostError::NotFound);
        }
        let guard = match self.arena.claim_fetch(sid) {
            FetchClaim::Theirs => {
                bump(&c.waited);
                let wait = Duration::from_millis(
                    self.shared
                        .config
                        .failover
                        .request_timeout_ms
                        .saturating_mul(4),
                );
                let t = Instant::now();
                while self.arena.fetching(sid) && t.elapsed() < wait {
                    std::thread::sleep(Duration::from_micros(200));
                }
                return if self.arena.read(sid).is_ok() {
                    Ok(())
                } else {
                    Err(HostError::NotFound)
                };
            }
            FetchClaim::Mine(guard) => guard,
        };
        // Whoever held the claim before may have installed it meanwhile.
        if self.arena.read(sid).is_ok() {
            return Ok(());
        }
        if !self
            .arena
            .take_fetch_token(limits.fetches_per_s, limits.fetch_burst)
        {
            bump(&c.throttled);
            return Err(HostError::Throttled);
        }
        bump(&c.fetches);
        let r = self.fetch_unclaimed(sid);
        drop(guard);
        match r {
            Ok(()) => {
                bump(&c.fetched);
                negative().remove(sid);
                Ok(())
            }
            Err(FailoverError::NotFound { asked, answered: 0 }) => {
                bump(&c.bank_unavailable);
                Err(HostError::BankUnavailable { asked })
            }
            Err(FailoverError::NotFound { .. }) => {
                bump(&c.not_found);
                negative().insert(sid, sessio_engine::clock::now_ms());
                Err(HostError::NotFound)
            }
            Err(e) => Err(HostError::Fetch(e)),
        }
    }

    fn fetch_unclaimed(&self, sid: Sid) -> Result<(), FailoverError> {
        let shared = &self.shared;
        CLIENTS.with(|all| {
            let mut all = all.borrow_mut();
            let i = if let Some(i) = all.iter().position(|(id, _)| *id == shared.id) {
                i
            } else {
                let (config, flights) =
                    (shared.config.failover.clone(), Arc::clone(&shared.flights));
                let clients = match shared.engine {
                    Engine::Epoll => Clients::Epoll(NodeClients::new(config, flights)?),
                    Engine::IoUring | Engine::Auto => {
                        Clients::IoUring(NodeClients::new(config, flights)?)
                    }
                };
                all.push((shared.id, clients));
                all.len() - 1
            };
            let placement = &shared.config.placement;
            match &mut all[i].1 {
                Clients::IoUring(c) => fetch_and_install(&self.arena, sid, placement, c),
                Clients::Epoll(c) => fetch_and_install(&self.arena, sid, placement, c),
            }
            .map(|_| ())
        })
    }
}

/// Starts the process's sweeper: every `every_ms`, if this handle is the
/// host's elected sweeper, it sweeps the slice of the index that makes one
/// pass take `pass_ms`.
fn spawn_sweeper(
    arena: Arena,
    sweep: SweepConfig,
    counters: Arc<Counters>,
) -> Result<(Arc<Stop>, JoinHandle<()>), HostError> {
    let stop = Arc::new(Stop::default());
    let every = Duration::from_millis(sweep.every_ms.max(1));
    let steps = (sweep.pass_ms / sweep.every_ms.max(1)).max(1);
    let slots = arena.stats().index_slots.div_ceil(steps).max(1);
    let thread = std::thread::Builder::new()
        .name("sessio-sweep".into())
        .spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut stopped = stop
                    .stopped
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while !*stopped {
                    stopped = stop
                        .wake
                        .wait_timeout(stopped, every)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    if arena.lead_sweep() {
                        let s = arena.sweep(sessio_engine::clock::now_ms(), slots);
                        counters.swept.fetch_add(s.expired, Ordering::Relaxed);
                    }
                    stopped = stop
                        .stopped
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
        })
        .map_err(|e| HostError::Open(format!("starting the sweeper thread: {e}")))?;
    Ok((stop, thread))
}
