//! What the arena's memory holds: the mapping, what its filesystem charged,
//! what has been touched, and the heap by size class. On demand, for
//! operators and benchmarks ([`Arena::memory`]); never on a hot path.
//!
//! Cost: the chunk map is read once (a byte per chunk), the mapping is
//! asked `mincore` once, and the free lists are walked block by block up
//! to a bound the caller gives: each step is one dependent read of a
//! block's link word somewhere in the heap. Nothing scans the index.
//!
//! The walk takes no lock and races with allocations: under load the
//! figures are a snapshot of a moving heap (a block popped while the walk
//! passes may end it early, or lead it into a block in use, which stops it
//! at the first link that is not a free block of the class); at rest they
//! are exact.

use super::Arena;
use crate::layout::CHUNK_UNASSIGNED;
use crate::map::Sizing;
use crate::sync::Ordering;
use crate::words::stack_index;

/// Free blocks [`Arena::memory`] walks by default: at ~0.1–0.5 µs a step
/// (one cache miss each), at most a few hundred ms.
pub const FREE_WALK_DEFAULT: u64 = 1 << 20;

/// One size class of the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassUsage {
    /// Bytes of one block of the class.
    pub block_bytes: u64,
    /// Chunks the class owns.
    pub chunks: u64,
    /// Blocks that fit in one chunk.
    pub blocks_per_chunk: u64,
    /// Blocks ever handed out from those chunks (the rest of the chunk the
    /// class is carving from was never used).
    pub carved_blocks: u64,
    /// Of those, blocks on the class's free list (as far as the walk went:
    /// see [`MemoryStats::free_walk_complete`]).
    pub free_blocks: u64,
}

impl ClassUsage {
    /// Blocks in use: records, queued op batches, and copies waiting for
    /// their readers to move on before they are freed.
    pub fn in_use_blocks(&self) -> u64 {
        self.carved_blocks.saturating_sub(self.free_blocks)
    }

    /// Bytes of the blocks in use.
    pub fn in_use_bytes(&self) -> u64 {
        self.in_use_blocks() * self.block_bytes
    }

    /// Bytes of the class's chunks not in use: free blocks and the part of
    /// its carving chunk not handed out yet. Only this class can use them
    /// until a collection gives a wholly free chunk back to the pool.
    pub fn free_bytes(&self) -> u64 {
        (self.chunks * self.blocks_per_chunk).saturating_sub(self.in_use_blocks())
            * self.block_bytes
    }
}

/// What the arena's memory holds; see [`Arena::memory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStats {
    /// Live sessions.
    pub live: u64,
    /// Where the mapped bytes go.
    pub sizing: Sizing,
    /// Bytes the filesystem allocated to the arena file (`st_blocks`):
    /// all of it, from creation, since an arena reserves what it maps.
    /// On `/dev/shm` this is memory the host has given to the arena
    /// whether or not a page was ever touched.
    pub reserved_bytes: u64,
    /// Bytes of the mapping touched (written or read) since creation, by
    /// any process (`mincore`); `None` if the kernel would not say. The
    /// arena's working set: what it would cost if it reserved nothing.
    pub touched_bytes: Option<u64>,
    /// Bytes of one heap chunk; a chunk holds blocks of one size class.
    pub chunk_bytes: u64,
    /// Chunks handed out at least once (the pool's bump pointer): the
    /// heap's high-water mark. Chunks past it were never written.
    pub chunks_touched: u64,
    /// Chunks below the high-water mark that no class owns: in the pool,
    /// free for any class.
    pub chunks_pooled: u64,
    /// The size classes that own chunks, smallest first.
    pub classes: Vec<ClassUsage>,
    /// Whether the walk of the free lists reached the end of every list;
    /// if not, free blocks are undercounted (and blocks in use overcounted)
    /// by whatever lay past the bound.
    pub free_walk_complete: bool,
}

impl MemoryStats {
    /// Heap bytes in blocks in use, over all classes.
    pub fn heap_in_use_bytes(&self) -> u64 {
        self.classes.iter().map(ClassUsage::in_use_bytes).sum()
    }

    /// Heap bytes owned by a class but not in use, over all classes.
    pub fn heap_class_free_bytes(&self) -> u64 {
        self.classes.iter().map(ClassUsage::free_bytes).sum()
    }

    /// Heap bytes no class owns: pooled chunks and chunks never touched.
    pub fn heap_unassigned_bytes(&self) -> u64 {
        let owned: u64 = self.classes.iter().map(|c| c.chunks).sum();
        (self.sizing.heap_bytes / self.chunk_bytes).saturating_sub(owned) * self.chunk_bytes
    }

    /// `bytes` per live session, rounded; `None` with no live session.
    pub fn per_session(&self, bytes: u64) -> Option<u64> {
        (self.live > 0).then(|| bytes.div_ceil(self.live))
    }
}

impl Arena {
    /// What the arena's memory holds (see [`MemoryStats`]), walking at most
    /// `free_walk_max` free blocks ([`FREE_WALK_DEFAULT`] is a fair bound
    /// for a tool; `u64::MAX` walks every list, for a benchmark at rest).
    /// Reads only: it never waits for, or holds up, a mutation.
    pub fn memory(&self, free_walk_max: u64) -> MemoryStats {
        let geo = &self.map.geo;
        let h = self.header();
        let classes_n = geo.classes.len();
        let mut chunks_of = vec![0u64; classes_n];
        let top = h.chunk_top.load(Ordering::Acquire).min(geo.chunks);
        let mut pooled = 0;
        for c in 0..geo.chunks {
            match self.map.chunk_class(c).load(Ordering::Relaxed) {
                CHUNK_UNASSIGNED => pooled += u64::from(c < top),
                k if (k as usize) < classes_n => chunks_of[k as usize] += 1,
                _ => {}
            }
        }
        let mut budget = free_walk_max;
        let mut complete = true;
        let mut classes = Vec::new();
        for (k, &chunks) in chunks_of.iter().enumerate() {
            if chunks == 0 {
                continue;
            }
            let size = geo.classes[k];
            let per_chunk = geo.chunk_bytes / size;
            let uncarved = self.uncarved(k).count() as u64;
            let carved = (chunks * per_chunk).saturating_sub(uncarved);
            let (free, done) = self.walk_free(k, &mut budget);
            complete &= done;
            classes.push(ClassUsage {
                block_bytes: size,
                chunks,
                blocks_per_chunk: per_chunk,
                carved_blocks: carved,
                free_blocks: free.min(carved),
            });
        }
        MemoryStats {
            live: h.live.load(Ordering::Relaxed),
            sizing: Sizing::of(geo),
            reserved_bytes: self.map.allocated_bytes(),
            touched_bytes: self.map.touched_bytes(),
            chunk_bytes: geo.chunk_bytes,
            chunks_touched: top,
            chunks_pooled: pooled,
            classes,
            free_walk_complete: complete,
        }
    }

    /// Counts class `k`'s free list, spending at most `budget` steps;
    /// whether it reached the list's end.
    fn walk_free(&self, k: usize, budget: &mut u64) -> (u64, bool) {
        let mut idx = stack_index(self.header().class_free[k].load(Ordering::Acquire));
        let mut n = 0;
        while idx != 0 {
            if *budget == 0 {
                return (n, false);
            }
            *budget -= 1;
            let off = self.block_off(idx);
            // A racing pop may have handed this block out: stop at the
            // first link that is not a free block of this class.
            if !self.map.is_block(off) || self.class_of(off) != k {
                break;
            }
            n += 1;
            idx = stack_index(self.link(off).load(Ordering::Acquire));
        }
        (n, true)
    }
}
