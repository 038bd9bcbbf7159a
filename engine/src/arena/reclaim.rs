//! Reclamation: pins, mutation sections, retire rings and their draining.
//!
//! The rule (`docs/ARCHITECTURE.md`, "Reclamation"): a block leaves the
//! shared structures only into another shared structure. A retired block
//! goes into its participant's retire ring in the arena; when the ring is
//! full the block is chained, through its `link` word, onto the ring's
//! newest entry instead of waiting in process memory. So a process killed at
//! any instruction leaves every retired block where a survivor finds it:
//! the ring of a dead participant is drained by whoever adopts it.

use super::{Arena, RECENT_PIN_EPOCHS, RECLAIM_BATCH};
use crate::epoch;
use crate::layout::{PARTICIPANTS_MAX, Participant, RETIRE_RING};
use crate::map::Map;
use crate::sync::{Backoff, Ordering};

impl Arena {
    /// Pins this handle against reclamation (nests).
    #[inline]
    pub(super) fn pin(&self) {
        let n = self.pins.get();
        if n == 0 && self.muts.get() == 0 {
            epoch::pin(&self.header().epoch, &self.participant().pin);
        }
        self.pins.set(n + 1);
    }

    #[inline]
    pub(super) fn unpin(&self) {
        let n = self.pins.get();
        debug_assert!(n > 0);
        self.pins.set(n - 1);
        if n == 1 && self.muts.get() == 0 {
            epoch::unpin(&self.participant().pin);
            self.settle();
        }
    }

    /// Enters a mutation section: pinned, and marked in the pin word as
    /// changing the heap, so that a collection waits for us (and we for
    /// it). Everything that allocates, links, retires or frees a block runs
    /// inside one. Nests; only the outermost waits for a running collection.
    #[inline]
    pub(super) fn begin_mut(&self) {
        let m = self.muts.get();
        if m == 0 {
            let pin = &self.participant().pin;
            loop {
                let held = if self.pins.get() > 0 {
                    epoch::pinned_epoch(pin.load(Ordering::Relaxed))
                } else {
                    self.header().epoch.load(Ordering::Relaxed)
                };
                // Dekker with `collect`: we publish "mutating" and then look
                // for a collector; it publishes itself and then looks for
                // mutators. One of us sees the other.
                let world = epoch::enter_mutation(pin, held, &self.collector().world);
                if world == 0 || world == self.owner {
                    break;
                }
                pin.store(if self.pins.get() > 0 { held } else { 0 }, Ordering::SeqCst);
                self.wait_for_world();
            }
        }
        self.muts.set(m + 1);
    }

    /// Leaves a mutation section.
    #[inline]
    pub(super) fn end_mut(&self) {
        self.leave_mut(true);
    }

    #[inline]
    pub(super) fn leave_mut(&self, settle: bool) {
        let m = self.muts.get();
        debug_assert!(m > 0);
        self.muts.set(m - 1);
        if m == 1 {
            let pin = &self.participant().pin;
            if self.pins.get() > 0 {
                let held = epoch::pinned_epoch(pin.load(Ordering::Relaxed));
                pin.store(held, Ordering::Release);
            } else {
                epoch::unpin(pin);
                if settle {
                    self.settle();
                }
            }
        }
    }

    /// At rest (neither pinned nor mutating): frees what can be freed once
    /// enough has piled up, and runs a collection when a dead process may
    /// have leaked blocks and none ran lately.
    fn settle(&self) {
        let p = self.participant();
        let len = p
            .ring_tail
            .load(Ordering::Relaxed)
            .wrapping_sub(p.ring_head.load(Ordering::Relaxed));
        if len >= RECLAIM_BATCH {
            self.begin_mut();
            self.reclaim(false);
            self.leave_mut(false);
        }
        if self.collector().suspects.load(Ordering::Relaxed) > 0 {
            let _ = self.collect_if_due(false);
        }
    }

    /// Waits while a collection runs; takes it over if its collector died.
    #[cold]
    fn wait_for_world(&self) {
        let backoff = Backoff::new();
        let mut spins = 0u32;
        loop {
            let world = self.collector().world.load(Ordering::SeqCst);
            if world == 0 {
                return;
            }
            spins += 1;
            if spins.is_multiple_of(super::SPINS_BEFORE_LIVENESS) && !self.owner_alive(world) {
                // The collector died with mutators stopped. Whatever it had
                // taken off the free lists is unreachable now: a collection
                // of our own finds it. If another survivor got there first,
                // we wait for that one instead.
                let _ = self.collect();
                continue;
            }
            if backoff.is_completed() {
                std::thread::sleep(std::time::Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    /// Hands a block to reclamation: freed once no pin can still see it.
    pub(super) fn retire(&self, block: u64) {
        debug_assert!(self.map.is_block(block));
        self.link(block).store(0, Ordering::Relaxed);
        self.retire_linked(block, block);
    }

    /// Hands the chain `first ..= last`, linked through the blocks' `link`
    /// words (offsets; `last` links to 0), to reclamation in one step: one
    /// store publishes it, so a kill leaves it either with the caller's
    /// structures or in the ring, never in between for more than that store.
    pub(super) fn retire_linked(&self, first: u64, last: u64) {
        debug_assert!(self.muts.get() > 0, "retire outside a mutation section");
        debug_assert!(self.map.is_block(first) && self.map.is_block(last));
        debug_assert_eq!(self.link(last).load(Ordering::Relaxed), 0);
        let e = epoch::retire(&self.header().epoch);
        let p = self.participant();
        let tail = p.ring_tail.load(Ordering::Relaxed);
        if tail.wrapping_sub(p.ring_head.load(Ordering::Relaxed)) >= RETIRE_RING {
            self.reclaim(true);
        }
        if tail.wrapping_sub(p.ring_head.load(Ordering::Relaxed)) >= RETIRE_RING {
            // Still full: something pins an old epoch. Chain onto the newest
            // entry. Its epoch first (a later epoch only delays the free),
            // then our chain's end, then the entry's head: a kill between
            // the last two leaves our chain unlinked (the collector's to
            // find), never a freed block in the ring.
            let entry = &p.ring[(tail.wrapping_sub(1) % RETIRE_RING) as usize];
            entry.epoch.store(e, Ordering::Release);
            self.link(last)
                .store(entry.block.load(Ordering::Relaxed), Ordering::Relaxed);
            entry.block.store(first, Ordering::Release);
            return;
        }
        let entry = &p.ring[(tail % RETIRE_RING) as usize];
        entry.block.store(first, Ordering::Relaxed);
        entry.epoch.store(e, Ordering::Relaxed);
        p.ring_tail.store(tail.wrapping_add(1), Ordering::Release);
    }

    /// The oldest epoch any live participant is pinned at (`u64::MAX` if
    /// none). With `thorough`, a recent pin is not taken as live on trust:
    /// the kernel is asked, and the pin of a dead participant is cleared.
    pub(super) fn min_pin(&self, thorough: bool) -> u64 {
        let hwm = self
            .header()
            .participants_hwm
            .load(Ordering::SeqCst)
            .min(PARTICIPANTS_MAX);
        let now = self.header().epoch.load(Ordering::Relaxed);
        let mut min = u64::MAX;
        for i in 0..hwm {
            let v = epoch::pinned_epoch(epoch::scan(&self.map.participant(i).pin));
            if v == 0 || v >= min {
                continue;
            }
            // A recent pin is taken as live without asking the kernel: a
            // dead process's pin only delays reclamation until it is old.
            let live = i == self.me
                || (!thorough && now.saturating_sub(v) < RECENT_PIN_EPOCHS)
                || self.participant_live(i)
                || !self.bury(i);
            if live {
                min = v;
            }
        }
        min
    }

    pub(super) fn participant_live(&self, i: u32) -> bool {
        self.map.participant_alive(i)
    }

    /// Clears the pin of participant `i`, found dead, under its lock byte
    /// (so no new claimant's pin is cleared instead). A pin that says the
    /// process died inside a mutation makes it a suspect: it may have
    /// leaked the block it was linking, which the next collection returns.
    /// False if `i` turned out to be alive after all.
    pub(super) fn bury(&self, i: u32) -> bool {
        if i == self.me || !Map::claim_lock(&self.file, i).unwrap_or(false) {
            return false;
        }
        let pin = self.map.participant(i).pin.swap(0, Ordering::SeqCst);
        if epoch::is_mutating(pin) {
            self.collector().suspects.fetch_add(1, Ordering::Relaxed);
        }
        let _ = Map::release_lock(&self.file, i);
        true
    }

    /// Frees the blocks of participant `p`'s retire ring that no pin older
    /// than `min` can see. The caller owns the ring (it is its own, or it
    /// holds the dead owner's lock byte).
    pub(super) fn drain_ring(&self, p: &Participant, min: u64) {
        let tail = p.ring_tail.load(Ordering::Acquire);
        let mut h = p.ring_head.load(Ordering::Acquire);
        let mut guard = self.map.geo.heap_bytes / crate::layout::BLOCK;
        while h != tail {
            let entry = &p.ring[(h % RETIRE_RING) as usize];
            if !epoch::may_free(entry.epoch.load(Ordering::Acquire), min) {
                break;
            }
            // One block at a time, each unlinked from the entry before it is
            // freed: a kill in between leaks that one block (the collector
            // finds it), never frees one twice, never strands the rest.
            loop {
                let block = entry.block.load(Ordering::Acquire);
                if !self.map.is_block(block) {
                    h = h.wrapping_add(1);
                    p.ring_head.store(h, Ordering::Release);
                    break;
                }
                let next = self.link(block).load(Ordering::Acquire);
                guard = guard.saturating_sub(1);
                if next != 0 && self.map.is_block(next) && guard > 0 {
                    entry.block.store(next, Ordering::Release);
                } else {
                    h = h.wrapping_add(1);
                    p.ring_head.store(h, Ordering::Release);
                    self.free(block);
                    break;
                }
                self.free(block);
            }
        }
    }

    /// Frees every retired block of ours no pin can see.
    pub(super) fn reclaim(&self, thorough: bool) {
        debug_assert!(self.muts.get() > 0, "reclaim outside a mutation section");
        let min = self.min_pin(thorough);
        self.drain_ring(self.participant(), min);
    }

    /// Frees what dead participants left in their retire rings. Each ring
    /// is taken over by locking its participant's byte, so no claimant can
    /// race us, then drained like our own and released.
    pub(super) fn adopt_dead_rings(&self) {
        debug_assert!(self.muts.get() > 0);
        let hwm = self
            .header()
            .participants_hwm
            .load(Ordering::Acquire)
            .min(PARTICIPANTS_MAX);
        let min = self.min_pin(true);
        for i in (0..hwm).filter(|&i| i != self.me) {
            let p = self.map.participant(i);
            if p.ring_head.load(Ordering::Acquire) == p.ring_tail.load(Ordering::Acquire) {
                continue;
            }
            if !Map::claim_lock(&self.file, i).unwrap_or(false) {
                continue;
            }
            self.drain_ring(p, min);
            let _ = Map::release_lock(&self.file, i);
        }
    }
}
