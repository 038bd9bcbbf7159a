//! Which replica nodes own a session: rendezvous (highest-random-weight)
//! hashing with xxh3 over the bank's membership list.
//!
//! Every node gets a weight `xxh3(sid ‖ node_id)` per SID; the `R` nodes
//! with the highest weights own it. A lookup costs one hash per node (the
//! bank is a few dozen nodes at most), needs no ring or virtual nodes, and
//! when a node joins or leaves only the SIDs whose top-`R` set changes
//! move: every other node's weight for a SID is unchanged. The full
//! [`Placement::ranking`] is the order for hinted handoff (an owner that is
//! down is replaced by the next node in the ranking) and for the failover
//! "poll every node" fallback.

use std::fmt;
use std::net::SocketAddr;

use xxhash_rust::xxh3::xxh3_64;

/// Default replication factor.
pub const REPLICAS_DEFAULT: usize = 2;
/// One replica node of the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Stable node id (also its id in the handshake and in arena acks).
    pub id: u16,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Most nodes in one bank: rankings are computed by sorting every node.
pub const MEMBERS_MAX: usize = 256;

/// A membership list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// No node at all.
    #[error("the bank has no nodes")]
    Empty,
    /// Two entries share a node id.
    #[error("node id {0} appears twice")]
    DuplicateId(u16),
    /// Node id 0 is reserved (the arena's "no ack" marker).
    #[error("node id 0 is reserved; use 1..=65535")]
    ZeroId,
    /// Replication factor 0.
    #[error("replication factor must be at least 1")]
    ZeroReplicas,
    /// More than [`MEMBERS_MAX`] nodes.
    #[error("at most {MEMBERS_MAX} nodes")]
    TooMany,
    /// A `--nodes` entry that is not `id=host:port`.
    #[error("bad node entry {0:?}: expected id=ip:port")]
    Parse(String),
}

/// The bank's membership and replication factor.
#[derive(Clone, PartialEq, Eq)]
pub struct Placement {
    members: Vec<Member>,
    replicas: usize,
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Placement")
            .field("members", &self.members.len())
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// The weight of `node` for `sid`: xxh3 over the SID's 16 bytes followed by
/// the node id (little-endian), so every node's weight is independent of
/// every other node's.
#[inline]
pub fn weight(sid: &[u8; 16], node: u16) -> u64 {
    let mut key = [0u8; 18];
    key[..16].copy_from_slice(sid);
    key[16..].copy_from_slice(&node.to_le_bytes());
    xxh3_64(&key)
}

impl Placement {
    /// A bank of `members` keeping `replicas` copies of each session (capped
    /// at the number of nodes).
    pub fn new(members: Vec<Member>, replicas: usize) -> Result<Placement, PlacementError> {
        if members.is_empty() {
            return Err(PlacementError::Empty);
        }
        if members.len() > MEMBERS_MAX {
            return Err(PlacementError::TooMany);
        }
        if replicas == 0 {
            return Err(PlacementError::ZeroReplicas);
        }
        let mut ids: Vec<u16> = members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        if ids[0] == 0 {
            return Err(PlacementError::ZeroId);
        }
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlacementError::DuplicateId(w[0]));
        }
        Ok(Placement { members, replicas })
    }

    /// Parses `id=addr,id=addr,...` (the `--nodes` flag).
    pub fn parse_members(s: &str) -> Result<Vec<Member>, PlacementError> {
        s.split(',')
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let bad = || PlacementError::Parse(e.to_string());
                let (id, addr) = e.trim().split_once('=').ok_or_else(bad)?;
                Ok(Member {
                    id: id.trim().parse().map_err(|_| bad())?,
                    addr: addr.trim().parse().map_err(|_| bad())?,
                })
            })
            .collect()
    }

    /// Every node, in the order given.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The node with id `id`.
    pub fn member(&self, id: u16) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Copies kept per session (at most the number of nodes).
    pub fn replicas(&self) -> usize {
        self.replicas.min(self.members.len())
    }

    /// Every node id, highest weight for `sid` first (ties, which need a
    /// 64-bit collision, break by id).
    pub fn ranking(&self, sid: &[u8; 16]) -> Vec<u16> {
        let mut w: Vec<(u64, u16)> = self
            .members
            .iter()
            .map(|m| (weight(sid, m.id), m.id))
            .collect();
        w.sort_unstable_by(|a, b| b.cmp(a));
        w.into_iter().map(|(_, id)| id).collect()
    }

    /// The owners of `sid`: the top [`Placement::replicas`] of its ranking.
    pub fn owners(&self, sid: &[u8; 16]) -> Vec<u16> {
        let mut r = self.ranking(sid);
        r.truncate(self.replicas());
        r
    }

    /// Whether `id` is one of `sid`'s owners ([`Placement::owners`]),
    /// without building the ranking: fewer than `replicas` nodes outrank it.
    pub fn is_owner(&self, sid: &[u8; 16], id: u16) -> bool {
        if self.member(id).is_none() {
            return false;
        }
        let mine = (weight(sid, id), id);
        self.members
            .iter()
            .filter(|m| (weight(sid, m.id), m.id) > mine)
            .count()
            < self.replicas()
    }

    /// Where `sid`'s copies go now: the first `replicas` nodes of its
    /// ranking for which `up` holds (hinted handoff past the nodes that are
    /// down). Fewer when fewer nodes are up.
    pub fn targets(&self, sid: &[u8; 16], up: impl Fn(u16) -> bool) -> Vec<u16> {
        let mut r = self.ranking(sid);
        r.retain(|&id| up(id));
        r.truncate(self.replicas());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bank(ids: &[u16]) -> Vec<Member> {
        ids.iter()
            .map(|&id| Member {
                id,
                addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id)),
            })
            .collect()
    }

    /// Node ids `1..=n`.
    fn ids(n: u16) -> Vec<u16> {
        (1..=n).collect()
    }

    /// From 1 to `most - 1` random SIDs.
    fn sids(most: usize) -> impl Strategy<Value = Vec<[u8; 16]>> {
        proptest::collection::vec(any::<[u8; 16]>(), 1..most)
    }

    #[test]
    fn refuses_bad_membership() {
        assert_eq!(Placement::new(vec![], 2), Err(PlacementError::Empty));
        assert_eq!(
            Placement::new(bank(&[1, 2, 1]), 2),
            Err(PlacementError::DuplicateId(1))
        );
        assert_eq!(
            Placement::new(bank(&[0, 1]), 2),
            Err(PlacementError::ZeroId)
        );
        assert_eq!(
            Placement::new(bank(&[1]), 0),
            Err(PlacementError::ZeroReplicas)
        );
    }

    #[test]
    fn parses_node_lists() {
        let m = Placement::parse_members("1=127.0.0.1:7001, 2=[::1]:7002").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].id, 2);
        assert!(Placement::parse_members("1:127.0.0.1:7001").is_err());
        assert!(Placement::parse_members("x=127.0.0.1:7001").is_err());
    }

    #[test]
    fn owners_are_top_of_ranking_and_spread_evenly() {
        let p = Placement::new(bank(&[1, 2, 3, 4]), 2).unwrap();
        let mut first = [0u32; 5];
        for i in 0..4000u32 {
            let mut sid = [0u8; 16];
            sid[..4].copy_from_slice(&i.to_le_bytes());
            let r = p.ranking(&sid);
            assert_eq!(r.len(), 4);
            assert_eq!(p.owners(&sid), r[..2].to_vec());
            first[r[0] as usize] += 1;
            // Hinted handoff: node r[0] down, the third in rank steps in.
            assert_eq!(p.targets(&sid, |id| id != r[0]), vec![r[1], r[2]]);
        }
        for &n in &first[1..] {
            assert!((800..1200).contains(&n), "uneven spread: {first:?}");
        }
        let one = Placement::new(bank(&[9]), 3).unwrap();
        assert_eq!(one.replicas(), 1);
        assert_eq!(one.owners(&[1; 16]), vec![9]);
    }

    proptest! {
        /// Removing a node moves only the SIDs it owned, and each of those
        /// loses exactly that node and gains the next in its ranking.
        #[test]
        fn leave_moves_only_its_sids(
            n in 2u16..12, r in 1usize..4, gone in 0u16..12, sids in sids(64),
        ) {
            let ids = ids(n);
            let gone = ids[gone as usize % ids.len()];
            let before = Placement::new(bank(&ids), r).unwrap();
            let rest: Vec<u16> = ids.iter().copied().filter(|&i| i != gone).collect();
            let after = Placement::new(bank(&rest), r).unwrap();
            for sid in &sids {
                let (b, a) = (before.owners(sid), after.owners(sid));
                if b.contains(&gone) {
                    let kept: Vec<u16> = b.iter().copied().filter(|&i| i != gone).collect();
                    prop_assert_eq!(&a[..kept.len()], &kept[..]);
                    if before.replicas() == after.replicas() {
                        prop_assert_eq!(a.len(), kept.len() + 1);
                    }
                } else {
                    prop_assert_eq!(&a[..], &b[..]);
                }
            }
        }

        /// `is_owner` agrees with `owners` for every node, and a stranger.
        #[test]
        fn is_owner_agrees_with_owners(
            n in 1u16..12, r in 1usize..4, sids in sids(32),
        ) {
            let p = Placement::new(bank(&ids(n)), r).unwrap();
            for sid in &sids {
                let owners = p.owners(sid);
                for id in 1..=n + 1 {
                    prop_assert_eq!(p.is_owner(sid, id), owners.contains(&id));
                }
            }
        }

        /// Adding a node moves only the SIDs it now owns, displacing one
        /// previous owner each (when the factor stays the same).
        #[test]
        fn join_moves_only_its_sids(
            n in 1u16..12, r in 1usize..4, sids in sids(64),
        ) {
            let before = Placement::new(bank(&ids(n)), r).unwrap();
            let after = Placement::new(bank(&ids(n + 1)), r).unwrap();
            for sid in &sids {
                let (b, a) = (before.owners(sid), after.owners(sid));
                if a.contains(&(n + 1)) {
                    let moved = b.iter().filter(|i| !a.contains(i)).count();
                    prop_assert!(moved <= 1);
                } else {
                    prop_assert_eq!(&a[..], &b[..]);
                }
            }
        }
    }
}
