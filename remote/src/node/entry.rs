//! A delta entry as the store reads it, whether it came as owned values
//! (from this process) or is read where it arrived in a connection's
//! buffer: the fields copied, the body borrowed.

use sessio_net::message::{ArchivedDelta, ArchivedDeltaEntry};
use sessio_net::{Delta, DeltaEntry, Sid};

/// One delta entry, its body borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryRef<'a> {
    pub sid: Sid,
    pub base_version: u64,
    pub new_version: u64,
    pub epoch: u64,
    pub body: BodyRef<'a>,
}

/// What a [`EntryRef`] carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyRef<'a> {
    /// Ops to apply on top of the base version.
    Ops(&'a [u8]),
    /// The whole record at the new version.
    Full(&'a [u8]),
    /// The session was removed.
    Remove,
}

/// What a store applies: an entry of either form.
pub(crate) trait AsEntry {
    fn entry(&self) -> EntryRef<'_>;
}

impl AsEntry for DeltaEntry {
    fn entry(&self) -> EntryRef<'_> {
        EntryRef {
            sid: self.sid,
            base_version: self.base_version,
            new_version: self.new_version,
            epoch: self.epoch,
            body: match &self.body {
                Delta::Ops(b) => BodyRef::Ops(b),
                Delta::Full(b) => BodyRef::Full(b),
                Delta::Remove => BodyRef::Remove,
            },
        }
    }
}

impl AsEntry for ArchivedDeltaEntry {
    fn entry(&self) -> EntryRef<'_> {
        EntryRef {
            sid: self.sid,
            base_version: self.base_version.to_native(),
            new_version: self.new_version.to_native(),
            epoch: self.epoch.to_native(),
            body: match &self.body {
                ArchivedDelta::Ops(b) => BodyRef::Ops(b.as_slice()),
                ArchivedDelta::Full(b) => BodyRef::Full(b.as_slice()),
                ArchivedDelta::Remove => BodyRef::Remove,
            },
        }
    }
}

impl AsEntry for EntryRef<'_> {
    fn entry(&self) -> EntryRef<'_> {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessio_net::{Codec, DeltaBatch, Frame, Limits, Message, Received};

    /// Both forms of an entry read the same fields and body.
    #[test]
    fn an_archived_entry_reads_as_its_owned_form() {
        let entry = |n: u8, (base_version, new_version, epoch), body| DeltaEntry {
            sid: [n; 16],
            base_version,
            new_version,
            epoch,
            body,
        };
        let batch = DeltaBatch {
            host_id: 7,
            entries: vec![
                entry(1, (3, 4, 2), Delta::Ops(vec![9; 33])),
                entry(2, (0, 1, 5), Delta::Full(vec![8; 100])),
                entry(3, (6, 0, 5), Delta::Remove),
            ],
        };
        let mut codec = Codec::new(Limits::default());
        let mut wire = Vec::new();
        codec
            .encode_into(&Message::DeltaBatch(batch.clone()), &mut wire)
            .expect("encodes");
        let (frame, _) = Frame::decode(&wire, Limits::default().frame_bytes_max)
            .expect("a frame")
            .expect("whole");
        let Received::DeltaBatch(archived) = codec.receive(&frame).expect("valid") else {
            panic!("a delta batch is received where it lies");
        };
        assert_eq!(archived.entries.len(), batch.entries.len());
        for (a, o) in archived.entries.iter().zip(&batch.entries) {
            let (a, o) = (a.entry(), o.entry());
            assert_eq!(
                (a.sid, a.base_version, a.new_version, a.epoch),
                (o.sid, o.base_version, o.new_version, o.epoch)
            );
            match (a.body, o.body) {
                (BodyRef::Ops(x), BodyRef::Ops(y)) | (BodyRef::Full(x), BodyRef::Full(y)) => {
                    assert_eq!(x, y);
                }
                (BodyRef::Remove, BodyRef::Remove) => {}
                other => panic!("bodies differ: {other:?}"),
            }
        }
    }
}
