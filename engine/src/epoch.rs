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
//!
//! A pin word also says whether its participant is inside a mutation (an
//! allocation, a link, a retire or a free is under way): the top bit,
//! [`MUTATING`]. A collection waits until no live participant has it set,
//! so it sees the heap at rest (`arena::collect`).
//!
//! ```text
//! pin word (u64)
//! | mutating | pinned epoch (0 = not pinned) |
//! |   1 bit  |            63 bits            |
//! ```

use crate::sync::{AtomicU32, AtomicU64, Ordering, fence};

/// Flag of a pin word: the participant is inside a mutation.
pub const MUTATING: u64 = 1 << 63;

/// The epoch a pin word holds (0 = not pinned).
#[inline]
pub const fn pinned_epoch(word: u64) -> u64 {
    word & !MUTATING
}

/// Whether a pin word says its participant is inside a mutation.
#[inline]
pub const fn is_mutating(word: u64) -> bool {
    word & MUTATING != 0
}

/// Pins `pin` at the current epoch; the caller then loads published offsets.
#[inline]
pub fn pin(global: &AtomicU64, pin: &AtomicU64) {
    let e = global.load(Ordering::Relaxed);
    pin.store(e, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Publishes a pin word (an epoch, maybe with [`MUTATING`]) with the same
/// ordering as [`pin`]: what the caller loads next is ordered after it.
#[inline]
pub fn pin_at(pin: &AtomicU64, word: u64) {
    pin.store(word, Ordering::SeqCst);
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

/// Mutator half of the collection handshake: publishes `held | MUTATING`
/// in `pin`, then reads the collector's word and returns it. 0 (or the
/// caller's own owner word) means go on; anything else means a collection
/// runs: the caller takes its mark back and waits. `SeqCst` on both halves
/// (Dekker): either the collector sees the mark or the mutator sees the
/// collector, never neither.
#[inline]
pub fn enter_mutation(pin: &AtomicU64, held: u64, world: &AtomicU32) -> u32 {
    pin_at(pin, held | MUTATING);
    world.load(Ordering::SeqCst)
}

/// Collector half: claims the world word (`from` → `me`), ordered before
/// the scan of pins that follows. `Err` holds the word found instead.
#[inline]
pub fn stop_world(world: &AtomicU32, from: u32, me: u32) -> Result<(), u32> {
    world.compare_exchange(from, me, Ordering::SeqCst, Ordering::SeqCst)?;
    fence(Ordering::SeqCst);
    Ok(())
}

/// Collector half: whether the participant of `pin` is outside a mutation
/// (what it did inside one happens before this returns true).
#[inline]
pub fn at_rest(pin: &AtomicU64) -> bool {
    !is_mutating(pin.load(Ordering::SeqCst))
}
