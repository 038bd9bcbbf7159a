//! The native layer: sessions that cost a request almost nothing.
//!
//! [`SessionLayer`] reads the session cookie, makes sure the session is in
//! this host's arena (fetching it from the bank on a miss, off the async
//! workers), and gives the handler a [`Session`]. A handler reads through
//! a zero-copy view and writes per-key ops; no record is decoded, cloned or
//! encoded as a whole. Ops a handler leaves uncommitted are applied after
//! it returns.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use sessio_web::{Session, SessionLayer, WebError, WebHost};
//!
//! async fn add(session: Session) -> Result<String, WebError> {
//!     session.require()?; // 401 without a session
//!     session.push("cart", b"apple".to_vec(), 100);
//!     let version = session.commit().await?;
//!     let items = session.read(|d| d.and_then(|d| d.get("cart")).map_or(0, |c| c.len()));
//!     Ok(format!("version {version}, {items} bytes of cart"))
//! }
//!
//! # fn app(host: WebHost) -> Router {
//! Router::new().route("/cart", post(add)).layer(SessionLayer::new(host))
//! # }
//! ```
//!
//! Bad input: a cookie that does not parse, or names a session that does
//! not exist (forged, expired, ended), is no session: the handler starts
//! a fresh one if it wants. A host out of fetch budget answers 503 with
//! `Retry-After`. A write over the session's quota is a 413 the handler
//! sees as [`WebError`]. None of these touch other sessions.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Request, StatusCode, header};
use sessio_engine::session::ArchivedSessionData;
use sessio_engine::{Op, OpError, SessionError, Sid};
use sessio_remote::{Durability, HostError};

use crate::host::WebHost;

/// The session cookie's default name.
pub const COOKIE_DEFAULT: &str = "id";

/// The layer; see the module docs.
#[derive(Debug, Clone)]
pub struct SessionLayer {
    host: WebHost,
    cookie: Arc<CookieConfig>,
}

/// How the session cookie is written.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    /// Its name.
    pub name: String,
    /// Sent only over HTTPS.
    pub secure: bool,
    /// Its `Path`.
    pub path: String,
}

impl Default for CookieConfig {
    fn default() -> CookieConfig {
        CookieConfig {
            name: COOKIE_DEFAULT.into(),
            secure: false,
            path: "/".into(),
        }
    }
}

impl SessionLayer {
    /// Sessions of `host`, with the default cookie.
    pub fn new(host: WebHost) -> SessionLayer {
        SessionLayer {
            host,
            cookie: Arc::new(CookieConfig::default()),
        }
    }

    /// Sets how the cookie is written.
    #[must_use]
    pub fn with_cookie(mut self, cookie: CookieConfig) -> SessionLayer {
        self.cookie = Arc::new(cookie);
        self
    }
}

impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> SessionService<S> {
        SessionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around an app.
#[derive(Debug, Clone)]
pub struct SessionService<S> {
    inner: S,
    layer: SessionLayer,
}

/// What a request's [`Session`] holds.
#[derive(Debug)]
struct State {
    host: WebHost,
    /// The session, if the request has one (or the handler created one).
    sid: Mutex<Option<Sid>>,
    /// Ops not yet applied.
    ops: Mutex<Vec<Op>>,
    /// Set when the handler created a session or ended one: the response
    /// sets or clears the cookie.
    cookie_change: Mutex<Option<CookieChange>>,
    durability: Mutex<Durability>,
}

#[derive(Debug, Clone, Copy)]
enum CookieChange {
    Set(Sid),
    Clear,
}

/// A request's session, for handlers (an axum extractor).
#[derive(Debug, Clone)]
pub struct Session {
    state: Arc<State>,
}

/// What a handler's session call can fail with; answers with a clear
/// status.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The request has no session (401).
    #[error("no session")]
    NoSession,
    /// The write would make the session larger than its quota (413).
    #[error("the session would be too large: {0}")]
    TooLarge(String),
    /// The write was refused as malformed (400).
    #[error("refused: {0}")]
    Refused(String),
    /// The host may not ask the bank now (503).
    #[error("busy, try again")]
    Busy,
    /// A `Replicated` write timed out; it is applied locally (503).
    #[error("{0}")]
    NotReplicated(String),
    /// Anything else (500).
    #[error("session store: {0}")]
    Internal(String),
}

impl From<HostError> for WebError {
    fn from(e: HostError) -> WebError {
        match e {
            HostError::NotFound => WebError::NoSession,
            HostError::Throttled | HostError::BankUnavailable { .. } => WebError::Busy,
            HostError::Session(
                SessionError::Op(OpError::OverQuota { .. }) | SessionError::TooLarge(_),
            ) => WebError::TooLarge(e.to_string()),
            HostError::Session(SessionError::Op(op)) => WebError::Refused(op.to_string()),
            HostError::NotReplicated { .. } => WebError::NotReplicated(e.to_string()),
            e => WebError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let status = match self {
            WebError::NoSession => StatusCode::UNAUTHORIZED,
            WebError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::Refused(_) => StatusCode::BAD_REQUEST,
            WebError::Busy | WebError::NotReplicated(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut r = (status, self.to_string()).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl Session {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session's id, if the request has a session.
    pub fn sid(&self) -> Option<Sid> {
        *Self::lock(&self.state.sid)
    }

    /// The session's id, or [`WebError::NoSession`].
    pub fn require(&self) -> Result<Sid, WebError> {
        self.sid().ok_or(WebError::NoSession)
    }

    /// Reads the session through a zero-copy view (`None`: no session).
    /// Ops not yet committed are not in it. Keep `f` short: it runs with
    /// the session pinned, and must not await.
    pub fn read<R>(&self, f: impl FnOnce(Option<&ArchivedSessionData>) -> R) -> R {
        let Some(sid) = self.sid() else {
            return f(None);
        };
        let mut f = Some(f);
        let r = self.state.host.with(|s| match s.arena().read(sid) {
            Ok(g) => (f.take().expect("called once"))(Some(g.data())),
            Err(_) => (f.take().expect("called once"))(None),
        });
        match r {
            Ok(r) => r,
            // No handle on this thread could be had: read as no session.
            Err(_) => (f.take().expect("not called yet"))(None),
        }
    }

    /// A copy of one attribute's value.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.read(|d| d.and_then(|d| d.get(key)).map(<[u8]>::to_vec))
    }

    fn queue(&self, op: Op) {
        Self::lock(&self.state.ops).push(op);
    }

    /// Sets an attribute (applied at [`Session::commit`] or after the
    /// handler).
    pub fn set(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.queue(Op::Set {
            key: key.into(),
            value: value.into(),
        });
    }

    /// Removes an attribute.
    pub fn remove(&self, key: &str) {
        self.queue(Op::Remove { key: key.into() });
    }

    /// Appends an item to a bounded list attribute, keeping the newest
    /// `max_items`.
    pub fn push(&self, key: &str, item: Vec<u8>, max_items: u32) {
        self.queue(Op::Append {
            key: key.into(),
            item,
            max_items,
        });
    }

    /// Adds to a counter attribute.
    pub fn incr(&self, key: &str, by: i64) {
        self.queue(Op::Incr {
            key: key.into(),
            by,
        });
    }

    /// How this request's writes are made durable (the host's default
    /// unless set).
    pub fn set_durability(&self, d: Durability) {
        *Self::lock(&self.state.durability) = d;
    }

    /// Starts a new session holding `attrs`, replacing the request's (the
    /// old one ends: a login should never keep a session id from before).
    /// The response carries its cookie.
    pub fn create(&self, attrs: &[(&str, &[u8])]) -> Result<Sid, WebError> {
        if let Some(old) = self.sid() {
            self.state.host.invalidate(old)?;
        }
        let sid = self.state.host.create(attrs)?;
        *Self::lock(&self.state.sid) = Some(sid);
        Self::lock(&self.state.ops).clear();
        *Self::lock(&self.state.cookie_change) = Some(CookieChange::Set(sid));
        Ok(sid)
    }

    /// Ends the session, here and in the bank; the response clears the
    /// cookie.
    pub fn invalidate(&self) -> Result<(), WebError> {
        if let Some(sid) = Self::lock(&self.state.sid).take() {
            self.state.host.invalidate(sid)?;
        }
        Self::lock(&self.state.ops).clear();
        *Self::lock(&self.state.cookie_change) = Some(CookieChange::Clear);
        Ok(())
    }

    /// Applies the queued ops now, durable as set; returns the session's
    /// version after them.
    pub async fn commit(&self) -> Result<u64, WebError> {
        let sid = self.require()?;
        let ops = std::mem::take(&mut *Self::lock(&self.state.ops));
        let durability = *Self::lock(&self.state.durability);
        if ops.is_empty() {
            // Nothing to write: the version as it stands (0: gone).
            return Ok(self
                .state
                .host
                .with(|s| s.arena().read(sid).map_or(0, |g| g.version()))?);
        }
        Ok(self.state.host.update(sid, &ops, durability).await?)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = WebError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Session, WebError> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or_else(|| WebError::Internal("the route has no SessionLayer".into()))
    }
}

/// The session id in a `Cookie` header, if any parses.
fn cookie_sid(req: &http::HeaderMap, name: &str) -> Option<Sid> {
    req.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse::<tower_sessions_core::session::Id>().ok())
        .map(|id| Sid(id.0.to_le_bytes()))
}

fn set_cookie(cookie: &CookieConfig, change: CookieChange) -> Option<HeaderValue> {
    let secure = if cookie.secure { "; Secure" } else { "" };
    let v = match change {
        CookieChange::Set(sid) => format!(
            "{}={}; Path={}; HttpOnly; SameSite=Lax{secure}",
            cookie.name,
            tower_sessions_core::session::Id(i128::from_le_bytes(sid.0)),
            cookie.path
        ),
        CookieChange::Clear => format!(
            "{}=; Path={}; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
            cookie.name, cookie.path
        ),
    };
    HeaderValue::from_str(&v).ok()
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<Request<B>> for SessionService<S>
where
    S: tower_service::Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone that was made ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let host = layer.host.clone();
            let mut sid = cookie_sid(req.headers(), &layer.cookie.name);
            if let Some(s) = sid {
                match host.ensure_local(s).await {
                    Ok(()) => {}
                    // Forged, expired, ended: no session.
                    Err(HostError::NotFound) => sid = None,
                    Err(HostError::Throttled | HostError::BankUnavailable { .. }) => {
                        return Ok(WebError::Busy.into_response());
                    }
                    Err(e) => return Ok(WebError::from(e).into_response()),
                }
            }
            let state = Arc::new(State {
                durability: Mutex::new(host.config().durability),
                host,
                sid: Mutex::new(sid),
                ops: Mutex::new(Vec::new()),
                cookie_change: Mutex::new(None),
            });
            let session = Session {
                state: Arc::clone(&state),
            };
            req.extensions_mut().insert(session.clone());
            let mut response = inner.call(req).await?;
            // Ops the handler left uncommitted.
            let pending = !Session::lock(&state.ops).is_empty();
            if pending && let Err(e) = session.commit().await {
                return Ok(e.into_response());
            }
            if let Some(change) = *Session::lock(&state.cookie_change)
                && let Some(v) = set_cookie(&layer.cookie, change)
            {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            Ok(response)
        })
    }
}
