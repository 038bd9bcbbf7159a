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
//!   pending set — for each SID, `delta_since(version sent to this node,
//!   else acked)`:
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

//!
//! Modules: `state` holds what the replicator knows (per session, per
//! node, the lag histogram) and the routing rules, with no I/O; `link`
//! runs the dispatcher and one connection per node over it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sessio_engine::{Arena, Location, OpenError};
use sessio_net::{Epoll, IoUring, Secret};

use crate::placement::Placement;
use crate::runtime::Rt;
use link::{dispatcher, node_link};
use state::{NodeLink, SidState, State};

mod link;
mod state;
#[cfg(test)]
mod tests;
mod watch;

pub use state::{LAG_BUCKETS, Lag};

/// Default for [`ReplicatorConfig::flush_interval_us`].
pub const FLUSH_INTERVAL_US_DEFAULT: u64 = 500;
/// Default for [`ReplicatorConfig::batch_bytes_max`].
pub const BATCH_BYTES_MAX_DEFAULT: u64 = 512 * 1024;
/// Default for [`ReplicatorConfig::batch_entries_max`].
pub const BATCH_ENTRIES_MAX_DEFAULT: usize = 1024;
/// Default for [`ReplicatorConfig::slow_after_ms`].
pub const SLOW_AFTER_MS_DEFAULT: u64 = 500;
/// Default for [`ReplicatorConfig::ack_timeout_ms`].
pub const ACK_TIMEOUT_MS_DEFAULT: u64 = 2_000;
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
    /// A node whose oldest batch in flight has waited this long for its ack
    /// is routed around (hinted handoff) until it catches up, in ms.
    pub slow_after_ms: u64,
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
            ack_timeout_ms: ACK_TIMEOUT_MS_DEFAULT,
            handshake_timeout_ms: 1_000,
            backoff_min_ms: 20,
            backoff_max_ms: 1_000,
            ping_interval_ms: 250,
            slow_after_ms: SLOW_AFTER_MS_DEFAULT,
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
    /// Copies evicted because the node said another host took their
    /// session over.
    pub evicted: u64,
    /// Routed around for now: a batch waited `slow_after_ms` for its ack.
    pub slow: bool,
    /// Times it was routed around.
    pub slow_episodes: u64,
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
    /// How long the oldest of those has waited, in µs (0: none waits).
    /// Unlike the lag histogram, which records a session only once it has
    /// caught up, this shows a stall while it lasts.
    pub oldest_unacked_us: u64,
    /// Per node.
    pub nodes: Vec<NodeStats>,
    /// Bytes of batches sent, all nodes.
    pub bytes_sent: u64,
    /// Bytes sent per second over the last full second.
    pub bytes_per_sec: u64,
    /// Update-to-ack lag samples (a session reaching `R` acks).
    pub lag_samples: u64,
    /// Median lag, µs (to 2 significant digits).
    pub lag_p50_us: u64,
    /// 99th percentile lag, µs (to 2 significant digits).
    pub lag_p99_us: u64,
    /// Largest lag seen, µs.
    pub lag_max_us: u64,
    /// The lag histogram since start (read anew at most every 100 ms).
    /// Subtract an earlier snapshot's to see one interval
    /// ([`lag_quantile_since`](Self::lag_quantile_since)).
    pub lag: Lag,
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
    /// snapshot of the same replicator), in µs; 0 without samples.
    pub fn lag_quantile_since(&self, earlier: &ReplicatorStats, q: f64) -> u64 {
        self.lag.since(&earlier.lag).quantile_us(q)
    }
}

/// A running replicator thread. Dropping it stops the thread (after
/// shipping what is pending, within `drain_timeout_ms`).
#[derive(Debug)]
pub struct Replicator {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ReplicatorStats>>,
    thread: Option<JoinHandle<()>>,
    watch: Arc<watch::Watch>,
    doorbell: Option<JoinHandle<()>>,
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
        let (watch, doorbell) =
            watch::Watch::start(&arena, Arc::clone(&stop)).map_err(ReplicatorError::Thread)?;
        let mut r = Replicator {
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            thread: None,
            watch: Arc::clone(&watch),
            doorbell: Some(doorbell),
        };
        let thread = std::thread::Builder::new()
            .name("sessio-replicator".into())
            .spawn(move || {
                if !config.force_epoll && IoUring::available() {
                    run::<IoUring>(arena, &config, &stop, &stats, &watch);
                } else {
                    run::<Epoll>(arena, &config, &stop, &stats, &watch);
                }
            })
            .map_err(ReplicatorError::Thread)?;
        r.thread = Some(thread);
        Ok(r)
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
        self.watch.ring();
        let joined = match self.thread.take() {
            Some(t) => t.join().map_err(|_| ReplicatorError::Panicked),
            None => Ok(()),
        };
        // Rung again: the dispatcher may have dozed off after the first.
        self.watch.ring();
        if let Some(t) = self.doorbell.take() {
            t.join().map_err(|_| ReplicatorError::Panicked)?;
        }
        joined
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

struct Ctx<'a> {
    arena: &'a Arena,
    watch: &'a watch::Watch,
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
    watch: &watch::Watch,
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
    let state = RefCell::new(State::new(placement, nodes));
    // A fresh replicator looks at every session once: what an earlier
    // replicator saw acknowledged by nodes that kept their incarnation is
    // not sent again (`seed_acks`); the rest is.
    arena.mark_all_dirty();
    let drained = AtomicBool::new(false);
    let ctx = Ctx {
        arena: &arena,
        watch,
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
        *s = state.borrow_mut().snapshot(B::NAME, true);
    }
}
