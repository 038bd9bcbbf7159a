//! The replicator's I/O: the dispatcher that takes dirty sessions from the
//! arena and routes them, and one task per node that batches, sends and
//! applies acks.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hashbrown::HashSet;
use sessio_engine::{Arena, Dirty, SessionError, Sid};
use sessio_net::{
    AckStatus, Backoff, Client, ClientConfig, Delta, DeltaBatch, DeltaEntry, Identity, Message,
    Ping,
};

use super::state::{State, settle, stand_in};
use super::{Ctx, ReplicatorStats, SidState};
use crate::runtime::Rt;

/// Resolves once a link has told the dispatcher it has nothing in flight.
fn dispatcher_notified<'a>(ctx: &'a Ctx<'_>) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        let mut st = ctx.state.borrow_mut();
        if std::mem::take(&mut st.dispatcher.set) {
            std::task::Poll::Ready(())
        } else {
            st.dispatcher.waker = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
}

/// Resolves once link `id` has been notified (or is gone).
pub(super) fn notified<'a>(ctx: &'a Ctx<'_>, id: u16) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        let mut st = ctx.state.borrow_mut();
        let Some(l) = st.link(id) else {
            return std::task::Poll::Ready(());
        };
        if std::mem::take(&mut l.wake.set) {
            std::task::Poll::Ready(())
        } else {
            l.wake.waker = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
}

pub(super) async fn dispatcher<B: Rt>(ctx: &Ctx<'_>, stats: &Mutex<ReplicatorStats>) {
    let interval = Duration::from_micros(ctx.config.flush_interval_us.max(1));
    let mut dirty = Vec::with_capacity(ctx.config.dirty_take_max);
    let mut arena_stats: Option<(Instant, sessio_engine::ArenaStats)> = None;
    let mut last_snapshot: Option<Instant> = None;
    loop {
        let last = ctx.stop.load(Ordering::SeqCst);
        let mut taken = 0;
        loop {
            ctx.arena.take_dirty(ctx.config.dirty_take_max, &mut dirty);
            taken += dirty.len();
            let now = Instant::now();
            let mut st = ctx.state.borrow_mut();
            for d in &dirty {
                let sid = match *d {
                    Dirty::Changed {
                        sid,
                        version,
                        epoch,
                        ..
                    } => {
                        if !st.sids.contains_key(&sid)
                            && seed_acks(ctx.arena, &mut st, sid, version, epoch)
                        {
                            // Every owner holds this version already.
                            continue;
                        }
                        let s = st.sids.entry(sid).or_default();
                        if s.version != version || s.epoch != epoch || s.removed {
                            if s.epoch != epoch {
                                // Acks were for copies under another owner.
                                s.acks.clear();
                                s.sent.clear();
                            }
                            s.version = version;
                            s.epoch = epoch;
                            s.removed = false;
                            s.fenced = false;
                            if s.note_unacked(now, version) {
                                st.start_waiting(sid, now);
                            }
                        }
                        sid
                    }
                    Dirty::Removed { sid } => {
                        let s = st.sids.entry(sid).or_default();
                        if s.epoch == 0 {
                            // Never seen alive by this replicator: the
                            // creation epoch is the best guess; a newer
                            // owner's copy stays (fenced), which is safe.
                            s.epoch = 1;
                        }
                        s.removed = true;
                        if s.note_unacked(now, 0) {
                            st.start_waiting(sid, now);
                        }
                        sid
                    }
                };
                st.route(sid);
            }
            drop(st);
            // A full take means more may be waiting: go again at once.
            if dirty.len() < ctx.config.dirty_take_max {
                break;
            }
        }
        {
            let mut st = ctx.state.borrow_mut();
            st.ticks += 1;
            st.check_slow(Duration::from_millis(ctx.config.slow_after_ms));
        }
        // About to doze: the snapshot is taken now, so what a reader sees
        // while the replicator sleeps is current.
        let dozing = taken == 0 && ctx.state.borrow().links_quiet();
        if last || dozing || last_snapshot.is_none_or(|t| t.elapsed() >= SNAPSHOT_EVERY) {
            last_snapshot = Some(Instant::now());
            let mut snap = ctx.state.borrow_mut().snapshot(B::NAME, last || dozing);
            // The arena's counters ask the kernel about every handle: once a
            // second is plenty.
            if arena_stats
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1))
            {
                arena_stats = Some((Instant::now(), ctx.arena.stats()));
            }
            snap.arena = arena_stats.as_ref().map(|(_, a)| a.clone());
            if let Ok(mut s) = stats.lock() {
                *s = snap;
            }
        }
        if last {
            ctx.drained.store(true, Ordering::SeqCst);
            // Idle links wait for work: wake them to see the stop.
            for l in &mut ctx.state.borrow_mut().nodes {
                l.wake.notify();
            }
            return;
        }
        if dozing {
            // Idle, with no batch to send or watch: sleep until a
            // process marks a session dirty (see `watch`), so a lone
            // change ships at once and an idle host costs nothing.
            ctx.watch.doze::<B>(ctx.arena).await;
        } else if taken < LIGHT_TAKE || ctx.arena.replication_urged() {
            // Light load, or a writer waits for acks: go again as soon as
            // a link is free (its last ack in), not a whole interval later;
            // what piled up meanwhile goes in one batch.
            let _ = B::timeout(interval, dispatcher_notified(ctx)).await;
        } else {
            // Busy: changes batch over the interval.
            B::sleep(interval).await;
        }
    }
}

/// A tick that took fewer sessions than this goes again as soon as a link is
/// free; one that took more waits the whole interval, so changes batch
/// (a batch's round trip costs the replicator ~20 µs of CPU, whatever its
/// size: a web host at 20k updates/s pays ~12 µs per update when they
/// batch over the interval, 28 µs when each ships alone).
const LIGHT_TAKE: usize = 2;
/// How often the dispatcher publishes a stats snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(1);

/// Fewer pending sessions than this wait for the batch in flight's ack.
const SMALL_BATCH: usize = 32;

fn pending_len(ctx: &Ctx<'_>, id: u16) -> usize {
    ctx.state
        .borrow_mut()
        .link(id)
        .map_or(0, |l| l.pending.len())
}

/// One delta entry sent and not yet acknowledged.
pub(super) struct Sent {
    pub(super) sid: Sid,
    pub(super) new_version: u64,
    /// Ownership epoch it was sent under.
    pub(super) epoch: u64,
    /// A `Remove` telling a stand-in to drop its hinted copy: every owner
    /// holds the current version again.
    pub(super) drops_hint: bool,
}

pub(super) async fn node_link<B: Rt>(ctx: &Ctx<'_>, id: u16, addr: std::net::SocketAddr) {
    let cfg = ctx.config;
    let identity = Identity {
        id: ctx.config.host_id,
        incarnation: Identity::with_random_incarnation(0).map_or(1, |i| i.incarnation),
    };
    let mut cc = ClientConfig::new(identity);
    cc.handshake_timeout_ms = cfg.handshake_timeout_ms;
    cc.io_timeout_ms = cfg.ack_timeout_ms;
    cc.in_flight_bytes_max = cfg.batch_bytes_max * cfg.in_flight_batches_max as u64 * 2;
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.backoff_min_ms),
        Duration::from_millis(cfg.backoff_max_ms),
    );
    let mut next_attempt = Instant::now();
    let mut conn: Option<Client<B>> = None;
    let mut in_flight: VecDeque<Vec<Sent>> = VecDeque::new();
    let mut last_io = Instant::now();
    // Pings go out every `ping_interval_ms` even on a busy link: their
    // pongs bring the takeover notices (sessions another host now owns).
    let mut last_ping = Instant::now();
    let mut pong_due = false;
    let ping_every = Duration::from_millis(cfg.ping_interval_ms);
    let mut drain_deadline: Option<Instant> = None;
    let idle_sleep = Duration::from_micros(cfg.flush_interval_us.max(1));
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            let deadline = *drain_deadline.get_or_insert_with(|| {
                Instant::now() + Duration::from_millis(cfg.drain_timeout_ms)
            });
            let idle = ctx.drained.load(Ordering::SeqCst)
                && in_flight.is_empty()
                && ctx
                    .state
                    .borrow_mut()
                    .link(id)
                    .is_none_or(|l| l.pending.is_empty());
            if idle || conn.is_none() || Instant::now() >= deadline {
                return;
            }
        }
        let Some(client) = conn.as_mut() else {
            let now = Instant::now();
            if now < next_attempt {
                B::sleep((next_attempt - now).min(Duration::from_millis(20))).await;
                continue;
            }
            match Client::<B>::connect(addr, cc.clone(), cfg.secret.clone()).await {
                // The handshake proved who answers: a node that is not the
                // one configured at this address (a swapped `--nodes`
                // mapping, a stranger on the port) is not sent its share.
                Ok(c) if c.peer().identity.id != u64::from(id) => {
                    let error = format!(
                        "the node at {addr} proved id {}, but it is configured as node {id}: refusing it (check the node list)",
                        c.peer().identity.id
                    );
                    let first = ctx
                        .state
                        .borrow_mut()
                        .link(id)
                        .is_none_or(|l| l.stats.last_error.as_deref() != Some(error.as_str()));
                    if first {
                        tracing::error!(node = id, "{error}");
                    }
                    drop(c);
                    on_down(ctx, id, &mut in_flight, &error);
                    next_attempt = Instant::now() + backoff.next_delay();
                }
                Ok(c) => {
                    backoff = Backoff::new(
                        Duration::from_millis(cfg.backoff_min_ms),
                        Duration::from_millis(cfg.backoff_max_ms),
                    );
                    on_up(ctx, id, c.peer().identity.incarnation);
                    conn = Some(c);
                    last_io = Instant::now();
                }
                Err(e) => {
                    on_down(ctx, id, &mut in_flight, &e.to_string());
                    next_attempt = Instant::now() + backoff.next_delay();
                }
            }
            continue;
        };
        let result: Result<(), String> = async {
            while in_flight.len() < cfg.in_flight_batches_max.max(1) {
                // A link with a batch in flight sends the next only once it
                // is worth a batch: until the ack comes back, changes pile
                // up into it. So an idle link ships a lone change at once,
                // and a busy one batches by its round trip.
                if !in_flight.is_empty() && pending_len(ctx, id) < SMALL_BATCH {
                    break;
                }
                let Some((batch, sent)) = build_batch(ctx, id) else {
                    break;
                };
                // In flight from here: while the send is under way, the
                // dispatcher sees a busy link (it does not doze), and a
                // failed send hands the batch to `on_down` like any other
                // in flight (else its sessions stayed marked sent).
                if let Some(l) = ctx.state.borrow_mut().link(id) {
                    l.stats.in_flight += sent.len() as u64;
                    l.sent_at.push_back(Instant::now());
                }
                in_flight.push_back(sent);
                let before = client.in_flight_bytes();
                client
                    .send(&Message::DeltaBatch(batch))
                    .await
                    .map_err(|e| e.to_string())?;
                let bytes = client.in_flight_bytes() - before;
                if let Some(l) = ctx.state.borrow_mut().link(id) {
                    l.stats.bytes_sent += bytes;
                }
            }
            if !in_flight.is_empty() && !pong_due && last_ping.elapsed() >= ping_every {
                client
                    .send(&Message::Ping(Ping { nonce: 0 }))
                    .await
                    .map_err(|e| e.to_string())?;
                (pong_due, last_ping) = (true, Instant::now());
            }
            if !in_flight.is_empty() || pong_due {
                let reply = client.recv().await.map_err(|e| e.to_string())?;
                last_io = Instant::now();
                match reply {
                    reply @ (Message::Ack(_) | Message::AllApplied(_)) => {
                        let Some(sent) = in_flight.pop_front() else {
                            return Err("an ack for no batch".into());
                        };
                        if let Some(l) = ctx.state.borrow_mut().link(id) {
                            l.sent_at.pop_front();
                        }
                        let acks = acks_of(reply, &sent)?;
                        apply_acks(ctx, id, &sent, &acks);
                        if in_flight.is_empty() {
                            // Free again: a dispatcher waiting for that
                            // (a writer urged) takes what piled up.
                            ctx.state.borrow_mut().dispatcher.notify();
                        }
                    }
                    Message::Pong(p) if pong_due => {
                        pong_due = false;
                        evict_stale(ctx, id, &p.stale);
                    }
                    other => return Err(format!("unexpected {:?} from node", other.kind())),
                }
            } else if last_io.elapsed() >= ping_every || last_ping.elapsed() >= ping_every {
                // Finds a node that died while we had nothing to say, and
                // collects the takeover notices.
                let reply = client
                    .call(&Message::Ping(Ping { nonce: 0 }))
                    .await
                    .map_err(|e| e.to_string())?;
                let Message::Pong(p) = reply else {
                    return Err(format!("unexpected {:?} to a ping", reply.kind()));
                };
                evict_stale(ctx, id, &p.stale);
                (last_io, last_ping) = (Instant::now(), Instant::now());
            } else {
                // Until the dispatcher queues work, or it is time to ping.
                let ping = ping_every.saturating_sub(last_io.elapsed().max(last_ping.elapsed()));
                let _ = B::timeout(ping.max(idle_sleep), notified(ctx, id)).await;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::info!(node = id, "replica link down: {e}");
            conn = None;
            pong_due = false;
            on_down(ctx, id, &mut in_flight, &e);
            next_attempt = Instant::now() + backoff.next_delay();
        }
    }
}

/// Learns what the arena remembers of a session this replicator has not
/// seen yet: the acks of nodes whose incarnation is still the one recorded
/// with them. Returns true when every owner holds `version` already, so
/// there is nothing to send.
pub(super) fn seed_acks(arena: &Arena, st: &mut State, sid: Sid, version: u64, epoch: u64) -> bool {
    let Ok(acks) = arena.acked(sid) else {
        return false;
    };
    let mut s = SidState::default();
    for (node, v) in acks {
        let trusted = st
            .nodes
            .iter()
            .any(|n| n.stats.id == node && n.stats.incarnation.is_some());
        if v > 0 && v <= version && trusted {
            s.set_ack(node, v);
        }
    }
    let current = st
        .placement
        .owners(&sid.0)
        .iter()
        .all(|&o| s.acked_by(o) == version);
    s.epoch = epoch;
    if current {
        s.version = version;
    }
    // Otherwise the caller takes the version in as a change to ship.
    st.sids.insert(sid, s);
    current
}

/// A handshake succeeded. An incarnation other than the one recorded means
/// the node lost its copies (or was never seen): its acks are forgotten,
/// here and in the arena, the new incarnation is recorded, and every
/// session is looked at again so the node's share is resent.
pub(super) fn on_up(ctx: &Ctx<'_>, id: u16, incarnation: u64) {
    let mut st = ctx.state.borrow_mut();
    let Some(l) = st.link(id) else { return };
    let known = l.stats.incarnation;
    let was_down = !l.stats.up;
    if was_down && l.stats.connects > 0 {
        tracing::info!(
            node = id,
            owed = l.owed.len(),
            "replica link up again after: {}",
            l.stats.last_error.as_deref().unwrap_or("a failure")
        );
    }
    l.stats.incarnation = Some(incarnation);
    l.stats.up = true;
    l.stats.connects += 1;
    l.stats.last_error = None;
    if known != Some(incarnation) {
        if known.is_some() {
            l.stats.new_incarnations += 1;
            tracing::info!(
                node = id,
                "node restarted (new incarnation): resending its share"
            );
        }
        // Queued removals stay (a node that lost its copies may still
        // hold one the failover push gave it); everything else is resent
        // from the dirty marks below.
        let (pending, owed) = (std::mem::take(&mut l.pending), std::mem::take(&mut l.owed));
        let keep: HashSet<Sid> = pending
            .into_iter()
            .chain(owed)
            .filter(|sid| st.sids.get(sid).is_some_and(|s| s.removed))
            .collect();
        if let Some(l) = st.link(id) {
            l.pending = keep;
        }
        for s in st.sids.values_mut() {
            s.forget(id);
        }
        drop(st);
        // Old acks go before the new incarnation is recorded, so a crash
        // in between leaves a mismatch, never stale acks that look valid.
        ctx.arena.forget_acks(id);
        if !ctx.arena.set_replica_incarnation(id, incarnation) {
            tracing::warn!(
                node = id,
                "the arena's replica table is full: a restarted replicator will resend this node's share"
            );
        }
        ctx.arena.mark_all_dirty();
    } else if was_down {
        // Hand back what went to stand-ins while it was away.
        let owed: Vec<Sid> = l.owed.drain().collect();
        l.pending.extend(owed);
    }
}

/// The link failed: hand its pending and unacknowledged sessions to the
/// next nodes in their rankings, and owe them to this one.
pub(super) fn on_down(ctx: &Ctx<'_>, id: u16, in_flight: &mut VecDeque<Vec<Sent>>, error: &str) {
    let mut st = ctx.state.borrow_mut();
    let Some(l) = st.link(id) else { return };
    l.stats.last_error = Some(error.to_string());
    l.stats.in_flight = 0;
    l.sent_at.clear();
    let was_up = l.stats.up;
    l.stats.up = false;
    let mut moved: Vec<Sid> = l.pending.drain().collect();
    let lost: Vec<Sid> = in_flight.drain(..).flatten().map(|s| s.sid).collect();
    for sid in &lost {
        // What was in flight is lost with the connection: the next batch
        // starts from what the node acknowledged.
        if let Some(s) = st.sids.get_mut(sid) {
            s.clear_sent(id);
        }
    }
    moved.extend(lost);
    if was_up {
        tracing::warn!(node = id, "replica node down: {error}");
    }
    for sid in moved {
        if st.sids.get(&sid).is_some_and(|s| s.fenced) {
            continue;
        }
        st.route(sid);
    }
}

/// Takes sessions off the node's pending set into the next batch; `None`
/// when nothing is left to send.
pub(super) fn build_batch(ctx: &Ctx<'_>, id: u16) -> Option<(DeltaBatch, Vec<Sent>)> {
    loop {
        match build_once(ctx, id) {
            Built::Batch(b, sent) => return Some((b, sent)),
            Built::UpToDate => {}
            Built::Nothing => return None,
        }
    }
}

pub(super) enum Built {
    Batch(DeltaBatch, Vec<Sent>),
    /// Everything taken was already current on the node.
    UpToDate,
    Nothing,
}

/// Adds a whole-record entry; returns the bytes it adds to the batch.
pub(super) fn push_full(
    entries: &mut Vec<DeltaEntry>,
    sent: &mut Vec<Sent>,
    sid: Sid,
    version: u64,
    epoch: u64,
    record: Vec<u8>,
) -> u64 {
    let bytes = record.len() as u64 + 64;
    entries.push(DeltaEntry {
        sid: sid.0,
        base_version: 0,
        new_version: version,
        epoch,
        body: Delta::Full(record),
    });
    sent.push(Sent {
        sid,
        new_version: version,
        epoch,
        drops_hint: false,
    });
    bytes
}

/// Adds a `Remove` entry at the session's epoch (a removal, or a stand-in
/// dropping its hinted copy); returns the bytes it adds to the batch. A
/// removal carries the newest version shipped of the session, which may
/// be past the one taken (a node keeps a copy newer than the removal it
/// gets, taking it for a write that overtook it); a drop carries the
/// version taken, so a newer hinted copy stays.
pub(super) fn push_remove(
    entries: &mut Vec<DeltaEntry>,
    sent: &mut Vec<Sent>,
    sid: Sid,
    s: &SidState,
    base: u64,
    drops_hint: bool,
) -> u64 {
    let version = if drops_hint {
        s.version
    } else {
        s.newest_shipped()
    };
    entries.push(DeltaEntry {
        sid: sid.0,
        base_version: base,
        new_version: version,
        epoch: s.epoch,
        body: Delta::Remove,
    });
    sent.push(Sent {
        sid,
        new_version: version,
        epoch: s.epoch,
        drops_hint,
    });
    64
}

pub(super) fn build_once(ctx: &Ctx<'_>, id: u16) -> Built {
    let cfg = ctx.config;
    let entries_max = cfg.batch_entries_max.clamp(1, 4096);
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    // Owners this replicator reached and still reaches: only their acks
    // may let a stand-in drop its hinted copy.
    let confirmed: Vec<u16> = st
        .nodes
        .iter()
        .filter(|n| n.stats.up && n.stats.connects > 0)
        .map(|n| n.stats.id)
        .collect();
    let Some(link) = st.nodes.iter_mut().find(|n| n.stats.id == id) else {
        return Built::Nothing;
    };
    if link.pending.is_empty() {
        return Built::Nothing;
    }
    let mut entries = Vec::new();
    let mut sent = Vec::new();
    let mut bytes = 0u64;
    let mut taken = Vec::new();
    for &sid in &link.pending {
        if entries.len() >= entries_max || bytes >= cfg.batch_bytes_max {
            break;
        }
        taken.push(sid);
        let Some(s) = st.sids.get(&sid) else { continue };
        if s.fenced {
            continue;
        }
        let base = s.acked_by(id);
        if !s.removed
            && let Some(hinted) = stand_in(&st.placement, s, sid, id, &confirmed)
        {
            // This node stood in for an owner that holds the current
            // version again: drop the hinted copy (if any), send nothing.
            if hinted {
                bytes += push_remove(&mut entries, &mut sent, sid, s, base, true);
                // Forgotten now: should the drop never land, the cost is a
                // copy left behind, never an ack claiming one that is gone.
                forget_hint_ack(ctx.arena, &st.placement, sid, id, &s.acks);
            }
            continue;
        }
        if s.removed {
            bytes += push_remove(&mut entries, &mut sent, sid, s, base, false);
            continue;
        }
        match ctx.arena.delta_since(sid, s.base_for(id)) {
            // Current on the node already (or about to be, with what is in
            // flight), or gone from the arena (its removal comes as a dirty
            // entry of its own).
            Ok(sessio_engine::Delta::UpToDate) | Err(SessionError::NotFound) => {}
            Ok(sessio_engine::Delta::Ops {
                version,
                epoch,
                batches,
            }) if batches.len() + entries.len() <= entries_max => {
                let first = version - batches.len() as u64;
                for (i, ops) in batches.into_iter().enumerate() {
                    let v = first + i as u64;
                    bytes += ops.len() as u64 + 64;
                    entries.push(DeltaEntry {
                        sid: sid.0,
                        base_version: v,
                        new_version: v + 1,
                        epoch,
                        body: Delta::Ops(ops),
                    });
                    sent.push(Sent {
                        sid,
                        new_version: v + 1,
                        epoch,
                        drops_hint: false,
                    });
                }
            }
            Ok(sessio_engine::Delta::Ops { .. }) if !entries.is_empty() => {
                // Does not fit this batch: next one.
                taken.pop();
                break;
            }
            // More op batches than one delta batch may carry at all: ship
            // the whole record instead (else this session would never fit,
            // and the link would spin on it).
            Ok(sessio_engine::Delta::Ops { .. }) => {
                if let Ok(sessio_engine::Delta::Full {
                    version,
                    epoch,
                    bytes: record,
                }) = ctx.arena.delta_since(sid, 0)
                {
                    bytes += push_full(&mut entries, &mut sent, sid, version, epoch, record);
                }
            }
            Ok(sessio_engine::Delta::Full {
                version,
                epoch,
                bytes: record,
            }) => {
                bytes += push_full(&mut entries, &mut sent, sid, version, epoch, record);
            }
            Err(e) => tracing::warn!(%sid, "cannot build a delta: {e}"),
        }
    }
    for sid in &taken {
        link.pending.remove(sid);
    }
    for e in sent.iter().filter(|e| !e.drops_hint) {
        if let Some(ss) = st.sids.get_mut(&e.sid)
            && !ss.removed
        {
            ss.set_sent(id, e.new_version);
        }
    }
    // What was taken and sends nothing was current on the node already:
    // maybe it is fully acked now. (Settled only when the whole batch came
    // out empty, such a session waited for its next change to count as
    // acked, and its lag read as the time to that change.)
    for &sid in &taken {
        if !sent.iter().any(|e| e.sid == sid) {
            settle(st, sid);
        }
    }
    if entries.is_empty() {
        return Built::UpToDate;
    }
    Built::Batch(
        DeltaBatch {
            host_id: cfg.host_id,
            entries,
        },
        sent,
    )
}

/// The ack entries a node's answer to batch `sent` stands for: an
/// [`sessio_net::AllApplied`] says what a whole ack of every entry
/// `Applied` at the version sent would. An answer of another length than
/// the batch is an error.
pub(super) fn acks_of(reply: Message, sent: &[Sent]) -> Result<Vec<sessio_net::AckEntry>, String> {
    let acks = match reply {
        Message::Ack(ack) => ack.entries,
        Message::AllApplied(a) if usize::try_from(a.entries) == Ok(sent.len()) => {
            sessio_net::Ack::all_applied(sent.iter().map(|s| (s.sid.0, s.new_version))).entries
        }
        Message::AllApplied(a) => {
            return Err(format!(
                "ack has {} entries for a batch of {}",
                a.entries,
                sent.len()
            ));
        }
        other => return Err(format!("unexpected {:?} as an ack", other.kind())),
    };
    if acks.len() != sent.len() {
        return Err(format!(
            "ack has {} entries for a batch of {}",
            acks.len(),
            sent.len()
        ));
    }
    Ok(acks)
}

pub(super) fn apply_acks(ctx: &Ctx<'_>, id: u16, sent: &[Sent], acks: &[sessio_net::AckEntry]) {
    let evict = record_acks(ctx, id, sent, acks);
    evict_stale(ctx, id, &evict);
}

/// Forgets stand-in `node`'s ack of `sid` in the arena (its hinted copy
/// goes) and writes the owners' acks (`acks`, this replicator's view) back.
/// The arena keeps two acks per session and a third displaces the oldest:
/// while a stand-in held a copy, the returning owner's ack may have
/// displaced the other owner's, and forgetting only the stand-in's left the
/// arena showing one ack where both owners hold the version (so a
/// `Replicated` write waited for acks that were there).
fn forget_hint_ack(
    arena: &Arena,
    placement: &crate::placement::Placement,
    sid: Sid,
    node: u16,
    acks: &[(u16, u64)],
) {
    let _ = arena.forget_ack(sid, node);
    for owner in placement.owners(&sid.0) {
        if let Some(&(_, v)) = acks
            .iter()
            .find(|&&(n, v)| n == owner && n != node && v > 0)
        {
            let _ = arena.mark_acked(sid, owner, v);
        }
    }
}

/// Applies the acks to the replicator's state; returns the copies the
/// node's `Fenced` answers make stale here.
fn record_acks(
    ctx: &Ctx<'_>,
    id: u16,
    sent: &[Sent],
    acks: &[sessio_net::AckEntry],
) -> Vec<sessio_net::InvalidateEntry> {
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let mut resend = Vec::new();
    let mut settled = Vec::new();
    let mut hints = Vec::new();
    let replicas = st.placement.replicas();
    let (mut applied, mut need_full, mut fenced, mut refused) = (0, 0, 0, 0);
    let mut evict = Vec::new();
    for (s, a) in sent.iter().zip(acks) {
        let Some(ss) = st.sids.get_mut(&s.sid) else {
            continue;
        };
        match a.status {
            AckStatus::Applied if s.drops_hint => {
                applied += 1;
                ss.forget(id);
                forget_hint_ack(ctx.arena, &st.placement, s.sid, id, &ss.acks);
            }
            // An ack for a copy under an epoch this host no longer writes
            // (the session was installed anew meanwhile) says nothing of
            // the current one.
            AckStatus::Applied if s.epoch != ss.epoch => applied += 1,
            AckStatus::Applied => {
                applied += 1;
                // The node's version, even past the one the dispatcher took:
                // a batch is built from the arena, which may have moved on
                // since the take. Clamping it to the taken version left the
                // newer one unacked here but marked sent, so never resent:
                // a `Replicated` write of it waited out its timeout.
                let v = if ss.removed { s.new_version } else { a.version };
                if v >= ss.acked_by(id) {
                    ss.set_ack(id, v);
                }
                if ss.base_for(id) <= ss.acked_by(id) {
                    // Nothing newer is in flight to this node.
                    ss.clear_sent(id);
                }
                if !ss.removed && v > 0 {
                    let _ = ctx.arena.mark_acked(s.sid, id, v);
                }
                // An owner caught up: stand-ins holding a hinted copy may
                // drop it now (`build_once` checks every owner).
                if !ss.removed && ss.acks.len() > replicas {
                    hints.extend(
                        ss.acks
                            .iter()
                            .filter(|&&(n, v)| n != id && v > 0)
                            .map(|&(n, _)| (n, s.sid)),
                    );
                }
                settled.push(s.sid);
            }
            // The node holds this version already (a batch sent twice):
            // take its word for it rather than sending the whole record.
            AckStatus::NeedFull
                if s.epoch == ss.epoch && a.version >= s.new_version && a.version <= ss.version =>
            {
                if a.version >= ss.acked_by(id) {
                    ss.set_ack(id, a.version);
                    let _ = ctx.arena.mark_acked(s.sid, id, a.version);
                }
                if ss.base_for(id) <= ss.acked_by(id) {
                    ss.clear_sent(id);
                }
                settled.push(s.sid);
            }
            AckStatus::NeedFull => {
                need_full += 1;
                ss.forget(id);
                resend.push(s.sid);
            }
            AckStatus::Fenced => {
                fenced += 1;
                ss.fenced = true;
                ss.clear_sent(id);
                if ss.since.take().is_some() {
                    st.waiting = st.waiting.saturating_sub(1);
                }
                ss.next = None;
                // Another host owns it under a newer epoch: our copy at
                // this one is stale.
                evict.push(sessio_net::InvalidateEntry {
                    sid: s.sid.0,
                    epoch: s.epoch + 1,
                });
            }
            AckStatus::Refused => refused += 1,
        }
    }
    if let Some(l) = st.nodes.iter_mut().find(|n| n.stats.id == id) {
        l.stats.applied += applied;
        l.stats.need_full += need_full;
        l.stats.fenced += fenced;
        l.stats.refused += refused;
        l.stats.in_flight = l.stats.in_flight.saturating_sub(sent.len() as u64);
        l.pending.extend(resend);
    }
    for (n, sid) in hints {
        let is_stand_in = !st.placement.is_owner(&sid.0, n);
        if let Some(l) = st.link(n)
            && is_stand_in
            && l.stats.up
        {
            l.pending.insert(sid);
            l.wake.notify();
        }
    }
    for sid in settled {
        settle(st, sid);
    }
    evict
}

/// Evicts this host's copies of sessions another host took over (a pong's
/// notices, or `Fenced` acks): the next read here fetches the current copy
/// instead of serving a stale one.
pub(super) fn evict_stale(ctx: &Ctx<'_>, id: u16, stale: &[sessio_net::InvalidateEntry]) {
    if stale.is_empty() {
        return;
    }
    let evicted = stale
        .iter()
        .filter(|e| ctx.arena.evict_older(Sid(e.sid), e.epoch) == Ok(true))
        .count() as u64;
    if evicted > 0 {
        tracing::debug!(node = id, evicted, "evicted copies other hosts took over");
    }
    if let Some(l) = ctx.state.borrow_mut().link(id) {
        l.stats.evicted += evicted;
    }
}
