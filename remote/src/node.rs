//! The replica node: an in-memory store of session copies, keyed by SID,
//! that applies hosts' deltas, fences stale owners and serves failover
//! fetches.
//!
//! [`Store`] is the pure state machine (messages in, replies out, no I/O),
//! unit-tested below; [`serve`] puts it behind a [`Server`] on one thread.
//! Every process start draws a fresh incarnation id, sent in each handshake:
//! a host that sees a new one knows this node lost its copies and resends
//! its share.
//!
//! Rules for one [`DeltaEntry`] (see `docs/REPLICATION.md`):
//! - a copy under a newer ownership epoch than the entry's wins: `Fenced`;
//! - `Ops` apply only on top of exactly `base_version`, else `NeedFull`;
//! - `Full` replaces an older copy (same epoch and an older or equal
//!   version is a replay: acknowledged, not applied);
//! - a store at `sessions_max` or `bytes_max`, or a record that does not
//!   validate, is `Refused`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use hashbrown::HashMap;
use sessio_engine::session::{decode_ops, decode_session, encode_session};
use sessio_net::{
    Ack, AckEntry, AckStatus, Counter, Delta, DeltaBatch, DeltaEntry, Fetch, FetchReply,
    FoundRecord, Identity, Invalidate, Message, PeerInfo, Pong, Secret, Server, ServerConfig, Sid,
    Stats, StatsRequest,
};

use crate::runtime::Rt;

/// Default for [`NodeLimits::sessions_max`].
pub const SESSIONS_MAX_DEFAULT: u64 = 10_000_000;
/// Default for [`NodeLimits::bytes_max`].
pub const BYTES_MAX_DEFAULT: u64 = 4 << 30;
/// How long a node retries binding a port that is still in use, in ms.
pub const BIND_RETRY_MS: u64 = 3_000;
/// Attribute bytes a replica lets one session hold when applying ops; the
/// host's own quota (at most 64 MiB) already bounded them.
const APPLY_QUOTA_BYTES: u64 = 64 << 20;

/// What one node agrees to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLimits {
    /// Most sessions held.
    pub sessions_max: u64,
    /// Most record bytes held, summed over sessions.
    pub bytes_max: u64,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            sessions_max: SESSIONS_MAX_DEFAULT,
            bytes_max: BYTES_MAX_DEFAULT,
        }
    }
}

/// One session's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The host's record version.
    pub version: u64,
    /// Ownership epoch it was written under.
    pub epoch: u64,
    /// The archived `SessionData` (validated on receipt).
    pub record: Vec<u8>,
}

/// Counters a node reports in [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Delta entries applied (ops, full records and removals).
    pub applied: u64,
    /// Entries answered `NeedFull`.
    pub need_full: u64,
    /// Entries answered `Fenced`.
    pub fenced: u64,
    /// Entries answered `Refused`.
    pub refused: u64,
    /// Fetches served.
    pub fetches: u64,
    /// Fetches that found a copy.
    pub fetch_hits: u64,
    /// Copies dropped by `Invalidate`.
    pub invalidated: u64,
}

/// The node's state: copies keyed by SID, within [`NodeLimits`].
#[derive(Debug)]
pub struct Store {
    copies: HashMap<Sid, Copy>,
    bytes: u64,
    limits: NodeLimits,
    incarnation: u64,
    /// Counters since start.
    pub counters: NodeCounters,
}

impl Store {
    /// An empty store.
    pub fn new(limits: NodeLimits, incarnation: u64) -> Store {
        Store {
            copies: HashMap::new(),
            bytes: 0,
            limits,
            incarnation,
            counters: NodeCounters::default(),
        }
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Record bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The copy of `sid`.
    pub fn get(&self, sid: &Sid) -> Option<&Copy> {
        self.copies.get(sid)
    }

    /// Answers one message; `None` for messages that get no answer.
    pub fn handle(&mut self, msg: Message) -> Option<Message> {
        match msg {
            Message::DeltaBatch(b) => Some(Message::Ack(self.apply_batch(b))),
            Message::Fetch(f) => Some(Message::FetchReply(self.fetch(f))),
            Message::Invalidate(inv) => {
                self.invalidate(&inv);
                None
            }
            Message::Ping(p) => Some(Message::Pong(Pong { nonce: p.nonce })),
            Message::StatsRequest(r) => Some(Message::Stats(self.stats(r))),
            // Replies sent to a server are a confused peer; ignore them.
            _ => None,
        }
    }

    /// Applies a batch in order; one ack entry per delta entry.
    pub fn apply_batch(&mut self, batch: DeltaBatch) -> Ack {
        let entries = batch
            .entries
            .into_iter()
            .map(|e| {
                let sid = e.sid;
                let status = self.apply_entry(e);
                match status {
                    AckStatus::Applied => self.counters.applied += 1,
                    AckStatus::NeedFull => self.counters.need_full += 1,
                    AckStatus::Fenced => self.counters.fenced += 1,
                    AckStatus::Refused => self.counters.refused += 1,
                }
                AckEntry {
                    sid,
                    version: self.copies.get(&sid).map_or(0, |c| c.version),
                    status,
                }
            })
            .collect();
        Ack { entries }
    }

    fn apply_entry(&mut self, e: DeltaEntry) -> AckStatus {
        let held = self.copies.get(&e.sid).map(|c| (c.version, c.epoch));
        if let Some((_, epoch)) = held
            && e.epoch < epoch
        {
            return AckStatus::Fenced;
        }
        match e.body {
            Delta::Remove => {
                if let Some(c) = self.copies.remove(&e.sid) {
                    self.bytes -= c.record.len() as u64;
                }
                AckStatus::Applied
            }
            Delta::Full(record) => {
                if let Some((version, epoch)) = held
                    && e.epoch == epoch
                    && e.new_version <= version
                {
                    // A replay or a reordered older copy: ours is as new.
                    return AckStatus::Applied;
                }
                if decode_session(&record).is_err() {
                    return AckStatus::Refused;
                }
                self.put(e.sid, e.new_version, e.epoch, record)
            }
            Delta::Ops(ops) => {
                let Some((version, _)) = held else {
                    return AckStatus::NeedFull;
                };
                if e.base_version != version || e.new_version != version + 1 {
                    return AckStatus::NeedFull;
                }
                let Ok(ops_decoded) = decode_ops(&ops) else {
                    return AckStatus::Refused;
                };
                let old = &self.copies[&e.sid].record;
                let Ok(mut data) = decode_session(old) else {
                    return AckStatus::NeedFull;
                };
                match data.apply(
                    &ops_decoded,
                    sessio_engine::clock::now_ms(),
                    APPLY_QUOTA_BYTES,
                ) {
                    Ok(sessio_engine::session::Applied::Changed) => {}
                    Ok(sessio_engine::session::Applied::Invalidated) => {
                        if let Some(c) = self.copies.remove(&e.sid) {
                            self.bytes -= c.record.len() as u64;
                        }
                        return AckStatus::Applied;
                    }
                    // The host applied this batch; we could not: resync.
                    Err(_) => return AckStatus::NeedFull,
                }
                data.log_batch(e.new_version, &ops);
                let record = encode_session(&data).to_vec();
                self.put(e.sid, e.new_version, e.epoch, record)
            }
        }
    }

    fn put(&mut self, sid: Sid, version: u64, epoch: u64, record: Vec<u8>) -> AckStatus {
        let old_len = self.copies.get(&sid).map(|c| c.record.len() as u64);
        let new_len = record.len() as u64;
        let count = self.copies.len() as u64 + u64::from(old_len.is_none());
        let bytes = self.bytes - old_len.unwrap_or(0) + new_len;
        if count > self.limits.sessions_max || bytes > self.limits.bytes_max {
            return AckStatus::Refused;
        }
        self.bytes = bytes;
        self.copies.insert(
            sid,
            Copy {
                version,
                epoch,
                record,
            },
        );
        AckStatus::Applied
    }

    /// Answers a failover fetch.
    pub fn fetch(&mut self, f: Fetch) -> FetchReply {
        self.counters.fetches += 1;
        let found = self.copies.get(&f.sid).map(|c| FoundRecord {
            version: c.version,
            epoch: c.epoch,
            record: c.record.clone(),
        });
        if found.is_some() {
            self.counters.fetch_hits += 1;
        }
        FetchReply {
            request_id: f.request_id,
            sid: f.sid,
            found,
        }
    }

    /// Drops copies written under an epoch older than each entry's.
    pub fn invalidate(&mut self, inv: &Invalidate) {
        for e in &inv.entries {
            if self.copies.get(&e.sid).is_some_and(|c| c.epoch < e.epoch)
                && let Some(c) = self.copies.remove(&e.sid)
            {
                self.bytes -= c.record.len() as u64;
                self.counters.invalidated += 1;
            }
        }
    }

    /// The node's counters.
    pub fn stats(&self, r: StatsRequest) -> Stats {
        let c = &self.counters;
        let counters = [
            ("sessions", self.copies.len() as u64),
            ("bytes", self.bytes),
            ("applied", c.applied),
            ("need_full", c.need_full),
            ("fenced", c.fenced),
            ("refused", c.refused),
            ("fetches", c.fetches),
            ("fetch_hits", c.fetch_hits),
            ("invalidated", c.invalidated),
        ]
        .into_iter()
        .map(|(name, value)| Counter {
            name: name.to_string(),
            value,
        })
        .collect();
        Stats {
            request_id: r.request_id,
            incarnation: self.incarnation,
            counters,
        }
    }
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Node id (handshake id and placement id).
    pub node_id: u16,
    /// What the node agrees to hold.
    pub limits: NodeLimits,
    /// Most open connections.
    pub connections_max: u32,
    /// An authenticated connection idle this long is closed, in ms.
    pub idle_timeout_ms: u64,
    /// Threads serving connections (one runtime each, sharing the port
    /// through `SO_REUSEPORT`, the store split into as many shards; 1 to
    /// [`crate::shards::SHARDS_MAX`]). The kernel spreads connections, so
    /// more threads help once several hosts connect.
    pub threads: usize,
}

impl NodeConfig {
    /// Defaults for everything but where it listens and its id.
    pub fn new(listen: SocketAddr, node_id: u16) -> NodeConfig {
        NodeConfig {
            listen,
            node_id,
            limits: NodeLimits::default(),
            connections_max: sessio_net::server::CONNECTIONS_MAX_DEFAULT,
            idle_timeout_ms: sessio_net::server::IDLE_TIMEOUT_MS_DEFAULT,
            threads: 1,
        }
    }
}

/// Runs a node until `shutdown` completes: on the current thread, plus
/// `config.threads - 1` more that share its port and its store (in shards).
/// Calls `on_bound` with the bound address and the incarnation once every
/// thread listens.
pub fn serve<B: Rt>(
    config: &NodeConfig,
    secret: Secret,
    on_bound: impl FnOnce(SocketAddr, u64),
    shutdown: impl Future<Output = ()> + 'static,
) -> io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let identity = Identity::with_random_incarnation(u64::from(config.node_id))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let threads = config.threads.clamp(1, crate::shards::SHARDS_MAX);
    let mut sc = ServerConfig::new(identity);
    // The cap is the node's: each thread takes its part.
    sc.connections_max = config
        .connections_max
        .div_ceil(u32::try_from(threads).unwrap_or(1))
        .max(1);
    sc.idle_timeout_ms = config.idle_timeout_ms;
    sc.socket.reuse_port = threads > 1;
    let shards = Arc::new(crate::shards::Shards::new(
        config.limits,
        identity.incarnation,
        threads,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let listen = config.listen;
    let node_id = config.node_id;
    B::block_on(async move {
        // A node restarted at once can find its port still held: io_uring
        // tears a dead process's ring down asynchronously, and a pending
        // accept keeps the old listener alive for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(BIND_RETRY_MS);
        let server: Server<B> = loop {
            match Server::bind(listen, sc.clone(), secret.clone()) {
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    B::sleep(std::time::Duration::from_millis(20)).await;
                }
                r => break r?,
            }
        };
        let addr = server.local_addr();
        let mut others = Vec::with_capacity(threads - 1);
        let mut failed = None;
        for t in 1..threads {
            let (tx, rx) = std::sync::mpsc::channel();
            let (shards, stop) = (Arc::clone(&shards), Arc::clone(&stop));
            let (sc, secret) = (sc.clone(), secret.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("node-{node_id}-{t}"))
                .spawn(move || {
                    B::block_on(async move {
                        let server = match Server::<B>::bind(addr, sc, secret) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                                return Err(e);
                            }
                        };
                        let _ = tx.send(Ok(()));
                        let handler = move |_peer: PeerInfo, msg: Message| shards.handle(msg);
                        let stopped = async move {
                            while !stop.load(Ordering::Relaxed) {
                                B::sleep(std::time::Duration::from_millis(5)).await;
                            }
                        };
                        server.serve_until(handler, stopped).await
                    })
                });
            match spawned.map(|h| (h, rx.recv())) {
                Ok((h, Ok(Ok(())))) => others.push(h),
                Ok((h, Ok(Err(e)))) => {
                    let _ = h.join();
                    failed = Some(e);
                    break;
                }
                Ok((h, Err(_))) => {
                    let _ = h.join();
                    failed = Some(io::Error::other("a node thread ended before it listened"));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let result = if let Some(e) = failed {
            Err(e)
        } else {
            on_bound(addr, identity.incarnation);
            let handler = {
                let shards = Arc::clone(&shards);
                move |_peer: PeerInfo, msg: Message| shards.handle(msg)
            };
            server.serve_until(handler, shutdown).await
        };
        stop.store(true, Ordering::Relaxed);
        for h in others {
            let _ = h.join();
        }
        result
    })
}

/// A node served on a thread of this process: for embedding a node in
/// another program, and for tests and benchmarks on loopback. Stopped (and
/// its thread joined) when dropped.
#[derive(Debug)]
pub struct LocalNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its incarnation id.
    pub incarnation: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl LocalNode {
    /// Starts `serve` with `config` on a new thread, on backend `B`; returns
    /// once it listens.
    pub fn start<B: Rt>(config: NodeConfig, secret: Secret) -> io::Result<LocalNode> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("node-{}", config.node_id))
            .spawn({
                let stop = std::sync::Arc::clone(&stop);
                move || {
                    let shutdown = async move {
                        while !stop.load(Ordering::Relaxed) {
                            B::sleep(std::time::Duration::from_millis(5)).await;
                        }
                    };
                    serve::<B>(
                        &config,
                        secret,
                        |addr, inc| {
                            // The starter waits for this; if it is gone, nobody is listening.
                            let _ = tx.send((addr, inc));
                        },
                        shutdown,
                    )
                }
            })?;
        match rx.recv() {
            Ok((addr, incarnation)) => Ok(LocalNode {
                addr,
                incarnation,
                stop,
                thread: Some(thread),
            }),
            // The thread ended before binding: its error says why.
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(io::Error::other("the node thread ended before it listened")),
            },
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessio_engine::Op;
    use sessio_engine::session::SessionData;
    use sessio_engine::session::encode_ops;
    use sessio_net::InvalidateEntry;

    const SID: Sid = [7; 16];

    fn record(attrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut d = SessionData::default();
        let ops: Vec<Op> = attrs
            .iter()
            .map(|(k, v)| Op::Set {
                key: (*k).into(),
                value: v.to_vec(),
            })
            .collect();
        d.apply(&ops, 1, 1 << 20).unwrap();
        encode_session(&d).to_vec()
    }

    fn entry(base: u64, new: u64, epoch: u64, body: Delta) -> DeltaEntry {
        DeltaEntry {
            sid: SID,
            base_version: base,
            new_version: new,
            epoch,
            body,
        }
    }

    fn one(store: &mut Store, e: DeltaEntry) -> AckEntry {
        let ack = store.apply_batch(DeltaBatch {
            host_id: 1,
            entries: vec![e],
        });
        assert_eq!(ack.entries.len(), 1);
        ack.entries[0]
    }

    fn set(key: &str, v: &[u8]) -> Delta {
        Delta::Ops(
            encode_ops(&[Op::Set {
                key: key.into(),
                value: v.to_vec(),
            }])
            .to_vec(),
        )
    }

    #[test]
    fn ops_need_the_base_version() {
        let mut s = Store::new(NodeLimits::default(), 1);
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
            AckStatus::NeedFull
        );
        let full = one(&mut s, entry(0, 1, 1, Delta::Full(record(&[("a", b"0")]))));
        assert_eq!((full.status, full.version), (AckStatus::Applied, 1));
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"x"))).status,
            AckStatus::Applied
        );
        // The same delta again: base no longer matches.
        assert_eq!(
            one(&mut s, entry(1, 2, 1, set("a", b"y"))).status,
            AckStatus::NeedFull
        );
        let c = s.get(&SID).unwrap();
        assert_eq!(c.version, 2);
        let d = decode_session(&c.record).unwrap();
        assert_eq!(d.get("a"), Some(&b"x"[..]));
        assert_eq!(d.log.last().unwrap().version, 2);
    }

    #[test]
    fn older_epochs_are_fenced() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(
            &mut s,
            entry(0, 5, 3, Delta::Full(record(&[("o", b"new")]))),
        );
        assert_eq!(
            one(&mut s, entry(5, 6, 2, set("o", b"old"))).status,
            AckStatus::Fenced
        );
        assert_eq!(
            one(
                &mut s,
                entry(0, 9, 2, Delta::Full(record(&[("o", b"old")])))
            )
            .status,
            AckStatus::Fenced
        );
        assert_eq!(
            one(&mut s, entry(0, 9, 2, Delta::Remove)).status,
            AckStatus::Fenced
        );
        // The newer owner's ops on the same base move the copy forward.
        assert_eq!(
            one(&mut s, entry(5, 6, 4, set("o", b"b"))).status,
            AckStatus::Applied
        );
        assert_eq!(s.get(&SID).unwrap().epoch, 4);
        assert_eq!(s.counters.fenced, 3);
        // A replayed full copy of the same epoch is acknowledged, not applied.
        let r = one(&mut s, entry(0, 5, 4, Delta::Full(record(&[]))));
        assert_eq!((r.status, r.version), (AckStatus::Applied, 6));
    }

    #[test]
    fn bad_records_and_full_stores_are_refused() {
        let mut s = Store::new(
            NodeLimits {
                sessions_max: 1,
                bytes_max: 1 << 20,
            },
            1,
        );
        assert_eq!(
            one(&mut s, entry(0, 1, 1, Delta::Full(vec![0xFF; 40]))).status,
            AckStatus::Refused
        );
        assert_eq!(
            one(&mut s, entry(0, 1, 1, Delta::Full(record(&[])))).status,
            AckStatus::Applied
        );
        assert_eq!(
            one(&mut s, entry(1, 2, 1, Delta::Ops(vec![1, 2, 3]))).status,
            AckStatus::Refused
        );
        let other = DeltaEntry {
            sid: [8; 16],
            ..entry(0, 1, 1, Delta::Full(record(&[])))
        };
        assert_eq!(one(&mut s, other).status, AckStatus::Refused);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn fetch_remove_and_invalidate() {
        let mut s = Store::new(NodeLimits::default(), 1);
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
        let r = s.fetch(Fetch {
            request_id: 9,
            sid: SID,
        });
        assert_eq!(r.found.unwrap().version, 3);
        s.invalidate(&Invalidate {
            entries: vec![InvalidateEntry { sid: SID, epoch: 2 }],
        });
        assert_eq!(s.len(), 1, "same epoch is not older");
        s.invalidate(&Invalidate {
            entries: vec![InvalidateEntry { sid: SID, epoch: 3 }],
        });
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[("k", b"v")]))));
        assert_eq!(
            one(&mut s, entry(3, 4, 2, Delta::Remove)).status,
            AckStatus::Applied
        );
        assert!(
            s.fetch(Fetch {
                request_id: 1,
                sid: SID
            })
            .found
            .is_none()
        );
        let inv = encode_ops(&[Op::Invalidate]).to_vec();
        one(&mut s, entry(0, 3, 2, Delta::Full(record(&[]))));
        assert_eq!(
            one(&mut s, entry(3, 4, 2, Delta::Ops(inv))).status,
            AckStatus::Applied
        );
        assert!(s.is_empty());
    }
}
