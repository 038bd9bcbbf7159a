//! The host side: what runs beside the arena on each web host.
//!
//! - [`replicator`]: drains the arena's dirty sessions and ships them to
//!   their owners in the bank, records the acks.
//! - [`failover`]: fetches a session this host does not hold from the bank
//!   and installs it under a new ownership epoch.
//! - [`sessions`]: the one object a web worker opens: reads that fetch on a
//!   miss, bounded misses, expiry, durability per update.

pub mod failover;
pub mod replicator;
pub mod sessions;
