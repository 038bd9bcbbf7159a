//! The delta log: the recent op batches of every session of the arena, in
//! one ring of words shared by all its processes, so the replicator ships a
//! replica the batches it lacks instead of the whole record. A record keeps
//! none of its history: its header names the entry of its own version
//! (`RecordHeader::log_at`), and each entry names the one before it.
//!
//! An entry is written in place by the combiner that applied its batch:
//!
//! ```text
//! | commit | sid lo | sid hi | version | prev + 1 | ops len | xxh3 | ops, in words |
//! ```
//!
//! A writer reserves its words with one `fetch_add` on the header's
//! `delta_head` (bytes ever reserved), writes them, then stores `commit` =
//! its position + 1. A reader copies an entry, then checks that no later
//! reservation has come round the ring onto it, like a seqlock reader. An
//! entry that was overwritten, never finished (its writer died), or does
//! not hash to its checksum is simply not there: the replicator then ships
//! the whole record, as it does for a replica older than the log. So the
//! log needs no recovery and no lock, and a kill at any point costs at
//! most one entry.

use super::Arena;
use crate::sid::Sid;
use crate::sync::{Ordering, fence};

/// Words of an entry before its ops.
const ENTRY_WORDS: u64 = 7;

/// Most batches one delta carries; a replica further behind gets the whole
/// record.
pub const DELTA_BATCHES_MAX: usize = 32;

/// One entry, copied out of the log.
struct Entry {
    sid: [u64; 2],
    version: u64,
    /// The previous entry of the session, as a position + 1; 0 = none.
    prev: u64,
    ops: Vec<u8>,
}

/// The entry's check: xxh3 of its other words and of `ops_sum`, the xxh3
/// of its ops (which the combiner has already computed to check the op
/// node), so a torn entry (words of two writers) fails it.
fn checksum(sid: [u64; 2], version: u64, prev: u64, ops_sum: u64) -> u64 {
    let mut words = [0u8; 40];
    for (i, w) in [sid[0], sid[1], version, prev, ops_sum]
        .into_iter()
        .enumerate()
    {
        words[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&words)
}

impl Arena {
    fn delta_words(&self) -> u64 {
        self.map.geo.delta_bytes / 8
    }

    /// The position (in words since the log began) of the entry named by
    /// `log_at`, if it can still be in the log: `log_at` is the position's
    /// low 32 bits + 1, and the log holds only the last `delta_words`
    /// words, far fewer than 2^32.
    fn log_position(&self, log_at: u32) -> Option<u64> {
        let low = u64::from(log_at.checked_sub(1)?);
        let head = self.header().delta_head.load(Ordering::Acquire) / 8;
        let newest = head.checked_sub(1)?;
        let back = (newest.wrapping_sub(low)) & 0xffff_ffff;
        let pos = newest.checked_sub(back)?;
        (head - pos <= self.delta_words()).then_some(pos)
    }

    /// Appends the batch `ops` that made `version` of `sid`, after the entry
    /// `prev_at` (a `log_at`, 0 = none). Returns the new entry's `log_at`
    /// for the record's header; 0 when the batch is too large for the log
    /// (over a quarter of it), so the record has no delta behind it.
    pub(super) fn log_batch(
        &self,
        sid: Sid,
        version: u64,
        prev_at: u32,
        ops: &[u8],
        ops_sum: u64,
    ) -> u32 {
        debug_assert_eq!(ops_sum, xxhash_rust::xxh3::xxh3_64(ops));
        let words = ENTRY_WORDS + (ops.len() as u64).div_ceil(8);
        if words > self.delta_words() / 4 {
            return 0;
        }
        let prev = self.log_position(prev_at).map_or(0, |p| p + 1);
        let pos = self
            .header()
            .delta_head
            .fetch_add(words * 8, Ordering::AcqRel)
            / 8;
        // Readers of what was here before check the head after their copy:
        // whoever sees one of our words below sees our reservation too.
        fence(Ordering::Release);
        let (lo, hi) = sid.words();
        let sum = checksum([lo, hi], version, prev, ops_sum);
        let (a, b) = self.map.delta_run(pos, words);
        let mut run = a.iter().chain(b);
        let commit = run.next().expect("an entry has a commit word");
        let head = [lo, hi, version, prev, ops.len() as u64, sum];
        // Whole words straight from the bytes (no copy call per word), then
        // the tail, zero-padded.
        let words_of = ops.chunks_exact(8);
        let tail = words_of.remainder();
        let tail = (!tail.is_empty()).then(|| {
            let mut b = [0u8; 8];
            b[..tail.len()].copy_from_slice(tail);
            u64::from_le_bytes(b)
        });
        let body = words_of
            .map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8")))
            .chain(tail);
        for (w, v) in run.zip(head.into_iter().chain(body)) {
            w.store(v, Ordering::Relaxed);
        }
        commit.store(pos + 1, Ordering::Release);
        (pos as u32).wrapping_add(1)
    }

    /// A copy of the entry at position `pos`, if it is whole and still in
    /// the log.
    fn read_entry(&self, pos: u64) -> Option<Entry> {
        let (a, b) = self.map.delta_run(pos, ENTRY_WORDS);
        let mut run = a.iter().chain(b);
        if run.next().map(|w| w.load(Ordering::Acquire)) != Some(pos + 1) {
            return None;
        }
        let mut w = || run.next().map_or(0, |w| w.load(Ordering::Relaxed));
        let (sid, version, prev, len, sum) = ([w(), w()], w(), w(), w(), w());
        let body = len.div_ceil(8);
        if body + ENTRY_WORDS > self.delta_words() / 4 {
            return None;
        }
        let mut ops = Vec::with_capacity(len.next_multiple_of(8) as usize);
        let (a, b) = self.map.delta_run(pos + ENTRY_WORDS, body);
        for w in a.iter().chain(b) {
            ops.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        ops.truncate(len as usize);
        // Like a seqlock reader: if any word above came from a writer that
        // reserved this stretch again, its reservation is visible now.
        fence(Ordering::Acquire);
        let head = self.header().delta_head.load(Ordering::Relaxed) / 8;
        if head.saturating_sub(pos) > self.delta_words()
            || checksum(sid, version, prev, xxhash_rust::xxh3::xxh3_64(&ops)) != sum
        {
            return None;
        }
        Some(Entry {
            sid,
            version,
            prev,
            ops,
        })
    }

    /// The batches that take `sid` from `base` to `version`, oldest first,
    /// walking back from the entry `log_at` of its record at `version`;
    /// `None` if the log no longer holds all of them or they are more than
    /// [`DELTA_BATCHES_MAX`].
    pub(super) fn logged_batches(
        &self,
        sid: Sid,
        log_at: u32,
        version: u64,
        base: u64,
    ) -> Option<Vec<Vec<u8>>> {
        if base >= version || version - base > DELTA_BATCHES_MAX as u64 {
            return None;
        }
        let (lo, hi) = sid.words();
        let mut pos = self.log_position(log_at)?;
        let mut out = Vec::with_capacity((version - base) as usize);
        let mut want = version;
        loop {
            let e = self.read_entry(pos)?;
            if e.sid != [lo, hi] || e.version != want {
                return None;
            }
            out.push(e.ops);
            want -= 1;
            if want == base {
                out.reverse();
                return Some(out);
            }
            pos = e.prev.checked_sub(1)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::arena::Arena;
    use crate::arena::test_support::Scratch;
    use crate::sid::Sid;

    fn log(a: &Arena, sid: Sid, version: u64, prev_at: u32, ops: &[u8]) -> u32 {
        a.log_batch(sid, version, prev_at, ops, xxhash_rust::xxh3::xxh3_64(ops))
    }

    #[test]
    fn entries_chain_back_and_fall_out_of_the_ring() {
        let scratch = Scratch::new("deltas-chain");
        let a = scratch.open();
        let sid = Sid::random();
        let other = Sid::random();
        // Versions 3 to 7 logged; the record came in at version 2 whole.
        let mut at = 0;
        for v in 3..=7u64 {
            at = log(&a, sid, v, at, &vec![v as u8; v as usize]);
            log(&a, other, v, 0, b"noise");
        }
        let got = a.logged_batches(sid, at, 7, 4).unwrap();
        assert_eq!(got, vec![vec![5u8; 5], vec![6; 6], vec![7; 7]]);
        assert_eq!(a.logged_batches(sid, at, 7, 2).unwrap().len(), 5);
        // The wrong session, the wrong version, or a base the chain does
        // not reach back to: none.
        assert!(a.logged_batches(other, at, 7, 4).is_none());
        assert!(a.logged_batches(sid, at, 8, 4).is_none());
        assert!(a.logged_batches(sid, at, 7, 1).is_none());
        // Write a whole ring of other entries: the chain is gone.
        let big = vec![7u8; 1000];
        for v in 0..=(a.map.geo.delta_bytes / 1000) {
            log(&a, other, v, 0, &big);
        }
        assert!(a.logged_batches(sid, at, 7, 6).is_none());
    }

    #[test]
    fn an_entry_across_the_end_of_the_ring_reads_back_whole() {
        let scratch = Scratch::new("deltas-wrap");
        let a = scratch.open();
        let sid = Sid::random();
        let ring = a.map.geo.delta_bytes / 8;
        // Entries of 7 + 13 words, logged until one straddles the end.
        let ops: Vec<u8> = (0..100u8).collect();
        let (mut at, mut v) = (0, 0u64);
        loop {
            v += 1;
            at = log(&a, sid, v, at, &ops);
            let pos = u64::from(at - 1);
            if pos % ring + 20 > ring {
                assert!(pos / ring == 0, "no entry straddled the first wrap");
                break;
            }
        }
        // It, the one before it and the one after it, in order.
        at = log(&a, sid, v + 1, at, &ops);
        let got = a.logged_batches(sid, at, v + 1, v - 2).unwrap();
        assert_eq!(got, vec![ops.clone(); 3]);
    }

    #[test]
    fn a_torn_entry_is_not_read() {
        let scratch = Scratch::new("deltas-torn");
        let a = scratch.open();
        let sid = Sid::random();
        let at = log(&a, sid, 1, 0, b"abcdefghij");
        assert_eq!(
            a.logged_batches(sid, at, 1, 0).unwrap(),
            vec![b"abcdefghij".to_vec()]
        );
        // A byte of its ops changed (as a writer dying mid-entry leaves it).
        let pos = u64::from(at - 1);
        let w = &a.map.delta_run(pos + super::ENTRY_WORDS, 1).0[0];
        w.fetch_xor(1, crate::sync::Ordering::Relaxed);
        assert!(a.logged_batches(sid, at, 1, 0).is_none());
        // Its commit word not written yet.
        let at = log(&a, sid, 2, at, b"x");
        a.map.delta_run(u64::from(at - 1), 1).0[0].store(0, crate::sync::Ordering::Relaxed);
        assert!(a.logged_batches(sid, at, 2, 1).is_none());
    }
}
