//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sessio_engine::{Arena, ArenaConfig, Location};

/// A uniquely named shared-memory arena, removed when dropped.
pub struct TempArena {
    pub loc: Location,
}

impl TempArena {
    pub fn new(tag: &str) -> TempArena {
        let n = std::sync::atomic::AtomicU64::new(0);
        let _ = n;
        let mut b = [0u8; 6];
        getrandom_fill(&mut b);
        let name = format!("test-{tag}-{}-{:02x?}", std::process::id(), b)
            .replace([' ', ',', '[', ']'], "");
        TempArena {
            loc: Location::Shm(name),
        }
    }

    pub fn open(&self, cfg: &ArenaConfig) -> Arena {
        Arena::open(&self.loc, cfg).expect("open arena")
    }
}

impl Drop for TempArena {
    fn drop(&mut self) {
        let _ = Arena::remove(&self.loc);
    }
}

fn getrandom_fill(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .expect("urandom");
}

pub fn small_config() -> ArenaConfig {
    ArenaConfig::for_sessions(1000, 1024)
}
