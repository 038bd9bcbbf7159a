//! [`SessioStore`] through the tower-sessions `SessionStore` traits (0.15,
//! and 0.14 which the published Redis store implements), against a bank of
//! real nodes on loopback and real arenas:
//!
//! - a round trip (create, load, save, delete) where a save writes exactly
//!   the keys the request changed, and nothing when it changed none;
//! - unknown and forged ids load as no session, never as an error;
//! - tower-sessions' expiry date becomes the arena's idle TTL or lifetime;
//! - two concurrent requests of one session that change different keys
//!   both keep their change, where the published Redis store (on a real
//!   `redis-server`) keeps only one.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Host, runtime, sid_of, start_bank};
use serde_json::{Value, json};
use sessio_engine::session::decode_ops;
use sessio_engine::{Delta, Op, Sid};
use sessio_web::{LOADED_KEY, SessioStore, StoreExpiry, WebHost};
use time::OffsetDateTime;

/// The version of `sid` in `host`'s arena and the ops of its last update
/// (none if it was never updated).
fn version_and_last_ops(host: &WebHost, sid: Sid) -> (u64, Vec<Op>) {
    host.with(|s| {
        let version = s
            .arena()
            .read(sid)
            .expect("the session is in this host's arena")
            .version();
        // What the replicator would ship a replica one version behind: the
        // last update's batch, from the arena's delta log.
        let ops = match s.arena().delta_since(sid, version - 1).unwrap() {
            Delta::Ops { batches, .. } => {
                assert_eq!(batches.len(), 1, "one batch made the last version");
                decode_ops(&batches[0]).expect("a logged batch decodes")
            }
            _ => Vec::new(),
        };
        (version, ops)
    })
    .unwrap()
}

/// An attribute as the arena holds it.
fn stored(host: &WebHost, sid: Sid, key: &str) -> Option<Vec<u8>> {
    host.with(|s| s.arena().read(sid).ok()?.get(key).map(<[u8]>::to_vec))
        .unwrap()
}

fn set(key: &str, value: &Value) -> Op {
    Op::Set {
        key: key.into(),
        value: serde_json::to_vec(value).unwrap(),
    }
}

fn sorted(mut ops: Vec<Op>) -> Vec<Op> {
    ops.sort_by_key(|op| format!("{op:?}"));
    ops
}

/// The data without the hidden key `load` adds.
fn visible(data: &HashMap<String, Value>) -> HashMap<&str, &Value> {
    data.iter()
        .filter(|(k, _)| k.as_str() != LOADED_KEY)
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

/// A tower-sessions round trip through one release's `SessionStore`
/// trait: create, load, saves with and without changes, delete, and ids
/// that name no session. Both releases run the same steps.
macro_rules! round_trip {
    ($core:ident) => {{
        use $core::SessionStore as _;
        use $core::session::{Id, Record};

        let bank = start_bank(2, 2);
        let h = Host::new(concat!("round-", stringify!($core)), 1);
        let host = h.open(&bank);
        let _replicator = h.replicator(&bank);
        let store = SessioStore::new(host.clone());
        let hb = Host::new(concat!("round-b-", stringify!($core)), 2);
        let host_b = hb.open(&bank);
        let rt = runtime(2);
        rt.block_on(async {
            // Create: the arena draws the SID; the record's id is its SID.
            let data = HashMap::from([
                ("user".to_string(), json!("ada")),
                ("cart".to_string(), json!(["apple"])),
            ]);
            let mut record = Record {
                id: Id(0),
                data: data.clone(),
                expiry_date: OffsetDateTime::now_utc() + time::Duration::minutes(10),
            };
            store.create(&mut record).await.expect("create");
            assert_ne!(record.id.0, 0, "create sets the id");
            let sid = sid_of(record.id.0);
            assert_eq!(stored(&host, sid, "user").as_deref(), Some(&b"\"ada\""[..]));
            assert_eq!(
                stored(&host, sid, "cart").as_deref(),
                Some(&b"[\"apple\"]"[..])
            );
            assert_eq!(stored(&host, sid, LOADED_KEY), None, "never stored");
            let (v0, _) = version_and_last_ops(&host, sid);

            // Load: the same data, and the hidden key with a hash per key.
            let loaded = store.load(&record.id).await.unwrap().expect("loads");
            assert_eq!(loaded.id, record.id);
            assert_eq!(visible(&loaded.data), visible(&data));
            let hidden = loaded.data.get(LOADED_KEY).expect("the hidden key");
            let hidden = hidden.as_object().expect("an object");
            let mut keys: Vec<&str> = hidden.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["cart", "user"]);
            assert!(hidden.values().all(Value::is_u64), "{hidden:?}");

            // A save with no change writes nothing.
            store.save(&loaded).await.unwrap();
            assert_eq!(version_and_last_ops(&host, sid).0, v0);

            // One changed key: one update, holding only that key.
            let mut r = store.load(&record.id).await.unwrap().unwrap();
            r.data.insert("cart".into(), json!(["apple", "pear"]));
            store.save(&r).await.unwrap();
            let (v, ops) = version_and_last_ops(&host, sid);
            assert_eq!(v, v0 + 1);
            assert_eq!(ops, [set("cart", &json!(["apple", "pear"]))]);

            // A changed key and a new one: one update, those two keys.
            let mut r = store.load(&record.id).await.unwrap().unwrap();
            r.data.insert("user".into(), json!("grace"));
            r.data.insert("theme".into(), json!({"dark": true}));
            store.save(&r).await.unwrap();
            let (v, ops) = version_and_last_ops(&host, sid);
            assert_eq!(v, v0 + 2);
            assert_eq!(
                sorted(ops),
                sorted(vec![
                    set("user", &json!("grace")),
                    set("theme", &json!({"dark": true}))
                ])
            );

            // A removed key is a Remove, nothing else.
            let mut r = store.load(&record.id).await.unwrap().unwrap();
            r.data.remove("cart");
            store.save(&r).await.unwrap();
            let (v, ops) = version_and_last_ops(&host, sid);
            assert_eq!(v, v0 + 3);
            assert_eq!(ops, [Op::Remove { key: "cart".into() }]);
            assert_eq!(stored(&host, sid, "cart"), None);

            // Unchanged again: nothing written.
            let r = store.load(&record.id).await.unwrap().unwrap();
            store.save(&r).await.unwrap();
            assert_eq!(version_and_last_ops(&host, sid).0, v0 + 3);
            let want = HashMap::from([
                ("user".to_string(), json!("grace")),
                ("theme".to_string(), json!({"dark": true})),
            ]);
            assert_eq!(visible(&r.data), visible(&want));

            // Cleared by the app (the hidden key goes too): the record
            // replaces every key.
            let mut r = store.load(&record.id).await.unwrap().unwrap();
            r.data.clear();
            r.data.insert("only".into(), json!(1));
            store.save(&r).await.unwrap();
            let (v, ops) = version_and_last_ops(&host, sid);
            assert_eq!(v, v0 + 4);
            assert_eq!(
                sorted(ops),
                sorted(vec![
                    set("only", &json!(1)),
                    Op::Remove { key: "user".into() },
                    Op::Remove {
                        key: "theme".into()
                    },
                ])
            );
            let r = store.load(&record.id).await.unwrap().unwrap();
            assert_eq!(
                visible(&r.data),
                visible(&HashMap::from([("only".to_string(), json!(1))]))
            );

            // Another host (its own arena) loads it from the bank.
            let (v, _) = version_and_last_ops(&host, sid);
            host.wait_replicated(sid, v, Duration::from_secs(10))
                .await
                .expect("the bank acks the session");
            assert!(!host_b.with(|s| s.is_local(sid)).unwrap());
            let other = SessioStore::new(host_b.clone());
            let r = other.load(&record.id).await.unwrap().expect("fetched");
            assert_eq!(
                visible(&r.data),
                visible(&HashMap::from([("only".to_string(), json!(1))]))
            );
            assert_eq!(version_and_last_ops(&host_b, sid).0, v);

            // Delete: gone here, and loads as no session.
            store.delete(&record.id).await.unwrap();
            assert_eq!(stored(&host, sid, "only"), None);
            assert!(store.load(&record.id).await.unwrap().is_none());

            // Ids that name no session load as none, not as an error: a
            // random one (asks the bank), edge values, and one again (the
            // host remembers the bank's answer).
            for id in [Id::default(), Id(0), Id(-1), Id(i128::MAX)] {
                let got = store.load(&id).await;
                assert!(matches!(got, Ok(None)), "{id}: {got:?}");
                assert!(matches!(store.load(&id).await, Ok(None)));
            }
        });
    }};
}

#[test]
fn round_trip_through_the_015_trait() {
    round_trip!(tower_sessions_core);
}

#[test]
fn round_trip_through_the_014_trait() {
    round_trip!(tower_sessions_core_014);
}

#[test]
fn expiry_dates_become_idle_ttls_or_lifetimes() {
    use tower_sessions_core::SessionStore as _;
    use tower_sessions_core::session::{Id, Record};

    let bank = start_bank(1, 1);
    let h = Host::new("expiry", 1);
    let host = h.open(&bank);
    let rt = runtime(2);
    let ttl_ms: u64 = 10 * 60 * 1000;
    // What the arena holds: (idle TTL, absolute expiry) and the time.
    let expiry = |sid: Sid| {
        host.with(|s| {
            let g = s.arena().read(sid).unwrap();
            let d = g.data();
            (d.idle_ttl_ms.to_native(), d.expires_at_ms.to_native())
        })
        .unwrap()
    };
    rt.block_on(async {
        for mode in [StoreExpiry::Idle, StoreExpiry::Absolute] {
            let store = SessioStore::new(host.clone()).with_expiry(mode);
            let before_ms = sessio_engine::clock::now_ms();
            let mut record = Record {
                id: Id(0),
                data: HashMap::from([("user".to_string(), json!("ada"))]),
                expiry_date: OffsetDateTime::now_utc()
                    + time::Duration::milliseconds(ttl_ms as i64),
            };
            store.create(&mut record).await.unwrap();
            let after_ms = sessio_engine::clock::now_ms();
            let sid = sid_of(record.id.0);
            let (idle, at) = expiry(sid);
            // The TTL is taken at create: a little less than asked, by the
            // time create took to get there.
            let slack = after_ms - before_ms + 50;
            match mode {
                StoreExpiry::Idle => {
                    assert!(idle <= ttl_ms && idle + slack >= ttl_ms, "idle {idle}");
                    assert_eq!(at, 0, "no absolute expiry");
                }
                StoreExpiry::Absolute => {
                    assert_eq!(idle, 0, "no idle TTL");
                    assert!(
                        at + slack >= before_ms + ttl_ms && at <= after_ms + ttl_ms,
                        "expires at {at}, created between {before_ms} and {after_ms}"
                    );
                }
            }
            // A load reports the expiry date the arena will apply.
            let loaded = store.load(&record.id).await.unwrap().unwrap();
            let left = loaded.expiry_date - OffsetDateTime::now_utc();
            let left_ms = left.whole_milliseconds();
            assert!(
                (ttl_ms as i128 - 5000..=ttl_ms as i128 + 50).contains(&left_ms),
                "{mode:?}: {left_ms} ms left"
            );
        }
    });
}

/// A `redis-server` of this test on a free loopback port, killed when
/// dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let mut last = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start redis-server ({e}): this test compares with the \
                         published Redis store against a real Redis, so redis-server must \
                         be installed and on PATH"
                    )
                });
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    // Most likely someone took the port meanwhile: another.
                    last = format!("redis-server on port {port} exited: {status}");
                    break;
                }
                if ping(port) {
                    return RedisServer { child, port };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("redis-server on port {port} did not answer PING in 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start: {last}");
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What became of two requests' changes.
#[derive(Debug)]
struct Outcome {
    id: i128,
    cart_kept: bool,
    theme_kept: bool,
}

/// Two requests of one session: both load it before either saves, one
/// adds to the cart, the other switches the theme, both save (at once).
/// What the session holds after.
async fn two_requests<S>(store: Arc<S>) -> Outcome
where
    S: tower_sessions_core_014::SessionStore,
{
    use tower_sessions_core_014::session::{Id, Record};

    let mut record = Record {
        id: Id::default(),
        data: HashMap::from([
            ("cart".to_string(), json!([])),
            ("theme".to_string(), json!("light")),
        ]),
        expiry_date: OffsetDateTime::now_utc() + time::Duration::minutes(10),
    };
    store.create(&mut record).await.expect("create");
    let id = record.id;
    let both_loaded = Arc::new(tokio::sync::Barrier::new(2));
    let request = |key: &'static str, value: Value| {
        let (store, both_loaded) = (Arc::clone(&store), Arc::clone(&both_loaded));
        tokio::spawn(async move {
            let mut r = store.load(&id).await.expect("load").expect("the session");
            both_loaded.wait().await;
            r.data.insert(key.into(), value);
            store.save(&r).await.expect("save");
        })
    };
    let a = request("cart", json!(["apple"]));
    let b = request("theme", json!("dark"));
    a.await.unwrap();
    b.await.unwrap();
    let after = store.load(&id).await.unwrap().expect("the session");
    Outcome {
        id: id.0,
        cart_kept: after.data.get("cart") == Some(&json!(["apple"])),
        theme_kept: after.data.get("theme") == Some(&json!("dark")),
    }
}

#[test]
fn concurrent_requests_keep_both_changes_where_the_redis_store_loses_one() {
    use tower_sessions_redis_store::RedisStore;
    use tower_sessions_redis_store::fred::prelude::{ClientLike, Config};

    let redis = RedisServer::start();
    let bank = start_bank(2, 2);
    let h = Host::new("concurrent", 1);
    let host = h.open(&bank);
    let rt = runtime(2);
    rt.block_on(async {
        let sessio = two_requests(Arc::new(SessioStore::new(host.clone()))).await;
        println!("sessio store: {sessio:?}");

        let config = Config::from_url(&format!("redis://127.0.0.1:{}", redis.port)).unwrap();
        let client =
            tower_sessions_redis_store::fred::prelude::Client::new(config, None, None, None);
        let connection = client.init().await.expect("connects to redis-server");
        let redis_outcome = two_requests(Arc::new(RedisStore::new(client.clone()))).await;
        println!("published Redis store: {redis_outcome:?}");
        client.quit().await.unwrap();
        let _ = connection.await;

        assert!(
            sessio.cart_kept && sessio.theme_kept,
            "sessio kept both changes: {sessio:?}"
        );
        // One update per request: the session's version grew by two.
        let version = host
            .with(|s| s.arena().read(sid_of(sessio.id)).unwrap().version())
            .unwrap();
        assert_eq!(version, 3, "created at 1, then one update per save");
        assert!(
            redis_outcome.cart_kept != redis_outcome.theme_kept,
            "the Redis store writes the whole record back: the last save wins and \
             the other change is lost: {redis_outcome:?}"
        );
    });
}
