//! Crash safety with real processes: workers share sessions in one arena,
//! the driver kills them with SIGKILL at random moments, and afterwards the
//! invariants of `docs/ARCHITECTURE.md` are checked:
//!
//! - every update whose `update()` returned Ok is applied exactly once, and
//!   each worker's updates appear in its program order;
//! - no reader ever sees a torn record (workers verify checksums);
//! - survivors never hang: after a death they go on within a bounded time;
//! - a file-backed arena whose processes all died reopens with every
//!   session intact, and recovery gives leaked capacity back.
//!
//! `SESSIO_KILLS=N` sets the number of kills of the random-kill test
//! (default 200); `SESSIO_KILLS=5000` is a good long local run.

use sessio_engine::session::append_items;
use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, SessionError, Sid};
use std::io::Write;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const SIDS: usize = 4;
const WORKERS: usize = 3;
/// Kills per round of the random-kill test; each round is checked on its
/// own, so sessions do not outgrow their quota however long the run.
const ROUND: usize = 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        worker(&args[2..]);
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests: [(&str, fn()); 3] = [
        ("exact_under_contention", exact_under_contention),
        ("random_kills", random_kills),
        ("kill_all_then_reopen_file", kill_all_then_reopen_file),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        if std::panic::catch_unwind(f).is_ok() {
            passed += 1;
            println!(
                "test {name} ... ok ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
        } else {
            failed += 1;
            println!("test {name} ... FAILED");
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

// ----- the worker process -------------------------------------------------

/// `worker <arena path> <id> <events> <ack file> <sid>...`: appends event k
/// to session `sids[k % n]` under key `w<id>` and bumps that session's
/// `total`; after each Ok it writes `k` to the ack file. It verifies the
/// checksum of a record it reads every few events, and now and then creates
/// and invalidates a session of its own, to be killed inside those too.
fn worker(args: &[String]) {
    let loc = Location::File(args[0].clone().into());
    let id: u32 = args[1].parse().unwrap();
    let events: u32 = args[2].parse().unwrap();
    let mut acks = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&args[3])
        .unwrap();
    let sids: Vec<Sid> = args[4..].iter().map(|s| s.parse().unwrap()).collect();
    let arena = Arena::open_existing(&loc).unwrap();
    let key = format!("w{id}");
    for k in 0..events {
        let sid = sids[k as usize % sids.len()];
        let ops = [
            Op::Append {
                key: key.clone(),
                item: k.to_le_bytes().to_vec(),
                max_items: 4096,
            },
            Op::Incr {
                key: "total".into(),
                by: 1,
            },
        ];
        arena.update(sid, &ops).unwrap();
        writeln!(acks, "{k}").unwrap();
        if k % 4 == 0 {
            let g = arena.read(sids[(k as usize / 4) % sids.len()]).unwrap();
            if !g.verify() {
                eprintln!("worker {id}: torn record seen");
                std::process::exit(3);
            }
        }
        if k % 16 == 0 {
            let own = arena
                .create(NewSession::default(), &[("tmp", b"x")])
                .unwrap();
            arena
                .update(
                    own,
                    &[Op::Set {
                        key: "tmp".into(),
                        value: vec![1; 200],
                    }],
                )
                .unwrap();
            arena.invalidate(own).unwrap();
        }
    }
}

struct Worker {
    id: u32,
    child: Child,
    acks: std::path::PathBuf,
}

fn spawn(
    path: &std::path::Path,
    dir: &std::path::Path,
    id: u32,
    events: u32,
    sids: &[Sid],
) -> Worker {
    let acks = dir.join(format!("ack-{id}"));
    let child = Command::new(std::env::current_exe().unwrap())
        .arg("worker")
        .arg(path)
        .arg(id.to_string())
        .arg(events.to_string())
        .arg(&acks)
        .args(sids.iter().map(ToString::to_string))
        .spawn()
        .expect("spawn worker");
    Worker { id, child, acks }
}

/// SIGKILL (std's `kill` sends it, and never to a reaped PID), then checks
/// the worker either died of it or had finished cleanly.
fn kill9(w: &mut Worker) {
    use std::os::unix::process::ExitStatusExt;
    let _ = w.child.kill();
    let status = w.child.wait().unwrap();
    assert!(
        status.code() != Some(3),
        "worker {} saw a torn record",
        w.id
    );
    assert!(
        status.signal() == Some(libc::SIGKILL) || status.success(),
        "worker {} failed: {status}",
        w.id
    );
}

fn acked(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

struct Scratch {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sessio-crash-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The arena itself lives in /dev/shm: file-backed mode over tmpfs is
        // still a named file whose handles can all die.
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/sessio-crash-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Scratch { dir, path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn config() -> ArenaConfig {
    // A kill -9 in the middle of a combine leaks that combine's new copy
    // until the next solo open recovers it (docs/ARCHITECTURE.md); the heap
    // is sized for thousands of kills of big records. Pages are touched
    // only as used.
    ArenaConfig {
        capacity: 256,
        heap_bytes: 512 << 20,
        quota_bytes: 256 * 1024,
        huge_pages: sessio_engine::HugePages::Off,
    }
}

fn setup(s: &Scratch) -> (Arena, Vec<Sid>) {
    let arena = Arena::open(&Location::File(s.path.clone()), &config()).unwrap();
    let sids = (0..SIDS)
        .map(|_| arena.create(NewSession::default(), &[]).unwrap())
        .collect();
    (arena, sids)
}

/// Checks the final state against the workers' ack logs.
fn check(arena: &Arena, sids: &[Sid], workers: &[(u32, std::path::PathBuf)]) {
    // Whatever a killed worker left queued is applied by the next update.
    for &sid in sids {
        arena.update(sid, &[Op::Touch]).unwrap();
    }
    for (j, &sid) in sids.iter().enumerate() {
        let g = arena.read(sid).unwrap();
        assert!(g.verify(), "final record of session {j} fails its checksum");
        let mut events = 0u64;
        for (id, ack_path) in workers {
            let seen: Vec<u32> = g
                .get(&format!("w{id}"))
                .map(|v| {
                    append_items(v)
                        .unwrap()
                        .iter()
                        .map(|b| u32::from_le_bytes((*b).try_into().unwrap()))
                        .collect()
                })
                .unwrap_or_default();
            events += seen.len() as u64;
            // Exactly the worker's events for this session, in its order,
            // with no gap: k = j, j + n, j + 2n, ...
            for (pos, &k) in seen.iter().enumerate() {
                assert_eq!(
                    k as usize,
                    j + pos * sids.len(),
                    "worker {id} session {j}: events {seen:?}"
                );
            }
            let acked_here: Vec<u32> = acked(ack_path)
                .into_iter()
                .filter(|k| *k as usize % sids.len() == j)
                .collect();
            // Every acknowledged event is there; at most one more (the one
            // in flight when the worker died) may be too.
            assert!(
                seen.len() >= acked_here.len(),
                "worker {id} session {j}: acked {} but applied {}",
                acked_here.len(),
                seen.len()
            );
            assert!(
                seen.len() <= acked_here.len() + 1,
                "worker {id} session {j}: applied {} but acked {}",
                seen.len(),
                acked_here.len()
            );
        }
        let total = i64::from_le_bytes(g.get("total").unwrap_or(&[0; 8]).try_into().unwrap());
        assert_eq!(
            total as u64, events,
            "session {j}: counter disagrees with the events"
        );
    }
}

// ----- the tests ----------------------------------------------------------

fn exact_under_contention() {
    let s = Scratch::new("exact");
    let (arena, sids) = setup(&s);
    let mut ws: Vec<Worker> = (0..WORKERS as u32)
        .map(|id| spawn(&s.path, &s.dir, id, 3000, &sids))
        .collect();
    for w in &mut ws {
        assert!(w.child.wait().unwrap().success(), "worker {} failed", w.id);
    }
    let logs: Vec<_> = ws.iter().map(|w| (w.id, w.acks.clone())).collect();
    check(&arena, &sids, &logs);
    for (_, p) in &logs {
        assert_eq!(acked(p).len(), 3000);
    }
}

fn random_kills() {
    let kills: usize = std::env::var("SESSIO_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = Scratch::new("kills");
    let (arena, sids) = setup(&s);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut next_id = 0u32;
    let events = 4000 * SIDS as u32; // stays under the append bound per session
    let mut total_acked = 0;
    let mut done = 0;
    while done < kills {
        let mut live: Vec<Worker> = Vec::new();
        let mut logs = Vec::new();
        for _ in 0..WORKERS {
            live.push(spawn(&s.path, &s.dir, next_id, events, &sids));
            logs.push((next_id, live.last().unwrap().acks.clone()));
            next_id += 1;
        }
        for k in 0..ROUND.min(kills - done) {
            std::thread::sleep(Duration::from_micros(rng.below(15_000)));
            let victim = rng.below(live.len() as u64) as usize;
            let mut w = live.swap_remove(victim);
            kill9(&mut w);
            if k % 10 == 0 {
                // Survivors go on within a bounded time after the death.
                for w in &mut live {
                    let before = acked(&w.acks).len();
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        if acked(&w.acks).len() > before {
                            break;
                        }
                        if let Some(status) = w.child.try_wait().unwrap() {
                            // It finished all its events before we looked.
                            assert!(status.success(), "worker {} failed: {status}", w.id);
                            break;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "worker {} made no progress for 5 s after a kill",
                            w.id
                        );
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
            live.push(spawn(&s.path, &s.dir, next_id, events, &sids));
            logs.push((next_id, live.last().unwrap().acks.clone()));
            next_id += 1;
            done += 1;
        }
        for mut w in live {
            kill9(&mut w);
        }
        check(&arena, &sids, &logs);
        for (_, p) in &logs {
            total_acked += acked(p).len();
        }
        // Start the next round from empty event lists.
        for &sid in &sids {
            let mut ops: Vec<Op> = logs
                .iter()
                .map(|(id, _)| Op::Remove {
                    key: format!("w{id}"),
                })
                .collect();
            ops.push(Op::Set {
                key: "total".into(),
                value: 0i64.to_le_bytes().to_vec(),
            });
            arena.update(sid, &ops).unwrap();
        }
    }
    assert!(
        total_acked > kills,
        "the workers did too little work to test anything ({total_acked} acks)"
    );
    let logs: Vec<(u32, std::path::PathBuf)> = Vec::new();
    drop(arena);
    let arena = Arena::open_existing(&Location::File(s.path.clone())).unwrap();
    let report = arena.recovery_report().expect("opened alone").clone();
    // The shared sessions, plus the temporary ones of workers killed
    // between their create and their invalidate (an invalidate that was
    // queued when its worker died is applied by recovery, hence `<=`).
    let all = arena.sids();
    assert!(all.len() as u64 <= report.sessions, "{report:?}");
    let temporary = all
        .iter()
        .filter(|s| arena.read(**s).unwrap().get("tmp").is_some())
        .count();
    assert_eq!(all.len(), SIDS + temporary, "{report:?}");
    assert!(temporary <= next_id as usize);
    // Blocks lost by kills land only in the few instructions between an
    // allocation and linking it; a combiner's half-built record is resolved
    // by whoever takes its lock, and chunks are carved a block at a time.
    assert!(report.leaked_blocks <= kills as u64 / 4, "{report:?}");
    assert_eq!(report.corrupt_records, 0);
    check(&arena, &sids, &logs);
    for sid in all {
        arena.invalidate(sid).unwrap();
    }
    let cap = config().capacity;
    let created: Vec<Sid> = (0..cap)
        .map(|_| {
            arena
                .create(NewSession::default(), &[("v", &[1; 1000])])
                .unwrap()
        })
        .collect();
    assert!(matches!(
        arena.create(NewSession::default(), &[]),
        Err(SessionError::Full(_))
    ));
    assert_eq!(created.len() as u64, cap);
    println!(
        "  {kills} kills, {next_id} workers, {total_acked} acknowledged updates, recovery: {report:?}"
    );
}

fn kill_all_then_reopen_file() {
    let s = Scratch::new("reopen");
    let (arena, sids) = setup(&s);
    drop(arena);
    let mut logs = Vec::new();
    for round in 0..5u32 {
        let mut ws: Vec<Worker> = (0..WORKERS as u32)
            .map(|i| spawn(&s.path, &s.dir, round * 10 + i, 16_000, &sids))
            .collect();
        for w in &ws {
            logs.push((w.id, w.acks.clone()));
        }
        std::thread::sleep(Duration::from_millis(30 + 20 * u64::from(round)));
        for w in &mut ws {
            kill9(w);
        }
        // Every process is dead: reopening alone validates and repairs.
        let arena = Arena::open_existing(&Location::File(s.path.clone())).unwrap();
        let report = arena.recovery_report().expect("opened alone").clone();
        assert_eq!(report.corrupt_records, 0, "{report:?}");
        check(&arena, &sids, &logs);
    }
}

/// xorshift: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
