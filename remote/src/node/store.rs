//! The node's store: copies keyed by SID within [`NodeLimits`], as a pure
//! state machine (messages in, replies out, no I/O).

use hashbrown::HashMap;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use sessio_engine::session::{ATTRS_MAX, ArchivedOp};
use sessio_net::message::ArchivedDeltaBatch;
use sessio_net::{
    Ack, AckEntry, AckStatus, Counter, DeltaBatch, Fetch, FetchReply, FoundRecord, Invalidate,
    InvalidateEntry, Message, Pong, Received, Sid, Stats, StatsRequest,
};

use super::copy::{
    Copy, Folded, PendingLog, ValidOps, ValidRecord, aligned, attr_measure, fold_into,
    pending_charge, shape,
};
use super::entry::{AsEntry, BodyRef, EntryRef};
use super::{
    ALIGN, APPLY_QUOTA_BYTES, BYTES_MAX_DEFAULT, PENDING_BATCHES_MAX, PENDING_BYTES_MAX,
    SESSIONS_MAX_DEFAULT,
};

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
    /// Op batches written over their copy's record where it lies (each a
    /// `Set` of an attribute's value at the same length, or a `Touch`):
    /// nothing pending, nothing to fold.
    pub patched: u64,
    /// Records rewritten with their pending op batches folded in.
    pub folds: u64,
    /// Of those, folds of copies gone idle ([`Store::fold_idle`]).
    pub idle_folds: u64,
    /// Copies dropped as expired ([`Store::expire`]).
    pub expired: u64,
    /// Takeovers: a host wrote a session another host wrote before, under
    /// a newer epoch; the old host is told at its next ping.
    pub takeovers: u64,
    /// Takeover notices dropped for want of room.
    pub stale_dropped: u64,
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

/// Default for [`NodeConfig::expire_interval_ms`](super::NodeConfig::expire_interval_ms).
pub const EXPIRE_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Default for [`ExpiryRule::grace_ms`].
pub const EXPIRY_GRACE_MS_DEFAULT: u64 = 60_000;

/// A copy not written for this long has its pending batches folded into
/// its record ([`Store::fold_idle`]), in ms.
pub const FOLD_IDLE_MS: u64 = 1_000;

/// The node's state: copies keyed by SID, within [`NodeLimits`].
#[derive(Debug)]
pub struct Store {
    /// Boxed: the table runs half empty after it doubles, and an empty
    /// slot then costs a pointer rather than a whole copy's bookkeeping.
    copies: HashMap<Sid, Box<Copy>>,
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
    /// (entries of copies since gone are skipped when they come up, or
    /// dropped by [`Store::compact_deadlines`] before they outnumber the
    /// copies: sessions created and ended long before their expiry would
    /// otherwise pile up here until it).
    deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(u64, Sid)>>,
    /// Per host, the sessions it wrote that another host has taken over
    /// since, until its next ping collects them (at most [`STALE_MAX`] in
    /// all).
    stale: HashMap<u64, Vec<InvalidateEntry>>,
    stale_len: usize,
    /// Copies that took a pending batch, with the time of their first one,
    /// oldest first: where [`Store::fold_idle`] looks. An entry whose copy
    /// went, or folded meanwhile, is skipped when it comes up (or dropped
    /// by [`Store::compact_unfolded`] before they outnumber the copies).
    unfolded: std::collections::VecDeque<(u64, Sid)>,
    /// Counters since start.
    pub counters: NodeCounters,
}

/// Deadlines the heap may hold beyond twice the copies before it is
/// compacted (see [`Store::compact_deadlines`]).
pub const DEADLINES_SLACK: usize = 1024;

/// Takeover notices a store keeps for hosts that have not pinged yet; more
/// are dropped (counted): their hosts learn at their next write instead.
pub const STALE_MAX: usize = 65_536;
/// Takeover notices one pong carries (within the protocol's entry limit).
pub const STALE_PER_PONG: usize = 1024;

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
            stale: HashMap::new(),
            stale_len: 0,
            unfolded: std::collections::VecDeque::new(),
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
            let r = c.record.view(&mut self.scratch);
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

    /// Keeps one deadline per copy held with that absolute expiry: drops
    /// those of copies gone (and duplicates, from a copy removed and sent
    /// again). Called once the heap holds more than twice the copies plus
    /// [`DEADLINES_SLACK`], so its cost, linear in the heap, is paid for
    /// by the pushes since the last call, and the heap never holds more
    /// than that.
    fn compact_deadlines(&mut self) {
        let Store {
            deadlines,
            copies,
            scratch,
            ..
        } = self;
        let mut kept = std::mem::take(deadlines).into_vec();
        kept.sort_unstable();
        kept.dedup();
        kept.retain(|&std::cmp::Reverse((at, sid))| {
            copies
                .get(&sid)
                .is_some_and(|c| c.record.view(scratch).expires_at_ms.to_native() == at)
        });
        kept.shrink_to_fit();
        *deadlines = kept.into();
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
            let r = c.record.view(&mut self.scratch);
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

    /// Folds the pending batches of copies not written for `idle_ms` into
    /// their records, looking at up to `budget` of them; returns the copies
    /// folded. A busy session keeps its batches pending (folding each one
    /// as it comes would cost a record rewrite per delta); once it goes
    /// quiet it costs its record alone, not its record and its recent
    /// batches.
    pub fn fold_idle(&mut self, now_ms: u64, idle_ms: u64, budget: usize) -> u64 {
        let mut folded = 0;
        let mut looked = 0;
        while looked < budget
            && let Some(&(at, sid)) = self.unfolded.front()
            && now_ms >= at.saturating_add(idle_ms)
        {
            self.unfolded.pop_front();
            looked += 1;
            let Some(last) = self
                .copies
                .get(&sid)
                .and_then(|c| c.pending.iter().last().map(|(at, _)| at))
            else {
                continue; // gone, or folded already
            };
            if now_ms < last.saturating_add(idle_ms) {
                // Written since: it comes up again once that write is old.
                self.unfolded.push_back((last, sid));
                continue;
            }
            self.fold(&sid);
            self.counters.idle_folds += 1;
            folded += 1;
        }
        folded
    }

    /// Keeps one entry per copy that has pending batches: drops those of
    /// copies gone or folded, and repeats. Called once the queue holds
    /// more than twice the copies plus [`DEADLINES_SLACK`], so its cost is
    /// paid for by the pushes since the last call.
    fn compact_unfolded(&mut self) {
        let Store {
            unfolded, copies, ..
        } = self;
        let mut seen = hashbrown::HashSet::with_capacity(unfolded.len().min(copies.len()));
        unfolded.retain(|(_, sid)| {
            copies.get(sid).is_some_and(|c| !c.pending.is_empty()) && seen.insert(*sid)
        });
        unfolded.shrink_to_fit();
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
        self.copies.get(sid).map(|c| &**c)
    }

    /// The copy of `sid` with its pending batches folded in, so that its
    /// record is the session at its version.
    pub fn folded(&mut self, sid: &Sid) -> Option<&Copy> {
        self.fold(sid);
        self.copies.get(sid).map(|c| &**c)
    }

    /// Answers one message from host `from` (its handshake id); `None` for
    /// messages that get no answer. A ping's pong carries the takeover
    /// notices kept for `from`. A delta batch is read where it arrived,
    /// and answered with [`sessio_net::AllApplied`] when every entry was
    /// applied at the version it named (else its whole [`Ack`]).
    pub fn handle(&mut self, from: u64, msg: Received<'_>) -> Option<Message> {
        let msg = match msg {
            Received::DeltaBatch(b) => {
                let named = b.entries.iter().map(|e| e.new_version.to_native());
                return Some(self.apply_archived(b).into_reply(named));
            }
            Received::Message(m) => m,
        };
        match msg {
            Message::DeltaBatch(b) => {
                let named = b.entries.iter().map(|e| e.new_version);
                Some(self.apply_batch(&b).into_reply(named))
            }
            Message::Fetch(f) => Some(Message::FetchReply(self.fetch(f))),
            Message::Invalidate(inv) => {
                self.invalidate(&inv);
                None
            }
            Message::Ping(p) => Some(Message::Pong(Pong {
                nonce: p.nonce,
                stale: self.take_stale(from, STALE_PER_PONG),
            })),
            Message::StatsRequest(r) => Some(Message::Stats(self.stats(r))),
            // Replies sent to a server are a confused peer; ignore them.
            _ => None,
        }
    }

    /// Applies a batch in order, op deltas at this node's clock; one ack
    /// entry per delta entry.
    pub fn apply_batch(&mut self, batch: &DeltaBatch) -> Ack {
        self.apply_batch_at(batch, sessio_engine::clock::now_ms())
    }

    /// [`Store::apply_batch`] of a batch read where it arrived: its bodies
    /// are copied only into what the store keeps.
    pub fn apply_archived(&mut self, batch: &ArchivedDeltaBatch) -> Ack {
        self.apply_archived_at(batch, sessio_engine::clock::now_ms())
    }

    /// [`Store::apply_archived`] with op deltas applied at `now_ms`.
    pub fn apply_archived_at(&mut self, batch: &ArchivedDeltaBatch, now_ms: u64) -> Ack {
        self.apply_entries(batch.host_id.to_native(), &batch.entries, now_ms)
    }

    /// [`Store::apply_batch`] with op deltas applied at `now_ms` (the time
    /// a record's `updated_ms` takes).
    ///
    /// An op delta on the right base is validated, then, if it cannot
    /// fail to apply and nothing is pending, written over the record where
    /// it lies when it only writes values of the length they have (see
    /// `ValidRecord::patch`: `Set` of an attribute the copy holds, `Touch`).
    /// Else it is appended to the copy's pending batches if it cannot fail
    /// to apply: only `Set`,
    /// `Remove`, `Touch` and `Invalidate` with valid keys, and the copy's
    /// attribute count and bytes, bounded from above, stay within the
    /// limits an apply checks. A batch that invalidates drops the copy at
    /// once. Any other batch (`Append`, `Incr`, a bound that could be
    /// passed, a copy at [`PENDING_BATCHES_MAX`] or [`PENDING_BYTES_MAX`],
    /// a store near `bytes_max`) folds the pending batches and is applied
    /// at once, with the outcome an eager apply gives.
    pub fn apply_batch_at(&mut self, batch: &DeltaBatch, now_ms: u64) -> Ack {
        self.apply_entries(batch.host_id, &batch.entries, now_ms)
    }

    /// Applies `entries` from host `host` in order ([`Store::apply_batch_at`]).
    pub(crate) fn apply_entries<T: AsEntry>(
        &mut self,
        host: u64,
        entries: &[T],
        now_ms: u64,
    ) -> Ack {
        // In a large store the copies are cold, and one entry's work is
        // too long for the processor to have two entries' misses in flight
        // at once. Asking for the lines the batch's op deltas will touch
        // first (the copies' slots here, the ends of their pending logs)
        // lets those misses overlap. (Asking for all of a copy about to
        // fold as well measured no better: its reads are sequential.)
        for e in entries {
            let e = e.entry();
            if let BodyRef::Ops(ops) = e.body
                && let Some(c) = self.copies.get(&e.sid)
            {
                c.prefetch_update(ops.len());
            }
        }
        let entries = entries
            .iter()
            .map(|e| {
                let e = e.entry();
                let sid = e.sid;
                let (status, version) = self.apply_entry(e, host, now_ms);
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

    /// Records who wrote `sid` last; when another host took it over under
    /// a newer epoch, keeps a notice for the one before.
    fn note_writer(&mut self, sid: Sid, epoch: u64, host: u64, before: Option<(u64, u64)>) {
        if let Some(c) = self.copies.get_mut(&sid) {
            c.writer = host;
        }
        let Store {
            stale,
            stale_len,
            counters,
            ..
        } = self;
        Takeover {
            stale,
            stale_len,
            counters,
        }
        .note(sid, epoch, host, before);
    }

    /// Takes up to `max` takeover notices for `host`: sessions it wrote
    /// that another host now owns, with the epoch that host writes under.
    pub fn take_stale(&mut self, host: u64, max: usize) -> Vec<InvalidateEntry> {
        let Some(list) = self.stale.get_mut(&host) else {
            return Vec::new();
        };
        let n = list.len().min(max);
        let taken: Vec<InvalidateEntry> = list.drain(..n).collect();
        if list.is_empty() {
            self.stale.remove(&host);
        }
        self.stale_len -= taken.len();
        taken
    }

    /// The version held of `sid` (0: none).
    fn version_of(&self, sid: &Sid) -> u64 {
        self.copies.get(sid).map_or(0, |c| c.version)
    }

    /// One entry's answer from host `host`, and the version held after it;
    /// an applied entry makes `host` the copy's writer.
    fn apply_entry(&mut self, e: EntryRef<'_>, host: u64, now_ms: u64) -> (AckStatus, u64) {
        let (sid, epoch) = (e.sid, e.epoch);
        if let BodyRef::Ops(ops) = e.body {
            // The common case, with one lookup (the writer noted in it).
            if let Some(done) = self.append_ops(&e, ops, host, now_ms) {
                return done;
            }
            let before = self.copies.get(&sid).map(|c| (c.epoch, c.writer));
            let status = self.apply_now(sid, epoch, now_ms);
            if status == AckStatus::Applied {
                self.note_writer(sid, epoch, host, before);
            }
            return (status, self.version_of(&sid));
        }
        let held = self
            .copies
            .get(&sid)
            .map(|c| (c.version, c.epoch, c.writer));
        let (status, version) = self.apply_whole(e, held.map(|(v, ep, _)| (v, ep)));
        if status == AckStatus::Applied {
            self.note_writer(sid, epoch, host, held.map(|(_, ep, w)| (ep, w)));
        }
        (status, version)
    }

    /// A removal's or a full record's answer (`held`: the version and
    /// epoch of the copy held), and the version held after it.
    fn apply_whole(&mut self, e: EntryRef<'_>, held: Option<(u64, u64)>) -> (AckStatus, u64) {
        if let Some((version, epoch)) = held
            && e.epoch < epoch
        {
            return (AckStatus::Fenced, version);
        }
        match e.body {
            BodyRef::Remove => {
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
            BodyRef::Full(record) => {
                if let Some((version, epoch)) = held
                    && e.epoch == epoch
                    && e.new_version <= version
                {
                    // A replay or a reordered older copy: ours is as new.
                    return (AckStatus::Applied, version);
                }
                let Some(record) = ValidRecord::validate(record.to_vec(), &mut self.scratch) else {
                    return (AckStatus::Refused, self.version_of(&e.sid));
                };
                let archived = record.view(&mut self.scratch);
                let attrs = attr_measure(archived);
                let expires = archived.expires_at_ms.to_native();
                let copy = Copy::new(e.new_version, e.epoch, record, attrs);
                let status = self.put(e.sid, copy);
                // A session's absolute expiry never changes: one deadline
                // per copy the store did not hold before is enough.
                if status == AckStatus::Applied && held.is_none() && expires != 0 {
                    self.deadlines.push(std::cmp::Reverse((expires, e.sid)));
                    if self.deadlines.len() > 2 * self.copies.len() + DEADLINES_SLACK {
                        self.compact_deadlines();
                    }
                }
                (status, self.version_of(&e.sid))
            }
            BodyRef::Ops(_) => unreachable!("handled above"),
        }
    }

    /// An op delta `e` (body `ops`), checked against the copy it names
    /// (fencing, base version) and, on the right base, validated and
    /// appended, or the copy dropped if it invalidates it. `None` when the
    /// batch must be applied at once: it is left in `scratch`, validated.
    fn append_ops(
        &mut self,
        e: &EntryRef<'_>,
        ops: &[u8],
        host: u64,
        now_ms: u64,
    ) -> Option<(AckStatus, u64)> {
        if self.unfolded.len() > 2 * self.copies.len() + DEADLINES_SLACK {
            self.compact_unfolded();
        }
        let Store {
            copies,
            bytes,
            limits,
            scratch,
            unfolded,
            counters,
            stale,
            stale_len,
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
        let before = Some((copy.epoch, copy.writer));
        // Validated where it arrived, still in cache (or in `scratch` if it
        // is not aligned), then copied to the pending log. That log is
        // cold, and nothing reads it back before a fold, so the copy's
        // stores do not hold up what follows.
        let in_place = ops.as_ptr().align_offset(ALIGN) == 0;
        let checked = aligned(ops, scratch);
        let Some((valid, batch)) = ValidOps::validate(checked) else {
            return Some((AckStatus::Refused, copy.version));
        };
        let shape = shape(batch);
        let cannot_fail = shape.safe
            && copy.attrs_bound + shape.sets <= ATTRS_MAX as u64
            && copy.attr_bytes_bound + shape.set_bytes <= APPLY_QUOTA_BYTES;
        if cannot_fail && shape.invalidates {
            self.remove(&sid);
            self.note_writer(sid, epoch, host, before);
            return Some((AckStatus::Applied, 0));
        }
        let takeover = Takeover {
            stale,
            stale_len,
            counters,
        };
        if cannot_fail && copy.pending.is_empty() && copy.record.patch(batch, now_ms) {
            copy.version += 1;
            copy.epoch = epoch;
            copy.writer = host;
            takeover.counters.patched += 1;
            takeover.note(sid, epoch, host, before);
            return Some((AckStatus::Applied, copy.version));
        }
        let charge = pending_charge(ops.len());
        if cannot_fail
            && copy.pending.len() < PENDING_BATCHES_MAX
            && copy.bytes - copy.record.len() as u64 + charge <= PENDING_BYTES_MAX
            && *bytes + charge <= limits.bytes_max
        {
            copy.pending.push(now_ms, valid);
            if copy.pending.len() == 1 {
                unfolded.push_back((now_ms, sid));
            }
            copy.version += 1;
            copy.epoch = epoch;
            copy.bytes += charge;
            copy.attrs_bound += shape.sets;
            copy.attr_bytes_bound += shape.set_bytes;
            copy.writer = host;
            *bytes += charge;
            takeover.note(sid, epoch, host, before);
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
        // Validated by `append_ops` already; checked again here, on the
        // slow path that rewrites the whole record anyway, so no unchecked
        // read depends on the caller.
        let Some((_, batch)) = ValidOps::validate(ops) else {
            return AckStatus::Refused;
        };
        let (attrs, attr_bytes) = match self.fold_copy(&sid, Some((batch, now_ms))) {
            Some(Folded::Written { attrs, attr_bytes }) => (attrs, attr_bytes),
            Some(Folded::Invalidated) => {
                self.remove(&sid);
                return AckStatus::Applied;
            }
            // The host applied this batch; we could not: resync. Or what
            // was pending is gone (see `fold_copy`), and with it this
            // batch's base.
            Some(Folded::Refused | Folded::Broken) | None => return AckStatus::NeedFull,
        };
        let copy = self.copies.get_mut(&sid).expect("folded above");
        // Only reached past `append_ops`' check, so this does not wrap.
        let version = copy.version.saturating_add(1);
        let new_len = self.ser.len() as u64;
        if self.bytes - copy.bytes + new_len > self.limits.bytes_max {
            return AckStatus::Refused;
        }
        copy.version = version;
        copy.epoch = epoch;
        self.commit_serialized(&sid, attrs, attr_bytes);
        AckStatus::Applied
    }

    /// Folds the pending batches of `sid` into its record.
    fn fold(&mut self, sid: &Sid) {
        if self.copies.get(sid).is_none_or(|c| c.pending.is_empty()) {
            return;
        }
        if let Some(Folded::Written { attrs, attr_bytes }) = self.fold_copy(sid, None) {
            self.commit_serialized(sid, attrs, attr_bytes);
        }
    }

    /// [`fold_into`] for the copy of `sid` (`None` if there is none), into
    /// `ser`. Should a pending batch fail (it cannot: they were checked on
    /// append and the record on receipt), the copy drops back to its
    /// record, its version with it, so the host's next delta meets a base
    /// mismatch and gets `NeedFull`.
    fn fold_copy(
        &mut self,
        sid: &Sid,
        extra: Option<(&ArchivedVec<ArchivedOp>, u64)>,
    ) -> Option<Folded> {
        let Store {
            copies,
            scratch,
            ser,
            ..
        } = self;
        let folded = fold_into(copies.get(sid)?, extra, scratch, ser);
        if folded == Folded::Broken {
            let copy = self.copies.get_mut(sid)?;
            let charged = copy.bytes - copy.record.len() as u64;
            self.bytes -= charged;
            copy.bytes -= charged;
            copy.version = copy.base_version();
            copy.pending = PendingLog::default();
            copy.attrs_bound = ATTRS_MAX as u64 + 1;
            copy.attr_bytes_bound = APPLY_QUOTA_BYTES + 1;
        }
        Some(folded)
    }

    /// Makes the record in `ser` (holding `attrs` attributes of
    /// `attr_bytes`) the copy of `sid`'s, with nothing pending.
    fn commit_serialized(&mut self, sid: &Sid, attrs: u64, attr_bytes: u64) {
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
        copy.record.set_serialized(&self.ser);
        copy.pending = PendingLog::default();
        copy.bytes = new_len;
        copy.attrs_bound = attrs;
        copy.attr_bytes_bound = attr_bytes;
        self.counters.folds += 1;
    }

    fn remove(&mut self, sid: &Sid) -> Option<Copy> {
        let c = self.copies.remove(sid)?;
        self.bytes -= c.bytes;
        Some(*c)
    }

    fn put(&mut self, sid: Sid, copy: Copy) -> AckStatus {
        let old_bytes = self.copies.get(&sid).map(|c| c.bytes);
        let count = self.copies.len() as u64 + u64::from(old_bytes.is_none());
        let bytes = self.bytes - old_bytes.unwrap_or(0) + copy.bytes;
        if count > self.limits.sessions_max || bytes > self.limits.bytes_max {
            return AckStatus::Refused;
        }
        self.bytes = bytes;
        self.copies.insert(sid, Box::new(copy));
        AckStatus::Applied
    }

    /// Answers a failover fetch, folding the copy's pending batches first.
    pub fn fetch(&mut self, f: Fetch) -> FetchReply {
        self.counters.fetches += 1;
        let found = self.folded(&f.sid).map(|c| FoundRecord {
            version: c.version,
            epoch: c.epoch,
            record: c.record.bytes().to_vec(),
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
        // Each counter under its field's name.
        macro_rules! named {
            ($($f:ident),*) => { [$((stringify!($f), c.$f)),*] };
        }
        let counted = named!(
            applied,
            need_full,
            fenced,
            refused,
            fetches,
            fetch_hits,
            invalidated,
            patched,
            folds,
            idle_folds,
            expired,
            takeovers,
            stale_dropped
        );
        let counters = [
            ("sessions", self.copies.len() as u64),
            ("bytes", self.bytes),
        ]
        .into_iter()
        .chain(counted)
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

/// Where a takeover notice goes: the store's notices and counters, apart
/// from its copies (so a write can note one while it holds its copy).
struct Takeover<'a> {
    stale: &'a mut HashMap<u64, Vec<InvalidateEntry>>,
    stale_len: &'a mut usize,
    counters: &'a mut NodeCounters,
}

impl Takeover<'_> {
    /// After host `host` wrote `sid` under `epoch`: when the copy was
    /// written before (`before`: its epoch and writer then) by another
    /// host under an older epoch, keeps a notice for that host.
    fn note(self, sid: Sid, epoch: u64, host: u64, before: Option<(u64, u64)>) {
        let Some((old_epoch, old_writer)) = before else {
            return;
        };
        if epoch <= old_epoch || old_writer == 0 || old_writer == host {
            return;
        }
        self.counters.takeovers += 1;
        if *self.stale_len >= STALE_MAX {
            self.counters.stale_dropped += 1;
            return;
        }
        *self.stale_len += 1;
        self.stale
            .entry(old_writer)
            .or_default()
            .push(InvalidateEntry { sid, epoch });
    }
}

#[cfg(test)]
mod tests;
