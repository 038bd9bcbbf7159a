//! The session model: what a record holds, the ops that change it, and the
//! pure function that applies a batch of ops. Everything here is plain Rust
//! and rkyv; the arena stores the archives.

use crate::words::ResultCode;

mod draft;
pub use draft::SessionDraft;
use rkyv::{Archive, Deserialize, Serialize};

/// Longest attribute key, in bytes.
pub const KEY_BYTES_MAX: usize = 255;
/// Most attributes one session may hold.
pub const ATTRS_MAX: usize = 1024;
/// Most items a bounded append may keep.
pub const APPEND_ITEMS_MAX: u32 = 4096;

/// A session's contents, as archived in a record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionData {
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last update time, ms since the Unix epoch.
    pub updated_ms: u64,
    /// Idle time-to-live in ms; 0 = none.
    pub idle_ttl_ms: u64,
    /// Absolute expiry, ms since the Unix epoch; 0 = none.
    pub expires_at_ms: u64,
    /// Attributes sorted by key, keys unique. Declared last so the archived
    /// attribute array sits right before the archive's root, at the end of
    /// the record, where a reader's first fetch already brings it.
    pub attrs: Vec<Attr>,
}

/// One named attribute.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// [`key_hash`] of the name: a lookup compares these first.
    pub hash: u32,
    /// The name.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
}

pub use op::{ArchivedOp, Op};

/// `Op` lives in its own module so the rkyv-generated archived types can go
/// without docs of their own (the derive cannot copy field docs).
#[allow(missing_docs)]
mod op {
    use rkyv::{Archive, Deserialize, Serialize};

    /// One change to a session. A batch of ops is applied atomically: all or none.
    #[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
    pub enum Op {
        /// Sets an attribute.
        Set {
            /// Attribute name.
            key: String,
            /// New value.
            value: Vec<u8>,
        },
        /// Removes an attribute (no error if absent).
        Remove {
            /// Attribute name.
            key: String,
        },
        /// Appends an item to a bounded list attribute, dropping the oldest
        /// items beyond `max_items`. The value is a sequence of
        /// `u32 LE length, bytes` items (see [`append_items`](super::append_items)).
        Append {
            /// Attribute name.
            key: String,
            /// The new item.
            item: Vec<u8>,
            /// Most items kept (at most [`APPEND_ITEMS_MAX`](super::APPEND_ITEMS_MAX)).
            max_items: u32,
        },
        /// Adds to a counter attribute stored as `i64` little-endian (absent = 0).
        Incr {
            /// Attribute name.
            key: String,
            /// Amount to add (wrapping is refused).
            by: i64,
        },
        /// Marks the session used now, extending its idle expiry.
        Touch,
        /// Ends the session.
        Invalidate,
    }
}

/// A borrowed view of one [`Op`], from an owned op or straight from an
/// archived batch in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum OpRef<'a> {
    Set {
        key: &'a str,
        value: &'a [u8],
    },
    Remove {
        key: &'a str,
    },
    Append {
        key: &'a str,
        item: &'a [u8],
        max_items: u32,
    },
    Incr {
        key: &'a str,
        by: i64,
    },
    Touch,
    Invalidate,
}

impl Op {
    /// One [`Op::Set`] per `(name, value)` pair, in order: how a session's
    /// first attributes are written.
    pub fn sets(attrs: &[(&str, &[u8])]) -> Vec<Op> {
        attrs
            .iter()
            .map(|&(key, value)| Op::Set {
                key: key.to_string(),
                value: value.to_vec(),
            })
            .collect()
    }

    /// This op as an [`OpRef`].
    pub fn as_ref(&self) -> OpRef<'_> {
        match self {
            Op::Set { key, value } => OpRef::Set { key, value },
            Op::Remove { key } => OpRef::Remove { key },
            Op::Append {
                key,
                item,
                max_items,
            } => OpRef::Append {
                key,
                item,
                max_items: *max_items,
            },
            Op::Incr { key, by } => OpRef::Incr { key, by: *by },
            Op::Touch => OpRef::Touch,
            Op::Invalidate => OpRef::Invalidate,
        }
    }
}

impl ArchivedOp {
    /// This archived op as an [`OpRef`], without copying.
    pub fn as_ref(&self) -> OpRef<'_> {
        match self {
            ArchivedOp::Set { key, value } => OpRef::Set {
                key: key.as_str(),
                value: value.as_slice(),
            },
            ArchivedOp::Remove { key } => OpRef::Remove { key: key.as_str() },
            ArchivedOp::Append {
                key,
                item,
                max_items,
            } => OpRef::Append {
                key: key.as_str(),
                item: item.as_slice(),
                max_items: max_items.to_native(),
            },
            ArchivedOp::Incr { key, by } => OpRef::Incr {
                key: key.as_str(),
                by: by.to_native(),
            },
            ArchivedOp::Touch => OpRef::Touch,
            ArchivedOp::Invalidate => OpRef::Invalidate,
        }
    }
}

/// Why a batch was refused; the session is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// A key is empty or longer than [`KEY_BYTES_MAX`].
    #[error("attribute key is empty or longer than {KEY_BYTES_MAX} bytes")]
    BadKey,
    /// The session would hold more than [`ATTRS_MAX`] attributes.
    #[error("more than {ATTRS_MAX} attributes")]
    TooManyAttrs,
    /// `Incr` on a value that is not 8 bytes, or that would overflow.
    #[error("attribute is not a counter, or the counter would overflow")]
    NotACounter,
    /// `Append` on a value that is not an item list, or a bad `max_items`.
    #[error("attribute is not an append list, or max_items is 0 or over {APPEND_ITEMS_MAX}")]
    NotAList,
    /// The session would exceed its byte quota.
    #[error("session would hold {needed} bytes, over its quota of {quota}")]
    OverQuota {
        /// Bytes the record would need.
        needed: u64,
        /// The arena's per-session quota.
        quota: u64,
    },
}

impl OpError {
    /// The op node result code of this refusal; an over-quota refusal also
    /// stores the bytes needed in the node's `detail`.
    pub(crate) const fn result_code(&self) -> ResultCode {
        match self {
            OpError::BadKey => ResultCode::BadKey,
            OpError::TooManyAttrs => ResultCode::TooManyAttrs,
            OpError::NotACounter => ResultCode::NotACounter,
            OpError::NotAList => ResultCode::NotAList,
            OpError::OverQuota { .. } => ResultCode::OverQuota,
        }
    }

    /// The refusal a result code stands for (`None` for a code that is not
    /// a refusal); `detail` is the node's detail word, `quota` the arena's.
    pub(crate) const fn from_result(code: ResultCode, detail: u64, quota: u64) -> Option<OpError> {
        Some(match code {
            ResultCode::BadKey => OpError::BadKey,
            ResultCode::TooManyAttrs => OpError::TooManyAttrs,
            ResultCode::NotACounter => OpError::NotACounter,
            ResultCode::NotAList => OpError::NotAList,
            ResultCode::OverQuota => OpError::OverQuota {
                needed: detail,
                quota,
            },
            ResultCode::Done
            | ResultCode::Gone
            | ResultCode::CancelledHeapFull
            | ResultCode::Pending => return None,
        })
    }
}

/// What a successful batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The session changed (or was touched) and lives on.
    Changed,
    /// The batch invalidated the session.
    Invalidated,
}

fn check_key(key: &str) -> Result<(), OpError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        Err(OpError::BadKey)
    } else {
        Ok(())
    }
}

/// The hash of an attribute name stored beside it, so a lookup scans
/// 4-byte hashes instead of comparing strings.
/// FNV-1a: keys are short, so a byte loop beats a vectorized hash here.
#[inline]
pub fn key_hash(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Splits an append-list value into its items; `None` if it is not one.
pub fn append_items(value: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let item = rest.get(4..4 + len)?;
        items.push(item);
        rest = &rest[4 + len..];
    }
    Some(items)
}

/// Whether a session last used at `last_ms` has expired at `now_ms`.
pub(crate) fn expired_at(now_ms: u64, last_ms: u64, idle_ttl_ms: u64, expires_at_ms: u64) -> bool {
    (expires_at_ms != 0 && now_ms >= expires_at_ms)
        || (idle_ttl_ms != 0 && now_ms >= last_ms.saturating_add(idle_ttl_ms))
}

/// The attributes a batch of ops changes, kept sorted by key: the owned
/// ones of a [`SessionData`], or the combiner's draft, which borrows its
/// keys and values from the record it replaces and from the queued ops
/// (`session::draft`). One [`apply_ops`] serves both.
pub(crate) trait Attrs<'a> {
    /// A value as this side keeps it.
    type Value: AsRef<[u8]>;
    /// A value given by an op, which lives as long as `'a`.
    fn borrowed(v: &'a [u8]) -> Self::Value;
    /// A value computed by an op.
    fn owned(v: Vec<u8>) -> Self::Value;
    /// Where `key` is, or where it would go.
    fn find(&self, key: &str) -> Result<usize, usize>;
    fn value(&self, i: usize) -> &[u8];
    fn count(&self) -> usize;
    /// Replaces the value at `i`; returns the old one.
    fn replace(&mut self, i: usize, v: Self::Value) -> Self::Value;
    fn insert(&mut self, i: usize, key: &'a str, v: Self::Value);
    /// Removes the attribute at `i`; returns its value.
    fn remove(&mut self, i: usize) -> Self::Value;
    /// Bytes the attributes take, the measure the quota applies to.
    fn attr_bytes(&self) -> u64;
    /// Records that a batch changed the session at `now_ms`.
    fn set_updated_ms(&mut self, now_ms: u64);

    fn get(&self, key: &str) -> Option<&[u8]> {
        self.find(key).ok().map(|i| self.value(i))
    }
}

/// Bytes an attribute counts against the quota.
const fn attr_cost(key_len: usize, value_len: usize) -> u64 {
    (key_len + value_len + 16) as u64
}

/// What a batch changed, to put back if it fails: a key and the value it
/// had (`None`: it had none). Kept inline for the batches most updates are.
type Undo<'a, V> = smallvec::SmallVec<[(&'a str, Option<V>); 4]>;

/// Applies a batch to `attrs` at `now_ms` and commits it only if every op
/// succeeds: on an error the attributes are left exactly as they were (an
/// undo log, not a copy).
pub(crate) fn apply_ops<'a, A: Attrs<'a>>(
    attrs: &mut A,
    ops: impl IntoIterator<Item = OpRef<'a>>,
    now_ms: u64,
    quota: u64,
) -> Result<Applied, OpError> {
    let mut undo: Undo<'a, A::Value> = Undo::new();
    let mut outcome = Applied::Changed;
    let mut result = Ok(());
    for op in ops {
        let step = match op {
            OpRef::Set { key, value } => put(attrs, key, A::borrowed(value), &mut undo),
            OpRef::Remove { key } => check_key(key).map(|()| {
                if let Ok(i) = attrs.find(key) {
                    undo.push((key, Some(attrs.remove(i))));
                }
            }),
            OpRef::Append {
                key,
                item,
                max_items,
            } => {
                if max_items == 0 || max_items > APPEND_ITEMS_MAX {
                    Err(OpError::NotAList)
                } else {
                    let old = attrs.get(key).unwrap_or(&[]);
                    match append_items(old) {
                        None => Err(OpError::NotAList),
                        Some(items) => {
                            let keep = items.len().saturating_sub(max_items as usize - 1);
                            let mut value = Vec::with_capacity(old.len() + item.len() + 4);
                            for it in &items[keep..] {
                                value.extend_from_slice(&(it.len() as u32).to_le_bytes());
                                value.extend_from_slice(it);
                            }
                            value.extend_from_slice(&(item.len() as u32).to_le_bytes());
                            value.extend_from_slice(item);
                            put(attrs, key, A::owned(value), &mut undo)
                        }
                    }
                }
            }
            OpRef::Incr { key, by } => {
                let cur = match attrs.get(key) {
                    None => Ok(0),
                    Some(v) => <[u8; 8]>::try_from(v)
                        .map(i64::from_le_bytes)
                        .map_err(|_| OpError::NotACounter),
                };
                match cur.and_then(|c| c.checked_add(by).ok_or(OpError::NotACounter)) {
                    Ok(new) => put(attrs, key, A::owned(new.to_le_bytes().to_vec()), &mut undo),
                    Err(e) => Err(e),
                }
            }
            OpRef::Touch => Ok(()),
            OpRef::Invalidate => {
                outcome = Applied::Invalidated;
                Ok(())
            }
        };
        if let Err(e) = step {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        let needed = attrs.attr_bytes();
        if needed > quota {
            result = Err(OpError::OverQuota { needed, quota });
        }
    }
    if let Err(e) = result {
        for (key, old) in undo.into_iter().rev() {
            match (attrs.find(key), old) {
                (Ok(i), Some(v)) => {
                    attrs.replace(i, v);
                }
                (Ok(i), None) => {
                    attrs.remove(i);
                }
                (Err(i), Some(v)) => attrs.insert(i, key, v),
                (Err(_), None) => {}
            }
        }
        return Err(e);
    }
    attrs.set_updated_ms(now_ms);
    Ok(outcome)
}

/// Sets `key` to `value`, remembering what was there.
fn put<'a, A: Attrs<'a>>(
    attrs: &mut A,
    key: &'a str,
    value: A::Value,
    undo: &mut Undo<'a, A::Value>,
) -> Result<(), OpError> {
    check_key(key)?;
    match attrs.find(key) {
        Ok(i) => {
            let old = attrs.replace(i, value);
            undo.push((key, Some(old)));
        }
        Err(i) => {
            if attrs.count() >= ATTRS_MAX {
                return Err(OpError::TooManyAttrs);
            }
            attrs.insert(i, key, value);
            undo.push((key, None));
        }
    }
    Ok(())
}

impl<'a> Attrs<'a> for SessionData {
    type Value = Vec<u8>;

    fn borrowed(v: &'a [u8]) -> Vec<u8> {
        v.to_vec()
    }

    fn owned(v: Vec<u8>) -> Vec<u8> {
        v
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.attrs.binary_search_by(|a| a.key.as_str().cmp(key))
    }

    fn value(&self, i: usize) -> &[u8] {
        &self.attrs[i].value
    }

    fn count(&self) -> usize {
        self.attrs.len()
    }

    fn replace(&mut self, i: usize, v: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.attrs[i].value, v)
    }

    fn insert(&mut self, i: usize, key: &'a str, value: Vec<u8>) {
        self.attrs.insert(
            i,
            Attr {
                hash: key_hash(key),
                key: key.to_owned(),
                value,
            },
        );
    }

    fn remove(&mut self, i: usize) -> Vec<u8> {
        self.attrs.remove(i).value
    }

    fn attr_bytes(&self) -> u64 {
        SessionData::attr_bytes(self)
    }

    fn set_updated_ms(&mut self, now_ms: u64) {
        self.updated_ms = now_ms;
    }
}

impl SessionData {
    /// The value of attribute `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.attrs
            .binary_search_by(|a| a.key.as_str().cmp(key))
            .ok()
            .map(|i| self.attrs[i].value.as_slice())
    }

    /// Bytes the attributes take, the measure the quota applies to.
    pub fn attr_bytes(&self) -> u64 {
        self.attrs
            .iter()
            .map(|a| attr_cost(a.key.len(), a.value.len()))
            .sum()
    }

    /// Applies a batch and commits it only if every op succeeds: on an
    /// error the session is left exactly as it was. This is what the arena's
    /// combiner does, and what a replica does with a delta.
    pub fn apply(&mut self, ops: &[Op], now_ms: u64, quota: u64) -> Result<Applied, OpError> {
        self.apply_refs(ops.iter().map(Op::as_ref), now_ms, quota)
    }

    /// [`SessionData::apply`] over borrowed ops (owned or archived), so a
    /// replica applies a delta without deserializing it. Changes are made
    /// in place with an undo log, not on a copy of the session.
    pub fn apply_refs<'a>(
        &mut self,
        ops: impl IntoIterator<Item = OpRef<'a>>,
        now_ms: u64,
        quota: u64,
    ) -> Result<Applied, OpError> {
        apply_ops(self, ops, now_ms, quota)
    }

    /// Whether the session has expired at `now_ms`, given its last read.
    pub fn expired(&self, now_ms: u64, last_read_ms: u64) -> bool {
        expired_at(
            now_ms,
            self.updated_ms.max(last_read_ms),
            self.idle_ttl_ms,
            self.expires_at_ms,
        )
    }
}

impl ArchivedSessionData {
    /// The value of attribute `key`, without copying.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        let attrs = self.attrs.as_slice();
        if attrs.len() > 16 {
            return attrs
                .binary_search_by(|a| a.key.as_str().cmp(key))
                .ok()
                .map(|i| attrs[i].value.as_slice());
        }
        // Few attributes: a linear scan of the stored hashes touches only
        // the attribute array, and compares one string at most.
        let h = key_hash(key);
        attrs
            .iter()
            .find(|a| a.hash.to_native() == h && a.key.as_str() == key)
            .map(|a| a.value.as_slice())
    }

    /// Whether the session has expired at `now_ms`, given its last read.
    pub fn expired(&self, now_ms: u64, last_read_ms: u64) -> bool {
        expired_at(
            now_ms,
            self.updated_ms.to_native().max(last_read_ms),
            self.idle_ttl_ms.to_native(),
            self.expires_at_ms.to_native(),
        )
    }
}

/// Encodes an op batch (the bytes stored in the queue and shipped as a delta).
pub fn encode_ops(ops: &[Op]) -> rkyv::util::AlignedVec {
    encode_ops_in(ops, rkyv::util::AlignedVec::new())
}

/// [`encode_ops`] into `buf` (cleared first), so a caller can reuse it.
pub(crate) fn encode_ops_in(ops: &[Op], mut buf: rkyv::util::AlignedVec) -> rkyv::util::AlignedVec {
    buf.clear();
    // Serializing plain owned data into a growable buffer cannot fail.
    rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&OpSlice(ops), buf)
        .expect("serializing ops into memory")
}

/// A borrowed batch that archives exactly as `Vec<Op>` does, so encoding a
/// batch does not clone it first.
struct OpSlice<'a>(&'a [Op]);

impl rkyv::Archive for OpSlice<'_> {
    type Archived = rkyv::vec::ArchivedVec<ArchivedOp>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_slice(self.0, resolver, out);
    }
}

impl<S> rkyv::Serialize<S> for OpSlice<'_>
where
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
    Op: rkyv::Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::serialize_from_slice(self.0, serializer)
    }
}

/// Decodes and validates an op batch from untrusted bytes.
pub fn decode_ops(bytes: &[u8]) -> Result<Vec<Op>, rkyv::rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<Vec<Op>, rkyv::rancor::Error>(&aligned)
}

/// Encodes a session's contents (what a record holds after its header).
pub fn encode_session(data: &SessionData) -> rkyv::util::AlignedVec {
    rkyv::to_bytes::<rkyv::rancor::Error>(data).expect("serializing a session into memory")
}

/// Decodes and validates a session snapshot from untrusted bytes.
pub fn decode_session(bytes: &[u8]) -> Result<SessionData, rkyv::rancor::Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<SessionData, rkyv::rancor::Error>(&aligned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string()),
            Just(String::new())
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (key(), proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(key, value)| Op::Set { key, value }),
            key().prop_map(|key| Op::Remove { key }),
            (key(), proptest::collection::vec(any::<u8>(), 0..8), 0u32..5).prop_map(
                |(key, item, max_items)| Op::Append {
                    key,
                    item,
                    max_items
                }
            ),
            (key(), any::<i64>()).prop_map(|(key, by)| Op::Incr { key, by }),
            Just(Op::Touch),
        ]
    }

    /// The reference: a map from key to either bytes, a counter or a list.
    #[derive(Clone, Debug, PartialEq)]
    enum V {
        Bytes(Vec<u8>),
        Count(i64),
        List(Vec<Vec<u8>>),
    }

    fn model_apply(m: &BTreeMap<String, V>, ops: &[Op], quota: u64) -> Option<BTreeMap<String, V>> {
        let mut m = m.clone();
        for op in ops {
            match op {
                Op::Set { key, value } if !key.is_empty() => {
                    m.insert(key.clone(), V::Bytes(value.clone()));
                }
                Op::Remove { key } if !key.is_empty() => {
                    m.remove(key);
                }
                Op::Append {
                    key,
                    item,
                    max_items,
                } if !key.is_empty() && *max_items > 0 => {
                    let mut list = match m.get(key) {
                        None => vec![],
                        Some(V::List(l)) => l.clone(),
                        Some(V::Bytes(b)) => append_items(b)?.iter().map(|s| s.to_vec()).collect(),
                        Some(V::Count(c)) => append_items(&c.to_le_bytes())?
                            .iter()
                            .map(|s| s.to_vec())
                            .collect(),
                    };
                    list.push(item.clone());
                    while list.len() > *max_items as usize {
                        list.remove(0);
                    }
                    m.insert(key.clone(), V::List(list));
                }
                Op::Incr { key, by } if !key.is_empty() => {
                    let cur = match m.get(key) {
                        None => 0,
                        Some(V::Count(c)) => *c,
                        Some(V::Bytes(b)) => i64::from_le_bytes(b.as_slice().try_into().ok()?),
                        Some(V::List(l)) => {
                            let mut enc = vec![];
                            for it in l {
                                enc.extend_from_slice(&(it.len() as u32).to_le_bytes());
                                enc.extend_from_slice(it);
                            }
                            i64::from_le_bytes(enc.as_slice().try_into().ok()?)
                        }
                    };
                    m.insert(key.clone(), V::Count(cur.checked_add(*by)?));
                }
                Op::Touch => {}
                _ => return None,
            }
        }
        let bytes: u64 = m
            .iter()
            .map(|(k, v)| (k.len() + encode(v).len() + 16) as u64)
            .sum();
        (bytes <= quota).then_some(m)
    }

    fn encode(v: &V) -> Vec<u8> {
        match v {
            V::Bytes(b) => b.clone(),
            V::Count(c) => c.to_le_bytes().to_vec(),
            V::List(l) => {
                let mut enc = vec![];
                for it in l {
                    enc.extend_from_slice(&(it.len() as u32).to_le_bytes());
                    enc.extend_from_slice(it);
                }
                enc
            }
        }
    }

    proptest! {
        /// Applying batches to a session agrees with the plain model, batches
        /// are all-or-nothing, and the archive round-trips.
        #[test]
        fn apply_matches_model(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..12)) {
            let quota = 120;
            let mut s = SessionData::default();
            let mut m = BTreeMap::new();
            for (i, batch) in batches.iter().enumerate() {
                let before = s.clone();
                let expect = model_apply(&m, batch, quota);
                let got = s.apply(batch, i as u64, quota);
                // The combiner's draft of the record before: the same answer,
                // and when it applies, the same archive byte for byte.
                let archive = encode_session(&before);
                let archived = rkyv::access::<ArchivedSessionData, rkyv::rancor::Error>(&archive).unwrap();
                let mut draft = SessionDraft::new(archived);
                let drafted = draft.apply_refs(batch.iter().map(Op::as_ref), i as u64, quota);
                prop_assert_eq!(&drafted, &got);
                if got.is_ok() {
                    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&draft).unwrap();
                    let want = encode_session(&s);
                    prop_assert_eq!(bytes.as_slice(), want.as_slice());
                }
                if let Some(next) = expect {
                    prop_assert!(got.is_ok(), "model accepted, engine refused: {got:?}");
                    m = next;
                } else {
                    prop_assert!(got.is_err());
                    prop_assert_eq!(&s, &before);
                }
                let flat: Vec<(String, Vec<u8>)> = m.iter().map(|(k, v)| (k.clone(), encode(v))).collect();
                let ours: Vec<(String, Vec<u8>)> = s.attrs.iter().map(|a| (a.key.clone(), a.value.clone())).collect();
                prop_assert_eq!(flat, ours);
            }
            let bytes = encode_session(&s);
            prop_assert_eq!(decode_session(&bytes).unwrap(), s);
        }

        #[test]
        fn decoders_refuse_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_ops(&bytes);
            let _ = decode_session(&bytes);
        }
    }

    #[test]
    fn ops_round_trip() {
        let ops = vec![
            Op::Set {
                key: "k".into(),
                value: vec![1; 100],
            },
            Op::Invalidate,
        ];
        assert_eq!(decode_ops(&encode_ops(&ops)).unwrap(), ops);
    }
}
