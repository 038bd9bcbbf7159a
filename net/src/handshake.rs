//! Mutual challenge–response authentication, as a pure state machine.
//!
//! Both peers hold the same 32-byte [`Secret`]. Each sends a fresh 32-byte
//! nonce from the OS CSPRNG and proves knowledge of the secret with a BLAKE3
//! keyed MAC over the whole transcript (protocol version, both ids, both
//! incarnations, both nonces), domain-separated by role so one side's MAC is
//! never valid as the other's:
//!
//! ```text
//! initiator                                   responder
//!   Hello      { id, incarnation, nonce_i }  ──▶
//!            ◀──  HelloReply { id, incarnation, nonce_r, mac_r }   (or Reject)
//!   Auth       { mac_i }                     ──▶
//!            ◀──  Accept { frame_bytes_max }                       (or Reject)
//! ```
//!
//! Every handshake frame has a fixed body size, so the machine needs only a
//! fixed [`HANDSHAKE_FRAME_BYTES_MAX`]-byte buffer inside itself and refuses
//! any header announcing another length before reading the body. Nothing is
//! allocated. Feed it bytes with [`Handshake::receive`], send what
//! [`Handshake::take_output`] returns, until [`Handshake::established`].
//!
//! A successful handshake also yields the connection's two record keys
//! ([`SessionKeys`], one per direction), derived from the secret and the
//! transcript; every record after it is sealed with them ([`crate::seal`]).
//! Byte layouts: `docs/PROTOCOL.md`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::frame::{
    self, FRAME_BYTES_MIN, Frame, FrameError, FrameHeader, FrameKind, HEADER_LEN, PROTOCOL_VERSION,
};
use crate::seal::SessionKeys;

/// Bytes in a shared secret.
pub const SECRET_LEN: usize = 32;
/// Bytes in a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a handshake MAC.
pub const MAC_LEN: usize = 32;

const HELLO_BODY: usize = 8 + 8 + NONCE_LEN;
const HELLO_REPLY_BODY: usize = HELLO_BODY + MAC_LEN;
const AUTH_BODY: usize = MAC_LEN;
const ACCEPT_BODY: usize = 8;
const REJECT_BODY: usize = 8;

/// The largest handshake frame (a `HelloReply`), header included.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = HEADER_LEN + HELLO_REPLY_BODY;
const _: () = assert!(HANDSHAKE_FRAME_BYTES_MAX == 96);
const _: () = assert!(HANDSHAKE_FRAME_BYTES_MAX as u32 <= FRAME_BYTES_MIN);

/// Bytes of the transcript the MACs and the frame keys cover: version,
/// then id, incarnation and nonce of the initiator, then of the responder.
const TRANSCRIPT_LEN: usize = 1 + 2 * (8 + 8 + NONCE_LEN);

const LABEL_RESPONDER: &[u8; 16] = b"sessio-hs-resp\0\0";
const LABEL_INITIATOR: &[u8; 16] = b"sessio-hs-init\0\0";

/// The 32-byte key both peers share. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The file does not exist.
    #[error("secret file {path} does not exist (create it with 32 random bytes, or 64 hex digits)")]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Io {
        /// The path tried.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The path is not a regular file (a device, a FIFO, a directory).
    #[error(
        "secret file {path} is not a regular file; it must hold 32 random bytes, or 64 hex digits"
    )]
    NotAFile {
        /// The path tried.
        path: PathBuf,
    },
    /// The file holds neither 32 raw bytes nor 64 hex digits.
    #[error(
        "secret file {path} holds {found} bytes; expected exactly 32 raw bytes, or 64 hex digits (a trailing newline is fine)"
    )]
    WrongLength {
        /// The path tried.
        path: PathBuf,
        /// Bytes found (reading stops a little past the largest valid size).
        found: usize,
    },
}

/// Something about a secret file that works but should be fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretWarning {
    /// Other users can read the file.
    WorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is all zeros (a placeholder, or a file of zeros): anyone can
    /// guess it.
    ZeroKey {
        /// The file.
        path: PathBuf,
    },
}

impl fmt::Display for SecretWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretWarning::WorldReadable { path, mode } => write!(
                f,
                "secret file {} is readable by every user (mode {mode:o}); chmod 600 it",
                path.display()
            ),
            SecretWarning::ZeroKey { path } => write!(
                f,
                "secret file {} holds an all-zero key, which anyone can guess; replace it with 32 random bytes",
                path.display()
            ),
        }
    }
}

impl Secret {
    /// A secret from raw bytes.
    #[must_use]
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Secret {
        Secret(bytes)
    }

    /// Reads a secret from `path`: 32 raw bytes, or 64 hex digits optionally
    /// followed by whitespace. A world-readable file is logged as a warning
    /// (see [`Secret::load`] to get the warning as a value).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, SecretError> {
        let (secret, warnings) = Secret::load(path)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        Ok(secret)
    }

    /// Like [`Secret::from_file`], returning the warnings instead of logging.
    pub fn load(path: impl AsRef<Path>) -> Result<(Secret, Vec<SecretWarning>), SecretError> {
        let path = path.as_ref();
        // Without blocking: a FIFO at the path must not hang the open.
        #[cfg(unix)]
        let opened = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
        };
        #[cfg(not(unix))]
        let opened = std::fs::File::open(path);
        let file = opened.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SecretError::Missing { path: path.into() }
            } else {
                SecretError::Io {
                    path: path.into(),
                    source,
                }
            }
        })?;
        let io = |source| SecretError::Io {
            path: path.into(),
            source,
        };
        if !file.metadata().map_err(io)?.is_file() {
            return Err(SecretError::NotAFile { path: path.into() });
        }
        let mut warnings = Vec::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                warnings.push(SecretWarning::WorldReadable {
                    path: path.into(),
                    mode,
                });
            }
        }
        // Read a bounded amount: a wrong file (a log, a device) must not be
        // slurped whole.
        let mut buf = [0u8; 2 * SECRET_LEN + 64];
        let mut found = 0;
        let mut reader = file.take(buf.len() as u64);
        loop {
            let n = reader.read(&mut buf[found..]).map_err(io)?;
            if n == 0 {
                break;
            }
            found += n;
        }
        let content = &buf[..found];
        let wrong = || SecretError::WrongLength {
            path: path.into(),
            found,
        };
        let zero = |key: &[u8; SECRET_LEN], warnings: &mut Vec<SecretWarning>| {
            if key.iter().all(|&b| b == 0) {
                warnings.push(SecretWarning::ZeroKey { path: path.into() });
            }
        };
        if found == SECRET_LEN {
            let mut key = [0u8; SECRET_LEN];
            key.copy_from_slice(content);
            zero(&key, &mut warnings);
            return Ok((Secret(key), warnings));
        }
        let trimmed = content.trim_ascii_end();
        if trimmed.len() != 2 * SECRET_LEN {
            return Err(wrong());
        }
        let mut key = [0u8; SECRET_LEN];
        for (i, pair) in trimmed.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or_else(wrong)?;
            let lo = hex_digit(pair[1]).ok_or_else(wrong)?;
            key[i] = hi << 4 | lo;
        }
        zero(&key, &mut warnings);
        Ok((Secret(key), warnings))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Who a peer is: its id and the incarnation of its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Host or node id, stable across restarts.
    pub id: u64,
    /// Random per process start: a changed incarnation means the peer
    /// restarted and lost its in-memory state.
    pub incarnation: u64,
}

impl Identity {
    /// An identity with a fresh random incarnation.
    pub fn with_random_incarnation(id: u64) -> Result<Identity, HandshakeError> {
        let mut inc = [0u8; 8];
        getrandom::fill(&mut inc).map_err(HandshakeError::Rng)?;
        Ok(Identity {
            id,
            incarnation: u64::from_le_bytes(inc),
        })
    }
}

/// The outcome of a completed handshake.
#[derive(Debug, Clone, Copy)]
pub struct Established {
    /// The authenticated peer.
    pub peer: Identity,
    /// The responder's `frame_bytes_max` (on the responder: its own).
    pub frame_bytes_max: u32,
    /// This connection's record keys, as this side uses them: seal what it
    /// sends with [`SessionKeys::sealer`], open what it receives with
    /// [`SessionKeys::opener`].
    pub keys: SessionKeys,
}

/// Why a responder refused a handshake, as sent in a `Reject` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peer speaks another protocol version (detail: the responder's).
    Version,
    /// The MAC did not verify: the secrets differ.
    AuthFailed,
    /// The responder is at its connection cap.
    Busy,
    /// A handshake frame was malformed.
    Malformed,
    /// A code this build does not know.
    Unknown(u32),
}

impl RejectReason {
    fn code(self) -> u32 {
        match self {
            RejectReason::Version => 1,
            RejectReason::AuthFailed => 2,
            RejectReason::Busy => 3,
            RejectReason::Malformed => 4,
            RejectReason::Unknown(c) => c,
        }
    }

    fn from_code(code: u32) -> RejectReason {
        match code {
            1 => RejectReason::Version,
            2 => RejectReason::AuthFailed,
            3 => RejectReason::Busy,
            4 => RejectReason::Malformed,
            c => RejectReason::Unknown(c),
        }
    }
}

/// Why a handshake failed. The connection must be closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: peer speaks {theirs}, this build speaks {PROTOCOL_VERSION}"
    )]
    VersionMismatch {
        /// The peer's version.
        theirs: u8,
    },
    /// The peer's MAC did not verify: the shared secrets differ, or someone
    /// tampered with the handshake.
    #[error("peer failed authentication: its MAC does not match (different shared secret?)")]
    AuthFailed,
    /// The responder refused us.
    #[error("peer refused the handshake: {reason:?} (detail {detail})")]
    Rejected {
        /// Why.
        reason: RejectReason,
        /// Reason-specific detail (for `Version`: the peer's version).
        detail: u32,
    },
    /// The bytes are not a handshake frame.
    #[error("malformed handshake: {0}")]
    Frame(FrameError),
    /// A valid frame of a kind not allowed at this step.
    #[error("unexpected {found:?} frame during the handshake (expected {expected})")]
    Unexpected {
        /// What came.
        found: FrameKind,
        /// What the step allows.
        expected: &'static str,
    },
    /// A handshake frame whose body length is not its fixed size.
    #[error("{kind:?} frame with a {len}-byte body (fixed size is {fixed})")]
    BadLength {
        /// The frame kind.
        kind: FrameKind,
        /// Declared body length.
        len: u32,
        /// The fixed length for this kind.
        fixed: usize,
    },
    /// The responder announced a frame limit below [`FRAME_BYTES_MIN`].
    #[error("peer announced frame_bytes_max = {0}, below the minimum {FRAME_BYTES_MIN}")]
    BadLimit(u32),
    /// Input after the handshake ended (the caller should stop feeding it).
    #[error("handshake already finished")]
    Finished,
    /// The OS random source failed.
    #[error("OS random source failed: {0}")]
    Rng(getrandom::Error),
}

impl From<FrameError> for HandshakeError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::UnsupportedVersion { found } => {
                HandshakeError::VersionMismatch { theirs: found }
            }
            e => HandshakeError::Frame(e),
        }
    }
}

/// Which side of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects and speaks first (the web host's replicator).
    Initiator,
    /// Accepts (the replica node).
    Responder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitHello,
    AwaitHelloReply,
    AwaitAuth,
    AwaitAccept,
    Done,
    Failed,
}

/// A handshake frame to send: a fixed buffer and its used length.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    buf: [u8; HANDSHAKE_FRAME_BYTES_MAX],
    len: usize,
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Outgoing {
    fn new(kind: FrameKind, body: &[u8]) -> Outgoing {
        let mut buf = [0u8; HANDSHAKE_FRAME_BYTES_MAX];
        buf[..HEADER_LEN].copy_from_slice(&frame::header_bytes(kind, body));
        buf[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
        Outgoing {
            buf,
            len: HEADER_LEN + body.len(),
        }
    }

    /// The frame's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The whole fixed buffer and the used length, for owned-buffer I/O.
    #[must_use]
    pub fn into_parts(self) -> ([u8; HANDSHAKE_FRAME_BYTES_MAX], usize) {
        (self.buf, self.len)
    }
}

/// One side of a handshake. Fixed size, no heap: safe to hold for
/// unauthenticated peers.
pub struct Handshake {
    role: Role,
    step: Step,
    key: [u8; SECRET_LEN],
    local: Identity,
    local_nonce: [u8; NONCE_LEN],
    peer: Identity,
    peer_nonce: [u8; NONCE_LEN],
    frame_bytes_max: u32,
    input: [u8; HANDSHAKE_FRAME_BYTES_MAX],
    have: usize,
    output: Option<Outgoing>,
    /// Derived once the transcript is complete and the peer proven.
    keys: Option<SessionKeys>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("step", &self.step)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn random_nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(HandshakeError::Rng)?;
    Ok(nonce)
}

impl Handshake {
    /// The connecting side, with a fresh nonce. Its `Hello` is ready in
    /// [`Handshake::take_output`].
    pub fn initiator(secret: &Secret, local: Identity) -> Result<Handshake, HandshakeError> {
        Ok(Handshake::initiator_with_nonce(
            secret,
            local,
            random_nonce()?,
        ))
    }

    /// The accepting side, with a fresh nonce, announcing `frame_bytes_max`.
    pub fn responder(
        secret: &Secret,
        local: Identity,
        frame_bytes_max: u32,
    ) -> Result<Handshake, HandshakeError> {
        Ok(Handshake::responder_with_nonce(
            secret,
            local,
            frame_bytes_max,
            random_nonce()?,
        ))
    }

    /// [`Handshake::initiator`] with a caller-chosen nonce. For tests and
    /// fuzzing only: a reused nonce lets a recorded handshake be replayed.
    #[must_use]
    pub fn initiator_with_nonce(
        secret: &Secret,
        local: Identity,
        nonce: [u8; NONCE_LEN],
    ) -> Handshake {
        let mut hs = Handshake::new(Role::Initiator, secret, local, 0, nonce);
        let mut body = [0u8; HELLO_BODY];
        body[0..8].copy_from_slice(&local.id.to_le_bytes());
        body[8..16].copy_from_slice(&local.incarnation.to_le_bytes());
        body[16..48].copy_from_slice(&nonce);
        hs.output = Some(Outgoing::new(FrameKind::Hello, &body));
        hs.step = Step::AwaitHelloReply;
        hs
    }

    /// [`Handshake::responder`] with a caller-chosen nonce. For tests and
    /// fuzzing only.
    #[must_use]
    pub fn responder_with_nonce(
        secret: &Secret,
        local: Identity,
        frame_bytes_max: u32,
        nonce: [u8; NONCE_LEN],
    ) -> Handshake {
        Handshake::new(Role::Responder, secret, local, frame_bytes_max, nonce)
    }

    fn new(
        role: Role,
        secret: &Secret,
        local: Identity,
        frame_bytes_max: u32,
        nonce: [u8; NONCE_LEN],
    ) -> Handshake {
        Handshake {
            role,
            step: Step::AwaitHello,
            key: secret.0,
            local,
            local_nonce: nonce,
            peer: Identity {
                id: 0,
                incarnation: 0,
            },
            peer_nonce: [0; NONCE_LEN],
            frame_bytes_max,
            input: [0; HANDSHAKE_FRAME_BYTES_MAX],
            have: 0,
            output: None,
            keys: None,
        }
    }

    /// This side's role.
    #[must_use]
    pub fn role(&self) -> Role {
        self.role
    }

    /// The frame to send now, if any. Send it before reading more.
    pub fn take_output(&mut self) -> Option<Outgoing> {
        self.output.take()
    }

    /// The authenticated peer, once the handshake succeeded.
    #[must_use]
    pub fn established(&self) -> Option<Established> {
        match (self.step, self.keys) {
            (Step::Done, Some(keys)) => Some(Established {
                peer: self.peer,
                frame_bytes_max: self.frame_bytes_max,
                keys,
            }),
            _ => None,
        }
    }

    /// True once the handshake succeeded or failed.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        matches!(self.step, Step::Done | Step::Failed)
    }

    /// How many more bytes complete the header or body being read: reading
    /// exactly this many never takes bytes that belong after the handshake.
    /// Zero once finished.
    #[must_use]
    pub fn wanted(&self) -> usize {
        if self.is_finished() {
            return 0;
        }
        if self.have < HEADER_LEN {
            // The header in steps that end where `FrameHeader::parse` can
            // check a field (magic; version and kind; length): a peer that
            // is not one of ours is refused at its first bytes, not after
            // the handshake timeout waiting for a whole header.
            const STEPS: [usize; 4] = [2, 4, 8, HEADER_LEN];
            let next = STEPS
                .iter()
                .copied()
                .find(|&s| s > self.have)
                .unwrap_or(HEADER_LEN);
            return next - self.have;
        }
        match FrameHeader::parse(&self.input[..self.have], HANDSHAKE_FRAME_BYTES_MAX as u32) {
            Ok(Some(h)) => h.frame_len().saturating_sub(self.have),
            _ => 0,
        }
    }

    /// Feeds bytes from the peer. Returns how many were consumed; the rest
    /// (if any) belong to whatever follows the handshake. On error the
    /// machine is failed, and [`Handshake::take_output`] may hold a `Reject`
    /// to send before closing.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<usize, HandshakeError> {
        let mut consumed = 0;
        while consumed < bytes.len() {
            if self.is_finished() {
                if self.step == Step::Failed || consumed == 0 {
                    return Err(HandshakeError::Finished);
                }
                break;
            }
            let take = self.wanted().min(bytes.len() - consumed);
            debug_assert!(take > 0, "an unfinished handshake always wants bytes");
            self.input[self.have..self.have + take]
                .copy_from_slice(&bytes[consumed..consumed + take]);
            self.have += take;
            consumed += take;
            if let Err(e) = self.advance() {
                self.fail(&e);
                return Err(e);
            }
        }
        Ok(consumed)
    }

    fn fail(&mut self, e: &HandshakeError) {
        self.step = Step::Failed;
        self.output = None;
        if self.role != Role::Responder {
            return;
        }
        let (reason, detail) = match e {
            HandshakeError::VersionMismatch { .. } => {
                (RejectReason::Version, u32::from(PROTOCOL_VERSION))
            }
            HandshakeError::AuthFailed => (RejectReason::AuthFailed, 0),
            HandshakeError::Unexpected { .. }
            | HandshakeError::BadLength { .. }
            | HandshakeError::Frame(
                FrameError::Checksum { .. }
                | FrameError::TooLarge { .. }
                | FrameError::UnknownKind { .. },
            ) => (RejectReason::Malformed, 0),
            // Not a sessio peer, or our own failure: just close.
            _ => return,
        };
        self.output = Some(reject_frame(reason, detail));
    }

    /// Parses the header as soon as it is complete (refusing a bad kind or
    /// length before the body is read), and handles a complete frame.
    fn advance(&mut self) -> Result<(), HandshakeError> {
        let Some(header) =
            FrameHeader::parse(&self.input[..self.have], HANDSHAKE_FRAME_BYTES_MAX as u32)?
        else {
            return Ok(());
        };
        let (allowed, expected): (&[FrameKind], _) = match self.step {
            Step::AwaitHello => (&[FrameKind::Hello], "Hello"),
            Step::AwaitHelloReply => (
                &[FrameKind::HelloReply, FrameKind::Reject],
                "HelloReply or Reject",
            ),
            Step::AwaitAuth => (&[FrameKind::Auth], "Auth"),
            Step::AwaitAccept => (&[FrameKind::Accept, FrameKind::Reject], "Accept or Reject"),
            Step::Done | Step::Failed => return Err(HandshakeError::Finished),
        };
        if !allowed.contains(&header.kind) {
            return Err(HandshakeError::Unexpected {
                found: header.kind,
                expected,
            });
        }
        let fixed = match header.kind {
            FrameKind::Hello => HELLO_BODY,
            FrameKind::HelloReply => HELLO_REPLY_BODY,
            FrameKind::Auth => AUTH_BODY,
            FrameKind::Accept => ACCEPT_BODY,
            _ => REJECT_BODY,
        };
        if header.body_len as usize != fixed {
            return Err(HandshakeError::BadLength {
                kind: header.kind,
                len: header.body_len,
                fixed,
            });
        }
        let Some((frame, used)) =
            Frame::decode(&self.input[..self.have], HANDSHAKE_FRAME_BYTES_MAX as u32)?
        else {
            return Ok(());
        };
        debug_assert_eq!(used, self.have);
        let mut body = [0u8; HELLO_REPLY_BODY];
        body[..frame.body.len()].copy_from_slice(frame.body);
        self.have = 0;
        self.on_frame(header.kind, &body)
    }

    fn on_frame(
        &mut self,
        kind: FrameKind,
        body: &[u8; HELLO_REPLY_BODY],
    ) -> Result<(), HandshakeError> {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&body[at..at + 4]);
            u32::from_le_bytes(b)
        };
        match kind {
            FrameKind::Hello => {
                self.peer = Identity {
                    id: u64_at(0),
                    incarnation: u64_at(8),
                };
                self.peer_nonce.copy_from_slice(&body[16..48]);
                let mut reply = [0u8; HELLO_REPLY_BODY];
                reply[0..8].copy_from_slice(&self.local.id.to_le_bytes());
                reply[8..16].copy_from_slice(&self.local.incarnation.to_le_bytes());
                reply[16..48].copy_from_slice(&self.local_nonce);
                reply[48..80].copy_from_slice(self.mac(LABEL_RESPONDER).as_bytes());
                self.output = Some(Outgoing::new(FrameKind::HelloReply, &reply));
                self.step = Step::AwaitAuth;
            }
            FrameKind::HelloReply => {
                self.peer = Identity {
                    id: u64_at(0),
                    incarnation: u64_at(8),
                };
                self.peer_nonce.copy_from_slice(&body[16..48]);
                self.verify(LABEL_RESPONDER, &body[48..80])?;
                let mac = self.mac(LABEL_INITIATOR);
                self.output = Some(Outgoing::new(FrameKind::Auth, mac.as_bytes()));
                self.step = Step::AwaitAccept;
            }
            FrameKind::Auth => {
                self.verify(LABEL_INITIATOR, &body[..MAC_LEN])?;
                let mut accept = [0u8; ACCEPT_BODY];
                accept[0..4].copy_from_slice(&self.frame_bytes_max.to_le_bytes());
                self.output = Some(Outgoing::new(FrameKind::Accept, &accept));
                self.keys = Some(self.derive_keys());
                self.step = Step::Done;
            }
            FrameKind::Accept => {
                let limit = u32_at(0);
                if limit < FRAME_BYTES_MIN {
                    return Err(HandshakeError::BadLimit(limit));
                }
                self.frame_bytes_max = limit;
                self.keys = Some(self.derive_keys());
                self.step = Step::Done;
            }
            _ => {
                return Err(HandshakeError::Rejected {
                    reason: RejectReason::from_code(u32_at(0)),
                    detail: u32_at(4),
                });
            }
        }
        Ok(())
    }

    /// The transcript, laid out initiator first whatever our role.
    fn transcript(&self) -> [u8; TRANSCRIPT_LEN] {
        let (init, init_nonce, resp, resp_nonce) = match self.role {
            Role::Initiator => (self.local, &self.local_nonce, self.peer, &self.peer_nonce),
            Role::Responder => (self.peer, &self.peer_nonce, self.local, &self.local_nonce),
        };
        let mut t = [0u8; TRANSCRIPT_LEN];
        t[0] = PROTOCOL_VERSION;
        let mut at = 1;
        for (id, incarnation, nonce) in [
            (init.id, init.incarnation, init_nonce),
            (resp.id, resp.incarnation, resp_nonce),
        ] {
            t[at..at + 8].copy_from_slice(&id.to_le_bytes());
            t[at + 8..at + 16].copy_from_slice(&incarnation.to_le_bytes());
            t[at + 16..at + 16 + NONCE_LEN].copy_from_slice(nonce);
            at += 16 + NONCE_LEN;
        }
        t
    }

    /// The MAC over the transcript.
    fn mac(&self, label: &[u8; 16]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(label);
        h.update(&self.transcript());
        h.finalize()
    }

    /// The frame keys: derived from the secret and the whole transcript,
    /// so each connection (fresh nonces on both sides) has its own.
    fn derive_keys(&self) -> SessionKeys {
        SessionKeys::derive(&self.key, &self.transcript(), self.role == Role::Initiator)
    }

    fn verify(&self, label: &[u8; 16], mac: &[u8]) -> Result<(), HandshakeError> {
        let mut got = [0u8; MAC_LEN];
        got.copy_from_slice(mac);
        // `blake3::Hash` compares in constant time.
        if self.mac(label) == blake3::Hash::from_bytes(got) {
            Ok(())
        } else {
            Err(HandshakeError::AuthFailed)
        }
    }
}

/// A `Reject` frame, as a responder sends before closing (also used by a
/// server refusing a connection over its cap).
#[must_use]
pub fn reject_frame(reason: RejectReason, detail: u32) -> Outgoing {
    Outgoing::new(FrameKind::Reject, &reject_body(reason, detail))
}

/// The body of a `Reject` frame (after the handshake it travels sealed).
#[must_use]
pub fn reject_body(reason: RejectReason, detail: u32) -> [u8; REJECT_BODY] {
    let mut body = [0u8; REJECT_BODY];
    body[0..4].copy_from_slice(&reason.code().to_le_bytes());
    body[4..8].copy_from_slice(&detail.to_le_bytes());
    body
}

#[cfg(test)]
mod tests;
