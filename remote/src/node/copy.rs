//! One copy of a session on a node: the record validated when it arrived,
//! plus the op batches acknowledged since, back to back in one buffer and
//! folded into the record on demand.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use sessio_engine::session::{
    Applied, ArchivedOp, ArchivedSessionData, KEY_BYTES_MAX, OpRef, SessionDraft, key_hash,
};

use super::{ALIGN, APPLY_QUOTA_BYTES, PENDING_OVERHEAD_BYTES};

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
pub(super) struct PendingLog {
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
pub(super) fn prefetch_range(base: *const u8, from: usize, to: usize) {
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
pub(super) const PENDING_HEADER_BYTES: usize = 16;

impl PendingLog {
    pub(super) fn len(&self) -> usize {
        self.count as usize
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends `ops`, applied at `at_ms`.
    pub(super) fn push(&mut self, at_ms: u64, ops: ValidOps<'_>) {
        let ops = ops.bytes();
        let len = u32::try_from(ops.len()).expect("a batch is under the frame limit");
        let need = (PENDING_HEADER_BYTES + ops.len()).next_multiple_of(ALIGN);
        if self.buf.capacity() - self.buf.len() < need {
            // Grown by half at least, but exactly (`AlignedVec::reserve`
            // rounds up to a power of two): a copy updated a few times
            // holds what its batches take and little more.
            self.buf.reserve_exact(need.max(self.buf.len() / 2));
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
    pub(super) fn prefetch_push(&self, len: usize) {
        let end = (self.buf.len() + PENDING_HEADER_BYTES + len).min(self.buf.capacity());
        prefetch_range(self.buf.as_ptr(), self.buf.len(), end);
    }

    /// Each batch with its time, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, ValidOps<'_>)> {
        let buf = &self.buf[..];
        let mut at = 0;
        std::iter::from_fn(move || {
            let head = buf.get(at..at + PENDING_HEADER_BYTES)?;
            let at_ms = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
            let start = at + PENDING_HEADER_BYTES;
            at = (start + len).next_multiple_of(ALIGN);
            // Only validated batches are pushed, each at an `ALIGN` boundary.
            Some((at_ms, ValidOps(&buf[start..start + len])))
        })
    }
}

/// One session's copy: a record at [`Copy::base_version`], validated when
/// it arrived or written by this node, plus the op batches acknowledged
/// since, up to [`Copy::version`]. [`Store::folded`] folds them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub(super) version: u64,
    pub(super) epoch: u64,
    pub(super) record: ValidRecord,
    pub(super) pending: PendingLog,
    /// Charged against `bytes_max`: the record plus [`pending_charge`] of
    /// each pending batch.
    pub(super) bytes: u64,
    /// At least the attributes the session holds after the pending batches.
    pub(super) attrs_bound: u64,
    /// At least its attribute bytes (the quota's measure) after them.
    pub(super) attr_bytes_bound: u64,
    /// The host that last wrote it (0: not known), told when another host
    /// takes the session over ([`Store::take_stale`](super::Store::take_stale)).
    pub(super) writer: u64,
}

// A node holds one per session (boxed, so the store's half-empty table
// costs a pointer per slot, not this): each byte here is one per session.
const _: () = assert!(std::mem::size_of::<Copy>() <= 96);

impl Copy {
    /// A copy of `record` (validated) at `version`; `attrs` is what
    /// [`attr_measure`] says of it.
    pub(super) fn new(version: u64, epoch: u64, record: ValidRecord, attrs: (u64, u64)) -> Copy {
        Copy {
            version,
            epoch,
            bytes: record.len() as u64,
            record,
            pending: PendingLog::default(),
            attrs_bound: attrs.0,
            attr_bytes_bound: attrs.1,
            writer: 0,
        }
    }

    /// Asks for the cache lines an op delta of `ops_len` bytes on this
    /// copy reads first: the end of its pending log, or, with nothing
    /// pending, the record's root and attribute array, which rkyv puts at
    /// its end. (Asking for the value last written in place as well, where
    /// the next write most likely goes, measured slower: a write does not
    /// wait for its line.)
    pub(super) fn prefetch_update(&self, ops_len: usize) {
        if self.pending.is_empty() {
            let len = self.record.len();
            prefetch_range(self.record.0.as_ptr(), len.saturating_sub(TAIL_BYTES), len);
        } else {
            self.pending.prefetch_push(ops_len);
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
        self.record.bytes()
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
pub(super) fn attr_measure(archived: &ArchivedSessionData) -> (u64, u64) {
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

/// `bytes` if they lie at [`ALIGN`], else a copy of them in `scratch`.
pub(super) fn aligned<'a>(bytes: &'a [u8], scratch: &'a mut AlignedVec<ALIGN>) -> &'a [u8] {
    if bytes.as_ptr().align_offset(ALIGN) == 0 {
        bytes
    } else {
        scratch.clear();
        scratch.extend_from_slice(bytes);
        scratch
    }
}

/// A record's bytes that passed `rkyv::access` when they arrived, or that
/// this node serialized itself. Only [`ValidRecord::validate`] and
/// [`ValidRecord::set_serialized`] build one, its parts share no byte
/// ([`apart`]; what rkyv serializes never does), and its structure never
/// changes after: [`ValidRecord::patch`] writes only over a value's bytes
/// and a timestamp, which no check of rkyv's looks at. So
/// [`ValidRecord::view`] reads them without checking again: the one
/// unchecked read of a record on a node.
///
/// A boxed slice, not a `Vec`: a copy holds one per session, and a record
/// is replaced whole, never grown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRecord(Box<[u8]>);

impl ValidRecord {
    /// `bytes` if they are an archived `SessionData` the engine could have
    /// written ([`sound`]).
    pub(super) fn validate(bytes: Vec<u8>, scratch: &mut AlignedVec<ALIGN>) -> Option<ValidRecord> {
        let at = aligned(&bytes, scratch);
        let data = rkyv::access::<ArchivedSessionData, rancor::Error>(at).ok()?;
        if !sound(data, at.as_ptr()) {
            return None;
        }
        Some(ValidRecord(bytes.into_boxed_slice()))
    }

    /// Becomes a record this node serialized (`serialize`).
    pub(super) fn set_serialized(&mut self, ser: &AlignedVec<ALIGN>) {
        self.0 = Box::from(&ser[..]);
    }

    /// The archived session, at `ALIGN` (in `scratch` if the bytes are not).
    pub(super) fn view<'a>(
        &'a self,
        scratch: &'a mut AlignedVec<ALIGN>,
    ) -> &'a ArchivedSessionData {
        let bytes = aligned(&self.0, scratch);
        // SAFETY: a `ValidRecord` is built only from bytes that passed
        // `rkyv::access` or that rkyv serialized, and is never changed;
        // `aligned` put them at `ALIGN`.
        unsafe { rkyv::access_unchecked::<ArchivedSessionData>(bytes) }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Applies `batch` at `now_ms` by writing over the record where it
    /// lies, when that gives what a fold would: every op a `Touch`, or a
    /// `Set` of an attribute the record holds whose value has the new
    /// value's length. Then the record keeps its layout and size, and only
    /// those values and `updated_ms` change. Returns whether it did; if
    /// not, nothing was written.
    ///
    /// The caller checks the batch's keys and the copy's bounds ([`shape`])
    /// and that no batch is pending (each must apply first). A value
    /// written over shares no byte with anything else of the record
    /// ([`apart`], checked when it arrived), so nothing rkyv reads as
    /// structure changes.
    pub(super) fn patch(&mut self, batch: &ArchivedVec<ArchivedOp>, now_ms: u64) -> bool {
        if batch.len() > PATCH_OPS_MAX || self.0.as_ptr().align_offset(ALIGN) != 0 {
            return false;
        }
        let mut at = [0usize; PATCH_OPS_MAX];
        let mut sets = 0;
        let updated_at;
        {
            // SAFETY: see `view`; the bytes are at `ALIGN` (checked above).
            let data = unsafe { rkyv::access_unchecked::<ArchivedSessionData>(&self.0) };
            let base = self.0.as_ptr() as usize;
            // The engine's own lookup (stored hashes, then one string
            // compare): in a record whose keys are sorted and hashed
            // ([`sound`]) it finds what a fold's binary search finds.
            for op in batch.iter() {
                match op.as_ref() {
                    OpRef::Touch => {}
                    OpRef::Set { key, value } => {
                        let Some(old) = data.get(key) else {
                            return false;
                        };
                        if old.len() != value.len() {
                            return false;
                        }
                        at[sets] = old.as_ptr() as usize - base;
                        sets += 1;
                    }
                    _ => return false,
                }
            }
            updated_at = std::ptr::from_ref(&data.updated_ms) as usize - base;
        }
        let mut next = at[..sets].iter();
        for op in batch.iter() {
            if let OpRef::Set { value, .. } = op.as_ref() {
                let from = *next.next().expect("one offset per Set");
                self.0[from..from + value.len()].copy_from_slice(value);
            }
        }
        // Archived integers are little-endian (rkyv's default format).
        self.0[updated_at..updated_at + 8].copy_from_slice(&now_ms.to_le_bytes());
        true
    }
}

/// Whether `data` (archived at `base`) is a record the engine could have
/// written, beyond what rkyv checks: its keys sorted and unique, each with
/// its [`key_hash`] beside it (the engine's lookups rely on both), and its
/// parts sharing no byte ([`apart`]). A node checks this once per record,
/// when it arrives, because it then writes values in place
/// ([`ValidRecord::patch`], which finds them as the engine's reads do) and
/// reads the record unchecked.
fn sound(data: &ArchivedSessionData, base: *const u8) -> bool {
    let attrs = data.attrs.as_slice();
    attrs
        .iter()
        .all(|a| a.hash.to_native() == key_hash(a.key.as_str()))
        && attrs
            .windows(2)
            .all(|w| w[0].key.as_str() < w[1].key.as_str())
        && apart(data, base)
}

/// Whether the parts of `data` (archived at `base`) share no byte: its
/// root, its attribute array, and each key stored outside that array and
/// each value. rkyv's checks refuse overlapping parts already; the node
/// does not rely on them: a value written in place that overlapped a key
/// or a pointer would change them.
fn apart(data: &ArchivedSessionData, base: *const u8) -> bool {
    let base = base as usize;
    let span = |p: *const u8, len: usize| (p as usize - base, p as usize - base + len);
    let attrs = data.attrs.as_slice();
    let array = span(attrs.as_ptr().cast(), std::mem::size_of_val(attrs));
    let mut spans = Vec::with_capacity(2 * attrs.len() + 2);
    spans.push(span(
        std::ptr::from_ref(data).cast(),
        std::mem::size_of::<ArchivedSessionData>(),
    ));
    spans.push(array);
    for a in attrs {
        let (key, value) = (a.key.as_str(), a.value.as_slice());
        let key = span(key.as_ptr(), key.len());
        // A short key lies inside its attribute, in the array.
        if key.0 < key.1 && !(array.0 <= key.0 && key.1 <= array.1) {
            spans.push(key);
        }
        if !value.is_empty() {
            spans.push(span(value.as_ptr(), value.len()));
        }
    }
    spans.sort_unstable();
    spans.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// Bytes at the end of a record asked for before it is patched: the root
/// and an attribute array of up to 8 attributes, and the line before.
const TAIL_BYTES: usize = 256;

/// Most ops a batch written over a record in place ([`ValidRecord::patch`])
/// holds; a longer one is folded as before.
const PATCH_OPS_MAX: usize = 8;

/// An op batch that passed `rkyv::access`, at `ALIGN`: built by
/// [`ValidOps::validate`], or by [`PendingLog::iter`] over batches that were
/// validated when pushed.
#[derive(Debug, Clone, Copy)]
pub(super) struct ValidOps<'a>(&'a [u8]);

impl<'a> ValidOps<'a> {
    /// `bytes` if they are an archived op batch at `ALIGN`. Misaligned
    /// bytes are refused like any other invalid input (an empty body from
    /// the network may sit at any address).
    pub(super) fn validate(bytes: &'a [u8]) -> Option<(ValidOps<'a>, &'a ArchivedVec<ArchivedOp>)> {
        if bytes.as_ptr().align_offset(ALIGN) != 0 {
            return None;
        }
        let batch = rkyv::access::<ArchivedVec<ArchivedOp>, rancor::Error>(bytes).ok()?;
        Some((ValidOps(bytes), batch))
    }

    /// The archived batch.
    pub(super) fn archived(self) -> &'a ArchivedVec<ArchivedOp> {
        debug_assert_eq!(self.0.as_ptr().align_offset(ALIGN), 0);
        // SAFETY: the bytes passed `rkyv::access` (`validate`), at an
        // `ALIGN` boundary; a pending log copies them byte for byte to
        // another `ALIGN` boundary, and an archive's pointers are relative,
        // so they are as valid there.
        unsafe { rkyv::access_unchecked::<ArchivedVec<ArchivedOp>>(self.0) }
    }

    pub(super) fn bytes(self) -> &'a [u8] {
        self.0
    }
}

/// What applying one op batch needs, read off the batch alone.
pub(super) struct Shape {
    /// Only ops that cannot fail on any session, given the bounds below:
    /// `Set` and `Remove` of valid keys, `Touch`, `Invalidate`.
    pub(super) safe: bool,
    /// It invalidates the session.
    pub(super) invalidates: bool,
    /// `Set`s: each can add one attribute.
    pub(super) sets: u64,
    /// What the `Set`s can add to the attribute bytes at most.
    pub(super) set_bytes: u64,
}

pub(super) fn shape(batch: &ArchivedVec<ArchivedOp>) -> Shape {
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

/// What [`fold_into`] made of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Folded {
    /// The session, serialized into `ser`: its attribute count and bytes.
    Written { attrs: u64, attr_bytes: u64 },
    /// The extra batch ended the session.
    Invalidated,
    /// The extra batch failed: nothing was written.
    Refused,
    /// A pending batch failed. It cannot (they were checked on append, the
    /// record on receipt); the caller drops the copy back to its record.
    Broken,
}

/// The session `copy` holds at its version, then with `extra` (a batch and
/// its time) applied on top, serialized into `ser`: its record with every
/// pending batch applied, as the host applied them.
///
/// The record is not deserialized: a [`SessionDraft`] borrows its keys and
/// values and those of the batches, so a fold allocates nothing per
/// attribute. Pending batches hold only `Set`, `Remove` and `Touch` (see
/// [`shape`]), which cannot fail within the copy's bounds; each is applied
/// at its own time, so `updated_ms` ends at the last one's.
pub(super) fn fold_into(
    copy: &Copy,
    extra: Option<(&ArchivedVec<ArchivedOp>, u64)>,
    scratch: &mut AlignedVec<ALIGN>,
    ser: &mut AlignedVec<ALIGN>,
) -> Folded {
    let mut draft = SessionDraft::new(copy.record.view(scratch));
    for (at_ms, ops) in copy.pending.iter() {
        let applied = draft.apply_refs(
            ops.archived().iter().map(ArchivedOp::as_ref),
            at_ms,
            APPLY_QUOTA_BYTES,
        );
        if applied != Ok(Applied::Changed) {
            // The bounds checked on append rule out every error.
            debug_assert!(false, "a pending batch did not apply: {applied:?}");
            return Folded::Broken;
        }
    }
    if let Some((batch, now_ms)) = extra {
        match draft.apply_refs(
            batch.iter().map(ArchivedOp::as_ref),
            now_ms,
            APPLY_QUOTA_BYTES,
        ) {
            Ok(Applied::Changed) => {}
            Ok(Applied::Invalidated) => return Folded::Invalidated,
            Err(_) => return Folded::Refused,
        }
    }
    serialize(&draft, ser);
    Folded::Written {
        attrs: draft.attr_count() as u64,
        attr_bytes: draft.attr_bytes(),
    }
}

/// Serializes `data` (a session, or a draft of one) into `ser` (reused: no
/// allocation once it has grown).
pub(super) fn serialize(
    data: &impl for<'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec<ALIGN>,
            rkyv::ser::allocator::ArenaHandle<'b>,
            rancor::Error,
        >,
    >,
    ser: &mut AlignedVec<ALIGN>,
) {
    let mut buf = std::mem::take(ser);
    buf.clear();
    *ser = rkyv::api::high::to_bytes_in::<_, rancor::Error>(data, buf)
        .expect("serializing a session into memory");
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessio_engine::Op;
    use sessio_engine::session::{SessionData, decode_session, encode_ops, encode_session};

    fn record(attrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut d = SessionData::default();
        d.apply(&Op::sets(attrs), 1, 1 << 20).unwrap();
        encode_session(&d).to_vec()
    }

    fn patch(r: &mut ValidRecord, key: &str, value: &[u8]) -> bool {
        let ops = encode_ops(&[Op::Set {
            key: key.into(),
            value: value.to_vec(),
        }]);
        let (_, batch) = ValidOps::validate(&ops).unwrap();
        r.patch(batch, 9)
    }

    #[test]
    fn a_record_the_engine_would_misread_is_refused() {
        use sessio_engine::session::Attr;
        let attr = |key: &str, hash: u32| Attr {
            hash,
            key: key.into(),
            value: b"v".to_vec(),
        };
        let valid = |attrs: Vec<Attr>| {
            let d = SessionData {
                attrs,
                ..SessionData::default()
            };
            ValidRecord::validate(encode_session(&d).to_vec(), &mut AlignedVec::new()).is_some()
        };
        let (a, b) = (key_hash("a"), key_hash("b"));
        assert!(valid(vec![attr("a", a), attr("b", b)]));
        assert!(valid(Vec::new()));
        assert!(!valid(vec![attr("b", b), attr("a", a)]), "unsorted");
        assert!(!valid(vec![attr("a", a), attr("a", a)]), "a key twice");
        assert!(!valid(vec![attr("a", a), attr("b", a)]), "a wrong hash");
    }

    #[test]
    fn values_that_overlap_are_refused_and_others_written_over() {
        // Two attributes whose values are the same bytes: the second
        // value's relative pointer aimed at the first value. Writing one
        // in place would change the other.
        let base = record(&[("a", b"aaaa"), ("b", b"bbbb")]);
        let mut bytes = AlignedVec::<ALIGN>::new();
        bytes.extend_from_slice(&base);
        let (field, target) = {
            let data = rkyv::access::<ArchivedSessionData, rancor::Error>(&bytes).unwrap();
            let at = |p: *const u8| p as usize - bytes.as_ptr() as usize;
            let attrs = data.attrs.as_slice();
            (
                at(std::ptr::from_ref(&attrs[1].value).cast()),
                at(attrs[0].value.as_slice().as_ptr()),
            )
        };
        let rel = i32::try_from(target as i64 - field as i64).unwrap();
        bytes[field..field + 4].copy_from_slice(&rel.to_le_bytes());
        // rkyv's checks refuse such a record; the node's own check, which
        // it does not rely on them for, does too.
        assert!(rkyv::access::<ArchivedSessionData, rancor::Error>(&bytes).is_err());
        // SAFETY: the bytes are a serialized record but for one relative
        // pointer, which still points at 4 bytes inside them.
        let data = unsafe { rkyv::access_unchecked::<ArchivedSessionData>(&bytes) };
        assert_eq!(data.get("b"), Some(&b"aaaa"[..]), "the values alias");
        assert!(!apart(data, bytes.as_ptr()));
        assert!(ValidRecord::validate(bytes.to_vec(), &mut AlignedVec::new()).is_none());

        // The record as serialized: each part on its own.
        let mut r = ValidRecord::validate(base.clone(), &mut AlignedVec::new()).unwrap();
        assert_eq!(
            r.0.as_ptr().align_offset(ALIGN),
            0,
            "else nothing is patched"
        );
        assert!(patch(&mut r, "b", b"zzzz"));
        let d = decode_session(r.bytes()).unwrap();
        assert_eq!(
            (d.get("a"), d.get("b")),
            (Some(&b"aaaa"[..]), Some(&b"zzzz"[..]))
        );
        assert_eq!(d.updated_ms, 9);
        // A key that is not there, a value of another length.
        assert!(!patch(&mut r, "c", b"zzzz"));
        assert!(!patch(&mut r, "a", b"zzz"));
    }
}
