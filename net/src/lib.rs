//! sessio-net (overview written below).

pub mod frame;
pub mod handshake;
pub mod message;
