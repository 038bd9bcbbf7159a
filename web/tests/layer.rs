//! The native axum layer ([`SessionLayer`] and the [`Session`] extractor)
//! served over loopback and driven by a minimal HTTP/1.1 client, with a
//! bank of real nodes behind the hosts:
//!
//! - login sets the cookie, a cart route pushes and commits (answering the
//!   version), a view reads, logout ends the session and clears the cookie;
//! - a cookie that does not parse, or names no session, is no session:
//!   401 from a route that needs one, never a 500;
//! - a host out of fetch budget answers 503 with `Retry-After` for
//!   sessions it would have to fetch, and serves its own as ever;
//! - a write over the session's quota is a 413 and leaves the session as
//!   it was;
//! - a session created on one host is served, cart intact, by another host
//!   with its own arena once the first is gone (fetched from the bank).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::routing::{get, post};
use common::{Host, runtime, sid_of, start_bank};
use sessio_engine::ArenaConfig;
use sessio_engine::session::append_items;
use sessio_web::{Session, SessionLayer, WebError, WebHost};

// ---- The app under test --------------------------------------------------

async fn login(session: Session) -> Result<&'static str, WebError> {
    session.create(&[("user", b"ada")])?;
    Ok("welcome")
}

async fn add(
    session: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Result<String, WebError> {
    session.require()?;
    let item = q.get("item").cloned().unwrap_or_default();
    session.push("cart", item.into_bytes(), 100);
    let version = session.commit().await?;
    Ok(format!("version={version}"))
}

async fn view(session: Session) -> Result<String, WebError> {
    session.require()?;
    session
        .read(|d| {
            let d = d?;
            let user = String::from_utf8_lossy(d.get("user").unwrap_or_default()).into_owned();
            let cart: Vec<String> = d
                .get("cart")
                .and_then(append_items)
                .unwrap_or_default()
                .iter()
                .map(|i| String::from_utf8_lossy(i).into_owned())
                .collect();
            let blob = d.get("blob").map_or(0, <[u8]>::len);
            Some(format!("user={user} cart={} blob={blob}", cart.join(",")))
        })
        .ok_or(WebError::NoSession)
}

async fn logout(session: Session) -> Result<&'static str, WebError> {
    session.invalidate()?;
    Ok("bye")
}

fn blob(q: &HashMap<String, String>) -> Vec<u8> {
    vec![b'x'; q.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0)]
}

/// Sets a blob of `bytes` bytes and commits it.
async fn big(
    session: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Result<String, WebError> {
    session.require()?;
    session.set("blob", blob(&q));
    Ok(format!("version={}", session.commit().await?))
}

/// Sets a blob and leaves it to the layer to apply after the handler.
async fn big_later(
    session: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Result<&'static str, WebError> {
    session.require()?;
    session.set("blob", blob(&q));
    Ok("queued")
}

fn app(host: WebHost) -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/add", post(add))
        .route("/view", get(view))
        .route("/logout", post(logout))
        .route("/big", post(big))
        .route("/big-later", post(big_later))
        .layer(SessionLayer::new(host))
}

// ---- Serving and a minimal client ----------------------------------------

/// The app on a loopback port, on a runtime of its own; stopped when
/// dropped.
struct Server {
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl Server {
    fn start(host: WebHost) -> Server {
        let rt = runtime(1);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app(host)).await });
        Server { rt: Some(rt), addr }
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("running").block_on(f)
    }

    /// Sends one request (`Connection: close`) and reads the response.
    fn send(&self, method: &str, path: &str, cookie: Option<&str>) -> Reply {
        let mut s = TcpStream::connect(self.addr).expect("the server accepts");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let cookie = cookie.map_or_else(String::new, |c| format!("Cookie: {c}\r\n"));
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: 0\r\n{cookie}\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("{method} {path}: reading the response: {e}"));
        Reply::parse(&raw).unwrap_or_else(|| {
            panic!(
                "{method} {path}: not an HTTP response: {:?}",
                String::from_utf8_lossy(&raw)
            )
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn parse(raw: &[u8]) -> Option<Reply> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&raw[..split]).ok()?;
        let mut body = raw[split + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            body = dechunk(&body)?;
        } else if let Some(len) = header("content-length") {
            body.truncate(len.parse().ok()?);
        }
        Some(Reply {
            status,
            body: String::from_utf8(body).ok()?,
            headers,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Set-Cookie` header of the session cookie, if any.
    fn set_cookie(&self) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .find(|v| v.starts_with("id="))
    }

    /// The `id=...` pair the client sends back.
    fn cookie(&self) -> String {
        let set = self.set_cookie().expect("the response sets the cookie");
        set.split(';').next().unwrap().to_string()
    }

    /// The version a cart route answered.
    fn version(&self) -> u64 {
        self.body
            .strip_prefix("version=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not a version: {self:?}"))
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&b[..end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        b = &b[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// The SID a cookie pair (`id=...`) names.
fn sid_of_cookie(cookie: &str) -> sessio_engine::Sid {
    let id: tower_sessions_core::session::Id = cookie.strip_prefix("id=").unwrap().parse().unwrap();
    sid_of(id.0)
}

// ---- Tests ---------------------------------------------------------------

#[test]
fn login_cart_view_and_logout() {
    let bank = start_bank(1, 1);
    let h = Host::new("flow", 1);
    let host = h.open(&bank);
    let server = Server::start(host.clone());

    // No cookie: no session.
    let r = server.send("GET", "/view", None);
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.set_cookie().is_none(), "{r:?}");

    // Login sets the cookie: the tower-sessions encoding of the SID.
    let r = server.send("POST", "/login", None);
    assert_eq!((r.status, r.body.as_str()), (200, "welcome"), "{r:?}");
    let set = r.set_cookie().unwrap();
    assert!(set.contains("HttpOnly") && set.contains("Path=/"), "{set}");
    let cookie = r.cookie();
    assert_eq!(cookie.len(), "id=".len() + 22, "{cookie}");
    let sid = sid_of_cookie(&cookie);
    assert!(host.with(|s| s.is_local(sid)).unwrap());

    // Each add is one update: the version answered grows by one.
    let v1 = server.send("POST", "/add?item=apple", Some(&cookie));
    assert_eq!(v1.status, 200, "{v1:?}");
    let v2 = server.send("POST", "/add?item=pear", Some(&cookie));
    assert_eq!(v2.version(), v1.version() + 1);
    assert!(v2.set_cookie().is_none(), "only login and logout set it");

    // The cookie is found among others.
    let r = server.send("GET", "/view", Some(&format!("theme=dark; {cookie}; x=y")));
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "user=ada cart=apple,pear blob=0"),
        "{r:?}"
    );

    // A second login ends the first session and starts another.
    let r = server.send("POST", "/login", Some(&cookie));
    assert_eq!(r.status, 200);
    let second = r.cookie();
    assert_ne!(second, cookie);
    assert_eq!(server.send("GET", "/view", Some(&cookie)).status, 401);
    let r = server.send("GET", "/view", Some(&second));
    assert_eq!(r.body, "user=ada cart= blob=0", "{r:?}");

    // Logout ends it and clears the cookie.
    let r = server.send("POST", "/logout", Some(&second));
    assert_eq!((r.status, r.body.as_str()), (200, "bye"), "{r:?}");
    let cleared = r.set_cookie().expect("logout clears the cookie");
    assert!(
        cleared.starts_with("id=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert!(!host.with(|s| s.is_local(sid_of_cookie(&second))).unwrap());
    // The old cookie replayed: no session, for reads and writes.
    assert_eq!(server.send("GET", "/view", Some(&second)).status, 401);
    assert_eq!(
        server.send("POST", "/add?item=plum", Some(&second)).status,
        401
    );
}

#[test]
fn bad_cookies_are_no_session() {
    let bank = start_bank(2, 2);
    let h = Host::new("cookies", 1);
    let host = h.open(&bank);
    let server = Server::start(host);

    let unknown = format!("id={}", tower_sessions_core::session::Id::default());
    let cookies = [
        "id=%%%garbage%%%".to_string(),
        "id=".to_string(),
        "id".to_string(),
        "id=short".to_string(),
        // Base64 of 17 bytes: one too many.
        "id=AAAAAAAAAAAAAAAAAAAAAAA".to_string(),
        format!("id={}", "A".repeat(4000)),
        "id=\"AAAAAAAAAAAAAAAAAAAAAA\"".to_string(),
        // Well formed, but no session has these ids.
        "id=AAAAAAAAAAAAAAAAAAAAAA".to_string(),
        "id=_____________________w".to_string(),
        unknown.clone(),
        // Twice: the host remembers the bank's answer.
        unknown,
    ];
    for cookie in &cookies {
        for (method, path) in [("GET", "/view"), ("POST", "/add?item=apple")] {
            let r = server.send(method, path, Some(cookie));
            assert_eq!(r.status, 401, "{method} {path} with {cookie:?}: {r:?}");
            assert!(r.set_cookie().is_none(), "{cookie:?}: {r:?}");
        }
        // And a login starts a fresh session.
        let r = server.send("POST", "/login", Some(cookie));
        assert_eq!(r.status, 200, "login with {cookie:?}: {r:?}");
        let fresh = r.cookie();
        let r = server.send("GET", "/view", Some(&fresh));
        assert_eq!(r.body, "user=ada cart= blob=0", "{r:?}");
    }
}

#[test]
fn a_host_out_of_fetches_answers_503_and_still_serves_its_sessions() {
    let bank = start_bank(1, 1);
    let h = Host::new("throttle", 1);
    let mut config = h.config(&bank, ArenaConfig::for_sessions(64, 1024));
    config.host.limits.fetches_per_s = 1;
    config.host.limits.fetch_burst = 1;
    let server = Server::start(WebHost::open(config).unwrap());

    let cookie = server.send("POST", "/login", None).cookie();
    // Unknown SIDs, each a miss: the first takes the one fetch token (the
    // bank says no such session), the next find the bucket empty.
    let statuses: Vec<(u16, Option<String>)> = (0..6)
        .map(|_| {
            let id = tower_sessions_core::session::Id::default();
            let r = server.send("GET", "/view", Some(&format!("id={id}")));
            (r.status, r.header("retry-after").map(str::to_string))
        })
        .collect();
    assert_eq!(statuses[0], (401, None), "{statuses:?}");
    assert!(
        statuses.iter().any(|(s, _)| *s == 503),
        "an empty bucket throttles: {statuses:?}"
    );
    for (status, retry) in &statuses {
        match status {
            401 => assert!(retry.is_none()),
            503 => assert_eq!(retry.as_deref(), Some("1"), "{statuses:?}"),
            _ => panic!("{statuses:?}"),
        }
    }
    // The host's own sessions need no fetch: served as ever.
    let r = server.send("POST", "/add?item=apple", Some(&cookie));
    assert_eq!(r.status, 200, "{r:?}");
    let r = server.send("GET", "/view", Some(&cookie));
    assert_eq!(r.body, "user=ada cart=apple blob=0", "{r:?}");
}

#[test]
fn a_write_over_the_quota_is_413_and_changes_nothing() {
    let bank = start_bank(1, 1);
    let h = Host::new("quota", 1);
    let mut arena = ArenaConfig::for_sessions(64, 1024);
    arena.quota_bytes = 4096;
    let host = WebHost::open(h.config(&bank, arena)).unwrap();
    let server = Server::start(host.clone());

    let cookie = server.send("POST", "/login", None).cookie();
    let v = server
        .send("POST", "/add?item=apple", Some(&cookie))
        .version();
    let r = server.send("POST", "/big?bytes=1000", Some(&cookie));
    assert_eq!(r.version(), v + 1, "within the quota: {r:?}");

    // Over the quota, by a little and by a lot, committed by the handler
    // or left for the layer: 413, and the session is as it was.
    for path in [
        "/big?bytes=6000",
        "/big?bytes=100000",
        "/big-later?bytes=6000",
        "/big-later?bytes=100000",
    ] {
        let r = server.send("POST", path, Some(&cookie));
        assert_eq!(r.status, 413, "{path}: {r:?}");
        let r = server.send("GET", "/view", Some(&cookie));
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "user=ada cart=apple blob=1000"),
            "after {path}"
        );
    }
    let version = host
        .with(|s| s.arena().read(sid_of_cookie(&cookie)).unwrap().version())
        .unwrap();
    assert_eq!(version, v + 1, "no refused write made a version");
}

#[test]
fn another_host_serves_the_session_with_its_cart() {
    let bank = start_bank(2, 2);
    let ha = Host::new("failover-a", 1);
    let hb = Host::new("failover-b", 2);
    let host_a = ha.open(&bank);
    let replicator = ha.replicator(&bank);
    let server_a = Server::start(host_a.clone());

    let cookie = server_a.send("POST", "/login", None).cookie();
    let sid = sid_of_cookie(&cookie);
    server_a.send("POST", "/add?item=apple", Some(&cookie));
    let v = server_a
        .send("POST", "/add?item=pear", Some(&cookie))
        .version();
    server_a
        .block_on(host_a.wait_replicated(sid, v, Duration::from_secs(10)))
        .expect("the bank acks the cart");

    // Host A goes away.
    drop(server_a);
    drop(replicator);
    drop(host_a);

    let host_b = hb.open(&bank);
    assert!(!host_b.with(|s| s.is_local(sid)).unwrap());
    let server_b = Server::start(host_b.clone());
    let r = server_b.send("GET", "/view", Some(&cookie));
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "user=ada cart=apple,pear blob=0"),
        "{r:?}"
    );
    assert!(host_b.with(|s| s.is_local(sid)).unwrap(), "fetched");
    // And the session goes on from there.
    let r = server_b.send("POST", "/add?item=plum", Some(&cookie));
    assert_eq!(r.version(), v + 1, "{r:?}");
    let r = server_b.send("GET", "/view", Some(&cookie));
    assert_eq!(r.body, "user=ada cart=apple,pear,plum blob=0");
}
