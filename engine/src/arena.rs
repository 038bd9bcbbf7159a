//! The arena handle: the safe API over the shared structures of `layout`.
//!
//! One [`Arena`] is one participant: an open file description holding a
//! byte-range lock on its participant slot, a reclamation pin, and a retire
//! ring. It is `Send` but not `Sync`; a thread that needs its own handle
//! calls [`Arena::try_clone`], which shares the mapping.

use crate::epoch;
use crate::error::{OpenError, SessionError};
use crate::layout::{
    BLOCK, CHUNK_UNASSIGNED, Header, IndexSlot, NODE_MAGIC, NodeHeader, PARTICIPANTS_MAX,
    Participant, RECORD_MAGIC, RETIRE_RING, RecordHeader, SLOT_EMPTY, SLOT_KIND_MASK, SLOT_LIVE,
    SLOT_TOMB,
};
use crate::lock;
use crate::map::{ArenaConfig, Location, Map};
use crate::queue::{self, EMPTY, Nodes};
use crate::session::{ArchivedOp, ArchivedSessionData, Op, OpError, SessionData, encode_ops};
use crate::sid::Sid;
use crate::sync::{AtomicU64, Backoff, Ordering, fence};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::marker::PhantomData;
use std::sync::Arc;

mod collect;
mod reclaim;

pub use collect::{CollectError, CollectReport};

/// Result word of an op node still waiting.
const PENDING: u32 = u32::MAX;
/// Result word: the batch was applied.
const DONE: u32 = 0;
/// Result word: the session no longer existed when the batch came up.
const GONE: u32 = 6;
/// Result word, final: the batch was cancelled because the heap had no room
/// for the new record. Later combiners skip cancelled nodes.
const CANCELLED_HEAP_FULL: u32 = 7;
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
/// Node kind flag kept in the op node's `detail` before it is pushed: an
/// expiry sweep's batch, applied only if the session is still expired.
const EXPIRE_ONLY: u64 = 1 << 63;

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
    sweep_cursor: Cell<u64>,
    dirty_cursor: Cell<u64>,
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
    /// Sessions created over the arena's life.
    pub created_total: u64,
    /// Sessions expired by sweeps.
    pub expired_total: u64,
    /// Heap chunks handed to size classes.
    pub chunks_used: u64,
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

/// Op nodes in the arena's heap, addressed by block index (offset / 64).
struct HeapNodes<'a>(&'a Map);

impl HeapNodes<'_> {
    fn node(&self, n: u32) -> &NodeHeader {
        // SAFETY: callers only pass indices for which `plausible` holds or
        // nodes they allocated themselves.
        unsafe { self.0.block::<NodeHeader>(u64::from(n) * BLOCK) }
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

const TAG_SHIFT: u32 = 40;
const IDX_MASK: u64 = (1 << TAG_SHIFT) - 1;

impl Arena {
    /// Replica nodes whose incarnation one arena remembers.
    pub const REPLICAS_MAX: usize = crate::layout::REPLICAS_MAX;

    /// Opens the arena at `loc`, creating it with `cfg` if it does not exist.
    /// An existing arena keeps the configuration it was created with.
    pub fn open(loc: &Location, cfg: &ArenaConfig) -> Result<Arena, OpenError> {
        let map = Map::create_or_open(loc, cfg)?;
        Self::attach(Arc::new(map))
    }

    /// Opens an existing arena; never creates one.
    pub fn open_existing(loc: &Location) -> Result<Arena, OpenError> {
        let path = Map::existing(loc)?
            .ok_or_else(|| OpenError::NotFound(loc.path().unwrap_or_default()))?;
        let map = Map::open_path(&path)?;
        Self::attach(Arc::new(map))
    }

    /// Deletes an arena's file. Processes that have it open keep their
    /// mapping until they drop their handles.
    pub fn remove(loc: &Location) -> Result<(), OpenError> {
        let path = Map::existing(loc)?
            .ok_or_else(|| OpenError::NotFound(loc.path().unwrap_or_default()))?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(OpenError::NotFound(path)),
            Err(e) => Err(OpenError::io(&path, e)),
        }
    }

    /// A second handle on the same mapping, for another thread.
    pub fn try_clone(&self) -> Result<Arena, OpenError> {
        Self::attach(Arc::clone(&self.map))
    }

    fn attach(map: Arc<Map>) -> Result<Arena, OpenError> {
        let file = map.reopen()?;
        let alone = Map::open_lock(&file).map_err(|e| OpenError::io(&map.path, e))?;
        // The lowest free slot: slots of the dead are reused soon, and with
        // them whatever the dead left in their retire rings.
        let mut me = None;
        for i in 0..PARTICIPANTS_MAX {
            if Map::claim_lock(&file, i).map_err(|e| OpenError::io(&map.path, e))? {
                me = Some(i);
                break;
            }
        }
        let me = me.ok_or(OpenError::TooManyHandles(PARTICIPANTS_MAX))?;
        let p = map.participant(me);
        // Whatever a dead predecessor left in this slot: its pin no longer
        // protects anyone (it is dead); its retired blocks are ours to free.
        // If it died inside a mutation it may have leaked a block: the
        // next collection looks (recovery, when alone, rebuilds anyway).
        if epoch::is_mutating(p.pin.swap(0, Ordering::SeqCst)) && !alone {
            map.header()
                .collector
                .suspects
                .fetch_add(1, Ordering::Relaxed);
        }
        let generation = p.generation.fetch_add(1, Ordering::SeqCst).wrapping_add(1) as u16;
        p.pid.store(std::process::id(), Ordering::Relaxed);
        map.header()
            .participants_hwm
            .fetch_max(me + 1, Ordering::SeqCst);
        let mut arena = Arena {
            owner: lock::owner(generation, me as u16),
            map,
            file,
            me,
            pins: Cell::new(0),
            muts: Cell::new(0),
            scratch: RefCell::new(Vec::new()),
            ser: RefCell::new(rkyv::util::AlignedVec::new()),
            sweep_cursor: Cell::new(0),
            dirty_cursor: Cell::new(0),
            recovered: None,
            _not_sync: PhantomData,
        };
        // A predecessor that died mid-combine: finish its build under the
        // slot's lock (recovery, when alone, rebuilds everything anyway).
        let p = arena.participant();
        let slot = p.building_slot.load(Ordering::Acquire);
        if !alone && p.building.load(Ordering::Acquire) != 0 && slot < arena.map.geo.index_slots {
            arena.begin_mut();
            let lock_word = &arena.map.slot(slot).lock;
            let _ = arena.acquire(lock_word);
            arena.resolve_dead_build(arena.owner, slot);
            lock::unlock(lock_word, arena.owner);
            arena.end_mut();
        }
        if alone {
            arena.participant().building.store(0, Ordering::Relaxed);
            arena.recovered = Some(arena.recover());
            Map::share_open_lock(&arena.file).map_err(|e| OpenError::io(&arena.map.path, e))?;
            arena.apply_all_pending();
        }
        Ok(arena)
    }

    /// What recovery did, if this handle opened the arena alone.
    pub fn recovery_report(&self) -> Option<&RecoveryReport> {
        self.recovered.as_ref()
    }

    /// Whether the arena is backed by 2 MiB pages.
    pub fn huge_pages(&self) -> bool {
        self.map.huge
    }

    /// The arena file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.map.path
    }

    /// Per-session attribute byte quota.
    pub fn quota_bytes(&self) -> u64 {
        self.map.geo.quota_bytes
    }

    fn header(&self) -> &Header {
        self.map.header()
    }

    fn participant(&self) -> &Participant {
        self.map.participant(self.me)
    }

    // ----- heap -------------------------------------------------------

    fn block_index(&self, off: u64) -> u64 {
        (off - self.map.geo.heap_off) / BLOCK + 1
    }

    fn block_off(&self, idx: u64) -> u64 {
        self.map.geo.heap_off + (idx - 1) * BLOCK
    }

    fn link(&self, off: u64) -> &AtomicU64 {
        // SAFETY: `off` is a block offset (callers pass allocator-managed
        // blocks); `link` is the first word of every block header.
        unsafe { &self.map.block::<RecordHeader>(off).link }
    }

    /// Pops a free block of `class` (Treiber stack with an ABA tag).
    fn pop(&self, class: usize) -> Option<u64> {
        let head = &self.header().class_free[class];
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let idx = cur & IDX_MASK;
            if idx == 0 {
                return None;
            }
            let off = self.block_off(idx);
            if !self.map.is_block(off) {
                return None;
            }
            // Racy by design: the block may be popped and reused meanwhile;
            // then the tag has moved on and the CAS fails.
            let next = self.link(off).load(Ordering::Acquire) & IDX_MASK;
            let tag = (cur >> TAG_SHIFT).wrapping_add(1) << TAG_SHIFT;
            match head.compare_exchange_weak(cur, tag | next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(off),
                Err(now) => cur = now,
            }
        }
    }

    /// Pushes the chain `first ..= last` (linked through `link`).
    fn push_chain(&self, class: usize, first: u64, last: u64) {
        let head = &self.header().class_free[class];
        let mut cur = head.load(Ordering::Acquire);
        let first_idx = self.block_index(first);
        loop {
            self.link(last).store(cur & IDX_MASK, Ordering::Release);
            let tag = (cur >> TAG_SHIFT).wrapping_add(1) << TAG_SHIFT;
            match head.compare_exchange_weak(
                cur,
                tag | first_idx,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    fn take_chunk(&self) -> Option<u64> {
        let h = self.header();
        // Chunks given back by recovery first.
        let mut cur = h.chunk_free.load(Ordering::Acquire);
        while cur & IDX_MASK != 0 {
            let c = (cur & IDX_MASK) - 1;
            let off = self.map.geo.heap_off + c * self.map.geo.chunk_bytes;
            let next = self.link(off).load(Ordering::Acquire) & IDX_MASK;
            let tag = (cur >> TAG_SHIFT).wrapping_add(1) << TAG_SHIFT;
            match h.chunk_free.compare_exchange_weak(
                cur,
                tag | next,
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
    fn alloc(&self, bytes: u64) -> Result<u64, SessionError> {
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
    fn with_space<T>(&self, f: impl Fn() -> Result<T, SessionError>) -> Result<T, SessionError> {
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
    fn alloc_from_chunk(&self, class: usize) -> Option<u64> {
        let geo = &self.map.geo;
        let size = geo.classes[class];
        let per_chunk = geo.chunk_bytes / size;
        let carve = &self.header().class_carve[class];
        let mut cur = carve.load(Ordering::Acquire);
        loop {
            let chunk = cur >> 32;
            let next = cur & 0xffff_ffff;
            if chunk != 0 && next < per_chunk {
                match carve.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        return Some(geo.heap_off + (chunk - 1) * geo.chunk_bytes + next * size);
                    }
                    Err(now) => cur = now,
                }
                continue;
            }
            let c = self.take_chunk()?;
            self.map
                .chunk_class(c)
                .store(class as u8, Ordering::Release);
            match carve.compare_exchange(
                cur,
                ((c + 1) << 32) | 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(geo.heap_off + c * geo.chunk_bytes),
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

    fn push_free_chunk(&self, c: u64) {
        let h = self.header();
        let start = self.map.geo.heap_off + c * self.map.geo.chunk_bytes;
        let mut cur = h.chunk_free.load(Ordering::Acquire);
        loop {
            self.link(start).store(cur & IDX_MASK, Ordering::Release);
            let tag = (cur >> TAG_SHIFT).wrapping_add(1) << TAG_SHIFT;
            match h.chunk_free.compare_exchange_weak(
                cur,
                tag | (c + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    fn class_of(&self, off: u64) -> usize {
        let c = (off - self.map.geo.heap_off) / self.map.geo.chunk_bytes;
        self.map.chunk_class(c).load(Ordering::Acquire) as usize
    }

    fn free(&self, off: u64) {
        debug_assert!(self.map.is_block(off));
        let class = self.class_of(off);
        debug_assert!(class < self.map.geo.classes.len());
        self.push_chain(class, off, off);
    }

    // ----- index ------------------------------------------------------

    #[inline]
    fn home(&self, sid: Sid) -> u64 {
        // SIDs are 128 CSPRNG bits and only the engine mints them, so a
        // seeded multiply-mix is enough to spread them; the seed keeps a
        // SID a client presents from being aimed at one probe chain.
        let (lo, hi) = sid.words();
        let x =
            (lo ^ self.header().hash_seed ^ hi.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (x ^ (x >> 32)) & (self.map.geo.index_slots - 1)
    }
    /// Finds the live slot of `sid`.
    #[inline]
    fn lookup(&self, sid: Sid) -> Option<(u64, &IndexSlot)> {
        let (lo, hi) = sid.words();
        let mask = self.map.geo.index_slots - 1;
        let mut i = self.home(sid);
        for _ in 0..=mask {
            let s = self.map.slot(i);
            let st = s.state.load(Ordering::Acquire);
            match st & SLOT_KIND_MASK {
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
            i = (i + 1) & mask;
        }
        None
    }

    /// Whether the owner of a lock word is alive.
    fn owner_alive(&self, word: u32) -> bool {
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
    fn acquire(&self, word: &crate::sync::AtomicU32) -> Option<u32> {
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

    fn insert_lock(&self) -> InsertLock<'_> {
        let _ = self.acquire(&self.header().insert_lock);
        InsertLock(self)
    }

    /// Inserts `sid` with record `rec` (under the insert lock). Returns the
    /// slot, or the live slot already holding `sid`.
    fn insert(
        &self,
        sid: Sid,
        rec: u64,
        fresh_sid: bool,
    ) -> Result<Result<u64, u64>, SessionError> {
        let _g = self.insert_lock();
        let h = self.header();
        let (lo, hi) = sid.words();
        let mask = self.map.geo.index_slots - 1;
        let mut i = self.home(sid);
        let mut target = None;
        for _ in 0..=mask {
            let s = self.map.slot(i);
            let st = s.state.load(Ordering::Acquire);
            match st & SLOT_KIND_MASK {
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
                    if l == 0 || (!self.owner_alive(l) && lock::steal(&s.lock, l, 0)) {
                        target = Some(i);
                        if fresh_sid {
                            // A fresh random SID cannot be further along.
                            break;
                        }
                    }
                }
                _ => {}
            }
            i = (i + 1) & mask;
        }
        if h.live.load(Ordering::Acquire) >= self.map.geo.capacity {
            return Err(SessionError::Full(h.live.load(Ordering::Relaxed)));
        }
        let i = target.ok_or(SessionError::Full(h.live.load(Ordering::Relaxed)))?;
        let s = self.map.slot(i);
        let st = s.state.load(Ordering::Acquire);
        // The queue's seq continues across incarnations of a slot, so a
        // waiter from an earlier one never misreads this one's progress.
        let seq = queue::head_seq(s.head.load(Ordering::Acquire));
        // SAFETY: `rec` is a block we allocated and wrote; not yet published.
        let rh = unsafe { self.map.block::<RecordHeader>(rec) };
        debug_assert_eq!(rh.applied_seq, 0);
        self.set_applied(rec, seq);
        s.sid_lo.store(lo, Ordering::Relaxed);
        s.sid_hi.store(hi, Ordering::Relaxed);
        s.record.store(self.rec_word(rec), Ordering::Relaxed);
        s.head.store(queue::head(seq, EMPTY), Ordering::Relaxed);
        s.access_s.store(0, Ordering::Relaxed);
        s.acked[0].store(0, Ordering::Relaxed);
        s.acked[1].store(0, Ordering::Relaxed);
        // The commit point: one store makes the slot live.
        s.state
            .store(((st >> 2) + 1) << 2 | SLOT_LIVE, Ordering::Release);
        h.live.fetch_add(1, Ordering::AcqRel);
        self.mark_dirty(i);
        Ok(Ok(i))
    }

    /// The record word for the unpublished record block `off`: its block
    /// index and the archive's length, so a reader can fetch every line of
    /// the record at once instead of one dependent miss after another.
    fn rec_word(&self, off: u64) -> u64 {
        debug_assert!(self.map.is_block(off) && u32::try_from(off / BLOCK).is_ok());
        // SAFETY: `off` is a block (asserted in debug; callers pass blocks
        // they allocated).
        let len = unsafe { self.map.block::<RecordHeader>(off) }.len;
        (u64::from(len) << 32) | (off / BLOCK)
    }

    fn set_applied(&self, rec: u64, seq: u32) {
        // SAFETY: `rec` is unpublished and ours: no reader sees it yet.
        unsafe {
            let p = self.map.base().add(rec as usize).cast::<RecordHeader>();
            (*p).applied_seq = seq;
        }
    }

    fn mark_dirty(&self, slot: u64) {
        self.map
            .dirty_word(slot / 64)
            .fetch_or(1 << (slot % 64), Ordering::SeqCst);
    }

    // ----- records ----------------------------------------------------

    /// Writes a record block; returns its offset.
    fn write_record(
        &self,
        sid: Sid,
        data: &SessionData,
        version: u64,
        epoch: u64,
    ) -> Result<u64, SessionError> {
        self.write_record_tracked(sid, data, version, epoch, None)
    }

    /// Writes a record block; with `track = Some((slot, replaced))` the
    /// block is recorded in our participant slot as "being built" right
    /// after it is allocated (see `resolve_dead_build`).
    fn write_record_tracked(
        &self,
        sid: Sid,
        data: &SessionData,
        version: u64,
        epoch: u64,
        track: Option<(u64, u64)>,
    ) -> Result<u64, SessionError> {
        // One serialization buffer per handle, reused: no allocation per
        // record once it has grown to the largest record seen.
        let mut buf = std::mem::take(&mut *self.ser.borrow_mut());
        buf.clear();
        let buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(data, buf)
            .expect("serializing a session into memory");
        let r = self.write_record_bytes(sid, &buf, version, epoch, track);
        *self.ser.borrow_mut() = buf;
        r
    }

    fn write_record_bytes(
        &self,
        sid: Sid,
        bytes: &[u8],
        version: u64,
        epoch: u64,
        track: Option<(u64, u64)>,
    ) -> Result<u64, SessionError> {
        let len = bytes.len() as u64;
        let off = self.alloc(BLOCK + len)?;
        if let Some((slot, replaced)) = track {
            let p = self.participant();
            p.building_slot.store(slot, Ordering::Relaxed);
            p.building_old.store(replaced, Ordering::Relaxed);
            p.building.store(off, Ordering::Release);
        }
        let (lo, hi) = sid.words();
        let checksum = xxhash_rust::xxh3::xxh3_64(bytes);
        // SAFETY: `off` was just allocated: no one else reads or writes it
        // (a stale free-list popper touches only `link`, which we skip).
        unsafe {
            self.map.write_heap(off + BLOCK, bytes);
            let p = self.map.base().add(off as usize).cast::<RecordHeader>();
            (*p).magic = RECORD_MAGIC;
            (*p).len = len as u32;
            (*p).checksum = checksum;
            (*p).version = version;
            (*p).epoch = epoch;
            (*p).sid = [lo, hi];
            (*p).applied_seq = 0;
            (*p).reserved = 0;
        }
        // Paired assertion: what we publish is what we meant to write.
        debug_assert!(self.record_valid(off, sid));
        Ok(off)
    }

    /// Full validation of a record block (recovery, debug assertions).
    fn record_valid(&self, off: u64, sid: Sid) -> bool {
        if !self.map.is_block(off) {
            return false;
        }
        let class = self.class_of(off);
        if class >= self.map.geo.classes.len() {
            return false;
        }
        // SAFETY: `off` is a block (checked above).
        let rh = unsafe { self.map.block::<RecordHeader>(off) };
        let (lo, hi) = sid.words();
        if rh.magic != RECORD_MAGIC
            || rh.sid != [lo, hi]
            || BLOCK + u64::from(rh.len) > self.map.geo.classes[class]
        {
            return false;
        }
        let Some(bytes) = self.map.heap_bytes(off + BLOCK, u64::from(rh.len)) else {
            return false;
        };
        xxhash_rust::xxh3::xxh3_64(bytes) == rh.checksum
            && rkyv::access::<ArchivedSessionData, rkyv::rancor::Error>(bytes).is_ok()
    }

    /// Asks for the cache lines of a record a read needs, all at once: the
    /// header, and the tail where the archive's root and the attribute array
    /// sit (`SessionData` declares `attrs` last). One miss in parallel
    /// instead of a chain of dependent ones; only the value itself is left.
    #[inline]
    fn prefetch(&self, off: u64, len: u64) {
        #[cfg(target_arch = "x86_64")]
        if self.map.heap_bytes(off, len).is_some() {
            let fetch = |line: u64| {
                // SAFETY: `line` lies inside the mapping (the whole range was
                // checked above); a prefetch never faults or writes.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        self.map.base().add(line as usize).cast::<i8>(),
                    );
                }
            };
            let end = (off + len).next_multiple_of(BLOCK);
            fetch(off);
            let tail = end
                .saturating_sub(PREFETCH_TAIL_LINES * BLOCK)
                .max(off + BLOCK);
            let mut line = tail;
            while line < end {
                fetch(line);
                line += BLOCK;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, len);
    }

    /// The header and archive of a published record.
    fn record_at(&self, off: u64) -> Result<(&RecordHeader, &[u8]), SessionError> {
        if !self.map.is_block(off) {
            return Err(SessionError::Corrupt("record offset outside the heap"));
        }
        // SAFETY: `off` is a block; it was published by a combiner or an
        // insert with Release, and we loaded it with Acquire while pinned.
        let rh = unsafe { self.map.block::<RecordHeader>(off) };
        let bytes = self
            .map
            .heap_bytes(off + BLOCK, u64::from(rh.len))
            .ok_or(SessionError::Corrupt("record length outside the heap"))?;
        if rh.magic != RECORD_MAGIC {
            return Err(SessionError::Corrupt("bad record magic"));
        }
        Ok((rh, bytes))
    }

    fn archived(bytes: &[u8]) -> &ArchivedSessionData {
        // SAFETY: only records this engine wrote and published are read
        // here (untrusted snapshots are validated in `install`), the
        // archive is 64-byte aligned (block start + 64), and its checksum
        // was asserted when written.
        unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) }
    }

    fn now_s(&self, now_ms: u64) -> u32 {
        (now_ms.saturating_sub(self.header().created_ms) / 1000) as u32
    }

    fn last_read_ms(&self, s: &IndexSlot) -> u64 {
        let a = s.access_s.load(Ordering::Relaxed);
        if a == 0 {
            0
        } else {
            self.header().created_ms + u64::from(a) * 1000
        }
    }

    // ----- the API ----------------------------------------------------

    /// Creates a session with a fresh random SID.
    pub fn create(&self, opts: NewSession, attrs: &[(&str, &[u8])]) -> Result<Sid, SessionError> {
        let now = crate::clock::now_ms();
        let mut data = SessionData {
            created_ms: now,
            updated_ms: now,
            idle_ttl_ms: opts.idle_ttl_ms,
            expires_at_ms: if opts.lifetime_ms == 0 {
                0
            } else {
                now + opts.lifetime_ms
            },
            ..SessionData::default()
        };
        let ops: Vec<Op> = attrs
            .iter()
            .map(|(k, v)| Op::Set {
                key: (*k).to_string(),
                value: v.to_vec(),
            })
            .collect();
        data.apply(&ops, now, self.map.geo.quota_bytes)?;
        self.with_space(|| {
            self.begin_mut();
            let r = self.create_mut(&data);
            self.end_mut();
            r
        })
    }

    fn create_mut(&self, data: &SessionData) -> Result<Sid, SessionError> {
        loop {
            let sid = Sid::random();
            let rec = self.write_record(sid, data, 1, 1)?;
            match self.insert(sid, rec, true) {
                Ok(Ok(_)) => {
                    self.header().created_total.fetch_add(1, Ordering::Relaxed);
                    return Ok(sid);
                }
                // 128 random bits collided: astronomically rare; draw again.
                Ok(Err(_)) => self.free(rec),
                Err(e) => {
                    self.free(rec);
                    return Err(e);
                }
            }
        }
    }

    /// Reads a session: a zero-copy view, valid while the guard lives.
    /// Expired sessions read as `NotFound` (a sweep removes them).
    #[inline]
    pub fn read(&self, sid: Sid) -> Result<ReadGuard<'_>, SessionError> {
        self.pin();
        match self.read_pinned(sid) {
            Ok(g) => Ok(g),
            Err(e) => {
                self.unpin();
                Err(e)
            }
        }
    }

    #[inline]
    fn read_pinned(&self, sid: Sid) -> Result<ReadGuard<'_>, SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        let word = s.record.load(Ordering::Acquire);
        let off = rec_off(word);
        self.prefetch(off, BLOCK + rec_len(word));
        let (header, bytes) = self.record_at(off)?;
        let data = Self::archived(bytes);
        let now = crate::clock::now_ms();
        if data.expired(now, self.last_read_ms(s))
            || queue::is_closed(s.head.load(Ordering::Relaxed))
        {
            return Err(SessionError::NotFound);
        }
        if data.idle_ttl_ms.to_native() != 0 {
            let now_s = self.now_s(now).max(1);
            if s.access_s.load(Ordering::Relaxed) != now_s {
                s.access_s.store(now_s, Ordering::Relaxed);
            }
        }
        Ok(ReadGuard {
            arena: self,
            header,
            bytes,
            data,
        })
    }

    /// Applies `ops` to a session, atomically (all or none) and exactly once,
    /// in the order of this handle's calls. Returns the version the batch
    /// produced. Returns only once the batch is applied.
    pub fn update(&self, sid: Sid, ops: &[Op]) -> Result<u64, SessionError> {
        let encoded = encode_ops(ops);
        self.push_and_wait(sid, &encoded, 0)
    }

    /// Ends a session.
    pub fn invalidate(&self, sid: Sid) -> Result<(), SessionError> {
        self.update(sid, &[Op::Invalidate]).map(|_| ())
    }

    fn push_and_wait(&self, sid: Sid, encoded: &[u8], flags: u64) -> Result<u64, SessionError> {
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

    fn push_and_wait_pinned(
        &self,
        sid: Sid,
        encoded: &[u8],
        flags: u64,
    ) -> Result<u64, SessionError> {
        let (i, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        let node_off = self.alloc(BLOCK + encoded.len() as u64)?;
        let (lo, hi) = sid.words();
        // SAFETY: freshly allocated, not yet pushed: ours alone (stale
        // free-list poppers touch only `link`).
        unsafe {
            self.map.write_heap(node_off + BLOCK, encoded);
            let p = self.map.base().add(node_off as usize).cast::<NodeHeader>();
            (*p).magic = NODE_MAGIC;
            (*p).len = encoded.len() as u32;
            (*p).sid = [lo, hi];
            (*p).checksum = xxhash_rust::xxh3::xxh3_64(encoded);
        }
        // SAFETY: `node_off` is a block.
        let node = unsafe { self.map.block::<NodeHeader>(node_off) };
        node.result.store(PENDING, Ordering::Relaxed);
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
    fn outcome(
        &self,
        s: &IndexSlot,
        node: &NodeHeader,
        seq: u32,
    ) -> Option<Result<u64, SessionError>> {
        let result = node.result.load(Ordering::Acquire);
        if result == CANCELLED_HEAP_FULL {
            return Some(Err(SessionError::HeapFull(self.map.geo.chunk_bytes)));
        }
        let h = s.head.load(Ordering::Acquire);
        let done = if queue::is_closed(h) && !queue::seq_after(seq, queue::head_seq(h)) {
            result != PENDING
        } else {
            let off = rec_off(s.record.load(Ordering::Acquire));
            // SAFETY: published offsets are blocks (checked in debug); we are pinned.
            let applied = self.map.is_block(off) && {
                // SAFETY: `off` was just checked to be a block.
                let rh = unsafe { self.map.block::<RecordHeader>(off) };
                !queue::seq_after(seq, rh.applied_seq)
            };
            applied && result != PENDING
        };
        if !done {
            return None;
        }
        Some(match result {
            DONE => Ok(node.detail.load(Ordering::Relaxed)),
            GONE => Err(SessionError::NotFound),
            code => Err(SessionError::Op(match code {
                1 => OpError::BadKey,
                2 => OpError::TooManyAttrs,
                3 => OpError::NotACounter,
                4 => OpError::NotAList,
                _ => OpError::OverQuota {
                    needed: node.detail.load(Ordering::Relaxed),
                    quota: self.map.geo.quota_bytes,
                },
            })),
        })
    }

    /// Applies every queued batch of slot `i`. The caller holds its lock.
    fn combine(&self, i: u64) -> Result<(), SessionError> {
        let s = self.map.slot(i);
        let nodes = HeapNodes(&self.map);
        let w = s.head.load(Ordering::Acquire);
        if s.state.load(Ordering::Acquire) & SLOT_KIND_MASK != SLOT_LIVE {
            return Ok(());
        }
        if queue::is_closed(w) {
            self.finish_remove(i, w);
            return Ok(());
        }
        let rec_off = rec_off(s.record.load(Ordering::Acquire));
        let (rh, bytes) = self.record_at(rec_off)?;
        let applied = rh.applied_seq;
        if queue::head_seq(w) == applied {
            return Ok(());
        }
        let mut list = self.scratch.borrow_mut();
        if queue::pending(w, applied, &nodes, &mut list, COMBINE_BATCH_MAX).is_err() {
            return Err(SessionError::Corrupt("update queue chain is broken"));
        }
        let sid = Sid::from_words(
            s.sid_lo.load(Ordering::Relaxed),
            s.sid_hi.load(Ordering::Relaxed),
        );
        let (lo, hi) = sid.words();
        let mut data: SessionData =
            rkyv::deserialize::<SessionData, rkyv::rancor::Error>(Self::archived(bytes))
                .map_err(|_| SessionError::Corrupt("record does not deserialize"))?;
        let mut version = rh.version;
        let now = crate::clock::now_ms();
        let quota = self.map.geo.quota_bytes;
        let mut removed = false;
        let mut last = applied;
        for &n in list.iter() {
            let node = nodes.node(n);
            last = node.seq.load(Ordering::Relaxed);
            if node.result.load(Ordering::Acquire) == CANCELLED_HEAP_FULL {
                continue;
            }
            if removed || node.sid != [lo, hi] || node.magic != NODE_MAGIC {
                node.result.store(GONE, Ordering::Relaxed);
                continue;
            }
            let off = u64::from(n) * BLOCK;
            let Some(op_bytes) = self.map.heap_bytes(off + BLOCK, u64::from(node.len)) else {
                node.result.store(GONE, Ordering::Relaxed);
                continue;
            };
            let flags = node.detail.load(Ordering::Relaxed);
            let outcome = if flags & EXPIRE_ONLY != 0 {
                // The sweep's clock decides, so a sweep is reproducible; a
                // session found alive is left exactly as it is.
                let sweep_now = flags & !EXPIRE_ONLY;
                if !data.expired(sweep_now, self.last_read_ms(s)) {
                    node.detail.store(version, Ordering::Relaxed);
                    node.result.store(DONE, Ordering::Release);
                    continue;
                }
                Ok(crate::session::Applied::Invalidated)
            } else {
                if xxhash_rust::xxh3::xxh3_64(op_bytes) != node.checksum {
                    node.result.store(GONE, Ordering::Relaxed);
                    continue;
                }
                // SAFETY: the batch was encoded by `update` in a process of
                // this engine, written before its push, checksummed (checked
                // just above), and lies 64-byte aligned in the heap.
                let batch = unsafe {
                    rkyv::access_unchecked::<rkyv::vec::ArchivedVec<ArchivedOp>>(op_bytes)
                };
                data.apply_refs(batch.iter().map(ArchivedOp::as_ref), now, quota)
            };
            match outcome {
                Ok(crate::session::Applied::Changed) => {
                    version += 1;
                    data.log_batch(version, op_bytes);
                    node.detail.store(version, Ordering::Relaxed);
                    node.result.store(DONE, Ordering::Release);
                }
                Ok(crate::session::Applied::Invalidated) => {
                    node.detail.store(version, Ordering::Relaxed);
                    node.result.store(DONE, Ordering::Release);
                    if flags & EXPIRE_ONLY != 0 {
                        self.header().expired_total.fetch_add(1, Ordering::Relaxed);
                    }
                    removed = true;
                }
                Err(e) => {
                    if let OpError::OverQuota { needed, .. } = e {
                        node.detail.store(needed, Ordering::Relaxed);
                    }
                    node.result.store(e.code(), Ordering::Release);
                }
            }
        }
        if removed {
            let closed = queue::close(&s.head);
            drop(list);
            self.finish_remove(i, closed);
            return Ok(());
        }
        let new_off =
            match self.write_record_tracked(sid, &data, version, rh.epoch, Some((i, rec_off))) {
                Ok(off) => off,
                Err(SessionError::HeapFull(_) | SessionError::TooLarge(_)) => {
                    // No room for the new copy: cancel the batch (a final result
                    // every later combiner respects) and leave the record as is.
                    for &n in list.iter() {
                        nodes
                            .node(n)
                            .result
                            .store(CANCELLED_HEAP_FULL, Ordering::Release);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
        self.set_applied(new_off, last);
        self.mark_dirty(i);
        // The commit point: one store publishes the new copy and, with its
        // applied_seq, consumes every node up to `last`.
        s.record.store(self.rec_word(new_off), Ordering::Release);
        self.mark_dirty(i);
        drop(list);
        debug_assert_eq!(last, queue::head_seq(w));
        // The replaced record and the applied nodes leave together: the
        // nodes are detached, chained behind the record, and the chain goes
        // into the ring with one store, right after the store that makes the
        // replaced record no longer the business of whoever would resolve a
        // death of ours.
        let dead = queue::detach(&s.head, w, &nodes);
        let chain_last = self.link_queue_chain(rec_off, dead);
        self.participant().building.store(0, Ordering::Release);
        self.retire_linked(rec_off, chain_last);
        Ok(())
    }

    /// Links the record `first` and the detached queue chain from node `n`
    /// (through `next`) into one retire chain (through `link`); returns its
    /// last block.
    fn link_queue_chain(&self, first: u64, mut n: u32) -> u64 {
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
    fn finish_remove(&self, i: u64, closed: u64) {
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
            if node.result.load(Ordering::Acquire) == PENDING {
                node.result.store(GONE, Ordering::Release);
            }
            n = nodes.next(n);
            expect = expect.wrapping_sub(1);
            walked += 1;
        }
        {
            let _g = self.insert_lock();
            let st = s.state.load(Ordering::Acquire);
            if st & SLOT_KIND_MASK != SLOT_LIVE {
                return;
            }
            // The commit point of a removal: one store makes it a tombstone.
            s.state
                .store(((st >> 2) + 1) << 2 | SLOT_TOMB, Ordering::Release);
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

    /// Turns the tombstone run ending at `i` into empty slots when the slot
    /// after it is empty: no probe chain passes through them any more.
    /// Called under the insert lock.
    fn prune_tombstones(&self, i: u64) {
        let mask = self.map.geo.index_slots - 1;
        let next = self.map.slot((i + 1) & mask);
        if next.state.load(Ordering::Acquire) & SLOT_KIND_MASK != SLOT_EMPTY {
            return;
        }
        let mut j = i;
        for _ in 0..=mask {
            let s = self.map.slot(j);
            let st = s.state.load(Ordering::Acquire);
            if st & SLOT_KIND_MASK != SLOT_TOMB {
                break;
            }
            s.state
                .store(((st >> 2) + 1) << 2 | SLOT_EMPTY, Ordering::Release);
            j = j.wrapping_sub(1) & mask;
        }
    }

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
            if s.state.load(Ordering::Acquire) & SLOT_KIND_MASK != SLOT_LIVE {
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
                let r = self.push_and_wait(
                    sid,
                    &encode_ops(&[Op::Touch]),
                    EXPIRE_ONLY | (now_ms & !EXPIRE_ONLY),
                );
                if r.is_ok() && self.header().expired_total.load(Ordering::Relaxed) > before {
                    stats.expired += 1;
                }
            }
        }
        self.sweep_cursor.set(cur % slots);
        stats
    }

    /// Installs a session fetched from a replica (failover) with its version
    /// and ownership epoch. The snapshot is validated first. An existing copy
    /// is replaced only by a newer epoch, or the same epoch and a newer
    /// version. Returns the installed version.
    pub fn install(
        &self,
        sid: Sid,
        snapshot: &[u8],
        version: u64,
        epoch: u64,
    ) -> Result<u64, SessionError> {
        let data = crate::session::decode_session(snapshot)
            .map_err(|e| SessionError::BadSnapshot(e.to_string()))?;
        if data.attr_bytes() > self.map.geo.quota_bytes {
            return Err(OpError::OverQuota {
                needed: data.attr_bytes(),
                quota: self.map.geo.quota_bytes,
            }
            .into());
        }
        self.with_space(|| {
            self.begin_mut();
            // Re-encode: what we publish is always our own archive.
            let r = self
                .write_record(sid, &data, version, epoch)
                .and_then(|rec| {
                    let r = self.install_pinned(sid, rec, version, epoch);
                    if r.is_err() {
                        self.free(rec);
                    }
                    r
                });
            self.end_mut();
            r
        })
    }

    fn install_pinned(
        &self,
        sid: Sid,
        rec: u64,
        version: u64,
        epoch: u64,
    ) -> Result<u64, SessionError> {
        let Err(i) = self.insert(sid, rec, false)? else {
            return Ok(version);
        };
        let s = self.map.slot(i);
        if let Some(dead) = self.acquire(&s.lock) {
            self.resolve_dead_build(dead, i);
        }
        let r = (|| {
            if s.state.load(Ordering::Acquire) & SLOT_KIND_MASK != SLOT_LIVE
                || queue::is_closed(s.head.load(Ordering::Acquire))
            {
                return Err(SessionError::NotFound);
            }
            let old = rec_off(s.record.load(Ordering::Acquire));
            let (rh, _) = self.record_at(old)?;
            if epoch < rh.epoch || (epoch == rh.epoch && version <= rh.version) {
                return Err(SessionError::StaleEpoch {
                    offered: epoch,
                    held: rh.epoch,
                });
            }
            // Queued batches stay queued and apply on top of the new copy.
            self.set_applied(rec, rh.applied_seq);
            s.record.store(self.rec_word(rec), Ordering::Release);
            if epoch != rh.epoch {
                // Acks were for copies under the old owner.
                s.acked[0].store(0, Ordering::Release);
                s.acked[1].store(0, Ordering::Release);
            }
            self.mark_dirty(i);
            self.retire(old);
            Ok(version)
        })();
        lock::unlock(&s.lock, self.owner);
        r
    }

    /// Collects up to `max` sessions changed since they were last taken,
    /// skipping (and keeping marked) those whose queue is not drained yet;
    /// queues left behind by a dead process are applied here.
    pub fn take_dirty(&self, max: usize, out: &mut Vec<Dirty>) {
        out.clear();
        let words = self.map.geo.index_slots / 64;
        let mut w = self.dirty_cursor.get() % words;
        for _ in 0..words {
            if out.len() >= max {
                break;
            }
            let bits = self.map.dirty_word(w).swap(0, Ordering::SeqCst);
            let mut rest = bits;
            while rest != 0 {
                let b = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let i = w * 64 + b;
                if out.len() >= max {
                    self.mark_dirty(i);
                    continue;
                }
                match self.dirty_entry(i) {
                    Some(d) => out.push(d),
                    None => self.mark_dirty(i),
                }
            }
            if out.len() < max {
                w = (w + 1) % words;
            }
        }
        self.dirty_cursor.set(w);
    }

    fn dirty_entry(&self, i: u64) -> Option<Dirty> {
        let s = self.map.slot(i);
        let st = s.state.load(Ordering::Acquire);
        let sid = Sid::from_words(
            s.sid_lo.load(Ordering::Relaxed),
            s.sid_hi.load(Ordering::Relaxed),
        );
        match st & SLOT_KIND_MASK {
            SLOT_LIVE => {}
            SLOT_TOMB | SLOT_EMPTY if st != 0 => return Some(Dirty::Removed { sid }),
            _ => return None,
        }
        let h = s.head.load(Ordering::Acquire);
        self.pin();
        let applied = self
            .record_at(rec_off(s.record.load(Ordering::Acquire)))
            .map(|(rh, _)| rh.applied_seq);
        self.unpin();
        if applied.ok()? != queue::head_seq(h) {
            // Not drained. A batch whose pusher died is applied by whoever
            // finds the lock free (or held by the dead).
            self.help(i);
            return None;
        }
        self.pin();
        let entry = self
            .record_at(rec_off(s.record.load(Ordering::Acquire)))
            .ok()
            .map(|(rh, _)| Dirty::Changed {
                sid,
                version: rh.version,
                epoch: rh.epoch,
                acked: [
                    unpack_ack(s.acked[0].load(Ordering::Acquire)),
                    unpack_ack(s.acked[1].load(Ordering::Acquire)),
                ],
            });
        self.unpin();
        entry
    }

    /// Called with slot `i`'s lock just taken from the dead owner `dead`:
    /// finishes what its combine left. A record block it built but never
    /// published is freed; if it published it, the record it replaced is
    /// retired (the dead handle had not yet). The swap makes sure only one
    /// resolver acts, and only lock holders of slot `i` resolve.
    fn resolve_dead_build(&self, dead: u32, i: u64) {
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
    fn help(&self, i: u64) {
        self.begin_mut();
        self.help_mut(i);
        self.end_mut();
    }

    fn help_mut(&self, i: u64) {
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

    /// What to ship to a replica that holds `base`: the op batches since
    /// then, or the whole record when the log no longer reaches back.
    pub fn delta_since(&self, sid: Sid, base: u64) -> Result<Delta, SessionError> {
        let g = self.read_any(sid)?;
        let version = g.version();
        let epoch = g.epoch();
        if base == version {
            return Ok(Delta::UpToDate);
        }
        let log = g.data().log.as_slice();
        if base != 0 && base < version {
            let first = log.iter().position(|e| e.version.to_native() == base + 1);
            if let Some(first) = first
                && log.len() - first == (version - base) as usize
            {
                let batches = log[first..]
                    .iter()
                    .map(|e| e.ops.as_slice().to_vec())
                    .collect();
                return Ok(Delta::Ops {
                    version,
                    epoch,
                    batches,
                });
            }
        }
        Ok(Delta::Full {
            version,
            epoch,
            bytes: g.bytes().to_vec(),
        })
    }

    /// Reads a session even if it has expired (the replicator's view).
    fn read_any(&self, sid: Sid) -> Result<ReadGuard<'_>, SessionError> {
        self.pin();
        let r = (|| {
            let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
            let (header, bytes) = self.record_at(rec_off(s.record.load(Ordering::Acquire)))?;
            Ok(ReadGuard {
                arena: self,
                header,
                bytes,
                data: Self::archived(bytes),
            })
        })();
        if r.is_err() {
            self.unpin();
        }
        r
    }

    /// Records that replica `node` holds `version` of `sid`. Two replicas per
    /// session are remembered in the arena; a third replaces the one with
    /// the oldest ack. Acks only move forward.
    pub fn mark_acked(&self, sid: Sid, node: u16, version: u64) -> Result<(), SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        let new = pack_ack(node, version);
        let (a, b) = (&s.acked[0], &s.acked[1]);
        // Whether the first of the two ack words is the one to write.
        let first = |x: u64, y: u64| {
            let (xn, xv) = unpack_ack(x);
            let (yn, yv) = unpack_ack(y);
            if x != 0 && xn == node {
                true
            } else if y != 0 && yn == node {
                false
            } else {
                x == 0 || (y != 0 && xv <= yv)
            }
        };
        loop {
            let (x, y) = (a.load(Ordering::Acquire), b.load(Ordering::Acquire));
            let (slot, cur) = if first(x, y) { (a, x) } else { (b, y) };
            let (cn, cv) = unpack_ack(cur);
            if cur != 0 && cn == node && cv >= version {
                return Ok(());
            }
            if slot
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Forgets replica `node`'s ack of `sid` (it dropped its copy).
    pub fn forget_ack(&self, sid: Sid, node: u16) -> Result<(), SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        for w in &s.acked {
            let cur = w.load(Ordering::Acquire);
            if cur != 0 && unpack_ack(cur).0 == node {
                let _ = w.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The acks recorded for `sid` as `(node, version)`; `(0, 0)` = none.
    pub fn acked(&self, sid: Sid) -> Result<[(u16, u64); 2], SessionError> {
        let (_, s) = self.lookup(sid).ok_or(SessionError::NotFound)?;
        Ok([
            unpack_ack(s.acked[0].load(Ordering::Acquire)),
            unpack_ack(s.acked[1].load(Ordering::Acquire)),
        ])
    }

    /// The incarnation recorded for replica `node` by
    /// [`set_replica_incarnation`](Self::set_replica_incarnation), if any.
    /// While it matches what the node announces, the acks recorded for the
    /// node ([`acked`](Self::acked)) still describe copies the node holds.
    pub fn replica_incarnation(&self, node: u16) -> Option<u64> {
        let want = u64::from(node) + 1;
        self.header()
            .replicas
            .iter()
            .find(|e| e.node.load(Ordering::Acquire) == want)
            .map(|e| e.incarnation.load(Ordering::Acquire))
            .filter(|&i| i != 0)
    }

    /// Records replica `node`'s incarnation (nonzero). The caller first
    /// forgets the node's acks from any other incarnation
    /// ([`forget_acks`](Self::forget_acks)). Returns false when the table
    /// (`Arena::REPLICAS_MAX` nodes) is full: the node's acks are then not
    /// to be trusted after a restart of the caller.
    pub fn set_replica_incarnation(&self, node: u16, incarnation: u64) -> bool {
        let want = u64::from(node) + 1;
        for e in &self.header().replicas {
            let cur = e.node.load(Ordering::Acquire);
            let claimed = cur == want
                || (cur == 0
                    && match e
                        .node
                        .compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => true,
                        Err(other) => other == want,
                    });
            if claimed {
                e.incarnation.store(incarnation, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Clears every ack recorded for replica `node` (a full scan of the
    /// index), because the node restarted and lost its copies; returns how
    /// many were cleared.
    pub fn forget_acks(&self, node: u16) -> u64 {
        let mut cleared = 0;
        for i in 0..self.map.geo.index_slots {
            for w in &self.map.slot(i).acked {
                let cur = w.load(Ordering::Acquire);
                if cur != 0
                    && unpack_ack(cur).0 == node
                    && w.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    cleared += 1;
                }
            }
        }
        cleared
    }

    /// Marks every live session dirty, so the replicator ships them all
    /// (after a replica comes back empty, or a replicator starts fresh).
    pub fn mark_all_dirty(&self) {
        for i in 0..self.map.geo.index_slots {
            if self.map.slot(i).state.load(Ordering::Acquire) & SLOT_KIND_MASK == SLOT_LIVE {
                self.mark_dirty(i);
            }
        }
    }

    /// Every live session's SID (a full scan; for tools and tests).
    pub fn sids(&self) -> Vec<Sid> {
        (0..self.map.geo.index_slots)
            .map(|i| self.map.slot(i))
            .filter(|s| s.state.load(Ordering::Acquire) & SLOT_KIND_MASK == SLOT_LIVE)
            .map(|s| {
                Sid::from_words(
                    s.sid_lo.load(Ordering::Relaxed),
                    s.sid_hi.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Arena-wide counters.
    pub fn stats(&self) -> ArenaStats {
        let h = self.header();
        let hwm = h
            .participants_hwm
            .load(Ordering::Acquire)
            .min(PARTICIPANTS_MAX);
        ArenaStats {
            live: h.live.load(Ordering::Relaxed),
            capacity: self.map.geo.capacity,
            created_total: h.created_total.load(Ordering::Relaxed),
            expired_total: h.expired_total.load(Ordering::Relaxed),
            chunks_used: h.chunk_top.load(Ordering::Relaxed),
            chunks: self.map.geo.chunks,
            chunk_bytes: self.map.geo.chunk_bytes,
            mapped_bytes: self.map.geo.total_bytes,
            handles: (0..hwm)
                .filter(|&i| i == self.me || self.participant_live(i))
                .count() as u32,
            recoveries: h.recoveries.load(Ordering::Relaxed),
            collections: h.collector.collections.load(Ordering::Relaxed),
            leaked_blocks_returned: h.collector.leaked_blocks.load(Ordering::Relaxed),
            chunks_returned: h.collector.returned_chunks.load(Ordering::Relaxed),
            suspects: h.collector.suspects.load(Ordering::Relaxed),
            last_collect_pause_us: h.collector.last_pause_us.load(Ordering::Relaxed),
        }
    }

    /// Applies the queues of every session (after recovery).
    fn apply_all_pending(&mut self) {
        let mut applied = 0;
        for i in 0..self.map.geo.index_slots {
            let s = self.map.slot(i);
            if s.state.load(Ordering::Acquire) & SLOT_KIND_MASK != SLOT_LIVE {
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
    fn recover(&mut self) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let geo = self.map.geo.clone();
        let h = self.header();
        let blocks = geo.heap_bytes / BLOCK;
        // Blocks accounted for without being reachable: free or retired.
        // What is neither, nor reachable, was leaked by a crash.
        let mut accounted = vec![0u64; blocks.div_ceil(64) as usize];
        let note = |bits: &mut Vec<u64>, off: u64| {
            if self.map.is_block(off) {
                let b = (off - geo.heap_off) / BLOCK;
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        };
        for class in 0..geo.classes.len() {
            // Blocks of the carving chunk not carved yet were never used.
            let carve = h.class_carve[class].load(Ordering::Relaxed);
            if carve >> 32 != 0 && (carve >> 32) - 1 < geo.chunks {
                let size = geo.classes[class];
                let start = geo.heap_off + ((carve >> 32) - 1) * geo.chunk_bytes;
                for k in (carve & 0xffff_ffff)..geo.chunk_bytes / size {
                    note(&mut accounted, start + k * size);
                }
            }
            let mut idx = h.class_free[class].load(Ordering::Relaxed) & IDX_MASK;
            let mut guard = blocks;
            while idx != 0 && guard > 0 {
                let off = self.block_off(idx);
                if !self.map.is_block(off) {
                    break;
                }
                note(&mut accounted, off);
                idx = self.link(off).load(Ordering::Relaxed) & IDX_MASK;
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
        let mut reachable = vec![0u64; blocks.div_ceil(64) as usize];
        let mark = |reachable: &mut Vec<u64>, off: u64| {
            let b = (off - geo.heap_off) / BLOCK;
            reachable[(b / 64) as usize] |= 1 << (b % 64);
        };
        let nodes = HeapNodes(&self.map);
        let mut live = 0u64;
        let mut chain = Vec::new();
        for i in 0..geo.index_slots {
            let s = self.map.slot(i);
            s.lock.store(0, Ordering::Relaxed);
            let st = s.state.load(Ordering::Relaxed);
            if st & SLOT_KIND_MASK != SLOT_LIVE {
                continue;
            }
            let sid = Sid::from_words(
                s.sid_lo.load(Ordering::Relaxed),
                s.sid_hi.load(Ordering::Relaxed),
            );
            let rec = rec_off(s.record.load(Ordering::Relaxed));
            if !self.record_valid(rec, sid) {
                report.corrupt_records += 1;
                s.state
                    .store(((st >> 2) + 1) << 2 | SLOT_TOMB, Ordering::Relaxed);
                continue;
            }
            // SAFETY: validated just above.
            let applied = unsafe { self.map.block::<RecordHeader>(rec) }.applied_seq;
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
                // SAFETY: `plausible` checks bounds before the header is read.
                let ok = nodes.plausible(n)
                    && unsafe { self.map.block::<NodeHeader>(off) }.magic == NODE_MAGIC
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
                mark(&mut reachable, u64::from(n) * BLOCK);
            }
            mark(&mut reachable, rec);
            live += 1;
            if queue::is_closed(s.head.load(Ordering::Relaxed)) {
                report.finished_removals += 1;
            }
        }
        // Rebuild the allocator from reachability.
        for c in 0..geo.classes.len() {
            h.class_free[c].store(0, Ordering::Relaxed);
            h.class_carve[c].store(0, Ordering::Relaxed);
        }
        h.chunk_free.store(0, Ordering::Relaxed);
        let top = h.chunk_top.load(Ordering::Relaxed).min(geo.chunks);
        for c in (0..top).rev() {
            let class = self.map.chunk_class(c).load(Ordering::Relaxed) as usize;
            let start = geo.heap_off + c * geo.chunk_bytes;
            let any = |lo: u64, hi: u64| {
                (lo..hi).step_by(BLOCK as usize).any(|off| {
                    let b = (off - geo.heap_off) / BLOCK;
                    reachable[(b / 64) as usize] & (1 << (b % 64)) != 0
                })
            };
            let bit = |bits: &Vec<u64>, off: u64| {
                let b = (off - geo.heap_off) / BLOCK;
                bits[(b / 64) as usize] & (1 << (b % 64)) != 0
            };
            if class < geo.classes.len() {
                let size = geo.classes[class];
                report.leaked_blocks += (0..geo.chunk_bytes / size)
                    .map(|k| start + k * size)
                    .filter(|&off| !bit(&reachable, off) && !bit(&accounted, off))
                    .count() as u64;
            }
            if class >= geo.classes.len() || !any(start, start + geo.chunk_bytes) {
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
                let b = (off - geo.heap_off) / BLOCK;
                if reachable[(b / 64) as usize] & (1 << (b % 64)) == 0 {
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
    (word & 0xffff_ffff) * BLOCK
}

/// The archive length in a slot's record word.
#[inline]
fn rec_len(word: u64) -> u64 {
    word >> 32
}

fn pack_ack(node: u16, version: u64) -> u64 {
    (u64::from(node) << 48) | (version & ((1 << 48) - 1))
}

fn unpack_ack(w: u64) -> (u16, u64) {
    ((w >> 48) as u16, w & ((1 << 48) - 1))
}

struct InsertLock<'a>(&'a Arena);

impl Drop for InsertLock<'_> {
    fn drop(&mut self) {
        lock::unlock(&self.0.header().insert_lock, self.0.owner);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        debug_assert_eq!(self.pins.get(), 0, "a ReadGuard outlived its arena handle");
        self.begin_mut();
        self.reclaim(true);
        self.leave_mut(false);
        // Blocks still pinned by others stay in our ring; whoever claims
        // this slot next inherits them.
        self.participant().pin.store(0, Ordering::SeqCst);
    }
}
