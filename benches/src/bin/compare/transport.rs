//! The `transport` workload: `sessio-net` alone, a client pipelining
//! `DeltaBatch`es to a node that acknowledges every entry and keeps
//! nothing. `io_uring` against epoll, and sealed records against the
//! bench-only unsealed ones, rounds alternating in one run.
//!
//! What sealing costs is given two ways: deltas acknowledged per second,
//! what a host sees, and the CPU time both ends of the connection spend per
//! acknowledged delta (the client's thread clock and the node thread's
//! `schedstat`), the cost itself whichever end is the bottleneck. On a
//! shared 2-core guest both scatter by about as much as the gap measured:
//! read the medians of several runs.

use std::time::Duration;

use sessio_net::{Backend, Epoll, IoUring};

use crate::node::{self, Frames, Node, NodeServer};
use crate::report::{Report, Row, Stat, Unit};
use crate::{
    BATCHES_MAX, BoxError, DELTA_BYTES, REPL_SESSIONS, Run, TARGET_ROUNDS,
    TRANSPORT_HEADLINE_BATCH, at_batch, interleaved_n, random_sids, threads_cpu_ns, two_curves,
};

/// A node on backend `B` and a client pipelining batches to it.
pub(crate) struct Pump<B: Backend> {
    node: NodeServer,
    frames: Frames,
    sids: Vec<[u8; 16]>,
    versions: Vec<u64>,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend> Pump<B> {
    pub(crate) fn start(kind: Node) -> Result<Pump<B>, BoxError> {
        Self::start_with(kind, Frames::Sealed)
    }

    pub(crate) fn start_with(kind: Node, frames: Frames) -> Result<Pump<B>, BoxError> {
        let sids = random_sids(REPL_SESSIONS, 0x5E_4D);
        Ok(Pump {
            node: NodeServer::start_with::<B>(kind, frames)?,
            frames,
            versions: vec![0; sids.len()],
            sids,
            _b: std::marker::PhantomData,
        })
    }

    /// One round: deltas/s acknowledged at `batch` entries per batch.
    pub(crate) fn round(&mut self, batch: usize, max_time: Duration) -> Result<f64, BoxError> {
        Ok(self.pump(batch, max_time)?.per_sec())
    }

    /// [`Pump::round`], and the CPU time the client's thread and the
    /// node's thread spent per acknowledged delta, in ns, pushed to `cpu`.
    pub(crate) fn round_cpu(
        &mut self,
        batch: usize,
        max_time: Duration,
        cpu: &mut Vec<f64>,
    ) -> Result<f64, BoxError> {
        let node0 = threads_cpu_ns(&[&self.node.thread_name])?;
        let client0 = this_thread_cpu_ns()?;
        let pumped = self.pump(batch, max_time)?;
        let client = this_thread_cpu_ns()? - client0;
        let node = threads_cpu_ns(&[&self.node.thread_name])? - node0;
        cpu.push((client + node) as f64 / pumped.acked.max(1) as f64);
        Ok(pumped.per_sec())
    }

    fn pump(&mut self, batch: usize, max_time: Duration) -> Result<node::Pumped, BoxError> {
        node::pump::<B>(
            self.node.addr,
            self.frames,
            batch,
            DELTA_BYTES,
            &self.sids,
            &mut self.versions,
            BATCHES_MAX,
            max_time,
        )
    }
}

/// CPU time of the calling thread, in ns.
fn this_thread_cpu_ns() -> Result<u64, BoxError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let secs = u64::try_from(ts.tv_sec)?;
    let nanos = u64::try_from(ts.tv_nsec)?;
    Ok(secs * 1_000_000_000 + nanos)
}

pub(crate) fn transport(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let mut u = Pump::<IoUring>::start(Node::Ack)?;
    let mut e = Pump::<Epoll>::start(Node::Ack)?;
    let [uring, epoll] = two_curves(
        &mut |b| u.round(b, run.round),
        &mut |b| e.round(b, run.round),
        ["io_uring", "epoll"],
    )?;
    for batch in [1, TRANSPORT_HEADLINE_BATCH] {
        let (u, e) = (at_batch(&uring, batch), at_batch(&epoll, batch));
        rep.row(Row::new(
            &format!("transport: `sessio-net` io_uring vs epoll, `DeltaBatch` of {batch} × 100 B, acked deltas/s"),
            Unit::PerSec,
            u.clone(),
            "epoll (tokio)",
            e.clone(),
        ));
        rep.ratio(
            &format!("uring_vs_epoll_batch{batch}"),
            u.median() / e.median(),
        );
    }
    rep.batch_curve
        .push(("sessio-net io_uring, ack only".into(), uring));
    rep.batch_curve
        .push(("sessio-net epoll, ack only".into(), epoll));

    // What sealing costs: the same io_uring pump against a node whose
    // records are laid out and counted the same but neither encrypted nor
    // authenticated (a bench-only mode of `sessio-net`), rounds
    // alternating in this run.
    let mut plain = Pump::<IoUring>::start_with(Node::Ack, Frames::Unsealed)?;
    for batch in [1, TRANSPORT_HEADLINE_BATCH] {
        let (mut cpu_sealed, mut cpu_plain) = (Vec::new(), Vec::new());
        let mut sealed_round = || u.round_cpu(batch, run.round, &mut cpu_sealed);
        let mut plain_round = || plain.round_cpu(batch, run.round, &mut cpu_plain);
        let s = interleaved_n(&mut [&mut sealed_round, &mut plain_round], TARGET_ROUNDS)?;
        let [sealed, unsealed] = <[Stat; 2]>::try_from(s).expect("two stats");
        rep.row(Row::new(
            &format!("transport: sealed records (AEGIS-256X4) vs unsealed, io_uring, `DeltaBatch` of {batch} × 100 B, acked deltas/s"),
            Unit::PerSec,
            sealed.clone(),
            "unsealed (bench only)",
            unsealed.clone(),
        ));
        rep.ratio(
            &format!("transport_sealed_vs_plain_batch{batch}"),
            sealed.median() / unsealed.median(),
        );
        let (cpu_sealed, cpu_plain) = (Stat::new(cpu_sealed), Stat::new(cpu_plain));
        rep.row(Row::new(
            &format!("transport: sealed records vs unsealed, io_uring, `DeltaBatch` of {batch} × 100 B, CPU of client and node per acked delta"),
            Unit::Ns,
            cpu_sealed.clone(),
            "unsealed (bench only)",
            cpu_plain.clone(),
        ));
        rep.ratio(
            &format!("transport_sealed_vs_plain_batch{batch}_cpu"),
            cpu_plain.median() / cpu_sealed.median(),
        );
    }
    Ok(())
}
