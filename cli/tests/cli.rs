//! `sessio inspect` and `sessio stats` against a real arena created here.

mod common;

use common::TestArena;
use std::process::{Command, Output};

use serde_json::Value;
use sessio_engine::{NewSession, Op, Sid};

const BIN: &str = env!("CARGO_BIN_EXE_sessio");

fn sessio(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run sessio")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Two sessions: one with a cart and a history, one with only a user.
fn shop(a: &TestArena) -> (Sid, Sid) {
    let cart = a
        .get()
        .create(NewSession::default(), &[("user", b"ada")])
        .unwrap();
    for item in ["add apple 3", "add bread 1"] {
        a.get()
            .update(
                cart,
                &[
                    Op::Set {
                        key: format!("cart:{}", item.split(' ').nth(1).unwrap()),
                        value: item.split(' ').nth(2).unwrap().as_bytes().to_vec(),
                    },
                    Op::Append {
                        key: "history".into(),
                        item: item.as_bytes().to_vec(),
                        max_items: 8,
                    },
                ],
            )
            .unwrap();
    }
    let other = a
        .get()
        .create(NewSession::default(), &[("user", b"bob")])
        .unwrap();
    (cart, other)
}

#[test]
fn inspect_lists_sessions_with_versions_and_attributes() {
    let a = TestArena::new("cli-list", 64);
    let (cart, other) = shop(&a);

    let text = stdout(&sessio(&["inspect", "--arena", &a.name]));
    assert!(
        text.starts_with(&format!("arena {}: 2 sessions", a.name)),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&cart.to_string()))
        .unwrap_or_else(|| panic!("no row for {cart}: {text}"));
    let f: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((f[1], f[2]), ("3", "1"), "{row}");
    assert!(
        row.contains("cart:apple(1 B)") && row.contains("user(3 B)"),
        "{row}"
    );
    assert!(text.contains(&other.to_string()), "{text}");

    let json: Value =
        serde_json::from_str(&stdout(&sessio(&["inspect", "--arena", &a.name, "--json"]))).unwrap();
    assert_eq!(json["sessions_total"], 2);
    let s = json["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sid"] == cart.to_string())
        .unwrap();
    assert_eq!(
        (s["version"].as_u64(), s["epoch"].as_u64()),
        (Some(3), Some(1))
    );
    let keys: Vec<&str> = s["attrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["cart:apple", "cart:bread", "history", "user"]);

    // --limit bounds the listing and says what it left out.
    let text = stdout(&sessio(&["inspect", "--arena", &a.name, "--limit", "1"]));
    assert!(text.contains("... 1 more"), "{text}");
}

#[test]
fn inspect_shows_one_session() {
    let a = TestArena::new("cli-one", 64);
    let (cart, _) = shop(&a);
    let sid = cart.to_string();

    let text = stdout(&sessio(&["inspect", "--arena", &a.name, "--sid", &sid]));
    assert!(text.contains("version 3  epoch 1  checksum ok"), "{text}");
    assert!(text.contains("acked by no replica"), "{text}");
    assert!(text.contains("cart:apple  1 B  \"3\""), "{text}");
    assert!(
        text.contains("history  ") && text.contains("list [\"add apple 3\", \"add bread 1\"]"),
        "{text}"
    );

    a.get().mark_acked(cart, 4, 3).unwrap();
    let json: Value = serde_json::from_str(&stdout(&sessio(&[
        "inspect", "--arena", &a.name, "--sid", &sid, "--json",
    ])))
    .unwrap();
    assert_eq!(json["sid"], sid);
    assert_eq!(json["version"], 3);
    assert_eq!(json["checksum_ok"], true);
    assert_eq!(json["acked"][0]["node"], 4);
    let user = json["attrs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "user")
        .unwrap();
    assert_eq!(
        (user["utf8"].as_str(), user["hex"].as_str()),
        (Some("ada"), Some("616461"))
    );
}

#[test]
fn stats_reports_the_arena_counters() {
    let a = TestArena::new("cli-stats", 64);
    shop(&a);
    let text = stdout(&sessio(&["stats", "--arena", &a.name]));
    assert!(text.contains("live sessions      2 of 64"), "{text}");
    assert!(text.contains("created_total      2"), "{text}");

    let json: Value =
        serde_json::from_str(&stdout(&sessio(&["stats", "--arena", &a.name, "--json"]))).unwrap();
    let s = a.get().stats();
    assert_eq!(json["live"], 2);
    assert_eq!(json["capacity"], s.capacity);
    assert_eq!(json["mapped_bytes"], s.mapped_bytes);
    // This test's handle and the tool's own.
    assert_eq!(json["handles"], 2);
    // What memory costs, per live session too.
    let m = &json["memory"];
    assert_eq!(m["live"], 2);
    assert_eq!(m["mapped_bytes"], s.mapped_bytes);
    assert!(
        m["reserved_bytes"].as_u64().unwrap() >= s.mapped_bytes,
        "{m}"
    );
    let in_use = m["heap_in_use_bytes"].as_u64().unwrap();
    assert!(in_use >= 2 * 64, "{m}");
    assert_eq!(m["per_session"]["heap_in_use_bytes"], in_use.div_ceil(2));
    assert!(
        m["classes"].as_array().is_some_and(|c| !c.is_empty()),
        "{m}"
    );
    assert!(text.contains("heap in use"), "{text}");
    assert!(text.contains("per live session"), "{text}");
}

/// The tools read an arena another user owns, and say so on stderr.
#[test]
fn stats_of_an_arena_another_user_owns_warns() {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to create a file another user owns (CI runs as root)"
    );
    let a = TestArena::new("cli-foreign", 64);
    shop(&a);
    let path = std::path::PathBuf::from(format!("/dev/shm/sessio-{}", a.name));
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let o = sessio(&["stats", "--arena", &a.name]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("live sessions      2 of 64"), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("owned by uid 65534"),
        "{err}"
    );
}

#[test]
fn missing_arena_or_session_is_a_clear_error() {
    let name = format!("cli-missing-{}", std::process::id());
    for args in [
        vec!["inspect", "--arena", &name],
        vec!["stats", "--arena", &name, "--json"],
    ] {
        let o = sessio(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(o.stdout.is_empty(), "{args:?} printed to stdout");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("cannot open arena \"{name}\"")) && err.contains("no arena"),
            "{args:?}: {err}"
        );
    }

    let a = TestArena::new("cli-nosid", 64);
    let absent = Sid::random().to_string();
    let o = sessio(&["inspect", "--arena", &a.name, "--sid", &absent]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&absent) && err.contains("no such session"),
        "{err}"
    );

    let o = sessio(&["inspect", "--arena", &a.name, "--sid", "nope"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad SID \"nope\""));
}

/// Writes `text` to `dir/name`, readable by its owner only (as a secret
/// must be).
fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A child killed and reaped on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `sessio ARGS` and reads stdout lines until every prefix in
/// `want` was seen; returns the first word after each.
fn spawn_until(args: &[&str], want: &[&str]) -> (Proc, Vec<String>) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let proc = Proc(child);
    let mut found = vec![String::new(); want.len()];
    while found.iter().any(String::is_empty) {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{args:?} exited before printing {want:?}"))
            .unwrap();
        for (i, w) in want.iter().enumerate() {
            if let Some(rest) = line.strip_prefix(w) {
                found[i] = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (proc, found)
}

/// `GET path` over HTTP/1.1: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape_until(addr: &str, what: &[&str]) -> String {
    let t = std::time::Instant::now();
    loop {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if what.iter().all(|w| body.contains(w)) {
            return body;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "metrics never showed {what:?}:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn node_and_agent_run_from_config_files_and_serve_metrics() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "bank.key", &"42".repeat(32));
    let node_cfg = write(
        &dir,
        "node.toml",
        "listen = \"127.0.0.1:0\"\nnode_id = 1\nsecret_file = \"bank.key\"\nmetrics_addr = \"127.0.0.1:0\"\n",
    );
    let (_node, got) = spawn_until(
        &["node", "--config", node_cfg.to_str().unwrap()],
        &["metrics ", "listening "],
    );
    let (node_metrics, node_addr) = (got[0].clone(), got[1].clone());
    scrape_until(
        &node_metrics,
        &[
            "sessio_node_up{node=\"1\"} 1",
            "sessio_node_sessions{node=\"1\"} 0",
        ],
    );
    assert_eq!(
        http_get(&node_metrics, "/other").0,
        "HTTP/1.1 404 Not Found"
    );

    let a = TestArena::new("cli-agent", 64);
    shop(&a);
    let agent_cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "arena = \"{}\"\nnodes = [\"1={node_addr}\"]\nsecret_file = \"bank.key\"\nreplicas = 1\nhost_id = 9\nstats_interval_ms = 0\nmetrics_addr = \"127.0.0.1:0\"\n",
            a.name
        ),
    );
    let (_agent, got) = spawn_until(
        &["agent", "--config", agent_cfg.to_str().unwrap()],
        &["metrics "],
    );
    let body = scrape_until(
        &got[0],
        &[
            "sessio_replicator_node_up{node=\"1\"} 1",
            "sessio_replicator_dirty_sessions 0",
        ],
    );
    assert!(
        body.contains("# TYPE sessio_replicator_node_applied_total counter"),
        "{body}"
    );
    // Both sessions reached the node.
    scrape_until(&node_metrics, &["sessio_node_sessions{node=\"1\"} 2"]);
}

#[test]
fn config_errors_name_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "bank.key", &"42".repeat(32));
    let cases: [(&str, &str, &str, &[&str]); 5] = [
        (
            "node",
            "n1.toml",
            "node_id = 1\nnod_id = 2\n",
            &["nod_id", "line 2"],
        ),
        (
            "node",
            "n2.toml",
            "node_id = \"one\"\n",
            &["node_id", "u16"],
        ),
        (
            "node",
            "n3.toml",
            "node_id = 1\nsecret_file = \"bank.key\"\n",
            &["--listen is required", "`listen`"],
        ),
        (
            "agent",
            "a1.toml",
            "arena = \"x\"\nnodes = 5\n",
            &["nodes", "id=ip:port"],
        ),
        (
            "agent",
            "a2.toml",
            "arena = \"x\"\nflush_interval = 5\n",
            &["flush_interval"],
        ),
    ];
    for (cmd, name, text, want) in cases {
        let path = write(&dir, name, text);
        let o = sessio(&[cmd, "--config", path.to_str().unwrap()]);
        assert!(!o.status.success(), "{cmd} {text:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        for w in want {
            assert!(err.contains(w), "{cmd} {text:?}: {err}");
        }
    }
    let o = sessio(&["node", "--config", "/nonexistent/node.toml"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("config /nonexistent/node.toml"));
}

/// A config path that is a device or a FIFO is refused at once: `/dev/zero`
/// used to grow the process without bound, and a FIFO with no writer to
/// hang it.
#[test]
fn a_config_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("node.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in ["/dev/zero", fifo.to_str().unwrap()] {
        let mut child = std::process::Command::new(BIN)
            .args(["node", "--config", path])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("sessio node --config {path} did not return within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{path}: {err}");
        assert!(err.contains("not a regular file"), "{path}: {err}");
    }
}

/// A node whose connection cap cannot fit the hard limit on open files
/// refuses to start and says which limit; one that fits after raising its
/// soft limit starts.
#[test]
fn a_node_fits_its_connection_cap_to_the_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let key = write(&dir, "bank.key", &"42".repeat(32));
    let run = |cap: &str, soft: u64, hard: u64| {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "node",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "1",
            "--secret-file",
            key.to_str().unwrap(),
            "--connections-max",
            cap,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; it runs in the child
        // between fork and exec and touches only the struct given.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    };
    let out = run("1024", 512, 512).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hard limit is 512"), "{err}");
    // Fits once the soft limit is raised to the hard one: it serves.
    let mut child = run("1024", 256, 4096);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening "), "{line:?}");
}
