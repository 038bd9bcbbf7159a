//! Records: what the [sealed](crate::seal) unit after the handshake holds.
//!
//! A record's plaintext is one or more messages, each laid out as
//!
//! ```text
//! | kind u8 | zero [3] | body_len u32 | zero [8] | body ... | zero padding to a multiple of 16 |
//! | 0       | 1      3 | 4          7 | 8     15 | 16 ...                                    |
//! ```
//!
//! so every body starts 16 bytes after a 16-byte boundary of its record: a
//! receive buffer that holds records back to back (each a multiple of 16
//! bytes long) from an aligned start hands rkyv aligned archives, read where
//! they were decrypted with no copy.
//!
//! Writers put everything they queue for one socket write into as few
//! records as they can ([`RecordWriter`]): one seal, one tag and one counter
//! for many messages, so the fixed cost of sealing and opening is paid per
//! write rather than per message. A record holding more than one message is
//! at most [`COALESCE_BYTES_MAX`] long; a single message may take a record
//! of its own up to the receiver's `frame_bytes_max`. So a receiver accepts
//! records of up to `max(frame_bytes_max, COALESCE_BYTES_MAX)` bytes
//! ([`record_bytes_max`]) and still holds each message to `frame_bytes_max`
//! ([`next_message`]).

use crate::frame::{Frame, FrameError, FrameKind, HEADER_LEN};
use crate::message::{Codec, EncodeError, Message};
use crate::seal::{BLOCK_LEN, RECORD_OVERHEAD, SealError, Sealer, TAG_LEN};

/// Bytes of the header before each message in a record.
pub const MESSAGE_HEADER_LEN: usize = 16;
/// Largest record holding more than one message, header and tag included.
/// Below the transport's 64 KiB read chunk, so a coalesced record never
/// makes a receive buffer grow, and a read usually brings whole records.
pub const COALESCE_BYTES_MAX: u32 = 32 * 1024;

/// The largest record a receiver with `frame_bytes_max` accepts: a
/// single message up to its frame limit, or coalesced messages up to
/// [`COALESCE_BYTES_MAX`].
#[must_use]
pub fn record_bytes_max(frame_bytes_max: u32) -> u32 {
    frame_bytes_max.max(COALESCE_BYTES_MAX)
}

/// Bytes a message whose body is `body_len` bytes takes in a record:
/// its header, the body, the padding.
#[must_use]
pub fn message_len(body_len: usize) -> usize {
    MESSAGE_HEADER_LEN + body_len.next_multiple_of(BLOCK_LEN)
}

/// The header before a message of `kind` whose body is `body_len` bytes.
pub(crate) fn message_header(kind: FrameKind, body_len: u32) -> [u8; MESSAGE_HEADER_LEN] {
    let mut header = [0u8; MESSAGE_HEADER_LEN];
    header[0] = kind as u8;
    header[4..8].copy_from_slice(&body_len.to_le_bytes());
    header
}

/// Appends one message of `kind` carrying `body` to `out`, padded: the
/// plaintext of a record is one or more of these.
///
/// # Panics
/// If `body` is 4 GiB or longer, which no limit of this crate allows.
pub fn push_message(kind: FrameKind, body: &[u8], out: &mut Vec<u8>) {
    let body_len = u32::try_from(body.len()).expect("message body under 4 GiB");
    let start = out.len();
    out.reserve(message_len(body.len()));
    out.extend_from_slice(&message_header(kind, body_len));
    out.extend_from_slice(body);
    out.resize(start + message_len(body.len()), 0);
}

/// Reads the message at the start of `plain`, the unread rest of an opened
/// record; returns it and the bytes it takes (padding included).
///
/// A kind this build does not know is [`FrameError::UnknownKind`] (the
/// peer may be newer: a server says so in a `Reject`); a message that
/// would not fit a record of its own under `frame_bytes_max` is
/// [`FrameError::TooLarge`]; a layout that is not the one above is
/// [`SealError::Malformed`]. Never panics.
pub fn next_message(plain: &[u8], frame_bytes_max: u32) -> Result<(Frame<'_>, usize), SealError> {
    let Some(head) = plain.first_chunk::<MESSAGE_HEADER_LEN>() else {
        return Err(SealError::Malformed {
            what: "a message header cut short by the end of its record",
        });
    };
    let kind = FrameKind::from_u8(head[0]).ok_or(FrameError::UnknownKind { found: head[0] })?;
    if head[1..4] != [0; 3] || head[8..16] != [0; 8] {
        return Err(SealError::Malformed {
            what: "nonzero reserved bytes in a message header",
        });
    }
    let body_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let len = message_len(body_len as usize);
    let frame_bytes = (RECORD_OVERHEAD + len) as u64;
    if frame_bytes > u64::from(frame_bytes_max) {
        return Err(FrameError::TooLarge {
            frame_bytes,
            frame_bytes_max,
        }
        .into());
    }
    let Some(message) = plain.get(..len) else {
        return Err(SealError::Malformed {
            what: "a message runs past the end of its record",
        });
    };
    let (body, padding) = message[MESSAGE_HEADER_LEN..].split_at(body_len as usize);
    if padding.iter().any(|&b| b != 0) {
        return Err(SealError::Malformed {
            what: "nonzero padding after a message",
        });
    }
    Ok((Frame { kind, body }, len))
}

/// The send buffer of one direction of a connection: messages are
/// appended to an open record, which is sealed when the buffer is taken
/// for a write ([`RecordWriter::take_sealed`]), so what one write carries
/// is one record (or a few, each under [`COALESCE_BYTES_MAX`]). Records
/// are sealed in buffer order, which is the order they are written: the
/// counters stay in step with the peer's.
#[derive(Debug)]
pub struct RecordWriter {
    buf: Vec<u8>,
    sealer: Sealer,
    /// Where the open record starts in `buf` (its header is reserved).
    open: Option<usize>,
}

impl RecordWriter {
    /// An empty buffer sealing with `sealer`.
    #[must_use]
    pub fn new(sealer: Sealer) -> RecordWriter {
        RecordWriter {
            buf: Vec::new(),
            sealer,
            open: None,
        }
    }

    /// Bytes buffered, sealed or not.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing is buffered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends `msg`, checked against `codec`'s limits and archived in
    /// place; returns the bytes it takes in its record. On error the
    /// buffer holds what it held before.
    pub fn push(&mut self, codec: &mut Codec, msg: &Message) -> Result<usize, EncodeError> {
        self.append(|out| {
            codec.encode_message_into(msg, out)?;
            Ok(())
        })
    }

    /// Appends a message of `kind` whose body is `body` as it is (a
    /// `Reject`, or bytes a test wants to send).
    pub fn push_raw(&mut self, kind: FrameKind, body: &[u8]) -> Result<usize, SealError> {
        self.append(|out| {
            push_message(kind, body, out);
            Ok(())
        })
    }

    /// Seals the open record, if any: after it, the whole buffer is
    /// records ready to write.
    pub fn seal(&mut self) -> Result<(), SealError> {
        let Some(start) = self.open.take() else {
            return Ok(());
        };
        self.buf.resize(self.buf.len() + TAG_LEN, 0);
        self.sealer.seal_in_place(&mut self.buf[start..])
    }

    /// Seals the open record and swaps the buffer with `out` (emptied
    /// first), keeping the allocations of both.
    pub fn take_sealed(&mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        self.seal()?;
        out.clear();
        std::mem::swap(&mut self.buf, out);
        Ok(())
    }

    /// Runs `write` to append one message at the end of the buffer, in
    /// the open record or a new one.
    fn append<E: From<SealError>>(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<usize, E> {
        // A record at half the cap is closed before the next message, so
        // the common message never has to move (below).
        if let Some(start) = self.open
            && self.buf.len() - start >= COALESCE_BYTES_MAX as usize / 2
        {
            self.seal()?;
        }
        let start = if let Some(start) = self.open {
            start
        } else {
            let start = self.buf.len();
            self.buf.resize(start + HEADER_LEN, 0);
            start
        };
        let at = self.buf.len();
        if let Err(e) = write(&mut self.buf) {
            let keep = if self.open.is_some() { at } else { start };
            self.buf.truncate(keep);
            return Err(e);
        }
        self.open = Some(start);
        let len = self.buf.len() - at;
        let joined = at > start + HEADER_LEN;
        if joined && self.buf.len() + TAG_LEN - start > COALESCE_BYTES_MAX as usize {
            // Too big to join the open record: close that record before
            // this message, which moves up to make room for its tag and
            // the next record's header.
            self.buf.resize(self.buf.len() + RECORD_OVERHEAD, 0);
            self.buf.copy_within(at..at + len, at + RECORD_OVERHEAD);
            self.sealer
                .seal_in_place(&mut self.buf[start..at + TAG_LEN])?;
            self.open = Some(at + TAG_LEN);
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FRAME_BYTES_MAX_DEFAULT;
    use crate::seal::SessionKeys;

    const MAX: u32 = FRAME_BYTES_MAX_DEFAULT;

    fn keys() -> SessionKeys {
        SessionKeys::from_raw([3; 32], [4; 32])
    }

    /// Every message of every record in `wire`, opened in order.
    fn open_all(wire: &[u8]) -> Vec<(FrameKind, Vec<u8>, usize)> {
        let mut buf = wire.to_vec();
        let mut opener = keys().mirrored().opener();
        let (mut at, mut out) = (0, Vec::new());
        while at < buf.len() {
            let (plain, used) = opener
                .open(&mut buf[at..], record_bytes_max(MAX))
                .unwrap()
                .expect("whole records");
            let plain = plain.to_vec();
            let mut p = 0;
            while p < plain.len() {
                let (frame, n) = next_message(&plain[p..], MAX).unwrap();
                out.push((frame.kind, frame.body.to_vec(), at));
                p += n;
            }
            at += used;
        }
        out
    }

    #[test]
    fn messages_coalesce_into_one_record_per_write() {
        let mut w = RecordWriter::new(keys().sealer());
        for n in 0..5u8 {
            w.push_raw(FrameKind::Ping, &vec![n; usize::from(n) * 7])
                .unwrap();
        }
        let mut wire = Vec::new();
        w.take_sealed(&mut wire).unwrap();
        let got = open_all(&wire);
        assert_eq!(got.len(), 5);
        for (n, (kind, body, record)) in got.into_iter().enumerate() {
            assert_eq!((kind, record), (FrameKind::Ping, 0), "one record");
            assert_eq!(body, vec![n as u8; n * 7]);
        }
        assert_eq!(w.sealer.next_counter(), 1);
        assert!(w.is_empty());
        // The next write is the next record.
        w.push_raw(FrameKind::Pong, b"x").unwrap();
        w.take_sealed(&mut wire).unwrap();
        assert_eq!(u64::from_le_bytes(wire[8..16].try_into().unwrap()), 1);
    }

    #[test]
    fn records_stay_under_the_coalescing_cap_and_bodies_aligned() {
        let mut w = RecordWriter::new(keys().sealer());
        let sizes = [9000, 1, 20_000, 5000, 31_000, 3, 100_000, 7];
        for (n, &size) in sizes.iter().enumerate() {
            w.push_raw(FrameKind::DeltaBatch, &vec![n as u8; size])
                .unwrap();
        }
        let mut wire = Vec::new();
        w.take_sealed(&mut wire).unwrap();
        let got = open_all(&wire);
        assert_eq!(got.len(), sizes.len());
        let mut at = 0;
        let mut records = 0;
        while at < wire.len() {
            let len =
                HEADER_LEN + u32::from_le_bytes(wire[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(len % BLOCK_LEN, 0);
            let alone = got.iter().filter(|m| m.2 == at).count() == 1;
            assert!(
                alone || len <= COALESCE_BYTES_MAX as usize,
                "record of {len}"
            );
            at += len;
            records += 1;
        }
        assert!(records < sizes.len(), "some messages shared a record");
        for (n, (_, body, _)) in got.into_iter().enumerate() {
            assert_eq!(body, vec![n as u8; sizes[n]]);
        }
    }

    #[test]
    fn a_failed_message_leaves_the_buffer_as_it_was() {
        let mut w = RecordWriter::new(keys().sealer());
        w.push_raw(FrameKind::Ping, b"kept").unwrap();
        let before = w.buf.clone();
        let err: Result<usize, SealError> = w.append(|out| {
            out.extend_from_slice(&[1; 40]);
            Err(SealError::Malformed { what: "test" })
        });
        assert!(err.is_err());
        assert_eq!(w.buf, before);
        let mut empty = RecordWriter::new(keys().sealer());
        let _ = empty.append(|out| {
            out.push(1);
            Err::<(), SealError>(SealError::Exhausted)
        });
        assert!(empty.is_empty());
        empty.seal().unwrap();
        assert!(empty.is_empty(), "no empty record is sealed");
    }

    #[test]
    fn malformed_plaintext_is_refused() {
        let mut good = Vec::new();
        push_message(FrameKind::Ping, b"abc", &mut good);
        assert!(next_message(&good, MAX).is_ok());
        assert!(matches!(
            next_message(&good[..15], MAX),
            Err(SealError::Malformed { .. })
        ));
        let mut bad = good.clone();
        bad[0] = 0xEE;
        assert_eq!(
            next_message(&bad, MAX),
            Err(SealError::Frame(FrameError::UnknownKind { found: 0xEE }))
        );
        for at in [1, 2, 3, 8, 15, MESSAGE_HEADER_LEN + 3, 31] {
            let mut bad = good.clone();
            bad[at] = 1;
            assert!(
                matches!(next_message(&bad, MAX), Err(SealError::Malformed { .. })),
                "byte {at}"
            );
        }
        let mut long = good.clone();
        long[4..8].copy_from_slice(&17u32.to_le_bytes());
        assert!(matches!(
            next_message(&long, MAX),
            Err(SealError::Malformed { .. })
        ));
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            next_message(&long, MAX),
            Err(SealError::Frame(FrameError::TooLarge { .. }))
        ));
        // Each message is held to the frame limit, whatever the record's.
        let mut big = Vec::new();
        push_message(FrameKind::Ping, &[0; 200], &mut big);
        assert!(matches!(
            next_message(&big, 128),
            Err(SealError::Frame(FrameError::TooLarge { .. }))
        ));
    }
}
