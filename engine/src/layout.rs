//! The arena's byte layout: every structure that lives in shared memory, with
//! its size pinned at compile time. The full picture, with the reasons, is in
//! `docs/ARCHITECTURE.md`.
//!
//! ```text
//! | header (4 KiB) | participants | index slots | dirty bitmap + summaries | chunk map | delta log | heap |
//! ```
//!
//! Only fixed-width integers and atomics live here: no `usize`, no pointers.
//! Offsets are in bytes from the start of the arena unless a name says
//! otherwise; a "block index" is a heap offset divided by [`BLOCK`].

use crate::sync::{AtomicU32, AtomicU64};
use std::mem::size_of;

/// First eight bytes of every arena.
pub(crate) const MAGIC: [u8; 8] = *b"SESSIO\x00A";
/// Bumped whenever a layout below changes meaning.
pub(crate) const FORMAT_VERSION: u32 = 6;
/// Bytes of the header page.
pub(crate) const HEADER_BYTES: u64 = 4096;
/// The heap's allocation unit; every block starts on a multiple of it.
pub(crate) const BLOCK: u64 = 64;
/// Open arena handles at once, over all processes.
pub(crate) const PARTICIPANTS_MAX: u32 = 512;
/// Retired blocks a participant may hold before it must reclaim.
pub(crate) const RETIRE_RING: u32 = 1024;
/// Size classes of the heap.
pub(crate) const CLASSES_MAX: usize = 128;
/// Chunk-map value of a chunk that no class owns.
pub(crate) const CHUNK_UNASSIGNED: u8 = 0xff;
/// Replica nodes whose incarnation the header remembers.
pub(crate) const REPLICAS_MAX: usize = 64;
/// Smallest heap chunk; a chunk holds blocks of one size class.
pub(crate) const CHUNK_BYTES_MIN: u64 = 64 * 1024;

/// Magic of a record block header.
pub(crate) const RECORD_MAGIC: u32 = 0x5345_5352; // "RSES"
/// Magic of an op node header.
pub(crate) const NODE_MAGIC: u32 = 0x5345_4f50; // "POES"

/// The header page. Geometry fields are written once, before the arena is
/// published under its name, and never change; the atomics are shared state.
#[repr(C)]
pub(crate) struct Header {
    pub magic: [u8; 8],
    pub format: u32,
    pub participants: u32,
    pub fingerprint: u64,
    pub shape: Shape,
    pub created_ms: u64,
    /// Global reclamation epoch; bumped at every retire.
    pub epoch: AtomicU64,
    /// Owner word of the index insert/remove lock.
    pub insert_lock: AtomicU32,
    /// Owner word of the heap compaction lock.
    pub compact_lock: AtomicU32,
    /// Chunks handed out so far (bump pointer).
    pub chunk_top: AtomicU64,
    /// Free chunks: | tag 24 | chunk + 1 (40) |, linked through block `link`
    /// (`words::stack_head`).
    pub chunk_free: AtomicU64,
    /// Live sessions.
    pub live: AtomicU64,
    /// Sessions ever created, expired, and reclaimed blocks (statistics).
    pub created_total: AtomicU64,
    pub expired_total: AtomicU64,
    pub recoveries: AtomicU64,
    /// Seed of the index hash, random per arena.
    pub hash_seed: u64,
    /// One past the highest participant slot ever claimed.
    pub participants_hwm: AtomicU32,
    pub _pad1: u32,
    pub _pad2: [u64; 2],
    /// Free blocks per class: | tag 24 | block index + 1 (40) |
    /// (`words::stack_head`).
    pub class_free: [AtomicU64; CLASSES_MAX],
    /// The chunk each class is carving fresh blocks from, one per CAS, so a
    /// crash loses at most the block it took: | chunk + 1 (32) | next (32) |
    /// (`words::carve_word`).
    pub class_carve: [AtomicU64; CLASSES_MAX],
    /// The incarnation of each replica node as last seen by the replicator,
    /// so a restarted replicator can trust the acks in `IndexSlot::acked`
    /// of nodes that did not restart meanwhile.
    pub replicas: [ReplicaEntry; REPLICAS_MAX],
    /// The online collector's word and counters (`arena::collect`).
    pub collector: Collector,
    /// What a host's processes coordinate through above the arena
    /// (`arena::host`). All zero in a fresh file, which is their idle state,
    /// so arenas made before these words existed read them correctly.
    pub host: HostWords,
    /// Removals the replicator never saw: their index slot had to be
    /// reused before it took them (statistics; see `Arena::insert`).
    pub removals_dropped: AtomicU64,
    /// Copies evicted because another host took their session over.
    pub evicted_total: AtomicU64,
    /// [`HINT_SET`] when a dirty bit is set, cleared by the replicator
    /// before it walks the bitmap: an idle replicator looks at one word.
    /// [`HINT_ASLEEP`] while a replicator waits on it (a futex) for the
    /// next dirty bit; [`HINT_CLEAR`] otherwise.
    pub dirty_hint: AtomicU32,
    pub _hint_pad: u32,
    /// Until when (ms since the Unix epoch) a writer waits for acks: the
    /// replicator ships as soon as a link is free rather than on its tick.
    pub urgent_until_ms: AtomicU64,
    /// Bytes ever reserved in the delta log: the next entry starts here
    /// (modulo the log's size). See `arena::deltas`.
    pub delta_head: AtomicU64,
}
const _: () = assert!(size_of::<Header>() as u64 <= HEADER_BYTES);

/// [`Header::dirty_hint`]: nothing marked since the replicator's last take.
pub(crate) const HINT_CLEAR: u32 = 0;
/// [`Header::dirty_hint`]: something was marked.
pub(crate) const HINT_SET: u32 = 1;
/// [`Header::dirty_hint`]: nothing marked, and a replicator sleeps until
/// something is: the process that marks wakes it.
pub(crate) const HINT_ASLEEP: u32 = 2;

/// Levels of the dirty bitmap: the bits (one per index slot), then two
/// summaries, each with one bit per word of the level below, so a take
/// walks a few words whatever the capacity.
pub(crate) const DIRTY_LEVELS: usize = 3;

/// Words of each level of the dirty bitmap of an index of `index_slots`.
pub(crate) fn dirty_level_words(index_slots: u64) -> [u64; DIRTY_LEVELS] {
    let bits = index_slots / 64;
    let first = bits.div_ceil(64);
    [bits, first, first.div_ceil(64)]
}

/// Byte offset of each level of the dirty bitmap from its start; each
/// level starts on a cache line.
pub(crate) fn dirty_level_offs(index_slots: u64) -> ([u64; DIRTY_LEVELS], u64) {
    let words = dirty_level_words(index_slots);
    let mut offs = [0; DIRTY_LEVELS];
    let mut at = 0;
    for (o, w) in offs.iter_mut().zip(words) {
        *o = at;
        at += (w * 8).next_multiple_of(64);
    }
    (offs, at)
}

/// Fetches from the bank one host can have in progress under a claim.
pub(crate) const FETCH_CLAIMS: usize = 62;

/// The host-wide words of the layer above the arena: who fetches a missing
/// session from the bank, how fast the host may ask the bank, and which
/// process sweeps expired sessions.
#[repr(C, align(64))]
pub(crate) struct HostWords {
    /// Owner word of the participant elected to sweep; 0 = none. A dead
    /// sweeper's word is taken over by the next handle that asks.
    pub sweeper: AtomicU32,
    pub _pad: u32,
    /// Token bucket of bank fetches (`words::bucket_word`).
    pub fetch_bucket: AtomicU64,
    /// Fetches in progress, one word each (`words::claim_word`), at the
    /// slot a SID hashes to.
    pub fetch_claims: [AtomicU64; FETCH_CLAIMS],
}
const _: () = assert!(size_of::<HostWords>() == 512);

/// The arena's sizes and where each region starts: derived from the
/// configuration at creation, then fixed. The header holds a copy, and an
/// arena opens only where recomputing it from the header gives the same.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub capacity: u64,
    pub index_slots: u64,
    pub heap_bytes: u64,
    pub quota_bytes: u64,
    pub chunk_bytes: u64,
    pub chunks: u64,
    pub class_count: u32,
    pub page_bytes: u32,
    pub participants_off: u64,
    pub index_off: u64,
    pub dirty_off: u64,
    pub chunk_map_off: u64,
    pub heap_off: u64,
    pub total_bytes: u64,
    pub delta_off: u64,
    pub delta_bytes: u64,
}
// Where the shape's fields were when they stood in the header one by one:
// nesting them changed no byte of the file.
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(Header, shape) == 24 && size_of::<Shape>() == 120);
    assert!(offset_of!(Header, created_ms) == 144);
    assert!(offset_of!(Shape, class_count) == 48 && offset_of!(Shape, page_bytes) == 52);
    assert!(offset_of!(Shape, participants_off) == 56 && offset_of!(Shape, total_bytes) == 96);
};

/// The online collector's shared state: read by every mutation (`world`),
/// written rarely, so it has a cache line of its own.
#[repr(C, align(64))]
pub(crate) struct Collector {
    /// Owner word of the participant collecting now, while mutations wait;
    /// 0 = none. A dead collector's word is taken over by a survivor.
    pub world: AtomicU32,
    pub _pad: u32,
    /// Participants found dead inside a mutation since the last collection:
    /// each may have leaked the block it was linking.
    pub suspects: AtomicU64,
    /// When the last collection ended (ms since the Unix epoch).
    pub last_ms: AtomicU64,
    /// Until when a collection for want of space is not tried again (ms),
    /// set after one that returned nothing; a removal clears it (it may
    /// have freed a chunk).
    pub quiet_until_ms: AtomicU64,
    /// Collections run, blocks and chunks they found leaked, chunks they
    /// gave back to the pool, and the last one's pause (statistics).
    pub collections: AtomicU64,
    pub leaked_blocks: AtomicU64,
    pub returned_chunks: AtomicU64,
    pub last_pause_us: AtomicU64,
}
const _: () = assert!(size_of::<Collector>() == 64);

/// One replica node's remembered incarnation.
#[repr(C)]
pub(crate) struct ReplicaEntry {
    /// Node id + 1; 0 = free. Claimed once, never released.
    pub node: AtomicU64,
    /// The node's incarnation; 0 = not known.
    pub incarnation: AtomicU64,
}

/// One open arena handle's shared state.
#[repr(C)]
pub(crate) struct Participant {
    /// Bumped at every claim; part of the owner words this handle writes.
    pub generation: AtomicU32,
    /// The claiming process, for diagnostics only (liveness is the kernel lock).
    pub pid: AtomicU32,
    /// Reclamation epoch this handle is pinned at; 0 = not pinned.
    pub pin: AtomicU64,
    /// Retire ring: entries `[head, tail)` wait to be freed. An entry's
    /// block heads a chain linked through the blocks' `link` words (byte
    /// offsets, 0 ends it): a full ring grows its newest entry's chain.
    pub ring_head: AtomicU32,
    pub ring_tail: AtomicU32,
    /// The record block a combine of this handle is building (0 = none),
    /// the index slot it is for, and the record it replaces: whoever takes
    /// the slot's lock from this handle after its death frees the block if
    /// it was never published, or retires the replaced record if it was.
    pub building: AtomicU64,
    pub building_slot: AtomicU64,
    pub building_old: AtomicU64,
    pub _pad: [u64; 2],
    pub ring: [RetireEntry; RETIRE_RING as usize],
}

/// A block retired at `epoch`.
#[repr(C)]
pub(crate) struct RetireEntry {
    pub block: AtomicU64,
    pub epoch: AtomicU64,
}
const _: () = assert!(size_of::<Participant>() == 64 + 16 * RETIRE_RING as usize);

/// One slot of the open-addressing index; one cache line.
#[repr(C, align(64))]
pub(crate) struct IndexSlot {
    pub sid_lo: AtomicU64,
    pub sid_hi: AtomicU64,
    /// | generation 62 | kind 2 | (`words::slot_state`).
    pub state: AtomicU64,
    /// The published record: | archive length 32 | block index 32 |
    /// (`words::record_word`).
    pub record: AtomicU64,
    /// Update queue head word (see `queue`).
    pub head: AtomicU64,
    /// Combiner lock owner word (see `lock`).
    pub lock: AtomicU32,
    /// Last read, in seconds since the arena was created (coarse, relaxed).
    pub access_s: AtomicU32,
    /// Replication acks: | node id 16 | version 48 |, 0 = none
    /// (`words::ack_word`).
    pub acked: [AtomicU64; 2],
}
const _: () = assert!(size_of::<IndexSlot>() == 64);

/// The first 16 bytes of every heap block, whatever it holds: the link the
/// allocator threads free and retired blocks on, then what kind of block it
/// is and how many bytes follow its 64-byte header.
#[repr(C)]
pub(crate) struct BlockStart {
    /// Free-list link while the block is free (a block index); retire-chain
    /// link while it waits in a retire ring (a byte offset); a node's link
    /// in a queue chain. Never read by a reader of the block's contents, so
    /// it may change while readers are pinned.
    pub link: AtomicU64,
    /// [`RECORD_MAGIC`] or [`NODE_MAGIC`].
    pub magic: u32,
    /// Bytes of the payload after the header.
    pub len: u32,
}

/// The first 64 bytes of a record block; the rkyv archive follows.
#[repr(C)]
pub(crate) struct RecordHeader {
    pub start: BlockStart,
    /// xxh3 of the archive.
    pub checksum: u64,
    pub version: u64,
    pub epoch: u64,
    pub sid: [u64; 2],
    /// Newest queue seq this record includes.
    pub applied_seq: u32,
    /// Where the delta log entry of this record's version starts
    /// (`arena::deltas`, `log_at`); 0 = none.
    pub log_at: u32,
}

/// The first 64 bytes of an op node block; the encoded ops follow.
#[repr(C)]
pub(crate) struct NodeHeader {
    pub start: BlockStart,
    pub seq: AtomicU32,
    /// Outcome, written by the combiner before its commit
    /// (`words::ResultCode`).
    pub result: AtomicU32,
    pub next: AtomicU64,
    pub sid: [u64; 2],
    pub checksum: u64,
    /// Before the answer, how to apply the batch (`words::expire_only`);
    /// after it, the version produced or the bytes an over-quota batch needed.
    pub detail: AtomicU64,
}

/// A header that starts a heap block: at most 64 bytes and 64-byte
/// alignment, starting with the block's [`BlockStart`], every field an
/// atomic or a plain integer valid at any bit pattern. Sealed: only the
/// headers of this module are read through `Map::block_header`, which
/// relies on exactly that.
pub(crate) trait BlockHeader: sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::BlockStart {}
    impl Sealed for super::RecordHeader {}
    impl Sealed for super::NodeHeader {}
}

impl BlockHeader for BlockStart {}
impl BlockHeader for RecordHeader {}
impl BlockHeader for NodeHeader {}

// The record and node headers fill a block's header exactly, start with the
// `BlockStart` (so either can be read through it), and keep the offsets the
// file format has always had.
const _: () = {
    use std::mem::{align_of, offset_of};
    assert!(size_of::<BlockStart>() == 16 && align_of::<BlockStart>() as u64 <= BLOCK);
    assert!(size_of::<RecordHeader>() as u64 == BLOCK);
    assert!(align_of::<RecordHeader>() as u64 <= BLOCK);
    assert!(offset_of!(RecordHeader, start) == 0 && offset_of!(RecordHeader, checksum) == 16);
    assert!(offset_of!(RecordHeader, sid) == 40 && offset_of!(RecordHeader, log_at) == 60);
    assert!(size_of::<NodeHeader>() as u64 == BLOCK);
    assert!(align_of::<NodeHeader>() as u64 <= BLOCK);
    assert!(offset_of!(NodeHeader, start) == 0 && offset_of!(NodeHeader, seq) == 16);
    assert!(offset_of!(NodeHeader, sid) == 32 && offset_of!(NodeHeader, detail) == 56);
};

/// Least and most bytes of the delta log.
pub(crate) const DELTA_LOG_MIN: u64 = 256 * 1024;
pub(crate) const DELTA_LOG_MAX: u64 = 64 << 20;

/// Bytes of the delta log of a heap of `heap_bytes`: 1/64 of it, within
/// [`DELTA_LOG_MIN`] and [`DELTA_LOG_MAX`], in whole pages.
pub(crate) const fn delta_log_bytes(heap_bytes: u64) -> u64 {
    let b = heap_bytes / 64;
    let b = if b < DELTA_LOG_MIN {
        DELTA_LOG_MIN
    } else if b > DELTA_LOG_MAX {
        DELTA_LOG_MAX
    } else {
        b
    };
    b.next_multiple_of(4096)
}

/// Block sizes of the heap's classes, smallest first: steps of 64 bytes up
/// to 2 KiB, where most sessions are (a record there wastes at most 63 B,
/// 3–6 %), then steps of about 1/8, so a block wastes at most ~12 %.
pub(crate) fn class_sizes(chunk_bytes: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut s = BLOCK;
    while s < chunk_bytes && sizes.len() < CLASSES_MAX - 1 {
        sizes.push(s);
        let step = if s < 2048 {
            BLOCK
        } else {
            (s / 8).next_multiple_of(BLOCK)
        };
        s += step;
    }
    sizes.push(chunk_bytes);
    sizes
}

/// Everything derived from the configuration, fixed at creation: the
/// [`Shape`] the header records, and the heap's size classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub shape: Shape,
    pub classes: Vec<u64>,
}

/// The shape's fields read as the geometry's own (`geo.heap_off`): they are
/// what most code wants of it.
impl std::ops::Deref for Geometry {
    type Target = Shape;

    fn deref(&self) -> &Shape {
        &self.shape
    }
}

impl Geometry {
    /// Lays out an arena; `align` is the page size the file is mapped with.
    pub(crate) fn new(capacity: u64, heap_bytes: u64, quota_bytes: u64, align: u64) -> Geometry {
        // Load factor at most 3/4 of live sessions (tombstones are reused
        // under the insert lock, so they do not pile up). Any multiple of 64
        // (one dirty bitmap word, one page of slots): a SID's home slot is
        // a multiply-shift, not a mask.
        let index_slots = (capacity * 4 / 3 + 1).next_multiple_of(64);
        let chunk_bytes = (quota_bytes + BLOCK)
            .next_power_of_two()
            .max(CHUNK_BYTES_MIN);
        let chunks = heap_bytes.div_ceil(chunk_bytes).max(1);
        let participants_off = HEADER_BYTES;
        let index_off = (participants_off
            + PARTICIPANTS_MAX as u64 * size_of::<Participant>() as u64)
            .next_multiple_of(4096);
        let dirty_off = index_off + index_slots * 64;
        let chunk_map_off = dirty_off + dirty_level_offs(index_slots).1;
        let delta_off = (chunk_map_off + chunks).next_multiple_of(4096);
        let delta_bytes = delta_log_bytes(chunks * chunk_bytes);
        let heap_off = (delta_off + delta_bytes).next_multiple_of(align.max(4096));
        let total_bytes = (heap_off + chunks * chunk_bytes).next_multiple_of(align.max(4096));
        let classes = class_sizes(chunk_bytes);
        Geometry {
            shape: Shape {
                capacity,
                index_slots,
                heap_bytes: chunks * chunk_bytes,
                quota_bytes,
                chunk_bytes,
                chunks,
                class_count: classes.len() as u32,
                page_bytes: align as u32,
                participants_off,
                index_off,
                dirty_off,
                chunk_map_off,
                heap_off,
                total_bytes,
                delta_off,
                delta_bytes,
            },
            classes,
        }
    }

    /// A hash of everything whose meaning a reader of the arena depends on:
    /// the struct sizes, the format, the geometry. Opening an arena whose
    /// fingerprint differs is refused.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut words: Vec<u64> = vec![
            u64::from(FORMAT_VERSION),
            size_of::<Header>() as u64,
            size_of::<Participant>() as u64,
            size_of::<IndexSlot>() as u64,
            size_of::<RecordHeader>() as u64,
            size_of::<NodeHeader>() as u64,
            u64::from(PARTICIPANTS_MAX),
            u64::from(RETIRE_RING),
            self.capacity,
            self.index_slots,
            self.heap_bytes,
            self.quota_bytes,
            self.chunk_bytes,
            self.chunks,
            self.participants_off,
            self.index_off,
            self.dirty_off,
            self.chunk_map_off,
            self.heap_off,
            self.total_bytes,
            self.delta_off,
            self.delta_bytes,
        ];
        words.extend(&self.classes);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// The class whose blocks fit `bytes`, if any.
    pub(crate) fn class_for(&self, bytes: u64) -> Option<usize> {
        let i = self.classes.partition_point(|&s| s < bytes);
        (i < self.classes.len()).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_and_grow() {
        let c = class_sizes(128 * 1024);
        assert_eq!(c[0], 64);
        assert_eq!(*c.last().unwrap(), 128 * 1024);
        assert!(c.len() < CLASSES_MAX);
        for w in c.windows(2) {
            assert!(w[0] < w[1]);
            assert_eq!(w[0] % BLOCK, 0);
            // No class wastes more than an eighth plus one block, and
            // none below 2 KiB more than a block.
            assert!(w[1] - w[0] <= w[0] / 8 + BLOCK);
            assert!(w[0] >= 2048 || w[1] - w[0] == BLOCK);
        }
        // The largest quota's chunks still get classes all the way up.
        let big = class_sizes(128 << 20);
        assert!(big.len() <= CLASSES_MAX);
        for w in big.windows(2) {
            assert!(w[1] - w[0] <= w[0] / 8 + BLOCK, "{w:?}");
        }
    }

    #[test]
    fn geometry_is_aligned_and_fingerprinted() {
        let g = Geometry::new(1000, 4 << 20, 64 * 1024, 4096);
        assert!(g.index_slots >= 1334);
        assert_eq!(g.heap_off % 4096, 0);
        assert_eq!(g.chunk_bytes, 128 * 1024);
        assert!(g.total_bytes >= g.heap_off + g.heap_bytes);
        assert_eq!(g.class_for(1).unwrap(), 0);
        assert_eq!(g.classes[g.class_for(1100).unwrap()], 1152);
        assert_eq!(g.classes[g.class_for(1064).unwrap()], 1088);
        assert!(g.class_for(g.chunk_bytes + 1).is_none());
        let h = Geometry::new(1001, 4 << 20, 64 * 1024, 4096);
        assert_eq!(g.fingerprint(), g.clone().fingerprint());
        assert_ne!(g.fingerprint(), h.fingerprint());
    }
}
