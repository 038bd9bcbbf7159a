//! The packed shared words: one home for each word that holds more than one
//! field, with its bit table and the `const fn`s that pack and unpack it.
//! Code elsewhere never shifts or masks these words by hand.
//!
//! Two packed words live with the protocol that owns them: the lock owner
//! word in `lock` and the queue head word in `queue`; the pin word is in
//! `epoch`. The byte layout around all of them is in `docs/ARCHITECTURE.md`.
//!
//! Nothing here knows the arena's geometry: offsets are converted to and
//! from the indices these words hold by the arena, so this module compiles
//! for the loom models too.

// ----- index slot `state` ----------------------------------------------------

/// Index slot `state` (u64):
///
/// ```text
/// | generation | kind  |
/// |  62 bits   | 2 bits|
/// kind: 0 = empty, 1 = live, 2 = tombstone
/// ```
///
/// The generation grows at every change of kind, so a reader that loads the
/// state around the SID words sees whether the slot was reused under it.
pub(crate) const SLOT_KIND_BITS: u32 = 2;
/// Mask of the kind in a slot state.
pub(crate) const SLOT_KIND_MASK: u64 = (1 << SLOT_KIND_BITS) - 1;
/// Kind of a slot that was never used (ends every probe chain).
pub(crate) const SLOT_EMPTY: u64 = 0;
/// Kind of a slot holding a session.
pub(crate) const SLOT_LIVE: u64 = 1;
/// Kind of a slot whose session was removed (probe chains pass through it).
pub(crate) const SLOT_TOMB: u64 = 2;

/// Packs a slot state.
#[inline]
pub(crate) const fn slot_state(generation: u64, kind: u64) -> u64 {
    debug_assert!(kind <= SLOT_KIND_MASK);
    (generation << SLOT_KIND_BITS) | kind
}

/// The kind of a slot state.
#[inline]
pub(crate) const fn slot_kind(state: u64) -> u64 {
    state & SLOT_KIND_MASK
}

/// The generation of a slot state.
#[inline]
pub(crate) const fn slot_generation(state: u64) -> u64 {
    state >> SLOT_KIND_BITS
}

/// The state after `state` that has kind `kind`: the next generation, which
/// wraps after 2^62 changes.
#[inline]
pub(crate) const fn slot_next(state: u64, kind: u64) -> u64 {
    slot_state(slot_generation(state).wrapping_add(1), kind)
}

// ----- index slot `record` ---------------------------------------------------

/// Index slot `record` (u64): the published record.
///
/// ```text
/// | archive length | block index (byte offset / 64) |
/// |    32 bits     |            32 bits             |
/// ```
///
/// The block index counts 64-byte blocks from the start of the arena, so
/// records lie below 256 GiB. The length lets a reader fetch every line of
/// the record at once instead of one dependent miss after another.
#[inline]
pub(crate) const fn record_word(len: u32, block: u32) -> u64 {
    ((len as u64) << 32) | block as u64
}

/// The block index of a record word.
#[inline]
pub(crate) const fn record_block(word: u64) -> u32 {
    word as u32
}

/// The archive length of a record word.
#[inline]
pub(crate) const fn record_len(word: u64) -> u32 {
    (word >> 32) as u32
}

// ----- index slot `acked` ----------------------------------------------------

/// Index slot `acked[i]` (u64): one replica's acknowledgement; 0 = none.
///
/// ```text
/// | node id | version |
/// | 16 bits | 48 bits |
/// ```
pub(crate) const ACK_VERSION_BITS: u32 = 48;
const ACK_VERSION_MASK: u64 = (1 << ACK_VERSION_BITS) - 1;

/// Packs an ack word; versions beyond 48 bits are cut to their low bits.
#[inline]
pub(crate) const fn ack_word(node: u16, version: u64) -> u64 {
    ((node as u64) << ACK_VERSION_BITS) | (version & ACK_VERSION_MASK)
}

/// The `(node id, version)` of an ack word.
#[inline]
pub(crate) const fn ack_unpack(word: u64) -> (u16, u64) {
    ((word >> ACK_VERSION_BITS) as u16, word & ACK_VERSION_MASK)
}

// ----- free-stack and chunk-pool heads ----------------------------------------

/// Head of a class free stack (`Header::class_free`) or of the chunk pool
/// (`Header::chunk_free`) (u64):
///
/// ```text
/// |   tag   |  index  |
/// | 24 bits | 40 bits |
/// index 0 = empty stack
/// ```
///
/// The index is a heap block index + 1 for a class stack, a chunk + 1 for
/// the pool. The tag grows (wrapping) at every change of the head, so a head
/// popped and pushed back meanwhile does not fool a CAS (ABA). A block's
/// `link` word on these stacks holds the bare index of the next one.
pub(crate) const STACK_INDEX_BITS: u32 = 40;
/// Mask of the index in a stack head (and of a link on the stack).
pub(crate) const STACK_INDEX_MASK: u64 = (1 << STACK_INDEX_BITS) - 1;

/// Packs a stack head.
#[inline]
pub(crate) const fn stack_head(tag: u32, index: u64) -> u64 {
    debug_assert!(index <= STACK_INDEX_MASK);
    ((tag as u64) << STACK_INDEX_BITS) | index
}

/// The index a stack head (or a link on the stack) holds; 0 = none.
#[inline]
pub(crate) const fn stack_index(word: u64) -> u64 {
    word & STACK_INDEX_MASK
}

/// The ABA tag of a stack head.
#[inline]
pub(crate) const fn stack_tag(word: u64) -> u32 {
    (word >> STACK_INDEX_BITS) as u32
}

/// The head that replaces `cur` to make `index` the top: the next tag.
#[inline]
pub(crate) const fn stack_next(cur: u64, index: u64) -> u64 {
    stack_head(stack_tag(cur).wrapping_add(1), index)
}

// ----- carve word ----------------------------------------------------------

/// A size class's carve word (`Header::class_carve`) (u64): the chunk it
/// carves fresh blocks from, one per CAS.
///
/// ```text
/// | chunk + 1 |  next   |
/// |  32 bits  | 32 bits |
/// chunk + 1 = 0: no chunk; next = the first block not handed out yet
/// ```
pub(crate) const CARVE_NONE: u64 = 0;

/// Packs a carve word for `chunk`, next block `next`.
#[inline]
pub(crate) const fn carve_word(chunk: u64, next: u64) -> u64 {
    debug_assert!(chunk < u32::MAX as u64 && next <= u32::MAX as u64);
    ((chunk + 1) << 32) | next
}

/// The chunk a carve word carves from, if any.
#[inline]
pub(crate) const fn carve_chunk(word: u64) -> Option<u64> {
    match word >> 32 {
        0 => None,
        c => Some(c - 1),
    }
}

/// The first block of the chunk not handed out yet.
#[inline]
pub(crate) const fn carve_next(word: u64) -> u64 {
    word & 0xffff_ffff
}

// ----- op node `result` and `detail` ---------------------------------------

/// Op node `result` (u32): the outcome of a batch, written by the combiner
/// that answered it before the commit that covers it. The values are part
/// of the arena format.
///
/// ```text
/// | code    |
/// | 32 bits |
/// 0 done, 1-5 refused (one per OpError kind), 6 gone, 7 cancelled,
/// u32::MAX pending; anything else is corruption
/// ```
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultCode {
    /// Applied; `detail` holds the version it produced.
    Done = 0,
    /// Refused: `OpError::BadKey`.
    BadKey = 1,
    /// Refused: `OpError::TooManyAttrs`.
    TooManyAttrs = 2,
    /// Refused: `OpError::NotACounter`.
    NotACounter = 3,
    /// Refused: `OpError::NotAList`.
    NotAList = 4,
    /// Refused: `OpError::OverQuota`; `detail` holds the bytes needed.
    OverQuota = 5,
    /// The session no longer existed when the batch came up.
    Gone = 6,
    /// Final: cancelled because the heap had no room for the new record.
    /// Later combiners skip it.
    CancelledHeapFull = 7,
    /// Not answered yet.
    Pending = u32::MAX,
}

impl ResultCode {
    /// The word stored in an op node.
    #[inline]
    pub(crate) const fn encode(self) -> u32 {
        self as u32
    }

    /// The code a result word holds; `None` for a word no combiner writes
    /// (damaged memory).
    #[inline]
    pub(crate) const fn decode(word: u32) -> Option<ResultCode> {
        Some(match word {
            0 => ResultCode::Done,
            1 => ResultCode::BadKey,
            2 => ResultCode::TooManyAttrs,
            3 => ResultCode::NotACounter,
            4 => ResultCode::NotAList,
            5 => ResultCode::OverQuota,
            6 => ResultCode::Gone,
            7 => ResultCode::CancelledHeapFull,
            u32::MAX => ResultCode::Pending,
            _ => return None,
        })
    }
}

/// Op node `detail` (u64): before the answer, how to apply the batch; after
/// it, what the answer carries.
///
/// ```text
/// pushed:   | expire-only | evict-below |  argument  |   (0 = an ordinary batch)
///           |    1 bit    |    1 bit    |  62 bits   |
///           expire-only: the sweep clock (ms); evict-below: an epoch
/// answered: | version produced (done) or bytes needed (over quota)  |
/// ```
pub(crate) const EXPIRE_ONLY: u64 = 1 << 63;
/// The evict-below bit of a pushed `detail`.
pub(crate) const EVICT_BELOW: u64 = 1 << 62;
/// Mask of a pushed `detail`'s argument.
const DETAIL_ARG_MASK: u64 = EVICT_BELOW - 1;

/// The `detail` of an eviction's batch: the session is removed from this
/// arena only if it is held under an ownership epoch below `epoch`.
#[inline]
pub(crate) const fn evict_below(epoch: u64) -> u64 {
    EVICT_BELOW | (epoch & DETAIL_ARG_MASK)
}

/// The epoch of an evict-below `detail`; `None` for any other batch.
#[inline]
pub(crate) const fn evict_below_at(detail: u64) -> Option<u64> {
    if detail & (EXPIRE_ONLY | EVICT_BELOW) == EVICT_BELOW {
        Some(detail & DETAIL_ARG_MASK)
    } else {
        None
    }
}

/// The `detail` of an expiry sweep's batch: applied only if the session is
/// still expired at `now_ms` (the sweep's clock).
#[inline]
pub(crate) const fn expire_only(now_ms: u64) -> u64 {
    EXPIRE_ONLY | (now_ms & DETAIL_ARG_MASK)
}

/// The sweep clock of an expire-only `detail`; `None` for an ordinary batch.
#[inline]
pub(crate) const fn expire_only_at(detail: u64) -> Option<u64> {
    if detail & EXPIRE_ONLY != 0 {
        Some(detail & DETAIL_ARG_MASK)
    } else {
        None
    }
}

// ----- host words: fetch claims and the fetch bucket ---------------------------

/// A fetch claim (`HostWords::fetch_claims[i]`) (u64); 0 = free.
///
/// ```text
/// | owner word | SID key |
/// |  32 bits   | 32 bits |
/// ```
///
/// The owner is a lock owner word (`lock`), so a claim of the dead is seen
/// as such and taken over; the key tells which SID the claim is for.
#[inline]
pub(crate) const fn claim_word(owner: u32, key: u32) -> u64 {
    ((owner as u64) << 32) | key as u64
}

/// The `(owner word, SID key)` of a claim word.
#[inline]
pub(crate) const fn claim_unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// The fetch token bucket (`HostWords::fetch_bucket`) (u64):
///
/// ```text
/// | last refill, ms since the arena was created | tokens  |
/// |               40 bits                        | 24 bits |
/// ```
///
/// 40 bits of ms last 34 years; a bucket holds at most 2^24 - 1 tokens.
pub(crate) const BUCKET_TOKENS_BITS: u32 = 24;
/// Most tokens a bucket word can hold.
pub(crate) const BUCKET_TOKENS_MAX: u32 = (1 << BUCKET_TOKENS_BITS) - 1;

/// Packs a bucket word; `ms` beyond 40 bits is cut to its low bits.
#[inline]
pub(crate) const fn bucket_word(ms: u64, tokens: u32) -> u64 {
    debug_assert!(tokens <= BUCKET_TOKENS_MAX);
    (ms << BUCKET_TOKENS_BITS) | tokens as u64
}

/// The `(last refill ms, tokens)` of a bucket word.
#[inline]
pub(crate) const fn bucket_unpack(word: u64) -> (u64, u32) {
    (
        word >> BUCKET_TOKENS_BITS,
        (word as u32) & BUCKET_TOKENS_MAX,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_state_round_trips() {
        for kind in [SLOT_EMPTY, SLOT_LIVE, SLOT_TOMB] {
            let w = slot_state(0x2_0000_0000_0001, kind);
            assert_eq!(slot_kind(w), kind);
            assert_eq!(slot_generation(w), 0x2_0000_0000_0001);
            assert_eq!(slot_generation(slot_next(w, SLOT_TOMB)), 0x2_0000_0000_0002);
            assert_eq!(slot_kind(slot_next(w, SLOT_TOMB)), SLOT_TOMB);
        }
        // The generation wraps instead of spilling into the kind.
        let top = slot_state((1 << 62) - 1, SLOT_LIVE);
        assert_eq!(slot_next(top, SLOT_EMPTY), slot_state(0, SLOT_EMPTY));
    }

    #[test]
    fn record_word_round_trips() {
        let w = record_word(0xdead_beef, 0x1234_5678);
        assert_eq!(record_len(w), 0xdead_beef);
        assert_eq!(record_block(w), 0x1234_5678);
        assert_eq!(record_word(0, 0), 0);
    }

    #[test]
    fn host_words_round_trip() {
        assert_eq!(
            claim_unpack(claim_word(0xffff_0001, 0xdead_beef)),
            (0xffff_0001, 0xdead_beef)
        );
        assert_eq!(claim_word(0, 0), 0);
        let w = bucket_word((1 << 40) - 1, BUCKET_TOKENS_MAX);
        assert_eq!(bucket_unpack(w), ((1 << 40) - 1, BUCKET_TOKENS_MAX));
        assert_eq!(bucket_unpack(bucket_word(12_345, 7)), (12_345, 7));
    }

    #[test]
    fn ack_word_round_trips() {
        let w = ack_word(0xbeef, (1 << 48) - 1);
        assert_eq!(ack_unpack(w), (0xbeef, (1 << 48) - 1));
        assert_eq!(ack_unpack(ack_word(3, 7)), (3, 7));
        // Versions are kept to 48 bits; the node id is never touched.
        assert_eq!(ack_unpack(ack_word(1, 1 << 48)), (1, 0));
    }

    #[test]
    fn stack_head_round_trips() {
        let w = stack_head(0x00ab_cdef, STACK_INDEX_MASK);
        assert_eq!(stack_tag(w), 0x00ab_cdef);
        assert_eq!(stack_index(w), STACK_INDEX_MASK);
        let n = stack_next(w, 5);
        assert_eq!((stack_tag(n), stack_index(n)), (0x00ab_cdf0, 5));
        // The 24-bit tag wraps to 0 instead of spilling out of the word.
        let top = stack_head(0x00ff_ffff, 1);
        assert_eq!(stack_next(top, 2), stack_head(0, 2));
    }

    #[test]
    fn carve_word_round_trips() {
        assert_eq!(carve_chunk(CARVE_NONE), None);
        let w = carve_word(0, 1);
        assert_eq!((carve_chunk(w), carve_next(w)), (Some(0), 1));
        let w = carve_word(u64::from(u32::MAX) - 1, u64::from(u32::MAX));
        assert_eq!(carve_chunk(w), Some(u64::from(u32::MAX) - 1));
        assert_eq!(carve_next(w), u64::from(u32::MAX));
        // Taking the next block is one increment of the word.
        let w = carve_word(7, 3);
        assert_eq!(w + 1, carve_word(7, 4));
    }

    #[test]
    fn result_codes_round_trip() {
        for code in [
            ResultCode::Done,
            ResultCode::BadKey,
            ResultCode::TooManyAttrs,
            ResultCode::NotACounter,
            ResultCode::NotAList,
            ResultCode::OverQuota,
            ResultCode::Gone,
            ResultCode::CancelledHeapFull,
            ResultCode::Pending,
        ] {
            assert_eq!(ResultCode::decode(code.encode()), Some(code));
        }
        // The values are part of the arena format.
        assert_eq!(ResultCode::Done.encode(), 0);
        assert_eq!(ResultCode::OverQuota.encode(), 5);
        assert_eq!(ResultCode::CancelledHeapFull.encode(), 7);
        assert_eq!(ResultCode::Pending.encode(), u32::MAX);
    }

    #[test]
    fn an_unknown_result_code_decodes_to_none() {
        for word in [8, 9, 0x8000_0000, u32::MAX - 1] {
            assert_eq!(ResultCode::decode(word), None);
        }
    }

    #[test]
    fn expire_only_detail_round_trips() {
        let d = expire_only(1_700_000_000_123);
        assert_eq!(expire_only_at(d), Some(1_700_000_000_123));
        assert_eq!(expire_only_at(42), None);
        let e = evict_below(7);
        assert_eq!((evict_below_at(e), expire_only_at(e)), (Some(7), None));
        assert_eq!(evict_below_at(d), None);
        assert_eq!(evict_below_at(42), None);
        assert_eq!(expire_only_at(expire_only(u64::MAX)), Some(u64::MAX >> 2));
    }
}
