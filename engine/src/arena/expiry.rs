//! Expiry and eviction: the bounded sweep that removes expired sessions,
//! and the removal of copies another host took over. Both go through the
//! session's queue, so a removal is ordered with concurrent updates.

use super::{Arena, SweepStats, rec_off};
use crate::session::{Op, encode_ops};
use crate::sid::Sid;
use crate::sync::Ordering;
use crate::words::{SLOT_LIVE, evict_below, expire_only, slot_kind};

impl Arena {
    /// Expires sessions: looks at up to `max_slots` index slots from where
    /// the last sweep stopped and removes those expired at `now_ms`. Each
    /// removal goes through the session's queue, so it is ordered with
    /// concurrent updates and applied only if the session is still expired.
    pub fn sweep(&self, now_ms: u64, max_slots: u64) -> SweepStats {
        let mut stats = SweepStats::default();
        let slots = self.map.geo.index_slots;
        let mut cur = self.sweep_cursor.get();
        for _ in 0..max_slots.min(slots) {
            let i = cur % slots;
            cur = cur.wrapping_add(1);
            stats.scanned += 1;
            let s = self.map.slot(i);
            if slot_kind(s.state.load(Ordering::Acquire)) != SLOT_LIVE {
                continue;
            }
            let sid = Sid::from_words(
                s.sid_lo.load(Ordering::Relaxed),
                s.sid_hi.load(Ordering::Relaxed),
            );
            self.pin();
            let expired = self
                .record_at(rec_off(s.record.load(Ordering::Acquire)))
                .is_ok_and(|(_, bytes)| {
                    Self::archived(bytes).expired(now_ms, self.last_read_ms(s))
                });
            self.unpin();
            if expired {
                let before = self.header().expired_total.load(Ordering::Relaxed);
                let r = self.push_and_wait(sid, &encode_ops(&[Op::Touch]), expire_only(now_ms));
                if r.is_ok() && self.header().expired_total.load(Ordering::Relaxed) > before {
                    stats.expired += 1;
                }
            }
        }
        self.sweep_cursor.set(cur % slots);
        stats
    }

    /// Removes this host's copy of `sid` if it is held under an ownership
    /// epoch below `epoch`: the bank says another host took the session
    /// over, so the copy is stale, and the next read here fetches the
    /// current one. Ordered with concurrent updates like any removal (one
    /// racing it is lost with the copy: the bank fences it anyway). Returns
    /// whether the copy went.
    pub fn evict_older(&self, sid: Sid, epoch: u64) -> Result<bool, crate::SessionError> {
        let before = self.header().evicted_total.load(Ordering::Relaxed);
        match self.push_and_wait(sid, &encode_ops(&[Op::Touch]), evict_below(epoch)) {
            Ok(_) => Ok(self.header().evicted_total.load(Ordering::Relaxed) > before),
            Err(crate::SessionError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
