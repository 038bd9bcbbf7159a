//! The sessio side of the networked workloads, on `sessio-net`: a node
//! server on its own thread and runtime, and a client that pipelines
//! `DeltaBatch`es (or sends `Fetch`es) to it from the calling thread.
//!
//! Three kinds of node:
//! - [`Node::Ack`]: acknowledges every entry and keeps nothing: the
//!   transport alone, for `io_uring` against epoll.
//! - [`Node::Store`]: the replica node's own store (`sessio_remote::Store`):
//!   checks base versions and epochs, applies each op delta to the archived
//!   session and re-archives it, acknowledges.
//! - [`Node::Records`]: the same store, loaded with these records, answering
//!   `Fetch`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sessio_net::{
    Ack, AckStatus, Backend, Client, ClientConfig, Delta, DeltaBatch, DeltaEntry, Fetch,
    FetchReply, FoundRecord, Identity, IoUring, Message, Received, Secret, Server, ServerConfig,
    Shutdown, Sid,
};

use crate::BoxError;

/// The secret every node and client of the harness shares.
pub const SECRET: [u8; 32] = [0x5E; 32];
const NODE_ID: u64 = 1000;
pub const HOST_ID: u64 = 7;

/// Runs `f` to completion on a fresh runtime of `B`'s kind.
pub fn block_on<B: Backend, F: Future>(f: F) -> Result<F::Output, BoxError> {
    Ok(B::run(&B::runtime()?, f))
}

/// Whether this kernel (and its seccomp policy) lets us use `io_uring`.
pub fn uring_available() -> Result<(), String> {
    IoUring::runtime().map(drop).map_err(|e| e.to_string())
}

/// How the connections of a node and its clients protect their records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frames {
    /// Sealed, as always in production.
    Sealed,
    /// Laid out and counted the same, not encrypted or authenticated
    /// (`sessio-net`'s bench-only `unsealed-bench` feature): the baseline
    /// that tells what sealing costs in the same run.
    Unsealed,
}

/// What the node does with what it receives.
pub enum Node {
    /// Acknowledge every entry.
    Ack,
    /// Apply every entry to a SID → (version, bytes) map, then acknowledge.
    Store,
    /// Serve fetches of these records.
    Records(Vec<(Sid, FoundRecord)>),
}

/// A node server on its own thread; stopped and joined when dropped.
pub struct NodeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its thread's name, as the kernel keeps it: `node-` and the
    /// backend's name, `plain-` instead for an unsealed node, so a profile
    /// and the harness's CPU counts tell the nodes of a run apart.
    pub thread_name: String,
    stop: Shutdown,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl NodeServer {
    /// Starts a node of `kind` on a free loopback port, on backend `B`.
    pub fn start<B: Backend>(kind: Node) -> Result<NodeServer, BoxError> {
        Self::start_with::<B>(kind, Frames::Sealed)
    }

    /// [`NodeServer::start`], its connections' records protected as
    /// `frames` says.
    pub fn start_with<B: Backend>(kind: Node, frames: Frames) -> Result<NodeServer, BoxError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Shutdown::new();
        let thread_name = match frames {
            Frames::Sealed => format!("node-{}", B::NAME),
            Frames::Unsealed => format!("plain-{}", B::NAME),
        };
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn({
                let shutdown = stop.wait();
                move || -> Result<(), String> {
                    let early = tx.clone();
                    let run = block_on::<B, _>(async move {
                        let config = ServerConfig::new(Identity {
                            id: NODE_ID,
                            incarnation: 1,
                        });
                        let (addr, secret) = (
                            SocketAddr::from(([127, 0, 0, 1], 0)),
                            Secret::from_bytes(SECRET),
                        );
                        let bound = match frames {
                            Frames::Sealed => Server::<B>::bind(addr, config, secret),
                            Frames::Unsealed => Server::<B>::bind_unsealed(addr, config, secret),
                        };
                        let server = match bound {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(e.to_string()));
                                return Ok(());
                            }
                        };
                        let _ = tx.send(Ok(server.local_addr()));
                        match kind {
                            Node::Ack => server.serve_until(ack_all, shutdown).await,
                            Node::Store => {
                                let mut store = replica_store(&[]);
                                let h = move |peer: sessio_net::PeerInfo, msg: Received<'_>| {
                                    store.handle(peer.identity.id, msg)
                                };
                                server.serve_until(h, shutdown).await
                            }
                            Node::Records(records) => {
                                let mut store = replica_store(&records);
                                let h = move |peer: sessio_net::PeerInfo, msg: Received<'_>| {
                                    store.handle(peer.identity.id, msg)
                                };
                                server.serve_until(h, shutdown).await
                            }
                        }
                    });
                    match run {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => {
                            let _ = early.send(Err(e.to_string()));
                            Err(e.to_string())
                        }
                    }
                }
            })?;
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("node thread did not start: {e}"))??;
        Ok(NodeServer {
            addr,
            thread_name,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        self.stop.fire();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("node server: {e}"),
                Err(_) => eprintln!("node server thread panicked"),
            }
        }
    }
}

#[allow(clippy::needless_pass_by_value)] // the signature the server calls
fn ack_all(_peer: sessio_net::PeerInfo, msg: Received<'_>) -> Option<Message> {
    // Read where it arrived, and answered as a node answers a batch it
    // applied whole.
    match msg {
        Received::DeltaBatch(b) => {
            let named = || b.entries.iter().map(|e| (e.sid, e.new_version.to_native()));
            Some(Ack::all_applied(named()).into_reply(named().map(|(_, v)| v)))
        }
        Received::Message(_) => None,
    }
}

/// A replica node's store (the real one of `sessio-remote`), holding
/// `records` as full copies.
fn replica_store(records: &[(Sid, FoundRecord)]) -> sessio_remote::Store {
    let mut store = sessio_remote::Store::new(
        sessio_remote::NodeLimits {
            sessions_max: 1 << 24,
            bytes_max: 1 << 34,
        },
        1,
    );
    for chunk in records.chunks(256) {
        let entries = chunk
            .iter()
            .map(|(sid, r)| DeltaEntry {
                sid: *sid,
                base_version: 0,
                new_version: r.version,
                epoch: r.epoch,
                body: Delta::Full(r.record.clone()),
            })
            .collect();
        let ack = store.apply_batch(&DeltaBatch {
            host_id: HOST_ID,
            entries,
        });
        assert!(
            ack.entries.iter().all(|e| e.status == AckStatus::Applied),
            "loading the replica store"
        );
    }
    store
}

/// A client connection to a node, as the harness's host.
pub async fn connect<B: Backend>(addr: SocketAddr) -> Result<Client<B>, BoxError> {
    connect_with::<B>(addr, Frames::Sealed).await
}

/// [`connect`], its records protected as `frames` says (as the node's).
pub async fn connect_with<B: Backend>(
    addr: SocketAddr,
    frames: Frames,
) -> Result<Client<B>, BoxError> {
    let config = ClientConfig::new(Identity {
        id: HOST_ID,
        incarnation: 1,
    });
    let secret = Secret::from_bytes(SECRET);
    Ok(match frames {
        Frames::Sealed => Client::<B>::connect(addr, config, secret).await?,
        Frames::Unsealed => Client::<B>::connect_unsealed(addr, config, secret).await?,
    })
}

/// What one [`pump`] did.
pub struct Pumped {
    /// Deltas acknowledged as applied.
    pub acked: u64,
    /// Seconds from the first batch sent to the last reply.
    pub secs: f64,
}

impl Pumped {
    /// Deltas acknowledged per second.
    pub fn per_sec(&self) -> f64 {
        self.acked as f64 / self.secs
    }
}

/// Deltas acknowledged by one client connection that pipelines
/// batches of `batch` entries of `delta_bytes` each, up to `max_batches`
/// batches or `max_time`, whichever ends first. `versions` holds the version
/// the node has of each SID in `sids` and is advanced, so a `Store` node
/// sees a proper version chain across rounds. `frames` must be the node's.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
pub fn pump<B: Backend>(
    addr: SocketAddr,
    frames: Frames,
    batch: usize,
    delta_bytes: usize,
    sids: &[Sid],
    versions: &mut [u64],
    max_batches: u64,
    max_time: Duration,
) -> Result<Pumped, BoxError> {
    assert_eq!(sids.len(), versions.len());
    assert!(sids.len() >= batch, "a batch names each SID at most once");
    block_on::<B, _>(async move {
        let mut client = connect_with::<B>(addr, frames).await?;
        let (record, ops) = sessio_benches::replica_payloads(delta_bytes);
        let entry = |sid| DeltaEntry {
            sid,
            base_version: 0,
            new_version: 0,
            epoch: 1,
            body: Delta::Ops(ops.clone()),
        };
        let mut msg = Message::DeltaBatch(DeltaBatch {
            host_id: HOST_ID,
            entries: (0..batch).map(|_| entry([0; 16])).collect(),
        });
        let (mut sent, mut replies, mut acked, mut refused) = (0u64, 0u64, 0u64, 0u64);
        let mut next = 0usize;
        let start = Instant::now();
        while sent < max_batches && start.elapsed() < max_time {
            let Message::DeltaBatch(b) = &mut msg else {
                unreachable!("built as a batch above")
            };
            for e in &mut b.entries {
                let i = next;
                next = (next + 1) % sids.len();
                e.sid = sids[i];
                // A SID the node does not hold yet gets its whole record
                // first, as the replicator sends it; then op deltas.
                e.body = if versions[i] == 0 {
                    Delta::Full(record.clone())
                } else {
                    Delta::Ops(ops.clone())
                };
                e.base_version = versions[i];
                versions[i] += 1;
                e.new_version = versions[i];
            }
            client
                .send_with(&msg, |r| {
                    replies += 1;
                    count(&r, &mut acked, &mut refused);
                })
                .await?;
            sent += 1;
        }
        while replies < sent {
            let r = client.recv().await?;
            replies += 1;
            count(&r, &mut acked, &mut refused);
        }
        let secs = start.elapsed().as_secs_f64();
        if refused != 0 || acked != sent * batch as u64 {
            return Err(format!(
                "{} of {} deltas acknowledged as applied ({refused} refused)",
                acked,
                sent * batch as u64
            )
            .into());
        }
        Ok(Pumped { acked, secs })
    })?
}

fn count(reply: &Message, acked: &mut u64, refused: &mut u64) {
    match reply {
        Message::Ack(a) => {
            for e in &a.entries {
                if e.status == AckStatus::Applied {
                    *acked += 1;
                } else {
                    *refused += 1;
                }
            }
        }
        Message::AllApplied(a) => *acked += u64::from(a.entries),
        _ => {}
    }
}

/// Times of one failover: the fetch round trip, and installing the fetched
/// record into the local arena plus reading one attribute of it.
pub struct FailoverTimes {
    /// Round trip of `Fetch` → `FetchReply`, per fetch, in ns.
    pub fetch_ns: Vec<f64>,
    /// The whole first request (fetch, install, read), per fetch, in ns.
    pub total_ns: Vec<f64>,
}

/// Fetches each SID of `sids` (one synchronous request at a time, as a web
/// worker on its first request for a moved session), installs it with
/// `install` and reads it back with `read`, stopping after `max_time`.
pub fn failover<B: Backend>(
    addr: SocketAddr,
    sids: &[Sid],
    max_time: Duration,
    mut install: impl FnMut(Sid, &FoundRecord) -> Result<(), BoxError>,
) -> Result<FailoverTimes, BoxError> {
    block_on::<B, _>(async move {
        let mut client = connect::<B>(addr).await?;
        let mut times = FailoverTimes {
            fetch_ns: Vec::with_capacity(sids.len()),
            total_ns: Vec::with_capacity(sids.len()),
        };
        let start = Instant::now();
        for (i, &sid) in sids.iter().enumerate() {
            if start.elapsed() >= max_time {
                break;
            }
            let t0 = Instant::now();
            let reply = client
                .call(&Message::Fetch(Fetch {
                    request_id: i as u64,
                    sid,
                }))
                .await?;
            let t1 = Instant::now();
            let Message::FetchReply(FetchReply {
                found: Some(rec), ..
            }) = reply
            else {
                return Err(format!("fetch of a stored session answered {reply:?}").into());
            };
            install(sid, &rec)?;
            let t2 = Instant::now();
            times.fetch_ns.push((t1 - t0).as_nanos() as f64);
            times.total_ns.push((t2 - t0).as_nanos() as f64);
        }
        Ok(times)
    })?
}
