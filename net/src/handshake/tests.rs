//! The handshake machines against each other and against hostile input;
//! secret files.

use super::*;

const A: Identity = Identity {
    id: 1,
    incarnation: 10,
};
const B: Identity = Identity {
    id: 2,
    incarnation: 20,
};

/// Runs both machines against each other, delivering `chunk` bytes at a
/// time, until both finish or one fails.
fn run(
    i: &mut Handshake,
    r: &mut Handshake,
    chunk: usize,
) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
    let (mut ri, mut rr) = (Ok(()), Ok(()));
    for _ in 0..10 {
        if let Some(out) = i.take_output() {
            for part in out.as_bytes().chunks(chunk) {
                if let Err(e) = r.receive(part) {
                    rr = Err(e);
                    break;
                }
            }
        }
        if let Some(out) = r.take_output() {
            for part in out.as_bytes().chunks(chunk) {
                if let Err(e) = i.receive(part) {
                    ri = Err(e);
                    break;
                }
            }
        }
        if (i.is_finished() || ri.is_err()) && (r.is_finished() || rr.is_err()) {
            break;
        }
    }
    (ri, rr)
}

#[test]
fn right_key_succeeds_byte_by_byte_and_whole() {
    for chunk in [1, 7, 96] {
        let s = Secret::from_bytes([7; 32]);
        let mut i = Handshake::initiator(&s, A).unwrap();
        let mut r = Handshake::responder(&s, B, 4096).unwrap();
        let (ri, rr) = run(&mut i, &mut r, chunk);
        ri.unwrap();
        rr.unwrap();
        let (ie, re) = (i.established().unwrap(), r.established().unwrap());
        assert_eq!((ie.peer, ie.frame_bytes_max), (B, 4096));
        assert_eq!((re.peer, re.frame_bytes_max), (A, 4096));
        // Mirrored keys: what one side seals, the other opens.
        assert_eq!(ie.keys.send, re.keys.recv);
        assert_eq!(ie.keys.recv, re.keys.send);
        assert_ne!(ie.keys.send, ie.keys.recv);
    }
}

#[test]
fn frame_keys_are_fresh_per_connection_and_bound_to_the_secret() {
    let keys = |secret: [u8; 32], nonce_i: [u8; 32], nonce_r: [u8; 32]| {
        let s = Secret::from_bytes(secret);
        let mut i = Handshake::initiator_with_nonce(&s, A, nonce_i);
        let mut r = Handshake::responder_with_nonce(&s, B, 4096, nonce_r);
        let (ri, rr) = run(&mut i, &mut r, 96);
        ri.unwrap();
        rr.unwrap();
        i.established().unwrap().keys
    };
    let base = keys([7; 32], [1; 32], [2; 32]);
    // The same inputs give the same keys (both sides compute them alone).
    assert_eq!(base.send, keys([7; 32], [1; 32], [2; 32]).send);
    // Any change of nonce or secret gives others.
    for other in [
        keys([7; 32], [3; 32], [2; 32]),
        keys([7; 32], [1; 32], [3; 32]),
        keys([8; 32], [1; 32], [2; 32]),
    ] {
        assert_ne!(base.send, other.send);
        assert_ne!(base.recv, other.recv);
    }
    // Not the secret itself.
    assert_ne!(base.send, [7; 32]);
}

#[test]
fn wrong_key_fails_on_both_sides() {
    let mut i = Handshake::initiator(&Secret::from_bytes([1; 32]), A).unwrap();
    let mut r = Handshake::responder(&Secret::from_bytes([2; 32]), B, 4096).unwrap();
    let (ri, _) = run(&mut i, &mut r, 96);
    assert!(matches!(ri, Err(HandshakeError::AuthFailed)));
    assert!(i.established().is_none());
    assert!(r.established().is_none());
}

#[test]
fn replayed_initiator_auth_fails_against_fresh_nonce() {
    let s = Secret::from_bytes([3; 32]);
    let mut i = Handshake::initiator_with_nonce(&s, A, [1; 32]);
    let mut r = Handshake::responder_with_nonce(&s, B, 4096, [2; 32]);
    let hello = i.take_output().unwrap();
    r.receive(hello.as_bytes()).unwrap();
    i.receive(r.take_output().unwrap().as_bytes()).unwrap();
    let auth = i.take_output().unwrap();
    // Same initiator bytes against a responder with another nonce.
    let mut r2 = Handshake::responder_with_nonce(&s, B, 4096, [3; 32]);
    r2.receive(hello.as_bytes()).unwrap();
    assert!(matches!(
        r2.receive(auth.as_bytes()),
        Err(HandshakeError::AuthFailed)
    ));
    assert!(r2.take_output().is_some(), "a Reject is queued");
}

#[test]
fn wrong_version_is_named() {
    let s = Secret::from_bytes([3; 32]);
    let mut i = Handshake::initiator(&s, A).unwrap();
    let mut hello = i.take_output().unwrap().as_bytes().to_vec();
    // A version 5 peer (every batch answered with a whole ack).
    hello[2] = 5;
    let mut r = Handshake::responder(&s, B, 4096).unwrap();
    assert!(matches!(
        r.receive(&hello),
        Err(HandshakeError::VersionMismatch { theirs: 5 })
    ));
    let reject = r.take_output().unwrap();
    assert!(matches!(
        i.receive(reject.as_bytes()),
        Err(HandshakeError::Rejected {
            reason: RejectReason::Version,
            detail: 6
        })
    ));
}

#[test]
fn oversized_or_misordered_frames_refused_at_header() {
    let s = Secret::from_bytes([3; 32]);
    let mut r = Handshake::responder(&s, B, 4096).unwrap();
    let mut big = frame::header_bytes(FrameKind::Hello, &[0; 48]);
    big[4..8].copy_from_slice(&1_000_000u32.to_le_bytes());
    assert!(matches!(
        r.receive(&big),
        Err(HandshakeError::Frame(FrameError::TooLarge { .. }))
    ));
    let mut r = Handshake::responder(&s, B, 4096).unwrap();
    let auth = frame::header_bytes(FrameKind::Auth, &[0; 32]);
    assert!(matches!(
        r.receive(&auth),
        Err(HandshakeError::Unexpected { .. })
    ));
    let mut r = Handshake::responder(&s, B, 4096).unwrap();
    assert!(r.receive(b"GET / HTTP/1.1\r\n").is_err());
    assert!(r.take_output().is_none(), "no Reject for a non-sessio peer");
}

#[test]
fn consumes_only_handshake_bytes() {
    let s = Secret::from_bytes([3; 32]);
    let mut i = Handshake::initiator(&s, A).unwrap();
    let mut r = Handshake::responder(&s, B, 4096).unwrap();
    r.receive(i.take_output().unwrap().as_bytes()).unwrap();
    i.receive(r.take_output().unwrap().as_bytes()).unwrap();
    r.receive(i.take_output().unwrap().as_bytes()).unwrap();
    let mut accept = r.take_output().unwrap().as_bytes().to_vec();
    accept.extend_from_slice(b"after");
    assert_eq!(i.receive(&accept).unwrap(), accept.len() - 5);
    assert!(i.established().is_some());
}

#[test]
fn secret_file_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("sessio-secret-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = Secret::from_file(dir.join("nope")).unwrap_err();
    assert!(matches!(missing, SecretError::Missing { .. }), "{missing}");
    let short = dir.join("short");
    std::fs::write(&short, [1u8; 31]).unwrap();
    let err = Secret::from_file(&short).unwrap_err();
    assert!(err.to_string().contains("31 bytes"), "{err}");
    let raw = dir.join("raw");
    std::fs::write(&raw, [5u8; 32]).unwrap();
    assert_eq!(
        Secret::from_file(&raw).unwrap(),
        Secret::from_bytes([5; 32])
    );
    let hex = dir.join("hex");
    std::fs::write(&hex, format!("{}\n", "0a".repeat(32))).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (secret, warnings) = Secret::load(&hex).unwrap();
        assert_eq!(secret, Secret::from_bytes([10; 32]));
        assert!(matches!(
            warnings[..],
            [SecretWarning::WorldReadable { mode: 0o644, .. }]
        ));
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Secret::load(&hex).unwrap().1.is_empty());
        // A device is not a secret file, and says so (it used to be
        // read as "128 bytes").
        let err = Secret::from_file("/dev/zero").unwrap_err();
        assert!(matches!(err, SecretError::NotAFile { .. }), "{err}");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // An all-zero key works, with a warning, raw or in hex.
        let zeros = dir.join("zeros");
        std::fs::write(&zeros, [0u8; 32]).unwrap();
        std::fs::set_permissions(&zeros, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, warnings) = Secret::load(&zeros).unwrap();
        assert!(
            matches!(warnings[..], [SecretWarning::ZeroKey { .. }]),
            "{warnings:?}"
        );
        std::fs::write(&zeros, "00".repeat(32)).unwrap();
        let (_, warnings) = Secret::load(&zeros).unwrap();
        assert!(
            matches!(warnings[..], [SecretWarning::ZeroKey { .. }]),
            "{warnings:?}"
        );
        assert!(warnings[0].to_string().contains("all-zero key"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
