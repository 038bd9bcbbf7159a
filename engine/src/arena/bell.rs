//! The replicator's doorbell. A replicator with nothing to ship marks the
//! arena's dirty hint [`HINT_ASLEEP`] and sleeps on it (a futex in the shared
//! mapping, so processes that never heard of the replicator can wake it);
//! the first process to mark a session dirty after that wakes it. An idle
//! host's replicator then costs nothing, and a lone update is shipped at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Arena;
use crate::layout::{HINT_ASLEEP, HINT_CLEAR, HINT_SET};
use crate::map::Map;
use crate::sync::Ordering;

/// How long one [`Arena::urge_replication`] lasts, ms.
pub const URGENT_MS: u64 = 50;

/// A handle on an arena's dirty hint that any thread may hold and wait on
/// (an [`Arena`] handle is not `Sync`).
#[derive(Clone)]
pub struct DirtyBell {
    map: Arc<Map>,
}

impl std::fmt::Debug for DirtyBell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBell")
            .field("arena", &self.map.path)
            .finish()
    }
}

impl Arena {
    /// A doorbell on this arena's dirty hint, for a thread that waits for
    /// the replicator.
    pub fn dirty_bell(&self) -> DirtyBell {
        DirtyBell {
            map: Arc::clone(&self.map),
        }
    }

    /// Marks the replicator asleep unless something was marked since its
    /// last [`Arena::take_dirty`]: `false` means take first. While asleep,
    /// the next mark wakes [`DirtyBell::wait`].
    pub fn dirty_sleep(&self) -> bool {
        match self.header().dirty_hint.compare_exchange(
            HINT_CLEAR,
            HINT_ASLEEP,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => true,
            Err(h) => h == HINT_ASLEEP,
        }
    }

    /// Tells the replicator that a writer waits for its acks (a durable
    /// update): for the next [`URGENT_MS`] it ships as soon as a link is
    /// free instead of on its tick. Cheap to call per update: the word is
    /// written at most twice per [`URGENT_MS`].
    pub fn urge_replication(&self) {
        let now = crate::clock::now_ms();
        let until = &self.header().urgent_until_ms;
        if until.load(Ordering::Relaxed) < now + URGENT_MS / 2 {
            until.store(now + URGENT_MS, Ordering::Relaxed);
        }
    }

    /// Whether a writer urged replication within the last [`URGENT_MS`].
    pub fn replication_urged(&self) -> bool {
        crate::clock::now_ms() < self.header().urgent_until_ms.load(Ordering::Relaxed)
    }

    /// Sets the hint after a dirty bit and its summaries: wakes a sleeping
    /// replicator. The store is skipped while the hint is set already, so
    /// a busy arena does not bounce the line.
    pub(super) fn raise_hint(&self) {
        let hint = &self.header().dirty_hint;
        if hint.load(Ordering::SeqCst) != HINT_SET
            && hint.swap(HINT_SET, Ordering::SeqCst) == HINT_ASLEEP
        {
            futex_wake(self.map.dirty_hint_ptr());
        }
    }
}

impl DirtyBell {
    /// Whether the replicator is still asleep: nothing was marked since it
    /// went to sleep.
    pub fn asleep(&self) -> bool {
        self.map.header().dirty_hint.load(Ordering::SeqCst) == HINT_ASLEEP
    }

    /// Blocks until something is marked (or [`DirtyBell::ring`] is called)
    /// while the replicator is asleep, or `timeout` has passed. Returns at
    /// once when it is not asleep.
    pub fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.asleep() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            futex_wait(self.map.dirty_hint_ptr(), HINT_ASLEEP, left);
        }
    }

    /// Wakes a sleeping replicator with nothing marked (to stop it, say):
    /// its next take walks the summaries and finds what there is.
    pub fn ring(&self) {
        if self
            .map
            .header()
            .dirty_hint
            .swap(HINT_SET, Ordering::SeqCst)
            == HINT_ASLEEP
        {
            futex_wake(self.map.dirty_hint_ptr());
        }
    }
}

/// Sleeps while `*word == expected`, up to `timeout` (or a spurious wake).
/// Not a private futex: the word is in memory shared with other processes.
fn futex_wait(word: *const u32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos().cast_signed()),
    };
    // SAFETY: `word` points at the dirty hint in a mapping the caller's
    // `Arc<Map>` keeps alive; the kernel only reads it and `ts`. An error
    // (EAGAIN: the value changed; EINTR; ETIMEDOUT) is a return, which the
    // caller's loop checks.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every waiter on `word`.
fn futex_wake(word: *const u32) {
    // SAFETY: `word` points at the dirty hint inside a live mapping; the
    // kernel only uses its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
