//! A node fed by many hosts at once: `conns` connections, each sending
//! batches of [`FANIN_BATCH`] deltas of 100 B and waiting for their ack
//! (one batch in flight per connection, as a replicator's link does under
//! light load), to one replica node (the real store) on `io_uring` and on
//! epoll. The clients run on one thread on epoll for both, so the node's
//! engine is the only difference; node and clients share the two cores.
//! Each round connects its clients first (handshakes are not timed), then
//! counts acknowledged deltas for the round's time. The one client thread
//! saturates a core first, so throughput says as much about it as about
//! the node: the node's CPU time per delta (its thread's `schedstat`) is
//! the measure of the node's engine at equal work.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use sessio_engine::Sid;
use sessio_net::{Backend, Delta, DeltaBatch, DeltaEntry, Epoll, IoUring, Message, TransportError};

use crate::node::{Frames, Node, NodeServer, connect_with};
use crate::report::{Report, Row, Stat, Unit};
use crate::{BoxError, Run, interleaved_n, threads_cpu_ns};

/// Connection counts measured.
const FANIN_CONNS: [usize; 2] = [64, 256];
/// Deltas per batch.
const FANIN_BATCH: usize = 8;
/// SIDs each connection cycles through (each batch names a SID once).
const SIDS_PER_CONN: usize = 16;
/// Rounds per engine and connection count, alternating.
const FANIN_ROUNDS: usize = 5;
/// Most batches one connection sends in a round.
const BATCHES_MAX: u64 = 1 << 20;

/// The fan-in rows and `ratio uring_vs_epoll_fanin{64,256}`.
pub fn fanin(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let uring = NodeServer::start::<IoUring>(Node::Store)?;
    let epoll = NodeServer::start::<Epoll>(Node::Store)?;
    for conns in FANIN_CONNS {
        let (mut cpu_u, mut cpu_e) = (Vec::new(), Vec::new());
        let mut u = || round(uring.addr, conns, run.round, "node-io_uring", &mut cpu_u);
        let mut e = || round(epoll.addr, conns, run.round, "node-epoll", &mut cpu_e);
        let s = interleaved_n(&mut [&mut u, &mut e], FANIN_ROUNDS)?;
        let [u, e] = <[Stat; 2]>::try_from(s).expect("two stats");
        let (cpu_u, cpu_e) = (Stat::new(cpu_u), Stat::new(cpu_e));
        println!(
            "fanin conns={conns}: io_uring node {} deltas/s, {} ns of node CPU per delta; epoll node {} deltas/s, {} ns",
            u.fmt(),
            cpu_u.fmt(),
            e.fmt(),
            cpu_e.fmt()
        );
        rep.row(Row::new(
            &format!(
                "fan-in: one replica node fed by {conns} host connections, `DeltaBatch` of {FANIN_BATCH} × 100 B, one in flight each, acked deltas/s (node on io_uring)"
            ),
            Unit::PerSec,
            u.clone(),
            "node on epoll",
            e.clone(),
        ));
        rep.row(Row::new(
            &format!("fan-in, {conns} connections: node CPU per acked delta (node on io_uring)"),
            Unit::Ns,
            cpu_u.clone(),
            "node on epoll",
            cpu_e.clone(),
        ));
        // At equal work: the node's CPU per delta, epoll's over io_uring's.
        rep.ratio(
            &format!("uring_vs_epoll_fanin{conns}"),
            cpu_e.median() / cpu_u.median(),
        );
        rep.ratio(
            &format!("uring_vs_epoll_fanin{conns}_throughput"),
            u.median() / e.median(),
        );
    }
    Ok(())
}

/// One round against the node at `addr`: acknowledged deltas per second
/// over `conns` connections for `max_time`; pushes the CPU time of the
/// node's thread (named `node_thread`) per acked delta, in ns, to `cpu`.
fn round(
    addr: std::net::SocketAddr,
    conns: usize,
    max_time: Duration,
    node_thread: &str,
    cpu: &mut Vec<f64>,
) -> Result<f64, BoxError> {
    let (rate, deltas, node_ns) = crate::node::block_on::<Epoll, _>(Epoll::scope(async move {
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(connect_with::<Epoll>(addr, Frames::Sealed).await?);
        }
        let (record, ops) = sessio_benches::replica_payloads(100);
        let (record, ops) = (Rc::new(record), Rc::new(ops));
        let acked = Rc::new(Cell::new(0u64));
        let failed: Rc<Cell<Option<String>>> = Rc::new(Cell::new(None));
        let running = Rc::new(Cell::new(conns));
        let cpu0 = threads_cpu_ns(&[node_thread])?;
        let start = Instant::now();
        let until = start + max_time;
        for client in clients {
            let (record, ops) = (Rc::clone(&record), Rc::clone(&ops));
            let (acked, failed, running) =
                (Rc::clone(&acked), Rc::clone(&failed), Rc::clone(&running));
            Epoll::spawn(async move {
                if let Err(e) = feed(client, &record, &ops, until, &acked).await {
                    failed.set(Some(e.to_string()));
                }
                running.set(running.get() - 1);
            });
        }
        // Every task stops at `until` or at its batch bound.
        while running.get() > 0 {
            Epoll::sleep(Duration::from_millis(1)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let node_ns = threads_cpu_ns(&[node_thread])? - cpu0;
        if let Some(e) = failed.take() {
            return Err(format!("a fan-in connection failed: {e}").into());
        }
        Ok::<_, BoxError>((acked.get() as f64 / secs, acked.get(), node_ns))
    }))??;
    if deltas == 0 {
        return Err("no delta acknowledged in a fan-in round".into());
    }
    cpu.push(node_ns as f64 / deltas as f64);
    Ok(rate)
}

/// One connection's loop: a batch, its ack, until `until`.
async fn feed(
    mut client: sessio_net::Client<Epoll>,
    record: &[u8],
    ops: &[u8],
    until: Instant,
    acked: &Cell<u64>,
) -> Result<(), BoxError> {
    let sids: Vec<Sid> = (0..SIDS_PER_CONN).map(|_| Sid::random()).collect();
    let mut versions = [0u64; SIDS_PER_CONN];
    let mut next = 0usize;
    let mut sent = 0u64;
    while sent < BATCHES_MAX && Instant::now() < until {
        let entries = (0..FANIN_BATCH)
            .map(|_| {
                let i = next;
                next = (next + 1) % SIDS_PER_CONN;
                let base = versions[i];
                versions[i] += 1;
                DeltaEntry {
                    sid: *sids[i].as_bytes(),
                    base_version: base,
                    new_version: base + 1,
                    epoch: 1,
                    // The node gets a SID's whole record first, then ops.
                    body: if base == 0 {
                        Delta::Full(record.to_vec())
                    } else {
                        Delta::Ops(ops.to_vec())
                    },
                }
            })
            .collect();
        let reply = client
            .call(&Message::DeltaBatch(DeltaBatch {
                host_id: crate::node::HOST_ID,
                entries,
            }))
            .await
            .map_err(|e: TransportError| e.to_string())?;
        let ok = match reply {
            Message::AllApplied(a) => a.entries as usize,
            Message::Ack(ack) => ack
                .entries
                .iter()
                .filter(|e| e.status == sessio_net::AckStatus::Applied)
                .count(),
            other => return Err(format!("the node answered a batch with {other:?}").into()),
        };
        if ok != FANIN_BATCH {
            return Err(format!("{ok} of {FANIN_BATCH} deltas applied").into());
        }
        acked.set(acked.get() + ok as u64);
        sent += 1;
    }
    Ok(())
}
