//! The second process of the two-process update bench: opens an existing
//! arena, says `ready`, waits for `go` on stdin, applies `count` updates of
//! one `Op::Incr` to one session, and prints `done <ns>`.
//!
//! Usage: `update_worker <arena name> <sid hex> <count> <counter key>`

use sessio_engine::{Arena, Location, Op, Sid};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, sid, count, key] = args.as_slice() else {
        return Err("usage: update_worker <arena name> <sid hex> <count> <counter key>".into());
    };
    let sid: Sid = sid.parse()?;
    let count: u64 = count.parse()?;
    let arena = Arena::open_existing(&Location::Shm(name.clone()))?;
    let ops = [Op::Incr {
        key: key.clone(),
        by: 1,
    }];
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "go" {
        return Err(format!("expected `go`, got {line:?}").into());
    }
    let t = Instant::now();
    for _ in 0..count {
        arena.update(sid, &ops)?;
    }
    writeln!(out, "done {}", t.elapsed().as_nanos())?;
    out.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("update_worker: {e}");
            ExitCode::FAILURE
        }
    }
}
