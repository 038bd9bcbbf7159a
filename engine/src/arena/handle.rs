//! The handle itself: opening, attaching a participant slot (and finishing
//! what a dead predecessor in that slot left), cloning, dropping, and the
//! accessors and counters that read the header.

use super::{Arena, ArenaStats, RecoveryReport};
use crate::epoch;
use crate::error::OpenError;
use crate::layout::{Header, PARTICIPANTS_MAX, Participant};
use crate::lock;
use crate::map::{ArenaConfig, Location, Map};
use crate::sync::Ordering;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Arc;

impl Arena {
    /// Replica nodes whose incarnation one arena remembers.
    pub const REPLICAS_MAX: usize = crate::layout::REPLICAS_MAX;

    /// Opens the arena at `loc`, creating it with `cfg` if it does not exist.
    /// An existing arena made with another capacity, heap or quota is
    /// refused ([`OpenError::ConfigMismatch`]); see [`Arena::open_adopting`].
    ///
    /// Every open reserves the arena's bytes on its filesystem before they
    /// are used (creation reserves all of them, so the arena takes its whole
    /// size of `/dev/shm` at once); a filesystem without the room is
    /// [`OpenError::NoSpace`], never a `SIGBUS` later.
    pub fn open(loc: &Location, cfg: &ArenaConfig) -> Result<Arena, OpenError> {
        let map = Map::create_or_open(loc, cfg, false)?;
        Self::attach(Arc::new(map))
    }

    /// Like [`Arena::open`], but an existing arena is adopted as it is,
    /// whatever configuration it was made with (`cfg` only creates).
    pub fn open_adopting(loc: &Location, cfg: &ArenaConfig) -> Result<Arena, OpenError> {
        let map = Map::create_or_open(loc, cfg, true)?;
        Self::attach(Arc::new(map))
    }

    /// Opens an existing arena; never creates one. Like [`Arena::open`], it
    /// refuses a file another user owns, one that grants group or other
    /// access, and a symbolic link ([`OpenError::Untrusted`]).
    pub fn open_existing(loc: &Location) -> Result<Arena, OpenError> {
        let path = Map::existing(loc)?
            .ok_or_else(|| OpenError::NotFound(loc.path().unwrap_or_default()))?;
        let map = Map::open_path(&path)?;
        Self::attach(Arc::new(map))
    }

    /// Opens an existing arena whoever owns it and whatever its mode: for
    /// operator tools that look into another user's arena, and should say
    /// so. Symbolic links and files that are not regular are still refused.
    /// Never use it for an arena a web host serves from.
    pub fn open_foreign(loc: &Location) -> Result<Arena, OpenError> {
        let path = Map::existing(loc)?
            .ok_or_else(|| OpenError::NotFound(loc.path().unwrap_or_default()))?;
        let map = Map::open_foreign(&path)?;
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

    pub(super) fn attach(map: Arc<Map>) -> Result<Arena, OpenError> {
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
            ops_buf: Cell::new(rkyv::util::AlignedVec::new()),
            sweep_cursor: Cell::new(0),
            dirty_cursor: Cell::new(0),
            dirty_sweep: Cell::new(0),
            dirty_scanned: Cell::new(std::time::Instant::now()),
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

    pub(super) fn header(&self) -> &Header {
        self.map.header()
    }

    pub(super) fn participant(&self) -> &Participant {
        self.map.participant(self.me)
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
            index_slots: self.map.geo.index_slots,
            created_total: h.created_total.load(Ordering::Relaxed),
            expired_total: h.expired_total.load(Ordering::Relaxed),
            removals_dropped: h.removals_dropped.load(Ordering::Relaxed),
            evicted_total: h.evicted_total.load(Ordering::Relaxed),
            chunks_touched: h.chunk_top.load(Ordering::Relaxed),
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
}

impl Drop for Arena {
    fn drop(&mut self) {
        debug_assert_eq!(self.pins.get(), 0, "a ReadGuard outlived its arena handle");
        self.resign_sweep();
        self.begin_mut();
        self.reclaim(true);
        self.leave_mut(false);
        // Blocks still pinned by others stay in our ring; whoever claims
        // this slot next inherits them.
        self.participant().pin.store(0, Ordering::SeqCst);
    }
}
