//! What a host's processes coordinate through above the arena: one claim
//! per SID being fetched from the bank, so a miss seen by many processes
//! costs one fetch; a token bucket that bounds how fast the host asks the
//! bank; and the election of the one handle that sweeps expired sessions.
//!
//! Each is a word in the header (`layout::HostWords`), owned through lock
//! owner words, so a claim or an election held by a dead process is seen
//! as such and taken over: nothing here can wedge a host.

use super::Arena;
use crate::layout::FETCH_CLAIMS;
use crate::lock;
use crate::sid::Sid;
use crate::sync::{AtomicU64, Ordering};
use crate::words::{BUCKET_TOKENS_MAX, bucket_unpack, bucket_word, claim_unpack, claim_word};

/// The outcome of [`Arena::claim_fetch`].
#[derive(Debug)]
pub enum FetchClaim<'a> {
    /// This handle is to fetch the session; the claim ends when the guard
    /// drops.
    Mine(FetchGuard<'a>),
    /// Another live handle of this host is fetching it: wait while
    /// [`Arena::fetching`] says so, then read.
    Theirs,
}

/// A claim on fetching one SID, released on drop.
pub struct FetchGuard<'a> {
    arena: &'a Arena,
    /// The claim slot and word this guard holds; `None` when the SID's
    /// slot was busy with another SID's fetch (the fetch then goes on
    /// unclaimed: at worst two processes fetch it).
    held: Option<(usize, u64)>,
}

impl std::fmt::Debug for FetchGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchGuard")
            .field("claimed", &self.held.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if let Some((i, word)) = self.held {
            // Fails only if a survivor took the slot over from us, which it
            // does only when it thought us dead: then it is theirs.
            let _ = self.arena.claim_slot(i).compare_exchange(
                word,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

impl Arena {
    /// The claim slot of `sid` and the key that tells its claims apart.
    fn claim_of(&self, sid: Sid) -> (usize, u32) {
        let (lo, hi) = sid.words();
        // Seeded like the index hash, so a client cannot aim SIDs at one slot.
        let x =
            (lo ^ self.header().hash_seed ^ hi.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (((x >> 40) % FETCH_CLAIMS as u64) as usize, (x as u32) | 1)
    }

    fn claim_slot(&self, i: usize) -> &AtomicU64 {
        &self.header().host.fetch_claims[i]
    }

    /// Claims the fetch of `sid` from the bank for this handle, unless
    /// another live handle of this host (in any process) holds it.
    pub fn claim_fetch(&self, sid: Sid) -> FetchClaim<'_> {
        let (i, key) = self.claim_of(sid);
        let slot = self.claim_slot(i);
        let mine = claim_word(self.owner, key);
        loop {
            let w = slot.load(Ordering::Acquire);
            let (owner, k) = claim_unpack(w);
            // A free slot, or one a dead process left, is ours to take.
            if w != 0 && self.owner_alive(owner) {
                if k == key && owner != self.owner {
                    return FetchClaim::Theirs;
                }
                // Another SID's fetch holds the slot (or this handle's own
                // claim, taken by a caller that has not dropped it): fetch
                // unclaimed rather than wait on a stranger.
                return FetchClaim::Mine(FetchGuard {
                    arena: self,
                    held: None,
                });
            }
            if slot
                .compare_exchange(w, mine, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return FetchClaim::Mine(FetchGuard {
                    arena: self,
                    held: Some((i, mine)),
                });
            }
        }
    }

    /// Whether a live handle other than this one holds the fetch claim of
    /// `sid`.
    pub fn fetching(&self, sid: Sid) -> bool {
        let (i, key) = self.claim_of(sid);
        let (owner, k) = claim_unpack(self.claim_slot(i).load(Ordering::Acquire));
        owner != 0 && k == key && owner != self.owner && self.owner_alive(owner)
    }

    /// Takes one token from the host's fetch bucket, which refills at
    /// `per_s` tokens a second up to `burst` (at most 2^24 - 1). Returns
    /// false when the bucket is empty: the host has asked the bank as often
    /// as it may for now. Shared by every process of the host.
    pub fn take_fetch_token(&self, per_s: u32, burst: u32) -> bool {
        let bucket = &self.header().host.fetch_bucket;
        let burst = burst.clamp(1, BUCKET_TOKENS_MAX);
        // Never 0, so a used bucket's word is never the unused word 0.
        let now = crate::clock::now_ms()
            .saturating_sub(self.header().created_ms)
            .max(1);
        let mut w = bucket.load(Ordering::Acquire);
        loop {
            let (last, tokens) = bucket_unpack(w);
            // Whole tokens earned since the last refill; the refill time
            // moves by exactly what they took, so no fraction is lost.
            let elapsed = now.saturating_sub(last);
            let earned = elapsed.saturating_mul(u64::from(per_s)) / 1000;
            let (last, tokens) = if w == 0 {
                // Never used: the bucket starts full.
                (now, burst)
            } else if earned == 0 {
                (last, tokens)
            } else if tokens as u64 + earned >= u64::from(burst) {
                (now, burst)
            } else {
                (
                    last + earned * 1000 / u64::from(per_s.max(1)),
                    tokens + earned as u32,
                )
            };
            if tokens == 0 {
                return false;
            }
            match bucket.compare_exchange_weak(
                w,
                bucket_word(last, tokens - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now_w) => w = now_w,
            }
        }
    }

    /// Whether this handle is the host's sweeper: elects it if no live
    /// handle is. The first handle to ask wins and keeps the role until it
    /// is dropped or its process dies; then the next to ask takes over.
    pub fn lead_sweep(&self) -> bool {
        let word = &self.header().host.sweeper;
        let w = word.load(Ordering::Acquire);
        if w == self.owner {
            return true;
        }
        if w != 0 && self.owner_alive(w) {
            return false;
        }
        if w == 0 {
            lock::try_lock(word, self.owner).is_ok()
        } else {
            lock::steal(word, w, self.owner)
        }
    }

    /// Gives up the sweeper role if this handle holds it (on drop).
    pub(super) fn resign_sweep(&self) {
        let _ = self.header().host.sweeper.compare_exchange(
            self.owner,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::arena::test_support::Scratch;
    use crate::{FetchClaim, FetchGuard, Sid};

    /// The claim of a SID nobody else fetches.
    fn claimed(c: FetchClaim<'_>) -> FetchGuard<'_> {
        match c {
            FetchClaim::Mine(g) => g,
            FetchClaim::Theirs => panic!("a fresh arena has no claims"),
        }
    }

    #[test]
    fn one_handle_claims_a_fetch_and_the_others_wait_for_it() {
        let s = Scratch::new("host-claim");
        let (a, sid) = (s.open(), Sid([5; 16]));
        let b = a.try_clone().unwrap();
        let guard = claimed(a.claim_fetch(sid));
        assert!(matches!(b.claim_fetch(sid), FetchClaim::Theirs));
        assert!(b.fetching(sid));
        assert!(!a.fetching(sid), "a handle does not wait for itself");
        drop(guard);
        assert!(!b.fetching(sid));
        assert!(matches!(b.claim_fetch(sid), FetchClaim::Mine(_)));
    }

    #[test]
    fn a_dropped_handles_claim_and_sweeper_role_pass_on() {
        let s = Scratch::new("host-claim-dead");
        let (a, sid) = (s.open(), Sid([6; 16]));
        let b = a.try_clone().unwrap();
        // Leak the claim as a killed process would.
        std::mem::forget(claimed(b.claim_fetch(sid)));
        assert!(b.lead_sweep());
        assert!(!a.lead_sweep());
        drop(b);
        assert!(!a.fetching(sid), "the claim of a closed handle is dead");
        assert!(matches!(a.claim_fetch(sid), FetchClaim::Mine(_)));
        assert!(a.lead_sweep());
    }

    #[test]
    fn the_fetch_bucket_gives_its_burst_then_refills_at_its_rate() {
        let s = Scratch::new("host-bucket");
        let a = s.open();
        let taken = (0..100).filter(|_| a.take_fetch_token(1, 10)).count();
        assert_eq!(taken, 10, "a full bucket gives its burst and no more");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(a.take_fetch_token(1, 10), "one token a second comes back");
        // Shared by every handle of the host.
        let b = a.try_clone().unwrap();
        assert!(!b.take_fetch_token(1, 10));
    }
}
