//! The messages peers exchange once authenticated, archived with rkyv.
//!
//! Each message travels in a sealed record ([`crate::record`]) behind a
//! header whose kind names it, so the receiver knows the archived type
//! before it looks at the body. Every body is
//! validated with bytecheck (`rkyv::access`) and then checked against
//! [`Limits`] before a single byte of it is copied into owned values.
//!
//! Session records and op batches are opaque bytes here: the engine defines
//! them. SIDs are 16 raw bytes; versions and ownership epochs are `u64`.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::frame::{self, Frame, FrameKind};
use crate::record;
use crate::seal::{RECORD_OVERHEAD, SealError};

mod ack;

pub use ack::{
    Ack, AckEntry, AckStatus, AllApplied, ArchivedAck, ArchivedAckEntry, ArchivedAckStatus,
    ArchivedAllApplied,
};

/// A session id: 128 random bits.
pub type Sid = [u8; 16];

/// Default for [`Limits::batch_entries_max`].
pub const BATCH_ENTRIES_MAX_DEFAULT: u32 = 4096;
/// Default for [`Limits::record_bytes_max`].
pub const RECORD_BYTES_MAX_DEFAULT: u32 = 1024 * 1024;
/// Default for [`Limits::counters_max`].
pub const COUNTERS_MAX_DEFAULT: u32 = 256;
/// Default for [`Limits::counter_name_bytes_max`].
pub const COUNTER_NAME_BYTES_MAX_DEFAULT: u32 = 64;

/// Bounds on what one peer may send. Checked on receipt after validation,
/// and on send so a peer never builds a message its receiver will refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, header included, in bytes.
    pub frame_bytes_max: u32,
    /// Most entries in one [`DeltaBatch`], [`Ack`] or [`Invalidate`].
    pub batch_entries_max: u32,
    /// Largest session record or op batch, in bytes.
    pub record_bytes_max: u32,
    /// Most counters in one [`Stats`].
    pub counters_max: u32,
    /// Longest counter name in one [`Stats`], in bytes.
    pub counter_name_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: frame::FRAME_BYTES_MAX_DEFAULT,
            batch_entries_max: BATCH_ENTRIES_MAX_DEFAULT,
            record_bytes_max: RECORD_BYTES_MAX_DEFAULT,
            counters_max: COUNTERS_MAX_DEFAULT,
            counter_name_bytes_max: COUNTER_NAME_BYTES_MAX_DEFAULT,
        }
    }
}

/// The change one [`DeltaEntry`] carries.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Delta {
    /// Ops to apply on top of `base_version` (engine-defined bytes).
    Ops(Vec<u8>),
    /// The whole record at `new_version` (engine-defined bytes).
    Full(Vec<u8>),
    /// The session was removed.
    Remove,
}

/// One session's change in a [`DeltaBatch`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct DeltaEntry {
    /// The session.
    pub sid: Sid,
    /// Version the receiver must hold for `Ops` to apply.
    pub base_version: u64,
    /// Version after applying this entry.
    pub new_version: u64,
    /// Sender's ownership epoch; older than the receiver's means fenced.
    pub epoch: u64,
    /// The change.
    pub body: Delta,
}

/// Changes from one web host, answered by an [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct DeltaBatch {
    /// The sending host.
    pub host_id: u64,
    /// At most [`Limits::batch_entries_max`] entries.
    pub entries: Vec<DeltaEntry>,
}

/// Asks a replica for its copy of a session (failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Fetch {
    /// Echoed in the reply.
    pub request_id: u64,
    /// The session wanted.
    pub sid: Sid,
}

/// A replica's copy of a session.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FoundRecord {
    /// The record's version.
    pub version: u64,
    /// The ownership epoch it was written under.
    pub epoch: u64,
    /// The record (engine-defined bytes), at most [`Limits::record_bytes_max`].
    pub record: Vec<u8>,
}

/// The answer to a [`Fetch`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FetchReply {
    /// The [`Fetch::request_id`] answered.
    pub request_id: u64,
    /// The session asked for.
    pub sid: Sid,
    /// `None` when the replica has no copy.
    pub found: Option<FoundRecord>,
}

/// One entry of an [`Invalidate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InvalidateEntry {
    /// The session.
    pub sid: Sid,
    /// Copies under an ownership epoch older than this are stale.
    pub epoch: u64,
}

/// Tells the receiver to drop its copies of sessions owned elsewhere now.
/// Not answered.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Invalidate {
    /// At most [`Limits::batch_entries_max`] entries.
    pub entries: Vec<InvalidateEntry>,
}

/// Liveness probe, answered by a [`Pong`] with the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Ping {
    /// Echoed in the pong.
    pub nonce: u64,
}

/// The answer to a [`Ping`].
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// Sessions the pinging peer wrote that another host has taken over
    /// since (a copy under a newer epoch arrived): its copies under an
    /// epoch older than the entry's are stale. At most
    /// [`Limits::batch_entries_max`] entries; a node that has more sends
    /// the rest with the next pongs.
    pub stale: Vec<InvalidateEntry>,
}

/// Asks a peer for its counters, answered by [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StatsRequest {
    /// Echoed in the reply.
    pub request_id: u64,
}

/// One named counter.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Counter {
    /// At most [`Limits::counter_name_bytes_max`] bytes.
    pub name: String,
    /// The value.
    pub value: u64,
}

/// A peer's counters.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Stats {
    /// The [`StatsRequest::request_id`] answered.
    pub request_id: u64,
    /// The answering process's incarnation.
    pub incarnation: u64,
    /// At most [`Limits::counters_max`] counters.
    pub counters: Vec<Counter>,
}

/// Every message an authenticated peer may send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Changes to replicate.
    DeltaBatch(DeltaBatch),
    /// Outcome of a delta batch.
    Ack(Ack),
    /// Failover read.
    Fetch(Fetch),
    /// Failover read result.
    FetchReply(FetchReply),
    /// Drop stale copies.
    Invalidate(Invalidate),
    /// Liveness probe.
    Ping(Ping),
    /// Liveness answer.
    Pong(Pong),
    /// Counters request.
    StatsRequest(StatsRequest),
    /// Counters.
    Stats(Stats),
    /// Outcome of a delta batch all of which was applied.
    AllApplied(AllApplied),
}

/// Why a frame body is not an acceptable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The frame kind is not a message (for example a handshake frame after
    /// authentication).
    #[error("frame kind {0:?} does not carry a message")]
    NotAMessage(FrameKind),
    /// The body is not a valid archive of the type its kind names.
    #[error("invalid {kind:?} body: {reason}")]
    Invalid {
        /// The frame kind.
        kind: FrameKind,
        /// bytecheck's description.
        reason: String,
    },
    /// The body is valid but exceeds a limit.
    #[error("{what} is {found}, over the limit {limit}")]
    OverLimit {
        /// Which limit.
        what: &'static str,
        /// The value found.
        found: u64,
        /// The limit.
        limit: u64,
    },
    /// Serializing failed (only on send).
    #[error("cannot serialize message: {0}")]
    Serialize(String),
}

/// Why a message could not be added to a sealed record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message is over a limit or does not serialize.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The record could not be sealed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

fn over(what: &'static str, found: usize, limit: u32) -> Result<(), MessageError> {
    if found as u64 > u64::from(limit) {
        Err(MessageError::OverLimit {
            what,
            found: found as u64,
            limit: u64::from(limit),
        })
    } else {
        Ok(())
    }
}

/// Frame bodies sit at arbitrary offsets in a receive buffer; rkyv wants its
/// root aligned, so a misaligned body is first copied here. 16 covers every
/// archived type of this module (largest alignment: 8).
const ARCHIVE_ALIGN: usize = 16;

fn access_checked<T>(
    kind: FrameKind,
    body: &[u8],
    limits: Limits,
    scratch: &mut AlignedVec<ARCHIVE_ALIGN>,
) -> Result<T, MessageError>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>
        + CheckLimits,
{
    let archived = access_limited::<T>(kind, body, limits, scratch)?;
    owned(kind, archived)
}

/// `body` validated as an archived `T` and checked against `limits`,
/// where it lies if it is aligned, else copied into `scratch`.
fn access_limited<'a, T>(
    kind: FrameKind,
    body: &'a [u8],
    limits: Limits,
    scratch: &'a mut AlignedVec<ARCHIVE_ALIGN>,
) -> Result<&'a T::Archived, MessageError>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Portable
        + for<'b> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'b, rancor::Error>>
        + CheckLimits,
{
    let bytes: &[u8] = if body.as_ptr().align_offset(ARCHIVE_ALIGN) == 0 {
        body
    } else {
        scratch.clear();
        scratch.extend_from_slice(body);
        scratch
    };
    let base = bytes.as_ptr() as usize;
    let archived =
        rkyv::access::<T::Archived, rancor::Error>(bytes).map_err(|e| MessageError::Invalid {
            kind,
            reason: readable(&e.to_string(), base),
        })?;
    archived.check_limits(limits)?;
    Ok(archived)
}

/// An archived `T`, already validated, copied into owned values.
fn owned<T>(kind: FrameKind, archived: &T::Archived) -> Result<T, MessageError>
where
    T: rkyv::Archive,
    T::Archived: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let base = std::ptr::from_ref(archived) as usize;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| MessageError::Invalid {
        kind,
        reason: readable(&e.to_string(), base),
    })
}

/// A validation error as a reader (and a log) wants it: bytecheck names
/// memory addresses (`ptr 0x00007f61ebabb8c3 ... in range 0x00007f62...`),
/// which say nothing to an operator and tell a log reader where this
/// process's heap is. Each address becomes its offset from the start of
/// the body (negative: before it), and only the first line is kept.
fn readable(reason: &str, base: usize) -> String {
    use std::fmt::Write as _;
    let line = reason.lines().next().unwrap_or("").trim();
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("0x") {
        out.push_str(&rest[..at]);
        let digits = rest[at + 2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .map_or(rest.len() - at - 2, |n| n);
        match usize::from_str_radix(&rest[at + 2..at + 2 + digits], 16) {
            // An address (a small hex number is left as it is).
            Ok(v) if digits >= 8 => {
                let offset = v as i128 - base as i128;
                let _ = write!(out, "offset {offset}");
            }
            _ => out.push_str(&rest[at..at + 2 + digits]),
        }
        rest = &rest[at + 2 + digits..];
    }
    out.push_str(rest);
    out
}

/// Limit checks on archived values, run after validation and before
/// deserialization, so an over-limit message costs no allocation.
trait CheckLimits {
    fn check_limits(&self, limits: Limits) -> Result<(), MessageError>;
}

fn delta_len(d: &ArchivedDelta) -> usize {
    match d {
        ArchivedDelta::Ops(b) | ArchivedDelta::Full(b) => b.len(),
        ArchivedDelta::Remove => 0,
    }
}

/// Every kind of batch holds at most [`Limits::batch_entries_max`] entries.
fn batch_over(what: &'static str, entries: usize, l: Limits) -> Result<(), MessageError> {
    over(what, entries, l.batch_entries_max)
}

impl CheckLimits for ArchivedDeltaBatch {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        batch_over("delta batch entries", self.entries.len(), l)?;
        for e in self.entries.iter() {
            over("delta body bytes", delta_len(&e.body), l.record_bytes_max)?;
        }
        Ok(())
    }
}

impl CheckLimits for ArchivedAck {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        batch_over("ack entries", self.entries.len(), l)
    }
}

impl CheckLimits for ArchivedAllApplied {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        batch_over("ack entries", self.entries.to_native() as usize, l)
    }
}

impl CheckLimits for ArchivedInvalidate {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        batch_over("invalidate entries", self.entries.len(), l)
    }
}

impl CheckLimits for ArchivedFetchReply {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        match self.found.as_ref() {
            Some(found) => over("record bytes", found.record.len(), l.record_bytes_max),
            None => Ok(()),
        }
    }
}

impl CheckLimits for ArchivedStats {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        over("stats counters", self.counters.len(), l.counters_max)?;
        for c in self.counters.iter() {
            over("counter name bytes", c.name.len(), l.counter_name_bytes_max)?;
        }
        Ok(())
    }
}

macro_rules! no_limits {
    ($($t:ty),*) => {$(
        impl CheckLimits for $t {
            fn check_limits(&self, _: Limits) -> Result<(), MessageError> { Ok(()) }
        }
    )*};
}
no_limits!(ArchivedFetch, ArchivedPing, ArchivedStatsRequest);

impl CheckLimits for ArchivedPong {
    fn check_limits(&self, l: Limits) -> Result<(), MessageError> {
        batch_over("pong stale entries", self.stale.len(), l)
    }
}

impl Message {
    /// The frame kind this message travels in.
    #[must_use]
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::DeltaBatch(_) => FrameKind::DeltaBatch,
            Message::Ack(_) => FrameKind::Ack,
            Message::Fetch(_) => FrameKind::Fetch,
            Message::FetchReply(_) => FrameKind::FetchReply,
            Message::Invalidate(_) => FrameKind::Invalidate,
            Message::Ping(_) => FrameKind::Ping,
            Message::Pong(_) => FrameKind::Pong,
            Message::StatsRequest(_) => FrameKind::StatsRequest,
            Message::Stats(_) => FrameKind::Stats,
            Message::AllApplied(_) => FrameKind::AllApplied,
        }
    }

    /// True for messages the receiver answers with exactly one reply, in
    /// order: delta batch, fetch, ping and stats request.
    #[must_use]
    pub fn expects_reply(&self) -> bool {
        matches!(
            self,
            Message::DeltaBatch(_)
                | Message::Fetch(_)
                | Message::Ping(_)
                | Message::StatsRequest(_)
        )
    }

    /// Checks this message against `limits` (as the receiver will).
    pub fn check_limits(&self, l: &Limits) -> Result<(), MessageError> {
        match self {
            Message::DeltaBatch(b) => {
                over("delta batch entries", b.entries.len(), l.batch_entries_max)?;
                for e in &b.entries {
                    let len = match &e.body {
                        Delta::Ops(b) | Delta::Full(b) => b.len(),
                        Delta::Remove => 0,
                    };
                    over("delta body bytes", len, l.record_bytes_max)?;
                }
                Ok(())
            }
            Message::Ack(a) => over("ack entries", a.entries.len(), l.batch_entries_max),
            Message::AllApplied(a) => batch_over("ack entries", a.entries as usize, *l),
            Message::Invalidate(i) => {
                over("invalidate entries", i.entries.len(), l.batch_entries_max)
            }
            Message::FetchReply(r) => match &r.found {
                Some(f) => over("record bytes", f.record.len(), l.record_bytes_max),
                None => Ok(()),
            },
            Message::Stats(s) => {
                over("stats counters", s.counters.len(), l.counters_max)?;
                for c in &s.counters {
                    over("counter name bytes", c.name.len(), l.counter_name_bytes_max)?;
                }
                Ok(())
            }
            Message::Pong(p) => batch_over("pong stale entries", p.stale.len(), *l),
            Message::Fetch(_) | Message::Ping(_) | Message::StatsRequest(_) => Ok(()),
        }
    }
}

/// Encodes and decodes messages, reusing scratch buffers between calls.
#[derive(Debug)]
pub struct Codec {
    limits: Limits,
    scratch: AlignedVec<ARCHIVE_ALIGN>,
}

impl Codec {
    /// A codec enforcing `limits`.
    #[must_use]
    pub fn new(limits: Limits) -> Codec {
        Codec {
            limits,
            scratch: AlignedVec::new(),
        }
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends `msg` as one checksummed (unsealed) frame to `out`, after
    /// checking it against the limits (so the peer, sharing them, will
    /// accept it). Connections send sealed records instead: see
    /// [`Codec::encode_message_into`] and [`crate::record::RecordWriter`].
    pub fn encode_into(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), MessageError> {
        msg.check_limits(&self.limits)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let scratch = archive(msg, scratch)?;
        let frame_bytes = frame::HEADER_LEN + scratch.len();
        let fits = over("frame bytes", frame_bytes, self.limits.frame_bytes_max);
        if fits.is_ok() {
            frame::encode_into(msg.kind(), &scratch, out);
        }
        self.scratch = scratch;
        fits
    }

    /// Appends `msg` to `out` as one message of a record's plaintext
    /// (header, body, padding: [`crate::record`]), after checking it
    /// against the limits, a record of its own included. The body is
    /// archived where it lies in `out`, with no copy. Returns the bytes
    /// appended; on error `out` is left as it was.
    pub fn encode_message_into(
        &mut self,
        msg: &Message,
        out: &mut Vec<u8>,
    ) -> Result<usize, MessageError> {
        msg.check_limits(&self.limits)?;
        let start = out.len();
        out.resize(start + record::MESSAGE_HEADER_LEN, 0);
        let body = BodyWriter {
            start: out.len(),
            out: &mut *out,
        };
        let body_len = match archive(msg, body) {
            Ok(body) => body.out.len() - body.start,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        let len = record::message_len(body_len);
        let fits = over(
            "frame bytes",
            RECORD_OVERHEAD + len,
            self.limits.frame_bytes_max,
        );
        let Ok(body_len_u32) = u32::try_from(body_len) else {
            out.truncate(start);
            return Err(MessageError::Serialize("a body of 4 GiB or more".into()));
        };
        if let Err(e) = fits {
            out.truncate(start);
            return Err(e);
        }
        out.resize(start + len, 0);
        out[start..start + record::MESSAGE_HEADER_LEN]
            .copy_from_slice(&record::message_header(msg.kind(), body_len_u32));
        Ok(len)
    }

    /// Encodes `msg` as one frame into a new vector.
    pub fn encode(&mut self, msg: &Message) -> Result<Vec<u8>, MessageError> {
        let mut out = Vec::new();
        self.encode_into(msg, &mut out)?;
        Ok(out)
    }

    /// Validates a received frame's body and turns it into a [`Message`].
    pub fn decode(&mut self, frame: &Frame<'_>) -> Result<Message, MessageError> {
        let (kind, body, l, s) = (frame.kind, frame.body, self.limits, &mut self.scratch);
        Ok(match kind {
            FrameKind::DeltaBatch => Message::DeltaBatch(access_checked(kind, body, l, s)?),
            FrameKind::Ack => Message::Ack(access_checked(kind, body, l, s)?),
            FrameKind::Fetch => Message::Fetch(access_checked(kind, body, l, s)?),
            FrameKind::FetchReply => Message::FetchReply(access_checked(kind, body, l, s)?),
            FrameKind::Invalidate => Message::Invalidate(access_checked(kind, body, l, s)?),
            FrameKind::Ping => Message::Ping(access_checked(kind, body, l, s)?),
            FrameKind::Pong => Message::Pong(access_checked(kind, body, l, s)?),
            FrameKind::StatsRequest => Message::StatsRequest(access_checked(kind, body, l, s)?),
            FrameKind::Stats => Message::Stats(access_checked(kind, body, l, s)?),
            FrameKind::AllApplied => Message::AllApplied(access_checked(kind, body, l, s)?),
            other => return Err(MessageError::NotAMessage(other)),
        })
    }

    /// Checks one frame's message as [`Codec::decode`] does, but leaves a
    /// [`DeltaBatch`] where it lies (in `frame`, or in this codec's
    /// scratch if it is not aligned): a node reads the bulk of its traffic
    /// without copying it into owned values first.
    pub fn receive<'a>(&'a mut self, frame: &Frame<'a>) -> Result<Received<'a>, MessageError> {
        if frame.kind != FrameKind::DeltaBatch {
            return self.decode(frame).map(Received::Message);
        }
        let batch =
            access_limited::<DeltaBatch>(frame.kind, frame.body, self.limits, &mut self.scratch)?;
        Ok(Received::DeltaBatch(batch))
    }
}

/// A message as a server's handler gets it: validated and checked
/// against the limits, a [`DeltaBatch`] still where it arrived.
#[derive(Debug)]
pub enum Received<'a> {
    /// A delta batch, read in the connection's buffer.
    DeltaBatch(&'a ArchivedDeltaBatch),
    /// Any other message, decoded.
    Message(Message),
}

impl Received<'_> {
    /// The message as owned values (a delta batch copied out).
    pub fn into_message(self) -> Result<Message, MessageError> {
        match self {
            Received::DeltaBatch(b) => owned(FrameKind::DeltaBatch, b).map(Message::DeltaBatch),
            Received::Message(m) => Ok(m),
        }
    }
}

impl From<Message> for Received<'_> {
    fn from(msg: Message) -> Self {
        Received::Message(msg)
    }
}

/// Archives `msg` into `writer` (positions counted from the writer's
/// start).
fn archive<W>(msg: &Message, writer: W) -> Result<W, MessageError>
where
    W: rkyv::ser::Writer<rancor::Error>,
{
    use rkyv::api::high::to_bytes_in;
    let result = match msg {
        Message::DeltaBatch(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Ack(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Fetch(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::FetchReply(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Invalidate(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Ping(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Pong(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::StatsRequest(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::Stats(m) => to_bytes_in::<_, rancor::Error>(m, writer),
        Message::AllApplied(m) => to_bytes_in::<_, rancor::Error>(m, writer),
    };
    result.map_err(|e| MessageError::Serialize(e.to_string()))
}

/// Archives into the tail of a send buffer, positions counted from where
/// the body starts (16-byte aligned in its record, so rkyv's padding
/// matches where the receiver reads it).
struct BodyWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl rkyv::ser::Positional for BodyWriter<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.start
    }
}

impl<E> rkyv::ser::Writer<E> for BodyWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new(Limits::default())
    }
}

/// One sample of each message kind, for tests, fuzzing and examples.
#[doc(hidden)]
#[must_use]
pub fn samples() -> Vec<Message> {
    let stale = vec![InvalidateEntry {
        sid: [7; 16],
        epoch: 9,
    }];
    vec![
        Message::DeltaBatch(DeltaBatch {
            host_id: 7,
            // One entry of each kind of delta.
            entries: [
                (1, 3, Delta::Ops(b"set k v".to_vec())),
                (2, 0, Delta::Full(vec![9; 100])),
                (3, 5, Delta::Remove),
            ]
            .into_iter()
            .map(|(n, base_version, body)| DeltaEntry {
                sid: [n; 16],
                base_version,
                new_version: base_version + 1,
                epoch: 2,
                body,
            })
            .collect(),
        }),
        Message::Ack(Ack {
            // One entry of each status.
            entries: [
                (1, 4, AckStatus::Applied),
                (2, 0, AckStatus::NeedFull),
                (3, 5, AckStatus::Fenced),
                (4, 0, AckStatus::Refused),
            ]
            .into_iter()
            .map(|(n, version, status)| AckEntry {
                sid: [n; 16],
                version,
                status,
            })
            .collect(),
        }),
        Message::AllApplied(AllApplied { entries: 3 }),
        Message::Fetch(Fetch {
            request_id: 11,
            sid: [5; 16],
        }),
        Message::FetchReply(FetchReply {
            request_id: 11,
            sid: [5; 16],
            found: Some(FoundRecord {
                version: 8,
                epoch: 3,
                record: b"record bytes".to_vec(),
            }),
        }),
        Message::FetchReply(FetchReply {
            request_id: 12,
            sid: [6; 16],
            found: None,
        }),
        Message::Invalidate(Invalidate {
            entries: stale.clone(),
        }),
        Message::Ping(Ping { nonce: 42 }),
        Message::Pong(Pong { nonce: 42, stale }),
        Message::StatsRequest(StatsRequest { request_id: 1 }),
        Message::Stats(Stats {
            request_id: 1,
            incarnation: 0xDEAD_BEEF,
            counters: vec![Counter {
                name: "sessions".into(),
                value: 12,
            }],
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: &Message) {
        let mut codec = Codec::default();
        let bytes = codec.encode(msg).unwrap();
        // Decode from an odd offset too, to exercise the realignment copy.
        for pad in [0usize, 1, 3] {
            let mut buf = vec![0u8; pad];
            buf.extend_from_slice(&bytes);
            let (frame, used) = Frame::decode(&buf[pad..], u32::MAX).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(&codec.decode(&frame).unwrap(), msg);
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for msg in crate::message::samples() {
            round_trip(&msg);
        }
    }

    #[test]
    fn over_limit_refused_on_receipt() {
        let msg = Message::Ack(Ack {
            entries: vec![
                AckEntry {
                    sid: [1; 16],
                    version: 1,
                    status: AckStatus::Applied
                };
                10
            ],
        });
        let bytes = Codec::default().encode(&msg).unwrap();
        let (frame, _) = Frame::decode(&bytes, u32::MAX).unwrap().unwrap();
        let mut strict = Codec::new(Limits {
            batch_entries_max: 9,
            ..Limits::default()
        });
        assert!(matches!(
            strict.decode(&frame),
            Err(MessageError::OverLimit { .. })
        ));
        assert!(matches!(
            strict.encode(&msg),
            Err(MessageError::OverLimit { .. })
        ));
    }

    #[test]
    fn garbage_body_is_invalid_not_a_panic() {
        let mut codec = Codec::default();
        for kind in FrameKind::ALL {
            for body in [&b""[..], b"\xff", b"\x01\x02\x03"] {
                let frame = Frame { kind, body };
                assert!(codec.decode(&frame).is_err(), "{kind:?} {body:?}");
            }
            // Plain-data kinds (fetch, ping, ...) have no invalid bit
            // patterns, so 64 arbitrary bytes may well be one; kinds with
            // lengths, pointers or enum tags must refuse them.
            let frame = Frame {
                kind,
                body: &[0xAB; 64],
            };
            let plain = matches!(
                kind,
                FrameKind::Fetch | FrameKind::Ping | FrameKind::StatsRequest
            );
            assert_eq!(codec.decode(&frame).is_ok(), plain, "{kind:?}");
        }
    }
}

#[cfg(test)]
mod readable_tests {
    use super::*;

    #[test]
    fn validation_errors_name_offsets_not_addresses() {
        let body = vec![0xABu8; 64];
        let mut scratch = AlignedVec::<ARCHIVE_ALIGN>::new();
        let err = access_checked::<DeltaBatch>(
            FrameKind::DeltaBatch,
            &body,
            Limits::default(),
            &mut scratch,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("invalid DeltaBatch body: "), "{err}");
        assert!(!err.contains("0x0000"), "an address in {err}");
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(
            readable(
                "ptr 0x0000000000001010 size 8 in range 0x0000000000001000..0x0000000000001040\nmore",
                0x1000
            ),
            "ptr offset 16 size 8 in range offset 0..offset 64"
        );
        assert_eq!(readable("kind 0x05 is bad", 0x1000), "kind 0x05 is bad");
    }
}
