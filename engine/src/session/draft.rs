//! A draft of a session: an archived record, changed by op batches without
//! deserializing it. The arena's combiner builds each new record this way,
//! and a replica node folds its pending batches this way. Keys and values
//! borrow from the old record and from the ops (both stay in place for as
//! long as the draft lives); only a value an op computes (`Append`, `Incr`)
//! is owned. The draft archives exactly as [`SessionData`] does, so the new
//! record is written straight from it.

#[cfg(doc)]
use super::SessionData;
use super::{
    Applied, ArchivedAttr, ArchivedSessionData, Attrs, OpError, OpRef, apply_ops, attr_cost,
    expired_at, key_hash,
};
use rkyv::rancor::{Fallible, Source};
use rkyv::ser::{Allocator, Writer};
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Serialize, munge::munge};
use smallvec::SmallVec;
use std::borrow::Cow;

/// A session being changed: keys and values borrowed from the archived
/// record it started from and from the ops applied to it, for as long as
/// `'a`. It archives exactly as the [`SessionData`] it stands for.
#[derive(Debug)]
pub struct SessionDraft<'a> {
    created_ms: u64,
    updated_ms: u64,
    idle_ttl_ms: u64,
    expires_at_ms: u64,
    /// Kept inline up to the attribute count of most sessions.
    attrs: SmallVec<[AttrDraft<'a>; 16]>,
}

/// One attribute of a draft.
#[derive(Debug)]
struct AttrDraft<'a> {
    hash: u32,
    key: &'a str,
    value: Cow<'a, [u8]>,
}

impl<'a> SessionDraft<'a> {
    /// A draft equal to `record`, borrowing all of it.
    #[must_use]
    pub fn new(record: &'a ArchivedSessionData) -> SessionDraft<'a> {
        SessionDraft {
            created_ms: record.created_ms.to_native(),
            updated_ms: record.updated_ms.to_native(),
            idle_ttl_ms: record.idle_ttl_ms.to_native(),
            expires_at_ms: record.expires_at_ms.to_native(),
            attrs: record
                .attrs
                .iter()
                .map(|a| AttrDraft {
                    hash: a.hash.to_native(),
                    key: a.key.as_str(),
                    value: Cow::Borrowed(a.value.as_slice()),
                })
                .collect(),
        }
    }

    /// [`SessionData::apply_refs`] on the draft: all or nothing.
    pub fn apply_refs(
        &mut self,
        ops: impl IntoIterator<Item = OpRef<'a>>,
        now_ms: u64,
        quota: u64,
    ) -> Result<Applied, OpError> {
        apply_ops(self, ops, now_ms, quota)
    }

    /// Attributes the session holds.
    pub fn attr_count(&self) -> usize {
        self.attrs.len()
    }

    /// [`SessionData::attr_bytes`] of the draft.
    pub fn attr_bytes(&self) -> u64 {
        Attrs::attr_bytes(self)
    }

    /// [`SessionData::expired`] of the draft.
    pub fn expired(&self, now_ms: u64, last_read_ms: u64) -> bool {
        expired_at(
            now_ms,
            self.updated_ms.max(last_read_ms),
            self.idle_ttl_ms,
            self.expires_at_ms,
        )
    }
}

impl<'a> Attrs<'a> for SessionDraft<'a> {
    type Value = Cow<'a, [u8]>;

    fn borrowed(v: &'a [u8]) -> Cow<'a, [u8]> {
        Cow::Borrowed(v)
    }

    fn owned(v: Vec<u8>) -> Cow<'a, [u8]> {
        Cow::Owned(v)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.attrs.binary_search_by(|a| a.key.cmp(key))
    }

    fn value(&self, i: usize) -> &[u8] {
        &self.attrs[i].value
    }

    fn count(&self) -> usize {
        self.attrs.len()
    }

    fn replace(&mut self, i: usize, v: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
        std::mem::replace(&mut self.attrs[i].value, v)
    }

    fn insert(&mut self, i: usize, key: &'a str, value: Cow<'a, [u8]>) {
        self.attrs.insert(
            i,
            AttrDraft {
                hash: key_hash(key),
                key,
                value,
            },
        );
    }

    fn remove(&mut self, i: usize) -> Cow<'a, [u8]> {
        self.attrs.remove(i).value
    }

    fn attr_bytes(&self) -> u64 {
        self.attrs
            .iter()
            .map(|a| attr_cost(a.key.len(), a.value.len()))
            .sum()
    }

    fn set_updated_ms(&mut self, now_ms: u64) {
        self.updated_ms = now_ms;
    }
}

impl Archive for SessionDraft<'_> {
    type Archived = ArchivedSessionData;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: VecResolver, out: Place<ArchivedSessionData>) {
        munge!(let ArchivedSessionData { created_ms, updated_ms, idle_ttl_ms, expires_at_ms, attrs } = out);
        self.created_ms.resolve((), created_ms);
        self.updated_ms.resolve((), updated_ms);
        self.idle_ttl_ms.resolve((), idle_ttl_ms);
        self.expires_at_ms.resolve((), expires_at_ms);
        ArchivedVec::resolve_from_len(self.attrs.len(), resolver, attrs);
    }
}

impl<S> Serialize<S> for SessionDraft<'_>
where
    S: Fallible + Allocator + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::serialize_from_slice(&self.attrs, serializer)
    }
}

impl Archive for AttrDraft<'_> {
    type Archived = ArchivedAttr;
    type Resolver = (StringResolver, VecResolver);

    fn resolve(&self, (k, v): Self::Resolver, out: Place<ArchivedAttr>) {
        munge!(let ArchivedAttr { hash, key, value } = out);
        self.hash.resolve((), hash);
        ArchivedString::resolve_from_str(self.key, k, key);
        ArchivedVec::<u8>::resolve_from_len(self.value.len(), v, value);
    }
}

impl<S> Serialize<S> for AttrDraft<'_>
where
    S: Fallible + Allocator + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok((
            ArchivedString::serialize_from_str(self.key, serializer)?,
            ArchivedVec::serialize_from_slice(self.value.as_ref(), serializer)?,
        ))
    }
}
