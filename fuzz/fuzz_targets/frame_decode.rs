//! Arbitrary bytes into the frame decoder: it never panics, a prefix of a
//! frame is "need more", and a decoded frame re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessio_net::frame::Frame;

fuzz_target!(|data: &[u8]| {
    let limit = 1 << 16;
    match Frame::decode(data, limit) {
        Ok(Some((frame, used))) => {
            assert!(used <= data.len());
            let mut again = Vec::new();
            frame.encode_into(&mut again);
            assert_eq!(&again[..], &data[..used]);
            for n in 0..used {
                assert_eq!(Frame::decode(&data[..n], limit), Ok(None));
            }
        }
        Ok(None) | Err(_) => {}
    }
});
