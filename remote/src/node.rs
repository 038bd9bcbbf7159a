//! The replica node: an in-memory store of session copies, keyed by SID,
//! that applies hosts' deltas, fences stale owners and serves failover
//! fetches.
//!
//! [`Store`] is the pure state machine (messages in, replies out, no I/O),
//! unit-tested below; [`serve`] puts it behind a [`Server`] on one thread.
//! Every process start draws a fresh incarnation id, sent in each handshake:
//! a host that sees a new one knows this node lost its copies and resends
//! its share.
//!
//! Rules for one [`DeltaEntry`] (see `docs/REPLICATION.md`):
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
//! did, so every answer is the one an eager apply would give.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use hashbrown::HashMap;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use sessio_engine::session::{
    ATTRS_MAX, Applied, ArchivedOp, ArchivedSessionData, KEY_BYTES_MAX, LOG_BYTES_MAX,
    LOG_ENTRIES_MAX, OpRef, SessionData,
};
use sessio_net::{
    Ack, AckEntry, AckStatus, Counter, Delta, DeltaBatch, DeltaEntry, Fetch, FetchReply,
    FoundRecord, Identity, Invalidate, Message, PeerInfo, Pong, Secret, Server, ServerConfig, Sid,
    Stats, StatsRequest,
};

use crate::runtime::Rt;

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

/// What one node agrees to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLimits {
    /// Most sessions held.
    pub sessions_max: u64,
    /// Most bytes held, summed over sessions: each copy's record, plus for
    /// each unfolded op batch a bound on what it adds once folded.
    pub bytes_max: u64,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            sessions_max: SESSIONS_MAX_DEFAULT,
            bytes_max: BYTES_MAX_DEFAULT,
        }
    }
}

/// The op batches a copy has acknowledged but not folded in, back to
/// back in one buffer, so appending one is a copy into memory the copy
/// already owns:
///
/// ```text
/// | at_ms u64 LE | len u32 LE | 0 u32 | batch: len bytes | 0-pad to 16 | ... |
/// ```
///
/// Every batch starts at a multiple of 16, where rkyv reads it in place.
#[derive(Debug, Clone, Default)]
struct PendingLog {
    buf: AlignedVec<ALIGN>,
    count: u32,
}

impl PartialEq for PendingLog {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.buf[..] == other.buf[..]
    }
}

impl Eq for PendingLog {}

/// Asks for the cache lines of `base[from..to]`, which must lie inside
/// one allocation. A hint: it never faults, writes or changes a result.
fn prefetch_range(base: *const u8, from: usize, to: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut at = from - from % 64;
        while at < to {
            // SAFETY: `base + at` is inside the allocation `base` points
            // to (`at < to`, in bounds by the caller); a prefetch reads
            // nothing the program sees and never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    base.add(at).cast::<i8>(),
                );
            }
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, from, to);
}

/// Bytes before each batch in a [`PendingLog`].
const PENDING_HEADER_BYTES: usize = 16;

impl PendingLog {
    fn len(&self) -> usize {
        self.count as usize
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends `ops`, applied at `at_ms`.
    fn push(&mut self, at_ms: u64, ops: &[u8]) {
        let len = u32::try_from(ops.len()).expect("a batch is under the frame limit");
        if self.buf.capacity() == 0 {
            // Room for a few of these before the first regrowth.
            self.buf
                .reserve(4 * (PENDING_HEADER_BYTES + ops.len()).next_multiple_of(ALIGN));
        }
        self.buf.extend_from_slice(&at_ms.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(ops);
        let padded = self.buf.len().next_multiple_of(ALIGN);
        self.buf.resize(padded, 0);
        self.count += 1;
    }

    /// Asks for the cache lines the next `push` of `len` bytes writes.
    fn prefetch_push(&self, len: usize) {
        let end = (self.buf.len() + PENDING_HEADER_BYTES + len).min(self.buf.capacity());
        prefetch_range(self.buf.as_ptr(), self.buf.len(), end);
    }

    /// Each batch with its time, oldest first.
    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let head = self.buf.get(at..at + PENDING_HEADER_BYTES)?;
            let at_ms = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
            let start = at + PENDING_HEADER_BYTES;
            at = (start + len).next_multiple_of(ALIGN);
            Some((at_ms, &self.buf[start..start + len]))
        })
    }
}

/// One session's copy: a record at [`Copy::base_version`], validated when
/// it arrived or written by this node, plus the op batches acknowledged
/// since, up to [`Copy::version`]. [`Store::folded`] folds them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    version: u64,
    epoch: u64,
    record: Vec<u8>,
    pending: PendingLog,
    /// Charged against `bytes_max`: the record plus [`pending_charge`] of
    /// each pending batch.
    bytes: u64,
    /// At least the attributes the session holds after the pending batches.
    attrs_bound: u64,
    /// At least its attribute bytes (the quota's measure) after them.
    attr_bytes_bound: u64,
}

impl Copy {
    /// A copy of `record` (validated) at `version`; `attrs` is what
    /// [`attr_measure`] says of it.
    fn new(version: u64, epoch: u64, record: Vec<u8>, attrs: (u64, u64)) -> Copy {
        Copy {
            version,
            epoch,
            bytes: record.len() as u64,
            record,
            pending: PendingLog::default(),
            attrs_bound: attrs.0,
            attr_bytes_bound: attrs.1,
        }
    }

    /// The host's record version this copy stands at (acknowledged).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Ownership epoch it was written under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The version of [`Copy::record`]: [`Copy::version`] less the pending
    /// batches.
    pub fn base_version(&self) -> u64 {
        self.version - self.pending.len() as u64
    }

    /// The archived `SessionData` at [`Copy::base_version`]; the session
    /// at [`Copy::version`] once [`Copy::pending_batches`] is 0.
    pub fn record(&self) -> &[u8] {
        &self.record
    }

    /// Op batches acknowledged but not folded into the record yet.
    pub fn pending_batches(&self) -> usize {
        self.pending.len()
    }

    /// Bytes this copy is charged against [`NodeLimits::bytes_max`].
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A record's attribute count and attribute bytes, as
/// `SessionData::attr_bytes` counts them for the quota.
fn attr_measure(archived: &ArchivedSessionData) -> (u64, u64) {
    let attrs = archived.attrs.as_slice();
    let bytes = attrs
        .iter()
        .map(|a| (a.key.len() + a.value.len() + 16) as u64)
        .sum();
    (attrs.len() as u64, bytes)
}

/// What an unfolded op batch of `len` bytes is charged: a bound on what it
/// adds to the record once folded. Every key and value it sets is within
/// its bytes, and so is each archived op's header, which is no smaller
/// than the attribute header it can add; the log entry adds the batch once
/// more plus a header and padding.
pub fn pending_charge(len: usize) -> u64 {
    2 * len as u64 + PENDING_OVERHEAD_BYTES
}

/// Counters a node reports in [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Delta entries applied (ops, full records and removals).
    pub applied: u64,
    /// Entries answered `NeedFull`.
    pub need_full: u64,
    /// Entries answered `Fenced`.
    pub fenced: u64,
    /// Entries answered `Refused`.
    pub refused: u64,
    /// Fetches served.
    pub fetches: u64,
    /// Fetches that found a copy.
    pub fetch_hits: u64,
    /// Copies dropped by `Invalidate`.
    pub invalidated: u64,
    /// Records rewritten with their pending op batches folded in.
    pub folds: u64,
    /// Copies dropped as expired ([`Store::expire`]).
    pub expired: u64,
}

/// When a node drops a copy on its own (see [`Store::expire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryRule {
    /// A copy whose session's absolute expiry passed this long ago is
    /// dropped (covers clock skew between hosts and node), in ms.
    pub grace_ms: u64,
    /// A copy not written for this long is dropped, in ms; 0 = never.
    /// Reads on the host do not reach the node, so a session that is only
    /// read looks idle here: set it well above the longest idle TTL.
    pub idle_max_ms: u64,
}

impl Default for ExpiryRule {
    fn default() -> Self {
        ExpiryRule {
            grace_ms: EXPIRY_GRACE_MS_DEFAULT,
            idle_max_ms: 0,
        }
    }
}

/// Default for [`NodeConfig::expire_interval_ms`].
pub const EXPIRE_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Default for [`ExpiryRule::grace_ms`].
pub const EXPIRY_GRACE_MS_DEFAULT: u64 = 60_000;

/// The node's state: copies keyed by SID, within [`NodeLimits`].
#[derive(Debug)]
pub struct Store {
    copies: HashMap<Sid, Copy>,
    bytes: u64,
    limits: NodeLimits,
    incarnation: u64,
    /// Where bytes that are not aligned for rkyv are copied to be read.
    scratch: AlignedVec<ALIGN>,
    /// The serializer's output buffer, reused by every fold.
    ser: AlignedVec<ALIGN>,
    /// Where the last idle expiry walk stopped (copies are visited in the
    /// map's order).
    expire_cursor: usize,
    /// Absolute expiry deadlines of the copies held, earliest first
    /// (entries of copies since gone are skipped when they come up).
    deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(u64, Sid)>>,
    /// Counters since start.
    pub counters: NodeCounters,
}

/// `bytes` if they lie at [`ALIGN`], else a copy of them in `scratch`.
fn aligned<'a>(bytes: &'a [u8], scratch: &'a mut AlignedVec<ALIGN>) -> &'a [u8] {
    if bytes.as_ptr().align_offset(ALIGN) == 0 {
        bytes
    } else {
        scratch.clear();
        scratch.extend_from_slice(bytes);
        scratch
    }
}

/// What applying one op batch needs, read off the batch alone.
struct Shape {
    /// Only ops that cannot fail on any session, given the bounds below:
    /// `Set` and `Remove` of valid keys, `Touch`, `Invalidate`.
    safe: bool,
    /// It invalidates the session.
    invalidates: bool,
    /// `Set`s: each can add one attribute.
    sets: u64,
    /// What the `Set`s can add to the attribute bytes at most.
    set_bytes: u64,
}

fn shape(batch: &ArchivedVec<ArchivedOp>) -> Shape {
    // The engine's key rule (`session::check_key`): a bad key fails the batch.
    let key_ok = |k: &str| !k.is_empty() && k.len() <= KEY_BYTES_MAX;
    let mut s = Shape {
        safe: true,
        invalidates: false,
        sets: 0,
        set_bytes: 0,
    };
    for op in batch.iter() {
        match op.as_ref() {
            OpRef::Set { key, value } => {
                s.safe &= key_ok(key);
                s.sets += 1;
                s.set_bytes += (key.len() + value.len() + 16) as u64;
            }
            OpRef::Remove { key } => s.safe &= key_ok(key),
            OpRef::Touch => {}
            OpRef::Invalidate => s.invalidates = true,
            // Their outcome depends on the value they find: not safe.
            OpRef::Append { .. } | OpRef::Incr { .. } => s.safe = false,
        }
    }
    s
}

/// The session `copy` holds at its version: its record with every pending
/// batch applied, as the host applied them. `None` if the record does not
/// deserialize (it was validated, so it does).
///
/// Pending batches hold only `Set`, `Remove` and `Touch` (see [`shape`]),
/// which write without reading and cannot fail within the copy's bounds,
/// so applying them one by one leaves each key with its last write and
/// `updated_ms` at the last batch's time: the fold applies just those
/// writes, once. The op log ends as the host's does, with the longest run
/// of the latest batches that `SessionData::log_batch` keeps.
fn materialize(copy: &Copy, scratch: &mut AlignedVec<ALIGN>) -> Option<SessionData> {
    let bytes = aligned(&copy.record, scratch);
    // SAFETY: the record was validated with `rkyv::access` when it arrived
    // or was serialized by this node (`serialize`), and has not changed
    // since; `aligned` put it at `ALIGN`.
    let archived = unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) };
    let mut data = rkyv::deserialize::<SessionData, rancor::Error>(archived).ok()?;
    if copy.pending.is_empty() {
        return Some(data);
    }
    let mut batches: Vec<(u64, &[u8])> = Vec::with_capacity(copy.pending.len());
    batches.extend(copy.pending.iter());
    let mut writes: Vec<OpRef<'_>> = Vec::with_capacity(batches.len());
    let mut slot: HashMap<&str, usize> = HashMap::with_capacity(batches.len());
    for &(_, ops) in &batches {
        debug_assert_eq!(ops.as_ptr().align_offset(ALIGN), 0);
        // SAFETY: validated with `rkyv::access` on receipt, at an `ALIGN`
        // boundary (`Store::append_ops`), then copied here byte for byte,
        // again at an `ALIGN` boundary (`PendingLog`); an archive's
        // pointers are relative, so it is as valid here; unchanged since.
        let batch = unsafe { rkyv::access_unchecked::<ArchivedVec<ArchivedOp>>(ops) };
        for op in batch.iter().map(ArchivedOp::as_ref) {
            let key = match op {
                OpRef::Set { key, .. } | OpRef::Remove { key } => key,
                OpRef::Touch => continue,
                // Never appended (see `Store::append_ops`).
                OpRef::Append { .. } | OpRef::Incr { .. } | OpRef::Invalidate => return None,
            };
            match slot.entry(key) {
                hashbrown::hash_map::Entry::Occupied(o) => writes[*o.get()] = op,
                hashbrown::hash_map::Entry::Vacant(v) => {
                    v.insert(writes.len());
                    writes.push(op);
                }
            }
        }
    }
    let last_ms = batches.last().map_or(0, |b| b.0);
    let applied = data.apply_refs(writes, last_ms, APPLY_QUOTA_BYTES);
    // The bounds checked on append rule out every error.
    debug_assert_eq!(applied, Ok(Applied::Changed));
    if applied != Ok(Applied::Changed) {
        return None;
    }
    // Batches older than the latest run the log can hold would be pushed
    // and dropped again; so would the old log if one of them is.
    let (mut kept, mut kept_bytes) = (0, 0);
    for &(_, ops) in batches.iter().rev() {
        if kept == LOG_ENTRIES_MAX || kept_bytes + ops.len() > LOG_BYTES_MAX {
            break;
        }
        kept += 1;
        kept_bytes += ops.len();
    }
    let first = batches.len() - kept;
    if first > 0 {
        data.log.clear();
    }
    let base = copy.base_version();
    for (i, &(_, ops)) in batches.iter().enumerate().skip(first) {
        data.log_batch(base + i as u64 + 1, ops);
    }
    Some(data)
}

/// Serializes `data` into `ser` (reused: no allocation once it has grown).
fn serialize(data: &SessionData, ser: &mut AlignedVec<ALIGN>) {
    let mut buf = std::mem::take(ser);
    buf.clear();
    *ser = rkyv::api::high::to_bytes_in::<_, rancor::Error>(data, buf)
        .expect("serializing a session into memory");
}

impl Store {
    /// An empty store.
    pub fn new(limits: NodeLimits, incarnation: u64) -> Store {
        Store {
            copies: HashMap::new(),
            bytes: 0,
            limits,
            incarnation,
            scratch: AlignedVec::new(),
            ser: AlignedVec::new(),
            expire_cursor: 0,
            deadlines: std::collections::BinaryHeap::new(),
            counters: NodeCounters::default(),
        }
    }

    /// Drops copies of sessions that expired: past their absolute expiry
    /// by more than `rule.grace_ms`, or not written for `rule.idle_max_ms`
    /// (when set). Copies a host forgot to remove (its host died, and
    /// nobody took the session over) end here instead of filling the node.
    /// Absolute expiry comes off a heap of deadlines (no scan); idle
    /// expiry walks the copies from where the last call stopped. Each part
    /// looks at up to `budget` entries, so a call takes bounded time;
    /// returns the copies dropped.
    pub fn expire(&mut self, now_ms: u64, rule: ExpiryRule, budget: usize) -> u64 {
        let mut dropped = 0;
        // Absolute expiry: the deadlines due, earliest first. A deadline
        // whose copy went (or came back as another record) is skipped.
        let mut looked = 0;
        while looked < budget
            && let Some(&std::cmp::Reverse((at, sid))) = self.deadlines.peek()
            && now_ms >= at.saturating_add(rule.grace_ms)
        {
            self.deadlines.pop();
            looked += 1;
            let Some(c) = self.copies.get(&sid) else {
                continue;
            };
            let bytes = aligned(&c.record, &mut self.scratch);
            // SAFETY: as below.
            let r = unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) };
            if r.expires_at_ms.to_native() == at {
                self.remove(&sid);
                dropped += 1;
            }
        }
        self.counters.expired += dropped;
        if rule.idle_max_ms == 0 {
            return dropped;
        }
        dropped + self.expire_idle(now_ms, rule, budget)
    }

    /// The idle part of [`Store::expire`]: a walk over `budget` copies from
    /// where the last one stopped (it costs a walk of the table up to the
    /// cursor, so only a node configured for idle expiry pays it).
    fn expire_idle(&mut self, now_ms: u64, rule: ExpiryRule, budget: usize) -> u64 {
        if self.copies.is_empty() {
            return 0;
        }
        if self.expire_cursor >= self.copies.len() {
            self.expire_cursor = 0;
        }
        let mut doomed = Vec::new();
        let mut seen = 0;
        for (sid, c) in self.copies.iter().skip(self.expire_cursor).take(budget) {
            seen += 1;
            let bytes = aligned(&c.record, &mut self.scratch);
            // SAFETY: a copy's record was validated with `rkyv::access` when
            // it arrived, or serialized by this node, and has not changed
            // since; `aligned` put it at `ALIGN`.
            let r = unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) };
            let written = c
                .pending
                .iter()
                .last()
                .map_or(r.updated_ms.to_native(), |(at, _)| at);
            let expires = r.expires_at_ms.to_native();
            let past_expiry = expires != 0 && now_ms >= expires.saturating_add(rule.grace_ms);
            let idle = rule.idle_max_ms != 0 && now_ms >= written.saturating_add(rule.idle_max_ms);
            if past_expiry || idle {
                doomed.push(*sid);
            }
        }
        self.expire_cursor += seen - doomed.len();
        for sid in &doomed {
            self.remove(sid);
        }
        self.counters.expired += doomed.len() as u64;
        doomed.len() as u64
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Bytes held, as charged against [`NodeLimits::bytes_max`].
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The copy of `sid`, as it stands: its pending batches not folded in.
    pub fn get(&self, sid: &Sid) -> Option<&Copy> {
        self.copies.get(sid)
    }

    /// The copy of `sid` with its pending batches folded in, so its
    /// [`Copy::record`] is the session at [`Copy::version`].
    pub fn folded(&mut self, sid: &Sid) -> Option<&Copy> {
        self.fold(sid);
        self.copies.get(sid)
    }

    /// Answers one message; `None` for messages that get no answer.
    pub fn handle(&mut self, msg: Message) -> Option<Message> {
        match msg {
            Message::DeltaBatch(b) => Some(Message::Ack(self.apply_batch(b))),
            Message::Fetch(f) => Some(Message::FetchReply(self.fetch(f))),
            Message::Invalidate(inv) => {
                self.invalidate(&inv);
                None
            }
            Message::Ping(p) => Some(Message::Pong(Pong { nonce: p.nonce })),
            Message::StatsRequest(r) => Some(Message::Stats(self.stats(r))),
            // Replies sent to a server are a confused peer; ignore them.
            _ => None,
        }
    }

    /// Applies a batch in order, op deltas at this node's clock; one ack
    /// entry per delta entry.
    pub fn apply_batch(&mut self, batch: DeltaBatch) -> Ack {
        self.apply_batch_at(batch, sessio_engine::clock::now_ms())
    }

    /// [`Store::apply_batch`] with op deltas applied at `now_ms` (the time
    /// a record's `updated_ms` takes).
    ///
    /// An op delta on the right base is validated, then appended to the
    /// copy's pending batches if it cannot fail to apply: only `Set`,
    /// `Remove`, `Touch` and `Invalidate` with valid keys, and the copy's
    /// attribute count and bytes, bounded from above, stay within the
    /// limits an apply checks. A batch that invalidates drops the copy at
    /// once. Any other batch (`Append`, `Incr`, a bound that could be
    /// passed, a copy at [`PENDING_BATCHES_MAX`] or [`PENDING_BYTES_MAX`],
    /// a store near `bytes_max`) folds the pending batches and is applied
    /// at once, with the outcome an eager apply gives.
    pub fn apply_batch_at(&mut self, batch: DeltaBatch, now_ms: u64) -> Ack {
        // In a large store the copies are cold, and one entry's work is
        // too long for the processor to have two entries' misses in flight
        // at once. Asking for the lines the batch's op deltas will touch
        // first (the copies' slots here, the ends of their pending logs)
        // lets those misses overlap. (Asking for all of a copy about to
        // fold as well measured no better: its reads are sequential.)
        for e in &batch.entries {
            if let Delta::Ops(ops) = &e.body
                && let Some(c) = self.copies.get(&e.sid)
            {
                c.pending.prefetch_push(ops.len());
            }
        }
        let entries = batch
            .entries
            .into_iter()
            .map(|e| {
                let sid = e.sid;
                let (status, version) = self.apply_entry(e, now_ms);
                match status {
                    AckStatus::Applied => self.counters.applied += 1,
                    AckStatus::NeedFull => self.counters.need_full += 1,
                    AckStatus::Fenced => self.counters.fenced += 1,
                    AckStatus::Refused => self.counters.refused += 1,
                }
                AckEntry {
                    sid,
                    version,
                    status,
                }
            })
            .collect();
        Ack { entries }
    }

    /// The version held of `sid` (0: none).
    fn version_of(&self, sid: &Sid) -> u64 {
        self.copies.get(sid).map_or(0, |c| c.version)
    }

    /// One entry's answer, and the version held after it.
    fn apply_entry(&mut self, e: DeltaEntry, now_ms: u64) -> (AckStatus, u64) {
        if let Delta::Ops(ops) = &e.body {
            // The common case, with one lookup.
            if let Some(done) = self.append_ops(&e, ops, now_ms) {
                return done;
            }
            let status = self.apply_now(e.sid, e.epoch, now_ms);
            return (status, self.version_of(&e.sid));
        }
        let held = self.copies.get(&e.sid).map(|c| (c.version, c.epoch));
        if let Some((version, epoch)) = held
            && e.epoch < epoch
        {
            return (AckStatus::Fenced, version);
        }
        match e.body {
            Delta::Remove => {
                if let Some((version, epoch)) = held
                    && e.epoch == epoch
                    && e.new_version != 0
                    && version > e.new_version
                {
                    // A removal (or a stand-in's drop) older than the copy:
                    // a later write overtook it. Keep the copy.
                    return (AckStatus::Applied, version);
                }
                self.remove(&e.sid);
                (AckStatus::Applied, 0)
            }
            Delta::Full(record) => {
                if let Some((version, epoch)) = held
                    && e.epoch == epoch
                    && e.new_version <= version
                {
                    // A replay or a reordered older copy: ours is as new.
                    return (AckStatus::Applied, version);
                }
                let bytes = aligned(&record, &mut self.scratch);
                let Ok(archived) = rkyv::access::<ArchivedSessionData, rancor::Error>(bytes) else {
                    return (AckStatus::Refused, self.version_of(&e.sid));
                };
                let attrs = attr_measure(archived);
                let expires = archived.expires_at_ms.to_native();
                let copy = Copy::new(e.new_version, e.epoch, record, attrs);
                let status = self.put(e.sid, copy);
                // A session's absolute expiry never changes: one deadline
                // per copy the store did not hold before is enough.
                if status == AckStatus::Applied && held.is_none() && expires != 0 {
                    self.deadlines.push(std::cmp::Reverse((expires, e.sid)));
                }
                (status, self.version_of(&e.sid))
            }
            Delta::Ops(_) => unreachable!("handled above"),
        }
    }

    /// An op delta `e` (body `ops`), checked against the copy it names
    /// (fencing, base version) and, on the right base, validated and
    /// appended, or the copy dropped if it invalidates it. `None` when the
    /// batch must be applied at once: it is left in `scratch`, validated.
    fn append_ops(&mut self, e: &DeltaEntry, ops: &[u8], now_ms: u64) -> Option<(AckStatus, u64)> {
        let Store {
            copies,
            bytes,
            limits,
            scratch,
            ..
        } = self;
        let Some(copy) = copies.get_mut(&e.sid) else {
            return Some((AckStatus::NeedFull, 0));
        };
        if e.epoch < copy.epoch {
            return Some((AckStatus::Fenced, copy.version));
        }
        // `checked_add`: a peer may have sent a copy at `u64::MAX`.
        if e.base_version != copy.version || copy.version.checked_add(1) != Some(e.new_version) {
            return Some((AckStatus::NeedFull, copy.version));
        }
        let (sid, epoch) = (e.sid, e.epoch);
        // Validated where it arrived, still in cache (or in `scratch` if it
        // is not aligned), then copied to the pending log. That log is
        // cold, and nothing reads it back before a fold, so the copy's
        // stores do not hold up what follows.
        let in_place = ops.as_ptr().align_offset(ALIGN) == 0;
        let checked = aligned(ops, scratch);
        let Ok(batch) = rkyv::access::<ArchivedVec<ArchivedOp>, rancor::Error>(checked) else {
            return Some((AckStatus::Refused, copy.version));
        };
        let shape = shape(batch);
        let cannot_fail = shape.safe
            && copy.attrs_bound + shape.sets <= ATTRS_MAX as u64
            && copy.attr_bytes_bound + shape.set_bytes <= APPLY_QUOTA_BYTES;
        if cannot_fail && shape.invalidates {
            self.remove(&sid);
            return Some((AckStatus::Applied, 0));
        }
        let charge = pending_charge(ops.len());
        if cannot_fail
            && copy.pending.len() < PENDING_BATCHES_MAX
            && copy.bytes - copy.record.len() as u64 + charge <= PENDING_BYTES_MAX
            && *bytes + charge <= limits.bytes_max
        {
            copy.pending.push(now_ms, ops);
            copy.version += 1;
            copy.epoch = epoch;
            copy.bytes += charge;
            copy.attrs_bound += shape.sets;
            copy.attr_bytes_bound += shape.set_bytes;
            *bytes += charge;
            return Some((AckStatus::Applied, copy.version));
        }
        if in_place {
            scratch.clear();
            scratch.extend_from_slice(ops);
        }
        None
    }

    /// Folds the pending batches of `sid` and applies the op batch in
    /// `scratch` (validated by `append_ops`) on top, as an eager apply
    /// would: `NeedFull` if it fails, `Refused` if the result does not
    /// fit; the copy's version stays as it was in both cases.
    fn apply_now(&mut self, sid: Sid, epoch: u64, now_ms: u64) -> AckStatus {
        let ops = std::mem::take(&mut self.scratch);
        let status = self.apply_now_with(sid, epoch, &ops, now_ms);
        self.scratch = ops;
        status
    }

    fn apply_now_with(&mut self, sid: Sid, epoch: u64, ops: &[u8], now_ms: u64) -> AckStatus {
        let Some(mut data) = self.materialize_or_drop(&sid) else {
            // What was pending is gone (see `materialize_or_drop`), and
            // with it this batch's base.
            return AckStatus::NeedFull;
        };
        // SAFETY: validated with `rkyv::access` by `append_ops`, unchanged
        // since, in an `AlignedVec` at `ALIGN`.
        let batch = unsafe { rkyv::access_unchecked::<ArchivedVec<ArchivedOp>>(ops) };
        match data.apply_refs(
            batch.iter().map(ArchivedOp::as_ref),
            now_ms,
            APPLY_QUOTA_BYTES,
        ) {
            Ok(Applied::Changed) => {}
            Ok(Applied::Invalidated) => {
                self.remove(&sid);
                return AckStatus::Applied;
            }
            // The host applied this batch; we could not: resync.
            Err(_) => return AckStatus::NeedFull,
        }
        let copy = self.copies.get_mut(&sid).expect("materialized above");
        // Only reached past `append_ops`' check, so this does not wrap.
        let version = copy.version.saturating_add(1);
        data.log_batch(version, ops);
        serialize(&data, &mut self.ser);
        let new_len = self.ser.len() as u64;
        if self.bytes - copy.bytes + new_len > self.limits.bytes_max {
            return AckStatus::Refused;
        }
        copy.version = version;
        copy.epoch = epoch;
        self.commit_serialized(&sid, &data);
        AckStatus::Applied
    }

    /// Folds the pending batches of `sid` into its record.
    fn fold(&mut self, sid: &Sid) {
        if self.copies.get(sid).is_none_or(|c| c.pending.is_empty()) {
            return;
        }
        if let Some(data) = self.materialize_or_drop(sid) {
            serialize(&data, &mut self.ser);
            self.commit_serialized(sid, &data);
        }
    }

    /// [`materialize`] for the copy of `sid`. Should that fail (it cannot:
    /// pending batches were checked on append and the record on receipt),
    /// the copy drops back to its record, its version with it, so the
    /// host's next delta meets a base mismatch and gets `NeedFull`; and a
    /// record that does not deserialize drops the copy.
    fn materialize_or_drop(&mut self, sid: &Sid) -> Option<SessionData> {
        let copy = self.copies.get_mut(sid)?;
        if let Some(data) = materialize(copy, &mut self.scratch) {
            return Some(data);
        }
        debug_assert!(false, "a copy did not fold");
        if copy.pending.is_empty() {
            self.remove(sid);
            return None;
        }
        let charged = copy.bytes - copy.record.len() as u64;
        self.bytes -= charged;
        copy.bytes -= charged;
        copy.version = copy.base_version();
        copy.pending = PendingLog::default();
        copy.attrs_bound = ATTRS_MAX as u64 + 1;
        copy.attr_bytes_bound = APPLY_QUOTA_BYTES + 1;
        None
    }

    /// Makes the record in `ser` (`data`, serialized) the copy of `sid`'s,
    /// with nothing pending.
    fn commit_serialized(&mut self, sid: &Sid, data: &SessionData) {
        let Some(copy) = self.copies.get_mut(sid) else {
            return;
        };
        let new_len = self.ser.len() as u64;
        // A fold adds no more than its batches were charged
        // (`pending_charge`) to a record this engine serialized, so the
        // store stays within bytes_max. A peer's hand-made record can
        // re-serialize a little larger; it is held all the same (its
        // batches were acknowledged) and counted as it is.
        self.bytes = self.bytes - copy.bytes + new_len;
        copy.record.clear();
        copy.record.extend_from_slice(&self.ser);
        copy.pending = PendingLog::default();
        copy.bytes = new_len;
        copy.attrs_bound = data.attrs.len() as u64;
        copy.attr_bytes_bound = data.attr_bytes();
        self.counters.folds += 1;
    }

    fn remove(&mut self, sid: &Sid) -> Option<Copy> {
        let c = self.copies.remove(sid)?;
        self.bytes -= c.bytes;
        Some(c)
    }

    fn put(&mut self, sid: Sid, copy: Copy) -> AckStatus {
        let old_bytes = self.copies.get(&sid).map(|c| c.bytes);
        let count = self.copies.len() as u64 + u64::from(old_bytes.is_none());
        let bytes = self.bytes - old_bytes.unwrap_or(0) + copy.bytes;
        if count > self.limits.sessions_max || bytes > self.limits.bytes_max {
            return AckStatus::Refused;
        }
        self.bytes = bytes;
        self.copies.insert(sid, copy);
        AckStatus::Applied
    }

    /// Answers a failover fetch, folding the copy's pending batches first.
    pub fn fetch(&mut self, f: Fetch) -> FetchReply {
        self.counters.fetches += 1;
        let found = self.folded(&f.sid).map(|c| FoundRecord {
            version: c.version,
            epoch: c.epoch,
            record: c.record.clone(),
        });
        if found.is_some() {
            self.counters.fetch_hits += 1;
        }
        FetchReply {
            request_id: f.request_id,
            sid: f.sid,
            found,
        }
    }

    /// Drops copies written under an epoch older than each entry's.
    pub fn invalidate(&mut self, inv: &Invalidate) {
        for e in &inv.entries {
            if self.copies.get(&e.sid).is_some_and(|c| c.epoch < e.epoch)
                && self.remove(&e.sid).is_some()
            {
                self.counters.invalidated += 1;
            }
        }
    }

    /// The node's counters.
    pub fn stats(&self, r: StatsRequest) -> Stats {
        let c = &self.counters;
        let counters = [
            ("sessions", self.copies.len() as u64),
            ("bytes", self.bytes),
            ("applied", c.applied),
            ("need_full", c.need_full),
            ("fenced", c.fenced),
            ("refused", c.refused),
            ("fetches", c.fetches),
            ("fetch_hits", c.fetch_hits),
            ("invalidated", c.invalidated),
            ("folds", c.folds),
            ("expired", c.expired),
        ]
        .into_iter()
        .map(|(name, value)| Counter {
            name: name.to_string(),
            value,
        })
        .collect();
        Stats {
            request_id: r.request_id,
            incarnation: self.incarnation,
            counters,
        }
    }
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Node id (handshake id and placement id).
    pub node_id: u16,
    /// What the node agrees to hold.
    pub limits: NodeLimits,
    /// Most open connections.
    pub connections_max: u32,
    /// An authenticated connection idle this long is closed, in ms.
    pub idle_timeout_ms: u64,
    /// Threads serving connections (one runtime each, sharing the port
    /// through `SO_REUSEPORT`, the store split into as many shards; 1 to
    /// [`crate::shards::SHARDS_MAX`]). The kernel spreads connections, so
    /// more threads help once several hosts connect.
    pub threads: usize,
    /// When the node drops copies on its own.
    pub expiry: ExpiryRule,
    /// How often an expiry pass runs, in ms (0 = never).
    pub expire_interval_ms: u64,
}

impl NodeConfig {
    /// Defaults for everything but where it listens and its id.
    pub fn new(listen: SocketAddr, node_id: u16) -> NodeConfig {
        NodeConfig {
            listen,
            node_id,
            limits: NodeLimits::default(),
            connections_max: sessio_net::server::CONNECTIONS_MAX_DEFAULT,
            idle_timeout_ms: sessio_net::server::IDLE_TIMEOUT_MS_DEFAULT,
            threads: 1,
            expiry: ExpiryRule::default(),
            expire_interval_ms: EXPIRE_INTERVAL_MS_DEFAULT,
        }
    }
}

/// Sets the flag the other serving threads stop on, however the first one
/// leaves `serve` (a panic too).
struct StopOthers(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOthers {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a node until `shutdown` completes: on the current thread, plus
/// `config.threads - 1` more that share its port and its store (in shards).
/// Calls `on_bound` with the bound address and the incarnation once every
/// thread listens.
pub fn serve<B: Rt>(
    config: &NodeConfig,
    secret: Secret,
    on_bound: impl FnOnce(SocketAddr, u64),
    shutdown: impl Future<Output = ()> + 'static,
) -> io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let identity = Identity::with_random_incarnation(u64::from(config.node_id))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let threads = config.threads.clamp(1, crate::shards::SHARDS_MAX);
    let mut sc = ServerConfig::new(identity);
    // The cap is the node's: each thread takes its part.
    sc.connections_max = config
        .connections_max
        .div_ceil(u32::try_from(threads).unwrap_or(1))
        .max(1);
    sc.idle_timeout_ms = config.idle_timeout_ms;
    sc.socket.reuse_port = threads > 1;
    let shards = Arc::new(crate::shards::Shards::new(
        config.limits,
        identity.incarnation,
        threads,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let listen = config.listen;
    let node_id = config.node_id;
    let expiry = config.expiry;
    let expiry_every = std::time::Duration::from_millis(config.expire_interval_ms);
    let _stop_others = StopOthers(Arc::clone(&stop));
    B::block_on(async move {
        // A node restarted at once can find its port still held: io_uring
        // tears a dead process's ring down asynchronously, and a pending
        // accept keeps the old listener alive for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(BIND_RETRY_MS);
        let server: Server<B> = loop {
            match Server::bind(listen, sc.clone(), secret.clone()) {
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    B::sleep(std::time::Duration::from_millis(20)).await;
                }
                r => break r?,
            }
        };
        let addr = server.local_addr();
        let mut others = Vec::with_capacity(threads - 1);
        let mut failed = None;
        for t in 1..threads {
            let (tx, rx) = std::sync::mpsc::channel();
            let (shards, stop) = (Arc::clone(&shards), Arc::clone(&stop));
            let (sc, secret) = (sc.clone(), secret.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("node-{node_id}-{t}"))
                .spawn(move || {
                    B::block_on(async move {
                        let server = match Server::<B>::bind(addr, sc, secret) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                                return Err(e);
                            }
                        };
                        let _ = tx.send(Ok(()));
                        let handler = move |_peer: PeerInfo, msg: Message| shards.handle(msg);
                        let stopped = async move {
                            while !stop.load(Ordering::Relaxed) {
                                B::sleep(std::time::Duration::from_millis(5)).await;
                            }
                        };
                        server.serve_until(handler, stopped).await
                    })
                });
            match spawned.map(|h| (h, rx.recv())) {
                Ok((h, Ok(Ok(())))) => others.push(h),
                Ok((h, Ok(Err(e)))) => {
                    let _ = h.join();
                    failed = Some(e);
                    break;
                }
                Ok((h, Err(_))) => {
                    let _ = h.join();
                    failed = Some(io::Error::other("a node thread ended before it listened"));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let result = if let Some(e) = failed {
            Err(e)
        } else {
            on_bound(addr, identity.incarnation);
            let handler = {
                let shards = Arc::clone(&shards);
                move |_peer: PeerInfo, msg: Message| shards.handle(msg)
            };
            // Expiry passes run on this thread between messages.
            let expire = async {
                if expiry_every.is_zero() {
                    return std::future::pending().await;
                }
                loop {
                    B::sleep(expiry_every).await;
                    let dropped = shards.expire(sessio_engine::clock::now_ms(), expiry);
                    if dropped > 0 {
                        tracing::debug!(dropped, "expired copies");
                    }
                }
            };
            let serving = std::pin::pin!(server.serve_until(handler, shutdown));
            let expire = std::pin::pin!(expire);
            match futures_util::future::select(serving, expire).await {
                futures_util::future::Either::Left((r, _)) => r,
                futures_util::future::Either::Right((never, _)) => never,
            }
        };
        stop.store(true, Ordering::Relaxed);
        for h in others {
            let _ = h.join();
        }
        result
    })
}

/// A node served on a thread of this process: for embedding a node in
/// another program, and for tests and benchmarks on loopback. Stopped (and
/// its thread joined) when dropped.
#[derive(Debug)]
pub struct LocalNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its incarnation id.
    pub incarnation: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl LocalNode {
    /// Starts `serve` with `config` on a new thread, on backend `B`; returns
    /// once it listens.
    pub fn start<B: Rt>(config: NodeConfig, secret: Secret) -> io::Result<LocalNode> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("node-{}", config.node_id))
            .spawn({
                let stop = std::sync::Arc::clone(&stop);
                move || {
                    let shutdown = async move {
                        while !stop.load(Ordering::Relaxed) {
                            B::sleep(std::time::Duration::from_millis(5)).await;
                        }
                    };
                    serve::<B>(
                        &config,
                        secret,
                        |addr, inc| {
                            // The starter waits for this; if it is gone, nobody is listening.
                            let _ = tx.send((addr, inc));
                        },
                        shutdown,
                    )
                }
            })?;
        match rx.recv() {
            Ok((addr, incarnation)) => Ok(LocalNode {
                addr,
                incarnation,
                stop,
                thread: Some(thread),
            }),
            // The thread ended before binding: its error says why.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(io::Error::other("the node thread ended before it listened")),
            },
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sessio_engine::Op;
    use sessio_engine::session::{decode_ops, decode_session, encode_ops, encode_session};
    use sessio_net::InvalidateEntry;

    const SID: Sid = [7; 16];

    fn record(attrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut d = SessionData::default();
        let ops: Vec<Op> = attrs
            .iter()
            .map(|(k, v)| Op::Set {
                key: (*k).into(),
                value: v.to_vec(),
            })
            .collect();
        d.apply(&ops, 1, 1 << 20).unwrap();
        encode_session(&d).to_vec()
    }

    fn entry(base: u64, new: u64, epoch: u64, body: Delta) -> DeltaEntry {
        DeltaEntry {
            sid: SID,
            base_version: base,
            new_version: new,
            epoch,
            body,
        }
    }

    fn one(store: &mut Store, e: DeltaEntry) -> AckEntry {
        let ack = store.apply_batch(DeltaBatch {
            host_id: 1,
            entries: vec![e],
        });
        assert_eq!(ack.entries.len(), 1);
        ack.entries[0]
    }

    fn set(key: &str, v: &[u8]) -> Delta {
        Delta::Ops(
            encode_ops(&[Op::Set {
                key: key.into(),
                value: v.to_vec(),
            }])
            .to_vec(),
        )
    }

    #[test]
    fn ops_need_the_base_version() {
        let mut s = Store::new(NodeLimits::default(), 1);
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
            AckStatus::NeedFull
        );
        let full = one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
        assert_eq!((full.status, full.version), (AckStatus::Applied, 1));
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
            AckStatus::Applied
        );
        // The same delta again: base no longer matches.
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"y"))).status,
            AckStatus::NeedFull
        );
        assert_eq!(s.get(&SID).unwrap().pending_batches(), 1);
        let c = s.folded(&SID).unwrap();
        assert_eq!((c.version(), c.pending_batches()), (2, 0));
        let d = decode_session(c.record()).unwrap();
        assert_eq!(d.get("a"), Some(&b"x"[..]));
        assert_eq!(d.log.last().unwrap().version, 2);
    }

    #[test]
    fn older_epochs_are_fenced() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(
            &mut s,
            entry(0, 5, 3, Delta::Full(record(&[("o", b"new")]))),
        );
        assert_eq!(
            one(&mut s, entry(5, 6, 2, set("o", b"old"))).status,
            AckStatus::Fenced
        );
        assert_eq!(
            one(
                &mut s,
                entry(0, 9, 2, Delta::Full(record(&[("o", b"old")])))
            )
            .status,
            AckStatus::Fenced
        );
        assert_eq!(
            one(&mut s, entry(0, 9, 2, Delta::Remove)).status,
            AckStatus::Fenced
        );
        // The newer owner's ops on the same base move the copy forward.
        assert_eq!(
            one(&mut s, entry(5, 6, 4, set("o", b"b"))).status,
            AckStatus::Applied
        );
        assert_eq!(s.get(&SID).unwrap().epoch(), 4);
        assert_eq!(s.counters.fenced, 3);
        // A replayed full copy of the same epoch is acknowledged, not applied.
        let r = one(&mut s, entry(0, 5, 4, Delta::Full(record(&[]))));
        assert_eq!((r.status, r.version), (AckStatus::Applied, 6));
    }

    #[test]
    fn bad_records_and_full_stores_are_refused() {
        let mut s = Store::new(
            NodeLimits {
                sessions_max: 1,
                bytes_max: 1 << 20,
            },
            1,
        );
        assert_eq!(
            one(&mut s, entry(0, 1, 1, Delta::Full(vec![0xFF; 40]))).status,
            AckStatus::Refused
        );
        assert_eq!(
            one(&mut s, entry(0, 1, 1, Delta::Full(record(&[])))).status,
            AckStatus::Applied
        );
        assert_eq!(
            one(&mut s, entry(1, 2, 1, Delta::Ops(vec![1, 2, 3]))).status,
            AckStatus::Refused
        );
        let other = DeltaEntry {
            sid: [8; 16],
            ..entry(0, 1, 1, Delta::Full(record(&[])))
        };
        assert_eq!(one(&mut s, other).status, AckStatus::Refused);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn fetch_remove_and_invalidate() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
        let r = s.fetch(Fetch {
            request_id: 9,
            sid: SID,
        });
        assert_eq!(r.found.unwrap().version, 3);
        s.invalidate(&Invalidate {
            entries: vec![InvalidateEntry { sid: SID, epoch: 2 }],
        });
        assert_eq!(s.len(), 1, "same epoch is not older");
        s.invalidate(&Invalidate {
            entries: vec![InvalidateEntry { sid: SID, epoch: 3 }],
        });
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
        assert_eq!(
            one(&mut s, entry(3, 4, 2, Delta::Remove)).status,
            AckStatus::Applied
        );
        assert!(
            s.fetch(Fetch {
                request_id: 1,
                sid: SID
            })
            .found
            .is_none()
        );
        let inv = encode_ops(&[Op::Invalidate]).to_vec();
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[]))));
        assert_eq!(
            one(&mut s, entry(3, 4, 2, Delta::Ops(inv))).status,
            AckStatus::Applied
        );
        assert!(s.is_empty());
    }

    #[test]
    fn versions_at_the_top_of_the_range_are_refused_not_a_panic() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(
            &mut s,
            entry(0, u64::MAX, 2, Delta::Full(record(&[("k", b"v")]))),
        );
        let a = one(&mut s, entry(u64::MAX, 0, 2, set("k", b"w")));
        assert_eq!(a.status, AckStatus::NeedFull);
        let a = one(&mut s, entry(u64::MAX, u64::MAX, 2, set("k", b"w")));
        assert_eq!(a.status, AckStatus::NeedFull);
    }

    #[test]
    fn a_removal_overtaken_by_a_write_keeps_the_copy() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
        assert_eq!(
            one(&mut s, entry(3, 4, 2, set("k", b"w"))).status,
            AckStatus::Applied
        );
        // A stand-in's drop of version 3, read after the write of 4.
        let a = one(&mut s, entry(3, 3, 2, Delta::Remove));
        assert_eq!((a.status, a.version), (AckStatus::Applied, 4));
        assert_eq!(s.get(&SID).map(Copy::version), Some(4));
        // At the copy's version, or from a newer owner, it goes.
        assert_eq!(one(&mut s, entry(4, 4, 2, Delta::Remove)).version, 0);
        assert!(s.is_empty());
        one(&mut s, entry(0, 9, 2, Delta::Full(record(&[]))));
        one(&mut s, entry(0, 1, 3, Delta::Remove));
        assert!(s.is_empty(), "a newer epoch removes any version");
    }

    #[test]
    fn expiry_drops_expired_and_idle_copies_within_budget() {
        let rec = |updated_ms: u64, expires_at_ms: u64| {
            encode_session(&SessionData {
                updated_ms,
                expires_at_ms,
                ..SessionData::default()
            })
            .to_vec()
        };
        let full = |sid: Sid, record: Vec<u8>| DeltaEntry {
            sid,
            ..entry(0, 1, 1, Delta::Full(record))
        };
        let mut s = Store::new(NodeLimits::default(), 1);
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        let ack = s.apply_batch_at(
            DeltaBatch {
                host_id: 1,
                entries: vec![
                    full(a, rec(500, 1_000)),
                    full(b, rec(500, 0)),
                    full(c, rec(500, 0)),
                ],
            },
            500,
        );
        assert!(ack.entries.iter().all(|e| e.status == AckStatus::Applied));
        // C is written later, by an op delta kept pending.
        let ack = s.apply_batch_at(
            DeltaBatch {
                host_id: 1,
                entries: vec![DeltaEntry {
                    sid: c,
                    ..entry(1, 2, 1, set("k", b"v"))
                }],
            },
            5_000,
        );
        assert_eq!(ack.entries[0].status, AckStatus::Applied);
        assert_eq!(s.get(&c).unwrap().pending_batches(), 1);
        let rule = ExpiryRule {
            grace_ms: 100,
            idle_max_ms: 0,
        };
        assert_eq!(s.expire(1_099, rule, 100), 0, "within the grace");
        assert_eq!(s.expire(1_100, rule, 100), 1);
        assert!(s.get(&a).is_none());
        let idle = ExpiryRule {
            idle_max_ms: 2_000,
            ..rule
        };
        assert_eq!(s.expire(2_499, idle, 100), 0);
        assert_eq!(s.expire(2_500, idle, 100), 1, "B, idle since 500");
        assert!(s.get(&c).is_some(), "C was written at 5000");
        assert_eq!(s.expire(7_000, idle, 100), 1);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.counters.expired, 3);

        // A pass looks at `budget` copies; passes go round the whole store.
        let many: Vec<DeltaEntry> = (0..100u8)
            .map(|i| full([i; 16], rec(0, if i % 2 == 0 { 10 } else { 0 })))
            .collect();
        s.apply_batch_at(
            DeltaBatch {
                host_id: 1,
                entries: many,
            },
            0,
        );
        assert_eq!(s.len(), 100);
        let first = s.expire(1_000, rule, 10);
        assert!(first <= 10, "{first}");
        let mut passes = 1;
        while s.len() > 50 {
            s.expire(1_000, rule, 10);
            passes += 1;
            assert!(
                passes <= 12,
                "{} copies left after {passes} passes",
                s.len()
            );
        }
        assert_eq!(s.len(), 50);
        assert!(s.copies.values().all(|c| c.pending_batches() == 0));
    }

    fn set_n(i: usize, bytes: usize) -> Delta {
        set(&format!("k{}", i % 5), &vec![i as u8; bytes])
    }

    /// Full at version 1, then `n` op deltas of one `bytes`-byte `Set`.
    fn loaded(n: usize, bytes: usize) -> Store {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
        for i in 0..n {
            let v = i as u64 + 1;
            let a = one(&mut s, entry(v, v + 1, 1, set_n(i, bytes)));
            assert_eq!((a.status, a.version), (AckStatus::Applied, v + 1));
        }
        s
    }

    #[test]
    fn op_deltas_wait_until_a_fetch_folds_them() {
        let mut s = loaded(5, 100);
        let c = s.get(&SID).unwrap();
        assert_eq!(
            (c.version(), c.base_version(), c.pending_batches()),
            (6, 1, 5)
        );
        assert_eq!(s.counters.folds, 0);
        assert_eq!(
            s.bytes(),
            record(&[("a", b"0")]).len() as u64 + 5 * pending_charge(ops_len(&set_n(0, 100))),
            "each pending batch is charged"
        );
        let r = s.fetch(Fetch {
            request_id: 1,
            sid: SID,
        });
        let found = r.found.unwrap();
        assert_eq!((found.version, found.epoch), (6, 1));
        let d = decode_session(&found.record).unwrap();
        assert_eq!(d.get("a"), Some(&b"0"[..]));
        assert_eq!(d.get("k4"), Some(&[4u8; 100][..]));
        let logged: Vec<u64> = d.log.iter().map(|l| l.version).collect();
        assert_eq!(logged.last(), Some(&6));
        assert_eq!(s.counters.folds, 1);
        let c = s.get(&SID).unwrap();
        assert_eq!((c.pending_batches(), c.base_version()), (0, 6));
        assert_eq!(s.bytes(), found.record.len() as u64, "charged as folded");
        // A second fetch has nothing to fold.
        s.fetch(Fetch {
            request_id: 2,
            sid: SID,
        });
        assert_eq!(s.counters.folds, 1);
    }

    #[test]
    fn pending_batches_are_bounded_by_count_and_bytes() {
        let n = (PENDING_BATCHES_MAX + 1) * 3 + 5;
        let s = loaded(n, 10);
        let c = s.get(&SID).unwrap();
        assert_eq!(c.version(), n as u64 + 1);
        assert_eq!(c.pending_batches(), 5);
        assert_eq!(s.counters.folds, 3, "a batch past the bound folds");

        let big = 3000;
        let s = loaded(20, big);
        let c = s.get(&SID).unwrap();
        let per = pending_charge(ops_len(&set_n(0, big)));
        assert!(c.pending_batches() as u64 * per <= PENDING_BYTES_MAX);
        assert!(c.bytes() - c.record().len() as u64 <= PENDING_BYTES_MAX);
        // Each run: as many batches as the byte bound holds, then a fold.
        let run = PENDING_BYTES_MAX / per + 1;
        assert!(run < PENDING_BATCHES_MAX as u64);
        assert_eq!(s.counters.folds, 20 / run);
    }

    #[test]
    fn batches_that_could_fail_apply_at_once() {
        // A counter, an append list, a bad key, an invalidation that fails:
        // each folds what is pending and gets the eager answer.
        let mut s = loaded(3, 10);
        let incr = |by| {
            Delta::Ops(
                encode_ops(&[Op::Incr {
                    key: "n".into(),
                    by,
                }])
                .to_vec(),
            )
        };
        assert_eq!(
            one(&mut s, entry(4, 5, 1, incr(2))).status,
            AckStatus::Applied
        );
        assert_eq!(s.get(&SID).unwrap().pending_batches(), 0);
        assert_eq!(s.counters.folds, 1);
        // Overflows: the host could not have applied this; resync.
        let a = one(&mut s, entry(5, 6, 1, incr(i64::MAX)));
        assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
        let a = one(&mut s, entry(5, 6, 1, set("", b"x")));
        assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
        let bad_then_invalidate = Delta::Ops(
            encode_ops(&[
                Op::Invalidate,
                Op::Set {
                    key: "x".repeat(KEY_BYTES_MAX + 1),
                    value: vec![],
                },
            ])
            .to_vec(),
        );
        let a = one(&mut s, entry(5, 6, 1, bad_then_invalidate));
        assert_eq!((a.status, a.version), (AckStatus::NeedFull, 5));
        let append = Delta::Ops(
            encode_ops(&[Op::Append {
                key: "h".into(),
                item: b"e1".to_vec(),
                max_items: 4,
            }])
            .to_vec(),
        );
        assert_eq!(
            one(&mut s, entry(5, 6, 1, append)).status,
            AckStatus::Applied
        );
        let d = decode_session(s.folded(&SID).unwrap().record()).unwrap();
        assert_eq!(d.get("n"), Some(&2i64.to_le_bytes()[..]));
        assert_eq!(d.get("h"), Some(&[2, 0, 0, 0, b'e', b'1'][..]));
        // A safe invalidation with batches pending drops the copy at once.
        one(&mut s, entry(6, 7, 1, set("a", b"1")));
        let inv = Delta::Ops(encode_ops(&[Op::Touch, Op::Invalidate]).to_vec());
        let a = one(&mut s, entry(7, 8, 1, inv));
        assert_eq!((a.status, a.version), (AckStatus::Applied, 0));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn bytes_max_counts_pending_batches() {
        let base = record(&[("a", b"0")]).len() as u64;
        let per = pending_charge(ops_len(&set_n(0, 100)));
        let mut s = Store::new(
            NodeLimits {
                sessions_max: 10,
                bytes_max: base + 2 * per,
            },
            1,
        );
        one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
        for v in 1..=2 {
            assert_eq!(
                one(&mut s, entry(v, v + 1, 1, set_n(0, 100))).status,
                AckStatus::Applied
            );
        }
        assert_eq!(s.bytes(), base + 2 * per);
        assert_eq!(s.get(&SID).unwrap().pending_batches(), 2);
        // No room to charge a third: it is applied at once, and the folded
        // record (the same key set again) fits.
        let a = one(&mut s, entry(3, 4, 1, set_n(0, 100)));
        assert_eq!((a.status, a.version), (AckStatus::Applied, 4));
        let c = s.get(&SID).unwrap();
        assert_eq!(c.pending_batches(), 0);
        assert!(s.bytes() <= base + 2 * per);
        assert_eq!(s.bytes(), c.record().len() as u64);
        // A value the folded record has no room for is refused; the copy
        // stays as it was.
        let a = one(&mut s, entry(4, 5, 1, set_n(1, 2 * per as usize)));
        assert_eq!((a.status, a.version), (AckStatus::Refused, 4));
        assert_eq!(s.get(&SID).unwrap().version(), 4);
    }

    fn ops_len(d: &Delta) -> usize {
        match d {
            Delta::Ops(b) => b.len(),
            _ => panic!("not ops"),
        }
    }

    /// The node before op deltas were deferred: every delta decoded,
    /// applied to the decoded record and re-encoded at once. The reference
    /// the store must agree with (acks and fetched records), except where
    /// `bytes_max` comes into it.
    #[derive(Default)]
    struct Eager {
        copies: std::collections::HashMap<Sid, (u64, u64, Vec<u8>)>,
        sessions_max: u64,
    }

    impl Eager {
        fn apply(&mut self, e: &DeltaEntry, now_ms: u64) -> AckEntry {
            let status = self.status(e, now_ms);
            AckEntry {
                sid: e.sid,
                version: self.copies.get(&e.sid).map_or(0, |c| c.0),
                status,
            }
        }

        fn status(&mut self, e: &DeltaEntry, now_ms: u64) -> AckStatus {
            let held = self.copies.get(&e.sid).map(|c| (c.0, c.1));
            if held.is_some_and(|(_, ep)| e.epoch < ep) {
                return AckStatus::Fenced;
            }
            match &e.body {
                Delta::Remove => {
                    if !held.is_some_and(|(v, ep)| {
                        ep == e.epoch && e.new_version != 0 && v > e.new_version
                    }) {
                        self.copies.remove(&e.sid);
                    }
                    AckStatus::Applied
                }
                Delta::Full(record) => {
                    if held.is_some_and(|(v, ep)| e.epoch == ep && e.new_version <= v) {
                        return AckStatus::Applied;
                    }
                    if decode_session(record).is_err() {
                        return AckStatus::Refused;
                    }
                    self.put(e, record.clone())
                }
                Delta::Ops(ops) => {
                    let Some((v, _)) = held else {
                        return AckStatus::NeedFull;
                    };
                    if e.base_version != v || e.new_version != v + 1 {
                        return AckStatus::NeedFull;
                    }
                    let Ok(decoded) = decode_ops(ops) else {
                        return AckStatus::Refused;
                    };
                    let mut data = decode_session(&self.copies[&e.sid].2).unwrap();
                    match data.apply(&decoded, now_ms, APPLY_QUOTA_BYTES) {
                        Ok(Applied::Changed) => {}
                        Ok(Applied::Invalidated) => {
                            self.copies.remove(&e.sid);
                            return AckStatus::Applied;
                        }
                        Err(_) => return AckStatus::NeedFull,
                    }
                    data.log_batch(e.new_version, ops);
                    self.put(e, encode_session(&data).to_vec())
                }
            }
        }

        fn put(&mut self, e: &DeltaEntry, record: Vec<u8>) -> AckStatus {
            let count = self.copies.len() as u64 + u64::from(!self.copies.contains_key(&e.sid));
            if count > self.sessions_max {
                return AckStatus::Refused;
            }
            self.copies.insert(e.sid, (e.new_version, e.epoch, record));
            AckStatus::Applied
        }
    }

    #[test]
    fn fold_keeps_the_log_the_host_keeps() {
        let touch = || vec![Op::Touch];
        let setb = |n: usize| {
            vec![Op::Set {
                key: "a".into(),
                value: vec![1; n],
            }]
        };
        let runs: Vec<Vec<Vec<Op>>> = vec![
            // More batches than the log keeps entries.
            (0..LOG_ENTRIES_MAX + 8).map(|_| touch()).collect(),
            // More bytes than it keeps.
            (0..10).map(|_| setb(300)).collect(),
            // One batch over the log's bytes: it and all before it go.
            vec![setb(10), setb(10), setb(1100), setb(10), setb(20)],
            vec![setb(10), setb(1100)],
        ];
        for run in runs {
            let mut s = Store::new(NodeLimits::default(), 1);
            let mut eager = Eager {
                sessions_max: 1,
                ..Eager::default()
            };
            let full = entry(0, 1, 1, Delta::Full(record(&[("a", b"0")])));
            eager.apply(&full, 0);
            one(&mut s, full);
            // Half the run eagerly (on the record's log), then the rest
            // pending, so both the old log and the new batches count.
            for (i, ops) in run.iter().enumerate() {
                let v = i as u64 + 1;
                let e = entry(v, v + 1, 1, Delta::Ops(encode_ops(ops).to_vec()));
                eager.apply(&e, v);
                s.apply_batch_at(
                    DeltaBatch {
                        host_id: 1,
                        entries: vec![e],
                    },
                    v,
                );
                if i + 1 == run.len() / 2 {
                    s.fold(&SID);
                }
            }
            assert!(s.get(&SID).unwrap().pending_batches() > 0);
            let want = &eager.copies[&SID].2;
            assert_eq!(s.folded(&SID).unwrap().record(), &want[..]);
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Full {
            sid: u8,
            ahead: u8,
            epoch: u8,
            value: u8,
        },
        Ops {
            sid: u8,
            base_off: i8,
            epoch: u8,
            ops: Vec<Op>,
        },
        Remove {
            sid: u8,
            epoch: u8,
        },
        Fetch {
            sid: u8,
        },
        Invalidate {
            sid: u8,
            epoch: u8,
        },
    }

    fn any_op() -> impl Strategy<Value = Op> {
        let key = prop_oneof![
            4 => prop::sample::select(vec!["a", "b", "c", "n"]).prop_map(String::from),
            1 => Just(String::new()),
            1 => Just("k".repeat(KEY_BYTES_MAX + 1)),
        ];
        prop_oneof![
            8 => (key.clone(), prop_oneof![
                    8 => prop::collection::vec(any::<u8>(), 0..120),
                    // Past what the op log keeps: it drops older batches.
                    1 => prop::collection::vec(any::<u8>(), 900..1100),
                ])
                .prop_map(|(key, value)| Op::Set { key, value }),
            2 => key.clone().prop_map(|key| Op::Remove { key }),
            2 => (key.clone(), prop::collection::vec(any::<u8>(), 0..8), 0u32..4)
                .prop_map(|(key, item, max_items)| Op::Append { key, item, max_items }),
            2 => (key, prop_oneof![Just(i64::MAX), -5i64..5])
                .prop_map(|(key, by)| Op::Incr { key, by }),
            1 => Just(Op::Touch),
            1 => Just(Op::Invalidate),
        ]
    }

    fn any_step() -> impl Strategy<Value = Step> {
        let epoch = prop_oneof![6 => Just(1u8), 1 => Just(0u8), 1 => Just(2u8)];
        prop_oneof![
            2 => (0u8..3, 0u8..3, epoch.clone(), any::<u8>())
                .prop_map(|(sid, ahead, epoch, value)| Step::Full { sid, ahead, epoch, value }),
            16 => (0u8..3, prop_oneof![10 => Just(0i8), 1 => -1i8..2], epoch.clone(),
                   prop::collection::vec(any_op(), 0..3))
                .prop_map(|(sid, base_off, epoch, ops)| Step::Ops { sid, base_off, epoch, ops }),
            1 => (0u8..3, epoch.clone()).prop_map(|(sid, epoch)| Step::Remove { sid, epoch }),
            2 => (0u8..3).prop_map(|sid| Step::Fetch { sid }),
            1 => (0u8..3, epoch).prop_map(|(sid, epoch)| Step::Invalidate { sid, epoch }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Deferring op deltas and folding them (on fetch, at the bounds,
        /// before a batch that could fail) gives the same acks and the same
        /// fetched records, byte for byte, as applying each delta at once.
        #[test]
        fn folding_matches_applying_each_delta_at_once(
            steps in prop::collection::vec(any_step(), 1..200),
            batch_len in 1usize..6,
        ) {
            let mut store = Store::new(NodeLimits { sessions_max: 2, bytes_max: u64::MAX }, 1);
            let mut eager = Eager { sessions_max: 2, ..Eager::default() };
            let sid = |n: u8| [n; 16];
            let mut batch: Vec<DeltaEntry> = Vec::new();
            let mut now_ms = 1_000;
            let flush = |store: &mut Store, eager: &mut Eager, batch: &mut Vec<DeltaEntry>, now_ms: u64|
                -> Result<(), TestCaseError> {
                let want: Vec<AckEntry> = batch.iter().map(|e| eager.apply(e, now_ms)).collect();
                let got = store.apply_batch_at(DeltaBatch { host_id: 1, entries: std::mem::take(batch) }, now_ms);
                prop_assert_eq!(got.entries, want);
                Ok(())
            };
            for step in steps {
                // Versions as the eager node holds them when the batch is
                // built, as a host would see them.
                let held = |eager: &Eager, n: u8| eager.copies.get(&sid(n)).map_or(0, |c| c.0)
                    + batch.iter().filter(|e| e.sid == sid(n)).count() as u64;
                match step {
                    Step::Full { sid: n, ahead, epoch, value } => {
                        let v = held(&eager, n) + u64::from(ahead);
                        batch.push(DeltaEntry {
                            sid: sid(n), base_version: 0, new_version: v, epoch: u64::from(epoch),
                            body: Delta::Full(record(&[("a", &[value; 30]), ("n", &[0; 8])])),
                        });
                    }
                    Step::Ops { sid: n, base_off, epoch, ops } => {
                        let base = held(&eager, n).saturating_add_signed(i64::from(base_off));
                        batch.push(DeltaEntry {
                            sid: sid(n), base_version: base, new_version: base + 1,
                            epoch: u64::from(epoch), body: Delta::Ops(encode_ops(&ops).to_vec()),
                        });
                    }
                    Step::Remove { sid: n, epoch } => batch.push(DeltaEntry {
                        sid: sid(n), base_version: 0, new_version: 0, epoch: u64::from(epoch),
                        body: Delta::Remove,
                    }),
                    Step::Fetch { sid: n } => {
                        flush(&mut store, &mut eager, &mut batch, now_ms)?;
                        let got = store.fetch(Fetch { request_id: 1, sid: sid(n) }).found;
                        let want = eager.copies.get(&sid(n)).map(|c| FoundRecord {
                            version: c.0, epoch: c.1, record: c.2.clone(),
                        });
                        prop_assert_eq!(got, want);
                    }
                    Step::Invalidate { sid: n, epoch } => {
                        flush(&mut store, &mut eager, &mut batch, now_ms)?;
                        let entry = InvalidateEntry { sid: sid(n), epoch: u64::from(epoch) };
                        store.invalidate(&Invalidate { entries: vec![entry] });
                        if eager.copies.get(&sid(n)).is_some_and(|c| c.1 < entry.epoch) {
                            eager.copies.remove(&sid(n));
                        }
                    }
                }
                if batch.len() >= batch_len {
                    flush(&mut store, &mut eager, &mut batch, now_ms)?;
                }
                now_ms += 3;
            }
            flush(&mut store, &mut eager, &mut batch, now_ms)?;
            // Each copy's charge covered what folding it added.
            let charged = store.bytes();
            let mut folded = 0;
            for n in 0..3 {
                let want = eager.copies.get(&sid(n)).map(|c| (c.0, c.1, c.2.clone()));
                let got = store.folded(&sid(n)).map(|c| (c.version(), c.epoch(), c.record().to_vec()));
                prop_assert_eq!(&got, &want);
                folded += got.map_or(0, |c| c.2.len() as u64);
            }
            prop_assert_eq!(store.bytes(), folded);
            prop_assert!(folded <= charged, "folded {} over the charge {}", folded, charged);
        }
    }
}
