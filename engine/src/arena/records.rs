//! Records: writing a record block, validating one, reading a published one
//! (prefetch, zero-copy view), and the API calls that create, read and
//! install whole sessions.

use super::{Arena, NewSession, PREFETCH_TAIL_LINES, PinnedScope, ReadGuard, rec_len, rec_off};
use crate::error::SessionError;
use crate::layout::{BLOCK, IndexSlot, RECORD_MAGIC, RecordHeader};
use crate::lock;
use crate::queue;
use crate::session::{ArchivedSessionData, Op, OpError, SessionData};
use crate::sid::Sid;
use crate::sync::Ordering;
use crate::words::{SLOT_LIVE, slot_kind};

/// What a record archives from: a [`SessionData`], or a combine's
/// [`SessionDraft`](crate::session::SessionDraft), which archives the same.
pub(super) trait RecordData:
    for<'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'b>,
            rkyv::rancor::Error,
        >,
    > + rkyv::Archive<Archived = ArchivedSessionData>
{
}

impl<T> RecordData for T where
    T: for<'b> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'b>,
                rkyv::rancor::Error,
            >,
        > + rkyv::Archive<Archived = ArchivedSessionData>
{
}

impl Arena {
    /// Writes a record block; returns its offset.
    pub(super) fn write_record(
        &self,
        sid: Sid,
        data: &SessionData,
        version: u64,
        epoch: u64,
    ) -> Result<u64, SessionError> {
        self.write_record_tracked(sid, data, version, epoch, None, 0)
    }

    /// Writes a record block; with `track = Some((slot, replaced))` the
    /// block is recorded in our participant slot as "being built" right
    /// after it is allocated (see `resolve_dead_build`). `log_at` names the
    /// delta log entry of `version` (`arena::deltas`), 0 = none.
    pub(super) fn write_record_tracked(
        &self,
        sid: Sid,
        data: &impl RecordData,
        version: u64,
        epoch: u64,
        track: Option<(u64, u64)>,
        log_at: u32,
    ) -> Result<u64, SessionError> {
        // One serialization buffer per handle, reused: no allocation per
        // record once it has grown to the largest record seen.
        let mut buf = std::mem::take(&mut *self.ser.borrow_mut());
        buf.clear();
        let buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(data, buf)
            .expect("serializing a session into memory");
        let r = self.write_record_bytes(sid, &buf, version, epoch, track, log_at);
        *self.ser.borrow_mut() = buf;
        r
    }

    pub(super) fn write_record_bytes(
        &self,
        sid: Sid,
        bytes: &[u8],
        version: u64,
        epoch: u64,
        track: Option<(u64, u64)>,
        log_at: u32,
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
        // (a stale free-list popper touches only `link`, which we skip);
        // `p` points at its header, in bounds.
        unsafe {
            let p = self
                .map
                .fill_block::<RecordHeader>(off, RECORD_MAGIC, bytes);
            (*p).checksum = checksum;
            (*p).version = version;
            (*p).epoch = epoch;
            (*p).sid = [lo, hi];
            (*p).applied_seq = 0;
            (*p).log_at = log_at;
        }
        // Paired assertion: what we publish is what we meant to write.
        debug_assert!(self.record_valid(off, sid));
        Ok(off)
    }

    /// Full validation of a record block (recovery, debug assertions).
    pub(super) fn record_valid(&self, off: u64, sid: Sid) -> bool {
        let Some(rh) = self.map.block_header::<RecordHeader>(off) else {
            return false;
        };
        let class = self.class_of(off);
        if class >= self.map.geo.classes.len() {
            return false;
        }
        let (lo, hi) = sid.words();
        if rh.start.magic != RECORD_MAGIC
            || rh.sid != [lo, hi]
            || BLOCK + u64::from(rh.start.len) > self.map.geo.classes[class]
        {
            return false;
        }
        let Some(bytes) = self.map.heap_bytes(off + BLOCK, u64::from(rh.start.len)) else {
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
    pub(super) fn prefetch(&self, off: u64, len: u64) {
        self.prefetch_lines(off, len, PREFETCH_TAIL_LINES);
    }

    /// Asks for every cache line of a record, as a combine reads all of it.
    #[inline]
    pub(super) fn prefetch_all(&self, off: u64, len: u64) {
        self.prefetch_lines(off, len, u64::MAX / BLOCK);
    }

    /// Asks for the header of a record and its last `tail` lines.
    #[inline]
    fn prefetch_lines(&self, off: u64, len: u64, tail: u64) {
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
                .saturating_sub(tail.saturating_mul(BLOCK))
                .max(off + BLOCK);
            let mut line = tail;
            while line < end {
                fetch(line);
                line += BLOCK;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, len, tail);
    }

    /// The header and archive of a published record.
    pub(super) fn record_at(&self, off: u64) -> Result<(&RecordHeader, &[u8]), SessionError> {
        // Published by a combiner or an insert with Release, loaded by the
        // caller with Acquire while pinned: complete, and not freed under us.
        let rh = self
            .map
            .block_header::<RecordHeader>(off)
            .ok_or(SessionError::Corrupt("record offset outside the heap"))?;
        let bytes = self
            .map
            .heap_bytes(off + BLOCK, u64::from(rh.start.len))
            .ok_or(SessionError::Corrupt("record length outside the heap"))?;
        if rh.start.magic != RECORD_MAGIC {
            return Err(SessionError::Corrupt("bad record magic"));
        }
        Ok((rh, bytes))
    }

    pub(super) fn archived(bytes: &[u8]) -> &ArchivedSessionData {
        // SAFETY: only records this engine wrote and published are read
        // here (untrusted snapshots are validated in `install`), the
        // archive is 64-byte aligned (block start + 64), and its checksum
        // was asserted when written.
        unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) }
    }

    pub(super) fn now_s(&self, now_ms: u64) -> u32 {
        (now_ms.saturating_sub(self.header().created_ms) / 1000) as u32
    }

    pub(super) fn last_read_ms(&self, s: &IndexSlot) -> u64 {
        let a = s.access_s.load(Ordering::Relaxed);
        if a == 0 {
            0
        } else {
            self.header().created_ms + u64::from(a) * 1000
        }
    }

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
        data.apply(&Op::sets(attrs), now, self.map.geo.quota_bytes)?;
        self.with_space(|| {
            self.begin_mut();
            let r = self.create_mut(&data);
            self.end_mut();
            r
        })
    }

    pub(super) fn create_mut(&self, data: &SessionData) -> Result<Sid, SessionError> {
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
        // Under a pin already (a guard or a `PinnedScope`) this only counts.
        self.pin();
        match self.read_pinned(sid) {
            Ok(g) => Ok(g),
            Err(e) => {
                self.unpin();
                Err(e)
            }
        }
    }

    /// Pins this handle once for several reads: see [`PinnedScope`]. Reads
    /// through the scope, or through the arena while it lives, cost no
    /// fence of their own.
    pub fn pinned(&self) -> PinnedScope<'_> {
        self.pin();
        PinnedScope { arena: self }
    }

    #[inline]
    pub(super) fn read_pinned(&self, sid: Sid) -> Result<ReadGuard<'_>, SessionError> {
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

    /// Reads a session even if it has expired (the replicator's view).
    pub(super) fn read_any(&self, sid: Sid) -> Result<ReadGuard<'_>, SessionError> {
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

    pub(super) fn install_pinned(
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
            if slot_kind(s.state.load(Ordering::Acquire)) != SLOT_LIVE
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
}
