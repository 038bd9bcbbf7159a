//! [`WebHost`]: the host API as an async web server uses it.
//!
//! The host's [`Sessions`] handle is `Send` but not `Sync`, and a read is a
//! zero-copy view that must not outlive the call. So a `WebHost` keeps one
//! handle per thread (a runtime's worker threads each get theirs on first
//! use) and hands it out to a closure: nothing is held across an `.await`.
//!
//! What may block goes elsewhere: a miss is fetched from the bank on the
//! blocking pool, at most [`WebConfig::fetches_max`] at once, and a
//! `Replicated` update waits for its acks with timers, never by sleeping a
//! worker thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sessio_engine::{NewSession, Op, SessionError, Sid};
use sessio_remote::{Durability, HostConfig, HostError, Sessions};

/// How a web server uses its host's sessions.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The host API's configuration (arena, bank, limits, sweeper).
    pub host: HostConfig,
    /// How long sessions live: idle and absolute TTLs of new sessions.
    pub new_session: NewSession,
    /// How writes are made durable unless a handler says otherwise.
    pub durability: Durability,
    /// Misses fetched from the bank at once, per process.
    pub fetches_max: usize,
}

impl WebConfig {
    /// Sessions that end after 30 minutes idle, written with
    /// [`Durability::Local`], and 16 fetches at once.
    pub fn new(host: HostConfig) -> WebConfig {
        WebConfig {
            host,
            new_session: NewSession {
                idle_ttl_ms: 30 * 60 * 1000,
                lifetime_ms: 0,
            },
            durability: Durability::Local,
            fetches_max: 16,
        }
    }
}

struct Inner {
    /// Tells this host apart in [`HANDLES`].
    id: u64,
    config: WebConfig,
    /// The handle every thread's own is cloned from.
    template: Mutex<Sessions>,
    fetches: tokio::sync::Semaphore,
}

/// A process's sessions, shared by its threads and tasks. Cheap to clone.
#[derive(Clone)]
pub struct WebHost {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WebHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebHost")
            .field("arena", &self.inner.config.host.location)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// This thread's handle of each host, by [`Inner::id`].
    static HANDLES: RefCell<Vec<(u64, Sessions)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl WebHost {
    /// Opens the host's sessions (creating the arena if it is the first).
    pub fn open(config: WebConfig) -> Result<WebHost, HostError> {
        let template = Sessions::open(config.host.clone())?;
        Ok(WebHost {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                fetches: tokio::sync::Semaphore::new(config.fetches_max.max(1)),
                config,
                template: Mutex::new(template),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WebConfig {
        &self.inner.config
    }

    /// Runs `f` with this thread's handle. Keep `f` short and never await
    /// inside it: reads it makes are views into shared memory.
    pub fn with<R>(&self, f: impl FnOnce(&Sessions) -> R) -> Result<R, HostError> {
        HANDLES.with(|all| {
            let id = self.inner.id;
            {
                let all = all.borrow();
                if let Some((_, s)) = all.iter().find(|(i, _)| *i == id) {
                    return Ok(f(s));
                }
            }
            let mine = self
                .inner
                .template
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .try_clone()?;
            all.borrow_mut().push((id, mine));
            let all = all.borrow();
            let (_, s) = all.last().expect("pushed above");
            Ok(f(s))
        })
    }

    /// Makes sure `sid` is in this host's arena: a no-op when it is, else
    /// a fetch from the bank on the blocking pool.
    pub async fn ensure_local(&self, sid: Sid) -> Result<(), HostError> {
        if self.with(|s| s.is_local(sid))? {
            return Ok(());
        }
        let _permit = self
            .inner
            .fetches
            .acquire()
            .await
            .map_err(|_| HostError::Throttled)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.with(|s| s.read(sid).map(drop))?)
            .await
            .map_err(|e| HostError::Open(format!("the fetch task failed: {e}")))?
    }

    /// Creates a session with the configured TTLs.
    pub fn create(&self, attrs: &[(&str, &[u8])]) -> Result<Sid, HostError> {
        let opts = self.inner.config.new_session;
        self.with(|s| s.create(opts, attrs))?
    }

    /// Applies `ops` to `sid` (fetched first if need be) and makes them as
    /// durable as `durability` asks. Returns the version produced.
    pub async fn update(
        &self,
        sid: Sid,
        ops: &[Op],
        durability: Durability,
    ) -> Result<u64, HostError> {
        // The arena's own update: on a miss it fails at once, and the fetch
        // runs off the async workers (the host API's `update` would fetch
        // right here, blocking this thread). A hit costs no extra read.
        let apply = || {
            self.with(|s| s.arena().update(sid, ops))?
                .map_err(HostError::from)
        };
        let version = match apply() {
            Err(HostError::Session(SessionError::NotFound)) => {
                self.ensure_local(sid).await?;
                apply().map_err(|e| match e {
                    HostError::Session(SessionError::NotFound) => HostError::NotFound,
                    e => e,
                })?
            }
            r => r?,
        };
        if let Durability::Replicated { timeout } = durability {
            self.wait_replicated(sid, version, timeout).await?;
        }
        Ok(version)
    }

    /// Waits, on timers, until `version` of `sid` is acked as
    /// [`Durability::Replicated`] asks, or `timeout` passes.
    pub async fn wait_replicated(
        &self,
        sid: Sid,
        version: u64,
        timeout: Duration,
    ) -> Result<(), HostError> {
        let deadline = Instant::now() + timeout;
        let mut polls = 0u32;
        self.with(Sessions::urge_replication)?;
        loop {
            let (acked, wanted) =
                self.with(|s| Ok::<_, HostError>((s.acks(sid, version)?, s.acks_wanted())))??;
            if acked >= wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HostError::NotReplicated {
                    version,
                    acked,
                    wanted,
                });
            }
            // The replicator ships within about a millisecond: look again
            // soon at first, then on the timer wheel's 1 ms ticks.
            polls += 1;
            if polls < 16 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Ends a session, here and in the bank.
    pub fn invalidate(&self, sid: Sid) -> Result<(), HostError> {
        self.with(|s| s.invalidate(sid))?
    }
}
