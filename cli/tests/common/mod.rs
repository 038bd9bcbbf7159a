//! Helpers shared by the integration tests (each test binary compiles its
//! own copy and uses a part of it).
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use sessio_engine::{Arena, ArenaConfig, Location};

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests holding this run one at a time, so their processes do not fight
/// over the two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A name no other test of any process uses.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "rt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A shared-memory arena removed on drop (after the handle closes).
pub struct TestArena {
    /// Its shared-memory name.
    pub name: String,
    loc: Location,
    arena: Option<Arena>,
}

impl TestArena {
    /// A new arena for `sessions` sessions of about 1 KiB.
    pub fn new(tag: &str, sessions: u64) -> TestArena {
        let name = unique(tag);
        let loc = Location::Shm(name.clone());
        let arena = Arena::open(&loc, &ArenaConfig::for_sessions(sessions, 1024)).unwrap();
        TestArena {
            name,
            loc,
            arena: Some(arena),
        }
    }

    /// Names an arena another process creates, for cleanup only.
    pub fn foreign(name: &str) -> TestArena {
        TestArena {
            name: name.to_string(),
            loc: Location::Shm(name.to_string()),
            arena: None,
        }
    }

    /// The open handle.
    pub fn get(&self) -> &Arena {
        self.arena.as_ref().unwrap()
    }
}

impl Drop for TestArena {
    fn drop(&mut self) {
        self.arena = None;
        let _ = Arena::remove(&self.loc);
    }
}
