//! The answers to a [`DeltaBatch`](super::DeltaBatch): an [`Ack`] with
//! one entry per delta entry, or, when every entry was applied at the
//! version it named, the short [`AllApplied`].

use super::{Message, Sid};

/// What the receiver did with one [`DeltaEntry`](super::DeltaEntry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AckStatus {
    /// Applied; the receiver now holds `version`.
    Applied,
    /// The receiver lacks the base version: send the full record.
    NeedFull,
    /// The receiver holds a newer ownership epoch: the sender lost ownership.
    Fenced,
    /// Refused for another reason (over quota, malformed record).
    Refused,
}

/// One entry of an [`Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AckEntry {
    /// The session.
    pub sid: Sid,
    /// The version the receiver holds after this batch.
    pub version: u64,
    /// The outcome.
    pub status: AckStatus,
}

/// The answer to a [`DeltaBatch`](super::DeltaBatch), one entry per delta
/// entry.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Ack {
    /// At most [`batch_entries_max`](super::Limits::batch_entries_max)
    /// entries.
    pub entries: Vec<AckEntry>,
}

/// The short answer to a [`DeltaBatch`](super::DeltaBatch) every entry of
/// which was applied at the version it named: what an [`Ack`] of `entries`
/// entries, each `Applied` at its entry's `new_version`, would say, in 4
/// bytes instead of 32 per entry. The sender knows what it sent; anything
/// else gets the whole [`Ack`] ([`Ack::into_reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AllApplied {
    /// Entries of the batch answered, at most
    /// [`batch_entries_max`](super::Limits::batch_entries_max).
    pub entries: u32,
}

impl Ack {
    /// The ack [`AllApplied`] stands for: each `(sid, new_version)` of the
    /// batch, in order, `Applied` at that version.
    #[must_use]
    pub fn all_applied(entries: impl IntoIterator<Item = (Sid, u64)>) -> Ack {
        Ack {
            entries: entries
                .into_iter()
                .map(|(sid, version)| AckEntry {
                    sid,
                    version,
                    status: AckStatus::Applied,
                })
                .collect(),
        }
    }

    /// The reply to a batch whose entries named `new_versions`, in order:
    /// [`AllApplied`] when every entry was applied at the version it
    /// named, else this ack.
    #[must_use]
    pub fn into_reply(self, new_versions: impl IntoIterator<Item = u64>) -> Message {
        let mut named = new_versions.into_iter();
        let all = self
            .entries
            .iter()
            .all(|e| e.status == AckStatus::Applied && named.next() == Some(e.version))
            && named.next().is_none();
        match u32::try_from(self.entries.len()) {
            Ok(entries) if all && entries > 0 => Message::AllApplied(AllApplied { entries }),
            _ => Message::Ack(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ack of `(version, status)` entries.
    fn ack(entries: &[(u64, AckStatus)]) -> Ack {
        Ack {
            entries: entries
                .iter()
                .map(|&(version, status)| AckEntry {
                    sid: [1; 16],
                    version,
                    status,
                })
                .collect(),
        }
    }

    #[test]
    fn only_a_batch_applied_whole_at_the_versions_named_gets_the_short_reply() {
        use AckStatus::{Applied, NeedFull};
        let short = Message::AllApplied(AllApplied { entries: 2 });
        assert_eq!(ack(&[(4, Applied), (9, Applied)]).into_reply([4, 9]), short);
        // And what the short reply stands for is the ack it replaced.
        let named = [([1; 16], 4), ([1; 16], 9)];
        assert_eq!(Ack::all_applied(named), ack(&[(4, Applied), (9, Applied)]));
        for (entries, named) in [
            // An entry not applied.
            (vec![(4, Applied), (0, NeedFull)], vec![4, 9]),
            // Applied, but holding another version than the one named.
            (vec![(4, Applied), (10, Applied)], vec![4, 9]),
            // Fewer or more versions named than entries answered.
            (vec![(4, Applied), (9, Applied)], vec![4]),
            (vec![(4, Applied)], vec![4, 9]),
            // Nothing to answer.
            (vec![], vec![]),
        ] {
            let a = ack(&entries);
            assert_eq!(a.clone().into_reply(named), Message::Ack(a));
        }
    }
}
