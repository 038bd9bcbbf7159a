//! A full filesystem is an error when the arena is opened, never a `SIGBUS`
//! later. Each test mounts a tmpfs of a few MiB of its own (so it needs
//! root: CI runs as root; without it the tests fail loudly, they do not
//! skip) and checks:
//!
//! - an arena larger than the filesystem is refused with
//!   `OpenError::NoSpace`, whose message names the filesystem, the bytes
//!   needed and free and what to do, and nothing is left behind;
//! - an arena that fits, on a filesystem a neighbour then fills to the last
//!   byte, takes creates and updates until `Full` / `HeapFull` in a child
//!   process, which must exit normally (a signal fails the test);
//! - an old sparse arena is reserved when opened, or refused while the
//!   filesystem has no room for it.
//!
//! One binary is the test driver and the child it spawns (`fill <path>`).

use sessio_engine::{Arena, ArenaConfig, HugePages, Location, NewSession, Op, OpenError};
use sessio_engine::{SessionError, Sid};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/run.rs"]
mod run;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fill") {
        return fill(Path::new(&args[2]));
    }
    private_mounts();
    let tests: Vec<(&'static str, fn())> = vec![
        (
            "too_big_is_refused_and_the_error_says_what_to_do",
            too_big_is_refused_and_the_error_says_what_to_do,
        ),
        (
            "an_arena_that_fits_fills_to_full_on_a_full_filesystem",
            an_arena_that_fits_fills_to_full_on_a_full_filesystem,
        ),
        (
            "a_sparse_arena_is_reserved_or_refused_at_open",
            a_sparse_arena_is_reserved_or_refused_at_open,
        ),
    ];
    run::run_tests(tests, false);
}

const MIB: u64 = 1 << 20;

/// An arena that fits a 16 MiB tmpfs (the participant table alone is 8 MiB).
fn small() -> ArenaConfig {
    ArenaConfig {
        capacity: 1000,
        heap_bytes: 2 * MIB,
        quota_bytes: 64 * 1024,
        huge_pages: HugePages::Off,
    }
}

/// Moves this process (still single-threaded) into a mount namespace of
/// its own, so the tmpfs it mounts are seen by it and its children only and
/// go away with it even if it dies of a signal before `Tmpfs::drop`. Without
/// root nothing is done: the tests then fail at their root check.
fn private_mounts() {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // SAFETY: no threads yet (unshare of the mount namespace needs that);
    // the strings are NUL-terminated literals.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        eprintln!(
            "no private mount namespace ({}): mounts are undone by their guards only",
            std::io::Error::last_os_error()
        );
    }
}

/// A tmpfs of `mib` MiB mounted on a fresh directory; unmounted (and the
/// directory removed) when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(tag: &str, mib: u64) -> Tmpfs {
        // SAFETY: geteuid cannot fail and touches no memory.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test needs root to mount a small tmpfs (CI runs as root)"
        );
        let mut b = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b)
            .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "sessio-nospace-{tag}-{}-{:x}",
            std::process::id(),
            u64::from_le_bytes(b)
        ));
        std::fs::create_dir(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c(dir.to_str().unwrap());
        let opts = c(&format!("size={mib}m,mode=0700"));
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            panic!("mounting a tmpfs on {}: {e}", dir.display());
        }
        Tmpfs { dir }
    }

    fn arena(&self) -> Location {
        Location::File(self.dir.join("arena"))
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Fills what is left of the filesystem with a neighbour's file, to the
    /// last page.
    fn fill_up(&self) -> PathBuf {
        let path = self.dir.join("neighbour");
        let mut f = std::fs::File::create(&path).unwrap();
        let page = vec![0xa5u8; 4096];
        loop {
            match f.write(&page) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        assert!(free_bytes(&self.dir) < 4096, "the filesystem is full");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        let r = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            eprintln!(
                "umount {}: {}",
                self.dir.display(),
                std::io::Error::last_os_error()
            );
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: plain old data; zeroed is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &raw mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn no_space(r: Result<Arena, OpenError>) -> (OpenError, u64, u64, String) {
    match r {
        Err(e @ OpenError::NoSpace { .. }) => {
            let OpenError::NoSpace {
                needed,
                free,
                ref filesystem,
                ..
            } = e
            else {
                unreachable!()
            };
            let fs = filesystem.clone();
            (e, needed, free, fs)
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("opened an arena the filesystem has no room for"),
    }
}

fn too_big_is_refused_and_the_error_says_what_to_do() {
    let fs = Tmpfs::mount("big", 16);
    let loc = fs.arena();
    let (e, needed, free, filesystem) =
        no_space(Arena::open(&loc, &ArenaConfig::for_sessions(100_000, 1024)));
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(needed > 16 * MIB, "{msg}");
    assert!(free <= 16 * MIB && free > 15 * MIB, "{msg}");
    assert_eq!(filesystem, format!("{} (tmpfs)", fs.dir.display()));
    for part in [
        &needed.to_string(),
        &free.to_string(),
        &fs.dir.join("arena").display().to_string(),
        &format!("{} (tmpfs)", fs.dir.display()),
        "smaller capacity or session size",
        &format!("mount -o remount,size=<bytes> {}", fs.dir.display()),
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    assert!(fs.entries().is_empty(), "left behind: {:?}", fs.entries());
    assert_eq!(free_bytes(&fs.dir), free, "nothing stays allocated");
    // The arena that fits is made and fully reserved at once.
    let a = Arena::open(&loc, &small()).unwrap();
    let meta = std::fs::metadata(fs.dir.join("arena")).unwrap();
    assert!(meta.blocks() * 512 >= meta.len(), "reserved at creation");
    drop(a);
    assert_eq!(fs.entries(), ["arena"]);
}

fn an_arena_that_fits_fills_to_full_on_a_full_filesystem() {
    let fs = Tmpfs::mount("fill", 16);
    let loc = fs.arena();
    drop(Arena::open(&loc, &small()).unwrap());
    // A neighbour takes every byte left: a sparse arena would now die of
    // SIGBUS at its first new page.
    fs.fill_up();
    let Location::File(path) = &loc else {
        unreachable!()
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("fill")
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(sig) = out.status.signal() {
        panic!("the filling process died of signal {sig}\nstdout: {stdout}\nstderr: {stderr}");
    }
    assert!(
        out.status.success(),
        "the filling process failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    eprint!("{stdout}");
    assert!(stdout.contains("full: true"), "{stdout}");
}

/// The child: creates sessions until the arena is full, then grows them
/// until the heap is; any other error is a failure (exit 2).
fn fill(path: &Path) {
    let arena = Arena::open_existing(&Location::File(path.to_path_buf())).unwrap();
    let value = vec![0x5au8; 600];
    let mut sids: Vec<Sid> = Vec::new();
    let (mut full, mut heap_full) = (false, false);
    loop {
        match arena.create(NewSession::default(), &[("v", &value)]) {
            Ok(sid) => sids.push(sid),
            Err(SessionError::Full(_)) => {
                full = true;
                break;
            }
            Err(SessionError::HeapFull(_)) => {
                heap_full = true;
                break;
            }
            Err(e) => {
                eprintln!("create: {e}");
                std::process::exit(2);
            }
        }
    }
    let mut updated = 0u64;
    'rounds: for round in 0..64u32 {
        for (k, &sid) in sids.iter().enumerate() {
            let ops = [Op::Set {
                key: format!("k{}", (round as usize + k) % 8),
                value: vec![round as u8; 1500],
            }];
            match arena.update(sid, &ops) {
                Ok(_) => updated += 1,
                Err(SessionError::HeapFull(_)) => {
                    heap_full = true;
                    break 'rounds;
                }
                Err(e) => {
                    eprintln!("update: {e}");
                    std::process::exit(2);
                }
            }
        }
    }
    println!(
        "created {} updated {updated} full: {}",
        sids.len(),
        full && heap_full
    );
}

fn a_sparse_arena_is_reserved_or_refused_at_open() {
    let fs = Tmpfs::mount("sparse", 16);
    let loc = fs.arena();
    let Location::File(path) = &loc else {
        unreachable!()
    };
    let sid = {
        let a = Arena::open(&loc, &small()).unwrap();
        a.create(NewSession::default(), &[("k", b"v")]).unwrap()
    };
    // Make it what an older build left: sparse. The hole goes where only
    // zeros are (participant slots past the first 1 MiB of the 8 MiB
    // table, which no handle here has used), so the data stays as it was.
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    // SAFETY: a valid fd; fallocate touches no memory of ours.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            MIB as i64,
            7 * MIB as i64,
        )
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    drop(f);
    let sparse = std::fs::metadata(path).unwrap().blocks() * 512;
    assert!(sparse <= len - 7 * MIB, "{sparse} of {len} allocated");
    let neighbour = fs.fill_up();
    let (e, needed, free, _) = no_space(Arena::open_existing(&loc));
    eprintln!("{e}");
    assert!(needed >= len - sparse && needed <= len, "{e}");
    assert!(free < 4096, "{e}");
    // The neighbour goes; the arena opens, reserved, with its session.
    std::fs::remove_file(neighbour).unwrap();
    let a = Arena::open_existing(&loc).unwrap();
    assert!(std::fs::metadata(path).unwrap().blocks() * 512 >= len);
    assert!(a.read(sid).is_ok());
}
