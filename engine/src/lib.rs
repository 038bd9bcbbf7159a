//! # sessio-engine: the host-local session arena
//!
//! Every web host keeps all the sessions it serves in one memory-mapped
//! arena that all of its worker processes map. A read is a lookup in an
//! open-addressing index and a zero-copy [rkyv] view of the record: no
//! network hop, no copy, no lock. An update pushes its ops onto the
//! session's lock-free queue with one CAS; whichever process finds the
//! session idle becomes its combiner, applies every queued batch in order
//! into a new copy of the record, and publishes the copy with one atomic
//! store. Old copies are freed only when no reader in any process can still
//! see them. Any process may be killed at any instruction: every shared
//! transition is either one atomic step or one a successor detects and
//! finishes, and a handle that opens the arena alone checks and repairs
//! what the dead left behind. The byte layout and the crash model are in
//! `docs/ARCHITECTURE.md`.
//!
//! ## Modules and how data moves
//!
//! - [`map`](Location): the arena file, its creation, validation and the
//!   byte-range locks that tell live processes from dead ones.
//! - `layout`: every structure in shared memory, sizes pinned at compile time;
//!   `words`: the packed words inside them, with their bit tables.
//! - `queue`, `lock` and `epoch`: the per-session update queue and the
//!   combine protocol over it, the owner words, and reclamation's pins
//!   (model-checked with loom through `sync`).
//! - [`Arena`]: the handle, one file per seam under `arena/`: handle, heap,
//!   index, records, combine, reclaim, collect, expiry, recovery, and the
//!   replicator's view (dirty sessions, deltas, acks).
//! - [`session`]: the session model and the ops, as plain Rust.
//!
//! ## Example
//!
//! ```
//! use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op};
//!
//! # let name = format!("doc-{}", std::process::id());
//! let loc = Location::Shm(name); // /dev/shm/sessio-<name>
//! let arena = Arena::open(&loc, &ArenaConfig::for_sessions(1000, 1024))?;
//! let sid = arena.create(NewSession { idle_ttl_ms: 30 * 60 * 1000, lifetime_ms: 0 }, &[("user", b"ada")])?;
//! arena.update(sid, &[Op::Set { key: "cart".into(), value: b"3 apples".to_vec() }])?;
//! {
//!     let s = arena.read(sid)?; // zero-copy, pinned while `s` lives
//!     assert_eq!(s.get("cart"), Some(&b"3 apples"[..]));
//!     assert!(s.verify());
//! }
//! arena.invalidate(sid)?;
//! assert!(arena.read(sid).is_err());
//! # drop(arena);
//! # Arena::remove(&loc)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Handles are `Send` but not `Sync`: each worker thread opens its own
//! ([`Arena::try_clone`] shares the mapping). A process that forks must
//! open a new handle in the child.

// The loom build compiles only the protocol cores; the rest is unused there.
#![cfg_attr(loom, allow(dead_code))]

pub mod clock;
pub mod session;

mod epoch;
mod error;
mod lock;
mod queue;
mod sync;
mod words;

#[cfg(not(loom))]
mod arena;
#[cfg(not(loom))]
mod layout;
#[cfg(not(loom))]
mod map;
#[cfg(not(loom))]
mod sid;
#[cfg(not(loom))]
mod space;

#[cfg(not(loom))]
pub use arena::{
    Arena, ArenaStats, ClassUsage, CollectError, CollectReport, DELTA_BATCHES_MAX, Delta, Dirty,
    DirtyBell, FREE_WALK_DEFAULT, FetchClaim, FetchGuard, MemoryStats, NewSession, PinnedScope,
    ReadGuard, RecoveryReport, SweepStats,
};
pub use error::{OpenError, SessionError};
#[cfg(not(loom))]
pub use map::{
    ArenaConfig, HEAP_BUDGET_MIN_BYTES, HEAP_SLACK_BYTES, HugePages, Location, NAME_BYTES_MAX,
    SessionCost, Sizing,
};
pub use session::{Op, OpError, SessionData};
#[cfg(not(loom))]
pub use sid::{ParseSidError, Sid};

/// The protocol cores, exposed only to the loom models.
#[cfg(loom)]
#[allow(missing_docs)]
pub mod loom_api {
    pub use crate::epoch::{
        at_rest, enter_mutation, may_free, pin, retire, scan, stop_world, unpin,
    };
    pub use crate::lock::{owner, steal, try_lock, unlock};
    pub use crate::queue::{
        Broken, Closed, Combine, Combined, EMPTY, Nodes, Step, close, combine, detach, head,
        head_node, head_seq, is_closed, pending, push, seq_after,
    };
}
