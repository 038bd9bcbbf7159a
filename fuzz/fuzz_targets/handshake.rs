//! Arbitrary peer bytes into both handshake roles, in arbitrary chunks:
//! never panics, never reads past the frame it needs, and never succeeds
//! without a peer that knows the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::handshake::{Handshake, Identity, Secret};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let secret = Secret::from_bytes([9; 32]);
    let me = Identity { id: 1, incarnation: 2 };
    let chunk = usize::from(split % 32) + 1;
    for role in 0..2 {
        let mut hs = if role == 0 {
            Handshake::responder_with_nonce(&secret, me, 4096, [3; 32])
        } else {
            Handshake::initiator_with_nonce(&secret, me, [4; 32])
        };
        let _ = hs.take_output();
        for part in rest.chunks(chunk) {
            match hs.receive(part) {
                Ok(used) => assert!(used <= part.len()),
                Err(_) => break,
            }
            let _ = hs.take_output();
            if hs.is_finished() {
                break;
            }
        }
        // Random bytes cannot forge a 256-bit MAC over our fresh nonce.
        assert!(hs.established().is_none());
    }
});
