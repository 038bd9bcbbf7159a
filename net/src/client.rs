//! The connecting side: handshakes, then pipelines messages.
//!
//! [`Client::send`] only appends a frame to the write buffer (flushed once
//! `write_bytes_max` is buffered, by [`Client::flush`], or by [`Client::recv`]
//! before it waits on the socket),
//! so a caller writes many batches without waiting for replies. Requests
//! (messages that [`Message::expects_reply`]) count toward
//! `in_flight_bytes_max` until the caller has received their reply; when a
//! send would exceed the cap, the client reads replies off the socket into a
//! queue, and if every request in flight is already answered it returns
//! [`TransportError::InFlightFull`] so the caller drains with `recv`.
//! Replies come back in request order.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::net::SocketAddr;

use crate::backend::{Backend, IoUring};
use crate::handshake::{Handshake, Identity, Secret};
use crate::message::{Limits, Message};
use crate::seal::Protection;
use crate::server::HANDSHAKE_TIMEOUT_MS_DEFAULT;
use crate::transport::{
    Backoff, Conn, PeerInfo, SocketOptions, TransportError, drive_handshake, ms,
};

/// Default for [`ClientConfig::in_flight_bytes_max`].
pub const IN_FLIGHT_BYTES_MAX_DEFAULT: u64 = 4 * 1024 * 1024;
/// Default for [`ClientConfig::io_timeout_ms`].
pub const IO_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// How a [`Client`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// This process's id and incarnation, sent in the handshake.
    pub identity: Identity,
    /// Message limits (`frame_bytes_max` bounds the read buffer; sends are
    /// also held to the server's announced limit).
    pub limits: Limits,
    /// Time allowed for connect plus handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// A read or write that makes no progress this long fails: nothing
    /// read, and no byte of what is being written taken by the peer (an
    /// inactivity timeout; a large write to a slow peer that keeps reading
    /// may take longer).
    pub io_timeout_ms: u64,
    /// Cap on bytes of requests sent whose replies were not yet received.
    pub in_flight_bytes_max: u64,
    /// Buffered bytes that trigger a write.
    pub write_bytes_max: u32,
    /// First reconnect delay, in milliseconds.
    pub backoff_min_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    pub backoff_max_ms: u64,
    /// Attempts before [`Client::connect_with_backoff`] gives up (0: forever).
    pub connect_attempts_max: u32,
    /// Socket options.
    pub socket: SocketOptions,
}

impl ClientConfig {
    /// Defaults for everything but the identity.
    #[must_use]
    pub fn new(identity: Identity) -> ClientConfig {
        ClientConfig {
            identity,
            limits: Limits::default(),
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            io_timeout_ms: IO_TIMEOUT_MS_DEFAULT,
            in_flight_bytes_max: IN_FLIGHT_BYTES_MAX_DEFAULT,
            write_bytes_max: crate::server::WRITE_BYTES_MAX_DEFAULT,
            backoff_min_ms: 50,
            backoff_max_ms: 5_000,
            connect_attempts_max: 0,
            socket: SocketOptions::default(),
        }
    }
}

/// A connection to one server on backend `B` (default: `io_uring`).
pub struct Client<B: Backend = IoUring> {
    conn: Conn<B>,
    peer: PeerInfo,
    addr: SocketAddr,
    config: ClientConfig,
    secret: Secret,
    protection: Protection,
    /// Sizes of requests sent and not yet answered, oldest first.
    awaiting: VecDeque<u64>,
    /// Replies read off the socket but not yet received by the caller, with
    /// the size of the request each answers (0 for unsolicited messages).
    queued: VecDeque<(Message, u64)>,
    in_flight_bytes: u64,
    _backend: PhantomData<B>,
}

impl<B: Backend> std::fmt::Debug for Client<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("backend", &B::NAME)
            .field("peer", &self.peer)
            .field("in_flight_bytes", &self.in_flight_bytes)
            .finish_non_exhaustive()
    }
}

/// Replies: the messages answering a request.
fn is_reply(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Ack(_)
            | Message::AllApplied(_)
            | Message::FetchReply(_)
            | Message::Pong(_)
            | Message::Stats(_)
    )
}

impl<B: Backend> Client<B> {
    /// Connects and handshakes once. Call inside a runtime of `B`.
    pub async fn connect(
        addr: SocketAddr,
        config: ClientConfig,
        secret: Secret,
    ) -> Result<Client<B>, TransportError> {
        Self::connect_as(addr, config, secret, Protection::Sealed).await
    }

    /// Connects to a [`crate::Server::bind_unsealed`] server: records laid
    /// out, counted and checked as usual but neither encrypted nor
    /// authenticated, for measuring what sealing costs in the same run.
    /// Exists only with the `unsealed-bench` feature, which only the
    /// benchmarks enable; no configuration reaches it.
    #[cfg(feature = "unsealed-bench")]
    pub async fn connect_unsealed(
        addr: SocketAddr,
        config: ClientConfig,
        secret: Secret,
    ) -> Result<Client<B>, TransportError> {
        Self::connect_as(addr, config, secret, Protection::Unsealed).await
    }

    async fn connect_as(
        addr: SocketAddr,
        config: ClientConfig,
        secret: Secret,
        protection: Protection,
    ) -> Result<Client<B>, TransportError> {
        let (conn, peer) = Self::open(addr, &config, &secret, protection).await?;
        Ok(Client {
            conn,
            peer,
            addr,
            config,
            secret,
            protection,
            awaiting: VecDeque::new(),
            queued: VecDeque::new(),
            in_flight_bytes: 0,
            _backend: PhantomData,
        })
    }

    /// Connects, retrying with exponential backoff up to
    /// `connect_attempts_max` attempts. A refused handshake (wrong key or
    /// version) is not retried: it will not fix itself.
    pub async fn connect_with_backoff(
        addr: SocketAddr,
        config: ClientConfig,
        secret: Secret,
    ) -> Result<Client<B>, TransportError> {
        Self::connect_with_backoff_as(addr, config, secret, Protection::Sealed).await
    }

    async fn connect_with_backoff_as(
        addr: SocketAddr,
        config: ClientConfig,
        secret: Secret,
        protection: Protection,
    ) -> Result<Client<B>, TransportError> {
        let mut backoff = Backoff::new(ms(config.backoff_min_ms), ms(config.backoff_max_ms));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match Self::connect_as(addr, config.clone(), secret.clone(), protection).await {
                Ok(c) => return Ok(c),
                Err(e) if !retryable(&e) => return Err(e),
                Err(e)
                    if config.connect_attempts_max != 0
                        && attempt >= config.connect_attempts_max =>
                {
                    return Err(e);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(%addr, attempt, "connect failed: {e}; retrying in {delay:?}");
                    B::sleep(delay).await;
                }
            }
        }
    }

    /// Drops the connection and connects again with backoff. Requests in
    /// flight and queued replies are discarded; returns how many requests
    /// went unanswered, which the caller must resend if they matter. Compare
    /// [`Client::peer`] before and after: a new incarnation means the server
    /// restarted and lost its state.
    pub async fn reconnect(&mut self) -> Result<usize, TransportError> {
        let lost = self.awaiting.len() + self.queued.iter().filter(|(_, n)| *n > 0).count();
        let fresh = Self::connect_with_backoff_as(
            self.addr,
            self.config.clone(),
            self.secret.clone(),
            self.protection,
        )
        .await?;
        *self = fresh;
        Ok(lost)
    }

    async fn open(
        addr: SocketAddr,
        config: &ClientConfig,
        secret: &Secret,
        protection: Protection,
    ) -> Result<(Conn<B>, PeerInfo), TransportError> {
        let hs_timeout = ms(config.handshake_timeout_ms);
        let attempt = async {
            let mut stream = B::connect(addr).await?;
            config.socket.apply(&stream)?;
            let hs = Handshake::initiator(secret, config.identity)?;
            let est = drive_handshake(&mut stream, hs).await?;
            Ok::<_, TransportError>((stream, est))
        };
        let (stream, est) = B::timeout(hs_timeout, attempt)
            .await
            .map_err(|_| TransportError::HandshakeTimeout(hs_timeout))??;
        // Never send a frame the server announced it would refuse.
        let mut limits = config.limits;
        limits.frame_bytes_max = limits.frame_bytes_max.min(est.frame_bytes_max);
        let peer = PeerInfo {
            identity: est.peer,
            addr,
            frame_bytes_max: est.frame_bytes_max,
        };
        Ok((Conn::new(stream, limits, &est.keys, protection), peer))
    }

    /// The authenticated server.
    #[must_use]
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// Bytes of requests whose replies the caller has not yet received.
    #[must_use]
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Requests whose replies the caller has not yet received.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.awaiting.len() + self.queued.iter().filter(|(_, n)| *n > 0).count()
    }

    /// True when a request may be sent now without exceeding the cap.
    #[must_use]
    pub fn has_room(&self) -> bool {
        self.in_flight_bytes == 0 || self.in_flight_bytes < self.config.in_flight_bytes_max
    }

    /// Queues `msg` for sending. A request (see [`Message::expects_reply`])
    /// is refused with [`TransportError::InFlightFull`] while the bytes of
    /// unreceived requests are at or over `in_flight_bytes_max` (one request
    /// may overshoot the cap, so any single message can be sent); receive
    /// replies first, or use [`Client::send_with`].
    pub async fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        let request = msg.expects_reply();
        if request && !self.has_room() {
            return Err(TransportError::InFlightFull {
                in_flight_bytes: self.in_flight_bytes,
                in_flight_bytes_max: self.config.in_flight_bytes_max,
            });
        }
        let len = self.conn.queue(msg)? as u64;
        if request {
            self.awaiting.push_back(len);
            self.in_flight_bytes += len;
        }
        if self.conn.out.len() >= self.config.write_bytes_max as usize {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends `msg`, first receiving replies (handed to `on_reply`) for as
    /// long as the in-flight cap leaves no room: the pipelining loop.
    pub async fn send_with(
        &mut self,
        msg: &Message,
        mut on_reply: impl FnMut(Message),
    ) -> Result<(), TransportError> {
        while msg.expects_reply() && !self.has_room() {
            on_reply(self.recv().await?);
        }
        self.send(msg).await
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        let t = ms(self.config.io_timeout_ms);
        let fd = self.fd();
        until_idle::<B, _>(fd, t, self.conn.flush()).await?
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::{AsFd, AsRawFd};
        self.conn.stream.as_fd().as_raw_fd()
    }

    /// The next message from the server: a reply (in request order) or an
    /// unsolicited message such as [`Message::Invalidate`]. A message
    /// already received is returned at once; otherwise everything queued is
    /// flushed before waiting on the socket (the awaited reply may need it).
    ///
    /// So a pipelining loop at the in-flight cap (one `recv`, one `send`)
    /// writes its requests in one go per read of replies, not one write per
    /// request; call [`Client::flush`] to push a request out sooner.
    pub async fn recv(&mut self) -> Result<Message, TransportError> {
        if self.queued.is_empty() {
            let msg = if let Some(msg) = self.conn.try_next()? {
                msg
            } else {
                self.read_one().await?
            };
            self.queue_incoming(msg)?;
        }
        let (msg, len) = self.queued.pop_front().expect("queued above");
        self.in_flight_bytes -= len;
        Ok(msg)
    }

    /// Sends `msg` and waits for its reply. Earlier replies still pending
    /// are returned first: use it only with nothing else in flight.
    pub async fn call(&mut self, msg: &Message) -> Result<Message, TransportError> {
        self.send(msg).await?;
        self.recv().await
    }

    fn queue_incoming(&mut self, msg: Message) -> Result<(), TransportError> {
        let len = if is_reply(&msg) {
            self.awaiting
                .pop_front()
                .ok_or(TransportError::UnsolicitedReply(msg.kind()))?
        } else {
            0
        };
        self.queued.push_back((msg, len));
        Ok(())
    }

    /// Waits for the next message, writing what is queued meanwhile.
    async fn read_one(&mut self) -> Result<Message, TransportError> {
        let t = ms(self.config.io_timeout_ms);
        let fd = self.fd();
        loop {
            if let Some(msg) = self.conn.try_next()? {
                return Ok(msg);
            }
            let more = until_idle::<B, _>(fd, t, self.conn.flush_and_fill()).await??;
            if !more {
                return Err(TransportError::Closed);
            }
        }
    }
}

/// Bytes the socket `fd` still holds to send or to have acknowledged
/// (`SIOCOUTQ`); `None` where the kernel does not say.
fn unsent(fd: std::os::fd::RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer; a
    // bad descriptor makes it fail, which is reported as `None`.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut n) };
    (r == 0).then_some(n)
}

/// Runs `io` until it completes, or until `idle` passes with no progress:
/// the I/O timeout is an inactivity timeout, not a deadline. Progress is
/// the peer taking bytes (the socket's send queue changes), so a large
/// write to a slow peer that keeps reading never times out, while a peer
/// that stopped reading (or a dead link) does. `io` is polled in place
/// between checks, never restarted.
async fn until_idle<B: Backend, T>(
    fd: std::os::fd::RawFd,
    idle: std::time::Duration,
    io: impl std::future::Future<Output = T>,
) -> Result<T, TransportError> {
    let mut io = std::pin::pin!(io);
    let mut last = unsent(fd);
    loop {
        let timer = std::pin::pin!(B::sleep(idle));
        match futures_util::future::select(io.as_mut(), timer).await {
            futures_util::future::Either::Left((out, _)) => return Ok(out),
            futures_util::future::Either::Right(((), _)) => {
                let now = unsent(fd);
                // Unknown, or unchanged and not empty: nothing moved.
                if now.is_none() || now == last {
                    return Err(TransportError::Timeout(idle));
                }
                last = now;
            }
        }
    }
}

fn retryable(e: &TransportError) -> bool {
    use crate::handshake::{HandshakeError, RejectReason};
    match e {
        TransportError::Handshake(HandshakeError::Rejected {
            reason: RejectReason::Busy,
            ..
        }) => true,
        TransportError::Handshake(_) => false,
        _ => true,
    }
}
