//! The accepting side: authenticates each connection, then hands every
//! message to one handler and sends back what it returns.
//!
//! Single-threaded by design: one server per runtime per thread; run N of
//! them on one port with [`SocketOptions::reuse_port`] for thread-per-core.
//!
//! **Unauthenticated peers.** A connection holds a *pending* slot until its
//! handshake ends. There are at most [`ServerConfig::handshakes_max`] of
//! them, and at most [`ServerConfig::handshakes_per_addr_max`] from one
//! address. When a cap is reached, a new connection evicts the oldest
//! pending one (of its own address; else of the address holding the most;
//! else of all) that has waited at least
//! [`ServerConfig::evict_after_ms`], instead of being refused: idle or
//! trickling peers are pushed out by newcomers, while a real peer's
//! handshake, done in a few round trips, is over before anyone may evict
//! it. Peers outside [`ServerConfig::allow`] are closed at accept. Every
//! refusal, eviction and failed handshake is counted in [`ServerStats`]
//! and logged at warn, at most once every ten seconds per kind.
//! A connection task is full duplex: it reads a batch of frames, calls the
//! handler for each and reads again at once, while the replies of the batch
//! are written in one go; a peer that stops reading its replies stops being
//! read (backpressure), and is closed after the idle timeout.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::future::{Either, select};

use crate::backend::{Backend, IoUring, Stream};
use crate::frame::FrameKind;
use crate::handshake::{Handshake, Identity, RejectReason, Secret, reject_body, reject_frame};
use crate::message::{Codec, Limits, Message, Received};
use crate::record::RecordWriter;
use crate::seal::{Opener, Protection};
use crate::transport::{FrameReader, PeerInfo, SocketOptions, TransportError, drive_handshake, ms};

/// Default for [`ServerConfig::connections_max`].
pub const CONNECTIONS_MAX_DEFAULT: u32 = 1024;
/// Default for [`ServerConfig::handshakes_max`].
pub const HANDSHAKES_MAX_DEFAULT: u32 = 64;
/// Default for [`ServerConfig::handshakes_per_addr_max`].
pub const HANDSHAKES_PER_ADDR_MAX_DEFAULT: u32 = 16;
/// Default for [`ServerConfig::evict_after_ms`].
pub const EVICT_AFTER_MS_DEFAULT: u64 = 20;
/// Default for [`ServerConfig::handshake_timeout_ms`].
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 2_000;
/// How often each kind of refusal is logged at warn, at most.
const WARN_EVERY: Duration = Duration::from_secs(10);
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
    /// Most connections in the handshake from one IP address.
    pub handshakes_per_addr_max: u32,
    /// A connection in the handshake this long may be evicted for a newer
    /// one when a cap is reached, in ms.
    pub evict_after_ms: u64,
    /// The networks peers may connect from; empty: any.
    pub allow: Vec<ipnet::IpNet>,
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
            handshakes_per_addr_max: HANDSHAKES_PER_ADDR_MAX_DEFAULT,
            evict_after_ms: EVICT_AFTER_MS_DEFAULT,
            allow: Vec::new(),
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            write_bytes_max: WRITE_BYTES_MAX_DEFAULT,
            socket: SocketOptions::default(),
        }
    }
}

/// Counters a server keeps, readable while it runs via [`Server::stats`].
/// Atomics, so the servers of a process's threads can share one
/// ([`Server::with_stats`]).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections in the handshake now.
    pub handshaking: AtomicU64,
    /// Connections refused at the caps (no pending one was old enough to
    /// evict).
    pub refused: AtomicU64,
    /// Connections in the handshake closed to make room for a newer one.
    pub evicted: AtomicU64,
    /// Connections closed at accept: their address is not allowed.
    pub not_allowed: AtomicU64,
    /// Handshakes that failed (wrong key, malformed, refused) or timed out.
    pub handshakes_failed: AtomicU64,
    /// Of those, the ones that timed out.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed for an invalid frame or message.
    pub protocol_errors: AtomicU64,
    /// Messages handed to the handler.
    pub messages: AtomicU64,
}

impl ServerStats {
    /// Every counter by name (`open` and `handshaking` are levels, the
    /// rest only grow).
    pub fn counters(&self) -> [(&'static str, u64); 9] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("open", g(&self.open)),
            ("handshaking", g(&self.handshaking)),
            ("refused", g(&self.refused)),
            ("evicted", g(&self.evicted)),
            ("not_allowed", g(&self.not_allowed)),
            ("handshakes_failed", g(&self.handshakes_failed)),
            ("handshake_timeouts", g(&self.handshake_timeouts)),
            ("protocol_errors", g(&self.protocol_errors)),
            ("messages", g(&self.messages)),
        ]
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn drop_one(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

/// Logs one kind of event at warn at most every [`WARN_EVERY`], with how
/// many happened since the last line.
#[derive(Default)]
struct Warn {
    last: Cell<Option<Instant>>,
    since: Cell<u64>,
}

impl Warn {
    fn note(&self, what: &str, addr: SocketAddr) {
        self.since.set(self.since.get() + 1);
        if self.last.get().is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                last = %addr,
                count = self.since.get(),
                "{what} (count: since the last such line)"
            );
            self.last.set(Some(Instant::now()));
            self.since.set(0);
        }
    }
}

/// A connection in the handshake, oldest first in [`Shared::pending`].
struct Pending {
    id: u64,
    ip: std::net::IpAddr,
    since: Instant,
    abort: futures_util::future::AbortHandle,
}

/// A listening server on backend `B` (default: `io_uring`).
#[derive(Debug)]
pub struct Server<B: Backend = IoUring> {
    listener: B::Listener,
    local_addr: SocketAddr,
    config: Rc<ServerConfig>,
    secret: Secret,
    stats: Arc<ServerStats>,
    protection: Protection,
    _backend: PhantomData<B>,
}

struct Shared<H> {
    config: Rc<ServerConfig>,
    secret: Secret,
    protection: Protection,
    stats: Arc<ServerStats>,
    handler: RefCell<H>,
    /// Connections in the handshake, oldest first.
    pending: RefCell<std::collections::VecDeque<Pending>>,
    next_id: Cell<u64>,
    warn_refused: Warn,
    warn_evicted: Warn,
    warn_not_allowed: Warn,
    warn_failed: Warn,
}

/// Counts a connection while it lives.
struct Slot(Arc<ServerStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        drop_one(&self.0.open);
    }
}

/// A connection's place among the pending ones while it is
/// unauthenticated. Taken at accept (not when its task first runs) so a
/// burst of connects sees the caps at once.
struct HandshakeSlot<'a, H> {
    shared: &'a Shared<H>,
    id: u64,
}

impl<H> Drop for HandshakeSlot<'_, H> {
    fn drop(&mut self) {
        drop_one(&self.shared.stats.handshaking);
        let mut pending = self.shared.pending.borrow_mut();
        if let Some(i) = pending.iter().position(|p| p.id == self.id) {
            pending.remove(i);
        }
    }
}

impl<B: Backend> Server<B> {
    /// Binds `addr` (port 0 picks a free port). Call inside a runtime of `B`.
    pub fn bind(addr: SocketAddr, config: ServerConfig, secret: Secret) -> io::Result<Server<B>> {
        Self::check(&config)?;
        let listener = B::listen(addr, &config.socket)?;
        Self::with_listener(listener, config, secret)
    }

    /// Serves on an already bound socket ([`crate::bind_listener`]), such as
    /// one clone of a listener several threads share. Call inside a runtime
    /// of `B`.
    pub fn from_listener(
        listener: std::net::TcpListener,
        config: ServerConfig,
        secret: Secret,
    ) -> io::Result<Server<B>> {
        Self::check(&config)?;
        Self::with_listener(B::listener_from_std(listener)?, config, secret)
    }

    fn check(config: &ServerConfig) -> io::Result<()> {
        if config.limits.frame_bytes_max < crate::frame::FRAME_BYTES_MIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame_bytes_max below FRAME_BYTES_MIN",
            ));
        }
        Ok(())
    }

    fn with_listener(
        listener: B::Listener,
        config: ServerConfig,
        secret: Secret,
    ) -> io::Result<Server<B>> {
        let local_addr = B::local_addr(&listener)?;
        Ok(Server {
            listener,
            local_addr,
            config: Rc::new(config),
            secret,
            stats: Arc::new(ServerStats::default()),
            protection: Protection::Sealed,
            _backend: PhantomData,
        })
    }

    /// A server whose connections lay out, count and check records as
    /// usual but neither encrypt nor authenticate them: for measuring what
    /// sealing costs, in the same run, against [`Client::connect_unsealed`]
    /// (a sealed peer fails on the first record). Exists only with the
    /// `unsealed-bench` feature, which only the benchmarks enable; no
    /// configuration reaches it.
    ///
    /// [`Client::connect_unsealed`]: crate::Client::connect_unsealed
    #[cfg(feature = "unsealed-bench")]
    pub fn bind_unsealed(
        addr: SocketAddr,
        config: ServerConfig,
        secret: Secret,
    ) -> io::Result<Server<B>> {
        let mut server = Self::bind(addr, config, secret)?;
        server.protection = Protection::Unsealed;
        Ok(server)
    }

    /// Counts into `stats` (shared with the servers of other threads)
    /// instead of counters of its own.
    #[must_use]
    pub fn with_stats(mut self, stats: Arc<ServerStats>) -> Server<B> {
        self.stats = stats;
        self
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Live counters.
    #[must_use]
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serves forever. See [`Server::serve_until`].
    pub async fn serve<H>(self, handler: H) -> io::Result<()>
    where
        H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message> + 'static,
    {
        self.serve_until(handler, std::future::pending()).await
    }

    /// Accepts and serves connections until `shutdown` completes. The
    /// handler gets every message of every authenticated peer, in order per
    /// connection, validated and within the limits; a [`DeltaBatch`] it
    /// gets where it arrived, to read without a copy
    /// ([`Received::into_message`] copies it out). What it returns is sent
    /// back on that connection.
    ///
    /// [`DeltaBatch`]: crate::DeltaBatch
    /// Connections still open when this returns end when the runtime drops.
    pub async fn serve_until<H, F>(self, handler: H, shutdown: F) -> io::Result<()>
    where
        H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message> + 'static,
        F: Future<Output = ()>,
    {
        let shared = Rc::new(Shared {
            config: self.config,
            secret: self.secret,
            protection: self.protection,
            stats: self.stats,
            handler: RefCell::new(handler),
            pending: RefCell::new(std::collections::VecDeque::new()),
            next_id: Cell::new(0),
            warn_refused: Warn::default(),
            warn_evicted: Warn::default(),
            warn_not_allowed: Warn::default(),
            warn_failed: Warn::default(),
        });
        let listener = self.listener;
        B::scope(async move {
            let mut shutdown = pin!(shutdown);
            let mut accepted_in_a_row = 0u32;
            loop {
                // Under a flood `accept` is always ready: every few accepts
                // the loop sleeps for a timer tick, so the connections
                // already in (the authenticated ones among them) get the
                // thread. An engine whose accept never waits (epoll) would
                // otherwise starve them: a host's lag went to seconds.
                accepted_in_a_row += 1;
                if accepted_in_a_row >= ACCEPTS_BEFORE_YIELD {
                    accepted_in_a_row = 0;
                    B::sleep(Duration::from_micros(1)).await;
                }
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

/// Connections accepted back to back before the accept loop lets the
/// others run (see `Server::run`).
const ACCEPTS_BEFORE_YIELD: u32 = 8;

impl<H> Shared<H> {
    /// Evicts the oldest pending connection for which `which` holds, if it
    /// has waited at least `evict_after_ms`; returns whether one went.
    fn evict_oldest(&self, which: impl Fn(&Pending) -> bool, addr: SocketAddr) -> bool {
        let old_enough = ms(self.config.evict_after_ms);
        let mut pending = self.pending.borrow_mut();
        let Some(i) = pending
            .iter()
            .position(|p| which(p) && p.since.elapsed() >= old_enough)
        else {
            return false;
        };
        let p = pending.remove(i).expect("found above");
        p.abort.abort();
        drop(pending);
        bump(&self.stats.evicted);
        self.warn_evicted.note(
            "closed an unauthenticated connection to make room for a newer one",
            addr,
        );
        true
    }

    /// Whether a newcomer from `addr` may start a handshake now, evicting
    /// an old pending one if a cap is reached.
    fn admit(&self, addr: SocketAddr) -> bool {
        let cfg = &self.config;
        let ip = addr.ip();
        let from_ip = self.pending.borrow().iter().filter(|p| p.ip == ip).count();
        if from_ip >= cfg.handshakes_per_addr_max as usize
            && !self.evict_oldest(|p| p.ip == ip, addr)
        {
            return false;
        }
        if self.pending.borrow().len() >= cfg.handshakes_max as usize {
            // The address holding the most pending connections gives one
            // up: a flood from a few addresses pays for itself, and a host
            // with one handshake in progress is the last to lose it.
            let heaviest = {
                let pending = self.pending.borrow();
                let mut counts: Vec<(std::net::IpAddr, usize)> = Vec::new();
                for p in pending.iter() {
                    match counts.iter_mut().find(|(a, _)| *a == p.ip) {
                        Some(c) => c.1 += 1,
                        None => counts.push((p.ip, 1)),
                    }
                }
                counts.into_iter().max_by_key(|&(_, n)| n).map(|(a, _)| a)
            };
            let evicted = heaviest.is_some_and(|h| self.evict_oldest(|p| p.ip == h, addr))
                || self.evict_oldest(|_| true, addr);
            if !evicted {
                return false;
            }
        }
        true
    }
}

fn on_accept<B: Backend, H>(shared: &Rc<Shared<H>>, stream: B::Stream, addr: SocketAddr)
where
    H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message> + 'static,
{
    let stats = &shared.stats;
    let cfg = &shared.config;
    if !cfg.allow.is_empty() && !cfg.allow.iter().any(|net| net.contains(&addr.ip())) {
        bump(&stats.not_allowed);
        shared
            .warn_not_allowed
            .note("closed a connection from an address outside --allow", addr);
        // Closed at once: nothing is said to a stranger.
        drop(stream);
        return;
    }
    if stats.open.load(Ordering::Relaxed) >= u64::from(cfg.connections_max) || !shared.admit(addr) {
        bump(&stats.refused);
        shared.warn_refused.note(
            "refused a connection: at the connection or handshake cap",
            addr,
        );
        let wait = ms(cfg.handshake_timeout_ms).min(Duration::from_secs(1));
        B::spawn(async move {
            let mut stream = stream;
            let (bytes, len) = reject_frame(RejectReason::Busy, 0).into_parts();
            let _ = B::timeout(wait, stream.write_small(bytes, len)).await;
        });
        return;
    }
    bump(&stats.open);
    let slot = Slot(Arc::clone(stats));
    bump(&stats.handshaking);
    let id = shared.next_id.get();
    shared.next_id.set(id + 1);
    let (abort, registration) = futures_util::future::AbortHandle::new_pair();
    shared.pending.borrow_mut().push_back(Pending {
        id,
        ip: addr.ip(),
        since: Instant::now(),
        abort,
    });
    let shared = Rc::clone(shared);
    B::spawn(async move {
        let _slot = slot;
        let hs_slot = HandshakeSlot {
            shared: &shared,
            id,
        };
        if let Err(e) = connection::<B, H>(&shared, stream, addr, hs_slot, registration).await {
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
    hs_slot: HandshakeSlot<'_, H>,
    evict: futures_util::future::AbortRegistration,
) -> Result<(), TransportError>
where
    H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message>,
{
    let cfg = &shared.config;
    let stats = &shared.stats;
    cfg.socket.apply(&stream)?;
    let hs = Handshake::responder(&shared.secret, cfg.identity, cfg.limits.frame_bytes_max)?;
    let hs_timeout = ms(cfg.handshake_timeout_ms);
    let handshake = futures_util::future::Abortable::new(drive_handshake(&mut stream, hs), evict);
    let outcome = B::timeout(hs_timeout, handshake).await;
    drop(hs_slot);
    let established = match outcome {
        Ok(Ok(Ok(est))) => est,
        // Evicted for a newer connection (counted where it was chosen).
        Ok(Err(futures_util::future::Aborted)) => {
            return Err(TransportError::HandshakeEvicted);
        }
        Ok(Ok(Err(e))) => {
            bump(&stats.handshakes_failed);
            shared.warn_failed.note("a handshake failed", addr);
            return Err(e);
        }
        Err(_) => {
            bump(&stats.handshakes_failed);
            bump(&stats.handshake_timeouts);
            shared.warn_failed.note("a handshake timed out", addr);
            return Err(TransportError::HandshakeTimeout(hs_timeout));
        }
    };
    let peer = PeerInfo {
        identity: established.peer,
        addr,
        frame_bytes_max: established.frame_bytes_max,
    };
    tracing::debug!(%addr, id = peer.identity.id, "peer authenticated");
    let idle = ms(cfg.idle_timeout_ms);
    let outbox = Outbox::new(
        shared.protection.sealer(&established.keys),
        cfg.write_bytes_max as usize,
    );
    let opener = shared.protection.opener(&established.keys);
    let result = serve_messages::<B, H>(shared, &stream, peer, idle, &outbox, opener).await;
    if let Err(e) = &result
        && e.is_protocol_error()
    {
        bump(&stats.protocol_errors);
    }
    if let Err(TransportError::Frame(crate::frame::FrameError::UnknownKind { found })) = &result {
        // Say why before closing: the peer may be a newer build that sent
        // something this one does not know (detail: the kind). Sealed, as
        // everything after the handshake, after whatever replies are
        // still queued (so the counters stay in step).
        let body = reject_body(RejectReason::Malformed, u32::from(*found));
        let mut reject = Vec::new();
        let sealed = {
            let mut out = outbox.buf.borrow_mut();
            out.push_raw(FrameKind::Reject, &body).is_ok() && out.take_sealed(&mut reject).is_ok()
        };
        if sealed {
            let wait = ms(cfg.handshake_timeout_ms).min(Duration::from_secs(1));
            let _ = B::timeout(wait, stream.write_all(reject)).await;
        }
    }
    result
}

/// Replies encoded by the reading side and not yet taken by the writing
/// side of one connection, and what the two wait on. Both sides run in the
/// connection's one task, so plain cells do.
struct Outbox {
    /// Replies, coalesced into a record that is sealed when the writer
    /// takes it.
    buf: RefCell<RecordWriter>,
    /// A write is in flight.
    writing: Cell<bool>,
    /// The reading side saw the end of the stream: write what is left, stop.
    closing: Cell<bool>,
    /// The last read left more bytes waiting in the socket: the next read
    /// completes at once, so its replies can share a write with these
    /// (below `hold_bytes_max`).
    hold: Cell<bool>,
    hold_bytes_max: usize,
    /// When a read or a write last completed (the idle clock).
    last_io: Cell<Instant>,
    reader: Cell<Option<Waker>>,
    writer: Cell<Option<Waker>>,
}

impl Outbox {
    fn new(sealer: crate::seal::Sealer, hold_bytes_max: usize) -> Outbox {
        Outbox {
            buf: RefCell::new(RecordWriter::new(sealer)),
            writing: Cell::new(false),
            closing: Cell::new(false),
            hold: Cell::new(false),
            hold_bytes_max,
            last_io: Cell::new(Instant::now()),
            reader: Cell::new(None),
            writer: Cell::new(None),
        }
    }

    fn wake(slot: &Cell<Option<Waker>>) {
        if let Some(w) = slot.take() {
            w.wake();
        }
    }

    /// Waits until fewer than `max` reply bytes wait for the writer.
    async fn room(&self, max: usize) {
        std::future::poll_fn(|cx| {
            if self.buf.borrow().len() < max {
                Poll::Ready(())
            } else {
                self.reader.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }

    /// Waits until every reply is written.
    async fn drained(&self) {
        std::future::poll_fn(|cx| {
            if self.buf.borrow().is_empty() && !self.writing.get() {
                Poll::Ready(())
            } else {
                self.reader.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }

    /// Waits for replies to write; seals them and swaps them into `out`.
    /// `false` when closing and nothing is left.
    async fn take(&self, out: &mut Vec<u8>) -> Result<bool, TransportError> {
        std::future::poll_fn(|cx| {
            let mut buf = self.buf.borrow_mut();
            let held = self.hold.get() && buf.len() < self.hold_bytes_max && !self.closing.get();
            if !buf.is_empty() && !held {
                buf.take_sealed(out)?;
                self.writing.set(true);
                Poll::Ready(Ok(true))
            } else if self.closing.get() {
                Poll::Ready(Ok(false))
            } else {
                self.writer.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Serves one authenticated connection, full duplex: the reading side
/// decodes every frame of a read, calls the handler and encodes the replies
/// into the outbox, then reads again at once; the writing side writes
/// whatever the outbox holds in one write. So a read is always in flight
/// while replies are written (on `io_uring`, the next receive and the send
/// of the replies go to the kernel in one submission), and replies to the
/// frames of one read share one write. While the kernel reports more bytes
/// already waiting in the socket (`io_uring` does, per completion), the
/// writer holds the replies back until a read drains the socket or
/// `write_bytes_max` of them wait, so a peer streaming requests gets its
/// replies in a few large writes rather than one per read (epoll gets the
/// same for free: its reads complete without yielding while data waits).
///
/// Backpressure: once `write_bytes_max` reply bytes wait behind a write in
/// flight, the reading side stops reading until the writer takes them, so a
/// peer that stops reading its replies stops being read. One idle clock per
/// connection (the time of the last completed read or write, checked by a
/// single timer) replaces a timer per operation: a connection that moves no
/// byte for `idle` is closed, whether it waits to read or to write.
async fn serve_messages<B: Backend, H>(
    shared: &Shared<H>,
    stream: &B::Stream,
    peer: PeerInfo,
    idle: Duration,
    outbox: &Outbox,
    opener: Opener,
) -> Result<(), TransportError>
where
    H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message>,
{
    let reading = pin!(read_side::<B, H>(shared, stream, peer, outbox, opener));
    let writing = pin!(write_side::<B>(stream, outbox));
    let watchdog = pin!(idle_watchdog::<B>(outbox, idle));
    match select(reading, select(writing, watchdog)).await {
        Either::Left((r, _)) | Either::Right((Either::Left((r, _)) | Either::Right((r, _)), _)) => {
            r
        }
    }
}

async fn read_side<B: Backend, H>(
    shared: &Shared<H>,
    stream: &B::Stream,
    peer: PeerInfo,
    outbox: &Outbox,
    opener: Opener,
) -> Result<(), TransportError>
where
    H: for<'m> FnMut(PeerInfo, Received<'m>) -> Option<Message>,
{
    let limits = shared.config.limits;
    let write_max = shared.config.write_bytes_max as usize;
    let mut reader = FrameReader::new(limits, opener);
    let mut codec = Codec::new(limits);
    loop {
        while let Some(msg) = reader.try_receive()? {
            bump(&shared.stats.messages);
            let reply = (shared.handler.borrow_mut())(peer, msg);
            if let Some(reply) = reply {
                // Coalesced with the other replies the next write takes,
                // and sealed with them as one record when it takes them.
                outbox.buf.borrow_mut().push(&mut codec, &reply)?;
                Outbox::wake(&outbox.writer);
                outbox.room(write_max).await;
            }
        }
        let more = reader.fill(stream).await?;
        outbox.last_io.set(Instant::now());
        outbox.hold.set(reader.more_waiting());
        if !reader.more_waiting() {
            Outbox::wake(&outbox.writer);
        }
        if !more {
            outbox.closing.set(true);
            Outbox::wake(&outbox.writer);
            outbox.drained().await;
            return Err(TransportError::Closed);
        }
    }
}

async fn write_side<B: Backend>(stream: &B::Stream, outbox: &Outbox) -> Result<(), TransportError> {
    let mut wbuf = Vec::new();
    while outbox.take(&mut wbuf).await? {
        Outbox::wake(&outbox.reader);
        let (res, buf) = stream.write_all(std::mem::take(&mut wbuf)).await;
        outbox.writing.set(false);
        outbox.last_io.set(Instant::now());
        Outbox::wake(&outbox.reader);
        res?;
        wbuf = buf;
    }
    // Closing and drained: the reading side returns `Closed`.
    std::future::pending().await
}

async fn idle_watchdog<B: Backend>(outbox: &Outbox, idle: Duration) -> Result<(), TransportError> {
    loop {
        let quiet = outbox.last_io.get().elapsed();
        match idle.checked_sub(quiet) {
            Some(left) if !left.is_zero() => B::sleep(left).await,
            _ => return Err(TransportError::Timeout(idle)),
        }
    }
}
