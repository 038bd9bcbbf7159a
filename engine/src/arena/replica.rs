//! The replicator's view: dirty sessions, deltas since a replica's version,
//! per-session acks, replica incarnations, and full scans.

use super::{Arena, Delta, Dirty, rec_off};
use crate::error::SessionError;
use crate::layout::{DIRTY_LEVELS, HINT_CLEAR, HINT_SET};
use crate::queue;
use crate::sid::Sid;
use crate::sync::Ordering;
use crate::words::{SLOT_EMPTY, SLOT_LIVE, SLOT_TOMB, ack_unpack, ack_word, slot_kind};

/// How often [`Arena::take_dirty`] sweeps a slice of the bitmap itself,
/// hint or not, and how many words a slice holds. A process killed between
/// a dirty bit and its summaries (or its hint) leaves a bit no summary
/// leads to: a sweep finds it within `index_slots / 64 / DIRTY_SWEEP_WORDS`
/// sweeps (0.1 s up to 256 Ki slots, 6.4 s at 16 Mi).
const DIRTY_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const DIRTY_SWEEP_WORDS: u64 = 4096;

impl Arena {
    /// Collects up to `max` sessions changed since they were last taken,
    /// skipping (and keeping marked) those whose queue is not drained yet;
    /// queues left behind by a dead process are applied here.
    ///
    /// The work does not grow with the capacity: with the hint down it
    /// reads one word, and with it up it walks the summaries down to the
    /// marked words only (see `docs/ARCHITECTURE.md`, "Dirty bitmap").
    pub fn take_dirty(&self, max: usize, out: &mut Vec<Dirty>) {
        out.clear();
        if self.header().dirty_hint.swap(HINT_CLEAR, Ordering::SeqCst) == HINT_SET {
            let top = DIRTY_LEVELS - 1;
            let words = self.map.dirty_level_len(top);
            let from = self.dirty_cursor.get() % words;
            for k in 0..words {
                let w = (from + k) % words;
                if self.take_level(top, w, max, out) {
                    // Stopped full: this word keeps what is left.
                    self.dirty_cursor.set(w);
                    break;
                }
            }
        }
        if out.len() < max && self.dirty_scanned.get().elapsed() >= DIRTY_SWEEP_EVERY {
            self.dirty_scanned.set(std::time::Instant::now());
            let words = self.map.dirty_level_len(0);
            let mut w = self.dirty_sweep.get() % words;
            for _ in 0..DIRTY_SWEEP_WORDS.min(words) {
                if self.take_level(0, w, max, out) {
                    break;
                }
                w = (w + 1) % words;
            }
            self.dirty_sweep.set(w);
        }
        if out.len() >= max {
            // Stopped early: what is left is still marked.
            self.header().dirty_hint.store(HINT_SET, Ordering::SeqCst);
        }
    }

    /// Takes what word `w` of level `level` leads to, clearing it first.
    /// Returns whether `out` filled up: what was not taken is marked again
    /// (a slot through [`Arena::mark_dirty`]; the bits of a summary word
    /// here, and its own bit above by the caller, lowest level first).
    fn take_level(&self, level: usize, w: u64, max: usize, out: &mut Vec<Dirty>) -> bool {
        let word = self.map.dirty_level_word(level, w);
        // Most words are clear: a load leaves their cache line shared.
        if word.load(Ordering::SeqCst) == 0 {
            return out.len() >= max;
        }
        let mut rest = word.swap(0, Ordering::SeqCst);
        while rest != 0 {
            let b = u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            let i = w * 64 + b;
            if level == 0 {
                if out.len() >= max {
                    self.mark_dirty(i);
                    continue;
                }
                match self.dirty_entry(i) {
                    Some(d) => out.push(d),
                    None => self.mark_dirty(i),
                }
            } else if out.len() >= max || self.take_level(level - 1, i, max, out) {
                word.fetch_or(1 << b | rest, Ordering::SeqCst);
                return true;
            }
        }
        out.len() >= max
    }

    pub(super) fn dirty_entry(&self, i: u64) -> Option<Dirty> {
        let s = self.map.slot(i);
        let st = s.state.load(Ordering::Acquire);
        let sid = Sid::from_words(
            s.sid_lo.load(Ordering::Relaxed),
            s.sid_hi.load(Ordering::Relaxed),
        );
        match slot_kind(st) {
            SLOT_LIVE => {}
            SLOT_TOMB | SLOT_EMPTY if st != 0 => return Some(Dirty::Removed { sid }),
            _ => return None,
        }
        let h = s.head.load(Ordering::Acquire);
        self.pin();
        let applied = self
            .record_at(rec_off(s.record.load(Ordering::Acquire)))
            .map(|(rh, _)| rh.applied_seq);
        self.unpin();
        if applied.ok()? != queue::head_seq(h) {
            // Not drained. A batch whose pusher died is applied by whoever
            // finds the lock free (or held by the dead).
            self.help(i);
            return None;
        }
        self.pin();
        let entry = self
            .record_at(rec_off(s.record.load(Ordering::Acquire)))
            .ok()
            .map(|(rh, _)| Dirty::Changed {
                sid,
                version: rh.version,
                epoch: rh.epoch,
                acked: [
                    ack_unpack(s.acked[0].load(Ordering::Acquire)),
                    ack_unpack(s.acked[1].load(Ordering::Acquire)),
                ],
            });
        self.unpin();
        entry
    }

    /// What to ship to a replica that holds `base`: the op batches since
    /// then, or the whole record when the log no longer reaches back.
    pub fn delta_since(&self, sid: Sid, base: u64) -> Result<Delta, SessionError> {
        let g = self.read_any(sid)?;
        let version = g.version();
        let epoch = g.epoch();
        if base == version {
            return Ok(Delta::UpToDate);
        }
        // `logged_batches` answers `None` for a base at or past `version`.
        if base != 0
            && let Some(batches) = self.logged_batches(sid, g.log_at(), version, base)
        {
            return Ok(Delta::Ops {
                version,
                epoch,
                batches,
            });
        }
        Ok(Delta::Full {
            version,
            epoch,
            bytes: g.bytes().to_vec(),
        })
    }

    /// Records that replica `node` holds `version` of `sid`. Two replicas per
    /// session are remembered in the arena; a third replaces the one with
    /// the oldest ack. Acks only move forward.
    pub fn mark_acked(&self, sid: Sid, node: u16, version: u64) -> Result<(), SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        let new = ack_word(node, version);
        let (a, b) = (&s.acked[0], &s.acked[1]);
        // Whether the first of the two ack words is the one to write.
        let first = |x: u64, y: u64| {
            let (xn, xv) = ack_unpack(x);
            let (yn, yv) = ack_unpack(y);
            if x != 0 && xn == node {
                true
            } else if y != 0 && yn == node {
                false
            } else {
                x == 0 || (y != 0 && xv <= yv)
            }
        };
        loop {
            let (x, y) = (a.load(Ordering::Acquire), b.load(Ordering::Acquire));
            let (slot, cur) = if first(x, y) { (a, x) } else { (b, y) };
            let (cn, cv) = ack_unpack(cur);
            if cur != 0 && cn == node && cv >= version {
                return Ok(());
            }
            if slot
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Forgets replica `node`'s ack of `sid` (it dropped its copy).
    pub fn forget_ack(&self, sid: Sid, node: u16) -> Result<(), SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        for w in &s.acked {
            let cur = w.load(Ordering::Acquire);
            if cur != 0 && ack_unpack(cur).0 == node {
                let _ = w.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The acks recorded for `sid` as `(node, version)`; `(0, 0)` = none.
    pub fn acked(&self, sid: Sid) -> Result<[(u16, u64); 2], SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        Ok([
            ack_unpack(s.acked[0].load(Ordering::Acquire)),
            ack_unpack(s.acked[1].load(Ordering::Acquire)),
        ])
    }

    /// The incarnation recorded for replica `node` by
    /// [`set_replica_incarnation`](Self::set_replica_incarnation), if any.
    /// While it matches what the node announces, the acks recorded for the
    /// node ([`acked`](Self::acked)) still describe copies the node holds.
    pub fn replica_incarnation(&self, node: u16) -> Option<u64> {
        let want = u64::from(node) + 1;
        self.header()
            .replicas
            .iter()
            .find(|e| e.node.load(Ordering::Acquire) == want)
            .map(|e| e.incarnation.load(Ordering::Acquire))
            .filter(|&i| i != 0)
    }

    /// Records replica `node`'s incarnation (nonzero). The caller first
    /// forgets the node's acks from any other incarnation
    /// ([`forget_acks`](Self::forget_acks)). Returns false when the table
    /// (`Arena::REPLICAS_MAX` nodes) is full: the node's acks are then not
    /// to be trusted after a restart of the caller.
    pub fn set_replica_incarnation(&self, node: u16, incarnation: u64) -> bool {
        let want = u64::from(node) + 1;
        for e in &self.header().replicas {
            let cur = e.node.load(Ordering::Acquire);
            let claimed = cur == want
                || (cur == 0
                    && match e
                        .node
                        .compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => true,
                        Err(other) => other == want,
                    });
            if claimed {
                e.incarnation.store(incarnation, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Clears every ack recorded for replica `node` (a full scan of the
    /// index), because the node restarted and lost its copies; returns how
    /// many were cleared.
    pub fn forget_acks(&self, node: u16) -> u64 {
        let mut cleared = 0;
        for i in 0..self.map.geo.index_slots {
            for w in &self.map.slot(i).acked {
                let cur = w.load(Ordering::Acquire);
                if cur != 0
                    && ack_unpack(cur).0 == node
                    && w.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    cleared += 1;
                }
            }
        }
        cleared
    }

    /// Marks every live session dirty, so the replicator ships them all
    /// (after a replica comes back empty, or a replicator starts fresh).
    pub fn mark_all_dirty(&self) {
        for i in 0..self.map.geo.index_slots {
            if slot_kind(self.map.slot(i).state.load(Ordering::Acquire)) == SLOT_LIVE {
                self.mark_dirty(i);
            }
        }
    }

    /// Every live session's SID (a full scan; for tools and tests).
    pub fn sids(&self) -> Vec<Sid> {
        (0..self.map.geo.index_slots)
            .map(|i| self.map.slot(i))
            .filter(|s| slot_kind(s.state.load(Ordering::Acquire)) == SLOT_LIVE)
            .map(|s| {
                Sid::from_words(
                    s.sid_lo.load(Ordering::Relaxed),
                    s.sid_hi.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}
