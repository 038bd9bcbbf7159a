//! Online collection: finds the blocks killed processes left unreachable,
//! and gives wholly free chunks back to the chunk pool, while the host runs.
//!
//! A process killed inside a mutation can leave the one block it was
//! linking on no list at all (popped but not yet pushed, unlinked but not
//! yet retired). Nothing else refers to such a block, so only a look at the
//! whole heap finds it: a collection marks every block reachable from the
//! index (records and queued op nodes), the retire rings and the dead
//! combiners' half-built records, and rebuilds the free lists from the rest.
//!
//! For that one moment the heap must be at rest. A collector publishes
//! itself in the header's `world` word and waits until no live participant
//! is inside a mutation (the [`MUTATING`](crate::epoch::MUTATING) bit of
//! its pin); mutations that start meanwhile wait for it to finish. Reads
//! never wait: they change nothing a collection looks at. A collector killed
//! half-way leaves free blocks on no list, which is what a collection finds:
//! the first mutation that sees its word with a dead owner collects again.
//!
//! Blocks found leaked are retired, not freed: one may be a record a dead
//! combiner had just replaced, which a pinned reader may still be reading.

use super::{Arena, Bits, COMBINE_BATCH_MAX, HeapNodes, rec_off};
use crate::epoch;
use crate::layout::{
    BLOCK, CHUNK_UNASSIGNED, Collector, NODE_MAGIC, NodeHeader, PARTICIPANTS_MAX, RETIRE_RING,
};
use crate::queue::{self, EMPTY, Nodes};
use crate::sync::Ordering;
use crate::words::{CARVE_NONE, SLOT_LIVE, carve_chunk, slot_kind, stack_index, stack_next};
use std::time::{Duration, Instant};

/// How long a collection waits for live mutations to finish before it
/// gives up (a mutation takes microseconds; a stopped process takes
/// forever).
const COLLECT_WAIT_MS: u64 = 200;
/// Least time between two collections that only suspects call for, and
/// between two for want of space that returned nothing.
const COLLECT_INTERVAL_MS: u64 = 1000;

/// What one collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectReport {
    /// Blocks in use: reachable from the index, waiting in a retire ring,
    /// or being built by a dead combiner.
    pub in_use_blocks: u64,
    /// Bytes of those blocks (their size classes).
    pub in_use_bytes: u64,
    /// Blocks on the free lists afterwards.
    pub free_blocks: u64,
    /// Bytes of those blocks.
    pub free_bytes: u64,
    /// Chunks in the pool afterwards (no class owns them).
    pub free_chunks: u64,
    /// Blocks that were neither in use nor free: lost by processes killed
    /// inside a mutation. Retired now, free after their grace period.
    pub leaked_blocks: u64,
    /// Chunks that were neither in the pool nor owned by a class: taken by a
    /// process killed before it installed them. Back in the pool now.
    pub leaked_chunks: u64,
    /// Chunks whose blocks were all free, given back to the pool so any
    /// size class can use them.
    pub returned_chunks: u64,
    /// How long mutations waited, in µs (reads never wait).
    pub pause_us: u64,
}

/// Why a collection did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CollectError {
    /// Another live handle is collecting.
    #[error("another collection is running")]
    Running,
    /// A live process stayed inside a mutation for the whole wait (it may
    /// be stopped, or starved of CPU); nothing was changed.
    #[error("process {pid} stayed inside an update for {waited_ms} ms; collection abandoned")]
    Busy {
        /// The process (as it registered its handle).
        pid: u32,
        /// How long the collection waited.
        waited_ms: u64,
    },
}

/// Chunk-map value of a chunk a collection is giving back to the pool:
/// its class with the top bit set (classes are below 128).
const RETURNING: u8 = 0x80;

/// The class of a chunk-map value that marks a returning chunk.
fn returning_class(byte: u8) -> Option<usize> {
    (byte != CHUNK_UNASSIGNED && byte & RETURNING != 0).then_some((byte & !RETURNING) as usize)
}

/// A chain of blocks built one by one and handed over with one store.
#[derive(Default, Clone, Copy)]
struct Chain {
    first: u64,
    last: u64,
    len: u64,
}

impl Arena {
    pub(super) fn collector(&self) -> &Collector {
        &self.header().collector
    }

    /// Runs a collection if one is due: `for_space` when an allocation has
    /// just failed (due unless the last collection returned nothing less
    /// than an interval ago and no session was removed since), otherwise
    /// when dead processes may have leaked blocks (due at most once per
    /// interval). Returns whether one ran and gave
    /// something back. Called only at rest (no mutation, no lock held).
    pub(super) fn collect_if_due(&self, for_space: bool) -> bool {
        debug_assert_eq!(self.muts.get(), 0);
        let c = self.collector();
        let now = crate::clock::now_ms();
        let suspects = c.suspects.load(Ordering::Relaxed) > 0;
        let due = if for_space {
            suspects || now >= c.quiet_until_ms.load(Ordering::Relaxed)
        } else {
            suspects && now >= c.last_ms.load(Ordering::Relaxed) + COLLECT_INTERVAL_MS
        };
        due && self
            .collect()
            .is_ok_and(|r| r.leaked_blocks > 0 || r.leaked_chunks > 0 || r.returned_chunks > 0)
    }

    /// Collects now: returns the blocks and chunks killed processes lost,
    /// and gives wholly free chunks back to the pool. Mutations of every
    /// process wait meanwhile (reads go on); the pause grows with the heap
    /// (see `docs/ARCHITECTURE.md`). The engine runs this by itself when an
    /// allocation fails and when a process died inside a mutation.
    pub fn collect(&self) -> Result<CollectReport, CollectError> {
        assert_eq!(self.muts.get(), 0, "collect inside a mutation");
        let c = self.collector();
        let mut cur = c.world.load(Ordering::SeqCst);
        loop {
            if cur != 0 && (cur == self.owner || self.owner_alive(cur)) {
                return Err(CollectError::Running);
            }
            // Free, or its collector died: ours. A dead collector's work is
            // simply done again.
            match epoch::stop_world(&c.world, cur, self.owner) {
                Ok(()) => break,
                Err(now) => cur = now,
            }
        }
        let started = Instant::now();
        let r = self.wait_for_rest(started).map(|()| self.collect_at_rest());
        if let Ok(report) = &r {
            let mut report = report.clone();
            report.pause_us = started.elapsed().as_micros() as u64;
            let now = crate::clock::now_ms();
            let gave = report.leaked_blocks + report.leaked_chunks + report.returned_chunks;
            c.quiet_until_ms.store(
                if gave == 0 {
                    now + COLLECT_INTERVAL_MS
                } else {
                    0
                },
                Ordering::Relaxed,
            );
            c.last_ms.store(now, Ordering::Relaxed);
            c.collections.fetch_add(1, Ordering::Relaxed);
            c.leaked_blocks
                .fetch_add(report.leaked_blocks, Ordering::Relaxed);
            c.returned_chunks
                .fetch_add(report.returned_chunks, Ordering::Relaxed);
            c.last_pause_us.store(report.pause_us, Ordering::Relaxed);
            c.world.store(0, Ordering::SeqCst);
            return Ok(report);
        }
        c.world.store(0, Ordering::SeqCst);
        r
    }

    /// Waits until no live participant but us is inside a mutation. Dead
    /// ones are buried: their pins cleared, the leaks they may have left
    /// about to be found.
    fn wait_for_rest(&self, started: Instant) -> Result<(), CollectError> {
        let hwm = self
            .header()
            .participants_hwm
            .load(Ordering::SeqCst)
            .min(PARTICIPANTS_MAX);
        let deadline = started + Duration::from_millis(COLLECT_WAIT_MS);
        for i in (0..hwm).filter(|&i| i != self.me) {
            let p = self.map.participant(i);
            let mut spins = 0u32;
            while !epoch::at_rest(&p.pin) {
                spins += 1;
                if spins.is_multiple_of(64) && !self.participant_live(i) && self.bury(i) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(CollectError::Busy {
                        pid: p.pid.load(Ordering::Relaxed),
                        waited_ms: COLLECT_WAIT_MS,
                    });
                }
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        // Every suspect so far is covered by this collection.
        self.collector().suspects.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// The collection proper; the heap is at rest.
    fn collect_at_rest(&self) -> CollectReport {
        // Free first what dead handles left retired and no pin still sees,
        // so that what is counted in use is in use.
        self.begin_mut();
        self.adopt_dead_rings();
        self.leave_mut(false);
        let geo = &self.map.geo;
        let h = self.header();
        let blocks = geo.heap_bytes / BLOCK;
        let bit = |off: u64| (off - geo.heap_off) / BLOCK;
        let used = self.mark_in_use();
        // What is free now: the class lists, the unused rest of each
        // class's carving chunk, and the chunk pool.
        let mut free = Bits::new(blocks);
        for class in 0..geo.classes.len() {
            let mut idx = stack_index(h.class_free[class].load(Ordering::Acquire));
            let mut guard = blocks;
            while idx != 0 && guard > 0 {
                let off = self.block_off(idx);
                if !self.map.is_block(off) || free.test_and_set(bit(off)) {
                    break;
                }
                idx = stack_index(self.link(off).load(Ordering::Acquire));
                guard -= 1;
            }
            for off in self.uncarved(class) {
                free.test_and_set(bit(off));
            }
        }
        let mut pooled = Bits::new(geo.chunks);
        let mut idx = stack_index(h.chunk_free.load(Ordering::Acquire));
        let mut guard = geo.chunks;
        while idx != 0 && idx <= geo.chunks && guard > 0 {
            if pooled.test_and_set(idx - 1) {
                break;
            }
            idx = stack_index(self.link(self.chunk_off(idx - 1)).load(Ordering::Acquire));
            guard -= 1;
        }

        // Sort the chunks: whole free ones go back to the pool, lost blocks
        // are gathered. Nothing is taken off a list wholesale: each step
        // below leaves every free block on a list, in the pool, or in a
        // chunk marked returning (which the next collection finishes).
        let mut report = CollectReport::default();
        let mut returning: Vec<(u64, usize)> = Vec::new();
        let mut leaked = Chain::default();
        let top = h.chunk_top.load(Ordering::Acquire).min(geo.chunks);
        for c in 0..top {
            let start = self.chunk_off(c);
            let byte = self.map.chunk_class(c).load(Ordering::Acquire);
            if byte == CHUNK_UNASSIGNED {
                if !pooled.get(c) {
                    // Taken from the pool by a process killed before it
                    // installed it: never handed out, back it goes.
                    report.leaked_chunks += 1;
                    self.push_free_chunk(c);
                }
                continue;
            }
            let (class, was_returning) = match returning_class(byte) {
                Some(class) => (class, true),
                None => (byte as usize, false),
            };
            if class >= geo.classes.len() {
                // A damaged chunk map: leave the chunk alone.
                continue;
            }
            let size = geo.classes[class];
            let per_chunk = geo.chunk_bytes / size;
            let offs = (0..per_chunk).map(|k| start + k * size);
            let (mut in_use, mut lost) = (0u64, 0u64);
            for off in offs.clone() {
                if used.get(bit(off)) {
                    in_use += 1;
                } else if !free.get(bit(off)) {
                    lost += 1;
                }
            }
            report.in_use_blocks += in_use;
            report.in_use_bytes += in_use * size;
            // A chunk a dead collector was returning had only free blocks,
            // some of them already taken off its class's list.
            if in_use == 0 && (lost == 0 || was_returning) {
                returning.push((c, class));
                continue;
            }
            report.free_blocks += per_chunk - in_use - lost;
            report.free_bytes += (per_chunk - in_use - lost) * size;
            for off in offs.filter(|&off| !used.get(bit(off)) && !free.get(bit(off))) {
                self.link(off).store(0, Ordering::Relaxed);
                if leaked.len == 0 {
                    leaked.first = off;
                } else {
                    self.link(leaked.last).store(off, Ordering::Relaxed);
                }
                leaked.last = off;
                leaked.len += 1;
            }
        }
        for &(c, class) in &returning {
            self.map
                .chunk_class(c)
                .store(RETURNING | class as u8, Ordering::Release);
        }
        // Take the returning chunks' blocks off their lists, one unlink at a
        // time, and stop carving from them.
        let chunk_of = |off: u64| (off - geo.heap_off) / geo.chunk_bytes;
        let mut gone = Bits::new(geo.chunks);
        for &(c, _) in &returning {
            gone.test_and_set(c);
        }
        let mut classes: Vec<usize> = returning.iter().map(|&(_, class)| class).collect();
        classes.sort_unstable();
        classes.dedup();
        for class in classes {
            self.unlink_chunks(class, |off| gone.get(chunk_of(off)));
            let carve = h.class_carve[class].load(Ordering::Acquire);
            if carve_chunk(carve).is_some_and(|c| gone.get(c)) {
                h.class_carve[class].store(CARVE_NONE, Ordering::Release);
            }
        }
        for &(c, _) in &returning {
            if !pooled.get(c) {
                self.push_free_chunk(c);
            }
            self.map
                .chunk_class(c)
                .store(CHUNK_UNASSIGNED, Ordering::Release);
        }
        report.returned_chunks = returning.len() as u64;
        let mut pool = 0;
        let mut idx = stack_index(h.chunk_free.load(Ordering::Acquire));
        while idx != 0 && idx <= geo.chunks && pool < geo.chunks {
            pool += 1;
            idx = stack_index(self.link(self.chunk_off(idx - 1)).load(Ordering::Acquire));
        }
        report.free_chunks = pool;
        report.leaked_blocks = leaked.len;
        if leaked.len > 0 {
            self.begin_mut();
            self.retire_linked(leaked.first, leaked.last);
            self.leave_mut(false);
        }
        report
    }

    /// Takes every block for which `gone` holds off `class`'s free list.
    /// Each unlink is one store; the list is whole after each.
    fn unlink_chunks(&self, class: usize, gone: impl Fn(u64) -> bool) {
        let head = &self.header().class_free[class];
        let mut guard = self.map.geo.heap_bytes / BLOCK;
        // The head first, while it is one of them.
        loop {
            let w = head.load(Ordering::Acquire);
            let idx = stack_index(w);
            let off = self.block_off(idx.max(1));
            if idx == 0 || !self.map.is_block(off) || !gone(off) || guard == 0 {
                break;
            }
            let next = stack_index(self.link(off).load(Ordering::Acquire));
            head.store(stack_next(w, next), Ordering::Release);
            guard -= 1;
        }
        let mut prev = stack_index(head.load(Ordering::Acquire));
        while prev != 0 && guard > 0 {
            let prev_off = self.block_off(prev);
            if !self.map.is_block(prev_off) {
                break;
            }
            let next = stack_index(self.link(prev_off).load(Ordering::Acquire));
            let next_off = self.block_off(next.max(1));
            if next != 0 && self.map.is_block(next_off) && gone(next_off) {
                let after = stack_index(self.link(next_off).load(Ordering::Acquire));
                self.link(prev_off).store(after, Ordering::Release);
            } else {
                prev = next;
            }
            guard -= 1;
        }
    }

    /// Every block in use: each live session's record and queued op nodes,
    /// every retire ring's chains, and the records dead combiners were
    /// building (their resolvers free or keep them later).
    fn mark_in_use(&self) -> Bits {
        let geo = &self.map.geo;
        let blocks = geo.heap_bytes / BLOCK;
        let bit = |off: u64| (off - geo.heap_off) / BLOCK;
        let mut used = Bits::new(blocks);
        let nodes = HeapNodes(&self.map);
        for i in 0..geo.index_slots {
            let s = self.map.slot(i);
            if slot_kind(s.state.load(Ordering::Acquire)) != SLOT_LIVE {
                continue;
            }
            let rec = rec_off(s.record.load(Ordering::Acquire));
            if self.map.is_block(rec) {
                used.test_and_set(bit(rec));
            }
            // The whole chain: pending nodes, and applied ones a combine has
            // not detached yet (the next one does).
            let mut n = queue::head_node(s.head.load(Ordering::Acquire));
            let mut guard = blocks.min(PARTICIPANTS_MAX as u64 * 2 + COMBINE_BATCH_MAX as u64 * 4);
            while n != EMPTY && guard > 0 {
                let off = u64::from(n) * BLOCK;
                let node = self.map.block_header::<NodeHeader>(off);
                if node.is_none_or(|h| h.start.magic != NODE_MAGIC) || used.test_and_set(bit(off)) {
                    break;
                }
                n = nodes.next(n);
                guard -= 1;
            }
        }
        for i in 0..PARTICIPANTS_MAX {
            let p = self.map.participant(i);
            let built = p.building.load(Ordering::Acquire);
            if built != 0 && self.map.is_block(built) {
                used.test_and_set(bit(built));
            }
            let tail = p.ring_tail.load(Ordering::Acquire);
            let mut r = p.ring_head.load(Ordering::Acquire);
            let mut entries = RETIRE_RING;
            while r != tail && entries > 0 {
                let mut b = p.ring[(r % RETIRE_RING) as usize]
                    .block
                    .load(Ordering::Acquire);
                while self.map.is_block(b) && !used.test_and_set(bit(b)) {
                    b = self.link(b).load(Ordering::Acquire);
                }
                r = r.wrapping_add(1);
                entries -= 1;
            }
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::test_support::Scratch;
    use crate::{NewSession, Op};

    /// Frees what our ring holds that no pin sees.
    fn reclaim(a: &Arena) {
        a.begin_mut();
        a.reclaim(true);
        a.end_mut();
    }

    #[test]
    fn a_block_lost_between_allocation_and_link_is_found_and_freed() {
        let s = Scratch::new("collect-lost");
        let a = s.open();
        let sid = a.create(NewSession::default(), &[("k", b"v")]).unwrap();
        assert_eq!(a.collect().unwrap().leaked_blocks, 0);
        // What a process killed between `alloc` and its push leaves.
        a.begin_mut();
        let lost = a.alloc(300).unwrap();
        a.end_mut();
        let r = a.collect().unwrap();
        assert_eq!(r.leaked_blocks, 1, "{r:?}");
        // Retired, so free once no pin sees it; then nothing is lost.
        reclaim(&a);
        let r = a.collect().unwrap();
        assert_eq!(r.leaked_blocks, 0, "{r:?}");
        let st = a.stats();
        assert_eq!(st.leaked_blocks_returned, 1);
        assert_eq!(st.collections, 3);
        // It is allocatable again, and the session is untouched.
        a.begin_mut();
        let again = a.alloc(300).unwrap();
        a.end_mut();
        assert_eq!(again, lost);
        assert_eq!(a.read(sid).unwrap().get("k"), Some(&b"v"[..]));
    }

    #[test]
    fn a_chunk_taken_and_never_installed_goes_back_to_the_pool() {
        let s = Scratch::new("collect-chunk");
        let a = s.open();
        a.create(NewSession::default(), &[("k", b"v")]).unwrap();
        a.begin_mut();
        let c = a.take_chunk().unwrap();
        a.end_mut();
        let r = a.collect().unwrap();
        assert_eq!((r.leaked_chunks, r.leaked_blocks), (1, 0), "{r:?}");
        a.begin_mut();
        assert_eq!(a.take_chunk(), Some(c), "the chunk is first in the pool");
        a.push_free_chunk(c);
        a.end_mut();
        assert_eq!(a.collect().unwrap().leaked_chunks, 0);
    }

    #[test]
    fn wholly_free_chunks_go_back_and_serve_another_size_class() {
        let s = Scratch::new("collect-chunks");
        let a = s.open();
        // Half the heap in 20 KiB sessions, then end them all.
        let big = vec![7u8; 20 * 1024];
        let sids: Vec<_> = (0..150)
            .map(|_| a.create(NewSession::default(), &[("big", &big)]).unwrap())
            .collect();
        for sid in &sids {
            a.invalidate(*sid).unwrap();
        }
        reclaim(&a);
        let r = a.collect().unwrap();
        assert!(r.returned_chunks > 10, "{r:?}");
        assert_eq!(r.in_use_blocks, 0, "{r:?}");
        // Small sessions now fit where the big ones were, many times over.
        let n = (0..2000)
            .take_while(|_| a.create(NewSession::default(), &[("s", &[1; 200])]).is_ok())
            .count();
        assert_eq!(n, 2000);
    }

    #[test]
    fn a_returning_chunk_left_by_a_dead_collector_is_finished() {
        let s = Scratch::new("collect-returning");
        let a = s.open();
        let sids: Vec<_> = (0..50)
            .map(|_| {
                a.create(NewSession::default(), &[("v", &[3; 2000])])
                    .unwrap()
            })
            .collect();
        for sid in &sids {
            a.invalidate(*sid).unwrap();
        }
        reclaim(&a);
        // Where a killed collector may stop: the chunk marked returning,
        // some of its blocks already off their stack.
        let h = a.header();
        let top = h.chunk_top.load(Ordering::Acquire);
        let (c, class) = (0..top)
            .find_map(|c| {
                let b = a.map.chunk_class(c).load(Ordering::Acquire);
                (b != CHUNK_UNASSIGNED && a.map.geo.classes[b as usize] > 2000)
                    .then_some((c, b as usize))
            })
            .unwrap();
        a.map
            .chunk_class(c)
            .store(RETURNING | class as u8, Ordering::Release);
        let start = a.map.geo.heap_off + c * a.map.geo.chunk_bytes;
        let first_half = |off: u64| off < start + a.map.geo.chunk_bytes / 2;
        a.unlink_chunks(class, |off| off >= start && first_half(off));
        let r = a.collect().unwrap();
        assert_eq!(r.leaked_blocks, 0, "{r:?}");
        assert!(r.returned_chunks >= 1, "{r:?}");
        assert_eq!(
            a.map.chunk_class(c).load(Ordering::Acquire),
            CHUNK_UNASSIGNED
        );
    }

    #[test]
    fn a_live_mutation_holds_a_collection_off_and_a_stuck_one_makes_it_give_up() {
        let s = Scratch::new("collect-busy");
        let a = s.open();
        let b = a.try_clone().unwrap();
        b.begin_mut();
        let started = std::time::Instant::now();
        assert!(matches!(a.collect(), Err(CollectError::Busy { .. })));
        assert!(started.elapsed() >= Duration::from_millis(COLLECT_WAIT_MS));
        b.end_mut();
        assert!(a.collect().is_ok());
        // A mutation waits while a collection holds the world, and goes on
        // once it is released.
        let c = &a.header().collector;
        c.world.store(a.owner, Ordering::SeqCst);
        let sid = std::thread::scope(|scope| {
            let t = scope.spawn(move || b.create(NewSession::default(), &[]));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!t.is_finished(), "a mutation went on during a collection");
            c.world.store(0, Ordering::SeqCst);
            t.join().unwrap().unwrap()
        });
        assert!(a.read(sid).is_ok());
    }

    #[test]
    fn a_dead_collector_is_taken_over_by_the_next_mutation() {
        let s = Scratch::new("collect-dead");
        let a = s.open();
        let sid = a.create(NewSession::default(), &[]).unwrap();
        let gone = a.try_clone().unwrap();
        let dead_owner = gone.owner;
        drop(gone);
        a.header()
            .collector
            .world
            .store(dead_owner, Ordering::SeqCst);
        let before = a.stats().collections;
        a.update(sid, &[Op::Touch]).unwrap();
        assert_eq!(a.stats().collections, before + 1);
        assert_eq!(a.header().collector.world.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn heap_full_runs_a_collection_that_makes_room() {
        let s = Scratch::new("collect-full");
        let a = s.open();
        // 6 KiB records fill the heap (an update first, so op nodes have a
        // chunk of their own); ended, their chunks stay with their class.
        let first = a.create(NewSession::default(), &[]).unwrap();
        a.update(first, &[Op::Touch]).unwrap();
        let small = vec![9u8; 6 * 1024];
        let mut sids = Vec::new();
        while let Ok(sid) = a.create(NewSession::default(), &[("small", &small)]) {
            sids.push(sid);
        }
        assert!(sids.len() > 500, "{} sessions", sids.len());
        for sid in sids {
            a.invalidate(sid).unwrap();
        }
        reclaim(&a);
        let before = a.stats().collections;
        // A larger class: no free block of it or above exists, so only the
        // chunks a collection gives back can serve it.
        let big = vec![1u8; 20 * 1024];
        let n = (0..200)
            .take_while(|_| a.create(NewSession::default(), &[("big", &big)]).is_ok())
            .count();
        assert_eq!(n, 200);
        assert!(a.stats().collections > before);
        assert!(a.stats().chunks_returned > 0);
    }
}
