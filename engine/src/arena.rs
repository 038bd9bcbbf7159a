//! The arena handle: the safe API over the shared structures of `layout`.
//!
//! One [`Arena`] is one participant: an open file description holding a
//! byte-range lock on its participant slot, a reclamation pin, and a retire
//! ring. It is `Send` but not `Sync`; a thread that needs its own handle
//! calls [`Arena::try_clone`], which shares the mapping.

use crate::error::SessionError;
use crate::layout::{BLOCK, RecordHeader};
use crate::map::Map;
use crate::session::{ArchivedSessionData, SessionData};
use crate::sid::Sid;
use crate::words;
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::marker::PhantomData;
use std::sync::Arc;

mod bell;
mod collect;
mod combine;
mod deltas;
mod expiry;
mod handle;
mod heap;
mod host;
mod index;
mod memory;
mod reclaim;
mod records;
mod recovery;
mod replica;
#[cfg(test)]
mod test_support;

pub use bell::DirtyBell;
pub use collect::{CollectError, CollectReport};
use combine::HeapNodes;
pub use deltas::DELTA_BATCHES_MAX;
pub use host::{FetchClaim, FetchGuard};
pub use memory::{ClassUsage, FREE_WALK_DEFAULT, MemoryStats};

/// Most op nodes one combine applies (a bound on the local scratch and on
/// the time one combiner holds a session).
const COMBINE_BATCH_MAX: usize = 1024;
/// Backoff rounds before a waiter asks the kernel whether the lock holder
/// lives (each round is a few µs at most).
const SPINS_BEFORE_LIVENESS: u32 = 64;
/// Retired blocks a handle collects before it tries to free them: small,
/// so few copies of a busy record wait in limbo.
const RECLAIM_BATCH: u32 = 16;
/// Cache lines at the end of a record a read prefetches (root, attribute
/// array of up to ~12 attributes).
const PREFETCH_TAIL_LINES: u64 = 4;
/// Pins younger than this many epochs are assumed live without a syscall.
const RECENT_PIN_EPOCHS: u64 = 4096;

/// How a session is to be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NewSession {
    /// Idle time-to-live in ms (0 = none).
    pub idle_ttl_ms: u64,
    /// Absolute lifetime in ms from now (0 = none).
    pub lifetime_ms: u64,
}

/// Open arena handle. See the crate docs.
pub struct Arena {
    map: Arc<Map>,
    /// Our open file description: it holds our participant lock and the
    /// shared open lock.
    file: File,
    me: u32,
    owner: u32,
    pins: Cell<u32>,
    /// Mutation sections entered and not left (see `reclaim`).
    muts: Cell<u32>,
    scratch: RefCell<Vec<u32>>,
    ser: RefCell<rkyv::util::AlignedVec>,
    ops_buf: Cell<rkyv::util::AlignedVec>,
    sweep_cursor: Cell<u64>,
    /// The top-level summary word `take_dirty` starts at.
    dirty_cursor: Cell<u64>,
    /// The bitmap word the next sweep of `take_dirty` starts at.
    dirty_sweep: Cell<u64>,
    /// When `take_dirty` last swept a slice of the bitmap itself.
    dirty_scanned: Cell<std::time::Instant>,
    recovered: Option<RecoveryReport>,
    _not_sync: PhantomData<Cell<()>>,
}

/// What opening alone found and repaired (see `docs/ARCHITECTURE.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Live sessions found intact.
    pub sessions: u64,
    /// Sessions whose record failed validation and were dropped.
    pub corrupt_records: u64,
    /// Queues whose chain was broken and were cut.
    pub broken_queues: u64,
    /// Removals a dead process had started and recovery finished.
    pub finished_removals: u64,
    /// Heap blocks the rebuild put back on free lists: blocks leaked by
    /// crashes, plus those that were free already.
    pub reclaimed_blocks: u64,
    /// Blocks that were neither reachable, free, nor waiting in a retire
    /// ring: leaked by processes killed between an allocation and linking
    /// it; free again now.
    pub leaked_blocks: u64,
    /// Sessions that had queued updates, applied during recovery.
    pub pending_applied: u64,
}

/// Arena-wide counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaStats {
    /// Live sessions.
    pub live: u64,
    /// Session capacity.
    pub capacity: u64,
    /// Slots of the index (what a full [`Arena::sweep`] pass looks at).
    pub index_slots: u64,
    /// Sessions created over the arena's life.
    pub created_total: u64,
    /// Sessions expired by sweeps.
    pub expired_total: u64,
    /// Removals the replicator never saw, because their index slot was
    /// reused before it took them (it was stalled); the bank's copies of
    /// those sessions end by expiry instead.
    pub removals_dropped: u64,
    /// Copies evicted because another host took their session over
    /// ([`Arena::evict_older`]).
    pub evicted_total: u64,
    /// Heap chunks handed out at least once (the chunk pool's bump
    /// pointer): the heap's high-water mark, not the chunks in use now,
    /// since chunks given back stay below it. Chunks past it were never
    /// written. [`Arena::memory`] tells chunks in use by size class.
    pub chunks_touched: u64,
    /// Heap chunks in all.
    pub chunks: u64,
    /// Bytes of one chunk.
    pub chunk_bytes: u64,
    /// Bytes of the whole mapping.
    pub mapped_bytes: u64,
    /// Handles open now.
    pub handles: u32,
    /// Solo opens that ran recovery.
    pub recoveries: u64,
    /// Online collections run ([`Arena::collect`]).
    pub collections: u64,
    /// Heap blocks those collections found lost by killed processes and
    /// gave back.
    pub leaked_blocks_returned: u64,
    /// Wholly free chunks those collections gave back to the pool.
    pub chunks_returned: u64,
    /// Processes found dead inside a mutation since the last collection
    /// (each may have lost a block; the next collection looks).
    pub suspects: u64,
    /// How long the last collection held mutations, in µs.
    pub last_collect_pause_us: u64,
}

/// Zero-copy view of one session, pinned against reclamation while it lives.
pub struct ReadGuard<'a> {
    arena: &'a Arena,
    header: &'a RecordHeader,
    bytes: &'a [u8],
    data: &'a ArchivedSessionData,
}

impl ReadGuard<'_> {
    /// The archived session.
    #[inline]
    pub fn data(&self) -> &ArchivedSessionData {
        self.data
    }

    /// One attribute, without copying.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key)
    }

    /// The record's version (one per applied update batch).
    #[inline]
    pub fn version(&self) -> u64 {
        self.header.version
    }

    /// The ownership epoch the record was installed or created with.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// The delta log entry of this version, 0 = none (`arena::deltas`).
    pub(crate) fn log_at(&self) -> u32 {
        self.header.log_at
    }

    /// The archived bytes (what `install` takes and a replica stores).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Recomputes the record's checksum; false means torn or damaged bytes.
    pub fn verify(&self) -> bool {
        xxhash_rust::xxh3::xxh3_64(self.bytes) == self.header.checksum
    }

    /// A deep copy of the session.
    pub fn to_owned(&self) -> SessionData {
        rkyv::deserialize::<SessionData, rkyv::rancor::Error>(self.data)
            .expect("a published record deserializes")
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.arena.unpin();
    }
}

/// One pin held over several reads ([`Arena::pinned`]): a read under it
/// skips the `SeqCst` store and fence a lone read pays to pin itself, and
/// the unpin after it. Blocks retired meanwhile, by any process, wait for
/// it to end, so hold one for a request, not for a connection.
pub struct PinnedScope<'a> {
    arena: &'a Arena,
}

impl<'a> PinnedScope<'a> {
    /// [`Arena::read`] under this scope's pin.
    #[inline]
    pub fn read(&self, sid: Sid) -> Result<ReadGuard<'a>, SessionError> {
        self.arena.read(sid)
    }
}

impl Drop for PinnedScope<'_> {
    fn drop(&mut self) {
        self.arena.unpin();
    }
}

/// One entry of [`Arena::take_dirty`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    /// The session changed; its current version and epoch, and the acks
    /// recorded for it as `(node id, version)`.
    Changed {
        /// The session.
        sid: Sid,
        /// Its current version.
        version: u64,
        /// Its ownership epoch.
        epoch: u64,
        /// Acks recorded in the arena.
        acked: [(u16, u64); 2],
    },
    /// The session was removed (invalidated or expired).
    Removed {
        /// The session.
        sid: Sid,
    },
}

/// What [`Arena::delta_since`] can give a replica at `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// The replica is current.
    UpToDate,
    /// Op batches (each as [`encode_ops`] made it) taking `base` to `version`.
    Ops {
        /// The version they produce.
        version: u64,
        /// Ownership epoch.
        epoch: u64,
        /// The batches, oldest first.
        batches: Vec<Vec<u8>>,
    },
    /// The log no longer reaches back to `base`: ship the whole record.
    Full {
        /// Version of the record.
        version: u64,
        /// Ownership epoch.
        epoch: u64,
        /// The archived session.
        bytes: Vec<u8>,
    },
}

/// One bit per heap block (or chunk): what a collection or a recovery
/// has seen.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; returns whether it was set already.
    fn test_and_set(&mut self, i: u64) -> bool {
        let w = &mut self.0[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        was
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Index slots looked at.
    pub scanned: u64,
    /// Sessions removed as expired.
    pub expired: u64,
}

/// The block offset in a slot's record word.
#[inline]
fn rec_off(word: u64) -> u64 {
    u64::from(words::record_block(word)) * BLOCK
}

/// The archive length in a slot's record word.
#[inline]
fn rec_len(word: u64) -> u64 {
    u64::from(words::record_len(word))
}
