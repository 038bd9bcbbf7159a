//! Benchmark support for sessio: the fixtures the criterion benches and the
//! comparison harness share.
//!
//! - [`ArenaFixture`]: an arena of N sessions shaped like a web session
//!   (8 attributes of ~100 B, ~1 KB in all), populated from every core and
//!   removed again when dropped — also when the bench fails half-way.
//! - [`Floor`]: the physical floor of `DESIGN.md`: a plain mapping of the same
//!   size and page size holding N records of 1 KiB, found through a plain
//!   open-addressing index of `u64` keys. Whatever the engine costs above a
//!   read of this is the engine's own.
//! - [`HugePagePool`]: reserves 2 MiB pages (and mounts hugetlbfs) when the
//!   process may, and gives everything back when dropped.
//! - [`picks`]: a precomputed random order of (item, attribute) lookups, so a
//!   bench measures the lookup and not the random number generator.
//!
//! ```no_run
//! use sessio_benches::{ArenaFixture, Floor, KEYS, picks};
//! use sessio_engine::HugePages;
//!
//! let fx = ArenaFixture::build("doc", 10_000, HugePages::Off)?;
//! let order = picks(fx.sids(), 1 << 16, 7);
//! let (sid, attr) = order[0];
//! assert!(fx.arena().read(sid)?.get(KEYS[attr as usize]).is_some());
//! let floor = Floor::build(10_000, fx.mapped_bytes(), false)?;
//! let keys = picks(floor.keys(), 1 << 16, 7);
//! assert_eq!(floor.read(keys[0].0, keys[0].1).map(<[u8]>::len), Some(100));
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```

use memmap2::{MmapMut, MmapOptions};
use sessio_engine::{Arena, ArenaConfig, HugePages, Location, NewSession, Op, OpenError, Sid};
use std::error::Error;
use std::path::{Path, PathBuf};

/// Attributes per benchmark session.
pub const ATTRS: usize = 8;
/// Bytes of each attribute value.
pub const VALUE_BYTES: usize = 100;
/// Bytes a benchmark session is sized for (8 × (key + 100 B) + overhead).
pub const SESSION_BYTES: u64 = 1024;
/// Attribute names. At most 8 bytes each, so rkyv keeps them inline in the
/// archived attribute (a longer key costs the engine one more cache line per
/// comparison of its binary search; real session keys are often longer).
pub const KEYS: [&str; ATTRS] = [
    "cart", "csrf", "flash", "locale", "prefs", "referrer", "theme", "user_id",
];
/// Idle TTL of benchmark sessions: 30 minutes, as a web session would have.
/// A non-zero idle TTL makes every read record its access time.
pub const IDLE_TTL_MS: u64 = 30 * 60 * 1000;
/// Bytes of one floor record.
pub const FLOOR_RECORD_BYTES: u64 = 1024;

const HUGE_PAGE: u64 = 2 << 20;

type BoxError = Box<dyn Error + Send + Sync>;

/// `count` random `(item, attribute index)` pairs drawn from `items`, with
/// replacement: the order in which a bench looks things up.
pub fn picks<T: Copy>(items: &[T], count: usize, seed: u64) -> Vec<(T, u8)> {
    assert!(!items.is_empty(), "nothing to pick from");
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| (items[rng.usize(..items.len())], rng.u8(..ATTRS as u8)))
        .collect()
}

/// The attributes of a benchmark session: 8 keys of [`KEYS`], 100 B each.
pub fn session_values(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..ATTRS)
        .map(|_| (0..VALUE_BYTES).map(|_| rng.u8(b'a'..=b'z')).collect())
        .collect()
}

/// The configuration of an arena for `sessions` benchmark sessions.
pub fn arena_config(sessions: u64, huge: HugePages) -> ArenaConfig {
    ArenaConfig {
        huge_pages: huge,
        ..ArenaConfig::for_sessions(sessions, SESSION_BYTES)
    }
}

/// 2 MiB pages an arena made with `cfg` needs, with some slack. The engine
/// does not expose its geometry, so this follows `ArenaConfig`'s fields:
/// heap, its delta log, 64 B index slots at load ≤ 3/4, the dirty bitmap, the
/// participant table, headers and alignment.
pub fn huge_pages_needed(cfg: &ArenaConfig) -> u64 {
    let slots = (cfg.capacity * 4 / 3 + 1).next_power_of_two().max(64);
    let chunk = (cfg.quota_bytes + 64).next_power_of_two().max(64 * 1024);
    let heap = cfg.heap_bytes.div_ceil(chunk) * chunk;
    let delta_log = (heap / 64).clamp(256 << 10, 64 << 20);
    let bytes = heap + delta_log + slots * 64 + slots / 8 + (16 << 20);
    bytes.div_ceil(HUGE_PAGE) + 4
}

/// One update batch per attribute: a `Set` of a fresh `VALUE_BYTES` value.
/// Built once, so an update bench measures the engine, not the caller's
/// allocations.
pub fn update_ops() -> Vec<[Op; 1]> {
    KEYS.iter()
        .enumerate()
        .map(|(k, key)| {
            [Op::Set {
                key: (*key).to_string(),
                value: vec![b'A' + k as u8; VALUE_BYTES],
            }]
        })
        .collect()
}

/// An arena of N benchmark sessions, removed when dropped.
pub struct ArenaFixture {
    loc: Location,
    path: PathBuf,
    arena: Option<Arena>,
    sids: Vec<Sid>,
}

impl ArenaFixture {
    /// Creates arena `bench-<pid>-<label>` and fills it with `sessions`
    /// sessions of 8 × 100 B, from as many threads as there are cores.
    pub fn build(label: &str, sessions: u64, huge: HugePages) -> Result<ArenaFixture, BoxError> {
        Self::build_with(label, sessions, &arena_config(sessions, huge))
    }

    /// As [`ArenaFixture::build`], with an arena configuration of one's own.
    pub fn build_with(
        label: &str,
        sessions: u64,
        cfg: &ArenaConfig,
    ) -> Result<ArenaFixture, BoxError> {
        let loc = Location::Shm(format!("bench-{}-{label}", std::process::id()));
        let arena = Arena::open(&loc, cfg)?;
        let mut fx = ArenaFixture {
            path: arena.path().to_path_buf(),
            loc,
            arena: Some(arena),
            sids: Vec::new(),
        };
        // From here on, an error drops `fx`, which removes the arena.
        fx.sids = populate(fx.arena(), sessions)?;
        Ok(fx)
    }

    /// The handle.
    pub fn arena(&self) -> &Arena {
        self.arena.as_ref().expect("the arena is open until drop")
    }

    /// Where the arena lives (for a second process).
    pub fn location(&self) -> &Location {
        &self.loc
    }

    /// Every session created, in creation order.
    pub fn sids(&self) -> &[Sid] {
        &self.sids
    }

    /// Whether 2 MiB pages really back the arena.
    pub fn huge_pages(&self) -> bool {
        self.arena().huge_pages()
    }

    /// Bytes of the arena's mapping.
    pub fn mapped_bytes(&self) -> u64 {
        self.arena().stats().mapped_bytes
    }
}

impl Drop for ArenaFixture {
    fn drop(&mut self) {
        drop(self.arena.take());
        match Arena::remove(&self.loc) {
            Ok(()) => {}
            // A huge-page arena lives in the hugetlbfs mount, not where
            // `Location::path` points, and `Arena::remove` does not look
            // there: remove the file the arena itself reported.
            Err(OpenError::NotFound(_)) => {
                if let Err(e) = std::fs::remove_file(&self.path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    eprintln!("could not remove arena {}: {e}", self.path.display());
                }
            }
            Err(e) => eprintln!("could not remove arena {}: {e}", self.path.display()),
        }
    }
}

/// Creates `sessions` sessions in `arena`, split over the machine's cores
/// (each thread with its own handle); returns their SIDs.
pub fn populate(arena: &Arena, sessions: u64) -> Result<Vec<Sid>, BoxError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(sessions.max(1) as usize) as u64;
    let handles = (0..threads)
        .map(|_| arena.try_clone())
        .collect::<Result<Vec<_>, _>>()?;
    let per = sessions / threads;
    let results: Vec<Result<Vec<Sid>, BoxError>> = std::thread::scope(|s| {
        let workers: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(t, handle)| {
                let t = t as u64;
                let count = if t == threads - 1 {
                    sessions - per * (threads - 1)
                } else {
                    per
                };
                s.spawn(move || -> Result<Vec<Sid>, BoxError> {
                    let values = session_values(t);
                    let attrs: Vec<(&str, &[u8])> = KEYS
                        .iter()
                        .zip(&values)
                        .map(|(k, v)| (*k, v.as_slice()))
                        .collect();
                    let opts = NewSession {
                        idle_ttl_ms: IDLE_TTL_MS,
                        lifetime_ms: 0,
                    };
                    let mut sids = Vec::with_capacity(count as usize);
                    for _ in 0..count {
                        sids.push(handle.create(opts, &attrs)?);
                    }
                    Ok(sids)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("a populate thread panicked".into()))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(sessions as usize);
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// One slot of the floor's index: a key (0 = empty) and its record's offset.
#[repr(C)]
struct FloorSlot {
    key: u64,
    off: u64,
}

/// The physical floor: N records of 1 KiB (8 fields of 100 B behind a
/// table of `(offset, length)` pairs) in one mapping, found through a
/// linear-probing index of `u64` keys in the same mapping. No pinning, no
/// checksum, no expiry: a lookup and two dependent loads.
pub struct Floor {
    map: MmapMut,
    mask: u64,
    records_off: u64,
    keys: Vec<u64>,
    huge: bool,
}

impl Floor {
    /// Builds a floor of `records` records in a mapping of `total_bytes`
    /// (pass the arena's mapped bytes to compare like with like). The index
    /// comes first, then the records packed one after the other, as the
    /// arena's heap fills from its start; the rest of the mapping stays
    /// untouched, as the arena's unused heap does. With `huge`, tries 2 MiB
    /// pages (`MAP_HUGETLB`) and falls back to 4 KiB pages.
    pub fn build(records: u64, total_bytes: u64, huge: bool) -> Result<Floor, BoxError> {
        let slots = (records * 4 / 3 + 1).next_power_of_two().max(64);
        let index_bytes = (slots * 16).next_multiple_of(4096);
        let need = index_bytes + records * FLOOR_RECORD_BYTES;
        let len = total_bytes.max(need).next_multiple_of(HUGE_PAGE);
        let (mut map, huge) = Self::map(len, huge)?;
        let mut rng = fastrand::Rng::with_seed(0xF100_5EED);
        let mut keys = Vec::with_capacity(records as usize);
        let bytes = &mut map[..];
        for r in 0..records {
            // 0 marks an empty slot.
            let key = rng.u64(1..);
            let off = index_bytes + r * FLOOR_RECORD_BYTES;
            let rec = &mut bytes[off as usize..(off + FLOOR_RECORD_BYTES) as usize];
            for f in 0..ATTRS {
                let field_off = 64 + f * (VALUE_BYTES + 12);
                rec[f * 8..f * 8 + 4].copy_from_slice(&(field_off as u32).to_le_bytes());
                rec[f * 8 + 4..f * 8 + 8].copy_from_slice(&(VALUE_BYTES as u32).to_le_bytes());
                rec[field_off..field_off + VALUE_BYTES].fill(b'a' + f as u8);
            }
            let mut i = floor_hash(key) & (slots - 1);
            loop {
                let s = i as usize * 16;
                let k = u64::from_le_bytes(bytes[s..s + 8].try_into().expect("8 bytes"));
                if k == 0 {
                    bytes[s..s + 8].copy_from_slice(&key.to_le_bytes());
                    bytes[s + 8..s + 16].copy_from_slice(&off.to_le_bytes());
                    break;
                }
                // A repeated 64-bit random key is astronomically unlikely;
                // storing it twice would only shadow the second copy.
                i = (i + 1) & (slots - 1);
            }
            keys.push(key);
        }
        Ok(Floor {
            map,
            mask: slots - 1,
            records_off: index_bytes,
            keys,
            huge,
        })
    }

    fn map(len: u64, huge: bool) -> Result<(MmapMut, bool), BoxError> {
        if huge {
            match MmapOptions::new()
                .len(len as usize)
                .huge(Some(21))
                .map_anon()
            {
                Ok(m) => return Ok((m, true)),
                Err(e) => eprintln!("floor: no 2 MiB pages for {len} B ({e}); using 4 KiB pages"),
            }
        }
        // MAP_NORESERVE: the mapping is as large as the arena's (address
        // space, mostly never touched), which can exceed RAM + swap at 10M
        // sessions; without it the kernel's overcommit check refuses it.
        let m = MmapOptions::new()
            .len(len as usize)
            .no_reserve_swap()
            .map_anon()?;
        // Transparent huge pages would make this not a 4 KiB floor.
        m.advise(memmap2::Advice::NoHugePage)?;
        Ok((m, false))
    }

    /// Every key, in creation order.
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    /// Whether 2 MiB pages back the mapping.
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    /// Bytes of the mapping.
    pub fn mapped_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// Field `field` of the record of `key`.
    #[inline]
    pub fn read(&self, key: u64, field: u8) -> Option<&[u8]> {
        let base = self.map.as_ptr();
        let mut i = floor_hash(key) & self.mask;
        loop {
            // SAFETY: i ≤ mask, and the index of mask + 1 slots of 16 B lies
            // at the start of the mapping; the mapping is page-aligned.
            let slot = unsafe { &*base.add(i as usize * 16).cast::<FloorSlot>() };
            if slot.key == key {
                let rec = slot.off as usize;
                debug_assert!(slot.off >= self.records_off);
                let d = rec + usize::from(field) * 8;
                let desc = self.map.get(d..d + 8)?;
                let off = u32::from_le_bytes(desc[..4].try_into().ok()?) as usize;
                let len = u32::from_le_bytes(desc[4..].try_into().ok()?) as usize;
                return self.map.get(rec + off..rec + off + len);
            }
            if slot.key == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }
}

#[inline]
fn floor_hash(key: u64) -> u64 {
    // Fibonacci hashing, high bits folded down: keys are random already,
    // this only keeps a non-random key set from clustering.
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 32)
}

/// The hugetlbfs mount point the benches use when none is mounted.
const HUGETLBFS_DIR: &str = "/dev/hugepages";
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A reservation of 2 MiB pages in the kernel's pool, given back (and the
/// hugetlbfs mount undone, if this made it) when dropped.
pub struct HugePagePool {
    previous: Option<u64>,
    mounted: Option<PathBuf>,
    made_dir: bool,
    /// Free 2 MiB pages once reserved.
    pub free: u64,
    /// What happened, for the bench's report.
    pub note: String,
}

impl HugePagePool {
    /// Makes sure `pages` 2 MiB pages are free in the pool and a hugetlbfs
    /// is mounted, raising `nr_hugepages` and mounting one if needed (which
    /// takes root). Never fails: the note says what could not be done.
    pub fn reserve(pages: u64) -> HugePagePool {
        let mut pool = HugePagePool {
            previous: None,
            mounted: None,
            made_dir: false,
            free: free_huge_pages(),
            note: String::new(),
        };
        if hugetlbfs_mount().is_none() {
            let dir = Path::new(HUGETLBFS_DIR);
            pool.made_dir = !dir.exists();
            match mount_hugetlbfs(dir) {
                Ok(()) => pool.mounted = Some(PathBuf::from(HUGETLBFS_DIR)),
                Err(e) => {
                    pool.note = format!("no hugetlbfs mounted and mounting one failed: {e}");
                    return pool;
                }
            }
        }
        if pool.free < pages {
            let total = read_u64(NR_HUGEPAGES).unwrap_or(0);
            let want = total + (pages - pool.free);
            match std::fs::write(NR_HUGEPAGES, want.to_string()) {
                Ok(()) => pool.previous = Some(total),
                Err(e) => {
                    pool.note = format!("could not raise nr_hugepages to {want}: {e}");
                    return pool;
                }
            }
            pool.free = free_huge_pages();
        }
        pool.note = if pool.free >= pages {
            format!("{} free 2 MiB pages reserved ({pages} wanted)", pool.free)
        } else {
            format!(
                "only {} of {pages} wanted 2 MiB pages could be reserved (memory too fragmented or too small)",
                pool.free
            )
        };
        pool
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        if let Some(prev) = self.previous
            && let Err(e) = std::fs::write(NR_HUGEPAGES, prev.to_string())
        {
            eprintln!("could not give 2 MiB pages back (nr_hugepages = {prev}): {e}");
        }
        if let Some(dir) = self.mounted.take() {
            let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
                .expect("no NUL in the mount point");
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                eprintln!(
                    "could not unmount {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                );
            } else if self.made_dir {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Free 2 MiB pages in the kernel's pool.
pub fn free_huge_pages() -> u64 {
    read_u64("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").unwrap_or(0)
}

/// Where a hugetlbfs is mounted, if anywhere.
pub fn hugetlbfs_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "hugetlbfs").then(|| PathBuf::from(dir))
    })
}

fn mount_hugetlbfs(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no mount data.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"hugetlbfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The bytes a replica receives: a whole 1 KB session record (8 attributes
/// of 100 B; the first time it sees a SID) and a batch setting one
/// `delta_bytes` attribute.
pub fn replica_payloads(delta_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    use sessio_engine::session::{SessionData, encode_ops, encode_session};
    let mut s = SessionData::default();
    let attrs: Vec<Op> = (0..8)
        .map(|k| Op::Set {
            key: format!("attr{k}"),
            value: vec![b'v'; 100],
        })
        .collect();
    s.apply(&attrs, 0, 1 << 20).expect("a valid session");
    let ops = encode_ops(&[Op::Set {
        key: "cart".into(),
        value: vec![b'd'; delta_bytes],
    }]);
    (encode_session(&s).to_vec(), ops.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_finds_every_key_and_no_other() {
        let f = Floor::build(1000, 0, false).unwrap();
        for (i, &k) in f.keys().iter().enumerate() {
            let field = (i % ATTRS) as u8;
            let v = f.read(k, field).unwrap();
            assert_eq!(v.len(), VALUE_BYTES);
            assert!(v.iter().all(|&b| b == b'a' + field));
        }
        assert!(f.read(12345, 0).is_none());
    }

    #[test]
    fn fixture_reads_what_it_wrote_and_cleans_up() {
        let fx = ArenaFixture::build("selftest", 100, HugePages::Off).unwrap();
        let path = fx.arena().path().to_path_buf();
        assert_eq!(fx.sids().len(), 100);
        for (sid, attr) in picks(fx.sids(), 200, 1) {
            let g = fx.arena().read(sid).unwrap();
            assert_eq!(g.get(KEYS[attr as usize]).unwrap().len(), VALUE_BYTES);
        }
        drop(fx);
        assert!(!path.exists());
    }

    #[test]
    fn estimate_covers_the_arena() {
        let cfg = arena_config(10_000, HugePages::Off);
        let loc = Location::Shm(format!("bench-{}-estimate2", std::process::id()));
        let a = Arena::open(&loc, &cfg).unwrap();
        let mapped = a.stats().mapped_bytes;
        drop(a);
        Arena::remove(&loc).unwrap();
        assert!(huge_pages_needed(&cfg) * HUGE_PAGE >= mapped);
    }
}
