//! The combiner lock of a session and the owner words used across processes.
//!
//! ```text
//! owner word (u32)
//! | participant generation | participant slot + 1 |
//! |        16 bits         |        16 bits       |
//! 0 = free
//! ```
//!
//! A participant is one open arena handle; its slot in the arena carries a
//! generation bumped at every claim, and a byte-range lock that the kernel
//! drops when the process dies. A lock held by an owner whose slot is no
//! longer locked, or whose slot now has another generation, belongs to the
//! dead and may be stolen with one CAS. PID reuse cannot fool this: the
//! kernel lock, not the PID, says who is alive.

use crate::sync::{AtomicU32, Ordering};

/// Packs an owner word.
#[inline]
pub const fn owner(generation: u16, slot: u16) -> u32 {
    ((generation as u32) << 16) | (slot as u32 + 1)
}

/// The participant slot of a non-zero owner word.
#[inline]
pub const fn owner_slot(word: u32) -> u16 {
    ((word & 0xffff) - 1) as u16
}

/// The generation of a non-zero owner word.
#[inline]
pub const fn owner_generation(word: u32) -> u16 {
    (word >> 16) as u16
}

/// Tries to take a free lock. On failure returns the current holder.
#[inline]
pub fn try_lock(word: &AtomicU32, me: u32) -> Result<(), u32> {
    match word.compare_exchange(0, me, Ordering::SeqCst, Ordering::Acquire) {
        Ok(_) => Ok(()),
        Err(0) => Err(0),
        Err(holder) => Err(holder),
    }
}

/// Takes the lock over from a holder known to be dead. Fails if the word
/// changed meanwhile (someone else stole it, or it was released).
#[inline]
pub fn steal(word: &AtomicU32, dead: u32, me: u32) -> bool {
    word.compare_exchange(dead, me, Ordering::SeqCst, Ordering::Relaxed)
        .is_ok()
}

/// Releases a lock held by `me`.
#[inline]
pub fn unlock(word: &AtomicU32, me: u32) {
    let prev = word.swap(0, Ordering::SeqCst);
    debug_assert_eq!(prev, me, "released a lock held by another owner");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_word_round_trips() {
        // The corners of the encoding: slot `u16::MAX` has no word (its + 1
        // would spill into the generation).
        for (generation, slot) in [(0, 0), (0xbeef, 1022), (u16::MAX, u16::MAX - 1)] {
            let w = owner(generation, slot);
            assert_ne!(w, 0, "an owner word never reads as a free lock");
            assert_eq!((owner_generation(w), owner_slot(w)), (generation, slot));
        }
    }

    #[test]
    fn lock_steal_unlock() {
        let l = AtomicU32::new(0);
        let a = owner(1, 0);
        let b = owner(1, 1);
        assert_eq!(try_lock(&l, a), Ok(()));
        assert_eq!(try_lock(&l, b), Err(a));
        assert!(steal(&l, a, b));
        assert!(!steal(&l, a, b));
        unlock(&l, b);
        assert_eq!(try_lock(&l, a), Ok(()));
    }
}
