//! Serving a [`Store`](super::Store) on one thread or several sharing a
//! port, and a node on a thread of its own for tests and benchmarks.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use sessio_net::{
    FireOnDrop, Identity, Message, PeerInfo, Received, Secret, Server, ServerConfig, Shutdown,
};

use super::{BIND_RETRY_MS, EXPIRE_INTERVAL_MS_DEFAULT, ExpiryRule, NodeLimits};
use crate::runtime::Rt;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Node id (handshake id and placement id).
    pub node_id: u16,
    /// What the node agrees to hold.
    pub limits: NodeLimits,
    /// Most open connections.
    pub connections_max: u32,
    /// An authenticated connection idle this long is closed, in ms.
    pub idle_timeout_ms: u64,
    /// Threads serving connections (one runtime each, sharing the port
    /// through `SO_REUSEPORT`, the store split into as many shards; 1 to
    /// [`super::shards::SHARDS_MAX`]). The kernel spreads connections, so
    /// more threads help once several hosts connect.
    pub threads: usize,
    /// When the node drops copies on its own.
    pub expiry: ExpiryRule,
    /// How often an expiry pass runs, in ms (0 = never).
    pub expire_interval_ms: u64,
    /// Networks hosts may connect from; empty: any.
    pub allow: Vec<ipnet::IpNet>,
    /// Most connections in the handshake, per serving thread.
    pub handshakes_max: u32,
    /// Most connections in the handshake from one address, per serving
    /// thread.
    pub handshakes_per_addr_max: u32,
}

impl NodeConfig {
    /// Defaults for everything but where it listens and its id.
    pub fn new(listen: SocketAddr, node_id: u16) -> NodeConfig {
        NodeConfig {
            listen,
            node_id,
            limits: NodeLimits::default(),
            connections_max: sessio_net::server::CONNECTIONS_MAX_DEFAULT,
            idle_timeout_ms: sessio_net::server::IDLE_TIMEOUT_MS_DEFAULT,
            threads: 1,
            expiry: ExpiryRule::default(),
            expire_interval_ms: EXPIRE_INTERVAL_MS_DEFAULT,
            allow: Vec::new(),
            handshakes_max: sessio_net::server::HANDSHAKES_MAX_DEFAULT,
            handshakes_per_addr_max: sessio_net::server::HANDSHAKES_PER_ADDR_MAX_DEFAULT,
        }
    }
}

/// Answers one message: the store's answer, and in a `Stats` reply the
/// transport's counters as well (`net_*`: connections open, refused,
/// evicted, handshakes failed...), summed over the serving threads.
fn answer(
    shards: &super::shards::Shards,
    net: &sessio_net::ServerStats,
    peer: &PeerInfo,
    msg: Received<'_>,
) -> Option<Message> {
    match shards.handle(peer.identity.id, msg) {
        Some(Message::Stats(mut s)) => {
            s.counters.extend(
                net.counters()
                    .iter()
                    .map(|&(name, value)| sessio_net::Counter {
                        name: format!("net_{name}"),
                        value,
                    }),
            );
            Some(Message::Stats(s))
        }
        other => other,
    }
}

/// Runs a node until `shutdown` completes: on the current thread, plus
/// `config.threads - 1` more that share its port and its store (in shards).
/// Calls `on_bound` with the bound address and the incarnation once every
/// thread listens.
pub fn serve<B: Rt>(
    config: &NodeConfig,
    secret: Secret,
    on_bound: impl FnOnce(SocketAddr, u64),
    shutdown: impl Future<Output = ()> + 'static,
) -> io::Result<()> {
    use std::sync::Arc;
    let identity = Identity::with_random_incarnation(u64::from(config.node_id))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let threads = config.threads.clamp(1, super::shards::SHARDS_MAX);
    let threads_u32 = u32::try_from(threads).unwrap_or(u32::MAX);
    if config.connections_max < threads_u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "connections_max {} cannot be split among {threads} threads: give at least one per thread",
                config.connections_max
            ),
        ));
    }
    let share = |t: usize| connection_share(config.connections_max, threads_u32, t);
    let mut sc = ServerConfig::new(identity);
    sc.connections_max = share(0);
    sc.idle_timeout_ms = config.idle_timeout_ms;
    sc.allow.clone_from(&config.allow);
    sc.handshakes_max = config.handshakes_max;
    sc.handshakes_per_addr_max = config.handshakes_per_addr_max;
    let net = Arc::new(sessio_net::ServerStats::default());
    // One listening socket, shared by every serving thread (each takes a
    // clone of it): no SO_REUSEPORT, so no other process can bind the
    // port and take a share of the connections.
    sc.socket.reuse_port = false;
    let shards = Arc::new(super::shards::Shards::new(
        config.limits,
        identity.incarnation,
        threads,
    ));
    // The other serving threads stop when this one leaves `serve`, however
    // it leaves (a panic too).
    let stop = Shutdown::new();
    let listen = config.listen;
    let node_id = config.node_id;
    let expiry = config.expiry;
    let expiry_every = std::time::Duration::from_millis(config.expire_interval_ms);
    let _stop_others = FireOnDrop(stop.clone());
    B::block_on(async move {
        // A node restarted at once can find its port still held: io_uring
        // tears a dead process's ring down asynchronously, and a pending
        // accept keeps the old listener alive for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(BIND_RETRY_MS);
        let listener = loop {
            match sessio_net::bind_listener(listen, &sc.socket) {
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    B::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("bind {listen}: {e}"))),
                Ok(l) => break l,
            }
        };
        let server: Server<B> =
            Server::from_listener(listener.try_clone()?, sc.clone(), secret.clone())?
                .with_stats(Arc::clone(&net));
        let addr = server.local_addr();
        let mut others = Vec::with_capacity(threads - 1);
        let mut failed = None;
        for t in 1..threads {
            let (tx, rx) = std::sync::mpsc::channel();
            let (shards, stop, net) = (Arc::clone(&shards), stop.clone(), Arc::clone(&net));
            let (mut sc, secret) = (sc.clone(), secret.clone());
            sc.connections_max = share(t);
            let shared = listener.try_clone();
            let spawned = std::thread::Builder::new()
                .name(format!("node-{node_id}-{t}"))
                .spawn(move || {
                    B::block_on(async move {
                        let server =
                            match shared.and_then(|l| Server::<B>::from_listener(l, sc, secret)) {
                                Ok(s) => s.with_stats(net.clone()),
                                Err(e) => {
                                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                                    return Err(e);
                                }
                            };
                        let _ = tx.send(Ok(()));
                        let handler = move |peer: PeerInfo, msg: Received<'_>| {
                            answer(&shards, &net, &peer, msg)
                        };
                        server.serve_until(handler, stop.wait()).await
                    })
                });
            match spawned.map(|h| (h, rx.recv())) {
                Ok((h, Ok(Ok(())))) => others.push(h),
                Ok((h, Ok(Err(e)))) => {
                    let _ = h.join();
                    failed = Some(e);
                    break;
                }
                Ok((h, Err(_))) => {
                    let _ = h.join();
                    failed = Some(io::Error::other("a node thread ended before it listened"));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let result = if let Some(e) = failed {
            Err(e)
        } else {
            on_bound(addr, identity.incarnation);
            let handler = {
                let (shards, net) = (Arc::clone(&shards), Arc::clone(&net));
                move |peer: PeerInfo, msg: Received<'_>| answer(&shards, &net, &peer, msg)
            };
            // Expiry and idle-fold passes run on this thread between
            // messages.
            let expire = async {
                if expiry_every.is_zero() {
                    return std::future::pending().await;
                }
                loop {
                    B::sleep(expiry_every).await;
                    let now = sessio_engine::clock::now_ms();
                    let dropped = shards.expire(now, expiry);
                    if dropped > 0 {
                        tracing::debug!(dropped, "expired copies");
                    }
                    let folded = shards.fold_idle(now);
                    if folded > 0 {
                        tracing::debug!(folded, "folded idle copies");
                    }
                }
            };
            let serving = std::pin::pin!(server.serve_until(handler, shutdown));
            let expire = std::pin::pin!(expire);
            match futures_util::future::select(serving, expire).await {
                futures_util::future::Either::Left((r, _)) => r,
                futures_util::future::Either::Right((never, _)) => never,
            }
        };
        stop.fire();
        for h in others {
            let _ = h.join();
        }
        result
    })
}

/// Thread `t`'s part of a node's connection cap `total` over `threads`:
/// the parts add up to `total` exactly (the first `total % threads`
/// threads take one more).
fn connection_share(total: u32, threads: u32, t: usize) -> u32 {
    total / threads + u32::from((t as u32) < total % threads)
}

/// A node served on a thread of this process: for embedding a node in
/// another program, and for tests and benchmarks on loopback. Stopped (and
/// its thread joined) when dropped.
#[derive(Debug)]
pub struct LocalNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its incarnation id.
    pub incarnation: u64,
    stop: Shutdown,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl LocalNode {
    /// Starts `serve` with `config` on a new thread, on backend `B`; returns
    /// once it listens.
    pub fn start<B: Rt>(config: NodeConfig, secret: Secret) -> io::Result<LocalNode> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Shutdown::new();
        let thread = std::thread::Builder::new()
            .name(format!("node-{}", config.node_id))
            .spawn({
                let shutdown = stop.wait();
                move || {
                    serve::<B>(
                        &config,
                        secret,
                        |addr, inc| {
                            // The starter waits for this; if it is gone, nobody is listening.
                            let _ = tx.send((addr, inc));
                        },
                        shutdown,
                    )
                }
            })?;
        match rx.recv() {
            Ok((addr, incarnation)) => Ok(LocalNode {
                addr,
                incarnation,
                stop,
                thread: Some(thread),
            }),
            // The thread ended before binding: its error says why.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(io::Error::other("the node thread ended before it listened")),
            },
        }
    }
}

/// A bank of [`LocalNode`]s on loopback, ids `1..=n`: for tests, examples
/// and benchmarks of hosts. Stopped when dropped.
#[derive(Debug)]
pub struct LocalBank {
    nodes: Vec<LocalNode>,
    /// The bank as a host places sessions on it.
    pub placement: crate::placement::Placement,
    secret: Secret,
}

impl LocalBank {
    /// Starts `n` nodes on backend `B`, keeping `replicas` copies of each
    /// session.
    pub fn start<B: Rt>(n: u16, replicas: usize, secret: Secret) -> io::Result<LocalBank> {
        let nodes = (1..=n)
            .map(|id| {
                LocalNode::start::<B>(
                    NodeConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), id),
                    secret.clone(),
                )
            })
            .collect::<io::Result<Vec<_>>>()?;
        let members = nodes
            .iter()
            .zip(1..)
            .map(|(node, id)| crate::placement::Member {
                id,
                addr: node.addr,
            })
            .collect();
        let placement = crate::placement::Placement::new(members, replicas)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(LocalBank {
            nodes,
            placement,
            secret,
        })
    }

    /// Starts the bank on the engine tests run on
    /// ([`sessio_net::test_backend`]: `io_uring` where it works here, else
    /// epoll, and it says which on stderr): tests that use it run either
    /// way.
    pub fn start_any(n: u16, replicas: usize, secret: Secret) -> io::Result<LocalBank> {
        sessio_net::on_test_backend!(B => Self::start::<B>(n, replicas, secret))
    }

    /// [`LocalBank::counter`] on the engine tests run on.
    pub fn counter_any(&self, name: &str) -> io::Result<u64> {
        sessio_net::on_test_backend!(B => self.counter::<B>(name))
    }

    /// The nodes, node `i + 1` at index `i`.
    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// A counter every node reports (`sessions`, `fetches`, ...), summed
    /// over the bank, asked over the protocol on backend `B`.
    pub fn counter<B: Rt>(&self, name: &str) -> io::Result<u64> {
        self.nodes
            .iter()
            .map(|n| Self::counter_of::<B>(n.addr, &self.secret, name))
            .sum()
    }

    /// One counter of the node at `addr` (0 if it reports no such
    /// counter), asked over the protocol on backend `B`.
    pub fn counter_of<B: Rt>(addr: SocketAddr, secret: &Secret, name: &str) -> io::Result<u64> {
        let rt = B::runtime()?;
        let identity = Identity::with_random_incarnation(u64::MAX)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let reply = B::run(&rt, async {
            let mut c = sessio_net::Client::<B>::connect(
                addr,
                sessio_net::ClientConfig::new(identity),
                secret.clone(),
            )
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
            c.call(&Message::StatsRequest(sessio_net::StatsRequest {
                request_id: 1,
            }))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
        })?;
        let Message::Stats(s) = reply else {
            return Err(io::Error::other(format!("not stats: {:?}", reply.kind())));
        };
        Ok(s.counters
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value))
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.stop.fire();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connection_share;

    #[test]
    fn connection_shares_add_up_to_the_cap() {
        for (total, threads) in [(1024, 1), (1024, 3), (5, 2), (3, 3), (7, 4)] {
            let parts: Vec<u32> = (0..threads as usize)
                .map(|t| connection_share(total, threads, t))
                .collect();
            assert_eq!(parts.iter().sum::<u32>(), total, "{parts:?}");
            assert!(parts.iter().all(|&p| p >= 1), "{parts:?}");
        }
    }
}
