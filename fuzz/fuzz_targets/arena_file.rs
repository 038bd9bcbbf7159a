//! Arbitrary bytes opened as an arena file: opening returns an error or a
//! working arena, never a crash. On success the arena is used the way a
//! host uses it (stats, a scan, reads, a create, an update, a sweep, a
//! collection) and then closed and opened again, which must succeed.
//!
//! Random bytes fail the header checks at once; the deep paths (recovery,
//! the allocator rebuild, queue repair) are reached by mutating a valid
//! arena. Such an arena is several MiB, mostly zeros, so it is not checked
//! in: with `SESSIO_FUZZ_ARENA_SEED=<dir>` set, the target writes a small
//! arena with a few sessions into `<dir>` before fuzzing starts (see
//! `smoke.sh`, which also raises `-max_len` to its size).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_engine::{Arena, ArenaConfig, HugePages, Location, NewSession, Op};
use std::path::{Path, PathBuf};

/// The seed's geometry: the smallest heap and a small index.
fn seed_config() -> ArenaConfig {
    ArenaConfig {
        capacity: 64,
        heap_bytes: 1 << 20,
        quota_bytes: 4096,
        huge_pages: HugePages::Off,
    }
}

/// A valid arena with sessions in every state a clean close leaves: plain,
/// updated (so its record carries a delta log), with TTLs, and removed.
fn write_seed(dir: &Path) {
    let path = dir.join("seed-small-arena");
    if path.exists() {
        return;
    }
    std::fs::create_dir_all(dir).expect("seed directory");
    let loc = Location::File(path);
    let a = Arena::open(&loc, &seed_config()).expect("create the seed arena");
    let plain = a
        .create(NewSession::default(), &[("user", b"ada")])
        .expect("create");
    let busy = a
        .create(
            NewSession {
                idle_ttl_ms: 30 * 60 * 1000,
                lifetime_ms: 0,
            },
            &[("cart", b"3 apples")],
        )
        .expect("create");
    for i in 0..5u8 {
        a.update(
            busy,
            &[
                Op::Incr {
                    key: "n".into(),
                    by: 1,
                },
                Op::Append {
                    key: "seen".into(),
                    item: vec![i; 3],
                    max_items: 3,
                },
            ],
        )
        .expect("update");
    }
    let short = a
        .create(
            NewSession {
                idle_ttl_ms: 0,
                lifetime_ms: 1000,
            },
            &[("k", &[7; 300])],
        )
        .expect("create");
    a.invalidate(short).expect("invalidate");
    a.update(plain, &[Op::Remove { key: "user".into() }, Op::Touch])
        .expect("update");
    let _ = a.create(NewSession::default(), &[("big", &[1; 2000])]);
}

/// This process's scratch file, in shared memory like a named arena.
fn scratch() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        PathBuf::from(format!(
            "/dev/shm/sessio-fuzz-arena-file-{}",
            std::process::id()
        ))
    })
}

fn exercise(a: &Arena) {
    let stats = a.stats();
    assert!(stats.live <= stats.capacity);
    let sids = a.sids();
    for &sid in &sids {
        if let Ok(g) = a.read(sid) {
            // Recovery dropped every record that failed validation.
            assert!(g.verify(), "a record that survived recovery verifies");
            let _ = g.to_owned();
        }
    }
    if let Ok(sid) = a.create(NewSession::default(), &[("fuzz", b"x")]) {
        let _ = a.update(
            sid,
            &[Op::Incr {
                key: "n".into(),
                by: 1,
            }],
        );
        if let Ok(g) = a.read(sid) {
            assert!(g.verify());
        }
    }
    if let Some(&sid) = sids.first() {
        let _ = a.update(
            sid,
            &[Op::Set {
                key: "k".into(),
                value: b"v".to_vec(),
            }],
        );
    }
    let _ = a.sweep(u64::MAX / 2, u64::MAX);
    let _ = a.collect();
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("SESSIO_FUZZ_ARENA_SEED") {
            write_seed(Path::new(&dir));
        }
    },
    |data: &[u8]| {
        let path = scratch();
        let loc = Location::File(path.to_path_buf());
        // Mode 0600, as the engine requires of an arena it opens: a
        // world-readable file would be refused before any byte is read.
        let _ = std::fs::remove_file(path);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(data))
                .expect("write the scratch arena");
        }
        if let Ok(a) = Arena::open_existing(&loc) {
            exercise(&a);
            drop(a);
            let again = Arena::open_existing(&loc).expect("an arena that opened reopens");
            let r = again.recovery_report().expect("opened alone: recovered");
            assert_eq!(r.corrupt_records, 0, "recovery left a corrupt record: {r:?}");
            exercise(&again);
        }
        let _ = std::fs::remove_file(path);
    }
);
