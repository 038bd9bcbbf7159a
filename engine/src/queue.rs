//! The per-session update queue: a Treiber stack of op nodes whose head word
//! also carries the session's last assigned sequence number.
//!
//! ```text
//! head word (u64)
//! | seq of the newest node | closed | newest node (64-byte block index) |
//! |         32 bits        | 1 bit  |              31 bits              |
//! node 0 = empty; closed = the session is being removed, no more pushes
//! ```
//!
//! A push is one CAS on the head word, so a producer killed at any
//! instruction has either published its node (whoever combines next applies
//! it) or not (its `update()` never returned Ok). Nodes are never popped:
//! the combiner applies every node whose seq is newer than the `applied_seq`
//! stored in the published record, publishes the new record (one atomic
//! store, the commit point), and only then detaches the nodes it applied.
//! A combiner that dies before its commit leaves the queue as it found it;
//! one that dies after leaves nodes whose seq the record already covers,
//! which the next combiner skips. Either way every op is applied exactly
//! once. Sequence numbers grow by one per push and never go back, so a head
//! word is never reused (no ABA).
//!
//! [`combine`] is that protocol, over the [`Combine`] trait: the arena runs
//! it on its heap, and the loom models in `tests/loom_queue.rs` run the
//! same function on a plain table of nodes.

use crate::sync::{AtomicU64, Ordering};

/// Node index meaning "no node".
pub const EMPTY: u32 = 0;
/// Flag of a closed queue: the session is being removed, no more pushes.
pub const CLOSED: u32 = 1 << 31;
/// Largest node index a head word can hold.
pub const NODE_MAX: u32 = CLOSED - 1;

/// Packs a head word.
#[inline]
pub const fn head(seq: u32, node: u32) -> u64 {
    ((seq as u64) << 32) | node as u64
}

/// The sequence number of the newest node in a head word.
#[inline]
pub const fn head_seq(word: u64) -> u32 {
    (word >> 32) as u32
}

/// The newest node of a head word (or [`EMPTY`]).
#[inline]
pub const fn head_node(word: u64) -> u32 {
    word as u32 & NODE_MAX
}

/// Whether the queue is closed.
#[inline]
pub const fn is_closed(word: u64) -> bool {
    word as u32 & CLOSED != 0
}

/// `a` is newer than `b` in wrapping sequence space.
#[inline]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Where op nodes live: the arena's heap, or a plain table in the loom models.
pub trait Nodes {
    /// The seq written into node `n` before it was pushed.
    fn seq(&self, n: u32) -> u32;
    /// The node pushed just before `n` (or [`EMPTY`]).
    fn next(&self, n: u32) -> u32;
    /// Prepares an unpublished node: its seq and its successor.
    fn prepare(&self, n: u32, seq: u32, next: u32);
    /// Cuts the chain after `n`. Only a combiner does this.
    fn cut(&self, n: u32);
    /// Whether `n` can be a node at all (bounds, alignment); shared memory
    /// written by a process that died is checked before it is followed.
    fn plausible(&self, n: u32) -> bool;
}

/// The session was closed before the push.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Pushes node `n`; returns its seq. One CAS: the linearization point.
pub fn push(head_word: &AtomicU64, nodes: &impl Nodes, n: u32) -> Result<u32, Closed> {
    let mut cur = head_word.load(Ordering::Acquire);
    loop {
        if is_closed(cur) {
            return Err(Closed);
        }
        let seq = head_seq(cur).wrapping_add(1);
        nodes.prepare(n, seq, head_node(cur));
        match head_word.compare_exchange_weak(
            cur,
            head(seq, n),
            Ordering::SeqCst,
            Ordering::Acquire,
        ) {
            Ok(_) => return Ok(seq),
            Err(now) => cur = now,
        }
    }
}

/// The queue is corrupt: a node index is out of bounds or the chain is out
/// of order. Only possible if the arena's memory was damaged.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken;

/// Collects, oldest first, the nodes newer than `applied`, as seen in `word`
/// (a head word loaded by the caller, who holds the combiner lock).
pub fn pending(
    word: u64,
    applied: u32,
    nodes: &impl Nodes,
    out: &mut Vec<u32>,
    max: usize,
) -> Result<(), Broken> {
    out.clear();
    let mut n = head_node(word);
    let mut expect = head_seq(word);
    while n != EMPTY && seq_after(expect, applied) {
        if !nodes.plausible(n) || nodes.seq(n) != expect || out.len() >= max {
            return Err(Broken);
        }
        out.push(n);
        n = nodes.next(n);
        expect = expect.wrapping_sub(1);
    }
    if seq_after(expect, applied) {
        // The chain ended before reaching what the record has applied.
        return Err(Broken);
    }
    out.reverse();
    Ok(())
}

/// After a commit that covered everything up to `word`: tries to empty the
/// queue; if newer nodes were pushed meanwhile, cuts the chain below the
/// newest applied node instead. Returns the chain of nodes that are now
/// unreachable from the head, newest first, for the caller to retire; the
/// newest applied node stays linked (and alive) when newer nodes point to it.
pub fn detach(head_word: &AtomicU64, word: u64, nodes: &impl Nodes) -> u32 {
    let newest = head_node(word);
    if newest == EMPTY || is_closed(word) {
        return EMPTY;
    }
    let emptied = head(head_seq(word), EMPTY);
    if head_word
        .compare_exchange(word, emptied, Ordering::SeqCst, Ordering::Relaxed)
        .is_ok()
    {
        return newest;
    }
    let below = nodes.next(newest);
    nodes.cut(newest);
    below
}

/// Closes the queue so that no push succeeds any more; returns the closed
/// head word (its seq is the last op that will ever be accepted; its node
/// still leads to the chain).
pub fn close(head_word: &AtomicU64) -> u64 {
    let mut cur = head_word.load(Ordering::Acquire);
    loop {
        if is_closed(cur) {
            return cur;
        }
        let closed = cur | u64::from(CLOSED);
        match head_word.compare_exchange_weak(cur, closed, Ordering::SeqCst, Ordering::Acquire) {
            Ok(_) => return closed,
            Err(now) => cur = now,
        }
    }
}

/// What one combine works on: a session's queue, its published record, and
/// the way a new copy is built, applied to and published. The arena's
/// implementation builds records in its heap; the loom models' builds a
/// list of applied nodes. [`combine`] is the protocol both run.
pub trait Combine {
    /// Where the op nodes live.
    type Nodes: Nodes;
    /// The new copy being built.
    type Draft;
    /// What a published copy leaves to retire afterwards.
    type Published;
    /// Why a combine stopped (a [`Broken`] chain is one).
    type Error: From<Broken>;

    /// The op nodes.
    fn nodes(&self) -> &Self::Nodes;
    /// The session's queue head word.
    fn head(&self) -> &AtomicU64;
    /// Whether the session still exists (a removed slot is left alone).
    fn live(&self) -> bool;
    /// The newest seq the published record includes.
    fn applied(&self) -> Result<u32, Self::Error>;
    /// A new copy of the published record, to apply nodes to.
    fn draft(&self) -> Result<Self::Draft, Self::Error>;
    /// Applies node `n` to the draft and answers it.
    fn apply(&self, draft: &mut Self::Draft, n: u32) -> Step;
    /// Answers node `n`, which came after a batch that removed the session.
    fn gone(&self, n: u32);
    /// Publishes the draft as covering every node up to seq `last` (one
    /// store: the commit point). `Ok(None)` means the copy could not be
    /// built and `applied` (the nodes of this combine) were cancelled
    /// instead; nothing was published.
    fn publish(
        &self,
        draft: Self::Draft,
        last: u32,
        applied: &[u32],
    ) -> Result<Option<Self::Published>, Self::Error>;
    /// Hands the replaced record and the chain of nodes `detached` made
    /// unreachable (newest first, through `next`) to reclamation.
    fn retire(&self, published: Self::Published, detached: u32);
}

/// What applying one node did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Applied or refused; the session lives on.
    Next,
    /// The batch removed the session: later nodes find it gone.
    Removed,
}

/// How a combine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combined {
    /// Nothing to do: the session is gone, or every node is applied.
    Idle,
    /// The queue is closed at this head word: the caller finishes the
    /// removal (answers what is left, marks the slot removed).
    Closed(u64),
    /// The new copy could not be built: the nodes were cancelled.
    Cancelled,
    /// A new copy was published and the applied nodes detached.
    Committed,
}

/// One combine, by the holder of the session's combiner lock: collects the
/// nodes newer than the published record's applied seq, applies them in
/// seq order to a new copy, publishes it (the commit), then detaches the
/// applied nodes and retires them with the replaced record. Killed before
/// the commit, it leaves the queue as it found it; after, it leaves nodes
/// the record already covers, which the next combine skips and detaches.
/// `list` is the caller's scratch, at most `max` nodes.
pub fn combine<C: Combine>(c: &C, list: &mut Vec<u32>, max: usize) -> Result<Combined, C::Error> {
    let head = c.head();
    let w = head.load(Ordering::Acquire);
    if !c.live() {
        return Ok(Combined::Idle);
    }
    if is_closed(w) {
        return Ok(Combined::Closed(w));
    }
    let applied = c.applied()?;
    if head_seq(w) == applied {
        return Ok(Combined::Idle);
    }
    pending(w, applied, c.nodes(), list, max)?;
    let mut draft = c.draft()?;
    let mut last = applied;
    let mut removed = false;
    for &n in list.iter() {
        last = c.nodes().seq(n);
        if removed {
            c.gone(n);
        } else if c.apply(&mut draft, n) == Step::Removed {
            removed = true;
        }
    }
    if removed {
        return Ok(Combined::Closed(close(head)));
    }
    let Some(published) = c.publish(draft, last, list)? else {
        return Ok(Combined::Cancelled);
    };
    debug_assert_eq!(last, head_seq(w));
    let detached = detach(head, w, c.nodes());
    c.retire(published, detached);
    Ok(Combined::Committed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Table(RefCell<Vec<(u32, u32)>>);
    impl Nodes for Table {
        fn seq(&self, n: u32) -> u32 {
            self.0.borrow()[n as usize].0
        }
        fn next(&self, n: u32) -> u32 {
            self.0.borrow()[n as usize].1
        }
        fn prepare(&self, n: u32, seq: u32, next: u32) {
            self.0.borrow_mut()[n as usize] = (seq, next);
        }
        fn cut(&self, n: u32) {
            self.0.borrow_mut()[n as usize].1 = EMPTY;
        }
        fn plausible(&self, n: u32) -> bool {
            (n as usize) < self.0.borrow().len()
        }
    }

    #[test]
    fn push_pending_detach() {
        let t = Table(RefCell::new(vec![(0, 0); 8]));
        let h = AtomicU64::new(head(u32::MAX - 1, EMPTY));
        assert_eq!(push(&h, &t, 1), Ok(u32::MAX));
        assert_eq!(push(&h, &t, 2), Ok(0));
        assert_eq!(push(&h, &t, 3), Ok(1));
        let mut out = Vec::new();
        let w = h.load(Ordering::Relaxed);
        pending(w, u32::MAX - 1, &t, &mut out, 16).unwrap();
        assert_eq!(out, vec![1, 2, 3]);
        pending(w, 0, &t, &mut out, 16).unwrap();
        assert_eq!(out, vec![3]);
        // A push after the snapshot keeps node 3 linked; 2 and 1 detach.
        assert_eq!(push(&h, &t, 4), Ok(2));
        assert_eq!(detach(&h, w, &t), 2);
        assert_eq!(t.next(3), EMPTY);
        let w2 = h.load(Ordering::Relaxed);
        pending(w2, 1, &t, &mut out, 16).unwrap();
        assert_eq!(out, vec![4]);
        assert_eq!(detach(&h, w2, &t), 4);
        assert_eq!(head_node(h.load(Ordering::Relaxed)), EMPTY);
        push(&h, &t, 5).unwrap();
        let c = close(&h);
        assert!(is_closed(c));
        assert_eq!((head_seq(c), head_node(c)), (3, 5));
        assert_eq!(close(&h), c);
        assert_eq!(push(&h, &t, 6), Err(Closed));
    }

    #[test]
    fn broken_chain_is_reported() {
        let t = Table(RefCell::new(vec![(0, 0); 4]));
        let h = AtomicU64::new(head(5, EMPTY));
        push(&h, &t, 1).unwrap();
        push(&h, &t, 2).unwrap();
        t.prepare(1, 99, 0);
        let mut out = Vec::new();
        assert_eq!(
            pending(h.load(Ordering::Relaxed), 5, &t, &mut out, 16),
            Err(Broken)
        );
        // A chain that ends before the applied seq is broken too.
        let h = AtomicU64::new(head(9, 3));
        t.prepare(3, 9, EMPTY);
        assert_eq!(
            pending(h.load(Ordering::Relaxed), 5, &t, &mut out, 16),
            Err(Broken)
        );
    }
}
