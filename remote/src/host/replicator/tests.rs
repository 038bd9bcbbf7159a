//! The lag histogram, the routing rules and the stats snapshot.

use super::state::SidState;
use super::*;
use std::time::Duration;

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
