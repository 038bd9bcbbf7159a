//! Length-prefixed frames: the unit every byte on the wire travels in,
//! handshake included.
//!
//! Layout (all integers little-endian; see `docs/PROTOCOL.md`):
//!
//! ```text
//! | magic u16 | version u8 | kind u8 | body_len u32 | check u64 | body ... |
//! | 0     1   |     2      |    3    | 4          7 | 8      15 | 16 ...   |
//! ```
//!
//! The `check` word depends on the frame. A handshake frame (this module)
//! carries `xxh3_64_with_seed(body, seed = u64 of header bytes 0..8)`: the
//! seed folds magic, version, kind and length into the checksum, so a flipped
//! header bit is caught just like a flipped body bit. It only catches
//! accidents; the handshake's MACs are what authenticate. Every frame after
//! the handshake is a sealed record ([`crate::seal`]) of kind `Sealed`:
//! `check` is its counter, the body is the ciphertext of one or more
//! messages ([`crate::record`]) and ends with an AEGIS-256X4 tag.
//!
//! The decoder never allocates: it returns a [`Frame`] that borrows the body
//! from the caller's buffer, after checking the declared length against
//! `frame_bytes_max`. The transport grows its read buffer only to the length
//! of a frame whose header already passed that check.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// First two bytes of every frame (`0x5E55`, sent as `55 5E`).
pub const MAGIC: u16 = 0x5E55;
/// Wire protocol version spoken by this crate.
/// Version 2 sealed every frame after the handshake; version 3 seals
/// records of many messages instead (one per write); version 4 ships
/// session records without their op log (the host keeps recent batches in
/// its arena's delta log instead); version 5 seals records with
/// AEGIS-256X4 instead of AES-256-GCM. Peers of other versions are refused
/// with a version `Reject`.
pub const PROTOCOL_VERSION: u8 = 6;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Smallest `frame_bytes_max` a peer may configure: room for the largest
/// handshake frame.
pub const FRAME_BYTES_MIN: u32 = 128;
/// Default limit on one frame, header included.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 8 * 1024 * 1024;

/// What a frame carries. The discriminant is the `kind` byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameKind {
    /// Handshake: initiator's hello (id, incarnation, nonce).
    Hello = 0x01,
    /// Handshake: responder's hello plus its MAC over the transcript.
    HelloReply = 0x02,
    /// Handshake: initiator's MAC over the transcript.
    Auth = 0x03,
    /// Handshake: responder accepted the initiator; carries its limits.
    Accept = 0x04,
    /// Handshake: responder refuses the connection (reason code), then closes.
    Reject = 0x05,
    /// [`crate::message::DeltaBatch`].
    DeltaBatch = 0x10,
    /// [`crate::message::Ack`].
    Ack = 0x11,
    /// [`crate::message::Fetch`].
    Fetch = 0x12,
    /// [`crate::message::FetchReply`].
    FetchReply = 0x13,
    /// [`crate::message::Invalidate`].
    Invalidate = 0x14,
    /// [`crate::message::Ping`].
    Ping = 0x15,
    /// [`crate::message::Pong`].
    Pong = 0x16,
    /// [`crate::message::StatsRequest`].
    StatsRequest = 0x17,
    /// [`crate::message::Stats`].
    Stats = 0x18,
    /// [`crate::message::AllApplied`].
    AllApplied = 0x19,
    /// A sealed record ([`crate::seal`]): the only frame after the
    /// handshake; the messages (kinds above) travel inside records.
    Sealed = 0x20,
}

impl FrameKind {
    /// Every kind, in wire-code order.
    pub const ALL: [FrameKind; 16] = [
        FrameKind::Hello,
        FrameKind::HelloReply,
        FrameKind::Auth,
        FrameKind::Accept,
        FrameKind::Reject,
        FrameKind::DeltaBatch,
        FrameKind::Ack,
        FrameKind::Fetch,
        FrameKind::FetchReply,
        FrameKind::Invalidate,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::StatsRequest,
        FrameKind::Stats,
        FrameKind::AllApplied,
        FrameKind::Sealed,
    ];

    /// The kind for a wire code, if it is one.
    #[must_use]
    pub fn from_u8(code: u8) -> Option<FrameKind> {
        FrameKind::ALL.iter().copied().find(|k| *k as u8 == code)
    }

    /// True for the frames exchanged before authentication completes.
    #[must_use]
    pub fn is_handshake(self) -> bool {
        (self as u8) < 0x10
    }
}

/// Why bytes are not a valid frame. "Not enough bytes yet" is not an error:
/// [`Frame::decode`] returns `Ok(None)` for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first two bytes are not [`MAGIC`]: not a sessio peer.
    #[error("bad frame magic {found:#06x} (expected {MAGIC:#06x}): not a sessio peer")]
    BadMagic {
        /// The magic read.
        found: u16,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {found}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The version read.
        found: u8,
    },
    /// The kind byte names no frame kind.
    #[error("unknown frame kind {found:#04x}")]
    UnknownKind {
        /// The kind byte read.
        found: u8,
    },
    /// The declared frame length exceeds the receiver's `frame_bytes_max`.
    #[error("frame of {frame_bytes} bytes exceeds frame_bytes_max = {frame_bytes_max}")]
    TooLarge {
        /// Declared frame length, header included.
        frame_bytes: u64,
        /// The receiver's limit.
        frame_bytes_max: u32,
    },
    /// The body (or header) does not match the checksum: corruption.
    #[error("frame checksum mismatch: header says {expected:#018x}, body hashes to {actual:#018x}")]
    Checksum {
        /// Checksum in the header.
        expected: u64,
        /// Checksum computed over the received bytes.
        actual: u64,
    },
}

/// The fixed-size header of a frame, parsed but not yet checked against a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: FrameKind,
    /// Body length in bytes (header excluded).
    pub body_len: u32,
    /// Header bytes 8..16: in a handshake frame, the xxh3 checksum of
    /// header bytes 0..8 (as seed) and the body; in a sealed record, its
    /// counter.
    pub check: u64,
}

impl FrameHeader {
    /// Total frame length, header included.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// Parses a header from the start of `buf`, checking each field as soon
    /// as its bytes are present, so garbage is refused at its first byte.
    ///
    /// Returns `Ok(None)` while `buf` is a valid prefix shorter than a header.
    pub fn parse(buf: &[u8], frame_bytes_max: u32) -> Result<Option<FrameHeader>, FrameError> {
        if let Some(magic) = buf.get(0..2) {
            let found = u16::from_le_bytes([magic[0], magic[1]]);
            if found != MAGIC {
                return Err(FrameError::BadMagic { found });
            }
        }
        if let Some(&found) = buf.get(2)
            && found != PROTOCOL_VERSION
        {
            return Err(FrameError::UnsupportedVersion { found });
        }
        let kind = match buf.get(3) {
            Some(&code) => {
                Some(FrameKind::from_u8(code).ok_or(FrameError::UnknownKind { found: code })?)
            }
            None => None,
        };
        let body_len = match buf.get(4..8) {
            Some(len) => {
                let body_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
                let frame_bytes = HEADER_LEN as u64 + u64::from(body_len);
                if frame_bytes > u64::from(frame_bytes_max) {
                    return Err(FrameError::TooLarge {
                        frame_bytes,
                        frame_bytes_max,
                    });
                }
                Some(body_len)
            }
            None => None,
        };
        let (Some(kind), Some(body_len), Some(sum)) = (kind, body_len, buf.get(8..16)) else {
            return Ok(None);
        };
        let mut check = [0u8; 8];
        check.copy_from_slice(sum);
        Ok(Some(FrameHeader {
            kind,
            body_len,
            check: u64::from_le_bytes(check),
        }))
    }
}

/// A decoded frame whose body borrows the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What the body holds.
    pub kind: FrameKind,
    /// The body bytes, checksum verified (handshake frames) or opened
    /// (a message of a sealed record: the plaintext, padding excluded).
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Decodes one checksummed (handshake) frame from the start of `buf`.
    /// Frames after the handshake are sealed records: see
    /// [`crate::seal::Opener`] and [`crate::record::next_message`].
    ///
    /// - `Ok(None)`: `buf` is a valid prefix of a frame; read more bytes.
    /// - `Ok(Some((frame, consumed)))`: one frame, `consumed` bytes long.
    /// - `Err(_)`: the bytes can never become a valid frame; drop the peer.
    ///
    /// Never allocates and never panics, whatever `buf` holds.
    pub fn decode(
        buf: &'a [u8],
        frame_bytes_max: u32,
    ) -> Result<Option<(Frame<'a>, usize)>, FrameError> {
        let Some(header) = FrameHeader::parse(buf, frame_bytes_max)? else {
            return Ok(None);
        };
        let frame_len = header.frame_len();
        let Some(body) = buf.get(HEADER_LEN..frame_len) else {
            return Ok(None);
        };
        let actual = checksum(&buf[..8], body);
        if actual != header.check {
            return Err(FrameError::Checksum {
                expected: header.check,
                actual,
            });
        }
        Ok(Some((
            Frame {
                kind: header.kind,
                body,
            },
            frame_len,
        )))
    }

    /// Appends this frame's encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_into(self.kind, self.body, out);
    }

    /// Bytes this frame takes on the wire.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Appends a checksummed (handshake) frame of `kind` carrying `body` to `out`.
///
/// # Panics
/// If `body` is 4 GiB or longer, which no limit of this crate allows.
pub fn encode_into(kind: FrameKind, body: &[u8], out: &mut Vec<u8>) {
    let header = header_bytes(kind, body);
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
}

/// The 16 header bytes for a frame of `kind` carrying `body`.
///
/// # Panics
/// If `body` is 4 GiB or longer.
#[must_use]
pub fn header_bytes(kind: FrameKind, body: &[u8]) -> [u8; HEADER_LEN] {
    let body_len = u32::try_from(body.len()).expect("frame body under 4 GiB");
    let mut header = [0u8; HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    header[2] = PROTOCOL_VERSION;
    header[3] = kind as u8;
    header[4..8].copy_from_slice(&body_len.to_le_bytes());
    let sum = checksum(&header[..8], body);
    header[8..16].copy_from_slice(&sum.to_le_bytes());
    header
}

fn checksum(header_prefix: &[u8], body: &[u8]) -> u64 {
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&header_prefix[..8]);
    xxh3_64_with_seed(body, u64::from_le_bytes(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(FrameKind::Ping, b"hello, frames", &mut out);
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let (frame, used) = Frame::decode(&bytes, FRAME_BYTES_MAX_DEFAULT)
            .unwrap()
            .unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.kind, FrameKind::Ping);
        assert_eq!(frame.body, b"hello, frames");
        let mut again = Vec::new();
        frame.encode_into(&mut again);
        assert_eq!(again, bytes);
    }

    #[test]
    fn every_prefix_needs_more() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert_eq!(
                Frame::decode(&bytes[..n], FRAME_BYTES_MAX_DEFAULT),
                Ok(None),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_left_alone() {
        let mut bytes = sample();
        let len = bytes.len();
        bytes.extend_from_slice(&sample()[..5]);
        let (_, used) = Frame::decode(&bytes, FRAME_BYTES_MAX_DEFAULT)
            .unwrap()
            .unwrap();
        assert_eq!(used, len);
        assert_eq!(
            Frame::decode(&bytes[used..], FRAME_BYTES_MAX_DEFAULT),
            Ok(None)
        );
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                match Frame::decode(&bad, FRAME_BYTES_MAX_DEFAULT) {
                    // A flipped length bit can make the frame longer than
                    // the buffer: that is a valid prefix, not an error yet.
                    Ok(None) => assert!((4..8).contains(&i), "byte {i} bit {bit}"),
                    Ok(Some(_)) => panic!("flip at byte {i} bit {bit} went unnoticed"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn oversized_length_refused_from_header_alone() {
        let mut bytes = sample();
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::decode(&bytes[..8], FRAME_BYTES_MAX_DEFAULT),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            Frame::decode(&sample(), 20),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_refused_at_first_bytes() {
        assert!(matches!(
            Frame::decode(b"GE", 1024),
            Err(FrameError::BadMagic { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0x55, 0x5E, 9], 1024),
            Err(FrameError::UnsupportedVersion { found: 9 })
        ));
        assert!(matches!(
            Frame::decode(&[0x55, 0x5E, PROTOCOL_VERSION, 0xEE], 1024),
            Err(FrameError::UnknownKind { found: 0xEE })
        ));
    }

    #[test]
    fn kinds_round_trip() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(FrameKind::from_u8(0), None);
    }
}
