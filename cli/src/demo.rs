//! `sessio demo`: the whole system on loopback, driven by simulated shoppers
//! and checked end to end.
//!
//! The driver ([`driver::run`]) spawns real processes from its own binary:
//! three replica nodes (`sessio node`) and two web hosts, each host being
//! two worker processes (`sessio demo-worker`) that share one
//! shared-memory arena; the first worker of each host also runs the host's
//! replicator thread. Simulated clients are sticky to a host (client id
//! hash) and send shopping-cart requests to it; every request reads the
//! session, and most update it (`Op::Set` / `Op::Remove` on `cart:<item>`,
//! `Op::Append` on a bounded `history`).
//!
//! The workers speak a line protocol on stdin/stdout ([`protocol`]): one
//! request per line, one answer per line, pipelined. Every answer carries
//! the version the update produced, so the driver knows exactly which
//! updates were acknowledged to which client and keeps each client's
//! expected cart ([`model`]).
//!
//! During the run the driver kills a replica node with SIGKILL and restarts
//! it empty, freezes the whole bank with SIGSTOP, and kills host 1 with
//! SIGKILL. Host 1's clients move to host 2, whose workers fetch each
//! session from the bank on its first request
//! ([`sessio_remote::failover::fetch_and_install`]). After host 1 is dead the
//! driver opens its arena alone and reads, per session, the version the
//! bank had acknowledged (`Arena::acked`, held by `R` = 2 nodes): an update
//! at or below it that host 2 did not get back is a *lost acknowledged
//! update* and fails the demo; an update above it is in the measured loss
//! window (applied by host 1, never shipped before it died). At the end
//! every session is read back from the host that serves it and compared
//! attribute by attribute with the client's expected state.

pub mod driver;
pub mod model;
mod procs;
pub mod protocol;
pub mod worker;

pub use driver::{DemoArgs, run as run_demo};
pub use worker::{WorkerArgs, run as run_worker};
