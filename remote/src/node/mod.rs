//! The replica node: an in-memory store of session copies, keyed by SID,
//! that applies hosts' deltas, fences stale owners and serves failover
//! fetches.
//!
//! [`Store`] is the pure state machine (messages in, replies out, no I/O),
//! unit-tested in `store/tests.rs`; [`serve()`] puts it behind a
//! [`sessio_net::Server`] on one or more threads.
//! Every process start draws a fresh incarnation id, sent in each handshake:
//! a host that sees a new one knows this node lost its copies and resends
//! its share.
//!
//! Rules for one [`sessio_net::DeltaEntry`] (see `docs/REPLICATION.md`):
//! - a copy under a newer ownership epoch than the entry's wins: `Fenced`;
//! - `Ops` apply only on top of exactly `base_version`, else `NeedFull`;
//! - `Full` replaces an older copy (same epoch and an older or equal
//!   version is a replay: acknowledged, not applied);
//! - a store at `sessions_max` or `bytes_max`, or a record that does not
//!   validate, is `Refused`.
//!
//! A copy is a record validated once, when it arrived (or written by this
//! node), plus the op batches acknowledged since, copied back to back into
//! one buffer and folded into the record when a fetch asks for it or when
//! they pass [`PENDING_BATCHES_MAX`] or [`PENDING_BYTES_MAX`]. An op delta
//! is validated and appended only when it cannot fail to apply (see
//! [`Store::apply_batch_at`]); any other is applied at once, as the host
//! did, so every answer is the one an eager apply would give. The most
//! common delta, a value rewritten at the same length, is written over
//! the record where it lies when nothing is pending: no pending bytes, no
//! fold.

//!
//! Modules: `copy` (one copy and its pending batches), [`store`] (the
//! state machine), [`shards`] (the store split by SID among serving
//! threads), [`serve`](mod@serve) (the I/O loop and its threads).

mod copy;
mod entry;
pub mod serve;
pub mod shards;
pub mod store;

/// Default for [`NodeLimits::sessions_max`].
pub const SESSIONS_MAX_DEFAULT: u64 = 10_000_000;
/// Default for [`NodeLimits::bytes_max`].
pub const BYTES_MAX_DEFAULT: u64 = 4 << 30;
/// How long a node retries binding a port that is still in use, in ms.
pub const BIND_RETRY_MS: u64 = 3_000;
/// Attribute bytes a replica lets one session hold when applying ops; the
/// host's own quota (at most 64 MiB) already bounded them.
const APPLY_QUOTA_BYTES: u64 = 64 << 20;
/// Most op batches a copy holds unfolded; the next one folds them all.
pub const PENDING_BATCHES_MAX: usize = 32;
/// Most bytes a copy's unfolded op batches are charged (see
/// [`pending_charge`]); past it the next batch folds them all.
pub const PENDING_BYTES_MAX: u64 = 16 << 10;
/// What one unfolded batch is charged beyond twice its bytes: the archived
/// log entry and attribute headers and their alignment padding it can add
/// to the record once folded, and its own bookkeeping.
const PENDING_OVERHEAD_BYTES: u64 = 64;
/// Alignment the archives are read at (rkyv's records and op batches need 8).
const ALIGN: usize = 16;

pub use copy::pending_charge;
pub use serve::{LocalBank, LocalNode, NodeConfig, serve};
pub use shards::{SHARDS_MAX, Shards};
pub use store::{
    DEADLINES_SLACK, EXPIRE_INTERVAL_MS_DEFAULT, EXPIRY_GRACE_MS_DEFAULT, ExpiryRule, FOLD_IDLE_MS,
    NodeCounters, NodeLimits, STALE_MAX, STALE_PER_PONG, Store,
};
