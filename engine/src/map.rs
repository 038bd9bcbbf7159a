//! The arena file: where it lives, how it is created so no process ever sees
//! it half-initialized, how it is mapped and validated, and the byte-range
//! locks that tell the living from the dead.

use crate::error::OpenError;
use crate::layout::{
    BLOCK, BlockHeader, BlockStart, CHUNK_UNASSIGNED, DIRTY_LEVELS, FORMAT_VERSION, Geometry,
    HEADER_BYTES, Header, IndexSlot, MAGIC, PARTICIPANTS_MAX, Participant, dirty_level_offs,
    dirty_level_words,
};
use crate::sync::{AtomicU8, AtomicU64, Ordering};
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where an arena's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A named shared-memory arena, `/dev/shm/sessio-<name>`: gone at reboot.
    Shm(String),
    /// A regular file, kept across restarts of every process (warm restart).
    File(PathBuf),
}

/// Longest arena name.
pub const NAME_BYTES_MAX: usize = 200;

impl Location {
    /// The path of the arena file.
    pub fn path(&self) -> Result<PathBuf, OpenError> {
        match self {
            Location::Shm(name) => {
                let ok = !name.is_empty()
                    && name.len() <= NAME_BYTES_MAX
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    && !name.starts_with('.');
                if !ok {
                    return Err(OpenError::BadName(name.clone()));
                }
                Ok(PathBuf::from(format!("/dev/shm/sessio-{name}")))
            }
            Location::File(p) => Ok(p.clone()),
        }
    }
}

/// Byte where participant locks start (past any real arena's end; locks
/// beyond end-of-file are allowed and never touch data).
const LOCK_BASE: i64 = 1 << 50;
/// The open lock: every handle holds it shared; recovery needs it exclusive.
const OPEN_LOCK: i64 = LOCK_BASE - 1;

fn ofd_lock(file: &File, start: i64, kind: i32, wait: bool) -> io::Result<bool> {
    // SAFETY: `flock` is plain old data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: valid fd, valid pointer to an initialized `flock`.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &raw mut fl) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN | libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Whether some open file description other than `file`'s holds a lock on byte `start`.
fn ofd_locked_by_other(file: &File, start: i64) -> io::Result<bool> {
    // SAFETY: as above.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: valid fd, valid pointer.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &raw mut fl) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

/// One mapping of an arena, shared by every handle of a process.
pub(crate) struct Map {
    raw: MmapRaw,
    pub(crate) geo: Geometry,
    pub(crate) path: PathBuf,
    pub(crate) huge: bool,
    /// A file description used only to query other handles' locks.
    probe: File,
    /// Where each level of the dirty bitmap starts, and its words.
    dirty_levels: [(u64, u64); DIRTY_LEVELS],
}

// SAFETY: the mapping is shared memory accessed only through atomics and
// through bytes published by atomics; `MmapRaw` is a plain pointer+length.
unsafe impl Sync for Map {}
// SAFETY: as above; nothing in `Map` is tied to a thread.
unsafe impl Send for Map {}

/// Options fixed when an arena is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaConfig {
    /// Most live sessions.
    pub capacity: u64,
    /// Bytes of the record heap (records and queued updates).
    pub heap_bytes: u64,
    /// Most attribute bytes one session may hold.
    pub quota_bytes: u64,
    /// Back the arena with 2 MiB pages.
    pub huge_pages: HugePages,
}

/// Whether to back the arena with 2 MiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages.
    Off,
    /// 2 MiB pages from a mounted hugetlbfs with enough reserved pages,
    /// else 4 KiB pages (see `Arena::huge_pages`).
    Try,
    /// 2 MiB pages or an error.
    Require,
}

/// What [`ArenaConfig::for_sessions`] budgets in the heap for one session
/// of `payload_bytes`, term by term; the index slot and the arena's fixed
/// tables come on top ([`ArenaConfig::sizing`]). `docs/OPERATIONS.md`
/// ("Sizing") sets these against measured figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCost {
    /// The session's archived attributes (keys, values and rkyv's few bytes
    /// per attribute), as the caller estimates them.
    pub payload_bytes: u64,
    /// The record block's header (checksum, version, epoch, SID).
    pub record_header_bytes: u64,
    /// Rounding the record up to the heap's 64 B blocks.
    pub rounding_bytes: u64,
    /// A quarter of the rounded record: the size class's rounding (classes
    /// step by 64 B up to 2 KiB, then by about 1/8), the new copy a combine
    /// writes before the old one is reclaimed, and queued op batches.
    pub slack_bytes: u64,
}

impl SessionCost {
    /// The budget of one session whose attributes archive to about
    /// `payload_bytes`.
    pub const fn new(payload_bytes: u64) -> SessionCost {
        let record_header_bytes = crate::layout::BLOCK;
        let record = payload_bytes + record_header_bytes;
        let rounded = record.next_multiple_of(crate::layout::BLOCK);
        SessionCost {
            payload_bytes,
            record_header_bytes,
            rounding_bytes: rounded - record,
            slack_bytes: rounded / 4,
        }
    }

    /// Heap bytes budgeted per session: the sum of the terms.
    pub const fn heap_bytes(&self) -> u64 {
        self.payload_bytes + self.record_header_bytes + self.rounding_bytes + self.slack_bytes
    }
}

/// Heap bytes every config of [`ArenaConfig::for_sessions`] adds, whatever
/// its capacity: room for bursts of queued updates and records in limbo.
pub const HEAP_SLACK_BYTES: u64 = 16 << 20;
/// Least heap budget of [`ArenaConfig::for_sessions`] before that slack.
pub const HEAP_BUDGET_MIN_BYTES: u64 = 8 << 20;

/// Where an arena's mapped bytes go, as laid out for a config
/// ([`ArenaConfig::sizing`]) or read from an open arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Index slots: a multiple of 64 at load factor at most 3/4.
    pub index_slots: u64,
    /// Bytes of the index, 64 B per slot.
    pub index_bytes: u64,
    /// Bytes of the record heap (whole chunks).
    pub heap_bytes: u64,
    /// Bytes of the delta log: the recent op batches of every session, kept
    /// so the replicator ships deltas (1/64 of the heap, 256 KiB to 64 MiB).
    pub delta_log_bytes: u64,
    /// The header, the participant table (one per open handle, with its
    /// retire ring), the dirty bitmap, the chunk map and page alignment:
    /// about 8.5 MiB whatever the capacity.
    pub fixed_bytes: u64,
    /// The whole file: what creation reserves on its filesystem.
    pub mapped_bytes: u64,
}

impl Sizing {
    pub(crate) fn of(geo: &Geometry) -> Sizing {
        let index_bytes = geo.index_slots * 64;
        Sizing {
            index_slots: geo.index_slots,
            index_bytes,
            heap_bytes: geo.heap_bytes,
            delta_log_bytes: geo.delta_bytes,
            fixed_bytes: geo.total_bytes - index_bytes - geo.heap_bytes - geo.delta_bytes,
            mapped_bytes: geo.total_bytes,
        }
    }
}

impl ArenaConfig {
    /// A config for `capacity` sessions whose attributes archive to about
    /// `session_bytes` each: [`SessionCost::heap_bytes`] per session plus
    /// [`HEAP_SLACK_BYTES`]. The index and fixed tables come on top; see
    /// [`ArenaConfig::sizing`] for the whole mapping.
    ///
    /// It asks for 2 MiB pages where the system has them
    /// ([`HugePages::Try`]: a mounted hugetlbfs with enough free pages),
    /// where a read's page walks cost less, and falls back to 4 KiB pages
    /// otherwise.
    ///
    /// An arena remembers the heap it was made with, and a config that
    /// asks for another is refused on open: changing this formula would
    /// refuse every arena made by an older build (a unit test pins it).
    pub fn for_sessions(capacity: u64, session_bytes: u64) -> ArenaConfig {
        let per = SessionCost::new(session_bytes).heap_bytes();
        ArenaConfig {
            capacity,
            heap_bytes: (capacity * per).max(HEAP_BUDGET_MIN_BYTES) + HEAP_SLACK_BYTES,
            quota_bytes: 64 * 1024,
            huge_pages: HugePages::Try,
        }
    }

    /// Where the bytes of an arena made with this config go, on the pages
    /// it asks for: 2 MiB pages unless `huge_pages` is `Off` (they round the
    /// heap and the total up to 2 MiB). An arena that fell back to 4 KiB
    /// pages is laid out as the same config with `Off`.
    pub fn sizing(&self) -> Sizing {
        let align = if self.huge_pages == HugePages::Off {
            4096
        } else {
            HUGE
        };
        Sizing::of(&Geometry::new(
            self.capacity,
            self.heap_bytes,
            self.quota_bytes,
            align,
        ))
    }

    fn check(&self) -> Result<(), OpenError> {
        let bad = |field: &'static str, why: &'static str| Err(OpenError::BadConfig { field, why });
        if self.capacity == 0 || self.capacity > 1 << 32 {
            return bad("capacity", "must be between 1 and 2^32 sessions");
        }
        if self.quota_bytes < 256 || self.quota_bytes > 64 << 20 {
            return bad("quota_bytes", "must be between 256 B and 64 MiB");
        }
        if self.heap_bytes < 1 << 20 || self.heap_bytes > 120 << 30 {
            // Record and node offsets are 32-bit block indices (64 B units).
            return bad("heap_bytes", "must be between 1 MiB and 120 GiB");
        }
        Ok(())
    }
}

fn hugetlbfs_dir() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "hugetlbfs").then(|| PathBuf::from(dir))
    })
}

fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

const HUGE: u64 = 2 << 20;

/// Pages one `mincore` call of [`Map::touched_bytes`] looks at (1 GiB of
/// 4 KiB pages, with a 256 KiB result vector).
const MINCORE_WINDOW_PAGES: u64 = 1 << 18;

impl Map {
    /// Creates the arena at `path` unless it exists; opens it either way.
    /// An existing arena made with another configuration is refused unless
    /// `adopt`: a host that asked for a million sessions must not run on
    /// one made for a thousand without being told.
    pub(crate) fn create_or_open(
        loc: &Location,
        cfg: &ArenaConfig,
        adopt: bool,
    ) -> Result<Map, OpenError> {
        let map = Self::create_or_open_any(loc, cfg)?;
        if !adopt {
            map.check_config(cfg)?;
        }
        Ok(map)
    }

    /// Refuses this arena if it was made with another capacity, heap or
    /// quota than `cfg` asks for (page size aside: an arena lives on the
    /// pages it was made on).
    fn check_config(&self, cfg: &ArenaConfig) -> Result<(), OpenError> {
        let align = if self.huge { HUGE } else { 4096 };
        let asked = Geometry::new(cfg.capacity, cfg.heap_bytes, cfg.quota_bytes, align);
        let g = &self.geo;
        let key = |g: &Geometry| (g.capacity, g.heap_bytes, g.quota_bytes);
        if key(&asked) == key(g) {
            return Ok(());
        }
        let show = |g: &Geometry| {
            format!(
                "capacity {} sessions, heap {} bytes, quota {} bytes",
                g.capacity, g.heap_bytes, g.quota_bytes
            )
        };
        Err(OpenError::ConfigMismatch {
            path: self.path.clone(),
            found: show(g),
            asked: show(&asked),
        })
    }

    fn create_or_open_any(loc: &Location, cfg: &ArenaConfig) -> Result<Map, OpenError> {
        cfg.check()?;
        let path = Self::resolve(loc, cfg)?;
        match Self::open_path(&path) {
            Err(OpenError::NotFound(_)) => {}
            other => return other,
        }
        let huge = path
            .parent()
            .is_some_and(|d| Some(d.to_path_buf()) == hugetlbfs_dir());
        let align = if huge { HUGE } else { 4096 };
        let geo = Geometry::new(cfg.capacity, cfg.heap_bytes, cfg.quota_bytes, align);
        let tmp = path.with_file_name(format!(
            ".{}.{}-{:x}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("arena"),
            std::process::id(),
            rand_u64()
        ));
        let built = Self::build(&tmp, &path, &geo);
        let linked = built
            .and_then(|()| std::fs::hard_link(&tmp, &path).map_err(|e| OpenError::io(&path, e)));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Someone else created it first: theirs wins.
            Err(OpenError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {}
            // The huge page pool ran short since `resolve` looked: 4 KiB
            // pages, as `Try` promises.
            Err(OpenError::NoSpace { .. }) if huge && cfg.huge_pages == HugePages::Try => {
                let small = ArenaConfig {
                    huge_pages: HugePages::Off,
                    ..cfg.clone()
                };
                return Self::create_or_open_any(loc, &small);
            }
            Err(e) => return Err(e),
        }
        Self::open_path(&path)
    }

    /// Where an existing arena named by `loc` is: a named arena may live on
    /// hugetlbfs (created with huge pages) or in /dev/shm; a second opener
    /// must find the first one's arena whatever pages are free now.
    pub(crate) fn existing(loc: &Location) -> Result<Option<PathBuf>, OpenError> {
        let path = loc.path()?;
        if let Location::Shm(_) = loc
            && let Some(dir) = hugetlbfs_dir()
        {
            let huge = dir.join(path.file_name().expect("shm path has a file name"));
            if huge.exists() {
                return Ok(Some(huge));
            }
        }
        Ok(path.exists().then_some(path))
    }

    fn resolve(loc: &Location, cfg: &ArenaConfig) -> Result<PathBuf, OpenError> {
        if let Some(found) = Self::existing(loc)? {
            return Ok(found);
        }
        let path = loc.path()?;
        if cfg.huge_pages == HugePages::Off || !matches!(loc, Location::Shm(_)) {
            if cfg.huge_pages == HugePages::Require && !matches!(loc, Location::Shm(_)) {
                return Err(OpenError::HugePages(
                    "huge pages need a named shared-memory arena".into(),
                ));
            }
            return Ok(path);
        }
        let geo = Geometry::new(cfg.capacity, cfg.heap_bytes, cfg.quota_bytes, HUGE);
        let needed = geo.total_bytes / HUGE;
        match hugetlbfs_dir() {
            Some(dir) if free_huge_pages() >= needed => {
                Ok(dir.join(path.file_name().expect("shm path has a file name")))
            }
            found => {
                let why = match found {
                    None => "no hugetlbfs is mounted".to_string(),
                    Some(_) => format!(
                        "{needed} free 2 MiB pages needed, {} reserved and free",
                        free_huge_pages()
                    ),
                };
                if cfg.huge_pages == HugePages::Require {
                    Err(OpenError::HugePages(why))
                } else {
                    Ok(path)
                }
            }
        }
    }

    /// Builds the arena in the private file `tmp`, to be linked as `path`.
    fn build(tmp: &Path, path: &Path, geo: &Geometry) -> Result<(), OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(|e| OpenError::io(tmp, e))?;
        file.set_len(geo.total_bytes)
            .map_err(|e| OpenError::io(tmp, e))?;
        // Every byte reserved before the arena has a name: nobody ever maps
        // a page the filesystem cannot back (`space`). Errors name the
        // arena being made, not its temporary file (same directory).
        crate::space::reserve(&file, path, geo.total_bytes)?;
        let raw = MmapOptions::new()
            .len(geo.total_bytes as usize)
            .map_raw(&file)
            .map_err(|e| OpenError::io(tmp, e))?;
        // A fresh file reads as zeros: every atomic is 0, every slot empty,
        // every participant free. Only the header and the chunk map need
        // values.
        // SAFETY: the mapping is at least HEADER_BYTES long, page-aligned,
        // private to us (the file is not yet linked under its name).
        let h = unsafe { &mut *raw.as_mut_ptr().cast::<Header>() };
        h.format = FORMAT_VERSION;
        h.participants = PARTICIPANTS_MAX;
        h.fingerprint = geo.fingerprint();
        h.shape = geo.shape;
        h.created_ms = crate::clock::now_ms();
        h.hash_seed = rand_u64();
        h.epoch.store(1, Ordering::Relaxed);
        // SAFETY: the chunk map lies inside the mapping (Geometry::new).
        unsafe {
            std::ptr::write_bytes(
                raw.as_mut_ptr().add(geo.chunk_map_off as usize),
                CHUNK_UNASSIGNED,
                geo.chunks as usize,
            );
        }
        // The magic goes last, so a file caught half-built is "not an arena".
        h.magic = MAGIC;
        raw.flush().map_err(|e| OpenError::io(tmp, e))?;
        Ok(())
    }

    /// Opens and validates an existing arena that this user owns alone.
    pub(crate) fn open_path(path: &Path) -> Result<Map, OpenError> {
        Self::open_checked(path, Trust::Owner)
    }

    /// Opens an existing arena whoever owns it: for operator tools that look
    /// into another user's arena (they warn). Symbolic links and files that
    /// are not regular are refused all the same.
    pub(crate) fn open_foreign(path: &Path) -> Result<Map, OpenError> {
        Self::open_checked(path, Trust::Any)
    }

    fn open_checked(path: &Path, trust: Trust) -> Result<Map, OpenError> {
        let file = Self::open_file(path)?;
        let meta = file.metadata().map_err(|e| OpenError::io(path, e))?;
        check_trusted(path, &meta, trust)?;
        let len = meta.len();
        if len < HEADER_BYTES {
            return Err(OpenError::NotAnArena {
                path: path.to_path_buf(),
                why: "shorter than the header",
            });
        }
        let raw = MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .map_err(|e| OpenError::io(path, e))?;
        // SAFETY: the mapping holds at least HEADER_BYTES; the header's plain
        // fields are immutable once the arena is linked under its name.
        let h = unsafe { &*raw.as_ptr().cast::<Header>() };
        if h.magic != MAGIC {
            return Err(OpenError::NotAnArena {
                path: path.to_path_buf(),
                why: "bad magic",
            });
        }
        if h.format != FORMAT_VERSION {
            return Err(OpenError::Format {
                path: path.to_path_buf(),
                found: h.format,
                expected: FORMAT_VERSION,
            });
        }
        let align = u64::from(h.shape.page_bytes);
        if align != 4096 && align != HUGE {
            return Err(OpenError::Layout {
                path: path.to_path_buf(),
                why: "unknown page size",
            });
        }
        let asked = &h.shape;
        if asked.capacity == 0
            || asked.capacity > 1 << 32
            || asked.heap_bytes > 1 << 44
            || asked.quota_bytes > 64 << 20
        {
            return Err(OpenError::Layout {
                path: path.to_path_buf(),
                why: "geometry out of range",
            });
        }
        let geo = Geometry::new(asked.capacity, asked.heap_bytes, asked.quota_bytes, align);
        // Everything the header records must be what its own capacity, heap
        // and quota lay out.
        let same = geo.shape == h.shape && h.participants == PARTICIPANTS_MAX;
        if !same || geo.fingerprint() != h.fingerprint {
            return Err(OpenError::Layout {
                path: path.to_path_buf(),
                why: "layout fingerprint differs",
            });
        }
        if len < geo.total_bytes {
            return Err(OpenError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: geo.total_bytes,
            });
        }
        // An arena made sparse (by an older build) is reserved now, or
        // refused, before this process touches a page of it.
        crate::space::reserve(&file, path, len)?;
        let (offs, _) = dirty_level_offs(geo.index_slots);
        let words = dirty_level_words(geo.index_slots);
        let dirty_levels = std::array::from_fn(|l| (geo.dirty_off + offs[l], words[l]));
        Ok(Map {
            raw,
            geo,
            path: path.to_path_buf(),
            huge: align == HUGE,
            probe: file,
            dirty_levels,
        })
    }

    /// Bytes of the arena file its filesystem has allocated (`st_blocks`):
    /// all of it once reserved, whether touched or not.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.probe
            .metadata()
            .map_or(0, |m| m.blocks().saturating_mul(512))
    }

    /// Bytes of the mapping whose pages have been touched (written or
    /// read) by any process since creation, as `mincore(2)` reports them.
    /// On tmpfs a page reserved by `fallocate` and never touched is not
    /// "in core" although it holds memory; hugetlbfs pages are in core
    /// once reserved. Costs one `mincore` over the mapping, in windows of
    /// [`MINCORE_WINDOW_PAGES`] pages, and a byte of scratch per page of a
    /// window; `None` if the kernel refuses.
    pub(crate) fn touched_bytes(&self) -> Option<u64> {
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let len = self.raw.len() as u64;
        let mut vec = vec![0u8; MINCORE_WINDOW_PAGES as usize];
        let mut touched = 0u64;
        let mut off = 0u64;
        while off < len {
            let bytes = (len - off).min(MINCORE_WINDOW_PAGES * page);
            // SAFETY: `off .. off + bytes` lies inside our mapping and `off`
            // is page-aligned (the mapping is, and windows are whole pages);
            // `vec` has a byte for each of its at most MINCORE_WINDOW_PAGES
            // pages. mincore only reads page tables and writes `vec`.
            let r = unsafe {
                libc::mincore(
                    self.base().add(off as usize).cast(),
                    bytes as usize,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                return None;
            }
            let pages = bytes.div_ceil(page) as usize;
            touched += vec[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64 * page;
            off += bytes;
        }
        Some(touched.min(len))
    }

    #[inline]
    pub(crate) fn base(&self) -> *mut u8 {
        self.raw.as_mut_ptr()
    }

    #[inline]
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: validated at open: the mapping starts with a Header.
        unsafe { &*self.base().cast::<Header>() }
    }

    /// The shared `T` at byte `off` of a table laid out by [`Geometry`].
    ///
    /// # Safety
    /// `off .. off + size_of::<T>()` must lie inside one of the mapping's
    /// tables of `T`s (participants, index slots, dirty bitmap, chunk map)
    /// at an offset aligned for `T`; those tables hold only atomics and
    /// zero-valid integers, so any bytes there are a valid `T`.
    #[inline]
    unsafe fn table<T>(&self, off: u64) -> &T {
        debug_assert!(off as usize + std::mem::size_of::<T>() <= self.raw.len());
        debug_assert!((off as usize).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: by the caller's contract.
        unsafe { &*self.base().add(off as usize).cast::<T>() }
    }

    #[inline]
    pub(crate) fn participant(&self, i: u32) -> &Participant {
        assert!(i < PARTICIPANTS_MAX, "participant {i} out of range");
        let off =
            self.geo.participants_off + u64::from(i) * std::mem::size_of::<Participant>() as u64;
        // SAFETY: i < PARTICIPANTS_MAX: inside the participant table.
        unsafe { self.table(off) }
    }

    #[inline]
    pub(crate) fn slot(&self, i: u64) -> &IndexSlot {
        assert!(i < self.geo.index_slots, "index slot {i} out of range");
        // SAFETY: i < index_slots: inside the index, whose slots are 64
        // bytes at a multiple of 4096.
        unsafe { self.table(self.geo.index_off + i * 64) }
    }

    /// The dirty bitmap word `w` (64 slots).
    #[inline]
    pub(crate) fn dirty_word(&self, w: u64) -> &AtomicU64 {
        self.dirty_level_word(0, w)
    }

    /// Word `w` of level `level` of the dirty bitmap: level 0 has a bit per
    /// index slot, each level above a bit per word of the one below.
    #[inline]
    pub(crate) fn dirty_level_word(&self, level: usize, w: u64) -> &AtomicU64 {
        let (off, words) = self.dirty_levels[level];
        assert!(w < words, "dirty word {w} of level {level} out of range");
        // SAFETY: inside the level, which starts 64-byte aligned.
        unsafe { self.table(off + w * 8) }
    }

    /// Words of level `level` of the dirty bitmap.
    #[inline]
    pub(crate) fn dirty_level_len(&self, level: usize) -> u64 {
        self.dirty_levels[level].1
    }

    /// Words `w .. w + n` of the delta log (positions taken modulo its
    /// length), as at most two runs: the ring wraps once at most, since
    /// `n` is at most its length. One division, not one per word.
    #[inline]
    pub(crate) fn delta_run(&self, w: u64, n: u64) -> (&[AtomicU64], &[AtomicU64]) {
        let words = self.geo.delta_bytes / 8;
        assert!(
            n <= words,
            "a delta log run of {n} words, over the log's {words}"
        );
        let start = w % words;
        let first = n.min(words - start);
        // SAFETY: `start + first <= words` and `n - first <= start`: both
        // runs lie inside the delta log, which starts on a page and holds
        // only words (atomics, valid at any bit pattern).
        unsafe {
            let at = |i: u64, len: u64| {
                std::slice::from_raw_parts(
                    self.base()
                        .add((self.geo.delta_off + i * 8) as usize)
                        .cast::<AtomicU64>(),
                    len as usize,
                )
            };
            (at(start, first), at(0, n - first))
        }
    }

    /// The dirty hint word's address, for futex calls.
    pub(crate) fn dirty_hint_ptr(&self) -> *const u32 {
        self.header().dirty_hint.as_ptr().cast_const()
    }

    /// The chunk map entry of chunk `c`.
    #[inline]
    pub(crate) fn chunk_class(&self, c: u64) -> &AtomicU8 {
        assert!(c < self.geo.chunks, "chunk {c} out of range");
        // SAFETY: inside the chunk map (one byte per chunk).
        unsafe { self.table(self.geo.chunk_map_off + c) }
    }

    /// Whether `off` is the start of a block in the heap.
    #[inline]
    pub(crate) fn is_block(&self, off: u64) -> bool {
        off >= self.geo.heap_off
            && off < self.geo.heap_off + self.geo.heap_bytes
            && (off - self.geo.heap_off).is_multiple_of(BLOCK)
    }

    /// The header of the heap block at `off`, or `None` if `off` is not the
    /// start of a block. The one door to block headers: shared memory may
    /// hold any offset a dead process left, so every one is checked.
    #[inline]
    pub(crate) fn block_header<T: BlockHeader>(&self, off: u64) -> Option<&T> {
        if !self.is_block(off) {
            return None;
        }
        // SAFETY: `off` is a block start: in bounds with a whole block after
        // it, and 64-byte aligned (the heap is page-aligned). `T` is one of
        // the sealed 64-byte block headers, whose fields are atomics or
        // integers valid at any bit pattern, so any bytes there read as a
        // `T`; the mapping lives as long as `self`.
        Some(unsafe { &*self.base().add(off as usize).cast::<T>() })
    }

    /// A pointer to the header of the heap block at `off`, for the one
    /// process that owns the block to fill in its plain fields before
    /// publishing it; `None` if `off` is not a block start.
    #[inline]
    pub(crate) fn block_header_ptr<T: BlockHeader>(&self, off: u64) -> Option<*mut T> {
        // Only computed here (no unsafe needed); the caller writes through
        // it under its own SAFETY argument.
        self.is_block(off)
            .then(|| self.base().wrapping_add(off as usize).cast::<T>())
    }

    /// `len` bytes at `off`, checked against the heap's bounds.
    #[inline]
    pub(crate) fn heap_bytes(&self, off: u64, len: u64) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if off < self.geo.heap_off || end > self.geo.heap_off + self.geo.heap_bytes {
            return None;
        }
        // SAFETY: the range was just checked to lie inside the heap.
        Some(unsafe { std::slice::from_raw_parts(self.base().add(off as usize), len as usize) })
    }

    /// Writes `bytes` at `off` in a block the caller owns.
    ///
    /// # Safety
    /// The caller must own the block (allocated and not yet published), so
    /// no other process reads these bytes while they are written.
    pub(crate) unsafe fn write_heap(&self, off: u64, bytes: &[u8]) {
        let end = off + bytes.len() as u64;
        assert!(off >= self.geo.heap_off && end <= self.geo.heap_off + self.geo.heap_bytes);
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base().add(off as usize),
                bytes.len(),
            );
        }
    }

    /// Fills a freshly allocated block `off`: writes `payload` after its
    /// header and stamps the header's kind and length. Returns the header,
    /// for the caller to fill in the fields of its kind.
    ///
    /// # Safety
    /// As [`Map::write_heap`]: the caller owns the block. Its `link` is left
    /// alone, since a stale free-list popper may still read it.
    pub(crate) unsafe fn fill_block<T: BlockHeader>(
        &self,
        off: u64,
        magic: u32,
        payload: &[u8],
    ) -> *mut T {
        let p = self
            .block_header_ptr::<T>(off)
            .expect("alloc returns heap blocks");
        let start = p.cast::<BlockStart>();
        // SAFETY: exclusive by the caller's contract; `p` points at the
        // block's header, in bounds, and every block header starts with a
        // `BlockStart` (layout's `BlockHeader`).
        unsafe {
            self.write_heap(off + BLOCK, payload);
            (*start).magic = magic;
            (*start).len = payload.len() as u32;
        }
        p
    }

    /// Locks byte `i` of the participant range for `file`; false if taken.
    pub(crate) fn claim_lock(file: &File, i: u32) -> io::Result<bool> {
        ofd_lock(file, LOCK_BASE + i64::from(i), libc::F_WRLCK, false)
    }

    /// Drops this file description's lock on participant `i`'s byte.
    pub(crate) fn release_lock(file: &File, i: u32) -> io::Result<()> {
        ofd_lock(file, LOCK_BASE + i64::from(i), libc::F_UNLCK, false).map(|_| ())
    }

    /// Whether participant `i` is held by a live handle (some process holds
    /// its lock). The kernel drops the lock when the holder dies.
    pub(crate) fn participant_alive(&self, i: u32) -> bool {
        // An error (which would be a bug) errs on the side of "alive": it can
        // only delay reclamation, never free memory under a reader.
        ofd_locked_by_other(&self.probe, LOCK_BASE + i64::from(i)).unwrap_or(true)
    }

    /// Takes the open lock: exclusive if no other handle has the arena open
    /// (returns true: the caller is alone and may recover), else shared.
    pub(crate) fn open_lock(file: &File) -> io::Result<bool> {
        if ofd_lock(file, OPEN_LOCK, libc::F_WRLCK, false)? {
            return Ok(true);
        }
        ofd_lock(file, OPEN_LOCK, libc::F_RDLCK, true)?;
        Ok(false)
    }

    /// Turns an exclusive open lock into a shared one, atomically.
    pub(crate) fn share_open_lock(file: &File) -> io::Result<()> {
        ofd_lock(file, OPEN_LOCK, libc::F_RDLCK, true).map(|_| ())
    }

    /// Opens another file description of the arena (each handle has its own,
    /// so its locks are its own).
    pub(crate) fn reopen(&self) -> Result<File, OpenError> {
        let file = Self::open_file(&self.path)?;
        // The same file as the mapping, not one put in its place since.
        let (now, first) = (
            file.metadata().map_err(|e| OpenError::io(&self.path, e))?,
            self.probe
                .metadata()
                .map_err(|e| OpenError::io(&self.path, e))?,
        );
        if (now.dev(), now.ino()) != (first.dev(), first.ino()) {
            return Err(OpenError::Untrusted {
                path: self.path.clone(),
                why: "the file was replaced since it was mapped".into(),
            });
        }
        Ok(file)
    }

    /// Opens an arena file read-write, never through a symbolic link and
    /// never blocking (a FIFO put at the path cannot hang the open).
    fn open_file(path: &Path) -> Result<File, OpenError> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(OpenError::NotFound(path.to_path_buf()))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(OpenError::Untrusted {
                path: path.to_path_buf(),
                why: "it is a symbolic link".into(),
            }),
            Err(e) => Err(OpenError::io(path, e)),
        }
    }
}

/// Whose arena files a process opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Only its own, with no group or other access.
    Owner,
    /// Anyone's (operator tools), but still only regular files.
    Any,
}

/// Refuses a file that is not regular, or (for [`Trust::Owner`]) one another
/// user owns or that grants group or other access: such a file can be read
/// or forged by someone else.
fn check_trusted(path: &Path, meta: &std::fs::Metadata, trust: Trust) -> Result<(), OpenError> {
    let refuse = |why: String| {
        Err(OpenError::Untrusted {
            path: path.to_path_buf(),
            why,
        })
    };
    if !meta.is_file() {
        return refuse("it is not a regular file".into());
    }
    if trust == Trust::Any {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(format!(
            "it is owned by uid {}, not by this user (uid {me})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return refuse(format!("its mode {mode:04o} lets other users in"));
    }
    Ok(())
}

/// 64 random bits from the OS CSPRNG.
pub(crate) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source failed");
    u64::from_le_bytes(b)
}
