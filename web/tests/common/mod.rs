//! What the tests of `sessio-web` share: a bank of real nodes on loopback,
//! hosts with their own arenas in shared memory, and a way to read the
//! session behind a tower-sessions id.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sessio_engine::{Arena, ArenaConfig, Location, Sid};
use sessio_net::Secret;
use sessio_remote::failover::FailoverConfig;
use sessio_remote::node::LocalBank;
use sessio_remote::replicator::{Replicator, ReplicatorConfig};
use sessio_remote::{HostConfig, SweepConfig};
use sessio_web::{WebConfig, WebHost};

pub const SECRET: [u8; 32] = [7; 32];

/// `n` bank nodes on this process's threads, keeping `replicas` copies of
/// each session; stopped when dropped.
/// On `io_uring` where it works here, else on epoll.
pub fn start_bank(n: u16, replicas: usize) -> LocalBank {
    LocalBank::start_any(n, replicas, Secret::from_bytes(SECRET))
        .expect("a bank serves on loopback")
}

static NEXT_ARENA: AtomicU32 = AtomicU32::new(0);

/// A host's arena: a name of its own, removed when dropped (also when the
/// test fails).
pub struct Host {
    pub location: Location,
    pub id: u64,
}

impl Host {
    /// A fresh arena for host `id` (ids tell hosts apart to the bank).
    pub fn new(tag: &str, id: u64) -> Host {
        let n = NEXT_ARENA.fetch_add(1, Ordering::Relaxed);
        let location = Location::Shm(format!("webtest-{tag}-{}-{n}", std::process::id()));
        let _ = Arena::remove(&location);
        Host { location, id }
    }

    /// The host API's configuration: a small arena, a quick sweeper.
    pub fn config(&self, bank: &LocalBank, arena: ArenaConfig) -> WebConfig {
        let mut host = HostConfig::new(
            self.location.clone(),
            arena,
            bank.placement.clone(),
            FailoverConfig::new(self.id, Secret::from_bytes(SECRET)),
        );
        host.sweep = Some(SweepConfig {
            every_ms: 50,
            pass_ms: 1000,
        });
        WebConfig::new(host)
    }

    /// Opens the host with a 64-session arena of default quota.
    pub fn open(&self, bank: &LocalBank) -> WebHost {
        WebHost::open(self.config(bank, ArenaConfig::for_sessions(64, 1024)))
            .expect("the host opens its arena")
    }

    /// Ships this host's changes to the bank until dropped.
    pub fn replicator(&self, bank: &LocalBank) -> Replicator {
        Replicator::spawn(
            &self.location,
            ReplicatorConfig::new(bank.placement.clone(), Secret::from_bytes(SECRET), self.id),
        )
        .expect("the replicator starts")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Arena::remove(&self.location);
    }
}

/// The SID a tower-sessions id stands for (the id's 16 bytes, little
/// endian).
pub fn sid_of(id: i128) -> Sid {
    Sid(id.to_le_bytes())
}

/// A tokio runtime small enough for a shared two-core machine.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(4)
        .thread_keep_alive(Duration::from_secs(1))
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
