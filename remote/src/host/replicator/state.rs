//! What the replicator knows, and the rules that route and settle it:
//! plain data, no I/O, no arena.

use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use sessio_engine::Sid;

use super::{NodeStats, ReplicatorStats};
use crate::placement::Placement;

/// What the replicator knows of one session.
#[derive(Debug, Default)]
pub(super) struct SidState {
    pub(super) version: u64,
    pub(super) epoch: u64,
    /// Versions acknowledged, per node (a few entries).
    pub(super) acks: Vec<(u16, u64)>,
    /// When the current, not yet fully acknowledged, version was first seen.
    pub(super) since: Option<Instant>,
    pub(super) removed: bool,
    pub(super) fenced: bool,
}

impl SidState {
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
    /// Wakes the link's future when `pending` gains work.
    pub(super) wake: Wake,
}

/// Buckets of the lag histogram (powers of two of microseconds).
pub const LAG_BUCKETS: usize = 32;

/// Power-of-two buckets of microseconds.
#[derive(Debug, Default)]
pub(super) struct LagHistogram {
    pub(super) buckets: [u64; LAG_BUCKETS],
    pub(super) count: u64,
    pub(super) sum_us: u64,
    pub(super) max_us: u64,
}

impl LagHistogram {
    pub(super) fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let b = (64 - us.leading_zeros()) as usize;
        self.buckets[b.min(LAG_BUCKETS - 1)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    pub(super) fn quantile(&self, q: f64) -> u64 {
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

pub(super) struct State {
    pub(super) placement: Placement,
    pub(super) sids: HashMap<Sid, SidState>,
    pub(super) nodes: Vec<NodeLink>,
    pub(super) lag: LagHistogram,
    pub(super) ticks: u64,
    pub(super) rate_mark: (Instant, u64),
    pub(super) bytes_per_sec: u64,
}

impl State {
    pub(super) fn link(&mut self, id: u16) -> Option<&mut NodeLink> {
        self.nodes.iter_mut().find(|n| n.stats.id == id)
    }

    pub(super) fn is_up(&self, id: u16) -> bool {
        self.nodes.iter().any(|n| n.stats.id == id && n.stats.up)
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

    pub(super) fn snapshot(&mut self, backend: &'static str) -> ReplicatorStats {
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
pub(super) fn settle(st: &mut State, sid: Sid) {
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
