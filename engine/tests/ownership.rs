//! Arena files another user could read or forge are refused: a file owned
//! by someone else, one with group or other access, a symbolic link. The
//! case of another user's file needs root to set up (CI runs as root); it
//! fails loudly, rather than passing, without it.

mod common;

use common::{TempArena, small_config};
use sessio_engine::{Arena, Location, NewSession, OpenError};
use std::os::unix::fs::PermissionsExt;

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn untrusted(r: Result<Arena, OpenError>) -> String {
    match r {
        Err(OpenError::Untrusted { why, .. }) => why,
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("opened an arena it should have refused"),
    }
}

#[test]
fn an_arena_others_may_read_is_refused_and_the_error_says_why() {
    let t = TempArena::new("mode");
    let sid = {
        let a = t.open(&small_config());
        a.create(NewSession::default(), &[("k", b"v")]).unwrap()
    };
    let path = t.loc.path().unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600,
        "created private"
    );
    chmod(&path, 0o644);
    let why = untrusted(Arena::open_existing(&t.loc));
    assert!(why.contains("0644"), "{why}");
    let why = untrusted(Arena::open(&t.loc, &small_config()));
    assert!(why.contains("0644"), "{why}");
    // An operator tool may still look, on purpose.
    assert!(Arena::open_foreign(&t.loc).unwrap().read(sid).is_ok());
    chmod(&path, 0o600);
    assert!(Arena::open_existing(&t.loc).unwrap().read(sid).is_ok());
}

#[test]
fn a_symbolic_link_is_refused_even_for_a_tool() {
    let t = TempArena::new("link");
    drop(t.open(&small_config()));
    let dir = tempfile_dir("link");
    let link = dir.join("arena");
    std::os::unix::fs::symlink(t.loc.path().unwrap(), &link).unwrap();
    let loc = Location::File(link);
    assert!(untrusted(Arena::open_existing(&loc)).contains("symbolic link"));
    assert!(untrusted(Arena::open_foreign(&loc)).contains("symbolic link"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The reproduction: another local user pre-creates the arena's name with
/// mode 0666; the host must not adopt it (that user could then read and
/// forge its sessions).
#[test]
fn an_arena_another_user_created_is_refused() {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to create a file another user owns (CI runs as root)"
    );
    let t = TempArena::new("victim");
    drop(t.open(&small_config()));
    let path = t.loc.path().unwrap();
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    chmod(&path, 0o666);
    let why = untrusted(Arena::open(&t.loc, &small_config()));
    assert!(why.contains("owned by uid 65534"), "{why}");
    // Private mode does not make it ours.
    chmod(&path, 0o600);
    let why = untrusted(Arena::open_existing(&t.loc));
    assert!(why.contains("owned by uid 65534"), "{why}");
    assert!(Arena::open_foreign(&t.loc).is_ok());
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sessio-own-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
