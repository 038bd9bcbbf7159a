//! The shop's routes, once per session machinery. Every variant does the
//! same work per request: read the cart, push an item, save.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{SessioStore, Session, SessionLayer, WebError, WebHost};
use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::Value;
use sessio_engine::session::append_items;
use sessio_remote::Durability;
use tower_sessions_014 as ts;

use super::{Args, BoxError, CART_MAX, DURABLE_TIMEOUT, Mode};

/// `?user=`.
#[derive(serde::Deserialize)]
pub struct Login {
    user: String,
}

/// `?item=&durable=`.
#[derive(serde::Deserialize)]
pub struct Add {
    item: String,
    #[serde(default)]
    durable: u8,
}

/// The app of `args.mode`; every response names the host that served it
/// (`x-host`), so a client sees its session move on failover.
pub async fn app(args: &Args) -> Result<Router, BoxError> {
    let host = axum::http::HeaderValue::from(args.host_id);
    let app = match args.mode {
        Mode::Native => native(WebHost::open(args.web_config(true)?)?, !args.no_replicator),
        Mode::Store => with_store(SessioStore::new(WebHost::open(args.web_config(true)?)?)),
        Mode::Memory => with_store(ts::MemoryStore::default()),
        Mode::Redis => {
            use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};
            let pool = Pool::new(
                Config::from_url(&format!("redis://{}", args.redis))?,
                None,
                None,
                None,
                2,
            )?;
            pool.init().await?;
            with_store(tower_sessions_redis_store::RedisStore::new(pool))
        }
        Mode::None => none(),
    };
    Ok(app.layer(axum::middleware::map_response(
        move |mut r: axum::response::Response| {
            let host = host.clone();
            async move {
                r.headers_mut().insert("x-host", host);
                r
            }
        },
    )))
}

// ----- native ------------------------------------------------------------

/// A login waits for its session to reach the bank, unless the host runs
/// no replicator (the `--no-replicator` diagnostic), where it would only
/// time out.
#[derive(Clone, Copy)]
struct DurableLogin(bool);

fn native(host: WebHost, durable_login: bool) -> Router {
    Router::new()
        .route("/login", post(native_login))
        .route("/cart/add", post(native_add))
        .route("/cart", get(native_view))
        .route("/logout", post(native_logout))
        .layer(axum::Extension(DurableLogin(durable_login)))
        .layer(SessionLayer::new(host))
}

fn cart_len(session: &Session) -> usize {
    session.read(|d| {
        d.and_then(|d| d.get("cart"))
            .and_then(append_items)
            .map_or(0, |items| items.len())
    })
}

async fn native_login(
    session: Session,
    axum::Extension(durable): axum::Extension<DurableLogin>,
    Query(q): Query<Login>,
) -> Result<String, WebError> {
    session.create(&[("user", q.user.as_bytes())])?;
    // The next request may reach the other host, which fetches the
    // session from the bank: it must be there before we answer.
    if durable.0 {
        session.set_durability(Durability::Replicated {
            timeout: DURABLE_TIMEOUT,
        });
    }
    session.set("since", sessio_engine::clock::now_ms().to_le_bytes());
    let v = session.commit().await?;
    Ok(format!("ok v={v}"))
}

async fn native_add(session: Session, Query(q): Query<Add>) -> Result<String, WebError> {
    session.require()?;
    if q.durable != 0 {
        session.set_durability(Durability::Replicated {
            timeout: DURABLE_TIMEOUT,
        });
    }
    session.push("cart", q.item.into_bytes(), CART_MAX);
    let v = session.commit().await?;
    Ok(format!("items={} v={v}", cart_len(&session)))
}

async fn native_view(session: Session) -> Result<String, WebError> {
    session.require()?;
    Ok(session.read(|d| {
        let Some(d) = d else {
            return "items=0 v=0".to_string();
        };
        let items: Vec<String> = d
            .get("cart")
            .and_then(append_items)
            .unwrap_or_default()
            .iter()
            .map(|i| String::from_utf8_lossy(i).into_owned())
            .collect();
        let user = d
            .get("user")
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        format!("items={} user={user} cart={}", items.len(), items.join(","))
    }))
}

async fn native_logout(session: Session) -> Result<String, WebError> {
    session.invalidate()?;
    Ok("ok".into())
}

// ----- tower-sessions ----------------------------------------------------

fn with_store<S: ts::SessionStore + Clone>(store: S) -> Router {
    let layer = ts::SessionManagerLayer::new(store)
        .with_secure(false)
        .with_expiry(ts::Expiry::OnInactivity(time::Duration::minutes(30)));
    Router::new()
        .route("/login", post(ts_login))
        .route("/cart/add", post(ts_add))
        .route("/cart", get(ts_view))
        .route("/logout", post(ts_logout))
        .layer(layer)
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn ts_cart(session: &ts::Session) -> Result<Vec<String>, (StatusCode, String)> {
    Ok(session
        .get::<Vec<String>>("cart")
        .await
        .map_err(internal)?
        .unwrap_or_default())
}

async fn ts_login(
    session: ts::Session,
    Query(q): Query<Login>,
) -> Result<String, (StatusCode, String)> {
    session.cycle_id().await.map_err(internal)?;
    session.insert("user", q.user).await.map_err(internal)?;
    Ok("ok v=0".into())
}

async fn ts_add(
    session: ts::Session,
    Query(q): Query<Add>,
) -> Result<String, (StatusCode, String)> {
    if session
        .get::<String>("user")
        .await
        .map_err(internal)?
        .is_none()
    {
        return Err((StatusCode::UNAUTHORIZED, "no session".into()));
    }
    let mut cart = ts_cart(&session).await?;
    cart.push(q.item);
    if cart.len() > CART_MAX as usize {
        cart.remove(0);
    }
    let v = session
        .get::<u64>("v")
        .await
        .map_err(internal)?
        .unwrap_or(0)
        + 1;
    session.insert("cart", &cart).await.map_err(internal)?;
    session.insert("v", v).await.map_err(internal)?;
    Ok(format!("items={} v={v}", cart.len()))
}

async fn ts_view(session: ts::Session) -> Result<String, (StatusCode, String)> {
    let Some(user) = session.get::<String>("user").await.map_err(internal)? else {
        return Err((StatusCode::UNAUTHORIZED, "no session".into()));
    };
    let cart = ts_cart(&session).await?;
    Ok(format!(
        "items={} user={user} cart={}",
        cart.len(),
        cart.join(",")
    ))
}

async fn ts_logout(session: ts::Session) -> Result<String, (StatusCode, String)> {
    session.flush().await.map_err(internal)?;
    Ok("ok".into())
}

// ----- no sessions -------------------------------------------------------

fn none() -> Router {
    let adds = Arc::new(AtomicU64::new(0));
    Router::new()
        .route("/login", post(|| async { "ok v=0" }))
        .route(
            "/cart/add",
            post(move |Query(q): Query<Add>| {
                let adds = Arc::clone(&adds);
                async move {
                    let v = adds.fetch_add(1, Ordering::Relaxed) + 1;
                    // The same work on a cart that lives nowhere.
                    let cart = Value::Array(vec![Value::String(q.item)]);
                    format!("items={} v={v}", cart.as_array().map_or(0, Vec::len))
                }
            }),
        )
        .route("/cart", get(|| async { "items=0 user= cart=" }))
        .route("/logout", post(|| async { "ok" }))
}
