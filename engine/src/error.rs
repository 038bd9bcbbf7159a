//! Errors, one enum per operation. Corruption is kept apart from I/O and from
//! the caller's own mistakes.

use crate::session::OpError;
use std::path::{Path, PathBuf};

/// Opening or creating an arena failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No arena exists at that path.
    #[error("no arena at {0}")]
    NotFound(PathBuf),
    /// The name has characters other than `A-Za-z0-9-_.` or is too long.
    #[error("bad arena name {0:?}: use 1-200 characters of A-Za-z0-9-_. not starting with '.'")]
    BadName(String),
    /// A configuration value is out of range.
    #[error("bad arena config: {field} {why}")]
    BadConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The file is not a sessio arena at all.
    #[error("{path} is not a sessio arena: {why}")]
    NotAnArena {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        why: &'static str,
    },
    /// The arena was written by another format version.
    #[error("{path} has arena format {found}, this build reads format {expected}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Format found in the file.
        found: u32,
        /// Format this build reads.
        expected: u32,
    },
    /// The header's geometry or layout fingerprint does not match this build.
    #[error("{path} has a layout this build does not read: {why}")]
    Layout {
        /// The file.
        path: PathBuf,
        /// What differs.
        why: &'static str,
    },
    /// The file is shorter than its header says.
    #[error("{path} is truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length the header implies.
        expected: u64,
    },
    /// Every participant slot is taken by a live handle.
    #[error("too many open handles on this arena (at most {0})")]
    TooManyHandles(u32),
    /// Huge pages were required and are not available.
    #[error("huge pages unavailable: {0}")]
    HugePages(String),
    /// Recovery found the arena damaged beyond repair.
    #[error("arena {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// The arena file is not one this process may trust: another user owns
    /// it, it grants group or other access, it is a symbolic link, or it is
    /// not a regular file. Someone who can write it can forge sessions;
    /// someone who can read it can read them.
    #[error(
        "refusing arena {path}: {why} (it must be a regular file owned by this user, mode 0600; remove it if unsure)"
    )]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// An arena exists at the name with another configuration than the one
    /// asked for (see [`Arena::open_adopting`](crate::Arena::open_adopting)).
    #[error(
        "arena {path} exists with {found}, but {asked} was asked for: open it with its own configuration, adopt it as it is, or remove it"
    )]
    ConfigMismatch {
        /// The file.
        path: PathBuf,
        /// The existing arena's configuration.
        found: String,
        /// The one asked for.
        asked: String,
    },
    /// The filesystem holding the arena has not enough free space for the
    /// arena's bytes. Arenas reserve every byte they map when they are
    /// created or opened, so a full filesystem is this error, never a
    /// `SIGBUS` later.
    #[error(
        "no space for arena {path}: it needs {needed} more bytes ({}) on {filesystem}, which has {free} bytes ({}) free; open it with a smaller capacity or session size, free space there, or {}",
        mib(*.needed),
        mib(*.free),
        enlarge(.filesystem)
    )]
    NoSpace {
        /// The arena file.
        path: PathBuf,
        /// The filesystem: its mount point and type, e.g. `/dev/shm (tmpfs)`.
        filesystem: String,
        /// Bytes still to reserve (the whole arena when creating it).
        needed: u64,
        /// Bytes free on that filesystem for this user.
        free: u64,
    },
    /// The filesystem cannot reserve space (it has no `fallocate`), so a
    /// sparse arena there could die of `SIGBUS` when the filesystem fills.
    #[error(
        "arena {path} cannot be reserved on {filesystem}: it does not support fallocate; put the arena on a tmpfs (/dev/shm) or a local filesystem such as ext4 or xfs"
    )]
    CannotReserve {
        /// The arena file.
        path: PathBuf,
        /// The filesystem: its mount point and type.
        filesystem: String,
    },
    /// The operating system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// `bytes` in MiB, for messages.
fn mib(bytes: u64) -> String {
    let tenths = ((bytes % (1 << 20)) * 10) >> 20;
    format!("{}.{tenths} MiB", bytes >> 20)
}

/// How to make the filesystem described as `filesystem` (`mount point
/// (type)`) larger.
fn enlarge(filesystem: &str) -> String {
    let (mount, kind) = filesystem
        .rsplit_once(" (")
        .map_or((filesystem, ""), |(m, k)| (m, k.trim_end_matches(')')));
    match kind {
        "tmpfs" => format!("enlarge it: mount -o remount,size=<bytes> {mount}"),
        "hugetlbfs" => "reserve more 2 MiB pages (sysctl vm.nr_hugepages)".into(),
        _ => "enlarge that filesystem".into(),
    }
}

impl OpenError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> OpenError {
        OpenError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An operation on a session failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// No live session has that SID (never existed, invalidated or expired).
    #[error("no such session")]
    NotFound,
    /// The arena holds as many sessions as its capacity allows.
    #[error("arena full: {0} sessions live")]
    Full(u64),
    /// The heap has no free block large enough.
    #[error("arena heap full: no free block of {0} bytes")]
    HeapFull(u64),
    /// The update was refused; the session is unchanged.
    #[error(transparent)]
    Op(#[from] OpError),
    /// The record would not fit the largest block even below quota.
    #[error("session record of {0} bytes is larger than the arena's largest block")]
    TooLarge(u64),
    /// Shared memory holds something that cannot be: damaged memory or a bug.
    #[error("arena corrupt: {0}")]
    Corrupt(&'static str),
    /// A snapshot handed to `install` did not validate.
    #[error("invalid snapshot: {0}")]
    BadSnapshot(String),
    /// The arena holds a copy of the session with a newer ownership epoch.
    #[error("stale ownership epoch {offered}, the arena holds epoch {held}")]
    StaleEpoch {
        /// Epoch offered.
        offered: u64,
        /// Epoch held.
        held: u64,
    },
}

impl From<crate::queue::Broken> for SessionError {
    fn from(_: crate::queue::Broken) -> SessionError {
        SessionError::Corrupt("update queue chain is broken")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_says_how_to_enlarge_each_kind_of_filesystem() {
        let e = |filesystem: &str| {
            OpenError::NoSpace {
                path: "/dev/shm/sessio-shop".into(),
                filesystem: filesystem.into(),
                needed: 3 << 30,
                free: (1 << 30) + (1 << 19),
            }
            .to_string()
        };
        let shm = e("/dev/shm (tmpfs)");
        assert!(
            shm.contains("needs 3221225472 more bytes (3072.0 MiB) on /dev/shm (tmpfs)"),
            "{shm}"
        );
        assert!(shm.contains("1074266112 bytes (1024.5 MiB) free"), "{shm}");
        assert!(
            shm.ends_with("mount -o remount,size=<bytes> /dev/shm"),
            "{shm}"
        );
        assert!(e("/dev/hugepages (hugetlbfs)").ends_with("(sysctl vm.nr_hugepages)"));
        assert!(e("/ (ext4)").ends_with("enlarge that filesystem"));
    }
}
