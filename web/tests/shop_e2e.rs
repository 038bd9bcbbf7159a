//! The shop end to end in its quick mode (real nodes, hosts of worker
//! processes, nginx, wrk, a host killed mid-run), then once more with a
//! fault injected, to see the check fail when it should. Needs nginx and
//! wrk (Debian: nginx-light, wrk); fails loudly without them.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shop-e2e"))
        .args(args)
        .output()
        .expect("shop-e2e runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| l.starts_with("shop-e2e: ok") || l.starts_with("shop-e2e: FAILED"))
        .unwrap_or_default()
}

#[test]
fn the_shop_survives_a_host_kill_and_the_check_catches_a_lost_bank() {
    let (ok, text) = run(&["--quick"]);
    let line = last_line(&text);
    assert!(ok && line.starts_with("shop-e2e: ok"), "{text}");
    assert!(line.contains("lost_replicated_items=0"), "{line}");
    assert!(!line.contains("failovers=0 "), "{line}");

    // The bank forgets everything when the host dies: the run must fail.
    let (ok, text) = run(&["--quick", "--duration-s", "8", "--fault", "bank-amnesia"]);
    let line = last_line(&text);
    assert!(!ok, "a run that lost the bank passed: {text}");
    assert!(line.starts_with("shop-e2e: FAILED"), "{text}");
    assert!(line.contains("durable items lost"), "{line}");
    // Nothing is left behind either way.
    let leftovers: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("-h1") && n.starts_with("sessio-e2e"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "arenas left behind: {leftovers:?}");
}
