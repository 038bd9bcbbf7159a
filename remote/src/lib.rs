//! `sessio-remote`: the replica bank of sessio and the host-side pieces that
//! talk to it.
//!
//! A web host keeps its sessions in a shared-memory arena
//! ([`sessio_engine`]). This crate ships every change to a bank of replica
//! nodes and fetches sessions back when a host dies:
//!
//! - [`placement`]: which nodes own a SID (rendezvous hashing with xxh3,
//!   replication factor `R`), and who stands in for an owner that is down.
//! - [`replicator`]: a thread per host that drains dirty sessions, groups
//!   them by node, sends deltas or full records over [`sessio_net`]
//!   connections, and records acks in the arena.
//! - [`node`]: the replica node: a store of copies keyed by SID that applies
//!   deltas on a matching base version, fences older ownership epochs and
//!   serves fetches.
//! - [`failover`]: fetch a session this host does not hold from the bank
//!   and install it under a new ownership epoch, once per SID per process.
//! - [`runtime`]: the two I/O engines as runnable runtimes.
//!
//! The `sessio` binary (crate `cli/`) runs these as processes.
//!
//! Data moves: `Arena::update` → dirty bit → [`replicator::Replicator`] →
//! `DeltaBatch` → [`node::Store`] → `Ack` → `Arena::mark_acked`; and on a
//! miss, [`failover::fetch_and_install`] → `Fetch` → `Arena::install`.
//! Design, failure cases and the tests that show them:
//! `docs/REPLICATION.md`.
//!
//! # Example
//!
//! A node on a thread, a host arena replicated to it, and a second host
//! that fetches the session after the first one is gone:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use sessio_engine::{Arena, ArenaConfig, Location, NewSession, Op};
//! use sessio_net::{IoUring, Secret};
//! use sessio_remote::failover::{fetch_and_install, FailoverConfig, NodeClients, Singleflight};
//! use sessio_remote::node::{self, NodeConfig};
//! use sessio_remote::placement::{Member, Placement};
//! use sessio_remote::replicator::{Replicator, ReplicatorConfig};
//! use sessio_remote::runtime::Rt;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # assert!(IoUring::available(), "this example runs on io_uring");
//! let secret = Secret::from_bytes([7; 32]); // in production: Secret::from_file(path)?
//! let (tx, rx) = std::sync::mpsc::channel();
//! let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
//! let node = std::thread::spawn({
//!     let (secret, stop) = (secret.clone(), Arc::clone(&stop));
//!     move || {
//!         let config = NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1);
//!         let shutdown = async move {
//!             while !stop.load(std::sync::atomic::Ordering::Relaxed) {
//!                 compio::time::sleep(Duration::from_millis(5)).await;
//!             }
//!         };
//!         node::serve::<IoUring>(&config, secret, |addr, _| tx.send(addr).unwrap(), shutdown)
//!     }
//! });
//! let placement = Placement::new(vec![Member { id: 1, addr: rx.recv()? }], 1)?;
//!
//! let (a, b) = (Location::Shm(format!("doc-a-{}", std::process::id())),
//!               Location::Shm(format!("doc-b-{}", std::process::id())));
//! let host_a = Arena::open(&a, &ArenaConfig::for_sessions(100, 1024))?;
//! let repl = Replicator::spawn(&a, ReplicatorConfig::new(placement.clone(), secret.clone(), 10))?;
//! let sid = host_a.create(NewSession::default(), &[("user", b"ada")])?;
//! let v = host_a.update(sid, &[Op::Set { key: "cart".into(), value: b"3 apples".to_vec() }])?;
//! let t = Instant::now();
//! while host_a.acked(sid)?[0].1 < v && t.elapsed() < Duration::from_secs(5) {
//!     std::thread::sleep(Duration::from_millis(1));
//! }
//! drop(repl);
//!
//! let host_b = Arena::open(&b, &ArenaConfig::for_sessions(100, 1024))?;
//! let mut clients = NodeClients::<IoUring>::new(FailoverConfig::new(11, secret), Arc::new(Singleflight::default()))?;
//! let fetched = fetch_and_install(&host_b, sid, &placement, &mut clients)?;
//! assert_eq!((fetched.version, fetched.epoch), (v, 2));
//! assert_eq!(host_b.read(sid)?.get("cart"), Some(&b"3 apples"[..]));
//! # stop.store(true, std::sync::atomic::Ordering::Relaxed);
//! # node.join().unwrap()?;
//! # drop((host_a, host_b));
//! # Arena::remove(&a)?; Arena::remove(&b)?;
//! # Ok(())
//! # }
//! ```

pub mod host;
pub mod node;
pub mod placement;
pub mod runtime;
mod samples;

pub use host::{failover, replicator, sessions};

pub use failover::{
    FailoverConfig, FailoverError, Fetched, NodeClients, Singleflight, fetch_and_install,
};
pub use node::{FOLD_IDLE_MS, NodeConfig, NodeLimits, Store};
pub use placement::{Member, Placement, PlacementError};
pub use replicator::{NodeStats, Replicator, ReplicatorConfig, ReplicatorError, ReplicatorStats};
pub use samples::Samples;
pub use sessions::{
    Durability, Engine, HostConfig, HostError, HostStats, MissLimits, Sessions, SweepConfig,
};
