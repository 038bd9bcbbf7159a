//! Failover: a session this host does not hold is fetched from the bank and
//! installed in the arena under a new ownership epoch.
//!
//! [`fetch_and_install`] asks the session's owners first, all at once, and
//! keeps the copy with the highest `(epoch, version)`; if no owner has one
//! it asks the next nodes of the ranking, as many as there are owners (a
//! copy may sit on a hinted stand-in), and no more. The copy
//! is installed with `epoch + 1`: this host owns the session now. It then
//! pushes that copy to the owners it can reach, so they hold the new epoch
//! at once and refuse the old host's late deltas (fencing) without waiting
//! for this host's replicator.
//!
//! Threads of one process that miss the same SID at the same time cause
//! one fetch: the first becomes the leader, the others wait for its result
//! ([`Singleflight`]). Each thread keeps its own [`NodeClients`]
//! (connections live on that thread's runtime); they share one
//! `Arc<Singleflight>`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use sessio_engine::{Arena, SessionError, Sid};
use sessio_net::{
    AckStatus, Client, ClientConfig, Delta, DeltaBatch, DeltaEntry, Fetch, Identity, IoUring,
    Message, Secret,
};

use crate::placement::Placement;
use crate::runtime::Rt;

/// Why a failover fetch did not install the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailoverError {
    /// No node that answered has a copy.
    #[error("no replica holds the session ({asked} nodes asked, {answered} answered)")]
    NotFound {
        /// Nodes asked.
        asked: usize,
        /// Nodes that answered.
        answered: usize,
    },
    /// The copy could not be installed (bad snapshot, arena full...).
    #[error("installing the fetched copy: {0}")]
    Install(String),
    /// No runtime could be built on this thread.
    #[error("no I/O runtime: {0}")]
    Runtime(String),
}

/// A session installed by failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Version installed.
    pub version: u64,
    /// Ownership epoch installed (the fetched copy's plus one).
    pub epoch: u64,
    /// Node the copy came from (0: another process installed it first).
    pub from: u16,
    /// Owners that acknowledged the copy under the new epoch.
    pub fenced: usize,
}

struct Flight {
    result: Mutex<Option<Result<Fetched, FailoverError>>>,
    done: Condvar,
}

/// Fetches in progress in this process, by SID: one per SID at a time.
#[derive(Default)]
pub struct Singleflight {
    flights: Mutex<HashMap<Sid, Arc<Flight>>>,
}

impl std::fmt::Debug for Singleflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.flights.lock().map_or(0, |m| m.len());
        f.debug_struct("Singleflight")
            .field("in_progress", &n)
            .finish()
    }
}

impl Singleflight {
    /// Runs `fetch` unless a fetch of `sid` is in progress, in which case
    /// waits for that one's result. Returns the result and whether this
    /// call was the one that fetched.
    pub fn run(
        &self,
        sid: Sid,
        fetch: impl FnOnce() -> Result<Fetched, FailoverError>,
    ) -> (Result<Fetched, FailoverError>, bool) {
        let (flight, leader) = {
            let mut m = self
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(f) = m.get(&sid) {
                (Arc::clone(f), false)
            } else {
                let f = Arc::new(Flight {
                    result: Mutex::new(None),
                    done: Condvar::new(),
                });
                m.insert(sid, Arc::clone(&f));
                (f, true)
            }
        };
        if leader {
            // The flight is removed and waiters woken even if `fetch` panics.
            struct Land<'a>(&'a Singleflight, Sid, &'a Flight);
            impl Drop for Land<'_> {
                fn drop(&mut self) {
                    let mut r = self
                        .2
                        .result
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if r.is_none() {
                        *r = Some(Err(FailoverError::Runtime(
                            "the fetching thread panicked".into(),
                        )));
                    }
                    self.2.done.notify_all();
                    drop(r);
                    self.0
                        .flights
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&self.1);
                }
            }
            let land = Land(self, sid, &flight);
            let r = fetch();
            *flight
                .result
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r.clone());
            drop(land);
            (r, true)
        } else {
            let mut r = flight
                .result
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while r.is_none() {
                r = flight
                    .done
                    .wait(r)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            (r.clone().expect("checked above"), false)
        }
    }
}

/// Default for [`FailoverConfig::request_timeout_ms`].
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 500;

/// How failover fetches behave.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// This host's id in handshakes.
    pub host_id: u64,
    /// The bank's shared secret.
    pub secret: Secret,
    /// Connect, handshake and one request each get this long, in ms.
    pub request_timeout_ms: u64,
    /// Push the installed copy to the owners under the new epoch.
    pub fence_owners: bool,
}

impl FailoverConfig {
    /// Defaults for everything but the host id and secret.
    pub fn new(host_id: u64, secret: Secret) -> FailoverConfig {
        FailoverConfig {
            host_id,
            secret,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            fence_owners: true,
        }
    }
}

/// One thread's connections to the bank, opened on first use and reopened
/// after a failure.
pub struct NodeClients<B: Rt = IoUring> {
    rt: B::Runtime,
    config: FailoverConfig,
    identity: Identity,
    clients: HashMap<u16, Client<B>>,
    flights: Arc<Singleflight>,
    next_request: u64,
}

impl<B: Rt> std::fmt::Debug for NodeClients<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClients")
            .field("connected", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl<B: Rt> NodeClients<B> {
    /// Connections for this thread, sharing `flights` with the process's
    /// other threads.
    pub fn new(config: FailoverConfig, flights: Arc<Singleflight>) -> Result<Self, FailoverError> {
        let rt = B::runtime().map_err(|e| FailoverError::Runtime(e.to_string()))?;
        let identity = Identity::with_random_incarnation(config.host_id)
            .map_err(|e| FailoverError::Runtime(e.to_string()))?;
        Ok(NodeClients {
            rt,
            config,
            identity,
            clients: HashMap::new(),
            flights,
            next_request: 1,
        })
    }

    /// The shared in-progress table.
    pub fn flights(&self) -> &Arc<Singleflight> {
        &self.flights
    }

    /// Sends one request to each of `nodes` at once; one reply (or `None`)
    /// per node, in order.
    fn ask_all(
        &mut self,
        placement: &Placement,
        nodes: &[u16],
        msg: impl Fn(u64) -> Message,
    ) -> Vec<Option<Message>> {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let mut cc = ClientConfig::new(self.identity);
        cc.handshake_timeout_ms = self.config.request_timeout_ms;
        cc.io_timeout_ms = self.config.request_timeout_ms;
        let jobs: Vec<_> = nodes
            .iter()
            .map(|&id| {
                self.next_request += 1;
                (
                    id,
                    placement.member(id).map(|m| m.addr),
                    self.clients.remove(&id),
                    msg(self.next_request),
                )
            })
            .collect();
        let secret = &self.config.secret;
        let results = B::run(&self.rt, async {
            let futs = jobs.into_iter().map(|(id, addr, client, msg)| {
                let cc = cc.clone();
                async move {
                    let Some(addr) = addr else {
                        return (id, None, None);
                    };
                    let attempt = async {
                        let mut c = match client {
                            Some(c) => c,
                            None => Client::<B>::connect(addr, cc, secret.clone()).await.ok()?,
                        };
                        // Only the node configured at this address counts
                        // (the replicator refuses the others the same way).
                        if c.peer().identity.id != u64::from(id) {
                            tracing::warn!(
                                node = id,
                                proved = c.peer().identity.id,
                                "refusing a node that proved another id than configured"
                            );
                            return None;
                        }
                        let reply = c.call(&msg).await.ok()?;
                        Some((c, reply))
                    };
                    match B::timeout(timeout, attempt).await {
                        Ok(Some((c, reply))) => (id, Some(c), Some(reply)),
                        _ => (id, None, None),
                    }
                }
            });
            futures_util::future::join_all(futs).await
        });
        results
            .into_iter()
            .map(|(id, client, reply)| {
                if let Some(c) = client {
                    self.clients.insert(id, c);
                }
                reply
            })
            .collect()
    }

    /// The best copy among `nodes`: highest `(epoch, version)`.
    fn best_copy(
        &mut self,
        placement: &Placement,
        sid: Sid,
        nodes: &[u16],
    ) -> (Option<(u16, sessio_net::FoundRecord)>, usize) {
        let replies = self.ask_all(placement, nodes, |request_id| {
            Message::Fetch(Fetch {
                request_id,
                sid: sid.0,
            })
        });
        let mut answered = 0;
        let mut best: Option<(u16, sessio_net::FoundRecord)> = None;
        for (&id, reply) in nodes.iter().zip(replies) {
            let Some(Message::FetchReply(r)) = reply else {
                continue;
            };
            answered += 1;
            if r.sid != sid.0 {
                continue;
            }
            if let Some(found) = r.found
                && best
                    .as_ref()
                    .is_none_or(|(_, b)| (found.epoch, found.version) > (b.epoch, b.version))
            {
                best = Some((id, found));
            }
        }
        (best, answered)
    }
}

/// Fetches `sid` from the bank and installs it in `arena` under the next
/// ownership epoch (see the module docs). Concurrent calls for one SID in
/// this process share one fetch.
pub fn fetch_and_install<B: Rt>(
    arena: &Arena,
    sid: Sid,
    placement: &Placement,
    clients: &mut NodeClients<B>,
) -> Result<Fetched, FailoverError> {
    let flights = Arc::clone(&clients.flights);
    let (r, leader) = flights.run(sid, || fetch_once(arena, sid, placement, clients));
    if !leader {
        // The leader installed through its own handle; ours sees the same
        // shared arena.
        return r.map(|f| Fetched { from: 0, ..f });
    }
    r
}

/// The session as this host holds it already (`from` 0: no node asked).
fn held_here(arena: &Arena, sid: Sid) -> Option<Fetched> {
    arena.read(sid).ok().map(|g| Fetched {
        version: g.version(),
        epoch: g.epoch(),
        from: 0,
        fenced: 0,
    })
}

fn fetch_once<B: Rt>(
    arena: &Arena,
    sid: Sid,
    placement: &Placement,
    clients: &mut NodeClients<B>,
) -> Result<Fetched, FailoverError> {
    if let Some(held) = held_here(arena, sid) {
        return Ok(held);
    }
    let started = Instant::now();
    let owners = placement.owners(&sid.0);
    let (mut best, mut answered) = clients.best_copy(placement, sid, &owners);
    let mut asked = owners.len();
    if best.is_none() {
        // The stand-ins an outage of the owners would have used: the next
        // nodes of the ranking, as many as there are owners. Never the
        // whole bank, so a made-up SID costs a bounded query.
        let rest: Vec<u16> = placement
            .ranking(&sid.0)
            .into_iter()
            .filter(|id| !owners.contains(id))
            .take(owners.len())
            .collect();
        asked += rest.len();
        let (b, a) = clients.best_copy(placement, sid, &rest);
        best = b;
        answered += a;
    }
    let Some((from, found)) = best else {
        return Err(FailoverError::NotFound { asked, answered });
    };
    let epoch = found.epoch + 1;
    match arena.install(sid, &found.record, found.version, epoch) {
        Ok(_) => {}
        // Another process of this host installed it (or a newer copy) first.
        Err(SessionError::StaleEpoch { .. }) => {
            if let Some(held) = held_here(arena, sid) {
                return Ok(held);
            }
            return Err(FailoverError::Install(
                "a newer copy is installed but unreadable".into(),
            ));
        }
        Err(e) => return Err(FailoverError::Install(e.to_string())),
    }
    tracing::debug!(%sid, from, version = found.version, epoch, "failover install in {:?}", started.elapsed());
    let mut fenced = 0;
    if clients.config.fence_owners {
        let copy = arena
            .read(sid)
            .ok()
            .map(|g| (g.version(), g.epoch(), g.bytes().to_vec()));
        if let Some((version, epoch, record)) = copy {
            let host_id = clients.config.host_id;
            let replies = clients.ask_all(placement, &owners, |_| {
                Message::DeltaBatch(DeltaBatch {
                    host_id,
                    entries: vec![DeltaEntry {
                        sid: sid.0,
                        base_version: 0,
                        new_version: version,
                        epoch,
                        body: Delta::Full(record.clone()),
                    }],
                })
            });
            fenced = replies
                .iter()
                .filter(|r| match r {
                    Some(Message::AllApplied(_)) => true,
                    Some(Message::Ack(a)) => a
                        .entries
                        .first()
                        .is_some_and(|e| e.status == AckStatus::Applied),
                    _ => false,
                })
                .count();
        }
    }
    Ok(Fetched {
        version: found.version,
        epoch,
        from,
        fenced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn singleflight_runs_one_fetch_per_sid() {
        let sf = Arc::new(Singleflight::default());
        let calls = Arc::new(AtomicU32::new(0));
        let sid = Sid([3; 16]);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (sf, calls) = (Arc::clone(&sf), Arc::clone(&calls));
                std::thread::spawn(move || {
                    sf.run(sid, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(Fetched {
                            version: 7,
                            epoch: 2,
                            from: 1,
                            fenced: 2,
                        })
                    })
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, leader)| *leader).count(), 1);
        assert!(
            results
                .iter()
                .all(|(r, _)| r.as_ref().unwrap().version == 7)
        );
        // Done flights are forgotten: the next miss fetches again.
        let (r, leader) = sf.run(sid, || {
            Err(FailoverError::NotFound {
                asked: 2,
                answered: 2,
            })
        });
        assert!(leader && r.is_err());
    }
}
