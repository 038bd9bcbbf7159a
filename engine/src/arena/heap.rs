//! The record heap: size-class free stacks, carving fresh blocks from
//! chunks, the chunk pool, and `alloc` / `free`. Every step that moves a
//! block between lists is one CAS, so a kill loses at most the block in
//! hand (`collect` finds it).

use super::Arena;
use crate::error::SessionError;
use crate::layout::{BLOCK, BlockStart, CHUNK_UNASSIGNED};
use crate::sync::{AtomicU64, Ordering};
use crate::words::{carve_chunk, carve_next, carve_word, stack_index, stack_next};

impl Arena {
    pub(super) fn block_index(&self, off: u64) -> u64 {
        (off - self.map.geo.heap_off) / BLOCK + 1
    }

    pub(super) fn block_off(&self, idx: u64) -> u64 {
        self.map.geo.heap_off + (idx - 1) * BLOCK
    }

    /// The byte offset of chunk `c`.
    pub(super) fn chunk_off(&self, c: u64) -> u64 {
        self.map.geo.heap_off + c * self.map.geo.chunk_bytes
    }

    /// The blocks of `class`'s carving chunk not carved yet: never used.
    pub(super) fn uncarved(&self, class: usize) -> impl Iterator<Item = u64> + use<'_> {
        let geo = &self.map.geo;
        let size = geo.classes[class];
        let carve = self.header().class_carve[class].load(Ordering::Acquire);
        let (start, from) = match carve_chunk(carve) {
            Some(c) if c < geo.chunks => (self.chunk_off(c), carve_next(carve)),
            _ => (0, geo.chunk_bytes / size),
        };
        (from..geo.chunk_bytes / size).map(move |k| start + k * size)
    }

    /// The `link` word of block `off`, the first word of every block
    /// (callers pass blocks the allocator manages).
    pub(super) fn link(&self, off: u64) -> &AtomicU64 {
        &self
            .map
            .block_header::<BlockStart>(off)
            .expect("links are followed only between heap blocks")
            .link
    }

    /// Pops a free block of `class` (Treiber stack with an ABA tag).
    pub(super) fn pop(&self, class: usize) -> Option<u64> {
        let head = &self.header().class_free[class];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let idx = stack_index(cur);
            if idx == 0 {
                return None;
            }
            let off = self.block_off(idx);
            if !self.map.is_block(off) {
                return None;
            }
            // Racy by design: the block may be popped and reused meanwhile;
            // then the tag has moved on and the CAS fails.
            let next = stack_index(self.link(off).load(Ordering::Acquire));
            match head.compare_exchange_weak(
                cur,
                stack_next(cur, next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(off),
                Err(now) => cur = now,
            }
        }
    }

    /// Pushes the chain `first ..= last` (linked through `link`).
    pub(super) fn push_chain(&self, class: usize, first: u64, last: u64) {
        let head = &self.header().class_free[class];
        let mut cur = head.load(Ordering::Acquire);
        let first_idx = self.block_index(first);
        loop {
            self.link(last).store(stack_index(cur), Ordering::Release);
            match head.compare_exchange_weak(
                cur,
                stack_next(cur, first_idx),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn take_chunk(&self) -> Option<u64> {
        let h = self.header();
        // Chunks given back by recovery first.
        let mut cur = h.chunk_free.load(Ordering::Acquire);
        while stack_index(cur) != 0 {
            let c = stack_index(cur) - 1;
            let next = stack_index(self.link(self.chunk_off(c)).load(Ordering::Acquire));
            match h.chunk_free.compare_exchange_weak(
                cur,
                stack_next(cur, next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(c),
                Err(now) => cur = now,
            }
        }
        let mut top = h.chunk_top.load(Ordering::Acquire);
        loop {
            if top >= self.map.geo.chunks {
                return None;
            }
            match h.chunk_top.compare_exchange_weak(
                top,
                top + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(top),
                Err(now) => top = now,
            }
        }
    }

    /// Allocates a block of at least `bytes`. Inside a mutation section;
    /// when it fails, the caller (at rest again) may collect and retry.
    pub(super) fn alloc(&self, bytes: u64) -> Result<u64, SessionError> {
        debug_assert!(self.muts.get() > 0, "alloc outside a mutation section");
        let geo = &self.map.geo;
        let class = geo.class_for(bytes).ok_or(SessionError::TooLarge(bytes))?;
        if let Some(b) = self.pop(class) {
            return Ok(b);
        }
        if let Some(b) = self.alloc_from_chunk(class) {
            return Ok(b);
        }
        // No fresh chunk: free what dead handles left retired, then try
        // again. Wholly free chunks of other classes come back only through
        // a collection, which needs us at rest (`with_space`).
        self.adopt_dead_rings();
        if let Some(b) = self.pop(class) {
            return Ok(b);
        }
        // Still none: any larger free block will do.
        for bigger in class + 1..geo.classes.len() {
            if let Some(b) = self.pop(bigger) {
                return Ok(b);
            }
        }
        Err(SessionError::HeapFull(bytes))
    }

    /// Runs `f` (a whole mutation, entered and left inside), and once more
    /// after a collection if it failed for want of heap and the collection
    /// gave something back. Called at rest.
    pub(super) fn with_space<T>(
        &self,
        f: impl Fn() -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        match f() {
            Err(SessionError::HeapFull(_)) if self.muts.get() == 0 && self.collect_if_due(true) => {
                f()
            }
            r => r,
        }
    }

    /// Takes the next never-used block of `class`: one CAS on the class's
    /// carve word, from its current chunk or, when that is used up, from a
    /// fresh chunk installed in its place. A crash after the CAS loses one
    /// block (recovery finds it); a crash between taking a fresh chunk and
    /// installing it loses that chunk until recovery.
    pub(super) fn alloc_from_chunk(&self, class: usize) -> Option<u64> {
        let geo = &self.map.geo;
        let size = geo.classes[class];
        let per_chunk = geo.chunk_bytes / size;
        let carve = &self.header().class_carve[class];
        let mut cur = carve.load(Ordering::Acquire);
        loop {
            let next = carve_next(cur);
            if let Some(chunk) = carve_chunk(cur)
                && next < per_chunk
            {
                let taken = carve_word(chunk, next + 1);
                match carve.compare_exchange_weak(cur, taken, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(self.chunk_off(chunk) + next * size),
                    Err(now) => cur = now,
                }
                continue;
            }
            let c = self.take_chunk()?;
            self.map
                .chunk_class(c)
                .store(class as u8, Ordering::Release);
            match carve.compare_exchange(cur, carve_word(c, 1), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(self.chunk_off(c)),
                Err(now) => {
                    // Another process installed a chunk first: use theirs.
                    self.map
                        .chunk_class(c)
                        .store(CHUNK_UNASSIGNED, Ordering::Release);
                    self.push_free_chunk(c);
                    cur = now;
                }
            }
        }
    }

    pub(super) fn push_free_chunk(&self, c: u64) {
        let h = self.header();
        let start = self.chunk_off(c);
        let mut cur = h.chunk_free.load(Ordering::Acquire);
        loop {
            self.link(start).store(stack_index(cur), Ordering::Release);
            match h.chunk_free.compare_exchange_weak(
                cur,
                stack_next(cur, c + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn class_of(&self, off: u64) -> usize {
        let c = (off - self.map.geo.heap_off) / self.map.geo.chunk_bytes;
        self.map.chunk_class(c).load(Ordering::Acquire) as usize
    }

    pub(super) fn free(&self, off: u64) {
        debug_assert!(self.map.is_block(off));
        let class = self.class_of(off);
        debug_assert!(class < self.map.geo.classes.len());
        self.push_chain(class, off, off);
    }
}
