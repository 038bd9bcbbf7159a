//! `sessio-net`: the wire protocol of sessio and its `io_uring` transport.
//!
//! Web hosts ship session changes to replica nodes, and fetch sessions back
//! on failover, over long-lived authenticated TCP connections. Everything on
//! the wire is a [frame]: a 16-byte header (magic, version, kind,
//! length, check word) and a body. Before anything else, the two peers run
//! the [handshake]: a mutual BLAKE3-keyed challenge–response over
//! a shared 32-byte secret that also exchanges ids and process incarnations
//! and derives one key per direction. After it, every frame is a
//! [sealed](seal) record (AEGIS-256X4 under a per-direction counter) of one
//! or more [messages](record), as many as one socket write carries; each is
//! one rkyv-archived [message], validated with bytecheck and
//! bounded by [`Limits`] before use.
//!
//! Data moves through the modules like this:
//!
//! - [`frame`]: bytes ⇄ `(kind, body)`; tells "need more" from "invalid".
//! - [`handshake`]: a pure, allocation-free state machine (bytes in, bytes
//!   out) — unit-tested and fuzzed without sockets.
//! - [`seal`]: seals and opens records in place after the handshake.
//! - [`record`]: messages ⇄ a record's plaintext; the send buffer that
//!   coalesces a write's messages into one record.
//! - [`message`]: `(kind, body)` ⇄ [`Message`], with validation and limits.
//! - [`transport`]: the framed connection shared by [`Client`] and
//!   [`Server`], which run on a [`Backend`]: [`IoUring`] (compio, the
//!   default) or [`Epoll`] (tokio, the baseline for benchmarks).
//!
//! Runtimes are single-threaded (thread-per-core): run one server per thread
//! and share the port with [`SocketOptions::reuse_port`]. Byte layouts,
//! limits and error behaviour: `docs/PROTOCOL.md`.
//!
//! # Example
//!
//! A server that answers pings, and a client that pings it, over `io_uring`:
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
//! use std::time::Duration;
//! use sessio_net::{Client, ClientConfig, Identity, Message, Ping, Pong, Received, Secret, Server, ServerConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # assert!(sessio_net::IoUring::runtime().is_ok(), "this example runs on io_uring");
//! let secret = Secret::from_bytes([42; 32]); // in production: Secret::from_file(path)?
//! let (addr_tx, addr_rx) = std::sync::mpsc::channel();
//! let stop = Arc::new(AtomicBool::new(false));
//! let node = std::thread::spawn({
//!     let (secret, stop) = (secret.clone(), Arc::clone(&stop));
//!     move || sessio_net::IoUring::runtime()?.block_on(async move {
//!         let config = ServerConfig::new(Identity::with_random_incarnation(1).unwrap());
//!         let server: Server = Server::bind("127.0.0.1:0".parse().unwrap(), config, secret)?;
//!         addr_tx.send(server.local_addr()).unwrap();
//!         // A delta batch comes as `Received::DeltaBatch`, read where it arrived.
//!         let handler = |_peer, msg: Received<'_>| match msg {
//!             Received::Message(Message::Ping(Ping { nonce })) => {
//!                 Some(Message::Pong(Pong { nonce, stale: Vec::new() }))
//!             }
//!             _ => None,
//!         };
//!         let shutdown = async move {
//!             while !stop.load(Ordering::Relaxed) {
//!                 compio::time::sleep(Duration::from_millis(5)).await;
//!             }
//!         };
//!         server.serve_until(handler, shutdown).await
//!     })
//! });
//!
//! let addr = addr_rx.recv()?;
//! sessio_net::IoUring::runtime()?.block_on(async {
//!     let config = ClientConfig::new(Identity::with_random_incarnation(7)?);
//!     let mut client: Client = Client::connect(addr, config, secret).await?;
//!     assert_eq!(client.peer().identity.id, 1);
//!     let reply = client.call(&Message::Ping(Ping { nonce: 9 })).await?;
//!     assert_eq!(reply, Message::Pong(Pong { nonce: 9, stale: Vec::new() }));
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! stop.store(true, Ordering::Relaxed);
//! node.join().unwrap()?;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod client;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod record;
pub mod seal;
pub mod server;
pub mod shutdown;
#[doc(hidden)]
pub mod test_backend;
pub mod transport;

pub use backend::{Backend, Epoll, IoUring, bind_listener};
pub use client::{Client, ClientConfig};
pub use frame::{Frame, FrameError, FrameKind};
pub use handshake::{Handshake, HandshakeError, Identity, Secret, SecretError};
pub use message::{
    Ack, AckEntry, AckStatus, AllApplied, Codec, Counter, Delta, DeltaBatch, DeltaEntry, Fetch,
    FetchReply, FoundRecord, Invalidate, InvalidateEntry, Limits, Message, MessageError, Ping,
    Pong, Received, Sid, Stats, StatsRequest,
};
pub use record::RecordWriter;
pub use seal::{Opener, SealError, Sealer, SessionKeys};
pub use server::{Server, ServerConfig, ServerStats};
pub use shutdown::{FireOnDrop, Shutdown};
pub use transport::{Backoff, PeerInfo, SocketOptions, TransportError};
