//! `sessio-web`: sessio for web servers.
//!
//! - [`WebHost`]: a process's sessions (the host API of `sessio-remote`)
//!   as async code uses them: a handle per thread, misses fetched off the
//!   async workers, durable writes awaited on timers.
//! - [`SessionLayer`] and [`Session`]: the native axum layer, a zero-copy
//!   read and per-key writes per request.
//! - [`SessioStore`]: a tower-sessions `SessionStore`, for apps that
//!   already use tower-sessions; writes per-key diffs.
//!
//! # Example
//!
//! The README's app, compiled here so it stays true:
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use sessio_engine::{ArenaConfig, Location};
//! use sessio_net::Secret;
//! use sessio_remote::{FailoverConfig, HostConfig, Placement};
//! use sessio_web::{Session, SessionLayer, WebConfig, WebError, WebHost};
//!
//! async fn add(session: Session) -> Result<String, WebError> {
//!     session.require()?;                                // 401 without a session
//!     session.push("cart", b"apple".to_vec(), 50);       // one op; no record decoded or copied
//!     Ok(format!("v{}", session.commit().await?))        // Local, or Replicated { timeout }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bank = Placement::new(Placement::parse_members("1=10.0.0.5:7700,2=10.0.0.6:7700")?, 2)?;
//! let host = HostConfig::new(Location::Shm("shop".into()), ArenaConfig::for_sessions(1_000_000, 2048),
//!                            bank, FailoverConfig::new(12, Secret::from_file("bank.key")?));
//! let sessions = WebHost::open(WebConfig::new(host))?;   // in every worker process of the host
//! let app: Router = Router::new().route("/cart/add", post(add)).layer(SessionLayer::new(sessions));
//! # drop(app);
//! # Ok(())
//! # }
//! ```
//!
//! The example shop ([`shop`], the `shop` binary) runs behind nginx as worker
//! processes sharing one arena per host; `shop-e2e` runs it end to end.
//! Worker model, nginx config, durability and concurrent-update semantics:
//! `docs/WEB.md`.

mod host;
mod layer;
pub mod shop;
mod store;

pub use host::{WebConfig, WebHost};
pub use layer::{COOKIE_DEFAULT, CookieConfig, Session, SessionLayer, SessionService, WebError};
pub use store::{LOADED_KEY, SessioStore, StoreExpiry};
