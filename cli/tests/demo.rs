//! `sessio demo` end to end: the quick run passes its own check, and an
//! interrupted run leaves no process or file behind.

mod common;

// The demo saturates the machine: one run at a time.
use common::serial;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sessio");

/// Processes still running whose command line names this demo run (its
/// workers name its arenas, its nodes its secret file).
fn leftover_processes(demo_pid: u32) -> Vec<String> {
    let tag = format!("sessio-demo-{demo_pid}-");
    let arena = format!("demo-{demo_pid}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&tag) || cmdline.contains(&arena) {
            found.push(cmdline);
        }
    }
    found
}

/// Files this demo run left in shared memory or the temp dir.
fn leftover_files(demo_pid: u32) -> Vec<String> {
    let shm = format!("sessio-demo-{demo_pid}-");
    let mut found = Vec::new();
    for dir in [std::path::PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&shm) {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

/// Runs `sessio demo ARGS` (stderr dropped) and returns the last line of
/// its report, checked to be a failure.
fn failing_demo(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run sessio demo");
    failed_verdict(&out)
}

/// The last line of a run that must have failed, checked to say so.
fn failed_verdict(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("demo: FAILED"), "last line: {last:?}");
    last
}

#[test]
fn quick_demo_passes_its_end_to_end_check() {
    let _g = serial();
    let started = Instant::now();
    let child = Command::new(BIN)
        .args(["demo", "--quick"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sessio demo");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("demo: ok"), "last line: {last:?}");
    assert!(last.contains("lost_acked_updates=0"), "last line: {last:?}");
    assert!(out.status.success(), "exit status {:?}", out.status);
    // Every session was checked, and some moved to the surviving host.
    let field = |k: &str| -> u64 {
        last.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {last:?}"))
    };
    assert_eq!(field("checked"), field("sessions"));
    assert_eq!(field("mismatched_sessions"), 0);
    assert!(field("failovers") > 0, "{last}");
    assert!(field("updates") > 0, "{last}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "quick run took {:?}",
        started.elapsed()
    );
    assert_eq!(leftover_processes(pid), Vec::<String>::new());
    assert_eq!(leftover_files(pid), Vec::<String>::new());
}

#[test]
fn interrupted_demo_fails_and_cleans_up() {
    let _g = serial();
    let child = Command::new(BIN)
        .args(["demo", "--quick"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sessio demo");
    let pid = child.id();
    // Wait until the run is under way: its nodes and workers exist.
    let t = Instant::now();
    while leftover_processes(pid).len() < 7 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        leftover_processes(pid).len() >= 7,
        "demo did not start its 3 nodes and 4 workers"
    );
    // SAFETY: a plain syscall on our own, not yet reaped child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    let last = failed_verdict(&child.wait_with_output().unwrap());
    assert!(last.contains("interrupted"), "last line: {last:?}");
    assert_eq!(leftover_processes(pid), Vec::<String>::new());
    assert_eq!(leftover_files(pid), Vec::<String>::new());
}

#[test]
fn demo_check_catches_a_host_that_stores_wrong_values() {
    let _g = serial();
    // Host 2's workers store a wrong quantity on every 500th cart addition
    // while answering as if all were well: the run must fail.
    let last = failing_demo(&["--quick", "--duration-s", "5", "--fault-every", "500"]);
    assert!(last.contains("sessions differ"), "last line: {last:?}");
    assert!(
        !last.contains("mismatched_sessions=0 "),
        "last line: {last:?}"
    );
}

#[test]
fn demo_counts_acknowledged_updates_a_wiped_bank_lost() {
    let _g = serial();
    // Every node restarts empty right after host 1 dies: host 1's sessions,
    // acknowledged by the bank, are gone, and the run must say so.
    let last = failing_demo(&["--quick", "--duration-s", "5", "--fault-wipe-bank"]);
    assert!(
        last.contains("acknowledged updates lost"),
        "last line: {last:?}"
    );
    assert!(
        !last.contains("lost_acked_updates=0 "),
        "last line: {last:?}"
    );
}
