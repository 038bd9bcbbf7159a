//! Loom models of the shared-memory protocols: the update queue with the
//! engine's own combine (`queue::combine`, the function the arena runs),
//! including a combiner killed before or right after its commit and stolen
//! from, epoch reclamation, and the handshake that keeps a collection and a
//! mutation apart. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p sessio-engine --test loom_queue --release`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::Mutex;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::thread;
use sessio_engine::loom_api::*;

/// Op nodes 1..=N in a plain table (node 0 = empty).
struct Table {
    seq: Vec<AtomicU32>,
    next: Vec<AtomicU64>,
}

impl Table {
    fn new(n: usize) -> Table {
        Table {
            seq: (0..=n).map(|_| AtomicU32::new(0)).collect(),
            next: (0..=n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Nodes for Table {
    fn seq(&self, n: u32) -> u32 {
        self.seq[n as usize].load(Ordering::Relaxed)
    }
    fn next(&self, n: u32) -> u32 {
        self.next[n as usize].load(Ordering::Relaxed) as u32
    }
    fn prepare(&self, n: u32, seq: u32, next: u32) {
        self.seq[n as usize].store(seq, Ordering::Relaxed);
        self.next[n as usize].store(u64::from(next), Ordering::Relaxed);
    }
    fn cut(&self, n: u32) {
        self.next[n as usize].store(0, Ordering::Release);
    }
    fn plausible(&self, n: u32) -> bool {
        (n as usize) < self.seq.len()
    }
}

/// One session: queue head, combiner lock, and the published record: an
/// index into an append-only list of immutable versions, each the list of
/// applied nodes and its applied seq (the record's `applied_seq`).
struct Session {
    head: AtomicU64,
    lock: AtomicU32,
    record: AtomicU64,
    versions: Mutex<Vec<(u32, Vec<u32>)>>,
    nodes: Table,
    /// Owners that died holding the lock (the kernel lock, in the arena).
    dead: Vec<AtomicBool>,
}

/// Where a combiner is killed, if it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    Never,
    /// After applying everything, before the commit store.
    BeforeCommit,
    /// Right after the commit store, before the applied nodes are detached.
    AfterCommit,
}

/// A combiner that was killed: it does nothing more.
#[derive(Debug)]
struct Killed;

impl From<Broken> for Killed {
    fn from(_: Broken) -> Killed {
        panic!("the queue chain is always intact in these models")
    }
}

/// One combine of `s` by the lock holder, as the engine's
/// `queue::combine` sees it: the same function the arena runs, over a
/// table instead of the heap.
struct Combiner<'a> {
    s: &'a Session,
    kill: Kill,
}

impl Combine for Combiner<'_> {
    type Nodes = Table;
    type Draft = Vec<u32>;
    type Published = ();
    type Error = Killed;

    fn nodes(&self) -> &Table {
        &self.s.nodes
    }
    fn head(&self) -> &AtomicU64 {
        &self.s.head
    }
    fn live(&self) -> bool {
        true
    }
    fn applied(&self) -> Result<u32, Killed> {
        Ok(self.s.applied())
    }
    fn draft(&self) -> Result<Vec<u32>, Killed> {
        let r = self.s.record.load(Ordering::Acquire);
        Ok(self.s.versions.lock().unwrap()[r as usize].1.clone())
    }
    fn apply(&self, draft: &mut Vec<u32>, n: u32) -> Step {
        draft.push(n);
        Step::Next
    }
    fn gone(&self, _: u32) {
        unreachable!("no batch in these models removes the session");
    }
    fn publish(&self, draft: Vec<u32>, last: u32, _: &[u32]) -> Result<Option<()>, Killed> {
        if self.kill == Kill::BeforeCommit {
            return Err(Killed);
        }
        let idx = {
            let mut v = self.s.versions.lock().unwrap();
            v.push((last, draft));
            v.len() - 1
        };
        self.s.record.store(idx as u64, Ordering::Release);
        if self.kill == Kill::AfterCommit {
            return Err(Killed);
        }
        Ok(Some(()))
    }
    fn retire(&self, (): (), _detached: u32) {}
}

impl Session {
    fn new(nodes: usize, owners: usize) -> Session {
        Session {
            head: AtomicU64::new(head(0, EMPTY)),
            lock: AtomicU32::new(0),
            record: AtomicU64::new(0),
            versions: Mutex::new(vec![(0, vec![])]),
            nodes: Table::new(nodes),
            dead: (0..=owners).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn applied(&self) -> u32 {
        let r = self.record.load(Ordering::Acquire);
        self.versions.lock().unwrap()[r as usize].0
    }

    /// The combiner: the engine's combine over this session. A killed one
    /// stops where `kill` says and never unlocks.
    fn combine(&self, kill: Kill) -> Result<Combined, Killed> {
        combine(&Combiner { s: self, kill }, &mut Vec::new(), 16)
    }

    /// `update()`: push, then wait for the node to be applied, combining
    /// when the lock is free or held by the dead.
    fn update(&self, me: u32, node: u32, kill: Kill) {
        let seq = push(&self.head, &self.nodes, node).unwrap();
        loop {
            if !seq_after(seq, self.applied()) {
                return;
            }
            let got = match try_lock(&self.lock, me) {
                Ok(()) => true,
                Err(0) => false,
                Err(holder) => {
                    self.dead[holder as usize].load(Ordering::Acquire)
                        && steal(&self.lock, holder, me)
                }
            };
            if got {
                if kill != Kill::Never {
                    let _ = self.combine(kill);
                    self.dead[me as usize].store(true, Ordering::Release);
                    return;
                }
                self.combine(Kill::Never).unwrap();
                unlock(&self.lock, me);
            } else {
                thread::yield_now();
            }
        }
    }

    fn final_list(&self) -> Vec<u32> {
        // Whatever is still queued is applied by the next combiner.
        let me = 99;
        loop {
            match try_lock(&self.lock, me) {
                Ok(()) => break,
                Err(h)
                    if self.dead[h as usize].load(Ordering::Acquire)
                        && steal(&self.lock, h, me) =>
                {
                    break;
                }
                Err(_) => thread::yield_now(),
            }
        }
        self.combine(Kill::Never).unwrap();
        unlock(&self.lock, me);
        let r = self.record.load(Ordering::Acquire);
        self.versions.lock().unwrap()[r as usize].1.clone()
    }
}

/// Exhaustive up to this many preemptions per execution: the spin loops of
/// `update` would make the unbounded space astronomically large, and the
/// bugs these protocols can have need at most two or three.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

#[test]
fn concurrent_updates_apply_exactly_once_in_order() {
    model(|| {
        let s = Arc::new(Session::new(4, 3));
        let t1 = {
            let s = s.clone();
            thread::spawn(move || {
                s.update(1, 1, Kill::Never);
                s.update(1, 2, Kill::Never);
            })
        };
        let t2 = {
            let s = s.clone();
            thread::spawn(move || s.update(2, 3, Kill::Never))
        };
        t1.join().unwrap();
        t2.join().unwrap();
        let list = s.final_list();
        let mut sorted = list.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 3], "every op exactly once: {list:?}");
        let p1 = list.iter().position(|&n| n == 1).unwrap();
        let p2 = list.iter().position(|&n| n == 2).unwrap();
        assert!(p1 < p2, "program order of one caller kept: {list:?}");
    });
}

/// A combiner killed at `kill` while a survivor updates the same session.
fn killed_combiner(kill: Kill) {
    model(move || {
        let s = Arc::new(Session::new(4, 3));
        let victim = {
            let s = s.clone();
            thread::spawn(move || s.update(1, 1, kill))
        };
        let survivor = {
            let s = s.clone();
            thread::spawn(move || s.update(2, 2, Kill::Never))
        };
        victim.join().unwrap();
        survivor.join().unwrap();
        let list = s.final_list();
        let mut sorted = list.clone();
        sorted.sort_unstable();
        // The victim's node was pushed (one CAS) before it died, so it is
        // applied exactly once, by the victim's commit or a survivor's.
        assert_eq!(sorted, vec![1, 2], "{list:?}");
    });
}

#[test]
fn a_combiner_killed_mid_combine_loses_and_duplicates_nothing() {
    killed_combiner(Kill::BeforeCommit);
}

#[test]
fn a_combiner_killed_between_commit_and_detach_loses_and_duplicates_nothing() {
    killed_combiner(Kill::AfterCommit);
}

#[test]
fn epoch_reclamation_never_frees_under_a_reader() {
    model(|| {
        let global = Arc::new(AtomicU64::new(1));
        let pin_word = Arc::new(AtomicU64::new(0));
        // Two "blocks": the published one and its replacement.
        let published = Arc::new(AtomicU64::new(0));
        let freed = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let reader = {
            let (global, pin_word, published, freed) = (
                global.clone(),
                pin_word.clone(),
                published.clone(),
                freed.clone(),
            );
            thread::spawn(move || {
                pin(&global, &pin_word);
                let b = published.load(Ordering::Acquire) as usize;
                assert!(!freed[b].load(Ordering::SeqCst), "read a freed block");
                unpin(&pin_word);
            })
        };
        // The writer publishes block 1, retires block 0, frees it if safe.
        published.store(1, Ordering::Release);
        let tag = retire(&global);
        let oldest = match scan(&pin_word) {
            0 => u64::MAX,
            v => v,
        };
        if may_free(tag, oldest) {
            freed[0].store(true, Ordering::SeqCst);
        }
        reader.join().unwrap();
    });
}

/// A collection and a mutation are never under way at once: the mutator
/// marks its pin and then looks for a collector; the collector claims the
/// world and then looks for marks (`epoch::{enter_mutation, stop_world,
/// at_rest}`, as `arena::{reclaim, collect}` call them). The "heap" is a
/// loom cell: a write by one overlapping a read by the other is a data race
/// loom reports.
#[test]
fn a_collection_never_overlaps_a_mutation() {
    model(|| {
        let world = Arc::new(AtomicU32::new(0));
        let pin_word = Arc::new(AtomicU64::new(0));
        let heap = Arc::new(loom::cell::UnsafeCell::new(0u64));
        let mutator = {
            let (world, pin_word, heap) = (world.clone(), pin_word.clone(), heap.clone());
            thread::spawn(move || {
                if enter_mutation(&pin_word, 5, &world) == 0 {
                    // SAFETY: the handshake keeps the collector out.
                    heap.with_mut(|p| unsafe { *p += 1 });
                }
                pin_word.store(0, Ordering::Release);
            })
        };
        let me = 9;
        stop_world(&world, 0, me).unwrap();
        if at_rest(&pin_word) {
            // SAFETY: the handshake keeps the mutator out.
            let seen = heap.with(|p| unsafe { *p });
            assert!(seen <= 1);
        }
        world.store(0, Ordering::SeqCst);
        mutator.join().unwrap();
    });
}
