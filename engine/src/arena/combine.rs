//! Updates: pushing an op node and waiting for its outcome, combining a
//! session's queue into a new record, finishing a removal, and finishing
//! what a combiner that died left (its half-built record).

use super::{Arena, COMBINE_BATCH_MAX, SPINS_BEFORE_LIVENESS, rec_len, rec_off};
use crate::error::SessionError;
use crate::layout::{BLOCK, IndexSlot, NODE_MAGIC, NodeHeader, PARTICIPANTS_MAX, RecordHeader};
use crate::lock;
use crate::map::Map;
use crate::queue::{self, Combine, Combined, EMPTY, Nodes, Step};
use crate::session::{Applied, ArchivedOp, Op, OpError, SessionDraft, encode_ops_in};
use crate::sid::Sid;
use crate::sync::{AtomicU64, Backoff, Ordering};
use crate::words::{
    ResultCode, SLOT_LIVE, SLOT_TOMB, evict_below_at, expire_only_at, slot_kind, slot_next,
};

/// Op nodes in the arena's heap, addressed by block index (offset / 64).
pub(super) struct HeapNodes<'a>(pub(super) &'a Map);

impl<'a> HeapNodes<'a> {
    /// Op node `n`. Callers pass indices for which `plausible` holds or
    /// nodes they allocated themselves.
    pub(super) fn node(&self, n: u32) -> &'a NodeHeader {
        self.0
            .block_header::<NodeHeader>(u64::from(n) * BLOCK)
            .expect("op node indices are checked before they are followed")
    }
}

impl Nodes for HeapNodes<'_> {
    fn seq(&self, n: u32) -> u32 {
        self.node(n).seq.load(Ordering::Relaxed)
    }
    fn next(&self, n: u32) -> u32 {
        self.node(n).next.load(Ordering::Relaxed) as u32
    }
    fn prepare(&self, n: u32, seq: u32, next: u32) {
        let node = self.node(n);
        node.seq.store(seq, Ordering::Relaxed);
        node.next.store(u64::from(next), Ordering::Relaxed);
    }
    fn cut(&self, n: u32) {
        self.node(n).next.store(0, Ordering::Release);
    }
    fn plausible(&self, n: u32) -> bool {
        self.0.is_block(u64::from(n) * BLOCK)
    }
}

impl Arena {
    /// Applies `ops` to a session, atomically (all or none) and exactly once,
    /// in the order of this handle's calls. Returns the version the batch
    /// produced. Returns only once the batch is applied.
    pub fn update(&self, sid: Sid, ops: &[Op]) -> Result<u64, SessionError> {
        // One encoding buffer per handle, reused (taken out of its cell, so
        // nothing the push calls can find it borrowed).
        let encoded = encode_ops_in(ops, self.ops_buf.take());
        let r = self.push_and_wait(sid, &encoded, 0);
        self.ops_buf.replace(encoded);
        r
    }

    /// Ends a session.
    pub fn invalidate(&self, sid: Sid) -> Result<(), SessionError> {
        self.update(sid, &[Op::Invalidate]).map(|_| ())
    }

    pub(super) fn push_and_wait(
        &self,
        sid: Sid,
        encoded: &[u8],
        flags: u64,
    ) -> Result<u64, SessionError> {
        if encoded.len() as u64 > self.map.geo.quota_bytes + 4096 {
            return Err(OpError::OverQuota {
                needed: encoded.len() as u64,
                quota: self.map.geo.quota_bytes,
            }
            .into());
        }
        // A batch cancelled for want of heap was never applied: after a
        // collection that made room it is simply pushed again.
        self.with_space(|| {
            self.begin_mut();
            let r = self.push_and_wait_pinned(sid, encoded, flags);
            self.end_mut();
            r
        })
    }

    pub(super) fn push_and_wait_pinned(
        &self,
        sid: Sid,
        encoded: &[u8],
        flags: u64,
    ) -> Result<u64, SessionError> {
        let (i, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        // The combine that follows, ours most likely, reads the whole
        // record: its misses overlap with the push.
        let word = s.record.load(Ordering::Acquire);
        self.prefetch_all(rec_off(word), BLOCK + rec_len(word));
        let node_off = self.alloc(BLOCK + encoded.len() as u64)?;
        let (lo, hi) = sid.words();
        // SAFETY: freshly allocated, not yet pushed: ours alone (stale
        // free-list poppers touch only `link`); `p` points at the block's
        // header, in bounds.
        unsafe {
            let p = self
                .map
                .fill_block::<NodeHeader>(node_off, NODE_MAGIC, encoded);
            (*p).sid = [lo, hi];
            (*p).checksum = xxhash_rust::xxh3::xxh3_64(encoded);
        }
        let node = HeapNodes(&self.map).node((node_off / BLOCK) as u32);
        node.result
            .store(ResultCode::Pending.encode(), Ordering::Relaxed);
        node.detail.store(flags, Ordering::Relaxed);
        let nodes = HeapNodes(&self.map);
        let n = (node_off / BLOCK) as u32;
        // Dirty before the push: if we die after it, the replicator's scan
        // finds the queued batch and has it applied.
        self.mark_dirty(i);
        let Ok(seq) = queue::push(&s.head, &nodes, n) else {
            self.free(node_off);
            return Err(SessionError::NotFound);
        };
        let backoff = Backoff::new();
        let mut spins = 0u32;
        loop {
            if let Some(r) = self.outcome(s, node, seq) {
                return r;
            }
            match lock::try_lock(&s.lock, self.owner) {
                Ok(()) => {
                    let r = self.combine(i);
                    lock::unlock(&s.lock, self.owner);
                    r?;
                }
                Err(0) => {}
                Err(holder) => {
                    spins += 1;
                    if spins.is_multiple_of(SPINS_BEFORE_LIVENESS)
                        && !self.owner_alive(holder)
                        && lock::steal(&s.lock, holder, self.owner)
                    {
                        self.resolve_dead_build(holder, i);
                        let r = self.combine(i);
                        lock::unlock(&s.lock, self.owner);
                        r?;
                        continue;
                    }
                    backoff.snooze();
                }
            }
        }
    }

    /// The outcome of our node, once known.
    pub(super) fn outcome(
        &self,
        s: &IndexSlot,
        node: &NodeHeader,
        seq: u32,
    ) -> Option<Result<u64, SessionError>> {
        let code = ResultCode::decode(node.result.load(Ordering::Acquire));
        if code == Some(ResultCode::CancelledHeapFull) {
            return Some(Err(SessionError::HeapFull(self.map.geo.chunk_bytes)));
        }
        let answered = code != Some(ResultCode::Pending);
        let h = s.head.load(Ordering::Acquire);
        let done = if queue::is_closed(h) && !queue::seq_after(seq, queue::head_seq(h)) {
            answered
        } else {
            let off = rec_off(s.record.load(Ordering::Acquire));
            // We are pinned: the record stays readable while we look.
            let applied = self
                .map
                .block_header::<RecordHeader>(off)
                .is_some_and(|rh| !queue::seq_after(seq, rh.applied_seq));
            applied && answered
        };
        if !done {
            return None;
        }
        Some(answer(
            code,
            node.detail.load(Ordering::Relaxed),
            self.map.geo.quota_bytes,
        ))
    }

    /// Applies every queued batch of slot `i` (`queue::combine`). The
    /// caller holds its lock.
    pub(super) fn combine(&self, i: u64) -> Result<(), SessionError> {
        let s = self.map.slot(i);
        // The slot's state word before the combine reads its queue head, and
        // `live` compares it after: a slot ended and reused in between (an
        // insert takes a tombstone whose lock was free a moment before we
        // took it) changes the word, so a head of one incarnation is never
        // taken for the other's.
        let slot = SlotCombine {
            arena: self,
            i,
            s,
            state0: s.state.load(Ordering::Acquire),
            nodes: HeapNodes(&self.map),
        };
        // The scratch list leaves its cell for the combine, so nothing the
        // combine calls can find it borrowed.
        let mut list = self.scratch.take();
        let r = queue::combine(&slot, &mut list, COMBINE_BATCH_MAX);
        self.scratch.replace(list);
        if let Combined::Closed(closed) = r? {
            self.finish_remove(i, closed, slot.state0);
        }
        Ok(())
    }

    /// Links the record `first` and the detached queue chain from node `n`
    /// (through `next`) into one retire chain (through `link`); returns its
    /// last block.
    pub(super) fn link_queue_chain(&self, first: u64, mut n: u32) -> u64 {
        let nodes = HeapNodes(&self.map);
        let mut last = first;
        let mut guard = 0usize;
        while n != EMPTY && nodes.plausible(n) && guard < COMBINE_BATCH_MAX * 4 {
            let off = u64::from(n) * BLOCK;
            self.link(last).store(off, Ordering::Relaxed);
            last = off;
            n = nodes.next(n);
            guard += 1;
        }
        self.link(last).store(0, Ordering::Relaxed);
        last
    }

    /// Finishes removing slot `i`, whose queue is closed at `closed`. The
    /// caller holds the slot's lock; a successor redoes this if we die.
    pub(super) fn finish_remove(&self, i: u64, closed: u64, state0: u64) {
        let s = self.map.slot(i);
        let nodes = HeapNodes(&self.map);
        let rec_off = rec_off(s.record.load(Ordering::Acquire));
        let applied = self.record_at(rec_off).map_or(0, |(rh, _)| rh.applied_seq);
        // Every batch pushed before the close and not yet answered finds
        // the session gone.
        let mut n = queue::head_node(closed);
        let mut expect = queue::head_seq(closed);
        let mut walked = 0usize;
        while n != EMPTY
            && nodes.plausible(n)
            && queue::seq_after(expect, applied)
            && walked < COMBINE_BATCH_MAX * 4
        {
            let node = nodes.node(n);
            if node.result.load(Ordering::Acquire) == ResultCode::Pending.encode() {
                node.result
                    .store(ResultCode::Gone.encode(), Ordering::Release);
            }
            n = nodes.next(n);
            expect = expect.wrapping_sub(1);
            walked += 1;
        }
        {
            let _g = self.insert_lock();
            let st = s.state.load(Ordering::Acquire);
            if st != state0 || slot_kind(st) != SLOT_LIVE {
                return;
            }
            // The commit point of a removal: one store makes it a tombstone.
            s.state.store(slot_next(st, SLOT_TOMB), Ordering::Release);
            self.header().live.fetch_sub(1, Ordering::AcqRel);
            self.mark_dirty(i);
            self.prune_tombstones(i);
            // The heap may have a free chunk now: a failed allocation may
            // collect again at once.
            let quiet = &self.header().collector.quiet_until_ms;
            if quiet.load(Ordering::Relaxed) != 0 {
                quiet.store(0, Ordering::Relaxed);
            }
            // The record and the whole closed chain go into the ring with
            // one store, while no one can yet have reused the slot.
            if self.map.is_block(rec_off) {
                let chain_last = self.link_queue_chain(rec_off, queue::head_node(closed));
                self.retire_linked(rec_off, chain_last);
            }
        }
    }

    /// Called with slot `i`'s lock just taken from the dead owner `dead`:
    /// finishes what its combine left. A record block it built but never
    /// published is freed; if it published it, the record it replaced is
    /// retired (the dead handle had not yet). The swap makes sure only one
    /// resolver acts, and only lock holders of slot `i` resolve.
    pub(super) fn resolve_dead_build(&self, dead: u32, i: u64) {
        let d = u32::from(lock::owner_slot(dead));
        if d >= PARTICIPANTS_MAX {
            return;
        }
        let p = self.map.participant(d);
        if p.building_slot.load(Ordering::Acquire) != i || p.building.load(Ordering::Acquire) == 0 {
            return;
        }
        let built = p.building.swap(0, Ordering::AcqRel);
        if built == 0 || !self.map.is_block(built) {
            return;
        }
        let replaced = p.building_old.load(Ordering::Acquire);
        if rec_off(self.map.slot(i).record.load(Ordering::Acquire)) == built {
            if self.map.is_block(replaced) {
                self.retire(replaced);
            }
        } else {
            self.free(built);
        }
    }

    /// Applies slot `i`'s queue if no live process is doing it.
    pub(super) fn help(&self, i: u64) {
        self.begin_mut();
        self.help_mut(i);
        self.end_mut();
    }

    pub(super) fn help_mut(&self, i: u64) {
        let s = self.map.slot(i);
        let holder = s.lock.load(Ordering::Acquire);
        let got = match lock::try_lock(&s.lock, self.owner) {
            Ok(()) => true,
            Err(h) => {
                let stolen = h == holder
                    && h != 0
                    && !self.owner_alive(h)
                    && lock::steal(&s.lock, h, self.owner);
                if stolen {
                    self.resolve_dead_build(h, i);
                }
                stolen
            }
        };
        if got {
            let _ = self.combine(i);
            lock::unlock(&s.lock, self.owner);
        }
    }
}

/// One combine of slot `i` by the holder of its lock, as `queue::combine`
/// sees it: records in the heap, answers in the op nodes.
struct SlotCombine<'a> {
    arena: &'a Arena,
    i: u64,
    s: &'a IndexSlot,
    /// The slot's state word when the combine began.
    state0: u64,
    nodes: HeapNodes<'a>,
}

/// The new copy of a record a combine builds: it borrows from the record
/// it replaces and from the op nodes, which stay in place until the combine
/// has published.
struct Draft<'a> {
    sid: Sid,
    data: SessionDraft<'a>,
    version: u64,
    epoch: u64,
    /// The published record it replaces.
    replaced: u64,
    now_ms: u64,
    /// The delta log entry of `version` (`arena::deltas`), 0 = none.
    log_at: u32,
}

impl<'a> Combine for SlotCombine<'a> {
    type Nodes = HeapNodes<'a>;
    type Draft = Draft<'a>;
    /// The replaced record.
    type Published = u64;
    type Error = SessionError;

    fn nodes(&self) -> &HeapNodes<'a> {
        &self.nodes
    }

    fn head(&self) -> &AtomicU64 {
        &self.s.head
    }

    fn live(&self) -> bool {
        let st = self.s.state.load(Ordering::Acquire);
        st == self.state0 && slot_kind(st) == SLOT_LIVE
    }

    fn applied(&self) -> Result<u32, SessionError> {
        let (rh, _) = self
            .arena
            .record_at(rec_off(self.s.record.load(Ordering::Acquire)))?;
        Ok(rh.applied_seq)
    }

    fn draft(&self) -> Result<Draft<'a>, SessionError> {
        let replaced = rec_off(self.s.record.load(Ordering::Acquire));
        let arena: &'a Arena = self.arena;
        let (rh, bytes) = arena.record_at(replaced)?;
        let data = SessionDraft::new(Arena::archived(bytes));
        Ok(Draft {
            sid: Sid::from_words(
                self.s.sid_lo.load(Ordering::Relaxed),
                self.s.sid_hi.load(Ordering::Relaxed),
            ),
            data,
            version: rh.version,
            epoch: rh.epoch,
            replaced,
            now_ms: crate::clock::now_ms(),
            log_at: rh.log_at,
        })
    }

    fn apply(&self, draft: &mut Draft<'a>, n: u32) -> Step {
        let node = self.nodes.node(n);
        if node.result.load(Ordering::Acquire) == ResultCode::CancelledHeapFull.encode() {
            return Step::Next;
        }
        let (lo, hi) = draft.sid.words();
        if node.sid != [lo, hi] || node.start.magic != NODE_MAGIC {
            node.result
                .store(ResultCode::Gone.encode(), Ordering::Relaxed);
            return Step::Next;
        }
        let off = u64::from(n) * BLOCK;
        let Some(op_bytes) = self
            .arena
            .map
            .heap_bytes(off + BLOCK, u64::from(node.start.len))
        else {
            node.result
                .store(ResultCode::Gone.encode(), Ordering::Relaxed);
            return Step::Next;
        };
        let flags = node.detail.load(Ordering::Relaxed);
        let outcome = if let Some(sweep_now) = expire_only_at(flags) {
            // The sweep's clock decides, so a sweep is reproducible; a
            // session found alive is left exactly as it is.
            if !draft
                .data
                .expired(sweep_now, self.arena.last_read_ms(self.s))
            {
                node.detail.store(draft.version, Ordering::Relaxed);
                node.result
                    .store(ResultCode::Done.encode(), Ordering::Release);
                return Step::Next;
            }
            Ok(Applied::Invalidated)
        } else if let Some(epoch) = evict_below_at(flags) {
            // Another host owns the session under `epoch`: our copy goes,
            // unless we hold that epoch or a newer one already.
            if draft.epoch >= epoch {
                node.detail.store(draft.version, Ordering::Relaxed);
                node.result
                    .store(ResultCode::Done.encode(), Ordering::Release);
                return Step::Next;
            }
            Ok(Applied::Invalidated)
        } else {
            if xxhash_rust::xxh3::xxh3_64(op_bytes) != node.checksum {
                node.result
                    .store(ResultCode::Gone.encode(), Ordering::Relaxed);
                return Step::Next;
            }
            // SAFETY: the batch was encoded by `update` in a process of
            // this engine, written before its push, checksummed (checked
            // just above), and lies 64-byte aligned in the heap.
            let batch =
                unsafe { rkyv::access_unchecked::<rkyv::vec::ArchivedVec<ArchivedOp>>(op_bytes) };
            let quota = self.arena.map.geo.quota_bytes;
            draft
                .data
                .apply_refs(batch.iter().map(ArchivedOp::as_ref), draft.now_ms, quota)
        };
        match outcome {
            Ok(Applied::Changed) => {
                draft.version += 1;
                // Logged now, published with the record: if the record
                // never is, nothing names this entry.
                draft.log_at = self.arena.log_batch(
                    draft.sid,
                    draft.version,
                    draft.log_at,
                    op_bytes,
                    node.checksum,
                );
                node.detail.store(draft.version, Ordering::Relaxed);
                node.result
                    .store(ResultCode::Done.encode(), Ordering::Release);
                Step::Next
            }
            Ok(Applied::Invalidated) => {
                node.detail.store(draft.version, Ordering::Relaxed);
                node.result
                    .store(ResultCode::Done.encode(), Ordering::Release);
                if expire_only_at(flags).is_some() {
                    self.arena
                        .header()
                        .expired_total
                        .fetch_add(1, Ordering::Relaxed);
                } else if evict_below_at(flags).is_some() {
                    self.arena
                        .header()
                        .evicted_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Step::Removed
            }
            Err(e) => {
                if let OpError::OverQuota { needed, .. } = e {
                    node.detail.store(needed, Ordering::Relaxed);
                }
                node.result
                    .store(e.result_code().encode(), Ordering::Release);
                Step::Next
            }
        }
    }

    fn gone(&self, n: u32) {
        let node = self.nodes.node(n);
        // A cancelled node keeps its final answer.
        if node.result.load(Ordering::Acquire) != ResultCode::CancelledHeapFull.encode() {
            node.result
                .store(ResultCode::Gone.encode(), Ordering::Relaxed);
        }
    }

    fn publish(
        &self,
        draft: Draft<'a>,
        last: u32,
        applied: &[u32],
    ) -> Result<Option<u64>, SessionError> {
        let a = self.arena;
        let track = Some((self.i, draft.replaced));
        let new_off = match a.write_record_tracked(
            draft.sid,
            &draft.data,
            draft.version,
            draft.epoch,
            track,
            draft.log_at,
        ) {
            Ok(off) => off,
            Err(SessionError::HeapFull(_) | SessionError::TooLarge(_)) => {
                // No room for the new copy: cancel the batch (a final
                // result every later combiner respects) and leave the
                // record as is.
                for &n in applied {
                    self.nodes
                        .node(n)
                        .result
                        .store(ResultCode::CancelledHeapFull.encode(), Ordering::Release);
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        a.set_applied(new_off, last);
        a.mark_dirty(self.i);
        // The commit point: one store publishes the new copy and, with its
        // applied_seq, consumes every node up to `last`.
        self.s.record.store(a.rec_word(new_off), Ordering::Release);
        a.mark_dirty(self.i);
        Ok(Some(draft.replaced))
    }

    fn retire(&self, replaced: u64, detached: u32) {
        // The replaced record and the applied nodes leave together: the
        // nodes are chained behind the record, and the chain goes into the
        // ring with one store, right after the store that makes the
        // replaced record no longer the business of whoever would resolve a
        // death of ours.
        let a = self.arena;
        let chain_last = a.link_queue_chain(replaced, detached);
        a.participant().building.store(0, Ordering::Release);
        a.retire_linked(replaced, chain_last);
    }
}

/// What an updater's call returns, from its node's answered result code and
/// `detail` word. A code no combiner writes is damaged memory, never a
/// refusal the caller could act on.
fn answer(code: Option<ResultCode>, detail: u64, quota: u64) -> Result<u64, SessionError> {
    match code {
        Some(ResultCode::Done) => Ok(detail),
        Some(ResultCode::Gone) => Err(SessionError::NotFound),
        refused => Err(refused
            .and_then(|c| OpError::from_result(c, detail, quota))
            .map_or(
                SessionError::Corrupt("unknown op result code"),
                SessionError::Op,
            )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_survives_the_result_word() {
        let quota = 4096;
        for e in [
            OpError::BadKey,
            OpError::TooManyAttrs,
            OpError::NotACounter,
            OpError::NotAList,
            OpError::OverQuota {
                needed: 5000,
                quota,
            },
        ] {
            let word = e.result_code().encode();
            assert_eq!(
                answer(ResultCode::decode(word), 5000, quota),
                Err(SessionError::Op(e))
            );
        }
        assert_eq!(answer(Some(ResultCode::Done), 9, quota), Ok(9));
        assert_eq!(
            answer(Some(ResultCode::Gone), 9, quota),
            Err(SessionError::NotFound)
        );
    }

    #[test]
    fn an_unknown_result_code_is_corruption_not_a_refusal() {
        let corrupt = Err(SessionError::Corrupt("unknown op result code"));
        assert_eq!(answer(ResultCode::decode(8), 0, 4096), corrupt);
        assert_eq!(answer(ResultCode::decode(0x5eed), 0, 4096), corrupt);
    }

    /// A combiner that read the slot of an ended session, then finds it
    /// reused by a new one (an insert took the tombstone while its lock was
    /// free), must not end the new session with the old one's closed head.
    #[test]
    fn a_slot_reused_under_a_combiner_is_left_alone() {
        use crate::map::{ArenaConfig, HugePages, Location};
        let loc = Location::Shm(format!("unit-reuse-{}", std::process::id()));
        let _ = Arena::remove(&loc);
        let cfg = ArenaConfig {
            capacity: 16,
            heap_bytes: 1 << 20,
            quota_bytes: 4096,
            huge_pages: HugePages::Off,
        };
        let a = Arena::open(&loc, &cfg).unwrap();
        let old = a.create(crate::NewSession::default(), &[]).unwrap();
        let (i, s) = a.lookup(old).unwrap();
        let state0 = s.state.load(Ordering::Acquire);
        a.invalidate(old).unwrap();
        let closed = s.head.load(Ordering::Acquire);
        assert!(queue::is_closed(closed));
        // A new session whose probe starts at the same slot takes it.
        let new = std::iter::repeat_with(Sid::random)
            .find(|sid| a.home(*sid) == i)
            .unwrap();
        a.begin_mut();
        let rec = a
            .write_record(new, &crate::session::SessionData::default(), 1, 1)
            .unwrap();
        assert_eq!(a.insert(new, rec, true).unwrap(), Ok(i));
        // The stale combiner: its state word no longer matches, so it
        // neither sees a live session nor removes one.
        let stale = SlotCombine {
            arena: &a,
            i,
            s,
            state0,
            nodes: HeapNodes(&a.map),
        };
        assert!(!stale.live());
        a.finish_remove(i, closed, state0);
        a.end_mut();
        assert!(a.read(new).is_ok(), "the new session was removed");
        drop(a);
        let _ = Arena::remove(&loc);
    }
}
