//! What clients and servers share: socket options, peer info, errors, and
//! the framed connection (bounded read buffer, batched writes, handshake
//! driver) that both run on either [`Backend`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::backend::{Backend, Stream};
use crate::frame::{FrameError, FrameHeader, HEADER_LEN};
use crate::handshake::{Established, Handshake, HandshakeError, Identity};
use crate::message::{Codec, EncodeError, Limits, Message, MessageError, Received};
use crate::record::{self, RecordWriter};
use crate::seal::{Opener, Protection, RECORD_OVERHEAD, SealError, SessionKeys};

/// Bytes asked of the kernel per read when no bigger frame is pending.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Socket options applied (through socket2) to every listener and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// Disable Nagle's algorithm (default on: batches are already coalesced).
    pub nodelay: bool,
    /// TCP keepalive idle time, in milliseconds (`None`: off).
    pub keepalive_ms: Option<u64>,
    /// `SO_RCVBUF` in bytes (`None`: kernel default).
    pub recv_buffer_bytes: Option<u32>,
    /// `SO_SNDBUF` in bytes (`None`: kernel default).
    pub send_buffer_bytes: Option<u32>,
    /// `SO_REUSEPORT` on listeners, so one server per thread can share a port.
    pub reuse_port: bool,
    /// Listen backlog.
    pub listen_backlog: i32,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            keepalive_ms: Some(30_000),
            recv_buffer_bytes: None,
            send_buffer_bytes: None,
            reuse_port: false,
            listen_backlog: 1024,
        }
    }
}

impl SocketOptions {
    pub(crate) fn apply(&self, fd: &impl std::os::fd::AsFd) -> io::Result<()> {
        let sock = socket2::SockRef::from(fd);
        sock.set_tcp_nodelay(self.nodelay)?;
        if let Some(ms) = self.keepalive_ms {
            let ka = socket2::TcpKeepalive::new()
                .with_time(Duration::from_millis(ms))
                .with_interval(Duration::from_millis(ms.div_ceil(3).max(1000)));
            sock.set_tcp_keepalive(&ka)?;
        }
        if let Some(n) = self.recv_buffer_bytes {
            sock.set_recv_buffer_size(n as usize)?;
        }
        if let Some(n) = self.send_buffer_bytes {
            sock.set_send_buffer_size(n as usize)?;
        }
        Ok(())
    }
}

/// An authenticated peer, as handed to a server's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id and incarnation, as proven in the handshake.
    pub identity: Identity,
    /// Its socket address.
    pub addr: SocketAddr,
    /// The responder's frame limit for this connection.
    pub frame_bytes_max: u32,
}

/// Why a connection failed or ended. The connection is unusable afterwards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket call failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The handshake failed (wrong key, wrong version, refused, malformed).
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The handshake did not finish within the timeout.
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// The server closed the connection in the handshake to make room for
    /// a newer one (it was at its cap of unauthenticated connections).
    #[error("evicted during the handshake for a newer connection")]
    HandshakeEvicted,
    /// No byte moved within the idle or I/O timeout.
    #[error("no progress within {0:?}")]
    Timeout(Duration),
    /// The peer sent bytes that are not a valid frame.
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame after the handshake failed to open (tampered with,
    /// replayed, reordered, dropped, from the other direction, under
    /// another key), or could not be sealed.
    #[error("sealed record refused: {0}")]
    Seal(SealError),
    /// The peer sent a frame whose body is not an acceptable message.
    #[error("invalid message: {0}")]
    Message(#[from] MessageError),
    /// The peer closed the connection between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed by peer mid-frame ({buffered} bytes of a partial frame)")]
    Truncated {
        /// Bytes of the partial frame received.
        buffered: usize,
    },
    /// A reply arrived with no request waiting for it.
    #[error("unsolicited {0:?} reply")]
    UnsolicitedReply(crate::frame::FrameKind),
    /// Sending would exceed `in_flight_bytes_max` and every in-flight
    /// request is already answered: call `recv` first.
    #[error(
        "{in_flight_bytes} bytes in flight, the cap is {in_flight_bytes_max}: receive replies first"
    )]
    InFlightFull {
        /// Bytes of requests whose replies were not yet received.
        in_flight_bytes: u64,
        /// The cap.
        in_flight_bytes_max: u64,
    },
}

impl From<SealError> for TransportError {
    fn from(e: SealError) -> Self {
        match e {
            SealError::Frame(e) => TransportError::Frame(e),
            e => TransportError::Seal(e),
        }
    }
}

impl From<EncodeError> for TransportError {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::Message(e) => TransportError::Message(e),
            EncodeError::Seal(e) => e.into(),
        }
    }
}

impl TransportError {
    /// True when the peer sent bytes this side refuses: an invalid frame,
    /// a frame that fails to open, an invalid message (counted as protocol
    /// errors).
    #[must_use]
    pub fn is_protocol_error(&self) -> bool {
        matches!(
            self,
            TransportError::Frame(_) | TransportError::Seal(_) | TransportError::Message(_)
        )
    }
}

/// Runs a handshake to completion over `stream`, reading exactly the bytes
/// each step wants (so nothing after the handshake is consumed) into a fixed
/// buffer. On failure, a `Reject` the machine queued is sent best-effort.
pub(crate) async fn drive_handshake<S: Stream>(
    stream: &mut S,
    mut hs: Handshake,
) -> Result<Established, TransportError> {
    let mut buf = [0u8; crate::handshake::HANDSHAKE_FRAME_BYTES_MAX];
    loop {
        if let Some(out) = hs.take_output() {
            let (bytes, len) = out.into_parts();
            stream.write_small(bytes, len).await?;
        }
        if let Some(done) = hs.established() {
            return Ok(done);
        }
        let want = hs.wanted();
        let (res, filled) = stream.read_exact_small(buf, want).await;
        buf = filled;
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(TransportError::Closed);
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = hs.receive(&buf[..want]) {
            if let Some(out) = hs.take_output() {
                let (bytes, len) = out.into_parts();
                let _ = stream.write_small(bytes, len).await;
            }
            return Err(e.into());
        }
    }
}

/// The receiving half of a framed connection: a read buffer that grows only
/// to the length of a record whose header passed the limit check, and the
/// opener that decrypts each record in place, whose messages are then
/// decoded one by one where they lie.
pub(crate) struct FrameReader {
    codec: Codec,
    opener: Opener,
    rbuf: Vec<u8>,
    /// Where the next record starts in `rbuf`.
    rstart: usize,
    /// The messages of the last opened record not yet decoded (a range of
    /// `rbuf`, before `rstart`).
    pending: std::ops::Range<usize>,
    /// The last read left more bytes waiting in the socket (as far as the
    /// backend can tell): the next read completes at once.
    more_waiting: bool,
}

impl FrameReader {
    pub(crate) fn new(limits: Limits, opener: Opener) -> FrameReader {
        FrameReader {
            codec: Codec::new(limits),
            opener,
            rbuf: Vec::new(),
            rstart: 0,
            pending: 0..0,
            more_waiting: false,
        }
    }

    /// The last read left more bytes waiting in the socket.
    pub(crate) fn more_waiting(&self) -> bool {
        self.more_waiting
    }

    fn frame_bytes_max(&self) -> u32 {
        self.codec.limits().frame_bytes_max
    }

    fn record_bytes_max(&self) -> u32 {
        record::record_bytes_max(self.frame_bytes_max())
    }

    /// The next complete message already buffered, if any.
    pub(crate) fn try_next(&mut self) -> Result<Option<Message>, TransportError> {
        match self.try_receive()? {
            Some(r) => Ok(Some(r.into_message()?)),
            None => Ok(None),
        }
    }

    /// [`FrameReader::try_next`], a delta batch left where it lies.
    pub(crate) fn try_receive(&mut self) -> Result<Option<Received<'_>>, TransportError> {
        if self.pending.is_empty() {
            if self.rstart == self.rbuf.len() {
                // Every record taken: start the buffer over.
                self.rbuf.clear();
                self.rstart = 0;
            }
            let max = self.record_bytes_max();
            let Some((_, used)) = self.opener.open(&mut self.rbuf[self.rstart..], max)? else {
                return Ok(None);
            };
            let plain_start = self.rstart + HEADER_LEN;
            self.pending = plain_start..plain_start + used - RECORD_OVERHEAD;
            self.rstart += used;
        }
        let (frame, used) =
            record::next_message(&self.rbuf[self.pending.clone()], self.frame_bytes_max())?;
        self.pending.start += used;
        Ok(Some(self.codec.receive(&frame)?))
    }

    /// Reads more bytes from `stream`. `Ok(false)` on a clean end of stream.
    pub(crate) async fn fill<S: Stream>(&mut self, stream: &S) -> Result<bool, TransportError> {
        debug_assert!(
            self.pending.is_empty(),
            "fill before every message is taken"
        );
        let max = self.record_bytes_max();
        // Header already validated (open returned need-more): size for it.
        let need = match FrameHeader::parse(&self.rbuf[self.rstart..], max)? {
            Some(h) => {
                self.opener.check_header(&h)?;
                h.frame_len()
            }
            None => HEADER_LEN,
        };
        if self.rstart > 0 {
            self.rbuf.drain(..self.rstart);
            self.rstart = 0;
            self.pending = 0..0;
        }
        let target = need.max(READ_CHUNK_BYTES);
        if self.rbuf.is_empty() && self.rbuf.capacity() > 4 * READ_CHUNK_BYTES {
            // A past large record should not pin its buffer forever.
            self.rbuf = Vec::with_capacity(READ_CHUNK_BYTES);
        }
        if self.rbuf.capacity() < target {
            self.rbuf.reserve_exact(target - self.rbuf.len());
        }
        let buf = std::mem::take(&mut self.rbuf);
        let (res, more_waiting, buf) = stream.read_append(buf, self.more_waiting).await;
        self.rbuf = buf;
        self.more_waiting = more_waiting;
        match res? {
            0 if self.rbuf.is_empty() => Ok(false),
            0 => Err(TransportError::Truncated {
                buffered: self.rbuf.len(),
            }),
            _ => Ok(true),
        }
    }
}

/// A framed, authenticated connection used by one task at a time: a
/// [`FrameReader`], and a [`RecordWriter`] that coalesces messages into
/// sealed records until flushed.
pub(crate) struct Conn<B: Backend> {
    pub(crate) stream: B::Stream,
    pub(crate) reader: FrameReader,
    pub(crate) codec: Codec,
    pub(crate) out: RecordWriter,
    /// The buffer handed to the socket (its allocation kept between
    /// writes).
    wbuf: Vec<u8>,
}

impl<B: Backend> Conn<B> {
    pub(crate) fn new(
        stream: B::Stream,
        limits: Limits,
        keys: &SessionKeys,
        protection: Protection,
    ) -> Conn<B> {
        Conn {
            stream,
            reader: FrameReader::new(limits, protection.opener(keys)),
            codec: Codec::new(limits),
            out: RecordWriter::new(protection.sealer(keys)),
            wbuf: Vec::new(),
        }
    }

    /// The next complete message already buffered, if any.
    pub(crate) fn try_next(&mut self) -> Result<Option<Message>, TransportError> {
        self.reader.try_next()
    }

    /// Reads more bytes. `Ok(false)` on a clean end of stream.
    pub(crate) async fn fill(&mut self) -> Result<bool, TransportError> {
        self.reader.fill(&self.stream).await
    }

    /// Writes everything queued while reading more: both at once, so on
    /// `io_uring` the send and the receive go to the kernel in one
    /// submission. `Ok(false)` on a clean end of stream.
    pub(crate) async fn flush_and_fill(&mut self) -> Result<bool, TransportError> {
        if self.out.is_empty() {
            return self.fill().await;
        }
        self.out.take_sealed(&mut self.wbuf)?;
        let Conn {
            stream,
            reader,
            wbuf,
            ..
        } = self;
        let out = std::mem::take(wbuf);
        let ((written, out), more) =
            futures_util::future::join(stream.write_all(out), reader.fill(&*stream)).await;
        *wbuf = out;
        written?;
        more
    }

    /// Appends `msg` to the open record; returns the bytes it takes there.
    pub(crate) fn queue(&mut self, msg: &Message) -> Result<usize, TransportError> {
        Ok(self.out.push(&mut self.codec, msg)?)
    }

    pub(crate) async fn flush(&mut self) -> Result<(), TransportError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.out.take_sealed(&mut self.wbuf)?;
        let buf = std::mem::take(&mut self.wbuf);
        let (res, buf) = self.stream.write_all(buf).await;
        self.wbuf = buf;
        res?;
        Ok(())
    }
}

/// Exponential backoff between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubling up to `max`.
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, max }
    }

    /// The delay before the next attempt, with up to 25% jitter so a farm
    /// of hosts does not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut r = [0u8; 2];
        let jitter = if getrandom::fill(&mut r).is_ok() {
            u32::from(u16::from_le_bytes(r)) % 256
        } else {
            0
        };
        base + base / 1024 * jitter
    }
}

pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}
