//! The lag histogram, the routing rules and the stats snapshot.

use super::state::SidState;
use super::*;
use std::time::{Duration, Instant};

#[test]
fn lag_quantiles_over_an_interval() {
    let mut h = Lag::default();
    for _ in 0..100 {
        h.record(Duration::from_millis(50));
    }
    let earlier = ReplicatorStats {
        lag: h.clone(),
        ..ReplicatorStats::default()
    };
    for _ in 0..1000 {
        h.record(Duration::from_micros(300));
    }
    let now = ReplicatorStats {
        lag: h.clone(),
        ..ReplicatorStats::default()
    };
    // Two significant digits: within 1 % of the sample.
    let p99 = h.quantile_us(0.99);
    assert!(
        (49_500..=50_500).contains(&p99),
        "since start: the slow ones, {p99}"
    );
    let recent = now.lag_quantile_since(&earlier, 0.99);
    assert!(
        (297..=303).contains(&recent),
        "the interval: the fast ones, {recent}"
    );
    assert_eq!(now.lag_quantile_since(&now, 0.99), 0, "no samples");
}

#[test]
fn lag_counts_quantiles_and_bounds() {
    let mut h = Lag::default();
    assert_eq!(h.quantile_us(0.5), 0);
    for us in [10, 20, 30, 40, 5000] {
        h.record(Duration::from_micros(us));
    }
    assert_eq!(h.count(), 5);
    assert!((4950..=5050).contains(&h.max_us()), "{}", h.max_us());
    assert_eq!(h.quantile_us(0.5), 30);
    assert_eq!(
        h.quantile_us(0.99),
        h.max_us(),
        "never above the largest sample"
    );
    assert_eq!(h.count_at_most_us(40), 4);
    assert_eq!(h.count_at_most_us(1 << 20), 5);
    assert!((5050..=5150).contains(&h.sum_us()), "{}", h.sum_us());
    // Zero and longer than an hour still count.
    h.record(Duration::ZERO);
    h.record(Duration::from_secs(7200));
    assert_eq!(h.count(), 7);
}

#[test]
fn acks_are_per_node_and_counted_against_the_current_version() {
    let mut s = SidState {
        version: 5,
        ..SidState::default()
    };
    s.set_ack(1, 5);
    s.set_ack(2, 4);
    assert_eq!(s.holders(), 1);
    s.set_ack(2, 5);
    assert_eq!(s.holders(), 2);
    s.forget(1);
    assert_eq!(s.acked_by(1), 0);
    assert_eq!(s.acked_by(2), 5);
}

/// A replicator's table for two nodes, 1 and 2, both owners (R = 2), both
/// links up.
fn two_owners() -> state::State {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let placement = Placement::new(
        vec![
            crate::placement::Member { id: 1, addr },
            crate::placement::Member { id: 2, addr },
        ],
        2,
    )
    .unwrap();
    let link = |id: u16| state::NodeLink {
        stats: NodeStats {
            id,
            up: true,
            ..NodeStats::default()
        },
        ..state::NodeLink::default()
    };
    state::State::new(placement, vec![link(1), link(2)])
}

#[test]
fn the_oldest_wait_moves_on_once_its_version_is_acked() {
    let mut st = two_owners();
    let sid = sessio_engine::Sid([7; 16]);
    let t0 = Instant::now().checked_sub(Duration::from_secs(3)).unwrap();
    let t1 = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
    let s = st.sids.entry(sid).or_default();
    // Version 1 seen 3 s ago, version 2 1 s ago, 3 just now.
    s.version = 3;
    assert!(s.note_unacked(t0, 1), "starts waiting");
    assert!(!s.note_unacked(t1, 2), "waits already");
    assert!(!s.note_unacked(Instant::now(), 3));
    s.set_ack(1, 1);
    st.start_waiting(sid, t0);
    state::settle(&mut st, sid);
    assert_eq!(st.sids[&sid].since, Some(t0), "one ack of 1: still waiting");
    st.sids.get_mut(&sid).unwrap().set_ack(2, 2);
    state::settle(&mut st, sid);
    let s = &st.sids[&sid];
    assert_eq!(
        (s.since, s.since_version),
        (Some(t1), 2),
        "1 has its acks: the oldest waiting update is 2, seen 1 s ago"
    );
    assert_eq!(st.lag.count(), 1, "1's wait was recorded");
    for n in [1, 2] {
        st.sids.get_mut(&sid).unwrap().set_ack(n, 3);
    }
    state::settle(&mut st, sid);
    assert_eq!(st.sids[&sid].since, None, "all acked");
    assert_eq!(st.lag.count(), 2);
}

#[test]
fn a_removal_is_kept_until_every_node_queued_for_it_has_it() {
    let mut st = two_owners();
    let sid = sessio_engine::Sid([9; 16]);
    let s = st.sids.entry(sid).or_default();
    // Both owners acked the last copy (version 4); then the session ended.
    s.version = 4;
    s.set_ack(1, 4);
    s.set_ack(2, 4);
    s.removed = true;
    let now = Instant::now();
    assert!(s.note_unacked(now, 0));
    st.start_waiting(sid, now);
    // Node 1 acked the Remove; node 2's batch is not built yet.
    st.nodes[1].pending.insert(sid);
    state::settle(&mut st, sid);
    assert!(
        st.sids.contains_key(&sid),
        "forgotten while node 2 still has the removal queued: its copy would stay"
    );
    // Node 2 took and acked it.
    st.nodes[1].pending.remove(&sid);
    state::settle(&mut st, sid);
    assert!(!st.sids.contains_key(&sid), "forgotten once no node waits");
}

#[test]
fn a_snapshot_counts_the_waiting_sessions_without_walking_them() {
    let mut st = two_owners();
    let t0 = Instant::now().checked_sub(Duration::from_secs(2)).unwrap();
    let sids = [sessio_engine::Sid([1; 16]), sessio_engine::Sid([2; 16])];
    for (i, sid) in sids.into_iter().enumerate() {
        let s = st.sids.entry(sid).or_default();
        s.version = 1;
        let seen = if i == 0 { t0 } else { Instant::now() };
        if s.note_unacked(seen, 1) {
            st.start_waiting(sid, seen);
        }
    }
    let snap = st.snapshot("test", true);
    assert_eq!(snap.dirty, 2);
    assert!(
        snap.oldest_unacked_us >= 2_000_000,
        "{}",
        snap.oldest_unacked_us
    );
    // Both owners ack the first: one waits still.
    for n in [1, 2] {
        st.sids.get_mut(&sids[0]).unwrap().set_ack(n, 1);
    }
    state::settle(&mut st, sids[0]);
    let snap = st.snapshot("test", true);
    assert_eq!(snap.dirty, 1);
    assert!(
        snap.oldest_unacked_us < 1_000_000,
        "the oldest wait ended: the next one is read, {} µs",
        snap.oldest_unacked_us
    );
    for n in [1, 2] {
        st.sids.get_mut(&sids[1]).unwrap().set_ack(n, 1);
    }
    state::settle(&mut st, sids[1]);
    let snap = st.snapshot("test", true);
    assert_eq!(
        (snap.dirty, snap.oldest_unacked_us),
        (0, 0),
        "none waits: read at once, not from the last walk"
    );
}

#[test]
fn a_removal_carries_the_newest_version_shipped() {
    use sessio_net::Delta;
    // Version 1 was taken; the batch built later read version 2 from the
    // arena and sent it to node 1; then the session ended.
    let mut s = state::SidState {
        version: 1,
        epoch: 1,
        removed: true,
        ..state::SidState::default()
    };
    s.set_sent(1, 2);
    let sid = sessio_engine::Sid([3; 16]);
    let (mut entries, mut sent) = (Vec::new(), Vec::new());
    super::link::push_remove(&mut entries, &mut sent, sid, &s, 2, false);
    assert!(matches!(entries[0].body, Delta::Remove));
    assert_eq!(
        entries[0].new_version, 2,
        "at version 1, the node would keep its copy at 2 as a write that overtook the removal"
    );
    // A stand-in's drop stays at the version taken: a newer hinted copy
    // is kept.
    let (mut entries, mut sent) = (Vec::new(), Vec::new());
    super::link::push_remove(&mut entries, &mut sent, sid, &s, 2, true);
    assert_eq!(entries[0].new_version, 1);
}

/// A batch of three as sent: a change, a removal and a stand-in's drop.
fn three_sent() -> Vec<link::Sent> {
    [(1u8, 4u64, false), (2, 9, false), (3, 2, true)]
        .into_iter()
        .map(|(n, new_version, drops_hint)| link::Sent {
            sid: sessio_engine::Sid([n; 16]),
            new_version,
            epoch: 1,
            drops_hint,
        })
        .collect()
}

#[test]
fn a_short_answer_stands_for_every_entry_applied_at_the_version_sent() {
    use sessio_net::{Ack, AckEntry, AckStatus, AllApplied, Message};
    let sent = three_sent();
    let acks = link::acks_of(Message::AllApplied(AllApplied { entries: 3 }), &sent).unwrap();
    let whole: Vec<AckEntry> = sent
        .iter()
        .map(|s| AckEntry {
            sid: s.sid.0,
            version: s.new_version,
            status: AckStatus::Applied,
        })
        .collect();
    assert_eq!(acks, whole);
    // A whole ack is taken as it is.
    let mut mixed = whole.clone();
    mixed[1].status = AckStatus::NeedFull;
    let got = link::acks_of(
        Message::Ack(Ack {
            entries: mixed.clone(),
        }),
        &sent,
    );
    assert_eq!(got, Ok(mixed));
    // An answer of another length than the batch, or not an answer at all,
    // ends the connection.
    for wrong in [
        Message::AllApplied(AllApplied { entries: 2 }),
        Message::AllApplied(AllApplied { entries: 4 }),
        Message::Ack(Ack {
            entries: whole[..2].to_vec(),
        }),
        Message::Ping(sessio_net::Ping { nonce: 1 }),
    ] {
        assert!(link::acks_of(wrong, &sent).is_err());
    }
}
