//! [`SessioStore`]: a tower-sessions `SessionStore` over the host API, for
//! apps that already use tower-sessions.
//!
//! - **Ids.** A tower-sessions `Id(i128)` is the SID's 16 bytes, little
//!   endian, so the cookie carries the same bytes either way. `create` lets
//!   the arena draw the SID and hands it back as the record's id.
//! - **Values.** Each key of the record is an attribute holding the value's
//!   JSON.
//! - **Per-key writes.** `load` adds one hidden key, [`LOADED_KEY`]: a hash
//!   of each value as loaded. `save` compares against it and writes only
//!   the keys the request changed (`Set`) or removed (`Remove`). Two
//!   concurrent requests of one session that change different keys both
//!   keep their change, where a store that writes the whole record back
//!   keeps only the last one. A record without the hidden key (new, or
//!   cleared by the app) replaces every key.
//! - **Misses.** `load` of a SID this host does not hold fetches it from
//!   the bank (failover). A forged, expired or throttled SID, or a bank
//!   that does not answer, loads as no session: tower-sessions then starts
//!   a fresh one. It is never a 500.
//! - **Expiry.** tower-sessions' expiry date becomes the session's idle TTL
//!   ([`StoreExpiry::Idle`], for `Expiry::OnInactivity`) or its absolute
//!   lifetime ([`StoreExpiry::Absolute`]), taken at `create`.
//!
//! The store implements the trait of tower-sessions 0.15 (the current
//! release) and of 0.14 (what the published Redis store builds against),
//! so either can be compared with the same app.

use std::collections::HashMap;

use sessio_engine::{NewSession, Op, Sid};
use sessio_remote::{Durability, HostError};
use time::OffsetDateTime;
use xxhash_rust::xxh3::xxh3_64;

use crate::host::WebHost;

/// The hidden key `load` adds to a record: `{key: hash of the value as
/// loaded}`. Never stored.
pub const LOADED_KEY: &str = "__sessio_loaded";

/// What tower-sessions' expiry date becomes in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreExpiry {
    /// An idle TTL: the time from creation to the first expiry date
    /// (`Expiry::OnInactivity`). Reads and writes extend it.
    #[default]
    Idle,
    /// An absolute lifetime ending at the first expiry date
    /// (`Expiry::AtDateTime`).
    Absolute,
}

/// A tower-sessions store backed by sessio. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessioStore {
    host: WebHost,
    expiry: StoreExpiry,
    durability: Durability,
}

/// Why the store failed; what tower-sessions shows as a backend error.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("encoding a value: {0}")]
    Encode(#[from] serde_json::Error),
}

type Data = HashMap<String, serde_json::Value>;

impl SessioStore {
    /// A store over `host`, with idle expiry and the host's durability.
    pub fn new(host: WebHost) -> SessioStore {
        let durability = host.config().durability;
        SessioStore {
            host,
            expiry: StoreExpiry::Idle,
            durability,
        }
    }

    /// Sets how tower-sessions' expiry maps to the arena's.
    #[must_use]
    pub fn with_expiry(mut self, expiry: StoreExpiry) -> SessioStore {
        self.expiry = expiry;
        self
    }

    /// Sets how `save` makes its writes durable.
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> SessioStore {
        self.durability = durability;
        self
    }

    fn sid(id: i128) -> Sid {
        Sid(id.to_le_bytes())
    }

    fn id(sid: Sid) -> i128 {
        i128::from_le_bytes(sid.0)
    }

    /// Creates the session; returns its id.
    fn create_record(&self, data: &Data, expiry: OffsetDateTime) -> Result<i128, StoreError> {
        let ttl_ms = u64::try_from((expiry - OffsetDateTime::now_utc()).whole_milliseconds())
            .unwrap_or(0)
            .max(1);
        let opts = match self.expiry {
            StoreExpiry::Idle => NewSession {
                idle_ttl_ms: ttl_ms,
                lifetime_ms: 0,
            },
            StoreExpiry::Absolute => NewSession {
                idle_ttl_ms: 0,
                lifetime_ms: ttl_ms,
            },
        };
        let values = data
            .iter()
            .filter(|(k, _)| k.as_str() != LOADED_KEY)
            .map(|(k, v)| Ok((k.as_str(), serde_json::to_vec(v)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        let attrs: Vec<(&str, &[u8])> = values.iter().map(|(k, v)| (*k, &v[..])).collect();
        let sid = self.host.with(|s| s.create(opts, &attrs)).and_then(|r| r)?;
        Ok(Self::id(sid))
    }

    /// The record's data and expiry, or `None` for no session.
    async fn load_record(&self, id: i128) -> Result<Option<(Data, OffsetDateTime)>, StoreError> {
        let sid = Self::sid(id);
        match self.host.ensure_local(sid).await {
            Ok(()) => {}
            Err(HostError::NotFound) => return Ok(None),
            Err(e @ (HostError::Throttled | HostError::BankUnavailable { .. })) => {
                tracing::warn!(%sid, "loading as no session: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        self.host.with(|s| -> Result<_, StoreError> {
            let g = match s.read(sid) {
                Ok(g) => g,
                Err(HostError::NotFound) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let d = g.data();
            let mut data = Data::with_capacity(d.attrs.len() + 1);
            let mut loaded = serde_json::Map::with_capacity(d.attrs.len());
            for a in d.attrs.iter() {
                let bytes = a.value.as_slice();
                // A value some other writer stored as not JSON is left
                // out rather than failing the whole session.
                let Ok(v) = serde_json::from_slice(bytes) else {
                    continue;
                };
                loaded.insert(a.key.to_string(), xxh3_64(bytes).into());
                data.insert(a.key.to_string(), v);
            }
            data.insert(LOADED_KEY.to_string(), serde_json::Value::Object(loaded));
            let now = sessio_engine::clock::now_ms();
            let expires_ms = match (d.idle_ttl_ms.to_native(), d.expires_at_ms.to_native()) {
                (0, 0) => now + 365 * 24 * 3600 * 1000,
                (0, at) => at,
                (idle, 0) => now + idle,
                (idle, at) => (now + idle).min(at),
            };
            let expiry =
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires_ms) * 1_000_000)
                    .unwrap_or(OffsetDateTime::now_utc());
            Ok(Some((data, expiry)))
        })?
    }

    /// Writes what the request changed.
    async fn save_record(&self, id: i128, data: &Data) -> Result<(), StoreError> {
        let sid = Self::sid(id);
        let loaded = match data.get(LOADED_KEY) {
            Some(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        };
        let mut ops = Vec::new();
        for (k, v) in data {
            if k == LOADED_KEY {
                continue;
            }
            let bytes = serde_json::to_vec(v)?;
            let h = xxh3_64(&bytes);
            if loaded
                .and_then(|m| m.get(k))
                .and_then(serde_json::Value::as_u64)
                != Some(h)
            {
                ops.push(Op::Set {
                    key: k.clone(),
                    value: bytes,
                });
            }
        }
        if let Some(m) = loaded {
            ops.extend(
                m.keys()
                    .filter(|k| !data.contains_key(*k))
                    .map(|k| Op::Remove { key: k.clone() }),
            );
        } else {
            // New or cleared by the app: whatever else is stored goes.
            self.host.ensure_local(sid).await.or_else(|e| match e {
                HostError::NotFound => Ok(()),
                e => Err(e),
            })?;
            let stored: Vec<String> = self.host.with(|s| {
                s.arena().read(sid).map_or_else(
                    |_| Vec::new(),
                    |g| g.data().attrs.iter().map(|a| a.key.to_string()).collect(),
                )
            })?;
            ops.extend(
                stored
                    .into_iter()
                    .filter(|k| !data.contains_key(k))
                    .map(|key| Op::Remove { key }),
            );
        }
        if ops.is_empty() {
            return Ok(());
        }
        match self.host.update(sid, &ops, self.durability).await {
            // Expired or ended meanwhile: like a store's "set if exists".
            Ok(_) | Err(HostError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The `SessionStore` of one tower-sessions release.
macro_rules! session_store_for {
    ($core:ident) => {
        #[async_trait::async_trait]
        impl $core::SessionStore for SessioStore {
            async fn create(
                &self,
                record: &mut $core::session::Record,
            ) -> $core::session_store::Result<()> {
                let id = self
                    .create_record(&record.data, record.expiry_date)
                    .map_err(|e| $core::session_store::Error::Backend(e.to_string()))?;
                record.id = $core::session::Id(id);
                Ok(())
            }

            async fn save(
                &self,
                record: &$core::session::Record,
            ) -> $core::session_store::Result<()> {
                self.save_record(record.id.0, &record.data)
                    .await
                    .map_err(|e| $core::session_store::Error::Backend(e.to_string()))
            }

            async fn load(
                &self,
                id: &$core::session::Id,
            ) -> $core::session_store::Result<Option<$core::session::Record>> {
                let found = self
                    .load_record(id.0)
                    .await
                    .map_err(|e| $core::session_store::Error::Backend(e.to_string()))?;
                Ok(found.map(|(data, expiry_date)| $core::session::Record {
                    id: *id,
                    data,
                    expiry_date,
                }))
            }

            async fn delete(&self, id: &$core::session::Id) -> $core::session_store::Result<()> {
                self.host
                    .invalidate(Self::sid(id.0))
                    .map_err(|e| $core::session_store::Error::Backend(e.to_string()))
            }
        }
    };
}

session_store_for!(tower_sessions_core);
session_store_for!(tower_sessions_core_014);
