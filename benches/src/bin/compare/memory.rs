//! `memory`: bytes per session, the host arena, a replica node and Redis,
//! on the same data in the same run.
//!
//! The workload: N sessions of the 8 benchmark attributes × 100 B, then
//! [`UPDATE_ROUNDS`] rounds of one 100 B `Set` on every session (round r
//! sets attribute r). Measured after creation and after each round:
//!
//! - the host arena (`Arena::memory`, every free list walked): bytes
//!   mapped (what creation reserves on `/dev/shm`), touched (pages in core,
//!   `mincore`: the working set) and heap blocks in use;
//! - a replica node, R = 1: a child process holding the node's own store
//!   (`sessio_remote::Store`), fed what the replicator sends (the whole
//!   record first, then op deltas); its anonymous RSS over its baseline;
//! - `redis-server`: one hash of the 8 fields per session, `HSET` of one
//!   field per round; `used_memory` and `used_memory_rss` over the empty
//!   server's.
//!
//! Bytes are counted once (no rounds of medians): they do not jitter as
//! times do. The host is also measured at every size of [`SIZES`], to show
//! whether its overhead grows with the arena.

use std::process::Command;

use sessio_benches::{KEYS, VALUE_BYTES, arena_config, session_values};
use sessio_engine::session::{SessionData, encode_ops, encode_session};
use sessio_engine::{Arena, HugePages, Location, NewSession, Op};
use sessio_net::{AckStatus, Delta, DeltaBatch, DeltaEntry};

use crate::peers::{PeerProcess, Reply, Resp};
use crate::report::Report;
use crate::{BoxError, Run, redis_hash_key, short_count};

/// Sessions of the host curve; the largest that fits the run is also where
/// the three sides are compared.
const SIZES: [u64; 3] = [10_000, 100_000, 1_000_000];
/// Rounds of one `Set` on every session.
const UPDATE_ROUNDS: usize = 3;
/// Entries per batch fed to the node's store, and per Redis pipeline.
const BATCH: usize = 256;
/// The hidden argument that makes this binary the node's child process.
pub const NODE_CHILD_ARG: &str = "--memory-node-child";

/// Bytes per session after creation and after each update round.
type Phases = [u64; UPDATE_ROUNDS + 1];

/// The host arena's figures at one size.
struct HostPoint {
    mapped: u64,
    /// Heap chunks touched after the last round, and in all.
    chunks: (u64, u64),
    touched: Phases,
    heap: Phases,
}

fn per(bytes: u64, n: u64) -> u64 {
    bytes.div_ceil(n)
}

fn set_op(round: usize) -> Op {
    Op::Set {
        key: KEYS[round % KEYS.len()].to_string(),
        value: vec![b'A' + round as u8; VALUE_BYTES],
    }
}

fn host_point(n: u64) -> Result<HostPoint, BoxError> {
    let loc = Location::Shm(format!("bench-{}-compare-memory", std::process::id()));
    let _ = Arena::remove(&loc);
    let arena = Arena::open(&loc, &arena_config(n, HugePages::Off));
    let r = arena
        .map_err(BoxError::from)
        .and_then(|a| host_rounds(&a, n));
    let _ = Arena::remove(&loc);
    r
}

fn host_rounds(a: &Arena, n: u64) -> Result<HostPoint, BoxError> {
    let values = session_values(1);
    let attrs: Vec<(&str, &[u8])> = KEYS
        .iter()
        .copied()
        .zip(values.iter().map(Vec::as_slice))
        .collect();
    let mut sids = Vec::with_capacity(n as usize);
    for _ in 0..n {
        sids.push(a.create(NewSession::default(), &attrs)?);
    }
    let mut touched = [0; UPDATE_ROUNDS + 1];
    let mut heap = [0; UPDATE_ROUNDS + 1];
    let mut measure = |k: usize| {
        let m = a.memory(u64::MAX);
        touched[k] = per(m.touched_bytes.unwrap_or(0), n);
        heap[k] = per(m.heap_in_use_bytes(), n);
        (
            m.sizing.mapped_bytes,
            m.chunks_touched,
            m.sizing.heap_bytes / m.chunk_bytes,
        )
    };
    let (mapped, _, _) = measure(0);
    let mut chunks = (0, 0);
    for round in 1..=UPDATE_ROUNDS {
        let ops = [set_op(round)];
        for sid in &sids {
            a.update(*sid, &ops)?;
        }
        let (_, touched, all) = measure(round);
        chunks = (touched, all);
    }
    Ok(HostPoint {
        mapped: per(mapped, n),
        chunks,
        touched,
        heap,
    })
}

/// Redis: `(used_memory, used_memory_rss)` per session, per phase.
fn redis_point(n: u64) -> Result<(Phases, Phases), BoxError> {
    let redis = PeerProcess::redis()?;
    let mut r = Resp::connect(redis.addr)?;
    let base = (
        r.info("memory", "used_memory")?,
        r.info("memory", "used_memory_rss")?,
    );
    let (mut used, mut rss) = ([0; UPDATE_ROUNDS + 1], [0; UPDATE_ROUNDS + 1]);
    let mut measure = |r: &mut Resp, k: usize| -> Result<(), BoxError> {
        used[k] = per(r.info("memory", "used_memory")?.saturating_sub(base.0), n);
        rss[k] = per(
            r.info("memory", "used_memory_rss")?.saturating_sub(base.1),
            n,
        );
        Ok(())
    };
    let values = session_values(1);
    for round in 0..=UPDATE_ROUNDS {
        let update = set_op(round);
        for start in (0..n).step_by(BATCH) {
            let end = (start + BATCH as u64).min(n);
            for i in start..end {
                let k = redis_hash_key(i);
                let mut args: Vec<&[u8]> = vec![b"HSET", &k];
                match &update {
                    Op::Set { key, value } if round > 0 => {
                        args.extend([key.as_bytes(), value.as_slice()]);
                    }
                    _ => {
                        for (key, v) in KEYS.iter().zip(&values) {
                            args.extend([key.as_bytes(), v.as_slice()]);
                        }
                    }
                }
                r.queue(&args);
            }
            r.flush()?;
            for _ in start..end {
                match r.read()? {
                    Reply::Int(_) => {}
                    other => return Err(format!("HSET answered {other:?}").into()),
                }
            }
        }
        measure(&mut r, round)?;
    }
    Ok((used, rss))
}

/// The node: runs this binary as a child holding a replica store, and
/// reads the per-session RSS it prints: after each phase, then once its
/// copies went idle and were folded.
fn node_point(n: u64) -> Result<(Phases, u64), BoxError> {
    let out = Command::new(std::env::current_exe()?)
        .args([NODE_CHILD_ARG, &n.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "the node child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut v: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let idle = v.pop().ok_or("the node child printed nothing")?;
    let phases = v
        .try_into()
        .map_err(|v| format!("the node child printed {v:?}"))?;
    Ok((phases, idle))
}

/// Anonymous resident bytes of this process (`RssAnon`): the heap, not the
/// binary's mapped pages.
fn rss_anon() -> Result<u64, BoxError> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .ok_or("no RssAnon in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// The child: a replica store fed `n` sessions and the update rounds;
/// prints the bytes per session after each phase.
pub fn node_child(n: u64) -> Result<(), BoxError> {
    let mut rng = fastrand::Rng::with_seed(7);
    let sids: Vec<[u8; 16]> = (0..n).map(|_| rng.u128(..).to_le_bytes()).collect();
    let mut s = SessionData::default();
    let values = session_values(1);
    let attrs: Vec<Op> = KEYS
        .iter()
        .zip(&values)
        .map(|(k, v)| Op::Set {
            key: (*k).to_string(),
            value: v.clone(),
        })
        .collect();
    s.apply(&attrs, 0, 1 << 20).map_err(|e| format!("{e:?}"))?;
    let record = encode_session(&s).to_vec();
    let ops: Vec<Vec<u8>> = (0..=UPDATE_ROUNDS)
        .map(|r| encode_ops(&[set_op(r)]).to_vec())
        .collect();
    let base = rss_anon()?;
    let mut store = sessio_remote::Store::new(
        sessio_remote::NodeLimits {
            sessions_max: n + 1,
            bytes_max: 1 << 40,
        },
        1,
    );
    let mut out = Vec::new();
    for (round, round_ops) in ops.iter().enumerate() {
        for chunk in sids.chunks(BATCH) {
            let entries = chunk
                .iter()
                .map(|sid| DeltaEntry {
                    sid: *sid,
                    base_version: round as u64,
                    new_version: round as u64 + 1,
                    epoch: 1,
                    body: if round == 0 {
                        Delta::Full(record.clone())
                    } else {
                        Delta::Ops(round_ops.clone())
                    },
                })
                .collect();
            let ack = store.apply_batch(&DeltaBatch {
                host_id: 7,
                entries,
            });
            if ack.entries.iter().any(|e| e.status != AckStatus::Applied) {
                return Err(format!("the store refused a delta in round {round}").into());
            }
        }
        out.push(per(rss_anon()?.saturating_sub(base), n).to_string());
    }
    // Time passes with no writes: the node folds every idle copy that
    // holds pending batches (a served node does it a budget at a time,
    // every expiry interval) and gives the freed heap back, as its fold
    // pass does. (Updates that write a value of the same length go into
    // the record where it lies, and leave nothing to fold.)
    let later = sessio_engine::clock::now_ms() + sessio_remote::FOLD_IDLE_MS;
    store.fold_idle(later, sessio_remote::FOLD_IDLE_MS, usize::MAX);
    let unfolded = sids
        .iter()
        .filter(|sid| store.get(sid).is_none_or(|c| c.pending_batches() > 0))
        .count();
    if unfolded > 0 {
        return Err(format!("after the idle pass, {unfolded} of {n} copies are unfolded").into());
    }
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    out.push(per(rss_anon()?.saturating_sub(base), n).to_string());
    println!("{}", out.join(" "));
    Ok(())
}

fn show(p: &Phases) -> String {
    p.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ")
}

/// The memory workload.
pub fn memory(run: &Run, rep: &mut Report) -> Result<(), BoxError> {
    let sizes: Vec<u64> = SIZES
        .iter()
        .copied()
        .filter(|&n| n <= run.max_sessions)
        .collect();
    let mut largest = None;
    for &n in &sizes {
        let h = host_point(n)?;
        rep.note(format!(
            "memory host at {}: mapped {} B/session; touched {} B; heap in use {} B \
             (after creation / update rounds 1 / 2 / 3); heap chunks touched {} of {}",
            short_count(n),
            h.mapped,
            show(&h.touched),
            show(&h.heap),
            h.chunks.0,
            h.chunks.1
        ));
        println!(
            "memory_host_bytes_per_session n={n} mapped={} touched={} heap={}",
            h.mapped, h.touched[UPDATE_ROUNDS], h.heap[UPDATE_ROUNDS]
        );
        largest = Some((n, h));
    }
    let Some((n, h)) = largest else {
        rep.note("memory: no size fits SESSIO_BENCH_MAX_SESSIONS; skipped".into());
        return Ok(());
    };
    let (node, node_idle) = node_point(n)?;
    rep.note(format!(
        "memory node at {} (R = 1, store RSS per copy): {} B (after creation / rounds 1 / 2 / 3); \
         {node_idle} B once idle and folded",
        short_count(n),
        show(&node)
    ));
    let (used, rss) = redis_point(n)?;
    rep.note(format!(
        "memory redis at {}: used_memory {} B; RSS {} B (after creation / rounds 1 / 2 / 3)",
        short_count(n),
        show(&used),
        show(&rss)
    ));
    let last = UPDATE_ROUNDS;
    let ratio = |redis: u64, sessio: u64| redis as f64 / sessio.max(1) as f64;
    // Like with like: pages in RAM against pages in RAM.
    rep.ratio("memory_host_vs_redis", ratio(rss[last], h.touched[last]));
    rep.ratio("memory_node_vs_redis", ratio(rss[last], node[last]));
    // The same copies a second later, with no writes in between.
    rep.ratio("memory_node_idle_vs_redis", ratio(rss[last], node_idle));
    rep.ratio(
        "memory_host_heap_vs_redis_used",
        ratio(used[last], h.heap[last]),
    );
    rep.ratio("memory_host_mapped_vs_redis", ratio(rss[last], h.mapped));
    Ok(())
}
