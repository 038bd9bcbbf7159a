//! The replica node's store on its own, no network: what one delta costs
//! the node (`Store::apply_batch`), and what a fetch that folds pending
//! op batches costs (`Store::fetch`).
//!
//! - `node/apply_ops_100B_batch64`: batches of 64 op deltas, each one
//!   `Set` of 100 B on a 1 KB session, round-robin over 10 000 sessions
//!   (the comparison harness's replication workload without the
//!   transport); throughput in deltas. The first `Set` of each session
//!   adds its attribute and waits to be folded; once folded, every later
//!   one rewrites the value at its length, in place.
//! - `node/receive_ops_100B_batch64`: the same batches as a node serves
//!   them: archived on the wire, then checked (`Codec::receive`) and
//!   applied where they lie (`Store::apply_archived`); only that is timed.
//! - `node/fetch_after_8_ops`: a fetch of a 1 KB session with 8 op deltas
//!   pending, so it folds them.
//!
//! `cargo bench -p sessio-benches --bench node`.

use criterion::{BatchSize, Criterion, Throughput, black_box};
use sessio_net::{
    AckStatus, Codec, Delta, DeltaBatch, DeltaEntry, Fetch, Frame, Limits, Message, Received, Sid,
};
use sessio_remote::{NodeLimits, Store};
use std::time::{Duration, Instant};

const SESSIONS: usize = 10_000;
const BATCH: usize = 64;

fn sid(i: usize) -> Sid {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    s
}

/// A store holding `SESSIONS` sessions at version 1.
fn loaded(record: &[u8]) -> Store {
    let mut store = Store::new(NodeLimits::default(), 1);
    for chunk in (0..SESSIONS).collect::<Vec<_>>().chunks(256) {
        let entries = chunk
            .iter()
            .map(|&i| DeltaEntry {
                sid: sid(i),
                base_version: 0,
                new_version: 1,
                epoch: 1,
                body: Delta::Full(record.to_vec()),
            })
            .collect();
        store.apply_batch(&DeltaBatch {
            host_id: 1,
            entries,
        });
    }
    assert_eq!(store.len(), SESSIONS);
    store
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    // A 1 KB session and a batch setting one 100 B attribute, as the
    // comparison harness sends them.
    let (record, ops) = sessio_benches::replica_payloads(100);
    let mut g = c.benchmark_group("node");

    let mut store = loaded(&record);
    let mut versions = vec![1u64; SESSIONS];
    let mut next = 0usize;
    // The next batch of the round robin: one op delta per session, each on
    // the version the store holds.
    let mut next_batch = || {
        let entries = (0..BATCH)
            .map(|_| {
                let i = next;
                next = (next + 1) % SESSIONS;
                versions[i] += 1;
                DeltaEntry {
                    sid: sid(i),
                    base_version: versions[i] - 1,
                    new_version: versions[i],
                    epoch: 1,
                    body: Delta::Ops(ops.clone()),
                }
            })
            .collect();
        DeltaBatch {
            host_id: 1,
            entries,
        }
    };
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("apply_ops_100B_batch64", |b| {
        // Each batch is built just before it is applied; only the apply is
        // timed.
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let batch = next_batch();
                let t = Instant::now();
                let ack = store.apply_batch(&batch);
                spent += t.elapsed();
                assert!(ack.entries.iter().all(|e| e.status == AckStatus::Applied));
            }
            spent
        });
    });
    g.bench_function("receive_ops_100B_batch64", |b| {
        // Archived into a frame first, untimed; then what a node does with
        // a frame it opened: check it and apply it where it lies.
        let mut codec = Codec::new(Limits::default());
        let mut wire = Vec::new();
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                wire.clear();
                codec
                    .encode_into(&Message::DeltaBatch(next_batch()), &mut wire)
                    .expect("a batch within the limits");
                let t = Instant::now();
                let (frame, _) = Frame::decode(&wire, Limits::default().frame_bytes_max)
                    .expect("a frame")
                    .expect("whole");
                let Received::DeltaBatch(batch) = codec.receive(&frame).expect("valid") else {
                    unreachable!("a delta batch is received where it lies")
                };
                let ack = store.apply_archived(batch);
                spent += t.elapsed();
                assert!(ack.entries.iter().all(|e| e.status == AckStatus::Applied));
            }
            spent
        });
    });
    assert_eq!(store.len(), SESSIONS, "every delta applied");

    // Both closures use the store: setup adds the deltas, the routine fetches.
    let store = std::cell::RefCell::new(loaded(&record));
    let mut n = 0usize;
    g.throughput(Throughput::Elements(1));
    g.bench_function("fetch_after_8_ops", |b| {
        b.iter_batched(
            || {
                let i = n % SESSIONS;
                n += 1;
                let mut store = store.borrow_mut();
                let base = store.get(&sid(i)).expect("held").version();
                let entries = (0..8)
                    .map(|k| DeltaEntry {
                        sid: sid(i),
                        base_version: base + k,
                        new_version: base + k + 1,
                        epoch: 1,
                        body: Delta::Ops(ops.clone()),
                    })
                    .collect();
                store.apply_batch(&DeltaBatch {
                    host_id: 1,
                    entries,
                });
                sid(i)
            },
            |sid| black_box(store.borrow_mut().fetch(Fetch { request_id: 1, sid })),
            BatchSize::SmallInput,
        );
    });
    g.finish();
    c.final_summary();
}
