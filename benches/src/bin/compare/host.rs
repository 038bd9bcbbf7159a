//! The host API (`sessio_remote::Sessions`) against a bank of real replica
//! nodes (`LocalNode` threads of this process, `io_uring`, loopback). No
//! peer: these rows say what the host API costs, not who is faster.
//!
//! - `forged`: what made-up SIDs cost the bank. A host with the default
//!   [`sessio_remote::MissLimits`] reads random SIDs at a paced
//!   [`FORGED_RATE`] for [`FORGED_PASS`] against 3 nodes (R = 2); the
//!   nodes' `fetches` counters, summed over the bank, tell what the bank
//!   served, the host's `HostStats` how each read was answered. Then the
//!   same SIDs again, same order and pace: what the negative cache saves.
//! - `durability`: what `Durability::Replicated` adds to an update. One
//!   host with a replicator to 2 nodes (R = 2); sequential one-`Set`
//!   updates of random sessions among [`DURABLE_SESSIONS`], blocks of
//!   `Local` and of `Replicated` alternating; per-update latency
//!   percentiles of each.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};
use sessio_net::{IoUring, Message, Secret, StatsRequest};
use sessio_remote::node::{LocalNode, NodeConfig};
use sessio_remote::{
    Durability, FailoverConfig, HostConfig, HostError, HostStats, Member, Placement, Replicator,
    ReplicatorConfig, Samples, Sessions,
};

use crate::node::{self, SECRET};
use crate::report::{Report, Stat};
use crate::{BoxError, ROUNDS, Run, Scratch, random_sids};

/// Made-up SIDs offered per second.
const FORGED_RATE: u64 = 10_000;
/// How long they are offered: under the default negative TTL (5 s), so the
/// replay of a SID the bank answered finds it still cached.
const FORGED_PASS: Duration = Duration::from_secs(4);
/// Rounds of `forged` (a fresh host each), `--quick` and full.
const FORGED_ROUNDS: [usize; 2] = [1, 3];
/// Sessions the `durability` updates pick from.
const DURABLE_SESSIONS: u64 = 1000;
/// Updates per block of one durability, `--quick` and full; [`ROUNDS`]
/// blocks of each.
const DURABLE_BLOCK: [u64; 2] = [400, 2000];
/// Time limit of one block.
const DURABLE_BLOCK_TIME: Duration = Duration::from_secs(5);
/// What `Replicated` waits for the acks at most.
const REPLICATED_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes of the value each update sets.
const SET_BYTES: usize = 32;

/// Replica nodes on threads of this process, stopped when dropped.
pub struct Bank {
    nodes: Vec<LocalNode>,
    pub placement: Placement,
}

impl Bank {
    pub fn start(n: u16, replicas: usize) -> Result<Bank, BoxError> {
        let nodes = (1..=n)
            .map(|id| {
                LocalNode::start::<IoUring>(
                    NodeConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), id),
                    Secret::from_bytes(SECRET),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let members = nodes
            .iter()
            .zip(1..)
            .map(|(node, id)| Member {
                id,
                addr: node.addr,
            })
            .collect();
        Ok(Bank {
            placement: Placement::new(members, replicas)?,
            nodes,
        })
    }

    /// Counter `name` of every node (from a `StatsRequest`), summed.
    fn counter(&self, name: &str) -> Result<u64, BoxError> {
        let mut sum = 0;
        for n in &self.nodes {
            sum += node::block_on::<IoUring, _>(async {
                let mut c = node::connect::<IoUring>(n.addr).await?;
                match c
                    .call(&Message::StatsRequest(StatsRequest { request_id: 1 }))
                    .await?
                {
                    Message::Stats(s) => Ok::<u64, BoxError>(
                        s.counters
                            .iter()
                            .find(|c| c.name == name)
                            .map_or(0, |c| c.value),
                    ),
                    other => Err(format!("a stats request answered {other:?}").into()),
                }
            })??;
        }
        Ok(sum)
    }
}

/// A host of the bank: its `Sessions` (and replicator) on a fresh arena,
/// removed when dropped.
type Host = Scratch<(Sessions, Option<Replicator>)>;

fn host(
    bank: &Bank,
    label: &str,
    id: u64,
    capacity: u64,
    replicate: bool,
) -> Result<Host, BoxError> {
    let loc = Location::Shm(format!("bench-{}-compare-{label}", std::process::id()));
    let _ = Arena::remove(&loc);
    let sessions = Sessions::open(HostConfig::new(
        loc.clone(),
        ArenaConfig::for_sessions(capacity, 1024),
        bank.placement.clone(),
        FailoverConfig::new(id, Secret::from_bytes(SECRET)),
    ))?;
    // From here on, an error drops the host, which removes the arena.
    let mut h = Scratch(loc, Some((sessions, None)));
    if replicate {
        let r = Replicator::spawn(
            &h.0,
            ReplicatorConfig::new(bank.placement.clone(), Secret::from_bytes(SECRET), id),
        )?;
        if let Some((_, slot)) = h.1.as_mut() {
            *slot = Some(r);
        }
    }
    Ok(h)
}

/// How a host answered the reads of one pass (from its `HostStats`).
#[derive(Default)]
struct Answers {
    fetches: u64,
    not_found: u64,
    negative_hits: u64,
    throttled: u64,
    bank_unavailable: u64,
}

impl Answers {
    fn between(a: &HostStats, b: &HostStats) -> Answers {
        Answers {
            fetches: b.fetches - a.fetches,
            not_found: b.not_found - a.not_found,
            negative_hits: b.negative_hits - a.negative_hits,
            throttled: b.throttled - a.throttled,
            bank_unavailable: b.bank_unavailable - a.bank_unavailable,
        }
    }
}

/// One pass of made-up SIDs through a host.
struct Pass {
    reads: u64,
    secs: f64,
    /// Fetches the bank's nodes served.
    node_fetches: u64,
    answers: Answers,
}

impl Pass {
    fn offered_per_s(&self) -> f64 {
        self.reads as f64 / self.secs
    }

    fn node_fetches_per_s(&self) -> f64 {
        self.node_fetches as f64 / self.secs
    }

    fn node_fetches_per_sid(&self) -> f64 {
        self.node_fetches as f64 / self.reads.max(1) as f64
    }

    fn line(&self) -> String {
        let a = &self.answers;
        format!(
            "offered={:.0}/s node_fetches={:.2}k/s ({} in {:.2} s, {:.3}/SID) host_fetches={} not_found={} negative_hits={} throttled={} bank_unavailable={}",
            self.offered_per_s(),
            self.node_fetches_per_s() / 1e3,
            self.node_fetches,
            self.secs,
            self.node_fetches_per_sid(),
            a.fetches,
            a.not_found,
            a.negative_hits,
            a.throttled,
            a.bank_unavailable,
        )
    }
}

/// Reads each of `sids` through `sessions`, read i due at i / `rate` s
/// (a read that falls behind is not waited for, so the pace catches up),
/// at most 3 × the paced time. Every answer must be a miss.
fn paced_reads(sessions: &Sessions, sids: &[Sid], rate: u64) -> Result<(u64, f64), BoxError> {
    let limit = Duration::from_secs_f64(3.0 * sids.len() as f64 / rate as f64);
    let start = Instant::now();
    let mut reads = 0;
    for (i, &sid) in sids.iter().enumerate() {
        let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else if now - start > limit {
            break;
        }
        match sessions.read(sid) {
            Err(HostError::NotFound | HostError::Throttled | HostError::BankUnavailable { .. }) => {
            }
            Ok(_) => return Err("a made-up SID was found".into()),
            Err(e) => return Err(format!("reading a made-up SID: {e}").into()),
        }
        reads += 1;
    }
    Ok((reads, start.elapsed().as_secs_f64()))
}

fn forged_pass(bank: &Bank, sessions: &Sessions, sids: &[Sid]) -> Result<Pass, BoxError> {
    let (nodes, stats) = (bank.counter("fetches")?, sessions.stats());
    let (reads, secs) = paced_reads(sessions, sids, FORGED_RATE)?;
    Ok(Pass {
        reads,
        secs,
        node_fetches: bank.counter("fetches")? - nodes,
        answers: Answers::between(&stats, &sessions.stats()),
    })
}

/// A fresh host: a pass of new made-up SIDs, then their replay.
fn forged_round(bank: &Bank, round: usize) -> Result<(Pass, Pass), BoxError> {
    let h = host(
        bank,
        &format!("forged-{round}"),
        21 + round as u64,
        1024,
        false,
    )?;
    let sessions = &h.get().0;
    let n = FORGED_RATE * FORGED_PASS.as_secs();
    let sids: Vec<Sid> = random_sids(n as usize, 0xF0_2CED ^ round as u64)
        .into_iter()
        .map(Sid)
        .collect();
    let first = forged_pass(bank, sessions, &sids)?;
    let replay = forged_pass(bank, sessions, &sids)?;
    Ok((first, replay))
}

/// `forged`: node load under made-up SIDs at 10k/s, and under their replay.
pub fn forged(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let bank = Bank::start(3, 2)?;
    let mut rounds = Vec::new();
    for r in 0..FORGED_ROUNDS[usize::from(!run.quick)] {
        let (first, replay) = forged_round(&bank, r)?;
        println!("forged round {r}: {}", first.line());
        println!("forged round {r} replay: {}", replay.line());
        rounds.push((first, replay));
    }
    let med = |f: &dyn Fn(&(Pass, Pass)) -> f64| Stat::new(rounds.iter().map(f).collect()).median();
    let (fetch_rate, per_sid) = (
        med(&|r| r.0.node_fetches_per_s()),
        med(&|r| r.0.node_fetches_per_sid()),
    );
    let (replay_rate, replay_per_sid) = (
        med(&|r| r.1.node_fetches_per_s()),
        med(&|r| r.1.node_fetches_per_sid()),
    );
    let line = format!(
        "offered={:.0}/s node_fetches={:.2}k/s throttled={:.0} not_found={:.0}; replay of the same SIDs: node_fetches={:.2}k/s negative_hits={:.0} throttled={:.0} not_found={:.0}",
        med(&|r| r.0.offered_per_s()),
        fetch_rate / 1e3,
        med(&|r| r.0.answers.throttled as f64),
        med(&|r| r.0.answers.not_found as f64),
        replay_rate / 1e3,
        med(&|r| r.1.answers.negative_hits as f64),
        med(&|r| r.1.answers.throttled as f64),
        med(&|r| r.1.answers.not_found as f64),
    );
    println!("forged: {line}");
    rep.note(format!(
        "forged SIDs, {} s at {FORGED_RATE}/s against 3 nodes (R = 2), default miss limits, median of {} round(s): {line}",
        FORGED_PASS.as_secs(),
        rounds.len(),
    ));
    rep.ratio("forged_node_fetches_per_sid", per_sid);
    rep.ratio("forged_replay_node_fetches_per_sid", replay_per_sid);
    rep.ratio("forged_node_fetches_per_s", fetch_rate);
    Ok(())
}

/// `durability`: update latency with `Local` and with `Replicated`.
pub fn durability(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let bank = Bank::start(2, 2)?;
    let h = host(&bank, "durability", 31, DURABLE_SESSIONS * 2, true)?;
    let sessions = &h.get().0;
    let sids = (0..DURABLE_SESSIONS)
        .map(|i| sessions.create(NewSession::default(), &[("cart", &i.to_le_bytes())]))
        .collect::<Result<Vec<_>, _>>()?;
    // The first full records acked, so the blocks measure deltas.
    for &sid in &sids {
        sessions.wait_replicated(sid, 1, Duration::from_secs(10))?;
    }
    let ops = [Op::Set {
        key: "cart".into(),
        value: vec![b'c'; SET_BYTES],
    }];
    let block = DURABLE_BLOCK[usize::from(!run.quick)];
    let replicated = Durability::Replicated {
        timeout: REPLICATED_TIMEOUT,
    };
    let mut rng = fastrand::Rng::with_seed(0xD0_4AB1E);
    let mut samples = [Samples::default(), Samples::default()];
    let mut timeouts = 0u64;
    for _ in 0..ROUNDS {
        for (durability, samples) in [Durability::Local, replicated]
            .into_iter()
            .zip(&mut samples)
        {
            let start = Instant::now();
            let mut i = 0;
            while i < block && start.elapsed() < DURABLE_BLOCK_TIME {
                let sid = sids[rng.usize(..sids.len())];
                let t0 = Instant::now();
                match sessions.update(sid, &ops, durability) {
                    Ok(_) => {}
                    Err(HostError::NotReplicated { .. }) => timeouts += 1,
                    Err(e) => return Err(e.into()),
                }
                samples.record(t0.elapsed().as_nanos() as u64);
                i += 1;
            }
            // What a `Local` block left for the replicator is shipped before
            // the next block starts.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let [local, repl] = samples;
    let us = |s: &Samples, q: f64| s.quantile(q) as f64 / 1e3;
    let line = format!(
        "Local p50 {:.1} µs p99 {:.1} µs; Replicated{{{} s}} p50 {:.1} µs p99 {:.1} µs; Replicated adds p50 {:.1} µs, p99 {:.1} µs ({} + {} updates, {timeouts} timed out)",
        us(&local, 0.5),
        us(&local, 0.99),
        REPLICATED_TIMEOUT.as_secs(),
        us(&repl, 0.5),
        us(&repl, 0.99),
        us(&repl, 0.5) - us(&local, 0.5),
        us(&repl, 0.99) - us(&local, 0.99),
        local.len(),
        repl.len(),
    );
    println!("durability: {line}");
    rep.note(format!(
        "durability, one 32 B `Set` per update, random session of {DURABLE_SESSIONS}, host + replicator + 2 nodes (R = 2) on this machine: {line}"
    ));
    rep.ratio("local_p50_us", us(&local, 0.5));
    rep.ratio("local_p99_us", us(&local, 0.99));
    rep.ratio("replicated_p50_us", us(&repl, 0.5));
    rep.ratio("replicated_p99_us", us(&repl, 0.99));
    Ok(())
}
