//! The accepting side: authenticates each connection, then hands every
//! message to one handler and sends back what it returns.
//!
//! Single-threaded by design: one server per runtime per thread; run N of
//! them on one port with [`SocketOptions::reuse_port`] for thread-per-core.
//! A connection task reads a batch of frames, calls the handler for each,
//! writes all replies in one go, then reads again: replies to pipelined
//! requests are coalesced, and a peer that stops reading its replies stops
//! being read (backpressure), within the idle timeout.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use crate::backend::{Backend, IoUring, Stream};
use crate::handshake::{Handshake, Identity, RejectReason, Secret, reject_frame};
use crate::message::{Limits, Message};
use crate::transport::{Conn, PeerInfo, SocketOptions, TransportError, drive_handshake, ms};

/// Default for [`ServerConfig::connections_max`].
pub const CONNECTIONS_MAX_DEFAULT: u32 = 1024;
/// Default for [`ServerConfig::handshakes_max`].
pub const HANDSHAKES_MAX_DEFAULT: u32 = 64;
/// Default for [`ServerConfig::handshake_timeout_ms`].
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default for [`ServerConfig::idle_timeout_ms`].
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 120_000;
/// Default for [`ServerConfig::write_bytes_max`].
pub const WRITE_BYTES_MAX_DEFAULT: u32 = 256 * 1024;

/// How a [`Server`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// This process's id and incarnation, sent in the handshake.
    pub identity: Identity,
    /// Message limits; `frame_bytes_max` bounds each connection's read buffer.
    pub limits: Limits,
    /// Most open connections (authenticated or not); more are refused with
    /// a `Reject(Busy)` frame.
    pub connections_max: u32,
    /// Most connections still in the handshake; keeps unauthenticated
    /// peers from taking every slot.
    pub handshakes_max: u32,
    /// Time allowed for the whole handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// An authenticated connection that moves no byte this long is closed.
    pub idle_timeout_ms: u64,
    /// Replies are flushed once this many bytes are buffered.
    pub write_bytes_max: u32,
    /// Socket options for the listener and accepted connections.
    pub socket: SocketOptions,
}

impl ServerConfig {
    /// Defaults for everything but the identity.
    #[must_use]
    pub fn new(identity: Identity) -> ServerConfig {
        ServerConfig {
            identity,
            limits: Limits::default(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            write_bytes_max: WRITE_BYTES_MAX_DEFAULT,
            socket: SocketOptions::default(),
        }
    }
}

/// Counters a server keeps, readable while it runs via [`Server::stats`].
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub open: Cell<u32>,
    /// Connections in the handshake now.
    pub handshaking: Cell<u32>,
    /// Connections refused at the caps.
    pub refused: Cell<u64>,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: Cell<u64>,
    /// Connections closed for an invalid frame or message.
    pub protocol_errors: Cell<u64>,
    /// Messages handed to the handler.
    pub messages: Cell<u64>,
}

/// A listening server on backend `B` (default: `io_uring`).
#[derive(Debug)]
pub struct Server<B: Backend = IoUring> {
    listener: B::Listener,
    local_addr: SocketAddr,
    config: Rc<ServerConfig>,
    secret: Secret,
    stats: Rc<ServerStats>,
    _backend: PhantomData<B>,
}

struct Shared<H> {
    config: Rc<ServerConfig>,
    secret: Secret,
    stats: Rc<ServerStats>,
    handler: RefCell<H>,
}

/// Counts a connection while it lives.
struct Slot(Rc<ServerStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// Counts a connection while it is unauthenticated. Taken at accept (not
/// when its task first runs) so a burst of connects sees the cap at once.
struct HandshakeSlot(Rc<ServerStats>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshaking.set(self.0.handshaking.get() - 1);
    }
}

impl<B: Backend> Server<B> {
    /// Binds `addr` (port 0 picks a free port). Call inside a runtime of `B`.
    pub fn bind(addr: SocketAddr, config: ServerConfig, secret: Secret) -> io::Result<Server<B>> {
        if config.limits.frame_bytes_max < crate::frame::FRAME_BYTES_MIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame_bytes_max below FRAME_BYTES_MIN",
            ));
        }
        let listener = B::listen(addr, &config.socket)?;
        let local_addr = B::local_addr(&listener)?;
        Ok(Server {
            listener,
            local_addr,
            config: Rc::new(config),
            secret,
            stats: Rc::new(ServerStats::default()),
            _backend: PhantomData,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Live counters.
    #[must_use]
    pub fn stats(&self) -> Rc<ServerStats> {
        Rc::clone(&self.stats)
    }

    /// Serves forever. See [`Server::serve_until`].
    pub async fn serve<H>(self, handler: H) -> io::Result<()>
    where
        H: FnMut(PeerInfo, Message) -> Option<Message> + 'static,
    {
        self.serve_until(handler, std::future::pending()).await
    }

    /// Accepts and serves connections until `shutdown` completes. The
    /// handler gets every message of every authenticated peer, in order per
    /// connection; what it returns is sent back on that connection.
    /// Connections still open when this returns end when the runtime drops.
    pub async fn serve_until<H, F>(self, handler: H, shutdown: F) -> io::Result<()>
    where
        H: FnMut(PeerInfo, Message) -> Option<Message> + 'static,
        F: Future<Output = ()>,
    {
        let shared = Rc::new(Shared {
            config: self.config,
            secret: self.secret,
            stats: self.stats,
            handler: RefCell::new(handler),
        });
        let listener = self.listener;
        B::scope(async move {
            let mut shutdown = pin!(shutdown);
            loop {
                let accepted = {
                    let accept = pin!(B::accept(&listener));
                    match futures_util::future::select(accept, shutdown.as_mut()).await {
                        futures_util::future::Either::Left((r, _)) => r,
                        futures_util::future::Either::Right(((), _)) => return Ok(()),
                    }
                };
                match accepted {
                    Ok((stream, addr)) => on_accept::<B, H>(&shared, stream, addr),
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep serving.
                        tracing::warn!("accept failed: {e}");
                        B::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .await
    }
}

fn on_accept<B: Backend, H>(shared: &Rc<Shared<H>>, stream: B::Stream, addr: SocketAddr)
where
    H: FnMut(PeerInfo, Message) -> Option<Message> + 'static,
{
    let stats = &shared.stats;
    let cfg = &shared.config;
    if stats.open.get() >= cfg.connections_max || stats.handshaking.get() >= cfg.handshakes_max {
        stats.refused.set(stats.refused.get() + 1);
        tracing::debug!(%addr, "refused: at connection cap");
        let wait = ms(cfg.handshake_timeout_ms).min(Duration::from_secs(1));
        B::spawn(async move {
            let mut stream = stream;
            let (bytes, len) = reject_frame(RejectReason::Busy, 0).into_parts();
            let _ = B::timeout(wait, stream.write_small(bytes, len)).await;
        });
        return;
    }
    stats.open.set(stats.open.get() + 1);
    let slot = Slot(Rc::clone(stats));
    stats.handshaking.set(stats.handshaking.get() + 1);
    let hs_slot = HandshakeSlot(Rc::clone(stats));
    let shared = Rc::clone(shared);
    B::spawn(async move {
        let _slot = slot;
        if let Err(e) = connection::<B, H>(&shared, stream, addr, hs_slot).await {
            match e {
                TransportError::Closed => tracing::debug!(%addr, "peer closed"),
                e => tracing::info!(%addr, "connection closed: {e}"),
            }
        }
    });
}

async fn connection<B: Backend, H>(
    shared: &Shared<H>,
    mut stream: B::Stream,
    addr: SocketAddr,
    hs_slot: HandshakeSlot,
) -> Result<(), TransportError>
where
    H: FnMut(PeerInfo, Message) -> Option<Message>,
{
    let cfg = &shared.config;
    let stats = &shared.stats;
    cfg.socket.apply(&stream)?;
    let hs = Handshake::responder(&shared.secret, cfg.identity, cfg.limits.frame_bytes_max)?;
    let hs_timeout = ms(cfg.handshake_timeout_ms);
    let outcome = B::timeout(hs_timeout, drive_handshake(&mut stream, hs)).await;
    drop(hs_slot);
    let established = match outcome {
        Ok(Ok(est)) => est,
        Ok(Err(e)) => {
            stats
                .handshakes_failed
                .set(stats.handshakes_failed.get() + 1);
            return Err(e);
        }
        Err(_) => {
            stats
                .handshakes_failed
                .set(stats.handshakes_failed.get() + 1);
            return Err(TransportError::HandshakeTimeout(hs_timeout));
        }
    };
    let peer = PeerInfo {
        identity: established.peer,
        addr,
        frame_bytes_max: established.frame_bytes_max,
    };
    tracing::debug!(%addr, id = peer.identity.id, "peer authenticated");
    let mut conn = Conn::<B>::new(stream, cfg.limits);
    let idle = ms(cfg.idle_timeout_ms);
    let result = serve_messages(shared, &mut conn, peer, idle).await;
    if matches!(
        result,
        Err(TransportError::Frame(_) | TransportError::Message(_))
    ) {
        stats.protocol_errors.set(stats.protocol_errors.get() + 1);
    }
    result
}

async fn serve_messages<B: Backend, H>(
    shared: &Shared<H>,
    conn: &mut Conn<B>,
    peer: PeerInfo,
    idle: Duration,
) -> Result<(), TransportError>
where
    H: FnMut(PeerInfo, Message) -> Option<Message>,
{
    let write_max = shared.config.write_bytes_max as usize;
    loop {
        while let Some(msg) = conn.try_next()? {
            shared.stats.messages.set(shared.stats.messages.get() + 1);
            let reply = (shared.handler.borrow_mut())(peer, msg);
            if let Some(reply) = reply {
                conn.queue(&reply)?;
                if conn.wbuf.len() >= write_max {
                    B::timeout(idle, conn.flush())
                        .await
                        .map_err(|_| TransportError::Timeout(idle))??;
                }
            }
        }
        B::timeout(idle, conn.flush())
            .await
            .map_err(|_| TransportError::Timeout(idle))??;
        let more = B::timeout(idle, conn.fill())
            .await
            .map_err(|_| TransportError::Timeout(idle))??;
        if !more {
            return Err(TransportError::Closed);
        }
    }
}
