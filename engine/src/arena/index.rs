//! The open-addressing index: where a SID hashes to, lookup without locks,
//! insertion and tombstone pruning under the insert lock, and the lock
//! words (taking one, stealing it from the dead).

use super::{Arena, SPINS_BEFORE_LIVENESS};
use crate::error::SessionError;
use crate::layout::{BLOCK, DIRTY_LEVELS, IndexSlot, PARTICIPANTS_MAX, RecordHeader};
use crate::lock;
use crate::queue::{self, EMPTY};
use crate::sid::Sid;
use crate::sync::{Backoff, Ordering, fence};
use crate::words::{SLOT_EMPTY, SLOT_LIVE, SLOT_TOMB, record_word, slot_kind, slot_next};

impl Arena {
    #[inline]
    pub(super) fn home(&self, sid: Sid) -> u64 {
        // SIDs are 128 CSPRNG bits and only the engine mints them, so a
        // seeded multiply-mix is enough to spread them; the seed keeps a
        // SID a client presents from being aimed at one probe chain.
        let (lo, hi) = sid.words();
        let x =
            (lo ^ self.header().hash_seed ^ hi.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The high half of x × slots: uniform over any slot count (not only
        // powers of two, which would leave up to half the index unused).
        ((u128::from(x) * u128::from(self.map.geo.index_slots)) >> 64) as u64
    }

    /// The slot after `i`, wrapping.
    #[inline]
    fn next_slot(&self, i: u64) -> u64 {
        let j = i + 1;
        if j == self.map.geo.index_slots { 0 } else { j }
    }

    /// The slot before `i`, wrapping.
    fn prev_slot(&self, i: u64) -> u64 {
        if i == 0 {
            self.map.geo.index_slots - 1
        } else {
            i - 1
        }
    }

    /// Finds the live slot of `sid`.
    #[inline]
    pub(super) fn lookup(&self, sid: Sid) -> Option<(u64, &IndexSlot)> {
        let (lo, hi) = sid.words();
        let mut i = self.home(sid);
        for _ in 0..self.map.geo.index_slots {
            let s = self.map.slot(i);
            let st = s.state.load(Ordering::Acquire);
            match slot_kind(st) {
                SLOT_EMPTY => return None,
                SLOT_LIVE
                    if s.sid_lo.load(Ordering::Relaxed) == lo
                        && s.sid_hi.load(Ordering::Relaxed) == hi =>
                {
                    // Seqlock-style: the SID words count only if the state
                    // did not change around them (the slot was not reused).
                    fence(Ordering::Acquire);
                    if s.state.load(Ordering::Relaxed) == st {
                        return Some((i, s));
                    }
                }
                _ => {}
            }
            i = self.next_slot(i);
        }
        None
    }

    /// Whether the owner of a lock word is alive.
    pub(super) fn owner_alive(&self, word: u32) -> bool {
        let slot = u32::from(lock::owner_slot(word));
        if slot >= PARTICIPANTS_MAX {
            return false;
        }
        if word == self.owner {
            return true;
        }
        let p = self.map.participant(slot);
        (p.generation.load(Ordering::SeqCst) as u16) == lock::owner_generation(word)
            && self.participant_live(slot)
    }

    /// Takes a lock word, stealing it from a dead holder; returns the dead
    /// holder's owner word if it stole.
    pub(super) fn acquire(&self, word: &crate::sync::AtomicU32) -> Option<u32> {
        let backoff = Backoff::new();
        let mut spins = 0u32;
        loop {
            match lock::try_lock(word, self.owner) {
                Ok(()) => return None,
                Err(0) => {}
                Err(holder) => {
                    spins += 1;
                    if spins.is_multiple_of(SPINS_BEFORE_LIVENESS)
                        && !self.owner_alive(holder)
                        && lock::steal(word, holder, self.owner)
                    {
                        return Some(holder);
                    }
                    backoff.snooze();
                }
            }
        }
    }

    pub(super) fn insert_lock(&self) -> InsertLock<'_> {
        let _ = self.acquire(&self.header().insert_lock);
        InsertLock(self)
    }

    /// Inserts `sid` with record `rec` (under the insert lock). Returns the
    /// slot, or the live slot already holding `sid`.
    pub(super) fn insert(
        &self,
        sid: Sid,
        rec: u64,
        fresh_sid: bool,
    ) -> Result<Result<u64, u64>, SessionError> {
        let _g = self.insert_lock();
        let h = self.header();
        let (lo, hi) = sid.words();
        let mut i = self.home(sid);
        let mut target = None;
        // A tombstone whose removal the replicator has not taken yet, in
        // case no other slot is free.
        let mut pending = None;
        for _ in 0..self.map.geo.index_slots {
            let s = self.map.slot(i);
            let st = s.state.load(Ordering::Acquire);
            match slot_kind(st) {
                SLOT_LIVE
                    if s.sid_lo.load(Ordering::Relaxed) == lo
                        && s.sid_hi.load(Ordering::Relaxed) == hi =>
                {
                    return Ok(Err(i));
                }
                SLOT_EMPTY => {
                    target.get_or_insert(i);
                    break;
                }
                SLOT_TOMB if target.is_none() => {
                    let l = s.lock.load(Ordering::Acquire);
                    // A remover clears the lock just after marking the
                    // tombstone; a dead remover's lock is cleared here.
                    let free = l == 0 || (!self.owner_alive(l) && lock::steal(&s.lock, l, 0));
                    if free && self.removal_pending(i) {
                        // Reusing it would overwrite the SID the replicator
                        // is to tell the bank is gone.
                        pending.get_or_insert(i);
                    } else if free {
                        target = Some(i);
                        if fresh_sid {
                            // A fresh random SID cannot be further along.
                            break;
                        }
                    }
                }
                _ => {}
            }
            i = self.next_slot(i);
        }
        if h.live.load(Ordering::Acquire) >= self.map.geo.capacity {
            return Err(SessionError::Full(h.live.load(Ordering::Relaxed)));
        }
        let i = match (target, pending) {
            (Some(i), _) => i,
            (None, Some(i)) => {
                // Every free slot on the chain waits for the replicator
                // (which must be stalled): serve, and count the removal the
                // bank will not hear of (its copy then ends by expiry).
                h.removals_dropped.fetch_add(1, Ordering::Relaxed);
                i
            }
            (None, None) => return Err(SessionError::Full(h.live.load(Ordering::Relaxed))),
        };
        let s = self.map.slot(i);
        let st = s.state.load(Ordering::Acquire);
        // The queue's seq continues across incarnations of a slot, so a
        // waiter from an earlier one never misreads this one's progress.
        let seq = queue::head_seq(s.head.load(Ordering::Acquire));
        debug_assert!(
            self.map
                .block_header::<RecordHeader>(rec)
                .is_some_and(|rh| rh.applied_seq == 0)
        );
        self.set_applied(rec, seq);
        s.sid_lo.store(lo, Ordering::Relaxed);
        s.sid_hi.store(hi, Ordering::Relaxed);
        s.record.store(self.rec_word(rec), Ordering::Relaxed);
        s.head.store(queue::head(seq, EMPTY), Ordering::Relaxed);
        s.access_s.store(0, Ordering::Relaxed);
        s.acked[0].store(0, Ordering::Relaxed);
        s.acked[1].store(0, Ordering::Relaxed);
        // The commit point: one store makes the slot live.
        s.state.store(slot_next(st, SLOT_LIVE), Ordering::Release);
        h.live.fetch_add(1, Ordering::AcqRel);
        self.mark_dirty(i);
        Ok(Ok(i))
    }

    /// The record word for the unpublished record block `off`: its block
    /// index and the archive's length, so a reader can fetch every line of
    /// the record at once instead of one dependent miss after another.
    pub(super) fn rec_word(&self, off: u64) -> u64 {
        debug_assert!(self.map.is_block(off) && u32::try_from(off / BLOCK).is_ok());
        let len = self
            .map
            .block_header::<RecordHeader>(off)
            .expect("record words are made for blocks we allocated")
            .start
            .len;
        record_word(len, (off / BLOCK) as u32)
    }

    pub(super) fn set_applied(&self, rec: u64, seq: u32) {
        let p = self
            .map
            .block_header_ptr::<RecordHeader>(rec)
            .expect("applied_seq is set on blocks we allocated");
        // SAFETY: `rec` is unpublished and ours: no reader sees it yet; `p`
        // points at its header, in bounds.
        unsafe {
            (*p).applied_seq = seq;
        }
    }

    /// Whether slot `i` holds a removal a replicator has yet to take: its
    /// dirty bit is set in an arena a replicator serves (one has recorded a
    /// node). Without a replicator nobody takes the bits, and nobody needs
    /// the removals.
    pub(super) fn removal_pending(&self, i: u64) -> bool {
        self.header().replicas[0].node.load(Ordering::Relaxed) != 0
            && self.map.dirty_word(i / 64).load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets slot `slot`'s dirty bit, then its bit in each summary above,
    /// then the hint. A replicator clears them top down (hint, summaries,
    /// bits), so whatever it cleared before one of these stores it finds
    /// after the next. A summary bit already set is left alone: the
    /// replicator clears it before it looks at the word below, so the bit
    /// set there first is seen.
    pub(super) fn mark_dirty(&self, slot: u64) {
        let mut i = slot;
        for level in 0..DIRTY_LEVELS {
            let word = self.map.dirty_level_word(level, i / 64);
            let bit = 1 << (i % 64);
            if level == 0 || word.load(Ordering::SeqCst) & bit == 0 {
                word.fetch_or(bit, Ordering::SeqCst);
            }
            i /= 64;
        }
        self.raise_hint();
    }

    /// Turns the tombstone run ending at `i` into empty slots when the slot
    /// after it is empty: no probe chain passes through them any more.
    /// Called under the insert lock.
    pub(super) fn prune_tombstones(&self, i: u64) {
        let next = self.map.slot(self.next_slot(i));
        if slot_kind(next.state.load(Ordering::Acquire)) != SLOT_EMPTY {
            return;
        }
        let mut j = i;
        for _ in 0..self.map.geo.index_slots {
            let s = self.map.slot(j);
            let st = s.state.load(Ordering::Acquire);
            if slot_kind(st) != SLOT_TOMB {
                break;
            }
            // A tombstone whose removal the replicator has not taken stays
            // one (an empty slot would be reused at once); the run holds no
            // live session, so the slots around it may still be emptied.
            if !self.removal_pending(j) {
                s.state.store(slot_next(st, SLOT_EMPTY), Ordering::Release);
            }
            j = self.prev_slot(j);
        }
    }
}

pub(super) struct InsertLock<'a>(&'a Arena);

impl Drop for InsertLock<'_> {
    fn drop(&mut self) {
        lock::unlock(&self.0.header().insert_lock, self.0.owner);
    }
}
