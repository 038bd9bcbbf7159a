//! Epoch-based reclamation across processes: the three steps whose ordering
//! makes it safe, kept apart so the loom model checks exactly this code.
//!
//! A reader pins itself at the current global epoch (a `SeqCst` store
//! followed by a `SeqCst` fence) before it loads any published offset. A
//! writer unpublishes a block, then bumps the global epoch (`SeqCst`) and
//! tags the block with the epoch before the bump. The block may be freed
//! once every live participant is unpinned or pinned at a later epoch: a
//! participant pinned later pinned after the bump, hence after the
//! unpublish, so it can only have loaded the new offset. A participant
//! whose process died is skipped: the kernel lock says it is dead, and a
//! dead process reads nothing.

use crate::sync::{AtomicU64, Ordering, fence};

/// Pins `pin` at the current epoch; the caller then loads published offsets.
#[inline]
pub fn pin(global: &AtomicU64, pin: &AtomicU64) {
    let e = global.load(Ordering::Relaxed);
    pin.store(e, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Ends a pin.
#[inline]
pub fn unpin(pin: &AtomicU64) {
    pin.store(0, Ordering::Release);
}

/// Called after a block was unpublished: returns the epoch to tag it with.
/// The fence orders the unpublishing store (any ordering) before the pin
/// scan that decides whether to free: without it the scan may miss a
/// reader that still loads the old offset (the loom model finds that case).
#[inline]
pub fn retire(global: &AtomicU64) -> u64 {
    fence(Ordering::SeqCst);
    global.fetch_add(1, Ordering::SeqCst)
}

/// Reads one participant's pin for the reclaimer's scan.
#[inline]
pub fn scan(pin: &AtomicU64) -> u64 {
    pin.load(Ordering::SeqCst)
}

/// Whether a block tagged `retired` may be freed, given the oldest pin
/// (`u64::MAX` when nobody is pinned) among live participants.
#[inline]
pub fn may_free(retired: u64, oldest_pin: u64) -> bool {
    retired < oldest_pin
}
