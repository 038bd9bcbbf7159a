//! The host side: what runs beside the arena on each web host.
//!
//! - [`replicator`]: drains the arena's dirty sessions and ships them to
//!   their owners in the bank, records the acks.
//! - [`failover`]: fetches a session this host does not hold from the bank
//!   and installs it under a new ownership epoch.

pub mod failover;
pub mod replicator;
