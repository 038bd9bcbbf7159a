//! What the replicator knows, and the rules that route and settle it:
//! plain data, no I/O, no arena.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use sessio_engine::Sid;

use super::{NodeStats, ReplicatorStats};
use crate::Samples;
use crate::placement::Placement;

/// What the replicator knows of one session.
#[derive(Debug, Default)]
pub(super) struct SidState {
    pub(super) version: u64,
    pub(super) epoch: u64,
    /// Versions acknowledged, per node (a few entries).
    pub(super) acks: Vec<(u16, u64)>,
    /// The highest version sent to a node and not yet acknowledged: the
    /// next batch for that node starts there (pipelining on what was sent,
    /// not on what was acknowledged, so a session that changes while a
    /// batch is in flight is not sent again from the same base).
    pub(super) sent: Vec<(u16, u64)>,
    /// When the oldest version not yet acknowledged by R nodes was first
    /// seen, and that version (0 for a removal: only the whole settles it).
    pub(super) since: Option<Instant>,
    pub(super) since_version: u64,
    /// The first newer version seen while `since` waits, and when: once
    /// `since_version` has its acks but the current one does not, the
    /// wait is counted from here (so a session that changes faster than a
    /// round trip shows the age of its oldest waiting update, not of the
    /// first change of the whole streak).
    pub(super) next: Option<(Instant, u64)>,
    pub(super) removed: bool,
    pub(super) fenced: bool,
}

impl SidState {
    /// Version `version` (0: a removal) was seen at `now`, not yet acked.
    /// Returns whether the session started waiting with it (it was not
    /// waiting before): the caller counts it in [`State::waiting`].
    #[must_use]
    pub(super) fn note_unacked(&mut self, now: Instant, version: u64) -> bool {
        match self.since {
            None => {
                self.since = Some(now);
                self.since_version = version;
                true
            }
            Some(_) if self.next.is_none() && version > self.since_version => {
                self.next = Some((now, version));
                false
            }
            Some(_) => false,
        }
    }

    /// The newest version of this session any node was sent or
    /// acknowledged, or the one last taken if newer. A batch is built from
    /// the arena, which may have moved past the version taken: a removal
    /// carries this one, so no node keeps a copy newer than it.
    pub(super) fn newest_shipped(&self) -> u64 {
        self.acks
            .iter()
            .chain(&self.sent)
            .map(|&(_, v)| v)
            .fold(self.version, u64::max)
    }

    /// Whether `r` nodes acknowledged `version` or newer.
    fn covered(&self, version: u64, r: usize) -> bool {
        self.acks.iter().filter(|(_, v)| *v >= version).count() >= r
    }

    pub(super) fn acked_by(&self, node: u16) -> u64 {
        self.acks
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |&(_, v)| v)
    }

    pub(super) fn set_ack(&mut self, node: u16, version: u64) {
        match self.acks.iter_mut().find(|(n, _)| *n == node) {
            Some(a) => a.1 = version,
            None => self.acks.push((node, version)),
        }
    }

    pub(super) fn forget(&mut self, node: u16) {
        self.acks.retain(|(n, _)| *n != node);
        self.clear_sent(node);
    }

    /// Where the next delta for `node` starts: what it will hold once the
    /// batches in flight to it are applied.
    pub(super) fn base_for(&self, node: u16) -> u64 {
        let sent = self
            .sent
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |&(_, v)| v);
        self.acked_by(node).max(sent)
    }

    pub(super) fn set_sent(&mut self, node: u16, version: u64) {
        match self.sent.iter_mut().find(|(n, _)| *n == node) {
            Some(a) => a.1 = a.1.max(version),
            None => self.sent.push((node, version)),
        }
    }

    /// Forgets what is in flight to `node` (lost with its connection,
    /// refused, or acknowledged).
    pub(super) fn clear_sent(&mut self, node: u16) {
        self.sent.retain(|(n, _)| *n != node);
    }

    pub(super) fn holders(&self) -> usize {
        self.acks.iter().filter(|(_, v)| *v >= self.version).count()
    }
}

#[derive(Debug, Default)]
pub(super) struct NodeLink {
    pub(super) stats: NodeStats,
    pub(super) pending: HashSet<Sid>,
    pub(super) owed: HashSet<Sid>,
    /// When each batch in flight to the node was sent, oldest first.
    pub(super) sent_at: std::collections::VecDeque<Instant>,
    /// Wakes the link's future when `pending` gains work.
    pub(super) wake: Wake,
}

/// Power-of-two buckets of microseconds the lag histogram is exported in
/// (Prometheus `le` bounds `2^b` µs for `b < LAG_BUCKETS - 1`, then `+Inf`).
pub const LAG_BUCKETS: usize = 32;

/// Update-to-ack lag samples, in µs: an HDR histogram (2 significant
/// digits, 1 µs to an hour; longer ones count as an hour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag(Samples);

/// How often a snapshot reads the lag histogram anew, ms (its quantiles
/// walk the histogram; every tick would be waste).
const LAG_SNAPSHOT_MS: u64 = 100;

/// Ended waits the heap of waits may hold beyond twice the open ones
/// before it is swept.
const WAITS_SLACK: u64 = 1024;

/// The lag histogram as of a snapshot, with the quantiles read off it.
#[derive(Debug, Clone, Default)]
pub(super) struct LagFigures {
    pub(super) lag: Lag,
    pub(super) p50_us: u64,
    pub(super) p99_us: u64,
}

/// Longest lag the histogram tells apart, µs.
const LAG_US_MAX: u64 = 3_600_000_000;

impl Default for Lag {
    fn default() -> Self {
        Lag(Samples::bounded(LAG_US_MAX))
    }
}

impl Lag {
    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.record(us.clamp(1, LAG_US_MAX));
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile, µs (0 without samples).
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.0.quantile(q)
    }

    /// The largest sample, µs (to the histogram's resolution).
    pub fn max_us(&self) -> u64 {
        self.0.hist.max()
    }

    /// Samples at or below `us` (to the histogram's resolution).
    pub fn count_at_most_us(&self, us: u64) -> u64 {
        self.0.hist.count_between(0, us)
    }

    /// The sum of the samples, µs (from the mean, to the resolution).
    pub fn sum_us(&self) -> u64 {
        // The mean of values below 2^32 µs, times a count far below 2^52:
        // well within f64's exact range at this resolution.
        #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
        let sum = (self.0.hist.mean() * self.0.len() as f64) as u64;
        sum
    }

    /// The samples recorded after `earlier`, a copy of this histogram taken
    /// before (counts only grow).
    #[must_use]
    pub fn since(&self, earlier: &Lag) -> Lag {
        let mut d = self.clone();
        // `earlier` is this histogram's past: subtraction cannot underflow;
        // if a caller mixes histograms, the whole is the honest answer.
        if d.0.hist.subtract(&earlier.0.hist).is_err() {
            return self.clone();
        }
        d
    }
}

pub(super) struct State {
    pub(super) placement: Placement,
    pub(super) sids: HashMap<Sid, SidState>,
    pub(super) nodes: Vec<NodeLink>,
    pub(super) lag: Lag,
    /// The lag figures of the last snapshot and when they were taken
    /// (reading quantiles walks the histogram: not at every tick).
    pub(super) lag_snapshot: Option<(Instant, LagFigures)>,
    pub(super) ticks: u64,
    /// Wakes the dispatcher when a link has nothing in flight any more.
    pub(super) dispatcher: Wake,
    pub(super) rate_mark: (Instant, u64),
    pub(super) bytes_per_sec: u64,
    /// Sessions waiting for R acks (`SidState::since` set), counted as
    /// they start and stop waiting: a snapshot reads it without walking
    /// every session.
    pub(super) waiting: u64,
    /// Each wait as it started (`since`, SID), oldest on top; a wait that
    /// ended is dropped when it reaches the top, so the oldest one waiting
    /// is found without walking every session.
    waits: BinaryHeap<Reverse<(Instant, Sid)>>,
}

impl State {
    /// A fresh table: no session known yet, the links to `nodes`.
    pub(super) fn new(placement: Placement, nodes: Vec<NodeLink>) -> State {
        State {
            placement,
            sids: HashMap::new(),
            nodes,
            lag: Lag::default(),
            lag_snapshot: None,
            ticks: 0,
            dispatcher: Wake::default(),
            rate_mark: (Instant::now(), 0),
            bytes_per_sec: 0,
            waiting: 0,
            waits: BinaryHeap::new(),
        }
    }

    /// `sid` started waiting for R acks at `at` (its `since`, just set).
    pub(super) fn start_waiting(&mut self, sid: Sid, at: Instant) {
        self.waiting += 1;
        self.note_wait(sid, at);
    }

    /// Remembers a wait of `sid` since `at`, keeping the heap within a
    /// bound of the waits still open.
    fn note_wait(&mut self, sid: Sid, at: Instant) {
        self.waits.push(Reverse((at, sid)));
        if self.waits.len() as u64 > 2 * self.waiting + WAITS_SLACK {
            let sids = &self.sids;
            self.waits
                .retain(|Reverse((t, s))| sids.get(s).and_then(|x| x.since) == Some(*t));
        }
    }

    /// When the oldest session still waiting for R acks started waiting.
    fn oldest_waiting(&mut self) -> Option<Instant> {
        if self.waiting == 0 {
            self.waits.clear();
            return None;
        }
        while let Some(&Reverse((t, sid))) = self.waits.peek() {
            if self.sids.get(&sid).and_then(|s| s.since) == Some(t) {
                return Some(t);
            }
            self.waits.pop();
        }
        debug_assert!(false, "{} sessions wait, none on the heap", self.waiting);
        None
    }

    pub(super) fn link(&mut self, id: u16) -> Option<&mut NodeLink> {
        self.nodes.iter_mut().find(|n| n.stats.id == id)
    }

    /// Whether writes for `id` go to it: connected, and not so far behind
    /// that it is routed around.
    pub(super) fn is_up(&self, id: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.stats.id == id && n.stats.up && !n.stats.slow)
    }

    /// Routes around a node whose oldest batch in flight has waited
    /// `slow_after` (its sessions go to stand-ins and are owed to it), and
    /// back to it once it has caught up with everything in flight: the
    /// hysteresis between the two is the whole backlog it had.
    /// Whether the links are quiet: no batch in flight, and nothing
    /// pending for a link that is up (one that is down waits for its
    /// connection, not for the dispatcher).
    pub(super) fn links_quiet(&self) -> bool {
        self.nodes
            .iter()
            .all(|l| l.sent_at.is_empty() && (l.pending.is_empty() || !l.stats.up))
    }

    pub(super) fn check_slow(&mut self, slow_after: Duration) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let behind = n.sent_at.front().is_some_and(|t| t.elapsed() >= slow_after);
            if n.stats.up && !n.stats.slow && behind {
                n.stats.slow = true;
                n.stats.slow_episodes += 1;
                tracing::warn!(
                    node = n.stats.id,
                    "replica node slow: a batch has waited {slow_after:?} for its ack; writing to stand-ins until it catches up"
                );
                let moved: Vec<Sid> = n.pending.drain().collect();
                for sid in moved {
                    self.route(sid);
                }
            } else if n.stats.slow && (n.sent_at.is_empty() || !n.stats.up) {
                n.stats.slow = false;
                if n.stats.up {
                    tracing::info!(
                        node = n.stats.id,
                        owed = n.owed.len(),
                        "replica node caught up: writing to it again"
                    );
                    let owed: Vec<Sid> = n.owed.drain().collect();
                    n.pending.extend(owed);
                    n.wake.notify();
                }
            }
        }
    }

    /// Queues `sid` for every node that must hold it now; owners that are
    /// down owe it.
    pub(super) fn route(&mut self, sid: Sid) {
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

    /// The counters as of now; the lag figures are re-read from the
    /// histogram at most every `LAG_SNAPSHOT_MS`, or when `fresh_lag` asks
    /// (a replicator about to sleep: what it publishes stays current).
    pub(super) fn snapshot(&mut self, backend: &'static str, fresh_lag: bool) -> ReplicatorStats {
        let bytes_sent: u64 = self.nodes.iter().map(|n| n.stats.bytes_sent).sum();
        let (mark, at) = self.rate_mark;
        let dt = mark.elapsed();
        if dt >= Duration::from_secs(1) {
            #[allow(clippy::cast_precision_loss)] // a rate; precision is moot
            let rate = (bytes_sent - at) as f64 / dt.as_secs_f64();
            self.bytes_per_sec = rate as u64;
            self.rate_mark = (Instant::now(), bytes_sent);
        }
        let fresh = !fresh_lag
            && self
                .lag_snapshot
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < Duration::from_millis(LAG_SNAPSHOT_MS));
        if !fresh {
            let figures = LagFigures {
                lag: self.lag.clone(),
                p50_us: self.lag.quantile_us(0.5),
                p99_us: self.lag.quantile_us(0.99),
            };
            self.lag_snapshot = Some((Instant::now(), figures));
        }
        let lag = self
            .lag_snapshot
            .as_ref()
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        let oldest = self.oldest_waiting();
        ReplicatorStats {
            dirty: self.waiting,
            oldest_unacked_us: oldest.map_or(0, |t| t.elapsed().as_micros() as u64),
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
            lag_samples: lag.lag.count(),
            lag_p50_us: lag.p50_us,
            lag_p99_us: lag.p99_us,
            lag_max_us: lag.lag.max_us(),
            lag: lag.lag,
            ticks: self.ticks,
            backend,
            arena: None,
        }
    }
}

/// For node `id`, not an owner of `sid`, whose owners (all reached by this
/// replicator and up) all hold the current version: `Some(true)` if `id` still holds a hinted copy, `Some(false)`
/// if not. `None` when `id` is an owner, or an owner still lacks the
/// current version (so `id` must stand in).
pub(super) fn stand_in(
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
///
/// A removal is forgotten only once no node still has it queued or owed:
/// the owners' acks of the last copy count towards it, so the first owner
/// to ack the `Remove` used to settle it, and the other owner's link, whose
/// batch was not built yet, skipped the session it no longer knew. That
/// owner kept the ended session's copy, for a failover fetch to bring back.
pub(super) fn settle(st: &mut State, sid: Sid) {
    let r = st.placement.replicas();
    let queued = st
        .nodes
        .iter()
        .any(|n| n.pending.contains(&sid) || n.owed.contains(&sid));
    let Some(s) = st.sids.get_mut(&sid) else {
        return;
    };
    if s.holders() >= r && (s.since.is_some() || s.removed) {
        if let Some(t) = s.since.take() {
            st.lag.record(t.elapsed());
            st.waiting = st.waiting.saturating_sub(1);
        }
        s.next = None;
        if s.removed && !queued {
            st.sids.remove(&sid);
        }
    } else if let Some(t) = s.since
        && !s.removed
        && s.since_version > 0
        && s.covered(s.since_version, r)
    {
        // The oldest waiting update got its acks; a newer one still
        // waits, counted from when it was first seen.
        st.lag.record(t.elapsed());
        let (at, v) = s.next.take().unwrap_or((Instant::now(), s.version));
        s.since = Some(at);
        s.since_version = v;
        st.note_wait(sid, at);
    }
}

/// A one-thread wake-up: the dispatcher sets it when it queues work, the
/// idle link waits on it (with a timeout) instead of polling.
#[derive(Debug, Default)]
pub(super) struct Wake {
    pub(super) set: bool,
    pub(super) waker: Option<std::task::Waker>,
}

impl Wake {
    pub(super) fn notify(&mut self) {
        self.set = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}
