//! Recovery: what a handle that opens the arena alone does. No process can
//! be inside a shared transition, so everything the dead left is checked
//! and repaired in place, and the allocator is rebuilt from reachability.

use super::{Arena, Bits, COMBINE_BATCH_MAX, HeapNodes, RecoveryReport, rec_off};
use crate::layout::{
    BLOCK, CHUNK_UNASSIGNED, NODE_MAGIC, NodeHeader, PARTICIPANTS_MAX, RETIRE_RING, RecordHeader,
};
use crate::queue::{self, EMPTY, Nodes};
use crate::sid::Sid;
use crate::sync::Ordering;
use crate::words::{CARVE_NONE, SLOT_LIVE, SLOT_TOMB, slot_kind, slot_next, stack_index};

impl Arena {
    /// Applies the queues of every session (after recovery).
    pub(super) fn apply_all_pending(&mut self) {
        let mut applied = 0;
        for i in 0..self.map.geo.index_slots {
            let s = self.map.slot(i);
            if slot_kind(s.state.load(Ordering::Acquire)) != SLOT_LIVE {
                continue;
            }
            let h = s.head.load(Ordering::Acquire);
            if queue::head_node(h) != EMPTY || queue::is_closed(h) {
                self.help(i);
                applied += 1;
            }
        }
        if let Some(r) = self.recovered.as_mut() {
            r.pending_applied = applied;
        }
    }

    /// Runs when this handle opened the arena with no other handle open: no
    /// process can be inside any shared transition, so everything dead
    /// processes left behind can be checked and repaired in place. Leaked
    /// blocks are found by reachability, corrupt records are dropped, and
    /// the allocator is rebuilt from what is reachable.
    pub(super) fn recover(&mut self) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let geo = self.map.geo.clone();
        let h = self.header();
        let blocks = geo.heap_bytes / BLOCK;
        // Blocks accounted for without being reachable: free or retired.
        // What is neither, nor reachable, was leaked by a crash.
        let bit = |off: u64| (off - geo.heap_off) / BLOCK;
        let mut accounted = Bits::new(blocks);
        let note = |bits: &mut Bits, off: u64| {
            if self.map.is_block(off) {
                bits.test_and_set(bit(off));
            }
        };
        for class in 0..geo.classes.len() {
            // Blocks of the carving chunk not carved yet were never used.
            for off in self.uncarved(class) {
                note(&mut accounted, off);
            }
            let mut idx = stack_index(h.class_free[class].load(Ordering::Relaxed));
            let mut guard = blocks;
            while idx != 0 && guard > 0 {
                let off = self.block_off(idx);
                if !self.map.is_block(off) {
                    break;
                }
                note(&mut accounted, off);
                idx = stack_index(self.link(off).load(Ordering::Relaxed));
                guard -= 1;
            }
        }
        for i in 0..PARTICIPANTS_MAX {
            let p = self.map.participant(i);
            let (mut r, t) = (
                p.ring_head.load(Ordering::Relaxed),
                p.ring_tail.load(Ordering::Relaxed),
            );
            let mut guard = RETIRE_RING;
            let mut chained = blocks;
            while r != t && guard > 0 {
                let mut b = p.ring[(r % RETIRE_RING) as usize]
                    .block
                    .load(Ordering::Relaxed);
                while self.map.is_block(b) && chained > 0 {
                    note(&mut accounted, b);
                    b = self.link(b).load(Ordering::Relaxed);
                    chained -= 1;
                }
                r = r.wrapping_add(1);
                guard -= 1;
            }
        }
        for i in 0..PARTICIPANTS_MAX {
            let p = self.map.participant(i);
            if i != self.me {
                p.pin.store(0, Ordering::Relaxed);
            }
            // Retired and half-built blocks are unreachable: the rebuild
            // below frees them.
            p.building.store(0, Ordering::Relaxed);
            let t = p.ring_tail.load(Ordering::Relaxed);
            p.ring_head.store(t, Ordering::Relaxed);
        }
        h.insert_lock.store(0, Ordering::Relaxed);
        h.compact_lock.store(0, Ordering::Relaxed);
        // A collection cut short by a death: the rebuild below does it all.
        h.collector.world.store(0, Ordering::Relaxed);
        h.collector.suspects.store(0, Ordering::Relaxed);
        let mut reachable = Bits::new(blocks);
        let nodes = HeapNodes(&self.map);
        let mut live = 0u64;
        let mut chain = Vec::new();
        for i in 0..geo.index_slots {
            let s = self.map.slot(i);
            s.lock.store(0, Ordering::Relaxed);
            let st = s.state.load(Ordering::Relaxed);
            if slot_kind(st) != SLOT_LIVE {
                continue;
            }
            let sid = Sid::from_words(
                s.sid_lo.load(Ordering::Relaxed),
                s.sid_hi.load(Ordering::Relaxed),
            );
            let rec = rec_off(s.record.load(Ordering::Relaxed));
            if !self.record_valid(rec, sid) {
                report.corrupt_records += 1;
                s.state.store(slot_next(st, SLOT_TOMB), Ordering::Relaxed);
                continue;
            }
            let applied = self
                .map
                .block_header::<RecordHeader>(rec)
                .expect("validated just above")
                .applied_seq;
            let mut w = s.head.load(Ordering::Relaxed);
            if queue::seq_after(applied, queue::head_seq(w)) {
                // The record includes ops the queue never numbered: no crash
                // does this (seqs only grow), the head word is damaged. Left
                // so, every later push would get a seq the record already
                // covers and its update would wait forever. Cut the queue
                // back to the record.
                report.broken_queues += 1;
                w = queue::head(applied, EMPTY) | (w & u64::from(queue::CLOSED));
                s.head.store(w, Ordering::Relaxed);
            }
            // Keep the whole chain reachable: applied nodes still linked are
            // retired by the next combine, pending ones get applied.
            let mut n = queue::head_node(w);
            let mut expect = queue::head_seq(w);
            chain.clear();
            let mut broken = false;
            while n != EMPTY {
                let off = u64::from(n) * BLOCK;
                let ok = self
                    .map
                    .block_header::<NodeHeader>(off)
                    .is_some_and(|h| h.start.magic == NODE_MAGIC)
                    && nodes.seq(n) == expect
                    && chain.len() < COMBINE_BATCH_MAX * 4;
                if !ok {
                    broken = true;
                    break;
                }
                chain.push(n);
                n = nodes.next(n);
                expect = expect.wrapping_sub(1);
            }
            if broken && queue::seq_after(expect.wrapping_add(1), applied.wrapping_add(1)) {
                // The chain is damaged above what was applied: the ops in it
                // cannot be trusted. Cut the queue back to the record.
                report.broken_queues += 1;
                chain.clear();
                s.head.store(queue::head(applied, EMPTY), Ordering::Relaxed);
            } else if broken {
                // Damage only below the applied point: cut it off there.
                if let Some(&last) = chain.last() {
                    nodes.cut(last);
                }
            }
            for &n in &chain {
                reachable.test_and_set(bit(u64::from(n) * BLOCK));
            }
            reachable.test_and_set(bit(rec));
            live += 1;
            if queue::is_closed(s.head.load(Ordering::Relaxed)) {
                report.finished_removals += 1;
            }
        }
        // Rebuild the allocator from reachability.
        for c in 0..geo.classes.len() {
            h.class_free[c].store(0, Ordering::Relaxed);
            h.class_carve[c].store(CARVE_NONE, Ordering::Relaxed);
        }
        h.chunk_free.store(0, Ordering::Relaxed);
        let top = h.chunk_top.load(Ordering::Relaxed).min(geo.chunks);
        for c in (0..top).rev() {
            let class = self.map.chunk_class(c).load(Ordering::Relaxed) as usize;
            let start = self.chunk_off(c);
            let any_reachable = (start..start + geo.chunk_bytes)
                .step_by(BLOCK as usize)
                .any(|off| reachable.get(bit(off)));
            if class < geo.classes.len() {
                let size = geo.classes[class];
                report.leaked_blocks += (0..geo.chunk_bytes / size)
                    .map(|k| start + k * size)
                    .filter(|&off| !reachable.get(bit(off)) && !accounted.get(bit(off)))
                    .count() as u64;
            }
            if class >= geo.classes.len() || !any_reachable {
                if class < geo.classes.len() {
                    report.reclaimed_blocks += geo.chunk_bytes / geo.classes[class];
                }
                self.map
                    .chunk_class(c)
                    .store(CHUNK_UNASSIGNED, Ordering::Relaxed);
                self.push_free_chunk(c);
                continue;
            }
            let size = geo.classes[class];
            for k in 0..geo.chunk_bytes / size {
                let off = start + k * size;
                if !reachable.get(bit(off)) {
                    self.push_chain(class, off, off);
                }
            }
        }
        h.live.store(live, Ordering::Relaxed);
        h.recoveries.fetch_add(1, Ordering::Relaxed);
        report.sessions = live;
        report
    }
}
