//! Reserving an arena's bytes on its filesystem.
//!
//! An arena file is mapped shared; a page of it that the filesystem cannot
//! back when it is first touched kills the process with `SIGBUS`. A tmpfs
//! (`/dev/shm`) or a disk fills up with everything else on the host, so an
//! arena reserves all its bytes with `fallocate(2)` (mode 0: allocate, never
//! change data) before anyone maps it, and a filesystem without the room
//! is a clear [`OpenError::NoSpace`] instead of a signal later.
//!
//! - Creation reserves the temporary file before it is linked under its
//!   name: an arena that exists is an arena that is reserved.
//! - Opening an existing arena reserves whatever part of it is not yet
//!   allocated (an arena made by an older build, which was sparse). Mode 0
//!   `fallocate` leaves allocated ranges and their data alone, so this is
//!   safe while other processes use the arena. A file whose blocks already
//!   cover its length is not asked again, which keeps opening cheap.
//! - hugetlbfs allocates huge pages on `fallocate` (and fails with
//!   `ENOSPC` when the pool has too few), which also holds them for the
//!   mapping.
//! - A filesystem that has no `fallocate` (`EOPNOTSUPP`) is refused
//!   ([`OpenError::CannotReserve`]) rather than reserved by writing zeros:
//!   writing zeros over a live shared arena would race with its writers,
//!   and on copy-on-write filesystems it would reserve nothing anyway.

use crate::error::OpenError;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Makes sure the first `len` bytes of `file` (the arena at `path`) are
/// allocated on its filesystem, allocating them if not.
pub(crate) fn reserve(file: &File, path: &Path, len: u64) -> Result<(), OpenError> {
    let allocated = allocated(file, path)?;
    if allocated >= len {
        return Ok(());
    }
    let Ok(off_len) = libc::off_t::try_from(len) else {
        return Err(OpenError::io(
            path,
            io::Error::from_raw_os_error(libc::EFBIG),
        ));
    };
    // Measured before: a filesystem may keep what a failed fallocate got
    // (ext4, hugetlbfs) until the file goes.
    let (filesystem, free) = describe(path);
    let no_space = |filesystem| OpenError::NoSpace {
        path: path.to_path_buf(),
        filesystem,
        needed: len - allocated,
        free: free.unwrap_or(0),
    };
    // A tmpfs fills up page by page before it gives up (and then gives the
    // pages back): a reservation that cannot succeed must not take the
    // last bytes of a /dev/shm the whole host shares, even for a moment.
    if free.is_some_and(|free| free < len - allocated) {
        return Err(no_space(filesystem));
    }
    loop {
        // SAFETY: a valid open fd; fallocate touches no memory of ours.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            // A signal interrupted it (tmpfs undoes what it did): again.
            Some(libc::EINTR) => continue,
            Some(libc::ENOSPC | libc::EDQUOT) => no_space(filesystem),
            Some(libc::EOPNOTSUPP) => OpenError::CannotReserve {
                path: path.to_path_buf(),
                filesystem,
            },
            _ => OpenError::io(path, e),
        });
    }
}

/// Bytes of `file` its filesystem has allocated.
fn allocated(file: &File, path: &Path) -> Result<u64, OpenError> {
    let meta = file.metadata().map_err(|e| OpenError::io(path, e))?;
    Ok(meta.blocks().saturating_mul(512))
}

/// The filesystem holding `path` (its mount point and type, e.g.
/// `/dev/shm (tmpfs)`) and the bytes free on it for this user, if it has
/// a size (a tmpfs mounted with `size=0` has none).
pub(crate) fn describe(path: &Path) -> (String, Option<u64>) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let (mount, kind) = mount_of(&dir).unwrap_or_else(|| (dir.clone(), "unknown".into()));
    let mut free = statvfs_free(&dir);
    if kind == "hugetlbfs" && free.is_none() {
        // A hugetlbfs without a size limit reports nothing: what it can
        // give is the pool's free pages not yet promised to a mapping.
        free = Some(huge_pages_available());
    }
    (format!("{} ({kind})", mount.display()), free)
}

/// The mount point and type of the filesystem `dir` (canonical) is on: the
/// last-mounted of the longest mount points that contain it.
fn mount_of(dir: &Path) -> Option<(PathBuf, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mut best: Option<(PathBuf, String)> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(point), Some(kind)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| point.as_os_str().len() >= b.as_os_str().len());
        if dir.starts_with(&point) && longer {
            best = Some((point, kind.to_string()));
        }
    }
    best
}

/// Undoes the octal escapes (`\040` for a space) of a mount point.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bytes free for this user on the filesystem of `dir`; `None` if it
/// reports no size.
fn statvfs_free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` is plain old data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid pointer to a `statvfs`.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 || st.f_blocks == 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Bytes of 2 MiB pages free in the pool and not reserved by a mapping.
fn huge_pages_available() -> u64 {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages")) * (2 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn dev_shm_is_described_as_its_mount() {
        let (fs, free) = describe(Path::new("/dev/shm/sessio-x"));
        assert!(fs.starts_with("/dev/shm (tmpfs)"), "{fs}");
        assert!(free.is_some_and(|f| f > 0), "{free:?}");
    }
}
