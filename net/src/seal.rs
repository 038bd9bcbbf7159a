//! Protection of every frame after the handshake: AES-256-GCM (`ring`),
//! one key per direction, a 64-bit counter per direction as the nonce.
//!
//! The handshake ends with both peers holding the same two keys
//! ([`SessionKeys`]), derived from the shared secret and the whole
//! transcript (both ids, incarnations and fresh nonces), so every
//! connection has keys of its own. Each side seals what it sends with its
//! [`Sealer`] and opens what it receives with its [`Opener`].
//!
//! Layout of a sealed frame (see `docs/PROTOCOL.md`):
//!
//! ```text
//! | magic u16 | version u8 | kind u8 | body_len u32 | counter u64 | ciphertext ... | tag [16] |
//! | 0     1   |     2      |    3    | 4          7 | 8        15 | 16 ...         |          |
//! ```
//!
//! `body_len` counts the ciphertext and the tag. The 16 header bytes are
//! the associated data; the nonce is `[0; 4] | counter as u64 LE`. The
//! counter starts at 0 and goes up by one per frame in each direction; the
//! opener accepts only the counter it expects next, so a replayed,
//! reordered, dropped or reflected (other direction) frame fails to open.
//! Sealing and opening work in place: no allocation per frame.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::frame::{
    Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};

/// Bytes of the authentication tag after each sealed body.
pub const TAG_LEN: usize = 16;
/// Bytes in one direction's key.
pub const KEY_LEN: usize = 32;

/// KDF context of the initiator → responder key (BLAKE3 `derive_key`).
const CONTEXT_I2R: &str = "sessio v2 frame key, initiator to responder";
/// KDF context of the responder → initiator key.
const CONTEXT_R2I: &str = "sessio v2 frame key, responder to initiator";

/// Why a sealed frame cannot be opened, or a frame cannot be sealed. The
/// connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The bytes are not a frame at all (magic, version, kind, length).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The body is shorter than a tag: no sealed frame is.
    #[error("{kind:?} frame with a {body_len}-byte body, shorter than its {TAG_LEN}-byte tag")]
    TooShort {
        /// The frame kind.
        kind: FrameKind,
        /// Declared body length.
        body_len: u32,
    },
    /// The frame's counter is not the next one: a replayed, reordered or
    /// dropped frame.
    #[error("frame counter {found}, expected {expected}: a replayed, reordered or dropped frame")]
    OutOfSequence {
        /// The counter this side expects next.
        expected: u64,
        /// The counter in the frame.
        found: u64,
    },
    /// The tag does not verify: the frame was tampered with or corrupted,
    /// or sealed with another key (another connection, the other
    /// direction).
    #[error(
        "{kind:?} frame {counter} fails authentication: tampered with, corrupted, or sealed with another key"
    )]
    BadTag {
        /// The frame kind (as the unauthenticated header says).
        kind: FrameKind,
        /// The frame's counter.
        counter: u64,
    },
    /// Every counter of this direction is used: reconnect for new keys.
    #[error("this connection sealed 2^64 - 1 frames: reconnect for fresh keys")]
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
            key: aead_key(&self.send),
            next: 0,
        }
    }

    /// The opening state for what this side receives, at counter 0.
    #[must_use]
    pub fn opener(&self) -> Opener {
        Opener {
            key: aead_key(&self.recv),
            next: 0,
        }
    }
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key is always a valid AES-256 key.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals the frames one direction sends, counting them. (`Debug` shows
/// the key's algorithm only, never the key: ring's `LessSafeKey` prints no
/// more.)
#[derive(Debug)]
pub struct Sealer {
    key: LessSafeKey,
    next: u64,
}

impl Sealer {
    /// The counter the next frame gets.
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

    /// Seals, in place, the frame that starts at `out[start]`: 16 bytes
    /// reserved for its header, then its plaintext body up to the end of
    /// `out`. Writes the header (magic, version, `kind`, the body length
    /// with the tag, the counter), encrypts the body and appends the tag
    /// (reserve [`TAG_LEN`] bytes beforehand to avoid a reallocation).
    /// On error `out` is left as it was.
    ///
    /// # Panics
    /// If `out` holds fewer than 16 bytes from `start`.
    pub fn seal_frame(
        &mut self,
        kind: FrameKind,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), SealError> {
        if self.next == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let counter = self.next;
        let (head, body) = out[start..].split_at_mut(HEADER_LEN);
        let body_len = u32::try_from(body.len() + TAG_LEN).map_err(|_| FrameError::TooLarge {
            frame_bytes: (HEADER_LEN + body.len() + TAG_LEN) as u64,
            frame_bytes_max: u32::MAX,
        })?;
        let mut header = [0u8; HEADER_LEN];
        header[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        header[2] = PROTOCOL_VERSION;
        header[3] = kind as u8;
        header[4..8].copy_from_slice(&body_len.to_le_bytes());
        header[8..16].copy_from_slice(&counter.to_le_bytes());
        head.copy_from_slice(&header);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), body)
            // ring fails only for inputs over ~64 GiB, which no frame is.
            .map_err(|_| FrameError::TooLarge {
                frame_bytes: u64::from(body_len) + HEADER_LEN as u64,
                frame_bytes_max: u32::MAX,
            })?;
        out.extend_from_slice(tag.as_ref());
        self.next += 1;
        Ok(())
    }

    /// Appends a sealed frame of `kind` carrying `body` to `out`.
    pub fn seal(
        &mut self,
        kind: FrameKind,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let start = out.len();
        out.reserve(HEADER_LEN + body.len() + TAG_LEN);
        out.resize(start + HEADER_LEN, 0);
        out.extend_from_slice(body);
        let sealed = self.seal_frame(kind, out, start);
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }
}

/// Opens the frames one direction receives, in order (`Debug` as for
/// [`Sealer`]).
#[derive(Debug)]
pub struct Opener {
    key: LessSafeKey,
    next: u64,
}

impl Opener {
    /// The counter the next frame must carry.
    #[must_use]
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// What can be told from a header alone: a body too short for a tag,
    /// or a counter out of sequence, is refused before the body is read.
    pub fn check_header(&self, header: &FrameHeader) -> Result<(), SealError> {
        if (header.body_len as usize) < TAG_LEN {
            return Err(SealError::TooShort {
                kind: header.kind,
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

    /// Opens one sealed frame from the start of `buf`, decrypting its body
    /// in place.
    ///
    /// - `Ok(None)`: `buf` is a valid prefix of a frame; read more bytes.
    /// - `Ok(Some((frame, consumed)))`: the frame, its body the plaintext
    ///   (the tag excluded); it took `consumed` bytes of `buf`.
    /// - `Err(_)`: the bytes never open; drop the peer (`buf` may be left
    ///   partly decrypted).
    ///
    /// Never allocates and never panics, whatever `buf` holds.
    pub fn open<'a>(
        &mut self,
        buf: &'a mut [u8],
        frame_bytes_max: u32,
    ) -> Result<Option<(Frame<'a>, usize)>, SealError> {
        let Some(header) = FrameHeader::parse(buf, frame_bytes_max)? else {
            return Ok(None);
        };
        self.check_header(&header)?;
        let frame_len = header.frame_len();
        let Some(frame) = buf.get_mut(..frame_len) else {
            return Ok(None);
        };
        let (head, sealed) = frame.split_at_mut(HEADER_LEN);
        let mut aad = [0u8; HEADER_LEN];
        aad.copy_from_slice(head);
        let plain = self
            .key
            .open_in_place(nonce(self.next), Aad::from(aad), sealed)
            .map_err(|_| SealError::BadTag {
                kind: header.kind,
                counter: self.next,
            })?;
        // The sealer never uses u64::MAX, so nothing opens under it and
        // saturating is never reached by a real peer.
        self.next = self.next.saturating_add(1);
        Ok(Some((
            Frame {
                kind: header.kind,
                body: plain,
            },
            frame_len,
        )))
    }
}

#[cfg(test)]
mod tests;
