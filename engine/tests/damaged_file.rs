//! Arena files damaged in ways no crash produces: opening them gives an
//! error or an arena that works. Regression cases found by fuzzing the
//! arena file (`fuzz/fuzz_targets/arena_file.rs`).

use sessio_engine::{Arena, ArenaConfig, HugePages, Location, NewSession, Op, SessionError};
use std::sync::mpsc;
use std::time::Duration;

fn config() -> ArenaConfig {
    ArenaConfig {
        capacity: 64,
        heap_bytes: 1 << 20,
        quota_bytes: 4096,
        huge_pages: HugePages::Off,
    }
}

/// Byte offset of the index slot holding `sid`: a 64-byte aligned line
/// starting with the SID's 16 bytes whose state word says live.
fn slot_of(bytes: &[u8], sid: &[u8; 16]) -> usize {
    (0..bytes.len() - 64)
        .step_by(64)
        .find(|&at| &bytes[at..at + 16] == sid && bytes[at + 16] & 0b11 == 1)
        .expect("the session's index slot")
}

/// A queue head whose sequence number is behind the one the record says it
/// includes (no crash does this: sequence numbers only grow). Recovery must
/// repair it; an update used to spin forever, its batch never applied.
#[test]
fn queue_head_behind_its_record_is_repaired() {
    let dir = std::env::temp_dir().join(format!("sessio-damaged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("arena");
    let loc = Location::File(path.clone());
    let sid = {
        let a = Arena::open(&loc, &config()).unwrap();
        let sid = a.create(NewSession::default(), &[("k", b"v")]).unwrap();
        a.update(
            sid,
            &[Op::Incr {
                key: "n".into(),
                by: 1,
            }],
        )
        .unwrap();
        sid
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let slot = slot_of(&bytes, sid.as_bytes());
    // The head word is the slot's fifth u64; its upper half is the seq.
    let seq_at = slot + 32 + 4;
    let seq = u32::from_le_bytes(bytes[seq_at..seq_at + 4].try_into().unwrap());
    assert_eq!(seq, 1, "one update pushed one node");
    bytes[seq_at..seq_at + 4].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let a = Arena::open_existing(&loc).unwrap();
        let report = a.recovery_report().cloned().unwrap();
        let updated = a.update(
            sid,
            &[Op::Incr {
                key: "n".into(),
                by: 1,
            }],
        );
        let n = a.read(sid).map(|g| g.get("n").map(<[u8]>::to_vec));
        tx.send((report, updated, n)).unwrap();
    });
    let (report, updated, n) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("an update on the reopened arena returns");
    worker.join().unwrap();
    assert_eq!(report.sessions, 1, "{report:?}");
    assert_eq!(report.broken_queues, 1, "{report:?}");
    assert_eq!(updated, Ok(3));
    assert_eq!(n, Ok::<_, SessionError>(Some(2i64.to_le_bytes().to_vec())));
    std::fs::remove_dir_all(&dir).unwrap();
}
