//! What the unit tests of the arena's seams share.

use super::Arena;
use crate::map::{ArenaConfig, HugePages, Location};

/// An arena in /dev/shm under a name unique to this test, removed after.
pub(super) struct Scratch(Location);

impl Scratch {
    pub(super) fn new(tag: &str) -> Scratch {
        let loc = Location::Shm(format!("unit-{tag}-{}", std::process::id()));
        let _ = Arena::remove(&loc);
        Scratch(loc)
    }

    /// Opens (creating it the first time) a small arena: 4096 sessions,
    /// an 8 MiB heap, a 60 KiB quota, no huge pages.
    pub(super) fn open(&self) -> Arena {
        let cfg = ArenaConfig {
            capacity: 4096,
            heap_bytes: 8 << 20,
            quota_bytes: 60 * 1024,
            huge_pages: HugePages::Off,
        };
        Arena::open(&self.0, &cfg).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Arena::remove(&self.0);
    }
}
