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
