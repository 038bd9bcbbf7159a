//! The lag histogram, the routing rules and the stats snapshot.

use super::state::{LagHistogram, SidState};
use super::*;
use std::time::Duration;

#[test]
fn lag_quantiles_over_an_interval() {
    let mut h = LagHistogram::default();
    for _ in 0..100 {
        h.record(Duration::from_millis(50));
    }
    let earlier = ReplicatorStats {
        lag_buckets: h.buckets,
        ..ReplicatorStats::default()
    };
    for _ in 0..1000 {
        h.record(Duration::from_micros(300));
    }
    let now = ReplicatorStats {
        lag_buckets: h.buckets,
        ..ReplicatorStats::default()
    };
    assert_eq!(h.quantile(0.99), 50_000, "since start: the slow ones");
    assert_eq!(now.lag_quantile_since(&earlier, 0.99), 511);
    assert_eq!(now.lag_quantile_since(&now, 0.99), 0, "no samples");
}

#[test]
fn lag_quantiles_are_bucket_bounds() {
    let mut h = LagHistogram::default();
    assert_eq!(h.quantile(0.5), 0);
    for us in [10, 20, 30, 40, 5000] {
        h.record(Duration::from_micros(us));
    }
    assert_eq!(h.count, 5);
    assert_eq!(h.max_us, 5000);
    assert_eq!(h.quantile(0.5), 31);
    assert_eq!(h.quantile(0.99), 5000, "never above the largest sample");
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
