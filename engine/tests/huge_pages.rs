//! `HugePages::Try`, what `ArenaConfig::for_sessions` asks for: an arena on
//! 2 MiB pages when a mounted hugetlbfs has enough free pages, on 4 KiB
//! pages in /dev/shm otherwise, with no error either way. As root (CI runs
//! it so): it mounts a hugetlbfs if none is, sets `vm.nr_hugepages`, and
//! puts both back when it ends. Its own test binary, so no other test's
//! arena lands on the pages it reserves.

use sessio_engine::{Arena, ArenaConfig, Location, NewSession};
use std::path::PathBuf;

const NR: &str = "/proc/sys/vm/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_u64(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path} is not a number: {e}"))
}

fn hugetlbfs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
}

/// The machine's huge page settings as they were, put back on drop.
struct Restore {
    nr: u64,
    mounted: Option<PathBuf>,
}

impl Restore {
    fn take() -> Restore {
        let mut r = Restore {
            nr: read_u64(NR),
            mounted: None,
        };
        if !hugetlbfs_mounted() {
            let dir = std::env::temp_dir().join(format!("sessio-hugetlbfs-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let c = |s: &str| std::ffi::CString::new(s).unwrap();
            let path = c(dir.to_str().unwrap());
            // SAFETY: valid NUL-terminated strings; mount(2) reads them only.
            let rc = unsafe {
                libc::mount(
                    c("none").as_ptr(),
                    path.as_ptr(),
                    c("hugetlbfs").as_ptr(),
                    0,
                    c("mode=0700").as_ptr().cast(),
                )
            };
            assert_eq!(
                rc,
                0,
                "mounting a hugetlbfs at {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
            r.mounted = Some(dir);
        }
        r
    }
}

/// Sets the pool to `pages` (a [`Restore`] puts the old size back) and
/// returns how many are free.
fn pool(pages: u64) -> u64 {
    std::fs::write(NR, pages.to_string()).expect("writing vm.nr_hugepages");
    read_u64(FREE)
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, self.nr.to_string());
        if let Some(dir) = self.mounted.take() {
            let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            // SAFETY: a valid path string; we mounted it above.
            unsafe { libc::umount2(path.as_ptr(), 0) };
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn open_and_use(name: &str, cfg: &ArenaConfig) -> bool {
    let loc = Location::Shm(format!("{name}-{}", std::process::id()));
    let _ = Arena::remove(&loc);
    let a = Arena::open(&loc, cfg).expect("Try never fails for want of huge pages");
    let sid = a.create(NewSession::default(), &[("k", b"v")]).unwrap();
    assert_eq!(a.read(sid).unwrap().get("k"), Some(&b"v"[..]));
    let huge = a.huge_pages();
    drop(a);
    Arena::remove(&loc).unwrap();
    huge
}

#[test]
fn try_takes_2_mib_pages_when_there_are_enough_and_falls_back_when_not() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test mounts a hugetlbfs and reserves 2 MiB pages, which needs root \
         (effective uid here: {euid}); CI runs it as root"
    );
    let cfg = ArenaConfig::for_sessions(1000, 1024);
    let needed = cfg.sizing().mapped_bytes.div_ceil(2 << 20);
    let restore = Restore::take();
    // Enough pages: the arena is on them, and gives them back when removed.
    let free = pool(needed + 4);
    assert!(
        free >= needed,
        "the kernel gave {free} free 2 MiB pages of the {} asked for ({needed} needed)",
        needed + 4
    );
    assert!(
        open_and_use("huge-try", &cfg),
        "enough free pages, but 4 KiB pages used"
    );
    assert_eq!(
        read_u64(FREE),
        free,
        "the removed arena's pages are free again"
    );
    // Too few: 4 KiB pages in /dev/shm, no error.
    pool(needed / 2);
    assert!(
        !open_and_use("huge-short", &cfg),
        "2 MiB pages used though too few were free"
    );
    // None: the same.
    pool(0);
    assert!(!open_and_use("huge-none", &cfg));
    drop(restore);
}
