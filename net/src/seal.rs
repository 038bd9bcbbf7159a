//! Protection of everything after the handshake: AEGIS-256X4 (the `aegis`
//! crate), one key per direction, a 64-bit counter per direction as the
//! nonce.
//!
//! The handshake ends with both peers holding the same two keys
//! ([`SessionKeys`]), derived from the shared secret and the whole
//! transcript (both ids, incarnations and fresh nonces), so every
//! connection has keys of its own. Each side seals what it sends with its
//! [`Sealer`] and opens what it receives with its [`Opener`].
//!
//! The unit sealed is a **record**: one or more messages laid out as
//! [`crate::record`] describes, under one counter and one tag. A writer
//! seals what it has queued for one socket write as one record (up to
//! [`crate::record::COALESCE_BYTES_MAX`]), so the fixed cost of a seal and
//! an open is paid per write, not per message. Layout (see
//! `docs/PROTOCOL.md`):
//!
//! ```text
//! | magic u16 | version u8 | kind u8 = 0x20 | body_len u32 | counter u64 | ciphertext ... | tag [16] |
//! | 0     1   |     2      |       3        | 4          7 | 8        15 | 16 ...         |          |
//! ```
//!
//! `body_len` counts the ciphertext and the tag; the ciphertext is a
//! whole, non-empty number of 16-byte blocks. The 16 header bytes are the
//! associated data; the nonce is `counter as u64 LE | [0; 24]`. The counter
//! starts at 0 and goes up by one per record in each direction; the opener
//! accepts only the counter it expects next, so a replayed, reordered,
//! dropped or reflected (other direction) record fails to open. Sealing
//! and opening work in place in the connection's buffers: no copy and no
//! allocation per record.

use std::fmt;

use aegis::aegis256x4::Aegis256X4;

use crate::frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAGIC, PROTOCOL_VERSION};

/// Bytes of the authentication tag at the end of each record.
pub const TAG_LEN: usize = 16;
/// Bytes in one direction's key.
pub const KEY_LEN: usize = 32;
/// A record's plaintext is a whole number of blocks of this many bytes.
pub const BLOCK_LEN: usize = 16;
/// Bytes a record adds around its plaintext: the header and the tag.
pub const RECORD_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// KDF context of the initiator → responder key (BLAKE3 `derive_key`).
const CONTEXT_I2R: &str = "sessio v5 record key, initiator to responder";
/// KDF context of the responder → initiator key.
const CONTEXT_R2I: &str = "sessio v5 record key, responder to initiator";

/// Why a record cannot be opened, or cannot be sealed. The connection
/// must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The bytes are not a frame at all (magic, version, kind, length), or
    /// a message inside a record names a kind this build does not know or
    /// is over the receiver's frame limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// After the handshake every frame is a sealed record; this one is not.
    #[error("a {kind:?} frame after the handshake: only sealed records may follow it")]
    NotSealed {
        /// The frame kind in the header.
        kind: FrameKind,
    },
    /// The body is not a tag after a whole, non-empty number of 16-byte
    /// blocks: no record is.
    #[error(
        "a sealed body of {body_len} bytes: a record is a whole, non-empty number of 16-byte blocks and a 16-byte tag"
    )]
    BadLength {
        /// Declared body length.
        body_len: u32,
    },
    /// The record's counter is not the next one: a replayed, reordered or
    /// dropped record.
    #[error("record counter {found}, expected {expected}: a replayed, reordered or dropped record")]
    OutOfSequence {
        /// The counter this side expects next.
        expected: u64,
        /// The counter in the record.
        found: u64,
    },
    /// The tag does not verify: the record was tampered with or
    /// corrupted, or sealed with another key (another connection, the
    /// other direction).
    #[error(
        "record {counter} fails authentication: tampered with, corrupted, or sealed with another key"
    )]
    BadTag {
        /// The record's counter.
        counter: u64,
    },
    /// The record opened, but its plaintext is not a sequence of messages
    /// laid out as [`crate::record`] says (only an authenticated peer can
    /// send one: a bug on its side).
    #[error("an opened record is malformed: {what}")]
    Malformed {
        /// What is wrong.
        what: &'static str,
    },
    /// Every counter of this direction is used: reconnect for new keys.
    #[error("this connection sealed 2^64 - 1 records: reconnect for fresh keys")]
    Exhausted,
}

/// The two keys of one connection, as this side uses them. Its `Debug`
/// output never shows the keys.
#[derive(Clone, Copy)]
pub struct SessionKeys {
    pub(crate) send: [u8; KEY_LEN],
    pub(crate) recv: [u8; KEY_LEN],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Derives both directions' keys from the secret and the handshake
    /// transcript: `BLAKE3-derive_key(context, secret | transcript)` with
    /// one context string per direction.
    pub(crate) fn derive(
        secret: &[u8; KEY_LEN],
        transcript: &[u8],
        initiator: bool,
    ) -> SessionKeys {
        let material = |context: &str| {
            let mut h = blake3::Hasher::new_derive_key(context);
            h.update(secret);
            h.update(transcript);
            *h.finalize().as_bytes()
        };
        let (i2r, r2i) = (material(CONTEXT_I2R), material(CONTEXT_R2I));
        if initiator {
            SessionKeys {
                send: i2r,
                recv: r2i,
            }
        } else {
            SessionKeys {
                send: r2i,
                recv: i2r,
            }
        }
    }

    /// Keys given directly. For tests and fuzzing only: real keys come
    /// from the handshake.
    #[doc(hidden)]
    #[must_use]
    pub fn from_raw(send: [u8; KEY_LEN], recv: [u8; KEY_LEN]) -> SessionKeys {
        SessionKeys { send, recv }
    }

    /// The keys as the peer holds them (send and receive swapped). For
    /// tests.
    #[doc(hidden)]
    #[must_use]
    pub fn mirrored(&self) -> SessionKeys {
        SessionKeys {
            send: self.recv,
            recv: self.send,
        }
    }

    /// The sealing state for what this side sends, at counter 0.
    #[must_use]
    pub fn sealer(&self) -> Sealer {
        Sealer {
            cipher: Cipher::Aead(aead_key(&self.send)),
            next: 0,
        }
    }

    /// The opening state for what this side receives, at counter 0.
    #[must_use]
    pub fn opener(&self) -> Opener {
        Opener {
            cipher: Cipher::Aead(aead_key(&self.recv)),
            next: 0,
        }
    }
}

/// How a connection protects what follows the handshake: sealed, always.
/// The second variant exists only in builds with the `unsealed-bench`
/// feature, which only the benchmarks enable, to measure what sealing
/// costs in the same run; no configuration reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Protection {
    #[default]
    Sealed,
    /// Records laid out, counted and checked as usual, but neither
    /// encrypted nor authenticated (a zero tag).
    #[cfg(feature = "unsealed-bench")]
    Unsealed,
}

impl Protection {
    pub(crate) fn sealer(self, keys: &SessionKeys) -> Sealer {
        match self {
            Protection::Sealed => keys.sealer(),
            #[cfg(feature = "unsealed-bench")]
            Protection::Unsealed => Sealer {
                cipher: Cipher::Unsealed,
                next: 0,
            },
        }
    }

    pub(crate) fn opener(self, keys: &SessionKeys) -> Opener {
        match self {
            Protection::Sealed => keys.opener(),
            #[cfg(feature = "unsealed-bench")]
            Protection::Unsealed => Opener {
                cipher: Cipher::Unsealed,
                next: 0,
            },
        }
    }
}

/// A direction's cipher: AEGIS-256X4 under the direction's key. AEGIS has
/// no key schedule to expand, so the key is all it keeps; its `Debug`
/// never shows the key.
enum Cipher {
    Aead(AeadKey),
    #[cfg(feature = "unsealed-bench")]
    Unsealed,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cipher::Aead(_) => f.write_str("Cipher(AEGIS-256X4)"),
            #[cfg(feature = "unsealed-bench")]
            Cipher::Unsealed => f.write_str("Cipher(unsealed, bench only)"),
        }
    }
}

/// One direction's 32-byte key, wiped when the connection ends.
struct AeadKey([u8; KEY_LEN]);

impl Drop for AeadKey {
    fn drop(&mut self) {
        for b in &mut self.0 {
            // SAFETY: a valid, aligned `u8` of this key; volatile so the
            // wipe is not optimized away as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> AeadKey {
    AeadKey(*bytes)
}

/// Bytes of an AEGIS-256 nonce.
const NONCE_LEN: usize = 32;

/// The nonce of record `counter`: the counter, little-endian, then zeros.
/// Unique per key, since each connection and direction has a key of its
/// own and the counter never repeats.
fn nonce(counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Whether a sealed body of `body_len` bytes (ciphertext and tag) has a
/// record's shape.
fn record_shape_ok(body_len: usize) -> bool {
    body_len >= BLOCK_LEN + TAG_LEN && (body_len - TAG_LEN).is_multiple_of(BLOCK_LEN)
}

/// The 16 header bytes of a record of `body_len` bytes (ciphertext and
/// tag) under `counter`.
fn record_header(body_len: u32, counter: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    header[2] = PROTOCOL_VERSION;
    header[3] = FrameKind::Sealed as u8;
    header[4..8].copy_from_slice(&body_len.to_le_bytes());
    header[8..16].copy_from_slice(&counter.to_le_bytes());
    header
}

/// Seals the records one direction sends, counting them. (`Debug` shows
/// the key's algorithm only, never the key: ring's `LessSafeKey` prints no
/// more.)
#[derive(Debug)]
pub struct Sealer {
    cipher: Cipher,
    next: u64,
}

impl Sealer {
    /// The counter the next record gets.
    #[must_use]
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// Sets the next counter. For tests only: a reused counter reuses a
    /// nonce.
    #[doc(hidden)]
    pub fn set_next_counter(&mut self, next: u64) {
        self.next = next;
    }

    /// Seals one record in place. `record` is the whole record as it will
    /// be sent: 16 bytes for its header, its plaintext (a whole, non-empty
    /// number of 16-byte blocks), 16 bytes for its tag. Writes the header
    /// and the tag and encrypts the plaintext where it lies. On error
    /// `record` is left as it was and the counter does not move.
    pub fn seal_in_place(&mut self, record: &mut [u8]) -> Result<(), SealError> {
        let total = record.len() as u64;
        let body = record.len().saturating_sub(HEADER_LEN);
        let body_len = u32::try_from(body).map_err(|_| FrameError::TooLarge {
            frame_bytes: total,
            frame_bytes_max: u32::MAX,
        })?;
        if !record_shape_ok(body) {
            return Err(SealError::BadLength { body_len });
        }
        if self.next == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let counter = self.next;
        let header = record_header(body_len, counter);
        let (head, rest) = record.split_at_mut(HEADER_LEN);
        let (plain, tag_out) = rest.split_at_mut(body - TAG_LEN);
        match &self.cipher {
            Cipher::Aead(key) => {
                let tag = Aegis256X4::<TAG_LEN>::new(&key.0, &nonce(counter))
                    .encrypt_in_place(plain, &header);
                tag_out.copy_from_slice(&tag);
            }
            #[cfg(feature = "unsealed-bench")]
            Cipher::Unsealed => tag_out.fill(0),
        }
        head.copy_from_slice(&header);
        self.next += 1;
        Ok(())
    }

    /// Appends to `out` one record sealing `plaintext` (a whole, non-empty
    /// number of 16-byte blocks, such as [`crate::record::push_message`]
    /// lays out). On error `out` is left as it was.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let start = out.len();
        out.reserve(RECORD_OVERHEAD + plaintext.len());
        out.resize(start + HEADER_LEN, 0);
        out.extend_from_slice(plaintext);
        out.resize(out.len() + TAG_LEN, 0);
        let sealed = self.seal_in_place(&mut out[start..]);
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }
}

/// Opens the records one direction receives, in order (`Debug` as for
/// [`Sealer`]).
#[derive(Debug)]
pub struct Opener {
    cipher: Cipher,
    next: u64,
}

impl Opener {
    /// The counter the next record must carry.
    #[must_use]
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// What can be told from a header alone: a frame that is not a sealed
    /// record, a body that is not a whole number of blocks and a tag, or a
    /// counter out of sequence, is refused before the body is read.
    pub fn check_header(&self, header: &FrameHeader) -> Result<(), SealError> {
        if header.kind != FrameKind::Sealed {
            return Err(SealError::NotSealed { kind: header.kind });
        }
        if !record_shape_ok(header.body_len as usize) {
            return Err(SealError::BadLength {
                body_len: header.body_len,
            });
        }
        if header.check != self.next {
            return Err(SealError::OutOfSequence {
                expected: self.next,
                found: header.check,
            });
        }
        Ok(())
    }

    /// Opens one record from the start of `buf`, decrypting it in place.
    ///
    /// - `Ok(None)`: `buf` is a valid prefix of a record; read more bytes.
    /// - `Ok(Some((plaintext, consumed)))`: the record's plaintext (the
    ///   bytes after its header, the tag excluded: walk it with
    ///   [`crate::record::next_message`]); it took `consumed` bytes of
    ///   `buf`.
    /// - `Err(_)`: the bytes never open; drop the peer (`buf` may be left
    ///   partly decrypted).
    ///
    /// `record_bytes_max` bounds the whole record (header and tag
    /// included), checked from the header. Never allocates and never
    /// panics, whatever `buf` holds.
    pub fn open<'a>(
        &mut self,
        buf: &'a mut [u8],
        record_bytes_max: u32,
    ) -> Result<Option<(&'a [u8], usize)>, SealError> {
        let Some(header) = FrameHeader::parse(buf, record_bytes_max)? else {
            return Ok(None);
        };
        self.check_header(&header)?;
        let record_len = header.frame_len();
        let Some(record) = buf.get_mut(..record_len) else {
            return Ok(None);
        };
        let (head, sealed) = record.split_at_mut(HEADER_LEN);
        let plain: &'a [u8] = match &self.cipher {
            Cipher::Aead(key) => {
                let (body, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
                let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("a 16-byte tag");
                Aegis256X4::<TAG_LEN>::new(&key.0, &nonce(self.next))
                    .decrypt_in_place(body, tag, head)
                    .map_err(|_| SealError::BadTag { counter: self.next })?;
                body
            }
            #[cfg(feature = "unsealed-bench")]
            Cipher::Unsealed => &sealed[..sealed.len() - TAG_LEN],
        };
        // The sealer never uses u64::MAX, so nothing opens under it and
        // saturating is never reached by a real peer.
        self.next = self.next.saturating_add(1);
        Ok(Some((plain, record_len)))
    }
}

#[cfg(test)]
mod tests;
