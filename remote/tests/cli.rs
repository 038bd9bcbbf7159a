//! `sessio inspect` and `sessio stats` against a real arena created here.

use std::process::{Command, Output};

use serde_json::Value;
use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op, Sid};

const BIN: &str = env!("CARGO_BIN_EXE_sessio");

/// An arena removed on drop.
struct TestArena {
    name: String,
    loc: Location,
    arena: Option<Arena>,
}

impl TestArena {
    fn new(tag: &str) -> TestArena {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let loc = Location::Shm(name.clone());
        let arena = Arena::open(&loc, &ArenaConfig::for_sessions(64, 1024)).unwrap();
        TestArena {
            name,
            loc,
            arena: Some(arena),
        }
    }

    fn get(&self) -> &Arena {
        self.arena.as_ref().unwrap()
    }
}

impl Drop for TestArena {
    fn drop(&mut self) {
        self.arena = None;
        let _ = Arena::remove(&self.loc);
    }
}

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
    let a = TestArena::new("list");
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
    let a = TestArena::new("one");
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
    let a = TestArena::new("stats");
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

    let a = TestArena::new("nosid");
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
